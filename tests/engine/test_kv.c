/* Paged KV cache: block accounting, -ENOSPC without side effects, compaction. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/model/eng_err.h"
#include "engine/kv.h"

static eng_kv_cfg small_cfg(void)
{
    return (eng_kv_cfg){.n_layer = 2, .n_kv_head = 2, .head_dim = 4, .block_size = 4,
                        .n_blocks = 8, .max_seqs = 3, .max_seq_len = 24};
}

/* The CPU backend every cache here lives on (host memory is backend
 * memory, so the tests read and write the pool directly). */
static kn_ctx *backend(void)
{
    static kn_ctx *kn;
    if (!kn)
        cr_assert_eq(kn_ctx_create(&kn, &(kn_ctx_cfg){.n_threads = 1}), 0);
    return kn;
}

static eng_kv *make(const eng_kv_cfg *cfg)
{
    eng_kv *kv = NULL;
    cr_assert_eq(eng_kv_create(&kv, backend(), cfg), 0, "%s", eng_error());
    return kv;
}

/* Fill K and V of every position < len of seq with a value naming
 * (layer, K/V, position, element). */
static float tag(int l, int which, int64_t p, int e)
{
    return (float)(l * 100000 + which * 10000 + p * 10 + e);
}

static void fill(eng_kv *kv, int seq, int64_t len)
{
    for (int l = 0; l < 2; l++)
        for (int64_t p = 0; p < len; p++)
            for (int e = 0; e < 8; e++) {
                eng_kv_k_at(kv, l, seq, p)[e] = tag(l, 0, p, e);
                eng_kv_v_at(kv, l, seq, p)[e] = tag(l, 1, p, e);
            }
}

Test(engine_kv, blocks_are_allocated_freed_and_reused)
{
    eng_kv_cfg cfg = small_cfg();
    eng_kv *kv = make(&cfg);
    cr_assert_eq(eng_kv_free_blocks(kv), 8);
    int a = eng_kv_seq_alloc(kv), b = eng_kv_seq_alloc(kv);
    cr_assert(a >= 0 && b >= 0 && a != b);
    cr_assert_eq(eng_kv_seq_append(kv, a, 5), 5); /* 2 blocks */
    cr_assert_eq(eng_kv_seq_len(kv, a), 5);
    cr_assert_eq(eng_kv_seq_capacity(kv, a), 8);
    cr_assert_eq(eng_kv_free_blocks(kv), 6);
    int32_t a_blocks[2];
    memcpy(a_blocks, eng_kv_seq_blocks(kv, a), sizeof(a_blocks));
    cr_assert_neq(a_blocks[0], a_blocks[1]);
    cr_assert_eq(eng_kv_seq_append(kv, b, 4), 4);
    cr_assert_eq(eng_kv_free_blocks(kv), 5);
    const int32_t *bt = eng_kv_seq_blocks(kv, b);
    cr_assert(bt[0] != a_blocks[0] && bt[0] != a_blocks[1], "blocks must not be shared");

    cr_assert_eq(eng_kv_seq_free(kv, a), 0);
    cr_assert_eq(eng_kv_free_blocks(kv), 7);
    cr_assert_eq(eng_kv_seq_len(kv, a), -EINVAL, "a freed sequence is not allocated");
    cr_assert_eq(eng_kv_seq_free(kv, a), -EINVAL, "double free is refused");
    int c = eng_kv_seq_alloc(kv);
    cr_assert_eq(eng_kv_seq_append(kv, c, 8), 8);
    const int32_t *ct = eng_kv_seq_blocks(kv, c);
    /* the freed blocks are handed out again (LIFO) */
    cr_assert((ct[0] == a_blocks[0] || ct[0] == a_blocks[1]) &&
              (ct[1] == a_blocks[0] || ct[1] == a_blocks[1]));
    eng_kv_destroy(kv);
}

Test(engine_kv, seq_slots_run_out_with_enospc)
{
    eng_kv_cfg cfg = small_cfg();
    eng_kv *kv = make(&cfg);
    for (int i = 0; i < 3; i++)
        cr_assert_geq(eng_kv_seq_alloc(kv), 0);
    cr_assert_eq(eng_kv_seq_alloc(kv), -ENOSPC);
    cr_assert(strstr(eng_error(), "slots"));
    eng_kv_destroy(kv);
}

Test(engine_kv, enospc_leaves_state_unchanged)
{
    eng_kv_cfg cfg = small_cfg();
    eng_kv *kv = make(&cfg);
    int a = eng_kv_seq_alloc(kv), b = eng_kv_seq_alloc(kv);
    cr_assert_eq(eng_kv_seq_append(kv, a, 20), 20); /* 5 blocks, 3 left */
    fill(kv, a, 20);
    cr_assert_eq(eng_kv_seq_append(kv, b, 6), 6); /* 2 blocks, 1 left */
    int32_t before[5];
    memcpy(before, eng_kv_seq_blocks(kv, a), sizeof(before));

    eng_error_clear();
    cr_assert_eq(eng_kv_seq_append(kv, b, 7), -ENOSPC, "needs 2 more blocks, 1 free");
    cr_assert(strstr(eng_error(), "full"), "message: %s", eng_error());
    cr_assert_eq(eng_kv_seq_len(kv, b), 6);
    cr_assert_eq(eng_kv_seq_capacity(kv, b), 8);
    cr_assert_eq(eng_kv_free_blocks(kv), 1);

    /* longer than max_seq_len (24) */
    cr_assert_eq(eng_kv_seq_append(kv, a, 5), -ENOSPC);
    cr_assert_eq(eng_kv_seq_len(kv, a), 20);
    cr_assert_eq(memcmp(before, eng_kv_seq_blocks(kv, a), sizeof(before)), 0);

    /* batch: the first entry fits, the second does not -> neither changes */
    int seqs[2] = {a, b};
    int64_t n_new[2] = {1, 4}; /* a: 21 -> 6 blocks (+1), b: 10 -> 3 blocks (+1) = 2 > 1 */
    cr_assert_eq(eng_kv_reserve_batch(kv, seqs, n_new, 2), -ENOSPC);
    cr_assert_eq(eng_kv_seq_capacity(kv, a), 20);
    cr_assert_eq(eng_kv_seq_capacity(kv, b), 8);
    cr_assert_eq(eng_kv_free_blocks(kv), 1);
    int dup[2] = {a, a};
    int64_t one[2] = {0, 0};
    cr_assert_eq(eng_kv_reserve_batch(kv, dup, one, 2), -EINVAL);
    n_new[1] = 1; /* b: 7 -> still 2 blocks */
    cr_assert_eq(eng_kv_reserve_batch(kv, seqs, n_new, 2), 0);
    cr_assert_eq(eng_kv_free_blocks(kv), 0);

    /* contents survived all of it */
    for (int64_t p = 0; p < 20; p++)
        cr_assert_eq(eng_kv_k_at(kv, 1, a, p)[3], tag(1, 0, p, 3));
    eng_kv_destroy(kv);
}

Test(engine_kv, truncate_frees_whole_blocks_only)
{
    eng_kv_cfg cfg = small_cfg();
    eng_kv *kv = make(&cfg);
    int a = eng_kv_seq_alloc(kv);
    cr_assert_eq(eng_kv_seq_append(kv, a, 13), 13); /* 4 blocks */
    cr_assert_eq(eng_kv_free_blocks(kv), 4);
    cr_assert_eq(eng_kv_seq_truncate(kv, a, 9), 0); /* 3 blocks */
    cr_assert_eq(eng_kv_seq_len(kv, a), 9);
    cr_assert_eq(eng_kv_free_blocks(kv), 5);
    cr_assert_eq(eng_kv_seq_truncate(kv, a, 10), -EINVAL, "cannot grow by truncate");
    cr_assert_eq(eng_kv_seq_truncate(kv, a, 0), 0);
    cr_assert_eq(eng_kv_free_blocks(kv), 8);
    eng_kv_destroy(kv);
}

Test(engine_kv, copy_positions_moves_exactly_the_listed_entries)
{
    eng_kv_cfg cfg = small_cfg();
    eng_kv *kv = make(&cfg);
    int a = eng_kv_seq_alloc(kv);
    cr_assert_eq(eng_kv_seq_append(kv, a, 14), 14);
    fill(kv, a, 14);
    /* Medusa-style: nodes at 9, 11, 13 accepted -> positions 8, 9, 10 */
    int32_t src[3] = {9, 11, 13}, dst[3] = {8, 9, 10};
    cr_assert_eq(eng_kv_copy_positions(kv, a, src, dst, 3), 0);
    for (int l = 0; l < 2; l++)
        for (int64_t p = 0; p < 14; p++) {
            int64_t from = p;
            for (int i = 0; i < 3; i++)
                if (dst[i] == p)
                    from = src[i];
            for (int e = 0; e < 8; e++) {
                cr_assert_eq(eng_kv_k_at(kv, l, a, p)[e], tag(l, 0, from, e),
                             "layer %d K pos %lld elem %d", l, (long long)p, e);
                cr_assert_eq(eng_kv_v_at(kv, l, a, p)[e], tag(l, 1, from, e));
            }
        }
    cr_assert_eq(eng_kv_seq_truncate(kv, a, 11), 0);
    cr_assert_eq(eng_kv_seq_len(kv, a), 11);
    eng_kv_destroy(kv);
}

Test(engine_kv, copy_positions_rejects_bad_input_unchanged)
{
    eng_kv_cfg cfg = small_cfg();
    eng_kv *kv = make(&cfg);
    int a = eng_kv_seq_alloc(kv);
    cr_assert_eq(eng_kv_seq_append(kv, a, 6), 6);
    fill(kv, a, 6);
    int32_t src[2] = {1, 6}, dst[2] = {0, 2};
    cr_assert_eq(eng_kv_copy_positions(kv, a, src, dst, 2), -EINVAL, "6 is past the end");
    /* 0 -> 1 then 1 -> 2 would copy the new value of 1: refused */
    int32_t s2[2] = {0, 1}, d2[2] = {1, 2};
    cr_assert_eq(eng_kv_copy_positions(kv, a, s2, d2, 2), -EINVAL);
    for (int64_t p = 0; p < 6; p++)
        cr_assert_eq(eng_kv_k_at(kv, 0, a, p)[0], tag(0, 0, p, 0), "position %lld changed",
                     (long long)p);
    eng_kv_destroy(kv);
}

Test(engine_kv, caller_memory_holds_the_pool)
{
    eng_kv_cfg cfg = small_cfg();
    size_t bytes = eng_kv_pool_bytes(&cfg);
    cr_assert_eq(bytes, (size_t)2 * 2 * 8 * 4 * 2 * 4 * sizeof(float));
    void *mem = aligned_alloc(64, bytes);
    cfg.mem = mem;
    cfg.mem_size = bytes - 1;
    eng_kv *kv = NULL;
    cr_assert_eq(eng_kv_create(&kv, backend(), &cfg), -EINVAL, "too small an area");
    cfg.mem_size = bytes;
    kv = make(&cfg);
    cr_assert_eq((void *)eng_kv_k(kv, 0), mem);
    cr_assert_eq((char *)eng_kv_v(kv, 1) + bytes / 4, (char *)mem + bytes);
    int a = eng_kv_seq_alloc(kv);
    eng_kv_seq_append(kv, a, 3);
    eng_kv_v_at(kv, 1, a, 2)[7] = 42.0f;
    const float *v1 = (const float *)((char *)mem + 3 * bytes / 4);
    int32_t blk = eng_kv_seq_blocks(kv, a)[0];
    cr_assert_eq(v1[((blk * 4 + 2) * 2 + 1) * 4 + 3], 42.0f, "kn_attn_args layout");
    eng_kv_destroy(kv);
    free(mem);
}

Test(engine_kv, rejects_bad_geometry)
{
    eng_kv_cfg cfg = small_cfg();
    cfg.block_size = 0;
    eng_kv *kv = NULL;
    cr_assert_eq(eng_kv_create(&kv, backend(), &cfg), -EINVAL);
    cr_assert_null(kv);
    cfg = small_cfg();
    cfg.max_seqs = 0;
    cr_assert_eq(eng_kv_create(&kv, backend(), &cfg), -EINVAL);
    cfg = small_cfg();
    cfg.n_blocks = INT32_MAX / cfg.block_size + 1; /* slots past int32: refused, not wrapped */
    cr_assert_eq(eng_kv_create(&kv, backend(), &cfg), -EINVAL);
    cr_assert(strstr(eng_error(), "slot") != NULL, "%s", eng_error());
    cfg = small_cfg();
    cr_assert_eq(eng_kv_create(&kv, NULL, &cfg), -EINVAL, "a cache needs a backend");
    cr_assert_null(kv);
}

/* Two caches over one area: a prefill cache owning blocks 0..3 hands a
 * sequence to a decode cache owning 4..7, which reads the same K/V and
 * gives as many of its free blocks back; each keeps its share. */
Test(engine_kv, handoff_moves_ownership_not_data)
{
    eng_kv_cfg cfg = small_cfg();
    size_t bytes = eng_kv_pool_bytes(&cfg);
    void *mem = aligned_alloc(64, bytes);
    const int32_t pre_own[4] = {0, 1, 2, 3}, dec_own[4] = {4, 5, 6, 7};
    cfg.mem = mem;
    cfg.mem_size = bytes;
    cfg.own = pre_own;
    cfg.n_own = 4;
    eng_kv *pre = make(&cfg);
    cfg.own = dec_own;
    eng_kv *dec = make(&cfg);
    cr_assert_eq(eng_kv_owned_blocks(pre), 4);
    cr_assert_eq(eng_kv_free_blocks(dec), 4);

    int a = eng_kv_seq_alloc(pre);
    cr_assert_eq(eng_kv_seq_append(pre, a, 6), 6); /* 2 blocks */
    fill(pre, a, 6);
    int32_t tbl[8], back[8];
    cr_assert_eq(eng_kv_seq_detach(pre, a, tbl, 1), -ENOSPC, "table larger than cap");
    cr_assert_eq(eng_kv_seq_detach(pre, a, tbl, 8), 2);
    cr_assert_eq(eng_kv_owned_blocks(pre), 2);
    cr_assert_eq(eng_kv_free_blocks(pre), 2);
    cr_assert_eq(eng_kv_seq_len(pre, a), -EINVAL, "slot freed");

    int d = eng_kv_seq_alloc(dec);
    int32_t dup[2] = {tbl[0], tbl[0]};
    cr_assert_eq(eng_kv_seq_adopt(dec, d, dup, 2, 6, back), -EINVAL, "duplicate block");
    int32_t theirs[2] = {tbl[0], 5};
    cr_assert_eq(eng_kv_seq_adopt(dec, d, theirs, 2, 6, back), -EINVAL, "own block");
    cr_assert_eq(eng_kv_seq_adopt(dec, d, tbl, 2, 9, back), -EINVAL, "len past the blocks");
    cr_assert_eq(eng_kv_free_blocks(dec), 4, "failed adopts change nothing");
    cr_assert_eq(eng_kv_seq_adopt(dec, d, tbl, 2, 6, back), 0, "%s", eng_error());
    cr_assert_eq(eng_kv_seq_len(dec, d), 6);
    cr_assert_eq(eng_kv_owned_blocks(dec), 4);
    cr_assert_eq(eng_kv_free_blocks(dec), 2);
    for (int l = 0; l < 2; l++)
        for (int64_t p = 0; p < 6; p++)
            for (int e = 0; e < 8; e++) {
                cr_assert_eq(eng_kv_k_at(dec, l, d, p)[e], tag(l, 0, p, e));
                cr_assert_eq(eng_kv_v_at(dec, l, d, p)[e], tag(l, 1, p, e));
            }
    for (int i = 0; i < 2; i++)
        cr_assert(back[i] >= 4 && back[i] <= 7, "gives its own blocks: %d", back[i]);
    /* the decode cache keeps growing the sequence from its own blocks */
    cr_assert_eq(eng_kv_seq_append(dec, d, 4), 10);
    cr_assert_eq(eng_kv_free_blocks(dec), 1);

    int32_t bad = 8;
    cr_assert_eq(eng_kv_give(pre, &bad, 1), -EINVAL);
    cr_assert_eq(eng_kv_give(pre, back, 2), 2);
    cr_assert_eq(eng_kv_give(pre, back, 2), 0, "a repeated give adds nothing");
    cr_assert_eq(eng_kv_owned_blocks(pre), 4);
    cr_assert_eq(eng_kv_free_blocks(pre), 4);
    cr_assert_eq(eng_kv_seq_free(dec, d), 0);
    cr_assert_eq(eng_kv_free_blocks(dec), 4, "the adopted blocks are the decode cache's now");
    eng_kv_destroy(pre);
    eng_kv_destroy(dec);
    free(mem);
}

Test(engine_kv, own_list_is_checked)
{
    eng_kv_cfg cfg = small_cfg();
    const int32_t twice[2] = {1, 1}, out[1] = {8};
    eng_kv *kv = NULL;
    cfg.own = twice;
    cfg.n_own = 2;
    cr_assert_eq(eng_kv_create(&kv, backend(), &cfg), -EINVAL);
    cfg.own = out;
    cfg.n_own = 1;
    cr_assert_eq(eng_kv_create(&kv, backend(), &cfg), -EINVAL);
    cr_assert_null(kv);
}
