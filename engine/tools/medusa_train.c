/* gorgon-medusa-train — Medusa-1 heads by self-distillation on a frozen base
 * model, small enough to run in minutes on a couple of CPU cores.
 *
 *   1. Data: the base model writes its own text from varied short prompts,
 *      many sequences decoded as one batch: a sampled prefix of 1..--prefix
 *      tokens (temperature and top-p as given) spreads the sequences over
 *      many states, then greedy continuation (--greedy: the fraction of
 *      sequences that do this; the others are sampled throughout). Greedy
 *      text is what the heads must predict under greedy acceptance; trained
 *      on sampled text they learn the sampler's noise instead. Each
 *      position's final-norm hidden state is kept (the base is frozen, so
 *      these are the heads' exact inputs; FasterDecoding/Medusa also feeds
 *      the heads the last hidden state after the final norm).
 *   2. Training: head k (0-based) sees the hidden state at position p and
 *      learns the token at p + k + 2 with cross-entropy, loss weight 0.8^k,
 *      AdamW. As in FasterDecoding/Medusa the ResBlock starts at zero
 *      (W = 0, b = 0, so h' = h) and the vocabulary projection starts as the
 *      base model's output matrix: an untrained head predicts what the base
 *      predicts at +1.
 *   3. Output: DIR/medusa_lm_head.safetensors ({k}.0.linear.weight [H,H],
 *      {k}.0.linear.bias [H], {k}.1.weight [V,H], F32) and DIR/config.json;
 *      top-1 / top-5 of every head on held-out sequences (before and after
 *      training; on all positions and on those whose next k+2 tokens are
 *      all the base's argmax, which is what greedy acceptance sees) go to
 *      stderr. --freeze-lm keeps the projections at the output matrix.
 *   4. Tree: the heads' rank-wise top-10 accuracies on the held-out
 *      greedy-chain positions and the measured cost of a tree step on this
 *      backend (forward over n tree nodes plus the written heads run by
 *      eng_medusa, relative to a plain one-token decode, at a context of
 *      COST_CTX tokens) give a fitted
 *      candidate tree (engine/medusa/medusa_fit.h), written as
 *      DIR/medusa_choices.json; gorgon-run --medusa DIR uses it by default.
 *
 * Forward matrix products go through the kernels (kn_ops.matmul); the
 * backward's row updates are independent per row and run on the kernels'
 * thread pool (kn_parallel_for). Training reads and writes activations on
 * the host, so the trainer runs on a backend whose memory is host memory
 * (the CPU backend: kn_ctx_host_memory); it says so rather than run
 * elsewhere. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/common.h"
#include "engine/engine.h"
#include "engine/medusa/medusa_fit.h"
#include "engine/medusa/medusa_heads.h"
#include "engine/model/safetensors.h"

#define MAX_HEADS 8
#define GEN_BATCH 32 /* sequences decoded together */

static const char *const PROMPTS[] = {
    "",          "Once upon a time", "One day",        "Lily",         "Tom",
    "The dog",   "There was a",      "Sam liked",      "The sun",      "Mom said",
    "A little",  "The cat",          "Ben and Mia",    "It was a",     "In the park",
    "The bird",  "Sue wanted",       "Max had a big",  "Anna",         "The boy",
    "Tim saw",   "Once there was",   "The girl and",   "Every day",
};
#define N_PROMPTS ((int)(sizeof(PROMPTS) / sizeof(PROMPTS[0])))

typedef struct opts {
    const char *model, *out;
    int heads, seqs, len, epochs, batch, threads, prefix;
    double lr, wd, temp, top_p, holdout, greedy;
    bool freeze_lm;
    uint64_t seed;
} opts;

/* Generated data: seq s has n_tok[s] tokens at tok + s*stride and the hidden
 * states of its first n_tok[s] - 1 positions at hid + s*stride*H; am[i] is 1
 * where tok[i] is the base model's argmax (a greedy choice). */
typedef struct dataset {
    int64_t n_seqs, stride, H;
    int32_t *tok;
    uint8_t *am;
    int64_t *n_tok;
    float *hid;
} dataset;

typedef struct head {
    float *w, *b, *lm;          /* [H][H], [H], [V][H] */
    float *gw, *gb, *glm;       /* gradients */
    float *mw, *vw, *mb, *vb, *mlm, *vlm; /* Adam moments */
} head;

typedef struct trainer {
    kn_ctx *kn;
    const kn_ops *ops;
    int64_t H, V, B; /* hidden, vocabulary, batch rows */
    int K;
    head hd[MAX_HEADS];
    /* batch scratch */
    float *x;      /* [B][H] inputs */
    float *z;      /* [B][H] W x + b */
    float *hp;     /* [B][H] x + silu(z) */
    float *lg;     /* [B][V] logits, then dlogits */
    float *dhp;    /* [B][H] */
    int32_t *tgt;  /* [B] target token (-1: none) */
    int64_t nb;    /* rows in the batch */
    double scale;  /* loss weight / rows */
    int cur;       /* head being updated by the parallel tasks */
    bool freeze_lm; /* projections stay the base output matrix */
} trainer;

static int parse_num(const char *opt, const char *s, double lo, double hi, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi)) {
        fprintf(stderr, "gorgon-medusa-train: %s: bad value \"%s\" (expected %g..%g)\n", opt, s,
                lo, hi);
        return -EINVAL;
    }
    *out = v;
    return 0;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: gorgon-medusa-train --model FILE --out DIR [--heads K] [--seqs N] [--len L]\n"
            "                           [--epochs E] [--batch B] [--lr LR] [--wd WD]\n"
            "                           [--temp T] [--top-p P] [--holdout F] [--seed S]\n"
            "                           [--greedy F] [--prefix N] [--freeze-lm] [--threads N]\n"
            "  --heads K    heads to train (default 4, at most %d)\n"
            "  --seqs N     sequences the base model writes (default 1024)\n"
            "  --len L      tokens generated per sequence (default 128)\n"
            "  --epochs E   passes over the training positions (default 4)\n"
            "  --batch B    positions per AdamW step (default 64)\n"
            "  --lr LR      AdamW learning rate (default 3e-3), --wd weight decay (0.01)\n"
            "  --temp T, --top-p P  sampling of the training text (default 0.8, 0.95)\n"
            "  --holdout F  fraction of sequences held out for top-k accuracy (0.1)\n"
            "  --greedy F   fraction of sequences that continue greedily after a sampled\n"
            "               prefix of 1..N tokens (--prefix N, default 16); the rest are\n"
            "               sampled throughout (default 1: Medusa is measured and\n"
            "               lossless under greedy decoding, whose text it must predict)\n"
            "  --freeze-lm  keep every head's projection equal to the base output matrix\n"
            "               (the decoder then reads that matrix once for all heads;\n"
            "               less accurate heads on small models)\n"
            "  --threads N  kernel threads; the tree in DIR/medusa_choices.json is fitted to\n"
            "               the step cost measured with them (default: all cores)\n",
            MAX_HEADS);
}

/* ---- data --------------------------------------------------------------- */

static void dataset_free(dataset *d)
{
    free(d->tok);
    free(d->am);
    free(d->n_tok);
    free(d->hid);
}

/* Let the base model write o->seqs sequences, GEN_BATCH at a time. */
static int generate(const opts *o, kn_ctx *kn, const eng_model *m, dataset *d)
{
    const eng_hparams *hp = eng_model_hparams(m);
    const eng_tok *tok = eng_model_tokenizer(m);
    const int64_t H = hp->dim, V = hp->n_vocab;
    int32_t pr[N_PROMPTS][32];
    int64_t pn[N_PROMPTS], max_pn = 0;
    for (int i = 0; i < N_PROMPTS; i++) {
        pn[i] = eng_tok_encode(tok, PROMPTS[i], strlen(PROMPTS[i]), true, pr[i], 32);
        if (pn[i] < 1)
            return eng_fail(-EINVAL, "cannot tokenize the prompt \"%s\"", PROMPTS[i]);
        max_pn = pn[i] > max_pn ? pn[i] : max_pn;
    }
    if (max_pn + o->len > hp->n_ctx)
        return eng_fail(-EINVAL, "--len %d: prompts of up to %" PRId64 " tokens plus %d "
                                 "exceed the model's context of %" PRId64,
                        o->len, max_pn, o->len, hp->n_ctx);
    d->n_seqs = o->seqs;
    d->stride = max_pn + o->len;
    d->H = H;
    d->tok = calloc((size_t)(d->n_seqs * d->stride), sizeof(int32_t));
    d->am = calloc((size_t)(d->n_seqs * d->stride), 1);
    d->n_tok = calloc((size_t)d->n_seqs, sizeof(int64_t));
    d->hid = calloc((size_t)(d->n_seqs * d->stride * H), sizeof(float));
    float *logits = malloc((size_t)(GEN_BATCH * max_pn * V) * sizeof(float));
    float *hidden = malloc((size_t)(GEN_BATCH * max_pn * H) * sizeof(float));
    uint8_t *want = malloc((size_t)max_pn);
    if (!d->tok || !d->am || !d->n_tok || !d->hid || !logits || !hidden || !want) {
        free(logits);
        free(hidden);
        free(want);
        return eng_fail(-ENOMEM, "out of memory for %" PRId64 " sequences", d->n_seqs);
    }
    memset(want, 1, (size_t)max_pn);
    eng_ctx *c = NULL;
    eng_kv *kv = NULL;
    eng_sampler *smp[GEN_BATCH] = {NULL};
    eng_kv_cfg kc;
    const int64_t max_len = d->stride + 1;
    eng_model_kv_cfg(m, 16, GEN_BATCH * ((max_len + 15) / 16), GEN_BATCH, max_len, &kc);
    int rc = eng_ctx_create(&c, m, &(eng_ctx_cfg){.kn = kn, .max_tokens = GEN_BATCH * max_pn,
                                                   .max_ctx = max_len});
    if (rc == 0)
        rc = eng_kv_create(&kv, kn, &kc);
    for (int b = 0; b < GEN_BATCH && rc == 0; b++)
        rc = eng_sampler_create(&smp[b],
                                &(eng_sampler_cfg){.temperature = (float)o->temp,
                                                   .top_p = (float)o->top_p, .seed = o->seed},
                                V);
    for (int64_t s0 = 0; s0 < d->n_seqs && rc == 0; s0 += GEN_BATCH) {
        const int nb = (int)(d->n_seqs - s0 < GEN_BATCH ? d->n_seqs - s0 : GEN_BATCH);
        eng_seq_in in[GEN_BATCH];
        int seq[GEN_BATCH];
        int32_t next[GEN_BATCH];
        uint8_t next_am[GEN_BATCH];
        int64_t n_sampled[GEN_BATCH]; /* tokens sampled before greedy takes over */
        for (int b = 0; b < nb; b++) {
            const int64_t s = s0 + b;
            const int p = (int)(s % N_PROMPTS);
            /* Greedy sequences: a short sampled prefix (1..prefix tokens)
             * spreads them over many states, then argmax as in greedy
             * decoding, whose continuations Medusa must predict. */
            const uint64_t hsh = (uint64_t)s * 0x9e3779b97f4a7c15ull ^ o->seed;
            const bool greedy = (double)(hsh >> 11) * 0x1.0p-53 < o->greedy;
            n_sampled[b] = greedy ? 1 + (int64_t)((hsh >> 3) % (uint64_t)o->prefix) : INT64_MAX;
            seq[b] = eng_kv_seq_alloc(kv);
            memcpy(d->tok + s * d->stride, pr[p], (size_t)pn[p] * sizeof(int32_t));
            d->n_tok[s] = pn[p];
            eng_sampler_reset(smp[b], o->seed * 1000003u + (uint64_t)s);
            in[b] = (eng_seq_in){.seq = seq[b], .tokens = pr[p], .n_tokens = pn[p],
                                 .want = want};
        }
        /* prefill: every prompt position's hidden state; the last one's
         * logits give the first generated token */
        int64_t n_out = eng_forward(c, kv, in, nb, logits, hidden);
        if (n_out < 0) {
            rc = (int)n_out;
            break;
        }
        int64_t row = 0;
        for (int b = 0; b < nb; b++) {
            const int64_t s = s0 + b, n = d->n_tok[s];
            memcpy(d->hid + s * d->stride * H, hidden + row * H, (size_t)(n * H) * sizeof(float));
            float *l = logits + (row + n - 1) * V;
            const int32_t am = eng_argmax(l, V);
            next[b] = n_sampled[b] <= 0 ? am : eng_sampler_sample(smp[b], l);
            next_am[b] = next[b] == am;
            row += n;
        }
        for (int64_t t = 0; t < o->len; t++) {
            for (int b = 0; b < nb; b++) {
                const int64_t s = s0 + b;
                d->am[s * d->stride + d->n_tok[s]] = next_am[b];
                d->tok[s * d->stride + d->n_tok[s]++] = next[b];
                in[b] = (eng_seq_in){.seq = seq[b], .tokens = &next[b], .n_tokens = 1};
            }
            if (t == o->len - 1)
                break; /* the last token's hidden state has no target */
            n_out = eng_forward(c, kv, in, nb, logits, hidden);
            if (n_out < 0) {
                rc = (int)n_out;
                break;
            }
            for (int b = 0; b < nb; b++) {
                const int64_t s = s0 + b;
                memcpy(d->hid + (s * d->stride + d->n_tok[s] - 1) * H, hidden + b * H,
                       (size_t)H * sizeof(float));
                float *l = logits + b * V;
                const int32_t am = eng_argmax(l, V);
                next[b] = t + 1 >= n_sampled[b] ? am : eng_sampler_sample(smp[b], l);
                next_am[b] = next[b] == am;
            }
        }
        for (int b = 0; b < nb; b++)
            eng_kv_seq_free(kv, seq[b]);
    }
    for (int b = 0; b < GEN_BATCH; b++)
        eng_sampler_destroy(smp[b]);
    eng_kv_destroy(kv);
    eng_ctx_destroy(c);
    free(logits);
    free(hidden);
    free(want);
    return rc;
}

/* ---- heads -------------------------------------------------------------- */

static void trainer_free(trainer *T)
{
    for (int k = 0; k < MAX_HEADS; k++) {
        head *h = &T->hd[k];
        free(h->w), free(h->b), free(h->lm), free(h->gw), free(h->gb), free(h->glm);
        free(h->mw), free(h->vw), free(h->mb), free(h->vb), free(h->mlm), free(h->vlm);
    }
    free(T->x), free(T->z), free(T->hp), free(T->lg), free(T->dhp), free(T->tgt);
}

static int trainer_init(trainer *T, kn_ctx *kn, const eng_model *m, int K, int64_t B)
{
    const eng_hparams *hp = eng_model_hparams(m);
    const kn_tensor *out = eng_model_output(m);
    memset(T, 0, sizeof(*T));
    T->kn = kn;
    T->ops = kn_ctx_ops(kn);
    T->H = hp->dim;
    T->V = hp->n_vocab;
    T->B = B;
    T->K = K;
    const size_t HH = (size_t)(T->H * T->H), VH = (size_t)(T->V * T->H), H = (size_t)T->H;
    float *row = malloc(H * sizeof(float));
    if (!row)
        return -ENOMEM;
    for (int k = 0; k < K; k++) {
        head *h = &T->hd[k];
        const size_t fs = sizeof(float);
        h->w = calloc(HH, fs), h->gw = calloc(HH, fs), h->mw = calloc(HH, fs);
        h->vw = calloc(HH, fs);
        h->b = calloc(H, fs), h->gb = calloc(H, fs), h->mb = calloc(H, fs), h->vb = calloc(H, fs);
        h->lm = calloc(VH, fs), h->glm = calloc(VH, fs), h->mlm = calloc(VH, fs);
        h->vlm = calloc(VH, fs);
        if (!h->w || !h->gw || !h->mw || !h->vw || !h->b || !h->gb || !h->mb || !h->vb ||
            !h->lm || !h->glm || !h->mlm || !h->vlm) {
            free(row);
            return -ENOMEM;
        }
        /* The output matrix may be quantised: dequantise it row by row. */
        const size_t rb = kn_row_bytes(out->type, T->H);
        for (int64_t v = 0; v < T->V; v++) {
            kn_dequantize_row(out->type, (const char *)out->data + (size_t)v * rb, T->H, row);
            memcpy(h->lm + (size_t)v * H, row, H * sizeof(float));
        }
    }
    free(row);
    T->x = malloc((size_t)B * H * sizeof(float));
    T->z = malloc((size_t)B * H * sizeof(float));
    T->hp = malloc((size_t)B * H * sizeof(float));
    T->dhp = malloc((size_t)B * H * sizeof(float));
    T->lg = malloc((size_t)B * (size_t)T->V * sizeof(float));
    T->tgt = malloc((size_t)B * sizeof(int32_t));
    return T->x && T->z && T->hp && T->dhp && T->lg && T->tgt ? 0 : -ENOMEM;
}

static float silu(float x)
{
    return x / (1.0f + expf(-x));
}

/* Head k forward over the batch in T->x: z, hp, logits. */
static void head_forward(trainer *T, int k)
{
    head *h = &T->hd[k];
    const int64_t H = T->H;
    kn_tensor w = {.data = h->w, .type = KN_F32, .rows = H, .cols = H};
    kn_tensor lm = {.data = h->lm, .type = KN_F32, .rows = T->V, .cols = H};
    T->ops->matmul(T->kn, &w, T->x, T->nb, T->z);
    for (int64_t r = 0; r < T->nb; r++)
        for (int64_t i = 0; i < H; i++) {
            float *z = &T->z[r * H + i];
            *z += h->b[i];
            T->hp[r * H + i] = T->x[r * H + i] + silu(*z);
        }
    T->ops->matmul(T->kn, &lm, T->hp, T->nb, T->lg);
}

/* dhp[r] = Σ_v dlogits[r][v] · LM[v]  (rows independent) */
static void task_dhp(void *arg, int64_t r)
{
    trainer *T = arg;
    const head *h = &T->hd[T->cur];
    const int64_t H = T->H;
    float *d = T->dhp + r * H;
    memset(d, 0, (size_t)H * sizeof(float));
    if (T->tgt[r] < 0)
        return;
    const float *g = T->lg + r * T->V;
    for (int64_t v = 0; v < T->V; v++) {
        const float gv = g[v];
        const float *l = h->lm + v * H;
        for (int64_t i = 0; i < H; i++)
            d[i] += gv * l[i];
    }
}

#define V_CHUNK 64

/* gLM[v] = Σ_r dlogits[r][v] · hp[r], then the AdamW step on those rows. */
typedef struct adam {
    double lr, wd, b1, b2, c1, c2; /* c: bias corrections 1 - beta^t */
} adam;
static adam g_adam;

static void adam_update(float *p, const float *g, float *mo, float *ve, int64_t n, bool decay)
{
    const adam *a = &g_adam;
    for (int64_t i = 0; i < n; i++) {
        mo[i] = (float)(a->b1 * mo[i] + (1 - a->b1) * g[i]);
        ve[i] = (float)(a->b2 * ve[i] + (1 - a->b2) * (double)g[i] * g[i]);
        double mh = mo[i] / a->c1, vh = ve[i] / a->c2;
        double upd = mh / (sqrt(vh) + 1e-8) + (decay ? a->wd * p[i] : 0.0);
        p[i] -= (float)(a->lr * upd);
    }
}

static void task_lm(void *arg, int64_t chunk)
{
    trainer *T = arg;
    head *h = &T->hd[T->cur];
    const int64_t H = T->H, v0 = chunk * V_CHUNK;
    const int64_t v1 = v0 + V_CHUNK < T->V ? v0 + V_CHUNK : T->V;
    float *G = h->glm + v0 * H;
    memset(G, 0, (size_t)((v1 - v0) * H) * sizeof(float));
    for (int64_t r = 0; r < T->nb; r++) {
        if (T->tgt[r] < 0)
            continue;
        const float *hp = T->hp + r * H, *g = T->lg + r * T->V;
        for (int64_t v = v0; v < v1; v++) {
            const float gv = g[v];
            float *gr = G + (v - v0) * H;
            for (int64_t i = 0; i < H; i++)
                gr[i] += gv * hp[i];
        }
    }
    adam_update(h->lm + v0 * H, G, h->mlm + v0 * H, h->vlm + v0 * H, (v1 - v0) * H, true);
}

/* One AdamW step of head k on the batch; returns the summed CE loss. */
static double head_step(trainer *T, int k)
{
    head *h = &T->hd[k];
    const int64_t H = T->H, V = T->V;
    head_forward(T, k);
    double loss = 0;
    int64_t n = 0;
    for (int64_t r = 0; r < T->nb; r++)
        n += T->tgt[r] >= 0;
    if (n == 0)
        return 0;
    const float sc = (float)(pow(0.8, k) / (double)n);
    for (int64_t r = 0; r < T->nb; r++) {
        float *l = T->lg + r * V;
        if (T->tgt[r] < 0)
            continue;
        float mx = l[0];
        for (int64_t v = 1; v < V; v++)
            mx = fmaxf(mx, l[v]);
        double sum = 0;
        for (int64_t v = 0; v < V; v++)
            sum += exp((double)(l[v] - mx));
        const double lse = mx + log(sum);
        loss += lse - l[T->tgt[r]];
        for (int64_t v = 0; v < V; v++)
            l[v] = (float)exp(l[v] - lse) * sc;
        l[T->tgt[r]] -= sc;
    }
    T->cur = k;
    kn_parallel_for(T->kn, T->nb, task_dhp, T);
    /* ResBlock: dz = dhp · silu'(z); gW = Σ dz ⊗ x; gb = Σ dz */
    memset(h->gw, 0, (size_t)(H * H) * sizeof(float));
    memset(h->gb, 0, (size_t)H * sizeof(float));
    for (int64_t r = 0; r < T->nb; r++) {
        if (T->tgt[r] < 0)
            continue;
        const float *x = T->x + r * H;
        for (int64_t j = 0; j < H; j++) {
            const float z = T->z[r * H + j], s = 1.0f / (1.0f + expf(-z));
            const float dz = T->dhp[r * H + j] * s * (1.0f + z * (1.0f - s));
            h->gb[j] += dz;
            float *gw = h->gw + j * H;
            for (int64_t i = 0; i < H; i++)
                gw[i] += dz * x[i];
        }
    }
    if (!T->freeze_lm)
        kn_parallel_for(T->kn, (V + V_CHUNK - 1) / V_CHUNK, task_lm, T);
    adam_update(h->w, h->gw, h->mw, h->vw, H * H, true);
    adam_update(h->b, h->gb, h->mb, h->vb, H, false);
    return loss;
}

/* Position list: (sequence, position) of every hidden state. */
typedef struct posn {
    int32_t s, p;
} posn;

/* Fill the batch rows from positions idx[0..n) for head k's targets. */
static void load_batch(trainer *T, const dataset *d, const posn *ps, int64_t n, int k)
{
    T->nb = n;
    for (int64_t r = 0; r < n; r++) {
        const posn q = ps[r];
        memcpy(T->x + r * T->H, d->hid + ((int64_t)q.s * d->stride + q.p) * T->H,
               (size_t)T->H * sizeof(float));
        const int64_t t = q.p + k + 2;
        T->tgt[r] = t < d->n_tok[q.s] ? d->tok[(int64_t)q.s * d->stride + t] : -1;
    }
}

/* Top-1 / top-5 of every head over positions ps[0..n). With acc non-NULL,
 * also acc[k][r] = fraction of positions where the target is head k's
 * rank-r candidate (r < ENG_MEDUSA_TOPK; rank-wise, not cumulative). */
/* Whether tokens p+1 .. p+k+2 of q's sequence are all the base model's
 * argmax: the positions greedy decoding's acceptance at depth k+1 sees. */
static bool greedy_chain(const dataset *d, posn q, int k)
{
    const int64_t end = q.p + k + 2;
    if (end >= d->n_tok[q.s])
        return false;
    for (int64_t t = q.p + 1; t <= end; t++)
        if (!d->am[(int64_t)q.s * d->stride + t])
            return false;
    return true;
}

/* Top-1 / top-5 of every head over positions ps[0..n), on all of them and
 * on those on a greedy chain (greedy_chain). With acc non-NULL, also
 * acc[k][r] = fraction of greedy-chain positions (all positions if there
 * are none) where the target is head k's rank-r candidate
 * (r < ENG_MEDUSA_TOPK; rank-wise, not cumulative). */
static void evaluate(trainer *T, const dataset *d, const posn *ps, int64_t n, const char *when,
                     double *acc)
{
    fprintf(stderr, "held-out (%s), top-1/top-5 on all | greedy-chain positions:\n", when);
    for (int k = 0; k < T->K; k++) {
        int64_t n1 = 0, n5 = 0, cnt = 0, at_rank[ENG_MEDUSA_TOPK] = {0};
        int64_t g1 = 0, g5 = 0, gcnt = 0, g_rank[ENG_MEDUSA_TOPK] = {0};
        for (int64_t i = 0; i < n; i += T->B) {
            const int64_t m = n - i < T->B ? n - i : T->B;
            load_batch(T, d, ps + i, m, k);
            head_forward(T, k);
            for (int64_t r = 0; r < m; r++) {
                if (T->tgt[r] < 0)
                    continue;
                const float *l = T->lg + r * T->V, lt = l[T->tgt[r]];
                int64_t above = 0;
                for (int64_t v = 0; v < T->V && above < ENG_MEDUSA_TOPK; v++)
                    above += l[v] > lt || (l[v] == lt && v < T->tgt[r]);
                n1 += above < 1;
                n5 += above < 5;
                if (above < ENG_MEDUSA_TOPK)
                    at_rank[above]++;
                cnt++;
                if (greedy_chain(d, ps[i + r], k)) {
                    g1 += above < 1;
                    g5 += above < 5;
                    if (above < ENG_MEDUSA_TOPK)
                        g_rank[above]++;
                    gcnt++;
                }
            }
        }
        for (int r = 0; acc && r < ENG_MEDUSA_TOPK; r++)
            acc[k * ENG_MEDUSA_TOPK + r] = gcnt ? (double)g_rank[r] / (double)gcnt
                                       : cnt  ? (double)at_rank[r] / (double)cnt
                                              : 0.0;
#define PCT(a, b) ((b) ? 100.0 * (double)(a) / (double)(b) : 0.0)
        fprintf(stderr, "  head %d: %.1f%% / %.1f%% | %.1f%% / %.1f%% (%" PRId64 " positions)\n",
                k, PCT(n1, cnt), PCT(n5, cnt), PCT(g1, gcnt), PCT(g5, gcnt), gcnt);
#undef PCT
    }
}

static int write_heads(const trainer *T, const opts *o)
{
    const float *w[MAX_HEADS], *b[MAX_HEADS], *lm[MAX_HEADS];
    for (int k = 0; k < T->K; k++)
        w[k] = T->hd[k].w, b[k] = T->hd[k].b, lm[k] = T->hd[k].lm;
    const char *base = strrchr(o->model, '/');
    return eng_medusa_heads_write(o->out, T->K, T->H, T->V, w, b, lm, base ? base + 1 : o->model);
}

/* ---- tree fitted to this backend ---------------------------------------- */

#define COST_CTX 128 /* context the cost is measured at (less if the model is shorter) */
#define COST_MAX_NODES 64
/* Every size up to 16: the kernels change algorithm with the row count
 * (e.g. one matrix-vector product per row below some M, a GEMM above), so
 * the curve has steps and dips that coarse points would interpolate over. */
static const int64_t COST_NS[] = {1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12,
                                  13, 14, 15, 16, 20, 24, 32, 40, 48, 64};
#define COST_PTS ((int)(sizeof(COST_NS) / sizeof(COST_NS[0])))

/* cost[n-1], n = 1..COST_MAX_NODES: (forward of n tree nodes with their
 * logits and hidden states + the heads) / (plain one-token decode); n = 1 is
 * the plain step itself. Best of interleaved rounds, so a burst of load from
 * other processes hits every size alike. */
static int measure_cost(kn_ctx *kn, const eng_model *m, trainer *T, const dataset *d,
                        const char *dir, double *cost)
{
    const eng_hparams *hp = eng_model_hparams(m);
    const int64_t V = hp->n_vocab, H = hp->dim, N = COST_MAX_NODES;
    int64_t ctx = hp->n_ctx - N - 1 < COST_CTX ? hp->n_ctx - N - 1 : COST_CTX;
    if (ctx < 1)
        return eng_fail(-EINVAL, "context of %" PRId64 " is too short to time a %" PRId64
                                 "-node tree",
                        hp->n_ctx, N);
    const int64_t max_len = ctx + N, rows = ctx > N ? ctx : N;
    eng_ctx *c = NULL;
    eng_kv *kv = NULL;
    eng_kv_cfg kc;
    eng_model_kv_cfg(m, 16, (max_len + 15) / 16, 1, max_len, &kc);
    float *logits = malloc((size_t)(rows * V) * sizeof(float));
    float *hidden = malloc((size_t)(rows * H) * sizeof(float));
    int32_t *ids = malloc((size_t)rows * sizeof(int32_t));
    int32_t *pos = malloc((size_t)N * sizeof(int32_t));
    uint8_t *mask = calloc((size_t)(N * N), 1);
    uint8_t *want = malloc((size_t)N);
    int rc = logits && hidden && ids && pos && mask && want ? 0 : -ENOMEM;
    if (rc == 0)
        rc = eng_ctx_create(&c, m, &(eng_ctx_cfg){.kn = kn, .max_tokens = rows,
                                                   .max_ctx = max_len});
    if (rc == 0)
        rc = eng_kv_create(&kv, kn, &kc);
    int seq = rc == 0 ? eng_kv_seq_alloc(kv) : -1;
    double best[COST_PTS + 1], head_t = 1e30;
    /* The heads as the decoder runs them (the written files through
     * eng_medusa: stacked ResBlocks, shared or converted projections, top-k),
     * timed as a step's prepare over a chain using every head; abort undoes
     * it. */
    eng_medusa_heads *mh = NULL;
    eng_medusa_tree *chain = NULL;
    eng_medusa *md = NULL;
    eng_seq_in md_in;
    char chain_name[32];
    snprintf(chain_name, sizeof(chain_name), "chain%d",
             T->K < ENG_MEDUSA_MAX_DEPTH ? T->K : ENG_MEDUSA_MAX_DEPTH);
    if (rc == 0)
        rc = eng_medusa_heads_open(&mh, dir, H, V);
    if (rc == 0)
        rc = eng_medusa_tree_named(&chain, chain_name);
    if (rc == 0)
        rc = eng_medusa_create(&md, &(eng_medusa_cfg){.model = m, .kn = kn, .heads = mh,
                                                      .tree = chain, .max_seqs = 1});
    for (int i = 0; i <= COST_PTS; i++)
        best[i] = 1e30;
    if (rc == 0) {
        /* the context: a held-out-like text of the base model's own */
        for (int64_t i = 0; i < rows; i++)
            ids[i] = d->tok[i % d->n_tok[0]];
        memset(want, 1, (size_t)N);
        eng_seq_in in = {.seq = seq, .tokens = ids, .n_tokens = ctx};
        if (eng_forward(c, kv, &in, 1, logits, NULL) < 0)
            rc = -EIO;
        else
            rc = eng_medusa_seq_begin(md, seq, logits, d->hid, 0);
    }
    const uint64_t t_start = cm_now_ns();
    for (int round = 0; rc == 0 && round < 400; round++) {
        if (round >= 8 && cm_now_ns() - t_start > 3000000000ull)
            break;
        for (int i = 0; i <= COST_PTS && rc == 0; i++) {
            /* i == 0: the plain decode step (one token, logits only) */
            const int64_t n = i == 0 ? 1 : COST_NS[i - 1];
            for (int64_t j = 0; j < n; j++)
                pos[j] = (int32_t)(ctx + (j > 0));
            /* a wide tree's mask (node attends the root and itself); the
             * work is the same for any tree of n nodes */
            for (int64_t a = 0; a < n; a++)
                for (int64_t b = 0; b < n; b++)
                    mask[a * n + b] = a == b || b == 0;
            eng_seq_in in = i == 0 ? (eng_seq_in){.seq = seq, .tokens = ids, .n_tokens = 1}
                                   : (eng_seq_in){.seq = seq, .tokens = ids, .n_tokens = n,
                                                  .pos = pos, .mask = mask, .want = want};
            /* the first call wakes the kernels' thread pool; decode steps
             * run back to back, so time only the calls after it */
            for (int rep = 0; rep < 4 && rc == 0; rep++) {
                const uint64_t t0 = cm_now_ns();
                int64_t got = eng_forward(c, kv, &in, 1, logits, i == 0 ? NULL : hidden);
                const double t = (double)(cm_now_ns() - t0);
                if (got < 0 || eng_kv_seq_truncate(kv, seq, ctx) < 0)
                    rc = -EIO;
                if (rep > 0)
                    best[i] = t < best[i] ? t : best[i];
            }
        }
        for (int rep = 0; rep < 4 && rc == 0; rep++) {
            const uint64_t t0 = cm_now_ns();
            if (eng_medusa_step_prepare(md, kv, &seq, 1, &md_in) < 0)
                rc = -EIO;
            eng_medusa_step_abort(md, &seq, 1);
            const double t = (double)(cm_now_ns() - t0);
            if (rep > 0)
                head_t = t < head_t ? t : head_t;
        }
    }
    if (rc == 0) {
        double pts[COST_PTS];
        pts[0] = 1.0; /* a root-only tree is the plain step */
        for (int i = 1; i < COST_PTS; i++)
            pts[i] = (best[i + 1] + head_t) / best[0];
        fprintf(stderr, "tree step cost on %s kernels, %d thread(s), context %" PRId64
                        " (plain decode %.1f us, heads %.1f us):",
                kn_variant_name(kn_ctx_variant(kn)), kn_ctx_threads(kn), ctx, best[0] * 1e-3,
                head_t * 1e-3);
        for (int i = 0; i < COST_PTS; i++)
            fprintf(stderr, " n=%" PRId64 " %.2f", COST_NS[i], pts[i]);
        fprintf(stderr, "\n");
        rc = eng_medusa_fit_interp_cost(COST_NS, pts, COST_PTS, N, cost);
    } else if (rc == -EIO) {
        rc = eng_fail(-EIO, "timing a tree forward: %s", eng_error());
    }
    eng_medusa_destroy(md);
    eng_medusa_tree_destroy(chain);
    eng_medusa_heads_close(mh);
    eng_kv_destroy(kv);
    eng_ctx_destroy(c);
    free(logits), free(hidden), free(ids), free(pos), free(mask), free(want);
    return rc;
}

/* Fit the tree to acc and this backend's cost; write DIR/medusa_choices.json. */
static int fit_and_write(kn_ctx *kn, const eng_model *m, trainer *T, const dataset *d,
                         const double *acc, const opts *o)
{
    double cost[COST_MAX_NODES];
    int rc = measure_cost(kn, m, T, d, o->out, cost);
    if (rc < 0)
        return rc;
    eng_medusa_fit *f = malloc(sizeof(*f));
    char *text = malloc(ENG_MEDUSA_FIT_TEXT_MAX);
    if (!f || !text) {
        free(f), free(text);
        return eng_fail(-ENOMEM, "out of memory fitting the tree");
    }
    const int heads = T->K < ENG_MEDUSA_MAX_DEPTH ? T->K : ENG_MEDUSA_MAX_DEPTH;
    rc = eng_medusa_fit_tree(acc, heads, ENG_MEDUSA_TOPK, cost, COST_MAX_NODES, f);
    int64_t len = rc < 0 ? rc : eng_medusa_fit_format(f, text, ENG_MEDUSA_FIT_TEXT_MAX);
    if (len < 0) {
        free(f), free(text);
        return rc < 0 ? rc : eng_fail((int)len, "formatting the tree");
    }
    char path[PATH_MAX];
    if (snprintf(path, sizeof(path), "%s/%s", o->out, "medusa_choices.json") >=
        (int)sizeof(path)) {
        free(f), free(text);
        return eng_fail(-ENAMETOOLONG, "%s: path too long", o->out);
    }
    FILE *fp = fopen(path, "we");
    if (!fp || fprintf(fp, "%s\n", text) < 0 || fclose(fp) != 0) {
        rc = cm_neg_errno();
        free(f), free(text);
        return eng_fail(rc, "%s: %s", path, cm_strerror(rc));
    }
    fprintf(stderr, "held-out rank-wise accuracy (rank 0..%d):\n", ENG_MEDUSA_TOPK - 1);
    for (int k = 0; k < heads; k++) {
        fprintf(stderr, "  head %d:", k);
        for (int r = 0; r < ENG_MEDUSA_TOPK; r++)
            fprintf(stderr, " %.3f", acc[k * ENG_MEDUSA_TOPK + r]);
        fprintf(stderr, "\n");
    }
    fprintf(stderr,
            "fitted tree: %" PRId64 " nodes, expected %.3f tokens/step at cost %.2f x a plain "
            "step (projected speedup %.2fx)\n%s\nwrote %s\n",
            f->n_paths + 1, f->expected_tokens, f->cost, f->expected_tokens / f->cost, text,
            path);
    if (f->expected_tokens < f->cost)
        fprintf(stderr, "note: no tree is expected to beat plain decoding on this backend "
                        "(best %.2fx); the list above is the least bad one\n",
                f->expected_tokens / f->cost);
    free(f), free(text);
    return 0;
}

static uint64_t g_shuf = 0x243f6a8885a308d3ull;
static uint64_t shuf_next(void)
{
    g_shuf ^= g_shuf << 13;
    g_shuf ^= g_shuf >> 7;
    g_shuf ^= g_shuf << 17;
    return g_shuf;
}

int main(int argc, char **argv)
{
    if (cm_version_requested(argc, argv, "gorgon-medusa-train"))
        return 0;
    opts o = {.heads = 4, .seqs = 1024, .len = 128, .epochs = 4, .batch = 64, .threads = 0,
              .lr = 3e-3, .wd = 0.01, .temp = 0.8, .top_p = 0.95, .holdout = 0.1, .seed = 1,
              .greedy = 1.0, .prefix = 16};
    enum { O_HEADS = 256, O_SEQS, O_LEN, O_EPOCHS, O_BATCH, O_LR, O_WD, O_TEMP, O_TOPP,
           O_HOLD, O_SEED, O_THREADS, O_GREEDY, O_PREFIX, O_FREEZE };
    static const struct option lo[] = {
        {"model", required_argument, 0, 'm'},      {"out", required_argument, 0, 'o'},
        {"heads", required_argument, 0, O_HEADS},  {"seqs", required_argument, 0, O_SEQS},
        {"len", required_argument, 0, O_LEN},      {"epochs", required_argument, 0, O_EPOCHS},
        {"batch", required_argument, 0, O_BATCH},  {"lr", required_argument, 0, O_LR},
        {"wd", required_argument, 0, O_WD},        {"temp", required_argument, 0, O_TEMP},
        {"top-p", required_argument, 0, O_TOPP},   {"holdout", required_argument, 0, O_HOLD},
        {"seed", required_argument, 0, O_SEED},    {"threads", required_argument, 0, O_THREADS},
        {"greedy", required_argument, 0, O_GREEDY}, {"prefix", required_argument, 0, O_PREFIX},
        {"freeze-lm", no_argument, 0, O_FREEZE},
        {"help", no_argument, 0, 'h'},             {0, 0, 0, 0},
    };
    int c, rc = 0;
    double v = 0;
    while ((c = getopt_long(argc, argv, "m:o:h", lo, NULL)) != -1) {
        switch (c) {
        case 'm': o.model = optarg; break;
        case 'o': o.out = optarg; break;
        case O_HEADS: rc = parse_num("--heads", optarg, 1, MAX_HEADS, &v), o.heads = (int)v; break;
        case O_SEQS: rc = parse_num("--seqs", optarg, 2, 1 << 20, &v), o.seqs = (int)v; break;
        case O_LEN: rc = parse_num("--len", optarg, 4, 1 << 16, &v), o.len = (int)v; break;
        case O_EPOCHS: rc = parse_num("--epochs", optarg, 0, 1000, &v), o.epochs = (int)v; break;
        case O_BATCH: rc = parse_num("--batch", optarg, 1, 1 << 16, &v), o.batch = (int)v; break;
        case O_LR: rc = parse_num("--lr", optarg, 0, 1, &o.lr); break;
        case O_WD: rc = parse_num("--wd", optarg, 0, 1, &o.wd); break;
        case O_TEMP: rc = parse_num("--temp", optarg, 0, 10, &o.temp); break;
        case O_TOPP: rc = parse_num("--top-p", optarg, 0, 1, &o.top_p); break;
        case O_HOLD: rc = parse_num("--holdout", optarg, 0.01, 0.9, &o.holdout); break;
        case O_SEED: rc = parse_num("--seed", optarg, 0, 1e18, &v), o.seed = (uint64_t)v; break;
        case O_THREADS:
            rc = parse_num("--threads", optarg, 1, 1024, &v), o.threads = (int)v;
            break;
        case O_GREEDY: rc = parse_num("--greedy", optarg, 0, 1, &o.greedy); break;
        case O_PREFIX: rc = parse_num("--prefix", optarg, 1, 1 << 16, &v), o.prefix = (int)v; break;
        case O_FREEZE: o.freeze_lm = true; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
        if (rc < 0)
            return 2;
    }
    if (!o.model || !o.out || optind < argc) {
        usage(stderr);
        return 2;
    }

    kn_ctx *kn = NULL;
    eng_model *m = NULL;
    dataset d = {0};
    trainer T;
    memset(&T, 0, sizeof(T));
    posn *ps = NULL;
    int status = 1;
    if ((rc = eng_model_open(&m, o.model)) < 0) {
        fprintf(stderr, "gorgon-medusa-train: %s: %s\n", o.model,
                eng_error()[0] ? eng_error() : cm_strerror(rc));
        goto out;
    }
    if (!eng_model_tokenizer(m)) {
        fprintf(stderr, "gorgon-medusa-train: %s has no tokenizer\n", o.model);
        goto out;
    }
    if ((rc = kn_ctx_create(&kn, &(kn_ctx_cfg){.n_threads = o.threads})) < 0) {
        fprintf(stderr, "gorgon-medusa-train: kernels: %s\n", cm_strerror(rc));
        goto out;
    }
    if (!kn_ctx_host_memory(kn)) {
        rc = -ENOTSUP;
        fprintf(stderr, "gorgon-medusa-train: trains on the host: needs the CPU backend\n");
        goto out;
    }
    uint64_t t0 = cm_now_ns();
    if ((rc = generate(&o, kn, m, &d)) < 0) {
        fprintf(stderr, "gorgon-medusa-train: generating data: %s\n",
                eng_error()[0] ? eng_error() : cm_strerror(rc));
        goto out;
    }
    int64_t n_pos = 0;
    for (int64_t s = 0; s < d.n_seqs; s++)
        n_pos += d.n_tok[s] - 1;
    fprintf(stderr, "data: %" PRId64 " sequences, %" PRId64 " positions in %.1f s\n", d.n_seqs,
            n_pos, (double)(cm_now_ns() - t0) * 1e-9);
    ps = malloc((size_t)n_pos * sizeof(*ps));
    if (!ps || (rc = trainer_init(&T, kn, m, o.heads, o.batch)) < 0) {
        fprintf(stderr, "gorgon-medusa-train: out of memory\n");
        goto out;
    }
    T.freeze_lm = o.freeze_lm;
    /* Held-out = the last sequences (every prompt appears in both parts). */
    const int64_t n_hold_seqs = (int64_t)ceil((double)d.n_seqs * o.holdout);
    int64_t n_train = 0, k_pos = 0;
    for (int64_t s = 0; s < d.n_seqs; s++)
        for (int64_t p = 0; p + 1 < d.n_tok[s]; p++) {
            ps[k_pos++] = (posn){.s = (int32_t)s, .p = (int32_t)p};
            if (s < d.n_seqs - n_hold_seqs)
                n_train++;
        }
    const posn *hold = ps + n_train;
    const int64_t n_hold = n_pos - n_train;
    evaluate(&T, &d, hold, n_hold, "base output matrix, untrained", NULL);
    g_adam = (adam){.lr = o.lr, .wd = o.wd, .b1 = 0.9, .b2 = 0.999};
    g_shuf ^= o.seed * 0x9e3779b97f4a7c15ull;
    int64_t step = 0;
    double acc[MAX_HEADS * ENG_MEDUSA_TOPK] = {0};
    for (int e = 0; e < o.epochs; e++) {
        for (int64_t i = n_train - 1; i > 0; i--) { /* Fisher-Yates over the train part */
            int64_t j = (int64_t)(shuf_next() % (uint64_t)(i + 1));
            posn tmp = ps[i];
            ps[i] = ps[j];
            ps[j] = tmp;
        }
        double loss[MAX_HEADS] = {0};
        int64_t cnt = 0;
        t0 = cm_now_ns();
        for (int64_t i = 0; i < n_train; i += o.batch) {
            const int64_t nb = n_train - i < o.batch ? n_train - i : o.batch;
            step++;
            g_adam.c1 = 1 - pow(g_adam.b1, (double)step);
            g_adam.c2 = 1 - pow(g_adam.b2, (double)step);
            for (int k = 0; k < o.heads; k++) {
                load_batch(&T, &d, ps + i, nb, k);
                loss[k] += head_step(&T, k);
            }
            cnt += nb;
        }
        fprintf(stderr, "epoch %d (%.1f s): mean CE", e + 1, (double)(cm_now_ns() - t0) * 1e-9);
        for (int k = 0; k < o.heads; k++)
            fprintf(stderr, "  head %d %.3f", k, cnt ? loss[k] / (double)cnt : 0.0);
        fprintf(stderr, "\n");
    }
    evaluate(&T, &d, hold, n_hold, "trained", acc);
    if ((rc = write_heads(&T, &o)) < 0) {
        fprintf(stderr, "gorgon-medusa-train: %s\n",
                eng_error()[0] ? eng_error() : cm_strerror(rc));
        goto out;
    }
    fprintf(stderr, "wrote %s/%s and %s/%s\n", o.out, ENG_MEDUSA_HEADS_FILE, o.out,
            ENG_MEDUSA_CONFIG_FILE);
    if ((rc = fit_and_write(kn, m, &T, &d, acc, &o)) < 0) {
        fprintf(stderr, "gorgon-medusa-train: fitting the tree: %s\n",
                eng_error()[0] ? eng_error() : cm_strerror(rc));
        goto out;
    }
    status = 0;
out:
    free(ps);
    trainer_free(&T);
    dataset_free(&d);
    kn_ctx_destroy(kn);
    eng_model_close(m);
    return status;
}
