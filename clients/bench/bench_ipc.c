/* gorgon-bench ipc: what one request costs on the way client -> gorgond ->
 * client, side by side with what a user would otherwise pick.
 *
 *   shm_poll   libgorgon PING, gorgond and the client both busy-polling
 *   shm_futex  libgorgon PING, both sides sleeping on futex doorbells
 *   uds        the same payload echoed over an AF_UNIX SOCK_SEQPACKET pair
 *   burst      NOP descriptors pushed and reaped in bursts (one-way rate)
 *
 * The bench starts a real gorgond (the one next to its own binary) on a
 * temporary socket, once with a large --poll-us and once with --poll-us 0,
 * and pins the client and the server side to different CPUs when it can. */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "clients/bench/bench.h"
#include "clients/gorgon.h"
#include "common/common.h"

typedef struct lat {
    uint64_t p50, p99, min, max;
    double avg;
    size_t n;
} lat;

typedef struct bench_cfg {
    long iters, futex_iters;
    size_t payload;
    double burst_s;
    uint32_t burst;
    bool json;
    int cpu_client, cpu_server; /* -1: no pinning */
    char gorgond[PATH_MAX];
} bench_cfg;

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static lat summarize(uint64_t *v, size_t n)
{
    lat l = {0};
    if (!n)
        return l;
    qsort(v, n, sizeof(*v), cmp_u64);
    double sum = 0;
    for (size_t i = 0; i < n; i++)
        sum += (double)v[i];
    l.n = n;
    l.min = v[0];
    l.max = v[n - 1];
    l.p50 = v[n / 2];
    l.p99 = v[(size_t)((double)(n - 1) * 0.99)];
    l.avg = sum / (double)n;
    return l;
}

static void pin(int cpu)
{
    if (cpu < 0)
        return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    (void)sched_setaffinity(0, sizeof(set), &set);
}

/* Two CPUs this process may run on, for client and server; -1 if only one. */
static void pick_cpus(bench_cfg *c)
{
    cpu_set_t set;
    c->cpu_client = c->cpu_server = -1;
    if (sched_getaffinity(0, sizeof(set), &set) != 0)
        return;
    int found[2], k = 0;
    for (int i = 0; i < CPU_SETSIZE && k < 2; i++)
        if (CPU_ISSET(i, &set))
            found[k++] = i;
    if (k == 2) {
        c->cpu_client = found[0];
        c->cpu_server = found[1];
    }
}

/* ---- gorgond as a child process ---------------------------------------------- */

typedef struct daemon_proc {
    pid_t pid;
    char dir[64];
    char sock[128];
} daemon_proc;

static int find_gorgond(bench_cfg *c)
{
    if (c->gorgond[0])
        return access(c->gorgond, X_OK) == 0 ? 0 : -ENOENT;
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    if (n <= 0)
        return -ENOENT;
    self[n] = '\0';
    char *slash = strrchr(self, '/');
    if (!slash)
        return -ENOENT;
    slash[1] = '\0';
    if (strlen(self) + sizeof("gorgond") > sizeof(c->gorgond))
        return -ENAMETOOLONG;
    memcpy(c->gorgond, self, strlen(self));
    memcpy(c->gorgond + strlen(self), "gorgond", sizeof("gorgond"));
    return access(c->gorgond, X_OK) == 0 ? 0 : -ENOENT;
}

static int daemon_start(daemon_proc *d, const bench_cfg *c, const char *poll_us)
{
    memset(d, 0, sizeof(*d));
    snprintf(d->dir, sizeof(d->dir), "/tmp/gorgon-bench-XXXXXX");
    if (!mkdtemp(d->dir))
        return cm_neg_errno();
    snprintf(d->sock, sizeof(d->sock), "%s/gorgond.sock", d->dir);
    pid_t pid = fork();
    if (pid < 0)
        return cm_neg_errno();
    if (pid == 0) {
        pin(c->cpu_server);
        execl(c->gorgond, c->gorgond, "--foreground", "--socket", d->sock, "--poll-us", poll_us,
              "--log-level", "warn", "--stats-interval-s", "0", (char *)NULL);
        _exit(127);
    }
    d->pid = pid;
    uint64_t t0 = cm_now_ns();
    for (;;) {
        gorgon_client *cli;
        gorgon_opts o = {.socket_path = d->sock};
        if (gorgon_connect(&cli, &o) == 0) {
            gorgon_close(cli);
            return 0;
        }
        int st;
        if (waitpid(pid, &st, WNOHANG) == pid) {
            d->pid = -1;
            return -ECHILD;
        }
        if (cm_now_ns() - t0 > 10000000000ull)
            return -ETIMEDOUT;
        usleep(5000);
    }
}

static void daemon_stop(daemon_proc *d)
{
    if (d->pid > 0) {
        kill(d->pid, SIGTERM);
        waitpid(d->pid, NULL, 0);
        d->pid = -1;
    }
    unlink(d->sock);
    rmdir(d->dir);
}

/* ---- the measurements ------------------------------------------------------------ */

static int measure_ping(const bench_cfg *c, const char *sock, uint32_t flags, long iters,
                        uint64_t *rtt, lat *out)
{
    gorgon_client *cli;
    gorgon_opts o = {.socket_path = sock, .flags = flags};
    int rc = gorgon_connect(&cli, &o);
    if (rc < 0)
        return rc;
    uint8_t *payload = malloc(c->payload ? c->payload : 1);
    if (!payload) {
        gorgon_close(cli);
        return -ENOMEM;
    }
    for (size_t i = 0; i < c->payload; i++)
        payload[i] = (uint8_t)i;
    long warm = iters / 10 < 1000 ? iters / 10 : 1000;
    for (long i = 0; i < warm + iters && rc >= 0; i++) {
        uint64_t t;
        rc = gorgon_ping(cli, payload, c->payload, 5000000000ll, &t);
        if (i >= warm)
            rtt[i - warm] = t;
    }
    free(payload);
    gorgon_close(cli);
    if (rc < 0)
        return rc;
    *out = summarize(rtt, (size_t)iters);
    return 0;
}

/* NOP descriptors in bursts with a bounded window: completions per second. */
static int measure_burst(const bench_cfg *c, const char *sock, double *msgs_per_s)
{
    gorgon_client *cli;
    gorgon_opts o = {.socket_path = sock, .flags = GORGON_BUSY_POLL};
    int rc = gorgon_connect(&cli, &o);
    if (rc < 0)
        return rc;
    enum { MAXB = 256 };
    gorgon_request rq[MAXB];
    for (int i = 0; i < MAXB; i++)
        rq[i] = (gorgon_request){.opcode = GORGON_OP_NOP, .user_data = (uint64_t)i};
    gorgon_completion cq[MAXB];
    uint32_t burst = c->burst > MAXB ? MAXB : c->burst;
    const uint32_t window = 256; /* default SQ size */
    uint64_t done = 0, t0 = cm_now_ns(), end = t0 + (uint64_t)(c->burst_s * 1e9), now = t0;
    unsigned k = 0;
    while (rc >= 0) {
        uint32_t out = gorgon_inflight(cli);
        if (out + burst <= window)
            rc = gorgon_submit_burst(cli, rq, burst);
        if (rc < 0)
            break;
        rc = gorgon_poll(cli, cq, MAXB);
        if (rc > 0)
            done += (uint64_t)rc;
        if ((++k & 255u) == 0 && (now = cm_now_ns()) >= end)
            break;
    }
    /* Drain what is still in flight so the next measurement starts clean. */
    while (rc >= 0 && gorgon_inflight(cli))
        rc = gorgon_wait(cli, cq, MAXB, 1000000000);
    gorgon_close(cli);
    if (rc < 0)
        return rc;
    *msgs_per_s = (double)done / ((double)(now - t0) * 1e-9);
    return 0;
}

/* The hardware floor: two processes bounce one cache line each way (no
 * rings, no daemon), pinned like the other runs. What the shm rows cost
 * beyond this is gorgon's. */
static int measure_raw(const bench_cfg *c, long iters, uint64_t *rtt, lat *out)
{
    uint32_t *m = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        return cm_neg_errno();
    uint32_t *ping = &m[0], *pong = &m[16]; /* separate cache lines */
    const long warm = iters / 10 + 1;
    pid_t pid = fork();
    if (pid < 0) {
        munmap(m, 4096);
        return cm_neg_errno();
    }
    if (pid == 0) {
        pin(c->cpu_server);
        for (uint32_t i = 1; i <= (uint32_t)(iters + warm); i++) {
            while (__atomic_load_n(ping, __ATOMIC_ACQUIRE) != i)
                ;
            __atomic_store_n(pong, i, __ATOMIC_RELEASE);
        }
        _exit(0);
    }
    for (uint32_t i = 1; i <= (uint32_t)(iters + warm); i++) {
        uint64_t t0 = cm_now_ns();
        __atomic_store_n(ping, i, __ATOMIC_RELEASE);
        while (__atomic_load_n(pong, __ATOMIC_ACQUIRE) != i)
            ;
        if (i > (uint32_t)warm)
            rtt[i - 1 - warm] = cm_now_ns() - t0;
    }
    waitpid(pid, NULL, 0);
    munmap(m, 4096);
    *out = summarize(rtt, (size_t)iters);
    return 0;
}

/* The socket baseline: a forked echo process, blocking read/write. */
static int measure_uds(const bench_cfg *c, long iters, uint64_t *rtt, lat *out)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0)
        return cm_neg_errno();
    size_t cap = c->payload ? c->payload : 1;
    pid_t pid = fork();
    if (pid < 0)
        return cm_neg_errno();
    if (pid == 0) {
        close(sv[0]);
        pin(c->cpu_server);
        uint8_t *buf = malloc(cap);
        for (;;) {
            ssize_t n = buf ? read(sv[1], buf, cap) : -1;
            if (n < 0 || (n == 0 && c->payload))
                _exit(0);
            if (write(sv[1], buf, (size_t)n) != n)
                _exit(1);
        }
    }
    close(sv[1]);
    uint8_t *buf = malloc(cap), *back = malloc(cap);
    int rc = buf && back ? 0 : -ENOMEM;
    for (size_t i = 0; i < c->payload && buf; i++)
        buf[i] = (uint8_t)i;
    long warm = iters / 10 < 1000 ? iters / 10 : 1000;
    for (long i = 0; i < warm + iters && rc == 0; i++) {
        uint64_t t0 = cm_now_ns();
        if (write(sv[0], buf, c->payload) != (ssize_t)c->payload ||
            read(sv[0], back, cap) != (ssize_t)c->payload) {
            rc = -EIO;
            break;
        }
        if (i >= warm)
            rtt[i - warm] = cm_now_ns() - t0;
    }
    close(sv[0]);
    waitpid(pid, NULL, 0);
    free(buf);
    free(back);
    if (rc == 0)
        *out = summarize(rtt, (size_t)iters);
    return rc;
}

/* ---- driver ------------------------------------------------------------------------ */

static void usage(FILE *f)
{
    fprintf(f, "usage: gorgon-bench ipc [--iters N] [--futex-iters N] [--payload BYTES]\n"
               "                        [--burst N] [--burst-seconds S] [--gorgond PATH] [--json]\n"
               "  --iters N          round trips per busy-poll and socket run (default 100000)\n"
               "  --futex-iters N    round trips in sleep (futex) mode (default iters/5)\n"
               "  --payload BYTES    PING payload (default 64)\n"
               "  --burst N          descriptors per burst in the throughput run (default 32)\n"
               "  --burst-seconds S  duration of the throughput run (default 1)\n"
               "  --gorgond PATH     daemon to start (default: next to gorgon-bench)\n");
}

/* "name":{"rtt_ns":{...},"iters":N<extra>}, */
static void json_lat(const char *name, const lat *l, const char *extra)
{
    printf("\"%s\":{\"rtt_ns\":{\"min\":%llu,\"avg\":%.1f,\"p50\":%llu,\"p99\":%llu,\"max\":%llu},"
           "\"iters\":%zu%s},",
           name, (unsigned long long)l->min, l->avg, (unsigned long long)l->p50,
           (unsigned long long)l->p99, (unsigned long long)l->max, l->n, extra);
}

int bench_ipc_main(int argc, char **argv)
{
    bench_cfg c = {.iters = 100000, .futex_iters = -1, .payload = 64, .burst_s = 1.0, .burst = 32};
    static const struct option opts[] = {
        {"iters", required_argument, NULL, 'n'},
        {"futex-iters", required_argument, NULL, 'f'},
        {"payload", required_argument, NULL, 'p'},
        {"burst", required_argument, NULL, 'b'},
        {"burst-seconds", required_argument, NULL, 's'},
        {"gorgond", required_argument, NULL, 'g'},
        {"json", no_argument, NULL, 'j'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    optind = 1;
    int o;
    while ((o = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        char *end = NULL;
        switch (o) {
        case 'n': c.iters = strtol(optarg, &end, 0); break;
        case 'f': c.futex_iters = strtol(optarg, &end, 0); break;
        case 'p': c.payload = (size_t)strtoul(optarg, &end, 0); break;
        case 'b': c.burst = (uint32_t)strtoul(optarg, &end, 0); break;
        case 's': c.burst_s = strtod(optarg, &end); break;
        case 'g': snprintf(c.gorgond, sizeof(c.gorgond), "%s", optarg); break;
        case 'j': c.json = true; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
        if (end && *end) {
            fprintf(stderr, "gorgon-bench ipc: bad number '%s'\n", optarg);
            return 2;
        }
    }
    if (c.futex_iters < 0)
        c.futex_iters = c.iters / 5 > 0 ? c.iters / 5 : 1;
    if (c.iters < 1 || c.payload > 16384 || c.burst < 1 || c.burst > 256 || c.burst_s <= 0) {
        fprintf(stderr, "gorgon-bench ipc: need --iters >= 1, --payload <= 16384, "
                        "--burst in [1, 256], --burst-seconds > 0\n");
        return 2;
    }
    if (find_gorgond(&c) < 0) {
        fprintf(stderr, "gorgon-bench ipc: gorgond not found at '%s' (build it: make "
                        "build/bin/gorgond, or pass --gorgond PATH)\n", c.gorgond);
        return 1;
    }
    pick_cpus(&c);
    long n_max = c.iters > c.futex_iters ? c.iters : c.futex_iters;
    uint64_t *rtt = malloc((size_t)n_max * sizeof(*rtt));
    if (!rtt)
        return 1;
    /* The client side runs on its own CPU for the whole suite. */
    cpu_set_t saved;
    bool restore = sched_getaffinity(0, sizeof(saved), &saved) == 0;
    pin(c.cpu_client);

    lat poll_l = {0}, futex_l = {0}, uds_l = {0}, raw_l = {0};
    double msgs = 0;
    daemon_proc d;
    int rc = daemon_start(&d, &c, "1000000");
    const char *stage = "start gorgond (busy-poll)";
    if (rc == 0) {
        stage = "shm_poll";
        rc = measure_ping(&c, d.sock, GORGON_BUSY_POLL, c.iters, rtt, &poll_l);
        if (rc == 0) {
            stage = "burst";
            rc = measure_burst(&c, d.sock, &msgs);
        }
        daemon_stop(&d);
    }
    if (rc == 0) {
        stage = "start gorgond (sleep)";
        rc = daemon_start(&d, &c, "0");
        if (rc == 0) {
            stage = "shm_futex";
            rc = measure_ping(&c, d.sock, GORGON_NO_SPIN, c.futex_iters, rtt, &futex_l);
            daemon_stop(&d);
        }
    }
    if (rc == 0) {
        stage = "uds";
        rc = measure_uds(&c, c.iters, rtt, &uds_l);
    }
    if (rc == 0) {
        stage = "raw ping-pong";
        rc = measure_raw(&c, c.iters, rtt, &raw_l);
    }
    if (restore)
        sched_setaffinity(0, sizeof(saved), &saved);
    free(rtt);
    if (rc < 0) {
        fprintf(stderr, "gorgon-bench ipc: %s failed: %s\n", stage, gorgon_strerror(rc));
        return 1;
    }
    double ratio = poll_l.p50 ? (double)uds_l.p50 / (double)poll_l.p50 : 0;
    double ratio_futex = futex_l.p50 ? (double)uds_l.p50 / (double)futex_l.p50 : 0;
    if (c.json) {
        printf("{\"suite\":\"ipc\",\"payload\":%zu,\"cpus\":[%d,%d],", c.payload, c.cpu_client,
               c.cpu_server);
        char extra[96];
        snprintf(extra, sizeof(extra), ",\"msgs_per_s\":%.0f,\"burst\":%u", msgs, c.burst);
        json_lat("shm_poll", &poll_l, extra);
        json_lat("shm_futex", &futex_l, "");
        json_lat("uds", &uds_l, "");
        json_lat("raw_pingpong", &raw_l, "");
        printf("\"uds_p50_over_shm_poll_p50\":%.2f,\"uds_p50_over_shm_futex_p50\":%.2f}\n", ratio,
               ratio_futex);
        return 0;
    }
    printf("gorgon-bench ipc: payload %zu B, client cpu %d, server cpu %d\n", c.payload,
           c.cpu_client, c.cpu_server);
    printf("%-10s %10s %10s %10s %10s %10s %9s\n", "mode", "iters", "min ns", "avg ns", "p50 ns",
           "p99 ns", "uds/x p50");
    const struct {
        const char *name;
        const lat *l;
    } rows[] = {{"shm_poll", &poll_l}, {"shm_futex", &futex_l}, {"uds", &uds_l},
                {"raw_pp", &raw_l}};
    for (size_t i = 0; i < 4; i++) {
        const lat *l = rows[i].l;
        printf("%-10s %10zu %10llu %10.0f %10llu %10llu %8.1fx\n", rows[i].name, l->n,
               (unsigned long long)l->min, l->avg, (unsigned long long)l->p50,
               (unsigned long long)l->p99, l->p50 ? (double)uds_l.p50 / (double)l->p50 : 0);
    }
    printf("burst      %u NOPs per burst, busy-poll: %.2f M descriptors/s\n", c.burst, msgs / 1e6);
    printf("raw_pp is a bare cache-line ping-pong between the same two CPUs (the hardware\n"
           "floor); shm_poll p50 is %.2fx of it\n",
           raw_l.p50 ? (double)poll_l.p50 / (double)raw_l.p50 : 0);
    return 0;
}
