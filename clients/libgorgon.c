/* libgorgon: see clients/gorgon.h.
 *
 * The region is gorgond's, but the client still checks what it reads from
 * it (CQ indices through ipc_ring, slot and output bounds here) so that a
 * broken daemon yields -EPROTO rather than a wild pointer. */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "clients/gorgon.h"
#include "common/common.h"
#include "ipc/ipc.h"

#define GORGON_DEFAULT_SPIN_NS 50000
/* Longest a sleeping waiter goes without looking at the control socket:
 * bounds how long it takes to notice that gorgond died. */
#define GORGON_HUP_CHECK_NS 50000000
#define GORGON_BURST 64u

/* The API promises that errno is left alone: every public entry point that
 * can reach a syscall restores it. */
#define KEEP_ERRNO(call)                                                       \
    do {                                                                       \
        int keep_errno_ = errno;                                               \
        int keep_rc_ = (call);                                                 \
        errno = keep_errno_;                                                   \
        return keep_rc_;                                                       \
    } while (0)

enum slot_state { SLOT_FREE = 0, SLOT_USER, SLOT_AUTO, SLOT_AUTO_DONE, SLOT_GEN };

/* Request handles (gorgon_generate_submit): the slot in the low bits, the
 * slot's generation count (1..GORGON_REQ_GEN_MASK, never 0) above. */
#define GORGON_REQ_SLOT_BITS 12u
#define GORGON_REQ_GEN_MASK ((1u << (32 - GORGON_REQ_SLOT_BITS)) - 1u)
_Static_assert(IPC_MAX_SLOTS <= (1u << GORGON_REQ_SLOT_BITS), "a slot fits a handle's low bits");

/* user_data of gorgon_cancel's own CANCEL requests (consumed internally) */
#define GORGON_CANCEL_UD 0xc4ace1c4ace10000ull

struct gorgon_client {
    ipc_ring sq; /* producer */
    ipc_ring cq; /* consumer */
    ipc_region reg;
    int sock;
    int wake_fd; /* SQ eventfd when gorgond uses the eventfd fallback, else -1 */
    int evt_fd;  /* gorgon_event_fd's pipe (read end), else -1 */
    bool evt_asking; /* IPC_OP_EVENT_FD in flight: its fd message is expected */
    bool evt_armed;  /* gorgon_event_arm left NEED_WAKEUP set on the CQ */
    uint32_t flags;
    int64_t spin_ns;
    bool spin_auto; /* default spin: only while there are CPUs to spare */
    uint32_t n_slots;
    size_t in_cap, out_cap;
    uint32_t inflight;
    bool dead;
    uint8_t *slot_state;   /* enum slot_state per slot */
    uint32_t *free_slots;  /* stack of free slot indices */
    uint32_t n_free;
    uint32_t *release_q;   /* auto slots whose final completion was returned */
    uint32_t n_release;
    uint64_t seq;
    uint32_t session_id;
    /* generation */
    uint32_t *consume;     /* output bytes per slot returned to the caller, handed
                            * back to gorgond (out_consumed) at the next call */
    uint32_t *consume_list, n_consume;
    uint32_t *gen_flags;   /* GORGON_GEN_* of the generation on the slot */
    uint64_t *gen_seed;    /* its sampling seed (reported in the final usage) */
    uint32_t *gen_no;      /* generation count of the slot's request handle */
    struct ipc_cqe *stash; /* completions popped but not yet returned, FIFO */
    uint32_t n_stash, stash_cap;
    char *chat_template;   /* gorgon_model_info's, owned here */
    char last_error[256];  /* gorgon_last_error */
};

static _Thread_local char last_socket[108];
static _Thread_local char last_refusal[64];

const char *gorgon_last_socket(void) { return last_socket; }
const char *gorgon_last_refusal(void) { return last_refusal; }

const char *gorgon_strerror(int err)
{
    switch (err) {
    case -EPIPE: return "gorgond went away (connection lost)";
    case -EUSERS: return "gorgond has too many clients";
    case -EACCES: return "not allowed by gorgond (uid/gid not in its allow-list)";
    case -EPROTONOSUPPORT: return "gorgond speaks another ABI version";
    case -EPROTO: return "protocol error (corrupt shared ring)";
    default: return cm_strerror(err);
    }
}

void gorgon_close(gorgon_client *cli)
{
    if (!cli)
        return;
    int saved = errno;
    ipc_region_unmap(&cli->reg);
    if (cli->sock >= 0)
        close(cli->sock);
    if (cli->wake_fd >= 0)
        close(cli->wake_fd);
    if (cli->evt_fd >= 0)
        close(cli->evt_fd);
    free(cli->slot_state);
    free(cli->free_slots);
    free(cli->release_q);
    free(cli->consume);
    free(cli->consume_list);
    free(cli->gen_flags);
    free(cli->gen_seed);
    free(cli->gen_no);
    free(cli->stash);
    free(cli->chat_template);
    free(cli);
    errno = saved;
}

static int connect_impl(gorgon_client **out, const gorgon_opts *opts)
{
    if (!out)
        return -EINVAL;
    *out = NULL;
    last_refusal[0] = '\0';
    const char *path = ipc_socket_path(opts ? opts->socket_path : NULL);
    snprintf(last_socket, sizeof(last_socket), "%s", path);
    gorgon_client *cli = calloc(1, sizeof(*cli));
    if (!cli)
        return -ENOMEM;
    cli->sock = -1;
    cli->wake_fd = -1;
    cli->evt_fd = -1;
    cli->reg.fd = -1;
    cli->flags = opts ? opts->flags : 0;
    cli->spin_ns = opts && opts->spin_ns > 0 ? opts->spin_ns : GORGON_DEFAULT_SPIN_NS;
    cli->spin_auto = !(opts && opts->spin_ns > 0);
    if (cli->flags & GORGON_NO_SPIN) {
        cli->spin_ns = 0;
        cli->spin_auto = false;
    }

    int rc = ipc_ctl_connect(path);
    if (rc < 0)
        goto fail;
    cli->sock = rc;
    struct ipc_welcome w;
    rc = ipc_ctl_client_handshake_wake(cli->sock, &w, &cli->wake_fd);
    if (rc < 0) {
        snprintf(last_refusal, sizeof(last_refusal), "%s", w.reason);
        goto fail;
    }
    rc = ipc_region_map(&cli->reg, rc);
    if (rc < 0)
        goto fail;
    if ((rc = ipc_region_sq(&cli->reg, IPC_RING_PRODUCER, &cli->sq)) < 0 ||
        (rc = ipc_region_cq(&cli->reg, IPC_RING_CONSUMER, &cli->cq)) < 0)
        goto fail;
    if (cli->wake_fd >= 0 && (rc = ipc_ring_set_wake_fd(&cli->sq, cli->wake_fd)) < 0)
        goto fail;
    cli->session_id = w.session_id;
    cli->n_slots = cli->reg.layout.n_slots;
    cli->in_cap = cli->reg.layout.slot_in_bytes;
    cli->out_cap = cli->reg.layout.slot_out_bytes;
    cli->slot_state = calloc(cli->n_slots, 1);
    cli->free_slots = calloc(cli->n_slots, sizeof(uint32_t));
    cli->release_q = calloc(cli->n_slots, sizeof(uint32_t));
    cli->consume = calloc(cli->n_slots, sizeof(uint32_t));
    cli->consume_list = calloc(cli->n_slots, sizeof(uint32_t));
    cli->gen_flags = calloc(cli->n_slots, sizeof(uint32_t));
    cli->gen_seed = calloc(cli->n_slots, sizeof(uint64_t));
    cli->gen_no = calloc(cli->n_slots, sizeof(uint32_t));
    rc = -ENOMEM;
    if (!cli->slot_state || !cli->free_slots || !cli->release_q || !cli->consume ||
        !cli->consume_list || !cli->gen_flags || !cli->gen_seed || !cli->gen_no)
        goto fail;
    /* Lowest index on top: slot 0 is handed out first. */
    for (uint32_t i = 0; i < cli->n_slots; i++)
        cli->free_slots[i] = cli->n_slots - 1 - i;
    cli->n_free = cli->n_slots;
    *out = cli;
    return 0;
fail:
    gorgon_close(cli);
    return rc;
}

int gorgon_fd(const gorgon_client *cli) { return cli ? cli->sock : -EINVAL; }
uint32_t gorgon_inflight(const gorgon_client *cli) { return cli ? cli->inflight : 0; }
uint32_t gorgon_session_id(const gorgon_client *cli) { return cli ? cli->session_id : 0; }

/* One non-blocking look at the control socket. gorgond writes after the
 * welcome only to answer gorgon_event_fd, so anything but silence otherwise
 * means it is gone. */
static bool peer_gone(gorgon_client *cli)
{
    if (cli->dead)
        return true;
    struct pollfd p = {.fd = cli->sock, .events = POLLIN | POLLRDHUP};
    int n = poll(&p, 1, 0);
    short gone = POLLHUP | POLLRDHUP | POLLERR | POLLNVAL | (cli->evt_asking ? 0 : POLLIN);
    if (n > 0 && (p.revents & gone))
        cli->dead = true;
    return cli->dead;
}

/* ---- slots ----------------------------------------------------------------- */

int gorgon_slot_acquire(gorgon_client *cli)
{
    if (!cli)
        return -EINVAL;
    if (!cli->n_free)
        return -EAGAIN;
    uint32_t s = cli->free_slots[--cli->n_free];
    cli->slot_state[s] = SLOT_USER;
    return (int)s;
}

static void slot_put(gorgon_client *cli, uint32_t slot)
{
    cli->slot_state[slot] = SLOT_FREE;
    cli->free_slots[cli->n_free++] = slot;
}

int gorgon_slot_release(gorgon_client *cli, uint32_t slot)
{
    if (!cli || slot >= cli->n_slots || cli->slot_state[slot] != SLOT_USER)
        return -EINVAL;
    slot_put(cli, slot);
    return 0;
}

void *gorgon_slot_input(gorgon_client *cli, uint32_t slot, size_t *cap)
{
    if (!cli || slot >= cli->n_slots)
        return NULL;
    if (cap)
        *cap = cli->in_cap;
    return ipc_region_slot_in(&cli->reg, slot);
}

const void *gorgon_slot_output(gorgon_client *cli, uint32_t slot, size_t *cap)
{
    if (!cli || slot >= cli->n_slots)
        return NULL;
    if (cap)
        *cap = cli->out_cap;
    return ipc_region_slot_out(&cli->reg, slot);
}

/* ---- submit ----------------------------------------------------------------- */

static int fill_sqe(gorgon_client *cli, const gorgon_request *rq, struct ipc_sqe *sqe)
{
    bool uses_slot = rq->opcode != GORGON_OP_NOP;
    if (rq->opcode >= IPC_OP__COUNT || (uses_slot && rq->slot >= cli->n_slots) ||
        rq->in_len > cli->in_cap)
        return -EINVAL;
    memset(sqe, 0, sizeof(*sqe));
    sqe->opcode = (uint8_t)rq->opcode;
    sqe->slot = uses_slot ? rq->slot : 0;
    sqe->user_data = rq->user_data;
    sqe->in_len = rq->in_len;
    return 0;
}

/* Full ring: the one place where a submitter can learn that gorgond died
 * without waiting (it will never drain the ring again). */
static int full_or_dead(gorgon_client *cli)
{
    return peer_gone(cli) ? -EPIPE : -EAGAIN;
}

/* Push one request and ring gorgond's doorbell: 0, -EAGAIN (SQ full),
 * -EPIPE or a ring error. The caller's own bookkeeping follows a 0. */
static int push_one(gorgon_client *cli, const struct ipc_sqe *sqe)
{
    int rc = ipc_ring_push(&cli->sq, sqe);
    if (rc == -EAGAIN)
        return full_or_dead(cli);
    if (rc < 0)
        return rc;
    cli->inflight++;
    ipc_doorbell_notify(&cli->sq);
    return 0;
}

static int submit_impl(gorgon_client *cli, const gorgon_request *req)
{
    if (!cli || !req)
        return -EINVAL;
    if (cli->dead)
        return -EPIPE;
    struct ipc_sqe sqe;
    CM_TRY(fill_sqe(cli, req, &sqe));
    return push_one(cli, &sqe);
}

static int submit_burst_impl(gorgon_client *cli, const gorgon_request *reqs, uint32_t n)
{
    if (!cli || (!reqs && n))
        return -EINVAL;
    if (cli->dead)
        return -EPIPE;
    /* Check everything first: on -EINVAL nothing has been pushed. */
    for (uint32_t i = 0; i < n; i++) {
        struct ipc_sqe probe;
        CM_TRY(fill_sqe(cli, &reqs[i], &probe));
    }
    uint32_t done = 0;
    while (done < n) {
        struct ipc_sqe sqes[GORGON_BURST];
        uint32_t k = n - done < GORGON_BURST ? n - done : GORGON_BURST;
        for (uint32_t i = 0; i < k; i++)
            (void)fill_sqe(cli, &reqs[done + i], &sqes[i]);
        int rc = ipc_ring_push_burst(&cli->sq, sqes, k);
        if (rc < 0)
            return rc;
        done += (uint32_t)rc;
        cli->inflight += (uint32_t)rc;
        if ((uint32_t)rc < k)
            break;
    }
    if (done)
        ipc_doorbell_notify(&cli->sq);
    else if (n)
        return peer_gone(cli) ? -EPIPE : 0;
    return (int)done;
}

static int submit_auto(gorgon_client *cli, uint32_t op, const void *payload, size_t len,
                       uint64_t arg0, uint64_t user_data, uint32_t *slot_out)
{
    if (!cli || (len && !payload))
        return -EINVAL;
    if (cli->dead)
        return -EPIPE;
    if (len > cli->in_cap)
        return -EMSGSIZE;
    if (!cli->n_free)
        return -EAGAIN;
    uint32_t slot = cli->free_slots[cli->n_free - 1];
    if (len)
        memcpy(ipc_region_slot_in(&cli->reg, slot), payload, len);
    struct ipc_sqe sqe = {.opcode = (uint8_t)op, .slot = slot, .user_data = user_data,
                          .in_len = (uint32_t)len, .arg = {arg0}};
    CM_TRY(push_one(cli, &sqe));
    cli->n_free--;
    cli->slot_state[slot] = SLOT_AUTO;
    if (slot_out)
        *slot_out = slot;
    return 0;
}

int gorgon_submit_ping(gorgon_client *cli, const void *payload, size_t len, uint64_t user_data)
{
    KEEP_ERRNO(submit_auto(cli, IPC_OP_PING, payload, len, 0, user_data, NULL));
}

int gorgon_submit_nop(gorgon_client *cli, uint64_t user_data)
{
    if (!cli)
        return -EINVAL;
    gorgon_request rq = {.opcode = GORGON_OP_NOP, .user_data = user_data};
    KEEP_ERRNO(submit_impl(cli, &rq));
}

/* ---- completions ------------------------------------------------------------ */

static void convert(gorgon_client *cli, const struct ipc_cqe *c, gorgon_completion *o)
{
    o->user_data = c->user_data;
    o->result = c->result;
    o->opcode = c->opcode;
    o->slot = c->slot;
    o->flags = c->flags & IPC_CQE_F_MORE;
    o->out = NULL;
    o->out_len = 0;
    bool more = (c->flags & IPC_CQE_F_MORE) != 0;
    if (!more && cli->inflight)
        cli->inflight--;
    if (c->opcode == IPC_OP_NOP)
        return;
    if (c->slot >= cli->n_slots) {
        if (o->result >= 0)
            o->result = -EPROTO;
        return;
    }
    memcpy(o->arg, c->arg, sizeof(o->arg));
    if (c->out_len) {
        uint64_t end = (uint64_t)c->out_off + c->out_len;
        if (end > cli->out_cap) {
            if (o->result >= 0)
                o->result = -EPROTO;
        } else {
            o->out = ipc_region_slot_out(&cli->reg, c->slot) + c->out_off;
            o->out_len = c->out_len;
        }
    }
    if (c->opcode == IPC_OP_GENERATE && cli->slot_state[c->slot] == SLOT_GEN) {
        /* Hand the bytes back at the next call (they stay readable until then). */
        if (more && o->out_len) {
            if (!cli->consume[c->slot])
                cli->consume_list[cli->n_consume++] = c->slot;
            cli->consume[c->slot] += (uint32_t)o->out_len;
        }
        if (!more) {
            cli->slot_state[c->slot] = SLOT_AUTO_DONE;
            cli->release_q[cli->n_release++] = c->slot;
        }
        return;
    }
    if (!more && cli->slot_state[c->slot] == SLOT_AUTO) {
        cli->slot_state[c->slot] = SLOT_AUTO_DONE;
        cli->release_q[cli->n_release++] = c->slot;
    }
}

/* Completions and output returned by the previous call: the caller has had
 * its chance to read them. */
static void settle(gorgon_client *cli)
{
    if (cli->evt_armed) {
        /* The caller was woken (or looked anyway): gorgond need not write
         * the event fd for every completion until the next arm. */
        ipc_doorbell_finish(&cli->cq);
        cli->evt_armed = false;
    }
    for (uint32_t i = 0; i < cli->n_consume; i++) {
        uint32_t s = cli->consume_list[i];
        if (cli->slot_state[s] == SLOT_GEN) {
            _Atomic uint32_t *oc =
                (_Atomic uint32_t *)&ipc_region_slot(&cli->reg, s)->out_consumed;
            /* R: pairs with gorgond's acquire load before it reuses the bytes. */
            atomic_store_explicit(oc, atomic_load_explicit(oc, memory_order_relaxed) +
                                          cli->consume[s],
                                  memory_order_release);
        }
        cli->consume[s] = 0;
    }
    cli->n_consume = 0;
    while (cli->n_release) {
        uint32_t s = cli->release_q[--cli->n_release];
        if (cli->slot_state[s] == SLOT_AUTO_DONE)
            slot_put(cli, s);
    }
}

static int stash_push(gorgon_client *cli, const struct ipc_cqe *c)
{
    if (cli->n_stash == cli->stash_cap) {
        uint32_t cap = cli->stash_cap ? 2 * cli->stash_cap : 64;
        struct ipc_cqe *n = realloc(cli->stash, cap * sizeof(*n));
        if (!n)
            return -ENOMEM;
        cli->stash = n;
        cli->stash_cap = cap;
    }
    cli->stash[cli->n_stash++] = *c;
    return 0;
}

/* Put c back as the oldest kept completion (it is read next). */
static int stash_push_front(gorgon_client *cli, const struct ipc_cqe *c)
{
    CM_TRY(stash_push(cli, c));
    memmove(&cli->stash[1], &cli->stash[0], (cli->n_stash - 1) * sizeof(*c));
    cli->stash[0] = *c;
    return 0;
}

static void stash_take(gorgon_client *cli, uint32_t i, struct ipc_cqe *c)
{
    *c = cli->stash[i];
    memmove(&cli->stash[i], &cli->stash[i + 1], (cli->n_stash - i - 1) * sizeof(*c));
    cli->n_stash--;
}

/* Our own CANCEL requests' completions never reach the caller. */
static bool internal_cqe(gorgon_client *cli, const struct ipc_cqe *c)
{
    if (c->opcode != IPC_OP_CANCEL || (c->user_data & ~0xffffull) != GORGON_CANCEL_UD)
        return false;
    if (cli->inflight)
        cli->inflight--;
    return true;
}

int gorgon_poll(gorgon_client *cli, gorgon_completion *out, uint32_t max)
{
    if (!cli || (!out && max))
        return -EINVAL;
    settle(cli);
    uint32_t done = 0;
    while (done < max && cli->n_stash) {
        struct ipc_cqe c;
        stash_take(cli, 0, &c);
        convert(cli, &c, &out[done++]);
    }
    while (done < max) {
        struct ipc_cqe cqes[GORGON_BURST];
        uint32_t k = max - done < GORGON_BURST ? max - done : GORGON_BURST;
        int n = ipc_ring_pop_burst(&cli->cq, cqes, k);
        if (n < 0) {
            cli->dead = true; /* the session cannot be trusted any more */
            return done ? (int)done : n;
        }
        uint32_t kept = 0;
        for (int i = 0; i < n; i++)
            if (!internal_cqe(cli, &cqes[i]))
                convert(cli, &cqes[i], &out[done + kept++]);
        done += kept;
        if ((uint32_t)n < k)
            break;
    }
    if (!done && cli->dead)
        return -EPIPE;
    return (int)done;
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static int wait_ring(gorgon_client *cli, uint64_t deadline);
static int take_for_slot(gorgon_client *cli, uint32_t slot, uint8_t opcode, uint64_t deadline,
                         struct ipc_cqe *c);

static int wait_impl(gorgon_client *cli, gorgon_completion *out, uint32_t max, int64_t timeout_ns)
{
    int n = gorgon_poll(cli, out, max);
    if (n != 0 || max == 0)
        return n;
    uint64_t deadline = timeout_ns >= 0 ? cm_now_ns() + (uint64_t)timeout_ns : UINT64_MAX;
    for (;;) {
        /* Entries may arrive that gorgon_poll keeps for gorgon_generate_next
         * (or a dying gorgond's last answers): deliver what there is, then
         * wait again until the deadline. */
        int rc = wait_ring(cli, deadline);
        if (rc <= 0)
            return rc;
        if ((n = gorgon_poll(cli, out, max)) != 0)
            return n;
        if (cm_now_ns() >= deadline)
            return 0;
    }
}

int gorgon_connect(gorgon_client **out, const gorgon_opts *opts)
{
    KEEP_ERRNO(connect_impl(out, opts));
}

int gorgon_submit(gorgon_client *cli, const gorgon_request *req)
{
    KEEP_ERRNO(submit_impl(cli, req));
}

int gorgon_submit_burst(gorgon_client *cli, const gorgon_request *reqs, uint32_t n)
{
    KEEP_ERRNO(submit_burst_impl(cli, reqs, n));
}

int gorgon_wait(gorgon_client *cli, gorgon_completion *out, uint32_t max, int64_t timeout_ns)
{
    KEEP_ERRNO(wait_impl(cli, out, max, timeout_ns));
}

int gorgon_wait_prepare(gorgon_client *cli, const uint32_t **addr, uint32_t *val)
{
    if (!cli || !addr || !val)
        return -EINVAL;
    *addr = &cli->cq.sh->doorbell;
    return ipc_doorbell_prepare(&cli->cq, val);
}

void gorgon_wait_finish(gorgon_client *cli)
{
    if (cli)
        ipc_doorbell_finish(&cli->cq);
}

static int event_fd_impl(gorgon_client *cli);

int gorgon_event_fd(gorgon_client *cli)
{
    KEEP_ERRNO(event_fd_impl(cli));
}

static int event_arm_impl(gorgon_client *cli)
{
    if (!cli || cli->evt_fd < 0)
        return -EINVAL;
    settle(cli);
    if (cli->n_stash)
        return 1; /* kept for gorgon_generate_next: not in the ring any more */
    if (cli->dead)
        return -EPIPE;
    /* Drain before the re-check in prepare: a write that lands after it
     * leaves the fd readable for the caller's wait. */
    int rc = ipc_wake_fd_drain(cli->evt_fd);
    if (rc == -EPIPE || (rc == 0 && peer_gone(cli))) {
        cli->dead = true;
        return ipc_ring_empty(&cli->cq) ? -EPIPE : 1;
    }
    if (rc < 0)
        return rc;
    uint32_t val;
    if (ipc_doorbell_prepare(&cli->cq, &val) != 0)
        return 1;
    cli->evt_armed = true;
    return 0;
}

int gorgon_event_arm(gorgon_client *cli)
{
    KEEP_ERRNO(event_arm_impl(cli));
}

/* ---- synchronous conveniences ------------------------------------------------ */

/* Submit one auto-slot request and wait for its completion. */
static int round_trip(gorgon_client *cli, uint32_t op, const void *payload, size_t len,
                      uint64_t arg0, int64_t timeout_ns, gorgon_completion *c, uint64_t *rtt_ns)
{
    if (!cli)
        return -EINVAL;
    if (cli->dead)
        return -EPIPE;
    uint64_t ud = ++cli->seq | (1ull << 63);
    uint64_t t0 = cm_now_ns();
    /* Release what the previous call returned so a slot is free. */
    settle(cli);
    uint32_t slot;
    int rc = submit_auto(cli, op, payload, len, arg0, ud, &slot);
    if (rc < 0)
        return rc;
    /* Other requests may be in flight (a generation streaming): their
     * completions are kept for them while this one is waited for. */
    uint64_t deadline = timeout_ns >= 0 ? t0 + (uint64_t)timeout_ns : UINT64_MAX;
    struct ipc_cqe raw;
    rc = take_for_slot(cli, slot, (uint8_t)op, deadline, &raw);
    if (rc <= 0)
        /* The slot stays ours until its completion comes: a later call
         * that polls releases it. */
        return rc ? rc : -ETIMEDOUT;
    convert(cli, &raw, c);
    if (c->user_data != ud)
        return -EPROTO;
    if (c->result < 0)
        /* gorgond's message, when it sent one, names what was wrong */
        snprintf(cli->last_error, sizeof(cli->last_error), "%.*s",
                 c->out_len < sizeof(cli->last_error) ? (int)c->out_len
                                                       : (int)sizeof(cli->last_error) - 1,
                 c->out ? (const char *)c->out : "");
    if (rtt_ns)
        *rtt_ns = cm_now_ns() - t0;
    return c->result;
}

static int event_fd_impl(gorgon_client *cli)
{
    if (!cli)
        return -EINVAL;
    if (cli->evt_fd >= 0)
        return cli->evt_fd;
    gorgon_completion c;
    cli->evt_asking = true;
    int rc = round_trip(cli, IPC_OP_EVENT_FD, NULL, 0, 0, 1000000000, &c, NULL);
    /* gorgond queued the fd on the socket before it posted the result. */
    int fd = rc == 0 ? ipc_ctl_recv_fd(cli->sock, IPC_FD_EVENT) : rc;
    cli->evt_asking = false;
    if (rc == -EINVAL)
        return -EOPNOTSUPP; /* a gorgond without IPC_OP_EVENT_FD */
    if (fd < 0) {
        if (rc == 0) /* the fd did not arrive: the session cannot be trusted */
            cli->dead = true;
        return fd;
    }
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) != 0)
        rc = cm_neg_errno();
    else
        rc = ipc_ring_set_wake_fd(&cli->cq, fd);
    if (rc < 0) {
        close(fd);
        return rc;
    }
    cli->evt_fd = fd;
    return fd;
}

int gorgon_ping(gorgon_client *cli, const void *payload, size_t len, int64_t timeout_ns,
                uint64_t *rtt_ns)
{
    gorgon_completion c;
    int saved = errno;
    int rc = round_trip(cli, IPC_OP_PING, payload, len, 0, timeout_ns, &c, rtt_ns);
    errno = saved;
    if (rc < 0)
        return rc;
    if ((size_t)rc != len || c.out_len != len || (len && memcmp(c.out, payload, len) != 0))
        return -EIO;
    return rc;
}

/* The STATS round trip: the counters into *s, the reply (with the group
 * rows after the counters) in *c. */
static int stats_round_trip(gorgon_client *cli, gorgon_completion *c, struct ipc_stats *s)
{
    int saved = errno;
    int rc = round_trip(cli, IPC_OP_STATS, NULL, 0, 0, 1000000000, c, NULL);
    errno = saved;
    if (rc < 0)
        return rc;
    if (c->out_len < sizeof(*s) || !c->out)
        return -EPROTO;
    memcpy(s, c->out, sizeof(*s));
    return 0;
}

int gorgon_stats(gorgon_client *cli, gorgon_counters *st)
{
    if (!st)
        return -EINVAL;
    gorgon_completion c;
    struct ipc_stats s;
    int rc = stats_round_trip(cli, &c, &s);
    if (rc < 0)
        return rc;
    st->clients_now = s.clients_now;
    st->clients_total = s.clients_total;
    st->sessions_reclaimed = s.sessions_reclaimed;
    st->requests_total = s.requests_total;
    st->protocol_errors = s.protocol_errors;
    st->loop_wakeups = s.loop_wakeups;
    st->gen_queued = s.gen_queued;
    st->gen_running = s.gen_running;
    st->gen_tokens_total = s.gen_tokens_total;
    st->gen_tokens_per_s = (double)s.gen_tokens_per_s_milli / 1000.0;
    st->kv_blocks_used = s.kv_blocks_used;
    st->kv_blocks_total = s.kv_blocks_total;
    st->decode_batch_max = s.decode_batch_max;
    st->gen_requests_total = s.gen_requests_total;
    st->gen_failed = s.gen_failed;
    st->worker_restarts = s.worker_restarts;
    st->medusa_steps = s.medusa_steps;
    st->medusa_accepted = s.medusa_accepted;
    st->medusa_max_batch = s.medusa_max_batch;
    st->gen_waiting = s.gen_waiting;
    st->handshakes_pending = s.handshakes_pending;
    st->handshakes_dropped = s.handshakes_dropped;
    st->watchdog_kills = s.watchdog_kills;
    st->step_max_us = s.step_max_us;
    st->gen_cancelled = s.gen_cancelled;
    st->gen_handoff_waiting = s.gen_handoff_waiting;
    st->gen_handoffs_total = s.gen_handoffs_total;
    return 0;
}

int gorgon_groups(gorgon_client *cli, gorgon_group *out, size_t cap)
{
    if (cap && !out)
        return -EINVAL;
    gorgon_completion c;
    struct ipc_stats s;
    int rc = stats_round_trip(cli, &c, &s);
    if (rc < 0)
        return rc;
    const size_t rows = (c.out_len - sizeof(s)) / sizeof(struct ipc_group_stats);
    if (s.gen_groups > INT32_MAX || rows > s.gen_groups)
        return -EPROTO;
    for (size_t i = 0; i < rows && i < cap; i++) {
        struct ipc_group_stats r;
        memcpy(&r, (const uint8_t *)c.out + sizeof(s) + i * sizeof(r), sizeof(r));
        gorgon_group *g = &out[i];
        memset(g, 0, sizeof(*g));
        g->group = r.group;
        g->n_ranks = r.n_ranks < GORGON_GROUP_MAX_RANKS ? r.n_ranks : GORGON_GROUP_MAX_RANKS;
        g->state = r.state <= IPC_GROUP_FAILED ? (enum gorgon_group_state)r.state
                                               : GORGON_GROUP_RESTARTING;
        g->in_worker = r.in_worker;
        g->waiting = r.waiting;
        g->queued = r.queued;
        g->running = r.running;
        g->kv_blocks_used = r.kv_blocks_used;
        g->kv_blocks_total = r.kv_blocks_total;
        g->tokens_total = r.tokens_total;
        g->requests_total = r.requests_total;
        g->restarts = r.restarts;
        g->watchdog_kills = r.watchdog_kills;
        g->decode_batch_max = r.decode_batch_max;
        g->step_max_us = r.step_max_us;
        g->medusa_max_batch = r.medusa_max_batch;
        for (uint32_t k = 0; k < g->n_ranks; k++)
            g->pid[k] = r.pid[k];
        g->role = r.role <= IPC_GROUP_DECODE ? (enum gorgon_group_role)r.role
                                             : GORGON_GROUP_COLOCATED;
        g->handoff_waiting = r.handoff_waiting;
        g->handoffs_total = r.handoffs_total;
    }
    return (int)rows;
}

const char *gorgon_last_error(const gorgon_client *cli)
{
    return cli ? cli->last_error : "";
}

/* The model-side round trips wait this long: gorgond answers them from its
 * own loop (the tokenizer is gorgond's), never from the worker. */
#define GORGON_MODEL_RT_NS 5000000000ll

static int model_info_impl(gorgon_client *cli, gorgon_model *out)
{
    if (!cli || !out)
        return -EINVAL;
    memset(out, 0, sizeof(*out));
    char *tmpl = NULL;
    uint32_t have = 0, total = 0;
    struct ipc_model_info mi;
    do {
        gorgon_completion c;
        int rc = round_trip(cli, IPC_OP_MODEL_INFO, NULL, 0, have, GORGON_MODEL_RT_NS, &c, NULL);
        if (rc < 0) {
            free(tmpl);
            return rc;
        }
        if (c.out_len < sizeof(mi) || !c.out) {
            free(tmpl);
            return -EPROTO;
        }
        memcpy(&mi, c.out, sizeof(mi));
        if (!tmpl) {
            total = mi.template_len;
            if (!(tmpl = malloc((size_t)total + 1)))
                return -ENOMEM;
        }
        /* gorgond's answer must continue where we asked, within what it
         * announced: anything else is a broken daemon, not a longer read. */
        if (mi.template_len != total || mi.chunk_off != have || mi.chunk_len > total - have ||
            (mi.chunk_len == 0 && have < total) || c.out_len != sizeof(mi) + mi.chunk_len) {
            free(tmpl);
            return -EPROTO;
        }
        memcpy(tmpl + have, (const uint8_t *)c.out + sizeof(mi), mi.chunk_len);
        have += mi.chunk_len;
    } while (have < total);
    tmpl[total] = '\0';
    free(cli->chat_template);
    cli->chat_template = tmpl;
    mi.name[sizeof(mi.name) - 1] = '\0';
    snprintf(out->name, sizeof(out->name), "%s", mi.name);
    out->n_ctx = mi.n_ctx;
    out->n_vocab = mi.n_vocab;
    out->bos = mi.bos;
    out->eos = mi.eos;
    out->chat_template = tmpl;
    return 0;
}

int gorgon_model_info(gorgon_client *cli, gorgon_model *out)
{
    KEEP_ERRNO(model_info_impl(cli, out));
}

static int tokenize_impl(gorgon_client *cli, const char *text, size_t len, uint32_t flags,
                         int32_t *ids, size_t cap)
{
    if (!cli || (!text && len) || (!ids && cap) || (flags & ~GORGON_TOK_ADD_BOS))
        return -EINVAL;
    gorgon_completion c;
    int rc = round_trip(cli, IPC_OP_TOKENIZE, text, len,
                        (flags & GORGON_TOK_ADD_BOS) ? IPC_TOK_F_ADD_BOS : 0, GORGON_MODEL_RT_NS,
                        &c, NULL);
    if (rc < 0)
        return rc;
    if (c.out_len != (size_t)rc * sizeof(int32_t) || (rc && !c.out))
        return -EPROTO;
    if ((size_t)rc > cap)
        return -ENOSPC;
    if (rc) /* no text, no ids: c.out may be NULL, which memcpy must not get */
        memcpy(ids, c.out, c.out_len);
    return rc;
}

int gorgon_tokenize(gorgon_client *cli, const char *text, size_t len, uint32_t flags,
                    int32_t *ids, size_t cap)
{
    KEEP_ERRNO(tokenize_impl(cli, text, len, flags, ids, cap));
}

static int detokenize_impl(gorgon_client *cli, const int32_t *ids, size_t n, char *out, size_t cap)
{
    if (!cli || (!ids && n) || (!out && cap) || n > SIZE_MAX / sizeof(int32_t))
        return -EINVAL;
    gorgon_completion c;
    int rc = round_trip(cli, IPC_OP_DETOKENIZE, ids, n * sizeof(int32_t), 0, GORGON_MODEL_RT_NS,
                        &c, NULL);
    if (rc < 0)
        return rc;
    if (c.out_len != (size_t)rc || (rc && !c.out))
        return -EPROTO;
    if ((size_t)rc > cap)
        return -ENOSPC;
    if (rc)
        memcpy(out, c.out, (size_t)rc);
    if ((size_t)rc < cap)
        out[rc] = '\0';
    return rc;
}

int gorgon_detokenize(gorgon_client *cli, const int32_t *ids, size_t n, char *out, size_t cap)
{
    KEEP_ERRNO(detokenize_impl(cli, ids, n, out, cap));
}

/* ---- generation ------------------------------------------------------------------ */

const char *gorgon_finish_name(int finish)
{
    switch (finish) {
    case GORGON_FINISH_EOS: return "eos";
    case GORGON_FINISH_STOP: return "stop";
    case GORGON_FINISH_LENGTH: return "length";
    case GORGON_FINISH_CANCELLED: return "cancelled";
    case GORGON_FINISH_ERROR: return "error";
    default: return "none";
    }
}

/* A seed nobody chose: from the kernel's CSPRNG, never 0 (0 means "draw
 * one"), falling back to the clock and a counter if getrandom fails. */
static uint64_t random_seed(void)
{
    static _Atomic uint64_t fallback;
    uint64_t v = 0;
    if (getrandom(&v, sizeof(v), GRND_NONBLOCK) != (ssize_t)sizeof(v))
        v = cm_now_ns() ^ (atomic_fetch_add(&fallback, 1) * 0x9e3779b97f4a7c15ull);
    return v ? v : 1;
}

/* A library-side refusal: rc, with the message gorgon_last_error returns. */
static int fail(gorgon_client *cli, int rc, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(gorgon_client *cli, int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cli->last_error, sizeof(cli->last_error), fmt, ap);
    va_end(ap);
    return rc;
}

/* Send the first len bytes of a long prompt to gorgond in slot-sized
 * IPC_OP_PROMPT_PART pieces on `slot` (ours, SLOT_USER), each waited for
 * (the next piece reuses the slot's input). 0, or -errno with
 * gorgon_last_error set; the slot is given back on failure. */
static int stage_prompt(gorgon_client *cli, uint32_t slot, const uint8_t *src, size_t len)
{
    uint8_t *in = ipc_region_slot_in(&cli->reg, slot);
    for (size_t off = 0; off < len;) {
        size_t k = len - off < cli->in_cap ? len - off : cli->in_cap;
        memcpy(in, src + off, k);
        struct ipc_sqe sqe = {.opcode = IPC_OP_PROMPT_PART, .slot = slot, .in_len = (uint32_t)k,
                              .arg = {off}};
        int rc = push_one(cli, &sqe);
        if (rc < 0) {
            slot_put(cli, slot);
            return fail(cli, rc, "prompt: %s", gorgon_strerror(rc));
        }
        struct ipc_cqe c;
        rc = take_for_slot(cli, slot, IPC_OP_PROMPT_PART, cm_now_ns() + GORGON_MODEL_RT_NS, &c);
        if (rc <= 0) {
            /* Its completion may still come: then the slot is released. */
            cli->slot_state[slot] = SLOT_AUTO;
            return fail(cli, rc ? rc : -ETIMEDOUT, "prompt: gorgond did not take a piece");
        }
        if (cli->inflight)
            cli->inflight--;
        if (c.result < 0) {
            size_t n = c.out_len < sizeof(cli->last_error) ? c.out_len : sizeof(cli->last_error) - 1;
            if (c.out_off + (uint64_t)n > cli->out_cap)
                n = 0;
            memcpy(cli->last_error, ipc_region_slot_out(&cli->reg, slot) + c.out_off, n);
            cli->last_error[n] = '\0';
            slot_put(cli, slot);
            return c.result;
        }
        off += k;
    }
    return 0;
}

static int generate_submit_impl(gorgon_client *cli, const gorgon_gen_params *p,
                                uint64_t user_data, uint32_t *req)
{
    if (!cli)
        return -EINVAL;
    cli->last_error[0] = '\0';
    if (!p || !req)
        return fail(cli, -EINVAL, "%s is NULL", !p ? "params" : "req");
    if (cli->dead)
        return fail(cli, -EPIPE, "gorgond went away");
    bool ids = (p->flags & GORGON_GEN_PROMPT_IDS) != 0;
    if (p->flags & ~(GORGON_GEN_PROMPT_IDS | GORGON_GEN_WANT_IDS | GORGON_GEN_NO_MEDUSA))
        return fail(cli, -EINVAL, "flags: unknown bits 0x%x",
                    p->flags & ~(GORGON_GEN_PROMPT_IDS | GORGON_GEN_WANT_IDS | GORGON_GEN_NO_MEDUSA));
    if (ids && (!p->prompt_ids || !p->n_ids))
        return fail(cli, -EINVAL, "prompt_ids: GORGON_GEN_PROMPT_IDS needs prompt_ids and n_ids >= 1");
    if (!ids && !p->prompt && p->prompt_len)
        return fail(cli, -EINVAL, "prompt: NULL with prompt_len %zu", p->prompt_len);
    if (p->n_stop < 0 || p->n_stop > GORGON_GEN_MAX_STOP)
        return fail(cli, -EINVAL, "n_stop %d: must be in [0, %d]", p->n_stop, GORGON_GEN_MAX_STOP);
    if (p->n_stop && !p->stop)
        return fail(cli, -EINVAL, "stop: NULL with n_stop %d", p->n_stop);
    if (p->max_tokens < 0)
        return fail(cli, -EINVAL, "max_tokens %d: must be >= 1", (int)p->max_tokens);
    if (p->n_ids > UINT32_MAX / sizeof(int32_t))
        return fail(cli, -EMSGSIZE, "prompt_ids: %zu ids is too many", p->n_ids);
    size_t plen = ids ? p->n_ids * sizeof(int32_t)
                      : (p->prompt ? (p->prompt_len ? p->prompt_len : strlen(p->prompt)) : 0);
    size_t slen = 0;
    for (int i = 0; i < p->n_stop; i++) {
        size_t l = p->stop[i] ? strlen(p->stop[i]) : 0;
        if (l == 0 || l > IPC_GEN_MAX_STOP_LEN)
            return fail(cli, -EINVAL, "stop string %d: must be 1..%d bytes", i,
                        IPC_GEN_MAX_STOP_LEN);
        slen += l + 1;
    }
    uint64_t seed = p->seed;
    if (!seed && p->temperature > 0.0f)
        seed = random_seed();
    /* 0 means "off" for top_p in this API (1 on the wire); anything else is
     * checked as gorgond checks it. */
    struct ipc_gen_params gp = {
        .flags = (ids ? IPC_GEN_F_PROMPT_IDS : 0) |
                 (p->flags & GORGON_GEN_WANT_IDS ? IPC_GEN_F_OUT_IDS : 0) |
                 (p->flags & GORGON_GEN_NO_MEDUSA ? IPC_GEN_F_NO_MEDUSA : 0),
        .max_tokens = (uint32_t)p->max_tokens,
        .temperature = p->temperature,
        .top_p = p->top_p == 0.0f ? 1.0f : p->top_p,
        .min_p = p->min_p,
        .repeat_penalty = p->repeat_penalty,
        .top_k = p->top_k,
        .n_stop = (uint32_t)p->n_stop,
        .seed = seed,
        .prompt_off = sizeof(gp),
        .prompt_len = (uint32_t)plen,
        .stop_off = (uint32_t)(sizeof(gp) + plen),
        .stop_len = (uint32_t)slen,
    };
    int rc = ipc_gen_params_check(&gp, cli->last_error, sizeof(cli->last_error));
    if (rc < 0)
        return rc;
    if (sizeof(gp) + slen > cli->in_cap)
        return fail(cli, -EMSGSIZE, "stop strings: %zu bytes, more than a slot's input (%zu) "
                    "holds with the parameters", slen, cli->in_cap);
    if (plen > UINT32_MAX)
        return fail(cli, -EMSGSIZE, "prompt: %zu bytes is too long", plen);
    /* What does not fit the slot with the parameters goes ahead in
     * IPC_OP_PROMPT_PART pieces (gorgond refuses more than the model's
     * context can hold); the GENERATE carries the rest. */
    size_t inline_cap = cli->in_cap - sizeof(gp) - slen;
    size_t head = plen > inline_cap ? plen - inline_cap : 0;
    const uint8_t *src = ids ? (const uint8_t *)p->prompt_ids : (const uint8_t *)p->prompt;
    gp.prompt_len = (uint32_t)(plen - head);
    gp.stop_off = (uint32_t)(sizeof(gp) + plen - head);
    if (head)
        gp.flags |= IPC_GEN_F_STAGED;
    size_t total = sizeof(gp) + (plen - head) + slen;
    settle(cli);
    if (!cli->n_free)
        return fail(cli, -EAGAIN, "every slot is busy (%u in flight)", cli->inflight);
    uint32_t slot = cli->free_slots[--cli->n_free];
    cli->slot_state[slot] = SLOT_USER;
    if (head && (rc = stage_prompt(cli, slot, src, head)) < 0)
        return rc;
    uint8_t *in = ipc_region_slot_in(&cli->reg, slot);
    memcpy(in, &gp, sizeof(gp));
    if (plen - head)
        memcpy(in + sizeof(gp), src + head, plen - head);
    uint8_t *sp = in + sizeof(gp) + (plen - head);
    for (int i = 0; i < p->n_stop; i++) {
        size_t l = strlen(p->stop[i]) + 1;
        memcpy(sp, p->stop[i], l);
        sp += l;
    }
    /* A new stream starts at position 0 of the output ring. */
    atomic_store_explicit((_Atomic uint32_t *)&ipc_region_slot(&cli->reg, slot)->out_consumed, 0,
                          memory_order_relaxed);
    struct ipc_sqe sqe = {.opcode = IPC_OP_GENERATE, .slot = slot, .user_data = user_data,
                          .in_len = (uint32_t)total};
    if ((rc = push_one(cli, &sqe)) < 0) {
        slot_put(cli, slot); /* gorgond drops what was staged at the slot's next use */
        return rc;
    }
    cli->slot_state[slot] = SLOT_GEN;
    cli->gen_flags[slot] = p->flags;
    cli->gen_seed[slot] = seed;
    /* The handle: the slot and how many generations it has run, so that a
     * handle kept after its request ended never names the slot's next one. */
    uint32_t g = (cli->gen_no[slot] + 1) & GORGON_REQ_GEN_MASK;
    cli->gen_no[slot] = g ? g : 1;
    *req = slot | (cli->gen_no[slot] << GORGON_REQ_SLOT_BITS);
    return 0;
}

int gorgon_generate_submit(gorgon_client *cli, const gorgon_gen_params *p, uint64_t user_data,
                           uint32_t *req)
{
    KEEP_ERRNO(generate_submit_impl(cli, p, user_data, req));
}

void gorgon_generate_chunk_of(gorgon_client *cli, const gorgon_completion *c,
                              gorgon_gen_chunk *ch)
{
    memset(ch, 0, sizeof(*ch));
    bool more = (c->flags & GORGON_CQE_F_MORE) != 0;
    ch->done = !more;
    bool want_ids = cli && c->slot < cli->n_slots && (cli->gen_flags[c->slot] & GORGON_GEN_WANT_IDS);
    if (!more) {
        ch->finish = (int)(c->arg[0] & IPC_GEN_FINISH_MASK);
        ch->usage.medusa_accepted = (uint32_t)(c->arg[0] >> 8) & 0xffffffu;
        ch->usage.medusa_steps = (uint32_t)(c->arg[0] >> 32);
        ch->error = c->result < 0 ? c->result : 0;
        ch->usage.prompt_tokens = (uint32_t)c->arg[1];
        ch->usage.completion_tokens = (uint32_t)(c->arg[1] >> 32);
        ch->usage.ttft_ns = c->arg[2];
        ch->usage.total_ns = c->arg[3];
        if (cli && c->slot < cli->n_slots)
            ch->usage.seed = cli->gen_seed[c->slot];
        if (ch->error && ch->finish == GORGON_FINISH_NONE)
            ch->finish = GORGON_FINISH_ERROR;
    }
    if (want_ids && !ch->error) {
        ch->ids = c->out_len ? (const int32_t *)c->out : NULL;
        ch->n_ids = c->out_len / sizeof(int32_t);
    } else {
        ch->text = c->out ? (const char *)c->out : "";
        ch->len = c->out_len;
    }
}

/* Spin until the CQ has entries, up to spin_end: 1, 0 at the deadline,
 * -EPIPE, or 2 when the spin ended without entries. */
static int spin_ring(gorgon_client *cli, uint64_t spin_end, uint64_t deadline)
{
    uint64_t next_check = cm_now_ns() + GORGON_HUP_CHECK_NS;
    for (unsigned i = 1;; i++) {
        if (!ipc_ring_empty(&cli->cq))
            return 1;
        if ((i & 63u) == 0) {
            uint64_t now = cm_now_ns();
            if (now >= deadline)
                return 0;
            if (now >= spin_end)
                return 2;
            if (now >= next_check) {
                if (peer_gone(cli))
                    return -EPIPE;
                next_check = now + GORGON_HUP_CHECK_NS;
            }
        }
        cpu_relax();
    }
}

/* Wait until the CQ has entries: 1, 0 at the deadline, -EPIPE. */
static int wait_ring(gorgon_client *cli, uint64_t deadline)
{
    uint64_t start = cm_now_ns();
    int rc;
    if (cli->flags & GORGON_BUSY_POLL) {
        rc = spin_ring(cli, deadline, deadline);
    } else if (!cli->spin_auto) {
        rc = spin_ring(cli, start + (uint64_t)cli->spin_ns, deadline);
    } else if (cm_spinners_add(1) + 2 <= cm_cpus_usable()) {
        /* The default spin is a loan: taken only while this thread (and the
         * other spinning threads of this process), gorgond's loop and one
         * worker thread can each have a CPU; otherwise spinning would take
         * the CPU that the answer needs, and we sleep at once. */
        rc = spin_ring(cli, start + (uint64_t)cli->spin_ns, deadline);
        cm_spinners_add(-1);
    } else {
        cm_spinners_add(-1);
        rc = 2;
    }
    if (rc != 2)
        return rc;
    for (;;) {
        uint32_t val;
        if (ipc_doorbell_prepare(&cli->cq, &val) != 0)
            return 1;
        uint64_t now = cm_now_ns();
        if (now >= deadline) {
            ipc_doorbell_finish(&cli->cq);
            return 0;
        }
        uint64_t slice = deadline - now < GORGON_HUP_CHECK_NS ? deadline - now : GORGON_HUP_CHECK_NS;
        /* With an event fd gorgond writes that instead of waking the futex. */
        rc = cli->evt_fd >= 0 ? ipc_wake_fd_wait(cli->evt_fd, (int64_t)slice)
                             : ipc_futex_wait(&cli->cq.sh->doorbell, val, (int64_t)slice);
        ipc_doorbell_finish(&cli->cq);
        if (!ipc_ring_empty(&cli->cq))
            return 1;
        if ((rc == -ETIMEDOUT || rc == -EPIPE) && peer_gone(cli))
            return ipc_ring_empty(&cli->cq) ? -EPIPE : 1;
    }
}

/* The next completion for `slot` with `opcode`, waiting until deadline:
 * 1 (in *c), 0 at the deadline, or -errno. Completions for other requests
 * that arrive meanwhile are kept, in order, for whoever asks for them
 * (gorgon_poll, gorgon_generate_next): a round trip or one stream never
 * takes another's. */
static int take_for_slot(gorgon_client *cli, uint32_t slot, uint8_t opcode, uint64_t deadline,
                         struct ipc_cqe *c)
{
    for (;;) {
        for (uint32_t i = 0; i < cli->n_stash; i++) {
            if (cli->stash[i].slot == slot && cli->stash[i].opcode == opcode) {
                stash_take(cli, i, c);
                return 1;
            }
        }
        /* Move what gorgond posted into the stash, in order. */
        struct ipc_cqe cqes[GORGON_BURST];
        int n = ipc_ring_pop_burst(&cli->cq, cqes, GORGON_BURST);
        if (n < 0) {
            cli->dead = true;
            return -EPIPE;
        }
        for (int i = 0; i < n; i++)
            if (!internal_cqe(cli, &cqes[i]) && stash_push(cli, &cqes[i]) < 0)
                return -ENOMEM;
        if (n > 0)
            continue;
        if (cli->dead)
            return -EPIPE;
        int rc = wait_ring(cli, deadline);
        if (rc <= 0)
            return rc;
    }
}

/* The slot of a running generation's handle, or -1 (never issued, already
 * finished, or stale: its slot has moved on to a newer request). */
static int64_t req_slot(const gorgon_client *cli, uint32_t req)
{
    uint32_t slot = req & ((1u << GORGON_REQ_SLOT_BITS) - 1u);
    if (slot >= cli->n_slots || cli->slot_state[slot] != SLOT_GEN ||
        cli->gen_no[slot] != req >> GORGON_REQ_SLOT_BITS)
        return -1;
    return slot;
}

static int generate_next_impl(gorgon_client *cli, uint32_t handle, gorgon_gen_chunk *ch,
                              int64_t timeout_ns)
{
    if (!cli || !ch)
        return -EINVAL;
    memset(ch, 0, sizeof(*ch));
    int64_t r = req_slot(cli, handle);
    if (r < 0)
        return fail(cli, -EINVAL, "request 0x%x: not a running generation of this client "
                    "(finished, stale or never issued)", handle);
    uint32_t req = (uint32_t)r;
    settle(cli);
    uint64_t deadline = timeout_ns >= 0 ? cm_now_ns() + (uint64_t)timeout_ns : UINT64_MAX;
    struct ipc_cqe c;
    int rc = take_for_slot(cli, req, IPC_OP_GENERATE, deadline, &c);
    if (rc <= 0)
        return rc ? rc : -ETIMEDOUT;
    if (!(c.flags & IPC_CQE_F_MORE) && c.out_len && c.result >= 0) {
        /* The final completion carries the last text: hand that out as an
         * ordinary chunk now and the final one, without text, next time,
         * so that `while (gorgon_generate_next(...) == 1) print(chunk)`
         * prints everything. */
        struct ipc_cqe fin = c;
        fin.out_len = 0;
        if ((rc = stash_push_front(cli, &fin)) < 0)
            return rc;
        c.flags |= IPC_CQE_F_MORE;
        c.result = (int32_t)c.out_len;
    }
    gorgon_completion o;
    convert(cli, &c, &o);
    gorgon_generate_chunk_of(cli, &o, ch);
    if (!ch->done)
        return 1;
    return ch->error ? ch->error : 0;
}

int gorgon_generate_next(gorgon_client *cli, uint32_t req, gorgon_gen_chunk *chunk,
                         int64_t timeout_ns)
{
    KEEP_ERRNO(generate_next_impl(cli, req, chunk, timeout_ns));
}

static int cancel_impl(gorgon_client *cli, uint32_t req)
{
    if (!cli)
        return -EINVAL;
    if (cli->dead)
        return -EPIPE;
    int64_t slot = req_slot(cli, req);
    if (slot < 0)
        return fail(cli, -ENOENT, "request 0x%x: not a running generation of this client "
                    "(finished, stale or never issued)", req);
    struct ipc_sqe sqe = {.opcode = IPC_OP_CANCEL, .slot = (uint32_t)slot,
                          .user_data = GORGON_CANCEL_UD | (uint64_t)slot};
    return push_one(cli, &sqe);
}

int gorgon_cancel(gorgon_client *cli, uint32_t req)
{
    KEEP_ERRNO(cancel_impl(cli, req));
}
