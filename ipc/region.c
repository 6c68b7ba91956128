/* Sealed memfd regions: one per client session (and per worker channel).
 *
 * The creator (gorgond) sizes, maps, formats and seals the memfd, then keeps a
 * private copy of the layout that it trusts. The mapper (client) trusts
 * nothing: it checks the seals first (an fd that can still shrink could
 * SIGBUS us later), then copies the header out once and validates that copy
 * against the fd's real size with overflow-checked 64-bit arithmetic. */
#include <errno.h>
#include <fcntl.h>
#include <numa.h>
#include <numaif.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/common.h"
#include "ipc/ipc.h"
#include "ipc/ipc_int.h"

#define IPC_HUGE_BYTES (2u << 20)
#define IPC_PAGE_BYTES 4096u
#define IPC_REQUIRED_SEALS (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)

#ifndef MFD_HUGE_2MB
#define MFD_HUGE_2MB (21u << 26)
#endif

/* Compute the layout for cfg into *h (all but magic/version/session).
 * Returns the unrounded byte count, or 0 when cfg is invalid. */
static uint64_t region_layout(const ipc_region_cfg *cfg, struct ipc_region_hdr *h)
{
    if (!cfg || !ipc_ring_entries_ok(cfg->sq_entries) || !ipc_ring_entries_ok(cfg->cq_entries) ||
        cfg->n_slots > IPC_MAX_SLOTS || cfg->slot_in_bytes > IPC_SLOT_MAX_BYTES ||
        cfg->slot_out_bytes > IPC_SLOT_MAX_BYTES)
        return 0;
    memset(h, 0, sizeof(*h));
    h->sq_entries = cfg->sq_entries;
    h->cq_entries = cfg->cq_entries;
    h->n_slots = cfg->n_slots;
    /* <= 64 MiB each: the round-up cannot overflow u32 */
    h->slot_in_bytes = (uint32_t)ipc_align_up(cfg->slot_in_bytes, IPC_CACHELINE);
    h->slot_out_bytes = (uint32_t)ipc_align_up(cfg->slot_out_bytes, IPC_CACHELINE);
    h->sq_off = IPC_HDR_BYTES;
    h->cq_off = h->sq_off + sizeof(struct ipc_ring_shared) + (uint64_t)h->sq_entries * IPC_DESC_SIZE;
    h->slots_off = h->cq_off + sizeof(struct ipc_ring_shared) + (uint64_t)h->cq_entries * IPC_DESC_SIZE;
    h->slot_stride = sizeof(struct ipc_slot_hdr) + (uint64_t)h->slot_in_bytes + h->slot_out_bytes;
    /* bounded by the limits above: 4096 slots x (64 + 128 MiB) < 2^40 */
    return h->slots_off + (uint64_t)h->n_slots * h->slot_stride;
}

size_t ipc_region_bytes(const ipc_region_cfg *cfg)
{
    struct ipc_region_hdr h;
    uint64_t n = region_layout(cfg, &h);
    if (n == 0)
        return 0;
    return (size_t)ipc_align_up(n, cfg->hugepages ? IPC_HUGE_BYTES : IPC_PAGE_BYTES);
}

static void region_bind_numa(void *base, size_t size, int node)
{
    if (numa_available() < 0) {
        CM_LOG_INFO(IPC_TAG, "region: NUMA not available, node %d binding skipped", node);
        return;
    }
    int max = numa_max_node();
    if (node > max) {
        CM_LOG_WARN(IPC_TAG, "region: NUMA node %d > max node %d, binding skipped", node, max);
        return;
    }
    unsigned long mask[16] = {0};
    const size_t bits = sizeof(unsigned long) * 8;
    if ((size_t)node >= bits * CM_ARRAY_LEN(mask)) {
        CM_LOG_WARN(IPC_TAG, "region: NUMA node %d too large, binding skipped", node);
        return;
    }
    mask[(size_t)node / bits] |= 1ul << ((size_t)node % bits);
    if (mbind(base, size, MPOL_BIND, mask, bits * CM_ARRAY_LEN(mask), 0) != 0)
        CM_LOG_WARN(IPC_TAG, "region: mbind to NUMA node %d failed: %s, continuing unbound", node,
                    strerror(errno));
}

/* One attempt with or without hugepages. On error nothing is left open. */
static int region_try(ipc_region *r, const ipc_region_cfg *cfg, const struct ipc_region_hdr *lay,
                      uint64_t raw, bool huge)
{
    uint64_t size = ipc_align_up(raw, huge ? IPC_HUGE_BYTES : IPC_PAGE_BYTES);
    unsigned flags = MFD_CLOEXEC | MFD_ALLOW_SEALING | (huge ? MFD_HUGETLB | MFD_HUGE_2MB : 0);
    int fd = memfd_create(cfg->name && cfg->name[0] ? cfg->name : "gorgon-region", flags);
    if (fd < 0)
        return cm_neg_errno();
    int rc;
    void *base = MAP_FAILED;
    if (ftruncate(fd, (off_t)size) != 0) {
        rc = cm_neg_errno();
        goto fail;
    }
    base = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        rc = cm_neg_errno();
        goto fail;
    }
    if (cfg->numa_node >= 0)
        region_bind_numa(base, (size_t)size, cfg->numa_node);
    /* Fault the header and both rings in now (after mbind, so on the right
     * node): the first push must not pay for a page fault. Slots stay lazy,
     * they can be large and mostly unused. (hugetlb pool exhaustion already
     * failed the mmap: it reserves at map time.) Old kernels lack the advice. */
    size_t hot = (size_t)ipc_align_up(lay->slots_off, huge ? IPC_HUGE_BYTES : IPC_PAGE_BYTES);
    if (hot > size)
        hot = (size_t)size;
    if (madvise(base, hot, MADV_POPULATE_WRITE) != 0 && errno != EINVAL) {
        rc = cm_neg_errno();
        goto fail;
    }

    struct ipc_region_hdr *h = base;
    *h = *lay;
    h->magic = IPC_MAGIC;
    h->abi_version = IPC_ABI_VERSION;
    h->region_bytes = size;
    h->session_id = cfg->session_id;
    ipc_ring_format((struct ipc_ring_shared *)((uint8_t *)base + h->sq_off));
    ipc_ring_format((struct ipc_ring_shared *)((uint8_t *)base + h->cq_off));

    if (fcntl(fd, F_ADD_SEALS, IPC_REQUIRED_SEALS) != 0) {
        rc = cm_neg_errno();
        goto fail;
    }
    r->fd = fd;
    r->base = base;
    r->size = (size_t)size;
    r->layout = *h;
    r->hugepages = huge;
    return 0;
fail:
    if (base != MAP_FAILED)
        munmap(base, (size_t)size);
    close(fd);
    return rc;
}

int ipc_region_create(ipc_region *r, const ipc_region_cfg *cfg)
{
    if (!r)
        return -EINVAL;
    memset(r, 0, sizeof(*r));
    r->fd = -1;
    struct ipc_region_hdr lay;
    uint64_t raw = region_layout(cfg, &lay);
    if (raw == 0) {
        CM_LOG_ERROR(IPC_TAG, "region: invalid config (entries must be powers of two in [%u, %u], "
                              "n_slots <= %u, slot buffers <= %u bytes)",
                     IPC_RING_MIN_ENTRIES, IPC_RING_MAX_ENTRIES, IPC_MAX_SLOTS, IPC_SLOT_MAX_BYTES);
        return -EINVAL;
    }
    if (raw > SIZE_MAX / 2)
        return -EINVAL;
    if (cfg->hugepages) {
        int rc = region_try(r, cfg, &lay, raw, true);
        if (rc == 0)
            return 0;
        CM_LOG_INFO(IPC_TAG, "region: hugepages refused (%s), using normal pages", cm_strerror(rc));
    }
    int rc = region_try(r, cfg, &lay, raw, false);
    if (rc < 0)
        CM_LOG_ERROR(IPC_TAG, "region: create %llu bytes failed: %s", (unsigned long long)raw,
                     cm_strerror(rc));
    return rc;
}

/* Validate a header copy against the fd size. Returns 0 or -errno, *why set. */
static int region_check_hdr(const struct ipc_region_hdr *h, uint64_t fd_bytes, const char **why)
{
    uint64_t end, sq_end, cq_end, stride, slots_bytes;
    if (h->magic != IPC_MAGIC)
        return *why = "bad magic", -EPROTO;
    if (h->abi_version != IPC_ABI_VERSION)
        return *why = "unsupported abi_version", -EPROTONOSUPPORT;
    if (h->region_bytes != fd_bytes)
        return *why = "region_bytes differs from the memfd size", -EPROTO;
    if (!ipc_ring_entries_ok(h->sq_entries))
        return *why = "sq_entries not a power of two in range", -EPROTO;
    if (!ipc_ring_entries_ok(h->cq_entries))
        return *why = "cq_entries not a power of two in range", -EPROTO;
    if (h->n_slots > IPC_MAX_SLOTS)
        return *why = "n_slots too large", -EPROTO;
    if (h->slot_in_bytes > IPC_SLOT_MAX_BYTES || h->slot_in_bytes % IPC_CACHELINE)
        return *why = "slot_in_bytes too large or not a multiple of 64", -EPROTO;
    if (h->slot_out_bytes > IPC_SLOT_MAX_BYTES || h->slot_out_bytes % IPC_CACHELINE)
        return *why = "slot_out_bytes too large or not a multiple of 64", -EPROTO;
    if (h->sq_off < IPC_HDR_BYTES || h->sq_off % IPC_CACHELINE)
        return *why = "sq_off overlaps the header or is misaligned", -EPROTO;
    if (__builtin_add_overflow(h->sq_off,
                               sizeof(struct ipc_ring_shared) + (uint64_t)h->sq_entries * IPC_DESC_SIZE,
                               &sq_end))
        return *why = "sq_off overflows", -EPROTO;
    if (h->cq_off < sq_end || h->cq_off % IPC_CACHELINE)
        return *why = "cq_off overlaps the SQ or is misaligned", -EPROTO;
    if (__builtin_add_overflow(h->cq_off,
                               sizeof(struct ipc_ring_shared) + (uint64_t)h->cq_entries * IPC_DESC_SIZE,
                               &cq_end))
        return *why = "cq_off overflows", -EPROTO;
    if (h->slots_off < cq_end || h->slots_off % IPC_CACHELINE)
        return *why = "slots_off overlaps the CQ or is misaligned", -EPROTO;
    stride = sizeof(struct ipc_slot_hdr) + (uint64_t)h->slot_in_bytes + h->slot_out_bytes;
    if (h->slot_stride != stride)
        return *why = "slot_stride differs from 64 + slot_in_bytes + slot_out_bytes", -EPROTO;
    if (__builtin_mul_overflow(stride, (uint64_t)h->n_slots, &slots_bytes) ||
        __builtin_add_overflow(h->slots_off, slots_bytes, &end))
        return *why = "slots overflow", -EPROTO;
    if (end > fd_bytes || cq_end > fd_bytes)
        return *why = "layout extends beyond the memfd size", -EPROTO;
    return 0;
}

int ipc_region_map(ipc_region *r, int fd)
{
    if (!r || fd < 0)
        return -EINVAL;
    memset(r, 0, sizeof(*r));
    r->fd = -1;
    const char *why = NULL;
    int rc;
    struct stat st;
    if (fstat(fd, &st) != 0) {
        rc = cm_neg_errno();
        why = "fstat failed";
        goto fail;
    }
    int seals = fcntl(fd, F_GET_SEALS);
    if (seals < 0) {
        rc = -EPROTO;
        why = "not a sealable memfd";
        goto fail;
    }
    if ((seals & IPC_REQUIRED_SEALS) != IPC_REQUIRED_SEALS) {
        rc = -EPROTO;
        why = "memfd lacks F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL";
        goto fail;
    }
    if (!S_ISREG(st.st_mode) || st.st_size < (off_t)IPC_HDR_BYTES ||
        (uint64_t)st.st_size > SIZE_MAX / 2) {
        rc = -EPROTO;
        why = "memfd size smaller than the header or unmappable";
        goto fail;
    }
    size_t size = (size_t)st.st_size;
    void *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        rc = cm_neg_errno();
        why = "mmap failed";
        goto fail;
    }
    struct ipc_region_hdr h;
    memcpy(&h, base, sizeof(h)); /* one copy; only the copy is validated and used */
    rc = region_check_hdr(&h, (uint64_t)size, &why);
    if (rc < 0) {
        munmap(base, size);
        goto fail;
    }
    r->fd = fd;
    r->base = base;
    r->size = size;
    r->layout = h;
    r->hugepages = st.st_blksize >= (blksize_t)IPC_HUGE_BYTES; /* hugetlbfs reports the page size */
    return 0;
fail:
    CM_LOG_ERROR(IPC_TAG, "region: refusing fd %d: %s (%s)", fd, why, cm_strerror(rc));
    return rc;
}

void ipc_region_unmap(ipc_region *r)
{
    if (!r)
        return;
    if (r->base && r->size)
        munmap(r->base, r->size);
    /* a zeroed region has fd 0: only close what a create/map set up */
    if (r->base && r->fd >= 0)
        close(r->fd);
    r->base = NULL;
    r->size = 0;
    r->fd = -1;
}

static int region_ring(ipc_region *r, uint64_t off, uint32_t n, enum ipc_ring_role role, ipc_ring *out)
{
    if (!r || !r->base || !out)
        return -EINVAL;
    uint8_t *p = (uint8_t *)r->base + off;
    return ipc_ring_attach(out, (struct ipc_ring_shared *)p, p + sizeof(struct ipc_ring_shared), n, role);
}

int ipc_region_sq(ipc_region *r, enum ipc_ring_role role, ipc_ring *out)
{
    return region_ring(r, r ? r->layout.sq_off : 0, r ? r->layout.sq_entries : 0, role, out);
}

int ipc_region_cq(ipc_region *r, enum ipc_ring_role role, ipc_ring *out)
{
    return region_ring(r, r ? r->layout.cq_off : 0, r ? r->layout.cq_entries : 0, role, out);
}

struct ipc_slot_hdr *ipc_region_slot(ipc_region *r, uint32_t slot)
{
    if (!r || !r->base || slot >= r->layout.n_slots)
        return NULL;
    return (struct ipc_slot_hdr *)((uint8_t *)r->base + r->layout.slots_off +
                                   (uint64_t)slot * r->layout.slot_stride);
}

uint8_t *ipc_region_slot_in(ipc_region *r, uint32_t slot)
{
    struct ipc_slot_hdr *s = ipc_region_slot(r, slot);
    return s ? (uint8_t *)(s + 1) : NULL;
}

uint8_t *ipc_region_slot_out(ipc_region *r, uint32_t slot)
{
    struct ipc_slot_hdr *s = ipc_region_slot(r, slot);
    return s ? (uint8_t *)(s + 1) + r->layout.slot_in_bytes : NULL;
}
