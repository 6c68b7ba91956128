/* The CUDA backend's device state: one device, one stream, buffers, scratch
 * and the error state every launcher reports through.
 *
 * Design choices (why):
 * - One non-blocking stream per ctx. Ops on a ctx come from one thread in
 *   issue order (kn.h), so a single stream gives kn.h's ordering for free,
 *   and "non-blocking" keeps it from synchronising with the legacy default
 *   stream that libraries or other ctxs in the process might use.
 * - Errors are sticky. After an asynchronous fault (illegal address, ...)
 *   the CUDA context is unusable and every later call would fail with an
 *   unrelated-looking message; we keep the first message, naming the last
 *   kernel issued, which is the best hint a stream-ordered fault gives, and
 *   refuse further work (the worker restarts). Out of memory is not sticky:
 *   the context is intact and the caller may retry smaller.
 * - Scratch grows geometrically (by at least a quarter) so that callers whose
 *   sizes creep up (attention scratch following the context length) pay for
 *   O(log) reallocations, each of which must drain the stream before freeing.
 * - cudaSetDevice is called on the cold paths (open, close, alloc, free,
 *   scratch growth, memory info) and not per launch: ops come from the thread
 *   that opened the ctx except in tests; stream-ordered calls (launches,
 *   async copies) name their stream, which carries the device.
 * - Nothing here logs (kn.h: the caller logs once, where it handles it). */
#include <cuda_runtime.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/kn_cuda.h"

#define KN_CUDA_MSG_MAX 512
#define KN_CUDA_NAME_MAX 320
/* Scratch sizes are rounded up to this (fewer, larger cudaMallocs). */
#define KN_CUDA_SCRATCH_ROUND ((size_t)64 << 10)

struct kn_cuda {
    int device;
    cudaStream_t stream;
    int sm_count;
    int cc;                      /* major * 10 + minor */
    int sticky;                  /* -EIO once a CUDA error was recorded, else 0 */
    const char *last_op;         /* the op name given to the last kn_cuda_check (a literal) */
    void *scratch[KN_CUDA_SCRATCH_COUNT];
    size_t scratch_bytes[KN_CUDA_SCRATCH_COUNT];
    void *mod[KN_CUDA_MOD_COUNT];
    void (*mod_fini[KN_CUDA_MOD_COUNT])(kn_cuda *cu, void *state);
    char name[KN_CUDA_NAME_MAX]; /* "cuda:0 (NVIDIA H200)" */
    char msg[KN_CUDA_MSG_MAX];   /* kn_cuda_errmsg */
};

static void set_why(char *why, size_t cap, const char *fmt, ...)
#ifdef __GNUC__
    __attribute__((format(printf, 3, 4)))
#endif
    ;

static void set_why(char *why, size_t cap, const char *fmt, ...)
{
    if (!why || cap == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, cap, fmt, ap);
    va_end(ap);
}

/* Make cu's device current for this thread (cold paths only, see top). */
static cudaError_t use_dev(const kn_cuda *cu)
{
    return cudaSetDevice(cu->device);
}

/* A CUDA runtime call of a buffer call failed: the error may be a fault of
 * an earlier kernel surfacing here, so the message names that kernel. The
 * runtime's last-error slot is cleared so that the next kn_cuda_check does
 * not report it again under another name. */
static int cuda_fail(kn_cuda *cu, cudaError_t e)
{
    (void)cudaGetLastError();
    return kn_cuda_fail(cu, -EIO, "%s (last kernel issued: %s)", cudaGetErrorString(e),
                        cu->last_op ? cu->last_op : "none");
}

/* cudaMalloc of `bytes` failed with e: out of memory is -ENOMEM (not
 * sticky) with what was asked and what is free; anything else is a broken
 * context (-EIO, sticky). */
static int malloc_fail(kn_cuda *cu, const char *what, size_t bytes, cudaError_t e)
{
    (void)cudaGetLastError();
    if (e != cudaErrorMemoryAllocation)
        return cuda_fail(cu, e);
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess)
        (void)cudaGetLastError();
    return kn_cuda_fail(cu, -ENOMEM, "%s: out of device memory: %zu bytes asked, %zu of %zu free",
                        what, bytes, free_b, total_b);
}

/* ---- devices ------------------------------------------------------------- */

int kn_cuda_count(char *why, size_t cap)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        /* Without a driver the static runtime reports "insufficient
         * driver"; say what that means here. */
        set_why(why, cap, "no usable CUDA driver or device: %s (%s)", cudaGetErrorString(e),
                cudaGetErrorName(e));
        return -ENODEV;
    }
    if (n <= 0) {
        set_why(why, cap, "no CUDA device found");
        return -ENODEV;
    }
    return n;
}

int kn_cuda_open(int device, kn_cuda **out, char *why, size_t cap)
{
    if (!out) {
        set_why(why, cap, "no output pointer");
        return -EINVAL;
    }
    *out = NULL;
    if (device < 0) {
        set_why(why, cap, "invalid CUDA device index %d", device);
        return -EINVAL;
    }
    int n = kn_cuda_count(why, cap);
    if (n < 0)
        return n;
    if (device >= n) {
        set_why(why, cap, "cuda:%d: no such device (%d found)", device, n);
        return -ENODEV;
    }
    /* Since CUDA 12 this also creates the device's primary context, so a
     * device that cannot be used (exclusive mode, fallen off the bus) fails
     * here rather than at the first op. */
    cudaError_t e = cudaSetDevice(device);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        set_why(why, cap, "cuda:%d: %s", device, cudaGetErrorString(e));
        return e == cudaErrorMemoryAllocation ? -ENOMEM : -ENODEV;
    }
    cudaDeviceProp prop;
    e = cudaGetDeviceProperties(&prop, device);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        set_why(why, cap, "cuda:%d: %s", device, cudaGetErrorString(e));
        return -ENODEV;
    }
    kn_cuda *cu = (kn_cuda *)calloc(1, sizeof(*cu));
    if (!cu) {
        set_why(why, cap, "cuda:%d: out of host memory", device);
        return -ENOMEM;
    }
    e = cudaStreamCreateWithFlags(&cu->stream, cudaStreamNonBlocking);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        set_why(why, cap, "cuda:%d: cannot create a stream: %s", device, cudaGetErrorString(e));
        free(cu);
        return e == cudaErrorMemoryAllocation ? -ENOMEM : -ENODEV;
    }
    cu->device = device;
    cu->sm_count = prop.multiProcessorCount > 0 ? prop.multiProcessorCount : 1;
    cu->cc = prop.major * 10 + prop.minor;
    prop.name[sizeof(prop.name) - 1] = '\0';
    snprintf(cu->name, sizeof(cu->name), "cuda:%d (%s)", device, prop.name);
    *out = cu;
    return 0;
}

void kn_cuda_close(kn_cuda *cu)
{
    if (!cu)
        return;
    (void)use_dev(cu);
    /* Work still queued may use module state and scratch: let it finish
     * (errors are moot now). */
    (void)cudaStreamSynchronize(cu->stream);
    for (int m = 0; m < KN_CUDA_MOD_COUNT; m++) {
        if (cu->mod[m] && cu->mod_fini[m])
            cu->mod_fini[m](cu, cu->mod[m]);
        cu->mod[m] = NULL;
        cu->mod_fini[m] = NULL;
    }
    for (int s = 0; s < KN_CUDA_SCRATCH_COUNT; s++)
        if (cu->scratch[s])
            (void)cudaFree(cu->scratch[s]);
    (void)cudaStreamDestroy(cu->stream);
    (void)cudaGetLastError();
    free(cu);
}

const char *kn_cuda_name(const kn_cuda *cu)
{
    return cu->name;
}

int kn_cuda_mem_info(kn_cuda *cu, size_t *free_bytes, size_t *total_bytes)
{
    size_t f = 0, t = 0;
    cudaError_t e = use_dev(cu);
    if (e == cudaSuccess)
        e = cudaMemGetInfo(&f, &t);
    if (e != cudaSuccess)
        return cuda_fail(cu, e);
    if (free_bytes)
        *free_bytes = f;
    if (total_bytes)
        *total_bytes = t;
    return 0;
}

int kn_cuda_sm_count(const kn_cuda *cu)
{
    return cu->sm_count;
}

int kn_cuda_cc(const kn_cuda *cu)
{
    return cu->cc;
}

void *kn_cuda_stream(const kn_cuda *cu)
{
    return (void *)cu->stream;
}

/* ---- buffers ------------------------------------------------------------- */

int kn_cuda_alloc(kn_cuda *cu, size_t bytes, void **out)
{
    *out = NULL;
    cudaError_t e = use_dev(cu);
    if (e != cudaSuccess)
        return cuda_fail(cu, e);
    void *p = NULL;
    e = cudaMalloc(&p, bytes); /* 256-byte aligned */
    if (e != cudaSuccess)
        return malloc_fail(cu, "alloc", bytes, e);
    /* kn.h: allocations are zeroed. On the stream, so it is ordered before
     * every later op or upload on this ctx without a host wait. */
    e = cudaMemsetAsync(p, 0, bytes, cu->stream);
    if (e != cudaSuccess) {
        int rc = cuda_fail(cu, e);
        (void)cudaFree(p);
        (void)cudaGetLastError();
        return rc;
    }
    *out = p;
    return 0;
}

/* cudaFree waits for the whole device, so work still using p finishes
 * first (what kn_buf_free's callers expect). A failure here is either a
 * fault surfacing or a pointer that did not come from kn_cuda_alloc: both
 * bugs that leave the ctx suspect, hence sticky. */
void kn_cuda_free(kn_cuda *cu, void *p)
{
    if (!p)
        return;
    cudaError_t e = use_dev(cu);
    if (e == cudaSuccess)
        e = cudaFree(p);
    if (e != cudaSuccess)
        (void)cuda_fail(cu, e);
}

/* Whether the runtime may still read host memory src after an async copy
 * from it returns: true for page-locked (cudaHostAlloc/cudaHostRegister)
 * and managed memory, whose copies are truly asynchronous. Pageable memory
 * is staged into a pinned bounce buffer before cudaMemcpyAsync returns. */
static bool host_src_async(const void *src)
{
    cudaPointerAttributes a;
    if (cudaPointerGetAttributes(&a, src) != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
    }
    return a.type == cudaMemoryTypeHost || a.type == cudaMemoryTypeManaged;
}

/* Returns once src may be reused: for ordinary (pageable) host memory the
 * runtime has copied it into a staging buffer by then and the transfer to
 * dst completes in stream order; for page-locked or managed src (a truly
 * asynchronous copy) it waits for the stream. */
int kn_cuda_upload(kn_cuda *cu, void *dst, const void *src, size_t n)
{
    cudaError_t e = cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, cu->stream);
    if (e == cudaSuccess && host_src_async(src))
        e = cudaStreamSynchronize(cu->stream);
    return e == cudaSuccess ? 0 : cuda_fail(cu, e);
}

int kn_cuda_download(kn_cuda *cu, void *dst, const void *src, size_t n)
{
    cudaError_t e = cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, cu->stream);
    /* Into pageable memory the copy is already complete here; into pinned
     * memory it is not: wait for the stream either way (kn.h: download waits
     * for every earlier op). */
    if (e == cudaSuccess)
        e = cudaStreamSynchronize(cu->stream);
    return e == cudaSuccess ? 0 : cuda_fail(cu, e);
}

int kn_cuda_copy(kn_cuda *cu, void *dst, const void *src, size_t n)
{
    cudaError_t e = cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, cu->stream);
    return e == cudaSuccess ? 0 : cuda_fail(cu, e);
}

int kn_cuda_sync(kn_cuda *cu)
{
    cudaError_t e = cudaStreamSynchronize(cu->stream);
    return e == cudaSuccess ? 0 : cuda_fail(cu, e);
}

/* ---- scratch and module state -------------------------------------------- */

void *kn_cuda_scratch(kn_cuda *cu, int which, size_t bytes)
{
    if (which < 0 || which >= KN_CUDA_SCRATCH_COUNT)
        return NULL;
    if (bytes == 0)
        bytes = 1;
    if (bytes <= cu->scratch_bytes[which])
        return cu->scratch[which];
    const size_t old = cu->scratch_bytes[which];
    size_t want = old + old / 4;
    if (want < bytes)
        want = bytes;
    if (want <= SIZE_MAX - KN_CUDA_SCRATCH_ROUND)
        want = (want + KN_CUDA_SCRATCH_ROUND - 1) / KN_CUDA_SCRATCH_ROUND * KN_CUDA_SCRATCH_ROUND;
    cudaError_t e = use_dev(cu);
    if (e != cudaSuccess) {
        (void)cuda_fail(cu, e);
        return NULL;
    }
    if (cu->scratch[which]) {
        /* Kernels already queued may still read or write the old buffer. */
        e = cudaStreamSynchronize(cu->stream);
        if (e == cudaSuccess)
            e = cudaFree(cu->scratch[which]);
        if (e != cudaSuccess) {
            (void)cuda_fail(cu, e);
            return NULL;
        }
        cu->scratch[which] = NULL;
        cu->scratch_bytes[which] = 0;
    }
    void *p = NULL;
    e = cudaMalloc(&p, want);
    if (e == cudaErrorMemoryAllocation && want > bytes) {
        /* the headroom did not fit: the exact size may */
        (void)cudaGetLastError();
        want = bytes;
        e = cudaMalloc(&p, want);
    }
    if (e != cudaSuccess) {
        (void)malloc_fail(cu, "scratch", bytes, e);
        return NULL;
    }
    cu->scratch[which] = p;
    cu->scratch_bytes[which] = want;
    return p;
}

void *kn_cuda_module(kn_cuda *cu, int mod)
{
    return mod >= 0 && mod < KN_CUDA_MOD_COUNT ? cu->mod[mod] : NULL;
}

/* Stores the state; replacing one does not finalise the old (its module
 * owns that). */
void kn_cuda_set_module(kn_cuda *cu, int mod, void *state, void (*fini)(kn_cuda *cu, void *state))
{
    if (mod < 0 || mod >= KN_CUDA_MOD_COUNT)
        return;
    cu->mod[mod] = state;
    cu->mod_fini[mod] = fini;
}

/* ---- errors -------------------------------------------------------------- */

/* `op` must outlive the ctx (a string literal): only the pointer is kept,
 * so that the per-launch cost is one store. */
int kn_cuda_check(kn_cuda *cu, const char *op)
{
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess)
        return kn_cuda_fail(cu, -EIO, "%s: %s", op, cudaGetErrorString(e));
    cu->last_op = op;
    return cu->sticky;
}

/* Once an error is sticky its message is kept: it names the root cause,
 * whatever fails after it is a consequence. */
int kn_cuda_fail(kn_cuda *cu, int rc, const char *fmt, ...)
{
    if (cu->sticky)
        return rc;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cu->msg, sizeof(cu->msg), fmt, ap);
    va_end(ap);
    if (rc == -EIO)
        cu->sticky = -EIO;
    return rc;
}

int kn_cuda_failed(const kn_cuda *cu)
{
    return cu->sticky;
}

const char *kn_cuda_errmsg(const kn_cuda *cu)
{
    return cu->msg;
}
