/* kernels: the pre-existing ops (matmul, matmul_multi, get_rows, rmsnorm,
 * rope, silu_mul, add, attention; silu_res) of every backend against
 * double-precision definitions and the scalar reference, their -EINVAL
 * paths, the batch invariances the engine relies on, quantisation formats,
 * the thread pool, variant dispatch and weight packing. Tests that take a
 * backend run once per entry of kt_backend_params() and are reported as
 * skipped, with the reason, where this machine cannot run it; they pass
 * host arrays (kt_open_host). test_reference.c runs every op through
 * backend buffers.
 *
 * Error bounds (all relative to a magnitude the result cannot beat):
 *  - matmul with unquantised activations (F32/F16/BF16/Q4_0 weights, and
 *    Q8_0 on the float path): variants see bit-identical weights, so only the
 *    f32 summation order differs: |y - ref| <= 2e-5 * sum_k |w x|.
 *  - Q8_0 on the quantised-activation (integer dot) path: the result must
 *    match, within the same 2e-5, the test's own emulation of that path (x
 *    rounded to int8 per block of 32 with an f32 scale amax/127, exact
 *    integer block dots, f32 block scales); an element whose x*127/amax lies
 *    within 1e-5 of a .5 tie may round either way and widens the bound by
 *    its |w| * scale. A Q8_0 result must match one of the two paths (the
 *    AVX-512 variant takes the integer path for every M, others the float one).
 *    The loose worst-case bound of activation rounding alone
 *    (sum_b amax_b/254 * sum_b|w|) would hide real bugs such as a wrong bias
 *    correction, so it is not used. (kt_mm_bound_of / kt_mm_ok)
 *  - elementwise ops: 1e-5 relative (+1e-6 absolute where values cross 0);
 *    vector exp is a polynomial (~2 ulp), rope angles are computed identically.
 *  - attention: 2e-5 relative to max |v| (softmax weights sum to 1).
 * Outputs are poisoned with NaN before every run and NaN never compares ok. */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/common.h"
#include "kernels/kn.h"
#include "tests/kernels/util/kt.h"

/* ---- conversions and quantisation ----------------------------------------- */

Test(kernels_quant, f16_round_trips_every_value)
{
    for (uint32_t h = 0; h < 65536; h++) {
        float f = kn_f16_to_f32((uint16_t)h);
        if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff)) {
            cr_assert(isnan(f), "0x%04x must decode to NaN", h);
            cr_assert_eq(kn_f32_to_f16(f) & 0x7c00, 0x7c00);
            continue;
        }
        cr_assert_eq(kn_f32_to_f16(f), h, "0x%04x -> %g -> 0x%04x", h, f, kn_f32_to_f16(f));
    }
}

/* f32 -> f16 rounds to nearest even, into the subnormals and up to inf */
Test(kernels_quant, f16_rounds_to_nearest_even)
{
    cr_assert_eq(kn_f32_to_f16(1.0f), 0x3c00);
    cr_assert_eq(kn_f32_to_f16(65504.0f), 0x7bff);
    cr_assert_eq(kn_f32_to_f16(65519.0f), 0x7bff);
    cr_assert_eq(kn_f32_to_f16(65520.0f), 0x7c00, "halfway above max rounds to inf");
    cr_assert_eq(kn_f32_to_f16(-INFINITY), 0xfc00);
    cr_assert_eq(kn_f32_to_f16(0x1p-24f), 0x0001);
    cr_assert_eq(kn_f32_to_f16(0x1p-25f), 0x0000, "tie rounds to even (0)");
    cr_assert_eq(kn_f32_to_f16(0x1.8p-24f), 0x0002, "tie rounds to even (2)");
    cr_assert_eq(kn_f32_to_f16(1.0f + 0x1p-11f), 0x3c00, "tie rounds to even");
    cr_assert_eq(kn_f32_to_f16(1.0f + 0x1.8p-11f), 0x3c01);
    cr_assert_eq(kn_f32_to_f16(0x1.ffcp-15f), 0x0400, "rounds up into the normals");
}

/* f32 -> bf16 rounds to nearest even and keeps NaN a NaN */
Test(kernels_quant, bf16_rounds_to_nearest_even)
{
    cr_assert_eq(kn_f32_to_bf16(1.0f), 0x3f80);
    cr_assert_eq(kn_f32_to_bf16(1.0f + 0x1p-8f), 0x3f80, "tie to even");
    cr_assert_eq(kn_f32_to_bf16(1.0f + 0x1.8p-8f), 0x3f81);
    cr_assert_eq(kn_f32_to_bf16(1.0f + 0x1.8p-7f), 0x3f82, "tie to even, up");
    cr_assert(isnan(kn_bf16_to_f32(kn_f32_to_bf16(NAN))));
    cr_assert_eq(kn_bf16_to_f32(0xc000), -2.0f);
}

/* row sizes per type, 0 for partial blocks or unknown types; dtype names */
Test(kernels_quant, row_bytes_and_names)
{
    cr_assert_eq(kn_row_bytes(KN_F32, 10), 40);
    cr_assert_eq(kn_row_bytes(KN_F16, 10), 20);
    cr_assert_eq(kn_row_bytes(KN_BF16, 10), 20);
    cr_assert_eq(kn_row_bytes(KN_Q8_0, 64), 68);
    cr_assert_eq(kn_row_bytes(KN_Q4_0, 64), 36);
    cr_assert_eq(kn_row_bytes(KN_Q8_0, 40), 0, "not a multiple of the block");
    cr_assert_eq(kn_row_bytes((enum kn_dtype)99, 32), 0);
    cr_assert_str_eq(kn_dtype_name(KN_Q8_0), "q8_0");
    cr_assert_str_eq(kn_dtype_name((enum kn_dtype)99), "unknown");
    float x[40] = {0};
    char buf[256];
    cr_assert_eq(kn_quantize_row(KN_Q8_0, x, 40, buf), -EINVAL);
    cr_assert_eq(kn_quantize_row((enum kn_dtype)99, x, 32, buf), -EINVAL);
}

/* Q8_0 quantises with ggml's scale (amax / 127, f16) and rounding */
Test(kernels_quant, q8_0_matches_ggml_reference)
{
    float x[32];
    for (int j = 0; j < 32; j++)
        x[j] = (float)(j - 16) * 0.25f; /* amax = 4 at j = 0 */
    unsigned char b[34];
    cr_assert_eq(kn_quantize_row(KN_Q8_0, x, 32, b), 34);
    uint16_t d16;
    memcpy(&d16, b, 2);
    cr_assert_eq(d16, kn_f32_to_f16(4.0f / 127.0f));
    const float id = 127.0f / 4.0f;
    for (int j = 0; j < 32; j++)
        cr_assert_eq((int8_t)b[2 + j], (int8_t)roundf(x[j] * id), "element %d", j);
    float y[32];
    kn_dequantize_row(KN_Q8_0, b, 32, y);
    for (int j = 0; j < 32; j++)
        cr_assert_leq(fabsf(y[j] - x[j]), 4.0f / 127.0f * 0.5f + 4e-3f, "element %d", j);
}

/* Q4_0 uses ggml's nibble layout and scale (extreme / -8) */
Test(kernels_quant, q4_0_layout_and_round_trip)
{
    float x[64];
    for (int j = 0; j < 64; j++)
        x[j] = kt_frand();
    x[5] = -1.5f; /* the largest magnitude, negative: d = -1.5 / -8 > 0 */
    unsigned char b[36];
    cr_assert_eq(kn_quantize_row(KN_Q4_0, x, 64, b), 36);
    uint16_t d16;
    memcpy(&d16, b, 2);
    const float d = kn_f16_to_f32(d16);
    cr_assert_float_eq(d, 1.5f / 8.0f, 1e-3);
    cr_assert_eq(b[2 + 5] & 0x0f, 0, "the extreme value maps to nibble 0 (-8)");
    float y[64];
    kn_dequantize_row(KN_Q4_0, b, 64, y);
    for (int j = 0; j < 32; j++) {
        int lo = b[2 + (j % 16)] & 0x0f, hi = b[2 + (j % 16)] >> 4;
        int q = j < 16 ? lo : hi;
        cr_assert_eq(y[j], (float)(q - 8) * d, "element %d takes the %s nibble", j,
                     j < 16 ? "low" : "high");
        cr_assert_leq(fabsf(y[j] - x[j]), d * 0.5f + 1e-3f, "element %d", j);
    }
}

/* F16 and BF16 round trips stay within half an ulp of the type */
Test(kernels_quant, float_types_round_trip)
{
    float x[48], y[48];
    uint16_t h[48];
    for (int j = 0; j < 48; j++)
        x[j] = kt_frand() * 100.0f;
    cr_assert_eq(kn_quantize_row(KN_F16, x, 48, h), 96);
    kn_dequantize_row(KN_F16, h, 48, y);
    for (int j = 0; j < 48; j++)
        cr_assert_leq(fabsf(y[j] - x[j]), fabsf(x[j]) * 0x1p-11f);
    cr_assert_eq(kn_quantize_row(KN_BF16, x, 48, h), 96);
    kn_dequantize_row(KN_BF16, h, 48, y);
    for (int j = 0; j < 48; j++)
        cr_assert_leq(fabsf(y[j] - x[j]), fabsf(x[j]) * 0x1p-8f);
}

/* ---- matmul -------------------------------------------------------------- */

/* Checks y (from backend b) against the scalar reference yr and both against
 * a double-precision definition. */
static void check_matmul(const kt_backend *b, enum kn_dtype t, int64_t N, int64_t K, int64_t M,
                         int threads)
{
    kn_ctx *ctx = kt_open_host(b, threads), *ref = kt_ctx(threads, KN_VARIANT_SCALAR);
    const kn_ops *ops = kn_ctx_ops(ctx);
    kn_tensor w;
    void *data = kt_weight(t, N, K, &w);
    float *x = kt_fvec(M * K), *y = kt_fvec(M * N), *yr = kt_fvec(M * N);
    float *wf = kt_dequant(&w);
    kt_poison(yr, M * N);
    KT_OK(kn_ctx_ops(ref)->matmul(ref, &w, x, M, yr));
    kt_poison(y, M * N);
    KT_OK(ops->matmul(ctx, &w, x, M, y));
    for (int64_t m = 0; m < M; m++) {
        for (int64_t r = 0; r < N; r++) {
            const kt_mm_bound bd = kt_mm_bound_of(t, wf + r * K, x + m * K, K);
            float rv = yr[m * N + r], got = y[m * N + r];
            cr_assert(kt_close(rv, (float)bd.exact, bd.mag, 2e-5),
                      "scalar %s N=%ld K=%ld M=%ld [%ld][%ld]: %g vs exact %g", kn_dtype_name(t),
                      (long)N, (long)K, (long)M, (long)m, (long)r, rv, bd.exact);
            cr_assert(kt_mm_ok(&bd, t, rv, got),
                      "%s %s N=%ld K=%ld M=%ld threads=%d [%ld][%ld]: %g vs ref %g "
                      "(int8-activation emulation %g)",
                      ops->name, kn_dtype_name(t), (long)N, (long)K, (long)M, threads, (long)m,
                      (long)r, got, rv, bd.emu);
        }
    }
    kn_ctx_destroy(ctx);
    kn_ctx_destroy(ref);
    free(wf);
    free(x);
    free(y);
    free(yr);
    free(data);
}

static const enum kn_dtype all_types[] = {KN_F32, KN_F16, KN_BF16, KN_Q8_0, KN_Q4_0};

/* decode-sized M (the matvec path) for every weight type */
KT_BACKEND_TEST(kernels_matmul, matches_reference_small_m, .timeout = 60)
{
    static const int64_t Ms[] = {1, 2, 3, 4};
    for (size_t t = 0; t < 5; t++)
        for (size_t im = 0; im < 4; im++) {
            check_matmul(b, all_types[t], 37, 96, Ms[im], 2);
            check_matmul(b, all_types[t], 5, 64, Ms[im], 1);
        }
}

/* F32/F16/BF16 rows need not be whole blocks: vector tails */
KT_BACKEND_TEST(kernels_matmul, matches_reference_odd_widths)
{
    static const int64_t Ks[] = {1, 7, 37, 50, 300};
    for (size_t t = 0; t < 3; t++)
        for (size_t ik = 0; ik < 5; ik++) {
            check_matmul(b, all_types[t], 19, Ks[ik], 1, 2);
            check_matmul(b, all_types[t], 19, Ks[ik], 17, 2);
        }
}

/* M past the matvec cut-off, partial row/col tiles, K spanning several KC
 * blocks (KC = 256 on AVX2, 384 on AVX-512) with a ragged last one */
KT_BACKEND_TEST(kernels_matmul, matches_reference_gemm_shapes, .timeout = 120)
{
    static const int64_t Ms[] = {5, 17, 33};
    for (size_t t = 0; t < 5; t++)
        for (size_t im = 0; im < 3; im++)
            check_matmul(b, all_types[t], 45, 544, Ms[im], 2);
    check_matmul(b, KN_F32, 70, 160, 9, 7);
    check_matmul(b, KN_Q8_0, 70, 160, 64, 7);
    check_matmul(b, KN_F16, 1, 32, 40, 2);
    /* every height of the ragged last Q8_0 tile (8-row tiles) */
    static const int64_t Mq[] = {6, 7, 10, 11, 12, 14, 23};
    for (size_t im = 0; im < sizeof(Mq) / sizeof(Mq[0]); im++)
        check_matmul(b, KN_Q8_0, 45, 160, Mq[im], 2);
    /* K not a multiple of 4: the scalar tail of the 4 x 4 panel transpose */
    check_matmul(b, KN_F32, 45, 301, 9, 2);
    check_matmul(b, KN_F16, 19, 139, 13, 3);
    check_matmul(b, KN_BF16, 19, 37, 6, 2);
}

/* matmul_multi must equal one matmul per weight, bit for bit (the same
 * per-row code runs; only the scheduling differs). */
static void check_matmul_multi(const kt_backend *b, const enum kn_dtype *types,
                               const int64_t *rows, int n, int64_t K, int64_t M, int threads)
{
    kn_tensor w[4];
    void *data[4];
    float *y[4], *yr[4];
    const kn_tensor *wp[4];
    cr_assert(n <= 4);
    kn_ctx *ctx = kt_open_host(b, threads);
    const kn_ops *ops = kn_ctx_ops(ctx);
    cr_assert_not_null(ops->matmul_multi, "%s has no matmul_multi", kt_backend_name(b));
    for (int i = 0; i < n; i++) {
        data[i] = kt_weight(types[i], rows[i], K, &w[i]);
        wp[i] = &w[i];
        y[i] = kt_fvec(M * rows[i]);
        yr[i] = kt_fvec(M * rows[i]);
    }
    float *x = kt_fvec(M * K);
    for (int i = 0; i < n; i++) {
        kt_poison(y[i], M * rows[i]);
        KT_OK(ops->matmul(ctx, &w[i], x, M, yr[i]));
    }
    KT_OK(ops->matmul_multi(ctx, n, wp, x, M, y));
    for (int i = 0; i < n; i++)
        for (int64_t e = 0; e < M * rows[i]; e++)
            cr_assert(memcmp(&y[i][e], &yr[i][e], sizeof(float)) == 0,
                      "%s n=%d M=%ld weight %d (%s, %ld rows) [%ld]: %g vs %g",
                      kt_backend_name(b), n, (long)M, i, kn_dtype_name(types[i]), (long)rows[i],
                      (long)e, y[i][e], yr[i][e]);
    kn_ctx_destroy(ctx);
    for (int i = 0; i < n; i++) {
        free(data[i]);
        free(y[i]);
        free(yr[i]);
    }
    free(x);
}

/* matmul_multi gives what separate matmuls give, for every n 1..4, type
 * and M across the fused-matvec / GEMM switch */
KT_BACKEND_TEST(kernels_matmul, multi_matches_separate_matmuls, .timeout = 60)
{
    static const int64_t rows[] = {37, 300, 16, 45};
    static const int64_t Ms[] = {1, 3, 4, 6};
    for (size_t t = 0; t < 5; t++) {
        const enum kn_dtype ty[4] = {all_types[t], all_types[t], all_types[t], all_types[t]};
        for (size_t im = 0; im < 4; im++) {
            check_matmul_multi(b, ty, rows, 3, 96, Ms[im], 2);
            check_matmul_multi(b, ty, rows + 1, 2, 64, Ms[im], 3);
        }
        check_matmul_multi(b, ty, rows, 1, 96, 1, 2);
        check_matmul_multi(b, ty, rows, 4, 64, 1, 2); /* every slot one fused job takes */
    }
    /* mixed types cannot share a job */
    const enum kn_dtype mixed[3] = {KN_F32, KN_Q8_0, KN_F16};
    check_matmul_multi(b, mixed, rows, 3, 64, 1, 2);
}

/* an invalid slot, n outside 1..4 or a NULL x/w/y gives -EINVAL and leaves
 * every y as it was */
KT_BACKEND_TEST(kernels_matmul, multi_rejects_invalid_arguments)
{
    kn_ctx *ctx = kt_open_host(b, 2);
    const kn_ops *ops = kn_ctx_ops(ctx);
    kn_tensor w;
    void *data = kt_weight(KN_F32, 16, 32, &w);
    float x[32] = {0}, y0[16], y1[16];
    for (int i = 0; i < 16; i++)
        y0[i] = y1[i] = 7.0f;
    kn_tensor bad = w;
    bad.data = NULL;
    const kn_tensor *ws[5] = {&w, &bad, &w, &w, &w};
    const kn_tensor *ws_null[2] = {&w, NULL};
    float *ys[5] = {y0, y1, y1, y1, y1};
    float *ys_null[2] = {y0, NULL};
    const kn_tensor *ws_ok[5] = {&w, &w, &w, &w, &w};
    cr_assert_eq(ops->matmul_multi(ctx, 2, ws, x, 1, ys), -EINVAL, "bad weight in slot 1");
    cr_assert_eq(ops->matmul_multi(ctx, 2, ws_null, x, 1, ys), -EINVAL, "NULL weight in slot 1");
    cr_assert_eq(ops->matmul_multi(ctx, 2, ws_ok, x, 1, ys_null), -EINVAL, "NULL y in slot 1");
    cr_assert_eq(ops->matmul_multi(ctx, 0, ws_ok, x, 1, ys), -EINVAL, "n = 0");
    cr_assert_eq(ops->matmul_multi(ctx, -1, ws_ok, x, 1, ys), -EINVAL, "n < 0");
    cr_assert_eq(ops->matmul_multi(ctx, 5, ws_ok, x, 1, ys), -EINVAL, "n > KN_MULTI_MAX");
    cr_assert_eq(ops->matmul_multi(ctx, 2, ws_ok, NULL, 1, ys), -EINVAL, "NULL x");
    cr_assert_eq(ops->matmul_multi(ctx, 2, NULL, x, 1, ys), -EINVAL, "NULL w");
    cr_assert_eq(ops->matmul_multi(ctx, 2, ws_ok, x, 1, NULL), -EINVAL, "NULL y");
    cr_assert_eq(ops->matmul_multi(ctx, 2, ws_ok, x, 0, ys), -EINVAL, "M = 0");
    cr_assert_eq(ops->matmul_multi(NULL, 2, ws_ok, x, 1, ys), -EINVAL, "NULL ctx");
    for (int i = 0; i < 16; i++)
        cr_assert(y0[i] == 7.0f && y1[i] == 7.0f, "%s touched y[%d]", kt_backend_name(b), i);
    kn_ctx_destroy(ctx);
    free(data);
}

/* a bad weight (NULL, no data, empty, partial block, unknown type), a NULL
 * x/y or M <= 0 gives -EINVAL and leaves y as it was */
KT_BACKEND_TEST(kernels_matmul, rejects_invalid_arguments)
{
    kn_ctx *ctx = kt_open_host(b, 2);
    const kn_ops *ops = kn_ctx_ops(ctx);
    float x[64] = {0}, y[4] = {1, 2, 3, 4};
    const kn_tensor ok = {.data = x, .type = KN_F32, .rows = 2, .cols = 2};
    const kn_tensor bads[] = {
        {.data = x, .type = KN_Q8_0, .rows = 1, .cols = 20}, /* not whole blocks */
        {.data = NULL, .type = KN_F32, .rows = 2, .cols = 2},
        {.data = x, .type = KN_F32, .rows = 0, .cols = 2},
        {.data = x, .type = KN_F32, .rows = 2, .cols = 0},
        {.data = x, .type = KN_F32, .rows = -1, .cols = 2},
        {.data = x, .type = (enum kn_dtype)99, .rows = 2, .cols = 32},
    };
    for (size_t i = 0; i < sizeof(bads) / sizeof(bads[0]); i++)
        cr_assert_eq(ops->matmul(ctx, &bads[i], x, 1, y), -EINVAL, "bad weight %zu", i);
    cr_assert_eq(ops->matmul(ctx, NULL, x, 1, y), -EINVAL);
    cr_assert_eq(ops->matmul(ctx, &ok, NULL, 1, y), -EINVAL);
    cr_assert_eq(ops->matmul(ctx, &ok, x, 1, NULL), -EINVAL);
    cr_assert_eq(ops->matmul(ctx, &ok, x, 0, y), -EINVAL);
    cr_assert_eq(ops->matmul(ctx, &ok, x, -3, y), -EINVAL);
    cr_assert_eq(ops->matmul(NULL, &ok, x, 1, y), -EINVAL);
    for (int i = 0; i < 4; i++)
        cr_assert_eq(y[i], (float)(i + 1), "%s: an invalid call touched y[%d]",
                     kt_backend_name(b), i);
    kn_ctx_destroy(ctx);
}

/* ---- get_rows ------------------------------------------------------------ */

/* every row equals kn_dequantize_row of its id; out-of-range ids give zeros */
KT_BACKEND_TEST(kernels_get_rows, matches_dequantize_row)
{
    kn_ctx *ctx = kt_open_host(b, 2);
    const kn_ops *ops = kn_ctx_ops(ctx);
    for (size_t t = 0; t < 5; t++) {
        const int64_t cols = t < 3 ? 72 + 3 : 96;
        kn_tensor w;
        void *data = kt_weight(all_types[t], 11, cols, &w);
        const int32_t ids[] = {3, 0, 10, 3, 11, -1};
        float out[6 * 96], want[96];
        kt_poison(out, 6 * 96);
        KT_OK(ops->get_rows(ctx, &w, ids, 6, out));
        for (int i = 0; i < 6; i++) {
            if (ids[i] < 0 || ids[i] >= 11)
                memset(want, 0, sizeof(want));
            else
                kn_dequantize_row(all_types[t],
                                  (char *)data + kn_row_bytes(all_types[t], cols) * ids[i], cols,
                                  want);
            for (int64_t c = 0; c < cols; c++)
                cr_assert_eq(out[i * cols + c], want[c], "%s %s row %d col %ld",
                             kt_backend_name(b), kn_dtype_name(all_types[t]), i, (long)c);
        }
        free(data);
    }
    kn_ctx_destroy(ctx);
}

/* a bad weight, NULL ids/out or n <= 0 gives -EINVAL and leaves out alone */
KT_BACKEND_TEST(kernels_get_rows, rejects_invalid_arguments)
{
    kn_ctx *ctx = kt_open_host(b, 2);
    const kn_ops *ops = kn_ctx_ops(ctx);
    float data[64] = {0}, out[8];
    const int32_t ids[2] = {0, 1};
    const kn_tensor ok = {.data = data, .type = KN_F32, .rows = 2, .cols = 4};
    const kn_tensor partial = {.data = data, .type = KN_Q4_0, .rows = 2, .cols = 4};
    const kn_tensor nodata = {.data = NULL, .type = KN_F32, .rows = 2, .cols = 4};
    for (int i = 0; i < 8; i++)
        out[i] = 7.0f;
    cr_assert_eq(ops->get_rows(ctx, &partial, ids, 2, out), -EINVAL);
    cr_assert_eq(ops->get_rows(ctx, &nodata, ids, 2, out), -EINVAL);
    cr_assert_eq(ops->get_rows(ctx, NULL, ids, 2, out), -EINVAL);
    cr_assert_eq(ops->get_rows(ctx, &ok, NULL, 2, out), -EINVAL);
    cr_assert_eq(ops->get_rows(ctx, &ok, ids, 2, NULL), -EINVAL);
    cr_assert_eq(ops->get_rows(ctx, &ok, ids, 0, out), -EINVAL);
    cr_assert_eq(ops->get_rows(ctx, &ok, ids, -1, out), -EINVAL);
    cr_assert_eq(ops->get_rows(NULL, &ok, ids, 2, out), -EINVAL);
    for (int i = 0; i < 8; i++)
        cr_assert_eq(out[i], 7.0f, "%s touched out[%d]", kt_backend_name(b), i);
    kn_ctx_destroy(ctx);
}

/* ---- elementwise --------------------------------------------------------- */

static const int64_t ew_sizes[] = {1, 7, 16, 33, 200, 40000};

/* rmsnorm within 1e-5 of the double-precision definition; in place equals
 * out of place */
KT_BACKEND_TEST(kernels_elementwise, rmsnorm_matches_definition)
{
    kn_ctx *ctx = kt_open_host(b, 2);
    const kn_ops *ops = kn_ctx_ops(ctx);
    for (size_t s = 0; s < 6; s++) {
        const int64_t n = ew_sizes[s] > 4000 ? 768 : ew_sizes[s];
        const int64_t M = ew_sizes[s] > 4000 ? 60 : 3;
        float *x = kt_fvec(M * n), *g = kt_fvec(n), *out = kt_fvec(M * n);
        kt_poison(out, M * n);
        KT_OK(ops->rmsnorm(ctx, x, g, M, n, 1e-5f, out));
        for (int64_t m = 0; m < M; m++) {
            double ss = 0;
            for (int64_t i = 0; i < n; i++)
                ss += (double)x[m * n + i] * x[m * n + i];
            double inv = 1.0 / sqrt(ss / n + 1e-5);
            for (int64_t i = 0; i < n; i++) {
                double want = x[m * n + i] * inv * g[i];
                cr_assert(kt_close(out[m * n + i], (float)want, fabs(want) + 1e-6, 1e-5),
                          "%s n=%ld [%ld][%ld] %g vs %g", kt_backend_name(b), (long)n, (long)m,
                          (long)i, out[m * n + i], want);
            }
        }
        /* in place */
        float *cp = malloc((size_t)(M * n) * sizeof(float));
        memcpy(cp, out, (size_t)(M * n) * sizeof(float));
        KT_OK(ops->rmsnorm(ctx, x, g, M, n, 1e-5f, x));
        cr_assert_arr_eq(x, cp, (size_t)(M * n) * sizeof(float), "in-place must equal out-of-place");
        free(cp);
        free(x);
        free(g);
        free(out);
    }
    kn_ctx_destroy(ctx);
}

/* silu_mul within 1e-5 of the definition over both tails of the sigmoid;
 * add exact */
KT_BACKEND_TEST(kernels_elementwise, silu_mul_and_add_match_definition)
{
    kn_ctx *ctx = kt_open_host(b, 2);
    const kn_ops *ops = kn_ctx_ops(ctx);
    for (size_t s = 0; s < 6; s++) {
        const int64_t n = ew_sizes[s];
        float *g = kt_fvec(n), *u = kt_fvec(n), *y = kt_fvec(n);
        for (int64_t i = 0; i < n; i++)
            g[i] *= 30.0f; /* reach both tails of the sigmoid */
        g[0] = -100.0f;
        memcpy(y, g, (size_t)n * sizeof(float));
        KT_OK(ops->silu_mul(ctx, y, u, n));
        for (int64_t i = 0; i < n; i++) {
            double want = g[i] / (1.0 + exp(-(double)g[i])) * u[i];
            cr_assert(kt_close(y[i], (float)want, fabs(want) + 1e-6, 1e-5),
                      "silu %s n=%ld [%ld] %g vs %g (g=%g)", kt_backend_name(b), (long)n, (long)i,
                      y[i], want, g[i]);
        }
        memcpy(y, g, (size_t)n * sizeof(float));
        KT_OK(ops->add(ctx, y, u, n));
        for (int64_t i = 0; i < n; i++)
            cr_assert_eq(y[i], g[i] + u[i], "add %s [%ld]", kt_backend_name(b), (long)i);
        free(g);
        free(u);
        free(y);
    }
    kn_ctx_destroy(ctx);
}

/* rmsnorm, silu_mul and add: NULL pointers and non-positive sizes give
 * -EINVAL and leave their outputs alone */
KT_BACKEND_TEST(kernels_elementwise, rejects_invalid_arguments)
{
    kn_ctx *ctx = kt_open_host(b, 2);
    const kn_ops *ops = kn_ctx_ops(ctx);
    float x[8] = {1, 2, 3, 4, 5, 6, 7, 8}, g[8] = {1, 1, 1, 1, 1, 1, 1, 1}, y[8];
    for (int i = 0; i < 8; i++)
        y[i] = 7.0f;
    cr_assert_eq(ops->rmsnorm(ctx, NULL, g, 2, 4, 1e-5f, y), -EINVAL);
    cr_assert_eq(ops->rmsnorm(ctx, x, NULL, 2, 4, 1e-5f, y), -EINVAL);
    cr_assert_eq(ops->rmsnorm(ctx, x, g, 2, 4, 1e-5f, NULL), -EINVAL);
    cr_assert_eq(ops->rmsnorm(ctx, x, g, 0, 4, 1e-5f, y), -EINVAL);
    cr_assert_eq(ops->rmsnorm(ctx, x, g, 2, 0, 1e-5f, y), -EINVAL);
    cr_assert_eq(ops->rmsnorm(ctx, x, g, -1, 4, 1e-5f, y), -EINVAL);
    cr_assert_eq(ops->rmsnorm(NULL, x, g, 2, 4, 1e-5f, y), -EINVAL);
    cr_assert_eq(ops->silu_mul(ctx, y, NULL, 8), -EINVAL);
    cr_assert_eq(ops->silu_mul(ctx, NULL, x, 8), -EINVAL);
    cr_assert_eq(ops->silu_mul(ctx, y, x, 0), -EINVAL);
    cr_assert_eq(ops->silu_mul(ctx, y, x, -8), -EINVAL);
    cr_assert_eq(ops->silu_mul(NULL, y, x, 8), -EINVAL);
    cr_assert_eq(ops->add(ctx, y, NULL, 8), -EINVAL);
    cr_assert_eq(ops->add(ctx, NULL, x, 8), -EINVAL);
    cr_assert_eq(ops->add(ctx, y, x, 0), -EINVAL);
    cr_assert_eq(ops->add(ctx, y, x, -8), -EINVAL);
    cr_assert_eq(ops->add(NULL, y, x, 8), -EINVAL);
    for (int i = 0; i < 8; i++)
        cr_assert_eq(y[i], 7.0f, "%s touched y[%d]", kt_backend_name(b), i);
    kn_ctx_destroy(ctx);
}

/* out[h][m][i] = x[m][i] + silu(z[m][h*n+i] + b[h*n+i]) with the float
 * formula the engine used (x / (1 + expf(-x))), bit for bit; a NULL bias is
 * a zero bias */
KT_BACKEND_TEST(kernels_elementwise, silu_res_matches_formula_bit_for_bit)
{
    kn_ctx *ctx = kt_open_host(b, 2);
    const kn_ops *ops = kn_ctx_ops(ctx);
    /* the last shape is large enough for the op to fan out */
    static const int64_t shapes[][3] = {{1, 1, 1}, {3, 2, 37}, {1, 4, 64}, {5, 3, 2600}};
    for (size_t is = 0; is < sizeof(shapes) / sizeof(shapes[0]); is++) {
        const int64_t M = shapes[is][0], NH = shapes[is][1], n = shapes[is][2];
        float *x = kt_fvec(M * n), *z = kt_fvec(M * NH * n), *bias = kt_fvec(NH * n);
        float *out = kt_fvec(NH * M * n);
        for (int64_t i = 0; i < M * NH * n; i++)
            z[i] *= 40.0f; /* both tails of the sigmoid */
        z[0] = -0.0f; /* with x[0] = -0: a NULL bias must still add +0 */
        x[0] = -0.0f;
        for (int with_bias = 0; with_bias <= 1; with_bias++) {
            const float *bp = with_bias ? bias : NULL;
            kt_poison(out, NH * M * n);
            KT_OK(ops->silu_res(ctx, x, z, bp, M, NH, n, out));
            for (int64_t h = 0; h < NH; h++)
                for (int64_t m = 0; m < M; m++)
                    for (int64_t i = 0; i < n; i++) {
                        const float s = z[(m * NH + h) * n + i] + (bp ? bp[h * n + i] : 0.0f);
                        const float want = x[m * n + i] + s / (1.0f + expf(-s));
                        const float got = out[(h * M + m) * n + i];
                        cr_assert(memcmp(&got, &want, sizeof(float)) == 0,
                                  "%s M=%ld heads=%ld n=%ld bias=%d [%ld][%ld][%ld]: %.9g vs %.9g",
                                  kt_backend_name(b), (long)M, (long)NH, (long)n, with_bias,
                                  (long)h, (long)m, (long)i, got, want);
                    }
        }
        free(x);
        free(z);
        free(bias);
        free(out);
    }
    kn_ctx_destroy(ctx);
}

/* silu_res: NULL x/z/out or non-positive sizes give -EINVAL, out untouched */
KT_BACKEND_TEST(kernels_elementwise, silu_res_rejects_invalid_arguments)
{
    kn_ctx *ctx = kt_open_host(b, 2);
    const kn_ops *ops = kn_ctx_ops(ctx);
    float x[4] = {0}, z[8] = {0}, out[8];
    for (int i = 0; i < 8; i++)
        out[i] = 7.0f;
    cr_assert_eq(ops->silu_res(ctx, NULL, z, NULL, 1, 2, 4, out), -EINVAL);
    cr_assert_eq(ops->silu_res(ctx, x, NULL, NULL, 1, 2, 4, out), -EINVAL);
    cr_assert_eq(ops->silu_res(ctx, x, z, NULL, 1, 2, 4, NULL), -EINVAL);
    cr_assert_eq(ops->silu_res(ctx, x, z, NULL, 0, 2, 4, out), -EINVAL);
    cr_assert_eq(ops->silu_res(ctx, x, z, NULL, 1, 0, 4, out), -EINVAL);
    cr_assert_eq(ops->silu_res(ctx, x, z, NULL, 1, 2, 0, out), -EINVAL);
    cr_assert_eq(ops->silu_res(ctx, x, z, NULL, 1, 2, -4, out), -EINVAL);
    cr_assert_eq(ops->silu_res(NULL, x, z, NULL, 1, 2, 4, out), -EINVAL);
    for (int i = 0; i < 8; i++)
        cr_assert_eq(out[i], 7.0f, "%s touched out[%d]", kt_backend_name(b), i);
    kn_ctx_destroy(ctx);
}

/* rope within 1e-5 of the double-precision rotation, full and partial
 * rope_dims, positions up to 4095 */
KT_BACKEND_TEST(kernels_elementwise, rope_rotates_adjacent_pairs)
{
    kn_ctx *ctx = kt_open_host(b, 2);
    const kn_ops *ops = kn_ctx_ops(ctx);
    /* the last shape is large enough for the SIMD ops to fan out over rows */
    static const struct {
        int hd, nh;
        int64_t M;
    } shapes[] = {{8, 3, 4}, {64, 3, 4}, {128, 3, 4}, {64, 8, 67}};
    for (int ih = 0; ih < 4; ih++) {
        const int hd = shapes[ih].hd, nh = shapes[ih].nh;
        const int64_t M = shapes[ih].M;
        const int rds[] = {hd, hd / 2};
        int32_t pos[67] = {0, 1, 17, 4095};
        for (int64_t m = 4; m < M; m++)
            pos[m] = (int32_t)(m * 37 % 5000);
        for (int ir = 0; ir < 2; ir++) {
            const int rd = rds[ir];
            float *x = kt_fvec(M * nh * hd), *y = kt_fvec(M * nh * hd);
            memcpy(y, x, (size_t)(M * nh * hd) * sizeof(float));
            KT_OK(ops->rope(ctx, y, M, nh, hd, rd, pos, 10000.0f));
            for (int64_t m = 0; m < M; m++)
                for (int h = 0; h < nh; h++)
                    for (int i = 0; i < hd; i += 2) {
                        const float *a = x + (m * nh + h) * hd, *r = y + (m * nh + h) * hd;
                        double w0 = a[i], w1 = a[i + 1];
                        if (i < rd) {
                            double th = pos[m] * pow(10000.0, -(double)i / rd);
                            w0 = a[i] * cos(th) - a[i + 1] * sin(th);
                            w1 = a[i] * sin(th) + a[i + 1] * cos(th);
                        }
                        cr_assert(kt_close(r[i], (float)w0, 1.0, 1e-5) &&
                                      kt_close(r[i + 1], (float)w1, 1.0, 1e-5),
                                  "%s hd=%d rd=%d m=%ld h=%d i=%d", kt_backend_name(b), hd, rd,
                                  (long)m, h, i);
                    }
            free(x);
            free(y);
        }
    }
    kn_ctx_destroy(ctx);
}

/* rope: rope_dims odd, <= 0 or > head_dim, NULL x/pos or non-positive
 * sizes give -EINVAL and leave x alone */
KT_BACKEND_TEST(kernels_elementwise, rope_rejects_invalid_arguments)
{
    kn_ctx *ctx = kt_open_host(b, 2);
    const kn_ops *ops = kn_ctx_ops(ctx);
    float x[16];
    const int32_t pos[2] = {3, 4};
    for (int i = 0; i < 16; i++)
        x[i] = 7.0f;
    cr_assert_eq(ops->rope(ctx, x, 2, 1, 8, 7, pos, 1e4f), -EINVAL, "odd rope_dims");
    cr_assert_eq(ops->rope(ctx, x, 2, 1, 8, 0, pos, 1e4f), -EINVAL, "rope_dims 0");
    cr_assert_eq(ops->rope(ctx, x, 2, 1, 8, -2, pos, 1e4f), -EINVAL, "negative rope_dims");
    cr_assert_eq(ops->rope(ctx, x, 2, 1, 8, 10, pos, 1e4f), -EINVAL, "rope_dims > head_dim");
    cr_assert_eq(ops->rope(ctx, NULL, 2, 1, 8, 8, pos, 1e4f), -EINVAL);
    cr_assert_eq(ops->rope(ctx, x, 2, 1, 8, 8, NULL, 1e4f), -EINVAL);
    cr_assert_eq(ops->rope(ctx, x, 0, 1, 8, 8, pos, 1e4f), -EINVAL);
    cr_assert_eq(ops->rope(ctx, x, 2, 0, 8, 8, pos, 1e4f), -EINVAL);
    cr_assert_eq(ops->rope(ctx, x, 2, 1, 0, 0, pos, 1e4f), -EINVAL);
    cr_assert_eq(ops->rope(ctx, x, 2, 1, -8, -8, pos, 1e4f), -EINVAL);
    cr_assert_eq(ops->rope(NULL, x, 2, 1, 8, 8, pos, 1e4f), -EINVAL);
    for (int i = 0; i < 16; i++)
        cr_assert_eq(x[i], 7.0f, "%s touched x[%d]", kt_backend_name(b), i);
    kn_ctx_destroy(ctx);
}

/* ---- attention ----------------------------------------------------------- */

struct attn_case {
    int n_head, n_kv_head, head_dim, block_size;
    int64_t n_past, n_q;
    int use_mask;
};

static void check_attention(const kt_backend *bk, const struct attn_case *c, int threads)
{
    const int64_t n_ctx = c->n_past + c->n_q;
    const int64_t n_blocks_used = (n_ctx + c->block_size - 1) / c->block_size;
    const int64_t n_blocks = n_blocks_used + 3;
    const int64_t row = (int64_t)c->n_kv_head * c->head_dim;
    float *k = kt_fvec(n_blocks * c->block_size * row);
    float *v = kt_fvec(n_blocks * c->block_size * row);
    float *q = kt_fvec(c->n_q * c->n_head * c->head_dim);
    float *out = kt_fvec(c->n_q * c->n_head * c->head_dim);
    int32_t *bt = malloc((size_t)n_blocks_used * sizeof(int32_t));
    uint8_t *mask = malloc((size_t)(c->n_q * c->n_q));
    for (int64_t b = 0; b < n_blocks_used; b++) /* scattered, not identity */
        bt[b] = (int32_t)((b * 7 + 2) % n_blocks);
    for (int64_t b = 0; b < n_blocks_used; b++)
        for (int64_t b2 = 0; b2 < b; b2++)
            if (bt[b] == bt[b2])
                bt[b] = (int32_t)(n_blocks - 1 - b); /* keep it a permutation */
    for (int64_t i = 0; i < c->n_q; i++)
        for (int64_t j = 0; j < c->n_q; j++) /* tree-like: root + own branch */
            mask[i * c->n_q + j] = j == 0 || j == i || (j < i && (i - j) % 2 == 0);
    if (c->use_mask == 2) /* one query sees no new token: with n_past 0, nothing at all */
        memset(mask + (c->n_q / 2) * c->n_q, 0, (size_t)c->n_q);
    kn_ctx *ctx = kt_open_host(bk, threads);
    float *scratch = malloc(kn_attn_scratch_floats(n_ctx, threads) * sizeof(float));
    kn_attn_args a = {.q = q, .out = out, .n_q = c->n_q, .n_past = c->n_past,
                      .n_head = c->n_head, .n_kv_head = c->n_kv_head, .head_dim = c->head_dim,
                      .k_pool = k, .v_pool = v, .block_table = bt, .block_size = c->block_size,
                      .mask = c->use_mask ? mask : NULL, .scale = 1.0f / sqrtf((float)c->head_dim),
                      .scratch = scratch};
    const int grp = c->n_head / c->n_kv_head;
    double *sc = malloc((size_t)n_ctx * sizeof(double));
    {
        kt_poison(out, c->n_q * c->n_head * c->head_dim);
        KT_OK(kn_ctx_ops(ctx)->attention(ctx, &a));
        for (int64_t i = 0; i < c->n_q; i++)
            for (int h = 0; h < c->n_head; h++) {
                const float *qi = q + (i * c->n_head + h) * c->head_dim;
                double mx = -INFINITY, sum = 0;
                for (int64_t p = 0; p < n_ctx; p++) {
                    int64_t j = p - c->n_past;
                    int vis = j < 0 || (c->use_mask ? mask[i * c->n_q + j] : j <= i);
                    sc[p] = -INFINITY;
                    if (!vis)
                        continue;
                    const float *kr = k + (bt[p / c->block_size] * c->block_size +
                                           p % c->block_size) * row + (h / grp) * c->head_dim;
                    double s = 0;
                    for (int d = 0; d < c->head_dim; d++)
                        s += (double)qi[d] * kr[d];
                    sc[p] = s * a.scale;
                    mx = fmax(mx, sc[p]);
                }
                for (int64_t p = 0; p < n_ctx; p++)
                    sum += sc[p] == -INFINITY ? 0 : exp(sc[p] - mx);
                for (int d = 0; d < c->head_dim; d++) {
                    double want = 0;
                    for (int64_t p = 0; p < n_ctx; p++) {
                        if (sc[p] == -INFINITY)
                            continue;
                        const float *vr = v + (bt[p / c->block_size] * c->block_size +
                                               p % c->block_size) * row + (h / grp) * c->head_dim;
                        want += exp(sc[p] - mx) / sum * vr[d];
                    }
                    float got = out[(i * c->n_head + h) * c->head_dim + d];
                    cr_assert(kt_close(got, (float)want, 1.0, 2e-5),
                              "%s hd=%d heads=%d/%d past=%ld nq=%ld mask=%d [%ld][%d][%d]: %g vs %g",
                              kt_backend_name(bk), c->head_dim, c->n_head, c->n_kv_head,
                              (long)c->n_past, (long)c->n_q, c->use_mask, (long)i, h, d, got, want);
                }
            }
    }
    kn_ctx_destroy(ctx);
    free(sc);
    free(scratch);
    free(k);
    free(v);
    free(q);
    free(out);
    free(bt);
    free(mask);
}

/* within 2e-5 of the double-precision definition over a scattered block
 * table: causal and tree masks, GQA, every path (per query, tiled, per
 * (query, head)), queries that see nothing */
KT_BACKEND_TEST(kernels_attention, matches_definition_over_paged_kv, .timeout = 60)
{
    static const struct attn_case cases[] = {
        {4, 4, 8, 16, 0, 1, 0},     {4, 2, 64, 16, 40, 1, 0},   {8, 2, 128, 5, 21, 3, 0},
        {4, 1, 64, 16, 5, 7, 1},    {6, 3, 8, 3, 0, 9, 1},      {2, 2, 24, 7, 33, 17, 0},
        {4, 4, 64, 16, 100, 4, 1},
        /* n_q >= 8 takes the SIMD tiled path: several query tiles, ragged
         * last tiles of queries and keys, tiles crossing cache blocks */
        {4, 2, 64, 16, 0, 40, 0},   {4, 4, 64, 16, 23, 37, 1},  {2, 1, 12, 1, 3, 33, 0},
        {3, 3, 20, 5, 0, 16, 1},    {2, 2, 32, 7, 50, 8, 0},    {1, 1, 256, 16, 9, 19, 0},
        /* head_dim not a multiple of 4 stays on the per-query path */
        {2, 2, 6, 4, 2, 10, 0},
        /* a query that sees nothing gets a zero row (tiled, per-query path) */
        {2, 2, 16, 4, 0, 12, 2},    {2, 2, 16, 4, 0, 5, 2},     {2, 2, 16, 4, 3, 20, 2},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        check_attention(b, &cases[i], 2);
        check_attention(b, &cases[i], 3);
    }
}

/* a NULL args/q/out/pool/block table/scratch, non-positive sizes, n_past < 0
 * or n_head % n_kv_head != 0 give -EINVAL and leave out alone */
KT_BACKEND_TEST(kernels_attention, rejects_invalid_arguments)
{
    kn_ctx *ctx = kt_open_host(b, 2);
    const kn_ops *ops = kn_ctx_ops(ctx);
    float q[2 * 8] = {0}, out[2 * 8], k[4 * 8] = {0}, v[4 * 8] = {0};
    /* sized for the call, so that an op that failed to reject would not
     * also overrun it */
    float *scratch = malloc(kn_attn_scratch_floats(2, 2) * sizeof(float));
    const int32_t bt[2] = {1, 0};
    for (int i = 0; i < 16; i++)
        out[i] = 7.0f;
    const kn_attn_args ok = {.q = q, .out = out, .n_q = 1, .n_past = 1, .n_head = 2,
                             .n_kv_head = 1, .head_dim = 8, .k_pool = k, .v_pool = v,
                             .block_table = bt, .block_size = 2, .scale = 0.3f,
                             .scratch = scratch};
    kn_attn_args bad[16];
    int nb = 0;
    for (int i = 0; i < 16; i++)
        bad[i] = ok;
    bad[nb++].q = NULL;
    bad[nb++].out = NULL;
    bad[nb++].k_pool = NULL;
    bad[nb++].v_pool = NULL;
    bad[nb++].block_table = NULL;
    bad[nb++].scratch = NULL;
    bad[nb++].n_q = 0;
    bad[nb++].n_past = -1;
    bad[nb++].n_head = 0;
    bad[nb++].n_kv_head = 0;
    bad[nb++].n_kv_head = 3; /* 2 % 3 != 0 */
    bad[nb++].head_dim = 0;
    bad[nb++].block_size = 0;
    bad[nb++].n_head = -2;
    for (int i = 0; i < nb; i++)
        cr_assert_eq(ops->attention(ctx, &bad[i]), -EINVAL, "case %d", i);
    cr_assert_eq(ops->attention(ctx, NULL), -EINVAL);
    cr_assert_eq(ops->attention(NULL, &ok), -EINVAL);
    for (int i = 0; i < 16; i++)
        cr_assert_eq(out[i], 7.0f, "%s touched out[%d]", kt_backend_name(b), i);
    free(scratch);
    kn_ctx_destroy(ctx);
}

/* ---- pool ---------------------------------------------------------------- */

struct cover {
    _Atomic int *hits;
};

static void cover_fn(void *arg, int64_t i)
{
    struct cover *c = arg;
    atomic_fetch_add_explicit(&c->hits[i], 1, memory_order_relaxed);
}

/* kn_parallel_for runs each index exactly once, spinning or asleep */
Test(kernels_pool, parallel_for_covers_each_index_once, .timeout = 60)
{
    static const int threads[] = {1, 2, 7};
    for (int t = 0; t < 3; t++) {
        kn_ctx *ctx = kt_ctx(threads[t], KN_VARIANT_SCALAR);
        cr_assert_eq(kn_ctx_threads(ctx), threads[t]);
        _Atomic int hits[300];
        struct cover c = {hits};
        for (int rep = 0; rep < 1500; rep++) {
            const int64_t n = 1 + rep % 300;
            for (int64_t i = 0; i < n; i++)
                atomic_init(&hits[i], 0);
            kn_parallel_for(ctx, n, cover_fn, &c);
            for (int64_t i = 0; i < n; i++)
                cr_assert_eq(atomic_load(&hits[i]), 1, "threads=%d rep=%d n=%ld index %ld",
                             threads[t], rep, (long)n, (long)i);
            if (rep % 500 == 499)
                usleep(2000); /* let workers fall asleep: exercises the futex path */
        }
        kn_ctx_destroy(ctx);
    }
}

/* kn_ctx_create rejects an unknown variant, too many threads, NULL out */
Test(kernels_pool, create_rejects_bad_config)
{
    kn_ctx *ctx = (kn_ctx *)1;
    cr_assert_eq(kn_ctx_create(&ctx, &(kn_ctx_cfg){.variant = KN_VARIANT_COUNT}), -EINVAL);
    cr_assert_null(ctx);
    cr_assert_eq(kn_ctx_create(&ctx, &(kn_ctx_cfg){.n_threads = 100000}), -EINVAL);
    cr_assert_eq(kn_ctx_create(NULL, &(kn_ctx_cfg){0}), -EINVAL);
    kn_ctx_destroy(NULL);
    cr_assert_eq(kn_ctx_create(&ctx, &(kn_ctx_cfg){.n_threads = 0}), 0);
    cr_assert_eq(kn_ctx_threads(ctx), kn_threads_auto());
    kn_ctx_destroy(ctx);
}

/* The bandwidth probe gives a finite positive figure for a buffer of a
 * page or more and 0 (rejected) below a page or without a context. How
 * fast this machine reads is not a unit test's business (any floor passes
 * everywhere or flakes somewhere): gorgon-bench reports the figure. */
Test(kernels_pool, bandwidth_probe_positive_or_rejected)
{
    kn_ctx *ctx = kt_ctx(2, KN_VARIANT_AUTO);
    double bw = kn_measure_read_bandwidth(ctx, 4u << 20, 2);
    cr_assert(isfinite(bw) && bw > 0.0, "bandwidth %g B/s", bw);
    bw = kn_measure_read_bandwidth(ctx, 4096, 1);
    cr_assert(isfinite(bw) && bw > 0.0, "one page: %g B/s", bw);
    cr_assert_eq(kn_measure_read_bandwidth(ctx, 4095, 2), 0.0, "below one page: rejected");
    cr_assert_eq(kn_measure_read_bandwidth(NULL, 4u << 20, 2), 0.0, "no context: rejected");
    kn_ctx_destroy(ctx);
}

/* ---- dispatch ------------------------------------------------------------ */

Test(kernels_dispatch, auto_picks_best_supported)
{
    const struct cm_cpu_features *f = cm_cpu();
    cr_assert(kn_variant_supported(KN_VARIANT_SCALAR));
    cr_assert_eq(kn_variant_supported(KN_VARIANT_AVX2), f->avx2 && f->fma && f->f16c);
    if (kn_variant_supported(KN_VARIANT_AVX512))
        cr_assert(f->avx512f && f->avx512bw && f->avx512vl && f->avx512_vnni);
    enum kn_variant best = kn_variant_supported(KN_VARIANT_AVX512) ? KN_VARIANT_AVX512
                           : kn_variant_supported(KN_VARIANT_AVX2) ? KN_VARIANT_AVX2
                                                                   : KN_VARIANT_SCALAR;
    kn_ctx *ctx = kt_ctx(1, KN_VARIANT_AUTO);
    cr_assert_eq(kn_ctx_variant(ctx), best);
    cr_assert_eq(kn_ctx_ops(ctx), kn_ops_for(best));
    cr_assert_str_eq(kn_ctx_ops(ctx)->name, kn_variant_name(best));
    kn_ctx_destroy(ctx);
    for (int v = KN_VARIANT_SCALAR; v < KN_VARIANT_COUNT; v++)
        cr_assert_eq(kn_ops_for((enum kn_variant)v) != NULL,
                     kn_variant_supported((enum kn_variant)v) != 0);
}

/* cm_cpu() reads GORGON_CPU_MAX once per process: check it in a child forked
 * before this process calls cm_cpu() (each Criterion test is a fresh
 * process). */
static int child_caps(const char *cap)
{
    pid_t pid = fork();
    if (pid == 0) {
        setenv("GORGON_CPU_MAX", cap, 1);
        /* avx2 cap on a CPU without AVX2 legitimately ends at scalar */
        enum kn_variant expect = strcmp(cap, "avx2") == 0 && kn_variant_supported(KN_VARIANT_AVX2)
                                     ? KN_VARIANT_AVX2
                                     : KN_VARIANT_SCALAR;
        kn_ctx *ctx = NULL;
        int ok = kn_ctx_create(&ctx, &(kn_ctx_cfg){.n_threads = 1}) == 0 &&
                 kn_ctx_variant(ctx) == expect && kn_ops_for(KN_VARIANT_AVX512) == NULL;
        kn_ctx_destroy(ctx);
        if (strcmp(cap, "scalar") == 0)
            ok = ok && kn_ctx_create(&ctx, &(kn_ctx_cfg){.variant = KN_VARIANT_AVX2}) == -ENOTSUP &&
                 kn_ops_for(KN_VARIANT_AVX2) == NULL;
        _exit(ok ? 0 : 1);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 2;
}

/* GORGON_CPU_MAX caps AUTO and hides the variants above the cap */
Test(kernels_dispatch, honours_gorgon_cpu_max, .timeout = 30)
{
    cr_assert_eq(child_caps("scalar"), 0, "GORGON_CPU_MAX=scalar not honoured");
    cr_assert_eq(child_caps("avx2"), 0, "GORGON_CPU_MAX=avx2 not honoured");
}

/* A row's product must not depend on the rows batched with it: continuous
 * batching and Medusa verification promise the output a request gets
 * alone. Row i of an M-row matmul equals the same row computed alone, bit
 * for bit, for every weight type, variant and M across the kernels'
 * matvec/GEMM switch points. */
KT_BACKEND_TEST(kernels_ops, matmul_row_does_not_depend_on_the_batch, .timeout = 60)
{
    static const enum kn_dtype types[] = {KN_F32, KN_F16, KN_BF16, KN_Q8_0, KN_Q4_0};
    static const int64_t Ms[] = {1, 2, 3, 4, 5, 8, 9, 12, 13, 17, 33};
    const int64_t N = 70, K = 256;
    kn_ctx *ctx = kt_open_host(b, 2);
    const kn_ops *ops = kn_ctx_ops(ctx);
    float *x = kt_fvec(33 * K), *y = kt_fvec(33 * N), *y1 = kt_fvec(N);
    /* the row alone comes from a misaligned copy (x of callers that malloc) */
    float *xu_buf = kt_fvec(K + 1), *xu = xu_buf + 1;
    for (size_t it = 0; it < sizeof(types) / sizeof(types[0]); it++) {
        kn_tensor w;
        void *data = kt_weight(types[it], N, K, &w);
        for (size_t im = 0; im < sizeof(Ms) / sizeof(Ms[0]); im++) {
            const int64_t M = Ms[im];
            kt_poison(y, M * N);
            KT_OK(ops->matmul(ctx, &w, x, M, y));
            for (int64_t m = 0; m < M; m++) {
                kt_poison(y1, N);
                memcpy(xu, x + m * K, (size_t)K * sizeof(float));
                KT_OK(ops->matmul(ctx, &w, xu, 1, y1));
                for (int64_t n = 0; n < N; n++)
                    cr_assert(memcmp(&y[m * N + n], &y1[n], sizeof(float)) == 0,
                              "%s %s: row %ld of M=%ld differs from the row alone at %ld: "
                              "%.9g vs %.9g",
                              kt_backend_name(b), kn_dtype_name(types[it]), (long)m, (long)M,
                              (long)n, y[m * N + n], y1[n]);
            }
        }
        free(data);
    }
    kn_ctx_destroy(ctx);
    free(x);
    free(y);
    free(y1);
    free(xu_buf);
}

/* Attention's per-query counterpart of the test above: a query's output
 * must not depend on the queries that come with it (batch prefill, Medusa
 * tree verification). Causal: query i of an n_q batch equals the call with
 * that query alone after the batch's earlier tokens (n_past + i, same cached
 * K/V). Tree mask: query i equals the same query in the prefix batch 0..i
 * (its mask row unchanged) and in a batch whose other queries differ. */
static void check_attention_invariance(const kt_backend *bk, int n_head, int n_kv_head,
                                       int head_dim, int64_t n_past, int64_t n_q, int use_mask)
{
    const int bs = 16, threads = 2;
    const int64_t n_ctx = n_past + n_q, n_blocks = (n_ctx + bs - 1) / bs;
    const int64_t row = (int64_t)n_kv_head * head_dim, qrow = (int64_t)n_head * head_dim;
    float *k = kt_fvec(n_blocks * bs * row), *v = kt_fvec(n_blocks * bs * row);
    float *q = kt_fvec(n_q * qrow), *q2 = kt_fvec(n_q * qrow);
    float *out = kt_fvec(n_q * qrow), *out1 = kt_fvec(n_q * qrow);
    int32_t *bt = malloc((size_t)n_blocks * sizeof(int32_t));
    uint8_t *mask = malloc((size_t)(n_q * n_q)), *sub = malloc((size_t)(n_q * n_q));
    for (int64_t b = 0; b < n_blocks; b++)
        bt[b] = (int32_t)(n_blocks - 1 - b);
    for (int64_t i = 0; i < n_q; i++)
        for (int64_t j = 0; j < n_q; j++)
            mask[i * n_q + j] = j == 0 || j == i || (j < i && (i - j) % 3 == 0);
    float *scratch = malloc(kn_attn_scratch_floats(n_ctx, threads) * sizeof(float));
    kn_ctx *ctx = kt_open_host(bk, threads);
    {
        const kn_ops *ops = kn_ctx_ops(ctx);
        kn_attn_args a = {.q = q, .out = out, .n_q = n_q, .n_past = n_past, .n_head = n_head,
                          .n_kv_head = n_kv_head, .head_dim = head_dim, .k_pool = k,
                          .v_pool = v, .block_table = bt, .block_size = bs,
                          .mask = use_mask ? mask : NULL,
                          .scale = 1.0f / sqrtf((float)head_dim), .scratch = scratch};
        kt_poison(out, n_q * qrow);
        KT_OK(ops->attention(ctx, &a));
        for (int64_t i = 0; i < n_q; i++) {
            kn_attn_args b = a;
            b.out = out1;
            if (!use_mask) {
                b.q = q + i * qrow;
                b.n_q = 1;
                b.n_past = n_past + i;
            } else {
                b.n_q = i + 1;
                for (int64_t r = 0; r <= i; r++)
                    memcpy(sub + r * (i + 1), mask + r * n_q, (size_t)(i + 1));
                b.mask = sub;
            }
            kt_poison(out1, n_q * qrow);
            KT_OK(ops->attention(ctx, &b));
            const float *got = use_mask ? out1 + i * qrow : out1;
            cr_assert(memcmp(got, out + i * qrow, (size_t)qrow * sizeof(float)) == 0,
                      "%s hd=%d heads=%d/%d past=%ld nq=%ld mask=%d: query %ld alone differs",
                      kt_backend_name(bk), head_dim, n_head, n_kv_head, (long)n_past,
                      (long)n_q, use_mask, (long)i);
            if (!use_mask)
                continue;
            /* same query, every other query of the batch different */
            for (int64_t e = 0; e < n_q * qrow; e++)
                q2[e] = q[e] * -0.5f + 0.25f;
            memcpy(q2 + i * qrow, q + i * qrow, (size_t)qrow * sizeof(float));
            b = a;
            b.q = q2;
            b.out = out1;
            kt_poison(out1, n_q * qrow);
            KT_OK(ops->attention(ctx, &b));
            cr_assert(memcmp(out1 + i * qrow, out + i * qrow, (size_t)qrow * sizeof(float)) == 0,
                      "%s hd=%d heads=%d/%d past=%ld nq=%ld: query %ld depends on its batch mates",
                      kt_backend_name(bk), head_dim, n_head, n_kv_head, (long)n_past,
                      (long)n_q, (long)i);
        }
    }
    kn_ctx_destroy(ctx);
    free(scratch);
    free(k);
    free(v);
    free(q);
    free(q2);
    free(out);
    free(out1);
    free(bt);
    free(mask);
    free(sub);
}

/* causal and tree-masked queries equal themselves alone, bit for bit */
KT_BACKEND_TEST(kernels_ops, attention_query_does_not_depend_on_the_batch, .timeout = 60)
{
    static const int64_t nqs[] = {1, 7, 8, 9, 17, 33};
    for (size_t i = 0; i < sizeof(nqs) / sizeof(nqs[0]); i++)
        for (int use_mask = 0; use_mask <= 1; use_mask++) {
            check_attention_invariance(b, 4, 2, 64, 21, nqs[i], use_mask); /* GQA */
            check_attention_invariance(b, 2, 2, 32, 0, nqs[i], use_mask);
            check_attention_invariance(b, 2, 1, 6, 5, nqs[i], use_mask); /* per-query path */
        }
}

/* Medusa's promise "tree verification output == plain decode output" needs a
 * tree node's attention to equal, bit for bit, that of the same token decoded
 * alone: decode sees the node's visible keys (the prefix, its ancestors,
 * itself) at contiguous positions 0 .. n_past + depth, while the tree call
 * holds them at slots with its siblings' slots in between. */

/* Double-precision attention of one query head over the cache rows at
 * positions pos[0 .. n_pos-1] (row pointers into k/v given per position). */
static void attn_ref_row(const float *qh, const float *const *kr, const float *const *vr,
                         int64_t n_pos, int hd, float scale, double *sc, double *want)
{
    double mx = -INFINITY, sum = 0;
    for (int64_t p = 0; p < n_pos; p++) {
        double s = 0;
        for (int d = 0; d < hd; d++)
            s += (double)qh[d] * kr[p][d];
        sc[p] = s * scale;
        mx = fmax(mx, sc[p]);
    }
    for (int64_t p = 0; p < n_pos; p++)
        sum += exp(sc[p] - mx);
    for (int d = 0; d < hd; d++) {
        want[d] = 0;
        for (int64_t p = 0; p < n_pos; p++)
            want[d] += exp(sc[p] - mx) / sum * vr[p][d];
    }
}

/* parent[] lists a tree in cache order (parents before children, -1 for the
 * depth-1 nodes); every variant's masked call over it is compared with one
 * unmasked single-query call per node over a contiguous copy of the node's
 * visible keys, and with the double-precision definition. */
static void check_masked_equals_decode(const kt_backend *bk, int n_head, int n_kv_head,
                                       int head_dim, int bs, int64_t n_past, const int *parent,
                                       int64_t n_q)
{
    const int threads = 2, grp = n_head / n_kv_head;
    const int64_t n_ctx = n_past + n_q, n_blocks = (n_ctx + bs - 1) / bs + 2;
    const int64_t row = (int64_t)n_kv_head * head_dim, qrow = (int64_t)n_head * head_dim;
    const float scale = 1.0f / sqrtf((float)head_dim);
    float *k = kt_fvec(n_blocks * bs * row), *v = kt_fvec(n_blocks * bs * row);
    float *k2 = kt_fvec(n_blocks * bs * row), *v2 = kt_fvec(n_blocks * bs * row);
    float *q = kt_fvec(n_q * qrow), *out = kt_fvec(n_q * qrow), *out1 = kt_fvec(qrow);
    int32_t *bt = malloc((size_t)n_blocks * sizeof(int32_t));
    int32_t *bt2 = malloc((size_t)n_blocks * sizeof(int32_t));
    uint8_t *mask = calloc((size_t)(n_q * n_q), 1);
    int64_t *vis = malloc((size_t)n_ctx * sizeof(int64_t)); /* a node's visible slots */
    const float **kr = malloc((size_t)n_ctx * sizeof(float *));
    const float **vr = malloc((size_t)n_ctx * sizeof(float *));
    double *sc = malloc((size_t)n_ctx * sizeof(double)), *want = malloc(sizeof(double) * 256);
    float *scratch = malloc(kn_attn_scratch_floats(n_ctx, threads) * sizeof(float));
    cr_assert(bt && bt2 && mask && vis && kr && vr && sc && want && scratch);
    /* two different scatterings, so that contiguous positions of the decode
     * cache do not sit where the tree cache had them */
    for (int64_t b = 0; b < n_blocks; b++) {
        bt[b] = (int32_t)(n_blocks - 1 - b);
        bt2[b] = (int32_t)((b + 1) % n_blocks);
    }
    for (int64_t i = 0; i < n_q; i++)
        for (int64_t j = i; j >= 0; j = parent[j])
            mask[i * n_q + j] = 1;
    kn_ctx *ctx = kt_open_host(bk, threads);
    {
        const kn_ops *ops = kn_ctx_ops(ctx);
        kn_attn_args a = {.q = q, .out = out, .n_q = n_q, .n_past = n_past, .n_head = n_head,
                          .n_kv_head = n_kv_head, .head_dim = head_dim, .k_pool = k,
                          .v_pool = v, .block_table = bt, .block_size = bs, .mask = mask,
                          .scale = scale, .scratch = scratch};
        kt_poison(out, n_q * qrow);
        KT_OK(ops->attention(ctx, &a));
        for (int64_t i = 0; i < n_q; i++) {
            int64_t n_vis = 0;
            for (int64_t p = 0; p < n_ctx; p++)
                if (p < n_past || mask[i * n_q + p - n_past])
                    vis[n_vis++] = p;
            /* the decode cache: visible rows at positions 0 .. n_vis - 1 */
            for (int64_t t = 0; t < n_vis; t++) {
                const int64_t src = (bt[vis[t] / bs] * bs + vis[t] % bs) * row;
                const int64_t dst = (bt2[t / bs] * bs + t % bs) * row;
                memcpy(k2 + dst, k + src, (size_t)row * sizeof(float));
                memcpy(v2 + dst, v + src, (size_t)row * sizeof(float));
            }
            kn_attn_args b = {.q = q + i * qrow, .out = out1, .n_q = 1, .n_past = n_vis - 1,
                              .n_head = n_head, .n_kv_head = n_kv_head, .head_dim = head_dim,
                              .k_pool = k2, .v_pool = v2, .block_table = bt2,
                              .block_size = bs, .mask = NULL, .scale = scale,
                              .scratch = scratch};
            kt_poison(out1, qrow);
            KT_OK(ops->attention(ctx, &b));
            cr_assert(memcmp(out1, out + i * qrow, (size_t)qrow * sizeof(float)) == 0,
                      "%s hd=%d heads=%d/%d bs=%d past=%ld nq=%ld: node %ld (%ld visible "
                      "keys) differs from its decode over contiguous keys",
                      kt_backend_name(bk), head_dim, n_head, n_kv_head, bs, (long)n_past,
                      (long)n_q, (long)i, (long)n_vis);
            for (int h = 0; h < n_head; h++) {
                for (int64_t t = 0; t < n_vis; t++) {
                    const int64_t off = (bt[vis[t] / bs] * bs + vis[t] % bs) * row +
                                        (int64_t)(h / grp) * head_dim;
                    kr[t] = k + off;
                    vr[t] = v + off;
                }
                attn_ref_row(q + i * qrow + h * head_dim, kr, vr, n_vis, head_dim, scale, sc,
                             want);
                for (int d = 0; d < head_dim; d++) {
                    const float got = out[i * qrow + h * head_dim + d];
                    cr_assert(kt_close(got, (float)want[d], 1.0, 2e-5),
                              "%s hd=%d past=%ld node %ld [%d][%d]: %g vs %g",
                              kt_backend_name(bk), head_dim, (long)n_past, (long)i, h, d,
                              got, want[d]);
                }
            }
        }
    }
    kn_ctx_destroy(ctx);
    free(scratch);
    free(want);
    free(sc);
    free(vr);
    free(kr);
    free(vis);
    free(mask);
    free(bt2);
    free(bt);
    free(out1);
    free(out);
    free(q);
    free(v2);
    free(k2);
    free(v);
    free(k);
}

/* a tree node equals its plain decode over contiguous keys, bit for bit */
KT_BACKEND_TEST(kernels_ops, masked_query_equals_decode_over_contiguous_keys, .timeout = 60)
{
    /* depth-1 nodes at slots 0..2, deeper ones after their parents: nodes
     * off the main chain see keys with their siblings' slots in between */
    static const int tree[10] = {-1, -1, -1, 0, 0, 1, 3, 3, 5, 6};
    int big[40]; /* wider than one query tile of any variant */
    for (int i = 0; i < 40; i++)
        big[i] = i < 3 ? -1 : (int)(kt_rnd() % (uint64_t)i);
    static const int64_t pasts[] = {0, 5, 37};
    for (size_t p = 0; p < sizeof(pasts) / sizeof(pasts[0]); p++) {
        check_masked_equals_decode(b, 4, 2, 64, 7, pasts[p], tree, 10);
        check_masked_equals_decode(b, 2, 1, 8, 5, pasts[p], tree, 10);
        check_masked_equals_decode(b, 3, 3, 48, 11, pasts[p], tree, 10);
        check_masked_equals_decode(b, 4, 2, 64, 7, pasts[p], tree, 3); /* few queries */
        check_masked_equals_decode(b, 4, 1, 48, 13, pasts[p], big, 40);
        check_masked_equals_decode(b, 2, 2, 6, 4, pasts[p], big, 40); /* per-(query, head) path */
    }
}

/* kn_tensor_pack: packed weights give bit for bit what the same weights
 * give unpacked, through matmul and matmul_multi at every M across the
 * switch points (one x-row block, several, a partial one), for shapes that
 * leave a partial panel and, for the float types, a K % 32 tail. */
static void check_packed_equals_unpacked(enum kn_dtype type, const int64_t (*shapes)[2],
                                         size_t n_shapes)
{
    static const int64_t Ms[] = {1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 17, 33, 64, 65, 130};
    enum { MMAX = 130 };
    kn_ctx *ctx = kt_ctx(2, KN_VARIANT_AVX512);
    const kn_ops *ops = kn_ctx_ops(ctx);
    for (size_t is = 0; is < n_shapes; is++) {
        const int64_t N = shapes[is][0], K = shapes[is][1];
        kn_tensor w[3], wp[3];
        void *data[3];
        for (int i = 0; i < 3; i++) {
            data[i] = kt_weight(type, N - 3 * i, K, &w[i]);
            wp[i] = w[i];
            cr_assert_eq(kn_tensor_pack(&wp[i]), 0);
            cr_assert_not_null(wp[i].packed, "AVX-512 %s %ldx%ld was not packed",
                               kn_dtype_name(type), (long)w[i].rows, (long)K);
        }
        float *x = kt_fvec(MMAX * K), *y = kt_fvec(3 * MMAX * N), *yp = kt_fvec(3 * MMAX * N);
        for (size_t im = 0; im < sizeof(Ms) / sizeof(Ms[0]); im++) {
            const int64_t M = Ms[im];
            kt_poison(y, M * N);
            kt_poison(yp, M * N);
            KT_OK(ops->matmul(ctx, &w[0], x, M, y));
            KT_OK(ops->matmul(ctx, &wp[0], x, M, yp));
            for (int64_t e = 0; e < M * N; e++)
                cr_assert(!isnan(yp[e]) && memcmp(&y[e], &yp[e], sizeof(float)) == 0,
                          "%s %ldx%ld M=%ld: element %ld packed %.9g, unpacked %.9g",
                          kn_dtype_name(type), (long)N, (long)K, (long)M, (long)e, yp[e], y[e]);
            const kn_tensor *ws[3] = {&w[0], &w[1], &w[2]}, *wps[3] = {&wp[0], &wp[1], &wp[2]};
            float *ys[3], *yps[3];
            for (int i = 0; i < 3; i++) {
                ys[i] = y + i * MMAX * N;
                yps[i] = yp + i * MMAX * N;
                kt_poison(ys[i], M * N);
                kt_poison(yps[i], M * N);
            }
            KT_OK(ops->matmul_multi(ctx, 3, ws, x, M, ys));
            KT_OK(ops->matmul_multi(ctx, 3, wps, x, M, yps));
            for (int i = 0; i < 3; i++)
                for (int64_t e = 0; e < M * w[i].rows; e++)
                    cr_assert(!isnan(yps[i][e]) && memcmp(&ys[i][e], &yps[i][e], sizeof(float)) == 0,
                              "%s multi weight %d %ldx%ld M=%ld: element %ld packed %.9g, "
                              "unpacked %.9g",
                              kn_dtype_name(type), i, (long)w[i].rows, (long)K, (long)M, (long)e,
                              yps[i][e], ys[i][e]);
        }
        for (int i = 0; i < 3; i++) {
            kn_tensor_unpack(&wp[i]);
            cr_assert_null(wp[i].packed);
            free(data[i]);
        }
        free(x);
        free(y);
        free(yp);
    }
    kn_ctx_destroy(ctx);
}

/* packed Q8_0 weights give the unpacked results bit for bit */
Test(kernels_pack, q8_0_packed_matmul_equals_unpacked, .timeout = 60)
{
    if (!kn_variant_supported(KN_VARIANT_AVX512))
        cr_skip_test("no AVX-512 here: nothing is packed");
    static const int64_t shapes[][2] = {{70, 256}, {35, 96}, {16, 32}, {300, 64}};
    check_packed_equals_unpacked(KN_Q8_0, shapes, sizeof(shapes) / sizeof(shapes[0]));
}

/* packed F32/F16/BF16 weights give the unpacked results bit for bit */
Test(kernels_pack, float_packed_matmul_equals_unpacked, .timeout = 120)
{
    if (!kn_variant_supported(KN_VARIANT_AVX512))
        cr_skip_test("no AVX-512 here: nothing is packed");
    /* 48-row panels from 96 rows and 256 columns up: partial last panels,
     * K % 32 = 0, 12 and 31 */
    static const int64_t shapes[][2] = {{110, 256}, {150, 300}, {105, 511}, {200, 768}};
    static const enum kn_dtype types[] = {KN_F32, KN_F16, KN_BF16};
    for (size_t it = 0; it < sizeof(types) / sizeof(types[0]); it++)
        check_packed_equals_unpacked(types[it], shapes, sizeof(shapes) / sizeof(shapes[0]));
}

/* matmul_multi over a packed float weight and ones too small to pack (a
 * GQA model's Wq beside its K/V) gives what it gives unpacked. */
Test(kernels_pack, mixed_packed_and_unpacked_multi, .timeout = 60)
{
    if (!kn_variant_supported(KN_VARIANT_AVX512))
        cr_skip_test("no AVX-512 here: nothing is packed");
    enum { K = 256, MMAX = 17 };
    static const int64_t rows[3] = {192, 64, 64};
    static const int64_t Ms[] = {1, 4, 8, 17};
    kn_ctx *ctx = kt_ctx(2, KN_VARIANT_AVX512);
    const kn_ops *ops = kn_ctx_ops(ctx);
    kn_tensor w[3], wp[3];
    void *data[3];
    for (int i = 0; i < 3; i++) {
        data[i] = kt_weight(KN_F16, rows[i], K, &w[i]);
        wp[i] = w[i];
        cr_assert_eq(kn_tensor_pack(&wp[i]), 0);
    }
    cr_assert_not_null(wp[0].packed);
    cr_assert_null(wp[1].packed, "64 rows are too few to pack");
    float *x = kt_fvec(MMAX * K), *y = kt_fvec(3 * MMAX * 192), *yp = kt_fvec(3 * MMAX * 192);
    for (size_t im = 0; im < sizeof(Ms) / sizeof(Ms[0]); im++) {
        const int64_t M = Ms[im];
        const kn_tensor *ws[3] = {&w[0], &w[1], &w[2]}, *wps[3] = {&wp[0], &wp[1], &wp[2]};
        float *ys[3], *yps[3];
        for (int i = 0; i < 3; i++) {
            ys[i] = y + i * MMAX * 192;
            yps[i] = yp + i * MMAX * 192;
            kt_poison(ys[i], M * rows[i]);
            kt_poison(yps[i], M * rows[i]);
        }
        KT_OK(ops->matmul_multi(ctx, 3, ws, x, M, ys));
        KT_OK(ops->matmul_multi(ctx, 3, wps, x, M, yps));
        for (int i = 0; i < 3; i++)
            for (int64_t e = 0; e < M * rows[i]; e++)
                cr_assert(!isnan(yps[i][e]) && memcmp(&ys[i][e], &yps[i][e], sizeof(float)) == 0,
                          "weight %d M=%ld: element %ld mixed %.9g, unpacked %.9g", i, (long)M,
                          (long)e, yps[i][e], ys[i][e]);
    }
    for (int i = 0; i < 3; i++) {
        kn_tensor_unpack(&wp[i]);
        free(data[i]);
    }
    free(x);
    free(y);
    free(yp);
    kn_ctx_destroy(ctx);
}

/* Types without a packed form, and float matrices too small to gain from
 * one, are left as they are (and unpacking them is a no-op), so every
 * caller may pack every weight. */
Test(kernels_pack, other_types_stay_unpacked)
{
    static const enum kn_dtype types[] = {KN_F32, KN_F16, KN_BF16, KN_Q4_0};
    for (size_t it = 0; it < sizeof(types) / sizeof(types[0]); it++) {
        kn_tensor w;
        void *data = kt_weight(types[it], 20, 64, &w);
        cr_assert_eq(kn_tensor_pack(&w), 0);
        cr_assert_null(w.packed, "%s was packed", kn_dtype_name(types[it]));
        kn_tensor_unpack(&w);
        cr_assert_eq(w.data, data);
        free(data);
    }
}
