/* Every program answers --version (the build's git description) and -h /
 * --help with exit status 0 and text on stdout, whatever else it does. */
#include <criterion/criterion.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/cm_version.h"
#include "tests/util/test_models.h"
#include "tests/util/test_tree.h"

static const char *const PROGRAMS[] = {
    "gorgond",        "gorgon",         "gorgon-bench",  "gorgon-run",
    "gorgon-mkmodel", "gorgon-medusa-train", "gorgon-worker", "gorgon-sidecar",
    "gorgon-comm-bench",
};

/* Runs PROG ARG, returns its exit status and its stdout in out. */
static int run(const char *prog, const char *arg, char *out, size_t cap)
{
    char cmd[PATH_MAX + 64];
    snprintf(cmd, sizeof(cmd), "'%s' %s 2>/dev/null", tu_bin(prog), arg);
    FILE *f = popen(cmd, "r");
    cr_assert_not_null(f);
    size_t len = fread(out, 1, cap - 1, f);
    out[len] = '\0';
    int st = pclose(f);
    cr_assert(WIFEXITED(st), "%s %s did not exit", prog, arg);
    return WEXITSTATUS(st);
}

Test(programs, version_names_the_program_and_the_build, .timeout = 30)
{
    char out[4096], want[256];
    for (size_t i = 0; i < sizeof(PROGRAMS) / sizeof(PROGRAMS[0]); i++) {
        cr_assert_eq(run(PROGRAMS[i], "--version", out, sizeof(out)), 0, "%s", PROGRAMS[i]);
        snprintf(want, sizeof(want), "%s (gorgon) %s\n", PROGRAMS[i], cm_version());
        cr_assert_str_eq(out, want);
    }
}

Test(programs, help_short_and_long_exit_zero_with_usage, .timeout = 30)
{
    char out[16384];
    for (size_t i = 0; i < sizeof(PROGRAMS) / sizeof(PROGRAMS[0]); i++) {
        const char *flags[] = {"-h", "--help"};
        for (int f = 0; f < 2; f++) {
            cr_assert_eq(run(PROGRAMS[i], flags[f], out, sizeof(out)), 0, "%s %s", PROGRAMS[i],
                         flags[f]);
            cr_assert(strstr(out, "usage") || strstr(out, "Usage"), "%s %s printed: %.80s",
                      PROGRAMS[i], flags[f], out);
        }
    }
}

/* The library side: only argv[1] == "--version" counts. */
Test(programs, version_flag_only_as_first_argument)
{
    char *a[] = {"x", "--version", NULL}, *b[] = {"x", "--model", "--version", NULL};
    char *c[] = {"x", NULL};
    cr_assert_eq(cm_version_requested(2, a, "x"), 1);
    cr_assert_eq(cm_version_requested(3, b, "x"), 0);
    cr_assert_eq(cm_version_requested(1, c, "x"), 0);
    cr_assert_gt(strlen(cm_version()), 0);
}

/* ---- gorgon-run ------------------------------------------------------------ */

/* Runs gorgon-run with ARGS on stories260K; returns its exit status and
 * its stdout and stderr together in out. */
static int run_gorgon_run(const char *args, char *out, size_t cap)
{
    char path[PATH_MAX], cmd[3 * PATH_MAX + 8192];
    snprintf(path, sizeof(path), "%s", tu_bin("gorgon-run"));
    cr_assert_lt((size_t)snprintf(cmd, sizeof(cmd), "'%s' --model '%s' --threads 1 %s 2>&1",
                                  path, tu_model_path("stories260K/stories260K.gguf"), args),
                 sizeof(cmd));
    FILE *f = popen(cmd, "r");
    cr_assert_not_null(f);
    size_t len = fread(out, 1, cap - 1, f);
    out[len] = '\0';
    int st = pclose(f);
    cr_assert(WIFEXITED(st), "gorgon-run %s did not exit", args);
    return WEXITSTATUS(st);
}

/* The "generated N tok" count gorgon-run reports on stderr. */
static long generated(const char *out)
{
    const char *g = strstr(out, "generated ");
    cr_assert_not_null(g, "no timing line in: %s", out);
    return strtol(g + strlen("generated "), NULL, 10);
}

/* -n counts new tokens: -n 3 after a 5-token prompt generates 3 (before
 * -n counted BOS and the prompt, and this generated nothing) */
Test(programs, gorgon_run_n_counts_new_tokens, .timeout = 60)
{
    static char out[65536];
    cr_assert_eq(run_gorgon_run("--temp 0 -p 'Lily and Tom' -n 3", out, sizeof(out)), 0, "%s",
                 out);
    cr_assert_eq(generated(out), 3, "%s", out);
    cr_assert(strstr(out, "prompt 5 tok"), "%s", out);
    cr_assert_eq(run_gorgon_run("--temp 0 -p 'Lily and Tom' --new-tokens 7", out, sizeof(out)),
                 0);
    cr_assert_eq(generated(out), 7, "%s", out);
    /* the same text as the golden greedy run, which counts llama2.c steps */
    cr_assert_eq(run_gorgon_run("--temp 0 -p 'Lily and Tom' -n 60", out, sizeof(out)), 0);
    FILE *g = fopen(tu_model_path("stories260K/golden_greedy_prompt_LilyAndTom_n64.txt"), "r");
    cr_assert_not_null(g);
    char want[1024];
    size_t wn = fread(want, 1, sizeof(want) - 1, g);
    want[wn] = '\0';
    fclose(g);
    cr_assert(strncmp(out, want, wn) == 0, "got:\n%s\nwant:\n%s", out, want);
}

/* --steps keeps llama2.c's positions: 3 steps cut a 5-token prompt */
Test(programs, gorgon_run_steps_count_positions, .timeout = 60)
{
    static char out[65536];
    cr_assert_eq(run_gorgon_run("--temp 0 -p 'Lily and Tom' --steps 3", out, sizeof(out)), 0);
    cr_assert_eq(generated(out), 0, "%s", out);
    cr_assert_eq(run_gorgon_run("--temp 0 -p 'Lily and Tom' --steps 10", out, sizeof(out)), 0);
    cr_assert_eq(generated(out), 6, "%s", out);
    cr_assert_eq(run_gorgon_run("--temp 0 -n 3 --steps 10", out, sizeof(out)), 2);
    cr_assert(strstr(out, "not both"), "%s", out);
}

/* A prompt longer than the context is refused with a message and a
 * non-zero exit (it was cut silently, exit 0), and so is an explicit -n
 * that does not fit after the prompt */
Test(programs, gorgon_run_refuses_what_does_not_fit_the_context, .timeout = 60)
{
    static char out[65536], args[60000];
    int n = snprintf(args, sizeof(args), "--temp 0 -p '");
    for (int i = 0; i < 500; i++) /* ~3,500 tokens; the context is 2,048 */
        n += snprintf(args + n, sizeof(args) - (size_t)n, "Lily and Tom went out. ");
    snprintf(args + n, sizeof(args) - (size_t)n, "'");
    cr_assert_eq(run_gorgon_run(args, out, sizeof(out)), 1, "%s", out);
    cr_assert(strstr(out, "longer than the model's context of 2048 tokens"), "%s", out);
    cr_assert_eq(run_gorgon_run("--temp 0 -p 'Lily and Tom' -n 2044", out, sizeof(out)), 1);
    cr_assert(strstr(out, "exceeds the model's context"), "%s", out);
    cr_assert(strstr(out, "room for 2043 new"), "%s", out);
}
