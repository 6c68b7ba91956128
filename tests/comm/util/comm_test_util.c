#include "tests/comm/util/comm_test_util.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/common.h"

int ctu_fail(struct ctu_result *res, int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(res->msg, sizeof res->msg, fmt, ap);
    va_end(ap);
    return rc;
}

uint64_t ctu_rand(uint64_t *s)
{
    uint64_t x = *s ? *s : 0x9e3779b97f4a7c15ull;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545f4914f6cdd1dull;
}

float ctu_rand_float(uint64_t *s)
{
    uint64_t r = ctu_rand(s);
    /* mantissa in [1, 2), sign, exponent spread over 2^-8 .. 2^8 */
    float m = 1.0f + (float)(r & 0xffffff) / 16777216.0f;
    int e = (int)((r >> 24) % 17) - 8;
    float v = m;
    for (; e > 0; e--)
        v *= 2.0f;
    for (; e < 0; e++)
        v *= 0.5f;
    return (r >> 40) & 1 ? -v : v;
}

uint64_t ctu_hash(const void *p, size_t n)
{
    const unsigned char *b = p;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

uint32_t ctu_barrier_count(int fd)
{
    void *p = mmap(NULL, 4096, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        return UINT32_MAX;
    uint32_t v = atomic_load((_Atomic uint32_t *)((char *)p + 384));
    munmap(p, 4096);
    return v;
}

int ctu_start(struct ctu_group *g, const comm_shm_cfg *cfg, const comm_shm_opts *opts,
              ctu_rank_fn fn, void *arg, size_t shared_bytes)
{
    return ctu_start_shared(g, cfg, opts, fn, arg, shared_bytes, NULL);
}

int ctu_start_shared(struct ctu_group *g, const comm_shm_cfg *cfg, const comm_shm_opts *opts,
                     ctu_rank_fn fn, void *arg, size_t shared_bytes, void **shared_out)
{
    memset(g, 0, sizeof *g);
    char why[256];
    g->n = cfg->n_ranks;
    g->fd = comm_shm_create(cfg, why, sizeof why);
    if (g->fd < 0) {
        cr_log_error("comm_shm_create: %s", why);
        return g->fd;
    }
    size_t rbytes = sizeof(struct ctu_result) * (size_t)g->n;
    g->res = mmap(NULL, rbytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    g->shared_bytes = shared_bytes ? shared_bytes : 64;
    g->shared = mmap(NULL, g->shared_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                     -1, 0);
    if (g->res == MAP_FAILED || g->shared == MAP_FAILED)
        return -ENOMEM;
    if (shared_out)
        *shared_out = g->shared;
    for (int r = 0; r < g->n; r++) {
        pid_t pid = fork();
        if (pid < 0)
            return -errno;
        if (pid == 0) {
            struct ctu_result *res = &g->res[r];
            res->fd = g->fd;
            comm *c;
            int rc = comm_shm_attach(&c, g->fd, r, opts, res->msg, sizeof res->msg);
            if (rc == 0) {
                atomic_store((_Atomic int *)&res->started, 1);
                rc = fn(c, res, arg);
                res->t_end_ns = cm_now_ns();
                if (rc < 0 && !res->msg[0])
                    snprintf(res->msg, sizeof res->msg, "%s", comm_last_error(c));
                comm_destroy(c);
            }
            res->rc = rc;
            _exit(rc < 0 ? 1 : 0);
        }
        g->pid[r] = pid;
    }
    return 0;
}

int ctu_wait_rank(struct ctu_group *g, int r, int timeout_ms)
{
    if (!g->pid[r])
        return -1;
    int st = 0;
    /* a pidfd turns "exited or past the deadline" into one poll() */
    int pfd = (int)syscall(SYS_pidfd_open, g->pid[r], 0);
    struct pollfd p = {.fd = pfd, .events = POLLIN};
    if (pfd >= 0 && poll(&p, 1, timeout_ms) != 1) {
        kill(g->pid[r], SIGKILL);
        snprintf(g->res[r].msg, sizeof g->res[r].msg, "rank %d killed after %d ms", r,
                 timeout_ms);
    }
    if (pfd >= 0)
        close(pfd);
    waitpid(g->pid[r], &st, 0);
    g->pid[r] = 0;
    return st;
}

int ctu_wait(struct ctu_group *g, int timeout_ms)
{
    int bad = 0;
    uint64_t deadline = cm_now_ns() + (uint64_t)timeout_ms * 1000000u;
    for (int r = 0; r < g->n; r++) {
        if (!g->pid[r])
            continue;
        int64_t left = (int64_t)(deadline - cm_now_ns()) / 1000000;
        int st = ctu_wait_rank(g, r, left > 0 ? (int)left : 0);
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
            bad++;
    }
    return bad;
}

void ctu_free(struct ctu_group *g)
{
    if (g->fd >= 0)
        close(g->fd);
    if (g->res && g->res != MAP_FAILED)
        munmap(g->res, sizeof(struct ctu_result) * (size_t)g->n);
    if (g->shared && g->shared != MAP_FAILED)
        munmap(g->shared, g->shared_bytes);
}

void ctu_run(int n_ranks, size_t buf_bytes, size_t p2p_bytes, ctu_rank_fn fn, void *arg)
{
    struct ctu_group g;
    comm_shm_cfg cfg = {.n_ranks = n_ranks, .buf_bytes = buf_bytes, .p2p_bytes = p2p_bytes};
    cr_assert_eq(ctu_start(&g, &cfg, NULL, fn, arg, 0), 0);
    int bad = ctu_wait(&g, 60000);
    for (int r = 0; r < n_ranks; r++)
        cr_expect_eq(g.res[r].rc, 0, "rank %d: %s", r, g.res[r].msg);
    cr_expect_eq(bad, 0, "%d of %d ranks failed", bad, n_ranks);
    ctu_free(&g);
}
