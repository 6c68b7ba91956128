/* engine/model stop — decides when a request is finished: an end token, a
 * stop string in the decoded text, or max_tokens.
 *
 * Role in the request path: eng_stop runs where the text is decoded
 * (gorgond, or gorgon-run in-process) and holds back text that may be the
 * start of a stop string, so a stop string never reaches the client.
 *
 * Threading: an eng_stop is caller-owned state of one request; no call
 * allocates.
 *
 *   eng_stop st;
 *   eng_stop_init(&st, &(eng_stop_cfg){.stop = (const char *[]){"\n\n"}, .n_stop = 1});
 *   size_t n;
 *   int fin = eng_stop_feed(&st, tok, piece, plen, out, sizeof(out), &n);
 */
#ifndef GORGON_ENG_STOP_H
#define GORGON_ENG_STOP_H

#include <stddef.h>
#include <stdint.h>

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
