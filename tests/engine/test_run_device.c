/* gorgon-run --device: a device this build or machine cannot use is refused
 * with the reason and a non-zero status (never a crash, nothing generated),
 * a bad device string and device TP are refused naming the option, and on
 * a machine with a CUDA device the golden greedy text comes back from it. */
#include <criterion/criterion.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "kernels/kn.h"
#include "tests/util/test_models.h"
#include "tests/util/test_tree.h"

#define S260 "stories260K/stories260K.gguf"

/* gorgon-run --model stories260K ARGS: its exit status (-1: it did not
 * exit, e.g. a crash), stdout and stderr together in out. */
static int run_gorgon_run(const char *args, char *out, size_t cap)
{
    char path[PATH_MAX], cmd[3 * PATH_MAX + 1024];
    snprintf(path, sizeof(path), "%s", tu_bin("gorgon-run"));
    cr_assert_lt((size_t)snprintf(cmd, sizeof(cmd), "'%s' --model '%s' %s 2>&1", path,
                                  tu_model_path(S260), args),
                 sizeof(cmd));
    FILE *f = popen(cmd, "r");
    cr_assert_not_null(f);
    size_t len = fread(out, 1, cap - 1, f);
    out[len] = '\0';
    int st = pclose(f);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* The CUDA devices here (> 0), else <= 0 with the reason in why. */
static int cuda_devices(char *why, size_t cap)
{
    why[0] = '\0';
    return kn_cuda_device_count(why, cap);
}

Test(engine_run_device, unusable_cuda_fails_with_the_reason, .timeout = 60)
{
    char why[256];
    int n = cuda_devices(why, sizeof why);
    if (n > 0)
        cr_skip_test("this machine has %d CUDA device(s): nothing to refuse", n);
    static char out[16384];
    int st = run_gorgon_run("--temp 0 -n 4 --device cuda", out, sizeof out);
    cr_assert(st > 0, "status %d (want an exit, non-zero): %s", st, out);
    /* the device named, and kn_cuda_device_count's own reason ("this build
     * has no CUDA backend ..." or the driver's) */
    cr_assert(strstr(out, "--device cuda: cannot use it: "), "%s", out);
    cr_assert(strstr(out, why), "reason '%s' missing: %s", why, out);
    cr_assert_null(strstr(out, "Once upon"), "text generated: %s", out);
    /* an index the same */
    st = run_gorgon_run("--temp 0 -n 4 --device cuda:3", out, sizeof out);
    cr_assert(st > 0 && strstr(out, "cuda:3"), "status %d: %s", st, out);
}

Test(engine_run_device, bad_device_string_refused_naming_the_option, .timeout = 60)
{
    static char out[16384];
    const char *bad[] = {"bogus", "gpu", "cuda:", "cuda:x", "cuda:-1", "cuda0", "CPU", ""};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char args[128];
        snprintf(args, sizeof args, "-n 4 --device '%s'", bad[i]);
        int st = run_gorgon_run(args, out, sizeof out);
        if (!bad[i][0]) { /* "" is the CPU for kn_device_parse, as for gorgon-run */
            cr_assert_eq(st, 0, "--device '': status %d: %s", st, out);
            continue;
        }
        cr_assert_eq(st, 2, "--device '%s': status %d: %s", bad[i], st, out);
        cr_assert(strstr(out, "--device") && strstr(out, bad[i]), "%s", out);
    }
}

Test(engine_run_device, tensor_parallel_on_a_device_refused, .timeout = 60)
{
    static char out[16384];
    int st = run_gorgon_run("-n 4 --device cuda --tp 2", out, sizeof out);
    cr_assert_eq(st, 2, "status %d: %s", st, out);
    cr_assert(strstr(out, "--tp 2") && strstr(out, "NCCL"), "%s", out);
}

Test(engine_run_device, cpu_device_generates_as_before, .timeout = 60)
{
    static char out[16384];
    int st = run_gorgon_run("--temp 0 -p 'Lily and Tom' -n 60 --threads 1 --device cpu", out,
                            sizeof out);
    cr_assert_eq(st, 0, "%s", out);
    cr_assert(strstr(out, "thread(s)"), "timing line names the CPU threads: %s", out);
}

/* GPU: the golden greedy text of the reference, from the device. */
Test(engine_run_device, cuda_serves_the_golden_greedy_text, .timeout = 120)
{
    char why[256];
    int n = cuda_devices(why, sizeof why);
    if (n <= 0)
        cr_skip_test("no CUDA device: %s", why);
    static char out[65536];
    int st = run_gorgon_run("--temp 0 -p 'Lily and Tom' -n 60 --device cuda", out, sizeof out);
    cr_assert_eq(st, 0, "%s", out);
    FILE *g = fopen(tu_model_path("stories260K/golden_greedy_prompt_LilyAndTom_n64.txt"), "r");
    cr_assert_not_null(g);
    char want[1024];
    size_t wn = fread(want, 1, sizeof(want) - 1, g);
    want[wn] = '\0';
    fclose(g);
    cr_assert(strncmp(out, want, wn) == 0, "got:\n%s\nwant:\n%s", out, want);
    cr_assert(strstr(out, "device cuda:0"), "timing line names the device: %s", out);
}
