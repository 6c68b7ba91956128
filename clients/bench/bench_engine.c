/* gorgon-bench engine — prefill and batch-1 decode speed of the CPU engine,
 * measured against the memory-bandwidth roofline in the same run.
 *
 * Decode is memory-bound: each token streams every weight matrix once, so
 * tokens/s <= read bandwidth / bytes of weights per token. The suite measures
 * the bandwidth (kn_measure_read_bandwidth, same thread count) right before
 * the decode run, so the ratio is fair on a noisy machine.
 *
 * Counted work:
 *   bytes/token  every matrix once (output matrix included), one embedding
 *                row, the norm vectors (eng_model_bytes_per_token)
 *   prefill FLOP 2 x (matmul params of the blocks) x prompt tokens
 *                + 2 x (output matrix params) x 1 (only the last token's
 *                logits are computed); attention FLOPs are NOT counted.
 *
 * --contention N runs N busy-looping threads beside the measurement (started
 * after setup, stopped after the last repetition): the neighbours a
 * co-located appliance always has. Kernel threads that wait for one another
 * collapse under them; tokens/s with N = the CPU count is the figure to
 * compare across --threads.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clients/bench/bench.h"
#include "common/common.h"
#include "engine/engine.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: gorgon-bench engine --model FILE [--threads N] [--json]\n"
               "         [--prompt-len N (512)] [--decode-tokens N (128)] [--reps R (3)]\n"
               "         [--bw-mib M (1024)] [--contention N (0)]\n"
               "Prefill: one N-token prompt in one forward call. Decode: greedy from BOS,\n"
               "one token per forward. Best of R repetitions for each.\n"
               "--threads 0: as many as CPUs this process may use (affinity, cgroup quota).\n"
               "--contention N: N busy-looping threads run beside the measurement.\n");
}

/* ---- neighbours: busy threads beside the measurement ------------------- */

typedef struct busy_set {
    atomic_bool stop;
    int n;
    pthread_t tid[256];
} busy_set;

static void *busy_main(void *p)
{
    busy_set *b = p;
    /* a pure spin, like `while :; do :; done`: wants its CPU all the time */
    while (!atomic_load_explicit(&b->stop, memory_order_relaxed))
        ;
    return NULL;
}

/* Starts n busy threads; 0 or -errno (those started are stopped). */
static int busy_start(busy_set *b, int n)
{
    atomic_init(&b->stop, false);
    b->n = 0;
    for (int i = 0; i < n; i++) {
        int rc = pthread_create(&b->tid[i], NULL, busy_main, b);
        if (rc != 0) {
            atomic_store(&b->stop, true);
            for (int j = 0; j < b->n; j++)
                pthread_join(b->tid[j], NULL);
            b->n = 0;
            return -rc;
        }
        b->n++;
    }
    return 0;
}

static void busy_stop(busy_set *b)
{
    atomic_store(&b->stop, true);
    for (int i = 0; i < b->n; i++)
        pthread_join(b->tid[i], NULL);
    b->n = 0;
}

typedef struct bench_env {
    kn_ctx *kn;
    eng_model *m;
    eng_ctx *c;
    eng_kv *kv;
    float *logits; /* backend: [n_vocab] */
    int32_t *id;   /* backend: the argmax */
} bench_env;

/* One prompt of n tokens in one forward; returns seconds or < 0. */
static double run_prefill(bench_env *e, const int32_t *ids, int64_t n)
{
    int seq = eng_kv_seq_alloc(e->kv);
    if (seq < 0)
        return -1;
    eng_seq_in in = {.seq = seq, .tokens = ids, .n_tokens = n};
    uint64_t t0 = cm_now_ns();
    int64_t r = eng_forward(e->c, e->kv, &in, 1, e->logits, NULL);
    uint64_t t1 = cm_now_ns();
    eng_kv_seq_free(e->kv, seq);
    return r < 0 ? -1 : (double)(t1 - t0) * 1e-9;
}

/* n greedy decode steps from BOS, as a worker runs them (the backend's
 * argmax, one id downloaded per token); returns seconds or < 0. */
static double run_decode(bench_env *e, int32_t bos, int64_t n)
{
    int seq = eng_kv_seq_alloc(e->kv);
    if (seq < 0)
        return -1;
    int64_t V = eng_model_hparams(e->m)->n_vocab;
    int32_t tok = bos;
    uint64_t t0 = cm_now_ns();
    for (int64_t i = 0; i < n; i++) {
        eng_seq_in in = {.seq = seq, .tokens = &tok, .n_tokens = 1};
        if (eng_forward(e->c, e->kv, &in, 1, e->logits, NULL) < 0 ||
            kn_ctx_ops(e->kn)->argmax(e->kn, e->logits, 1, V, e->id) < 0 ||
            kn_buf_download(e->kn, &tok, e->id, sizeof(tok)) < 0) {
            eng_kv_seq_free(e->kv, seq);
            return -1;
        }
    }
    uint64_t t1 = cm_now_ns();
    eng_kv_seq_free(e->kv, seq);
    return (double)(t1 - t0) * 1e-9;
}

int bench_engine_main(int argc, char **argv)
{
    const char *path = NULL;
    int64_t threads = 1, prompt_len = 512, decode_n = 128, reps = 3, bw_mib = 1024;
    int64_t contention = 0;
    static busy_set busy;
    bool json = false;
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},      {"threads", required_argument, 0, 't'},
        {"json", no_argument, 0, 'j'},             {"prompt-len", required_argument, 0, 'p'},
        {"decode-tokens", required_argument, 0, 'n'}, {"reps", required_argument, 0, 'r'},
        {"bw-mib", required_argument, 0, 'b'},     {"help", no_argument, 0, 'h'},
        {"contention", required_argument, 0, 'c'},
        {0, 0, 0, 0},
    };
    optind = 1;
    int o;
    while ((o = getopt_long(argc, argv, "m:t:jp:n:r:b:c:h", opts, NULL)) != -1) {
        int rc = 0;
        switch (o) {
        case 'm': path = optarg; break;
        case 't': rc = bench_parse_i64("engine", "--threads", optarg, 0, 256, &threads); break;
        case 'c': rc = bench_parse_i64("engine", "--contention", optarg, 0, 256, &contention); break;
        case 'j': json = true; break;
        case 'p': rc = bench_parse_i64("engine", "--prompt-len", optarg, 1, 1 << 20, &prompt_len); break;
        case 'n': rc = bench_parse_i64("engine", "--decode-tokens", optarg, 1, 1 << 20, &decode_n); break;
        case 'r': rc = bench_parse_i64("engine", "--reps", optarg, 1, 1000, &reps); break;
        case 'b': rc = bench_parse_i64("engine", "--bw-mib", optarg, 16, 1 << 20, &bw_mib); break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
        if (rc < 0)
            return 2;
    }
    if (!path || optind < argc) {
        usage(stderr);
        return 2;
    }

    int status = 1;
    kn_ctx *kn = NULL;
    bench_env e = {0};
    int32_t *ids = NULL;
    int rc = eng_model_open(&e.m, path);
    if (rc < 0) {
        fprintf(stderr, "gorgon-bench engine: %s: %s\n", path,
                eng_error()[0] ? eng_error() : cm_strerror(rc));
        goto out;
    }
    const eng_hparams *hp = eng_model_hparams(e.m);
    if (prompt_len > hp->n_ctx || decode_n > hp->n_ctx) {
        fprintf(stderr, "gorgon-bench engine: prompt (%" PRId64 ") and decode (%" PRId64
                        ") lengths must fit the model's context of %" PRId64 "\n",
                prompt_len, decode_n, hp->n_ctx);
        goto out;
    }
    if ((rc = kn_ctx_create(&kn, &(kn_ctx_cfg){.n_threads = (int)threads})) < 0) {
        fprintf(stderr, "gorgon-bench engine: kernels: %s\n", cm_strerror(rc));
        goto out;
    }
    threads = kn_ctx_threads(kn); /* 0 was auto */
    int64_t max_len = prompt_len > decode_n ? prompt_len : decode_n;
    eng_kv_cfg kc;
    eng_model_kv_cfg(e.m, 16, (max_len + 15) / 16, 1, max_len, &kc);
    e.kn = kn;
    ids = malloc((size_t)prompt_len * sizeof(int32_t));
    if (!ids || kn_buf_alloc(kn, (size_t)hp->n_vocab * sizeof(float), (void **)&e.logits) < 0 ||
        kn_buf_alloc(kn, sizeof(int32_t), (void **)&e.id) < 0 ||
        (rc = eng_ctx_create(&e.c, e.m, &(eng_ctx_cfg){.kn = kn, .max_tokens = prompt_len,
                                                        .max_ctx = max_len})) < 0 ||
        (rc = eng_kv_create(&e.kv, kn, &kc)) < 0) {
        fprintf(stderr, "gorgon-bench engine: setup: %s\n",
                eng_error()[0] ? eng_error() : "out of memory");
        goto out;
    }
    const eng_tok *tok = eng_model_tokenizer(e.m);
    int32_t bos = tok && eng_tok_bos(tok) >= 0 ? eng_tok_bos(tok) : 1 % (int32_t)hp->n_vocab;
    /* a fixed pseudo-random prompt: what the tokens are does not change the work */
    uint64_t x = 0x9e3779b97f4a7c15ull;
    ids[0] = bos;
    for (int64_t i = 1; i < prompt_len; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        ids[i] = (int32_t)((x >> 33) % (uint64_t)hp->n_vocab);
    }

    if ((rc = busy_start(&busy, (int)contention)) < 0) {
        fprintf(stderr, "gorgon-bench engine: cannot start %" PRId64 " busy threads: %s\n",
                contention, cm_strerror(rc));
        goto out;
    }
    /* warm-up: page the weights in, touch every scratch buffer */
    if (run_prefill(&e, ids, prompt_len) < 0 || run_decode(&e, bos, 4) < 0) {
        fprintf(stderr, "gorgon-bench engine: forward failed: %s\n", eng_error());
        busy_stop(&busy);
        goto out;
    }
    double t_pre = 1e30, t_dec = 1e30;
    for (int64_t r = 0; r < reps; r++) {
        double t = run_prefill(&e, ids, prompt_len);
        if (t >= 0 && t < t_pre)
            t_pre = t;
    }
    double bw = kn_measure_read_bandwidth(kn, (size_t)bw_mib << 20, 3);
    for (int64_t r = 0; r < reps; r++) {
        double t = run_decode(&e, bos, decode_n);
        if (t >= 0 && t < t_dec)
            t_dec = t;
    }
    busy_stop(&busy);

    const kn_tensor *out_w = eng_model_output(e.m);
    int64_t out_params = out_w->rows * out_w->cols;
    double flops = 2.0 * (double)(eng_model_matmul_params(e.m) - out_params) * (double)prompt_len +
                   2.0 * (double)out_params;
    double prefill_tok_s = (double)prompt_len / t_pre;
    double decode_tok_s = (double)decode_n / t_dec;
    double bpt = (double)eng_model_bytes_per_token(e.m);
    double roofline = bw / bpt;
    double frac = decode_tok_s / roofline;
    double gflops = flops / t_pre * 1e-9;
    const char *variant = kn_variant_name(kn_ctx_variant(kn));
    const char *wtype = kn_dtype_name(eng_model_layer(e.m, 0)->wq.type);

    if (json) {
        printf("{\"suite\":\"engine\",\"model\":\"");
        bench_json_puts(path);
        printf("\",\"weights\":\"%s\",\"threads\":%" PRId64
               ",\"kernels\":\"%s\",\"contention\":%" PRId64 ",\"prompt_len\":%" PRId64
               ",\"decode_tokens\":%" PRId64
               ",\"prefill_tok_s\":%.2f,\"prefill_gflop_s\":%.3f,\"decode_tok_s\":%.2f,"
               "\"bandwidth_gb_s\":%.3f,\"bytes_per_token\":%.0f,\"roofline_tok_s\":%.2f,"
               "\"decode_roofline_frac\":%.4f}\n",
               wtype, threads, variant, contention, prompt_len, decode_n, prefill_tok_s, gflops,
               decode_tok_s, bw * 1e-9, bpt, roofline, frac);
    } else {
        printf("engine: %s (%s weights, dim %" PRId64 ", %d layers, vocab %" PRId64
               "), %" PRId64 " thread(s), %s kernels, %" PRId64 " busy neighbour thread(s)\n",
               path, wtype, hp->dim, hp->n_layer, hp->n_vocab, threads, variant, contention);
        printf("  prefill  %6" PRId64 " tokens  %12.1f tok/s  %9.2f GFLOP/s (matmuls)\n",
               prompt_len, prefill_tok_s, gflops);
        printf("  decode   %6" PRId64 " tokens  %12.1f tok/s\n", decode_n, decode_tok_s);
        printf("  read bandwidth %.2f GB/s, %.2f MB of weights per token -> roofline %.1f "
               "tok/s; decode at %.1f%% of roofline\n",
               bw * 1e-9, bpt * 1e-6, roofline, frac * 100.0);
    }
    status = 0;
out:
    free(ids);
    if (kn) {
        kn_buf_free(kn, e.logits);
        kn_buf_free(kn, e.id);
    }
    eng_kv_destroy(e.kv);
    eng_ctx_destroy(e.c);
    eng_model_close(e.m);
    kn_ctx_destroy(kn);
    return status;
}
