/* safetensors reader and writer. The header is parsed with jansson (strict
 * mode: duplicate keys rejected); everything taken from it is copied into
 * owned memory and validated before any accessor can see it. */
#include "engine/model/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/cm_err.h"
#include "engine/model/eng_err.h"

#define META_KEY "__metadata__"

struct eng_st {
    void *map; /* whole-file mapping (eng_st_open), else NULL */
    size_t map_len;

    struct eng_st_tensor *tensors; /* [n], header order */
    int64_t n;
    int64_t *by_name; /* [n] indices sorted by name, for bsearch */
    void **owned;     /* [n] aligned copies of misaligned tensors (or NULL) */

    struct eng_st_meta *meta; /* [n_meta]; key/value strings owned */
    int64_t n_meta;
};

/* ---- dtypes ------------------------------------------------------------- */

const char *eng_st_dtype_name(enum kn_dtype t)
{
    switch (t) {
    case KN_F32:
        return "F32";
    case KN_F16:
        return "F16";
    case KN_BF16:
        return "BF16";
    default:
        return NULL;
    }
}

size_t eng_st_dtype_size(enum kn_dtype t)
{
    switch (t) {
    case KN_F32:
        return 4;
    case KN_F16:
    case KN_BF16:
        return 2;
    default:
        return 0;
    }
}

static int dtype_parse(const char *s, enum kn_dtype *out)
{
    if (!strcmp(s, "F32"))
        *out = KN_F32;
    else if (!strcmp(s, "F16"))
        *out = KN_F16;
    else if (!strcmp(s, "BF16"))
        *out = KN_BF16;
    else
        return -1;
    return 0;
}

/* ---- lookup ------------------------------------------------------------- */

int64_t eng_st_count(const eng_st *st)
{
    return st ? st->n : 0;
}

const struct eng_st_tensor *eng_st_tensor_at(const eng_st *st, int64_t i)
{
    if (!st || i < 0 || i >= st->n)
        return NULL;
    return &st->tensors[i];
}

const struct eng_st_tensor *eng_st_find(const eng_st *st, const char *name)
{
    if (!st || !name)
        return NULL;
    int64_t lo = 0, hi = st->n;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        const struct eng_st_tensor *t = &st->tensors[st->by_name[mid]];
        int c = strcmp(name, t->name);
        if (c == 0)
            return t;
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return NULL;
}

int64_t eng_st_meta_count(const eng_st *st)
{
    return st ? st->n_meta : 0;
}

const struct eng_st_meta *eng_st_meta_at(const eng_st *st, int64_t i)
{
    if (!st || i < 0 || i >= st->n_meta)
        return NULL;
    return &st->meta[i];
}

const char *eng_st_meta_get(const eng_st *st, const char *key)
{
    if (!st || !key)
        return NULL;
    for (int64_t i = 0; i < st->n_meta; i++)
        if (!strcmp(st->meta[i].key, key))
            return st->meta[i].value;
    return NULL;
}

void eng_st_close(eng_st *st)
{
    if (!st)
        return;
    for (int64_t i = 0; i < st->n; i++) {
        free((void *)st->tensors[i].name);
        if (st->owned)
            free(st->owned[i]);
    }
    for (int64_t i = 0; i < st->n_meta; i++) {
        free((void *)st->meta[i].key);
        free((void *)st->meta[i].value);
    }
    free(st->tensors);
    free(st->by_name);
    free(st->owned);
    free(st->meta);
    if (st->map)
        munmap(st->map, st->map_len);
    free(st);
}

/* ---- parsing ------------------------------------------------------------ */

/* Names go into error messages: cap them so a 1 MB name cannot hide the
 * rest of the message. */
#define NAME_FMT "'%.80s'"

/* A non-negative JSON integer, as uint64. */
static int json_u64(const json_t *v, uint64_t *out)
{
    if (!json_is_integer(v))
        return -1;
    json_int_t x = json_integer_value(v);
    if (x < 0)
        return -1;
    *out = (uint64_t)x;
    return 0;
}

static int parse_meta(eng_st *st, json_t *obj)
{
    if (!json_is_object(obj))
        return eng_fail(-EBADMSG, "\"" META_KEY "\" is not an object");
    size_t n = json_object_size(obj);
    if (n == 0)
        return 0;
    st->meta = calloc(n, sizeof(*st->meta));
    if (!st->meta)
        return eng_fail(-ENOMEM, "out of memory for %zu metadata entries", n);
    const char *k;
    json_t *v;
    json_object_foreach(obj, k, v)
    {
        if (!json_is_string(v))
            return eng_fail(-EBADMSG, "metadata " NAME_FMT ": value is not a string", k);
        struct eng_st_meta *m = &st->meta[st->n_meta];
        m->key = strdup(k);
        m->value = strdup(json_string_value(v));
        st->n_meta++; /* counted before the check so close() frees a half-made entry */
        if (!m->key || !m->value)
            return eng_fail(-ENOMEM, "out of memory for metadata");
    }
    return 0;
}

static int parse_tensor(struct eng_st_tensor *t, const char *name, json_t *obj,
                        uint64_t blob_len, uint64_t *begin_out, uint64_t *end_out)
{
    if (!*name)
        return eng_fail(-EBADMSG, "tensor with an empty name");
    if (!json_is_object(obj))
        return eng_fail(-EBADMSG, "tensor " NAME_FMT ": entry is not an object", name);

    json_t *jdtype = NULL, *jshape = NULL, *joffs = NULL;
    const char *k;
    json_t *v;
    json_object_foreach(obj, k, v)
    {
        if (!strcmp(k, "dtype"))
            jdtype = v;
        else if (!strcmp(k, "shape"))
            jshape = v;
        else if (!strcmp(k, "data_offsets"))
            joffs = v;
        else
            return eng_fail(-EBADMSG, "tensor " NAME_FMT ": unknown field " NAME_FMT, name, k);
    }
    if (!jdtype || !jshape || !joffs)
        return eng_fail(-EBADMSG, "tensor " NAME_FMT ": missing field \"%s\"", name,
                        !jdtype ? "dtype" : !jshape ? "shape" : "data_offsets");

    if (!json_is_string(jdtype))
        return eng_fail(-EBADMSG, "tensor " NAME_FMT ": dtype is not a string", name);
    const char *ds = json_string_value(jdtype);
    if (dtype_parse(ds, &t->dtype) < 0)
        return eng_fail(-EBADMSG,
                        "tensor " NAME_FMT ": unsupported dtype " NAME_FMT
                        " (F32, F16 and BF16 only)",
                        name, ds);
    const uint64_t esize = eng_st_dtype_size(t->dtype);

    if (!json_is_array(jshape))
        return eng_fail(-EBADMSG, "tensor " NAME_FMT ": shape is not an array", name);
    size_t nd = json_array_size(jshape);
    if (nd > ENG_ST_MAX_DIMS)
        return eng_fail(-EBADMSG, "tensor " NAME_FMT ": %zu dimensions (at most %d)", name, nd,
                        ENG_ST_MAX_DIMS);
    bool zero = false;
    for (size_t i = 0; i < nd; i++) {
        uint64_t d;
        if (json_u64(json_array_get(jshape, i), &d) < 0)
            return eng_fail(-EBADMSG,
                            "tensor " NAME_FMT ": shape[%zu] is not a non-negative integer", name,
                            i);
        t->shape[i] = (int64_t)d;
        zero |= d == 0;
    }
    /* Without a zero dimension the product is bounded by the blob length at
     * every step, so it can neither overflow nor describe more bytes than
     * the file has. */
    uint64_t n_elems = zero ? 0 : 1;
    for (size_t i = 0; i < nd && !zero; i++)
        if (__builtin_mul_overflow(n_elems, (uint64_t)t->shape[i], &n_elems) ||
            n_elems > blob_len / esize)
            return eng_fail(-EBADMSG,
                            "tensor " NAME_FMT ": shape describes more data than the "
                            "%" PRIu64 "-byte blob holds",
                            name, blob_len);
    t->n_dims = (int)nd;
    t->n_elems = (int64_t)n_elems;

    if (!json_is_array(joffs) || json_array_size(joffs) != 2)
        return eng_fail(-EBADMSG, "tensor " NAME_FMT ": data_offsets is not [begin, end]",
                        name);
    uint64_t begin, end;
    if (json_u64(json_array_get(joffs, 0), &begin) < 0 ||
        json_u64(json_array_get(joffs, 1), &end) < 0)
        return eng_fail(-EBADMSG,
                        "tensor " NAME_FMT ": data_offsets are not non-negative integers",
                        name);
    if (end < begin)
        return eng_fail(-EBADMSG,
                        "tensor " NAME_FMT ": data_offsets [%" PRIu64 ", %" PRIu64
                        "] end before begin",
                        name, begin, end);
    if (end > blob_len)
        return eng_fail(-EBADMSG,
                        "tensor " NAME_FMT ": data_offsets [%" PRIu64 ", %" PRIu64
                        "] out of the %" PRIu64 "-byte data blob",
                        name, begin, end, blob_len);
    uint64_t nbytes = n_elems * esize; /* <= blob_len, checked above */
    if (nbytes != end - begin)
        return eng_fail(-EBADMSG,
                        "tensor " NAME_FMT ": shape and dtype %s need %" PRIu64
                        " bytes but data_offsets span %" PRIu64 " (size mismatch)",
                        name, ds, nbytes, end - begin);
    t->nbytes = (size_t)nbytes;
    *begin_out = begin;
    *end_out = end;
    return 0;
}

struct span {
    uint64_t begin, end;
    int64_t idx;
};

static int span_cmp(const void *a, const void *b)
{
    const struct span *x = a, *y = b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end)
        return x->end < y->end ? -1 : 1;
    return 0;
}

/* qsort has no context pointer: the name table is passed through a
 * thread-local, so concurrent opens on different threads stay independent. */
static _Thread_local const struct eng_st_tensor *g_sort_tensors;

static int name_cmp(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return strcmp(g_sort_tensors[x].name, g_sort_tensors[y].name);
}

static int check_layout(eng_st *st, struct span *spans)
{
    qsort(spans, (size_t)st->n, sizeof(*spans), span_cmp);
    /* Empty tensors occupy no bytes and cannot overlap anything. Among the
     * rest, sorted by begin, an overlap exists iff some begin is below the
     * largest end seen so far. */
    uint64_t max_end = 0;
    int64_t max_idx = -1;
    for (int64_t i = 0; i < st->n; i++) {
        const struct span *s = &spans[i];
        if (s->begin == s->end)
            continue;
        if (max_idx >= 0 && s->begin < max_end)
            return eng_fail(-EBADMSG,
                            "tensors " NAME_FMT " and " NAME_FMT " overlap in the data blob",
                            st->tensors[max_idx].name, st->tensors[s->idx].name);
        if (s->end > max_end) {
            max_end = s->end;
            max_idx = s->idx;
        }
    }

    for (int64_t i = 0; i < st->n; i++)
        st->by_name[i] = i;
    g_sort_tensors = st->tensors;
    qsort(st->by_name, (size_t)st->n, sizeof(*st->by_name), name_cmp);
    for (int64_t i = 1; i < st->n; i++) {
        const char *a = st->tensors[st->by_name[i - 1]].name;
        const char *b = st->tensors[st->by_name[i]].name;
        if (!strcmp(a, b))
            return eng_fail(-EBADMSG, "duplicate tensor name " NAME_FMT, a);
    }
    return 0;
}

/* Point every tensor at its bytes; copy the misaligned ones. */
static int place_data(eng_st *st, const uint8_t *blob, const struct span *spans)
{
    for (int64_t i = 0; i < st->n; i++) {
        struct eng_st_tensor *t = &st->tensors[spans[i].idx];
        const uint8_t *p = blob + spans[i].begin;
        size_t esize = eng_st_dtype_size(t->dtype);
        if (t->nbytes == 0 || (uintptr_t)p % esize == 0) {
            t->data = p;
            continue;
        }
        if (!st->owned) {
            st->owned = calloc((size_t)st->n, sizeof(*st->owned));
            if (!st->owned)
                return eng_fail(-ENOMEM, "out of memory");
        }
        void *copy = malloc(t->nbytes); /* malloc is aligned for any scalar */
        if (!copy)
            return eng_fail(-ENOMEM, "out of memory copying misaligned tensor " NAME_FMT
                                     " (%zu bytes)",
                            t->name, t->nbytes);
        memcpy(copy, p, t->nbytes);
        st->owned[spans[i].idx] = copy;
        t->data = copy;
    }
    return 0;
}

static int parse_header(eng_st *st, json_t *root, const uint8_t *blob, uint64_t blob_len)
{
    if (!json_is_object(root))
        return eng_fail(-EBADMSG, "header is not a JSON object");

    size_t n_entries = json_object_size(root);
    size_t cap = n_entries ? n_entries : 1;
    st->tensors = calloc(cap, sizeof(*st->tensors));
    st->by_name = calloc(cap, sizeof(*st->by_name));
    struct span *spans = calloc(cap, sizeof(*spans));
    if (!st->tensors || !st->by_name || !spans) {
        free(spans);
        return eng_fail(-ENOMEM, "out of memory for %zu header entries", n_entries);
    }

    int rc = 0;
    const char *k;
    json_t *v;
    json_object_foreach(root, k, v)
    {
        if (!strcmp(k, META_KEY)) {
            rc = parse_meta(st, v);
        } else {
            struct eng_st_tensor *t = &st->tensors[st->n];
            struct span *s = &spans[st->n];
            rc = parse_tensor(t, k, v, blob_len, &s->begin, &s->end);
            if (rc == 0) {
                t->name = strdup(k);
                if (!t->name)
                    rc = eng_fail(-ENOMEM, "out of memory");
                s->idx = st->n;
                st->n++;
            }
        }
        if (rc < 0)
            break;
    }
    if (rc == 0)
        rc = check_layout(st, spans);
    if (rc == 0)
        rc = place_data(st, blob, spans);
    free(spans);
    return rc;
}

static int parse(eng_st *st, const uint8_t *buf, size_t len)
{
    if (len < 8)
        return eng_fail(-EBADMSG, "%zu bytes: too short for the 8-byte header length", len);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = n << 8 | buf[i];
    if (n > ENG_ST_MAX_HEADER)
        return eng_fail(-EBADMSG,
                        "header length %" PRIu64 " exceeds the %" PRIu64 "-byte limit", n,
                        ENG_ST_MAX_HEADER);
    if (n > len - 8)
        return eng_fail(-EBADMSG,
                        "header length %" PRIu64 " runs past the end of the file (%zu bytes)",
                        n, len);

    json_error_t jerr;
    json_t *root = json_loadb((const char *)buf + 8, (size_t)n, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return eng_fail(-EBADMSG, "bad header JSON at byte %d: %s", jerr.position, jerr.text);
    int rc = parse_header(st, root, buf + 8 + n, (uint64_t)(len - 8 - n));
    json_decref(root);
    return rc;
}

int eng_st_open_mem(eng_st **out, const void *buf, size_t len)
{
    if (!out || (!buf && len))
        return eng_fail(-EINVAL, "eng_st_open_mem: NULL argument");
    eng_st *st = calloc(1, sizeof(*st));
    if (!st)
        return eng_fail(-ENOMEM, "out of memory");
    int rc = parse(st, buf ? buf : "", len);
    if (rc < 0) {
        eng_st_close(st);
        return rc;
    }
    *out = st;
    return 0;
}

/* Prefix the message parse() left with the path (copied first: eng_fail
 * formats into the very buffer eng_error() returns). */
static int fail_path(int rc, const char *path)
{
    char msg[512];
    snprintf(msg, sizeof(msg), "%s", eng_error());
    return eng_fail(rc, "%s: %s", path, msg);
}

int eng_st_open(eng_st **out, const char *path)
{
    if (!out || !path)
        return eng_fail(-EINVAL, "eng_st_open: NULL argument");
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int rc = cm_neg_errno();
        return eng_fail(rc, "%s: open: %s", path, cm_strerror(rc));
    }
    struct stat sb;
    if (fstat(fd, &sb) < 0) {
        int rc = cm_neg_errno();
        close(fd);
        return eng_fail(rc, "%s: fstat: %s", path, cm_strerror(rc));
    }
    if (!S_ISREG(sb.st_mode)) {
        close(fd);
        return eng_fail(-EBADMSG, "%s: not a regular file", path);
    }
    if (sb.st_size < 8) {
        close(fd);
        return eng_fail(-EBADMSG, "%s: %lld bytes: too short for the 8-byte header length",
                        path, (long long)sb.st_size);
    }
    size_t len = (size_t)sb.st_size;
    void *map = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
    int map_errno = map == MAP_FAILED ? cm_neg_errno() : 0;
    close(fd);
    if (map == MAP_FAILED)
        return eng_fail(map_errno, "%s: mmap %zu bytes: %s", path, len, cm_strerror(map_errno));

    eng_st *st = calloc(1, sizeof(*st));
    if (!st) {
        munmap(map, len);
        return eng_fail(-ENOMEM, "%s: out of memory", path);
    }
    st->map = map;
    st->map_len = len;
    int rc = parse(st, map, len);
    if (rc < 0) {
        eng_st_close(st);
        return fail_path(rc, path);
    }
    *out = st;
    return 0;
}

/* ---- writing ------------------------------------------------------------ */

static int check_tensors(const struct eng_st_tensor *ts, int64_t n, const struct eng_st_meta *meta,
                         int64_t n_meta)
{
    if (n < 0 || n_meta < 0 || (n && !ts) || (n_meta && !meta))
        return eng_fail(-EINVAL, "eng_st_write: bad tensor or metadata array");
    for (int64_t i = 0; i < n_meta; i++)
        if (!meta[i].key || !meta[i].value)
            return eng_fail(-EINVAL, "eng_st_write: metadata %" PRId64 " has a NULL key or value",
                            i);
    for (int64_t i = 0; i < n; i++) {
        const struct eng_st_tensor *t = &ts[i];
        if (!t->name || !*t->name || !strcmp(t->name, META_KEY))
            return eng_fail(-EINVAL, "eng_st_write: tensor %" PRId64 " has no usable name", i);
        size_t es = eng_st_dtype_size(t->dtype);
        if (!es)
            return eng_fail(-EINVAL,
                            "eng_st_write: tensor " NAME_FMT ": unsupported dtype (kn_dtype %d; "
                            "F32, F16 and BF16 only)",
                            t->name, (int)t->dtype);
        if (t->n_dims < 0 || t->n_dims > ENG_ST_MAX_DIMS)
            return eng_fail(-EINVAL, "eng_st_write: tensor " NAME_FMT ": %d dimensions",
                            t->name, t->n_dims);
        uint64_t ne = 1;
        for (int d = 0; d < t->n_dims; d++) {
            if (t->shape[d] < 0 || __builtin_mul_overflow(ne, (uint64_t)t->shape[d], &ne))
                return eng_fail(-EINVAL, "eng_st_write: tensor " NAME_FMT ": bad shape",
                                t->name);
        }
        uint64_t nb;
        if (__builtin_mul_overflow(ne, (uint64_t)es, &nb) || nb != t->nbytes)
            return eng_fail(-EINVAL,
                            "eng_st_write: tensor " NAME_FMT ": nbytes %zu does not match "
                            "its shape and dtype",
                            t->name, t->nbytes);
        if (t->nbytes && !t->data)
            return eng_fail(-EINVAL, "eng_st_write: tensor " NAME_FMT ": NULL data", t->name);
        for (int64_t j = 0; j < i; j++)
            if (!strcmp(ts[j].name, t->name))
                return eng_fail(-EINVAL, "eng_st_write: duplicate tensor name " NAME_FMT,
                                t->name);
    }
    return 0;
}

/* The header bytes (length prefix, JSON, padding) in one malloc'ed buffer. */
static int build_header(char **out, size_t *out_len, uint64_t *blob_len,
                        const struct eng_st_tensor *ts, int64_t n, const struct eng_st_meta *meta,
                        int64_t n_meta)
{
    int rc = check_tensors(ts, n, meta, n_meta);
    if (rc < 0)
        return rc;
    json_t *root = json_object();
    if (!root)
        return eng_fail(-ENOMEM, "out of memory");
    bool ok = true;
    if (n_meta > 0) {
        json_t *m = json_object();
        ok = m && !json_object_set_new(root, META_KEY, m);
        for (int64_t i = 0; ok && i < n_meta; i++)
            ok = !json_object_set_new(m, meta[i].key, json_string(meta[i].value));
    }
    uint64_t off = 0;
    for (int64_t i = 0; ok && i < n; i++) {
        const struct eng_st_tensor *t = &ts[i];
        json_t *shape = json_array();
        ok = shape != NULL;
        for (int d = 0; ok && d < t->n_dims; d++)
            ok = !json_array_append_new(shape, json_integer(t->shape[d]));
        json_t *offs = json_array();
        json_t *e = json_object();
        ok = ok && offs && e && !json_array_append_new(offs, json_integer((json_int_t)off)) &&
             !json_array_append_new(offs, json_integer((json_int_t)(off + t->nbytes))) &&
             !json_object_set_new(e, "dtype", json_string(eng_st_dtype_name(t->dtype)));
        /* set_new takes its value's reference even when it fails */
        ok = !json_object_set_new(e, "shape", shape) && ok;
        ok = !json_object_set_new(e, "data_offsets", offs) && ok;
        ok = !json_object_set_new(root, t->name, e) && ok;
        off += t->nbytes;
    }
    /* Invalid UTF-8 in a name or value makes json_string()/set fail. */
    char *js = ok ? json_dumps(root, JSON_COMPACT) : NULL;
    json_decref(root);
    if (!js)
        return eng_fail(-EINVAL, "eng_st_write: cannot encode the header (a name or "
                                 "metadata string that is not valid UTF-8?)");
    size_t jlen = strlen(js);
    size_t pad = (8 - (8 + jlen) % 8) % 8;
    size_t hlen = jlen + pad;
    char *h = malloc(8 + hlen);
    if (!h) {
        free(js);
        return eng_fail(-ENOMEM, "out of memory");
    }
    for (int i = 0; i < 8; i++)
        h[i] = (char)((uint64_t)hlen >> (8 * i));
    memcpy(h + 8, js, jlen);
    memset(h + 8 + jlen, ' ', pad);
    free(js);
    *out = h;
    *out_len = 8 + hlen;
    *blob_len = off;
    return 0;
}

int eng_st_serialize(void **out, size_t *len, const struct eng_st_tensor *tensors, int64_t n,
                     const struct eng_st_meta *meta, int64_t n_meta)
{
    if (!out || !len)
        return eng_fail(-EINVAL, "eng_st_serialize: NULL argument");
    char *h;
    size_t hl;
    uint64_t bl;
    int rc = build_header(&h, &hl, &bl, tensors, n, meta, n_meta);
    if (rc < 0)
        return rc;
    uint8_t *buf = realloc(h, hl + bl);
    if (!buf) {
        free(h);
        return eng_fail(-ENOMEM, "out of memory for a %" PRIu64 "-byte file", hl + bl);
    }
    size_t off = hl;
    for (int64_t i = 0; i < n; i++) {
        if (tensors[i].nbytes)
            memcpy(buf + off, tensors[i].data, tensors[i].nbytes);
        off += tensors[i].nbytes;
    }
    *out = buf;
    *len = off;
    return 0;
}

static int write_all(int fd, const void *p, size_t len)
{
    const uint8_t *b = p;
    while (len) {
        ssize_t w = write(fd, b, len);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return cm_neg_errno();
        }
        b += w;
        len -= (size_t)w;
    }
    return 0;
}

int eng_st_write(const char *path, const struct eng_st_tensor *tensors, int64_t n,
                 const struct eng_st_meta *meta, int64_t n_meta)
{
    if (!path)
        return eng_fail(-EINVAL, "eng_st_write: NULL path");
    char *h;
    size_t hl;
    uint64_t bl;
    int rc = build_header(&h, &hl, &bl, tensors, n, meta, n_meta);
    if (rc < 0)
        return rc;

    size_t plen = strlen(path);
    char *tmp = malloc(plen + sizeof(".tmp.XXXXXX"));
    if (!tmp) {
        free(h);
        return eng_fail(-ENOMEM, "out of memory");
    }
    memcpy(tmp, path, plen);
    memcpy(tmp + plen, ".tmp.XXXXXX", sizeof(".tmp.XXXXXX"));
    int fd = mkostemp(tmp, O_CLOEXEC);
    if (fd < 0) {
        rc = cm_neg_errno();
        eng_fail(rc, "%s: create: %s", tmp, cm_strerror(rc));
        goto out;
    }
    rc = write_all(fd, h, hl);
    for (int64_t i = 0; rc == 0 && i < n; i++)
        if (tensors[i].nbytes)
            rc = write_all(fd, tensors[i].data, tensors[i].nbytes);
    if (rc == 0 && fchmod(fd, 0644) < 0)
        rc = cm_neg_errno();
    /* fsync before rename: a crash must leave the old file or the complete
     * new one, never a renamed-but-empty file. */
    if (rc == 0 && fsync(fd) < 0)
        rc = cm_neg_errno();
    if (close(fd) < 0 && rc == 0)
        rc = cm_neg_errno();
    if (rc == 0 && rename(tmp, path) < 0)
        rc = cm_neg_errno();
    if (rc < 0) {
        eng_fail(rc, "%s: write: %s", path, cm_strerror(rc));
        unlink(tmp);
    }
out:
    free(tmp);
    free(h);
    return rc;
}
