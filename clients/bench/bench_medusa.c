/* gorgon-bench medusa — Medusa speculative decoding against plain greedy
 * decoding of the same model, on the same prompts, in the same run.
 *
 * For each prompt: prefill, then N greedy tokens one forward each (plain),
 * then prefill again and Medusa steps (greedy acceptance) until N tokens.
 * Greedy acceptance must reproduce plain greedy exactly: any difference in
 * the first N tokens is reported and fails the run.
 *
 * Reported:
 *   tokens_per_step      mean tokens a Medusa step emits (base token included)
 *   per_head_acceptance  [d-1]: fraction of steps that accepted >= d candidates
 *   speedup              Medusa tokens/s over plain tokens/s
 *   step_cost_ratio      time of one Medusa step (heads + tree forward +
 *                        acceptance + KV compaction) over one plain decode step
 *   projected_speedup    tokens_per_step / step_cost_ratio
 * --step-cost-only reports step_cost_ratio alone (heads that predict
 * nothing, e.g. --medusa random: heads with random weights written to a
 * temporary directory, removed afterwards; --medusa random-frozen: random
 * ResBlocks with the base output matrix as projection, the layout the
 * engine shares across heads). Times are the best of --reps
 * repetitions of the whole prompt set, plain and Medusa interleaved so a
 * burst of load from other processes hits both alike. --device runs it all
 * on a CUDA device (the model and the heads uploaded once).
 *
 * --synthetic NAME (a model with no file, weights of --dtype generated in
 * the device's memory; see gorgon-bench engine) measures the step-cost
 * ratio alone, at each --batch B: the time of one verification forward of
 * B trees (B x n_nodes rows, the tree mask and positions, every row's
 * logits and hidden state, greedy ids downloaded) over one plain decode
 * forward of B tokens, each sequence --context tokens long and cut back to
 * it after every step. Heads come only from files (eng_medusa_heads_open),
 * so this mode leaves them out: the verification forward is what dominates
 * a step, and the heads add their matmuls (n_heads x dim^2, plus the
 * vocabulary projection: n_heads x vocab x dim, or vocab x dim once when
 * shared), top-k and the KV compaction on top: a lower bound of the step
 * cost. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "clients/bench/bench.h"
#include "common/common.h"
#include "engine/engine.h"
#include "engine/medusa/medusa.h"
#include "engine/medusa/medusa_fit.h"

static const char *const PROMPTS[] = {
    "Once upon a time, there was a little girl named Lily.",
    "One day, a boy named Tom went to the park with his dog.",
    "The sun was shining and the birds were singing.",
    "Mom said it was time to go to bed, but Ben was not tired.",
    "There was a big red ball in the garden.",
    "Sam and Sue wanted to build a tall tower of blocks.",
    "The little cat was hungry and looked for food.",
    "It was a rainy day, so Anna stayed inside and played.",
};
#define N_PROMPTS ((int)(sizeof(PROMPTS) / sizeof(PROMPTS[0])))
#define MAX_PROMPT 64
#define MAX_BATCHES 16

static void usage(FILE *f)
{
    fprintf(f,
            "usage: gorgon-bench medusa --model BASE.gguf --medusa DIR|random [--tree SPEC]\n"
            "         [--device cpu|cuda|cuda:N (cpu)] [--prompts N (4)] [--tokens N (128)]\n"
            "         [--threads N (1)] [--reps R (3)] [--step-cost-only] [--json]\n"
            "       gorgon-bench medusa --synthetic 7b|1b|110m|tiny [--dtype f32|f16|bf16|q8_0|q4_0]\n"
            "         [--device D] [--tree SPEC] [--batch B[,B...] (1,8,32)] [--context N (256)]\n"
            "         [--steps N (16)] [--threads N (1)] [--reps R (3)] [--json]\n"
            "  --medusa DIR   heads (medusa_lm_head.safetensors); \"random\": random heads;\n"
            "                 \"random-frozen\": random ResBlocks, projection = the base output\n"
            "                 matrix (the layout of gorgon-medusa-train --freeze-lm)\n"
            "  --tree SPEC    built-in name or list (default: DIR/medusa_choices.json, else\n"
            "                 the 16 most likely paths of mc_sim_7b_63)\n"
            "  --step-cost-only  report only the cost of a Medusa step over a plain one\n"
            "  --synthetic NAME  step cost only, of a model with no file (weights of --dtype,\n"
            "                 default f16), at each --batch: one verification forward of the\n"
            "                 trees over one plain decode forward (the heads left out)\n");
}

/* Random heads for n_heads heads into a fresh temp dir (path in dir). The
 * ResBlock weights are small so h' stays near h; the projection is random,
 * so the heads' guesses are essentially never accepted. With base_out
 * non-NULL the projection is that matrix instead (what
 * gorgon-medusa-train --freeze-lm writes; the engine then shares it). */
static int write_random_heads(char *dir, size_t cap, int n_heads, int64_t H, int64_t V,
                              const kn_tensor *base_out)
{
    const char *tmp = getenv("TMPDIR");
    if (snprintf(dir, cap, "%s/gorgon-bench-medusa-XXXXXX", tmp && *tmp ? tmp : "/tmp") >=
        (int)cap)
        return eng_fail(-ENAMETOOLONG, "TMPDIR too long");
    if (!mkdtemp(dir)) {
        int rc = cm_neg_errno();
        return eng_fail(rc, "%s: mkdtemp: %s", dir, cm_strerror(rc));
    }
    float *w = malloc((size_t)(H * H) * sizeof(float));
    float *b = calloc((size_t)H, sizeof(float));
    float *lm = malloc((size_t)(V * H) * sizeof(float));
    if (!w || !b || !lm) {
        free(w), free(b), free(lm);
        return eng_fail(-ENOMEM, "out of memory for random heads");
    }
    uint64_t x = 0x2545f4914f6cdd1dull;
    const float sw = 0.02f, sl = 1.0f / sqrtf((float)H);
    for (int64_t i = 0; i < H * H; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        w[i] = sw * ((float)(x >> 40) / (float)(1u << 24) - 0.5f);
    }
    for (int64_t i = 0; i < V * H && !base_out; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        lm[i] = sl * ((float)(x >> 40) / (float)(1u << 24) - 0.5f);
    }
    for (int64_t v = 0; v < V && base_out; v++)
        kn_dequantize_row(base_out->type,
                          (const char *)base_out->data + (size_t)v * kn_row_bytes(base_out->type, H),
                          H, lm + (size_t)v * (size_t)H);
    const float *ws[ENG_MEDUSA_MAX_DEPTH], *bs[ENG_MEDUSA_MAX_DEPTH], *lms[ENG_MEDUSA_MAX_DEPTH];
    for (int k = 0; k < n_heads; k++) /* every head shares the same data */
        ws[k] = w, bs[k] = b, lms[k] = lm;
    int rc = eng_medusa_heads_write(dir, n_heads, H, V, ws, bs, lms, NULL);
    free(w), free(b), free(lm);
    return rc;
}

static void remove_random_heads(const char *dir)
{
    char path[PATH_MAX];
    snprintf(path, sizeof(path), "%s/%s", dir, ENG_MEDUSA_HEADS_FILE);
    unlink(path);
    snprintf(path, sizeof(path), "%s/%s", dir, ENG_MEDUSA_CONFIG_FILE);
    unlink(path);
    rmdir(dir);
}

typedef struct run_env {
    const eng_model *m;
    kn_ctx *kn;
    eng_ctx *c;
    eng_kv *kv;
    eng_medusa *md;
    float *logits, *hidden; /* backend */
    float *row;             /* host [V]: a logits row downloaded from a device */
    int64_t V, n_tokens;
} run_env;

/* The first row of the last forward's logits, readable on the host (on a
 * device: downloaded), or NULL. */
static const float *host_logits(run_env *e)
{
    if (kn_ctx_host_memory(e->kn))
        return e->logits;
    return kn_buf_download(e->kn, e->row, e->logits, (size_t)e->V * sizeof(float)) < 0 ? NULL
                                                                                        : e->row;
}

/* Top-1 minus top-2 logit: how close a greedy choice was to a tie. */
static float top2_gap(const float *l, int64_t n)
{
    float a = -INFINITY, b = -INFINITY;
    for (int64_t i = 0; i < n; i++)
        if (l[i] > a)
            b = a, a = l[i];
        else if (l[i] > b)
            b = l[i];
    return a - b;
}

/* Plain greedy: out[0..n_tokens) after prompt p; seconds of the decode
 * loop (prefill excluded), or < 0. gap (NULL: not wanted; untimed runs
 * only) gets each choice's top2_gap. */
static double run_plain(run_env *e, const int32_t *ids, int64_t n_ids, int32_t *out, float *gap)
{
    int seq = eng_kv_seq_alloc(e->kv);
    if (seq < 0)
        return -1;
    eng_seq_in in = {.seq = seq, .tokens = ids, .n_tokens = n_ids};
    double t = -1;
    const float *l;
    if (eng_forward(e->c, e->kv, &in, 1, e->logits, NULL) >= 0 && (l = host_logits(e))) {
        const uint64_t t0 = cm_now_ns();
        int64_t i = 0;
        out[0] = eng_argmax(l, e->V);
        if (gap)
            gap[0] = top2_gap(l, e->V);
        for (i = 1; i < e->n_tokens; i++) {
            in = (eng_seq_in){.seq = seq, .tokens = &out[i - 1], .n_tokens = 1};
            if (eng_forward(e->c, e->kv, &in, 1, e->logits, NULL) < 0 || !(l = host_logits(e)))
                break;
            out[i] = eng_argmax(l, e->V);
            if (gap)
                gap[i] = top2_gap(l, e->V);
        }
        if (i == e->n_tokens)
            t = (double)(cm_now_ns() - t0) * 1e-9;
    }
    eng_kv_seq_free(e->kv, seq);
    return t;
}

typedef struct medusa_stats {
    int64_t steps, tokens;
    double t_heads, t_fwd, t_acc; /* seconds in prepare (roots + heads), forward, finish */
    int64_t at_depth[ENG_MEDUSA_MAX_DEPTH + 1]; /* steps accepting >= d */
} medusa_stats;

/* Medusa greedy until n_tokens tokens (out gets the first n_tokens; the
 * first is the prefill's argmax, as for plain). Returns seconds of the step
 * loop, or < 0. */
static double run_medusa(run_env *e, const int32_t *ids, int64_t n_ids, int32_t *out,
                         medusa_stats *st)
{
    int seq = eng_kv_seq_alloc(e->kv);
    if (seq < 0)
        return -1;
    eng_seq_in in = {.seq = seq, .tokens = ids, .n_tokens = n_ids};
    double t = -1;
    if (eng_forward(e->c, e->kv, &in, 1, e->logits, e->hidden) >= 0 &&
        eng_medusa_seq_begin(e->md, seq, e->logits, e->hidden, 0) == 0) {
        const uint64_t t0 = cm_now_ns();
        int64_t n = 0;
        bool ok = true;
        /* each step's root is the argmax of the pending logits: the same
         * token plain decoding emits next */
        while (n < e->n_tokens) {
            /* eng_medusa_step's three phases, timed apart */
            eng_medusa_result r;
            eng_seq_in tin;
            const uint64_t a = cm_now_ns();
            const int64_t nt = eng_medusa_step_prepare(e->md, e->kv, &seq, 1, &tin);
            const uint64_t b = cm_now_ns();
            const int64_t nf = nt < 0 ? nt : eng_forward(e->c, e->kv, &tin, 1, e->logits, e->hidden);
            if (nt >= 0 && nf < 0)
                eng_medusa_step_abort(e->md, &seq, 1);
            const uint64_t c = cm_now_ns();
            if (nf < 0 || eng_medusa_step_finish(e->md, e->kv, &seq, 1, e->logits, e->hidden,
                                                 &r) < 0) {
                ok = false;
                break;
            }
            st->t_heads += (double)(b - a) * 1e-9;
            st->t_fwd += (double)(c - b) * 1e-9;
            st->t_acc += (double)(cm_now_ns() - c) * 1e-9;
            st->steps++;
            st->tokens += r.n_tokens;
            for (int d = 1; d <= r.n_accepted; d++)
                st->at_depth[d]++;
            for (int i = 0; i < r.n_tokens && n < e->n_tokens; i++)
                out[n++] = r.tokens[i];
        }
        if (ok)
            t = (double)(cm_now_ns() - t0) * 1e-9;
        eng_medusa_seq_end(e->md, seq);
    }
    eng_kv_seq_free(e->kv, seq);
    return t;
}

/* ---- --synthetic: the verification forward's cost ------------------------ */

typedef struct verify_cfg {
    const char *synth;
    const eng_hparams *shape;
    enum kn_dtype dtype;
    const char *device, *spec;
    int threads;
    int64_t batch[MAX_BATCHES];
    int n_batch;
    int64_t context, steps, reps;
    bool json;
} verify_cfg;

typedef struct verify_env {
    const eng_medusa_tree *tree;
    eng_ctx *c;
    eng_kv *kv;
    float *logits, *hidden;     /* backend: [B x n_nodes][vocab], [..][dim] */
    int *seqs;                  /* [B] */
    eng_seq_in *in;             /* [B] */
    int32_t *plain_tok;         /* [B]: what a plain step feeds */
    int32_t *tree_tok, *pos;    /* [n_nodes]: a tree's tokens, RoPE positions */
    uint8_t *want;              /* [n_nodes]: every row */
    int32_t *ids;               /* [B x n_nodes]: the greedy ids */
    int64_t context;
} verify_env;

/* Seconds per step of `steps` forwards over the B sequences of v->seqs:
 * plain (one token each) or a whole tree each; each sequence is cut back to
 * its context after every step, so every step sees the same lengths. */
static double verify_steps(verify_env *v, int64_t B, bool tree, int64_t steps)
{
    const eng_medusa_tree *t = v->tree;
    for (int64_t b = 0; b < B; b++)
        v->in[b] = tree ? (eng_seq_in){.seq = v->seqs[b], .tokens = v->tree_tok,
                                       .n_tokens = t->n_nodes, .pos = v->pos, .mask = t->mask,
                                       .want = v->want}
                        : (eng_seq_in){.seq = v->seqs[b], .tokens = &v->plain_tok[b],
                                       .n_tokens = 1};
    const uint64_t t0 = cm_now_ns();
    for (int64_t s = 0; s < steps; s++) {
        /* greedy ids downloaded: the step waits for the device, as a worker's does */
        if (eng_forward_greedy(v->c, v->kv, v->in, (int)B, v->logits, tree ? v->hidden : NULL,
                               v->ids) < 0)
            return -1;
        for (int64_t b = 0; b < B; b++)
            if (eng_kv_seq_truncate(v->kv, v->seqs[b], v->context) < 0)
                return -1;
    }
    return (double)(cm_now_ns() - t0) * 1e-9 / (double)steps;
}

static int run_verify(const verify_cfg *vc)
{
    int status = 1, rc;
    kn_ctx *kn = NULL;
    eng_model *m = NULL;
    eng_medusa_tree *tree = NULL;
    verify_env v = {.context = vc->context};
    int32_t *ids = NULL;
    const char *tree_from = "--tree";
    double plain_s[MAX_BATCHES], tree_s[MAX_BATCHES];
    if (eng_medusa_tree_choose(&tree, vc->spec, NULL, &tree_from) < 0) {
        fprintf(stderr, "gorgon-bench medusa: tree: %s\n", eng_error());
        goto out;
    }
    v.tree = tree;
    if (bench_kn_open("medusa", vc->device, vc->threads, &kn) < 0)
        goto out;
    if ((rc = eng_model_synthetic(&m, vc->shape, vc->dtype, kn, 0x5eedull)) < 0) {
        fprintf(stderr, "gorgon-bench medusa: synthetic %s on %s: %s\n", vc->synth, vc->device,
                eng_error()[0] ? eng_error() : cm_strerror(rc));
        goto out;
    }
    const eng_hparams *hp = eng_model_hparams(m);
    const int64_t nn = tree->n_nodes, max_len = vc->context + nn;
    if (max_len > hp->n_ctx) {
        fprintf(stderr, "gorgon-bench medusa: --context %" PRId64 " + tree (%" PRId64
                        " nodes) exceed the model's context of %" PRId64 "\n",
                vc->context, nn, hp->n_ctx);
        goto out;
    }
    int64_t max_b = 1;
    for (int k = 0; k < vc->n_batch; k++)
        max_b = vc->batch[k] > max_b ? vc->batch[k] : max_b;
    const int64_t rows = max_b * nn;
    eng_kv_cfg kc;
    eng_model_kv_cfg(m, 16, max_b * ((max_len + 15) / 16), (int)max_b, max_len, &kc);
    ids = malloc((size_t)vc->context * sizeof(int32_t));
    v.seqs = malloc((size_t)max_b * sizeof(int));
    v.in = malloc((size_t)max_b * sizeof(eng_seq_in));
    v.plain_tok = malloc((size_t)max_b * sizeof(int32_t));
    v.tree_tok = malloc((size_t)nn * sizeof(int32_t));
    v.pos = malloc((size_t)nn * sizeof(int32_t));
    v.want = malloc((size_t)nn);
    v.ids = malloc((size_t)rows * sizeof(int32_t));
    if (!ids || !v.seqs || !v.in || !v.plain_tok || !v.tree_tok || !v.pos || !v.want || !v.ids ||
        kn_buf_alloc(kn, (size_t)(rows * hp->n_vocab) * sizeof(float), (void **)&v.logits) < 0 ||
        kn_buf_alloc(kn, (size_t)(rows * hp->dim) * sizeof(float), (void **)&v.hidden) < 0 ||
        (rc = eng_ctx_create(&v.c, m,
                             &(eng_ctx_cfg){.kn = kn,
                                            .max_tokens = rows > vc->context ? rows : vc->context,
                                            .max_outputs = rows,
                                            .max_ctx = max_len})) < 0 ||
        (rc = eng_kv_create(&v.kv, kn, &kc)) < 0) {
        fprintf(stderr, "gorgon-bench medusa: setup: %s%s%s\n",
                eng_error()[0] ? eng_error() : "out of memory", kn_ctx_error(kn)[0] ? ": " : "",
                kn_ctx_error(kn));
        goto out;
    }
    /* token ids in [1, vocab): the model has no tokenizer */
    uint64_t x = 0x9e3779b97f4a7c15ull;
    const uint64_t span = hp->n_vocab > 1 ? (uint64_t)hp->n_vocab - 1 : 1;
    for (int64_t i = 0; i < vc->context; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        ids[i] = 1 + (int32_t)((x >> 33) % span);
    }
    for (int64_t i = 0; i < nn; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        v.tree_tok[i] = 1 + (int32_t)((x >> 33) % span);
        v.pos[i] = (int32_t)(vc->context + tree->depth[i]);
        v.want[i] = 1;
    }
    for (int64_t b = 0; b < max_b; b++)
        v.plain_tok[b] = ids[b % vc->context];
    for (int k = 0; k < vc->n_batch; k++) {
        const int64_t B = vc->batch[k];
        int64_t got = 0;
        bool ok = true;
        while (got < B && ok) { /* each sequence prefilled to its context, untimed */
            const int seq = eng_kv_seq_alloc(v.kv);
            if (seq < 0) {
                ok = false;
                break;
            }
            v.seqs[got++] = seq;
            eng_seq_in in = {.seq = seq, .tokens = ids, .n_tokens = vc->context};
            ok = eng_forward(v.c, v.kv, &in, 1, NULL, NULL) >= 0;
        }
        double tp = 1e30, tt = 1e30;
        /* r -1: warm-up (scratch and GEMM choices at this batch); plain and
         * tree interleaved, so a burst of load hits both alike */
        for (int64_t r = -1; r < vc->reps && ok; r++) {
            const double a = verify_steps(&v, B, false, r < 0 ? 1 : vc->steps);
            const double b = a < 0 ? -1 : verify_steps(&v, B, true, r < 0 ? 1 : vc->steps);
            ok = a >= 0 && b >= 0;
            if (ok && r >= 0) {
                tp = a < tp ? a : tp;
                tt = b < tt ? b : tt;
            }
        }
        for (int64_t b = 0; b < got; b++)
            eng_kv_seq_free(v.kv, v.seqs[b]);
        if (!ok) {
            fprintf(stderr, "gorgon-bench medusa: batch %" PRId64 ": forward failed: %s%s%s\n",
                    B, eng_error(), kn_ctx_error(kn)[0] ? ": " : "", kn_ctx_error(kn));
            goto out;
        }
        plain_s[k] = tp;
        tree_s[k] = tt;
    }
    const char *kernels =
        kn_ctx_host_memory(kn) ? kn_variant_name(kn_ctx_variant(kn)) : kn_ctx_ops(kn)->name;
    const char *wt = kn_dtype_name(vc->dtype);
    if (vc->json) {
        printf("{\"suite\":\"medusa\",\"mode\":\"verify_forward\",\"synthetic\":\"%s\","
               "\"device\":\"",
               vc->synth);
        bench_json_puts(kn_ctx_device(kn));
        printf("\",\"dtype\":\"%s\",\"kernels\":\"%s\",\"threads\":%d,\"tree\":", wt, kernels,
               kn_ctx_threads(kn));
        if (vc->spec) {
            putchar('"');
            bench_json_puts(vc->spec);
            putchar('"');
        } else {
            printf("null");
        }
        printf(",\"tree_from\":\"%s\",\"tree_nodes\":%d,\"tree_heads\":%d,\"context\":%" PRId64
               ",\"steps\":%" PRId64 ",\"reps\":%" PRId64 ",\"batches\":[",
               tree_from, tree->n_nodes, tree->n_heads, vc->context, vc->steps, vc->reps);
        for (int k = 0; k < vc->n_batch; k++)
            printf("%s{\"batch\":%" PRId64 ",\"plain_step_ms\":%.4f,\"tree_step_ms\":%.4f,"
                   "\"step_cost_ratio\":%.4f}",
                   k ? "," : "", vc->batch[k], plain_s[k] * 1e3, tree_s[k] * 1e3,
                   tree_s[k] / plain_s[k]);
        printf("]}\n");
    } else {
        printf("medusa: verification forward of a %d-node tree (%s) over a plain decode step, "
               "synthetic %s (%s weights) on %s, %s kernels, context %" PRId64
               " (heads not included)\n",
               tree->n_nodes, tree_from, vc->synth, wt, kn_ctx_device(kn), kernels, vc->context);
        printf("  batch   plain ms    tree ms   step cost ratio\n");
        for (int k = 0; k < vc->n_batch; k++)
            printf("  %5" PRId64 "  %9.3f  %9.3f  %8.3f\n", vc->batch[k], plain_s[k] * 1e3,
                   tree_s[k] * 1e3, tree_s[k] / plain_s[k]);
    }
    status = 0;
out:
    free(ids);
    free(v.seqs);
    free(v.in);
    free(v.plain_tok);
    free(v.tree_tok);
    free(v.pos);
    free(v.want);
    free(v.ids);
    if (kn) {
        kn_buf_free(kn, v.logits);
        kn_buf_free(kn, v.hidden);
    }
    eng_kv_destroy(v.kv);
    eng_ctx_destroy(v.c);
    eng_model_close(m);
    eng_medusa_tree_destroy(tree);
    kn_ctx_destroy(kn);
    return status;
}

int bench_medusa_main(int argc, char **argv)
{
    const char *path = NULL, *dir = NULL, *spec = NULL, *synth = NULL, *device = "cpu";
    const eng_hparams *shape = NULL;
    int64_t threads = 1, n_prompts = 4, n_tokens = 128, reps = 3;
    int64_t batch[MAX_BATCHES] = {1, 8, 32}, context = 256, steps = 16;
    int n_batch = 3, dtype = KN_F16;
    bool json = false, cost_only = false, file_only = false, synth_only = false;
    enum { O_TREE = 256, O_PROMPTS, O_TOKENS, O_REPS, O_COST, O_SYN, O_DTYPE, O_DEVICE,
           O_BATCH, O_CONTEXT, O_STEPS };
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},   {"medusa", required_argument, 0, 'd'},
        {"tree", required_argument, 0, O_TREE}, {"prompts", required_argument, 0, O_PROMPTS},
        {"tokens", required_argument, 0, O_TOKENS}, {"threads", required_argument, 0, 't'},
        {"reps", required_argument, 0, O_REPS}, {"step-cost-only", no_argument, 0, O_COST},
        {"json", no_argument, 0, 'j'},          {"help", no_argument, 0, 'h'},
        {"synthetic", required_argument, 0, O_SYN}, {"dtype", required_argument, 0, O_DTYPE},
        {"device", required_argument, 0, O_DEVICE}, {"batch", required_argument, 0, O_BATCH},
        {"context", required_argument, 0, O_CONTEXT}, {"steps", required_argument, 0, O_STEPS},
        {0, 0, 0, 0},
    };
    optind = 1;
    int o;
    while ((o = getopt_long(argc, argv, "m:d:t:jh", opts, NULL)) != -1) {
        int rc = 0;
        switch (o) {
        case 'm': path = optarg; break;
        case 'd': dir = optarg; break;
        case O_SYN: synth = optarg; rc = bench_parse_synthetic("medusa", optarg, &shape); break;
        case O_DTYPE: rc = bench_parse_dtype("medusa", optarg, &dtype); synth_only = true; break;
        case O_DEVICE: device = optarg; rc = bench_parse_device("medusa", optarg); break;
        case O_BATCH:
            rc = n_batch = bench_parse_i64_list("medusa", "--batch", optarg, 1, 1024, batch,
                                                MAX_BATCHES);
            synth_only = true;
            break;
        case O_CONTEXT: rc = bench_parse_i64("medusa", "--context", optarg, 1, 1 << 20, &context); synth_only = true; break;
        case O_STEPS: rc = bench_parse_i64("medusa", "--steps", optarg, 1, 1 << 20, &steps); synth_only = true; break;
        case O_TREE: spec = optarg; break;
        case O_PROMPTS: rc = bench_parse_i64("medusa", "--prompts", optarg, 1, N_PROMPTS, &n_prompts); file_only = true; break;
        case O_TOKENS: rc = bench_parse_i64("medusa", "--tokens", optarg, 2, 1 << 20, &n_tokens); file_only = true; break;
        case 't': rc = bench_parse_i64("medusa", "--threads", optarg, 1, 1024, &threads); break;
        case O_REPS: rc = bench_parse_i64("medusa", "--reps", optarg, 1, 1000, &reps); break;
        case O_COST: cost_only = true; file_only = true; break;
        case 'j': json = true; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
        if (rc < 0)
            return 2;
    }
    if (optind < argc) {
        usage(stderr);
        return 2;
    }
    if (synth) {
        if (path || dir || file_only) {
            fprintf(stderr, "gorgon-bench medusa: --synthetic: --model, --medusa, --prompts, "
                            "--tokens and --step-cost-only apply to model files only\n");
            return 2;
        }
        verify_cfg vc = {.synth = synth, .shape = shape, .dtype = (enum kn_dtype)dtype,
                         .device = device, .spec = spec, .threads = (int)threads,
                         .n_batch = n_batch, .context = context, .steps = steps, .reps = reps,
                         .json = json};
        memcpy(vc.batch, batch, sizeof(batch));
        if (bench_device_usable("medusa", device) < 0)
            return 1;
        return run_verify(&vc);
    }
    if (!path || !dir) {
        usage(stderr);
        return 2;
    }
    if (synth_only) {
        fprintf(stderr, "gorgon-bench medusa: --dtype, --batch, --context and --steps apply to "
                        "--synthetic only\n");
        return 2;
    }
    if (bench_device_usable("medusa", device) < 0)
        return 1;

    int status = 1, rc;
    kn_ctx *kn = NULL;
    eng_model *m = NULL;
    eng_medusa_heads *mh = NULL;
    eng_medusa_tree *tree = NULL;
    run_env e = {0};
    int32_t *ids = NULL, *plain = NULL, *spec_out = NULL;
    float *gap = NULL;
    int64_t n_ids[N_PROMPTS], max_ids = 0;
    char rnd_dir[PATH_MAX] = "";
    const char *tree_from = "--tree";
    if ((rc = eng_model_open(&m, path)) < 0) {
        fprintf(stderr, "gorgon-bench medusa: %s: %s\n", path,
                eng_error()[0] ? eng_error() : cm_strerror(rc));
        goto out;
    }
    const eng_hparams *hp = eng_model_hparams(m);
    const bool frozen_heads = !strcmp(dir, "random-frozen");
    const bool random_heads = !strcmp(dir, "random") || frozen_heads;
    if ((rc = eng_medusa_tree_choose(&tree, spec, random_heads ? NULL : dir, &tree_from)) < 0) {
        fprintf(stderr, "gorgon-bench medusa: tree: %s\n", eng_error());
        goto out;
    }
    if (random_heads) {
        if ((rc = write_random_heads(rnd_dir, sizeof(rnd_dir), tree->n_heads, hp->dim,
                                     hp->n_vocab, frozen_heads ? eng_model_output(m) : NULL)) < 0) {
            fprintf(stderr, "gorgon-bench medusa: random heads: %s\n", eng_error());
            goto out;
        }
        dir = rnd_dir;
    }
    /* (the random heads above read the output matrix while it is still in
     * the file mapping) */
    if (bench_kn_open("medusa", device, (int)threads, &kn) < 0)
        goto out;
    if ((rc = eng_model_to_device(m, kn)) < 0) {
        fprintf(stderr, "gorgon-bench medusa: %s: %s\n", path,
                eng_error()[0] ? eng_error() : cm_strerror(rc));
        goto out;
    }
    if ((rc = eng_medusa_heads_open(&mh, dir, hp->dim, hp->n_vocab)) < 0) {
        fprintf(stderr, "gorgon-bench medusa: %s: %s\n", dir,
                eng_error()[0] ? eng_error() : cm_strerror(rc));
        goto out;
    }
    /* prompts: text when the model has a tokenizer, else fixed token ids */
    const eng_tok *tok = eng_model_tokenizer(m);
    ids = malloc((size_t)(N_PROMPTS * MAX_PROMPT) * sizeof(int32_t));
    plain = malloc((size_t)n_tokens * sizeof(int32_t));
    spec_out = malloc((size_t)n_tokens * sizeof(int32_t));
    gap = malloc((size_t)n_tokens * sizeof(float));
    if (!ids || !plain || !spec_out || !gap) {
        fprintf(stderr, "gorgon-bench medusa: out of memory\n");
        goto out;
    }
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (int p = 0; p < n_prompts; p++) {
        int32_t *pi = ids + p * MAX_PROMPT;
        if (tok) {
            n_ids[p] = eng_tok_encode(tok, PROMPTS[p], strlen(PROMPTS[p]), true, pi, MAX_PROMPT);
            if (n_ids[p] < 1) {
                fprintf(stderr, "gorgon-bench medusa: cannot tokenize prompt %d\n", p);
                goto out;
            }
        } else {
            n_ids[p] = 16;
            for (int i = 0; i < 16; i++) {
                x = x * 6364136223846793005ull + 1442695040888963407ull;
                pi[i] = (int32_t)((x >> 33) % (uint64_t)hp->n_vocab);
            }
        }
        max_ids = n_ids[p] > max_ids ? n_ids[p] : max_ids;
    }
    const int64_t nn = tree->n_nodes, max_len = max_ids + n_tokens + nn + 1;
    if (max_len > hp->n_ctx) {
        fprintf(stderr, "gorgon-bench medusa: prompt (%" PRId64 ") + --tokens %" PRId64
                        " + tree (%" PRId64 " nodes) exceed the model's context of %" PRId64 "\n",
                max_ids, n_tokens, nn, hp->n_ctx);
        goto out;
    }
    eng_kv_cfg kc;
    eng_model_kv_cfg(m, 16, (max_len + 15) / 16, 1, max_len, &kc);
    e.m = m;
    e.kn = kn;
    e.V = hp->n_vocab;
    e.n_tokens = n_tokens;
    const int64_t max_rows = max_ids > nn ? max_ids : nn;
    e.row = malloc((size_t)hp->n_vocab * sizeof(float));
    if (!e.row ||
        kn_buf_alloc(kn, (size_t)(hp->n_vocab * max_rows) * sizeof(float), (void **)&e.logits) < 0 ||
        kn_buf_alloc(kn, (size_t)(hp->dim * max_rows) * sizeof(float), (void **)&e.hidden) < 0 ||
        (rc = eng_ctx_create(&e.c, m, &(eng_ctx_cfg){.kn = kn,
                                                      .max_tokens = max_ids > nn ? max_ids : nn,
                                                      .max_ctx = max_len})) < 0 ||
        (rc = eng_kv_create(&e.kv, kn, &kc)) < 0 ||
        (rc = eng_medusa_create(&e.md, &(eng_medusa_cfg){.model = m, .kn = kn, .heads = mh,
                                                          .tree = tree, .max_seqs = 1,
                                                          .accept = ENG_MEDUSA_GREEDY})) < 0) {
        fprintf(stderr, "gorgon-bench medusa: setup: %s\n",
                eng_error()[0] ? eng_error() : "out of memory");
        goto out;
    }

    double t_plain = 1e30, t_med = 1e30;
    medusa_stats st = {0}, split = {0};
    int64_t mismatches = 0, first_bad_prompt = -1, first_bad_pos = -1;
    float first_bad_gap = 0;
    for (int64_t r = -1; r < reps; r++) { /* r = -1: warm-up */
        double tp = 0, tm = 0;
        medusa_stats sr = {0};
        for (int p = 0; p < n_prompts; p++) {
            const int32_t *pi = ids + p * MAX_PROMPT;
            const double a = run_plain(&e, pi, n_ids[p], plain, r == -1 ? gap : NULL);
            const double b = run_medusa(&e, pi, n_ids[p], spec_out, &sr);
            if (a < 0 || b < 0) {
                fprintf(stderr, "gorgon-bench medusa: prompt %d: %s failed: %s\n", p,
                        a < 0 ? "plain decode" : "medusa decode", eng_error());
                goto out;
            }
            tp += a, tm += b;
            for (int64_t i = 0; i < n_tokens && r == -1; i++)
                if (plain[i] != spec_out[i]) {
                    if (first_bad_prompt < 0)
                        first_bad_prompt = p, first_bad_pos = i, first_bad_gap = gap[i];
                    mismatches++;
                    break;
                }
        }
        if (r == -1) {
            st = sr; /* acceptance is deterministic: any repetition's counts */
            continue;
        }
        t_plain = tp < t_plain ? tp : t_plain;
        if (tm < t_med) {
            t_med = tm;
            split = sr; /* the phases of the fastest repetition */
        }
    }

    const int64_t total = n_prompts * n_tokens;
    /* plain timing covers n_tokens - 1 forwards per prompt (the first token
     * comes from the prefill): one token per forward */
    const double plain_tok_s = (double)(total - n_prompts) / t_plain;
    const double med_tok_s = (double)st.tokens / t_med; /* includes the last step's overshoot */
    const double tps = (double)st.tokens / (double)st.steps;
    const double step_cost = (t_med / (double)st.steps) * plain_tok_s;
    const double speedup = med_tok_s / plain_tok_s;
    /* the step cost split into its phases, each over one plain step */
    const double per_step = plain_tok_s / (double)(split.steps ? split.steps : 1);
    const double c_heads = split.t_heads * per_step, c_fwd = split.t_fwd * per_step,
                 c_acc = split.t_acc * per_step;
    const char *variant =
        kn_ctx_host_memory(kn) ? kn_variant_name(kn_ctx_variant(kn)) : kn_ctx_ops(kn)->name;
    static const char *const PROJ[] = {"heads", "heads_quantized", "shared_base_output"};
    const char *proj = PROJ[eng_medusa_projection(e.md)];
    if (json) {
        printf("{\"suite\":\"medusa\",\"model\":\"");
        bench_json_puts(path);
        printf("\",\"medusa\":\"");
        bench_json_puts(frozen_heads ? "random-frozen" : random_heads ? "random" : dir);
        printf("\",\"device\":\"");
        bench_json_puts(kn_ctx_device(kn));
        printf("\",\"tree_nodes\":%d,\"tree_heads\":%d,\"tree_from\":\"%s\",\"threads\":%" PRId64
               ",\"kernels\":\"%s\",\"prompts\":%" PRId64 ",\"tokens\":%" PRId64
               ",\"outputs_identical\":%s,\"projection\":\"%s\",\"step_cost_ratio\":%.4f",
               tree->n_nodes, tree->n_heads, tree_from, threads, variant, n_prompts, n_tokens,
               mismatches ? "false" : "true", proj, step_cost);
        printf(",\"step_cost_split\":{\"heads\":%.4f,\"forward\":%.4f,\"accept\":%.4f}", c_heads,
               c_fwd, c_acc);
        if (!cost_only) {
            printf(",\"tokens_per_step\":%.4f,\"per_head_acceptance\":[", tps);
            for (int d = 1; d <= tree->max_depth; d++)
                printf("%s%.4f", d > 1 ? "," : "", (double)st.at_depth[d] / (double)st.steps);
            printf("],\"plain_tok_s\":%.2f,\"medusa_tok_s\":%.2f,\"speedup\":%.4f,"
                   "\"projected_speedup\":%.4f",
                   plain_tok_s, med_tok_s, speedup, tps / step_cost);
        }
        printf("}\n");
    } else {
        printf("medusa: %s, heads %s, %d-node tree (%d heads, %s), %" PRId64 " prompt(s) x %" PRId64
               " tokens, %" PRId64 " thread(s), %s kernels on %s\n",
               path, frozen_heads ? "random-frozen" : random_heads ? "random" : dir, tree->n_nodes, tree->n_heads, tree_from,
               n_prompts, n_tokens, threads, variant, kn_ctx_device(kn));
        printf("  outputs identical to plain greedy: %s; heads' projection: %s\n",
               mismatches ? "NO" : "yes", proj);
        printf("  step cost ratio (medusa step / plain step): %.3f = heads %.3f + tree forward "
               "%.3f + acceptance %.3f\n",
               step_cost, c_heads, c_fwd, c_acc);
        if (!cost_only) {
            printf("  tokens/step %.3f; steps accepting >= d candidates:", tps);
            for (int d = 1; d <= tree->max_depth; d++)
                printf(" d%d %.1f%%", d, 100.0 * (double)st.at_depth[d] / (double)st.steps);
            printf("\n  plain %.1f tok/s, medusa %.1f tok/s: speedup %.3fx (projected %.3fx)\n",
                   plain_tok_s, med_tok_s, speedup, tps / step_cost);
        }
    }
    if (mismatches) {
        /* A tree forward computes the root's logits in a batch of n rows;
         * rounding that differs from the one-row forward can flip a near
         * tie (random weights make near ties common), hence the gap. */
        fprintf(stderr, "gorgon-bench medusa: %" PRId64 " prompt(s) decoded differently with "
                        "Medusa (first: prompt %" PRId64 ", token %" PRId64
                        ", where plain's top-2 logit gap was %.3g)%s\n",
                mismatches, first_bad_prompt, first_bad_pos, (double)first_bad_gap,
                cost_only ? "; ignored with --step-cost-only" : "");
        if (!cost_only)
            goto out;
    }
    status = 0;
out:
    free(ids), free(plain), free(spec_out), free(gap);
    free(e.row);
    if (kn) {
        kn_buf_free(kn, e.logits);
        kn_buf_free(kn, e.hidden);
    }
    eng_medusa_destroy(e.md);
    eng_kv_destroy(e.kv);
    eng_ctx_destroy(e.c);
    eng_medusa_heads_close(mh);
    eng_medusa_tree_destroy(tree);
    eng_model_close(m); /* before its device's ctx */
    kn_ctx_destroy(kn);
    if (rnd_dir[0])
        remove_random_heads(rnd_dir);
    return status;
}
