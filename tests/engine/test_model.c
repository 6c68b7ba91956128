/* Model loading: hyper-parameters from llama.* keys, validation of every
 * tensor (a wrong shape names the tensor and both shapes), tied output, and
 * quantised weights against the scalar reference. */
#include <criterion/criterion.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/engine.h"
#include "tests/engine/util/eng_test.h"
#include "tests/util/test_models.h"
#include "engine/model/gguf_write.h"

#define S260 "stories260K/stories260K.gguf"

Test(engine_model, hparams_of_stories260k)
{
    eng_model *m;
    cr_assert_eq(eng_model_open(&m, tu_model_path(S260)), 0, "%s", eng_error());
    const eng_hparams *hp = eng_model_hparams(m);
    cr_assert_eq(hp->dim, 64);
    cr_assert_eq(hp->ffn_dim, 172);
    cr_assert_eq(hp->n_layer, 5);
    cr_assert_eq(hp->n_head, 8);
    cr_assert_eq(hp->n_kv_head, 4);
    cr_assert_eq(hp->head_dim, 8);
    cr_assert_eq(hp->rope_dims, 8);
    cr_assert_eq(hp->n_vocab, 512);
    cr_assert_eq(hp->n_ctx, 2048);
    cr_assert_float_eq(hp->rope_base, 10000.0f, 1e-3, "absent key -> 10000");
    cr_assert_float_eq(hp->rms_eps, 1e-5f, 1e-9);
    cr_assert_not(hp->tied_output);
    cr_assert_not_null(eng_model_tokenizer(m));
    const kn_tensor *wq = &eng_model_layer(m, 0)->wq;
    cr_assert_eq(wq->rows, 64);
    cr_assert_eq(wq->cols, 64);
    /* weights are views into the mapping, not copies */
    const struct eng_gguf_tensor *t = eng_gguf_find_tensor(eng_model_gguf(m), "blk.0.attn_q.weight");
    cr_assert_eq(wq->data, t->data);
    /* per token: 5 x (64*64*2 + 64*32*2 + 3*64*172) + 512*64 output + one 64 row + norms */
    int64_t mat = 5 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 172) + 512 * 64;
    cr_assert_eq(eng_model_matmul_params(m), mat);
    cr_assert_eq(eng_model_bytes_per_token(m), (mat + 64 + 64 * 11) * 4);
    eng_model_close(m);
}

Test(engine_model, hparams_of_babyllama)
{
    eng_model *m;
    cr_assert_eq(eng_model_open(&m, tu_model_path("babyllama-tok105/babyllama-tok105.gguf")), 0,
                 "%s", eng_error());
    const eng_hparams *hp = eng_model_hparams(m);
    cr_assert_eq(hp->dim, 128);
    cr_assert_eq(hp->ffn_dim, 352);
    cr_assert_eq(hp->n_vocab, 105);
    cr_assert_eq(hp->head_dim, 16);
    cr_assert_eq(hp->rope_dims, 16);
    cr_assert_eq(hp->n_ctx, 256);
    eng_model_close(m);
}

/* ---- rebuilt copies of stories260K with one thing changed ---- */

typedef struct change {
    const char *drop_key;    /* omit this key */
    const char *drop_tensor; /* omit this tensor */
    const char *tensor;      /* change this tensor's shape / type */
    int n_dims;
    int64_t ne[2];
    enum kn_dtype type;
} change;

/* Rebuild with gguf_write (llama.* keys and tensors, no tokenizer) and open it
 * as a model. Returns eng_model_open_gguf's result; *buf must be freed after
 * the model is closed. */
static int rebuild(const change *ch, eng_model **m, void **buf)
{
    eng_gguf *src;
    cr_assert_eq(eng_gguf_open(&src, tu_model_path(S260)), 0);
    eng_gguf_writer *w;
    cr_assert_eq(eng_gguf_writer_create(&w, 3, 0), 0);
    et_copy_llama_keys(src, w, ch->drop_key);
    static float zeros[64 * 1024];
    for (int64_t i = 0; i < eng_gguf_tensor_count(src); i++) {
        const struct eng_gguf_tensor *t = eng_gguf_tensor_at(src, i);
        if (ch->drop_tensor && !strcmp(t->name, ch->drop_tensor))
            continue;
        if (ch->tensor && !strcmp(t->name, ch->tensor)) {
            int64_t ne[2] = {ch->ne[0], ch->n_dims > 1 ? ch->ne[1] : 1};
            size_t bytes = kn_row_bytes(ch->type, ne[0]) * (size_t)ne[1];
            cr_assert(bytes <= sizeof(zeros));
            cr_assert_geq(eng_gguf_writer_add_tensor(w, t->name, ch->type, ch->n_dims, ne,
                                                     bytes <= t->nbytes ? t->data : zeros),
                          0);
            continue;
        }
        cr_assert_geq(eng_gguf_writer_add_tensor(w, t->name, t->type, t->n_dims, t->ne, t->data),
                      0);
    }
    size_t len;
    cr_assert_eq(eng_gguf_writer_write_mem(w, buf, &len, NULL, NULL), 0, "%s", eng_error());
    eng_gguf_writer_destroy(w);
    eng_gguf_close(src);
    eng_gguf *g;
    cr_assert_eq(eng_gguf_open_mem(&g, *buf, len), 0, "%s", eng_error());
    eng_error_clear();
    return eng_model_open_gguf(m, g);
}

static void expect_bad(const change *ch, const char *const *words)
{
    eng_model *m = NULL;
    void *buf = NULL;
    cr_assert_eq(rebuild(ch, &m, &buf), -EBADMSG);
    cr_assert_null(m);
    for (const char *const *w = words; *w; w++)
        cr_assert(strstr(eng_error(), *w), "message \"%s\" lacks \"%s\"", eng_error(), *w);
    free(buf);
}

Test(engine_model, unchanged_rebuild_loads)
{
    eng_model *m;
    void *buf;
    cr_assert_eq(rebuild(&(change){0}, &m, &buf), 0, "%s", eng_error());
    cr_assert_null(eng_model_tokenizer(m), "the rebuilt file has no tokenizer");
    eng_model_close(m);
    free(buf);
}

Test(engine_model, transposed_matrix_names_tensor_and_shapes)
{
    /* same byte size, so only the model's shape check can catch it */
    expect_bad(&(change){.tensor = "blk.2.ffn_up.weight", .n_dims = 2, .ne = {172, 64},
                         .type = KN_F32},
               (const char *const[]){"blk.2.ffn_up.weight", "[172, 64]", "expected [64, 172]",
                                     NULL});
}

Test(engine_model, wrong_kv_projection_names_tensor)
{
    expect_bad(&(change){.tensor = "blk.0.attn_k.weight", .n_dims = 2, .ne = {64, 64},
                         .type = KN_F32},
               (const char *const[]){"blk.0.attn_k.weight", "[64, 64]", "expected [64, 32]",
                                     NULL});
}

Test(engine_model, wrong_vocab_of_output_names_tensor)
{
    expect_bad(&(change){.tensor = "output.weight", .n_dims = 2, .ne = {64, 500},
                         .type = KN_F32},
               (const char *const[]){"output.weight", "expected [64, 512]", NULL});
}

Test(engine_model, norm_must_be_f32)
{
    expect_bad(&(change){.tensor = "blk.3.ffn_norm.weight", .n_dims = 1, .ne = {64},
                         .type = KN_F16},
               (const char *const[]){"blk.3.ffn_norm.weight", "f32", NULL});
    expect_bad(&(change){.tensor = "output_norm.weight", .n_dims = 1, .ne = {32},
                         .type = KN_F32},
               (const char *const[]){"output_norm.weight", "[32]", "expected [64]", NULL});
}

Test(engine_model, missing_tensor_is_named)
{
    expect_bad(&(change){.drop_tensor = "blk.4.attn_v.weight"},
               (const char *const[]){"missing tensor blk.4.attn_v.weight", NULL});
}

Test(engine_model, missing_key_is_named)
{
    expect_bad(&(change){.drop_key = "llama.block_count"},
               (const char *const[]){"llama.block_count", NULL});
    expect_bad(&(change){.drop_key = "general.architecture"},
               (const char *const[]){"general.architecture", NULL});
}

Test(engine_model, file_errors_are_reported)
{
    eng_model *m = NULL;
    cr_assert_lt(eng_model_open(&m, "/nonexistent/model.gguf"), 0);
    cr_assert_null(m);
}

/* Greedy tokens of a few steps through eng_forward. */
static void greedy(eng_model *m, int32_t *out, int n)
{
    kn_ctx *kn;
    cr_assert_eq(kn_ctx_create(&kn, &(kn_ctx_cfg){.n_threads = 1}), 0);
    eng_ctx *c;
    cr_assert_eq(eng_ctx_create(&c, m, &(eng_ctx_cfg){.kn = kn, .max_tokens = 4}), 0);
    eng_kv_cfg kc;
    eng_model_kv_cfg(m, 16, 16, 1, 256, &kc);
    eng_kv *kv;
    cr_assert_eq(eng_kv_create(&kv, kn, &kc), 0);
    int seq = eng_kv_seq_alloc(kv);
    const int64_t V = eng_model_hparams(m)->n_vocab;
    float *logits = malloc((size_t)V * sizeof(float));
    int32_t tok = 1;
    for (int i = 0; i < n; i++) {
        eng_seq_in in = {.seq = seq, .tokens = &tok, .n_tokens = 1};
        cr_assert_eq(eng_forward(c, kv, &in, 1, logits, NULL), 1);
        tok = out[i] = eng_argmax(logits, V);
    }
    free(logits);
    eng_kv_destroy(kv);
    eng_ctx_destroy(c);
    kn_ctx_destroy(kn);
}

Test(engine_model, tied_output_uses_token_embd, .timeout = 30)
{
    /* stories260K's output.weight is a copy of token_embd: dropping it must
     * not change a single token */
    eng_model *m, *tied;
    void *buf;
    cr_assert_eq(eng_model_open(&m, tu_model_path(S260)), 0);
    cr_assert_eq(rebuild(&(change){.drop_tensor = "output.weight"}, &tied, &buf), 0, "%s",
                 eng_error());
    cr_assert(eng_model_hparams(tied)->tied_output);
    cr_assert_eq(eng_model_output(tied)->data, eng_model_tok_embd(tied)->data);
    int32_t a[40], b[40];
    greedy(m, a, 40);
    greedy(tied, b, 40);
    cr_assert_eq(memcmp(a, b, sizeof(a)), 0);
    eng_model_close(tied);
    eng_model_close(m);
    free(buf);
}

/* Synthetic quantised models: kernel variant `variant`'s logits agree with
 * the scalar reference on the same weights (skipped where the CPU cannot
 * run it). */
static void quantised_weights_match_scalar(enum kn_variant variant)
{
    if (!kn_ops_for(variant))
        cr_skip_test("%s: not supported by this CPU", kn_variant_name(variant));
    static const enum kn_dtype types[] = {KN_F16, KN_BF16, KN_Q8_0, KN_Q4_0};
    char path[64];
    snprintf(path, sizeof(path), "/tmp/gorgon-test-model-%d.gguf", (int)getpid());
    for (size_t ti = 0; ti < sizeof(types) / sizeof(types[0]); ti++) {
        eng_synth_llama_cfg sc = {.dim = 64, .n_layer = 2, .n_head = 4, .n_head_kv = 2,
                                  .ffn = 96, .n_ctx = 128, .n_vocab = 400,
                                  .dtype = types[ti], .seed = 7};
        cr_assert_eq(eng_gguf_write_synth_llama(path, &sc), 0, "%s", eng_error());
        eng_model *m;
        cr_assert_eq(eng_model_open(&m, path), 0, "%s: %s", kn_dtype_name(types[ti]),
                     eng_error());
        unlink(path);
        kn_ctx *kn;
        cr_assert_eq(kn_ctx_create(&kn, &(kn_ctx_cfg){.n_threads = 1}), 0);
        eng_ctx *c;
        cr_assert_eq(eng_ctx_create(&c, m, &(eng_ctx_cfg){.kn = kn, .max_tokens = 16}), 0);
        eng_kv_cfg kc;
        eng_model_kv_cfg(m, 16, 8, 1, 128, &kc);
        eng_kv *kv;
        cr_assert_eq(eng_kv_create(&kv, kn, &kc), 0);
        const int64_t V = 400;
        float *ref = malloc(8 * V * sizeof(float)), *got = malloc(8 * V * sizeof(float));
        int32_t toks[8] = {1, 300, 280, 17, 99, 350, 5, 260};
        uint8_t want[8];
        memset(want, 1, sizeof(want));
        const enum kn_variant both[2] = {KN_VARIANT_SCALAR, variant};
        for (int k = 0; k < 2; k++) {
            const enum kn_variant v = both[k];
            eng_ctx_set_ops(c, kn_ops_for(v));
            int seq = eng_kv_seq_alloc(kv);
            eng_seq_in in = {.seq = seq, .tokens = toks, .n_tokens = 8, .want = want};
            cr_assert_eq(eng_forward(c, kv, &in, 1, v == KN_VARIANT_SCALAR ? ref : got, NULL), 8);
            eng_kv_seq_free(kv, seq);
            if (v == KN_VARIANT_SCALAR)
                continue;
            float d = 0, s = 0;
            for (int64_t i = 0; i < 8 * V; i++) {
                d = fmaxf(d, fabsf(got[i] - ref[i]));
                s = fmaxf(s, fabsf(ref[i]));
            }
            /* Q8_0/Q4_0 kernels may quantise activations to 8 bits */
            float tol = types[ti] == KN_Q8_0 || types[ti] == KN_Q4_0 ? 2e-2f : 1e-3f;
            cr_assert(d <= tol * s + 1e-5f, "%s weights, %s kernels: logits differ by %g (max %g)",
                      kn_dtype_name(types[ti]), kn_variant_name((enum kn_variant)v), (double)d,
                      (double)s);
        }
        free(ref);
        free(got);
        eng_kv_destroy(kv);
        eng_ctx_destroy(c);
        kn_ctx_destroy(kn);
        eng_model_close(m);
    }
}

Test(engine_model, quantised_weights_avx2_matches_scalar, .timeout = 60)
{
    quantised_weights_match_scalar(KN_VARIANT_AVX2);
}

Test(engine_model, quantised_weights_avx512_matches_scalar, .timeout = 60)
{
    quantised_weights_match_scalar(KN_VARIANT_AVX512);
}
