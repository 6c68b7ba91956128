/* `gorgon-bench engine|medusa --device/--synthetic`, run as a program: a
 * synthetic model (no file) on the CPU prints valid JSON with the device
 * keys and exact byte counts, one decode row per --batch; bad --synthetic,
 * --dtype and --device values are refused naming the option; a CUDA device
 * that is not there is refused with the reason; on a machine with a device
 * the same runs happen there (skipped, with the reason, without one). The
 * GPU check's script (deploy/gpu-check.sh) must at least parse.
 *
 * JSON is checked with python3 (json.loads); keys are then read from the
 * compact text the suites print ("key":value). */
#include <criterion/criterion.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tests/clients/util/gd_proc.h"
#include "tests/clients/util/run_proc.h"

static char bench_bin[PATH_MAX];
static char dir[64];
static char out[1 << 16], err[1 << 16];

static void setup(void)
{
    snprintf(bench_bin, sizeof(bench_bin), "%s", tu_bin("gorgon-bench"));
    rp_tmpdir(dir, sizeof(dir), "/tmp/gorgon-bench-device-XXXXXX");
}

static void cleanup(void)
{
    rp_rmdir(dir);
}

/* Run `gorgon-bench ARGS...` (NULL-terminated): its exit status; stdout in
 * out (and dir/.stdout), stderr in err. */
static int bench(const char *first, ...)
{
    const char *argv[48] = {bench_bin};
    int argc = 1;
    va_list ap;
    va_start(ap, first);
    for (const char *a = first; a && argc < 47; a = va_arg(ap, const char *))
        argv[argc++] = a;
    va_end(ap);
    argv[argc] = NULL;
    return rp_run(argv, dir, out, sizeof(out), err, sizeof(err));
}

/* The last run's stdout is one valid JSON object per line. */
static void assert_valid_json(void)
{
    char cmd[256];
    snprintf(cmd, sizeof(cmd),
             "python3 -c 'import json,sys; [json.loads(l) for l in open(sys.argv[1]) if "
             "l.strip()]' %s/.stdout",
             dir);
    cr_assert_eq(system(cmd), 0, "not valid JSON: %s", out);
}

/* Where "key": starts its value in json (after `from`), or NULL. */
static const char *jval(const char *json, const char *key)
{
    char k[64];
    snprintf(k, sizeof(k), "\"%s\":", key);
    const char *p = strstr(json, k);
    return p ? p + strlen(k) : NULL;
}

/* The number after "key": (the test fails when it is missing or null). */
static double jnum(const char *json, const char *key)
{
    const char *p = jval(json, key);
    cr_assert_not_null(p, "no %s in %s", key, json);
    char *end;
    double v = strtod(p, &end);
    cr_assert_neq(end, p, "%s is not a number in %s", key, json);
    return v;
}

static bool jnull(const char *json, const char *key)
{
    const char *p = jval(json, key);
    cr_assert_not_null(p, "no %s in %s", key, json);
    return !strncmp(p, "null", 4);
}

static bool jstr(const char *json, const char *key, const char *want)
{
    const char *p = jval(json, key);
    cr_assert_not_null(p, "no %s in %s", key, json);
    return *p == '"' && !strncmp(p + 1, want, strlen(want)) && p[1 + strlen(want)] == '"';
}

static int count_of(const char *hay, const char *needle)
{
    int n = 0;
    for (const char *p = hay; (p = strstr(p, needle)); p += strlen(needle))
        n++;
    return n;
}

/* CUDA devices gorgon-bench sees; why gets the reason when none. */
static int cuda_devices(char *why, size_t cap)
{
    cr_assert_eq(bench("engine", "--list-devices", "--json", NULL), 0, "%s", err);
    assert_valid_json();
    int n = (int)jnum(out, "cuda_devices");
    const char *p = jval(out, "cuda_why");
    cr_assert(p && *p == '"', "no cuda_why in %s", out);
    const char *e = strchr(p + 1, '"');
    cr_assert_not_null(e);
    snprintf(why, cap, "%.*s", (int)(e - p - 1), p + 1);
    cr_assert(n > 0 || why[0], "no device and no reason: %s", out);
    return n;
}

/* Bytes one decode token of the tiny shape reads (dim 64, 2 layers of
 * 4 x 64x64 + 2 x 128x64 + 64x128 matrices, a 256 x 64 output matrix),
 * one embedding row and the 5 norm vectors of 64 floats (1280 bytes):
 *   f32:  2 x 40960 x 4 + 65536 + 256 + 1280  = 394752
 *   q8_0: rows of 64 in 68 bytes, of 128 in 136 bytes:
 *         2 x (4 x 64 x 68 + 2 x 128 x 68 + 64 x 136) + 256 x 68 + 68 + 1280 = 105796 */
static void check_tiny_cpu(const char *dtype, double bytes_per_token)
{
    int st = bench("engine", "--synthetic", "tiny", "--dtype", dtype, "--prompt-len", "32",
                   "--decode-tokens", "8", "--reps", "1", "--bw-mib", "16", "--json", NULL);
    cr_assert_eq(st, 0, "exit %d: %s", st, err);
    assert_valid_json();
    cr_assert_eq(count_of(out, "\n"), 1, "one JSON line: %s", out);
    cr_assert(jstr(out, "device", "cpu"), "%s", out);
    cr_assert(jstr(out, "dtype", dtype), "%s", out);
    cr_assert(jstr(out, "synthetic", "tiny"), "%s", out);
    cr_assert(jnull(out, "model"), "%s", out);
    cr_assert_eq(jnum(out, "bytes_per_token"), bytes_per_token, "%s", out);
    cr_assert_gt(jnum(out, "weight_bytes"), bytes_per_token, "the embedding is extra: %s", out);
    cr_assert_gt(jnum(out, "decode_tok_s"), 0, "%s", out);
    cr_assert_gt(jnum(out, "prefill_tok_s"), 0, "%s", out);
    cr_assert_gt(jnum(out, "read_bw"), 0, "%s", out);
    cr_assert_gt(jnum(out, "roofline_fraction"), 0, "%s", out);
    /* the CPU has no HBM figure and no GEMM peak: null, never a number */
    cr_assert(jnull(out, "hbm_read_bw"), "%s", out);
    cr_assert(jnull(out, "gemm_peak"), "%s", out);
    cr_assert(jnull(out, "prefill_fraction"), "%s", out);
    cr_assert_eq(count_of(out, "{\"batch\":"), 1, "one decode row by default: %s", out);
    cr_assert_gt(jnum(jval(out, "decode"), "tok_s"), 0, "%s", out);
}

Test(clients_bench_device, synthetic_tiny_f32_on_the_cpu_prints_the_device_keys, .init = setup,
     .fini = cleanup, .timeout = 60)
{
    check_tiny_cpu("f32", 394752);
}

Test(clients_bench_device, synthetic_tiny_q8_0_on_the_cpu_counts_quantised_bytes, .init = setup,
     .fini = cleanup, .timeout = 60)
{
    check_tiny_cpu("q8_0", 105796);
}

Test(clients_bench_device, a_batch_list_gives_one_decode_row_per_batch, .init = setup,
     .fini = cleanup, .timeout = 60)
{
    int st = bench("engine", "--synthetic", "tiny", "--batch", "1,4", "--context", "8",
                   "--prompt-len", "16", "--decode-tokens", "4", "--reps", "1", "--bw-mib", "16",
                   "--json", NULL);
    cr_assert_eq(st, 0, "exit %d: %s", st, err);
    assert_valid_json();
    cr_assert_eq(count_of(out, "{\"batch\":"), 2, "%s", out);
    const char *b1 = strstr(out, "{\"batch\":1,"), *b4 = strstr(out, "{\"batch\":4,");
    cr_assert(b1 && b4 && b1 < b4, "rows for batch 1 then 4: %s", out);
    cr_assert_gt(jnum(b1, "tok_s"), 0, "%s", out);
    cr_assert_gt(jnum(b4, "tok_s"), 0, "%s", out);
    cr_assert_eq(jnum(out, "context"), 8, "%s", out);
    /* the text table: a row per batch, under its header */
    st = bench("engine", "--synthetic", "tiny", "--batch", "1,4", "--prompt-len", "16",
               "--decode-tokens", "4", "--reps", "1", "--bw-mib", "16", NULL);
    cr_assert_eq(st, 0, "exit %d: %s", st, err);
    const char *h = strstr(out, "decode   batch");
    cr_assert_not_null(h, "%s", out);
    int rows = 0;
    for (const char *l = strchr(h, '\n'); l && l[1]; l = strchr(l + 1, '\n')) {
        long b = strtol(l + 1, NULL, 10);
        cr_assert(b == 1 || b == 4, "unexpected row: %s", l + 1);
        rows++;
    }
    cr_assert_eq(rows, 2, "%s", out);
}

Test(clients_bench_device, bad_synthetic_dtype_and_device_values_are_refused_naming_the_option,
     .init = setup, .fini = cleanup, .timeout = 30)
{
    static const struct {
        const char *opt, *val, *extra, *shown; /* shown: what the message quotes */
    } bad[] = {
        {"--synthetic", "nosuch", NULL, "nosuch"},
        {"--dtype", "f8", "--synthetic", "f8"},
        {"--device", "gpu0", "--synthetic", "gpu0"},
        {"--batch", "1,0", "--synthetic", "\"0\""},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        int st = bad[i].extra ? bench("engine", bad[i].extra, "tiny", bad[i].opt, bad[i].val, NULL)
                              : bench("engine", bad[i].opt, bad[i].val, NULL);
        cr_assert_eq(st, 2, "%s %s: exit %d", bad[i].opt, bad[i].val, st);
        cr_assert(strstr(err, bad[i].opt) && strstr(err, bad[i].shown), "%s %s: %s", bad[i].opt,
                  bad[i].val, err);
        cr_assert_str_empty(out, "nothing measured: %s", out);
    }
    /* --dtype is for synthetic weights; a file has its own */
    cr_assert_eq(bench("engine", "--model", "x.gguf", "--dtype", "f16", NULL), 2);
    cr_assert(strstr(err, "--dtype"), "%s", err);
    cr_assert_eq(bench("engine", "--model", "x.gguf", "--synthetic", "tiny", NULL), 2);
    cr_assert_eq(bench("medusa", "--synthetic", "tiny", "--dtype", "f8", NULL), 2);
    cr_assert(strstr(err, "--dtype") && strstr(err, "f8"), "%s", err);
}

Test(clients_bench_device, a_cuda_device_that_is_not_there_is_refused_with_the_reason,
     .init = setup, .fini = cleanup, .timeout = 30)
{
    char why[256];
    const int n = cuda_devices(why, sizeof(why));
    if (n <= 0) {
        /* no device at all: the reason (no CUDA backend, no driver, no GPU) */
        int st = bench("engine", "--device", "cuda", "--synthetic", "tiny", "--json", NULL);
        cr_assert_neq(st, 0, "%s", out);
        cr_assert(strstr(err, why), "stderr does not give the reason \"%s\": %s", why, err);
        cr_assert_str_empty(out);
        st = bench("medusa", "--device", "cuda", "--synthetic", "tiny", NULL);
        cr_assert_neq(st, 0, "%s", out);
        cr_assert(strstr(err, why), "medusa: stderr does not give the reason \"%s\": %s", why,
                  err);
    } else {
        /* a GPU machine: an index past its devices */
        char dev[32];
        snprintf(dev, sizeof(dev), "cuda:%d", n);
        int st = bench("engine", "--device", dev, "--synthetic", "tiny", "--json", NULL);
        cr_assert_neq(st, 0, "%s", out);
        cr_assert(strstr(err, dev) && strstr(err, "no such device"), "%s", err);
    }
}

Test(clients_bench_device, synthetic_tiny_runs_on_a_cuda_device, .init = setup, .fini = cleanup,
     .timeout = 120)
{
    char why[256];
    if (cuda_devices(why, sizeof(why)) <= 0)
        cr_skip_test("needs a CUDA device: %s", why);
    static const char *const dtypes[] = {"f16", "q8_0"};
    for (size_t i = 0; i < 2; i++) {
        int st = bench("engine", "--device", "cuda", "--synthetic", "tiny", "--dtype", dtypes[i],
                       "--batch", "1,4", "--prompt-len", "64", "--decode-tokens", "8", "--reps",
                       "1", "--bw-mib", "256", "--json", NULL);
        cr_assert_eq(st, 0, "%s: exit %d: %s", dtypes[i], st, err);
        assert_valid_json();
        const char *d = jval(out, "device");
        cr_assert(d && !strncmp(d, "\"cuda:0", 7), "%s", out);
        cr_assert(jstr(out, "dtype", dtypes[i]), "%s", out);
        cr_assert_gt(jnum(out, "hbm_read_bw"), 0, "%s", out);
        cr_assert_gt(jnum(out, "roofline_fraction"), 0, "%s", out);
        cr_assert_gt(jnum(out, "decode_tok_s"), 0, "%s", out);
        cr_assert_eq(count_of(out, "{\"batch\":"), 2, "%s", out);
        /* cuBLASLt's peak for every layer shape (quantised: its F16 GEMM) */
        cr_assert_eq(count_of(out, "\"flop_s\":"), 7, "%s", out);
        cr_assert_gt(jnum(out, "min"), 0, "%s", out);
        cr_assert_gt(jnum(out, "prefill_fraction"), 0, "%s", out);
    }
    int st = bench("medusa", "--device", "cuda", "--synthetic", "tiny", "--tree",
                   "[[0],[0,0],[1]]", "--batch", "1,4", "--context", "8", "--steps", "4",
                   "--reps", "1", "--json", NULL);
    cr_assert_eq(st, 0, "medusa: exit %d: %s", st, err);
    assert_valid_json();
    cr_assert_eq(count_of(out, "\"step_cost_ratio\":"), 2, "%s", out);
    cr_assert_gt(jnum(out, "step_cost_ratio"), 0, "%s", out);
}

Test(clients_bench_device, medusa_synthetic_reports_a_ratio_per_batch_on_the_cpu, .init = setup,
     .fini = cleanup, .timeout = 60)
{
    int st = bench("medusa", "--synthetic", "tiny", "--dtype", "f32", "--tree",
                   "[[0],[0,0],[0,0,0],[0,0,0,0],[1],[0,1],[1,0]]", "--batch", "1,2,3",
                   "--context", "8", "--steps", "4", "--reps", "1", "--json", NULL);
    cr_assert_eq(st, 0, "exit %d: %s", st, err);
    assert_valid_json();
    cr_assert(jstr(out, "device", "cpu"), "%s", out);
    cr_assert_eq(jnum(out, "tree_nodes"), 8, "%s", out);
    cr_assert_eq(count_of(out, "\"step_cost_ratio\":"), 3, "%s", out);
    for (int b = 1; b <= 3; b++) {
        char key[32];
        snprintf(key, sizeof(key), "{\"batch\":%d,", b);
        const char *row = strstr(out, key);
        cr_assert_not_null(row, "no row for batch %d: %s", b, out);
        const double plain = jnum(row, "plain_step_ms"), tree = jnum(row, "tree_step_ms");
        cr_assert_gt(plain, 0, "%s", out);
        cr_assert_gt(tree, 0, "%s", out);
        /* the ratio is the two times' (each printed to 0.1 us) */
        const double r = tree / plain;
        cr_assert_float_eq(jnum(row, "step_cost_ratio"), r, r * (1e-4 / plain + 1e-4 / tree) + 1e-4,
                           "%s", out);
    }
    /* the file-model options do not mix with --synthetic, nor these with files */
    cr_assert_eq(bench("medusa", "--synthetic", "tiny", "--medusa", "random", NULL), 2);
    cr_assert_eq(bench("medusa", "--model", "x.gguf", "--medusa", "random", "--batch", "2", NULL),
                 2);
}

Test(clients_bench_device, the_gpu_check_script_parses, .timeout = 30)
{
    cr_assert_eq(system("bash -n deploy/gpu-check.sh"), 0,
                 "deploy/gpu-check.sh has a syntax error (bash -n)");
    /* where shellcheck is installed, its warnings too */
    if (system("command -v shellcheck >/dev/null 2>&1") == 0)
        cr_assert_eq(system("shellcheck -S warning deploy/gpu-check.sh"), 0,
                     "shellcheck warns about deploy/gpu-check.sh");
}
