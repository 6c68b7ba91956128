/* Generation under failure: a client killed mid-stream, the worker killed
 * mid-generation, malformed parameters from a raw client, SIGTERM with
 * requests in flight. The worker is paused with SIGSTOP where a test needs
 * a request to be surely in flight at a given moment. */
#include <criterion/criterion.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "clients/gorgon.h"
#include "ipc/ipc.h"
#include "tests/appliance/util/ap_test.h"
#include "tests/appliance/util/wait.h"
#include "tests/clients/util/gd_proc.h"
#include "tests/util/test_models.h"

static gd_proc gd;
static char model_buf[PATH_MAX];

static void teardown(void)
{
    gd_stop(&gd);
}

#define START_WITH_MODEL(...)                                                                \
    do {                                                                                     \
        snprintf(model_buf, sizeof(model_buf), "%s",                                         \
                 tu_model_path("stories260K/stories260K.gguf"));                             \
        AT_START(&gd, "--model", model_buf, __VA_ARGS__);                                    \
    } while (0)

/* gorgond's gorgon-worker child (0 if none) */
static pid_t worker_pid(void)
{
    return ap_worker_pid(gd.pid);
}

static pid_t wait_worker(void)
{
    pid_t p = 0;
    AT_WAIT_UNTIL((p = worker_pid()) > 0, AT_WAIT_MS, "no gorgon-worker child of gorgond");
    return p;
}

static gorgon_counters stats(gorgon_client *cli)
{
    gorgon_counters st;
    int rc = gorgon_stats(cli, &st);
    cr_assert_eq(rc, 0, "stats: %s", gorgon_strerror(rc));
    return st;
}

/* No request queued or running in the worker, no KV block in use. */
static bool worker_idle(gorgon_client *cli, gorgon_counters *st)
{
    *st = stats(cli);
    return st->kv_blocks_used == 0 && st->gen_running == 0 && st->gen_queued == 0;
}

/* A new client is refused (gorgond is draining or gone). */
static bool connect_refused(void)
{
    gorgon_client *probe;
    gorgon_opts o = {.socket_path = gd.sock};
    if (gorgon_connect(&probe, &o) < 0)
        return true;
    gorgon_close(probe);
    return false;
}

/* Read req to its end; returns the last rc, text appended to buf. */
static int drain(gorgon_client *cli, uint32_t req, gorgon_gen_chunk *ch, char *buf, size_t cap,
                 size_t *len)
{
    int rc;
    size_t n = 0;
    while ((rc = gorgon_generate_next(cli, req, ch, 30000000000ll)) >= 0) {
        if (buf && ch->len && !ch->error && n + ch->len < cap) {
            memcpy(buf + n, ch->text, ch->len);
            n += ch->len;
        }
        if (rc == 0)
            break;
    }
    if (len)
        *len = n;
    return rc;
}

Test(appliance_failures, client_killed_mid_stream_cancelled_others_unaffected, .fini = teardown,
     .timeout = 90)
{
    START_WITH_MODEL(NULL);
    gorgon_client *cli = gd_connect(&gd, 0);
    /* Reference of the bystander's request, run alone. */
    static char ref[8192], got[8192];
    size_t ref_len, got_len;
    uint32_t r;
    gorgon_gen_chunk ch;
    gorgon_gen_params bystander = {.prompt = "Once upon a time", .max_tokens = 200};
    cr_assert_eq(gorgon_generate_submit(cli, &bystander, 1, &r), 0);
    cr_assert_eq(drain(cli, r, &ch, ref, sizeof(ref), &ref_len), 0);
    pid_t wk = wait_worker();

    int go[2];
    cr_assert_eq(pipe(go), 0);
    pid_t child = fork();
    cr_assert_geq(child, 0);
    if (child == 0) {
        gorgon_client *c;
        gorgon_opts o = {.socket_path = gd.sock};
        if (gorgon_connect(&c, &o) < 0)
            _exit(1);
        uint32_t q[4];
        for (int i = 0; i < 4; i++)
            if (gorgon_generate_submit(c, &(gorgon_gen_params){.prompt = "", .max_tokens = 1900},
                                       (uint64_t)i, &q[i]) < 0)
                _exit(2);
        gorgon_gen_chunk x;
        if (gorgon_generate_next(c, q[0], &x, 30000000000ll) != 1)
            _exit(3);
        char one = 1;
        if (write(go[1], &one, 1) != 1)
            _exit(4);
        for (;;)
            pause(); /* streaming, until killed */
    }
    close(go[1]);
    char one = 0;
    cr_assert_eq(read(go[0], &one, 1), 1, "child did not start streaming");
    close(go[0]);
    /* Freeze the worker so the child's requests are surely still running. */
    cr_assert_eq(kill(wk, SIGSTOP), 0);
    /* (the step's stats event may still be on its way) */
    gorgon_counters before;
    AT_WAIT_UNTIL((before = stats(cli)).kv_blocks_used > 0, AT_WAIT_MS,
                  "the child's requests hold no KV block");
    cr_assert_eq(kill(child, SIGKILL), 0);
    waitpid(child, NULL, 0);
    /* The bystander starts while the dead client's requests are cancelled. */
    cr_assert_eq(gorgon_generate_submit(cli, &bystander, 2, &r), 0);
    cr_assert_eq(kill(wk, SIGCONT), 0);
    cr_assert_eq(drain(cli, r, &ch, got, sizeof(got), &got_len), 0);
    cr_assert(got_len == ref_len && memcmp(got, ref, ref_len) == 0,
              "bystander's output changed");
    gorgon_counters st;
    AT_WAIT_UNTIL(worker_idle(cli, &st), AT_WAIT_MS,
                  "KV of the dead client not freed: %llu blocks, %llu running, %llu queued",
                  (unsigned long long)st.kv_blocks_used, (unsigned long long)st.gen_running,
                  (unsigned long long)st.gen_queued);
    /* Cancelled, not run to the end: far fewer than 4 x 1900 tokens. */
    cr_assert_lt(st.gen_tokens_total - before.gen_tokens_total, 4 * 1900 / 2,
                 "the dead client's requests ran on (%llu tokens)",
                 (unsigned long long)(st.gen_tokens_total - before.gen_tokens_total));
    cr_assert_eq(worker_pid(), wk, "the worker was restarted");
    gorgon_close(cli);
    GD_END(&gd);
}

Test(appliance_failures, worker_killed_requests_fail_clearly_then_restart, .fini = teardown,
     .timeout = 90)
{
    START_WITH_MODEL(NULL);
    gorgon_client *cli = gd_connect(&gd, 0);
    pid_t wk = wait_worker();
    uint32_t a, b;
    cr_assert_eq(gorgon_generate_submit(cli, &(gorgon_gen_params){.prompt = "", .max_tokens = 1900},
                                        1, &a),
                 0);
    cr_assert_eq(gorgon_generate_submit(cli, &(gorgon_gen_params){.prompt = "The dog", .max_tokens = 1900},
                                        2, &b),
                 0);
    gorgon_gen_chunk ch;
    cr_assert_eq(gorgon_generate_next(cli, a, &ch, 30000000000ll), 1);
    cr_assert_eq(kill(wk, SIGSTOP), 0); /* surely mid-generation */
    cr_assert_eq(kill(wk, SIGKILL), 0);
    int rc = drain(cli, a, &ch, NULL, 0, NULL);
    cr_assert_eq(rc, -EIO, "rc %d", rc);
    cr_assert_eq(ch.finish, GORGON_FINISH_ERROR);
    cr_assert(ch.len && strstr(ch.text, "worker process died"), "message: %.*s", (int)ch.len,
              ch.text);
    rc = drain(cli, b, &ch, NULL, 0, NULL);
    cr_assert_eq(rc, -EIO, "second request: rc %d", rc);
    /* gorgond lives on, restarts the worker, and serves new requests. */
    uint64_t rtt;
    cr_assert_eq(gorgon_ping(cli, "x", 1, 1000000000, &rtt), 1);
    uint32_t c;
    cr_assert_eq(gorgon_generate_submit(cli, &(gorgon_gen_params){.prompt = "", .max_tokens = 30},
                                        3, &c),
                 0);
    rc = drain(cli, c, &ch, NULL, 0, NULL);
    cr_assert_eq(rc, 0, "after restart: rc %d %.*s", rc, (int)ch.len, ch.text);
    cr_assert_eq(ch.usage.completion_tokens, 30);
    pid_t wk2 = worker_pid();
    cr_assert(wk2 > 0 && wk2 != wk);
    gorgon_counters st = stats(cli);
    cr_assert_eq(st.worker_restarts, 1);
    cr_assert_geq(st.gen_failed, 2);
    gorgon_close(cli);
    GD_END(&gd);
}

/* A raw client sends garbage parameter blocks; each fails alone while a
 * well-behaved client streams on. */
Test(appliance_failures, malformed_params_fail_only_that_request, .fini = teardown, .timeout = 60)
{
    START_WITH_MODEL(NULL);
    gorgon_client *good = gd_connect(&gd, 0);
    uint32_t r;
    cr_assert_eq(gorgon_generate_submit(good, &(gorgon_gen_params){.prompt = "", .max_tokens = 300},
                                        1, &r),
                 0);
    gorgon_client *bad = gd_connect(&gd, 0);
    struct ipc_gen_params cases[] = {
        {.max_tokens = 4, .top_p = 1.0f, .prompt_off = 0xfffffff0u, .prompt_len = 0x20},
        {.max_tokens = 4, .top_p = 1.0f, .n_stop = 1, .stop_off = 64, .stop_len = 3},
        {.max_tokens = 0, .top_p = 1.0f},
        {.max_tokens = 4, .top_p = 1.0f, .n_stop = 9},
        {.max_tokens = 4, .top_p = 1.0f, .flags = IPC_GEN_F_PROMPT_IDS, .prompt_off = 64,
         .prompt_len = 4},
        {.max_tokens = 4, .top_p = 1.0f, .rsvd = {1, 0}},
    };
    int slot = gorgon_slot_acquire(bad);
    cr_assert_geq(slot, 0);
    uint8_t *in = gorgon_slot_input(bad, (uint32_t)slot, NULL);
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        memcpy(in, &cases[i], sizeof(cases[i]));
        memcpy(in + 64, "abc\xff\xff\xff\x7f", 7); /* stop without NUL; id 0x7fffffff */
        cr_assert_eq(gorgon_submit(bad, &(gorgon_request){.opcode = GORGON_OP_GENERATE,
                                                          .slot = (uint32_t)slot, .in_len = 128,
                                                          .user_data = i}),
                     0);
        gorgon_completion c;
        cr_assert_eq(gorgon_wait(bad, &c, 1, 5000000000ll), 1);
        cr_assert_eq(c.result, -EINVAL, "case %zu: %d", i, c.result);
        cr_assert_eq(c.flags & GORGON_CQE_F_MORE, 0);
        cr_assert_eq(c.arg[0], GORGON_FINISH_ERROR);
        cr_assert_gt(c.out_len, 0, "case %zu: no message", i);
        gorgon_poll(bad, &c, 0); /* consume before the slot is reused */
    }
    gorgon_slot_release(bad, (uint32_t)slot);
    gorgon_gen_chunk ch;
    cr_assert_eq(drain(good, r, &ch, NULL, 0, NULL), 0);
    cr_assert_eq(ch.usage.completion_tokens, 300);
    gorgon_close(bad);
    gorgon_close(good);
    GD_END(&gd);
}

Test(appliance_failures, sigterm_lets_inflight_finish_refuses_new, .fini = teardown,
     .timeout = 60)
{
    START_WITH_MODEL(NULL);
    gorgon_client *a = gd_connect(&gd, 0), *b = gd_connect(&gd, 0);
    pid_t wk = wait_worker();
    uint32_t r;
    cr_assert_eq(gorgon_generate_submit(a, &(gorgon_gen_params){.prompt = "", .max_tokens = 100},
                                        1, &r),
                 0);
    gorgon_gen_chunk ch;
    cr_assert_eq(gorgon_generate_next(a, r, &ch, 30000000000ll), 1);
    cr_assert_eq(kill(wk, SIGSTOP), 0);
    cr_assert_eq(kill(gd.pid, SIGTERM), 0);
    /* Draining is visible from outside: new connections are refused. */
    AT_WAIT_UNTIL(connect_refused(), AT_WAIT_MS,
                  "gorgond still accepts connections after SIGTERM");
    uint32_t q;
    cr_assert_eq(gorgon_generate_submit(b, &(gorgon_gen_params){.prompt = "", .max_tokens = 5}, 2,
                                        &q),
                 0);
    int rc = drain(b, q, &ch, NULL, 0, NULL);
    cr_assert_eq(rc, -ESHUTDOWN, "new request while stopping: %d", rc);
    cr_assert_eq(kill(wk, SIGCONT), 0);
    rc = drain(a, r, &ch, NULL, 0, NULL);
    cr_assert_eq(rc, 0, "in-flight request: %d %.*s", rc, (int)ch.len, ch.text);
    cr_assert_eq(ch.usage.completion_tokens, 100);
    int st = gd_wait_exit(&gd, 10000);
    cr_assert(st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "exit status %d", st);
    gorgon_close(a);
    gorgon_close(b);
    gd_stop(&gd);
}

Test(appliance_failures, sigterm_grace_over_cancels_then_exits_zero, .fini = teardown,
     .timeout = 60)
{
    START_WITH_MODEL("--grace-ms", "200", NULL);
    gorgon_client *a = gd_connect(&gd, 0);
    pid_t wk = wait_worker();
    uint32_t r;
    cr_assert_eq(gorgon_generate_submit(a, &(gorgon_gen_params){.prompt = "", .max_tokens = 100},
                                        1, &r),
                 0);
    gorgon_gen_chunk ch;
    cr_assert_eq(gorgon_generate_next(a, r, &ch, 30000000000ll), 1);
    cr_assert_eq(kill(wk, SIGSTOP), 0); /* it will never finish in time */
    cr_assert_eq(kill(gd.pid, SIGTERM), 0);
    int rc = drain(a, r, &ch, NULL, 0, NULL);
    cr_assert_eq(rc, -ECANCELED, "rc %d", rc);
    cr_assert_eq(ch.finish, GORGON_FINISH_CANCELLED);
    cr_assert(strstr(ch.text, "shutting down"), "%.*s", (int)ch.len, ch.text);
    int st = gd_wait_exit(&gd, 10000);
    cr_assert(st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "exit status %d", st);
    /* The stopped worker went with it: gorgond kills and reaps it before
     * exiting, so its pid is gone by now (a stopped worker left behind
     * would still be there, reparented). */
    errno = 0;
    cr_assert(kill(wk, 0) < 0 && errno == ESRCH, "worker %d outlived gorgond", (int)wk);
    gorgon_close(a);
    gd_stop(&gd);
}
