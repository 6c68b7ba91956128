/* libgorgon against a real gorgond started on a temp socket. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/wait.h>

#include "clients/gorgon.h"
#include "tests/clients/util/gd_proc.h"

static gd_proc gd;

#define START_GORGOND(...)                                                                   \
    do {                                                                                     \
        int rc_ = gd_start(&gd, __VA_ARGS__);                                           \
        if (rc_ == -ENOENT)                                                                  \
            cr_skip_test("gorgond not built (looked in $GORGON_GORGOND, the test's build "    \
                         "tree and build/bin/gorgond): run `make build/bin/gorgond`");       \
        cr_assert_eq(rc_, 0, "gorgond did not start: %s", strerror(-rc_));                   \
    } while (0)

/* Cleanup when a test failed half-way; tests that pass end with GD_END. */
static void teardown(void)
{
    gd_stop(&gd);
}

Test(clients_libgorgon, ping_echoes_payload_when_connected, .fini = teardown, .timeout = 20)
{
    START_GORGOND(NULL);
    gorgon_client *cli = gd_connect(&gd, 0);
    static const size_t sizes[] = {0, 1, 63, 64, 1000, 16384};
    uint8_t buf[16384];
    for (size_t k = 0; k < sizeof(sizes) / sizeof(sizes[0]); k++) {
        for (size_t i = 0; i < sizes[k]; i++)
            buf[i] = (uint8_t)(i * 7 + k);
        uint64_t rtt = 0;
        int rc = gorgon_ping(cli, buf, sizes[k], 2000000000, &rtt);
        cr_assert_eq(rc, (int)sizes[k], "ping of %zu bytes: %d (%s)", sizes[k], rc,
                     gorgon_strerror(rc));
        cr_assert_gt(rtt, 0);
    }
    cr_assert_eq(gorgon_ping(cli, buf, sizeof(buf) + 1, 1000000000, NULL), -EMSGSIZE);
    gorgon_counters st;
    cr_assert_eq(gorgon_stats(cli, &st), 0);
    cr_assert_eq(st.clients_now, 1);
    cr_assert_geq(st.requests_total, 6);
    gorgon_close(cli);
    GD_END(&gd);
}

Test(clients_libgorgon, connect_fails_enoent_without_gorgond, .timeout = 10)
{
    gorgon_opts o = {.socket_path = "/tmp/gorgon-test-no-such-dir/none.sock"};
    gorgon_client *cli = (gorgon_client *)0x1;
    errno = 4242;
    cr_assert_eq(gorgon_connect(&cli, &o), -ENOENT);
    cr_assert_eq(errno, 4242, "errno changed to %d", errno);
    cr_assert_null(cli);
    cr_assert_str_eq(gorgon_last_socket(), o.socket_path);
}

Test(clients_libgorgon, async_requests_complete_with_user_data, .fini = teardown, .timeout = 20)
{
    START_GORGOND("--poll-us", "0", NULL);
    gorgon_client *cli = gd_connect(&gd, GORGON_NO_SPIN);
    cr_assert_eq(gorgon_submit_nop(cli, 100), 0);
    cr_assert_eq(gorgon_submit_ping(cli, "abc", 3, 101), 0);
    int slot = gorgon_slot_acquire(cli);
    cr_assert_geq(slot, 0);
    size_t cap = 0;
    char *in = gorgon_slot_input(cli, (uint32_t)slot, &cap);
    cr_assert_not_null(in);
    cr_assert_geq(cap, 5);
    memcpy(in, "hello", 5);
    gorgon_request rq[2] = {
        {.opcode = GORGON_OP_PING, .slot = (uint32_t)slot, .in_len = 5, .user_data = 102},
        {.opcode = GORGON_OP_NOP, .user_data = 103},
    };
    cr_assert_eq(gorgon_submit_burst(cli, rq, 2), 2);
    gorgon_request bad = {.opcode = GORGON_OP_PING, .slot = 1u << 30, .user_data = 1};
    cr_assert_eq(gorgon_submit(cli, &bad), -EINVAL);
    cr_assert_eq(gorgon_inflight(cli), 4);
    /* A round trip in the middle: it gets its own answer, and the four
     * completions that arrive meanwhile are kept for gorgon_wait below. */
    cr_assert_eq(gorgon_ping(cli, "x", 1, 1000000000, NULL), 1,
                 "gorgon_ping while async requests are in flight");
    cr_assert_eq(gorgon_inflight(cli), 4);

    bool seen[4] = {false};
    int got = 0;
    while (got < 4) {
        gorgon_completion c[4];
        int n = gorgon_wait(cli, c, 4, 2000000000);
        cr_assert_gt(n, 0, "gorgon_wait: %d (%s)", n, gorgon_strerror(n));
        for (int i = 0; i < n; i++) {
            uint64_t ud = gorgon_cqe_user_data(&c[i]);
            cr_assert(ud >= 100 && ud <= 103, "unexpected user_data %llu",
                      (unsigned long long)ud);
            cr_assert_not(seen[ud - 100], "user_data %llu completed twice", (unsigned long long)ud);
            seen[ud - 100] = true;
            size_t len;
            const char *out = gorgon_cqe_output(&c[i], &len);
            if (ud == 101) {
                cr_assert_eq(gorgon_cqe_result(&c[i]), 3);
                cr_assert_eq(len, 3);
                cr_assert_eq(memcmp(out, "abc", 3), 0);
            } else if (ud == 102) {
                cr_assert_eq(gorgon_cqe_result(&c[i]), 5);
                cr_assert_eq(memcmp(out, "hello", 5), 0);
            } else {
                cr_assert_eq(gorgon_cqe_result(&c[i]), 0);
                cr_assert_null(out);
            }
        }
        got += n;
    }
    cr_assert_eq(gorgon_inflight(cli), 0);
    cr_assert_eq(gorgon_slot_release(cli, (uint32_t)slot), 0);
    cr_assert_eq(gorgon_slot_release(cli, (uint32_t)slot), -EINVAL, "double release accepted");
    gorgon_completion c;
    cr_assert_eq(gorgon_poll(cli, &c, 1), 0, "poll on an empty CQ must return 0");
    gorgon_close(cli);
    GD_END(&gd);
}

Test(clients_libgorgon, submit_returns_eagain_when_sq_full, .fini = teardown, .timeout = 20)
{
    START_GORGOND("--sq-entries", "8", "--cq-entries", "16", NULL);
    gorgon_client *cli = gd_connect(&gd, 0);
    /* A stopped gorgond consumes nothing: the 9th push finds the SQ full. */
    cr_assert_eq(kill(gd.pid, SIGSTOP), 0);
    int st;
    cr_assert_eq(waitpid(gd.pid, &st, WUNTRACED), gd.pid);
    cr_assert(WIFSTOPPED(st));
    for (int i = 0; i < 8; i++)
        cr_assert_eq(gorgon_submit_nop(cli, (uint64_t)i), 0, "push %d", i);
    cr_assert_eq(gorgon_submit_nop(cli, 8), -EAGAIN);
    cr_assert_eq(gorgon_submit_ping(cli, "x", 1, 9), -EAGAIN);
    gorgon_request rq = {.opcode = GORGON_OP_NOP};
    cr_assert_eq(gorgon_submit_burst(cli, &rq, 1), 0);
    cr_assert_eq(kill(gd.pid, SIGCONT), 0);
    int got = 0;
    while (got < 8) {
        gorgon_completion c[8];
        int n = gorgon_wait(cli, c, 8, 2000000000);
        cr_assert_gt(n, 0, "gorgon_wait after SIGCONT: %d", n);
        got += n;
    }
    cr_assert_eq(gorgon_submit_nop(cli, 10), 0, "the ring must accept again once drained");
    gorgon_close(cli);
    GD_END(&gd);
}

struct killer {
    pid_t pid;
    long delay_ms;
};

static void *kill_later(void *arg)
{
    struct killer *k = arg;
    gd_sleep_ms(k->delay_ms);
    kill(k->pid, SIGKILL);
    return NULL;
}

static void wait_sees_epipe(uint32_t flags)
{
    START_GORGOND(NULL);
    gorgon_client *cli = gd_connect(&gd, flags);
    cr_assert_eq(kill(gd.pid, SIGSTOP), 0);
    int st;
    cr_assert_eq(waitpid(gd.pid, &st, WUNTRACED), gd.pid);
    cr_assert_eq(gorgon_submit_ping(cli, "zz", 2, 1), 0);
    pthread_t th;
    struct killer k = {gd.pid, 100};
    cr_assert_eq(pthread_create(&th, NULL, kill_later, &k), 0);
    uint64_t t0 = gd_now_ms();
    gorgon_completion c;
    int rc = gorgon_wait(cli, &c, 1, 30000000000ll);
    uint64_t dt = gd_now_ms() - t0;
    pthread_join(th, NULL);
    cr_assert_eq(rc, -EPIPE, "gorgon_wait after kill -9 gorgond: %d (%s)", rc,
                 gorgon_strerror(rc));
    cr_assert_lt(dt, 2000, "noticing the dead daemon took %llu ms", (unsigned long long)dt);
    cr_assert_eq(gorgon_submit_nop(cli, 2), -EPIPE);
    cr_assert_eq(gorgon_ping(cli, "a", 1, 1000000000, NULL), -EPIPE);
    gorgon_close(cli);
    waitpid(gd.pid, NULL, 0);
    gd.pid = -1;
}

Test(clients_libgorgon, wait_returns_epipe_when_gorgond_killed, .fini = teardown, .timeout = 20)
{
    wait_sees_epipe(0);
}

Test(clients_libgorgon, busy_wait_returns_epipe_when_gorgond_killed, .fini = teardown,
     .timeout = 20)
{
    wait_sees_epipe(GORGON_BUSY_POLL);
}

Test(clients_libgorgon, connect_refused_eacces_for_uid_not_allowed, .fini = teardown,
     .timeout = 20)
{
    if (geteuid() != 0)
        cr_skip_test("needs root to setuid(65534)");
    /* Mode 0666: the file lets everyone connect, so the refusal is
     * gorgond's own (with its reason), at accept. */
    START_GORGOND("--socket-mode", "0666", NULL);
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        if (setgid(65534) != 0 || setuid(65534) != 0)
            _exit(10);
        gorgon_opts o = {.socket_path = gd.sock};
        gorgon_client *cli;
        int rc = gorgon_connect(&cli, &o);
        if (rc != -EACCES) {
            fprintf(stderr, "child: gorgon_connect: %d (%s)\n", rc, gorgon_last_refusal());
            _exit(11);
        }
        /* the reason names the uid and the option that lets it in */
        if (!strstr(gorgon_last_refusal(), "uid 65534 not allowed") ||
            !strstr(gorgon_last_refusal(), "--allow-uid"))
            _exit(12);
        _exit(0);
    }
    int st;
    cr_assert_eq(waitpid(pid, &st, 0), pid);
    cr_assert(WIFEXITED(st));
    cr_assert_eq(WEXITSTATUS(st), 0,
                 "child: 10 setuid failed, 11 connect did not return -EACCES, 12 reason text "
                 "does not name the uid and --allow-uid");
    /* The CLI says it once: gorgond's reason, not a second paraphrase. */
    char cli_bin[PATH_MAX];
    cr_assert_lt(strlen(gd.bin), sizeof(cli_bin) - 1);
    snprintf(cli_bin, sizeof(cli_bin), "%s", gd.bin);
    cli_bin[strlen(cli_bin) - 1] = '\0'; /* .../bin/gorgond -> .../bin/gorgon */
    char out[512];
    const char *argv[] = {cli_bin, "ping", "--socket", gd.sock, NULL};
    st = gd_run_stderr(argv, true, out, sizeof(out));
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) != 0 && WEXITSTATUS(st) < 126, "%s", out);
    const char *first = strstr(out, "not allowed");
    cr_assert(first && strstr(out, "--allow-uid"), "CLI output: %s", out);
    cr_assert_null(strstr(first + 1, "not allowed"), "said twice: %s", out);
    /* The same uid is let in once it (or its gid) is on the allow-list. */
    for (int round = 0; round < 2; round++) {
        gd_stop(&gd);
        if (round == 0)
            START_GORGOND("--allow-uid", "1234,65534", "--socket-mode", "0666", NULL);
        else /* the socket file's group lets the gid open it (default mode 0660) */
            START_GORGOND("--allow-gid", "65534", "--socket-group", "65534", NULL);
        pid = fork();
        cr_assert_geq(pid, 0);
        if (pid == 0) {
            if (setgid(65534) != 0 || setuid(65534) != 0)
                _exit(10);
            gorgon_opts o = {.socket_path = gd.sock};
            gorgon_client *cli;
            int rc = gorgon_connect(&cli, &o);
            if (rc != 0)
                _exit(11);
            rc = gorgon_ping(cli, "ok", 2, 2000000000, NULL);
            gorgon_close(cli);
            _exit(rc == 2 ? 0 : 13);
        }
        cr_assert_eq(waitpid(pid, &st, 0), pid);
        cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "allowed %s: child status %d",
                  round == 0 ? "uid" : "gid", st);
    }
    GD_END(&gd);
}

Test(clients_libgorgon, connect_refused_eusers_when_full, .fini = teardown, .timeout = 20)
{
    START_GORGOND("--max-clients", "2", NULL);
    gorgon_client *a = gd_connect(&gd, 0), *b = gd_connect(&gd, 0), *c = NULL;
    gorgon_opts o = {.socket_path = gd.sock};
    cr_assert_eq(gorgon_connect(&c, &o), -EUSERS);
    cr_assert(strstr(gorgon_last_refusal(), "max_clients=2"), "reason: '%s'",
              gorgon_last_refusal());
    gorgon_close(b);
    /* The freed place is reclaimed once gorgond sees the hang-up. */
    int rc = -EUSERS;
    for (int i = 0; i < 200 && rc == -EUSERS; i++) {
        rc = gorgon_connect(&c, &o);
        if (rc == -EUSERS)
            gd_sleep_ms(10);
    }
    cr_assert_eq(rc, 0, "connect after a client left: %s", gorgon_strerror(rc));
    cr_assert_eq(gorgon_ping(c, "q", 1, 2000000000, NULL), 1);
    gorgon_close(c);
    gorgon_close(a);
    GD_END(&gd);
}

Test(clients_libgorgon, ping_works_with_eventfd_doorbells, .fini = teardown, .timeout = 20)
{
    START_GORGOND("--eventfd-doorbells", "--poll-us", "0", NULL);
    gorgon_client *cli = gd_connect(&gd, GORGON_NO_SPIN);
    for (int i = 0; i < 50; i++) {
        char p[32];
        int n = snprintf(p, sizeof(p), "ping %d", i);
        cr_assert_eq(gorgon_ping(cli, p, (size_t)n, 2000000000, NULL), n);
        if (i % 10 == 0)
            gd_sleep_ms(2); /* let gorgond fall asleep between some pings */
    }
    gorgon_counters st;
    cr_assert_eq(gorgon_stats(cli, &st), 0);
    cr_assert_gt(st.loop_wakeups, 0);
    gorgon_close(cli);
    GD_END(&gd);
}

Test(clients_libgorgon, doorbell_moves_when_completion_arrives, .fini = teardown, .timeout = 20)
{
    START_GORGOND("--poll-us", "0", NULL);
    gorgon_client *cli = gd_connect(&gd, GORGON_NO_SPIN);
    cr_assert_geq(gorgon_fd(cli), 0);
    const uint32_t *addr;
    uint32_t val;
    cr_assert_eq(gorgon_wait_prepare(cli, &addr, &val), 0, "empty CQ: caller may sleep");
    cr_assert_eq(gorgon_submit_ping(cli, "bell", 4, 7), 0);
    /* An event loop would FUTEX_WAIT here; the completion must ring. */
    uint64_t t0 = gd_now_ms();
    while (__atomic_load_n(addr, __ATOMIC_ACQUIRE) == val && gd_now_ms() - t0 < 5000)
        gd_sleep_ms(1);
    cr_assert_neq(__atomic_load_n(addr, __ATOMIC_ACQUIRE), val, "gorgond never rang the doorbell");
    gorgon_wait_finish(cli);
    gorgon_completion c;
    cr_assert_eq(gorgon_poll(cli, &c, 1), 1);
    cr_assert_eq(c.user_data, 7);
    cr_assert_eq(gorgon_wait_prepare(cli, &addr, &val), 0);
    gorgon_wait_finish(cli);
    gorgon_close(cli);
    GD_END(&gd);
}
