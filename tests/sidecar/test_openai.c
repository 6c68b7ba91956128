/* The official `openai` npm client (pinned in tests/sidecar/package.json,
 * installed with `npm ci` into tests/sidecar/node_modules) against
 * gorgon-sidecar in front of a real gorgond on stories260K: completions and
 * chat, streaming and not, a stop string, a 400 error, and an abort
 * mid-stream that gorgond sees as a cancelled request. Each test runs one
 * scenario of openai_client.mjs and checks the JSON it prints. */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tests/clients/util/gd_proc.h"
#include "tests/sidecar/util/sc_test.h"
#include "tests/util/test_models.h"
#include "tests/util/test_tree.h"

static gd_proc gd;
static sct_sidecar sc;

/* End of a test body: the sidecar must exit 0 on SIGTERM (a crash, a
 * sanitizer report or a hang shows up here, with its stderr). */
#define SC_END()                                                                    \
    do {                                                                            \
        char err_[8192];                                                            \
        snprintf(err_, sizeof(err_), "%s", sct_stderr(&sc));                        \
        int st_ = sct_stop(&sc);                                                    \
        cr_assert_eq(sct_exit_code(st_), 0, "gorgon-sidecar exited with status %d:\n%s", \
                     st_, err_);                                                    \
    } while (0)
static char dir[PATH_MAX];

static void teardown(void)
{
    sct_stop(&sc);
    gd_stop(&gd);
}

/* tests/sidecar from the working directory (make test runs at the root),
 * else from this binary (build/<mode>/tests/NAME). */
static const char *suite_dir(void)
{
    if (access("tests/sidecar/package.json", R_OK) == 0)
        return realpath("tests/sidecar", dir);
    snprintf(dir, sizeof(dir), "%.4000s/tests/sidecar", tu_repo_root());
    cr_assert_eq(access(dir, R_OK), 0, "cannot find tests/sidecar (cwd or %s)", dir);
    return dir;
}

static bool newer_or_same(const char *a, const char *b)
{
    struct stat sa, sb;
    return stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_mtime >= sb.st_mtime;
}

/* node_modules as package-lock.json pins it: `npm ci` in directory d
 * unless the cached install is already newer than the lock file.
 * Serialised with a lock on package.json (Criterion runs tests in
 * parallel). 0 when installed; 1 when the registry cannot be reached and
 * -1 when npm failed, with why filled in. No Criterion assertions: the
 * PRE_ALL hook below calls it outside any test. */
static int npm_install(const char *d, char *why, size_t cap)
{
    char pkg[PATH_MAX + 32], lock[PATH_MAX + 32], stamp[PATH_MAX + 64], mod[PATH_MAX + 64];
    snprintf(pkg, sizeof(pkg), "%s/package.json", d);
    snprintf(lock, sizeof(lock), "%s/package-lock.json", d);
    snprintf(stamp, sizeof(stamp), "%s/node_modules/.package-lock.json", d);
    snprintf(mod, sizeof(mod), "%s/node_modules/openai/package.json", d);
    int fd = open(pkg, O_RDONLY | O_CLOEXEC);
    if (fd < 0 || flock(fd, LOCK_EX) != 0) {
        snprintf(why, cap, "%s: %s", pkg, strerror(errno));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    int rc = 0;
    if (!(newer_or_same(stamp, lock) && access(mod, R_OK) == 0)) {
        const char *argv[] = {"npm", "ci", "--prefix", d, "--no-audit", "--no-fund", NULL};
        char *out = NULL, *err = NULL;
        int st = sct_run(argv, NULL, &out, &err);
        if (sct_exit_code(st) != 0) {
            static const char *offline[] = {"ENOTFOUND", "EAI_AGAIN", "ENETUNREACH",
                                            "ECONNREFUSED", "ETIMEDOUT", "ECONNRESET"};
            rc = -1;
            snprintf(why, cap, "npm ci failed (status %d):\n%s\n%s", st, out ? out : "",
                     err ? err : "");
            for (size_t i = 0; err && i < sizeof(offline) / sizeof(offline[0]); i++)
                if (strstr(err, offline[i])) {
                    rc = 1;
                    snprintf(why, cap, "%s", offline[i]);
                    break;
                }
        }
        free(out);
        free(err);
    }
    flock(fd, LOCK_UN);
    close(fd);
    return rc;
}

/* Install before the first test, outside the tests' timeouts: a slow
 * registry then cannot time a test out halfway (each test still checks,
 * and reports what npm said). Only from the repository root, where make
 * test runs; elsewhere the tests install it themselves. */
ReportHook(PRE_ALL)(struct criterion_test_set *set)
{
    (void)set;
    char d[PATH_MAX], why[4096];
    if (realpath("tests/sidecar", d) && access("tests/sidecar/package.json", R_OK) == 0)
        (void)npm_install(d, why, sizeof(why));
}

static void npm_ready(void)
{
    static char why[16384];
    int rc = npm_install(suite_dir(), why, sizeof(why));
    if (rc > 0)
        cr_skip_test("npm ci cannot reach the npm registry (%s: offline): the openai client "
                     "is not installed", why);
    cr_assert_eq(rc, 0, "%s", why);
}

static void start(void)
{
    npm_ready();
    int rc = gd_start(&gd, "--model", tu_model_path("stories260K/stories260K.gguf"), NULL);
    cr_assert_eq(rc, 0, "gorgond did not start: %s", strerror(-rc));
    rc = sct_start(&sc, gd.sock, NULL);
    cr_assert_eq(rc, 0, "gorgon-sidecar did not start (%s):\n%s", strerror(-rc), sct_stderr(&sc));
    setenv("SIDECAR_URL", sc.url, 1);
}

/* Run a scenario with PROMPT/MAX_TOKENS set; its parsed JSON output. */
static json_t *scenario(const char *name, const char *prompt, int max_tokens)
{
    char mt[16], script[PATH_MAX + 32];
    snprintf(mt, sizeof(mt), "%d", max_tokens);
    setenv("PROMPT", prompt, 1);
    setenv("MAX_TOKENS", mt, 1);
    snprintf(script, sizeof(script), "%s/openai_client.mjs", suite_dir());
    const char *argv[] = {"node", script, name, NULL};
    char *out, *err;
    int st = sct_run(argv, NULL, &out, &err);
    cr_assert_eq(sct_exit_code(st), 0, "node %s: status %d\n%s%s\nsidecar:\n%s", name, st, out,
                 err, sct_stderr(&sc));
    json_error_t je;
    json_t *j = json_loads(out, 0, &je);
    cr_assert_not_null(j, "node %s printed no JSON (%s): %s", name, je.text, out);
    free(out);
    free(err);
    return j;
}

static const char *str(json_t *j, const char *key)
{
    json_t *v = json_object_get(j, key);
    cr_assert(json_is_string(v), "'%s' is not a string in %s", key,
              json_dumps(j, JSON_COMPACT));
    return json_string_value(v);
}

static json_int_t usage_of(json_t *j, const char *key)
{
    json_t *u = json_object_get(j, "usage");
    cr_assert(json_is_object(u), "no usage in %s", json_dumps(j, JSON_COMPACT));
    return json_integer_value(json_object_get(u, key));
}

Test(sidecar_openai, completions_equal_gorgon_generate_streaming_and_not, .fini = teardown,
     .timeout = 120)
{
    start();
    char *want = sct_gorgon_generate(gd.sock, "Once upon a time", 48);
    json_t *a = scenario("complete", "Once upon a time", 48);
    cr_assert_str_eq(str(a, "text"), want);
    cr_assert_str_eq(str(a, "finish_reason"), "length");
    cr_assert_str_eq(str(a, "object"), "text_completion");
    cr_assert_eq(usage_of(a, "completion_tokens"), 48);
    cr_assert_eq(usage_of(a, "total_tokens"),
                 usage_of(a, "prompt_tokens") + usage_of(a, "completion_tokens"));
    json_t *b = scenario("complete-stream", "Once upon a time", 48);
    cr_assert_str_eq(str(b, "text"), want);
    cr_assert_str_eq(str(b, "finish_reason"), "length");
    cr_assert_eq(usage_of(b, "completion_tokens"), 48, "stream_options.include_usage");
    cr_assert_gt(json_integer_value(json_object_get(b, "chunks")), 1);
    json_decref(a);
    json_decref(b);
    free(want);
    SC_END();
}

Test(sidecar_openai, chat_streaming_and_not_give_the_same_text, .fini = teardown, .timeout = 120)
{
    start();
    json_t *a = scenario("chat", "Tell me a story.", 40);
    json_t *b = scenario("chat-stream", "Tell me a story.", 40);
    cr_assert_str_eq(str(a, "object"), "chat.completion");
    cr_assert_str_eq(str(a, "role"), "assistant");
    cr_assert_str_eq(str(b, "role"), "assistant", "the first chunk's delta names the role");
    cr_assert_gt(strlen(str(a, "text")), 0);
    cr_assert_str_eq(str(a, "text"), str(b, "text"));
    cr_assert_str_eq(str(a, "finish_reason"), "length");
    cr_assert_str_eq(str(b, "finish_reason"), "length");
    cr_assert_eq(usage_of(a, "completion_tokens"), 40);
    cr_assert_eq(usage_of(b, "completion_tokens"), 40);
    /* stories260K has no template: the plain fallback, whose tokens gorgond counted */
    cr_assert_eq(usage_of(a, "prompt_tokens"), usage_of(b, "prompt_tokens"));
    cr_assert_gt(usage_of(a, "prompt_tokens"), 5);
    json_decref(a);
    json_decref(b);
    SC_END();
}

Test(sidecar_openai, a_stop_string_ends_the_text_before_it, .fini = teardown, .timeout = 120)
{
    start();
    char *full = sct_gorgon_generate(gd.sock, "Once upon a time", 32);
    const char *at = strstr(full, " girl");
    cr_assert_not_null(at, "the greedy text has no ' girl': %s", full);
    setenv("STOP", " girl", 1);
    json_t *a = scenario("stop", "Once upon a time", 32);
    cr_assert_eq(strlen(str(a, "text")), (size_t)(at - full));
    cr_assert_eq(strncmp(str(a, "text"), full, (size_t)(at - full)), 0);
    cr_assert_str_eq(str(a, "finish_reason"), "stop");
    cr_assert_lt(usage_of(a, "completion_tokens"), 32);
    json_decref(a);
    free(full);
    SC_END();
}

Test(sidecar_openai, n_above_one_is_a_400_naming_n, .fini = teardown, .timeout = 120)
{
    start();
    json_t *a = scenario("bad", "Once upon a time", 8);
    cr_assert_str_eq(str(a, "class"), "BadRequestError");
    cr_assert_eq(json_integer_value(json_object_get(a, "status")), 400);
    cr_assert_str_eq(str(a, "param"), "n");
    cr_assert_str_eq(str(a, "type"), "invalid_request_error");
    cr_assert(strstr(str(a, "message"), "n must be 1"), "%s", str(a, "message"));
    json_decref(a);
    SC_END();
}

Test(sidecar_openai, models_lists_the_served_model_with_its_context, .fini = teardown,
     .timeout = 120)
{
    start();
    json_t *a = scenario("models", "", 1);
    json_t *m = json_array_get(json_object_get(a, "data"), 0);
    cr_assert_not_null(m);
    gorgon_client *cli = gd_connect(&gd, 0);
    gorgon_model mi;
    cr_assert_eq(gorgon_model_info(cli, &mi), 0);
    cr_assert_str_eq(str(m, "id"), mi.name);
    cr_assert_eq(json_integer_value(json_object_get(m, "context_length")), mi.n_ctx);
    gorgon_close(cli);
    json_decref(a);
    SC_END();
}

Test(sidecar_openai, an_abort_mid_stream_cancels_the_request_in_gorgond, .fini = teardown,
     .timeout = 120)
{
    start();
    unsigned long long tok0 = sct_gorgon_stat(gd.sock, "gen_tokens_total");
    unsigned long long fail0 = sct_gorgon_stat(gd.sock, "gen_failed");
    unsigned long long canc0 = sct_gorgon_stat(gd.sock, "gen_cancelled");
    /* 2000 tokens without an end (see the scenario) take stories260K over
     * a second: far longer than the client needs to abort after its first
     * text */
    json_t *a = scenario("abort", "Once upon a time", 2000);
    cr_assert(json_is_true(json_object_get(a, "aborted")), "%s", json_dumps(a, JSON_COMPACT));
    cr_assert_gt(strlen(str(a, "text")), 0);
    /* the sidecar sees the hang-up on its next write and cancels: wait for
     * gorgond to have nothing running, then for the sidecar to count it */
    uint64_t t0 = gd_now_ms();
    while (sct_gorgon_stat(gd.sock, "gen_running") != 0 ||
           sct_gorgon_stat(gd.sock, "gen_queued") != 0)
        cr_assert_lt(gd_now_ms() - t0, 20000, "gorgond still runs the aborted request");
    unsigned long long tok = sct_gorgon_stat(gd.sock, "gen_tokens_total") - tok0;
    cr_assert_lt(tok, 2000, "gorgond generated %llu tokens: the request was not cancelled", tok);
    cr_assert_eq(sct_gorgon_stat(gd.sock, "gen_failed"), fail0, "a cancel is not a failure");
    cr_assert_eq(sct_gorgon_stat(gd.sock, "gen_cancelled"), canc0 + 1,
                 "gorgon stats does not show the aborted request as cancelled");
    char *page = NULL;
    for (;;) {
        const char *argv[] = {"curl", "-sS", "--max-time", "10", NULL, NULL};
        char u[200];
        snprintf(u, sizeof(u), "%s/metrics", sc.url);
        argv[4] = u;
        cr_assert_eq(sct_exit_code(sct_run(argv, NULL, &page, NULL)), 0);
        if (sct_metric(page, "gorgon_sidecar_requests_cancelled_total") == 1)
            break;
        cr_assert_lt(gd_now_ms() - t0, 20000, "the sidecar did not count the cancel:\n%s", page);
        free(page);
    }
    free(page);
    json_decref(a);
    SC_END();
}
