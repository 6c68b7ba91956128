/* kernels: the ops over rows of logits (argmax, topk, softmax_stats,
 * gather) of every backend against their definitions in kn.h, computed here
 * independently: argmax by the sampler's loop, topk by a stable sort,
 * softmax_stats in double. Inputs and outputs are backend buffers; outputs
 * start as 0xFF bytes (NaN, or id -1). */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/kn.h"
#include "tests/kernels/util/kt.h"

/* ---- argmax ------------------------------------------------------------------ */

/* kn.h's definition (engine/sampler.c's eng_argmax) */
static int32_t argmax_def(const float *x, int64_t n)
{
    int64_t best = 0;
    float v = x[0];
    for (int64_t i = 1; i < n; i++)
        if (x[i] > v) {
            v = x[i];
            best = i;
        }
    return (int32_t)best;
}

/* ids of backend b's argmax over host rows x[M][n] (ids: [M], host) */
static void run_argmax(kn_ctx *ctx, const float *x, int64_t M, int64_t n, int32_t *ids)
{
    float *xd = kt_dev_put(ctx, x, (size_t)(M * n) * sizeof(float));
    int32_t *idd = kt_dev(ctx, (size_t)M * sizeof(int32_t));
    KT_OK(kn_ctx_ops(ctx)->argmax(ctx, xd, M, n, idd));
    kt_dev_get(ctx, ids, idd, (size_t)M * sizeof(int32_t));
    kn_buf_free(ctx, xd);
    kn_buf_free(ctx, idd);
}

static void check_argmax(const kt_backend *b, kn_ctx *ctx, const float *x, int64_t M, int64_t n,
                         const char *what)
{
    int32_t *ids = malloc((size_t)M * sizeof(int32_t));
    run_argmax(ctx, x, M, n, ids);
    for (int64_t m = 0; m < M; m++)
        cr_assert_eq(ids[m], argmax_def(x + m * n, n), "%s %s: n=%ld row %ld: %d, want %d",
                     kt_backend_name(b), what, (long)n, (long)m, ids[m],
                     argmax_def(x + m * n, n));
    free(ids);
}

/* the lowest index among equal maxima wins, for every row length 1..200
 * (vector bodies, tails and lanes all hold ties) */
KT_BACKEND_TEST(kernels_argmax, ties_pick_the_lowest_index)
{
    kn_ctx *ctx = kt_open(b, 2);
    enum { M = 4 };
    float x[M * 200];
    for (int64_t n = 1; n <= 200; n++) {
        for (int64_t i = 0; i < M * n; i++) /* 5 distinct values: ties everywhere */
            x[i] = (float)(kt_rnd() % 5);
        for (int64_t i = 0; i < n; i++) /* row 3: all equal, answer 0 */
            x[3 * n + i] = 2.0f;
        check_argmax(b, ctx, x, M, n, "ties");
    }
    /* one maximum repeated in the last position of every vector and the tail */
    float y[131];
    for (int i = 0; i < 131; i++)
        y[i] = i % 8 == 7 || i == 130 ? 1.0f : 0.0f;
    int32_t id;
    run_argmax(ctx, y, 1, 131, &id);
    cr_assert_eq(id, 7, "%s: %d", kt_backend_name(b), id);
    kn_ctx_destroy(ctx);
}

/* a row of one element gives 0, NaN or not */
KT_BACKEND_TEST(kernels_argmax, rows_of_one_give_zero)
{
    kn_ctx *ctx = kt_open(b, 2);
    const float x[4] = {-3.0f, NAN, -INFINITY, 5.0f};
    int32_t ids[4];
    run_argmax(ctx, x, 4, 1, ids);
    for (int m = 0; m < 4; m++)
        cr_assert_eq(ids[m], 0, "%s row %d: %d", kt_backend_name(b), m, ids[m]);
    kn_ctx_destroy(ctx);
}

/* rows of 32000 logits (a vocabulary) with the maximum first, last, in the
 * middle and repeated far apart; 9 rows fan out over the pool */
KT_BACKEND_TEST(kernels_argmax, finds_the_max_of_32000_logits)
{
    kn_ctx *ctx = kt_open(b, 2);
    enum { M = 9, N = 32000 };
    float *x = kt_fvec(M * N);
    static const int64_t at[M] = {0, N - 1, 12345, 16, 31999 - 16, 7, 8000, 3, 24000};
    for (int64_t m = 0; m < M; m++)
        x[m * N + at[m]] = 2.0f;
    x[5 * N + 20000] = 2.0f; /* row 5: a later copy of its maximum */
    x[6 * N + 100] = 3.0f;   /* row 6: an earlier, larger one */
    check_argmax(b, ctx, x, M, N, "32000");
    int32_t ids[M];
    run_argmax(ctx, x, M, N, ids);
    cr_assert_eq(ids[6], 100);
    cr_assert_eq(ids[5], 7);
    for (int m = 0; m < M; m++)
        if (m != 6)
            cr_assert_eq(ids[m], at[m], "%s row %d: %d, want %ld", kt_backend_name(b), m, ids[m],
                         (long)at[m]);
    free(x);
    kn_ctx_destroy(ctx);
}

/* NaNs as the definition treats them: a NaN at x[0] is kept, a later NaN
 * is never chosen; -0 == +0 (first wins); infinities order normally */
KT_BACKEND_TEST(kernels_argmax, nan_and_signed_zero_follow_the_definition)
{
    kn_ctx *ctx = kt_open(b, 2);
    enum { N = 100 };
    float x[8 * N];
    for (int64_t i = 0; i < 8 * N; i++)
        x[i] = (float)(i % 13) - 20.0f;
    x[0 * N + 0] = NAN;       /* NaN first, numbers above it later: still 0 */
    x[0 * N + 50] = 100.0f;
    x[1 * N + 10] = NAN;      /* NaN among numbers: the numbers decide */
    x[1 * N + 40] = 5.0f;
    x[1 * N + 77] = NAN;
    for (int i = 0; i < N; i++) /* NaN first, one number later: x[0] stays */
        x[2 * N + i] = i == 33 ? -1.0f : NAN;
    for (int i = 0; i < N; i++) /* -0 and +0 tie, every other value below */
        x[3 * N + i] = i == 20 ? -0.0f : i == 30 ? 0.0f : -1.0f;
    for (int i = 0; i < N; i++) /* all -inf: 0 */
        x[4 * N + i] = -INFINITY;
    x[5 * N + 64] = INFINITY; /* +inf wins, first of two */
    x[5 * N + 90] = INFINITY;
    for (int i = 0; i < N; i++) /* a NaN in every vector lane but numbers first */
        x[6 * N + i] = i % 3 == 1 ? NAN : (float)(i % 5);
    for (int i = 0; i < N; i++) /* -inf first, NaNs, then one number */
        x[7 * N + i] = i == 0 ? -INFINITY : i == 99 ? -5.0f : NAN;
    check_argmax(b, ctx, x, 8, N, "nan");
    int32_t ids[8];
    run_argmax(ctx, x, 8, N, ids);
    static const int32_t want[8] = {0, 40, 0, 20, 0, 64, 9, 99};
    for (int m = 0; m < 8; m++)
        cr_assert_eq(ids[m], want[m], "%s row %d: %d, want %d", kt_backend_name(b), m, ids[m],
                     want[m]);
    kn_ctx_destroy(ctx);
}

/* NULL x/ids, non-positive sizes and rows longer than int32 ids can name
 * give -EINVAL and leave ids alone */
KT_BACKEND_TEST(kernels_argmax, rejects_invalid_arguments)
{
    kn_ctx *ctx = kt_open(b, 2);
    const kn_ops *ops = kn_ctx_ops(ctx);
    float *xd = kt_dev(ctx, 16 * sizeof(float));
    int32_t *idd = kt_dev(ctx, 4 * sizeof(int32_t));
    cr_assert_eq(ops->argmax(ctx, NULL, 2, 8, idd), -EINVAL);
    cr_assert_eq(ops->argmax(ctx, xd, 2, 8, NULL), -EINVAL);
    cr_assert_eq(ops->argmax(ctx, xd, 0, 8, idd), -EINVAL);
    cr_assert_eq(ops->argmax(ctx, xd, 2, 0, idd), -EINVAL);
    cr_assert_eq(ops->argmax(ctx, xd, -2, 8, idd), -EINVAL);
    cr_assert_eq(ops->argmax(ctx, xd, 1, (int64_t)INT32_MAX + 1, idd), -EINVAL);
    cr_assert_eq(ops->argmax(NULL, xd, 2, 8, idd), -EINVAL);
    int32_t got[4];
    kt_dev_get(ctx, got, idd, sizeof(got));
    for (int i = 0; i < 4; i++)
        cr_assert_eq(got[i], -1, "%s touched ids[%d]", kt_backend_name(b), i);
    kn_buf_free(ctx, xd);
    kn_buf_free(ctx, idd);
    kn_ctx_destroy(ctx);
}

/* ---- topk -------------------------------------------------------------------- */

static const float *g_sort_x;

/* descending value, ties by ascending index */
static int by_value_then_index(const void *a, const void *b)
{
    const int32_t i = *(const int32_t *)a, j = *(const int32_t *)b;
    if (g_sort_x[i] != g_sort_x[j])
        return g_sort_x[i] > g_sort_x[j] ? -1 : 1;
    return (i > j) - (i < j);
}

/* topk of backend b over host x[M][n] against a full sort of each row */
static void check_topk(const kt_backend *b, kn_ctx *ctx, const float *x, int64_t M, int64_t n,
                       int k, int with_vals)
{
    float *xd = kt_dev_put(ctx, x, (size_t)(M * n) * sizeof(float));
    float *vd = with_vals ? kt_dev(ctx, (size_t)(M * k) * sizeof(float)) : NULL;
    int32_t *idd = kt_dev(ctx, (size_t)(M * k) * sizeof(int32_t));
    KT_OK(kn_ctx_ops(ctx)->topk(ctx, xd, M, n, k, vd, idd));
    float *vals = malloc((size_t)(M * k) * sizeof(float));
    int32_t *ids = malloc((size_t)(M * k) * sizeof(int32_t));
    int32_t *order = malloc((size_t)n * sizeof(int32_t));
    kt_dev_get(ctx, ids, idd, (size_t)(M * k) * sizeof(int32_t));
    if (with_vals)
        kt_dev_get(ctx, vals, vd, (size_t)(M * k) * sizeof(float));
    for (int64_t m = 0; m < M; m++) {
        for (int64_t i = 0; i < n; i++)
            order[i] = (int32_t)i;
        g_sort_x = x + m * n;
        qsort(order, (size_t)n, sizeof(int32_t), by_value_then_index);
        for (int j = 0; j < k; j++) {
            cr_assert_eq(ids[m * k + j], order[j], "%s n=%ld k=%d row %ld rank %d: id %d, want %d",
                         kt_backend_name(b), (long)n, k, (long)m, j, ids[m * k + j], order[j]);
            if (with_vals)
                cr_assert(memcmp(&vals[m * k + j], &x[m * n + order[j]], sizeof(float)) == 0,
                          "%s n=%ld k=%d row %ld rank %d: value %g, want %g", kt_backend_name(b),
                          (long)n, k, (long)m, j, vals[m * k + j], x[m * n + order[j]]);
        }
    }
    free(vals);
    free(ids);
    free(order);
    kn_buf_free(ctx, xd);
    kn_buf_free(ctx, vd);
    kn_buf_free(ctx, idd);
}

/* best first with ties in index order, for k = 1, a middle k, k = n and
 * k = KN_TOPK_MAX, with and without vals */
KT_BACKEND_TEST(kernels_topk, matches_sorted_definition)
{
    kn_ctx *ctx = kt_open(b, 2);
    static const int64_t ns[] = {1, 5, 64, 100, 32000};
    for (size_t in = 0; in < sizeof(ns) / sizeof(ns[0]); in++) {
        const int64_t n = ns[in], M = n > 1000 ? 3 : 4;
        float *x = kt_fvec(M * n);
        for (int64_t i = 0; i < M * n; i++) /* coarse: ties among the best */
            x[i] = roundf(x[i] * (n > 1000 ? 200.0f : 6.0f));
        const int kmax = n < KN_TOPK_MAX ? (int)n : KN_TOPK_MAX;
        const int ks[4] = {1, kmax > 3 ? 3 : kmax, kmax, (int)(n < 7 ? n : 7)};
        for (int ik = 0; ik < 4; ik++)
            for (int with_vals = 0; with_vals <= 1; with_vals++)
                check_topk(b, ctx, x, M, n, ks[ik], with_vals);
        free(x);
    }
    kn_ctx_destroy(ctx);
}

/* a row of equal values gives indices 0..k-1 in order */
KT_BACKEND_TEST(kernels_topk, equal_values_keep_index_order)
{
    kn_ctx *ctx = kt_open(b, 2);
    float x[200];
    for (int i = 0; i < 200; i++)
        x[i] = 0.5f;
    check_topk(b, ctx, x, 1, 200, KN_TOPK_MAX, 1);
    kn_ctx_destroy(ctx);
}

/* k outside 1..min(n, KN_TOPK_MAX), NULL x/ids or non-positive sizes give
 * -EINVAL and leave vals and ids alone */
KT_BACKEND_TEST(kernels_topk, rejects_invalid_arguments)
{
    kn_ctx *ctx = kt_open(b, 2);
    const kn_ops *ops = kn_ctx_ops(ctx);
    enum { N = 100, CAP = 2 * (KN_TOPK_MAX + 1) };
    float *xd = kt_dev(ctx, 2 * N * sizeof(float));
    kt_dev_fill(ctx, xd, 0, 2 * N * sizeof(float));
    float *vd = kt_dev(ctx, CAP * sizeof(float));
    int32_t *idd = kt_dev(ctx, CAP * sizeof(int32_t));
    cr_assert_eq(ops->topk(ctx, xd, 2, N, 0, vd, idd), -EINVAL, "k = 0");
    cr_assert_eq(ops->topk(ctx, xd, 2, N, -1, vd, idd), -EINVAL, "k < 0");
    cr_assert_eq(ops->topk(ctx, xd, 2, N, KN_TOPK_MAX + 1, vd, idd), -EINVAL, "k > KN_TOPK_MAX");
    cr_assert_eq(ops->topk(ctx, xd, 2, 5, 6, vd, idd), -EINVAL, "k > n");
    cr_assert_eq(ops->topk(ctx, NULL, 2, N, 3, vd, idd), -EINVAL);
    cr_assert_eq(ops->topk(ctx, xd, 2, N, 3, vd, NULL), -EINVAL);
    cr_assert_eq(ops->topk(ctx, xd, 0, N, 3, vd, idd), -EINVAL);
    cr_assert_eq(ops->topk(ctx, xd, 2, 0, 3, vd, idd), -EINVAL);
    cr_assert_eq(ops->topk(ctx, xd, 2, -N, 3, vd, idd), -EINVAL);
    cr_assert_eq(ops->topk(NULL, xd, 2, N, 3, vd, idd), -EINVAL);
    uint32_t got[CAP];
    kt_dev_get(ctx, got, vd, sizeof(got));
    for (int i = 0; i < CAP; i++)
        cr_assert_eq(got[i], 0xffffffffu, "%s touched vals[%d]", kt_backend_name(b), i);
    kt_dev_get(ctx, got, idd, sizeof(got));
    for (int i = 0; i < CAP; i++)
        cr_assert_eq(got[i], 0xffffffffu, "%s touched ids[%d]", kt_backend_name(b), i);
    kn_buf_free(ctx, xd);
    kn_buf_free(ctx, vd);
    kn_buf_free(ctx, idd);
    kn_ctx_destroy(ctx);
}

/* ---- softmax_stats ----------------------------------------------------------- */

/* max, log-sum-exp and Medusa's entropy of x / T, computed in double, within
 * 1e-6 relative (the max exactly) of a double computation here; one row
 * and several (fanned out), peaked and flat rows, -inf logits */
KT_BACKEND_TEST(kernels_softmax_stats, matches_double_definition)
{
    kn_ctx *ctx = kt_open(b, 2);
    static const float temps[] = {0.25f, 0.7f, 1.0f, 3.0f};
    static const int64_t shapes[][2] = {{1, 1}, {1, 32000}, {6, 5000}, {3, 7}};
    for (size_t is = 0; is < 4; is++) {
        const int64_t M = shapes[is][0], n = shapes[is][1];
        float *x = kt_fvec(M * n);
        for (int64_t i = 0; i < M * n; i++)
            x[i] *= (i / n) % 2 ? 0.01f : 15.0f; /* odd rows nearly flat */
        if (n > 3)
            x[2] = -INFINITY; /* a masked logit: p = 0 */
        float *xd = kt_dev_put(ctx, x, (size_t)(M * n) * sizeof(float));
        for (size_t it = 0; it < 4; it++) {
            float *outd = kt_dev(ctx, (size_t)(M * 3) * sizeof(float));
            KT_OK(kn_ctx_ops(ctx)->softmax_stats(ctx, xd, M, n, temps[it], outd));
            float *out = malloc((size_t)(M * 3) * sizeof(float));
            kt_dev_get(ctx, out, outd, (size_t)(M * 3) * sizeof(float));
            for (int64_t m = 0; m < M; m++) {
                const float *r = x + m * n;
                const double T = temps[it], inv = 1.0 / T; /* kn.h: x * (1/T) */
                double mx = -INFINITY, sum = 0, ent = 0;
                for (int64_t i = 0; i < n; i++)
                    mx = fmax(mx, r[i] * inv);
                for (int64_t i = 0; i < n; i++)
                    sum += exp(r[i] * inv - mx);
                const double lse = mx + log(sum);
                for (int64_t i = 0; i < n; i++) {
                    const double pr = exp(r[i] * inv - lse);
                    ent -= pr * log(pr + 1e-5);
                }
                const double want[3] = {mx, lse, ent};
                for (int c = 0; c < 3; c++)
                    cr_assert(kt_close(out[m * 3 + c], (float)want[c], fabs(want[c]) + 1e-6,
                                       c == 0 ? 0.0 : 1e-6),
                              "%s n=%ld T=%g row %ld stat %d: %.9g, want %.9g",
                              kt_backend_name(b), (long)n, T, (long)m, c, out[m * 3 + c],
                              want[c]);
            }
            free(out);
            kn_buf_free(ctx, outd);
        }
        kn_buf_free(ctx, xd);
        free(x);
    }
    kn_ctx_destroy(ctx);
}

/* temperature <= 0 or NaN, NULL x/out or non-positive sizes give -EINVAL
 * and leave out alone */
KT_BACKEND_TEST(kernels_softmax_stats, rejects_invalid_arguments)
{
    kn_ctx *ctx = kt_open(b, 2);
    const kn_ops *ops = kn_ctx_ops(ctx);
    float *xd = kt_dev(ctx, 16 * sizeof(float));
    kt_dev_fill(ctx, xd, 0, 16 * sizeof(float));
    float *outd = kt_dev(ctx, 6 * sizeof(float));
    cr_assert_eq(ops->softmax_stats(ctx, xd, 2, 8, 0.0f, outd), -EINVAL, "T = 0");
    cr_assert_eq(ops->softmax_stats(ctx, xd, 2, 8, -1.0f, outd), -EINVAL, "T < 0");
    cr_assert_eq(ops->softmax_stats(ctx, xd, 2, 8, NAN, outd), -EINVAL, "T NaN");
    cr_assert_eq(ops->softmax_stats(ctx, NULL, 2, 8, 1.0f, outd), -EINVAL);
    cr_assert_eq(ops->softmax_stats(ctx, xd, 2, 8, 1.0f, NULL), -EINVAL);
    cr_assert_eq(ops->softmax_stats(ctx, xd, 0, 8, 1.0f, outd), -EINVAL);
    cr_assert_eq(ops->softmax_stats(ctx, xd, 2, 0, 1.0f, outd), -EINVAL);
    cr_assert_eq(ops->softmax_stats(NULL, xd, 2, 8, 1.0f, outd), -EINVAL);
    uint32_t got[6];
    kt_dev_get(ctx, got, outd, sizeof(got));
    for (int i = 0; i < 6; i++)
        cr_assert_eq(got[i], 0xffffffffu, "%s touched out[%d]", kt_backend_name(b), i);
    kn_buf_free(ctx, xd);
    kn_buf_free(ctx, outd);
    kn_ctx_destroy(ctx);
}

/* ---- gather ------------------------------------------------------------------ */

/* out[i] = x[idx[i]], repeated and far indices included */
KT_BACKEND_TEST(kernels_gather, picks_the_indexed_values)
{
    kn_ctx *ctx = kt_open(b, 2);
    enum { NX = 4 * 32000, N = 11 };
    float *x = kt_fvec(NX);
    const int64_t idx[N] = {0, NX - 1, 32000, 32000, 5, 64000 + 17, 3, 96000, 1, 2, 127999};
    float *xd = kt_dev_put(ctx, x, NX * sizeof(float));
    int64_t *idd = kt_dev_put(ctx, idx, sizeof(idx));
    float *outd = kt_dev(ctx, N * sizeof(float));
    KT_OK(kn_ctx_ops(ctx)->gather(ctx, xd, idd, N, outd));
    float out[N];
    kt_dev_get(ctx, out, outd, sizeof(out));
    for (int i = 0; i < N; i++)
        cr_assert(memcmp(&out[i], &x[idx[i]], sizeof(float)) == 0, "%s out[%d] = %g, want %g",
                  kt_backend_name(b), i, out[i], x[idx[i]]);
    kn_buf_free(ctx, xd);
    kn_buf_free(ctx, idd);
    kn_buf_free(ctx, outd);
    free(x);
    kn_ctx_destroy(ctx);
}

/* NULL x/idx/out or n <= 0 give -EINVAL and leave out alone */
KT_BACKEND_TEST(kernels_gather, rejects_invalid_arguments)
{
    kn_ctx *ctx = kt_open(b, 2);
    const kn_ops *ops = kn_ctx_ops(ctx);
    const int64_t idx[2] = {0, 1};
    float *xd = kt_dev(ctx, 4 * sizeof(float));
    int64_t *idd = kt_dev_put(ctx, idx, sizeof(idx));
    float *outd = kt_dev(ctx, 2 * sizeof(float));
    kt_dev_fill(ctx, xd, 0, 4 * sizeof(float));
    cr_assert_eq(ops->gather(ctx, NULL, idd, 2, outd), -EINVAL);
    cr_assert_eq(ops->gather(ctx, xd, NULL, 2, outd), -EINVAL);
    cr_assert_eq(ops->gather(ctx, xd, idd, 2, NULL), -EINVAL);
    cr_assert_eq(ops->gather(ctx, xd, idd, 0, outd), -EINVAL);
    cr_assert_eq(ops->gather(ctx, xd, idd, -2, outd), -EINVAL);
    cr_assert_eq(ops->gather(NULL, xd, idd, 2, outd), -EINVAL);
    uint32_t got[2];
    kt_dev_get(ctx, got, outd, sizeof(got));
    cr_assert(got[0] == 0xffffffffu && got[1] == 0xffffffffu, "%s touched out",
              kt_backend_name(b));
    kn_buf_free(ctx, xd);
    kn_buf_free(ctx, idd);
    kn_buf_free(ctx, outd);
    kn_ctx_destroy(ctx);
}
