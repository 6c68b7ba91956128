/* Medusa decoding step on stories260K: greedy Medusa is lossless (token for
 * token equal to plain greedy decoding, alone and batched, with useless random
 * heads and with heads that copy the base model), the compacted KV cache
 * equals what plain decoding writes, typical acceptance is reproducible for a
 * seed and never emits a token under its threshold, and errors change
 * nothing. Heads are written to a temp dir with eng_st_write(). */
#include <criterion/criterion.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine/engine.h"
#include "tests/util/test_models.h"
#include "engine/medusa/medusa.h"
#include "engine/model/safetensors.h"

#define N_HEADS 4
#define MAX_B 8
#define N_POS 256 /* positions per sequence, prompt included (most tests) */
#define MAX_TOK (N_POS + ENG_MEDUSA_MAX_DEPTH + 2)

static int64_t g_npos = N_POS;

static const char *const PROMPTS[MAX_B] = {
    "Once upon a time", "Lily and Tom", "", "The cat sat on the mat",
    "Tom had a big red ball", "One day", "Sam was sad because", "The sun",
};

static kn_ctx *g_kn;
static eng_model *g_m;
static eng_ctx *g_c;
static eng_kv *g_kv;
static int64_t V, H;
static char g_dir[64];

static void setup(void)
{
    char p[PATH_MAX];
    snprintf(p, sizeof(p), "%s/stories260K/stories260K.gguf", tu_models_dir());
    cr_assert_eq(access(p, R_OK), 0, "test model %s not found (set GORGON_TEST_MODELS)", p);
    cr_assert_eq(kn_ctx_create(&g_kn, &(kn_ctx_cfg){.n_threads = 1}), 0);
    cr_assert_eq(eng_model_open(&g_m, p), 0, "%s", eng_error());
    V = eng_model_hparams(g_m)->n_vocab;
    H = eng_model_hparams(g_m)->dim;
    cr_assert_eq(eng_ctx_create(&g_c, g_m, &(eng_ctx_cfg){.kn = g_kn, .max_tokens = MAX_B * 64}),
                 0);
    eng_kv_cfg kc;
    eng_model_kv_cfg(g_m, 16, 1024, 2 * MAX_B, 512, &kc);
    cr_assert_eq(eng_kv_create(&g_kv, g_kn, &kc), 0);
    snprintf(g_dir, sizeof(g_dir), "/tmp/gorgon-medusa-XXXXXX");
    cr_assert_not_null(mkdtemp(g_dir));
}

static void teardown(void)
{
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", g_dir);
    cr_expect_eq(system(cmd), 0);
    eng_kv_destroy(g_kv);
    eng_ctx_destroy(g_c);
    eng_model_close(g_m);
    kn_ctx_destroy(g_kn);
}

TestSuite(engine_medusa, .init = setup, .fini = teardown, .timeout = 120);

/* ---- heads -------------------------------------------------------------- */

enum heads_kind {
    HEADS_RANDOM, /* random ResBlocks and projections: almost nothing accepted */
    HEADS_COPY,   /* W = 0, b = 0, projection = base output matrix: each head
                   * predicts the base's next token again (accepts repeats) */
    HEADS_ORACLE, /* W = 0, b = 0, head i's row y = the base output row of the
                   * token x that most often precedes y by i+1 in g_oracle_text:
                   * its argmax follows the base's argmax x (skip-gram oracle) */
};

/* Text the oracle heads are fitted on (the plain greedy outputs). */
static const int32_t *g_oracle_text[MAX_B];
static int64_t g_oracle_len[MAX_B];
static int g_oracle_n;

/* Row source per vocabulary entry for head i: lm_i[y] = E[src[y]] (-1: 0). */
static void oracle_rows(int head, int32_t *src)
{
    int32_t *cnt = calloc((size_t)(V * V), sizeof(int32_t));
    cr_assert_not_null(cnt);
    for (int s = 0; s < g_oracle_n; s++)
        for (int64_t p = 0; p + head + 1 < g_oracle_len[s]; p++)
            cnt[g_oracle_text[s][p] * V + g_oracle_text[s][p + head + 1]]++;
    int32_t *best_c = calloc((size_t)V, sizeof(int32_t));
    cr_assert_not_null(best_c);
    for (int64_t y = 0; y < V; y++)
        src[y] = -1;
    for (int64_t x = 0; x < V; x++) {
        int64_t f = 0; /* f(x) = most frequent follower at distance head + 1 */
        for (int64_t y = 1; y < V; y++)
            if (cnt[x * V + y] > cnt[x * V + f])
                f = y;
        int32_t c = cnt[x * V + f];
        if (c > 0 && c > best_c[f]) {
            best_c[f] = c;
            src[f] = (int32_t)x;
        }
    }
    free(best_c);
    free(cnt);
}

static uint64_t g_lcg = 0x9e3779b97f4a7c15ull;
static float frand(void) /* [-1, 1) */
{
    g_lcg = g_lcg * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((g_lcg >> 40) & 0xffffff) / (float)(1 << 23) - 1.0f;
}

static const char *const KIND_NAME[] = {"random", "copy", "oracle"};

/* Write N_HEADS heads of the given kind into g_dir/<sub> and open them. */
static eng_medusa_heads *make_heads(enum heads_kind kind, const char *sub)
{
    static int serial;
    char dir[128];
    snprintf(dir, sizeof(dir), "%s/%s%d", g_dir, sub, serial++);
    const kn_tensor *out = eng_model_output(g_m);
    cr_assert_eq(out->type, KN_F32);
    float *w = calloc((size_t)(H * H), sizeof(float));
    float *b = calloc((size_t)H, sizeof(float));
    float *lm[N_HEADS];
    const float *ws[N_HEADS], *bs[N_HEADS], *lms[N_HEADS];
    cr_assert(w && b);
    if (kind == HEADS_RANDOM) {
        for (int64_t i = 0; i < H * H; i++)
            w[i] = frand() * 0.3f;
        for (int64_t i = 0; i < H; i++)
            b[i] = frand() * 0.1f;
    }
    for (int h = 0; h < N_HEADS; h++) {
        lm[h] = malloc((size_t)(V * H) * sizeof(float));
        cr_assert_not_null(lm[h]);
        const float *E = out->data;
        if (kind == HEADS_ORACLE) {
            int32_t *src = malloc((size_t)V * sizeof(int32_t));
            cr_assert_not_null(src);
            oracle_rows(h, src);
            for (int64_t y = 0; y < V; y++)
                for (int64_t i = 0; i < H; i++)
                    lm[h][y * H + i] = src[y] < 0 ? 0.0f : E[src[y] * H + i];
            free(src);
        } else {
            for (int64_t i = 0; i < V * H; i++)
                lm[h][i] = kind == HEADS_COPY ? E[i] : frand();
        }
        ws[h] = w, bs[h] = b, lms[h] = lm[h];
    }
    cr_assert_eq(eng_medusa_heads_write(dir, N_HEADS, H, V, ws, bs, lms, "stories260K"), 0, "%s",
                 eng_error());
    for (int h = 0; h < N_HEADS; h++)
        free(lm[h]);
    free(w);
    free(b);
    eng_medusa_heads *mh = NULL;
    cr_assert_eq(eng_medusa_heads_open(&mh, dir, H, V), 0, "%s", eng_error());
    cr_assert_eq(eng_medusa_heads_count(mh), N_HEADS);
    return mh;
}

static eng_medusa *make_decoder(const eng_medusa_heads *mh, const eng_medusa_tree *t,
                                enum eng_medusa_accept acc)
{
    eng_medusa *md = NULL;
    int rc = eng_medusa_create(&md, &(eng_medusa_cfg){.model = g_m, .kn = g_kn, .heads = mh,
                                                       .tree = t, .max_seqs = 2 * MAX_B,
                                                       .accept = acc});
    cr_assert_eq(rc, 0, "%s", eng_error());
    return md;
}

/* The 16 most likely paths of mc_sim_7b_63 (a CPU-sized tree). */
#define TREE16 "[[0],[0,0],[1],[0,1],[2],[0,0,0],[1,0],[0,2],[3],[0,3],[4],[0,4],[2,0],[0,5]," \
               "[0,0,1],[5]]"

static eng_medusa_tree *tree(const char *spec)
{
    eng_medusa_tree *t = NULL;
    cr_assert_eq(eng_medusa_tree_from_spec(&t, spec), 0, "%s", eng_error());
    return t;
}

/* ---- plain greedy reference --------------------------------------------- */

struct seqrun {
    int32_t prompt[64];
    int64_t n_prompt;
    int32_t out[MAX_TOK]; /* generated tokens */
    int64_t n_out;
    int ref_seq;          /* KV sequence of the plain run (kept for KV checks) */
};

static void encode(struct seqrun *r, const char *text)
{
    r->n_prompt = eng_tok_encode(eng_model_tokenizer(g_m), text, strlen(text), true, r->prompt,
                                 64);
    cr_assert_geq(r->n_prompt, 1);
}

/* Plain greedy decoding, one token per forward, to N_POS positions. The
 * sequence stays allocated so that its KV can be compared. */
static void plain_greedy(struct seqrun *r)
{
    float *logits = malloc((size_t)V * sizeof(float));
    cr_assert_not_null(logits);
    r->ref_seq = eng_kv_seq_alloc(g_kv);
    cr_assert_geq(r->ref_seq, 0);
    eng_seq_in in = {.seq = r->ref_seq, .tokens = r->prompt, .n_tokens = r->n_prompt};
    cr_assert_eq(eng_forward(g_c, g_kv, &in, 1, logits, NULL), 1, "%s", eng_error());
    r->n_out = 0;
    while (r->n_prompt + r->n_out < g_npos) {
        int32_t next = eng_argmax(logits, V);
        r->out[r->n_out++] = next;
        in = (eng_seq_in){.seq = r->ref_seq, .tokens = &next, .n_tokens = 1};
        cr_assert_eq(eng_forward(g_c, g_kv, &in, 1, logits, NULL), 1, "%s", eng_error());
    }
    free(logits);
}

/* Largest |a - b| / max(1, |b|) over the K and V of positions [from, to) of
 * two sequences (b: the plain run). The tree forward multiplies more rows at
 * once than plain decoding, which may round differently in the last bit. */
static float kv_diff(int seq_a, int seq_b, int64_t from, int64_t to)
{
    const eng_hparams *hp = eng_model_hparams(g_m);
    const int64_t n = (int64_t)hp->n_kv_head * hp->head_dim;
    float d = 0;
    for (int l = 0; l < hp->n_layer; l++)
        for (int64_t p = from; p < to; p++) {
            const float *ka = eng_kv_k_at(g_kv, l, seq_a, p), *kb = eng_kv_k_at(g_kv, l, seq_b, p);
            const float *va = eng_kv_v_at(g_kv, l, seq_a, p), *vb = eng_kv_v_at(g_kv, l, seq_b, p);
            for (int64_t i = 0; i < n; i++)
                d = fmaxf(d, fmaxf(fabsf(ka[i] - kb[i]) / fmaxf(1.0f, fabsf(kb[i])),
                                   fabsf(va[i] - vb[i]) / fmaxf(1.0f, fabsf(vb[i]))));
        }
    return d;
}

/* ---- Medusa runs -------------------------------------------------------- */

struct mstats {
    int64_t steps, accepted, tokens;
    float kv_max_diff;
};

/* Prefill the n prompts in one batched forward, then step all unfinished
 * sequences together until each has N_POS positions. Generated tokens go to
 * out[b][]; with check_kv, every step's newly cached positions are compared
 * with the plain run's KV (r[b].ref_seq). */
static void medusa_run(eng_medusa *md, struct seqrun *r, int n, uint64_t seed, bool check_kv,
                       int32_t out[][MAX_TOK], int64_t *n_out, struct mstats *st)
{
    float *logits = malloc((size_t)(n * V) * sizeof(float));
    float *hidden = malloc((size_t)(n * H) * sizeof(float));
    cr_assert(logits && hidden);
    int seqs[MAX_B];
    eng_seq_in in[MAX_B];
    for (int b = 0; b < n; b++) {
        seqs[b] = eng_kv_seq_alloc(g_kv);
        cr_assert_geq(seqs[b], 0);
        in[b] = (eng_seq_in){.seq = seqs[b], .tokens = r[b].prompt, .n_tokens = r[b].n_prompt};
        n_out[b] = 0;
    }
    cr_assert_eq(eng_forward(g_c, g_kv, in, n, logits, hidden), n, "%s", eng_error());
    for (int b = 0; b < n; b++)
        cr_assert_eq(eng_medusa_seq_begin(md, seqs[b], logits + b * V, hidden + b * H,
                                          seed + (uint64_t)b),
                     0);
    memset(st, 0, sizeof(*st));
    for (;;) {
        int act[MAX_B], bi[MAX_B], k = 0;
        for (int b = 0; b < n; b++)
            if (r[b].n_prompt + n_out[b] < g_npos) {
                bi[k] = b;
                act[k++] = seqs[b];
            }
        if (k == 0)
            break;
        int64_t len0[MAX_B];
        int32_t root[MAX_B];
        for (int j = 0; j < k; j++) {
            len0[j] = eng_kv_seq_len(g_kv, act[j]);
            /* greedy: the decoder knows the next root without a download,
             * and it is the argmax of the pending row; typical has none */
            root[j] = eng_medusa_seq_root(md, act[j]);
            if (root[j] >= 0)
                cr_assert_eq(root[j], eng_argmax(eng_medusa_seq_logits(md, act[j]), V));
            else
                cr_assert_eq(root[j], -EINVAL);
        }
        eng_medusa_result res[MAX_B];
        int64_t got = eng_medusa_step(md, g_c, g_kv, act, k, res);
        cr_assert_gt(got, 0, "step: %s", eng_error());
        int64_t sum = 0;
        for (int j = 0; j < k; j++) {
            const int b = bi[j];
            cr_assert_eq(res[j].n_tokens, res[j].n_accepted + 1);
            if (root[j] >= 0)
                cr_assert_eq(res[j].tokens[0], root[j], "the step starts from its root");
            sum += res[j].n_tokens;
            for (int i = 0; i < res[j].n_tokens; i++)
                out[b][n_out[b]++] = res[j].tokens[i];
            /* The cache holds exactly the emitted tokens. */
            cr_assert_eq(eng_kv_seq_len(g_kv, act[j]), r[b].n_prompt + n_out[b]);
            st->accepted += res[j].n_accepted;
            st->steps++;
            if (check_kv) {
                int64_t to = eng_kv_seq_len(g_kv, act[j]);
                if (to > g_npos)
                    to = g_npos; /* the plain run's cache ends there */
                if (to > len0[j])
                    st->kv_max_diff = fmaxf(st->kv_max_diff,
                                            kv_diff(act[j], r[b].ref_seq, len0[j], to));
            }
        }
        cr_assert_eq(got, sum);
    }
    for (int b = 0; b < n; b++) {
        st->tokens += n_out[b];
        eng_medusa_seq_end(md, seqs[b]);
        cr_assert_eq(eng_kv_seq_free(g_kv, seqs[b]), 0);
    }
    free(logits);
    free(hidden);
}

/* Medusa greedy over prompts [first, first + n) as one batch, checked token
 * for token (and KV) against plain greedy. */
static struct mstats check_lossless(enum heads_kind kind, const char *tree_name, int first,
                                    int n)
{
    struct seqrun r[MAX_B];
    for (int b = 0; b < n; b++) {
        encode(&r[b], PROMPTS[first + b]);
        plain_greedy(&r[b]);
        g_oracle_text[b] = r[b].out;
        g_oracle_len[b] = r[b].n_out;
    }
    g_oracle_n = n;
    eng_medusa_heads *mh = make_heads(kind, KIND_NAME[kind]);
    eng_medusa_tree *t = tree(tree_name);
    eng_medusa *md = make_decoder(mh, t, ENG_MEDUSA_GREEDY);
    static int32_t out[MAX_B][MAX_TOK];
    int64_t n_out[MAX_B];
    struct mstats st;
    medusa_run(md, r, n, 1, true, out, n_out, &st);
    for (int b = 0; b < n; b++) {
        cr_assert_geq(r[b].n_prompt + n_out[b], g_npos);
        for (int64_t i = 0; i < r[b].n_out; i++)
            cr_assert_eq(out[b][i], r[b].out[i],
                         "prompt \"%s\", tree %s: token %lld is %d, plain greedy gives %d",
                         PROMPTS[first + b], tree_name, (long long)i, out[b][i], r[b].out[i]);
        cr_assert_eq(eng_kv_seq_free(g_kv, r[b].ref_seq), 0);
    }
    cr_assert_leq(st.kv_max_diff, 1e-5f, "compacted KV differs from plain decoding by %g",
                  (double)st.kv_max_diff);
    cr_log_info("%s heads, %s, %d seq: %lld tokens in %lld seq-steps (%.2f tok/step), KV "
                "diff %g",
                KIND_NAME[kind], tree_name, n, (long long)st.tokens,
                (long long)st.steps, (double)st.tokens / (double)st.steps,
                (double)st.kv_max_diff);
    eng_medusa_destroy(md);
    eng_medusa_tree_destroy(t);
    eng_medusa_heads_close(mh);
    return st;
}

/* The costliest case: 64 nodes per step, almost nothing accepted. */
Test(engine_medusa, greedy_equals_plain_random_heads_mc_sim)
{
    check_lossless(HEADS_RANDOM, "mc_sim_7b_63", 0, 1);
}

Test(engine_medusa, greedy_equals_plain_random_heads_chain3)
{
    for (int p = 0; p < 3; p++)
        check_lossless(HEADS_RANDOM, "chain3", p, 1);
}

Test(engine_medusa, greedy_equals_plain_copy_heads_mc_sim)
{
    g_npos = 128;
    int64_t acc = check_lossless(HEADS_COPY, "mc_sim_7b_63", 1, 1).accepted;
    cr_assert_gt(acc, 0, "copy heads never got a candidate accepted: compaction untested");
}

Test(engine_medusa, greedy_equals_plain_oracle_heads_mc_sim)
{
    int64_t acc = 0;
    for (int p = 1; p < 3; p++)
        acc += check_lossless(HEADS_ORACLE, "mc_sim_7b_63", p, 1).accepted;
    cr_assert_gt(acc, 0, "oracle heads never got a candidate accepted: compaction untested");
}

Test(engine_medusa, greedy_equals_plain_oracle_heads_chain3)
{
    int64_t acc = 0;
    for (int p = 0; p < 4; p++)
        acc += check_lossless(HEADS_ORACLE, "chain3", p, 1).accepted;
    cr_assert_gt(acc, 0, "copy heads never got a candidate accepted: compaction untested");
}

/* 8 sequences × 64 nodes per forward: shorter runs keep this fast. */
Test(engine_medusa, greedy_equals_plain_batch8_mc_sim)
{
    g_npos = 64;
    check_lossless(HEADS_RANDOM, "mc_sim_7b_63", 0, MAX_B);
    struct mstats a = check_lossless(HEADS_ORACLE, "mc_sim_7b_63", 0, MAX_B);
    cr_assert_gt(a.accepted, 0);
}

Test(engine_medusa, greedy_equals_plain_batch8_chain3)
{
    g_npos = 128;
    check_lossless(HEADS_RANDOM, "chain3", 0, MAX_B);
    g_npos = N_POS;
    struct mstats a = check_lossless(HEADS_ORACLE, "chain3", 0, MAX_B);
    cr_assert_gt(a.accepted, 0);
}

/* ---- typical acceptance ------------------------------------------------- */

static void typical_run(eng_medusa *md, uint64_t seed, int32_t out[][MAX_TOK], int64_t *n_out,
                        struct seqrun *r, int n, struct mstats *st)
{
    for (int b = 0; b < n; b++)
        encode(&r[b], PROMPTS[b]);
    medusa_run(md, r, n, seed, false, out, n_out, st);
}

Test(engine_medusa, typical_deterministic_for_seed)
{
    eng_medusa_heads *mh = make_heads(HEADS_COPY, "copy");
    eng_medusa_tree *t = tree(TREE16);
    eng_medusa *md = make_decoder(mh, t, ENG_MEDUSA_TYPICAL);
    g_npos = 96;
    static int32_t a[2][MAX_TOK], b[2][MAX_TOK], c[2][MAX_TOK];
    int64_t na[2], nb[2], nc[2];
    struct seqrun r[2];
    struct mstats st;
    typical_run(md, 42, a, na, r, 2, &st);
    typical_run(md, 42, b, nb, r, 2, &st);
    typical_run(md, 4242, c, nc, r, 2, &st);
    int64_t differ = 0;
    for (int s = 0; s < 2; s++) {
        cr_assert_eq(na[s], nb[s], "sequence %d: same seed, different lengths", s);
        cr_assert_arr_eq(a[s], b[s], (size_t)na[s] * sizeof(int32_t),
                         "sequence %d: same seed, different tokens", s);
        for (int64_t i = 0; i < na[s] && i < nc[s]; i++)
            differ += a[s][i] != c[s][i];
    }
    cr_assert_gt(differ, 0, "another seed gave the same text: the RNG is not used");
    eng_medusa_destroy(md);
    eng_medusa_tree_destroy(t);
    eng_medusa_heads_close(mh);
}

/* Every emitted token, re-scored by a plain forward over the final text,
 * has p >= min(eps, alpha·exp(-H)) at its position. */
Test(engine_medusa, typical_never_below_threshold)
{
    eng_medusa_heads *mh = make_heads(HEADS_COPY, "copy");
    eng_medusa_tree *t = tree(TREE16);
    eng_medusa *md = make_decoder(mh, t, ENG_MEDUSA_TYPICAL);
    g_npos = 200;
    static int32_t out[MAX_B][MAX_TOK];
    int64_t n_out[MAX_B];
    struct seqrun r[MAX_B];
    struct mstats st;
    typical_run(md, 7, out, n_out, r, 4, &st);
    cr_assert_gt(st.accepted, 0, "no candidate accepted: the threshold path is untested");
    float *logits = malloc((size_t)(N_POS * V) * sizeof(float));
    static int32_t text[N_POS + MAX_TOK];
    static uint8_t want[N_POS + MAX_TOK];
    cr_assert_not_null(logits);
    int64_t checked = 0;
    for (int s = 0; s < 4; s++) {
        int64_t n = r[s].n_prompt;
        memcpy(text, r[s].prompt, (size_t)n * sizeof(int32_t));
        for (int64_t i = 0; i < n_out[s] && n < N_POS; i++)
            text[n++] = out[s][i];
        memset(want, 1, (size_t)n);
        int seq = eng_kv_seq_alloc(g_kv);
        eng_seq_in in = {.seq = seq, .tokens = text, .n_tokens = n, .want = want};
        cr_assert_eq(eng_forward(g_c, g_kv, &in, 1, logits, NULL), n, "%s", eng_error());
        for (int64_t i = r[s].n_prompt; i < n; i++) {
            const float *row = logits + (i - 1) * V;
            float ss[3];
            cr_assert_eq(kn_ctx_ops(g_kn)->softmax_stats(g_kn, row, 1, V, 1.0f, ss), 0);
            float thr = eng_medusa_typical_threshold(ss, ENG_MEDUSA_EPS_DEFAULT,
                                                     ENG_MEDUSA_ALPHA_DEFAULT);
            double p = exp((double)row[text[i]] - (double)ss[1]);
            cr_assert_geq(p, (double)thr * (1 - 1e-4),
                          "sequence %d position %lld: token %d has p = %g < threshold %g", s,
                          (long long)i, text[i], p, (double)thr);
            checked++;
        }
        cr_assert_eq(eng_kv_seq_free(g_kv, seq), 0);
    }
    cr_assert_gt(checked, 400);
    cr_log_info("typical: %lld tokens in %lld seq-steps (%.2f tok/step)", (long long)st.tokens,
                (long long)st.steps, (double)st.tokens / (double)st.steps);
    free(logits);
    eng_medusa_destroy(md);
    eng_medusa_tree_destroy(t);
    eng_medusa_heads_close(mh);
}

/* The threshold from a row's softmax statistics, on the two extremes. */
Test(engine_medusa, typical_threshold_uniform_and_peaked)
{
    float *l = calloc((size_t)V, sizeof(float));
    cr_assert_not_null(l);
    const kn_ops *ops = kn_ctx_ops(g_kn);
    float st[3];
    /* uniform: H = -log(1/V + 1e-5)·(V·1/V) → alpha·exp(-H) = alpha·(1/V + 1e-5) */
    cr_assert_eq(ops->softmax_stats(g_kn, l, 1, V, 1.0f, st), 0);
    float thr = eng_medusa_typical_threshold(st, 0.09f, 0.3f);
    cr_assert_float_eq(thr, 0.3f * (1.0f / (float)V + 1e-5f), 1e-6f);
    cr_assert_float_eq(st[1], logf((float)V), 1e-4f);
    /* one token certain: H ≈ 0 → threshold = eps */
    l[3] = 100.0f;
    cr_assert_eq(ops->softmax_stats(g_kn, l, 1, V, 1.0f, st), 0);
    thr = eng_medusa_typical_threshold(st, 0.09f, 0.3f);
    cr_assert_float_eq(thr, 0.09f, 1e-6f);
    free(l);
}

/* ---- errors ------------------------------------------------------------- */

Test(engine_medusa, create_rejects_tree_deeper_than_heads)
{
    eng_medusa_heads *mh = make_heads(HEADS_RANDOM, "random");
    eng_medusa_tree *t = tree("chain5");
    eng_medusa *md = (eng_medusa *)&md;
    int rc = eng_medusa_create(&md, &(eng_medusa_cfg){.model = g_m, .kn = g_kn, .heads = mh,
                                                       .tree = t, .max_seqs = 1});
    cr_assert_eq(rc, -EINVAL);
    cr_assert_eq(md, (eng_medusa *)&md, "*out changed on error");
    cr_assert_not_null(strstr(eng_error(), "needs 5 heads"), "message: %s", eng_error());
    rc = eng_medusa_create(&md, &(eng_medusa_cfg){.model = g_m, .kn = g_kn, .heads = mh,
                                                   .tree = t, .max_seqs = 0});
    cr_assert_eq(rc, -EINVAL);
    eng_medusa_tree_destroy(t);
    eng_medusa_heads_close(mh);
}

Test(engine_medusa, step_rejects_unstarted_and_repeated_sequences)
{
    eng_medusa_heads *mh = make_heads(HEADS_RANDOM, "random");
    eng_medusa_tree *t = tree("chain3");
    eng_medusa *md = make_decoder(mh, t, ENG_MEDUSA_GREEDY);
    eng_medusa_result res[2];
    int s = eng_kv_seq_alloc(g_kv);
    int32_t bos = 1;
    float *logits = malloc((size_t)V * sizeof(float)), *hidden = malloc((size_t)H * sizeof(float));
    eng_seq_in in = {.seq = s, .tokens = &bos, .n_tokens = 1};
    cr_assert_eq(eng_forward(g_c, g_kv, &in, 1, logits, hidden), 1);
    cr_assert_eq(eng_medusa_step(md, g_c, g_kv, &s, 1, res), -EINVAL);
    cr_assert_null(eng_medusa_seq_logits(md, s));
    cr_assert_eq(eng_medusa_seq_begin(md, 2 * MAX_B, logits, hidden, 0), -EINVAL);
    cr_assert_eq(eng_medusa_seq_begin(md, s, logits, hidden, 0), 0);
    int two[2] = {s, s};
    cr_assert_eq(eng_medusa_step(md, g_c, g_kv, two, 2, res), -EINVAL);
    cr_assert_eq(eng_medusa_step(md, g_c, g_kv, two, 0, res), -EINVAL);
    cr_assert_eq(eng_kv_seq_len(g_kv, s), 1);
    cr_assert_geq(eng_medusa_step(md, g_c, g_kv, &s, 1, res), 1, "%s", eng_error());
    eng_medusa_seq_end(md, s);
    cr_assert_eq(eng_medusa_step(md, g_c, g_kv, &s, 1, res), -EINVAL);
    /* started for the decoder but gone from the cache */
    cr_assert_eq(eng_medusa_seq_begin(md, s, logits, hidden, 0), 0);
    cr_assert_eq(eng_kv_seq_free(g_kv, s), 0);
    cr_assert_eq(eng_medusa_step(md, g_c, g_kv, &s, 1, res), -EINVAL);
    cr_assert_not_null(strstr(eng_error(), "not allocated"), "message: %s", eng_error());
    free(logits);
    free(hidden);
    eng_medusa_destroy(md);
    eng_medusa_tree_destroy(t);
    eng_medusa_heads_close(mh);
}

/* A failed step changes nothing: out of KV (-ENOSPC) leaves the length,
 * the cached K/V and the pending logits; a ctx too small for the tree
 * (-EINVAL) leaves the RNG, so that steps interleaved with failures draw
 * exactly what a decoder that never failed draws. */
Test(engine_medusa, step_errors_change_nothing)
{
    eng_kv *kv = NULL;
    eng_kv_cfg kc;
    eng_model_kv_cfg(g_m, 16, 64, 2, 40, &kc);
    cr_assert_eq(eng_kv_create(&kv, g_kn, &kc), 0);
    eng_ctx *small_c = NULL;
    cr_assert_eq(eng_ctx_create(&small_c, g_m, &(eng_ctx_cfg){.kn = g_kn, .max_tokens = 8}), 0);
    eng_medusa_heads *mh = make_heads(HEADS_COPY, "copy");
    eng_medusa_tree *t = tree("mc_sim_7b_63");
    eng_medusa *md = NULL, *md2 = NULL;
    eng_medusa_cfg cfg = {.model = g_m, .kn = g_kn, .heads = mh, .tree = t,
                          .max_seqs = 2 * MAX_B, .accept = ENG_MEDUSA_TYPICAL,
                          .temperature = 1.5f};
    cr_assert_eq(eng_medusa_create(&md, &cfg), 0, "%s", eng_error());
    cr_assert_eq(eng_medusa_create(&md2, &cfg), 0, "%s", eng_error());
    struct seqrun r;
    encode(&r, "Once upon a time");
    float *logits = malloc((size_t)V * sizeof(float)), *hidden = malloc((size_t)H * sizeof(float));
    float *before = malloc((size_t)V * sizeof(float));
    cr_assert(logits && hidden && before);

    int s = eng_kv_seq_alloc(kv);
    eng_seq_in in = {.seq = s, .tokens = r.prompt, .n_tokens = r.n_prompt};
    cr_assert_eq(eng_forward(g_c, kv, &in, 1, logits, hidden), 1);
    cr_assert_eq(eng_medusa_seq_begin(md, s, logits, hidden, 5), 0);
    float k0 = eng_kv_k_at(kv, 0, s, 0)[0];
    memcpy(before, eng_medusa_seq_logits(md, s), (size_t)V * sizeof(float));
    eng_medusa_result ra, rb;
    cr_assert_eq(eng_medusa_step(md, g_c, kv, &s, 1, &ra), -ENOSPC);
    cr_assert_eq(eng_kv_seq_len(kv, s), r.n_prompt);
    cr_assert_eq(eng_kv_k_at(kv, 0, s, 0)[0], k0);
    cr_assert_arr_eq(eng_medusa_seq_logits(md, s), before, (size_t)V * sizeof(float));
    eng_medusa_seq_end(md, s);

    int a = eng_kv_seq_alloc(g_kv), b = eng_kv_seq_alloc(g_kv);
    in.seq = a;
    cr_assert_eq(eng_forward(g_c, g_kv, &in, 1, logits, hidden), 1);
    in.seq = b;
    cr_assert_eq(eng_forward(g_c, g_kv, &in, 1, logits, hidden), 1);
    cr_assert_eq(eng_medusa_seq_begin(md, a, logits, hidden, 5), 0);
    cr_assert_eq(eng_medusa_seq_begin(md2, b, logits, hidden, 5), 0);
    for (int step = 0; step < 8; step++) {
        int64_t len = eng_kv_seq_len(g_kv, a);
        cr_assert_eq(eng_medusa_step(md, small_c, g_kv, &a, 1, &ra), -EINVAL);
        cr_assert_eq(eng_kv_seq_len(g_kv, a), len);
        cr_assert_gt(eng_medusa_step(md, g_c, g_kv, &a, 1, &ra), 0, "%s", eng_error());
        cr_assert_gt(eng_medusa_step(md2, g_c, g_kv, &b, 1, &rb), 0, "%s", eng_error());
        cr_assert_eq(ra.n_tokens, rb.n_tokens, "step %d", step);
        cr_assert_arr_eq(ra.tokens, rb.tokens, (size_t)ra.n_tokens * sizeof(int32_t),
                         "step %d: a failed step changed the RNG", step);
    }
    free(logits);
    free(hidden);
    free(before);
    eng_medusa_destroy(md);
    eng_medusa_destroy(md2);
    eng_medusa_tree_destroy(t);
    eng_medusa_heads_close(mh);
    eng_ctx_destroy(small_c);
    eng_kv_destroy(kv);
}
