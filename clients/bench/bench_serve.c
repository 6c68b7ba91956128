/* gorgon-bench serve: load a running gorgond (started with --model) the way
 * `vllm bench serve` does and report the same metrics (REFERENCES.md):
 *
 *   TTFT  submit -> first streamed token          E2EL  submit -> last token
 *   TPOT  (E2EL - TTFT) / (output tokens - 1)     ITL   every gap between chunks
 *   goodput: completed requests per second meeting every SLO given
 *
 * Arrivals: --request-rate R (requests/s; gamma inter-arrival times with
 * shape B = --burstiness and scale 1/(R*B); B = 1 is Poisson) or all at once
 * (rate inf), optionally capped by --concurrency C requests in flight.
 * Prompts are --input-len random token ids after BOS (id 1), so the length
 * is exact; the stream carries token ids, so output tokens are counted
 * exactly (a model may end early on EOS: the count is what it produced).
 * One thread drives every request through non-blocking gorgon_poll over as
 * many client sessions as the in-flight count needs. */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clients/bench/bench.h"
#include "clients/gorgon.h"
#include "common/common.h"

#define PER_CLIENT 48 /* requests in flight per session (gorgond's default: 64 slots) */

typedef struct sreq {
    uint64_t t_submit, t_first, t_last;
    uint32_t n_out;
    uint32_t med_steps, med_acc; /* Medusa usage of the final chunk */
    int client;
    uint32_t slot;
    bool done, failed;
    double *itl; /* gaps, ms */
    uint32_t n_itl, cap_itl;
} sreq;

typedef struct stat3 {
    double mean, median, p99;
} stat3;

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
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

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static stat3 summarize(double *v, size_t n)
{
    stat3 s = {0};
    if (!n)
        return s;
    qsort(v, n, sizeof(*v), cmp_d);
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

static void usage(FILE *f)
{
    fputs("usage: gorgon-bench serve [--socket PATH] [--num-prompts N]\n"
          "         [--request-rate R [--burstiness B] | --concurrency C]\n"
          "         [--input-len I] [--output-len O] [--goodput ttft:MS [tpot:MS] [e2el:MS]] [--seed S]\n"
          "         [--no-medusa] [--json]\n"
          "Drives a running gorgond (started with --model). Defaults: 100 prompts, rate inf,\n"
          "input 32 tokens, output 64 tokens, burstiness 1 (Poisson). Requests are greedy:\n"
          "with gorgond --medusa they speculate unless --no-medusa.\n",
          f);
}

static int parse_goodput(const char *s, double *ttft, double *tpot, double *e2el)
{
    char key[16];
    double v;
    if (sscanf(s, "%15[a-z]:%lf", key, &v) != 2 || v <= 0)
        return -EINVAL;
    if (!strcmp(key, "ttft"))
        *ttft = v;
    else if (!strcmp(key, "tpot"))
        *tpot = v;
    else if (!strcmp(key, "e2el"))
        *e2el = v;
    else
        return -EINVAL;
    return 0;
}

static void add_itl(sreq *r, double ms)
{
    if (r->n_itl == r->cap_itl) {
        uint32_t cap = r->cap_itl ? 2 * r->cap_itl : 64;
        double *n = realloc(r->itl, cap * sizeof(double));
        if (!n)
            return;
        r->itl = n;
        r->cap_itl = cap;
    }
    r->itl[r->n_itl++] = ms;
}

int bench_serve_main(int argc, char **argv)
{
    const char *sock = NULL;
    int64_t n_prompts = 100, conc = 0, in_len = 32, out_len = 64, seed = 0;
    int bad = 0;
    double rate = INFINITY, burst = 1.0, slo_ttft = 0, slo_tpot = 0, slo_e2el = 0;
    bool json = false, no_medusa = false;
    enum { O_SOCK = 256, O_N, O_RATE, O_BURST, O_CONC, O_IN, O_OUT, O_GOOD, O_JSON, O_SEED,
           O_NOMED };
    static const struct option opts[] = {
        {"socket", required_argument, 0, O_SOCK},      {"num-prompts", required_argument, 0, O_N},
        {"request-rate", required_argument, 0, O_RATE}, {"burstiness", required_argument, 0, O_BURST},
        {"concurrency", required_argument, 0, O_CONC}, {"input-len", required_argument, 0, O_IN},
        {"output-len", required_argument, 0, O_OUT},   {"goodput", required_argument, 0, O_GOOD},
        {"seed", required_argument, 0, O_SEED},        {"json", no_argument, 0, O_JSON},
        {"no-medusa", no_argument, 0, O_NOMED},
        {"help", no_argument, 0, 'h'},                 {0, 0, 0, 0},
    };
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case O_SOCK: sock = optarg; break;
        case O_N: bad = bench_parse_i64("serve", "--num-prompts", optarg, 1, 10000000, &n_prompts); break;
        case O_RATE:
            if (strcmp(optarg, "inf"))
                bad = bench_parse_f64("serve", "--request-rate", optarg, 1e-9, 1e9, &rate);
            else
                rate = INFINITY;
            break;
        case O_BURST: bad = bench_parse_f64("serve", "--burstiness", optarg, 1e-6, 1e6, &burst); break;
        case O_CONC: bad = bench_parse_i64("serve", "--concurrency", optarg, 0, 1000000, &conc); break;
        case O_IN: bad = bench_parse_i64("serve", "--input-len", optarg, 1, 1 << 24, &in_len); break;
        case O_OUT: bad = bench_parse_i64("serve", "--output-len", optarg, 1, 1 << 24, &out_len); break;
        case O_SEED:
            bad = bench_parse_i64("serve", "--seed", optarg, 0, INT64_MAX, &seed);
            rng_state = (uint64_t)seed * 2654435761u + 1;
            break;
        case O_GOOD:
            if (parse_goodput(optarg, &slo_ttft, &slo_tpot, &slo_e2el) < 0) {
                fprintf(stderr, "gorgon-bench serve: --goodput %s: want ttft:MS, tpot:MS or e2el:MS\n",
                        optarg);
                return 2;
            }
            /* vllm takes several KEY:VALUE in one flag; accept the next word too */
            while (optind < argc && strchr(argv[optind], ':') && argv[optind][0] != '-' &&
                   parse_goodput(argv[optind], &slo_ttft, &slo_tpot, &slo_e2el) == 0)
                optind++;
            break;
        case O_JSON: json = true; break;
        case O_NOMED: no_medusa = true; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
        if (bad < 0)
            return 2;
    }
    if (n_prompts < 1 || in_len < 1 || out_len < 1 || conc < 0 || !(rate > 0) || !(burst > 0)) {
        fprintf(stderr, "gorgon-bench serve: --num-prompts, --input-len, --output-len, "
                        "--request-rate and --burstiness must be > 0\n");
        return 2;
    }
    long max_inflight = conc > 0 ? conc : n_prompts;
    if (max_inflight > n_prompts)
        max_inflight = n_prompts;
    int n_cli = (int)((max_inflight + PER_CLIENT - 1) / PER_CLIENT);
    gorgon_client **cli = calloc((size_t)n_cli, sizeof(*cli));
    uint32_t *cli_inflight = calloc((size_t)n_cli, sizeof(uint32_t));
    sreq *rq = calloc((size_t)n_prompts, sizeof(*rq));
    int32_t *ids = malloc((size_t)in_len * sizeof(int32_t));
    if (!cli || !cli_inflight || !rq || !ids) {
        fprintf(stderr, "gorgon-bench serve: out of memory\n");
        return 1;
    }
    for (int i = 0; i < n_cli; i++) {
        gorgon_opts o = {.socket_path = sock};
        int rc = gorgon_connect(&cli[i], &o);
        if (rc < 0) {
            fprintf(stderr, "gorgon-bench serve: cannot connect to %s: %s\n", gorgon_last_socket(),
                    gorgon_strerror(rc));
            return 1;
        }
    }
    /* Warm-up: one short request, so the worker has loaded the model. */
    {
        uint32_t r;
        gorgon_gen_chunk ch;
        int rc = gorgon_generate_submit(cli[0], &(gorgon_gen_params){.prompt = "", .max_tokens = 2},
                                        0, &r);
        if (rc == 0)
            while ((rc = gorgon_generate_next(cli[0], r, &ch, 60000000000ll)) == 1)
                ;
        if (rc < 0) {
            fprintf(stderr, "gorgon-bench serve: warm-up request failed: %s %.*s\n",
                    gorgon_strerror(rc), rc == -ETIMEDOUT ? 0 : (int)ch.len,
                    ch.text ? ch.text : "");
            return 1;
        }
    }
    long issued = 0, finished = 0, inflight = 0;
    uint64_t t0 = cm_now_ns();
    uint64_t next_arrival = t0;
    gorgon_completion comps[64];
    while (finished < n_prompts) {
        uint64_t now = cm_now_ns();
        bool busy = false;
        while (issued < n_prompts && now >= next_arrival && inflight < max_inflight) {
            int k = -1;
            for (int i = 0; i < n_cli; i++)
                if (cli_inflight[i] < PER_CLIENT && (k < 0 || cli_inflight[i] < cli_inflight[k]))
                    k = i;
            if (k < 0)
                break;
            ids[0] = 1;
            for (long j = 1; j < in_len; j++)
                ids[j] = 10 + (int32_t)(urand() * 250);
            gorgon_gen_params gp = {.prompt_ids = ids, .n_ids = (size_t)in_len,
                                    .max_tokens = (int32_t)out_len,
                                    .flags = GORGON_GEN_PROMPT_IDS | GORGON_GEN_WANT_IDS |
                                             (no_medusa ? GORGON_GEN_NO_MEDUSA : 0)};
            uint32_t slot;
            int rc = gorgon_generate_submit(cli[k], &gp, (uint64_t)issued, &slot);
            if (rc == -EAGAIN)
                break; /* ring full: reap first */
            sreq *r = &rq[issued];
            r->t_submit = cm_now_ns();
            r->client = k;
            if (rc < 0) {
                fprintf(stderr, "gorgon-bench serve: submit: %s\n", gorgon_strerror(rc));
                r->failed = r->done = true;
                finished++;
            } else {
                r->slot = slot;
                cli_inflight[k]++;
                inflight++;
            }
            issued++;
            busy = true;
            if (isfinite(rate))
                next_arrival += (uint64_t)(gamma_rand(burst, 1.0 / (rate * burst)) * 1e9);
        }
        for (int i = 0; i < n_cli; i++) {
            int n = gorgon_poll(cli[i], comps, 64);
            if (n < 0) {
                fprintf(stderr, "gorgon-bench serve: %s\n", gorgon_strerror(n));
                return 1;
            }
            uint64_t t = cm_now_ns();
            for (int j = 0; j < n; j++) {
                if (comps[j].opcode != GORGON_OP_GENERATE || comps[j].user_data >= (uint64_t)issued)
                    continue;
                sreq *r = &rq[comps[j].user_data];
                gorgon_gen_chunk ch;
                gorgon_generate_chunk_of(cli[i], &comps[j], &ch);
                if (ch.n_ids) {
                    if (!r->t_first)
                        r->t_first = t;
                    else
                        add_itl(r, (double)(t - r->t_last) / 1e6);
                    r->t_last = t;
                    r->n_out += (uint32_t)ch.n_ids;
                }
                if (ch.done) {
                    r->done = true;
                    r->med_steps = ch.usage.medusa_steps;
                    r->med_acc = ch.usage.medusa_accepted;
                    r->failed = ch.error != 0;
                    if (r->failed && !json)
                        fprintf(stderr, "request %llu failed: %.*s\n",
                                (unsigned long long)comps[j].user_data, (int)ch.len, ch.text);
                    cli_inflight[i]--;
                    inflight--;
                    finished++;
                }
            }
            busy |= n > 0;
        }
        if (!busy)
            __builtin_ia32_pause();
    }
    double dur = (double)(cm_now_ns() - t0) / 1e9;
    long ok = 0, good = 0;
    uint64_t out_total = 0, itl_n = 0, med_steps = 0, med_acc = 0;
    for (long i = 0; i < n_prompts; i++)
        if (!rq[i].failed) {
            ok++;
            out_total += rq[i].n_out;
            itl_n += rq[i].n_itl;
            med_steps += rq[i].med_steps;
            med_acc += rq[i].med_acc;
        }
    /* Tokens per Medusa step (1 + accepted / steps); 0 when none ran. */
    double med_tps = med_steps ? 1.0 + (double)med_acc / (double)med_steps : 0.0;
    double *ttft = calloc((size_t)ok + 1, sizeof(double));
    double *tpot = calloc((size_t)ok + 1, sizeof(double));
    double *e2el = calloc((size_t)ok + 1, sizeof(double));
    double *itl = calloc((size_t)itl_n + 1, sizeof(double));
    if (!ttft || !tpot || !e2el || !itl)
        return 1;
    size_t k = 0, n_tpot = 0, n_itl = 0;
    for (long i = 0; i < n_prompts; i++) {
        sreq *r = &rq[i];
        if (r->failed)
            continue;
        double tt = r->t_first ? (double)(r->t_first - r->t_submit) / 1e6 : 0;
        double e2 = r->t_last ? (double)(r->t_last - r->t_submit) / 1e6 : 0;
        ttft[k] = tt;
        e2el[k++] = e2;
        double tp = 0;
        if (r->n_out > 1) {
            tp = (e2 - tt) / (double)(r->n_out - 1);
            tpot[n_tpot++] = tp;
        }
        memcpy(itl + n_itl, r->itl, r->n_itl * sizeof(double));
        n_itl += r->n_itl;
        if ((slo_ttft <= 0 || tt <= slo_ttft) && (slo_tpot <= 0 || tp <= slo_tpot) &&
            (slo_e2el <= 0 || e2 <= slo_e2el))
            good++;
    }
    stat3 s_ttft = summarize(ttft, k), s_tpot = summarize(tpot, n_tpot),
          s_itl = summarize(itl, n_itl), s_e2el = summarize(e2el, k);
    double req_tp = (double)ok / dur, out_tp = (double)out_total / dur;
    bool slo = slo_ttft > 0 || slo_tpot > 0 || slo_e2el > 0;
    if (json) {
        printf("{\"completed\": %ld, \"failed\": %ld, \"duration_s\": %.4f, "
               "\"total_input_tokens\": %ld, \"total_output_tokens\": %llu, "
               "\"request_throughput\": %.4f, \"output_throughput\": %.4f",
               ok, n_prompts - ok, dur, ok * in_len, (unsigned long long)out_total, req_tp, out_tp);
        if (slo)
            printf(", \"request_goodput\": %.4f", (double)good / dur);
        printf(", \"medusa_steps\": %llu, \"medusa_tokens_per_step\": %.4f",
               (unsigned long long)med_steps, med_tps);
        const char *names[4] = {"ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"};
        stat3 *v[4] = {&s_ttft, &s_tpot, &s_itl, &s_e2el};
        for (int i = 0; i < 4; i++)
            printf(", \"%s\": {\"mean\": %.4f, \"median\": %.4f, \"p99\": %.4f}", names[i],
                   v[i]->mean, v[i]->median, v[i]->p99);
        printf("}\n");
    } else {
        printf("============ Serving Benchmark Result ============\n");
        printf("%-40s %10ld\n", "Successful requests:", ok);
        printf("%-40s %10ld\n", "Failed requests:", n_prompts - ok);
        printf("%-40s %10.2f\n", "Benchmark duration (s):", dur);
        printf("%-40s %10ld\n", "Total input tokens:", ok * in_len);
        printf("%-40s %10llu\n", "Total generated tokens:", (unsigned long long)out_total);
        printf("%-40s %10.2f\n", "Request throughput (req/s):", req_tp);
        if (slo)
            printf("%-40s %10.2f\n", "Request goodput (req/s):", (double)good / dur);
        printf("%-40s %10.2f\n", "Output token throughput (tok/s):", out_tp);
        if (med_steps)
            printf("%-40s %10.2f\n", "Medusa tokens per step:", med_tps);
        const char *names[4] = {"TTFT", "TPOT", "ITL", "E2EL"};
        stat3 *v[4] = {&s_ttft, &s_tpot, &s_itl, &s_e2el};
        for (int i = 0; i < 4; i++) {
            printf("%s (ms): mean %10.3f   median %10.3f   p99 %10.3f\n", names[i], v[i]->mean,
                   v[i]->median, v[i]->p99);
        }
    }
    for (long i = 0; i < n_prompts; i++)
        free(rq[i].itl);
    for (int i = 0; i < n_cli; i++)
        gorgon_close(cli[i]);
    free(ttft);
    free(tpot);
    free(e2el);
    free(itl);
    free(rq);
    free(ids);
    free(cli);
    free(cli_inflight);
    return ok == n_prompts ? 0 : 1;
}
