/* gorgond under abuse from other local users: floods of connections that
 * never say hello (from a uid that is not allowed and from one that is),
 * and connections that arrive while it drains for SIGTERM. Honest clients
 * must keep getting in. */
#include <criterion/criterion.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include "clients/gorgon.h"
#include "tests/appliance/util/ap_test.h"
#include "tests/clients/util/gd_proc.h"
#include "tests/util/test_models.h"

static gd_proc gd;
static char model[PATH_MAX];
static pid_t flooders[2] = {-1, -1};

static void teardown(void)
{
    for (int i = 0; i < 2; i++)
        if (flooders[i] > 0) {
            kill(flooders[i], SIGKILL);
            waitpid(flooders[i], NULL, 0);
            flooders[i] = -1;
        }
    gd_stop(&gd);
}

static void start(const char *a, const char *b)
{
    snprintf(model, sizeof(model), "%s", tu_model_path("stories260K/stories260K.gguf"));
    int rc = gd_start(&gd, "--model", model, "--socket-mode", "0666", a, b, NULL);
    if (rc == -ENOENT)
        cr_skip_test("gorgond not built: run `make build/bin/gorgond`");
    cr_assert_eq(rc, 0, "gorgond did not start: %s", strerror(-rc));
}

static int raw_connect(const char *path)
{
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof(sa.sun_path)) {
        close(fd);
        return -1;
    }
    memcpy(sa.sun_path, path, strlen(path) + 1);
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 && errno != EAGAIN) {
        close(fd);
        return -1;
    }
    return fd;
}

/* A child (as `uid`) that holds n connections which never send a hello,
 * opening a new one whenever gorgond drops one, until it is killed. It
 * writes one byte to ready_fd once all n are open. */
static pid_t flood(uid_t uid, int n, int ready_fd)
{
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid)
        return pid;
    if (uid != 0 && (setgid(uid) != 0 || setuid(uid) != 0))
        _exit(10);
    struct pollfd *p = calloc((size_t)n, sizeof(*p));
    if (!p)
        _exit(11);
    for (int i = 0; i < n; i++) {
        p[i].fd = raw_connect(gd.sock);
        p[i].events = POLLIN;
    }
    (void)!write(ready_fd, "r", 1);
    for (;;) {
        if (poll(p, (nfds_t)n, 100) < 0)
            continue;
        for (int i = 0; i < n; i++) {
            if (p[i].fd >= 0 && !p[i].revents)
                continue;
            if (p[i].fd >= 0)
                close(p[i].fd);
            p[i].fd = raw_connect(gd.sock);
            p[i].revents = 0;
        }
    }
}

Test(appliance_abuse, hello_floods_do_not_lock_out_honest_clients, .fini = teardown,
     .timeout = 180)
{
    if (geteuid() != 0)
        cr_skip_test("needs root to run the disallowed flood as uid 65534");
    start("--max-clients", "256");
    int ready[2];
    cr_assert_eq(pipe(ready), 0);
    /* 330 each: more than max_clients + the pending-handshake room. The
     * allowed flood runs as our own uid (root), like the honest client. */
    flooders[0] = flood(65534, 330, ready[1]);
    flooders[1] = flood(0, 330, ready[1]);
    char b;
    for (int i = 0; i < 2; i++)
        cr_assert_eq(read(ready[0], &b, 1), 1);
    close(ready[0]);
    close(ready[1]);

    enum { ROUNDS = 200 };
    gorgon_opts o = {.socket_path = gd.sock};
    int ok = 0;
    char last_err[160] = "";
    for (int i = 0; i < ROUNDS; i++) {
        gorgon_client *cli;
        int rc = gorgon_connect(&cli, &o);
        if (rc == 0) {
            rc = gorgon_ping(cli, "honest", 6, 2000000000, NULL);
            if (rc == 6)
                ok++;
            if (i % 40 == 0) {
                /* and a generation, complete, every 40 rounds */
                uint32_t r;
                gorgon_gen_params p = {.prompt = "Once upon a time", .max_tokens = 16};
                cr_assert_eq(gorgon_generate_submit(cli, &p, 1, &r), 0);
                char text[2048], err[256];
                cr_assert_eq(ap_drain(cli, r, text, sizeof(text), err, sizeof(err),
                                      30000000000ll), 0, "generation under the flood: %s", err);
            }
            gorgon_close(cli);
        }
        if (rc < 0)
            snprintf(last_err, sizeof(last_err), "%s (%s)", gorgon_strerror(rc),
                     gorgon_last_refusal());
    }
    cr_assert_geq(ok * 100, ROUNDS * 99, "only %d of %d connect+ping rounds succeeded; last "
                  "error: %s", ok, ROUNDS, last_err);
    gorgon_client *cli = gd_connect(&gd, 0);
    gorgon_counters st = ap_stats(cli);
    cr_assert_gt(st.handshakes_dropped, 0, "the allowed flood was never dropped");
    cr_assert_leq(st.handshakes_pending, 64, "pending handshakes %llu over max_handshakes",
                  (unsigned long long)st.handshakes_pending);
    gorgon_close(cli);
    teardown();
}

Test(appliance_abuse, connections_during_drain_are_told_why, .fini = teardown, .timeout = 60)
{
    start("--grace-ms", "20000");
    gorgon_client *cli = gd_connect(&gd, 0);
    pid_t wk = ap_wait_worker(gd.pid, 0, 10000);
    cr_assert_gt(wk, 0);
    uint32_t r;
    gorgon_gen_params p = {.prompt = "Once upon a time", .max_tokens = 200};
    cr_assert_eq(gorgon_generate_submit(cli, &p, 1, &r), 0);
    gorgon_gen_chunk ch;
    cr_assert_eq(gorgon_generate_next(cli, r, &ch, 30000000000ll), 1);
    /* Hold the request in flight: the drain lasts until the worker goes on. */
    cr_assert_eq(kill(wk, SIGSTOP), 0);
    cr_assert_eq(kill(gd.pid, SIGTERM), 0);
    gorgon_opts o = {.socket_path = gd.sock};
    gorgon_client *late = NULL;
    int rc = 0;
    uint64_t t0 = gd_now_ms();
    /* SIGTERM is seen on gorgond's next loop pass: until then a connect
     * still succeeds (and is closed again). */
    while ((rc = gorgon_connect(&late, &o)) == 0) {
        gorgon_close(late);
        cr_assert_lt(gd_now_ms() - t0, 10000, "still accepting 10 s after SIGTERM");
        gd_sleep_ms(2);
    }
    cr_assert_eq(rc, -ESHUTDOWN, "connect during the drain: %s", gorgon_strerror(rc));
    cr_assert(strstr(gorgon_last_refusal(), "shutting down"), "reason: '%s'",
              gorgon_last_refusal());
    kill(wk, SIGCONT);
    char err[256];
    cr_assert_eq(ap_drain(cli, r, NULL, 0, err, sizeof(err), 30000000000ll), 0,
                 "the request in flight did not finish in the drain: %s", err);
    gorgon_close(cli);
    GD_END(&gd);
}

/* One uid floods: 8 connections x 64 long generations. It gets what its
 * per-uid cap allows (the rest is refused, naming the cap), and another
 * uid's short request is admitted ahead of the flood's queue: it waits at
 * most for one place in the worker to free up, i.e. for one flood request
 * to end (<= FLOOD_TOKENS steps), then runs its own 20 steps. The wait is
 * measured in the worker's steps (the tokens the flood generates
 * meanwhile), not in seconds, so a loaded machine does not change it. */
#define FLOOD_TOKENS 400
Test(appliance_abuse, one_uid_flood_does_not_starve_another, .fini = teardown, .timeout = 240)
{
    if (geteuid() != 0)
        cr_skip_test("needs root to run the flood as uid 65534");
    start("--allow-uid", "65534");
    int ready[2];
    cr_assert_eq(pipe(ready), 0);
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        /* The flood: exit status 10+ on a setup failure; writes the number
         * of requests refused with the per-uid cap's message. */
        if (setgid(65534) != 0 || setuid(65534) != 0)
            _exit(10);
        gorgon_opts o = {.socket_path = gd.sock};
        gorgon_client *c[8];
        uint32_t refused = 0;
        gorgon_gen_params p = {.prompt = "Once upon a time", .max_tokens = FLOOD_TOKENS};
        uint32_t reqs[8][64];
        for (int k = 0; k < 8; k++) {
            if (gorgon_connect(&c[k], &o) != 0)
                _exit(11);
            for (int i = 0; i < 64; i++)
                if (gorgon_generate_submit(c[k], &p, (uint64_t)i, &reqs[k][i]) != 0)
                    _exit(12);
        }
        /* Refusals come back as final chunks at once; the admitted
         * requests stream on (nobody reads them: they wait in the slots). */
        for (int k = 0; k < 8; k++)
            for (uint32_t r = 0; r < 64; r++) {
                gorgon_gen_chunk ch;
                int rc = gorgon_generate_next(c[k], reqs[k][r], &ch, 1000000);
                if (rc == -EBUSY && strstr(ch.text, "max_requests_per_uid=256"))
                    refused++;
            }
        (void)!write(ready[1], &refused, sizeof(refused));
        pause();
        _exit(0);
    }
    flooders[0] = pid;
    uint32_t refused = 0;
    cr_assert_eq(read(ready[0], &refused, sizeof(refused)), (ssize_t)sizeof(refused),
                 "the flood child failed to set up");
    close(ready[0]);
    close(ready[1]);
    cr_assert_eq(refused, 512 - 256, "%u of the flood's 512 requests were refused with the "
                 "per-uid cap's message, want 256", refused);

    gorgon_client *cli = gd_connect(&gd, 0);
    gorgon_counters st0 = ap_stats(cli);
    cr_assert_gt(st0.gen_waiting, 0, "the flood should have requests waiting in gorgond");
    uint32_t r;
    gorgon_gen_params p = {.prompt = "Once upon a time", .max_tokens = 20};
    cr_assert_eq(gorgon_generate_submit(cli, &p, 1, &r), 0);
    char text[4096], err[256];
    cr_assert_eq(ap_drain(cli, r, text, sizeof(text), err, sizeof(err), 120000000000ll), 0,
                 "the honest request failed: %s", err);
    gorgon_counters st1 = ap_stats(cli);
    /* While it waited, the worker ran at most max_seqs + 1 flood sequences
     * for at most FLOOD_TOKENS steps; while it ran, 64 others ran beside
     * it. FIFO would put it behind the 192 flood requests waiting: three
     * more batches of ~342-token generations, over 60,000 tokens. */
    uint64_t tokens = st1.gen_tokens_total - st0.gen_tokens_total;
    uint64_t bound = 65ull * (FLOOD_TOKENS + 20 + 4);
    cr_assert_leq(tokens, bound, "the flood generated %llu tokens while the honest 20-token "
                  "request was waiting and running; one flood generation is at most %llu",
                  (unsigned long long)tokens, (unsigned long long)bound);
    gorgon_close(cli);
    teardown();
}

/* The per-connection cap: a session over max_requests_per_session gets
 * -EBUSY naming that cap, while another session of the same uid (under
 * the per-uid cap) is still served. */
Test(appliance_abuse, per_session_cap_refuses_by_name_and_spares_other_sessions,
     .fini = teardown, .timeout = 120)
{
    start("--max-requests-per-session", "4");
    gorgon_client *a = gd_connect(&gd, 0), *b = gd_connect(&gd, 0);
    gorgon_gen_params p = {.prompt = "Once upon a time", .max_tokens = 200};
    uint32_t r[6];
    for (int i = 0; i < 6; i++)
        cr_assert_eq(gorgon_generate_submit(a, &p, (uint64_t)i, &r[i]), 0);
    /* the refusals are final chunks posted at once, in submission order;
     * nobody reads the first four, which keep their slots */
    for (int i = 4; i < 6; i++) {
        gorgon_gen_chunk ch;
        int rc = gorgon_generate_next(a, r[i], &ch, 10000000000ll);
        cr_assert_eq(rc, -EBUSY, "request %d: rc %d (%.*s)", i, rc, (int)ch.len, ch.text);
        cr_assert(strstr(ch.text, "max_requests_per_session=4") &&
                      strstr(ch.text, "this connection has 4"),
                  "request %d: %.*s", i, (int)ch.len, ch.text);
    }
    uint32_t rb;
    gorgon_gen_params q = {.prompt = "Once upon a time", .max_tokens = 8};
    cr_assert_eq(gorgon_generate_submit(b, &q, 9, &rb), 0);
    char text[4096], err[256];
    cr_assert_eq(ap_drain(b, rb, text, sizeof(text), err, sizeof(err), 60000000000ll), 0,
                 "the other session's request failed: %s", err);
    cr_assert_gt(strlen(text), 0);
    gorgon_close(a);
    gorgon_close(b);
}

/* Without --socket-mode the socket is 0660: other local users reach it
 * only through the group (socket_group), never by default. */
Test(appliance_abuse, socket_mode_defaults_to_0660, .fini = teardown, .timeout = 60)
{
    snprintf(model, sizeof(model), "%s", tu_model_path("stories260K/stories260K.gguf"));
    int rc = gd_start(&gd, "--model", model, NULL);
    cr_assert_eq(rc, 0, "gorgond did not start: %s", strerror(-rc));
    struct stat st;
    cr_assert_eq(stat(gd.sock, &st), 0, "%s: %s", gd.sock, strerror(errno));
    cr_assert(S_ISSOCK(st.st_mode));
    cr_assert_eq(st.st_mode & 07777, 0660, "socket mode %04o", (unsigned)(st.st_mode & 07777));
}
