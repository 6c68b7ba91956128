#include "engine/kv.h"

#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "common/common.h"
#include "engine/model/eng_err.h"
#include "kernels/kn.h"

typedef struct kv_seq {
    bool used;
    int64_t len;      /* positions written */
    int64_t n_blocks; /* entries of table in use */
    int32_t *table;   /* [max_blocks_per_seq] */
} kv_seq;

struct eng_kv {
    eng_kv_cfg cfg;
    kn_ctx *kn;
    int64_t max_blocks_per_seq;
    int64_t layer_floats; /* floats of one layer's K (or V) pool */
    int64_t pos_floats;   /* n_kv_head * head_dim */
    float *pool;          /* K0 V0 K1 V1 ... (backend memory) */
    size_t pool_bytes;
    bool pool_owned; /* from kn_buf_alloc (else the caller's) */

    /* Free blocks as a stack: a freed block is the next one handed out, which
     * keeps the working set of the pool small and warm in cache. */
    int32_t *free_stack;
    int64_t n_free;
    uint8_t *mine;   /* [n_blocks]: 1 = this cache's (free or in a table) */
    int64_t n_owned; /* blocks with mine set */

    kv_seq *seqs;
    int32_t *tables;   /* max_seqs * max_blocks_per_seq */
    int32_t *tables_d; /* the same in backend memory (attention reads it there);
                        * entries are uploaded as blocks are handed out */
};

static int64_t div_up(int64_t a, int64_t b)
{
    return (a + b - 1) / b;
}

size_t eng_kv_pool_bytes(const eng_kv_cfg *c)
{
    if (!c || c->n_layer <= 0 || c->n_kv_head <= 0 || c->head_dim <= 0 || c->block_size <= 0 ||
        c->n_blocks <= 0)
        return 0;
    __int128 b = (__int128)c->n_layer * 2 * c->n_blocks * c->block_size * c->n_kv_head *
                 c->head_dim * (int64_t)sizeof(float);
    if (b > (__int128)(SIZE_MAX / 2))
        return 0;
    return (size_t)b;
}

int eng_kv_create(eng_kv **out, kn_ctx *kn, const eng_kv_cfg *cfg)
{
    *out = NULL;
    if (!kn)
        return eng_fail(-EINVAL, "kv: no backend (kn_ctx) given");
    size_t bytes = eng_kv_pool_bytes(cfg);
    if (!bytes)
        return eng_fail(-EINVAL, "kv: bad geometry (layers, kv heads, head_dim, block size and "
                                 "block count must be > 0 and fit in memory)");
    if (cfg->max_seqs <= 0 || cfg->max_seq_len <= 0)
        return eng_fail(-EINVAL, "kv: max_seqs (%d) and max_seq_len (%lld) must be > 0",
                        cfg->max_seqs, (long long)cfg->max_seq_len);
    if (cfg->n_blocks > INT32_MAX / cfg->block_size)
        return eng_fail(-EINVAL, "kv: %lld blocks of %d positions exceed the 32-bit slot "
                                 "numbers of the backend's KV writes",
                        (long long)cfg->n_blocks, cfg->block_size);
    if (cfg->mem) {
        if (cfg->mem_size < bytes)
            return eng_fail(-EINVAL, "kv: caller area of %zu bytes is smaller than the %zu "
                                     "bytes the pool needs",
                            cfg->mem_size, bytes);
        if ((uintptr_t)cfg->mem % 64)
            return eng_fail(-EINVAL, "kv: caller area is not 64-byte aligned");
    }

    eng_kv *kv = calloc(1, sizeof(*kv));
    if (!kv)
        return -ENOMEM;
    kv->cfg = *cfg;
    kv->kn = kn;
    kv->max_blocks_per_seq = div_up(cfg->max_seq_len, cfg->block_size);
    kv->pos_floats = (int64_t)cfg->n_kv_head * cfg->head_dim;
    kv->layer_floats = cfg->n_blocks * cfg->block_size * kv->pos_floats;
    kv->pool_bytes = bytes;
    kv->free_stack = malloc((size_t)cfg->n_blocks * sizeof(int32_t));
    kv->mine = calloc((size_t)cfg->n_blocks, 1);
    kv->seqs = calloc((size_t)cfg->max_seqs, sizeof(kv_seq));
    kv->tables = malloc((size_t)cfg->max_seqs * (size_t)kv->max_blocks_per_seq * sizeof(int32_t));
    const size_t table_bytes =
        (size_t)cfg->max_seqs * (size_t)kv->max_blocks_per_seq * sizeof(int32_t);
    if (!kv->free_stack || !kv->mine || !kv->seqs || !kv->tables ||
        kn_buf_alloc(kn, table_bytes, (void **)&kv->tables_d) < 0) {
        eng_kv_destroy(kv);
        return -ENOMEM;
    }
    if (cfg->mem) {
        kv->pool = cfg->mem;
    } else {
        int rc = kn_buf_alloc(kn, bytes, (void **)&kv->pool);
        if (rc < 0) {
            eng_kv_destroy(kv);
            return eng_fail(rc, "kv: cannot allocate a %zu-byte pool: %s", bytes,
                            cm_strerror(rc));
        }
        kv->pool_owned = true;
    }
    /* Block 0 (or the first own block) on top of the stack, so a fresh
     * cache hands out 0, 1, 2, ... */
    const int64_t n_own = cfg->own ? cfg->n_own : cfg->n_blocks;
    if (n_own < 0 || n_own > cfg->n_blocks) {
        eng_kv_destroy(kv);
        return eng_fail(-EINVAL, "kv: %lld own blocks in a pool of %lld", (long long)n_own,
                        (long long)cfg->n_blocks);
    }
    for (int64_t i = 0; i < n_own; i++) {
        int32_t b = cfg->own ? cfg->own[n_own - 1 - i] : (int32_t)(cfg->n_blocks - 1 - i);
        if (b < 0 || b >= cfg->n_blocks || kv->mine[b]) {
            eng_kv_destroy(kv);
            return eng_fail(-EINVAL, "kv: own block %d is out of the pool's %lld or listed twice",
                            b, (long long)cfg->n_blocks);
        }
        kv->mine[b] = 1;
        kv->free_stack[i] = b;
    }
    kv->n_free = kv->n_owned = n_own;
    for (int i = 0; i < cfg->max_seqs; i++)
        kv->seqs[i].table = kv->tables + (size_t)i * (size_t)kv->max_blocks_per_seq;
    *out = kv;
    return 0;
}

void eng_kv_destroy(eng_kv *kv)
{
    if (!kv)
        return;
    if (kv->pool_owned)
        kn_buf_free(kv->kn, kv->pool);
    kn_buf_free(kv->kn, kv->tables_d);
    free(kv->free_stack);
    free(kv->mine);
    free(kv->seqs);
    free(kv->tables);
    free(kv);
}

static kv_seq *seq_get(const eng_kv *kv, int seq)
{
    if (seq < 0 || seq >= kv->cfg.max_seqs || !kv->seqs[seq].used)
        return NULL;
    return &kv->seqs[seq];
}

int eng_kv_seq_alloc(eng_kv *kv)
{
    for (int i = 0; i < kv->cfg.max_seqs; i++) {
        kv_seq *s = &kv->seqs[i];
        if (!s->used) {
            s->used = true;
            s->len = 0;
            s->n_blocks = 0;
            return i;
        }
    }
    return eng_fail(-ENOSPC, "kv: all %d sequence slots are in use", kv->cfg.max_seqs);
}

static void release_blocks(eng_kv *kv, kv_seq *s, int64_t keep)
{
    while (s->n_blocks > keep)
        kv->free_stack[kv->n_free++] = s->table[--s->n_blocks];
}

int eng_kv_seq_free(eng_kv *kv, int seq)
{
    kv_seq *s = seq_get(kv, seq);
    if (!s)
        return eng_fail(-EINVAL, "kv: sequence %d is not allocated", seq);
    release_blocks(kv, s, 0);
    s->len = 0;
    s->used = false;
    return 0;
}

int64_t eng_kv_seq_len(const eng_kv *kv, int seq)
{
    const kv_seq *s = seq_get(kv, seq);
    return s ? s->len : -EINVAL;
}

int64_t eng_kv_seq_capacity(const eng_kv *kv, int seq)
{
    const kv_seq *s = seq_get(kv, seq);
    return s ? s->n_blocks * kv->cfg.block_size : -EINVAL;
}

const int32_t *eng_kv_seq_blocks(const eng_kv *kv, int seq)
{
    const kv_seq *s = seq_get(kv, seq);
    return s ? s->table : NULL;
}

const int32_t *eng_kv_seq_blocks_dev(const eng_kv *kv, int seq)
{
    const kv_seq *s = seq_get(kv, seq);
    return s ? kv->tables_d + (s->table - kv->tables) : NULL;
}

int64_t eng_kv_slot(const eng_kv *kv, int seq, int64_t pos)
{
    const kv_seq *s = seq_get(kv, seq);
    if (!s || pos < 0 || pos >= s->n_blocks * kv->cfg.block_size)
        return -EINVAL;
    const int64_t bs = kv->cfg.block_size;
    return (int64_t)s->table[pos / bs] * bs + pos % bs;
}

/* Blocks seq needs beyond what it has to hold n_total positions, or -ENOSPC
 * when n_total exceeds the per-sequence limit. */
static int64_t blocks_needed(const eng_kv *kv, const kv_seq *s, int seq, int64_t n_total)
{
    if (n_total > kv->cfg.max_seq_len)
        return eng_fail(-ENOSPC, "kv: sequence %d would hold %lld positions, more than the "
                                 "%lld allowed per sequence",
                        seq, (long long)n_total, (long long)kv->cfg.max_seq_len);
    int64_t want = div_up(n_total, kv->cfg.block_size);
    return want > s->n_blocks ? want - s->n_blocks : 0;
}

static void grab_blocks(eng_kv *kv, kv_seq *s, int64_t n)
{
    CM_ASSERT(n <= kv->n_free);
    const int64_t first = s->n_blocks;
    for (int64_t i = 0; i < n; i++)
        s->table[s->n_blocks++] = kv->free_stack[--kv->n_free];
    if (n == 0)
        return;
    /* The backend's copy of the new entries (queued before the ops that
     * read them; cannot fail for a range inside the table). */
    const size_t off = (size_t)(s->table - kv->tables) + (size_t)first;
    int rc = kn_buf_upload(kv->kn, kv->tables_d + off, s->table + first,
                           (size_t)n * sizeof(int32_t));
    CM_ASSERT(rc == 0);
}

static int no_space(const eng_kv *kv, int64_t need)
{
    return eng_fail(-ENOSPC, "kv: cache full: %lld more blocks of %d positions needed, %lld of "
                             "%lld free",
                    (long long)need, kv->cfg.block_size, (long long)kv->n_free,
                    (long long)kv->cfg.n_blocks);
}

int eng_kv_seq_reserve(eng_kv *kv, int seq, int64_t n_total)
{
    kv_seq *s = seq_get(kv, seq);
    if (!s || n_total < 0)
        return eng_fail(-EINVAL, "kv: reserve on bad sequence %d or negative size", seq);
    int64_t need = blocks_needed(kv, s, seq, n_total);
    if (need < 0)
        return (int)need;
    if (need > kv->n_free)
        return no_space(kv, need);
    grab_blocks(kv, s, need);
    return 0;
}

int eng_kv_reserve_batch(eng_kv *kv, const int *seqs, const int64_t *n_new, int n)
{
    int64_t total = 0;
    for (int i = 0; i < n; i++) {
        kv_seq *s = seq_get(kv, seqs[i]);
        if (!s || n_new[i] < 0)
            return eng_fail(-EINVAL, "kv: batch entry %d: bad sequence %d or negative size", i,
                            seqs[i]);
        for (int j = 0; j < i; j++)
            if (seqs[j] == seqs[i])
                return eng_fail(-EINVAL, "kv: sequence %d appears twice in one batch", seqs[i]);
        int64_t need = blocks_needed(kv, s, seqs[i], s->len + n_new[i]);
        if (need < 0)
            return (int)need;
        total += need;
    }
    if (total > kv->n_free)
        return no_space(kv, total);
    for (int i = 0; i < n; i++) {
        kv_seq *s = &kv->seqs[seqs[i]];
        grab_blocks(kv, s, blocks_needed(kv, s, seqs[i], s->len + n_new[i]));
    }
    return 0;
}

int64_t eng_kv_seq_append(eng_kv *kv, int seq, int64_t n)
{
    kv_seq *s = seq_get(kv, seq);
    if (!s || n < 0)
        return eng_fail(-EINVAL, "kv: append on bad sequence %d or negative count", seq);
    int rc = eng_kv_seq_reserve(kv, seq, s->len + n);
    if (rc < 0)
        return rc;
    s->len += n;
    return s->len;
}

int eng_kv_seq_truncate(eng_kv *kv, int seq, int64_t len)
{
    kv_seq *s = seq_get(kv, seq);
    if (!s || len < 0 || len > s->len)
        return eng_fail(-EINVAL, "kv: truncate sequence %d to %lld: bad sequence or longer than "
                                 "its %lld positions",
                        seq, (long long)len, s ? (long long)s->len : -1LL);
    s->len = len;
    release_blocks(kv, s, div_up(len, kv->cfg.block_size));
    return 0;
}

static int32_t pos_slot(const eng_kv *kv, const kv_seq *s, int64_t pos)
{
    int64_t bs = kv->cfg.block_size;
    return (int32_t)((int64_t)s->table[pos / bs] * bs + pos % bs);
}

static size_t pos_offset(const eng_kv *kv, const kv_seq *s, int64_t pos)
{
    return (size_t)pos_slot(kv, s, pos) * (size_t)kv->pos_floats;
}

float *eng_kv_k(eng_kv *kv, int layer)
{
    return kv->pool + (size_t)(2 * layer) * (size_t)kv->layer_floats;
}

float *eng_kv_v(eng_kv *kv, int layer)
{
    return kv->pool + (size_t)(2 * layer + 1) * (size_t)kv->layer_floats;
}

float *eng_kv_k_at(eng_kv *kv, int layer, int seq, int64_t pos)
{
    return eng_kv_k(kv, layer) + pos_offset(kv, &kv->seqs[seq], pos);
}

float *eng_kv_v_at(eng_kv *kv, int layer, int seq, int64_t pos)
{
    return eng_kv_v(kv, layer) + pos_offset(kv, &kv->seqs[seq], pos);
}

int eng_kv_copy_positions(eng_kv *kv, int seq, const int32_t *src, const int32_t *dst, int64_t n)
{
    kv_seq *s = seq_get(kv, seq);
    if (!s || n < 0)
        return eng_fail(-EINVAL, "kv: copy on bad sequence %d", seq);
    for (int64_t i = 0; i < n; i++) {
        if (src[i] < 0 || src[i] >= s->len || dst[i] < 0 || dst[i] >= s->len)
            return eng_fail(-EINVAL, "kv: copy %d -> %d outside sequence %d of length %lld",
                            src[i], dst[i], seq, (long long)s->len);
        for (int64_t j = i + 1; j < n; j++)
            if (dst[i] == src[j])
                return eng_fail(-EINVAL, "kv: copy entry %lld overwrites position %d before "
                                         "entry %lld reads it",
                                (long long)i, dst[i], (long long)j);
    }
    /* The backend copies pool rows (slots) in every layer's K and V plane,
     * a chunk at a time (in order, which the check above makes equivalent
     * to reading every source first). */
    enum { CHUNK = 64 };
    int32_t so[CHUNK], d[CHUNK];
    for (int64_t i0 = 0; i0 < n; i0 += CHUNK) {
        int64_t m = 0;
        for (int64_t i = i0; i < n && i < i0 + CHUNK; i++) {
            if (src[i] == dst[i])
                continue;
            so[m] = pos_slot(kv, s, src[i]);
            d[m] = pos_slot(kv, s, dst[i]);
            m++;
        }
        if (m == 0)
            continue;
        int rc = kn_ctx_ops(kv->kn)->kv_copy(kv->kn, kv->pool, 2 * (int64_t)kv->cfg.n_layer,
                                             kv->layer_floats, kv->pos_floats, so, d, m);
        if (rc < 0)
            return eng_fail(rc, "kv: backend copy of %lld positions failed: %s", (long long)m,
                            cm_strerror(rc));
    }
    return 0;
}

int64_t eng_kv_free_blocks(const eng_kv *kv)
{
    return kv->n_free;
}

int64_t eng_kv_n_blocks(const eng_kv *kv)
{
    return kv->cfg.n_blocks;
}

int64_t eng_kv_owned_blocks(const eng_kv *kv)
{
    return kv->n_owned;
}

int64_t eng_kv_seq_detach(eng_kv *kv, int seq, int32_t *blocks, int64_t cap)
{
    kv_seq *s = seq_get(kv, seq);
    if (!s)
        return eng_fail(-EINVAL, "kv: detach of sequence %d, which is not allocated", seq);
    const int64_t n = s->n_blocks;
    if (n > cap)
        return eng_fail(-ENOSPC, "kv: sequence %d has %lld blocks, room for %lld", seq,
                        (long long)n, (long long)cap);
    for (int64_t i = 0; i < n; i++) {
        blocks[i] = s->table[i];
        kv->mine[s->table[i]] = 0;
    }
    kv->n_owned -= n;
    s->n_blocks = 0;
    s->len = 0;
    s->used = false;
    return n;
}

int eng_kv_seq_adopt(eng_kv *kv, int seq, const int32_t *blocks, int64_t n, int64_t len,
                     int32_t *give_back)
{
    kv_seq *s = seq_get(kv, seq);
    if (!s || s->n_blocks || s->len)
        return eng_fail(-EINVAL, "kv: adopt into sequence %d, which is not allocated and empty",
                        seq);
    if (n < 0 || n > kv->max_blocks_per_seq || len < 0 || len > n * kv->cfg.block_size)
        return eng_fail(-EINVAL, "kv: adopt of %lld blocks holding %lld positions (at most %lld "
                                 "blocks of %d per sequence)",
                        (long long)n, (long long)len, (long long)kv->max_blocks_per_seq,
                        kv->cfg.block_size);
    if (n > kv->n_free)
        return no_space(kv, n);
    int64_t i = 0;
    for (; i < n; i++) {
        const int32_t b = blocks[i];
        if (b < 0 || b >= kv->cfg.n_blocks || kv->mine[b])
            break;
        kv->mine[b] = 1; /* marks duplicates too; undone below on failure */
    }
    if (i < n) {
        const int32_t bad = blocks[i];
        while (i-- > 0)
            kv->mine[blocks[i]] = 0;
        return eng_fail(-EINVAL, "kv: adopted block %d is out of the pool's %lld, this "
                                 "cache's already, or listed twice",
                        bad, (long long)kv->cfg.n_blocks);
    }
    for (i = 0; i < n; i++) {
        give_back[i] = kv->free_stack[--kv->n_free];
        kv->mine[give_back[i]] = 0;
        s->table[i] = blocks[i];
    }
    s->n_blocks = n;
    s->len = len;
    if (n) {
        const size_t off = (size_t)(s->table - kv->tables);
        int rc = kn_buf_upload(kv->kn, kv->tables_d + off, s->table, (size_t)n * sizeof(int32_t));
        CM_ASSERT(rc == 0);
    }
    return 0;
}

int64_t eng_kv_give(eng_kv *kv, const int32_t *blocks, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        if (blocks[i] < 0 || blocks[i] >= kv->cfg.n_blocks)
            return eng_fail(-EINVAL, "kv: given block %d is out of the pool's %lld", blocks[i],
                            (long long)kv->cfg.n_blocks);
    int64_t added = 0;
    for (int64_t i = 0; i < n; i++) {
        if (kv->mine[blocks[i]])
            continue;
        kv->mine[blocks[i]] = 1;
        kv->free_stack[kv->n_free++] = blocks[i];
        added++;
    }
    kv->n_owned += added;
    return added;
}

int eng_kv_block_size(const eng_kv *kv)
{
    return kv->cfg.block_size;
}

int eng_kv_max_seqs(const eng_kv *kv)
{
    return kv->cfg.max_seqs;
}

int64_t eng_kv_max_seq_len(const eng_kv *kv)
{
    return kv->cfg.max_seq_len;
}
