/* gorgon-bench serve: load a server the way `vllm bench serve` does and
 * report the same metrics (REFERENCES.md):
 *
 *   TTFT  submit -> first streamed token          E2EL  submit -> last token
 *   TPOT  (E2EL - TTFT) / (output tokens - 1)     ITL   every gap between chunks
 *   goodput: completed requests per second meeting every SLO given
 *
 * Two drivers run the same workload: a running gorgond (started with
 * --model) through libgorgon's shared-memory rings (this file), or any
 * OpenAI-compatible HTTP server with --base-url (bench_http.c: our sidecar,
 * llama.cpp's llama-server, vLLM).
 *
 * Arrivals: --request-rate R (requests/s; gamma inter-arrival times with
 * shape B = --burstiness and scale 1/(R*B); B = 1 is Poisson) or all at once
 * (rate inf), optionally capped by --concurrency C requests in flight; a
 * list (--concurrency 1,4) runs the workload once per value, each run with
 * the same prompts and arrival gaps.
 * Prompts are --input-len random token ids after BOS (id 1), so the length
 * is exact, or --prompt TEXT. On the shm path the stream carries token ids,
 * so output tokens are counted exactly (a model may end early on EOS: the
 * count is what it produced); over HTTP the server's usage counts them, or
 * each chunk counts one when it sends none.
 * One thread drives every request through non-blocking gorgon_poll over as
 * many client sessions as the in-flight count needs. */
#include <errno.h>
#include <getopt.h>
#include <math.h>
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
#define MAX_CONC 64   /* values in one --concurrency list */
#define MAX_ERRORS 8  /* failure messages reported per run */

/* ---- workload ------------------------------------------------------------ */

static uint64_t rng_state;
static uint64_t rng_seed_state = 0x9e3779b97f4a7c15ull;

static double urand(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return ((double)(rng_state >> 11) + 0.5) / 9007199254740992.0;
}

static double nrand(void)
{
    return sqrt(-2.0 * log(urand())) * cos(2.0 * M_PI * urand());
}

/* Marsaglia-Tsang; shape < 1 through the boost u^(1/shape). */
static double gamma_rand(double shape, double scale)
{
    if (shape < 1.0)
        return gamma_rand(shape + 1.0, scale) * pow(urand(), 1.0 / shape);
    double d = shape - 1.0 / 3.0, c = 1.0 / sqrt(9.0 * d);
    for (;;) {
        double x = nrand(), v = 1.0 + c * x;
        if (v <= 0)
            continue;
        v = v * v * v;
        double u = urand();
        if (log(u) < 0.5 * x * x + d - d * v + d * log(v))
            return d * v * scale;
    }
}

void bench_serve_prompt_ids(int32_t *ids, int64_t n)
{
    ids[0] = 1;
    for (int64_t j = 1; j < n; j++)
        ids[j] = 10 + (int32_t)(urand() * 250);
}

uint64_t bench_serve_next_gap_ns(const bench_workload *w)
{
    if (!isfinite(w->rate))
        return 0;
    return (uint64_t)(gamma_rand(w->burst, 1.0 / (w->rate * w->burst)) * 1e9);
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
} shm_drv;

static int shm_open(shm_drv *d, const char *sock, int64_t max_inflight)
{
    d->n_cli = (int)((max_inflight + PER_CLIENT - 1) / PER_CLIENT);
    d->cli = calloc((size_t)d->n_cli, sizeof(*d->cli));
    d->inflight = calloc((size_t)d->n_cli, sizeof(uint32_t));
    if (!d->cli || !d->inflight) {
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
}

static int shm_run(shm_drv *d, const bench_workload *w, int64_t max_inflight, bench_sreq *rq,
                   double *dur_s)
{
    int32_t *ids = malloc((size_t)w->in_len * sizeof(int32_t));
    if (!ids) {
        fprintf(stderr, "gorgon-bench serve: out of memory\n");
        return -ENOMEM;
    }
    int64_t n_prompts = w->n_prompts;
    int64_t issued = 0, finished = 0, inflight = 0;
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
                bench_serve_prompt_ids(ids, w->in_len);
                gp.prompt_ids = ids;
                gp.n_ids = (size_t)w->in_len;
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
            r->n_in = w->prompt ? 0 : (uint32_t)w->in_len;
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
        if (!busy)
            __builtin_ia32_pause();
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
    long good;
    uint64_t in_total, out_total, med_steps, med_acc;
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
    if (json) {
        printf("{\"completed\": %ld, \"failed\": %ld, \"max_concurrency\": ", res->completed,
               res->failed);
        if (res->concurrency > 0)
            printf("%lld", (long long)res->concurrency);
        else
            printf("null");
        printf(", \"duration_s\": %.4f, \"total_input_tokens\": %llu, "
               "\"total_output_tokens\": %llu, \"request_throughput\": %.4f, "
               "\"output_throughput\": %.4f",
               res->dur_s, (unsigned long long)tot->in_total, (unsigned long long)tot->out_total,
               res->req_tp, res->out_tp);
        if (has_slo)
            printf(", \"request_goodput\": %.4f", (double)tot->good / res->dur_s);
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
        printf("%-40s %10.2f\n", "Benchmark duration (s):", res->dur_s);
        printf("%-40s %10llu\n", "Total input tokens:", (unsigned long long)tot->in_total);
        printf("%-40s %10llu\n", "Total generated tokens:", (unsigned long long)tot->out_total);
        printf("%-40s %10.2f\n", "Request throughput (req/s):", res->req_tp);
        if (has_slo)
            printf("%-40s %10.2f\n", "Request goodput (req/s):", (double)tot->good / res->dur_s);
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
          "                           [--model NAME] [--api-key KEY]]\n"
          "         [--num-prompts N] [--request-rate R [--burstiness B]] [--concurrency C[,C...]]\n"
          "         [--input-len I | --prompt TEXT] [--output-len O] [--temperature T]\n"
          "         [--goodput ttft:MS [tpot:MS] [e2el:MS]] [--seed S] [--no-medusa]\n"
          "         [--plot FILE.png|FILE.svg] [--json]\n"
          "Drives a running gorgond (started with --model) through shared memory, or with\n"
          "--base-url any OpenAI-compatible server (gorgon-sidecar, llama-server, vLLM) over\n"
          "streaming HTTP (--endpoint /v1/completions, the default, or /v1/chat/completions;\n"
          "--model defaults to the first of GET /v1/models).\n"
          "Defaults: 100 prompts, rate inf, no concurrency cap, input 32 random token ids,\n"
          "output 64 tokens, temperature 0 (greedy), burstiness 1 (Poisson). Aliases:\n"
          "--requests = --num-prompts, --max-tokens = --output-len. A --concurrency list\n"
          "runs once per value (one table, or one JSON line, each). --plot draws CDFs of\n"
          "TTFT and ITL (and throughput against concurrency) with gnuplot, raw data in\n"
          "FILE.csv. With gorgond --medusa, greedy requests speculate unless --no-medusa.\n",
          f);
}

static int parse_goodput(const char *s, slo *o)
{
    char key[16];
    double v;
    if (sscanf(s, "%15[a-z]:%lf", key, &v) != 2 || v <= 0)
        return -EINVAL;
    if (!strcmp(key, "ttft"))
        o->ttft = v;
    else if (!strcmp(key, "tpot"))
        o->tpot = v;
    else if (!strcmp(key, "e2el"))
        o->e2el = v;
    else
        return -EINVAL;
    return 0;
}

/* "1,4,16" -> conc[]; 0 (no cap) allowed. Count, or -EINVAL (printed). */
static int parse_conc_list(const char *s, int64_t *conc, int cap)
{
    int n = 0;
    const char *p = s;
    for (;;) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        char item[32];
        if (n == cap || len == 0 || len >= sizeof(item)) {
            fprintf(stderr,
                    "gorgon-bench serve: --concurrency \"%s\": expected a list of up to %d "
                    "integers in [0, 1000000] separated by commas\n",
                    s, cap);
            return -EINVAL;
        }
        memcpy(item, p, len);
        item[len] = '\0';
        if (bench_parse_i64("serve", "--concurrency", item, 0, 1000000, &conc[n]) < 0)
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
    bench_workload w = {.n_prompts = 100, .in_len = 32, .out_len = 64, .rate = INFINITY,
                        .burst = 1.0};
    int64_t conc[MAX_CONC] = {0}, seed = 0;
    int n_conc = 1, bad = 0;
    slo s = {0};
    bool json = false;
    enum { O_SOCK = 256, O_N, O_RATE, O_BURST, O_CONC, O_IN, O_OUT, O_GOOD, O_JSON, O_SEED,
           O_NOMED, O_URL, O_EP, O_PROMPT, O_TEMP, O_KEY, O_MODEL, O_PLOT };
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
        {"model", required_argument, 0, O_MODEL},      {"plot", required_argument, 0, O_PLOT},
        {"help", no_argument, 0, 'h'},                 {0, 0, 0, 0},
    };
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case O_SOCK: sock = optarg; break;
        case O_N: bad = bench_parse_i64("serve", "--num-prompts", optarg, 1, 10000000, &w.n_prompts); break;
        case O_RATE:
            if (strcmp(optarg, "inf"))
                bad = bench_parse_f64("serve", "--request-rate", optarg, 1e-9, 1e9, &w.rate);
            else
                w.rate = INFINITY;
            break;
        case O_BURST: bad = bench_parse_f64("serve", "--burstiness", optarg, 1e-6, 1e6, &w.burst); break;
        case O_CONC:
            n_conc = parse_conc_list(optarg, conc, MAX_CONC);
            bad = n_conc < 0 ? n_conc : 0;
            break;
        case O_IN: bad = bench_parse_i64("serve", "--input-len", optarg, 1, 1 << 24, &w.in_len); break;
        case O_OUT: bad = bench_parse_i64("serve", "--output-len", optarg, 1, 1 << 24, &w.out_len); break;
        case O_SEED:
            bad = bench_parse_i64("serve", "--seed", optarg, 0, INT64_MAX, &seed);
            rng_seed_state = (uint64_t)seed * 2654435761u + 1;
            break;
        case O_GOOD:
            if (parse_goodput(optarg, &s) < 0) {
                fprintf(stderr, "gorgon-bench serve: --goodput %s: want ttft:MS, tpot:MS or e2el:MS\n",
                        optarg);
                return 2;
            }
            /* vllm takes several KEY:VALUE in one flag; accept the next word too */
            while (optind < argc && strchr(argv[optind], ':') && argv[optind][0] != '-' &&
                   parse_goodput(argv[optind], &s) == 0)
                optind++;
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
        case O_MODEL: hc.model = optarg; break;
        case O_PLOT: plot = optarg; break;
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
    if (!hc.base_url && (hc.api_key || hc.model)) {
        fprintf(stderr, "gorgon-bench serve: --api-key and --model are for --base-url (HTTP)\n");
        return 2;
    }
    if (plot && bench_plot_check(plot) < 0)
        return 2;

    int64_t max_all = 0;
    for (int i = 0; i < n_conc; i++) {
        int64_t m = conc[i] > 0 && conc[i] < w.n_prompts ? conc[i] : w.n_prompts;
        max_all = m > max_all ? m : max_all;
    }
    shm_drv shm = {0};
    bench_http *http = NULL;
    int rc = hc.base_url ? bench_http_open(&http, &hc, &w) : shm_open(&shm, sock, max_all);
    if (rc < 0) {
        shm_close(&shm);
        return rc == -EINVAL ? 2 : 1;
    }
    bench_result res[MAX_CONC];
    memset(res, 0, sizeof(res));
    bool all_ok = true;
    int n_done = 0;
    for (int i = 0; i < n_conc && rc == 0; i++) {
        int64_t max_inflight = conc[i] > 0 && conc[i] < w.n_prompts ? conc[i] : w.n_prompts;
        bench_sreq *rq = calloc((size_t)w.n_prompts, sizeof(*rq));
        if (!rq) {
            fprintf(stderr, "gorgon-bench serve: out of memory\n");
            rc = -ENOMEM;
            break;
        }
        rng_state = rng_seed_state;
        double dur = 0;
        rc = http ? bench_http_run(http, &w, max_inflight, rq, &dur)
                  : shm_run(&shm, &w, max_inflight, rq, &dur);
        run_totals tot;
        if (rc == 0) {
            res[i].concurrency = conc[i];
            rc = result_of(&res[i], &tot, rq, w.n_prompts, dur, &s);
            if (rc < 0)
                fprintf(stderr, "gorgon-bench serve: out of memory\n");
            else {
                print_result(&res[i], &tot, rq, w.n_prompts, &s, json);
                all_ok &= res[i].failed == 0;
                n_done++;
            }
        }
        for (int64_t j = 0; j < w.n_prompts; j++) {
            free(rq[j].itl);
            free(rq[j].err);
        }
        free(rq);
    }
    if (rc == 0 && plot && bench_plot(plot, res, (size_t)n_done) < 0)
        rc = -EIO;
    for (int i = 0; i < n_conc; i++)
        result_fini(&res[i]);
    bench_http_destroy(http);
    shm_close(&shm);
    return rc == 0 && all_ok ? 0 : 1;
}
