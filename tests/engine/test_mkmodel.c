/* Synthetic models (eng_gguf_write_synth_llama, behind gorgon-mkmodel): the
 * file loads back with the standard keys, shapes and types, the weights
 * have the promised scale, the output is deterministic, and the tokenizer
 * (synthesised or copied) works. */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/model/eng_err.h"
#include "engine/model/gguf.h"
#include "engine/model/gguf_write.h"
#include "engine/model/tokenizer.h"

static char g_dir[64];

static void setup(void)
{
    snprintf(g_dir, sizeof(g_dir), "/tmp/gorgon-mkmodel-XXXXXX");
    cr_assert_not_null(mkdtemp(g_dir));
}

static void teardown(void)
{
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", g_dir);
    cr_expect_eq(system(cmd), 0);
}

TestSuite(engine_mkmodel, .init = setup, .fini = teardown, .timeout = 60);

static float f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 31, man = h & 1023;
    float v;
    if (exp == 0)
        v = ldexpf((float)man, -24);
    else if (exp == 31)
        v = man ? NAN : INFINITY;
    else
        v = ldexpf((float)(man | 1024), (int)exp - 25);
    return sign ? -v : v;
}

/* Value i of tensor t, decoded from its dtype. */
static float elem(const struct eng_gguf_tensor *t, int64_t i)
{
    const uint8_t *p = t->data;
    uint16_t h;
    float f;
    switch (t->type) {
    case KN_F32:
        memcpy(&f, p + 4 * i, 4);
        return f;
    case KN_F16:
        memcpy(&h, p + 2 * i, 2);
        return f16_to_f32(h);
    case KN_BF16: {
        memcpy(&h, p + 2 * i, 2);
        uint32_t u = (uint32_t)h << 16;
        memcpy(&f, &u, 4);
        return f;
    }
    case KN_Q8_0: {
        const uint8_t *b = p + (i / 32) * 34;
        memcpy(&h, b, 2);
        return f16_to_f32(h) * (float)(int8_t)b[2 + i % 32];
    }
    case KN_Q4_0: {
        const uint8_t *b = p + (i / 32) * 18;
        memcpy(&h, b, 2);
        int j = (int)(i % 32);
        int q = j < 16 ? (b[2 + j] & 15) : (b[2 + j - 16] >> 4);
        return f16_to_f32(h) * (float)(q - 8);
    }
    }
    return NAN;
}

static void check_model(const char *path, const eng_synth_llama_cfg *c, int64_t n_vocab)
{
    eng_gguf *g;
    cr_assert_eq(eng_gguf_open(&g, path), 0, "%s", eng_error());
    const char *arch;
    cr_expect_eq(eng_gguf_get_str(g, "general.architecture", &arch, NULL), 0);
    cr_expect_str_eq(arch, "llama");
    static const char *const keys[] = {
        "llama.embedding_length", "llama.block_count", "llama.attention.head_count",
        "llama.attention.head_count_kv", "llama.feed_forward_length", "llama.context_length",
        "llama.rope.dimension_count", "llama.vocab_size",
    };
    const int64_t want[] = {c->dim, c->n_layer, c->n_head, c->n_head_kv, c->ffn, c->n_ctx,
                            c->dim / c->n_head, n_vocab};
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
        uint32_t v = 0;
        cr_expect_eq(eng_gguf_get_u32(g, keys[i], &v), 0, "%s", keys[i]);
        cr_expect_eq(v, want[i], "%s = %u", keys[i], v);
    }
    float eps, base;
    cr_expect_eq(eng_gguf_get_f32(g, "llama.attention.layer_norm_rms_epsilon", &eps), 0);
    cr_expect_eq(eps, 1e-5f);
    cr_expect_eq(eng_gguf_get_f32(g, "llama.rope.freq_base", &base), 0);
    cr_expect_eq(base, 10000.0f);
    cr_expect_eq(eng_gguf_tensor_count(g), 3 + 9 * c->n_layer);

    int64_t kv = c->dim / c->n_head * c->n_head_kv;
    struct {
        const char *name;
        int64_t ne0, ne1;
        bool norm;
    } t[] = {
        {"token_embd.weight", c->dim, n_vocab, false},
        {"output_norm.weight", c->dim, 1, true},
        {"output.weight", c->dim, n_vocab, false},
        {"blk.0.attn_norm.weight", c->dim, 1, true},
        {"blk.0.attn_q.weight", c->dim, c->dim, false},
        {"blk.0.attn_k.weight", c->dim, kv, false},
        {"blk.0.attn_v.weight", c->dim, kv, false},
        {"blk.0.attn_output.weight", c->dim, c->dim, false},
        {"blk.0.ffn_norm.weight", c->dim, 1, true},
        {"blk.0.ffn_gate.weight", c->dim, c->ffn, false},
        {"blk.0.ffn_up.weight", c->dim, c->ffn, false},
        {"blk.0.ffn_down.weight", c->ffn, c->dim, false},
    };
    for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
        const struct eng_gguf_tensor *x = eng_gguf_find_tensor(g, t[i].name);
        cr_assert_not_null(x, "%s missing", t[i].name);
        cr_expect_eq(x->n_dims, t[i].norm ? 1 : 2, "%s", t[i].name);
        cr_expect_eq(x->ne[0], t[i].ne0, "%s ne0", t[i].name);
        cr_expect_eq(x->ne[1], t[i].ne1, "%s ne1", t[i].name);
        cr_expect_eq(x->type, t[i].norm ? KN_F32 : c->dtype, "%s type", t[i].name);
        int64_t n = x->ne[0] * x->ne[1];
        double sum = 0, sum2 = 0;
        for (int64_t k = 0; k < n; k++) {
            float v = elem(x, k);
            cr_assert(isfinite(v), "%s[%lld] not finite", t[i].name, (long long)k);
            sum += v;
            sum2 += (double)v * v;
        }
        if (t[i].norm) {
            cr_expect_eq(sum, (double)n, "%s: norms are 1", t[i].name);
        } else {
            double sd = sqrt(sum2 / (double)n - (sum / (double)n) * (sum / (double)n));
            cr_expect(sd > 0.017 && sd < 0.023, "%s: std %g, want ~0.02", t[i].name, sd);
            cr_expect(fabs(sum / (double)n) < 0.002, "%s: mean %g", t[i].name, sum / (double)n);
        }
    }
    char last[64];
    snprintf(last, sizeof(last), "blk.%lld.ffn_down.weight", (long long)(c->n_layer - 1));
    cr_expect_not_null(eng_gguf_find_tensor(g, last));
    eng_gguf_close(g);
}

static eng_synth_llama_cfg small_cfg(enum kn_dtype t)
{
    return (eng_synth_llama_cfg){.dim = 64, .n_layer = 2, .n_head = 4, .n_head_kv = 2,
                                 .ffn = 96, .n_ctx = 128, .n_vocab = 600, .dtype = t,
                                 .seed = 42};
}

Test(engine_mkmodel, f16_model_loads_with_right_shapes)
{
    char path[128];
    snprintf(path, sizeof(path), "%s/f16.gguf", g_dir);
    eng_synth_llama_cfg c = small_cfg(KN_F16);
    cr_assert_eq(eng_gguf_write_synth_llama(path, &c), 0, "%s", eng_error());
    check_model(path, &c, 600);
}

Test(engine_mkmodel, q4_0_and_q8_0_models_load_with_right_shapes)
{
    char path[128];
    snprintf(path, sizeof(path), "%s/q4.gguf", g_dir);
    eng_synth_llama_cfg c = small_cfg(KN_Q4_0);
    cr_assert_eq(eng_gguf_write_synth_llama(path, &c), 0, "%s", eng_error());
    check_model(path, &c, 600);
    snprintf(path, sizeof(path), "%s/q8.gguf", g_dir);
    c.dtype = KN_Q8_0;
    c.n_layer = 1;
    cr_assert_eq(eng_gguf_write_synth_llama(path, &c), 0, "%s", eng_error());
    check_model(path, &c, 600);
    snprintf(path, sizeof(path), "%s/bf16.gguf", g_dir);
    c.dtype = KN_BF16;
    cr_assert_eq(eng_gguf_write_synth_llama(path, &c), 0, "%s", eng_error());
    check_model(path, &c, 600);
}

static void *read_all(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f);
    fseek(f, 0, SEEK_END);
    *n = (size_t)ftell(f);
    rewind(f);
    void *b = malloc(*n);
    cr_assert_eq(fread(b, 1, *n, f), *n);
    fclose(f);
    return b;
}

Test(engine_mkmodel, same_seed_same_bytes_other_seed_differs)
{
    char a[128], b[128];
    snprintf(a, sizeof(a), "%s/a.gguf", g_dir);
    snprintf(b, sizeof(b), "%s/b.gguf", g_dir);
    eng_synth_llama_cfg c = small_cfg(KN_F32);
    cr_assert_eq(eng_gguf_write_synth_llama(a, &c), 0);
    cr_assert_eq(eng_gguf_write_synth_llama(b, &c), 0);
    size_t na, nb;
    void *pa = read_all(a, &na), *pb = read_all(b, &nb);
    cr_assert_eq(na, nb);
    cr_expect_eq(memcmp(pa, pb, na), 0);
    free(pb);
    c.seed = 43;
    cr_assert_eq(eng_gguf_write_synth_llama(b, &c), 0);
    pb = read_all(b, &nb);
    cr_assert_eq(na, nb);
    cr_expect_neq(memcmp(pa, pb, na), 0);
    free(pa);
    free(pb);
}

Test(engine_mkmodel, synthesised_tokenizer_roundtrips)
{
    char path[128];
    snprintf(path, sizeof(path), "%s/t.gguf", g_dir);
    eng_synth_llama_cfg c = small_cfg(KN_F32);
    c.n_vocab = 2000;
    cr_assert_eq(eng_gguf_write_synth_llama(path, &c), 0, "%s", eng_error());
    eng_gguf *g;
    eng_tok *t;
    cr_assert_eq(eng_gguf_open(&g, path), 0);
    cr_assert_eq(eng_tok_create(&t, g), 0, "%s", eng_error());
    cr_expect_eq(eng_tok_n_vocab(t), 2000);
    const char *s = "the quick brown fox, Caf\xc3\xa9 \xf0\x9f\xa6\x99!";
    int32_t ids[256];
    int64_t n = eng_tok_encode(t, s, strlen(s), true, ids, 256);
    cr_assert_gt(n, 1);
    cr_expect_lt(n, (int64_t)strlen(s), "merges happen: %lld tokens", (long long)n);
    char out[256];
    int64_t m = eng_tok_decode(t, ids, (size_t)n, -1, out, sizeof(out));
    cr_assert_eq(m, (int64_t)strlen(s));
    cr_expect_eq(memcmp(out, s, (size_t)m), 0);
    /* With 2000 pieces the words stop at short prefixes of three letters:
     * ▁t (score of a "▁"+char piece) merges first, then "he" beats "▁th". */
    n = eng_tok_encode(t, "the", 3, false, ids, 256);
    cr_assert_eq(n, 2);
    size_t pl;
    const char *p = eng_tok_piece(t, ids[0], &pl);
    cr_expect(pl == 4 && memcmp(p, "\xe2\x96\x81t", 4) == 0);
    p = eng_tok_piece(t, ids[1], &pl);
    cr_expect(pl == 2 && memcmp(p, "he", 2) == 0);
    eng_tok_destroy(t);
    eng_gguf_close(g);
}

Test(engine_mkmodel, vocab_copied_from_llama2)
{
    char src[1024];
    const char *d = getenv("GORGON_TEST_MODELS");
    snprintf(src, sizeof(src), "%s/llama2-vocab/ggml-vocab-llama-spm.gguf",
             d ? d : "../shared/models");
    if (access(src, R_OK) != 0)
        cr_skip_test("no %s", src);
    char path[128];
    snprintf(path, sizeof(path), "%s/v.gguf", g_dir);
    eng_synth_llama_cfg c = small_cfg(KN_Q8_0);
    c.n_layer = 1;
    c.vocab_from = src;
    cr_assert_eq(eng_gguf_write_synth_llama(path, &c), 0, "%s", eng_error());
    check_model(path, &c, 32000);
    eng_gguf *a, *b;
    eng_tok *ta, *tb;
    cr_assert_eq(eng_gguf_open(&a, src), 0);
    cr_assert_eq(eng_gguf_open(&b, path), 0);
    cr_assert_eq(eng_tok_create(&ta, a), 0);
    cr_assert_eq(eng_tok_create(&tb, b), 0);
    for (int32_t i = 0; i < 32000; i += 7) {
        size_t la, lb;
        const char *pa = eng_tok_piece(ta, i, &la), *pb = eng_tok_piece(tb, i, &lb);
        cr_assert(la == lb && memcmp(pa, pb, la) == 0, "piece %d differs", i);
        cr_assert_eq(eng_tok_score(ta, i), eng_tok_score(tb, i));
        cr_assert_eq(eng_tok_type(ta, i), eng_tok_type(tb, i));
    }
    cr_expect_eq(eng_tok_add_bos(tb), true);
    bool add_eos = true;
    cr_expect_eq(eng_gguf_get_bool(b, "tokenizer.ggml.add_eos_token", &add_eos), 0);
    cr_expect(!add_eos);
    eng_tok_destroy(ta);
    eng_tok_destroy(tb);
    eng_gguf_close(a);
    eng_gguf_close(b);
}

Test(engine_mkmodel, bad_shapes_rejected)
{
    char path[128];
    snprintf(path, sizeof(path), "%s/bad.gguf", g_dir);
    eng_synth_llama_cfg c = small_cfg(KN_F32);
    c.n_head = 5;
    cr_expect_eq(eng_gguf_write_synth_llama(path, &c), -EINVAL);
    cr_expect(strstr(eng_error(), "n_head") != NULL, "%s", eng_error());
    c = small_cfg(KN_F32);
    c.n_head_kv = 3;
    cr_expect_eq(eng_gguf_write_synth_llama(path, &c), -EINVAL);
    c = small_cfg(KN_Q8_0);
    c.ffn = 100;
    cr_expect_eq(eng_gguf_write_synth_llama(path, &c), -EINVAL);
    cr_expect(strstr(eng_error(), "multiples of 32") != NULL, "%s", eng_error());
    c = small_cfg(KN_F32);
    c.n_vocab = 100;
    cr_expect_eq(eng_gguf_write_synth_llama(path, &c), -EINVAL);
    cr_expect(strstr(eng_error(), "n_vocab") != NULL, "%s", eng_error());
    c = small_cfg(KN_F32);
    c.vocab_from = "/nonexistent/vocab.gguf";
    cr_expect_eq(eng_gguf_write_synth_llama(path, &c), -ENOENT);
    cr_expect_eq(access(path, F_OK), -1, "no file left behind on error");
}
