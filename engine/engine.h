/* engine — the model runtime of a gorgon worker: model files (GGUF), the
 * tokenizer, the paged KV cache, the batched forward pass, sampling and stop
 * conditions, and a small in-process generation loop (gorgon-run, tests).
 *
 * Role in the request path: gorgond tokenizes (engine/model/tokenizer.h) and
 * schedules; a worker owns an eng_model, an eng_ctx (forward scratch) and an
 * eng_kv (the paged cache, later in shared memory), and each step calls
 * eng_forward() once for every sequence it advances (prefill chunks, decode
 * tokens, Medusa trees), then samples each request's row with its own
 * eng_sampler. Tokens go back to gorgond, which detokenizes (eng_tok_stream)
 * and applies stop strings (eng_stop).
 *
 * Threading: eng_model and eng_tok are immutable after open and shareable
 * across threads. eng_ctx, eng_kv, eng_sampler and eng_stop belong to one
 * thread at a time; parallel work happens inside the kernels' thread pool
 * (kn_ctx), so the caller never spawns threads. Nothing in the per-token path
 * allocates.
 *
 * Usage (what gorgon-run does):
 *   kn_ctx *kn;      kn_ctx_create(&kn, &(kn_ctx_cfg){.n_threads = 1});
 *   eng_model *m;    eng_model_open(&m, "stories260K.gguf");
 *   eng_ctx *c;      eng_ctx_create(&c, m, &(eng_ctx_cfg){.kn = kn, .max_tokens = 256});
 *   eng_kv_cfg kc;   eng_model_kv_cfg(m, 16, 64, 1, 1024, &kc);
 *   eng_kv *kv;      eng_kv_create(&kv, kn, &kc);
 *   int seq = eng_kv_seq_alloc(kv);
 *   int32_t ids[64]; int64_t n = eng_tok_encode(eng_model_tokenizer(m), "Once", 4, true, ids, 64);
 *   eng_gen_result r;
 *   eng_generate(c, kv, seq, &(eng_gen_cfg){.prompt = ids, .n_prompt = n, .steps = 256,
 *                                           .on_text = print_cb}, &r);
 *   ... eng_kv_destroy(kv); eng_ctx_destroy(c); eng_model_close(m); kn_ctx_destroy(kn);
 */
#ifndef GORGON_ENGINE_H
#define GORGON_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "engine/kv.h"
#include "engine/medusa/medusa.h"
#include "engine/medusa/medusa_heads.h"
#include "engine/medusa/medusa_tree.h"
#include "engine/model.h"
#include "engine/model/eng_err.h"
#include "engine/model/gguf.h"
#include "engine/model/safetensors.h"
#include "engine/model/stop.h"
#include "engine/model/tokenizer.h"
#include "engine/sampler.h"
#include "kernels/kn.h"

/* ---- in-process generation (one sequence) --------------------------------
 * llama2.c step semantics: `steps` counts positions including the prompt
 * (BOS included), so the text holds exactly `steps` tokens after BOS unless
 * generation stops early: on BOS or EOS (not printed), a stop string, or a
 * callback returning < 0. The prompt is run as one batched forward; prompt
 * tokens after BOS are reported (and printed) like generated ones, as
 * llama2.c does. */
typedef struct eng_gen_cfg {
    const int32_t *prompt; /* [n_prompt], normally starting with BOS */
    int64_t n_prompt;      /* >= 1 */
    int64_t steps;         /* positions including the prompt (> 0) */
    eng_sampler *sampler;  /* NULL: greedy */
    const char *const *stop; /* stop strings (optional) */
    int n_stop;
    /* Called for every token after BOS (prompt and generated), in order,
     * with the text it completed (after stop-string hold-back; may be empty).
     * Return < 0 to stop. Either callback may be NULL. */
    int (*on_token)(void *arg, int32_t token, const char *text, size_t len);
    void *arg;
} eng_gen_cfg;

typedef struct eng_gen_result {
    int64_t n_prompt;    /* prompt tokens run */
    int64_t n_generated; /* tokens sampled */
    enum eng_finish finish;
    uint64_t prefill_ns; /* prompt forward */
    uint64_t decode_ns;  /* every later forward + sampling */
} eng_gen_result;

/* Run the prompt and generate on sequence seq (which should be empty).
 * Needs the model's tokenizer for text (on_token gets len 0 without one).
 * Returns 0 or -errno (message in eng_error()); res is filled either way. */
int eng_generate(eng_ctx *c, eng_kv *kv, int seq, const eng_gen_cfg *cfg, eng_gen_result *res);

#endif
