/* ipc — the shared-memory transport between clients, gorgond and workers:
 * SPSC rings of 64-byte descriptors, futex doorbells with the NEED_WAKEUP
 * protocol (syscall or io_uring IORING_OP_FUTEX_WAIT), sealed memfd regions,
 * the AF_UNIX SOCK_SEQPACKET control socket and descriptor validation.
 * The byte layout is in ipc_abi.h.
 *
 * Threading: a ring has exactly one producer thread and one consumer thread
 * (possibly in different processes); an ipc_ring view belongs to one side.
 * Nothing here locks or allocates on the push/pop path.
 *
 *   // gorgond: create a client region and hand it over
 *   ipc_region reg;
 *   ipc_region_create(&reg, &(ipc_region_cfg){.sq_entries = 256, .cq_entries = 512,
 *                     .n_slots = 64, .slot_in_bytes = 16384, .slot_out_bytes = 65536});
 *   ipc_ctl_send_welcome(conn_fd, &welcome, reg.fd);
 *   // client: map it and submit
 *   ipc_region_map(&reg, fd);
 *   ipc_ring sq; ipc_region_sq(&reg, IPC_RING_PRODUCER, &sq);
 *   ipc_ring_push(&sq, &sqe);              // -EAGAIN when full
 *   ipc_doorbell_notify(&sq);               // wakes gorgond only if it sleeps
 */
#ifndef GORGON_IPC_H
#define GORGON_IPC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "ipc/ipc_abi.h"

struct io_uring;
struct io_uring_sqe;

/* ---- rings -------------------------------------------------------------- */

enum ipc_ring_role { IPC_RING_PRODUCER, IPC_RING_CONSUMER };

/* A process-private view of one ring in shared memory. The side's own index
 * is kept privately (`local`) and published to shared memory; the peer's
 * index is read from shared memory, sanity-checked, never trusted. */
typedef struct ipc_ring {
    struct ipc_ring_shared *sh;
    uint8_t *entries; /* entries × IPC_DESC_SIZE bytes */
    uint32_t mask;    /* entries - 1 */
    uint32_t local;   /* producer: tail; consumer: head */
    uint32_t cached;  /* last peer index seen (producer: head; consumer: tail) */
    enum ipc_ring_role role;
    int wake_fd; /* eventfd fallback (ipc_ring_set_wake_fd), -1 when none; not owned */
} ipc_ring;

/* Initialise a ring's shared control block (creator side, before sharing). */
void ipc_ring_format(struct ipc_ring_shared *sh);
/* Attach a view. entries must be a power of two in [IPC_RING_MIN_ENTRIES,
 * IPC_RING_MAX_ENTRIES]; the side's local index is taken from shared memory
 * once (ring must be quiescent). Returns 0 or -EINVAL. */
int ipc_ring_attach(ipc_ring *r, struct ipc_ring_shared *sh, void *entries, uint32_t n_entries,
                    enum ipc_ring_role role);

/* Producer: copy one 64-byte descriptor in and publish it.
 * 0, -EAGAIN (full), -EPROTO (the peer's index is impossible). */
int ipc_ring_push(ipc_ring *r, const void *desc);
/* Producer: push up to n, publish once. Returns count pushed (0 when full)
 * or -EPROTO. */
int ipc_ring_push_burst(ipc_ring *r, const void *descs, uint32_t n);
/* Consumer: copy one descriptor out (the copy is what you validate).
 * 1 (got one), 0 (empty), -EPROTO (peer index impossible). */
int ipc_ring_pop(ipc_ring *r, void *out);
/* Consumer: pop up to n; count or -EPROTO. */
int ipc_ring_pop_burst(ipc_ring *r, void *out, uint32_t n);
/* Entries ready to pop (consumer) / free to push (producer); -EPROTO on a bad index. */
int ipc_ring_count(ipc_ring *r);
/* Consumer: true if nothing to pop (re-reads the producer's tail). An
 * impossible tail reads as "not empty" so that the next pop reports -EPROTO. */
bool ipc_ring_empty(ipc_ring *r);

/* ---- doorbells (NEED_WAKEUP protocol) ------------------------------------ */

/* Producer, after pushing: full fence, and if the consumer set NEED_WAKEUP,
 * bump the doorbell and FUTEX_WAKE. Returns 1 if a wake was issued, else 0. */
int ipc_doorbell_notify(ipc_ring *r);

/* Consumer, before sleeping: set NEED_WAKEUP, full fence, re-check the ring.
 * Returns 0 when it is still empty and *bell_val holds the doorbell value to
 * wait on; 1 when entries arrived (flag cleared again: don't sleep). */
int ipc_doorbell_prepare(ipc_ring *r, uint32_t *bell_val);
/* Consumer, after waking (or deciding not to sleep): clear NEED_WAKEUP. */
void ipc_doorbell_finish(ipc_ring *r);
/* Consumer: sleep through the futex syscall (or poll() on the wake eventfd
 * when one is set, see ipc_ring_set_wake_fd) until the ring has entries or
 * timeout_ns passes (< 0: forever). 0 (entries ready), -ETIMEDOUT, -EINTR,
 * -EPIPE (a wake pipe whose writer is gone).
 * Entries that arrive without a wake-up are still found at the timeout (the
 * ring is re-checked last), so a caller cannot tell a lost wake-up from a
 * slow one by the return value; tests/ipc judges by the time taken. */
int ipc_doorbell_wait(ipc_ring *r, int64_t timeout_ns);

/* Raw futex helpers on shared (non-private) 32-bit words.
 * wait: 0 (woken, possibly spuriously), -EAGAIN (*addr != expected),
 * -ETIMEDOUT, -EINTR. wake: number of waiters woken or -errno. */
int ipc_futex_wait(uint32_t *addr, uint32_t expected, int64_t timeout_ns);
int ipc_futex_wake(uint32_t *addr, int n);

/* eventfd fallback, for kernels that refuse IORING_OP_FUTEX_WAIT.
 *
 * The consumer (gorgond for an SQ) creates an eventfd (EFD_NONBLOCK|
 * EFD_CLOEXEC), calls ipc_ring_set_wake_fd() on its consumer view (this also
 * sets IPC_RING_WAKE_EVENTFD in the shared flags) and hands the eventfd to the
 * producer together with the region (ipc_ctl_send_welcome_wake). The producer
 * gets it from ipc_ctl_client_handshake_wake() and calls ipc_ring_set_wake_fd()
 * on its producer view; from then on ipc_doorbell_notify() writes the eventfd
 * instead of FUTEX_WAKE whenever the consumer asked for a wake-up. The
 * consumer sleeps by polling the eventfd (POLLIN; io_uring IORING_OP_POLL_ADD
 * in gorgond, or ipc_doorbell_wait, which polls it when set), and after waking
 * calls ipc_wake_fd_drain() BEFORE re-checking the ring (a write that lands
 * after the drain then always leaves the eventfd readable: no lost wake-up).
 * Sleep protocol otherwise unchanged: prepare / re-check / sleep / finish.
 * The fd is not owned by the view: the caller closes it after the last use.
 * Returns 0 or -EINVAL (fd < 0 on a consumer view). fd -1 on a producer view
 * goes back to FUTEX_WAKE. */
int ipc_ring_set_wake_fd(ipc_ring *r, int fd);
/* Consumer: empty the wake fd (an eventfd's counter, or every byte queued
 * in a wake pipe; non-blocking even on a blocking fd). 0, -EPIPE (a wake
 * pipe whose writer is gone) or -errno. */
int ipc_wake_fd_drain(int fd);
/* Consumer: sleep until the wake fd is readable or timeout_ns passes (< 0:
 * forever), then drain it. 0, -ETIMEDOUT, -EINTR, -EPIPE (a wake pipe whose
 * writer is gone), -errno. */
int ipc_wake_fd_wait(int fd, int64_t timeout_ns);

/* io_uring IORING_OP_FUTEX_WAIT (kernel >= 6.7), filled by hand: liburing 2.3
 * has no helper. Not FUTEX2_PRIVATE: the word is in cross-process memory. */
void ipc_uring_prep_futex_wait(struct io_uring_sqe *sqe, uint32_t *addr, uint32_t expected);
/* Probe once whether this kernel accepts IORING_OP_FUTEX_WAIT on `ring`
 * (submits a wait that returns at once with -EAGAIN). 1 yes, 0 no. The answer
 * is cached process-wide after the first successful probe and logged once at
 * INFO ("doorbells: io_uring FUTEX_WAIT" or "... eventfd + poll fallback").
 * Needs one free SQE; any CQE of the probe is consumed here, so call it
 * before other requests are in flight on `ring`. */
int ipc_uring_futex_supported(struct io_uring *ring);

/* ---- regions ------------------------------------------------------------ */

typedef struct ipc_region_cfg {
    uint32_t sq_entries, cq_entries; /* powers of two */
    uint32_t n_slots;
    uint32_t slot_in_bytes, slot_out_bytes; /* rounded up to 64 */
    uint32_t session_id;
    bool hugepages; /* try MFD_HUGETLB; falls back to normal pages (logged) */
    int numa_node;  /* >= 0: bind pages to this node (libnuma); -1: no binding */
    const char *name; /* memfd name (debugging) */
} ipc_region_cfg;

typedef struct ipc_region {
    int fd;
    void *base;
    size_t size;
    struct ipc_region_hdr layout; /* private copy: trusted on the creator side,
                                     validated copy on the mapping side */
    bool hugepages; /* what was actually obtained */
} ipc_region;

/* Compute the size of a region for cfg; 0 if cfg is invalid. */
size_t ipc_region_bytes(const ipc_region_cfg *cfg);
/* memfd_create + ftruncate + mmap + header + seals
 * (F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL). On error nothing is left open. */
int ipc_region_create(ipc_region *r, const ipc_region_cfg *cfg);
/* Client side: fstat, check seals, mmap, validate the header (magic, version,
 * sizes and offsets consistent with the fd's size). Takes ownership of fd
 * on success. -EPROTO / -EPROTONOSUPPORT / -EINVAL with a logged reason. */
int ipc_region_map(ipc_region *r, int fd);
void ipc_region_unmap(ipc_region *r); /* munmap + close; safe on a zeroed region */

/* Views on a region's rings and slots (offsets from the private layout). */
int ipc_region_sq(ipc_region *r, enum ipc_ring_role role, ipc_ring *out);
int ipc_region_cq(ipc_region *r, enum ipc_ring_role role, ipc_ring *out);
struct ipc_slot_hdr *ipc_region_slot(ipc_region *r, uint32_t slot);
uint8_t *ipc_region_slot_in(ipc_region *r, uint32_t slot);
uint8_t *ipc_region_slot_out(ipc_region *r, uint32_t slot);

/* ---- control socket ------------------------------------------------------ */

/* Socket path: explicit, else $GORGON_SOCKET, else IPC_DEFAULT_SOCKET. */
#define IPC_DEFAULT_SOCKET "/run/gorgon/gorgon.sock"
const char *ipc_socket_path(const char *explicit_path);

/* Bind + listen an AF_UNIX SOCK_SEQPACKET socket (non-blocking, CLOEXEC)
 * whose file gets permission bits `mode` and group `gid` ((gid_t)-1: the
 * caller's), both set before anyone can connect; removes a stale socket
 * file first. Connecting needs write permission on the file: the mode is
 * the first gate, the allow-list (ipc_ctl_check_peer) the second. Returns
 * fd or -errno. */
int ipc_ctl_listen(const char *path, int backlog, unsigned mode, gid_t gid);
/* Connect (blocking, CLOEXEC). fd or -errno (-ENOENT/-ECONNREFUSED: no daemon). */
int ipc_ctl_connect(const char *path);

typedef struct ipc_allow {
    const uid_t *uids;
    size_t n_uids;
    const gid_t *gids;
    size_t n_gids;
} ipc_allow;
/* SO_PEERCRED against the allow-list. Always allowed: root and the
 * server's own effective uid (so an empty or NULL allow-list means exactly
 * those two). Also allowed: a peer whose uid is in uids, or whose primary
 * gid or any supplementary group (SO_PEERGROUPS) is in gids. Credentials
 * are the ones the kernel recorded at connect(). 0 or -EACCES (-errno if
 * getsockopt fails); the peer's uid, gid and pid are stored through the
 * out-pointers that are non-NULL, also on -EACCES (for the log line). */
int ipc_ctl_check_peer(int fd, const ipc_allow *allow, uid_t *uid, gid_t *gid, pid_t *pid);

/* Client: send ipc_hello; receive ipc_welcome + region fd. On success returns
 * the fd and fills *w; on refusal returns w->status (e.g. -EACCES) with the
 * reason in w->reason. */
int ipc_ctl_client_handshake(int sock, struct ipc_welcome *w);
/* Server: receive and check an ipc_hello (-EPROTO / -EPROTONOSUPPORT). */
int ipc_ctl_recv_hello(int sock, struct ipc_hello *h);
/* Server: send a welcome, with region_fd attached when >= 0. magic and
 * abi_version are always sent as IPC_MAGIC / IPC_ABI_VERSION and reason is
 * NUL-terminated, whatever *w holds. 0 or -errno (-EAGAIN on a full
 * non-blocking socket, -EPIPE when the client is gone; never SIGPIPE). */
int ipc_ctl_send_welcome(int sock, const struct ipc_welcome *w, int region_fd);
/* Same, attaching a second fd (the SQ's wake eventfd, eventfd fallback) when
 * wake_fd >= 0 (only meaningful with region_fd >= 0). */
int ipc_ctl_send_welcome_wake(int sock, const struct ipc_welcome *w, int region_fd, int wake_fd);
/* Client: like ipc_ctl_client_handshake, also accepting the wake eventfd:
 * *wake_fd is the second fd received (CLOEXEC, caller owns) or -1. */
int ipc_ctl_client_handshake_wake(int sock, struct ipc_welcome *w, int *wake_fd);
/* gorgond: send `fd` (kept open: the caller closes its copy) with an
 * ipc_fd_msg of `kind` on an established session's socket, never blocking
 * (-EAGAIN when the socket buffer is full). 0 or -errno. */
int ipc_ctl_send_fd(int sock, uint32_t kind, int fd);
/* Client: receive that message, waiting up to IPC_CTL_HANDSHAKE_TIMEOUT_MS.
 * The fd (CLOEXEC, caller owns) or -errno: -EPROTO for a message that is not
 * exactly one ipc_fd_msg of `kind` with one fd (nothing is left open). */
int ipc_ctl_recv_fd(int sock, uint32_t kind);
/* Client handshake timeout (SO_RCVTIMEO/SO_SNDTIMEO during the handshake;
 * restored afterwards), so a server that never answers cannot hang a client. */
#define IPC_CTL_HANDSHAKE_TIMEOUT_MS 5000

/* ---- validation ------------------------------------------------------------ */

/* Validate every field of an SQE that ipc_ring_pop already copied out of
 * shared memory (validate the private copy, never the shared original)
 * against the region's private layout: opcode < IPC_OP__COUNT, flags and
 * reserved fields (rsvd0, pad) zero, slot < n_slots, in_off + in_len within
 * slot_in_bytes without overflow (arg[] is opcode-specific: the handler's
 * business). Returns 0 (*why = NULL), or -EINVAL (a field no request can
 * carry: opcode, flags, rsvd0, pad, slot) / -EPROTO (bad framing: in_off or
 * in_len outside the slot's input buffer) with *why set to a static reason
 * string that starts with the field's name. why may be NULL. */
int ipc_sqe_validate(const struct ipc_sqe *sqe, const struct ipc_region_hdr *layout,
                     const char **why);

/* The checks of a GENERATE's ipc_gen_params that need no model (gorgond adds
 * top_k <= n_vocab and the context length): flags, reserved fields,
 * temperature, top_p, min_p, repeat_penalty, top_k >= 0, max_tokens,
 * n_stop. libgorgon runs the same function before it submits, so a caller
 * gets the same message from either side. 0, or -EINVAL with a message
 * naming the field in why[cap] (NUL-terminated). */
int ipc_gen_params_check(const struct ipc_gen_params *p, char *why, size_t cap);

#endif
