/* kernels/cpu SIMD op bodies, written once against a small vector vocabulary
 * and compiled twice: by kn_ops_avx2.c (VL = 8, ymm) and kn_ops_avx512.c
 * (VL = 16, zmm), each of which defines the primitives below and is built
 * with its own ISA flags. Nothing here may be included from a file built
 * without those flags (the binary must run on CPUs that lack them).
 *
 * Primitives the includer defines:
 *   vf, VL, KN_MR                   vector type, lanes, GEMM register rows
 *   vld vst vset1 vzero vadd vsub vmul vmax vfma(a,b,c)=a*b+c vhsum vhmax
 *   vld_f16 vld_bf16 vld_i8         VL elements of that type -> floats
 *   vld_q4(qs, c)                   chunk c (VL elements) of a Q4_0 block
 *   vpow2i(n)                       2^n for integral-valued float n in range
 *   vswap_pairs(v)                  exchange lanes 2i and 2i+1
 *   vround(v)                       round to nearest integer
 *   vmask_ninf(s, e)                e where s != -inf, else 0
 *   vsel_lt(a, b, x, y)             x where a < b, else y
 *   vi, vi_ld, vi_xor, vi_zero, vi_fold(v) (streaming read)
 *   vi_set1 vi_add vi_iota vi_st    int32 lanes: broadcast, add, 0..VL-1, store
 *   vtake_gt(x, i, &mx, &ix)        lanes where x > mx (ordered): mx = x, ix = i
 *   KN_IMPL, KN_OPS_NAME            names of the exported impl and its ops
 *
 * Matmul strategy. M <= matvec_max() (decode, Medusa trees): each thread
 * streams a contiguous range of weight rows once and computes up to
 * KN_MV_MR dot products per pass over a row (further passes find it in L1),
 * converting weights on the fly; memory bound at M = 1. Larger M (prefill;
 * Medusa trees on Q8_0): weights are converted once per
 * KN_NR-row panel into an f32 buffer that stays in cache and is reused by
 * every KN_MR-row tile of x (broadcast-FMA outer products), so the
 * conversion cost is amortised over M rows. Float weights packed at load
 * (AVX-512, kn_tensor_pack) are such panels already, and every M runs
 * panel tiles over them (fpack_matmul).
 *
 * Both give every output element the same arithmetic, so that a row's
 * result never depends on the rows batched with it (continuous batching and
 * Medusa verification promise a request the output it gets alone): the
 * canonical order is dot_rows' (see there), which the GEMM reproduces with
 * k split into its 32 residue classes. */

#include <math.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "kernels/cpu/kn_int.h"

#define KN_AI __attribute__((always_inline)) static inline
#ifndef KN_NV
#define KN_NV 2 /* weight vectors per GEMM register tile row */
#endif
#define KN_NR (KN_NV * VL)
#ifndef KN_KC
#define KN_KC 256
#endif
#ifndef KN_MV_MR
#define KN_MV_MR 4 /* x rows per matvec pass over a weight row (accumulators: MR * 32 / VL) */
#endif
/* Float weights: the matvec (weights streamed once, L1-hot for any later
 * pass of MV_MR rows) beats packing GEMM panels up to ~12 rows, Medusa
 * trees included (110m shapes, AVX-512: 8 rows 1.8-2.0x one row against
 * 3.6-6x through the GEMM). Q8_0 with its VNNI GEMM switches at 4 rows:
 * q8mv pays a horizontal reduction per row and block. */
#define KN_MATVEC_MAX 12
#ifndef KN_PF
#define KN_PF 2048 /* matvec software prefetch distance, bytes */
#endif
/* A pass of 2+ rows computes long enough per line that the L1 prefetch
 * alone left DRAM idle (8 rows of a DRAM-resident F32 matrix streamed 20
 * GB/s where one row streams 31): such passes also prefetch KN_PF_FAR
 * bytes ahead into L2 (2 threads, 614 MB F32: 4 rows 26 -> 20 ms, 8 rows
 * 31 -> 24 ms). One row is faster without it (the hardware prefetcher
 * keeps up there; with it, -7 %). */
/* Packed panels are prefetched this far ahead into L2 on the first pass
 * (12 layers of 110m shapes, M = 1, 2 threads: F16 6.1-6.6 ms per token
 * unpacked; packed with an L1 prefetch 2 KiB ahead 7.0-7.4, with this
 * 5.75-5.8; F32 12.0-13.1 -> 11.5-12.0). */
#define KN_PF_PANEL 8192
#define KN_PF_FAR_MR 2
#define KN_PF_FAR 8192

#define KN_ELEM_PAR_MIN 32768 /* elementwise ops fan out above this many floats */

/* ---- weight access ------------------------------------------------------- */

/* VL weights of `row` starting at element k (k % VL == 0) as floats. */
KN_AI vf wload(const void *row, int64_t k, const int type)
{
    switch (type) {
    case KN_F16:
        return vld_f16((const uint16_t *)row + k);
    case KN_BF16:
        return vld_bf16((const uint16_t *)row + k);
    case KN_Q8_0: {
        const kn_block_q8_0 *b = (const kn_block_q8_0 *)row + k / KN_QK;
        return vmul(vld_i8(b->qs + k % KN_QK), vset1(_cvtsh_ss(b->d)));
    }
    case KN_Q4_0: {
        const kn_block_q4_0 *b = (const kn_block_q4_0 *)row + k / KN_QK;
        return vmul(vld_q4(b->qs, (int)(k % KN_QK) / VL), vset1(_cvtsh_ss(b->d)));
    }
    default:
        return vld((const float *)row + k);
    }
}

/* Scalar weight element (tails of F32/F16/BF16 rows; quantised rows have none). */
KN_AI float wscalar(const void *row, int64_t k, const int type)
{
    switch (type) {
    case KN_F16:
        return _cvtsh_ss(((const uint16_t *)row)[k]);
    case KN_BF16:
        return kn_bf16_to_f32(((const uint16_t *)row)[k]);
    default:
        return ((const float *)row)[k];
    }
}

/* ---- matvec (small M) ---------------------------------------------------- */

struct mm_args {
    const kn_tensor *w;
    const float *x;
    int64_t M;
    float *y;
    float *panels; /* GEMM: per-thread buffers (gemm_thread_floats) */
    float *xp;     /* GEMM: x in residue order */
    /* Work is handed out in chunks from this counter rather than split
     * statically: on a shared machine a preempted pool thread then costs
     * only its current chunk, not its whole share. Chunks are contiguous
     * and several cache lines of y wide, so threads never share a line. */
    int64_t chunk;
    atomic_llong next;
    /* Matvec over several weights sharing x (kn_ops.matmul_multi): chunk c
     * of the combined list belongs to weight t for c in [c0[t], c0[t+1])
     * and covers rows (c - c0[t]) * chunks[t] onwards. w/y above are ws[0]/ys[0]. */
    int n_w;
    const kn_tensor *ws[KN_MULTI_MAX];
    float *ys[KN_MULTI_MAX];
    int64_t chunks[KN_MULTI_MAX];
    int64_t c0[KN_MULTI_MAX + 1];
};

/* Rows per dynamic chunk of a matvec over `rows` rows: ~8 chunks per thread,
 * whole multiples of 16 rows (64 bytes of y) so threads never share a line. */
static int64_t matvec_chunk(int64_t rows, int nth)
{
    int64_t c = (rows / ((int64_t)nth * 8) + 15) / 16 * 16;
    return c < 16 ? 16 : c;
}

/* Fill the chunk list of a for weights w[0..n) (n <= KN_MULTI_MAX). */
static void matvec_plan(struct mm_args *a, int n, const kn_tensor *const *w, float *const *y,
                        int nth)
{
    a->n_w = n;
    a->c0[0] = 0;
    for (int t = 0; t < n; t++) {
        a->ws[t] = w[t];
        a->ys[t] = y[t];
        a->chunks[t] = matvec_chunk(w[t]->rows, nth);
        a->c0[t + 1] = a->c0[t] + (w[t]->rows + a->chunks[t] - 1) / a->chunks[t];
    }
}

/* Next chunk of the list: weight index, row range; false when done. */
KN_AI bool matvec_next(struct mm_args *a, int *t, int64_t *lo, int64_t *hi)
{
    const int64_t c = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed);
    if (c >= a->c0[a->n_w])
        return false;
    int i = 0;
    while (c >= a->c0[i + 1])
        i++;
    const int64_t N = a->ws[i]->rows;
    *t = i;
    *lo = (c - a->c0[i]) * a->chunks[i];
    *hi = *lo + a->chunks[i] < N ? *lo + a->chunks[i] : N;
    return true;
}

/* y[m][r] for MR (<= KN_MV_MR) rows of x and one weight row. Steps of 32 elements
 * so that a quantised block is one step; 32 / VL independent accumulators
 * per x row hide FMA latency (one chain per lane cost decode a quarter of
 * its speed). This is the canonical arithmetic of every float-path output,
 * which gemm_job_t reproduces (so it must not depend on MR): p_c = the FMA
 * chain over k = c, c + 32, ... below K rounded down to 32, for the 32
 * residues c (accumulator c / VL, lane c % VL), folded lane-wise
 * ((p_l + p_{VL+l}) + p_{2VL+l}) + ..., then vhsum (which pairs lane i with
 * lane i + h for h = VL/2, ..., 1), then the K % 32 tail in order. */
KN_AI void dot_rows(const void *wr, const float *x, int64_t K, float *y, int64_t ldy, const int MR,
                    const int type)
{
    enum { U = 32 / VL };
    _Static_assert(KN_MV_MR >= 1 && KN_MV_MR <= 8, "matvec_range's tails go up to 7");
    vf acc[KN_MV_MR][U];
    _Pragma("GCC unroll 16") for (int m = 0; m < MR; m++)
        _Pragma("GCC unroll 16") for (int u = 0; u < U; u++)
            acc[m][u] = vzero();
    /* Weight bytes per 32-element step; the software prefetch runs KN_PF
     * bytes ahead (into the next row at the end of this one: rows of a
     * thread's range are contiguous) so that DRAM latency is covered from
     * the first line of every call, before the hardware prefetcher ramps;
     * and KN_PF_FAR ahead into L2 for passes of KN_PF_FAR_MR+ rows. */
    const int64_t sb = type == KN_F32   ? 128
                       : type == KN_Q8_0 ? 34
                       : type == KN_Q4_0 ? 18
                                         : 64;
    const char *pf = (const char *)wr + KN_PF;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32, pf += sb) {
        __builtin_prefetch(pf);
        if (MR >= KN_PF_FAR_MR)
            __builtin_prefetch(pf + KN_PF_FAR, 0, 2);
        if (sb > 64) {
            __builtin_prefetch(pf + 64);
            if (MR >= KN_PF_FAR_MR)
                __builtin_prefetch(pf + KN_PF_FAR + 64, 0, 2);
        }
        _Pragma("GCC unroll 16") for (int u = 0; u < U; u++) {
            vf w = wload(wr, k + u * VL, type);
            _Pragma("GCC unroll 16") for (int m = 0; m < MR; m++)
                acc[m][u] = vfma(w, vld(x + m * K + k + u * VL), acc[m][u]);
        }
    }
    _Pragma("GCC unroll 16") for (int m = 0; m < MR; m++) {
        _Pragma("GCC unroll 16") for (int u = 1; u < U; u++)
            acc[m][0] = vadd(acc[m][0], acc[m][u]);
        float s = vhsum(acc[m][0]);
        for (int64_t t = k; t < K; t++)
            s += wscalar(wr, t, type) * x[m * K + t];
        y[m * ldy] = s;
    }
}

KN_AI void matvec_range(const kn_tensor *w, const float *x, int64_t M, float *y, int64_t lo,
                        int64_t hi, const int type)
{
    const int64_t K = w->cols, N = w->rows;
    const size_t rb = kn_row_bytes(w->type, K);
    if (M == 1) { /* decode: a loop of its own (the general one cost a tiny model 4 %) */
        for (int64_t r = lo; r < hi; r++)
            dot_rows((const char *)w->data + (size_t)r * rb, x, K, y + r, N, 1, type);
        return;
    }
    for (int64_t r = lo; r < hi; r++) {
        const char *wr = (const char *)w->data + (size_t)r * rb;
        int64_t m = 0;
        for (; m + KN_MV_MR <= M; m += KN_MV_MR)
            dot_rows(wr, x + m * K, K, y + m * N + r, N, KN_MV_MR, type);
        /* the rest at its exact height (the weight row is in L1 by now) */
        switch (M - m) {
#define KN_MV_TAIL(h)                                                                          \
    case h:                                                                                    \
        if (h < KN_MV_MR)                                                                      \
            dot_rows(wr, x + m * K, K, y + m * N + r, N, h < KN_MV_MR ? h : 1, type);          \
        break;
            KN_MV_TAIL(7)
            KN_MV_TAIL(6)
            KN_MV_TAIL(5)
            KN_MV_TAIL(4)
            KN_MV_TAIL(3)
            KN_MV_TAIL(2)
            KN_MV_TAIL(1)
#undef KN_MV_TAIL
        default:
            break;
        }
    }
}

#define KN_DEF_MATVEC(T, tname)                                                                \
    static void matvec_job_##tname(void *p, int ith, int nth)                                  \
    {                                                                                          \
        (void)ith;                                                                             \
        (void)nth;                                                                             \
        struct mm_args *a = p;                                                                 \
        int t;                                                                                 \
        int64_t lo, hi;                                                                        \
        while (matvec_next(a, &t, &lo, &hi))                                                   \
            matvec_range(a->ws[t], a->x, a->M, a->ys[t], lo, hi, T);                           \
    }
KN_DEF_MATVEC(KN_F32, f32)
KN_DEF_MATVEC(KN_F16, f16)
KN_DEF_MATVEC(KN_BF16, bf16)
KN_DEF_MATVEC(KN_Q8_0, q8_0)
KN_DEF_MATVEC(KN_Q4_0, q4_0)

/* ---- GEMM (large M) ------------------------------------------------------ */

/* Convert rows [n0, n0+nn) x cols [k0, k0+kc) of W to f32 panel[k][NR]
 * (rows beyond nn are zero). Rows are converted to f32 with vector loads (F32
 * rows are read in place), then transposed 4 x 4 with SSE shuffles: a scalar
 * element-by-element transpose cost as much as a tenth of the GEMM at M = 512
 * (it runs once per weight element, the micro-kernel M / VL times). */
KN_AI void pack_panel(const kn_tensor *w, int64_t n0, int nn, int64_t k0, int kc, float *panel,
                      const int type)
{
    enum { SUB = 128 }; /* converted rows go through a [NR][SUB] stack buffer */
    static const float zrow[SUB] __attribute__((aligned(64)));
    const size_t rb = kn_row_bytes(w->type, w->cols);
    float tmp[KN_NR][SUB] __attribute__((aligned(64)));
    const float *src[KN_NR];
    _Static_assert(KN_NR % 4 == 0, "panel rows go in fours");
    for (int ks = 0; ks < kc; ks += SUB) {
        const int sc = kc - ks < SUB ? kc - ks : SUB;
        for (int j = 0; j < KN_NR; j++) {
            if (j >= nn) {
                src[j] = zrow;
                continue;
            }
            const char *wr = (const char *)w->data + (size_t)(n0 + j) * rb;
            if (type == KN_F32) {
                src[j] = (const float *)wr + k0 + ks;
                continue;
            }
            int k = 0;
            for (; k + VL <= sc; k += VL)
                vst(tmp[j] + k, wload(wr, k0 + ks + k, type));
            for (; k < sc; k++)
                tmp[j][k] = wscalar(wr, k0 + ks + k, type);
            src[j] = tmp[j];
        }
        float *pk = panel + (size_t)ks * KN_NR;
        for (int j = 0; j < KN_NR; j += 4) {
            const float *s0 = src[j], *s1 = src[j + 1], *s2 = src[j + 2], *s3 = src[j + 3];
            int k = 0;
            for (; k + 4 <= sc; k += 4) {
                __m128 r0 = _mm_loadu_ps(s0 + k), r1 = _mm_loadu_ps(s1 + k);
                __m128 r2 = _mm_loadu_ps(s2 + k), r3 = _mm_loadu_ps(s3 + k);
                _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
                _mm_storeu_ps(pk + (k + 0) * KN_NR + j, r0);
                _mm_storeu_ps(pk + (k + 1) * KN_NR + j, r1);
                _mm_storeu_ps(pk + (k + 2) * KN_NR + j, r2);
                _mm_storeu_ps(pk + (k + 3) * KN_NR + j, r3);
            }
            for (; k < sc; k++) {
                pk[k * KN_NR + j] = s0[k];
                pk[k * KN_NR + j + 1] = s1[k];
                pk[k * KN_NR + j + 2] = s2[k];
                pk[k * KN_NR + j + 3] = s3[k];
            }
        }
    }
}

/* One k step of res_kernel. */
KN_AI void res_step(vf acc[KN_MR][KN_NV], const float *x0, int xs, const int MR,
                    const void *panel, const int type, int k, const char *pp, size_t rowb, bool pf)
{
    if (pf) {
        _Pragma("GCC unroll 16") for (size_t o = 0; o < rowb; o += 64)
            __builtin_prefetch(pp + o, 0, 2);
        if (MR >= 2) /* and, as dot_rows, into L1 (F16 Medusa tree step 1.91 -> 1.84) */
            _Pragma("GCC unroll 16") for (size_t o = 0; o < rowb; o += 64)
                __builtin_prefetch(pp + o - KN_PF_PANEL + KN_PF);
    }
    vf wv[KN_NV];
    _Pragma("GCC unroll 16") for (int v = 0; v < KN_NV; v++)
        wv[v] = wload(panel, (int64_t)k * KN_NR + v * VL, type); /* F32/F16/BF16 panel */
    _Pragma("GCC unroll 16") for (int m = 0; m < MR; m++) {
        vf b = vset1(x0[k * xs + m]);
        _Pragma("GCC unroll 16") for (int v = 0; v < KN_NV; v++)
            acc[m][v] = vfma(b, wv[v], acc[m][v]);
    }
}

/* C[MR][KN_NR] = X[MR][kc] * panel[kc][NR], X[m][k] at x0[k * xs + m]
 * (gemm_xperm_job's tiles): one FMA chain per element over k in order,
 * stored to C, or added to it (C + chain) when fold. C is a private tile
 * (row stride KN_NR). The panel is in the weights' type (F32, or F16/BF16
 * widened as it is read); pf prefetches it KN_PF_PANEL bytes ahead (the
 * first pass over a panel that is not in cache). */
KN_AI void res_kernel(const float *x0, int xs, const int MR, const void *panel, const int type,
                      int kc, float *c, int fold, bool pf)
{
    const size_t rowb = (size_t)KN_NR * (type == KN_F32 ? 4 : 2);
    vf acc[KN_MR][KN_NV];
    _Pragma("GCC unroll 16") for (int m = 0; m < MR; m++)
        _Pragma("GCC unroll 16") for (int v = 0; v < KN_NV; v++)
            acc[m][v] = vzero();
    const char *pp = (const char *)panel + KN_PF_PANEL;
    /* F32 panels (prefill's, 16-bit ones included, widened per item)
     * unrolled twice: 1 thread, 110m shapes, M = 512, +1-4 %; the 16-bit
     * small-M loop (Medusa trees) was slower so */
    if (type == KN_F32)
        _Pragma("GCC unroll 2") for (int k = 0; k < kc; k++, pp += rowb)
            res_step(acc, x0, xs, MR, panel, type, k, pp, rowb, pf);
    else
        for (int k = 0; k < kc; k++, pp += rowb)
            res_step(acc, x0, xs, MR, panel, type, k, pp, rowb, pf);
    _Pragma("GCC unroll 16") for (int m = 0; m < MR; m++) {
        float *cm = c + m * KN_NR;
        _Pragma("GCC unroll 16") for (int v = 0; v < KN_NV; v++) {
            if (fold)
                acc[m][v] = vadd(vld(cm + v * VL), acc[m][v]);
            vst(cm + v * VL, acc[m][v]);
        }
    }
}

/* Per-thread GEMM scratch, floats: the residue-ordered panel of K rows, a
 * natural-order KN_KC block to pack through, and VL lane tiles. */
static size_t gemm_thread_floats(int64_t K)
{
    return ((size_t)K + KN_KC) * KN_NR + (size_t)VL * KN_MR * KN_NR;
}

/* x in the panel's order, X = xperm_width(M) rows interleaved: for the
 * tile of rows [t * KN_MR, t * KN_MR + KN_MR), element (row t * KN_MR + i,
 * col k) at xp[t * KN_MR * K + p(k) * X + i], p(32j + c) = c * J + j below
 * K32 and p(k) = k in the tail. X is KN_MR, except for M < KN_MR, where the
 * one tile is M wide so that decode's x stays compact. The micro-kernel
 * then broadcasts a step's x values from one line through one pointer
 * (eight row pointers had the compiler spill one every step: 8 % of the
 * kernel). Rows past M are left as they are (no kernel reads them). Whole
 * 8-row tiles go through AVX 8 x 8 transposes (an element-by-element copy
 * of x was 4 % of prefill). */
KN_AI int xperm_width(int64_t M)
{
    return M < KN_MR ? (int)M : KN_MR;
}

static size_t xperm_bytes(int64_t M, int64_t K)
{
    return (size_t)((M + KN_MR - 1) / KN_MR * KN_MR) * (size_t)K * sizeof(float);
}

static void gemm_xperm_job(void *p, int ith, int nth)
{
    struct mm_args *a = p;
    const int64_t K = a->w->cols, J = K / 32, K32 = J * 32, M = a->M;
    const int X = xperm_width(M);
    int64_t lo, hi;
    kn_split((M + KN_MR - 1) / KN_MR, ith, nth, 1, &lo, &hi);
    for (int64_t t = lo; t < hi; t++) {
        const int64_t m0 = t * KN_MR;
        const int mr = (int)(M - m0 < KN_MR ? M - m0 : KN_MR);
        const float *x0 = a->x + m0 * K;
        float *o = a->xp + m0 * K;
        int64_t j0 = 0;
#if KN_MR == 8
        for (; mr == 8 && j0 < J; j0++)
            for (int c = 0; c < 32; c += 8) {
                __m256 r[8], u[8], s[8];
                for (int i = 0; i < 8; i++)
                    r[i] = _mm256_loadu_ps(x0 + i * K + j0 * 32 + c);
                for (int i = 0; i < 8; i += 2) {
                    u[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
                    u[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
                }
                for (int i = 0; i < 8; i += 4) {
                    s[i + 0] = _mm256_shuffle_ps(u[i], u[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
                    s[i + 1] = _mm256_shuffle_ps(u[i], u[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
                    s[i + 2] = _mm256_shuffle_ps(u[i + 1], u[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
                    s[i + 3] = _mm256_shuffle_ps(u[i + 1], u[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
                }
                /* s[q] (q < 4) holds columns q and q + 4 of rows 0-3 | 0-3
                 * in its halves, s[4 + q] the same of rows 4-7 */
                for (int q = 0; q < 4; q++) {
                    _mm256_storeu_ps(o + ((c + q) * J + j0) * 8,
                                     _mm256_permute2f128_ps(s[q], s[4 + q], 0x20));
                    _mm256_storeu_ps(o + ((c + q + 4) * J + j0) * 8,
                                     _mm256_permute2f128_ps(s[q], s[4 + q], 0x31));
                }
            }
#endif
        for (int i = 0; i < mr; i++) {
            const float *xm = x0 + i * K;
            for (int64_t j = j0; j < J; j++)
                for (int c = 0; c < 32; c++)
                    o[(c * J + j) * X + i] = xm[j * 32 + c];
            for (int64_t k = K32; k < K; k++)
                o[k * X + i] = xm[k];
        }
    }
}

/* Rows [0, mr) (mr <= KN_MR) of the x tile at xp (gemm_xperm_job's
 * layout, width xs) against one residue-ordered panel of nn (<= KN_NR) weight rows: the
 * chain of residue c is an ordinary broadcast-FMA GEMM over J = K / 32
 * panel rows, it goes to lane tile c % VL of lt (folded in c order, as
 * dot_rows folds its accumulators), the VL tiles are summed lane-wise in
 * vhsum's pairing, and the K % 32 tail follows in order. Row m's nn
 * results go to y + m * ldy. */
KN_AI void panel_tile(const void *panel, const int type, const float *xp, int xs, int64_t K,
                      int mr, int nn, float *lt, float *y, int64_t ldy, bool pf)
{
    const int64_t J = K / 32, K32 = J * 32;
    for (int c = 0; c < 32 && J > 0; c++) {
        const void *pc = (const char *)panel + (size_t)c * J * KN_NR * (type == KN_F32 ? 4 : 2);
        float *ltc = lt + (size_t)(c % VL) * KN_MR * KN_NR;
        switch (mr) {
#define KN_RES_MR(h)                                                                           \
    case h:                                                                                    \
        res_kernel(xp + c * J * xs, xs, h <= KN_MR ? h : 1, pc, type, (int)J, ltc, c >= VL,   \
                   pf);                                                                        \
        break;
            KN_RES_MR(1)
            KN_RES_MR(2)
            KN_RES_MR(3)
            KN_RES_MR(4)
            KN_RES_MR(5)
            KN_RES_MR(6)
            KN_RES_MR(7)
            KN_RES_MR(8)
#undef KN_RES_MR
        default:
            break;
        }
    }
    const bool direct = J > 0 && K32 == K && nn == KN_NR;
    for (int m = 0; m < mr; m++) {
        float *ym = y + m * ldy;
        _Pragma("GCC unroll 16") for (int v = 0; v < KN_NV; v++) {
            const float *t0 = lt + (size_t)m * KN_NR + v * VL;
            vf r[VL];
            _Pragma("GCC unroll 16") for (int l = 0; l < VL; l++)
                r[l] = vld(t0 + (size_t)l * KN_MR * KN_NR);
            _Pragma("GCC unroll 16") for (int h = VL / 2; h >= 1; h /= 2)
                _Pragma("GCC unroll 16") for (int i = 0; i < h; i++)
                    r[i] = vadd(r[i], r[i + h]);
            if (direct)
                vst(ym + v * VL, r[0]);
            else
                vst(lt + (size_t)m * KN_NR + v * VL, r[0]);
        }
        if (direct)
            continue;
        const float *tm = lt + (size_t)m * KN_NR;
        for (int j = 0; j < nn; j++) {
            float s = J > 0 ? tm[j] : 0.0f;
            for (int64_t t = K32; t < K; t++)
                s += wscalar(panel, t * KN_NR + j, type) * xp[t * xs + m];
            ym[j] = s;
        }
    }
}

/* The GEMM in dot_rows' order for weights as they are: each thread packs
 * a panel of KN_NR rows at a time (row 32j + c of the weights at c * J + j,
 * then the K % 32 tail rows in order), then runs panel_tile over all of x. */
KN_AI void gemm_job_t(void *p, int ith, int nth, const int type)
{
    (void)nth;
    struct mm_args *a = p;
    const kn_tensor *w = a->w;
    const int64_t K = w->cols, N = w->rows, M = a->M;
    const int64_t J = K / 32, K32 = J * 32;
    float *panel = a->panels + (size_t)ith * gemm_thread_floats(K);
    float *nat = panel + (size_t)K * KN_NR;
    float *lt = nat + (size_t)KN_KC * KN_NR; /* [VL][KN_MR][KN_NR] */
    const int64_t n_panels = (N + KN_NR - 1) / KN_NR;
    for (;;) {
        const int64_t pi = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed);
        if (pi >= n_panels)
            return;
        const int64_t n0 = pi * KN_NR;
        const int nn = (int)(N - n0 < KN_NR ? N - n0 : KN_NR);
        for (int64_t k0 = 0; k0 < K; k0 += KN_KC) {
            const int kc = (int)(K - k0 < KN_KC ? K - k0 : KN_KC);
            pack_panel(w, n0, nn, k0, kc, nat, type);
            for (int kk = 0; kk < kc; kk++) {
                const int64_t k = k0 + kk;
                const int64_t dst = k < K32 ? (k % 32) * J + k / 32 : k;
                _Pragma("GCC unroll 16") for (int v = 0; v < KN_NV; v++)
                    vst(panel + dst * KN_NR + v * VL, vld(nat + kk * KN_NR + v * VL));
            }
        }
        for (int64_t m0 = 0; m0 < M; m0 += KN_MR)
            panel_tile(panel, KN_F32, a->xp + m0 * K, xperm_width(M), K,
                       (int)(M - m0 < KN_MR ? M - m0 : KN_MR), nn, lt, a->y + m0 * N + n0, N,
                       false);
    }
}

#define KN_DEF_GEMM(T, tname)                                                                  \
    static void gemm_job_##tname(void *p, int ith, int nth)                                    \
    {                                                                                          \
        gemm_job_t(p, ith, nth, T);                                                            \
    }
KN_DEF_GEMM(KN_F32, f32)
KN_DEF_GEMM(KN_F16, f16)
KN_DEF_GEMM(KN_BF16, bf16)
KN_DEF_GEMM(KN_Q8_0, q8_0)
KN_DEF_GEMM(KN_Q4_0, q4_0)

#ifdef KN_HAVE_Q8_MATVEC
/* Provided by the includer: integer-dot matvec for Q8_0 weights, M <= 4,
 * over the chunk list of a (matvec_plan); returns 0 when it ran, < 0 when
 * it could not get scratch. */
static int q8_matvec(kn_ctx *ctx, struct mm_args *a);
#endif
#ifdef KN_HAVE_Q8_GEMM
/* Provided by the includer: integer-dot GEMM for Q8_0 weights; returns 0
 * when it ran, < 0 when it needs scratch it could not get. */
static int q8_gemm(kn_ctx *ctx, const kn_tensor *w, const float *x, int64_t M, float *y);
#endif

/* Whether weights of type go to the integer-dot GEMM (its own x handling). */
static bool q8_gemm_type(int type)
{
#ifdef KN_HAVE_Q8_GEMM
    return type == KN_Q8_0;
#else
    (void)type;
    return false;
#endif
}

/* Rows up to which the matvec is the faster matmul for weights of type. */
static int64_t matvec_max(int type)
{
    return q8_gemm_type(type) ? 4 : KN_MATVEC_MAX;
}

/* M <= KN_MATVEC_MAX over n weights of one type and width, as one pool job. */
static void simd_matvec(kn_ctx *ctx, int n, const kn_tensor *const *w, const float *x, int64_t M,
                        float *const *y)
{
    struct mm_args a = {.w = w[0], .x = x, .M = M, .y = y[0]};
    atomic_init(&a.next, 0);
    matvec_plan(&a, n, w, y, kn_nthreads(ctx));
#ifdef KN_HAVE_Q8_MATVEC
    if (w[0]->type == KN_Q8_0 && q8_matvec(ctx, &a) == 0)
        return;
#endif
    /* Callers' activations are often malloc'd (16-byte aligned): every x
     * load would then straddle two cache lines, which cost decode ~10 % and
     * a 4-row matvec almost half its speed. A copy costs M * K floats. */
    if ((uintptr_t)x % 64 != 0) {
        const size_t xb = (size_t)M * (size_t)w[0]->cols * sizeof(float);
        float *xa = kn_scratch(ctx, KN_SCRATCH_ACT, xb);
        if (xa) {
            memcpy(xa, x, xb);
            a.x = xa;
        }
    }
    kn_job_fn job = NULL;
    switch (w[0]->type) {
    case KN_F32:
        job = matvec_job_f32;
        break;
    case KN_F16:
        job = matvec_job_f16;
        break;
    case KN_BF16:
        job = matvec_job_bf16;
        break;
    case KN_Q8_0:
        job = matvec_job_q8_0;
        break;
    case KN_Q4_0:
        job = matvec_job_q4_0;
        break;
    }
    kn_run(ctx, job, &a, kn_mm_work(n, w, M));
}

/* The float GEMM of n weights of one width that share x: x is put in
 * residue order once for all of them. False (nothing done) when scratch
 * could not be had. */
static bool simd_gemm(kn_ctx *ctx, int n, const kn_tensor *const *w, const float *x, int64_t M,
                      float *const *y)
{
    struct mm_args a = {.w = w[0], .x = x, .M = M};
    a.panels = kn_scratch(ctx, KN_SCRATCH_PANEL,
                          (size_t)kn_nthreads(ctx) * gemm_thread_floats(w[0]->cols) * sizeof(float));
    a.xp = kn_scratch(ctx, KN_SCRATCH_ACT, xperm_bytes(M, w[0]->cols));
    if (!a.panels || !a.xp)
        return false;
    kn_run(ctx, gemm_xperm_job, &a, KN_WORK_ALWAYS);
    for (int t = 0; t < n; t++) {
        kn_job_fn job = NULL;
        switch (w[t]->type) {
        case KN_F32:
            job = gemm_job_f32;
            break;
        case KN_F16:
            job = gemm_job_f16;
            break;
        case KN_BF16:
            job = gemm_job_bf16;
            break;
        case KN_Q8_0:
            job = gemm_job_q8_0;
            break;
        case KN_Q4_0:
            job = gemm_job_q4_0;
            break;
        }
        a.w = w[t];
        a.y = y[t];
        atomic_init(&a.next, 0);
        kn_run(ctx, job, &a, kn_mm_work(1, &w[t], M));
    }
    return true;
}

#ifdef KN_HAVE_FPACK
/* ---- float weights packed at load (kn_tensor_pack) ------------------------
 * F32, F16 and BF16 weights kept as the GEMM's residue-ordered panels, in
 * their own type: panel p (fpack_panel_bytes each, consecutive) holds rows
 * [p * KN_NR, p * KN_NR + KN_NR) with element (row p * KN_NR + j, col k)
 * at [(k < K32 ? (k % 32) * J + k / 32 : k) * KN_NR + j], rows past the end
 * zero. Every M then runs the same panel tiles: no per-call repacking
 * (which reads the weights 48 rows at a time; 110m F32 prefill is 4-10 %
 * faster without it), one copy serves decode too, and the work splits into
 * panels and blocks of x rows alike. The arithmetic is panel_tile's, which
 * is the GEMM's, so packing changes no result bit. Small matrices (tiny models, where the
 * padding of a partial panel would cost more than it saves) stay as
 * they are. */
#define KN_FPACK_MIN_K 256
#define KN_FPACK_MIN_N (2 * KN_NR)
#define KN_FPACK_MB (8 * KN_MR) /* x rows per work item, at least (where M has them) */

static bool fpack_type(int type)
{
    return type == KN_F32 || type == KN_F16 || type == KN_BF16;
}

static size_t fpack_panel_bytes(int type, int64_t K)
{
    return ((size_t)K * KN_NR * (type == KN_F32 ? 4 : 2) + 63) / 64 * 64;
}

static bool fpack_wanted(const kn_tensor *w)
{
    return fpack_type(w->type) && w->cols >= KN_FPACK_MIN_K && w->rows >= KN_FPACK_MIN_N;
}

static int fpack_tensor(const kn_tensor *w, void **out)
{
    *out = NULL;
    if (!fpack_wanted(w) || !w->data)
        return 0;
    const int64_t K = w->cols, N = w->rows, J = K / 32, K32 = J * 32;
    const int64_t n_panels = (N + KN_NR - 1) / KN_NR;
    const size_t es = w->type == KN_F32 ? 4 : 2, pb = fpack_panel_bytes(w->type, K);
    const size_t rb = kn_row_bytes(w->type, K);
    char *buf = aligned_alloc(64, (size_t)n_panels * pb);
    if (!buf)
        return -ENOMEM;
    for (int64_t p = 0; p < n_panels; p++) {
        char *pp = buf + (size_t)p * pb;
        memset(pp, 0, pb);
        for (int64_t j = 0; j < KN_NR && p * KN_NR + j < N; j++) {
            const char *src = (const char *)w->data + (size_t)(p * KN_NR + j) * rb;
            for (int64_t k = 0; k < K; k++) {
                const int64_t r = k < K32 ? (k % 32) * J + k / 32 : k;
                memcpy(pp + ((size_t)r * KN_NR + (size_t)j) * es, src + (size_t)k * es, es);
            }
        }
    }
    *out = buf;
    return 0;
}

/* x in residue order (gemm_xperm_job), here for a few rows, else as a job */
static float *fpack_xperm(kn_ctx *ctx, struct mm_args *a)
{
    const int64_t K = a->w->cols;
    a->xp = kn_scratch(ctx, KN_SCRATCH_ACT, xperm_bytes(a->M, K));
    if (!a->xp)
        return NULL;
    if (a->M * K < 16384)
        gemm_xperm_job(a, 0, 1);
    else
        kn_run(ctx, gemm_xperm_job, a, KN_WORK_ALWAYS);
    return a->xp;
}

/* Work items: weight t's items are [c0[t], c0[t + 1]), item i of it is
 * panel i / chunks[t] and x rows [(i % chunks[t]) * mb, + mb) (chunks[]
 * holds the row blocks per panel here). Consecutive items share a panel,
 * so the threads working on one at a time find it in the shared cache. */
struct fpack_args {
    struct mm_args *a;
    int64_t mb;
};

KN_AI void fpack_job_t(void *p, int ith, const int type)
{
    const struct fpack_args *f = p;
    struct mm_args *a = f->a;
    const int64_t K = a->ws[0]->cols, M = a->M;
    const size_t pb = fpack_panel_bytes(type, K);
    float *conv = a->panels + (size_t)ith * gemm_thread_floats(K);
    float *lt = conv + ((size_t)K + KN_KC) * KN_NR;
    for (;;) {
        const int64_t u = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed);
        if (u >= a->c0[a->n_w])
            return;
        int t = 0;
        while (u >= a->c0[t + 1])
            t++;
        const kn_tensor *w = a->ws[t];
        const int64_t N = w->rows, i = u - a->c0[t];
        const int64_t pi = i / a->chunks[t], m_lo = (i % a->chunks[t]) * f->mb;
        const int64_t m_hi = m_lo + f->mb < M ? m_lo + f->mb : M;
        const int64_t n0 = pi * KN_NR;
        const int nn = (int)(N - n0 < KN_NR ? N - n0 : KN_NR);
        const void *panel = (const char *)w->packed + (size_t)pi * pb;
        float *y = a->ys[t] + n0;
        if (type != KN_F32 && m_hi - m_lo > KN_MR) {
            /* 16-bit weights widened once per item, not once per tile */
            for (size_t e = 0; e < (size_t)K * KN_NR; e += VL) {
                __builtin_prefetch((const char *)panel + e * 2 + KN_PF_PANEL, 0, 2);
                vst(conv + e, wload(panel, (int64_t)e, type));
            }
            for (int64_t m0 = m_lo; m0 < m_hi; m0 += KN_MR)
                panel_tile(conv, KN_F32, a->xp + m0 * K, xperm_width(M), K,
                           (int)(m_hi - m0 < KN_MR ? m_hi - m0 : KN_MR), nn, lt, y + m0 * N, N,
                           false);
            continue;
        }
        for (int64_t m0 = m_lo; m0 < m_hi; m0 += KN_MR)
            panel_tile(panel, type, a->xp + m0 * K, xperm_width(M), K,
                       (int)(m_hi - m0 < KN_MR ? m_hi - m0 : KN_MR), nn, lt, y + m0 * N, N,
                       m0 == m_lo);
    }
}

#define KN_DEF_FPACK(T, tname)                                                                 \
    static void fpack_job_##tname(void *p, int ith, int nth)                                   \
    {                                                                                          \
        (void)nth;                                                                             \
        fpack_job_t(p, ith, T);                                                                \
    }
KN_DEF_FPACK(KN_F32, f32)
KN_DEF_FPACK(KN_F16, f16)
KN_DEF_FPACK(KN_BF16, bf16)

/* Whether fpack_matmul takes these n weights: all packed floats of one type
 * and width. */
static bool fpack_all(int n, const kn_tensor *const *w)
{
    for (int t = 0; t < n; t++)
        if (!w[t]->packed || !fpack_type(w[t]->type) || w[t]->type != w[0]->type ||
            w[t]->cols != w[0]->cols)
            return false;
    return true;
}

/* y[t] = x w[t]^T for packed float weights sharing x, every M, as one job
 * (after x's permutation). False (nothing done) without scratch. */
static bool fpack_matmul(kn_ctx *ctx, int n, const kn_tensor *const *w, const float *x,
                         int64_t M, float *const *y)
{
    const int nth = kn_nthreads(ctx);
    const int64_t K = w[0]->cols;
    struct mm_args a = {.w = w[0], .x = x, .M = M, .y = y[0], .n_w = n};
    a.panels =
        kn_scratch(ctx, KN_SCRATCH_PANEL, (size_t)nth * gemm_thread_floats(K) * sizeof(float));
    if (!a.panels || !fpack_xperm(ctx, &a))
        return false;
    /* x row blocks per panel: enough items for ~32 per thread (a thread
     * that the host preempts then costs little), none of fewer than
     * KN_FPACK_MB rows (each block reads the panel again) */
    int64_t panels = 0;
    for (int t = 0; t < n; t++)
        panels += (w[t]->rows + KN_NR - 1) / KN_NR;
    int64_t nmb = (32 * nth + panels - 1) / panels;
    const int64_t tiles = (M + KN_MR - 1) / KN_MR;
    if (nmb > tiles)
        nmb = tiles;
    int64_t mb = (tiles + nmb - 1) / nmb * KN_MR;
    if (mb < (M < KN_FPACK_MB ? M : KN_FPACK_MB))
        mb = M < KN_FPACK_MB ? M : KN_FPACK_MB;
    nmb = (M + mb - 1) / mb;
    a.c0[0] = 0;
    for (int t = 0; t < n; t++) {
        a.ws[t] = w[t];
        a.ys[t] = y[t];
        a.chunks[t] = nmb;
        a.c0[t + 1] = a.c0[t] + (w[t]->rows + KN_NR - 1) / KN_NR * nmb;
    }
    atomic_init(&a.next, 0);
    struct fpack_args f = {.a = &a, .mb = mb};
    kn_job_fn job = w[0]->type == KN_F32 ? fpack_job_f32
                    : w[0]->type == KN_F16 ? fpack_job_f16
                                           : fpack_job_bf16;
    kn_run(ctx, job, &f, kn_mm_work(n, w, M));
    return true;
}
#endif /* KN_HAVE_FPACK */

/* matmul on arguments already checked */
static void simd_matmul_one(kn_ctx *ctx, const kn_tensor *w, const float *x, int64_t M, float *y)
{
#ifdef KN_HAVE_FPACK
    if (fpack_all(1, &w) && fpack_matmul(ctx, 1, &w, x, M, &y))
        return;
#endif
    if (M <= matvec_max(w->type)) {
        simd_matvec(ctx, 1, &w, x, M, &y);
        return;
    }
#ifdef KN_HAVE_Q8_GEMM
    if (w->type == KN_Q8_0 && q8_gemm(ctx, w, x, M, y) == 0)
        return;
#endif
    if (!simd_gemm(ctx, 1, &w, x, M, &y))
        simd_matvec(ctx, 1, &w, x, M, &y); /* same arithmetic, only slower */
}

static int simd_matmul(kn_ctx *ctx, const kn_tensor *w, const float *x, int64_t M, float *y)
{
    int rc = kn_check_matmul(ctx, w, x, M, y);
    if (rc < 0)
        return rc;
    simd_matmul_one(ctx, w, x, M, y);
    return 0;
}

/* Decode runs Wq/Wk/Wv and W_gate/W_up on one x: as one matvec job they cost
 * one pool round trip (and one quantisation of x) instead of several, and
 * the tail of one weight overlaps the start of the next. */
static int simd_matmul_multi(kn_ctx *ctx, int n, const kn_tensor *const *w, const float *x,
                             int64_t M, float *const *y)
{
    int rc = kn_check_matmul_multi(ctx, n, w, x, M, y);
    if (rc < 0)
        return rc;
    bool fuse = M <= matvec_max(w[0]->type);
    for (int t = 0; t < n; t++)
        fuse = fuse && w[t]->type == w[0]->type && w[t]->cols == w[0]->cols;
#ifdef KN_HAVE_FPACK
    if (fpack_all(n, w) && fpack_matmul(ctx, n, w, x, M, y))
        return 0;
    /* Packed floats among unpacked weights (GQA: K/V too small to pack)
     * go one by one: the fused matvec below reads data, whose file pages
     * the model has released (they would fault back in on every call). */
    for (int t = 0; t < n; t++)
        if (w[t]->packed && fpack_type(w[t]->type)) {
            for (int u = 0; u < n; u++)
                simd_matmul_one(ctx, w[u], x, M, y[u]);
            return 0;
        }
#endif
    if (fuse) {
        simd_matvec(ctx, n, w, x, M, y);
        return 0;
    }
    /* prefill: one permutation of x for all float GEMMs of one width */
    bool share = true;
    for (int t = 0; t < n; t++)
        share = share && w[t]->cols == w[0]->cols && M > matvec_max(w[t]->type) &&
                !q8_gemm_type(w[t]->type);
    if (share && simd_gemm(ctx, n, w, x, M, y))
        return 0;
    for (int t = 0; t < n; t++)
        simd_matmul_one(ctx, w[t], x, M, y[t]);
    return 0;
}

/* ---- elementwise --------------------------------------------------------- */

/* exp(x) by 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2]; a degree-6
 * polynomial gives ~2 ulp over the range, inputs clamped so that n stays a
 * valid exponent (results underflow to 0 / saturate at FLT_MAX*). */
KN_AI vf vexp(vf x)
{
    x = vmax(x, vset1(-87.0f));
    x = vmin(x, vset1(88.0f));
    vf n = vround(vmul(x, vset1(1.44269504088896341f)));
    vf r = vfma(n, vset1(-0.693145751953125f), x);
    r = vfma(n, vset1(-1.428606765330187045e-06f), r);
    vf p = vset1(1.0f / 720.0f);
    p = vfma(p, r, vset1(1.0f / 120.0f));
    p = vfma(p, r, vset1(1.0f / 24.0f));
    p = vfma(p, r, vset1(1.0f / 6.0f));
    p = vfma(p, r, vset1(0.5f));
    p = vfma(p, r, vset1(1.0f));
    p = vfma(p, r, vset1(1.0f));
    return vmul(p, vpow2i(n));
}

struct ew_args {
    float *y;
    const float *x, *g;
    int64_t M, n;
    float eps;
    float *out;
};

static void rmsnorm_rows(const struct ew_args *a, int64_t m0, int64_t m1)
{
    const int64_t n = a->n;
    for (int64_t m = m0; m < m1; m++) {
        const float *xm = a->x + m * n;
        float *om = a->out + m * n;
        vf s0 = vzero(), s1 = vzero();
        int64_t i = 0;
        for (; i + 2 * VL <= n; i += 2 * VL) {
            vf v0 = vld(xm + i), v1 = vld(xm + i + VL);
            s0 = vfma(v0, v0, s0);
            s1 = vfma(v1, v1, s1);
        }
        for (; i + VL <= n; i += VL) {
            vf v0 = vld(xm + i);
            s0 = vfma(v0, v0, s0);
        }
        float ss = vhsum(vadd(s0, s1));
        for (; i < n; i++)
            ss += xm[i] * xm[i];
        const float inv = 1.0f / sqrtf(ss / (float)n + a->eps);
        const vf vinv = vset1(inv);
        for (i = 0; i + VL <= n; i += VL)
            vst(om + i, vmul(vmul(vld(xm + i), vinv), vld(a->g + i)));
        for (; i < n; i++)
            om[i] = xm[i] * inv * a->g[i];
    }
}

static void rmsnorm_job(void *p, int ith, int nth)
{
    const struct ew_args *a = p;
    int64_t lo, hi;
    kn_split(a->M, ith, nth, 1, &lo, &hi);
    rmsnorm_rows(a, lo, hi);
}

static int simd_rmsnorm(kn_ctx *ctx, const float *x, const float *g, int64_t M, int64_t n,
                        float eps, float *out)
{
    int rc = kn_check_rmsnorm(ctx, x, g, M, n, out);
    if (rc < 0)
        return rc;
    struct ew_args a = {.x = x, .g = g, .M = M, .n = n, .eps = eps, .out = out};
    if (M * n < KN_ELEM_PAR_MIN || M == 1)
        rmsnorm_rows(&a, 0, M);
    else
        kn_run(ctx, rmsnorm_job, &a, M * n * (int64_t)sizeof(float));
    return 0;
}

static vf silu_mul_v(vf gv, vf uv)
{
    vf e = vexp(vsub(vzero(), gv));
    return vmul(vdiv(gv, vadd(vset1(1.0f), e)), uv);
}

/* The tail goes through the same vector function (padded) as the body: an
 * element's result must not depend on where the array ends, or a batch
 * row's SwiGLU would depend on the batch (M * ffn decides the tail). */
static void silu_range(float *gate, const float *up, int64_t lo, int64_t hi)
{
    int64_t i = lo;
    for (; i + VL <= hi; i += VL)
        vst(gate + i, silu_mul_v(vld(gate + i), vld(up + i)));
    if (i < hi) {
        float g[VL] = {0}, u[VL] = {0};
        memcpy(g, gate + i, (size_t)(hi - i) * sizeof(float));
        memcpy(u, up + i, (size_t)(hi - i) * sizeof(float));
        vst(g, silu_mul_v(vld(g), vld(u)));
        memcpy(gate + i, g, (size_t)(hi - i) * sizeof(float));
    }
}

static void add_range(float *y, const float *x, int64_t lo, int64_t hi)
{
    int64_t i = lo;
    for (; i + VL <= hi; i += VL)
        vst(y + i, vadd(vld(y + i), vld(x + i)));
    for (; i < hi; i++)
        y[i] += x[i];
}

static void silu_job(void *p, int ith, int nth)
{
    const struct ew_args *a = p;
    int64_t lo, hi;
    kn_split(a->n, ith, nth, 16, &lo, &hi);
    silu_range(a->y, a->x, lo, hi);
}

static void add_job(void *p, int ith, int nth)
{
    const struct ew_args *a = p;
    int64_t lo, hi;
    kn_split(a->n, ith, nth, 16, &lo, &hi);
    add_range(a->y, a->x, lo, hi);
}

static int simd_silu_mul(kn_ctx *ctx, float *gate, const float *up, int64_t n)
{
    int rc = kn_check_ew(ctx, gate, up, n);
    if (rc < 0)
        return rc;
    if (n < KN_ELEM_PAR_MIN) {
        silu_range(gate, up, 0, n);
        return 0;
    }
    struct ew_args a = {.y = gate, .x = up, .n = n};
    kn_run(ctx, silu_job, &a, 2 * n * (int64_t)sizeof(float));
    return 0;
}

static int simd_add(kn_ctx *ctx, float *y, const float *x, int64_t n)
{
    int rc = kn_check_ew(ctx, y, x, n);
    if (rc < 0)
        return rc;
    if (n < KN_ELEM_PAR_MIN) {
        add_range(y, x, 0, n);
        return 0;
    }
    struct ew_args a = {.y = y, .x = x, .n = n};
    kn_run(ctx, add_job, &a, 2 * n * (int64_t)sizeof(float));
    return 0;
}

#define KN_ROPE_MAX 1024

struct rope_args {
    float *x;
    int64_t M;
    int n_heads, head_dim, rope_dims;
    const int32_t *pos;
    const double *freq; /* [rope_dims / 2] base^(-2i/rope_dims) */
};

static void rope_rows(const struct rope_args *r, int64_t m0, int64_t m1)
{
    /* Per position, cos/sin tables laid out like the data ([c c], [-s s]) so
     * each vector rotates VL/2 pairs at once; the angles are computed exactly
     * as the scalar reference computes them (pow hoisted: same value). */
    float cs[KN_ROPE_MAX] __attribute__((aligned(64)));
    float sn[KN_ROPE_MAX] __attribute__((aligned(64)));
    const int rd = r->rope_dims, hd = r->head_dim;
    for (int64_t m = m0; m < m1; m++) {
        for (int i = 0; i < rd; i += 2) {
            double theta = (double)r->pos[m] * r->freq[i / 2];
            float c = (float)cos(theta), s = (float)sin(theta);
            cs[i] = cs[i + 1] = c;
            sn[i] = -s;
            sn[i + 1] = s;
        }
        for (int h = 0; h < r->n_heads; h++) {
            float *v = r->x + (m * r->n_heads + h) * (int64_t)hd;
            int i = 0;
            for (; i + VL <= rd; i += VL) {
                vf d = vld(v + i);
                vst(v + i, vfma(vswap_pairs(d), vld(sn + i), vmul(d, vld(cs + i))));
            }
            for (; i < rd; i += 2) {
                float a0 = v[i], b0 = v[i + 1];
                v[i] = a0 * cs[i] - b0 * sn[i + 1];
                v[i + 1] = a0 * sn[i + 1] + b0 * cs[i];
            }
        }
    }
}

static void rope_job(void *p, int ith, int nth)
{
    const struct rope_args *r = p;
    int64_t lo, hi;
    kn_split(r->M, ith, nth, 1, &lo, &hi);
    rope_rows(r, lo, hi);
}

static int simd_rope(kn_ctx *ctx, float *x, int64_t M, int n_heads, int head_dim, int rope_dims,
                     const int32_t *pos, float base)
{
    int rc = kn_check_rope(ctx, x, M, n_heads, head_dim, rope_dims, pos);
    if (rc < 0)
        return rc;
    if (rope_dims > KN_ROPE_MAX)
        return kn_scalar_rope(ctx, x, M, n_heads, head_dim, rope_dims, pos, base);
    double freq[KN_ROPE_MAX / 2];
    for (int i = 0; i < rope_dims; i += 2)
        freq[i / 2] = pow((double)base, -(double)i / rope_dims);
    struct rope_args r = {x, M, n_heads, head_dim, rope_dims, pos, freq};
    /* The sin/cos per position dominate: fan out over positions (a row is
     * n_heads * head_dim floats, far more than a cache line). */
    if (M > 1 && M * n_heads * head_dim >= KN_ELEM_PAR_MIN)
        kn_run(ctx, rope_job, &r, KN_WORK_ALWAYS);
    else
        rope_rows(&r, 0, M);
    return 0;
}

/* ---- attention ----------------------------------------------------------- */

KN_AI float vdot(const float *a, const float *b, int n)
{
    vf s0 = vzero(), s1 = vzero();
    int i = 0;
    for (; i + 2 * VL <= n; i += 2 * VL) {
        s0 = vfma(vld(a + i), vld(b + i), s0);
        s1 = vfma(vld(a + i + VL), vld(b + i + VL), s1);
    }
    for (; i + VL <= n; i += VL)
        s0 = vfma(vld(a + i), vld(b + i), s0);
    float s = vhsum(vadd(s0, s1));
    for (; i < n; i++)
        s += a[i] * b[i];
    return s;
}

/* Dot product for head_dim below one vector (e.g. 8 on AVX-512): a plain loop
 * the compiler unrolls beats a masked vector plus a horizontal sum. */
KN_AI float sdot(const float *a, const float *b, int n)
{
    float s = 0.0f;
    for (int i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

/* One (query, head) pair. The cache is walked block by block (no division
 * per position), and without a mask only positions <= the query's own are
 * visited: the causal future is never touched. The score row holds visible
 * keys only (a masked key takes no entry), so a masked query sums exactly as
 * an unmasked one whose visible keys sit contiguously: a Medusa tree node
 * gets what decoding it alone gives. */
static void attn_task(const kn_attn_args *a, int64_t task, float *sc)
{
    const int64_t i = task / a->n_head;
    const int h = (int)(task % a->n_head);
    const int kvh = h / (a->n_head / a->n_kv_head);
    const int hd = a->head_dim;
    const int64_t bs = a->block_size;
    const int64_t row_stride = (int64_t)a->n_kv_head * hd;
    const int64_t blk_stride = bs * row_stride;
    const float *q = a->q + (i * a->n_head + h) * (int64_t)hd;
    float *o = a->out + (i * a->n_head + h) * (int64_t)hd;
    const int64_t n_end = a->mask ? a->n_past + a->n_q : a->n_past + i + 1;
    const uint8_t *mrow = a->mask ? a->mask + i * a->n_q - a->n_past : NULL;
    const float *kbase = a->k_pool + (int64_t)kvh * hd;
    const float *vbase = a->v_pool + (int64_t)kvh * hd;
    const bool wide = hd >= VL;

    float mx = -INFINITY;
    int64_t n_vis = 0;
    for (int64_t p0 = 0, b = 0; p0 < n_end; p0 += bs, b++) {
        const float *kr = kbase + (int64_t)a->block_table[b] * blk_stride;
        const int64_t pe = p0 + bs < n_end ? p0 + bs : n_end;
        for (int64_t p = p0; p < pe; p++, kr += row_stride) {
            if (mrow && p >= a->n_past && !mrow[p])
                continue;
            const float s = (wide ? vdot(q, kr, hd) : sdot(q, kr, hd)) * a->scale;
            sc[n_vis++] = s;
            mx = s > mx ? s : mx;
        }
    }
    for (int d = 0; d < hd; d++)
        o[d] = 0.0f;
    if (mx == -INFINITY)
        return;
    /* The row is padded with -inf to whole vectors (the scratch row has the
     * room); vexp clamps its input, so -inf would come out as exp(-87) > 0:
     * the padding is zeroed explicitly and adds exact zeros. */
    const int64_t n_pad = (n_vis + VL - 1) / VL * VL;
    for (int64_t p = n_vis; p < n_pad; p++)
        sc[p] = -INFINITY;
    vf vs = vzero();
    const vf vmx = vset1(mx);
    for (int64_t p = 0; p < n_pad; p += VL) {
        vf s = vld(sc + p);
        vf e = vexp(vsub(s, vmx));
        e = vmask_ninf(s, e);
        vst(sc + p, e);
        vs = vadd(vs, e);
    }
    const float sum = vhsum(vs);
    const float inv = 1.0f / sum;
    for (int64_t p0 = 0, b = 0, t = 0; p0 < n_end; p0 += bs, b++) {
        const float *vr = vbase + (int64_t)a->block_table[b] * blk_stride;
        const int64_t pe = p0 + bs < n_end ? p0 + bs : n_end;
        for (int64_t pp = p0; pp < pe; pp++, vr += row_stride) {
            if (mrow && pp >= a->n_past && !mrow[pp])
                continue;
            const float e = sc[t++];
            if (e == 0.0f)
                continue;
            const float w = e * inv;
            int d = 0;
            if (wide) {
                const vf wv = vset1(w);
                for (; d + VL <= hd; d += VL)
                    vst(o + d, vfma(wv, vld(vr + d), vld(o + d)));
            }
            for (; d < hd; d++)
                o[d] += w * vr[d];
        }
    }
}

/* Tiled attention for batches of queries (prefill, tree verification): one
 * task is one head and VL consecutive queries, which walk the visible cache
 * once, VL keys at a time, with an online (running max) softmax. Everything
 * is laid out with the VL queries across the vector lanes:
 *   qt[d][VL]        the query tile, transposed once per task
 *   s[j]             scores of key j for the VL queries (registers)
 *   ot[d][VL]        the output accumulator, transposed
 * so the softmax bookkeeping needs no horizontal operation. K and V tiles are
 * packed as [d/4][j][4] so that the broadcasts of key j's elements sit at
 * compile-time offsets from one pointer. Used for any number of queries
 * (see simd_attention); attn_task only serves head sizes this cannot.
 * With a mask each lane walks its own visible keys (see attn_query): keys
 * below n_past are shared and packed as above; a tile that reaches past
 * n_past (the last one or two: a tree is small) reads each lane's own key
 * rows, with the same per-lane operations in the same order. */

struct attn_job_args {
    const kn_attn_args *a;
    int64_t stride;
    int64_t n_tiles; /* query tiles per head (tiled path) */
    atomic_llong next;
    float *packs;      /* tiled path: per-thread packed key/value tiles, or NULL */
    int64_t pack_cap;  /* tiles each thread's share holds (of K, and of V) */
};

/* A thread's packed K/V tiles of one KV head, kept across the query tiles
 * it runs for that head: packing a key tile cost a third of attn_tile when
 * every query tile repacked the keys it walks (a causal prefill walks
 * n^2/2 tiles, n of them distinct). Only full tiles (VL real keys) are
 * kept; tile t sits at k + t * hd * VL, and tiles [0, n) are valid. */
struct attn_packs {
    float *k, *v;
    int64_t cap, n;
    int kvh;
};

#define KN_ATT_QUERY_MAX 4 /* fewer queries than this run one by one (attn_query) */

/* The online softmax step of one key tile (scores s[j], lanes = queries):
 * s becomes exp(s - new max), *m the new max, *lsum the rescaled running
 * sum; returns the factor that rescales the output accumulator. */
KN_AI vf attn_softmax_step(vf *s, vf *m, vf *lsum)
{
    vf mt = s[0];
    _Pragma("GCC unroll 16") for (int j = 1; j < VL; j++)
        mt = vmax(mt, s[j]);
    const vf mnew = vmax(*m, mt);
    /* A lane that has seen nothing yet keeps max -inf: take 0 as its
     * reference so that no -inf - -inf appears; vexp clamps its input,
     * so -inf scores are zeroed explicitly. */
    const vf mref = vmask_ninf(mnew, mnew);
    const vf alpha = vmask_ninf(*m, vexp(vsub(*m, mref)));
    vf psum = vzero();
    _Pragma("GCC unroll 16") for (int j = 0; j < VL; j++) {
        s[j] = vmask_ninf(s[j], vexp(vsub(s[j], mref)));
        psum = vadd(psum, s[j]);
    }
    *lsum = vfma(*lsum, alpha, psum);
    *m = mnew;
    return alpha;
}

/* A masked tile reaching past n_past: lane l's logical key p0 + j is its own
 * (cache position p0 + j below n_past, shared by all lanes and broadcast as
 * in attn_tile; else the lane's next visible new token, read per lane), with
 * attn_tile's per-lane operations in its order: a lane's own key runs as
 * scalar fmaf chains, which round as its vector lane does, and the output
 * update runs key by key over all d instead of d by d over all keys (per
 * element the same chain). Keys past every lane's end (j >= nj) are
 * skipped: in attn_tile they score -inf and add exact zeros; so are a lane
 * past its own end or past the last query (score -inf, weight 0).
 * lane_col[] advances past the new tokens used. */
static void attn_tile_gather(const kn_attn_args *a, int h, int64_t i0, int64_t nq, int64_t p0,
                             int64_t n_end, const int64_t *lane_end, int64_t *lane_col,
                             const float *qt, float *ot, vf *s, vf *m, vf *lsum)
{
    const int hd = a->head_dim;
    const int kvh = h / (a->n_head / a->n_kv_head);
    const int64_t bs = a->block_size;
    const int64_t row_stride = (int64_t)a->n_kv_head * hd;
    const int64_t blk_stride = bs * row_stride;
    const float *kbase = a->k_pool + (int64_t)kvh * hd;
    const float *vbase = a->v_pool + (int64_t)kvh * hd;
    const int nj = n_end - p0 < VL ? (int)(n_end - p0) : VL;
    /* [key][lane] cache offsets, -1: lane skipped; lane 0 only if shared */
    int64_t off[VL][VL];
    float valid[VL][VL] __attribute__((aligned(64)));
    for (int j = 0; j < nj; j++) {
        const int64_t p = p0 + j;
        if (p < a->n_past) {
            off[j][0] = (int64_t)a->block_table[p / bs] * blk_stride + (p % bs) * row_stride;
            continue;
        }
        for (int l = 0; l < VL; l++) {
            const bool in = l < nq && p < lane_end[l];
            valid[j][l] = in ? 1.0f : 0.0f;
            off[j][l] = -1;
            if (!in)
                continue;
            const uint8_t *mrow = a->mask + (i0 + l) * a->n_q;
            while (!mrow[lane_col[l]])
                lane_col[l]++;
            const int64_t pl = a->n_past + lane_col[l]++;
            off[j][l] = (int64_t)a->block_table[pl / bs] * blk_stride + (pl % bs) * row_stride;
        }
    }
    const vf ninf = vset1(-INFINITY), vscale = vset1(a->scale), half = vset1(0.5f);
    for (int j = 0; j < VL; j++) {
        vf sj = vzero();
        if (j >= nj) {
            s[j] = ninf;
        } else if (p0 + j < a->n_past) {
            const float *kr = kbase + off[j][0];
            for (int d = 0; d < hd; d++)
                sj = vfma(vset1(kr[d]), vld(qt + d * VL), sj);
            s[j] = vmul(sj, vscale);
        } else {
            float acc[VL] __attribute__((aligned(64)));
            for (int l = 0; l < VL; l++) {
                acc[l] = 0.0f;
                if (off[j][l] < 0)
                    continue;
                const float *kr = kbase + off[j][l];
                for (int d = 0; d < hd; d++)
                    acc[l] = fmaf(kr[d], qt[d * VL + l], acc[l]);
            }
            s[j] = vsel_lt(vld(valid[j]), half, ninf, vmul(vld(acc), vscale));
        }
    }
    const vf alpha = attn_softmax_step(s, m, lsum);
    for (int d = 0; d < hd; d++)
        vst(ot + d * VL, vmul(vld(ot + d * VL), alpha));
    for (int j = 0; j < nj; j++) {
        if (p0 + j < a->n_past) {
            const float *vr = vbase + off[j][0];
            for (int d = 0; d < hd; d++)
                vst(ot + d * VL, vfma(vset1(vr[d]), s[j], vld(ot + d * VL)));
            continue;
        }
        float e[VL] __attribute__((aligned(64)));
        vst(e, s[j]);
        for (int l = 0; l < VL; l++) {
            if (off[j][l] < 0)
                continue;
            const float *vr = vbase + off[j][l];
            for (int d = 0; d < hd; d++)
                ot[d * VL + l] = fmaf(vr[d], e[l], ot[d * VL + l]);
        }
    }
}

static void attn_tile(const kn_attn_args *a, int h, int64_t i0, float *buf,
                      struct attn_packs *pk)
{
    const int hd = a->head_dim;
    const int kvh = h / (a->n_head / a->n_kv_head);
    const int64_t bs = a->block_size;
    const int64_t row_stride = (int64_t)a->n_kv_head * hd;
    const int64_t blk_stride = bs * row_stride;
    const int64_t q_stride = (int64_t)a->n_head * hd;
    const int64_t nq = a->n_q - i0 < VL ? a->n_q - i0 : VL;
    float *qt = buf, *ot = qt + hd * VL, *kc = ot + hd * VL, *vc = kc + hd * VL;
    const float *kbase = a->k_pool + (int64_t)kvh * hd;
    const float *vbase = a->v_pool + (int64_t)kvh * hd;

    /* lanes past the last query repeat it; their results are dropped.
     * Transposed in 4 x 4 SSE tiles (head_dim % 4 == 0 here): element by
     * element, this and the output's transpose cost a sixth of attn_tile. */
    for (int l = 0; l < VL; l += 4) {
        const float *qr[4];
        for (int r = 0; r < 4; r++)
            qr[r] = a->q + (i0 + (l + r < nq ? l + r : nq - 1)) * q_stride + (int64_t)h * hd;
        for (int d = 0; d < hd; d += 4) {
            __m128 r0 = _mm_loadu_ps(qr[0] + d), r1 = _mm_loadu_ps(qr[1] + d);
            __m128 r2 = _mm_loadu_ps(qr[2] + d), r3 = _mm_loadu_ps(qr[3] + d);
            _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
            _mm_storeu_ps(qt + (d + 0) * VL + l, r0);
            _mm_storeu_ps(qt + (d + 1) * VL + l, r1);
            _mm_storeu_ps(qt + (d + 2) * VL + l, r2);
            _mm_storeu_ps(qt + (d + 3) * VL + l, r3);
        }
    }
    for (int d = 0; d < hd; d++)
        vst(ot + d * VL, vzero());
    float lane[VL] __attribute__((aligned(64)));
    for (int l = 0; l < VL; l++)
        lane[l] = (float)(i0 + l);
    const vf qidx = vld(lane), ninf = vset1(-INFINITY), vscale = vset1(a->scale);
    vf m = ninf, lsum = vzero();
    /* with a mask, per lane: visible keys (n_past + set bits of its row) and
     * the next mask column to scan for its next visible new token */
    int64_t n_end = a->n_past + i0 + nq, lane_end[VL], lane_col[VL];
    if (a->mask) {
        n_end = 0;
        for (int l = 0; l < VL; l++) {
            const uint8_t *mrow = a->mask + (i0 + (l < nq ? l : nq - 1)) * a->n_q;
            int64_t c = 0;
            for (int64_t jj = 0; jj < a->n_q; jj++)
                c += mrow[jj] != 0;
            lane_end[l] = a->n_past + c;
            lane_col[l] = 0;
            n_end = lane_end[l] > n_end ? lane_end[l] : n_end;
        }
    }

    for (int64_t p0 = 0; p0 < n_end; p0 += VL) {
        vf s[VL];
        if (a->mask && p0 + VL > a->n_past) {
            attn_tile_gather(a, h, i0, nq, p0, n_end, lane_end, lane_col, qt, ot, s, &m, &lsum);
            continue;
        }
        /* pack keys p0 .. p0+VL-1 (past the end: repeat the last, masked
         * below), or find them packed by an earlier query tile */
        const int64_t tix = p0 / VL;
        float *kt = kc, *vt = vc;
        bool pack = true;
        if (pk && p0 + VL <= n_end && tix < pk->cap) {
            if (pk->kvh != kvh) {
                pk->kvh = kvh;
                pk->n = 0;
            }
            if (tix <= pk->n) { /* tiles come in order: never above */
                kt = pk->k + tix * hd * VL;
                vt = pk->v + tix * hd * VL;
                pack = tix == pk->n;
                pk->n += pack;
            }
        }
        for (int j = 0; j < VL && pack; j++) {
            const int64_t p = p0 + j < n_end ? p0 + j : n_end - 1;
            const int64_t off = (int64_t)a->block_table[p / bs] * blk_stride + (p % bs) * row_stride;
            const float *kr = kbase + off, *vr = vbase + off;
            for (int d = 0; d < hd; d += 4) {
                memcpy(kt + d * VL + j * 4, kr + d, 4 * sizeof(float));
                memcpy(vt + d * VL + j * 4, vr + d, 4 * sizeof(float));
            }
        }
        _Pragma("GCC unroll 16") for (int j = 0; j < VL; j++)
            s[j] = vzero();
        for (int d = 0; d < hd; d += 4) {
            const float *kd = kt + d * VL;
            _Pragma("GCC unroll 4") for (int dd = 0; dd < 4; dd++) {
                const vf qv = vld(qt + (d + dd) * VL);
                _Pragma("GCC unroll 16") for (int j = 0; j < VL; j++)
                    s[j] = vfma(vset1(kd[j * 4 + dd]), qv, s[j]);
            }
        }
        /* Keys past the end and causally future ones score -inf: only the
         * tile that crosses the diagonal (and the last one) needs this. With
         * a mask this tile lies below n_past: every key is visible. */
        const bool edge = p0 + VL > n_end || p0 + VL - 1 - a->n_past > i0;
        _Pragma("GCC unroll 16") for (int j = 0; j < VL; j++) {
            s[j] = vmul(s[j], vscale);
            if (!edge)
                continue;
            const int64_t jr = p0 + j - a->n_past; /* index among the new tokens */
            if (p0 + j >= n_end) {
                s[j] = ninf;
            } else if (jr >= 0) {
                s[j] = vsel_lt(qidx, vset1((float)jr), ninf, s[j]);
            }
        }
        const vf alpha = attn_softmax_step(s, &m, &lsum);
        for (int d = 0; d < hd; d += 4) {
            const float *vd = vt + d * VL;
            _Pragma("GCC unroll 4") for (int dd = 0; dd < 4; dd++) {
                vf o = vmul(vld(ot + (d + dd) * VL), alpha);
                _Pragma("GCC unroll 16") for (int j = 0; j < VL; j++)
                    o = vfma(vset1(vd[j * 4 + dd]), s[j], o);
                vst(ot + (d + dd) * VL, o);
            }
        }
    }
    float ls[VL] __attribute__((aligned(64)));
    vst(ls, lsum);
    for (int l = 0; l < nq; l += 4) {
        __m128 inv[4];
        float *o[4];
        for (int r = 0; r < 4; r++) {
            /* a query that saw nothing gets a zero row */
            inv[r] = _mm_set1_ps(ls[l + r] > 0.0f ? 1.0f / ls[l + r] : 0.0f);
            o[r] = l + r < nq ? a->out + (i0 + l + r) * q_stride + (int64_t)h * hd : NULL;
        }
        for (int d = 0; d < hd; d += 4) {
            __m128 r0 = _mm_loadu_ps(ot + (d + 0) * VL + l), r1 = _mm_loadu_ps(ot + (d + 1) * VL + l);
            __m128 r2 = _mm_loadu_ps(ot + (d + 2) * VL + l), r3 = _mm_loadu_ps(ot + (d + 3) * VL + l);
            _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
            const __m128 rr[4] = {r0, r1, r2, r3};
            for (int r = 0; r < 4 && l + r < nq; r++)
                _mm_storeu_ps(o[r] + d, _mm_mul_ps(rr[r], inv[r]));
        }
    }
}

/* One query alone, with exactly the arithmetic of its lane in attn_tile
 * (same key tiles, same operation order, the same vector exp applied per
 * key): bit for bit what attn_tile gives it, without computing VL - 1 idle
 * lanes. Decode (one query per sequence) runs here.
 * With a mask, `vis` lists the new tokens the query sees (ascending j, n_vis
 * of them) and the walk is over its visible keys, not over slots: logical
 * key t is slot t for t < n_past, then slot n_past + vis[t - n_past], and
 * key tiles are aligned to t. A Medusa tree node thus groups its keys as
 * decoding it alone does (its visible keys contiguous at 0 .. n_past +
 * depth), and gets the same output bit for bit; with slot-aligned tiles a
 * node off the main chain would regroup around its siblings' slots. */
/* Cache offset (floats, before the head's) of attn_query's logical key p. */
/* attn_query's walk over its logical keys: cache offsets (floats, before
 * the head's) in order, without a division per key (a tiny model's decode
 * spent a third of its attention time dividing by the block size). */
struct attnq_iter {
    int64_t p, blk, slot; /* next logical key; its block and slot below n_past */
};

KN_AI int64_t attnq_next(const kn_attn_args *a, const int32_t *vis, struct attnq_iter *it,
                         int64_t blk_stride, int64_t row_stride)
{
    const int64_t p = it->p++;
    if (vis && p >= a->n_past) { /* a visible new token: a jump, rare */
        const int64_t q = a->n_past + vis[p - a->n_past];
        return (int64_t)a->block_table[q / a->block_size] * blk_stride +
               (q % a->block_size) * row_stride;
    }
    const int64_t off = (int64_t)a->block_table[it->blk] * blk_stride + it->slot * row_stride;
    if (++it->slot == a->block_size) {
        it->slot = 0;
        it->blk++;
    }
    return off;
}

static void attn_query(const kn_attn_args *a, int h, int64_t i, const int32_t *vis,
                       int64_t n_vis, float *buf)
{
    const int hd = a->head_dim;
    const int kvh = h / (a->n_head / a->n_kv_head);
    const int64_t bs = a->block_size;
    const int64_t row_stride = (int64_t)a->n_kv_head * hd;
    const int64_t blk_stride = bs * row_stride;
    const int64_t q_stride = (int64_t)a->n_head * hd;
    const int64_t n_end = vis ? a->n_past + n_vis : a->n_past + i + 1; /* logical keys */
    const float *q = a->q + i * q_stride + (int64_t)h * hd;
    /* o[hd], then the tile's keys transposed: kt[d][VL] (lanes = keys) */
    float *o = buf, *kt = buf + (hd + VL - 1) / VL * VL;
    const float *kbase = a->k_pool + (int64_t)kvh * hd;
    const float *vbase = a->v_pool + (int64_t)kvh * hd;
    for (int d = 0; d < hd; d++)
        o[d] = 0.0f;
    float m = -INFINITY, lsum = 0.0f;
    float sj[VL] __attribute__((aligned(64))), ej[VL] __attribute__((aligned(64)));
    const float *vrow[VL];
    const vf vscale = vset1(a->scale);
    static const float zrow[KN_ATT_HD_MAX] __attribute__((aligned(64)));
    const float *krow[VL];
    /* offsets of this tile's keys and of the next tile's (prefetched now) */
    int64_t offs[2][VL];
    struct attnq_iter it = {0, 0, 0};
    for (int j = 0; j < VL && j < n_end; j++)
        offs[0][j] = attnq_next(a, vis, &it, blk_stride, row_stride);
    for (int64_t p0 = 0, cur = 0; p0 < n_end; p0 += VL, cur ^= 1) {
        /* Scores for VL keys at once, lanes = keys: per key the same fma
         * chain over d as attn_tile's lane for this query. n_end stops at
         * the query's own position or last visible key. */
        const int nk = n_end - p0 < VL ? (int)(n_end - p0) : VL;
        for (int j = 0; j < VL; j++) {
            krow[j] = j < nk ? kbase + offs[cur][j] : zrow;
            vrow[j] = j < nk ? vbase + offs[cur][j] : NULL;
        }
        /* Each key row is a few lines at a stride of n_kv_head rows, which
         * the hardware prefetcher does not follow: request this tile's V
         * rows and the next tile's K rows now (this walk is most of decode's
         * time in attention, latency bound without). */
        for (int j = 0; j < nk; j++)
            for (int d = 0; d < hd; d += 16)
                __builtin_prefetch(vrow[j] + d);
        for (int j = 0; j < VL && p0 + VL + j < n_end; j++) {
            offs[cur ^ 1][j] = attnq_next(a, vis, &it, blk_stride, row_stride);
            for (int d = 0; d < hd; d += 16)
                __builtin_prefetch(kbase + offs[cur ^ 1][j] + d);
        }
        /* kt[d][j] = krow[j][d], 4 x 4 at a time */
        for (int j = 0; j < VL; j += 4) {
            const float *r0 = krow[j], *r1 = krow[j + 1], *r2 = krow[j + 2], *r3 = krow[j + 3];
            for (int d = 0; d < hd; d += 4) {
                __m128 x0 = _mm_loadu_ps(r0 + d), x1 = _mm_loadu_ps(r1 + d);
                __m128 x2 = _mm_loadu_ps(r2 + d), x3 = _mm_loadu_ps(r3 + d);
                _MM_TRANSPOSE4_PS(x0, x1, x2, x3);
                _mm_storeu_ps(kt + (d + 0) * VL + j, x0);
                _mm_storeu_ps(kt + (d + 1) * VL + j, x1);
                _mm_storeu_ps(kt + (d + 2) * VL + j, x2);
                _mm_storeu_ps(kt + (d + 3) * VL + j, x3);
            }
        }
        vf sv = vzero();
        for (int d = 0; d < hd; d++)
            sv = vfma(vld(kt + d * VL), vset1(q[d]), sv);
        vst(sj, vmul(sv, vscale));
        float mt = -INFINITY;
        for (int j = 0; j < VL; j++) {
            if (!vrow[j])
                sj[j] = -INFINITY;
            mt = sj[j] > mt ? sj[j] : mt;
        }
        const float mnew = m > mt ? m : mt;
        const float mref = mnew == -INFINITY ? 0.0f : mnew;
        vst(ej, vexp(vsub(vld(sj), vset1(mref))));
        float al[VL] __attribute__((aligned(64)));
        vst(al, vexp(vset1(m - mref)));
        const float alpha = m == -INFINITY ? 0.0f : al[0];
        float psum = 0.0f;
        for (int j = 0; j < VL; j++) {
            ej[j] = vrow[j] ? ej[j] : 0.0f;
            psum = psum + ej[j];
        }
        lsum = fmaf(lsum, alpha, psum);
        m = mnew;
        /* per d, the tile's chain: o * alpha, then + v * p key by key (an
         * invisible key adds an exact 0 there, so it is skipped here); d
         * is independent, so the inner loops vectorise */
        for (int d = 0; d < hd; d++)
            o[d] = o[d] * alpha;
        for (int j = 0; j < VL; j++) {
            const float *vr = vrow[j];
            if (!vr)
                continue;
            const float e = ej[j];
            const vf ev = vset1(e);
            int d = 0;
            for (; d + VL <= hd; d += VL) /* lane-wise the same single-rounding fma */
                vst(o + d, vfma(vld(vr + d), ev, vld(o + d)));
            for (; d < hd; d += 4) /* head_dim % 4 == 0 on this path */
                _mm_storeu_ps(o + d, _mm_fmadd_ps(_mm_loadu_ps(vr + d), _mm_set1_ps(e),
                                                  _mm_loadu_ps(o + d)));
        }
    }
    const float inv = lsum > 0.0f ? 1.0f / lsum : 0.0f;
    float *out = a->out + i * q_stride + (int64_t)h * hd;
    for (int d = 0; d < hd; d++)
        out[d] = o[d] * inv;
}

static void attn_query_job(void *p, int ith, int nth)
{
    const struct attn_job_args *j = p;
    const kn_attn_args *a = j->a;
    float *buf = a->scratch + ith * j->stride + (j->stride - KN_ATT_TILE_FLOATS);
    /* a query's visible new tokens go in the score-row part of the thread's
     * share, which attn_query does not use (n_q <= its length) */
    int32_t *vis = a->mask ? (int32_t *)(a->scratch + ith * j->stride) : NULL;
    int64_t lo, hi, n_vis = 0, vis_of = -1;
    kn_split(a->n_q * a->n_head, ith, nth, 1, &lo, &hi);
    for (int64_t t = lo; t < hi; t++) {
        const int64_t i = t / a->n_head;
        if (vis && i != vis_of) {
            const uint8_t *mrow = a->mask + i * a->n_q;
            n_vis = 0;
            for (int64_t jj = 0; jj < a->n_q; jj++)
                if (mrow[jj])
                    vis[n_vis++] = (int32_t)jj;
            vis_of = i;
        }
        attn_query(a, (int)(t % a->n_head), i, vis, n_vis, buf);
    }
}

static void attn_tiled_job(void *p, int ith, int nth)
{
    (void)nth;
    struct attn_job_args *j = p;
    const kn_attn_args *a = j->a;
    float *buf = a->scratch + ith * j->stride + (j->stride - KN_ATT_TILE_FLOATS);
    const int64_t n_tasks = j->n_tiles * a->n_head;
    struct attn_packs pk = {.cap = j->pack_cap, .kvh = -1};
    if (j->packs) {
        pk.k = j->packs + (size_t)ith * 2 * (size_t)j->pack_cap * a->head_dim * VL;
        pk.v = pk.k + (size_t)j->pack_cap * a->head_dim * VL;
    }
    for (;;) {
        const int64_t t = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed);
        if (t >= n_tasks)
            return;
        /* Head by head (the thread's packed keys stay valid across a head's
         * query tiles), last query tiles first: under a causal mask they see
         * the most keys, so a head's tail is its cheap tasks. */
        const int h = (int)(t / j->n_tiles);
        const int64_t qt = j->n_tiles - 1 - t % j->n_tiles;
        attn_tile(a, h, qt * VL, buf, j->packs ? &pk : NULL);
    }
}

static void attn_job(void *p, int ith, int nth)
{
    const struct attn_job_args *j = p;
    const kn_attn_args *a = j->a;
    int64_t lo, hi;
    kn_split(a->n_q * a->n_head, ith, nth, 1, &lo, &hi);
    for (int64_t t = lo; t < hi; t++)
        attn_task(a, t, a->scratch + ith * j->stride);
}

static int simd_attention(kn_ctx *ctx, const kn_attn_args *a)
{
    int rc = kn_check_attention(ctx, a);
    if (rc < 0)
        return rc;
    /* the per-thread share of kn_attn_scratch_floats(): score row, then tiles */
    struct attn_job_args j = {
        .a = a, .stride = (a->n_past + a->n_q + 15) / 16 * 16 + 16 + KN_ATT_TILE_FLOATS};
    atomic_init(&j.next, 0);
    /* One arithmetic for every n_q: a query's lanes never mix with its tile
     * mates', and key tiles are aligned to the query's own key walk, so its
     * output does not depend on the queries batched with it (a key tile a
     * query cannot see is an exact no-op for its lane). Switching to
     * attn_task for few queries would change the arithmetic with the batch.
     * With a mask the key tiles follow each query's visible keys, so that a
     * tree node equals its plain decode (attn_query, attn_tile_gather). */
    if (a->head_dim % 4 == 0 && a->head_dim <= KN_ATT_HD_MAX) {
        if (a->n_q < KN_ATT_QUERY_MAX) { /* attn_tile's arithmetic per query */
            kn_run(ctx, attn_query_job, &j, kn_attn_work(a));
            return 0;
        }
        j.n_tiles = (a->n_q + VL - 1) / VL;
        /* keys are worth keeping packed when a head has several query tiles */
        if (j.n_tiles > 1) {
            j.pack_cap = (a->n_past + a->n_q) / VL;
            j.packs = kn_scratch(ctx, KN_SCRATCH_PANEL,
                                 (size_t)kn_nthreads(ctx) * 2 * (size_t)j.pack_cap *
                                     (size_t)a->head_dim * VL * sizeof(float));
        }
        kn_run(ctx, attn_tiled_job, &j, kn_attn_work(a));
        return 0;
    }
    kn_run(ctx, attn_job, &j, kn_attn_work(a));
    return 0;
}

/* ---- KV pool writes -------------------------------------------------------- */

#define KN_KV_WRITE_PAR_MIN 8 /* rows from which a write fans out (prefill) */

struct kv_write_args {
    float *k_pool, *v_pool;
    int64_t row;
    const int32_t *slots;
    const float *k, *v;
};

static void kv_write_rows(void *p, int64_t i0, int64_t i1)
{
    const struct kv_write_args *a = p;
    const size_t bytes = (size_t)a->row * sizeof(float);
    for (int64_t i = i0; i < i1; i++) {
        if (a->slots[i] < 0) /* padding */
            continue;
        memcpy(a->k_pool + a->slots[i] * a->row, a->k + i * a->row, bytes);
        memcpy(a->v_pool + a->slots[i] * a->row, a->v + i * a->row, bytes);
    }
}

/* A prompt of hundreds of rows writes megabytes per layer: more than one
 * core's store bandwidth, so it is spread over the pool; a decode step's
 * few rows stay on the calling thread. */
static int simd_kv_write(kn_ctx *ctx, float *k_pool, float *v_pool, int64_t row_floats,
                         const int32_t *slots, int64_t n, const float *k, const float *v)
{
    int rc = kn_check_kv_write(ctx, k_pool, v_pool, row_floats, slots, n, k, v);
    if (rc < 0)
        return rc;
    struct kv_write_args a = {k_pool, v_pool, row_floats, slots, k, v};
    kn_run_rows(ctx, n, 1, n >= KN_KV_WRITE_PAR_MIN, kv_write_rows, &a);
    return 0;
}

/* ---- argmax -----------------------------------------------------------------
 * Equal, index for index, to the scalar definition
 *   best = 0; v = x[0]; for i >= 1: if (x[i] > v) { v = x[i]; best = i; }
 * whose result, when x[0] is a number, is the lowest index holding the
 * maximum of the numbers (NaNs never compare greater; -0 == +0). Each lane
 * runs that loop over its own indices, starting from (x[0], 0) instead of
 * its first element: then every lane's value is a number >= x[0], and the
 * lowest index among the lanes that reach the overall maximum is the answer
 * (a lane that never moved still says 0, where x[0] is). A NaN x[0] is
 * never beaten: 0. */
#define KN_AM_U 4 /* independent accumulators: the compare-blend chain is ~6 cycles */

static int32_t argmax_row(const float *x, int64_t n)
{
    if (isnan(x[0]))
        return 0;
    float bv = x[0];
    int64_t best = 0, i = 0;
    const int64_t step = KN_AM_U * VL;
    if (n >= step) {
        vf mx[KN_AM_U];
        vi ix[KN_AM_U], at[KN_AM_U];
        for (int u = 0; u < KN_AM_U; u++) {
            mx[u] = vset1(x[0]);
            ix[u] = vi_set1(0);
            at[u] = vi_add(vi_iota(), vi_set1(u * VL));
        }
        const vi vstep = vi_set1((int32_t)step);
        for (; i + step <= n; i += step)
            for (int u = 0; u < KN_AM_U; u++) {
                vtake_gt(vld(x + i + u * VL), at[u], &mx[u], &ix[u]);
                at[u] = vi_add(at[u], vstep);
            }
        float lv[KN_AM_U * VL];
        int32_t li[KN_AM_U * VL];
        for (int u = 0; u < KN_AM_U; u++) {
            vst(lv + u * VL, mx[u]);
            vi_st(li + u * VL, ix[u]);
        }
        for (int l = 0; l < KN_AM_U * VL; l++)
            if (lv[l] > bv)
                bv = lv[l];
        best = INT64_MAX;
        for (int l = 0; l < KN_AM_U * VL; l++)
            if (lv[l] == bv && li[l] < best)
                best = li[l];
    }
    for (; i < n; i++) /* the tail: indices above every lane's */
        if (x[i] > bv) {
            bv = x[i];
            best = i;
        }
    return (int32_t)best;
}

struct argmax_args {
    const float *x;
    int64_t n;
    int32_t *ids;
};

static void argmax_rows(void *p, int64_t m0, int64_t m1)
{
    const struct argmax_args *a = p;
    for (int64_t m = m0; m < m1; m++)
        a->ids[m] = argmax_row(a->x + m * a->n, a->n);
}

static int simd_argmax(kn_ctx *ctx, const float *x, int64_t M, int64_t n, int32_t *ids)
{
    int rc = kn_check_argmax(ctx, x, M, n, ids);
    if (rc < 0)
        return rc;
    struct argmax_args a = {x, n, ids};
    /* ~1 us per 32k-float row: only a batch of many rows is worth the pool */
    kn_run_rows(ctx, M, 16, M * n >= (1 << 18), argmax_rows, &a);
    return 0;
}

/* ---- streaming read ------------------------------------------------------ */

static float simd_read_stream(const void *p, size_t bytes)
{
    const char *c = p;
    vi a0 = vi_zero(), a1 = vi_zero(), a2 = vi_zero(), a3 = vi_zero();
    const size_t step = 8 * sizeof(vi);
    size_t i = 0;
    for (; i + step <= bytes; i += step) {
        a0 = vi_xor(a0, vi_ld(c + i));
        a1 = vi_xor(a1, vi_ld(c + i + sizeof(vi)));
        a2 = vi_xor(a2, vi_ld(c + i + 2 * sizeof(vi)));
        a3 = vi_xor(a3, vi_ld(c + i + 3 * sizeof(vi)));
        a0 = vi_xor(a0, vi_ld(c + i + 4 * sizeof(vi)));
        a1 = vi_xor(a1, vi_ld(c + i + 5 * sizeof(vi)));
        a2 = vi_xor(a2, vi_ld(c + i + 6 * sizeof(vi)));
        a3 = vi_xor(a3, vi_ld(c + i + 7 * sizeof(vi)));
    }
    for (; i + sizeof(vi) <= bytes; i += sizeof(vi))
        a0 = vi_xor(a0, vi_ld(c + i));
    return (float)vi_fold(vi_xor(vi_xor(a0, a1), vi_xor(a2, a3)));
}

static const kn_ops simd_ops = {
    .name = KN_OPS_NAME,
    .matmul = simd_matmul,
    .matmul_multi = simd_matmul_multi,
    .get_rows = kn_scalar_get_rows, /* one row per token: dequantising is not the cost */
    .rmsnorm = simd_rmsnorm,
    .rope = simd_rope,
    .silu_mul = simd_silu_mul,
    .add = simd_add,
    .attention = simd_attention,
    .kv_write = simd_kv_write,
    .kv_copy = kn_scalar_kv_copy,   /* a few rows per call: memcpy is the work */
    .silu_res = kn_scalar_silu_res, /* expf as the engine computed it, bit for bit */
    .argmax = simd_argmax,
    .topk = kn_scalar_topk,                   /* one compare per element already */
    .softmax_stats = kn_scalar_softmax_stats, /* double exp/log: the definition */
    .gather = kn_scalar_gather,
};

const kn_impl KN_IMPL = {&simd_ops, simd_read_stream};
