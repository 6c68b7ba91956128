/* Shared-memory collectives between 2, 3 and 4 forked rank processes:
 * all-reduce equals the rank-order sum bit for bit (every size path: tiny,
 * direct, reduce-scatter, chunked) and repeats bit-identically; all-gather,
 * broadcast from every root, point-to-point in both directions and in
 * order, barrier ordering. */
#include <criterion/criterion.h>
#include <errno.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "common/common.h"
#include "engine/comm/comm.h"
#include "tests/comm/util/comm_test_util.h"

/* 64 KiB per rank: halves of 8192 floats, so 100003 floats take 13 chunks
 * and 5000 floats (20000 bytes) take the reduce-scatter path in one. */
#define BUF_BYTES (64u << 10)
#define P2P_BYTES 4096u

static const size_t ar_sizes[] = {1, 767, 768, 5000, 100003};

static void fill_rank(float *x, size_t n, int rank, size_t which)
{
    uint64_t st = 0x1234567ull * (uint64_t)(rank + 1) + which * 0x9e3779b9ull;
    for (size_t i = 0; i < n; i++)
        x[i] = ctu_rand_float(&st);
}

/* The reference: rank 0 + rank 1 + ... per element, in this order. */
static void ref_sum(float *out, float *tmp, size_t n, int n_ranks, size_t which)
{
    fill_rank(out, n, 0, which);
    for (int r = 1; r < n_ranks; r++) {
        fill_rank(tmp, n, r, which);
        for (size_t i = 0; i < n; i++)
            out[i] += tmp[i];
    }
}

static int rank_all_reduce(comm *c, struct ctu_result *res, void *arg)
{
    (void)arg;
    int me = comm_rank(c), n = comm_size(c);
    size_t max = 100003;
    float *x = malloc(max * sizeof(float)), *want = malloc(max * sizeof(float)),
          *tmp = malloc(max * sizeof(float)), *first = malloc(max * sizeof(float));
    if (!x || !want || !tmp || !first)
        return ctu_fail(res, -ENOMEM, "out of memory");
    int rc = 0;
    for (size_t k = 0; k < CM_ARRAY_LEN(ar_sizes) && rc == 0; k++) {
        size_t len = ar_sizes[k];
        ref_sum(want, tmp, len, n, k);
        for (int rep = 0; rep < 3 && rc == 0; rep++) {
            /* perturb who arrives first from one repeat to the next */
            for (int y = 0; y < ((me + rep) % n) * 3; y++)
                sched_yield();
            fill_rank(x, len, me, k);
            rc = comm_all_reduce_sum_f32(c, x, len);
            if (rc < 0)
                break;
            for (size_t i = 0; i < len; i++)
                if (memcmp(&x[i], &want[i], sizeof(float)) != 0) {
                    rc = ctu_fail(res, -EIO,
                                  "n=%zu rep %d: x[%zu] = %a, rank-order sum is %a", len, rep,
                                  i, (double)x[i], (double)want[i]);
                    break;
                }
            if (rc == 0 && rep == 0)
                memcpy(first, x, len * sizeof(float));
            else if (rc == 0 && memcmp(first, x, len * sizeof(float)) != 0)
                rc = ctu_fail(res, -EIO, "n=%zu: repeat %d differs from the first run", len,
                              rep);
        }
        res->u64[k] = ctu_hash(x, len * sizeof(float));
    }
    free(x);
    free(want);
    free(tmp);
    free(first);
    return rc;
}

static void all_reduce_case_opts(int n_ranks, const comm_shm_opts *o)
{
    struct ctu_group g;
    comm_shm_cfg cfg = {.n_ranks = n_ranks, .buf_bytes = BUF_BYTES, .p2p_bytes = P2P_BYTES};
    cr_assert_eq(ctu_start(&g, &cfg, o, rank_all_reduce, NULL, 0), 0);
    int bad = ctu_wait(&g, 60000);
    for (int r = 0; r < n_ranks; r++)
        cr_expect_eq(g.res[r].rc, 0, "rank %d: %s", r, g.res[r].msg);
    cr_assert_eq(bad, 0);
    for (size_t k = 0; k < CM_ARRAY_LEN(ar_sizes); k++)
        for (int r = 1; r < n_ranks; r++)
            cr_expect_eq(g.res[r].u64[k], g.res[0].u64[k], "n=%zu: rank %d differs from rank 0",
                         ar_sizes[k], r);
    ctu_free(&g);
}

static void all_reduce_case(int n_ranks)
{
    all_reduce_case_opts(n_ranks, NULL);
}

/* Whatever this machine's CPU count makes `auto` choose, both ways of
 * waiting run: futex sleeps only, and spinning first (long enough that
 * most waits end while spinning). */
Test(comm_collectives, all_reduce_same_sleeping_or_spinning, .timeout = 60)
{
    comm_shm_opts o = COMM_SHM_OPTS_DEFAULT;
    o.spin = 0;
    all_reduce_case_opts(2, &o);
    o.spin = 1;
    o.spin_ns = 5000000;
    all_reduce_case_opts(2, &o);
}

Test(comm_collectives, all_reduce_is_rank_order_sum_2_ranks, .timeout = 60)
{
    all_reduce_case(2);
}

Test(comm_collectives, all_reduce_is_rank_order_sum_3_ranks, .timeout = 60)
{
    all_reduce_case(3);
}

Test(comm_collectives, all_reduce_is_rank_order_sum_4_ranks, .timeout = 60)
{
    all_reduce_case(4);
}

/* The bit-for-bit checks above could not fail if the order never mattered:
 * with this data, another order gives other bits. */
Test(comm_collectives, test_data_is_order_sensitive)
{
    size_t n = 5000;
    float *a = malloc(n * sizeof(float)), *b = malloc(n * sizeof(float)),
          *c = malloc(n * sizeof(float));
    fill_rank(a, n, 0, 3);
    fill_rank(b, n, 1, 3);
    fill_rank(c, n, 2, 3);
    size_t differ = 0;
    for (size_t i = 0; i < n; i++) {
        float fwd = (a[i] + b[i]) + c[i], rev = (c[i] + b[i]) + a[i];
        differ += memcmp(&fwd, &rev, sizeof fwd) != 0;
    }
    cr_expect_gt(differ, n / 100, "only %zu of %zu sums depend on the order", differ, n);
    free(a);
    free(b);
    free(c);
}

static const size_t ag_sizes[] = {1, 1000, 70001};

static uint8_t pattern(int rank, size_t i, size_t which)
{
    return (uint8_t)(rank * 31 + i * 7 + which * 13 + (i >> 8));
}

static int rank_all_gather(comm *c, struct ctu_result *res, void *arg)
{
    (void)arg;
    int me = comm_rank(c), n = comm_size(c);
    size_t max = 70001;
    uint8_t *in = malloc(max), *out = malloc(max * (size_t)n);
    if (!in || !out)
        return ctu_fail(res, -ENOMEM, "out of memory");
    int rc = 0;
    for (size_t k = 0; k < CM_ARRAY_LEN(ag_sizes) && rc == 0; k++) {
        size_t len = ag_sizes[k];
        for (int inplace = 0; inplace < 2 && rc == 0; inplace++) {
            memset(out, 0xee, len * (size_t)n);
            uint8_t *src = inplace ? out + (size_t)me * len : in;
            for (size_t i = 0; i < len; i++)
                src[i] = pattern(me, i, k);
            rc = comm_all_gather(c, src, out, len);
            for (int r = 0; r < n && rc == 0; r++)
                for (size_t i = 0; i < len; i++)
                    if (out[(size_t)r * len + i] != pattern(r, i, k)) {
                        rc = ctu_fail(res, -EIO,
                                      "bytes_per_rank %zu%s: out[rank %d][%zu] = %u, want %u",
                                      len, inplace ? " (in place)" : "", r, i,
                                      out[(size_t)r * len + i], pattern(r, i, k));
                        break;
                    }
        }
    }
    free(in);
    free(out);
    return rc;
}

Test(comm_collectives, all_gather_collects_every_rank_2_3_4, .timeout = 60)
{
    for (int n = 2; n <= 4; n++)
        ctu_run(n, BUF_BYTES, P2P_BYTES, rank_all_gather, NULL);
}

static int rank_broadcast(comm *c, struct ctu_result *res, void *arg)
{
    (void)arg;
    int me = comm_rank(c), n = comm_size(c);
    static const size_t sizes[] = {1, 4096, 100000};
    uint8_t *buf = malloc(100000);
    if (!buf)
        return ctu_fail(res, -ENOMEM, "out of memory");
    int rc = 0;
    for (int root = 0; root < n && rc == 0; root++)
        for (size_t k = 0; k < CM_ARRAY_LEN(sizes) && rc == 0; k++) {
            for (size_t i = 0; i < sizes[k]; i++)
                buf[i] = pattern(me, i, k);
            rc = comm_broadcast(c, buf, sizes[k], root);
            for (size_t i = 0; rc == 0 && i < sizes[k]; i++)
                if (buf[i] != pattern(root, i, k))
                    rc = ctu_fail(res, -EIO, "root %d, %zu bytes: buf[%zu] = %u, want %u", root,
                                  sizes[k], i, buf[i], pattern(root, i, k));
        }
    free(buf);
    return rc;
}

Test(comm_collectives, broadcast_from_every_root_2_3_4, .timeout = 60)
{
    for (int n = 2; n <= 4; n++)
        ctu_run(n, BUF_BYTES, P2P_BYTES, rank_broadcast, NULL);
}

/* Message sizes around the channel size (4096): empty, one byte, one short
 * of a chunk, exactly one, several plus a tail. */
static const size_t p2p_sizes[] = {0, 1, P2P_BYTES - 1, P2P_BYTES, 3 * P2P_BYTES + 5};

static int check_msg(struct ctu_result *res, const uint8_t *b, size_t len, int from, int to,
                     size_t k)
{
    for (size_t i = 0; i < len; i++)
        if (b[i] != pattern(from * 8 + to, i, k))
            return ctu_fail(res, -EIO, "message %zu (%zu bytes) %d -> %d: byte %zu = %u", k,
                            len, from, to, i, b[i]);
    return 0;
}

/* Every ordered pair exchanges every size, in order; within a pair the
 * lower rank sends first so that messages larger than the channel (which
 * wait for the receiver) cannot deadlock. */
static int rank_p2p(comm *c, struct ctu_result *res, void *arg)
{
    (void)arg;
    int me = comm_rank(c), n = comm_size(c);
    uint8_t *buf = malloc(4 * P2P_BYTES);
    if (!buf)
        return ctu_fail(res, -ENOMEM, "out of memory");
    int rc = 0;
    for (int a = 0; a < n && rc == 0; a++)
        for (int b = a + 1; b < n && rc == 0; b++) {
            if (me != a && me != b)
                continue;
            int peer = me == a ? b : a;
            for (int dir = 0; dir < 2 && rc == 0; dir++) {
                int from = dir ? b : a, to = dir ? a : b;
                for (size_t k = 0; k < CM_ARRAY_LEN(p2p_sizes) && rc == 0; k++) {
                    size_t len = p2p_sizes[k];
                    if (me == from) {
                        for (size_t i = 0; i < len; i++)
                            buf[i] = pattern(from * 8 + to, i, k);
                        rc = comm_send(c, buf, len, peer);
                    } else {
                        memset(buf, 0, len);
                        rc = comm_recv(c, buf, len, peer);
                        if (rc == 0)
                            rc = check_msg(res, buf, len, from, to, k);
                    }
                }
            }
        }
    /* Small messages both ways at once: each fits the channel, so both
     * sends return before either receive. */
    uint8_t out = (uint8_t)me, got = 0xff;
    int next = (me + 1) % n, prev = (me + n - 1) % n;
    if (rc == 0)
        rc = comm_send(c, &out, 1, next);
    if (rc == 0)
        rc = comm_recv(c, &got, 1, prev);
    if (rc == 0 && got != prev)
        rc = ctu_fail(res, -EIO, "ring: got %u from rank %d", got, prev);
    free(buf);
    return rc;
}

Test(comm_collectives, send_recv_every_pair_in_order_2_3_4, .timeout = 60)
{
    for (int n = 2; n <= 4; n++)
        ctu_run(n, BUF_BYTES, P2P_BYTES, rank_p2p, NULL);
}

/* Barrier ordering: in round k every rank increments arrived[k] and then
 * waits; after the barrier, arrived[k] must already be n on every rank. A
 * barrier that let one rank through early fails this. */
#define ROUNDS 300

static int rank_barrier(comm *c, struct ctu_result *res, void *arg)
{
    _Atomic uint32_t *arrived = *(_Atomic uint32_t **)arg;
    int me = comm_rank(c), n = comm_size(c);
    for (int k = 0; k < ROUNDS; k++) {
        if ((k + me) % 5 == 0)
            sched_yield();
        atomic_fetch_add(&arrived[k], 1);
        int rc = comm_barrier(c);
        if (rc < 0)
            return rc;
        uint32_t seen = atomic_load(&arrived[k]);
        if (seen != (uint32_t)n)
            return ctu_fail(res, -EIO, "round %d: %u of %d ranks had arrived after the barrier",
                            k, seen, n);
    }
    return 0;
}

Test(comm_collectives, barrier_releases_only_after_every_rank_arrived, .timeout = 60)
{
    for (int n = 2; n <= 4; n++) {
        _Atomic uint32_t *arrived = mmap(NULL, ROUNDS * sizeof(uint32_t),
                                         PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1,
                                         0);
        cr_assert_neq(arrived, MAP_FAILED);
        ctu_run(n, BUF_BYTES, P2P_BYTES, rank_barrier, &arrived);
        for (int k = 0; k < ROUNDS; k++)
            cr_expect_eq(atomic_load(&arrived[k]), (uint32_t)n);
        munmap((void *)arrived, ROUNDS * sizeof(uint32_t));
    }
}

/* Mixed calls back to back: the staging halves alternate across different
 * collectives without corrupting each other. */
static int rank_mixed(comm *c, struct ctu_result *res, void *arg)
{
    (void)arg;
    int me = comm_rank(c), n = comm_size(c);
    for (int it = 0; it < 200; it++) {
        float x[33];
        for (int i = 0; i < 33; i++)
            x[i] = (float)(me * 100 + i + it);
        CM_TRY(comm_all_reduce_sum_f32(c, x, 33));
        for (int i = 0; i < 33; i++) {
            float want = 0;
            for (int r = 0; r < n; r++)
                want += (float)(r * 100 + i + it);
            if (x[i] != want)
                return ctu_fail(res, -EIO, "it %d: x[%d] = %g, want %g", it, i, (double)x[i],
                                (double)want);
        }
        int32_t v = me == it % n ? it : -1;
        CM_TRY(comm_broadcast(c, &v, sizeof v, it % n));
        if (v != it)
            return ctu_fail(res, -EIO, "it %d: broadcast gave %d", it, v);
        int32_t all[COMM_SHM_MAX_RANKS], mine = me * 1000 + it;
        CM_TRY(comm_all_gather(c, &mine, all, sizeof mine));
        for (int r = 0; r < n; r++)
            if (all[r] != r * 1000 + it)
                return ctu_fail(res, -EIO, "it %d: all_gather[%d] = %d", it, r, all[r]);
    }
    return 0;
}

Test(comm_collectives, mixed_collectives_back_to_back, .timeout = 60)
{
    ctu_run(3, BUF_BYTES, P2P_BYTES, rank_mixed, NULL);
}

Test(comm_collectives, single_rank_is_identity)
{
    char why[256];
    comm_shm_cfg cfg = {.n_ranks = 1};
    int fd = comm_shm_create(&cfg, why, sizeof why);
    cr_assert_geq(fd, 0, "%s", why);
    comm *c;
    cr_assert_eq(comm_shm_attach(&c, fd, 0, NULL, why, sizeof why), 0, "%s", why);
    cr_expect_eq(comm_size(c), 1);
    cr_expect_str_eq(comm_backend(c), "shm");
    float x[3] = {1.5f, -2.0f, 3.25f};
    cr_expect_eq(comm_all_reduce_sum_f32(c, x, 3), 0);
    cr_expect(x[0] == 1.5f && x[1] == -2.0f && x[2] == 3.25f);
    int in = 42, out = 0;
    cr_expect_eq(comm_all_gather(c, &in, &out, sizeof in), 0);
    cr_expect_eq(out, 42);
    cr_expect_eq(comm_broadcast(c, &in, sizeof in, 0), 0);
    cr_expect_eq(comm_barrier(c), 0);
    cr_expect_eq(comm_send(c, &in, sizeof in, 0), -EINVAL, "send to self");
    comm_destroy(c);
    close(fd);
}
