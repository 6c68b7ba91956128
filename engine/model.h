/* engine model — a Llama-architecture model read from GGUF (hyper-parameters
 * and weights, used in place from the file mapping), and the batched forward
 * pass over it.
 *
 * Role in the request path: a worker opens the model once, creates one
 * eng_ctx (scratch for the largest batch it will run) and then, step after
 * step, calls eng_forward() with every sequence it is advancing — prompt
 * chunks being prefilled, single decode tokens, Medusa candidate trees — in
 * ONE call: all new tokens are stacked into one M × dim activation matrix so
 * every weight matrix is read once per step for the whole batch.
 *
 * Forward, per GGUF llama (see REFERENCES.md): x = embd[tok]; per layer
 *   h = x + Wo · attn(rope(Wq·n), rope(Wk·n), Wv·n), n = rmsnorm(x)·g_attn
 *   x = h + Wdown · (silu(Wgate·m) ⊙ Wup·m),          m = rmsnorm(h)·g_ffn
 * hidden = rmsnorm(x)·g_out (the FINAL-NORM output, what llama.cpp returns as
 * embeddings and what Medusa heads consume), logits = Wout · hidden.
 *
 * Threading: an eng_model is immutable after open and may be shared by any
 * number of eng_ctx on any threads. An eng_ctx (and the eng_kv it is given)
 * is used by one thread at a time; parallelism comes from its kn_ctx pool.
 * eng_forward() allocates nothing.
 *
 *   eng_model *m;
 *   if (eng_model_open(&m, "stories260K.gguf") < 0) { puts(eng_error()); ... }
 *   const eng_hparams *hp = eng_model_hparams(m);
 *   eng_ctx *c;
 *   eng_ctx_create(&c, m, &(eng_ctx_cfg){.kn = kn, .max_tokens = 512});
 *   eng_kv_cfg kc;      // 16-position blocks, 1024 of them, 4 sequences
 *   eng_model_kv_cfg(m, 16, 1024, 4, hp->n_ctx, &kc);
 *   eng_kv *kv;
 *   eng_kv_create(&kv, kn, &kc);
 *   int s = eng_kv_seq_alloc(kv);
 *   eng_seq_in in = {.seq = s, .tokens = ids, .n_tokens = n};  // outputs: last token
 *   float *logits;      // backend memory
 *   kn_buf_alloc(kn, hp->n_vocab * sizeof(float), (void **)&logits);
 *   int64_t n_out = eng_forward(c, kv, &in, 1, logits, NULL); // logits[1][n_vocab]
 */
#ifndef GORGON_ENG_MODEL_H
#define GORGON_ENG_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/model/gguf.h"
#include "engine/kv.h"
#include "engine/model/tokenizer.h"
#include "kernels/kn.h"

/* Hyper-parameters (from the llama.* keys and the tensor shapes). */
typedef struct eng_hparams {
    int64_t n_vocab;   /* rows of token_embd */
    int64_t dim;       /* llama.embedding_length */
    int64_t ffn_dim;   /* llama.feed_forward_length */
    int n_layer;       /* llama.block_count */
    int n_head;        /* llama.attention.head_count */
    int n_kv_head;     /* llama.attention.head_count_kv (default n_head) */
    int head_dim;      /* dim / n_head (llama.attention.key_length if present) */
    int rope_dims;     /* llama.rope.dimension_count (default head_dim) */
    float rope_base;   /* llama.rope.freq_base (default 10000) */
    float rms_eps;     /* llama.attention.layer_norm_rms_epsilon (default 1e-5) */
    int64_t n_ctx;     /* llama.context_length (default 2048) */
    bool tied_output;  /* no output.weight: logits use token_embd */
} eng_hparams;

/* One block's weights (views into the file mapping: CPU backend memory). */
typedef struct eng_layer {
    const float *attn_norm, *ffn_norm; /* [dim] */
    kn_tensor wq, wk, wv, wo;          /* [n_head*hd][dim], [n_kv*hd][dim] x2, [dim][n_head*hd] */
    kn_tensor w_gate, w_up, w_down;    /* [ffn][dim] x2, [dim][ffn] */
} eng_layer;

typedef struct eng_model eng_model;

/* Open and validate a GGUF llama model (and its tokenizer when the file has
 * one). Errors: -errno of open/mmap, -EBADMSG for a file that is not a
 * usable llama model — unknown architecture, missing key, a tensor missing or
 * with the wrong type or shape (the message names the tensor and gives the
 * expected and found shape) — -ENOMEM. Message in eng_error(). */
int eng_model_open(eng_model **out, const char *path);
/* Same over an already open GGUF; the model takes ownership of g (also on
 * failure: g is closed). */
int eng_model_open_gguf(eng_model **out, eng_gguf *g);
void eng_model_close(eng_model *m); /* NULL: no-op */

/* Open rank `rank` of a tensor-parallel group of `tp` ranks (tp 1: the
 * whole model, as eng_model_open). Megatron-style shards, made at load:
 * Wq/Wk/Wv and Wgate/Wup split by output rows (whole heads; with fewer KV
 * heads than ranks each KV head is replicated on tp / n_kv_head ranks),
 * Wo and Wdown by input columns (copied: a rank's rows are strided in the
 * file), the output matrix by vocabulary rows (ceil(n_vocab / tp) per rank,
 * the last rank's shorter). Only the rank's slices are packed and touched;
 * the embedding rows of each step's tokens are read from the mapping.
 * Errors as eng_model_open, and -EINVAL (message) for a rank outside [0, tp)
 * or a tp that divides the heads, the KV heads (or is not a multiple of
 * them), the FFN width, or a quantized type's blocks, unevenly. A sharded
 * model runs only with an eng_ctx given a communicator of the same group
 * (eng_ctx_cfg.comm). */
int eng_model_open_tp(eng_model **out, const char *path, int rank, int tp);
int eng_model_open_gguf_tp(eng_model **out, eng_gguf *g, int rank, int tp);

/* Place the weights in kn's memory, once, before an eng_ctx on kn runs the
 * model: on a device (kn_ctx_host_memory 0) every matrix, the embedding
 * and the norm vectors are uploaded (kn_tensor_to_backend: the CPU's
 * packed copies are freed, the file mapping stays for the tokenizer); on
 * the CPU it does nothing. Tensor-parallel shards stay on the CPU
 * (-ENOTSUP). A device without room for the weights is refused before
 * anything is uploaded: -ENOMEM, the message says how much is needed and
 * how much is free. After any other failure the model is unusable: close
 * it. Message in eng_error(). */
int eng_model_to_device(eng_model *m, kn_ctx *kn);

/* A model with no file: the shape of hp (n_vocab, dim, ffn_dim, n_layer,
 * n_head required; head_dim, n_kv_head, rope_dims, rope_base, rms_eps and
 * n_ctx default as eng_model_open's keys do; untied output), weights of
 * dtype t allocated in kn's memory and filled there by kn_buf_fill_random
 * (the same on every backend; matrix i — the output 0, then each layer's
 * Wq Wk Wv Wo Wgate Wup Wdown, the embedding last — from seed
 * ENG_SYNTH_SEED(seed, i), amplitude 1/sqrt(cols), the embedding 1), norm
 * vectors of ones. No
 * tokenizer. For benchmarks of shapes whose file would be too big to
 * carry (gorgon-bench engine --synthetic 7b): a 7B F16 model is made on a
 * GPU in a second, never crossing PCIe. -EINVAL (message) for an
 * inconsistent shape or widths that are not whole blocks of t, -ENOMEM. */
int eng_model_synthetic(eng_model **out, const eng_hparams *hp, enum kn_dtype t, kn_ctx *kn,
                        uint64_t seed);
/* (a prime stride: seed s and s + 1 share no matrix) */
#define ENG_SYNTH_SEED(seed, i) ((uint64_t)(seed) * 1000003ull + (uint64_t)(i))

/* The whole model's hyper-parameters (whatever the shard). */
const eng_hparams *eng_model_hparams(const eng_model *m);
/* This rank's shard: n_head, n_kv_head, ffn_dim and n_vocab (its output
 * rows) are its own; the rest equals eng_model_hparams. tp 1: the same. */
const eng_hparams *eng_model_shard_hparams(const eng_model *m);
/* The group size (1: not sharded); *rank (may be NULL) gets the rank. */
int eng_model_tp(const eng_model *m, int *rank);
/* This rank's output rows; *first (may be NULL): its first vocabulary id,
 * *chunk (may be NULL): ceil(n_vocab / tp), every rank's padded share. */
int64_t eng_model_vocab_slice(const eng_model *m, int64_t *first, int64_t *chunk);
/* Bytes of matmul weights this rank holds (its shards; tp 1: all). */
int64_t eng_model_shard_weight_bytes(const eng_model *m);
/* NULL when the file carries no tokenizer. Owned by the model. */
const eng_tok *eng_model_tokenizer(const eng_model *m);
const eng_gguf *eng_model_gguf(const eng_model *m);
const eng_layer *eng_model_layer(const eng_model *m, int l);
const kn_tensor *eng_model_tok_embd(const eng_model *m); /* [n_vocab][dim] */
const kn_tensor *eng_model_output(const eng_model *m);   /* [n_vocab][dim] (tied: token_embd) */
const float *eng_model_output_norm(const eng_model *m);  /* [dim] */
/* Bytes of weights one decode token reads: every matrix once (output matrix
 * included), one embedding row, the norm vectors. */
int64_t eng_model_bytes_per_token(const eng_model *m);
/* Parameters in matrices multiplied per token (for FLOP counts: 2 per param). */
int64_t eng_model_matmul_params(const eng_model *m);

/* A KV cache configuration that fits this model (a shard: its KV heads). */
void eng_model_kv_cfg(const eng_model *m, int block_size, int64_t n_blocks, int max_seqs,
                      int64_t max_seq_len, eng_kv_cfg *out);

/* ---- forward ------------------------------------------------------------ */

typedef struct eng_ctx eng_ctx;

typedef struct eng_ctx_cfg {
    kn_ctx *kn;          /* kernels context (threads, variant); required, outlives ctx */
    int64_t max_tokens;  /* most new tokens (all sequences together) of one forward */
    int64_t max_outputs; /* most output rows of one forward (0: max_tokens) */
    int64_t max_ctx;     /* longest sequence attended over (0: the model's n_ctx) */
    /* The tensor-parallel group (engine/comm) when the model is a shard:
     * every rank calls eng_forward with the same batch, and the forward
     * all-reduces after Wo and Wdown and gathers the vocabulary slices.
     * NULL for an unsharded model. Used by the ctx's thread only. */
    struct comm *comm;
} eng_ctx_cfg;

/* -EINVAL (message), -ENOMEM. Allocates all forward scratch. */
int eng_ctx_create(eng_ctx **out, const eng_model *m, const eng_ctx_cfg *cfg);
void eng_ctx_destroy(eng_ctx *c); /* NULL: no-op */
/* Run the forward with another op table on the same kn_ctx (tests compare
 * kernel variants); NULL restores kn_ctx_ops(). */
void eng_ctx_set_ops(eng_ctx *c, const kn_ops *ops);
const eng_model *eng_ctx_model(const eng_ctx *c);

/* New tokens of one sequence. They go to KV positions n_past .. n_past+n-1
 * where n_past = eng_kv_seq_len(kv, seq) before the call. */
typedef struct eng_seq_in {
    int seq;               /* eng_kv sequence */
    const int32_t *tokens; /* [n_tokens] */
    int64_t n_tokens;      /* > 0 */
    /* RoPE positions [n_tokens]; NULL: n_past + i. (Medusa tree nodes:
     * n_past + depth.) */
    const int32_t *pos;
    /* [n_tokens][n_tokens]: new token i attends to new token j when
     * mask[i*n+j] != 0 (plus every cached position < n_past); the diagonal
     * must be set. NULL: causal (j <= i). Sequences of one batch may share
     * a mask (one upload); a masked sequence of more than 1024 tokens may
     * not fit beside the others (-EINVAL). */
    const uint8_t *mask;
    /* [n_tokens] flags: rows to output; NULL: only the last token. */
    const uint8_t *want;
} eng_seq_in;

/* Run every sequence's new tokens through the model in one pass, append
 * their K/V to kv and return the number of output rows. Output rows are in
 * order of sequences, then of tokens within a sequence:
 *   logits [n_out][n_vocab], hidden [n_out][dim] (final-norm output),
 * both backend addresses on the ctx's kn_ctx (kn_buf_alloc; on the CPU any
 * host memory); either may be NULL to skip it (logits NULL also skips the
 * output matmul). The host inputs (seqs: tokens, positions, masks) are
 * read during the call and reach the backend in one upload; nothing waits
 * for the backend, so a caller fetches only what it needs (an argmax op's
 * ids, say) with kn_buf_download.
 * Errors, with nothing changed (KV lengths, contents of cached positions):
 * -EINVAL (bad token id, sequence listed twice or not allocated, bad mask,
 * more tokens or outputs than the ctx was made for, a sequence longer than
 * max_ctx), -ENOSPC (KV pool exhausted). Message in eng_error(). */
int64_t eng_forward(eng_ctx *c, eng_kv *kv, const eng_seq_in *seqs, int n_seqs, float *logits,
                    float *hidden);

/* eng_forward for greedy decoding: ids[o] (host, [n_out]) gets the argmax
 * of output row o — the lowest id among equal maxima, as the argmax op.
 * Without TP the full logits rows land in `logits` ([n_out][n_vocab],
 * backend) and one id per row is downloaded. With TP each rank takes the
 * argmax of its vocabulary slice and the ranks exchange one (max, id) pair
 * per row instead of n_vocab floats; `logits` is then left as it was.
 * hidden as eng_forward. Returns n_out or the errors of eng_forward. */
int64_t eng_forward_greedy(eng_ctx *c, eng_kv *kv, const eng_seq_in *seqs, int n_seqs,
                           float *logits, float *hidden, int32_t *ids);

/* eng_forward for sampling from the top-k alone (engine/sampler.h): for
 * output row o, top[o * kmax .. o * kmax + k[o]) gets the k[o] largest of
 * logits / temp[o] (divided only when temp[o] != 1), in descending order,
 * ties by lower id: what eng_topk_select gives on the whole row. k[o] is in
 * [1, kmax], kmax <= ENG_TOPK_MAX. With TP each rank selects from its
 * vocabulary slice and the ranks exchange kmax candidates per row instead
 * of n_vocab floats. `logits` ([n_out][n_vocab], backend) is scratch; it
 * holds the whole rows only without TP. Returns n_out or the errors of
 * eng_forward; -EINVAL for a bad kmax (nothing changed) or a bad k[o]
 * (found after the pass: a caller's bug, the KV has advanced). */
#define ENG_TOPK_MAX 1024
struct eng_cand; /* engine/sampler.h */
int64_t eng_forward_topk(eng_ctx *c, eng_kv *kv, const eng_seq_in *seqs, int n_seqs,
                         float *logits, const int32_t *k, const float *temp, int kmax,
                         struct eng_cand *top);

#endif
