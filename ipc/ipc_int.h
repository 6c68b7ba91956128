/* ipc_int.h — internal to ipc/: never included from another module.
 *
 * Shared fields of ipc_abi.h are plain uint32_t (the ABI header stays
 * C/C++/Python friendly); every access to one that the peer may touch
 * concurrently goes through these wrappers, so a grep for IPC_LOAD/IPC_STORE
 * finds every synchronising access. The memory order is always spelled out
 * at the call site, next to the label of the access it pairs with. */
#ifndef GORGON_IPC_INT_H
#define GORGON_IPC_INT_H

#include <stdint.h>

#include "ipc/ipc_abi.h"

#define IPC_TAG "ipc"

#define IPC_LOAD(p, mo) __atomic_load_n((p), (mo))
#define IPC_STORE(p, v, mo) __atomic_store_n((p), (v), (mo))

/* Full (store->load) fence of the NEED_WAKEUP protocol. TSan does not model
 * standalone fences (GCC warns, -Wtsan), so under TSan it becomes a seq_cst
 * RMW on a local: on x86 the same locked instruction, and TSan instruments it. */
#if defined(__SANITIZE_THREAD__)
#define IPC_FULL_FENCE()                                                       \
    do {                                                                       \
        uint32_t ipc_fence_dummy_ = 0;                                         \
        __atomic_fetch_add(&ipc_fence_dummy_, 0, __ATOMIC_SEQ_CST);            \
    } while (0)
#else
#define IPC_FULL_FENCE() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#endif

/* Round up to a power-of-two alignment; callers check for overflow. */
static inline uint64_t ipc_align_up(uint64_t v, uint64_t a)
{
    return (v + a - 1) & ~(a - 1);
}

static inline int ipc_is_pow2(uint64_t v)
{
    return v != 0 && (v & (v - 1)) == 0;
}

/* Ring geometry check shared by ring attach and region validation. */
static inline int ipc_ring_entries_ok(uint64_t n)
{
    return ipc_is_pow2(n) && n >= IPC_RING_MIN_ENTRIES && n <= IPC_RING_MAX_ENTRIES;
}

#endif
