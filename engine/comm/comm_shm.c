/* comm shared-memory backend: the ranks of a group are processes on one
 * machine that map the same sealed memfd region.
 *
 * Region layout (offsets from the base; every part 64-byte aligned; the
 * sizes are recomputed from n_ranks, buf_bytes and p2p_bytes on attach and
 * never read from the region):
 *
 *   0     struct shm_hdr        magic, version, n_ranks, buf_bytes, p2p_bytes,
 *                               total_bytes
 *   64    struct shm_abort      abort state word + reason (256 bytes)
 *   384   struct shm_barrier    arrival count; generation futex word
 *   512   struct shm_rank[n]    per rank: attached pid, barrier arrivals, the
 *                               descriptors of its last two collectives
 *   ...   struct shm_chan[n*n]  per (sender, receiver): seq and ack futex words
 *   ...   (4096-aligned) staging buffers, buf_bytes per rank, two halves
 *   ...   channel data, p2p_bytes per (sender, receiver)
 *
 * Futex words (struct shm_fword) count in steps of 2; bit 0 is the abort bit,
 * set by comm_abort in every word at once so that a waiter's FUTEX_WAIT
 * value no longer matches and every wait ends. A waiter announces itself in
 * `sleepers` before its last check so that a waker skips the syscall when
 * nobody sleeps (Dekker, seq_cst on both sides: W1 pairs with S1).
 *
 * Collectives are sequences of stages. In a stage each rank writes its part
 * into one half of its staging buffer (half = stage parity), all ranks meet
 * at the barrier, then each reads what it needs from the others' halves.
 * Writing half p in stage s is safe because every rank finished reading
 * half p (stage s-2) before it arrived at stage s-1's barrier, which this
 * rank has passed: one barrier per stage, none to release the buffers.
 *
 * Reduction order: the sum of element i is ((b0[i] + b1[i]) + b2[i]) + ...
 * whichever rank computes it, so every rank gets the same bits every time.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <linux/futex.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "common/common.h"
#include "engine/comm/comm_int.h"

#define SHM_MAGIC 0x4d4d4f434e4f4752ull /* "RGONCOMM" little-endian */
#define SHM_VERSION 1u
#define SHM_WHY_BYTES 256
#define SHM_BUF_DEFAULT (1u << 20)
#define SHM_BUF_MIN 4096u
#define SHM_BUF_MAX (1ull << 30)
#define SHM_P2P_DEFAULT (256u << 10)
#define SHM_P2P_MAX (1ull << 28)
#define SHM_TOTAL_MAX (1ull << 36)
/* Chunks up to this many bytes are summed whole by every rank (one barrier);
 * larger ones are reduce-scattered then gathered (two barriers, 1/n of the
 * reads each). */
#define SHM_DIRECT_BYTES (16u << 10)
/* Reduce-scatter slices are multiples of this many floats (one cache line),
 * so no two ranks write the same line. */
#define SHM_SLICE_ALIGN 16u
#define SHM_NO_TIMEOUT UINT64_MAX

struct shm_fword {
    _Atomic uint32_t val;      /* += 2 per event; bit 0: aborted */
    _Atomic uint32_t sleepers; /* waiters in (or about to enter) FUTEX_WAIT */
};

struct shm_hdr {
    uint64_t magic;
    uint32_t version;
    uint32_t hdr_bytes; /* sizeof(struct shm_hdr) */
    uint32_t n_ranks;
    uint32_t rsvd;
    uint64_t buf_bytes;
    uint64_t p2p_bytes;
    uint64_t total_bytes;
    uint8_t pad[16];
};

struct shm_abort {
    _Atomic uint32_t state; /* 0 running; 1 reason being written; 2 reason written */
    uint8_t pad[60];
    char why[SHM_WHY_BYTES];
};

struct shm_barrier {
    _Atomic uint32_t count; /* ranks arrived at the current barrier */
    uint8_t pad0[60];
    struct shm_fword gen; /* += 2 when the last rank arrives */
    uint8_t pad1[56];
};

struct shm_desc {
    _Atomic uint32_t op; /* enum comm_op */
    _Atomic int32_t root;
    _Atomic uint64_t size;
    _Atomic uint64_t seq; /* collectives called before this one */
};

struct shm_rank {
    _Atomic uint32_t pid; /* attached process, 0: free */
    uint32_t pad0;
    _Atomic uint64_t arrivals; /* barriers entered (timeout diagnostics) */
    struct shm_desc desc[2];   /* by collective parity */
    uint8_t pad1[64];
};

struct shm_chan {
    struct shm_fword seq; /* sender: += 2 per chunk handed over */
    _Atomic uint64_t chunk; /* bytes in the chunk on offer */
    _Atomic uint64_t total; /* bytes of the whole message */
    uint8_t pad0[40];
    struct shm_fword ack; /* receiver: += 2 per chunk taken */
    uint8_t pad1[56];
};

CM_STATIC_ASSERT(sizeof(struct shm_hdr) == 64, "header is one line");
CM_STATIC_ASSERT(sizeof(struct shm_abort) == 64 + SHM_WHY_BYTES, "abort block");
CM_STATIC_ASSERT(sizeof(struct shm_barrier) == 128, "barrier block");
CM_STATIC_ASSERT(sizeof(struct shm_rank) == 128, "rank block");
CM_STATIC_ASSERT(sizeof(struct shm_chan) == 128, "channel block");

#define SHM_OFF_ABORT 64u
#define SHM_OFF_BARRIER (SHM_OFF_ABORT + sizeof(struct shm_abort))
#define SHM_OFF_RANKS (SHM_OFF_BARRIER + sizeof(struct shm_barrier))

struct shm_layout {
    uint32_t n;
    uint64_t buf_bytes, p2p_bytes;
    uint64_t ranks_off, chans_off, bufs_off, p2p_off, total;
};

static uint64_t round_up(uint64_t x, uint64_t a)
{
    return (x + a - 1) / a * a;
}

/* The layout for n ranks with these (already rounded) sizes; 0 or -EINVAL
 * with the reason. Every product is bounded first, so nothing overflows. */
static int shm_layout(struct shm_layout *l, uint64_t n, uint64_t buf, uint64_t p2p, char *why,
                      size_t cap)
{
    if (n < 1 || n > COMM_SHM_MAX_RANKS)
        return snprintf(why, cap, "n_ranks %" PRIu64 ": must be 1..%d", n, COMM_SHM_MAX_RANKS),
               -EINVAL;
    if (buf < SHM_BUF_MIN || buf > SHM_BUF_MAX || buf % 128)
        return snprintf(why, cap,
                        "buf_bytes %" PRIu64 ": must be a multiple of 128 in %u..%llu", buf,
                        SHM_BUF_MIN, (unsigned long long)SHM_BUF_MAX),
               -EINVAL;
    if (p2p < 64 || p2p > SHM_P2P_MAX || p2p % 64)
        return snprintf(why, cap, "p2p_bytes %" PRIu64 ": must be a multiple of 64 in 64..%llu",
                        p2p, (unsigned long long)SHM_P2P_MAX),
               -EINVAL;
    l->n = (uint32_t)n;
    l->buf_bytes = buf;
    l->p2p_bytes = p2p;
    l->ranks_off = SHM_OFF_RANKS;
    l->chans_off = l->ranks_off + n * sizeof(struct shm_rank);
    l->bufs_off = round_up(l->chans_off + n * n * sizeof(struct shm_chan), 4096);
    /* n <= 64, buf <= 2^30, p2p <= 2^28: at most 2^36 + 2^40, no overflow */
    l->p2p_off = l->bufs_off + n * buf;
    l->total = round_up(l->p2p_off + n * n * p2p, 4096);
    if (l->total > SHM_TOTAL_MAX)
        return snprintf(why, cap, "region of %" PRIu64 " bytes is larger than %llu", l->total,
                        (unsigned long long)SHM_TOTAL_MAX),
               -EINVAL;
    return 0;
}

static int layout_from_cfg(struct shm_layout *l, const comm_shm_cfg *cfg, char *why, size_t cap)
{
    if (!cfg)
        return snprintf(why, cap, "cfg is NULL"), -EINVAL;
    uint64_t buf = cfg->buf_bytes ? cfg->buf_bytes : SHM_BUF_DEFAULT;
    uint64_t p2p = cfg->p2p_bytes ? cfg->p2p_bytes : SHM_P2P_DEFAULT;
    /* the caller's values in the messages, then the rounded ones */
    if (cfg->n_ranks < 1 || cfg->n_ranks > COMM_SHM_MAX_RANKS)
        return snprintf(why, cap, "n_ranks %d: must be 1..%d", cfg->n_ranks,
                        COMM_SHM_MAX_RANKS),
               -EINVAL;
    if (buf < SHM_BUF_MIN || buf > SHM_BUF_MAX)
        return snprintf(why, cap, "buf_bytes %" PRIu64 ": must be %u..%llu", buf, SHM_BUF_MIN,
                        (unsigned long long)SHM_BUF_MAX),
               -EINVAL;
    if (p2p > SHM_P2P_MAX)
        return snprintf(why, cap, "p2p_bytes %" PRIu64 ": must be 1..%llu", p2p,
                        (unsigned long long)SHM_P2P_MAX),
               -EINVAL;
    return shm_layout(l, (uint64_t)cfg->n_ranks, round_up(buf, 128), round_up(p2p, 64), why,
                      cap);
}

/* A mapped, validated region. */
struct shm_view {
    uint8_t *base;
    size_t size;
    struct shm_layout l;
    struct shm_abort *ab;
    struct shm_barrier *bar;
    struct shm_rank *ranks;
    struct shm_chan *chans;
};

static void view_point(struct shm_view *v)
{
    v->ab = (struct shm_abort *)(v->base + SHM_OFF_ABORT);
    v->bar = (struct shm_barrier *)(v->base + SHM_OFF_BARRIER);
    v->ranks = (struct shm_rank *)(v->base + v->l.ranks_off);
    v->chans = (struct shm_chan *)(v->base + v->l.chans_off);
}

/* Map the region behind fd and check that its header describes exactly this
 * file. The header may have been written by another process: each field is
 * read once into a local and only the locals are used. */
static int view_map(struct shm_view *v, int fd, char *why, size_t cap)
{
    struct stat st;
    if (fd < 0)
        return snprintf(why, cap, "fd %d: not a descriptor", fd), -EBADF;
    if (fstat(fd, &st) < 0) {
        int rc = cm_neg_errno();
        return snprintf(why, cap, "fd %d: fstat: %s", fd, cm_strerror(rc)), rc;
    }
    if (!S_ISREG(st.st_mode) || st.st_size < (off_t)SHM_OFF_RANKS)
        return snprintf(why, cap, "fd %d: %lld bytes, smaller than a comm region's header", fd,
                        (long long)st.st_size),
               -EINVAL;
    int seals = fcntl(fd, F_GET_SEALS);
    if (seals < 0 || (seals & (F_SEAL_SHRINK | F_SEAL_GROW)) != (F_SEAL_SHRINK | F_SEAL_GROW))
        return snprintf(why, cap,
                        "fd %d: region is not sealed against resizing (F_SEAL_SHRINK, "
                        "F_SEAL_GROW): not made by comm_shm_create",
                        fd),
               -EINVAL;
    size_t size = (size_t)st.st_size;
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        int rc = cm_neg_errno();
        return snprintf(why, cap, "fd %d: mmap %zu bytes: %s", fd, size, cm_strerror(rc)), rc;
    }
    const volatile struct shm_hdr *h = p;
    uint64_t magic = h->magic;
    uint32_t version = h->version, hdr_bytes = h->hdr_bytes, n = h->n_ranks;
    uint64_t buf = h->buf_bytes, p2p = h->p2p_bytes, total = h->total_bytes;
    int rc = 0;
    if (magic != SHM_MAGIC)
        rc = -EINVAL, snprintf(why, cap, "bad magic 0x%016" PRIx64 ": not a comm region", magic);
    else if (version != SHM_VERSION)
        rc = -EPROTO, snprintf(why, cap, "region version %u, this build speaks %u", version,
                               SHM_VERSION);
    else if (hdr_bytes != sizeof(struct shm_hdr))
        rc = -EPROTO, snprintf(why, cap, "header of %u bytes, expected %zu", hdr_bytes,
                               sizeof(struct shm_hdr));
    else if ((rc = shm_layout(&v->l, n, buf, p2p, why, cap)) < 0)
        ;
    else if (total != v->l.total || total != size)
        rc = -EINVAL, snprintf(why, cap,
                               "total_bytes %" PRIu64 " in the header, %" PRIu64
                               " from its sizes, %zu in the file",
                               total, v->l.total, size);
    if (rc < 0) {
        munmap(p, size);
        return rc;
    }
    v->base = p;
    v->size = size;
    view_point(v);
    return 0;
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* timeout_ns < 0: no timeout. */
static int futex_wait(_Atomic uint32_t *w, uint32_t expected, int64_t timeout_ns)
{
    struct timespec ts = {.tv_sec = (time_t)(timeout_ns / 1000000000),
                          .tv_nsec = (long)(timeout_ns % 1000000000)};
    /* No FUTEX_PRIVATE_FLAG: the waker is another process. */
    long rc = syscall(SYS_futex, (uint32_t *)w, FUTEX_WAIT, expected,
                      timeout_ns < 0 ? NULL : &ts, NULL, 0);
    return rc == 0 ? 0 : cm_neg_errno();
}

static void futex_wake_all(_Atomic uint32_t *w)
{
    syscall(SYS_futex, (uint32_t *)w, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/* Publish an event: += 2 keeps the abort bit. The seq_cst add (W1) orders
 * the data written before it (release) and pairs with the waiter's
 * seq_cst sleepers increment (S1): either the waiter sees the new value or
 * this sees the sleeper and wakes it. */
static void fword_bump(struct shm_fword *w)
{
    atomic_fetch_add_explicit(&w->val, 2, memory_order_seq_cst); /* W1 */
    if (atomic_load_explicit(&w->sleepers, memory_order_seq_cst))
        futex_wake_all(&w->val);
}

static void fword_abort(struct shm_fword *w)
{
    atomic_fetch_or_explicit(&w->val, 1, memory_order_seq_cst); /* W1 as well */
    if (atomic_load_explicit(&w->sleepers, memory_order_seq_cst))
        futex_wake_all(&w->val);
}

static void view_abort(struct shm_view *v, const char *why)
{
    uint32_t idle = 0;
    if (atomic_compare_exchange_strong_explicit(&v->ab->state, &idle, 1, memory_order_acq_rel,
                                                memory_order_acquire)) {
        snprintf(v->ab->why, sizeof v->ab->why, "%s", why);
        atomic_store_explicit(&v->ab->state, 2, memory_order_release); /* R2 pairs with A2 */
    }
    /* Even when another caller aborted first: setting a set bit again is
     * harmless, and it covers an aborter that died before reaching here. */
    fword_abort(&v->bar->gen);
    for (uint64_t i = 0; i < (uint64_t)v->l.n * v->l.n; i++) {
        fword_abort(&v->chans[i].seq);
        fword_abort(&v->chans[i].ack);
    }
}

static bool view_aborted(struct shm_view *v, char *why, size_t cap)
{
    uint32_t st = atomic_load_explicit(&v->ab->state, memory_order_acquire); /* A2 */
    if (st == 0) {
        if (cap)
            why[0] = '\0';
        return false;
    }
    if (cap) {
        if (st == 2) {
            /* written by another process: bounded, NUL-terminated copy */
            size_t n = strnlen(v->ab->why, sizeof v->ab->why);
            if (n >= cap)
                n = cap - 1;
            memcpy(why, v->ab->why, n);
            why[n] = '\0';
        } else {
            snprintf(why, cap, "aborted (the aborting process recorded no reason)");
        }
    }
    return true;
}

/* ---- The communicator ------------------------------------------------------ */

typedef struct shm_comm {
    comm pub;
    struct shm_view v;
    size_t half;           /* bytes in one half of a staging buffer */
    uint64_t coll_seq;     /* collectives called (descriptor parity) */
    uint64_t stage;        /* data stages (buffer half parity) */
    int threads;           /* n_ranks * threads_per_rank */
    int spin;              /* -1 auto, 0 never, 1 always */
    uint64_t spin_ns;
    uint64_t timeout_ns;   /* SHM_NO_TIMEOUT: wait until aborted */
    uint32_t pid;
} shm_comm;

static shm_comm *S(comm *c)
{
    return (shm_comm *)c;
}

static uint8_t *half_ptr(shm_comm *s, int rank, uint64_t stage)
{
    return s->v.base + s->v.l.bufs_off + (uint64_t)rank * s->v.l.buf_bytes +
           (stage & 1) * s->half;
}

static struct shm_chan *chan(shm_comm *s, int from, int to)
{
    return &s->v.chans[(size_t)from * s->v.l.n + (size_t)to];
}

static uint8_t *chan_data(shm_comm *s, int from, int to)
{
    return s->v.base + s->v.l.p2p_off + ((uint64_t)from * s->v.l.n + (uint64_t)to) * s->v.l.p2p_bytes;
}

/* `what` names the call ("all_reduce_sum_f32", or "send to" / "recv from"
 * with peer >= 0); formatted only on error, so calls format nothing. */
static int aborted_rc(shm_comm *s, const char *what, int peer)
{
    char why[200];
    view_aborted(&s->v, why, sizeof why);
    if (peer >= 0)
        return comm_seterr(&s->pub, -ECONNABORTED, "%s rank %d: communicator aborted: %s",
                           what, peer, why);
    return comm_seterr(&s->pub, -ECONNABORTED, "%s: communicator aborted: %s", what, why);
}

static const char *peer_what(const char *what, int peer, char *buf, size_t cap)
{
    snprintf(buf, cap, "%s rank %d", what, peer);
    return buf;
}

/* Wait until (w->val & ~1) != old. 0, -ECONNABORTED (abort bit seen), or
 * -ETIMEDOUT after timeout_ns without a change: then the communicator is
 * aborted here, with `what` and the late ranks as the reason, since a rank
 * that stopped answering leaves the group's state undefined. */
static int shm_wait(shm_comm *s, struct shm_fword *w, uint32_t old, const char *what,
                    int peer)
{
    uint32_t v = atomic_load_explicit(&w->val, memory_order_acquire);
    if ((v & ~1u) != old)
        return 0;
    uint64_t t0 = cm_now_ns();
    if (!(v & 1) && (s->spin == 1 || (s->spin < 0 && cm_spin_allowed(s->threads)))) {
        cm_spinners_add(1);
        for (unsigned i = 1;; i++) {
            cpu_relax();
            v = atomic_load_explicit(&w->val, memory_order_acquire);
            if ((v & ~1u) != old || (v & 1))
                break;
            if (!(i & 63) && cm_now_ns() - t0 >= s->spin_ns)
                break;
        }
        cm_spinners_add(-1);
    }
    for (;;) {
        if ((v & ~1u) != old)
            return 0;
        if (v & 1)
            return aborted_rc(s, what, peer);
        uint64_t waited = cm_now_ns() - t0;
        if (waited >= s->timeout_ns)
            break;
        atomic_fetch_add_explicit(&w->sleepers, 1, memory_order_seq_cst); /* S1 */
        v = atomic_load_explicit(&w->val, memory_order_seq_cst);
        if ((v & ~1u) == old && !(v & 1))
            futex_wait(&w->val, v,
                       s->timeout_ns == SHM_NO_TIMEOUT ? -1 : (int64_t)(s->timeout_ns - waited));
        atomic_fetch_sub_explicit(&w->sleepers, 1, memory_order_relaxed);
        v = atomic_load_explicit(&w->val, memory_order_acquire);
    }

    /* Timed out: name the ranks we were waiting for. */
    char late[160] = "", call[48];
    size_t len = 0;
    if (peer >= 0) {
        snprintf(late, sizeof late, "rank %d", peer);
        what = peer_what(what, peer, call, sizeof call);
    } else {
        uint64_t mine = atomic_load_explicit(&s->v.ranks[s->pub.rank].arrivals,
                                             memory_order_relaxed);
        for (int r = 0; r < s->pub.size && len < sizeof late - 8; r++) {
            uint64_t a = atomic_load_explicit(&s->v.ranks[r].arrivals, memory_order_relaxed);
            if (a < mine) {
                int k = snprintf(late + len, sizeof late - len, "%s%d", len ? ", " : "rank(s) ",
                                 r);
                len += k > 0 ? (size_t)k : 0;
            }
        }
        if (!len)
            snprintf(late, sizeof late, "the other ranks");
    }
    char why[SHM_WHY_BYTES];
    snprintf(why, sizeof why, "rank %d: %s timed out after %" PRIu64 " ms waiting for %s",
             s->pub.rank, what, s->timeout_ns / 1000000, late);
    view_abort(&s->v, why);
    return comm_seterr(&s->pub, -ETIMEDOUT, "%s", why);
}

/* Every rank meets here; what each wrote before arriving is visible to all
 * after. The arrivals' acq_rel adds on `count` form one release sequence
 * that the last arriver acquires; its bump of `gen` (W1) releases all of it
 * to the waiters (acquire loads in shm_wait). */
static int shm_barrier_wait(shm_comm *s, const char *what)
{
    struct shm_barrier *b = s->v.bar;
    /* Read before arriving: gen cannot move until this rank has arrived. */
    uint32_t g = atomic_load_explicit(&b->gen.val, memory_order_acquire);
    if (g & 1)
        return aborted_rc(s, what, -1);
    atomic_fetch_add_explicit(&s->v.ranks[s->pub.rank].arrivals, 1, memory_order_relaxed);
    uint32_t arrived = atomic_fetch_add_explicit(&b->count, 1, memory_order_acq_rel) + 1;
    if (arrived == (uint32_t)s->pub.size) {
        /* Reset before releasing: the next barrier's arrivals come after
         * their waiters saw the new gen. */
        atomic_store_explicit(&b->count, 0, memory_order_relaxed);
        fword_bump(&b->gen);
        return 0;
    }
    if (arrived > (uint32_t)s->pub.size) {
        char why[SHM_WHY_BYTES];
        snprintf(why, sizeof why, "rank %d: %s: %u arrivals at a barrier of %d ranks",
                 s->pub.rank, what, arrived, s->pub.size);
        view_abort(&s->v, why);
        return comm_seterr(&s->pub, -EPROTO, "%s", why);
    }
    return shm_wait(s, &b->gen, g & ~1u, what, -1);
}

static void desc_format(char *buf, size_t cap, uint32_t op, uint64_t size, int32_t root)
{
    switch (op) {
    case COMM_OP_ALL_REDUCE_SUM_F32:
        snprintf(buf, cap, "all_reduce_sum_f32(n=%" PRIu64 ")", size);
        break;
    case COMM_OP_ALL_GATHER:
        snprintf(buf, cap, "all_gather(bytes_per_rank=%" PRIu64 ")", size);
        break;
    case COMM_OP_BROADCAST:
        snprintf(buf, cap, "broadcast(bytes=%" PRIu64 ", root=%d)", size, root);
        break;
    default:
        snprintf(buf, cap, "%s", comm_op_name(op));
        break;
    }
}

/* Before a collective's first barrier: say what this rank is calling. */
static void desc_publish(shm_comm *s, uint32_t op, uint64_t size, int root)
{
    struct shm_desc *d = &s->v.ranks[s->pub.rank].desc[s->coll_seq & 1];
    atomic_store_explicit(&d->op, op, memory_order_relaxed);
    atomic_store_explicit(&d->root, root, memory_order_relaxed);
    atomic_store_explicit(&d->size, size, memory_order_relaxed);
    atomic_store_explicit(&d->seq, s->coll_seq, memory_order_relaxed);
}

/* After the first barrier: every rank must be in the same call. The slot of
 * call k is rewritten only by call k+2, which no rank starts before every
 * rank has passed call k+1's barrier, i.e. finished this check. */
static int desc_check(shm_comm *s, uint32_t op, uint64_t size, int root)
{
    uint64_t seq = s->coll_seq++;
    for (int r = 0; r < s->pub.size; r++) {
        struct shm_desc *d = &s->v.ranks[r].desc[seq & 1];
        uint32_t o = atomic_load_explicit(&d->op, memory_order_relaxed);
        int32_t rt = atomic_load_explicit(&d->root, memory_order_relaxed);
        uint64_t sz = atomic_load_explicit(&d->size, memory_order_relaxed);
        uint64_t sq = atomic_load_explicit(&d->seq, memory_order_relaxed);
        if (o == op && rt == root && sz == size && sq == seq)
            continue;
        char mine[64], theirs[64], why[SHM_WHY_BYTES];
        desc_format(mine, sizeof mine, op, size, root);
        desc_format(theirs, sizeof theirs, o, sz, rt);
        if (sq != seq)
            snprintf(why, sizeof why,
                     "mismatched calls: rank %d is in collective #%" PRIu64
                     " %s, rank %d in #%" PRIu64 " %s",
                     s->pub.rank, seq, mine, r, sq, theirs);
        else
            snprintf(why, sizeof why, "mismatched calls in collective #%" PRIu64
                     ": rank %d called %s, rank %d called %s",
                     seq, s->pub.rank, mine, r, theirs);
        view_abort(&s->v, why);
        return comm_seterr(&s->pub, -EPROTO, "%s", why);
    }
    return 0;
}

/* One stage's opening: the first one also checks that every rank is in the
 * same call. */
static int stage_meet(shm_comm *s, bool first, uint32_t op, uint64_t size, int root,
                      const char *what)
{
    if (first)
        desc_publish(s, op, size, root);
    CM_TRY(shm_barrier_wait(s, what));
    return first ? desc_check(s, op, size, root) : 0;
}

/* dst[0..m) = src[0][0..m) + src[1][0..m) + ... in rank order. */
static void sum_ranks(float *restrict dst, shm_comm *s, uint64_t stage, size_t lo, size_t m)
{
    int n = s->pub.size;
    const float *b0 = (const float *)half_ptr(s, 0, stage) + lo;
    for (size_t i = 0; i < m; i++)
        dst[i] = b0[i];
    for (int r = 1; r < n; r++) {
        const float *br = (const float *)half_ptr(s, r, stage) + lo;
        for (size_t i = 0; i < m; i++)
            dst[i] += br[i];
    }
}

static int shm_all_reduce(comm *c, float *buf, size_t n)
{
    shm_comm *s = S(c);
    int size = c->size, me = c->rank;
    size_t cap = s->half / sizeof(float);
    for (size_t off = 0, m; off < n; off += m) {
        m = n - off < cap ? n - off : cap;
        uint64_t st = s->stage++;
        float *mine = (float *)half_ptr(s, me, st);
        memcpy(mine, buf + off, m * sizeof(float));
        CM_TRY(stage_meet(s, off == 0, COMM_OP_ALL_REDUCE_SUM_F32, n, -1,
                          "all_reduce_sum_f32"));
        if (m * sizeof(float) <= SHM_DIRECT_BYTES) {
            sum_ranks(buf + off, s, st, 0, m);
            continue;
        }
        /* Reduce-scatter: this rank sums its slice into its own half (no
         * other rank reads or writes that slice of any half), then all
         * gather the slices. */
        size_t per = round_up((m + (size_t)size - 1) / (size_t)size, SHM_SLICE_ALIGN);
        size_t lo = (size_t)me * per < m ? (size_t)me * per : m;
        size_t hi = lo + per < m ? lo + per : m;
        float tmp[256];
        for (size_t i = lo; i < hi; i += CM_ARRAY_LEN(tmp)) {
            size_t k = hi - i < CM_ARRAY_LEN(tmp) ? hi - i : CM_ARRAY_LEN(tmp);
            sum_ranks(tmp, s, st, i, k);
            memcpy(mine + i, tmp, k * sizeof(float));
        }
        CM_TRY(shm_barrier_wait(s, "all_reduce_sum_f32"));
        for (int r = 0; r < size; r++) {
            size_t rlo = (size_t)r * per < m ? (size_t)r * per : m;
            size_t rhi = rlo + per < m ? rlo + per : m;
            if (rhi > rlo)
                memcpy(buf + off + rlo, (const float *)half_ptr(s, r, st) + rlo,
                       (rhi - rlo) * sizeof(float));
        }
    }
    return 0;
}

static int shm_all_gather(comm *c, const void *in, void *out, size_t bpr)
{
    shm_comm *s = S(c);
    for (size_t off = 0, m; off < bpr; off += m) {
        m = bpr - off < s->half ? bpr - off : s->half;
        uint64_t st = s->stage++;
        memcpy(half_ptr(s, c->rank, st), (const uint8_t *)in + off, m);
        CM_TRY(stage_meet(s, off == 0, COMM_OP_ALL_GATHER, bpr, -1, "all_gather"));
        for (int r = 0; r < c->size; r++)
            memcpy((uint8_t *)out + (size_t)r * bpr + off, half_ptr(s, r, st), m);
    }
    return 0;
}

static int shm_broadcast(comm *c, void *buf, size_t bytes, int root)
{
    shm_comm *s = S(c);
    for (size_t off = 0, m; off < bytes; off += m) {
        m = bytes - off < s->half ? bytes - off : s->half;
        uint64_t st = s->stage++;
        if (c->rank == root)
            memcpy(half_ptr(s, root, st), (const uint8_t *)buf + off, m);
        CM_TRY(stage_meet(s, off == 0, COMM_OP_BROADCAST, bytes, root, "broadcast"));
        if (c->rank != root)
            memcpy((uint8_t *)buf + off, half_ptr(s, root, st), m);
    }
    return 0;
}

static int shm_barrier(comm *c)
{
    return stage_meet(S(c), true, COMM_OP_BARRIER, 0, -1, "barrier");
}

/* A channel holds one chunk: empty when seq == ack (bit 0 aside). Only the
 * sender moves seq and only the receiver moves ack. */
static int shm_send(comm *c, const void *buf, size_t bytes, int peer)
{
    shm_comm *s = S(c);
    struct shm_chan *ch = chan(s, c->rank, peer);
    uint8_t *data = chan_data(s, c->rank, peer);
    const char *what = "send to";
    size_t off = 0;
    do {
        size_t m = bytes - off < s->v.l.p2p_bytes ? bytes - off : (size_t)s->v.l.p2p_bytes;
        uint32_t sq = atomic_load_explicit(&ch->seq.val, memory_order_relaxed) & ~1u;
        for (;;) {
            /* A3: pairs with the receiver's bump of ack (W1): it has copied
             * the chunk out before we overwrite it. */
            uint32_t a = atomic_load_explicit(&ch->ack.val, memory_order_acquire);
            if (a & 1)
                return aborted_rc(s, what, peer);
            if ((a & ~1u) == sq)
                break;
            CM_TRY(shm_wait(s, &ch->ack, a & ~1u, what, peer));
        }
        memcpy(data, (const uint8_t *)buf + off, m);
        atomic_store_explicit(&ch->chunk, m, memory_order_relaxed);
        atomic_store_explicit(&ch->total, bytes, memory_order_relaxed);
        fword_bump(&ch->seq); /* W1: releases data, chunk, total */
        off += m;
    } while (off < bytes);
    return 0;
}

static int shm_recv(comm *c, void *buf, size_t bytes, int peer)
{
    shm_comm *s = S(c);
    struct shm_chan *ch = chan(s, peer, c->rank);
    const uint8_t *data = chan_data(s, peer, c->rank);
    const char *what = "recv from";
    size_t off = 0;
    do {
        uint32_t a = atomic_load_explicit(&ch->ack.val, memory_order_relaxed) & ~1u;
        for (;;) {
            uint32_t v = atomic_load_explicit(&ch->seq.val, memory_order_acquire); /* A1 */
            if ((v & ~1u) != a)
                break;
            if (v & 1)
                return aborted_rc(s, what, peer);
            CM_TRY(shm_wait(s, &ch->seq, a, what, peer));
        }
        uint64_t total = atomic_load_explicit(&ch->total, memory_order_relaxed);
        uint64_t m = atomic_load_explicit(&ch->chunk, memory_order_relaxed);
        size_t want = bytes - off < s->v.l.p2p_bytes ? bytes - off : (size_t)s->v.l.p2p_bytes;
        if (total != bytes || m != want) {
            char why[SHM_WHY_BYTES];
            if (total != bytes)
                snprintf(why, sizeof why,
                         "mismatched send/recv: rank %d receives %zu bytes from rank %d, "
                         "which sends %" PRIu64,
                         c->rank, bytes, peer, total);
            else
                snprintf(why, sizeof why,
                         "corrupt channel %d -> %d: chunk of %" PRIu64 " bytes, expected %zu",
                         peer, c->rank, m, want);
            view_abort(&s->v, why);
            return comm_seterr(c, -EPROTO, "%s", why);
        }
        memcpy((uint8_t *)buf + off, data, m);
        fword_bump(&ch->ack); /* W1: the slot is free again */
        off += m;
    } while (off < bytes);
    return 0;
}

static int shm_set_timeout_ms(comm *c, int64_t timeout_ms)
{
    S(c)->timeout_ns = timeout_ms < 0 ? SHM_NO_TIMEOUT : (uint64_t)timeout_ms * 1000000u;
    return 0;
}

static void shm_abort(comm *c, const char *why)
{
    view_abort(&S(c)->v, why);
}

static bool shm_aborted(comm *c, char *why, size_t cap)
{
    return view_aborted(&S(c)->v, why, cap);
}

static void shm_destroy(comm *c)
{
    shm_comm *s = S(c);
    uint32_t pid = s->pid;
    atomic_compare_exchange_strong(&s->v.ranks[c->rank].pid, &pid, 0);
    munmap(s->v.base, s->v.size);
    free(s);
}

static const struct comm_ops shm_ops = {
    .name = "shm",
    .all_reduce_sum_f32 = shm_all_reduce,
    .all_gather = shm_all_gather,
    .broadcast = shm_broadcast,
    .send = shm_send,
    .recv = shm_recv,
    .barrier = shm_barrier,
    .set_timeout_ms = shm_set_timeout_ms,
    .abort = shm_abort,
    .aborted = shm_aborted,
    .destroy = shm_destroy,
};

/* ---- Public entry points ------------------------------------------------- */

size_t comm_shm_bytes(const comm_shm_cfg *cfg)
{
    struct shm_layout l;
    char why[8];
    return layout_from_cfg(&l, cfg, why, sizeof why) < 0 ? 0 : (size_t)l.total;
}

int comm_shm_create(const comm_shm_cfg *cfg, char *why, size_t cap)
{
    char dummy[1];
    if (!why || !cap)
        why = dummy, cap = sizeof dummy;
    why[0] = '\0';
    struct shm_layout l;
    CM_TRY(layout_from_cfg(&l, cfg, why, cap));
    int fd = memfd_create("gorgon-comm", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0) {
        int rc = cm_neg_errno();
        return snprintf(why, cap, "memfd_create: %s", cm_strerror(rc)), rc;
    }
    int rc = 0;
    void *p = MAP_FAILED;
    if (ftruncate(fd, (off_t)l.total) < 0) {
        rc = cm_neg_errno();
        snprintf(why, cap, "ftruncate to %" PRIu64 " bytes: %s", l.total, cm_strerror(rc));
        goto fail;
    }
    p = mmap(NULL, l.total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        rc = cm_neg_errno();
        snprintf(why, cap, "mmap %" PRIu64 " bytes: %s", l.total, cm_strerror(rc));
        goto fail;
    }
    /* A fresh memfd reads as zeros: every word starts at 0 (no abort, no
     * arrivals, empty channels); only the header needs writing. */
    struct shm_hdr *h = p;
    *h = (struct shm_hdr){.magic = SHM_MAGIC,
                          .version = SHM_VERSION,
                          .hdr_bytes = sizeof(struct shm_hdr),
                          .n_ranks = l.n,
                          .buf_bytes = l.buf_bytes,
                          .p2p_bytes = l.p2p_bytes,
                          .total_bytes = l.total};
    munmap(p, l.total);
    /* Fixed size: a rank cannot shrink the file under the others (SIGBUS). */
    if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
        rc = cm_neg_errno();
        snprintf(why, cap, "sealing the region: %s", cm_strerror(rc));
        goto fail;
    }
    return fd;
fail:
    close(fd);
    return rc;
}

int comm_shm_attach(comm **out, int fd, int rank, const comm_shm_opts *opts, char *why,
                    size_t cap)
{
    char dummy[1];
    if (!why || !cap)
        why = dummy, cap = sizeof dummy;
    why[0] = '\0';
    if (!out)
        return snprintf(why, cap, "out is NULL"), -EINVAL;
    *out = NULL;
    comm_shm_opts o = opts ? *opts : COMM_SHM_OPTS_DEFAULT;
    if (o.threads_per_rank < 1)
        return snprintf(why, cap, "threads_per_rank %d: must be >= 1", o.threads_per_rank),
               -EINVAL;
    if (o.spin < -1 || o.spin > 1)
        return snprintf(why, cap, "spin %d: must be -1 (auto), 0 or 1", o.spin), -EINVAL;
    if (o.spin_ns < 0 || o.spin_ns > 1000000000)
        return snprintf(why, cap, "spin_ns %" PRId64 ": must be 0..1e9", o.spin_ns), -EINVAL;
    if (o.timeout_ms == 0 || o.timeout_ms < -1 || o.timeout_ms > COMM_TIMEOUT_MAX_MS)
        return snprintf(why, cap, "timeout_ms %" PRId64 ": must be -1 or 1..%lld", o.timeout_ms,
                        (long long)COMM_TIMEOUT_MAX_MS),
               -EINVAL;
    struct shm_view v;
    CM_TRY(view_map(&v, fd, why, cap));
    int rc;
    if (rank < 0 || (uint32_t)rank >= v.l.n) {
        rc = -EINVAL;
        snprintf(why, cap, "rank %d: the region has ranks 0..%u", rank, v.l.n - 1);
        goto fail;
    }
    if ((uint64_t)o.threads_per_rank * v.l.n > INT_MAX) {
        rc = -EINVAL;
        snprintf(why, cap, "threads_per_rank %d x %u ranks: too many", o.threads_per_rank,
                 v.l.n);
        goto fail;
    }
    uint32_t pid = (uint32_t)getpid(), free_pid = 0;
    if (!atomic_compare_exchange_strong(&v.ranks[rank].pid, &free_pid, pid)) {
        rc = -EBUSY;
        snprintf(why, cap, "rank %d is already attached (pid %u)", rank, free_pid);
        goto fail;
    }
    shm_comm *s = calloc(1, sizeof *s);
    if (!s) {
        atomic_store(&v.ranks[rank].pid, 0);
        rc = -ENOMEM;
        snprintf(why, cap, "out of memory");
        goto fail;
    }
    s->pub.ops = &shm_ops;
    s->pub.rank = rank;
    s->pub.size = (int)v.l.n;
    s->v = v;
    s->half = (size_t)v.l.buf_bytes / 2;
    s->threads = o.threads_per_rank * (int)v.l.n;
    s->spin = o.spin;
    s->spin_ns = (uint64_t)o.spin_ns;
    s->timeout_ns = o.timeout_ms < 0 ? SHM_NO_TIMEOUT : (uint64_t)o.timeout_ms * 1000000u;
    s->pid = pid;
    *out = &s->pub;
    return 0;
fail:
    munmap(v.base, v.size);
    return rc;
}

int comm_shm_abort_fd(int fd, const char *why, char *why_err, size_t cap)
{
    char dummy[1];
    if (!why_err || !cap)
        why_err = dummy, cap = sizeof dummy;
    why_err[0] = '\0';
    struct shm_view v;
    CM_TRY(view_map(&v, fd, why_err, cap));
    view_abort(&v, why && why[0] ? why : "aborted by the coordinator");
    munmap(v.base, v.size);
    return 0;
}
