/* tokenizer — SentencePiece-style (BPE with byte fallback) tokenizer built
 * from a GGUF file's metadata (`tokenizer.ggml.model = "llama"`).
 *
 * Role in the request path: gorgond encodes text prompts before admitting a
 * request and decodes the token ids streamed back by workers, token by
 * token, into the client's output buffer (eng_tok_stream).
 *
 * Encoding follows llama.cpp's llm_tokenizer_spm exactly (the vocab test
 * cases in models/llama2-vocab are the reference): spaces become U+2581 "▁",
 * a "▁" is prepended when tokenizer.ggml.add_space_prefix (default true) and
 * the text is not empty; the text is split into UTF-8 characters, then the
 * adjacent pair whose concatenation is a vocabulary piece with the highest
 * score is merged repeatedly (ties: leftmost); a final symbol that is not a
 * piece becomes its bytes' <0xXX> tokens, or — when the vocabulary lacks a
 * byte token it needs — one UNK per such symbol. Special-token text such as
 * "<s>" in the input is NOT parsed as a special token (plain text).
 * Cost: O(n log n) in the text length (heap of candidate merges over a
 * linked list of symbols; hash lookup of pieces).
 *
 * Decoding: normal pieces with ▁ → space, <0xXX> → that byte, control and
 * unused tokens → nothing, UNK → "▅" (U+2585, as llama.cpp), user-defined
 * pieces verbatim; the first piece after BOS loses its leading space (the
 * one the encoder's prefix added), as llama2.c and llama.cpp do. The stream
 * decoder only emits complete UTF-8 characters; ill-formed byte sequences
 * become U+FFFD (one per maximal ill-formed subpart, WHATWG/Unicode
 * "substitution of maximal subparts"), so the output is always valid UTF-8.
 *
 * Threading: an eng_tok is immutable after create; every function taking a
 * `const eng_tok *` may run on any number of threads at once. An
 * eng_tok_stream belongs to one request and one thread at a time.
 *
 *   eng_tok *tok;
 *   if (eng_tok_create(&tok, gguf) < 0) { fprintf(stderr, "%s\n", eng_error()); ... }
 *   int32_t ids[256];
 *   int64_t n = eng_tok_encode(tok, "Lily and Tom", 12, true, ids, 256);
 *   eng_tok_stream st;
 *   eng_tok_stream_init(&st, eng_tok_bos(tok));   // generation starts after BOS
 *   char buf[ENG_TOK_STREAM_SLACK + 64];
 *   int64_t nb = eng_tok_stream_push(tok, &st, next_id, buf, sizeof(buf));
 *   ... at the end: nb = eng_tok_stream_flush(tok, &st, buf, sizeof(buf));
 *   eng_tok_destroy(tok);
 */
#ifndef GORGON_ENG_TOKENIZER_H
#define GORGON_ENG_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/model/gguf.h"

/* Token types (tokenizer.ggml.token_type values, as llama.cpp). */
enum eng_tok_type {
    ENG_TOK_UNDEFINED = 0,
    ENG_TOK_NORMAL = 1,
    ENG_TOK_UNKNOWN = 2,
    ENG_TOK_CONTROL = 3,
    ENG_TOK_USER_DEFINED = 4,
    ENG_TOK_UNUSED = 5,
    ENG_TOK_BYTE = 6,
};

typedef struct eng_tok eng_tok;

/* Build from g's metadata: tokenizer.ggml.model (must be "llama"),
 * tokenizer.ggml.tokens (required), .scores and .token_type (optional: 0.0
 * and inferred types), .bos_token_id / .eos_token_id / .unknown_token_id
 * (optional; defaults 1 / 2 / 0 when in range), .add_bos_token (default
 * true), .add_space_prefix (default true). The tokenizer copies what it
 * needs: g may be closed afterwards. Errors: -ENOENT (no tokenizer in the
 * file), -EBADMSG (malformed or unsupported tokenizer metadata), -ENOMEM;
 * eng_error() says which. */
int eng_tok_create(eng_tok **out, const eng_gguf *g);
void eng_tok_destroy(eng_tok *t); /* NULL is a no-op */

/* Encode len bytes of text (need not be NUL-terminated, may be any bytes),
 * prepending BOS when add_bos. Returns the number of tokens written to out.
 * If out is NULL the count is computed and returned without writing (size
 * query). -ENOSPC if out is non-NULL and the tokens do not fit in cap (out's
 * contents are then unspecified); -EINVAL on NULL text with len > 0 or a
 * text over ~700 MB; -EILSEQ if a character has neither a piece, byte
 * tokens nor an UNK to fall back on; -ENOMEM. The count never exceeds
 * 3 * len + 4, so a buffer of that size always suffices. Allocates scratch
 * proportional to len (not a hot path); about 10 MB/s on English text. */
int64_t eng_tok_encode(const eng_tok *t, const char *text, size_t len, bool add_bos,
                       int32_t *out, size_t cap);

int32_t eng_tok_n_vocab(const eng_tok *t);
int32_t eng_tok_bos(const eng_tok *t); /* -1 if none */
int32_t eng_tok_eos(const eng_tok *t); /* -1 if none */
int32_t eng_tok_unk(const eng_tok *t); /* -1 if none */
bool eng_tok_add_bos(const eng_tok *t); /* tokenizer.ggml.add_bos_token */
bool eng_tok_add_space_prefix(const eng_tok *t);
/* Whether generation should stop on this token (EOS, or any control token
 * other than BOS). */
bool eng_tok_is_eog(const eng_tok *t, int32_t id);

/* The stored piece text of id (e.g. "▁Lily", "<0x0A>", "<s>"), NOT
 * NUL-terminated, length in *len; NULL if id is out of range. */
const char *eng_tok_piece(const eng_tok *t, int32_t id, size_t *len);
float eng_tok_score(const eng_tok *t, int32_t id);          /* 0 if out of range */
enum eng_tok_type eng_tok_type(const eng_tok *t, int32_t id); /* UNDEFINED if out of range */
/* Longest decoded piece in bytes; see ENG_TOK_STREAM_SLACK. */
size_t eng_tok_max_piece_bytes(const eng_tok *t);
/* Id of an exact piece text, or -1. */
int32_t eng_tok_find(const eng_tok *t, const char *piece, size_t len);

/* ---- streaming decode -------------------------------------------------- */

/* Caller-owned state of one decode stream (no allocation; copyable). */
typedef struct eng_tok_stream {
    int32_t prev;     /* previous token pushed (or the init value) */
    uint8_t pend[4];  /* bytes of an incomplete UTF-8 character */
    uint8_t n_pend;
} eng_tok_stream;

/* Bytes of output room that, added to eng_tok_max_piece_bytes(), always
 * suffice for one push: cap >= 3 * max_piece_bytes + ENG_TOK_STREAM_SLACK. */
#define ENG_TOK_STREAM_SLACK 16

/* Start a stream. prev_token: the token that precedes the first one to be
 * pushed — pass eng_tok_bos(t) when the first pushed token follows BOS (its
 * leading space is then dropped), the last prompt token when streaming a
 * continuation, or -1 for none. */
void eng_tok_stream_init(eng_tok_stream *st, int32_t prev_token);

/* Decode one token. Writes the bytes of every UTF-8 character completed by
 * this token to out and returns their count (0 is common: a control token,
 * or the first bytes of a character split across byte tokens). Bytes of a
 * still-incomplete character are kept in st. Ill-formed input becomes
 * U+FFFD. Errors: -EINVAL for an id out of range; -ENOSPC if the output
 * does not fit in cap. On error nothing is written and st is unchanged. */
int64_t eng_tok_stream_push(const eng_tok *t, eng_tok_stream *st, int32_t token, char *out,
                            size_t cap);

/* End of stream: an incomplete character still pending becomes U+FFFD.
 * Returns bytes written (0 or 3), -ENOSPC (st unchanged) if cap is too small.
 * The stream may be reused after flush; prev is kept. */
int64_t eng_tok_stream_flush(const eng_tok *t, eng_tok_stream *st, char *out, size_t cap);

/* Whole-sequence convenience: decode n tokens as if pushed into a fresh
 * stream started with prev_token (see eng_tok_stream_init) and flushed.
 * Returns the byte count written (not NUL-terminated), -ENOSPC / -EINVAL.
 * If out is NULL, returns the byte count needed. */
int64_t eng_tok_decode(const eng_tok *t, const int32_t *tokens, size_t n, int32_t prev_token,
                       char *out, size_t cap);

#endif
