/* kernels: the KV pool ops (kv_write, kv_copy) of every backend against
 * their definitions in kn.h: which rows move where, that nothing else in
 * the pool changes, and that invalid arguments leave the pool as it was.
 * Pools live in backend buffers (kn_buf_*), pre-filled with random "old"
 * contents so that a missing or stray write shows. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/kn.h"
#include "tests/kernels/util/kt.h"

static float *fetch(kn_ctx *ctx, const float *dev, int64_t n)
{
    float *h = malloc((size_t)n * sizeof(float));
    cr_assert_not_null(h);
    kt_dev_get(ctx, h, dev, (size_t)n * sizeof(float));
    return h;
}

static int rows_equal(const float *a, const float *b, int64_t n)
{
    return memcmp(a, b, (size_t)n * sizeof(float)) == 0;
}

/* ---- kv_write ---------------------------------------------------------------- */

/* row i of k/v lands in slot slots[i] of its pool; a negative slot writes
 * nothing; every other slot keeps its old contents (n below and above the
 * fan-out threshold of 8) */
KT_BACKEND_TEST(kernels_kv, write_copies_rows_to_their_slots)
{
    kn_ctx *ctx = kt_open(b, 2);
    const kn_ops *ops = kn_ctx_ops(ctx);
    static const int64_t ns[] = {1, 3, 8, 9, 64};
    const int64_t row = 20, n_slots = 150;
    for (size_t in = 0; in < sizeof(ns) / sizeof(ns[0]); in++) {
        const int64_t n = ns[in];
        float *old_k = kt_fvec(n_slots * row), *old_v = kt_fvec(n_slots * row);
        float *k = kt_fvec(n * row), *v = kt_fvec(n * row);
        int32_t *slots = malloc((size_t)n * sizeof(int32_t));
        for (int64_t i = 0; i < n; i++) /* scattered, distinct; row 1 is padding */
            slots[i] = i == 1 ? -1 : (int32_t)((i * 53 + 7) % n_slots);
        float *kp = kt_dev_put(ctx, old_k, (size_t)(n_slots * row) * sizeof(float));
        float *vp = kt_dev_put(ctx, old_v, (size_t)(n_slots * row) * sizeof(float));
        float *kd = kt_dev_put(ctx, k, (size_t)(n * row) * sizeof(float));
        float *vd = kt_dev_put(ctx, v, (size_t)(n * row) * sizeof(float));
        int32_t *sd = kt_dev_put(ctx, slots, (size_t)n * sizeof(int32_t));
        KT_OK(ops->kv_write(ctx, kp, vp, row, sd, n, kd, vd));
        float *gk = fetch(ctx, kp, n_slots * row), *gv = fetch(ctx, vp, n_slots * row);
        for (int64_t s = 0; s < n_slots; s++) {
            int64_t from = -1;
            for (int64_t i = 0; i < n; i++)
                if (slots[i] == s)
                    from = i;
            const float *wk = from >= 0 ? k + from * row : old_k + s * row;
            const float *wv = from >= 0 ? v + from * row : old_v + s * row;
            cr_assert(rows_equal(gk + s * row, wk, row) && rows_equal(gv + s * row, wv, row),
                      "%s n=%ld: slot %ld should hold %s", kt_backend_name(b), (long)n, (long)s,
                      from >= 0 ? "a new row" : "its old contents");
        }
        free(gk);
        free(gv);
        kn_buf_free(ctx, kp);
        kn_buf_free(ctx, vp);
        kn_buf_free(ctx, kd);
        kn_buf_free(ctx, vd);
        kn_buf_free(ctx, sd);
        free(old_k);
        free(old_v);
        free(k);
        free(v);
        free(slots);
    }
    kn_ctx_destroy(ctx);
}

/* NULL pools/slots/rows, row_floats <= 0 or n <= 0 give -EINVAL and leave
 * both pools as they were */
KT_BACKEND_TEST(kernels_kv, write_rejects_invalid_arguments)
{
    kn_ctx *ctx = kt_open(b, 2);
    const kn_ops *ops = kn_ctx_ops(ctx);
    const int64_t row = 4, n_slots = 4;
    const int32_t slots[2] = {0, 3};
    float *kp = kt_dev(ctx, (size_t)(n_slots * row) * sizeof(float));
    float *vp = kt_dev(ctx, (size_t)(n_slots * row) * sizeof(float));
    float *k = kt_dev(ctx, 2 * (size_t)row * sizeof(float));
    float *v = kt_dev(ctx, 2 * (size_t)row * sizeof(float));
    kt_dev_fill(ctx, k, 0, 2 * (size_t)row * sizeof(float));
    kt_dev_fill(ctx, v, 0, 2 * (size_t)row * sizeof(float));
    int32_t *sd = kt_dev_put(ctx, slots, sizeof(slots));
    cr_assert_eq(ops->kv_write(ctx, NULL, vp, row, sd, 2, k, v), -EINVAL);
    cr_assert_eq(ops->kv_write(ctx, kp, NULL, row, sd, 2, k, v), -EINVAL);
    cr_assert_eq(ops->kv_write(ctx, kp, vp, row, NULL, 2, k, v), -EINVAL);
    cr_assert_eq(ops->kv_write(ctx, kp, vp, row, sd, 2, NULL, v), -EINVAL);
    cr_assert_eq(ops->kv_write(ctx, kp, vp, row, sd, 2, k, NULL), -EINVAL);
    cr_assert_eq(ops->kv_write(ctx, kp, vp, 0, sd, 2, k, v), -EINVAL);
    cr_assert_eq(ops->kv_write(ctx, kp, vp, -4, sd, 2, k, v), -EINVAL);
    cr_assert_eq(ops->kv_write(ctx, kp, vp, row, sd, 0, k, v), -EINVAL);
    cr_assert_eq(ops->kv_write(ctx, kp, vp, row, sd, -2, k, v), -EINVAL);
    cr_assert_eq(ops->kv_write(NULL, kp, vp, row, sd, 2, k, v), -EINVAL);
    uint32_t got[16];
    for (int pool = 0; pool < 2; pool++) {
        kt_dev_get(ctx, got, pool ? vp : kp, sizeof(got));
        for (int i = 0; i < 16; i++)
            cr_assert_eq(got[i], 0xffffffffu, "%s touched %s pool element %d",
                         kt_backend_name(b), pool ? "v" : "k", i);
    }
    kn_buf_free(ctx, kp);
    kn_buf_free(ctx, vp);
    kn_buf_free(ctx, k);
    kn_buf_free(ctx, v);
    kn_buf_free(ctx, sd);
    kn_ctx_destroy(ctx);
}

/* ---- kv_copy ----------------------------------------------------------------- */

/* Runs kv_copy(src, dst) on a pool of random contents and checks every row
 * of every plane against the definition: row dst[i] = old row src[i],
 * every other row (and the gap after the last row of a plane) unchanged. */
static void check_copy(const kt_backend *b, kn_ctx *ctx, const int32_t *src, const int32_t *dst,
                       int64_t n)
{
    const kn_ops *ops = kn_ctx_ops(ctx);
    const int64_t row = 10, rows = 32, plane = rows * row + 3, planes = 5;
    const int64_t total = planes * plane;
    float *old = kt_fvec(total);
    float *pd = kt_dev_put(ctx, old, (size_t)total * sizeof(float));
    KT_OK(ops->kv_copy(ctx, pd, planes, plane, row, src, dst, n));
    float *got = fetch(ctx, pd, total);
    for (int64_t p = 0; p < planes; p++) {
        for (int64_t r = 0; r < rows; r++) {
            int64_t from = r;
            for (int64_t i = 0; i < n; i++)
                if (dst[i] == r)
                    from = src[i];
            cr_assert(rows_equal(got + p * plane + r * row, old + p * plane + from * row, row),
                      "%s n=%ld: plane %ld row %ld should be old row %ld", kt_backend_name(b),
                      (long)n, (long)p, (long)r, (long)from);
        }
        cr_assert(rows_equal(got + p * plane + rows * row, old + p * plane + rows * row,
                             plane - rows * row),
                  "%s: the tail of plane %ld changed", kt_backend_name(b), (long)p);
    }
    free(got);
    free(old);
    kn_buf_free(ctx, pd);
}

/* kv_copy moves rows in every plane, reading every source before any
 * write when the list obeys kn.h's rule (a destination is never a later
 * source), also for a list that would go wrong if run backwards */
KT_BACKEND_TEST(kernels_kv, copy_moves_rows_in_every_plane)
{
    kn_ctx *ctx = kt_open(b, 2);
    /* one row */
    check_copy(b, ctx, (const int32_t[]){7}, (const int32_t[]){2}, 1);
    /* Medusa compaction: accepted rows move down onto the ones before them
     * (row 6 is written after it was read; backwards, 7 would land in 6 and
     * then be copied on to 3) */
    check_copy(b, ctx, (const int32_t[]){3, 6, 7, 9}, (const int32_t[]){1, 3, 6, 7}, 4);
    /* a row onto itself, and destinations that are earlier sources */
    check_copy(b, ctx, (const int32_t[]){5, 4, 0, 31}, (const int32_t[]){5, 2, 4, 0}, 4);
    kn_ctx_destroy(ctx);
}

/* NULL pool/lists, non-positive sizes, a row wider than a plane and rows
 * outside the plane give -EINVAL and leave the pool as it was */
KT_BACKEND_TEST(kernels_kv, copy_rejects_invalid_arguments)
{
    kn_ctx *ctx = kt_open(b, 2);
    const kn_ops *ops = kn_ctx_ops(ctx);
    const int64_t row = 4, plane = 16, planes = 2; /* 4 rows a plane */
    float *old = kt_fvec(planes * plane);
    float *pd = kt_dev_put(ctx, old, (size_t)(planes * plane) * sizeof(float));
    const int32_t src[2] = {1, 2}, dst[2] = {0, 3};
    const int32_t neg[2] = {1, -1}, past[2] = {1, 4};
    cr_assert_eq(ops->kv_copy(ctx, NULL, planes, plane, row, src, dst, 2), -EINVAL);
    cr_assert_eq(ops->kv_copy(ctx, pd, planes, plane, row, NULL, dst, 2), -EINVAL);
    cr_assert_eq(ops->kv_copy(ctx, pd, planes, plane, row, src, NULL, 2), -EINVAL);
    cr_assert_eq(ops->kv_copy(ctx, pd, 0, plane, row, src, dst, 2), -EINVAL);
    cr_assert_eq(ops->kv_copy(ctx, pd, planes, 0, row, src, dst, 2), -EINVAL);
    cr_assert_eq(ops->kv_copy(ctx, pd, planes, plane, 0, src, dst, 2), -EINVAL);
    cr_assert_eq(ops->kv_copy(ctx, pd, planes, plane, plane + 1, src, dst, 2), -EINVAL);
    cr_assert_eq(ops->kv_copy(ctx, pd, planes, plane, row, src, dst, 0), -EINVAL);
    cr_assert_eq(ops->kv_copy(ctx, pd, planes, plane, row, neg, dst, 2), -EINVAL, "src < 0");
    cr_assert_eq(ops->kv_copy(ctx, pd, planes, plane, row, src, neg, 2), -EINVAL, "dst < 0");
    cr_assert_eq(ops->kv_copy(ctx, pd, planes, plane, row, past, dst, 2), -EINVAL, "src past");
    cr_assert_eq(ops->kv_copy(ctx, pd, planes, plane, row, src, past, 2), -EINVAL, "dst past");
    cr_assert_eq(ops->kv_copy(NULL, pd, planes, plane, row, src, dst, 2), -EINVAL);
    float *got = fetch(ctx, pd, planes * plane);
    cr_assert(rows_equal(got, old, planes * plane), "%s: a rejected copy changed the pool",
              kt_backend_name(b));
    free(got);
    free(old);
    kn_buf_free(ctx, pd);
    kn_ctx_destroy(ctx);
}
