/* SPSC ring semantics: full/empty, bursts, u32 index wrap, bad peer indices,
 * in-process threads (TSan-visible) and fork()ed processes (millions). */
#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ipc/ipc.h"
#include "tests/ipc/util/ipc_test_util.h"

static struct ipc_sqe mk(uint64_t seq)
{
    struct ipc_sqe d;
    memset(&d, 0, sizeof(d));
    d.opcode = IPC_OP_PING;
    d.user_data = seq;
    d.arg[0] = ~seq;
    return d;
}

/* A private ring (both views in one process). */
static void *pair(uint32_t n, ipc_ring *p, ipc_ring *c)
{
    void *mem = aligned_alloc(64, itu_ring_bytes(n));
    cr_assert_not_null(mem);
    itu_ring_init(mem, n, 1, IPC_RING_PRODUCER, p);
    itu_ring_init(mem, n, 0, IPC_RING_CONSUMER, c);
    return mem;
}

Test(ipc_ring, attach_rejects_bad_geometry)
{
    _Alignas(64) uint8_t mem[4096];
    ipc_ring r;
    ipc_ring_format((struct ipc_ring_shared *)mem);
    cr_expect_eq(ipc_ring_attach(&r, (void *)mem, mem + 192, 3, IPC_RING_PRODUCER), -EINVAL);
    cr_expect_eq(ipc_ring_attach(&r, (void *)mem, mem + 192, 1, IPC_RING_PRODUCER), -EINVAL);
    cr_expect_eq(ipc_ring_attach(&r, (void *)mem, mem + 192, 0, IPC_RING_PRODUCER), -EINVAL);
    cr_expect_eq(ipc_ring_attach(&r, (void *)mem, mem + 192, IPC_RING_MAX_ENTRIES * 2,
                                 IPC_RING_PRODUCER), -EINVAL);
    cr_expect_eq(ipc_ring_attach(&r, (void *)mem, mem + 192, 8, (enum ipc_ring_role)7), -EINVAL);
    cr_expect_eq(ipc_ring_attach(&r, (void *)mem, mem + 192, 8, IPC_RING_CONSUMER), 0);
    cr_expect_eq(r.wake_fd, -1);
}

Test(ipc_ring, push_until_full_then_pop_in_order)
{
    ipc_ring p, c;
    void *mem = pair(8, &p, &c);
    struct ipc_sqe d, o;
    cr_expect_eq(ipc_ring_pop(&c, &o), 0, "empty ring pops nothing");
    cr_expect(ipc_ring_empty(&c));
    cr_expect_eq(ipc_ring_count(&p), 8);
    for (uint64_t i = 0; i < 8; i++) {
        d = mk(i);
        cr_assert_eq(ipc_ring_push(&p, &d), 0, "push %llu", (unsigned long long)i);
    }
    d = mk(99);
    cr_expect_eq(ipc_ring_push(&p, &d), -EAGAIN, "9th push into an 8-entry ring");
    cr_expect_eq(ipc_ring_count(&p), 0);
    cr_expect_eq(ipc_ring_count(&c), 8);
    cr_expect_not(ipc_ring_empty(&c));
    for (uint64_t i = 0; i < 8; i++) {
        cr_assert_eq(ipc_ring_pop(&c, &o), 1);
        cr_expect_eq(o.user_data, i);
        cr_expect_eq(o.arg[0], ~i);
    }
    cr_expect_eq(ipc_ring_pop(&c, &o), 0);
    /* space is visible to the producer again */
    cr_expect_eq(ipc_ring_push(&p, &d), 0);
    cr_expect_eq(ipc_ring_pop(&c, &o), 1);
    cr_expect_eq(o.user_data, 99u);
    free(mem);
}

Test(ipc_ring, burst_partial_when_nearly_full_and_wraps_array)
{
    ipc_ring p, c;
    void *mem = pair(16, &p, &c);
    struct ipc_sqe in[32], out[32];
    for (uint64_t i = 0; i < 32; i++)
        in[i] = mk(i);
    cr_expect_eq(ipc_ring_push_burst(&p, in, 10), 10);
    cr_expect_eq(ipc_ring_pop_burst(&c, out, 7), 7);
    /* 3 in flight, 13 free: a burst of 20 pushes 13 and crosses the array end */
    cr_expect_eq(ipc_ring_push_burst(&p, in + 10, 20), 13);
    cr_expect_eq(ipc_ring_push_burst(&p, in + 23, 5), 0, "full ring takes nothing");
    cr_expect_eq(ipc_ring_pop_burst(&c, out + 7, 32), 16);
    for (uint64_t i = 0; i < 23; i++)
        cr_expect_eq(out[i].user_data, i, "entry %llu", (unsigned long long)i);
    cr_expect_eq(ipc_ring_pop_burst(&c, out, 4), 0);
    cr_expect_eq(ipc_ring_push_burst(&p, in, 0), 0);
    free(mem);
}

/* Indices start 16 short of 2^32, so pushes and pops run across the u32 wrap. */
Test(ipc_ring, indices_wrap_at_2_pow_32)
{
    const uint32_t n = 8;
    void *mem = aligned_alloc(64, itu_ring_bytes(n));
    struct ipc_ring_shared *sh = mem;
    ipc_ring_format(sh);
    sh->head = sh->tail = 0xFFFFFFF0u;
    ipc_ring p, c;
    itu_ring_init(mem, n, 0, IPC_RING_PRODUCER, &p);
    itu_ring_init(mem, n, 0, IPC_RING_CONSUMER, &c);
    struct ipc_sqe in[5], out[5];
    uint64_t next_in = 0, next_out = 0;
    for (int round = 0; round < 20; round++) {
        /* alternate single and burst operations */
        if (round % 2) {
            for (int i = 0; i < 5; i++)
                in[i] = mk(next_in + (uint64_t)i);
            cr_assert_eq(ipc_ring_push_burst(&p, in, 5), 5);
            next_in += 5;
            cr_assert_eq(ipc_ring_pop_burst(&c, out, 5), 5);
            for (int i = 0; i < 5; i++)
                cr_assert_eq(out[i].user_data, next_out++);
        } else {
            for (int i = 0; i < 3; i++) {
                in[0] = mk(next_in++);
                cr_assert_eq(ipc_ring_push(&p, &in[0]), 0);
            }
            cr_assert_eq(ipc_ring_count(&c), 3);
            for (int i = 0; i < 3; i++) {
                cr_assert_eq(ipc_ring_pop(&c, &out[0]), 1);
                cr_assert_eq(out[0].user_data, next_out++);
            }
        }
    }
    /* 80 entries went through: both indices wrapped past zero */
    cr_expect_eq(sh->tail, 0xFFFFFFF0u + 80u);
    cr_expect_lt(sh->tail, 0x100u, "tail wrapped");
    cr_expect_eq(sh->head, sh->tail);
    /* and full/empty detection still holds across the wrap */
    for (uint32_t i = 0; i < n; i++)
        cr_expect_eq(ipc_ring_push(&p, &in[0]), 0);
    cr_expect_eq(ipc_ring_push(&p, &in[0]), -EAGAIN);
    free(mem);
}

Test(ipc_ring, impossible_peer_index_is_eproto)
{
    ipc_ring p, c;
    void *mem = pair(8, &p, &c);
    struct ipc_sqe d = mk(1), o;
    cr_assert_eq(ipc_ring_push(&p, &d), 0);
    /* producer claims 9 entries in an 8-entry ring */
    p.sh->tail = c.local + 9;
    cr_expect_eq(ipc_ring_pop(&c, &o), -EPROTO);
    cr_expect_eq(ipc_ring_pop_burst(&c, &o, 1), -EPROTO);
    cr_expect_eq(ipc_ring_count(&c), -EPROTO);
    cr_expect_not(ipc_ring_empty(&c), "bad tail must not read as empty");
    /* tail behind head */
    p.sh->tail = c.local - 1;
    cr_expect_eq(ipc_ring_pop(&c, &o), -EPROTO);
    cr_expect_eq(c.local, 0u, "consumer index untouched on error");
    /* consumer claims to have read entries never written */
    p.sh->tail = 1;
    ipc_ring p2;
    itu_ring_init(mem, 8, 0, IPC_RING_PRODUCER, &p2);
    p.sh->head = 5;
    cr_expect_eq(ipc_ring_push(&p2, &d), -EPROTO);
    cr_expect_eq(ipc_ring_push_burst(&p2, &d, 1), -EPROTO);
    cr_expect_eq(ipc_ring_count(&p2), -EPROTO);
    cr_expect_eq(p2.local, 1u, "producer index untouched on error");
    free(mem);
}

/* ---- threads: visible to TSan ---------------------------------------------- */

struct thr_arg {
    ipc_ring *r;
    uint64_t n;
    int burst;
};

static void *thr_producer(void *a_)
{
    struct thr_arg *a = a_;
    struct ipc_sqe buf[16];
    uint64_t seq = 0;
    while (seq < a->n) {
        if (a->burst) {
            uint32_t k = (uint32_t)(a->n - seq < 16 ? a->n - seq : 16);
            for (uint32_t i = 0; i < k; i++)
                buf[i] = mk(seq + i);
            int rc = ipc_ring_push_burst(a->r, buf, k);
            if (rc < 0)
                return (void *)1;
            seq += (uint64_t)rc;
            if (rc == 0)
                sched_yield();
        } else {
            buf[0] = mk(seq);
            int rc = ipc_ring_push(a->r, &buf[0]);
            if (rc == 0)
                seq++;
            else if (rc == -EAGAIN)
                sched_yield();
            else
                return (void *)1;
        }
    }
    return NULL;
}

/* Consume n messages; returns 0 when every seq arrived once, in order. */
static int consume_all(ipc_ring *c, uint64_t n, int burst)
{
    struct ipc_sqe buf[16];
    uint64_t expect = 0;
    while (expect < n) {
        int rc = burst ? ipc_ring_pop_burst(c, buf, 16) : ipc_ring_pop(c, buf);
        if (rc < 0)
            return 2;
        if (rc == 0) {
            sched_yield();
            continue;
        }
        for (int i = 0; i < rc; i++) {
            if (buf[i].user_data != expect || buf[i].arg[0] != ~expect)
                return 3;
            expect++;
        }
    }
    return ipc_ring_pop(c, buf) == 0 ? 0 : 4;
}

static void run_threads(int burst)
{
    ipc_ring p, c;
    void *mem = pair(64, &p, &c);
    struct thr_arg a = {.r = &p, .n = ITU_SCALE(1000000, 100000), .burst = burst};
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, thr_producer, &a), 0);
    int rc = consume_all(&c, a.n, burst);
    void *tr;
    pthread_join(t, &tr);
    cr_expect_null(tr, "producer thread failed");
    cr_expect_eq(rc, 0, "consumer saw a gap, duplicate or reorder (code %d)", rc);
    free(mem);
}

Test(ipc_ring, threads_every_seq_once_in_order, .timeout = 30)
{
    run_threads(0);
}

Test(ipc_ring, threads_burst_every_seq_once_in_order, .timeout = 30)
{
    run_threads(1);
}

/* ---- processes (4M messages; fewer on a 2-entry ring, where nearly every
 * operation finds it full or empty and yields) ----------------------------------------------------------------- */

static void run_fork(int burst, uint32_t entries, uint64_t n)
{
    size_t bytes = itu_ring_bytes(entries);
    void *mem = itu_shared_map(bytes);
    cr_assert_not_null(mem);
    ipc_ring c;
    itu_ring_init(mem, entries, 1, IPC_RING_CONSUMER, &c);
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        ipc_ring p;
        itu_ring_init(mem, entries, 0, IPC_RING_PRODUCER, &p);
        struct thr_arg a = {.r = &p, .n = n, .burst = burst};
        _exit(thr_producer(&a) ? 1 : 0);
    }
    int rc = consume_all(&c, n, burst);
    int st = itu_wait_child(pid, 20000);
    cr_expect_eq(st, 0, "producer process exit %d", st);
    cr_expect_eq(rc, 0, "consumer saw a gap, duplicate or reorder (code %d)", rc);
    itu_shared_unmap(mem, bytes);
}

Test(ipc_ring, processes_millions_every_seq_once_in_order, .timeout = 60)
{
    run_fork(0, 256, ITU_SCALE(4000000, 200000));
}

Test(ipc_ring, processes_burst_every_seq_once_in_order, .timeout = 60)
{
    run_fork(1, 256, ITU_SCALE(4000000, 200000));
}

Test(ipc_ring, processes_tiny_ring_every_seq_once_in_order, .timeout = 60)
{
    run_fork(1, 2, ITU_SCALE(200000, 20000));
}
