/* Q8_0 VNNI tile bodies of kn_ops_avx512.c, instantiated once per register
 * budget: the includer defines Q8_CAP (the most rows a tile has: arrays are
 * sized by it, so that GCC keeps them in registers; sized 8 for a 4-row tile
 * they went to the stack) and gets q8_block_<CAP> / q8_tile_<CAP>. Only for
 * kn_ops_avx512.c (built with -mavx512*). */

#define Q8_CAT_(a, b) a##_##b
#define Q8_CAT(a, b) Q8_CAT_(a, b)
#define Q8_BLOCK Q8_CAT(q8_block, Q8_CAP)
#define Q8_TILE Q8_CAT(q8_tile, Q8_CAP)

/* Block b of MR (<= Q8_CAP) rows into the f32 chain facc. */
static inline __attribute__((always_inline)) void Q8_BLOCK(const kn_block_q8_x *const *xr,
                                                           const uint8_t *wq, const uint16_t *wd,
                                                           int64_t b, __m512 *facc, const int MR,
                                                           const int64_t pfd)
{
    /* Up to 4 rows the 8 steps run as two chains per row (integer sums are
     * exact, so this changes no bit): one chain of 8 dependent vpdpbusd per
     * block left decode latency bound. 8 rows have ILP enough and no
     * registers to spare. */
    enum { NC = Q8_CAP <= 4 ? 2 : 1 };
    __m512i iacc[NC][Q8_CAP];
    _Pragma("GCC unroll 16") for (int m = 0; m < MR; m++) {
        iacc[0][m] = _mm512_set1_epi32(-128 * xr[m][b].sum);
        if (NC == 2)
            iacc[NC - 1][m] = _mm512_setzero_si512();
    }
    const uint8_t *wb = wq + b * 512;
    if (pfd) /* the same block of the next panel (see q8_tiles) */
        _Pragma("GCC unroll 8") for (int l = 0; l < 8; l++)
            __builtin_prefetch(wb + pfd + l * 64);
    _Pragma("GCC unroll 8") for (int g = 0; g < 8; g++) {
        const __m512i wv = _mm512_load_si512((const void *)(wb + g * 64));
        _Pragma("GCC unroll 16") for (int m = 0; m < MR; m++) {
            int32_t x4;
            memcpy(&x4, xr[m][b].qs + 4 * g, 4);
            iacc[g % NC][m] = _mm512_dpbusd_epi32(iacc[g % NC][m], wv, _mm512_set1_epi32(x4));
        }
    }
    if (NC == 2)
        _Pragma("GCC unroll 16") for (int m = 0; m < MR; m++)
            iacc[0][m] = _mm512_add_epi32(iacc[0][m], iacc[NC - 1][m]);
    const __m512 dw = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(wd + b * 16)));
    _Pragma("GCC unroll 16") for (int m = 0; m < MR; m++)
        facc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[0][m]),
                                  _mm512_mul_ps(dw, _mm512_set1_ps(xr[m][b].d)), facc[m]);
}

/* y rows [m0, m0 + MR) (row stride N, MR <= Q8_CAP) x the 16 columns of the
 * panel. */
static inline __attribute__((always_inline)) void Q8_TILE(const kn_block_q8_x *xq, int64_t nb,
                                                          float *y, int64_t N, const uint8_t *wq,
                                                          const uint16_t *wd, int64_t m0,
                                                          int64_t n0, __mmask16 keep, const int MR,
                                                          const int64_t pfd)
{
    const kn_block_q8_x *xr[Q8_CAP];
    _Pragma("GCC unroll 16") for (int m = 0; m < MR; m++)
        xr[m] = xq + (m0 + m) * nb;
    /* even and odd blocks: the two chains of the canonical order */
    __m512 fe[Q8_CAP], fo[Q8_CAP];
    _Pragma("GCC unroll 16") for (int m = 0; m < MR; m++)
        fe[m] = fo[m] = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        Q8_BLOCK(xr, wq, wd, b, fe, MR, pfd);
        Q8_BLOCK(xr, wq, wd, b + 1, fo, MR, pfd);
    }
    if (b < nb)
        Q8_BLOCK(xr, wq, wd, b, fe, MR, pfd);
    _Pragma("GCC unroll 16") for (int m = 0; m < MR; m++)
        _mm512_mask_storeu_ps(y + (m0 + m) * N + n0, keep, _mm512_add_ps(fe[m], fo[m]));
}

#undef Q8_TILE
#undef Q8_BLOCK
#undef Q8_CAT
#undef Q8_CAT_
