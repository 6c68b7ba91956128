/* Run a program to completion with its output captured, and start the
 * Python test servers of tests/clients/util/ (header-only: shared by the
 * gorgon-bench and gorgon pull suites). Every failure fails the calling
 * test with what went wrong. */
#ifndef GORGON_TESTS_RUN_PROC_H
#define GORGON_TESTS_RUN_PROC_H

#include <criterion/criterion.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tests/util/test_tree.h" /* tu_child_dies_with_test */

/* A fresh directory from the mkdtemp template tmpl (e.g.
 * "/tmp/gorgon-x-XXXXXX"), written into dir. */
static inline void rp_tmpdir(char *dir, size_t cap, const char *tmpl)
{
    cr_assert_lt((size_t)snprintf(dir, cap, "%s", tmpl), cap);
    cr_assert_not_null(mkdtemp(dir), "mkdtemp %s: %s", tmpl, strerror(errno));
}

/* Remove dir and what is in it, if it was made; dir becomes "". */
static inline void rp_rmdir(char *dir)
{
    if (!dir[0])
        return;
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    (void)!system(cmd);
    dir[0] = '\0';
}

static inline void rp_slurp(const char *path, char *buf, size_t cap)
{
    buf[0] = '\0';
    FILE *f = fopen(path, "r");
    if (f) {
        buf[fread(buf, 1, cap - 1, f)] = '\0';
        fclose(f);
    }
}

/* Run argv[0] (a path) to completion, its stdout into out and dir/.stdout,
 * its stderr into err and dir/.stderr: its exit status (the test fails if
 * it did not exit). */
static inline int rp_run(const char *const *argv, const char *dir, char *out, size_t out_cap,
                         char *err, size_t err_cap)
{
    char outf[128], errf[128];
    snprintf(outf, sizeof(outf), "%s/.stdout", dir);
    snprintf(errf, sizeof(errf), "%s/.stderr", dir);
    const pid_t self = getpid();
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        tu_child_dies_with_test(self);
        if (!freopen(outf, "w", stdout) || !freopen(errf, "w", stderr))
            _exit(126);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    int st;
    cr_assert_eq(waitpid(pid, &st, 0), pid);
    rp_slurp(outf, out, out_cap);
    rp_slurp(errf, err, err_cap);
    cr_assert(WIFEXITED(st), "%s did not exit: wait status %d\n%s", argv[0], st, err);
    return WEXITSTATUS(st);
}

/* Start `python3 script args...` (args NULL-terminated, may be NULL), which
 * prints the port it listens on as its first line: its pid, *port set. */
static inline pid_t rp_server_start(const char *script, const char *const *args, int *port)
{
    if (access("/usr/bin/python3", X_OK) != 0)
        cr_assert_fail("python3 is needed for %s (deploy/install-deps.sh)", script);
    const char *argv[24] = {"python3", script};
    int argc = 2;
    for (; args && *args && argc < 23; args++)
        argv[argc++] = *args;
    argv[argc] = NULL;
    int p[2];
    cr_assert_eq(pipe(p), 0);
    const pid_t self = getpid();
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        tu_child_dies_with_test(self);
        dup2(p[1], 1);
        close(p[0]);
        execv("/usr/bin/python3", (char *const *)argv);
        _exit(127);
    }
    close(p[1]);
    char buf[32] = "";
    size_t n = 0;
    while (n < sizeof(buf) - 1 && !memchr(buf, '\n', n)) {
        ssize_t k = read(p[0], buf + n, sizeof(buf) - 1 - n);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            break;
        n += (size_t)k;
    }
    close(p[0]);
    cr_assert(memchr(buf, '\n', n), "%s did not start", script);
    *port = atoi(buf);
    cr_assert_gt(*port, 0, "%s printed no port: %s", script, buf);
    return pid;
}

/* Kill a server rp_server_start started, if it runs; *pid becomes -1. */
static inline void rp_server_stop(pid_t *pid)
{
    if (*pid > 0) {
        kill(*pid, SIGKILL);
        waitpid(*pid, NULL, 0);
        *pid = -1;
    }
}

#endif
