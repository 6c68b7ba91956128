/* Tensor parallelism (eng_model_open_tp + eng_ctx_cfg.comm, run as an
 * in-process group by eng_tp_run): sharded ranks reproduce the unsharded
 * model — the stories260K goldens at TP 2 and 4, and on a 110m-shape model
 * (F32, F16, Q8_0) the greedy tokens of TP 1 for 256 steps with logits
 * within a stated relative error — bit for bit from run to run and whatever
 * the batch; bad splits are refused with a message. */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "engine/engine.h"
#include "engine/sampler.h"
#include "engine/model/eng_err.h"
#include "engine/model/gguf_write.h"
#include "engine/tp.h"
#include "tests/util/test_models.h"
#include "tests/util/test_tree.h"

/* ---- one greedy run, as a group ------------------------------------------ */

typedef struct tp_job {
    const char *path;
    int tp;
    enum kn_variant variant;
    const int32_t *prompt;
    int64_t n_prompt, n_new;
    /* a second sequence decoded in the same batches (NULL: alone) */
    const int32_t *other;
    int64_t n_other;
    /* outputs, written by rank 0 */
    int32_t *ids;  /* [n_new] */
    float *logits; /* [n_new][n_vocab]: the row each id was chosen from */
} tp_job;

static int64_t argmax_row(const float *x, int64_t n)
{
    int64_t b = 0;
    for (int64_t i = 1; i < n; i++)
        if (x[i] > x[b])
            b = i;
    return b;
}

/* Every rank: open its shard, prefill, then n_new greedy steps (argmax of
 * the gathered row, the same bits on every rank). */
static int greedy_rank(int rank, comm *cm, void *arg)
{
    const tp_job *j = arg;
    eng_model *m = NULL;
    kn_ctx *kn = NULL;
    eng_ctx *c = NULL;
    eng_kv *kv = NULL;
    float *lg = NULL, *row = NULL;
    int rc = eng_model_open_tp(&m, j->path, rank, j->tp);
    if (rc < 0)
        return rc;
    const int64_t V = eng_model_hparams(m)->n_vocab;
    const int64_t max_len = j->n_prompt + j->n_new + 1;
    eng_kv_cfg kc;
    eng_model_kv_cfg(m, 16, 2 * ((max_len + j->n_other + 15) / 16 + 1), 2, max_len + j->n_other,
                     &kc);
    if ((rc = kn_ctx_create(&kn, &(kn_ctx_cfg){.n_threads = 1, .variant = j->variant})) < 0 ||
        (rc = eng_ctx_create(&c, m,
                             &(eng_ctx_cfg){.kn = kn, .max_tokens = j->n_prompt + j->n_other,
                                            .max_outputs = 2, .comm = cm})) < 0 ||
        (rc = eng_kv_create(&kv, kn, &kc)) < 0 ||
        (rc = kn_buf_alloc(kn, 2 * (size_t)V * sizeof(float), (void **)&lg)) < 0)
        goto out;
    row = malloc((size_t)V * sizeof(float));
    if (!row) {
        rc = -ENOMEM;
        goto out;
    }
    const int s0 = eng_kv_seq_alloc(kv), s1 = j->other ? eng_kv_seq_alloc(kv) : -1;
    eng_seq_in in[2] = {{.seq = s0, .tokens = j->prompt, .n_tokens = j->n_prompt},
                        {.seq = s1, .tokens = j->other, .n_tokens = j->n_other}};
    int32_t next[2];
    int n_seq = j->other ? 2 : 1;
    for (int64_t step = 0; step < j->n_new; step++) {
        int64_t n = eng_forward(c, kv, in, n_seq, lg, NULL);
        if (n < 0) {
            rc = (int)n;
            goto out;
        }
        for (int s = 0; s < n_seq; s++) {
            if ((rc = kn_buf_download(kn, row, lg + s * V, (size_t)V * sizeof(float))) < 0)
                goto out;
            next[s] = (int32_t)argmax_row(row, V);
            if (s == 0 && rank == 0) {
                j->ids[step] = next[0];
                memcpy(j->logits + step * V, row, (size_t)V * sizeof(float));
            }
        }
        for (int s = 0; s < n_seq; s++)
            in[s] = (eng_seq_in){.seq = s ? s1 : s0, .tokens = &next[s], .n_tokens = 1};
    }
out:
    free(row);
    kn_buf_free(kn, lg);
    eng_kv_destroy(kv);
    eng_ctx_destroy(c);
    kn_ctx_destroy(kn);
    eng_model_close(m);
    return rc;
}

static int64_t vocab_of(const char *path)
{
    eng_model *m;
    cr_assert_eq(eng_model_open(&m, path), 0, "%s", eng_error());
    int64_t v = eng_model_hparams(m)->n_vocab;
    eng_model_close(m);
    return v;
}

/* Greedy-decode n_new tokens at tp; ids and logits malloc'ed for the caller. */
static void run_greedy(const char *path, int tp, enum kn_variant variant, const int32_t *prompt,
                       int64_t n_prompt, int64_t n_new, const int32_t *other, int64_t n_other,
                       int32_t **ids, float **logits)
{
    const int64_t V = vocab_of(path);
    *ids = calloc((size_t)n_new, sizeof(int32_t));
    *logits = malloc((size_t)(n_new * V) * sizeof(float));
    cr_assert(*ids && *logits);
    tp_job j = {.path = path, .tp = tp, .variant = variant, .prompt = prompt, .n_prompt = n_prompt, .n_new = n_new,
                .other = other, .n_other = n_other, .ids = *ids, .logits = *logits};
    int rc = eng_tp_run(tp, greedy_rank, &j, &(eng_tp_opts){.timeout_ms = 120000});
    cr_assert_eq(rc, 0, "tp %d: %s", tp, eng_error());
}

/* Largest |a - b| over a row, relative to the row's largest |b|. */
static double row_rel_err(const float *a, const float *b, int64_t n)
{
    double d = 0, s = 0;
    for (int64_t i = 0; i < n; i++) {
        cr_assert(isfinite(a[i]) && isfinite(b[i]), "logit %lld is not finite", (long long)i);
        d = fmax(d, fabs((double)a[i] - (double)b[i]));
        s = fmax(s, fabs((double)b[i]));
    }
    return s > 0 ? d / s : d;
}

/* ---- stories260K: goldens, determinism, batch invariance ----------------- */

static const char *k_260k = "stories260K/stories260K.gguf";

/* The golden file is gorgon-run's greedy text for --steps 256: generate it
 * through eng_generate in every rank and compare rank 0's text. */
typedef struct golden_job {
    const char *path;
    int tp;
    bool sampled; /* llama2.c's RNG, T 1, top-p 0.9, seed 133742 (one sampler per rank) */
    bool topk;    /* sampled from the top-k: top-k 40, T 0.8, top-p 0.9, min-p 0.05 */
    char text[1 << 14];
    size_t n;
} golden_job;

static int collect(void *arg, int32_t token, const char *s, size_t n)
{
    (void)token;
    golden_job *g = arg;
    if (g->n + n < sizeof g->text) {
        memcpy(g->text + g->n, s, n);
        g->n += n;
    }
    return 0;
}

static int golden_rank(int rank, comm *cm, void *arg)
{
    golden_job *g = arg;
    eng_model *m = NULL;
    kn_ctx *kn = NULL;
    eng_ctx *c = NULL;
    eng_kv *kv = NULL;
    int rc = eng_model_open_tp(&m, g->path, rank, g->tp);
    if (rc < 0)
        return rc;
    eng_kv_cfg kc;
    eng_model_kv_cfg(m, 16, 17, 1, 257, &kc);
    int32_t bos = eng_tok_bos(eng_model_tokenizer(m));
    eng_gen_result r;
    eng_sampler *smp = NULL;
    const eng_sampler_cfg llama2c = {.temperature = 1.0f, .top_p = 0.9f, .seed = 133742,
                                     .rng = ENG_RNG_LLAMA2C},
                          topk = {.temperature = 0.8f, .top_k = 40, .top_p = 0.9f,
                                  .min_p = 0.05f, .seed = 7};
    if (((g->sampled || g->topk) &&
         (rc = eng_sampler_create(&smp, g->topk ? &topk : &llama2c,
                                  eng_model_hparams(m)->n_vocab)) < 0) ||
        (rc = kn_ctx_create(&kn, &(kn_ctx_cfg){.n_threads = 1})) < 0 ||
        (rc = eng_ctx_create(&c, m, &(eng_ctx_cfg){.kn = kn, .max_tokens = 1, .comm = cm})) < 0 ||
        (rc = eng_kv_create(&kv, kn, &kc)) < 0)
        goto out;
    rc = eng_generate(c, kv, eng_kv_seq_alloc(kv),
                      &(eng_gen_cfg){.prompt = &bos, .n_prompt = 1, .steps = 256,
                                     .sampler = smp,
                                     .on_token = rank == 0 ? collect : NULL, .arg = g},
                      &r);
out:
    eng_sampler_destroy(smp);
    eng_kv_destroy(kv);
    eng_ctx_destroy(c);
    kn_ctx_destroy(kn);
    eng_model_close(m);
    return rc;
}

static void check_golden(int tp, bool sampled)
{
    golden_job *g = calloc(1, sizeof(*g));
    cr_assert_not_null(g);
    g->path = tu_model_path(k_260k);
    g->tp = tp;
    g->sampled = sampled;
    cr_assert_eq(eng_tp_run(tp, golden_rank, g, NULL), 0, "%s", eng_error());
    FILE *f = fopen(tu_model_path(sampled ? "stories260K/golden_t1.0_p0.9_s133742.txt"
                                          : "stories260K/golden_greedy_n256.txt"),
                    "rb");
    cr_assert_not_null(f);
    static char want[1 << 14];
    size_t n = fread(want, 1, sizeof want - 1, f);
    fclose(f);
    /* gorgon-run ends the text with a newline, as llama2.c */
    cr_assert_eq(g->n + 1, n, "tp %d: %zu bytes of text, the golden has %zu", tp, g->n, n - 1);
    cr_assert(memcmp(g->text, want, g->n) == 0, "tp %d: text differs from the golden", tp);
    free(g);
}

Test(engine_tp, stories260k_golden_at_tp2, .timeout = 120)
{
    check_golden(2, false);
}

Test(engine_tp, stories260k_golden_at_tp4, .timeout = 120)
{
    check_golden(4, false);
}

/* Sampling: every rank draws from the same gathered row with the same seed. */
Test(engine_tp, stories260k_sampled_golden_at_tp2_and_tp4, .timeout = 120)
{
    check_golden(2, true);
    check_golden(4, true);
}

/* A top-k sampler under TP draws from the merged candidates of the ranks
 * (eng_forward_topk), not from a gathered row: the same text as TP 1,
 * which samples the whole row. */
Test(engine_tp, topk_sampling_at_tp2_and_tp4_equals_tp1, .timeout = 120)
{
    golden_job *g[3];
    for (int i = 0; i < 3; i++) {
        g[i] = calloc(1, sizeof(*g[i]));
        cr_assert_not_null(g[i]);
        g[i]->path = tu_model_path(k_260k);
        g[i]->tp = 1 << i;
        g[i]->topk = true;
        cr_assert_eq(eng_tp_run(g[i]->tp, golden_rank, g[i], NULL), 0, "%s", eng_error());
    }
    cr_assert_gt(g[0]->n, 100, "TP 1 sampled only %zu bytes", g[0]->n);
    for (int i = 1; i < 3; i++)
        cr_assert(g[i]->n == g[0]->n && memcmp(g[i]->text, g[0]->text, g[0]->n) == 0,
                  "TP %d top-k sampled text differs from TP 1:\n%.*s\n---\n%.*s", g[i]->tp,
                  (int)g[i]->n, g[i]->text, (int)g[0]->n, g[0]->text);
    for (int i = 0; i < 3; i++)
        free(g[i]);
}

/* Fixed-order all-reduce: TP 2 gives the same logits bit for bit from run
 * to run, and a sequence decoded beside another gets the bits it gets
 * alone. */
Test(engine_tp, tp2_is_bitwise_repeatable_and_batch_invariant, .timeout = 120)
{
    const char *path = tu_model_path(k_260k);
    const int64_t V = vocab_of(path), n_new = 48;
    const int32_t prompt[] = {1, 403, 407, 261, 378}, other[] = {1, 200, 300};
    int32_t *a_ids, *b_ids, *c_ids;
    float *a, *b, *cl;
    run_greedy(path, 2, KN_VARIANT_AUTO, prompt, 5, n_new, NULL, 0, &a_ids, &a);
    run_greedy(path, 2, KN_VARIANT_AUTO, prompt, 5, n_new, NULL, 0, &b_ids, &b);
    run_greedy(path, 2, KN_VARIANT_AUTO, prompt, 5, n_new, other, 3, &c_ids, &cl);
    cr_assert(memcmp(a, b, (size_t)(n_new * V) * sizeof(float)) == 0,
              "two TP 2 runs gave different logits");
    cr_assert(memcmp(a, cl, (size_t)(n_new * V) * sizeof(float)) == 0,
              "TP 2 logits change when another sequence shares the batch");
    cr_assert(memcmp(a_ids, c_ids, (size_t)n_new * sizeof(int32_t)) == 0);
    free(a_ids), free(b_ids), free(c_ids), free(a), free(b), free(cl);
}

/* eng_forward_greedy exchanges one (max, id) pair per rank and row: its ids
 * are the argmax of the gathered rows, for every output row of a batch.
 * eng_forward_topk exchanges each rank's top-k: its candidates are the
 * top-k of the gathered rows / temperature, value and id, bit for bit. */
#define TK_MAX 40
typedef struct greedy_ids_job {
    int tp;
    char path[1024]; /* (tu_model_path's buffer is not for threads) */
    int32_t want_ids[20], got_ids[20];
    int32_t k[20];
    float temp[20];
    eng_cand want_top[20][TK_MAX], got_top[20][TK_MAX];
} greedy_ids_job;

static int greedy_ids_rank(int rank, comm *cm, void *arg)
{
    greedy_ids_job *g = arg;
    eng_model *m = NULL;
    kn_ctx *kn = NULL;
    eng_ctx *c = NULL;
    eng_kv *kv = NULL;
    float *lg = NULL, *row = NULL;
    int rc = eng_model_open_tp(&m, g->path, rank, g->tp);
    if (rc < 0)
        return rc;
    const int64_t V = eng_model_hparams(m)->n_vocab;
    int32_t toks[20], ids[20];
    uint8_t want[20];
    for (int i = 0; i < 20; i++)
        toks[i] = (int32_t)(1 + (i * 37) % (V - 1)), want[i] = 1;
    eng_kv_cfg kc;
    eng_model_kv_cfg(m, 16, 12, 3, 64, &kc);
    if ((rc = kn_ctx_create(&kn, &(kn_ctx_cfg){.n_threads = 1})) < 0 ||
        (rc = eng_ctx_create(&c, m, &(eng_ctx_cfg){.kn = kn, .max_tokens = 20, .comm = cm})) <
            0 ||
        (rc = eng_kv_create(&kv, kn, &kc)) < 0 ||
        (rc = kn_buf_alloc(kn, 20 * (size_t)V * sizeof(float), (void **)&lg)) < 0)
        goto out;
    row = malloc((size_t)V * sizeof(float));
    eng_seq_in a = {.seq = eng_kv_seq_alloc(kv), .tokens = toks, .n_tokens = 20, .want = want};
    eng_seq_in b = a, d = a;
    b.seq = eng_kv_seq_alloc(kv);
    d.seq = eng_kv_seq_alloc(kv);
    if ((rc = (int)eng_forward(c, kv, &a, 1, lg, NULL)) < 0)
        goto out;
    for (int o = 0; o < 20 && rank == 0; o++) {
        kn_buf_download(kn, row, lg + o * V, (size_t)V * sizeof(float));
        g->want_ids[o] = (int32_t)argmax_row(row, V);
        if (g->temp[o] != 1.0f)
            for (int64_t i = 0; i < V; i++)
                row[i] /= g->temp[o];
        eng_topk_select(row, V, g->k[o], g->want_top[o]);
    }
    if ((rc = (int)eng_forward_greedy(c, kv, &b, 1, lg, NULL, ids)) < 0)
        goto out;
    if (rank == 0)
        memcpy(g->got_ids, ids, sizeof ids);
    static _Thread_local eng_cand top[20][TK_MAX];
    if ((rc = (int)eng_forward_topk(c, kv, &d, 1, lg, g->k, g->temp, TK_MAX, &top[0][0])) < 0)
        goto out;
    if (rank == 0)
        memcpy(g->got_top, top, sizeof top);
    rc = 0;
out:
    free(row);
    kn_buf_free(kn, lg);
    eng_kv_destroy(kv);
    eng_ctx_destroy(c);
    kn_ctx_destroy(kn);
    eng_model_close(m);
    return rc;
}

Test(engine_tp, greedy_pairs_and_topk_candidates_equal_those_of_gathered_rows, .timeout = 60)
{
    for (int tp = 1; tp <= 4; tp *= 2) {
        static greedy_ids_job g;
        memset(&g, 0, sizeof g);
        g.tp = tp;
        snprintf(g.path, sizeof g.path, "%s", tu_model_path(k_260k));
        for (int o = 0; o < 20; o++) {
            g.k[o] = o == 0 ? 1 : o == 1 ? TK_MAX : 2 + (o * 7) % (TK_MAX - 1);
            g.temp[o] = o % 3 == 0 ? 1.0f : o % 3 == 1 ? 0.7f : 1.3f;
        }
        memset(g.got_ids, 0xff, sizeof g.got_ids); /* poisoned */
        memset(g.got_top, 0xff, sizeof g.got_top);
        cr_assert_eq(eng_tp_run(tp, greedy_ids_rank, &g, NULL), 0, "%s", eng_error());
        for (int o = 0; o < 20; o++) {
            cr_assert_eq(g.got_ids[o], g.want_ids[o], "tp %d row %d: %d, the row's argmax %d",
                         tp, o, g.got_ids[o], g.want_ids[o]);
            for (int j = 0; j < g.k[o]; j++)
                cr_assert(g.got_top[o][j].id == g.want_top[o][j].id &&
                              memcmp(&g.got_top[o][j].p, &g.want_top[o][j].p, sizeof(float)) == 0,
                          "tp %d row %d candidate %d: (%d, %a), the rows' (%d, %a)", tp, o, j,
                          g.got_top[o][j].id, (double)g.got_top[o][j].p, g.want_top[o][j].id,
                          (double)g.want_top[o][j].p);
        }
    }
}

/* ---- refusals -------------------------------------------------------------- */

Test(engine_tp, bad_splits_are_refused_with_a_message)
{
    const char *path = tu_model_path(k_260k); /* 8 heads, 4 KV heads, FFN 172 */
    eng_model *m = NULL;
    cr_assert_eq(eng_model_open_tp(&m, path, 0, 3), -EINVAL);
    cr_assert(strstr(eng_error(), "3 ranks does not divide the 8 attention heads"), "%s",
              eng_error());
    cr_assert_eq(eng_model_open_tp(&m, path, 0, 8), -EINVAL); /* 172 / 8 */
    cr_assert(strstr(eng_error(), "FFN width 172"), "%s", eng_error());
    cr_assert_eq(eng_model_open_tp(&m, path, 2, 2), -EINVAL);
    cr_assert(strstr(eng_error(), "rank 2 of a tensor-parallel group of 2"), "%s", eng_error());
    cr_assert_null(m);
    /* a shard without its communicator cannot run */
    cr_assert_eq(eng_model_open_tp(&m, path, 1, 2), 0, "%s", eng_error());
    kn_ctx *kn;
    cr_assert_eq(kn_ctx_create(&kn, &(kn_ctx_cfg){.n_threads = 1}), 0);
    eng_ctx *c = NULL;
    cr_assert_eq(eng_ctx_create(&c, m, &(eng_ctx_cfg){.kn = kn, .max_tokens = 4}), -EINVAL);
    cr_assert(strstr(eng_error(), "rank 1 of 2 tensor-parallel ranks"), "%s", eng_error());
    /* the shard is what it says: 4 of 8 heads, 2 of 4 KV heads, half the FFN */
    const eng_hparams *sh = eng_model_shard_hparams(m), *hp = eng_model_hparams(m);
    cr_expect_eq(sh->n_head, hp->n_head / 2);
    cr_expect_eq(sh->n_kv_head, hp->n_kv_head / 2);
    cr_expect_eq(sh->ffn_dim, hp->ffn_dim / 2);
    int64_t first, chunk;
    cr_expect_eq(eng_model_vocab_slice(m, &first, &chunk), hp->n_vocab - hp->n_vocab / 2);
    cr_expect_eq(first, chunk);
    kn_ctx_destroy(kn);
    eng_model_close(m);
}

/* A failing rank fails the group with its message; the others return. */
static int fail_rank1(int rank, comm *cm, void *arg)
{
    (void)arg;
    if (rank == 1)
        return eng_fail(-ENOSPC, "rank one ran out of room");
    float x[4] = {0};
    return comm_all_reduce_sum_f32(cm, x, 4); /* must not wait forever */
}

Test(engine_tp, a_failing_rank_fails_the_group_with_its_message, .timeout = 30)
{
    cr_assert_eq(eng_tp_run(2, fail_rank1, NULL, NULL), -ENOSPC);
    cr_assert(strstr(eng_error(), "rank 1: rank one ran out of room"), "%s", eng_error());
    cr_assert_eq(eng_tp_run(0, fail_rank1, NULL, NULL), -EINVAL);
}

/* ---- 110m shape: TP 2 against TP 1, per dtype ------------------------------- */

static char g_dir[64];

static void mk_setup(void)
{
    snprintf(g_dir, sizeof g_dir, "/tmp/gorgon-tp-XXXXXX");
    cr_assert_not_null(mkdtemp(g_dir));
}

static void mk_teardown(void)
{
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    cr_expect_eq(system(cmd), 0);
}

/* The 110m shape and 256 greedy steps in release builds. Under the
 * sanitizers (10-20x slower) a smaller model of the same structure (whole
 * heads of 64, Q8_0 blocks per rank) and fewer steps still drive every
 * collective and every split; the release lane covers the size. */
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
#define TP_STEPS 32
#define TP_SHAPE .dim = 256, .n_layer = 2, .n_head = 4, .n_head_kv = 4, .ffn = 512, .n_vocab = 4096
#define TP_VOCAB 4096
#else
#define TP_STEPS 256
#define TP_SHAPE .dim = 768, .n_layer = 12, .n_head = 12, .n_head_kv = 12, .ffn = 2048, .n_vocab = 32000
#define TP_VOCAB 32000
#endif

static void write_110m(enum kn_dtype dt, char *path, size_t cap)
{
    snprintf(path, cap, "%s/110m-%s.gguf", g_dir, kn_dtype_name(dt));
    /* gorgon-mkmodel --preset 110m's shape (sanitizer builds: TP_SHAPE) */
    cr_assert_eq(eng_gguf_write_synth_llama(path, &(eng_synth_llama_cfg){TP_SHAPE,
                                                                          .n_ctx = 1024,
                                                                          .dtype = dt,
                                                                          .seed = 110}),
                 0, "%s", eng_error());
}

static const int32_t k_prompt[] = {1, 600, 700, 800, 900, 1000};


static void tp2_matches_tp1(enum kn_dtype dt, enum kn_variant variant, double tol)
{
    char path[128];
    write_110m(dt, path, sizeof path);
    const int64_t V = TP_VOCAB, n_new = TP_STEPS;
    int32_t *ids1, *ids2;
    float *l1, *l2;
    run_greedy(path, 1, variant, k_prompt, 6, n_new, NULL, 0, &ids1, &l1);
    run_greedy(path, 2, variant, k_prompt, 6, n_new, NULL, 0, &ids2, &l2);
    double worst = 0;
    for (int64_t s = 0; s < n_new; s++) {
        double e = row_rel_err(l2 + s * V, l1 + s * V, V);
        worst = fmax(worst, e);
        cr_assert_lt(e, tol, "%s step %lld: TP 2 logits off by %.3g of the row's scale",
                     kn_dtype_name(dt), (long long)s, e);
        cr_assert_eq(ids2[s], ids1[s], "%s step %lld: TP 2 chose %d, TP 1 %d",
                     kn_dtype_name(dt), (long long)s, ids2[s], ids1[s]);
    }
    cr_log_info("%s (%s kernels): %d greedy tokens equal, worst logit error %.3g of the row's "
                "scale\n",
                kn_dtype_name(dt), kn_variant_name(variant), TP_STEPS, worst);
    free(ids1), free(ids2), free(l1), free(l2);
}

/* Tolerances: TP changes only the order of float additions (each rank sums
 * its share of the K dimension, then the shares are added in rank order),
 * so the error is a few roundings of sums of ~1e3 products: ~1e-6 of the
 * row's scale in F32 and F16 (F16 weights are exact in F32; products and
 * sums are F32). 1e-4 leaves two orders of magnitude. */
Test(engine_tp, f32_110m_tp2_equals_tp1, .init = mk_setup, .fini = mk_teardown, .timeout = 600)
{
    tp2_matches_tp1(KN_F32, KN_VARIANT_AUTO, 1e-4);
}

Test(engine_tp, f16_110m_tp2_equals_tp1, .init = mk_setup, .fini = mk_teardown, .timeout = 600)
{
    tp2_matches_tp1(KN_F16, KN_VARIANT_AUTO, 1e-4);
}

/* Q8_0 with F32 activations (the AVX2 and scalar kernels): the same bound.
 * The AVX-512 kernels quantize activations to int8 per block (W8A8, VNNI):
 * there a 1-ulp change in an input can move an activation across an int8
 * rounding step, so TP agrees with TP 1 only to that quantizer's noise —
 * checked below against the same kernels' distance from the F32 reference. */
Test(engine_tp, q8_0_110m_tp2_equals_tp1, .init = mk_setup, .fini = mk_teardown, .timeout = 600)
{
    enum kn_variant v = kn_ops_for(KN_VARIANT_AVX2) ? KN_VARIANT_AVX2 : KN_VARIANT_SCALAR;
    tp2_matches_tp1(KN_Q8_0, v, 1e-4);
}

Test(engine_tp, q8_0_110m_tp2_within_int8_activation_noise_on_avx512, .init = mk_setup,
     .fini = mk_teardown, .timeout = 600)
{
    if (!kn_ops_for(KN_VARIANT_AVX512))
        cr_skip_test("avx512: not supported by this CPU");
    char path[128];
    write_110m(KN_Q8_0, path, sizeof path);
    const int64_t V = TP_VOCAB;
    int32_t *i1, *i2, *ir;
    float *l1, *l2, *lr;
    run_greedy(path, 1, KN_VARIANT_AVX512, k_prompt, 6, 1, NULL, 0, &i1, &l1);
    run_greedy(path, 2, KN_VARIANT_AVX512, k_prompt, 6, 1, NULL, 0, &i2, &l2);
    run_greedy(path, 1, KN_VARIANT_AVX2, k_prompt, 6, 1, NULL, 0, &ir, &lr);
    const double e_tp = row_rel_err(l2, l1, V), e_q = row_rel_err(l1, lr, V);
    cr_log_info("q8_0 avx512: TP 2 vs TP 1 %.3g, TP 1 vs F32 activations %.3g of the row's "
                "scale\n",
                e_tp, e_q);
    cr_assert_lt(e_q, 0.05, "W8A8 noise %.3g: the int8 kernels are off", e_q);
    cr_assert_lt(e_tp, 2 * e_q, "TP 2 differs from TP 1 by %.3g, more than the int8 noise %.3g",
                 e_tp, e_q);
    free(i1), free(i2), free(ir), free(l1), free(l2), free(lr);
}

/* ---- through gorgon-run: --tp, and Medusa under TP ---------------------------- */

/* Run a shell command, its stdout into out (NUL-terminated); returns the
 * exit status. */
static int run_cmd(const char *cmd, char *out, size_t cap)
{
    FILE *p = popen(cmd, "r");
    cr_assert_not_null(p);
    size_t n = fread(out, 1, cap - 1, p);
    out[n] = 0;
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* Greedy Medusa is lossless under TP 2: the same text as plain greedy (the
 * n200 golden). The heads' projections are split by vocabulary and their
 * candidates merged across ranks: the same candidates as TP 1, so the same
 * steps accept the same number of tokens (a merge that lost or reordered
 * candidates would keep the text, the verification being exact, and
 * change these counts). Also at TP 4, whose last slice is short. */
Test(engine_tp, gorgon_run_medusa_at_tp2_is_lossless, .init = mk_setup, .fini = mk_teardown,
     .timeout = 300)
{
    static char cmd[4096], out[1 << 14], want[1 << 14], model[1024];
    snprintf(model, sizeof model, "%s", tu_model_path(k_260k)); /* (static storage) */
    snprintf(cmd, sizeof cmd, "'%s' --model '%s' --out '%s/heads' --seqs 32 --len 48 --epochs 1 "
                              "--heads 2 >/dev/null 2>&1",
             tu_bin("gorgon-medusa-train"), model, g_dir);
    cr_assert_eq(system(cmd), 0, "gorgon-medusa-train failed");
    FILE *f = fopen(tu_model_path("stories260K/golden_greedy_n200.txt"), "rb");
    cr_assert_not_null(f);
    want[fread(want, 1, sizeof want - 1, f)] = 0;
    fclose(f);
    static char stats[3][512];
    for (int i = 0; i < 3; i++) {
        const int tp = i == 0 ? 1 : i == 1 ? 2 : 4;
        char err[1024];
        snprintf(err, sizeof err, "%s/medusa-tp%d.err", g_dir, tp);
        snprintf(cmd, sizeof cmd,
                 "'%s' --model '%s' --temp 0 --steps 200 --medusa '%s/heads' --tp %d 2>'%s'",
                 tu_bin("gorgon-run"), model, g_dir, tp, err);
        cr_assert_eq(run_cmd(cmd, out, sizeof out), 0, "gorgon-run --tp %d --medusa failed", tp);
        cr_assert_str_eq(out, want, "tp %d: Medusa text differs from plain greedy", tp);
        f = fopen(err, "r");
        cr_assert_not_null(f);
        char line[512];
        while (fgets(line, sizeof line, f))
            if (!strncmp(line, "medusa: ", 8))
                snprintf(stats[i], sizeof stats[i], "%s", line);
        fclose(f);
        cr_assert(strstr(stats[i], " steps, "), "tp %d: no Medusa statistics line", tp);
        cr_assert_str_eq(stats[i], stats[0], "tp %d accepts differently from tp 1", tp);
    }
    /* a refused split is reported by gorgon-run, exit status 1 */
    snprintf(cmd, sizeof cmd, "'%s' --model '%s' --tp 3 -n 4 2>&1", tu_bin("gorgon-run"), model);
    cr_assert_eq(run_cmd(cmd, out, sizeof out), 1);
    cr_assert(strstr(out, "3 ranks does not divide the 8 attention heads"), "%s", out);
}
