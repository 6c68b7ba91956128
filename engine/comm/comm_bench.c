/* gorgon-comm-bench: latency of the shared-memory all-reduce between rank
 * processes on this machine (the number tensor parallelism pays twice per
 * layer per step).
 *
 *   gorgon-comm-bench [--ranks N] [--n FLOATS] [--iters K] [--warmup W]
 *                     [--threads-per-rank T] [--spin auto|0|1] [--json]
 *
 * Forks N rank processes over one region; each calls
 * comm_all_reduce_sum_f32 on an n-float vector K times after W warm-up
 * calls. Rank 0 times every call; the median, p99 and max are printed in
 * microseconds (one line, or a JSON object with --json). Every result is
 * checked against the rank-order sum, so a broken reduction fails the run. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/cm_version.h"
#include "common/common.h"
#include "engine/comm/comm.h"

struct bench_out {
    int rc;
    char err[256];
    double median_us, p99_us, max_us, mean_us;
};

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static float value(int rank, size_t i, long it)
{
    return (float)((rank + 1) * 0.25 + (double)(i % 97) * 0.001 + (double)(it % 5));
}

static int run_rank(int fd, int rank, int n_ranks, size_t n, long iters, long warmup,
                    const comm_shm_opts *o, struct bench_out *res)
{
    comm *c;
    int rc = comm_shm_attach(&c, fd, rank, o, res->err, sizeof res->err);
    if (rc < 0)
        return rc;
    float *x = malloc(n * sizeof(float));
    uint64_t *t = malloc((size_t)iters * sizeof(uint64_t));
    if (!x || !t) {
        snprintf(res->err, sizeof res->err, "out of memory");
        rc = -ENOMEM;
        goto out;
    }
    for (long it = 0; it < warmup + iters; it++) {
        for (size_t i = 0; i < n; i++)
            x[i] = value(rank, i, it);
        uint64_t t0 = cm_now_ns();
        rc = comm_all_reduce_sum_f32(c, x, n);
        uint64_t dt = cm_now_ns() - t0;
        if (rc < 0) {
            snprintf(res->err, sizeof res->err, "%s", comm_last_error(c));
            goto out;
        }
        for (size_t i = 0; i < n; i++) {
            float want = value(0, i, it);
            for (int r = 1; r < n_ranks; r++)
                want += value(r, i, it);
            if (memcmp(&want, &x[i], sizeof want) != 0) {
                snprintf(res->err, sizeof res->err, "iteration %ld: x[%zu] = %g, want %g", it,
                         i, (double)x[i], (double)want);
                rc = -EIO;
                goto out;
            }
        }
        if (it >= warmup)
            t[it - warmup] = dt;
    }
    qsort(t, (size_t)iters, sizeof *t, cmp_u64);
    double sum = 0;
    for (long i = 0; i < iters; i++)
        sum += (double)t[i];
    res->median_us = (double)t[iters / 2] / 1e3;
    res->p99_us = (double)t[(size_t)((double)(iters - 1) * 0.99)] / 1e3;
    res->max_us = (double)t[iters - 1] / 1e3;
    res->mean_us = sum / (double)iters / 1e3;
out:
    if (rc < 0)
        comm_abort(c, res->err);
    free(x);
    free(t);
    comm_destroy(c);
    return rc;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: gorgon-comm-bench [--ranks N] [--n FLOATS] [--iters K] "
                    "[--warmup W] [--threads-per-rank T] [--spin auto|0|1] [--json]\n");
}

static int parse_long(const char *name, const char *s, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    long v = s ? strtol(s, &end, 10) : 0;
    if (!s || errno || *end || v < lo || v > hi) {
        fprintf(stderr, "gorgon-comm-bench: %s %s: expected an integer in %ld..%ld\n", name,
                s ? s : "(missing)", lo, hi);
        return -EINVAL;
    }
    *out = v;
    return 0;
}

int main(int argc, char **argv)
{
    long ranks = 2, n = 768, iters = 20000, warmup = 2000, tpr = 1;
    bool json = false;
    comm_shm_opts o = COMM_SHM_OPTS_DEFAULT;
    if (cm_version_requested(argc, argv, "gorgon-comm-bench"))
        return 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int rc = 0;
        if (!strcmp(a, "--ranks"))
            rc = parse_long(a, v, 1, COMM_SHM_MAX_RANKS, &ranks), i++;
        else if (!strcmp(a, "--n"))
            rc = parse_long(a, v, 1, 1L << 28, &n), i++;
        else if (!strcmp(a, "--iters"))
            rc = parse_long(a, v, 1, 100000000, &iters), i++;
        else if (!strcmp(a, "--warmup"))
            rc = parse_long(a, v, 0, 100000000, &warmup), i++;
        else if (!strcmp(a, "--threads-per-rank"))
            rc = parse_long(a, v, 1, 4096, &tpr), i++;
        else if (!strcmp(a, "--spin")) {
            if (v && !strcmp(v, "auto"))
                o.spin = -1;
            else if (v && (!strcmp(v, "0") || !strcmp(v, "1")))
                o.spin = v[0] - '0';
            else
                rc = -EINVAL, fprintf(stderr, "gorgon-comm-bench: --spin: auto, 0 or 1\n");
            i++;
        } else if (!strcmp(a, "--json"))
            json = true;
        else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            printf("All-reduce latency between shared-memory rank processes (engine/comm):\n"
                   "median and p99 microseconds over K calls of N floats, every result checked.\n");
            return 0;
        } else {
            fprintf(stderr, "gorgon-comm-bench: unknown option '%s'\n", a);
            usage(stderr);
            return 2;
        }
        if (rc < 0)
            return 2;
    }
    o.threads_per_rank = (int)tpr;

    char why[256];
    comm_shm_cfg cfg = {.n_ranks = (int)ranks};
    int fd = comm_shm_create(&cfg, why, sizeof why);
    if (fd < 0) {
        fprintf(stderr, "gorgon-comm-bench: comm_shm_create: %s\n", why);
        return 1;
    }
    struct bench_out *res = mmap(NULL, sizeof *res * (size_t)ranks, PROT_READ | PROT_WRITE,
                                 MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (res == MAP_FAILED) {
        perror("gorgon-comm-bench: mmap");
        return 1;
    }
    pid_t pids[COMM_SHM_MAX_RANKS];
    for (int r = 0; r < ranks; r++) {
        pids[r] = fork();
        if (pids[r] < 0) {
            perror("gorgon-comm-bench: fork");
            comm_shm_abort_fd(fd, "fork failed", why, sizeof why);
            ranks = r;
            break;
        }
        if (pids[r] == 0)
            _exit(run_rank(fd, r, (int)cfg.n_ranks, (size_t)n, iters, warmup, &o, &res[r]) < 0);
    }
    int failed = 0;
    for (int r = 0; r < ranks; r++) {
        int st;
        if (waitpid(pids[r], &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st)) {
            fprintf(stderr, "gorgon-comm-bench: rank %d failed: %s\n", r,
                    res[r].err[0] ? res[r].err : "(crashed)");
            comm_shm_abort_fd(fd, "a rank failed", why, sizeof why);
            failed = 1;
        }
    }
    close(fd);
    if (failed)
        return 1;
    const struct bench_out *r0 = &res[0];
    const char *spin = o.spin < 0 ? (cm_spin_allowed((int)(ranks * tpr)) ? "auto(on)" : "auto(off)")
                                  : o.spin ? "on" : "off";
    if (json)
        printf("{\"suite\":\"comm\",\"op\":\"all_reduce_sum_f32\",\"backend\":\"shm\","
               "\"ranks\":%ld,\"n\":%ld,\"iters\":%ld,\"cpus_usable\":%d,\"spin\":\"%s\","
               "\"median_us\":%.2f,\"p99_us\":%.2f,\"max_us\":%.2f,\"mean_us\":%.2f}\n",
               ranks, n, iters, cm_cpus_usable(), spin, r0->median_us, r0->p99_us,
               r0->max_us, r0->mean_us);
    else
        printf("comm shm all_reduce_sum_f32: ranks=%ld n=%ld iters=%ld cpus_usable=%d "
               "spin=%s median=%.2f us p99=%.2f us max=%.2f us mean=%.2f us\n",
               ranks, n, iters, cm_cpus_usable(), spin, r0->median_us, r0->p99_us,
               r0->max_us, r0->mean_us);
    return 0;
}
