/* gorgon-bench serve: load a server the way `vllm bench serve` does and
 * report the same metrics (REFERENCES.md):
 *
 *   TTFT  submit -> first streamed token          E2EL  submit -> last token
 *   TPOT  (E2EL - TTFT) / (output tokens - 1)     ITL   every gap between chunks
 *   goodput: completed requests per second meeting every SLO given, and
 *   goodput_fraction: those requests over all requests (failed ones count)
 *
 * Two drivers run the same workload: a running gorgond (started with
 * --model) through libgorgon's shared-memory rings (this file), or any
 * OpenAI-compatible HTTP server with --base-url (bench_http.c: our sidecar,
 * llama.cpp's llama-server, vLLM).
 *
 * Arrivals: --request-rate R (requests/s; gamma inter-arrival times with
 * shape B = --burstiness and scale 1/(R*B); B = 1 is Poisson) or all at once
 * (rate inf), optionally capped by --concurrency C requests in flight. Both
 * take a comma list (--request-rate 5,10,inf --concurrency 1,4): the
 * workload runs once per pair of the cross product, rates outer, each run
 * with the same prompts and, at one rate, the same arrival gaps (prompts
 * and gaps come from two random streams reseeded from --seed per run).
 * Each run prints its table, or one JSON line carrying its request_rate
 * (null for inf) and max_concurrency (null for no cap).
 * Prompts are random token ids after BOS (id 1), --input-len N of them, or
 * a length drawn uniformly in [A, B] per request with --input-len A:B (the
 * lengths are exact; min/mean/max are reported), or --prompt TEXT. On the
 * shm path the stream carries token ids, so output tokens are counted
 * exactly (a model may end early on EOS: the count is what it produced);
 * over HTTP the server's usage counts them, or each chunk counts one when
 * it sends none.
 * One thread drives every request through non-blocking gorgon_poll over as
 * many client sessions as the in-flight count needs. */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <poll.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clients/bench/bench.h"
#include "clients/gorgon.h"
#include "common/common.h"

#define PER_CLIENT 48 /* requests in flight per session (gorgond's default: 64 slots) */
#define MAX_LIST 64   /* values in one --concurrency or --request-rate list */
#define MAX_IN_LEN (1 << 24) /* --input-len's bound */
#define MAX_ERRORS 8  /* failure messages reported per run */

/* ---- workload ------------------------------------------------------------ */

/* Two xorshift64 streams, reseeded from --seed before each run: prompts
 * (lengths and ids) apart from arrival gaps, so runs at different rates,
 * whose gaps consume different numbers of draws, still send the same
 * prompts. */
static uint64_t prompt_rng, arrival_rng;

static double urand(uint64_t *st)
{
    *st ^= *st << 13;
    *st ^= *st >> 7;
    *st ^= *st << 17;
    return ((double)(*st >> 11) + 0.5) / 9007199254740992.0;
}

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void rng_reseed(uint64_t seed)
{
    uint64_t x = seed;
    prompt_rng = splitmix64(&x) | 1; /* xorshift's state must not be 0 */
    arrival_rng = splitmix64(&x) | 1;
}

static double nrand(uint64_t *st)
{
    return sqrt(-2.0 * log(urand(st))) * cos(2.0 * M_PI * urand(st));
}

/* Marsaglia-Tsang; shape < 1 through the boost u^(1/shape). */
static double gamma_rand(uint64_t *st, double shape, double scale)
{
    if (shape < 1.0)
        return gamma_rand(st, shape + 1.0, scale) * pow(urand(st), 1.0 / shape);
    double d = shape - 1.0 / 3.0, c = 1.0 / sqrt(9.0 * d);
    for (;;) {
        double x = nrand(st), v = 1.0 + c * x;
        if (v <= 0)
            continue;
        v = v * v * v;
        double u = urand(st);
        if (log(u) < 0.5 * x * x + d - d * v + d * log(v))
            return d * v * scale;
    }
}

int64_t bench_serve_prompt_ids(const bench_workload *w, int32_t *ids)
{
    int64_t n = w->in_min;
    if (w->in_max > w->in_min) {
        n += (int64_t)(urand(&prompt_rng) * (double)(w->in_max - w->in_min + 1));
        if (n > w->in_max) /* u * span can round up to span */
            n = w->in_max;
    }
    ids[0] = 1;
    for (int64_t j = 1; j < n; j++)
        ids[j] = 10 + (int32_t)(urand(&prompt_rng) * 250);
    return n;
}

uint64_t bench_serve_next_gap_ns(const bench_workload *w)
{
    if (!isfinite(w->rate))
        return 0;
    return (uint64_t)(gamma_rand(&arrival_rng, w->burst, 1.0 / (w->rate * w->burst)) * 1e9);
}

int bench_sreq_add_itl(bench_sreq *r, double ms)
{
    if (r->n_itl == r->cap_itl) {
        uint32_t cap = r->cap_itl ? 2 * r->cap_itl : 64;
        double *n = realloc(r->itl, cap * sizeof(double));
        if (!n)
            return -ENOMEM;
        r->itl = n;
        r->cap_itl = cap;
    }
    r->itl[r->n_itl++] = ms;
    return 0;
}

void bench_sreq_fail(bench_sreq *r, const char *fmt, ...)
{
    r->failed = true;
    if (r->err)
        return;
    va_list ap;
    va_start(ap, fmt);
    if (vasprintf(&r->err, fmt, ap) < 0)
        r->err = NULL;
    va_end(ap);
}

/* ---- shared-memory driver ----------------------------------------------- */

typedef struct shm_drv {
    gorgon_client **cli;
    uint32_t *inflight;
    int n_cli;
    /* --wait event: sleep in poll(2) on the clients' completion event fds
     * while nothing is due (what gorgon-sidecar does), instead of spinning
     * on gorgon_poll, which on a small host takes a CPU from gorgond and
     * its worker. */
    bool event_wait;
    struct pollfd *pfd;
} shm_drv;

static int shm_open(shm_drv *d, const char *sock, int64_t max_inflight)
{
    d->n_cli = (int)((max_inflight + PER_CLIENT - 1) / PER_CLIENT);
    d->cli = calloc((size_t)d->n_cli, sizeof(*d->cli));
    d->inflight = calloc((size_t)d->n_cli, sizeof(uint32_t));
    d->pfd = calloc((size_t)d->n_cli, sizeof(*d->pfd));
    if (!d->cli || !d->inflight || !d->pfd) {
        fprintf(stderr, "gorgon-bench serve: out of memory\n");
        return -ENOMEM;
    }
    for (int i = 0; i < d->n_cli; i++) {
        gorgon_opts o = {.socket_path = sock};
        int rc = gorgon_connect(&d->cli[i], &o);
        if (rc < 0) {
            fprintf(stderr, "gorgon-bench serve: cannot connect to %s: %s\n", gorgon_last_socket(),
                    gorgon_strerror(rc));
            return rc;
        }
        if (d->event_wait) {
            int fd = gorgon_event_fd(d->cli[i]);
            if (fd < 0) {
                fprintf(stderr, "gorgon-bench serve: --wait event: gorgond gives no completion "
                                "event fd: %s\n",
                        gorgon_strerror(fd));
                return fd;
            }
            d->pfd[i] = (struct pollfd){.fd = fd, .events = POLLIN};
        }
    }
    /* Warm-up: one short request, so the worker has loaded the model. */
    uint32_t r;
    gorgon_gen_chunk ch = {0};
    int rc = gorgon_generate_submit(d->cli[0], &(gorgon_gen_params){.prompt = "", .max_tokens = 2},
                                    0, &r);
    if (rc == 0)
        while ((rc = gorgon_generate_next(d->cli[0], r, &ch, 60000000000ll)) == 1)
            ;
    if (rc < 0) {
        fprintf(stderr, "gorgon-bench serve: warm-up request failed: %s %.*s\n", gorgon_strerror(rc),
                rc == -ETIMEDOUT ? 0 : (int)ch.len, ch.text ? ch.text : "");
        return rc;
    }
    return 0;
}

static void shm_close(shm_drv *d)
{
    for (int i = 0; d->cli && i < d->n_cli; i++)
        gorgon_close(d->cli[i]);
    free(d->cli);
    free(d->inflight);
    free(d->pfd);
}

/* --wait event, with nothing reaped or submitted this round: arm every
 * client's event fd and sleep until one is readable or the next arrival is
 * due (wake_ns, UINT64_MAX: none). A client with completions ready skips
 * the sleep. */
static int shm_sleep(shm_drv *d, uint64_t wake_ns)
{
    for (int i = 0; i < d->n_cli; i++) {
        int rc = gorgon_event_arm(d->cli[i]);
        if (rc != 0)
            return rc < 0 ? rc : 0;
    }
    int timeout_ms = -1;
    if (wake_ns != UINT64_MAX) {
        uint64_t now = cm_now_ns();
        if (wake_ns <= now)
            return 0;
        timeout_ms = (int)((wake_ns - now + 999999) / 1000000);
    }
    int n = poll(d->pfd, (nfds_t)d->n_cli, timeout_ms);
    return n < 0 && errno != EINTR ? -errno : 0;
}

static int shm_run(shm_drv *d, const bench_workload *w, int64_t max_inflight, bench_sreq *rq,
                   double *dur_s)
{
    int32_t *ids = malloc((size_t)w->in_max * sizeof(int32_t));
    if (!ids) {
        fprintf(stderr, "gorgon-bench serve: out of memory\n");
        return -ENOMEM;
    }
    int64_t n_prompts = w->n_prompts;
    int64_t issued = 0, finished = 0, inflight = 0;
    int64_t ids_for = -1, n_ids = 0; /* the request whose prompt is in ids */
    uint64_t t0 = cm_now_ns();
    uint64_t next_arrival = t0;
    gorgon_completion comps[64];
    while (finished < n_prompts) {
        uint64_t now = cm_now_ns();
        bool busy = false;
        while (issued < n_prompts && now >= next_arrival && inflight < max_inflight) {
            int k = -1;
            for (int i = 0; i < d->n_cli; i++)
                if (d->inflight[i] < PER_CLIENT && (k < 0 || d->inflight[i] < d->inflight[k]))
                    k = i;
            if (k < 0)
                break;
            gorgon_gen_params gp = {.max_tokens = (int32_t)w->out_len,
                                    .temperature = (float)w->temperature,
                                    .flags = GORGON_GEN_WANT_IDS |
                                             (w->no_medusa ? GORGON_GEN_NO_MEDUSA : 0)};
            if (w->prompt) {
                gp.prompt = w->prompt;
            } else {
                /* once per request: a retry after a full ring (-EAGAIN
                 * below) sends the prompt drawn the first time */
                if (ids_for != issued) {
                    n_ids = bench_serve_prompt_ids(w, ids);
                    ids_for = issued;
                }
                gp.prompt_ids = ids;
                gp.n_ids = (size_t)n_ids;
                gp.flags |= GORGON_GEN_PROMPT_IDS;
            }
            uint32_t slot;
            /* the clock starts before the submission: its doorbell can wake
             * gorgond on this CPU, which may then run until the first token */
            uint64_t t_submit = cm_now_ns();
            int rc = gorgon_generate_submit(d->cli[k], &gp, (uint64_t)issued, &slot);
            if (rc == -EAGAIN)
                break; /* ring full: reap first */
            bench_sreq *r = &rq[issued];
            r->t_submit = t_submit;
            r->n_in = w->prompt ? 0 : (uint32_t)n_ids;
            if (rc < 0) {
                bench_sreq_fail(r, "submit: %s", gorgon_strerror(rc));
                r->done = true;
                finished++;
            } else {
                d->inflight[k]++;
                inflight++;
            }
            issued++;
            busy = true;
            next_arrival += bench_serve_next_gap_ns(w);
        }
        for (int i = 0; i < d->n_cli; i++) {
            int n = gorgon_poll(d->cli[i], comps, 64);
            if (n < 0) {
                fprintf(stderr, "gorgon-bench serve: %s\n", gorgon_strerror(n));
                free(ids);
                return n;
            }
            uint64_t t = cm_now_ns();
            for (int j = 0; j < n; j++) {
                if (comps[j].opcode != GORGON_OP_GENERATE || comps[j].user_data >= (uint64_t)issued)
                    continue;
                bench_sreq *r = &rq[comps[j].user_data];
                gorgon_gen_chunk ch;
                gorgon_generate_chunk_of(d->cli[i], &comps[j], &ch);
                if (ch.n_ids) {
                    if (!r->t_first)
                        r->t_first = t;
                    else if (bench_sreq_add_itl(r, (double)(t - r->t_last) / 1e6) < 0)
                        bench_sreq_fail(r, "out of memory for its inter-token latencies");
                    r->t_last = t;
                    r->n_out += (uint32_t)ch.n_ids;
                    r->n_chunks++;
                }
                if (ch.done) {
                    r->done = true;
                    r->med_steps = ch.usage.medusa_steps;
                    r->med_acc = ch.usage.medusa_accepted;
                    if (ch.usage.prompt_tokens)
                        r->n_in = ch.usage.prompt_tokens;
                    if (ch.error)
                        bench_sreq_fail(r, "%s: %.*s", gorgon_strerror(ch.error), (int)ch.len,
                                        ch.text ? ch.text : "");
                    d->inflight[i]--;
                    inflight--;
                    finished++;
                }
            }
            busy |= n > 0;
        }
        if (busy)
            continue;
        if (d->event_wait) {
            const bool due = issued < n_prompts && inflight < max_inflight;
            int rc = shm_sleep(d, due ? next_arrival : UINT64_MAX);
            if (rc < 0) {
                fprintf(stderr, "gorgon-bench serve: %s\n", gorgon_strerror(rc));
                free(ids);
                return rc;
            }
        } else {
            __builtin_ia32_pause();
        }
    }
    *dur_s = (double)(cm_now_ns() - t0) / 1e9;
    free(ids);
    return 0;
}

/* ---- metrics ------------------------------------------------------------- */

typedef struct stat3 {
    double mean, median, p99;
} stat3;

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* v must be sorted ascending. */
static stat3 summarize(const double *v, size_t n)
{
    stat3 s = {0};
    if (!n)
        return s;
    double sum = 0;
    for (size_t i = 0; i < n; i++)
        sum += v[i];
    s.mean = sum / (double)n;
    s.median = n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
    /* numpy percentile (linear interpolation), as vllm */
    double pos = 0.99 * (double)(n - 1);
    size_t lo = (size_t)pos;
    double frac = pos - (double)lo;
    s.p99 = lo + 1 < n ? v[lo] + frac * (v[lo + 1] - v[lo]) : v[lo];
    return s;
}

typedef struct slo {
    double ttft, tpot, e2el; /* ms; 0: none */
} slo;

typedef struct run_totals {
    long good; /* completed requests meeting every SLO */
    uint64_t in_total, out_total, med_steps, med_acc;
    /* prompt lengths of the completed requests whose length is known (the
     * server's count, else the ids sent; a text prompt over HTTP without
     * usage has none) */
    long in_known;
    uint32_t in_min, in_max;
} run_totals;

static void result_fini(bench_result *res)
{
    free(res->ttft);
    free(res->tpot);
    free(res->itl);
    free(res->e2el);
    memset(res, 0, sizeof(*res));
}

/* Fill res (arrays sorted) and tot from a finished run. 0 or -ENOMEM. */
static int result_of(bench_result *res, run_totals *tot, const bench_sreq *rq, int64_t n,
                     double dur, const slo *s)
{
    memset(tot, 0, sizeof(*tot));
    uint64_t itl_n = 0;
    long ok = 0;
    for (int64_t i = 0; i < n; i++)
        if (!rq[i].failed) {
            ok++;
            tot->in_total += rq[i].n_in;
            uint32_t k = rq[i].n_in;
            if (k) {
                if (!tot->in_known || k < tot->in_min)
                    tot->in_min = k;
                if (k > tot->in_max)
                    tot->in_max = k;
                tot->in_known++;
            }
            tot->out_total += rq[i].n_out;
            itl_n += rq[i].n_itl;
            tot->med_steps += rq[i].med_steps;
            tot->med_acc += rq[i].med_acc;
        }
    res->completed = ok;
    res->failed = (long)n - ok;
    res->dur_s = dur;
    res->ttft = calloc((size_t)ok + 1, sizeof(double));
    res->tpot = calloc((size_t)ok + 1, sizeof(double));
    res->e2el = calloc((size_t)ok + 1, sizeof(double));
    res->itl = calloc((size_t)itl_n + 1, sizeof(double));
    if (!res->ttft || !res->tpot || !res->e2el || !res->itl)
        return -ENOMEM;
    for (int64_t i = 0; i < n; i++) {
        const bench_sreq *r = &rq[i];
        if (r->failed)
            continue;
        double tt = r->t_first ? (double)(r->t_first - r->t_submit) / 1e6 : 0;
        double e2 = r->t_last ? (double)(r->t_last - r->t_submit) / 1e6 : 0;
        res->ttft[res->n_ttft++] = tt;
        res->e2el[res->n_e2el++] = e2;
        double tp = 0;
        if (r->n_out > 1) {
            tp = (e2 - tt) / (double)(r->n_out - 1);
            res->tpot[res->n_tpot++] = tp;
        }
        if (r->n_itl)
            memcpy(res->itl + res->n_itl, r->itl, r->n_itl * sizeof(double));
        res->n_itl += r->n_itl;
        if ((s->ttft <= 0 || tt <= s->ttft) && (s->tpot <= 0 || tp <= s->tpot) &&
            (s->e2el <= 0 || e2 <= s->e2el))
            tot->good++;
    }
    qsort(res->ttft, res->n_ttft, sizeof(double), cmp_d);
    qsort(res->tpot, res->n_tpot, sizeof(double), cmp_d);
    qsort(res->itl, res->n_itl, sizeof(double), cmp_d);
    qsort(res->e2el, res->n_e2el, sizeof(double), cmp_d);
    res->req_tp = (double)ok / dur;
    res->out_tp = (double)tot->out_total / dur;
    return 0;
}

static void print_result(const bench_result *res, const run_totals *tot, const bench_sreq *rq,
                         int64_t n, const slo *s, bool json)
{
    /* Tokens per Medusa step (1 + accepted / steps); 0 when none ran. */
    double med_tps =
        tot->med_steps ? 1.0 + (double)tot->med_acc / (double)tot->med_steps : 0.0;
    stat3 v[4] = {summarize(res->ttft, res->n_ttft), summarize(res->tpot, res->n_tpot),
                  summarize(res->itl, res->n_itl), summarize(res->e2el, res->n_e2el)};
    bool has_slo = s->ttft > 0 || s->tpot > 0 || s->e2el > 0;
    /* of all requests, failed ones included: a failure misses every SLO */
    double good_frac = n > 0 ? (double)tot->good / (double)n : 0.0;
    double in_mean = tot->in_known ? (double)tot->in_total / (double)tot->in_known : 0.0;
    if (json) {
        printf("{\"completed\": %ld, \"failed\": %ld, \"max_concurrency\": ", res->completed,
               res->failed);
        if (res->concurrency > 0)
            printf("%lld", (long long)res->concurrency);
        else
            printf("null");
        printf(", \"request_rate\": ");
        if (isfinite(res->rate))
            printf("%.4f", res->rate);
        else
            printf("null"); /* inf: every request at once (JSON has no inf) */
        printf(", \"duration_s\": %.4f, \"total_input_tokens\": %llu", res->dur_s,
               (unsigned long long)tot->in_total);
        if (tot->in_known)
            printf(", \"input_len_min\": %lu, \"input_len_mean\": %.4f, \"input_len_max\": %lu",
                   (unsigned long)tot->in_min, in_mean, (unsigned long)tot->in_max);
        else
            printf(", \"input_len_min\": null, \"input_len_mean\": null, \"input_len_max\": null");
        printf(", \"total_output_tokens\": %llu, \"request_throughput\": %.4f, "
               "\"output_throughput\": %.4f",
               (unsigned long long)tot->out_total, res->req_tp, res->out_tp);
        if (has_slo)
            printf(", \"request_goodput\": %.4f, \"goodput_fraction\": %.4f",
                   (double)tot->good / res->dur_s, good_frac);
        printf(", \"medusa_steps\": %llu, \"medusa_tokens_per_step\": %.4f",
               (unsigned long long)tot->med_steps, med_tps);
        const char *names[4] = {"ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"};
        for (int i = 0; i < 4; i++)
            printf(", \"%s\": {\"mean\": %.4f, \"median\": %.4f, \"p99\": %.4f}", names[i],
                   v[i].mean, v[i].median, v[i].p99);
        printf(", \"errors\": [");
        int k = 0;
        for (int64_t i = 0; i < n && k < MAX_ERRORS; i++)
            if (rq[i].failed) {
                printf("%s\"", k++ ? ", " : "");
                bench_json_puts(rq[i].err ? rq[i].err : "(no message)");
                printf("\"");
            }
        printf("]}\n");
    } else {
        printf("============ Serving Benchmark Result ============\n");
        printf("%-40s %10ld\n", "Successful requests:", res->completed);
        printf("%-40s %10ld\n", "Failed requests:", res->failed);
        if (res->concurrency > 0)
            printf("%-40s %10lld\n", "Maximum request concurrency:", (long long)res->concurrency);
        if (isfinite(res->rate))
            printf("%-40s %10.2f\n", "Request rate (req/s):", res->rate);
        else
            printf("%-40s %10s\n", "Request rate (req/s):", "inf");
        printf("%-40s %10.2f\n", "Benchmark duration (s):", res->dur_s);
        printf("%-40s %10llu\n", "Total input tokens:", (unsigned long long)tot->in_total);
        if (tot->in_known)
            printf("%-40s %10lu\n%-40s %10.2f\n%-40s %10lu\n", "Input length min (tokens):",
                   (unsigned long)tot->in_min, "Input length mean (tokens):", in_mean,
                   "Input length max (tokens):", (unsigned long)tot->in_max);
        else
            printf("%-40s %10s\n", "Input length (tokens):", "unknown");
        printf("%-40s %10llu\n", "Total generated tokens:", (unsigned long long)tot->out_total);
        printf("%-40s %10.2f\n", "Request throughput (req/s):", res->req_tp);
        if (has_slo) {
            printf("%-40s %10.2f\n", "Request goodput (req/s):", (double)tot->good / res->dur_s);
            printf("%-40s %10.4f\n", "Goodput fraction (SLOs met / all):", good_frac);
        }
        printf("%-40s %10.2f\n", "Output token throughput (tok/s):", res->out_tp);
        if (tot->med_steps)
            printf("%-40s %10.2f\n", "Medusa tokens per step:", med_tps);
        const char *names[4] = {"TTFT", "TPOT", "ITL", "E2EL"};
        for (int i = 0; i < 4; i++)
            printf("%s (ms): mean %10.3f   median %10.3f   p99 %10.3f\n", names[i], v[i].mean,
                   v[i].median, v[i].p99);
    }
    fflush(stdout);
    int k = 0;
    for (int64_t i = 0; i < n && k < MAX_ERRORS; i++)
        if (rq[i].failed && ++k)
            fprintf(stderr, "gorgon-bench serve: request %lld failed: %s\n", (long long)i,
                    rq[i].err ? rq[i].err : "(no message)");
    if (res->failed > k)
        fprintf(stderr, "gorgon-bench serve: ... %ld failed requests in all\n", res->failed);
}

/* ---- options ------------------------------------------------------------- */

static void usage(FILE *f)
{
    fputs("usage: gorgon-bench serve [--socket PATH | --base-url http://HOST:PORT [--endpoint PATH]\n"
          "                           [--model NAME] [--api-key KEY] [--unix-socket PATH]]\n"
          "         [--num-prompts N] [--request-rate R[,R...] [--burstiness B]]\n"
          "         [--concurrency C[,C...]] [--input-len I|A:B | --prompt TEXT]\n"
          "         [--output-len O] [--temperature T]\n"
          "         [--goodput ttft:MS [tpot:MS] [e2el:MS]] [--seed S] [--no-medusa]\n"
          "         [--plot FILE.png|FILE.svg] [--wait spin|event] [--json]\n"
          "Drives a running gorgond (started with --model) through shared memory, or with\n"
          "--base-url any OpenAI-compatible server (gorgon-sidecar, llama-server, vLLM) over\n"
          "streaming HTTP (--endpoint /v1/completions, the default, or /v1/chat/completions;\n"
          "--model defaults to the first of GET /v1/models). --unix-socket PATH: HTTP over\n"
          "that Unix socket instead of TCP (as curl's; e.g. gorgon-sidecar --unix PATH, with\n"
          "--base-url http://localhost).\n"
          "Defaults: 100 prompts, rate inf, no concurrency cap, input 32 random token ids,\n"
          "output 64 tokens, temperature 0 (greedy), burstiness 1 (Poisson). Aliases:\n"
          "--requests = --num-prompts, --max-tokens = --output-len.\n"
          "--input-len A:B draws each prompt's length uniformly in [A, B] (1 <= A <= B);\n"
          "every run sends the same prompts (another --seed draws others).\n"
          "--request-rate and --concurrency take comma lists (a rate may be inf): the\n"
          "workload runs once per pair of their cross product, rates outer (one table, or\n"
          "one JSON line, each). --goodput reports the requests meeting every SLO given,\n"
          "per second (goodput) and as a fraction of all requests. --plot draws CDFs of\n"
          "TTFT and ITL (and throughput against concurrency and/or rate) with gnuplot, raw\n"
          "data in FILE.csv. With gorgond --medusa, greedy requests speculate unless\n"
          "--no-medusa.\n"
          "--wait (shared memory): spin on gorgon_poll (the default: lowest latency when\n"
          "the host has a CPU to spare) or sleep on libgorgon's completion event fds\n"
          "between completions (as gorgon-sidecar does; fair on a small host).\n",
          f);
}

/* One KEY:MS of --goodput into o. 0, or -EINVAL after printing why. */
static int parse_goodput(const char *s, slo *o)
{
    const char *colon = strchr(s, ':');
    double *dst = NULL;
    if (colon && colon - s == 4) {
        if (!strncmp(s, "ttft", 4))
            dst = &o->ttft;
        else if (!strncmp(s, "tpot", 4))
            dst = &o->tpot;
        else if (!strncmp(s, "e2el", 4))
            dst = &o->e2el;
    }
    if (!dst) {
        fprintf(stderr, "gorgon-bench serve: --goodput %s: want ttft:MS, tpot:MS or e2el:MS\n", s);
        return -EINVAL;
    }
    char opt[16];
    snprintf(opt, sizeof(opt), "--goodput %.4s", s);
    return bench_parse_f64("serve", opt, colon + 1, 1e-6, 1e9, dst);
}

/* --input-len N or A:B into w->in_min, w->in_max. 0, or -EINVAL after
 * printing why. */
static int parse_input_len(const char *s, bench_workload *w)
{
    const char *colon = strchr(s, ':');
    if (!colon) {
        if (bench_parse_i64("serve", "--input-len", s, 1, MAX_IN_LEN, &w->in_min) < 0)
            return -EINVAL;
        w->in_max = w->in_min;
        return 0;
    }
    char lo[32], opt[64];
    size_t len = (size_t)(colon - s);
    int64_t a, b;
    if (len >= sizeof(lo)) {
        fprintf(stderr, "gorgon-bench serve: --input-len \"%s\": expected N or A:B\n", s);
        return -EINVAL;
    }
    memcpy(lo, s, len);
    lo[len] = '\0';
    /* the errors name the whole range and then its bad end */
    snprintf(opt, sizeof(opt), "--input-len \"%.40s\"", s);
    if (bench_parse_i64("serve", opt, lo, 1, MAX_IN_LEN, &a) < 0 ||
        bench_parse_i64("serve", opt, colon + 1, 1, MAX_IN_LEN, &b) < 0)
        return -EINVAL;
    if (a > b) {
        fprintf(stderr, "gorgon-bench serve: --input-len \"%s\": expected A:B with A <= B\n", s);
        return -EINVAL;
    }
    w->in_min = a;
    w->in_max = b;
    return 0;
}

/* One item of a comma list into out[i]. 0, or -EINVAL after printing why. */
typedef int list_item_fn(const char *item, void *out, int i);

static int conc_item(const char *item, void *out, int i)
{
    return bench_parse_i64("serve", "--concurrency", item, 0, 1000000, (int64_t *)out + i);
}

static int rate_item(const char *item, void *out, int i)
{
    double *rate = (double *)out + i;
    if (!strcmp(item, "inf")) {
        *rate = INFINITY;
        return 0;
    }
    return bench_parse_f64("serve", "--request-rate (req/s, or inf)", item, 1e-9, 1e9, rate);
}

/* Split the comma list s of option opt ("1,4,16") into at most cap items
 * (`want` says what an item is), each parsed by one() into out[i]. Count,
 * or -EINVAL after printing why. */
static int parse_list(const char *opt, const char *want, const char *s, int cap,
                      list_item_fn *one, void *out)
{
    int n = 0;
    const char *p = s;
    for (;;) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        char item[32];
        if (n == cap || len == 0 || len >= sizeof(item)) {
            fprintf(stderr,
                    "gorgon-bench serve: %s \"%s\": expected a list of up to %d %s separated by "
                    "commas\n",
                    opt, s, cap, want);
            return -EINVAL;
        }
        memcpy(item, p, len);
        item[len] = '\0';
        if (one(item, out, n) < 0)
            return -EINVAL;
        n++;
        if (!comma)
            return n;
        p = comma + 1;
    }
}

int bench_serve_main(int argc, char **argv)
{
    const char *sock = NULL, *plot = NULL;
    bench_http_cfg hc = {.endpoint = "/v1/completions"};
    bench_workload w = {.n_prompts = 100, .in_min = 32, .in_max = 32, .out_len = 64,
                        .rate = INFINITY, .burst = 1.0};
    int64_t conc[MAX_LIST] = {0}, seed = 0;
    double rates[MAX_LIST] = {INFINITY};
    int n_conc = 1, n_rate = 1, bad = 0;
    slo s = {0};
    bool json = false, in_given = false, wait_event = false;
    enum { O_SOCK = 256, O_N, O_RATE, O_BURST, O_CONC, O_IN, O_OUT, O_GOOD, O_JSON, O_SEED,
           O_NOMED, O_URL, O_EP, O_PROMPT, O_TEMP, O_KEY, O_MODEL, O_PLOT, O_WAIT, O_UNIX };
    static const struct option opts[] = {
        {"socket", required_argument, 0, O_SOCK},      {"num-prompts", required_argument, 0, O_N},
        {"requests", required_argument, 0, O_N},       {"request-rate", required_argument, 0, O_RATE},
        {"burstiness", required_argument, 0, O_BURST}, {"concurrency", required_argument, 0, O_CONC},
        {"input-len", required_argument, 0, O_IN},     {"output-len", required_argument, 0, O_OUT},
        {"max-tokens", required_argument, 0, O_OUT},   {"goodput", required_argument, 0, O_GOOD},
        {"seed", required_argument, 0, O_SEED},        {"json", no_argument, 0, O_JSON},
        {"no-medusa", no_argument, 0, O_NOMED},        {"base-url", required_argument, 0, O_URL},
        {"endpoint", required_argument, 0, O_EP},      {"prompt", required_argument, 0, O_PROMPT},
        {"temperature", required_argument, 0, O_TEMP}, {"api-key", required_argument, 0, O_KEY},
        {"unix-socket", required_argument, 0, O_UNIX},
        {"model", required_argument, 0, O_MODEL},      {"plot", required_argument, 0, O_PLOT},
        {"wait", required_argument, 0, O_WAIT},        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case O_SOCK: sock = optarg; break;
        case O_N: bad = bench_parse_i64("serve", "--num-prompts", optarg, 1, 10000000, &w.n_prompts); break;
        case O_RATE:
            n_rate = parse_list("--request-rate", "rates in [1e-9, 1e9] req/s or inf", optarg,
                                MAX_LIST, rate_item, rates);
            bad = n_rate < 0 ? n_rate : 0;
            break;
        case O_BURST: bad = bench_parse_f64("serve", "--burstiness", optarg, 1e-6, 1e6, &w.burst); break;
        case O_CONC:
            n_conc = parse_list("--concurrency", "integers in [0, 1000000]", optarg, MAX_LIST,
                                conc_item, conc);
            bad = n_conc < 0 ? n_conc : 0;
            break;
        case O_IN:
            bad = parse_input_len(optarg, &w);
            in_given = true;
            break;
        case O_OUT: bad = bench_parse_i64("serve", "--output-len", optarg, 1, 1 << 24, &w.out_len); break;
        case O_SEED: bad = bench_parse_i64("serve", "--seed", optarg, 0, INT64_MAX, &seed); break;
        case O_GOOD:
            bad = parse_goodput(optarg, &s);
            /* vllm takes several KEY:VALUE in one flag: the words after it
             * with a ':' are its too (a stray word is an error either way) */
            while (bad == 0 && optind < argc && argv[optind][0] != '-' &&
                   strchr(argv[optind], ':'))
                bad = parse_goodput(argv[optind++], &s);
            break;
        case O_JSON: json = true; break;
        case O_NOMED: w.no_medusa = true; break;
        case O_URL: hc.base_url = optarg; break;
        case O_EP: hc.endpoint = optarg; break;
        case O_PROMPT:
            if (!*optarg) {
                fprintf(stderr, "gorgon-bench serve: --prompt: the prompt is empty\n");
                return 2;
            }
            w.prompt = optarg;
            break;
        case O_TEMP: bad = bench_parse_f64("serve", "--temperature", optarg, 0, 100, &w.temperature); break;
        case O_KEY: hc.api_key = optarg; break;
        case O_UNIX: hc.unix_socket = optarg; break;
        case O_MODEL: hc.model = optarg; break;
        case O_PLOT: plot = optarg; break;
        case O_WAIT:
            if (strcmp(optarg, "spin") != 0 && strcmp(optarg, "event") != 0) {
                fprintf(stderr, "gorgon-bench serve: --wait: expected spin or event, got \"%s\"\n",
                        optarg);
                return 2;
            }
            wait_event = strcmp(optarg, "event") == 0;
            break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
        if (bad < 0)
            return 2;
    }
    if (optind < argc) {
        fprintf(stderr, "gorgon-bench serve: unexpected argument \"%s\"\n", argv[optind]);
        return 2;
    }
    if (hc.base_url && sock) {
        fprintf(stderr, "gorgon-bench serve: --socket and --base-url name two different servers: "
                        "give one\n");
        return 2;
    }
    if (hc.base_url && w.no_medusa) {
        fprintf(stderr, "gorgon-bench serve: --no-medusa is a libgorgon flag of the shm path; an "
                        "OpenAI request cannot carry it (start gorgond without --medusa)\n");
        return 2;
    }
    if (in_given && w.prompt) {
        fprintf(stderr, "gorgon-bench serve: --input-len and --prompt both give the prompt: give "
                        "one\n");
        return 2;
    }
    if (hc.base_url && wait_event) {
        fprintf(stderr, "gorgon-bench serve: --wait is for the shared-memory path (the HTTP "
                        "client always sleeps in curl_multi_poll)\n");
        return 2;
    }
    if (!hc.base_url && (hc.api_key || hc.model || hc.unix_socket)) {
        fprintf(stderr, "gorgon-bench serve: --api-key, --model and --unix-socket are for "
                        "--base-url (HTTP)\n");
        return 2;
    }
    if (plot && bench_plot_check(plot) < 0)
        return 2;

    int64_t max_all = 0;
    for (int i = 0; i < n_conc; i++) {
        int64_t m = conc[i] > 0 && conc[i] < w.n_prompts ? conc[i] : w.n_prompts;
        max_all = m > max_all ? m : max_all;
    }
    /* runs: the cross product, rates outer; run k has rate k / n_conc and
     * concurrency k % n_conc */
    size_t n_runs = (size_t)n_rate * (size_t)n_conc;
    bench_result *res = calloc(n_runs, sizeof(*res));
    if (!res) {
        fprintf(stderr, "gorgon-bench serve: out of memory\n");
        return 1;
    }
    shm_drv shm = {.event_wait = wait_event};
    bench_http *http = NULL;
    int rc = hc.base_url ? bench_http_open(&http, &hc, &w) : shm_open(&shm, sock, max_all);
    if (rc < 0) {
        shm_close(&shm);
        free(res);
        return rc == -EINVAL ? 2 : 1;
    }
    bool all_ok = true;
    size_t n_done = 0;
    for (size_t k = 0; k < n_runs && rc == 0; k++) {
        bench_workload wr = w;
        wr.rate = rates[k / (size_t)n_conc];
        int64_t cc = conc[k % (size_t)n_conc];
        int64_t max_inflight = cc > 0 && cc < w.n_prompts ? cc : w.n_prompts;
        bench_sreq *rq = calloc((size_t)w.n_prompts, sizeof(*rq));
        if (!rq) {
            fprintf(stderr, "gorgon-bench serve: out of memory\n");
            rc = -ENOMEM;
            break;
        }
        rng_reseed((uint64_t)seed);
        double dur = 0;
        rc = http ? bench_http_run(http, &wr, max_inflight, rq, &dur)
                  : shm_run(&shm, &wr, max_inflight, rq, &dur);
        run_totals tot;
        if (rc == 0) {
            res[k].rate = wr.rate;
            res[k].concurrency = cc;
            rc = result_of(&res[k], &tot, rq, w.n_prompts, dur, &s);
            if (rc < 0)
                fprintf(stderr, "gorgon-bench serve: out of memory\n");
            else {
                print_result(&res[k], &tot, rq, w.n_prompts, &s, json);
                all_ok &= res[k].failed == 0;
                n_done++;
            }
        }
        for (int64_t j = 0; j < w.n_prompts; j++) {
            free(rq[j].itl);
            free(rq[j].err);
        }
        free(rq);
    }
    if (rc == 0 && plot && bench_plot(plot, res, n_done) < 0)
        rc = -EIO;
    for (size_t k = 0; k < n_runs; k++)
        result_fini(&res[k]);
    free(res);
    bench_http_destroy(http);
    shm_close(&shm);
    return rc == 0 && all_ok ? 0 : 1;
}
