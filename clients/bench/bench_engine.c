/* gorgon-bench engine — prefill and decode speed of the engine on the CPU
 * or a CUDA device, measured against the memory-bandwidth roofline (and,
 * on a device, the GEMM peak) in the same run.
 *
 * Decode is memory-bound: each step streams every weight matrix once, for
 * the whole batch, so at batch 1 tokens/s <= read bandwidth / bytes of
 * weights per token. The suite measures the bandwidth of the ctx's memory
 * (kn_measure_read_bandwidth: DRAM with the same thread count, HBM on a
 * device) right before the decode runs, so the ratio is fair on a noisy
 * machine. --batch B decodes B sequences together (one forward per step
 * for all of them, each sequence --context tokens long before the timed
 * steps): tokens/s = B x steps / time, and the row's roofline fraction is
 * the batch-1 weight stream over the step time (KV reads not counted).
 *
 * Prefill is compute-bound. On a device the suite asks the backend for its
 * best GEMM throughput (kn_measure_gemm_peak: cuBLASLt over the device)
 * for each weight shape of a layer at M = --prompt-len; the prefill's
 * achievable peak is their time-weighted mean (the FLOP/s a prefill whose
 * every layer matmul ran at its shape's peak would reach) and
 * prefill_fraction = achieved / that. The CPU has no such measurement: the
 * fields are null there.
 *
 * Counted work:
 *   bytes/token  every matrix once (output matrix included), one embedding
 *                row, the norm vectors (eng_model_bytes_per_token)
 *   prefill FLOP 2 x (matmul params of the blocks) x prompt tokens
 *                + 2 x (output matrix params) x 1 (only the last token's
 *                logits are computed); attention FLOPs are NOT counted.
 *
 * --synthetic NAME runs a model that has no file (eng_model_synthetic: the
 * weights, of --dtype, generated in the ctx's memory): the shapes of a 7B,
 * a 1B, the 110m llama, and a tiny one for tests. It has no tokenizer: the
 * prompt is token ids in [1, vocab).
 *
 * --contention N runs N busy-looping threads beside the measurement (started
 * after setup, stopped after the last repetition): the neighbours a
 * co-located appliance always has. Kernel threads that wait for one another
 * collapse under them; tokens/s with N = the CPU count is the figure to
 * compare across --threads.
 *
 * --tp N runs a tensor-parallel group of N ranks in this process (threads,
 * --threads each, joined by the shared-memory comm; CPU and file models
 * only): every rank runs the same prefill and decode over its shard,
 * barriers line the ranks up before each timed run, and rank 0's clock is
 * reported. The bandwidth is measured with N x --threads threads (the
 * group's), and the comm's all-reduce of a 768-float vector (one Wo/Wdown
 * reduction of a 768-wide model's decode step) is timed on its own:
 * allreduce_768_us is the median of 2000.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
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

#define MAX_BATCHES 16
#define MAX_BATCH 4096

static void usage(FILE *f)
{
    fprintf(f,
            "usage: gorgon-bench engine (--model FILE | --synthetic 7b|1b|110m|tiny)\n"
            "         [--device cpu|cuda|cuda:N (cpu)] [--allow-tf32] [--dtype f32|f16|bf16|q8_0|q4_0 (f16)]\n"
            "         [--batch B[,B...] (1)] [--context N (0)] [--threads N] [--tp N] [--json]\n"
            "         [--prompt-len N (512)] [--decode-tokens N (128)] [--reps R (3)]\n"
            "         [--bw-mib M (1024; 2048 on a device)] [--contention N (0)]\n"
            "       gorgon-bench engine --list-devices [--json]\n"
            "Prefill: one N-token prompt in one forward call. Decode: B sequences, each\n"
            "--context tokens long, greedy, one forward per step for all of them\n"
            "(--context 0: from BOS). Best of R repetitions for each.\n"
            "--synthetic: a model with no file, weights of --dtype generated in the\n"
            "        device's memory (7b: dim 4096, 32 layers; 1b: dim 2048, 22 layers,\n"
            "        4 KV heads; 110m: dim 768, 12 layers; tiny: dim 64, 2 layers).\n"
            "--threads 0: as many as CPUs this process may use (affinity, cgroup quota).\n"
            "--contention N: N busy-looping threads run beside the measurement.\n"
            "--tp N: N tensor-parallel ranks (threads), --threads kernel threads each\n"
            "        (0: 1 each); CPU and --model only.\n");
}

/* ---- shared with the medusa suite (bench.h) ------------------------------ */

typedef struct synth_shape {
    const char *name;
    eng_hparams hp;
} synth_shape;

/* Llama shapes; rope, eps and the rest take eng_model_synthetic's defaults. */
static const synth_shape SHAPES[] = {
    {"7b", {.n_vocab = 32000, .dim = 4096, .ffn_dim = 11008, .n_layer = 32, .n_head = 32,
            .n_kv_head = 32, .head_dim = 128, .n_ctx = 4096}},
    {"1b", {.n_vocab = 32000, .dim = 2048, .ffn_dim = 5632, .n_layer = 22, .n_head = 32,
            .n_kv_head = 4, .head_dim = 64, .n_ctx = 2048}},
    {"110m", {.n_vocab = 32000, .dim = 768, .ffn_dim = 2048, .n_layer = 12, .n_head = 12,
              .n_kv_head = 12, .head_dim = 64, .n_ctx = 1024}},
    {"tiny", {.n_vocab = 256, .dim = 64, .ffn_dim = 128, .n_layer = 2, .n_head = 4,
              .n_kv_head = 4, .head_dim = 16, .n_ctx = 1024}},
};
#define N_SHAPES ((int)(sizeof(SHAPES) / sizeof(SHAPES[0])))

int bench_parse_synthetic(const char *suite, const char *s, const struct eng_hparams **hp)
{
    for (int i = 0; i < N_SHAPES; i++)
        if (!strcmp(s, SHAPES[i].name)) {
            *hp = &SHAPES[i].hp;
            return 0;
        }
    fprintf(stderr, "gorgon-bench %s: --synthetic: expected 7b, 1b, 110m or tiny, got \"%s\"\n",
            suite, s);
    return -EINVAL;
}

static const struct {
    const char *name;
    enum kn_dtype t;
} DTYPES[] = {{"f32", KN_F32}, {"f16", KN_F16}, {"bf16", KN_BF16}, {"q8_0", KN_Q8_0},
              {"q4_0", KN_Q4_0}};

int bench_parse_dtype(const char *suite, const char *s, int *t)
{
    for (size_t i = 0; i < sizeof(DTYPES) / sizeof(DTYPES[0]); i++)
        if (!strcmp(s, DTYPES[i].name)) {
            *t = (int)DTYPES[i].t;
            return 0;
        }
    fprintf(stderr,
            "gorgon-bench %s: --dtype: expected f32, f16, bf16, q8_0 or q4_0, got \"%s\"\n",
            suite, s);
    return -EINVAL;
}

int bench_parse_device(const char *suite, const char *s)
{
    int idx;
    if (kn_device_parse(s, &idx) == 0)
        return 0;
    fprintf(stderr, "gorgon-bench %s: --device: expected cpu, cuda or cuda:N, got \"%s\"\n",
            suite, s);
    return -EINVAL;
}

int bench_parse_i64_list(const char *suite, const char *opt, const char *s, int64_t lo,
                         int64_t hi, int64_t *out, int cap)
{
    char item[32];
    int n = 0;
    for (const char *p = s;; p++) {
        const char *e = strchr(p, ',');
        const size_t len = e ? (size_t)(e - p) : strlen(p);
        if (n == cap || len >= sizeof(item)) {
            fprintf(stderr, "gorgon-bench %s: %s: expected at most %d integers, got \"%s\"\n",
                    suite, opt, cap, s);
            return -EINVAL;
        }
        memcpy(item, p, len);
        item[len] = '\0';
        if (bench_parse_i64(suite, opt, item, lo, hi, &out[n]) < 0)
            return -EINVAL;
        n++;
        if (!e)
            return n;
        p = e;
    }
}

int bench_device_usable(const char *suite, const char *device)
{
    int idx;
    if (kn_device_parse(device, &idx) < 0)
        return bench_parse_device(suite, device);
    if (idx < 0)
        return 0;
    char why[256] = "";
    const int n = kn_cuda_device_count(why, sizeof(why));
    if (n <= 0) {
        fprintf(stderr, "gorgon-bench %s: --device %s: no CUDA device: %s\n", suite, device,
                why[0] ? why : "none found");
        return n < 0 ? n : -ENODEV;
    }
    if (idx >= n) {
        fprintf(stderr, "gorgon-bench %s: --device %s: no such device (this machine has %d CUDA "
                        "device%s: cuda:0 .. cuda:%d)\n",
                suite, device, n, n == 1 ? "" : "s", n - 1);
        return -ENODEV;
    }
    return 0;
}

int bench_kn_open(const char *suite, const char *device, int threads, struct kn_ctx **out)
{
    int rc = bench_device_usable(suite, device);
    if (rc < 0)
        return rc;
    if ((rc = kn_ctx_create(out, &(kn_ctx_cfg){.n_threads = threads, .device = device})) < 0)
        fprintf(stderr, "gorgon-bench %s: kernels on %s: %s\n", suite, device ? device : "cpu",
                cm_strerror(rc));
    return rc;
}

int bench_list_devices(bool json)
{
    char why[256] = "";
    const int n = kn_cuda_device_count(why, sizeof(why));
    if (json)
        printf("{\"suite\":\"devices\",\"cpu_threads\":%d,\"cuda_devices\":%d,\"cuda_why\":\"",
               kn_threads_auto(), n > 0 ? n : 0);
    else
        printf("cpu: %d usable thread(s)\ncuda: %d device(s)%s%s\n", kn_threads_auto(),
               n > 0 ? n : 0, n > 0 ? "" : ": ", n > 0 ? "" : why);
    if (json) {
        bench_json_puts(n > 0 ? "" : why);
        printf("\",\"cuda\":[");
    }
    int status = 0;
    for (int i = 0; i < n; i++) {
        char dev[32];
        snprintf(dev, sizeof(dev), "cuda:%d", i);
        kn_ctx *kn;
        size_t fr = 0, tot = 0;
        int rc = kn_ctx_create(&kn, &(kn_ctx_cfg){.device = dev});
        if (rc == 0)
            kn_ctx_mem_info(kn, &fr, &tot);
        if (json) {
            printf("%s{\"device\":\"", i ? "," : "");
            bench_json_puts(rc == 0 ? kn_ctx_device(kn) : dev);
            printf("\",\"usable\":%s,\"mem_total\":%zu,\"mem_free\":%zu}", rc == 0 ? "true" : "false",
                   tot, fr);
        } else if (rc == 0) {
            printf("  %s: %.1f GiB, %.1f GiB free\n", kn_ctx_device(kn), (double)tot / (1 << 30),
                   (double)fr / (1 << 30));
        } else {
            printf("  %s: cannot be used: %s\n", dev, cm_strerror(rc));
        }
        if (rc == 0)
            kn_ctx_destroy(kn);
        else
            status = 1;
    }
    if (json)
        printf("]}\n");
    return status;
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
    float *logits;      /* backend: [max batch][n_vocab] */
    int *seqs;          /* host, [max batch] each: the decode batch's sequences, */
    int32_t *tok_in;    /* the tokens a step feeds, */
    int32_t *tok_out;   /* the ids it chose, */
    eng_seq_in *in;     /* its inputs */
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
    /* a device runs the forward asynchronously: stop the clock when it is done */
    int rc = r < 0 ? 0 : kn_sync(e->kn);
    uint64_t t1 = cm_now_ns();
    eng_kv_seq_free(e->kv, seq);
    if (rc < 0)
        eng_fail(rc, "%s", kn_ctx_error(e->kn));
    return r < 0 || rc < 0 ? -1 : (double)(t1 - t0) * 1e-9;
}

/* n greedy decode steps of B sequences together, as a worker runs them
 * (the backend's argmax, one id per sequence downloaded per step; under TP
 * one (max, id) pair per rank exchanged). Each sequence first holds
 * `context` tokens (ids[0..context), prefilled untimed; 0: the first step
 * feeds ids[0]). Returns the seconds of the n steps, or < 0. */
static double run_decode(bench_env *e, const int32_t *ids, int64_t B, int64_t context, int64_t n)
{
    double t = -1;
    int64_t got = 0;
    for (; got < B; got++)
        if ((e->seqs[got] = eng_kv_seq_alloc(e->kv)) < 0)
            goto out;
    for (int64_t b = 0; b < B; b++) {
        eng_seq_in in = {.seq = e->seqs[b], .tokens = ids, .n_tokens = context};
        if (context == 0)
            e->tok_out[b] = ids[0];
        else if (eng_forward_greedy(e->c, e->kv, &in, 1, e->logits, NULL, &e->tok_out[b]) < 0)
            goto out;
    }
    const uint64_t t0 = cm_now_ns();
    for (int64_t i = 0; i < n; i++) {
        for (int64_t b = 0; b < B; b++) {
            e->tok_in[b] = e->tok_out[b];
            e->in[b] = (eng_seq_in){.seq = e->seqs[b], .tokens = &e->tok_in[b], .n_tokens = 1};
        }
        if (eng_forward_greedy(e->c, e->kv, e->in, (int)B, e->logits, NULL, e->tok_out) < 0)
            goto out;
    }
    t = (double)(cm_now_ns() - t0) * 1e-9;
out:
    for (int64_t b = 0; b < got; b++)
        eng_kv_seq_free(e->kv, e->seqs[b]);
    return t;
}

/* The matmuls of one layer, in the order eng_layer lists them. */
#define N_LAYER_W 7
static const char *const LAYER_W[N_LAYER_W] = {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"};

/* What every rank runs and what rank 0 measured. */
typedef struct bench_job {
    const char *path;          /* a model file, or NULL: */
    const char *synth;         /* a synthetic shape's name */
    const eng_hparams *shape;  /* and its shape */
    enum kn_dtype dtype;       /* synthetic weights */
    const char *device;
    int tp, threads;
    int64_t prompt_len, decode_n, reps, bw_mib, bw_reps, contention, context;
    int64_t batch[MAX_BATCHES];
    int n_batch;
    /* results (rank 0) */
    int threads_used;
    bool on_device;
    double t_pre, bw, allreduce_us, bpt, flops;
    double t_dec[MAX_BATCHES];
    int64_t shard_bytes, weight_bytes;
    char kernels[16], wtype[16], device_name[128];
    int64_t dim, n_vocab;
    int n_layer;
    /* GEMM peaks at M = prompt_len of the layer's shapes (FLOP/s); gemm_rc
     * < 0: not measured (-EOPNOTSUPP on the CPU) */
    int gemm_rc;
    enum kn_dtype gemm_t;
    int64_t gemm_n[N_LAYER_W], gemm_k[N_LAYER_W];
    double gemm[N_LAYER_W];
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

/* The backend's GEMM peak for each matmul shape of a layer at M =
 * prompt_len, in the weights' type (F16 for quantised weights: what a
 * prefill's tensor-core GEMM runs after dequantising). Shapes measured
 * once each. j->gemm_rc < 0 when the backend has none (the CPU). */
static void measure_gemm(bench_job *j, kn_ctx *kn, const eng_model *m)
{
    const eng_layer *L = eng_model_layer(m, 0);
    const kn_tensor *w[N_LAYER_W] = {&L->wq, &L->wk, &L->wv, &L->wo,
                                     &L->w_gate, &L->w_up, &L->w_down};
    const enum kn_dtype t = L->wq.type;
    j->gemm_t = t == KN_F32 || t == KN_F16 || t == KN_BF16 ? t : KN_F16;
    j->gemm_rc = 0;
    for (int i = 0; i < N_LAYER_W; i++) {
        j->gemm_n[i] = w[i]->rows;
        j->gemm_k[i] = w[i]->cols;
        j->gemm[i] = 0;
        for (int k = 0; k < i && j->gemm[i] <= 0; k++)
            if (j->gemm_n[k] == j->gemm_n[i] && j->gemm_k[k] == j->gemm_k[i])
                j->gemm[i] = j->gemm[k];
        if (j->gemm[i] > 0)
            continue;
        const double p = kn_measure_gemm_peak(kn, j->gemm_t, j->prompt_len, j->gemm_n[i],
                                              j->gemm_k[i], 10);
        if (p <= 0) {
            j->gemm_rc = p < 0 ? (int)p : -EIO;
            if (j->gemm_rc != -EOPNOTSUPP)
                fprintf(stderr, "gorgon-bench engine: GEMM peak of %s (%" PRId64 " x %" PRId64
                                " x %" PRId64 "): %s%s%s\n",
                        LAYER_W[i], j->prompt_len, j->gemm_n[i], j->gemm_k[i],
                        cm_strerror(j->gemm_rc), kn_ctx_error(kn)[0] ? ": " : "",
                        kn_ctx_error(kn));
            return;
        }
        j->gemm[i] = p;
    }
}

/* eng_fail(rc, "what: <the engine's message>: <the backend's>"); the
 * engine's is copied first, eng_fail writing the buffer eng_error reads. */
static int fail_with_cause(int rc, kn_ctx *kn, const char *what)
{
    char cause[512];
    snprintf(cause, sizeof(cause), "%s", eng_error());
    const char *ke = kn_ctx_error(kn);
    return eng_fail(rc, "%s: %s%s%s", what, cause, ke[0] ? ": " : "", ke);
}

static int bench_rank(int rank, comm *cm, void *arg)
{
    static busy_set busy;
    bench_job *j = arg;
    kn_ctx *kn = NULL;
    bench_env e = {0};
    int32_t *ids = NULL;
    bool busy_on = false;
    int rc = kn_ctx_create(&kn, &(kn_ctx_cfg){.n_threads = j->threads, .device = j->device});
    if (rc < 0) {
        rc = eng_fail(rc, "kernels on %s: %s", j->device ? j->device : "cpu", cm_strerror(rc));
        goto out;
    }
    e.kn = kn;
    if (j->shape)
        rc = eng_model_synthetic(&e.m, j->shape, j->dtype, kn, 0x5eedull);
    else if ((rc = eng_model_open_tp(&e.m, j->path, rank, j->tp)) == 0)
        rc = eng_model_to_device(e.m, kn); /* the CPU: nothing to do */
    if (rc < 0)
        goto out;
    const eng_hparams *hp = eng_model_hparams(e.m);
    const int64_t prompt_len = j->prompt_len, decode_n = j->decode_n;
    const int64_t dec_len = j->context + decode_n;
    if (prompt_len > hp->n_ctx || dec_len > hp->n_ctx) {
        rc = eng_fail(-EINVAL, "prompt (%" PRId64 ") and context + decode (%" PRId64 ") lengths "
                               "must fit the model's context of %" PRId64,
                      prompt_len, dec_len, hp->n_ctx);
        goto out;
    }
    int64_t max_b = 1;
    for (int k = 0; k < j->n_batch; k++)
        max_b = j->batch[k] > max_b ? j->batch[k] : max_b;
    const int64_t max_len = prompt_len > dec_len ? prompt_len : dec_len;
    int64_t max_tok = prompt_len > max_b ? prompt_len : max_b;
    max_tok = j->context > max_tok ? j->context : max_tok;
    /* the prefill's sequence is freed before the decode batches run */
    int64_t n_blocks = max_b * ((dec_len + 15) / 16);
    n_blocks = (prompt_len + 15) / 16 > n_blocks ? (prompt_len + 15) / 16 : n_blocks;
    eng_kv_cfg kc;
    eng_model_kv_cfg(e.m, 16, n_blocks, (int)max_b, max_len, &kc);
    const int64_t n_ids = prompt_len > j->context ? prompt_len : j->context;
    ids = malloc((size_t)n_ids * sizeof(int32_t));
    e.seqs = malloc((size_t)max_b * sizeof(int));
    e.tok_in = malloc((size_t)max_b * sizeof(int32_t));
    e.tok_out = malloc((size_t)max_b * sizeof(int32_t));
    e.in = malloc((size_t)max_b * sizeof(eng_seq_in));
    if (!ids || !e.seqs || !e.tok_in || !e.tok_out || !e.in ||
        kn_buf_alloc(kn, (size_t)(max_b * hp->n_vocab) * sizeof(float), (void **)&e.logits) < 0) {
        rc = eng_fail(-ENOMEM, "setup: out of memory%s%s", kn_ctx_error(kn)[0] ? ": " : "",
                      kn_ctx_error(kn));
        goto out;
    }
    if ((rc = eng_ctx_create(&e.c, e.m, &(eng_ctx_cfg){.kn = kn, .max_tokens = max_tok,
                                                        .max_outputs = max_b, .max_ctx = max_len,
                                                        .comm = cm})) < 0 ||
        (rc = eng_kv_create(&e.kv, kn, &kc)) < 0)
        goto out;
    /* A fixed pseudo-random prompt: what the tokens are does not change the
     * work. Ids in [1, vocab): a synthetic model has no tokenizer, and 0 is
     * often <unk>. */
    const eng_tok *tok = eng_model_tokenizer(e.m);
    const int32_t bos = tok && eng_tok_bos(tok) >= 0 ? eng_tok_bos(tok) : 1 % (int32_t)hp->n_vocab;
    uint64_t x = 0x9e3779b97f4a7c15ull;
    ids[0] = bos;
    for (int64_t i = 1; i < n_ids; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        ids[i] = hp->n_vocab > 1 ? 1 + (int32_t)((x >> 33) % (uint64_t)(hp->n_vocab - 1)) : 0;
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
    /* warm-up: page the weights in, grow every scratch buffer to its
     * largest batch (a device also picks its GEMM algorithms here) */
    if (run_prefill(&e, ids, prompt_len) < 0 || run_decode(&e, ids, max_b, 0, 2) < 0) {
        rc = fail_with_cause(-EIO, kn, "forward failed");
        goto out;
    }
    double t_pre = 1e30;
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
        j->bw = kn_measure_read_bandwidth(bw_kn, (size_t)j->bw_mib << 20, (int)j->bw_reps);
        if (bw_kn != kn)
            kn_ctx_destroy(bw_kn);
        if (j->tp == 1)
            measure_gemm(j, kn, e.m);
        else
            j->gemm_rc = -EOPNOTSUPP;
    }
    for (int k = 0; k < j->n_batch; k++) {
        double t_dec = 1e30;
        for (int64_t r = -1; r < j->reps; r++) { /* r -1: this batch size's warm-up */
            if ((rc = sync_ranks(cm)) < 0)
                goto out;
            double t = run_decode(&e, ids, j->batch[k], j->context, r < 0 ? 2 : decode_n);
            if (t < 0) {
                char what[64];
                snprintf(what, sizeof(what), "decode at batch %" PRId64 " failed", j->batch[k]);
                rc = fail_with_cause(-EIO, kn, what);
                goto out;
            }
            if (r >= 0 && t < t_dec)
                t_dec = t;
        }
        j->t_dec[k] = t_dec;
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
        j->allreduce_us = ar_us;
        j->bpt = (double)eng_model_bytes_per_token(e.m);
        j->shard_bytes = eng_model_shard_weight_bytes(e.m);
        /* what the weights occupy: the matrices, the embedding (unless it
         * is the output matrix too), the norm vectors */
        const kn_tensor *emb = eng_model_tok_embd(e.m);
        j->weight_bytes = j->shard_bytes +
                          (hp->tied_output ? 0 : (int64_t)kn_row_bytes(emb->type, hp->dim) *
                                                     hp->n_vocab) +
                          hp->dim * (int64_t)sizeof(float) * (1 + 2 * (int64_t)hp->n_layer);
        j->threads_used = kn_ctx_threads(kn);
        j->on_device = !kn_ctx_host_memory(kn);
        snprintf(j->kernels, sizeof j->kernels, "%s",
                 j->on_device ? kn_ctx_ops(kn)->name : kn_variant_name(kn_ctx_variant(kn)));
        snprintf(j->wtype, sizeof j->wtype, "%s",
                 kn_dtype_name(eng_model_layer(e.m, 0)->wq.type));
        snprintf(j->device_name, sizeof j->device_name, "%s", kn_ctx_device(kn));
        j->dim = hp->dim;
        j->n_layer = hp->n_layer;
        j->n_vocab = hp->n_vocab;
    }
    rc = 0;
out:
    if (busy_on)
        busy_stop(&busy);
    free(ids);
    free(e.seqs);
    free(e.tok_in);
    free(e.tok_out);
    free(e.in);
    if (kn)
        kn_buf_free(kn, e.logits);
    eng_kv_destroy(e.kv);
    eng_ctx_destroy(e.c);
    eng_model_close(e.m);
    kn_ctx_destroy(kn);
    return rc;
}

/* A JSON number, or null when !ok (a figure that was not measured). */
static void json_num(const char *key, double v, bool ok, const char *fmt)
{
    printf(",\"%s\":", key);
    if (ok && isfinite(v))
        printf(fmt, v);
    else
        printf("null");
}

int bench_engine_main(int argc, char **argv)
{
    const char *path = NULL, *synth = NULL, *device = "cpu";
    const eng_hparams *shape = NULL;
    int dtype = KN_F16;
    bool dtype_given = false, bw_given = false, list = false;
    int64_t threads = 1, prompt_len = 512, decode_n = 128, reps = 3, bw_mib = 1024, tp = 1;
    int64_t contention = 0, context = 0, batch[MAX_BATCHES] = {1};
    int n_batch = 1;
    bool json = false;
    enum { O_SYN = 256, O_DTYPE, O_DEVICE, O_BATCH, O_CONTEXT, O_LIST, O_TF32 };
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},      {"threads", required_argument, 0, 't'},
        {"json", no_argument, 0, 'j'},             {"prompt-len", required_argument, 0, 'p'},
        {"decode-tokens", required_argument, 0, 'n'}, {"reps", required_argument, 0, 'r'},
        {"bw-mib", required_argument, 0, 'b'},     {"help", no_argument, 0, 'h'},
        {"contention", required_argument, 0, 'c'}, {"tp", required_argument, 0, 'T'},
        {"synthetic", required_argument, 0, O_SYN}, {"dtype", required_argument, 0, O_DTYPE},
        {"device", required_argument, 0, O_DEVICE}, {"batch", required_argument, 0, O_BATCH},
        {"allow-tf32", no_argument, 0, O_TF32},
        {"context", required_argument, 0, O_CONTEXT}, {"list-devices", no_argument, 0, O_LIST},
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
        case 'b': rc = bench_parse_i64("engine", "--bw-mib", optarg, 16, 1 << 20, &bw_mib); bw_given = true; break;
        case O_SYN: synth = optarg; rc = bench_parse_synthetic("engine", optarg, &shape); break;
        case O_DTYPE: rc = bench_parse_dtype("engine", optarg, &dtype); dtype_given = true; break;
        case O_DEVICE: device = optarg; rc = bench_parse_device("engine", optarg); break;
        case O_TF32: setenv("GORGON_ALLOW_TF32", "1", 1); break; /* read by the CUDA matmul */
        case O_BATCH:
            rc = n_batch = bench_parse_i64_list("engine", "--batch", optarg, 1, MAX_BATCH, batch,
                                                MAX_BATCHES);
            break;
        case O_CONTEXT: rc = bench_parse_i64("engine", "--context", optarg, 0, 1 << 20, &context); break;
        case O_LIST: list = true; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
        if (rc < 0)
            return 2;
    }
    if (optind < argc) {
        usage(stderr);
        return 2;
    }
    if (list)
        return bench_list_devices(json);
    const char *why = NULL;
    int dev_index = -1;
    kn_device_parse(device, &dev_index); /* checked by bench_parse_device */
    if (!path == !synth)
        why = "give --model FILE or --synthetic NAME (one of them)";
    else if (dtype_given && !synth)
        why = "--dtype: applies to --synthetic models only (a file's weights have their own types)";
    else if (tp > 1 && synth)
        why = "--tp: synthetic models are not sharded (--tp 1 only)";
    else if (tp > 1 && dev_index >= 0)
        why = "--tp: tensor parallelism runs on the CPU only (--tp 1 with --device)";
    if (why) {
        fprintf(stderr, "gorgon-bench engine: %s\n", why);
        usage(stderr);
        return 2;
    }
    /* a device that is not there: say why before building anything */
    if (bench_device_usable("engine", device) < 0)
        return 1;
    bench_job j = {.path = path,
                   .synth = synth,
                   .shape = shape,
                   .dtype = (enum kn_dtype)dtype,
                   .device = device,
                   .tp = (int)tp,
                   .threads = tp > 1 && threads == 0 ? 1 : (int)threads, /* 0: auto */
                   .prompt_len = prompt_len,
                   .decode_n = decode_n,
                   .reps = reps,
                   /* HBM: 2 GiB streams far beyond any cache; best of 5 */
                   .bw_mib = dev_index >= 0 && !bw_given ? 2048 : bw_mib,
                   .bw_reps = dev_index >= 0 ? 5 : 3,
                   .contention = contention,
                   .context = context,
                   .n_batch = n_batch,
                   .gemm_rc = -EOPNOTSUPP};
    memcpy(j.batch, batch, sizeof(batch));
    const char *what = path ? path : synth;
    int rc = eng_tp_run(j.tp, bench_rank, &j,
                        &(eng_tp_opts){.threads_per_rank = j.threads > 0 ? j.threads : 1});
    if (rc < 0) {
        fprintf(stderr, "gorgon-bench engine: %s%s on %s: %s\n", synth ? "synthetic " : "", what,
                device, eng_error()[0] ? eng_error() : cm_strerror(rc));
        return 1;
    }
    const double prefill_tok_s = (double)prompt_len / j.t_pre;
    const double flop_s = j.flops / j.t_pre;
    const double roofline = j.bw / j.bpt; /* batch-1 tokens/s at the read bandwidth */
    double tok_s[MAX_BATCHES], frac[MAX_BATCHES], frac_b1 = NAN;
    for (int k = 0; k < n_batch; k++) {
        tok_s[k] = (double)(batch[k] * decode_n) / j.t_dec[k];
        /* one step streams the weights once for the whole batch */
        frac[k] = tok_s[k] / (roofline * (double)batch[k]);
        if (batch[k] == 1 && isnan(frac_b1))
            frac_b1 = frac[k];
    }
    const bool bw_ok = j.bw > 0;
    /* The prefill's attainable GEMM rate: its layer matmuls each at their
     * shape's peak (FLOPs of a shape / its peak, summed, over all FLOPs). */
    const bool gemm_ok = j.gemm_rc == 0;
    double g_min = INFINITY, g_flop = 0, g_time = 0;
    for (int i = 0; i < N_LAYER_W && gemm_ok; i++) {
        const double f = (double)j.gemm_n[i] * (double)j.gemm_k[i];
        g_min = j.gemm[i] < g_min ? j.gemm[i] : g_min;
        g_flop += f;
        g_time += f / j.gemm[i];
    }
    const double g_peak = gemm_ok ? g_flop / g_time : NAN;
    if (json) {
        printf("{\"suite\":\"engine\",\"model\":");
        if (path) {
            putchar('"');
            bench_json_puts(path);
            putchar('"');
        } else {
            printf("null");
        }
        printf(",\"synthetic\":");
        if (synth)
            printf("\"%s\"", synth);
        else
            printf("null");
        printf(",\"device\":\"");
        bench_json_puts(j.device_name);
        printf("\",\"dtype\":\"%s\",\"weights\":\"%s\",\"threads\":%d,\"tp\":%d"
               ",\"kernels\":\"%s\",\"contention\":%" PRId64 ",\"prompt_len\":%" PRId64
               ",\"decode_tokens\":%" PRId64 ",\"context\":%" PRId64
               ",\"prefill_tok_s\":%.2f,\"prefill_flop_s\":%.6g,\"prefill_gflop_s\":%.3f"
               ",\"decode_tok_s\":%.2f,\"weight_bytes\":%" PRId64
               ",\"bytes_per_token\":%.0f,\"read_bw\":%.6g,\"bandwidth_gb_s\":%.3f"
               ",\"roofline_tok_s\":%.2f,\"decode_roofline_frac\":%.4f"
               ",\"rank0_weight_bytes\":%" PRId64,
               j.wtype, j.wtype, j.threads_used, j.tp, j.kernels, contention, prompt_len,
               decode_n, context, prefill_tok_s, flop_s, flop_s * 1e-9, tok_s[0],
               j.weight_bytes, j.bpt, j.bw, j.bw * 1e-9, roofline, frac[0], j.shard_bytes);
        json_num("hbm_read_bw", j.bw, j.on_device && bw_ok, "%.6g");
        json_num("roofline_fraction", frac_b1, bw_ok && !isnan(frac_b1), "%.4f");
        printf(",\"decode\":[");
        for (int k = 0; k < n_batch; k++) {
            printf("%s{\"batch\":%" PRId64 ",\"tok_s\":%.2f,\"step_ms\":%.4f", k ? "," : "",
                   batch[k], tok_s[k], j.t_dec[k] / (double)decode_n * 1e3);
            json_num("roofline_fraction", frac[k], bw_ok, "%.4f");
            printf("}");
        }
        printf("],\"gemm_peak\":");
        if (gemm_ok) {
            printf("{\"dtype\":\"%s\",\"m\":%" PRId64 ",\"shapes\":[", kn_dtype_name(j.gemm_t),
                   prompt_len);
            for (int i = 0; i < N_LAYER_W; i++)
                printf("%s{\"w\":\"%s\",\"n\":%" PRId64 ",\"k\":%" PRId64 ",\"flop_s\":%.6g}",
                       i ? "," : "", LAYER_W[i], j.gemm_n[i], j.gemm_k[i], j.gemm[i]);
            printf("],\"min\":%.6g,\"weighted\":%.6g}", g_min, g_peak);
        } else {
            printf("null");
        }
        json_num("prefill_fraction", flop_s / g_peak, gemm_ok, "%.4f");
        if (j.tp > 1)
            printf(",\"allreduce_768_us\":%.2f", j.allreduce_us);
        printf("}\n");
    } else {
        printf("engine: %s%s (%s weights, dim %" PRId64 ", %d layers, vocab %" PRId64
               ") on %s, %s kernels",
               synth ? "synthetic " : "", what, j.wtype, j.dim, j.n_layer, j.n_vocab,
               j.device_name, j.kernels);
        if (!j.on_device)
            printf(", %d thread(s)%s, %" PRId64 " busy neighbour thread(s)", j.threads_used,
                   j.tp > 1 ? " per rank" : "", contention);
        printf("\n  %.1f MiB of weights, %.2f MB read per decode step\n",
               (double)j.weight_bytes / (1 << 20), j.bpt * 1e-6);
        if (j.tp > 1)
            printf("  tp %d: rank 0 holds %.1f MiB of weights; all-reduce of 768 floats "
                   "%.2f us (median)\n",
                   j.tp, (double)j.shard_bytes / (1 << 20), j.allreduce_us);
        printf("  prefill  %6" PRId64 " tokens  %12.1f tok/s  %9.2f GFLOP/s (matmuls)",
               prompt_len, prefill_tok_s, flop_s * 1e-9);
        if (gemm_ok)
            printf(", %.1f%% of the GEMM peak (%.1f TFLOP/s %s at M %" PRId64
                   "; shapes' min %.1f)",
                   100.0 * flop_s / g_peak, g_peak * 1e-12, kn_dtype_name(j.gemm_t), prompt_len,
                   g_min * 1e-12);
        printf("\n  %s read bandwidth %.2f GB/s -> batch-1 roofline %.1f tok/s\n",
               j.on_device ? "HBM" : "memory", j.bw * 1e-9, roofline);
        printf("  decode   batch  context  tokens/s     step ms  of roofline\n");
        for (int k = 0; k < n_batch; k++)
            printf("           %5" PRId64 "  %7" PRId64 "  %10.1f  %10.3f  %9.1f%%\n", batch[k],
                   context, tok_s[k], j.t_dec[k] / (double)decode_n * 1e3, frac[k] * 100.0);
    }
    return 0;
}
