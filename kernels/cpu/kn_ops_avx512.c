/* AVX-512 (F/BW/VL/DQ + VNNI + BF16) op table: the shared SIMD bodies of
 * kn_simd_tmpl.h on 16-lane zmm vectors, plus an integer (VNNI) GEMM for
 * Q8_0 weights. Built with -mavx512*; reached only through kn_ops_for() /
 * kn_ctx_create() after cm_cpu() confirmed the features. */
#include <errno.h>
#include <immintrin.h>
#include <math.h>

#include "kernels/cpu/kn_int.h"

typedef __m512 vf;
typedef __m512i vi;
#define VL 16
#define KN_MR 8 /* 8 x 3 accumulators + 3 weights + 1 broadcast = 28 of 32 zmm */
#define KN_NV 3
#define KN_KC 128 /* 128 x 48 f32 panel = 24 KiB: stays in L1 */
#define KN_IMPL kn_impl_avx512
#define KN_OPS_NAME "avx512"

#define vld(p) _mm512_loadu_ps(p)
#define vst(p, v) _mm512_storeu_ps((p), (v))
#define vset1(f) _mm512_set1_ps(f)
#define vzero() _mm512_setzero_ps()
#define vadd(a, b) _mm512_add_ps((a), (b))
#define vsub(a, b) _mm512_sub_ps((a), (b))
#define vmul(a, b) _mm512_mul_ps((a), (b))
#define vdiv(a, b) _mm512_div_ps((a), (b))
#define vmax(a, b) _mm512_max_ps((a), (b))
#define vmin(a, b) _mm512_min_ps((a), (b))
#define vfma(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define vhsum(v) _mm512_reduce_add_ps(v)
#define vround(v) _mm512_roundscale_ps((v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vswap_pairs(v) _mm512_permute_ps((v), 0xB1)
#define vi_ld(p) _mm512_load_si512((const void *)(p))
#define vi_xor(a, b) _mm512_xor_si512((a), (b))
#define vi_zero() _mm512_setzero_si512()
#define vi_fold(v) _mm512_reduce_add_epi32(v)

static inline vf vld_f16(const uint16_t *p)
{
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

static inline vf vld_bf16(const uint16_t *p)
{
    __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}

static inline vf vld_i8(const int8_t *p)
{
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

static inline vf vld_q4(const uint8_t *qs, int c)
{
    __m128i b = _mm_loadu_si128((const __m128i *)qs);
    if (c)
        b = _mm_srli_epi16(b, 4);
    b = _mm_and_si128(b, _mm_set1_epi8(0x0f));
    __m512i v = _mm512_sub_epi32(_mm512_cvtepu8_epi32(b), _mm512_set1_epi32(8));
    return _mm512_cvtepi32_ps(v);
}

static inline vf vpow2i(vf n)
{
    __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
}

static inline vf vmask_ninf(vf s, vf e)
{
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ), e);
}

#define KN_HAVE_Q8_GEMM 1
#include "kernels/cpu/kn_simd_tmpl.h"

/* ---- Q8_0 GEMM on VNNI ----------------------------------------------------
 * x is quantised once per call into int8 blocks (kn_block_q8_x, f32 scale).
 * Each thread takes panels of 16 weight rows and repacks them once:
 *   wq[b][g][r][4] = W[r].qs[b*32 + 4g .. +3] + 128   (u8, b block, g 0..7)
 *   wd[b][r]       = W[r].d as f32
 * so that one vpdpbusd multiplies a broadcast 4-byte group of an x row with
 * the same group of 16 weight rows. vpdpbusd wants u8 x s8; the +128 bias on
 * the weights is removed by starting each block's accumulator at
 * -128 * sum(x block). Integer sums are exact; only the f32 accumulation of
 * per-block products differs from the float path. */
#define Q8_MR 8

struct q8_args {
    const kn_tensor *w;
    const float *x;
    int64_t M;
    float *y;
    kn_block_q8_x *xq;
    char *packs; /* per thread: nb * (512 + 64) bytes */
    size_t pack_bytes;
    atomic_llong next;
};

static void q8_quant_job(void *p, int ith, int nth)
{
    struct q8_args *a = p;
    const int64_t K = a->w->cols, nb = K / KN_QK;
    int64_t lo, hi;
    kn_split(a->M, ith, nth, 1, &lo, &hi);
    for (int64_t m = lo; m < hi; m++) {
        const float *xm = a->x + m * K;
        kn_block_q8_x *o = a->xq + m * nb;
        for (int64_t b = 0; b < nb; b++) {
            __m512 v0 = _mm512_loadu_ps(xm + b * 32), v1 = _mm512_loadu_ps(xm + b * 32 + 16);
            __m512 am = _mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1));
            const float d = _mm512_reduce_max_ps(am) / 127.0f;
            const float id = d != 0.0f ? 1.0f / d : 0.0f;
            /* round half away from zero, as roundf in the reference */
            __m512 s0 = _mm512_mul_ps(v0, _mm512_set1_ps(id));
            __m512 s1 = _mm512_mul_ps(v1, _mm512_set1_ps(id));
            s0 = _mm512_add_ps(s0, _mm512_mask_blend_ps(_mm512_cmp_ps_mask(s0, _mm512_setzero_ps(), _CMP_LT_OQ), _mm512_set1_ps(0.5f), _mm512_set1_ps(-0.5f)));
            s1 = _mm512_add_ps(s1, _mm512_mask_blend_ps(_mm512_cmp_ps_mask(s1, _mm512_setzero_ps(), _CMP_LT_OQ), _mm512_set1_ps(0.5f), _mm512_set1_ps(-0.5f)));
            __m512i i0 = _mm512_cvttps_epi32(s0), i1 = _mm512_cvttps_epi32(s1);
            _mm_storeu_si128((__m128i *)o[b].qs, _mm512_cvtsepi32_epi8(i0));
            _mm_storeu_si128((__m128i *)(o[b].qs + 16), _mm512_cvtsepi32_epi8(i1));
            o[b].d = d;
            o[b].sum = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
        }
    }
}

static void q8_pack(const kn_tensor *w, int64_t n0, int nn, int64_t nb, uint8_t *wq, float *wd)
{
    const size_t rb = kn_row_bytes(KN_Q8_0, w->cols);
    for (int r = 0; r < 16; r++) {
        const kn_block_q8_0 *row = (const kn_block_q8_0 *)((const char *)w->data +
                                                           (size_t)(n0 + (r < nn ? r : 0)) * rb);
        for (int64_t b = 0; b < nb; b++) {
            wd[b * 16 + r] = r < nn ? _cvtsh_ss(row[b].d) : 0.0f;
            for (int g = 0; g < 8; g++) {
                uint32_t v;
                memcpy(&v, row[b].qs + 4 * g, 4);
                v ^= 0x80808080u;
                memcpy(wq + ((b * 8 + g) * 16 + r) * 4, &v, 4);
            }
        }
    }
}

static void q8_gemm_job(void *p, int ith, int nth)
{
    (void)nth;
    struct q8_args *a = p;
    const int64_t K = a->w->cols, N = a->w->rows, M = a->M, nb = K / KN_QK;
    uint8_t *wq = (uint8_t *)(a->packs + (size_t)ith * a->pack_bytes);
    float *wd = (float *)(wq + nb * 512);
    const int64_t n_panels = (N + 15) / 16;
    for (;;) {
        const int64_t pi = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed);
        if (pi >= n_panels)
            return;
        const int64_t n0 = pi * 16;
        const int nn = (int)(N - n0 < 16 ? N - n0 : 16);
        const __mmask16 keep = (__mmask16)((1u << nn) - 1);
        q8_pack(a->w, n0, nn, nb, wq, wd);
        for (int64_t m0 = 0; m0 < M; m0 += Q8_MR) {
            const int mr = (int)(M - m0 < Q8_MR ? M - m0 : Q8_MR);
            const kn_block_q8_x *xr[Q8_MR];
            _Pragma("GCC unroll 16") for (int m = 0; m < Q8_MR; m++)
                xr[m] = a->xq + (m0 + (m < mr ? m : mr - 1)) * nb;
            __m512 facc[Q8_MR];
            _Pragma("GCC unroll 16") for (int m = 0; m < Q8_MR; m++)
                facc[m] = _mm512_setzero_ps();
            for (int64_t b = 0; b < nb; b++) {
                __m512i iacc[Q8_MR];
                _Pragma("GCC unroll 16") for (int m = 0; m < Q8_MR; m++)
                    iacc[m] = _mm512_set1_epi32(-128 * xr[m][b].sum);
                const uint8_t *wb = wq + b * 512;
                _Pragma("GCC unroll 8") for (int g = 0; g < 8; g++) {
                    const __m512i wv = _mm512_load_si512((const void *)(wb + g * 64));
                    _Pragma("GCC unroll 16") for (int m = 0; m < Q8_MR; m++) {
                        int32_t x4;
                        memcpy(&x4, xr[m][b].qs + 4 * g, 4);
                        iacc[m] = _mm512_dpbusd_epi32(iacc[m], wv, _mm512_set1_epi32(x4));
                    }
                }
                const __m512 dw = _mm512_load_ps(wd + b * 16);
                _Pragma("GCC unroll 16") for (int m = 0; m < Q8_MR; m++)
                    facc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[m]),
                                              _mm512_mul_ps(dw, _mm512_set1_ps(xr[m][b].d)), facc[m]);
            }
            for (int m = 0; m < mr; m++)
                _mm512_mask_storeu_ps(a->y + (m0 + m) * N + n0, keep, facc[m]);
        }
    }
}

static int q8_gemm(kn_ctx *ctx, const kn_tensor *w, const float *x, int64_t M, float *y)
{
    const int64_t nb = w->cols / KN_QK;
    struct q8_args a = {.w = w, .x = x, .M = M, .y = y};
    a.pack_bytes = (size_t)nb * (512 + 64);
    a.xq = kn_scratch(ctx, KN_SCRATCH_ACT, (size_t)M * nb * sizeof(kn_block_q8_x));
    a.packs = kn_scratch(ctx, KN_SCRATCH_PANEL, (size_t)kn_nthreads(ctx) * a.pack_bytes);
    if (!a.xq || !a.packs)
        return -ENOMEM;
    atomic_init(&a.next, 0);
    kn_run(ctx, q8_quant_job, &a);
    kn_run(ctx, q8_gemm_job, &a);
    return 0;
}
