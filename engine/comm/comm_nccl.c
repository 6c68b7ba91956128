/* comm's NCCL backend: collectives between GPU ranks (one process per GPU,
 * on one node or several), behind the same ops table as the shared-memory
 * backend.
 *
 * Built when the build finds nccl.h under CUDA's prefix (Makefile NCCL=auto);
 * it compiles against the real headers but loads libnccl and libcudart with
 * dlopen when a communicator is first made, so that every program linking
 * comm (gorgond, gorgon-worker) still starts on a machine without CUDA, a
 * driver or a GPU: there, comm_nccl_* return -ENOENT / -ENODEV with the
 * reason.
 *
 * Buffers are device pointers. Each call is enqueued on the communicator's
 * stream and then waited for (polling the stream, the communicator's
 * asynchronous error, the abort flag and the timeout), so calls keep the
 * interface's contract: on return the data is in place, and a peer that died
 * or hangs ends in an error instead of a hang. The communicator is created
 * non-blocking (ncclConfig_t.blocking = 0) for the same reason. */
#include <errno.h>
#include <stdio.h>

#include "engine/comm/comm_int.h"

#ifndef GORGON_NCCL

static int no_nccl(char *why, size_t cap)
{
    snprintf(why, cap, "this build has no NCCL backend (nccl.h was not found under CUDA's "
                       "prefix when it was compiled)");
    return -EOPNOTSUPP;
}

int comm_nccl_devices(char *why, size_t cap)
{
    return no_nccl(why, cap);
}

int comm_nccl_unique_id(comm_nccl_id *id, char *why, size_t cap)
{
    (void)id;
    return no_nccl(why, cap);
}

int comm_nccl_init(comm **out, const comm_nccl_id *id, int n_ranks, int rank,
                   const comm_nccl_opts *opts, char *why, size_t cap)
{
    (void)id, (void)n_ranks, (void)rank, (void)opts;
    if (out)
        *out = NULL;
    return no_nccl(why, cap);
}

#else /* GORGON_NCCL */

#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cuda_runtime_api.h>
#include <nccl.h>

#ifndef GORGON_CUDA_LIBDIR
#define GORGON_CUDA_LIBDIR "/usr/local/cuda/lib64"
#endif

_Static_assert(sizeof(comm_nccl_id) == sizeof(ncclUniqueId), "comm_nccl_id is an ncclUniqueId");

/* ---- the libraries, loaded once ------------------------------------------------ */

static struct {
    bool tried, ok;
    char why[256];
    /* libnccl */
    ncclResult_t (*GetUniqueId)(ncclUniqueId *);
    ncclResult_t (*CommInitRankConfig)(ncclComm_t *, int, ncclUniqueId, int, ncclConfig_t *);
    ncclResult_t (*CommGetAsyncError)(ncclComm_t, ncclResult_t *);
    ncclResult_t (*CommAbort)(ncclComm_t);
    ncclResult_t (*CommDestroy)(ncclComm_t);
    ncclResult_t (*AllReduce)(const void *, void *, size_t, ncclDataType_t, ncclRedOp_t,
                              ncclComm_t, cudaStream_t);
    ncclResult_t (*AllGather)(const void *, void *, size_t, ncclDataType_t, ncclComm_t,
                              cudaStream_t);
    ncclResult_t (*Broadcast)(const void *, void *, size_t, ncclDataType_t, int, ncclComm_t,
                              cudaStream_t);
    ncclResult_t (*Send)(const void *, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t);
    ncclResult_t (*Recv)(void *, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t);
    const char *(*GetErrorString)(ncclResult_t);
    ncclResult_t (*GetVersion)(int *);
    /* libcudart */
    cudaError_t (*GetDeviceCount)(int *);
    cudaError_t (*SetDevice)(int);
    cudaError_t (*StreamCreateWithFlags)(cudaStream_t *, unsigned int);
    cudaError_t (*StreamQuery)(cudaStream_t);
    cudaError_t (*StreamDestroy)(cudaStream_t);
    cudaError_t (*Malloc)(void **, size_t);
    cudaError_t (*Free)(void *);
    const char *(*GetErrorStringCuda)(cudaError_t);
} L;

static pthread_mutex_t load_lock = PTHREAD_MUTEX_INITIALIZER;

/* dlopen the first of: $env, the soname through the loader's path, the
 * file under CUDA's prefix this build was made with. */
static void *open_lib(const char *env, const char *soname, const char *file)
{
    const char *e = getenv(env);
    if (e && *e)
        return dlopen(e, RTLD_NOW | RTLD_LOCAL);
    void *h = dlopen(soname, RTLD_NOW | RTLD_LOCAL);
    if (h)
        return h;
    char path[512];
    snprintf(path, sizeof path, "%s/%s", GORGON_CUDA_LIBDIR, file);
    return dlopen(path, RTLD_NOW | RTLD_LOCAL);
}

#define SYM(lib, field, name)                                                          \
    do {                                                                               \
        *(void **)&L.field = dlsym(lib, name);                                         \
        if (!L.field) {                                                                \
            snprintf(L.why, sizeof L.why, "%s has no %s", #lib, name);                 \
            goto out;                                                                  \
        }                                                                              \
    } while (0)

static bool load(char *why, size_t cap)
{
    pthread_mutex_lock(&load_lock);
    if (!L.tried) {
        L.tried = true;
        void *libnccl = open_lib("GORGON_NCCL_LIB", "libnccl.so.2", "libnccl.so.2");
        void *libcudart = libnccl ? open_lib("GORGON_CUDART_LIB", "libcudart.so", "libcudart.so")
                                  : NULL;
        if (!libnccl || !libcudart) {
            snprintf(L.why, sizeof L.why, "cannot load %s: %s (set %s to its path)",
                     libnccl ? "libcudart" : "libnccl", dlerror(),
                     libnccl ? "GORGON_CUDART_LIB" : "GORGON_NCCL_LIB");
            goto out;
        }
        SYM(libnccl, GetUniqueId, "ncclGetUniqueId");
        SYM(libnccl, CommInitRankConfig, "ncclCommInitRankConfig");
        SYM(libnccl, CommGetAsyncError, "ncclCommGetAsyncError");
        SYM(libnccl, CommAbort, "ncclCommAbort");
        SYM(libnccl, CommDestroy, "ncclCommDestroy");
        SYM(libnccl, AllReduce, "ncclAllReduce");
        SYM(libnccl, AllGather, "ncclAllGather");
        SYM(libnccl, Broadcast, "ncclBroadcast");
        SYM(libnccl, Send, "ncclSend");
        SYM(libnccl, Recv, "ncclRecv");
        SYM(libnccl, GetErrorString, "ncclGetErrorString");
        SYM(libnccl, GetVersion, "ncclGetVersion");
        SYM(libcudart, GetDeviceCount, "cudaGetDeviceCount");
        SYM(libcudart, SetDevice, "cudaSetDevice");
        SYM(libcudart, StreamCreateWithFlags, "cudaStreamCreateWithFlags");
        SYM(libcudart, StreamQuery, "cudaStreamQuery");
        SYM(libcudart, StreamDestroy, "cudaStreamDestroy");
        SYM(libcudart, Malloc, "cudaMalloc");
        SYM(libcudart, Free, "cudaFree");
        SYM(libcudart, GetErrorStringCuda, "cudaGetErrorString");
        int v = 0;
        /* The config struct this file was compiled with must be one the
         * library knows: NCCL checks its version field, but refuse early
         * with a clearer message. */
        if (L.GetVersion(&v) != ncclSuccess || v < NCCL_VERSION_CODE / 100 * 100) {
            snprintf(L.why, sizeof L.why,
                     "libnccl is version %d, older than the %d this build's nccl.h is", v,
                     NCCL_VERSION_CODE);
            goto out;
        }
        L.ok = true;
    }
out:
    pthread_mutex_unlock(&load_lock);
    if (!L.ok)
        snprintf(why, cap, "%s", L.why);
    return L.ok;
}

/* ---- the communicator -------------------------------------------------------- */

typedef struct comm_nccl {
    struct comm c;
    ncclComm_t nc;
    cudaStream_t stream;
    bool own_stream;
    int *scratch; /* one int on the device, for barrier */
    int64_t timeout_ms;
    atomic_bool abort_req;
    atomic_bool aborted;
    char abort_why[200];
    pthread_mutex_t why_lock;
} comm_nccl;

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void set_abort_why(comm_nccl *n, const char *why)
{
    pthread_mutex_lock(&n->why_lock);
    if (!n->abort_why[0])
        snprintf(n->abort_why, sizeof n->abort_why, "%s", why && *why ? why : "aborted");
    pthread_mutex_unlock(&n->why_lock);
}

/* Owning thread: abort the NCCL communicator itself (it stops every
 * kernel this rank has in flight; the peers then see an error or time out). */
static void abort_now(comm_nccl *n, const char *why)
{
    set_abort_why(n, why);
    if (!atomic_exchange(&n->aborted, true) && n->nc) {
        (void)L.CommAbort(n->nc); /* frees it */
        n->nc = NULL;
    }
}

/* Wait until the work enqueued on the stream is done, or the communicator
 * reports an error, is aborted, or sees no completion for timeout_ms. */
static int wait_done(comm_nccl *n, const char *call)
{
    comm *c = &n->c;
    const uint64_t t0 = now_ms();
    for (unsigned spins = 0;; spins++) {
        cudaError_t ce = L.StreamQuery(n->stream);
        if (ce == cudaSuccess)
            return 0;
        if (ce != cudaErrorNotReady) {
            char why[160];
            snprintf(why, sizeof why, "%s: CUDA: %s", call, L.GetErrorStringCuda(ce));
            abort_now(n, why);
            return comm_seterr(c, -EIO, "%s", why);
        }
        ncclResult_t ae = ncclSuccess;
        if (L.CommGetAsyncError(n->nc, &ae) == ncclSuccess && ae != ncclSuccess &&
            ae != ncclInProgress) {
            char why[160];
            snprintf(why, sizeof why, "%s: NCCL: %s", call, L.GetErrorString(ae));
            abort_now(n, why);
            return comm_seterr(c, -EIO, "%s", why);
        }
        if (atomic_load(&n->abort_req)) {
            abort_now(n, NULL);
            return comm_seterr(c, -ECONNABORTED, "%s: communicator aborted: %s", call,
                               n->abort_why);
        }
        if (n->timeout_ms >= 0 && now_ms() - t0 > (uint64_t)n->timeout_ms) {
            char why[160];
            snprintf(why, sizeof why, "%s: no completion in %lld ms (a peer died or hangs)",
                     call, (long long)n->timeout_ms);
            abort_now(n, why);
            return comm_seterr(c, -ETIMEDOUT, "%s", why);
        }
        if (spins > 1000)
            sched_yield();
    }
}

/* Enqueue result r of call, then wait for it. */
static int finish(comm_nccl *n, ncclResult_t r, const char *call)
{
    if (r != ncclSuccess && r != ncclInProgress) {
        char why[160];
        snprintf(why, sizeof why, "%s: NCCL: %s", call, L.GetErrorString(r));
        abort_now(n, why);
        return comm_seterr(&n->c, -EIO, "%s", why);
    }
    return wait_done(n, call);
}

#define N(c) ((comm_nccl *)(c))

static int nccl_all_reduce(comm *c, float *buf, size_t n)
{
    return finish(N(c), L.AllReduce(buf, buf, n, ncclFloat32, ncclSum, N(c)->nc, N(c)->stream),
                  "all_reduce_sum_f32");
}

static int nccl_all_gather(comm *c, const void *in, void *out, size_t bytes)
{
    return finish(N(c), L.AllGather(in, out, bytes, ncclUint8, N(c)->nc, N(c)->stream),
                  "all_gather");
}

static int nccl_broadcast(comm *c, void *buf, size_t bytes, int root)
{
    return finish(N(c), L.Broadcast(buf, buf, bytes, ncclUint8, root, N(c)->nc, N(c)->stream),
                  "broadcast");
}

static int nccl_send(comm *c, const void *buf, size_t bytes, int peer)
{
    return finish(N(c), L.Send(buf, bytes, ncclUint8, peer, N(c)->nc, N(c)->stream), "send");
}

static int nccl_recv(comm *c, void *buf, size_t bytes, int peer)
{
    return finish(N(c), L.Recv(buf, bytes, ncclUint8, peer, N(c)->nc, N(c)->stream), "recv");
}

static int nccl_barrier(comm *c)
{
    return finish(N(c),
                  L.AllReduce(N(c)->scratch, N(c)->scratch, 1, ncclInt32, ncclSum, N(c)->nc,
                              N(c)->stream),
                  "barrier");
}

static int nccl_set_timeout(comm *c, int64_t ms)
{
    N(c)->timeout_ms = ms;
    return 0;
}

/* Any thread: the owning thread's wait (or its next call) does the abort. */
static void nccl_abort(comm *c, const char *why)
{
    set_abort_why(N(c), why);
    atomic_store(&N(c)->abort_req, true);
}

static bool nccl_aborted(comm *c, char *why, size_t cap)
{
    comm_nccl *n = N(c);
    bool a = atomic_load(&n->abort_req) || atomic_load(&n->aborted);
    if (a && cap) {
        pthread_mutex_lock(&n->why_lock);
        snprintf(why, cap, "%s", n->abort_why);
        pthread_mutex_unlock(&n->why_lock);
    }
    return a;
}

static void nccl_destroy(comm *c)
{
    comm_nccl *n = N(c);
    if (n->nc) /* (abort_now leaves none) */
        (void)(atomic_load(&n->abort_req) ? L.CommAbort(n->nc) : L.CommDestroy(n->nc));
    if (n->scratch)
        (void)L.Free(n->scratch);
    if (n->own_stream && n->stream)
        (void)L.StreamDestroy(n->stream);
    pthread_mutex_destroy(&n->why_lock);
    free(n);
}

static const struct comm_ops nccl_ops = {
    .name = "nccl",
    .device_memory = true,
    .all_reduce_sum_f32 = nccl_all_reduce,
    .all_gather = nccl_all_gather,
    .broadcast = nccl_broadcast,
    .send = nccl_send,
    .recv = nccl_recv,
    .barrier = nccl_barrier,
    .set_timeout_ms = nccl_set_timeout,
    .abort = nccl_abort,
    .aborted = nccl_aborted,
    .destroy = nccl_destroy,
};

/* ---- public ------------------------------------------------------------------ */

int comm_nccl_devices(char *why, size_t cap)
{
    if (!load(why, cap))
        return -ENOENT;
    int n = 0;
    cudaError_t ce = L.GetDeviceCount(&n);
    if (ce != cudaSuccess) {
        snprintf(why, cap, "no CUDA device: %s", L.GetErrorStringCuda(ce));
        return -ENODEV;
    }
    return n;
}

int comm_nccl_unique_id(comm_nccl_id *id, char *why, size_t cap)
{
    if (!id) {
        snprintf(why, cap, "id is NULL");
        return -EINVAL;
    }
    if (!load(why, cap))
        return -ENOENT;
    ncclUniqueId u;
    ncclResult_t r = L.GetUniqueId(&u);
    if (r != ncclSuccess) {
        snprintf(why, cap, "ncclGetUniqueId: %s", L.GetErrorString(r));
        return -EIO;
    }
    memcpy(id->bytes, u.internal, sizeof id->bytes);
    return 0;
}

int comm_nccl_init(comm **out, const comm_nccl_id *id, int n_ranks, int rank,
                   const comm_nccl_opts *opts, char *why, size_t cap)
{
    if (!out || !id || n_ranks < 1 || rank < 0 || rank >= n_ranks) {
        snprintf(why, cap, "comm_nccl_init: bad arguments (rank %d of %d)", rank, n_ranks);
        return -EINVAL;
    }
    *out = NULL;
    const comm_nccl_opts o = opts ? *opts : COMM_NCCL_OPTS_DEFAULT;
    if (o.device < 0 || (o.timeout_ms < -1 || o.timeout_ms == 0)) {
        snprintf(why, cap, "comm_nccl_init: device %d, timeout_ms %lld", o.device,
                 (long long)o.timeout_ms);
        return -EINVAL;
    }
    int devs = comm_nccl_devices(why, cap);
    if (devs < 0)
        return devs;
    if (o.device >= devs) {
        snprintf(why, cap, "CUDA device %d: this machine has %d", o.device, devs);
        return -ENODEV;
    }
    comm_nccl *n = calloc(1, sizeof *n);
    if (!n) {
        snprintf(why, cap, "out of memory");
        return -ENOMEM;
    }
    pthread_mutex_init(&n->why_lock, NULL);
    n->c.ops = &nccl_ops;
    n->c.rank = rank;
    n->c.size = n_ranks;
    n->timeout_ms = o.timeout_ms;
    int rc = -EIO;
    cudaError_t ce = L.SetDevice(o.device);
    if (ce == cudaSuccess && o.stream)
        n->stream = (cudaStream_t)o.stream;
    else if (ce == cudaSuccess) {
        ce = L.StreamCreateWithFlags(&n->stream, cudaStreamNonBlocking);
        n->own_stream = ce == cudaSuccess;
    }
    if (ce == cudaSuccess)
        ce = L.Malloc((void **)&n->scratch, sizeof(int));
    if (ce != cudaSuccess) {
        snprintf(why, cap, "CUDA device %d: %s", o.device, L.GetErrorStringCuda(ce));
        goto fail;
    }
    ncclUniqueId u;
    memcpy(u.internal, id->bytes, sizeof u.internal);
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0; /* init and collectives return at once; we poll (timeouts, abort) */
    ncclResult_t r = L.CommInitRankConfig(&n->nc, n_ranks, u, rank, &cfg);
    /* Non-blocking: the communicator forms in the background; its state is
     * ncclInProgress until then. */
    const uint64_t t0 = now_ms();
    while ((r == ncclSuccess || r == ncclInProgress) && n->nc) {
        if (L.CommGetAsyncError(n->nc, &r) != ncclSuccess)
            r = ncclInternalError;
        if (r != ncclInProgress)
            break;
        if (o.timeout_ms > 0 && now_ms() - t0 > (uint64_t)o.timeout_ms) {
            snprintf(why, cap, "ncclCommInitRank: rank %d of %d: the group did not form in "
                     "%lld ms", rank, n_ranks, (long long)o.timeout_ms);
            rc = -ETIMEDOUT;
            goto fail;
        }
        sched_yield();
    }
    if (r != ncclSuccess) {
        snprintf(why, cap, "ncclCommInitRank: rank %d of %d: %s", rank, n_ranks,
                 L.GetErrorString(r));
        goto fail;
    }
    *out = &n->c;
    return 0;
fail:
    if (n->nc) {
        (void)L.CommAbort(n->nc);
        n->nc = NULL;
    }
    nccl_destroy(&n->c);
    return rc;
}

#endif /* GORGON_NCCL */
