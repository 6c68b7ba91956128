/* gguf_write — a small GGUF (v3, or v2 on request) writer.
 *
 * Role: offline only. gorgon-mkmodel builds synthetic Llama models with it,
 * and tests build edge-case and hostile files from it. Nothing in the
 * request path writes GGUF.
 *
 * Files follow the spec exactly (little-endian; header, key/values, tensor
 * infos, zero padding to the alignment, data blob with every tensor at an
 * aligned offset) so other GGUF readers load them. A non-default alignment
 * is recorded as `general.alignment` (u32) automatically.
 *
 * Threading: a writer is used by one thread at a time.
 *
 *   eng_gguf_writer *w;
 *   eng_gguf_writer_create(&w, 3, 0);
 *   eng_gguf_writer_add_str(w, "general.architecture", "llama");
 *   eng_gguf_writer_add_u32(w, "llama.block_count", 2);
 *   int64_t ne[2] = {64, 128};
 *   eng_gguf_writer_add_tensor(w, "token_embd.weight", KN_F32, 2, ne, weights);
 *   eng_gguf_writer_write_file(w, "out.gguf", NULL, NULL);
 *   eng_gguf_writer_destroy(w);
 */
#ifndef GORGON_ENG_GGUF_WRITE_H
#define GORGON_ENG_GGUF_WRITE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/model/gguf.h"

typedef struct eng_gguf_writer eng_gguf_writer;

/* version: 2 or 3 (0 means 3; the two differ only in the version field for
 * little-endian files). alignment: power of two, 0 means 32.
 * -EINVAL for anything else, -ENOMEM. */
int eng_gguf_writer_create(eng_gguf_writer **out, uint32_t version, uint32_t alignment);
void eng_gguf_writer_destroy(eng_gguf_writer *w); /* NULL is a no-op */

/* Key/value pairs, written in the order added. Every add returns 0,
 * -EEXIST for a key already added, -EINVAL for an empty key or a bad
 * argument, -ENOMEM. */
int eng_gguf_writer_add_u8(eng_gguf_writer *w, const char *key, uint8_t v);
int eng_gguf_writer_add_i8(eng_gguf_writer *w, const char *key, int8_t v);
int eng_gguf_writer_add_u16(eng_gguf_writer *w, const char *key, uint16_t v);
int eng_gguf_writer_add_i16(eng_gguf_writer *w, const char *key, int16_t v);
int eng_gguf_writer_add_u32(eng_gguf_writer *w, const char *key, uint32_t v);
int eng_gguf_writer_add_i32(eng_gguf_writer *w, const char *key, int32_t v);
int eng_gguf_writer_add_f32(eng_gguf_writer *w, const char *key, float v);
int eng_gguf_writer_add_bool(eng_gguf_writer *w, const char *key, bool v);
int eng_gguf_writer_add_u64(eng_gguf_writer *w, const char *key, uint64_t v);
int eng_gguf_writer_add_i64(eng_gguf_writer *w, const char *key, int64_t v);
int eng_gguf_writer_add_f64(eng_gguf_writer *w, const char *key, double v);
int eng_gguf_writer_add_str(eng_gguf_writer *w, const char *key, const char *s);
int eng_gguf_writer_add_strn(eng_gguf_writer *w, const char *key, const char *s, size_t n);
/* Numeric array: n packed host (little-endian) elements of elem, any type
 * but ENG_GGUF_STR / ENG_GGUF_ARR (bool elements are bytes 0/1). Copied. */
int eng_gguf_writer_add_arr(eng_gguf_writer *w, const char *key, enum eng_gguf_type elem,
                            const void *data, size_t n);
/* String array: lens may be NULL (strings are then NUL-terminated). Copied. */
int eng_gguf_writer_add_arr_str(eng_gguf_writer *w, const char *key, const char *const *strs,
                                const size_t *lens, size_t n);

/* A tensor: ne[0] contiguous, n_dims 1..4, type F32/F16/BF16/Q8_0/Q4_0 (ne[0]
 * a multiple of 32 for the quantised types). `data` holds exactly the
 * tensor's bytes and is BORROWED: it must stay valid until the write call.
 * data == NULL means the bytes come from the fill callback at write time
 * (so a large model never has to sit in memory whole). Returns the tensor's
 * index, -EEXIST for a duplicate name, -EINVAL, -ENOMEM. */
int64_t eng_gguf_writer_add_tensor(eng_gguf_writer *w, const char *name, enum kn_dtype type,
                                   int n_dims, const int64_t *ne, const void *data);
/* Byte size of tensor idx as it will be written (0 if idx is invalid). */
size_t eng_gguf_writer_tensor_bytes(const eng_gguf_writer *w, int64_t idx);

/* Supplies the bytes of tensor idx (added with data == NULL) into dst;
 * returns 0 or -errno (which aborts the write). */
typedef int (*eng_gguf_fill_fn)(void *ctx, int64_t idx, void *dst, size_t nbytes);

/* Write the file: to path.tmp then rename, so a failed write never leaves a
 * truncated file under `path`. fill may be NULL when every tensor has data.
 * Returns 0 or -errno (eng_error() says what failed). The writer stays
 * usable (writing twice gives the same bytes). */
int eng_gguf_writer_write_file(eng_gguf_writer *w, const char *path, eng_gguf_fill_fn fill,
                               void *ctx);
/* Same, into a malloc'ed buffer the caller frees. */
int eng_gguf_writer_write_mem(eng_gguf_writer *w, void **out, size_t *len, eng_gguf_fill_fn fill,
                              void *ctx);

/* ---- synthetic Llama models (gorgon-mkmodel, tests) -------------------- */

/* Shape and contents of a random-weight Llama model. */
typedef struct eng_synth_llama_cfg {
    int64_t dim, n_layer, n_head, n_head_kv, ffn, n_ctx;
    int64_t n_vocab;          /* ignored with vocab_from */
    enum kn_dtype dtype;      /* of the 2-D weights; norm weights stay F32 */
    uint64_t seed;            /* same seed + shape + dtype = same bytes */
    const char *vocab_from;   /* copy every tokenizer.* key of this GGUF; NULL: synthesise */
    const char *name;         /* general.name (NULL: "gorgon-synth") */
    const char *chat_template; /* tokenizer.chat_template (NULL: none, or vocab_from's) */
    float rope_freq_base;     /* 0: 10000 */
} eng_synth_llama_cfg;

/* Write a Llama GGUF to path: standard llama.* keys and tensor names (ggml
 * ne order, untied output.weight), weights N(0, 0.02), norms 1. The
 * synthesised tokenizer is <unk> <s> </s>, the 256 <0xXX> byte tokens, then
 * "▁", printable ASCII, "▁"+ASCII, lower-case words ("ab", "▁ab", ...) with
 * descending scores, so every piece is reachable by BPE merges; it needs
 * n_vocab >= 354. Tensor bytes are generated one tensor at a time (memory:
 * the largest tensor). Returns 0, -EINVAL (bad shape, eng_error() says
 * which), or the writer's / reader's errors. */
int eng_gguf_write_synth_llama(const char *path, const eng_synth_llama_cfg *cfg);

#endif
