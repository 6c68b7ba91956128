/* Helpers of the kernels suites (tests/kernels/util/, linked into each of
 * them): random data, contexts, weights, the list of op tables under test
 * and backend buffers.
 *
 * Backends. Every test that runs an op table takes its table from
 * kt_backend_params() (a Criterion parameterized test, one run per entry);
 * kt_open() gives the entry's ctx, or reports the run as skipped, with the
 * reason, when this machine cannot run it. A new backend (CUDA) is a new
 * entry there. Tests written against kt_dev_* buffers run on any backend;
 * those that hand host arrays to ops use kt_open_host(), which skips a
 * backend whose memory is not host memory. */
#ifndef GORGON_TESTS_KT_H
#define GORGON_TESTS_KT_H

#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/kn.h"

/* Assert that an op or buffer call returned 0 (kn.h: 0 or -errno). */
#define KT_OK(call) cr_assert_eq((call), 0, "%s", #call)

/* The Criterion boilerplate of a test run once per backend:
 *   KT_BACKEND_TEST(kernels_x, does_y) { kn_ctx *ctx = kt_open(b, 2); ... } */
#define KT_BACKEND_TEST(suite, name, ...)                                                  \
    ParameterizedTestParameters(suite, name)                                                \
    {                                                                                       \
        return kt_backend_params();                                                         \
    }                                                                                       \
    ParameterizedTest(const kt_backend *b, suite, name, ##__VA_ARGS__)

/* ---- random data (xorshift; each test process starts from the same seed) */
uint64_t kt_rnd(void);
float kt_frand(void);          /* uniform in [-1, 1) */
float *kt_fvec(int64_t n);     /* malloc'd, kt_frand() each (free()) */
void kt_poison(float *v, int64_t n); /* NaN: never compares equal */
/* |got - want| <= tol * mag, and neither is NaN */
int kt_close(float got, float want, double mag, double tol);

/* ---- contexts and weights ------------------------------------------------ */
kn_ctx *kt_ctx(int threads, enum kn_variant v); /* asserts success */
/* rows x cols of dtype t from random floats, quantised row by row, in host
 * memory: *w describes it; returns the data (free()) */
void *kt_weight(enum kn_dtype t, int64_t rows, int64_t cols, kn_tensor *w);
/* the weights as floats [rows][cols] (free()) */
float *kt_dequant(const kn_tensor *w);

/* ---- backends under test ---------------------------------------------------- */
typedef struct kt_backend {
    enum kn_variant variant; /* a CPU variant: the only kind of backend today */
} kt_backend;

/* Every op table there is (scalar included), for ParameterizedTestParameters. */
struct criterion_test_params kt_backend_params(void);
const char *kt_backend_name(const kt_backend *b);
/* b's ctx with `threads` pool threads; cr_skip_test() ("avx512: not
 * supported by this CPU") when this machine cannot run b. */
kn_ctx *kt_open(const kt_backend *b, int threads);
/* kt_open, and skip b unless host arrays may be passed to its ops. */
kn_ctx *kt_open_host(const kt_backend *b, int threads);

/* ---- backend buffers (kn_buf_*; every call asserted) ------------------------ */
void *kt_dev(kn_ctx *ctx, size_t bytes);                        /* 0xFF bytes */
void *kt_dev_put(kn_ctx *ctx, const void *host, size_t bytes);  /* a copy of host */
void kt_dev_get(kn_ctx *ctx, void *host, const void *dev, size_t bytes);
void kt_dev_fill(kn_ctx *ctx, void *dev, int byte, size_t bytes);

/* ---- matmul error bound (see the top of test_ops.c) ------------------------- */
typedef struct kt_mm_bound {
    double exact, mag;          /* the double-precision product and sum |w x| */
    double emu, emu_mag, emu_tie; /* Q8_0: the int8-activation path's emulation */
} kt_mm_bound;
kt_mm_bound kt_mm_bound_of(enum kn_dtype t, const float *w_row, const float *x_row, int64_t K);
/* got within 2e-5 * mag of the scalar result ref, or, for Q8_0, of the
 * int8-activation emulation */
bool kt_mm_ok(const kt_mm_bound *b, enum kn_dtype t, float ref, float got);

#endif
