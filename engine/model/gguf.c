/* GGUF reader: validate everything at open, then serve lookups.
 *
 * Every count, length and offset in the file is treated as hostile: each
 * read goes through a bounds-checked cursor, every multiplication and
 * addition that sizes memory or a range is overflow-checked, and every
 * allocation is capped by what the file's remaining bytes could possibly
 * describe (e.g. a string array of n elements needs at least 8n bytes), so a
 * 100-byte file can never make us allocate gigabytes.
 */
#include "engine/model/gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine/model/eng_err.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the GGUF reader assumes a little-endian host"
#endif

/* Smallest possible encodings, used to cap counts by the bytes left. */
#define MIN_KV_BYTES 13     /* key len u64 + 1 key byte + type u32 + 1 value byte */
#define MIN_TENSOR_BYTES 25 /* name len u64 + 1 byte + n_dims u32 + type u32 + offset u64 */

struct kv {
    size_t key_off; /* into the name arena until parsing ends */
    const char *key;
    uint32_t type;
    union {
        uint64_t u;
        int64_t i;
        double f;
    } num;
    size_t str_off; /* STR: copy in the arena */
    const char *str;
    size_t str_len;
    eng_gguf_arr arr;  /* ARR */
    size_t str_first;  /* ARR of STR: first index into g->str_pos */
};

struct hash {
    uint32_t *slot; /* index + 1, 0 = empty */
    size_t mask;
};

struct eng_gguf {
    const uint8_t *base;
    size_t len;
    bool mapped;
    uint32_t version;
    size_t alignment;
    size_t data_off;

    int64_t n_kv;
    struct kv *kvs;
    struct hash kv_hash;

    int64_t n_tensors;
    struct eng_gguf_tensor *tensors;
    size_t *tensor_name_off;
    struct hash tensor_hash;

    char *arena; /* NUL-terminated keys, string values, tensor names */
    size_t arena_len, arena_cap;

    size_t *str_pos; /* string-array elements: file offset of each u64 length */
    size_t n_str_pos, cap_str_pos;
};

/* ---- small helpers ----------------------------------------------------- */

static const char *const g_ggml_type_names[] = {
    [0] = "f32",   [1] = "f16",   [2] = "q4_0",  [3] = "q4_1",   [6] = "q5_0",
    [7] = "q5_1",  [8] = "q8_0",  [9] = "q8_1",  [10] = "q2_K",  [11] = "q3_K",
    [12] = "q4_K", [13] = "q5_K", [14] = "q6_K", [15] = "q8_K",  [16] = "iq2_xxs",
    [17] = "iq2_xs", [18] = "iq3_xxs", [19] = "iq1_s", [20] = "iq4_nl", [21] = "iq3_s",
    [22] = "iq2_s", [23] = "iq4_xs", [24] = "i8", [25] = "i16", [26] = "i32",
    [27] = "i64",  [28] = "f64",  [29] = "iq1_m", [30] = "bf16", [34] = "tq1_0",
    [35] = "tq2_0",
};

const char *eng_gguf_ggml_type_name(uint32_t type)
{
    if (type < sizeof(g_ggml_type_names) / sizeof(g_ggml_type_names[0]) &&
        g_ggml_type_names[type])
        return g_ggml_type_names[type];
    return "unknown";
}

size_t eng_gguf_type_row_bytes(enum kn_dtype type, int64_t ne0)
{
    if (ne0 < 0)
        return 0;
    uint64_t n = (uint64_t)ne0;
    switch (type) {
    case KN_F32:
        return n > SIZE_MAX / 4 ? 0 : (size_t)(n * 4);
    case KN_F16:
    case KN_BF16:
        return n > SIZE_MAX / 2 ? 0 : (size_t)(n * 2);
    case KN_Q8_0:
        return n % 32 ? 0 : (size_t)(n / 32 * 34);
    case KN_Q4_0:
        return n % 32 ? 0 : (size_t)(n / 32 * 18);
    }
    return 0;
}

static bool type_supported(uint32_t t)
{
    return t == KN_F32 || t == KN_F16 || t == KN_BF16 || t == KN_Q8_0 || t == KN_Q4_0;
}

static const char *const g_type_names[ENG_GGUF_TYPE_COUNT] = {
    "u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64",
};

const char *eng_gguf_type_name(int type)
{
    return type >= 0 && type < ENG_GGUF_TYPE_COUNT ? g_type_names[type] : "?";
}

size_t eng_gguf_type_size(uint32_t t)
{
    switch (t) {
    case ENG_GGUF_U8:
    case ENG_GGUF_I8:
    case ENG_GGUF_BOOL:
        return 1;
    case ENG_GGUF_U16:
    case ENG_GGUF_I16:
        return 2;
    case ENG_GGUF_U32:
    case ENG_GGUF_I32:
    case ENG_GGUF_F32:
        return 4;
    case ENG_GGUF_U64:
    case ENG_GGUF_I64:
    case ENG_GGUF_F64:
        return 8;
    }
    return 0;
}

static bool type_is_signed(uint32_t t)
{
    return t == ENG_GGUF_I8 || t == ENG_GGUF_I16 || t == ENG_GGUF_I32 || t == ENG_GGUF_I64;
}

static bool type_is_int(uint32_t t)
{
    return t <= ENG_GGUF_I32 || t == ENG_GGUF_U64 || t == ENG_GGUF_I64;
}

/* Decode one little-endian scalar at p into the kv number union. */
static void load_scalar(uint32_t t, const uint8_t *p, struct kv *kv)
{
    switch (t) {
    case ENG_GGUF_U8:
    case ENG_GGUF_BOOL:
        kv->num.u = p[0];
        break;
    case ENG_GGUF_I8:
        kv->num.i = (int8_t)p[0];
        break;
    case ENG_GGUF_U16: {
        uint16_t v;
        memcpy(&v, p, 2);
        kv->num.u = v;
        break;
    }
    case ENG_GGUF_I16: {
        int16_t v;
        memcpy(&v, p, 2);
        kv->num.i = v;
        break;
    }
    case ENG_GGUF_U32: {
        uint32_t v;
        memcpy(&v, p, 4);
        kv->num.u = v;
        break;
    }
    case ENG_GGUF_I32: {
        int32_t v;
        memcpy(&v, p, 4);
        kv->num.i = v;
        break;
    }
    case ENG_GGUF_F32: {
        float v;
        memcpy(&v, p, 4);
        kv->num.f = v;
        break;
    }
    case ENG_GGUF_U64:
        memcpy(&kv->num.u, p, 8);
        break;
    case ENG_GGUF_I64:
        memcpy(&kv->num.i, p, 8);
        break;
    case ENG_GGUF_F64:
        memcpy(&kv->num.f, p, 8);
        break;
    }
}

/* FNV-1a: keys and names are short; quality is ample for open addressing. */
static uint64_t hash_bytes(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= (uint8_t)s[i];
        h *= 1099511628211ULL;
    }
    return h;
}

static int hash_init(struct hash *h, size_t n)
{
    size_t cap = 16;
    while (cap < n * 2)
        cap <<= 1;
    h->slot = calloc(cap, sizeof(*h->slot));
    if (!h->slot)
        return -ENOMEM;
    h->mask = cap - 1;
    return 0;
}

/* Insert index idx under name (NUL-terminated); returns false if present. */
static bool hash_insert(struct hash *h, const char *const *names_by_idx_base, size_t stride,
                        const char *name, uint32_t idx)
{
    size_t n = strlen(name);
    size_t i = (size_t)hash_bytes(name, n) & h->mask;
    for (;;) {
        uint32_t s = h->slot[i];
        if (!s) {
            h->slot[i] = idx + 1;
            return true;
        }
        const char *other = *(const char *const *)((const char *)names_by_idx_base +
                                                  (size_t)(s - 1) * stride);
        if (strcmp(other, name) == 0)
            return false;
        i = (i + 1) & h->mask;
    }
}

static int64_t hash_find(const struct hash *h, const char *const *names_by_idx_base,
                         size_t stride, const char *name)
{
    if (!h->slot || !name)
        return -ENOENT;
    size_t n = strlen(name);
    size_t i = (size_t)hash_bytes(name, n) & h->mask;
    for (;;) {
        uint32_t s = h->slot[i];
        if (!s)
            return -ENOENT;
        const char *other = *(const char *const *)((const char *)names_by_idx_base +
                                                  (size_t)(s - 1) * stride);
        if (strcmp(other, name) == 0)
            return (int64_t)(s - 1);
        i = (i + 1) & h->mask;
    }
}

/* ---- parsing ----------------------------------------------------------- */

struct cur {
    const uint8_t *p;
    size_t len;
    size_t pos;
};

static size_t cur_left(const struct cur *c)
{
    return c->len - c->pos;
}

static int rd_bytes(struct cur *c, void *dst, size_t n, const char *what)
{
    if (cur_left(c) < n)
        return eng_fail(-EBADMSG, "truncated file: %s at offset %zu needs %zu bytes, %zu left",
                        what, c->pos, n, cur_left(c));
    memcpy(dst, c->p + c->pos, n);
    c->pos += n;
    return 0;
}

static int rd_u32(struct cur *c, uint32_t *v, const char *what)
{
    return rd_bytes(c, v, 4, what);
}

static int rd_u64(struct cur *c, uint64_t *v, const char *what)
{
    return rd_bytes(c, v, 8, what);
}

/* A string: u64 length, bytes. Leaves (*s, *n) pointing into the file. */
static int rd_str(struct cur *c, const uint8_t **s, size_t *n, const char *what)
{
    uint64_t l = 0;
    int rc = rd_u64(c, &l, what);
    if (rc < 0)
        return rc;
    if (l > cur_left(c))
        return eng_fail(-EBADMSG,
                        "%s at offset %zu: string length %llu runs past the end of the file",
                        what, c->pos - 8, (unsigned long long)l);
    *s = c->p + c->pos;
    *n = (size_t)l;
    c->pos += (size_t)l;
    return 0;
}

/* Prefix the message already recorded (by a cursor read) with context.
 * eng_error() is the buffer eng_fail writes into, so copy it first. */
__attribute__((format(printf, 2, 3))) static int refail(int rc, const char *fmt, ...)
{
    char prev[512], pre[256];
    snprintf(prev, sizeof(prev), "%s", eng_error());
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(pre, sizeof(pre), fmt, ap);
    va_end(ap);
    return eng_fail(rc, "%s: %s", pre, prev);
}

/* Append n bytes + NUL to the arena; returns the offset or (size_t)-1. */
static size_t arena_add(eng_gguf *g, const uint8_t *s, size_t n)
{
    if (n > SIZE_MAX / 2 - g->arena_len - 1)
        return (size_t)-1;
    size_t need = g->arena_len + n + 1;
    if (need > g->arena_cap) {
        size_t cap = g->arena_cap ? g->arena_cap : 1024;
        while (cap < need)
            cap *= 2;
        char *a = realloc(g->arena, cap);
        if (!a)
            return (size_t)-1;
        g->arena = a;
        g->arena_cap = cap;
    }
    size_t off = g->arena_len;
    if (n)
        memcpy(g->arena + off, s, n);
    g->arena[off + n] = '\0';
    g->arena_len = need;
    return off;
}

static int name_check(const uint8_t *s, size_t n, const char *what, size_t pos)
{
    if (n == 0)
        return eng_fail(-EBADMSG, "gguf: empty %s at offset %zu", what, pos);
    if (memchr(s, '\0', n))
        return eng_fail(-EBADMSG, "gguf: %s at offset %zu contains a NUL byte", what, pos);
    return 0;
}

static int str_pos_push(eng_gguf *g, size_t pos)
{
    if (g->n_str_pos == g->cap_str_pos) {
        size_t cap = g->cap_str_pos ? g->cap_str_pos * 2 : 256;
        size_t *p = realloc(g->str_pos, cap * sizeof(*p));
        if (!p)
            return -ENOMEM;
        g->str_pos = p;
        g->cap_str_pos = cap;
    }
    g->str_pos[g->n_str_pos++] = pos;
    return 0;
}

/* `key` is a file-backed, non-NUL-terminated name used only in messages. */
static int parse_value(eng_gguf *g, struct cur *c, struct kv *kv, const char *key_for_msg)
{
    uint32_t t = 0;
    int rc = rd_u32(c, &t, "value type");
    if (rc < 0)
        return rc;
    if (t >= ENG_GGUF_TYPE_COUNT)
        return eng_fail(-EBADMSG, "gguf: key '%s': unknown value type %u", key_for_msg, t);
    kv->type = t;
    if (t == ENG_GGUF_STR) {
        const uint8_t *s;
        size_t n;
        if ((rc = rd_str(c, &s, &n, "string value")) < 0)
            return refail(rc, "gguf: key '%s'", key_for_msg);
        kv->str_off = arena_add(g, s, n);
        if (kv->str_off == (size_t)-1)
            return eng_fail(-ENOMEM, "gguf: out of memory");
        kv->str_len = n;
        return 0;
    }
    if (t != ENG_GGUF_ARR) {
        uint8_t buf[8];
        if ((rc = rd_bytes(c, buf, eng_gguf_type_size(t), "value")) < 0)
            return refail(rc, "gguf: key '%s'", key_for_msg);
        load_scalar(t, buf, kv);
        return 0;
    }
    uint32_t et = 0;
    uint64_t n = 0;
    if ((rc = rd_u32(c, &et, "array element type")) < 0 ||
        (rc = rd_u64(c, &n, "array length")) < 0)
        return refail(rc, "gguf: key '%s'", key_for_msg);
    if (et == ENG_GGUF_ARR)
        return eng_fail(-EBADMSG, "gguf: key '%s': nested arrays (array of arrays) are not supported",
                        key_for_msg);
    if (et >= ENG_GGUF_TYPE_COUNT)
        return eng_fail(-EBADMSG, "gguf: key '%s': unknown array element type %u", key_for_msg,
                        et);
    kv->arr.type = (enum eng_gguf_type)et;
    kv->arr.n = n;
    kv->arr.data = c->p + c->pos;
    if (et != ENG_GGUF_STR) {
        size_t es = eng_gguf_type_size(et);
        if (n > cur_left(c) / es)
            return eng_fail(-EBADMSG,
                            "gguf: key '%s': array of %llu %s elements runs past the end of the file",
                            key_for_msg, (unsigned long long)n, g_type_names[et]);
        c->pos += (size_t)n * es;
        return 0;
    }
    if (n > cur_left(c) / 8)
        return eng_fail(-EBADMSG,
                        "gguf: key '%s': array of %llu strings runs past the end of the file",
                        key_for_msg, (unsigned long long)n);
    kv->str_first = g->n_str_pos;
    for (uint64_t i = 0; i < n; i++) {
        size_t at = c->pos;
        const uint8_t *s;
        size_t sl;
        if ((rc = rd_str(c, &s, &sl, "array string")) < 0)
            return refail(rc, "gguf: key '%s' element %llu", key_for_msg,
                            (unsigned long long)i);
        if (str_pos_push(g, at) < 0)
            return eng_fail(-ENOMEM, "gguf: out of memory");
    }
    return 0;
}

static int parse_kvs(eng_gguf *g, struct cur *c, uint64_t n_kv)
{
    if (n_kv > cur_left(c) / MIN_KV_BYTES || n_kv >= UINT32_MAX)
        return eng_fail(-EBADMSG, "gguf: header claims %llu key/value pairs, more than the file can hold",
                        (unsigned long long)n_kv);
    g->kvs = calloc(n_kv ? (size_t)n_kv : 1, sizeof(*g->kvs));
    if (!g->kvs)
        return eng_fail(-ENOMEM, "gguf: out of memory");
    for (uint64_t i = 0; i < n_kv; i++) {
        struct kv *kv = &g->kvs[i];
        size_t at = c->pos;
        const uint8_t *k;
        size_t kn;
        int rc = rd_str(c, &k, &kn, "key");
        if (rc < 0)
            return refail(rc, "gguf: key/value pair %llu", (unsigned long long)i);
        if ((rc = name_check(k, kn, "key", at)) < 0)
            return rc;
        kv->key_off = arena_add(g, k, kn);
        if (kv->key_off == (size_t)-1)
            return eng_fail(-ENOMEM, "gguf: out of memory");
        /* Messages quote the key; copy it (truncated) now, the arena may move. */
        char msgkey[96];
        snprintf(msgkey, sizeof(msgkey), "%.*s", (int)(kn < 80 ? kn : 80), (const char *)k);
        g->n_kv = (int64_t)i + 1;
        if ((rc = parse_value(g, c, kv, msgkey)) < 0)
            return rc;
    }
    return 0;
}

static int checked_mul_i64(int64_t a, int64_t b, int64_t *out)
{
    return __builtin_mul_overflow(a, b, out) ? -1 : 0;
}

static int parse_tensor_infos(eng_gguf *g, struct cur *c, uint64_t n_t)
{
    if (n_t > cur_left(c) / MIN_TENSOR_BYTES || n_t >= UINT32_MAX)
        return eng_fail(-EBADMSG, "gguf: header claims %llu tensors, more than the file can hold",
                        (unsigned long long)n_t);
    g->tensors = calloc(n_t ? (size_t)n_t : 1, sizeof(*g->tensors));
    g->tensor_name_off = calloc(n_t ? (size_t)n_t : 1, sizeof(*g->tensor_name_off));
    if (!g->tensors || !g->tensor_name_off)
        return eng_fail(-ENOMEM, "gguf: out of memory");
    for (uint64_t i = 0; i < n_t; i++) {
        struct eng_gguf_tensor *t = &g->tensors[i];
        size_t at = c->pos;
        const uint8_t *nm;
        size_t nl;
        int rc = rd_str(c, &nm, &nl, "tensor name");
        if (rc < 0)
            return refail(rc, "gguf: tensor info %llu", (unsigned long long)i);
        if ((rc = name_check(nm, nl, "tensor name", at)) < 0)
            return rc;
        char tn[96];
        snprintf(tn, sizeof(tn), "%.*s", (int)(nl < 80 ? nl : 80), (const char *)nm);
        g->tensor_name_off[i] = arena_add(g, nm, nl);
        if (g->tensor_name_off[i] == (size_t)-1)
            return eng_fail(-ENOMEM, "gguf: out of memory");
        g->n_tensors = (int64_t)i + 1;

        uint32_t nd = 0;
        if ((rc = rd_u32(c, &nd, "n_dims")) < 0)
            return refail(rc, "gguf: tensor '%s'", tn);
        if (nd > ENG_GGUF_MAX_DIMS)
            return eng_fail(-EBADMSG, "gguf: tensor '%s': n_dims %u exceeds the maximum of %d", tn,
                            nd, ENG_GGUF_MAX_DIMS);
        t->n_dims = (int)nd;
        int64_t nelem = 1;
        for (int d = 0; d < ENG_GGUF_MAX_DIMS; d++) {
            uint64_t ne = 1;
            if ((uint32_t)d < nd && (rc = rd_u64(c, &ne, "tensor dimension")) < 0)
                return refail(rc, "gguf: tensor '%s'", tn);
            if (ne == 0 || ne > INT64_MAX)
                return eng_fail(-EBADMSG, "gguf: tensor '%s': dimension %d has invalid size %llu",
                                tn, d, (unsigned long long)ne);
            t->ne[d] = (int64_t)ne;
            if (checked_mul_i64(nelem, t->ne[d], &nelem) < 0)
                return eng_fail(-EBADMSG, "gguf: tensor '%s': element count overflows", tn);
        }
        uint32_t ty = 0;
        uint64_t off = 0;
        if ((rc = rd_u32(c, &ty, "tensor type")) < 0 || (rc = rd_u64(c, &off, "tensor offset")) < 0)
            return refail(rc, "gguf: tensor '%s'", tn);
        if (!type_supported(ty))
            return eng_fail(-EBADMSG,
                            "gguf: tensor '%s': type %s (%u) is not supported (only f32, f16, bf16, q8_0, q4_0)",
                            tn, eng_gguf_ggml_type_name(ty), ty);
        t->type = (enum kn_dtype)ty;
        size_t rb = eng_gguf_type_row_bytes(t->type, t->ne[0]);
        if (rb == 0 && (t->type == KN_Q8_0 || t->type == KN_Q4_0))
            return eng_fail(-EBADMSG,
                            "gguf: tensor '%s': row length %lld is not a multiple of the %s block size",
                            tn, (long long)t->ne[0], eng_gguf_ggml_type_name(ty));
        if (rb == 0)
            return eng_fail(-EBADMSG, "gguf: tensor '%s': byte size overflows", tn);
        uint64_t rows = (uint64_t)(nelem / t->ne[0]);
        uint64_t nb;
        if (__builtin_mul_overflow((uint64_t)rb, rows, &nb) || nb > SIZE_MAX)
            return eng_fail(-EBADMSG, "gguf: tensor '%s': byte size overflows", tn);
        t->nbytes = (size_t)nb;
        t->offset = off;
    }
    return 0;
}

static int cmp_by_offset(const void *a, const void *b)
{
    const struct eng_gguf_tensor *x = *(const struct eng_gguf_tensor *const *)a;
    const struct eng_gguf_tensor *y = *(const struct eng_gguf_tensor *const *)b;
    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

static int place_tensors(eng_gguf *g)
{
    size_t blob = g->len - g->data_off;
    for (int64_t i = 0; i < g->n_tensors; i++) {
        struct eng_gguf_tensor *t = &g->tensors[i];
        if (t->offset % g->alignment)
            return eng_fail(-EBADMSG, "gguf: tensor '%s': offset %llu is not a multiple of the alignment %zu",
                            t->name, (unsigned long long)t->offset, g->alignment);
        if (t->offset > blob || t->nbytes > blob - t->offset)
            return eng_fail(-EBADMSG,
                            "gguf: tensor '%s': data [%llu, +%zu) lies outside the data blob (%zu bytes)",
                            t->name, (unsigned long long)t->offset, t->nbytes, blob);
        t->data = g->base + g->data_off + t->offset;
    }
    if (g->n_tensors < 2)
        return 0;
    const struct eng_gguf_tensor **order = malloc((size_t)g->n_tensors * sizeof(*order));
    if (!order)
        return eng_fail(-ENOMEM, "gguf: out of memory");
    for (int64_t i = 0; i < g->n_tensors; i++)
        order[i] = &g->tensors[i];
    qsort(order, (size_t)g->n_tensors, sizeof(*order), cmp_by_offset);
    int rc = 0;
    for (int64_t i = 1; i < g->n_tensors; i++) {
        const struct eng_gguf_tensor *a = order[i - 1], *b = order[i];
        if (a->offset + a->nbytes > b->offset) {
            rc = eng_fail(-EBADMSG, "gguf: tensors '%s' and '%s' overlap in the data blob", a->name,
                          b->name);
            break;
        }
    }
    free(order);
    return rc;
}

static int parse(eng_gguf *g)
{
    struct cur c = {.p = g->base, .len = g->len, .pos = 0};
    char magic[4];
    uint64_t n_t, n_kv;
    int rc;
    if (g->len < 24)
        return eng_fail(-EBADMSG, "gguf: file too short for a header (%zu bytes)", g->len);
    rd_bytes(&c, magic, 4, "magic");
    if (memcmp(magic, "GGUF", 4) != 0)
        return eng_fail(-EBADMSG, "gguf: bad magic (not a GGUF file)");
    rd_u32(&c, &g->version, "version");
    if (g->version == 1)
        return eng_fail(-EBADMSG, "gguf: version 1 files are not supported (convert to v3)");
    if (g->version != 2 && g->version != 3)
        return eng_fail(-EBADMSG, "gguf: unsupported version %u%s", g->version,
                        (g->version & 0xffff) == 0 ? " (big-endian file?)" : "");
    rd_u64(&c, &n_t, "tensor count");
    rd_u64(&c, &n_kv, "key/value count");

    if ((rc = parse_kvs(g, &c, n_kv)) < 0)
        return rc;
    if ((rc = parse_tensor_infos(g, &c, n_t)) < 0)
        return rc;

    /* The arena has stopped moving: resolve names to pointers. */
    for (int64_t i = 0; i < g->n_kv; i++) {
        struct kv *kv = &g->kvs[i];
        kv->key = g->arena + kv->key_off;
        if (kv->type == ENG_GGUF_STR)
            kv->str = g->arena + kv->str_off;
        if (kv->type == ENG_GGUF_ARR)
            kv->arr.kv = i;
    }
    for (int64_t i = 0; i < g->n_tensors; i++)
        g->tensors[i].name = g->arena + g->tensor_name_off[i];

    if ((rc = hash_init(&g->kv_hash, (size_t)g->n_kv)) < 0 ||
        (rc = hash_init(&g->tensor_hash, (size_t)g->n_tensors)) < 0)
        return eng_fail(rc, "gguf: out of memory");
    for (int64_t i = 0; i < g->n_kv; i++)
        if (!hash_insert(&g->kv_hash, &g->kvs[0].key, sizeof(struct kv), g->kvs[i].key,
                         (uint32_t)i))
            return eng_fail(-EBADMSG, "gguf: duplicate key '%s'", g->kvs[i].key);
    for (int64_t i = 0; i < g->n_tensors; i++)
        if (!hash_insert(&g->tensor_hash, &g->tensors[0].name, sizeof(struct eng_gguf_tensor),
                         g->tensors[i].name, (uint32_t)i))
            return eng_fail(-EBADMSG, "gguf: duplicate tensor name '%s'", g->tensors[i].name);

    g->alignment = ENG_GGUF_DEFAULT_ALIGNMENT;
    int64_t ai = eng_gguf_find_kv(g, "general.alignment");
    if (ai >= 0) {
        const struct kv *kv = &g->kvs[ai];
        if (kv->type != ENG_GGUF_U32)
            return eng_fail(-EBADMSG, "gguf: general.alignment has type %s, expected u32",
                            g_type_names[kv->type]);
        if (kv->num.u == 0 || (kv->num.u & (kv->num.u - 1)))
            return eng_fail(-EBADMSG, "gguf: general.alignment %llu is not a power of two",
                            (unsigned long long)kv->num.u);
        g->alignment = (size_t)kv->num.u;
    }
    /* c.pos < 2^63 and alignment <= 2^31: cannot overflow. */
    size_t data_off = (c.pos + g->alignment - 1) / g->alignment * g->alignment;
    if (data_off > g->len) {
        if (g->n_tensors > 0)
            return eng_fail(-EBADMSG, "gguf: data blob would start at %zu, past the end of the file (%zu bytes)",
                            data_off, g->len);
        /* Metadata-only file written without trailing padding: nothing to place. */
        data_off = g->len;
    }
    g->data_off = data_off;
    return place_tensors(g);
}

static int open_common(eng_gguf **out, eng_gguf *g)
{
    int rc = parse(g);
    if (rc < 0) {
        eng_gguf_close(g);
        return rc;
    }
    *out = g;
    return 0;
}

int eng_gguf_open_mem(eng_gguf **out, const void *data, size_t len)
{
    if (!out || (!data && len))
        return eng_fail(-EINVAL, "gguf: invalid arguments");
    eng_gguf *g = calloc(1, sizeof(*g));
    if (!g)
        return eng_fail(-ENOMEM, "gguf: out of memory");
    static const uint8_t empty[1];
    g->base = data ? data : empty;
    g->len = len;
    return open_common(out, g);
}

int eng_gguf_open(eng_gguf **out, const char *path)
{
    if (!out || !path)
        return eng_fail(-EINVAL, "gguf: invalid arguments");
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        return eng_fail(-e, "gguf: cannot open %s: %s", path, strerror(e));
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int e = errno;
        close(fd);
        return eng_fail(-e, "gguf: cannot stat %s: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return eng_fail(-EINVAL, "gguf: %s is not a regular file", path);
    }
    if (st.st_size < 24) {
        close(fd);
        return eng_fail(-EBADMSG, "gguf: %s: file too short for a header (%lld bytes)", path,
                        (long long)st.st_size);
    }
    size_t len = (size_t)st.st_size;
    /* MAP_PRIVATE + PROT_READ: weights are shared page cache, never written. */
    void *p = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd);
    if (p == MAP_FAILED)
        return eng_fail(-e, "gguf: cannot map %s: %s", path, strerror(e));
    eng_gguf *g = calloc(1, sizeof(*g));
    if (!g) {
        munmap(p, len);
        return eng_fail(-ENOMEM, "gguf: out of memory");
    }
    g->base = p;
    g->len = len;
    g->mapped = true;
    int rc = open_common(out, g);
    if (rc < 0) {
        char msg[512];
        snprintf(msg, sizeof(msg), "%s", eng_error());
        return eng_fail(rc, "%s: %s", path, msg);
    }
    return 0;
}

void eng_gguf_close(eng_gguf *g)
{
    if (!g)
        return;
    if (g->mapped)
        munmap((void *)g->base, g->len);
    free(g->kvs);
    free(g->kv_hash.slot);
    free(g->tensors);
    free(g->tensor_name_off);
    free(g->tensor_hash.slot);
    free(g->arena);
    free(g->str_pos);
    free(g);
}

void eng_gguf_release(const eng_gguf *g, const void *p, size_t len)
{
    const uintptr_t base = (uintptr_t)g->base, end = base + g->len;
    const uintptr_t pg = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t lo = (uintptr_t)p, hi = lo + len;
    if (!g->mapped || lo < base || hi > end || hi < lo)
        return;
    lo = (lo + pg - 1) / pg * pg;
    hi = hi / pg * pg;
    if (hi > lo)
        (void)madvise((void *)lo, hi - lo, MADV_DONTNEED); /* advice: failure changes nothing */
}

uint32_t eng_gguf_version(const eng_gguf *g)
{
    return g->version;
}

size_t eng_gguf_alignment(const eng_gguf *g)
{
    return g->alignment;
}

size_t eng_gguf_file_bytes(const eng_gguf *g)
{
    return g->len;
}

size_t eng_gguf_data_offset(const eng_gguf *g)
{
    return g->data_off;
}

const void *eng_gguf_file_data(const eng_gguf *g)
{
    return g->base;
}

/* ---- metadata access --------------------------------------------------- */

int64_t eng_gguf_kv_count(const eng_gguf *g)
{
    return g->n_kv;
}

int64_t eng_gguf_find_kv(const eng_gguf *g, const char *key)
{
    if (g->n_kv == 0)
        return -ENOENT;
    return hash_find(&g->kv_hash, &g->kvs[0].key, sizeof(struct kv), key);
}

const char *eng_gguf_kv_key(const eng_gguf *g, int64_t i)
{
    return i >= 0 && i < g->n_kv ? g->kvs[i].key : NULL;
}

int eng_gguf_kv_type(const eng_gguf *g, int64_t i)
{
    return i >= 0 && i < g->n_kv ? (int)g->kvs[i].type : -1;
}

static int lookup(const eng_gguf *g, const char *key, const struct kv **kv)
{
    int64_t i = eng_gguf_find_kv(g, key);
    if (i < 0)
        return eng_fail(-ENOENT, "gguf: key '%s' not found", key ? key : "(null)");
    *kv = &g->kvs[i];
    return 0;
}

/* Integer value of kv as a wide signed/unsigned pair. */
static int get_int(const eng_gguf *g, const char *key, bool *neg, uint64_t *mag)
{
    const struct kv *kv = NULL;
    int rc = lookup(g, key, &kv);
    if (rc < 0)
        return rc;
    if (!type_is_int(kv->type))
        return eng_fail(-EBADMSG, "gguf: key '%s' has type %s, expected an integer", key,
                        g_type_names[kv->type]);
    if (type_is_signed(kv->type) && kv->num.i < 0) {
        *neg = true;
        *mag = (uint64_t)(-(kv->num.i + 1)) + 1;
    } else {
        *neg = false;
        *mag = kv->num.u;
    }
    return 0;
}

static int range_fail(const char *key, const char *want)
{
    return eng_fail(-EBADMSG, "gguf: key '%s': value out of range for %s", key, want);
}

int eng_gguf_get_u32(const eng_gguf *g, const char *key, uint32_t *out)
{
    bool neg;
    uint64_t m;
    int rc = get_int(g, key, &neg, &m);
    if (rc < 0)
        return rc;
    if (neg || m > UINT32_MAX)
        return range_fail(key, "u32");
    *out = (uint32_t)m;
    return 0;
}

int eng_gguf_get_i32(const eng_gguf *g, const char *key, int32_t *out)
{
    bool neg;
    uint64_t m;
    int rc = get_int(g, key, &neg, &m);
    if (rc < 0)
        return rc;
    if (neg ? m > (uint64_t)INT32_MAX + 1 : m > INT32_MAX)
        return range_fail(key, "i32");
    *out = neg ? (int32_t)(-(int64_t)m) : (int32_t)m;
    return 0;
}

int eng_gguf_get_u64(const eng_gguf *g, const char *key, uint64_t *out)
{
    bool neg;
    uint64_t m;
    int rc = get_int(g, key, &neg, &m);
    if (rc < 0)
        return rc;
    if (neg)
        return range_fail(key, "u64");
    *out = m;
    return 0;
}

int eng_gguf_get_i64(const eng_gguf *g, const char *key, int64_t *out)
{
    bool neg;
    uint64_t m;
    int rc = get_int(g, key, &neg, &m);
    if (rc < 0)
        return rc;
    if (neg ? m > (uint64_t)INT64_MAX + 1 : m > INT64_MAX)
        return range_fail(key, "i64");
    *out = neg ? (m == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)m) : (int64_t)m;
    return 0;
}

int eng_gguf_get_f64(const eng_gguf *g, const char *key, double *out)
{
    const struct kv *kv = NULL;
    int rc = lookup(g, key, &kv);
    if (rc < 0)
        return rc;
    if (kv->type == ENG_GGUF_F32 || kv->type == ENG_GGUF_F64)
        *out = kv->num.f;
    else if (type_is_int(kv->type))
        *out = type_is_signed(kv->type) ? (double)kv->num.i : (double)kv->num.u;
    else
        return eng_fail(-EBADMSG, "gguf: key '%s' has type %s, expected a number", key,
                        g_type_names[kv->type]);
    return 0;
}

int eng_gguf_get_f32(const eng_gguf *g, const char *key, float *out)
{
    double d;
    int rc = eng_gguf_get_f64(g, key, &d);
    if (rc < 0)
        return rc;
    if (isfinite(d) && fabs(d) > FLT_MAX)
        return range_fail(key, "f32");
    *out = (float)d;
    return 0;
}

int eng_gguf_get_bool(const eng_gguf *g, const char *key, bool *out)
{
    const struct kv *kv = NULL;
    int rc = lookup(g, key, &kv);
    if (rc < 0)
        return rc;
    if (kv->type != ENG_GGUF_BOOL)
        return eng_fail(-EBADMSG, "gguf: key '%s' has type %s, expected bool", key,
                        g_type_names[kv->type]);
    *out = kv->num.u != 0;
    return 0;
}

int eng_gguf_get_str(const eng_gguf *g, const char *key, const char **out, size_t *len)
{
    const struct kv *kv = NULL;
    int rc = lookup(g, key, &kv);
    if (rc < 0)
        return rc;
    if (kv->type != ENG_GGUF_STR)
        return eng_fail(-EBADMSG, "gguf: key '%s' has type %s, expected string", key,
                        g_type_names[kv->type]);
    *out = kv->str;
    if (len)
        *len = kv->str_len;
    return 0;
}

int eng_gguf_get_arr(const eng_gguf *g, const char *key, eng_gguf_arr *out)
{
    const struct kv *kv = NULL;
    int rc = lookup(g, key, &kv);
    if (rc < 0)
        return rc;
    if (kv->type != ENG_GGUF_ARR)
        return eng_fail(-EBADMSG, "gguf: key '%s' has type %s, expected array", key,
                        g_type_names[kv->type]);
    *out = kv->arr;
    return 0;
}

int eng_gguf_arr_i64(const eng_gguf_arr *a, uint64_t i, int64_t *out)
{
    if (i >= a->n || !type_is_int(a->type))
        return eng_fail(-EBADMSG, "gguf: array element %llu: not an integer array element",
                        (unsigned long long)i);
    struct kv tmp;
    size_t es = eng_gguf_type_size(a->type);
    load_scalar(a->type, (const uint8_t *)a->data + i * es, &tmp);
    if (type_is_signed(a->type)) {
        *out = tmp.num.i;
    } else {
        if (tmp.num.u > INT64_MAX)
            return eng_fail(-EBADMSG, "gguf: array element %llu out of range for i64",
                            (unsigned long long)i);
        *out = (int64_t)tmp.num.u;
    }
    return 0;
}

int eng_gguf_arr_f32(const eng_gguf_arr *a, uint64_t i, float *out)
{
    if (i >= a->n || a->type == ENG_GGUF_STR || a->type == ENG_GGUF_BOOL)
        return eng_fail(-EBADMSG, "gguf: array element %llu: not a numeric array element",
                        (unsigned long long)i);
    struct kv tmp;
    size_t es = eng_gguf_type_size(a->type);
    load_scalar(a->type, (const uint8_t *)a->data + i * es, &tmp);
    double d;
    if (a->type == ENG_GGUF_F32 || a->type == ENG_GGUF_F64)
        d = tmp.num.f;
    else
        d = type_is_signed(a->type) ? (double)tmp.num.i : (double)tmp.num.u;
    if (isfinite(d) && fabs(d) > FLT_MAX)
        return eng_fail(-EBADMSG, "gguf: array element %llu out of range for f32",
                        (unsigned long long)i);
    *out = (float)d;
    return 0;
}

int eng_gguf_arr_str(const eng_gguf *g, const eng_gguf_arr *a, uint64_t i, const char **s,
                     size_t *len)
{
    if (a->type != ENG_GGUF_STR || i >= a->n || a->kv < 0 || a->kv >= g->n_kv ||
        g->kvs[a->kv].type != ENG_GGUF_ARR || g->kvs[a->kv].arr.data != a->data)
        return eng_fail(-EBADMSG, "gguf: array element %llu: not a string array element",
                        (unsigned long long)i);
    size_t pos = g->str_pos[g->kvs[a->kv].str_first + i];
    uint64_t l = 0;
    memcpy(&l, g->base + pos, 8);
    *s = (const char *)g->base + pos + 8;
    *len = (size_t)l;
    return 0;
}

/* ---- tensors ----------------------------------------------------------- */

int64_t eng_gguf_tensor_count(const eng_gguf *g)
{
    return g->n_tensors;
}

const struct eng_gguf_tensor *eng_gguf_tensor_at(const eng_gguf *g, int64_t i)
{
    return i >= 0 && i < g->n_tensors ? &g->tensors[i] : NULL;
}

const struct eng_gguf_tensor *eng_gguf_find_tensor(const eng_gguf *g, const char *name)
{
    if (g->n_tensors == 0)
        return NULL;
    int64_t i = hash_find(&g->tensor_hash, &g->tensors[0].name, sizeof(struct eng_gguf_tensor),
                          name);
    return i >= 0 ? &g->tensors[i] : NULL;
}
