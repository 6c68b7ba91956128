/* Start, connect to and stop a real gorgond for a test (header-only:
 * shared by tests/clients and tests/appliance).
 *
 * The binary is $GORGON_GORGOND, else the gorgond of the same build tree as
 * the test binary (build/<mode>/bin/, so ASan tests run an ASan daemon),
 * else build/bin/gorgond under the current directory. */
#ifndef GORGON_TESTS_GD_PROC_H
#define GORGON_TESTS_GD_PROC_H

#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "clients/gorgon.h"
#include "tests/util/test_tree.h" /* tu_child_dies_with_test */

typedef struct gd_proc {
    pid_t pid;
    char dir[64];
    char sock[128];
    char bin[PATH_MAX];
} gd_proc;

static inline int gd_find_binary(char *out, size_t cap)
{
    const char *env = getenv("GORGON_GORGOND");
    if (env && *env) {
        snprintf(out, cap, "%s", env);
        return access(out, X_OK) == 0 ? 0 : -ENOENT;
    }
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    if (n > 0) {
        self[n] = '\0';
        char *slash = strrchr(self, '/'); /* .../build/<mode>/tests/test-x */
        if (slash) {
            *slash = '\0';
            slash = strrchr(self, '/');
            if (slash) {
                *slash = '\0';
                if (strlen(self) + sizeof("/bin/gorgond") <= cap) {
                    memcpy(out, self, strlen(self));
                    memcpy(out + strlen(self), "/bin/gorgond", sizeof("/bin/gorgond"));
                    if (access(out, X_OK) == 0)
                        return 0;
                }
            }
        }
    }
    snprintf(out, cap, "build/bin/gorgond");
    return access(out, X_OK) == 0 ? 0 : -ENOENT;
}

static inline uint64_t gd_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static inline void gd_sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* Can a client connect to `sock` yet? */
static inline bool gd_listening(const char *sock)
{
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return false;
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    const size_t n = strlen(sock);
    if (n >= sizeof(sa.sun_path)) {
        close(fd);
        return false;
    }
    memcpy(sa.sun_path, sock, n + 1);
    bool ok = connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0;
    close(fd);
    return ok;
}

/* Start gorgond --foreground on a fresh socket in a temp directory, with
 * extra flags (NULL-terminated). -ENOENT when the binary is missing,
 * -ETIMEDOUT when it does not listen within 10 s, -ECHILD if it exited. */
static inline int gd_start(gd_proc *p, ...)
{
    memset(p, 0, sizeof(*p));
    p->pid = -1;
    if (gd_find_binary(p->bin, sizeof(p->bin)) < 0)
        return -ENOENT;
    snprintf(p->dir, sizeof(p->dir), "/tmp/gorgon-test-XXXXXX");
    if (!mkdtemp(p->dir))
        return -errno;
    chmod(p->dir, 0755); /* reachable by the setuid(65534) test child */
    snprintf(p->sock, sizeof(p->sock), "%s/gorgond.sock", p->dir);
    const char *argv[48];
    int argc = 0;
    argv[argc++] = p->bin;
    argv[argc++] = "--foreground";
    argv[argc++] = "--socket";
    argv[argc++] = p->sock;
    argv[argc++] = "--log-level";
    argv[argc++] = getenv("GORGON_TEST_GD_LOG") ? getenv("GORGON_TEST_GD_LOG") : "error";
    va_list ap;
    va_start(ap, p);
    const char *a;
    while ((a = va_arg(ap, const char *)) && argc < 46)
        argv[argc++] = a;
    va_end(ap);
    argv[argc] = NULL;
    const pid_t self = getpid();
    pid_t pid = fork();
    if (pid < 0)
        return -errno;
    if (pid == 0) {
        tu_child_dies_with_test(self);
        execv(p->bin, (char *const *)argv);
        _exit(127);
    }
    p->pid = pid;
    uint64_t t0 = gd_now_ms();
    while (!gd_listening(p->sock)) {
        int st;
        if (waitpid(pid, &st, WNOHANG) == pid) {
            p->pid = -1;
            return -ECHILD;
        }
        if (gd_now_ms() - t0 > 10000)
            return -ETIMEDOUT;
        gd_sleep_ms(5);
    }
    return 0;
}

/* Wait up to timeout_ms for gorgond to exit; its wait status, or -1. */
static inline int gd_wait_exit(gd_proc *p, long timeout_ms)
{
    if (p->pid <= 0)
        return -1;
    uint64_t t0 = gd_now_ms();
    for (;;) {
        int st;
        pid_t r = waitpid(p->pid, &st, WNOHANG);
        if (r == p->pid) {
            p->pid = -1;
            return st;
        }
        if (r < 0 || (long)(gd_now_ms() - t0) > timeout_ms)
            return -1;
        gd_sleep_ms(5);
    }
}

#define GD_NOT_RUNNING (-2)

/* SIGTERM (then SIGKILL if it hangs); removes the temp dir. Returns the
 * wait status of the SIGTERM stop, -1 if it had to be killed, or
 * GD_NOT_RUNNING when there was no daemon to stop. */
static inline int gd_stop(gd_proc *p)
{
    int st = GD_NOT_RUNNING;
    if (p->pid > 0) {
        kill(p->pid, SIGCONT);
        kill(p->pid, SIGTERM);
        st = gd_wait_exit(p, 10000);
        if (st == -1 && p->pid > 0) {
            kill(p->pid, SIGKILL);
            waitpid(p->pid, NULL, 0);
            p->pid = -1;
        }
    }
    if (p->sock[0])
        unlink(p->sock);
    if (p->dir[0])
        rmdir(p->dir);
    return st;
}

/* End of a test body: stop gorgond and fail unless it exits 0 on SIGTERM
 * (a crash, a sanitizer report or a hang shows up here; assertions in a
 * .fini are printed but do not fail the test). */
#define GD_END(p)                                                              \
    do {                                                                       \
        int gd_st_ = gd_stop(p);                                               \
        cr_assert(gd_st_ >= 0 && WIFEXITED(gd_st_) && WEXITSTATUS(gd_st_) == 0, \
                  "gorgond did not stop cleanly on SIGTERM (wait status %d)", gd_st_); \
    } while (0)


/* A client of the gorgond p runs (opts flags GORGON_*); the test fails with
 * gorgond's reason when it cannot connect. */
static inline gorgon_client *gd_connect(const gd_proc *p, uint32_t flags)
{
    gorgon_opts o = {.socket_path = p->sock, .flags = flags};
    gorgon_client *cli = NULL;
    int rc = gorgon_connect(&cli, &o);
    cr_assert_eq(rc, 0, "gorgon_connect(%s): %s (%s)", p->sock, gorgon_strerror(rc),
                 gorgon_last_refusal());
    return cli;
}

/* Run argv[0] (a path) with argv, as uid/gid 65534 when as_nobody, and
 * collect its stderr into out (NUL-terminated). Returns the wait status. */
static inline int gd_run_stderr(const char *const *argv, bool as_nobody, char *out, size_t cap)
{
    int p[2];
    cr_assert_eq(pipe(p), 0);
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        if (as_nobody && (setgid(65534) != 0 || setuid(65534) != 0))
            _exit(126);
        dup2(p[1], 2);
        close(p[0]);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    close(p[1]);
    size_t n = 0;
    ssize_t k;
    while (n < cap - 1 && (k = read(p[0], out + n, cap - 1 - n)) > 0)
        n += (size_t)k;
    out[n] = '\0';
    close(p[0]);
    int st;
    cr_assert_eq(waitpid(pid, &st, 0), pid);
    return st;
}

#endif
