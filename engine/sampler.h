/* engine sampler — turns one row of logits into the next token, and decides
 * when a request is finished (EOS, stop strings, max tokens).
 *
 * Role in the request path: the worker runs the forward pass, then one
 * eng_sampler per request picks the token from that request's logits row;
 * eng_stop runs where the text is decoded (gorgond, or gorgon-run in-process)
 * and holds back text that may be the start of a stop string.
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
/* Pick the next token from logits[n_vocab]; logits are used as scratch. */
int32_t eng_sampler_sample(eng_sampler *s, float *logits);

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

/* ---- stop conditions ---------------------------------------------------- */

enum eng_finish {
    ENG_FINISH_NONE = 0,
    ENG_FINISH_EOS,    /* an end-of-sequence token */
    ENG_FINISH_STOP,   /* a stop string appeared in the text */
    ENG_FINISH_LENGTH, /* max_tokens reached */
};
const char *eng_finish_name(enum eng_finish f);

#define ENG_STOP_MAX_STRINGS 8
#define ENG_STOP_MAX_LEN 64 /* bytes of one stop string */
#define ENG_STOP_MAX_EOS 4

typedef struct eng_stop_cfg {
    const int32_t *eos; /* tokens that end the sequence (not printed) */
    int n_eos;
    const char *const *stop; /* NUL-terminated strings, not printed */
    int n_stop;
    int64_t max_tokens; /* <= 0: no limit */
} eng_stop_cfg;

/* Caller-owned state (no allocation). */
typedef struct eng_stop {
    int32_t eos[ENG_STOP_MAX_EOS];
    int n_eos;
    char stop[ENG_STOP_MAX_STRINGS][ENG_STOP_MAX_LEN];
    size_t stop_len[ENG_STOP_MAX_STRINGS];
    int n_stop;
    int64_t max_tokens, n_tokens;
    char held[ENG_STOP_MAX_LEN]; /* text that may begin a stop string */
    size_t n_held;
    enum eng_finish finish;
} eng_stop;

/* -EINVAL (message in eng_error()) for too many / empty / too long strings. */
int eng_stop_init(eng_stop *st, const eng_stop_cfg *cfg);
/* Feed one generated token and its decoded bytes. Writes to out the text that
 * is now certain to be output (never a stop string or anything after it) and
 * stores its length in *n_out; returns the finish reason (ENG_FINISH_NONE to
 * go on). out_cap must be >= len + ENG_STOP_MAX_LEN (else -ENOBUFS). After a
 * finish, further feeds return the same reason and output nothing. */
int eng_stop_feed(eng_stop *st, int32_t token, const char *piece, size_t len, char *out,
                  size_t out_cap, size_t *n_out);
/* EOS and LENGTH finishes release the held-back text through out themselves;
 * a request that ends for another reason (cancelled, out of context) gets it
 * here: returns its length; out_cap >= ENG_STOP_MAX_LEN. */
size_t eng_stop_flush(eng_stop *st, char *out, size_t out_cap);

#endif
