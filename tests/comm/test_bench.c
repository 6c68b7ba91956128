/* gorgon-comm-bench runs, checks its sums and reports sane numbers; bad
 * options are refused by name. */
#include <criterion/criterion.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include "tests/util/test_tree.h"

/* Run the bench with args, stdout+stderr into buf; returns the exit status. */
static int run(const char *args, char *buf, size_t cap)
{
    char cmd[PATH_MAX + 256];
    snprintf(cmd, sizeof cmd, "'%s' %s 2>&1", tu_bin("gorgon-comm-bench"), args);
    FILE *f = popen(cmd, "r");
    cr_assert_not_null(f);
    size_t len = fread(buf, 1, cap - 1, f);
    buf[len] = '\0';
    int st = pclose(f);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

static double field(const char *json, const char *key)
{
    char k[64];
    snprintf(k, sizeof k, "\"%s\":", key);
    const char *p = strstr(json, k);
    cr_assert_not_null(p, "no %s in %s", key, json);
    return strtod(p + strlen(k), NULL);
}

Test(comm_bench, reports_all_reduce_latency_as_json, .timeout = 120)
{
    char out[4096];
    for (int ranks = 2; ranks <= 3; ranks++) {
        char args[128];
        snprintf(args, sizeof args, "--ranks %d --n 768 --iters 300 --warmup 30 --json", ranks);
        int rc = run(args, out, sizeof out);
        cr_assert_eq(rc, 0, "exit %d: %s", rc, out);
        cr_expect(strstr(out, "\"suite\":\"comm\""), "%s", out);
        cr_expect_eq(field(out, "ranks"), ranks);
        cr_expect_eq(field(out, "n"), 768);
        double med = field(out, "median_us"), p99 = field(out, "p99_us");
        cr_expect_gt(med, 0.0, "%s", out);
        cr_expect_geq(p99, med, "%s", out);
        cr_expect_geq(field(out, "max_us"), p99, "%s", out);
    }
}

Test(comm_bench, refuses_bad_options_by_name, .timeout = 60)
{
    char out[4096];
    cr_expect_eq(run("--ranks 0", out, sizeof out), 2);
    cr_expect(strstr(out, "--ranks 0"), "%s", out);
    cr_expect_eq(run("--n x", out, sizeof out), 2);
    cr_expect(strstr(out, "--n x"), "%s", out);
    cr_expect_eq(run("--spin 7", out, sizeof out), 2);
    cr_expect(strstr(out, "--spin"), "%s", out);
    cr_expect_eq(run("--bogus", out, sizeof out), 2);
    cr_expect(strstr(out, "usage"), "%s", out);
}
