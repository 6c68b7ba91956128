/* safetensors — read-only access to a .safetensors file, and a small writer.
 *
 * Role in the request path: workers open the Medusa heads
 * (medusa_lm_head.safetensors) once at start-up and hand tensor pointers
 * straight out of the read-only mapping to the kernels; the trainer (later)
 * writes its heads with eng_st_write(). Nothing here runs per token.
 *
 * Format: u64 little-endian header length N, N bytes of JSON, then the data
 * blob. The JSON object maps each tensor name to
 *   {"dtype": "F32"|"F16"|"BF16", "shape": [d0, d1, ...], "data_offsets": [begin, end]}
 * (offsets relative to the blob start, shape outermost first as in PyTorch)
 * plus an optional "__metadata__" object of string → string.
 *
 * The whole file is validated at open: header length within the file and at
 * most ENG_ST_MAX_HEADER bytes; strict JSON (RFC 8259, valid UTF-8, no NUL in
 * strings, no duplicate keys, nothing after the object but whitespace);
 * every tensor entry has exactly the three fields; dtype is F32, F16 or BF16
 * (any other dtype is rejected, naming it); shape product × dtype size equals
 * end − begin (overflow-checked); [begin, end) lies inside the blob; no two
 * tensors overlap; names are non-empty and unique. Gaps between tensors and
 * bytes after the last one are allowed (the HF library is stricter; nothing
 * here depends on the blob being dense). A bad file gives -EBADMSG and a
 * message in eng_error() naming the problem; it never crashes.
 *
 * Alignment: `data` is always aligned for its dtype. safetensors does not
 * promise that (the HF writer pads the header to 8 bytes, older writers and
 * odd-sized 16-bit tensors followed by F32 ones do not), so a tensor whose
 * bytes are misaligned in the mapping is copied once into owned memory.
 *
 * Threading: open/close from any thread; a successfully opened eng_st is
 * immutable, so every const accessor may be called from any number of
 * threads at once.
 *
 * Lifetime: every pointer returned (names, metadata, tensor data) stays valid
 * until eng_st_close(). For eng_st_open_mem() the caller's buffer must also
 * outlive the eng_st and stay unchanged.
 *
 *   eng_st *st;
 *   int rc = eng_st_open(&st, "medusa_lm_head.safetensors");
 *   if (rc < 0) { fprintf(stderr, "%s\n", eng_error()); return rc; }
 *   const struct eng_st_tensor *t = eng_st_find(st, "0.1.weight");
 *   // t->shape = {V, H}: V rows of H contiguous t->dtype elements at t->data
 *   eng_st_close(st);
 */
#ifndef GORGON_ENG_SAFETENSORS_H
#define GORGON_ENG_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/kn.h"

#define ENG_ST_MAX_DIMS 8
#define ENG_ST_MAX_HEADER ((uint64_t)100 << 20) /* 100 MiB of JSON, as the HF reader */

typedef struct eng_st eng_st;

/* One tensor. shape[0] is the outermost dimension, shape[n_dims-1] the
 * contiguous one (a [out, in] weight is `out` rows of `in` elements, which is
 * kn_tensor's layout). n_dims = 0 is a scalar (n_elems = 1). */
struct eng_st_tensor {
    const char *name;
    enum kn_dtype dtype; /* KN_F32, KN_F16 or KN_BF16 */
    int n_dims;
    int64_t shape[ENG_ST_MAX_DIMS]; /* unused entries are 0 */
    int64_t n_elems;
    const void *data; /* aligned for dtype; NULL allowed only when nbytes == 0 (writer) */
    size_t nbytes;
};

/* One "__metadata__" entry. */
struct eng_st_meta {
    const char *key;
    const char *value;
};

/* Map `path` read-only and validate it. On success *out owns the mapping.
 * Errors: -errno from open/fstat/mmap, -EBADMSG for a malformed file,
 * -ENOMEM. On error *out is left unchanged and eng_error() says why (the
 * message starts with the path). */
int eng_st_open(eng_st **out, const char *path);

/* Same over caller memory (no copy, except misaligned tensors): `buf` must
 * stay valid and unchanged until eng_st_close(). Used by tests and the
 * fuzzer. */
int eng_st_open_mem(eng_st **out, const void *buf, size_t len);

/* Unmap (if mapped) and free. NULL is a no-op. */
void eng_st_close(eng_st *st);

/* Tensors in header (JSON) order. */
int64_t eng_st_count(const eng_st *st);
/* Tensor i (0 <= i < count) or NULL. */
const struct eng_st_tensor *eng_st_tensor_at(const eng_st *st, int64_t i);
/* Tensor by name or NULL. O(log n). */
const struct eng_st_tensor *eng_st_find(const eng_st *st, const char *name);

/* "__metadata__" entries in header order. */
int64_t eng_st_meta_count(const eng_st *st);
const struct eng_st_meta *eng_st_meta_at(const eng_st *st, int64_t i);
/* Value of metadata `key` or NULL. */
const char *eng_st_meta_get(const eng_st *st, const char *key);

/* "F32", "F16", "BF16" (the safetensors spelling), or NULL for another type. */
const char *eng_st_dtype_name(enum kn_dtype t);
/* Bytes per element of an accepted dtype, 0 otherwise. */
size_t eng_st_dtype_size(enum kn_dtype t);

/* Write a safetensors file: header (metadata first, then the tensors in the
 * order given, padded with spaces so that the blob starts 8-byte aligned),
 * then the tensors' bytes back to back. Each tensor needs name, dtype,
 * n_dims, shape and data/nbytes (nbytes must equal the shape's byte size;
 * n_elems is ignored). The file appears atomically: it is written to a
 * temporary file in the same directory, fsync'ed and renamed over `path`.
 * meta may be NULL when n_meta = 0. Returns 0, -EINVAL for bad arguments
 * (duplicate or empty name, unsupported dtype, size mismatch; eng_error()
 * says which) or -errno from the file system; on error `path` is untouched. */
int eng_st_write(const char *path, const struct eng_st_tensor *tensors, int64_t n,
                 const struct eng_st_meta *meta, int64_t n_meta);

/* Same layout into one malloc'ed buffer (*out, *len; free() it). For tests
 * and fuzz seeds. */
int eng_st_serialize(void **out, size_t *len, const struct eng_st_tensor *tensors, int64_t n,
                     const struct eng_st_meta *meta, int64_t n_meta);

#endif
