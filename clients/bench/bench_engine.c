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
 *
 * --tp N runs a tensor-parallel group of N ranks in this process (threads,
 * --threads each, joined by the shared-memory comm): every rank runs the
 * same prefill and decode over its shard, barriers line the ranks up before
 * each timed run, and rank 0's clock is reported. The bandwidth is measured
 * with N x --threads threads (the group's), and the comm's all-reduce of a
 * 768-float vector (one Wo/Wdown reduction of a 768-wide model's decode
 * step) is timed on its own: allreduce_768_us is the median of 2000.
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
#include "engine/model/eng_err.h"
#include "engine/tp.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: gorgon-bench engine --model FILE [--threads N] [--tp N] [--json]\n"
               "         [--prompt-len N (512)] [--decode-tokens N (128)] [--reps R (3)]\n"
               "         [--bw-mib M (1024)] [--contention N (0)]\n"
               "Prefill: one N-token prompt in one forward call. Decode: greedy from BOS,\n"
               "one token per forward. Best of R repetitions for each.\n"
               "--threads 0: as many as CPUs this process may use (affinity, cgroup quota).\n"
               "--contention N: N busy-looping threads run beside the measurement.\n"
               "--tp N: N tensor-parallel ranks (threads), --threads kernel threads each\n"
               "        (0: 1 each).\n");
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
 * argmax, one id downloaded per token; under TP one (max, id) pair per rank
 * exchanged); returns seconds or < 0. */
static double run_decode(bench_env *e, int32_t bos, int64_t n)
{
    int seq = eng_kv_seq_alloc(e->kv);
    if (seq < 0)
        return -1;
    int32_t tok = bos;
    uint64_t t0 = cm_now_ns();
    for (int64_t i = 0; i < n; i++) {
        eng_seq_in in = {.seq = seq, .tokens = &tok, .n_tokens = 1};
        if (eng_forward_greedy(e->c, e->kv, &in, 1, e->logits, NULL, &tok) < 0) {
            eng_kv_seq_free(e->kv, seq);
            return -1;
        }
    }
    uint64_t t1 = cm_now_ns();
    eng_kv_seq_free(e->kv, seq);
    return (double)(t1 - t0) * 1e-9;
}

/* What every rank runs and what rank 0 measured. */
typedef struct bench_job {
    const char *path;
    int tp, threads;
    int64_t prompt_len, decode_n, reps, bw_mib, contention;
    /* results (rank 0) */
    int threads_used;
    double t_pre, t_dec, bw, allreduce_us, bpt, flops;
    int64_t shard_bytes;
    char variant[16], wtype[16];
    int64_t dim, n_vocab;
    int n_layer;
} bench_job;

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median microseconds of n all-reduces of 768 floats (every rank calls). */
static int time_allreduce(comm *cm, int n, double *us)
{
    float v[768];
    double *t = malloc((size_t)n * sizeof(double));
    if (!t)
        return -ENOMEM;
    for (int i = 0; i < 768; i++)
        v[i] = (float)i;
    int rc = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        uint64_t t0 = cm_now_ns();
        rc = comm_all_reduce_sum_f32(cm, v, 768);
        t[i] = (double)(cm_now_ns() - t0) * 1e-3;
        if (i % 64 == 63) /* keep the values finite */
            for (int k = 0; k < 768; k++)
                v[k] = (float)k;
    }
    if (rc == 0) {
        qsort(t, (size_t)n, sizeof(double), cmp_double);
        *us = t[n / 2];
    }
    free(t);
    return rc < 0 ? eng_fail(rc, "all-reduce: %s", comm_last_error(cm)) : 0;
}

static int sync_ranks(comm *cm)
{
    int rc = cm ? comm_barrier(cm) : 0;
    return rc < 0 ? eng_fail(rc, "barrier: %s", comm_last_error(cm)) : 0;
}

static int bench_rank(int rank, comm *cm, void *arg)
{
    static busy_set busy;
    bench_job *j = arg;
    kn_ctx *kn = NULL;
    bench_env e = {0};
    int32_t *ids = NULL;
    bool busy_on = false;
    int rc = eng_model_open_tp(&e.m, j->path, rank, j->tp);
    if (rc < 0)
        goto out;
    const eng_hparams *hp = eng_model_hparams(e.m);
    const int64_t prompt_len = j->prompt_len, decode_n = j->decode_n;
    if (prompt_len > hp->n_ctx || decode_n > hp->n_ctx) {
        rc = eng_fail(-EINVAL, "prompt (%" PRId64 ") and decode (%" PRId64 ") lengths must fit "
                               "the model's context of %" PRId64,
                      prompt_len, decode_n, hp->n_ctx);
        goto out;
    }
    if ((rc = kn_ctx_create(&kn, &(kn_ctx_cfg){.n_threads = j->threads})) < 0) {
        rc = eng_fail(rc, "kernels: %s", cm_strerror(rc));
        goto out;
    }
    int64_t max_len = prompt_len > decode_n ? prompt_len : decode_n;
    eng_kv_cfg kc;
    eng_model_kv_cfg(e.m, 16, (max_len + 15) / 16, 1, max_len, &kc);
    e.kn = kn;
    ids = malloc((size_t)prompt_len * sizeof(int32_t));
    if (!ids || kn_buf_alloc(kn, (size_t)hp->n_vocab * sizeof(float), (void **)&e.logits) < 0) {
        rc = eng_fail(-ENOMEM, "setup: out of memory");
        goto out;
    }
    if ((rc = eng_ctx_create(&e.c, e.m, &(eng_ctx_cfg){.kn = kn, .max_tokens = prompt_len,
                                                        .max_ctx = max_len, .comm = cm})) < 0 ||
        (rc = eng_kv_create(&e.kv, kn, &kc)) < 0)
        goto out;
    const eng_tok *tok = eng_model_tokenizer(e.m);
    int32_t bos = tok && eng_tok_bos(tok) >= 0 ? eng_tok_bos(tok) : 1 % (int32_t)hp->n_vocab;
    /* a fixed pseudo-random prompt: what the tokens are does not change the work */
    uint64_t x = 0x9e3779b97f4a7c15ull;
    ids[0] = bos;
    for (int64_t i = 1; i < prompt_len; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        ids[i] = (int32_t)((x >> 33) % (uint64_t)hp->n_vocab);
    }
    if ((rc = sync_ranks(cm)) < 0)
        goto out;
    if (rank == 0) {
        if ((rc = busy_start(&busy, (int)j->contention)) < 0) {
            rc = eng_fail(rc, "cannot start %" PRId64 " busy threads: %s", j->contention,
                          cm_strerror(rc));
            goto out;
        }
        busy_on = true;
    }
    /* warm-up: page the weights in, touch every scratch buffer */
    if (run_prefill(&e, ids, prompt_len) < 0 || run_decode(&e, bos, 4) < 0) {
        rc = eng_fail(-EIO, "forward failed: %s", eng_error());
        goto out;
    }
    double t_pre = 1e30, t_dec = 1e30;
    for (int64_t r = 0; r < j->reps; r++) {
        if ((rc = sync_ranks(cm)) < 0)
            goto out;
        double t = run_prefill(&e, ids, prompt_len);
        if (t >= 0 && t < t_pre)
            t_pre = t;
    }
    if ((rc = sync_ranks(cm)) < 0)
        goto out;
    if (rank == 0) {
        /* the group's thread count reads memory while the other ranks wait */
        kn_ctx *bw_kn = kn;
        if (j->tp > 1 &&
            (rc = kn_ctx_create(&bw_kn, &(kn_ctx_cfg){.n_threads = j->tp * kn_ctx_threads(kn)})) <
                0) {
            rc = eng_fail(rc, "kernels: %s", cm_strerror(rc));
            goto out;
        }
        j->bw = kn_measure_read_bandwidth(bw_kn, (size_t)j->bw_mib << 20, 3);
        if (bw_kn != kn)
            kn_ctx_destroy(bw_kn);
    }
    for (int64_t r = 0; r < j->reps; r++) {
        if ((rc = sync_ranks(cm)) < 0)
            goto out;
        double t = run_decode(&e, bos, decode_n);
        if (t >= 0 && t < t_dec)
            t_dec = t;
    }
    double ar_us = 0;
    if (cm && (rc = time_allreduce(cm, 2000, &ar_us)) < 0)
        goto out;
    if (rank == 0) {
        busy_stop(&busy);
        busy_on = false;
        const kn_tensor *out_w = eng_model_output(e.m);
        /* the whole model's output matrix (a rank holds a vocabulary slice) */
        int64_t out_params = hp->n_vocab * out_w->cols;
        j->flops = 2.0 * (double)(eng_model_matmul_params(e.m) - out_params) *
                       (double)prompt_len +
                   2.0 * (double)out_params;
        j->t_pre = t_pre;
        j->t_dec = t_dec;
        j->allreduce_us = ar_us;
        j->bpt = (double)eng_model_bytes_per_token(e.m);
        j->shard_bytes = eng_model_shard_weight_bytes(e.m);
        j->threads_used = kn_ctx_threads(kn);
        snprintf(j->variant, sizeof j->variant, "%s", kn_variant_name(kn_ctx_variant(kn)));
        snprintf(j->wtype, sizeof j->wtype, "%s",
                 kn_dtype_name(eng_model_layer(e.m, 0)->wq.type));
        j->dim = hp->dim;
        j->n_layer = hp->n_layer;
        j->n_vocab = hp->n_vocab;
    }
    rc = 0;
out:
    if (busy_on)
        busy_stop(&busy);
    free(ids);
    if (kn) {
        kn_buf_free(kn, e.logits);
    }
    eng_kv_destroy(e.kv);
    eng_ctx_destroy(e.c);
    eng_model_close(e.m);
    kn_ctx_destroy(kn);
    return rc;
}

int bench_engine_main(int argc, char **argv)
{
    const char *path = NULL;
    int64_t threads = 1, prompt_len = 512, decode_n = 128, reps = 3, bw_mib = 1024, tp = 1;
    int64_t contention = 0;
    bool json = false;
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},      {"threads", required_argument, 0, 't'},
        {"json", no_argument, 0, 'j'},             {"prompt-len", required_argument, 0, 'p'},
        {"decode-tokens", required_argument, 0, 'n'}, {"reps", required_argument, 0, 'r'},
        {"bw-mib", required_argument, 0, 'b'},     {"help", no_argument, 0, 'h'},
        {"contention", required_argument, 0, 'c'}, {"tp", required_argument, 0, 'T'},
        {0, 0, 0, 0},
    };
    optind = 1;
    int o;
    while ((o = getopt_long(argc, argv, "m:t:jp:n:r:b:c:T:h", opts, NULL)) != -1) {
        int rc = 0;
        switch (o) {
        case 'm': path = optarg; break;
        case 't': rc = bench_parse_i64("engine", "--threads", optarg, 0, 256, &threads); break;
        case 'c': rc = bench_parse_i64("engine", "--contention", optarg, 0, 256, &contention); break;
        case 'T': rc = bench_parse_i64("engine", "--tp", optarg, 1, COMM_SHM_MAX_RANKS, &tp); break;
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
    bench_job j = {.path = path,
                   .tp = (int)tp,
                   .threads = tp > 1 && threads == 0 ? 1 : (int)threads, /* 0: auto */
                   .prompt_len = prompt_len,
                   .decode_n = decode_n,
                   .reps = reps,
                   .bw_mib = bw_mib,
                   .contention = contention};
    int rc = eng_tp_run(j.tp, bench_rank, &j,
                        &(eng_tp_opts){.threads_per_rank = j.threads > 0 ? j.threads : 1});
    if (rc < 0) {
        fprintf(stderr, "gorgon-bench engine: %s: %s\n", path,
                eng_error()[0] ? eng_error() : cm_strerror(rc));
        return 1;
    }
    double prefill_tok_s = (double)prompt_len / j.t_pre;
    double decode_tok_s = (double)decode_n / j.t_dec;
    double roofline = j.bw / j.bpt;
    double frac = decode_tok_s / roofline;
    double gflops = j.flops / j.t_pre * 1e-9;
    if (json) {
        printf("{\"suite\":\"engine\",\"model\":\"");
        bench_json_puts(path);
        printf("\",\"weights\":\"%s\",\"threads\":%d,\"tp\":%d"
               ",\"kernels\":\"%s\",\"contention\":%" PRId64 ",\"prompt_len\":%" PRId64
               ",\"decode_tokens\":%" PRId64
               ",\"prefill_tok_s\":%.2f,\"prefill_gflop_s\":%.3f,\"decode_tok_s\":%.2f,"
               "\"bandwidth_gb_s\":%.3f,\"bytes_per_token\":%.0f,\"roofline_tok_s\":%.2f,"
               "\"decode_roofline_frac\":%.4f,\"rank0_weight_bytes\":%" PRId64,
               j.wtype, j.threads_used, j.tp, j.variant, contention, prompt_len, decode_n,
               prefill_tok_s, gflops, decode_tok_s, j.bw * 1e-9, j.bpt, roofline, frac,
               j.shard_bytes);
        if (j.tp > 1)
            printf(",\"allreduce_768_us\":%.2f", j.allreduce_us);
        printf("}\n");
    } else {
        printf("engine: %s (%s weights, dim %" PRId64 ", %d layers, vocab %" PRId64
               "), %d thread(s)%s, %s kernels, %" PRId64 " busy neighbour thread(s)\n",
               path, j.wtype, j.dim, j.n_layer, j.n_vocab, j.threads_used,
               j.tp > 1 ? " per rank" : "", j.variant, contention);
        if (j.tp > 1)
            printf("  tp %d: rank 0 holds %.1f MiB of weights; all-reduce of 768 floats "
                   "%.2f us (median)\n",
                   j.tp, (double)j.shard_bytes / (1 << 20), j.allreduce_us);
        printf("  prefill  %6" PRId64 " tokens  %12.1f tok/s  %9.2f GFLOP/s (matmuls)\n",
               prompt_len, prefill_tok_s, gflops);
        printf("  decode   %6" PRId64 " tokens  %12.1f tok/s\n", decode_n, decode_tok_s);
        printf("  read bandwidth %.2f GB/s, %.2f MB of weights per token -> roofline %.1f "
               "tok/s; decode at %.1f%% of roofline\n",
               j.bw * 1e-9, j.bpt * 1e-6, roofline, frac * 100.0);
    }
    return 0;
}
