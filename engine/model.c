/* Model loading and validation; the forward pass is in forward.c. */
#include "engine/model.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/common.h"
#include "engine/model/eng_err.h"
#include "engine/model/tp_split.h"
#include "engine/model_int.h"

/* ---- hyper-parameters --------------------------------------------------- */

/* A required u32 key in [lo, hi]. */
static int key_u32(const eng_gguf *g, const char *key, uint32_t lo, uint32_t hi, uint32_t *out)
{
    int rc = eng_gguf_get_u32(g, key, out);
    if (rc == -ENOENT)
        return eng_fail(-EBADMSG, "model: missing key %s", key);
    if (rc < 0)
        return eng_fail(-EBADMSG, "model: key %s is not an unsigned integer", key);
    if (*out < lo || *out > hi)
        return eng_fail(-EBADMSG, "model: key %s = %" PRIu32 " is outside [%" PRIu32 ", %" PRIu32
                                  "]",
                        key, *out, lo, hi);
    return 0;
}

/* An optional u32 key: *out keeps def when absent. */
static int key_u32_opt(const eng_gguf *g, const char *key, uint32_t lo, uint32_t hi,
                       uint32_t def, uint32_t *out)
{
    if (eng_gguf_find_kv(g, key) < 0) {
        *out = def;
        return 0;
    }
    return key_u32(g, key, lo, hi, out);
}

static int key_f32_opt(const eng_gguf *g, const char *key, float def, float *out)
{
    if (eng_gguf_find_kv(g, key) < 0) {
        *out = def;
        return 0;
    }
    if (eng_gguf_get_f32(g, key, out) < 0)
        return eng_fail(-EBADMSG, "model: key %s is not a number", key);
    if (!(*out > 0.0f) || !isfinite(*out))
        return eng_fail(-EBADMSG, "model: key %s = %g must be a positive number", key,
                        (double)*out);
    return 0;
}

static int read_hparams(const eng_gguf *g, eng_hparams *hp)
{
    const char *arch = NULL;
    if (eng_gguf_get_str(g, "general.architecture", &arch, NULL) < 0)
        return eng_fail(-EBADMSG, "model: missing key general.architecture");
    if (strcmp(arch, "llama") != 0)
        return eng_fail(-EBADMSG, "model: architecture \"%s\" is not supported (only llama)",
                        arch);
    const uint32_t big = 1u << 24;
    uint32_t dim, ffn, nl, nh, nkv, hd, rd, nctx;
    CM_TRY(key_u32(g, "llama.embedding_length", 1, big, &dim));
    CM_TRY(key_u32(g, "llama.feed_forward_length", 1, big, &ffn));
    CM_TRY(key_u32(g, "llama.block_count", 1, 4096, &nl));
    CM_TRY(key_u32(g, "llama.attention.head_count", 1, 4096, &nh));
    CM_TRY(key_u32_opt(g, "llama.attention.head_count_kv", 1, 4096, nh, &nkv));
    if (dim % nh)
        return eng_fail(-EBADMSG, "model: embedding length %" PRIu32 " is not a multiple of "
                                  "the head count %" PRIu32,
                        dim, nh);
    CM_TRY(key_u32_opt(g, "llama.attention.key_length", 2, 65536, dim / nh, &hd));
    if (nh % nkv)
        return eng_fail(-EBADMSG, "model: head count %" PRIu32 " is not a multiple of the KV "
                                  "head count %" PRIu32,
                        nh, nkv);
    CM_TRY(key_u32_opt(g, "llama.rope.dimension_count", 0, hd, hd, &rd));
    if (rd % 2)
        return eng_fail(-EBADMSG, "model: llama.rope.dimension_count %" PRIu32 " is odd", rd);
    CM_TRY(key_u32_opt(g, "llama.context_length", 1, 1u << 30, 2048, &nctx));
    hp->dim = dim;
    hp->ffn_dim = ffn;
    hp->n_layer = (int)nl;
    hp->n_head = (int)nh;
    hp->n_kv_head = (int)nkv;
    hp->head_dim = (int)hd;
    hp->rope_dims = (int)rd;
    hp->n_ctx = nctx;
    CM_TRY(key_f32_opt(g, "llama.rope.freq_base", 10000.0f, &hp->rope_base));
    CM_TRY(key_f32_opt(g, "llama.attention.layer_norm_rms_epsilon", 1e-5f, &hp->rms_eps));
    return 0;
}

/* ---- tensors ------------------------------------------------------------ */

static void fmt_shape(char *buf, size_t cap, int n, const int64_t *ne)
{
    size_t o = (size_t)snprintf(buf, cap, "[");
    for (int i = 0; i < n && o < cap; i++)
        o += (size_t)snprintf(buf + o, cap - o, "%s%" PRId64, i ? ", " : "", ne[i]);
    if (o < cap)
        snprintf(buf + o, cap - o, "]");
}

/* Find `name` and check it is a tensor of shape [ne0] (ne1 == 0) or
 * [ne0, ne1] (GGUF order: ne0 contiguous). */
static int get_tensor(const eng_gguf *g, const char *name, int64_t ne0, int64_t ne1,
                      const struct eng_gguf_tensor **out)
{
    const struct eng_gguf_tensor *t = eng_gguf_find_tensor(g, name);
    if (!t)
        return eng_fail(-EBADMSG, "model: missing tensor %s", name);
    int want_dims = ne1 ? 2 : 1;
    int64_t want[2] = {ne0, ne1};
    int dims = t->n_dims;
    /* trailing 1s do not change the shape */
    while (dims > want_dims && t->ne[dims - 1] == 1)
        dims--;
    bool ok = dims == want_dims && t->ne[0] == ne0 && (want_dims == 1 || t->ne[1] == ne1);
    if (!ok) {
        char e[64], f[96];
        fmt_shape(e, sizeof(e), want_dims, want);
        fmt_shape(f, sizeof(f), t->n_dims, t->ne);
        return eng_fail(-EBADMSG, "model: tensor %s has shape %s, expected %s", name, f, e);
    }
    *out = t;
    return 0;
}

static int get_norm(const eng_gguf *g, const char *name, int64_t dim, const float **out)
{
    const struct eng_gguf_tensor *t;
    CM_TRY(get_tensor(g, name, dim, 0, &t));
    if (t->type != KN_F32)
        return eng_fail(-EBADMSG, "model: tensor %s is %s, expected f32 (norm weights)", name,
                        kn_dtype_name(t->type));
    *out = t->data;
    return 0;
}

/* A weight used as y = W x with x of length n_in: GGUF ne = [n_in, n_out]. */
static int get_matrix(const eng_gguf *g, const char *name, int64_t n_in, int64_t n_out,
                      kn_tensor *out)
{
    const struct eng_gguf_tensor *t;
    CM_TRY(get_tensor(g, name, n_in, n_out, &t));
    switch (t->type) {
    case KN_F32:
    case KN_F16:
    case KN_BF16:
    case KN_Q8_0:
    case KN_Q4_0:
        break;
    default:
        return eng_fail(-EBADMSG, "model: tensor %s has unsupported type %s", name,
                        kn_dtype_name(t->type));
    }
    if (kn_row_bytes(t->type, n_in) == 0)
        return eng_fail(-EBADMSG, "model: tensor %s: rows of %" PRId64 " %s values are not "
                                  "whole blocks",
                        name, n_in, kn_dtype_name(t->type));
    *out = (kn_tensor){.data = t->data, .type = t->type, .rows = n_out, .cols = n_in};
    return 0;
}

static int load_weights(eng_model *m)
{
    const eng_gguf *g = m->gguf;
    eng_hparams *hp = &m->hp;
    const struct eng_gguf_tensor *emb = eng_gguf_find_tensor(g, "token_embd.weight");
    if (!emb)
        return eng_fail(-EBADMSG, "model: missing tensor token_embd.weight");
    if (emb->n_dims < 2 || emb->ne[1] < 1 || emb->ne[1] > INT32_MAX) {
        char f[96];
        fmt_shape(f, sizeof(f), emb->n_dims, emb->ne);
        return eng_fail(-EBADMSG, "model: tensor token_embd.weight has shape %s, expected "
                                  "[%" PRId64 ", n_vocab]",
                        f, hp->dim);
    }
    hp->n_vocab = emb->ne[1];
    CM_TRY(get_matrix(g, "token_embd.weight", hp->dim, hp->n_vocab, &m->tok_embd));
    CM_TRY(get_norm(g, "output_norm.weight", hp->dim, &m->output_norm));
    if (eng_gguf_find_tensor(g, "output.weight")) {
        CM_TRY(get_matrix(g, "output.weight", hp->dim, hp->n_vocab, &m->output));
        hp->tied_output = false;
    } else {
        m->output = m->tok_embd;
        hp->tied_output = true;
    }
    m->layers = calloc((size_t)hp->n_layer, sizeof(eng_layer));
    if (!m->layers)
        return -ENOMEM;
    const int64_t qd = (int64_t)hp->n_head * hp->head_dim;
    const int64_t kvd = (int64_t)hp->n_kv_head * hp->head_dim;
    for (int l = 0; l < hp->n_layer; l++) {
        eng_layer *L = &m->layers[l];
        char n[64];
#define NAME(s) (snprintf(n, sizeof(n), "blk.%d." s ".weight", l), n)
        CM_TRY(get_norm(g, NAME("attn_norm"), hp->dim, &L->attn_norm));
        CM_TRY(get_matrix(g, NAME("attn_q"), hp->dim, qd, &L->wq));
        CM_TRY(get_matrix(g, NAME("attn_k"), hp->dim, kvd, &L->wk));
        CM_TRY(get_matrix(g, NAME("attn_v"), hp->dim, kvd, &L->wv));
        CM_TRY(get_matrix(g, NAME("attn_output"), qd, hp->dim, &L->wo));
        CM_TRY(get_norm(g, NAME("ffn_norm"), hp->dim, &L->ffn_norm));
        CM_TRY(get_matrix(g, NAME("ffn_gate"), hp->dim, hp->ffn_dim, &L->w_gate));
        CM_TRY(get_matrix(g, NAME("ffn_up"), hp->dim, hp->ffn_dim, &L->w_up));
        CM_TRY(get_matrix(g, NAME("ffn_down"), hp->ffn_dim, hp->dim, &L->w_down));
#undef NAME
    }
    return 0;
}

/* Matmul weight i of the model, i < 1 + 7 * n_layer (the tok_embd lookup
 * is not one: it reads the file's layout). */
static kn_tensor *matmul_tensor(eng_model *m, int64_t i)
{
    if (i == 0)
        return &m->output;
    eng_layer *L = &m->layers[(i - 1) / 7];
    kn_tensor *lt[] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->w_gate, &L->w_up, &L->w_down};
    return lt[(i - 1) % 7];
}

static int64_t matrix_bytes(const kn_tensor *t)
{
    return (int64_t)kn_row_bytes(t->type, t->cols) * t->rows;
}

/* Bytes of every matmul weight as loaded (after sharding: this rank's). */
static int64_t matrices_bytes(eng_model *m)
{
    int64_t b = 0;
    for (int64_t i = 0; i < 1 + 7 * (int64_t)m->hp.n_layer; i++)
        b += matrix_bytes(matmul_tensor(m, i));
    return b;
}

/* ---- tensor-parallel shards -------------------------------------------- */

/* Rows [r0, r0 + n) of w: a view into the same memory (rows are contiguous,
 * in every type). */
static void row_slice(kn_tensor *w, int64_t r0, int64_t n)
{
    w->data = (const char *)w->data + (size_t)r0 * kn_row_bytes(w->type, w->cols);
    w->rows = n;
}

/* Columns [c0, c0 + n) of w, copied into memory of its own (*owned); the
 * caller checked that c0 and n are whole blocks of w's type. */
static int col_slice(kn_tensor *w, int64_t c0, int64_t n, void **owned)
{
    const size_t off = kn_row_bytes(w->type, c0), rb = kn_row_bytes(w->type, n);
    const size_t full = kn_row_bytes(w->type, w->cols);
    char *p = malloc(rb * (size_t)w->rows);
    if (!p)
        return eng_fail(-ENOMEM, "model: no memory for this rank's weight slices");
    for (int64_t r = 0; r < w->rows; r++)
        memcpy(p + (size_t)r * rb, (const char *)w->data + (size_t)r * full + off, rb);
    *owned = p;
    w->data = p;
    w->cols = n;
    return 0;
}

/* Megatron-style split for rank `rank` of `tp`: Wq/Wk/Wv and Wgate/Wup by
 * output rows (whole heads; KV heads replicated when there are fewer than
 * ranks, as vLLM does), Wo and Wdown by input columns (their outputs are
 * partial sums the forward all-reduces), the output matrix by vocabulary
 * rows. The embedding is not split: a rank reads the rows of the step's
 * tokens from the file mapping (docs/tensor-parallel.md). */
static int shard_weights(eng_model *m, int rank, int tp)
{
    const eng_hparams *hp = &m->hp;
    eng_hparams *lhp = &m->lhp;
    *lhp = *hp;
    m->tp = tp;
    m->tp_rank = rank;
    m->vocab0 = 0;
    m->vocab_chunk = hp->n_vocab;
    if (tp == 1)
        return 0;
    CM_TRY(eng_tp_split_check(tp, hp->n_head, hp->n_kv_head, hp->ffn_dim, hp->n_vocab));
    /* whole KV heads, or each replicated on tp / n_kv_head ranks */
    const int nkv_l = hp->n_kv_head >= tp ? hp->n_kv_head / tp : 1;
    const int kv0 = hp->n_kv_head >= tp ? rank * nkv_l : rank / (tp / hp->n_kv_head);
    const int hd = hp->head_dim, nh_l = hp->n_head / tp;
    const int64_t qcols = (int64_t)nh_l * hd, fcols = hp->ffn_dim / tp;
    for (int l = 0; l < hp->n_layer; l++) {
        const eng_layer *L = &m->layers[l];
        if (kn_row_bytes(L->wo.type, qcols) == 0 || kn_row_bytes(L->w_down.type, fcols) == 0)
            return eng_fail(-EINVAL, "model: tensor parallelism over %d ranks gives each rank "
                                     "%" PRId64 " attention and %" PRId64 " FFN columns of the "
                                     "%s/%s row-parallel matrices: not whole blocks of %d",
                            tp, qcols, fcols, kn_dtype_name(L->wo.type),
                            kn_dtype_name(L->w_down.type), KN_QK);
    }
    m->owned = calloc(2 * (size_t)hp->n_layer, sizeof(void *));
    if (!m->owned)
        return -ENOMEM;
    for (int l = 0; l < hp->n_layer; l++) {
        eng_layer *L = &m->layers[l];
        row_slice(&L->wq, (int64_t)rank * qcols, qcols);
        row_slice(&L->wk, (int64_t)kv0 * hd, (int64_t)nkv_l * hd);
        row_slice(&L->wv, (int64_t)kv0 * hd, (int64_t)nkv_l * hd);
        row_slice(&L->w_gate, rank * fcols, fcols);
        row_slice(&L->w_up, rank * fcols, fcols);
        CM_TRY(col_slice(&L->wo, rank * qcols, qcols, &m->owned[2 * l]));
        CM_TRY(col_slice(&L->w_down, rank * fcols, fcols, &m->owned[2 * l + 1]));
    }
    m->vocab_chunk = (hp->n_vocab + tp - 1) / tp;
    m->vocab0 = rank * m->vocab_chunk;
    const int64_t vn = hp->n_vocab - m->vocab0 < m->vocab_chunk ? hp->n_vocab - m->vocab0
                                                                 : m->vocab_chunk;
    row_slice(&m->output, m->vocab0, vn);
    lhp->n_head = nh_l;
    lhp->n_kv_head = nkv_l;
    lhp->ffn_dim = fcols;
    lhp->n_vocab = vn;
    return 0;
}

/* Repack the matmul weights once for this CPU's matmul (kn_tensor_pack):
 * on AVX-512 they are then streamed without per-call repacking. Only the
 * matmul reads a packed tensor's copy, so the file's pages of it are let
 * go (the embedding lookup keeps reading a tied output's), and the model
 * costs its size in memory once, not twice. */
static int pack_weights(eng_model *m)
{
    const int64_t n = 1 + 7 * (int64_t)m->hp.n_layer;
    for (int64_t i = 0; i < n; i++) {
        kn_tensor *t = matmul_tensor(m, i);
        if (kn_tensor_pack(t) < 0)
            return eng_fail(-ENOMEM, "model: no memory to repack the weights (%" PRId64
                                     " of %" PRId64 " done)", i, n);
        /* (a tied output, whole or a rank's slice, is the embedding's
         * memory, which the lookup keeps reading) */
        const char *d = t->data, *e = m->tok_embd.data;
        const bool in_embd = d >= e && d < e + matrix_bytes(&m->tok_embd);
        if (t->packed && !in_embd)
            eng_gguf_release(m->gguf, t->data, (size_t)matrix_bytes(t));
    }
    return 0;
}

int eng_model_open_gguf_tp(eng_model **out, eng_gguf *g, int rank, int tp)
{
    *out = NULL;
    if (tp < 1 || rank < 0 || rank >= tp) {
        eng_gguf_close(g);
        return eng_fail(-EINVAL, "model: rank %d of a tensor-parallel group of %d", rank, tp);
    }
    eng_model *m = calloc(1, sizeof(*m));
    if (!m) {
        eng_gguf_close(g);
        return -ENOMEM;
    }
    m->gguf = g;
    int rc = read_hparams(g, &m->hp);
    if (rc == 0)
        rc = load_weights(m);
    if (rc == 0) {
        /* the whole model's figures (a rank's share: eng_model_shard_weight_bytes) */
        m->bytes_per_token = matrices_bytes(m) + (int64_t)kn_row_bytes(m->tok_embd.type, m->hp.dim) +
                             m->hp.dim * (int64_t)sizeof(float) * (1 + 2 * m->hp.n_layer);
        m->matmul_params = 0;
        for (int64_t i = 0; i < 1 + 7 * (int64_t)m->hp.n_layer; i++)
            m->matmul_params += matmul_tensor(m, i)->rows * matmul_tensor(m, i)->cols;
        rc = shard_weights(m, rank, tp);
    }
    if (rc == 0)
        rc = pack_weights(m);
    if (rc == 0) {
        rc = eng_tok_create(&m->tok, g);
        if (rc == -ENOENT) {
            m->tok = NULL;
            rc = 0;
        } else if (rc == 0 && eng_tok_n_vocab(m->tok) != m->hp.n_vocab) {
            rc = eng_fail(-EBADMSG, "model: tokenizer has %d tokens but token_embd.weight has "
                                    "%" PRId64 " rows",
                          eng_tok_n_vocab(m->tok), m->hp.n_vocab);
        }
    }
    if (rc < 0) {
        eng_model_close(m);
        return rc;
    }
    *out = m;
    return 0;
}

int eng_model_open_gguf(eng_model **out, eng_gguf *g)
{
    return eng_model_open_gguf_tp(out, g, 0, 1);
}

int eng_model_open_tp(eng_model **out, const char *path, int rank, int tp)
{
    *out = NULL;
    eng_gguf *g;
    int rc = eng_gguf_open(&g, path);
    if (rc < 0)
        return rc;
    return eng_model_open_gguf_tp(out, g, rank, tp);
}

int eng_model_open(eng_model **out, const char *path)
{
    return eng_model_open_tp(out, path, 0, 1);
}

/* Free the backend copies of the weights (eng_model_to_device,
 * eng_model_synthetic); the model's tensors then point at nothing. */
static void release_device(eng_model *m)
{
    kn_ctx *kn = m->dev;
    const int64_t n = m->layers ? 1 + 7 * (int64_t)m->hp.n_layer : 1;
    for (int64_t i = 0; i < n; i++) {
        kn_tensor *t = matmul_tensor(m, i);
        if (i == 0 && m->hp.tied_output)
            continue; /* the embedding's (below) */
        if (!t->data)
            continue;
        if (m->synthetic)
            kn_buf_free(kn, (void *)t->data);
        else
            kn_tensor_release(kn, t);
    }
    if (m->tok_embd.data) {
        if (m->synthetic)
            kn_buf_free(kn, (void *)m->tok_embd.data);
        else
            kn_tensor_release(kn, &m->tok_embd);
    }
    kn_buf_free(kn, m->norms);
    m->norms = NULL;
    if (m->hp.tied_output)
        m->output = (kn_tensor){0}; /* a copy of the embedding's, released above */
    m->dev = NULL;
}

void eng_model_close(eng_model *m)
{
    if (!m)
        return;
    eng_tok_destroy(m->tok);
    if (m->dev)
        release_device(m);
    kn_tensor_unpack(&m->output);
    for (int64_t i = 1; m->layers && i < 1 + 7 * (int64_t)m->hp.n_layer; i++)
        kn_tensor_unpack(matmul_tensor(m, i));
    eng_gguf_close(m->gguf);
    for (int i = 0; m->owned && i < 2 * m->hp.n_layer; i++)
        free(m->owned[i]);
    free(m->owned);
    free(m->layers);
    free(m);
}

const eng_hparams *eng_model_hparams(const eng_model *m)
{
    return &m->hp;
}

const eng_hparams *eng_model_shard_hparams(const eng_model *m)
{
    return &m->lhp;
}

int eng_model_tp(const eng_model *m, int *rank)
{
    if (rank)
        *rank = m->tp_rank;
    return m->tp;
}

int64_t eng_model_vocab_slice(const eng_model *m, int64_t *first, int64_t *chunk)
{
    if (first)
        *first = m->vocab0;
    if (chunk)
        *chunk = m->vocab_chunk;
    return m->lhp.n_vocab;
}

int64_t eng_model_shard_weight_bytes(const eng_model *m)
{
    return matrices_bytes((eng_model *)m); /* reads only */
}

const eng_tok *eng_model_tokenizer(const eng_model *m)
{
    return m->tok;
}

const eng_gguf *eng_model_gguf(const eng_model *m)
{
    return m->gguf;
}

const eng_layer *eng_model_layer(const eng_model *m, int l)
{
    return l >= 0 && l < m->hp.n_layer ? &m->layers[l] : NULL;
}

const kn_tensor *eng_model_tok_embd(const eng_model *m)
{
    return &m->tok_embd;
}

const kn_tensor *eng_model_output(const eng_model *m)
{
    return &m->output;
}

const float *eng_model_output_norm(const eng_model *m)
{
    return m->output_norm;
}

int64_t eng_model_bytes_per_token(const eng_model *m)
{
    return m->bytes_per_token;
}

int64_t eng_model_matmul_params(const eng_model *m)
{
    return m->matmul_params;
}

void eng_model_kv_cfg(const eng_model *m, int block_size, int64_t n_blocks, int max_seqs,
                      int64_t max_seq_len, eng_kv_cfg *out)
{
    *out = (eng_kv_cfg){
        .n_layer = m->hp.n_layer,
        .n_kv_head = m->lhp.n_kv_head, /* this rank's (tp > 1: a shard) */
        .head_dim = m->hp.head_dim,
        .block_size = block_size,
        .n_blocks = n_blocks,
        .max_seqs = max_seqs,
        .max_seq_len = max_seq_len,
    };
}

/* ---- device placement ---------------------------------------------------- */

/* Bytes the weights take in backend memory: every matrix (a tied output
 * once), the embedding, the norm vectors. */
static int64_t device_bytes(eng_model *m)
{
    int64_t b = matrices_bytes(m) + matrix_bytes(&m->tok_embd);
    if (m->hp.tied_output)
        b -= matrix_bytes(&m->output);
    return b + (int64_t)sizeof(float) * m->hp.dim * (1 + 2 * (int64_t)m->hp.n_layer);
}

/* A device with less free memory than the weights need is refused before
 * anything is uploaded, saying how much is needed and available. */
static int check_room(kn_ctx *kn, int64_t need)
{
    size_t free_b, total_b;
    if (kn_ctx_mem_info(kn, &free_b, &total_b) < 0)
        return 0; /* cannot tell: allocation failures will say */
    if ((uint64_t)need > free_b)
        return eng_fail(-ENOMEM, "model: the weights need %.2f GiB of device memory; %s has "
                                 "%.2f GiB free of %.2f GiB",
                        (double)need / (1 << 30), kn_ctx_device(kn),
                        (double)free_b / (1 << 30), (double)total_b / (1 << 30));
    return 0;
}

/* The norm vectors, in one backend buffer: output_norm, then each layer's
 * attn_norm and ffn_norm. src[i] gives vector i on the host (NULL: fill
 * with ones). */
static int upload_norms(eng_model *m, kn_ctx *kn, bool ones)
{
    const int64_t dim = m->hp.dim, nv = 1 + 2 * (int64_t)m->hp.n_layer;
    int rc = kn_buf_alloc(kn, (size_t)(nv * dim) * sizeof(float), (void **)&m->norms);
    if (rc < 0)
        return eng_fail(rc, "model: no device memory for the norm vectors: %s",
                        kn_ctx_error(kn));
    float *ones_v = NULL;
    if (ones) {
        if (!(ones_v = malloc((size_t)dim * sizeof(float))))
            return -ENOMEM;
        for (int64_t i = 0; i < dim; i++)
            ones_v[i] = 1.0f;
    }
    for (int64_t v = 0; v < nv && rc == 0; v++) {
        const float **slot = v == 0 ? &m->output_norm
                             : (v - 1) % 2 == 0 ? &m->layers[(v - 1) / 2].attn_norm
                                                : &m->layers[(v - 1) / 2].ffn_norm;
        float *d = m->norms + v * dim;
        rc = kn_buf_upload(kn, d, ones ? ones_v : *slot, (size_t)dim * sizeof(float));
        *slot = d;
    }
    free(ones_v);
    return rc < 0 ? eng_fail(rc, "model: uploading the norm vectors: %s", kn_ctx_error(kn)) : 0;
}

int eng_model_to_device(eng_model *m, kn_ctx *kn)
{
    if (!m || !kn)
        return -EINVAL;
    if (kn_ctx_host_memory(kn))
        return m->dev && m->dev != kn && !kn_ctx_host_memory(m->dev)
                   ? eng_fail(-EINVAL, "model: the weights are on %s, not in host memory",
                              kn_ctx_device(m->dev))
                   : 0; /* the mapped file is this backend's memory */
    if (m->dev)
        return m->dev == kn ? 0 : eng_fail(-EINVAL, "model: already placed on another device");
    if (m->tp > 1)
        return eng_fail(-ENOTSUP, "model: tensor-parallel shards run on the CPU only (the "
                                  "device path is one device per model)");
    CM_TRY(check_room(kn, device_bytes(m)));
    m->dev = kn;
    const int64_t n = 1 + 7 * (int64_t)m->hp.n_layer;
    int rc = 0;
    for (int64_t i = 0; i <= n && rc == 0; i++) {
        /* i == n: the embedding (after the matrices, so a tied output is
         * uploaded once, as the embedding, and shared) */
        kn_tensor *t = i == n ? &m->tok_embd : matmul_tensor(m, i);
        if (i == 0 && m->hp.tied_output) {
            kn_tensor_unpack(t); /* the tied output becomes the embedding's copy */
            continue;
        }
        kn_tensor host = *t;
        if ((rc = kn_tensor_to_backend(kn, t)) < 0) {
            /* This tensor and the ones after it still point at host
             * memory, which release_device must not hand to the device's
             * free: forget them (the model is unusable now; the caller
             * closes it). */
            kn_tensor_unpack(&host);
            *t = (kn_tensor){0};
            for (int64_t j = i + 1; j < n; j++)
                matmul_tensor(m, j)->data = NULL;
            m->tok_embd.data = NULL;
            if (m->hp.tied_output)
                m->output.data = NULL;
            rc = eng_fail(rc, "model: uploading the weights to %s: %s", kn_ctx_device(kn),
                          kn_ctx_error(kn));
            break;
        }
        kn_tensor_unpack(&host); /* the CPU's packed copy is no longer read */
    }
    if (rc == 0 && m->hp.tied_output)
        m->output = m->tok_embd;
    if (rc == 0)
        rc = upload_norms(m, kn, false);
    if (rc < 0) {
        release_device(m);
        m->output_norm = NULL;
        return rc;
    }
    return 0;
}

int eng_model_synthetic(eng_model **out, const eng_hparams *hp_in, enum kn_dtype t,
                        kn_ctx *kn, uint64_t seed)
{
    if (!out || !hp_in || !kn)
        return -EINVAL;
    *out = NULL;
    eng_hparams hp = *hp_in;
    hp.tied_output = false; /* every matrix has a buffer of its own */
    if (hp.head_dim <= 0 && hp.n_head > 0)
        hp.head_dim = (int)(hp.dim / hp.n_head);
    if (hp.n_kv_head <= 0)
        hp.n_kv_head = hp.n_head;
    if (hp.rope_dims <= 0)
        hp.rope_dims = hp.head_dim;
    if (hp.rope_base <= 0)
        hp.rope_base = 10000.0f;
    if (hp.rms_eps <= 0)
        hp.rms_eps = 1e-5f;
    if (hp.n_ctx <= 0)
        hp.n_ctx = 2048;
    if (hp.n_vocab < 1 || hp.dim < 1 || hp.ffn_dim < 1 || hp.n_layer < 1 || hp.n_head < 1 ||
        hp.head_dim < 1 || hp.n_head % hp.n_kv_head != 0 || hp.rope_dims % 2 != 0 ||
        hp.rope_dims > hp.head_dim)
        return eng_fail(-EINVAL, "model: synthetic shape is inconsistent (vocab %" PRId64
                                 ", dim %" PRId64 ", ffn %" PRId64 ", layers %d, heads %d/%d "
                                 "of %d)",
                        hp.n_vocab, hp.dim, hp.ffn_dim, hp.n_layer, hp.n_head, hp.n_kv_head,
                        hp.head_dim);
    const int64_t qd = (int64_t)hp.n_head * hp.head_dim, kvd = (int64_t)hp.n_kv_head * hp.head_dim;
    if (!kn_row_bytes(t, hp.dim) || !kn_row_bytes(t, qd) || !kn_row_bytes(t, hp.ffn_dim))
        return eng_fail(-EINVAL, "model: synthetic %s weights need widths that are whole "
                                 "blocks (dim %" PRId64 ", heads x head_dim %" PRId64
                                 ", ffn %" PRId64 ")",
                        kn_dtype_name(t), hp.dim, qd, hp.ffn_dim);
    eng_model *m = calloc(1, sizeof(*m));
    if (!m)
        return -ENOMEM;
    m->hp = m->lhp = hp;
    m->tp = 1;
    m->vocab_chunk = hp.n_vocab;
    m->synthetic = true;
    m->layers = calloc((size_t)hp.n_layer, sizeof(eng_layer));
    if (!m->layers) {
        free(m);
        return -ENOMEM;
    }
    m->tok_embd = (kn_tensor){.type = t, .rows = hp.n_vocab, .cols = hp.dim};
    m->output = m->tok_embd;
    for (int l = 0; l < hp.n_layer; l++) {
        eng_layer *L = &m->layers[l];
        L->wq = (kn_tensor){.type = t, .rows = qd, .cols = hp.dim};
        L->wk = (kn_tensor){.type = t, .rows = kvd, .cols = hp.dim};
        L->wv = L->wk;
        L->wo = (kn_tensor){.type = t, .rows = hp.dim, .cols = qd};
        L->w_gate = (kn_tensor){.type = t, .rows = hp.ffn_dim, .cols = hp.dim};
        L->w_up = L->w_gate;
        L->w_down = (kn_tensor){.type = t, .rows = hp.dim, .cols = hp.ffn_dim};
    }
    m->bytes_per_token = matrices_bytes(m) + (int64_t)kn_row_bytes(t, hp.dim) +
                         hp.dim * (int64_t)sizeof(float) * (1 + 2 * hp.n_layer);
    for (int64_t i = 0; i < 1 + 7 * (int64_t)hp.n_layer; i++)
        m->matmul_params += matmul_tensor(m, i)->rows * matmul_tensor(m, i)->cols;
    m->dev = kn;
    int rc = check_room(kn, device_bytes(m));
    /* Weights uniform in +-1/sqrt(width): activations keep their scale
     * through the layers, as in a trained model; the embedding +-1. */
    for (int64_t i = 0; i <= 1 + 7 * (int64_t)hp.n_layer && rc == 0; i++) {
        const bool emb = i == 1 + 7 * (int64_t)hp.n_layer;
        kn_tensor *w = emb ? &m->tok_embd : matmul_tensor(m, i);
        void *d;
        const size_t bytes = (size_t)matrix_bytes(w);
        if ((rc = kn_buf_alloc(kn, bytes, &d)) < 0) {
            rc = eng_fail(rc, "model: no device memory for synthetic weights: %s",
                          kn_ctx_error(kn));
            break;
        }
        w->data = d;
        const float amp = emb ? 1.0f : 1.0f / sqrtf((float)w->cols);
        if ((rc = kn_buf_fill_random(kn, d, t, w->rows * w->cols, ENG_SYNTH_SEED(seed, i),
                                     amp)) < 0)
            rc = eng_fail(rc, "model: filling synthetic weights: %s", kn_ctx_error(kn));
    }
    /* Only the output slot was given a buffer of its own (the model is not
     * tied); the other copies of the struct above were placeholders. */
    if (rc == 0)
        rc = upload_norms(m, kn, true);
    if (rc < 0) {
        eng_model_close(m);
        return rc;
    }
    *out = m;
    return 0;
}
