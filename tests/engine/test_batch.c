/* Batched forward: one call over several sequences equals each alone; kernel
 * variants agree with the scalar reference; tree masks equal the branches
 * run alone; Medusa-style KV compaction; errors leave the cache unchanged. */
#include <criterion/criterion.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/engine.h"
#include "tests/util/test_models.h"

static kn_ctx *g_kn;
static eng_model *g_m;
static eng_ctx *g_c;
static eng_kv *g_kv;
static int64_t V;

static void setup(void)
{
    char p[PATH_MAX];
    snprintf(p, sizeof(p), "%s/stories260K/stories260K.gguf", tu_models_dir());
    cr_assert_eq(access(p, R_OK), 0, "test model %s not found (set GORGON_TEST_MODELS)", p);
    cr_assert_eq(kn_ctx_create(&g_kn, &(kn_ctx_cfg){.n_threads = 1}), 0);
    cr_assert_eq(eng_model_open(&g_m, p), 0, "%s", eng_error());
    V = eng_model_hparams(g_m)->n_vocab;
    cr_assert_eq(eng_ctx_create(&g_c, g_m, &(eng_ctx_cfg){.kn = g_kn, .max_tokens = 128}), 0);
    eng_kv_cfg kc;
    eng_model_kv_cfg(g_m, 8, 256, 8, 512, &kc);
    cr_assert_eq(eng_kv_create(&g_kv, g_kn, &kc), 0);
}

static void teardown(void)
{
    eng_kv_destroy(g_kv);
    eng_ctx_destroy(g_c);
    eng_model_close(g_m);
    kn_ctx_destroy(g_kn);
}

static int64_t encode(const char *text, int32_t *ids, size_t cap)
{
    int64_t n = eng_tok_encode(eng_model_tokenizer(g_m), text, strlen(text), true, ids, cap);
    cr_assert_geq(n, 1);
    return n;
}

static float max_abs_diff(const float *a, const float *b, int64_t n, float *scale)
{
    float d = 0, s = 0;
    for (int64_t i = 0; i < n; i++) {
        d = fmaxf(d, fabsf(a[i] - b[i]));
        s = fmaxf(s, fabsf(b[i]));
    }
    if (scale)
        *scale = s;
    return d;
}

#define NP 4
#define STEPS 50
static const char *prompts[NP] = {"Once upon a time", "Lily and Tom",
                                  "The big dog ran to the park and saw a", "Sam"};

/* Greedy continuation of one prompt alone. */
static void run_alone(const char *prompt, int32_t *out)
{
    int32_t ids[64];
    int64_t n = encode(prompt, ids, 64);
    int seq = eng_kv_seq_alloc(g_kv);
    float *logits = malloc((size_t)V * sizeof(float));
    eng_seq_in in = {.seq = seq, .tokens = ids, .n_tokens = n};
    cr_assert_eq(eng_forward(g_c, g_kv, &in, 1, logits, NULL), 1, "%s", eng_error());
    for (int s = 0; s < STEPS; s++) {
        out[s] = eng_argmax(logits, V);
        in = (eng_seq_in){.seq = seq, .tokens = &out[s], .n_tokens = 1};
        cr_assert_eq(eng_forward(g_c, g_kv, &in, 1, logits, NULL), 1);
    }
    eng_kv_seq_free(g_kv, seq);
    free(logits);
}

Test(engine_batch, batched_prompts_give_the_tokens_each_gives_alone, .init = setup,
     .fini = teardown, .timeout = 60)
{
    int32_t alone[NP][STEPS], batched[NP][STEPS];
    for (int p = 0; p < NP; p++)
        run_alone(prompts[p], alone[p]);

    int32_t ids[NP][64];
    eng_seq_in in[NP];
    for (int p = 0; p < NP; p++) {
        int64_t n = encode(prompts[p], ids[p], 64);
        in[p] = (eng_seq_in){.seq = eng_kv_seq_alloc(g_kv), .tokens = ids[p], .n_tokens = n};
    }
    float *logits = malloc((size_t)NP * (size_t)V * sizeof(float));
    cr_assert_eq(eng_forward(g_c, g_kv, in, NP, logits, NULL), NP, "%s", eng_error());
    for (int s = 0; s < STEPS; s++) {
        for (int p = 0; p < NP; p++) {
            batched[p][s] = eng_argmax(logits + p * V, V);
            in[p].tokens = &batched[p][s];
            in[p].n_tokens = 1;
        }
        cr_assert_eq(eng_forward(g_c, g_kv, in, NP, logits, NULL), NP);
    }
    for (int p = 0; p < NP; p++)
        for (int s = 0; s < STEPS; s++)
            cr_assert_eq(batched[p][s], alone[p][s], "prompt %d step %d: batched %d alone %d", p,
                         s, batched[p][s], alone[p][s]);
    free(logits);
}

/* Every output of a mixed batch (prefill + decode sequences), for the kernel
 * variant given, against the scalar reference. */
static void run_mixed(const kn_ops *ops, float *logits, float *hidden)
{
    eng_ctx_set_ops(g_c, ops);
    int32_t ids[NP][64];
    eng_seq_in in[NP];
    uint8_t want[NP][64];
    memset(want, 1, sizeof(want));
    for (int p = 0; p < NP; p++) {
        int64_t n = encode(prompts[p], ids[p], 64);
        in[p] = (eng_seq_in){.seq = eng_kv_seq_alloc(g_kv), .tokens = ids[p],
                             .n_tokens = n, .want = want[p]};
    }
    int64_t rows = eng_forward(g_c, g_kv, in, NP, logits, hidden);
    cr_assert_gt(rows, NP, "%s", eng_error());
    for (int p = 0; p < NP; p++)
        eng_kv_seq_free(g_kv, in[p].seq);
    eng_ctx_set_ops(g_c, NULL);
}

/* A mixed batch on variant v gives the scalar reference's logits and hidden
 * states (to rounding); a variant this CPU cannot run is skipped. */
static void variant_agrees_with_scalar(enum kn_variant v)
{
    const kn_ops *ops = kn_ops_for(v);
    if (!ops)
        cr_skip_test("%s: not supported by this CPU", kn_variant_name(v));
    const int64_t D = eng_model_hparams(g_m)->dim;
    size_t rows = 128;
    float *ref = malloc(rows * (size_t)V * sizeof(float));
    float *got = malloc(rows * (size_t)V * sizeof(float));
    float *href = malloc(rows * (size_t)D * sizeof(float));
    float *hgot = malloc(rows * (size_t)D * sizeof(float));
    run_mixed(kn_ops_for(KN_VARIANT_SCALAR), ref, href);
    int64_t n_rows = 0;
    for (int p = 0; p < NP; p++)
        n_rows += encode(prompts[p], (int32_t[64]){0}, 64);
    run_mixed(ops, got, hgot);
    float scale;
    float d = max_abs_diff(got, ref, n_rows * V, &scale);
    cr_assert(d <= 1e-4f * scale + 1e-5f, "%s logits differ by %g (max |logit| %g)",
              kn_variant_name(v), (double)d, (double)scale);
    d = max_abs_diff(hgot, href, n_rows * D, &scale);
    cr_assert(d <= 1e-4f * scale + 1e-5f, "%s hidden states differ by %g", kn_variant_name(v),
              (double)d);
    free(ref);
    free(got);
    free(href);
    free(hgot);
}

Test(engine_batch, avx2_agrees_with_scalar, .init = setup, .fini = teardown, .timeout = 60)
{
    variant_agrees_with_scalar(KN_VARIANT_AVX2);
}

Test(engine_batch, avx512_agrees_with_scalar, .init = setup, .fini = teardown, .timeout = 60)
{
    variant_agrees_with_scalar(KN_VARIANT_AVX512);
}

/* Prefix then tree; returns the sequence. */
static int run_prefix(const char *prompt)
{
    int32_t ids[64];
    int64_t n = encode(prompt, ids, 64);
    int seq = eng_kv_seq_alloc(g_kv);
    eng_seq_in in = {.seq = seq, .tokens = ids, .n_tokens = n};
    cr_assert_eq(eng_forward(g_c, g_kv, &in, 1, NULL, NULL), 1);
    return seq;
}

Test(engine_batch, chain_mask_equals_causal, .init = setup, .fini = teardown, .timeout = 60)
{
    int32_t toks[5] = {65, 300, 17, 222, 401};
    uint8_t mask[25];
    for (int i = 0; i < 5; i++)
        for (int j = 0; j < 5; j++)
            mask[i * 5 + j] = j <= i;
    uint8_t want[5] = {1, 1, 1, 1, 1};
    float *a = malloc(5 * (size_t)V * sizeof(float)), *b = malloc(5 * (size_t)V * sizeof(float));
    int s1 = run_prefix("Once upon");
    int s2 = run_prefix("Once upon");
    eng_seq_in in = {.seq = s1, .tokens = toks, .n_tokens = 5, .want = want};
    cr_assert_eq(eng_forward(g_c, g_kv, &in, 1, a, NULL), 5);
    in.seq = s2;
    in.mask = mask;
    cr_assert_eq(eng_forward(g_c, g_kv, &in, 1, b, NULL), 5);
    cr_assert_eq(max_abs_diff(a, b, 5 * V, NULL), 0.0f);
    free(a);
    free(b);
}

/* Tree: r(0) -> a(1) -> a2(2) and r -> b(1) -> b2(2), nodes in order
 * [r, a, b, a2, b2] at RoPE positions n_past + depth. */
Test(engine_batch, tree_mask_branches_equal_branches_alone, .init = setup, .fini = teardown,
     .timeout = 60)
{
    const int32_t r = 300, a = 17, b = 222, a2 = 45, b2 = 401;
    int32_t tree[5] = {r, a, b, a2, b2};
    static const int parent[5] = {-1, 0, 0, 1, 2};
    static const int depth[5] = {0, 1, 1, 2, 2};
    uint8_t mask[25] = {0};
    for (int i = 0; i < 5; i++)
        for (int j = i; j >= 0; j = parent[j])
            mask[i * 5 + j] = 1;
    uint8_t want[5] = {1, 1, 1, 1, 1};
    float *lt = malloc(5 * (size_t)V * sizeof(float));
    float *la = malloc(3 * (size_t)V * sizeof(float)), *lb = malloc(3 * (size_t)V * sizeof(float));

    int st = run_prefix("Once upon a time");
    int64_t np = eng_kv_seq_len(g_kv, st);
    int32_t pos[5];
    for (int i = 0; i < 5; i++)
        pos[i] = (int32_t)(np + depth[i]);
    eng_seq_in in = {.seq = st, .tokens = tree, .n_tokens = 5, .pos = pos, .mask = mask,
                     .want = want};
    cr_assert_eq(eng_forward(g_c, g_kv, &in, 1, lt, NULL), 5, "%s", eng_error());

    int32_t ba[3] = {r, a, a2}, bb[3] = {r, b, b2};
    int sa = run_prefix("Once upon a time"), sb = run_prefix("Once upon a time");
    in = (eng_seq_in){.seq = sa, .tokens = ba, .n_tokens = 3, .want = want};
    eng_seq_in in2 = {.seq = sb, .tokens = bb, .n_tokens = 3, .want = want};
    eng_seq_in both[2] = {in, in2};
    float *lab = malloc(6 * (size_t)V * sizeof(float));
    cr_assert_eq(eng_forward(g_c, g_kv, both, 2, lab, NULL), 6);
    memcpy(la, lab, 3 * (size_t)V * sizeof(float));
    memcpy(lb, lab + 3 * V, 3 * (size_t)V * sizeof(float));

    static const int rows_a[3] = {0, 1, 3}, rows_b[3] = {0, 2, 4};
    for (int k = 0; k < 3; k++) {
        float s;
        float d = max_abs_diff(lt + rows_a[k] * V, la + k * V, V, &s);
        cr_assert(d <= 1e-5f * s + 1e-6f, "branch a node %d differs by %g", k, (double)d);
        d = max_abs_diff(lt + rows_b[k] * V, lb + k * V, V, &s);
        cr_assert(d <= 1e-5f * s + 1e-6f, "branch b node %d differs by %g", k, (double)d);
    }

    /* Medusa acceptance of branch b: move its nodes' KV (slots np+2, np+4)
     * to np+1, np+2, drop the rest; the next token must then see exactly
     * what the linear sequence r, b, b2 sees. */
    int32_t src[2] = {(int32_t)np + 2, (int32_t)np + 4}, dst[2] = {(int32_t)np + 1,
                                                                    (int32_t)np + 2};
    cr_assert_eq(eng_kv_copy_positions(g_kv, st, src, dst, 2), 0);
    cr_assert_eq(eng_kv_seq_truncate(g_kv, st, np + 3), 0);
    int32_t next = 99;
    float *l1 = malloc((size_t)V * sizeof(float)), *l2 = malloc((size_t)V * sizeof(float));
    in = (eng_seq_in){.seq = st, .tokens = &next, .n_tokens = 1};
    cr_assert_eq(eng_forward(g_c, g_kv, &in, 1, l1, NULL), 1);
    in.seq = sb;
    cr_assert_eq(eng_forward(g_c, g_kv, &in, 1, l2, NULL), 1);
    float s;
    float d = max_abs_diff(l1, l2, V, &s);
    cr_assert(d <= 1e-5f * s + 1e-6f, "after compaction logits differ by %g", (double)d);
    free(lt);
    free(la);
    free(lb);
    free(lab);
    free(l1);
    free(l2);
}

/* One forward over a tree-masked, a chain-masked (same tokens, other mask)
 * and an unmasked sequence gives each sequence's rows bit for bit as it
 * gets alone: the batch's masks reach the backend each at its own place. */
Test(engine_batch, distinct_masks_in_one_batch_equal_each_alone, .init = setup,
     .fini = teardown, .timeout = 60)
{
    int32_t toks[5] = {300, 17, 222, 45, 401};
    static const int parent[5] = {-1, 0, 0, 1, 2};
    uint8_t tree[25] = {0}, chain[25];
    for (int i = 0; i < 5; i++) {
        for (int j = i; j >= 0; j = parent[j])
            tree[i * 5 + j] = 1;
        for (int j = 0; j < 5; j++)
            chain[i * 5 + j] = j <= i && (j != 1 || i == 1); /* unlike causal and tree */
    }
    uint8_t want[5] = {1, 1, 1, 1, 1};
    const uint8_t *masks[3] = {tree, chain, NULL};
    float *alone = malloc(15 * (size_t)V * sizeof(float));
    float *batch = malloc(15 * (size_t)V * sizeof(float));
    eng_seq_in in[3];
    for (int k = 0; k < 3; k++) {
        in[k] = (eng_seq_in){.seq = run_prefix("Lily and Tom"), .tokens = toks, .n_tokens = 5,
                             .mask = masks[k], .want = want};
        cr_assert_eq(eng_forward(g_c, g_kv, &in[k], 1, alone + k * 5 * V, NULL), 5, "%s",
                     eng_error());
        cr_assert_eq(eng_kv_seq_truncate(g_kv, in[k].seq, eng_kv_seq_len(g_kv, in[k].seq) - 5),
                     0);
    }
    cr_assert_eq(eng_forward(g_c, g_kv, in, 3, batch, NULL), 15, "%s", eng_error());
    for (int k = 0; k < 3; k++)
        cr_assert_eq(memcmp(alone + k * 5 * V, batch + k * 5 * V, 5 * (size_t)V * sizeof(float)),
                     0, "sequence %d (mask %s) differs in the batch", k,
                     k == 0 ? "tree" : k == 1 ? "other" : "none");
    cr_assert_neq(memcmp(batch, batch + 5 * V, 5 * (size_t)V * sizeof(float)), 0,
                  "the two masks must give different rows (else the test proves nothing)");
    free(alone);
    free(batch);
}

/* A masked sequence too long for the plan's mask area is refused before
 * anything runs, and the cache is unchanged. */
Test(engine_batch, oversized_mask_is_refused_cleanly, .init = setup, .fini = teardown,
     .timeout = 60)
{
    const int64_t n = 1100;
    eng_ctx *c;
    cr_assert_eq(eng_ctx_create(&c, g_m, &(eng_ctx_cfg){.kn = g_kn, .max_tokens = n,
                                                         .max_outputs = 1, .max_ctx = 2 * n}),
                 0);
    int32_t *toks = calloc((size_t)n, sizeof(int32_t));
    uint8_t *mask = malloc((size_t)(n * n));
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < n; j++)
            mask[i * n + j] = j <= i;
    int s = eng_kv_seq_alloc(g_kv);
    eng_seq_in in = {.seq = s, .tokens = toks, .n_tokens = n, .mask = mask};
    cr_assert_eq(eng_forward(c, g_kv, &in, 1, NULL, NULL), -EINVAL);
    cr_assert(strstr(eng_error(), "mask") != NULL, "message names the mask: %s", eng_error());
    cr_assert_eq(eng_kv_seq_len(g_kv, s), 0);
    eng_kv_seq_free(g_kv, s);
    free(toks);
    free(mask);
    eng_ctx_destroy(c);
}

Test(engine_batch, hidden_is_final_norm_output_of_wanted_rows, .init = setup, .fini = teardown,
     .timeout = 30)
{
    const eng_hparams *hp = eng_model_hparams(g_m);
    int32_t toks[3] = {1, 403, 261};
    uint8_t want[3] = {1, 0, 1};
    float *h = malloc(2 * (size_t)hp->dim * sizeof(float));
    float *lg = malloc(2 * (size_t)V * sizeof(float));
    int seq = eng_kv_seq_alloc(g_kv);
    eng_seq_in in = {.seq = seq, .tokens = toks, .n_tokens = 3, .want = want};
    cr_assert_eq(eng_forward(g_c, g_kv, &in, 1, lg, h), 2);
    /* logits = Wout · hidden (F32 model: recompute directly) */
    const kn_tensor *w = eng_model_output(g_m);
    for (int o = 0; o < 2; o++)
        for (int64_t r = 0; r < V; r += 37) {
            const float *row = (const float *)w->data + r * hp->dim;
            double acc = 0;
            for (int64_t i = 0; i < hp->dim; i++)
                acc += (double)row[i] * h[o * hp->dim + i];
            cr_assert(fabs(acc - lg[o * V + r]) < 1e-3, "row %d logit %lld", o, (long long)r);
        }
    free(h);
    free(lg);
}

Test(engine_batch, errors_leave_the_cache_unchanged, .init = setup, .fini = teardown,
     .timeout = 30)
{
    int s1 = eng_kv_seq_alloc(g_kv), s2 = eng_kv_seq_alloc(g_kv);
    int32_t ok[2] = {1, 50}, bad[2] = {1, 100000};
    eng_seq_in in[2] = {{.seq = s1, .tokens = ok, .n_tokens = 2},
                        {.seq = s2, .tokens = bad, .n_tokens = 2}};
    int64_t free0 = eng_kv_free_blocks(g_kv);
    cr_assert_eq(eng_forward(g_c, g_kv, in, 2, NULL, NULL), -EINVAL);
    cr_assert(strstr(eng_error(), "vocabulary"), "%s", eng_error());
    cr_assert_eq(eng_kv_seq_len(g_kv, s1), 0);
    cr_assert_eq(eng_kv_free_blocks(g_kv), free0);
    in[1].seq = s1; /* same sequence twice */
    in[1].tokens = ok;
    cr_assert_eq(eng_forward(g_c, g_kv, in, 2, NULL, NULL), -EINVAL);
    cr_assert_eq(eng_kv_seq_len(g_kv, s1), 0);
    uint8_t no_self[4] = {0, 0, 1, 1};
    eng_seq_in m = {.seq = s1, .tokens = ok, .n_tokens = 2, .mask = no_self};
    cr_assert_eq(eng_forward(g_c, g_kv, &m, 1, NULL, NULL), -EINVAL);

    /* exhaust the pool: a small cache of 2 blocks of 8 */
    eng_kv_cfg kc;
    eng_model_kv_cfg(g_m, 8, 2, 2, 512, &kc);
    eng_kv *small;
    cr_assert_eq(eng_kv_create(&small, g_kn, &kc), 0);
    int a = eng_kv_seq_alloc(small), b = eng_kv_seq_alloc(small);
    int32_t t10[10] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
    eng_seq_in x = {.seq = a, .tokens = t10, .n_tokens = 10};
    cr_assert_eq(eng_forward(g_c, small, &x, 1, NULL, NULL), 1);
    float k_before[64];
    memcpy(k_before, eng_kv_k_at(small, 0, a, 9), sizeof(float) * 32);
    eng_seq_in y[2] = {{.seq = a, .tokens = t10, .n_tokens = 1},
                       {.seq = b, .tokens = t10, .n_tokens = 1}};
    cr_assert_eq(eng_forward(g_c, small, y, 2, NULL, NULL), -ENOSPC);
    cr_assert(strstr(eng_error(), "full"), "%s", eng_error());
    cr_assert_eq(eng_kv_seq_len(small, a), 10);
    cr_assert_eq(eng_kv_seq_len(small, b), 0);
    cr_assert_eq(eng_kv_free_blocks(small), 0);
    cr_assert_eq(memcmp(k_before, eng_kv_k_at(small, 0, a, 9), sizeof(float) * 32), 0);
    cr_assert_eq(eng_forward(g_c, small, y, 1, NULL, NULL), 1, "a alone still fits");
    eng_kv_destroy(small);
}
