/* kernels/cpu internal: the ctx and pool internals shared by the scalar,
 * AVX2 and AVX-512 files. Never included from another module.
 *
 * Fan-out model: an op calls kn_run(ctx, job, arg); job(arg, ith, nth) runs
 * once on each of the nth pool threads (ith 0 is the calling thread) and
 * kn_run returns when all have finished. Jobs split their work into
 * contiguous ranges with kn_split so that threads never write the same
 * cache line of the output. */
#ifndef GORGON_KN_INT_H
#define GORGON_KN_INT_H

#include <stdint.h>
#include <string.h>

#include "kernels/kn.h"

#define KN_CACHELINE 64
#define KN_MULTI_MAX 4 /* weights one fused matmul_multi job takes */
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

/* Run job on every pool thread and wait (see top of file). */
void kn_run(kn_ctx *ctx, kn_job_fn job, void *arg);
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

/* The scalar ops, for variants that have nothing better for a case. */
void kn_scalar_matmul(kn_ctx *ctx, const kn_tensor *w, const float *x, int64_t M, float *y);
void kn_scalar_get_rows(kn_ctx *ctx, const kn_tensor *w, const int32_t *ids, int64_t n,
                        float *out);
void kn_scalar_rmsnorm(kn_ctx *ctx, const float *x, const float *g, int64_t M, int64_t n,
                       float eps, float *out);
void kn_scalar_rope(kn_ctx *ctx, float *x, int64_t M, int n_heads, int head_dim, int rope_dims,
                    const int32_t *pos, float base);
void kn_scalar_silu_mul(kn_ctx *ctx, float *gate, const float *up, int64_t n);
void kn_scalar_add(kn_ctx *ctx, float *y, const float *x, int64_t n);
void kn_scalar_attention(kn_ctx *ctx, const kn_attn_args *a);

#endif
