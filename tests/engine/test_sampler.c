/* Sampler: greedy, seeded sampling, top-k/top-p/min-p, repetition penalty,
 * stop conditions. */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <string.h>

#include "engine/model/eng_err.h"
#include "engine/model/stop.h"
#include "engine/sampler.h"

#define V 16

static eng_sampler *make_n(eng_sampler_cfg cfg, int64_t n_vocab)
{
    eng_sampler *s = NULL;
    cr_assert_eq(eng_sampler_create(&s, &cfg, n_vocab), 0, "%s", eng_error());
    return s;
}

static eng_sampler *make(eng_sampler_cfg cfg)
{
    return make_n(cfg, V);
}

/* logits with probabilities roughly 0.5, 0.25, 0.125, ... for ids 3, 7, 1, ... */
static void crafted(float *l)
{
    static const int order[V] = {3, 7, 1, 12, 0, 5, 9, 14, 2, 4, 6, 8, 10, 11, 13, 15};
    for (int i = 0; i < V; i++)
        l[order[i]] = -0.6931472f * (float)i;
}

static int32_t draw(eng_sampler *s)
{
    float l[V];
    crafted(l);
    return eng_sampler_sample(s, l);
}

Test(engine_sampler, greedy_is_argmax)
{
    eng_sampler *s = make((eng_sampler_cfg){.temperature = 0});
    float l[V];
    for (int trial = 0; trial < 50; trial++) {
        for (int i = 0; i < V; i++)
            l[i] = sinf((float)(i * 7 + trial * 13));
        int best = 0;
        for (int i = 1; i < V; i++)
            if (l[i] > l[best])
                best = i;
        cr_assert_eq(eng_sampler_sample(s, l), best);
    }
    float ties[V] = {0};
    ties[4] = ties[9] = 1.0f;
    cr_assert_eq(eng_argmax(ties, V), 4, "ties go to the lowest id");
    eng_sampler_destroy(s);
}

/* is_greedy says exactly when sampling is the plain argmax (so a worker may
 * take the backend's argmax instead of fetching the row). */
Test(engine_sampler, is_greedy_only_without_temperature_or_penalty)
{
    struct {
        eng_sampler_cfg cfg;
        bool greedy;
    } cases[] = {
        {{.temperature = 0.0f}, true},
        {{.temperature = 0.8f, .top_k = 1}, true},
        {{.temperature = 0.0f, .repeat_penalty = 1.0f}, true},
        {{.temperature = 0.8f}, false},
        {{.temperature = 0.0f, .repeat_penalty = 1.3f}, false},
        {{.temperature = 0.8f, .top_k = 1, .repeat_penalty = 1.1f}, false},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        eng_sampler *s;
        cr_assert_eq(eng_sampler_create(&s, &cases[i].cfg, 16), 0, "%s", eng_error());
        cr_assert_eq(eng_sampler_is_greedy(s), cases[i].greedy, "case %zu", i);
        eng_sampler_destroy(s);
    }
    cr_assert(eng_sampler_is_greedy(NULL), "no sampler: greedy");
}

Test(engine_sampler, same_seed_same_sequence)
{
    eng_sampler_cfg cfg = {.temperature = 1.0f, .seed = 1234};
    eng_sampler *a = make(cfg), *b = make(cfg);
    cfg.seed = 1235;
    eng_sampler *c = make(cfg);
    int32_t sa[200], sb[200], sc[200];
    for (int i = 0; i < 200; i++) {
        sa[i] = draw(a);
        sb[i] = draw(b);
        sc[i] = draw(c);
    }
    cr_assert_eq(memcmp(sa, sb, sizeof(sa)), 0);
    cr_assert_neq(memcmp(sa, sc, sizeof(sa)), 0, "a different seed gives different draws");
    eng_sampler_reset(a, 1234);
    for (int i = 0; i < 200; i++)
        cr_assert_eq(draw(a), sa[i], "reset restarts the sequence");
    eng_sampler_destroy(a);
    eng_sampler_destroy(b);
    eng_sampler_destroy(c);
}

/* A hand-off: a second sampler given the first one's RNG state continues
 * its draws exactly. */
Test(engine_sampler, rng_state_continues_in_another_sampler)
{
    eng_sampler_cfg cfg = {.temperature = 1.0f, .seed = 77};
    eng_sampler *a = make(cfg);
    cfg.seed = 78;
    eng_sampler *b = make(cfg);
    for (int i = 0; i < 13; i++)
        (void)draw(a);
    uint64_t st[4];
    eng_sampler_rng_get(a, st);
    eng_sampler_rng_set(b, st);
    for (int i = 0; i < 100; i++)
        cr_assert_eq(draw(b), draw(a), "draw %d after the hand-off", i);
    eng_sampler_destroy(a);
    eng_sampler_destroy(b);
}

Test(engine_sampler, top_k_1_equals_greedy)
{
    eng_sampler *s = make((eng_sampler_cfg){.temperature = 5.0f, .top_k = 1, .seed = 9});
    for (int i = 0; i < 100; i++)
        cr_assert_eq(draw(s), 3);
    eng_sampler_destroy(s);
}

/* Frequencies of 10000 draws. */
static void histogram(eng_sampler *s, int *h)
{
    memset(h, 0, V * sizeof(int));
    for (int i = 0; i < 10000; i++) {
        int32_t t = draw(s);
        cr_assert(t >= 0 && t < V);
        h[t]++;
    }
}

Test(engine_sampler, temperature_follows_the_distribution)
{
    eng_sampler *s = make((eng_sampler_cfg){.temperature = 1.0f, .seed = 5});
    int h[V];
    histogram(s, h);
    /* p(3) ~ 0.5, p(7) ~ 0.25, p(1) ~ 0.125; 10k draws: sd < 0.005 */
    cr_assert(fabs(h[3] / 1e4 - 0.5) < 0.03, "p(3) = %g", h[3] / 1e4);
    cr_assert(fabs(h[7] / 1e4 - 0.25) < 0.03, "p(7) = %g", h[7] / 1e4);
    cr_assert(fabs(h[1] / 1e4 - 0.125) < 0.02, "p(1) = %g", h[1] / 1e4);
    eng_sampler_destroy(s);
}

Test(engine_sampler, top_p_excludes_the_tail)
{
    /* cumulative: 0.5, 0.75, 0.875, 0.9375 -> p = 0.8 keeps {3, 7, 1} */
    eng_sampler *s = make((eng_sampler_cfg){.temperature = 1.0f, .top_p = 0.8f, .seed = 77});
    int h[V];
    histogram(s, h);
    for (int i = 0; i < V; i++)
        if (i != 3 && i != 7 && i != 1)
            cr_assert_eq(h[i], 0, "token %d outside the nucleus drawn %d times", i, h[i]);
    cr_assert(h[1] > 500, "the last nucleus token is still drawn (%d)", h[1]);
    /* renormalised: 0.5/0.875 */
    cr_assert(fabs(h[3] / 1e4 - 0.5714) < 0.03, "p(3) = %g", h[3] / 1e4);
    eng_sampler_destroy(s);
}

Test(engine_sampler, top_k_keeps_k_most_likely)
{
    eng_sampler *s = make((eng_sampler_cfg){.temperature = 1.0f, .top_k = 2, .seed = 3});
    int h[V];
    histogram(s, h);
    cr_assert_eq(h[3] + h[7], 10000);
    cr_assert(fabs(h[3] / 1e4 - 0.6667) < 0.03, "p(3) = %g", h[3] / 1e4);
    eng_sampler_destroy(s);
}

Test(engine_sampler, min_p_drops_unlikely_tokens)
{
    /* min_p 0.2: threshold 0.1 keeps 0.5, 0.25, 0.125 */
    eng_sampler *s = make((eng_sampler_cfg){.temperature = 1.0f, .min_p = 0.2f, .seed = 11});
    int h[V];
    histogram(s, h);
    cr_assert_eq(h[3] + h[7] + h[1], 10000);
    cr_assert(h[1] > 800);
    eng_sampler_destroy(s);
    s = make((eng_sampler_cfg){.temperature = 1.0f, .min_p = 0.6f, .seed = 11});
    histogram(s, h);
    cr_assert_eq(h[3], 10000, "only the top token is within 0.6 of the max");
    eng_sampler_destroy(s);
}

Test(engine_sampler, repetition_penalty_changes_argmax)
{
    eng_sampler *s = make((eng_sampler_cfg){.temperature = 0, .repeat_penalty = 2.0f,
                                            .repeat_last_n = 4});
    float l[V] = {0};
    l[5] = 3.0f;  /* repeated: 3 / 2 = 1.5 */
    l[6] = 2.0f;  /* fresh: wins */
    l[8] = -1.0f; /* repeated negative: * 2 -> -2 */
    eng_sampler_accept(s, 5);
    eng_sampler_accept(s, 5); /* counted once (llama.cpp) */
    eng_sampler_accept(s, 8);
    cr_assert_eq(eng_sampler_sample(s, l), 6);
    cr_assert_float_eq(l[5], 1.5f, 1e-6, "penalised once, not twice");
    cr_assert_float_eq(l[8], -2.0f, 1e-6);
    /* the window forgets: four more tokens push 5 and 8 out */
    for (int i = 0; i < 4; i++)
        eng_sampler_accept(s, 10);
    float l2[V] = {0};
    l2[5] = 3.0f;
    l2[6] = 2.0f;
    cr_assert_eq(eng_sampler_sample(s, l2), 5);
    eng_sampler_destroy(s);
}

Test(engine_sampler, llama2c_rng_matches_reference_values)
{
    /* llama2.c random_u32 with state 133742, computed by hand from its code */
    eng_rng_state r;
    eng_rng_seed(&r, ENG_RNG_LLAMA2C, 133742);
    uint64_t st = 133742;
    for (int i = 0; i < 10; i++) {
        st ^= st >> 12;
        st ^= st << 25;
        st ^= st >> 27;
        uint32_t want = (uint32_t)((st * 0x2545F4914F6CDD1Dull) >> 32);
        cr_assert_eq(eng_rng_u32(&r), want);
    }
    eng_rng_seed(&r, ENG_RNG_XOSHIRO, 1);
    for (int i = 0; i < 1000; i++) {
        float f = eng_rng_f32(&r);
        cr_assert(f >= 0.0f && f < 1.0f);
    }
}

/* Sampling from the top-k candidates alone (what tensor-parallel ranks
 * merge) is sampling the whole row: the same tokens, draw after draw, for
 * rows with ties and for every tail filter; and only samplers whose choice
 * depends on the top-k alone say they can. */
Test(engine_sampler, sampling_the_topk_alone_equals_sampling_the_row)
{
    enum { NV = 300, DRAWS = 400 };
    const eng_sampler_cfg cfgs[] = {
        {.temperature = 1.0f, .top_k = 40, .seed = 1},
        {.temperature = 0.7f, .top_k = 5, .top_p = 0.9f, .seed = 2},
        {.temperature = 1.3f, .top_k = 64, .min_p = 0.05f, .seed = 3},
        {.temperature = 0.9f, .top_k = 299, .top_p = 0.5f, .min_p = 0.01f, .seed = 4},
    };
    static float row[NV], scaled[NV], scratch[NV];
    static eng_cand top[NV];
    uint64_t lcg = 99;
    for (size_t c = 0; c < sizeof cfgs / sizeof cfgs[0]; c++) {
        eng_sampler *whole = make_n(cfgs[c], NV), *cands = make_n(cfgs[c], NV);
        cr_assert_eq(eng_sampler_topk(cands), cfgs[c].top_k);
        for (int d = 0; d < DRAWS; d++) {
            for (int i = 0; i < NV; i++) {
                lcg = lcg * 6364136223846793005ull + 1442695040888963407ull;
                /* few distinct values: many ties, at the k boundary too */
                row[i] = (float)((lcg >> 33) % 23) * 0.37f - 3.0f;
            }
            memcpy(scratch, row, sizeof row);
            memcpy(scaled, row, sizeof row);
            if (cfgs[c].temperature != 1.0f)
                for (int i = 0; i < NV; i++)
                    scaled[i] /= cfgs[c].temperature;
            eng_topk_select(scaled, NV, cfgs[c].top_k, top);
            for (int j = 1; j < cfgs[c].top_k; j++)
                cr_assert(top[j - 1].p > top[j].p ||
                          (top[j - 1].p == top[j].p && top[j - 1].id < top[j].id));
            int32_t a = eng_sampler_sample(whole, scratch);
            int32_t b = eng_sampler_sample_topk(cands, top, cfgs[c].top_k);
            cr_assert_eq(a, b, "config %zu draw %d: the row gives %d, the top-k %d", c, d, a, b);
            eng_sampler_accept(whole, a);
            eng_sampler_accept(cands, b);
        }
        eng_sampler_destroy(whole);
        eng_sampler_destroy(cands);
    }
    /* these need more than the top-k: greedy, a penalty, top-k off or too big */
    const eng_sampler_cfg not_topk[] = {
        {.temperature = 0.0f, .top_k = 40},
        {.temperature = 1.0f, .top_k = 1},
        {.temperature = 1.0f, .top_k = 40, .repeat_penalty = 1.1f},
        {.temperature = 1.0f, .top_p = 0.9f},
        {.temperature = 1.0f, .top_k = NV},
    };
    for (size_t c = 0; c < sizeof not_topk / sizeof not_topk[0]; c++) {
        eng_sampler *s = make_n(not_topk[c], NV);
        cr_assert_eq(eng_sampler_topk(s), 0, "config %zu", c);
        eng_sampler_destroy(s);
    }
}

Test(engine_sampler, rejects_bad_settings)
{
    eng_sampler *s = NULL;
    cr_assert_eq(eng_sampler_create(&s, &(eng_sampler_cfg){.min_p = 2.0f}, V), -EINVAL);
    cr_assert_eq(eng_sampler_create(&s, &(eng_sampler_cfg){.temperature = NAN}, V), -EINVAL);
    cr_assert_eq(eng_sampler_create(&s, &(eng_sampler_cfg){0}, 0), -EINVAL);
    cr_assert_null(s);
}

/* ---- stop conditions ---- */

static int feed(eng_stop *st, int32_t tok, const char *piece, char *acc, size_t *n_acc)
{
    char out[256];
    size_t n = 0;
    int r = eng_stop_feed(st, tok, piece, strlen(piece), out, sizeof(out), &n);
    memcpy(acc + *n_acc, out, n);
    *n_acc += n;
    acc[*n_acc] = 0;
    return r;
}

Test(engine_stop, stop_string_across_token_boundary)
{
    const char *stops[] = {"\nUser:"};
    eng_stop st;
    cr_assert_eq(eng_stop_init(&st, &(eng_stop_cfg){.stop = stops, .n_stop = 1}), 0);
    char acc[256];
    size_t n = 0;
    cr_assert_eq(feed(&st, 10, "Hello", acc, &n), ENG_FINISH_NONE);
    cr_assert_eq(feed(&st, 11, " there\nU", acc, &n), ENG_FINISH_NONE);
    cr_assert_str_eq(acc, "Hello there", "a possible stop prefix is held back");
    cr_assert_eq(feed(&st, 12, "se", acc, &n), ENG_FINISH_NONE);
    cr_assert_eq(feed(&st, 13, "r: hi", acc, &n), ENG_FINISH_STOP);
    cr_assert_str_eq(acc, "Hello there", "the stop string and what follows are not output");
    cr_assert_eq(feed(&st, 14, "more", acc, &n), ENG_FINISH_STOP, "finish is sticky");
}

Test(engine_stop, false_prefix_is_released)
{
    const char *stops[] = {"END"};
    eng_stop st;
    cr_assert_eq(eng_stop_init(&st, &(eng_stop_cfg){.stop = stops, .n_stop = 1}), 0);
    char acc[256];
    size_t n = 0;
    cr_assert_eq(feed(&st, 1, "the EN", acc, &n), ENG_FINISH_NONE);
    cr_assert_str_eq(acc, "the ");
    cr_assert_eq(feed(&st, 2, "D", acc, &n), ENG_FINISH_STOP);
    cr_assert_str_eq(acc, "the ");
    cr_assert_eq(eng_stop_init(&st, &(eng_stop_cfg){.stop = stops, .n_stop = 1}), 0);
    n = 0;
    acc[0] = 0;
    cr_assert_eq(feed(&st, 1, "E", acc, &n), ENG_FINISH_NONE);
    cr_assert_eq(feed(&st, 1, "Nx", acc, &n), ENG_FINISH_NONE);
    cr_assert_str_eq(acc, "ENx");
}

Test(engine_stop, eos_and_max_tokens)
{
    int32_t eos[] = {2};
    eng_stop st;
    cr_assert_eq(eng_stop_init(&st, &(eng_stop_cfg){.eos = eos, .n_eos = 1, .max_tokens = 3}),
                 0);
    char acc[256];
    size_t n = 0;
    cr_assert_eq(feed(&st, 5, "a", acc, &n), ENG_FINISH_NONE);
    cr_assert_eq(feed(&st, 2, "", acc, &n), ENG_FINISH_EOS);
    cr_assert_eq(eng_stop_init(&st, &(eng_stop_cfg){.eos = eos, .n_eos = 1, .max_tokens = 3}),
                 0);
    cr_assert_eq(feed(&st, 5, "a", acc, &n), ENG_FINISH_NONE);
    cr_assert_eq(feed(&st, 5, "b", acc, &n), ENG_FINISH_NONE);
    cr_assert_eq(feed(&st, 5, "c", acc, &n), ENG_FINISH_LENGTH);
    cr_assert_str_eq(acc, "aabc");
    const char *bad[] = {""};
    cr_assert_eq(eng_stop_init(&st, &(eng_stop_cfg){.stop = bad, .n_stop = 1}), -EINVAL);
}
