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
/* weight columns per natural-order block the GEMM packs through on the
 * way to its residue-ordered panel */
#define KN_KC 384
#define KN_MV_MR 8 /* x rows per matvec pass: 8 x 2 accumulators */
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

/* x where a < b, else y */
#define vsel_lt(a, b, x, y) _mm512_mask_blend_ps(_mm512_cmp_ps_mask((a), (b), _CMP_LT_OQ), (y), (x))

#define vi_set1(i) _mm512_set1_epi32(i)
#define vi_add(a, b) _mm512_add_epi32((a), (b))
#define vi_iota() _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0)
#define vi_st(p, v) _mm512_storeu_si512((void *)(p), (v))

/* lanes where x > *mx (false for a NaN x): *mx = x, *ix = i */
static inline void vtake_gt(vf x, vi i, vf *mx, vi *ix)
{
    const __mmask16 gt = _mm512_cmp_ps_mask(x, *mx, _CMP_GT_OQ);
    *mx = _mm512_mask_mov_ps(*mx, gt, x);
    *ix = _mm512_mask_mov_epi32(*ix, gt, i);
}

#define KN_HAVE_FPACK 1
#define KN_HAVE_Q8_GEMM 1
#define KN_HAVE_Q8_MATVEC 1
#include "kernels/cpu/kn_simd_tmpl.h"

/* ---- Q8_0 GEMM on VNNI ----------------------------------------------------
 * x is quantised once per call into int8 blocks (kn_block_q8_x, f32 scale).
 * Weights are read in panels of 16 rows, repacked as
 *   wq[b][g][r][4] = W[r].qs[b*32 + 4g .. +3] + 128   (u8, b block, g 0..7)
 *   wd[b][r]       = W[r].d (f16)
 * either by each thread as it goes (q8_pack), or once at model load
 * (kn_tensor_pack: then the whole tensor is stored as consecutive panels,
 * Q8P_PANEL_BYTES each, and the matmul reads them as one linear stream),
 * so that one vpdpbusd multiplies a broadcast 4-byte group of an x row with
 * the same group of 16 weight rows. vpdpbusd wants u8 x s8; the +128 bias on
 * the weights is removed by starting each block's accumulator at
 * -128 * sum(x block). Integer sums are exact; only the f32 accumulation of
 * per-block products differs from the float path.
 *
 * The f32 accumulation is the canonical one that q8mv_job shares, so that
 * a row's result does not depend on M (batching, Medusa verification): per
 * output, two chains, even and odd blocks in order, each
 * c = fma((float)isum_b, d_w * d_x, c), and y = c_even + c_odd. */
#define Q8_CHUNK 8 /* 16-row panels per q8_gemm work item */

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

/* One block of 32 activations to int8 with the reference's rounding
 * (roundf: half away from zero) and an f32 scale; returns the int8 sum. */
static inline int32_t quant_block(const float *x, int8_t *qs, float *d_out)
{
    __m512 v0 = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
    __m512 am = _mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1));
    const float d = _mm512_reduce_max_ps(am) / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const __m512 half = _mm512_set1_ps(0.5f), zero = _mm512_setzero_ps();
    __m512 s0 = _mm512_mul_ps(v0, _mm512_set1_ps(id));
    __m512 s1 = _mm512_mul_ps(v1, _mm512_set1_ps(id));
    /* trunc(v + copysign(0.5, v)) == roundf(v) except where v + 0.5 itself
     * rounds up (v just below a .5 tie); the tests allow either there. */
    s0 = _mm512_add_ps(s0, _mm512_mask_blend_ps(_mm512_cmp_ps_mask(s0, zero, _CMP_LT_OQ), half,
                                                _mm512_sub_ps(zero, half)));
    s1 = _mm512_add_ps(s1, _mm512_mask_blend_ps(_mm512_cmp_ps_mask(s1, zero, _CMP_LT_OQ), half,
                                                _mm512_sub_ps(zero, half)));
    __m512i i0 = _mm512_cvttps_epi32(s0), i1 = _mm512_cvttps_epi32(s1);
    _mm_storeu_si128((__m128i *)qs, _mm512_cvtsepi32_epi8(i0));
    _mm_storeu_si128((__m128i *)(qs + 16), _mm512_cvtsepi32_epi8(i1));
    *d_out = d;
    return _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
}

static void q8_quant_job(void *p, int ith, int nth)
{
    struct q8_args *a = p;
    const int64_t K = a->w->cols, nb = K / KN_QK;
    int64_t lo, hi;
    kn_split(a->M, ith, nth, 1, &lo, &hi);
    for (int64_t m = lo; m < hi; m++) {
        const float *xm = a->x + m * K;
        kn_block_q8_x *o = a->xq + m * nb;
        for (int64_t b = 0; b < nb; b++)
            o[b].sum = quant_block(xm + b * KN_QK, o[b].qs, &o[b].d);
    }
}

/* 8 x 8 transpose of 32-bit groups within each 256-bit half of z[0..7]
 * (half 0: rows 0-7, half 1: rows 8-15) into g[0..7] = group g of the 16
 * rows, in row order. */
static inline void q8_transpose(const __m512i z[8], __m512i g[8])
{
    __m512i t[8], u[8];
    for (int i = 0; i < 8; i += 4) {
        t[i + 0] = _mm512_unpacklo_epi32(z[i + 0], z[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(z[i + 0], z[i + 1]);
        t[i + 2] = _mm512_unpacklo_epi32(z[i + 2], z[i + 3]);
        t[i + 3] = _mm512_unpackhi_epi32(z[i + 2], z[i + 3]);
        u[i + 0] = _mm512_unpacklo_epi64(t[i + 0], t[i + 2]); /* groups 0 | 4 */
        u[i + 1] = _mm512_unpackhi_epi64(t[i + 0], t[i + 2]); /* groups 1 | 5 */
        u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]); /* groups 2 | 6 */
        u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]); /* groups 3 | 7 */
    }
    /* u[i] (rows 0-3 / 8-11) and u[i + 4] (rows 4-7 / 12-15): 128-bit lanes
     * 0 and 2 hold group i, lanes 1 and 3 group i + 4 */
    const __m512i lo = _mm512_set_epi64(13, 12, 5, 4, 9, 8, 1, 0);
    const __m512i hi = _mm512_set_epi64(15, 14, 7, 6, 11, 10, 3, 2);
    for (int i = 0; i < 4; i++) {
        g[i] = _mm512_permutex2var_epi64(u[i], lo, u[i + 4]);
        g[i + 4] = _mm512_permutex2var_epi64(u[i], hi, u[i + 4]);
    }
}

/* Repack weight rows [n0, n0 + nn) (see the layout above); rows past nn
 * repeat row n0 with a zero scale, so they contribute nothing.
 *
 * 16 row streams 34 bytes apart per step defeat the hardware prefetcher:
 * without help the pack waited on DRAM for most of a small-M GEMM. So the
 * rows of the next panel (contiguous in memory, [next, next + next_bytes))
 * are prefetched as one linear stream spread over this panel's steps, and
 * a panel nobody prefetched (cold) first requests the head of every row,
 * so that those misses overlap. */
static void q8_pack(const kn_tensor *w, int64_t n0, int nn, int64_t nb, uint8_t *wq, uint16_t *wd,
                    bool cold, const char *next, size_t next_bytes)
{
    const size_t rb = kn_row_bytes(KN_Q8_0, w->cols);
    const kn_block_q8_0 *rows[16];
    for (int r = 0; r < 16; r++)
        rows[r] = (const kn_block_q8_0 *)((const char *)w->data + (size_t)(n0 + (r < nn ? r : 0)) * rb);
    if (cold)
        for (int r = 0; r < nn; r++)
            for (int64_t b = 0; b < 8 && b < nb; b += 2)
                __builtin_prefetch(rows[r] + b);
    /* lines of the next panel per step, rounded up */
    const size_t pf_step = next ? (next_bytes / 64 + (size_t)nb - 1) / (size_t)nb * 64 : 0;
    const char *pf = next, *pf_end = next + next_bytes;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const __mmask16 live = (__mmask16)((1u << nn) - 1);
    const __m512i drow = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32((int)rb));
    for (int64_t b = 0; b < nb; b++) {
        for (size_t o = 0; o < pf_step && pf < pf_end; o += 64, pf += 64)
            __builtin_prefetch(pf);
        __m512i z[8], g[8];
        for (int i = 0; i < 8; i++)
            z[i] = _mm512_inserti64x4(
                _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)rows[i][b].qs)),
                _mm256_loadu_si256((const __m256i *)rows[i + 8][b].qs), 1);
        q8_transpose(z, g);
        for (int i = 0; i < 8; i++)
            _mm512_store_si512((void *)(wq + (b * 8 + i) * 64), _mm512_xor_si512(g[i], flip));
        /* the 16 scales by one gather (16 scalar stores reloaded as a
         * vector stalled on store forwarding); rows past nn get 0 */
        const __m512i dh = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, drow,
                                                       (const void *)&rows[0][b].d, 1);
        _mm256_store_si256((__m256i *)(wd + b * 16), _mm512_cvtepi32_epi16(dh));
    }
}

#define Q8_CAP 4
#include "kernels/cpu/kn_q8_tile_tmpl.h"
#undef Q8_CAP
#define Q8_CAP 8
#include "kernels/cpu/kn_q8_tile_tmpl.h"
#undef Q8_CAP

/* All M rows of y for the panel of rows [n0, n0 + 16) (those below N).
 * pfd > 0: the next panel lies pfd bytes on (packed weights), and the first
 * tile requests each block of it as it reads its own, so that a whole panel
 * is in flight while this one computes. (4 KiB ahead left memory idle
 * during the later tiles: 110m shapes, 8 rows, 3.2-3.4 -> 2.5-2.9 ms.) */
static void q8_tiles(const kn_block_q8_x *xq, int64_t nb, int64_t M, float *y, int64_t N,
                     const uint8_t *wq, const uint16_t *wd, int64_t n0, int64_t pfd)
{
    const int nn = (int)(N - n0 < 16 ? N - n0 : 16);
    const __mmask16 keep = (__mmask16)((1u << nn) - 1);
    int64_t m0 = 0;
    /* Few rows (decode batches, Medusa trees): tiles of 4 with two chains
     * per row beat tiles of 8 (~10 % at 8 and 16 rows); the panel stays in
     * L1 between them. Prefill keeps the 8-row tiles' weight reuse. */
    if (M <= 16)
        for (; m0 + 4 <= M; m0 += 4)
            q8_tile_4(xq, nb, y, N, wq, wd, m0, n0, keep, 4, m0 == 0 ? pfd : 0);
    for (; m0 + 8 <= M; m0 += 8)
        q8_tile_8(xq, nb, y, N, wq, wd, m0, n0, keep, 8, m0 == 0 ? pfd : 0);
    /* the ragged last tile at its exact height: Medusa verification runs
     * ~17 rows, where a padded tile would be a third of the work */
    switch (M - m0) {
    case 7: q8_tile_8(xq, nb, y, N, wq, wd, m0, n0, keep, 7, m0 == 0 ? pfd : 0); break;
    case 6: q8_tile_8(xq, nb, y, N, wq, wd, m0, n0, keep, 6, m0 == 0 ? pfd : 0); break;
    case 5: q8_tile_8(xq, nb, y, N, wq, wd, m0, n0, keep, 5, m0 == 0 ? pfd : 0); break;
    case 4: q8_tile_4(xq, nb, y, N, wq, wd, m0, n0, keep, 4, m0 == 0 ? pfd : 0); break;
    case 3: q8_tile_4(xq, nb, y, N, wq, wd, m0, n0, keep, 3, m0 == 0 ? pfd : 0); break;
    case 2: q8_tile_4(xq, nb, y, N, wq, wd, m0, n0, keep, 2, m0 == 0 ? pfd : 0); break;
    case 1: q8_tile_4(xq, nb, y, N, wq, wd, m0, n0, keep, 1, m0 == 0 ? pfd : 0); break;
    default: break;
    }
}

static void q8_gemm_job(void *p, int ith, int nth)
{
    (void)nth;
    struct q8_args *a = p;
    const int64_t K = a->w->cols, N = a->w->rows, nb = K / KN_QK;
    uint8_t *wq = (uint8_t *)(a->packs + (size_t)ith * a->pack_bytes);
    uint16_t *wd = (uint16_t *)(wq + nb * 512);
    const int64_t n_panels = (N + 15) / 16;
    const size_t rb = kn_row_bytes(KN_Q8_0, K);
    /* Panels are taken Q8_CHUNK at a time so that a thread knows its next
     * panel and can prefetch it (q8_pack). */
    int64_t pi = 0, chunk_end = 0;
    for (;; pi++) {
        const bool cold = pi >= chunk_end;
        if (cold) {
            pi = Q8_CHUNK * atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed);
            chunk_end = pi + Q8_CHUNK < n_panels ? pi + Q8_CHUNK : n_panels;
        }
        if (pi >= n_panels)
            return;
        const int64_t n0 = pi * 16;
        const int nn = (int)(N - n0 < 16 ? N - n0 : 16);
        const int64_t nx = pi + 1 < chunk_end ? (N - n0 - 16 < 16 ? N - n0 - 16 : 16) : 0;
        q8_pack(a->w, n0, nn, nb, wq, wd, cold,
                nx ? (const char *)a->w->data + (size_t)(n0 + 16) * rb : NULL, (size_t)nx * rb);
        q8_tiles(a->xq, nb, a->M, a->y, N, wq, wd, n0, 0);
    }
}

/* ---- Q8_0 weights packed at load (kn_tensor_pack) -------------------------
 * The same panels as q8_pack writes, made once: the matmul then streams them
 * linearly, with no per-call repacking, at every M (decode included: no
 * horizontal reduction per block either, unlike q8mv). Same arithmetic as
 * the other two Q8_0 paths, so packing changes no result bit. */
static size_t q8p_panel_bytes(int64_t nb)
{
    return (size_t)nb * 512 + ((size_t)nb * 32 + 63) / 64 * 64;
}

int kn_avx512_pack(const kn_tensor *w, void **out)
{
    *out = NULL;
    if (w->type != KN_Q8_0)
        return fpack_tensor(w, out);
    if (w->rows <= 0 || w->cols <= 0 || w->cols % KN_QK != 0 || !w->data)
        return 0;
    const int64_t nb = w->cols / KN_QK, n_panels = (w->rows + 15) / 16;
    const size_t pb = q8p_panel_bytes(nb);
    char *buf = aligned_alloc(64, (size_t)n_panels * pb);
    if (!buf)
        return -ENOMEM;
    for (int64_t pi = 0; pi < n_panels; pi++) {
        const int64_t n0 = pi * 16;
        uint8_t *wq = (uint8_t *)buf + (size_t)pi * pb;
        q8_pack(w, n0, (int)(w->rows - n0 < 16 ? w->rows - n0 : 16), nb, wq,
                (uint16_t *)(wq + nb * 512), false, NULL, 0);
    }
    *out = buf;
    return 0;
}

struct q8p_args {
    struct mm_args *a; /* packed weights, outputs, chunk list (16-row multiples) */
    const kn_block_q8_x *xq;
};

static void q8p_job(void *p, int ith, int nth)
{
    (void)ith;
    (void)nth;
    const struct q8p_args *q = p;
    struct mm_args *a = q->a;
    const int64_t nb = a->ws[0]->cols / KN_QK;
    const size_t pb = q8p_panel_bytes(nb);
    int t;
    int64_t lo, hi;
    while (matvec_next(a, &t, &lo, &hi)) {
        const kn_tensor *w = a->ws[t];
        for (int64_t n0 = lo; n0 < hi; n0 += 16) {
            const uint8_t *wq = (const uint8_t *)w->packed + (size_t)(n0 / 16) * pb;
            q8_tiles(q->xq, nb, a->M, a->ys[t], w->rows, wq, (const uint16_t *)(wq + nb * 512),
                     n0, n0 + 16 < w->rows ? (int64_t)pb : 0);
        }
    }
}

/* The chunk list of a over packed weights: x quantised once, one pool job. */
static int q8p_run(kn_ctx *ctx, struct mm_args *a)
{
    const int64_t nb = a->ws[0]->cols / KN_QK;
    struct q8_args qa = {.w = a->ws[0], .x = a->x, .M = a->M};
    qa.xq = kn_scratch(ctx, KN_SCRATCH_ACT, (size_t)a->M * nb * sizeof(kn_block_q8_x));
    if (!qa.xq)
        return -ENOMEM;
    if (a->M * nb < 2048)
        q8_quant_job(&qa, 0, 1);
    else
        kn_run(ctx, q8_quant_job, &qa, KN_WORK_ALWAYS);
    struct q8p_args q = {.a = a, .xq = qa.xq};
    kn_run(ctx, q8p_job, &q, kn_mm_work(a->n_w, a->ws, a->M));
    return 0;
}

static bool q8p_all_packed(const struct mm_args *a)
{
    for (int t = 0; t < a->n_w; t++)
        if (!a->ws[t]->packed)
            return false;
    return true;
}

static int q8_gemm(kn_ctx *ctx, const kn_tensor *w, const float *x, int64_t M, float *y)
{
    if (w->packed) {
        struct mm_args pa = {.w = w, .x = x, .M = M, .y = y};
        atomic_init(&pa.next, 0);
        matvec_plan(&pa, 1, &w, &y, kn_nthreads(ctx));
        return q8p_run(ctx, &pa);
    }
    const int64_t nb = w->cols / KN_QK;
    struct q8_args a = {.w = w, .x = x, .M = M, .y = y};
    a.pack_bytes = q8p_panel_bytes(nb);
    a.xq = kn_scratch(ctx, KN_SCRATCH_ACT, (size_t)M * nb * sizeof(kn_block_q8_x));
    a.packs = kn_scratch(ctx, KN_SCRATCH_PANEL, (size_t)kn_nthreads(ctx) * a.pack_bytes);
    if (!a.xq || !a.packs)
        return -ENOMEM;
    atomic_init(&a.next, 0);
    /* small batches are quantised here: a pool round trip costs more */
    if (M * nb < 2048)
        q8_quant_job(&a, 0, 1);
    else
        kn_run(ctx, q8_quant_job, &a, KN_WORK_ALWAYS);
    kn_run(ctx, q8_gemm_job, &a, kn_mm_work(1, &w, M));
    return 0;
}

/* ---- Q8_0 matvec on VNNI (M <= 4) -------------------------------------------
 * Decode is bandwidth bound, but the float path (widen int8, convert, scale,
 * FMA) tops out below DRAM speed for 34-byte blocks. Here x is quantised
 * once per call into a layout made for 64-byte loads:
 *   per row m: qs[K] int8 | bias[nb/2 pairs] __m512i | d[nb] float
 * bias of a block pair holds -128 * sum(x block) in lanes 0 and 8 (the
 * accumulator start that cancels the +128 that makes weights u8), and each
 * zmm covers two weight blocks. Each half's integer dot is summed across its
 * 8 lanes before the f32 step, which then follows q8_tile's canonical order
 * (lanes 0-7: even blocks, 8-15: odd blocks). */
struct q8mv_args {
    struct mm_args *a; /* weights, outputs and the chunk list */
    const char *xs;    /* M rows of stride xstride */
    size_t xstride;
};

static size_t q8mv_stride(int64_t K)
{
    const int64_t nb = K / KN_QK, np = (nb + 1) / 2;
    return (size_t)((K + 63) / 64 * 64 + np * 64 + (nb * 4 + 63) / 64 * 64);
}

static void q8mv_quantize(const float *x, int64_t K, char *dst)
{
    const int64_t nb = K / KN_QK, np = (nb + 1) / 2;
    int8_t *qs = (int8_t *)dst;
    int32_t *bias = (int32_t *)(dst + (K + 63) / 64 * 64);
    float *d = (float *)((char *)bias + np * 64);
    memset(bias, 0, (size_t)np * 64);
    for (int64_t b = 0; b < nb; b++)
        bias[(b / 2) * 16 + (b % 2) * 8] = -128 * quant_block(x + b * KN_QK, qs + b * KN_QK, &d[b]);
}

static void q8mv_job(void *p, int ith, int nth)
{
    (void)ith;
    (void)nth;
    struct q8mv_args *q = p;
    struct mm_args *a = q->a;
    const int64_t K = a->w->cols, nb = K / KN_QK, np = (nb + 1) / 2;
    const size_t rb = kn_row_bytes(KN_Q8_0, K);
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    int t;
    int64_t lo, hi;
    while (matvec_next(a, &t, &lo, &hi)) {
        const kn_tensor *w = a->ws[t];
        float *y = a->ys[t];
        const int64_t N = w->rows;
        for (int64_t r = lo; r < hi; r++) {
            const kn_block_q8_0 *row = (const kn_block_q8_0 *)((const char *)w->data +
                                                               (size_t)r * rb);
            for (int64_t m = 0; m < a->M; m++) {
                const char *xm = q->xs + (size_t)m * q->xstride;
                const int8_t *qs = (const int8_t *)xm;
                const __m512i *bias = (const __m512i *)(xm + (K + 63) / 64 * 64);
                const float *d = (const float *)((const char *)bias + np * 64);
                __m512 acc = _mm512_setzero_ps();
                int64_t pi = 0;
                /* Four whole blocks at a time: two pairs reduced together
                 * (fewer shuffles), lanes 0 and 8 then fed to the chains in
                 * block order: b, b + 2 to the even one, b + 1, b + 3 to
                 * the odd one. */
                for (; 2 * pi + 4 <= nb; pi += 2) {
                    const int64_t b = 2 * pi;
                    __builtin_prefetch((const char *)(row + b) + 1024);
                    __builtin_prefetch((const char *)(row + b) + 1024 + 64);
                    __builtin_prefetch((const char *)(row + b) + 1024 + 128);
                    __m512i w0 = _mm512_inserti64x4(
                        _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)row[b].qs)),
                        _mm256_loadu_si256((const __m256i *)row[b + 1].qs), 1);
                    __m512i w1 = _mm512_inserti64x4(
                        _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)row[b + 2].qs)),
                        _mm256_loadu_si256((const __m256i *)row[b + 3].qs), 1);
                    const __m512i P = _mm512_dpbusd_epi32(
                        _mm512_load_si512(bias + pi), _mm512_xor_si512(w0, flip),
                        _mm512_loadu_si512((const void *)(qs + b * KN_QK)));
                    const __m512i Q = _mm512_dpbusd_epi32(
                        _mm512_load_si512(bias + pi + 1), _mm512_xor_si512(w1, flip),
                        _mm512_loadu_si512((const void *)(qs + (b + 2) * KN_QK)));
                    __m512i s4 = _mm512_add_epi32(_mm512_unpacklo_epi32(P, Q),
                                                  _mm512_unpackhi_epi32(P, Q));
                    s4 = _mm512_add_epi32(s4, _mm512_shuffle_epi32(s4, _MM_PERM_BADC));
                    s4 = _mm512_add_epi32(s4, _mm512_shuffle_i64x2(s4, s4, _MM_SHUFFLE(2, 3, 0, 1)));
                    /* lane 0: block b, 1: b + 2, 8: b + 1, 9: b + 3 */
                    const __m512i s4b = _mm512_shuffle_epi32(s4, _MM_PERM_CDAB);
                    const __m512 sc0 = _mm512_mask_blend_ps(
                        0xff00, _mm512_set1_ps(_cvtsh_ss(row[b].d) * d[b]),
                        _mm512_set1_ps(_cvtsh_ss(row[b + 1].d) * d[b + 1]));
                    const __m512 sc1 = _mm512_mask_blend_ps(
                        0xff00, _mm512_set1_ps(_cvtsh_ss(row[b + 2].d) * d[b + 2]),
                        _mm512_set1_ps(_cvtsh_ss(row[b + 3].d) * d[b + 3]));
                    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s4), sc0, acc);
                    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s4b), sc1, acc);
                }
                for (; pi < np; pi++) {
                    const int64_t b = 2 * pi;
                    __builtin_prefetch((const char *)(row + b) + 1024);
                    __builtin_prefetch((const char *)(row + b) + 1024 + 64);
                    __m512i wv, xv;
                    float s1 = 0.0f;
                    if (b + 1 < nb) {
                        wv = _mm512_inserti64x4(
                            _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)row[b].qs)),
                            _mm256_loadu_si256((const __m256i *)row[b + 1].qs), 1);
                        xv = _mm512_loadu_si512((const void *)(qs + b * KN_QK));
                        s1 = _cvtsh_ss(row[b + 1].d) * d[b + 1];
                    } else { /* odd last block: upper half zero on both sides */
                        wv = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)row[b].qs));
                        xv = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)(qs + b * KN_QK)));
                    }
                    const float s0 = _cvtsh_ss(row[b].d) * d[b];
                    __m512i iv = _mm512_dpbusd_epi32(_mm512_load_si512(bias + pi),
                                                     _mm512_xor_si512(wv, flip), xv);
                    iv = _mm512_add_epi32(iv, _mm512_shuffle_epi32(iv, _MM_PERM_CDAB));
                    iv = _mm512_add_epi32(iv, _mm512_shuffle_epi32(iv, _MM_PERM_BADC));
                    iv = _mm512_add_epi32(iv, _mm512_shuffle_i64x2(iv, iv, _MM_SHUFFLE(2, 3, 0, 1)));
                    const __m512 sc = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(s0),
                                                           _mm512_set1_ps(s1));
                    /* an odd last block leaves the odd chain untouched */
                    acc = _mm512_mask3_fmadd_ps(_mm512_cvtepi32_ps(iv), sc, acc,
                                                b + 1 < nb ? 0xffff : 0x00ff);
                }
                y[m * N + r] = _mm512_cvtss_f32(acc) +
                               _mm256_cvtss_f32(_mm512_extractf32x8_ps(acc, 1));
            }
        }
    }
}

static int q8_matvec(kn_ctx *ctx, struct mm_args *a)
{
    if (q8p_all_packed(a))
        return q8p_run(ctx, a);
    const int64_t K = a->w->cols, M = a->M;
    struct q8mv_args q = {.a = a, .xstride = q8mv_stride(K)};
    char *xs = kn_scratch(ctx, KN_SCRATCH_ACT, q.xstride * (size_t)M);
    if (!xs)
        return -ENOMEM;
    for (int64_t m = 0; m < M; m++)
        q8mv_quantize(a->x + m * K, K, xs + (size_t)m * q.xstride);
    q.xs = xs;
    kn_run(ctx, q8mv_job, &q, kn_mm_work(a->n_w, a->ws, a->M));
    return 0;
}
