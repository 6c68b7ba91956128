/* kernels: every op of every backend's table against the scalar reference
 * table, on random inputs. The backend under test sees only its own
 * buffers (kn_buf_alloc, kn_buf_upload, kn_buf_download), so these run
 * unchanged on a backend whose memory is not host memory; its outputs are
 * filled with 0xFF bytes (NaN as floats, -1 as ids) before the op, so an
 * element it leaves unwritten fails. The reference runs on host arrays on a
 * scalar ctx.
 *
 * Equality: bit for bit where kn.h promises it or the CPU tables share the
 * code (get_rows, add, kv_write, kv_copy, silu_res, argmax, topk,
 * softmax_stats, gather); otherwise the tolerances of test_ops.c (matmul:
 * 2e-5 * sum |w x| or the int8-activation emulation for Q8_0; rmsnorm,
 * silu_mul: 1e-5 relative; rope: 1e-5; attention: 2e-5 of max |v|). */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/kn.h"
#include "tests/kernels/util/kt.h"

/* The backend under test and the reference, 2 pool threads each (so that
 * ops that fan out do). */
typedef struct pair {
    kn_ctx *ctx, *ref;
    const kn_ops *ops, *rops;
    const char *name;
} pair;

static pair open_pair(const kt_backend *b)
{
    pair p = {.ctx = kt_open(b, 2), .ref = kt_ctx(2, KN_VARIANT_SCALAR)};
    p.name = kt_backend_name(b);
    p.ops = kn_ctx_ops(p.ctx);
    p.rops = kn_ctx_ops(p.ref);
    return p;
}

static void close_pair(pair *p)
{
    kn_ctx_destroy(p->ctx);
    kn_ctx_destroy(p->ref);
}

/* A copy of host weights in p's memory (free with kn_buf_free(data)). */
static kn_tensor dev_weight(const pair *p, const kn_tensor *w)
{
    kn_tensor d = *w;
    d.data = kt_dev_put(p->ctx, w->data, kn_row_bytes(w->type, w->cols) * (size_t)w->rows);
    return d;
}

/* n results of the backend (downloaded into a fresh host array, free()) */
static float *fetch(const pair *p, const float *dev, int64_t n)
{
    float *h = malloc((size_t)n * sizeof(float));
    cr_assert_not_null(h);
    kt_dev_get(p->ctx, h, dev, (size_t)n * sizeof(float));
    return h;
}

static void assert_bits_equal(const pair *p, const char *op, const void *got, const void *want,
                              int64_t n, size_t elem)
{
    for (int64_t i = 0; i < n; i++)
        cr_assert(memcmp((const char *)got + (size_t)i * elem,
                         (const char *)want + (size_t)i * elem, elem) == 0,
                  "%s %s: element %ld differs from the scalar reference", p->name, op, (long)i);
}

static const enum kn_dtype all_types[] = {KN_F32, KN_F16, KN_BF16, KN_Q8_0, KN_Q4_0};

/* ---- matmul, matmul_multi, get_rows ---------------------------------------- */

/* matmul of every weight type at matvec and GEMM sizes writes every output
 * within the matmul bound of the reference */
KT_BACKEND_TEST(kernels_reference, matmul_matches_scalar, .timeout = 60)
{
    pair p = open_pair(b);
    static const int64_t Ms[] = {1, 4, 9, 33};
    const int64_t N = 45, K = 544;
    float *x = kt_fvec(33 * K), *yr = kt_fvec(33 * N);
    float *xd = kt_dev_put(p.ctx, x, 33 * K * sizeof(float));
    for (size_t t = 0; t < 5; t++) {
        kn_tensor w;
        void *data = kt_weight(all_types[t], N, K, &w);
        const kn_tensor wd = dev_weight(&p, &w);
        float *wf = kt_dequant(&w);
        for (size_t im = 0; im < 4; im++) {
            const int64_t M = Ms[im];
            float *yd = kt_dev(p.ctx, (size_t)(M * N) * sizeof(float));
            KT_OK(p.rops->matmul(p.ref, &w, x, M, yr));
            KT_OK(p.ops->matmul(p.ctx, &wd, xd, M, yd));
            float *y = fetch(&p, yd, M * N);
            for (int64_t m = 0; m < M; m++)
                for (int64_t r = 0; r < N; r++) {
                    const kt_mm_bound bd = kt_mm_bound_of(all_types[t], wf + r * K, x + m * K, K);
                    cr_assert(kt_mm_ok(&bd, all_types[t], yr[m * N + r], y[m * N + r]),
                              "%s %s M=%ld [%ld][%ld]: %g vs %g", p.name,
                              kn_dtype_name(all_types[t]), (long)M, (long)m, (long)r,
                              y[m * N + r], yr[m * N + r]);
                }
            free(y);
            kn_buf_free(p.ctx, yd);
        }
        kn_buf_free(p.ctx, (void *)wd.data);
        free(wf);
        free(data);
    }
    kn_buf_free(p.ctx, xd);
    free(x);
    free(yr);
    close_pair(&p);
}

/* matmul_multi over 1..4 weights writes every output of every slot within
 * the matmul bound of the reference's separate matmuls */
KT_BACKEND_TEST(kernels_reference, matmul_multi_matches_scalar, .timeout = 60)
{
    pair p = open_pair(b);
    static const int64_t rows[4] = {40, 16, 16, 33};
    static const int64_t Ms[] = {1, 6};
    const int64_t K = 96;
    float *x = kt_fvec(6 * K);
    float *xd = kt_dev_put(p.ctx, x, 6 * K * sizeof(float));
    for (size_t t = 0; t < 5; t++)
        for (int n = 1; n <= 4; n++)
            for (size_t im = 0; im < 2; im++) {
                const int64_t M = Ms[im];
                kn_tensor w[4], wd[4];
                const kn_tensor *wdp[4];
                void *data[4];
                float *yd[4];
                for (int i = 0; i < n; i++) {
                    data[i] = kt_weight(all_types[t], rows[i], K, &w[i]);
                    wd[i] = dev_weight(&p, &w[i]);
                    wdp[i] = &wd[i];
                    yd[i] = kt_dev(p.ctx, (size_t)(M * rows[i]) * sizeof(float));
                }
                KT_OK(p.ops->matmul_multi(p.ctx, n, wdp, xd, M, yd));
                for (int i = 0; i < n; i++) {
                    float *yr = kt_fvec(M * rows[i]), *wf = kt_dequant(&w[i]);
                    KT_OK(p.rops->matmul(p.ref, &w[i], x, M, yr));
                    float *y = fetch(&p, yd[i], M * rows[i]);
                    for (int64_t m = 0; m < M; m++)
                        for (int64_t r = 0; r < rows[i]; r++) {
                            const kt_mm_bound bd =
                                kt_mm_bound_of(all_types[t], wf + r * K, x + m * K, K);
                            cr_assert(kt_mm_ok(&bd, all_types[t], yr[m * rows[i] + r],
                                               y[m * rows[i] + r]),
                                      "%s %s n=%d M=%ld slot %d [%ld][%ld]: %g vs %g", p.name,
                                      kn_dtype_name(all_types[t]), n, (long)M, i, (long)m,
                                      (long)r, y[m * rows[i] + r], yr[m * rows[i] + r]);
                        }
                    free(y);
                    free(yr);
                    free(wf);
                    kn_buf_free(p.ctx, yd[i]);
                    kn_buf_free(p.ctx, (void *)wd[i].data);
                    free(data[i]);
                }
            }
    kn_buf_free(p.ctx, xd);
    free(x);
    close_pair(&p);
}

/* get_rows of every type (ids in and out of range) equals the reference bit
 * for bit */
KT_BACKEND_TEST(kernels_reference, get_rows_matches_scalar)
{
    pair p = open_pair(b);
    const int32_t ids[] = {3, 0, 10, 3, 11, -1, 7};
    const int64_t n = 7, cols = 96;
    int32_t *idd = kt_dev_put(p.ctx, ids, sizeof(ids));
    float *want = kt_fvec(n * cols);
    for (size_t t = 0; t < 5; t++) {
        kn_tensor w;
        void *data = kt_weight(all_types[t], 11, cols, &w);
        const kn_tensor wd = dev_weight(&p, &w);
        float *outd = kt_dev(p.ctx, (size_t)(n * cols) * sizeof(float));
        KT_OK(p.rops->get_rows(p.ref, &w, ids, n, want));
        KT_OK(p.ops->get_rows(p.ctx, &wd, idd, n, outd));
        float *got = fetch(&p, outd, n * cols);
        assert_bits_equal(&p, kn_dtype_name(all_types[t]), got, want, n * cols, sizeof(float));
        free(got);
        kn_buf_free(p.ctx, outd);
        kn_buf_free(p.ctx, (void *)wd.data);
        free(data);
    }
    free(want);
    kn_buf_free(p.ctx, idd);
    close_pair(&p);
}

/* ---- elementwise ------------------------------------------------------------- */

/* rmsnorm, out of place (poisoned out) and in place, within 1e-5 of the
 * reference, at sizes that stay on one thread and that fan out */
KT_BACKEND_TEST(kernels_reference, rmsnorm_matches_scalar)
{
    pair p = open_pair(b);
    static const int64_t shapes[][2] = {{1, 7}, {3, 200}, {60, 768}};
    for (size_t is = 0; is < 3; is++) {
        const int64_t M = shapes[is][0], n = shapes[is][1];
        float *x = kt_fvec(M * n), *g = kt_fvec(n), *want = kt_fvec(M * n);
        KT_OK(p.rops->rmsnorm(p.ref, x, g, M, n, 1e-5f, want));
        float *xd = kt_dev_put(p.ctx, x, (size_t)(M * n) * sizeof(float));
        float *gd = kt_dev_put(p.ctx, g, (size_t)n * sizeof(float));
        float *outd = kt_dev(p.ctx, (size_t)(M * n) * sizeof(float));
        KT_OK(p.ops->rmsnorm(p.ctx, xd, gd, M, n, 1e-5f, outd));
        KT_OK(p.ops->rmsnorm(p.ctx, xd, gd, M, n, 1e-5f, xd));
        float *got = fetch(&p, outd, M * n), *inpl = fetch(&p, xd, M * n);
        for (int64_t i = 0; i < M * n; i++) {
            cr_assert(kt_close(got[i], want[i], fabs(want[i]) + 1e-6, 1e-5),
                      "%s M=%ld n=%ld [%ld]: %g vs %g", p.name, (long)M, (long)n, (long)i, got[i],
                      want[i]);
            cr_assert(kt_close(inpl[i], want[i], fabs(want[i]) + 1e-6, 1e-5),
                      "%s in place M=%ld n=%ld [%ld]: %g vs %g", p.name, (long)M, (long)n,
                      (long)i, inpl[i], want[i]);
        }
        free(got);
        free(inpl);
        kn_buf_free(p.ctx, xd);
        kn_buf_free(p.ctx, gd);
        kn_buf_free(p.ctx, outd);
        free(x);
        free(g);
        free(want);
    }
    close_pair(&p);
}

/* rope (full and partial rope_dims, one thread and fanned out) within 1e-5 */
KT_BACKEND_TEST(kernels_reference, rope_matches_scalar)
{
    pair p = open_pair(b);
    static const int shapes[][3] = {{3, 3, 8}, {67, 8, 64}, {2, 2, 128}}; /* M, heads, hd */
    for (size_t is = 0; is < 3; is++) {
        const int64_t M = shapes[is][0];
        const int nh = shapes[is][1], hd = shapes[is][2];
        int32_t *pos = malloc((size_t)M * sizeof(int32_t));
        for (int64_t m = 0; m < M; m++)
            pos[m] = (int32_t)(m * 977 % 6000);
        int32_t *posd = kt_dev_put(p.ctx, pos, (size_t)M * sizeof(int32_t));
        for (int rd = hd; rd >= hd / 2; rd -= hd / 2) {
            float *x = kt_fvec(M * nh * hd);
            float *xd = kt_dev_put(p.ctx, x, (size_t)(M * nh * hd) * sizeof(float));
            KT_OK(p.rops->rope(p.ref, x, M, nh, hd, rd, pos, 10000.0f));
            KT_OK(p.ops->rope(p.ctx, xd, M, nh, hd, rd, posd, 10000.0f));
            float *got = fetch(&p, xd, M * nh * hd);
            for (int64_t i = 0; i < M * nh * hd; i++)
                cr_assert(kt_close(got[i], x[i], 1.0, 1e-5), "%s hd=%d rd=%d [%ld]: %g vs %g",
                          p.name, hd, rd, (long)i, got[i], x[i]);
            free(got);
            free(x);
            kn_buf_free(p.ctx, xd);
        }
        kn_buf_free(p.ctx, posd);
        free(pos);
    }
    close_pair(&p);
}

/* silu_mul within 1e-5 and add bit for bit, below and above the fan-out size */
KT_BACKEND_TEST(kernels_reference, silu_mul_and_add_match_scalar)
{
    pair p = open_pair(b);
    static const int64_t sizes[] = {1, 7, 33, 40000};
    for (size_t is = 0; is < 4; is++) {
        const int64_t n = sizes[is];
        float *g = kt_fvec(n), *u = kt_fvec(n), *a = kt_fvec(n);
        for (int64_t i = 0; i < n; i++)
            g[i] *= 30.0f;
        float *gd = kt_dev_put(p.ctx, g, (size_t)n * sizeof(float));
        float *ud = kt_dev_put(p.ctx, u, (size_t)n * sizeof(float));
        float *ad = kt_dev_put(p.ctx, a, (size_t)n * sizeof(float));
        KT_OK(p.rops->silu_mul(p.ref, g, u, n));
        KT_OK(p.ops->silu_mul(p.ctx, gd, ud, n));
        KT_OK(p.rops->add(p.ref, a, u, n));
        KT_OK(p.ops->add(p.ctx, ad, ud, n));
        float *got = fetch(&p, gd, n), *gota = fetch(&p, ad, n);
        for (int64_t i = 0; i < n; i++)
            cr_assert(kt_close(got[i], g[i], fabs(g[i]) + 1e-6, 1e-5),
                      "%s silu_mul n=%ld [%ld]: %g vs %g", p.name, (long)n, (long)i, got[i], g[i]);
        assert_bits_equal(&p, "add", gota, a, n, sizeof(float));
        free(got);
        free(gota);
        kn_buf_free(p.ctx, gd);
        kn_buf_free(p.ctx, ud);
        kn_buf_free(p.ctx, ad);
        free(g);
        free(u);
        free(a);
    }
    close_pair(&p);
}

/* silu_res with and without a bias, one thread and fanned out, bit for bit */
KT_BACKEND_TEST(kernels_reference, silu_res_matches_scalar)
{
    pair p = open_pair(b);
    static const int64_t shapes[][3] = {{1, 1, 5}, {3, 4, 64}, {6, 3, 2048}}; /* M, heads, n */
    for (size_t is = 0; is < 3; is++) {
        const int64_t M = shapes[is][0], NH = shapes[is][1], n = shapes[is][2];
        float *x = kt_fvec(M * n), *z = kt_fvec(M * NH * n), *bias = kt_fvec(NH * n);
        float *want = kt_fvec(NH * M * n);
        for (int64_t i = 0; i < M * NH * n; i++)
            z[i] *= 20.0f;
        float *xd = kt_dev_put(p.ctx, x, (size_t)(M * n) * sizeof(float));
        float *zd = kt_dev_put(p.ctx, z, (size_t)(M * NH * n) * sizeof(float));
        float *bd = kt_dev_put(p.ctx, bias, (size_t)(NH * n) * sizeof(float));
        for (int with_bias = 0; with_bias <= 1; with_bias++) {
            float *outd = kt_dev(p.ctx, (size_t)(NH * M * n) * sizeof(float));
            KT_OK(p.rops->silu_res(p.ref, x, z, with_bias ? bias : NULL, M, NH, n, want));
            KT_OK(p.ops->silu_res(p.ctx, xd, zd, with_bias ? bd : NULL, M, NH, n, outd));
            float *got = fetch(&p, outd, NH * M * n);
            assert_bits_equal(&p, "silu_res", got, want, NH * M * n, sizeof(float));
            free(got);
            kn_buf_free(p.ctx, outd);
        }
        kn_buf_free(p.ctx, xd);
        kn_buf_free(p.ctx, zd);
        kn_buf_free(p.ctx, bd);
        free(x);
        free(z);
        free(bias);
        free(want);
    }
    close_pair(&p);
}

/* ---- attention --------------------------------------------------------------- */

/* attention (decode, causal batch, tree mask; GQA) within 2e-5 of max |v| */
KT_BACKEND_TEST(kernels_reference, attention_matches_scalar, .timeout = 30)
{
    pair p = open_pair(b);
    static const struct {
        int nh, nkv, hd, bs;
        int64_t past, nq;
        int mask;
    } cases[] = {{4, 2, 64, 16, 40, 1, 0}, {4, 2, 64, 16, 23, 37, 0}, {4, 4, 32, 5, 9, 10, 1},
                 {2, 1, 6, 4, 3, 9, 0}};
    for (size_t ic = 0; ic < sizeof(cases) / sizeof(cases[0]); ic++) {
        const int64_t n_ctx = cases[ic].past + cases[ic].nq, nq = cases[ic].nq;
        const int64_t nblk = (n_ctx + cases[ic].bs - 1) / cases[ic].bs + 2;
        const int64_t pool = nblk * cases[ic].bs * cases[ic].nkv * cases[ic].hd;
        const int64_t qn = nq * cases[ic].nh * cases[ic].hd;
        float *q = kt_fvec(qn), *k = kt_fvec(pool), *v = kt_fvec(pool), *want = kt_fvec(qn);
        int32_t *bt = malloc((size_t)nblk * sizeof(int32_t));
        uint8_t *mask = malloc((size_t)(nq * nq));
        for (int64_t i = 0; i < nblk; i++)
            bt[i] = (int32_t)(nblk - 1 - i);
        for (int64_t i = 0; i < nq; i++)
            for (int64_t j = 0; j < nq; j++)
                mask[i * nq + j] = j == 0 || j == i || (j < i && (i - j) % 2 == 0);
        const size_t scr = kn_attn_scratch_floats(n_ctx, 2) * sizeof(float);
        float *scratch = malloc(scr);
        kn_attn_args a = {.q = q, .out = want, .n_q = nq, .n_past = cases[ic].past,
                          .n_head = cases[ic].nh, .n_kv_head = cases[ic].nkv,
                          .head_dim = cases[ic].hd, .k_pool = k, .v_pool = v, .block_table = bt,
                          .block_size = cases[ic].bs, .mask = cases[ic].mask ? mask : NULL,
                          .scale = 1.0f / sqrtf((float)cases[ic].hd), .scratch = scratch};
        KT_OK(p.rops->attention(p.ref, &a));
        kn_attn_args d = a;
        d.q = kt_dev_put(p.ctx, q, (size_t)qn * sizeof(float));
        d.k_pool = kt_dev_put(p.ctx, k, (size_t)pool * sizeof(float));
        d.v_pool = kt_dev_put(p.ctx, v, (size_t)pool * sizeof(float));
        d.block_table = kt_dev_put(p.ctx, bt, (size_t)nblk * sizeof(int32_t));
        d.mask = cases[ic].mask ? kt_dev_put(p.ctx, mask, (size_t)(nq * nq)) : NULL;
        d.scratch = kt_dev(p.ctx, scr);
        d.out = kt_dev(p.ctx, (size_t)qn * sizeof(float));
        KT_OK(p.ops->attention(p.ctx, &d));
        float *got = fetch(&p, d.out, qn);
        for (int64_t i = 0; i < qn; i++)
            cr_assert(kt_close(got[i], want[i], 1.0, 2e-5), "%s case %zu [%ld]: %g vs %g",
                      p.name, ic, (long)i, got[i], want[i]);
        free(got);
        kn_buf_free(p.ctx, (void *)d.q);
        kn_buf_free(p.ctx, (void *)d.k_pool);
        kn_buf_free(p.ctx, (void *)d.v_pool);
        kn_buf_free(p.ctx, (void *)d.block_table);
        kn_buf_free(p.ctx, (void *)d.mask);
        kn_buf_free(p.ctx, d.scratch);
        kn_buf_free(p.ctx, d.out);
        free(q);
        free(k);
        free(v);
        free(want);
        free(bt);
        free(mask);
        free(scratch);
    }
    close_pair(&p);
}

/* ---- KV pool ----------------------------------------------------------------- */

/* kv_write (with padding slots; one thread and fanned out) leaves the same
 * pool as the reference, bit for bit */
KT_BACKEND_TEST(kernels_reference, kv_write_matches_scalar)
{
    pair p = open_pair(b);
    static const int64_t ns[] = {1, 5, 8, 100};
    const int64_t row = 24, slots_total = 160;
    for (size_t in = 0; in < 4; in++) {
        const int64_t n = ns[in];
        float *kp = malloc((size_t)(slots_total * row) * sizeof(float));
        float *vp = malloc((size_t)(slots_total * row) * sizeof(float));
        memset(kp, 0xff, (size_t)(slots_total * row) * sizeof(float));
        memset(vp, 0xff, (size_t)(slots_total * row) * sizeof(float));
        float *k = kt_fvec(n * row), *v = kt_fvec(n * row);
        int32_t *slots = malloc((size_t)n * sizeof(int32_t));
        for (int64_t i = 0; i < n; i++) /* distinct slots, every 7th row padding */
            slots[i] = i % 7 == 3 ? -1 : (int32_t)((i * 37 + 11) % slots_total);
        float *kpd = kt_dev(p.ctx, (size_t)(slots_total * row) * sizeof(float));
        float *vpd = kt_dev(p.ctx, (size_t)(slots_total * row) * sizeof(float));
        float *kd = kt_dev_put(p.ctx, k, (size_t)(n * row) * sizeof(float));
        float *vd = kt_dev_put(p.ctx, v, (size_t)(n * row) * sizeof(float));
        int32_t *sd = kt_dev_put(p.ctx, slots, (size_t)n * sizeof(int32_t));
        KT_OK(p.rops->kv_write(p.ref, kp, vp, row, slots, n, k, v));
        KT_OK(p.ops->kv_write(p.ctx, kpd, vpd, row, sd, n, kd, vd));
        float *gk = fetch(&p, kpd, slots_total * row), *gv = fetch(&p, vpd, slots_total * row);
        assert_bits_equal(&p, "kv_write k", gk, kp, slots_total * row, sizeof(float));
        assert_bits_equal(&p, "kv_write v", gv, vp, slots_total * row, sizeof(float));
        free(gk);
        free(gv);
        kn_buf_free(p.ctx, kpd);
        kn_buf_free(p.ctx, vpd);
        kn_buf_free(p.ctx, kd);
        kn_buf_free(p.ctx, vd);
        kn_buf_free(p.ctx, sd);
        free(kp);
        free(vp);
        free(k);
        free(v);
        free(slots);
    }
    close_pair(&p);
}

/* kv_copy over several planes (a compaction that moves rows down) leaves
 * the same pool as the reference, bit for bit */
KT_BACKEND_TEST(kernels_reference, kv_copy_matches_scalar)
{
    pair p = open_pair(b);
    const int64_t row = 12, rows = 40, plane = rows * row + 5, planes = 6;
    const int32_t src[] = {9, 12, 17, 30, 31, 39};
    const int32_t dst[] = {5, 6, 7, 8, 30, 9};
    const int64_t n = 6, total = planes * plane;
    float *pool = kt_fvec(total);
    float *pd = kt_dev_put(p.ctx, pool, (size_t)total * sizeof(float));
    KT_OK(p.rops->kv_copy(p.ref, pool, planes, plane, row, src, dst, n));
    KT_OK(p.ops->kv_copy(p.ctx, pd, planes, plane, row, src, dst, n));
    float *got = fetch(&p, pd, total);
    assert_bits_equal(&p, "kv_copy", got, pool, total, sizeof(float));
    free(got);
    kn_buf_free(p.ctx, pd);
    free(pool);
    close_pair(&p);
}

/* ---- rows of logits ---------------------------------------------------------- */

/* argmax (rows of 1, 37 and 32000 floats with ties; fanned out over 9 rows)
 * equals the reference */
KT_BACKEND_TEST(kernels_reference, argmax_matches_scalar)
{
    pair p = open_pair(b);
    static const int64_t shapes[][2] = {{3, 1}, {5, 37}, {9, 32000}, {2, 64 + 15}};
    for (size_t is = 0; is < 4; is++) {
        const int64_t M = shapes[is][0], n = shapes[is][1];
        float *x = kt_fvec(M * n);
        for (int64_t i = 0; i < M * n; i++) /* coarse values: many ties */
            x[i] = roundf(x[i] * 50.0f);
        int32_t *want = malloc((size_t)M * sizeof(int32_t));
        int32_t *got = malloc((size_t)M * sizeof(int32_t));
        float *xd = kt_dev_put(p.ctx, x, (size_t)(M * n) * sizeof(float));
        int32_t *idd = kt_dev(p.ctx, (size_t)M * sizeof(int32_t));
        KT_OK(p.rops->argmax(p.ref, x, M, n, want));
        KT_OK(p.ops->argmax(p.ctx, xd, M, n, idd));
        kt_dev_get(p.ctx, got, idd, (size_t)M * sizeof(int32_t));
        for (int64_t m = 0; m < M; m++)
            cr_assert_eq(got[m], want[m], "%s M=%ld n=%ld row %ld: %d vs %d", p.name, (long)M,
                         (long)n, (long)m, got[m], want[m]);
        kn_buf_free(p.ctx, xd);
        kn_buf_free(p.ctx, idd);
        free(x);
        free(want);
        free(got);
    }
    close_pair(&p);
}

/* topk (k 1, 10, KN_TOPK_MAX; with and without vals; ties) equals the
 * reference bit for bit */
KT_BACKEND_TEST(kernels_reference, topk_matches_scalar)
{
    pair p = open_pair(b);
    static const int ks[] = {1, 10, KN_TOPK_MAX};
    const int64_t M = 5, n = 32000;
    float *x = kt_fvec(M * n);
    for (int64_t i = 0; i < M * n; i++)
        x[i] = roundf(x[i] * 300.0f);
    float *xd = kt_dev_put(p.ctx, x, (size_t)(M * n) * sizeof(float));
    for (size_t ik = 0; ik < 3; ik++) {
        const int k = ks[ik];
        const size_t fb = (size_t)(M * k) * sizeof(float), ib = (size_t)(M * k) * sizeof(int32_t);
        float *wv = malloc(fb), *gv = malloc(fb);
        int32_t *wi = malloc(ib), *gi = malloc(ib);
        float *vd = kt_dev(p.ctx, fb);
        int32_t *idd = kt_dev(p.ctx, ib);
        KT_OK(p.rops->topk(p.ref, x, M, n, k, wv, wi));
        KT_OK(p.ops->topk(p.ctx, xd, M, n, k, vd, idd));
        kt_dev_get(p.ctx, gv, vd, fb);
        kt_dev_get(p.ctx, gi, idd, ib);
        assert_bits_equal(&p, "topk vals", gv, wv, M * k, sizeof(float));
        assert_bits_equal(&p, "topk ids", gi, wi, M * k, sizeof(int32_t));
        kt_dev_fill(p.ctx, idd, 0xff, ib);
        KT_OK(p.ops->topk(p.ctx, xd, M, n, k, NULL, idd));
        kt_dev_get(p.ctx, gi, idd, ib);
        assert_bits_equal(&p, "topk ids (vals NULL)", gi, wi, M * k, sizeof(int32_t));
        kn_buf_free(p.ctx, vd);
        kn_buf_free(p.ctx, idd);
        free(wv);
        free(gv);
        free(wi);
        free(gi);
    }
    kn_buf_free(p.ctx, xd);
    free(x);
    close_pair(&p);
}

/* softmax_stats (temperatures 0.3, 1, 2; one row and fanned out) equals the
 * reference bit for bit */
KT_BACKEND_TEST(kernels_reference, softmax_stats_matches_scalar)
{
    pair p = open_pair(b);
    static const float temps[] = {0.3f, 1.0f, 2.0f};
    static const int64_t shapes[][2] = {{1, 5}, {1, 32000}, {4, 3000}};
    for (size_t is = 0; is < 3; is++) {
        const int64_t M = shapes[is][0], n = shapes[is][1];
        float *x = kt_fvec(M * n), *want = kt_fvec(M * 3);
        for (int64_t i = 0; i < M * n; i++)
            x[i] *= 12.0f;
        float *xd = kt_dev_put(p.ctx, x, (size_t)(M * n) * sizeof(float));
        for (size_t it = 0; it < 3; it++) {
            float *outd = kt_dev(p.ctx, (size_t)(M * 3) * sizeof(float));
            KT_OK(p.rops->softmax_stats(p.ref, x, M, n, temps[it], want));
            KT_OK(p.ops->softmax_stats(p.ctx, xd, M, n, temps[it], outd));
            float *got = fetch(&p, outd, M * 3);
            assert_bits_equal(&p, "softmax_stats", got, want, M * 3, sizeof(float));
            free(got);
            kn_buf_free(p.ctx, outd);
        }
        kn_buf_free(p.ctx, xd);
        free(x);
        free(want);
    }
    close_pair(&p);
}

/* gather equals the reference bit for bit */
KT_BACKEND_TEST(kernels_reference, gather_matches_scalar)
{
    pair p = open_pair(b);
    const int64_t nx = 3 * 1000, n = 9;
    const int64_t idx[9] = {0, 2999, 1000, 1000, 7, 1999, 2000, 5, 42};
    float *x = kt_fvec(nx), want[9], got[9];
    float *xd = kt_dev_put(p.ctx, x, (size_t)nx * sizeof(float));
    int64_t *idd = kt_dev_put(p.ctx, idx, sizeof(idx));
    float *outd = kt_dev(p.ctx, sizeof(got));
    KT_OK(p.rops->gather(p.ref, x, idx, n, want));
    KT_OK(p.ops->gather(p.ctx, xd, idd, n, outd));
    kt_dev_get(p.ctx, got, outd, sizeof(got));
    assert_bits_equal(&p, "gather", got, want, n, sizeof(float));
    kn_buf_free(p.ctx, xd);
    kn_buf_free(p.ctx, idd);
    kn_buf_free(p.ctx, outd);
    free(x);
    close_pair(&p);
}
