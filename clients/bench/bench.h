/* gorgon-bench suites. Each suite is `int bench_<suite>_main(int argc, char **argv)`
 * (argv[0] is the suite name), prints a table to stdout and, with --json, one
 * JSON object (serve: one per run, i.e. per --request-rate x --concurrency
 * pair, one per line); returns a process exit status. */
#ifndef GORGON_BENCH_H
#define GORGON_BENCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

int bench_ipc_main(int argc, char **argv);
int bench_engine_main(int argc, char **argv);
int bench_serve_main(int argc, char **argv);
int bench_medusa_main(int argc, char **argv);

/* Helpers shared by the suites (bench_util.c). */
/* Parse option `opt` of suite `suite`: an integer / finite number in
 * [lo, hi]. 0, or -EINVAL after printing an error naming the option. */
int bench_parse_i64(const char *suite, const char *opt, const char *s, int64_t lo, int64_t hi,
                    int64_t *out);
int bench_parse_f64(const char *suite, const char *opt, const char *s, double lo, double hi,
                    double *out);
/* Print s as a JSON string body (quotes, backslashes, control bytes escaped). */
void bench_json_puts(const char *s);

/* ---- devices and synthetic models: shared by engine and medusa ----------
 * (bench_engine.c). Every parser prints an error naming the option and
 * returns -EINVAL; the suites exit 2 on those. */
struct eng_hparams;
struct kn_ctx;
/* The shape of a --synthetic NAME (7b, 1b, 110m, tiny); -EINVAL for an
 * unknown name. */
int bench_parse_synthetic(const char *suite, const char *s, const struct eng_hparams **hp);
/* --dtype: f32, f16, bf16, q8_0 or q4_0 into *t (an enum kn_dtype). */
int bench_parse_dtype(const char *suite, const char *s, int *t);
/* --device: cpu, cuda or cuda:N (kn_device_parse). */
int bench_parse_device(const char *suite, const char *s);
/* A comma-separated list of integers in [lo, hi] ("1,8,64"), at most cap
 * of them, into out: the count, or -EINVAL. */
int bench_parse_i64_list(const char *suite, const char *opt, const char *s, int64_t lo,
                         int64_t hi, int64_t *out, int cap);
/* Whether `device` (already parsed) can be used here: 0 for the CPU or a
 * CUDA device this process sees, else -EOPNOTSUPP / -ENODEV after
 * printing why (no CUDA backend in this build, no driver or device, an
 * index beyond the devices). */
int bench_device_usable(const char *suite, const char *device);
/* A kn_ctx on `device` (threads: the CPU's pool size, 0 auto). 0, or
 * -errno after printing why. */
int bench_kn_open(const char *suite, const char *device, int threads, struct kn_ctx **out);
/* `gorgon-bench engine --list-devices`: the CPU's thread count and every
 * CUDA device (or why there is none); returns an exit status. */
int bench_list_devices(bool json);

/* ---- serve: shared by its two drivers and the plot ----------------------
 * bench_serve.c parses the options, generates the workload (arrival times,
 * prompts), runs it once per (--request-rate, --concurrency) pair through a
 * driver (the
 * shared-memory rings in bench_serve.c, OpenAI HTTP in bench_http.c), and
 * turns what the driver recorded into vllm's metrics (bench_plot.c draws
 * them). Single-threaded: a driver runs on the caller's thread. */

/* One request of a run, as a driver records it. Times are cm_now_ns(). */
typedef struct bench_sreq {
    uint64_t t_submit; /* sent */
    uint64_t t_first;  /* first chunk with output (0: none) */
    uint64_t t_last;   /* latest chunk with output */
    uint32_t n_out;    /* output tokens (the server's count when it gives one) */
    uint32_t n_in;     /* prompt tokens (the server's count; 0: unknown) */
    uint32_t n_chunks; /* chunks with output */
    uint32_t med_steps, med_acc; /* Medusa usage (shm path) */
    bool done, failed;
    double *itl; /* gaps between chunks with output, ms (heap) */
    uint32_t n_itl, cap_itl;
    char *err; /* why it failed (heap), or NULL */
} bench_sreq;

/* The workload of one run, identical whichever driver runs it. */
typedef struct bench_workload {
    int64_t n_prompts;
    int64_t in_min, in_max; /* random prompt length in tokens, uniform in
                               [in_min, in_max] per request (without prompt) */
    int64_t out_len;        /* max_tokens */
    double rate, burst;     /* arrivals: requests/s (inf: all at once), gamma shape */
    double temperature;
    const char *prompt; /* text prompt, or NULL: random token-id prompts */
    bool no_medusa;
} bench_workload;

/* Workload generators (bench_serve.c). Prompts and arrival gaps come from
 * two separate random streams, both reseeded before each run: every run
 * and both drivers see the same prompts (whatever the rate) and, at one
 * rate, the same arrival gaps, as long as a driver asks for the prompts in
 * request order, once per request. */
/* The next request's prompt: its length drawn in [w->in_min, w->in_max],
 * BOS (1) then random ids into ids (room for w->in_max). Returns the length. */
int64_t bench_serve_prompt_ids(const bench_workload *w, int32_t *ids);
uint64_t bench_serve_next_gap_ns(const bench_workload *w);
/* Append an inter-token gap; 0 or -ENOMEM. */
int bench_sreq_add_itl(bench_sreq *r, double ms);
/* Record why r failed (printf-style; keeps the first message). */
void bench_sreq_fail(bench_sreq *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* HTTP driver (bench_http.c). */
typedef struct bench_http_cfg {
    const char *base_url; /* http://HOST:PORT (a path prefix allowed) */
    const char *endpoint; /* /v1/completions or /v1/chat/completions */
    const char *api_key;  /* Bearer token, or NULL */
    const char *model;    /* "model" sent; NULL: the first of GET /v1/models */
    const char *unix_socket; /* connect here instead of HOST:PORT (as curl --unix-socket) */
} bench_http_cfg;
typedef struct bench_http bench_http;
/* Check the URL, find the model, send one warm-up request. 0, or -errno
 * after printing why to stderr (nothing to destroy then). */
int bench_http_open(bench_http **out, const bench_http_cfg *cfg, const bench_workload *w);
/* Run w with at most max_inflight requests in flight, filling rq[0..n_prompts)
 * and *dur_s. 0, or -errno on a failure of the whole run (printed). */
int bench_http_run(bench_http *h, const bench_workload *w, int64_t max_inflight, bench_sreq *rq,
                   double *dur_s);
void bench_http_destroy(bench_http *h);

/* The metrics of one run. Arrays are sorted ascending, in ms. */
typedef struct bench_result {
    double rate;         /* --request-rate of the run, requests/s; inf: all at once */
    int64_t concurrency; /* cap on requests in flight; 0: none */
    long completed, failed;
    double dur_s, req_tp, out_tp;
    double *ttft, *tpot, *itl, *e2el;
    size_t n_ttft, n_tpot, n_itl, n_e2el;
} bench_result;

/* Draw CDFs of TTFT and ITL (one curve per run) and, with several runs,
 * throughput against concurrency and/or request rate (whichever differ
 * between runs) into `file` (.png or .svg) with gnuplot;
 * the raw data goes to the same name with .csv. 0, or -errno after
 * printing why. */
int bench_plot(const char *file, const bench_result *runs, size_t n_runs);
/* Is `file` a name bench_plot can draw, and is gnuplot on PATH? 0, or
 * -EINVAL / -ENOENT after printing why. */
int bench_plot_check(const char *file);

#endif
