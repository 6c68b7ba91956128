/* kernels — the backend op table (kn_ops) that the engine's forward pass runs
 * on. One table per backend/variant: the scalar CPU table is the reference
 * every other implementation (AVX2, AVX-512, later CUDA) is tested against.
 *
 * Position in the request path: workers call the engine, the engine calls
 * these ops for every layer of every step. Ops are hot: they allocate nothing,
 * log nothing and take no locks (scratch comes from the caller or from the
 * context, sized at setup).
 *
 * Threading: a kn_ctx owns a persistent thread pool (created once; no thread
 * creation per op). Ops on one ctx are called from one thread at a time; they
 * fan out internally over the pool and return when all work is done. Pool
 * threads poll for ~tens of microseconds after an op, then sleep on a futex
 * (no polling at all when n_threads exceeds the online CPUs); n_threads = 1
 * runs everything on the calling thread with no synchronisation.
 *
 * Scratch: matmul uses ctx-owned scratch (quantised activations, weight
 * panels) that grows on first use of a larger M and is kept; run one
 * warm-up step at the largest batch to make later steps allocation-free. If
 * memory is short the op falls back to a slower path that needs none.
 *
 * Invalid arguments (NULL pointers, non-positive sizes, a row length that is
 * not a whole number of blocks, n_head % n_kv_head != 0) make an op return
 * without touching its output; nothing is logged on this path.
 *
 *   kn_ctx *ctx;
 *   kn_ctx_create(&ctx, &(kn_ctx_cfg){.n_threads = 2, .variant = KN_VARIANT_AUTO});
 *   const kn_ops *ops = kn_ctx_ops(ctx);
 *   ops->matmul(ctx, &W, x, M, y);       // y[M][W.rows] = x[M][W.cols] · Wᵀ
 *   kn_ctx_destroy(ctx);
 *
 * Layouts (GGUF convention): a weight used as y = W·x with x of length n_in
 * is stored as n_out rows of n_in contiguous elements; quantised types are
 * stored in blocks of 32 along a row (n_in % 32 == 0 for Q8_0/Q4_0).
 */
#ifndef GORGON_KN_H
#define GORGON_KN_H

#include <stddef.h>
#include <stdint.h>

/* Values equal ggml's type ids so GGUF tensor types map directly. */
enum kn_dtype {
    KN_F32 = 0,
    KN_F16 = 1,
    KN_Q4_0 = 2,
    KN_Q8_0 = 8,
    KN_BF16 = 30,
};

#define KN_QK 32 /* elements per Q8_0 / Q4_0 block */

/* Bytes of one row of n elements of dtype t; 0 for an unknown type or when n
 * is not a multiple of the block size. */
size_t kn_row_bytes(enum kn_dtype t, int64_t n);
const char *kn_dtype_name(enum kn_dtype t);

/* A read-only 2-D weight: rows × cols, row-major, `data` points into the
 * mmapped model file (or any caller-owned memory that outlives the tensor).
 * `packed` is NULL or a copy of data made by kn_tensor_pack. */
typedef struct kn_tensor {
    const void *data;
    enum kn_dtype type;
    int64_t rows; /* n_out */
    int64_t cols; /* n_in (contiguous) */
    const void *packed;
} kn_tensor;

/* Give w a copy of its weights in the layout that this CPU's fastest matmul
 * streams best, made once (at model load) instead of per call. Today, on
 * AVX-512: Q8_0 (16-row panels, 4-byte groups of the rows interleaved,
 * VNNI), and F32/F16/BF16 of at least 256 columns and 96 rows (48-row
 * panels with k in residue order, in the weights' own type). Both are the
 * size of the data (plus a partial last panel). Other types, shapes and
 * CPUs, or GORGON_CPU_MAX below avx512, leave w unchanged. Only matmul reads the copy, and gives
 * bit for bit the results it gives without it; every other op (get_rows)
 * reads data. Returns 0 (packed or not) or -ENOMEM. The copy belongs to the
 * caller: kn_tensor_unpack frees it (and is a no-op on an unpacked tensor);
 * copies of the struct share it. */
int kn_tensor_pack(kn_tensor *w);
void kn_tensor_unpack(kn_tensor *w);

enum kn_variant {
    KN_VARIANT_AUTO = 0, /* best the CPU supports (cm_cpu()) */
    KN_VARIANT_SCALAR,
    KN_VARIANT_AVX2,
    KN_VARIANT_AVX512,
    KN_VARIANT_COUNT,
};
const char *kn_variant_name(enum kn_variant v);
/* Whether this CPU can run variant v (SCALAR: always). */
int kn_variant_supported(enum kn_variant v);

typedef struct kn_ctx kn_ctx;

typedef struct kn_ctx_cfg {
    int n_threads;             /* <= 0: number of online CPUs */
    enum kn_variant variant;   /* AUTO picks the best supported */
    const int *cpus;           /* optional: pin pool thread i to cpus[i] (n_threads entries);
                                * thread 0 is the thread calling kn_ctx_create, which is
                                * pinned there and then (it must be the one calling ops) */
} kn_ctx_cfg;

/* Paged attention over a KV cache.
 *
 * The KV pool of one layer is an array of blocks; block b holds, for
 * block_size consecutive positions, K then V... precisely:
 *   k_pool: [n_blocks][block_size][n_kv_head][head_dim] float
 *   v_pool: same shape
 * Position p of the sequence lives in block block_table[p / block_size] at
 * slot p % block_size.
 *
 * The n_q new tokens occupy positions n_past .. n_past + n_q - 1 in the
 * cache order (their K/V must already be written there). Query i attends to
 * every cached position < n_past, and to new token j (cache position
 * n_past + j) when mask == NULL ? j <= i : mask[i * n_q + j] != 0. (The
 * RoPE position of a new token is the caller's business: Medusa tree nodes
 * sit at cache slot n_past + j but have RoPE position n_past + depth.)
 *
 *   q:   [n_q][n_head][head_dim]
 *   out: [n_q][n_head][head_dim]
 * Query head h uses KV head h / (n_head / n_kv_head). Scores are scaled by
 * `scale` (normally 1/sqrt(head_dim)); softmax in float32.
 * `scratch` holds at least kn_attn_scratch_floats(n_past + n_q,
 * kn_ctx_threads(ctx)) floats (sizing it once for the largest context is
 * fine). Out-of-range block_table entries are the caller's responsibility.
 * A query that sees no position at all gets a zero output row. */
typedef struct kn_attn_args {
    const float *q;
    float *out;
    int64_t n_q;
    int64_t n_past;
    int n_head, n_kv_head, head_dim;
    const float *k_pool, *v_pool;
    const int32_t *block_table;
    int block_size;
    const uint8_t *mask; /* optional [n_q][n_q] */
    float scale;
    float *scratch;
} kn_attn_args;
size_t kn_attn_scratch_floats(int64_t n_ctx_max, int n_threads);

typedef struct kn_ops {
    const char *name;

    /* y[m][r] = sum_c W[r][c] * x[m][c] for m < M, r < W->rows.
     * x: [M][W->cols] float, y: [M][W->rows] float (no aliasing).
     * Quantised weights may quantise x internally into ctx scratch: the
     * AVX-512 table does so for Q8_0 (int8 activations per block of 32 with
     * an f32 scale, VNNI integer dots; error vs the scalar reference is that
     * of int8 activation rounding); every other case multiplies dequantised
     * weights by the float activations (the scalar definition).
     * Row m of y depends only on row m of x, bit for bit, whatever M
     * (continuous batching and Medusa verification rely on it). */
    void (*matmul)(kn_ctx *ctx, const kn_tensor *w, const float *x, int64_t M, float *y);

    /* out[i][:] = dequant(W row ids[i]) for i < n (embedding lookup); an id
     * outside [0, W->rows) yields a zero row rather than an out-of-bounds read. */
    void (*get_rows)(kn_ctx *ctx, const kn_tensor *w, const int32_t *ids, int64_t n,
                     float *out);

    /* out[m][i] = x[m][i] / sqrt(mean_i(x[m]^2) + eps) * g[i]; in-place allowed. */
    void (*rmsnorm)(kn_ctx *ctx, const float *x, const float *g, int64_t M, int64_t n,
                    float eps, float *out);

    /* In place over x[m][n_heads][head_dim]: rotate adjacent pairs (2i, 2i+1)
     * for 2i < rope_dims by theta = pos[m] * base^(-2i/rope_dims). */
    void (*rope)(kn_ctx *ctx, float *x, int64_t M, int n_heads, int head_dim, int rope_dims,
                 const int32_t *pos, float base);

    /* gate[i] = silu(gate[i]) * up[i] for i < n (SwiGLU). */
    void (*silu_mul)(kn_ctx *ctx, float *gate, const float *up, int64_t n);

    /* y[i] += x[i] for i < n (residual). */
    void (*add)(kn_ctx *ctx, float *y, const float *x, int64_t n);

    /* See kn_attn_args. A query's output does not depend, bit for bit, on
     * the other queries of the call (only on its cache and mask row). A
     * masked query's output equals, bit for bit, that of the same query
     * unmasked (n_q 1) over its visible keys stored contiguously in the same
     * order: a Medusa tree node (parents at lower slots than children) gets
     * what decoding its token alone gives. */
    void (*attention)(kn_ctx *ctx, const kn_attn_args *a);

    /* (optional: NULL means call matmul n times) matmul(w[i], x, M, y[i])
     * for i < n, same results; weights of one type and width that share x
     * (Wq/Wk/Wv, W_gate/W_up) run as one pool job at small M. An invalid
     * argument in any slot makes the op return without touching any y. */
    void (*matmul_multi)(kn_ctx *ctx, int n, const kn_tensor *const *w, const float *x,
                         int64_t M, float *const *y);
} kn_ops;

int kn_ctx_create(kn_ctx **out, const kn_ctx_cfg *cfg);
void kn_ctx_destroy(kn_ctx *ctx);
const kn_ops *kn_ctx_ops(const kn_ctx *ctx);
enum kn_variant kn_ctx_variant(const kn_ctx *ctx);
int kn_ctx_threads(const kn_ctx *ctx);

/* The op table of a given variant (NULL when unsupported on this CPU); lets
 * tests run every variant against the scalar reference on one ctx. */
const kn_ops *kn_ops_for(enum kn_variant v);

/* Run fn(arg, i) for i in [0, n) across the ctx's pool (calling thread
 * included) and wait. For the engine's own parallel loops. Indices are handed
 * out dynamically in small contiguous chunks; each runs exactly once. */
typedef void (*kn_task_fn)(void *arg, int64_t i);
void kn_parallel_for(kn_ctx *ctx, int64_t n, kn_task_fn fn, void *arg);

/* Conversions used by loaders, tests and tools. */
float kn_f16_to_f32(uint16_t h);
uint16_t kn_f32_to_f16(float f);
float kn_bf16_to_f32(uint16_t h);
uint16_t kn_f32_to_bf16(float f); /* round to nearest even */
/* Quantise n floats (n % 32 == 0) into dst in dtype t (F32/F16/BF16/Q8_0/Q4_0),
 * the ggml reference rounding. Returns bytes written or -EINVAL. */
int64_t kn_quantize_row(enum kn_dtype t, const float *src, int64_t n, void *dst);
/* Dequantise one row of n elements. */
void kn_dequantize_row(enum kn_dtype t, const void *src, int64_t n, float *dst);

/* Memory read bandwidth of this machine: the fastest multi-threaded streaming
 * read over `bytes` (choose well above the last-level cache), best of `reps`.
 * Returns bytes/s. */
double kn_measure_read_bandwidth(kn_ctx *ctx, size_t bytes, int reps);

#endif
