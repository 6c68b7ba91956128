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
 *   vi, vi_ld, vi_xor, vi_zero, vi_fold(v) (streaming read)
 *   KN_IMPL, KN_OPS_NAME            names of the exported impl and its ops
 *
 * Matmul strategy. M <= KN_MATVEC_MAX (decode, Medusa heads): each thread
 * streams a contiguous range of weight rows once and computes up to 4 dot
 * products per row, converting weights on the fly; memory bound by design.
 * Larger M (prefill, tree verification): weights are converted once per
 * KN_KC x KN_NR panel into an f32 [KC][NR] buffer that stays in L1 and is
 * reused by every KN_MR-row tile of x (broadcast-FMA outer products), so the
 * conversion cost is amortised over M rows. */

#include <math.h>
#include <stdatomic.h>
#include <stdbool.h>

#include "kernels/cpu/kn_int.h"

#define KN_AI __attribute__((always_inline)) static inline
#ifndef KN_NV
#define KN_NV 2 /* weight vectors per GEMM register tile row */
#endif
#define KN_NR (KN_NV * VL)
#ifndef KN_KC
#define KN_KC 256
#endif
#define KN_MATVEC_MAX 4
#define KN_PF 2048 /* matvec software prefetch distance, bytes */
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
    float *panels; /* GEMM: per-thread [KC][NR] f32 buffers */
    /* Work is handed out in chunks from this counter rather than split
     * statically: on a shared machine a preempted pool thread then costs
     * only its current chunk, not its whole share. Chunks are contiguous
     * and several cache lines of y wide, so threads never share a line. */
    int64_t chunk;
    atomic_llong next;
};

/* y[m][r] for MR (<= 4) rows of x and one weight row. Steps of 32 elements
 * so that a quantised block is one step; 32 / VL independent accumulators
 * per x row hide FMA latency. */
KN_AI void dot_rows(const void *wr, const float *x, int64_t K, float *y, int64_t ldy, const int MR,
                    const int type)
{
    enum { U = 32 / VL };
    vf acc[4][U];
    _Pragma("GCC unroll 16") for (int m = 0; m < MR; m++)
        _Pragma("GCC unroll 16") for (int u = 0; u < U; u++)
            acc[m][u] = vzero();
    /* Weight bytes per 32-element step; the software prefetch runs KN_PF
     * bytes ahead (into the next row at the end of this one: rows of a
     * thread's range are contiguous) so that DRAM latency is covered from
     * the first line of every call, before the hardware prefetcher ramps. */
    const int64_t sb = type == KN_F32   ? 128
                       : type == KN_Q8_0 ? 34
                       : type == KN_Q4_0 ? 18
                                         : 64;
    const char *pf = (const char *)wr + KN_PF;
    int64_t k = 0;
    if (MR == 1) {
        /* Decode: one x row leaves registers free for a second accumulator
         * set, which halves the FMA dependency chain per step (it, not
         * memory, bounded quantised rows, whose steps are only 18-34 bytes). */
        vf acc2[U];
        _Pragma("GCC unroll 16") for (int u = 0; u < U; u++)
            acc2[u] = vzero();
        for (; k + 64 <= K; k += 64, pf += 2 * sb) {
            __builtin_prefetch(pf);
            __builtin_prefetch(pf + 64);
            if (sb > 64) {
                __builtin_prefetch(pf + 128);
                __builtin_prefetch(pf + 192);
            }
            _Pragma("GCC unroll 16") for (int u = 0; u < U; u++) {
                acc[0][u] = vfma(wload(wr, k + u * VL, type), vld(x + k + u * VL), acc[0][u]);
                acc2[u] = vfma(wload(wr, k + 32 + u * VL, type), vld(x + k + 32 + u * VL),
                               acc2[u]);
            }
        }
        _Pragma("GCC unroll 16") for (int u = 0; u < U; u++)
            acc[0][u] = vadd(acc[0][u], acc2[u]);
    }
    for (; k + 32 <= K; k += 32, pf += sb) {
        __builtin_prefetch(pf);
        if (sb > 64)
            __builtin_prefetch(pf + 64);
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

KN_AI void matvec_range(const struct mm_args *a, int64_t lo, int64_t hi, const int type)
{
    const kn_tensor *w = a->w;
    const int64_t K = w->cols, N = w->rows;
    const size_t rb = kn_row_bytes(w->type, K);
    for (int64_t r = lo; r < hi; r++) {
        const char *wr = (const char *)w->data + (size_t)r * rb;
        int64_t m = 0;
        for (; m + 4 <= a->M; m += 4)
            dot_rows(wr, a->x + m * K, K, a->y + m * N + r, N, 4, type);
        switch (a->M - m) {
        case 3:
            dot_rows(wr, a->x + m * K, K, a->y + m * N + r, N, 3, type);
            break;
        case 2:
            dot_rows(wr, a->x + m * K, K, a->y + m * N + r, N, 2, type);
            break;
        case 1:
            dot_rows(wr, a->x + m * K, K, a->y + m * N + r, N, 1, type);
            break;
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
        const int64_t N = a->w->rows;                                                          \
        for (;;) {                                                                             \
            int64_t lo = atomic_fetch_add_explicit(&a->next, a->chunk, memory_order_relaxed);   \
            if (lo >= N)                                                                       \
                return;                                                                        \
            matvec_range(a, lo, lo + a->chunk < N ? lo + a->chunk : N, T);                     \
        }                                                                                      \
    }
KN_DEF_MATVEC(KN_F32, f32)
KN_DEF_MATVEC(KN_F16, f16)
KN_DEF_MATVEC(KN_BF16, bf16)
KN_DEF_MATVEC(KN_Q8_0, q8_0)
KN_DEF_MATVEC(KN_Q4_0, q4_0)

/* ---- GEMM (large M) ------------------------------------------------------ */

/* Convert rows [n0, n0+nn) x cols [k0, k0+kc) of W to f32 panel[k][NR]
 * (rows beyond nn are zero). */
KN_AI void pack_panel(const kn_tensor *w, int64_t n0, int nn, int64_t k0, int kc, float *panel,
                      const int type)
{
    const size_t rb = kn_row_bytes(w->type, w->cols);
    float tmp[KN_KC] __attribute__((aligned(64)));
    for (int j = 0; j < KN_NR; j++) {
        if (j >= nn) {
            for (int k = 0; k < kc; k++)
                panel[k * KN_NR + j] = 0.0f;
            continue;
        }
        const char *wr = (const char *)w->data + (size_t)(n0 + j) * rb;
        int k = 0;
        for (; k + VL <= kc; k += VL)
            vst(tmp + k, wload(wr, k0 + k, type));
        for (; k < kc; k++)
            tmp[k] = wscalar(wr, k0 + k, type);
        /* transpose into the panel: strided stores stay within 32 KB */
        for (k = 0; k < kc; k++)
            panel[k * KN_NR + j] = tmp[k];
    }
}

/* C[MR][NR] (+)= X[MR][kc] * panel[kc][NR]. X rows are x0 + m*ldx (rows of a
 * partial tile repeat the last valid row; their results are dropped). */
KN_AI void micro_kernel(const float *x0, int64_t ldx, int mr, const float *panel, int kc,
                        float *c, int64_t ldc, int nn, int accumulate)
{
    const float *xr[KN_MR];
    _Pragma("GCC unroll 16") for (int m = 0; m < KN_MR; m++)
        xr[m] = x0 + (m < mr ? m : mr - 1) * ldx;
    vf acc[KN_MR][KN_NV];
    _Pragma("GCC unroll 16") for (int m = 0; m < KN_MR; m++)
        _Pragma("GCC unroll 16") for (int v = 0; v < KN_NV; v++)
            acc[m][v] = vzero();
    for (int k = 0; k < kc; k++) {
        vf wv[KN_NV];
        _Pragma("GCC unroll 16") for (int v = 0; v < KN_NV; v++)
            wv[v] = vld(panel + k * KN_NR + v * VL);
        _Pragma("GCC unroll 16") for (int m = 0; m < KN_MR; m++) {
            vf b = vset1(xr[m][k]);
            _Pragma("GCC unroll 16") for (int v = 0; v < KN_NV; v++)
                acc[m][v] = vfma(b, wv[v], acc[m][v]);
        }
    }
    if (mr == KN_MR && nn == KN_NR) {
        _Pragma("GCC unroll 16") for (int m = 0; m < KN_MR; m++) {
            float *cm = c + m * ldc;
            _Pragma("GCC unroll 16") for (int v = 0; v < KN_NV; v++) {
                if (accumulate)
                    acc[m][v] = vadd(acc[m][v], vld(cm + v * VL));
                vst(cm + v * VL, acc[m][v]);
            }
        }
        return;
    }
    float tile[KN_NR] __attribute__((aligned(64)));
    for (int m = 0; m < mr; m++) {
        float *cm = c + m * ldc;
        _Pragma("GCC unroll 16") for (int v = 0; v < KN_NV; v++)
            vst(tile + v * VL, acc[m][v]);
        for (int j = 0; j < nn; j++)
            cm[j] = accumulate ? cm[j] + tile[j] : tile[j];
    }
}

KN_AI void gemm_job_t(void *p, int ith, int nth, const int type)
{
    (void)nth;
    struct mm_args *a = p;
    const kn_tensor *w = a->w;
    const int64_t K = w->cols, N = w->rows, M = a->M;
    float *panel = a->panels + (size_t)ith * KN_KC * KN_NR;
    const int64_t n_panels = (N + KN_NR - 1) / KN_NR;
    for (;;) {
        const int64_t pi = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed);
        if (pi >= n_panels)
            return;
        const int64_t n0 = pi * KN_NR;
        const int nn = (int)(N - n0 < KN_NR ? N - n0 : KN_NR);
        for (int64_t k0 = 0; k0 < K; k0 += KN_KC) {
            const int kc = (int)(K - k0 < KN_KC ? K - k0 : KN_KC);
            pack_panel(w, n0, nn, k0, kc, panel, type);
            for (int64_t m = 0; m < M; m += KN_MR) {
                const int mr = (int)(M - m < KN_MR ? M - m : KN_MR);
                micro_kernel(a->x + m * K + k0, K, mr, panel, kc, a->y + m * N + n0, N, nn,
                             k0 > 0);
            }
        }
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
/* Provided by the includer: integer-dot matvec for Q8_0 weights, M <= 4;
 * returns 0 when it ran, < 0 when it could not get scratch. */
static int q8_matvec(kn_ctx *ctx, const kn_tensor *w, const float *x, int64_t M, float *y);
#endif
#ifdef KN_HAVE_Q8_GEMM
/* Provided by the includer: integer-dot GEMM for Q8_0 weights; returns 0
 * when it ran, < 0 when it needs scratch it could not get. */
static int q8_gemm(kn_ctx *ctx, const kn_tensor *w, const float *x, int64_t M, float *y);
#endif

static void simd_matmul(kn_ctx *ctx, const kn_tensor *w, const float *x, int64_t M, float *y)
{
    if (!w || !w->data || !x || !y || M <= 0 || w->rows <= 0 || w->cols <= 0 ||
        kn_row_bytes(w->type, w->cols) == 0)
        return;
    struct mm_args a = {.w = w, .x = x, .M = M, .y = y};
    atomic_init(&a.next, 0);
    if (M <= KN_MATVEC_MAX) {
#ifdef KN_HAVE_Q8_MATVEC
        if (w->type == KN_Q8_0 && q8_matvec(ctx, w, x, M, y) == 0)
            return;
#endif
        /* ~8 chunks per thread, whole multiples of 16 rows (64 bytes of y) */
        a.chunk = (w->rows / ((int64_t)kn_nthreads(ctx) * 8) + 15) / 16 * 16;
        if (a.chunk < 16)
            a.chunk = 16;
        kn_job_fn job = NULL;
        switch (w->type) {
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
        kn_run(ctx, job, &a);
        return;
    }
#ifdef KN_HAVE_Q8_GEMM
    if (w->type == KN_Q8_0 && q8_gemm(ctx, w, x, M, y) == 0)
        return;
#endif
    a.panels = kn_scratch(ctx, KN_SCRATCH_PANEL,
                          (size_t)kn_nthreads(ctx) * KN_KC * KN_NR * sizeof(float));
    if (!a.panels) {
        kn_scalar_matmul(ctx, w, x, M, y);
        return;
    }
    kn_job_fn job = NULL;
    switch (w->type) {
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
    kn_run(ctx, job, &a);
}

/* ---- get_rows ------------------------------------------------------------ */

static void dequant_row(const void *row, int64_t K, int type, float *out)
{
    int64_t k = 0;
    switch (type) {
    case KN_F32:
        memcpy(out, row, (size_t)K * sizeof(float));
        return;
    case KN_F16:
        for (; k + VL <= K; k += VL)
            vst(out + k, wload(row, k, KN_F16));
        break;
    case KN_BF16:
        for (; k + VL <= K; k += VL)
            vst(out + k, wload(row, k, KN_BF16));
        break;
    case KN_Q8_0:
        for (; k + VL <= K; k += VL)
            vst(out + k, wload(row, k, KN_Q8_0));
        return;
    case KN_Q4_0:
        for (; k + VL <= K; k += VL)
            vst(out + k, wload(row, k, KN_Q4_0));
        return;
    default:
        return;
    }
    for (; k < K; k++)
        out[k] = type == KN_F16 ? _cvtsh_ss(((const uint16_t *)row)[k])
                                : kn_bf16_to_f32(((const uint16_t *)row)[k]);
}

static void simd_get_rows(kn_ctx *ctx, const kn_tensor *w, const int32_t *ids, int64_t n,
                          float *out)
{
    (void)ctx;
    if (!w || !w->data || !ids || !out || w->cols <= 0 || kn_row_bytes(w->type, w->cols) == 0)
        return;
    const size_t rb = kn_row_bytes(w->type, w->cols);
    for (int64_t i = 0; i < n; i++) {
        float *o = out + i * w->cols;
        if (ids[i] < 0 || ids[i] >= w->rows) {
            memset(o, 0, (size_t)w->cols * sizeof(float));
            continue;
        }
        dequant_row((const char *)w->data + (size_t)ids[i] * rb, w->cols, w->type, o);
    }
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

static void simd_rmsnorm(kn_ctx *ctx, const float *x, const float *g, int64_t M, int64_t n,
                         float eps, float *out)
{
    if (!x || !g || !out || M <= 0 || n <= 0)
        return;
    struct ew_args a = {.x = x, .g = g, .M = M, .n = n, .eps = eps, .out = out};
    if (M * n < KN_ELEM_PAR_MIN || M == 1)
        rmsnorm_rows(&a, 0, M);
    else
        kn_run(ctx, rmsnorm_job, &a);
}

static void silu_range(float *gate, const float *up, int64_t lo, int64_t hi)
{
    int64_t i = lo;
    for (; i + VL <= hi; i += VL) {
        vf gv = vld(gate + i);
        vf e = vexp(vsub(vzero(), gv));
        vst(gate + i, vmul(vdiv(gv, vadd(vset1(1.0f), e)), vld(up + i)));
    }
    for (; i < hi; i++)
        gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
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

static void simd_silu_mul(kn_ctx *ctx, float *gate, const float *up, int64_t n)
{
    if (!gate || !up || n <= 0)
        return;
    if (n < KN_ELEM_PAR_MIN) {
        silu_range(gate, up, 0, n);
        return;
    }
    struct ew_args a = {.y = gate, .x = up, .n = n};
    kn_run(ctx, silu_job, &a);
}

static void simd_add(kn_ctx *ctx, float *y, const float *x, int64_t n)
{
    if (!y || !x || n <= 0)
        return;
    if (n < KN_ELEM_PAR_MIN) {
        add_range(y, x, 0, n);
        return;
    }
    struct ew_args a = {.y = y, .x = x, .n = n};
    kn_run(ctx, add_job, &a);
}

#define KN_ROPE_MAX 1024

static void simd_rope(kn_ctx *ctx, float *x, int64_t M, int n_heads, int head_dim, int rope_dims,
                      const int32_t *pos, float base)
{
    if (!x || !pos || M <= 0 || n_heads <= 0 || head_dim <= 0)
        return;
    if (rope_dims > head_dim)
        rope_dims = head_dim;
    rope_dims &= ~1;
    if (rope_dims > KN_ROPE_MAX) {
        kn_scalar_rope(ctx, x, M, n_heads, head_dim, rope_dims, pos, base);
        return;
    }
    /* Per position, cos/sin tables laid out like the data ([c c], [-s s]) so
     * each vector rotates VL/2 pairs at once; the angles are computed exactly
     * as the scalar reference computes them. */
    float cs[KN_ROPE_MAX] __attribute__((aligned(64)));
    float sn[KN_ROPE_MAX] __attribute__((aligned(64)));
    for (int64_t m = 0; m < M; m++) {
        for (int i = 0; i < rope_dims; i += 2) {
            double theta = (double)pos[m] * pow((double)base, -(double)i / rope_dims);
            float c = (float)cos(theta), s = (float)sin(theta);
            cs[i] = cs[i + 1] = c;
            sn[i] = -s;
            sn[i + 1] = s;
        }
        for (int h = 0; h < n_heads; h++) {
            float *v = x + (m * n_heads + h) * (int64_t)head_dim;
            int i = 0;
            for (; i + VL <= rope_dims; i += VL) {
                vf d = vld(v + i);
                vst(v + i, vfma(vswap_pairs(d), vld(sn + i), vmul(d, vld(cs + i))));
            }
            for (; i < rope_dims; i += 2) {
                float a0 = v[i], b0 = v[i + 1];
                v[i] = a0 * cs[i] - b0 * sn[i + 1];
                v[i + 1] = a0 * sn[i + 1] + b0 * cs[i];
            }
        }
    }
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

struct attn_job_args {
    const kn_attn_args *a;
    int64_t stride;
};

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
 * visited: the causal future is never touched. */
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
    for (int64_t p0 = 0, b = 0; p0 < n_end; p0 += bs, b++) {
        const float *kr = kbase + (int64_t)a->block_table[b] * blk_stride;
        const int64_t pe = p0 + bs < n_end ? p0 + bs : n_end;
        for (int64_t p = p0; p < pe; p++, kr += row_stride) {
            if (mrow && p >= a->n_past && !mrow[p]) {
                sc[p] = -INFINITY;
                continue;
            }
            const float s = (wide ? vdot(q, kr, hd) : sdot(q, kr, hd)) * a->scale;
            sc[p] = s;
            mx = s > mx ? s : mx;
        }
    }
    for (int d = 0; d < hd; d++)
        o[d] = 0.0f;
    if (mx == -INFINITY)
        return;
    /* vexp clamps its input, so a masked slot (-inf) would come out as
     * exp(-87) > 0: masked slots are zeroed explicitly. */
    vf vs = vzero();
    const vf vmx = vset1(mx);
    int64_t p = 0;
    for (; p + VL <= n_end; p += VL) {
        vf s = vld(sc + p);
        vf e = vexp(vsub(s, vmx));
        e = vmask_ninf(s, e);
        vst(sc + p, e);
        vs = vadd(vs, e);
    }
    float sum = vhsum(vs);
    for (; p < n_end; p++) {
        sc[p] = sc[p] == -INFINITY ? 0.0f : expf(sc[p] - mx);
        sum += sc[p];
    }
    const float inv = 1.0f / sum;
    for (int64_t p0 = 0, b = 0; p0 < n_end; p0 += bs, b++) {
        const float *vr = vbase + (int64_t)a->block_table[b] * blk_stride;
        const int64_t pe = p0 + bs < n_end ? p0 + bs : n_end;
        for (int64_t pp = p0; pp < pe; pp++, vr += row_stride) {
            if (sc[pp] == 0.0f)
                continue;
            const float w = sc[pp] * inv;
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

static void attn_job(void *p, int ith, int nth)
{
    const struct attn_job_args *j = p;
    const kn_attn_args *a = j->a;
    int64_t lo, hi;
    kn_split(a->n_q * a->n_head, ith, nth, 1, &lo, &hi);
    for (int64_t t = lo; t < hi; t++)
        attn_task(a, t, a->scratch + ith * j->stride);
}

static void simd_attention(kn_ctx *ctx, const kn_attn_args *a)
{
    if (!a || a->n_q <= 0 || a->n_head <= 0 || a->n_kv_head <= 0 || a->head_dim <= 0 ||
        a->n_head % a->n_kv_head != 0 || a->block_size <= 0 || a->n_past < 0 || !a->scratch)
        return;
    struct attn_job_args j = {a, (a->n_past + a->n_q + 15) / 16 * 16 + 16};
    kn_run(ctx, attn_job, &j);
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
    .get_rows = simd_get_rows,
    .rmsnorm = simd_rmsnorm,
    .rope = simd_rope,
    .silu_mul = simd_silu_mul,
    .add = simd_add,
    .attention = simd_attention,
};

const kn_impl KN_IMPL = {&simd_ops, simd_read_stream};
