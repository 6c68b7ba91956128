/* GGUF reader and writer: round trips through the writer, the shared model
 * files, and one test per class of hostile file (each must be refused with
 * -EBADMSG and a message naming the problem, never a crash). */
#include <criterion/criterion.h>

#include "tests/util/test_models.h"
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine/model/eng_err.h"
#include "engine/model/gguf.h"
#include "engine/model/gguf_write.h"

/* ---- raw byte builder for hand-made (hostile) files -------------------- */

struct rb {
    uint8_t *p;
    size_t n, cap;
};

static void rb_put(struct rb *b, const void *p, size_t n)
{
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        cr_assert_not_null(b->p);
    }
    memcpy(b->p + b->n, p, n);
    b->n += n;
}

static void rb_u32(struct rb *b, uint32_t v)
{
    rb_put(b, &v, 4);
}

static void rb_u64(struct rb *b, uint64_t v)
{
    rb_put(b, &v, 8);
}

static void rb_str(struct rb *b, const char *s)
{
    rb_u64(b, strlen(s));
    rb_put(b, s, strlen(s));
}

static void rb_hdr(struct rb *b, uint32_t version, uint64_t n_t, uint64_t n_kv)
{
    rb_put(b, "GGUF", 4);
    rb_u32(b, version);
    rb_u64(b, n_t);
    rb_u64(b, n_kv);
}

static void rb_kv_u32(struct rb *b, const char *k, uint32_t v)
{
    rb_str(b, k);
    rb_u32(b, ENG_GGUF_U32);
    rb_u32(b, v);
}

static void rb_tinfo(struct rb *b, const char *name, uint32_t n_dims, const uint64_t *ne,
                     uint32_t type, uint64_t off)
{
    rb_str(b, name);
    rb_u32(b, n_dims);
    for (uint32_t i = 0; i < n_dims; i++)
        rb_u64(b, ne[i]);
    rb_u32(b, type);
    rb_u64(b, off);
}

static void rb_pad(struct rb *b, size_t a)
{
    static const uint8_t z[64];
    while (b->n % a)
        rb_put(b, z, 1);
}

static void rb_zeros(struct rb *b, size_t n)
{
    static const uint8_t z[256];
    while (n) {
        size_t k = n < sizeof(z) ? n : sizeof(z);
        rb_put(b, z, k);
        n -= k;
    }
}

/* The file must be refused with -EBADMSG and a message containing `what`. */
static void expect_bad(struct rb *b, const char *what)
{
    eng_gguf *g = NULL;
    eng_error_clear();
    int rc = eng_gguf_open_mem(&g, b->p, b->n);
    cr_expect_eq(rc, -EBADMSG, "expected -EBADMSG for '%s', got %d (%s)", what, rc, eng_error());
    cr_expect_null(g);
    cr_expect(strstr(eng_error(), what) != NULL, "error '%s' does not mention '%s'", eng_error(),
              what);
    if (rc == 0)
        eng_gguf_close(g);
    free(b->p);
    *b = (struct rb){0};
}

/* ---- writer round trip ------------------------------------------------- */

static const char *const k_strs[] = {"", "hello", "h\xc3\xa9llo \xf0\x9f\xa6\x99", "x"};
static const size_t k_str_lens[] = {0, 5, 12, 1};

static void *build_all_types(size_t *len, uint32_t version, uint32_t align)
{
    eng_gguf_writer *w;
    cr_assert_eq(eng_gguf_writer_create(&w, version, align), 0);
    cr_assert_eq(eng_gguf_writer_add_u8(w, "t.u8", 200), 0);
    cr_assert_eq(eng_gguf_writer_add_i8(w, "t.i8", -100), 0);
    cr_assert_eq(eng_gguf_writer_add_u16(w, "t.u16", 60000), 0);
    cr_assert_eq(eng_gguf_writer_add_i16(w, "t.i16", -30000), 0);
    cr_assert_eq(eng_gguf_writer_add_u32(w, "t.u32", 4000000000u), 0);
    cr_assert_eq(eng_gguf_writer_add_i32(w, "t.i32", -2000000000), 0);
    cr_assert_eq(eng_gguf_writer_add_f32(w, "t.f32", 1.5f), 0);
    cr_assert_eq(eng_gguf_writer_add_bool(w, "t.bool", true), 0);
    cr_assert_eq(eng_gguf_writer_add_strn(w, "t.str", "a\0b", 3), 0);
    cr_assert_eq(eng_gguf_writer_add_u64(w, "t.u64", (1ULL << 63) + 5), 0);
    cr_assert_eq(eng_gguf_writer_add_i64(w, "t.i64", -(1LL << 62)), 0);
    cr_assert_eq(eng_gguf_writer_add_f64(w, "t.f64", 1e300), 0);
    const uint8_t a_u8[] = {1, 2, 255};
    const int8_t a_i8[] = {-1, 2, -128};
    const uint16_t a_u16[] = {65535, 1};
    const int16_t a_i16[] = {-32768, 7};
    const uint32_t a_u32[] = {0xffffffffu};
    const int32_t a_i32[] = {-5, 6, 7, 8};
    const float a_f32[] = {0.25f, -3.0f};
    const uint8_t a_bool[] = {1, 0};
    const uint64_t a_u64[] = {~0ULL, 3};
    const int64_t a_i64[] = {INT64_MIN, 9};
    const double a_f64[] = {2.5, -1e-300};
    cr_assert_eq(eng_gguf_writer_add_arr(w, "a.u8", ENG_GGUF_U8, a_u8, 3), 0);
    cr_assert_eq(eng_gguf_writer_add_arr(w, "a.i8", ENG_GGUF_I8, a_i8, 3), 0);
    cr_assert_eq(eng_gguf_writer_add_arr(w, "a.u16", ENG_GGUF_U16, a_u16, 2), 0);
    cr_assert_eq(eng_gguf_writer_add_arr(w, "a.i16", ENG_GGUF_I16, a_i16, 2), 0);
    cr_assert_eq(eng_gguf_writer_add_arr(w, "a.u32", ENG_GGUF_U32, a_u32, 1), 0);
    cr_assert_eq(eng_gguf_writer_add_arr(w, "a.i32", ENG_GGUF_I32, a_i32, 4), 0);
    cr_assert_eq(eng_gguf_writer_add_arr(w, "a.f32", ENG_GGUF_F32, a_f32, 2), 0);
    cr_assert_eq(eng_gguf_writer_add_arr(w, "a.bool", ENG_GGUF_BOOL, a_bool, 2), 0);
    cr_assert_eq(eng_gguf_writer_add_arr(w, "a.u64", ENG_GGUF_U64, a_u64, 2), 0);
    cr_assert_eq(eng_gguf_writer_add_arr(w, "a.i64", ENG_GGUF_I64, a_i64, 2), 0);
    cr_assert_eq(eng_gguf_writer_add_arr(w, "a.f64", ENG_GGUF_F64, a_f64, 2), 0);
    cr_assert_eq(eng_gguf_writer_add_arr(w, "a.empty", ENG_GGUF_F32, NULL, 0), 0);
    cr_assert_eq(eng_gguf_writer_add_arr_str(w, "a.str", k_strs, k_str_lens, 4), 0);
    cr_assert_eq(eng_gguf_writer_add_u32(w, "t.u32", 1), -EEXIST);

    static float f32[3 * 5];
    static uint8_t f16[64 * 2 * 2], bf16[32 * 2], q8[2 * 34 * 3], q4[18 * 4];
    for (size_t i = 0; i < sizeof(f32) / sizeof(f32[0]); i++)
        f32[i] = (float)i * 0.5f;
    for (size_t i = 0; i < sizeof(f16); i++)
        f16[i] = (uint8_t)(i * 7);
    for (size_t i = 0; i < sizeof(bf16); i++)
        bf16[i] = (uint8_t)(i * 3);
    for (size_t i = 0; i < sizeof(q8); i++)
        q8[i] = (uint8_t)(i * 11);
    for (size_t i = 0; i < sizeof(q4); i++)
        q4[i] = (uint8_t)(i * 13);
    cr_assert_eq(eng_gguf_writer_add_tensor(w, "f32", KN_F32, 2, (int64_t[]){3, 5}, f32), 0);
    cr_assert_eq(eng_gguf_writer_add_tensor(w, "f16", KN_F16, 3, (int64_t[]){64, 2, 1}, f16), 1);
    cr_assert_eq(eng_gguf_writer_add_tensor(w, "bf16", KN_BF16, 1, (int64_t[]){32}, bf16), 2);
    cr_assert_eq(eng_gguf_writer_add_tensor(w, "q8", KN_Q8_0, 2, (int64_t[]){64, 3}, q8), 3);
    cr_assert_eq(eng_gguf_writer_add_tensor(w, "q4", KN_Q4_0, 4, (int64_t[]){32, 2, 1, 2}, q4), 4);
    cr_assert_eq(eng_gguf_writer_add_tensor(w, "q4", KN_F32, 1, (int64_t[]){1}, f32), -EEXIST);
    cr_assert_eq(eng_gguf_writer_add_tensor(w, "bad", KN_Q8_0, 1, (int64_t[]){33}, q8), -EINVAL);
    void *buf;
    cr_assert_eq(eng_gguf_writer_write_mem(w, &buf, len, NULL, NULL), 0, "%s", eng_error());
    eng_gguf_writer_destroy(w);
    return buf;
}

static void check_all_types(const eng_gguf *g)
{
    uint32_t u32;
    int32_t i32;
    uint64_t u64;
    int64_t i64;
    float f;
    double d;
    bool b;
    const char *s;
    size_t sl;
    cr_expect_eq(eng_gguf_get_u32(g, "t.u8", &u32), 0);
    cr_expect_eq(u32, 200);
    cr_expect_eq(eng_gguf_get_i64(g, "t.i8", &i64), 0);
    cr_expect_eq(i64, -100);
    cr_expect_eq(eng_gguf_get_u32(g, "t.i8", &u32), -EBADMSG, "negative into u32");
    cr_expect_eq(eng_gguf_get_i32(g, "t.u16", &i32), 0);
    cr_expect_eq(i32, 60000);
    cr_expect_eq(eng_gguf_get_i32(g, "t.i16", &i32), 0);
    cr_expect_eq(i32, -30000);
    cr_expect_eq(eng_gguf_get_u32(g, "t.u32", &u32), 0);
    cr_expect_eq(u32, 4000000000u);
    cr_expect_eq(eng_gguf_get_i32(g, "t.u32", &i32), -EBADMSG, "4e9 does not fit i32");
    cr_expect_eq(eng_gguf_get_i32(g, "t.i32", &i32), 0);
    cr_expect_eq(i32, -2000000000);
    cr_expect_eq(eng_gguf_get_f32(g, "t.f32", &f), 0);
    cr_expect_eq(f, 1.5f);
    cr_expect_eq(eng_gguf_get_f32(g, "t.i32", &f), 0);
    cr_expect_eq(f, -2000000000.0f);
    cr_expect_eq(eng_gguf_get_u32(g, "t.f32", &u32), -EBADMSG);
    cr_expect_eq(eng_gguf_get_bool(g, "t.bool", &b), 0);
    cr_expect(b);
    cr_expect_eq(eng_gguf_get_bool(g, "t.u8", &b), -EBADMSG);
    cr_expect_eq(eng_gguf_get_str(g, "t.str", &s, &sl), 0);
    cr_expect_eq(sl, 3);
    cr_expect_eq(memcmp(s, "a\0b\0", 4), 0, "string copy must keep bytes and add a NUL");
    cr_expect_eq(eng_gguf_get_str(g, "t.u8", &s, &sl), -EBADMSG);
    cr_expect_eq(eng_gguf_get_u64(g, "t.u64", &u64), 0);
    cr_expect_eq(u64, (1ULL << 63) + 5);
    cr_expect_eq(eng_gguf_get_i64(g, "t.u64", &i64), -EBADMSG);
    cr_expect_eq(eng_gguf_get_i64(g, "t.i64", &i64), 0);
    cr_expect_eq(i64, -(1LL << 62));
    cr_expect_eq(eng_gguf_get_f64(g, "t.f64", &d), 0);
    cr_expect_eq(d, 1e300);
    cr_expect_eq(eng_gguf_get_f32(g, "t.f64", &f), -EBADMSG, "1e300 does not fit f32");
    cr_expect_eq(eng_gguf_get_u32(g, "nope", &u32), -ENOENT);
    cr_expect(strstr(eng_error(), "nope") != NULL);
    cr_expect_eq(eng_gguf_get_u32(g, "a.u8", &u32), -EBADMSG, "array is not a scalar");

    eng_gguf_arr a;
    cr_assert_eq(eng_gguf_get_arr(g, "a.u8", &a), 0);
    cr_expect_eq(a.type, ENG_GGUF_U8);
    cr_expect_eq(a.n, 3);
    cr_expect_eq(eng_gguf_arr_i64(&a, 2, &i64), 0);
    cr_expect_eq(i64, 255);
    cr_expect_eq(eng_gguf_arr_i64(&a, 3, &i64), -EBADMSG, "index past the end");
    cr_assert_eq(eng_gguf_get_arr(g, "a.i8", &a), 0);
    cr_expect_eq(eng_gguf_arr_i64(&a, 2, &i64), 0);
    cr_expect_eq(i64, -128);
    cr_assert_eq(eng_gguf_get_arr(g, "a.u16", &a), 0);
    cr_expect_eq(eng_gguf_arr_i64(&a, 0, &i64), 0);
    cr_expect_eq(i64, 65535);
    cr_assert_eq(eng_gguf_get_arr(g, "a.i16", &a), 0);
    cr_expect_eq(eng_gguf_arr_i64(&a, 0, &i64), 0);
    cr_expect_eq(i64, -32768);
    cr_assert_eq(eng_gguf_get_arr(g, "a.u32", &a), 0);
    cr_expect_eq(eng_gguf_arr_i64(&a, 0, &i64), 0);
    cr_expect_eq(i64, 0xffffffffLL);
    cr_assert_eq(eng_gguf_get_arr(g, "a.i32", &a), 0);
    cr_expect_eq(a.n, 4);
    cr_expect_eq(eng_gguf_arr_i64(&a, 3, &i64), 0);
    cr_expect_eq(i64, 8);
    cr_assert_eq(eng_gguf_get_arr(g, "a.f32", &a), 0);
    cr_expect_eq(eng_gguf_arr_f32(&a, 1, &f), 0);
    cr_expect_eq(f, -3.0f);
    cr_expect_eq(eng_gguf_arr_i64(&a, 1, &i64), -EBADMSG, "float is not an integer");
    cr_assert_eq(eng_gguf_get_arr(g, "a.bool", &a), 0);
    cr_expect_eq(a.type, ENG_GGUF_BOOL);
    cr_expect_eq(((const uint8_t *)a.data)[0], 1);
    cr_assert_eq(eng_gguf_get_arr(g, "a.u64", &a), 0);
    cr_expect_eq(eng_gguf_arr_i64(&a, 0, &i64), -EBADMSG, "2^64-1 does not fit i64");
    cr_expect_eq(eng_gguf_arr_i64(&a, 1, &i64), 0);
    cr_expect_eq(i64, 3);
    cr_assert_eq(eng_gguf_get_arr(g, "a.i64", &a), 0);
    cr_expect_eq(eng_gguf_arr_i64(&a, 0, &i64), 0);
    cr_expect_eq(i64, INT64_MIN);
    cr_assert_eq(eng_gguf_get_arr(g, "a.f64", &a), 0);
    cr_expect_eq(eng_gguf_arr_f32(&a, 0, &f), 0);
    cr_expect_eq(f, 2.5f);
    cr_assert_eq(eng_gguf_get_arr(g, "a.empty", &a), 0);
    cr_expect_eq(a.n, 0);
    cr_assert_eq(eng_gguf_get_arr(g, "a.str", &a), 0);
    cr_expect_eq(a.type, ENG_GGUF_STR);
    cr_assert_eq(a.n, 4);
    for (uint64_t i = 0; i < 4; i++) {
        cr_assert_eq(eng_gguf_arr_str(g, &a, i, &s, &sl), 0);
        cr_expect_eq(sl, k_str_lens[i]);
        cr_expect_eq(memcmp(s, k_strs[i], sl), 0, "string %llu", (unsigned long long)i);
    }
    cr_expect_eq(eng_gguf_arr_str(g, &a, 4, &s, &sl), -EBADMSG);
    cr_expect_eq(eng_gguf_arr_f32(&a, 0, &f), -EBADMSG);

    cr_assert_eq(eng_gguf_tensor_count(g), 5);
    static const struct {
        const char *name;
        enum kn_dtype type;
        int n_dims;
        int64_t ne[4];
        size_t nbytes;
        uint8_t mul; /* pattern byte i = i * mul, except f32 */
    } want[] = {
        {"f32", KN_F32, 2, {3, 5, 1, 1}, 60, 0},
        {"f16", KN_F16, 3, {64, 2, 1, 1}, 256, 7},
        {"bf16", KN_BF16, 1, {32, 1, 1, 1}, 64, 3},
        {"q8", KN_Q8_0, 2, {64, 3, 1, 1}, 204, 11},
        {"q4", KN_Q4_0, 4, {32, 2, 1, 2}, 72, 13},
    };
    for (int i = 0; i < 5; i++) {
        const struct eng_gguf_tensor *t = eng_gguf_tensor_at(g, i);
        cr_assert_not_null(t);
        cr_expect_eq(eng_gguf_find_tensor(g, want[i].name), t);
        cr_expect_str_eq(t->name, want[i].name);
        cr_expect_eq(t->type, want[i].type);
        cr_expect_eq(t->n_dims, want[i].n_dims);
        for (int dd = 0; dd < 4; dd++)
            cr_expect_eq(t->ne[dd], want[i].ne[dd], "%s ne[%d]", t->name, dd);
        cr_expect_eq(t->nbytes, want[i].nbytes, "%s nbytes", t->name);
        cr_expect_eq(t->offset % eng_gguf_alignment(g), 0);
        size_t foff = (size_t)((const uint8_t *)t->data - (const uint8_t *)eng_gguf_file_data(g));
        cr_expect_eq(foff % eng_gguf_alignment(g), 0, "%s not aligned in the file", t->name);
        const uint8_t *p = t->data;
        if (want[i].type == KN_F32) {
            for (int k = 0; k < 15; k++) {
                float v;
                memcpy(&v, p + 4 * k, 4);
                cr_expect_eq(v, (float)k * 0.5f);
            }
        } else {
            for (size_t k = 0; k < t->nbytes; k++)
                cr_expect_eq(p[k], (uint8_t)(k * want[i].mul), "%s byte %zu", t->name, k);
        }
    }
    cr_expect_null(eng_gguf_tensor_at(g, 5));
    cr_expect_null(eng_gguf_find_tensor(g, "missing"));
}

Test(engine_gguf, roundtrip_every_type_v3)
{
    size_t len;
    void *buf = build_all_types(&len, 3, 0);
    eng_gguf *g;
    cr_assert_eq(eng_gguf_open_mem(&g, buf, len), 0, "%s", eng_error());
    cr_expect_eq(eng_gguf_version(g), 3);
    cr_expect_eq(eng_gguf_alignment(g), 32);
    cr_expect_eq(eng_gguf_file_bytes(g), len);
    cr_expect_eq(eng_gguf_kv_count(g), 25);
    check_all_types(g);
    eng_gguf_close(g);
    free(buf);
}

Test(engine_gguf, roundtrip_v2_file_accepted)
{
    size_t len;
    void *buf = build_all_types(&len, 2, 0);
    eng_gguf *g;
    cr_assert_eq(eng_gguf_open_mem(&g, buf, len), 0, "%s", eng_error());
    cr_expect_eq(eng_gguf_version(g), 2);
    check_all_types(g);
    eng_gguf_close(g);
    free(buf);
}

Test(engine_gguf, roundtrip_alignment_64_recorded)
{
    size_t len;
    void *buf = build_all_types(&len, 3, 64);
    eng_gguf *g;
    cr_assert_eq(eng_gguf_open_mem(&g, buf, len), 0, "%s", eng_error());
    cr_expect_eq(eng_gguf_alignment(g), 64);
    uint32_t a;
    cr_expect_eq(eng_gguf_get_u32(g, "general.alignment", &a), 0);
    cr_expect_eq(a, 64);
    cr_expect_eq(eng_gguf_data_offset(g) % 64, 0);
    check_all_types(g);
    eng_gguf_close(g);
    free(buf);
}

Test(engine_gguf, open_file_roundtrip_and_errors)
{
    char dir[] = "/tmp/gorgon-gguf-XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    char path[128];
    snprintf(path, sizeof(path), "%s/m.gguf", dir);
    size_t len;
    void *buf = build_all_types(&len, 3, 0);
    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f);
    cr_assert_eq(fwrite(buf, 1, len, f), len);
    fclose(f);
    eng_gguf *g;
    cr_assert_eq(eng_gguf_open(&g, path), 0, "%s", eng_error());
    check_all_types(g);
    eng_gguf_close(g);

    /* The writer's own file output gives the same bytes as its memory output. */
    eng_gguf_writer *w;
    cr_assert_eq(eng_gguf_writer_create(&w, 3, 0), 0);
    cr_assert_eq(eng_gguf_writer_add_str(w, "k", "v"), 0);
    cr_assert_eq(eng_gguf_writer_write_file(w, path, NULL, NULL), 0, "%s", eng_error());
    eng_gguf_writer_destroy(w);
    cr_assert_eq(eng_gguf_open(&g, path), 0, "%s", eng_error());
    const char *s;
    cr_expect_eq(eng_gguf_get_str(g, "k", &s, NULL), 0);
    cr_expect_str_eq(s, "v");
    eng_gguf_close(g);

    snprintf(path, sizeof(path), "%s/missing.gguf", dir);
    cr_expect_eq(eng_gguf_open(&g, path), -ENOENT);
    cr_expect(strstr(eng_error(), "missing.gguf") != NULL, "%s", eng_error());
    cr_expect_eq(eng_gguf_open(&g, dir), -EINVAL, "a directory is not a model");
    snprintf(path, sizeof(path), "%s/short.gguf", dir);
    f = fopen(path, "wb");
    fwrite("GGUF", 1, 4, f);
    fclose(f);
    cr_expect_eq(eng_gguf_open(&g, path), -EBADMSG);
    cr_expect(strstr(eng_error(), "too short") != NULL, "%s", eng_error());
    unlink(path);
    snprintf(path, sizeof(path), "%s/m.gguf", dir);
    unlink(path);
    rmdir(dir);
    free(buf);
}

Test(engine_gguf, shared_models_open)
{
    static const char *const files[] = {
        "stories260K/stories260K.gguf",
        "babyllama-tok105/babyllama-tok105.gguf",
        "llama2-vocab/ggml-vocab-llama-spm.gguf",
    };
    int opened = 0;
    for (size_t i = 0; i < 3; i++) {
        char path[1024];
        snprintf(path, sizeof(path), "%s/%s", tu_models_dir(), files[i]);
        if (access(path, R_OK) != 0)
            continue;
        eng_gguf *g;
        cr_assert_eq(eng_gguf_open(&g, path), 0, "%s", eng_error());
        opened++;
        const char *arch;
        cr_expect_eq(eng_gguf_get_str(g, "general.architecture", &arch, NULL), 0);
        cr_expect_str_eq(arch, "llama");
        if (i == 0) {
            cr_expect_eq(eng_gguf_tensor_count(g), 48);
            const struct eng_gguf_tensor *t = eng_gguf_find_tensor(g, "token_embd.weight");
            cr_assert_not_null(t);
            cr_expect_eq(t->ne[0], 64);
            cr_expect_eq(t->ne[1], 512);
            cr_expect_eq(t->type, KN_F32);
            t = eng_gguf_find_tensor(g, "blk.4.attn_k.weight");
            cr_assert_not_null(t);
            cr_expect_eq(t->ne[0], 64);
            cr_expect_eq(t->ne[1], 32);
            uint32_t hkv;
            cr_expect_eq(eng_gguf_get_u32(g, "llama.attention.head_count_kv", &hkv), 0);
            cr_expect_eq(hkv, 4);
        }
        if (i == 2) {
            /* Metadata-only file, no padding after the last key: accepted. */
            cr_expect_eq(eng_gguf_tensor_count(g), 0);
            eng_gguf_arr a;
            cr_expect_eq(eng_gguf_get_arr(g, "tokenizer.ggml.tokens", &a), 0);
            cr_expect_eq(a.n, 32000);
        }
        eng_gguf_close(g);
    }
    if (!opened)
        cr_skip_test("no models under %s", tu_models_dir());
}

/* ---- hostile files ----------------------------------------------------- */

Test(engine_gguf, reject_every_truncation)
{
    size_t len;
    uint8_t *buf = build_all_types(&len, 3, 0);
    /* Every strict prefix of a file with tensors is invalid; none may crash. */
    for (size_t l = 0; l < len; l++) {
        uint8_t *copy = malloc(l ? l : 1); /* exact-size copy: ASan sees overreads */
        memcpy(copy, buf, l);
        eng_gguf *g = NULL;
        int rc = eng_gguf_open_mem(&g, copy, l);
        cr_assert_eq(rc, -EBADMSG, "prefix of %zu bytes: rc %d", l, rc);
        cr_assert(strstr(eng_error(), "truncated") || strstr(eng_error(), "past the end") ||
                      strstr(eng_error(), "too short") || strstr(eng_error(), "outside") ||
                      strstr(eng_error(), "can hold"),
                  "prefix %zu: unexpected message '%s'", l, eng_error());
        free(copy);
    }
    free(buf);
}

Test(engine_gguf, reject_bad_magic_and_versions)
{
    struct rb b = {0};
    rb_put(&b, "GGUG", 4);
    rb_u32(&b, 3);
    rb_u64(&b, 0);
    rb_u64(&b, 0);
    expect_bad(&b, "magic");
    rb_hdr(&b, 1, 0, 0);
    expect_bad(&b, "version 1");
    rb_hdr(&b, 4, 0, 0);
    expect_bad(&b, "version 4");
    rb_hdr(&b, 0x03000000, 0, 0);
    expect_bad(&b, "big-endian");
    rb_put(&b, "GGUF", 4);
    expect_bad(&b, "too short");
}

Test(engine_gguf, reject_huge_counts)
{
    struct rb b = {0};
    rb_hdr(&b, 3, 0, 0x0fffffffffffffffULL);
    expect_bad(&b, "key/value pairs");
    rb_hdr(&b, 3, 0xffffffffffffffffULL, 0);
    expect_bad(&b, "tensors");
    rb_hdr(&b, 3, 0, 1);
    rb_str(&b, "k");
    rb_u32(&b, ENG_GGUF_ARR);
    rb_u32(&b, ENG_GGUF_U64);
    rb_u64(&b, 0x2000000000000001ULL); /* × 8 bytes wraps to 8 */
    rb_u64(&b, 0);
    expect_bad(&b, "array of");
    rb_hdr(&b, 3, 0, 1);
    rb_str(&b, "k");
    rb_u32(&b, ENG_GGUF_ARR);
    rb_u32(&b, ENG_GGUF_STR);
    rb_u64(&b, 1ULL << 40);
    rb_u64(&b, 0);
    expect_bad(&b, "strings");
}

Test(engine_gguf, reject_string_lengths_past_eof)
{
    struct rb b = {0};
    rb_hdr(&b, 3, 0, 1);
    rb_u64(&b, 0xffffffffffffff00ULL); /* key length */
    rb_put(&b, "abcdefghijkl", 12);
    expect_bad(&b, "string length");
    rb_hdr(&b, 3, 0, 1);
    rb_str(&b, "k");
    rb_u32(&b, ENG_GGUF_STR);
    rb_u64(&b, 5);
    rb_put(&b, "abcd", 4);
    expect_bad(&b, "string length");
    rb_hdr(&b, 3, 0, 1);
    rb_str(&b, "k");
    rb_u32(&b, ENG_GGUF_ARR);
    rb_u32(&b, ENG_GGUF_STR);
    rb_u64(&b, 2);
    rb_str(&b, "ok");
    rb_u64(&b, 100);
    rb_put(&b, "short", 5);
    expect_bad(&b, "element 1");
}

Test(engine_gguf, reject_bad_value_types)
{
    struct rb b = {0};
    rb_hdr(&b, 3, 0, 1);
    rb_str(&b, "k");
    rb_u32(&b, 13);
    rb_u32(&b, 0);
    expect_bad(&b, "unknown value type 13");
    rb_hdr(&b, 3, 0, 1);
    rb_str(&b, "k");
    rb_u32(&b, ENG_GGUF_ARR);
    rb_u32(&b, 99);
    rb_u64(&b, 0);
    expect_bad(&b, "unknown array element type 99");
    rb_hdr(&b, 3, 0, 1);
    rb_str(&b, "nested");
    rb_u32(&b, ENG_GGUF_ARR);
    rb_u32(&b, ENG_GGUF_ARR);
    rb_u64(&b, 1);
    rb_u32(&b, ENG_GGUF_U8);
    rb_u64(&b, 1);
    rb_put(&b, "x", 1);
    expect_bad(&b, "nested arrays");
}

Test(engine_gguf, reject_bad_keys)
{
    struct rb b = {0};
    rb_hdr(&b, 3, 0, 2);
    rb_kv_u32(&b, "dup", 1);
    rb_kv_u32(&b, "dup", 2);
    expect_bad(&b, "duplicate key 'dup'");
    rb_hdr(&b, 3, 0, 1);
    rb_kv_u32(&b, "", 1);
    expect_bad(&b, "empty key");
    rb_hdr(&b, 3, 0, 1);
    rb_u64(&b, 3);
    rb_put(&b, "a\0b", 3);
    rb_u32(&b, ENG_GGUF_U8);
    rb_put(&b, "x", 1);
    expect_bad(&b, "NUL");
}

Test(engine_gguf, reject_bad_alignment)
{
    struct rb b = {0};
    rb_hdr(&b, 3, 0, 1);
    rb_kv_u32(&b, "general.alignment", 48);
    expect_bad(&b, "power of two");
    rb_hdr(&b, 3, 0, 1);
    rb_kv_u32(&b, "general.alignment", 0);
    expect_bad(&b, "power of two");
    rb_hdr(&b, 3, 0, 1);
    rb_str(&b, "general.alignment");
    rb_u32(&b, ENG_GGUF_U64);
    rb_u64(&b, 32);
    expect_bad(&b, "expected u32");
}

/* One tensor info with the given fields after a header with no keys. */
static void one_tensor(struct rb *b, uint32_t n_dims, const uint64_t *ne, uint32_t type,
                       uint64_t off, size_t blob)
{
    rb_hdr(b, 3, 1, 0);
    rb_tinfo(b, "w", n_dims, ne, type, off);
    rb_pad(b, 32);
    rb_zeros(b, blob);
}

Test(engine_gguf, reject_bad_tensor_shapes)
{
    struct rb b = {0};
    one_tensor(&b, 5, (uint64_t[]){1, 1, 1, 1, 1}, KN_F32, 0, 32);
    expect_bad(&b, "n_dims 5");
    one_tensor(&b, 3, (uint64_t[]){1ULL << 32, 1ULL << 32, 1ULL << 32}, KN_F32, 0, 32);
    expect_bad(&b, "element count overflows");
    one_tensor(&b, 2, (uint64_t[]){1ULL << 61, 2}, KN_F32, 0, 32);
    expect_bad(&b, "byte size overflows");
    one_tensor(&b, 1, (uint64_t[]){1ULL << 62}, KN_F32, 0, 32);
    expect_bad(&b, "byte size overflows");
    one_tensor(&b, 2, (uint64_t[]){4, 0}, KN_F32, 0, 32);
    expect_bad(&b, "dimension 1");
    one_tensor(&b, 1, (uint64_t[]){1ULL << 63}, KN_F32, 0, 32);
    expect_bad(&b, "dimension 0");
    one_tensor(&b, 1, (uint64_t[]){33}, KN_Q8_0, 0, 64);
    expect_bad(&b, "block size");
    one_tensor(&b, 1, (uint64_t[]){256}, 12, 0, 256);
    expect_bad(&b, "q4_K");
    one_tensor(&b, 1, (uint64_t[]){32}, 200, 0, 256);
    expect_bad(&b, "unknown (200)");
}

Test(engine_gguf, reject_bad_tensor_placement)
{
    struct rb b = {0};
    one_tensor(&b, 1, (uint64_t[]){8}, KN_F32, 4, 64);
    expect_bad(&b, "not a multiple of the alignment");
    one_tensor(&b, 1, (uint64_t[]){8}, KN_F32, 32, 48);
    expect_bad(&b, "outside the data blob");
    one_tensor(&b, 1, (uint64_t[]){8}, KN_F32, 0xffffffffffffffe0ULL, 64);
    expect_bad(&b, "outside the data blob");
    /* Header claims a tensor but the file ends before the blob starts. */
    rb_hdr(&b, 3, 1, 0);
    rb_tinfo(&b, "w", 1, (uint64_t[]){8}, KN_F32, 0);
    expect_bad(&b, "past the end of the file");

    rb_hdr(&b, 3, 2, 0);
    rb_tinfo(&b, "a", 1, (uint64_t[]){16}, KN_F32, 0); /* [0, 64) */
    rb_tinfo(&b, "b", 1, (uint64_t[]){8}, KN_F32, 32); /* [32, 64) */
    rb_pad(&b, 32);
    rb_zeros(&b, 64);
    expect_bad(&b, "overlap");

    rb_hdr(&b, 3, 2, 0);
    rb_tinfo(&b, "same", 1, (uint64_t[]){8}, KN_F32, 0);
    rb_tinfo(&b, "same", 1, (uint64_t[]){8}, KN_F32, 32);
    rb_pad(&b, 32);
    rb_zeros(&b, 64);
    expect_bad(&b, "duplicate tensor name 'same'");

    rb_hdr(&b, 3, 1, 0);
    rb_tinfo(&b, "", 1, (uint64_t[]){8}, KN_F32, 0);
    rb_pad(&b, 32);
    rb_zeros(&b, 32);
    expect_bad(&b, "empty tensor name");
}

Test(engine_gguf, accept_hand_made_minimal_files)
{
    /* Two adjacent tensors exactly filling the blob, alignment 16. */
    struct rb b = {0};
    rb_hdr(&b, 3, 2, 1);
    rb_kv_u32(&b, "general.alignment", 16);
    rb_tinfo(&b, "a", 1, (uint64_t[]){4}, KN_F32, 0);
    rb_tinfo(&b, "b", 2, (uint64_t[]){2, 2}, KN_F16, 16);
    rb_pad(&b, 16);
    rb_zeros(&b, 24);
    eng_gguf *g;
    cr_assert_eq(eng_gguf_open_mem(&g, b.p, b.n), 0, "%s", eng_error());
    cr_expect_eq(eng_gguf_alignment(g), 16);
    cr_expect_eq(eng_gguf_find_tensor(g, "b")->nbytes, 8);
    eng_gguf_close(g);
    free(b.p);

    /* No keys, no tensors: the smallest valid file. */
    b = (struct rb){0};
    rb_hdr(&b, 3, 0, 0);
    cr_assert_eq(eng_gguf_open_mem(&g, b.p, b.n), 0, "%s", eng_error());
    cr_expect_eq(eng_gguf_kv_count(g), 0);
    cr_expect_eq(eng_gguf_find_kv(g, "x"), -ENOENT);
    cr_expect_null(eng_gguf_find_tensor(g, "x"));
    eng_gguf_close(g);
    free(b.p);
}

/* Random corruption of a valid file: every outcome must be a clean accept
 * or a clean -EBADMSG (ASan/UBSan builds catch anything worse). */
Test(engine_gguf, random_corruption_never_crashes, .timeout = 60)
{
    size_t len;
    uint8_t *buf = build_all_types(&len, 3, 0);
    uint8_t *copy = malloc(len);
    uint64_t s = 0x12345678;
    int accepted = 0;
    for (int it = 0; it < 3000; it++) {
        memcpy(copy, buf, len);
        int flips = 1 + it % 4;
        for (int k = 0; k < flips; k++) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            size_t at = (size_t)(s % len);
            copy[at] = (uint8_t)(s >> 32);
        }
        eng_gguf *g = NULL;
        int rc = eng_gguf_open_mem(&g, copy, len);
        cr_assert(rc == 0 || rc == -EBADMSG, "iteration %d: rc %d", it, rc);
        if (rc == 0) {
            accepted++;
            for (int64_t i = 0; i < eng_gguf_kv_count(g); i++) {
                double d;
                const char *str;
                eng_gguf_arr a;
                const char *k = eng_gguf_kv_key(g, i);
                eng_gguf_get_f64(g, k, &d);
                eng_gguf_get_str(g, k, &str, NULL);
                if (eng_gguf_get_arr(g, k, &a) == 0 && a.type == ENG_GGUF_STR)
                    for (uint64_t j = 0; j < a.n; j++) {
                        size_t sl;
                        cr_assert_eq(eng_gguf_arr_str(g, &a, j, &str, &sl), 0);
                    }
            }
            for (int64_t i = 0; i < eng_gguf_tensor_count(g); i++) {
                const struct eng_gguf_tensor *t = eng_gguf_tensor_at(g, i);
                volatile uint8_t sink = 0;
                for (size_t j = 0; j < t->nbytes; j++)
                    sink ^= ((const uint8_t *)t->data)[j];
                (void)sink;
            }
            eng_gguf_close(g);
        }
    }
    cr_expect(accepted > 0, "some corruptions only touch data bytes and must be accepted");
    free(copy);
    free(buf);
}

/* ---- writer argument checks -------------------------------------------- */

Test(engine_gguf, writer_rejects_bad_arguments)
{
    eng_gguf_writer *w;
    cr_expect_eq(eng_gguf_writer_create(&w, 1, 0), -EINVAL);
    cr_expect_eq(eng_gguf_writer_create(&w, 3, 24), -EINVAL);
    cr_assert_eq(eng_gguf_writer_create(&w, 3, 0), 0);
    cr_expect_eq(eng_gguf_writer_add_u32(w, "", 1), -EINVAL);
    cr_expect_eq(eng_gguf_writer_add_arr(w, "a", ENG_GGUF_STR, "x", 1), -EINVAL);
    cr_expect_eq(eng_gguf_writer_add_arr(w, "a", ENG_GGUF_ARR, "x", 1), -EINVAL);
    cr_expect_eq(eng_gguf_writer_add_tensor(w, "t", KN_F32, 5, (int64_t[]){1, 1, 1, 1, 1}, NULL),
                 -EINVAL);
    cr_expect_eq(eng_gguf_writer_add_tensor(w, "t", KN_F32, 1, (int64_t[]){0}, NULL), -EINVAL);
    cr_expect_eq(eng_gguf_writer_add_tensor(w, "t", (enum kn_dtype)12, 1, (int64_t[]){256}, NULL),
                 -EINVAL);
    /* A tensor without data needs a fill callback. */
    cr_assert_eq(eng_gguf_writer_add_tensor(w, "t", KN_F32, 1, (int64_t[]){8}, NULL), 0);
    void *buf;
    size_t len;
    cr_expect_eq(eng_gguf_writer_write_mem(w, &buf, &len, NULL, NULL), -EINVAL);
    eng_gguf_writer_destroy(w);
    eng_gguf_writer_destroy(NULL);
    eng_gguf_close(NULL);
}

/* Resident pages of this process (/proc/self/statm, field 2). */
static long resident_pages(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    cr_assert_not_null(f);
    long size = 0, res = 0;
    cr_assert_eq(fscanf(f, "%ld %ld", &size, &res), 2);
    fclose(f);
    return res;
}

/* eng_gguf_release drops a mapped file's pages from the process (and the
 * values still read back, from the file); over caller memory it touches
 * nothing. */
Test(engine_gguf, release_drops_file_pages_only)
{
    enum { N = 2 << 20 }; /* 8 MiB of f32 */
    struct rb b = {0};
    rb_hdr(&b, 3, 1, 0);
    rb_tinfo(&b, "w", 1, (uint64_t[]){N}, KN_F32, 0);
    rb_pad(&b, 32);
    for (uint32_t i = 0; i < N; i++) {
        const float v = (float)i * 0.5f;
        rb_put(&b, &v, sizeof(v));
    }
    char path[] = "/tmp/gorgon-gguf-release-XXXXXX";
    const int fd = mkstemp(path);
    cr_assert_geq(fd, 0);
    cr_assert_eq(write(fd, b.p, b.n), (ssize_t)b.n);
    close(fd);

    eng_gguf *g;
    cr_assert_eq(eng_gguf_open(&g, path), 0, "%s", eng_error());
    const struct eng_gguf_tensor *t = eng_gguf_find_tensor(g, "w");
    cr_assert_not_null(t);
    const float *w = t->data;
    volatile float sum = 0.0f;
    for (uint32_t i = 0; i < N; i += 1024)
        sum += w[i];
    const long before = resident_pages();
    eng_gguf_release(g, t->data, t->nbytes);
    const long after = resident_pages();
    const long page = sysconf(_SC_PAGESIZE);
    /* at least 90 % of the 2048 pages (the test's own allocations move RSS too) */
    cr_expect_geq(before - after, (long)(t->nbytes / (size_t)page) * 9 / 10,
                  "released %ld of %zu pages", before - after, t->nbytes / (size_t)page);
    for (uint32_t i = 0; i < N; i += 997)
        cr_assert_eq(w[i], (float)i * 0.5f, "element %u after release", i);
    eng_gguf_release(g, (const char *)t->data - 4096, 64); /* before the mapping: ignored */
    eng_gguf_close(g);
    unlink(path);

    cr_assert_eq(eng_gguf_open_mem(&g, b.p, b.n), 0, "%s", eng_error());
    t = eng_gguf_find_tensor(g, "w");
    cr_assert_not_null(t);
    eng_gguf_release(g, t->data, t->nbytes);
    w = t->data;
    for (uint32_t i = 0; i < N; i += 997)
        cr_assert_eq(w[i], (float)i * 0.5f, "caller memory changed at element %u", i);
    eng_gguf_close(g);
    free(b.p);
    (void)sum;
}
