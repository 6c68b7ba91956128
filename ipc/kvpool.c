/* The shared KV pool's control memfd and pool memfds: see ipc/ipc_kv.h. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/common.h"
#include "ipc/ipc_kv.h"

static uint64_t area_bytes(uint32_t max_blocks)
{
    return (sizeof(struct ipc_kv_area) + (uint64_t)max_blocks * sizeof(int32_t) + 63) & ~63ull;
}

int ipc_kv_ctl_create(ipc_kv_ctl *c, uint32_t n_blocks, uint32_t n_req, uint32_t max_blocks,
                      uint32_t n_groups)
{
    memset(c, 0, sizeof *c);
    c->fd = -1;
    if (!n_blocks || !n_req || !max_blocks || !n_groups)
        return -EINVAL;
    const uint64_t ab = area_bytes(max_blocks);
    const uint64_t owner_off = 128;
    const uint64_t out_off = (owner_off + (uint64_t)n_blocks * 4 + 63) & ~63ull;
    const uint64_t in_off = out_off + ab * n_req;
    const uint64_t total = in_off + ab * n_req * n_groups;
    int fd = memfd_create("gorgon-kv-ctl", MFD_CLOEXEC);
    if (fd < 0)
        return cm_neg_errno();
    void *base = MAP_FAILED;
    if (ftruncate(fd, (off_t)total) < 0 ||
        (base = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)) == MAP_FAILED) {
        int rc = cm_neg_errno();
        close(fd);
        return rc;
    }
    c->fd = fd;
    c->base = base;
    c->size = total;
    c->hdr = base;
    *c->hdr = (struct ipc_kv_hdr){.magic = IPC_KV_MAGIC, .version = IPC_KV_VERSION,
                                  .n_blocks = n_blocks, .n_req = n_req,
                                  .max_blocks = max_blocks, .n_groups = n_groups,
                                  .area_bytes = ab,
                                  .owner_off = owner_off, .out_off = out_off, .in_off = in_off,
                                  .total_bytes = total};
    c->owner = (uint32_t *)((char *)base + owner_off);
    return 0;
}

int ipc_kv_ctl_map(ipc_kv_ctl *c, int fd, char *why, size_t cap)
{
    memset(c, 0, sizeof *c);
    c->fd = -1;
    struct stat st;
    if (fstat(fd, &st) < 0)
        return snprintf(why, cap, "fstat: %s", strerror(errno)), cm_neg_errno();
    const size_t size = (size_t)st.st_size;
    if (size < sizeof(struct ipc_kv_hdr))
        return snprintf(why, cap, "control area of %zu bytes", size), -EPROTO;
    void *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED)
        return snprintf(why, cap, "mmap: %s", strerror(errno)), cm_neg_errno();
    struct ipc_kv_hdr h;
    memcpy(&h, base, sizeof h);
    const uint64_t ab = area_bytes(h.max_blocks);
    const bool ok = h.magic == IPC_KV_MAGIC && h.version == IPC_KV_VERSION && h.n_blocks &&
                    h.n_req && h.max_blocks && h.n_groups && h.area_bytes == ab &&
                    h.owner_off >= sizeof h &&
                    h.owner_off + (uint64_t)h.n_blocks * 4 <= h.out_off &&
                    h.out_off + ab * h.n_req <= h.in_off &&
                    h.in_off + ab * h.n_req * h.n_groups <= size &&
                    h.total_bytes == size && h.out_off % 64 == 0 && h.owner_off % 4 == 0;
    if (!ok) {
        munmap(base, size);
        return snprintf(why, cap, "control area header is not one of this version"), -EPROTO;
    }
    c->fd = fd;
    c->base = base;
    c->size = size;
    c->hdr = base;
    c->owner = (uint32_t *)((char *)base + h.owner_off);
    return 0;
}

void ipc_kv_ctl_unmap(ipc_kv_ctl *c)
{
    if (c->base)
        munmap(c->base, c->size);
    if (c->fd >= 0)
        close(c->fd);
    memset(c, 0, sizeof *c);
    c->fd = -1;
}

struct ipc_kv_area *ipc_kv_area(const ipc_kv_ctl *c, enum ipc_kv_dir dir, uint32_t group,
                                uint32_t req)
{
    const uint64_t off =
        dir == IPC_KV_OUT
            ? c->hdr->out_off + (uint64_t)req * c->hdr->area_bytes
            : c->hdr->in_off + ((uint64_t)group * c->hdr->n_req + req) * c->hdr->area_bytes;
    return (struct ipc_kv_area *)(void *)((char *)c->base + off);
}

int ipc_kv_pool_create(void)
{
    int fd = memfd_create("gorgon-kv-pool", MFD_CLOEXEC);
    return fd < 0 ? cm_neg_errno() : fd;
}

int ipc_kv_pool_map(int fd, size_t bytes, void **mem, char *why, size_t cap)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        return snprintf(why, cap, "fstat: %s", strerror(errno)), cm_neg_errno();
    /* Ranks of several groups may size an empty pool at once: to the same
     * size, which ftruncate makes idempotent. */
    if (st.st_size == 0 && ftruncate(fd, (off_t)bytes) < 0)
        return snprintf(why, cap, "sizing the pool to %zu bytes: %s", bytes, strerror(errno)),
               cm_neg_errno();
    if (st.st_size != 0 && (size_t)st.st_size != bytes)
        return snprintf(why, cap, "the shared KV pool has %lld bytes, this rank's cache needs "
                                  "%zu (groups of different models or TP degrees?)",
                        (long long)st.st_size, bytes),
               -EPROTO;
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        return snprintf(why, cap, "mmap of %zu bytes: %s", bytes, strerror(errno)),
               cm_neg_errno();
    *mem = p;
    return 0;
}
