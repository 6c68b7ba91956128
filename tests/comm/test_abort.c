/* Abort: one rank's comm_abort, another thread's, the coordinator's
 * comm_shm_abort_fd after a rank was SIGKILLed, and the per-call timeout
 * when nobody aborts: every waiting rank returns an error promptly, and
 * every later call fails too. Mismatched calls are refused the same way. */
#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/common.h"
#include "engine/comm/comm.h"
#include "tests/comm/util/comm_test_util.h"

/* "Promptly": far below the 30 s default timeout, with room for a loaded
 * machine. */
#define PROMPT_NS 3000000000ull

/* Shared with the ranks (ctu_group.shared). */
struct abort_shared {
    _Atomic uint64_t t_abort_ns;
};

static bool blocked_in_barrier(int fd, uint32_t n_waiting)
{
    return ctu_barrier_count(fd) == n_waiting;
}

/* The waiting ranks' common ending: the call failed with -ECONNABORTED,
 * the reason is the aborter's, and a later call fails the same way. */
static int expect_aborted(comm *c, struct ctu_result *res, int rc, const char *call,
                          const char *reason)
{
    char why[256];
    if (rc != -ECONNABORTED)
        return ctu_fail(res, -EIO, "%s returned %d (%s), expected -ECONNABORTED", call, rc,
                        comm_last_error(c));
    if (!comm_aborted(c, why, sizeof why) || strcmp(why, reason) != 0)
        return ctu_fail(res, -EIO, "%s: abort reason '%s', expected '%s'", call, why, reason);
    if (!strstr(comm_last_error(c), reason))
        return ctu_fail(res, -EIO, "%s: message '%s' lacks the reason", call,
                        comm_last_error(c));
    float x = 1;
    rc = comm_all_reduce_sum_f32(c, &x, 1);
    if (rc != -ECONNABORTED)
        return ctu_fail(res, -EIO, "a call after the abort returned %d", rc);
    return 0;
}

static const char *const abort_why = "rank 0 gives up: test abort";

/* Rank 0 aborts once every other rank is blocked in a collective (rank 1 in
 * all-reduce, rank 2 in barrier, rank 3 in broadcast: all wait at the
 * region's barrier). */
static int rank_abort_one(comm *c, struct ctu_result *res, void *arg)
{
    struct abort_shared *sh = *(struct abort_shared **)arg;
    int me = comm_rank(c), n = comm_size(c);
    if (me == 0) {
        while (!blocked_in_barrier(res->fd, (uint32_t)n - 1))
            sched_yield();
        atomic_store(&sh->t_abort_ns, cm_now_ns());
        comm_abort(c, abort_why);
        return expect_aborted(c, res, comm_barrier(c), "barrier after own abort", abort_why);
    }
    float x[768] = {0};
    int rc;
    const char *call;
    if (me == 1)
        rc = comm_all_reduce_sum_f32(c, x, 768), call = "all_reduce_sum_f32";
    else if (me == 2)
        rc = comm_barrier(c), call = "barrier";
    else
        rc = comm_broadcast(c, x, sizeof x, 0), call = "broadcast";
    return expect_aborted(c, res, rc, call, abort_why);
}

static void abort_case(int n, ctu_rank_fn fn)
{
    struct ctu_group g;
    comm_shm_cfg cfg = {.n_ranks = n, .buf_bytes = 8192};
    struct abort_shared *sh = NULL;
    /* the ranks reach sh through g.shared, set before the fork */
    struct abort_shared **arg = &sh;
    comm_shm_opts o = COMM_SHM_OPTS_DEFAULT;
    o.timeout_ms = 60000;
    cr_assert_eq(ctu_start_shared(&g, &cfg, &o, fn, arg, sizeof *sh, (void **)&sh), 0);
    int bad = ctu_wait(&g, 30000);
    uint64_t t0 = atomic_load(&sh->t_abort_ns);
    cr_assert_neq(t0, 0u, "nobody aborted");
    for (int r = 0; r < n; r++) {
        cr_expect_eq(g.res[r].rc, 0, "rank %d: %s", r, g.res[r].msg);
        cr_expect_lt(g.res[r].t_end_ns - t0, PROMPT_NS, "rank %d took %.3f s after the abort",
                     r, (double)(g.res[r].t_end_ns - t0) * 1e-9);
    }
    cr_expect_eq(bad, 0);
    ctu_free(&g);
}

Test(comm_abort, abort_from_one_rank_ends_every_wait_2_3_4, .timeout = 60)
{
    for (int n = 2; n <= 4; n++)
        abort_case(n, rank_abort_one);
}

/* Point to point: rank 1 blocks in recv (nothing sent), rank 0 blocks in a
 * send larger than the channel (nobody receives); rank 2 aborts once both
 * said they are about to block. */
static int rank_abort_p2p(comm *c, struct ctu_result *res, void *arg)
{
    struct abort_shared *sh = *(struct abort_shared **)arg;
    static uint8_t big[1 << 20]; /* four times the default channel */
    int me = comm_rank(c);
    if (me == 2) {
        struct ctu_result *all = res - 2;
        while (!atomic_load((_Atomic int *)&all[0].ready) ||
               !atomic_load((_Atomic int *)&all[1].ready))
            sched_yield();
        atomic_store(&sh->t_abort_ns, cm_now_ns());
        comm_abort(c, abort_why);
        return 0;
    }
    atomic_store((_Atomic int *)&res->ready, 1);
    if (me == 0)
        return expect_aborted(c, res, comm_send(c, big, sizeof big, 2), "send", abort_why);
    return expect_aborted(c, res, comm_recv(c, big, 100, 2), "recv", abort_why);
}

Test(comm_abort, abort_ends_blocked_send_and_recv, .timeout = 60)
{
    abort_case(3, rank_abort_p2p);
}

/* Another thread of the waiting rank aborts. Both ranks live in this
 * process (rank 1 attached, never calling), so that the threads need no
 * fork (TSan refuses threads in a child of a threaded process) and TSan
 * sees the abort's ordering. */
struct thread_arg {
    comm *c;
    int fd;
};

static void *abort_thread(void *p)
{
    struct thread_arg *t = p;
    while (!blocked_in_barrier(t->fd, 1))
        sched_yield();
    comm_abort(t->c, abort_why);
    return NULL;
}

Test(comm_abort, abort_from_another_thread_ends_the_wait, .timeout = 60)
{
    char why[256];
    comm_shm_cfg cfg = {.n_ranks = 2};
    int fd = comm_shm_create(&cfg, why, sizeof why);
    cr_assert_geq(fd, 0, "%s", why);
    comm *c0, *c1;
    cr_assert_eq(comm_shm_attach(&c0, fd, 0, NULL, why, sizeof why), 0, "%s", why);
    cr_assert_eq(comm_shm_attach(&c1, fd, 1, NULL, why, sizeof why), 0, "%s", why);
    struct thread_arg t = {c0, fd};
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, abort_thread, &t), 0);
    uint64_t t0 = cm_now_ns();
    int rc = comm_barrier(c0);
    uint64_t dt = cm_now_ns() - t0;
    pthread_join(th, NULL);
    struct ctu_result res = {0};
    cr_expect_eq(expect_aborted(c0, &res, rc, "barrier", abort_why), 0, "%s", res.msg);
    cr_expect_eq(expect_aborted(c1, &res, comm_barrier(c1), "rank 1's barrier", abort_why), 0,
                 "%s", res.msg);
    cr_expect_lt(dt, PROMPT_NS);
    comm_destroy(c0);
    comm_destroy(c1);
    close(fd);
}

/* A rank dies without a word: the coordinator sees it (gorgond: its pidfd)
 * and aborts the group through the fd. */
static int rank_victim_or_waiter(comm *c, struct ctu_result *res, void *arg)
{
    const char *reason = arg;
    if (comm_rank(c) == 0) {
        atomic_store((_Atomic int *)&res->ready, 1);
        for (;;)
            pause(); /* until SIGKILL */
    }
    float x[768] = {0};
    return expect_aborted(c, res, comm_all_reduce_sum_f32(c, x, 768), "all_reduce_sum_f32",
                          reason);
}

Test(comm_abort, coordinator_abort_after_sigkill_ends_every_wait, .timeout = 60)
{
    for (int n = 2; n <= 4; n++) {
        struct ctu_group g;
        comm_shm_cfg cfg = {.n_ranks = n};
        char reason[] = "rank 0 died (killed by signal 9)";
        /* no timeout: only the coordinator's abort can end the waits */
        comm_shm_opts o = COMM_SHM_OPTS_DEFAULT;
        o.timeout_ms = -1;
        cr_assert_eq(ctu_start(&g, &cfg, &o, rank_victim_or_waiter, reason, 0), 0);
        while (!atomic_load((_Atomic int *)&g.res[0].ready) ||
               !blocked_in_barrier(g.fd, (uint32_t)n - 1))
            sched_yield();
        kill(g.pid[0], SIGKILL);
        int st = ctu_wait_rank(&g, 0, 10000);
        cr_expect(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);
        char err[256];
        uint64_t t0 = cm_now_ns();
        cr_assert_eq(comm_shm_abort_fd(g.fd, reason, err, sizeof err), 0, "%s", err);
        int bad = ctu_wait(&g, 30000);
        for (int r = 1; r < n; r++) {
            cr_expect_eq(g.res[r].rc, 0, "%d ranks, rank %d: %s", n, r, g.res[r].msg);
            cr_expect_lt(g.res[r].t_end_ns - t0, PROMPT_NS, "rank %d took %.3f s", r,
                         (double)(g.res[r].t_end_ns - t0) * 1e-9);
        }
        cr_expect_eq(bad, 0);
        ctu_free(&g);
    }
}

/* Nobody aborts: the waiting ranks time out (the first to notice aborts the
 * rest) and the reason names the missing rank. */
static int rank_timeout(comm *c, struct ctu_result *res, void *arg)
{
    (void)arg;
    if (comm_rank(c) == 0) {
        for (;;)
            pause();
    }
    /* attached without a limit; this call gets one */
    int rc = comm_set_timeout_ms(c, 300);
    if (rc < 0)
        return rc;
    uint64_t t0 = cm_now_ns();
    rc = comm_barrier(c);
    uint64_t dt = cm_now_ns() - t0;
    char why[256];
    if (rc != -ETIMEDOUT && rc != -ECONNABORTED)
        return ctu_fail(res, -EIO, "barrier returned %d, expected -ETIMEDOUT or -ECONNABORTED",
                        rc);
    if (!comm_aborted(c, why, sizeof why) || !strstr(why, "timed out after 300 ms") ||
        !strstr(why, "waiting for rank(s) 0"))
        return ctu_fail(res, -EIO, "reason '%s' does not name the timeout and rank 0", why);
    /* (a rank released by another's timeout may have started waiting later) */
    if (rc == -ETIMEDOUT && dt < 300000000ull)
        return ctu_fail(res, -EIO, "timed out after %.3f s, before the 0.3 s limit",
                        (double)dt * 1e-9);
    res->u64[0] = (uint64_t)-rc;
    return 0;
}

Test(comm_abort, silent_death_times_out_naming_the_missing_rank, .timeout = 60)
{
    struct ctu_group g;
    comm_shm_cfg cfg = {.n_ranks = 3};
    comm_shm_opts o = COMM_SHM_OPTS_DEFAULT;
    o.timeout_ms = -1;
    cr_assert_eq(ctu_start(&g, &cfg, &o, rank_timeout, NULL, 0), 0);
    int timed_out = 0;
    for (int r = 1; r < 3; r++) {
        int st = ctu_wait_rank(&g, r, 20000);
        cr_expect(WIFEXITED(st) && WEXITSTATUS(st) == 0, "rank %d: %s", r, g.res[r].msg);
        timed_out += g.res[r].u64[0] == ETIMEDOUT;
    }
    cr_expect_geq(timed_out, 1, "no rank reported -ETIMEDOUT");
    kill(g.pid[0], SIGKILL);
    ctu_wait_rank(&g, 0, 10000);
    ctu_free(&g);
}

/* Mismatched calls: refused with -EPROTO and a message naming both calls,
 * and the communicator is aborted. */
static int rank_mismatch(comm *c, struct ctu_result *res, void *arg)
{
    int kind = *(int *)arg, me = comm_rank(c);
    float x[11] = {0};
    int rc;
    const char *want;
    if (kind == 0) {
        rc = me == 0 ? comm_all_reduce_sum_f32(c, x, 10) : comm_broadcast(c, x, 40, 1);
        want = me == 0 ? "broadcast(bytes=40, root=1)" : "all_reduce_sum_f32(n=10)";
    } else if (kind == 1) {
        rc = comm_all_reduce_sum_f32(c, x, me == 0 ? 10 : 11);
        want = me == 0 ? "all_reduce_sum_f32(n=11)" : "all_reduce_sum_f32(n=10)";
    } else {
        want = "rank 1 receives 12 bytes from rank 0, which sends 10";
        if (me == 0) {
            rc = comm_send(c, x, 10, 1);
            if (rc != 0)
                return ctu_fail(res, -EIO, "send: %d", rc);
            rc = comm_barrier(c);
            if (rc != -ECONNABORTED || !strstr(comm_last_error(c), want))
                return ctu_fail(res, -EIO, "barrier after the bad send: %d '%s'", rc,
                                comm_last_error(c));
            return 0;
        }
        rc = comm_recv(c, x, 12, 0);
    }
    if (rc != -EPROTO)
        return ctu_fail(res, -EIO, "returned %d (%s), expected -EPROTO", rc,
                        comm_last_error(c));
    if (!strstr(comm_last_error(c), "mismatched") || !strstr(comm_last_error(c), want))
        return ctu_fail(res, -EIO, "message '%s' does not name '%s'", comm_last_error(c), want);
    if (!comm_aborted(c, NULL, 0))
        return ctu_fail(res, -EIO, "not aborted after a mismatch");
    return 0;
}

Test(comm_abort, mismatched_calls_are_refused_by_name, .timeout = 60)
{
    for (int kind = 0; kind < 3; kind++)
        ctu_run(2, 0, 0, rank_mismatch, &kind);
}
