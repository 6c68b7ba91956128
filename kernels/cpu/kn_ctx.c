/* kn_ctx: variant dispatch, the persistent thread pool and ctx scratch.
 *
 * Pool protocol. A job has n_threads shares (share i runs job(arg, i, n));
 * which thread runs a share does not matter, because a share's output range
 * and its scratch are fixed by its index (so the output does not depend on
 * scheduling). The ctx thread writes the job and stores a new `claim` word
 * (generation << KN_SHARE_BITS | next share = 0); then every thread that
 * is awake, the ctx thread included, claims shares with a fetch_add on
 * `claim` and runs them until none is left. The ctx thread then waits only
 * for shares that were claimed and are still running (`done` counts the
 * finished ones), never for a pool thread that has not woken up yet: a
 * preempted or sleeping thread's share is run by whoever is free. This is
 * what keeps the pool from collapsing when other processes want the CPUs.
 *
 * Waiting. Both sides poll for at most KN_SPIN_NS and then sleep on a
 * futex, and announce it through a sleeper count so that the other side
 * pays for a FUTEX_WAKE only when someone sleeps. They do not poll at all
 * when the pool's threads plus the process's other registered spinners
 * (cm_spinners) exceed the CPUs the process may use (cm_cpus_usable), nor
 * after a poll that noticed it had been preempted (the CPU is wanted by
 * someone else; polling would take it from the thread we wait for). The
 * "announce, full fence, re-check, sleep" sequences below are Dekker-style:
 * each side's seq_cst store is ordered before its seq_cst load of the other
 * side's flag, so at least one of them sees the other and no wake-up is
 * lost.
 *
 * Small ops do not fan out at all (kn_run's `work`): below
 * KN_FANOUT_MIN_BYTES a pool round trip costs more than it saves. */
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "common/cm_device.h"
#include "common/common.h"
#include "kernels/cpu/kn_int.h"
#ifdef GORGON_CUDA
#include "kernels/cuda/kn_cuda.h"
#endif

/* Polling budget before sleeping, in time rather than iterations (PAUSE
 * costs ~20 ns on some x86 cores and ~140 cycles on others): long enough to
 * bridge the gap between consecutive ops of a forward pass, short enough
 * that a waiter does not hold a CPU for long that a preempted peer needs. */
#define KN_SPIN_NS 50000
/* A gap this long between two clock reads of one poll means the poller was
 * preempted: someone else wants the CPU. */
#define KN_PREEMPT_NS 200000
/* After a preemption, polls that are skipped (straight to the futex) before
 * polling is tried again. */
#define KN_SPIN_BACKOFF 16

/* The claim word: generation in the high bits, next share in the low ones.
 * A thread that finds the shares exhausted has added one past n_threads and
 * adds nothing more until the generation changes, so the share field never
 * exceeds 2 * KN_MAX_THREADS. */
#define KN_SHARE_BITS 10
#define KN_SHARE_MASK ((1u << KN_SHARE_BITS) - 1)
_Static_assert(2 * KN_MAX_THREADS < (1 << KN_SHARE_BITS), "share field too narrow");

struct kn_worker {
    kn_ctx *ctx;
    int cpu; /* -1: not pinned */
    pthread_t tid;
};

/* Per waiting thread: whether it may poll (see the top of the file). */
struct kn_spin {
    int skip; /* polls left to skip after a preemption */
};

struct kn_ctx {
    const kn_impl *impl;
    const kn_buf_impl *buf; /* this backend's buffer functions (kn_buf.c) */
    enum kn_variant variant;
    int n_threads;
    int64_t fanout_min; /* kn_run's threshold in bytes of work */
    struct kn_worker *workers; /* n_threads - 1 of them */
    unsigned gen;              /* ctx thread only: generation of the last job */
    struct kn_spin caller_spin; /* ctx thread only */

    /* Written by the ctx thread before the release store of claim; read by
     * workers after an acquire fetch_add of claim that got a share (C1
     * pairs with C2). The ctx thread writes them again only after `done`
     * says every claimed share has finished (D1 pairs with D2). */
    kn_job_fn job;
    void *job_arg;

    _Alignas(KN_CACHELINE) atomic_uint claim; /* futex word */
    atomic_int claim_sleepers;
    atomic_bool stop;

    _Alignas(KN_CACHELINE) atomic_uint done; /* futex word: finished shares */
    atomic_int done_sleeper;

    _Alignas(KN_CACHELINE) void *scratch[KN_SCRATCH_COUNT];
    size_t scratch_size[KN_SCRATCH_COUNT];

    struct kn_cuda *cuda; /* a CUDA device ctx's state (kernels/cuda), else NULL */
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

/* Polls `word` until it differs from `val` or the budget runs out; returns
 * the last value read. Polls not at all when the pool may not spin or when
 * this thread is backing off after a preemption. */
static unsigned poll_word(const kn_ctx *ctx, struct kn_spin *sp, atomic_uint *word, unsigned val)
{
    unsigned v = atomic_load_explicit(word, memory_order_acquire);
    if (v != val)
        return v;
    if (sp->skip > 0) {
        sp->skip--;
        return v;
    }
    if (!cm_spin_allowed(ctx->n_threads))
        return v;
    uint64_t t0 = cm_now_ns(), last = t0;
    for (int i = 1;; i++) {
        cpu_relax();
        v = atomic_load_explicit(word, memory_order_acquire);
        if (v != val)
            return v;
        if ((i & 63) != 0)
            continue;
        uint64_t now = cm_now_ns();
        if (now - last > KN_PREEMPT_NS) {
            sp->skip = KN_SPIN_BACKOFF;
            return v;
        }
        if (now - t0 > KN_SPIN_NS)
            return v;
        last = now;
    }
}

/* Claims and runs shares of the current job until none is left; returns the
 * generation that was found exhausted. */
static unsigned run_shares(kn_ctx *ctx)
{
    const unsigned n = (unsigned)ctx->n_threads;
    for (;;) {
        /* C2: acquire pairs with the ctx thread's release store C1 (an RMW
         * continues its release sequence). */
        unsigned c = atomic_fetch_add_explicit(&ctx->claim, 1, memory_order_acq_rel);
        unsigned share = c & KN_SHARE_MASK;
        if (share >= n)
            return c >> KN_SHARE_BITS;
        ctx->job(ctx->job_arg, (int)share, (int)n);
        /* D1: release publishes this share's output to the ctx thread. */
        if (atomic_fetch_add_explicit(&ctx->done, 1, memory_order_seq_cst) + 1 == n &&
            atomic_load_explicit(&ctx->done_sleeper, memory_order_seq_cst))
            futex_wake(&ctx->done, 1);
    }
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
    struct kn_spin sp = {0};
    /* Generation 0 (claim = n_threads: nothing to claim) is the state
     * before the first job; a job published before this thread got
     * scheduled has a newer generation and is not missed. */
    unsigned seen_gen = 0;
    for (;;) {
        unsigned c = atomic_load_explicit(&ctx->claim, memory_order_acquire);
        /* Checked before every wait: the shutdown generation may have been
         * seen (and found empty) by run_shares already. */
        if (atomic_load_explicit(&ctx->stop, memory_order_acquire))
            return NULL;
        if ((c >> KN_SHARE_BITS) == seen_gen) {
            c = poll_word(ctx, &sp, &ctx->claim, c);
            if ((c >> KN_SHARE_BITS) != seen_gen)
                continue;
            atomic_fetch_add_explicit(&ctx->claim_sleepers, 1, memory_order_seq_cst);
            c = atomic_load_explicit(&ctx->claim, memory_order_seq_cst);
            if ((c >> KN_SHARE_BITS) == seen_gen)
                futex_wait(&ctx->claim, c);
            atomic_fetch_sub_explicit(&ctx->claim_sleepers, 1, memory_order_relaxed);
            continue;
        }
        seen_gen = run_shares(ctx);
    }
}

/* Stores a new generation with nothing claimed yet (`first` = 0) or with
 * nothing to claim (n_threads: shutdown) and wakes sleeping workers. */
static void publish(kn_ctx *ctx, unsigned first)
{
    ctx->gen = (ctx->gen + 1) & (UINT_MAX >> KN_SHARE_BITS);
    /* C1: release makes job/job_arg (and the caller's inputs) visible. */
    atomic_store_explicit(&ctx->claim, ctx->gen << KN_SHARE_BITS | first, memory_order_seq_cst);
    if (atomic_load_explicit(&ctx->claim_sleepers, memory_order_seq_cst) > 0)
        futex_wake(&ctx->claim, INT_MAX);
}

void kn_run(kn_ctx *ctx, kn_job_fn job, void *arg, int64_t work)
{
    if (ctx->n_threads == 1 || work < ctx->fanout_min) {
        job(arg, 0, 1);
        return;
    }
    const unsigned n = (unsigned)ctx->n_threads;
    ctx->job = job;
    ctx->job_arg = arg;
    atomic_store_explicit(&ctx->done, 0, memory_order_relaxed);
    publish(ctx, 0);
    run_shares(ctx);
    /* D2: acquire pairs with the share completions D1. */
    unsigned v = atomic_load_explicit(&ctx->done, memory_order_acquire);
    while (v != n) {
        v = poll_word(ctx, &ctx->caller_spin, &ctx->done, v);
        if (v == n)
            break;
        atomic_store_explicit(&ctx->done_sleeper, 1, memory_order_seq_cst);
        v = atomic_load_explicit(&ctx->done, memory_order_seq_cst);
        if (v != n)
            futex_wait(&ctx->done, v);
        atomic_store_explicit(&ctx->done_sleeper, 0, memory_order_relaxed);
        v = atomic_load_explicit(&ctx->done, memory_order_acquire);
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
    publish(ctx, (unsigned)ctx->n_threads);
    for (int i = 0; i < n_started; i++)
        pthread_join(ctx->workers[i].tid, NULL);
}

int kn_threads_auto(void)
{
    int n = cm_cpus_usable();
    return n > KN_AUTO_THREADS_MAX ? KN_AUTO_THREADS_MAX : n;
}

static int64_t fanout_min(int64_t cfg)
{
    if (cfg != 0)
        return cfg < 0 ? INT64_MIN : cfg;
    const char *env = getenv("GORGON_FANOUT_MIN_BYTES");
    if (env && *env) {
        char *end;
        errno = 0;
        long long v = strtoll(env, &end, 10);
        if (errno == 0 && *end == '\0' && v >= 0)
            return v;
        CM_LOG_WARN("kernels", "ignoring GORGON_FANOUT_MIN_BYTES=%s (want bytes >= 0)", env);
    }
    return KN_FANOUT_MIN_BYTES;
}

int kn_device_parse(const char *s, int *cuda_index)
{
    return cm_device_parse(s, cuda_index);
}

#define KN_NO_CUDA_WHY "this build has no CUDA backend (built with CUDA=0 or without nvcc)"

int kn_cuda_device_count(char *why, size_t cap)
{
#ifdef GORGON_CUDA
    return kn_cuda_count(why, cap);
#else
    if (why && cap)
        snprintf(why, cap, "%s", KN_NO_CUDA_WHY);
    return -EOPNOTSUPP;
#endif
}

/* A ctx on CUDA device `index`: one stream, no pool threads (the calling
 * thread only issues work). */
static int ctx_create_cuda(kn_ctx **out, const char *device, int index)
{
#ifdef GORGON_CUDA
    char why[256] = "";
    struct kn_cuda *cu;
    int rc = kn_cuda_open(index, &cu, why, sizeof(why));
    if (rc < 0) {
        CM_LOG_ERROR("kernels", "cannot use device %s: %s", device, why);
        return rc;
    }
    kn_ctx *ctx = aligned_alloc(KN_CACHELINE, (sizeof(*ctx) + KN_CACHELINE - 1) /
                                                  KN_CACHELINE * KN_CACHELINE);
    if (!ctx) {
        kn_cuda_close(cu);
        return -ENOMEM;
    }
    memset(ctx, 0, sizeof(*ctx));
    ctx->impl = &kn_impl_cuda;
    ctx->buf = &kn_buf_cuda;
    ctx->variant = KN_VARIANT_AUTO;
    ctx->n_threads = 1;
    ctx->fanout_min = KN_WORK_ALWAYS;
    ctx->cuda = cu;
    *out = ctx;
    return 0;
#else
    (void)out;
    (void)index;
    CM_LOG_ERROR("kernels", "cannot use device %s: %s", device, KN_NO_CUDA_WHY);
    return -EOPNOTSUPP;
#endif
}

int kn_ctx_create(kn_ctx **out, const kn_ctx_cfg *cfg)
{
    if (!out || !cfg)
        return -EINVAL;
    *out = NULL;
    int cuda_index;
    if (kn_device_parse(cfg->device, &cuda_index) < 0) {
        CM_LOG_ERROR("kernels", "unknown device '%s' (expected cpu, cuda or cuda:N)",
                     cfg->device);
        return -EINVAL;
    }
    if (cuda_index >= 0)
        return ctx_create_cuda(out, cfg->device, cuda_index);
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
    int n = cfg->n_threads > 0 ? cfg->n_threads : kn_threads_auto();
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
    ctx->fanout_min = fanout_min(cfg->fanout_min_bytes);
    /* generation 0 with nothing to claim: see worker_main */
    atomic_init(&ctx->claim, (unsigned)n);
    atomic_init(&ctx->claim_sleepers, 0);
    atomic_init(&ctx->stop, false);
    atomic_init(&ctx->done, 0);
    atomic_init(&ctx->done_sleeper, 0);
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
#ifdef GORGON_CUDA
    if (ctx->cuda)
        kn_cuda_close(ctx->cuda);
#endif
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

struct kn_cuda *kn_ctx_cuda(const kn_ctx *ctx)
{
    return ctx->cuda;
}

const char *kn_ctx_device(const kn_ctx *ctx)
{
#ifdef GORGON_CUDA
    if (ctx && ctx->cuda)
        return kn_cuda_name(ctx->cuda);
#endif
    (void)ctx;
    return "cpu";
}

int kn_ctx_mem_info(kn_ctx *ctx, size_t *free_bytes, size_t *total_bytes)
{
    if (!ctx || !free_bytes || !total_bytes)
        return -EINVAL;
#ifdef GORGON_CUDA
    if (ctx->cuda)
        return kn_cuda_mem_info(ctx->cuda, free_bytes, total_bytes);
#endif
    return -EOPNOTSUPP;
}

const char *kn_ctx_error(const kn_ctx *ctx)
{
#ifdef GORGON_CUDA
    if (ctx && ctx->cuda)
        return kn_cuda_errmsg(ctx->cuda);
#endif
    (void)ctx;
    return "";
}

double kn_measure_gemm_peak(kn_ctx *ctx, enum kn_dtype t, int64_t M, int64_t N, int64_t K,
                            int reps)
{
    if (!ctx || M <= 0 || N <= 0 || K <= 0)
        return -EINVAL;
#ifdef GORGON_CUDA
    if (ctx->cuda)
        return kn_cuda_gemm_peak(ctx->cuda, t, M, N, K, reps < 1 ? 1 : reps);
#endif
    (void)t;
    (void)reps;
    return -EOPNOTSUPP;
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
    kn_run(ctx, rows_job, &j, KN_WORK_ALWAYS);
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
    kn_run(ctx, pfor_job, &pf, KN_WORK_ALWAYS);
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
#ifdef GORGON_CUDA
    if (ctx->cuda)
        return kn_cuda_read_bandwidth(ctx->cuda, bytes, reps < 1 ? 1 : reps);
#endif
    bytes &= ~(size_t)4095;
    if (reps < 1)
        reps = 1;
    char *buf = aligned_alloc(4096, bytes);
    if (!buf)
        return 0.0;
    struct bw_job j = {.impl = ctx->impl, .buf = buf, .bytes = bytes};
    kn_run(ctx, bw_touch_job, &j, KN_WORK_ALWAYS);
    kn_run(ctx, bw_read_job, &j, KN_WORK_ALWAYS); /* warm-up: page tables, pool threads awake */
    double best = 0.0;
    for (int r = 0; r < reps; r++) {
        uint64_t t0 = cm_now_ns();
        kn_run(ctx, bw_read_job, &j, KN_WORK_ALWAYS);
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
