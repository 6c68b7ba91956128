/* engine tp_split — whether a Llama model splits over `tp` tensor-parallel
 * ranks: the one rule that eng_model_open_tp applies when it shards, and
 * gorgond applies at start-up (it reads the keys from the GGUF, without
 * loading the weights) so that a bad `tp` is refused before any rank runs.
 *
 *   if (eng_tp_split_check(tp, n_head, n_kv_head, ffn, n_vocab) < 0)
 *       fprintf(stderr, "%s\n", eng_error());
 */
#ifndef GORGON_ENG_TP_SPLIT_H
#define GORGON_ENG_TP_SPLIT_H

#include <stdint.h>

/* 0 when tp (>= 1) ranks can hold whole attention heads, whole KV heads
 * (or each KV head replicated on tp / n_kv_head ranks when there are fewer
 * than tp), an equal share of the FFN width and a non-empty vocabulary
 * slice; otherwise -EINVAL with a message naming the numbers (eng_error). */
int eng_tp_split_check(int tp, int n_head, int n_kv_head, int64_t ffn_dim, int64_t n_vocab);

#endif
