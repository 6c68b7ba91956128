/* gorgond's one io_uring loop.
 *
 *   for (;;) {
 *       reap io_uring completions (accept, hello, hang-up, signals, timer)
 *       serve every live session's SQ
 *       work seen in the last poll_us? -> spin again
 *       else: arm FUTEX_WAIT on every SQ doorbell (NEED_WAKEUP set) and
 *             sleep in io_uring_submit_and_wait
 *   }
 *
 * Busy-polling keeps a round trip at the cost of two cache-line transfers
 * while traffic flows; the futex sleep gives the core back when it stops. */
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "appliance/ap_int.h"
#include "common/common.h"

#define TAG "gorgond"
#define AP_RING_ENTRIES 1024u
#define AP_HELLO_TIMEOUT_S 2

struct io_uring_sqe *ap_get_sqe(struct ap_server *srv)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&srv->ring);
    if (sqe)
        return sqe;
    int rc = io_uring_submit(&srv->ring);
    sqe = io_uring_get_sqe(&srv->ring);
    if (!sqe)
        CM_LOG_ERROR(TAG, "io_uring submission queue stuck: %s",
                     cm_strerror(rc < 0 ? rc : -EBUSY));
    return sqe;
}

/* Only the default socket's directory (/run/gorgon) is created when
 * missing: a mistyped --socket must not make gorgond, often root, create
 * directories anywhere. -ENOENT when another socket's directory is missing. */
static int make_socket_dir(const char *path)
{
    char dir[AP_PATH_MAX];
    snprintf(dir, sizeof(dir), "%s", path);
    char *slash = strrchr(dir, '/');
    if (!slash || slash == dir)
        return 0;
    *slash = '\0';
    struct stat sb;
    if (stat(dir, &sb) == 0)
        return S_ISDIR(sb.st_mode) ? 0 : -ENOTDIR;
    const char *def = IPC_DEFAULT_SOCKET;
    size_t dlen = (size_t)(strrchr(def, '/') - def);
    if (strlen(dir) != dlen || strncmp(dir, def, dlen) != 0)
        return -ENOENT;
    if (mkdir(dir, 0755) < 0 && errno != EEXIST)
        return cm_neg_errno();
    return 0;
}

/* The socket's group: socket_group (a name or a number), else the group
 * "gorgon" when the system has one (the installer creates it), else
 * gorgond's own ((gid_t)-1). */
static int socket_gid(const ap_config *cfg, gid_t *gid)
{
    *gid = (gid_t)-1;
    const char *name = cfg->socket_group[0] ? cfg->socket_group : "gorgon";
    struct group *gr = getgrnam(name);
    if (gr) {
        *gid = gr->gr_gid;
        return 0;
    }
    if (!cfg->socket_group[0])
        return 0;
    char *end;
    errno = 0;
    unsigned long v = strtoul(name, &end, 10);
    if (!errno && end != name && !*end && v < (gid_t)-1 && name[0] != '-') {
        *gid = (gid_t)v;
        return 0;
    }
    CM_LOG_ERROR(TAG, "socket_group '%s': no such group", name);
    return -EINVAL;
}

static void arm_accept(struct ap_server *srv)
{
    struct io_uring_sqe *sqe = ap_get_sqe(srv);
    if (!sqe)
        return;
    io_uring_prep_multishot_accept(sqe, srv->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    io_uring_sqe_set_data64(sqe, ap_ud(AP_TAG_ACCEPT, 0, 0));
    srv->accept_armed = true;
}

static void arm_signal(struct ap_server *srv)
{
    struct io_uring_sqe *sqe = ap_get_sqe(srv);
    if (!sqe)
        return;
    io_uring_prep_read(sqe, srv->signal_fd, &srv->sigbuf, sizeof(srv->sigbuf), 0);
    io_uring_sqe_set_data64(sqe, ap_ud(AP_TAG_SIGNAL, 0, 0));
}

static void arm_stats(struct ap_server *srv)
{
    if (srv->cfg.stats_interval_s <= 0)
        return;
    struct io_uring_sqe *sqe = ap_get_sqe(srv);
    if (!sqe)
        return;
    io_uring_prep_timeout(sqe, &srv->stats_ts, 0, 0);
    io_uring_sqe_set_data64(sqe, ap_ud(AP_TAG_STATS, 0, 0));
}

/* Busy-polling is a loan from the other processes: with poll_us = auto
 * gorgond spins only when its loop, the worker's kernel threads and one
 * client waiting for an answer can each have a CPU (affinity mask and
 * cgroup quota, cm_cpus_usable); otherwise a spinning loop takes the CPU the
 * worker needs for the very step it waits for, and it sleeps at once. */
static uint64_t poll_budget(const ap_config *cfg)
{
    int usable = cm_cpus_usable();
    if (cfg->poll_us >= 0)
        return (uint64_t)cfg->poll_us * 1000u;
    /* auto threads: all of them; otherwise each rank of every group spins its own */
    int worker = cfg->threads > 0 ? cfg->threads * cfg->tp * ap_config_groups(cfg) : usable;
    bool spin = cfg->model[0] ? 2 + worker <= usable : 2 <= usable;
    CM_LOG_INFO(TAG, "busy-poll: %s (%d usable CPUs for gorgond, %s and a client)",
                spin ? "50 us" : "off", usable,
                cfg->model[0] ? (cfg->threads > 0 ? "the worker's threads" : "an auto-sized worker")
                              : "no worker");
    return spin ? AP_POLL_US_AUTO * 1000u : 0;
}

int ap_server_create(ap_server **out, const ap_config *cfg)
{
    *out = NULL;
    ap_server *srv = calloc(1, sizeof(*srv));
    if (!srv)
        return -ENOMEM;
    srv->cfg = *cfg;
    srv->listen_fd = -1;
    srv->signal_fd = -1;
    srv->allow = (ipc_allow){.uids = srv->cfg.allow_uids, .n_uids = srv->cfg.n_allow_uids,
                             .gids = srv->cfg.allow_gids, .n_gids = srv->cfg.n_allow_gids};
    srv->stats_ts = (struct __kernel_timespec){.tv_sec = cfg->stats_interval_s};
    srv->hello_ts = (struct __kernel_timespec){.tv_sec = AP_HELLO_TIMEOUT_S};
    cm_log_set_level((enum cm_log_level)cfg->log_level);

    /* Live sessions are at most max_clients and pending handshakes at most
     * max_handshakes (the oldest is dropped for a new one): the table
     * never runs out. */
    srv->n_sess = cfg->max_clients + cfg->max_handshakes;
    srv->sess = calloc(srv->n_sess, sizeof(*srv->sess));
    srv->live = calloc(srv->n_sess, sizeof(*srv->live));
    int rc = -ENOMEM;
    if (!srv->sess || !srv->live)
        goto fail;
    for (uint32_t i = 0; i < srv->n_sess; i++) {
        srv->sess[i].idx = i;
        srv->sess[i].sock = -1;
        srv->sess[i].reg.fd = -1;
        srv->sess[i].wake_fd = -1;
        srv->sess[i].evt_fd = -1;
    }

    rc = make_socket_dir(cfg->socket);
    if (rc < 0) {
        CM_LOG_ERROR(TAG, "the directory of --socket %s: %s%s", cfg->socket, cm_strerror(rc),
                     rc == -ENOENT ? " (gorgond creates only the default socket's directory, "
                                     "/run/gorgon: create it first)"
                                   : "");
        goto fail;
    }
    gid_t gid;
    if ((rc = socket_gid(cfg, &gid)) < 0)
        goto fail;
    rc = ipc_ctl_listen(cfg->socket, 128, cfg->socket_mode, gid);
    if (rc < 0) {
        CM_LOG_ERROR(TAG, "cannot listen on %s: %s", cfg->socket, cm_strerror(rc));
        goto fail;
    }
    srv->listen_fd = rc;
    {
        struct group *gr = getgrgid(gid == (gid_t)-1 ? getegid() : gid);
        char gname[32];
        snprintf(gname, sizeof(gname), "%s", gr ? gr->gr_name : "?");
        CM_LOG_INFO(TAG, "socket %s: mode %04o, group %s", cfg->socket, cfg->socket_mode, gname);
        if ((cfg->n_allow_uids || cfg->n_allow_gids) && !(cfg->socket_mode & 0002))
            CM_LOG_WARN(TAG, "allow-listed users must also be in group %s to open the socket "
                        "(socket_mode %04o; or set socket_group / socket_mode)", gname,
                        cfg->socket_mode);
    }

    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    if (sigprocmask(SIG_BLOCK, &set, NULL) < 0 ||
        (srv->signal_fd = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK)) < 0) {
        rc = cm_neg_errno();
        CM_LOG_ERROR(TAG, "signalfd: %s", cm_strerror(rc));
        goto fail;
    }
    /* A client that vanishes mid-welcome must not kill us. */
    signal(SIGPIPE, SIG_IGN);

    uint32_t entries = AP_RING_ENTRIES;
    while (entries < 4 * srv->n_sess && entries < 32768)
        entries *= 2;
    struct io_uring_params p = {.flags = IORING_SETUP_CQSIZE, .cq_entries = entries * 4};
    rc = io_uring_queue_init_params(entries, &srv->ring, &p);
    if (rc < 0) {
        CM_LOG_ERROR(TAG, "io_uring_queue_init: %s", cm_strerror(rc));
        goto fail;
    }
    srv->ring_ok = true;
    /* Probe first: it must be the only request in flight on the ring. */
    srv->futex_uring = ipc_uring_futex_supported(&srv->ring) == 1 && !cfg->eventfd_doorbells;

    rc = ap_gen_create(srv);
    if (rc < 0) {
        CM_LOG_ERROR(TAG, "cannot serve generation with %s: %s", cfg->model, cm_strerror(rc));
        goto fail;
    }
    arm_accept(srv);
    arm_signal(srv);
    arm_stats(srv);
    rc = io_uring_submit(&srv->ring);
    if (rc < 0) {
        CM_LOG_ERROR(TAG, "io_uring_submit: %s", cm_strerror(rc));
        goto fail;
    }
    srv->poll_ns = poll_budget(cfg);
    CM_LOG_INFO(TAG, "listening on %s (futex wait: %s)", cfg->socket,
                srv->futex_uring ? "io_uring" : "eventfd");
    CM_LOG_DEBUG(TAG, "poll_us=%lld sq=%u cq=%u slots=%u in=%u out=%u max_clients=%u",
                 (long long)cfg->poll_us, cfg->sq_entries, cfg->cq_entries, cfg->slots,
                 cfg->slot_in_bytes, cfg->slot_out_bytes, cfg->max_clients);
    *out = srv;
    return 0;
fail:
    ap_server_destroy(srv);
    return rc;
}

static void log_stats(struct ap_server *srv)
{
    CM_LOG_INFO(TAG,
                "stats: clients %u (total %llu, reclaimed %llu, refused %llu), requests %llu, "
                "bad requests %llu, protocol errors %llu, wakeups %llu",
                srv->n_live, (unsigned long long)srv->ctr.clients_total,
                (unsigned long long)srv->ctr.sessions_reclaimed,
                (unsigned long long)srv->ctr.refused, (unsigned long long)srv->ctr.requests_total,
                (unsigned long long)srv->ctr.bad_requests,
                (unsigned long long)srv->ctr.protocol_errors,
                (unsigned long long)srv->ctr.loop_wakeups);
}

static void on_signal(struct ap_server *srv, int res)
{
    if (res == (int)sizeof(srv->sigbuf)) {
        int sig = (int)srv->sigbuf.ssi_signo;
        if (sig == SIGTERM || sig == SIGINT) {
            if (!srv->draining)
                ap_notify_stopping(&srv->cfg, srv->gen ? ap_gen_active(srv) : 0);
            if (srv->draining) {
                CM_LOG_INFO(TAG, "second %s: stopping now", sig == SIGTERM ? "SIGTERM" : "SIGINT");
                srv->drain_deadline = 0;
            } else if (srv->gen && ap_gen_active(srv)) {
                /* Requests in flight get the grace period to finish; new
                 * connections and new GENERATEs are refused meanwhile. */
                CM_LOG_INFO(TAG, "%s: stopping after %u requests in flight (at most %lld ms)",
                            sig == SIGTERM ? "SIGTERM" : "SIGINT", ap_gen_active(srv),
                            (long long)srv->cfg.grace_ms);
                srv->draining = true;
                srv->drain_deadline = cm_now_ns() + (uint64_t)srv->cfg.grace_ms * 1000000u;
            } else {
                CM_LOG_INFO(TAG, "%s: stopping", sig == SIGTERM ? "SIGTERM" : "SIGINT");
                srv->stopping = true;
                return;
            }
        }
        if (sig == SIGHUP) {
            /* Reload what can change at run time: the log level. */
            if (srv->cfg.config_path[0]) {
                ap_config tmp;
                ap_config_defaults(&tmp);
                if (ap_config_load_file(&tmp, srv->cfg.config_path) == 0) {
                    cm_log_set_level((enum cm_log_level)tmp.log_level);
                    CM_LOG_INFO(TAG, "SIGHUP: log level now %s",
                                cm_log_level_name((enum cm_log_level)tmp.log_level));
                }
            } else {
                CM_LOG_INFO(TAG, "SIGHUP: no --config file to reload; ignored");
            }
        }
    } else if (res < 0 && res != -EAGAIN && res != -EINTR) {
        CM_LOG_ERROR(TAG, "signalfd read: %s", cm_strerror(res));
    }
    arm_signal(srv);
}

static ap_session *session_of(struct ap_server *srv, uint64_t ud)
{
    uint32_t idx = ap_ud_idx(ud);
    if (idx >= srv->n_sess)
        return NULL;
    ap_session *s = &srv->sess[idx];
    if (s->state == AP_SESS_FREE || (s->gen & 0xffffffu) != ap_ud_gen(ud))
        return NULL; /* stale: the session this was for is gone */
    return s;
}

static void dispatch(struct ap_server *srv, const struct io_uring_cqe *cqe)
{
    uint64_t ud = io_uring_cqe_get_data64(cqe);
    int res = cqe->res;
    ap_session *s;
    switch (ap_ud_tag(ud)) {
    case AP_TAG_ACCEPT:
        if (!(cqe->flags & IORING_CQE_F_MORE))
            srv->accept_armed = false;
        if (res >= 0) {
            ap_session_accepted(srv, res); /* refuses while stopping */
        } else if (res != -ECANCELED) {
            CM_LOG_WARN(TAG, "accept: %s", cm_strerror(res));
        }
        /* Multishot ends on errors (e.g. EMFILE) and overflow: re-arm. */
        if (!srv->accept_armed && !srv->stopping)
            arm_accept(srv);
        break;
    case AP_TAG_SIGNAL:
        on_signal(srv, res);
        break;
    case AP_TAG_STATS:
        log_stats(srv);
        arm_stats(srv);
        break;
    case AP_TAG_HELLO:
        if ((s = session_of(srv, ud)) && s->state == AP_SESS_HELLO)
            ap_session_hello(srv, s, res);
        break;
    case AP_TAG_HUP:
        if ((s = session_of(srv, ud))) {
            s->hup_armed = false;
            if (res == -ECANCELED)
                break;
            ap_session_close(srv, s, res < 0 ? "socket error" : "client hung up");
        }
        break;
    case AP_TAG_FUTEX:
        /* 0: woken by the client; -EAGAIN: the value had changed already
         * (work arrived between prepare and arm). Either way: poll. With
         * eventfd doorbells, drain before the ring is re-checked so that a
         * later write leaves the fd readable for the next sleep. */
        if ((s = session_of(srv, ud))) {
            s->futex_armed = false;
            if (s->wake_fd >= 0)
                (void)ipc_wake_fd_drain(s->wake_fd);
        }
        break;
    case AP_TAG_WK_EVT:
    case AP_TAG_WK_PID:
        ap_gen_dispatch(srv, ud, res);
        break;
    case AP_TAG_NONE:
        break;
    }
}

/* Reap everything that is ready; returns how many completions were seen. */
static unsigned reap(struct ap_server *srv)
{
    struct io_uring_cqe *cqe;
    unsigned head, n = 0;
    io_uring_for_each_cqe(&srv->ring, head, cqe)
    {
        dispatch(srv, cqe);
        n++;
    }
    if (n)
        io_uring_cq_advance(&srv->ring, n);
    return n;
}

static int poll_sessions(struct ap_server *srv)
{
    int work = 0;
    /* Backwards: a session closed on a protocol error is swap-removed. */
    for (uint32_t i = srv->n_live; i-- > 0;) {
        ap_session *s = &srv->sess[srv->live[i]];
        int rc = ap_session_poll(srv, s);
        if (rc > 0)
            work += rc;
    }
    return work;
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Arm every doorbell and sleep. Returns -errno only on a fatal error. */
static int sleep_once(struct ap_server *srv)
{
    bool work = false;
    for (uint32_t i = 0; i < srv->n_live; i++)
        if (ap_session_arm(srv, &srv->sess[srv->live[i]]))
            work = true;
    if (ap_gen_arm(srv))
        work = true;
    if (!work) {
        int rc;
        /* A client's out_consumed / CQ head moves without ringing us: look
         * again soon. The worker watchdog's deadline bounds the sleep too. */
        uint64_t wait_ns = ap_gen_busy(srv) || srv->draining ? 1000000u : 0;
        uint64_t deadline = ap_gen_deadline(srv);
        if (deadline) {
            uint64_t now = cm_now_ns();
            uint64_t left = deadline > now ? deadline - now : 1;
            if (!wait_ns || left < wait_ns)
                wait_ns = left;
        }
        if (wait_ns) {
            struct __kernel_timespec ts = {.tv_sec = (long long)(wait_ns / 1000000000u),
                                           .tv_nsec = (long long)(wait_ns % 1000000000u)};
            struct io_uring_cqe *cqe;
            rc = io_uring_submit_and_wait_timeout(&srv->ring, &cqe, 1, &ts, NULL);
        } else {
            rc = io_uring_submit_and_wait(&srv->ring, 1);
        }
        if (rc < 0 && rc != -EINTR && rc != -ETIME) {
            CM_LOG_ERROR(TAG, "io_uring wait: %s", cm_strerror(rc));
            return rc;
        }
        srv->ctr.loop_wakeups++;
    }
    /* Awake and polling: clients need not ring us until we sleep again. */
    for (uint32_t i = 0; i < srv->n_live; i++)
        ap_session_disarm_flag(&srv->sess[srv->live[i]]);
    ap_gen_disarm_flag(srv);
    return 0;
}

/* Ready to serve (ap_notify_ready): the socket listens since
 * ap_server_create, and the worker has loaded the model (its READY). */
static bool serving(struct ap_server *srv)
{
    return !srv->cfg.model[0] || ap_gen_ready(srv);
}

int ap_server_run(ap_server *srv)
{
    bool told_ready = false;
    const uint64_t budget_ns = srv->poll_ns;
    uint64_t last_work = cm_now_ns();
    unsigned spins = 0;
    while (!srv->stopping) {
        reap(srv);
        if (srv->stopping)
            break;
        int work = poll_sessions(srv);
        work += ap_gen_poll(srv);
        if (!told_ready && (told_ready = serving(srv)))
            ap_notify_ready(&srv->cfg);
        if (srv->draining) {
            if (!ap_gen_active(srv)) {
                srv->stopping = true;
                break;
            }
            if (cm_now_ns() >= srv->drain_deadline) {
                CM_LOG_WARN(TAG, "grace period over: cancelling %u requests", ap_gen_active(srv));
                ap_gen_abort_all(srv, "gorgond is shutting down");
                srv->stopping = true;
                break;
            }
        }
        if (io_uring_sq_ready(&srv->ring))
            io_uring_submit(&srv->ring);
        if (work > 0) {
            last_work = 0; /* refreshed lazily below */
            spins = 0;
            continue;
        }
        if (budget_ns) {
            /* The clock is read every 64 idle spins: cheap, and precise
             * enough for a budget of microseconds. */
            if ((++spins & 63u) != 0) {
                cpu_relax();
                continue;
            }
            uint64_t now = cm_now_ns();
            if (last_work == 0)
                last_work = now;
            if (now - last_work < budget_ns) {
                cpu_relax();
                continue;
            }
        }
        int rc = sleep_once(srv);
        if (rc < 0)
            return rc;
        last_work = cm_now_ns();
        spins = 0;
    }
    return srv->fatal;
}

void ap_server_destroy(ap_server *srv)
{
    if (!srv)
        return;
    if (srv->sess) {
        for (uint32_t i = 0; i < srv->n_sess; i++) {
            ap_session *s = &srv->sess[i];
            if (s->state == AP_SESS_LIVE)
                ap_session_close(srv, s, "gorgond stopping");
            else if (s->state == AP_SESS_HELLO)
                ap_session_close(srv, s, "gorgond stopping");
        }
    }
    ap_gen_destroy(srv);
    if (srv->ring_ok) {
        /* Cancels whatever is still armed (accept, futex waits, polls). */
        io_uring_queue_exit(&srv->ring);
    }
    if (srv->listen_fd >= 0) {
        close(srv->listen_fd);
        if (unlink(srv->cfg.socket) < 0 && errno != ENOENT)
            CM_LOG_WARN(TAG, "cannot remove %s: %s", srv->cfg.socket, strerror(errno));
    }
    if (srv->signal_fd >= 0)
        close(srv->signal_fd);
    if (srv->ctr.clients_total || srv->ctr.requests_total)
        log_stats(srv);
    free(srv->sess);
    free(srv->live);
    free(srv);
}
