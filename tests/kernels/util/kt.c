/* Helpers of the kernels suites: see kt.h. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "tests/kernels/util/kt.h"

static uint64_t g_rng = 0x9e3779b97f4a7c15ull;

uint64_t kt_rnd(void)
{
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return g_rng;
}

float kt_frand(void)
{
    return (float)((double)(kt_rnd() >> 11) * 0x1p-53 * 2.0 - 1.0);
}

float *kt_fvec(int64_t n)
{
    float *v = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    cr_assert_not_null(v);
    for (int64_t i = 0; i < n; i++)
        v[i] = kt_frand();
    return v;
}

void kt_poison(float *v, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        v[i] = NAN;
}

int kt_close(float got, float want, double mag, double tol)
{
    if (isnan(got) || isnan(want))
        return 0;
    return fabs((double)got - want) <= tol * mag + 1e-30;
}

kn_ctx *kt_ctx(int threads, enum kn_variant v)
{
    kn_ctx *ctx = NULL;
    cr_assert_eq(kn_ctx_create(&ctx, &(kn_ctx_cfg){.n_threads = threads, .variant = v, .fanout_min_bytes = -1}), 0);
    return ctx;
}

void *kt_weight(enum kn_dtype t, int64_t rows, int64_t cols, kn_tensor *w)
{
    size_t rb = kn_row_bytes(t, cols);
    cr_assert_gt(rb, 0);
    char *data = malloc(rb * (size_t)rows);
    float *src = kt_fvec(cols);
    cr_assert_not_null(data);
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t c = 0; c < cols; c++)
            src[c] = kt_frand();
        cr_assert_eq(kn_quantize_row(t, src, cols, data + rb * (size_t)r), (int64_t)rb);
    }
    free(src);
    *w = (kn_tensor){.data = data, .type = t, .rows = rows, .cols = cols};
    return data;
}

float *kt_dequant(const kn_tensor *w)
{
    float *wf = malloc((size_t)(w->rows * w->cols) * sizeof(float));
    cr_assert_not_null(wf);
    const size_t rb = kn_row_bytes(w->type, w->cols);
    for (int64_t r = 0; r < w->rows; r++)
        kn_dequantize_row(w->type, (const char *)w->data + rb * (size_t)r, w->cols,
                          wf + r * w->cols);
    return wf;
}

/* ---- backends ------------------------------------------------------------ */

/* The one list of op tables under test (non-const: Criterion's type). */
static kt_backend g_backends[] = {
    {KN_VARIANT_SCALAR},
    {KN_VARIANT_AVX2},
    {KN_VARIANT_AVX512},
};

struct criterion_test_params kt_backend_params(void)
{
    return cr_make_param_array(kt_backend, g_backends, sizeof(g_backends) / sizeof(g_backends[0]));
}

const char *kt_backend_name(const kt_backend *b)
{
    return kn_variant_name(b->variant);
}

kn_ctx *kt_open(const kt_backend *b, int threads)
{
    if (!kn_ops_for(b->variant))
        cr_skip_test("%s: not supported by this CPU", kt_backend_name(b));
    kn_ctx *ctx = kt_ctx(threads, b->variant);
    cr_assert_eq(kn_ctx_variant(ctx), b->variant);
    return ctx;
}

kn_ctx *kt_open_host(const kt_backend *b, int threads)
{
    kn_ctx *ctx = kt_open(b, threads);
    if (!kn_ctx_host_memory(ctx)) {
        kn_ctx_destroy(ctx);
        cr_skip_test("%s: ops do not take host memory (this test passes host arrays)",
                     kt_backend_name(b));
    }
    return ctx;
}

/* ---- backend buffers ------------------------------------------------------- */

void kt_dev_fill(kn_ctx *ctx, void *dev, int byte, size_t bytes)
{
    void *h = malloc(bytes ? bytes : 1);
    cr_assert_not_null(h);
    memset(h, byte, bytes);
    cr_assert_eq(kn_buf_upload(ctx, dev, h, bytes), 0);
    free(h);
}

void *kt_dev(kn_ctx *ctx, size_t bytes)
{
    void *p = NULL;
    cr_assert_eq(kn_buf_alloc(ctx, bytes, &p), 0, "kn_buf_alloc(%zu)", bytes);
    cr_assert_not_null(p);
    kt_dev_fill(ctx, p, 0xff, bytes);
    return p;
}

void *kt_dev_put(kn_ctx *ctx, const void *host, size_t bytes)
{
    void *p = NULL;
    cr_assert_eq(kn_buf_alloc(ctx, bytes, &p), 0, "kn_buf_alloc(%zu)", bytes);
    cr_assert_eq(kn_buf_upload(ctx, p, host, bytes), 0);
    return p;
}

void kt_dev_get(kn_ctx *ctx, void *host, const void *dev, size_t bytes)
{
    cr_assert_eq(kn_buf_download(ctx, host, dev, bytes), 0);
}

/* ---- matmul bound ---------------------------------------------------------- */

kt_mm_bound kt_mm_bound_of(enum kn_dtype t, const float *w_row, const float *x_row, int64_t K)
{
    kt_mm_bound b = {0};
    for (int64_t c0 = 0; c0 < K; c0 += 32) {
        float amax = 0;
        for (int64_t k = c0; k < K && k < c0 + 32; k++) {
            double p = (double)w_row[k] * x_row[k];
            b.exact += p;
            b.mag += fabs(p);
            amax = fmaxf(amax, fabsf(x_row[k]));
        }
        if (t != KN_Q8_0)
            continue;
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        for (int64_t k = c0; k < c0 + 32; k++) {
            float v = x_row[k] * id;
            double q = roundf(v);
            b.emu += w_row[k] * q * d;
            b.emu_mag += fabs(w_row[k] * q * d);
            if (fabs(fabs(v - truncf(v)) - 0.5) < 1e-5)
                b.emu_tie += fabs(w_row[k]) * d;
        }
    }
    return b;
}

bool kt_mm_ok(const kt_mm_bound *b, enum kn_dtype t, float ref, float got)
{
    if (isnan(got))
        return false;
    if (fabs((double)got - ref) <= 2e-5 * b->mag + 1e-30)
        return true;
    return t == KN_Q8_0 && fabs((double)got - b->emu) <= 2e-5 * b->emu_mag + b->emu_tie + 1e-30;
}
