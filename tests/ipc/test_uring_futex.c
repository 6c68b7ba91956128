/* io_uring IORING_OP_FUTEX_WAIT on a doorbell: the SQE we fill by hand must
 * be accepted by the kernel, fail with -EAGAIN on a stale value, and complete
 * when another process pushes and notifies. Skipped (with the reason) where
 * the kernel refuses the op: gorgond then uses the eventfd fallback. */
#include <criterion/criterion.h>
#include <errno.h>
#include <liburing.h>
#include <string.h>
#include <unistd.h>

#include "common/common.h"
#include "ipc/ipc.h"
#include "tests/ipc/util/ipc_test_util.h"

static void ring_or_skip(struct io_uring *u)
{
    int rc = io_uring_queue_init(8, u, 0);
    if (rc < 0)
        cr_skip_test("io_uring unavailable: %s", strerror(-rc));
    if (!ipc_uring_futex_supported(u)) {
        io_uring_queue_exit(u);
        cr_skip_test("kernel refuses IORING_OP_FUTEX_WAIT: eventfd fallback in use");
    }
}

static int wait_cqe_ms(struct io_uring *u, struct io_uring_cqe **cqe, long ms)
{
    struct __kernel_timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000};
    return io_uring_wait_cqe_timeout(u, cqe, &ts);
}

/* The hand-filled SQE, byte for byte where the kernel reads it (io_uring
 * futex_prep: fd = futex2 flags, addr, addr2 = value, addr3 = mask, and
 * len / futex_flags / buf_index / file_index must be 0). Needs no kernel. */
Test(ipc_uring_futex, prep_fills_the_futex_wait_sqe)
{
    struct io_uring_sqe sqe;
    memset(&sqe, 0xa5, sizeof(sqe));
    uint32_t word = 0;
    ipc_uring_prep_futex_wait(&sqe, &word, 0xdeadbeef);
    cr_expect_eq(sqe.opcode, 51, "IORING_OP_FUTEX_WAIT");
    cr_expect_eq(sqe.fd, 0x02, "FUTEX2_SIZE_U32, not FUTEX2_PRIVATE (0x80)");
    cr_expect_eq(sqe.addr, (uint64_t)(uintptr_t)&word);
    cr_expect_eq(sqe.off, 0xdeadbeefu, "addr2: expected value");
    cr_expect_eq(sqe.addr3, 0xffffffffu, "FUTEX_BITSET_MATCH_ANY");
    cr_expect_eq(sqe.rw_flags, 0, "futex_flags");
    cr_expect_eq(sqe.len, 0u);
    cr_expect_eq(sqe.flags, 0, "no IOSQE flags");
    cr_expect_eq(sqe.buf_index, 0);
    cr_expect_eq(sqe.file_index, 0u);
    cr_expect_eq(sqe.user_data, 0u);
}

Test(ipc_uring_futex, stale_value_completes_with_eagain, .timeout = 10)
{
    struct io_uring u;
    ring_or_skip(&u);
    uint32_t word = 5;
    struct io_uring_sqe *sqe = io_uring_get_sqe(&u);
    ipc_uring_prep_futex_wait(sqe, &word, 4);
    io_uring_sqe_set_data64(sqe, 77);
    cr_assert_eq(io_uring_submit(&u), 1);
    struct io_uring_cqe *cqe;
    cr_assert_eq(wait_cqe_ms(&u, &cqe, 2000), 0);
    cr_expect_eq(cqe->user_data, 77u);
    cr_expect_eq(cqe->res, -EAGAIN, "res %d (%s)", cqe->res, strerror(-cqe->res));
    io_uring_cqe_seen(&u, cqe);
    cr_expect_eq(ipc_uring_futex_supported(&u), 1, "answer is cached");
    io_uring_queue_exit(&u);
}

Test(ipc_uring_futex, doorbell_wait_completes_on_cross_process_notify, .timeout = 20)
{
    struct io_uring u;
    ring_or_skip(&u);
    const uint32_t n = 8;
    size_t bytes = itu_ring_bytes(n);
    void *mem = itu_shared_map(bytes);
    cr_assert_not_null(mem);
    ipc_ring c;
    itu_ring_init(mem, n, 1, IPC_RING_CONSUMER, &c);

    uint32_t bell;
    cr_assert_eq(ipc_doorbell_prepare(&c, &bell), 0);
    struct io_uring_sqe *sqe = io_uring_get_sqe(&u);
    ipc_uring_prep_futex_wait(sqe, &c.sh->doorbell, bell);
    io_uring_sqe_set_data64(sqe, 1);
    cr_assert_eq(io_uring_submit(&u), 1);
    struct io_uring_cqe *cqe;
    /* armed, and really waiting: nothing completes on its own */
    cr_assert_eq(wait_cqe_ms(&u, &cqe, 50), -ETIME, "the futex wait completed without a wake");

    int go[2];
    cr_assert_eq(pipe(go), 0);
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        char b;
        if (read(go[0], &b, 1) != 1)
            _exit(2);
        ipc_ring p;
        itu_ring_init(mem, n, 0, IPC_RING_PRODUCER, &p);
        struct ipc_sqe d = {.opcode = IPC_OP_PING, .user_data = 4242};
        if (ipc_ring_push(&p, &d) != 0)
            _exit(3);
        _exit(ipc_doorbell_notify(&p) == 1 ? 0 : 4);
    }
    cr_assert_eq(write(go[1], "x", 1), 1);
    cr_assert_eq(wait_cqe_ms(&u, &cqe, 5000), 0, "no completion after the peer's notify");
    cr_expect_eq(cqe->user_data, 1u);
    cr_expect_eq(cqe->res, 0, "res %d (%s)", cqe->res, strerror(-cqe->res));
    io_uring_cqe_seen(&u, cqe);
    ipc_doorbell_finish(&c);
    cr_expect_eq(itu_wait_child(pid, 5000), 0, "producer child failed");
    struct ipc_sqe o;
    cr_expect_eq(ipc_ring_pop(&c, &o), 1);
    cr_expect_eq(o.user_data, 4242u);
    close(go[0]);
    close(go[1]);
    io_uring_queue_exit(&u);
    itu_shared_unmap(mem, bytes);
}

/* Many sleeping round trips through io_uring: the consumer always arms the
 * wait after prepare; a lost wake-up would time out. */
Test(ipc_uring_futex, repeated_arm_and_wake_no_lost_wakeup, .timeout = 60)
{
    struct io_uring u;
    ring_or_skip(&u);
    const uint32_t n = 4;
    size_t rb = itu_ring_bytes(n);
    uint8_t *mem = itu_shared_map(2 * rb);
    cr_assert_not_null(mem);
    ipc_ring rx, ack;
    itu_ring_init(mem, n, 1, IPC_RING_CONSUMER, &rx);
    itu_ring_init(mem + rb, n, 1, IPC_RING_PRODUCER, &ack);
    const uint64_t rounds = ITU_SCALE(20000, 2000);
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        ipc_ring tx, ackc;
        itu_ring_init(mem, n, 0, IPC_RING_PRODUCER, &tx);
        itu_ring_init(mem + rb, n, 0, IPC_RING_CONSUMER, &ackc);
        struct ipc_sqe d = {.opcode = IPC_OP_NOP};
        for (uint64_t i = 0; i < rounds; i++) {
            d.user_data = i;
            if (ipc_ring_push(&tx, &d) != 0)
                _exit(2);
            ipc_doorbell_notify(&tx);
            uint64_t t0 = cm_now_ns();
            if (ipc_doorbell_wait(&ackc, 3000000000ll) != 0 || ipc_ring_pop(&ackc, &d) != 1)
                _exit(3);
            if (cm_now_ns() - t0 > 1000000000u)
                _exit(5); /* lost wake-up rescued only by the timeout */
        }
        _exit(0);
    }
    int fail = 0;
    struct ipc_sqe d;
    for (uint64_t i = 0; i < rounds && !fail; i++) {
        uint32_t bell;
        while (ipc_ring_empty(&rx)) {
            if (ipc_doorbell_prepare(&rx, &bell) == 1)
                break;
            struct io_uring_sqe *sqe = io_uring_get_sqe(&u);
            ipc_uring_prep_futex_wait(sqe, &rx.sh->doorbell, bell);
            io_uring_submit(&u);
            struct io_uring_cqe *cqe;
            int rc = wait_cqe_ms(&u, &cqe, 3000);
            if (rc < 0) {
                fail = 1; /* lost wake-up */
                break;
            }
            if (cqe->res != 0 && cqe->res != -EAGAIN)
                fail = 2;
            io_uring_cqe_seen(&u, cqe);
            ipc_doorbell_finish(&rx);
        }
        if (fail || ipc_ring_pop(&rx, &d) != 1 || d.user_data != i) {
            fail = fail ? fail : 3;
            break;
        }
        if (ipc_ring_push(&ack, &d) != 0)
            fail = 4;
        ipc_doorbell_notify(&ack);
    }
    cr_expect_eq(fail, 0, "consumer failed with code %d (1 = lost wake-up)", fail);
    cr_expect_eq(itu_wait_child(pid, 10000), 0, "producer child failed");
    io_uring_queue_exit(&u);
    itu_shared_unmap(mem, 2 * rb);
}
