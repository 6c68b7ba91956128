/* gorgon — command-line client: `gorgon ping`, `gorgon stats`, `gorgon generate`. */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "clients/cli/cli.h"
#include "clients/gorgon.h"
#include "common/cm_version.h"
#include "ipc/ipc_abi.h" /* IPC_GEN_MAX_STOP_LEN: the longest stop string gorgond takes */

static void usage(FILE *f)
{
    fprintf(f, "usage: gorgon COMMAND [options]\n\n"
               "commands:\n"
               "  ping [--socket PATH] [-c COUNT] [-s SIZE] [-i INTERVAL_MS]\n"
               "        round trips through gorgond; per-ping and min/avg/p50/p99 latency\n"
               "  stats [--socket PATH]\n"
               "        gorgond's counters\n"
               "  generate [-p PROMPT | -f FILE] [-n N] [--temp T] [--top-p P] [--top-k K]\n"
               "           [--min-p P] [--repeat-penalty R] [--seed S] [--stop STR]...\n"
               "           [--no-medusa] [--socket PATH]\n"
               "        stream generated text to stdout (N new tokens, default 256; greedy\n"
               "        unless --temp > 0; greedy requests use gorgond's Medusa heads when it\n"
               "        has them, unless --no-medusa); usage and timings to stderr; up to 8\n"
               "        --stop strings of 1 to 63 bytes; --seed S is an integer in [0, 2^64)\n"
               "        (0 or none with --temp > 0: a random seed, printed with the usage)\n"
               "  pull [--sha256 HEX] [--output FILE] [--cache-dir DIR] URL|hf://OWNER/REPO/FILE\n"
               "        download a model (resumable, SHA-256 checked when known) into\n"
               "        $XDG_CACHE_HOME/gorgon and print its path\n"
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
    else if (gorgon_last_refusal()[0]) /* gorgond's own reason says it all */
        fprintf(stderr, "gorgon: gorgond at %s refused the connection: %s\n", path,
                gorgon_last_refusal());
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

/* Every number on the command line goes through parse_long, parse_u64 or
 * parse_double: the whole argument must be the number (no sign where none
 * is allowed, no trailing text, no exponent in an integer) and in range, or
 * the program exits 2 with a message naming the option and the range. */
static void bad_number(const char *what, const char *s, const char *kind, const char *range)
{
    fprintf(stderr, "gorgon: %s: '%s' is not %s in %s\n", what, s, kind, range);
    exit(2);
}

static long parse_long(const char *what, const char *s, long min, long max)
{
    char range[64];
    snprintf(range, sizeof(range), "[%ld, %ld]", min, max);
    char *end;
    errno = 0;
    /* base 10: "010" is ten, not an octal eight */
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || (*s != '-' && (*s < '0' || *s > '9')) || v < min || v > max)
        bad_number(what, s, "an integer", range);
    return v;
}

static uint64_t parse_u64(const char *what, const char *s)
{
    char range[64];
    snprintf(range, sizeof(range), "[0, %llu]", (unsigned long long)UINT64_MAX);
    char *end;
    errno = 0;
    /* strtoull takes "-1" as 2^64 - 1: only digits are a u64 here */
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end || *s < '0' || *s > '9')
        bad_number(what, s, "an integer", range);
    return (uint64_t)v;
}

/* Options take every argument: a word left over (a prompt without -p, say)
 * is an error, not something to ignore. */
static int no_operands(const char *cmd, int argc, char **argv)
{
    if (optind >= argc)
        return 0;
    fprintf(stderr, "gorgon: %s: unexpected argument '%s'%s\n", cmd, argv[optind],
            strcmp(cmd, "generate") ? "" : " (the prompt goes after -p, or in a file: -f)");
    return -EINVAL;
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
    if (no_operands("ping", argc, argv) < 0)
        return 2;
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
    if (no_operands("stats", argc, argv) < 0)
        return 2;
    gorgon_client *cli;
    if (connect_or_explain(&cli, sock) < 0)
        return 1;
    gorgon_counters st;
    static gorgon_group grp[64];
    int rc = gorgon_stats(cli, &st);
    int n_grp = rc < 0 ? 0 : gorgon_groups(cli, grp, 64);
    gorgon_close(cli);
    if (rc < 0 || n_grp < 0) {
        fprintf(stderr, "gorgon: stats: %s\n", gorgon_strerror(rc < 0 ? rc : n_grp));
        return 1;
    }
    printf("clients_now         %llu\n", (unsigned long long)st.clients_now);
    printf("clients_total       %llu\n", (unsigned long long)st.clients_total);
    printf("sessions_reclaimed  %llu\n", (unsigned long long)st.sessions_reclaimed);
    printf("requests_total      %llu\n", (unsigned long long)st.requests_total);
    printf("protocol_errors     %llu\n", (unsigned long long)st.protocol_errors);
    printf("loop_wakeups        %llu\n", (unsigned long long)st.loop_wakeups);
    printf("gen_requests_total  %llu\n", (unsigned long long)st.gen_requests_total);
    printf("gen_failed          %llu\n", (unsigned long long)st.gen_failed);
    printf("gen_cancelled       %llu\n", (unsigned long long)st.gen_cancelled);
    printf("gen_queued          %llu\n", (unsigned long long)st.gen_queued);
    printf("gen_running         %llu\n", (unsigned long long)st.gen_running);
    printf("gen_tokens_total    %llu\n", (unsigned long long)st.gen_tokens_total);
    printf("gen_tokens_per_s    %.1f\n", st.gen_tokens_per_s);
    printf("kv_blocks_used      %llu / %llu\n", (unsigned long long)st.kv_blocks_used,
           (unsigned long long)st.kv_blocks_total);
    printf("decode_batch_max    %llu\n", (unsigned long long)st.decode_batch_max);
    printf("worker_restarts     %llu\n", (unsigned long long)st.worker_restarts);
    printf("medusa_steps        %llu\n", (unsigned long long)st.medusa_steps);
    printf("medusa_accepted     %llu\n", (unsigned long long)st.medusa_accepted);
    if (st.medusa_steps)
        printf("medusa_tokens_step  %.2f (1 + accepted / steps)\n",
               1.0 + (double)st.medusa_accepted / (double)st.medusa_steps);
    printf("medusa_max_batch    %llu\n", (unsigned long long)st.medusa_max_batch);
    printf("gen_waiting         %llu\n", (unsigned long long)st.gen_waiting);
    printf("handshakes_pending  %llu\n", (unsigned long long)st.handshakes_pending);
    printf("handshakes_dropped  %llu\n", (unsigned long long)st.handshakes_dropped);
    printf("watchdog_kills      %llu\n", (unsigned long long)st.watchdog_kills);
    printf("step_max_ms         %.1f\n", (double)st.step_max_us / 1000.0);
    if (st.gen_handoffs_total || st.gen_handoff_waiting) {
        printf("handoffs_total      %llu\n", (unsigned long long)st.gen_handoffs_total);
        printf("handoff_waiting     %llu\n", (unsigned long long)st.gen_handoff_waiting);
    }
    static const char *const state[] = {"starting", "ready", "restarting", "failed"};
    static const char *const role[] = {"", " prefill", " decode"};
    for (int i = 0; i < n_grp && i < 64; i++) {
        const gorgon_group *g = &grp[i];
        printf("group %-13u %s%s, pids", g->group,
               (unsigned)g->state < 4 ? state[g->state] : "?",
               (unsigned)g->role < 3 ? role[g->role] : "");
        for (uint32_t r = 0; r < g->n_ranks; r++)
            printf("%c%d", r ? ',' : ' ', (int)g->pid[r]);
        printf("; requests held %u, waiting %llu; running %llu, queued %llu; kv %llu / %llu; "
               "tokens %llu; restarts %llu\n",
               g->in_worker, (unsigned long long)g->waiting, (unsigned long long)g->running,
               (unsigned long long)g->queued, (unsigned long long)g->kv_blocks_used,
               (unsigned long long)g->kv_blocks_total, (unsigned long long)g->tokens_total,
               (unsigned long long)g->restarts);
        if (g->role != GORGON_GROUP_COLOCATED)
            printf("%-19s handoffs %llu, waiting for adoption %u\n", "",
                   (unsigned long long)g->handoffs_total, g->handoff_waiting);
    }
    return 0;
}

static double parse_double(const char *what, const char *s, double min, double max)
{
    char range[64];
    snprintf(range, sizeof(range), "[%g, %g]", min, max);
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || (*s != '-' && *s != '.' && (*s < '0' || *s > '9')) ||
        !(v >= min && v <= max))
        bad_number(what, s, "a number", range);
    return v;
}

/* The prompt file (-f PATH, "-" for stdin), whole. NULL after a message
 * naming -f when it cannot be opened or read: a directory opens fine with
 * fopen and then fails every read (EISDIR), which must not pass for an
 * empty prompt. */
static char *read_all(const char *path, size_t *len)
{
    FILE *f = strcmp(path, "-") ? fopen(path, "rb") : stdin;
    if (!f) {
        fprintf(stderr, "gorgon: -f %s: %s\n", path, strerror(errno));
        return NULL;
    }
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    int err = 0;
    while (buf) {
        size_t k = fread(buf + n, 1, cap - n, f);
        n += k;
        if (k == 0) {
            if (ferror(f))
                err = errno ? errno : EIO;
            break;
        }
        if (n == cap) {
            char *nb = realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = nb;
            cap *= 2;
        }
    }
    if (f != stdin)
        fclose(f);
    if (!buf) {
        fprintf(stderr, "gorgon: -f %s: out of memory\n", path);
    } else if (err) {
        fprintf(stderr, "gorgon: -f %s: %s\n", path, strerror(err));
        free(buf);
        buf = NULL;
    }
    *len = n;
    return buf;
}

static int cmd_generate(int argc, char **argv)
{
    enum { O_TEMP = 256, O_TOPP, O_TOPK, O_MINP, O_REP, O_SEED, O_STOP, O_NOMED };
    static const struct option opts[] = {
        {"socket", required_argument, NULL, 'S'}, {"prompt", required_argument, NULL, 'p'},
        {"file", required_argument, NULL, 'f'},   {"tokens", required_argument, NULL, 'n'},
        {"temp", required_argument, NULL, O_TEMP}, {"top-p", required_argument, NULL, O_TOPP},
        {"top-k", required_argument, NULL, O_TOPK}, {"min-p", required_argument, NULL, O_MINP},
        {"repeat-penalty", required_argument, NULL, O_REP},
        {"seed", required_argument, NULL, O_SEED}, {"stop", required_argument, NULL, O_STOP},
        {"no-medusa", no_argument, NULL, O_NOMED},
        {"help", no_argument, NULL, 'h'},         {NULL, 0, NULL, 0},
    };
    const char *sock = NULL, *prompt = "", *file = NULL;
    bool have_prompt = false;
    const char *stops[GORGON_GEN_MAX_STOP];
    gorgon_gen_params gp = {.max_tokens = 256, .top_p = 1.0f};
    int c;
    while ((c = getopt_long(argc, argv, "p:f:n:h", opts, NULL)) != -1) {
        switch (c) {
        case 'S': sock = optarg; break;
        case 'p': prompt = optarg, have_prompt = true; break;
        case 'f': file = optarg; break;
        case 'n': gp.max_tokens = (int32_t)parse_long("-n", optarg, 1, 1 << 30); break;
        case O_TEMP: gp.temperature = (float)parse_double("--temp", optarg, 0, 100); break;
        case O_TOPP: gp.top_p = (float)parse_double("--top-p", optarg, 1e-6, 1); break;
        case O_TOPK: gp.top_k = (int32_t)parse_long("--top-k", optarg, 0, 1 << 30); break;
        case O_MINP: gp.min_p = (float)parse_double("--min-p", optarg, 0, 0.999999); break;
        case O_REP: gp.repeat_penalty = (float)parse_double("--repeat-penalty", optarg, 0, 100); break;
        case O_SEED: gp.seed = parse_u64("--seed", optarg); break;
        case O_STOP: {
            size_t l = strlen(optarg);
            if (gp.n_stop == GORGON_GEN_MAX_STOP) {
                fprintf(stderr, "gorgon: --stop: at most %d stop strings\n", GORGON_GEN_MAX_STOP);
                return 2;
            }
            if (l == 0 || l > IPC_GEN_MAX_STOP_LEN) {
                fprintf(stderr, "gorgon: --stop: '%.*s%s' is %zu bytes; a stop string is 1 to %d "
                                "bytes\n",
                        l > 80 ? 80 : (int)l, optarg, l > 80 ? "..." : "", l,
                        IPC_GEN_MAX_STOP_LEN);
                return 2;
            }
            stops[gp.n_stop++] = optarg;
            break;
        }
        case O_NOMED: gp.flags |= GORGON_GEN_NO_MEDUSA; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (no_operands("generate", argc, argv) < 0)
        return 2;
    if (have_prompt && file) {
        fprintf(stderr, "gorgon: generate: -p and -f both give the prompt; use one\n");
        return 2;
    }
    gp.stop = stops;
    char *text = NULL;
    size_t len = strlen(prompt);
    if (file) {
        if (!(text = read_all(file, &len)))
            return 2;
        prompt = text;
    }
    gp.prompt = prompt;
    gp.prompt_len = len;
    gorgon_client *cli;
    if (connect_or_explain(&cli, sock) < 0) {
        free(text);
        return 1;
    }
    signal(SIGINT, on_sigint);
    uint32_t req;
    int rc = gorgon_generate_submit(cli, &gp, 1, &req);
    free(text);
    if (rc < 0) {
        fprintf(stderr, "gorgon: generate: %s%s\n", gorgon_strerror(rc),
                rc == -EMSGSIZE ? " (prompt larger than gorgond's slot input)" : "");
        gorgon_close(cli);
        return rc == -EINVAL || rc == -EMSGSIZE ? 2 : 1;
    }
    gorgon_gen_chunk ch;
    bool cancelled = false;
    for (;;) {
        rc = gorgon_generate_next(cli, req, &ch, 100000000);
        if (rc == -ETIMEDOUT && !ch.done) {
            if (interrupted && !cancelled) {
                gorgon_cancel(cli, req);
                cancelled = true;
            }
            continue;
        }
        if (ch.len && !ch.error)
            fwrite(ch.text, 1, ch.len, stdout);
        fflush(stdout);
        if (rc != 1)
            break;
    }
    int status = 0;
    if (ch.done && !ch.error) {
        fputc('\n', stdout);
        fflush(stdout);
        fprintf(stderr,
                "[finish %s, prompt %u tokens, completion %u tokens, ttft %.2f ms, total %.2f ms, "
                "%.1f tokens/s overall]\n",
                gorgon_finish_name(ch.finish), ch.usage.prompt_tokens,
                ch.usage.completion_tokens, (double)ch.usage.ttft_ns / 1e6,
                (double)ch.usage.total_ns / 1e6,
                ch.usage.total_ns
                    ? (double)ch.usage.completion_tokens * 1e9 / (double)ch.usage.total_ns
                    : 0.0);
        if (ch.usage.seed)
            fprintf(stderr, "[seed %llu: --seed %llu reproduces this text]\n",
                    (unsigned long long)ch.usage.seed, (unsigned long long)ch.usage.seed);
        if (ch.usage.medusa_steps)
            fprintf(stderr, "[medusa: %u steps, %u tokens accepted, %.2f tokens per step]\n",
                    ch.usage.medusa_steps, ch.usage.medusa_accepted,
                    1.0 + (double)ch.usage.medusa_accepted / (double)ch.usage.medusa_steps);
    } else if (ch.done) {
        fprintf(stderr, "\ngorgon: generate failed: %.*s (%s)\n", (int)ch.len, ch.text,
                gorgon_strerror(ch.error));
        status = ch.error == -ECANCELED ? 130 : 1;
    } else {
        fprintf(stderr, "\ngorgon: generate: %s\n", gorgon_strerror(rc));
        status = 1;
    }
    gorgon_close(cli);
    return status;
}

int main(int argc, char **argv)
{
    if (cm_version_requested(argc, argv, "gorgon"))
        return 0;
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
    if (!strcmp(cmd, "generate"))
        return cmd_generate(argc - 1, argv + 1);
    if (!strcmp(cmd, "pull"))
        return cli_pull(argc - 1, argv + 1);
    fprintf(stderr, "gorgon: unknown command '%s'\n", cmd);
    usage(stderr);
    return 2;
}
