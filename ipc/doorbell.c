/* Doorbells: sleeping and waking across processes with the NEED_WAKEUP
 * protocol, through the futex syscall, io_uring IORING_OP_FUTEX_WAIT, or an
 * eventfd when the kernel refuses the io_uring op.
 *
 * Why no wake-up is lost (Dekker): the consumer stores NEED_WAKEUP, fences
 * (F2), then loads the tail; the producer stores the tail (R1), fences (F1),
 * then loads the flags. With a full fence on both sides at least one of them
 * sees the other's store: either the consumer sees the new entry and does
 * not sleep, or the producer sees the flag and wakes it. The doorbell value
 * the consumer sleeps on is read after its fence and before its re-check, so
 * an increment that lands in between makes FUTEX_WAIT return -EAGAIN at once.
 *
 * Pairs: F1 (notify) with F2 (prepare);
 *        R3 (producer: doorbell increment) with A3 (consumer: doorbell load)
 *        -> a consumer that sees the new doorbell value also sees the tail.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <liburing.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "common/common.h"
#include "ipc/ipc.h"
#include "ipc/ipc_int.h"

/* Not in liburing 2.3's headers: the ABI values (include/uapi/linux/io_uring.h,
 * include/uapi/linux/futex.h since 6.7). */
#define IPC_IORING_OP_FUTEX_WAIT 51
#ifndef FUTEX2_SIZE_U32
#define FUTEX2_SIZE_U32 0x02
#endif
#ifndef FUTEX_BITSET_MATCH_ANY
#define FUTEX_BITSET_MATCH_ANY 0xffffffffu
#endif
#define IPC_PROBE_USER_DATA 0x676f72676f6e7066ull /* "gorgonpf" */

int ipc_futex_wait(uint32_t *addr, uint32_t expected, int64_t timeout_ns)
{
    struct timespec ts, *tp = NULL;
    if (timeout_ns >= 0) {
        ts.tv_sec = (time_t)(timeout_ns / 1000000000);
        ts.tv_nsec = (long)(timeout_ns % 1000000000);
        tp = &ts;
    }
    /* No FUTEX_PRIVATE_FLAG: the word lives in memory shared between
     * processes, and the waker may be another process. FUTEX_WAIT's timeout
     * is relative (CLOCK_MONOTONIC). */
    long rc = syscall(SYS_futex, addr, FUTEX_WAIT, expected, tp, NULL, 0);
    return rc == 0 ? 0 : cm_neg_errno();
}

int ipc_futex_wake(uint32_t *addr, int n)
{
    long rc = syscall(SYS_futex, addr, FUTEX_WAKE, n, NULL, NULL, 0);
    return rc >= 0 ? (int)rc : cm_neg_errno();
}

int ipc_doorbell_notify(ipc_ring *r)
{
    /* F1 pairs with F2: orders the tail store of the push (R1) before the
     * flags load below. */
    IPC_FULL_FENCE();
    uint32_t f = IPC_LOAD(&r->sh->flags, __ATOMIC_RELAXED);
    if (!(f & IPC_RING_NEED_WAKEUP))
        return 0;
    /* R3 pairs with A3 */
    __atomic_fetch_add(&r->sh->doorbell, 1, __ATOMIC_RELEASE);
    if ((f & IPC_RING_WAKE_EVENTFD) && r->wake_fd >= 0) {
        uint64_t one = 1;
        /* EAGAIN means the counter is saturated: it is readable anyway. */
        ssize_t n = write(r->wake_fd, &one, sizeof(one));
        (void)n;
    } else {
        ipc_futex_wake(&r->sh->doorbell, INT_MAX);
    }
    return 1;
}

int ipc_doorbell_prepare(ipc_ring *r, uint32_t *bell_val)
{
    __atomic_fetch_or(&r->sh->flags, IPC_RING_NEED_WAKEUP, __ATOMIC_SEQ_CST);
    /* F2 pairs with F1: the flag store is visible before we look at the tail. */
    IPC_FULL_FENCE();
    /* A3 pairs with R3 */
    *bell_val = IPC_LOAD(&r->sh->doorbell, __ATOMIC_ACQUIRE);
    if (!ipc_ring_empty(r)) {
        ipc_doorbell_finish(r);
        return 1;
    }
    return 0;
}

void ipc_doorbell_finish(ipc_ring *r)
{
    /* Relaxed: a producer that still sees the flag only wakes us once more. */
    __atomic_fetch_and(&r->sh->flags, ~IPC_RING_NEED_WAKEUP, __ATOMIC_RELAXED);
}

int ipc_ring_set_wake_fd(ipc_ring *r, int fd)
{
    if (!r)
        return -EINVAL;
    if (r->role == IPC_RING_CONSUMER) {
        if (fd < 0)
            return -EINVAL;
        r->wake_fd = fd;
        __atomic_fetch_or(&r->sh->flags, IPC_RING_WAKE_EVENTFD, __ATOMIC_SEQ_CST);
        return 0;
    }
    if (fd >= 0) {
        /* The fd came from the peer: make sure a saturated counter can never
         * block our push path. */
        int fl = fcntl(fd, F_GETFL);
        if (fl < 0 || (!(fl & O_NONBLOCK) && fcntl(fd, F_SETFL, fl | O_NONBLOCK) != 0))
            return cm_neg_errno();
    }
    r->wake_fd = fd;
    return 0;
}

int ipc_wake_fd_drain(int fd)
{
    /* An eventfd reads as one 8-byte counter; a wake pipe (IPC_OP_EVENT_FD)
     * holds 8 bytes per wake-up: read until a short read. Poll before each
     * read so that a blocking fd never blocks. */
    for (;;) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int n = poll(&p, 1, 0);
        if (n < 0)
            return cm_neg_errno();
        if (n == 0)
            return 0;
        if (!(p.revents & POLLIN))
            /* POLLHUP alone: a wake pipe whose writer is gone, emptied */
            return (p.revents & POLLHUP) ? -EPIPE : 0;
        uint64_t v[32];
        ssize_t got = read(fd, v, sizeof(v));
        if (got < 0)
            return errno == EAGAIN ? 0 : cm_neg_errno();
        if (got == 0)
            return -EPIPE; /* a wake pipe whose writer is gone */
        if ((size_t)got < sizeof(v))
            return 0;
    }
}

int ipc_wake_fd_wait(int fd, int64_t timeout_ns)
{
    struct timespec ts, *tp = NULL;
    if (timeout_ns >= 0) {
        ts.tv_sec = (time_t)(timeout_ns / 1000000000);
        ts.tv_nsec = (long)(timeout_ns % 1000000000);
        tp = &ts;
    }
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int n = ppoll(&p, 1, tp, NULL);
    if (n < 0)
        return cm_neg_errno();
    if (n == 0)
        return -ETIMEDOUT;
    /* Drain before the caller re-checks the ring: a later write then leaves
     * the eventfd readable for the next sleep. */
    return ipc_wake_fd_drain(fd);
}

int ipc_doorbell_wait(ipc_ring *r, int64_t timeout_ns)
{
    uint64_t deadline = timeout_ns >= 0 ? cm_now_ns() + (uint64_t)timeout_ns : 0;
    for (;;) {
        if (!ipc_ring_empty(r))
            return 0;
        uint32_t val;
        if (ipc_doorbell_prepare(r, &val) == 1)
            return 0;
        int64_t left = -1;
        if (timeout_ns >= 0) {
            uint64_t now = cm_now_ns();
            if (now >= deadline) {
                ipc_doorbell_finish(r);
                return -ETIMEDOUT;
            }
            left = (int64_t)(deadline - now);
        }
        int rc = r->wake_fd >= 0 ? ipc_wake_fd_wait(r->wake_fd, left)
                                 : ipc_futex_wait(&r->sh->doorbell, val, left);
        ipc_doorbell_finish(r);
        if (rc == -EINTR || rc == -EPIPE)
            return rc;
        /* 0, -EAGAIN (doorbell moved) and -ETIMEDOUT all go back to
         * re-checking the ring; the deadline decides about the timeout. */
    }
}

void ipc_uring_prep_futex_wait(struct io_uring_sqe *sqe, uint32_t *addr, uint32_t expected)
{
    memset(sqe, 0, sizeof(*sqe));
    sqe->opcode = IPC_IORING_OP_FUTEX_WAIT;
    /* fd carries the futex2 flags: a 32-bit word, and deliberately not
     * FUTEX2_PRIVATE (the word is shared between processes, and the waker
     * uses plain FUTEX_WAKE). */
    sqe->fd = FUTEX2_SIZE_U32;
    sqe->addr = (uint64_t)(uintptr_t)addr;
    /* liburing 2.3 has no futex field names; these unions hold them:
     * addr2 (= off) is the expected value, addr3 the wake bitset mask and
     * rw_flags the futex_flags, which must be 0. */
    sqe->addr2 = expected;
    sqe->addr3 = FUTEX_BITSET_MATCH_ANY;
    sqe->rw_flags = 0;
}

static int uring_futex_state = -1; /* -1 unknown, 0 no, 1 yes (atomic) */

int ipc_uring_futex_supported(struct io_uring *ring)
{
    int st = __atomic_load_n(&uring_futex_state, __ATOMIC_ACQUIRE);
    if (st >= 0)
        return st;
    if (!ring)
        return 0;
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    if (!sqe) {
        CM_LOG_WARN(IPC_TAG, "doorbells: no free SQE to probe IORING_OP_FUTEX_WAIT");
        return 0;
    }
    /* A word that never equals the expected value: a kernel with the op
     * completes the wait at once with -EAGAIN. */
    static uint32_t probe_word = 1;
    ipc_uring_prep_futex_wait(sqe, &probe_word, 0);
    io_uring_sqe_set_data64(sqe, IPC_PROBE_USER_DATA);
    int rc = io_uring_submit(ring);
    if (rc < 0) {
        CM_LOG_WARN(IPC_TAG, "doorbells: probe submit failed: %s", cm_strerror(rc));
        return 0;
    }
    struct io_uring_cqe *cqe;
    rc = io_uring_wait_cqe(ring, &cqe);
    if (rc < 0) {
        CM_LOG_WARN(IPC_TAG, "doorbells: probe wait failed: %s", cm_strerror(rc));
        return 0;
    }
    if (cqe->user_data != IPC_PROBE_USER_DATA) {
        CM_LOG_WARN(IPC_TAG, "doorbells: probe met a foreign completion; call "
                             "ipc_uring_futex_supported before other requests");
        return 0;
    }
    int res = cqe->res;
    io_uring_cqe_seen(ring, cqe);
    st = res == -EAGAIN;
    if (st)
        CM_LOG_INFO(IPC_TAG, "doorbells: io_uring IORING_OP_FUTEX_WAIT");
    else
        CM_LOG_INFO(IPC_TAG, "doorbells: kernel refuses IORING_OP_FUTEX_WAIT (%s), "
                             "using eventfd + poll fallback", cm_strerror(res));
    __atomic_store_n(&uring_futex_state, st, __ATOMIC_RELEASE);
    return st;
}
