/* The CUDA backend's op and buffer tables. Every entry validates its
 * arguments with the same kn_check_* as the CPU tables (so a bad call is
 * -EINVAL with every output untouched on both), refuses work once the ctx
 * holds a sticky CUDA error (-EIO: a faulted context cannot be trusted, the
 * worker restarts), then hands over to the launchers in the .cu files. */
#include "kernels/cpu/kn_int.h"
#include "kernels/cuda/kn_cuda.h"

/* The ctx's device state once the call is known to be valid and the ctx
 * healthy; returns from the caller otherwise. */
#define CU_OR_RETURN(check)                                                                    \
    kn_cuda *cu;                                                                               \
    do {                                                                                       \
        int rc_ = (check);                                                                     \
        if (rc_ != 0)                                                                          \
            return rc_;                                                                        \
        cu = kn_ctx_cuda(ctx);                                                                 \
        if ((rc_ = kn_cuda_failed(cu)) != 0)                                                   \
            return rc_;                                                                        \
    } while (0)

static int cu_matmul(kn_ctx *ctx, const kn_tensor *w, const float *x, int64_t M, float *y)
{
    CU_OR_RETURN(kn_check_matmul(ctx, w, x, M, y));
    return kn_cuda_matmul(cu, w, x, M, y);
}

static int cu_matmul_multi(kn_ctx *ctx, int n, const kn_tensor *const *w, const float *x,
                           int64_t M, float *const *y)
{
    CU_OR_RETURN(kn_check_matmul_multi(ctx, n, w, x, M, y));
    return kn_cuda_matmul_multi(cu, n, w, x, M, y);
}

static int cu_get_rows(kn_ctx *ctx, const kn_tensor *w, const int32_t *ids, int64_t n,
                       float *out)
{
    CU_OR_RETURN(kn_check_get_rows(ctx, w, ids, n, out));
    return kn_cuda_get_rows(cu, w, ids, n, out);
}

static int cu_rmsnorm(kn_ctx *ctx, const float *x, const float *g, int64_t M, int64_t n,
                      float eps, float *out)
{
    CU_OR_RETURN(kn_check_rmsnorm(ctx, x, g, M, n, out));
    return kn_cuda_rmsnorm(cu, x, g, M, n, eps, out);
}

static int cu_rope(kn_ctx *ctx, float *x, int64_t M, int n_heads, int head_dim, int rope_dims,
                   const int32_t *pos, float base)
{
    CU_OR_RETURN(kn_check_rope(ctx, x, M, n_heads, head_dim, rope_dims, pos));
    return kn_cuda_rope(cu, x, M, n_heads, head_dim, rope_dims, pos, base);
}

static int cu_silu_mul(kn_ctx *ctx, float *gate, const float *up, int64_t n)
{
    CU_OR_RETURN(kn_check_ew(ctx, gate, up, n));
    return kn_cuda_silu_mul(cu, gate, up, n);
}

static int cu_add(kn_ctx *ctx, float *y, const float *x, int64_t n)
{
    CU_OR_RETURN(kn_check_ew(ctx, y, x, n));
    return kn_cuda_add(cu, y, x, n);
}

static int cu_attention(kn_ctx *ctx, const kn_attn_args *a)
{
    CU_OR_RETURN(kn_check_attention(ctx, a));
    return kn_cuda_attention(cu, a);
}

static int cu_kv_write(kn_ctx *ctx, float *k_pool, float *v_pool, int64_t row_floats,
                       const int32_t *slots, int64_t n, const float *k, const float *v)
{
    CU_OR_RETURN(kn_check_kv_write(ctx, k_pool, v_pool, row_floats, slots, n, k, v));
    return kn_cuda_kv_write(cu, k_pool, v_pool, row_floats, slots, n, k, v);
}

static int cu_kv_copy(kn_ctx *ctx, float *pool, int64_t n_planes, int64_t plane_floats,
                      int64_t row_floats, const int32_t *src, const int32_t *dst, int64_t n)
{
    CU_OR_RETURN(kn_check_kv_copy(ctx, pool, n_planes, plane_floats, row_floats, src, dst, n));
    return kn_cuda_kv_copy(cu, pool, n_planes, plane_floats, row_floats, src, dst, n);
}

static int cu_silu_res(kn_ctx *ctx, const float *x, const float *z, const float *b, int64_t M,
                       int64_t n_heads, int64_t n, float *out)
{
    CU_OR_RETURN(kn_check_silu_res(ctx, x, z, M, n_heads, n, out));
    return kn_cuda_silu_res(cu, x, z, b, M, n_heads, n, out);
}

static int cu_argmax(kn_ctx *ctx, const float *x, int64_t M, int64_t n, int32_t *ids)
{
    CU_OR_RETURN(kn_check_argmax(ctx, x, M, n, ids));
    return kn_cuda_argmax(cu, x, M, n, ids);
}

static int cu_topk(kn_ctx *ctx, const float *x, int64_t M, int64_t n, int k, float *vals,
                   int32_t *ids)
{
    CU_OR_RETURN(kn_check_topk(ctx, x, M, n, k, ids));
    return kn_cuda_topk(cu, x, M, n, k, vals, ids);
}

static int cu_softmax_stats(kn_ctx *ctx, const float *x, int64_t M, int64_t n,
                            float temperature, float *out)
{
    CU_OR_RETURN(kn_check_softmax_stats(ctx, x, M, n, temperature, out));
    return kn_cuda_softmax_stats(cu, x, M, n, temperature, out);
}

static int cu_gather(kn_ctx *ctx, const float *x, const int64_t *idx, int64_t n, float *out)
{
    CU_OR_RETURN(kn_check_gather(ctx, x, idx, n, out));
    return kn_cuda_gather(cu, x, idx, n, out);
}

static const kn_ops cuda_ops = {
    .name = "cuda",
    .matmul = cu_matmul,
    .get_rows = cu_get_rows,
    .rmsnorm = cu_rmsnorm,
    .rope = cu_rope,
    .silu_mul = cu_silu_mul,
    .add = cu_add,
    .attention = cu_attention,
    .matmul_multi = cu_matmul_multi,
    .kv_write = cu_kv_write,
    .kv_copy = cu_kv_copy,
    .silu_res = cu_silu_res,
    .argmax = cu_argmax,
    .topk = cu_topk,
    .softmax_stats = cu_softmax_stats,
    .gather = cu_gather,
};

/* read_stream is the CPU's streaming read; a device measures with its own
 * kernel (kn_cuda_read_bandwidth). */
const kn_impl kn_impl_cuda = {.ops = &cuda_ops, .read_stream = NULL};

/* ---- buffers (kn_buf.c has checked the arguments) ------------------------ */

static int cub_alloc(kn_ctx *ctx, size_t bytes, void **out)
{
    kn_cuda *cu = kn_ctx_cuda(ctx);
    int rc = kn_cuda_failed(cu);
    return rc ? rc : kn_cuda_alloc(cu, bytes, out);
}

static void cub_free(kn_ctx *ctx, void *p)
{
    kn_cuda_free(kn_ctx_cuda(ctx), p);
}

static int cub_upload(kn_ctx *ctx, void *dst, const void *src, size_t n)
{
    kn_cuda *cu = kn_ctx_cuda(ctx);
    int rc = kn_cuda_failed(cu);
    return rc ? rc : kn_cuda_upload(cu, dst, src, n);
}

static int cub_download(kn_ctx *ctx, void *dst, const void *src, size_t n)
{
    kn_cuda *cu = kn_ctx_cuda(ctx);
    int rc = kn_cuda_failed(cu);
    return rc ? rc : kn_cuda_download(cu, dst, src, n);
}

static int cub_copy(kn_ctx *ctx, void *dst, const void *src, size_t n)
{
    kn_cuda *cu = kn_ctx_cuda(ctx);
    int rc = kn_cuda_failed(cu);
    return rc ? rc : kn_cuda_copy(cu, dst, src, n);
}

static int cub_sync(kn_ctx *ctx)
{
    kn_cuda *cu = kn_ctx_cuda(ctx);
    int rc = kn_cuda_failed(cu);
    return rc ? rc : kn_cuda_sync(cu);
}

const kn_buf_impl kn_buf_cuda = {
    .host_memory = 0,
    .alloc = cub_alloc,
    .free = cub_free,
    .upload = cub_upload,
    .download = cub_download,
    .copy = cub_copy,
    .sync = cub_sync,
};
