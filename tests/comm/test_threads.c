/* Ranks as threads of one process: the same collectives, so that TSan sees
 * every access to the staging buffers and channels and checks that the
 * barrier and the channel words order them (across processes it cannot). */
#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/common.h"
#include "engine/comm/comm.h"
#include "tests/comm/util/comm_test_util.h"

struct rank_thread {
    comm *c;
    struct ctu_result res;
    int iters;
};

static float val(int rank, size_t i, int it)
{
    uint64_t s = (uint64_t)rank * 1000003u + i * 7919u + (uint64_t)it * 104729u + 1;
    return ctu_rand_float(&s);
}

static void *rank_main(void *p)
{
    struct rank_thread *t = p;
    comm *c = t->c;
    int me = comm_rank(c), n = comm_size(c);
    /* 9000 floats: reduce-scatter over two chunks of a 64 KiB buffer */
    static const size_t sizes[] = {1, 768, 9000};
    float *x = malloc(9000 * sizeof(float));
    int rc = 0;
    for (int it = 0; it < t->iters && rc == 0; it++) {
        for (size_t k = 0; k < CM_ARRAY_LEN(sizes) && rc == 0; k++) {
            for (size_t i = 0; i < sizes[k]; i++)
                x[i] = val(me, i, it);
            rc = comm_all_reduce_sum_f32(c, x, sizes[k]);
            for (size_t i = 0; rc == 0 && i < sizes[k]; i++) {
                float want = val(0, i, it);
                for (int r = 1; r < n; r++)
                    want += val(r, i, it);
                if (memcmp(&want, &x[i], sizeof want))
                    rc = ctu_fail(&t->res, -EIO, "it %d n %zu: x[%zu] = %a, want %a", it,
                                  sizes[k], i, (double)x[i], (double)want);
            }
        }
        int v = me == it % n ? it * 3 : -1;
        if (rc == 0)
            rc = comm_broadcast(c, &v, sizeof v, it % n);
        if (rc == 0 && v != it * 3)
            rc = ctu_fail(&t->res, -EIO, "it %d: broadcast gave %d", it, v);
        int all[4], mine = me + it;
        if (rc == 0)
            rc = comm_all_gather(c, &mine, all, sizeof mine);
        for (int r = 0; rc == 0 && r < n; r++)
            if (all[r] != r + it)
                rc = ctu_fail(&t->res, -EIO, "it %d: all_gather[%d] = %d", it, r, all[r]);
        /* a message around the ring, larger than the channel */
        char out[300], in[300];
        memset(out, 'a' + me, sizeof out);
        int next = (me + 1) % n, prev = (me + n - 1) % n;
        if (rc == 0 && me % 2 == 0) {
            rc = comm_send(c, out, sizeof out, next);
            if (rc == 0)
                rc = comm_recv(c, in, sizeof in, prev);
        } else if (rc == 0) {
            rc = comm_recv(c, in, sizeof in, prev);
            if (rc == 0)
                rc = comm_send(c, out, sizeof out, next);
        }
        if (rc == 0 && (in[0] != 'a' + prev || in[299] != 'a' + prev))
            rc = ctu_fail(&t->res, -EIO, "it %d: ring message from %d corrupt", it, prev);
        if (rc == 0)
            rc = comm_barrier(c);
    }
    if (rc < 0 && !t->res.msg[0])
        snprintf(t->res.msg, sizeof t->res.msg, "%s", comm_last_error(c));
    if (rc < 0)
        comm_abort(c, t->res.msg);
    t->res.rc = rc;
    free(x);
    return NULL;
}

static void threads_case(int n)
{
    char why[256];
    /* p2p 128 bytes: the 300-byte ring message takes three chunks */
    comm_shm_cfg cfg = {.n_ranks = n, .buf_bytes = 64 << 10, .p2p_bytes = 128};
    int fd = comm_shm_create(&cfg, why, sizeof why);
    cr_assert_geq(fd, 0, "%s", why);
    struct rank_thread t[4] = {0};
    pthread_t th[4];
    comm_shm_opts o = COMM_SHM_OPTS_DEFAULT;
    o.timeout_ms = 50000;
    for (int r = 0; r < n; r++) {
        cr_assert_eq(comm_shm_attach(&t[r].c, fd, r, &o, why, sizeof why), 0, "%s", why);
        t[r].iters = CTU_SCALE(200, 30);
    }
    for (int r = 0; r < n; r++)
        cr_assert_eq(pthread_create(&th[r], NULL, rank_main, &t[r]), 0);
    for (int r = 0; r < n; r++) {
        pthread_join(th[r], NULL);
        cr_expect_eq(t[r].res.rc, 0, "%d ranks, rank %d: %s", n, r, t[r].res.msg);
        comm_destroy(t[r].c);
    }
    close(fd);
}

Test(comm_threads, ranks_as_threads_2, .timeout = 120)
{
    threads_case(2);
}

Test(comm_threads, ranks_as_threads_3, .timeout = 120)
{
    threads_case(3);
}
