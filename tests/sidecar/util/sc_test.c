#include "tests/sidecar/util/sc_test.h"

#include <criterion/criterion.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

int sct_start(sct_sidecar *s, const char *gd_sock, ...)
{
    memset(s, 0, sizeof(*s));
    s->pid = -1;
    snprintf(s->err_path, sizeof(s->err_path), "/tmp/gorgon-sidecar-test-XXXXXX");
    int efd = mkstemp(s->err_path);
    if (efd < 0)
        return -errno;
    const char *argv[40];
    int argc = 0;
    argv[argc++] = tu_bin("gorgon-sidecar");
    argv[argc++] = "--listen";
    argv[argc++] = "127.0.0.1:0";
    argv[argc++] = "--socket";
    argv[argc++] = gd_sock;
    va_list ap;
    va_start(ap, gd_sock);
    const char *a;
    while ((a = va_arg(ap, const char *)) && argc < 38)
        argv[argc++] = a;
    va_end(ap);
    argv[argc] = NULL;
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0) {
        close(efd);
        return -errno;
    }
    const pid_t self = getpid();
    pid_t pid = fork();
    if (pid < 0)
        return -errno;
    if (pid == 0) {
        tu_child_dies_with_test(self);
        dup2(p[1], 1);
        dup2(efd, 2);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    close(p[1]);
    close(efd);
    s->pid = pid;
    char line[512];
    size_t n = 0;
    uint64_t t0 = now_ms();
    int rc = -ETIMEDOUT;
    while (now_ms() - t0 < 10000 && n < sizeof(line) - 1) {
        struct pollfd pf = {.fd = p[0], .events = POLLIN};
        if (poll(&pf, 1, 100) <= 0)
            continue;
        ssize_t k = read(p[0], line + n, 1);
        if (k <= 0) {
            rc = -ECHILD; /* exited before listening */
            break;
        }
        if (line[n] == '\n') {
            line[n] = '\0';
            const char *u = strstr(line, "listening on ");
            if (u) {
                snprintf(s->url, sizeof(s->url), "%s", u + strlen("listening on "));
                rc = 0;
                break;
            }
            n = 0;
            continue;
        }
        n++;
    }
    close(p[0]);
    return rc;
}

int sct_stop(sct_sidecar *s)
{
    int st = -1;
    if (s->pid > 0) {
        kill(s->pid, SIGTERM);
        uint64_t t0 = now_ms();
        for (;;) {
            pid_t r = waitpid(s->pid, &st, WNOHANG);
            if (r == s->pid)
                break;
            if (r < 0 || now_ms() - t0 > 10000) {
                kill(s->pid, SIGKILL);
                waitpid(s->pid, NULL, 0);
                st = -1;
                break;
            }
            struct timespec ts = {0, 5000000};
            nanosleep(&ts, NULL);
        }
        s->pid = -1;
    }
    if (s->err_path[0])
        unlink(s->err_path);
    s->err_path[0] = '\0';
    return st;
}

const char *sct_stderr(const sct_sidecar *s)
{
    static char buf[8192];
    buf[0] = '\0';
    FILE *f = s->err_path[0] ? fopen(s->err_path, "r") : NULL;
    if (f) {
        size_t n = fread(buf, 1, sizeof(buf) - 1, f);
        buf[n] = '\0';
        fclose(f);
    }
    return buf;
}

static char *slurp_fd(int fd)
{
    size_t cap = 4096, n = 0;
    char *b = malloc(cap);
    for (;;) {
        if (n + 1 >= cap)
            b = realloc(b, cap *= 2);
        ssize_t k = read(fd, b + n, cap - n - 1);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            break;
        n += (size_t)k;
    }
    b[n] = '\0';
    return b;
}

int sct_run(const char *const *argv, const char *in, char **out, char **err)
{
    char tmp_out[] = "/tmp/gorgon-sct-out-XXXXXX", tmp_err[] = "/tmp/gorgon-sct-err-XXXXXX";
    int ofd = mkstemp(tmp_out), efd = mkstemp(tmp_err);
    int ip[2] = {-1, -1};
    if (in && pipe(ip) < 0)
        return -1;
    const pid_t self = getpid();
    pid_t pid = fork();
    if (pid == 0) {
        tu_child_dies_with_test(self);
        if (in) {
            dup2(ip[0], 0);
            close(ip[1]);
        } else {
            int nul = open("/dev/null", O_RDONLY);
            dup2(nul, 0);
        }
        dup2(ofd, 1);
        dup2(efd, 2);
        execvp(argv[0], (char *const *)argv);
        _exit(127);
    }
    if (in) {
        close(ip[0]);
        size_t len = strlen(in), off = 0;
        while (off < len) {
            ssize_t k = write(ip[1], in + off, len - off);
            if (k <= 0)
                break;
            off += (size_t)k;
        }
        close(ip[1]);
    }
    int st = -1;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
    }
    lseek(ofd, 0, SEEK_SET);
    lseek(efd, 0, SEEK_SET);
    char *o = slurp_fd(ofd), *e = slurp_fd(efd);
    close(ofd);
    close(efd);
    unlink(tmp_out);
    unlink(tmp_err);
    if (out)
        *out = o;
    else
        free(o);
    if (err)
        *err = e;
    else
        free(e);
    return st;
}

int sct_exit_code(int st)
{
    return st >= 0 && WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

char *sct_gorgon_generate(const char *sock, const char *prompt, int n)
{
    char ns[16];
    snprintf(ns, sizeof(ns), "%d", n);
    const char *argv[] = {tu_bin("gorgon"), "generate", "--socket", sock, "-p", prompt, "-n", ns,
                          NULL};
    char *out, *err;
    int st = sct_run(argv, NULL, &out, &err);
    cr_assert_eq(sct_exit_code(st), 0, "gorgon generate: status %d: %s", st, err);
    free(err);
    size_t len = strlen(out);
    cr_assert(len > 0 && out[len - 1] == '\n', "gorgon generate printed no final newline: [%s]",
              out);
    out[len - 1] = '\0';
    return out;
}

unsigned long long sct_gorgon_stat(const char *sock, const char *name)
{
    const char *argv[] = {tu_bin("gorgon"), "stats", "--socket", sock, NULL};
    char *out, *err;
    int st = sct_run(argv, NULL, &out, &err);
    cr_assert_eq(sct_exit_code(st), 0, "gorgon stats: status %d: %s", st, err);
    free(err);
    size_t nl = strlen(name);
    unsigned long long v = 0;
    bool found = false;
    for (char *line = out; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL)
        if (!strncmp(line, name, nl) && line[nl] == ' ') {
            v = strtoull(line + nl, NULL, 10);
            found = true;
            break;
        }
    cr_assert(found, "gorgon stats has no '%s':\n%s", name, out);
    free(out);
    return v;
}

double sct_metric(const char *page, const char *series)
{
    size_t n = strlen(series);
    for (const char *line = page; line && *line;) {
        if (!strncmp(line, series, n) && line[n] == ' ')
            return strtod(line + n + 1, NULL);
        line = strchr(line, '\n');
        if (line)
            line++;
    }
    return -1;
}
