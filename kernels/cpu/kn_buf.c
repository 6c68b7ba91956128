/* kn_buf: the public buffer calls (argument checks of kn.h, then the ctx's
 * backend table) and the CPU backend's table, where host memory is backend
 * memory and every call is complete when it returns.
 *
 * CPU allocations carry a 64-byte header just below the pointer handed out,
 * recording how the block was obtained: small ones come from aligned_alloc;
 * from KN_BUF_MAP_MIN up (KV pools, big activations) an anonymous mapping
 * whose payload starts on a 2 MiB boundary and is advised for transparent
 * huge pages, which saves TLB misses when attention streams a pool. */
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "kernels/cpu/kn_int.h"

#define KN_BUF_ALIGN 64
#define KN_BUF_MAP_MIN ((size_t)4 << 20)
#define KN_BUF_HUGE ((size_t)2 << 20)

enum { KN_BUF_HEAP = 1, KN_BUF_MAP = 2 };

typedef struct kn_buf_hdr {
    void *base;     /* what aligned_alloc or mmap returned */
    size_t map_len; /* mapping length (KN_BUF_MAP) */
    int kind;
} kn_buf_hdr;
_Static_assert(sizeof(kn_buf_hdr) <= KN_BUF_ALIGN, "the header fits below the payload");

static kn_buf_hdr *hdr_of(void *p)
{
    return (kn_buf_hdr *)((char *)p - KN_BUF_ALIGN);
}

static size_t round_up(size_t n, size_t a)
{
    return (n + a - 1) / a * a;
}

/* One page for the header below a 2 MiB-aligned payload: over-map by 2 MiB,
 * then return the unused head and tail to the kernel. */
static int cpu_alloc_map(size_t bytes, void **out)
{
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t payload = round_up(bytes, KN_BUF_HUGE);
    if (payload < bytes || payload > SIZE_MAX - KN_BUF_HUGE)
        return -ENOMEM;
    const size_t len = payload + KN_BUF_HUGE;
    char *base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED)
        return -ENOMEM;
    char *p = (char *)round_up((uintptr_t)base + page, KN_BUF_HUGE);
    char *keep = p - page, *end = p + payload;
    if (keep > base)
        munmap(base, (size_t)(keep - base));
    if (base + len > end)
        munmap(end, (size_t)(base + len - end));
    /* Best effort: without THP the buffer still works, on 4 KiB pages. */
    (void)madvise(p, payload, MADV_HUGEPAGE);
    *hdr_of(p) = (kn_buf_hdr){.base = keep, .map_len = (size_t)(end - keep), .kind = KN_BUF_MAP};
    *out = p;
    return 0;
}

static int cpu_alloc(kn_ctx *ctx, size_t bytes, void **out)
{
    (void)ctx;
    if (bytes >= KN_BUF_MAP_MIN)
        return cpu_alloc_map(bytes, out);
    const size_t len = KN_BUF_ALIGN + round_up(bytes, KN_BUF_ALIGN);
    char *base = aligned_alloc(KN_BUF_ALIGN, len);
    if (!base)
        return -ENOMEM;
    memset(base, 0, len);
    char *p = base + KN_BUF_ALIGN;
    *hdr_of(p) = (kn_buf_hdr){.base = base, .kind = KN_BUF_HEAP};
    *out = p;
    return 0;
}

static void cpu_free(kn_ctx *ctx, void *p)
{
    (void)ctx;
    const kn_buf_hdr h = *hdr_of(p);
    if (h.kind == KN_BUF_MAP)
        munmap(h.base, h.map_len);
    else
        free(h.base);
}

static int cpu_memcpy(kn_ctx *ctx, void *dst, const void *src, size_t n)
{
    (void)ctx;
    memcpy(dst, src, n);
    return 0;
}

static int cpu_sync(kn_ctx *ctx)
{
    (void)ctx;
    return 0;
}

const kn_buf_impl kn_buf_cpu = {
    .host_memory = 1,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_memcpy,
    .download = cpu_memcpy,
    .copy = cpu_memcpy,
    .sync = cpu_sync,
};

/* ---- public calls ---------------------------------------------------------- */

int kn_buf_alloc(kn_ctx *ctx, size_t bytes, void **out)
{
    if (!out)
        return -EINVAL;
    *out = NULL;
    if (!ctx || bytes == 0)
        return -EINVAL;
    return kn_ctx_buf(ctx)->alloc(ctx, bytes, out);
}

void kn_buf_free(kn_ctx *ctx, void *p)
{
    if (!ctx || !p)
        return;
    kn_ctx_buf(ctx)->free(ctx, p);
}

/* 0: go ahead; 1: nothing to do (n == 0); -EINVAL */
static int check_move(const kn_ctx *ctx, const void *dst, const void *src, size_t n)
{
    if (!ctx)
        return -EINVAL;
    if (n == 0)
        return 1;
    return dst && src ? 0 : -EINVAL;
}

int kn_buf_upload(kn_ctx *ctx, void *dst, const void *src, size_t n)
{
    int rc = check_move(ctx, dst, src, n);
    if (rc != 0)
        return rc < 0 ? rc : 0;
    return kn_ctx_buf(ctx)->upload(ctx, dst, src, n);
}

int kn_buf_download(kn_ctx *ctx, void *dst, const void *src, size_t n)
{
    int rc = check_move(ctx, dst, src, n);
    if (rc != 0)
        return rc < 0 ? rc : 0;
    return kn_ctx_buf(ctx)->download(ctx, dst, src, n);
}

int kn_buf_copy(kn_ctx *ctx, void *dst, const void *src, size_t n)
{
    int rc = check_move(ctx, dst, src, n);
    if (rc != 0)
        return rc < 0 ? rc : 0;
    /* Overlapping regions (kn.h forbids them) are cheap to see here and
     * would be undefined for memcpy and cudaMemcpyAsync alike. */
    const uintptr_t d = (uintptr_t)dst, s = (uintptr_t)src;
    if (d < s + n && s < d + n)
        return -EINVAL;
    return kn_ctx_buf(ctx)->copy(ctx, dst, src, n);
}

int kn_sync(kn_ctx *ctx)
{
    if (!ctx)
        return -EINVAL;
    return kn_ctx_buf(ctx)->sync(ctx);
}

/* ---- weights and synthetic data ------------------------------------------- */

#ifdef GORGON_CUDA
#include "kernels/cuda/kn_cuda.h"
#endif

int kn_tensor_to_backend(kn_ctx *ctx, kn_tensor *w)
{
    if (!ctx || !kn_weight_ok(w))
        return -EINVAL;
    if (kn_ctx_host_memory(ctx))
        return kn_tensor_pack(w);
#ifdef GORGON_CUDA
    const size_t bytes = (size_t)w->rows * kn_row_bytes(w->type, w->cols);
    void *d;
    int rc = kn_buf_alloc(ctx, bytes, &d);
    if (rc < 0)
        return rc;
    if ((rc = kn_buf_upload(ctx, d, w->data, bytes)) < 0) {
        kn_buf_free(ctx, d);
        return rc;
    }
    kn_tensor dev = *w;
    dev.data = d;
    dev.packed = NULL;
    if ((rc = kn_cuda_weight_prepare(kn_ctx_cuda(ctx), &dev)) < 0) {
        kn_buf_free(ctx, d);
        return rc;
    }
    *w = dev;
    return 0;
#else
    return -EOPNOTSUPP; /* no other backend without host memory */
#endif
}

void kn_tensor_release(kn_ctx *ctx, kn_tensor *w)
{
    if (!ctx || !w)
        return;
    if (kn_ctx_host_memory(ctx)) {
        kn_tensor_unpack(w);
        return;
    }
#ifdef GORGON_CUDA
    kn_cuda_weight_release(kn_ctx_cuda(ctx), w);
    kn_buf_free(ctx, (void *)w->data);
    w->data = NULL;
    w->packed = NULL;
#endif
}

/* kn.h's generator: splitmix64's mix of a per-element counter. */
static float fill_value(uint64_t seed, int64_t i, float amplitude)
{
    uint64_t z = seed + (uint64_t)(i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ z >> 30) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ z >> 27) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return ((float)(z >> 40) * 0x1p-24f * 2.0f - 1.0f) * amplitude;
}

int kn_buf_fill_random(kn_ctx *ctx, void *p, enum kn_dtype t, int64_t n, uint64_t seed,
                       float amplitude)
{
    if (!ctx || !p || n <= 0 || kn_row_bytes(t, n) == 0)
        return -EINVAL;
    if (!kn_ctx_host_memory(ctx)) {
#ifdef GORGON_CUDA
        return kn_cuda_fill_random(kn_ctx_cuda(ctx), p, t, n, seed, amplitude);
#else
        return -EOPNOTSUPP;
#endif
    }
    /* A block of 32 at a time: the quantised types' unit, and for the
     * others a chunk (n need not be a multiple of 32 for them). */
    float v[KN_QK];
    char *dst = p;
    for (int64_t i0 = 0; i0 < n; i0 += KN_QK) {
        const int64_t len = n - i0 < KN_QK ? n - i0 : KN_QK;
        for (int64_t j = 0; j < len; j++)
            v[j] = fill_value(seed, i0 + j, amplitude);
        int64_t wrote = kn_quantize_row(t, v, len, dst);
        if (wrote < 0)
            return (int)wrote;
        dst += wrote;
    }
    return 0;
}
