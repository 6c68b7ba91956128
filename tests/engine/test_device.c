/* Models on a device ctx: eng_model_synthetic (shape defaults and checks,
 * weights equal to kn_buf_fill_random's formula, reproducible for a seed,
 * per-token figures), eng_model_to_device (a no-op on the CPU), and on a
 * CUDA device: the stories260K goldens, logits that track the CPU's step by
 * step, batch invariance, lossless Medusa, synthetic weights equal to the
 * CPU's, a model larger than the device refused before anything is
 * allocated, and ctxs that refuse a model whose weights are elsewhere.
 * Every device test is skipped, with the reason, without a usable device. */
#include <criterion/criterion.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/engine.h"
#include "engine/model/gguf_write.h"
#include "tests/engine/util/eng_test.h"
#include "tests/util/test_models.h"

#define S260 "stories260K/stories260K.gguf"

/* ---- contexts ------------------------------------------------------------ */

static kn_ctx *cpu_ctx(void)
{
    kn_ctx *kn;
    cr_assert_eq(kn_ctx_create(&kn, &(kn_ctx_cfg){.n_threads = 1}), 0);
    return kn;
}

/* CUDA device 0, or the test is skipped saying why there is none. */
static kn_ctx *cuda_ctx_or_skip(void)
{
    char why[256] = "";
    const int n = kn_cuda_device_count(why, sizeof why);
    if (n <= 0)
        cr_skip_test("needs a CUDA device: %s", why[0] ? why : "none found");
    kn_ctx *kn = NULL;
    cr_assert_eq(kn_ctx_create(&kn, &(kn_ctx_cfg){.device = "cuda"}), 0,
                 "%d CUDA device(s) counted, but a ctx on cuda:0 cannot be made", n);
    cr_assert_not(kn_ctx_host_memory(kn));
    cr_assert(strncmp(kn_ctx_device(kn), "cuda:0", 6) == 0, "device \"%s\"", kn_ctx_device(kn));
    return kn;
}

static eng_model *open_model(const char *rel)
{
    eng_model *m = NULL;
    cr_assert_eq(eng_model_open(&m, tu_model_path(rel)), 0, "%s", eng_error());
    return m;
}

/* Host copy of n bytes of backend memory. */
static void download(kn_ctx *kn, void *dst, const void *src, size_t n)
{
    cr_assert_eq(kn_buf_download(kn, dst, src, n), 0, "download: %s", kn_ctx_error(kn));
}

/* ---- one ctx + KV cache over a model ------------------------------------ */

typedef struct runner {
    kn_ctx *kn;
    eng_ctx *c;
    eng_kv *kv;
    float *logits, *hidden; /* backend: [max_tokens][V], [max_tokens][dim] */
    int64_t V, D, max_tokens;
} runner;

static void runner_init(runner *r, kn_ctx *kn, const eng_model *m, int64_t max_tokens,
                        int max_seqs, int64_t max_seq_len)
{
    memset(r, 0, sizeof(*r));
    r->kn = kn;
    r->V = eng_model_hparams(m)->n_vocab;
    r->D = eng_model_hparams(m)->dim;
    r->max_tokens = max_tokens;
    cr_assert_eq(eng_ctx_create(&r->c, m, &(eng_ctx_cfg){.kn = kn, .max_tokens = max_tokens}),
                 0, "%s", eng_error());
    eng_kv_cfg kc;
    const int64_t bs = 16, per_seq = (max_seq_len + bs - 1) / bs;
    eng_model_kv_cfg(m, (int)bs, per_seq * max_seqs, max_seqs, max_seq_len, &kc);
    cr_assert_eq(eng_kv_create(&r->kv, kn, &kc), 0, "%s", eng_error());
    cr_assert_eq(kn_buf_alloc(kn, (size_t)(max_tokens * r->V) * sizeof(float),
                              (void **)&r->logits),
                 0);
    cr_assert_eq(kn_buf_alloc(kn, (size_t)(max_tokens * r->D) * sizeof(float),
                              (void **)&r->hidden),
                 0);
}

static void runner_fini(runner *r)
{
    kn_buf_free(r->kn, r->logits);
    kn_buf_free(r->kn, r->hidden);
    eng_kv_destroy(r->kv);
    eng_ctx_destroy(r->c);
}

/* Run n tokens of sequence seq (every row an output when all_rows, else the
 * last) and copy the logits to out ([rows][V], host). Returns the rows. */
static int64_t run_logits(runner *r, int seq, const int32_t *tok, int64_t n, bool all_rows,
                          float *out)
{
    static uint8_t want[512];
    cr_assert_leq(n, (int64_t)sizeof(want));
    memset(want, 1, (size_t)n);
    eng_seq_in in = {.seq = seq, .tokens = tok, .n_tokens = n, .want = all_rows ? want : NULL};
    int64_t rows = eng_forward(r->c, r->kv, &in, 1, r->logits, NULL);
    cr_assert_eq(rows, all_rows ? n : 1, "forward: %s", eng_error());
    download(r->kn, out, r->logits, (size_t)(rows * r->V) * sizeof(float));
    return rows;
}

/* ---- the synthetic model's shape ---------------------------------------- */

/* vocab 256, dim 64, FFN 128, 2 layers, 4 query heads of 16, 2 KV heads */
static eng_hparams tiny(void)
{
    return (eng_hparams){.n_vocab = 256, .dim = 64, .ffn_dim = 128, .n_layer = 2,
                         .n_head = 4, .n_kv_head = 2};
}

static eng_model *synth(const eng_hparams *hp, enum kn_dtype t, kn_ctx *kn, uint64_t seed)
{
    eng_model *m = NULL;
    cr_assert_eq(eng_model_synthetic(&m, hp, t, kn, seed), 0, "%s %s", kn_dtype_name(t),
                 eng_error());
    cr_assert_not_null(m);
    return m;
}

static eng_model *synth_tiny(enum kn_dtype t, kn_ctx *kn, uint64_t seed)
{
    const eng_hparams hp = tiny();
    return synth(&hp, t, kn, seed);
}

static const int32_t TOKS[] = {1, 7, 100, 255, 42, 3, 3, 200};
#define NTOK ((int64_t)(sizeof(TOKS) / sizeof(TOKS[0])))

/* Logits of every position of TOKS run as one prompt on kn: [NTOK][V]. */
static void tiny_logits(kn_ctx *kn, const eng_model *m, float *out)
{
    runner r;
    runner_init(&r, kn, m, NTOK, 1, 64);
    int seq = eng_kv_seq_alloc(r.kv);
    cr_assert_geq(seq, 0);
    run_logits(&r, seq, TOKS, NTOK, true, out);
    runner_fini(&r);
}

static const enum kn_dtype DTYPES[] = {KN_F32, KN_F16, KN_Q8_0};
#define N_DTYPES 3

/* ---- synthetic models on the CPU ----------------------------------------- */

/* A forward of the tiny shape gives usable logits in every weight type:
 * finite, spread within each row, different at different positions. */
Test(engine_device, synthetic_forward_gives_finite_varied_logits, .timeout = 60)
{
    kn_ctx *kn = cpu_ctx();
    const int64_t V = 256;
    float *lg = malloc((size_t)(NTOK * V) * sizeof(float));
    cr_assert_not_null(lg);
    for (int d = 0; d < N_DTYPES; d++) {
        eng_model *m = synth_tiny(DTYPES[d], kn, 42);
        tiny_logits(kn, m, lg);
        for (int64_t p = 0; p < NTOK; p++) {
            const float *row = lg + p * V;
            float lo = INFINITY, hi = -INFINITY;
            for (int64_t i = 0; i < V; i++) {
                cr_assert(isfinite(row[i]), "%s: position %lld logit %lld is %g",
                          kn_dtype_name(DTYPES[d]), (long long)p, (long long)i, (double)row[i]);
                lo = fminf(lo, row[i]);
                hi = fmaxf(hi, row[i]);
            }
            cr_assert_gt(hi - lo, 1e-2f, "%s: position %lld: all %lld logits within %g",
                         kn_dtype_name(DTYPES[d]), (long long)p, (long long)V, (double)(hi - lo));
        }
        /* tokens 1 and 7 at positions 0 and 1: different rows */
        cr_assert_neq(memcmp(lg, lg + V, (size_t)V * sizeof(float)), 0);
        eng_model_close(m);
    }
    free(lg);
    kn_ctx_destroy(kn);
}

/* Two models made separately from the same seed give bit-identical logits;
 * another seed gives other ones. */
Test(engine_device, synthetic_same_seed_same_logits_other_seed_other, .timeout = 60)
{
    kn_ctx *kn = cpu_ctx();
    const int64_t V = 256;
    const size_t bytes = (size_t)(NTOK * V) * sizeof(float);
    float *a = malloc(bytes), *b = malloc(bytes), *c = malloc(bytes);
    cr_assert(a && b && c);
    const eng_hparams hp = tiny();
    for (int d = 0; d < N_DTYPES; d++) {
        eng_model *m1 = synth(&hp, DTYPES[d], kn, 1234);
        eng_model *m2 = synth(&hp, DTYPES[d], kn, 1234);
        eng_model *m3 = synth(&hp, DTYPES[d], kn, 99);
        tiny_logits(kn, m1, a);
        tiny_logits(kn, m2, b);
        tiny_logits(kn, m3, c);
        cr_assert_eq(memcmp(a, b, bytes), 0, "%s: same seed, different logits",
                     kn_dtype_name(DTYPES[d]));
        int64_t same = 0;
        for (int64_t i = 0; i < NTOK * V; i++)
            same += a[i] == c[i];
        cr_assert_lt(same, NTOK * V / 100, "%s: seeds 1234 and 99 share %lld of %lld logits",
                     kn_dtype_name(DTYPES[d]), (long long)same, (long long)(NTOK * V));
        eng_model_close(m1);
        eng_model_close(m2);
        eng_model_close(m3);
    }
    free(a);
    free(b);
    free(c);
    kn_ctx_destroy(kn);
}

/* The keys eng_model_open defaults are defaulted alike; no tokenizer, one
 * rank, an output matrix of its own. */
Test(engine_device, synthetic_hparams_defaults_are_filled)
{
    kn_ctx *kn = cpu_ctx();
    eng_hparams in = tiny();
    in.n_kv_head = 0;
    eng_model *m = synth(&in, KN_F32, kn, 7);
    const eng_hparams *hp = eng_model_hparams(m);
    cr_assert_eq(hp->n_vocab, 256);
    cr_assert_eq(hp->dim, 64);
    cr_assert_eq(hp->ffn_dim, 128);
    cr_assert_eq(hp->n_layer, 2);
    cr_assert_eq(hp->n_head, 4);
    cr_assert_eq(hp->n_kv_head, 4, "n_kv_head 0 defaults to n_head");
    cr_assert_eq(hp->head_dim, 16, "head_dim = dim / n_head");
    cr_assert_eq(hp->rope_dims, 16, "rope_dims defaults to head_dim");
    cr_assert_eq(hp->n_ctx, 2048);
    cr_assert_float_eq(hp->rope_base, 10000.0f, 1e-3);
    cr_assert_float_eq(hp->rms_eps, 1e-5f, 1e-9);
    cr_assert_not(hp->tied_output);
    cr_assert_eq(eng_model_shard_hparams(m)->n_kv_head, 4);
    cr_assert_null(eng_model_tokenizer(m));
    cr_assert_eq(eng_model_tp(m, NULL), 1);
    cr_assert_neq(eng_model_output(m)->data, eng_model_tok_embd(m)->data);
    eng_model_close(m);

    /* given values are kept */
    in = tiny();
    in.head_dim = 8;
    in.rope_dims = 4;
    in.rope_base = 500000.0f;
    in.rms_eps = 1e-6f;
    in.n_ctx = 300;
    m = synth(&in, KN_F32, kn, 7);
    hp = eng_model_hparams(m);
    cr_assert_eq(hp->n_kv_head, 2);
    cr_assert_eq(hp->head_dim, 8);
    cr_assert_eq(hp->rope_dims, 4);
    cr_assert_float_eq(hp->rope_base, 500000.0f, 1e-1);
    cr_assert_float_eq(hp->rms_eps, 1e-6f, 1e-10);
    cr_assert_eq(hp->n_ctx, 300);
    cr_assert_eq(eng_model_layer(m, 0)->wq.rows, 4 * 8, "n_head x head_dim query rows");
    cr_assert_eq(eng_model_layer(m, 0)->wo.cols, 4 * 8);
    eng_model_close(m);
    kn_ctx_destroy(kn);
}

/* The model made is untied whatever hp says (model.h: "untied output"):
 * hparams copied from a tied model must not make it report tied_output, or
 * be freed as one (its output buffer would leak). */
Test(engine_device, synthetic_output_is_untied_even_from_tied_hparams)
{
    kn_ctx *kn = cpu_ctx();
    eng_hparams in = tiny();
    in.tied_output = true;
    eng_model *m = synth(&in, KN_F32, kn, 7);
    cr_assert_not(eng_model_hparams(m)->tied_output,
                  "the synthetic output matrix is a buffer of its own, but the model says tied");
    cr_assert_neq(eng_model_output(m)->data, eng_model_tok_embd(m)->data);
    eng_model_close(m);
    kn_ctx_destroy(kn);
}

/* Bytes of one row of n values of t, from the formats (not kn_row_bytes). */
static int64_t row_bytes(enum kn_dtype t, int64_t n)
{
    switch (t) {
    case KN_F32:
        return 4 * n;
    case KN_F16:
        return 2 * n;
    case KN_Q8_0:
        return n / 32 * 34; /* fp16 scale + 32 int8 */
    default:
        cr_assert_fail("type %d", (int)t);
        return 0;
    }
}

/* Per-token figures from the shape: output 256x64, per layer Wq 64x64,
 * Wk/Wv 32x64, Wo 64x64, gate/up 128x64, down 64x128; one embedding row;
 * 1 + 2 x 2 norm vectors of 64 floats. */
Test(engine_device, synthetic_bytes_per_token_and_params_from_the_shape)
{
    kn_ctx *kn = cpu_ctx();
    const int64_t params =
        256 * 64 + 2 * (64 * 64 + 2 * 32 * 64 + 64 * 64 + 2 * 128 * 64 + 64 * 128);
    cr_assert_eq(params, 90112);
    for (int d = 0; d < N_DTYPES; d++) {
        const enum kn_dtype t = DTYPES[d];
        eng_model *m = synth_tiny(t, kn, 3);
        const int64_t mats = 256 * row_bytes(t, 64) +
                             2 * (64 * row_bytes(t, 64) + 2 * 32 * row_bytes(t, 64) +
                                  64 * row_bytes(t, 64) + 2 * 128 * row_bytes(t, 64) +
                                  64 * row_bytes(t, 128));
        cr_assert_eq(eng_model_matmul_params(m), params, "%s", kn_dtype_name(t));
        cr_assert_eq(eng_model_bytes_per_token(m), mats + row_bytes(t, 64) + 5 * 64 * 4,
                     "%s: %lld bytes per token", kn_dtype_name(t),
                     (long long)eng_model_bytes_per_token(m));
        cr_assert_eq(eng_model_shard_weight_bytes(m), mats, "%s", kn_dtype_name(t));
        eng_model_close(m);
    }
    kn_ctx_destroy(kn);
}

/* An inconsistent shape is refused with -EINVAL, nothing made, and a
 * message that shows the offending value. */
static void expect_refused(const eng_hparams *hp, enum kn_dtype t, const char *what,
                           const char *needle)
{
    kn_ctx *kn = cpu_ctx();
    eng_model *m = (eng_model *)&m; /* not NULL: the call must clear it */
    eng_error_clear();
    int rc = eng_model_synthetic(&m, hp, t, kn, 1);
    cr_assert_eq(rc, -EINVAL, "%s: got %d", what, rc);
    cr_assert_null(m, "%s", what);
    cr_assert(strstr(eng_error(), needle), "%s: message \"%s\" does not say \"%s\"", what,
              eng_error(), needle);
    kn_ctx_destroy(kn);
}

Test(engine_device, synthetic_bad_shapes_are_refused)
{
    eng_hparams hp = tiny();
    hp.n_kv_head = 3;
    expect_refused(&hp, KN_F32, "4 query heads over 3 KV heads", "heads 4/3");

    hp = tiny();
    hp.n_layer = 0;
    expect_refused(&hp, KN_F32, "no layers", "layers 0");

    hp = tiny();
    hp.n_head = 0;
    expect_refused(&hp, KN_F32, "no heads", "heads 0");

    hp = tiny();
    hp.n_vocab = 0;
    expect_refused(&hp, KN_F32, "no vocabulary", "vocab 0");

    /* 3 heads of 64 / 3 = 21: RoPE rotates pairs, 21 dims cannot be */
    hp = tiny();
    hp.n_head = 3;
    hp.n_kv_head = 3;
    expect_refused(&hp, KN_F32, "head_dim 21", "of 21");

    hp = tiny();
    hp.rope_dims = 32; /* more than the head's 16 */
    expect_refused(&hp, KN_F32, "rope_dims > head_dim", "model: synthetic shape");

    /* Q8_0 rows must be whole blocks of 32 */
    hp = tiny();
    hp.dim = 48;
    expect_refused(&hp, KN_Q8_0, "Q8_0 dim 48", "dim 48");
    expect_refused(&hp, KN_Q8_0, "Q8_0 dim 48", "whole blocks");
    hp = tiny();
    hp.ffn_dim = 100;
    expect_refused(&hp, KN_Q8_0, "Q8_0 ffn 100", "ffn 100");

    /* ...while F32 takes any width: the refusal above is about blocks */
    kn_ctx *kn = cpu_ctx();
    hp = tiny();
    hp.dim = 48;
    eng_model *m = synth(&hp, KN_F32, kn, 1);
    cr_assert_eq(eng_model_hparams(m)->head_dim, 12);
    eng_model_close(m);
    cr_assert_eq(eng_model_synthetic(NULL, &hp, KN_F32, kn, 1), -EINVAL);
    kn_ctx_destroy(kn);
}

/* ---- the weights are kn_buf_fill_random's values ------------------------- */

/* kn.h's formula for element i of a fill with seed and amplitude. */
static float fill_ref(uint64_t seed, int64_t i, float amplitude)
{
    uint64_t z = seed + (uint64_t)(i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ z >> 30) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ z >> 27) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return ((float)(z >> 40) * 0x1p-24f * 2.0f - 1.0f) * amplitude;
}

/* Compare the first rows of w (kn's memory) with the formula for a fill
 * with seed and amplitude, stored as w->type. */
static void expect_filled(kn_ctx *kn, const kn_tensor *w, uint64_t seed, float amplitude,
                          const char *name)
{
    const int64_t rows = w->rows < 4 ? w->rows : 4, cols = w->cols;
    const size_t rb = kn_row_bytes(w->type, cols);
    char *got = malloc(rb * (size_t)rows), *want = malloc(rb);
    float *v = malloc((size_t)cols * sizeof(float));
    cr_assert(got && want && v);
    download(kn, got, w->data, rb * (size_t)rows);
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t c = 0; c < cols; c++)
            v[c] = fill_ref(seed, r * cols + c, amplitude);
        cr_assert_eq(kn_quantize_row(w->type, v, cols, want), (int64_t)rb);
        cr_assert_eq(memcmp(got + (size_t)r * rb, want, rb), 0,
                     "%s (%s): row %lld is not the fill of seed %llu, amplitude %g", name,
                     kn_dtype_name(w->type), (long long)r, (unsigned long long)seed,
                     (double)amplitude);
    }
    free(got);
    free(want);
    free(v);
}

/* Tensor i (output 0, then layer l's Wq Wk Wv Wo gate up down at
 * 1 + 7l + 0..6, the embedding last) is filled from ENG_SYNTH_SEED(seed, i), amplitude
 * 1/sqrt(its width) (the embedding 1). */
Test(engine_device, synthetic_weights_are_the_documented_fill)
{
    kn_ctx *kn = cpu_ctx();
    const uint64_t seed = 0xC0FFEE;
    const eng_hparams hp = tiny();
    const uint64_t emb = 1 + 7 * (uint64_t)hp.n_layer;
    for (int d = 0; d < N_DTYPES; d++) {
        eng_model *m = synth(&hp, DTYPES[d], kn, seed);
        expect_filled(kn, eng_model_tok_embd(m), ENG_SYNTH_SEED(seed, emb), 1.0f, "token_embd");
        expect_filled(kn, eng_model_output(m), ENG_SYNTH_SEED(seed, 0), 1.0f / sqrtf(64.0f), "output");
        const eng_layer *L0 = eng_model_layer(m, 0), *L1 = eng_model_layer(m, 1);
        expect_filled(kn, &L0->wq, ENG_SYNTH_SEED(seed, 1), 1.0f / sqrtf(64.0f), "blk.0.attn_q");
        expect_filled(kn, &L0->wv, ENG_SYNTH_SEED(seed, 3), 1.0f / sqrtf(64.0f), "blk.0.attn_v");
        expect_filled(kn, &L1->wo, ENG_SYNTH_SEED(seed, 8 + 3), 1.0f / sqrtf(64.0f), "blk.1.attn_output");
        expect_filled(kn, &L1->w_down, ENG_SYNTH_SEED(seed, 8 + 6), 1.0f / sqrtf(128.0f), "blk.1.ffn_down");
        /* norm vectors of ones */
        float nv[64];
        const float *norms[] = {eng_model_output_norm(m), L0->attn_norm, L0->ffn_norm,
                                L1->attn_norm, L1->ffn_norm};
        for (int k = 0; k < 5; k++) {
            cr_assert_not_null(norms[k]);
            download(kn, nv, norms[k], sizeof(nv));
            for (int i = 0; i < 64; i++)
                cr_assert_eq(nv[i], 1.0f, "norm vector %d element %d is %g", k, i, (double)nv[i]);
        }
        eng_model_close(m);
    }
    kn_ctx_destroy(kn);
}

/* ---- eng_model_to_device on the CPU ------------------------------------- */

/* Greedy generation on kn like gorgon-run (final newline included). */
static void generate_on(kn_ctx *kn, const eng_model *m, const char *prompt, int steps,
                        et_text *out)
{
    const eng_tok *tok = eng_model_tokenizer(m);
    cr_assert_not_null(tok);
    int32_t ids[256];
    int64_t n = eng_tok_encode(tok, prompt, strlen(prompt), true, ids, 256);
    cr_assert_geq(n, 1);
    eng_ctx *c;
    cr_assert_eq(eng_ctx_create(&c, m, &(eng_ctx_cfg){.kn = kn, .max_tokens = 64}), 0, "%s",
                 eng_error());
    eng_kv_cfg kc;
    eng_model_kv_cfg(m, 16, 64, 1, 1024, &kc);
    eng_kv *kv;
    cr_assert_eq(eng_kv_create(&kv, kn, &kc), 0, "%s", eng_error());
    int seq = eng_kv_seq_alloc(kv);
    out->n = 0;
    eng_gen_result r;
    cr_assert_eq(eng_generate(c, kv, seq,
                              &(eng_gen_cfg){.prompt = ids, .n_prompt = n, .steps = steps,
                                             .on_token = et_collect, .arg = out},
                              &r),
                 0, "%s", eng_error());
    et_collect(out, -1, "\n", 1);
    eng_kv_destroy(kv);
    eng_ctx_destroy(c);
}

/* The CPU's memory is the mapping's: nothing moves, and the golden holds. */
Test(engine_device, to_device_on_cpu_is_a_noop_and_golden_holds, .timeout = 60)
{
    kn_ctx *kn = cpu_ctx();
    eng_model *m = open_model(S260);
    const void *emb = eng_model_tok_embd(m)->data, *wq = eng_model_layer(m, 0)->wq.data;
    const void *wq_packed = eng_model_layer(m, 4)->wq.packed;
    const float *norm = eng_model_output_norm(m);
    cr_assert_eq(eng_model_to_device(m, kn), 0, "%s", eng_error());
    cr_assert_eq(eng_model_to_device(m, kn), 0, "a second call is a no-op too");
    cr_assert_eq(eng_model_tok_embd(m)->data, emb);
    cr_assert_eq(eng_model_layer(m, 0)->wq.data, wq);
    cr_assert_eq(eng_model_layer(m, 4)->wq.packed, wq_packed, "the CPU's packed copy is kept");
    cr_assert_eq(eng_model_output_norm(m), norm);
    static et_text t;
    generate_on(kn, m, "", 256, &t);
    et_expect_golden("stories260K/golden_greedy_n256.txt", &t);

    /* a synthetic model made on a CPU ctx: also a no-op on (another) CPU ctx */
    kn_ctx *kn2 = cpu_ctx();
    eng_model *s = synth_tiny(KN_F32, kn, 5);
    cr_assert_eq(eng_model_to_device(s, kn2), 0, "%s", eng_error());
    eng_model_close(s);
    cr_assert_eq(eng_model_to_device(NULL, kn), -EINVAL);
    cr_assert_eq(eng_model_to_device(m, NULL), -EINVAL);
    eng_model_close(m);
    kn_ctx_destroy(kn2);
    kn_ctx_destroy(kn);
}

/* ---- on a CUDA device ----------------------------------------------------- */

static void device_golden(const char *model, const char *prompt, int steps, const char *golden)
{
    kn_ctx *kn = cuda_ctx_or_skip();
    eng_model *m = open_model(model);
    cr_assert_eq(eng_model_to_device(m, kn), 0, "%s", eng_error());
    cr_assert_eq(eng_model_to_device(m, kn), 0, "placing it again on the same ctx: a no-op");
    cr_assert_not_null(eng_model_tokenizer(m), "the tokenizer stays on the host");
    static et_text t;
    generate_on(kn, m, prompt, steps, &t);
    et_expect_golden(golden, &t);
    eng_model_close(m);
    kn_ctx_destroy(kn);
}

Test(engine_device, cuda_stories260k_greedy_n256_from_bos, .timeout = 120)
{
    device_golden(S260, "", 256, "stories260K/golden_greedy_n256.txt");
}

Test(engine_device, cuda_stories260k_greedy_prompt_lily_and_tom_n64, .timeout = 120)
{
    device_golden(S260, "Lily and Tom", 64, "stories260K/golden_greedy_prompt_LilyAndTom_n64.txt");
}

/* A second shape: dim 128, vocab 105. */
Test(engine_device, cuda_babyllama_greedy_n256_from_bos, .timeout = 120)
{
    device_golden("babyllama-tok105/babyllama-tok105.gguf", "", 256,
                  "babyllama-tok105/golden_greedy_n256.txt");
}

/* stories260K rebuilt without output.weight (llama.* keys and the other
 * tensors; no tokenizer): a tied model, whose logits use token_embd. *buf
 * holds the file; free it after the model is closed. */
static eng_model *open_tied(void **buf)
{
    eng_gguf *src;
    cr_assert_eq(eng_gguf_open(&src, tu_model_path(S260)), 0, "%s", eng_error());
    eng_gguf_writer *w;
    cr_assert_eq(eng_gguf_writer_create(&w, 3, 0), 0);
    et_copy_llama_keys(src, w, NULL);
    for (int64_t i = 0; i < eng_gguf_tensor_count(src); i++) {
        const struct eng_gguf_tensor *t = eng_gguf_tensor_at(src, i);
        if (strcmp(t->name, "output.weight"))
            cr_assert_geq(eng_gguf_writer_add_tensor(w, t->name, t->type, t->n_dims, t->ne,
                                                     t->data),
                          0);
    }
    size_t len;
    cr_assert_eq(eng_gguf_writer_write_mem(w, buf, &len, NULL, NULL), 0, "%s", eng_error());
    eng_gguf_writer_destroy(w);
    eng_gguf_close(src);
    eng_gguf *g;
    cr_assert_eq(eng_gguf_open_mem(&g, *buf, len), 0, "%s", eng_error());
    eng_model *m = NULL;
    cr_assert_eq(eng_model_open_gguf(&m, g), 0, "%s", eng_error());
    cr_assert(eng_model_hparams(m)->tied_output);
    return m;
}

/* Greedy tokens from BOS, one forward per token, on kn. */
static void greedy_from_bos(kn_ctx *kn, const eng_model *m, int32_t *out, int n)
{
    runner r;
    runner_init(&r, kn, m, 4, 1, 256);
    int seq = eng_kv_seq_alloc(r.kv);
    int32_t tok = 1;
    for (int i = 0; i < n; i++) {
        eng_seq_in in = {.seq = seq, .tokens = &tok, .n_tokens = 1};
        cr_assert_eq(eng_forward_greedy(r.c, r.kv, &in, 1, r.logits, NULL, &out[i]), 1, "%s",
                     eng_error());
        tok = out[i];
    }
    runner_fini(&r);
}

/* A tied model on the device: the embedding's device copy serves as the
 * output matrix (uploaded once), the tokens are the CPU's (stories260K's
 * output.weight is a copy of token_embd), and closing it frees that copy
 * once. */
Test(engine_device, cuda_tied_output_shares_the_embedding, .timeout = 120)
{
    kn_ctx *dk = cuda_ctx_or_skip();
    kn_ctx *ck = cpu_ctx();
    eng_model *cm = open_model(S260);
    void *buf;
    eng_model *m = open_tied(&buf);
    cr_assert_eq(eng_model_to_device(m, dk), 0, "%s", eng_error());
    cr_assert_eq(eng_model_output(m)->data, eng_model_tok_embd(m)->data);
    enum { N = 100 };
    int32_t want[N], got[N];
    greedy_from_bos(ck, cm, want, N);
    greedy_from_bos(dk, m, got, N);
    for (int i = 0; i < N; i++)
        cr_assert_eq(got[i], want[i], "token %d: tied on the device %d, CPU %d", i, got[i],
                     want[i]);
    eng_model_close(m);
    free(buf);
    cr_assert_str_eq(kn_ctx_error(dk), "");
    eng_model_close(cm);
    kn_ctx_destroy(ck);
    kn_ctx_destroy(dk);
}

/* Tolerance between the device's and the CPU's logits, relative to the
 * row's largest |logit|. Both sides compute in float32 with float32
 * accumulation, only the summation order differs: each dot product (K <=
 * 172 here) then differs by about sqrt(K) * 2^-24 of its terms' magnitude,
 * ~1e-6 relative, and 5 layers of residual stream and attention over <= 256
 * positions add a few of those. 1e-3 leaves two orders of magnitude of
 * room, yet a matmul run in TF32 or bf16 (10 or 7 mantissa bits: ~1e-3 to
 * 1e-2 relative after 5 layers) or any wrong kernel (O(1)) is caught. */
#define LOGIT_TOL 1e-3f

/* Largest |a - b| over n, relative to max |b| (b: the CPU's row). */
static float rel_diff(const float *a, const float *b, int64_t n)
{
    float d = 0, s = 0;
    for (int64_t i = 0; i < n; i++) {
        d = fmaxf(d, fabsf(a[i] - b[i]));
        s = fmaxf(s, fabsf(b[i]));
    }
    return d / fmaxf(s, 1e-30f);
}

/* Prefill every prompt row and decode to 256 positions, CPU and device in
 * lockstep: the same top-1 token at every step and logits within
 * LOGIT_TOL of the row's scale. */
Test(engine_device, cuda_logits_track_the_cpu_step_by_step, .timeout = 180)
{
    kn_ctx *dk = cuda_ctx_or_skip();
    kn_ctx *ck = cpu_ctx();
    eng_model *cm = open_model(S260), *dm = open_model(S260);
    cr_assert_eq(eng_model_to_device(dm, dk), 0, "%s", eng_error());
    runner rc, rd;
    runner_init(&rc, ck, cm, 64, 1, 512);
    runner_init(&rd, dk, dm, 64, 1, 512);
    const int64_t V = rc.V;
    float *lc = malloc((size_t)(64 * V) * sizeof(float));
    float *ld = malloc((size_t)(64 * V) * sizeof(float));
    cr_assert(lc && ld);
    const char *prompts[] = {"", "Lily and Tom", "The big dog ran to the park and saw a"};
    float worst = 0;
    for (int p = 0; p < 3; p++) {
        int32_t ids[64];
        int64_t n = eng_tok_encode(eng_model_tokenizer(cm), prompts[p], strlen(prompts[p]),
                                   true, ids, 64);
        cr_assert_geq(n, 1);
        int sc = eng_kv_seq_alloc(rc.kv), sd = eng_kv_seq_alloc(rd.kv);
        cr_assert(sc >= 0 && sd >= 0);
        run_logits(&rc, sc, ids, n, true, lc);
        run_logits(&rd, sd, ids, n, true, ld);
        for (int64_t i = 0; i < n; i++) {
            float e = rel_diff(ld + i * V, lc + i * V, V);
            worst = fmaxf(worst, e);
            cr_assert_leq(e, LOGIT_TOL, "prompt \"%s\" row %lld: device logits differ by %g of "
                          "the row's scale", prompts[p], (long long)i, (double)e);
        }
        const float *rowc = lc + (n - 1) * V, *rowd = ld + (n - 1) * V;
        for (int64_t pos = n; pos < 256; pos++) {
            int32_t tc = eng_argmax(rowc, V), td = eng_argmax(rowd, V);
            cr_assert_eq(td, tc, "prompt \"%s\" position %lld: device picks %d, CPU %d "
                         "(logits %g vs %g)", prompts[p], (long long)pos, td, tc,
                         (double)rowd[td], (double)rowc[tc]);
            run_logits(&rc, sc, &tc, 1, false, lc);
            run_logits(&rd, sd, &tc, 1, false, ld);
            rowc = lc;
            rowd = ld;
            float e = rel_diff(ld, lc, V);
            worst = fmaxf(worst, e);
            cr_assert_leq(e, LOGIT_TOL, "prompt \"%s\" position %lld: device logits differ "
                          "by %g of the row's scale", prompts[p], (long long)pos, (double)e);
        }
        cr_assert_eq(eng_kv_seq_free(rc.kv, sc), 0);
        cr_assert_eq(eng_kv_seq_free(rd.kv, sd), 0);
    }
    cr_log_info("device vs CPU logits: worst difference %g of the row's scale", (double)worst);
    free(lc);
    free(ld);
    runner_fini(&rc);
    runner_fini(&rd);
    eng_model_close(cm);
    eng_model_close(dm);
    kn_ctx_destroy(ck);
    kn_ctx_destroy(dk);
}

#define NP 4
#define BSTEPS 64
static const char *const BPROMPTS[NP] = {"Once upon a time", "Lily and Tom",
                                         "The big dog ran to the park and saw a", "Sam"};

/* Each prompt's greedy tokens are the same decoded alone (M = 1 per step)
 * and in a batch of four (M = 4, prompts of different lengths prefilled
 * together): a device GEMM whose result depends on M would show here. */
Test(engine_device, cuda_batch_of_four_gives_each_its_tokens_alone, .timeout = 120)
{
    kn_ctx *kn = cuda_ctx_or_skip();
    eng_model *m = open_model(S260);
    cr_assert_eq(eng_model_to_device(m, kn), 0, "%s", eng_error());
    runner r;
    runner_init(&r, kn, m, 128, 2 * NP, 256);
    int32_t ids[NP][64], alone[NP][BSTEPS], batched[NP][BSTEPS];
    int64_t n[NP];
    for (int p = 0; p < NP; p++) {
        n[p] = eng_tok_encode(eng_model_tokenizer(m), BPROMPTS[p], strlen(BPROMPTS[p]), true,
                              ids[p], 64);
        cr_assert_geq(n[p], 1);
    }
    for (int p = 0; p < NP; p++) {
        int seq = eng_kv_seq_alloc(r.kv);
        eng_seq_in in = {.seq = seq, .tokens = ids[p], .n_tokens = n[p]};
        int32_t next;
        cr_assert_eq(eng_forward_greedy(r.c, r.kv, &in, 1, r.logits, NULL, &next), 1, "%s",
                     eng_error());
        for (int s = 0; s < BSTEPS; s++) {
            alone[p][s] = next;
            in = (eng_seq_in){.seq = seq, .tokens = &alone[p][s], .n_tokens = 1};
            cr_assert_eq(eng_forward_greedy(r.c, r.kv, &in, 1, r.logits, NULL, &next), 1, "%s",
                         eng_error());
        }
        cr_assert_eq(eng_kv_seq_free(r.kv, seq), 0);
    }
    eng_seq_in in[NP];
    for (int p = 0; p < NP; p++)
        in[p] = (eng_seq_in){.seq = eng_kv_seq_alloc(r.kv), .tokens = ids[p], .n_tokens = n[p]};
    int32_t next[NP];
    cr_assert_eq(eng_forward_greedy(r.c, r.kv, in, NP, r.logits, NULL, next), NP, "%s",
                 eng_error());
    for (int s = 0; s < BSTEPS; s++) {
        for (int p = 0; p < NP; p++) {
            batched[p][s] = next[p];
            in[p].tokens = &batched[p][s];
            in[p].n_tokens = 1;
        }
        cr_assert_eq(eng_forward_greedy(r.c, r.kv, in, NP, r.logits, NULL, next), NP, "%s",
                     eng_error());
    }
    for (int p = 0; p < NP; p++)
        for (int s = 0; s < BSTEPS; s++)
            cr_assert_eq(batched[p][s], alone[p][s], "prompt \"%s\" step %d: batched %d alone %d",
                         BPROMPTS[p], s, batched[p][s], alone[p][s]);
    runner_fini(&r);
    eng_model_close(m);
    kn_ctx_destroy(kn);
}

/* ---- Medusa on the device ------------------------------------------------ */

#define N_HEADS 4
#define MPOS 128 /* positions per sequence, prompt included */

static uint64_t g_lcg = 0x9e3779b97f4a7c15ull;
static float frand(void) /* [-1, 1) */
{
    g_lcg = g_lcg * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((g_lcg >> 40) & 0xffffff) / (float)(1 << 23) - 1.0f;
}

/* N_HEADS heads for stories260K written to dir and opened: random ones
 * (almost nothing accepted), or copies of the base output matrix with a
 * zero ResBlock (each head predicts the base's next token again: repeats
 * accepted, and the decoder shares the base matrix). host: the model on
 * the host (its output matrix is read). */
static eng_medusa_heads *make_heads(const eng_model *host, bool copy, const char *dir)
{
    const int64_t H = eng_model_hparams(host)->dim, V = eng_model_hparams(host)->n_vocab;
    const kn_tensor *out = eng_model_output(host);
    cr_assert_eq(out->type, KN_F32);
    const float *E = out->data;
    float *w = calloc((size_t)(H * H), sizeof(float)), *b = calloc((size_t)H, sizeof(float));
    cr_assert(w && b);
    float *lm[N_HEADS];
    const float *ws[N_HEADS], *bs[N_HEADS], *lms[N_HEADS];
    if (!copy) {
        for (int64_t i = 0; i < H * H; i++)
            w[i] = frand() * 0.3f;
        for (int64_t i = 0; i < H; i++)
            b[i] = frand() * 0.1f;
    }
    for (int h = 0; h < N_HEADS; h++) {
        lm[h] = malloc((size_t)(V * H) * sizeof(float));
        cr_assert_not_null(lm[h]);
        for (int64_t i = 0; i < V * H; i++)
            lm[h][i] = copy ? E[i] : frand();
        ws[h] = w, bs[h] = b, lms[h] = lm[h];
    }
    cr_assert_eq(eng_medusa_heads_write(dir, N_HEADS, H, V, ws, bs, lms, "stories260K"), 0, "%s",
                 eng_error());
    for (int h = 0; h < N_HEADS; h++)
        free(lm[h]);
    free(w);
    free(b);
    eng_medusa_heads *mh = NULL;
    cr_assert_eq(eng_medusa_heads_open(&mh, dir, H, V), 0, "%s", eng_error());
    return mh;
}

/* Medusa greedy on the device against plain greedy on the device, token for
 * token, for one prompt: returns the tree tokens accepted. */
static int64_t medusa_vs_plain(kn_ctx *kn, eng_model *m, const eng_medusa_heads *mh,
                               const char *tree_spec, enum eng_medusa_proj want_proj,
                               const char *prompt)
{
    eng_medusa_tree *t = NULL;
    cr_assert_eq(eng_medusa_tree_from_spec(&t, tree_spec), 0, "%s", eng_error());
    eng_medusa *md = NULL;
    cr_assert_eq(eng_medusa_create(&md, &(eng_medusa_cfg){.model = m, .kn = kn, .heads = mh,
                                                           .tree = t, .max_seqs = 2,
                                                           .accept = ENG_MEDUSA_GREEDY}),
                 0, "%s", eng_error());
    cr_assert_eq(eng_medusa_projection(md), want_proj);
    int64_t step_tok = eng_medusa_step_tokens(md, 1);
    runner r;
    runner_init(&r, kn, m, step_tok > 64 ? step_tok : 64, 2, MPOS + t->n_nodes + 16);
    int32_t ids[64];
    int64_t n = eng_tok_encode(eng_model_tokenizer(m), prompt, strlen(prompt), true, ids, 64);
    cr_assert_geq(n, 1);

    /* plain greedy */
    static int32_t plain[MPOS], med[MPOS + ENG_MEDUSA_MAX_DEPTH + 1];
    int seq = eng_kv_seq_alloc(r.kv);
    eng_seq_in in = {.seq = seq, .tokens = ids, .n_tokens = n};
    int32_t next;
    cr_assert_eq(eng_forward_greedy(r.c, r.kv, &in, 1, r.logits, NULL, &next), 1, "%s",
                 eng_error());
    int64_t n_plain = 0;
    while (n + n_plain < MPOS) {
        plain[n_plain++] = next;
        in = (eng_seq_in){.seq = seq, .tokens = &plain[n_plain - 1], .n_tokens = 1};
        cr_assert_eq(eng_forward_greedy(r.c, r.kv, &in, 1, r.logits, NULL, &next), 1, "%s",
                     eng_error());
    }
    cr_assert_eq(eng_kv_seq_free(r.kv, seq), 0);

    /* Medusa */
    seq = eng_kv_seq_alloc(r.kv);
    in = (eng_seq_in){.seq = seq, .tokens = ids, .n_tokens = n};
    cr_assert_eq(eng_forward(r.c, r.kv, &in, 1, r.logits, r.hidden), 1, "%s", eng_error());
    cr_assert_eq(eng_medusa_seq_begin(md, seq, r.logits, r.hidden, 1), 0, "%s", eng_error());
    int64_t n_med = 0, accepted = 0;
    while (n + n_med < MPOS) {
        cr_assert_eq(eng_medusa_seq_root(md, seq), plain[n_med],
                     "tree %s, prompt \"%s\": the root of token %lld", tree_spec, prompt,
                     (long long)n_med);
        eng_medusa_result res;
        int64_t got = eng_medusa_step(md, r.c, r.kv, &seq, 1, &res);
        cr_assert_gt(got, 0, "step: %s", eng_error());
        cr_assert_eq(got, res.n_tokens);
        for (int i = 0; i < res.n_tokens; i++)
            med[n_med++] = res.tokens[i];
        accepted += res.n_accepted;
        cr_assert_eq(eng_kv_seq_len(r.kv, seq), n + n_med);
    }
    for (int64_t i = 0; i < n_plain; i++)
        cr_assert_eq(med[i], plain[i],
                     "tree %s, prompt \"%s\": token %lld is %d, plain greedy gives %d",
                     tree_spec, prompt, (long long)i, med[i], plain[i]);
    eng_medusa_seq_end(md, seq);
    cr_assert_eq(eng_kv_seq_free(r.kv, seq), 0);
    runner_fini(&r);
    eng_medusa_destroy(md);
    eng_medusa_tree_destroy(t);
    return accepted;
}

/* Greedy Medusa with the heads placed on the device is lossless: random
 * heads (their own projections copied to the device; the costliest tree,
 * almost nothing accepted) and copy heads (the shared base matrix, found
 * equal to the device copy of the output; candidates accepted, so KV
 * compaction runs on the device). */
Test(engine_device, cuda_medusa_greedy_equals_plain_greedy, .timeout = 180)
{
    kn_ctx *kn = cuda_ctx_or_skip();
    eng_model *host = open_model(S260), *m = open_model(S260);
    char dir[64], sub[96];
    snprintf(dir, sizeof(dir), "/tmp/gorgon-device-XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    snprintf(sub, sizeof(sub), "%s/random", dir);
    eng_medusa_heads *random_h = make_heads(host, false, sub);
    snprintf(sub, sizeof(sub), "%s/copy", dir);
    eng_medusa_heads *copy_h = make_heads(host, true, sub);
    cr_assert_eq(eng_model_to_device(m, kn), 0, "%s", eng_error());

    medusa_vs_plain(kn, m, random_h, "mc_sim_7b_63", ENG_MEDUSA_PROJ_HEADS, "Once upon a time");
    medusa_vs_plain(kn, m, random_h, "chain3", ENG_MEDUSA_PROJ_HEADS, "");
    int64_t acc = medusa_vs_plain(kn, m, copy_h, "mc_sim_7b_63", ENG_MEDUSA_PROJ_SHARED,
                                  "Lily and Tom");
    cr_assert_gt(acc, 0, "copy heads never got a candidate accepted: compaction untested");

    eng_medusa_heads_close(random_h);
    eng_medusa_heads_close(copy_h);
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    cr_expect_eq(system(cmd), 0);
    eng_model_close(m);
    eng_model_close(host);
    kn_ctx_destroy(kn);
}

/* ---- synthetic models and memory on the device --------------------------- */

/* The device's fill writes the CPU's values: F32 and F16 bit for bit, Q8_0
 * with the same scales and quants within one step (a tie x/d = k + 0.5
 * may round either way); the tiny model's logits then agree. */
Test(engine_device, cuda_synthetic_weights_equal_the_cpu_ones, .timeout = 120)
{
    kn_ctx *dk = cuda_ctx_or_skip();
    kn_ctx *ck = cpu_ctx();
    const eng_hparams hp = tiny();
    const int64_t V = hp.n_vocab;
    float *lc = malloc((size_t)(NTOK * V) * sizeof(float));
    float *ld = malloc((size_t)(NTOK * V) * sizeof(float));
    cr_assert(lc && ld);
    for (int d = 0; d < N_DTYPES; d++) {
        const enum kn_dtype t = DTYPES[d];
        eng_model *cm = synth(&hp, t, ck, 77), *dm = synth(&hp, t, dk, 77);
        const kn_tensor *pairs[][2] = {
            {eng_model_tok_embd(cm), eng_model_tok_embd(dm)},
            {eng_model_output(cm), eng_model_output(dm)},
            {&eng_model_layer(cm, 1)->w_down, &eng_model_layer(dm, 1)->w_down},
        };
        for (int k = 0; k < 3; k++) {
            const kn_tensor *a = pairs[k][0], *b = pairs[k][1];
            cr_assert(a->rows == b->rows && a->cols == b->cols && a->type == b->type);
            const size_t bytes = kn_row_bytes(a->type, a->cols) * (size_t)a->rows;
            char *ha = malloc(bytes), *hb = malloc(bytes);
            cr_assert(ha && hb);
            download(ck, ha, a->data, bytes);
            download(dk, hb, b->data, bytes);
            if (t != KN_Q8_0) {
                cr_assert_eq(memcmp(ha, hb, bytes), 0, "%s tensor %d: device fill differs",
                             kn_dtype_name(t), k);
            } else {
                /* ggml blocks of 34 bytes: f16 scale, 32 int8 quants */
                for (size_t blk = 0; blk < bytes / 34; blk++) {
                    const unsigned char *pa = (unsigned char *)ha + blk * 34,
                                        *pb = (unsigned char *)hb + blk * 34;
                    cr_assert_eq(memcmp(pa, pb, 2), 0, "q8_0 tensor %d block %zu: scales differ",
                                 k, blk);
                    for (int i = 2; i < 34; i++)
                        cr_assert_leq(abs((int)(signed char)pa[i] - (int)(signed char)pb[i]), 1,
                                      "q8_0 tensor %d block %zu quant %d: %d vs %d", k, blk, i - 2,
                                      (signed char)pa[i], (signed char)pb[i]);
                }
            }
            free(ha);
            free(hb);
        }
        tiny_logits(ck, cm, lc);
        tiny_logits(dk, dm, ld);
        for (int64_t p = 0; p < NTOK; p++) {
            float e = rel_diff(ld + p * V, lc + p * V, V);
            /* F32: LOGIT_TOL. F16: a tensor-core GEMM may round the
             * activations to F16 too (11 significant bits, ~5e-4 each): 1e-2.
             * Q8_0: as the CPU's int8 kernels against the scalar reference
             * (test_model.c), activations may be quantised to 8 bits, and a
             * quant may sit one step away (above): 2e-2. */
            const float tol = t == KN_F32 ? LOGIT_TOL : t == KN_F16 ? 1e-2f : 2e-2f;
            cr_assert_leq(e, tol,
                          "%s position %lld: device logits differ by %g of the row's scale",
                          kn_dtype_name(t), (long long)p, (double)e);
        }
        eng_model_close(cm);
        eng_model_close(dm);
    }
    free(lc);
    free(ld);
    kn_ctx_destroy(ck);
    kn_ctx_destroy(dk);
}

/* A shape whose F32 weights exceed the device's whole memory is refused
 * before anything is allocated: -ENOMEM, and a message that gives the
 * sizes in GiB and names the device. */
Test(engine_device, cuda_synthetic_larger_than_memory_is_refused, .timeout = 60)
{
    kn_ctx *kn = cuda_ctx_or_skip();
    size_t free0, total;
    cr_assert_eq(kn_ctx_mem_info(kn, &free0, &total), 0);
    cr_assert_gt(total, 0);
    /* a 70B-like layer: Wq, Wo 8192^2, Wk, Wv 1024x8192, 3 FFN 28672x8192 */
    const int64_t layer = 4 * (2 * 8192LL * 8192 + 2 * 1024LL * 8192 + 3 * 28672LL * 8192);
    const eng_hparams hp = {.n_vocab = 32000, .dim = 8192, .ffn_dim = 28672,
                            .n_layer = (int)((int64_t)total / layer + 1), .n_head = 64,
                            .n_kv_head = 8};
    cr_assert_gt((int64_t)hp.n_layer * layer, (int64_t)total);
    eng_model *m = (eng_model *)&m;
    eng_error_clear();
    int rc = eng_model_synthetic(&m, &hp, KN_F32, kn, 1);
    cr_assert_eq(rc, -ENOMEM, "%d layers of %.2f GiB on %.2f GiB: got %d (%s)", hp.n_layer,
                 (double)layer / (1 << 30), (double)total / (1 << 30), rc, eng_error());
    cr_assert_null(m);
    cr_assert(strstr(eng_error(), "GiB"), "message: %s", eng_error());
    cr_assert(strstr(eng_error(), kn_ctx_device(kn)), "message does not name %s: %s",
              kn_ctx_device(kn), eng_error());
    size_t free1;
    cr_assert_eq(kn_ctx_mem_info(kn, &free1, &total), 0);
    cr_assert_geq(free1 + (64u << 20), free0,
                  "free memory fell from %zu to %zu bytes: something stayed allocated", free0,
                  free1);
    /* and the ctx still works */
    eng_model *s = synth_tiny(KN_F32, kn, 1);
    eng_model_close(s);
    cr_assert_str_eq(kn_ctx_error(kn), "");
    kn_ctx_destroy(kn);
}

/* A device ctx runs only a model placed on it: not one left on the host,
 * not one placed on another ctx. */
Test(engine_device, cuda_ctx_refuses_a_model_not_on_it, .timeout = 60)
{
    kn_ctx *kn = cuda_ctx_or_skip();
    eng_model *m = open_model(S260);
    eng_ctx *c = (eng_ctx *)&c;
    eng_error_clear();
    cr_assert_eq(eng_ctx_create(&c, m, &(eng_ctx_cfg){.kn = kn, .max_tokens = 16}), -EINVAL);
    cr_assert(strstr(eng_error(), "eng_model_to_device"), "message: %s", eng_error());
    cr_assert(strstr(eng_error(), kn_ctx_device(kn)), "message: %s", eng_error());

    kn_ctx *kn2;
    cr_assert_eq(kn_ctx_create(&kn2, &(kn_ctx_cfg){.device = "cuda:0"}), 0);
    cr_assert_eq(eng_model_to_device(m, kn), 0, "%s", eng_error());
    cr_assert_eq(eng_ctx_create(&c, m, &(eng_ctx_cfg){.kn = kn2, .max_tokens = 16}), -EINVAL,
                 "a model on one ctx run from another");
    cr_assert_eq(eng_model_to_device(m, kn2), -EINVAL, "placed twice");
    cr_assert(strstr(eng_error(), "another device"), "message: %s", eng_error());
    cr_assert_eq(eng_ctx_create(&c, m, &(eng_ctx_cfg){.kn = kn, .max_tokens = 16}), 0, "%s",
                 eng_error());
    eng_ctx_destroy(c);

    /* a synthetic model made on a CPU ctx cannot move to the device */
    kn_ctx *ck = cpu_ctx();
    eng_model *s = synth_tiny(KN_F32, ck, 1);
    cr_assert_eq(eng_model_to_device(s, kn), -EINVAL);
    cr_assert_eq(eng_ctx_create(&c, s, &(eng_ctx_cfg){.kn = kn, .max_tokens = 16}), -EINVAL);
    eng_model_close(s);
    kn_ctx_destroy(ck);

    eng_model_close(m);
    kn_ctx_destroy(kn2);
    kn_ctx_destroy(kn);
}

/* The converse: a CPU ctx would read device addresses as host memory; a
 * model whose weights are on a device must be refused there too. */
Test(engine_device, cpu_ctx_refuses_a_model_on_a_device, .timeout = 60)
{
    kn_ctx *dk = cuda_ctx_or_skip();
    kn_ctx *ck = cpu_ctx();
    eng_model *m = open_model(S260);
    cr_assert_eq(eng_model_to_device(m, dk), 0, "%s", eng_error());
    eng_ctx *c = NULL;
    int rc = eng_ctx_create(&c, m, &(eng_ctx_cfg){.kn = ck, .max_tokens = 16});
    eng_ctx_destroy(c); /* (not run: its forward would read device memory) */
    cr_assert_eq(rc, -EINVAL, "a CPU ctx accepted a model whose weights are on %s",
                 kn_ctx_device(dk));

    eng_model *s = synth_tiny(KN_F32, dk, 1);
    c = NULL;
    rc = eng_ctx_create(&c, s, &(eng_ctx_cfg){.kn = ck, .max_tokens = 16});
    eng_ctx_destroy(c);
    cr_assert_eq(rc, -EINVAL, "a CPU ctx accepted a synthetic model made on %s",
                 kn_ctx_device(dk));
    eng_model_close(s);
    eng_model_close(m);
    kn_ctx_destroy(ck);
    kn_ctx_destroy(dk);
}
