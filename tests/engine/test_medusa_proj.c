/* How eng_medusa computes the heads (medusa.c prepare_heads/run_heads): all
 * ResBlocks stacked into one product, the vocabulary projection shared with
 * the base output matrix when every head's equals it, converted to the
 * base output's type when that is quantised (Q8_0, Q4_0). The candidates a step proposes are checked
 * against a direct double-precision evaluation of the heads, and greedy
 * decoding with shared-projection heads against plain greedy. */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine/engine.h"
#include "engine/model/gguf_write.h"
#include "engine/medusa/medusa.h"
#include "engine/model/safetensors.h"
#include "tests/util/test_models.h"

#define N_HEADS 3
/* Every rank 0..2 at every depth, so each head's top 3 are checked. */
#define TREE "[[0],[1],[2],[0,0],[0,1],[0,2],[0,0,0],[0,0,1],[0,0,2]]"

static char g_dir[64];
static kn_ctx *g_kn;

static void setup(void)
{
    snprintf(g_dir, sizeof(g_dir), "/tmp/gorgon-medusa-proj-XXXXXX");
    cr_assert_not_null(mkdtemp(g_dir));
    cr_assert_eq(kn_ctx_create(&g_kn, &(kn_ctx_cfg){.n_threads = 1}), 0);
}

static void teardown(void)
{
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", g_dir);
    cr_expect_eq(system(cmd), 0);
    kn_ctx_destroy(g_kn);
}

TestSuite(engine_medusa_proj, .init = setup, .fini = teardown, .timeout = 60);

static uint64_t g_lcg = 0x853c49e6748fea9bull;
static float frand(void) /* [-1, 1) */
{
    g_lcg = g_lcg * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((g_lcg >> 40) & 0xffffff) / (float)(1 << 23) - 1.0f;
}

/* N_HEADS heads, each with its own random ResBlock (so that a head mixed up
 * with another gives other candidates); projection: the base output matrix
 * (frozen) or random. Written to g_dir/<name>, opened. */
static eng_medusa_heads *make_heads(const eng_model *m, bool frozen, const char *name)
{
    const int64_t H = eng_model_hparams(m)->dim, V = eng_model_hparams(m)->n_vocab;
    const kn_tensor *out = eng_model_output(m);
    char dir[128];
    snprintf(dir, sizeof(dir), "%s/%s", g_dir, name);
    float *w[N_HEADS], *b[N_HEADS], *lm[N_HEADS];
    for (int h = 0; h < N_HEADS; h++) {
        w[h] = malloc((size_t)(H * H) * sizeof(float));
        b[h] = malloc((size_t)H * sizeof(float));
        lm[h] = malloc((size_t)(V * H) * sizeof(float));
        cr_assert(w[h] && b[h] && lm[h]);
        for (int64_t i = 0; i < H * H; i++)
            w[h][i] = frand() * 0.5f;
        for (int64_t i = 0; i < H; i++)
            b[h][i] = frand() * 0.2f;
        for (int64_t v = 0; v < V; v++) {
            if (frozen)
                kn_dequantize_row(out->type,
                                  (const char *)out->data + (size_t)v * kn_row_bytes(out->type, H),
                                  H, lm[h] + v * H);
            else
                for (int64_t i = 0; i < H; i++)
                    lm[h][v * H + i] = frand() * 0.1f;
        }
    }
    cr_assert_eq(eng_medusa_heads_write(dir, N_HEADS, H, V, (const float *const *)w,
                                        (const float *const *)b, (const float *const *)lm,
                                        NULL),
                 0, "%s", eng_error());
    for (int h = 0; h < N_HEADS; h++)
        free(w[h]), free(b[h]), free(lm[h]);
    eng_medusa_heads *mh = NULL;
    cr_assert_eq(eng_medusa_heads_open(&mh, dir, H, V), 0, "%s", eng_error());
    return mh;
}

static double silu_d(double x)
{
    return x / (1.0 + exp(-x));
}

static int cmp_desc(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

/* Prefill a prompt, prepare one step and check every tree node's token: its
 * reference logit under its head must equal the reference logit of its rank
 * (up to tol, relative to the logits' spread: ties and quantisation may swap
 * near-equal candidates, nothing else). */
static void check_candidates(const eng_model *m, const eng_medusa_heads *mh,
                             enum eng_medusa_proj want_proj, double tol)
{
    const int64_t H = eng_model_hparams(m)->dim, V = eng_model_hparams(m)->n_vocab;
    eng_medusa_tree *t = NULL;
    cr_assert_eq(eng_medusa_tree_from_spec(&t, TREE), 0, "%s", eng_error());
    eng_medusa *md = NULL;
    cr_assert_eq(eng_medusa_create(&md, &(eng_medusa_cfg){.model = m, .kn = g_kn, .heads = mh,
                                                           .tree = t, .max_seqs = 1}),
                 0, "%s", eng_error());
    cr_assert_eq(eng_medusa_projection(md), want_proj, "projection mode %d, expected %d",
                 (int)eng_medusa_projection(md), (int)want_proj);
    eng_ctx *c = NULL;
    eng_kv *kv = NULL;
    eng_kv_cfg kc;
    eng_model_kv_cfg(m, 16, 8, 1, 64, &kc);
    cr_assert_eq(eng_ctx_create(&c, m, &(eng_ctx_cfg){.kn = g_kn, .max_tokens = 16}), 0);
    cr_assert_eq(eng_kv_create(&kv, g_kn, &kc), 0);
    const int seq = eng_kv_seq_alloc(kv);
    const int32_t prompt[5] = {1, 40, 41, 42, 43};
    float *logits = malloc((size_t)V * sizeof(float)), *hid = malloc((size_t)H * sizeof(float));
    cr_assert(logits && hid);
    eng_seq_in in = {.seq = seq, .tokens = prompt, .n_tokens = 5};
    cr_assert_eq(eng_forward(c, kv, &in, 1, logits, hid), 1, "%s", eng_error());
    cr_assert_eq(eng_medusa_seq_begin(md, seq, logits, hid, 0), 0);
    eng_seq_in tin;
    cr_assert_eq(eng_medusa_step_prepare(md, kv, &seq, 1, &tin), t->n_nodes, "%s", eng_error());

    double *ref = malloc((size_t)(N_HEADS * V) * sizeof(double));
    double *sorted = malloc((size_t)V * sizeof(double));
    float *row = malloc((size_t)H * sizeof(float));
    double hp[1024];
    cr_assert(ref && sorted && row && H <= 1024);
    for (int h = 0; h < N_HEADS; h++) {
        const eng_medusa_head *hd = eng_medusa_heads_get(mh, h);
        const float *W = hd->w.data;
        for (int64_t j = 0; j < H; j++) {
            double z = hd->bias[j];
            for (int64_t i = 0; i < H; i++)
                z += (double)W[j * H + i] * hid[i];
            hp[j] = hid[j] + silu_d(z);
        }
        const float *L = hd->lm_head.data;
        for (int64_t v = 0; v < V; v++) {
            double s = 0;
            for (int64_t i = 0; i < H; i++)
                s += (double)L[v * H + i] * hp[i];
            ref[h * V + v] = s;
        }
    }
    for (int j = 1; j < t->n_nodes; j++) {
        const int ti = t->tree_indices[j];
        const int h = (ti - 1) / ENG_MEDUSA_TOPK, rank = (ti - 1) % ENG_MEDUSA_TOPK;
        const double *r = ref + h * V;
        memcpy(sorted, r, (size_t)V * sizeof(double));
        qsort(sorted, (size_t)V, sizeof(double), cmp_desc);
        const double spread = sorted[0] - sorted[V - 1];
        const int32_t tok = tin.tokens[j];
        cr_assert(tok >= 0 && tok < V);
        cr_expect(fabs(r[tok] - sorted[rank]) <= tol * spread,
                  "node %d (head %d rank %d): token %d has logit %g, rank %d's is %g "
                  "(spread %g)",
                  j, h, rank, tok, r[tok], rank, sorted[rank], spread);
    }
    eng_medusa_step_abort(md, &seq, 1);
    free(ref), free(sorted), free(row), free(logits), free(hid);
    eng_kv_destroy(kv);
    eng_ctx_destroy(c);
    eng_medusa_destroy(md);
    eng_medusa_tree_destroy(t);
}

static eng_model *synth_model(enum kn_dtype dt, const char *name)
{
    char path[160];
    snprintf(path, sizeof(path), "%s/%s", g_dir, name);
    eng_synth_llama_cfg cfg = {.dim = 64, .n_layer = 2, .n_head = 4, .n_head_kv = 2, .ffn = 96,
                               .n_ctx = 128, .n_vocab = 600, .dtype = dt, .seed = 7};
    cr_assert_eq(eng_gguf_write_synth_llama(path, &cfg), 0, "%s", eng_error());
    eng_model *m = NULL;
    cr_assert_eq(eng_model_open(&m, path), 0, "%s", eng_error());
    return m;
}

Test(engine_medusa_proj, f32_base_frozen_heads_share_the_output_matrix)
{
    eng_model *m = synth_model(KN_F32, "f32.gguf");
    eng_medusa_heads *mh = make_heads(m, true, "frozen");
    check_candidates(m, mh, ENG_MEDUSA_PROJ_SHARED, 1e-5);
    eng_medusa_heads_close(mh);
    mh = make_heads(m, false, "own");
    check_candidates(m, mh, ENG_MEDUSA_PROJ_HEADS, 1e-5);
    eng_medusa_heads_close(mh);
    eng_model_close(m);
}

Test(engine_medusa_proj, q4_0_base_quantizes_own_heads_and_shares_frozen_ones)
{
    eng_model *m = synth_model(KN_Q4_0, "q4.gguf");
    eng_medusa_heads *mh = make_heads(m, true, "frozen");
    check_candidates(m, mh, ENG_MEDUSA_PROJ_SHARED, 0.08);
    eng_medusa_heads_close(mh);
    mh = make_heads(m, false, "own");
    check_candidates(m, mh, ENG_MEDUSA_PROJ_QUANTIZED, 0.08);
    eng_medusa_heads_close(mh);
    eng_model_close(m);
}

Test(engine_medusa_proj, q8_0_base_quantizes_own_heads_and_shares_frozen_ones)
{
    eng_model *m = synth_model(KN_Q8_0, "q8.gguf");
    /* frozen: the heads file holds the dequantised output matrix, which is
     * recognised as the base's own */
    eng_medusa_heads *mh = make_heads(m, true, "frozen");
    check_candidates(m, mh, ENG_MEDUSA_PROJ_SHARED, 0.02);
    eng_medusa_heads_close(mh);
    mh = make_heads(m, false, "own");
    check_candidates(m, mh, ENG_MEDUSA_PROJ_QUANTIZED, 0.02);
    eng_medusa_heads_close(mh);
    eng_model_close(m);
}

/* Shared-projection heads on the real model: greedy Medusa = plain greedy. */
Test(engine_medusa_proj, greedy_equals_plain_with_shared_projection)
{
    eng_model *m = NULL;
    cr_assert_eq(eng_model_open(&m, tu_model_path("stories260K/stories260K.gguf")), 0, "%s",
                 eng_error());
    const int64_t H = eng_model_hparams(m)->dim, V = eng_model_hparams(m)->n_vocab;
    eng_medusa_heads *mh = make_heads(m, true, "frozen260k");
    eng_medusa_tree *t = NULL;
    cr_assert_eq(eng_medusa_tree_from_spec(&t, TREE), 0, "%s", eng_error());
    eng_medusa *md = NULL;
    cr_assert_eq(eng_medusa_create(&md, &(eng_medusa_cfg){.model = m, .kn = g_kn, .heads = mh,
                                                           .tree = t, .max_seqs = 2}),
                 0, "%s", eng_error());
    cr_assert_eq(eng_medusa_projection(md), ENG_MEDUSA_PROJ_SHARED);
    enum { N = 96 };
    eng_ctx *c = NULL;
    eng_kv *kv = NULL;
    eng_kv_cfg kc;
    eng_model_kv_cfg(m, 16, 32, 2, 256, &kc);
    cr_assert_eq(eng_ctx_create(&c, m, &(eng_ctx_cfg){.kn = g_kn, .max_tokens = 32}), 0);
    cr_assert_eq(eng_kv_create(&kv, g_kn, &kc), 0);
    float *logits = malloc((size_t)(16 * V) * sizeof(float));
    float *hid = malloc((size_t)(16 * H) * sizeof(float));
    cr_assert(logits && hid);
    const int32_t prompt[1] = {1};
    int32_t plain[N], spec[N + ENG_MEDUSA_MAX_DEPTH + 1];
    /* plain */
    int s = eng_kv_seq_alloc(kv);
    eng_seq_in in = {.seq = s, .tokens = prompt, .n_tokens = 1};
    cr_assert_eq(eng_forward(c, kv, &in, 1, logits, NULL), 1);
    for (int i = 0; i < N; i++) {
        plain[i] = eng_argmax(logits, V);
        in = (eng_seq_in){.seq = s, .tokens = &plain[i], .n_tokens = 1};
        cr_assert_eq(eng_forward(c, kv, &in, 1, logits, NULL), 1);
    }
    eng_kv_seq_free(kv, s);
    /* medusa */
    s = eng_kv_seq_alloc(kv);
    in = (eng_seq_in){.seq = s, .tokens = prompt, .n_tokens = 1};
    cr_assert_eq(eng_forward(c, kv, &in, 1, logits, hid), 1);
    cr_assert_eq(eng_medusa_seq_begin(md, s, logits, hid, 0), 0);
    int n = 0, steps = 0;
    while (n < N) {
        eng_medusa_result r;
        cr_assert_gt(eng_medusa_step(md, c, kv, &s, 1, &r), 0, "%s", eng_error());
        for (int i = 0; i < r.n_tokens; i++)
            spec[n++] = r.tokens[i];
        steps++;
    }
    for (int i = 0; i < N; i++)
        cr_assert_eq(spec[i], plain[i], "token %d: medusa %d, plain %d", i, spec[i], plain[i]);
    cr_expect_leq(steps, N);
    free(logits), free(hid);
    eng_kv_destroy(kv);
    eng_ctx_destroy(c);
    eng_medusa_destroy(md);
    eng_medusa_tree_destroy(t);
    eng_medusa_heads_close(mh);
    eng_model_close(m);
}
