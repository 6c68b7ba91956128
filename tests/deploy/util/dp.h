/* Helpers of the deploy suite (header-only): run a shell command and keep
 * its output, find this test's build tree, install it into a temporary
 * DESTDIR, read a whole file. Tests run from the repository root. */
#ifndef GORGON_TESTS_DP_H
#define GORGON_TESTS_DP_H

#include <criterion/criterion.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include "tests/util/test_tree.h"

/* Run `sh -c CMD` (stderr joined to stdout unless CMD redirects it); its
 * exit status (255 when killed), its output in out (truncated to cap). */
static inline int dp_sh(char *out, size_t cap, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static inline int dp_sh(char *out, size_t cap, const char *fmt, ...)
{
    char cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof(cmd), fmt, ap);
    va_end(ap);
    if (!strstr(cmd, "2>"))
        strncat(cmd, " 2>&1", sizeof(cmd) - strlen(cmd) - 1);
    FILE *p = popen(cmd, "r");
    cr_assert_not_null(p, "popen: %s", cmd);
    size_t n = 0, r;
    char sink[4096];
    while ((r = fread(n + 1 < cap ? out + n : sink, 1,
                      n + 1 < cap ? cap - 1 - n : sizeof(sink), p)) > 0)
        if (n + 1 < cap)
            n += r;
    out[n] = '\0';
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 255;
}

/* The build tree this test binary belongs to (.../build/<mode>). */
static inline void dp_build_dir(char *out, size_t cap)
{
    snprintf(out, cap, "%s", tu_build_dir());
}

static inline bool dp_exists(const char *dir, const char *rel)
{
    char p[PATH_MAX];
    snprintf(p, sizeof(p), "%s%s", dir, rel);
    struct stat sb;
    return lstat(p, &sb) == 0;
}

/* The whole of a file, NUL-terminated, malloc'ed (the test fails when it
 * cannot be read). */
static inline char *dp_slurp(const char *path)
{
    FILE *f = fopen(path, "r");
    cr_assert_not_null(f, "cannot read %s", path);
    size_t cap = 4096, n = 0, r;
    char *buf = malloc(cap);
    cr_assert_not_null(buf);
    while ((r = fread(buf + n, 1, cap - n - 1, f)) > 0) {
        n += r;
        if (n + 1 == cap) {
            cap *= 2;
            buf = realloc(buf, cap);
            cr_assert_not_null(buf);
        }
    }
    fclose(f);
    buf[n] = '\0';
    return buf;
}

/* Is gorgon-sidecar part of this source tree (clients/sidecar/)? */
static inline bool dp_have_sidecar_source(void)
{
    struct stat sb;
    return stat("clients/sidecar/module.mk", &sb) == 0;
}

#endif
