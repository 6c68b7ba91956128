/* ipc_kv — the shared KV pool of disaggregated serving (docs/disaggregation.md).
 *
 * gorgond creates, for a deployment with prefill and decode groups:
 *   - one control memfd (this header, the block owners and two hand-off
 *     areas per request slot), mapped by every rank of every group;
 *   - one pool memfd per tensor-parallel rank index r, shared by rank r of
 *     every group: the K/V blocks themselves (engine/kv.h layout). Its size
 *     depends on the model's shard, which gorgond does not load: the first
 *     rank to map it sizes it, the others check the size.
 *
 * Ownership: owner[b] is the group that block b belongs to, written only by
 * gorgond (the authority; workers read it when they start, to find their
 * share). A hand-off moves a request's blocks from a prefill group to a
 * decode group, which gives as many of its free blocks back: each group's
 * share stays the same size and no K/V moves. Blocks between HANDOFF and
 * ADOPTED are IPC_KV_TRANSIT: no group starting then takes them.
 *
 * Areas: OUT[req] is written by the worker that emits HANDOFF/ADOPTED for
 * req (rank 0 of its group) and read by gorgond, which checks every block
 * against owner[] before using it; IN[g][req] is written by gorgond before
 * ADOPT/RECLAIM of req to group g and read by rank 0 of g when it reads the
 * command. One IN area per group and request: a RECLAIM that group g has
 * not read yet cannot be overwritten by one for a later request on the
 * same slot, which another prefill group ran (g reads its commands in
 * order, and only its own next request on the slot leads to its next
 * RECLAIM for it). */
#ifndef GORGON_IPC_KV_H
#define GORGON_IPC_KV_H

#include <stddef.h>
#include <stdint.h>

#define IPC_KV_MAGIC 0x564b5047u /* "GPKV" */
#define IPC_KV_VERSION 1u
#define IPC_KV_TRANSIT UINT32_MAX /* owner[] of a block being handed over */

struct ipc_kv_hdr {
    uint32_t magic, version;
    uint32_t n_blocks;   /* blocks in the pool */
    uint32_t n_req;      /* request slots */
    uint32_t max_blocks; /* table entries one area holds */
    uint32_t n_groups;   /* IN areas per request */
    uint64_t area_bytes; /* bytes of one area */
    uint64_t owner_off, out_off, in_off, total_bytes;
    uint8_t rsvd[16];
};
_Static_assert(sizeof(struct ipc_kv_hdr) == 80, "kv ctl header");

struct ipc_kv_area {
    uint32_t n_blocks;
    uint32_t kv_len;  /* positions the blocks hold (HANDOFF) */
    uint64_t rng[4];  /* the request's sampler RNG after its first token */
    int32_t blocks[]; /* [max_blocks] */
};

enum ipc_kv_dir { IPC_KV_OUT = 0, IPC_KV_IN = 1 };

typedef struct ipc_kv_ctl {
    int fd;
    void *base;
    size_t size;
    struct ipc_kv_hdr *hdr;
    uint32_t *owner; /* [n_blocks] */
} ipc_kv_ctl;

/* gorgond: memfd + header, every block owned by group 0 (set owner[] next).
 * -errno, nothing left open. */
int ipc_kv_ctl_create(ipc_kv_ctl *c, uint32_t n_blocks, uint32_t n_req, uint32_t max_blocks,
                      uint32_t n_groups);
/* worker: map fd (taken over on success) and check the header against its
 * size; -EPROTO with a message in why. */
int ipc_kv_ctl_map(ipc_kv_ctl *c, int fd, char *why, size_t cap);
void ipc_kv_ctl_unmap(ipc_kv_ctl *c); /* safe on a zeroed one with fd -1 */
/* OUT[req] (group ignored) or IN[group][req]; both indices in range. */
struct ipc_kv_area *ipc_kv_area(const ipc_kv_ctl *c, enum ipc_kv_dir dir, uint32_t group,
                                uint32_t req);

/* A pool memfd, empty (gorgond). fd or -errno. */
int ipc_kv_pool_create(void);
/* Map pool fd at `bytes`: an empty one is sized to it, one of another size
 * is refused (-EPROTO, why). *mem on success (64-byte aligned). */
int ipc_kv_pool_map(int fd, size_t bytes, void **mem, char *why, size_t cap);

#endif
