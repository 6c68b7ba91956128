#include "engine/sampler.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_assert.h"
#include "engine/model/eng_err.h"

/* ---- RNG ---------------------------------------------------------------- */

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

void eng_rng_seed(eng_rng_state *r, enum eng_rng kind, uint64_t seed)
{
    r->kind = kind;
    if (kind == ENG_RNG_LLAMA2C) {
        r->s[0] = seed;
        r->s[1] = r->s[2] = r->s[3] = 0;
        return;
    }
    uint64_t x = seed;
    for (int i = 0; i < 4; i++)
        r->s[i] = splitmix64(&x);
}

uint32_t eng_rng_u32(eng_rng_state *r)
{
    if (r->kind == ENG_RNG_LLAMA2C) {
        /* llama2.c random_u32(): xorshift64* */
        uint64_t *st = &r->s[0];
        *st ^= *st >> 12;
        *st ^= *st << 25;
        *st ^= *st >> 27;
        return (uint32_t)((*st * 0x2545F4914F6CDD1Dull) >> 32);
    }
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return (uint32_t)(result >> 32);
}

float eng_rng_f32(eng_rng_state *r)
{
    /* 24 random bits: every value is exact in a float and < 1. */
    return (float)(eng_rng_u32(r) >> 8) / 16777216.0f;
}

/* ---- sampler ------------------------------------------------------------ */

typedef eng_cand cand; /* .p: logit, then probability */

struct eng_sampler {
    eng_sampler_cfg cfg;
    int64_t n_vocab;
    eng_rng_state rng;
    int32_t *window; /* ring of the last repeat_last_n accepted tokens */
    int n_window, window_pos;
    uint32_t *stamp; /* [n_vocab] generation marks: penalise each token once */
    uint32_t gen;
    cand *cands; /* [n_vocab] */
};

int eng_sampler_create(eng_sampler **out, const eng_sampler_cfg *cfg, int64_t n_vocab)
{
    *out = NULL;
    if (n_vocab <= 0 || n_vocab > INT32_MAX)
        return eng_fail(-EINVAL, "sampler: bad vocabulary size %lld", (long long)n_vocab);
    if (!(cfg->temperature == cfg->temperature) || !(cfg->top_p == cfg->top_p) ||
        !(cfg->min_p == cfg->min_p) || !(cfg->repeat_penalty == cfg->repeat_penalty))
        return eng_fail(-EINVAL, "sampler: NaN setting");
    if (cfg->min_p > 1.0f)
        return eng_fail(-EINVAL, "sampler: min_p %g is above 1", (double)cfg->min_p);
    if (cfg->repeat_last_n < 0)
        return eng_fail(-EINVAL, "sampler: negative repeat_last_n %d", cfg->repeat_last_n);
    eng_sampler *s = calloc(1, sizeof(*s));
    if (!s)
        return -ENOMEM;
    s->cfg = *cfg;
    if (s->cfg.repeat_last_n == 0)
        s->cfg.repeat_last_n = 64;
    s->n_vocab = n_vocab;
    s->window = malloc((size_t)s->cfg.repeat_last_n * sizeof(int32_t));
    s->stamp = calloc((size_t)n_vocab, sizeof(uint32_t));
    s->cands = malloc((size_t)n_vocab * sizeof(cand));
    if (!s->window || !s->stamp || !s->cands) {
        eng_sampler_destroy(s);
        return -ENOMEM;
    }
    eng_sampler_reset(s, cfg->seed);
    *out = s;
    return 0;
}

void eng_sampler_destroy(eng_sampler *s)
{
    if (!s)
        return;
    free(s->window);
    free(s->stamp);
    free(s->cands);
    free(s);
}

void eng_sampler_reset(eng_sampler *s, uint64_t seed)
{
    s->n_window = 0;
    s->window_pos = 0;
    eng_rng_seed(&s->rng, s->cfg.rng, seed);
}

void eng_sampler_accept(eng_sampler *s, int32_t token)
{
    if (token < 0 || token >= s->n_vocab)
        return;
    s->window[s->window_pos] = token;
    s->window_pos = (s->window_pos + 1) % s->cfg.repeat_last_n;
    if (s->n_window < s->cfg.repeat_last_n)
        s->n_window++;
}

int32_t eng_argmax(const float *x, int64_t n)
{
    int64_t best = 0;
    float v = x[0];
    for (int64_t i = 1; i < n; i++)
        if (x[i] > v) {
            v = x[i];
            best = i;
        }
    return (int32_t)best;
}

static void apply_penalty(eng_sampler *s, float *logits)
{
    float pen = s->cfg.repeat_penalty;
    if (pen <= 0.0f || pen == 1.0f || s->n_window == 0)
        return;
    if (++s->gen == 0) { /* wrapped: old marks could collide with new ones */
        memset(s->stamp, 0, (size_t)s->n_vocab * sizeof(uint32_t));
        s->gen = 1;
    }
    for (int i = 0; i < s->n_window; i++) {
        int32_t t = s->window[i];
        if (s->stamp[t] == s->gen)
            continue;
        s->stamp[t] = s->gen;
        logits[t] = logits[t] > 0.0f ? logits[t] / pen : logits[t] * pen;
    }
}

/* Min-heap on p of the k best candidates seen so far. */
static void heap_sift_down(cand *h, int64_t n, int64_t i)
{
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && h[l].p < h[m].p)
            m = l;
        if (r < n && h[r].p < h[m].p)
            m = r;
        if (m == i)
            return;
        cand t = h[i];
        h[i] = h[m];
        h[m] = t;
        i = m;
    }
}

/* The k largest logits into c[0..k) in descending order (ties: lower id
 * first, so that the result does not depend on heap order). */
void eng_topk_select(const float *logits, int64_t n, int64_t k, eng_cand *c)
{
    for (int64_t i = 0; i < k; i++)
        c[i] = (cand){logits[i], (int32_t)i};
    for (int64_t i = k / 2; i-- > 0;)
        heap_sift_down(c, k, i);
    for (int64_t i = k; i < n; i++) {
        if (logits[i] > c[0].p) {
            c[0] = (cand){logits[i], (int32_t)i};
            heap_sift_down(c, k, 0);
        }
    }
    /* heap sort: repeatedly move the minimum to the end -> descending */
    for (int64_t m = k; m > 1; m--) {
        cand t = c[0];
        c[0] = c[m - 1];
        c[m - 1] = t;
        heap_sift_down(c, m - 1, 0);
    }
    /* equal logits may come out in any id order; make it canonical */
    for (int64_t i = 1; i < k; i++) {
        cand t = c[i];
        int64_t j = i;
        while (j > 0 && c[j - 1].p == t.p && c[j - 1].id > t.id) {
            c[j] = c[j - 1];
            j--;
        }
        c[j] = t;
    }
}

/* llama2.c's compare(): descending probability. */
static int cand_cmp_desc(const void *a, const void *b)
{
    const cand *x = a, *y = b;
    if (x->p > y->p)
        return -1;
    if (x->p < y->p)
        return 1;
    return 0;
}

bool eng_sampler_is_greedy(const eng_sampler *s)
{
    if (!s)
        return true;
    const eng_sampler_cfg *c = &s->cfg;
    const bool penalty = c->repeat_penalty > 0.0f && c->repeat_penalty != 1.0f;
    return (c->temperature <= 0.0f || c->top_k == 1) && !penalty;
}

static int32_t sample_cands(eng_sampler *s, cand *cd, int64_t nc, bool full);

int32_t eng_sampler_sample(eng_sampler *s, float *logits)
{
    const eng_sampler_cfg *c = &s->cfg;
    int64_t n = s->n_vocab;
    apply_penalty(s, logits);
    if (c->temperature <= 0.0f || c->top_k == 1)
        return eng_argmax(logits, n);

    if (c->temperature != 1.0f)
        for (int64_t i = 0; i < n; i++)
            logits[i] /= c->temperature;

    cand *cd = s->cands;
    if (c->top_k > 0 && c->top_k < n) {
        eng_topk_select(logits, n, c->top_k, cd);
        return sample_cands(s, cd, c->top_k, false);
    }
    for (int64_t i = 0; i < n; i++)
        cd[i] = (cand){logits[i], (int32_t)i};
    return sample_cands(s, cd, n, true);
}

int eng_sampler_topk(const eng_sampler *s)
{
    if (!s)
        return 0;
    const eng_sampler_cfg *c = &s->cfg;
    const bool penalty = c->repeat_penalty > 0.0f && c->repeat_penalty != 1.0f;
    return c->temperature > 0.0f && c->top_k > 1 && c->top_k < s->n_vocab && !penalty
               ? c->top_k
               : 0;
}

float eng_sampler_temperature(const eng_sampler *s)
{
    return s ? s->cfg.temperature : 0.0f;
}

int32_t eng_sampler_sample_topk(eng_sampler *s, const eng_cand *top, int64_t k)
{
    CM_ASSERT(k == eng_sampler_topk(s));
    memcpy(s->cands, top, (size_t)k * sizeof(cand));
    return sample_cands(s, s->cands, k, false);
}

/* Steps 5 to 8 over the candidates cd[0..nc): the whole vocabulary in id
 * order (full), or the top-k in descending order. */
static int32_t sample_cands(eng_sampler *s, cand *cd, int64_t nc, bool full)
{
    const eng_sampler_cfg *c = &s->cfg;
    /* softmax exactly as llama2.c does it (max, exp, sum, divide) */
    float mx = cd[0].p;
    for (int64_t i = 1; i < nc; i++)
        if (cd[i].p > mx)
            mx = cd[i].p;
    float sum = 0.0f;
    for (int64_t i = 0; i < nc; i++) {
        cd[i].p = expf(cd[i].p - mx);
        sum += cd[i].p;
    }
    float pmax = 0.0f;
    for (int64_t i = 0; i < nc; i++) {
        cd[i].p /= sum;
        if (cd[i].p > pmax)
            pmax = cd[i].p;
    }

    if (c->min_p > 0.0f) {
        float thr = c->min_p * pmax;
        int64_t k = 0;
        for (int64_t i = 0; i < nc; i++)
            if (cd[i].p >= thr)
                cd[k++] = cd[i];
        if (k < nc)
            full = false;
        nc = k;
    }

    float coin = eng_rng_f32(&s->rng);
    float r;
    if (c->top_p > 0.0f && c->top_p < 1.0f) {
        if (full && nc > 1) {
            /* llama2.c: values below the cutoff cannot be in the nucleus
             * (they sum to less than 1 - top_p), so do not sort them. */
            float cutoff = (1.0f - c->top_p) / (float)(nc - 1);
            int64_t k = 0;
            for (int64_t i = 0; i < nc; i++)
                if (cd[i].p >= cutoff)
                    cd[k++] = cd[i];
            if (k > 0) /* nothing written when k == 0: keep everything */
                nc = k;
        }
        if (full || c->min_p > 0.0f) /* top-k output is already sorted */
            qsort(cd, (size_t)nc, sizeof(cand), cand_cmp_desc);
        float cum = 0.0f;
        int64_t last = nc - 1;
        for (int64_t i = 0; i < nc; i++) {
            cum += cd[i].p;
            if (cum > c->top_p) {
                last = i;
                break;
            }
        }
        nc = last + 1;
        r = coin * cum;
    } else if (full) {
        r = coin; /* llama2.c sample_mult(): the whole distribution sums to 1 */
    } else {
        float mass = 0.0f;
        for (int64_t i = 0; i < nc; i++)
            mass += cd[i].p;
        r = coin * mass;
    }
    float cdf = 0.0f;
    for (int64_t i = 0; i < nc; i++) {
        cdf += cd[i].p;
        if (r < cdf)
            return cd[i].id;
    }
    return cd[nc - 1].id; /* rounding */
}

void eng_sampler_rng_get(const eng_sampler *s, uint64_t st[4])
{
    memcpy(st, s->rng.s, sizeof s->rng.s);
}

void eng_sampler_rng_set(eng_sampler *s, const uint64_t st[4])
{
    memcpy(s->rng.s, st, sizeof s->rng.s);
}
