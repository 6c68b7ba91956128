/* kernels/cpu internal: the ctx and pool internals shared by the scalar,
 * AVX2 and AVX-512 files, the buffer-function table a ctx points to, and
 * each op's argument check (kn_check_*, the one place where an op's
 * arguments are validated; every table calls it first). Never included from
 * another module.
 *
 * Fan-out model: an op calls kn_run(ctx, job, arg, work); job(arg, ith, nth)
 * runs once for each share ith of nth (nth = the pool's threads), each on
 * whichever thread claims it first (the calling thread included), and
 * kn_run returns when all have finished. A share's output range and its
 * scratch (indexed by ith) depend only on ith and nth, never on the thread
 * that runs it, so the output does not depend on scheduling. Jobs split
 * their work into contiguous ranges with kn_split so that shares never
 * write the same cache line of the output; jobs that hand out chunks from
 * an atomic counter of their own ignore ith (except for scratch). When
 * `work` (bytes the op reads, roughly) is below the ctx's fan-out threshold
 * the job runs as job(arg, 0, 1) on the calling thread. */
#ifndef GORGON_KN_INT_H
#define GORGON_KN_INT_H

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "kernels/kn.h"

#define KN_CACHELINE 64
#define KN_MULTI_MAX 4 /* largest n of matmul_multi (kn.h); one fused job takes them all */
#define KN_MAX_THREADS 256

typedef void (*kn_job_fn)(void *arg, int ith, int nth);

/* One variant's implementation: its op table and its streaming-read kernel
 * (kn_measure_read_bandwidth uses the widest loads the variant has). */
typedef struct kn_impl {
    const kn_ops *ops;
    /* Reads bytes (multiple of 256, 64-byte aligned) and returns a value that
     * depends on all of them so the loads cannot be elided. */
    float (*read_stream)(const void *p, size_t bytes);
} kn_impl;

extern const kn_impl kn_impl_scalar;
extern const kn_impl kn_impl_avx2;
extern const kn_impl kn_impl_avx512;

/* The AVX-512 file's packed Q8_0 layout (kn_tensor_pack): *out = an
 * aligned_alloc'd copy, or NULL when w has no packed form; -ENOMEM. */
int kn_avx512_pack(const kn_tensor *w, void **out);

/* Run every share of job and wait (see top of file). KN_WORK_ALWAYS: fan
 * out whatever the size (the caller has judged it). */
#define KN_WORK_ALWAYS INT64_MAX
void kn_run(kn_ctx *ctx, kn_job_fn job, void *arg, int64_t work);

/* kn_run's `work` of a matmul: the n weights (each read once) and x. */
static inline int64_t kn_mm_work(int n, const kn_tensor *const *w, int64_t M)
{
    int64_t b = M * w[0]->cols * (int64_t)sizeof(float);
    for (int t = 0; t < n; t++)
        b += w[t]->rows * (int64_t)kn_row_bytes(w[t]->type, w[t]->cols);
    return b;
}

/* kn_run's `work` of attention: K and V rows seen by every query head. */
static inline int64_t kn_attn_work(const kn_attn_args *a)
{
    return a->n_q * a->n_head * (a->n_past + a->n_q) * a->head_dim * 2 * (int64_t)sizeof(float);
}
int kn_nthreads(const kn_ctx *ctx);

/* Scratch owned by the ctx, valid until the next kn_scratch call on it.
 * `which` picks one of a few independent buffers (KN_SCRATCH_*). Only the
 * thread that calls ops may call this (before fanning out); it grows the
 * buffer on demand and returns NULL when memory is short, in which case the
 * caller takes a path that needs no scratch. Buffers are 64-byte aligned. */
enum { KN_SCRATCH_ACT = 0, KN_SCRATCH_PANEL = 1, KN_SCRATCH_COUNT = 2 };
void *kn_scratch(kn_ctx *ctx, int which, size_t bytes);

/* Contiguous share [lo, hi) of n items for thread ith of nth, rounded to
 * multiples of `align` items (except the last share) so that neighbouring
 * threads' outputs never share a cache line. */
static inline void kn_split(int64_t n, int ith, int nth, int64_t align, int64_t *lo,
                            int64_t *hi)
{
    int64_t units = (n + align - 1) / align;
    int64_t per = units / nth, rem = units % nth;
    int64_t u0 = ith * per + (ith < rem ? ith : rem);
    int64_t u1 = u0 + per + (ith < rem ? 1 : 0);
    int64_t a = u0 * align, b = u1 * align;
    *lo = a < n ? a : n;
    *hi = b < n ? b : n;
}

/* Attention scratch per thread, beyond the score row: the SIMD tiled path's
 * transposed query tile, output tile and packed K and V tiles (4 buffers of
 * head_dim x 16 floats for head_dim <= KN_ATT_HD_MAX). */
#define KN_ATT_HD_MAX 256
#define KN_ATT_TILE_FLOATS (4 * KN_ATT_HD_MAX * 16)

/* ggml block layouts. */
typedef struct kn_block_q8_0 {
    uint16_t d; /* f16 scale */
    int8_t qs[KN_QK];
} kn_block_q8_0;
typedef struct kn_block_q4_0 {
    uint16_t d; /* f16 scale */
    uint8_t qs[KN_QK / 2];
} kn_block_q4_0;
_Static_assert(sizeof(kn_block_q8_0) == 34, "ggml q8_0 block is 34 bytes");
_Static_assert(sizeof(kn_block_q4_0) == 18, "ggml q4_0 block is 18 bytes");

/* Activations quantised for the integer-dot GEMM: one f32 scale per block
 * (f32, not f16, so the activation side adds no rounding of its own beyond
 * the int8 step) and the block's element sum (cancels the +128 weight bias). */
typedef struct kn_block_q8_x {
    float d;
    int32_t sum;
    int8_t qs[KN_QK];
} kn_block_q8_x;

/* Scalar helpers shared by every variant (tails, get_rows, reference). */
float kn_scalar_dot_f32(const float *a, const float *b, int64_t n);

/* ---- buffers --------------------------------------------------------------
 * A backend's buffer functions; the ctx points at its backend's table and
 * kn_buf_* (kn_buf.c) validate the arguments (kn.h) before calling in, so an
 * implementation sees ctx != NULL, bytes > 0, n > 0 and non-NULL pointers. */
typedef struct kn_buf_impl {
    int host_memory; /* kn_ctx_host_memory */
    int (*alloc)(kn_ctx *ctx, size_t bytes, void **out);
    void (*free)(kn_ctx *ctx, void *p);
    int (*upload)(kn_ctx *ctx, void *dst, const void *src, size_t n);
    int (*download)(kn_ctx *ctx, void *dst, const void *src, size_t n);
    int (*copy)(kn_ctx *ctx, void *dst, const void *src, size_t n);
    int (*sync)(kn_ctx *ctx);
} kn_buf_impl;

extern const kn_buf_impl kn_buf_cpu;
const kn_buf_impl *kn_ctx_buf(const kn_ctx *ctx);

/* The CUDA backend (kernels/cuda/kn_cuda_ops.c, in builds with
 * GORGON_CUDA): its op and buffer tables, and a device ctx's state. */
struct kn_cuda;
extern const kn_impl kn_impl_cuda;
extern const kn_buf_impl kn_buf_cuda;
struct kn_cuda *kn_ctx_cuda(const kn_ctx *ctx);

/* ---- row fan-out ------------------------------------------------------------
 * fn(arg, m0, m1) over rows [0, M): on the calling thread unless fan_out
 * (the caller's judgement that the work pays for a pool round trip), else
 * one contiguous share per pool thread, shares multiples of `align` rows so
 * that neighbours' outputs do not share a cache line. A row is never split,
 * so per-row results do not depend on the thread count. */
typedef void (*kn_rows_fn)(void *arg, int64_t m0, int64_t m1);
void kn_run_rows(kn_ctx *ctx, int64_t M, int64_t align, bool fan_out, kn_rows_fn fn, void *arg);

/* ---- argument checks --------------------------------------------------------
 * One per op, called first by every table's implementation: 0, or -EINVAL
 * before anything is written (kn.h: invalid arguments leave every output
 * untouched). Only what the caller passes by value or in host memory is
 * checked; indices inside backend buffers are the caller's responsibility. */

static inline bool kn_weight_ok(const kn_tensor *w)
{
    return w && w->data && w->rows > 0 && w->cols > 0 && kn_row_bytes(w->type, w->cols) != 0;
}

static inline int kn_check_matmul(const kn_ctx *ctx, const kn_tensor *w, const float *x,
                                  int64_t M, const float *y)
{
    return ctx && kn_weight_ok(w) && x && y && M > 0 ? 0 : -EINVAL;
}

static inline int kn_check_matmul_multi(const kn_ctx *ctx, int n, const kn_tensor *const *w,
                                        const float *x, int64_t M, float *const *y)
{
    if (!ctx || n < 1 || n > KN_MULTI_MAX || !w || !y || !x || M <= 0)
        return -EINVAL;
    for (int i = 0; i < n; i++)
        if (!kn_weight_ok(w[i]) || !y[i])
            return -EINVAL;
    return 0;
}

static inline int kn_check_get_rows(const kn_ctx *ctx, const kn_tensor *w, const int32_t *ids,
                                    int64_t n, const float *out)
{
    return ctx && kn_weight_ok(w) && ids && out && n > 0 ? 0 : -EINVAL;
}

static inline int kn_check_rmsnorm(const kn_ctx *ctx, const float *x, const float *g, int64_t M,
                                   int64_t n, const float *out)
{
    return ctx && x && g && out && M > 0 && n > 0 ? 0 : -EINVAL;
}

static inline int kn_check_rope(const kn_ctx *ctx, const float *x, int64_t M, int n_heads,
                                int head_dim, int rope_dims, const int32_t *pos)
{
    return ctx && x && pos && M > 0 && n_heads > 0 && head_dim > 0 && rope_dims > 0 &&
                   rope_dims % 2 == 0 && rope_dims <= head_dim
               ? 0
               : -EINVAL;
}

/* silu_mul and add */
static inline int kn_check_ew(const kn_ctx *ctx, const float *y, const float *x, int64_t n)
{
    return ctx && y && x && n > 0 ? 0 : -EINVAL;
}

static inline int kn_check_attention(const kn_ctx *ctx, const kn_attn_args *a)
{
    return ctx && a && a->q && a->out && a->k_pool && a->v_pool && a->block_table &&
                   a->scratch && a->n_q > 0 && a->n_past >= 0 && a->n_head > 0 &&
                   a->n_kv_head > 0 && a->head_dim > 0 && a->n_head % a->n_kv_head == 0 &&
                   a->block_size > 0
               ? 0
               : -EINVAL;
}

static inline int kn_check_kv_write(const kn_ctx *ctx, const float *k_pool, const float *v_pool,
                                    int64_t row_floats, const int32_t *slots, int64_t n,
                                    const float *k, const float *v)
{
    return ctx && k_pool && v_pool && slots && k && v && row_floats > 0 && n > 0 ? 0 : -EINVAL;
}

/* src and dst are host lists: every row is checked to lie inside a plane
 * (O(n); the ordering rule of kn.h stays the caller's, as it costs O(n^2)). */
static inline int kn_check_kv_copy(const kn_ctx *ctx, const float *pool, int64_t n_planes,
                                   int64_t plane_floats, int64_t row_floats, const int32_t *src,
                                   const int32_t *dst, int64_t n)
{
    if (!ctx || !pool || !src || !dst || n_planes <= 0 || plane_floats <= 0 || row_floats <= 0 ||
        row_floats > plane_floats || n <= 0)
        return -EINVAL;
    const int64_t rows = plane_floats / row_floats;
    for (int64_t i = 0; i < n; i++)
        if (src[i] < 0 || src[i] >= rows || dst[i] < 0 || dst[i] >= rows)
            return -EINVAL;
    return 0;
}

static inline int kn_check_silu_res(const kn_ctx *ctx, const float *x, const float *z,
                                    int64_t M, int64_t n_heads, int64_t n, const float *out)
{
    return ctx && x && z && out && M > 0 && n_heads > 0 && n > 0 ? 0 : -EINVAL;
}

/* argmax; ids are int32, so a row may not be longer than INT32_MAX */
static inline int kn_check_argmax(const kn_ctx *ctx, const float *x, int64_t M, int64_t n,
                                  const int32_t *ids)
{
    return ctx && x && ids && M > 0 && n > 0 && n <= INT32_MAX ? 0 : -EINVAL;
}

static inline int kn_check_topk(const kn_ctx *ctx, const float *x, int64_t M, int64_t n, int k,
                                const int32_t *ids)
{
    return ctx && x && ids && M > 0 && n > 0 && n <= INT32_MAX && k >= 1 && k <= KN_TOPK_MAX &&
                   k <= n
               ? 0
               : -EINVAL;
}

/* !(T > 0) also rejects a NaN temperature */
static inline int kn_check_softmax_stats(const kn_ctx *ctx, const float *x, int64_t M,
                                         int64_t n, float temperature, const float *out)
{
    return ctx && x && out && M > 0 && n > 0 && temperature > 0.0f ? 0 : -EINVAL;
}

static inline int kn_check_gather(const kn_ctx *ctx, const float *x, const int64_t *idx,
                                  int64_t n, const float *out)
{
    return ctx && x && idx && out && n > 0 ? 0 : -EINVAL;
}

/* The scalar ops (the reference table's entries), for variants that have
 * nothing better for an op or a case. Each validates its arguments. */
int kn_scalar_matmul(kn_ctx *ctx, const kn_tensor *w, const float *x, int64_t M, float *y);
int kn_scalar_get_rows(kn_ctx *ctx, const kn_tensor *w, const int32_t *ids, int64_t n,
                       float *out);
int kn_scalar_rmsnorm(kn_ctx *ctx, const float *x, const float *g, int64_t M, int64_t n,
                      float eps, float *out);
int kn_scalar_rope(kn_ctx *ctx, float *x, int64_t M, int n_heads, int head_dim, int rope_dims,
                   const int32_t *pos, float base);
int kn_scalar_silu_mul(kn_ctx *ctx, float *gate, const float *up, int64_t n);
int kn_scalar_add(kn_ctx *ctx, float *y, const float *x, int64_t n);
int kn_scalar_attention(kn_ctx *ctx, const kn_attn_args *a);
int kn_scalar_kv_write(kn_ctx *ctx, float *k_pool, float *v_pool, int64_t row_floats,
                       const int32_t *slots, int64_t n, const float *k, const float *v);
int kn_scalar_kv_copy(kn_ctx *ctx, float *pool, int64_t n_planes, int64_t plane_floats,
                      int64_t row_floats, const int32_t *src, const int32_t *dst, int64_t n);
int kn_scalar_silu_res(kn_ctx *ctx, const float *x, const float *z, const float *b, int64_t M,
                       int64_t n_heads, int64_t n, float *out);
int kn_scalar_argmax(kn_ctx *ctx, const float *x, int64_t M, int64_t n, int32_t *ids);
int kn_scalar_topk(kn_ctx *ctx, const float *x, int64_t M, int64_t n, int k, float *vals,
                   int32_t *ids);
int kn_scalar_softmax_stats(kn_ctx *ctx, const float *x, int64_t M, int64_t n,
                            float temperature, float *out);
int kn_scalar_gather(kn_ctx *ctx, const float *x, const int64_t *idx, int64_t n, float *out);

#endif
