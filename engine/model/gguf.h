/* gguf — read-only access to a GGUF model file (v2 and v3).
 *
 * Role in the request path: workers open the model once at start-up, take
 * tensor pointers straight out of the read-only mapping (no copy) and hand
 * them to the kernels; gorgond opens the same file to build the tokenizer
 * from its metadata. Nothing here runs per token.
 *
 * The whole file is validated at open: header, every key/value, every tensor
 * info, and the placement of every tensor in the data blob (in bounds,
 * aligned, not overlapping another tensor, byte size matching shape × type).
 * After a successful open every accessor is a plain lookup that cannot fail
 * on file contents. A bad file gives -EBADMSG (or -ENOMEM / an open/mmap
 * errno) and a message in eng_error() naming the problem; it never crashes.
 *
 * Accepted tensor types: F32, F16, BF16, Q8_0, Q4_0 (any other ggml type is
 * rejected, naming it). Nested arrays (array of arrays) are rejected, as in
 * ggml's own reader. Keys and tensor names must be non-empty, free of NUL
 * bytes and unique.
 *
 * The mapping is MAP_PRIVATE and read-only; as with any mmap, truncating the
 * file while it is open makes later reads of the lost pages fault (SIGBUS),
 * so model files are replaced by rename, never rewritten in place (the
 * writer in gguf_write.h does exactly that).
 *
 * Threading: open/close from any thread; a successfully opened eng_gguf is
 * immutable, so every const accessor may be called from any number of
 * threads at once.
 *
 * Lifetime: every pointer returned (key names, strings, tensor infos, tensor
 * data, array data) stays valid until eng_gguf_close(). For
 * eng_gguf_open_mem() the caller's buffer must also outlive the eng_gguf.
 *
 *   eng_gguf *g;
 *   int rc = eng_gguf_open(&g, "model.gguf");
 *   if (rc < 0) { fprintf(stderr, "%s\n", eng_error()); return rc; }
 *   uint32_t n_layer;
 *   if (eng_gguf_get_u32(g, "llama.block_count", &n_layer) < 0) ...
 *   const struct eng_gguf_tensor *t = eng_gguf_find_tensor(g, "token_embd.weight");
 *   // t->ne[0] = dim (contiguous), t->ne[1] = n_vocab, t->data in the mapping
 *   eng_gguf_close(g);
 */
#ifndef GORGON_ENG_GGUF_H
#define GORGON_ENG_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/kn.h"

/* Metadata value types; the values are the GGUF type ids. */
enum eng_gguf_type {
    ENG_GGUF_U8 = 0,
    ENG_GGUF_I8 = 1,
    ENG_GGUF_U16 = 2,
    ENG_GGUF_I16 = 3,
    ENG_GGUF_U32 = 4,
    ENG_GGUF_I32 = 5,
    ENG_GGUF_F32 = 6,
    ENG_GGUF_BOOL = 7,
    ENG_GGUF_STR = 8,
    ENG_GGUF_ARR = 9,
    ENG_GGUF_U64 = 10,
    ENG_GGUF_I64 = 11,
    ENG_GGUF_F64 = 12,
    ENG_GGUF_TYPE_COUNT
};

#define ENG_GGUF_MAX_DIMS 4
#define ENG_GGUF_DEFAULT_ALIGNMENT 32

typedef struct eng_gguf eng_gguf;

/* One tensor. ne[0] is the innermost (contiguous) dimension; ne[i] = 1 for
 * i >= n_dims. `data` points into the file mapping (aligned to the file's
 * alignment relative to the blob start; the blob start itself is aligned in
 * the file, and mmap returns page-aligned memory). `offset` is relative to
 * the data blob as stored in the file. */
struct eng_gguf_tensor {
    const char *name;
    int n_dims;
    int64_t ne[ENG_GGUF_MAX_DIMS];
    enum kn_dtype type;
    const void *data;
    size_t nbytes;
    uint64_t offset;
};

/* An array value. `data` points into the file: for numeric element types it
 * is `n` packed little-endian elements, NOT necessarily aligned for the
 * element type (GGUF metadata is unaligned) — read them with the
 * eng_gguf_arr_* helpers or memcpy. For ENG_GGUF_STR elements use
 * eng_gguf_arr_str(). */
typedef struct eng_gguf_arr {
    enum eng_gguf_type type; /* element type, never ENG_GGUF_ARR */
    uint64_t n;
    const void *data;
    int64_t kv; /* index of the owning key (for eng_gguf_arr_str) */
} eng_gguf_arr;

/* Map `path` read-only and validate it. On success *out owns the mapping.
 * Errors: -errno from open/fstat/mmap, -EBADMSG for a malformed file,
 * -ENOMEM. On error *out is left unchanged and eng_error() says why. */
int eng_gguf_open(eng_gguf **out, const char *path);

/* Same, over caller memory (no copy): `data` must stay valid and unchanged
 * until eng_gguf_close(). Used by tests and the fuzzer. */
int eng_gguf_open_mem(eng_gguf **out, const void *data, size_t len);

/* Unmap (if mapped) and free. NULL is a no-op. */
void eng_gguf_close(eng_gguf *g);

uint32_t eng_gguf_version(const eng_gguf *g);     /* 2 or 3 */
size_t eng_gguf_alignment(const eng_gguf *g);     /* general.alignment or 32 */
size_t eng_gguf_file_bytes(const eng_gguf *g);    /* whole file length */
size_t eng_gguf_data_offset(const eng_gguf *g);   /* file offset of the data blob */
const void *eng_gguf_file_data(const eng_gguf *g); /* start of the mapping */

/* Drop the whole pages of [p, p + len) (inside the file's data) from this
 * process's memory: a model whose weights were copied elsewhere (packed)
 * need not also keep the file's pages resident. Reading them again later is
 * still valid (they come back from the file). A no-op for eng_gguf_open_mem
 * files (caller memory, which must not be touched). */
void eng_gguf_release(const eng_gguf *g, const void *p, size_t len);

/* ---- metadata ---------------------------------------------------------- */

int64_t eng_gguf_kv_count(const eng_gguf *g);
/* Index of `key`, or -ENOENT. O(1) (hash). */
int64_t eng_gguf_find_kv(const eng_gguf *g, const char *key);
/* Key name / value type of index i (0 <= i < count; NULL / -1 otherwise). */
const char *eng_gguf_kv_key(const eng_gguf *g, int64_t i);
int eng_gguf_kv_type(const eng_gguf *g, int64_t i);
const char *eng_gguf_type_name(int type); /* "u32", "string", "array", ... ; "?" if unknown */
/* Bytes of one value of a fixed-size type; 0 for string, array or unknown. */
size_t eng_gguf_type_size(uint32_t type);

/* Typed getters. Return 0 and store the value; -ENOENT if the key is absent;
 * -EBADMSG if the stored type cannot represent the request: a non-numeric
 * type, or an integer outside the requested type's range (integer widths
 * and signedness convert freely when the value fits). get_f32 accepts f32,
 * f64 (range-checked) and any integer type; get_bool accepts only bool.
 * On error *out is unchanged and eng_error() names the key. */
int eng_gguf_get_u32(const eng_gguf *g, const char *key, uint32_t *out);
int eng_gguf_get_i32(const eng_gguf *g, const char *key, int32_t *out);
int eng_gguf_get_u64(const eng_gguf *g, const char *key, uint64_t *out);
int eng_gguf_get_i64(const eng_gguf *g, const char *key, int64_t *out);
int eng_gguf_get_f32(const eng_gguf *g, const char *key, float *out);
int eng_gguf_get_f64(const eng_gguf *g, const char *key, double *out);
int eng_gguf_get_bool(const eng_gguf *g, const char *key, bool *out);
/* A string value, NUL-terminated (a copy owned by g); *len (optional) gets
 * the byte length, which may be less than strlen() would suggest if the
 * string itself contains NUL bytes. */
int eng_gguf_get_str(const eng_gguf *g, const char *key, const char **out, size_t *len);
/* An array value (-EBADMSG if the key is not an array). */
int eng_gguf_get_arr(const eng_gguf *g, const char *key, eng_gguf_arr *out);

/* Element i of a numeric array, converted like the scalar getters (0 /
 * -EBADMSG if out of range, wrong type or i >= n). */
int eng_gguf_arr_i64(const eng_gguf_arr *a, uint64_t i, int64_t *out);
int eng_gguf_arr_f32(const eng_gguf_arr *a, uint64_t i, float *out);
/* String element i of a string array: pointer into the file (NOT
 * NUL-terminated) and its length. 0 / -EBADMSG (not a string array, i >= n). */
int eng_gguf_arr_str(const eng_gguf *g, const eng_gguf_arr *a, uint64_t i, const char **s,
                     size_t *len);

/* ---- tensors ----------------------------------------------------------- */

int64_t eng_gguf_tensor_count(const eng_gguf *g);
/* Tensor i (0 <= i < count, in file order) or NULL. */
const struct eng_gguf_tensor *eng_gguf_tensor_at(const eng_gguf *g, int64_t i);
/* Tensor by name or NULL. O(1) (hash). */
const struct eng_gguf_tensor *eng_gguf_find_tensor(const eng_gguf *g, const char *name);

/* Name of a ggml type id ("f32", "q8_0", "q4_K", ...; "unknown" otherwise). */
const char *eng_gguf_ggml_type_name(uint32_t type);
/* Bytes of one row of ne0 elements of `type` (0 if the type is not one of
 * the accepted five or ne0 is not a multiple of its block size). Local to
 * the loader so it does not depend on the kernels library at link time. */
size_t eng_gguf_type_row_bytes(enum kn_dtype type, int64_t ne0);

#endif
