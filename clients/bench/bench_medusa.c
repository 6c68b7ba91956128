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
 * burst of load from other processes hits both alike. */
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

static void usage(FILE *f)
{
    fprintf(f,
            "usage: gorgon-bench medusa --model BASE.gguf --medusa DIR|random [--tree SPEC]\n"
            "         [--prompts N (4)] [--tokens N (128)] [--threads N (1)] [--reps R (3)]\n"
            "         [--step-cost-only] [--json]\n"
            "  --medusa DIR   heads (medusa_lm_head.safetensors); \"random\": random heads;\n"
            "                 \"random-frozen\": random ResBlocks, projection = the base output\n"
            "                 matrix (the layout of gorgon-medusa-train --freeze-lm)\n"
            "  --tree SPEC    built-in name or list (default: DIR/medusa_choices.json, else\n"
            "                 the 16 most likely paths of mc_sim_7b_63)\n"
            "  --step-cost-only  report only the cost of a Medusa step over a plain one\n");
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
    eng_ctx *c;
    eng_kv *kv;
    eng_medusa *md;
    float *logits, *hidden;
    int64_t V, n_tokens;
} run_env;

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
    if (eng_forward(e->c, e->kv, &in, 1, e->logits, NULL) >= 0) {
        const uint64_t t0 = cm_now_ns();
        int64_t i = 0;
        out[0] = eng_argmax(e->logits, e->V);
        if (gap)
            gap[0] = top2_gap(e->logits, e->V);
        for (i = 1; i < e->n_tokens; i++) {
            in = (eng_seq_in){.seq = seq, .tokens = &out[i - 1], .n_tokens = 1};
            if (eng_forward(e->c, e->kv, &in, 1, e->logits, NULL) < 0)
                break;
            out[i] = eng_argmax(e->logits, e->V);
            if (gap)
                gap[i] = top2_gap(e->logits, e->V);
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

int bench_medusa_main(int argc, char **argv)
{
    const char *path = NULL, *dir = NULL, *spec = NULL;
    int64_t threads = 1, n_prompts = 4, n_tokens = 128, reps = 3;
    bool json = false, cost_only = false;
    enum { O_TREE = 256, O_PROMPTS, O_TOKENS, O_REPS, O_COST };
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},   {"medusa", required_argument, 0, 'd'},
        {"tree", required_argument, 0, O_TREE}, {"prompts", required_argument, 0, O_PROMPTS},
        {"tokens", required_argument, 0, O_TOKENS}, {"threads", required_argument, 0, 't'},
        {"reps", required_argument, 0, O_REPS}, {"step-cost-only", no_argument, 0, O_COST},
        {"json", no_argument, 0, 'j'},          {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    optind = 1;
    int o;
    while ((o = getopt_long(argc, argv, "m:d:t:jh", opts, NULL)) != -1) {
        int rc = 0;
        switch (o) {
        case 'm': path = optarg; break;
        case 'd': dir = optarg; break;
        case O_TREE: spec = optarg; break;
        case O_PROMPTS: rc = bench_parse_i64("medusa", "--prompts", optarg, 1, N_PROMPTS, &n_prompts); break;
        case O_TOKENS: rc = bench_parse_i64("medusa", "--tokens", optarg, 2, 1 << 20, &n_tokens); break;
        case 't': rc = bench_parse_i64("medusa", "--threads", optarg, 1, 1024, &threads); break;
        case O_REPS: rc = bench_parse_i64("medusa", "--reps", optarg, 1, 1000, &reps); break;
        case O_COST: cost_only = true; break;
        case 'j': json = true; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
        if (rc < 0)
            return 2;
    }
    if (!path || !dir || optind < argc) {
        usage(stderr);
        return 2;
    }

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
    if ((rc = kn_ctx_create(&kn, &(kn_ctx_cfg){.n_threads = (int)threads})) < 0) {
        fprintf(stderr, "gorgon-bench medusa: kernels: %s\n", cm_strerror(rc));
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
    e.V = hp->n_vocab;
    e.n_tokens = n_tokens;
    e.logits = malloc((size_t)(hp->n_vocab * (max_ids > nn ? max_ids : nn)) * sizeof(float));
    e.hidden = malloc((size_t)(hp->dim * (max_ids > nn ? max_ids : nn)) * sizeof(float));
    if (!e.logits || !e.hidden ||
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
    const char *variant = kn_variant_name(kn_ctx_variant(kn));
    static const char *const PROJ[] = {"heads", "heads_quantized", "shared_base_output"};
    const char *proj = PROJ[eng_medusa_projection(e.md)];
    if (json) {
        printf("{\"suite\":\"medusa\",\"model\":\"");
        bench_json_puts(path);
        printf("\",\"medusa\":\"");
        bench_json_puts(frozen_heads ? "random-frozen" : random_heads ? "random" : dir);
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
               " tokens, %" PRId64 " thread(s), %s kernels\n",
               path, frozen_heads ? "random-frozen" : random_heads ? "random" : dir, tree->n_nodes, tree->n_heads, tree_from,
               n_prompts, n_tokens, threads, variant);
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
    free(e.logits), free(e.hidden);
    eng_medusa_destroy(e.md);
    eng_kv_destroy(e.kv);
    eng_ctx_destroy(e.c);
    eng_medusa_heads_close(mh);
    eng_medusa_tree_destroy(tree);
    kn_ctx_destroy(kn);
    eng_model_close(m);
    if (rnd_dir[0])
        remove_random_heads(rnd_dir);
    return status;
}
