/* kernels/cuda internal: the CUDA backend's pieces and how they meet.
 *
 *   kn_cuda_ops.c   (C)  the kn_ops table and the buffer table: validates
 *                        every call with kn_check_* (kernels/cpu/kn_int.h),
 *                        refuses every call once the ctx has a sticky error,
 *                        then calls the launchers below;
 *   kn_cuda_ctx.cu       device, stream, buffers, scratch, error state;
 *   kn_cuda_ew.cu        element-wise, row and sampling kernels, random
 *                        fill, the HBM streaming-read kernel;
 *   kn_cuda_attn.cu      paged attention (flash-decoding split over the
 *                        context for decode; tiled online softmax with the
 *                        tree mask for prefill and Medusa verification);
 *   kn_cuda_mm.cu        matmul: cuBLASLt (loaded with dlopen) for F16,
 *                        BF16 and F32 weights, dequantising GEMV kernels for
 *                        Q8_0/Q4_0 (and small-M F16/BF16), weight layouts.
 *
 * Launchers take the same arguments as the kn_ops entry they serve (already
 * validated), with the ctx replaced by its kn_cuda. Pointers are device
 * addresses unless kn.h says "host". They enqueue work on the ctx's stream
 * and return without waiting; each ends with `return kn_cuda_check(cu,
 * "name")`, which turns a launch error into the sticky -EIO whose message
 * names the kernel. Nothing here logs, and nothing allocates on the hot path
 * except scratch that grows on first use of a larger size.
 *
 * Usable from C (kn_cuda_ops.c, kernels/cpu/kn_ctx.c) and C++ (.cu). */
#ifndef GORGON_KN_CUDA_H
#define GORGON_KN_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/kn.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kn_cuda kn_cuda;

/* ---- kn_cuda_ctx.cu ------------------------------------------------------ */

/* Devices this process can use (> 0), or 0 / -ENODEV with the reason (the
 * CUDA runtime's error string: no driver, no device). */
int kn_cuda_count(char *why, size_t cap);
/* Open device `device` with one non-blocking stream; -ENODEV / -EINVAL /
 * -ENOMEM with the reason in why. */
int kn_cuda_open(int device, kn_cuda **out, char *why, size_t cap);
void kn_cuda_close(kn_cuda *cu); /* frees every module state and scratch */
const char *kn_cuda_name(const kn_cuda *cu); /* "cuda:0 (NVIDIA H200)" */
int kn_cuda_mem_info(kn_cuda *cu, size_t *free_bytes, size_t *total_bytes);
int kn_cuda_sm_count(const kn_cuda *cu);
int kn_cuda_cc(const kn_cuda *cu);       /* compute capability, e.g. 90 */
void *kn_cuda_stream(const kn_cuda *cu); /* the cudaStream_t */

/* Buffers (kn.h's kn_buf_* semantics): alloc is zeroed, 256-byte aligned. */
int kn_cuda_alloc(kn_cuda *cu, size_t bytes, void **out);
void kn_cuda_free(kn_cuda *cu, void *p);
int kn_cuda_upload(kn_cuda *cu, void *dst, const void *src, size_t n);
int kn_cuda_download(kn_cuda *cu, void *dst, const void *src, size_t n);
int kn_cuda_copy(kn_cuda *cu, void *dst, const void *src, size_t n);
int kn_cuda_sync(kn_cuda *cu);

/* Device scratch owned by the ctx, valid until the next call with the same
 * `which`; grows on demand (a larger size frees the old one after the
 * stream drains), NULL when device memory is short. */
enum { KN_CUDA_SCRATCH_ATTN = 0, KN_CUDA_SCRATCH_MM, KN_CUDA_SCRATCH_LIST, KN_CUDA_SCRATCH_EW,
       KN_CUDA_SCRATCH_COUNT };
void *kn_cuda_scratch(kn_cuda *cu, int which, size_t bytes);

/* Per-ctx state of a module (cuBLASLt handle, algorithm cache, ...):
 * created by the module on first use, freed by kn_cuda_close via fini. */
enum { KN_CUDA_MOD_MM = 0, KN_CUDA_MOD_ATTN, KN_CUDA_MOD_COUNT };
void *kn_cuda_module(kn_cuda *cu, int mod);
void kn_cuda_set_module(kn_cuda *cu, int mod, void *state, void (*fini)(kn_cuda *cu, void *state));

/* Errors. kn_cuda_check(cu, op): after enqueuing op's kernels, read
 * cudaGetLastError; on an error record "op: <CUDA error string>" as the
 * sticky error and return -EIO, else remember op as the last one issued
 * (an asynchronous fault found later by download/sync is reported as
 * "<CUDA error> (last kernel issued: op)") and return 0.
 * kn_cuda_fail(cu, rc, fmt, ...): record a message for a non-CUDA failure
 * (out of memory, cuBLASLt status) and return rc; -EIO-class failures
 * (rc == -EIO) become sticky, others (-ENOMEM) do not.
 * kn_cuda_failed: -EIO when an error is sticky, else 0.
 * kn_cuda_errmsg: the last message, "" when none. */
int kn_cuda_check(kn_cuda *cu, const char *op);
int kn_cuda_fail(kn_cuda *cu, int rc, const char *fmt, ...)
#ifdef __GNUC__
    __attribute__((format(printf, 3, 4)))
#endif
    ;
int kn_cuda_failed(const kn_cuda *cu);
const char *kn_cuda_errmsg(const kn_cuda *cu);

/* ---- kn_cuda_ew.cu ------------------------------------------------------- */

int kn_cuda_get_rows(kn_cuda *cu, const kn_tensor *w, const int32_t *ids, int64_t n, float *out);
int kn_cuda_rmsnorm(kn_cuda *cu, const float *x, const float *g, int64_t M, int64_t n, float eps,
                    float *out);
int kn_cuda_rope(kn_cuda *cu, float *x, int64_t M, int n_heads, int head_dim, int rope_dims,
                 const int32_t *pos, float base);
int kn_cuda_silu_mul(kn_cuda *cu, float *gate, const float *up, int64_t n);
int kn_cuda_add(kn_cuda *cu, float *y, const float *x, int64_t n);
int kn_cuda_kv_write(kn_cuda *cu, float *k_pool, float *v_pool, int64_t row_floats,
                     const int32_t *slots, int64_t n, const float *k, const float *v);
/* src, dst: host lists (validated) */
int kn_cuda_kv_copy(kn_cuda *cu, float *pool, int64_t n_planes, int64_t plane_floats,
                    int64_t row_floats, const int32_t *src, const int32_t *dst, int64_t n);
int kn_cuda_silu_res(kn_cuda *cu, const float *x, const float *z, const float *b, int64_t M,
                     int64_t n_heads, int64_t n, float *out);
int kn_cuda_argmax(kn_cuda *cu, const float *x, int64_t M, int64_t n, int32_t *ids);
int kn_cuda_topk(kn_cuda *cu, const float *x, int64_t M, int64_t n, int k, float *vals,
                 int32_t *ids);
int kn_cuda_softmax_stats(kn_cuda *cu, const float *x, int64_t M, int64_t n, float temperature,
                          float *out);
int kn_cuda_gather(kn_cuda *cu, const float *x, const int64_t *idx, int64_t n, float *out);
int kn_cuda_fill_random(kn_cuda *cu, void *p, enum kn_dtype t, int64_t n, uint64_t seed,
                        float amplitude);
/* bytes/s of a streaming read over `bytes` of device memory, best of reps */
double kn_cuda_read_bandwidth(kn_cuda *cu, size_t bytes, int reps);

/* ---- kn_cuda_attn.cu ----------------------------------------------------- */

int kn_cuda_attention(kn_cuda *cu, const kn_attn_args *a);

/* ---- kn_cuda_mm.cu ------------------------------------------------------- */

int kn_cuda_matmul(kn_cuda *cu, const kn_tensor *w, const float *x, int64_t M, float *y);
int kn_cuda_matmul_multi(kn_cuda *cu, int n, const kn_tensor *const *w, const float *x,
                         int64_t M, float *const *y);
/* At load, for a weight whose data is already in device memory: set
 * w->packed to a device copy in the layout matmul prefers (or leave it
 * NULL), and choose and cache what matmul needs for this weight's shape.
 * kn_cuda_weight_release frees w->packed. */
int kn_cuda_weight_prepare(kn_cuda *cu, kn_tensor *w);
void kn_cuda_weight_release(kn_cuda *cu, kn_tensor *w);
double kn_cuda_gemm_peak(kn_cuda *cu, enum kn_dtype t, int64_t M, int64_t N, int64_t K, int reps);

#ifdef __cplusplus
}
#endif

#endif
