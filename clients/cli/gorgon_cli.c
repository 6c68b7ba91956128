/* gorgon — command-line client: `gorgon ping`, `gorgon stats`. */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "clients/gorgon.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: gorgon COMMAND [options]\n\n"
               "commands:\n"
               "  ping [--socket PATH] [-c COUNT] [-s SIZE] [-i INTERVAL_MS]\n"
               "        round trips through gorgond; per-ping and min/avg/p50/p99 latency\n"
               "  stats [--socket PATH]\n"
               "        gorgond's counters\n"
               "\n"
               "The socket defaults to $GORGON_SOCKET, else /run/gorgon/gorgon.sock.\n");
}

static int connect_or_explain(gorgon_client **cli, const char *socket_path)
{
    gorgon_opts o = {.socket_path = socket_path};
    int rc = gorgon_connect(cli, &o);
    if (rc == 0)
        return 0;
    const char *path = gorgon_last_socket();
    if (rc == -ENOENT || rc == -ECONNREFUSED)
        fprintf(stderr, "gorgon: cannot connect to %s: %s; is gorgond running?\n", path,
                gorgon_strerror(rc));
    else if (gorgon_last_refusal()[0])
        fprintf(stderr, "gorgon: %s refused the connection: %s (%s)\n", path,
                gorgon_last_refusal(), gorgon_strerror(rc));
    else
        fprintf(stderr, "gorgon: cannot connect to %s: %s\n", path, gorgon_strerror(rc));
    return rc;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static volatile sig_atomic_t interrupted;
static void on_sigint(int sig)
{
    (void)sig;
    interrupted = 1;
}

static long parse_long(const char *what, const char *s, long min, long max)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 0);
    if (errno || end == s || *end || v < min || v > max) {
        fprintf(stderr, "gorgon: %s: '%s' is not in [%ld, %ld]\n", what, s, min, max);
        exit(2);
    }
    return v;
}

static const struct option common_opts[] = {
    {"socket", required_argument, NULL, 'S'},
    {"count", required_argument, NULL, 'c'},
    {"size", required_argument, NULL, 's'},
    {"interval", required_argument, NULL, 'i'},
    {"help", no_argument, NULL, 'h'},
    {NULL, 0, NULL, 0},
};

static int cmd_ping(int argc, char **argv)
{
    const char *sock = NULL;
    long count = 5, size = 64, interval_ms = 200;
    int c;
    while ((c = getopt_long(argc, argv, "c:s:i:h", common_opts, NULL)) != -1) {
        switch (c) {
        case 'S': sock = optarg; break;
        case 'c': count = parse_long("-c", optarg, 1, 100000000); break;
        case 's': size = parse_long("-s", optarg, 0, 64L << 20); break;
        case 'i': interval_ms = parse_long("-i", optarg, 0, 3600000); break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    gorgon_client *cli;
    if (connect_or_explain(&cli, sock) < 0)
        return 1;
    size_t cap = 0;
    if (gorgon_slot_input(cli, 0, &cap) && (size_t)size > cap) {
        fprintf(stderr, "gorgon: -s %ld is larger than gorgond's slot input buffer (%zu bytes)\n",
                size, cap);
        gorgon_close(cli);
        return 2;
    }
    uint8_t *payload = malloc((size_t)size + 1);
    uint64_t *rtt = calloc((size_t)count, sizeof(*rtt));
    if (!payload || !rtt) {
        fprintf(stderr, "gorgon: out of memory\n");
        return 1;
    }
    signal(SIGINT, on_sigint);
    long done = 0;
    int status = 0;
    for (long i = 0; i < count && !interrupted; i++) {
        for (long b = 0; b < size; b++)
            payload[b] = (uint8_t)(i * 31 + b);
        int rc = gorgon_ping(cli, payload, (size_t)size, 1000000000, &rtt[done]);
        if (rc < 0) {
            fprintf(stderr, "gorgon: ping %ld: %s\n", i + 1, gorgon_strerror(rc));
            status = 1;
            if (rc == -EPIPE)
                break;
            continue;
        }
        printf("%d bytes from gorgond: seq=%ld time=%.3f us\n", rc, i + 1,
               (double)rtt[done] / 1e3);
        fflush(stdout);
        done++;
        if (interval_ms && i + 1 < count) {
            struct timespec ts = {interval_ms / 1000, (interval_ms % 1000) * 1000000L};
            nanosleep(&ts, NULL);
        }
    }
    if (done) {
        qsort(rtt, (size_t)done, sizeof(*rtt), cmp_u64);
        double sum = 0;
        for (long i = 0; i < done; i++)
            sum += (double)rtt[i];
        size_t p99 = (size_t)((double)(done - 1) * 0.99 + 0.5);
        printf("--- %s: %ld/%ld pings ok, %ld bytes ---\n", gorgon_last_socket(), done, count,
               size);
        printf("rtt min/avg/p50/p99 = %.3f/%.3f/%.3f/%.3f us\n", (double)rtt[0] / 1e3,
               sum / (double)done / 1e3, (double)rtt[done / 2] / 1e3, (double)rtt[p99] / 1e3);
    }
    free(payload);
    free(rtt);
    gorgon_close(cli);
    return done == count ? status : 1;
}

static int cmd_stats(int argc, char **argv)
{
    const char *sock = NULL;
    int c;
    while ((c = getopt_long(argc, argv, "h", common_opts, NULL)) != -1) {
        switch (c) {
        case 'S': sock = optarg; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    gorgon_client *cli;
    if (connect_or_explain(&cli, sock) < 0)
        return 1;
    gorgon_counters st;
    int rc = gorgon_stats(cli, &st);
    gorgon_close(cli);
    if (rc < 0) {
        fprintf(stderr, "gorgon: stats: %s\n", gorgon_strerror(rc));
        return 1;
    }
    printf("clients_now         %llu\n", (unsigned long long)st.clients_now);
    printf("clients_total       %llu\n", (unsigned long long)st.clients_total);
    printf("sessions_reclaimed  %llu\n", (unsigned long long)st.sessions_reclaimed);
    printf("requests_total      %llu\n", (unsigned long long)st.requests_total);
    printf("protocol_errors     %llu\n", (unsigned long long)st.protocol_errors);
    printf("loop_wakeups        %llu\n", (unsigned long long)st.loop_wakeups);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "-h") || !strcmp(cmd, "--help") || !strcmp(cmd, "help")) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(cmd, "ping"))
        return cmd_ping(argc - 1, argv + 1);
    if (!strcmp(cmd, "stats"))
        return cmd_stats(argc - 1, argv + 1);
    fprintf(stderr, "gorgon: unknown command '%s'\n", cmd);
    usage(stderr);
    return 2;
}
