/* kernels — the backend: a kn_ctx (the backend object), its buffers and its
 * op table (kn_ops). The engine's forward pass, KV cache, Medusa step and the
 * worker's sampling touch tensor data only through these: buffers are
 * allocated, uploaded, downloaded and copied with kn_buf_*, and everything
 * else is an op. One table per backend/variant: the scalar CPU table is the
 * reference every other implementation (AVX2, AVX-512, the CUDA backend) is
 * tested against.
 *
 * Position in the request path: workers call the engine, the engine calls
 * these ops for every layer of every step. Ops are hot: they allocate nothing,
 * log nothing and take no locks (scratch comes from the caller or from the
 * context, sized at setup).
 *
 * Memory. Every pointer to tensor data that an op takes (weights' data,
 * activations, the KV pool, ids, masks, outputs) is a *backend address*: a
 * pointer into memory from kn_buf_alloc, or any memory the backend declares
 * its own (kn_ctx_host_memory: on the CPU every host pointer qualifies, which
 * is how mapped model files and caller-provided shared-memory KV pools are
 * used without a copy). A caller reads results only through
 * kn_buf_download; on the CPU that is a memcpy, on a GPU a device-to-host
 * copy. Arguments documented as "host" (small index lists) are read during
 * the call.
 *
 * Ordering. Ops and buffer calls on one ctx run in the order they are
 * issued; a backend may run them asynchronously (a GPU stream). Only
 * kn_buf_download and kn_sync wait for earlier work, so a decode step that
 * issues ops and downloads just its token ids synchronises once (and a CUDA
 * backend can capture it as one graph). On the CPU every call is complete
 * when it returns.
 *
 * Threading: a kn_ctx owns a persistent thread pool (created once; no thread
 * creation per op). Ops on one ctx are called from one thread at a time; they
 * fan out internally over the pool and return when all work is done. An op
 * is cut into n_threads shares that whichever thread is free claims (the
 * calling thread included), so a pool thread that is asleep or preempted
 * delays nothing it has not started; which thread runs a share never
 * changes the result. Ops that read fewer than fanout_min_bytes run on the
 * calling thread alone. Pool threads poll for ~tens of microseconds after
 * an op, then sleep on a futex; they do not poll at all when the pool's
 * threads plus the process's registered spinners exceed the CPUs it may use
 * (cm_cpus_usable: affinity and cgroup quota), nor for a while after a poll
 * was preempted. n_threads = 1 runs everything on the calling thread with
 * no synchronisation.
 *
 * Scratch: matmul uses ctx-owned scratch (quantised activations, weight
 * panels) that grows on first use of a larger M and is kept; run one
 * warm-up step at the largest batch to make later steps allocation-free. If
 * memory is short the op falls back to a slower path that needs none.
 *
 * Errors: every op and buffer call returns 0 or -errno. Invalid arguments
 * (a NULL ctx or pointer, non-positive sizes (an empty call is the caller's
 * to skip), a row length that is not a whole number
 * of blocks, n_head % n_kv_head != 0, k outside 1..KN_TOPK_MAX) give -EINVAL
 * and leave every output untouched; nothing is logged on this path.
 * Out-of-range indices inside backend buffers (block tables, KV slots) are
 * the caller's responsibility: checking them would mean reading device
 * memory.
 *
 *   kn_ctx *ctx;
 *   kn_ctx_create(&ctx, &(kn_ctx_cfg){.n_threads = 2, .variant = KN_VARIANT_AUTO});
 *   const kn_ops *ops = kn_ctx_ops(ctx);
 *   float *x, *y;                      // backend buffers
 *   kn_buf_alloc(ctx, M * W.cols * sizeof(float), (void **)&x);
 *   kn_buf_alloc(ctx, M * W.rows * sizeof(float), (void **)&y);
 *   kn_buf_upload(ctx, x, host_x, M * W.cols * sizeof(float));
 *   ops->matmul(ctx, &W, x, M, y);     // y[M][W.rows] = x[M][W.cols] · Wᵀ
 *   kn_buf_download(ctx, host_y, y, M * W.rows * sizeof(float));
 *   kn_buf_free(ctx, x); kn_buf_free(ctx, y); kn_ctx_destroy(ctx);
 *
 * Layouts (GGUF convention): a weight used as y = W·x with x of length n_in
 * is stored as n_out rows of n_in contiguous elements; quantised types are
 * stored in blocks of 32 along a row (n_in % 32 == 0 for Q8_0/Q4_0).
 */
#ifndef GORGON_KN_H
#define GORGON_KN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" { /* the CUDA backend's .cu files are C++ */
#endif

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

/* A read-only 2-D weight: rows × cols, row-major; `data` is a backend
 * address that outlives the tensor (on the CPU: the mmapped model file or
 * any caller-owned memory).
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
    int n_threads;             /* <= 0: kn_threads_auto() */
    /* Ops that read fewer bytes than this run on the calling thread (a
     * pool round trip costs a few microseconds, more when a thread must be
     * woken). 0: KN_FANOUT_MIN_BYTES, or $GORGON_FANOUT_MIN_BYTES when set;
     * < 0: every op fans out (tests of the parallel paths). */
    int64_t fanout_min_bytes;
    enum kn_variant variant;   /* AUTO picks the best supported */
    const int *cpus;           /* optional: pin pool thread i to cpus[i] (n_threads entries);
                                * thread 0 is the thread calling kn_ctx_create, which is
                                * pinned there and then (it must be the one calling ops) */
    /* Which device runs the ops: NULL, "" or "cpu": this CPU (the fields
     * above apply); "cuda" or "cuda:N": CUDA device N (default 0), in a
     * build with the CUDA backend (kernels/cuda/); n_threads, variant and
     * cpus are then ignored (one stream; the calling thread issues). */
    const char *device;
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
 * fine). Every pointer is a backend address. Out-of-range block_table
 * entries are the caller's responsibility. A query that sees no position at
 * all gets a zero output row. */
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

#define KN_TOPK_MAX 64 /* largest k of the topk op */

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
    int (*matmul)(kn_ctx *ctx, const kn_tensor *w, const float *x, int64_t M, float *y);

    /* out[i][:] = dequant(W row ids[i]) for i < n (embedding lookup, and,
     * with an F32 view of an activation matrix as W, gathering rows of it);
     * an id outside [0, W->rows) yields a zero row rather than an
     * out-of-bounds read. ids: [n] backend. */
    int (*get_rows)(kn_ctx *ctx, const kn_tensor *w, const int32_t *ids, int64_t n,
                    float *out);

    /* out[m][i] = x[m][i] / sqrt(mean_i(x[m]^2) + eps) * g[i]; in-place allowed. */
    int (*rmsnorm)(kn_ctx *ctx, const float *x, const float *g, int64_t M, int64_t n,
                   float eps, float *out);

    /* In place over x[m][n_heads][head_dim]: rotate adjacent pairs (2i, 2i+1)
     * for 2i < rope_dims by theta = pos[m] * base^(-2i/rope_dims).
     * rope_dims must be even and <= head_dim. */
    int (*rope)(kn_ctx *ctx, float *x, int64_t M, int n_heads, int head_dim, int rope_dims,
                const int32_t *pos, float base);

    /* gate[i] = silu(gate[i]) * up[i] for i < n (SwiGLU). */
    int (*silu_mul)(kn_ctx *ctx, float *gate, const float *up, int64_t n);

    /* y[i] += x[i] for i < n (residual). */
    int (*add)(kn_ctx *ctx, float *y, const float *x, int64_t n);

    /* See kn_attn_args. A query's output does not depend, bit for bit, on
     * the other queries of the call (only on its cache and mask row). A
     * masked query's output equals, bit for bit, that of the same query
     * unmasked (n_q 1) over its visible keys stored contiguously in the same
     * order: a Medusa tree node (parents at lower slots than children) gets
     * what decoding its token alone gives. */
    int (*attention)(kn_ctx *ctx, const kn_attn_args *a);

    /* (optional: NULL means call matmul n times) matmul(w[i], x, M, y[i])
     * for i < n (1 <= n <= 4), same results; weights of one type and width
     * that share x (Wq/Wk/Wv, W_gate/W_up) run as one pool job at small M.
     * An invalid argument in any slot gives -EINVAL and touches no y. */
    int (*matmul_multi)(kn_ctx *ctx, int n, const kn_tensor *const *w, const float *x,
                        int64_t M, float *const *y);

    /* Write new K/V rows into a paged pool (vLLM's slot mapping): for i < n,
     * k_pool[slots[i]][:] = k[i][:] and v_pool[slots[i]][:] = v[i][:], rows
     * of row_floats floats (n_kv_head * head_dim). A negative slot skips the
     * row (padding); the others must be distinct. slots: [n] backend; slot s
     * of a sequence's position p is block_table[p / block_size] * block_size
     * + p % block_size. */
    int (*kv_write)(kn_ctx *ctx, float *k_pool, float *v_pool, int64_t row_floats,
                    const int32_t *slots, int64_t n, const float *k, const float *v);

    /* Copy pool rows within every plane of a pool: for each plane
     * p < n_planes (a layer's K or V, plane_floats apart) and i < n,
     * row dst[i] = row src[i] (rows of row_floats floats). No destination
     * may equal another, nor a later source (dst[i] != src[j] for j > i);
     * then the result is as if every source were read before any write.
     * src, dst: [n] host (Medusa KV compaction, the prefill → decode
     * hand-off). */
    int (*kv_copy)(kn_ctx *ctx, float *pool, int64_t n_planes, int64_t plane_floats,
                   int64_t row_floats, const int32_t *src, const int32_t *dst, int64_t n);

    /* The Medusa ResBlock's activation for n_heads heads at once:
     *   out[h][m][i] = x[m][i] + silu(z[m][h*n + i] + b[h*n + i])
     * for h < n_heads, m < M, i < n; x: [M][n], z: [M][n_heads*n] (W_cat x),
     * b: [n_heads*n] (optional: NULL is zero), out: [n_heads][M][n],
     * head-major so that each head's rows are contiguous for its projection. */
    int (*silu_res)(kn_ctx *ctx, const float *x, const float *z, const float *b, int64_t M,
                    int64_t n_heads, int64_t n, float *out);

    /* ids[m] = the index of the largest x[m][i], i < n; ties: the lowest
     * index (NaNs are never chosen over a number that precedes them).
     * x: [M][n], ids: [M] backend. */
    int (*argmax)(kn_ctx *ctx, const float *x, int64_t M, int64_t n, int32_t *ids);

    /* The k largest of each row, best first; ties: lower index first.
     * vals: [M][k] (optional: NULL), ids: [M][k]; 1 <= k <= min(n, KN_TOPK_MAX). */
    int (*topk)(kn_ctx *ctx, const float *x, int64_t M, int64_t n, int k, float *vals,
                int32_t *ids);

    /* What sampling and typical acceptance need of a softmax, per row of
     * x / T (temperature T > 0), computed in double as x * (1.0 / T):
     *   out[m][0] = max_i x[m][i] / T
     *   out[m][1] = log sum_i exp(x[m][i] / T)          (so p_i = exp(x_i/T - out[1]))
     *   out[m][2] = -sum_i p_i log(p_i + 1e-5)           (Medusa's entropy)
     * x: [M][n], out: [M][3]. */
    int (*softmax_stats)(kn_ctx *ctx, const float *x, int64_t M, int64_t n,
                         float temperature, float *out);

    /* out[i] = x[idx[i]] for i < n (single values: the logits of given
     * tokens at given rows). idx: [n] backend, each >= 0 (the caller's
     * responsibility: within x). */
    int (*gather)(kn_ctx *ctx, const float *x, const int64_t *idx, int64_t n, float *out);
} kn_ops;

/* Below this many bytes of work an op runs on the calling thread. A pool
 * round trip costs ~1 us while the threads poll and 5-50 us when one must
 * be woken and scheduled; 256 KiB of weights take ~20 us to stream on one
 * core. stories260K, whose ops are all smaller, decodes at the one-thread
 * speed with --threads 2 at this threshold and at half of it when every op
 * fans out (docs/benchmarks.md, 2026-12-05); the 110m model's matmuls
 * (>= 600 KiB each) all fan out. */
#define KN_FANOUT_MIN_BYTES (256 * 1024)

/* The thread count that n_threads <= 0 picks: the CPUs this process may
 * use (cm_cpus_usable), at most KN_AUTO_THREADS_MAX (decode is memory-bound
 * and stops scaling long before that). */
#define KN_AUTO_THREADS_MAX 32
int kn_threads_auto(void);

int kn_ctx_create(kn_ctx **out, const kn_ctx_cfg *cfg);
void kn_ctx_destroy(kn_ctx *ctx);
const kn_ops *kn_ctx_ops(const kn_ctx *ctx);
enum kn_variant kn_ctx_variant(const kn_ctx *ctx); /* KN_VARIANT_AUTO on a device ctx */
int kn_ctx_threads(const kn_ctx *ctx);
/* 1 when host memory is backend memory (the CPU backend): a caller may then
 * pass host arrays and mapped files to ops directly. */
int kn_ctx_host_memory(const kn_ctx *ctx);

/* ---- buffers ------------------------------------------------------------
 * kn_buf_alloc: *out = a zeroed backend allocation of `bytes` (> 0), 64-byte
 * aligned; on the CPU, allocations of 4 MiB and more are 2 MiB aligned and
 * advised for transparent huge pages (KV pools, activations of big
 * batches). -EINVAL, -ENOMEM (*out NULL). kn_buf_free(ctx, NULL) is a no-op;
 * p must come from kn_buf_alloc on the same ctx.
 * upload: host src -> backend dst; download: backend src -> host dst (waits
 * for every earlier op on ctx); copy: backend -> backend, overlapping
 * regions are -EINVAL. n == 0 is a no-op; a NULL pointer (or ctx) with
 * n > 0 is -EINVAL.
 * kn_sync waits until every op issued on ctx has finished (a no-op on the
 * CPU, where each call completes before it returns). */
int kn_buf_alloc(kn_ctx *ctx, size_t bytes, void **out);
void kn_buf_free(kn_ctx *ctx, void *p);
int kn_buf_upload(kn_ctx *ctx, void *dst, const void *src, size_t n);
int kn_buf_download(kn_ctx *ctx, void *dst, const void *src, size_t n);
int kn_buf_copy(kn_ctx *ctx, void *dst, const void *src, size_t n);
int kn_sync(kn_ctx *ctx);

/* ---- devices --------------------------------------------------------------
 * kn_device_parse: *cuda_index = -1 for the CPU (NULL, "", "cpu"), N for
 * "cuda" (0) or "cuda:N"; -EINVAL for anything else.
 * kn_cuda_device_count: the CUDA devices this process can use (> 0), or
 * 0 / -errno with the reason written to why (cap bytes, may be NULL):
 * -EOPNOTSUPP when this build has no CUDA backend, -ENODEV when there is
 * no driver or no device. Never crashes without a driver or GPU.
 * kn_ctx_create with a CUDA device that cannot be used fails with that
 * code and logs the reason.
 * kn_ctx_device: "cpu" or e.g. "cuda:0 (NVIDIA H200)".
 * kn_ctx_mem_info: free and total bytes of the device's memory
 * (-EOPNOTSUPP on the CPU).
 * kn_ctx_error: the message of the last failed op or buffer call on a
 * device ctx ("" when none; on the CPU always ""): a CUDA error names the
 * kernel and the CUDA error string. Such an error is sticky: every later
 * call on the ctx returns -EIO (the ctx must be destroyed). */
int kn_device_parse(const char *s, int *cuda_index);
int kn_cuda_device_count(char *why, size_t cap);
const char *kn_ctx_device(const kn_ctx *ctx);
int kn_ctx_mem_info(kn_ctx *ctx, size_t *free_bytes, size_t *total_bytes);
const char *kn_ctx_error(const kn_ctx *ctx);

/* Give a weight to ctx's ops. On the CPU this is kn_tensor_pack (w->data
 * stays the caller's). On a device: w->data is uploaded into a new backend
 * buffer that replaces it (the host data is no longer read), and w->packed
 * may get a device copy in the layout the backend's matmul streams best.
 * kn_tensor_release(ctx, w) frees what kn_tensor_to_backend made (on the
 * CPU: kn_tensor_unpack); call it only for tensors made that way, before
 * ctx is destroyed. -ENOMEM (message in kn_ctx_error), -EINVAL. */
int kn_tensor_to_backend(kn_ctx *ctx, kn_tensor *w);
void kn_tensor_release(kn_ctx *ctx, kn_tensor *w);

/* Fill a backend buffer with n elements of dtype t, drawn uniformly in
 * [-amplitude, amplitude) from a counter-based generator keyed by seed, so
 * every backend writes the same values (up to the dtype's rounding):
 *   z = seed + (i + 1) * 0x9E3779B97F4A7C15            (element i, uint64)
 *   z = (z ^ z >> 30) * 0xBF58476D1CE4E5B9; z = (z ^ z >> 27) * 0x94D049BB133111EB;
 *   z ^= z >> 31                                         (splitmix64's mix)
 *   v = ((float)(z >> 40) * 0x1p-24f * 2.0f - 1.0f) * amplitude
 * then stored as t (F16/BF16 round to nearest even; Q8_0/Q4_0 quantise each
 * block of 32 with kn_quantize_row's rounding; n % 32 == 0 for those).
 * Synthetic weights for shapes that have no file (gorgon-bench
 * --synthetic). p is a backend address of at least kn_row_bytes(t, n). */
int kn_buf_fill_random(kn_ctx *ctx, void *p, enum kn_dtype t, int64_t n, uint64_t seed,
                       float amplitude);

/* The op table of a given variant (NULL when unsupported on this CPU); lets
 * tests run every variant against the scalar reference on one ctx. */
const kn_ops *kn_ops_for(enum kn_variant v);

/* Run fn(arg, i) for i in [0, n) across the ctx's pool (calling thread
 * included) and wait. CPU backend only: for host-side work of tools (the
 * Medusa trainer), never for tensor data of the forward pass. Indices are handed
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

/* Memory read bandwidth of ctx's memory: on the CPU the fastest
 * multi-threaded streaming read over `bytes` (choose well above the
 * last-level cache), on a device a streaming-read kernel over device
 * memory (HBM); best of `reps`. Returns bytes/s (<= 0 on failure). */
double kn_measure_read_bandwidth(kn_ctx *ctx, size_t bytes, int reps);

/* The backend's best throughput for the GEMM of matmul with M rows of
 * activations and an N x K weight of dtype t (F16/BF16/F32): on a device,
 * cuBLASLt's fastest algorithm for that shape over device buffers it
 * allocates; best of reps. Returns FLOP/s (2*M*N*K per call), -EOPNOTSUPP
 * on the CPU, or another -errno. */
double kn_measure_gemm_peak(kn_ctx *ctx, enum kn_dtype t, int64_t M, int64_t N, int64_t K,
                            int reps);

#ifdef __cplusplus
}
#endif

#endif
