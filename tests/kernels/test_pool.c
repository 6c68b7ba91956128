/* The kernel thread pool's share protocol (kernels/cpu/kn_ctx.c): every
 * share of a job runs exactly once, whichever thread is free runs it (the
 * calling thread does not wait for a pool thread that never woke up), small
 * ops stay on the calling thread, and n_threads = 0 follows the CPUs the
 * process may use. Internal header on purpose: kn_run is what is tested. */
#include <criterion/criterion.h>
#include <dirent.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/common.h"
#include "kernels/cpu/kn_int.h"

#define MAX_SHARES 16

struct rec {
    _Atomic int nth;               /* nth of the last call */
    pthread_t caller;              /* the thread calling kn_run */
    _Atomic int runs[MAX_SHARES];  /* per share: times run */
    _Atomic int by_caller[MAX_SHARES];
    _Atomic int calls;
};

static void rec_job(void *p, int ith, int nth)
{
    struct rec *r = p;
    if (ith >= MAX_SHARES) /* (no assert here: this may be a pool thread) */
        ith = MAX_SHARES - 1;
    atomic_store(&r->nth, nth); /* every call of one kn_run sees the same nth */
    atomic_fetch_add(&r->runs[ith], 1);
    if (pthread_equal(pthread_self(), r->caller))
        atomic_fetch_add(&r->by_caller[ith], 1);
    atomic_fetch_add(&r->calls, 1);
}

static void rec_reset(struct rec *r)
{
    atomic_store(&r->nth, 0);
    r->caller = pthread_self();
    for (int i = 0; i < MAX_SHARES; i++) {
        atomic_store(&r->runs[i], 0);
        atomic_store(&r->by_caller[i], 0);
    }
    atomic_store(&r->calls, 0);
}

/* kn_run runs each of the n_threads shares exactly once, spinning or asleep */
Test(kernels_pool, run_covers_each_share_once, .timeout = 60)
{
    static const int threads[] = {2, 3, 7};
    for (int t = 0; t < 3; t++) {
        kn_ctx *ctx = NULL;
        cr_assert_eq(kn_ctx_create(&ctx, &(kn_ctx_cfg){.n_threads = threads[t],
                                                       .fanout_min_bytes = -1}),
                     0);
        struct rec r;
        for (int rep = 0; rep < 3000; rep++) {
            rec_reset(&r);
            kn_run(ctx, rec_job, &r, 1);
            cr_assert_eq(atomic_load(&r.nth), threads[t]);
            cr_assert_eq(atomic_load(&r.calls), threads[t]);
            for (int i = 0; i < threads[t]; i++)
                cr_assert_eq(atomic_load(&r.runs[i]), 1, "threads=%d rep=%d share %d",
                             threads[t], rep, i);
        }
        kn_ctx_destroy(ctx);
    }
}

/* Work below the ctx's threshold runs as one share on the calling thread */
Test(kernels_pool, small_work_stays_on_the_calling_thread)
{
    kn_ctx *ctx = NULL;
    cr_assert_eq(kn_ctx_create(&ctx, &(kn_ctx_cfg){.n_threads = 2, .fanout_min_bytes = 4096}),
                 0);
    struct rec r;
    rec_reset(&r);
    kn_run(ctx, rec_job, &r, 4095);
    cr_assert_eq(atomic_load(&r.nth), 1);
    cr_assert_eq(atomic_load(&r.calls), 1);
    cr_assert_eq(atomic_load(&r.by_caller[0]), 1);
    rec_reset(&r);
    kn_run(ctx, rec_job, &r, 4096);
    cr_assert_eq(atomic_load(&r.nth), 2);
    cr_assert_eq(atomic_load(&r.calls), 2);
    rec_reset(&r);
    kn_run(ctx, rec_job, &r, KN_WORK_ALWAYS);
    cr_assert_eq(atomic_load(&r.nth), 2);
    kn_ctx_destroy(ctx);

    /* the default threshold keeps a tiny op home, KN_WORK_ALWAYS does not */
    cr_assert_eq(kn_ctx_create(&ctx, &(kn_ctx_cfg){.n_threads = 2}), 0);
    rec_reset(&r);
    kn_run(ctx, rec_job, &r, 64);
    cr_assert_eq(atomic_load(&r.nth), 1);
    rec_reset(&r);
    kn_run(ctx, rec_job, &r, KN_WORK_ALWAYS);
    cr_assert_eq(atomic_load(&r.nth), 2);
    kn_ctx_destroy(ctx);
}

/* Thread ids of this process, sorted into ids[] (returns the count). */
static int list_tids(pid_t *ids, int cap)
{
    DIR *d = opendir("/proc/self/task");
    cr_assert_not_null(d);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < cap)
        if (e->d_name[0] != '.')
            ids[n++] = (pid_t)atoi(e->d_name);
    closedir(d);
    return n;
}

static bool has_tid(const pid_t *ids, int n, pid_t t)
{
    for (int i = 0; i < n; i++)
        if (ids[i] == t)
            return true;
    return false;
}

/* The share protocol's point: a pool thread that cannot run (here: pinned
 * to the caller's CPU at SCHED_IDLE, so it gets the CPU only when the
 * caller leaves it) leaves its share to the caller instead of holding up
 * the op. With one share per thread fixed in advance, the caller would
 * never run share 1 and would wait for the idle thread every time. */
Test(kernels_pool, caller_takes_shares_of_a_thread_that_cannot_run, .timeout = 60)
{
    cpu_set_t set;
    cr_assert_eq(sched_getaffinity(0, sizeof(set), &set), 0);
    int cpu = -1;
    for (int i = 0; i < CPU_SETSIZE && cpu < 0; i++)
        if (CPU_ISSET(i, &set))
            cpu = i;
    pid_t before[64], after[64];
    int nb = list_tids(before, 64);
    const int cpus[2] = {cpu, cpu};
    kn_ctx *ctx = NULL;
    cr_assert_eq(kn_ctx_create(&ctx, &(kn_ctx_cfg){.n_threads = 2, .cpus = cpus,
                                                   .fanout_min_bytes = -1}),
                 0);
    int na = list_tids(after, 64);
    int n_idle = 0;
    for (int i = 0; i < na; i++) {
        if (has_tid(before, nb, after[i]))
            continue;
        struct sched_param sp = {0};
        cr_assert_eq(sched_setscheduler(after[i], SCHED_IDLE, &sp), 0);
        n_idle++;
    }
    cr_assert_eq(n_idle, 1, "one pool thread besides the caller");
    struct rec r;
    int caller_ran_share1 = 0;
    for (int rep = 0; rep < 200; rep++) {
        rec_reset(&r);
        kn_run(ctx, rec_job, &r, KN_WORK_ALWAYS);
        cr_assert_eq(atomic_load(&r.runs[0]) + atomic_load(&r.runs[1]), 2);
        caller_ran_share1 += atomic_load(&r.by_caller[1]);
    }
    cr_assert_gt(caller_ran_share1, 100, "the caller ran share 1 in only %d of 200 ops",
                 caller_ran_share1);
    kn_ctx_destroy(ctx);
}

/* The count n_threads = 0 would take with $GORGON_CPUS=cpus, from a child
 * (the usable CPUs are cached per process); the child starts no thread, so
 * this also runs under ThreadSanitizer, which refuses threads after fork. */
static int auto_child(const char *cpus)
{
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        setenv("GORGON_CPUS", cpus, 1);
        _exit(kn_threads_auto());
    }
    int st = 0;
    cr_assert_eq(waitpid(pid, &st, 0), pid);
    cr_assert(WIFEXITED(st));
    return WEXITSTATUS(st);
}

/* n_threads = 0 takes the usable CPUs (affinity, quota), capped */
Test(kernels_pool, auto_threads_follow_usable_cpus, .timeout = 30)
{
    cr_assert_eq(auto_child("1"), 1);
    cr_assert_eq(auto_child("3"), 3);
    cr_assert_eq(auto_child("200"), KN_AUTO_THREADS_MAX);
    kn_ctx *ctx = NULL;
    cr_assert_eq(kn_ctx_create(&ctx, &(kn_ctx_cfg){.n_threads = 0}), 0);
    cr_assert_eq(kn_ctx_threads(ctx), kn_threads_auto());
    cr_assert_leq(kn_ctx_threads(ctx), cm_cpus_usable());
    kn_ctx_destroy(ctx);
}

/* Pool threads that may not spin (more threads than usable CPUs) still
 * complete every op: they sleep on the futex and are woken. Each test runs
 * in a fresh process, which computes its usable CPUs on first use: here,
 * after the override. */
Test(kernels_pool, no_spinning_when_cpus_are_short, .timeout = 60)
{
    setenv("GORGON_CPUS", "1", 1);
    cr_assert_eq(cm_cpus_usable(), 1, "the usable CPUs were computed before this test");
    cr_assert_not(cm_spin_allowed(4));
    kn_ctx *ctx = NULL;
    cr_assert_eq(kn_ctx_create(&ctx, &(kn_ctx_cfg){.n_threads = 4, .fanout_min_bytes = -1}), 0);
    struct rec r;
    for (int rep = 0; rep < 2000; rep++) {
        rec_reset(&r);
        kn_run(ctx, rec_job, &r, 1);
        for (int i = 0; i < 4; i++)
            cr_assert_eq(atomic_load(&r.runs[i]), 1, "rep %d share %d", rep, i);
    }
    kn_ctx_destroy(ctx);
}
