/* medusa_heads — load Medusa-1 heads in the FasterDecoding layout.
 *
 * Role in the request path: a decode worker opens the heads once at
 * start-up, next to the base model; each Medusa step then runs, for every
 * head i on the last hidden state h of the last accepted token,
 *     h' = h + SiLU(W_i h + b_i),   logits_i = LM_i h'
 * with the kn_tensor views given here (kn_ops.matmul; nothing is copied
 * except a non-F32 bias, converted once to F32).
 *
 * Directory layout (FasterDecoding/Medusa, medusa_num_layers = 1):
 *   medusa_lm_head.safetensors  keys {i}.0.linear.weight [H, H]
 *                                    {i}.0.linear.bias   [H]
 *                                    {i}.1.weight        [V, H]
 *   config.json                 medusa_num_heads, medusa_num_layers,
 *                               base_model_name_or_path (all optional)
 * The number of heads is counted from the keys: published configs often
 * state more heads than the file holds, so a disagreement is only a warning.
 * Heads must be numbered 0..n-1 with all three tensors each; any other key
 * (a second ResBlock "{i}.1.linear.weight", a bias on the projection, ...)
 * is rejected, naming it, rather than silently ignored. Weights may be F32,
 * F16 or BF16.
 *
 * Threading: open/close from any thread; an opened eng_medusa_heads is
 * immutable and may be read from any number of threads.
 *
 *   eng_medusa_heads *mh;
 *   if (eng_medusa_heads_open(&mh, dir, n_embd, n_vocab) < 0) die(eng_error());
 *   for (int i = 0; i < eng_medusa_heads_count(mh); i++) {
 *       const eng_medusa_head *h = eng_medusa_heads_get(mh, i);
 *       ops->matmul(ctx, &h->w, hidden, 1, tmp);      // then + bias, SiLU, + hidden
 *       ops->matmul(ctx, &h->lm_head, tmp, 1, logits);
 *   }
 *   eng_medusa_heads_close(mh);
 */
#ifndef GORGON_ENG_MEDUSA_HEADS_H
#define GORGON_ENG_MEDUSA_HEADS_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/kn.h"

#define ENG_MEDUSA_MAX_HEADS 32
#define ENG_MEDUSA_HEADS_FILE "medusa_lm_head.safetensors"
#define ENG_MEDUSA_CONFIG_FILE "config.json"

typedef struct eng_medusa_heads eng_medusa_heads;

/* One head. Pointers stay valid until eng_medusa_heads_close(). */
typedef struct eng_medusa_head {
    kn_tensor w;       /* ResBlock linear: rows = cols = H */
    const float *bias; /* [H] */
    kn_tensor lm_head; /* vocabulary projection: rows = V, cols = H */
} eng_medusa_head;

/* config.json, as written (not trusted for the head count). */
typedef struct eng_medusa_config {
    int present;         /* 1 when config.json exists */
    int num_heads;       /* medusa_num_heads, -1 when absent */
    int num_layers;      /* medusa_num_layers, -1 when absent */
    char base_model[256]; /* base_model_name_or_path, "" when absent (truncated) */
} eng_medusa_config;

/* Parse a config.json text (len bytes). Unknown keys are ignored; the three
 * keys above must have the right type (non-negative integers, a string) when
 * present. Returns 0 or -EBADMSG (eng_error() says why). */
int eng_medusa_config_parse(eng_medusa_config *cfg, const char *text, size_t len);

/* Open `dir`. hidden/vocab: the base model's H and V; every tensor's shape
 * is checked against them. Pass 0 to take them from head 0 (tools that have
 * no base model); all heads must still agree. config.json may be missing
 * (a warning is logged). Errors: -ENOENT (no heads file), -EBADMSG (bad
 * file, missing/extra tensor, wrong shape or dtype), -ENOMEM, -errno; on
 * error *out is unchanged and eng_error() names the file and the problem. */
int eng_medusa_heads_open(eng_medusa_heads **out, const char *dir, int64_t hidden,
                          int64_t vocab);

/* NULL is a no-op. */
void eng_medusa_heads_close(eng_medusa_heads *mh);

/* Write n_heads F32 heads in the layout above to dir (created if missing):
 * head k has w[k] [H][H], b[k] [H] and lm[k] [V][H]; config.json says
 * medusa_num_heads n_heads, medusa_num_layers 1 and base_model (may be
 * NULL). Returns 0, -EINVAL (bad arguments) or -errno; eng_error() names
 * the file. */
int eng_medusa_heads_write(const char *dir, int n_heads, int64_t H, int64_t V,
                           const float *const *w, const float *const *b, const float *const *lm,
                           const char *base_model);

int eng_medusa_heads_count(const eng_medusa_heads *mh);
/* Head i (0 <= i < count) or NULL. */
const eng_medusa_head *eng_medusa_heads_get(const eng_medusa_heads *mh, int i);
int64_t eng_medusa_heads_hidden(const eng_medusa_heads *mh);
int64_t eng_medusa_heads_vocab(const eng_medusa_heads *mh);
const eng_medusa_config *eng_medusa_heads_config(const eng_medusa_heads *mh);

#endif
