/* Medusa through gorgond: a real gorgond --medusa DIR with a real worker.
 * Greedy output must be token for token what plain greedy decoding gives
 * (the reference is the same gorgond with GORGON_GEN_NO_MEDUSA), alone and
 * in a batch of 8, with heads trained on stories260K by gorgon-medusa-train
 * and with random heads; usage and stats must report the Medusa steps; the
 * batch limit must switch speculation off and on; with measured costs and
 * useless heads, speculation must switch itself off. */
#include <criterion/criterion.h>
#include <ftw.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "clients/gorgon.h"
#include "engine/engine.h"
#include "engine/medusa/medusa_heads.h"
#include "tests/clients/util/gd_proc.h"
#include "tests/util/test_models.h"

#define S260 "stories260K/stories260K.gguf"
#define N_PROMPTS 8
#define N_GEN 256
#define N_HEADS 3

static const char *const PROMPTS[N_PROMPTS] = {
    "",           "Once upon a time", "Lily and Tom",  "The cat sat",
    "One day, a", "Tim had a red ball", "The sun was", "Sara liked to",
};

static gd_proc gd;
static char g_dir[64]; /* heads live here for the whole test process */
static char model_buf[PATH_MAX];

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}

/* Each test is its own process: its heads directory goes with it. */
static void teardown(void)
{
    gd_stop(&gd);
    if (g_dir[0]) {
        nftw(g_dir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
        g_dir[0] = '\0';
    }
}

typedef struct ids_out {
    int32_t ids[N_GEN];
    int n;
    gorgon_gen_chunk last;
} ids_out;

static void ensure_dir(void)
{
    if (g_dir[0])
        return;
    snprintf(g_dir, sizeof(g_dir), "/tmp/gorgon-medusa-test-XXXXXX");
    cr_assert_not_null(mkdtemp(g_dir));
}

/* gorgon-medusa-train from the same build tree as gorgond. */
static void train_heads(char *out, size_t cap)
{
    ensure_dir();
    snprintf(out, cap, "%s/trained", g_dir);
    struct stat st;
    if (stat(out, &st) == 0)
        return;
    char bin[PATH_MAX];
    cr_assert_eq(gd_find_binary(bin, sizeof(bin)), 0);
    char *slash = strrchr(bin, '/');
    cr_assert_not_null(slash);
    snprintf(slash + 1, sizeof(bin) - (size_t)(slash + 1 - bin), "gorgon-medusa-train");
    char cmd[PATH_MAX * 3];
    /* Small but real: ~16k training positions, low-temperature text. */
    snprintf(cmd, sizeof(cmd),
             "'%s' --model '%s' --out '%s' --heads %d --seqs 128 --len 128 --epochs 1 "
             "--temp 0.3 --threads 2 >'%s/train.log' 2>&1",
             bin, tu_model_path(S260), out, N_HEADS, g_dir);
    int rc = system(cmd);
    cr_assert_eq(rc, 0, "%s failed (see %s/train.log)", bin, g_dir);
}

static uint64_t g_lcg = 0x243f6a8885a308d3ull;
static float frand(void) /* [-1, 1) */
{
    g_lcg = g_lcg * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((g_lcg >> 40) & 0xffffff) / (float)(1 << 23) - 1.0f;
}

/* Deliberately bad heads: random ResBlocks and vocabulary projections. */
static void random_heads(char *out, size_t cap)
{
    ensure_dir();
    snprintf(out, cap, "%s/random", g_dir);
    struct stat st;
    if (stat(out, &st) == 0)
        return;
    eng_model *m;
    cr_assert_eq(eng_model_open(&m, tu_model_path(S260)), 0, "%s", eng_error());
    const int64_t H = eng_model_hparams(m)->dim, V = eng_model_hparams(m)->n_vocab;
    eng_model_close(m);
    static float w[N_HEADS][64 * 64], b[N_HEADS][64], lm[N_HEADS][512 * 64];
    cr_assert(H <= 64 && V <= 512);
    const float *ws[N_HEADS], *bs[N_HEADS], *lms[N_HEADS];
    for (int h = 0; h < N_HEADS; h++) {
        for (int64_t i = 0; i < H * H; i++)
            w[h][i] = frand() * 0.3f;
        for (int64_t i = 0; i < H; i++)
            b[h][i] = frand() * 0.1f;
        for (int64_t i = 0; i < V * H; i++)
            lm[h][i] = frand();
        ws[h] = w[h], bs[h] = b[h], lms[h] = lm[h];
    }
    cr_assert_eq(eng_medusa_heads_write(out, N_HEADS, H, V, ws, bs, lms, NULL), 0, "%s",
                 eng_error());
}

static void start(const char *heads, const char *max_batch)
{
    snprintf(model_buf, sizeof(model_buf), "%s", tu_model_path(S260));
    int rc = gd_start(&gd, "--model", model_buf, "--medusa", heads, "--medusa-tree", "chain3",
                      "--medusa-max-batch", max_batch, "--max-seqs", "16", NULL);
    if (rc == -ENOENT)
        cr_skip_test("gorgond not built: run `make build/bin/gorgond`");
    cr_assert_eq(rc, 0, "gorgond did not start: %s", strerror(-rc));
}

static uint32_t submit(gorgon_client *cli, int p, int max_tokens, bool medusa)
{
    gorgon_gen_params gp = {.prompt = PROMPTS[p], .max_tokens = max_tokens,
                            .flags = GORGON_GEN_WANT_IDS | (medusa ? 0 : GORGON_GEN_NO_MEDUSA)};
    uint32_t req;
    int rc = gorgon_generate_submit(cli, &gp, (uint64_t)p, &req);
    cr_assert_eq(rc, 0, "submit: %s", gorgon_strerror(rc));
    return req;
}

/* Read req's stream into o until it ends or holds at least `until` ids;
 * 1 while it runs, 0 once it ended. */
static int collect_until(gorgon_client *cli, uint32_t req, ids_out *o, int until)
{
    gorgon_gen_chunk ch;
    int rc;
    do {
        rc = gorgon_generate_next(cli, req, &ch, 60000000000ll);
        cr_assert(rc >= 0, "generate: %s (%.*s)", gorgon_strerror(rc), (int)ch.len,
                  ch.text ? ch.text : "");
        for (size_t i = 0; i < ch.n_ids; i++) {
            cr_assert_lt(o->n, N_GEN);
            o->ids[o->n++] = ch.ids[i];
        }
    } while (rc == 1 && o->n < until);
    if (rc == 0)
        o->last = ch;
    return rc;
}

static void collect(gorgon_client *cli, uint32_t req, ids_out *o)
{
    memset(o, 0, sizeof(*o));
    collect_until(cli, req, o, N_GEN + 1);
}

static void run_alone(gorgon_client *cli, int p, int max_tokens, bool medusa, ids_out *o)
{
    collect(cli, submit(cli, p, max_tokens, medusa), o);
}

static void expect_same(const ids_out *got, const ids_out *want, int p, const char *what)
{
    int n = got->n < want->n ? got->n : want->n;
    for (int i = 0; i < n; i++)
        cr_assert_eq(got->ids[i], want->ids[i],
                     "%s, prompt \"%s\": token %d is %d, plain greedy gives %d", what,
                     PROMPTS[p], i, got->ids[i], want->ids[i]);
    cr_assert_eq(got->n, want->n, "%s, prompt \"%s\": %d tokens, plain greedy gives %d", what,
                 PROMPTS[p], got->n, want->n);
    cr_assert_eq(got->last.finish, want->last.finish);
}

static ids_out ref[N_PROMPTS], got[N_PROMPTS];

/* Plain greedy references from this gorgond (per-request off switch). */
static void references(gorgon_client *cli)
{
    for (int p = 0; p < N_PROMPTS; p++) {
        run_alone(cli, p, N_GEN, false, &ref[p]);
        cr_assert_eq(ref[p].last.usage.medusa_steps, 0, "GORGON_GEN_NO_MEDUSA still speculated");
        cr_assert_gt(ref[p].n, 16);
    }
}

/* Every prompt alone, then all 8 at once; returns accepted tokens seen. */
static uint64_t check_lossless(const char *heads)
{
    start(heads, "8");
    gorgon_client *cli = gd_connect(&gd, 0);
    references(cli);
    uint64_t steps = 0, acc = 0;
    for (int p = 0; p < N_PROMPTS; p++) {
        run_alone(cli, p, N_GEN, true, &got[p]);
        expect_same(&got[p], &ref[p], p, "alone");
        cr_assert_gt(got[p].last.usage.medusa_steps, 0, "prompt %d never speculated", p);
        cr_assert_leq(got[p].last.usage.medusa_steps + got[p].last.usage.medusa_accepted,
                      (uint32_t)got[p].n, "more Medusa tokens than tokens");
        steps += got[p].last.usage.medusa_steps;
        acc += got[p].last.usage.medusa_accepted;
    }
    uint32_t req[N_PROMPTS];
    for (int p = 0; p < N_PROMPTS; p++)
        req[p] = submit(cli, p, N_GEN, true);
    for (int p = 0; p < N_PROMPTS; p++) {
        collect(cli, req[p], &got[p]);
        expect_same(&got[p], &ref[p], p, "batch of 8");
        steps += got[p].last.usage.medusa_steps;
        acc += got[p].last.usage.medusa_accepted;
    }
    gorgon_counters st;
    cr_assert_eq(gorgon_stats(cli, &st), 0);
    cr_assert_gt(st.decode_batch_max, 4, "the 8 requests never shared a step");
    cr_assert_eq(st.medusa_steps, steps, "stats and usage disagree on Medusa steps");
    cr_assert_eq(st.medusa_accepted, acc, "stats and usage disagree on accepted tokens");
    cr_assert_eq(st.medusa_max_batch, 8);
    cr_log_info("%s: %llu Medusa steps accepted %llu tokens (%.2f tokens/step)", heads,
                (unsigned long long)steps, (unsigned long long)acc,
                1.0 + (double)acc / (double)steps);
    gorgon_close(cli);
    GD_END(&gd);
    return acc;
}

Test(appliance_medusa, trained_heads_greedy_equals_plain_alone_and_batched, .fini = teardown,
     .timeout = 600)
{
    char heads[PATH_MAX];
    train_heads(heads, sizeof(heads));
    uint64_t acc = check_lossless(heads);
    cr_assert_gt(acc, 0, "trained heads never had a candidate accepted");
}

Test(appliance_medusa, random_heads_greedy_equals_plain_alone_and_batched, .fini = teardown,
     .timeout = 600)
{
    char heads[PATH_MAX];
    random_heads(heads, sizeof(heads));
    check_lossless(heads);
}

/* --medusa-max-batch 2: two long requests speculate alone, stop while six
 * short ones decode beside them (the short ones never speculate), and
 * speculate again once those are done. Outputs stay exact. */
Test(appliance_medusa, batch_limit_switches_speculation_off_and_back_on, .fini = teardown,
     .timeout = 600)
{
    char heads[PATH_MAX];
    train_heads(heads, sizeof(heads));
    start(heads, "2");
    gorgon_client *cli = gd_connect(&gd, 0);
    /* The two long requests: prompts whose greedy text runs the full
     * N_GEN tokens (no EOS), so that they outlive the short ones. */
    static ids_out plain[N_PROMPTS];
    int longp[2], n_long = 0;
    for (int p = 0; p < N_PROMPTS && n_long < 2; p++) {
        run_alone(cli, p, N_GEN, false, &plain[p]);
        if (plain[p].n == N_GEN)
            longp[n_long++] = p;
    }
    cr_assert_eq(n_long, 2, "fewer than two prompts run %d tokens without EOS", N_GEN);
    bool is_long[N_PROMPTS] = {false};
    is_long[longp[0]] = is_long[longp[1]] = true;
    for (int p = 0; p < N_PROMPTS; p++)
        if (!is_long[p])
            run_alone(cli, p, 24, false, &plain[p]);
    /* The long ones start first and speculate as a batch of 2; the six
     * short ones join (in whatever order gorgond passes them on, the batch
     * is then at least 3) and must decode plainly all their life; once they
     * are done, the long ones speculate again. */
    uint32_t req[N_PROMPTS];
    memset(got, 0, sizeof(got));
    for (int k = 0; k < 2; k++)
        req[longp[k]] = submit(cli, longp[k], N_GEN, true);
    for (int k = 0; k < 2; k++)
        cr_assert_eq(collect_until(cli, req[longp[k]], &got[longp[k]], 16), 1);
    for (int p = 0; p < N_PROMPTS; p++)
        if (!is_long[p])
            req[p] = submit(cli, p, 24, true);
    for (int p = 0; p < N_PROMPTS; p++) {
        if (is_long[p])
            collect_until(cli, req[p], &got[p], N_GEN + 1);
        else
            collect(cli, req[p], &got[p]);
        expect_same(&got[p], &plain[p], p, "limit 2");
        if (is_long[p])
            cr_assert_gt(got[p].last.usage.medusa_steps, 0,
                         "prompt %d never speculated in a batch of 2", p);
        else
            cr_assert_eq(got[p].last.usage.medusa_steps, 0,
                         "prompt %d speculated %u times in a batch of 8 with limit 2", p,
                         got[p].last.usage.medusa_steps);
    }
    gorgon_close(cli);
    GD_END(&gd);
}

/* No limit given: the worker measures the tree step's cost at start-up and
 * learns the acceptance; random heads accept next to nothing, so
 * speculation must turn itself off (only periodic probes remain). */
Test(appliance_medusa, measured_limit_turns_useless_heads_off, .fini = teardown, .timeout = 600)
{
    char heads[PATH_MAX];
    random_heads(heads, sizeof(heads));
    start(heads, "0");
    gorgon_client *cli = gd_connect(&gd, 0);
    ids_out plain, spec;
    run_alone(cli, 0, N_GEN, false, &plain);
    run_alone(cli, 0, N_GEN, true, &spec);
    expect_same(&spec, &plain, 0, "measured limit");
    uint32_t steps = spec.last.usage.medusa_steps;
    cr_assert_gt(steps, 0, "the first steps should speculate until acceptance is measured");
    cr_assert_lt(steps, (uint32_t)spec.n / 3,
                 "%u of %d tokens went through Medusa steps with random heads", steps, spec.n);
    gorgon_counters st;
    cr_assert_eq(gorgon_stats(cli, &st), 0);
    cr_assert_eq(st.medusa_max_batch, 0, "useless heads still considered worth it up to %llu",
                 (unsigned long long)st.medusa_max_batch);
    gorgon_close(cli);
    GD_END(&gd);
}
