/* comm — collectives between the ranks of one tensor-parallel worker group.
 *
 * Role in the request path: every rank of a group runs the same forward pass
 * over its shard of the weights; after the attention output projection and
 * after the FFN down projection the ranks' partial sums are combined with
 * comm_all_reduce_sum_f32, rank 0 broadcasts each step's plan, and the KV
 * hand-off between prefill and decode groups goes through comm_send/recv.
 *
 * One interface, several backends behind an ops table (comm_int.h): the
 * shared-memory backend (CPU ranks: separate processes on one machine
 * sharing a memfd region) and NCCL (GPU ranks, comm_nccl.c; docs/comm.md).
 *
 * Threading: a communicator belongs to one thread of one rank process at a
 * time (the thread that drives the collectives). Every rank must make the
 * same sequence of collective calls with the same sizes (and the same root);
 * a mismatch the backend can see is reported as -EPROTO and aborts the
 * communicator. comm_abort and comm_aborted may be called from any thread, in
 * any rank, at any time; comm_shm_abort_fd from any process holding the
 * region's fd (the coordinator).
 *
 * Errors: every call returns 0 or -errno and never sets errno. After a
 * failure comm_last_error() names what was wrong. Once a communicator is
 * aborted (by any rank, by the coordinator, or by a timeout) every pending and
 * future call on it, in every rank, returns -ECONNABORTED; the rank whose
 * wait timed out gets -ETIMEDOUT, and the ranks that detect mismatched calls
 * get -EPROTO. An aborted communicator cannot be repaired: the group is torn
 * down and started again with a new region.
 *
 * Usage (the coordinator creates the region, forks or execs the ranks and
 * passes them the fd):
 *
 *   comm_shm_cfg cfg = {.n_ranks = 2};
 *   char why[256];
 *   int fd = comm_shm_create(&cfg, why, sizeof why);      // coordinator
 *   ...
 *   comm *c;                                               // in rank r
 *   comm_shm_opts o = COMM_SHM_OPTS_DEFAULT;
 *   if (comm_shm_attach(&c, fd, r, &o, why, sizeof why) < 0) ...
 *   if (comm_all_reduce_sum_f32(c, x, 768) < 0)
 *       fprintf(stderr, "%s\n", comm_last_error(c));
 *   comm_destroy(c);
 *   ...
 *   comm_shm_abort_fd(fd, "rank 1 (pid 1234) died", why, sizeof why); // coordinator
 *
 * The protocol, the region layout and the NCCL plan: docs/comm.md.
 */
#ifndef GORGON_COMM_H
#define GORGON_COMM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct comm comm;

/* ---- Backend-neutral calls ------------------------------------------------ */

int comm_rank(const comm *c);
int comm_size(const comm *c);
/* "shm" or "nccl". */
const char *comm_backend(const comm *c);

/* buf[0..n) on every rank becomes the element-wise sum over the ranks, added
 * in rank order (rank 0 + rank 1 + ... per element), so the result is the
 * same bit for bit whatever the timing and on every rank. n may be 0. */
int comm_all_reduce_sum_f32(comm *c, float *buf, size_t n);

/* out[r * bytes_per_rank .. (r+1) * bytes_per_rank) on every rank becomes
 * rank r's in[0..bytes_per_rank). `in` may be out + rank * bytes_per_rank
 * (in place); any other overlap of in and out is -EINVAL. */
int comm_all_gather(comm *c, const void *in, void *out, size_t bytes_per_rank);

/* buf[0..bytes) on every rank becomes root's buf. */
int comm_broadcast(comm *c, void *buf, size_t bytes, int root);

/* Point to point, in order per (sender, receiver) pair; the receiver must ask
 * for exactly the number of bytes sent (a mismatch is -EPROTO and aborts the
 * communicator). comm_send returns once the last chunk has been handed over
 * (the shm backend buffers up to its channel size, so small sends in both
 * directions at once do not deadlock; larger ones wait for the receiver). */
int comm_send(comm *c, const void *buf, size_t bytes, int peer);
int comm_recv(comm *c, void *buf, size_t bytes, int peer);

/* Returns once every rank has called it. */
int comm_barrier(comm *c);

/* How long a wait in this rank's calls may see no progress before it gives
 * up: the communicator is then aborted for everyone (the waiting rank gets
 * -ETIMEDOUT, naming the ranks it waited for). -1: no limit (only an abort
 * ends the wait; the coordinator's comm_shm_abort_fd when a rank dies).
 * Ranks that wait for work between steps (rank 0's next plan) set -1 for
 * that wait and a finite limit inside a step. Owning thread only; applies
 * to the next call. */
#define COMM_TIMEOUT_MAX_MS (INT64_C(1) << 40)
int comm_set_timeout_ms(comm *c, int64_t timeout_ms);

/* Abort the communicator for every rank: pending and future calls return
 * -ECONNABORTED promptly. The first reason given wins (why may be NULL).
 * Any thread may call it, also while another thread waits in a call. */
void comm_abort(comm *c, const char *why);

/* true when the communicator was aborted; the reason is copied to why
 * (NUL-terminated, truncated to cap; why may be NULL when cap is 0). */
bool comm_aborted(comm *c, char *why, size_t cap);

/* What the last failing call on this communicator got wrong. Owned by c,
 * valid until the next call from the owning thread; "" when none failed. */
const char *comm_last_error(const comm *c);

/* Detach and free. Does not abort the others (call comm_abort first when
 * leaving because of an error). NULL is a no-op. */
void comm_destroy(comm *c);

/* ---- Shared-memory backend ------------------------------------------------ */

#define COMM_SHM_MAX_RANKS 64

typedef struct comm_shm_cfg {
    int n_ranks;      /* 1..COMM_SHM_MAX_RANKS */
    size_t buf_bytes; /* per rank staging buffer for collectives (two halves,
                       * used alternately); 0: 1 MiB. Rounded up to 128;
                       * at least 4096. Larger calls go in chunks of half. */
    size_t p2p_bytes; /* per (sender, receiver) channel; 0: 256 KiB. Rounded
                       * up to 64; at least 64. */
} comm_shm_cfg;

/* Create the group's region: a sealed memfd (size fixed) holding the header,
 * barrier and abort words, the ranks' staging buffers and the point-to-point
 * channels. Returns the fd (close-on-exec; the caller clears it to pass the
 * fd through exec) or -errno with the reason in why. */
int comm_shm_create(const comm_shm_cfg *cfg, char *why, size_t cap);

/* Bytes comm_shm_create would map for cfg (after rounding), or 0 when cfg is
 * invalid. */
size_t comm_shm_bytes(const comm_shm_cfg *cfg);

typedef struct comm_shm_opts {
    int threads_per_rank; /* threads each rank keeps busy (its kernel pool):
                           * waits spin only when n_ranks * threads_per_rank
                           * threads (plus registered spinners) fit the
                           * usable CPUs (cm_spin_allowed); >= 1 */
    int spin;             /* -1: decide as above; 0: never spin; 1: always
                           * spin first (ranks pinned to disjoint CPUs) */
    int64_t spin_ns;      /* how long a wait spins before sleeping; >= 0 */
    int64_t timeout_ms;   /* initial comm_set_timeout_ms: a wait that sees no
                           * progress for this long aborts the communicator
                           * (-ETIMEDOUT here, -ECONNABORTED elsewhere);
                           * -1 or 1..COMM_TIMEOUT_MAX_MS */
} comm_shm_opts;

#define COMM_SHM_OPTS_DEFAULT                                                  \
    ((comm_shm_opts){.threads_per_rank = 1, .spin = -1, .spin_ns = 50000,      \
                     .timeout_ms = 30000})

/* Attach rank `rank` to the region behind fd (the mapping does not keep
 * the fd: the caller keeps and closes its own). The header is validated
 * (magic, version, sizes, seals), since it may come from another process; a
 * rank that is already attached is -EBUSY. opts NULL: COMM_SHM_OPTS_DEFAULT. On error nothing is
 * attached and why names the problem. */
int comm_shm_attach(comm **out, int fd, int rank, const comm_shm_opts *opts, char *why,
                    size_t cap);

/* The coordinator's abort: aborts the group behind fd from outside (e.g.
 * when a rank's pidfd fires), so that the surviving ranks return
 * -ECONNABORTED promptly. 0, or -errno with the reason in why_err. */
int comm_shm_abort_fd(int fd, const char *why, char *why_err, size_t cap);

/* ---- NCCL backend (GPU ranks) --------------------------------------------
 *
 * Built when the build found nccl.h under CUDA's prefix (Makefile NCCL=auto);
 * otherwise every call below returns -EOPNOTSUPP saying so. libnccl and
 * libcudart are loaded with dlopen on first use ($GORGON_NCCL_LIB and
 * $GORGON_CUDART_LIB override where from), so programs linking comm start on
 * machines without them: the calls then return -ENOENT, or -ENODEV without a
 * device, with the reason in why.
 *
 * Buffers are device pointers. Each call is enqueued on the stream and
 * waited for, so that a dead or hung peer ends in -EIO / -ETIMEDOUT (the
 * communicator then aborted) rather than a hang. NCCL sums in its own order
 * (ring or tree, fixed for a given group and size): repeatable run to run,
 * but not the rank-order sum of the shm backend. comm_abort from another
 * thread takes effect in the owning thread's wait. Launching groups on
 * several GPUs and nodes: docs/comm.md. */
#define COMM_NCCL_ID_BYTES 128
/* ncclUniqueId: made by the coordinator, handed to every rank (it carries
 * the address rank 0 listens on). */
typedef struct comm_nccl_id {
    unsigned char bytes[COMM_NCCL_ID_BYTES];
} comm_nccl_id;
typedef struct comm_nccl_opts {
    int device;         /* CUDA device of this rank */
    void *stream;       /* cudaStream_t to run on; NULL: a stream of its own */
    int64_t timeout_ms; /* forming the group, and each call: -1 or >= 1 */
} comm_nccl_opts;
#define COMM_NCCL_OPTS_DEFAULT ((comm_nccl_opts){.device = 0, .stream = NULL, .timeout_ms = 30000})
/* CUDA devices this process sees, or -errno with the reason. */
int comm_nccl_devices(char *why, size_t cap);
int comm_nccl_unique_id(comm_nccl_id *id, char *why, size_t cap);
/* Join the group of n_ranks made with id as rank `rank` (every rank calls it
 * with the same id; it returns once all have). */
int comm_nccl_init(comm **out, const comm_nccl_id *id, int n_ranks, int rank,
                   const comm_nccl_opts *opts, char *why, size_t cap);
#endif
