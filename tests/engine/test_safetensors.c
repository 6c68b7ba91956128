/* safetensors reader/writer: round trips for every accepted dtype, and one
 * hostile file per validation rule, each expected to fail with -EBADMSG and
 * a message naming the problem. */
#include <criterion/criterion.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine/model/eng_err.h"
#include "engine/model/safetensors.h"

/* A file from a header text and a blob of blob_len bytes (value i & 0xff). */
static uint8_t *raw_file(const char *json, size_t blob_len, size_t *len)
{
    size_t n = strlen(json);
    uint8_t *b = malloc(8 + n + blob_len + 1);
    cr_assert_not_null(b);
    for (int i = 0; i < 8; i++)
        b[i] = (uint8_t)((uint64_t)n >> (8 * i));
    memcpy(b + 8, json, n);
    for (size_t i = 0; i < blob_len; i++)
        b[8 + n + i] = (uint8_t)i;
    *len = 8 + n + blob_len;
    return b;
}

/* Open json+blob from memory and expect -EBADMSG with `needle` in the text. */
static void expect_bad(const char *json, size_t blob_len, const char *needle)
{
    size_t len;
    uint8_t *b = raw_file(json, blob_len, &len);
    eng_st *st = (eng_st *)0x1;
    eng_error_clear();
    int rc = eng_st_open_mem(&st, b, len);
    cr_expect_eq(rc, -EBADMSG, "header %s: rc %d (%s)", json, rc, eng_error());
    cr_expect_eq(st, (eng_st *)0x1, "*out must be untouched on error");
    cr_expect(strstr(eng_error(), needle), "header %s: message '%s' lacks '%s'", json,
              eng_error(), needle);
    free(b);
}

static char g_dir[64];

static void mk_dir(void)
{
    snprintf(g_dir, sizeof(g_dir), "/tmp/gorgon-st-XXXXXX");
    cr_assert_not_null(mkdtemp(g_dir));
}

static void rm_dir(void)
{
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", g_dir);
    cr_expect_eq(system(cmd), 0);
}

TestSuite(engine_safetensors, .init = mk_dir, .fini = rm_dir, .timeout = 20);

Test(engine_safetensors, round_trips_all_dtypes_and_metadata)
{
    float f32[15];
    uint16_t f16[7], bf16[12];
    for (int i = 0; i < 15; i++)
        f32[i] = (float)i * 0.25f - 1.0f;
    for (int i = 0; i < 7; i++)
        f16[i] = kn_f32_to_f16((float)i - 3.0f);
    for (int i = 0; i < 12; i++)
        bf16[i] = kn_f32_to_bf16((float)i * 1.5f);
    const struct eng_st_tensor in[] = {
        {.name = "w.f32", .dtype = KN_F32, .n_dims = 2, .shape = {3, 5}, .data = f32,
         .nbytes = sizeof(f32)},
        {.name = "v.f16", .dtype = KN_F16, .n_dims = 1, .shape = {7}, .data = f16,
         .nbytes = sizeof(f16)},
        {.name = "t.bf16", .dtype = KN_BF16, .n_dims = 3, .shape = {2, 2, 3}, .data = bf16,
         .nbytes = sizeof(bf16)},
        {.name = "empty", .dtype = KN_F32, .n_dims = 2, .shape = {0, 4}, .data = NULL,
         .nbytes = 0},
        {.name = "scalar", .dtype = KN_F32, .n_dims = 0, .data = f32, .nbytes = 4},
    };
    const struct eng_st_meta meta[] = {{"format", "pt"}, {"note", "gorgon test"}};
    char path[128];
    snprintf(path, sizeof(path), "%s/t.safetensors", g_dir);
    cr_assert_eq(eng_st_write(path, in, 5, meta, 2), 0, "%s", eng_error());

    eng_st *st;
    cr_assert_eq(eng_st_open(&st, path), 0, "%s", eng_error());
    cr_assert_eq(eng_st_count(st), 5);
    for (int i = 0; i < 5; i++) {
        const struct eng_st_tensor *t = eng_st_tensor_at(st, i);
        cr_assert_not_null(t);
        cr_expect_str_eq(t->name, in[i].name, "header order must be kept");
        cr_expect_eq(eng_st_find(st, in[i].name), t);
        cr_expect_eq(t->dtype, in[i].dtype);
        cr_expect_eq(t->n_dims, in[i].n_dims);
        int64_t ne = 1;
        for (int d = 0; d < t->n_dims; d++) {
            cr_expect_eq(t->shape[d], in[i].shape[d]);
            ne *= t->shape[d];
        }
        cr_expect_eq(t->n_elems, ne);
        cr_expect_eq(t->nbytes, in[i].nbytes);
        if (t->nbytes) {
            cr_expect_eq((uintptr_t)t->data % eng_st_dtype_size(t->dtype), 0);
            cr_expect_eq(memcmp(t->data, in[i].data, t->nbytes), 0, "%s bytes differ", t->name);
        }
    }
    cr_expect_null(eng_st_tensor_at(st, 5));
    cr_expect_null(eng_st_tensor_at(st, -1));
    cr_expect_null(eng_st_find(st, "absent"));
    cr_expect_eq(eng_st_meta_count(st), 2);
    cr_expect_str_eq(eng_st_meta_get(st, "format"), "pt");
    cr_expect_str_eq(eng_st_meta_get(st, "note"), "gorgon test");
    cr_expect_str_eq(eng_st_meta_at(st, 1)->key, "note");
    cr_expect_null(eng_st_meta_get(st, "absent"));
    cr_expect_eq(kn_f16_to_f32(((const uint16_t *)eng_st_find(st, "v.f16")->data)[0]), -3.0f);
    cr_expect_eq(kn_bf16_to_f32(((const uint16_t *)eng_st_find(st, "t.bf16")->data)[2]), 3.0f);
    eng_st_close(st);

    /* The file and the in-memory serialisation are the same bytes, and the
     * blob starts 8-byte aligned as the HF writer makes it. */
    void *buf;
    size_t len;
    cr_assert_eq(eng_st_serialize(&buf, &len, in, 5, meta, 2), 0);
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f);
    uint8_t *disk = malloc(len + 1);
    cr_assert_eq(fread(disk, 1, len + 1, f), len);
    fclose(f);
    cr_expect_eq(memcmp(disk, buf, len), 0);
    uint64_t hl;
    memcpy(&hl, buf, 8);
    cr_expect_eq((8 + hl) % 8, 0);
    struct stat sb;
    cr_expect_eq(stat(path, &sb), 0);
    cr_expect_eq(sb.st_mode & 0777, 0644);
    free(disk);
    free(buf);
}

Test(engine_safetensors, copies_misaligned_tensors)
{
    /* 3 F16 values (6 bytes) put the following F32 tensor at blob offset 6. */
    uint16_t h[3] = {kn_f32_to_f16(1), kn_f32_to_f16(2), kn_f32_to_f16(3)};
    float f[2] = {4.5f, -7.25f};
    const struct eng_st_tensor in[] = {
        {.name = "h", .dtype = KN_F16, .n_dims = 1, .shape = {3}, .data = h, .nbytes = 6},
        {.name = "f", .dtype = KN_F32, .n_dims = 1, .shape = {2}, .data = f, .nbytes = 8},
    };
    void *buf;
    size_t len;
    cr_assert_eq(eng_st_serialize(&buf, &len, in, 2, NULL, 0), 0);
    eng_st *st;
    cr_assert_eq(eng_st_open_mem(&st, buf, len), 0, "%s", eng_error());
    const struct eng_st_tensor *t = eng_st_find(st, "f");
    cr_assert_not_null(t);
    cr_expect_eq((uintptr_t)t->data % 4, 0);
    cr_expect_eq(((const float *)t->data)[0], 4.5f);
    cr_expect_eq(((const float *)t->data)[1], -7.25f);
    cr_expect_eq(eng_st_find(st, "h")->data, (const uint8_t *)buf + len - 14,
                 "aligned tensors stay in the caller's buffer");
    eng_st_close(st);
    free(buf);
}

Test(engine_safetensors, accepts_gaps_trailing_bytes_and_padding)
{
    size_t len;
    uint8_t *b = raw_file("{\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]},"
                          "\"a\":{\"shape\":[2],\"data_offsets\":[0,4],\"dtype\":\"BF16\"},"
                          "\"z\":{\"dtype\":\"F32\",\"shape\":[4294967296,0],"
                          "\"data_offsets\":[4,4]}}   ",
                          32, &len);
    eng_st *st;
    cr_assert_eq(eng_st_open_mem(&st, b, len), 0, "%s", eng_error());
    cr_expect_eq(eng_st_count(st), 3);
    cr_expect_str_eq(eng_st_tensor_at(st, 0)->name, "b");
    cr_expect_eq(eng_st_find(st, "z")->n_elems, 0, "a zero dimension makes any shape empty");
    cr_expect_eq(eng_st_find(st, "z")->nbytes, 0);
    cr_expect_eq(eng_st_find(st, "a")->dtype, KN_BF16);
    cr_expect_eq(eng_st_meta_count(st), 0);
    eng_st_close(st);
    free(b);
}

Test(engine_safetensors, rejects_truncated_or_oversized_header_length)
{
    eng_st *st;
    uint8_t tiny[5] = {0};
    cr_expect_eq(eng_st_open_mem(&st, tiny, sizeof(tiny)), -EBADMSG);
    cr_expect(strstr(eng_error(), "too short"), "%s", eng_error());

    size_t len;
    uint8_t *b = raw_file("{}", 0, &len);
    b[0] = 200; /* header claims 200 bytes, the file has 2 */
    cr_expect_eq(eng_st_open_mem(&st, b, len), -EBADMSG);
    cr_expect(strstr(eng_error(), "past the end"), "%s", eng_error());
    memset(b, 0xff, 8); /* 2^64 - 1 */
    cr_expect_eq(eng_st_open_mem(&st, b, len), -EBADMSG);
    cr_expect(strstr(eng_error(), "limit"), "%s", eng_error());
    free(b);
}

Test(engine_safetensors, rejects_bad_json)
{
    expect_bad("{\"a\":", 0, "bad header JSON");
    expect_bad("{\"a\":{}} x", 0, "bad header JSON");
    expect_bad("[1,2]", 0, "not a JSON object");
    expect_bad("{\"a\":\"\\u0000\"}", 0, "bad header JSON");
    expect_bad("", 0, "bad header JSON");
}

Test(engine_safetensors, rejects_duplicate_key)
{
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
               "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
               8, "duplicate");
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
               8, "duplicate");
}

Test(engine_safetensors, rejects_unknown_dtype_naming_it)
{
    expect_bad("{\"x\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[0,8]}}", 8, "'I64'");
    expect_bad("{\"x\":{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 8, "'f32'");
    expect_bad("{\"x\":{\"dtype\":7,\"shape\":[1],\"data_offsets\":[0,4]}}", 8, "dtype");
}

Test(engine_safetensors, rejects_shape_size_mismatch)
{
    expect_bad("{\"x\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,20]}}", 32,
               "size mismatch");
    expect_bad("{\"x\":{\"dtype\":\"F16\",\"shape\":[4],\"data_offsets\":[0,16]}}", 32,
               "size mismatch");
    /* products that overflow 64 bits, or exceed the blob, before the compare */
    expect_bad("{\"x\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,16],"
               "\"data_offsets\":[0,0]}}",
               8, "more data than");
    expect_bad("{\"x\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 8,
               "shape[0]");
    expect_bad("{\"x\":{\"dtype\":\"F32\",\"shape\":[1.0],\"data_offsets\":[0,4]}}", 8,
               "shape[0]");
    expect_bad("{\"x\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}",
               8, "dimensions");
}

Test(engine_safetensors, rejects_overlap)
{
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
               "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
               16, "overlap");
    /* a tensor nested inside an earlier, longer one */
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
               "\"c\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[4,4]},"
               "\"b\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[8,12]}}",
               16, "overlap");
}

Test(engine_safetensors, rejects_offsets_outside_blob)
{
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}", 12,
               "out of the 12-byte data blob");
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,4]}}", 12,
               "end before begin");
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 12,
               "data_offsets");
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 12,
               "data_offsets");
}

Test(engine_safetensors, rejects_malformed_entries)
{
    expect_bad("{\"a\":[]}", 0, "not an object");
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4, "missing field \"data_offsets\"");
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"x\":1}}", 4,
               "unknown field");
    expect_bad("{\"\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
               "empty name");
    expect_bad("{\"__metadata__\":{\"k\":1}}", 0, "not a string");
    expect_bad("{\"__metadata__\":[]}", 0, "not an object");
}

Test(engine_safetensors, never_crashes_on_truncated_or_flipped_files)
{
    float f[6] = {1, 2, 3, 4, 5, 6};
    const struct eng_st_tensor in[] = {
        {.name = "a", .dtype = KN_F32, .n_dims = 2, .shape = {2, 3}, .data = f, .nbytes = 24},
        {.name = "b", .dtype = KN_BF16, .n_dims = 1, .shape = {2}, .data = f, .nbytes = 4},
    };
    const struct eng_st_meta meta[] = {{"k", "v"}};
    void *buf;
    size_t len;
    cr_assert_eq(eng_st_serialize(&buf, &len, in, 2, meta, 1), 0);
    int ok = 0;
    for (size_t cut = 0; cut < len; cut++) {
        eng_st *st;
        int rc = eng_st_open_mem(&st, buf, cut);
        if (rc == 0) {
            ok++;
            eng_st_close(st);
        } else {
            cr_expect_eq(rc, -EBADMSG, "prefix %zu: rc %d", cut, rc);
        }
    }
    cr_expect_eq(ok, 0, "a file cut inside the blob must be rejected");
    uint8_t *m = malloc(len);
    for (size_t i = 0; i < len; i++) {
        for (int bit = 0; bit < 8; bit++) {
            memcpy(m, buf, len);
            m[i] ^= (uint8_t)(1u << bit);
            eng_st *st;
            int rc = eng_st_open_mem(&st, m, len);
            if (rc == 0)
                eng_st_close(st);
            else
                cr_expect(rc == -EBADMSG || rc == -ENOMEM, "flip %zu.%d: rc %d", i, bit, rc);
        }
    }
    free(m);
    free(buf);
}

Test(engine_safetensors, open_reports_path_and_errno)
{
    eng_st *st;
    char path[128];
    snprintf(path, sizeof(path), "%s/absent.safetensors", g_dir);
    cr_expect_eq(eng_st_open(&st, path), -ENOENT);
    cr_expect(strstr(eng_error(), path), "%s", eng_error());
    cr_expect_eq(eng_st_open(&st, g_dir), -EBADMSG);
    cr_expect(strstr(eng_error(), "regular file"), "%s", eng_error());

    snprintf(path, sizeof(path), "%s/bad.safetensors", g_dir);
    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f);
    size_t len;
    uint8_t *b = raw_file("{\"a\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[0,8]}}", 8,
                          &len);
    cr_assert_eq(fwrite(b, 1, len, f), len);
    fclose(f);
    free(b);
    cr_expect_eq(eng_st_open(&st, path), -EBADMSG);
    cr_expect(strstr(eng_error(), path) && strstr(eng_error(), "'F64'"), "%s", eng_error());
}

Test(engine_safetensors, writer_rejects_bad_tensors_and_leaves_no_file)
{
    float f[4] = {0};
    char path[128];
    snprintf(path, sizeof(path), "%s/w.safetensors", g_dir);
    struct eng_st_tensor t[2] = {
        {.name = "a", .dtype = KN_F32, .n_dims = 1, .shape = {4}, .data = f, .nbytes = 16},
        {.name = "a", .dtype = KN_F32, .n_dims = 1, .shape = {4}, .data = f, .nbytes = 16},
    };
    cr_expect_eq(eng_st_write(path, t, 2, NULL, 0), -EINVAL);
    cr_expect(strstr(eng_error(), "duplicate"), "%s", eng_error());
    t[1].name = "b";
    t[1].nbytes = 12;
    cr_expect_eq(eng_st_write(path, t, 2, NULL, 0), -EINVAL);
    cr_expect(strstr(eng_error(), "nbytes"), "%s", eng_error());
    t[1].nbytes = 16;
    t[1].dtype = KN_Q8_0;
    cr_expect_eq(eng_st_write(path, t, 2, NULL, 0), -EINVAL);
    cr_expect(strstr(eng_error(), "dtype"), "%s", eng_error());
    t[1].dtype = KN_F32;
    t[1].name = "__metadata__";
    cr_expect_eq(eng_st_write(path, t, 2, NULL, 0), -EINVAL);
    t[1].name = "\xff\xfe";
    cr_expect_eq(eng_st_write(path, t, 2, NULL, 0), -EINVAL);
    cr_expect(strstr(eng_error(), "UTF-8"), "%s", eng_error());
    cr_expect_eq(access(path, F_OK), -1, "a failed write must not create the file");
    snprintf(path, sizeof(path), "%s/no/such/dir/w.safetensors", g_dir);
    t[1].name = "b";
    cr_expect_eq(eng_st_write(path, t, 2, NULL, 0), -ENOENT);
}
