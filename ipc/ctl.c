/* The control socket: AF_UNIX SOCK_SEQPACKET, one session per connection.
 *
 * SEQPACKET keeps message boundaries (a short or long message is a protocol
 * error, not a partial read to reassemble) and reports the peer's hang-up,
 * which is how gorgond learns a client died. Credentials come from the kernel
 * (SO_PEERCRED), never from the messages. The client side bounds every wait
 * during the handshake so a server that never answers cannot hang it. */
#include <errno.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/common.h"
#include "ipc/ipc.h"
#include "ipc/ipc_int.h"

#define IPC_CTL_MAX_FDS 8 /* room to receive (and close) a few unexpected fds */
#define IPC_CTL_MAX_GROUPS 256

const char *ipc_socket_path(const char *explicit_path)
{
    if (explicit_path && explicit_path[0])
        return explicit_path;
    const char *env = getenv("GORGON_SOCKET");
    if (env && env[0])
        return env;
    return IPC_DEFAULT_SOCKET;
}

static int ctl_addr(const char *path, struct sockaddr_un *sa, socklen_t *len)
{
    if (!path || !path[0])
        return -EINVAL;
    size_t n = strlen(path);
    if (n >= sizeof(sa->sun_path))
        return -ENAMETOOLONG;
    memset(sa, 0, sizeof(*sa));
    sa->sun_family = AF_UNIX;
    memcpy(sa->sun_path, path, n + 1);
    *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + 1);
    return 0;
}

/* A socket file left by a dead daemon is removed; a live one (something
 * accepts connections) or a non-socket file is left alone. */
static int ctl_remove_stale(const char *path, const struct sockaddr_un *sa, socklen_t len)
{
    struct stat st;
    if (lstat(path, &st) != 0)
        return errno == ENOENT ? 0 : cm_neg_errno();
    if (!S_ISSOCK(st.st_mode))
        return -EEXIST;
    int probe = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (probe < 0)
        return cm_neg_errno();
    int rc = connect(probe, (const struct sockaddr *)sa, len);
    int err = errno;
    close(probe);
    if (rc == 0)
        return -EADDRINUSE;
    if (err != ECONNREFUSED && err != EPROTOTYPE)
        return -err;
    if (unlink(path) != 0 && errno != ENOENT)
        return cm_neg_errno();
    return 0;
}

int ipc_ctl_listen(const char *path, int backlog, unsigned mode, gid_t gid)
{
    struct sockaddr_un sa;
    socklen_t len;
    int rc = ctl_addr(path, &sa, &len);
    if (rc < 0)
        return rc;
    if (mode & ~0777u)
        return -EINVAL;
    rc = ctl_remove_stale(path, &sa, len);
    if (rc < 0) {
        CM_LOG_ERROR(IPC_TAG, "ctl: %s: %s", path,
                     rc == -EADDRINUSE ? "another server is listening"
                     : rc == -EEXIST   ? "exists and is not a socket"
                                       : cm_strerror(rc));
        return rc;
    }
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return cm_neg_errno();
    /* The file appears at bind with (0777 & ~umask); nobody can connect
     * before listen, by which time it has its final mode and group. */
    if (bind(fd, (const struct sockaddr *)&sa, len) != 0)
        goto fail;
    if (gid != (gid_t)-1 && chown(path, (uid_t)-1, gid) != 0)
        goto fail_unlink;
    if (chmod(path, mode) != 0)
        goto fail_unlink;
    if (listen(fd, backlog > 0 ? backlog : 64) != 0)
        goto fail_unlink;
    return fd;
fail_unlink:
    rc = cm_neg_errno();
    unlink(path);
    close(fd);
    CM_LOG_ERROR(IPC_TAG, "ctl: listen on %s (mode %04o, gid %d): %s", path, mode,
                 gid == (gid_t)-1 ? -1 : (int)gid, cm_strerror(rc));
    return rc;
fail:
    rc = cm_neg_errno();
    close(fd);
    CM_LOG_ERROR(IPC_TAG, "ctl: bind %s: %s", path, cm_strerror(rc));
    return rc;
}

int ipc_ctl_connect(const char *path)
{
    struct sockaddr_un sa;
    socklen_t len;
    int rc = ctl_addr(path, &sa, &len);
    if (rc < 0)
        return rc;
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return cm_neg_errno();
    if (connect(fd, (const struct sockaddr *)&sa, len) != 0) {
        rc = cm_neg_errno();
        close(fd);
        return rc;
    }
    return fd;
}

static bool ctl_gid_allowed(gid_t g, const ipc_allow *allow)
{
    for (size_t i = 0; allow && allow->gids && i < allow->n_gids; i++)
        if (allow->gids[i] == g)
            return true;
    return false;
}

int ipc_ctl_check_peer(int fd, const ipc_allow *allow, uid_t *uid, gid_t *gid, pid_t *pid)
{
    struct ucred cr;
    socklen_t len = sizeof(cr);
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &len) != 0)
        return cm_neg_errno();
    if (uid)
        *uid = cr.uid;
    if (gid)
        *gid = cr.gid;
    if (pid)
        *pid = cr.pid;
    if (cr.uid == 0 || cr.uid == geteuid())
        return 0;
    for (size_t i = 0; allow && allow->uids && i < allow->n_uids; i++)
        if (allow->uids[i] == cr.uid)
            return 0;
    if (!allow || !allow->gids || allow->n_gids == 0)
        return -EACCES;
    if (ctl_gid_allowed(cr.gid, allow))
        return 0;
    /* Supplementary groups as the kernel recorded them at connect time (a
     * peer in more than IPC_CTL_MAX_GROUPS groups gets ERANGE here and is
     * judged on its uid and primary gid only). */
    gid_t groups[IPC_CTL_MAX_GROUPS];
    socklen_t glen = sizeof(groups);
    if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups, &glen) == 0) {
        for (size_t i = 0; i < glen / sizeof(gid_t); i++)
            if (ctl_gid_allowed(groups[i], allow))
                return 0;
    }
    return -EACCES;
}

static int ctl_send(int sock, const void *buf, size_t len, const int *fds, size_t n_fds)
{
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
    union {
        char buf[CMSG_SPACE(sizeof(int) * 2)];
        struct cmsghdr align;
    } ctrl;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (n_fds > 2)
        return -EINVAL;
    if (n_fds > 0) {
        memset(&ctrl, 0, sizeof(ctrl));
        msg.msg_control = ctrl.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * n_fds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * n_fds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * n_fds);
    }
    ssize_t n;
    do
        n = sendmsg(sock, &msg, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return cm_neg_errno();
    return (size_t)n == len ? 0 : -EPROTO;
}

int ipc_ctl_send_welcome_wake(int sock, const struct ipc_welcome *w, int region_fd, int wake_fd)
{
    if (!w)
        return -EINVAL;
    struct ipc_welcome out = *w;
    out.magic = IPC_MAGIC;
    out.abi_version = IPC_ABI_VERSION;
    out.reason[sizeof(out.reason) - 1] = '\0';
    int fds[2];
    size_t n = 0;
    if (region_fd >= 0) {
        fds[n++] = region_fd;
        if (wake_fd >= 0)
            fds[n++] = wake_fd;
    }
    return ctl_send(sock, &out, sizeof(out), fds, n);
}

int ipc_ctl_send_welcome(int sock, const struct ipc_welcome *w, int region_fd)
{
    return ipc_ctl_send_welcome_wake(sock, w, region_fd, -1);
}

int ipc_ctl_recv_hello(int sock, struct ipc_hello *h)
{
    if (!h)
        return -EINVAL;
    /* One byte more than a hello so a longer message shows as MSG_TRUNC or
     * size mismatch. No control buffer: any fds the client tries to pass are
     * discarded (closed) by the kernel. */
    uint8_t buf[sizeof(struct ipc_hello) + 1];
    struct iovec iov = {.iov_base = buf, .iov_len = sizeof(buf)};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    ssize_t n;
    do
        n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return cm_neg_errno();
    if (n == 0)
        return -ECONNRESET;
    if ((size_t)n != sizeof(*h) || (msg.msg_flags & MSG_TRUNC))
        return -EPROTO;
    memcpy(h, buf, sizeof(*h));
    if (h->magic != IPC_MAGIC)
        return -EPROTO;
    if (h->abi_version != IPC_ABI_VERSION)
        return -EPROTONOSUPPORT;
    if (h->flags != 0 || h->rsvd != 0)
        return -EPROTO;
    return 0;
}

static void ctl_close_fds(const int *fds, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (fds[i] >= 0)
            close(fds[i]);
}

/* Receive one message of exactly len bytes into out and the fds riding with
 * it. Returns the number of fds stored in fds[] (each CLOEXEC, caller owns)
 * or -errno (nothing left open). */
static int ctl_recv(int sock, void *out, size_t len, int *fds)
{
    uint8_t buf[sizeof(struct ipc_welcome) + 1];
    if (len >= sizeof(buf))
        return -EINVAL;
    struct iovec iov = {.iov_base = buf, .iov_len = len + 1};
    union {
        char buf[CMSG_SPACE(sizeof(int) * IPC_CTL_MAX_FDS)];
        struct cmsghdr align;
    } ctrl;
    struct msghdr msg = {.msg_iov = &iov,
                         .msg_iovlen = 1,
                         .msg_control = ctrl.buf,
                         .msg_controllen = sizeof(ctrl.buf)};
    ssize_t n;
    do
        n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return errno == EAGAIN || errno == EWOULDBLOCK ? -ETIMEDOUT : cm_neg_errno();
    size_t nfd = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS || c->cmsg_len < CMSG_LEN(0))
            continue;
        size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < k; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
            if (nfd < IPC_CTL_MAX_FDS)
                fds[nfd++] = fd;
            else
                close(fd);
        }
    }
    int rc = 0;
    if (n == 0)
        rc = -ECONNRESET;
    else if ((size_t)n != len || (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)))
        rc = -EPROTO;
    if (rc < 0) {
        ctl_close_fds(fds, nfd);
        return rc;
    }
    memcpy(out, buf, len);
    return (int)nfd;
}

static int ctl_recv_welcome(int sock, struct ipc_welcome *w, int *fds)
{
    return ctl_recv(sock, w, sizeof(*w), fds);
}

/* SO_RCVTIMEO/SO_SNDTIMEO of IPC_CTL_HANDSHAKE_TIMEOUT_MS for the duration
 * of one exchange, the old values kept in *t for ctl_timeout_restore. */
struct ctl_timeouts {
    struct timeval rcv, snd;
    bool restore;
};

static int ctl_timeout_set(int sock, struct ctl_timeouts *t)
{
    socklen_t l1 = sizeof(t->rcv), l2 = sizeof(t->snd);
    t->restore = getsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &t->rcv, &l1) == 0 &&
                 getsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &t->snd, &l2) == 0;
    struct timeval tmo = {.tv_sec = IPC_CTL_HANDSHAKE_TIMEOUT_MS / 1000,
                          .tv_usec = (IPC_CTL_HANDSHAKE_TIMEOUT_MS % 1000) * 1000};
    if (setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tmo, sizeof(tmo)) != 0 ||
        setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &tmo, sizeof(tmo)) != 0)
        return cm_neg_errno();
    return 0;
}

static void ctl_timeout_restore(int sock, const struct ctl_timeouts *t)
{
    if (t->restore) {
        setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &t->rcv, sizeof(t->rcv));
        setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &t->snd, sizeof(t->snd));
    }
}

int ipc_ctl_send_fd(int sock, uint32_t kind, int fd)
{
    if (fd < 0)
        return -EINVAL;
    struct ipc_fd_msg m = {.magic = IPC_MAGIC, .kind = kind};
    struct iovec iov = {.iov_base = &m, .iov_len = sizeof(m)};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } ctrl;
    memset(&ctrl, 0, sizeof(ctrl));
    struct msghdr msg = {.msg_iov = &iov,
                         .msg_iovlen = 1,
                         .msg_control = ctrl.buf,
                         .msg_controllen = CMSG_SPACE(sizeof(int))};
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof(int));
    ssize_t n;
    do
        n = sendmsg(sock, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return cm_neg_errno();
    return (size_t)n == sizeof(m) ? 0 : -EPROTO;
}

int ipc_ctl_recv_fd(int sock, uint32_t kind)
{
    struct ctl_timeouts t;
    int rc = ctl_timeout_set(sock, &t);
    if (rc < 0)
        return rc;
    struct ipc_fd_msg m;
    int fds[IPC_CTL_MAX_FDS];
    int nfd = ctl_recv(sock, &m, sizeof(m), fds);
    ctl_timeout_restore(sock, &t);
    if (nfd < 0)
        return nfd;
    if (nfd != 1 || m.magic != IPC_MAGIC || m.kind != kind) {
        ctl_close_fds(fds, (size_t)nfd);
        return -EPROTO;
    }
    return fds[0];
}

int ipc_ctl_client_handshake_wake(int sock, struct ipc_welcome *w, int *wake_fd)
{
    if (!w)
        return -EINVAL;
    if (wake_fd)
        *wake_fd = -1;
    memset(w, 0, sizeof(*w));
    struct ctl_timeouts t;
    int trc = ctl_timeout_set(sock, &t);
    if (trc < 0)
        return trc;

    int fds[IPC_CTL_MAX_FDS];
    int nfd = 0, rc;
    struct ipc_hello h = {.magic = IPC_MAGIC, .abi_version = IPC_ABI_VERSION};
    rc = ctl_send(sock, &h, sizeof(h), NULL, 0);
    if (rc == -EAGAIN)
        rc = -ETIMEDOUT;
    /* A server that refuses at accept answers before reading the hello and
     * may close before it arrives (EPIPE): its reason is still queued. */
    if (rc < 0 && rc != -EPIPE && rc != -ECONNRESET)
        goto out;
    nfd = ctl_recv_welcome(sock, w, fds);
    if (nfd == -ECONNRESET)
        /* Closing a socket with unread input resets the peer, and the reset
         * is reported before the data queued ahead of it (once): the
         * server's welcome, refusal included, is read on the second try. */
        nfd = ctl_recv_welcome(sock, w, fds);
    if (nfd < 0) {
        rc = nfd;
        nfd = 0;
        goto out;
    }
    w->reason[sizeof(w->reason) - 1] = '\0';
    if (w->magic != IPC_MAGIC) {
        rc = -EPROTO;
        snprintf(w->reason, sizeof(w->reason), "bad welcome magic");
    } else if (w->abi_version != IPC_ABI_VERSION) {
        rc = -EPROTONOSUPPORT;
        if (w->status == 0)
            snprintf(w->reason, sizeof(w->reason), "server abi_version %u, ours %u", w->abi_version,
                     IPC_ABI_VERSION);
    } else if (w->status < 0) {
        /* a refusal: pass the server's code on, if it is a plausible errno */
        rc = w->status >= -4095 ? w->status : -EPROTO;
    } else if (w->status > 0) {
        rc = -EPROTO;
        snprintf(w->reason, sizeof(w->reason), "welcome status > 0");
    } else if (nfd < 1) {
        rc = -EPROTO;
        snprintf(w->reason, sizeof(w->reason), "welcome without a region fd");
    } else {
        rc = fds[0];
        fds[0] = -1;
        if (wake_fd && nfd >= 2) {
            *wake_fd = fds[1];
            fds[1] = -1;
        }
    }
out:
    ctl_close_fds(fds, (size_t)nfd);
    ctl_timeout_restore(sock, &t);
    return rc;
}

int ipc_ctl_client_handshake(int sock, struct ipc_welcome *w)
{
    return ipc_ctl_client_handshake_wake(sock, w, NULL);
}
