/* kernels: backend buffers (kn_buf_*, kn_sync, kn_ctx_host_memory) of every
 * backend: zeroed and aligned allocations, round trips through upload,
 * copy and download, the argument checks of kn.h; and, for the CPU, the
 * 2 MiB-aligned, huge-page-advised mappings of big buffers and that freeing
 * returns them to the kernel. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "kernels/kn.h"
#include "tests/kernels/util/kt.h"

#define MIB ((size_t)1 << 20)

/* Whether the bytes of backend buffer p are all zero. */
static int dev_zeroed(kn_ctx *ctx, const void *p, size_t bytes)
{
    unsigned char *h = malloc(bytes);
    cr_assert_not_null(h);
    kt_dev_get(ctx, h, p, bytes);
    int zero = 1;
    for (size_t i = 0; i < bytes && zero; i++)
        zero = h[i] == 0;
    free(h);
    return zero;
}

/* VmFlags of the mapping holding p contain "hg" (MADV_HUGEPAGE); -1 when
 * /proc/self/smaps cannot be read. */
static int advised_hugepage(const void *p)
{
    FILE *f = fopen("/proc/self/smaps", "r");
    if (!f)
        return -1;
    char line[512];
    int in = 0, found = 0;
    while (fgets(line, sizeof(line), f)) {
        unsigned long lo, hi;
        if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2 && strchr(line, '-') < strchr(line, ' ')) {
            in = (uintptr_t)p >= lo && (uintptr_t)p < hi;
            continue;
        }
        if (in && strncmp(line, "VmFlags:", 8) == 0) {
            found = strstr(line, " hg") != NULL;
            break;
        }
    }
    fclose(f);
    return found;
}

/* small allocations are zeroed, 64-byte aligned, writable over their whole
 * length and freed */
KT_BACKEND_TEST(kernels_buf, alloc_small_is_zeroed_and_aligned)
{
    kn_ctx *ctx = kt_open(b, 2);
    static const size_t sizes[] = {1, 3, 63, 64, 65, 1000, 4096, 4 * MIB - 1};
    /* twice: the second round likely gets the first round's dirty memory */
    for (size_t i = 0; i < 2 * sizeof(sizes) / sizeof(sizes[0]); i++) {
        const size_t bytes = sizes[i % (sizeof(sizes) / sizeof(sizes[0]))];
        void *p = (void *)1;
        KT_OK(kn_buf_alloc(ctx, bytes, &p));
        cr_assert_not_null(p);
        cr_assert_eq((uintptr_t)p % 64, 0, "%s: %zu bytes at %p", kt_backend_name(b), bytes, p);
        cr_assert(dev_zeroed(ctx, p, bytes), "%s: %zu bytes not zeroed", kt_backend_name(b),
                  bytes);
        kt_dev_fill(ctx, p, 0xa5, bytes);
        kn_buf_free(ctx, p);
    }
    kn_ctx_destroy(ctx);
}

/* allocations of 4 MiB and more are zeroed, 64-byte aligned and usable; on
 * the CPU 2 MiB aligned, advised for huge pages and unmapped by free */
KT_BACKEND_TEST(kernels_buf, alloc_of_4_mib_is_huge_page_aligned, .timeout = 30)
{
    kn_ctx *ctx = kt_open(b, 2);
    static const size_t sizes[] = {4 * MIB, 4 * MIB + 1, 9 * MIB + 4096 + 3};
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        void *p = NULL;
        KT_OK(kn_buf_alloc(ctx, sizes[i], &p));
        cr_assert_eq((uintptr_t)p % 64, 0);
        cr_assert(dev_zeroed(ctx, p, sizes[i]), "%s: %zu bytes not zeroed", kt_backend_name(b),
                  sizes[i]);
        kt_dev_fill(ctx, p, 0x5a, sizes[i]);
        if (kn_ctx_host_memory(ctx)) {
            cr_assert_eq((uintptr_t)p % (2 * MIB), 0, "%s: %zu bytes at %p", kt_backend_name(b),
                         sizes[i], p);
            const int hg = advised_hugepage(p);
            cr_assert(hg != 0, "%s: %zu bytes at %p not advised MADV_HUGEPAGE",
                      kt_backend_name(b), sizes[i], p);
            /* the last byte, and the page below (its header) are mapped */
            cr_assert_eq(((unsigned char *)p)[sizes[i] - 1], 0x5a);
            const long pg = sysconf(_SC_PAGESIZE);
            char *head = (char *)p - pg;
            char *last = (char *)p + (sizes[i] - 1) / (size_t)pg * (size_t)pg;
            cr_assert_eq(msync(head, (size_t)pg, MS_ASYNC), 0);
            kn_buf_free(ctx, p);
            /* msync fails with ENOMEM on unmapped memory: both ends went back */
            cr_assert_eq(msync(head, (size_t)pg, MS_ASYNC), -1, "the header page stayed mapped");
            cr_assert_eq(msync(last, (size_t)pg, MS_ASYNC), -1, "the last page stayed mapped");
        } else {
            kn_buf_free(ctx, p);
        }
    }
    kn_ctx_destroy(ctx);
}

/* bytes survive upload -> copy -> download, at offsets and odd lengths */
KT_BACKEND_TEST(kernels_buf, upload_copy_download_round_trip)
{
    kn_ctx *ctx = kt_open(b, 2);
    enum { N = 10007 };
    unsigned char src[N], dst[N];
    for (int i = 0; i < N; i++)
        src[i] = (unsigned char)kt_rnd();
    unsigned char *a = kt_dev(ctx, N), *c = kt_dev(ctx, N + 64);
    KT_OK(kn_buf_upload(ctx, a, src, N));
    KT_OK(kn_buf_copy(ctx, c + 3, a, N));
    KT_OK(kn_sync(ctx));
    memset(dst, 0, N);
    KT_OK(kn_buf_download(ctx, dst, c + 3, N));
    cr_assert_arr_eq(dst, src, N);
    /* part of a buffer, between two buffers' interiors */
    KT_OK(kn_buf_copy(ctx, a + 100, c + 3 + 5000, 17));
    KT_OK(kn_buf_download(ctx, dst, a + 100, 17));
    cr_assert_arr_eq(dst, src + 5000, 17);
    kn_buf_free(ctx, a);
    kn_buf_free(ctx, c);
    kn_ctx_destroy(ctx);
}

/* every CPU backend's memory is host memory and kn_sync succeeds */
KT_BACKEND_TEST(kernels_buf, cpu_memory_is_host_memory)
{
    kn_ctx *ctx = kt_open(b, 1);
    cr_assert_eq(kn_ctx_host_memory(ctx), 1, "%s", kt_backend_name(b));
    KT_OK(kn_sync(ctx));
    kn_ctx_destroy(ctx);
}

/* bytes == 0, NULL out/ctx give -EINVAL (and *out NULL); NULL pointers
 * with n > 0 and overlapping copies give -EINVAL and move nothing; n == 0
 * is a no-op even with NULL pointers; free(NULL) is a no-op */
KT_BACKEND_TEST(kernels_buf, calls_reject_invalid_arguments)
{
    kn_ctx *ctx = kt_open(b, 2);
    void *p = (void *)1;
    cr_assert_eq(kn_buf_alloc(ctx, 0, &p), -EINVAL);
    cr_assert_null(p, "*out must be NULL on error");
    p = (void *)1;
    cr_assert_eq(kn_buf_alloc(NULL, 64, &p), -EINVAL);
    cr_assert_null(p);
    cr_assert_eq(kn_buf_alloc(ctx, 64, NULL), -EINVAL);
    kn_buf_free(ctx, NULL);
    cr_assert_eq(kn_sync(NULL), -EINVAL);

    unsigned char host[64];
    unsigned char *d = kt_dev(ctx, 128);
    memset(host, 0x11, sizeof(host));
    cr_assert_eq(kn_buf_upload(ctx, NULL, host, 8), -EINVAL);
    cr_assert_eq(kn_buf_upload(ctx, d, NULL, 8), -EINVAL);
    cr_assert_eq(kn_buf_upload(NULL, d, host, 8), -EINVAL);
    cr_assert_eq(kn_buf_download(ctx, NULL, d, 8), -EINVAL);
    cr_assert_eq(kn_buf_download(ctx, host, NULL, 8), -EINVAL);
    cr_assert_eq(kn_buf_download(NULL, host, d, 8), -EINVAL);
    cr_assert_eq(kn_buf_copy(ctx, NULL, d, 8), -EINVAL);
    cr_assert_eq(kn_buf_copy(ctx, d, NULL, 8), -EINVAL);
    cr_assert_eq(kn_buf_copy(NULL, d + 64, d, 8), -EINVAL);
    cr_assert_eq(kn_buf_copy(ctx, d + 4, d, 8), -EINVAL, "overlap, dst above src");
    cr_assert_eq(kn_buf_copy(ctx, d, d + 7, 8), -EINVAL, "overlap, dst below src");
    cr_assert_eq(kn_buf_copy(ctx, d, d, 8), -EINVAL, "same region");
    KT_OK(kn_buf_upload(ctx, NULL, NULL, 0));
    KT_OK(kn_buf_download(ctx, NULL, NULL, 0));
    KT_OK(kn_buf_copy(ctx, NULL, NULL, 0));
    KT_OK(kn_buf_copy(ctx, d + 8, d, 8)); /* adjacent is not overlapping */
    unsigned char got[128];
    KT_OK(kn_buf_download(ctx, got, d, sizeof(got)));
    for (int i = 0; i < 128; i++)
        cr_assert_eq(got[i], 0xff, "%s: a rejected call wrote byte %d", kt_backend_name(b), i);
    KT_OK(kn_buf_download(ctx, host, d, 8));
    for (int i = 0; i < 8; i++)
        cr_assert_eq(host[i], 0xff);
    cr_assert_eq(host[8], 0x11, "a download wrote past its length");
    kn_buf_free(ctx, d);
    kn_ctx_destroy(ctx);
}
