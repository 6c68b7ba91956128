/* engine sampler — turns one row of logits into the next token, and decides
 * with the request's own seeded RNG. (When a request is finished — EOS,
 * stop strings, max tokens — is engine/model/stop.h.)
 *
 * Role in the request path: the worker runs the forward pass, then one
 * eng_sampler per request picks the token from that request's logits row.
 *
 * Pipeline of eng_sampler_sample() (in this order):
 *   1. repetition penalty over the last repeat_last_n accepted tokens, each
 *      distinct token once (llama.cpp: positive logits / penalty, negative
 *      logits * penalty);
 *   2. temperature <= 0 or top_k == 1: argmax (lowest id on ties), no RNG use;
 *   3. logits / temperature;
 *   4. top-k (k most likely, k <= 0 or >= vocab: all);
 *   5. softmax over the candidates (float32);
 *   6. min-p: drop candidates with p < min_p * p_max;
 *   7. top-p (nucleus): the most likely candidates whose cumulative
 *      probability first exceeds top_p;
 *   8. draw u in [0,1) from the request's RNG and invert the CDF of the kept
 *      candidates (renormalised).
 * With ENG_RNG_LLAMA2C, temperature > 0 and only top-p set, the draws equal
 * llama2.c run.c's sample() bit for bit (same RNG, same order of operations).
 *
 * Threading: an eng_sampler belongs to one request; calls on different
 * samplers may run on different threads. Scratch (vocab-sized) is allocated
 * by eng_sampler_create(); sampling allocates nothing.
 *
 *   eng_sampler *s;
 *   eng_sampler_create(&s, &(eng_sampler_cfg){.temperature = 0.8f, .top_p = 0.95f,
 *                                             .seed = 42}, vocab);
 *   int32_t tok = eng_sampler_sample(s, logits);   // logits are modified
 *   eng_sampler_accept(s, tok);                    // feeds the penalty window
 *   eng_sampler_destroy(s);
 */
#ifndef GORGON_ENG_SAMPLER_H
#define GORGON_ENG_SAMPLER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum eng_rng {
    ENG_RNG_XOSHIRO = 0, /* xoshiro256** seeded through splitmix64 (default) */
    ENG_RNG_LLAMA2C,     /* llama2.c's xorshift64* (for reproducing its outputs) */
};

typedef struct eng_sampler_cfg {
    float temperature;    /* <= 0: greedy */
    int top_k;            /* <= 0: off */
    float top_p;          /* <= 0 or >= 1: off */
    float min_p;          /* <= 0: off */
    float repeat_penalty; /* <= 0 or 1: off */
    int repeat_last_n;    /* window of accepted tokens the penalty looks at (0: 64) */
    uint64_t seed;
    enum eng_rng rng;
} eng_sampler_cfg;

typedef struct eng_sampler eng_sampler;

/* -EINVAL (message in eng_error()) on n_vocab <= 0 or a bad setting, -ENOMEM. */
int eng_sampler_create(eng_sampler **out, const eng_sampler_cfg *cfg, int64_t n_vocab);
void eng_sampler_destroy(eng_sampler *s); /* NULL: no-op */
/* Forget accepted tokens and restart the RNG from seed. */
void eng_sampler_reset(eng_sampler *s, uint64_t seed);
/* Record a token of the sequence (prompt tokens too, if the penalty should
 * see them). */
void eng_sampler_accept(eng_sampler *s, int32_t token);
/* Pick the next token from logits[n_vocab] (host memory); logits are used
 * as scratch. */
int32_t eng_sampler_sample(eng_sampler *s, float *logits);
/* Whether sampling is the plain argmax of the logits (temperature <= 0 or
 * top_k 1, no repetition penalty): the caller may then ask the backend for
 * the argmax instead of fetching the row. NULL (no sampler) is greedy. */
bool eng_sampler_is_greedy(const eng_sampler *s);
/* The RNG's state (4 words), to continue a request's draws in another
 * sampler with the same settings (a prefill -> decode hand-off). */
void eng_sampler_rng_get(const eng_sampler *s, uint64_t st[4]);
void eng_sampler_rng_set(eng_sampler *s, const uint64_t st[4]);

/* ---- sampling from the top-k alone (tensor parallelism) ----
 * Under TP no rank holds a whole logits row: the ranks merge their slices'
 * top-k candidates instead (eng_forward_topk). For a sampler whose choice
 * depends only on the top-k of logits / temperature (eng_sampler_topk > 0:
 * temperature > 0, 1 < top_k < n_vocab, no repetition penalty), sampling
 * from those candidates is the same computation as eng_sampler_sample over
 * the whole row: the same token, the same RNG draw. */
typedef struct eng_cand {
    float p;    /* logit / temperature (a probability inside the sampler) */
    int32_t id; /* token id */
} eng_cand;
/* k when s may sample from the top-k candidates alone, else 0. */
int eng_sampler_topk(const eng_sampler *s);
float eng_sampler_temperature(const eng_sampler *s);
/* top[0..k): the k largest of logits[i] / temperature (divided only when
 * temperature != 1), in descending order, ties by lower id; k must be
 * eng_sampler_topk(s). */
int32_t eng_sampler_sample_topk(eng_sampler *s, const eng_cand *top, int64_t k);
/* The k largest of x[n] into out[0..k), descending, ties by lower index
 * (ids are indices into x). */
void eng_topk_select(const float *x, int64_t n, int64_t k, eng_cand *out);

/* Index of the largest of x[n] (lowest index on ties). */
int32_t eng_argmax(const float *x, int64_t n);

/* The RNG alone (tests, Medusa typical acceptance). */
typedef struct eng_rng_state {
    enum eng_rng kind;
    uint64_t s[4];
} eng_rng_state;
void eng_rng_seed(eng_rng_state *r, enum eng_rng kind, uint64_t seed);
uint32_t eng_rng_u32(eng_rng_state *r);
float eng_rng_f32(eng_rng_state *r); /* [0, 1) */

#endif
