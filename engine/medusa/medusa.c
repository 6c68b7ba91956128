/* The Medusa decoding step (see medusa.h). Index conventions follow
 * FasterDecoding/Medusa (generate_candidates, tree_decoding,
 * evaluate_posterior, update_inference_inputs) so that traces can be
 * compared with the reference implementation. */
#include "engine/medusa/medusa.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/common.h"
#include "engine/comm/comm.h"
#include "engine/model/eng_err.h"

/* Flattened candidates per sequence, as Medusa's `candidates` before
 * tree_indices picks from it: [root, head0 top-TOPK, head1 top-TOPK, ...]. */
#define CAND_STRIDE(nh) (1 + (int64_t)(nh) * ENG_MEDUSA_TOPK)

struct eng_medusa {
    const eng_model *m;
    kn_ctx *kn;
    const kn_ops *ops;
    const eng_medusa_heads *heads;
    const eng_medusa_tree *t;
    int max_seqs;
    enum eng_medusa_accept accept;
    float temp, eps, alpha;
    int64_t V, H;
    int nn, nh, md; /* tree nodes, heads used, max depth */
    /* Tensor parallelism (cfg.comm): the heads project onto this rank's
     * vocabulary slice [vocab0, vocab0 + vn) of chunk-sized slices; else
     * vn = V, vocab0 = 0, cm NULL. */
    comm *cm;
    int tp, rank;
    int64_t vn, vocab0, chunk;
    int kl;                 /* candidates per head row from this rank: min(kmax, vn) */
    float *topv_h, *topv_d; /* [nh][max_seqs][kl] their logits (tp > 1) */
    eng_cand *tk_all;       /* [tp][nh * max_seqs * kmax] the ranks' lists (tp > 1) */

    /* Head weights as the step uses them (see prepare_heads): every used
     * head's ResBlock stacked into one [nh*H][H] matrix (one weight read
     * for all heads), the vocabulary projections either the base output
     * matrix shared by all heads (one weight read for all heads' rows) or
     * each head's own, converted to the base output's type when that is
     * quantised. */
    enum eng_medusa_proj proj;
    kn_tensor w_cat;    /* [nh*H][H] */
    void *w_cat_data;   /* owned */
    float *b_cat;       /* [nh*H] */
    kn_tensor lm[ENG_MEDUSA_MAX_DEPTH]; /* per head (all = base output when shared) */
    void *lm_data[ENG_MEDUSA_MAX_DEPTH]; /* owned conversions, or NULL */

    /* Per sequence id [max_seqs]. */
    bool *active;
    eng_rng_state *rng;
    float *pend_logits; /* [max_seqs][V] backend: logits at the last emitted token */
    float *pend_hidden; /* [max_seqs][H] backend: its final-norm hidden state */
    int32_t *pend_root; /* [max_seqs] greedy: argmax of pend_logits (the next root) */
    uint32_t *stamp;    /* duplicate detection within one call */
    uint32_t call;
    int prepared; /* sequences of the prepared, not yet finished step */

    /* Step scratch, b = position of a sequence in the batch; _d: backend,
     * the rest host. A step downloads only ids and a few values per node
     * (never a logits row, except typical sampling's root draw). */
    eng_rng_state *rng_save; /* [max_seqs] to undo root draws on error */
    int32_t *seq_h, *seq_d;  /* [max_seqs] the batch's sequence ids */
    float *h_in;             /* [max_seqs][H] pending hidden of the batch */
    float *h_z;              /* [max_seqs][nh*H] W_cat h */
    float *h_mid;            /* [nh][max_seqs][H] h + SiLU(W_i h + b_i), head-major */
    float *h_logits;         /* [nh][max_seqs][vn] heads' logits (this rank's slice) */
    int kmax;                /* candidates the topk op keeps per head row */
    int32_t *top_h, *top_d;  /* [nh][max_seqs][kmax] their ids, best first */
    int32_t *cand;           /* [max_seqs][CAND_STRIDE] */
    int32_t *tok;            /* [max_seqs][nn] tree node tokens */
    int32_t *pos;            /* [max_seqs][nn] RoPE positions len + depth */
    int64_t *len0;           /* [max_seqs] KV length before the step */
    uint8_t *want;           /* [nn] all ones: every node's logits are needed */
    eng_seq_in *in;          /* [max_seqs] */
    float *out_logits;       /* [max_seqs * nn][V] backend */
    float *out_hidden;       /* [max_seqs * nn][H] backend */
    int32_t *node_am, *am_d; /* [max_seqs * nn] greedy: argmax at each node */
    /* typical: per node [max, lse, entropy] of its softmax, and the logit of
     * each node's token at its parent (idx: where that logit is) */
    float *stats_h, *stats_d; /* [max_seqs * nn][3] */
    float *val_h, *val_d;     /* [max_seqs * nn] */
    int64_t *idx_h, *idx_d;   /* [max_seqs * nn] */
    float *row_h;             /* [V] typical: the pending row for the root draw */
};

int64_t eng_medusa_step_tokens(const eng_medusa *md, int n_seqs)
{
    return md && n_seqs > 0 ? (int64_t)n_seqs * md->nn : 0;
}

void eng_medusa_destroy(eng_medusa *md)
{
    if (!md)
        return;
    if (md->kn && !kn_ctx_host_memory(md->kn)) {
        /* device copies from kn_tensor_to_backend: data and packed together */
        if (md->w_cat_data)
            kn_tensor_release(md->kn, &md->w_cat);
        md->w_cat_data = NULL;
        for (int i = 0; i < ENG_MEDUSA_MAX_DEPTH; i++) {
            if (md->lm_data[i])
                kn_tensor_release(md->kn, &md->lm[i]);
            md->lm_data[i] = NULL;
        }
    }
    void *dev[] = {md->pend_logits, md->pend_hidden, md->seq_d,    md->h_in,
                   md->h_z,         md->h_mid,       md->h_logits, md->top_d,
                   md->out_logits,  md->out_hidden,  md->am_d,     md->stats_d,
                   md->val_d,       md->idx_d,       md->b_cat,    md->w_cat_data,
                   md->topv_d};
    for (size_t i = 0; i < sizeof(dev) / sizeof(dev[0]); i++)
        kn_buf_free(md->kn, dev[i]);
    free(md->active);
    free(md->rng);
    free(md->pend_root);
    free(md->stamp);
    free(md->rng_save);
    free(md->seq_h);
    free(md->top_h);
    kn_tensor_unpack(&md->w_cat);
    for (int i = 0; i < ENG_MEDUSA_MAX_DEPTH; i++) {
        if (md->lm_data[i]) /* else lm[i] is borrowed (the model's or the checkpoint's) */
            kn_tensor_unpack(&md->lm[i]);
        kn_buf_free(md->kn, md->lm_data[i]);
    }
    free(md->cand);
    free(md->tok);
    free(md->pos);
    free(md->len0);
    free(md->want);
    free(md->in);
    free(md->node_am);
    free(md->stats_h);
    free(md->val_h);
    free(md->idx_h);
    free(md->row_h);
    free(md->topv_h);
    free(md->tk_all);
    free(md);
}

static void *alloc_n(size_t n, size_t size)
{
    return calloc(n ? n : 1, size);
}

static bool is_quant(enum kn_dtype t)
{
    return t == KN_Q8_0 || t == KN_Q4_0;
}

/* Row r of t (host memory) as floats. */
static void tensor_row(const kn_tensor *t, int64_t r, float *out)
{
    const size_t rb = kn_row_bytes(t->type, t->cols);
    kn_dequantize_row(t->type, (const char *)t->data + (size_t)r * rb, t->cols, out);
}

/* Whether a (host memory) and b (kn's memory: the base model's output,
 * which may be on a device) hold the same values, compared as floats.
 * stage: a host buffer of one row of b's bytes. -errno when b cannot be
 * read. */
static int same_values(kn_ctx *kn, const kn_tensor *a, const kn_tensor *b, float *ra, float *rb,
                       void *stage)
{
    if (a->rows != b->rows || a->cols != b->cols)
        return 0;
    if (a->data == b->data && a->type == b->type)
        return 1;
    const bool host = kn_ctx_host_memory(kn);
    const size_t bb = kn_row_bytes(b->type, b->cols);
    for (int64_t r = 0; r < a->rows; r++) {
        tensor_row(a, r, ra);
        const char *src = (const char *)b->data + (size_t)r * bb;
        if (!host) {
            int rc = kn_buf_download(kn, stage, src, bb);
            if (rc < 0)
                return rc;
            src = stage;
        }
        kn_dequantize_row(b->type, src, b->cols, rb);
        if (memcmp(ra, rb, (size_t)a->cols * sizeof(float)) != 0)
            return 0;
    }
    return 1;
}

/* An owned rows x cols tensor of type t whose row r is row r % src_rows of
 * src[r / src_rows] (several tensors stacked, converted row by row; row is
 * scratch of cols floats). */
static int make_tensor(kn_ctx *kn, kn_tensor *out, void **owned, enum kn_dtype t, int64_t rows,
                       int64_t cols, const kn_tensor *const *src, int64_t src_rows, float *row)
{
    const size_t rb = kn_row_bytes(t, cols), bytes = (size_t)rows * rb;
    char *data = malloc(bytes); /* built on the host, then uploaded once */
    if (!data)
        return -ENOMEM;
    int rc = 0;
    for (int64_t r = 0; r < rows && rc == 0; r++) {
        tensor_row(src[r / src_rows], r % src_rows, row);
        if (kn_quantize_row(t, row, cols, data + (size_t)r * rb) < 0)
            rc = -EINVAL;
    }
    if (rc == 0 && !kn_ctx_host_memory(kn)) {
        /* a device: uploaded (and laid out for its matmul) like the
         * model's own weights; kn_tensor_release frees it */
        kn_tensor dt = {.data = data, .type = t, .rows = rows, .cols = cols};
        rc = kn_tensor_to_backend(kn, &dt);
        free(data);
        if (rc == 0) {
            *owned = (void *)dt.data;
            *out = dt;
        }
        return rc;
    }
    void *dev = NULL;
    if (rc == 0 && (rc = kn_buf_alloc(kn, bytes, &dev)) == 0)
        rc = kn_buf_upload(kn, dev, data, bytes);
    free(data);
    if (rc < 0) {
        kn_buf_free(kn, dev);
        return rc;
    }
    *owned = dev;
    *out = (kn_tensor){.data = dev, .type = t, .rows = rows, .cols = cols};
    return kn_tensor_pack(out); /* like the model's own weights */
}

/* The step's view of the heads (see struct eng_medusa). A quantised base
 * model is memory-bound, so heads in F32 would read several times its own
 * output matrix per step: they are converted to the base output's type
 * (what the candidates are drawn from changes a little; what is accepted
 * never does, the verification being exact). */
static int prepare_heads(eng_medusa *md)
{
    const kn_tensor *out = eng_model_output(md->m); /* under TP: this rank's slice */
    const int64_t H = md->H, vn = md->vn;
    const bool q = is_quant(out->type) && H % KN_QK == 0;
    const enum kn_dtype wt = q ? out->type : KN_F32;
    float *ra = malloc((size_t)H * sizeof(float)), *rb = malloc((size_t)H * sizeof(float));
    void *stage = malloc(kn_row_bytes(out->type, H) + 1);
    const size_t bias_bytes = (size_t)md->nh * (size_t)H * sizeof(float);
    int rc = ra && rb && stage ? kn_buf_alloc(md->kn, bias_bytes, (void **)&md->b_cat) : -ENOMEM;
    const kn_tensor *src[ENG_MEDUSA_MAX_DEPTH];
    kn_tensor proj[ENG_MEDUSA_MAX_DEPTH]; /* each head's projection rows of this rank */
    bool shared = true;
    for (int i = 0; i < md->nh && rc == 0; i++) {
        const eng_medusa_head *hd = eng_medusa_heads_get(md->heads, i);
        src[i] = &hd->w;
        proj[i] = hd->lm_head;
        proj[i].data = (const char *)hd->lm_head.data +
                       (size_t)md->vocab0 * kn_row_bytes(hd->lm_head.type, H);
        proj[i].rows = vn;
        rc = kn_buf_upload(md->kn, md->b_cat + (size_t)i * (size_t)H, hd->bias,
                           (size_t)H * sizeof(float));
        if (rc == 0 && shared) {
            int same = same_values(md->kn, &proj[i], out, ra, rb, stage);
            if (same < 0)
                rc = same;
            shared = same == 1;
        }
    }
    if (rc == 0)
        rc = make_tensor(md->kn, &md->w_cat, &md->w_cat_data, wt, md->nh * H, H, src, H, ra);
    md->proj = shared ? ENG_MEDUSA_PROJ_SHARED
                      : q ? ENG_MEDUSA_PROJ_QUANTIZED : ENG_MEDUSA_PROJ_HEADS;
    for (int i = 0; i < md->nh && rc == 0; i++) {
        if (shared) {
            md->lm[i] = *out;
        } else if (q || !kn_ctx_host_memory(md->kn)) {
            /* quantised like the base output, or (a device) a copy of the
             * heads' own, which live on the host */
            const kn_tensor *one = &proj[i];
            rc = make_tensor(md->kn, &md->lm[i], &md->lm_data[i], wt, vn, H, &one, vn, ra);
        } else {
            md->lm[i] = proj[i];
        }
    }
    free(ra);
    free(rb);
    free(stage);
    return rc;
}

int eng_medusa_create(eng_medusa **out, const eng_medusa_cfg *cfg)
{
    if (!out || !cfg || !cfg->model || !cfg->kn || !cfg->heads || !cfg->tree)
        return eng_fail(-EINVAL, "medusa: model, kernels ctx, heads and tree are required");
    const eng_hparams *hp = eng_model_hparams(cfg->model);
    const eng_medusa_tree *t = cfg->tree;
    if (cfg->max_seqs < 1)
        return eng_fail(-EINVAL, "medusa: max_seqs must be >= 1 (got %d)", cfg->max_seqs);
    if (t->n_nodes < 1 || t->max_depth < 1 || t->max_depth > ENG_MEDUSA_MAX_DEPTH)
        return eng_fail(-EINVAL, "medusa: malformed tree (%d nodes, depth %d)", t->n_nodes,
                        t->max_depth);
    int n_heads = eng_medusa_heads_count(cfg->heads);
    if (n_heads < t->n_heads)
        return eng_fail(-EINVAL, "medusa: the tree is %d deep and needs %d heads, the "
                                 "checkpoint has %d",
                        t->max_depth, t->n_heads, n_heads);
    if (eng_medusa_heads_hidden(cfg->heads) != hp->dim ||
        eng_medusa_heads_vocab(cfg->heads) != hp->n_vocab)
        return eng_fail(-EINVAL, "medusa: heads are for hidden %" PRId64 " / vocabulary %" PRId64
                                 ", the model has %" PRId64 " / %" PRId64,
                        eng_medusa_heads_hidden(cfg->heads), eng_medusa_heads_vocab(cfg->heads),
                        hp->dim, hp->n_vocab);
    if (cfg->accept != ENG_MEDUSA_GREEDY && cfg->accept != ENG_MEDUSA_TYPICAL)
        return eng_fail(-EINVAL, "medusa: unknown acceptance mode %d", (int)cfg->accept);
    float temp = cfg->temperature == 0 ? 1.0f : cfg->temperature;
    float eps = cfg->eps == 0 ? ENG_MEDUSA_EPS_DEFAULT : cfg->eps;
    float alpha = cfg->alpha == 0 ? ENG_MEDUSA_ALPHA_DEFAULT : cfg->alpha;
    if (!(temp > 0 && temp <= 100) || !(eps > 0 && eps <= 1) || !(alpha > 0 && alpha <= 1))
        return eng_fail(-EINVAL, "medusa: typical acceptance needs temperature in (0, 100], "
                                 "eps and alpha in (0, 1] (got %g, %g, %g)",
                        (double)temp, (double)eps, (double)alpha);

    eng_medusa *md = calloc(1, sizeof(*md));
    if (!md)
        return eng_fail(-ENOMEM, "out of memory");
    md->m = cfg->model;
    md->kn = cfg->kn;
    md->ops = kn_ctx_ops(cfg->kn);
    md->heads = cfg->heads;
    md->t = t;
    md->max_seqs = cfg->max_seqs;
    md->accept = cfg->accept;
    md->temp = temp;
    md->eps = eps;
    md->alpha = alpha;
    md->V = hp->n_vocab;
    md->H = hp->dim;
    md->nn = t->n_nodes;
    md->nh = t->n_heads;
    md->md = t->max_depth;
    int rank = 0, tp = eng_model_tp(cfg->model, &rank);
    if (tp > 1 && (!cfg->comm || comm_size(cfg->comm) != tp || comm_rank(cfg->comm) != rank)) {
        free(md);
        return eng_fail(-EINVAL, "medusa: the model is rank %d of %d tensor-parallel ranks; "
                                 "the decoder needs that rank of a communicator of %d",
                        rank, tp, tp);
    }
    md->cm = tp > 1 ? cfg->comm : NULL;
    md->tp = tp;
    md->rank = rank;
    md->vn = eng_model_vocab_slice(cfg->model, &md->vocab0, &md->chunk);

    const size_t S = (size_t)cfg->max_seqs, V = (size_t)md->V, H = (size_t)md->H;
    const size_t NN = (size_t)md->nn, NH = (size_t)md->nh, fs = sizeof(float);
    md->kmax = 1;
    for (int h = 0; h < md->nh; h++)
        md->kmax = t->topk[h] > md->kmax ? t->topk[h] : md->kmax;
    if (md->kmax > md->V)
        md->kmax = (int)md->V;
    md->kl = md->kmax < md->vn ? md->kmax : (int)md->vn;
    const size_t K = (size_t)md->kmax, VN = (size_t)md->vn;
    if (md->cm) {
        md->topv_h = alloc_n(NH * S * (size_t)md->kl, fs);
        md->tk_all = alloc_n((size_t)tp * NH * S * K, sizeof(eng_cand));
    }
    md->active = alloc_n(S, sizeof(bool));
    md->rng = alloc_n(S, sizeof(eng_rng_state));
    md->pend_root = alloc_n(S, sizeof(int32_t));
    md->stamp = alloc_n(S, sizeof(uint32_t));
    md->rng_save = alloc_n(S, sizeof(eng_rng_state));
    md->seq_h = alloc_n(S, sizeof(int32_t));
    md->top_h = alloc_n(NH * S * K, sizeof(int32_t));
    md->cand = alloc_n(S * (size_t)CAND_STRIDE(md->nh), sizeof(int32_t));
    md->tok = alloc_n(S * NN, sizeof(int32_t));
    md->pos = alloc_n(S * NN, sizeof(int32_t));
    md->len0 = alloc_n(S, sizeof(int64_t));
    md->want = alloc_n(NN, 1);
    md->in = alloc_n(S, sizeof(eng_seq_in));
    md->node_am = alloc_n(S * NN, sizeof(int32_t));
    md->stats_h = alloc_n(S * NN * 3, fs);
    md->val_h = alloc_n(S * NN, fs);
    md->idx_h = alloc_n(S * NN, sizeof(int64_t));
    md->row_h = alloc_n(V, fs);
    int rc = 0;
    struct {
        void **p;
        size_t bytes;
    } dev[] = {
        {(void **)&md->pend_logits, S * V * fs},
        {(void **)&md->pend_hidden, S * H * fs},
        {(void **)&md->seq_d, S * sizeof(int32_t)},
        {(void **)&md->h_in, S * H * fs},
        {(void **)&md->h_z, S * NH * H * fs},
        {(void **)&md->h_mid, S * NH * H * fs},
        {(void **)&md->h_logits, S * NH * VN * fs},
        {(void **)&md->top_d, NH * S * K * sizeof(int32_t)},
        {(void **)&md->out_logits, S * NN * V * fs},
        {(void **)&md->out_hidden, S * NN * H * fs},
        {(void **)&md->am_d, S * NN * sizeof(int32_t)},
        {(void **)&md->stats_d, S * NN * 3 * fs},
        {(void **)&md->val_d, S * NN * fs},
        {(void **)&md->idx_d, S * NN * sizeof(int64_t)},
    };
    for (size_t i = 0; i < sizeof(dev) / sizeof(dev[0]) && rc == 0; i++)
        rc = kn_buf_alloc(md->kn, dev[i].bytes, dev[i].p);
    if (rc == 0 && md->cm)
        rc = kn_buf_alloc(md->kn, NH * S * (size_t)md->kl * fs, (void **)&md->topv_d);
    if (rc < 0 || (md->cm && (!md->topv_h || !md->tk_all)) || !md->active || !md->rng || !md->pend_root || !md->stamp || !md->rng_save ||
        !md->seq_h || !md->top_h || !md->cand || !md->tok || !md->pos ||
        !md->len0 || !md->want || !md->in || !md->node_am || !md->stats_h || !md->val_h ||
        !md->idx_h || !md->row_h) {
        eng_medusa_destroy(md);
        return eng_fail(-ENOMEM, "medusa: out of memory for %d sequences x %d tree nodes",
                        cfg->max_seqs, md->nn);
    }
    memset(md->want, 1, NN);
    rc = prepare_heads(md);
    if (rc < 0) {
        eng_medusa_destroy(md);
        return eng_fail(rc, "medusa: preparing the heads: %s", cm_strerror(rc));
    }
    *out = md;
    return 0;
}

/* Sequence seq's pending logits and hidden state := the given rows
 * (backend to backend). */
static int set_pending(eng_medusa *md, int seq, const float *logits, const float *hidden)
{
    int rc = kn_buf_copy(md->kn, md->pend_logits + (size_t)seq * (size_t)md->V, logits,
                         (size_t)md->V * sizeof(float));
    if (rc == 0)
        rc = kn_buf_copy(md->kn, md->pend_hidden + (size_t)seq * (size_t)md->H, hidden,
                         (size_t)md->H * sizeof(float));
    return rc;
}

int eng_medusa_seq_begin(eng_medusa *md, int seq, const float *logits, const float *hidden,
                         uint64_t seed)
{
    if (!md || !logits || !hidden)
        return eng_fail(-EINVAL, "medusa: seq_begin: NULL argument");
    if (seq < 0 || seq >= md->max_seqs)
        return eng_fail(-EINVAL, "medusa: sequence %d outside 0..%d", seq, md->max_seqs - 1);
    int rc = set_pending(md, seq, logits, hidden);
    if (rc == 0 && md->accept == ENG_MEDUSA_GREEDY) {
        /* the root of the next step, as finish leaves it */
        if ((rc = md->ops->argmax(md->kn, logits, 1, md->V, md->am_d)) == 0)
            rc = kn_buf_download(md->kn, &md->pend_root[seq], md->am_d, sizeof(int32_t));
    }
    if (rc < 0)
        return eng_fail(rc, "medusa: seq_begin: backend: %s", cm_strerror(rc));
    eng_rng_seed(&md->rng[seq], ENG_RNG_XOSHIRO, seed);
    md->active[seq] = true;
    return 0;
}

int32_t eng_medusa_seq_root(const eng_medusa *md, int seq)
{
    if (!md || seq < 0 || seq >= md->max_seqs || !md->active[seq] ||
        md->accept != ENG_MEDUSA_GREEDY)
        return -EINVAL;
    return md->pend_root[seq];
}

void eng_medusa_seq_end(eng_medusa *md, int seq)
{
    if (md && seq >= 0 && seq < md->max_seqs)
        md->active[seq] = false;
}

const float *eng_medusa_seq_logits(const eng_medusa *md, int seq)
{
    if (!md || seq < 0 || seq >= md->max_seqs || !md->active[seq])
        return NULL;
    return md->pend_logits + (size_t)seq * (size_t)md->V;
}

const float *eng_medusa_seq_hidden(const eng_medusa *md, int seq)
{
    if (!md || seq < 0 || seq >= md->max_seqs || !md->active[seq])
        return NULL;
    return md->pend_hidden + (size_t)seq * (size_t)md->H;
}

enum eng_medusa_proj eng_medusa_projection(const eng_medusa *md)
{
    return md ? md->proj : ENG_MEDUSA_PROJ_HEADS;
}

float eng_medusa_typical_threshold(const float stats[3], float eps, float alpha)
{
    /* the threshold of Medusa's evaluate_posterior: min(eps, alpha·exp(−H)) */
    return fminf(eps, (float)((double)alpha * exp(-(double)stats[2])));
}

/* Medusa's get_typical_one_token: drop tokens with p < threshold, renormalise,
 * draw. The argmax always survives (threshold <= alpha·exp(-H) < p_max).
 * logits: the row on the host; st: its softmax_stats. */
static int32_t sample_typical(const eng_medusa *md, const float *logits, const float st[3],
                              eng_rng_state *rng)
{
    const double lse = (double)st[1];
    const float thr = eng_medusa_typical_threshold(st, md->eps, md->alpha);
    const double inv = 1.0 / (double)md->temp;
    double kept = 0;
    int32_t last = eng_argmax(logits, md->V);
    for (int64_t i = 0; i < md->V; i++) {
        double p = exp((double)logits[i] * inv - lse);
        if (!(p < thr))
            kept += p;
    }
    const double u = (double)eng_rng_f32(rng) * kept;
    double cdf = 0;
    for (int64_t i = 0; i < md->V; i++) {
        double p = exp((double)logits[i] * inv - lse);
        if (p < thr)
            continue;
        cdf += p;
        last = (int32_t)i;
        if (u < cdf)
            break;
    }
    return last;
}

#define OP(what, call) ENG_OP("medusa", what, call)

/* Every head on the batch's pending hidden states (seq_d, uploaded) →
 * top-k candidates; only the candidates' ids come back. */
/* Is a before b in the topk op's order (larger first, lower id on ties)? */
static bool cand_before(const eng_cand *a, const eng_cand *b)
{
    return a->p > b->p || (a->p == b->p && a->id < b->id);
}

/* Tensor parallelism: top_h/topv_h hold this rank's best kl of each of the
 * rows head rows ([rows][kl], ids within its slice). Gather every rank's
 * list and leave in top_h ([rows][kmax]) the whole vocabulary's best kmax
 * of each row: each list is in the topk op's order, so merging them gives
 * exactly the order the op gives over the whole row. */
static int merge_ranks(eng_medusa *md, int64_t rows)
{
    const int K = md->kmax, KL = md->kl;
    const size_t block = (size_t)rows * (size_t)K;
    eng_cand *mine = md->tk_all + (size_t)md->rank * block;
    for (int64_t r = 0; r < rows; r++)
        for (int j = 0; j < KL; j++)
            mine[r * K + j] = (eng_cand){.p = md->topv_h[r * KL + j],
                                         .id = md->top_h[r * KL + j] + (int32_t)md->vocab0};
    int rc = comm_all_gather(md->cm, mine, md->tk_all, block * sizeof(eng_cand));
    if (rc < 0)
        return eng_fail(rc, "medusa: gathering the heads' candidates failed: %s",
                        comm_last_error(md->cm));
    int64_t len[COMM_SHM_MAX_RANKS];
    for (int q = 0; q < md->tp; q++) {
        const int64_t vq = md->V - q * md->chunk < md->chunk ? md->V - q * md->chunk : md->chunk;
        len[q] = K < vq ? K : vq;
    }
    for (int64_t r = 0; r < rows; r++) {
        int64_t at[COMM_SHM_MAX_RANKS] = {0};
        for (int j = 0; j < K; j++) {
            int best = -1;
            for (int q = 0; q < md->tp; q++)
                if (at[q] < len[q] &&
                    (best < 0 || cand_before(md->tk_all + (size_t)q * block + r * K + at[q],
                                             md->tk_all + (size_t)best * block + r * K + at[best])))
                    best = q;
            CM_ASSERT(best >= 0); /* kmax <= n_vocab: the slices hold enough */
            md->top_h[r * K + j] = md->tk_all[(size_t)best * block + r * K + at[best]++].id;
        }
    }
    return 0;
}

static int run_heads(eng_medusa *md, int n)
{
    const int64_t H = md->H, vn = md->vn, stride = CAND_STRIDE(md->nh), NH = md->nh;
    const int K = md->kmax, KL = md->kl;
    kn_ctx *kn = md->kn;
    const kn_tensor pend = {.data = md->pend_hidden, .type = KN_F32, .rows = md->max_seqs,
                            .cols = H};
    OP("get_rows (pending hidden)", md->ops->get_rows(kn, &pend, md->seq_d, n, md->h_in));
    /* z[b] = W_cat h[b]: all heads' ResBlocks in one product */
    OP("matmul (W_cat)", md->ops->matmul(kn, &md->w_cat, md->h_in, n, md->h_z));
    OP("silu_res", md->ops->silu_res(kn, md->h_in, md->h_z, md->b_cat, n, NH, H, md->h_mid));
    /* logits over this rank's vocabulary slice (all of it without TP) */
    if (md->proj == ENG_MEDUSA_PROJ_SHARED) {
        OP("matmul (shared projection)",
           md->ops->matmul(kn, &md->lm[0], md->h_mid, NH * n, md->h_logits));
    } else {
        for (int h = 0; h < md->nh; h++)
            OP("matmul (head projection)",
               md->ops->matmul(kn, &md->lm[h], md->h_mid + (size_t)h * (size_t)n * (size_t)H, n,
                               md->h_logits + (size_t)h * (size_t)n * (size_t)vn));
    }
    OP("topk", md->ops->topk(kn, md->h_logits, NH * n, vn, KL, md->cm ? md->topv_d : NULL,
                             md->top_d));
    OP("download (candidates)", kn_buf_download(kn, md->top_h, md->top_d,
                                                (size_t)(NH * n * KL) * sizeof(int32_t)));
    if (md->cm) {
        OP("download (candidate logits)",
           kn_buf_download(kn, md->topv_h, md->topv_d, (size_t)(NH * n * KL) * sizeof(float)));
        CM_TRY(merge_ranks(md, NH * n));
    }
    /* the best k of a row are the first k of its best kmax */
    for (int h = 0; h < md->nh; h++) {
        const int k = md->t->topk[h] < K ? md->t->topk[h] : K;
        for (int b = 0; b < n; b++)
            memcpy(md->cand + b * stride + 1 + (int64_t)h * ENG_MEDUSA_TOPK,
                   md->top_h + ((size_t)h * (size_t)n + (size_t)b) * (size_t)K,
                   (size_t)k * sizeof(int32_t));
    }
    return 0;
}

/* What acceptance needs of every tree row (b < n, node < nn), computed on
 * the backend; only ids or a few values per node come back. Greedy: the
 * argmax of each row. Typical: each row's softmax statistics and the logit
 * of each node's token at its parent. */
static int node_stats(eng_medusa *md, int n, const float *logits)
{
    const eng_medusa_tree *t = md->t;
    const int64_t rows = (int64_t)n * md->nn, V = md->V;
    kn_ctx *kn = md->kn;
    if (md->accept == ENG_MEDUSA_GREEDY) {
        OP("argmax (tree rows)", md->ops->argmax(kn, logits, rows, V, md->am_d));
        OP("download (tree argmax)",
           kn_buf_download(kn, md->node_am, md->am_d, (size_t)rows * sizeof(int32_t)));
        return 0;
    }
    OP("softmax_stats (tree rows)",
       md->ops->softmax_stats(kn, logits, rows, V, md->temp, md->stats_d));
    int64_t n_idx = 0;
    for (int b = 0; b < n; b++)
        for (int j = 1; j < md->nn; j++) {
            const int64_t par = (int64_t)b * md->nn + t->parent[j];
            md->idx_h[n_idx++] = par * V + md->tok[(size_t)b * (size_t)md->nn + (size_t)j];
        }
    OP("download (tree softmax)",
       kn_buf_download(kn, md->stats_h, md->stats_d, (size_t)rows * 3 * sizeof(float)));
    if (n_idx > 0) {
        OP("upload (token logits)",
           kn_buf_upload(kn, md->idx_d, md->idx_h, (size_t)n_idx * sizeof(int64_t)));
        OP("gather (token logits)", md->ops->gather(kn, logits, md->idx_d, n_idx, md->val_d));
        OP("download (token logits)",
           kn_buf_download(kn, md->val_h, md->val_d, (size_t)n_idx * sizeof(float)));
    }
    return 0;
}

/* Best retrieve path for batch entry b (node_stats done): fills path[0..len]
 * (node indices, path[0] = root) and returns len (accepted candidates). */
static int accept_path(const eng_medusa *md, int b, int32_t path[ENG_MEDUSA_MAX_DEPTH + 1])
{
    const eng_medusa_tree *t = md->t;
    const int nn = md->nn;
    const int32_t *tok = md->tok + (size_t)b * (size_t)nn;
    const int32_t *am = md->node_am + (size_t)b * (size_t)nn;
    const float *st = md->stats_h + (size_t)b * (size_t)nn * 3;
    const float *val = md->val_h + (size_t)b * (size_t)(nn - 1); /* node j at val[j - 1] */
    const bool greedy = md->accept == ENG_MEDUSA_GREEDY;
    const double inv = 1.0 / (double)md->temp;
    const int cols = t->max_depth + 1;
    int best_len = 0, best_row = -1;
    double best_ll = -INFINITY;
    for (int r = 0; r < t->n_leaves; r++) {
        const int32_t *rp = t->retrieve + (size_t)r * (size_t)cols;
        int len = 0;
        double ll = 0;
        for (int d = 1; d < cols && rp[d] >= 0; d++) {
            const int32_t par = rp[d - 1], node = rp[d];
            if (greedy) {
                if (tok[node] != am[par])
                    break;
            } else {
                const float thr = eng_medusa_typical_threshold(st + par * 3, md->eps, md->alpha);
                double p = exp((double)val[node - 1] * inv - (double)st[par * 3 + 1]);
                if (!(p > (double)thr))
                    break;
                ll += log(p);
            }
            len++;
        }
        if (len > best_len || (len == best_len && len > 0 && !greedy && ll > best_ll)) {
            best_len = len;
            best_row = r;
            best_ll = ll;
        }
    }
    path[0] = 0;
    for (int d = 1; d <= best_len; d++)
        path[d] = t->retrieve[(size_t)best_row * (size_t)cols + (size_t)d];
    return best_len;
}

/* Checks the batch and records each sequence's KV length (len0). */
static int check_batch(eng_medusa *md, const eng_kv *kv, const int *seqs, int n_seqs)
{
    if (n_seqs < 1 || n_seqs > md->max_seqs)
        return eng_fail(-EINVAL, "medusa: step over %d sequences (1 to %d)", n_seqs,
                        md->max_seqs);
    if (++md->call == 0) { /* stamps wrapped: forget old ones */
        memset(md->stamp, 0, (size_t)md->max_seqs * sizeof(uint32_t));
        md->call = 1;
    }
    for (int b = 0; b < n_seqs; b++) {
        const int s = seqs[b];
        if (s < 0 || s >= md->max_seqs || !md->active[s])
            return eng_fail(-EINVAL, "medusa: step: sequence %d was not started "
                                     "(eng_medusa_seq_begin)",
                            s);
        if (md->stamp[s] == md->call)
            return eng_fail(-EINVAL, "medusa: step: sequence %d listed twice", s);
        md->stamp[s] = md->call;
        const int64_t len = eng_kv_seq_len(kv, s);
        if (len < 0)
            return eng_fail(-EINVAL, "medusa: step: KV sequence %d is not allocated", s);
        if (len + md->nn > INT32_MAX)
            return eng_fail(-EINVAL, "medusa: step: sequence %d is too long for a tree", s);
        md->len0[b] = len;
    }
    return 0;
}

/* Undo the root draws of the first n sequences of a prepare. */
static void restore_rng(eng_medusa *md, const int *seqs, int n)
{
    for (int b = 0; b < n; b++)
        md->rng[seqs[b]] = md->rng_save[b];
}

int64_t eng_medusa_step_prepare(eng_medusa *md, const eng_kv *kv, const int *seqs, int n_seqs,
                                eng_seq_in *in)
{
    if (!md || !kv || !seqs || !in)
        return eng_fail(-EINVAL, "medusa: step: NULL argument");
    int rc = check_batch(md, kv, seqs, n_seqs);
    if (rc < 0)
        return rc;
    const eng_medusa_tree *t = md->t;
    const int64_t V = md->V, stride = CAND_STRIDE(md->nh);
    const int nn = md->nn;
    /* 1. roots (RNG state saved so that an aborted step changes nothing):
     * greedy knows its root since the last step; typical draws it from the
     * pending row (a sampler needs the whole distribution) */
    for (int b = 0; b < n_seqs; b++) {
        const int s = seqs[b];
        md->rng_save[b] = md->rng[s];
        md->seq_h[b] = s;
        if (md->accept == ENG_MEDUSA_GREEDY) {
            md->cand[b * stride] = md->pend_root[s];
            continue;
        }
        const float *pl = md->pend_logits + (size_t)s * (size_t)V;
        float st[3];
        if ((rc = md->ops->softmax_stats(md->kn, pl, 1, V, md->temp, md->stats_d)) < 0 ||
            (rc = kn_buf_download(md->kn, st, md->stats_d, sizeof(st))) < 0 ||
            (rc = kn_buf_download(md->kn, md->row_h, pl, (size_t)V * sizeof(float))) < 0) {
            restore_rng(md, seqs, b);
            return eng_fail(rc, "medusa: the pending row on the backend: %s", cm_strerror(rc));
        }
        md->cand[b * stride] = sample_typical(md, md->row_h, st, &md->rng[s]);
    }
    /* 2. heads → candidates → tree tokens */
    if ((rc = kn_buf_upload(md->kn, md->seq_d, md->seq_h, (size_t)n_seqs * sizeof(int32_t))) < 0 ||
        (rc = run_heads(md, n_seqs)) < 0) {
        restore_rng(md, seqs, n_seqs);
        return eng_fail(rc, "medusa: running the heads: %s", eng_error());
    }
    for (int b = 0; b < n_seqs; b++) {
        int32_t *tok = md->tok + (size_t)b * (size_t)nn, *pos = md->pos + (size_t)b * (size_t)nn;
        for (int j = 0; j < nn; j++) {
            tok[j] = md->cand[b * stride + t->tree_indices[j]];
            pos[j] = (int32_t)(md->len0[b] + t->depth[j]);
        }
        in[b] = (eng_seq_in){.seq = seqs[b],
                             .tokens = tok,
                             .n_tokens = nn,
                             .pos = pos,
                             .mask = t->mask,
                             .want = md->want};
    }
    md->prepared = n_seqs;
    return (int64_t)n_seqs * nn;
}

void eng_medusa_step_abort(eng_medusa *md, const int *seqs, int n_seqs)
{
    if (!md || !seqs || n_seqs != md->prepared)
        return;
    restore_rng(md, seqs, n_seqs);
    md->prepared = 0;
}

int64_t eng_medusa_step_finish(eng_medusa *md, eng_kv *kv, const int *seqs, int n_seqs,
                               const float *logits, const float *hidden,
                               eng_medusa_result *res)
{
    if (!md || !kv || !seqs || !logits || !hidden || !res)
        return eng_fail(-EINVAL, "medusa: step: NULL argument");
    if (n_seqs < 1 || n_seqs != md->prepared)
        return eng_fail(-EINVAL, "medusa: finish of %d sequences after a prepare of %d",
                        n_seqs, md->prepared);
    const int64_t V = md->V, H = md->H;
    const int nn = md->nn;
    int rc = node_stats(md, n_seqs, logits);
    if (rc < 0) { /* as if the step had not run: drop the trees' KV too */
        for (int b = 0; b < n_seqs; b++)
            eng_kv_seq_truncate(kv, seqs[b], md->len0[b]);
        eng_medusa_step_abort(md, seqs, n_seqs);
        return rc;
    }
    md->prepared = 0;
    /* 4. acceptance, 5. compaction; past this only the backend (an engine
     * bug) can fail */
    int64_t total = 0;
    for (int b = 0; b < n_seqs; b++) {
        const int s = seqs[b];
        int32_t path[ENG_MEDUSA_MAX_DEPTH + 1];
        const int acc = accept_path(md, b, path);
        const int32_t *tok = md->tok + (size_t)b * (size_t)nn;
        eng_medusa_result *r = &res[b];
        r->n_accepted = acc;
        r->n_tokens = acc + 1;
        for (int d = 0; d <= acc; d++)
            r->tokens[d] = tok[path[d]];
        /* Node indices grow with depth (path[d] >= d), so no destination is
         * a later source: eng_kv_copy_positions' in-place rule holds. */
        int32_t src[ENG_MEDUSA_MAX_DEPTH], dst[ENG_MEDUSA_MAX_DEPTH];
        int64_t n_mv = 0;
        for (int d = 1; d <= acc; d++) {
            if (path[d] == d)
                continue;
            src[n_mv] = (int32_t)(md->len0[b] + path[d]);
            dst[n_mv] = (int32_t)(md->len0[b] + d);
            n_mv++;
        }
        if (n_mv && (rc = eng_kv_copy_positions(kv, s, src, dst, n_mv)) < 0)
            return rc;
        rc = eng_kv_seq_truncate(kv, s, md->len0[b] + 1 + acc);
        CM_ASSERT(rc == 0);
        const size_t row = (size_t)b * (size_t)nn + (size_t)path[acc];
        if ((rc = set_pending(md, s, logits + row * (size_t)V, hidden + row * (size_t)H)) < 0)
            return eng_fail(rc, "medusa: keeping the accepted row: %s", cm_strerror(rc));
        md->pend_root[s] = md->node_am[row]; /* greedy: the next root */
        total += r->n_tokens;
    }
    return total;
}

int64_t eng_medusa_step(eng_medusa *md, eng_ctx *c, eng_kv *kv, const int *seqs, int n_seqs,
                        eng_medusa_result *res)
{
    if (!md || !c || !kv || !seqs || !res)
        return eng_fail(-EINVAL, "medusa: step: NULL argument");
    int64_t n_tok = eng_medusa_step_prepare(md, kv, seqs, n_seqs, md->in);
    if (n_tok < 0)
        return n_tok;
    /* 3. one forward over every tree */
    int64_t n_out = eng_forward(c, kv, md->in, n_seqs, md->out_logits, md->out_hidden);
    if (n_out < 0) {
        eng_medusa_step_abort(md, seqs, n_seqs);
        return n_out;
    }
    CM_ASSERT(n_out == n_tok);
    return eng_medusa_step_finish(md, kv, seqs, n_seqs, md->out_logits, md->out_hidden, res);
}
