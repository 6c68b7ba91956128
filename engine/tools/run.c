/* gorgon-run — generate text from a GGUF model in-process (no gorgond), the
 * way llama2.c's `run` does: the prompt is echoed, text streams to stdout as
 * it is generated, timing goes to stderr. -n counts new tokens, as
 * everywhere in gorgon; --steps keeps llama2.c's count of positions
 * including BOS and the prompt. A prompt that does not fit the context is
 * refused, as gorgond refuses it. With --medusa DIR it decodes with Medusa heads (engine/medusa/medusa.h):
 * at --temp 0 the text is identical to plain greedy decoding, only the
 * number of forwards changes; tokens/step and acceptance go to stderr.
 * With --device cuda[:N] the weights are uploaded to that GPU and every op
 * runs there (docs/gpu.md); a device this build or machine cannot use is
 * refused with the reason before the model is read. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/common.h"
#include "engine/engine.h"
#include "engine/medusa/medusa.h"
#include "engine/medusa/medusa_fit.h"
#include "engine/tp.h"

/* Under --tp every rank runs the same generation; only rank 0 writes. */
static _Thread_local bool t_quiet;
static _Thread_local int t_rank = -1; /* -1: no group */
static atomic_bool g_reported;        /* a rank printed its error */

static void __attribute__((format(printf, 1, 2))) run_err(const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (t_rank >= 0)
        fprintf(stderr, "gorgon-run: rank %d: %s\n", t_rank, msg);
    else
        fprintf(stderr, "gorgon-run: %s\n", msg);
    atomic_store(&g_reported, true);
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: gorgon-run --model FILE [-p PROMPT] [-n N | --steps S] [--temp T] [--top-p P]\n"
            "                  [--top-k K] [--min-p M] [--repeat-penalty R] [--repeat-last-n N]\n"
            "                  [--seed S] [--rng xoshiro|llama2c] [--stop STR]... [--threads N]\n"
            "                  [--tokens] [--tp N] [--device cpu|cuda|cuda:N]\n"
            "                  [--medusa DIR [--medusa-tree NAME|LIST]\n"
            "                  [--medusa-typical [--eps E] [--alpha A]]]\n"
            "  -n, --new-tokens N  tokens to generate after the prompt (default 256, fewer\n"
            "                      if the context ends first); the prompt plus N must fit\n"
            "                      the model's context\n"
            "  --steps S  llama2.c's count instead: S positions including BOS and the\n"
            "             prompt (at most the context; a shorter S cuts the prompt)\n"
            "  --threads N  kernel threads (default 0: the CPUs this process may use;\n"
            "               with --tp, per rank, and 0 means 1)\n"
            "  --tp N     tensor parallelism: N ranks (threads of this process, joined by\n"
            "             shared memory), each holding 1/N of the weights (default 1;\n"
            "             CPU only)\n"
            "  --allow-tf32  on a GPU, let F32 weights' GEMMs round to TF32 (faster, ~1e-3)\n"
            "  --device D  where the model runs: cpu (default), cuda (device 0) or cuda:N;\n"
            "              on a GPU the weights are uploaded to it and --threads is unused\n"
            "  --temp 0   greedy (default 1.0); --top-p default 0.9 as llama2.c\n"
            "  --tokens   print token ids (one per line) instead of text\n"
            "  --medusa DIR        Medusa heads (medusa_lm_head.safetensors + config.json);\n"
            "                      --temp 0: greedy acceptance (same text as without heads),\n"
            "                      --temp T > 0: typical acceptance (implied)\n"
            "  --medusa-tree SPEC  a built-in tree (mc_sim_7b_63, chain1..chain8) or a list\n"
            "                      such as \"[[0],[0,0],[1]]\" (default: DIR/medusa_choices.json\n"
            "                      as fitted by gorgon-medusa-train, else the 16 most likely\n"
            "                      paths of mc_sim_7b_63, sized for CPUs)\n"
            "  --eps E, --alpha A  typical acceptance: p > min(E, A*exp(-H)) (0.09, 0.3)\n");
}

static int on_text(void *arg, int32_t token, const char *s, size_t n)
{
    (void)arg;
    (void)token;
    if (n && !t_quiet)
        fwrite(s, 1, n, stdout);
    fflush(stdout);
    return 0;
}

static int on_id(void *arg, int32_t token, const char *s, size_t n)
{
    (void)arg;
    (void)s;
    (void)n;
    if (token >= 0 && !t_quiet)
        printf("%" PRId32 "\n", token);
    return 0;
}

/* An engine call failed: its message, and the device's too when that says
 * more (a CUDA error names the kernel and the CUDA error). */
static void run_fail(kn_ctx *kn, const char *what, int rc)
{
    const char *ee = eng_error(), *ke = kn ? kn_ctx_error(kn) : "";
    const char *msg = ee[0] ? ee : ke[0] ? ke : cm_strerror(rc);
    const bool both = ee[0] && ke[0] && !strstr(ee, ke);
    run_err("%s%s%s%s%s", what, what[0] ? ": " : "", msg, both ? "; device: " : "",
            both ? ke : "");
}

/* What ran the ops, for the timing line: "2 thread(s), avx512 kernels" or
 * "device cuda:0 (NVIDIA H200)". */
static const char *ran_on(kn_ctx *kn, char *buf, size_t cap)
{
    if (kn_ctx_host_memory(kn))
        snprintf(buf, cap, "%d thread(s), %s kernels", kn_ctx_threads(kn),
                 kn_variant_name(kn_ctx_variant(kn)));
    else
        snprintf(buf, cap, "device %s", kn_ctx_device(kn));
    return buf;
}

/* ---- Medusa generation (eng_generate's output rules, Medusa steps) ------ */

typedef struct medusa_opts {
    const char *dir, *tree;
    bool typical;
    double eps, alpha, temp;
    uint64_t seed;
} medusa_opts;

typedef struct medusa_out {
    const eng_tok *tok;
    eng_tok_stream ts;
    eng_stop stop;
    char *piece, *text;
    size_t piece_cap, text_cap;
    int32_t ends[2];
    int n_ends;
    int (*emit)(void *arg, int32_t token, const char *s, size_t n);
} medusa_out;

/* Feed one generated token; returns the finish reason (NONE to go on) or
 * -errno. */
static int medusa_feed(medusa_out *o, int32_t t)
{
    bool is_end = false;
    for (int i = 0; i < o->n_ends; i++)
        is_end |= t == o->ends[i];
    int64_t plen = is_end ? 0 : eng_tok_stream_push(o->tok, &o->ts, t, o->piece, o->piece_cap);
    if (plen < 0)
        plen = 0;
    size_t tlen = 0;
    int fin = eng_stop_feed(&o->stop, t, o->piece, (size_t)plen, o->text, o->text_cap, &tlen);
    if (fin < 0)
        return fin;
    if (!is_end)
        o->emit(NULL, t, o->text, tlen);
    return fin;
}

/* Prefill the prompt (steps > n_ids), then Medusa steps until a finish. */
static int run_medusa(kn_ctx *kn, comm *cm, const eng_model *m, const int32_t *ids, int64_t n_ids,
                      int64_t steps, const char *const *stops, int n_stop, bool print_ids,
                      const medusa_opts *mo)
{
    const eng_hparams *hp = eng_model_hparams(m);
    const eng_tok *tok = eng_model_tokenizer(m);
    eng_medusa_heads *mh = NULL;
    eng_medusa_tree *tree = NULL;
    eng_medusa *md = NULL;
    eng_ctx *c = NULL;
    eng_kv *kv = NULL;
    float *logits = NULL, *hidden = NULL;
    medusa_out o = {.tok = tok, .emit = print_ids ? on_id : on_text};
    int rc;
    /* Default tree: the one gorgon-medusa-train fitted to these heads. */
    if ((rc = eng_medusa_tree_choose(&tree, mo->tree, mo->dir, NULL)) < 0) {
        run_err("%s", eng_error());
        goto out;
    }
    if ((rc = eng_medusa_heads_open(&mh, mo->dir, hp->dim, hp->n_vocab)) < 0 ||
        (rc = eng_medusa_create(&md, &(eng_medusa_cfg){
                                         .model = m,
                                         .kn = kn,
                                         .heads = mh,
                                         .tree = tree,
                                         .max_seqs = 1,
                                         .accept = mo->typical ? ENG_MEDUSA_TYPICAL
                                                               : ENG_MEDUSA_GREEDY,
                                         .temperature = (float)mo->temp,
                                         .eps = (float)mo->eps,
                                         .alpha = (float)mo->alpha,
                                         .comm = eng_model_tp(m, NULL) > 1 ? cm : NULL})) < 0) {
        run_err("%s: %s", mo->dir, eng_error()[0] ? eng_error() : cm_strerror(rc));
        goto out;
    }
    /* A whole tree may be written past the last position kept. */
    const int64_t nn = tree->n_nodes, max_len = steps + nn + 1;
    const int64_t batch = n_ids > nn ? n_ids : nn;
    eng_kv_cfg kc;
    eng_model_kv_cfg(m, 16, (max_len + 15) / 16, 1, max_len, &kc);
    if ((rc = eng_ctx_create(&c, m, &(eng_ctx_cfg){.kn = kn, .max_tokens = batch,
                                                    .max_ctx = max_len, .comm = cm})) < 0 ||
        (rc = eng_kv_create(&kv, kn, &kc)) < 0) {
        run_fail(kn, "setup", rc);
        goto out;
    }
    if (eng_tok_bos(tok) >= 0)
        o.ends[o.n_ends++] = eng_tok_bos(tok);
    if (eng_tok_eos(tok) >= 0)
        o.ends[o.n_ends++] = eng_tok_eos(tok);
    if ((rc = eng_stop_init(&o.stop, &(eng_stop_cfg){.eos = o.ends, .n_eos = o.n_ends,
                                                     .stop = stops, .n_stop = n_stop,
                                                     .max_tokens = steps - n_ids + 1})) < 0) {
        run_err("%s", eng_error());
        goto out;
    }
    o.piece_cap = 3 * eng_tok_max_piece_bytes(tok) + ENG_TOK_STREAM_SLACK;
    o.text_cap = o.piece_cap + ENG_STOP_MAX_LEN;
    o.piece = malloc(o.piece_cap);
    o.text = malloc(o.text_cap);
    /* the prompt's outputs stay on the backend: the decoder copies them */
    if (kn_buf_alloc(kn, (size_t)hp->n_vocab * sizeof(float), (void **)&logits) < 0 ||
        kn_buf_alloc(kn, (size_t)hp->dim * sizeof(float), (void **)&hidden) < 0 || !o.piece ||
        !o.text) {
        rc = -ENOMEM;
        run_err("out of memory");
        goto out;
    }
    eng_tok_stream_init(&o.ts, ids[0]);

    int seq = eng_kv_seq_alloc(kv);
    uint64_t t0 = cm_now_ns();
    eng_seq_in in = {.seq = seq, .tokens = ids, .n_tokens = n_ids};
    int64_t n = eng_forward(c, kv, &in, 1, logits, hidden);
    if (n < 0 || (rc = eng_medusa_seq_begin(md, seq, logits, hidden, mo->seed)) < 0) {
        rc = n < 0 ? (int)n : rc;
        run_fail(kn, "prompt", rc);
        goto out;
    }
    const uint64_t pre_ns = cm_now_ns() - t0;
    for (int64_t i = 1; i < n_ids; i++) { /* the prompt is echoed verbatim */
        int64_t pl = eng_tok_stream_push(tok, &o.ts, ids[i], o.piece, o.piece_cap);
        o.emit(NULL, ids[i], o.piece, pl > 0 ? (size_t)pl : 0);
    }

    t0 = cm_now_ns();
    int64_t n_steps = 0, n_tok = 0, n_used = 0;
    int64_t at_depth[ENG_MEDUSA_MAX_DEPTH + 1] = {0}; /* steps accepting >= d */
    int fin = ENG_FINISH_NONE;
    while (fin == ENG_FINISH_NONE) {
        eng_medusa_result r;
        int64_t got = eng_medusa_step(md, c, kv, &seq, 1, &r);
        if (got < 0) {
            rc = (int)got;
            run_fail(kn, "medusa step", rc);
            goto out;
        }
        n_steps++;
        n_tok += r.n_tokens;
        for (int d = 1; d <= r.n_accepted; d++)
            at_depth[d]++;
        for (int i = 0; i < r.n_tokens && fin == ENG_FINISH_NONE; i++) {
            fin = medusa_feed(&o, r.tokens[i]);
            n_used++;
        }
        if (fin < 0) {
            rc = fin;
            run_err("%s", eng_error());
            goto out;
        }
    }
    const uint64_t dec_ns = cm_now_ns() - t0;
    int64_t f = eng_tok_stream_flush(tok, &o.ts, o.piece, o.piece_cap);
    if (f > 0)
        o.emit(NULL, -1, o.piece, (size_t)f);
    if (!print_ids && !t_quiet)
        printf("\n");
    fflush(stdout);
    rc = 0;
    if (t_quiet)
        goto out;

    double pre_s = (double)pre_ns * 1e-9, dec_s = (double)dec_ns * 1e-9;
    char where[160];
    fprintf(stderr,
            "prompt %" PRId64 " tok in %.3f ms (%.1f tok/s); generated %" PRId64
            " tok in %.3f ms (%.1f tok/s); finish %s; %s\n",
            n_ids, pre_s * 1e3, pre_s > 0 ? (double)n_ids / pre_s : 0.0, n_used, dec_s * 1e3,
            dec_s > 0 ? (double)n_used / dec_s : 0.0, eng_finish_name((enum eng_finish)fin),
            ran_on(kn, where, sizeof where));
    fprintf(stderr,
            "medusa: %s acceptance, %d heads, %d-node tree: %" PRId64 " steps, %" PRId64
            " tokens, %.3f tokens/step; steps accepting >= d candidates:",
            mo->typical ? "typical" : "greedy", tree->n_heads, tree->n_nodes, n_steps, n_tok,
            n_steps ? (double)n_tok / (double)n_steps : 0.0);
    for (int d = 1; d <= tree->max_depth; d++)
        fprintf(stderr, " d%d %.1f%%", d,
                n_steps ? 100.0 * (double)at_depth[d] / (double)n_steps : 0.0);
    fprintf(stderr, "\n");
    rc = 0;
out:
    kn_buf_free(kn, logits);
    kn_buf_free(kn, hidden);
    free(o.piece);
    free(o.text);
    eng_kv_destroy(kv);
    eng_ctx_destroy(c);
    eng_medusa_destroy(md);
    eng_medusa_tree_destroy(tree);
    eng_medusa_heads_close(mh);
    return rc;
}

/* ---- one rank (the whole run when --tp is 1) ----------------------------- */

typedef struct run_job {
    const char *model_path;
    const char *device; /* kn_ctx_cfg.device: "cpu", "cuda", "cuda:N" */
    bool on_device;     /* a CUDA device (then tp is 1) */
    int tp, threads;
    eng_model *m0; /* rank 0's model (the whole one at --tp 1), opened by main */
    const int32_t *ids;
    int64_t n_ids, steps;
    float temp, top_p, min_p, rep;
    int top_k, last_n;
    uint64_t seed; /* one seed for every rank: the ranks must draw alike */
    enum eng_rng rng;
    const char *const *stops;
    int n_stop;
    bool print_ids;
    medusa_opts mo;
} run_job;

/* Every rank runs the same generation over its shard (the gathered logits
 * are the same bits everywhere, so every rank picks the same tokens); only
 * rank 0 writes the text and the timings. */
static int run_rank(int rank, comm *cm, void *arg)
{
    run_job *j = arg; /* (m0 is written on a device only, where tp is 1) */
    t_rank = j->tp > 1 ? rank : -1;
    t_quiet = rank != 0;
    kn_ctx *kn = NULL;
    eng_model *m = rank == 0 ? j->m0 : NULL;
    eng_ctx *c = NULL;
    eng_kv *kv = NULL;
    eng_sampler *smp = NULL;
    int rc = 0;
    if (!m && (rc = eng_model_open_tp(&m, j->model_path, rank, j->tp)) < 0) {
        run_err("%s: %s", j->model_path, eng_error()[0] ? eng_error() : cm_strerror(rc));
        goto out;
    }
    const eng_hparams *hp = eng_model_hparams(m);
    if ((rc = kn_ctx_create(&kn, &(kn_ctx_cfg){.n_threads = j->threads,
                                               .device = j->device})) < 0) {
        if (j->on_device) /* (main checked it: the kernels' message above says why) */
            run_err("cannot use device %s: %s", j->device, cm_strerror(rc));
        else
            run_err("kernels: %s", cm_strerror(rc));
        goto out;
    }
    if ((rc = eng_model_to_device(m, kn)) < 0) {
        run_err("%s: %s", j->model_path, eng_error());
        goto out;
    }
    int64_t max_len = j->steps + 1;
    int64_t batch = j->n_ids < j->steps ? j->n_ids : j->steps;
    eng_kv_cfg kc;
    eng_model_kv_cfg(m, 16, (max_len + 15) / 16, 1, max_len, &kc);
    if ((rc = eng_ctx_create(&c, m, &(eng_ctx_cfg){.kn = kn, .max_tokens = batch,
                                                    .max_ctx = max_len, .comm = cm})) < 0 ||
        (rc = eng_kv_create(&kv, kn, &kc)) < 0) {
        run_fail(kn, "setup", rc);
        goto out;
    }
    if (j->temp > 0) {
        eng_sampler_cfg sc = {.temperature = j->temp,
                              .top_k = j->top_k,
                              .top_p = j->top_p,
                              .min_p = j->min_p,
                              .repeat_penalty = j->rep,
                              .repeat_last_n = j->last_n,
                              .seed = j->seed,
                              .rng = j->rng};
        if ((rc = eng_sampler_create(&smp, &sc, hp->n_vocab)) < 0) {
            run_err("sampler: %s", eng_error());
            goto out;
        }
    } else if (j->rep > 0 && j->rep != 1.0) {
        /* greedy with a penalty: the sampler applies it, then takes argmax */
        eng_sampler_cfg sc = {.temperature = 0, .repeat_penalty = j->rep,
                              .repeat_last_n = j->last_n};
        if ((rc = eng_sampler_create(&smp, &sc, hp->n_vocab)) < 0) {
            run_err("sampler: %s", eng_error());
            goto out;
        }
    }
    /* every rank loaded: the timings below are of generation only */
    if (cm && (rc = comm_barrier(cm)) < 0) {
        run_err("waiting for the other ranks: %s", comm_last_error(cm));
        goto out;
    }
    if (j->mo.dir && j->n_ids < j->steps) {
        rc = run_medusa(kn, cm, m, j->ids, j->n_ids, j->steps, j->stops, j->n_stop, j->print_ids,
                        &j->mo);
        goto out;
    }
    int seq = eng_kv_seq_alloc(kv);
    eng_gen_result r;
    rc = eng_generate(c, kv, seq,
                      &(eng_gen_cfg){.prompt = j->ids,
                                     .n_prompt = j->n_ids,
                                     .steps = j->steps,
                                     .sampler = smp,
                                     .stop = j->stops,
                                     .n_stop = j->n_stop,
                                     .on_token = j->print_ids ? on_id : on_text},
                      &r);
    if (!j->print_ids && !t_quiet)
        printf("\n");
    fflush(stdout);
    if (rc < 0) {
        run_fail(kn, "", rc);
        goto out;
    }
    rc = 0;
    if (t_quiet)
        goto out;
    double pre_s = (double)r.prefill_ns * 1e-9, dec_s = (double)r.decode_ns * 1e-9;
    char where[160];
    fprintf(stderr,
            "prompt %" PRId64 " tok in %.3f ms (%.1f tok/s); generated %" PRId64
            " tok in %.3f ms (%.1f tok/s); finish %s; %s\n",
            r.n_prompt, pre_s * 1e3, pre_s > 0 ? (double)r.n_prompt / pre_s : 0.0,
            r.n_generated, dec_s * 1e3, dec_s > 0 ? (double)r.n_generated / dec_s : 0.0,
            eng_finish_name(r.finish), ran_on(kn, where, sizeof where));
    if (j->tp > 1)
        fprintf(stderr, "tp %d: %d rank(s) x %d thread(s); rank 0 holds %.1f MiB of weights\n",
                j->tp, j->tp, kn_ctx_threads(kn),
                (double)eng_model_shard_weight_bytes(m) / (1 << 20));
out:
    eng_sampler_destroy(smp);
    eng_kv_destroy(kv);
    eng_ctx_destroy(c);
    if (j->on_device && m) {
        /* main's model, its weights in kn's memory: freed before kn goes */
        eng_model_close(m);
        j->m0 = m = NULL;
    }
    kn_ctx_destroy(kn);
    if (m != j->m0)
        eng_model_close(m);
    return rc < 0 ? rc : 0;
}

static int parse_num(const char *opt, const char *s, double lo, double hi, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi)) {
        fprintf(stderr, "gorgon-run: %s: bad value \"%s\" (expected %g..%g)\n", opt, s, lo, hi);
        return -EINVAL;
    }
    *out = v;
    return 0;
}

int main(int argc, char **argv)
{
    if (cm_version_requested(argc, argv, "gorgon-run"))
        return 0;
    const char *model_path = NULL, *prompt = "", *device = "cpu";
    double n_new = 256, steps = 0, threads = 0, top_k = 0, last_n = 64, seed = 0, tp = 1;
    bool n_new_set = false, steps_set = false;
    double temp = 1.0, top_p = 0.9, min_p = 0.0, rep = 1.0;
    bool print_ids = false, seed_set = false;
    enum eng_rng rng = ENG_RNG_XOSHIRO;
    const char *stops[ENG_STOP_MAX_STRINGS];
    int n_stop = 0;
    medusa_opts mo = {0};
    bool eps_set = false, alpha_set = false, top_p_set = false;
    enum { O_TEMP = 256, O_TOPP, O_TOPK, O_MINP, O_REP, O_LASTN, O_SEED, O_RNG, O_STOP,
           O_THREADS, O_TOKENS, O_MEDUSA, O_MTREE, O_MTYP, O_EPS, O_ALPHA, O_STEPS, O_TP,
           O_DEVICE, O_TF32 };
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},    {"prompt", required_argument, 0, 'p'},
        {"new-tokens", required_argument, 0, 'n'}, {"steps", required_argument, 0, O_STEPS},
        {"temp", required_argument, 0, O_TEMP},
        {"top-p", required_argument, 0, O_TOPP}, {"top-k", required_argument, 0, O_TOPK},
        {"min-p", required_argument, 0, O_MINP}, {"repeat-penalty", required_argument, 0, O_REP},
        {"repeat-last-n", required_argument, 0, O_LASTN},
        {"seed", required_argument, 0, O_SEED},  {"rng", required_argument, 0, O_RNG},
        {"stop", required_argument, 0, O_STOP},  {"threads", required_argument, 0, O_THREADS},
        {"tokens", no_argument, 0, O_TOKENS},    {"help", no_argument, 0, 'h'},
        {"tp", required_argument, 0, O_TP},      {"device", required_argument, 0, O_DEVICE},
        {"allow-tf32", no_argument, 0, O_TF32},
        {"medusa", required_argument, 0, O_MEDUSA},
        {"medusa-tree", required_argument, 0, O_MTREE},
        {"medusa-typical", no_argument, 0, O_MTYP},
        {"eps", required_argument, 0, O_EPS},    {"alpha", required_argument, 0, O_ALPHA},
        {0, 0, 0, 0},
    };
    int o, rc = 0;
    while ((o = getopt_long(argc, argv, "m:p:n:t:h", opts, NULL)) != -1) {
        switch (o) {
        case 'm': model_path = optarg; break;
        case 'p': prompt = optarg; break;
        case 'n':
            rc = parse_num("-n", optarg, 1, 1 << 30, &n_new);
            n_new_set = true;
            break;
        case O_STEPS:
            rc = parse_num("--steps", optarg, 1, 1 << 30, &steps);
            steps_set = true;
            break;
        case 't':
        case O_TEMP: rc = parse_num("--temp", optarg, 0, 100, &temp); break;
        case O_TOPP:
            rc = parse_num("--top-p", optarg, 0, 1, &top_p);
            top_p_set = true;
            break;
        case O_TOPK: rc = parse_num("--top-k", optarg, 0, 1 << 30, &top_k); break;
        case O_MINP: rc = parse_num("--min-p", optarg, 0, 1, &min_p); break;
        case O_REP: rc = parse_num("--repeat-penalty", optarg, 0, 100, &rep); break;
        case O_LASTN: rc = parse_num("--repeat-last-n", optarg, 1, 1 << 20, &last_n); break;
        case O_SEED:
            rc = parse_num("--seed", optarg, 0, 18446744073709549568.0, &seed);
            seed_set = true;
            break;
        case O_RNG:
            if (!strcmp(optarg, "llama2c"))
                rng = ENG_RNG_LLAMA2C;
            else if (!strcmp(optarg, "xoshiro"))
                rng = ENG_RNG_XOSHIRO;
            else {
                fprintf(stderr, "gorgon-run: --rng: \"%s\" is not xoshiro or llama2c\n", optarg);
                rc = -EINVAL;
            }
            break;
        case O_STOP:
            if (n_stop == ENG_STOP_MAX_STRINGS) {
                fprintf(stderr, "gorgon-run: at most %d --stop strings\n", ENG_STOP_MAX_STRINGS);
                rc = -EINVAL;
            } else {
                stops[n_stop++] = optarg;
            }
            break;
        case O_THREADS: rc = parse_num("--threads", optarg, 0, 256, &threads); break;
        case O_TP: rc = parse_num("--tp", optarg, 1, COMM_SHM_MAX_RANKS, &tp); break;
        case O_DEVICE: device = optarg; break;
        case O_TF32: setenv("GORGON_ALLOW_TF32", "1", 1); break; /* read by the CUDA matmul */
        case O_TOKENS: print_ids = true; break;
        case O_MEDUSA: mo.dir = optarg; break;
        case O_MTREE: mo.tree = optarg; break;
        case O_MTYP: mo.typical = true; break;
        case O_EPS:
            rc = parse_num("--eps", optarg, 1e-9, 1, &mo.eps);
            eps_set = true;
            break;
        case O_ALPHA:
            rc = parse_num("--alpha", optarg, 1e-9, 1, &mo.alpha);
            alpha_set = true;
            break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
        if (rc < 0)
            return 2;
    }
    if (!model_path || optind < argc) {
        usage(stderr);
        return 2;
    }
    int cuda = -1;
    if (kn_device_parse(device, &cuda) < 0) {
        fprintf(stderr, "gorgon-run: --device: '%s' is not cpu, cuda or cuda:N\n", device);
        return 2;
    }
    if (cuda >= 0 && tp > 1) {
        fprintf(stderr, "gorgon-run: --tp %d with --device %s: tensor parallelism on a device "
                        "needs NCCL groups, which gorgon-run does not have yet (use --tp 1)\n",
                (int)tp, device);
        return 2;
    }
    if (n_new_set && steps_set) {
        fprintf(stderr, "gorgon-run: give -n (new tokens) or --steps (positions), not both\n");
        return 2;
    }
    if (!mo.dir && (mo.tree || mo.typical || eps_set || alpha_set)) {
        fprintf(stderr, "gorgon-run: --medusa-tree, --medusa-typical, --eps and --alpha need "
                        "--medusa DIR\n");
        return 2;
    }
    if (mo.dir) {
        /* Greedy acceptance is exact only for argmax decoding; any sampling
         * goes through typical acceptance, which has its own truncation. */
        if (mo.typical && temp <= 0) {
            fprintf(stderr, "gorgon-run: --medusa-typical samples: give --temp > 0 "
                            "(--temp 0 uses greedy acceptance)\n");
            return 2;
        }
        if (top_k > 0 || min_p > 0 || (rep > 0 && rep != 1.0) || rng != ENG_RNG_XOSHIRO ||
            (temp > 0 && top_p_set)) {
            fprintf(stderr, "gorgon-run: with --medusa, sampling is greedy (--temp 0) or "
                            "typical (--temp T); --top-p/--top-k/--min-p/--repeat-penalty/"
                            "--rng do not apply\n");
            return 2;
        }
        mo.typical = temp > 0;
        mo.temp = temp;
    }

    eng_model *m = NULL;
    int32_t *ids = NULL;
    int status = 1;
    if (cuda >= 0) {
        /* The reason a device cannot be used (this build, the driver, the
         * index) before anything is read. */
        char why[256] = "";
        int n = kn_cuda_device_count(why, sizeof why);
        if (n <= 0) {
            fprintf(stderr, "gorgon-run: --device %s: cannot use it: %s\n", device,
                    why[0] ? why : cm_strerror(n));
            goto out;
        }
        if (cuda >= n) {
            fprintf(stderr, "gorgon-run: --device %s: this machine has %d CUDA device%s "
                            "(cuda:0 to cuda:%d)\n", device, n, n == 1 ? "" : "s", n - 1);
            goto out;
        }
    }
    if ((rc = eng_model_open_tp(&m, model_path, 0, (int)tp)) < 0) {
        fprintf(stderr, "gorgon-run: %s: %s\n", model_path,
                eng_error()[0] ? eng_error() : cm_strerror(rc));
        goto out;
    }
    const eng_hparams *hp = eng_model_hparams(m);
    const eng_tok *tok = eng_model_tokenizer(m);
    if (!tok) {
        fprintf(stderr, "gorgon-run: %s has no tokenizer\n", model_path);
        goto out;
    }
    size_t plen = strlen(prompt);
    ids = malloc((3 * plen + 4) * sizeof(int32_t));
    if (!ids) {
        fprintf(stderr, "gorgon-run: out of memory\n");
        goto out;
    }
    int64_t n_ids = eng_tok_encode(tok, prompt, plen, true, ids, 3 * plen + 4);
    if (n_ids < 1) {
        fprintf(stderr, "gorgon-run: cannot tokenize the prompt: %s\n",
                n_ids < 0 ? eng_error() : "empty");
        goto out;
    }
    /* The prompt must fit whole (gorgond's rule too); then -n new tokens
     * are positions n_ids .. n_ids + n - 1, i.e. llama2.c steps of
     * n_ids + n - 1 (the last token is sampled, never fed back). */
    if (n_ids > hp->n_ctx) {
        fprintf(stderr, "gorgon-run: the prompt is %" PRId64 " tokens, longer than the "
                        "model's context of %" PRId64 " tokens\n", n_ids, hp->n_ctx);
        goto out;
    }
    if (steps_set) {
        if ((int64_t)steps > hp->n_ctx)
            steps = (double)hp->n_ctx; /* as llama2.c: never past the context */
    } else {
        int64_t room = hp->n_ctx - n_ids;
        if ((int64_t)n_new > room) {
            if (n_new_set || room < 1) {
                fprintf(stderr, "gorgon-run: the prompt (%" PRId64 " tokens) + -n %" PRId64
                                " exceeds the model's context of %" PRId64 " tokens (room for "
                                "%" PRId64 " new)\n", n_ids, (int64_t)n_new, hp->n_ctx,
                        room > 0 ? room : 0);
                goto out;
            }
            n_new = (double)room; /* the default stops at the context's end */
        }
        steps = (double)(n_ids + (int64_t)n_new - 1);
    }
    const uint64_t seed_used = seed_set ? (uint64_t)seed : cm_now_ns();
    mo.seed = seed_used;
    run_job job = {.model_path = model_path,
                   .device = device,
                   .on_device = cuda >= 0,
                   .tp = (int)tp,
                   .threads = tp > 1 && threads == 0 ? 1 : (int)threads, /* 0: auto */
                   .m0 = m,
                   .ids = ids,
                   .n_ids = n_ids,
                   .steps = (int64_t)steps,
                   .temp = (float)temp,
                   .top_p = (float)top_p,
                   .min_p = (float)min_p,
                   .rep = (float)rep,
                   .top_k = (int)top_k,
                   .last_n = (int)last_n,
                   .seed = seed_used,
                   .rng = rng,
                   .stops = stops,
                   .n_stop = n_stop,
                   .print_ids = print_ids,
                   .mo = mo};
    rc = eng_tp_run(job.tp, run_rank, &job,
                    &(eng_tp_opts){.threads_per_rank = job.threads > 0 ? job.threads : 1});
    m = job.m0; /* NULL when the rank closed it (its weights were on the device) */
    if (rc < 0 && !atomic_load(&g_reported))
        fprintf(stderr, "gorgon-run: %s\n", eng_error()[0] ? eng_error() : cm_strerror(rc));
    status = rc < 0 ? 1 : 0;
out:
    free(ids);
    eng_model_close(m);
    return status;
}
