/* libFuzzer target: everything a peer hands gorgon before any request is
 * trusted. The first input byte picks the validator, the rest is the
 * peer's bytes:
 *
 *   0  hello       (gorgond's side)   ipc_ctl_recv_hello over a real socket
 *   1  welcome     (client's side)    ipc_ctl_client_handshake_wake, with 0..3
 *                                     fds riding on the welcome
 *   2  region      (client's side)    ipc_region_map of a memfd holding the
 *                                     bytes, with chosen size and seals
 *   3  descriptor  (gorgond's side)   ipc_sqe_validate against a layout
 *   4  ring        (either side)      ipc_ring_push/pop over peer-written
 *                                     head and tail indices
 *
 * Besides "no crash, no sanitizer report", every acceptance is re-checked
 * here independently (abort() when a validator said yes to something
 * inconsistent), and received fds must neither leak nor be swapped.
 * Encodings of valid messages for the seed corpus: tests/fuzz/corpus_handshake/
 * (made by tests/fuzz/mkseeds_handshake.py).
 *
 *   clang -fsanitize=fuzzer,address,undefined -I. -D_GNU_SOURCE tests/fuzz/fuzz_handshake.c \
 *       ipc/ctl.c ipc/region.c ipc/ring.c ipc/validate.c common/cm_log.c -lnuma
 */
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/common.h"
#include "ipc/ipc.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond)                                                            \
    do {                                                                       \
        if (!(cond))                                                           \
            abort();                                                           \
    } while (0)

/* ---- fd accounting: nothing a validator received may stay open ---------- */

/* (before each input: libFuzzer itself opens files between inputs) */
#define FD_SCAN 128
static bool fd_open_before[FD_SCAN];

static void fds_snapshot(void)
{
    for (int fd = 0; fd < FD_SCAN; fd++)
        fd_open_before[fd] = fcntl(fd, F_GETFD) >= 0;
}

static void fds_check(void)
{
    for (int fd = 0; fd < FD_SCAN; fd++)
        if (!fd_open_before[fd] && fcntl(fd, F_GETFD) >= 0)
            abort(); /* leaked */
}

static void quiet(void *ctx, enum cm_log_level lvl, const char *tag, const char *msg)
{
    (void)ctx, (void)lvl, (void)tag, (void)msg;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    cm_log_set_sink(quiet, NULL); /* every refusal logs a line */
    return 0;
}

/* Peer messages: one SOCK_SEQPACKET record each, as on the control socket. */
static bool seqpair(int sv[2])
{
    return socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) == 0;
}

static bool send_with_fds(int sock, const void *buf, size_t len, const int *fds, size_t n_fds)
{
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
    union {
        char buf[CMSG_SPACE(sizeof(int) * 4)];
        struct cmsghdr align;
    } ctrl;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (n_fds) {
        memset(&ctrl, 0, sizeof(ctrl));
        msg.msg_control = ctrl.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * n_fds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * n_fds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * n_fds);
    }
    return sendmsg(sock, &msg, MSG_NOSIGNAL) == (ssize_t)len;
}

static bool same_file(int a, int b)
{
    struct stat x, y;
    return fstat(a, &x) == 0 && fstat(b, &y) == 0 && x.st_dev == y.st_dev && x.st_ino == y.st_ino;
}

/* ---- 0: hello ------------------------------------------------------------- */

static void fuzz_hello(const uint8_t *data, size_t size)
{
    int sv[2];
    if (size > 64 || !seqpair(sv))
        return;
    int fd = -1;
    /* a hello with an fd attached: the fd must be dropped, never kept */
    if (size && (data[0] & 1))
        fd = memfd_create("hello-fd", MFD_CLOEXEC);
    bool sent = send_with_fds(sv[1], data, size, &fd, fd >= 0);
    if (fd >= 0)
        close(fd);
    shutdown(sv[1], SHUT_WR); /* nothing more: a recv can never block */
    if (sent) {
        struct ipc_hello h;
        memset(&h, 0xa5, sizeof(h));
        int rc = ipc_ctl_recv_hello(sv[0], &h);
        if (rc == 0) {
            struct ipc_hello want = {.magic = IPC_MAGIC, .abi_version = IPC_ABI_VERSION};
            CHECK(size == sizeof(h) && memcmp(data, &want, sizeof(want)) == 0);
            CHECK(memcmp(&h, &want, sizeof(want)) == 0);
        } else {
            CHECK(rc == -EPROTO || rc == -EPROTONOSUPPORT || rc == -ECONNRESET);
        }
    }
    close(sv[0]);
    close(sv[1]);
}

/* ---- 1: welcome ----------------------------------------------------------- */

static void fuzz_welcome(const uint8_t *data, size_t size)
{
    if (size < 1 || size > 1 + 128)
        return;
    size_t n_fds = data[0] & 3;
    data++, size--;
    int sv[2];
    if (!seqpair(sv))
        return;
    int fds[3] = {-1, -1, -1};
    for (size_t i = 0; i < n_fds; i++)
        fds[i] = memfd_create("welcome-fd", MFD_CLOEXEC);
    for (size_t i = 0; i < n_fds; i++)
        if (fds[i] < 0)
            goto out;
    /* The welcome is queued before the client asks: its hello lands in our
     * receive buffer, and its wait ends at once. */
    if (!send_with_fds(sv[1], data, size, fds, n_fds))
        goto out;
    shutdown(sv[1], SHUT_WR);
    struct ipc_welcome w;
    int wake = -2;
    int rc = ipc_ctl_client_handshake_wake(sv[0], &w, &wake);
    CHECK(memchr(w.reason, '\0', sizeof(w.reason)) != NULL); /* reason is always a string */
    if (rc >= 0) {
        struct ipc_welcome in;
        CHECK(size == sizeof(in));
        memcpy(&in, data, sizeof(in));
        CHECK(in.magic == IPC_MAGIC && in.abi_version == IPC_ABI_VERSION && in.status == 0);
        CHECK(n_fds >= 1 && same_file(rc, fds[0]) && rc != fds[0]);
        if (n_fds >= 2)
            CHECK(wake >= 0 && same_file(wake, fds[1]) && wake != rc);
        else
            CHECK(wake == -1);
        CHECK((fcntl(rc, F_GETFD) & FD_CLOEXEC) != 0);
        close(rc);
        if (wake >= 0)
            close(wake);
    } else {
        CHECK(wake == -1);
        /* A well-formed refusal passes gorgond's code on when it is an errno. */
        struct ipc_welcome in;
        if (size == sizeof(in)) {
            memcpy(&in, data, sizeof(in));
            if (in.magic == IPC_MAGIC && in.abi_version == IPC_ABI_VERSION && in.status < 0)
                CHECK(rc == (in.status >= -4095 ? in.status : -EPROTO));
        }
    }
    /* Our own hello, as the client sent it, passes gorgond's check. */
    struct ipc_hello h;
    CHECK(ipc_ctl_recv_hello(sv[1], &h) == 0);
out:
    for (size_t i = 0; i < n_fds; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    close(sv[0]);
    close(sv[1]);
}

/* ---- 2: region header ------------------------------------------------------- */

#define U128 unsigned __int128

/* [a, a + an) and [b, b + bn) do not overlap. */
static bool disjoint(U128 a, U128 an, U128 b, U128 bn)
{
    return a + an <= b || b + bn <= a;
}

static bool pow2_entries(uint32_t n)
{
    return n >= IPC_RING_MIN_ENTRIES && n <= IPC_RING_MAX_ENTRIES && (n & (n - 1)) == 0;
}

/* What a mapped region must satisfy for every view of it to stay inside the
 * mapping, written out again from ipc_abi.h, in 128-bit arithmetic. */
static void check_layout(const struct ipc_region_hdr *h, size_t size)
{
    CHECK(h->magic == IPC_MAGIC && h->abi_version == IPC_ABI_VERSION);
    CHECK(h->region_bytes == size && size >= IPC_HDR_BYTES);
    CHECK(pow2_entries(h->sq_entries) && pow2_entries(h->cq_entries));
    CHECK(h->n_slots <= IPC_MAX_SLOTS);
    CHECK(h->slot_in_bytes % IPC_CACHELINE == 0 && h->slot_in_bytes <= IPC_SLOT_MAX_BYTES);
    CHECK(h->slot_out_bytes % IPC_CACHELINE == 0 && h->slot_out_bytes <= IPC_SLOT_MAX_BYTES);
    CHECK(h->slot_stride ==
          sizeof(struct ipc_slot_hdr) + (uint64_t)h->slot_in_bytes + h->slot_out_bytes);
    CHECK(h->sq_off % IPC_CACHELINE == 0 && h->cq_off % IPC_CACHELINE == 0 &&
          h->slots_off % IPC_CACHELINE == 0);
    U128 sq_n = sizeof(struct ipc_ring_shared) + (U128)h->sq_entries * IPC_DESC_SIZE;
    U128 cq_n = sizeof(struct ipc_ring_shared) + (U128)h->cq_entries * IPC_DESC_SIZE;
    U128 sl_n = (U128)h->n_slots * h->slot_stride;
    CHECK(h->sq_off >= IPC_HDR_BYTES && h->cq_off >= IPC_HDR_BYTES &&
          (h->slots_off >= IPC_HDR_BYTES || sl_n == 0));
    CHECK((U128)h->sq_off + sq_n <= size && (U128)h->cq_off + cq_n <= size &&
          (U128)h->slots_off + sl_n <= size);
    CHECK(disjoint(h->sq_off, sq_n, h->cq_off, cq_n));
    CHECK(sl_n == 0 || (disjoint(h->sq_off, sq_n, h->slots_off, sl_n) &&
                        disjoint(h->cq_off, cq_n, h->slots_off, sl_n)));
}

static void fuzz_region(const uint8_t *data, size_t size)
{
    /* data: [pages u8][tail u8][seals u8] then header bytes (rest zero) */
    if (size < 3)
        return;
    size_t pages = 1 + data[0] % 64;
    size_t fd_bytes = pages * 4096 + (data[1] & 0x80 ? (size_t)(data[1] & 0x7f) * 64 : 0);
    /* bit 3 set: the seals are bits 4..7 (F_SEAL_SEAL, SHRINK, GROW, WRITE),
     * else the three a region needs */
    int seals = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL;
    if (data[2] & 8)
        seals = (data[2] >> 4) & (F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE);
    data += 3, size -= 3;
    int fd = memfd_create("fuzz-region", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0)
        return;
    size_t n = size < fd_bytes ? size : fd_bytes;
    if (ftruncate(fd, (off_t)fd_bytes) != 0 || pwrite(fd, data, n, 0) != (ssize_t)n ||
        (seals && fcntl(fd, F_ADD_SEALS, seals) != 0)) {
        close(fd);
        return;
    }
    ipc_region r;
    int rc = ipc_region_map(&r, fd);
    if (rc < 0) {
        /* -EPERM: mmap of a write-sealed memfd */
        CHECK(rc == -EPROTO || rc == -EPROTONOSUPPORT || rc == -EPERM);
        close(fd); /* not taken on failure */
        return;
    }
    int need = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL;
    CHECK((seals & need) == need && r.fd == fd && r.size == fd_bytes);
    /* the copy that was validated is the one kept, and it is the header */
    CHECK(memcmp(&r.layout, r.base, sizeof(r.layout)) == 0);
    check_layout(&r.layout, r.size);
    /* Every view lands inside the mapping: touch its ends. */
    volatile uint8_t sink = 0;
    for (uint32_t i = 0; i < r.layout.n_slots; i++) {
        volatile uint8_t *in = ipc_region_slot_in(&r, i), *out = ipc_region_slot_out(&r, i);
        CHECK(in && out && (uint8_t *)ipc_region_slot(&r, i) >= (uint8_t *)r.base);
        CHECK((uint8_t *)out + r.layout.slot_out_bytes <= (uint8_t *)r.base + r.size);
        if (r.layout.slot_in_bytes)
            sink ^= in[0] ^ in[r.layout.slot_in_bytes - 1];
        if (r.layout.slot_out_bytes)
            out[r.layout.slot_out_bytes - 1] = sink;
    }
    CHECK(ipc_region_slot(&r, r.layout.n_slots) == NULL);
    ipc_ring sq, cq;
    CHECK(ipc_region_sq(&r, IPC_RING_CONSUMER, &sq) == 0);
    CHECK(ipc_region_cq(&r, IPC_RING_PRODUCER, &cq) == 0);
    struct ipc_sqe s;
    int k = ipc_ring_pop(&sq, &s); /* indices are the peer's: may be impossible */
    CHECK(k == 0 || k == 1 || k == -EPROTO);
    struct ipc_cqe c = {.opcode = IPC_OP_NOP};
    k = ipc_ring_push(&cq, &c);
    CHECK(k == 0 || k == -EAGAIN || k == -EPROTO);
    ipc_region_unmap(&r);
}

/* ---- 3: descriptor ---------------------------------------------------------- */

static void fuzz_sqe(const uint8_t *data, size_t size)
{
    /* data: [n_slots u16][slot_in_bytes/64 u16] then the 64-byte sqe */
    if (size < 4 + sizeof(struct ipc_sqe))
        return;
    struct ipc_region_hdr lay;
    memset(&lay, 0, sizeof(lay));
    lay.n_slots = (uint32_t)(data[0] | data[1] << 8) % (IPC_MAX_SLOTS + 1);
    lay.slot_in_bytes = (uint32_t)((data[2] | data[3] << 8) % 1025) * IPC_CACHELINE; /* <= 64 KiB */
    lay.slot_out_bytes = 64;
    struct ipc_sqe sqe;
    memcpy(&sqe, data + 4, sizeof(sqe));
    const char *why = "unset";
    int rc = ipc_sqe_validate(&sqe, &lay, &why);
    if (rc < 0) {
        CHECK((rc == -EINVAL || rc == -EPROTO) && why && why[0]);
        return;
    }
    CHECK(rc == 0 && why == NULL);
    CHECK(sqe.opcode < IPC_OP__COUNT && sqe.flags == 0 && sqe.rsvd0 == 0);
    for (size_t i = 0; i < sizeof(sqe.pad); i++)
        CHECK(sqe.pad[i] == 0);
    CHECK(sqe.slot < lay.n_slots);
    CHECK((uint64_t)sqe.in_off + sqe.in_len <= lay.slot_in_bytes);
    /* The payload window lies inside a buffer of exactly slot_in_bytes
     * (ASan reports any byte outside it). */
    uint8_t *in = malloc(lay.slot_in_bytes ? lay.slot_in_bytes : 1);
    if (!in)
        return;
    memset(in, 0, lay.slot_in_bytes ? lay.slot_in_bytes : 1);
    volatile uint8_t sink = 0;
    if (sqe.in_len)
        sink ^= in[sqe.in_off] ^ in[sqe.in_off + sqe.in_len - 1];
    (void)sink;
    free(in);
    /* the same descriptor validated twice gives the same answer */
    CHECK(ipc_sqe_validate(&sqe, &lay, NULL) == 0);
}

/* ---- 4: ring indices ---------------------------------------------------------- */

static void fuzz_ring(const uint8_t *data, size_t size)
{
    /* data: [log2 entries u8][head u32][tail u32][ops...] */
    if (size < 9)
        return;
    uint32_t n = 1u << (1 + data[0] % 8); /* 2..256 entries */
    struct ipc_ring_shared *sh = aligned_alloc(64, sizeof(*sh));
    uint8_t *ents = malloc((size_t)n * IPC_DESC_SIZE); /* exact: ASan sees any overrun */
    if (!sh || !ents) {
        free(sh);
        free(ents);
        return;
    }
    ipc_ring_format(sh);
    memset(ents, 0, (size_t)n * IPC_DESC_SIZE);
    uint32_t head, tail;
    memcpy(&head, data + 1, 4);
    memcpy(&tail, data + 5, 4);
    sh->head = head;
    sh->tail = tail;
    ipc_ring cons, prod;
    CHECK(ipc_ring_attach(&cons, sh, ents, n, IPC_RING_CONSUMER) == 0);
    CHECK(ipc_ring_attach(&prod, sh, ents, n, IPC_RING_PRODUCER) == 0);
    /* Each later byte is one operation; between operations the "peer"
     * scribbles an index now and then. */
    for (size_t i = 9; i < size; i++) {
        uint8_t op = data[i];
        struct ipc_sqe d[4];
        memset(d, 0, sizeof(d));
        int rc;
        switch (op & 7) {
        case 0:
        case 1:
            rc = ipc_ring_pop(&cons, d);
            CHECK(rc == 0 || rc == 1 || rc == -EPROTO);
            break;
        case 2:
            rc = ipc_ring_pop_burst(&cons, d, 1 + (op >> 6));
            CHECK((rc >= 0 && rc <= 1 + (op >> 6)) || rc == -EPROTO);
            break;
        case 3:
        case 4:
            rc = ipc_ring_push(&prod, d);
            CHECK(rc == 0 || rc == -EAGAIN || rc == -EPROTO);
            break;
        case 5:
            rc = ipc_ring_push_burst(&prod, d, 1 + (op >> 6));
            CHECK((rc >= 0 && rc <= 1 + (op >> 6)) || rc == -EPROTO);
            break;
        case 6:
            sh->head += (uint32_t)(int8_t)op; /* the consumer side lies */
            break;
        default:
            sh->tail += (uint32_t)(int8_t)op; /* the producer side lies */
            break;
        }
    }
    free(ents);
    free(sh);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    fds_snapshot();
    switch (data[0] % 5) {
    case 0: fuzz_hello(data + 1, size - 1); break;
    case 1: fuzz_welcome(data + 1, size - 1); break;
    case 2: fuzz_region(data + 1, size - 1); break;
    case 3: fuzz_sqe(data + 1, size - 1); break;
    default: fuzz_ring(data + 1, size - 1); break;
    }
    fds_check();
    return 0;
}
