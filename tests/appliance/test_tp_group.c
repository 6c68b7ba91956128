/* Tensor-parallel worker groups through gorgond (--tp N): N gorgon-worker
 * rank processes serve the goldens byte for byte (greedy, with a prompt,
 * sampled beside them, and with Medusa); a rank that dies fails the group's
 * requests with a message naming it, and the group comes back; replicas
 * serve at once and a dead rank fails only its own group's requests; a
 * split the model or the CPUs cannot take is refused at start. */
#include <criterion/criterion.h>
#include <dirent.h>
#include <limits.h>
#include <sched.h>
#include <stdbool.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "clients/gorgon.h"
#include "ipc/ipc.h"
#include "tests/appliance/util/ap_test.h"
#include "tests/appliance/util/wait.h"
#include "tests/clients/util/gd_proc.h"
#include "tests/util/test_models.h"
#include "tests/util/test_tree.h"

static gd_proc gd;
static char model_buf[PATH_MAX], heads_dir[64];

static void teardown(void)
{
    gd_stop(&gd);
    if (heads_dir[0]) {
        char cmd[128];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", heads_dir);
        cr_expect_eq(system(cmd), 0);
        heads_dir[0] = 0;
    }
}

#define START_TP(...)                                                                        \
    do {                                                                                     \
        snprintf(model_buf, sizeof(model_buf), "%s",                                         \
                 tu_model_path("stories260K/stories260K.gguf"));                             \
        AT_START(&gd, "--model", model_buf, "--threads", "1", __VA_ARGS__);                  \
    } while (0)

/* The gorgon-worker child of gorgond started as --rank r (0 if none). */
static pid_t rank_pid(int r)
{
    DIR *d = opendir("/proc");
    cr_assert_not_null(d);
    pid_t found = 0;
    struct dirent *e;
    char want[16];
    snprintf(want, sizeof want, "%d", r);
    while (!found && (e = readdir(d))) {
        if (e->d_name[0] < '1' || e->d_name[0] > '9')
            continue;
        pid_t p = (pid_t)atoi(e->d_name);
        char path[300], buf[4096];
        snprintf(path, sizeof path, "/proc/%s/stat", e->d_name);
        FILE *f = fopen(path, "r");
        if (!f)
            continue;
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[n] = 0;
        char *rp = strrchr(buf, ')');
        int ppid;
        if (!rp || sscanf(rp + 2, "%*c %d", &ppid) != 1 || ppid != gd.pid ||
            !strstr(buf, "(gorgon-worker)"))
            continue;
        snprintf(path, sizeof path, "/proc/%s/cmdline", e->d_name);
        if (!(f = fopen(path, "r")))
            continue;
        n = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        for (size_t i = 0; i + 7 < n; i += strlen(buf + i) + 1)
            if (!strcmp(buf + i, "--rank") && !strcmp(buf + i + 7, want))
                found = p;
    }
    closedir(d);
    return found;
}

typedef struct gen_out {
    char text[8192];
    size_t len;
    int rc;
    gorgon_gen_chunk last;
    char msg[512];
} gen_out;

static void drain(gorgon_client *cli, uint32_t req, gen_out *o)
{
    memset(o, 0, sizeof(*o));
    gorgon_gen_chunk ch;
    int rc;
    while ((rc = gorgon_generate_next(cli, req, &ch, 30000000000ll)) >= 0) {
        if (!ch.error && ch.len && o->len + ch.len < sizeof o->text) {
            memcpy(o->text + o->len, ch.text, ch.len);
            o->len += ch.len;
        }
        if (rc == 0)
            break;
    }
    o->rc = rc;
    o->last = ch;
    if (ch.error)
        snprintf(o->msg, sizeof o->msg, "%.*s", (int)ch.len, ch.text);
}

static void run_one(gorgon_client *cli, const gorgon_gen_params *p, gen_out *o)
{
    uint32_t req;
    int rc = gorgon_generate_submit(cli, p, 1, &req);
    cr_assert_eq(rc, 0, "submit: %s", gorgon_strerror(rc));
    drain(cli, req, o);
}

/* The golden text is gorgon-run's: prompt echoed, then a newline. */
static void expect_golden(const char *golden, const char *prefix, const gen_out *o)
{
    FILE *f = fopen(tu_model_path(golden), "rb");
    cr_assert_not_null(f);
    static char want[1 << 16], got[1 << 16];
    size_t n = fread(want, 1, sizeof want, f);
    fclose(f);
    int k = snprintf(got, sizeof got, "%s%.*s\n", prefix, (int)o->len, o->text);
    cr_assert(n == (size_t)k && memcmp(want, got, n) == 0, "%s: TP output differs:\n%s", golden,
              got);
}

/* The groups gorgond reports (gorgon_groups); fails unless there are n. */
static void groups(gorgon_client *cli, gorgon_group *g, int n)
{
    int got = gorgon_groups(cli, g, 4);
    cr_assert_eq(got, n, "gorgon_groups: %d (%s)", got, got < 0 ? gorgon_strerror(got) : "");
}

static bool all_ready(gorgon_client *cli, int n)
{
    gorgon_group g[4];
    groups(cli, g, n);
    for (int i = 0; i < n; i++)
        if (g[i].state != GORGON_GROUP_READY)
            return false;
    return true;
}

Test(appliance_tp_group, tp2_serves_the_goldens_in_one_batch, .fini = teardown, .timeout = 120)
{
    START_TP("--tp", "2", NULL);
    cr_assert(ap_wait_worker(gd.pid, 0, AT_WAIT_MS) > 0);
    AT_WAIT_UNTIL(rank_pid(0) > 0 && rank_pid(1) > 0, AT_WAIT_MS, "ranks 0 and 1 not started");
    gorgon_client *cli = gd_connect(&gd, 0);
    /* one group of two ranks, as gorgon_groups reports it */
    AT_WAIT_UNTIL(all_ready(cli, 1), AT_WAIT_MS, "the group did not get ready");
    gorgon_group g;
    groups(cli, &g, 1);
    cr_assert(g.n_ranks == 2 && g.pid[0] == rank_pid(0) && g.pid[1] == rank_pid(1),
              "group: %u ranks, pids %d %d", g.n_ranks, (int)g.pid[0], (int)g.pid[1]);
    cr_assert_eq(gorgon_groups(cli, NULL, 0), 1);
    cr_assert_eq(gorgon_groups(cli, NULL, 1), -EINVAL);
    /* three requests in flight together: two goldens and a sampled one */
    uint32_t a, b, c;
    cr_assert_eq(gorgon_generate_submit(cli, &(gorgon_gen_params){.prompt = "", .max_tokens = 256},
                                        1, &a),
                 0);
    cr_assert_eq(gorgon_generate_submit(
                     cli, &(gorgon_gen_params){.prompt = "Lily and Tom", .max_tokens = 60}, 2, &b),
                 0);
    cr_assert_eq(gorgon_generate_submit(cli,
                                        &(gorgon_gen_params){.prompt = "The cat",
                                                             .max_tokens = 100,
                                                             .temperature = 0.8f,
                                                             .top_p = 0.9f,
                                                             .seed = 7},
                                        3, &c),
                 0);
    gen_out o;
    drain(cli, a, &o);
    cr_assert_eq(o.rc, 0, "greedy: %d %s", o.rc, o.msg);
    expect_golden("stories260K/golden_greedy_n256.txt", "", &o);
    drain(cli, b, &o);
    cr_assert_eq(o.rc, 0, "prompt: %d %s", o.rc, o.msg);
    expect_golden("stories260K/golden_greedy_prompt_LilyAndTom_n64.txt", "Lily and Tom", &o);
    drain(cli, c, &o);
    cr_assert_eq(o.rc, 0, "sampled: %d %s", o.rc, o.msg);
    cr_assert_gt(o.last.usage.completion_tokens, 0);
    /* the sampled request alone, same seed: the same text (batch invariance
     * holds under TP too) */
    static gen_out alone;
    run_one(cli,
            &(gorgon_gen_params){.prompt = "The cat", .max_tokens = 100, .temperature = 0.8f,
                                 .top_p = 0.9f, .seed = 7},
            &alone);
    cr_assert_eq(alone.rc, 0);
    cr_assert(alone.len == o.len && memcmp(alone.text, o.text, o.len) == 0,
              "sampled text changed with the batch");
    gorgon_close(cli);
    GD_END(&gd);
}

/* Top-k sampling under TP 2: the ranks exchange their top-k candidates,
 * not whole rows, and the text is gorgon-run's at TP 1 (which samples the
 * whole row), in a batch with a greedy request. */
Test(appliance_tp_group, tp2_topk_sampling_equals_tp1, .fini = teardown, .timeout = 120)
{
    START_TP("--tp", "2", NULL);
    gorgon_client *cli = gd_connect(&gd, 0);
    const gorgon_gen_params tk = {.prompt = "The cat", .max_tokens = 100, .temperature = 0.8f,
                                  .top_k = 40, .top_p = 0.9f, .seed = 7};
    uint32_t a, b;
    cr_assert_eq(gorgon_generate_submit(cli, &tk, 1, &a), 0);
    cr_assert_eq(gorgon_generate_submit(cli, &(gorgon_gen_params){.prompt = "", .max_tokens = 256},
                                        2, &b),
                 0);
    static gen_out o, greedy;
    drain(cli, a, &o);
    drain(cli, b, &greedy);
    cr_assert_eq(o.rc, 0, "%d %s", o.rc, o.msg);
    cr_assert_eq(greedy.rc, 0, "%d %s", greedy.rc, greedy.msg);
    expect_golden("stories260K/golden_greedy_n256.txt", "", &greedy);
    char cmd[3 * PATH_MAX];
    snprintf(cmd, sizeof cmd,
             "'%s' --model '%s' -p 'The cat' -n 100 --temp 0.8 --top-k 40 --top-p 0.9 "
             "--seed 7 --threads 1 2>/dev/null",
             tu_bin("gorgon-run"), model_buf);
    FILE *p = popen(cmd, "r");
    cr_assert_not_null(p);
    static char want[8192];
    size_t n = fread(want, 1, sizeof want - 1, p);
    cr_assert_eq(pclose(p), 0, "gorgon-run failed");
    want[n] = 0;
    static char got[8192];
    snprintf(got, sizeof got, "The cat%.*s\n", (int)o.len, o.text);
    cr_assert_str_eq(got, want, "TP 2 top-k text differs from TP 1's");
    gorgon_close(cli);
    GD_END(&gd);
}

Test(appliance_tp_group, killed_rank_fails_its_requests_by_name_then_the_group_restarts,
     .fini = teardown, .timeout = 120)
{
    START_TP("--tp", "2", NULL);
    AT_WAIT_UNTIL(rank_pid(0) > 0 && rank_pid(1) > 0, AT_WAIT_MS, "ranks 0 and 1 not started");
    gorgon_client *cli = gd_connect(&gd, 0);
    const pid_t r0 = rank_pid(0), r1 = rank_pid(1);
    uint32_t a;
    cr_assert_eq(gorgon_generate_submit(
                     cli, &(gorgon_gen_params){.prompt = "", .max_tokens = 1900, .temperature = 1},
                     1, &a),
                 0);
    gorgon_gen_chunk ch;
    cr_assert_eq(gorgon_generate_next(cli, a, &ch, 30000000000ll), 1);
    cr_assert_eq(kill(r0, SIGSTOP), 0); /* surely mid-generation */
    cr_assert_eq(kill(r1, SIGKILL), 0);
    gen_out o;
    drain(cli, a, &o);
    cr_assert_eq(o.rc, -EIO, "rc %d", o.rc);
    cr_assert_eq(o.last.finish, GORGON_FINISH_ERROR);
    cr_assert(strstr(o.msg, "rank 1 of the worker group") && strstr(o.msg, "signal 9"),
              "message: %s", o.msg);
    /* both ranks are new, and they serve */
    AT_WAIT_UNTIL(rank_pid(0) > 0 && rank_pid(0) != r0 && rank_pid(1) > 0 && rank_pid(1) != r1,
                  AT_WAIT_MS, "the group was not restarted");
    run_one(cli, &(gorgon_gen_params){.prompt = "", .max_tokens = 256}, &o);
    cr_assert_eq(o.rc, 0, "after restart: %d %s", o.rc, o.msg);
    expect_golden("stories260K/golden_greedy_n256.txt", "", &o);
    gorgon_counters st = ap_stats(cli);
    cr_assert_eq(st.worker_restarts, 1);
    cr_assert_eq(st.gen_failed, 1);
    gorgon_close(cli);
    GD_END(&gd);
}

/* The ranks' collectives use gorgond's worker_timeout_ms, not a limit of
 * their own: with worker_timeout_ms = 45 s, rank 1 stopped for 33 s in the
 * middle of a generation (longer than the workers' 30 s default) holds the
 * group up, and once it runs again the request completes, the group never
 * restarted (short limits: test_watchdog.c). */
Test(appliance_tp_group, ranks_wait_as_long_as_worker_timeout_ms_and_no_longer,
     .fini = teardown, .timeout = 180)
{
    START_TP("--tp", "2", "--worker-timeout-ms", "45000", NULL);
    AT_WAIT_UNTIL(rank_pid(0) > 0 && rank_pid(1) > 0, AT_WAIT_MS, "ranks 0 and 1 not started");
    gorgon_client *cli = gd_connect(&gd, 0);
    const pid_t r1 = rank_pid(1);
    uint32_t a;
    cr_assert_eq(gorgon_generate_submit(cli, &(gorgon_gen_params){.prompt = "", .max_tokens = 256},
                                        1, &a),
                 0);
    gorgon_gen_chunk ch;
    cr_assert_eq(gorgon_generate_next(cli, a, &ch, 30000000000ll), 1);
    static char text[1 << 16];
    size_t n = ch.len;
    memcpy(text, ch.text, ch.len);
    cr_assert_eq(kill(r1, SIGSTOP), 0);
    struct timespec ts = {.tv_sec = 33};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ; /* the stop itself is the point: nothing to wait for */
    cr_assert_eq(kill(r1, SIGCONT), 0);
    int rc;
    while ((rc = gorgon_generate_next(cli, a, &ch, 60000000000ll)) >= 0) {
        cr_assert_eq(ch.error, 0, "the request failed: %.*s", (int)ch.len, ch.text);
        memcpy(text + n, ch.text, ch.len);
        n += ch.len;
        if (rc == 0)
            break;
    }
    cr_assert_eq(rc, 0, "rc %d", rc);
    gen_out o = {.len = n};
    cr_assert_lt(n, sizeof o.text);
    memcpy(o.text, text, n);
    expect_golden("stories260K/golden_greedy_n256.txt", "", &o);
    cr_assert_eq(rank_pid(1), r1, "rank 1 was replaced");
    gorgon_counters st = ap_stats(cli);
    cr_assert_eq(st.worker_restarts, 0);
    gorgon_close(cli);
    GD_END(&gd);
}

/* Greedy Medusa under TP 2 is lossless: the n256 golden, heads replicated. */
Test(appliance_tp_group, tp2_with_medusa_serves_the_golden, .fini = teardown, .timeout = 180)
{
    snprintf(heads_dir, sizeof heads_dir, "/tmp/gorgon-tp-heads-XXXXXX");
    cr_assert_not_null(mkdtemp(heads_dir));
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "'%s' --model '%s' --out '%s' --seqs 32 --len 48 --epochs 1 "
                              "--heads 2 >/dev/null 2>&1",
             tu_bin("gorgon-medusa-train"), tu_model_path("stories260K/stories260K.gguf"),
             heads_dir);
    cr_assert_eq(system(cmd), 0, "gorgon-medusa-train failed");
    START_TP("--tp", "2", "--medusa", heads_dir, "--medusa-max-batch", "4", NULL);
    gorgon_client *cli = gd_connect(&gd, 0);
    gen_out o;
    run_one(cli, &(gorgon_gen_params){.prompt = "", .max_tokens = 256}, &o);
    cr_assert_eq(o.rc, 0, "%d %s", o.rc, o.msg);
    expect_golden("stories260K/golden_greedy_n256.txt", "", &o);
    gorgon_counters st = ap_stats(cli);
    cr_assert_gt(st.medusa_steps, 0, "no Medusa step ran");
    gorgon_close(cli);
    GD_END(&gd);
}

Test(appliance_tp_group, splits_the_model_or_cpus_cannot_take_are_refused_at_start,
     .timeout = 60)
{
    char bin[PATH_MAX], out[4096];
    cr_assert_eq(gd_find_binary(bin, sizeof bin), 0);
    snprintf(model_buf, sizeof(model_buf), "%s", tu_model_path("stories260K/stories260K.gguf"));
    const char *heads[] = {bin, "--foreground", "--socket", "/tmp/gorgon-tp-never.sock",
                           "--model", model_buf, "--tp", "3", NULL};
    int st = gd_run_stderr(heads, false, out, sizeof out);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) != 0, "gorgond --tp 3 started");
    cr_assert(strstr(out, "tp = 3") && strstr(out, "does not divide the 8 attention heads"),
              "stderr: %s", out);
    const char *cpus[] = {bin, "--foreground", "--socket", "/tmp/gorgon-tp-never.sock",
                          "--model", model_buf, "--tp", "4", "--cpus", "0", NULL};
    st = gd_run_stderr(cpus, false, out, sizeof out);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) != 0, "gorgond --tp 4 --cpus 0 started");
    cr_assert(strstr(out, "tp = 4 ranks need at least one CPU each; cpus = 0 gives 1"),
              "stderr: %s", out);
    const char *reps[] = {bin,         "--foreground", "--socket", "/tmp/gorgon-tp-never.sock",
                          "--model",   model_buf,      "--tp",     "2",
                          "--replicas", "2",           "--cpus",   "0-2",
                          NULL};
    st = gd_run_stderr(reps, false, out, sizeof out);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) != 0, "gorgond --tp 2 --replicas 2 --cpus 0-2");
    cr_assert(strstr(out, "tp = 2 x replicas = 2: 4 ranks need at least one CPU each; "
                          "cpus = 0-2 gives 3"),
              "stderr: %s", out);
    const char *list[] = {bin, "--foreground", "--cpus", "3-1", NULL};
    st = gd_run_stderr(list, false, out, sizeof out);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) != 0);
    cr_assert(strstr(out, "not a CPU list"), "stderr: %s", out);
}

/* cpus = LIST pins each rank to its even share, and the group still serves. */
/* replicas = 2 of tp = 2: four rank processes, two groups serving at once
 * (each new request goes to the group with fewer); a rank killed in one
 * group fails that group's requests only, naming the rank and the group,
 * while the other group's run to their end; the group comes back. */
Test(appliance_tp_group, replicas_serve_at_once_and_a_dead_rank_fails_only_its_group,
     .fini = teardown, .timeout = 180)
{
    START_TP("--tp", "2", "--replicas", "2", NULL);
    gorgon_client *cli = gd_connect(&gd, 0);
    AT_WAIT_UNTIL(all_ready(cli, 2), AT_WAIT_MS, "the two groups did not get ready");
    gorgon_group g[4];
    groups(cli, g, 2);
    pid_t pids[4];
    for (int i = 0; i < 2; i++) {
        cr_assert_eq(g[i].group, (uint32_t)i);
        cr_assert_eq(g[i].n_ranks, 2u);
        for (int r = 0; r < 2; r++) {
            pids[i * 2 + r] = g[i].pid[r];
            cr_assert_gt(g[i].pid[r], 0, "group %d rank %d has no pid", i, r);
        }
    }
    for (int a = 0; a < 4; a++)
        for (int b = a + 1; b < 4; b++)
            cr_assert_neq(pids[a], pids[b], "two ranks share a pid");
    /* Four sampled requests (seeds whose stories run 347+ tokens alone),
     * each seen streaming; then every rank 0 is stopped so that none ends
     * while the groups are looked at. */
    static const uint64_t seeds[4] = {2, 3, 6, 7};
    uint32_t req[4];
    for (int i = 0; i < 4; i++)
        cr_assert_eq(gorgon_generate_submit(cli,
                                            &(gorgon_gen_params){.prompt = "",
                                                                 .max_tokens = 1900,
                                                                 .temperature = 1,
                                                                 .seed = seeds[i]},
                                            (uint64_t)i, &req[i]),
                     0);
    static gen_out o[4];
    for (int i = 0; i < 4; i++) {
        gorgon_gen_chunk ch;
        cr_assert_eq(gorgon_generate_next(cli, req[i], &ch, 30000000000ll), 1,
                     "request %d ended at once", i);
    }
    cr_assert_eq(kill(g[0].pid[0], SIGSTOP), 0);
    cr_assert_eq(kill(g[1].pid[0], SIGSTOP), 0);
    gorgon_group now[4];
    groups(cli, now, 2);
    cr_assert(now[0].in_worker == 2 && now[1].in_worker == 2,
              "requests not spread over the groups: %u and %u", now[0].in_worker,
              now[1].in_worker);
    cr_assert_eq(kill(g[0].pid[1], SIGKILL), 0);
    cr_assert_eq(kill(g[1].pid[0], SIGCONT), 0);
    int failed = 0, ok = 0;
    for (int i = 0; i < 4; i++) {
        drain(cli, req[i], &o[i]);
        if (o[i].rc == -EIO) {
            failed++;
            cr_assert(strstr(o[i].msg, "rank 1 of worker group 0") &&
                          strstr(o[i].msg, "signal 9"),
                      "request %d: %s", i, o[i].msg);
        } else {
            cr_assert_eq(o[i].rc, 0, "request %d: %d %s", i, o[i].rc, o[i].msg);
            cr_assert_eq(o[i].last.finish, GORGON_FINISH_EOS, "request %d", i);
            ok++;
        }
    }
    cr_assert(failed == 2 && ok == 2, "%d failed, %d ended well: only group 0's two should fail",
              failed, ok);
    /* group 0 comes back with new ranks; group 1 kept its own */
    AT_WAIT_UNTIL(all_ready(cli, 2), AT_WAIT_MS, "group 0 did not come back");
    groups(cli, now, 2);
    cr_assert(now[0].pid[0] != g[0].pid[0] && now[0].pid[1] != g[0].pid[1] &&
                  now[0].restarts == 1,
              "group 0 not restarted");
    cr_assert(now[1].pid[0] == g[1].pid[0] && now[1].pid[1] == g[1].pid[1] &&
                  now[1].restarts == 0,
              "group 1 was restarted too");
    gorgon_counters st = ap_stats(cli);
    cr_assert_eq(st.gen_failed, 2);
    cr_assert_eq(st.worker_restarts, 1);
    /* `gorgon stats` shows both groups with their ranks' pids */
    char cmd[PATH_MAX + 64], out[8192], want[2][96];
    snprintf(cmd, sizeof cmd, "'%s' stats --socket '%s'", tu_bin("gorgon"), gd.sock);
    FILE *p = popen(cmd, "r");
    cr_assert_not_null(p);
    size_t n = fread(out, 1, sizeof out - 1, p);
    out[n] = 0;
    cr_assert_eq(pclose(p), 0, "gorgon stats failed:\n%s", out);
    for (int i = 0; i < 2; i++) {
        snprintf(want[i], sizeof want[i], "group %-13d ready, pids %d,%d;", i, (int)now[i].pid[0],
                 (int)now[i].pid[1]);
        cr_assert(strstr(out, want[i]), "no '%s' in:\n%s", want[i], out);
    }
    /* both serve the golden again, two requests at once */
    uint32_t a, b;
    cr_assert_eq(gorgon_generate_submit(cli, &(gorgon_gen_params){.prompt = "", .max_tokens = 256},
                                        1, &a),
                 0);
    cr_assert_eq(gorgon_generate_submit(cli, &(gorgon_gen_params){.prompt = "", .max_tokens = 256},
                                        2, &b),
                 0);
    drain(cli, a, &o[0]);
    drain(cli, b, &o[1]);
    for (int i = 0; i < 2; i++) {
        cr_assert_eq(o[i].rc, 0, "after restart: %d %s", o[i].rc, o[i].msg);
        expect_golden("stories260K/golden_greedy_n256.txt", "", &o[i]);
    }
    groups(cli, now, 2);
    cr_assert(now[0].requests_total == 3 && now[1].requests_total == 3,
              "requests per group: %llu and %llu (the last two went to the same group)",
              (unsigned long long)now[0].requests_total,
              (unsigned long long)now[1].requests_total);
    gorgon_close(cli);
    GD_END(&gd);
}

Test(appliance_tp_group, cpus_pin_each_rank_to_its_share, .fini = teardown, .timeout = 120)
{
    cpu_set_t own;
    cr_assert_eq(sched_getaffinity(0, sizeof own, &own), 0);
    int c[2], n = 0;
    for (int i = 0; i < CPU_SETSIZE && n < 2; i++)
        if (CPU_ISSET(i, &own))
            c[n++] = i;
    if (n < 2)
        cr_skip_test("needs 2 CPUs in this process's affinity mask, has %d", n);
    char list[32];
    snprintf(list, sizeof list, "%d,%d", c[0], c[1]);
    START_TP("--tp", "2", "--cpus", list, NULL);
    AT_WAIT_UNTIL(rank_pid(0) > 0 && rank_pid(1) > 0, AT_WAIT_MS, "ranks 0 and 1 not started");
    for (int r = 0; r < 2; r++) {
        char path[64], line[256], want[64];
        snprintf(path, sizeof path, "/proc/%d/status", (int)rank_pid(r));
        FILE *f = fopen(path, "r");
        cr_assert_not_null(f);
        bool found = false;
        snprintf(want, sizeof want, "Cpus_allowed_list:\t%d\n", c[r]);
        while (fgets(line, sizeof line, f))
            found |= !strcmp(line, want);
        fclose(f);
        cr_assert(found, "rank %d is not pinned to CPU %d", r, c[r]);
    }
    gorgon_client *cli = gd_connect(&gd, 0);
    gen_out o;
    run_one(cli, &(gorgon_gen_params){.prompt = "", .max_tokens = 256}, &o);
    cr_assert_eq(o.rc, 0, "%d %s", o.rc, o.msg);
    expect_golden("stories260K/golden_greedy_n256.txt", "", &o);
    gorgon_close(cli);
    GD_END(&gd);
}
