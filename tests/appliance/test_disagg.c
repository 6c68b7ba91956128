/* Disaggregated serving through gorgond (mode = disaggregated): a prefill
 * group runs the prompts and hands their KV to a decode group through the
 * shared pool. The output is the colocated output bit for bit (goldens,
 * seeded sampling, Medusa), 16 clients with mixed prompt lengths get their
 * solo answers with no KV block lost, and a group killed at the moment of
 * hand-off fails only what it held, leaving the pool whole. */
#include <criterion/criterion.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "clients/gorgon.h"
#include "tests/appliance/util/ap_test.h"
#include "tests/appliance/util/wait.h"
#include "tests/clients/util/gd_proc.h"
#include "tests/util/test_models.h"
#include "tests/util/test_tree.h"

static gd_proc gd, colo;
static char model_buf[PATH_MAX], heads_dir[64];

static void teardown(void)
{
    gd_stop(&gd);
    gd_stop(&colo);
    if (heads_dir[0]) {
        char cmd[128];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", heads_dir);
        cr_expect_eq(system(cmd), 0);
        heads_dir[0] = 0;
    }
}

#define START(...)                                                                           \
    do {                                                                                     \
        snprintf(model_buf, sizeof(model_buf), "%s",                                         \
                 tu_model_path("stories260K/stories260K.gguf"));                             \
        AT_START(&gd, "--model", model_buf, "--threads", "1", "--mode", "disaggregated",     \
                 __VA_ARGS__);                                                               \
    } while (0)

typedef struct gen_out {
    char text[8192];
    size_t len;
    int rc;
    gorgon_gen_chunk last;
    char msg[512];
} gen_out;

static void drain(gorgon_client *cli, uint32_t req, gen_out *o)
{
    memset(o, 0, sizeof(*o));
    gorgon_gen_chunk ch;
    int rc;
    while ((rc = gorgon_generate_next(cli, req, &ch, 60000000000ll)) >= 0) {
        if (!ch.error && ch.len && o->len + ch.len < sizeof o->text) {
            memcpy(o->text + o->len, ch.text, ch.len);
            o->len += ch.len;
        }
        if (rc == 0)
            break;
    }
    o->rc = rc;
    o->last = ch;
    if (ch.error)
        snprintf(o->msg, sizeof o->msg, "%.*s", (int)ch.len, ch.text);
}

static void run_one(gorgon_client *cli, const gorgon_gen_params *p, gen_out *o)
{
    uint32_t req;
    int rc = gorgon_generate_submit(cli, p, 1, &req);
    cr_assert_eq(rc, 0, "submit: %s", gorgon_strerror(rc));
    drain(cli, req, o);
}

static void expect_golden(const char *golden, const char *prefix, const gen_out *o)
{
    FILE *f = fopen(tu_model_path(golden), "rb");
    cr_assert_not_null(f);
    static char want[1 << 16], got[1 << 16];
    size_t n = fread(want, 1, sizeof want, f);
    fclose(f);
    int k = snprintf(got, sizeof got, "%s%.*s\n", prefix, (int)o->len, o->text);
    cr_assert(n == (size_t)k && memcmp(want, got, n) == 0, "%s: output differs:\n%s", golden,
              got);
}

/* gorgon-run's text for the same request (the colocated reference). */
static void gorgon_run(const char *args, char *out, size_t cap)
{
    char cmd[3 * PATH_MAX];
    snprintf(cmd, sizeof cmd, "'%s' --model '%s' %s --threads 1 2>/dev/null",
             tu_bin("gorgon-run"), model_buf, args);
    FILE *p = popen(cmd, "r");
    cr_assert_not_null(p);
    size_t n = fread(out, 1, cap - 1, p);
    cr_assert_eq(pclose(p), 0, "gorgon-run failed");
    out[n] = 0;
}

static int groups(gorgon_client *cli, gorgon_group *g)
{
    int n = gorgon_groups(cli, g, 4);
    cr_assert(n >= 0, "gorgon_groups: %s", gorgon_strerror(n));
    return n;
}

/* Every group ready and holding nothing: no block in use or in transit,
 * and each with its whole share (a block lost in a hand-off would be
 * missing from a restarted group's share, or stay in use). */
static bool pool_whole(gorgon_client *cli, uint64_t share)
{
    gorgon_group g[4];
    int n = groups(cli, g);
    bool ok = n == 2;
    for (int i = 0; i < n; i++)
        ok = ok && g[i].state == GORGON_GROUP_READY && g[i].kv_blocks_used == 0 &&
             g[i].kv_blocks_total == share && g[i].handoff_waiting == 0 && g[i].in_worker == 0;
    return ok && ap_stats(cli).gen_handoff_waiting == 0;
}

Test(appliance_disagg, output_equals_colocated_goldens_and_seeded_sampling, .fini = teardown,
     .timeout = 120)
{
    START("--kv-blocks", "120", NULL);
    gorgon_client *cli = gd_connect(&gd, 0);
    AT_WAIT_UNTIL(pool_whole(cli, 120), AT_WAIT_MS, "the groups did not get ready");
    gorgon_group g[4];
    cr_assert_eq(groups(cli, g), 2);
    cr_assert(g[0].role == GORGON_GROUP_PREFILL && g[1].role == GORGON_GROUP_DECODE,
              "roles %d %d", g[0].role, g[1].role);
    /* three at once: two goldens and a seeded sample */
    const gorgon_gen_params sp = {.prompt = "The cat", .max_tokens = 100, .temperature = 0.8f,
                                  .top_p = 0.9f, .seed = 7};
    uint32_t a, b, c;
    cr_assert_eq(gorgon_generate_submit(cli, &(gorgon_gen_params){.prompt = "", .max_tokens = 256},
                                        1, &a),
                 0);
    cr_assert_eq(gorgon_generate_submit(
                     cli, &(gorgon_gen_params){.prompt = "Lily and Tom", .max_tokens = 60}, 2, &b),
                 0);
    cr_assert_eq(gorgon_generate_submit(cli, &sp, 3, &c), 0);
    static gen_out o;
    drain(cli, a, &o);
    cr_assert_eq(o.rc, 0, "greedy: %d %s", o.rc, o.msg);
    expect_golden("stories260K/golden_greedy_n256.txt", "", &o);
    drain(cli, b, &o);
    cr_assert_eq(o.rc, 0, "prompt: %d %s", o.rc, o.msg);
    expect_golden("stories260K/golden_greedy_prompt_LilyAndTom_n64.txt", "Lily and Tom", &o);
    drain(cli, c, &o);
    cr_assert_eq(o.rc, 0, "sampled: %d %s", o.rc, o.msg);
    static char want[8192], got[8192];
    gorgon_run("-p 'The cat' -n 100 --temp 0.8 --top-p 0.9 --seed 7", want, sizeof want);
    snprintf(got, sizeof got, "The cat%.*s\n", (int)o.len, o.text);
    cr_assert_str_eq(got, want, "sampled text differs from the colocated engine's");
    /* top-k with a repetition penalty: the sampler's whole state (RNG and
     * penalty window) moves; compared with a colocated gorgond below */
    const gorgon_gen_params pen = {.prompt = "The cat", .max_tokens = 80, .temperature = 1.0f,
                                   .top_k = 20, .repeat_penalty = 1.3f, .seed = 11};
    static gen_out penalised;
    run_one(cli, &pen, &penalised);
    cr_assert_eq(penalised.rc, 0, "%d %s", penalised.rc, penalised.msg);
    /* a one-token request ends in the prefill group, without a hand-off */
    run_one(cli, &(gorgon_gen_params){.prompt = "", .max_tokens = 1}, &o);
    cr_assert_eq(o.rc, 0);
    cr_assert_eq(o.last.usage.completion_tokens, 1u);
    /* one the decode group could never adopt (125 blocks of 120) is refused
     * before its prompt runs: no token, no hand-off */
    run_one(cli, &(gorgon_gen_params){.prompt = "", .max_tokens = 1990}, &o);
    cr_assert_eq(o.rc, -E2BIG, "%d %s", o.rc, o.msg);
    cr_assert_eq(o.len, 0u);
    cr_assert(strstr(o.msg, "needs 125 KV blocks"), "%s", o.msg);
    AT_WAIT_UNTIL(pool_whole(cli, 120), AT_WAIT_MS, "blocks still in use after the requests");
    cr_assert_eq(groups(cli, g), 2);
    cr_assert(g[0].handoffs_total == 4 && g[1].handoffs_total == 4,
              "hand-offs %llu out, %llu adopted (want 4 and 4)",
              (unsigned long long)g[0].handoffs_total, (unsigned long long)g[1].handoffs_total);
    cr_assert_eq(ap_stats(cli).gen_handoffs_total, 4u);
    /* gorgon stats names the roles */
    char cmd[PATH_MAX + 64], out[8192];
    snprintf(cmd, sizeof cmd, "'%s' stats --socket '%s'", tu_bin("gorgon"), gd.sock);
    FILE *p = popen(cmd, "r");
    cr_assert_not_null(p);
    size_t n = fread(out, 1, sizeof out - 1, p);
    out[n] = 0;
    cr_assert_eq(pclose(p), 0);
    cr_assert(strstr(out, "ready prefill, pids") && strstr(out, "ready decode, pids") &&
                  strstr(out, "handoffs_total      4"),
              "gorgon stats:\n%s", out);
    gorgon_close(cli);
    GD_END(&gd);
    AT_START(&colo, "--model", model_buf, "--threads", "1", NULL);
    cli = gd_connect(&colo, 0);
    run_one(cli, &pen, &o);
    cr_assert_eq(o.rc, 0, "%d %s", o.rc, o.msg);
    cr_assert(o.len == penalised.len && memcmp(o.text, penalised.text, o.len) == 0,
              "penalised text differs from the colocated gorgond's:\n%.*s\n%.*s",
              (int)penalised.len, penalised.text, (int)o.len, o.text);
    gorgon_close(cli);
    GD_END(&colo);
}

/* tp = 2 on both sides: rank r of the prefill group hands its heads' KV to
 * rank r of the decode group through pool r. */
Test(appliance_disagg, tp2_groups_hand_off_rank_by_rank, .fini = teardown, .timeout = 120)
{
    START("--tp", "2", NULL);
    gorgon_client *cli = gd_connect(&gd, 0);
    uint32_t a, b;
    cr_assert_eq(gorgon_generate_submit(cli, &(gorgon_gen_params){.prompt = "", .max_tokens = 256},
                                        1, &a),
                 0);
    cr_assert_eq(gorgon_generate_submit(cli,
                                        &(gorgon_gen_params){.prompt = "The cat",
                                                             .max_tokens = 100,
                                                             .temperature = 0.8f,
                                                             .top_k = 40,
                                                             .top_p = 0.9f,
                                                             .seed = 7},
                                        2, &b),
                 0);
    static gen_out o;
    drain(cli, a, &o);
    cr_assert_eq(o.rc, 0, "%d %s", o.rc, o.msg);
    expect_golden("stories260K/golden_greedy_n256.txt", "", &o);
    drain(cli, b, &o);
    cr_assert_eq(o.rc, 0, "%d %s", o.rc, o.msg);
    static char want[8192], got[8192];
    gorgon_run("-p 'The cat' -n 100 --temp 0.8 --top-k 40 --top-p 0.9 --seed 7", want,
               sizeof want);
    snprintf(got, sizeof got, "The cat%.*s\n", (int)o.len, o.text);
    cr_assert_str_eq(got, want, "TP 2 disaggregated text differs from TP 1 colocated");
    gorgon_group g[4];
    cr_assert_eq(groups(cli, g), 2);
    cr_assert(g[0].n_ranks == 2 && g[1].n_ranks == 2 && g[1].handoffs_total == 2,
              "ranks %u %u, adopted %llu", g[0].n_ranks, g[1].n_ranks,
              (unsigned long long)g[1].handoffs_total);
    gorgon_close(cli);
    GD_END(&gd);
}

/* Medusa runs in the decode group only, and stays lossless (TP 2). */
Test(appliance_disagg, medusa_in_the_decode_group_serves_the_golden, .fini = teardown,
     .timeout = 180)
{
    snprintf(heads_dir, sizeof heads_dir, "/tmp/gorgon-dis-heads-XXXXXX");
    cr_assert_not_null(mkdtemp(heads_dir));
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "'%s' --model '%s' --out '%s' --seqs 32 --len 48 --epochs 1 "
                              "--heads 2 >/dev/null 2>&1",
             tu_bin("gorgon-medusa-train"), tu_model_path("stories260K/stories260K.gguf"),
             heads_dir);
    cr_assert_eq(system(cmd), 0, "gorgon-medusa-train failed");
    /* (with TP 2 and a tree: the longest worker command line gorgond builds) */
    START("--tp", "2", "--medusa", heads_dir, "--medusa-max-batch", "4", "--medusa-tree",
          "[[0],[0,0],[1]]", NULL);
    gorgon_client *cli = gd_connect(&gd, 0);
    static gen_out o, plain;
    run_one(cli, &(gorgon_gen_params){.prompt = "", .max_tokens = 256}, &o);
    cr_assert_eq(o.rc, 0, "%d %s", o.rc, o.msg);
    expect_golden("stories260K/golden_greedy_n256.txt", "", &o);
    cr_assert_gt(ap_stats(cli).medusa_steps, 0, "no Medusa step ran");
    cr_assert_gt(o.last.usage.medusa_steps, 0u);
    run_one(cli,
            &(gorgon_gen_params){.prompt = "Lily and Tom", .max_tokens = 60,
                                 .flags = GORGON_GEN_NO_MEDUSA},
            &plain);
    cr_assert_eq(plain.rc, 0);
    cr_assert_eq(plain.last.usage.medusa_steps, 0u);
    expect_golden("stories260K/golden_greedy_prompt_LilyAndTom_n64.txt", "Lily and Tom", &plain);
    gorgon_close(cli);
    GD_END(&gd);
}

/* ---- many clients ------------------------------------------------------------ */

#define N_CLI 16
#define PER_CLI 8
#define N_REQ (N_CLI * PER_CLI)
#define OUT_TOK 24

static int32_t prompts[N_REQ][1024];
static size_t prompt_len[N_REQ];
static char solo[N_REQ][2048];
static char got_text[N_REQ][2048];
static int got_rc[N_REQ];

static void make_prompts(void)
{
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (int i = 0; i < N_REQ; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        prompt_len[i] = 8 + (size_t)(x % 993); /* 8 .. 1000 */
        prompts[i][0] = 1;
        for (size_t j = 1; j < prompt_len[i]; j++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            prompts[i][j] = 10 + (int32_t)(x % 490);
        }
    }
}

static gorgon_gen_params prompt_params(int i)
{
    return (gorgon_gen_params){.prompt_ids = prompts[i], .n_ids = prompt_len[i],
                               .max_tokens = OUT_TOK, .flags = GORGON_GEN_PROMPT_IDS};
}

static void *client_thread(void *arg)
{
    const int c = (int)(intptr_t)arg;
    gorgon_client *cli = gd_connect(&gd, 0);
    if (!cli) {
        for (int k = 0; k < PER_CLI; k++)
            got_rc[c * PER_CLI + k] = -ECONNREFUSED;
        return NULL;
    }
    uint32_t req[PER_CLI];
    for (int k = 0; k < PER_CLI; k++) {
        gorgon_gen_params p = prompt_params(c * PER_CLI + k);
        got_rc[c * PER_CLI + k] = gorgon_generate_submit(cli, &p, (uint64_t)k, &req[k]);
    }
    static __thread gen_out o;
    for (int k = 0; k < PER_CLI; k++) {
        const int i = c * PER_CLI + k;
        if (got_rc[i] < 0)
            continue;
        drain(cli, req[k], &o);
        got_rc[i] = o.rc;
        snprintf(got_text[i], sizeof got_text[i], "%.*s", (int)o.len, o.text);
    }
    gorgon_close(cli);
    return NULL;
}

/* A small pool (prompts of up to 1,000 tokens take 63 blocks): the decode
 * group can adopt only a few at once, so finished prefills wait in the
 * prefill group's pool (back-pressure) and requests queue in both. */
Test(appliance_disagg, sixteen_clients_mixed_lengths_get_their_solo_answers_no_block_leaks,
     .fini = teardown, .timeout = 600)
{
    START("--kv-blocks", "260", "--max-requests", "256", "--max-requests-per-session", "64",
          NULL);
    gorgon_client *cli = gd_connect(&gd, 0);
    AT_WAIT_UNTIL(pool_whole(cli, 260), AT_WAIT_MS, "the groups did not get ready");
    make_prompts();
    static gen_out o;
    for (int i = 0; i < N_REQ; i++) {
        gorgon_gen_params p = prompt_params(i);
        run_one(cli, &p, &o);
        cr_assert_eq(o.rc, 0, "solo %d: %d %s", i, o.rc, o.msg);
        snprintf(solo[i], sizeof solo[i], "%.*s", (int)o.len, o.text);
    }
    pthread_t th[N_CLI];
    for (int c = 0; c < N_CLI; c++)
        cr_assert_eq(pthread_create(&th[c], NULL, client_thread, (void *)(intptr_t)c), 0);
    uint64_t waited_max = 0;
    for (int c = 0; c < N_CLI; c++) {
        while (pthread_tryjoin_np(th[c], NULL) != 0) {
            gorgon_counters st = ap_stats(cli);
            if (st.gen_handoff_waiting > waited_max)
                waited_max = st.gen_handoff_waiting;
            gd_sleep_ms(5);
        }
    }
    for (int i = 0; i < N_REQ; i++) {
        cr_assert_eq(got_rc[i], 0, "request %d (%zu-token prompt): %d", i, prompt_len[i],
                     got_rc[i]);
        cr_assert_str_eq(got_text[i], solo[i], "request %d (%zu-token prompt) differs from solo",
                         i, prompt_len[i]);
    }
    cr_assert_gt(waited_max, 0, "no request ever waited for the decode group's room");
    AT_WAIT_UNTIL(pool_whole(cli, 260), AT_WAIT_MS, "KV blocks leaked: not all free again");
    gorgon_counters st = ap_stats(cli);
    cr_assert_eq(st.gen_handoffs_total, 2u * N_REQ);
    cr_assert_eq(st.gen_failed, 0u);
    gorgon_close(cli);
    GD_END(&gd);
}

/* ---- failures ------------------------------------------------------------------- */

/* Kill one side (group 0: prefill, 1: decode) just as the first request
 * is handed off, three times: every request either ends exactly as it
 * does alone or fails with -EIO naming the dead worker; requests the
 * other side held go on; afterwards the pool is whole and both serve. */
static void kill_at_handoff(int victim)
{
    START("--kv-blocks", "260", NULL);
    gorgon_client *cli = gd_connect(&gd, 0);
    AT_WAIT_UNTIL(pool_whole(cli, 260), AT_WAIT_MS, "the groups did not get ready");
    make_prompts();
    enum { N = 6 };
    static gen_out o;
    for (int i = 0; i < N; i++) {
        gorgon_gen_params p = prompt_params(i);
        p.max_tokens = 200;
        run_one(cli, &p, &o);
        cr_assert_eq(o.rc, 0);
        snprintf(solo[i], sizeof solo[i], "%.*s", (int)o.len, o.text);
    }
    int failed_total = 0, ok_total = 0;
    for (int round = 0; round < 3; round++) {
        gorgon_group g[4];
        cr_assert_eq(groups(cli, g), 2);
        const pid_t pid = g[victim].pid[0];
        uint32_t req[N];
        for (int i = 0; i < N; i++) {
            gorgon_gen_params p = prompt_params(i);
            p.max_tokens = 200;
            cr_assert_eq(gorgon_generate_submit(cli, &p, (uint64_t)i, &req[i]), 0);
        }
        /* the first token of the first request: it is being handed off */
        gorgon_gen_chunk ch;
        cr_assert_eq(gorgon_generate_next(cli, req[0], &ch, 60000000000ll), 1);
        cr_assert_eq(kill(pid, SIGKILL), 0);
        for (int i = 0; i < N; i++) {
            drain(cli, req[i], &o);
            if (o.rc == -EIO) {
                failed_total++;
                cr_assert(strstr(o.msg, "killed by signal 9") || strstr(o.msg, "died"),
                          "round %d request %d: %s", round, i, o.msg);
                continue;
            }
            cr_assert_eq(o.rc, 0, "round %d request %d: %d %s", round, i, o.rc, o.msg);
            ok_total++;
            /* the first chunk of request 0 was read above */
            const char *want = solo[i];
            if (i == 0) {
                cr_assert(strncmp(want, ch.text, ch.len) == 0, "first chunk differs");
                want += ch.len;
            }
            cr_assert_str_eq(o.text, want, "round %d request %d differs from solo", round, i);
        }
        AT_WAIT_UNTIL(pool_whole(cli, 260), AT_WAIT_MS,
                      "round %d: the pool is not whole again after the restart", round);
        cr_assert_eq(groups(cli, g), 2);
        cr_assert_neq(g[victim].pid[0], pid, "not restarted");
        cr_assert_eq(g[victim].restarts, (uint64_t)round + 1);
        cr_assert_eq(g[1 - victim].restarts, 0u, "the other group was restarted");
    }
    cr_assert_gt(failed_total, 0, "no request failed: the kills missed");
    if (victim == 0)
        cr_assert_gt(ok_total, 0, "no handed-off request survived the prefill group's death");
    run_one(cli, &(gorgon_gen_params){.prompt = "", .max_tokens = 256}, &o);
    cr_assert_eq(o.rc, 0, "%d %s", o.rc, o.msg);
    expect_golden("stories260K/golden_greedy_n256.txt", "", &o);
    gorgon_close(cli);
    GD_END(&gd);
}

Test(appliance_disagg, prefill_group_killed_at_handoff_fails_only_what_it_held,
     .fini = teardown, .timeout = 300)
{
    kill_at_handoff(0);
}

Test(appliance_disagg, decode_group_killed_at_handoff_fails_its_requests_pool_whole,
     .fini = teardown, .timeout = 300)
{
    kill_at_handoff(1);
}

Test(appliance_disagg, bad_configurations_are_refused, .timeout = 60)
{
    char bin[PATH_MAX], out[4096];
    cr_assert_eq(gd_find_binary(bin, sizeof bin), 0);
    const char *mode[] = {bin, "--foreground", "--socket", "/tmp/gorgon-dis-never.sock",
                          "--mode", "split", NULL};
    int st = gd_run_stderr(mode, false, out, sizeof out);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) != 0);
    cr_assert(strstr(out, "mode: 'split' is not colocated or disaggregated"), "stderr: %s", out);
    const char *reps[] = {bin, "--foreground", "--socket", "/tmp/gorgon-dis-never.sock",
                          "--mode", "disaggregated", "--replicas", "2", NULL};
    st = gd_run_stderr(reps, false, out, sizeof out);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) != 0);
    cr_assert(strstr(out, "replicas = 2 is for mode = colocated"), "stderr: %s", out);
}
