/* ap_int.h — gorgond internals shared by ap_loop.c, ap_session.c and
 * ap_config.c. Never included outside appliance/. */
#ifndef GORGON_AP_INT_H
#define GORGON_AP_INT_H

#include <liburing.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/signalfd.h>

#include "appliance/ap.h"
#include "ipc/ipc.h"

/* io_uring user_data: [tag:8][gen:24][index:32]. The generation makes a
 * completion that arrives after its session was reclaimed (and the index
 * reused) recognisably stale. */
enum ap_tag {
    AP_TAG_NONE = 0, /* completions we do not care about (cancels, link timeouts) */
    AP_TAG_ACCEPT,
    AP_TAG_SIGNAL,
    AP_TAG_STATS,
    AP_TAG_HELLO,  /* POLLIN on a connection waiting for its hello */
    AP_TAG_HUP,    /* POLLRDHUP|POLLHUP on an established session's socket */
    AP_TAG_FUTEX,  /* FUTEX_WAIT on a session's SQ doorbell (or POLLIN on its wake eventfd) */
    AP_TAG_WK_EVT, /* FUTEX_WAIT on the worker's event ring doorbell (or its eventfd) */
    AP_TAG_WK_PID, /* POLLIN on the worker's pidfd: it exited */
};

static inline uint64_t ap_ud(enum ap_tag tag, uint32_t gen, uint32_t idx)
{
    return ((uint64_t)tag << 56) | ((uint64_t)(gen & 0xffffffu) << 32) | idx;
}
static inline enum ap_tag ap_ud_tag(uint64_t ud) { return (enum ap_tag)(ud >> 56); }
static inline uint32_t ap_ud_gen(uint64_t ud) { return (uint32_t)(ud >> 32) & 0xffffffu; }
static inline uint32_t ap_ud_idx(uint64_t ud) { return (uint32_t)ud; }

enum ap_sess_state {
    AP_SESS_FREE = 0,
    AP_SESS_HELLO, /* accepted, waiting for the hello */
    AP_SESS_LIVE,  /* region handed over, serving */
};

/* Most descriptors handled per ring per pass: bounds the time one busy
 * client can hold the loop and sizes the on-stack burst buffers. */
#define AP_BURST 64u

/* Busy-poll budget of poll_us = auto, when the CPUs allow spinning. */
#define AP_POLL_US_AUTO 50

/* Distinct uids tracked when choosing which pending handshake to drop. */
#define AP_MAX_PENDING_UIDS 64u

typedef struct ap_session {
    enum ap_sess_state state;
    uint32_t gen;
    uint32_t idx;
    int sock;
    int wake_fd; /* SQ wake eventfd (fallback without IORING_OP_FUTEX_WAIT), else -1 */
    int evt_fd;  /* write end of the CQ wake pipe (IPC_OP_EVENT_FD), else -1 */
    uid_t uid;  /* SO_PEERCRED at accept */
    pid_t pid;
    uint64_t t_accept; /* cm_now_ns() at accept: the oldest pending handshake goes first */
    ipc_region reg;
    ipc_ring sq; /* consumer */
    ipc_ring cq; /* producer */
    /* slot_busy_until[s]: CQ position just after the completion that last
     * used slot s. The slot is in flight until the client's CQ head passes
     * it (the client has consumed the completion and may reuse the slot). */
    uint32_t *slot_busy_until;
    uint8_t *slot_used; /* slot has ever been used (busy_until meaningful) */
    int32_t *slot_gen;  /* generate request running on the slot (ap_gen.c index), else -1 */
    uint32_t live_pos;  /* position in ap_server.live while LIVE */
    uint32_t n_gen_active; /* generate requests whose final is not posted yet */
    uint64_t last_served;  /* fair admission: when one of its requests last went to the worker */
    /* IPC_OP_PROMPT_PART: bytes staged per slot (allocated at the first
     * part), and their sum, capped by ap_gen's prompt limit. */
    uint8_t **stage;
    uint32_t *stage_len;
    uint32_t stage_n; /* entries of stage[] (the session's n_slots) */
    size_t staged;
    bool hello_armed, hup_armed, futex_armed;
    uint64_t requests;
} ap_session;

typedef struct ap_counters {
    uint64_t clients_total;
    uint64_t sessions_reclaimed;
    uint64_t requests_total;
    uint64_t protocol_errors;
    uint64_t bad_requests;
    uint64_t loop_wakeups;
    uint64_t refused;
    uint64_t handshakes_dropped; /* pending ones evicted or timed out */
} ap_counters;

struct ap_server {
    ap_config cfg;
    struct io_uring ring;
    bool ring_ok;
    int listen_fd;
    int signal_fd;
    bool futex_uring; /* IORING_OP_FUTEX_WAIT usable; else eventfd doorbells */
    uint64_t poll_ns; /* busy-poll budget in effect (cfg.poll_us resolved) */
    bool accept_armed;
    bool stopping;
    int fatal;                 /* -errno ap_server_run returns once stopping (0: a clean stop) */
    bool draining;             /* SIGTERM with generations in flight: finish them first */
    uint64_t drain_deadline;   /* cm_now_ns() after which they are cancelled */
    struct ap_gen_state *gen;  /* ap_gen.c */
    struct signalfd_siginfo sigbuf;
    struct __kernel_timespec stats_ts, hello_ts;
    ap_session *sess;  /* table of n_sess entries */
    uint32_t n_sess;   /* max_clients + handshake headroom */
    uint32_t n_live;   /* established sessions: live[0..n_live) */
    uint32_t *live;    /* indices of live sessions, packed: the poll loop
                        * touches only these, however large the table */
    uint32_t n_used;   /* live + handshaking */
    uint32_t n_pending; /* handshaking (AP_SESS_HELLO) */
    uint64_t refusal_log_ns, refusals_unlogged; /* rate limit of refusal warnings */
    ap_counters ctr;
    ipc_allow allow;
};

/* Get an SQE, submitting the queue first when it is full. Never NULL unless
 * the kernel refuses to take SQEs (then the error is logged). */
struct io_uring_sqe *ap_get_sqe(struct ap_server *srv);

/* ap_session.c */
/* Accepted connection: check its credentials, take a table entry (making
 * room within the pending-handshake limits) and read or wait for its hello. */
void ap_session_accepted(struct ap_server *srv, int fd);
/* The hello poll fired (res = poll mask or -errno): finish the handshake. */
void ap_session_hello(struct ap_server *srv, ap_session *s, int res);
/* Serve what is on the session's SQ: > 0 descriptors handled, 0 nothing,
 * < 0 the session was disconnected (protocol error). */
int ap_session_poll(struct ap_server *srv, ap_session *s);
/* Drop a session: cancel its io_uring ops, unmap, close, count it. */
void ap_session_close(struct ap_server *srv, ap_session *s, const char *why);
/* Arm the doorbell wait before sleeping. 1: work is already there (don't
 * sleep), 0: armed (or already armed). */
int ap_session_arm(struct ap_server *srv, ap_session *s);
/* After waking: clear NEED_WAKEUP so the client stops ringing while we poll. */
void ap_session_disarm_flag(ap_session *s);
void ap_fill_stats(const struct ap_server *srv, struct ipc_stats *st);

/* ap_gen.c: generation, the worker process (see the file's comment). */
/* Load the tokenizer and start the worker when cfg.model is set. */
int ap_gen_create(struct ap_server *srv);
void ap_gen_destroy(struct ap_server *srv); /* kills the worker */
/* Worker events in, pending output out: > 0 when something was done. */
int ap_gen_poll(struct ap_server *srv);
/* Output is waiting for a client to read (or reap): sleep with a timeout. */
bool ap_gen_busy(const struct ap_server *srv);
/* Requests whose client has not had the final completion yet. */
uint32_t ap_gen_active(const struct ap_server *srv);
/* Before sleeping: 1 when events are already there, else 0 (wait armed). */
int ap_gen_arm(struct ap_server *srv);
/* cm_now_ns() by which the worker must have made progress (the watchdog
 * then kills it), or 0: the loop must not sleep past it. */
uint64_t ap_gen_deadline(const struct ap_server *srv);
void ap_gen_disarm_flag(struct ap_server *srv);
void ap_gen_dispatch(struct ap_server *srv, uint64_t ud, int res);
/* IPC_OP_GENERATE: 1 when cqe holds an immediate (error) completion, 0 when
 * the request was started (its completions come from ap_gen_poll). */
int ap_gen_submit(struct ap_server *srv, ap_session *s, const struct ipc_sqe *sqe,
                  struct ipc_cqe *cqe);
/* IPC_OP_MODEL_INFO, IPC_OP_TOKENIZE, IPC_OP_DETOKENIZE (always complete
 * at once: 1). */
int ap_gen_model_info(struct ap_server *srv, ap_session *s, const struct ipc_sqe *sqe,
                      struct ipc_cqe *cqe);
/* The worker has loaded the model and said READY (since its last start). */
bool ap_gen_ready(const struct ap_server *srv);
int ap_gen_prompt_part(struct ap_server *srv, ap_session *s, const struct ipc_sqe *sqe,
                       struct ipc_cqe *cqe);
/* Drop what a slot (or, slot UINT32_MAX, every slot) of s has staged. */
void ap_stage_drop(ap_session *s, uint32_t slot);
int ap_gen_tokenize(struct ap_server *srv, ap_session *s, const struct ipc_sqe *sqe,
                    struct ipc_cqe *cqe);
int ap_gen_detokenize(struct ap_server *srv, ap_session *s, const struct ipc_sqe *sqe,
                      struct ipc_cqe *cqe);
/* IPC_OP_CANCEL of the request on `slot`: 0 or -ENOENT. */
int ap_gen_cancel(struct ap_server *srv, ap_session *s, uint32_t slot);
/* The session is going away: cancel its requests in the worker. */
void ap_gen_session_closed(struct ap_server *srv, ap_session *s);
/* Cancel every request in flight (gorgond stopping) and post what can be. */
void ap_gen_abort_all(struct ap_server *srv, const char *why);
void ap_gen_fill_stats(const struct ap_server *srv, struct ipc_stats *st);
/* One struct ipc_group_stats per worker group into out (unaligned), at
 * most cap; how many were written. */
size_t ap_gen_fill_groups(const struct ap_server *srv, void *out, size_t cap);

#endif
