/* The worker watchdog: a worker that stops making progress while it holds
 * requests (SIGSTOP here), or that never reports READY, is killed, its
 * requests fail with -EIO and a message that says why, and a new worker
 * serves what comes next. */
#include <criterion/criterion.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "clients/gorgon.h"
#include "tests/appliance/util/ap_test.h"
#include "tests/clients/util/gd_proc.h"
#include "tests/util/test_models.h"

static gd_proc gd;
static char model[PATH_MAX];

static void teardown(void)
{
    gd_stop(&gd);
}

static void start(const char *timeout_flag, const char *ms)
{
    snprintf(model, sizeof(model), "%s", tu_model_path("stories260K/stories260K.gguf"));
    int rc = gd_start(&gd, "--model", model, timeout_flag, ms, NULL);
    if (rc == -ENOENT)
        cr_skip_test("gorgond not built: run `make build/bin/gorgond`");
    cr_assert_eq(rc, 0, "gorgond did not start: %s", strerror(-rc));
}

Test(appliance_watchdog, stopped_worker_is_killed_and_replaced, .fini = teardown, .timeout = 120)
{
    start("--worker-timeout-ms", "700");
    gorgon_client *cli = gd_connect(&gd, 0);
    pid_t wk = ap_wait_worker(gd.pid, 0, 10000);
    cr_assert_gt(wk, 0, "no gorgon-worker child of gorgond");

    /* Four streams, each surely running (a first chunk arrived) before the
     * worker is stopped. */
    enum { N = 4 };
    uint32_t req[N];
    gorgon_gen_params p = {.prompt = "Once upon a time", .max_tokens = 400};
    for (int i = 0; i < N; i++)
        cr_assert_eq(gorgon_generate_submit(cli, &p, (uint64_t)i, &req[i]), 0);
    gorgon_gen_chunk ch;
    for (int i = 0; i < N; i++)
        cr_assert_eq(gorgon_generate_next(cli, req[i], &ch, 30000000000ll), 1,
                     "stream %d: no first chunk", i);
    cr_assert_eq(kill(wk, SIGSTOP), 0);
    uint64_t t0 = gd_now_ms();

    for (int i = 0; i < N; i++) {
        char err[256];
        int rc = ap_drain(cli, req[i], NULL, 0, err, sizeof(err), 30000000000ll);
        cr_assert_eq(rc, -EIO, "stream %d ended with %d (%s), want -EIO", i, rc, err);
        cr_assert(strstr(err, "no step for") && strstr(err, "worker_timeout_ms=700"),
                  "stream %d: message does not say the watchdog killed the worker: %s", i, err);
    }
    /* Bound: the deadline plus the tokens still streaming out of the ring
     * before it; far below the 30 s a test would otherwise wait. */
    uint64_t took = gd_now_ms() - t0;
    cr_assert_lt(took, 15000, "the hung worker was noticed only after %llu ms",
                 (unsigned long long)took);

    gorgon_counters st = ap_stats(cli);
    cr_assert_eq(st.watchdog_kills, 1, "watchdog_kills %llu",
                 (unsigned long long)st.watchdog_kills);
    cr_assert_eq(st.worker_restarts, 1);

    /* A new worker serves the next request in full. */
    pid_t wk2 = ap_wait_worker(gd.pid, wk, 10000);
    cr_assert_gt(wk2, 0, "no new worker after the hung one was killed");
    uint32_t r;
    gorgon_gen_params q = {.prompt = "Once upon a time", .max_tokens = 20};
    cr_assert_eq(gorgon_generate_submit(cli, &q, 9, &r), 0);
    char text[4096], err[256];
    cr_assert_eq(ap_drain(cli, r, text, sizeof(text), err, sizeof(err), 30000000000ll), 0,
                 "after the restart: %s", err);
    cr_assert_gt(strlen(text), 0);
    gorgon_close(cli);
    GD_END(&gd);
}

/* A fake worker that never says READY: each one is killed at the start
 * timeout; after three in a row gorgond disables generation and says so. */
Test(appliance_watchdog, worker_never_ready_is_killed, .fini = teardown, .timeout = 60)
{
    char fake[] = "/tmp/gorgon-fake-worker-XXXXXX";
    int fd = mkstemp(fake);
    cr_assert_geq(fd, 0);
    static const char script[] = "#!/bin/sh\nexec sleep 600\n";
    cr_assert_eq(write(fd, script, sizeof(script) - 1), (ssize_t)sizeof(script) - 1);
    close(fd);
    cr_assert_eq(chmod(fake, 0755), 0);
    setenv("GORGON_WORKER", fake, 1);
    start("--worker-start-timeout-ms", "300");
    unsetenv("GORGON_WORKER");

    gorgon_client *cli = gd_connect(&gd, 0);
    uint32_t r;
    gorgon_gen_params p = {.prompt = "Once upon a time", .max_tokens = 8};
    cr_assert_eq(gorgon_generate_submit(cli, &p, 1, &r), 0);
    char err[256];
    int rc = ap_drain(cli, r, NULL, 0, err, sizeof(err), 30000000000ll);
    cr_assert_eq(rc, -EIO, "ended with %d (%s), want -EIO", rc, err);
    cr_assert(strstr(err, "not ready") && strstr(err, "worker_start_timeout_ms=300"), "%s", err);

    /* Three early deaths disable generation, with a message saying so. */
    uint64_t t0 = gd_now_ms();
    for (;;) {
        cr_assert_eq(gorgon_generate_submit(cli, &p, 2, &r), 0);
        rc = ap_drain(cli, r, NULL, 0, err, sizeof(err), 30000000000ll);
        cr_assert_eq(rc, -EIO, "%s", err);
        if (strstr(err, "generation is disabled"))
            break;
        cr_assert_lt(gd_now_ms() - t0, 20000, "generation never disabled: %s", err);
    }
    gorgon_counters st = ap_stats(cli);
    cr_assert_eq(st.watchdog_kills, 3, "watchdog_kills %llu",
                 (unsigned long long)st.watchdog_kills);
    cr_assert_eq(ap_child_pid(gd.pid, NULL), 0, "gorgond still has a child (a fake worker)");
    gorgon_close(cli);
    unlink(fake);
    GD_END(&gd);
}

/* Requests that gorgond still held (not sent to the worker: it had no room)
 * had not started when the worker died: they run on the next worker, and
 * their text equals a solo run; only those the worker held fail. */
Test(appliance_watchdog, waiting_requests_survive_a_worker_death, .fini = teardown, .timeout = 120)
{
    start("--max-seqs", "2");
    gorgon_client *cli = gd_connect(&gd, 0);
    gorgon_gen_params p = {.prompt = "Once upon a time", .max_tokens = 300};
    char ref[8192], text[8192], err[256];
    uint32_t r;
    cr_assert_eq(gorgon_generate_submit(cli, &p, 0, &r), 0);
    cr_assert_eq(ap_drain(cli, r, ref, sizeof(ref), err, sizeof(err), 30000000000ll), 0, "%s",
                 err);
    pid_t wk = ap_wait_worker(gd.pid, 0, 10000);
    cr_assert_gt(wk, 0);

    /* Stopped, the worker takes nothing from its ring: the first three
     * requests go to it (2 to run + 1 ready), the other three wait. */
    cr_assert_eq(kill(wk, SIGSTOP), 0);
    enum { N = 6 };
    uint32_t req[N];
    for (int i = 0; i < N; i++)
        cr_assert_eq(gorgon_generate_submit(cli, &p, (uint64_t)i, &req[i]), 0);
    /* gorgond handles a ring in order: once this STATS is answered, the six
     * GENERATEs before it have been admitted. */
    gorgon_counters st = ap_stats(cli);
    cr_assert_eq(st.gen_waiting, 3, "gen_waiting %llu, want 3 (requests %llu, running %llu, "
                 "queued %llu)", (unsigned long long)st.gen_waiting,
                 (unsigned long long)st.gen_requests_total, (unsigned long long)st.gen_running,
                 (unsigned long long)st.gen_queued);
    cr_assert_eq(kill(wk, SIGKILL), 0);

    int failed = 0, same = 0;
    for (int i = 0; i < N; i++) {
        int rc = ap_drain(cli, req[i], text, sizeof(text), err, sizeof(err), 60000000000ll);
        if (rc == -EIO && strstr(err, "died"))
            failed++;
        else if (rc == 0 && !strcmp(text, ref))
            same++;
        else
            cr_assert_fail("request %d: rc %d, %s / text '%.40s'", i, rc, err, text);
    }
    cr_assert_eq(failed, 3, "%d requests failed with the worker (want the 3 it held)", failed);
    cr_assert_eq(same, 3, "%d waiting requests ran on the new worker with the solo text", same);
    gorgon_close(cli);
    GD_END(&gd);
}
