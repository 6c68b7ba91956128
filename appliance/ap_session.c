/* Client sessions: handshake, serving the submission ring, reclaim.
 *
 * The region is written by an untrusted peer: every descriptor is popped
 * (copied) once, validated as a private copy, and handled from the copy. A
 * ring index that cannot be right (-EPROTO) disconnects that client only. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "appliance/ap_int.h"
#include "common/common.h"

#define TAG "gorgond"

static void reject(int fd, int status, const char *reason)
{
    struct ipc_welcome w = {.magic = IPC_MAGIC, .abi_version = IPC_ABI_VERSION, .status = status};
    snprintf(w.reason, sizeof(w.reason), "%s", reason);
    (void)ipc_ctl_send_welcome(fd, &w, -1);
}

/* Refuse a connection that has no table entry. The welcome carries the
 * reason; the hello, when it is already there, is read first, because
 * closing a socket with unread input resets the peer, whose recv would
 * then report ECONNRESET before our reason (the client library also reads
 * on after a reset, for the hello that arrives between this read and the
 * close). */
static void refuse(int fd, int status, const char *reason)
{
    reject(fd, status, reason);
    char buf[sizeof(struct ipc_hello) + 1];
    for (int i = 0; i < 4 && recv(fd, buf, sizeof(buf), MSG_DONTWAIT) > 0; i++) {
    }
    close(fd);
}

/* Refusals of disallowed peers are logged at most once a second (a peer
 * reconnecting in a loop must not flood the log), with how many were not. */
static void log_refusal(struct ap_server *srv, uid_t uid, pid_t pid)
{
    uint64_t now = cm_now_ns();
    if (srv->refusal_log_ns && now - srv->refusal_log_ns < 1000000000u) {
        srv->refusals_unlogged++;
        return;
    }
    if (srv->refusals_unlogged)
        CM_LOG_WARN(TAG, "refused pid %d uid %u: not in the allow-list (and %llu more "
                    "refusals in the last second)", (int)pid, (unsigned)uid,
                    (unsigned long long)srv->refusals_unlogged);
    else
        CM_LOG_WARN(TAG, "refused pid %d uid %u: not in the allow-list", (int)pid,
                    (unsigned)uid);
    srv->refusal_log_ns = now;
    srv->refusals_unlogged = 0;
}

/* Make room for one more pending handshake of `uid`: when the uid has its
 * own limit's worth pending, its oldest goes; when all of them together
 * are at the limit, the oldest of the uid with the most pending goes. A
 * flood of connections that never say hello thus evicts itself, not an
 * honest client (whose hello is usually read at accept anyway). */
static void make_handshake_room(struct ap_server *srv, uid_t uid)
{
    struct pending_uid {
        uid_t uid;
        uint32_t n;
        ap_session *oldest;
    } by[AP_MAX_PENDING_UIDS];
    uint32_t n_by = 0;
    for (uint32_t i = 0; i < srv->n_sess; i++) {
        ap_session *s = &srv->sess[i];
        if (s->state != AP_SESS_HELLO)
            continue;
        uint32_t k = 0;
        while (k < n_by && by[k].uid != s->uid)
            k++;
        if (k == n_by) {
            if (n_by == AP_MAX_PENDING_UIDS)
                continue; /* more uids pending than we track: not a candidate */
            by[n_by++] = (struct pending_uid){.uid = s->uid};
        }
        by[k].n++;
        if (!by[k].oldest || s->t_accept < by[k].oldest->t_accept)
            by[k].oldest = s;
    }
    ap_session *victim = NULL;
    for (uint32_t k = 0; k < n_by; k++)
        if (by[k].uid == uid && by[k].n >= srv->cfg.max_handshakes_per_uid)
            victim = by[k].oldest;
    if (!victim && srv->n_pending >= srv->cfg.max_handshakes) {
        uint32_t most = 0;
        for (uint32_t k = 0; k < n_by; k++)
            if (by[k].n > most)
                most = by[k].n, victim = by[k].oldest;
    }
    if (!victim)
        return;
    srv->ctr.handshakes_dropped++;
    CM_LOG_DEBUG(TAG, "dropped the pending handshake of pid %d uid %u: too many pending",
                 (int)victim->pid, (unsigned)victim->uid);
    reject(victim->sock, -EUSERS, "no hello in time: too many handshakes pending");
    ap_session_close(srv, victim, "handshake evicted");
}

static ap_session *free_table_entry(struct ap_server *srv)
{
    for (uint32_t i = 0; i < srv->n_sess; i++)
        if (srv->sess[i].state == AP_SESS_FREE)
            return &srv->sess[i];
    return NULL;
}

static void finish_hello(struct ap_server *srv, ap_session *s, int rc);

/* Wait for the hello of a pending entry, bounded by the hello timeout. */
static void arm_hello(struct ap_server *srv, ap_session *s)
{
    /* The poll and its linked timeout must go into the same submission: a
     * link that ends a batch would lose its timeout. */
    if (io_uring_sq_space_left(&srv->ring) < 2)
        io_uring_submit(&srv->ring);
    struct io_uring_sqe *sqe = ap_get_sqe(srv);
    if (!sqe) {
        ap_session_close(srv, s, "no submission entry");
        return;
    }
    s->hello_armed = true;
    io_uring_prep_poll_add(sqe, s->sock, POLLIN | POLLRDHUP | POLLHUP);
    io_uring_sqe_set_data64(sqe, ap_ud(AP_TAG_HELLO, s->gen, s->idx));
    sqe->flags |= IOSQE_IO_LINK;
    sqe = ap_get_sqe(srv);
    if (sqe) {
        io_uring_prep_link_timeout(sqe, &srv->hello_ts, 0);
        io_uring_sqe_set_data64(sqe, ap_ud(AP_TAG_NONE, 0, 0));
    }
}

void ap_session_accepted(struct ap_server *srv, int fd)
{
    if (srv->draining || srv->stopping) {
        srv->ctr.refused++;
        refuse(fd, -ESHUTDOWN, "gorgond is shutting down");
        return;
    }
    /* Credentials first (the kernel recorded them at connect): a peer that
     * is not allowed gets nothing, not even a table entry. */
    uid_t uid = (uid_t)-1;
    gid_t gid = (gid_t)-1;
    pid_t pid = -1;
    int rc = ipc_ctl_check_peer(fd, &srv->allow, &uid, &gid, &pid);
    if (rc < 0) {
        srv->ctr.refused++;
        if (rc != -EACCES) {
            CM_LOG_WARN(TAG, "SO_PEERCRED: %s", cm_strerror(rc));
            refuse(fd, rc, "cannot read the peer's credentials");
            return;
        }
        log_refusal(srv, uid, pid);
        /* fits ipc_welcome.reason for any uid; names the option that lets it in */
        char why[sizeof(((struct ipc_welcome *)0)->reason)];
        snprintf(why, sizeof(why), "uid %u not allowed: add --allow-uid/gid", (unsigned)uid);
        refuse(fd, -EACCES, why);
        return;
    }
    make_handshake_room(srv, uid);
    ap_session *s = free_table_entry(srv);
    if (!s) {
        /* Cannot happen: live sessions are at most max_clients and pending
         * ones at most max_handshakes, the size of the table. */
        srv->ctr.refused++;
        refuse(fd, -EUSERS, "too many clients");
        return;
    }
    s->state = AP_SESS_HELLO;
    s->sock = fd;
    s->gen++;
    s->uid = uid;
    s->pid = pid;
    s->t_accept = cm_now_ns();
    srv->n_used++;
    srv->n_pending++;
    /* An honest client sends its hello right after connect: it is usually
     * here already, and the handshake ends without a round through the
     * ring (and without ever counting against the pending limits). */
    struct ipc_hello h;
    rc = ipc_ctl_recv_hello(fd, &h);
    if (rc == -EAGAIN)
        arm_hello(srv, s);
    else
        finish_hello(srv, s, rc);
}

static void free_entry(struct ap_server *srv, ap_session *s)
{
    if (s->sock >= 0)
        close(s->sock);
    s->sock = -1;
    if (s->wake_fd >= 0)
        close(s->wake_fd);
    s->wake_fd = -1;
    if (s->evt_fd >= 0)
        close(s->evt_fd);
    s->evt_fd = -1;
    ap_stage_drop(s, UINT32_MAX);
    free(s->slot_busy_until);
    free(s->slot_used);
    free(s->slot_gen);
    s->slot_busy_until = NULL;
    s->slot_used = NULL;
    s->slot_gen = NULL;
    if (s->state == AP_SESS_LIVE) {
        /* Swap-remove: the loops walk `live` from the end, so the entry
         * moved into this place has already been visited. */
        uint32_t last = srv->live[--srv->n_live];
        srv->live[s->live_pos] = last;
        srv->sess[last].live_pos = s->live_pos;
    } else if (s->state == AP_SESS_HELLO) {
        srv->n_pending--;
    }
    srv->n_used--;
    s->state = AP_SESS_FREE;
    s->gen++; /* whatever completion is still in flight is now stale */
    s->hello_armed = s->hup_armed = s->futex_armed = false;
}

static void arm_hup(struct ap_server *srv, ap_session *s)
{
    struct io_uring_sqe *sqe = ap_get_sqe(srv);
    if (!sqe)
        return;
    io_uring_prep_poll_add(sqe, s->sock, POLLRDHUP | POLLHUP | POLLERR);
    io_uring_sqe_set_data64(sqe, ap_ud(AP_TAG_HUP, s->gen, s->idx));
    s->hup_armed = true;
}

void ap_session_hello(struct ap_server *srv, ap_session *s, int res)
{
    s->hello_armed = false;
    if (res < 0 || !(res & POLLIN)) {
        CM_LOG_DEBUG(TAG, "connection dropped before its hello (%s)",
                     res == -ECANCELED ? "timed out" : res < 0 ? cm_strerror(res) : "hung up");
        if (res == -ECANCELED)
            srv->ctr.handshakes_dropped++;
        free_entry(srv, s);
        return;
    }
    struct ipc_hello h;
    int rc = ipc_ctl_recv_hello(s->sock, &h);
    if (rc == -EAGAIN) {
        arm_hello(srv, s); /* spurious readiness: wait again, with a fresh timeout */
        return;
    }
    finish_hello(srv, s, rc);
}

/* The hello was read (rc 0) or failed (rc < 0): refuse or set up the
 * session. The peer's credentials were checked at accept. */
static void finish_hello(struct ap_server *srv, ap_session *s, int rc)
{
    const pid_t pid = s->pid;
    if (rc == -ECONNRESET || rc == -EPIPE) {
        CM_LOG_DEBUG(TAG, "connection closed before its hello");
        free_entry(srv, s);
        return;
    }
    if (rc < 0) {
        srv->ctr.protocol_errors++;
        CM_LOG_WARN(TAG, "bad hello from pid %d: %s", (int)pid, cm_strerror(rc));
        reject(s->sock, rc, rc == -EPROTONOSUPPORT ? "ABI version mismatch" : "bad hello");
        free_entry(srv, s);
        return;
    }
    if (srv->n_live >= srv->cfg.max_clients) {
        srv->ctr.refused++;
        char why[48];
        snprintf(why, sizeof(why), "too many clients (max_clients=%u)", srv->cfg.max_clients);
        CM_LOG_WARN(TAG, "refused pid %d: %s", (int)pid, why);
        reject(s->sock, -EUSERS, why);
        free_entry(srv, s);
        return;
    }
    char name[32];
    snprintf(name, sizeof(name), "gorgon-session-%u", s->idx);
    ipc_region_cfg rc_cfg = {
        .sq_entries = srv->cfg.sq_entries,
        .cq_entries = srv->cfg.cq_entries,
        .n_slots = srv->cfg.slots,
        .slot_in_bytes = srv->cfg.slot_in_bytes,
        .slot_out_bytes = srv->cfg.slot_out_bytes,
        .session_id = (uint32_t)(srv->ctr.clients_total + 1),
        .hugepages = srv->cfg.hugepages,
        .numa_node = srv->cfg.numa_node,
        .name = name,
    };
    memset(&s->reg, 0, sizeof(s->reg));
    s->reg.fd = -1;
    s->slot_gen = NULL;
    s->slot_busy_until = calloc(srv->cfg.slots, sizeof(*s->slot_busy_until));
    s->slot_used = calloc(srv->cfg.slots, 1);
    s->slot_gen = malloc(srv->cfg.slots * sizeof(*s->slot_gen));
    if (!s->slot_busy_until || !s->slot_used || !s->slot_gen) {
        reject(s->sock, -ENOMEM, "out of memory");
        free_entry(srv, s);
        return;
    }
    for (uint32_t i = 0; i < srv->cfg.slots; i++)
        s->slot_gen[i] = -1;
    rc = ipc_region_create(&s->reg, &rc_cfg);
    if (rc < 0) {
        CM_LOG_ERROR(TAG, "cannot create a region for pid %d: %s", (int)pid, cm_strerror(rc));
        reject(s->sock, rc, "cannot create the shared region");
        free_entry(srv, s);
        return;
    }
    if ((rc = ipc_region_sq(&s->reg, IPC_RING_CONSUMER, &s->sq)) < 0 ||
        (rc = ipc_region_cq(&s->reg, IPC_RING_PRODUCER, &s->cq)) < 0) {
        CM_LOG_ERROR(TAG, "region views: %s", cm_strerror(rc));
        reject(s->sock, rc, "internal error");
        ipc_region_unmap(&s->reg);
        free_entry(srv, s);
        return;
    }
    if (!srv->futex_uring) {
        s->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (s->wake_fd < 0 || (rc = ipc_ring_set_wake_fd(&s->sq, s->wake_fd)) < 0) {
            rc = s->wake_fd < 0 ? cm_neg_errno() : rc;
            CM_LOG_ERROR(TAG, "wake eventfd: %s", cm_strerror(rc));
            reject(s->sock, rc, "internal error");
            ipc_region_unmap(&s->reg);
            free_entry(srv, s);
            return;
        }
    }
    struct ipc_welcome w = {
        .magic = IPC_MAGIC,
        .abi_version = IPC_ABI_VERSION,
        .status = 0,
        .session_id = rc_cfg.session_id,
        .region_bytes = s->reg.size,
    };
    rc = ipc_ctl_send_welcome_wake(s->sock, &w, s->reg.fd, s->wake_fd);
    if (rc < 0) {
        CM_LOG_WARN(TAG, "welcome to pid %d failed: %s", (int)pid, cm_strerror(rc));
        ipc_region_unmap(&s->reg);
        free_entry(srv, s);
        return;
    }
    /* The client has its own fd now; ours only kept the memfd alive until the
     * mapping existed. Closing it here keeps gorgond's fd count at one per
     * session (the socket). */
    close(s->reg.fd);
    s->reg.fd = -1;
    srv->n_pending--;
    s->state = AP_SESS_LIVE;
    s->requests = 0;
    s->n_gen_active = 0;
    s->last_served = 0;
    s->live_pos = srv->n_live;
    srv->live[srv->n_live++] = s->idx;
    srv->ctr.clients_total++;
    CM_LOG_DEBUG(TAG, "session %u: pid %d uid %u, region %zu bytes%s", w.session_id, (int)pid,
                 (unsigned)s->uid, s->reg.size, s->reg.hugepages ? " (huge pages)" : "");
    arm_hup(srv, s);
}

void ap_session_close(struct ap_server *srv, ap_session *s, const char *why)
{
    if (s->state == AP_SESS_FREE)
        return;
    uint64_t uds[3] = {
        s->hello_armed ? ap_ud(AP_TAG_HELLO, s->gen, s->idx) : 0,
        s->hup_armed ? ap_ud(AP_TAG_HUP, s->gen, s->idx) : 0,
        s->futex_armed ? ap_ud(AP_TAG_FUTEX, s->gen, s->idx) : 0,
    };
    for (int i = 0; i < 3; i++) {
        if (!uds[i])
            continue;
        struct io_uring_sqe *sqe = ap_get_sqe(srv);
        if (!sqe)
            break;
        io_uring_prep_cancel64(sqe, uds[i], 0);
        io_uring_sqe_set_data64(sqe, ap_ud(AP_TAG_NONE, 0, 0));
    }
    if (s->state == AP_SESS_LIVE) {
        CM_LOG_DEBUG(TAG, "session of pid %d closed: %s (%llu requests)", (int)s->pid, why,
                     (unsigned long long)s->requests);
        ap_gen_session_closed(srv, s);
        ipc_region_unmap(&s->reg);
        srv->ctr.sessions_reclaimed++;
    }
    free_entry(srv, s);
}

void ap_fill_stats(const struct ap_server *srv, struct ipc_stats *st)
{
    memset(st, 0, sizeof(*st));
    st->clients_now = srv->n_live;
    st->clients_total = srv->ctr.clients_total;
    st->sessions_reclaimed = srv->ctr.sessions_reclaimed;
    st->requests_total = srv->ctr.requests_total;
    st->protocol_errors = srv->ctr.protocol_errors;
    st->loop_wakeups = srv->ctr.loop_wakeups;
    st->handshakes_pending = srv->n_pending;
    st->handshakes_dropped = srv->ctr.handshakes_dropped;
    ap_gen_fill_stats(srv, st);
}

/* ---- the operation table (hot: validate + handle) ------------------------ */

/* Returns 1 when cqe is the request's completion, 0 when the request goes
 * on and completes later (GENERATE). */
typedef int (*op_fn)(struct ap_server *srv, ap_session *s, const struct ipc_sqe *sqe,
                     struct ipc_cqe *cqe);

static int op_nop(struct ap_server *srv, ap_session *s, const struct ipc_sqe *sqe,
                  struct ipc_cqe *cqe)
{
    (void)srv, (void)s, (void)sqe;
    cqe->result = 0;
    return 1;
}

static int op_ping(struct ap_server *srv, ap_session *s, const struct ipc_sqe *sqe,
                   struct ipc_cqe *cqe)
{
    (void)srv;
    if (sqe->in_len > s->reg.layout.slot_out_bytes) {
        cqe->result = -EMSGSIZE;
        return 1;
    }
    /* in_off/in_len were validated against the private layout. */
    memcpy(ipc_region_slot_out(&s->reg, sqe->slot),
           ipc_region_slot_in(&s->reg, sqe->slot) + sqe->in_off, sqe->in_len);
    cqe->out_off = 0;
    cqe->out_len = sqe->in_len;
    cqe->result = (int32_t)sqe->in_len;
    return 1;
}

static int op_stats(struct ap_server *srv, ap_session *s, const struct ipc_sqe *sqe,
                    struct ipc_cqe *cqe)
{
    struct ipc_stats st;
    ap_fill_stats(srv, &st);
    uint8_t *out = ipc_region_slot_out(&s->reg, sqe->slot);
    memcpy(out, &st, sizeof(st));
    size_t rows = ap_gen_fill_groups(srv, out + sizeof(st),
                                     (s->reg.layout.slot_out_bytes - sizeof(st)) /
                                         sizeof(struct ipc_group_stats));
    cqe->out_off = 0;
    cqe->out_len = (uint32_t)(sizeof(st) + rows * sizeof(struct ipc_group_stats));
    cqe->result = (int32_t)cqe->out_len;
    return 1;
}

static int op_generate(struct ap_server *srv, ap_session *s, const struct ipc_sqe *sqe,
                       struct ipc_cqe *cqe)
{
    return ap_gen_submit(srv, s, sqe, cqe);
}

static int op_cancel(struct ap_server *srv, ap_session *s, const struct ipc_sqe *sqe,
                     struct ipc_cqe *cqe)
{
    cqe->result = ap_gen_cancel(srv, s, sqe->slot);
    return 1;
}

void ap_stage_drop(ap_session *s, uint32_t slot)
{
    if (!s->stage)
        return;
    uint32_t n = s->stage_n;
    for (uint32_t i = slot == UINT32_MAX ? 0 : slot; i < n && (slot == UINT32_MAX || i == slot);
         i++) {
        s->staged -= s->stage_len[i];
        free(s->stage[i]);
        s->stage[i] = NULL;
        s->stage_len[i] = 0;
    }
    if (slot == UINT32_MAX) {
        free(s->stage);
        free(s->stage_len);
        s->stage = NULL;
        s->stage_len = NULL;
        s->stage_n = 0;
        s->staged = 0;
    }
}

/* The client's event-loop fd (gorgon_event_fd): a pipe, not an eventfd.
 * An eventfd is one open file shared by both processes, so the client could
 * clear its O_NONBLOCK (F_SETFL) and fill the counter, and gorgond's write
 * would block the loop; a pipe's two ends are separate open files, and the
 * write end, non-blocking, never leaves gorgond. A full pipe (EAGAIN) is
 * readable anyway. The read end goes over the control socket before the
 * completion is posted, so the client finds it queued once it sees the
 * result. At most one per session: at most one message on the socket. */
static int op_event_fd(struct ap_server *srv, ap_session *s, const struct ipc_sqe *sqe,
                       struct ipc_cqe *cqe)
{
    (void)srv, (void)sqe;
    if (s->evt_fd >= 0) {
        cqe->result = -EALREADY;
        return 1;
    }
    int p[2];
    if (pipe2(p, O_CLOEXEC | O_NONBLOCK) != 0) {
        cqe->result = cm_neg_errno();
        return 1;
    }
    int rc = ipc_ctl_send_fd(s->sock, IPC_FD_EVENT, p[0]);
    close(p[0]);
    if (rc == 0)
        rc = ipc_ring_set_wake_fd(&s->cq, p[1]);
    if (rc < 0) {
        close(p[1]);
        CM_LOG_DEBUG(TAG, "pid %d: event fd not sent: %s", (int)s->pid, cm_strerror(rc));
    } else {
        s->evt_fd = p[1];
    }
    cqe->result = rc;
    return 1;
}

static const struct {
    op_fn fn;
    bool uses_slot; /* reads or writes the slot's buffers: subject to busy tracking */
} op_table[IPC_OP__COUNT] = {
    [IPC_OP_NOP] = {op_nop, false},
    [IPC_OP_PING] = {op_ping, true},
    [IPC_OP_STATS] = {op_stats, true},
    [IPC_OP_GENERATE] = {op_generate, true},
    [IPC_OP_CANCEL] = {op_cancel, false}, /* names the slot of another request */
    [IPC_OP_MODEL_INFO] = {ap_gen_model_info, true},
    [IPC_OP_TOKENIZE] = {ap_gen_tokenize, true},
    [IPC_OP_DETOKENIZE] = {ap_gen_detokenize, true},
    [IPC_OP_EVENT_FD] = {op_event_fd, false},
    [IPC_OP_PROMPT_PART] = {ap_gen_prompt_part, true},
};

/* The client's CQ head, re-read from shared memory only when a slot looks
 * busy by the last value seen (one cache miss on the hot path saved). */
struct head_view {
    ap_session *s;
    uint32_t head;
    bool fresh;
};

static bool slot_busy(struct head_view *hv, uint32_t slot)
{
    ap_session *s = hv->s;
    if (s->slot_gen[slot] >= 0)
        return true; /* a generation streams into it */
    if (!s->slot_used[slot])
        return false;
    /* Busy until the client's CQ head moves past the completion that last
     * used the slot (signed distance: free-running indices). */
    if ((int32_t)(hv->head - s->slot_busy_until[slot]) >= 0)
        return false;
    if (!hv->fresh) {
        hv->head = atomic_load_explicit((_Atomic uint32_t *)&s->cq.sh->head, memory_order_acquire);
        hv->fresh = true;
    }
    return (int32_t)(hv->head - s->slot_busy_until[slot]) < 0;
}

/* Handle one private copy; cq_pos is where its completion will land.
 * Returns 1 when *cqe is to be posted now. */
static int handle(struct ap_server *srv, ap_session *s, const struct ipc_sqe *sqe,
                   struct ipc_cqe *cqe, uint32_t cq_pos, struct head_view *hv)
{
    memset(cqe, 0, sizeof(*cqe));
    cqe->opcode = sqe->opcode;
    cqe->slot = sqe->slot;
    cqe->user_data = sqe->user_data;
    const char *why = NULL;
    int rc = ipc_sqe_validate(sqe, &s->reg.layout, &why);
    if (rc < 0) {
        srv->ctr.bad_requests++;
        cqe->result = rc;
        CM_LOG_TRACE(TAG, "pid %d: bad descriptor: %s", (int)s->pid, why ? why : "?");
        return 1;
    }
    if (sqe->opcode >= IPC_OP__COUNT || !op_table[sqe->opcode].fn) {
        cqe->result = -EOPNOTSUPP;
        return 1;
    }
    if (op_table[sqe->opcode].uses_slot) {
        if (slot_busy(hv, sqe->slot)) {
            cqe->result = -EBUSY;
            return 1;
        }
        s->slot_used[sqe->slot] = 1;
        s->slot_busy_until[sqe->slot] = cq_pos + 1;
    }
    return op_table[sqe->opcode].fn(srv, s, sqe, cqe);
}

int ap_session_poll(struct ap_server *srv, ap_session *s)
{
    /* Never take more than the CQ can hold: completions are produced in
     * the same pass, and a client that does not reap just stalls itself.
     * The client's head is re-read only when the last value seen leaves
     * less room than a full burst. */
    uint32_t size = s->cq.mask + 1;
    uint32_t space = size - (s->cq.local - s->cq.cached);
    if (space < AP_BURST) {
        int rc = ipc_ring_count(&s->cq);
        if (rc < 0)
            goto proto;
        space = (uint32_t)rc;
        if (space == 0)
            return 0;
    }
    uint32_t n = space < AP_BURST ? space : AP_BURST;
    struct ipc_sqe sqes[AP_BURST];
    int got = ipc_ring_pop_burst(&s->sq, sqes, n);
    if (got < 0)
        goto proto;
    if (got == 0)
        return 0;
    struct ipc_cqe cqes[AP_BURST];
    struct head_view hv = {.s = s, .head = s->cq.cached, .fresh = false};
    uint32_t pos = s->cq.local;
    uint32_t n_cqe = 0;
    for (int i = 0; i < got; i++)
        n_cqe += (uint32_t)handle(srv, s, &sqes[i], &cqes[n_cqe], pos + n_cqe, &hv);
    if (n_cqe) {
        int pushed = ipc_ring_push_burst(&s->cq, cqes, n_cqe);
        if (pushed != (int)n_cqe)
            goto proto; /* it promised space: the head was scribbled on */
        ipc_doorbell_notify(&s->cq);
    }
    s->requests += (uint64_t)got;
    srv->ctr.requests_total += (uint64_t)got;
    return got;
proto:
    srv->ctr.protocol_errors++;
    CM_LOG_WARN(TAG, "pid %d: impossible ring index, disconnecting", (int)s->pid);
    ap_session_close(srv, s, "protocol error");
    return -EPROTO;
}

int ap_session_arm(struct ap_server *srv, ap_session *s)
{
    uint32_t val;
    int rc = ipc_doorbell_prepare(&s->sq, &val);
    if (rc != 0)
        return 1; /* entries arrived (or a bad index: the poll will say) */
    if (s->futex_armed)
        return 0; /* an armed wait is woken by any later notify */
    struct io_uring_sqe *sqe = ap_get_sqe(srv);
    if (!sqe)
        return 1; /* cannot sleep safely: keep polling */
    if (s->wake_fd >= 0)
        io_uring_prep_poll_add(sqe, s->wake_fd, POLLIN);
    else
        ipc_uring_prep_futex_wait(sqe, &s->sq.sh->doorbell, val);
    io_uring_sqe_set_data64(sqe, ap_ud(AP_TAG_FUTEX, s->gen, s->idx));
    s->futex_armed = true;
    return 0;
}

void ap_session_disarm_flag(ap_session *s)
{
    ipc_doorbell_finish(&s->sq);
}
