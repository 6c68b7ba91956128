/* The batched forward pass: every new token of every sequence in one M × dim
 * activation matrix, so each weight matrix is streamed once per call. */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/common.h"
#include "engine/model/eng_err.h"
#include "engine/engine.h"
#include "engine/comm/comm.h"
#include "engine/model_int.h"
#include "engine/sampler.h"

struct eng_ctx {
    const eng_model *m;
    kn_ctx *kn;
    const kn_ops *ops;
    int64_t max_tokens, max_outputs, max_ctx;
    size_t mask_cap;      /* bytes of the mask area of the plan */
    size_t mask_cap_used; /* of which this forward's masks use */

    /* Activations in backend memory, M = max_tokens rows (shapes per row): */
    float *x;    /* [M][dim]  residual stream */
    float *xb;   /* [M][dim]  normed input / Wo and Wdown outputs */
    /* q [M][n_head*hd], then k and v [M][n_kv_head*hd] each, packed for the
     * M of the call: with M == 1 the q and k rows are adjacent and RoPE runs
     * as one op over n_head + n_kv_head heads (one pool round trip less). */
    float *qkv;
    float *att;  /* [M][n_head*hd] attention output */
    float *hb;   /* [M][ffn] gate, then silu(gate)*up */
    float *hb2;  /* [M][ffn] up */
    float *hsel; /* [O][dim] output rows, final-normed */
    float *attn_scratch;
    /* Tensor parallelism (comm != NULL): each rank's logits of a call,
     * [tp][O][vocab_chunk] (rank r's [n_out][its rows] at the start of its
     * block), gathered in place. */
    comm *comm;
    float *lg_all;
    int32_t *ids_d; /* [O] argmax ids (eng_forward_greedy) */
    struct tp_pair {
        float v;
        int32_t id;
    } *pairs; /* host, tp > 1: [tp][O] each rank's (max, id) per row */
    /* eng_forward_topk's host scratch, grown on first use: this rank's
     * rows, and every rank's candidates [tp][O][kmax] */
    float *tk_rows;
    size_t tk_rows_cap;
    eng_cand *tk_all;
    size_t tk_all_cap;

    /* The step plan: built on the host, uploaded in one copy before the
     * ops that read it. int32 words: tok [M], pos [M] (RoPE), slot [M] (KV
     * pool slot of each new row), out_rows [O]; then mask_cap bytes of the
     * batch's distinct tree masks. */
    int32_t *plan;   /* host */
    int32_t *plan_d; /* backend */
    int32_t *tok, *pos, *slot, *out_rows; /* into plan (host) */
    uint8_t *masks;                        /* into plan (host) */
    const uint8_t **mask_d;                /* [M] per sequence: its mask in plan_d, or NULL */
    /* per sequence of the batch (at most M of them) */
    int *seq_id;
    int64_t *seq_n, *seq_past, *seq_row;
};

/* The plan holds M * min(M, ENG_MASK_ROW_MAX) bytes of masks: Σ n_s² over
 * the batch's distinct masks fits whenever no masked sequence has more than
 * ENG_MASK_ROW_MAX tokens (Medusa's tree, shared by every sequence, is
 * uploaded once). */
#define ENG_MASK_ROW_MAX 1024

static size_t plan_words(const eng_ctx *c)
{
    return 3 * (size_t)c->max_tokens + (size_t)c->max_outputs;
}

static size_t plan_bytes(const eng_ctx *c)
{
    return plan_words(c) * sizeof(int32_t) + c->mask_cap;
}

int eng_ctx_create(eng_ctx **out, const eng_model *m, const eng_ctx_cfg *cfg)
{
    *out = NULL;
    if (!cfg->kn || cfg->max_tokens <= 0 || cfg->max_outputs < 0 || cfg->max_ctx < 0)
        return eng_fail(-EINVAL, "forward: ctx needs a kernels ctx and max_tokens > 0");
    const eng_hparams *hp = &m->lhp; /* this rank's shard */
    int rank, tp = eng_model_tp(m, &rank);
    if (tp > 1 && (!cfg->comm || comm_size(cfg->comm) != tp || comm_rank(cfg->comm) != rank))
        return eng_fail(-EINVAL, "forward: the model is rank %d of %d tensor-parallel ranks; the "
                                 "ctx needs that rank of a communicator of %d",
                        rank, tp, tp);
    if ((!kn_ctx_host_memory(cfg->kn) || (m->dev && !kn_ctx_host_memory(m->dev))) &&
        m->dev != cfg->kn)
        return eng_fail(-EINVAL, "forward: the model's weights are not on %s (call "
                                 "eng_model_to_device first)",
                        kn_ctx_device(cfg->kn));
    if (tp == 1 && cfg->comm && comm_size(cfg->comm) != 1)
        return eng_fail(-EINVAL, "forward: a communicator of %d ranks for a model that is not "
                                 "sharded (open it with eng_model_open_tp)",
                        comm_size(cfg->comm));
    eng_ctx *c = calloc(1, sizeof(*c));
    if (!c)
        return -ENOMEM;
    c->m = m;
    c->comm = tp > 1 ? cfg->comm : NULL;
    c->kn = cfg->kn;
    c->ops = kn_ctx_ops(cfg->kn);
    c->max_tokens = cfg->max_tokens;
    c->max_outputs = cfg->max_outputs ? cfg->max_outputs : cfg->max_tokens;
    c->max_ctx = cfg->max_ctx ? cfg->max_ctx : hp->n_ctx;
    c->mask_cap = (size_t)c->max_tokens *
                  (size_t)(c->max_tokens < ENG_MASK_ROW_MAX ? c->max_tokens : ENG_MASK_ROW_MAX);
    const size_t M = (size_t)c->max_tokens, O = (size_t)c->max_outputs, fs = sizeof(float);
    const size_t qd = (size_t)hp->n_head * (size_t)hp->head_dim;
    const size_t kvd = (size_t)hp->n_kv_head * (size_t)hp->head_dim;
    const size_t dim = (size_t)hp->dim, ffn = (size_t)hp->ffn_dim;
    kn_ctx *kn = cfg->kn;
    int rc = 0;
    if ((rc = kn_buf_alloc(kn, M * dim * fs, (void **)&c->x)) < 0 ||
        (rc = kn_buf_alloc(kn, M * dim * fs, (void **)&c->xb)) < 0 ||
        (rc = kn_buf_alloc(kn, M * (qd + 2 * kvd) * fs, (void **)&c->qkv)) < 0 ||
        (rc = kn_buf_alloc(kn, M * qd * fs, (void **)&c->att)) < 0 ||
        (rc = kn_buf_alloc(kn, M * ffn * fs, (void **)&c->hb)) < 0 ||
        (rc = kn_buf_alloc(kn, M * ffn * fs, (void **)&c->hb2)) < 0 ||
        (rc = kn_buf_alloc(kn, O * dim * fs, (void **)&c->hsel)) < 0 ||
        (rc = kn_buf_alloc(kn,
                           kn_attn_scratch_floats(c->max_ctx + c->max_tokens, kn_ctx_threads(kn)) *
                               fs,
                           (void **)&c->attn_scratch)) < 0 ||
        (rc = kn_buf_alloc(kn, plan_bytes(c), (void **)&c->plan_d)) < 0 ||
        (rc = kn_buf_alloc(kn, O * sizeof(int32_t), (void **)&c->ids_d)) < 0 ||
        (tp > 1 && (rc = kn_buf_alloc(kn, (size_t)tp * O * (size_t)m->vocab_chunk * fs,
                                      (void **)&c->lg_all)) < 0)) {
        eng_ctx_destroy(c);
        return eng_fail(rc, "forward: cannot allocate activations for %zu tokens: %s", M,
                        cm_strerror(rc));
    }
    c->plan = aligned_alloc(64, (plan_bytes(c) + 63) / 64 * 64);
    c->mask_d = malloc(M * sizeof(*c->mask_d));
    c->seq_id = malloc(M * sizeof(int));
    c->seq_n = malloc(M * sizeof(int64_t));
    c->seq_past = malloc(M * sizeof(int64_t));
    c->seq_row = malloc(M * sizeof(int64_t));
    if (tp > 1)
        c->pairs = malloc((size_t)tp * O * sizeof(*c->pairs));
    if (!c->plan || !c->mask_d || !c->seq_id || !c->seq_n || !c->seq_past || !c->seq_row ||
        (tp > 1 && !c->pairs)) {
        eng_ctx_destroy(c);
        return -ENOMEM;
    }
    c->tok = c->plan;
    c->pos = c->tok + M;
    c->slot = c->pos + M;
    c->out_rows = c->slot + M;
    c->masks = (uint8_t *)(c->out_rows + O);
    *out = c;
    return 0;
}

void eng_ctx_destroy(eng_ctx *c)
{
    if (!c)
        return;
    float *bufs[] = {c->x, c->xb, c->qkv, c->att, c->hb, c->hb2, c->hsel, c->attn_scratch};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++)
        kn_buf_free(c->kn, bufs[i]);
    kn_buf_free(c->kn, c->plan_d);
    kn_buf_free(c->kn, c->lg_all);
    kn_buf_free(c->kn, c->ids_d);
    free(c->plan);
    free(c->mask_d);
    free(c->seq_id);
    free(c->seq_n);
    free(c->seq_past);
    free(c->seq_row);
    free(c->pairs);
    free(c->tk_rows);
    free(c->tk_all);
    free(c);
}

void eng_ctx_set_ops(eng_ctx *c, const kn_ops *ops)
{
    c->ops = ops ? ops : kn_ctx_ops(c->kn);
}

const eng_model *eng_ctx_model(const eng_ctx *c)
{
    return c->m;
}

/* Check the batch and lay it out in the host plan; returns the output
 * count. Touches nothing but the plan and per-sequence scratch. */
static int64_t plan_batch(eng_ctx *c, eng_kv *kv, const eng_seq_in *seqs, int n_seqs)
{
    const eng_hparams *hp = &c->m->hp;
    if (n_seqs <= 0 || !seqs)
        return eng_fail(-EINVAL, "forward: empty batch");
    int64_t row = 0, n_out = 0;
    size_t mask_used = 0;
    for (int s = 0; s < n_seqs; s++) {
        const eng_seq_in *in = &seqs[s];
        int64_t n = in->n_tokens;
        int64_t past = eng_kv_seq_len(kv, in->seq);
        if (past < 0)
            return eng_fail(-EINVAL, "forward: batch entry %d: KV sequence %d is not allocated",
                            s, in->seq);
        if (n <= 0 || !in->tokens)
            return eng_fail(-EINVAL, "forward: batch entry %d has no tokens", s);
        if (n > c->max_tokens - row)
            return eng_fail(-EINVAL, "forward: batch has more than the %" PRId64 " tokens the "
                                     "ctx was made for",
                            c->max_tokens);
        if (past + n > c->max_ctx)
            return eng_fail(-EINVAL, "forward: sequence %d would reach %" PRId64 " positions, "
                                     "more than the ctx limit of %" PRId64,
                            in->seq, past + n, c->max_ctx);
        c->seq_id[s] = in->seq;
        c->seq_n[s] = n;
        c->seq_past[s] = past;
        c->seq_row[s] = row;
        c->mask_d[s] = NULL;
        if (in->mask) {
            /* Sequences that share a mask (Medusa's tree) share its upload. */
            for (int j = 0; j < s && !c->mask_d[s]; j++)
                if (seqs[j].mask == in->mask && seqs[j].n_tokens == n)
                    c->mask_d[s] = c->mask_d[j];
            if (!c->mask_d[s]) {
                const size_t mb = (size_t)n * (size_t)n;
                if (mb > c->mask_cap - mask_used)
                    return eng_fail(-EINVAL, "forward: batch entry %d: its %" PRId64 "-token "
                                             "mask does not fit beside the batch's others "
                                             "(%zu bytes; masked sequences of at most %d "
                                             "tokens always fit)",
                                    s, n, c->mask_cap, ENG_MASK_ROW_MAX);
                memcpy(c->masks + mask_used, in->mask, mb); /* host plan, uploaded below */
                c->mask_d[s] = (const uint8_t *)c->plan_d + plan_words(c) * sizeof(int32_t) +
                               mask_used;
                mask_used += mb;
            }
        }
        for (int64_t i = 0; i < n; i++) {
            int32_t t = in->tokens[i];
            if (t < 0 || t >= hp->n_vocab)
                return eng_fail(-EINVAL, "forward: batch entry %d token %" PRId64 " id %" PRId32
                                         " is outside the vocabulary of %" PRId64,
                                s, i, t, hp->n_vocab);
            int64_t p = in->pos ? in->pos[i] : past + i;
            if (p < 0 || p > INT32_MAX)
                return eng_fail(-EINVAL, "forward: batch entry %d token %" PRId64 " has "
                                         "position %" PRId64,
                                s, i, p);
            if (in->mask && !in->mask[i * n + i])
                return eng_fail(-EINVAL, "forward: batch entry %d: mask row %" PRId64 " does "
                                         "not let the token see itself",
                                s, i);
            c->tok[row + i] = t;
            c->pos[row + i] = (int32_t)p;
            bool want = in->want ? in->want[i] != 0 : i == n - 1;
            if (want) {
                if (n_out >= c->max_outputs)
                    return eng_fail(-EINVAL, "forward: more than the %" PRId64 " outputs the "
                                             "ctx was made for",
                                    c->max_outputs);
                c->out_rows[n_out++] = (int32_t)(row + i);
            }
        }
        row += n;
    }
    /* The masks' bytes follow the words: one upload carries the plan. */
    c->mask_cap_used = mask_used;
    return n_out;
}

/* Matmuls that share x: one fused op where the table has it (decode then
 * pays one pool round trip for Wq/Wk/Wv instead of three). */
static int matmul_n(const kn_ops *ops, kn_ctx *kn, int n, const kn_tensor *const *w,
                    const float *x, int64_t M, float *const *y)
{
    if (ops->matmul_multi)
        return ops->matmul_multi(kn, n, w, x, M, y);
    for (int i = 0; i < n; i++) {
        int rc = ops->matmul(kn, w[i], x, M, y[i]);
        if (rc < 0)
            return rc;
    }
    return 0;
}

#define OP(what, call) ENG_OP("forward", what, call)

/* Tensor parallelism: the row-parallel matmul's partial sums, added over
 * the ranks in rank order (so every rank, every run and every batch gets
 * the same bits). The shm communicator reads host addresses: CPU backend
 * memory is host memory (a GPU group uses NCCL on the device's stream). */
static int all_reduce(eng_ctx *c, float *buf, int64_t n, const char *after)
{
    if (!c->comm)
        return 0;
    int rc = comm_all_reduce_sum_f32(c->comm, buf, (size_t)n);
    if (rc < 0)
        return eng_fail(rc, "forward: all-reduce after %s failed: %s", after,
                        comm_last_error(c->comm));
    return 0;
}

/* Tensor parallelism: every rank's vocabulary slice of n_out logits rows
 * (rank r's [n_out][rows of r] at lg_all + r * n_out * chunk, this rank's
 * already there) gathered, then laid out as [n_out][n_vocab]. */
static int gather_logits(eng_ctx *c, int64_t n_out, float *logits)
{
    const eng_model *m = c->m;
    const int tp = m->tp;
    const int64_t V = m->hp.n_vocab, chunk = m->vocab_chunk;
    const size_t block = (size_t)n_out * (size_t)chunk * sizeof(float);
    int rc = comm_all_gather(c->comm, (char *)c->lg_all + (size_t)m->tp_rank * block, c->lg_all,
                             block);
    if (rc < 0)
        return eng_fail(rc, "forward: gathering the logits failed: %s",
                        comm_last_error(c->comm));
    for (int r = 0; r < tp; r++) {
        const int64_t v0 = r * chunk, vn = V - v0 < chunk ? V - v0 : chunk;
        const float *src = c->lg_all + (size_t)r * (size_t)n_out * (size_t)chunk;
        for (int64_t o = 0; o < n_out; o++)
            OP("copy (logits)", kn_buf_copy(c->kn, logits + o * V + v0, src + o * vn,
                                            (size_t)vn * sizeof(float)));
    }
    return 0;
}

/* The layers over the planned batch (plan uploaded, KV reserved). */
static int run_layers(eng_ctx *c, eng_kv *kv, int n_seqs, int64_t M)
{
    const eng_model *m = c->m;
    const eng_hparams *hp = &m->lhp; /* this rank's heads and FFN columns */
    const kn_ops *ops = c->ops;
    kn_ctx *kn = c->kn;
    const int64_t dim = hp->dim, ffn = hp->ffn_dim;
    const int hd = hp->head_dim;
    const int64_t qd = (int64_t)hp->n_head * hd, kvd = (int64_t)hp->n_kv_head * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    float *q = c->qkv, *k = q + M * qd, *v = k + M * kvd;
    const int32_t *tok_d = c->plan_d, *pos_d = tok_d + c->max_tokens;
    const int32_t *slot_d = pos_d + c->max_tokens;

    OP("get_rows (embedding)", ops->get_rows(kn, &m->tok_embd, tok_d, M, c->x));
    for (int l = 0; l < hp->n_layer; l++) {
        const eng_layer *L = &m->layers[l];
        /* attention */
        OP("rmsnorm", ops->rmsnorm(kn, c->x, L->attn_norm, M, dim, hp->rms_eps, c->xb));
        {
            const kn_tensor *w3[3] = {&L->wq, &L->wk, &L->wv};
            float *y3[3] = {q, k, v};
            OP("matmul (Wq, Wk, Wv)", matmul_n(ops, kn, 3, w3, c->xb, M, y3));
        }
        if (hp->rope_dims == 0) {
            /* llama.rope.dimension_count 0: no dimension rotates */
        } else if (M == 1) {
            OP("rope", ops->rope(kn, q, 1, hp->n_head + hp->n_kv_head, hd, hp->rope_dims, pos_d,
                                 hp->rope_base));
        } else {
            OP("rope (q)",
               ops->rope(kn, q, M, hp->n_head, hd, hp->rope_dims, pos_d, hp->rope_base));
            OP("rope (k)",
               ops->rope(kn, k, M, hp->n_kv_head, hd, hp->rope_dims, pos_d, hp->rope_base));
        }
        float *kp = eng_kv_k(kv, l), *vp = eng_kv_v(kv, l);
        OP("kv_write", ops->kv_write(kn, kp, vp, kvd, slot_d, M, k, v));
        for (int s = 0; s < n_seqs; s++) {
            const int64_t r0 = c->seq_row[s];
            kn_attn_args a = {
                .q = q + r0 * qd,
                .out = c->att + r0 * qd,
                .n_q = c->seq_n[s],
                .n_past = c->seq_past[s],
                .n_head = hp->n_head,
                .n_kv_head = hp->n_kv_head,
                .head_dim = hd,
                .k_pool = kp,
                .v_pool = vp,
                .block_table = eng_kv_seq_blocks_dev(kv, c->seq_id[s]),
                .block_size = eng_kv_block_size(kv),
                .mask = c->mask_d[s],
                .scale = scale,
                .scratch = c->attn_scratch,
            };
            OP("attention", ops->attention(kn, &a));
        }
        OP("matmul (Wo)", ops->matmul(kn, &L->wo, c->att, M, c->xb));
        CM_TRY(all_reduce(c, c->xb, M * dim, "Wo"));
        OP("add", ops->add(kn, c->x, c->xb, M * dim));
        /* SwiGLU feed-forward */
        OP("rmsnorm", ops->rmsnorm(kn, c->x, L->ffn_norm, M, dim, hp->rms_eps, c->xb));
        {
            const kn_tensor *w2[2] = {&L->w_gate, &L->w_up};
            float *y2[2] = {c->hb, c->hb2};
            OP("matmul (Wgate, Wup)", matmul_n(ops, kn, 2, w2, c->xb, M, y2));
        }
        OP("silu_mul", ops->silu_mul(kn, c->hb, c->hb2, M * ffn));
        OP("matmul (Wdown)", ops->matmul(kn, &L->w_down, c->hb, M, c->xb));
        CM_TRY(all_reduce(c, c->xb, M * dim, "Wdown"));
        OP("add", ops->add(kn, c->x, c->xb, M * dim));
    }
    return 0;
}

/* The forward up to the output rows: hidden (or the ctx's scratch) holds
 * the n_out final-normed rows; *h_out says where. */
static int64_t forward_rows(eng_ctx *c, eng_kv *kv, const eng_seq_in *seqs, int n_seqs,
                            float *hidden, float **h_out)
{
    const eng_model *m = c->m;
    const eng_hparams *hp = &m->hp;
    const kn_ops *ops = c->ops;
    kn_ctx *kn = c->kn;
    if (!kv)
        return eng_fail(-EINVAL, "forward: no KV cache");
    if (n_seqs > c->max_tokens)
        return eng_fail(-EINVAL, "forward: %d sequences exceed the ctx's %" PRId64 " tokens",
                        n_seqs, c->max_tokens);
    int64_t n_out = plan_batch(c, kv, seqs, n_seqs);
    if (n_out < 0)
        return n_out;
    /* All-or-nothing: after this only a backend failure (an engine bug) can
     * fail the call, and it leaves the KV lengths as they were. */
    int rc = eng_kv_reserve_batch(kv, c->seq_id, c->seq_n, n_seqs);
    if (rc < 0)
        return rc;

    const int64_t M = c->seq_row[n_seqs - 1] + c->seq_n[n_seqs - 1];
    for (int s = 0; s < n_seqs; s++)
        for (int64_t i = 0; i < c->seq_n[s]; i++)
            c->slot[c->seq_row[s] + i] =
                (int32_t)eng_kv_slot(kv, c->seq_id[s], c->seq_past[s] + i);
    /* One upload carries the step's ids, positions, slots, output rows and
     * masks (the words are sized for the ctx's maxima; only the masks are
     * trimmed to what this batch uses). */
    OP("upload (plan)", kn_buf_upload(kn, c->plan_d, c->plan,
                                      plan_words(c) * sizeof(int32_t) + c->mask_cap_used));
    if ((rc = run_layers(c, kv, n_seqs, M)) < 0)
        return rc;

    for (int s = 0; s < n_seqs; s++) {
        int64_t len = eng_kv_seq_append(kv, c->seq_id[s], c->seq_n[s]);
        CM_ASSERT(len == c->seq_past[s] + c->seq_n[s]); /* capacity was reserved */
    }
    *h_out = NULL;
    if (n_out == 0)
        return n_out;
    /* Only the rows asked for go through the final norm and the (large)
     * output matrix. */
    float *h = hidden ? hidden : c->hsel;
    *h_out = h;
    const kn_tensor xv = {.data = c->x, .type = KN_F32, .rows = M, .cols = hp->dim};
    OP("get_rows (outputs)",
       ops->get_rows(kn, &xv, c->plan_d + 3 * c->max_tokens, n_out, h));
    OP("rmsnorm (output)", ops->rmsnorm(kn, h, m->output_norm, n_out, hp->dim, hp->rms_eps, h));
    return n_out;
}

/* This rank's logits rows for h: the whole row without TP (into logits),
 * its vocabulary slice with TP (into its block of lg_all). */
static float *output_slice(eng_ctx *c, const float *h, int64_t n_out, float *logits)
{
    const eng_model *m = c->m;
    float *dst = c->comm ? c->lg_all + (size_t)m->tp_rank * (size_t)n_out * (size_t)m->vocab_chunk
                         : logits;
    int rc = c->ops->matmul(c->kn, &m->output, h, n_out, dst);
    if (rc < 0) {
        eng_fail(rc, "forward: backend matmul (output) failed: %s", cm_strerror(rc));
        return NULL;
    }
    return dst;
}

int64_t eng_forward(eng_ctx *c, eng_kv *kv, const eng_seq_in *seqs, int n_seqs, float *logits,
                    float *hidden)
{
    float *h;
    int64_t n_out = forward_rows(c, kv, seqs, n_seqs, hidden, &h);
    if (n_out <= 0 || !logits)
        return n_out;
    if (!output_slice(c, h, n_out, logits))
        return -EIO;
    if (c->comm)
        CM_TRY(gather_logits(c, n_out, logits));
    return n_out;
}

int64_t eng_forward_greedy(eng_ctx *c, eng_kv *kv, const eng_seq_in *seqs, int n_seqs,
                           float *logits, float *hidden, int32_t *ids)
{
    const eng_model *m = c->m;
    kn_ctx *kn = c->kn;
    float *h;
    int64_t n_out = forward_rows(c, kv, seqs, n_seqs, hidden, &h);
    if (n_out <= 0)
        return n_out;
    float *lg = output_slice(c, h, n_out, logits);
    if (!lg)
        return -EIO;
    const int64_t vn = m->lhp.n_vocab;
    OP("argmax", c->ops->argmax(kn, lg, n_out, vn, c->ids_d));
    OP("download (ids)", kn_buf_download(kn, ids, c->ids_d, (size_t)n_out * sizeof(int32_t)));
    if (!c->comm)
        return n_out;
    /* Each rank's (max, id) per row, gathered; the global argmax keeps the
     * scan order of one row: a later rank wins only with a larger value,
     * so ties go to the lowest id, as the argmax op's. (A NaN that starts a
     * later rank's slice hides that slice's maximum: NaN logits are a
     * broken model either way.) */
    const int tp = m->tp;
    struct tp_pair *all = c->pairs, *mine = all + (size_t)m->tp_rank * (size_t)n_out;
    for (int64_t o = 0; o < n_out; o++) {
        OP("download (max)", kn_buf_download(kn, &mine[o].v, lg + o * vn + ids[o], sizeof(float)));
        mine[o].id = (int32_t)(m->vocab0 + ids[o]);
    }
    int rc = comm_all_gather(c->comm, mine, all, (size_t)n_out * sizeof(*all));
    if (rc < 0)
        return eng_fail(rc, "forward: gathering the argmax pairs failed: %s",
                        comm_last_error(c->comm));
    for (int64_t o = 0; o < n_out; o++) {
        struct tp_pair best = all[o];
        for (int r = 1; r < tp; r++)
            if (all[(size_t)r * (size_t)n_out + (size_t)o].v > best.v)
                best = all[(size_t)r * (size_t)n_out + (size_t)o];
        ids[o] = best.id;
    }
    return n_out;
}

/* Grow *buf to hold n elements of size sz; 0 or -ENOMEM. */
static int grow(void **buf, size_t *cap, size_t n, size_t sz)
{
    if (n <= *cap)
        return 0;
    void *p = realloc(*buf, n * sz);
    if (!p)
        return eng_fail(-ENOMEM, "forward: out of memory for %zu top-k entries", n);
    *buf = p;
    *cap = n;
    return 0;
}

/* Is a before b in top-k order (larger first, lower id on ties)? */
static bool cand_before(const eng_cand *a, const eng_cand *b)
{
    return a->p > b->p || (a->p == b->p && a->id < b->id);
}

int64_t eng_forward_topk(eng_ctx *c, eng_kv *kv, const eng_seq_in *seqs, int n_seqs,
                         float *logits, const int32_t *k, const float *temp, int kmax,
                         eng_cand *top)
{
    if (kmax < 1 || kmax > ENG_TOPK_MAX)
        return eng_fail(-EINVAL, "forward: top-k of %d candidates: must be 1..%d", kmax,
                        ENG_TOPK_MAX);
    const eng_model *m = c->m;
    kn_ctx *kn = c->kn;
    float *h;
    int64_t n_out = forward_rows(c, kv, seqs, n_seqs, NULL, &h);
    if (n_out <= 0)
        return n_out;
    for (int64_t o = 0; o < n_out; o++)
        if (k[o] < 1 || k[o] > kmax || k[o] > m->hp.n_vocab)
            return eng_fail(-EINVAL, "forward: output row %lld asks for top-%d (at most %d, "
                            "and the vocabulary's %lld)",
                            (long long)o, k[o], kmax, (long long)m->hp.n_vocab);
    float *lg = output_slice(c, h, n_out, logits);
    if (!lg)
        return -EIO;
    /* This rank's rows (its vocabulary slice under TP), on the host. */
    const int64_t vn = m->lhp.n_vocab;
    const int tp = c->comm ? m->tp : 1, rank = c->comm ? m->tp_rank : 0;
    CM_TRY(grow((void **)&c->tk_rows, &c->tk_rows_cap, (size_t)n_out * (size_t)vn,
                sizeof(float)));
    CM_TRY(grow((void **)&c->tk_all, &c->tk_all_cap, (size_t)tp * (size_t)n_out * (size_t)kmax,
                sizeof(eng_cand)));
    OP("download (rows)", kn_buf_download(kn, c->tk_rows, lg,
                                          (size_t)n_out * (size_t)vn * sizeof(float)));
    const size_t block = (size_t)n_out * (size_t)kmax;
    eng_cand *mine = c->tk_all + (size_t)rank * block;
    for (int64_t o = 0; o < n_out; o++) {
        float *x = c->tk_rows + o * vn;
        if (temp[o] != 1.0f) /* the sampler's own division, element for element */
            for (int64_t i = 0; i < vn; i++)
                x[i] /= temp[o];
        const int64_t kk = k[o] < vn ? k[o] : vn;
        eng_cand *t = mine + o * kmax;
        eng_topk_select(x, vn, kk, t);
        for (int64_t j = 0; j < kk; j++)
            t[j].id += (int32_t)m->vocab0;
    }
    if (!c->comm) {
        for (int64_t o = 0; o < n_out; o++)
            memcpy(top + o * kmax, mine + o * kmax, (size_t)k[o] * sizeof(eng_cand));
        return n_out;
    }
    int rc = comm_all_gather(c->comm, mine, c->tk_all, block * sizeof(eng_cand));
    if (rc < 0)
        return eng_fail(rc, "forward: gathering the top-k candidates failed: %s",
                        comm_last_error(c->comm));
    /* Merge: each rank's list is in top-k order, so the first k of the
     * merged order are the row's top-k (exactly eng_topk_select's over the
     * whole row: its ties go to the lower id too). */
    const int64_t V = m->hp.n_vocab, chunk = m->vocab_chunk;
    for (int64_t o = 0; o < n_out; o++) {
        int64_t at[COMM_SHM_MAX_RANKS] = {0}, len[COMM_SHM_MAX_RANKS];
        for (int r = 0; r < tp; r++) {
            const int64_t vr = V - r * chunk < chunk ? V - r * chunk : chunk;
            len[r] = k[o] < vr ? k[o] : vr;
        }
        for (int32_t j = 0; j < k[o]; j++) {
            int best = -1;
            for (int r = 0; r < tp; r++) {
                if (at[r] == len[r])
                    continue;
                const eng_cand *cr = c->tk_all + (size_t)r * block + o * kmax + at[r];
                if (best < 0 ||
                    cand_before(cr, c->tk_all + (size_t)best * block + o * kmax + at[best]))
                    best = r;
            }
            CM_ASSERT(best >= 0); /* k <= n_vocab: the slices hold enough */
            top[o * kmax + j] = c->tk_all[(size_t)best * block + o * kmax + at[best]++];
        }
    }
    return n_out;
}

/* ---- in-process generation ---------------------------------------------- */

typedef struct gen_io {
    const eng_gen_cfg *cfg;
    const eng_tok *tok;
    eng_tok_stream ts;
    eng_stop stop;
    char *piece, *text; /* decode output, stop-filtered output */
    size_t piece_cap, text_cap;
    bool aborted;
} gen_io;

static int gen_emit(gen_io *io, int32_t token, const char *s, size_t n)
{
    if (io->cfg->on_token && io->cfg->on_token(io->cfg->arg, token, s, n) < 0)
        io->aborted = true;
    return 0;
}

/* Decode token into io->piece; returns its length (0 without a tokenizer). */
static int64_t gen_decode(gen_io *io, int32_t token)
{
    if (!io->tok)
        return 0;
    int64_t n = eng_tok_stream_push(io->tok, &io->ts, token, io->piece, io->piece_cap);
    return n < 0 ? 0 : n;
}

/* One forward of `in`; greedy decoding gets its next id at once
 * (eng_forward_greedy: under TP one (max, id) pair per rank crosses); with
 * `top` (TP, a sampler that needs only its top-k) the candidates land
 * there; otherwise a sampler's row stays in `logits` for gen_next. */
static int64_t gen_forward(eng_ctx *c, eng_kv *kv, const eng_seq_in *in, eng_sampler *smp,
                           float *logits, int32_t *greedy_id, eng_cand *top)
{
    if (smp && top) {
        const int32_t k = eng_sampler_topk(smp);
        const float t = eng_sampler_temperature(smp);
        return eng_forward_topk(c, kv, in, 1, logits, &k, &t, k, top);
    }
    if (smp)
        return eng_forward(c, kv, in, 1, logits, NULL);
    return eng_forward_greedy(c, kv, in, 1, logits, NULL, greedy_id);
}

/* The next token: greedy's was chosen by gen_forward; a sampler gets its
 * top-k candidates or the row. */
static int gen_next(eng_ctx *c, eng_sampler *smp, const float *logits, float *row,
                    int32_t greedy_id, const eng_cand *top, int32_t *next)
{
    const int64_t V = c->m->hp.n_vocab;
    if (!smp) {
        *next = greedy_id;
        return 0;
    }
    if (top) {
        *next = eng_sampler_sample_topk(smp, top, eng_sampler_topk(smp));
        return 0;
    }
    int rc = kn_buf_download(c->kn, row, logits, (size_t)V * sizeof(float));
    if (rc < 0)
        return eng_fail(rc, "generate: downloading logits: %s", cm_strerror(rc));
    *next = eng_sampler_sample(smp, row);
    return 0;
}

int eng_generate(eng_ctx *c, eng_kv *kv, int seq, const eng_gen_cfg *cfg, eng_gen_result *res)
{
    memset(res, 0, sizeof(*res));
    const eng_model *m = c->m;
    const eng_tok *tok = m->tok;
    if (!cfg->prompt || cfg->n_prompt < 1 || cfg->steps < 1)
        return eng_fail(-EINVAL, "generate: need a prompt of at least one token and steps > 0");
    const int64_t n_pre = cfg->n_prompt < cfg->steps ? cfg->n_prompt : cfg->steps;
    if (n_pre > c->max_tokens)
        return eng_fail(-EINVAL, "generate: prompt of %" PRId64 " tokens exceeds the ctx's "
                                 "batch of %" PRId64,
                        n_pre, c->max_tokens);
    gen_io io = {.cfg = cfg, .tok = tok};
    int32_t ends[2];
    int n_ends = 0;
    if (tok) {
        if (eng_tok_bos(tok) >= 0)
            ends[n_ends++] = eng_tok_bos(tok);
        if (eng_tok_eos(tok) >= 0)
            ends[n_ends++] = eng_tok_eos(tok);
    }
    int rc = eng_stop_init(&io.stop, &(eng_stop_cfg){.eos = ends,
                                                     .n_eos = n_ends,
                                                     .stop = cfg->stop,
                                                     .n_stop = cfg->n_stop,
                                                     .max_tokens = cfg->steps - n_pre + 1});
    if (rc < 0)
        return rc;
    io.piece_cap = (tok ? 3 * eng_tok_max_piece_bytes(tok) : 0) + ENG_TOK_STREAM_SLACK;
    io.text_cap = io.piece_cap + ENG_STOP_MAX_LEN;
    /* The logits stay in backend memory: greedy decoding downloads one id
     * (argmax op), a sampler its row. */
    const size_t row_bytes = (size_t)m->hp.n_vocab * sizeof(float);
    float *logits = NULL, *row = NULL;
    int32_t greedy_id = -1;
    /* under TP a sampler that needs only its top-k gets the candidates */
    const int topk = c->comm ? eng_sampler_topk(cfg->sampler) : 0;
    eng_cand *top = NULL;
    io.piece = malloc(io.piece_cap);
    io.text = malloc(io.text_cap);
    if (cfg->sampler)
        row = malloc(row_bytes);
    const bool use_top = topk > 0 && topk <= ENG_TOPK_MAX;
    if (use_top)
        top = malloc((size_t)topk * sizeof(*top));
    if (!io.piece || !io.text || (cfg->sampler && !row) || (use_top && !top) ||
        (rc = kn_buf_alloc(c->kn, row_bytes, (void **)&logits)) < 0) {
        rc = rc < 0 ? rc : -ENOMEM;
        goto out;
    }
    eng_tok_stream_init(&io.ts, cfg->prompt[0]);

    uint64_t t0 = cm_now_ns();
    eng_seq_in in = {.seq = seq, .tokens = cfg->prompt, .n_tokens = n_pre};
    int64_t n = gen_forward(c, kv, &in, cfg->sampler, logits, &greedy_id, top);
    if (n < 0) {
        rc = (int)n;
        goto out;
    }
    res->prefill_ns = cm_now_ns() - t0;
    res->n_prompt = n_pre;
    /* Prompt text is printed verbatim (stop strings apply to new text). */
    for (int64_t i = 1; i < n_pre && !io.aborted; i++)
        gen_emit(&io, cfg->prompt[i], io.piece, (size_t)gen_decode(&io, cfg->prompt[i]));
    if (cfg->sampler)
        for (int64_t i = 0; i < n_pre; i++)
            eng_sampler_accept(cfg->sampler, cfg->prompt[i]);
    if (n_pre < cfg->n_prompt) { /* steps ran out inside the prompt */
        gen_emit(&io, cfg->prompt[n_pre], io.piece, (size_t)gen_decode(&io, cfg->prompt[n_pre]));
        res->finish = ENG_FINISH_LENGTH;
        goto flush;
    }

    t0 = cm_now_ns();
    int64_t pos = n_pre;
    while (!io.aborted) {
        int32_t next;
        if ((rc = gen_next(c, cfg->sampler, logits, row, greedy_id, top, &next)) < 0)
            break;
        res->n_generated++;
        if (cfg->sampler)
            eng_sampler_accept(cfg->sampler, next);
        bool is_end = false;
        for (int i = 0; i < n_ends; i++)
            is_end |= next == ends[i];
        size_t plen = is_end ? 0 : (size_t)gen_decode(&io, next);
        size_t tlen = 0;
        int fin = eng_stop_feed(&io.stop, next, io.piece, plen, io.text, io.text_cap, &tlen);
        if (fin < 0) {
            rc = fin;
            break;
        }
        if (!is_end)
            gen_emit(&io, next, io.text, tlen);
        if (fin != ENG_FINISH_NONE) {
            res->finish = (enum eng_finish)fin;
            break;
        }
        if (pos >= cfg->steps) { /* not reached: the stop's max_tokens ends first */
            res->finish = ENG_FINISH_LENGTH;
            break;
        }
        in = (eng_seq_in){.seq = seq, .tokens = &next, .n_tokens = 1};
        n = gen_forward(c, kv, &in, cfg->sampler, logits, &greedy_id, top);
        if (n < 0) {
            rc = (int)n;
            break;
        }
        pos++;
    }
    res->decode_ns = cm_now_ns() - t0;
flush:
    if (tok && !io.aborted) {
        int64_t f = eng_tok_stream_flush(tok, &io.ts, io.piece, io.piece_cap);
        if (f > 0)
            gen_emit(&io, -1, io.piece, (size_t)f);
    }
out:
    kn_buf_free(c->kn, logits);
    free(row);
    free(top);
    free(io.piece);
    free(io.text);
    return rc;
}
