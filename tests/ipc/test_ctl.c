/* Control socket: path selection, listen/connect, the hello/welcome
 * handshake over a real socket (allowed and refused peers, by uid and gid),
 * fd passing, malformed messages, and a server that never answers. */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/common.h"
#include "ipc/ipc.h"
#include "tests/ipc/util/ipc_test_util.h"

#define NOBODY 65534

static char dir[64], sock_path[128];

static void mk_dir(void)
{
    snprintf(dir, sizeof(dir), "/tmp/gorgon-ctl-XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    chmod(dir, 0755); /* reachable by the setuid(nobody) children */
    snprintf(sock_path, sizeof(sock_path), "%s/gorgon.sock", dir);
}

static void rm_dir(void)
{
    unlink(sock_path);
    rmdir(dir);
}

static int accept_ms(int lfd, int ms)
{
    struct pollfd p = {.fd = lfd, .events = POLLIN};
    if (poll(&p, 1, ms) != 1)
        return -1;
    return accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
}

static int raw_send(int sock, const void *buf, size_t len, const int *fds, size_t nfd)
{
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
    union {
        char b[CMSG_SPACE(sizeof(int) * 4)];
        struct cmsghdr a;
    } ctrl;
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1};
    if (nfd) {
        memset(&ctrl, 0, sizeof(ctrl));
        m.msg_control = ctrl.b;
        m.msg_controllen = CMSG_SPACE(sizeof(int) * nfd);
        struct cmsghdr *c = CMSG_FIRSTHDR(&m);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * nfd);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * nfd);
    }
    return (int)sendmsg(sock, &m, MSG_NOSIGNAL);
}

static void spair(int sv[2])
{
    cr_assert_eq(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv), 0);
}

static struct ipc_welcome welcome_ok(void)
{
    struct ipc_welcome w;
    memset(&w, 0, sizeof(w));
    w.magic = IPC_MAGIC;
    w.abi_version = IPC_ABI_VERSION;
    w.session_id = 3;
    w.region_bytes = 4096;
    return w;
}

Test(ipc_ctl, socket_path_explicit_then_env_then_default)
{
    unsetenv("GORGON_SOCKET");
    cr_expect_str_eq(ipc_socket_path(NULL), IPC_DEFAULT_SOCKET);
    cr_expect_str_eq(ipc_socket_path(""), IPC_DEFAULT_SOCKET);
    setenv("GORGON_SOCKET", "/tmp/env.sock", 1);
    cr_expect_str_eq(ipc_socket_path(NULL), "/tmp/env.sock");
    cr_expect_str_eq(ipc_socket_path("/tmp/x.sock"), "/tmp/x.sock");
    setenv("GORGON_SOCKET", "", 1);
    cr_expect_str_eq(ipc_socket_path(NULL), IPC_DEFAULT_SOCKET);
    unsetenv("GORGON_SOCKET");
}

Test(ipc_ctl, listen_handles_stale_live_and_foreign_paths)
{
    mk_dir();
    cr_expect_eq(ipc_ctl_connect(sock_path), -ENOENT, "no daemon yet");
    int l1 = ipc_ctl_listen(sock_path, 8, 0666, (gid_t)-1);
    cr_assert_geq(l1, 0);
    cr_expect(fcntl(l1, F_GETFL) & O_NONBLOCK);
    cr_expect(fcntl(l1, F_GETFD) & FD_CLOEXEC);
    cr_expect_eq(ipc_ctl_listen(sock_path, 8, 0666, (gid_t)-1), -EADDRINUSE, "a live server keeps its path");
    close(l1); /* leaves a stale socket file behind */
    cr_expect_eq(ipc_ctl_connect(sock_path), -ECONNREFUSED);
    int l2 = ipc_ctl_listen(sock_path, 8, 0666, (gid_t)-1);
    cr_expect_geq(l2, 0, "stale socket file replaced: %d", l2);
    close(l2);
    unlink(sock_path);
    int f = open(sock_path, O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
    close(f);
    cr_expect_eq(ipc_ctl_listen(sock_path, 8, 0666, (gid_t)-1), -EEXIST, "a regular file is never removed");
    char long_path[200];
    memset(long_path, 'a', sizeof(long_path) - 1);
    long_path[sizeof(long_path) - 1] = 0;
    cr_expect_eq(ipc_ctl_listen(long_path, 8, 0666, (gid_t)-1), -ENAMETOOLONG);
    cr_expect_eq(ipc_ctl_connect(long_path), -ENAMETOOLONG);
    rm_dir();
}

/* Client child: connect, handshake, map, push one SQE carrying the session
 * id. Exit codes say which step failed. */
static int client_main(void)
{
    int s = ipc_ctl_connect(sock_path);
    if (s < 0)
        return 10;
    struct ipc_welcome w;
    int fd = ipc_ctl_client_handshake(s, &w);
    if (fd < 0)
        return 11;
    ipc_region reg;
    if (ipc_region_map(&reg, fd) != 0)
        return 12;
    ipc_ring sq;
    if (ipc_region_sq(&reg, IPC_RING_PRODUCER, &sq) != 0)
        return 13;
    struct ipc_sqe d = {.opcode = IPC_OP_PING, .user_data = w.session_id};
    if (ipc_ring_push(&sq, &d) != 0)
        return 14;
    ipc_region_unmap(&reg);
    close(s);
    return 0;
}

Test(ipc_ctl, handshake_allowed_peer_gets_working_region, .timeout = 20)
{
    mk_dir();
    int l = ipc_ctl_listen(sock_path, 8, 0666, (gid_t)-1);
    cr_assert_geq(l, 0);
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0)
        _exit(client_main());
    int c = accept_ms(l, 5000);
    cr_assert_geq(c, 0);
    uid_t uid;
    gid_t gid;
    pid_t ppid;
    cr_expect_eq(ipc_ctl_check_peer(c, NULL, &uid, &gid, &ppid), 0);
    cr_expect_eq(ppid, pid);
    cr_expect_eq(uid, geteuid());
    struct ipc_hello h;
    cr_assert_eq(ipc_ctl_recv_hello(c, &h), 0);
    ipc_region reg;
    ipc_region_cfg cfg = {.sq_entries = 8, .cq_entries = 8, .n_slots = 2, .slot_in_bytes = 64,
                          .slot_out_bytes = 64, .session_id = 9, .numa_node = -1};
    cr_assert_eq(ipc_region_create(&reg, &cfg), 0);
    struct ipc_welcome w = {.session_id = 9, .region_bytes = reg.size};
    cr_assert_eq(ipc_ctl_send_welcome(c, &w, reg.fd), 0);
    cr_expect_eq(itu_wait_child(pid, 10000), 0, "client step failed");
    ipc_ring sq;
    cr_assert_eq(ipc_region_sq(&reg, IPC_RING_CONSUMER, &sq), 0);
    struct ipc_sqe d;
    cr_expect_eq(ipc_ring_pop(&sq, &d), 1, "the client's SQE is in our region");
    cr_expect_eq(d.user_data, 9u);
    char b;
    cr_expect_eq(read(c, &b, 1), 0, "hang-up seen after the client exits");
    ipc_region_unmap(&reg);
    close(c);
    close(l);
    rm_dir();
}

/* Child that drops to uid/gid, connects and runs the handshake; it exits 0
 * when the outcome matches want (refusal with a reason, or a region fd). */
static pid_t spawn_as(uid_t uid, gid_t gid, int want)
{
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid)
        return pid;
    if (setgroups(0, NULL) != 0 || setgid(gid) != 0 || setuid(uid) != 0)
        _exit(20);
    int s = ipc_ctl_connect(sock_path);
    if (s < 0)
        _exit(21);
    struct ipc_welcome w;
    int rc = ipc_ctl_client_handshake(s, &w);
    if (want < 0)
        _exit(rc == want && strstr(w.reason, "not allowed") ? 0 : 22);
    _exit(rc >= 0 ? 0 : 23);
}

/* Server side of one connection: check the peer, answer accordingly.
 * Returns check_peer's result. */
static int serve_one(int l, const ipc_allow *allow, uid_t *uid)
{
    int c = accept_ms(l, 5000);
    cr_assert_geq(c, 0);
    int ok = ipc_ctl_check_peer(c, allow, uid, NULL, NULL);
    struct ipc_hello h;
    cr_assert_eq(ipc_ctl_recv_hello(c, &h), 0);
    struct ipc_welcome w = welcome_ok();
    int fd = -1;
    ipc_region reg = {0};
    if (ok < 0) {
        w.status = ok;
        snprintf(w.reason, sizeof(w.reason), "uid %u not allowed", (unsigned)*uid);
    } else {
        ipc_region_cfg cfg = {.sq_entries = 2, .cq_entries = 2, .numa_node = -1};
        cr_assert_eq(ipc_region_create(&reg, &cfg), 0);
        fd = reg.fd;
    }
    cr_assert_eq(ipc_ctl_send_welcome(c, &w, fd), 0);
    if (fd >= 0)
        ipc_region_unmap(&reg);
    close(c);
    return ok;
}

Test(ipc_ctl, handshake_refuses_uid_not_on_allow_list, .timeout = 30)
{
    if (geteuid() != 0)
        cr_skip_test("needs root to setuid(%d) in a child", NOBODY);
    mk_dir();
    int l = ipc_ctl_listen(sock_path, 8, 0666, (gid_t)-1);
    cr_assert_geq(l, 0);
    uid_t uid = 0;

    /* empty allow-list: only root and our own uid */
    pid_t pid = spawn_as(NOBODY, NOBODY, -EACCES);
    cr_expect_eq(serve_one(l, NULL, &uid), -EACCES);
    cr_expect_eq(uid, (uid_t)NOBODY);
    cr_expect_eq(itu_wait_child(pid, 10000), 0, "refused client did not see -EACCES + reason");

    /* a list that names other ids still refuses */
    uid_t other_u[] = {1234};
    gid_t other_g[] = {4321};
    ipc_allow other = {.uids = other_u, .n_uids = 1, .gids = other_g, .n_gids = 1};
    pid = spawn_as(NOBODY, NOBODY, -EACCES);
    cr_expect_eq(serve_one(l, &other, &uid), -EACCES);
    cr_expect_eq(itu_wait_child(pid, 10000), 0);

    /* allowed by uid */
    uid_t nob_u[] = {1234, NOBODY};
    ipc_allow by_uid = {.uids = nob_u, .n_uids = 2};
    pid = spawn_as(NOBODY, NOBODY, 0);
    cr_expect_eq(serve_one(l, &by_uid, &uid), 0);
    cr_expect_eq(itu_wait_child(pid, 10000), 0, "allowed client did not get a region");

    /* allowed by primary gid */
    gid_t nob_g[] = {NOBODY};
    ipc_allow by_gid = {.gids = nob_g, .n_gids = 1};
    pid = spawn_as(NOBODY, NOBODY, 0);
    cr_expect_eq(serve_one(l, &by_gid, &uid), 0);
    cr_expect_eq(itu_wait_child(pid, 10000), 0);

    close(l);
    rm_dir();
}

Test(ipc_ctl, client_times_out_when_server_never_answers, .timeout = 20)
{
    int sv[2];
    spair(sv);
    struct ipc_welcome w;
    uint64_t t0 = cm_now_ns();
    cr_expect_eq(ipc_ctl_client_handshake(sv[0], &w), -ETIMEDOUT);
    uint64_t ms = (cm_now_ns() - t0) / 1000000;
    cr_expect(ms >= IPC_CTL_HANDSHAKE_TIMEOUT_MS - 100 && ms < IPC_CTL_HANDSHAKE_TIMEOUT_MS + 3000,
              "gave up after %llu ms", (unsigned long long)ms);
    struct timeval tv;
    socklen_t len = sizeof(tv);
    getsockopt(sv[0], SOL_SOCKET, SO_RCVTIMEO, &tv, &len);
    cr_expect(tv.tv_sec == 0 && tv.tv_usec == 0, "timeout restored afterwards");
    close(sv[0]);
    close(sv[1]);
}

/* Queue `msg` (+fds) on the server end, run the client handshake. */
static int handshake_against(const void *msg, size_t len, const int *fds, size_t nfd,
                             struct ipc_welcome *w, int *wake)
{
    int sv[2];
    spair(sv);
    cr_assert_eq(raw_send(sv[1], msg, len, fds, nfd), (int)len);
    int rc = wake ? ipc_ctl_client_handshake_wake(sv[0], w, wake) : ipc_ctl_client_handshake(sv[0], w);
    struct ipc_hello h;
    cr_expect_eq(ipc_ctl_recv_hello(sv[1], &h), 0, "client sent a proper hello");
    close(sv[0]);
    close(sv[1]);
    return rc;
}

Test(ipc_ctl, client_rejects_malformed_welcomes, .timeout = 10)
{
    struct ipc_welcome w = welcome_ok(), got;
    int mfd = memfd_create("r", MFD_CLOEXEC);
    cr_assert_geq(mfd, 0);
    int base = itu_count_fds();

    cr_expect_eq(handshake_against(&w, sizeof(w) - 1, &mfd, 1, &got, NULL), -EPROTO, "short");
    uint8_t big[sizeof(w) + 8] = {0};
    memcpy(big, &w, sizeof(w));
    cr_expect_eq(handshake_against(big, sizeof(big), &mfd, 1, &got, NULL), -EPROTO, "long");
    struct ipc_welcome b = w;
    b.magic = 0x12345678;
    cr_expect_eq(handshake_against(&b, sizeof(b), &mfd, 1, &got, NULL), -EPROTO, "magic");
    b = w;
    b.abi_version = 99;
    cr_expect_eq(handshake_against(&b, sizeof(b), &mfd, 1, &got, NULL), -EPROTONOSUPPORT);
    cr_expect_neq(got.reason[0], 0, "version mismatch explained");
    b = w;
    cr_expect_eq(handshake_against(&b, sizeof(b), NULL, 0, &got, NULL), -EPROTO, "no fd");
    b = w;
    b.status = 7;
    cr_expect_eq(handshake_against(&b, sizeof(b), &mfd, 1, &got, NULL), -EPROTO, "status > 0");
    b = w;
    b.status = -EUSERS;
    memset(b.reason, 'x', sizeof(b.reason)); /* not terminated */
    cr_expect_eq(handshake_against(&b, sizeof(b), &mfd, 1, &got, NULL), -EUSERS);
    cr_expect_eq(strlen(got.reason), sizeof(got.reason) - 1, "reason terminated");
    b.status = -100000;
    cr_expect_eq(handshake_against(&b, sizeof(b), NULL, 0, &got, NULL), -EPROTO, "absurd errno");
    cr_expect_eq(itu_count_fds(), base, "every fd received on error was closed");

    /* success with two extra fds: only the region fd survives */
    int extra[3] = {mfd, mfd, mfd};
    int fd = handshake_against(&w, sizeof(w), extra, 3, &got, NULL);
    cr_expect_geq(fd, 0);
    cr_expect_eq(itu_count_fds(), base + 1, "extra fds closed");
    cr_expect(fcntl(fd, F_GETFD) & FD_CLOEXEC, "received fd is CLOEXEC");
    cr_expect_eq(got.session_id, 3u);
    close(fd);
    close(mfd);
}

Test(ipc_ctl, wake_eventfd_travels_with_the_region, .timeout = 10)
{
    int sv[2];
    spair(sv);
    int mfd = memfd_create("r", MFD_CLOEXEC);
    int efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    struct ipc_welcome w = welcome_ok(), got;
    cr_assert_eq(ipc_ctl_send_welcome_wake(sv[1], &w, mfd, efd), 0);
    int wake = -2;
    int fd = ipc_ctl_client_handshake_wake(sv[0], &got, &wake);
    cr_assert_geq(fd, 0);
    cr_assert_geq(wake, 0, "wake fd received");
    uint64_t one = 1, v = 0;
    cr_expect_eq(write(wake, &one, 8), 8);
    cr_expect_eq(read(efd, &v, 8), 8, "same eventfd on both sides");
    close(wake);
    close(fd);
    /* without a wake fd the out-parameter says -1 */
    cr_assert_eq(ipc_ctl_send_welcome(sv[1], &w, mfd), 0);
    fd = ipc_ctl_client_handshake_wake(sv[0], &got, &wake);
    cr_expect_geq(fd, 0);
    cr_expect_eq(wake, -1);
    close(fd);
    close(mfd);
    close(efd);
    close(sv[0]);
    close(sv[1]);
}

Test(ipc_ctl, server_rejects_malformed_hellos)
{
    int sv[2];
    spair(sv);
    struct ipc_hello ok = {.magic = IPC_MAGIC, .abi_version = IPC_ABI_VERSION}, h, b;
    int base = itu_count_fds();
    int mfd = memfd_create("smuggled", MFD_CLOEXEC);

    cr_assert_eq(raw_send(sv[0], &ok, sizeof(ok), &mfd, 1), (int)sizeof(ok));
    close(mfd);
    cr_expect_eq(ipc_ctl_recv_hello(sv[1], &h), 0);
    cr_expect_eq(itu_count_fds(), base, "fds a client attaches are not installed in the server");
    cr_assert_eq(raw_send(sv[0], &ok, sizeof(ok) - 4, NULL, 0), (int)sizeof(ok) - 4);
    cr_expect_eq(ipc_ctl_recv_hello(sv[1], &h), -EPROTO, "short");
    uint8_t big[64] = {0};
    memcpy(big, &ok, sizeof(ok));
    cr_assert_eq(raw_send(sv[0], big, sizeof(big), NULL, 0), (int)sizeof(big));
    cr_expect_eq(ipc_ctl_recv_hello(sv[1], &h), -EPROTO, "long");
    b = ok; b.magic = 1;
    raw_send(sv[0], &b, sizeof(b), NULL, 0);
    cr_expect_eq(ipc_ctl_recv_hello(sv[1], &h), -EPROTO, "magic");
    b = ok; b.abi_version = IPC_ABI_VERSION + 1;
    raw_send(sv[0], &b, sizeof(b), NULL, 0);
    cr_expect_eq(ipc_ctl_recv_hello(sv[1], &h), -EPROTONOSUPPORT, "version");
    b = ok; b.flags = 1;
    raw_send(sv[0], &b, sizeof(b), NULL, 0);
    cr_expect_eq(ipc_ctl_recv_hello(sv[1], &h), -EPROTO, "flags");
    close(sv[0]);
    cr_expect_eq(ipc_ctl_recv_hello(sv[1], &h), -ECONNRESET, "peer gone");
    close(sv[1]);
}
