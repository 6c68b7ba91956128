/* GGUF writer: metadata is serialised as it is added; tensors are recorded
 * (name, shape, where the bytes come from) and laid out at write time. */
#include "engine/model/gguf_write.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/model/eng_err.h"

struct wtensor {
    char *name;
    enum kn_dtype type;
    int n_dims;
    int64_t ne[ENG_GGUF_MAX_DIMS];
    const void *data;
    size_t nbytes;
    uint64_t offset;
};

struct buf {
    uint8_t *p;
    size_t n, cap;
};

struct eng_gguf_writer {
    uint32_t version;
    uint32_t alignment;
    uint64_t n_kv;
    struct buf kv;
    char **keys;
    size_t n_keys, cap_keys;
    struct wtensor *t;
    size_t n_t, cap_t;
    uint64_t blob_bytes;
};

static int buf_put(struct buf *b, const void *p, size_t n)
{
    if (n > SIZE_MAX - b->n)
        return -ENOMEM;
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->n + n) {
            if (cap > SIZE_MAX / 2)
                return -ENOMEM;
            cap *= 2;
        }
        uint8_t *q = realloc(b->p, cap);
        if (!q)
            return -ENOMEM;
        b->p = q;
        b->cap = cap;
    }
    if (n)
        memcpy(b->p + b->n, p, n);
    b->n += n;
    return 0;
}

static int buf_u32(struct buf *b, uint32_t v)
{
    return buf_put(b, &v, 4);
}

static int buf_u64(struct buf *b, uint64_t v)
{
    return buf_put(b, &v, 8);
}

static int buf_str(struct buf *b, const char *s, size_t n)
{
    int rc = buf_u64(b, n);
    return rc < 0 ? rc : buf_put(b, s, n);
}

int eng_gguf_writer_create(eng_gguf_writer **out, uint32_t version, uint32_t alignment)
{
    if (!out)
        return -EINVAL;
    if (version == 0)
        version = 3;
    if (alignment == 0)
        alignment = ENG_GGUF_DEFAULT_ALIGNMENT;
    if ((version != 2 && version != 3) || (alignment & (alignment - 1)))
        return eng_fail(-EINVAL, "gguf writer: bad version %u or alignment %u", version,
                        alignment);
    eng_gguf_writer *w = calloc(1, sizeof(*w));
    if (!w)
        return -ENOMEM;
    w->version = version;
    w->alignment = alignment;
    if (alignment != ENG_GGUF_DEFAULT_ALIGNMENT) {
        int rc = eng_gguf_writer_add_u32(w, "general.alignment", alignment);
        if (rc < 0) {
            eng_gguf_writer_destroy(w);
            return rc;
        }
    }
    *out = w;
    return 0;
}

void eng_gguf_writer_destroy(eng_gguf_writer *w)
{
    if (!w)
        return;
    free(w->kv.p);
    for (size_t i = 0; i < w->n_keys; i++)
        free(w->keys[i]);
    free(w->keys);
    for (size_t i = 0; i < w->n_t; i++)
        free(w->t[i].name);
    free(w->t);
    free(w);
}

/* Start a key: checks and records it, writes key + type. The writer keeps
 * few keys (tens), so a linear duplicate check is fine. */
static int begin_kv(eng_gguf_writer *w, const char *key, uint32_t type)
{
    if (!key || !*key)
        return eng_fail(-EINVAL, "gguf writer: empty key");
    for (size_t i = 0; i < w->n_keys; i++)
        if (strcmp(w->keys[i], key) == 0)
            return eng_fail(-EEXIST, "gguf writer: duplicate key '%s'", key);
    if (w->n_keys == w->cap_keys) {
        size_t cap = w->cap_keys ? w->cap_keys * 2 : 32;
        char **k = realloc(w->keys, cap * sizeof(*k));
        if (!k)
            return -ENOMEM;
        w->keys = k;
        w->cap_keys = cap;
    }
    char *dup = strdup(key);
    if (!dup)
        return -ENOMEM;
    int rc;
    if ((rc = buf_str(&w->kv, key, strlen(key))) < 0 || (rc = buf_u32(&w->kv, type)) < 0) {
        free(dup);
        return rc;
    }
    w->keys[w->n_keys++] = dup;
    w->n_kv++;
    return 0;
}

static int add_scalar(eng_gguf_writer *w, const char *key, uint32_t type, const void *v,
                      size_t n)
{
    size_t mark = w->kv.n;
    int rc = begin_kv(w, key, type);
    if (rc < 0)
        return rc;
    if ((rc = buf_put(&w->kv, v, n)) < 0) {
        /* Roll back so the writer is unchanged on error. */
        w->kv.n = mark;
        free(w->keys[--w->n_keys]);
        w->n_kv--;
    }
    return rc;
}

#define SCALAR_ADDER(fn, ctype, tid)                                                    \
    int eng_gguf_writer_add_##fn(eng_gguf_writer *w, const char *key, ctype v)          \
    {                                                                                   \
        return add_scalar(w, key, tid, &v, sizeof(v));                                  \
    }
SCALAR_ADDER(u8, uint8_t, ENG_GGUF_U8)
SCALAR_ADDER(i8, int8_t, ENG_GGUF_I8)
SCALAR_ADDER(u16, uint16_t, ENG_GGUF_U16)
SCALAR_ADDER(i16, int16_t, ENG_GGUF_I16)
SCALAR_ADDER(u32, uint32_t, ENG_GGUF_U32)
SCALAR_ADDER(i32, int32_t, ENG_GGUF_I32)
SCALAR_ADDER(f32, float, ENG_GGUF_F32)
SCALAR_ADDER(u64, uint64_t, ENG_GGUF_U64)
SCALAR_ADDER(i64, int64_t, ENG_GGUF_I64)
SCALAR_ADDER(f64, double, ENG_GGUF_F64)

int eng_gguf_writer_add_bool(eng_gguf_writer *w, const char *key, bool v)
{
    uint8_t b = v ? 1 : 0;
    return add_scalar(w, key, ENG_GGUF_BOOL, &b, 1);
}

int eng_gguf_writer_add_strn(eng_gguf_writer *w, const char *key, const char *s, size_t n)
{
    if (!s && n)
        return -EINVAL;
    size_t mark = w->kv.n;
    int rc = begin_kv(w, key, ENG_GGUF_STR);
    if (rc < 0)
        return rc;
    if ((rc = buf_str(&w->kv, s, n)) < 0) {
        w->kv.n = mark;
        free(w->keys[--w->n_keys]);
        w->n_kv--;
    }
    return rc;
}

int eng_gguf_writer_add_str(eng_gguf_writer *w, const char *key, const char *s)
{
    if (!s)
        return -EINVAL;
    return eng_gguf_writer_add_strn(w, key, s, strlen(s));
}

int eng_gguf_writer_add_arr(eng_gguf_writer *w, const char *key, enum eng_gguf_type elem,
                            const void *data, size_t n)
{
    size_t es = eng_gguf_type_size(elem);
    if (!es || (!data && n) || n > SIZE_MAX / es)
        return eng_fail(-EINVAL, "gguf writer: key '%s': bad array", key ? key : "");
    size_t mark = w->kv.n;
    int rc = begin_kv(w, key, ENG_GGUF_ARR);
    if (rc < 0)
        return rc;
    if ((rc = buf_u32(&w->kv, elem)) < 0 || (rc = buf_u64(&w->kv, n)) < 0 ||
        (rc = buf_put(&w->kv, data, n * es)) < 0) {
        w->kv.n = mark;
        free(w->keys[--w->n_keys]);
        w->n_kv--;
    }
    return rc;
}

int eng_gguf_writer_add_arr_str(eng_gguf_writer *w, const char *key, const char *const *strs,
                                const size_t *lens, size_t n)
{
    if (!strs && n)
        return -EINVAL;
    for (size_t i = 0; i < n; i++)
        if (!strs[i])
            return eng_fail(-EINVAL, "gguf writer: key '%s': NULL string %zu", key ? key : "", i);
    size_t mark = w->kv.n;
    int rc = begin_kv(w, key, ENG_GGUF_ARR);
    if (rc < 0)
        return rc;
    if ((rc = buf_u32(&w->kv, ENG_GGUF_STR)) == 0)
        rc = buf_u64(&w->kv, n);
    for (size_t i = 0; i < n && rc == 0; i++)
        rc = buf_str(&w->kv, strs[i], lens ? lens[i] : strlen(strs[i]));
    if (rc < 0) {
        w->kv.n = mark;
        free(w->keys[--w->n_keys]);
        w->n_kv--;
    }
    return rc;
}

int64_t eng_gguf_writer_add_tensor(eng_gguf_writer *w, const char *name, enum kn_dtype type,
                                   int n_dims, const int64_t *ne, const void *data)
{
    if (!name || !*name || n_dims < 1 || n_dims > ENG_GGUF_MAX_DIMS || !ne)
        return eng_fail(-EINVAL, "gguf writer: tensor '%s': bad name or n_dims %d",
                        name ? name : "", n_dims);
    for (size_t i = 0; i < w->n_t; i++)
        if (strcmp(w->t[i].name, name) == 0)
            return eng_fail(-EEXIST, "gguf writer: duplicate tensor '%s'", name);
    struct wtensor t = {.type = type, .n_dims = n_dims, .data = data};
    int64_t nelem = 1;
    for (int d = 0; d < ENG_GGUF_MAX_DIMS; d++) {
        t.ne[d] = d < n_dims ? ne[d] : 1;
        if (t.ne[d] <= 0 || __builtin_mul_overflow(nelem, t.ne[d], &nelem))
            return eng_fail(-EINVAL, "gguf writer: tensor '%s': bad dimension %d", name, d);
    }
    size_t rb = eng_gguf_type_row_bytes(type, t.ne[0]);
    if (rb == 0 || __builtin_mul_overflow(rb, (size_t)(nelem / t.ne[0]), &t.nbytes))
        return eng_fail(-EINVAL, "gguf writer: tensor '%s': type %s does not fit shape", name,
                        eng_gguf_ggml_type_name(type));
    uint64_t off = (w->blob_bytes + w->alignment - 1) / w->alignment * w->alignment;
    t.offset = off;
    if (w->n_t == w->cap_t) {
        size_t cap = w->cap_t ? w->cap_t * 2 : 64;
        struct wtensor *p = realloc(w->t, cap * sizeof(*p));
        if (!p)
            return -ENOMEM;
        w->t = p;
        w->cap_t = cap;
    }
    t.name = strdup(name);
    if (!t.name)
        return -ENOMEM;
    w->t[w->n_t] = t;
    w->blob_bytes = off + t.nbytes;
    return (int64_t)w->n_t++;
}

size_t eng_gguf_writer_tensor_bytes(const eng_gguf_writer *w, int64_t idx)
{
    return idx >= 0 && (size_t)idx < w->n_t ? w->t[idx].nbytes : 0;
}

/* Everything before the data blob, padded to the alignment. */
static int build_head(const eng_gguf_writer *w, struct buf *h)
{
    int rc = 0;
    if ((rc = buf_put(h, "GGUF", 4)) < 0 || (rc = buf_u32(h, w->version)) < 0 ||
        (rc = buf_u64(h, w->n_t)) < 0 || (rc = buf_u64(h, w->n_kv)) < 0 ||
        (rc = buf_put(h, w->kv.p, w->kv.n)) < 0)
        return rc;
    for (size_t i = 0; i < w->n_t && rc == 0; i++) {
        const struct wtensor *t = &w->t[i];
        rc = buf_str(h, t->name, strlen(t->name));
        if (rc == 0)
            rc = buf_u32(h, (uint32_t)t->n_dims);
        for (int d = 0; d < t->n_dims && rc == 0; d++)
            rc = buf_u64(h, (uint64_t)t->ne[d]);
        if (rc == 0)
            rc = buf_u32(h, (uint32_t)t->type);
        if (rc == 0)
            rc = buf_u64(h, t->offset);
    }
    static const uint8_t zeros[64];
    while (rc == 0 && h->n % w->alignment) {
        size_t pad = w->alignment - h->n % w->alignment;
        rc = buf_put(h, zeros, pad < sizeof(zeros) ? pad : sizeof(zeros));
    }
    return rc;
}

/* Output sink: a file descriptor or a memory buffer. */
struct out {
    int fd;
    struct buf *mem;
};

static int out_put(struct out *o, const void *p, size_t n)
{
    if (o->mem)
        return buf_put(o->mem, p, n);
    const uint8_t *q = p;
    while (n) {
        ssize_t r = write(o->fd, q, n);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        q += r;
        n -= (size_t)r;
    }
    return 0;
}

static int emit_all(eng_gguf_writer *w, struct out *o, eng_gguf_fill_fn fill, void *ctx)
{
    struct buf h = {0};
    int rc = build_head(w, &h);
    if (rc == 0)
        rc = out_put(o, h.p, h.n);
    free(h.p);
    if (rc < 0)
        return eng_fail(rc, "gguf writer: writing header failed");
    size_t scratch_n = 0;
    for (size_t i = 0; i < w->n_t; i++)
        if (!w->t[i].data && w->t[i].nbytes > scratch_n)
            scratch_n = w->t[i].nbytes;
    uint8_t *scratch = NULL;
    if (scratch_n) {
        if (!fill)
            return eng_fail(-EINVAL, "gguf writer: a tensor has no data and no fill callback");
        scratch = malloc(scratch_n);
        if (!scratch)
            return eng_fail(-ENOMEM, "gguf writer: out of memory");
    }
    static const uint8_t zeros[64];
    uint64_t pos = 0;
    bool told = false;
    for (size_t i = 0; i < w->n_t && rc == 0; i++) {
        const struct wtensor *t = &w->t[i];
        while (rc == 0 && pos < t->offset) {
            size_t pad = (size_t)(t->offset - pos) < sizeof(zeros) ? (size_t)(t->offset - pos)
                                                                  : sizeof(zeros);
            rc = out_put(o, zeros, pad);
            pos += pad;
        }
        if (rc < 0)
            break;
        const void *src = t->data;
        if (!src) {
            if ((rc = fill(ctx, (int64_t)i, scratch, t->nbytes)) < 0) {
                rc = eng_fail(rc, "gguf writer: filling tensor '%s' failed", t->name);
                told = true;
                break;
            }
            src = scratch;
        }
        rc = out_put(o, src, t->nbytes);
        pos += t->nbytes;
    }
    free(scratch);
    if (rc < 0 && !told)
        return eng_fail(rc, "gguf writer: write failed: %s", strerror(-rc));
    return rc;
}

int eng_gguf_writer_write_mem(eng_gguf_writer *w, void **out, size_t *len, eng_gguf_fill_fn fill,
                              void *ctx)
{
    struct buf m = {0};
    struct out o = {.fd = -1, .mem = &m};
    int rc = emit_all(w, &o, fill, ctx);
    if (rc < 0) {
        free(m.p);
        return rc;
    }
    *out = m.p ? (void *)m.p : malloc(1);
    *len = m.n;
    return *out ? 0 : -ENOMEM;
}

int eng_gguf_writer_write_file(eng_gguf_writer *w, const char *path, eng_gguf_fill_fn fill,
                               void *ctx)
{
    char tmp[4096];
    if (!path || snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= (int)sizeof(tmp))
        return eng_fail(-EINVAL, "gguf writer: bad path");
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        int e = errno;
        return eng_fail(-e, "gguf writer: cannot create %s: %s", tmp, strerror(e));
    }
    struct out o = {.fd = fd};
    int rc = emit_all(w, &o, fill, ctx);
    if (close(fd) < 0 && rc == 0) {
        int e = errno;
        rc = eng_fail(-e, "gguf writer: closing %s: %s", tmp, strerror(e));
    }
    if (rc == 0 && rename(tmp, path) < 0) {
        int e = errno;
        rc = eng_fail(-e, "gguf writer: renaming %s to %s: %s", tmp, path, strerror(e));
    }
    if (rc < 0)
        unlink(tmp);
    return rc;
}

/* ---- synthetic Llama models -------------------------------------------- */

/* Number formats: ggml's reference conversions and quantisers, kept local
 * so that writing a model does not depend on the kernels' build state. */

static uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even, overflow to inf, NaN kept (as ggml/FP16). */
static uint16_t to_f16(float f)
{
    const float scale_to_inf = 0x1.0p+112f;
    const float scale_to_zero = 0x1.0p-110f;
    float base = (fabsf(f) * scale_to_inf) * scale_to_zero;
    const uint32_t w = f32_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u)
        bias = 0x71000000u;
    base = bits_f32((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f32_bits(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
    const uint32_t mantissa_bits = bits & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

static uint16_t to_bf16(float f)
{
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 64); /* quiet NaN */
    return (uint16_t)((u + (0x7fffu + ((u >> 16) & 1))) >> 16);
}

static void quant_row(enum kn_dtype t, const float *x, int64_t n, uint8_t *dst)
{
    switch (t) {
    case KN_F32:
        memcpy(dst, x, (size_t)n * 4);
        break;
    case KN_F16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t h = to_f16(x[i]);
            memcpy(dst + 2 * i, &h, 2);
        }
        break;
    case KN_BF16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t h = to_bf16(x[i]);
            memcpy(dst + 2 * i, &h, 2);
        }
        break;
    case KN_Q8_0:
        for (int64_t b = 0; b < n / 32; b++, x += 32, dst += 34) {
            float amax = 0.0f;
            for (int j = 0; j < 32; j++)
                amax = fmaxf(amax, fabsf(x[j]));
            const float d = amax / 127.0f;
            const float id = d != 0.0f ? 1.0f / d : 0.0f;
            uint16_t hd = to_f16(d);
            memcpy(dst, &hd, 2);
            for (int j = 0; j < 32; j++)
                dst[2 + j] = (uint8_t)(int8_t)roundf(x[j] * id);
        }
        break;
    case KN_Q4_0:
        for (int64_t b = 0; b < n / 32; b++, x += 32, dst += 18) {
            float amax = 0.0f, max = 0.0f;
            for (int j = 0; j < 32; j++) {
                if (amax < fabsf(x[j])) {
                    amax = fabsf(x[j]);
                    max = x[j];
                }
            }
            const float d = max / -8.0f;
            const float id = d != 0.0f ? 1.0f / d : 0.0f;
            uint16_t hd = to_f16(d);
            memcpy(dst, &hd, 2);
            for (int j = 0; j < 16; j++) {
                int xi0 = (int)(int8_t)(x[j] * id + 8.5f);
                int xi1 = (int)(int8_t)(x[16 + j] * id + 8.5f);
                xi0 = xi0 > 15 ? 15 : xi0;
                xi1 = xi1 > 15 ? 15 : xi1;
                dst[2 + j] = (uint8_t)(xi0 | (xi1 << 4));
            }
        }
        break;
    }
}

/* ---- random weights ---------------------------------------------------- */

static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* Two N(0,1) samples per call (Box–Muller). */
static void gauss2(uint64_t *s, float *a, float *b)
{
    double u1 = ((double)(splitmix64(s) >> 11) + 1.0) * 0x1.0p-53; /* (0, 1] */
    double u2 = (double)(splitmix64(s) >> 11) * 0x1.0p-53;
    double r = sqrt(-2.0 * log(u1));
    *a = (float)(r * cos(2.0 * M_PI * u2));
    *b = (float)(r * sin(2.0 * M_PI * u2));
}

struct tinfo {
    enum kn_dtype type;
    int64_t ne0, rows;
    bool norm;
};

struct model {
    struct tinfo *t;
    int64_t n;
    uint64_t seed;
};

static int fill_tensor(void *ctx, int64_t idx, void *dst, size_t nbytes)
{
    struct model *m = ctx;
    const struct tinfo *ti = &m->t[idx];
    float *row = malloc((size_t)(ti->ne0 + 1) * sizeof(float));
    if (!row)
        return -ENOMEM;
    uint64_t s = m->seed ^ (0xA0761D6478BD642FULL * (uint64_t)(idx + 1));
    size_t rb = nbytes / (size_t)ti->rows;
    uint8_t *d = dst;
    for (int64_t r = 0; r < ti->rows; r++) {
        if (ti->norm) {
            for (int64_t i = 0; i < ti->ne0; i++)
                row[i] = 1.0f;
        } else {
            for (int64_t i = 0; i < ti->ne0; i += 2) {
                float a, b;
                gauss2(&s, &a, &b);
                row[i] = 0.02f * a;
                row[i + 1] = 0.02f * b; /* row has one spare slot for odd ne0 */
            }
        }
        quant_row(ti->type, row, ti->ne0, d + (size_t)r * rb);
    }
    free(row);
    return 0;
}

/* ---- tokenizer --------------------------------------------------------- */

/* Copy every tokenizer.* key of src, preserving types. Returns the vocab size. */
static int64_t copy_tokenizer(eng_gguf_writer *w, const eng_gguf *src)
{
    int64_t n_vocab = -1;
    for (int64_t i = 0; i < eng_gguf_kv_count(src); i++) {
        const char *k = eng_gguf_kv_key(src, i);
        if (strncmp(k, "tokenizer.", 10) != 0)
            continue;
        int ty = eng_gguf_kv_type(src, i);
        int rc = 0;
        uint64_t u = 0;
        int64_t v = 0;
        double f = 0;
        switch (ty) {
        case ENG_GGUF_U8:
        case ENG_GGUF_U16:
        case ENG_GGUF_U32:
        case ENG_GGUF_U64:
            eng_gguf_get_u64(src, k, &u);
            rc = ty == ENG_GGUF_U8    ? eng_gguf_writer_add_u8(w, k, (uint8_t)u)
                 : ty == ENG_GGUF_U16 ? eng_gguf_writer_add_u16(w, k, (uint16_t)u)
                 : ty == ENG_GGUF_U32 ? eng_gguf_writer_add_u32(w, k, (uint32_t)u)
                                      : eng_gguf_writer_add_u64(w, k, u);
            break;
        case ENG_GGUF_I8:
        case ENG_GGUF_I16:
        case ENG_GGUF_I32:
        case ENG_GGUF_I64:
            eng_gguf_get_i64(src, k, &v);
            rc = ty == ENG_GGUF_I8    ? eng_gguf_writer_add_i8(w, k, (int8_t)v)
                 : ty == ENG_GGUF_I16 ? eng_gguf_writer_add_i16(w, k, (int16_t)v)
                 : ty == ENG_GGUF_I32 ? eng_gguf_writer_add_i32(w, k, (int32_t)v)
                                      : eng_gguf_writer_add_i64(w, k, v);
            break;
        case ENG_GGUF_F32:
        case ENG_GGUF_F64:
            eng_gguf_get_f64(src, k, &f);
            rc = ty == ENG_GGUF_F32 ? eng_gguf_writer_add_f32(w, k, (float)f)
                                    : eng_gguf_writer_add_f64(w, k, f);
            break;
        case ENG_GGUF_BOOL: {
            bool b = false;
            eng_gguf_get_bool(src, k, &b);
            rc = eng_gguf_writer_add_bool(w, k, b);
            break;
        }
        case ENG_GGUF_STR: {
            const char *s;
            size_t l;
            eng_gguf_get_str(src, k, &s, &l);
            rc = eng_gguf_writer_add_strn(w, k, s, l);
            break;
        }
        case ENG_GGUF_ARR: {
            eng_gguf_arr a;
            eng_gguf_get_arr(src, k, &a);
            if (a.type != ENG_GGUF_STR) {
                rc = eng_gguf_writer_add_arr(w, k, a.type, a.data, (size_t)a.n);
                break;
            }
            const char **ss = malloc((size_t)(a.n ? a.n : 1) * sizeof(*ss));
            size_t *ls = malloc((size_t)(a.n ? a.n : 1) * sizeof(*ls));
            if (!ss || !ls) {
                free(ss);
                free(ls);
                return -ENOMEM;
            }
            for (uint64_t j = 0; j < a.n; j++)
                eng_gguf_arr_str(src, &a, j, &ss[j], &ls[j]);
            rc = eng_gguf_writer_add_arr_str(w, k, ss, ls, (size_t)a.n);
            free(ss);
            free(ls);
            if (strcmp(k, "tokenizer.ggml.tokens") == 0)
                n_vocab = (int64_t)a.n;
            break;
        }
        }
        if (rc < 0)
            return rc;
    }
    if (n_vocab < 0)
        return eng_fail(-EBADMSG, "source file has no tokenizer.ggml.tokens");
    return n_vocab;
}

/* Control tokens, the 256 byte tokens, then pieces built so that each one is
 * the concatenation of two earlier ones (so BPE can reach it): "▁", single
 * printable characters, "▁c", then lower-case pairs, "▁" + pair, triples... */
static int synth_tokenizer(eng_gguf_writer *w, int64_t n_vocab)
{
    if (n_vocab < 3 + 256 + 1 + 94)
        return eng_fail(-EINVAL, "synth: a synthesised tokenizer needs n_vocab >= %d", 3 + 256 + 1 + 94);
    size_t n = (size_t)n_vocab;
    char **tok = calloc(n, sizeof(*tok));
    float *score = malloc(n * sizeof(*score));
    int32_t *type = malloc(n * sizeof(*type));
    int rc = -ENOMEM;
    if (!tok || !score || !type)
        goto out;
    size_t k = 0;
    static const char *ctl[3] = {"<unk>", "<s>", "</s>"};
    for (int i = 0; i < 3; i++, k++) {
        tok[k] = strdup(ctl[i]);
        type[k] = i == 0 ? 2 : 3;
        score[k] = 0.0f;
    }
    for (int b = 0; b < 256; b++, k++) {
        tok[k] = malloc(8);
        if (tok[k])
            snprintf(tok[k], 8, "<0x%02X>", b);
        type[k] = 6;
        score[k] = 0.0f;
    }
    /* Candidate generator: level 0 = "▁", 1 = single chars, 2 = "▁"+char,
     * then for len = 2, 3, ...: lower-case strings, then "▁"+string. */
    char buf[32];
    size_t base_k = k;
    for (int c = 0; k < n; c++) {
        if (c == 0) {
            snprintf(buf, sizeof(buf), "\xe2\x96\x81");
        } else if (c <= 94) {
            snprintf(buf, sizeof(buf), "%c", (char)(0x20 + c));
        } else if (c <= 188) {
            snprintf(buf, sizeof(buf), "\xe2\x96\x81%c", (char)(0x20 + c - 94));
        } else {
            /* Index past the simple pieces enumerates lower-case words. */
            int64_t idx = c - 189, len = 2, count = 26 * 26;
            while (idx >= 2 * count && len < 6) {
                idx -= 2 * count;
                len++;
                count *= 26;
            }
            if (len >= 6)
                break;
            bool space = idx >= count;
            if (space)
                idx -= count;
            char *p = buf;
            if (space) {
                memcpy(p, "\xe2\x96\x81", 3);
                p += 3;
            }
            for (int64_t j = len - 1; j >= 0; j--) {
                p[j] = (char)('a' + idx % 26);
                idx /= 26;
            }
            p[len] = '\0';
        }
        tok[k] = strdup(buf);
        type[k] = 1;
        score[k] = -(float)(k - base_k); /* earlier = more frequent = merged first */
        k++;
    }
    for (size_t i = 0; i < n; i++)
        if (!tok[i])
            goto out;
    if ((rc = eng_gguf_writer_add_str(w, "tokenizer.ggml.model", "llama")) < 0 ||
        (rc = eng_gguf_writer_add_arr_str(w, "tokenizer.ggml.tokens", (const char *const *)tok,
                                          NULL, n)) < 0 ||
        (rc = eng_gguf_writer_add_arr(w, "tokenizer.ggml.scores", ENG_GGUF_F32, score, n)) < 0 ||
        (rc = eng_gguf_writer_add_arr(w, "tokenizer.ggml.token_type", ENG_GGUF_I32, type, n)) < 0 ||
        (rc = eng_gguf_writer_add_u32(w, "tokenizer.ggml.bos_token_id", 1)) < 0 ||
        (rc = eng_gguf_writer_add_u32(w, "tokenizer.ggml.eos_token_id", 2)) < 0 ||
        (rc = eng_gguf_writer_add_u32(w, "tokenizer.ggml.unknown_token_id", 0)) < 0 ||
        (rc = eng_gguf_writer_add_bool(w, "tokenizer.ggml.add_bos_token", true)) < 0)
        goto out;
    rc = 0;
out:
    if (tok)
        for (size_t i = 0; i < n; i++)
            free(tok[i]);
    free(tok);
    free(score);
    free(type);
    return rc;
}

/* ---- model ------------------------------------------------------------- */

static int add_t(eng_gguf_writer *w, struct model *m, const char *name, enum kn_dtype type,
                 int64_t ne0, int64_t ne1, bool norm)
{
    int64_t ne[2] = {ne0, ne1};
    int64_t idx = eng_gguf_writer_add_tensor(w, name, type, ne1 > 1 ? 2 : 1, ne, NULL);
    if (idx < 0)
        return (int)idx;
    m->t[idx] = (struct tinfo){.type = type, .ne0 = ne0, .rows = ne1, .norm = norm};
    m->n = idx + 1;
    return 0;
}

static uint32_t file_type_of(enum kn_dtype t)
{
    switch (t) {
    case KN_F32:
        return 0;
    case KN_F16:
        return 1;
    case KN_Q4_0:
        return 2;
    case KN_Q8_0:
        return 7;
    case KN_BF16:
        return 32;
    }
    return 0;
}

int eng_gguf_write_synth_llama(const char *path, const eng_synth_llama_cfg *cfg)
{
    if (!path || !cfg)
        return eng_fail(-EINVAL, "synth: invalid arguments");
    const eng_synth_llama_cfg *s = cfg;
    const char *bad = NULL;
    if (s->dim < 2 || s->n_layer < 1 || s->n_head < 1 || s->n_head_kv < 1 || s->ffn < 1 ||
        s->n_ctx < 1 || s->dim > (1 << 20) || s->ffn > (1 << 22) || s->n_layer > 4096 ||
        s->n_ctx > UINT32_MAX || (!s->vocab_from && (s->n_vocab < 1 || s->n_vocab > (1 << 24))))
        bad = "a dimension is out of range";
    else if (s->dim % s->n_head)
        bad = "dim must be a multiple of n_head";
    else if (s->n_head % s->n_head_kv)
        bad = "n_head must be a multiple of n_head_kv";
    else if ((s->dim / s->n_head) % 2)
        bad = "the head size (dim / n_head) must be even for RoPE";
    else if (eng_gguf_type_row_bytes(s->dtype, 32) == 0)
        bad = "dtype must be f32, f16, bf16, q8_0 or q4_0";
    else if (eng_gguf_type_row_bytes(s->dtype, s->dim) == 0 ||
             eng_gguf_type_row_bytes(s->dtype, s->ffn) == 0)
        bad = "q8_0 / q4_0 need dim and ffn to be multiples of 32";
    if (bad)
        return eng_fail(-EINVAL, "synth: %s", bad);

    eng_gguf_writer *w = NULL;
    eng_gguf *vsrc = NULL;
    struct model m = {.seed = s->seed};
    int64_t n_vocab = s->n_vocab;
    int rc = eng_gguf_writer_create(&w, 3, 0);
    if (rc < 0)
        return rc;
    int64_t head_dim = s->dim / s->n_head;
    if ((rc = eng_gguf_writer_add_str(w, "general.architecture", "llama")) < 0 ||
        (rc = eng_gguf_writer_add_str(w, "general.name", s->name ? s->name : "gorgon-synth")) < 0 ||
        (rc = eng_gguf_writer_add_u32(w, "general.file_type", file_type_of(s->dtype))) < 0)
        goto out;

    if (s->vocab_from) {
        if ((rc = eng_gguf_open(&vsrc, s->vocab_from)) < 0)
            goto out;
        int64_t nv = copy_tokenizer(w, vsrc);
        if (nv < 0) {
            rc = (int)nv;
            goto out;
        }
        n_vocab = nv;
    } else if ((rc = synth_tokenizer(w, n_vocab)) < 0) {
        goto out;
    }
    if (s->chat_template &&
        (rc = eng_gguf_writer_add_str(w, "tokenizer.chat_template", s->chat_template)) < 0)
        goto out; /* -EEXIST: vocab_from has one already */

    float base = s->rope_freq_base > 0.0f ? s->rope_freq_base : 10000.0f;
    if ((rc = eng_gguf_writer_add_u32(w, "llama.context_length", (uint32_t)s->n_ctx)) < 0 ||
        (rc = eng_gguf_writer_add_u32(w, "llama.embedding_length", (uint32_t)s->dim)) < 0 ||
        (rc = eng_gguf_writer_add_u32(w, "llama.feed_forward_length", (uint32_t)s->ffn)) < 0 ||
        (rc = eng_gguf_writer_add_u32(w, "llama.block_count", (uint32_t)s->n_layer)) < 0 ||
        (rc = eng_gguf_writer_add_u32(w, "llama.attention.head_count", (uint32_t)s->n_head)) < 0 ||
        (rc = eng_gguf_writer_add_u32(w, "llama.attention.head_count_kv", (uint32_t)s->n_head_kv)) < 0 ||
        (rc = eng_gguf_writer_add_u32(w, "llama.rope.dimension_count", (uint32_t)head_dim)) < 0 ||
        (rc = eng_gguf_writer_add_f32(w, "llama.rope.freq_base", base)) < 0 ||
        (rc = eng_gguf_writer_add_f32(w, "llama.attention.layer_norm_rms_epsilon", 1e-5f)) < 0 ||
        (rc = eng_gguf_writer_add_u32(w, "llama.vocab_size", (uint32_t)n_vocab)) < 0)
        goto out;

    m.t = calloc((size_t)(3 + 9 * s->n_layer), sizeof(*m.t));
    if (!m.t) {
        rc = -ENOMEM;
        goto out;
    }
    int64_t kv_dim = head_dim * s->n_head_kv;
    enum kn_dtype t = s->dtype;
    if ((rc = add_t(w, &m, "token_embd.weight", t, s->dim, n_vocab, false)) < 0 ||
        (rc = add_t(w, &m, "output_norm.weight", KN_F32, s->dim, 1, true)) < 0 ||
        (rc = add_t(w, &m, "output.weight", t, s->dim, n_vocab, false)) < 0)
        goto out;
    for (int64_t l = 0; l < s->n_layer && rc == 0; l++) {
        static const struct {
            const char *suffix;
            int in, out; /* 0 dim, 1 kv_dim, 2 ffn; -1: 1-D norm */
        } k_blk[] = {
            {"attn_norm", 0, -1}, {"attn_q", 0, 0},   {"attn_k", 0, 1},
            {"attn_v", 0, 1},     {"attn_output", 0, 0}, {"ffn_norm", 0, -1},
            {"ffn_gate", 0, 2},   {"ffn_up", 0, 2},   {"ffn_down", 2, 0},
        };
        const int64_t sz[3] = {s->dim, kv_dim, s->ffn};
        for (size_t j = 0; j < sizeof(k_blk) / sizeof(k_blk[0]) && rc == 0; j++) {
            char tn[64];
            snprintf(tn, sizeof(tn), "blk.%lld.%s.weight", (long long)l, k_blk[j].suffix);
            bool norm = k_blk[j].out < 0;
            rc = add_t(w, &m, tn, norm ? KN_F32 : t, sz[k_blk[j].in], norm ? 1 : sz[k_blk[j].out],
                       norm);
        }
    }
    if (rc < 0)
        goto out;
    rc = eng_gguf_writer_write_file(w, path, fill_tensor, &m);
out:
    eng_gguf_close(vsrc);
    eng_gguf_writer_destroy(w);
    free(m.t);
    return rc;
}
