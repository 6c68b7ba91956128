/* The syscall filter of deploy/gorgond.service lets gorgond and its worker
 * do their work. systemd is not PID 1 here, so the unit cannot run for real:
 * instead gorgond serves a generation under `strace -f -c` (the worker it
 * spawns included), and every system call they made must be in the set the
 * unit's SystemCallFilter= lines allow, expanded by systemd's own table
 * (`systemd-analyze syscall-filter`). */
#include <criterion/criterion.h>
#include <ctype.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "clients/gorgon.h"
#include "tests/clients/util/gd_proc.h"
#include "tests/deploy/util/dp.h"
#include "tests/util/test_models.h"

#define MAX_NAMES 2048

typedef struct names {
    char *v[MAX_NAMES];
    size_t n;
} names;

static bool has(const names *s, const char *name)
{
    for (size_t i = 0; i < s->n; i++)
        if (!strcmp(s->v[i], name))
            return true;
    return false;
}

static void add(names *s, const char *name)
{
    if (has(s, name))
        return;
    cr_assert_lt(s->n, MAX_NAMES);
    s->v[s->n++] = strdup(name);
}

static void drop(names *s)
{
    for (size_t i = 0; i < s->n; i++)
        free(s->v[i]);
    s->n = 0;
}

/* A syscall name or an @group, expanded through systemd-analyze (groups
 * nest: @system-service holds @aio, ...). */
static void expand(names *s, const char *tok, int depth)
{
    cr_assert_lt(depth, 8, "syscall groups nest too deep at %s", tok);
    if (tok[0] != '@') {
        add(s, tok);
        return;
    }
    static char out[65536];
    int rc = dp_sh(out, sizeof(out), "systemd-analyze syscall-filter %s 2>/dev/null", tok);
    cr_assert_eq(rc, 0, "systemd-analyze syscall-filter %s: %s", tok, out);
    char *copy = strdup(out), *save = NULL;
    size_t n_lines = 0, n_names = 0;
    for (char *line = strtok_r(copy, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (n_lines++ == 0)
            continue; /* the group's own name */
        while (isspace((unsigned char)*line))
            line++;
        if (!*line || *line == '#')
            continue;
        expand(s, line, depth + 1);
        n_names++;
    }
    free(copy);
    cr_assert_gt(n_names, 0, "systemd-analyze knows no group %s", tok);
}

/* What the unit's SystemCallFilter= lines allow: the allow-list lines, minus
 * the ~deny lines (systemd's order of application). */
static void allowed_by_unit(const char *unit_path, names *allow)
{
    names deny = {0};
    char *unit = dp_slurp(unit_path);
    char *save = NULL;
    size_t n_filters = 0;
    for (char *line = strtok_r(unit, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (strncmp(line, "SystemCallFilter=", 17))
            continue;
        n_filters++;
        char *v = line + 17;
        names *into = allow;
        if (*v == '~') {
            into = &deny;
            v++;
        }
        char *s2 = NULL;
        for (char *tok = strtok_r(v, " \t", &s2); tok; tok = strtok_r(NULL, " \t", &s2))
            expand(into, tok, 0);
    }
    free(unit);
    cr_assert_gt(n_filters, 0, "%s has no SystemCallFilter=", unit_path);
    for (size_t i = 0; i < allow->n;) {
        if (has(&deny, allow->v[i])) {
            free(allow->v[i]);
            allow->v[i] = allow->v[--allow->n];
        } else {
            i++;
        }
    }
    drop(&deny);
}

static char dir[64], trace[128], sock[96];
static pid_t tracer = -1;

static void cleanup(void)
{
    if (tracer > 0) {
        kill(tracer, SIGKILL);
        waitpid(tracer, NULL, 0);
        tracer = -1;
    }
    if (dir[0]) {
        unlink(trace);
        unlink(sock);
        rmdir(dir);
        dir[0] = '\0';
    }
}

/* The traced gorgond: strace's child. */
static pid_t traced_pid(void)
{
    char p[64], buf[64] = "";
    snprintf(p, sizeof(p), "/proc/%d/task/%d/children", (int)tracer, (int)tracer);
    FILE *f = fopen(p, "r");
    if (!f)
        return -1;
    if (!fgets(buf, sizeof(buf), f))
        buf[0] = '\0';
    fclose(f);
    return (pid_t)atoi(buf);
}

Test(deploy_syscalls, gorgond_unit_filter_allows_every_call_of_a_generation, .fini = cleanup,
     .timeout = 300)
{
    names allow = {0};
    allowed_by_unit("deploy/gorgond.service", &allow);
    cr_assert(has(&allow, "io_uring_enter") && has(&allow, "memfd_create"),
              "the filter expansion lost io_uring/memfd (%zu names)", allow.n);

    char bin[PATH_MAX];
    cr_assert_eq(gd_find_binary(bin, sizeof(bin)), 0, "no gorgond binary");
    const char *model = tu_model_path("stories260K/stories260K.gguf");
    snprintf(dir, sizeof(dir), "/tmp/gorgon-strace-XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    snprintf(trace, sizeof(trace), "%s/strace.txt", dir);
    snprintf(sock, sizeof(sock), "%s/gorgond.sock", dir);
    tracer = fork();
    cr_assert_geq(tracer, 0);
    if (tracer == 0) {
        /* LeakSanitizer refuses to run under ptrace and fails the exit of
         * a SAN=address build; the leak checks are other tests' business. */
        char asan[512];
        const char *prev = getenv("ASAN_OPTIONS");
        snprintf(asan, sizeof(asan), "%s%sdetect_leaks=0", prev ? prev : "", prev ? ":" : "");
        setenv("ASAN_OPTIONS", asan, 1);
        execlp("strace", "strace", "-f", "-c", "-o", trace, "--", bin, "--foreground",
               "--socket", sock, "--log-level", "error", "--model", model, (char *)NULL);
        _exit(127);
    }
    uint64_t t0 = gd_now_ms();
    while (!gd_listening(sock)) {
        int st;
        cr_assert_neq(waitpid(tracer, &st, WNOHANG), tracer,
                      "strace gorgond exited (status %d): is strace installed?", st);
        cr_assert_lt(gd_now_ms() - t0, 60000u, "gorgond under strace did not listen");
        gd_sleep_ms(10);
    }
    gorgon_opts o = {.socket_path = sock};
    gorgon_client *cli = NULL;
    int rc = gorgon_connect(&cli, &o);
    cr_assert_eq(rc, 0, "connect: %s", gorgon_strerror(rc));
    for (int k = 0; k < 2; k++) {
        gorgon_gen_params gp = {.prompt = "Once upon a time", .max_tokens = 16,
                                .temperature = k ? 1.0f : 0.0f};
        uint32_t req;
        cr_assert_eq(gorgon_generate_submit(cli, &gp, 1, &req), 0);
        gorgon_gen_chunk ch;
        while ((rc = gorgon_generate_next(cli, req, &ch, 60000000000ll)) == 1) {
        }
        cr_assert_eq(rc, 0, "generation under strace: %s", gorgon_strerror(rc));
    }
    gorgon_counters cnt;
    cr_assert_eq(gorgon_stats(cli, &cnt), 0);
    gorgon_close(cli);

    pid_t gd = traced_pid();
    cr_assert_gt(gd, 0, "cannot find the traced gorgond");
    cr_assert_eq(kill(gd, SIGTERM), 0);
    int st;
    cr_assert_eq(waitpid(tracer, &st, 0), tracer);
    tracer = -1;
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "gorgond under strace: status %d", st);

    /* strace -c: "% time seconds usecs/call calls errors syscall" rows
     * between two dashed rules; the name is the last column. */
    char *sum = dp_slurp(trace);
    char *save = NULL;
    int rules = 0;
    size_t n_calls = 0;
    static char bad[4096];
    bad[0] = '\0';
    for (char *line = strtok_r(sum, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (!strncmp(line, "------", 6)) {
            rules++;
            continue;
        }
        if (rules != 1)
            continue;
        char *name = strrchr(line, ' ');
        name = name ? name + 1 : line;
        n_calls++;
        if (!has(&allow, name))
            snprintf(bad + strlen(bad), sizeof(bad) - strlen(bad), " %s", name);
    }
    cr_assert_gt(n_calls, 20, "strace -c saw only %zu system calls:\n%s", n_calls, sum);
    cr_assert_str_empty(bad, "gorgond.service's SystemCallFilter= forbids what gorgond or "
                        "gorgon-worker called:%s", bad);
    free(sum);
    drop(&allow);
}
