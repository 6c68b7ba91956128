/* Golden outputs: greedy (and llama2.c-seeded) generation from the real test
 * models must reproduce the reference text byte for byte. */
#include <criterion/criterion.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/engine.h"
#include "tests/engine/util/eng_test.h"
#include "tests/util/test_models.h"

/* Generate like gorgon-run (which prints a final newline, as llama2.c). */
static void generate(const char *model, enum kn_variant variant, int threads, const char *prompt,
                     int steps, eng_sampler *smp, et_text *out)
{
    kn_ctx *kn;
    /* more than one thread: fan every op out (this model's ops are all below
     * the default threshold), so that the parallel paths are what is checked */
    cr_assert_eq(kn_ctx_create(&kn, &(kn_ctx_cfg){.n_threads = threads,
                                                  .variant = variant,
                                                  .fanout_min_bytes = threads > 1 ? -1 : 0}),
                 0);
    eng_model *m;
    cr_assert_eq(eng_model_open(&m, tu_model_path(model)), 0, "%s", eng_error());
    const eng_tok *tok = eng_model_tokenizer(m);
    cr_assert_not_null(tok);
    int32_t ids[256];
    int64_t n = eng_tok_encode(tok, prompt, strlen(prompt), true, ids, 256);
    cr_assert_geq(n, 1);
    eng_ctx *c;
    cr_assert_eq(eng_ctx_create(&c, m, &(eng_ctx_cfg){.kn = kn, .max_tokens = 64}), 0);
    eng_kv_cfg kc;
    eng_model_kv_cfg(m, 16, 64, 1, 1024, &kc);
    eng_kv *kv;
    cr_assert_eq(eng_kv_create(&kv, kn, &kc), 0);
    int seq = eng_kv_seq_alloc(kv);
    out->n = 0;
    eng_gen_result r;
    cr_assert_eq(eng_generate(c, kv, seq,
                              &(eng_gen_cfg){.prompt = ids, .n_prompt = n, .steps = steps,
                                             .sampler = smp, .on_token = et_collect, .arg = out},
                              &r),
                 0, "%s", eng_error());
    et_collect(out, -1, "\n", 1);
    eng_kv_destroy(kv);
    eng_ctx_destroy(c);
    eng_model_close(m);
    kn_ctx_destroy(kn);
}

#define S260 "stories260K/stories260K.gguf"

Test(engine_golden, stories260k_greedy_n200_from_bos, .timeout = 60)
{
    static et_text t;
    generate(S260, KN_VARIANT_AUTO, 1, "", 200, NULL, &t);
    et_expect_golden("stories260K/golden_greedy_n200.txt", &t);
}

/* The golden text from every kernel variant; one this CPU cannot run is
 * reported as skipped, not passed. */
static void golden_n256_on(enum kn_variant v)
{
    if (!kn_variant_supported(v))
        cr_skip_test("%s: not supported by this CPU", kn_variant_name(v));
    static et_text t;
    generate(S260, v, 1, "", 256, NULL, &t);
    et_expect_golden("stories260K/golden_greedy_n256.txt", &t);
}

Test(engine_golden, stories260k_greedy_n256_scalar, .timeout = 120)
{
    golden_n256_on(KN_VARIANT_SCALAR);
}

Test(engine_golden, stories260k_greedy_n256_avx2, .timeout = 120)
{
    golden_n256_on(KN_VARIANT_AVX2);
}

Test(engine_golden, stories260k_greedy_n256_avx512, .timeout = 120)
{
    golden_n256_on(KN_VARIANT_AVX512);
}

/* Fewer steps than the others: a 2-thread pool on a loaded 2-core machine
 * pays a scheduler round trip per op. */
Test(engine_golden, stories260k_greedy_prompt_two_threads, .timeout = 120)
{
    static et_text t;
    generate(S260, KN_VARIANT_AUTO, 2, "Lily and Tom", 64, NULL, &t);
    et_expect_golden("stories260K/golden_greedy_prompt_LilyAndTom_n64.txt", &t);
}

Test(engine_golden, stories260k_greedy_prompt_lily_and_tom_n64, .timeout = 60)
{
    static et_text t;
    generate(S260, KN_VARIANT_AUTO, 1, "Lily and Tom", 64, NULL, &t);
    et_expect_golden("stories260K/golden_greedy_prompt_LilyAndTom_n64.txt", &t);
}

Test(engine_golden, babyllama_greedy_n256_from_bos, .timeout = 60)
{
    static et_text t;
    generate("babyllama-tok105/babyllama-tok105.gguf", KN_VARIANT_AUTO, 1, "", 256, NULL, &t);
    et_expect_golden("babyllama-tok105/golden_greedy_n256.txt", &t);
}

Test(engine_golden, stories260k_llama2c_rng_t1_p09_seed133742, .timeout = 60)
{
    /* llama2.c's xorshift RNG and top-p path reproduce its sampled output */
    static et_text t;
    eng_sampler *s;
    cr_assert_eq(eng_sampler_create(&s,
                                    &(eng_sampler_cfg){.temperature = 1.0f, .top_p = 0.9f,
                                                       .seed = 133742, .rng = ENG_RNG_LLAMA2C},
                                    512),
                 0);
    generate(S260, KN_VARIANT_SCALAR, 1, "", 256, s, &t);
    et_expect_golden("stories260K/golden_t1.0_p0.9_s133742.txt", &t);
    eng_sampler_destroy(s);
}
