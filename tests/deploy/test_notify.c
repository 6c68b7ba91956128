/* gorgond under Type=notify (deploy/gorgond.service): with NOTIFY_SOCKET
 * set it stays in the foreground and its main pid tells the service manager
 * STATUS=loading, then READY=1 only once the socket listens and the worker
 * has loaded the model (a client can generate at once), and STOPPING=1 when
 * SIGTERM starts the shutdown. The service manager is played by a datagram
 * socket here, which checks the sender's pid as systemd's NotifyAccess=main
 * does. */
#include <criterion/criterion.h>
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "clients/gorgon.h"
#include "tests/clients/util/gd_proc.h"
#include "tests/util/test_models.h"

static char dir[64];
static char notify_path[96], sock_path[96];
static int nfd = -1;
static pid_t pid = -1;

static void cleanup(void)
{
    if (pid > 0) {
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        pid = -1;
    }
    if (nfd >= 0)
        close(nfd);
    nfd = -1;
    if (dir[0]) {
        unlink(notify_path);
        unlink(sock_path);
        rmdir(dir);
        dir[0] = '\0';
    }
}

/* The service manager's end: a datagram socket that receives credentials. */
static void listen_notify(void)
{
    snprintf(dir, sizeof(dir), "/tmp/gorgon-notify-XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    snprintf(notify_path, sizeof(notify_path), "%s/notify", dir);
    snprintf(sock_path, sizeof(sock_path), "%s/gorgond.sock", dir);
    nfd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    cr_assert_geq(nfd, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", notify_path);
    cr_assert_eq(bind(nfd, (struct sockaddr *)&sa, sizeof(sa)), 0, "bind: %s", strerror(errno));
    int one = 1;
    cr_assert_eq(setsockopt(nfd, SOL_SOCKET, SO_PASSCRED, &one, sizeof(one)), 0);
}

/* gorgond WITHOUT --foreground: NOTIFY_SOCKET alone must keep it there. */
static void start(const char *model)
{
    char bin[PATH_MAX];
    cr_assert_eq(gd_find_binary(bin, sizeof(bin)), 0, "no gorgond binary");
    pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        setenv("NOTIFY_SOCKET", notify_path, 1);
        if (model)
            execl(bin, bin, "--socket", sock_path, "--log-level", "error", "--model", model,
                  (char *)NULL);
        else
            execl(bin, bin, "--socket", sock_path, "--log-level", "error", (char *)NULL);
        _exit(127);
    }
}

/* The next notification (NUL-terminated in msg); fails after timeout_ms or
 * when it does not come from gorgond's own pid. */
static void next_msg(char *msg, size_t cap, int timeout_ms)
{
    struct pollfd p = {.fd = nfd, .events = POLLIN};
    int rc = poll(&p, 1, timeout_ms);
    cr_assert_eq(rc, 1, "no notification from gorgond within %d ms", timeout_ms);
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(struct ucred))];
    } ctl;
    struct iovec iov = {.iov_base = msg, .iov_len = cap - 1};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = &ctl,
                        .msg_controllen = sizeof(ctl)};
    ssize_t n = recvmsg(nfd, &mh, 0);
    cr_assert_gt(n, 0, "recvmsg: %s", strerror(errno));
    msg[n] = '\0';
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    cr_assert(c && c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_CREDENTIALS,
              "no sender credentials");
    struct ucred cred;
    memcpy(&cred, CMSG_DATA(c), sizeof(cred));
    cr_assert_eq(cred.pid, pid, "'%s' came from pid %d, not gorgond's main pid %d", msg,
                 (int)cred.pid, (int)pid);
}

/* Wait for a message holding `want`; every one before it must be a STATUS=
 * line (no READY=1 early). */
static void expect(const char *want, char *msg, size_t cap, int timeout_ms)
{
    for (;;) {
        next_msg(msg, cap, timeout_ms);
        if (strstr(msg, want))
            return;
        cr_assert(!strncmp(msg, "STATUS=", 7), "'%s' before '%s'", msg, want);
    }
}

static void stop_and_expect_stopping(void)
{
    char msg[512];
    cr_assert_eq(kill(pid, SIGTERM), 0);
    expect("STOPPING=1", msg, sizeof(msg), 10000);
    int st;
    cr_assert_eq(waitpid(pid, &st, 0), pid);
    pid = -1;
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "gorgond exit status %d after SIGTERM", st);
}

Test(deploy_notify, ready_after_the_model_is_loaded_then_stopping, .fini = cleanup,
     .timeout = 120)
{
    listen_notify();
    const char *model = tu_model_path("stories260K/stories260K.gguf");
    start(model);
    char msg[512];
    next_msg(msg, sizeof(msg), 30000);
    cr_assert_not_null(strstr(msg, "STATUS=loading"), "first notification: '%s'", msg);
    expect("READY=1", msg, sizeof(msg), 60000);
    cr_assert_not_null(strstr(msg, "STATUS=serving"), "READY without its status: '%s'", msg);

    /* Ready means ready: the socket listens, the worker has its KV pool, and
     * a request is served without waiting for a model load. */
    gorgon_opts o = {.socket_path = sock_path};
    gorgon_client *cli = NULL;
    int rc = gorgon_connect(&cli, &o);
    cr_assert_eq(rc, 0, "connect right after READY=1: %s", gorgon_strerror(rc));
    gorgon_counters st;
    cr_assert_eq(gorgon_stats(cli, &st), 0);
    cr_assert_gt(st.kv_blocks_total, 0, "READY=1 before the worker reported its KV pool");
    gorgon_gen_params gp = {.prompt = "Once upon a time", .max_tokens = 8};
    uint32_t req;
    cr_assert_eq(gorgon_generate_submit(cli, &gp, 1, &req), 0);
    gorgon_gen_chunk ch;
    while ((rc = gorgon_generate_next(cli, req, &ch, 10000000000ll)) == 1) {
    }
    cr_assert_eq(rc, 0, "generation right after READY=1: %s", gorgon_strerror(rc));
    gorgon_close(cli);

    stop_and_expect_stopping();
}

Test(deploy_notify, ready_at_once_without_a_model, .fini = cleanup, .timeout = 60)
{
    listen_notify();
    start(NULL);
    char msg[512];
    expect("READY=1", msg, sizeof(msg), 20000);
    cr_assert_not_null(strstr(msg, "no model"), "'%s'", msg);
    cr_assert(gd_listening(sock_path), "READY=1 before the socket listens");
    stop_and_expect_stopping();
}
