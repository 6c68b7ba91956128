/* kn_ctx: variant dispatch, the persistent thread pool and ctx scratch.
 *
 * Pool protocol. The ctx thread publishes a job (fn, arg) and bumps `gen`;
 * workers that see a new gen run their share and decrement `pending`; the
 * ctx thread runs share 0 itself and then waits for pending == 0. Both sides
 * spin for a short while (ops of one forward pass follow each other within
 * microseconds) and then sleep on a futex, announcing it through a sleeper
 * count so that the other side only pays for a FUTEX_WAKE when someone
 * actually sleeps. The "announce, full fence, re-check, sleep" sequences
 * below are Dekker-style: each side's seq_cst store is ordered before its
 * seq_cst load of the other side's flag, so at least one of them sees the
 * other and no wake-up is lost. */
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "common/common.h"
#include "kernels/cpu/kn_int.h"

/* Polling budget before sleeping, in time rather than iterations (PAUSE
 * costs ~20 ns on some x86 cores and ~140 cycles on others): long enough to
 * bridge the gap between consecutive ops of a forward pass, short enough
 * that a waiter does not hold a CPU for long that a preempted peer needs. */
#define KN_SPIN_NS 50000

struct kn_worker {
    kn_ctx *ctx;
    int ith;
    int cpu; /* -1: not pinned */
    pthread_t tid;
};

struct kn_ctx {
    const kn_impl *impl;
    const kn_buf_impl *buf; /* this backend's buffer functions (kn_buf.c) */
    enum kn_variant variant;
    int n_threads;
    /* Poll for KN_SPIN_NS before sleeping; never when the pool has more
     * threads than the machine has CPUs (a spinning thread would then hold
     * the CPU that the thread it waits for needs). */
    bool spin;
    struct kn_worker *workers; /* n_threads - 1 of them */

    /* Written by the ctx thread before the release-increment of gen; read by
     * workers after their acquire-load of gen (G1 pairs with G2). */
    kn_job_fn job;
    void *job_arg;

    _Alignas(KN_CACHELINE) atomic_uint gen; /* futex word */
    atomic_int gen_sleepers;
    atomic_bool stop;

    _Alignas(KN_CACHELINE) atomic_uint pending; /* futex word */
    atomic_int done_sleeper;

    _Alignas(KN_CACHELINE) void *scratch[KN_SCRATCH_COUNT];
    size_t scratch_size[KN_SCRATCH_COUNT];
};

static long futex_wait(atomic_uint *addr, unsigned val)
{
    return syscall(SYS_futex, (unsigned *)addr, FUTEX_WAIT_PRIVATE, val, NULL, NULL, 0);
}

static void futex_wake(atomic_uint *addr, int n)
{
    syscall(SYS_futex, (unsigned *)addr, FUTEX_WAKE_PRIVATE, n, NULL, NULL, 0);
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* True while a poll that began at *t0 (0: not started) is within budget. */
static inline bool keep_spinning(const kn_ctx *ctx, int *spins, uint64_t *t0)
{
    if (!ctx->spin)
        return false;
    if ((++*spins & 63) != 0)
        return true;
    uint64_t now = cm_now_ns();
    if (*t0 == 0)
        *t0 = now;
    return now - *t0 < KN_SPIN_NS;
}

static void pin_self(int cpu)
{
    if (cpu < 0 || cpu >= CPU_SETSIZE)
        return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    /* Best effort: a cpuset that excludes the cpu only costs locality. */
    (void)pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

static void *worker_main(void *p)
{
    struct kn_worker *w = p;
    kn_ctx *ctx = w->ctx;
    pin_self(w->cpu);
    /* Not a load of gen: the ctx thread may already have published a job
     * before this thread got scheduled, and that job must not be missed.
     * gen is 0 until kn_ctx_create has started every worker. */
    unsigned seen = 0;
    for (;;) {
        unsigned g;
        int spins = 0;
        uint64_t t0 = 0;
        /* G2: acquire pairs with the release increment G1 in kn_run. */
        while ((g = atomic_load_explicit(&ctx->gen, memory_order_acquire)) == seen) {
            if (keep_spinning(ctx, &spins, &t0)) {
                cpu_relax();
                continue;
            }
            atomic_fetch_add_explicit(&ctx->gen_sleepers, 1, memory_order_seq_cst);
            if (atomic_load_explicit(&ctx->gen, memory_order_seq_cst) == seen)
                futex_wait(&ctx->gen, seen);
            atomic_fetch_sub_explicit(&ctx->gen_sleepers, 1, memory_order_relaxed);
            spins = 0;
            t0 = 0;
        }
        seen = g;
        if (atomic_load_explicit(&ctx->stop, memory_order_acquire))
            return NULL;
        ctx->job(ctx->job_arg, w->ith, ctx->n_threads);
        /* D1: release publishes this worker's output to the ctx thread. */
        if (atomic_fetch_sub_explicit(&ctx->pending, 1, memory_order_seq_cst) == 1 &&
            atomic_load_explicit(&ctx->done_sleeper, memory_order_seq_cst))
            futex_wake(&ctx->pending, 1);
    }
}

static void publish(kn_ctx *ctx)
{
    /* G1: release makes job/job_arg (and the caller's inputs) visible. */
    atomic_fetch_add_explicit(&ctx->gen, 1, memory_order_seq_cst);
    if (atomic_load_explicit(&ctx->gen_sleepers, memory_order_seq_cst) > 0)
        futex_wake(&ctx->gen, INT_MAX);
}

void kn_run(kn_ctx *ctx, kn_job_fn job, void *arg)
{
    if (ctx->n_threads == 1) {
        job(arg, 0, 1);
        return;
    }
    ctx->job = job;
    ctx->job_arg = arg;
    atomic_store_explicit(&ctx->pending, (unsigned)(ctx->n_threads - 1), memory_order_relaxed);
    publish(ctx);
    job(arg, 0, ctx->n_threads);
    unsigned v;
    int spins = 0;
    uint64_t t0 = 0;
    /* D2: acquire pairs with the workers' decrements D1. */
    while ((v = atomic_load_explicit(&ctx->pending, memory_order_acquire)) != 0) {
        if (keep_spinning(ctx, &spins, &t0)) {
            cpu_relax();
            continue;
        }
        atomic_store_explicit(&ctx->done_sleeper, true, memory_order_seq_cst);
        v = atomic_load_explicit(&ctx->pending, memory_order_seq_cst);
        if (v != 0)
            futex_wait(&ctx->pending, v);
        atomic_store_explicit(&ctx->done_sleeper, false, memory_order_relaxed);
        spins = 0;
        t0 = 0;
    }
}

int kn_nthreads(const kn_ctx *ctx)
{
    return ctx->n_threads;
}

const char *kn_variant_name(enum kn_variant v)
{
    switch (v) {
    case KN_VARIANT_AUTO:
        return "auto";
    case KN_VARIANT_SCALAR:
        return "scalar";
    case KN_VARIANT_AVX2:
        return "avx2";
    case KN_VARIANT_AVX512:
        return "avx512";
    case KN_VARIANT_COUNT:
        break;
    }
    return "unknown";
}

int kn_variant_supported(enum kn_variant v)
{
    const struct cm_cpu_features *f = cm_cpu();
    switch (v) {
    case KN_VARIANT_SCALAR:
        return 1;
    case KN_VARIANT_AVX2:
        return f->avx2 && f->fma && f->f16c;
    case KN_VARIANT_AVX512:
        /* VNNI and BF16 are used unconditionally by the AVX-512 file. */
        return f->avx2 && f->fma && f->f16c && f->avx512f && f->avx512bw && f->avx512vl &&
               f->avx512dq && f->avx512_vnni && f->avx512_bf16;
    case KN_VARIANT_AUTO:
        return 1;
    case KN_VARIANT_COUNT:
        break;
    }
    return 0;
}

static enum kn_variant resolve(enum kn_variant v)
{
    if (v != KN_VARIANT_AUTO)
        return v;
    if (kn_variant_supported(KN_VARIANT_AVX512))
        return KN_VARIANT_AVX512;
    if (kn_variant_supported(KN_VARIANT_AVX2))
        return KN_VARIANT_AVX2;
    return KN_VARIANT_SCALAR;
}

static const kn_impl *impl_for(enum kn_variant v)
{
    v = resolve(v);
    if (v <= KN_VARIANT_AUTO || v >= KN_VARIANT_COUNT || !kn_variant_supported(v))
        return NULL;
    switch (v) {
    case KN_VARIANT_AVX512:
        return &kn_impl_avx512;
    case KN_VARIANT_AVX2:
        return &kn_impl_avx2;
    default:
        return &kn_impl_scalar;
    }
}

int kn_tensor_pack(kn_tensor *w)
{
    if (!w || w->packed || resolve(KN_VARIANT_AUTO) != KN_VARIANT_AVX512)
        return 0;
    void *p;
    int rc = kn_avx512_pack(w, &p);
    if (rc == 0)
        w->packed = p;
    return rc;
}

void kn_tensor_unpack(kn_tensor *w)
{
    if (!w)
        return;
    free((void *)w->packed);
    w->packed = NULL;
}

const kn_ops *kn_ops_for(enum kn_variant v)
{
    const kn_impl *impl = impl_for(v);
    return impl ? impl->ops : NULL;
}

static void stop_workers(kn_ctx *ctx, int n_started)
{
    atomic_store_explicit(&ctx->stop, true, memory_order_release);
    publish(ctx);
    for (int i = 0; i < n_started; i++)
        pthread_join(ctx->workers[i].tid, NULL);
}

int kn_ctx_create(kn_ctx **out, const kn_ctx_cfg *cfg)
{
    if (!out || !cfg)
        return -EINVAL;
    *out = NULL;
    if (cfg->variant < KN_VARIANT_AUTO || cfg->variant >= KN_VARIANT_COUNT) {
        CM_LOG_ERROR("kernels", "unknown kernel variant %d", (int)cfg->variant);
        return -EINVAL;
    }
    const kn_impl *impl = impl_for(cfg->variant);
    if (!impl) {
        CM_LOG_ERROR("kernels", "kernel variant %s is not supported by this CPU",
                     kn_variant_name(cfg->variant));
        return -ENOTSUP;
    }
    int n = cfg->n_threads > 0 ? cfg->n_threads : cm_cpu()->n_cpus;
    if (n < 1)
        n = 1;
    if (n > KN_MAX_THREADS) {
        CM_LOG_ERROR("kernels", "n_threads %d exceeds the maximum of %d", n, KN_MAX_THREADS);
        return -EINVAL;
    }
    kn_ctx *ctx = aligned_alloc(KN_CACHELINE, (sizeof(*ctx) + KN_CACHELINE - 1) /
                                                  KN_CACHELINE * KN_CACHELINE);
    if (!ctx)
        return -ENOMEM;
    memset(ctx, 0, sizeof(*ctx));
    ctx->impl = impl;
    ctx->buf = &kn_buf_cpu;
    ctx->variant = resolve(cfg->variant);
    ctx->n_threads = n;
    ctx->spin = n <= cm_cpu()->n_cpus;
    atomic_init(&ctx->gen, 0);
    atomic_init(&ctx->gen_sleepers, 0);
    atomic_init(&ctx->stop, false);
    atomic_init(&ctx->pending, 0);
    atomic_init(&ctx->done_sleeper, false);
    if (n > 1) {
        ctx->workers = calloc((size_t)n - 1, sizeof(*ctx->workers));
        if (!ctx->workers) {
            free(ctx);
            return -ENOMEM;
        }
    }
    if (cfg->cpus)
        pin_self(cfg->cpus[0]);
    for (int i = 0; i < n - 1; i++) {
        struct kn_worker *w = &ctx->workers[i];
        w->ctx = ctx;
        w->ith = i + 1;
        w->cpu = cfg->cpus ? cfg->cpus[i + 1] : -1;
        int rc = pthread_create(&w->tid, NULL, worker_main, w);
        if (rc != 0) {
            CM_LOG_ERROR("kernels", "cannot start pool thread %d: %s", i + 1, cm_strerror(rc));
            stop_workers(ctx, i);
            free(ctx->workers);
            free(ctx);
            return -rc;
        }
    }
    *out = ctx;
    return 0;
}

void kn_ctx_destroy(kn_ctx *ctx)
{
    if (!ctx)
        return;
    stop_workers(ctx, ctx->n_threads - 1);
    for (int i = 0; i < KN_SCRATCH_COUNT; i++)
        free(ctx->scratch[i]);
    free(ctx->workers);
    free(ctx);
}

const kn_ops *kn_ctx_ops(const kn_ctx *ctx)
{
    return ctx->impl->ops;
}

enum kn_variant kn_ctx_variant(const kn_ctx *ctx)
{
    return ctx->variant;
}

int kn_ctx_threads(const kn_ctx *ctx)
{
    return ctx->n_threads;
}

int kn_ctx_host_memory(const kn_ctx *ctx)
{
    return ctx->buf->host_memory;
}

const kn_buf_impl *kn_ctx_buf(const kn_ctx *ctx)
{
    return ctx->buf;
}

struct rows_job {
    kn_rows_fn fn;
    void *arg;
    int64_t M, align;
};

static void rows_job(void *p, int ith, int nth)
{
    const struct rows_job *j = p;
    int64_t lo, hi;
    kn_split(j->M, ith, nth, j->align, &lo, &hi);
    if (hi > lo)
        j->fn(j->arg, lo, hi);
}

void kn_run_rows(kn_ctx *ctx, int64_t M, int64_t align, bool fan_out, kn_rows_fn fn, void *arg)
{
    if (!fan_out || M < 2 || ctx->n_threads == 1) {
        fn(arg, 0, M);
        return;
    }
    struct rows_job j = {fn, arg, M, align};
    kn_run(ctx, rows_job, &j);
}

void *kn_scratch(kn_ctx *ctx, int which, size_t bytes)
{
    if (which < 0 || which >= KN_SCRATCH_COUNT)
        return NULL;
    if (bytes <= ctx->scratch_size[which])
        return ctx->scratch[which];
    /* Grow geometrically so that a warm-up pass at the largest batch size
     * leaves the steady state allocation-free. */
    size_t want = bytes + bytes / 2;
    want = (want + KN_CACHELINE - 1) / KN_CACHELINE * KN_CACHELINE;
    void *p = aligned_alloc(KN_CACHELINE, want);
    if (!p)
        return NULL;
    free(ctx->scratch[which]);
    ctx->scratch[which] = p;
    ctx->scratch_size[which] = want;
    return p;
}

struct pfor {
    kn_task_fn fn;
    void *arg;
    int64_t n;
    int64_t chunk;
    atomic_llong next;
};

static void pfor_job(void *p, int ith, int nth)
{
    (void)ith;
    (void)nth;
    struct pfor *pf = p;
    for (;;) {
        int64_t i0 = atomic_fetch_add_explicit(&pf->next, pf->chunk, memory_order_relaxed);
        if (i0 >= pf->n)
            return;
        int64_t i1 = i0 + pf->chunk < pf->n ? i0 + pf->chunk : pf->n;
        for (int64_t i = i0; i < i1; i++)
            pf->fn(pf->arg, i);
    }
}

void kn_parallel_for(kn_ctx *ctx, int64_t n, kn_task_fn fn, void *arg)
{
    if (!ctx || !fn || n <= 0)
        return;
    if (ctx->n_threads == 1 || n == 1) {
        for (int64_t i = 0; i < n; i++)
            fn(arg, i);
        return;
    }
    /* Dynamic chunks (about 4 per thread) balance uneven items without an
     * atomic per index. */
    struct pfor pf = {.fn = fn, .arg = arg, .n = n};
    pf.chunk = n / ((int64_t)ctx->n_threads * 4);
    if (pf.chunk < 1)
        pf.chunk = 1;
    atomic_init(&pf.next, 0);
    kn_run(ctx, pfor_job, &pf);
}

struct bw_job {
    const kn_impl *impl;
    const char *buf;
    size_t bytes;
    float sink[KN_MAX_THREADS];
};

static void bw_read_job(void *p, int ith, int nth)
{
    struct bw_job *j = p;
    int64_t lo, hi;
    /* 4 KiB units keep each thread's chunk page-aligned and whole. */
    kn_split((int64_t)(j->bytes / 4096), ith, nth, 1, &lo, &hi);
    if (hi > lo)
        j->sink[ith] = j->impl->read_stream(j->buf + lo * 4096, (size_t)(hi - lo) * 4096);
}

static void bw_touch_job(void *p, int ith, int nth)
{
    struct bw_job *j = p;
    int64_t lo, hi;
    /* First touch by the thread that will read the chunk (NUMA locality). */
    kn_split((int64_t)(j->bytes / 4096), ith, nth, 1, &lo, &hi);
    if (hi > lo)
        memset((char *)j->buf + lo * 4096, 1, (size_t)(hi - lo) * 4096);
}

double kn_measure_read_bandwidth(kn_ctx *ctx, size_t bytes, int reps)
{
    if (!ctx || bytes < 4096)
        return 0.0;
    bytes &= ~(size_t)4095;
    if (reps < 1)
        reps = 1;
    char *buf = aligned_alloc(4096, bytes);
    if (!buf)
        return 0.0;
    struct bw_job j = {.impl = ctx->impl, .buf = buf, .bytes = bytes};
    kn_run(ctx, bw_touch_job, &j);
    kn_run(ctx, bw_read_job, &j); /* warm-up: page tables, pool threads awake */
    double best = 0.0;
    for (int r = 0; r < reps; r++) {
        uint64_t t0 = cm_now_ns();
        kn_run(ctx, bw_read_job, &j);
        uint64_t dt = cm_now_ns() - t0;
        double bw = dt ? (double)bytes * 1e9 / (double)dt : 0.0;
        if (bw > best)
            best = bw;
    }
    volatile float keep = 0.0f;
    for (int i = 0; i < ctx->n_threads; i++)
        keep += j.sink[i];
    (void)keep;
    free(buf);
    return best;
}
