/* Sealed memfd regions: create/map round trip, seals, tampered headers,
 * hugepage and NUMA fallbacks, slot views. */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <numa.h>
#include <numaif.h>
#include <sys/mman.h>
#include <unistd.h>

#include "common/common.h"
#include "ipc/ipc.h"
#include "tests/ipc/util/ipc_test_util.h"

static const ipc_region_cfg base_cfg = {.sq_entries = 64, .cq_entries = 128, .n_slots = 8,
                                        .slot_in_bytes = 1000, .slot_out_bytes = 4096,
                                        .session_id = 7, .numa_node = -1, .name = "test"};

Test(ipc_region, bytes_rejects_bad_config)
{
    ipc_region_cfg c = base_cfg;
    cr_expect_gt(ipc_region_bytes(&c), 0u);
    cr_expect_eq(ipc_region_bytes(&c) % 4096, 0u);
    c.sq_entries = 100;
    cr_expect_eq(ipc_region_bytes(&c), 0u, "sq_entries not a power of two");
    c = base_cfg;
    c.cq_entries = IPC_RING_MAX_ENTRIES * 2;
    cr_expect_eq(ipc_region_bytes(&c), 0u, "cq_entries too large");
    c = base_cfg;
    c.n_slots = IPC_MAX_SLOTS + 1;
    cr_expect_eq(ipc_region_bytes(&c), 0u, "too many slots");
    c = base_cfg;
    c.slot_out_bytes = IPC_SLOT_MAX_BYTES + 1;
    cr_expect_eq(ipc_region_bytes(&c), 0u, "slot too large");
    cr_expect_eq(ipc_region_bytes(NULL), 0u);
    ipc_region r;
    c = base_cfg;
    c.sq_entries = 3;
    cr_expect_eq(ipc_region_create(&r, &c), -EINVAL);
}

Test(ipc_region, create_then_map_shares_rings_and_slots)
{
    ipc_region srv, cli;
    cr_assert_eq(ipc_region_create(&srv, &base_cfg), 0);
    cr_expect_eq(srv.layout.slot_in_bytes, 1024u, "rounded up to 64");
    cr_expect_eq(srv.layout.session_id, 7u);
    cr_expect_eq(srv.size, ipc_region_bytes(&base_cfg));
    int fd = dup(srv.fd);
    cr_assert_geq(fd, 0);
    cr_assert_eq(ipc_region_map(&cli, fd), 0);
    cr_expect_eq(memcmp(&cli.layout, &srv.layout, sizeof(srv.layout)), 0);
    cr_expect_neq(cli.base, srv.base, "two separate mappings");

    ipc_ring sq_p, sq_c, cq_p, cq_c;
    cr_assert_eq(ipc_region_sq(&cli, IPC_RING_PRODUCER, &sq_p), 0);
    cr_assert_eq(ipc_region_sq(&srv, IPC_RING_CONSUMER, &sq_c), 0);
    cr_assert_eq(ipc_region_cq(&srv, IPC_RING_PRODUCER, &cq_p), 0);
    cr_assert_eq(ipc_region_cq(&cli, IPC_RING_CONSUMER, &cq_c), 0);
    cr_expect_eq(sq_c.mask, 63u);
    cr_expect_eq(cq_c.mask, 127u);
    struct ipc_sqe s = {.opcode = IPC_OP_PING, .slot = 3, .user_data = 42};
    struct ipc_sqe so;
    cr_assert_eq(ipc_ring_push(&sq_p, &s), 0);
    cr_assert_eq(ipc_ring_pop(&sq_c, &so), 1);
    cr_expect_eq(so.user_data, 42u);
    struct ipc_cqe q = {.opcode = IPC_OP_PING, .result = -5, .user_data = 43};
    struct ipc_cqe qo;
    cr_assert_eq(ipc_ring_push(&cq_p, &q), 0);
    cr_assert_eq(ipc_ring_pop(&cq_c, &qo), 1);
    cr_expect_eq(qo.result, -5);

    /* slots: in and out buffers do not overlap and are shared */
    for (uint32_t i = 0; i < 8; i++) {
        uint8_t *in = ipc_region_slot_in(&cli, i), *out = ipc_region_slot_out(&cli, i);
        cr_assert_not_null(in);
        cr_expect_eq(out - in, 1024);
        cr_expect_leq((size_t)(out + 4096 - (uint8_t *)cli.base), cli.size);
        memset(in, (int)i, 1024);
    }
    cr_expect_eq(ipc_region_slot_in(&srv, 5)[1023], 5);
    cr_expect_null(ipc_region_slot(&cli, 8));
    cr_expect_null(ipc_region_slot_in(&cli, UINT32_MAX));
    cr_expect_null(ipc_region_slot_out(&cli, 8));
    ipc_region_unmap(&cli);
    ipc_region_unmap(&srv);
    ipc_region_unmap(&srv); /* twice: no-op */
    ipc_region z;
    memset(&z, 0, sizeof(z));
    ipc_region_unmap(&z);
    cr_expect_neq(fcntl(0, F_GETFD), -1, "unmapping a zeroed region must not close fd 0");
}

Test(ipc_region, sealed_region_cannot_change_size_or_seals)
{
    ipc_region r;
    cr_assert_eq(ipc_region_create(&r, &base_cfg), 0);
    int seals = fcntl(r.fd, F_GET_SEALS);
    cr_expect_eq(seals & (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL),
                 F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
    errno = 0;
    cr_expect_eq(ftruncate(r.fd, (off_t)r.size / 2), -1);
    cr_expect_eq(errno, EPERM, "shrink: %s", strerror(errno));
    errno = 0;
    cr_expect_eq(ftruncate(r.fd, (off_t)r.size * 2), -1);
    cr_expect_eq(errno, EPERM, "grow: %s", strerror(errno));
    errno = 0;
    cr_expect_eq(fcntl(r.fd, F_ADD_SEALS, F_SEAL_WRITE), -1, "F_SEAL_SEAL forbids new seals");
    cr_expect_eq(errno, EPERM);
    ipc_region_unmap(&r);
}

/* Build a memfd holding `hdr` (copied from a real region) with optional
 * seals; returns the fd. */
static int fake_region(const ipc_region *src, const struct ipc_region_hdr *hdr, size_t size,
                       int seals)
{
    int fd = memfd_create("fake", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    cr_assert_geq(fd, 0);
    cr_assert_eq(ftruncate(fd, (off_t)size), 0);
    size_t copy = size < src->size ? size : src->size;
    cr_assert_eq(pwrite(fd, src->base, copy, 0), (ssize_t)copy);
    if (size >= sizeof(*hdr))
        cr_assert_eq(pwrite(fd, hdr, sizeof(*hdr), 0), (ssize_t)sizeof(*hdr));
    if (seals)
        cr_assert_eq(fcntl(fd, F_ADD_SEALS, seals), 0);
    return fd;
}

#define ALL_SEALS (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)

static void expect_refused(const ipc_region *src, struct ipc_region_hdr h, size_t size, int seals,
                           int want, const char *what)
{
    int fd = fake_region(src, &h, size, seals);
    ipc_region m;
    int rc = ipc_region_map(&m, fd);
    cr_expect_eq(rc, want, "%s: got %d want %d", what, rc, want);
    if (rc == 0)
        ipc_region_unmap(&m);
    else
        close(fd);
}

Test(ipc_region, map_rejects_tampered_header)
{
    ipc_region r;
    cr_assert_eq(ipc_region_create(&r, &base_cfg), 0);
    const struct ipc_region_hdr good = r.layout;
    struct ipc_region_hdr h;

    /* control: an honest copy is accepted */
    expect_refused(&r, good, r.size, ALL_SEALS, 0, "honest copy");

    h = good; h.magic ^= 1;
    expect_refused(&r, h, r.size, ALL_SEALS, -EPROTO, "bad magic");
    h = good; h.abi_version = IPC_ABI_VERSION + 1;
    expect_refused(&r, h, r.size, ALL_SEALS, -EPROTONOSUPPORT, "abi version");
    h = good; h.region_bytes = r.size * 4;
    expect_refused(&r, h, r.size, ALL_SEALS, -EPROTO, "region_bytes beyond the fd");
    h = good;
    expect_refused(&r, h, r.size - 4096, ALL_SEALS, -EPROTO, "fd shorter than region_bytes");
    h = good; h.region_bytes = r.size - 4096;
    expect_refused(&r, h, r.size - 4096, ALL_SEALS, -EPROTO, "slots beyond the fd");
    h = good; h.sq_entries = 48;
    expect_refused(&r, h, r.size, ALL_SEALS, -EPROTO, "sq_entries not a power of two");
    h = good; h.cq_entries = 1u << 30;
    expect_refused(&r, h, r.size, ALL_SEALS, -EPROTO, "cq_entries huge");
    h = good; h.n_slots = IPC_MAX_SLOTS + 1;
    expect_refused(&r, h, r.size, ALL_SEALS, -EPROTO, "n_slots");
    h = good; h.slot_in_bytes = 100;
    expect_refused(&r, h, r.size, ALL_SEALS, -EPROTO, "slot_in_bytes not a multiple of 64");
    h = good; h.slot_stride += 64;
    expect_refused(&r, h, r.size, ALL_SEALS, -EPROTO, "slot_stride inconsistent");
    h = good; h.sq_off = 0;
    expect_refused(&r, h, r.size, ALL_SEALS, -EPROTO, "sq over the header");
    h = good; h.cq_off = h.sq_off + 64;
    expect_refused(&r, h, r.size, ALL_SEALS, -EPROTO, "cq overlapping sq");
    h = good; h.slots_off = UINT64_MAX - 63;
    expect_refused(&r, h, r.size, ALL_SEALS, -EPROTO, "slots_off overflow");
    h = good; h.cq_off = UINT64_MAX - 63; h.slots_off = UINT64_MAX - 63;
    expect_refused(&r, h, r.size, ALL_SEALS, -EPROTO, "cq_off overflow");
    h = good; h.sq_off = 4096 + 8;
    expect_refused(&r, h, r.size, ALL_SEALS, -EPROTO, "misaligned sq_off");

    /* seals */
    expect_refused(&r, good, r.size, 0, -EPROTO, "unsealed memfd");
    expect_refused(&r, good, r.size, F_SEAL_GROW | F_SEAL_SEAL, -EPROTO, "memfd that can shrink");
    expect_refused(&r, good, r.size, F_SEAL_SHRINK | F_SEAL_GROW, -EPROTO, "seals not sealed");
    expect_refused(&r, good, 100, ALL_SEALS, -EPROTO, "smaller than a header");

    /* not a memfd at all */
    char path[] = "/tmp/gorgon-region-XXXXXX";
    int tfd = mkstemp(path);
    cr_assert_geq(tfd, 0);
    unlink(path);
    cr_assert_eq(ftruncate(tfd, (off_t)r.size), 0);
    ipc_region m;
    cr_expect_eq(ipc_region_map(&m, tfd), -EPROTO, "regular file");
    close(tfd);
    cr_expect_eq(ipc_region_map(&m, -1), -EINVAL);
    ipc_region_unmap(&r);
}

/* ---- fallbacks: hugepages and NUMA ----------------------------------------- */

/* Log lines of the test process, captured by a cm_log sink ("tag: msg\n"). */
static char log_text[16384];
static size_t log_len;

static void capture(void *ctx, enum cm_log_level lvl, const char *tag, const char *msg)
{
    (void)ctx, (void)lvl;
    int n = snprintf(log_text + log_len, sizeof(log_text) - log_len, "%s: %s\n", tag, msg);
    if (n > 0)
        log_len += (size_t)n < sizeof(log_text) - log_len ? (size_t)n : sizeof(log_text) - log_len - 1;
}

static void capture_logs(void)
{
    log_len = 0;
    log_text[0] = '\0';
    cm_log_set_level(CM_LOG_DEBUG);
    cm_log_set_sink(capture, NULL);
}

/* Can this process get one 2 MiB huge page right now? Asked of the kernel
 * directly, the way the region code does not (it is what is under test). */
static bool hugepage_available(void)
{
    int fd = memfd_create("probe", MFD_CLOEXEC | MFD_HUGETLB | (21u << 26) /* MFD_HUGE_2MB */);
    if (fd < 0)
        return false;
    bool ok = false;
    if (ftruncate(fd, 2 << 20) == 0) {
        void *p = mmap(NULL, 2 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (p != MAP_FAILED) {
            ok = true;
            munmap(p, 2 << 20);
        }
    }
    close(fd);
    return ok;
}

/* The region works end to end through a second mapping of its fd: every
 * slot's input and output carry distinct bytes across, and one descriptor
 * crosses each ring. */
static void expect_usable(ipc_region *r)
{
    int fd = dup(r->fd);
    cr_assert_geq(fd, 0);
    ipc_region m;
    cr_assert_eq(ipc_region_map(&m, fd), 0);
    cr_assert_eq(m.size, r->size);
    for (uint32_t i = 0; i < r->layout.n_slots; i++) {
        memset(ipc_region_slot_in(r, i), 0x10 + (int)i, r->layout.slot_in_bytes);
        memset(ipc_region_slot_out(r, i), 0x80 + (int)i, r->layout.slot_out_bytes);
    }
    for (uint32_t i = 0; i < m.layout.n_slots; i++) {
        const uint8_t *in = ipc_region_slot_in(&m, i), *out = ipc_region_slot_out(&m, i);
        for (uint32_t b = 0; b < m.layout.slot_in_bytes; b++)
            cr_assert_eq(in[b], 0x10 + i, "slot %u input byte %u", i, b);
        for (uint32_t b = 0; b < m.layout.slot_out_bytes; b++)
            cr_assert_eq(out[b], 0x80 + i, "slot %u output byte %u", i, b);
    }
    ((volatile uint8_t *)m.base)[m.size - 1] = 0x5a; /* the last byte is mapped */
    cr_assert_eq(((volatile uint8_t *)r->base)[r->size - 1], 0x5a);
    ipc_ring p, c;
    cr_assert_eq(ipc_region_sq(&m, IPC_RING_PRODUCER, &p), 0);
    cr_assert_eq(ipc_region_sq(r, IPC_RING_CONSUMER, &c), 0);
    struct ipc_sqe s = {.opcode = IPC_OP_PING, .user_data = 77}, so;
    cr_assert_eq(ipc_ring_push(&p, &s), 0);
    cr_assert_eq(ipc_ring_pop(&c, &so), 1);
    cr_assert_eq(so.user_data, 77u);
    cr_assert_eq(ipc_region_cq(r, IPC_RING_PRODUCER, &p), 0);
    cr_assert_eq(ipc_region_cq(&m, IPC_RING_CONSUMER, &c), 0);
    struct ipc_cqe q = {.opcode = IPC_OP_PING, .user_data = 78}, qo;
    cr_assert_eq(ipc_ring_push(&p, &q), 0);
    cr_assert_eq(ipc_ring_pop(&c, &qo), 1);
    cr_assert_eq(qo.user_data, 78u);
    cr_assert_eq(m.hugepages, r->hugepages, "the mapper sees the same page kind");
    ipc_region_unmap(&m);
}

/* Asking for hugepages never fails a region: it gets them when the kernel
 * has one (a 2 MiB multiple), or falls back to normal pages and says so in
 * the log. Which branch runs depends on the machine (vm.nr_hugepages); each
 * is checked against what the kernel says independently. */
Test(ipc_region, hugepages_fall_back_cleanly)
{
    ipc_region_cfg c = base_cfg;
    c.hugepages = true;
    ipc_region r;
    capture_logs();
    cr_assert_eq(ipc_region_create(&r, &c), 0, "hugepages must fall back, never fail");
    bool refused = strstr(log_text, "hugepages refused") != NULL;
    if (r.hugepages) {
        cr_log_info("hugepages obtained");
        cr_expect_eq(r.size % (2u << 20), 0u, "hugetlb size is a 2 MiB multiple");
        cr_expect(!refused, "obtained, yet logged as refused: %s", log_text);
    } else {
        cr_log_info("hugepages refused (fallback)");
        cr_expect(refused, "fell back to normal pages without saying so; log: '%s'", log_text);
        cr_expect_eq(r.size, ipc_region_bytes(&(ipc_region_cfg){.sq_entries = c.sq_entries,
                                                              .cq_entries = c.cq_entries,
                                                              .n_slots = c.n_slots,
                                                              .slot_in_bytes = c.slot_in_bytes,
                                                              .slot_out_bytes =
                                                                  c.slot_out_bytes}),
                     "the fallback has the normal-page size");
        cr_expect(!hugepage_available(),
                  "fell back although the kernel hands out a huge page; log: %s", log_text);
    }
    expect_usable(&r);
    ipc_region_unmap(&r);
}

/* NUMA binding is best effort: a node that exists gets the region's pages
 * bound to it (the kernel's policy for the range says so), or the failure
 * is logged; a node that does not exist is logged and the region is made
 * unbound. Either way the region works. */
Test(ipc_region, numa_binding_logs_and_continues)
{
    ipc_region_cfg c = base_cfg;
    ipc_region r;
    capture_logs();
    c.numa_node = 0;
    cr_assert_eq(ipc_region_create(&r, &c), 0, "node 0");
    if (numa_available() < 0) {
        cr_expect(strstr(log_text, "NUMA not available"), "log: '%s'", log_text);
    } else if (strstr(log_text, "mbind to NUMA node 0 failed")) {
        cr_log_info("mbind refused here: %s", log_text);
    } else {
        int mode = -1;
        unsigned long mask[16] = {0};
        cr_assert_eq(get_mempolicy(&mode, mask, sizeof(mask) * 8, r.base, MPOL_F_ADDR), 0,
                     "get_mempolicy: %s", strerror(errno));
        cr_log_info("node 0: policy %d, nodes %#lx", mode, mask[0]);
        cr_expect_eq(mode, MPOL_BIND, "policy %d, log: '%s'", mode, log_text);
        cr_expect_eq(mask[0], 1ul, "bound to nodes %#lx, not node 0", mask[0]);
    }
    expect_usable(&r);
    ipc_region_unmap(&r);

    capture_logs();
    c.numa_node = 4000;
    cr_assert_eq(ipc_region_create(&r, &c), 0, "node that does not exist: logged, unbound");
    cr_expect(strstr(log_text, "NUMA") && strstr(log_text, "4000") &&
                  strstr(log_text, "skipped"),
              "no log line about node 4000's binding: '%s'", log_text);
    int mode = -1;
    unsigned long mask[16] = {0};
    cr_assert_eq(get_mempolicy(&mode, mask, sizeof(mask) * 8, r.base, MPOL_F_ADDR), 0);
    cr_expect_eq(mode, MPOL_DEFAULT, "left unbound");
    expect_usable(&r);
    ipc_region_unmap(&r);
    cm_log_set_sink(NULL, NULL);
}
