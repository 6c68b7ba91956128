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

static const char *const PROGRAMS[] = {
    "gorgond",        "gorgon",         "gorgon-bench",  "gorgon-run",
    "gorgon-mkmodel", "gorgon-medusa-train", "gorgon-worker",
};

/* build/<mode>/bin beside this test's build/<mode>/tests */
static void bin_path(const char *prog, char *out, size_t cap)
{
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    cr_assert_gt(n, 0);
    self[n] = '\0';
    for (int i = 0; i < 2; i++) {
        char *slash = strrchr(self, '/');
        cr_assert_not_null(slash);
        *slash = '\0';
    }
    cr_assert_lt((size_t)snprintf(out, cap, "%s/bin/%s", self, prog), cap);
    cr_assert_eq(access(out, X_OK), 0, "%s not built", out);
}

/* Runs PROG ARG, returns its exit status and its stdout in out. */
static int run(const char *prog, const char *arg, char *out, size_t cap)
{
    char path[PATH_MAX], cmd[PATH_MAX + 64];
    bin_path(prog, path, sizeof(path));
    snprintf(cmd, sizeof(cmd), "'%s' %s 2>/dev/null", path, arg);
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
