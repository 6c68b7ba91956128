/* kernels: the CUDA backend.
 *
 * Everywhere (these can fail on any machine): kn.h's device section on a
 * machine without a usable CUDA device or a build without the backend
 * (kn_cuda_device_count gives 0 or -errno and a reason, never a crash, and
 * kn_ctx_create of "cuda" fails with that code and leaves *out NULL), strict
 * device names (kn_device_parse), what a "cpu" ctx reports, and
 * kn_buf_fill_random on the CPU against the formula of kn.h computed here.
 *
 * On a CUDA device (skipped, with kn_cuda_device_count's reason, without
 * one): every op of a "cuda" ctx against the scalar table on a CPU ctx, on
 * random inputs; the bit-for-bit promises of kn.h (a matmul row does not
 * depend on its batch below the cuBLASLt threshold, an attention query does
 * not depend on its batch, a masked tree node equals its plain decode over
 * contiguous keys); fill_random on the device; the device probes; and the
 * out-of-memory path.
 *
 * The device sees only its own memory: inputs go up with kn_buf_upload,
 * weights with kn_tensor_to_backend on a copy of the host tensor whose
 * bytes are then overwritten (kn.h: the host data is no longer read),
 * outputs come back with kn_buf_download. Every output buffer is first
 * filled with 0xFF bytes (NaN as floats, -1 as ids) so an element an op
 * leaves unwritten fails, and every comparison is written so that a NaN
 * fails it: !(|got - want| <= tol).
 *
 * Tolerances (each derived where it is used):
 *  - bit for bit: add, get_rows, kv_write, kv_copy, gather (copies, or one
 *    IEEE operation on the same operands), argmax and topk (they select
 *    existing values, and ties have one defined answer), fill_random, and
 *    the invariances above;
 *  - silu_mul, silu_res: the silu differs by the device's expf (<= 2 ulp,
 *    glibc's <= 1): 5 ulp (2^-23 relative) of the magnitudes involved;
 *  - rope: 1e-5 of the pair's magnitude (cos/sin ulps; a float angle fails);
 *  - reductions (rmsnorm, softmax_stats, attention): 1e-5 of the row's scale
 *    plus a few ulps, the summation order differing (the scale: the element
 *    itself for rmsnorm, whose 1/rms is common to the row; 1 for the
 *    log-domain softmax_stats; max |v| for attention);
 *  - matmul: the float32 kernels (M < 512) differ from the reference in
 *    summation order only: 1e-5 * sum_c |w_rc x_mc| + 1e-6; cuBLASLt
 *    (M >= 512) rounds activations (and quantised weights) to F16 or BF16:
 *    2^-10 or 2^-7 of sum |w x| more (see mm_rel_tol).
 *
 * Checking the checks without a GPU: compiled with -DKT_CUDA_ON_CPU,
 * cuda_or_skip() hands out a CPU ctx (AVX2) instead, so the device tests'
 * own logic runs against a backend that keeps every promise; the tests of
 * device-only facts (name, memory, probes, out of memory) still skip. */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/kn.h"
#include "tests/kernels/util/kt.h"

#define ULP 0x1p-23 /* the largest spacing of floats relative to their value */

static const enum kn_dtype all_types[] = {KN_F32, KN_F16, KN_BF16, KN_Q8_0, KN_Q4_0};
#define N_TYPES (sizeof(all_types) / sizeof(all_types[0]))
#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

/* ---- helpers ---------------------------------------------------------------- */

/* The CUDA devices there are (> 0), or 0 / -errno with a non-empty reason. */
static int cuda_devices(char *why, size_t cap)
{
    why[0] = '\0';
    int n = kn_cuda_device_count(why, cap);
    if (n <= 0 && !why[0])
        snprintf(why, cap, "kn_cuda_device_count gave %d and no reason", n);
    return n;
}

/* A "cuda" ctx, or the test skipped with the reason there is none. */
static kn_ctx *cuda_or_skip(void)
{
    kn_ctx *ctx = NULL;
#ifdef KT_CUDA_ON_CPU /* AVX2: its Q8_0 matmul keeps float activations, like the device */
    KT_OK(kn_ctx_create(&ctx, &(kn_ctx_cfg){.n_threads = 2, .fanout_min_bytes = -1,
                                            .variant = KN_VARIANT_AVX2}));
    return ctx;
#endif
    char why[256];
    int n = cuda_devices(why, sizeof why);
    if (n <= 0)
        cr_skip_test("needs a CUDA device: %s", why);
    int rc = kn_ctx_create(&ctx, &(kn_ctx_cfg){.device = "cuda"});
    cr_assert_eq(rc, 0, "%d CUDA device(s) counted, yet kn_ctx_create(\"cuda\") gave %d", n, rc);
    return ctx;
}

/* cuda_or_skip for the tests of facts only a device has. */
static kn_ctx *device_or_skip(void)
{
    kn_ctx *ctx = cuda_or_skip();
    if (kn_ctx_host_memory(ctx)) {
        kn_ctx_destroy(ctx);
        cr_skip_test("KT_CUDA_ON_CPU: a CPU ctx stands in for the device");
    }
    return ctx;
}

/* The device under test, the scalar reference (a CPU ctx taking host
 * arrays; all CPUs, so the big references stay quick) and a fast CPU ctx
 * for error magnitudes. */
typedef struct rig {
    kn_ctx *cu, *ref, *fast;
    const kn_ops *ops, *rops, *fops;
} rig;

static rig open_rig(void)
{
    rig r = {.cu = cuda_or_skip()};
    r.ref = kt_ctx(0, KN_VARIANT_SCALAR);
    r.fast = kt_ctx(0, KN_VARIANT_AUTO);
    r.ops = kn_ctx_ops(r.cu);
    r.rops = kn_ops_for(KN_VARIANT_SCALAR);
    r.fops = kn_ctx_ops(r.fast);
    return r;
}

static void close_rig(rig *r)
{
    kn_ctx_destroy(r->cu);
    kn_ctx_destroy(r->ref);
    kn_ctx_destroy(r->fast);
}

/* n floats of device memory, downloaded into a fresh host array (free()). */
static float *fetch(kn_ctx *ctx, const float *dev, int64_t n)
{
    float *h = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    cr_assert_not_null(h);
    kt_dev_get(ctx, h, dev, (size_t)n * sizeof(float));
    return h;
}

static void *xmalloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    cr_assert_not_null(p);
    return p;
}

/* A device copy of host tensor w through kn_tensor_to_backend; the host
 * bytes it was made from are overwritten with 0xFF (NaN, and nonsense
 * scales) before returning, so a device that still reads them fails.
 * Release with kn_tensor_release(ctx, &copy). */
static kn_tensor to_device(kn_ctx *ctx, const kn_tensor *w, void **host_copy)
{
    const size_t bytes = kn_row_bytes(w->type, w->cols) * (size_t)w->rows;
    *host_copy = xmalloc(bytes);
    memcpy(*host_copy, w->data, bytes);
    kn_tensor d = *w;
    d.data = *host_copy;
    d.packed = NULL;
    KT_OK(kn_tensor_to_backend(ctx, &d));
    if (!kn_ctx_host_memory(ctx)) {
        cr_assert(d.data != *host_copy, "kn_tensor_to_backend left the host data in place");
        memset(*host_copy, 0xff, bytes);
    }
    return d;
}

static void release_device(kn_ctx *ctx, kn_tensor *d, void *host_copy)
{
    kn_tensor_release(ctx, d);
    free(host_copy);
}

/* Every got[i] within rel * scale_i + abs of want[i], where scale_i is
 * scale[i], or |want[i]| when scale is NULL; a NaN on either side fails.
 * Reports the first element that is not and how many are not. */
static void expect_near(const char *what, const float *got, const float *want, int64_t n,
                        const float *scale, double rel, double abs)
{
    int64_t first = -1, bad = 0;
    for (int64_t i = 0; i < n; i++) {
        const double s = scale ? (double)scale[i] : fabs((double)want[i]);
        if (!(fabs((double)got[i] - (double)want[i]) <= rel * s + abs)) {
            if (first < 0)
                first = i;
            bad++;
        }
    }
    if (first >= 0) {
        const double s = scale ? (double)scale[first] : fabs((double)want[first]);
        cr_assert_fail("%s: element %ld is %.9g, the reference %.9g (|diff| %.3g > %.3g); "
                 "%ld of %ld elements out of bounds",
                 what, (long)first, got[first], want[first],
                 fabs((double)got[first] - (double)want[first]), rel * s + abs, (long)bad,
                 (long)n);
    }
}

/* Floats equal bit for bit, and none NaN. */
static void expect_same_f32(const char *what, const float *got, const float *want, int64_t n)
{
    int64_t first = -1, bad = 0;
    for (int64_t i = 0; i < n; i++)
        if (isnan(got[i]) || memcmp(&got[i], &want[i], sizeof(float)) != 0) {
            if (first < 0)
                first = i;
            bad++;
        }
    if (first >= 0)
        cr_assert_fail("%s: element %ld is %.9g, the reference %.9g (must be equal bit for bit); "
                 "%ld of %ld elements differ",
                 what, (long)first, got[first], want[first], (long)bad, (long)n);
}

static void expect_same_i32(const char *what, const int32_t *got, const int32_t *want,
                            int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        if (got[i] != want[i])
            cr_assert_fail("%s: element %ld is %d, the reference %d", what, (long)i, got[i],
                           want[i]);
}

/* A random permutation of 0 .. n-1. */
static void shuffle(int32_t *v, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        v[i] = (int32_t)i;
    for (int64_t i = n - 1; i > 0; i--) {
        const int64_t j = (int64_t)(kt_rnd() % (uint64_t)(i + 1));
        const int32_t t = v[i];
        v[i] = v[j];
        v[j] = t;
    }
}

/* ---- everywhere: no device --------------------------------------------------- */

/* Without a usable device the count is 0 or -EOPNOTSUPP/-ENODEV with a
 * reason, the same every time, cut to cap bytes (a NUL among them), and
 * with no buffer at all it still answers. */
Test(kernels_cuda, device_count_without_a_device_gives_a_reason)
{
    char why[256];
    int n = cuda_devices(why, sizeof why);
    if (n > 0)
        cr_skip_test("this machine has %d CUDA device(s): the refusals are for machines "
                     "without one", n);
    why[0] = '\0';
    n = kn_cuda_device_count(why, sizeof why);
    cr_assert(n == 0 || n == -EOPNOTSUPP || n == -ENODEV, "kn_cuda_device_count: %d (%s)", n,
              why);
    cr_assert(why[0], "no reason given for %d", n);
    cr_assert_eq(kn_cuda_device_count(NULL, 0), n, "without a buffer");
    cr_assert_eq(kn_cuda_device_count(NULL, 64), n, "NULL why with a cap");
    char small[16];
    memset(small, 'x', sizeof small);
    cr_assert_eq(kn_cuda_device_count(small, 4), n, "a 4-byte buffer");
    cr_assert(memchr(small, '\0', 4), "the reason was not terminated within cap");
    for (size_t i = 4; i < sizeof small; i++)
        cr_assert_eq(small[i], 'x', "byte %zu past cap was written", i);
    char again[256] = "";
    cr_assert_eq(kn_cuda_device_count(again, sizeof again), n, "a second call");
    cr_assert_str_eq(again, why);
}

/* kn_ctx_create of a CUDA device that cannot be used fails with the code
 * kn_cuda_device_count gave (-ENODEV where that is 0: no device) and sets
 * *out to NULL; index 0 or another, named or implied. */
Test(kernels_cuda, create_without_a_device_fails_with_the_count_code)
{
    char why[256];
    int n = cuda_devices(why, sizeof why);
    if (n > 0)
        cr_skip_test("this machine has %d CUDA device(s): the refusals are for machines "
                     "without one", n);
    const int want = n < 0 ? n : -ENODEV;
    static const char *const names[] = {"cuda", "cuda:0", "cuda:1", "cuda:15"};
    for (size_t i = 0; i < ARRAY_LEN(names); i++) {
        kn_ctx *ctx = (kn_ctx *)(uintptr_t)1; /* must come back NULL */
        int rc = kn_ctx_create(&ctx, &(kn_ctx_cfg){.n_threads = 1, .device = names[i]});
        cr_assert_eq(rc, want, "\"%s\": %d, kn_cuda_device_count %d (%s)", names[i], rc, n, why);
        cr_assert_null(ctx, "\"%s\": *out not NULL after a failure", names[i]);
    }
}

/* ---- everywhere: device names and CPU contexts ------------------------------ */

/* kn_device_parse: NULL, "" and "cpu" are the CPU (-1), "cuda" device 0,
 * "cuda:N" device N; anything else is -EINVAL, in every build */
Test(kernels_cuda, device_names_parse_strictly)
{
    static const struct {
        const char *s;
        int index;
    } good[] = {{NULL, -1}, {"", -1}, {"cpu", -1}, {"cuda", 0}, {"cuda:0", 0},
                {"cuda:1", 1}, {"cuda:7", 7}, {"cuda:12", 12}};
    for (size_t i = 0; i < ARRAY_LEN(good); i++) {
        int idx = -99;
        cr_assert_eq(kn_device_parse(good[i].s, &idx), 0, "\"%s\"",
                     good[i].s ? good[i].s : "(null)");
        cr_assert_eq(idx, good[i].index, "\"%s\": %d", good[i].s ? good[i].s : "(null)", idx);
    }
    static const char *const bad[] = {"cuda:x", "gpu", "cuda:-1", "cuda:", "cuda:1x",
                                      "cuda0", "cudax", "cpux", "cuda:99999999999"};
    for (size_t i = 0; i < ARRAY_LEN(bad); i++) {
        int idx = -99;
        cr_assert_eq(kn_device_parse(bad[i], &idx), -EINVAL, "\"%s\"", bad[i]);
    }
}

/* kn_ctx_create refuses a malformed device name with -EINVAL before it
 * looks for a device (so the answer is the same with or without one) */
Test(kernels_cuda, create_rejects_malformed_device_names)
{
    static const char *const bad[] = {"cuda:x", "gpu", "cuda:-1", "cuda:", "cuda:1x", "cuda0"};
    for (size_t i = 0; i < ARRAY_LEN(bad); i++) {
        kn_ctx *ctx = (kn_ctx *)(uintptr_t)1;
        cr_assert_eq(kn_ctx_create(&ctx, &(kn_ctx_cfg){.n_threads = 1, .device = bad[i]}),
                     -EINVAL, "\"%s\"", bad[i]);
        cr_assert_null(ctx, "\"%s\": *out not NULL after a failure", bad[i]);
    }
}

/* NULL, "" and "cpu" make a CPU ctx: named "cpu", host memory, no memory
 * info, no GEMM probe, and an empty error message even after a failed op */
Test(kernels_cuda, cpu_device_names_make_a_cpu_ctx)
{
    static const char *const names[] = {NULL, "", "cpu"};
    for (size_t i = 0; i < ARRAY_LEN(names); i++) {
        const char *nm = names[i] ? names[i] : "(null)";
        kn_ctx *ctx = NULL;
        KT_OK(kn_ctx_create(&ctx, &(kn_ctx_cfg){.n_threads = 1, .device = names[i]}));
        cr_assert_not_null(ctx);
        cr_assert_str_eq(kn_ctx_device(ctx), "cpu", "\"%s\"", nm);
        cr_assert_eq(kn_ctx_host_memory(ctx), 1, "\"%s\"", nm);
        size_t fr = 0, tot = 0;
        cr_assert_eq(kn_ctx_mem_info(ctx, &fr, &tot), -EOPNOTSUPP, "\"%s\"", nm);
        cr_assert_str_eq(kn_ctx_error(ctx), "", "\"%s\"", nm);
        cr_assert_eq((int)kn_measure_gemm_peak(ctx, KN_F16, 64, 64, 64, 1), -EOPNOTSUPP,
                     "\"%s\": gemm peak on the CPU", nm);
        cr_assert_eq(kn_ctx_ops(ctx)->add(ctx, NULL, NULL, 4), -EINVAL);
        cr_assert_str_eq(kn_ctx_error(ctx), "", "\"%s\": after a failed op", nm);
        kn_ctx_destroy(ctx);
    }
}

/* On the CPU kn_tensor_to_backend is kn_tensor_pack: data stays the
 * caller's, matmul gives what it gives on the plain tensor, and
 * kn_tensor_release unpacks */
Test(kernels_cuda, tensor_to_backend_on_the_cpu_packs_in_place)
{
    kn_ctx *ctx = kt_ctx(2, KN_VARIANT_AUTO);
    const kn_ops *ops = kn_ctx_ops(ctx);
    static const int64_t shapes[][2] = {{110, 256}, {20, 64}}; /* packable on AVX-512; not */
    for (size_t it = 0; it < N_TYPES; it++)
        for (size_t is = 0; is < ARRAY_LEN(shapes); is++) {
            const int64_t N = shapes[is][0], K = shapes[is][1], M = 5;
            kn_tensor w;
            void *data = kt_weight(all_types[it], N, K, &w);
            kn_tensor b = w;
            KT_OK(kn_tensor_to_backend(ctx, &b));
            cr_assert_eq(b.data, data, "%s: data moved", kn_dtype_name(all_types[it]));
            float *x = kt_fvec(M * K), *y = kt_fvec(M * N), *yb = kt_fvec(M * N);
            kt_poison(y, M * N);
            kt_poison(yb, M * N);
            KT_OK(ops->matmul(ctx, &w, x, M, y));
            KT_OK(ops->matmul(ctx, &b, x, M, yb));
            expect_same_f32(kn_dtype_name(all_types[it]), yb, y, M * N);
            kn_tensor_release(ctx, &b);
            cr_assert_null(b.packed);
            cr_assert_eq(b.data, data);
            free(x);
            free(y);
            free(yb);
            free(data);
        }
    kn_ctx_destroy(ctx);
}

/* ---- kn_buf_fill_random ------------------------------------------------------ */

/* Element i of kn.h's generator, computed here from the formula. */
static float fill_value(uint64_t seed, int64_t i, float amplitude)
{
    uint64_t z = seed + (uint64_t)(i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return ((float)(z >> 40) * 0x1p-24f * 2.0f - 1.0f) * amplitude;
}

/* The bytes kn_buf_fill_random must write for (t, n, seed, amplitude)
 * (malloc'd, *bytes set): the formula's floats stored as t with the
 * library's own conversions. */
static void *fill_expected(enum kn_dtype t, int64_t n, uint64_t seed, float amplitude,
                           size_t *bytes)
{
    float *v = xmalloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++)
        v[i] = fill_value(seed, i, amplitude);
    *bytes = kn_row_bytes(t, n);
    cr_assert_gt(*bytes, 0);
    unsigned char *out = xmalloc(*bytes);
    if (t == KN_F32) {
        memcpy(out, v, *bytes);
    } else if (t == KN_F16 || t == KN_BF16) {
        for (int64_t i = 0; i < n; i++) {
            const uint16_t h = t == KN_F16 ? kn_f32_to_f16(v[i]) : kn_f32_to_bf16(v[i]);
            memcpy(out + 2 * i, &h, 2);
        }
    } else {
        cr_assert_eq(kn_quantize_row(t, v, n, out), (int64_t)*bytes);
    }
    free(v);
    return out;
}

/* ctx's fill of (t, n, seed, amplitude), downloaded (malloc'd, *bytes set);
 * the buffer is poisoned first. */
static void *fill_on(kn_ctx *ctx, enum kn_dtype t, int64_t n, uint64_t seed, float amplitude,
                     size_t *bytes)
{
    *bytes = kn_row_bytes(t, n);
    void *d = kt_dev(ctx, *bytes);
    KT_OK(kn_buf_fill_random(ctx, d, t, n, seed, amplitude));
    void *h = xmalloc(*bytes);
    kt_dev_get(ctx, h, d, *bytes);
    kn_buf_free(ctx, d);
    return h;
}

/* Every type's fill on ctx equals, byte for byte, the formula stored with
 * kn_f32_to_f16 / kn_f32_to_bf16 / kn_quantize_row (kn.h: "every backend
 * writes the same values"; the conversions are exactly specified roundings,
 * so there is nothing to tolerate); F32 values lie in [-amplitude,
 * amplitude) and spread over it. */
static void check_fill(kn_ctx *ctx, const char *who)
{
    static const uint64_t seeds[] = {0, 1, 0x5eed, 0xfedcba9876543210ull};
    static const float amps[] = {1.0f, 0.02f, 3.5f};
    static const int64_t ns[] = {32, 96, 4096, 100000 + 32}; /* whole blocks for Q8_0/Q4_0 */
    char what[160];
    for (size_t it = 0; it < N_TYPES; it++)
        for (size_t is = 0; is < ARRAY_LEN(seeds); is++)
            for (size_t ia = 0; ia < ARRAY_LEN(amps); ia++)
                for (size_t in = 0; in < ARRAY_LEN(ns); in++) {
                    const enum kn_dtype t = all_types[it];
                    const int64_t n = ns[in];
                    size_t bw, bg;
                    unsigned char *want = fill_expected(t, n, seeds[is], amps[ia], &bw);
                    unsigned char *got = fill_on(ctx, t, n, seeds[is], amps[ia], &bg);
                    cr_assert_eq(bg, bw);
                    snprintf(what, sizeof what, "%s fill %s n=%ld seed=%#llx amplitude=%g",
                             who, kn_dtype_name(t), (long)n, (unsigned long long)seeds[is],
                             amps[ia]);
                    if (t == KN_F32) {
                        const float *g = (const float *)got;
                        float lo = INFINITY, hi = -INFINITY;
                        int64_t out = -1;
                        for (int64_t i = 0; i < n; i++) {
                            if (!(g[i] >= -amps[ia] && g[i] < amps[ia]) && out < 0)
                                out = i;
                            lo = fminf(lo, g[i]);
                            hi = fmaxf(hi, g[i]);
                        }
                        cr_assert(out < 0, "%s: element %ld = %.9g outside [-a, a)", what,
                                  (long)out, out < 0 ? 0.0f : g[out]);
                        if (n >= 1000)
                            cr_assert(lo < -0.99f * amps[ia] && hi > 0.99f * amps[ia],
                                      "%s: values span only [%g, %g]", what, lo, hi);
                        expect_same_f32(what, g, (const float *)want, n);
                    }
                    if (memcmp(got, want, bw) != 0) {
                        size_t b = 0;
                        while (got[b] == want[b])
                            b++;
                        cr_assert_fail("%s: byte %zu (of %zu) is %#x, expected %#x", what, b,
                                       bw, got[b], want[b]);
                    }
                    free(want);
                    free(got);
                }
}

/* the CPU writes kn.h's values for every type */
Test(kernels_cuda, fill_random_writes_the_formula_on_the_cpu, .timeout = 60)
{
    kn_ctx *ctx = kt_ctx(2, KN_VARIANT_AUTO);
    check_fill(ctx, "cpu");
    kn_ctx_destroy(ctx);
}

/* a seed gives the same bytes every time and another seed other bytes;
 * element i does not depend on n (a counter-based generator) */
Test(kernels_cuda, fill_random_depends_on_the_seed_only)
{
    kn_ctx *ctx = kt_ctx(1, KN_VARIANT_AUTO);
    for (size_t it = 0; it < N_TYPES; it++) {
        const enum kn_dtype t = all_types[it];
        size_t b1, b2, b3, b4;
        unsigned char *a = fill_on(ctx, t, 4096, 42, 1.0f, &b1);
        unsigned char *a2 = fill_on(ctx, t, 4096, 42, 1.0f, &b2);
        unsigned char *o = fill_on(ctx, t, 4096, 43, 1.0f, &b3);
        unsigned char *p = fill_on(ctx, t, 64, 42, 1.0f, &b4);
        cr_assert(b1 == b2 && memcmp(a, a2, b1) == 0, "%s: same seed, other bytes",
                  kn_dtype_name(t));
        size_t same = 0;
        for (size_t i = 0; i < b1; i++)
            same += a[i] == o[i];
        cr_assert_lt(same, b1 / 8, "%s: seeds 42 and 43 share %zu of %zu bytes",
                     kn_dtype_name(t), same, b1);
        cr_assert(memcmp(a, p, b4) == 0, "%s: the first 64 elements depend on n",
                  kn_dtype_name(t));
        free(a);
        free(a2);
        free(o);
        free(p);
    }
    kn_ctx_destroy(ctx);
}

/* a partial block for Q8_0/Q4_0, an unknown type, n <= 0, a NULL buffer or
 * ctx give -EINVAL and write nothing */
Test(kernels_cuda, fill_random_rejects_invalid_arguments)
{
    kn_ctx *ctx = kt_ctx(1, KN_VARIANT_AUTO);
    unsigned char *d = kt_dev(ctx, 4096), h[4096];
    cr_assert_eq(kn_buf_fill_random(ctx, d, KN_Q8_0, 40, 1, 1.0f), -EINVAL, "Q8_0 n=40");
    cr_assert_eq(kn_buf_fill_random(ctx, d, KN_Q4_0, 33, 1, 1.0f), -EINVAL, "Q4_0 n=33");
    cr_assert_eq(kn_buf_fill_random(ctx, d, (enum kn_dtype)99, 32, 1, 1.0f), -EINVAL,
                 "unknown type");
    cr_assert_eq(kn_buf_fill_random(ctx, d, KN_F32, 0, 1, 1.0f), -EINVAL, "n = 0");
    cr_assert_eq(kn_buf_fill_random(ctx, d, KN_F32, -5, 1, 1.0f), -EINVAL, "n < 0");
    cr_assert_eq(kn_buf_fill_random(ctx, NULL, KN_F32, 8, 1, 1.0f), -EINVAL, "NULL p");
    cr_assert_eq(kn_buf_fill_random(NULL, d, KN_F32, 8, 1, 1.0f), -EINVAL, "NULL ctx");
    kt_dev_get(ctx, h, d, sizeof h);
    for (size_t i = 0; i < sizeof h; i++)
        cr_assert_eq(h[i], 0xff, "byte %zu written by a refused call", i);
    kn_buf_free(ctx, d);
    kn_ctx_destroy(ctx);
}

/* ---- on a device: the device itself ------------------------------------------ */

/* the ctx names device 0, its memory is reported consistently, and an
 * index past the devices there are is refused */
Test(kernels_cuda, reports_its_device_and_memory, .timeout = 60)
{
    kn_ctx *ctx = device_or_skip();
    const char *name = kn_ctx_device(ctx);
    cr_assert(strncmp(name, "cuda:0", 6) == 0, "device \"%s\"", name);
    size_t fr = 0, tot = 0;
    KT_OK(kn_ctx_mem_info(ctx, &fr, &tot));
    cr_assert_gt(tot, 0);
    cr_assert_leq(fr, tot, "free %zu > total %zu", fr, tot);
    cr_assert_str_eq(kn_ctx_error(ctx), "", "a fresh ctx reports an error");
    cr_assert_eq(kn_ctx_host_memory(ctx), 0);
    kn_ctx_destroy(ctx);

    kn_ctx *c0 = NULL;
    KT_OK(kn_ctx_create(&c0, &(kn_ctx_cfg){.device = "cuda:0"}));
    cr_assert(strncmp(kn_ctx_device(c0), "cuda:0", 6) == 0, "\"%s\"", kn_ctx_device(c0));
    kn_ctx_destroy(c0);

    char why[256], past[32];
    const int n = cuda_devices(why, sizeof why);
    snprintf(past, sizeof past, "cuda:%d", n);
    kn_ctx *cp = (kn_ctx *)(uintptr_t)1;
    cr_assert_lt(kn_ctx_create(&cp, &(kn_ctx_cfg){.device = past}), 0, "\"%s\" of %d", past, n);
    cr_assert_null(cp);
}

/* The probes measure something real: > 1e11 B/s of HBM reads (an H100
 * gives > 2e12; the floor catches a broken timer or a kernel that reads
 * nothing, without being a speed test) and > 1e12 FLOP/s of F16 GEMM. */
Test(kernels_cuda, probes_measure_hbm_bandwidth_and_gemm_peak, .timeout = 120)
{
    kn_ctx *ctx = device_or_skip();
    const double bw = kn_measure_read_bandwidth(ctx, (size_t)1 << 30, 5);
    cr_assert(isfinite(bw) && bw > 100e9, "read bandwidth %g B/s (%s)", bw,
              kn_ctx_error(ctx));
    const double fl = kn_measure_gemm_peak(ctx, KN_F16, 4096, 4096, 4096, 5);
    cr_assert(isfinite(fl) && fl > 1e12, "F16 GEMM peak %g FLOP/s (%s)", fl, kn_ctx_error(ctx));
    kn_ctx_destroy(ctx);
}

/* An allocation past the device's memory fails with -ENOMEM, *out NULL,
 * and a message naming the size; that error is not sticky: the ctx goes on
 * allocating, running ops and downloading. */
Test(kernels_cuda, allocation_past_device_memory_fails_and_ctx_survives, .timeout = 60)
{
    kn_ctx *ctx = device_or_skip();
    size_t fr = 0, tot = 0;
    KT_OK(kn_ctx_mem_info(ctx, &fr, &tot));
    const size_t big = tot + ((size_t)1 << 30) + 4096 * 3;
    void *p = (void *)(uintptr_t)1;
    cr_assert_eq(kn_buf_alloc(ctx, big, &p), -ENOMEM, "%zu bytes of %zu", big, tot);
    cr_assert_null(p);
    char size[32];
    snprintf(size, sizeof size, "%zu", big);
    cr_assert(strstr(kn_ctx_error(ctx), size), "the message \"%s\" does not name %s bytes",
              kn_ctx_error(ctx), size);

    const int64_t n = 1000;
    float *a = kt_fvec(n), *b = kt_fvec(n), *sum = xmalloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++)
        sum[i] = a[i] + b[i];
    float *ad = kt_dev_put(ctx, a, (size_t)n * sizeof(float));
    float *bd = kt_dev_put(ctx, b, (size_t)n * sizeof(float));
    KT_OK(kn_ctx_ops(ctx)->add(ctx, ad, bd, n));
    KT_OK(kn_sync(ctx));
    float *got = fetch(ctx, ad, n);
    expect_same_f32("add after a refused allocation", got, sum, n);
    kn_buf_free(ctx, ad);
    kn_buf_free(ctx, bd);
    free(a);
    free(b);
    free(sum);
    free(got);
    kn_ctx_destroy(ctx);
}

/* fill_random on the device writes exactly what the CPU does */
Test(kernels_cuda, fill_random_writes_the_formula_on_the_device, .timeout = 60)
{
    kn_ctx *ctx = cuda_or_skip();
    check_fill(ctx, kn_ctx_device(ctx));
    kn_ctx_destroy(ctx);
}

/* ---- on a device: matmul --------------------------------------------------------- */

/* From this many rows of activations on, the CUDA matmul runs cuBLASLt (not
 * batch-invariant, lower precision); below, its own float32 kernels. */
#define MM_GEMM_M 512

/* The relative error allowed for a matmul of weight type t at M rows, as a
 * fraction of sum_c |w_rc x_mc|.
 * Below MM_GEMM_M every product w*x is exact in float32 on both sides (the
 * weights are dequantised exactly: d * q is one rounding the reference does
 * too), so only the order of the float32 summation differs: each order's
 * error is a few 2^-24 of sum |w x| in practice (sqrt(K) growth; the
 * reference adds K = 4096 terms one after another), 1e-5 leaves a margin
 * of ~100 and still catches a dropped block (>= 1/128 of the terms).
 * From MM_GEMM_M on, cuBLASLt multiplies float32 activations rounded to
 * F16 (F16, Q8_0 and Q4_0 weights) or BF16 (BF16 weights), accumulating in
 * float32:
 *  - F16: a rounding to 11 significant bits is off by <= 2^-11 of the value;
 *    Q8_0/Q4_0 weights (d * q, up to 19 significant bits) are rounded to
 *    F16 too: two roundings, (1 + 2^-11)^2 - 1 < 2^-10 + 2^-22 per product;
 *  - BF16: 8 significant bits: 2^-8 of the value when rounded to nearest,
 *    2^-7 when truncated; the weights are BF16 already. We allow 2^-7;
 *  plus the float32 summation term above. F32 weights stay float32 at
 *    every M (CUBLAS_COMPUTE_32F; TF32 would need a bound of its own).
 * The absolute 1e-6 covers rows whose terms cancel to ~0 (and activations
 * below F16's normal range, off by <= 2^-25 absolute each). */
static double mm_rel_tol(enum kn_dtype t, int64_t M)
{
    if (M < MM_GEMM_M || t == KN_F32)
        return 1e-5;
    return (t == KN_BF16 ? 0x1p-7 : 0x1p-10 + 0x1p-22) + 1e-5;
}

/* One weight shape's data for the matmul tests: host weights, device
 * copies, and |W| as an F32 tensor (for the error magnitude). */
typedef struct mm_weight {
    kn_tensor w, d, abs_w;
    void *data, *copy;
    float *abs_data;
} mm_weight;

static mm_weight mm_weight_make(kn_ctx *cu, enum kn_dtype t, int64_t rows, int64_t cols)
{
    mm_weight m = {0};
    m.data = kt_weight(t, rows, cols, &m.w);
    m.d = to_device(cu, &m.w, &m.copy);
    m.abs_data = kt_dequant(&m.w);
    for (int64_t i = 0; i < rows * cols; i++)
        m.abs_data[i] = fabsf(m.abs_data[i]);
    m.abs_w = (kn_tensor){.data = m.abs_data, .type = KN_F32, .rows = rows, .cols = cols};
    return m;
}

static void mm_weight_free(kn_ctx *cu, mm_weight *m)
{
    release_device(cu, &m->d, m->copy);
    free(m->data);
    free(m->abs_data);
}

/* matmul of one weight type on the device against the scalar reference,
 * for every M, width and height of the brief; then matmul_multi over 1..4
 * weights of the same width against the device's separate matmuls, bit
 * for bit (kn.h: "same results"). */
static void check_matmul_type(enum kn_dtype t)
{
    static const int64_t Ms[] = {1, 3, 8, 17, 64, 600}; /* 600: cuBLASLt */
    static const int64_t widths[] = {64, 288, 4096};
    static const int64_t heights[] = {1000, 32, 32, 1000}; /* slots of matmul_multi */
    enum { MMAX = 600, NW = 4 };
    rig r = open_rig();
    char what[200];
    for (size_t ik = 0; ik < ARRAY_LEN(widths); ik++) {
        const int64_t K = widths[ik];
        mm_weight w[NW];
        for (int i = 0; i < NW; i++)
            w[i] = mm_weight_make(r.cu, t, heights[i], K);
        float *x = kt_fvec(MMAX * K), *abs_x = xmalloc((size_t)(MMAX * K) * sizeof(float));
        for (int64_t i = 0; i < MMAX * K; i++)
            abs_x[i] = fabsf(x[i]);
        float *xd = kt_dev_put(r.cu, x, (size_t)(MMAX * K) * sizeof(float));
        float *yd[NW], *yd_multi[NW], *ys[NW];
        for (int i = 0; i < NW; i++) {
            yd[i] = kt_dev(r.cu, (size_t)(MMAX * heights[i]) * sizeof(float));
            yd_multi[i] = kt_dev(r.cu, (size_t)(MMAX * heights[i]) * sizeof(float));
        }
        float *ref = xmalloc((size_t)(MMAX * 1000) * sizeof(float));
        float *mag = xmalloc((size_t)(MMAX * 1000) * sizeof(float));
        for (size_t im = 0; im < ARRAY_LEN(Ms); im++) {
            const int64_t M = Ms[im];
            /* separate matmuls: slots 0 and 1 (1000 and 32 rows) against
             * the reference; all four kept for matmul_multi */
            for (int i = 0; i < NW; i++) {
                const int64_t N = heights[i];
                kt_dev_fill(r.cu, yd[i], 0xff, (size_t)(M * N) * sizeof(float));
                KT_OK(r.ops->matmul(r.cu, &w[i].d, xd, M, yd[i]));
                ys[i] = fetch(r.cu, yd[i], M * N);
                if (i >= 2)
                    continue;
                KT_OK(r.rops->matmul(r.ref, &w[i].w, x, M, ref));
                KT_OK(r.fops->matmul(r.fast, &w[i].abs_w, abs_x, M, mag));
                snprintf(what, sizeof what, "%s matmul %s M=%ld K=%ld N=%ld (tolerance %.3g "
                         "of sum |w x|)", kn_ctx_device(r.cu), kn_dtype_name(t), (long)M,
                         (long)K, (long)N, mm_rel_tol(t, M));
                expect_near(what, ys[i], ref, M * N, mag, mm_rel_tol(t, M), 1e-6);
            }
            for (int n = 1; n <= NW; n++) {
                const kn_tensor *wp[NW];
                for (int i = 0; i < n; i++) {
                    wp[i] = &w[i].d;
                    kt_dev_fill(r.cu, yd_multi[i], 0xff,
                                (size_t)(M * heights[i]) * sizeof(float));
                }
                if (r.ops->matmul_multi)
                    KT_OK(r.ops->matmul_multi(r.cu, n, wp, xd, M, yd_multi));
                else
                    for (int i = 0; i < n; i++)
                        KT_OK(r.ops->matmul(r.cu, wp[i], xd, M, yd_multi[i]));
                for (int i = 0; i < n; i++) {
                    float *got = fetch(r.cu, yd_multi[i], M * heights[i]);
                    snprintf(what, sizeof what, "%s matmul_multi %s n=%d M=%ld K=%ld slot %d "
                             "vs its matmul", kn_ctx_device(r.cu), kn_dtype_name(t), n,
                             (long)M, (long)K, i);
                    expect_same_f32(what, got, ys[i], M * heights[i]);
                    free(got);
                }
            }
            for (int i = 0; i < NW; i++)
                free(ys[i]);
        }
        for (int i = 0; i < NW; i++) {
            kn_buf_free(r.cu, yd[i]);
            kn_buf_free(r.cu, yd_multi[i]);
            mm_weight_free(r.cu, &w[i]);
        }
        kn_buf_free(r.cu, xd);
        free(x);
        free(abs_x);
        free(ref);
        free(mag);
    }
    close_rig(&r);
}

Test(kernels_cuda, matmul_f32_matches_scalar, .timeout = 180)
{
    check_matmul_type(KN_F32);
}

Test(kernels_cuda, matmul_f16_matches_scalar, .timeout = 180)
{
    check_matmul_type(KN_F16);
}

Test(kernels_cuda, matmul_bf16_matches_scalar, .timeout = 180)
{
    check_matmul_type(KN_BF16);
}

Test(kernels_cuda, matmul_q8_0_matches_scalar, .timeout = 180)
{
    check_matmul_type(KN_Q8_0);
}

Test(kernels_cuda, matmul_q4_0_matches_scalar, .timeout = 180)
{
    check_matmul_type(KN_Q4_0);
}

/* Below MM_GEMM_M a row's product does not depend on the rows batched with
 * it (kn.h; continuous batching and Medusa verification rely on it): row m
 * of an M-row matmul equals, bit for bit, the same row computed with M = 1,
 * for every type, at M up to the last one below the threshold. */
Test(kernels_cuda, matmul_row_does_not_depend_on_the_batch, .timeout = 120)
{
    static const int64_t Ms[] = {3, 8, 17, 64, MM_GEMM_M - 1};
    enum { MMAX = MM_GEMM_M - 1 };
    const int64_t N = 1000, K = 4096;
    kn_ctx *cu = cuda_or_skip();
    const kn_ops *ops = kn_ctx_ops(cu);
    float *x = kt_fvec(MMAX * K);
    float *xd = kt_dev_put(cu, x, (size_t)(MMAX * K) * sizeof(float));
    float *yd = kt_dev(cu, (size_t)(MMAX * N) * sizeof(float));
    float *y1d = kt_dev(cu, (size_t)(MMAX * N) * sizeof(float));
    char what[160];
    for (size_t it = 0; it < N_TYPES; it++) {
        kn_tensor w;
        void *data = kt_weight(all_types[it], N, K, &w), *copy;
        kn_tensor d = to_device(cu, &w, &copy);
        for (size_t im = 0; im < ARRAY_LEN(Ms); im++) {
            const int64_t M = Ms[im];
            kt_dev_fill(cu, yd, 0xff, (size_t)(M * N) * sizeof(float));
            kt_dev_fill(cu, y1d, 0xff, (size_t)(M * N) * sizeof(float));
            KT_OK(ops->matmul(cu, &d, xd, M, yd));
            for (int64_t m = 0; m < M; m++) /* interior pointers are backend addresses */
                KT_OK(ops->matmul(cu, &d, xd + m * K, 1, y1d + m * N));
            float *y = fetch(cu, yd, M * N), *y1 = fetch(cu, y1d, M * N);
            snprintf(what, sizeof what, "%s %s rows of M=%ld vs each row alone",
                     kn_ctx_device(cu), kn_dtype_name(all_types[it]), (long)M);
            expect_same_f32(what, y, y1, M * N);
            free(y);
            free(y1);
        }
        release_device(cu, &d, copy);
        free(data);
    }
    kn_buf_free(cu, xd);
    kn_buf_free(cu, yd);
    kn_buf_free(cu, y1d);
    free(x);
    kn_ctx_destroy(cu);
}

/* ---- on a device: get_rows, element-wise ops --------------------------------- */

/* get_rows of every type, ids in and out of range (zero rows), bit for bit:
 * dequantisation is d * q, one rounding on both sides */
Test(kernels_cuda, get_rows_equals_scalar, .timeout = 60)
{
    rig r = open_rig();
    static const int64_t widths[] = {64, 4096};
    const int64_t rows = 1000;
    const int32_t ids[] = {3, 0, 999, 3, 1000, -1, 517, INT32_MAX, INT32_MIN, 998, 42};
    const int64_t n = (int64_t)ARRAY_LEN(ids);
    int32_t *idd = kt_dev_put(r.cu, ids, sizeof ids);
    char what[160];
    for (size_t it = 0; it < N_TYPES; it++)
        for (size_t iw = 0; iw < ARRAY_LEN(widths); iw++) {
            const int64_t K = widths[iw];
            kn_tensor w;
            void *data = kt_weight(all_types[it], rows, K, &w), *copy;
            kn_tensor d = to_device(r.cu, &w, &copy);
            float *want = kt_fvec(n * K);
            float *outd = kt_dev(r.cu, (size_t)(n * K) * sizeof(float));
            KT_OK(r.rops->get_rows(r.ref, &w, ids, n, want));
            KT_OK(r.ops->get_rows(r.cu, &d, idd, n, outd));
            float *got = fetch(r.cu, outd, n * K);
            snprintf(what, sizeof what, "get_rows %s K=%ld", kn_dtype_name(all_types[it]),
                     (long)K);
            expect_same_f32(what, got, want, n * K);
            for (int64_t i = 0; i < n; i++)
                if (ids[i] < 0 || ids[i] >= rows)
                    for (int64_t c = 0; c < K; c++)
                        cr_assert(got[i * K + c] == 0.0f, "%s: id %d gives %g at %ld", what,
                                  ids[i], got[i * K + c], (long)c);
            free(got);
            free(want);
            kn_buf_free(r.cu, outd);
            release_device(r.cu, &d, copy);
            free(data);
        }
    kn_buf_free(r.cu, idd);
    close_rig(&r);
}

/* rmsnorm out of place (poisoned out) and in place. The scale 1/rms is
 * common to a row; its error is that of the sum of squares in another
 * order (the reference sums in double, a device in float: ~sqrt(n) 2^-24
 * relative in sequence, less in a tree), 1e-5 relative per element leaves
 * a wide margin; the products x * s * g add 2 roundings. */
Test(kernels_cuda, rmsnorm_within_1e_5_of_scalar, .timeout = 60)
{
    rig r = open_rig();
    static const int64_t shapes[][2] = {{1, 7}, {3, 200}, {60, 768}, {17, 4096}, {2, 8192}};
    char what[160];
    for (size_t is = 0; is < ARRAY_LEN(shapes); is++) {
        const int64_t M = shapes[is][0], n = shapes[is][1];
        float *x = kt_fvec(M * n), *g = kt_fvec(n), *want = kt_fvec(M * n);
        for (int64_t i = 0; i < M * n; i++) /* rows of different scales */
            x[i] *= (float)(1 + i / n % 7) * 3.0f;
        KT_OK(r.rops->rmsnorm(r.ref, x, g, M, n, 1e-5f, want));
        float *xd = kt_dev_put(r.cu, x, (size_t)(M * n) * sizeof(float));
        float *gd = kt_dev_put(r.cu, g, (size_t)n * sizeof(float));
        float *outd = kt_dev(r.cu, (size_t)(M * n) * sizeof(float));
        KT_OK(r.ops->rmsnorm(r.cu, xd, gd, M, n, 1e-5f, outd));
        KT_OK(r.ops->rmsnorm(r.cu, xd, gd, M, n, 1e-5f, xd));
        float *got = fetch(r.cu, outd, M * n), *inpl = fetch(r.cu, xd, M * n);
        snprintf(what, sizeof what, "rmsnorm M=%ld n=%ld", (long)M, (long)n);
        expect_near(what, got, want, M * n, NULL, 1e-5, 0.0);
        snprintf(what, sizeof what, "rmsnorm in place M=%ld n=%ld", (long)M, (long)n);
        expect_near(what, inpl, want, M * n, NULL, 1e-5, 0.0);
        free(got);
        free(inpl);
        kn_buf_free(r.cu, xd);
        kn_buf_free(r.cu, gd);
        kn_buf_free(r.cu, outd);
        free(x);
        free(g);
        free(want);
    }
    close_rig(&r);
}

/* rope, head_dim 64 and 128, rope_dims = head_dim and less, positions up to
 * 32767. A rotated pair (a, b) may be off by 1e-5 of |a| + |b|: cos and sin
 * rounded to float differently, a fused multiply-add; that is ~80 ulp, and
 * an angle computed in float (off by ~pos * 2^-24 rad, 2e-3 at 32767) fails
 * it. Dimensions past rope_dims must be untouched (tolerance 0). */
Test(kernels_cuda, rope_within_1e_5_of_scalar, .timeout = 60)
{
    rig r = open_rig();
    static const int shapes[][3] = {{1, 8, 64}, {67, 8, 64}, {5, 32, 128}, {64, 2, 128}};
    static const float bases[] = {10000.0f, 500000.0f};
    char what[160];
    for (size_t is = 0; is < ARRAY_LEN(shapes); is++) {
        const int64_t M = shapes[is][0];
        const int nh = shapes[is][1], hd = shapes[is][2];
        const int64_t len = M * nh * hd;
        int32_t *pos = xmalloc((size_t)M * sizeof(int32_t));
        for (int64_t m = 0; m < M; m++)
            pos[m] = m == 0 ? 0 : (int32_t)((m * 4877 + 13) % 32768);
        int32_t *posd = kt_dev_put(r.cu, pos, (size_t)M * sizeof(int32_t));
        const int rds[] = {hd, hd / 2, hd / 4}; /* rope_dims */
        for (size_t ir = 0; ir < ARRAY_LEN(rds); ir++)
            for (size_t ib = 0; ib < ARRAY_LEN(bases); ib++) {
                const int rd = rds[ir];
                float *x = kt_fvec(len), *mag = xmalloc((size_t)len * sizeof(float));
                for (int64_t i = 0; i < len; i++) {
                    const int d = (int)(i % hd);
                    const int64_t p = i - d % 2; /* the pair's first element */
                    mag[i] = d < rd ? fabsf(x[p]) + fabsf(x[p + 1]) : 0.0f;
                }
                float *xd = kt_dev_put(r.cu, x, (size_t)len * sizeof(float));
                KT_OK(r.rops->rope(r.ref, x, M, nh, hd, rd, pos, bases[ib]));
                KT_OK(r.ops->rope(r.cu, xd, M, nh, hd, rd, posd, bases[ib]));
                float *got = fetch(r.cu, xd, len);
                snprintf(what, sizeof what, "rope M=%ld heads=%d head_dim=%d rope_dims=%d "
                         "base=%g", (long)M, nh, hd, rd, bases[ib]);
                expect_near(what, got, x, len, mag, 1e-5, 0.0);
                free(got);
                free(x);
                free(mag);
                kn_buf_free(r.cu, xd);
            }
        kn_buf_free(r.cu, posd);
        free(pos);
    }
    close_rig(&r);
}

/* silu(v) = v / (1 + exp(-v)) differs by the exp: the device's expf is
 * within 2 ulp, glibc's within 1, and the add and divide keep relative
 * errors: <= 4 ulp of silu apart, and one more for the rounding of what is
 * done with it (a product, a sum). So 5 ulp (2^-23 relative) of the
 * magnitudes: |silu(g) * u| for silu_mul, |x| + |silu(z + b)| for silu_res.
 * A device using __expf (error growing with |v|) fails this. */
static double silu_d(double v)
{
    return v / (1.0 + exp(-v));
}

/* silu_mul within 5 ulp; add bit for bit (one IEEE addition) */
Test(kernels_cuda, silu_mul_and_add_match_scalar, .timeout = 60)
{
    rig r = open_rig();
    static const int64_t sizes[] = {1, 7, 33, 40000, (1 << 20) + 3};
    char what[160];
    for (size_t is = 0; is < ARRAY_LEN(sizes); is++) {
        const int64_t n = sizes[is];
        float *g = kt_fvec(n), *u = kt_fvec(n), *a = kt_fvec(n);
        float *mag = xmalloc((size_t)n * sizeof(float));
        for (int64_t i = 0; i < n; i++) {
            g[i] *= 30.0f; /* both tails of the sigmoid */
            mag[i] = (float)fabs(silu_d(g[i]) * u[i]);
        }
        float *gd = kt_dev_put(r.cu, g, (size_t)n * sizeof(float));
        float *ud = kt_dev_put(r.cu, u, (size_t)n * sizeof(float));
        float *ad = kt_dev_put(r.cu, a, (size_t)n * sizeof(float));
        KT_OK(r.rops->silu_mul(r.ref, g, u, n));
        KT_OK(r.ops->silu_mul(r.cu, gd, ud, n));
        KT_OK(r.rops->add(r.ref, a, u, n));
        KT_OK(r.ops->add(r.cu, ad, ud, n));
        float *got = fetch(r.cu, gd, n), *gota = fetch(r.cu, ad, n);
        snprintf(what, sizeof what, "silu_mul n=%ld", (long)n);
        expect_near(what, got, g, n, mag, 5 * ULP, 0.0);
        snprintf(what, sizeof what, "add n=%ld", (long)n);
        expect_same_f32(what, gota, a, n);
        free(got);
        free(gota);
        kn_buf_free(r.cu, gd);
        kn_buf_free(r.cu, ud);
        kn_buf_free(r.cu, ad);
        free(g);
        free(u);
        free(a);
        free(mag);
    }
    close_rig(&r);
}

/* silu_res with and without a bias, within 5 ulp of |x| + |silu| */
Test(kernels_cuda, silu_res_matches_scalar, .timeout = 60)
{
    rig r = open_rig();
    static const int64_t shapes[][3] = {{1, 1, 5}, {3, 4, 64}, {6, 3, 2048}, {64, 5, 4096}};
    char what[160];
    for (size_t is = 0; is < ARRAY_LEN(shapes); is++) {
        const int64_t M = shapes[is][0], NH = shapes[is][1], n = shapes[is][2];
        const int64_t len = NH * M * n;
        float *x = kt_fvec(M * n), *z = kt_fvec(M * NH * n), *bias = kt_fvec(NH * n);
        float *want = kt_fvec(len), *mag = xmalloc((size_t)len * sizeof(float));
        for (int64_t i = 0; i < M * NH * n; i++)
            z[i] *= 20.0f;
        float *xd = kt_dev_put(r.cu, x, (size_t)(M * n) * sizeof(float));
        float *zd = kt_dev_put(r.cu, z, (size_t)(M * NH * n) * sizeof(float));
        float *bd = kt_dev_put(r.cu, bias, (size_t)(NH * n) * sizeof(float));
        for (int with_bias = 0; with_bias <= 1; with_bias++) {
            for (int64_t h = 0; h < NH; h++)
                for (int64_t m = 0; m < M; m++)
                    for (int64_t i = 0; i < n; i++) {
                        const double s = (double)z[(m * NH + h) * n + i] +
                                         (with_bias ? bias[h * n + i] : 0.0);
                        mag[(h * M + m) * n + i] = (float)(fabs(x[m * n + i]) + fabs(silu_d(s)));
                    }
            float *outd = kt_dev(r.cu, (size_t)len * sizeof(float));
            KT_OK(r.rops->silu_res(r.ref, x, z, with_bias ? bias : NULL, M, NH, n, want));
            KT_OK(r.ops->silu_res(r.cu, xd, zd, with_bias ? bd : NULL, M, NH, n, outd));
            float *got = fetch(r.cu, outd, len);
            snprintf(what, sizeof what, "silu_res M=%ld heads=%ld n=%ld bias=%d", (long)M,
                     (long)NH, (long)n, with_bias);
            expect_near(what, got, want, len, mag, 5 * ULP, 0.0);
            free(got);
            kn_buf_free(r.cu, outd);
        }
        kn_buf_free(r.cu, xd);
        kn_buf_free(r.cu, zd);
        kn_buf_free(r.cu, bd);
        free(x);
        free(z);
        free(bias);
        free(want);
        free(mag);
    }
    close_rig(&r);
}

/* ---- on a device: attention ---------------------------------------------------- */

/* One attention problem: a KV pool over a random block table, queries and
 * an optional tree mask, on the host and on the device. */
typedef struct attn_case {
    int n_head, n_kv_head, head_dim, block_size;
    int64_t n_past, n_q, n_blocks;
    float *q, *k, *v; /* host: [n_q][n_head][hd], pools [n_blocks][bs][n_kv_head][hd] */
    int32_t *bt;
    uint8_t *mask;    /* [n_q][n_q], NULL: causal */
    kn_attn_args dev; /* the same on the device (out and scratch poisoned per call) */
} attn_case;

/* parents[] of a random tree of n_q nodes in cache order (parents first,
 * -1 for a root), as a mask: each node sees its ancestors and itself. */
static void tree_mask(uint8_t *mask, int64_t n_q)
{
    memset(mask, 0, (size_t)(n_q * n_q));
    int64_t *parent = xmalloc((size_t)n_q * sizeof(int64_t));
    for (int64_t i = 0; i < n_q; i++) {
        parent[i] = i < 3 ? -1 : (int64_t)(kt_rnd() % (uint64_t)i);
        for (int64_t j = i; j >= 0; j = parent[j])
            mask[i * n_q + j] = 1;
    }
    free(parent);
}

static attn_case attn_make(kn_ctx *cu, int n_head, int n_kv_head, int head_dim, int64_t n_past,
                           int64_t n_q, int masked)
{
    attn_case c = {.n_head = n_head, .n_kv_head = n_kv_head, .head_dim = head_dim,
                   .block_size = 16, .n_past = n_past, .n_q = n_q};
    const int64_t n_ctx = n_past + n_q;
    c.n_blocks = (n_ctx + c.block_size - 1) / c.block_size + 3; /* spare blocks unused */
    const int64_t pool = c.n_blocks * c.block_size * n_kv_head * head_dim;
    const int64_t qn = n_q * n_head * head_dim;
    c.q = kt_fvec(qn);
    c.k = kt_fvec(pool);
    c.v = kt_fvec(pool);
    c.bt = xmalloc((size_t)c.n_blocks * sizeof(int32_t));
    shuffle(c.bt, c.n_blocks);
    if (masked) {
        c.mask = xmalloc((size_t)(n_q * n_q));
        tree_mask(c.mask, n_q);
        if (n_past == 0) /* a query that sees nothing: a zero row */
            memset(c.mask, 0, (size_t)n_q);
    }
    c.dev = (kn_attn_args){
        .q = kt_dev_put(cu, c.q, (size_t)qn * sizeof(float)),
        .n_q = n_q, .n_past = n_past, .n_head = n_head, .n_kv_head = n_kv_head,
        .head_dim = head_dim,
        .k_pool = kt_dev_put(cu, c.k, (size_t)pool * sizeof(float)),
        .v_pool = kt_dev_put(cu, c.v, (size_t)pool * sizeof(float)),
        .block_table = kt_dev_put(cu, c.bt, (size_t)c.n_blocks * sizeof(int32_t)),
        .block_size = c.block_size,
        .mask = masked ? kt_dev_put(cu, c.mask, (size_t)(n_q * n_q)) : NULL,
        .scale = 1.0f / sqrtf((float)head_dim),
        .out = kt_dev(cu, (size_t)qn * sizeof(float)),
        .scratch = kt_dev(cu, kn_attn_scratch_floats(n_ctx, kn_ctx_threads(cu)) * sizeof(float)),
    };
    return c;
}

static void attn_free(kn_ctx *cu, attn_case *c)
{
    kn_buf_free(cu, (void *)c->dev.q);
    kn_buf_free(cu, (void *)c->dev.k_pool);
    kn_buf_free(cu, (void *)c->dev.v_pool);
    kn_buf_free(cu, (void *)c->dev.block_table);
    kn_buf_free(cu, (void *)c->dev.mask);
    kn_buf_free(cu, c->dev.out);
    kn_buf_free(cu, c->dev.scratch);
    free(c->q);
    free(c->k);
    free(c->v);
    free(c->bt);
    free(c->mask);
}

/* The device's output of args a (out poisoned first), downloaded. */
static float *attn_run(kn_ctx *cu, const kn_attn_args *a)
{
    const int64_t qn = a->n_q * a->n_head * a->head_dim;
    kt_dev_fill(cu, a->out, 0xff, (size_t)qn * sizeof(float));
    KT_OK(kn_ctx_ops(cu)->attention(cu, a));
    return fetch(cu, a->out, qn);
}

/* Every case of head_dim {8, 64, 128} x n_past {0, 1, 300, 2000} x n_q
 * {1, 7, 64} x causal / tree mask, GQA 8/2, blocks of 16 over a random
 * block table. The output is a convex combination of V rows, so its scale
 * is max |v| (1 here): the scores (dots in another order, ~2^-24 * sum
 * |q k| * scale), the exps (a few ulp) and the weighted sum of up to 2064
 * rows (in float, another order or split) each move it by well under 1e-6
 * of that; allowed 1e-5 of max |v| plus 4 ulp of the value. A query that
 * sees nothing (n_past 0, mask row 0) must give exact zeros. */
Test(kernels_cuda, attention_within_1e_5_of_scalar, .timeout = 120)
{
    rig r = open_rig();
    static const int hds[] = {8, 64, 128};
    static const int64_t pasts[] = {0, 1, 300, 2000}, nqs[] = {1, 7, 64};
    char what[200];
    for (size_t ih = 0; ih < ARRAY_LEN(hds); ih++)
        for (size_t ip = 0; ip < ARRAY_LEN(pasts); ip++)
            for (size_t iq = 0; iq < ARRAY_LEN(nqs); iq++)
                for (int masked = 0; masked <= 1; masked++) {
                    attn_case c = attn_make(r.cu, 8, 2, hds[ih], pasts[ip], nqs[iq], masked);
                    const int64_t qn = c.n_q * c.n_head * c.head_dim;
                    float *want = kt_fvec(qn);
                    float *scratch = xmalloc(kn_attn_scratch_floats(c.n_past + c.n_q,
                                                                    kn_ctx_threads(r.ref)) *
                                             sizeof(float));
                    kn_attn_args a = c.dev;
                    a.q = c.q;
                    a.k_pool = c.k;
                    a.v_pool = c.v;
                    a.block_table = c.bt;
                    a.mask = c.mask;
                    a.out = want;
                    a.scratch = scratch;
                    KT_OK(r.rops->attention(r.ref, &a));
                    float *got = attn_run(r.cu, &c.dev);
                    snprintf(what, sizeof what, "attention heads=8/2 head_dim=%d n_past=%ld "
                             "n_q=%ld %s", c.head_dim, (long)c.n_past, (long)c.n_q,
                             masked ? "tree mask" : "causal");
                    expect_near(what, got, want, qn, NULL, 4 * ULP, 1e-5);
                    if (masked && c.n_past == 0)
                        for (int64_t e = 0; e < c.n_head * c.head_dim; e++)
                            cr_assert(got[e] == 0.0f,
                                      "%s: query 0 sees nothing, yet [%ld] = %g", what,
                                      (long)e, got[e]);
                    free(got);
                    free(want);
                    free(scratch);
                    attn_free(r.cu, &c);
                }
    close_rig(&r);
}

/* kn.h: "A query's output does not depend, bit for bit, on the other
 * queries of the call". Causal: query i of a batch equals the call with
 * that query alone at n_past + i (the decode path against the prefill
 * path). Tree mask: query i equals the same query in the prefix batch
 * 0 .. i and in a batch whose other queries differ. */
Test(kernels_cuda, attention_query_does_not_depend_on_the_batch, .timeout = 120)
{
    kn_ctx *cu = cuda_or_skip();
    static const int hds[] = {8, 64, 128};
    static const int64_t pasts[] = {0, 300, 2000}, nqs[] = {7, 64};
    for (size_t ih = 0; ih < ARRAY_LEN(hds); ih++)
        for (size_t ip = 0; ip < ARRAY_LEN(pasts); ip++)
            for (size_t iq = 0; iq < ARRAY_LEN(nqs); iq++)
                for (int masked = 0; masked <= 1; masked++) {
                    attn_case c = attn_make(cu, 8, 2, hds[ih], pasts[ip], nqs[iq], masked);
                    const int64_t qrow = (int64_t)c.n_head * c.head_dim, n_q = c.n_q;
                    float *all = attn_run(cu, &c.dev);
                    /* the other queries replaced: same K/V, same mask */
                    float *q2 = xmalloc((size_t)(n_q * qrow) * sizeof(float));
                    for (int64_t e = 0; e < n_q * qrow; e++)
                        q2[e] = c.q[e] * -0.5f + 0.25f;
                    float *q2d = kt_dev_put(cu, q2, (size_t)(n_q * qrow) * sizeof(float));
                    uint8_t *sub = xmalloc((size_t)(n_q * n_q));
                    uint8_t *subd = kt_dev(cu, (size_t)(n_q * n_q));
                    for (int64_t i = 0; i < n_q; i++) {
                        kn_attn_args b = c.dev;
                        if (!masked) {
                            b.q = c.dev.q + i * qrow;
                            b.n_q = 1;
                            b.n_past = c.n_past + i;
                        } else {
                            b.n_q = i + 1;
                            for (int64_t rr = 0; rr <= i; rr++)
                                memcpy(sub + rr * (i + 1), c.mask + rr * n_q, (size_t)(i + 1));
                            KT_OK(kn_buf_upload(cu, subd, sub, (size_t)((i + 1) * (i + 1))));
                            b.mask = subd;
                        }
                        float *one = attn_run(cu, &b);
                        const float *got = masked ? one + i * qrow : one;
                        cr_assert(memcmp(got, all + i * qrow, (size_t)qrow * sizeof(float)) == 0
                                  && !isnan(got[0]),
                                  "head_dim=%d n_past=%ld n_q=%ld %s: query %ld alone differs",
                                  c.head_dim, (long)c.n_past, (long)n_q,
                                  masked ? "tree mask" : "causal", (long)i);
                        free(one);
                        if (!masked)
                            continue;
                        KT_OK(kn_buf_upload(cu, q2d + i * qrow, c.q + i * qrow,
                                            (size_t)qrow * sizeof(float)));
                        b = c.dev;
                        b.q = q2d;
                        float *mates = attn_run(cu, &b);
                        cr_assert(memcmp(mates + i * qrow, all + i * qrow,
                                         (size_t)qrow * sizeof(float)) == 0,
                                  "head_dim=%d n_past=%ld n_q=%ld: query %ld depends on its "
                                  "batch mates", c.head_dim, (long)c.n_past, (long)n_q, (long)i);
                        free(mates);
                        KT_OK(kn_buf_upload(cu, q2d + i * qrow, q2 + i * qrow,
                                            (size_t)qrow * sizeof(float)));
                    }
                    free(all);
                    free(q2);
                    free(sub);
                    kn_buf_free(cu, q2d);
                    kn_buf_free(cu, subd);
                    attn_free(cu, &c);
                }
    kn_ctx_destroy(cu);
}

/* kn.h: a masked query's output equals, bit for bit, the same query
 * unmasked (n_q 1) over its visible keys stored contiguously in the same
 * order (a Medusa tree node gets what decoding its token alone gives).
 * Each node of random trees is decoded over a second pool holding its
 * visible rows at positions 0 .. n_vis - 1 under another block table. */
Test(kernels_cuda, masked_query_equals_decode_over_contiguous_keys, .timeout = 120)
{
    kn_ctx *cu = cuda_or_skip();
    static const int hds[] = {8, 64, 128};
    static const int64_t pasts[] = {0, 5, 300, 2000}, nqs[] = {10, 64};
    for (size_t ih = 0; ih < ARRAY_LEN(hds); ih++)
        for (size_t ip = 0; ip < ARRAY_LEN(pasts); ip++)
            for (size_t iq = 0; iq < ARRAY_LEN(nqs); iq++) {
                attn_case c = attn_make(cu, 8, 2, hds[ih], pasts[ip], nqs[iq], 1);
                if (c.n_past == 0) /* attn_make blanked row 0: give it back its root */
                    c.mask[0] = 1;
                KT_OK(kn_buf_upload(cu, (void *)c.dev.mask, c.mask, (size_t)(c.n_q * c.n_q)));
                const int64_t n_q = c.n_q, n_ctx = c.n_past + n_q, bs = c.block_size;
                const int64_t row = (int64_t)c.n_kv_head * c.head_dim;
                const int64_t qrow = (int64_t)c.n_head * c.head_dim;
                const int64_t pool = c.n_blocks * bs * row;
                float *all = attn_run(cu, &c.dev);
                float *k2 = kt_fvec(pool), *v2 = kt_fvec(pool);
                int32_t *bt2 = xmalloc((size_t)c.n_blocks * sizeof(int32_t));
                shuffle(bt2, c.n_blocks);
                int64_t *vis = xmalloc((size_t)n_ctx * sizeof(int64_t));
                kn_attn_args b = c.dev;
                b.k_pool = kt_dev(cu, (size_t)pool * sizeof(float));
                b.v_pool = kt_dev(cu, (size_t)pool * sizeof(float));
                b.block_table = kt_dev_put(cu, bt2, (size_t)c.n_blocks * sizeof(int32_t));
                b.mask = NULL;
                b.n_q = 1;
                b.out = kt_dev(cu, (size_t)qrow * sizeof(float));
                for (int64_t i = 0; i < n_q; i++) {
                    int64_t n_vis = 0;
                    for (int64_t p = 0; p < n_ctx; p++)
                        if (p < c.n_past || c.mask[i * n_q + p - c.n_past])
                            vis[n_vis++] = p;
                    for (int64_t t = 0; t < n_vis; t++) {
                        const int64_t src = (c.bt[vis[t] / bs] * bs + vis[t] % bs) * row;
                        const int64_t dst = (bt2[t / bs] * bs + t % bs) * row;
                        memcpy(k2 + dst, c.k + src, (size_t)row * sizeof(float));
                        memcpy(v2 + dst, c.v + src, (size_t)row * sizeof(float));
                    }
                    KT_OK(kn_buf_upload(cu, (void *)b.k_pool, k2, (size_t)pool * sizeof(float)));
                    KT_OK(kn_buf_upload(cu, (void *)b.v_pool, v2, (size_t)pool * sizeof(float)));
                    b.q = c.dev.q + i * qrow;
                    b.n_past = n_vis - 1;
                    float *one = attn_run(cu, &b);
                    cr_assert(memcmp(one, all + i * qrow, (size_t)qrow * sizeof(float)) == 0 &&
                                  !isnan(one[0]),
                              "head_dim=%d n_past=%ld n_q=%ld: node %ld (%ld visible keys) "
                              "differs from its decode over contiguous keys",
                              c.head_dim, (long)c.n_past, (long)n_q, (long)i, (long)n_vis);
                    free(one);
                }
                kn_buf_free(cu, (void *)b.k_pool);
                kn_buf_free(cu, (void *)b.v_pool);
                kn_buf_free(cu, (void *)b.block_table);
                kn_buf_free(cu, b.out);
                free(all);
                free(k2);
                free(v2);
                free(bt2);
                free(vis);
                attn_free(cu, &c);
            }
    kn_ctx_destroy(cu);
}

/* ---- on a device: KV pool ---------------------------------------------------------- */

/* kv_write with padding (negative) slots leaves the reference's pools bit
 * for bit; rows it must not touch keep their old contents */
Test(kernels_cuda, kv_write_equals_scalar, .timeout = 60)
{
    rig r = open_rig();
    static const int64_t ns[] = {1, 7, 64, 300};
    static const int64_t row_floats[] = {24, 256};
    const int64_t slots_total = 4096;
    char what[160];
    int32_t *perm = xmalloc((size_t)slots_total * sizeof(int32_t));
    for (size_t ir = 0; ir < ARRAY_LEN(row_floats); ir++)
        for (size_t in = 0; in < ARRAY_LEN(ns); in++) {
            const int64_t n = ns[in], row = row_floats[ir], pool = slots_total * row;
            float *kp = kt_fvec(pool), *vp = kt_fvec(pool);
            float *k = kt_fvec(n * row), *v = kt_fvec(n * row);
            int32_t *slots = xmalloc((size_t)n * sizeof(int32_t));
            shuffle(perm, slots_total); /* distinct slots, every 5th row padding */
            for (int64_t i = 0; i < n; i++)
                slots[i] = i % 5 == 3 ? (int32_t)(-1 - i) : perm[i];
            float *kpd = kt_dev_put(r.cu, kp, (size_t)pool * sizeof(float));
            float *vpd = kt_dev_put(r.cu, vp, (size_t)pool * sizeof(float));
            float *kd = kt_dev_put(r.cu, k, (size_t)(n * row) * sizeof(float));
            float *vd = kt_dev_put(r.cu, v, (size_t)(n * row) * sizeof(float));
            int32_t *sd = kt_dev_put(r.cu, slots, (size_t)n * sizeof(int32_t));
            KT_OK(r.rops->kv_write(r.ref, kp, vp, row, slots, n, k, v));
            KT_OK(r.ops->kv_write(r.cu, kpd, vpd, row, sd, n, kd, vd));
            float *gk = fetch(r.cu, kpd, pool), *gv = fetch(r.cu, vpd, pool);
            snprintf(what, sizeof what, "kv_write k n=%ld row=%ld", (long)n, (long)row);
            expect_same_f32(what, gk, kp, pool);
            snprintf(what, sizeof what, "kv_write v n=%ld row=%ld", (long)n, (long)row);
            expect_same_f32(what, gv, vp, pool);
            free(gk);
            free(gv);
            kn_buf_free(r.cu, kpd);
            kn_buf_free(r.cu, vpd);
            kn_buf_free(r.cu, kd);
            kn_buf_free(r.cu, vd);
            kn_buf_free(r.cu, sd);
            free(kp);
            free(vp);
            free(k);
            free(v);
            free(slots);
        }
    free(perm);
    close_rig(&r);
}

/* kv_copy over several planes with chains (dst[i] == src[j] for j < i, as
 * Medusa compaction makes: row i's destination is an earlier row's source,
 * so every source must be read before any write), shared sources and a
 * row copied onto itself: the reference's pool, bit for bit. A device
 * running the copies in parallel without ordering reads overwritten rows. */
Test(kernels_cuda, kv_copy_chains_equal_scalar, .timeout = 60)
{
    rig r = open_rig();
    static const int64_t ns[] = {1, 6, 200, 1000};
    static const int64_t row_floats[] = {12, 256};
    const int64_t rows = 2048, planes = 6;
    char what[160];
    int32_t *perm = xmalloc((size_t)rows * sizeof(int32_t));
    for (size_t ir = 0; ir < ARRAY_LEN(row_floats); ir++)
        for (size_t in = 0; in < ARRAY_LEN(ns); in++) {
            const int64_t n = ns[in], row = row_floats[ir];
            const int64_t plane = rows * row + 5, total = planes * plane;
            int32_t *src = xmalloc((size_t)n * sizeof(int32_t));
            int32_t *dst = xmalloc((size_t)n * sizeof(int32_t));
            /* a chain over a random order P of the rows: dst[i] = P[i],
             * src[i] = P[i + 1], so dst[i] == src[i - 1]; every 9th copy
             * instead reads one of 5 rows past the chain (P[n + 1 ..],
             * never destinations, each shared by several copies), every
             * 31st copies a row onto itself. No destination repeats nor
             * equals a later source (a later source is P[j + 1] with
             * j > i, a row past the chain, or P[j]). */
            shuffle(perm, rows);
            for (int64_t i = 0; i < n; i++) {
                dst[i] = perm[i];
                src[i] = perm[i + 1];
                if (i % 9 == 8)
                    src[i] = perm[n + 1 + i % 5];
                else if (i % 31 == 30)
                    src[i] = dst[i];
            }
            float *pool = kt_fvec(total);
            float *pd = kt_dev_put(r.cu, pool, (size_t)total * sizeof(float));
            KT_OK(r.rops->kv_copy(r.ref, pool, planes, plane, row, src, dst, n));
            KT_OK(r.ops->kv_copy(r.cu, pd, planes, plane, row, src, dst, n));
            float *got = fetch(r.cu, pd, total);
            snprintf(what, sizeof what, "kv_copy n=%ld row=%ld planes=%ld", (long)n, (long)row,
                     (long)planes);
            expect_same_f32(what, got, pool, total);
            free(got);
            kn_buf_free(r.cu, pd);
            free(pool);
            free(src);
            free(dst);
        }
    free(perm);
    close_rig(&r);
}

/* ---- on a device: rows of logits ------------------------------------------------ */

/* Rows of coarse values (many ties), rows all equal, all -inf, and NaNs
 * after the first element. */
static float *logit_rows(int64_t M, int64_t n, float coarse)
{
    float *x = kt_fvec(M * n);
    for (int64_t i = 0; i < M * n; i++)
        x[i] = roundf(x[i] * coarse);
    if (M >= 4) {
        for (int64_t i = 0; i < n; i++) {
            x[1 * n + i] = 2.5f;       /* a row of ties */
            x[2 * n + i] = -INFINITY;  /* ties at -inf */
        }
        for (int64_t i = 1; i < n; i += 7)
            x[3 * n + i] = NAN; /* kn.h: never chosen over an earlier number */
    }
    return x;
}

/* argmax equals the reference: the index of the first maximum (ties: the
 * lowest index), exact since it selects */
Test(kernels_cuda, argmax_equals_scalar, .timeout = 60)
{
    rig r = open_rig();
    static const int64_t shapes[][2] = {{3, 1}, {5, 37}, {9, 32000}, {4, 1024}, {2, 128256},
                                        {64, 4099}};
    char what[160];
    for (size_t is = 0; is < ARRAY_LEN(shapes); is++) {
        const int64_t M = shapes[is][0], n = shapes[is][1];
        float *x = logit_rows(M, n, 50.0f);
        int32_t *want = xmalloc((size_t)M * sizeof(int32_t));
        int32_t *got = xmalloc((size_t)M * sizeof(int32_t));
        float *xd = kt_dev_put(r.cu, x, (size_t)(M * n) * sizeof(float));
        int32_t *idd = kt_dev(r.cu, (size_t)M * sizeof(int32_t));
        KT_OK(r.rops->argmax(r.ref, x, M, n, want));
        KT_OK(r.ops->argmax(r.cu, xd, M, n, idd));
        kt_dev_get(r.cu, got, idd, (size_t)M * sizeof(int32_t));
        snprintf(what, sizeof what, "argmax M=%ld n=%ld", (long)M, (long)n);
        expect_same_i32(what, got, want, M);
        if (M >= 4)
            cr_assert(got[1] == 0 && got[2] == 0, "%s: rows of ties give %d and %d", what,
                      got[1], got[2]);
        kn_buf_free(r.cu, xd);
        kn_buf_free(r.cu, idd);
        free(x);
        free(want);
        free(got);
    }
    close_rig(&r);
}

/* topk (k 1, 10, KN_TOPK_MAX; n down to k; with and without vals; rows of
 * ties: lower index first) equals the reference, values bit for bit */
Test(kernels_cuda, topk_equals_scalar, .timeout = 60)
{
    rig r = open_rig();
    static const int ks[] = {1, 10, KN_TOPK_MAX};
    static const int64_t ns[] = {KN_TOPK_MAX, 1000, 32000, 128256};
    char what[160];
    for (size_t in = 0; in < ARRAY_LEN(ns); in++) {
        const int64_t M = 5, n = ns[in];
        float *x = logit_rows(M, n, 300.0f);
        for (int64_t i = 0; i < n; i++) /* topk's NaN order is not defined */
            if (isnan(x[3 * n + i]))
                x[3 * n + i] = 7.0f;
        float *xd = kt_dev_put(r.cu, x, (size_t)(M * n) * sizeof(float));
        for (size_t ik = 0; ik < ARRAY_LEN(ks); ik++) {
            const int k = ks[ik];
            const size_t fb = (size_t)(M * k) * sizeof(float);
            const size_t ib = (size_t)(M * k) * sizeof(int32_t);
            float *wv = xmalloc(fb), *gv = xmalloc(fb);
            int32_t *wi = xmalloc(ib), *gi = xmalloc(ib);
            float *vd = kt_dev(r.cu, fb);
            int32_t *idd = kt_dev(r.cu, ib);
            KT_OK(r.rops->topk(r.ref, x, M, n, k, wv, wi));
            KT_OK(r.ops->topk(r.cu, xd, M, n, k, vd, idd));
            kt_dev_get(r.cu, gv, vd, fb);
            kt_dev_get(r.cu, gi, idd, ib);
            snprintf(what, sizeof what, "topk n=%ld k=%d ids", (long)n, k);
            expect_same_i32(what, gi, wi, M * k);
            snprintf(what, sizeof what, "topk n=%ld k=%d values", (long)n, k);
            expect_same_f32(what, gv, wv, M * k);
            for (int j = 0; j < k; j++)
                cr_assert(gi[k + j] == j && gi[2 * k + j] == j,
                          "topk n=%ld k=%d: rows of ties must list indices in order", (long)n,
                          k);
            kt_dev_fill(r.cu, idd, 0xff, ib);
            KT_OK(r.ops->topk(r.cu, xd, M, n, k, NULL, idd));
            kt_dev_get(r.cu, gi, idd, ib);
            snprintf(what, sizeof what, "topk n=%ld k=%d ids (vals NULL)", (long)n, k);
            expect_same_i32(what, gi, wi, M * k);
            kn_buf_free(r.cu, vd);
            kn_buf_free(r.cu, idd);
            free(wv);
            free(gv);
            free(wi);
            free(gi);
        }
        kn_buf_free(r.cu, xd);
        free(x);
    }
    close_rig(&r);
}

/* softmax_stats (temperatures 0.3, 1, 2; up to 128256 logits): max,
 * log-sum-exp and entropy are log-domain quantities, so their scale is 1:
 * an absolute error e in them is a relative error e in the probabilities
 * (p_i = exp(x_i/T - out[1])). Allowed 1e-5 absolute plus 4 ulp of the
 * value (its float rounding: values reach ~40 at T = 0.3). kn.h has the
 * device work in double like the reference (then they differ by the last
 * rounding); even float sums in another order are ~1e-6 off. */
Test(kernels_cuda, softmax_stats_within_1e_5_of_scalar, .timeout = 60)
{
    rig r = open_rig();
    static const float temps[] = {0.3f, 1.0f, 2.0f};
    static const int64_t shapes[][2] = {{1, 5}, {1, 32000}, {4, 3000}, {3, 128256}};
    char what[160];
    for (size_t is = 0; is < ARRAY_LEN(shapes); is++) {
        const int64_t M = shapes[is][0], n = shapes[is][1];
        float *x = kt_fvec(M * n), *want = kt_fvec(M * 3);
        for (int64_t i = 0; i < M * n; i++)
            x[i] *= 12.0f;
        float *xd = kt_dev_put(r.cu, x, (size_t)(M * n) * sizeof(float));
        for (size_t it = 0; it < ARRAY_LEN(temps); it++) {
            float *outd = kt_dev(r.cu, (size_t)(M * 3) * sizeof(float));
            KT_OK(r.rops->softmax_stats(r.ref, x, M, n, temps[it], want));
            KT_OK(r.ops->softmax_stats(r.cu, xd, M, n, temps[it], outd));
            float *got = fetch(r.cu, outd, M * 3);
            snprintf(what, sizeof what, "softmax_stats M=%ld n=%ld T=%g", (long)M, (long)n,
                     temps[it]);
            expect_near(what, got, want, M * 3, NULL, 4 * ULP, 1e-5);
            free(got);
            kn_buf_free(r.cu, outd);
        }
        kn_buf_free(r.cu, xd);
        free(x);
        free(want);
    }
    close_rig(&r);
}

/* gather equals the reference bit for bit */
Test(kernels_cuda, gather_equals_scalar, .timeout = 60)
{
    rig r = open_rig();
    const int64_t nx = 3 * 128256, n = 1000;
    int64_t *idx = xmalloc((size_t)n * sizeof(int64_t));
    for (int64_t i = 0; i < n; i++) /* the ends of x among random elements */
        idx[i] = i == 0 ? 0 : i == 1 ? nx - 1 : (int64_t)(kt_rnd() % (uint64_t)nx);
    float *x = kt_fvec(nx), *want = kt_fvec(n);
    float *xd = kt_dev_put(r.cu, x, (size_t)nx * sizeof(float));
    int64_t *idd = kt_dev_put(r.cu, idx, (size_t)n * sizeof(int64_t));
    float *outd = kt_dev(r.cu, (size_t)n * sizeof(float));
    KT_OK(r.rops->gather(r.ref, x, idx, n, want));
    KT_OK(r.ops->gather(r.cu, xd, idd, n, outd));
    float *got = fetch(r.cu, outd, n);
    expect_same_f32("gather", got, want, n);
    kn_buf_free(r.cu, xd);
    kn_buf_free(r.cu, idd);
    kn_buf_free(r.cu, outd);
    free(x);
    free(idx);
    free(want);
    free(got);
    close_rig(&r);
}
