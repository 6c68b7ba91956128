/* Doorbells and the NEED_WAKEUP protocol: flag handling, timeouts, and
 * no-lost-wake-up stress where both sides always go to sleep when their ring
 * is empty (futex syscall and eventfd fallback; processes and threads). A
 * lost wake-up shows up as a wait that times out (the watchdog). */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "common/common.h"
#include "ipc/ipc.h"
#include "tests/ipc/util/ipc_test_util.h"

#define WATCHDOG_NS (2ll * 1000000000ll)
#define LOST_NS (1ll * 1000000000ll) /* no honest wake-up takes this long */

static void *pair(uint32_t n, ipc_ring *p, ipc_ring *c)
{
    void *mem = aligned_alloc(64, itu_ring_bytes(n));
    cr_assert_not_null(mem);
    itu_ring_init(mem, n, 1, IPC_RING_PRODUCER, p);
    itu_ring_init(mem, n, 0, IPC_RING_CONSUMER, c);
    return mem;
}

Test(ipc_doorbell, notify_wakes_only_when_flag_set)
{
    ipc_ring p, c;
    void *mem = pair(8, &p, &c);
    struct ipc_sqe d = {.opcode = IPC_OP_NOP};
    uint32_t bell;
    cr_expect_eq(ipc_doorbell_prepare(&c, &bell), 0, "empty: may sleep");
    cr_expect_eq(c.sh->flags & IPC_RING_NEED_WAKEUP, IPC_RING_NEED_WAKEUP);
    cr_expect_eq(bell, 0u);
    cr_assert_eq(ipc_ring_push(&p, &d), 0);
    cr_expect_eq(ipc_doorbell_notify(&p), 1, "consumer asked for a wake-up");
    cr_expect_eq(c.sh->doorbell, 1u, "doorbell bumped");
    cr_expect_eq(ipc_futex_wait(&c.sh->doorbell, bell, -1), -EAGAIN, "stale value: no sleep");
    ipc_doorbell_finish(&c);
    cr_expect_eq(c.sh->flags & IPC_RING_NEED_WAKEUP, 0u);
    cr_expect_eq(ipc_doorbell_notify(&p), 0, "flag clear: no syscall");
    cr_expect_eq(c.sh->doorbell, 1u);
    /* entries present: prepare says don't sleep and clears the flag */
    cr_expect_eq(ipc_doorbell_prepare(&c, &bell), 1);
    cr_expect_eq(c.sh->flags & IPC_RING_NEED_WAKEUP, 0u);
    cr_expect_eq(ipc_doorbell_wait(&c, 0), 0, "entries ready: no wait");
    free(mem);
}

Test(ipc_doorbell, wait_times_out_on_empty_ring, .timeout = 10)
{
    ipc_ring p, c;
    void *mem = pair(8, &p, &c);
    uint64_t t0 = cm_now_ns();
    cr_expect_eq(ipc_doorbell_wait(&c, 30 * 1000000ll), -ETIMEDOUT);
    uint64_t dt = cm_now_ns() - t0;
    cr_expect_geq(dt, 29u * 1000000u, "returned after %llu ns", (unsigned long long)dt);
    cr_expect_eq(c.sh->flags & IPC_RING_NEED_WAKEUP, 0u, "flag cleared after timeout");
    cr_expect_eq(ipc_doorbell_wait(&c, 0), -ETIMEDOUT);
    cr_expect_eq(ipc_futex_wait(&c.sh->doorbell, 0, 1000000), -ETIMEDOUT);
    cr_expect_eq(ipc_futex_wake(&c.sh->doorbell, 1), 0, "nobody waits");
    free(mem);
}

/* ---- ping-pong: two rings, each side sleeps whenever its ring is empty ---- */

struct pp {
    ipc_ring tx, rx;
};

/* One side of the ping-pong. The initiator sends first. Returns 0, or a
 * code naming the failure (timeouts = lost wake-ups). */
static int pp_run(struct pp *s, uint64_t rounds, int initiator)
{
    struct ipc_sqe d;
    memset(&d, 0, sizeof(d));
    for (uint64_t i = 0; i < rounds; i++) {
        if (initiator) {
            d.user_data = i;
            if (ipc_ring_push(&s->tx, &d) != 0)
                return 10;
            ipc_doorbell_notify(&s->tx);
        }
        uint64_t t0 = cm_now_ns();
        int rc = ipc_doorbell_wait(&s->rx, WATCHDOG_NS);
        /* A lost wake-up sleeps until the timeout; the wait's final re-check
         * may then find the entry and return 0, so judge by the time taken. */
        if (rc == -ETIMEDOUT || cm_now_ns() - t0 >= (uint64_t)LOST_NS)
            return 11; /* lost wake-up */
        if (rc < 0)
            return 12;
        if (ipc_ring_pop(&s->rx, &d) != 1 || d.user_data != i)
            return 13;
        if (!initiator) {
            if (ipc_ring_push(&s->tx, &d) != 0)
                return 14;
            ipc_doorbell_notify(&s->tx);
        }
    }
    return 0;
}

/* Two rings in one shared block: ring A (parent -> child), ring B back. */
static void pp_views(uint8_t *mem, uint32_t n, int parent, struct pp *s)
{
    size_t rb = itu_ring_bytes(n);
    itu_ring_init(mem, n, 0, parent ? IPC_RING_PRODUCER : IPC_RING_CONSUMER, parent ? &s->tx : &s->rx);
    itu_ring_init(mem + rb, n, 0, parent ? IPC_RING_CONSUMER : IPC_RING_PRODUCER, parent ? &s->rx : &s->tx);
}

static void pp_fork(uint64_t rounds, int eventfd_mode)
{
    const uint32_t n = 4;
    size_t rb = itu_ring_bytes(n);
    uint8_t *mem = itu_shared_map(2 * rb);
    cr_assert_not_null(mem);
    ipc_ring_format((struct ipc_ring_shared *)mem);
    ipc_ring_format((struct ipc_ring_shared *)(mem + rb));
    /* eventfds: one per direction, inherited across fork as they would be
     * passed over the control socket */
    int efd_a = -1, efd_b = -1;
    if (eventfd_mode) {
        efd_a = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        efd_b = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        cr_assert(efd_a >= 0 && efd_b >= 0);
    }
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        struct pp s;
        pp_views(mem, n, 0, &s);
        if (eventfd_mode && (ipc_ring_set_wake_fd(&s.rx, efd_a) || ipc_ring_set_wake_fd(&s.tx, efd_b)))
            _exit(20);
        _exit(pp_run(&s, rounds, 0));
    }
    struct pp s;
    pp_views(mem, n, 1, &s);
    if (eventfd_mode) {
        cr_assert_eq(ipc_ring_set_wake_fd(&s.tx, efd_a), 0);
        cr_assert_eq(ipc_ring_set_wake_fd(&s.rx, efd_b), 0);
    }
    uint64_t t0 = cm_now_ns();
    int rc = pp_run(&s, rounds, 1);
    uint64_t dt = cm_now_ns() - t0;
    int st = itu_wait_child(pid, 10000);
    cr_expect_eq(rc, 0, "parent failed with code %d (11 = lost wake-up)", rc);
    cr_expect_eq(st, 0, "child failed with code %d (11 = lost wake-up)", st);
    cr_log_info("%llu sleeping round trips, %.2f us each", (unsigned long long)rounds,
                (double)dt / 1e3 / (double)rounds);
    if (eventfd_mode) {
        cr_expect_neq(s.rx.sh->flags & IPC_RING_WAKE_EVENTFD, 0u);
        close(efd_a);
        close(efd_b);
    }
    itu_shared_unmap(mem, 2 * rb);
}

Test(ipc_doorbell, futex_pingpong_processes_no_lost_wakeup, .timeout = 60)
{
    pp_fork(ITU_SCALE(100000, 10000), 0); /* 200k messages */
}

Test(ipc_doorbell, eventfd_pingpong_processes_no_lost_wakeup, .timeout = 60)
{
    pp_fork(ITU_SCALE(50000, 5000), 1);
}

/* A busy-polling responder whose reply lands after a varying delay (0 to a
 * few hundred ns of spinning), sweeping across the window in which the always-sleeping
 * initiator checks the ring, sets NEED_WAKEUP and goes to sleep: the
 * interleavings a wrong fence or re-check order loses a wake-up in. */
static int spin_responder(struct pp *s, uint64_t rounds)
{
    struct ipc_sqe d;
    unsigned seed = 99;
    for (uint64_t i = 0; i < rounds; i++) {
        uint64_t t0 = cm_now_ns();
        int rc;
        while ((rc = ipc_ring_pop(&s->rx, &d)) == 0)
            if (cm_now_ns() - t0 > (uint64_t)WATCHDOG_NS)
                return 15;
        if (rc < 0 || d.user_data != i)
            return 13;
        for (volatile unsigned k = (unsigned)rand_r(&seed) % 400; k; k--)
            ;
        if (ipc_ring_push(&s->tx, &d) != 0)
            return 14;
        ipc_doorbell_notify(&s->tx);
    }
    return 0;
}

Test(ipc_doorbell, sleeper_vs_spinning_peer_no_lost_wakeup, .timeout = 60)
{
    const uint32_t n = 4;
    const uint64_t rounds = ITU_SCALE(100000, 10000);
    size_t rb = itu_ring_bytes(n);
    uint8_t *mem = itu_shared_map(2 * rb);
    cr_assert_not_null(mem);
    ipc_ring_format((struct ipc_ring_shared *)mem);
    ipc_ring_format((struct ipc_ring_shared *)(mem + rb));
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        struct pp s;
        pp_views(mem, n, 0, &s);
        _exit(spin_responder(&s, rounds));
    }
    struct pp s;
    pp_views(mem, n, 1, &s);
    int rc = pp_run(&s, rounds, 1);
    if (rc != 0)
        kill(pid, SIGKILL);
    int st = itu_wait_child(pid, 10000);
    cr_expect_eq(rc, 0, "sleeper failed with code %d (11 = lost wake-up)", rc);
    cr_expect_eq(st, 0, "spinning peer failed with code %d", st);
    itu_shared_unmap(mem, 2 * rb);
}

struct thr {
    struct pp s;
    uint64_t rounds;
    int rc;
};

static void *thr_main(void *a_)
{
    struct thr *a = a_;
    a->rc = pp_run(&a->s, a->rounds, 0);
    return NULL;
}

/* In-process version: TSan sees both sides. */
Test(ipc_doorbell, futex_pingpong_threads_no_lost_wakeup, .timeout = 60)
{
    const uint32_t n = 4;
    size_t rb = itu_ring_bytes(n);
    uint8_t *mem = aligned_alloc(64, 2 * rb);
    ipc_ring_format((struct ipc_ring_shared *)mem);
    ipc_ring_format((struct ipc_ring_shared *)(mem + rb));
    struct thr child = {.rounds = ITU_SCALE(50000, 5000)};
    struct pp s;
    pp_views(mem, n, 0, &child.s);
    pp_views(mem, n, 1, &s);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, thr_main, &child), 0);
    int rc = pp_run(&s, child.rounds, 1);
    pthread_join(t, NULL);
    cr_expect_eq(rc, 0, "initiator failed with code %d", rc);
    cr_expect_eq(child.rc, 0, "responder failed with code %d", child.rc);
    free(mem);
}

Test(ipc_doorbell, wake_fd_rules)
{
    ipc_ring p, c;
    void *mem = pair(8, &p, &c);
    cr_expect_eq(ipc_ring_set_wake_fd(&c, -1), -EINVAL, "a sleeping consumer needs an fd");
    int efd = eventfd(0, EFD_CLOEXEC); /* blocking on purpose */
    cr_assert_geq(efd, 0);
    cr_expect_eq(ipc_ring_set_wake_fd(&p, efd), 0);
    cr_expect_neq(fcntl(efd, F_GETFL) & O_NONBLOCK, 0, "producer forces O_NONBLOCK");
    cr_expect_eq(ipc_ring_set_wake_fd(&c, efd), 0);
    uint32_t bell;
    cr_assert_eq(ipc_doorbell_prepare(&c, &bell), 0);
    struct ipc_sqe d = {.opcode = IPC_OP_NOP};
    cr_assert_eq(ipc_ring_push(&p, &d), 0);
    cr_expect_eq(ipc_doorbell_notify(&p), 1);
    uint64_t v = 0;
    cr_expect_eq(read(efd, &v, sizeof(v)), 8, "eventfd written instead of FUTEX_WAKE");
    cr_expect_eq(v, 1u);
    cr_expect_eq(ipc_wake_fd_drain(efd), 0, "draining an empty eventfd does not block");
    cr_expect_eq(ipc_ring_set_wake_fd(&p, -1), 0);
    cr_expect_eq(p.wake_fd, -1);
    close(efd);
    free(mem);
}
