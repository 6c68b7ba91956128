/* Descriptor validation, field by field, and a malicious peer scribbling on
 * ring indices and descriptors: the consumer must report -EPROTO or
 * validation errors and never crash or over-read. */
#include <criterion/criterion.h>
#include <time.h>
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ipc/ipc.h"
#include "tests/ipc/util/ipc_test_util.h"

static struct ipc_region_hdr layout(void)
{
    struct ipc_region_hdr h;
    memset(&h, 0, sizeof(h));
    h.n_slots = 4;
    h.slot_in_bytes = 1024;
    h.slot_out_bytes = 4096;
    return h;
}

static struct ipc_sqe good(void)
{
    struct ipc_sqe s;
    memset(&s, 0, sizeof(s));
    s.opcode = IPC_OP_PING;
    s.slot = 3;
    s.in_off = 24;
    s.in_len = 1000; /* ends exactly at slot_in_bytes */
    s.user_data = 0xabc;
    s.arg[0] = UINT64_MAX; /* opcode-specific: not checked here */
    return s;
}

static void expect_bad(struct ipc_sqe s, int want, const char *field)
{
    struct ipc_region_hdr h = layout();
    const char *why = NULL;
    int rc = ipc_sqe_validate(&s, &h, &why);
    cr_expect_eq(rc, want, "%s: rc %d want %d", field, rc, want);
    cr_expect_not_null(why, "%s: no reason", field);
    if (why)
        cr_expect_not_null(strstr(why, field), "reason '%s' should name %s", why, field);
}

Test(ipc_validate, accepts_valid_sqe_at_the_limits)
{
    struct ipc_region_hdr h = layout();
    struct ipc_sqe s = good();
    const char *why = "unchanged";
    cr_expect_eq(ipc_sqe_validate(&s, &h, &why), 0);
    cr_expect_null(why);
    s.in_off = 1024;
    s.in_len = 0;
    cr_expect_eq(ipc_sqe_validate(&s, &h, NULL), 0, "empty payload at the end");
    s.opcode = IPC_OP__COUNT - 1;
    s.slot = 0;
    cr_expect_eq(ipc_sqe_validate(&s, &h, NULL), 0);
}

Test(ipc_validate, rejects_each_bad_field)
{
    struct ipc_sqe s;
    s = good(); s.opcode = IPC_OP__COUNT;
    expect_bad(s, -EINVAL, "opcode");
    s = good(); s.opcode = 0xff;
    expect_bad(s, -EINVAL, "opcode");
    s = good(); s.flags = 0x80;
    expect_bad(s, -EINVAL, "flags");
    s = good(); s.rsvd0 = 1;
    expect_bad(s, -EINVAL, "rsvd0");
    s = good(); s.pad[7] = 1;
    expect_bad(s, -EINVAL, "pad");
    s = good(); s.slot = 4;
    expect_bad(s, -EINVAL, "slot");
    s = good(); s.slot = UINT32_MAX;
    expect_bad(s, -EINVAL, "slot");
    s = good(); s.in_len = 1001;
    expect_bad(s, -EPROTO, "in_len");
    s = good(); s.in_off = 1025; s.in_len = 0;
    expect_bad(s, -EPROTO, "in_off");
    /* would wrap to 1 in 32-bit arithmetic */
    s = good(); s.in_off = 0xFFFFFFFFu; s.in_len = 2;
    expect_bad(s, -EPROTO, "in_off");
    s = good(); s.in_off = 8; s.in_len = 0xFFFFFFFFu;
    expect_bad(s, -EPROTO, "in_len");
    struct ipc_region_hdr h = layout();
    s = good();
    const char *why = NULL;
    cr_expect_eq(ipc_sqe_validate(NULL, &h, &why), -EINVAL);
    cr_expect_eq(ipc_sqe_validate(&s, NULL, &why), -EINVAL);
    h.n_slots = 0;
    cr_expect_eq(ipc_sqe_validate(&s, &h, &why), -EINVAL, "no slots: every slot is bad");
}

/* Consume from a ring whose shared words and entries are scribbled on at
 * random between operations. Invariants: results are in range, the
 * consumer's private index advances by exactly what was returned, nothing
 * is read outside the mapping (ASan checks that). */
Test(ipc_validate, malicious_peer_scribbles_never_crash, .timeout = 60)
{
    const uint32_t n = 16;
    size_t bytes = itu_ring_bytes(n);
    uint8_t *mem = aligned_alloc(64, bytes);
    cr_assert_not_null(mem);
    struct ipc_ring_shared *sh = (void *)mem;
    struct ipc_region_hdr h = layout();
    unsigned seed = 12345;
    long eproto = 0, popped = 0, valid = 0, invalid = 0;
    for (int it = 0; it < ITU_SCALE(200000, 20000); it++) {
        if (it % 1000 == 0) {
            ipc_ring_format(sh);
            for (size_t i = 0; i < n * IPC_DESC_SIZE; i++)
                mem[sizeof(*sh) + i] = (uint8_t)rand_r(&seed);
        }
        ipc_ring c, p;
        itu_ring_init(mem, n, 0, IPC_RING_CONSUMER, &c);
        itu_ring_init(mem, n, 0, IPC_RING_PRODUCER, &p);
        switch (rand_r(&seed) % 5) {
        case 0: sh->tail = (uint32_t)rand_r(&seed) * 2654435761u; break;
        case 1: sh->tail = sh->head + (uint32_t)(rand_r(&seed) % (2 * n + 2)); break;
        case 2: sh->head = (uint32_t)rand_r(&seed); break;
        case 3: sh->flags = (uint32_t)rand_r(&seed); sh->doorbell = (uint32_t)rand_r(&seed); break;
        default: mem[sizeof(*sh) + (size_t)rand_r(&seed) % (n * IPC_DESC_SIZE)] = (uint8_t)rand_r(&seed);
        }
        struct ipc_sqe out[2 * 16];
        for (int op = 0; op < 4; op++) {
            uint32_t before = c.local;
            int rc;
            switch (rand_r(&seed) % 4) {
            case 0: rc = ipc_ring_pop(&c, out); cr_assert(rc == 0 || rc == 1 || rc == -EPROTO); break;
            case 1: rc = ipc_ring_pop_burst(&c, out, 1 + (uint32_t)rand_r(&seed) % 32);
                    cr_assert(rc == -EPROTO || (rc >= 0 && rc <= (int)n), "burst returned %d", rc); break;
            case 2: rc = ipc_ring_count(&c); cr_assert(rc == -EPROTO || (rc >= 0 && rc <= (int)n)); rc = 0;
                    (void)ipc_ring_empty(&c); break;
            default: {
                struct ipc_sqe d[4] = {{0}};
                int pr = ipc_ring_push_burst(&p, d, 1 + (uint32_t)rand_r(&seed) % 4);
                cr_assert(pr == -EPROTO || (pr >= 0 && pr <= 4));
                rc = 0;
            }
            }
            if (rc == -EPROTO) {
                eproto++;
                cr_assert_eq(c.local, before, "index moved on -EPROTO");
                continue;
            }
            cr_assert_eq(c.local - before, (uint32_t)rc, "index moved by %u, returned %d",
                         c.local - before, rc);
            for (int i = 0; i < rc; i++) {
                const char *why = NULL;
                popped++;
                if (ipc_sqe_validate(&out[i], &h, &why) == 0) {
                    valid++;
                } else {
                    invalid++;
                    cr_assert_not_null(why);
                }
            }
        }
    }
    cr_log_info("scribbles: %ld -EPROTO, %ld popped (%ld valid, %ld rejected)", eproto, popped,
                valid, invalid);
    cr_expect_gt(eproto, 0, "impossible indices were never detected");
    cr_expect_gt(invalid, 0, "random descriptors were never rejected");
    free(mem);
}

/* The same, with a hostile process writing concurrently while we consume. */
Test(ipc_validate, concurrent_hostile_process_never_crashes, .timeout = 30)
{
    const uint32_t n = 64;
    size_t bytes = itu_ring_bytes(n);
    /* One extra line past the ring: the child's "I am scribbling" flag, so the
     * parent never finishes before the hostile writer has started. */
    uint8_t *mem = itu_shared_map(bytes + 64);
    cr_assert_not_null(mem);
    volatile uint32_t *started = (volatile uint32_t *)(mem + bytes);
    ipc_ring c;
    itu_ring_init(mem, n, 1, IPC_RING_CONSUMER, &c);
    volatile uint32_t *words = (volatile uint32_t *)mem;
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        unsigned seed = 777;
        *started = 1;
        for (;;) {
            size_t w = (size_t)rand_r(&seed) % (bytes / 4);
            if (rand_r(&seed) % 4 == 0)
                w = 16; /* the tail word, often */
            words[w] = (uint32_t)rand_r(&seed) % 3 ? words[16] + (uint32_t)(rand_r(&seed) % 70)
                                                    : (uint32_t)rand_r(&seed);
        }
    }
    while (!*started)
        sched_yield();
    struct ipc_region_hdr h = layout();
    long eproto = 0, popped = 0;
    struct ipc_sqe out[32];
    /* At least N iterations, and on a loaded machine keep going (up to 10 s)
     * until the hostile writer has actually produced some traffic. */
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int it = 0;; it++) {
        if (it >= ITU_SCALE(300000, 50000)) {
            struct timespec t1;
            clock_gettime(CLOCK_MONOTONIC, &t1);
            if (eproto + popped >= 100 || t1.tv_sec - t0.tv_sec > 10)
                break;
        }
        int rc = it & 1 ? ipc_ring_pop_burst(&c, out, 32) : ipc_ring_pop(&c, out);
        if (rc == -EPROTO) {
            eproto++;
            c.local = __atomic_load_n(&c.sh->tail, __ATOMIC_ACQUIRE); /* resync, as a test only */
            c.cached = c.local;
            continue;
        }
        cr_assert(rc >= 0 && rc <= 32, "rc %d", rc);
        for (int i = 0; i < rc; i++) {
            const char *why;
            (void)ipc_sqe_validate(&out[i], &h, &why);
            popped++;
        }
        if ((it & 1023) == 0)
            sched_yield();
    }
    kill(pid, SIGKILL);
    itu_wait_child(pid, 5000);
    cr_log_info("hostile: %ld -EPROTO, %ld popped", eproto, popped);
    cr_expect_gt(eproto + popped, 0);
    itu_shared_unmap(mem, bytes + 64);
}
