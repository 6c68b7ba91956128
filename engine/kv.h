/* engine KV cache — a paged pool of key/value blocks plus per-sequence block
 * tables, the memory the forward pass (engine/model.h) attends over.
 *
 * Role in the request path: the scheduler admits a request against
 * eng_kv_free_blocks(), gives it a sequence (eng_kv_seq_alloc), the forward
 * pass appends the K/V of every new token, Medusa compacts the accepted tree
 * nodes with eng_kv_copy_positions() + eng_kv_seq_truncate(), and the
 * sequence's blocks go back to the pool with eng_kv_seq_free().
 *
 * Layout (what kn_attn_args expects), per layer l:
 *   K(l): [n_blocks][block_size][n_kv_head][head_dim] float
 *   V(l): same shape
 * Position p of a sequence lives in block table[p / block_size], slot
 * p % block_size. The pool is one contiguous area (K0 V0 K1 V1 ...) of
 * backend memory: from kn_buf_alloc, or provided by the caller (on the CPU,
 * e.g. a shared-memory region, so that a prefill → decode hand-off is a
 * change of ownership). Block tables and the free list are private host
 * memory; the backend gets a copy of each table (eng_kv_seq_blocks_dev),
 * updated as blocks are handed out. Pool contents move only through backend
 * ops (the forward's kv_write, kv_copy here).
 *
 * Hand-off between caches (disaggregated prefill/decode, docs/disaggregation.md):
 * several caches may share one pool area (cfg.mem), each starting with its
 * own blocks (cfg.own). eng_kv_seq_detach() takes a sequence's blocks out of
 * one cache with their contents; eng_kv_seq_adopt() makes them a sequence of
 * another, which gives as many of its free blocks back in exchange, and
 * eng_kv_give() puts those into the first cache's free list. Each cache's
 * block count stays the same; no K/V is copied.
 *
 * Threading: an eng_kv is not locked; one thread (the worker loop) calls it.
 * No call allocates after eng_kv_create(). Every call that fails leaves the
 * cache exactly as it was and (for errors a user can cause) leaves a message
 * in eng_error().
 *
 *   eng_kv *kv;
 *   eng_kv_create(&kv, kn, &(eng_kv_cfg){.n_layer = 5, .n_kv_head = 4, .head_dim = 8,
 *                                    .block_size = 16, .n_blocks = 256,
 *                                    .max_seqs = 8, .max_seq_len = 512});
 *   int s = eng_kv_seq_alloc(kv);
 *   eng_kv_seq_append(kv, s, 12);     // room for 12 positions, len 12
 *   eng_kv_seq_free(kv, s);
 *   eng_kv_destroy(kv);
 */
#ifndef GORGON_ENG_KV_H
#define GORGON_ENG_KV_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/kn.h"

typedef struct eng_kv eng_kv;

typedef struct eng_kv_cfg {
    int n_layer;
    int n_kv_head;
    int head_dim;
    int block_size;      /* positions per block (> 0) */
    int64_t n_blocks;    /* blocks in the pool, shared by all sequences */
    int max_seqs;        /* sequence slots */
    int64_t max_seq_len; /* positions one sequence may hold */
    /* Optional: a caller-owned area of backend memory (on the CPU: any host
     * memory) of at least eng_kv_pool_bytes() bytes, 64-byte aligned, that
     * outlives the cache. NULL: kn_buf_alloc. */
    void *mem;
    size_t mem_size;
    /* Optional: the blocks this cache starts with (distinct, < n_blocks);
     * NULL: all n_blocks. The others belong to other caches sharing mem. */
    const int32_t *own;
    int64_t n_own;
} eng_kv_cfg;

/* Bytes of the K/V pool for cfg (0 when cfg is invalid or overflows). */
size_t eng_kv_pool_bytes(const eng_kv_cfg *cfg);

/* The cache lives on backend kn (which outlives it). -EINVAL on a bad cfg
 * or NULL kn (message in eng_error()), -ENOMEM. */
int eng_kv_create(eng_kv **out, kn_ctx *kn, const eng_kv_cfg *cfg);
void eng_kv_destroy(eng_kv *kv); /* NULL: no-op */

/* A free sequence slot (length 0, no blocks): its id >= 0, or -ENOSPC when
 * all max_seqs slots are taken. */
int eng_kv_seq_alloc(eng_kv *kv);
/* Return the sequence's blocks to the pool and its slot to the free slots.
 * -EINVAL for an id that is not allocated. */
int eng_kv_seq_free(eng_kv *kv, int seq);

/* Positions written (the next token goes to position eng_kv_seq_len). */
int64_t eng_kv_seq_len(const eng_kv *kv, int seq);
/* Positions the sequence's blocks can hold without allocating. */
int64_t eng_kv_seq_capacity(const eng_kv *kv, int seq);
/* The block table: entry b is the pool block of positions [b*bs, (b+1)*bs).
 * Valid until the next call that changes this sequence. _dev: the backend's
 * copy (what kn_attn_args.block_table wants), same entries. */
const int32_t *eng_kv_seq_blocks(const eng_kv *kv, int seq);
const int32_t *eng_kv_seq_blocks_dev(const eng_kv *kv, int seq);
/* The pool slot (block * block_size + offset) of position pos of seq, for
 * kn_ops.kv_write; -EINVAL for a position beyond the sequence's capacity. */
int64_t eng_kv_slot(const eng_kv *kv, int seq, int64_t pos);

/* Make room for n_total positions (allocating blocks; len unchanged).
 * -ENOSPC when the pool has too few free blocks or n_total > max_seq_len:
 * nothing changed. */
int eng_kv_seq_reserve(eng_kv *kv, int seq, int64_t n_total);
/* All-or-nothing reserve for several sequences: sequence seqs[i] gets room for
 * len + n_new[i] positions. On -ENOSPC/-EINVAL no sequence changed. */
int eng_kv_reserve_batch(eng_kv *kv, const int *seqs, const int64_t *n_new, int n);
/* Reserve room for n more positions and count them as written (len += n).
 * Returns the new length or -ENOSPC/-EINVAL (nothing changed). */
int64_t eng_kv_seq_append(eng_kv *kv, int seq, int64_t n);
/* Shorten to len (<= current length) and free the blocks no longer needed. */
int eng_kv_seq_truncate(eng_kv *kv, int seq, int64_t len);

/* Copy K and V (every layer) of positions src[i] to positions dst[i] of the
 * same sequence, for i < n, as if all sources were read before any
 * destination is written. Every position must be < length. Medusa KV
 * compaction: copy the accepted nodes' slots to len, len+1, ... then
 * eng_kv_seq_truncate(). -EINVAL (nothing changed) for a position out of
 * range or when a destination is later used as a source (dst[i] == src[j],
 * j > i), which in-place copying could not honour. */
int eng_kv_copy_positions(eng_kv *kv, int seq, const int32_t *src, const int32_t *dst,
                          int64_t n);

/* Hand-off. Detach: the sequence's blocks (its table, n entries, written to
 * blocks[0..n), cap entries at most) leave this cache with their contents
 * and the sequence slot is freed; returns n, -EINVAL for a sequence that is
 * not allocated, -ENOSPC when cap is too small (nothing changed). */
int64_t eng_kv_seq_detach(eng_kv *kv, int seq, int32_t *blocks, int64_t cap);
/* Adopt: allocated sequence seq, still empty, takes blocks[0..n) (blocks
 * that are not this cache's, distinct, in range) as its table holding len
 * (<= n * block_size) positions, and n of this cache's free blocks leave it
 * in exchange, written to give_back[0..n). -EINVAL for bad blocks or a bad
 * sequence, -ENOSPC when fewer than n blocks are free; nothing changed then. */
int eng_kv_seq_adopt(eng_kv *kv, int seq, const int32_t *blocks, int64_t n, int64_t len,
                     int32_t *give_back);
/* Give: blocks[0..n) join this cache's free blocks; blocks it already has
 * are skipped (a give may be repeated). Returns how many joined, or -EINVAL
 * for a block out of range (nothing changed). */
int64_t eng_kv_give(eng_kv *kv, const int32_t *blocks, int64_t n);

/* Pool geometry and accounting. eng_kv_n_blocks is the pool's; the cache's
 * own share is eng_kv_owned_blocks (free or in its sequences). */
int64_t eng_kv_free_blocks(const eng_kv *kv);
int64_t eng_kv_n_blocks(const eng_kv *kv);
int64_t eng_kv_owned_blocks(const eng_kv *kv);
int eng_kv_block_size(const eng_kv *kv);
int eng_kv_max_seqs(const eng_kv *kv);
int64_t eng_kv_max_seq_len(const eng_kv *kv);
/* Base of layer l's K / V pool ([n_blocks][block_size][n_kv_head][head_dim]),
 * a backend address (readable by the host only where kn_ctx_host_memory). */
float *eng_kv_k(eng_kv *kv, int layer);
float *eng_kv_v(eng_kv *kv, int layer);
/* Backend address of the K (or V) vector [n_kv_head][head_dim] of position
 * pos of seq in layer l; pos must be < capacity (internal invariant). */
float *eng_kv_k_at(eng_kv *kv, int layer, int seq, int64_t pos);
float *eng_kv_v_at(eng_kv *kv, int layer, int seq, int64_t pos);

#endif
