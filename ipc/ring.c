/* SPSC rings of 64-byte descriptors over shared memory.
 *
 * Each side keeps its own index privately (r->local) and only publishes it;
 * the peer's index is re-read from shared memory only when the cached copy
 * says the ring looks full (producer) or empty (consumer), so the common case
 * touches no line the peer writes. Every value read from the peer is checked
 * (`tail - head <= entries` in u32 arithmetic, which is exact across the 2^32
 * wrap) before it is used; an impossible value is -EPROTO, never a crash.
 *
 * Memory-order pairs (DPDK style):
 *   R1 (producer: store-release tail)  pairs with  A2 (consumer: load-acquire tail)
 *      -> descriptor bytes written before R1 are visible after A2.
 *   R2 (consumer: store-release head)  pairs with  A1 (producer: load-acquire head)
 *      -> the consumer's copy-out finished before the producer reuses the entry.
 */
#include <errno.h>
#include <string.h>

#include "common/common.h"
#include "ipc/ipc.h"
#include "ipc/ipc_int.h"

void ipc_ring_format(struct ipc_ring_shared *sh)
{
    memset(sh, 0, sizeof(*sh));
}

int ipc_ring_attach(ipc_ring *r, struct ipc_ring_shared *sh, void *entries, uint32_t n_entries,
                    enum ipc_ring_role role)
{
    if (!r || !sh || !entries || !ipc_ring_entries_ok(n_entries) ||
        (role != IPC_RING_PRODUCER && role != IPC_RING_CONSUMER))
        return -EINVAL;
    r->sh = sh;
    r->entries = entries;
    r->mask = n_entries - 1;
    r->role = role;
    r->wake_fd = -1;
    if (role == IPC_RING_PRODUCER) {
        r->local = IPC_LOAD(&sh->tail, __ATOMIC_RELAXED);
        /* Pretend the ring is full so the first push reads (and checks) the
         * consumer's head instead of trusting it here. */
        r->cached = r->local - n_entries;
    } else {
        r->local = IPC_LOAD(&sh->head, __ATOMIC_RELAXED);
        r->cached = r->local; /* looks empty: first pop reads the tail */
    }
    return 0;
}

/* Producer: refresh the cached head. Returns free entries or -EPROTO. */
static inline int ring_prod_refresh(ipc_ring *r)
{
    uint32_t size = r->mask + 1;
    /* A1 pairs with R2 */
    uint32_t head = IPC_LOAD(&r->sh->head, __ATOMIC_ACQUIRE);
    uint32_t used = r->local - head;
    if (CM_UNLIKELY(used > size))
        return -EPROTO;
    r->cached = head;
    return (int)(size - used);
}

/* Consumer: refresh the cached tail. Returns ready entries or -EPROTO. */
static inline int ring_cons_refresh(ipc_ring *r)
{
    /* A2 pairs with R1 */
    uint32_t tail = IPC_LOAD(&r->sh->tail, __ATOMIC_ACQUIRE);
    uint32_t ready = tail - r->local;
    if (CM_UNLIKELY(ready > r->mask + 1))
        return -EPROTO;
    r->cached = tail;
    return (int)ready;
}

int ipc_ring_push(ipc_ring *r, const void *desc)
{
    uint32_t tail = r->local;
    if (CM_UNLIKELY(tail - r->cached > r->mask)) { /* looks full */
        int free_n = ring_prod_refresh(r);
        if (free_n <= 0)
            return free_n < 0 ? free_n : -EAGAIN;
    }
    memcpy(r->entries + (size_t)(tail & r->mask) * IPC_DESC_SIZE, desc, IPC_DESC_SIZE);
    /* R1 pairs with A2 */
    IPC_STORE(&r->sh->tail, tail + 1, __ATOMIC_RELEASE);
    r->local = tail + 1;
    return 0;
}

/* Copy n descriptors between the ring (starting at index idx) and a private
 * buffer, in at most two pieces around the end of the array. */
static inline void ring_copy_in(ipc_ring *r, uint32_t idx, const uint8_t *src, uint32_t n)
{
    uint32_t size = r->mask + 1, pos = idx & r->mask;
    uint32_t first = size - pos < n ? size - pos : n;
    memcpy(r->entries + (size_t)pos * IPC_DESC_SIZE, src, (size_t)first * IPC_DESC_SIZE);
    if (n > first)
        memcpy(r->entries, src + (size_t)first * IPC_DESC_SIZE, (size_t)(n - first) * IPC_DESC_SIZE);
}

static inline void ring_copy_out(ipc_ring *r, uint32_t idx, uint8_t *dst, uint32_t n)
{
    uint32_t size = r->mask + 1, pos = idx & r->mask;
    uint32_t first = size - pos < n ? size - pos : n;
    memcpy(dst, r->entries + (size_t)pos * IPC_DESC_SIZE, (size_t)first * IPC_DESC_SIZE);
    if (n > first)
        memcpy(dst + (size_t)first * IPC_DESC_SIZE, r->entries, (size_t)(n - first) * IPC_DESC_SIZE);
}

int ipc_ring_push_burst(ipc_ring *r, const void *descs, uint32_t n)
{
    uint32_t tail = r->local;
    uint32_t size = r->mask + 1;
    uint32_t free_n = size - (tail - r->cached); /* cached was checked: <= size */
    if (free_n < n) {
        int f = ring_prod_refresh(r);
        if (f < 0)
            return f;
        free_n = (uint32_t)f;
    }
    if (n > free_n)
        n = free_n;
    if (n == 0)
        return 0;
    ring_copy_in(r, tail, descs, n);
    /* R1 pairs with A2 */
    IPC_STORE(&r->sh->tail, tail + n, __ATOMIC_RELEASE);
    r->local = tail + n;
    return (int)n;
}

int ipc_ring_pop(ipc_ring *r, void *out)
{
    uint32_t head = r->local;
    if (head == r->cached) { /* looks empty */
        int ready = ring_cons_refresh(r);
        if (ready <= 0)
            return ready;
    }
    memcpy(out, r->entries + (size_t)(head & r->mask) * IPC_DESC_SIZE, IPC_DESC_SIZE);
    /* R2 pairs with A1 */
    IPC_STORE(&r->sh->head, head + 1, __ATOMIC_RELEASE);
    r->local = head + 1;
    return 1;
}

int ipc_ring_pop_burst(ipc_ring *r, void *out, uint32_t n)
{
    uint32_t head = r->local;
    uint32_t ready = r->cached - head; /* cached was checked: <= size */
    if (ready < n) {
        int rd = ring_cons_refresh(r);
        if (rd < 0)
            return rd;
        ready = (uint32_t)rd;
    }
    if (n > ready)
        n = ready;
    if (n == 0)
        return 0;
    ring_copy_out(r, head, out, n);
    /* R2 pairs with A1 */
    IPC_STORE(&r->sh->head, head + n, __ATOMIC_RELEASE);
    r->local = head + n;
    return (int)n;
}

int ipc_ring_count(ipc_ring *r)
{
    return r->role == IPC_RING_PRODUCER ? ring_prod_refresh(r) : ring_cons_refresh(r);
}

bool ipc_ring_empty(ipc_ring *r)
{
    if (r->local != r->cached)
        return false;
    return ring_cons_refresh(r) == 0;
}
