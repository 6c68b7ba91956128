/* The CUDA backend's element-wise, row and sampling kernels, the random fill
 * and the HBM streaming-read kernel (kn_cuda.h lists them; kn.h and
 * kernels/cpu/kn_scalar.c define what each computes).
 *
 * Design choices (why):
 * - Match the scalar reference's arithmetic, not just its formula: every
 *   float operation that the reference rounds separately is written with
 *   the _rn intrinsics (nvcc would otherwise contract a*c - b*s into one
 *   FMA, which rounds once and gives different bits). Where the reference
 *   calls a libm function in float (expf in SiLU) we evaluate it in double
 *   and round once, which lands on the correctly rounded float that glibc's
 *   expf returns (CUDA's own expf is off by up to 2 ulp). These kernels are
 *   memory-bound, so the double math is hidden behind the loads.
 * - Reductions whose order differs from the reference (rmsnorm's sum of
 *   squares, softmax_stats) accumulate in double like the reference does,
 *   so the float results differ from it only when a double-level rounding
 *   difference crosses a float rounding boundary. Every reduction has a
 *   fixed shape (threads own fixed elements, fixed trees), so results are
 *   deterministic run to run.
 * - Selection ops (argmax, topk) compare values exactly like the reference
 *   (ties to the lower index, -0 == +0, the reference's NaN rules), so they
 *   are bit-exact. topk is a radix select on a 64-bit key (value in order-
 *   preserving bits, then the inverted index) that makes every key distinct
 *   and orders exactly like the reference; rows too long for one block are
 *   reduced in tiles of 4096 whose exact top-k are merged, which keeps
 *   decode (M = 1, n = 150k) spread over dozens of SMs. A row containing a
 *   NaN (whose reference result depends on insertion order) is handed to a
 *   single thread that runs the reference algorithm itself.
 * - softmax_stats runs max, sum and entropy as separate grid-wide passes
 *   (tiles of 2048 per block) because a row of 150k double exp/log on one
 *   SM would take ~100 us; each pass uses exactly the reference's per-
 *   element terms (x * (1/T) - max, then - lse), only the summation order
 *   differs.
 * - kv_copy copies in place without a temporary: the host splits the list
 *   into segments with no internal chain (no row writes a row an earlier
 *   row of the segment reads); kernels in one stream run in order, so
 *   segment by segment equals list order, which kn.h's rule makes equal to
 *   "all sources read first".
 * - Everything indexes with int64 and loops grid-stride: an embedding of
 *   150k x 4096 or a KV pool passes 2^31 elements.
 * - Nothing allocates except through kn_cuda_scratch (topk's and
 *   softmax_stats' partial results, kv_copy's device copy of its lists);
 *   read_bandwidth, a tool, allocates its own buffer. */
#include <cuda_runtime.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels/cuda/kn_cuda.h"

/* ggml block sizes (kernels/cpu/kn_int.h: kn_block_q8_0 / kn_block_q4_0) */
#define Q8_0_BYTES 34 /* f16 scale, 32 x int8 */
#define Q4_0_BYTES 18 /* f16 scale, 16 bytes of nibbles */

#define EW_THREADS 256
#define GRID_Y_MAX 65535

static cudaStream_t stream_of(kn_cuda *cu)
{
    return (cudaStream_t)kn_cuda_stream(cu);
}

/* Blocks for a grid-stride loop over `work` items handled `per_block` at a
 * time: enough to fill every SM many times over, never 0. */
static unsigned grid_for(kn_cuda *cu, int64_t work, int64_t per_block)
{
    int64_t b = (work + per_block - 1) / per_block;
    const int64_t cap = (int64_t)kn_cuda_sm_count(cu) * 16;
    if (b > cap)
        b = cap;
    return (unsigned)(b < 1 ? 1 : b);
}

static unsigned clamp_grid(int64_t n, int64_t cap)
{
    return (unsigned)(n < 1 ? 1 : n > cap ? cap : n);
}

static bool aligned16(const void *p)
{
    return ((uintptr_t)p & 15) == 0;
}

/* ---- conversions: kernels/cpu/kn_quant.c, bit for bit ---------------------- */

static __device__ __forceinline__ float f16_to_f32(uint32_t h)
{
    const uint32_t sign = (h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    const uint32_t man = h & 0x3ffu;
    if (exp == 0x1f) /* inf / nan: keep the payload, force quiet */
        return __uint_as_float(sign | 0x7f800000u | (man << 13) | (man ? 0x400000u : 0u));
    if (exp == 0) {
        if (man == 0)
            return __uint_as_float(sign);
        const float v = __fmul_rn((float)man, 0x1p-24f); /* exact */
        return sign ? -v : v;
    }
    return __uint_as_float(sign | ((exp + 112u) << 23) | (man << 13));
}

static __device__ __forceinline__ uint16_t f32_to_f16(float f)
{
    const uint32_t u = __float_as_uint(f);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) /* nan: keep it a nan */
        return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x1ffu));
    if (a >= 0x477ff000u) /* rounds to >= 65520: inf */
        return (uint16_t)(sign | 0x7c00u);
    if (a < 0x38800000u) { /* subnormal f16: round(|f| * 2^24), ties to even */
        const float v = __fmul_rn(__uint_as_float(a), 0x1p24f);
        return (uint16_t)(sign | (uint32_t)rintf(v));
    }
    uint32_t r = a - (112u << 23);
    r += 0xfffu + ((r >> 13) & 1u);
    return (uint16_t)(sign | (r >> 13));
}

static __device__ __forceinline__ uint16_t f32_to_bf16(float f)
{
    const uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) /* nan: force quiet */
        return (uint16_t)((u >> 16) | 64u);
    return (uint16_t)((u + (0x7fffu + ((u >> 16) & 1u))) >> 16);
}

/* silu(g) = g / (1 + expf(-g)) as the reference rounds it: expf correctly
 * rounded (via double), then one float add and one float divide. */
static __device__ __forceinline__ float silu_ref(float g)
{
    const float e = __double2float_rn(exp(-(double)g));
    return __fdiv_rn(g, __fadd_rn(1.0f, e));
}

/* ---- block reductions -------------------------------------------------------
 * Deterministic: a fixed shuffle tree per warp, then thread 0 folds the warp
 * results in warp order. `sh` holds NT/32 + 1 values; the leading barrier
 * lets a caller reuse `sh` in a loop. Every thread gets the result. */
struct op_sum_d {
    __device__ double operator()(double a, double b) const { return __dadd_rn(a, b); }
};
struct op_max_d {
    __device__ double operator()(double a, double b) const { return fmax(a, b); }
};

template <int NT, typename T, typename Op>
static __device__ __forceinline__ T block_reduce(T v, T *sh, Op op)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v = op(v, __shfl_down_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0)
        sh[warp] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        T t = sh[0];
        for (int w = 1; w < NT / 32; w++)
            t = op(t, sh[w]);
        sh[NT / 32] = t;
    }
    __syncthreads();
    return sh[NT / 32];
}

/* ---- get_rows ---------------------------------------------------------------- */

/* Element c of a row in the ggml layout. Quantised blocks are read byte by
 * byte: a Q8_0 block is 34 bytes, so wider loads would be misaligned. */
template <enum kn_dtype T>
static __device__ __forceinline__ float dequant(const uint8_t *row, int64_t c)
{
    if constexpr (T == KN_F32) {
        return ((const float *)row)[c];
    } else if constexpr (T == KN_F16) {
        return f16_to_f32(((const uint16_t *)row)[c]);
    } else if constexpr (T == KN_BF16) {
        return __uint_as_float((uint32_t)((const uint16_t *)row)[c] << 16);
    } else if constexpr (T == KN_Q8_0) {
        const uint8_t *b = row + (c >> 5) * Q8_0_BYTES;
        const float d = f16_to_f32((uint32_t)b[0] | ((uint32_t)b[1] << 8));
        return __fmul_rn((float)(int8_t)b[2 + (c & 31)], d);
    } else {
        const uint8_t *b = row + (c >> 5) * Q4_0_BYTES;
        const float d = f16_to_f32((uint32_t)b[0] | ((uint32_t)b[1] << 8));
        const int j = (int)(c & 31);
        const int q = j < 16 ? (b[2 + j] & 0x0f) : (b[2 + j - 16] >> 4);
        return __fmul_rn((float)(q - 8), d);
    }
}

/* x: columns, y: output rows (grid-stride both ways) */
template <enum kn_dtype T>
static __global__ void __launch_bounds__(EW_THREADS)
    get_rows_k(const uint8_t *w, size_t row_bytes, int64_t rows, int64_t cols, const int32_t *ids,
               int64_t n, float *out)
{
    const int64_t c0 = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t cstride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = blockIdx.y; i < n; i += gridDim.y) {
        const int32_t id = ids[i];
        float *o = out + i * cols;
        if (id < 0 || id >= rows) { /* kn.h: a zero row, no out-of-bounds read */
            for (int64_t c = c0; c < cols; c += cstride)
                o[c] = 0.0f;
            continue;
        }
        const uint8_t *r = w + (size_t)id * row_bytes;
        for (int64_t c = c0; c < cols; c += cstride)
            o[c] = dequant<T>(r, c);
    }
}

int kn_cuda_get_rows(kn_cuda *cu, const kn_tensor *w, const int32_t *ids, int64_t n, float *out)
{
    const int64_t cols = w->cols;
    /* kn_row_bytes: kn.h has no extern "C" block (kn_cuda.h includes it
     * outside its own), so from C++ its functions would link mangled */
    size_t rb;
    switch (w->type) {
    case KN_F32:
        rb = (size_t)cols * 4;
        break;
    case KN_F16:
    case KN_BF16:
        rb = (size_t)cols * 2;
        break;
    case KN_Q8_0:
        rb = (size_t)(cols / 32) * Q8_0_BYTES;
        break;
    case KN_Q4_0:
        rb = (size_t)(cols / 32) * Q4_0_BYTES;
        break;
    default:
        return kn_cuda_fail(cu, -EINVAL, "get_rows: unsupported weight type %d", (int)w->type);
    }
    const dim3 grid(clamp_grid((cols + EW_THREADS - 1) / EW_THREADS, 64), clamp_grid(n, GRID_Y_MAX));
    const uint8_t *d = (const uint8_t *)w->data;
    cudaStream_t st = stream_of(cu);
    switch (w->type) {
    case KN_F32:
        get_rows_k<KN_F32><<<grid, EW_THREADS, 0, st>>>(d, rb, w->rows, cols, ids, n, out);
        break;
    case KN_F16:
        get_rows_k<KN_F16><<<grid, EW_THREADS, 0, st>>>(d, rb, w->rows, cols, ids, n, out);
        break;
    case KN_BF16:
        get_rows_k<KN_BF16><<<grid, EW_THREADS, 0, st>>>(d, rb, w->rows, cols, ids, n, out);
        break;
    case KN_Q8_0:
        get_rows_k<KN_Q8_0><<<grid, EW_THREADS, 0, st>>>(d, rb, w->rows, cols, ids, n, out);
        break;
    case KN_Q4_0:
        get_rows_k<KN_Q4_0><<<grid, EW_THREADS, 0, st>>>(d, rb, w->rows, cols, ids, n, out);
        break;
    }
    return kn_cuda_check(cu, "get_rows");
}

/* ---- rmsnorm ----------------------------------------------------------------- */

#define RMS_THREADS 256

/* One block per row. In place (out == x) is safe: each thread rewrites only
 * the elements it read, after the reduction's barriers. */
static __global__ void __launch_bounds__(RMS_THREADS)
    rmsnorm_k(const float *x, const float *g, int64_t M, int64_t n, float eps, float *out)
{
    __shared__ double sh[RMS_THREADS / 32 + 1];
    for (int64_t m = blockIdx.x; m < M; m += gridDim.x) {
        const float *xm = x + m * n;
        float *om = out + m * n;
        /* (double)x * x is exact, so only the order of the additions
         * differs from the reference */
        double ss = 0.0;
        for (int64_t i = threadIdx.x; i < n; i += RMS_THREADS) {
            const double v = (double)xm[i];
            ss = __dadd_rn(ss, __dmul_rn(v, v));
        }
        ss = block_reduce<RMS_THREADS>(ss, sh, op_sum_d());
        const float mean = __double2float_rn(__ddiv_rn(ss, (double)n));
        const float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean, eps)));
        for (int64_t i = threadIdx.x; i < n; i += RMS_THREADS)
            om[i] = __fmul_rn(__fmul_rn(xm[i], inv), g[i]);
    }
}

int kn_cuda_rmsnorm(kn_cuda *cu, const float *x, const float *g, int64_t M, int64_t n, float eps,
                    float *out)
{
    rmsnorm_k<<<clamp_grid(M, (int64_t)1 << 20), RMS_THREADS, 0, stream_of(cu)>>>(x, g, M, n, eps,
                                                                                 out);
    return kn_cuda_check(cu, "rmsnorm");
}

/* ---- rope -------------------------------------------------------------------- */

#define ROPE_THREADS 256
#define ROPE_CHUNK 256 /* pairs whose cos/sin are staged in shared memory at once */

/* One block per token: the angles depend on (token, pair) only, so they
 * are computed once (in double, as the reference does) and applied to
 * every head. */
static __global__ void __launch_bounds__(ROPE_THREADS)
    rope_k(float *x, int64_t M, int n_heads, int head_dim, int rope_dims, const int32_t *pos,
           float base)
{
    __shared__ float cs[ROPE_CHUNK], sn[ROPE_CHUNK];
    const int half = rope_dims / 2;
    for (int64_t m = blockIdx.x; m < M; m += gridDim.x) {
        const double p = (double)pos[m];
        float *xm = x + m * n_heads * (int64_t)head_dim;
        for (int p0 = 0; p0 < half; p0 += ROPE_CHUNK) {
            const int np = half - p0 < ROPE_CHUNK ? half - p0 : ROPE_CHUNK;
            for (int t = threadIdx.x; t < np; t += ROPE_THREADS) {
                const int i = 2 * (p0 + t); /* the reference's element index */
                const double theta =
                    __dmul_rn(p, pow((double)base, __ddiv_rn(-(double)i, (double)rope_dims)));
                double s, c;
                sincos(theta, &s, &c);
                cs[t] = __double2float_rn(c);
                sn[t] = __double2float_rn(s);
            }
            __syncthreads();
            const int64_t total = (int64_t)n_heads * np;
            for (int64_t e = threadIdx.x; e < total; e += ROPE_THREADS) {
                const int h = (int)(e / np), t = (int)(e % np);
                float *v = xm + (int64_t)h * head_dim + 2 * (p0 + t);
                const float a = v[0], b = v[1], c = cs[t], s = sn[t];
                v[0] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
                v[1] = __fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c));
            }
            __syncthreads(); /* cs/sn are rewritten next */
        }
    }
}

int kn_cuda_rope(kn_cuda *cu, float *x, int64_t M, int n_heads, int head_dim, int rope_dims,
                 const int32_t *pos, float base)
{
    rope_k<<<clamp_grid(M, (int64_t)1 << 20), ROPE_THREADS, 0, stream_of(cu)>>>(
        x, M, n_heads, head_dim, rope_dims, pos, base);
    return kn_cuda_check(cu, "rope");
}

/* ---- silu_mul, add, gather ------------------------------------------------------ */

static __global__ void __launch_bounds__(EW_THREADS)
    silu_mul_k(float *gate, const float *up, int64_t n)
{
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        gate[i] = __fmul_rn(silu_ref(gate[i]), up[i]);
}

int kn_cuda_silu_mul(kn_cuda *cu, float *gate, const float *up, int64_t n)
{
    silu_mul_k<<<grid_for(cu, n, EW_THREADS), EW_THREADS, 0, stream_of(cu)>>>(gate, up, n);
    return kn_cuda_check(cu, "silu_mul");
}

/* VEC: both pointers 16-byte aligned; the n % 4 tail is done by the first
 * threads of the grid. */
template <bool VEC>
static __global__ void __launch_bounds__(EW_THREADS) add_k(float *y, const float *x, int64_t n)
{
    const int64_t t0 = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    if constexpr (VEC) {
        const int64_t n4 = n / 4;
        float4 *y4 = (float4 *)y;
        const float4 *x4 = (const float4 *)x;
        for (int64_t i = t0; i < n4; i += stride) {
            float4 a = y4[i];
            const float4 b = x4[i];
            a.x = __fadd_rn(a.x, b.x);
            a.y = __fadd_rn(a.y, b.y);
            a.z = __fadd_rn(a.z, b.z);
            a.w = __fadd_rn(a.w, b.w);
            y4[i] = a;
        }
        const int64_t i = n4 * 4 + t0;
        if (i < n)
            y[i] = __fadd_rn(y[i], x[i]);
    } else {
        for (int64_t i = t0; i < n; i += stride)
            y[i] = __fadd_rn(y[i], x[i]);
    }
}

int kn_cuda_add(kn_cuda *cu, float *y, const float *x, int64_t n)
{
    cudaStream_t st = stream_of(cu);
    if (aligned16(y) && aligned16(x))
        add_k<true><<<grid_for(cu, n / 4 + 1, EW_THREADS), EW_THREADS, 0, st>>>(y, x, n);
    else
        add_k<false><<<grid_for(cu, n, EW_THREADS), EW_THREADS, 0, st>>>(y, x, n);
    return kn_cuda_check(cu, "add");
}

static __global__ void __launch_bounds__(EW_THREADS)
    gather_k(const float *x, const int64_t *idx, int64_t n, float *out)
{
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        out[i] = x[idx[i]];
}

int kn_cuda_gather(kn_cuda *cu, const float *x, const int64_t *idx, int64_t n, float *out)
{
    gather_k<<<grid_for(cu, n, EW_THREADS), EW_THREADS, 0, stream_of(cu)>>>(x, idx, n, out);
    return kn_cuda_check(cu, "gather");
}

/* ---- silu_res ------------------------------------------------------------------ */

/* x: columns; y: output rows r = h * M + m (head-major, kn.h) */
static __global__ void __launch_bounds__(EW_THREADS)
    silu_res_k(const float *x, const float *z, const float *b, int64_t M, int64_t n_heads,
               int64_t n, float *out)
{
    const int64_t c0 = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t cstride = (int64_t)gridDim.x * blockDim.x;
    const int64_t rows = n_heads * M;
    for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
        const int64_t h = r / M, m = r - h * M;
        const float *xr = x + m * n;
        const float *zr = z + (m * n_heads + h) * n;
        const float *br = b ? b + h * n : nullptr;
        float *o = out + r * n;
        for (int64_t i = c0; i < n; i += cstride) {
            /* a NULL bias adds 0.0f (the reference: -0 becomes +0) */
            const float s = __fadd_rn(zr[i], br ? br[i] : 0.0f);
            o[i] = __fadd_rn(xr[i], silu_ref(s));
        }
    }
}

int kn_cuda_silu_res(kn_cuda *cu, const float *x, const float *z, const float *b, int64_t M,
                     int64_t n_heads, int64_t n, float *out)
{
    const dim3 grid(clamp_grid((n + EW_THREADS - 1) / EW_THREADS, 64),
                    clamp_grid(n_heads * M, GRID_Y_MAX));
    silu_res_k<<<grid, EW_THREADS, 0, stream_of(cu)>>>(x, z, b, M, n_heads, n, out);
    return kn_cuda_check(cu, "silu_res");
}

/* ---- KV pool --------------------------------------------------------------------- */

/* x: columns (in units of V), y: rows; a negative slot is padding */
template <typename V>
static __global__ void __launch_bounds__(EW_THREADS)
    kv_write_k(V *k_pool, V *v_pool, int64_t row_v, const int32_t *slots, int64_t n, const V *k,
               const V *v)
{
    const int64_t c0 = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t cstride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = blockIdx.y; i < n; i += gridDim.y) {
        const int32_t s = slots[i];
        if (s < 0)
            continue;
        V *kd = k_pool + (int64_t)s * row_v;
        V *vd = v_pool + (int64_t)s * row_v;
        const V *ks = k + i * row_v;
        const V *vs = v + i * row_v;
        for (int64_t c = c0; c < row_v; c += cstride) {
            kd[c] = ks[c];
            vd[c] = vs[c];
        }
    }
}

int kn_cuda_kv_write(kn_cuda *cu, float *k_pool, float *v_pool, int64_t row_floats,
                     const int32_t *slots, int64_t n, const float *k, const float *v)
{
    cudaStream_t st = stream_of(cu);
    const bool vec = row_floats % 4 == 0 && aligned16(k_pool) && aligned16(v_pool) &&
                     aligned16(k) && aligned16(v);
    const int64_t row_v = vec ? row_floats / 4 : row_floats;
    const dim3 grid(clamp_grid((row_v + EW_THREADS - 1) / EW_THREADS, 64),
                    clamp_grid(n, GRID_Y_MAX));
    if (vec)
        kv_write_k<float4><<<grid, EW_THREADS, 0, st>>>((float4 *)k_pool, (float4 *)v_pool, row_v,
                                                        slots, n, (const float4 *)k,
                                                        (const float4 *)v);
    else
        kv_write_k<float><<<grid, EW_THREADS, 0, st>>>(k_pool, v_pool, row_v, slots, n, k, v);
    return kn_cuda_check(cu, "kv_write");
}

/* Rows (plane p, entry i) over y; within a launch no row reads what
 * another writes (the host cut the list so). */
template <typename V>
static __global__ void __launch_bounds__(EW_THREADS)
    kv_copy_k(V *pool, int64_t n_planes, int64_t plane_v, int64_t row_v, const int32_t *src,
              const int32_t *dst, int64_t n)
{
    const int64_t c0 = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t cstride = (int64_t)gridDim.x * blockDim.x;
    const int64_t total = n * n_planes;
    for (int64_t r = blockIdx.y; r < total; r += gridDim.y) {
        const int64_t p = r / n, i = r - p * n;
        const int32_t s = src[i], d = dst[i];
        if (s == d)
            continue;
        const V *from = pool + p * plane_v + (int64_t)s * row_v;
        V *to = pool + p * plane_v + (int64_t)d * row_v;
        for (int64_t c = c0; c < row_v; c += cstride)
            to[c] = from[c];
    }
}

/* Segmenting kv_copy's list (host): a small open-addressing set of the
 * sources of the current segment. */
#define KVC_TABLE 1024   /* power of two */
#define KVC_SEG_MAX 512  /* rows per segment: keeps the table at most half full */

static unsigned kvc_slot(int32_t v)
{
    return ((uint32_t)v * 2654435761u) >> 22; /* 10 bits: KVC_TABLE */
}

static bool kvc_has(const int32_t *t, int32_t v)
{
    for (unsigned s = kvc_slot(v);; s = (s + 1) & (KVC_TABLE - 1)) {
        if (t[s] == v)
            return true;
        if (t[s] < 0)
            return false;
    }
}

static void kvc_insert(int32_t *t, int32_t v)
{
    for (unsigned s = kvc_slot(v);; s = (s + 1) & (KVC_TABLE - 1)) {
        if (t[s] == v)
            return;
        if (t[s] < 0) {
            t[s] = v;
            return;
        }
    }
}

static void kvc_launch(kn_cuda *cu, float *pool, int64_t n_planes, int64_t plane_floats,
                       int64_t row_floats, const int32_t *src, const int32_t *dst, int64_t n)
{
    cudaStream_t st = stream_of(cu);
    const bool vec = row_floats % 4 == 0 && plane_floats % 4 == 0 && aligned16(pool);
    const int64_t row_v = vec ? row_floats / 4 : row_floats;
    const dim3 grid(clamp_grid((row_v + EW_THREADS - 1) / EW_THREADS, 64),
                    clamp_grid(n * n_planes, GRID_Y_MAX));
    if (vec)
        kv_copy_k<float4><<<grid, EW_THREADS, 0, st>>>((float4 *)pool, n_planes, plane_floats / 4,
                                                       row_v, src, dst, n);
    else
        kv_copy_k<float><<<grid, EW_THREADS, 0, st>>>(pool, n_planes, plane_floats, row_v, src,
                                                      dst, n);
}

/* kn.h allows chains (dst[i] == src[j] for j < i: row i overwrites what
 * row j reads) but no destination that is a later source. A segment of the
 * list in which no row's destination is an earlier row's source has no
 * read/write conflict at all, so its rows can be copied in parallel; the
 * stream runs segments in order, which equals list order, which kn.h's rule
 * makes equal to reading every source first. The usual lists (Medusa
 * compaction, the prefill hand-off) are one segment per 512 rows. */
int kn_cuda_kv_copy(kn_cuda *cu, float *pool, int64_t n_planes, int64_t plane_floats,
                    int64_t row_floats, const int32_t *src, const int32_t *dst, int64_t n)
{
    const size_t list_bytes = (size_t)n * sizeof(int32_t);
    int32_t *d_src = (int32_t *)kn_cuda_scratch(cu, KN_CUDA_SCRATCH_LIST, 2 * list_bytes);
    if (!d_src)
        return kn_cuda_fail(cu, -ENOMEM, "kv_copy: no device memory for a list of %lld rows",
                            (long long)n);
    int32_t *d_dst = d_src + n;
    int rc = kn_cuda_upload(cu, d_src, src, list_bytes);
    if (rc == 0)
        rc = kn_cuda_upload(cu, d_dst, dst, list_bytes);
    if (rc != 0)
        return rc;

    int32_t table[KVC_TABLE];
    memset(table, 0xff, sizeof(table)); /* -1: empty (rows are >= 0) */
    int64_t seg0 = 0, seg_rows = 0;
    for (int64_t i = 0; i < n; i++) {
        if (src[i] == dst[i]) /* a no-op in the reference too */
            continue;
        if (seg_rows == KVC_SEG_MAX || kvc_has(table, dst[i])) {
            kvc_launch(cu, pool, n_planes, plane_floats, row_floats, d_src + seg0, d_dst + seg0,
                       i - seg0);
            seg0 = i;
            seg_rows = 0;
            memset(table, 0xff, sizeof(table));
        }
        kvc_insert(table, src[i]);
        seg_rows++;
    }
    if (seg_rows > 0)
        kvc_launch(cu, pool, n_planes, plane_floats, row_floats, d_src + seg0, d_dst + seg0,
                   n - seg0);
    return kn_cuda_check(cu, "kv_copy");
}

/* ---- argmax -------------------------------------------------------------------- */

#define AM_THREADS 1024

/* Whether (v, i) beats the current best (bv, bi), bi < 0 meaning none:
 * larger value, then lower index; NaNs never take part. */
static __device__ __forceinline__ void am_take(float v, int32_t i, float &bv, int32_t &bi)
{
    if (!isnan(v) && (bi < 0 || v > bv || (v == bv && i < bi))) {
        bv = v;
        bi = i;
    }
}

/* One block per row. The reference (a scan keeping the first strict
 * maximum) returns 0 when x[0] is NaN and otherwise the lowest index of the
 * largest non-NaN value (-0 == +0): exactly what the comparator above
 * reduces to, whatever the order in which it sees the elements. */
static __global__ void __launch_bounds__(AM_THREADS)
    argmax_k(const float *x, int64_t M, int64_t n, int32_t *ids)
{
    __shared__ float sv[AM_THREADS / 32];
    __shared__ int32_t si[AM_THREADS / 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int64_t m = blockIdx.x; m < M; m += gridDim.x) {
        const float *xm = x + m * n;
        float bv = 0.0f;
        int32_t bi = -1;
        /* scalar head up to 16-byte alignment, float4 body, scalar tail */
        int64_t head = (int64_t)((16 - ((uintptr_t)xm & 15)) & 15) / 4;
        if (head > n)
            head = n;
        if (threadIdx.x < head)
            am_take(xm[threadIdx.x], (int32_t)threadIdx.x, bv, bi);
        const int64_t nv = (n - head) / 4;
        const float4 *xv = (const float4 *)(xm + head);
#pragma unroll 4
        for (int64_t j = threadIdx.x; j < nv; j += AM_THREADS) {
            const float4 q = xv[j];
            const int32_t i0 = (int32_t)(head + 4 * j);
            am_take(q.x, i0, bv, bi);
            am_take(q.y, i0 + 1, bv, bi);
            am_take(q.z, i0 + 2, bv, bi);
            am_take(q.w, i0 + 3, bv, bi);
        }
        for (int64_t i = head + 4 * nv + threadIdx.x; i < n; i += AM_THREADS)
            am_take(xm[i], (int32_t)i, bv, bi);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_down_sync(0xffffffffu, bv, o);
            const int32_t oi = __shfl_down_sync(0xffffffffu, bi, o);
            if (oi >= 0)
                am_take(ov, oi, bv, bi);
        }
        if (lane == 0) {
            sv[warp] = bv;
            si[warp] = bi;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int w = 1; w < AM_THREADS / 32; w++)
                if (si[w] >= 0)
                    am_take(sv[w], si[w], bv, bi);
            ids[m] = isnan(xm[0]) || bi < 0 ? 0 : bi;
        }
        __syncthreads(); /* sv/si are rewritten for the next row */
    }
}

int kn_cuda_argmax(kn_cuda *cu, const float *x, int64_t M, int64_t n, int32_t *ids)
{
    argmax_k<<<clamp_grid(M, (int64_t)1 << 20), AM_THREADS, 0, stream_of(cu)>>>(x, M, n, ids);
    return kn_cuda_check(cu, "argmax");
}

/* ---- topk ---------------------------------------------------------------------- */

#define TK_THREADS 256 /* the radix scan below gives one bin to each thread */
#define TK_ITEMS 16
#define TK_TILE (TK_THREADS * TK_ITEMS)
#define TK_WARPS (TK_THREADS / 32)

/* A key per (value, index) whose unsigned order is the reference's order:
 * value first (order-preserving bits, -0 folded onto +0 because the
 * reference compares them equal), then the lower index. Every key is
 * distinct and nonzero; 0 marks an empty slot. */
static __device__ __forceinline__ uint64_t tk_key(float v, int32_t idx)
{
    uint32_t u = __float_as_uint(v);
    if ((u & 0x7fffffffu) == 0)
        u = 0;
    const uint32_t k32 = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((uint64_t)k32 << 32) | (uint64_t)(0xffffffffu - (uint32_t)idx);
}

static __device__ __forceinline__ int32_t tk_idx(uint64_t key)
{
    return (int32_t)(0xffffffffu - (uint32_t)key);
}

static __device__ __forceinline__ float tk_val(uint64_t key)
{
    const uint32_t k32 = (uint32_t)(key >> 32);
    return __uint_as_float((k32 & 0x80000000u) ? (k32 & 0x7fffffffu) : ~k32);
}

/* The reference itself (kn_scalar.c's topk_rows), for rows with a NaN,
 * whose result depends on the order of insertion. One thread; slow, but a
 * NaN logit means the model is already broken. */
static __device__ void tk_sequential(const float *x, int64_t n, int k, float *vals, int32_t *ids)
{
    float val[KN_TOPK_MAX];
    int32_t idx[KN_TOPK_MAX];
    int c = 0;
    for (int64_t i = 0; i < n; i++) {
        const float v = x[i];
        int j;
        if (c < k)
            j = c++;
        else if (v > val[k - 1])
            j = k - 1;
        else
            continue;
        while (j > 0 && val[j - 1] < v) {
            val[j] = val[j - 1];
            idx[j] = idx[j - 1];
            j--;
        }
        val[j] = v;
        idx[j] = (int32_t)i;
    }
    for (int j = 0; j < k; j++) {
        ids[j] = idx[j];
        if (vals)
            vals[j] = val[j];
    }
}

/* One block per (tile of TK_TILE inputs, row): the exact top-k of the tile.
 *   FROM_X: inputs are x[m][0..n) (index = position); else candidates
 *           cv/ci[m][0..n_in) of an earlier pass (ci < 0: empty).
 *   FINAL:  one tile per row; writes vals (values re-read from x, so a -0
 *           stays -0) and ids, k per row, best first. Else writes k
 *           candidates per tile to ov/oi[m][tile][k], best first, padded
 *           with empty ones.
 * NaN rows: the first pass flags them (nan_flags[m]), the final pass runs
 * the reference on them instead. */
template <bool FROM_X, bool FINAL>
static __global__ void __launch_bounds__(TK_THREADS)
    topk_k(const float *x, int64_t n, const float *cv, const int32_t *ci, int64_t n_in,
           int64_t M, int k, int *nan_flags, float *ov, int32_t *oi)
{
    __shared__ unsigned hist[TK_WARPS][256];
    __shared__ unsigned wsum[TK_WARPS];
    __shared__ unsigned s_bin, s_need, s_cnt;
    __shared__ int s_valid, s_sel;
    __shared__ uint64_t sel[KN_TOPK_MAX];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int64_t g = blockIdx.x, groups = gridDim.x;

    for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
        uint64_t key[TK_ITEMS];
        int nan_seen = 0, mine = 0;
#pragma unroll
        for (int j = 0; j < TK_ITEMS; j++) {
            const int64_t p = g * TK_TILE + j * TK_THREADS + tid;
            uint64_t kk = 0;
            if (p < n_in) {
                if constexpr (FROM_X) {
                    const float v = x[m * n + p];
                    nan_seen |= isnan(v) ? 1 : 0;
                    kk = tk_key(v, (int32_t)p);
                } else {
                    const int32_t id = ci[m * n_in + p];
                    if (id >= 0)
                        kk = tk_key(cv[m * n_in + p], id);
                }
            }
            key[j] = kk;
            mine += kk != 0;
        }
        if constexpr (FINAL) {
            int row_nan;
            if constexpr (FROM_X)
                row_nan = __syncthreads_or(nan_seen);
            else
                row_nan = nan_flags[m];
            if (row_nan) { /* uniform across the block */
                if (tid == 0)
                    tk_sequential(x + m * n, n, k, ov ? ov + m * k : nullptr, oi + m * k);
                continue;
            }
        } else if constexpr (FROM_X) {
            if (__syncthreads_or(nan_seen) && tid == 0)
                nan_flags[m] = 1;
        }

        if (tid == 0) {
            s_valid = 0;
            s_sel = 0;
        }
        __syncthreads();
        if (mine)
            atomicAdd(&s_valid, mine);
        __syncthreads();
        const int valid = s_valid;

        /* Radix select, most significant byte first: find the k-th largest
         * key T; then exactly k keys are >= T (keys are distinct). Each pass
         * histograms the keys that share the prefix found so far and picks
         * the bin holding the k-th; it stops early once that bin holds
         * exactly the keys still needed. Empty slots (key 0) may join the
         * histograms but never reach the top k (valid > k). */
        uint64_t thr = 1; /* valid <= k: take every valid key */
        if (valid > k) {
            uint64_t prefix = 0, mask = 0;
            unsigned need = (unsigned)k;
            for (int shift = 56; shift >= 0; shift -= 8) {
                for (int b = tid; b < TK_WARPS * 256; b += TK_THREADS)
                    (&hist[0][0])[b] = 0;
                __syncthreads();
#pragma unroll
                for (int j = 0; j < TK_ITEMS; j++)
                    if ((key[j] & mask) == prefix)
                        atomicAdd(&hist[warp][(unsigned)(key[j] >> shift) & 255u], 1u);
                __syncthreads();
                /* thread t owns bin 255 - t, so an inclusive scan over t
                 * counts the keys in this bin and every higher one */
                const unsigned bin = 255u - (unsigned)tid;
                unsigned c = 0;
#pragma unroll
                for (int w = 0; w < TK_WARPS; w++)
                    c += hist[w][bin];
                unsigned incl = c;
#pragma unroll
                for (int d = 1; d < 32; d <<= 1) {
                    const unsigned y = __shfl_up_sync(0xffffffffu, incl, d);
                    if (lane >= d)
                        incl += y;
                }
                if (lane == 31)
                    wsum[warp] = incl;
                __syncthreads();
                for (int w = 0; w < warp; w++)
                    incl += wsum[w];
                const unsigned excl = incl - c;
                if (excl < need && need <= incl) { /* exactly one thread */
                    s_bin = bin;
                    s_need = need - excl;
                    s_cnt = c;
                }
                __syncthreads();
                const unsigned b = s_bin, cnt = s_cnt;
                need = s_need;
                prefix |= (uint64_t)b << shift;
                mask |= (uint64_t)0xff << shift;
                __syncthreads(); /* s_*, wsum and hist are rewritten next pass */
                if (cnt == need)
                    break;
            }
            thr = prefix;
        }

#pragma unroll
        for (int j = 0; j < TK_ITEMS; j++)
            if (key[j] != 0 && key[j] >= thr) {
                const int s = atomicAdd(&s_sel, 1);
                if (s < KN_TOPK_MAX)
                    sel[s] = key[j];
            }
        __syncthreads();
        const int got = s_sel < KN_TOPK_MAX ? s_sel : KN_TOPK_MAX; /* == min(k, valid) */
        if (tid < got) {
            /* rank among the selected (distinct keys: a permutation) */
            const uint64_t mk = sel[tid];
            int rank = 0;
            for (int u = 0; u < got; u++)
                rank += sel[u] > mk;
            const int32_t idx = tk_idx(mk);
            if constexpr (FINAL) {
                oi[m * k + rank] = idx;
                if (ov)
                    ov[m * k + rank] = x[m * n + idx];
            } else {
                const int64_t o = (m * groups + g) * k + rank;
                oi[o] = idx;
                ov[o] = tk_val(mk);
            }
        } else if (!FINAL && tid < k) {
            const int64_t o = (m * groups + g) * k + tid;
            oi[o] = -1;
            ov[o] = 0.0f;
        }
        __syncthreads(); /* sel, s_valid and s_sel are reused for the next row */
    }
}

int kn_cuda_topk(kn_cuda *cu, const float *x, int64_t M, int64_t n, int k, float *vals,
                 int32_t *ids)
{
    cudaStream_t st = stream_of(cu);
    const unsigned gy = clamp_grid(M, GRID_Y_MAX);
    const int64_t groups = (n + TK_TILE - 1) / TK_TILE;
    if (groups == 1) {
        topk_k<true, true><<<dim3(1, gy), TK_THREADS, 0, st>>>(x, n, nullptr, nullptr, n, M, k,
                                                               nullptr, vals, ids);
        return kn_cuda_check(cu, "topk");
    }
    /* scratch: NaN flags [M], then two candidate buffers (value, index):
     * A for the first pass's groups * k per row, B for the second's; later
     * passes are smaller and alternate between them */
    const int64_t groups2 = (groups * k + TK_TILE - 1) / TK_TILE;
    const size_t flags_bytes = ((size_t)M * sizeof(int) + 255) / 256 * 256;
    const size_t a_n = (size_t)M * (size_t)groups * (size_t)k;
    const size_t b_n = (size_t)M * (size_t)groups2 * (size_t)k;
    const size_t bytes = flags_bytes + (a_n + b_n) * (sizeof(float) + sizeof(int32_t));
    char *s = (char *)kn_cuda_scratch(cu, KN_CUDA_SCRATCH_EW, bytes);
    if (!s)
        return kn_cuda_fail(cu, -ENOMEM, "topk: no device memory for %zu bytes of scratch", bytes);
    int *flags = (int *)s;
    float *a_v = (float *)(s + flags_bytes);
    int32_t *a_i = (int32_t *)(a_v + a_n);
    float *b_v = (float *)(a_i + a_n);
    int32_t *b_i = (int32_t *)(b_v + b_n);

    (void)cudaMemsetAsync(flags, 0, (size_t)M * sizeof(int), st);
    topk_k<true, false><<<dim3((unsigned)groups, gy), TK_THREADS, 0, st>>>(
        x, n, nullptr, nullptr, n, M, k, flags, a_v, a_i);
    const float *cv = a_v;
    const int32_t *ci = a_i;
    float *nv = b_v;
    int32_t *ni = b_i;
    int64_t n_in = groups * k;
    for (;;) {
        const int64_t gg = (n_in + TK_TILE - 1) / TK_TILE;
        if (gg == 1) {
            topk_k<false, true><<<dim3(1, gy), TK_THREADS, 0, st>>>(x, n, cv, ci, n_in, M, k,
                                                                    flags, vals, ids);
            break;
        }
        topk_k<false, false><<<dim3((unsigned)gg, gy), TK_THREADS, 0, st>>>(x, n, cv, ci, n_in,
                                                                            M, k, flags, nv, ni);
        float *tv = (float *)cv;
        int32_t *ti = (int32_t *)ci;
        cv = nv;
        ci = ni;
        nv = tv;
        ni = ti;
        n_in = gg * k;
    }
    return kn_cuda_check(cu, "topk");
}

/* ---- softmax_stats ------------------------------------------------------------- */

#define SM_THREADS 256
#define SM_TILE 2048 /* elements per block and pass */

/* Reductions over a row's per-tile partials, identical in every kernel that
 * needs them (same code, same order), so every block sees the same bits. */
static __device__ __forceinline__ double sm_row_max(const double *p, int64_t C, double *sh)
{
    double v = -INFINITY;
    for (int64_t c = threadIdx.x; c < C; c += SM_THREADS)
        v = fmax(v, p[c]);
    return block_reduce<SM_THREADS>(v, sh, op_max_d());
}

static __device__ __forceinline__ double sm_row_sum(const double *p, int64_t C, double *sh)
{
    double v = 0.0;
    for (int64_t c = threadIdx.x; c < C; c += SM_THREADS)
        v = __dadd_rn(v, p[c]);
    return block_reduce<SM_THREADS>(v, sh, op_sum_d());
}

/* Pass 1: max_i x_i * inv over each tile (fmax: NaNs are ignored, as in
 * the reference). */
static __global__ void __launch_bounds__(SM_THREADS)
    sm_max_k(const float *x, int64_t M, int64_t n, double inv, double *pmax)
{
    __shared__ double sh[SM_THREADS / 32 + 1];
    const int64_t C = gridDim.x, c = blockIdx.x;
    const int64_t lo = c * SM_TILE, hi = lo + SM_TILE < n ? lo + SM_TILE : n;
    for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
        const float *xm = x + m * n;
        double v = -INFINITY;
        for (int64_t i = lo + threadIdx.x; i < hi; i += SM_THREADS)
            v = fmax(v, __dmul_rn((double)xm[i], inv));
        v = block_reduce<SM_THREADS>(v, sh, op_max_d());
        if (threadIdx.x == 0)
            pmax[m * C + c] = v;
    }
}

/* Pass 2: sum_i exp(x_i * inv - max) over each tile. */
static __global__ void __launch_bounds__(SM_THREADS)
    sm_sum_k(const float *x, int64_t M, int64_t n, double inv, const double *pmax, double *psum)
{
    __shared__ double sh[SM_THREADS / 32 + 1];
    const int64_t C = gridDim.x, c = blockIdx.x;
    const int64_t lo = c * SM_TILE, hi = lo + SM_TILE < n ? lo + SM_TILE : n;
    for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
        const float *xm = x + m * n;
        const double mx = sm_row_max(pmax + m * C, C, sh);
        double v = 0.0;
        for (int64_t i = lo + threadIdx.x; i < hi; i += SM_THREADS)
            v = __dadd_rn(v, exp(__dsub_rn(__dmul_rn((double)xm[i], inv), mx)));
        v = block_reduce<SM_THREADS>(v, sh, op_sum_d());
        if (threadIdx.x == 0)
            psum[m * C + c] = v;
    }
}

/* Pass 3: sum_i p_i log(p_i + 1e-5) over each tile, p_i = exp(x_i * inv - lse). */
static __global__ void __launch_bounds__(SM_THREADS)
    sm_ent_k(const float *x, int64_t M, int64_t n, double inv, const double *pmax,
             const double *psum, double *pent)
{
    __shared__ double sh[SM_THREADS / 32 + 1];
    const int64_t C = gridDim.x, c = blockIdx.x;
    const int64_t lo = c * SM_TILE, hi = lo + SM_TILE < n ? lo + SM_TILE : n;
    for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
        const float *xm = x + m * n;
        const double mx = sm_row_max(pmax + m * C, C, sh);
        const double lse = __dadd_rn(mx, log(sm_row_sum(psum + m * C, C, sh)));
        double v = 0.0;
        for (int64_t i = lo + threadIdx.x; i < hi; i += SM_THREADS) {
            const double pr = exp(__dsub_rn(__dmul_rn((double)xm[i], inv), lse));
            v = __dadd_rn(v, __dmul_rn(pr, log(__dadd_rn(pr, 1e-5))));
        }
        v = block_reduce<SM_THREADS>(v, sh, op_sum_d());
        if (threadIdx.x == 0)
            pent[m * C + c] = v;
    }
}

/* Pass 4: one block per row folds the partials into out[m][0..2]. */
static __global__ void __launch_bounds__(SM_THREADS)
    sm_out_k(int64_t M, int64_t C, const double *pmax, const double *psum, const double *pent,
             float *out)
{
    __shared__ double sh[SM_THREADS / 32 + 1];
    for (int64_t m = blockIdx.x; m < M; m += gridDim.x) {
        const double mx = sm_row_max(pmax + m * C, C, sh);
        const double lse = __dadd_rn(mx, log(sm_row_sum(psum + m * C, C, sh)));
        const double ent = -sm_row_sum(pent + m * C, C, sh);
        if (threadIdx.x == 0) {
            out[m * 3 + 0] = __double2float_rn(mx);
            out[m * 3 + 1] = __double2float_rn(lse);
            out[m * 3 + 2] = __double2float_rn(ent);
        }
    }
}

int kn_cuda_softmax_stats(kn_cuda *cu, const float *x, int64_t M, int64_t n, float temperature,
                          float *out)
{
    cudaStream_t st = stream_of(cu);
    const int64_t C = (n + SM_TILE - 1) / SM_TILE;
    const size_t parts = (size_t)M * (size_t)C;
    double *pmax = (double *)kn_cuda_scratch(cu, KN_CUDA_SCRATCH_EW, 3 * parts * sizeof(double));
    if (!pmax)
        return kn_cuda_fail(cu, -ENOMEM, "softmax_stats: no device memory for %zu bytes of scratch",
                            3 * parts * sizeof(double));
    double *psum = pmax + parts, *pent = psum + parts;
    const double inv = 1.0 / (double)temperature; /* the reference's, on the host */
    const dim3 grid((unsigned)C, clamp_grid(M, GRID_Y_MAX));
    sm_max_k<<<grid, SM_THREADS, 0, st>>>(x, M, n, inv, pmax);
    sm_sum_k<<<grid, SM_THREADS, 0, st>>>(x, M, n, inv, pmax, psum);
    sm_ent_k<<<grid, SM_THREADS, 0, st>>>(x, M, n, inv, pmax, psum, pent);
    sm_out_k<<<clamp_grid(M, (int64_t)1 << 20), SM_THREADS, 0, st>>>(M, C, pmax, psum, pent, out);
    return kn_cuda_check(cu, "softmax_stats");
}

/* ---- fill_random ----------------------------------------------------------------- */

/* kn.h's generator: splitmix64's mix of a counter, 24 bits to [-1, 1),
 * times the amplitude (every step but the last is exact in float). */
static __device__ __forceinline__ float rand_val(uint64_t seed, int64_t i, float amplitude)
{
    uint64_t z = seed + ((uint64_t)i + 1u) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float u = __fmul_rn((float)(uint32_t)(z >> 40), 0x1p-24f);
    return __fmul_rn(__fsub_rn(__fmul_rn(u, 2.0f), 1.0f), amplitude);
}

/* Items: elements for F32/F16/BF16, blocks of 32 for Q8_0/Q4_0 (one thread
 * quantises a block with kn_quant.c's rounding). */
template <enum kn_dtype T>
static __global__ void __launch_bounds__(EW_THREADS)
    fill_k(void *p, int64_t items, uint64_t seed, float amplitude)
{
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t it = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; it < items; it += stride) {
        if constexpr (T == KN_F32) {
            ((float *)p)[it] = rand_val(seed, it, amplitude);
        } else if constexpr (T == KN_F16) {
            ((uint16_t *)p)[it] = f32_to_f16(rand_val(seed, it, amplitude));
        } else if constexpr (T == KN_BF16) {
            ((uint16_t *)p)[it] = f32_to_bf16(rand_val(seed, it, amplitude));
        } else if constexpr (T == KN_Q8_0) {
            float xb[32];
            float amax = 0.0f;
#pragma unroll
            for (int j = 0; j < 32; j++) {
                xb[j] = rand_val(seed, it * 32 + j, amplitude);
                amax = fmaxf(amax, fabsf(xb[j]));
            }
            const float d = __fdiv_rn(amax, 127.0f);
            const float id = d != 0.0f ? __fdiv_rn(1.0f, d) : 0.0f;
            const uint16_t dh = f32_to_f16(d);
            uint8_t *o = (uint8_t *)p + it * Q8_0_BYTES;
            o[0] = (uint8_t)(dh & 0xff);
            o[1] = (uint8_t)(dh >> 8);
#pragma unroll
            for (int j = 0; j < 32; j++)
                o[2 + j] = (uint8_t)(int8_t)roundf(__fmul_rn(xb[j], id));
        } else {
            float xb[32];
            float amax = 0.0f, max = 0.0f;
#pragma unroll
            for (int j = 0; j < 32; j++) {
                xb[j] = rand_val(seed, it * 32 + j, amplitude);
                if (amax < fabsf(xb[j])) {
                    amax = fabsf(xb[j]);
                    max = xb[j];
                }
            }
            const float d = __fdiv_rn(max, -8.0f);
            const float id = d != 0.0f ? __fdiv_rn(1.0f, d) : 0.0f;
            const uint16_t dh = f32_to_f16(d);
            uint8_t *o = (uint8_t *)p + it * Q4_0_BYTES;
            o[0] = (uint8_t)(dh & 0xff);
            o[1] = (uint8_t)(dh >> 8);
#pragma unroll
            for (int j = 0; j < 16; j++) {
                const float x0 = __fmul_rn(xb[j], id), x1 = __fmul_rn(xb[16 + j], id);
                int xi0 = (int)(int8_t)__fadd_rn(x0, 8.5f), xi1 = (int)(int8_t)__fadd_rn(x1, 8.5f);
                xi0 = xi0 < 15 ? xi0 : 15;
                xi1 = xi1 < 15 ? xi1 : 15;
                o[2 + j] = (uint8_t)(xi0 | (xi1 << 4));
            }
        }
    }
}

int kn_cuda_fill_random(kn_cuda *cu, void *p, enum kn_dtype t, int64_t n, uint64_t seed,
                        float amplitude)
{
    cudaStream_t st = stream_of(cu);
    const int64_t blocks = n / 32;
    switch (t) {
    case KN_F32:
        fill_k<KN_F32><<<grid_for(cu, n, EW_THREADS), EW_THREADS, 0, st>>>(p, n, seed, amplitude);
        break;
    case KN_F16:
        fill_k<KN_F16><<<grid_for(cu, n, EW_THREADS), EW_THREADS, 0, st>>>(p, n, seed, amplitude);
        break;
    case KN_BF16:
        fill_k<KN_BF16><<<grid_for(cu, n, EW_THREADS), EW_THREADS, 0, st>>>(p, n, seed, amplitude);
        break;
    case KN_Q8_0:
        fill_k<KN_Q8_0><<<grid_for(cu, blocks, EW_THREADS), EW_THREADS, 0, st>>>(p, blocks, seed,
                                                                                 amplitude);
        break;
    case KN_Q4_0:
        fill_k<KN_Q4_0><<<grid_for(cu, blocks, EW_THREADS), EW_THREADS, 0, st>>>(p, blocks, seed,
                                                                                 amplitude);
        break;
    default:
        return kn_cuda_fail(cu, -EINVAL, "fill_random: unsupported type %d", (int)t);
    }
    return kn_cuda_check(cu, "fill_random");
}

/* ---- read bandwidth ------------------------------------------------------------ */

#define BW_THREADS 256

/* 16-byte streaming loads, four in flight per thread; the XOR of everything
 * read decides whether anything is stored, so no load can be dropped. */
static __global__ void __launch_bounds__(BW_THREADS)
    read_k(const uint4 *p, int64_t n16, uint32_t magic, uint32_t *sink)
{
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    uint32_t acc = 0;
    for (; i + 3 * stride < n16; i += 4 * stride) {
        const uint4 a = __ldcs(p + i), b = __ldcs(p + i + stride);
        const uint4 c = __ldcs(p + i + 2 * stride), d = __ldcs(p + i + 3 * stride);
        acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w;
        acc ^= c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
    }
    for (; i < n16; i += stride) {
        const uint4 a = __ldcs(p + i);
        acc ^= a.x ^ a.y ^ a.z ^ a.w;
    }
    if (acc == magic)
        *sink = acc;
}

double kn_cuda_read_bandwidth(kn_cuda *cu, size_t bytes, int reps)
{
    bytes &= ~(size_t)4095;
    if (bytes == 0)
        return 0.0;
    if (reps < 1)
        reps = 1;
    cudaStream_t st = stream_of(cu);
    void *buf = NULL, *sink = NULL;
    cudaEvent_t e0 = NULL, e1 = NULL;
    double best = 0.0;
    /* kn_cuda_alloc: the right device, zeroed (first touch), and an
     * out-of-memory message in the ctx */
    if (kn_cuda_alloc(cu, bytes, &buf) != 0 || kn_cuda_alloc(cu, 256, &sink) != 0)
        goto out;
    if (cudaEventCreate(&e0) != cudaSuccess || cudaEventCreate(&e1) != cudaSuccess) {
        (void)cudaGetLastError();
        best = -1.0;
        goto out;
    }
    {
        const int64_t n16 = (int64_t)(bytes / 16);
        const unsigned grid = (unsigned)kn_cuda_sm_count(cu) * (2048 / BW_THREADS);
        const uint32_t magic = 0x9E3779B9u; /* the buffer is zero: XOR 0 never matches */
        read_k<<<grid, BW_THREADS, 0, st>>>((const uint4 *)buf, n16, magic, (uint32_t *)sink);
        if (kn_cuda_check(cu, "read_bandwidth") != 0) { /* warm-up */
            best = -1.0;
            goto out;
        }
        for (int r = 0; r < reps; r++) {
            (void)cudaEventRecord(e0, st);
            read_k<<<grid, BW_THREADS, 0, st>>>((const uint4 *)buf, n16, magic, (uint32_t *)sink);
            (void)cudaEventRecord(e1, st);
            if (kn_cuda_check(cu, "read_bandwidth") != 0) {
                best = -1.0;
                goto out;
            }
            const cudaError_t e = cudaEventSynchronize(e1);
            float ms = 0.0f;
            if (e != cudaSuccess || cudaEventElapsedTime(&ms, e0, e1) != cudaSuccess) {
                (void)kn_cuda_fail(cu, -EIO, "%s (last kernel issued: read_bandwidth)",
                                   cudaGetErrorString(e != cudaSuccess ? e : cudaGetLastError()));
                (void)cudaGetLastError();
                best = -1.0;
                goto out;
            }
            const double bw = ms > 0.0f ? (double)bytes / ((double)ms * 1e-3) : 0.0;
            if (bw > best)
                best = bw;
        }
    }
out:
    if (e0)
        (void)cudaEventDestroy(e0);
    if (e1)
        (void)cudaEventDestroy(e1);
    kn_cuda_free(cu, sink);
    kn_cuda_free(cu, buf);
    return best;
}
