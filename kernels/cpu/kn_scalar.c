/* The scalar reference op table: plain C, written for clarity over speed.
 * Every other backend is tested against it, so it computes the textbook
 * definition (quantised weights are dequantised and multiplied by the float
 * activations; nothing is rounded that the definition does not round).
 * It still fans out over the pool so that golden runs stay tolerable. */
#include <math.h>
#include <stdlib.h>

#include "kernels/cpu/kn_int.h"

/* --- matmul --------------------------------------------------------------- */

struct mm_args {
    const kn_tensor *w;
    const float *x;
    int64_t M;
    float *y;
};

static void mm_job(void *p, int ith, int nth)
{
    const struct mm_args *a = p;
    const kn_tensor *w = a->w;
    const int64_t K = w->cols, N = w->rows;
    const size_t rb = kn_row_bytes(w->type, K);
    int64_t lo, hi;
    kn_split(N, ith, nth, 16, &lo, &hi);
    /* One dequantised weight row on the stack for typical widths, else per
     * element (no allocation on the hot path). */
    float row[4096];
    for (int64_t r = lo; r < hi; r++) {
        const char *wr = (const char *)w->data + (size_t)r * rb;
        if (K <= 4096) {
            kn_dequantize_row(w->type, wr, K, row);
            for (int64_t m = 0; m < a->M; m++)
                a->y[m * N + r] = kn_scalar_dot_f32(row, a->x + m * K, K);
        } else {
            for (int64_t m = 0; m < a->M; m++) {
                const float *xm = a->x + m * K;
                float s = 0.0f;
                for (int64_t c0 = 0; c0 < K; c0 += 4096) {
                    int64_t len = K - c0 < 4096 ? K - c0 : 4096;
                    /* row offsets of a quantised type stay block-aligned */
                    kn_dequantize_row(w->type, wr + kn_row_bytes(w->type, c0), len, row);
                    s += kn_scalar_dot_f32(row, xm + c0, len);
                }
                a->y[m * N + r] = s;
            }
        }
    }
}

static int valid_weight(const kn_tensor *w)
{
    return w && w->data && w->rows > 0 && w->cols > 0 && kn_row_bytes(w->type, w->cols) != 0;
}

void kn_scalar_matmul(kn_ctx *ctx, const kn_tensor *w, const float *x, int64_t M, float *y)
{
    if (!valid_weight(w) || !x || !y || M <= 0)
        return;
    struct mm_args a = {w, x, M, y};
    kn_run(ctx, mm_job, &a);
}

static void scalar_matmul_multi(kn_ctx *ctx, int n, const kn_tensor *const *w, const float *x,
                                int64_t M, float *const *y)
{
    if (n <= 0 || !w || !y || !x || M <= 0)
        return;
    for (int i = 0; i < n; i++)
        if (!valid_weight(w[i]) || !y[i])
            return;
    for (int i = 0; i < n; i++)
        kn_scalar_matmul(ctx, w[i], x, M, y[i]);
}

/* --- get_rows ------------------------------------------------------------- */

void kn_scalar_get_rows(kn_ctx *ctx, const kn_tensor *w, const int32_t *ids, int64_t n,
                            float *out)
{
    (void)ctx;
    if (!valid_weight(w) || !ids || !out)
        return;
    const size_t rb = kn_row_bytes(w->type, w->cols);
    for (int64_t i = 0; i < n; i++) {
        float *o = out + i * w->cols;
        if (ids[i] < 0 || ids[i] >= w->rows) {
            /* An out-of-range id is a caller bug; zeros keep the damage local
             * and visible (no out-of-bounds read). */
            memset(o, 0, (size_t)w->cols * sizeof(float));
            continue;
        }
        kn_dequantize_row(w->type, (const char *)w->data + (size_t)ids[i] * rb, w->cols, o);
    }
}

/* --- elementwise ---------------------------------------------------------- */

void kn_scalar_rmsnorm(kn_ctx *ctx, const float *x, const float *g, int64_t M, int64_t n,
                           float eps, float *out)
{
    (void)ctx;
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * n;
        float *om = out + m * n;
        double ss = 0.0;
        for (int64_t i = 0; i < n; i++)
            ss += (double)xm[i] * xm[i];
        float inv = 1.0f / sqrtf((float)(ss / (double)n) + eps);
        for (int64_t i = 0; i < n; i++)
            om[i] = xm[i] * inv * g[i];
    }
}

void kn_scalar_rope(kn_ctx *ctx, float *x, int64_t M, int n_heads, int head_dim,
                        int rope_dims, const int32_t *pos, float base)
{
    (void)ctx;
    if (rope_dims > head_dim)
        rope_dims = head_dim;
    for (int64_t m = 0; m < M; m++) {
        for (int i = 0; i + 1 < rope_dims; i += 2) {
            /* double for the angle: positions reach 1e5 and f32 phase error
             * would grow with them; SIMD variants use the same formulation. */
            double theta = (double)pos[m] * pow((double)base, -(double)i / rope_dims);
            float c = (float)cos(theta), s = (float)sin(theta);
            for (int h = 0; h < n_heads; h++) {
                float *v = x + (m * n_heads + h) * (int64_t)head_dim;
                float a = v[i], b = v[i + 1];
                v[i] = a * c - b * s;
                v[i + 1] = a * s + b * c;
            }
        }
    }
}

void kn_scalar_silu_mul(kn_ctx *ctx, float *gate, const float *up, int64_t n)
{
    (void)ctx;
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

void kn_scalar_add(kn_ctx *ctx, float *y, const float *x, int64_t n)
{
    (void)ctx;
    for (int64_t i = 0; i < n; i++)
        y[i] += x[i];
}

/* --- attention ------------------------------------------------------------ */

size_t kn_attn_scratch_floats(int64_t n_ctx_max, int n_threads)
{
    if (n_ctx_max < 0)
        n_ctx_max = 0;
    if (n_threads < 1)
        n_threads = 1;
    /* per thread: one score row, padded so threads' rows never share a line,
     * then the tiles of the SIMD tiled path */
    return (size_t)n_threads * (size_t)((n_ctx_max + 15) / 16 * 16 + 16 + KN_ATT_TILE_FLOATS);
}

static const float *kv_row(const float *pool, const kn_attn_args *a, int64_t p, int kvh)
{
    int64_t blk = a->block_table[p / a->block_size];
    int64_t slot = p % a->block_size;
    return pool + ((blk * a->block_size + slot) * a->n_kv_head + kvh) * (int64_t)a->head_dim;
}

struct attn_job_args {
    const kn_attn_args *a;
    int64_t stride;
};

static void attn_task(const kn_attn_args *a, int64_t task, float *sc)
{
    const int64_t i = task / a->n_head;
    const int h = (int)(task % a->n_head);
    const int kvh = h / (a->n_head / a->n_kv_head);
    const int hd = a->head_dim;
    const float *q = a->q + (i * a->n_head + h) * (int64_t)hd;
    float *o = a->out + (i * a->n_head + h) * (int64_t)hd;
    const int64_t n_ctx = a->n_past + a->n_q;
    float mx = -INFINITY;
    for (int64_t p = 0; p < n_ctx; p++) {
        int64_t j = p - a->n_past;
        int vis = j < 0 || (a->mask ? a->mask[i * a->n_q + j] != 0 : j <= i);
        if (!vis) {
            sc[p] = -INFINITY;
            continue;
        }
        sc[p] = kn_scalar_dot_f32(q, kv_row(a->k_pool, a, p, kvh), hd) * a->scale;
        if (sc[p] > mx)
            mx = sc[p];
    }
    for (int d = 0; d < hd; d++)
        o[d] = 0.0f;
    if (mx == -INFINITY) /* nothing visible: defined as a zero output */
        return;
    float sum = 0.0f;
    for (int64_t p = 0; p < n_ctx; p++) {
        sc[p] = sc[p] == -INFINITY ? 0.0f : expf(sc[p] - mx);
        sum += sc[p];
    }
    const float inv = 1.0f / sum;
    for (int64_t p = 0; p < n_ctx; p++) {
        if (sc[p] == 0.0f)
            continue;
        const float wgt = sc[p] * inv;
        const float *v = kv_row(a->v_pool, a, p, kvh);
        for (int d = 0; d < hd; d++)
            o[d] += wgt * v[d];
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

void kn_scalar_attention(kn_ctx *ctx, const kn_attn_args *a)
{
    if (!a || a->n_q <= 0 || a->n_head <= 0 || a->n_kv_head <= 0 || a->head_dim <= 0 ||
        a->n_head % a->n_kv_head != 0 || a->block_size <= 0 || a->n_past < 0 || !a->scratch)
        return;
    struct attn_job_args j = {a, (a->n_past + a->n_q + 15) / 16 * 16 + 16};
    kn_run(ctx, attn_job, &j);
}

static const kn_ops scalar_ops = {
    .name = "scalar",
    .matmul = kn_scalar_matmul,
    .matmul_multi = scalar_matmul_multi,
    .get_rows = kn_scalar_get_rows,
    .rmsnorm = kn_scalar_rmsnorm,
    .rope = kn_scalar_rope,
    .silu_mul = kn_scalar_silu_mul,
    .add = kn_scalar_add,
    .attention = kn_scalar_attention,
};

static float scalar_read_stream(const void *p, size_t bytes)
{
    const uint64_t *u = p;
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = 0; i < bytes / 8; i += 4) {
        s0 ^= u[i];
        s1 ^= u[i + 1];
        s2 ^= u[i + 2];
        s3 ^= u[i + 3];
    }
    return (float)(s0 ^ s1 ^ s2 ^ s3);
}

const kn_impl kn_impl_scalar = {&scalar_ops, scalar_read_stream};
