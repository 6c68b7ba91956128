/* Generation through gorgond end to end: a real gorgond with --model spawns
 * a real gorgon-worker; clients stream through libgorgon. Golden outputs of
 * the engine must come back byte for byte, concurrent batched requests must
 * equal the same requests run alone, bad parameters fail only their request. */
#include <criterion/criterion.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "clients/gorgon.h"
#include "ipc/ipc.h"
#include "tests/appliance/util/wait.h"
#include "tests/clients/util/gd_proc.h"
#include "tests/util/test_models.h"

static gd_proc gd;

static void teardown(void)
{
    gd_stop(&gd);
}

#define S260 "stories260K/stories260K.gguf"

static char model_buf[PATH_MAX];

#define START_GORGOND(...) AT_START(&gd, __VA_ARGS__)

#define START_WITH_MODEL(...)                                                                \
    do {                                                                                     \
        snprintf(model_buf, sizeof(model_buf), "%s", tu_model_path(S260));                      \
        START_GORGOND("--model", model_buf, __VA_ARGS__);                                    \
    } while (0)

typedef struct gen_out {
    char text[8192];
    size_t len;
    int rc;          /* gorgon_generate_next's last return */
    gorgon_gen_chunk last;
    char msg[256];   /* error message */
} gen_out;

/* Run one request to its end. */
static void run_one(gorgon_client *cli, const gorgon_gen_params *p, gen_out *o)
{
    memset(o, 0, sizeof(*o));
    uint32_t req;
    int rc = gorgon_generate_submit(cli, p, 1, &req);
    cr_assert_eq(rc, 0, "submit: %s", gorgon_strerror(rc));
    gorgon_gen_chunk ch;
    for (;;) {
        rc = gorgon_generate_next(cli, req, &ch, 20000000000ll);
        cr_assert(rc != -ETIMEDOUT || ch.done, "generation timed out");
        if (!ch.error && ch.len) {
            cr_assert_lt(o->len + ch.len, sizeof(o->text));
            memcpy(o->text + o->len, ch.text, ch.len);
            o->len += ch.len;
        }
        if (rc != 1)
            break;
    }
    o->rc = rc;
    o->last = ch;
    if (ch.error)
        snprintf(o->msg, sizeof(o->msg), "%.*s", (int)ch.len, ch.text);
}

/* gorgond's counters say the worker holds no request and no KV block. */
static bool worker_idle(gorgon_client *cli, gorgon_counters *st)
{
    cr_assert_eq(gorgon_stats(cli, st), 0);
    return st->kv_blocks_used == 0 && st->gen_running == 0 && st->gen_queued == 0;
}

static void expect_golden(const char *golden, const char *prefix, const gen_out *o)
{
    FILE *f = fopen(tu_model_path(golden), "rb");
    cr_assert_not_null(f);
    static char want[1 << 16];
    size_t n = fread(want, 1, sizeof(want), f);
    fclose(f);
    static char got[1 << 16];
    int k = snprintf(got, sizeof(got), "%s%.*s\n", prefix, (int)o->len, o->text);
    size_t i = 0;
    while (i < n && i < (size_t)k && want[i] == got[i])
        i++;
    cr_assert(i == n && n == (size_t)k,
              "%s: first difference at byte %zu (got %d bytes, want %zu)\n got: %.60s\nwant: %.60s",
              golden, i, k, n, got + (i > 20 ? i - 20 : 0), want + (i > 20 ? i - 20 : 0));
}

/* tests/engine/test_golden.c runs eng_generate with `steps` positions
 * including BOS and the prompt, printing the prompt (after BOS) and then the
 * generated text and a final newline: through gorgond that is max_tokens =
 * steps - prompt tokens + 1 (BOS included in the prompt tokens) and the
 * prompt text prepended. */
Test(appliance_generate, greedy_from_bos_matches_golden_n256, .fini = teardown, .timeout = 60)
{
    START_WITH_MODEL(NULL);
    gorgon_client *cli = gd_connect(&gd, 0);
    gen_out o;
    run_one(cli, &(gorgon_gen_params){.prompt = "", .max_tokens = 256}, &o);
    cr_assert_eq(o.rc, 0, "generate failed: %d %s", o.rc, o.msg);
    cr_assert_eq(o.last.usage.prompt_tokens, 1);
    cr_assert_eq(o.last.finish, GORGON_FINISH_LENGTH);
    cr_assert_eq(o.last.usage.completion_tokens, 256);
    cr_assert_gt(o.last.usage.ttft_ns, 0);
    cr_assert_geq(o.last.usage.total_ns, o.last.usage.ttft_ns);
    expect_golden("stories260K/golden_greedy_n256.txt", "", &o);
    gorgon_close(cli);
    GD_END(&gd);
}

Test(appliance_generate, greedy_prompt_matches_golden_lily_and_tom_n64, .fini = teardown,
     .timeout = 60)
{
    START_WITH_MODEL(NULL);
    gorgon_client *cli = gd_connect(&gd, 0);
    gen_out o;
    /* "Lily and Tom" is BOS + 4 tokens: steps 64 -> 60 new tokens. */
    run_one(cli, &(gorgon_gen_params){.prompt = "Lily and Tom", .max_tokens = 60}, &o);
    cr_assert_eq(o.rc, 0, "generate failed: %d %s", o.rc, o.msg);
    cr_assert_eq(o.last.usage.prompt_tokens, 5);
    expect_golden("stories260K/golden_greedy_prompt_LilyAndTom_n64.txt", "Lily and Tom", &o);
    gorgon_close(cli);
    GD_END(&gd);
}

Test(appliance_generate, token_ids_in_and_out_match_text, .fini = teardown, .timeout = 60)
{
    START_WITH_MODEL(NULL);
    gorgon_client *cli = gd_connect(&gd, 0);
    gen_out text;
    run_one(cli, &(gorgon_gen_params){.prompt = "", .max_tokens = 40}, &text);
    cr_assert_eq(text.rc, 0, "%s", text.msg);
    /* Same request with ids in (BOS = 1) and ids out. */
    int32_t bos = 1;
    uint32_t req;
    cr_assert_eq(gorgon_generate_submit(cli,
                                        &(gorgon_gen_params){.prompt_ids = &bos, .n_ids = 1,
                                                             .max_tokens = 40,
                                                             .flags = GORGON_GEN_PROMPT_IDS |
                                                                      GORGON_GEN_WANT_IDS},
                                        2, &req),
                 0);
    int32_t ids[64];
    size_t n = 0;
    gorgon_gen_chunk ch;
    int rc;
    while ((rc = gorgon_generate_next(cli, req, &ch, 20000000000ll)) >= 0) {
        cr_assert_leq(n + ch.n_ids, 64);
        if (ch.n_ids)
            memcpy(ids + n, ch.ids, ch.n_ids * sizeof(int32_t));
        n += ch.n_ids;
        if (rc == 0)
            break;
    }
    cr_assert_eq(rc, 0);
    cr_assert_eq(n, 40, "got %zu ids", n);
    cr_assert_eq(ch.usage.completion_tokens, 40);
    for (size_t i = 0; i < n; i++)
        cr_assert(ids[i] >= 0 && ids[i] < 512);
    gorgon_close(cli);
    GD_END(&gd);
}

Test(appliance_generate, stop_string_ends_text_before_it, .fini = teardown, .timeout = 60)
{
    START_WITH_MODEL(NULL);
    gorgon_client *cli = gd_connect(&gd, 0);
    gen_out o;
    const char *stop[] = {"park"};
    run_one(cli, &(gorgon_gen_params){.prompt = "Lily and Tom", .max_tokens = 60, .stop = stop,
                                      .n_stop = 1},
            &o);
    cr_assert_eq(o.rc, 0, "%s", o.msg);
    cr_assert_eq(o.last.finish, GORGON_FINISH_STOP);
    cr_assert_str_eq((o.text[o.len] = 0, o.text), " were playing in the ");
    /* The worker was told to stop: its KV goes back. */
    gorgon_counters st;
    AT_WAIT_UNTIL(worker_idle(cli, &st), AT_WAIT_MS,
                  "KV not freed after a stop string: %llu blocks used, %llu running",
                  (unsigned long long)st.kv_blocks_used, (unsigned long long)st.gen_running);
    gorgon_close(cli);
    GD_END(&gd);
}

Test(appliance_generate, bad_params_fail_only_that_request, .fini = teardown, .timeout = 60)
{
    START_WITH_MODEL(NULL);
    gorgon_client *cli = gd_connect(&gd, 0);
    struct {
        gorgon_gen_params p;
        const char *word; /* gorgond's message names the field */
    } bad[] = {
        {{.prompt = "x", .max_tokens = 4096}, "context"},
        {{.prompt = "x", .max_tokens = 4, .top_k = 100000}, "top_k"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        gen_out o;
        run_one(cli, &bad[i].p, &o);
        cr_assert_eq(o.rc, -EINVAL, "case %zu: rc %d", i, o.rc);
        cr_assert_eq(o.last.finish, GORGON_FINISH_ERROR);
        cr_assert(strstr(o.msg, bad[i].word), "case %zu: message '%s' lacks '%s'", i, o.msg,
                  bad[i].word);
        /* and the next good request works */
        run_one(cli, &(gorgon_gen_params){.prompt = "", .max_tokens = 3}, &o);
        cr_assert_eq(o.rc, 0, "good request after bad case %zu: %s", i, o.msg);
    }
    /* What needs no model is refused by the library before anything is
     * sent, with the message gorgond gives for the same field (checked
     * against a raw descriptor carrying the same value). */
    struct {
        gorgon_gen_params p;
        struct ipc_gen_params raw;
        const char *word;
    } lib[] = {
        {{.prompt = "x", .max_tokens = 4, .temperature = -1.0f},
         {.max_tokens = 4, .top_p = 1.0f, .temperature = -1.0f}, "temperature"},
        {{.prompt = "x", .max_tokens = 4, .min_p = 2.0f},
         {.max_tokens = 4, .top_p = 1.0f, .min_p = 2.0f}, "min_p"},
        {{.prompt = "x", .max_tokens = 4, .top_p = 2.0f}, {.max_tokens = 4, .top_p = 2.0f}, "top_p"},
        {{.prompt = "x", .max_tokens = 4, .top_p = __builtin_nanf("")},
         {.max_tokens = 4, .top_p = __builtin_nanf("")}, "top_p"},
        {{.prompt = "x", .max_tokens = 0}, {.max_tokens = 0, .top_p = 1.0f}, "max_tokens"},
        {{.prompt = "x", .max_tokens = 4, .top_k = -1},
         {.max_tokens = 4, .top_p = 1.0f, .top_k = -1}, "top_k"},
    };
    for (size_t i = 0; i < sizeof(lib) / sizeof(lib[0]); i++) {
        uint32_t req;
        uint32_t inflight = gorgon_inflight(cli);
        cr_assert_eq(gorgon_generate_submit(cli, &lib[i].p, 1, &req), -EINVAL, "lib case %zu", i);
        cr_assert_eq(gorgon_inflight(cli), inflight, "lib case %zu: something was sent", i);
        char mine[256];
        snprintf(mine, sizeof(mine), "%s", gorgon_last_error(cli));
        cr_assert(strstr(mine, lib[i].word), "lib case %zu: '%s' lacks '%s'", i, mine,
                  lib[i].word);
        int slot = gorgon_slot_acquire(cli);
        cr_assert_geq(slot, 0);
        memcpy(gorgon_slot_input(cli, (uint32_t)slot, NULL), &lib[i].raw, sizeof(lib[i].raw));
        cr_assert_eq(gorgon_submit(cli, &(gorgon_request){.opcode = GORGON_OP_GENERATE,
                                                          .slot = (uint32_t)slot,
                                                          .in_len = sizeof(lib[i].raw),
                                                          .user_data = 8}),
                     0);
        gorgon_completion c;
        cr_assert_eq(gorgon_wait(cli, &c, 1, 5000000000ll), 1);
        cr_assert_eq(c.result, -EINVAL, "lib case %zu: gorgond said %d", i, c.result);
        cr_assert(c.out_len == strlen(mine) && !memcmp(mine, c.out, c.out_len),
                  "lib case %zu: library '%s', gorgond '%.*s'", i, mine, (int)c.out_len,
                  (const char *)c.out);
        gorgon_slot_release(cli, (uint32_t)slot);
    }
    /* Raw descriptors: an unknown flag bit, and a too-short parameter block. */
    int slot = gorgon_slot_acquire(cli);
    cr_assert_geq(slot, 0);
    struct ipc_gen_params gp = {.flags = 0x80, .max_tokens = 4, .top_p = 1.0f};
    memcpy(gorgon_slot_input(cli, (uint32_t)slot, NULL), &gp, sizeof(gp));
    cr_assert_eq(gorgon_submit(cli, &(gorgon_request){.opcode = GORGON_OP_GENERATE,
                                                      .slot = (uint32_t)slot,
                                                      .in_len = sizeof(gp), .user_data = 9}),
                 0);
    gorgon_completion c;
    cr_assert_eq(gorgon_wait(cli, &c, 1, 5000000000ll), 1);
    cr_assert_eq(c.result, -EINVAL);
    cr_assert(c.out_len && strstr(c.out, "flags"));
    cr_assert_eq(gorgon_submit(cli, &(gorgon_request){.opcode = GORGON_OP_GENERATE,
                                                      .slot = (uint32_t)slot, .in_len = 8,
                                                      .user_data = 10}),
                 0);
    cr_assert_eq(gorgon_wait(cli, &c, 1, 5000000000ll), 1);
    cr_assert_eq(c.result, -EINVAL);
    gorgon_slot_release(cli, (uint32_t)slot);
    gorgon_close(cli);
    GD_END(&gd);
}

/* A prompt larger than a slot's input goes ahead in pieces: with 256-byte
 * slots, an 860-byte prompt (and its token-id form) must give what
 * the same prompt gives inline through 16 KiB slots; a prompt no context
 * could hold is refused with a message, and the connection goes on. */
Test(appliance_generate, prompts_larger_than_a_slot_are_accepted, .fini = teardown, .timeout = 90)
{
    char prompt[1024] = "";
    for (int i = 0; i < 20; i++)
        strcat(prompt, "Once upon a time, there was a little girl. ");
    cr_assert_eq(strlen(prompt), 860);
    gorgon_gen_params p = {.prompt = prompt, .max_tokens = 24};

    START_WITH_MODEL(NULL);
    gorgon_client *cli = gd_connect(&gd, 0);
    gen_out inline_o;
    run_one(cli, &p, &inline_o);
    cr_assert_eq(inline_o.rc, 0, "%s", inline_o.msg);
    int32_t ids[1024];
    int n_ids = gorgon_tokenize(cli, prompt, strlen(prompt), GORGON_TOK_ADD_BOS, ids, 1024);
    cr_assert_gt(n_ids, 64, "tokenize: %d", n_ids);
    gorgon_close(cli);
    GD_END(&gd);

    START_WITH_MODEL("--slot-in-bytes", "256", NULL);
    cli = gd_connect(&gd, 0);
    gen_out staged;
    run_one(cli, &p, &staged);
    cr_assert_eq(staged.rc, 0, "%s", staged.msg);
    cr_assert_eq(staged.last.usage.prompt_tokens, inline_o.last.usage.prompt_tokens);
    cr_assert_eq(staged.len, inline_o.len);
    cr_assert_eq(memcmp(staged.text, inline_o.text, staged.len), 0,
                 "staged prompt gave other text:\n%.*s\ninline:\n%.*s", (int)staged.len,
                 staged.text, (int)inline_o.len, inline_o.text);
    gorgon_gen_params pi = {.prompt_ids = ids, .n_ids = (size_t)n_ids, .max_tokens = 24,
                            .flags = GORGON_GEN_PROMPT_IDS};
    cr_assert_gt(pi.n_ids * sizeof(int32_t), 256);
    gen_out by_ids;
    run_one(cli, &pi, &by_ids);
    cr_assert_eq(by_ids.rc, 0, "%s", by_ids.msg);
    cr_assert_eq(by_ids.len, inline_o.len);
    cr_assert_eq(memcmp(by_ids.text, inline_o.text, by_ids.len), 0);

    /* 70 KB: more than the 2048-token context can hold however it tokenizes. */
    static char huge[70000];
    memset(huge, 'a', sizeof(huge) - 1);
    gorgon_gen_params ph = {.prompt = huge, .max_tokens = 4};
    uint32_t req;
    int rc = gorgon_generate_submit(cli, &ph, 1, &req);
    cr_assert_eq(rc, -EMSGSIZE, "70 KB prompt: %d", rc);
    cr_assert(strstr(gorgon_last_error(cli), "context"), "%s", gorgon_last_error(cli));
    gen_out after;
    run_one(cli, &p, &after);
    cr_assert_eq(after.rc, 0, "the connection goes on: %s", after.msg);
    cr_assert_eq(after.len, inline_o.len);
    gorgon_close(cli);
    GD_END(&gd);
}

/* A handle kept after its request ended names nothing, even when the slot
 * runs a newer request: cancelling it must not touch that one. */
Test(appliance_generate, stale_handles_are_refused, .fini = teardown, .timeout = 60)
{
    START_WITH_MODEL(NULL);
    gorgon_client *cli = gd_connect(&gd, 0);
    gorgon_gen_params p = {.prompt = "Once upon a time", .max_tokens = 3};
    uint32_t old;
    cr_assert_eq(gorgon_generate_submit(cli, &p, 1, &old), 0);
    gorgon_gen_chunk ch;
    int rc;
    while ((rc = gorgon_generate_next(cli, old, &ch, 10000000000ll)) == 1) {
    }
    cr_assert_eq(rc, 0);
    /* The freed slot is handed out again (lowest first): same slot, new handle. */
    gorgon_gen_params p2 = {.prompt = "Once upon a time", .max_tokens = 40};
    uint32_t cur;
    cr_assert_eq(gorgon_generate_submit(cli, &p2, 2, &cur), 0);
    cr_assert_neq(cur, old);
    cr_assert_eq(gorgon_cancel(cli, old), -ENOENT);
    cr_assert(strstr(gorgon_last_error(cli), "not a running generation"), "%s",
              gorgon_last_error(cli));
    cr_assert_eq(gorgon_generate_next(cli, old, &ch, 0), -EINVAL);
    cr_assert_eq(gorgon_cancel(cli, 0), -ENOENT, "handle 0 is never issued");
    cr_assert_eq(gorgon_cancel(cli, 0xffffffffu), -ENOENT);
    /* The newer request runs to its end, untouched. */
    uint32_t n = 0;
    while ((rc = gorgon_generate_next(cli, cur, &ch, 10000000000ll)) == 1) {
    }
    cr_assert_eq(rc, 0, "the newer request ended with %d (%s)", rc, gorgon_finish_name(ch.finish));
    n = ch.usage.completion_tokens;
    cr_assert(ch.finish == GORGON_FINISH_LENGTH || ch.finish == GORGON_FINISH_EOS, "finish %s",
              gorgon_finish_name(ch.finish));
    cr_assert_gt(n, 3);
    gorgon_close(cli);
    GD_END(&gd);
}

Test(appliance_generate, without_model_generate_is_enotsup_with_message, .fini = teardown,
     .timeout = 30)
{
    START_GORGOND(NULL);
    gorgon_client *cli = gd_connect(&gd, 0);
    gen_out o;
    run_one(cli, &(gorgon_gen_params){.prompt = "hi", .max_tokens = 4}, &o);
    cr_assert_eq(o.rc, -ENOTSUP);
    cr_assert(strstr(o.msg, "--model"), "%s", o.msg);
    uint64_t rtt;
    cr_assert_eq(gorgon_ping(cli, "abc", 3, 1000000000, &rtt), 3);
    gorgon_close(cli);
    GD_END(&gd);
}

Test(appliance_generate, cancel_ends_stream_and_frees_kv, .fini = teardown, .timeout = 60)
{
    START_WITH_MODEL(NULL);
    gorgon_client *cli = gd_connect(&gd, 0);
    uint32_t req;
    cr_assert_eq(gorgon_generate_submit(cli, &(gorgon_gen_params){.prompt = "", .max_tokens = 2000},
                                        1, &req),
                 0);
    gorgon_gen_chunk ch;
    int rc = gorgon_generate_next(cli, req, &ch, 20000000000ll);
    cr_assert_eq(rc, 1, "first chunk: %d", rc);
    cr_assert_eq(gorgon_cancel(cli, req), 0);
    while ((rc = gorgon_generate_next(cli, req, &ch, 20000000000ll)) == 1)
        ;
    cr_assert_eq(rc, -ECANCELED);
    cr_assert_eq(ch.finish, GORGON_FINISH_CANCELLED);
    cr_assert_lt(ch.usage.completion_tokens, 2000);
    cr_assert_eq(gorgon_cancel(cli, req), -ENOENT);
    gorgon_counters st;
    AT_WAIT_UNTIL(worker_idle(cli, &st), AT_WAIT_MS,
                  "KV still used after cancel: %llu blocks, %llu running",
                  (unsigned long long)st.kv_blocks_used, (unsigned long long)st.gen_running);
    gorgon_close(cli);
    GD_END(&gd);
}

/* ---- continuous batching: 16 clients x 8 requests at once ---------------------- */

#define N_CLIENTS 16
#define N_REQ 8
#define N_COMBO 24

static const char *prompts[6] = {
    "", "Lily and Tom", "Once upon a time", "The dog", "One day, a little girl named Sue went",
    "Tim had a red ball. He",
};

static gorgon_gen_params combo(int k)
{
    static const int lens[4] = {5, 17, 40, 72};
    return (gorgon_gen_params){.prompt = prompts[k % 6], .max_tokens = lens[(k / 6) % 4]};
}

static gen_out alone[N_COMBO];

struct client_arg {
    int id;
    int mismatches;
    char err[256];
};

static void *client_main(void *p)
{
    struct client_arg *a = p;
    gorgon_client *cli;
    gorgon_opts o = {.socket_path = gd.sock};
    if (gorgon_connect(&cli, &o) < 0) {
        snprintf(a->err, sizeof(a->err), "connect failed");
        return NULL;
    }
    uint32_t req[N_REQ];
    static _Thread_local char buf[N_REQ][8192];
    size_t len[N_REQ] = {0};
    int done[N_REQ] = {0}, k[N_REQ];
    for (int r = 0; r < N_REQ; r++) {
        k[r] = (a->id * N_REQ + r) % N_COMBO;
        gorgon_gen_params gp = combo(k[r]);
        int rc = gorgon_generate_submit(cli, &gp, (uint64_t)r, &req[r]);
        if (rc < 0) {
            snprintf(a->err, sizeof(a->err), "submit %d: %s", r, gorgon_strerror(rc));
            gorgon_close(cli);
            return NULL;
        }
    }
    /* Read the streams round-robin, a chunk at a time. */
    int left = N_REQ;
    while (left) {
        for (int r = 0; r < N_REQ; r++) {
            if (done[r])
                continue;
            gorgon_gen_chunk ch;
            int rc = gorgon_generate_next(cli, req[r], &ch, 1000000);
            if (rc == -ETIMEDOUT && !ch.done)
                continue;
            if (rc < 0) {
                snprintf(a->err, sizeof(a->err), "request %d failed: %d %.*s", r, rc,
                         (int)ch.len, ch.text);
                gorgon_close(cli);
                return NULL;
            }
            if (ch.len && len[r] + ch.len < sizeof(buf[r])) {
                memcpy(buf[r] + len[r], ch.text, ch.len);
                len[r] += ch.len;
            }
            if (rc == 0) {
                done[r] = 1;
                left--;
                if (len[r] != alone[k[r]].len || memcmp(buf[r], alone[k[r]].text, len[r]) != 0)
                    a->mismatches++;
            }
        }
    }
    gorgon_close(cli);
    return NULL;
}

Test(appliance_generate, sixteen_clients_batched_equal_alone_runs, .fini = teardown,
     .timeout = 240)
{
    START_WITH_MODEL("--max-seqs", "32", "--batch-tokens", "64", NULL);
    gorgon_client *cli = gd_connect(&gd, 0);
    for (int k = 0; k < N_COMBO; k++) {
        gorgon_gen_params gp = combo(k);
        run_one(cli, &gp, &alone[k]);
        cr_assert_eq(alone[k].rc, 0, "alone %d: %s", k, alone[k].msg);
    }
    gorgon_counters st;
    cr_assert_eq(gorgon_stats(cli, &st), 0);
    cr_assert_eq(st.decode_batch_max, 1, "requests run alone batched %llu",
                 (unsigned long long)st.decode_batch_max);
    pthread_t th[N_CLIENTS];
    static struct client_arg args[N_CLIENTS];
    for (int i = 0; i < N_CLIENTS; i++) {
        args[i] = (struct client_arg){.id = i};
        cr_assert_eq(pthread_create(&th[i], NULL, client_main, &args[i]), 0);
    }
    int mism = 0;
    for (int i = 0; i < N_CLIENTS; i++) {
        pthread_join(th[i], NULL);
        cr_assert_eq(args[i].err[0], 0, "client %d: %s", i, args[i].err);
        mism += args[i].mismatches;
    }
    cr_assert_eq(mism, 0, "%d of %d batched outputs differ from the same request alone", mism,
                 N_CLIENTS * N_REQ);
    cr_assert_eq(gorgon_stats(cli, &st), 0);
    cr_assert_gt(st.decode_batch_max, 1, "never batched: decode_batch_max %llu",
                 (unsigned long long)st.decode_batch_max);
    cr_assert_eq(st.gen_requests_total, N_COMBO + N_CLIENTS * N_REQ);
    cr_assert_eq(st.gen_failed, 0);
    gorgon_close(cli);
    GD_END(&gd);
}

/* A request that can never fit the KV pool is refused at once; one that
 * fits only later waits for room instead of failing. */
Test(appliance_generate, kv_admission_waits_or_refuses, .fini = teardown, .timeout = 60)
{
    /* 8 blocks of 16 positions = 128 positions in all. */
    START_WITH_MODEL("--kv-blocks", "8", NULL);
    gorgon_client *cli = gd_connect(&gd, 0);
    gen_out o;
    run_one(cli, &(gorgon_gen_params){.prompt = "", .max_tokens = 200}, &o);
    cr_assert_eq(o.rc, -E2BIG, "rc %d: %s", o.rc, o.msg);
    cr_assert(strstr(o.msg, "KV blocks"), "%s", o.msg);
    /* Two of 100 positions each: the second waits for the first. */
    uint32_t a, b;
    cr_assert_eq(gorgon_generate_submit(cli, &(gorgon_gen_params){.prompt = "", .max_tokens = 100},
                                        1, &a),
                 0);
    cr_assert_eq(gorgon_generate_submit(cli, &(gorgon_gen_params){.prompt = "", .max_tokens = 100},
                                        2, &b),
                 0);
    gorgon_gen_chunk ch;
    int rc;
    uint32_t reqs[2] = {a, b};
    for (int i = 0; i < 2; i++) {
        while ((rc = gorgon_generate_next(cli, reqs[i], &ch, 20000000000ll)) == 1)
            ;
        cr_assert_eq(rc, 0, "request %d: %d %.*s", i, rc, (int)ch.len, ch.text);
        cr_assert_eq(ch.usage.completion_tokens, 100);
    }
    gorgon_close(cli);
    GD_END(&gd);
}

/* Exactly one final completion per request: nothing more arrives after it.
 * Request i+1 is the barrier for request i: the worker answers commands in
 * order and gorgond turns its events into completions in order, so anything
 * gorgond would still post for request i comes before request i+1's final.
 * Completions are reaped raw (gorgon_wait) and told apart by user_data: a
 * late one for request i cannot pass as part of request i+1, which reuses
 * its slot. */
Test(appliance_generate, one_final_per_request_then_silence, .fini = teardown, .timeout = 60)
{
    START_WITH_MODEL(NULL);
    gorgon_client *cli = gd_connect(&gd, 0);
    const int n = 20;
    for (int i = 0; i <= n; i++) { /* request n is the last one's barrier */
        uint64_t ud = 1000 + (uint64_t)i;
        uint32_t req;
        cr_assert_eq(gorgon_generate_submit(
                         cli, &(gorgon_gen_params){.prompt = "", .max_tokens = 1 + i % 3}, ud,
                         &req),
                     0);
        bool final = false;
        while (!final) {
            gorgon_completion c[8];
            int k = gorgon_wait(cli, c, 8, 20000000000ll);
            cr_assert_gt(k, 0, "request %d: no completion in 20 s (%d)", i, k);
            for (int j = 0; j < k; j++) {
                cr_assert_eq(c[j].user_data, ud,
                             "request %d: a completion for user_data %llu (res %d flags %u) "
                             "after that request's final",
                             i, (unsigned long long)c[j].user_data, c[j].result, c[j].flags);
                cr_assert(!final, "request %d: a completion after its own final", i);
                cr_assert_geq(c[j].result, 0, "request %d failed: %d", i, c[j].result);
                final = !(c[j].flags & GORGON_CQE_F_MORE);
            }
        }
    }
    gorgon_completion c;
    cr_assert_eq(gorgon_poll(cli, &c, 1), 0, "a completion after the last final (ud %llu)",
                 (unsigned long long)c.user_data);
    gorgon_close(cli);
    GD_END(&gd);
}

/* Kernels without IORING_OP_FUTEX_WAIT: gorgond sleeps on an eventfd that
 * the worker writes (the same fallback as the client rings). */
Test(appliance_generate, eventfd_doorbells_serve_golden_output, .fini = teardown, .timeout = 60)
{
    START_WITH_MODEL("--eventfd-doorbells", "--poll-us", "0", NULL);
    gorgon_client *cli = gd_connect(&gd, 0);
    gen_out o;
    run_one(cli, &(gorgon_gen_params){.prompt = "Lily and Tom", .max_tokens = 60}, &o);
    cr_assert_eq(o.rc, 0, "generate failed: %d %s", o.rc, o.msg);
    expect_golden("stories260K/golden_greedy_prompt_LilyAndTom_n64.txt", "Lily and Tom", &o);
    gorgon_close(cli);
    GD_END(&gd);
}

/* A prompt prefilled in chunks of 16 tokens (several steps, interleaved
 * with other sequences' decode steps) gives the output of a one-step
 * prefill. */
Test(appliance_generate, chunked_prefill_equals_one_step_prefill, .fini = teardown, .timeout = 120)
{
    static char prompt[4096];
    size_t n = 0;
    for (int i = 0; i < 20; i++)
        n += (size_t)snprintf(prompt + n, sizeof(prompt) - n, "Lily and Tom went to the park %d. ", i);
    static gen_out ref, got;
    START_WITH_MODEL("--batch-tokens", "1024", NULL);
    gorgon_client *cli = gd_connect(&gd, 0);
    run_one(cli, &(gorgon_gen_params){.prompt = prompt, .max_tokens = 40}, &ref);
    cr_assert_eq(ref.rc, 0, "%s", ref.msg);
    cr_assert_gt(ref.last.usage.prompt_tokens, 100);
    gorgon_close(cli);
    GD_END(&gd);

    START_WITH_MODEL("--batch-tokens", "16", NULL);
    cli = gd_connect(&gd, 0);
    gorgon_client *cli2 = gd_connect(&gd, 0);
    /* A decoding neighbour shares every step with the chunks. */
    uint32_t nb;
    cr_assert_eq(gorgon_generate_submit(cli2, &(gorgon_gen_params){.prompt = "", .max_tokens = 300},
                                        5, &nb),
                 0);
    run_one(cli, &(gorgon_gen_params){.prompt = prompt, .max_tokens = 40}, &got);
    cr_assert_eq(got.rc, 0, "%s", got.msg);
    cr_assert(got.len == ref.len && memcmp(got.text, ref.text, ref.len) == 0,
              "chunked prefill changed the output:\n got: %.80s\nwant: %.80s", got.text, ref.text);
    gorgon_gen_chunk ch;
    int rc;
    while ((rc = gorgon_generate_next(cli2, nb, &ch, 20000000000ll)) == 1)
        ;
    cr_assert_eq(rc, 0);
    gorgon_counters st;
    cr_assert_eq(gorgon_stats(cli, &st), 0);
    cr_assert_gt(st.decode_batch_max, 1);
    gorgon_close(cli2);
    gorgon_close(cli);
    GD_END(&gd);
}

/* Bytes of a zero-initialised output ring that hold text by now. */
static size_t ring_bytes_written(const volatile uint8_t *ring, size_t cap)
{
    size_t n = 0;
    for (size_t i = 0; i < cap; i++)
        n += ring[i] != 0;
    return n;
}

/* A 192-byte output ring (the least gorgond accepts: one ipc_stats) and a
 * client that starts reading late: gorgond
 * holds the text back (flow control through out_consumed) and wraps the
 * ring many times; the text arrives whole and in order. */
Test(appliance_generate, small_output_ring_wraps_and_waits_for_reader, .fini = teardown,
     .timeout = 60)
{
    START_WITH_MODEL("--slot-out-bytes", "192", NULL);
    gorgon_client *cli = gd_connect(&gd, 0);
    uint32_t req;
    cr_assert_eq(gorgon_generate_submit(cli, &(gorgon_gen_params){.prompt = "", .max_tokens = 256},
                                        1, &req),
                 0);
    /* Start reading only once gorgond has filled the whole ring and must
     * wait for us: it writes text up to the last byte of room, and the
     * region starts zeroed (generated text has no NUL byte). */
    size_t cap = 0;
    /* A fresh client's first request runs on slot 0 (handles are opaque). */
    const volatile uint8_t *ring = gorgon_slot_output(cli, 0, &cap);
    cr_assert_eq(cap, 192);
    size_t filled = 0;
    AT_WAIT_UNTIL((filled = ring_bytes_written(ring, cap)) == cap, AT_WAIT_MS,
                  "gorgond wrote only %zu of the ring's %zu bytes", filled, cap);
    static gen_out o;
    gorgon_gen_chunk ch;
    int rc;
    size_t chunks = 0;
    while ((rc = gorgon_generate_next(cli, req, &ch, 20000000000ll)) >= 0) {
        cr_assert_leq(ch.len, 192);
        memcpy(o.text + o.len, ch.text, ch.len);
        o.len += ch.len;
        chunks++;
        if (rc == 0)
            break;
    }
    cr_assert_eq(rc, 0, "rc %d", rc);
    /* More than two ring-fulls came through a 192-byte ring, each chunk at
     * most 192 bytes: the ring wrapped and gorgond waited for the reader.
     * (How many chunks that takes depends on timing, so it is not asserted.) */
    cr_assert_gt(o.len, 2 * 192, "only %zu bytes in %zu chunks", o.len, chunks);
    expect_golden("stories260K/golden_greedy_n256.txt", "", &o);
    gorgon_close(cli);
    GD_END(&gd);
}
