/* medusa — the Medusa-1 speculative decoding step: heads → candidate tree →
 * one batched forward over every sequence's tree → acceptance → KV
 * compaction.
 *
 * Role in the request path: a decode worker creates one eng_medusa next to
 * its eng_ctx (forward scratch) at start-up. After a sequence's prompt has
 * been prefilled with eng_forward() asking for the last token's logits AND
 * final-norm hidden state, eng_medusa_seq_begin() hands those to the decoder;
 * from then on every eng_medusa_step() advances any set of started sequences
 * by 1 + accepted tokens each, with ONE eng_forward() call for all of them.
 *
 * One step, per sequence (FasterDecoding/Medusa, medusa_num_layers = 1):
 *   1. root = next token of the base model from the pending logits (greedy:
 *      argmax; typical: sampled from the typical-truncated distribution with
 *      the sequence's own seeded RNG);
 *   2. every head i on the pending hidden state h: h' = h + SiLU(W_i h + b_i),
 *      logits_i = LM_i h' (all sequences stacked; all heads' W_i stacked
 *      into one product; the LM_i in one product over all heads' rows when
 *      they all equal the base output matrix, else one per head, converted
 *      at create to the base output's type when that is quantised — see
 *      eng_medusa_projection); top-k of each → tree node tokens
 *      (eng_medusa_tree.tree_indices);
 *   3. the tree's n_nodes tokens go through the model at cache slots
 *      len .. len+n_nodes-1, RoPE positions len + depth, the tree mask;
 *   4. acceptance along the tree's retrieve paths: greedy — the longest path
 *      whose every token is the argmax at its parent node (so the output is
 *      exactly plain greedy decoding); typical — the longest path whose every
 *      token has p > min(eps, alpha·exp(−H(p))) at its parent, p the
 *      softmax of logits/temperature (equal lengths: largest sum of log p);
 *   5. the accepted nodes' K/V move to slots len+1, len+2, ...
 *      (eng_kv_copy_positions) and the sequence is truncated to
 *      len + 1 + accepted; the logits and hidden state of the last accepted
 *      node become the pending ones: one forward per step.
 * After a step the KV holds exactly the tokens up to and including the last
 * one emitted, as plain decoding would after feeding them. A step writes a
 * whole tree first, so a sequence needs n_nodes positions of slack in the
 * pool and under max_seq_len / max_ctx beyond what it keeps.
 *
 * Sequences are identified by their eng_kv sequence id (0 .. max_seqs-1).
 *
 * Threading: an eng_medusa belongs to the thread that drives its eng_ctx and
 * eng_kv. eng_medusa_step() allocates nothing, logs nothing and takes no
 * locks; every buffer is sized at eng_medusa_create().
 *
 *   eng_medusa *md;
 *   eng_medusa_create(&md, &(eng_medusa_cfg){.model = m, .kn = kn, .heads = mh,
 *                                             .tree = t, .max_seqs = 8});
 *   // eng_ctx made with max_tokens >= eng_medusa_step_tokens(md, n_seqs)
 *   eng_forward(c, kv, &prompt_in, 1, logits, hidden);   // last token only
 *   eng_medusa_seq_begin(md, seq, logits, hidden, seed);
 *   eng_medusa_result r;
 *   while (...) {
 *       if (eng_medusa_step(md, c, kv, &seq, 1, &r) < 0) die(eng_error());
 *       emit(r.tokens, r.n_tokens);                        // 1 + r.n_accepted
 *   }
 *   eng_medusa_destroy(md);
 */
#ifndef GORGON_ENG_MEDUSA_H
#define GORGON_ENG_MEDUSA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/kv.h"
#include "engine/medusa/medusa_heads.h"
#include "engine/medusa/medusa_tree.h"
#include "engine/model.h"
#include "engine/sampler.h"
#include "kernels/kn.h"

#define ENG_MEDUSA_EPS_DEFAULT 0.09f  /* posterior_threshold in Medusa */
#define ENG_MEDUSA_ALPHA_DEFAULT 0.3f /* posterior_alpha (√eps as in Medusa) */

enum eng_medusa_accept {
    ENG_MEDUSA_GREEDY = 0, /* exact argmax match: identical to plain greedy */
    ENG_MEDUSA_TYPICAL,    /* typical acceptance (sampling) */
};

typedef struct eng_medusa_cfg {
    const eng_model *model;        /* base model (outlives the decoder) */
    kn_ctx *kn;                    /* kernels for the heads (the eng_ctx's one) */
    const eng_medusa_heads *heads; /* >= tree->n_heads heads, H = dim, V = n_vocab */
    const eng_medusa_tree *tree;   /* outlives the decoder */
    int max_seqs;                  /* sequence ids are 0 .. max_seqs-1 */
    enum eng_medusa_accept accept;
    /* Typical only: softmax temperature (> 0; 0 means 1.0) and the threshold
     * min(eps, alpha·exp(−H)); 0 picks the defaults above. */
    float temperature, eps, alpha;
    /* A tensor-parallel model (eng_model_open_tp): its group's
     * communicator, the eng_ctx's. The heads' vocabulary projections are
     * then split like the model's output matrix: each rank projects onto
     * its vocabulary slice and takes its top-k there, and the ranks merge
     * their (logit, id) lists into the whole row's top-k (larger first,
     * ties to the lower id: the topk op's order), so every rank draws the
     * same candidates as an unsplit model and holds 1/tp of the
     * projections. Every rank calls the step functions in the same order
     * (they run a collective). NULL for a model that is not sharded. */
    struct comm *comm;
} eng_medusa_cfg;

typedef struct eng_medusa eng_medusa;

/* How the step computes the heads' vocabulary logits (chosen at create). */
enum eng_medusa_proj {
    ENG_MEDUSA_PROJ_HEADS = 0, /* each head's own projection, as loaded */
    ENG_MEDUSA_PROJ_QUANTIZED, /* each head's own, converted at create to the base output
                                  matrix's quantised type (Q8_0, Q4_0): a quantised
                                  model decodes memory-bound */
    ENG_MEDUSA_PROJ_SHARED,    /* every head's projection equals the base output matrix
                                  (gorgon-medusa-train --freeze-lm): one product over all
                                  heads' rows reads that matrix once */
};

/* Per-sequence outcome of one step. */
typedef struct eng_medusa_result {
    int32_t tokens[ENG_MEDUSA_MAX_DEPTH + 1]; /* root, then accepted candidates */
    int n_tokens;                             /* 1 + n_accepted */
    int n_accepted;                           /* tree tokens accepted (0 .. max_depth) */
} eng_medusa_result;

/* -EINVAL (message in eng_error(): too few heads for the tree, heads of the
 * wrong shape, bad temperature/eps/alpha, max_seqs < 1) or -ENOMEM. */
int eng_medusa_create(eng_medusa **out, const eng_medusa_cfg *cfg);
void eng_medusa_destroy(eng_medusa *md); /* NULL: no-op */

/* The projection mode create chose (ENG_MEDUSA_PROJ_HEADS for NULL). */
enum eng_medusa_proj eng_medusa_projection(const eng_medusa *md);

/* New tokens one forward of a step over n_seqs sequences runs (= the output
 * rows it asks for): the eng_ctx needs max_tokens (and max_outputs) at least
 * this, and every sequence needs room for tree->n_nodes more KV positions. */
int64_t eng_medusa_step_tokens(const eng_medusa *md, int n_seqs);

/* Start (or restart) sequence seq: logits [n_vocab] and hidden [dim] are the
 * forward outputs of its last token, backend addresses on the decoder's
 * kn_ctx (copied on the backend). seed seeds its RNG (typical sampling of
 * the root; unused by greedy). -EINVAL for a bad id or NULL. */
int eng_medusa_seq_begin(eng_medusa *md, int seq, const float *logits, const float *hidden,
                         uint64_t seed);
/* Forget sequence seq (a later step naming it fails). No-op when unknown. */
void eng_medusa_seq_end(eng_medusa *md, int seq);
/* The pending logits [n_vocab] / hidden [dim] of a started sequence: the
 * forward outputs at its last emitted token, from which the next root is
 * drawn and the heads run (backend addresses). NULL for a sequence not
 * started. Valid until the next step or begin for that sequence. */
const float *eng_medusa_seq_logits(const eng_medusa *md, int seq);
const float *eng_medusa_seq_hidden(const eng_medusa *md, int seq);
/* Greedy: the argmax of the pending logits (the token the next step
 * starts from, known on the host without a download); -EINVAL for a
 * sequence not started or a typical decoder. */
int32_t eng_medusa_seq_root(const eng_medusa *md, int seq);

/* Advance sequences seqs[0..n_seqs) (distinct, started) by one Medusa step
 * each, in one eng_forward() on c/kv; res[i] gets sequence seqs[i]'s tokens.
 * Returns the total number of tokens emitted, or: -EINVAL (unknown or
 * repeated sequence, n_seqs outside 1..max_seqs, ctx too small for the
 * batch, a sequence that would pass the ctx's max_ctx), -ENOSPC (KV pool or
 * max_seq_len exhausted) — message in eng_error(); on any error no sequence
 * changed (KV lengths and contents of cached positions, pending logits, RNG
 * state). */
int64_t eng_medusa_step(eng_medusa *md, eng_ctx *c, eng_kv *kv, const int *seqs, int n_seqs,
                        eng_medusa_result *res);

/* The same step split around the forward, for a caller that runs the trees
 * in the same eng_forward() as other sequences (a serving worker batching
 * Medusa and plain decoding together):
 *   prepare: draws the roots, runs the heads and fills in[0..n_seqs) with
 *            the trees (pointing into md's buffers, valid until finish or
 *            abort); returns the new tokens (n_seqs · n_nodes) or -EINVAL;
 *   the caller's eng_forward() must ask for every tree row's logits and
 *   hidden state (in[].want does), in this order;
 *   finish:  logits [n_seqs·n_nodes][n_vocab] and hidden [..][dim] are those
 *            rows; accepts, compacts the KV and fills res like step;
 *   abort:   the forward failed: undoes prepare (RNG state), so that the
 *            sequences are as before.
 * Exactly one finish or abort follows each successful prepare, with the same
 * seqs and n_seqs. */
int64_t eng_medusa_step_prepare(eng_medusa *md, const eng_kv *kv, const int *seqs, int n_seqs,
                                eng_seq_in *in);
int64_t eng_medusa_step_finish(eng_medusa *md, eng_kv *kv, const int *seqs, int n_seqs,
                               const float *logits, const float *hidden,
                               eng_medusa_result *res);
void eng_medusa_step_abort(eng_medusa *md, const int *seqs, int n_seqs);

/* Typical acceptance's threshold min(eps, alpha · exp(−H)) from a row's
 * softmax statistics (kn_ops.softmax_stats at the decoder's temperature:
 * [max, log-sum-exp, entropy H]); a token x of that row is accepted when
 * exp(logits[x]/temperature − stats[1]) exceeds it. */
float eng_medusa_typical_threshold(const float stats[3], float eps, float alpha);

#endif
