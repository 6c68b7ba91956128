/* gorgon_event_fd / gorgon_event_arm against a real gorgond: an epoll loop
 * driven only by the fd streams the same text as the blocking API, an armed
 * fd stays quiet until a completion is posted, gorgond's death makes it
 * readable and the next arm fail, and gorgond hands out one fd per session. */
#include <criterion/criterion.h>
#include <poll.h>
#include <string.h>
#include <sys/epoll.h>

#include "clients/gorgon.h"
#include "tests/clients/util/gd_proc.h"
#include "tests/util/test_models.h"

static gd_proc gd;

static void teardown(void)
{
    gd_stop(&gd);
}

static void start(const char *model)
{
    int rc = model ? gd_start(&gd, "--model", model, NULL) : gd_start(&gd, NULL);
    if (rc == -ENOENT)
        cr_skip_test("gorgond not built: run `make build/bin/gorgond`");
    cr_assert_eq(rc, 0, "gorgond did not start: %s", strerror(-rc));
}

static bool readable(int fd, int timeout_ms)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    return poll(&p, 1, timeout_ms) == 1;
}

/* Text of a greedy generation through the blocking API. */
static size_t blocking_text(gorgon_client *cli, const gorgon_gen_params *gp, char *out, size_t cap)
{
    uint32_t req;
    cr_assert_eq(gorgon_generate_submit(cli, gp, 1, &req), 0, "%s", gorgon_last_error(cli));
    size_t n = 0;
    gorgon_gen_chunk ch;
    int rc;
    while ((rc = gorgon_generate_next(cli, req, &ch, 10000000000ll)) == 1) {
        cr_assert_lt(n + ch.len, cap);
        memcpy(out + n, ch.text, ch.len);
        n += ch.len;
    }
    cr_assert_eq(rc, 0, "blocking stream ended with %d", rc);
    return n;
}

Test(clients_event_fd, epoll_loop_streams_what_the_blocking_api_does, .fini = teardown,
     .timeout = 60)
{
    start(tu_model_path("stories260K/stories260K.gguf"));
    gorgon_client *cli = gd_connect(&gd, 0);
    gorgon_gen_params gp = {.prompt = "Once upon a time", .max_tokens = 64};
    char want[8192], got[8192];
    size_t nw = blocking_text(cli, &gp, want, sizeof(want));
    cr_assert_gt(nw, 0);

    int fd = gorgon_event_fd(cli);
    cr_assert_geq(fd, 0, "gorgon_event_fd: %d (%s)", fd, gorgon_strerror(fd));
    cr_assert_eq(gorgon_event_fd(cli), fd, "a second call returns the same fd");
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN};
    cr_assert_eq(epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev), 0);

    uint32_t req;
    cr_assert_eq(gorgon_generate_submit(cli, &gp, 2, &req), 0);
    size_t n = 0;
    unsigned sleeps = 0;
    bool done = false;
    while (!done) {
        /* Reap everything there is without waiting, then arm. */
        gorgon_gen_chunk ch;
        int rc;
        while ((rc = gorgon_generate_next(cli, req, &ch, 0)) == 1) {
            cr_assert_lt(n + ch.len, sizeof(got));
            memcpy(got + n, ch.text, ch.len);
            n += ch.len;
        }
        if (rc != -ETIMEDOUT) {
            cr_assert_eq(rc, 0, "stream ended with %d", rc);
            done = true;
            break;
        }
        int arm = gorgon_event_arm(cli);
        cr_assert_geq(arm, 0, "arm: %d", arm);
        if (arm == 1)
            continue;
        struct epoll_event out;
        int k = epoll_wait(ep, &out, 1, 10000);
        cr_assert_eq(k, 1, "no wake-up within 10 s (the stream had %zu bytes)", n);
        sleeps++;
    }
    close(ep);
    cr_assert_eq(n, nw);
    cr_assert_eq(memcmp(got, want, n), 0, "event-loop text differs from the blocking one");
    cr_assert_gt(sleeps, 0, "the loop never slept on the fd: the test proved nothing");
    gorgon_close(cli);
    GD_END(&gd);
}

Test(clients_event_fd, armed_fd_is_quiet_until_a_completion, .fini = teardown, .timeout = 30)
{
    start(NULL);
    gorgon_client *cli = gd_connect(&gd, 0);
    cr_assert_eq(gorgon_event_arm(cli), -EINVAL, "arm before gorgon_event_fd");
    int fd = gorgon_event_fd(cli);
    cr_assert_geq(fd, 0);
    for (int round = 0; round < 3; round++) {
        cr_assert_eq(gorgon_event_arm(cli), 0, "nothing in flight: armed");
        cr_assert(!readable(fd, 50), "round %d: readable with nothing posted", round);
        cr_assert_eq(gorgon_submit_ping(cli, "x", 1, 7), 0);
        cr_assert(readable(fd, 5000), "round %d: no wake-up for a ping", round);
        gorgon_completion c;
        cr_assert_eq(gorgon_poll(cli, &c, 1), 1);
        cr_assert_eq(c.user_data, 7);
        cr_assert_eq(c.result, 1);
    }
    /* Not armed: a completion may still be posted without a write, and the
     * blocking calls sleep on the fd rather than the futex. */
    uint64_t rtt;
    cr_assert_eq(gorgon_ping(cli, "abc", 3, 2000000000, &rtt), 3);
    /* gorgond gives one fd per session: a raw second request is refused
     * without a message on the socket (the session stays healthy). */
    gorgon_request rq = {.opcode = 8 /* IPC_OP_EVENT_FD */, .slot = 0, .user_data = 9};
    int slot = gorgon_slot_acquire(cli);
    cr_assert_geq(slot, 0);
    rq.slot = (uint32_t)slot;
    cr_assert_eq(gorgon_submit(cli, &rq), 0);
    gorgon_completion c;
    cr_assert_eq(gorgon_wait(cli, &c, 1, 2000000000), 1);
    cr_assert_eq(c.result, -EALREADY);
    cr_assert_eq(gorgon_slot_release(cli, (uint32_t)slot), 0);
    cr_assert_eq(gorgon_ping(cli, "abc", 3, 2000000000, &rtt), 3, "session still healthy");
    gorgon_close(cli);
    GD_END(&gd);
}

Test(clients_event_fd, gorgond_death_wakes_the_fd_and_fails_the_arm, .fini = teardown,
     .timeout = 30)
{
    start(NULL);
    gorgon_client *cli = gd_connect(&gd, 0);
    int fd = gorgon_event_fd(cli);
    cr_assert_geq(fd, 0);
    cr_assert_eq(gorgon_event_arm(cli), 0);
    kill(gd.pid, SIGKILL);
    waitpid(gd.pid, NULL, 0);
    gd.pid = -1;
    cr_assert(readable(fd, 5000), "gorgond's death did not wake the fd");
    int arm = gorgon_event_arm(cli);
    cr_assert_eq(arm, -EPIPE, "arm after gorgond died: %d", arm);
    gorgon_close(cli);
}
