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

int kn_scalar_matmul(kn_ctx *ctx, const kn_tensor *w, const float *x, int64_t M, float *y)
{
    int rc = kn_check_matmul(ctx, w, x, M, y);
    if (rc < 0)
        return rc;
    struct mm_args a = {w, x, M, y};
    kn_run(ctx, mm_job, &a, kn_mm_work(1, &w, M));
    return 0;
}

static int scalar_matmul_multi(kn_ctx *ctx, int n, const kn_tensor *const *w, const float *x,
                               int64_t M, float *const *y)
{
    int rc = kn_check_matmul_multi(ctx, n, w, x, M, y);
    if (rc < 0)
        return rc;
    for (int i = 0; i < n; i++)
        kn_scalar_matmul(ctx, w[i], x, M, y[i]);
    return 0;
}

/* --- get_rows ------------------------------------------------------------- */

int kn_scalar_get_rows(kn_ctx *ctx, const kn_tensor *w, const int32_t *ids, int64_t n,
                       float *out)
{
    int rc = kn_check_get_rows(ctx, w, ids, n, out);
    if (rc < 0)
        return rc;
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
    return 0;
}

/* --- elementwise ---------------------------------------------------------- */

int kn_scalar_rmsnorm(kn_ctx *ctx, const float *x, const float *g, int64_t M, int64_t n,
                      float eps, float *out)
{
    int rc = kn_check_rmsnorm(ctx, x, g, M, n, out);
    if (rc < 0)
        return rc;
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
    return 0;
}

int kn_scalar_rope(kn_ctx *ctx, float *x, int64_t M, int n_heads, int head_dim, int rope_dims,
                   const int32_t *pos, float base)
{
    int rc = kn_check_rope(ctx, x, M, n_heads, head_dim, rope_dims, pos);
    if (rc < 0)
        return rc;
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
    return 0;
}

int kn_scalar_silu_mul(kn_ctx *ctx, float *gate, const float *up, int64_t n)
{
    int rc = kn_check_ew(ctx, gate, up, n);
    if (rc < 0)
        return rc;
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
    return 0;
}

int kn_scalar_add(kn_ctx *ctx, float *y, const float *x, int64_t n)
{
    int rc = kn_check_ew(ctx, y, x, n);
    if (rc < 0)
        return rc;
    for (int64_t i = 0; i < n; i++)
        y[i] += x[i];
    return 0;
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

int kn_scalar_attention(kn_ctx *ctx, const kn_attn_args *a)
{
    int rc = kn_check_attention(ctx, a);
    if (rc < 0)
        return rc;
    struct attn_job_args j = {a, (a->n_past + a->n_q + 15) / 16 * 16 + 16};
    kn_run(ctx, attn_job, &j, kn_attn_work(a));
    return 0;
}

/* --- KV pool -------------------------------------------------------------- */

int kn_scalar_kv_write(kn_ctx *ctx, float *k_pool, float *v_pool, int64_t row_floats,
                       const int32_t *slots, int64_t n, const float *k, const float *v)
{
    int rc = kn_check_kv_write(ctx, k_pool, v_pool, row_floats, slots, n, k, v);
    if (rc < 0)
        return rc;
    const size_t bytes = (size_t)row_floats * sizeof(float);
    for (int64_t i = 0; i < n; i++) {
        if (slots[i] < 0) /* padding */
            continue;
        memcpy(k_pool + slots[i] * row_floats, k + i * row_floats, bytes);
        memcpy(v_pool + slots[i] * row_floats, v + i * row_floats, bytes);
    }
    return 0;
}

int kn_scalar_kv_copy(kn_ctx *ctx, float *pool, int64_t n_planes, int64_t plane_floats,
                      int64_t row_floats, const int32_t *src, const int32_t *dst, int64_t n)
{
    int rc = kn_check_kv_copy(ctx, pool, n_planes, plane_floats, row_floats, src, dst, n);
    if (rc < 0)
        return rc;
    /* In list order: kn.h's rule (no destination is a later source) makes
     * that equal to reading every source first. */
    const size_t bytes = (size_t)row_floats * sizeof(float);
    for (int64_t p = 0; p < n_planes; p++) {
        float *plane = pool + p * plane_floats;
        for (int64_t i = 0; i < n; i++)
            if (src[i] != dst[i])
                memcpy(plane + dst[i] * row_floats, plane + src[i] * row_floats, bytes);
    }
    return 0;
}

/* --- Medusa ResBlock activation ------------------------------------------- */

struct silu_res_args {
    const float *x, *z, *b;
    int64_t M, n_heads, n;
    float *out;
};

/* Rows r of the output ([n_heads][M] of them, head-major). Plain float math
 * in this file's (non-FMA) build: what engine/medusa/medusa.c computed
 * before the op existed, bit for bit. A NULL bias adds 0.0f (the
 * definition), not nothing: z = -0 then gives +0 like a zero bias does. */
static void silu_res_rows(void *p, int64_t r0, int64_t r1)
{
    const struct silu_res_args *a = p;
    const int64_t n = a->n;
    for (int64_t r = r0; r < r1; r++) {
        const int64_t h = r / a->M, m = r % a->M;
        const float *x = a->x + m * n;
        const float *z = a->z + (m * a->n_heads + h) * n;
        float *o = a->out + r * n;
        for (int64_t i = 0; i < n; i++) {
            const float s = z[i] + (a->b ? a->b[h * n + i] : 0.0f);
            o[i] = x[i] + s / (1.0f + expf(-s));
        }
    }
}

int kn_scalar_silu_res(kn_ctx *ctx, const float *x, const float *z, const float *b, int64_t M,
                       int64_t n_heads, int64_t n, float *out)
{
    int rc = kn_check_silu_res(ctx, x, z, M, n_heads, n, out);
    if (rc < 0)
        return rc;
    struct silu_res_args a = {x, z, b, M, n_heads, n, out};
    const int64_t rows = n_heads * M;
    /* ~10 ns per element (expf): a pool round trip pays from ~32k on */
    kn_run_rows(ctx, rows, 1, rows * n >= 32768, silu_res_rows, &a);
    return 0;
}

/* --- selection and softmax statistics over rows of logits ----------------- */

struct rows_args {
    const float *x;
    int64_t n;
    int k;
    float temperature;
    float *vals;
    int32_t *ids;
    float *out;
};

/* The definition (engine/sampler.c's eng_argmax): a NaN at x[0] stays
 * chosen, later NaNs never are. */
static void argmax_rows(void *p, int64_t m0, int64_t m1)
{
    const struct rows_args *a = p;
    for (int64_t m = m0; m < m1; m++) {
        const float *x = a->x + m * a->n;
        int64_t best = 0;
        float v = x[0];
        for (int64_t i = 1; i < a->n; i++)
            if (x[i] > v) {
                v = x[i];
                best = i;
            }
        a->ids[m] = (int32_t)best;
    }
}

int kn_scalar_argmax(kn_ctx *ctx, const float *x, int64_t M, int64_t n, int32_t *ids)
{
    int rc = kn_check_argmax(ctx, x, M, n, ids);
    if (rc < 0)
        return rc;
    struct rows_args a = {.x = x, .n = n, .ids = ids};
    kn_run_rows(ctx, M, 16, M * n >= 65536, argmax_rows, &a);
    return 0;
}

/* Insertion into a sorted k-array (engine/medusa/medusa.c's top_k): an
 * element enters when it beats the current k-th, and moves up past strictly
 * smaller ones only, so equal values keep index order. */
static void topk_rows(void *p, int64_t m0, int64_t m1)
{
    const struct rows_args *a = p;
    const int k = a->k;
    for (int64_t m = m0; m < m1; m++) {
        const float *x = a->x + m * a->n;
        float val[KN_TOPK_MAX];
        int32_t idx[KN_TOPK_MAX];
        int c = 0;
        for (int64_t i = 0; i < a->n; i++) {
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
        memcpy(a->ids + m * k, idx, (size_t)k * sizeof(int32_t));
        if (a->vals)
            memcpy(a->vals + m * k, val, (size_t)k * sizeof(float));
    }
}

int kn_scalar_topk(kn_ctx *ctx, const float *x, int64_t M, int64_t n, int k, float *vals,
                   int32_t *ids)
{
    int rc = kn_check_topk(ctx, x, M, n, k, ids);
    if (rc < 0)
        return rc;
    struct rows_args a = {.x = x, .n = n, .k = k, .vals = vals, .ids = ids};
    kn_run_rows(ctx, M, 16, M * n >= 65536, topk_rows, &a);
    return 0;
}

/* Double precision throughout, as Medusa's typical acceptance has always
 * computed it (its thresholds must not move). */
static void softmax_stats_rows(void *p, int64_t m0, int64_t m1)
{
    const struct rows_args *a = p;
    const double inv = 1.0 / (double)a->temperature;
    const int64_t n = a->n;
    for (int64_t m = m0; m < m1; m++) {
        const float *x = a->x + m * n;
        double mx = -INFINITY;
        for (int64_t i = 0; i < n; i++)
            mx = fmax(mx, (double)x[i] * inv);
        double sum = 0;
        for (int64_t i = 0; i < n; i++)
            sum += exp((double)x[i] * inv - mx);
        const double lse = mx + log(sum);
        double ent = 0;
        for (int64_t i = 0; i < n; i++) {
            const double pr = exp((double)x[i] * inv - lse);
            ent -= pr * log(pr + 1e-5);
        }
        a->out[m * 3 + 0] = (float)mx;
        a->out[m * 3 + 1] = (float)lse;
        a->out[m * 3 + 2] = (float)ent;
    }
}

int kn_scalar_softmax_stats(kn_ctx *ctx, const float *x, int64_t M, int64_t n,
                            float temperature, float *out)
{
    int rc = kn_check_softmax_stats(ctx, x, M, n, temperature, out);
    if (rc < 0)
        return rc;
    struct rows_args a = {.x = x, .n = n, .temperature = temperature, .out = out};
    /* three passes of double exp/log per element: worth the pool early;
     * 16 rows of 3 floats are 3 whole cache lines */
    kn_run_rows(ctx, M, 16, M * n >= 8192, softmax_stats_rows, &a);
    return 0;
}

int kn_scalar_gather(kn_ctx *ctx, const float *x, const int64_t *idx, int64_t n, float *out)
{
    int rc = kn_check_gather(ctx, x, idx, n, out);
    if (rc < 0)
        return rc;
    for (int64_t i = 0; i < n; i++)
        out[i] = x[idx[i]];
    return 0;
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
    .kv_write = kn_scalar_kv_write,
    .kv_copy = kn_scalar_kv_copy,
    .silu_res = kn_scalar_silu_res,
    .argmax = kn_scalar_argmax,
    .topk = kn_scalar_topk,
    .softmax_stats = kn_scalar_softmax_stats,
    .gather = kn_scalar_gather,
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
