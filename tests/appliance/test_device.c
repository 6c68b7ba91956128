/* gorgond's `device` and `kv_fraction` settings: bad values and the
 * combinations one GPU per gorgond cannot serve are refused at load naming
 * the key; a device the worker cannot use stops gorgond at start with the
 * worker's reason (never a hang, never a gorgond that listens and fails
 * every request); on a machine with a CUDA device gorgond serves the
 * stories260K golden from it. */
#include <criterion/criterion.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "clients/gorgon.h"
#include "kernels/kn.h"
#include "tests/appliance/util/ap_test.h"
#include "tests/appliance/util/wait.h"
#include "tests/clients/util/gd_proc.h"
#include "tests/util/test_models.h"
#include "tests/util/test_tree.h"

#define S260 "stories260K/stories260K.gguf"

static gd_proc gd;

static void teardown(void)
{
    gd_stop(&gd);
}

/* gorgond --foreground --socket (a path in a fresh directory) ARGS...
 * (NULL-terminated), run to its exit: its wait status, stderr in out. */
static int gorgond_run(char *out, size_t cap, ...)
{
    char bin[PATH_MAX], dir[] = "/tmp/gorgon-test-dev-XXXXXX", sock[64];
    cr_assert_eq(gd_find_binary(bin, sizeof bin), 0, "gorgond not built: run `make`");
    cr_assert_not_null(mkdtemp(dir));
    snprintf(sock, sizeof sock, "%s/gorgond.sock", dir);
    const char *argv[32] = {bin, "--foreground", "--socket", sock};
    int argc = 4;
    va_list ap;
    va_start(ap, cap);
    const char *a;
    while ((a = va_arg(ap, const char *)) && argc < 31)
        argv[argc++] = a;
    va_end(ap);
    argv[argc] = NULL;
    int st = gd_run_stderr(argv, false, out, cap);
    unlink(sock);
    rmdir(dir);
    return st;
}

/* An INI file holding body (the caller unlinks path). */
static void write_ini(char *path, const char *body)
{
    int fd = mkstemp(path);
    cr_assert_geq(fd, 0);
    cr_assert_eq(write(fd, body, strlen(body)), (ssize_t)strlen(body));
    close(fd);
}

#define EXITED_2(st) (WIFEXITED(st) && WEXITSTATUS(st) == 2)

Test(appliance_device, config_device_gpu_refused_naming_the_key, .timeout = 20)
{
    char path[] = "/tmp/gorgon-test-dev-ini-XXXXXX", out[2048];
    write_ini(path, "[gorgond]\ndevice = gpu\n");
    int st = gorgond_run(out, sizeof out, "--config", path, NULL);
    unlink(path);
    cr_assert(EXITED_2(st), "status %d: %s", st, out);
    cr_assert(strstr(out, "device: 'gpu' is not cpu, cuda or cuda:N"), "%s", out);
    cr_assert(strstr(out, "[gorgond] device"), "the file's key is not named: %s", out);
}

Test(appliance_device, config_cuda_with_tp_2_refused, .timeout = 20)
{
    char path[] = "/tmp/gorgon-test-dev-ini-XXXXXX", out[2048];
    write_ini(path, "[gorgond]\ndevice = cuda\ntp = 2\n");
    int st = gorgond_run(out, sizeof out, "--config", path, NULL);
    unlink(path);
    cr_assert(EXITED_2(st), "status %d: %s", st, out);
    cr_assert(strstr(out, "device = cuda with tp = 2") && strstr(out, "NCCL"), "%s", out);
}

Test(appliance_device, cuda_with_replicas_or_disaggregated_refused, .timeout = 20)
{
    char out[2048];
    int st = gorgond_run(out, sizeof out, "--device", "cuda", "--replicas", "2", NULL);
    cr_assert(EXITED_2(st), "status %d: %s", st, out);
    cr_assert(strstr(out, "device = cuda with replicas = 2"), "%s", out);
    st = gorgond_run(out, sizeof out, "--device", "cuda:1", "--mode", "disaggregated", NULL);
    cr_assert(EXITED_2(st), "status %d: %s", st, out);
    cr_assert(strstr(out, "device = cuda:1 with mode = disaggregated") &&
                  strstr(out, "host shared memory"),
              "%s", out);
    /* the CPU keeps them */
    st = gorgond_run(out, sizeof out, "--device", "cpu", "--replicas", "2", "--sq-entries", "3",
                     NULL);
    cr_assert(EXITED_2(st) && strstr(out, "sq_entries") && !strstr(out, "replicas"), "%s", out);
}

Test(appliance_device, kv_fraction_outside_0_1_refused, .timeout = 20)
{
    char out[2048];
    const char *bad[] = {"0", "1.5", "-0.1", "x", "0.5x", "nan"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int st = gorgond_run(out, sizeof out, "--kv-fraction", bad[i], NULL);
        cr_assert(EXITED_2(st), "%s: status %d: %s", bad[i], st, out);
        cr_assert(strstr(out, "kv_fraction") && strstr(out, "--kv-fraction"), "%s", out);
    }
    /* 1 is allowed: the failure below is the ring size, not the fraction */
    int st = gorgond_run(out, sizeof out, "--kv-fraction", "1", "--sq-entries", "3", NULL);
    cr_assert(EXITED_2(st) && strstr(out, "sq_entries") && !strstr(out, "kv_fraction"), "%s",
              out);
}

/* gorgon-worker refuses, before it maps or loads anything, what one
 * process on one device cannot do (gorgond never asks for it: these are
 * the worker's own checks). */
Test(appliance_device, worker_refuses_device_tp_and_disaggregated_roles, .timeout = 20)
{
    static char bin[PATH_MAX];
    snprintf(bin, sizeof bin, "%s", tu_bin("gorgon-worker"));
    char out[2048];
    const char *tp[] = {bin, "--model", "m.gguf", "--region-fd", "3", "--device", "cuda",
                        "--tp", "2", "--rank", "0", "--comm-fd", "5", NULL};
    int st = gd_run_stderr(tp, false, out, sizeof out);
    cr_assert(EXITED_2(st), "status %d: %s", st, out);
    cr_assert(strstr(out, "tensor parallelism (tp 2) on device cuda") && strstr(out, "NCCL"),
              "%s", out);
    const char *role[] = {bin, "--model", "m.gguf", "--region-fd", "3", "--device", "cuda:0",
                          "--role", "decode", "--kv-ctl-fd", "6", "--kv-pool-fd", "7", NULL};
    st = gd_run_stderr(role, false, out, sizeof out);
    cr_assert(EXITED_2(st), "status %d: %s", st, out);
    cr_assert(strstr(out, "disaggregated") && strstr(out, "host shared memory"), "%s", out);
    const char *frac[] = {bin, "--model", "m.gguf", "--region-fd", "3", "--kv-fraction", "2",
                          NULL};
    st = gd_run_stderr(frac, false, out, sizeof out);
    cr_assert(EXITED_2(st) && strstr(out, "--kv-fraction"), "status %d: %s", st, out);
    const char *dev[] = {bin, "--model", "m.gguf", "--region-fd", "3", "--device", "gpu", NULL};
    st = gd_run_stderr(dev, false, out, sizeof out);
    cr_assert(EXITED_2(st) && strstr(out, "device 'gpu'"), "status %d: %s", st, out);
}

/* gorgond's device key takes exactly the strings the kernels take (both
 * through cm_device_parse): checked end to end, through gorgond's flag and
 * its message. Every run below fails on sq_entries after the device is
 * parsed; a refused device fails first. */
Test(appliance_device, device_strings_are_those_kn_device_parse_takes, .timeout = 60)
{
    const char *s[] = {"cpu",   "cuda",   "cuda:0", "cuda:7",    "cuda:1023", "cuda:1024",
                       "cuda:", "cuda:x", "cuda:-1", "cuda: 1",  "cuda:1 ",   "cuda0",
                       "gpu",   "CPU",    "Cuda",   "cuda:007", "",          "cudax"};
    char out[2048];
    for (size_t i = 0; i < sizeof s / sizeof s[0]; i++) {
        int idx;
        const bool kn_ok = kn_device_parse(s[i], &idx) == 0;
        int st = gorgond_run(out, sizeof out, "--device", s[i], "--sq-entries", "3", NULL);
        cr_assert(EXITED_2(st), "'%s': status %d: %s", s[i], st, out);
        const bool gd_ok = !strstr(out, "is not cpu, cuda or cuda:N");
        cr_assert_eq(gd_ok, kn_ok, "'%s': kn_device_parse %s it, gorgond %s it: %s", s[i],
                     kn_ok ? "takes" : "refuses", gd_ok ? "takes" : "refuses", out);
        if (gd_ok)
            cr_assert(strstr(out, "sq_entries"), "'%s': %s", s[i], out);
    }
}

/* No GPU here (or no CUDA backend in this build): gorgond starts, its
 * worker cannot use the device, and gorgond stops at once with exit 1 and
 * the worker's reason, rather than listening and failing every request. */
Test(appliance_device, unusable_cuda_stops_gorgond_with_the_reason, .timeout = 60)
{
    char why[256] = "";
    int n = kn_cuda_device_count(why, sizeof why);
    if (n > 0)
        cr_skip_test("this machine has %d CUDA device(s): nothing to refuse", n);
    static char out[16384];
    char model[PATH_MAX];
    snprintf(model, sizeof model, "%s", tu_model_path(S260));
    uint64_t t0 = gd_now_ms();
    int st = gorgond_run(out, sizeof out, "--model", model, "--device", "cuda", "--log-level",
                         "info", NULL);
    uint64_t ms = gd_now_ms() - t0;
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 1, "status %d: %s", st, out);
    cr_assert(strstr(out, "cannot use device cuda: "), "the worker's line: %s", out);
    cr_assert(strstr(out, why), "kn_cuda_device_count's reason '%s' missing: %s", why, out);
    cr_assert(strstr(out, "gorgond: stopped: the worker cannot use device cuda"), "%s", out);
    /* not started again: one worker, no three-strikes wait */
    int starts = 0;
    for (const char *p = out; (p = strstr(p, " started: ")); p++)
        starts++;
    cr_assert_eq(starts, 1, "%d worker starts: %s", starts, out);
    cr_assert_lt(ms, 20000, "took %llu ms", (unsigned long long)ms);
}

/* GPU: an index past the devices present stops gorgond the same way,
 * naming how many there are. */
Test(appliance_device, cuda_index_past_the_devices_stops_gorgond, .timeout = 60)
{
    char why[256] = "";
    int n = kn_cuda_device_count(why, sizeof why);
    if (n <= 0)
        cr_skip_test("no CUDA device: %s", why);
    static char out[16384];
    char model[PATH_MAX], dev[32];
    snprintf(model, sizeof model, "%s", tu_model_path(S260));
    snprintf(dev, sizeof dev, "cuda:%d", n);
    int st = gorgond_run(out, sizeof out, "--model", model, "--device", dev, NULL);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 1, "status %d: %s", st, out);
    cr_assert(strstr(out, "this machine has"), "%s", out);
}

/* GPU: the golden greedy text from BOS, served by a worker on the device,
 * whose KV pool is sized from the device's free memory (kv_blocks auto):
 * more than the CPU default of max_seqs / 4 full contexts. */
Test(appliance_device, cuda_serves_the_stories260k_golden, .fini = teardown, .timeout = 180)
{
    char why[256] = "";
    int n = kn_cuda_device_count(why, sizeof why);
    if (n <= 0)
        cr_skip_test("no CUDA device: %s", why);
    static char model[PATH_MAX];
    snprintf(model, sizeof model, "%s", tu_model_path(S260));
    AT_START(&gd, "--model", model, "--device", "cuda", "--max-seqs", "8", NULL);
    gorgon_client *cli = gd_connect(&gd, 0);
    uint32_t req;
    int rc = gorgon_generate_submit(cli, &(gorgon_gen_params){.prompt = "", .max_tokens = 256},
                                    1, &req);
    cr_assert_eq(rc, 0, "submit: %s", gorgon_strerror(rc));
    static char got[1 << 16], err[512];
    rc = ap_drain(cli, req, got, sizeof got, err, sizeof err, 60000000000ll);
    cr_assert_eq(rc, 0, "generate: %d %s", rc, err);
    FILE *f = fopen(tu_model_path("stories260K/golden_greedy_n256.txt"), "rb");
    cr_assert_not_null(f);
    static char want[1 << 16];
    size_t wn = fread(want, 1, sizeof want - 1, f);
    fclose(f);
    want[wn] = '\0';
    size_t gn = strlen(got);
    cr_assert(gn + 1 == wn && !strncmp(got, want, gn) && want[gn] == '\n',
              "got:\n%s\nwant:\n%s", got, want);
    gorgon_counters st = ap_stats(cli);
    /* stories260K: context 2048 = 128 blocks of 16; 8 sequences */
    cr_assert_gt(st.kv_blocks_total, 8 * 128 / 4, "KV pool of %llu blocks: the CPU default",
                 (unsigned long long)st.kv_blocks_total);
    cr_assert_leq(st.kv_blocks_total, 8 * 128, "KV pool of %llu blocks: above the cap",
                  (unsigned long long)st.kv_blocks_total);
    gorgon_close(cli);
    GD_END(&gd);
}

/* allow_tf32 reaches the worker as --allow-tf32 (its CUDA matmul reads
 * it; on the CPU it changes nothing), and only when set. */
Test(appliance_device, allow_tf32_is_passed_to_the_worker, .fini = teardown, .timeout = 60)
{
    for (int on = 0; on < 2; on++) {
        const char *model = tu_model_path("stories260K/stories260K.gguf");
        int rc = on ? gd_start(&gd, "--model", model, "--allow-tf32", NULL)
                    : gd_start(&gd, "--model", model, NULL);
        cr_assert_eq(rc, 0, "gd_start: %d", rc);
        gorgon_client *cli = gd_connect(&gd, 0);
        gorgon_group g[1];
        /* ready: the worker has exec'd (before that its pid's cmdline is
         * still gorgond's) */
        AT_WAIT_UNTIL(gorgon_groups(cli, g, 1) == 1 && g[0].state == GORGON_GROUP_READY &&
                          g[0].pid[0] > 0,
                      AT_WAIT_MS, "no worker ready");
        char path[64], args[4096];
        snprintf(path, sizeof path, "/proc/%d/cmdline", (int)g[0].pid[0]);
        FILE *f = fopen(path, "rb");
        cr_assert_not_null(f, "%s", path);
        size_t n = fread(args, 1, sizeof args - 1, f);
        fclose(f);
        args[n] = '\0';
        bool seen = false;
        for (size_t i = 0; i < n; i += strlen(args + i) + 1)
            seen |= strcmp(args + i, "--allow-tf32") == 0;
        cr_assert_eq(seen, on == 1, "worker argv %s --allow-tf32", seen ? "has" : "lacks");
        gorgon_close(cli);
        gd_stop(&gd);
    }
}
