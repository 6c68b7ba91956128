/* The worker loop: see engine/worker.h.
 *
 * Everything the loop needs is allocated at setup or at admission (the
 * request's sampler); a step allocates nothing. The command ring is written
 * by gorgond: each command is copied out once and checked before use. */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

#include "common/common.h"
#include "engine/engine.h"
#include "engine/worker.h"
#include "ipc/ipc.h"

#define TAG "worker"
#define WK_IDLE_WAIT_NS 200000000 /* idle sleep slice: bounds how late a dead parent is seen */

enum wk_state { WK_FREE = 0, WK_QUEUED, WK_PREFILL, WK_DECODE };

typedef struct wk_req {
    enum wk_state st;
    int seq;
    eng_sampler *smp;
    int32_t *prompt; /* private copy: [max_prompt] */
    int64_t n_prompt, n_done, max_tokens, n_gen, blocks;
    int32_t last;
    uint32_t next_q; /* FIFO link (UINT32_MAX: end) */
} wk_req;

typedef struct wk {
    eng_worker_cfg cfg;
    ipc_region reg;
    ipc_ring cmd, evt;
    kn_ctx *kn;
    eng_model *m;
    const eng_tok *tok;
    eng_ctx *ctx;
    eng_kv *kv;
    int64_t n_vocab, n_ctx, block_size, n_blocks;
    uint32_t n_req;
    wk_req *req;
    uint32_t q_head, q_tail; /* FIFO of QUEUED requests */
    uint32_t n_queued, n_running;
    int64_t reserved; /* worst-case blocks of running requests */
    uint32_t *run;    /* running requests in admission order */
    eng_seq_in *ins;
    uint8_t *no_out;  /* all zero: a prefill chunk that needs no logits */
    uint32_t *row_req;
    float *logits;
    uint64_t last_stats[2];
    uint16_t last_batch;
    bool gone;
} wk;

/* Push an event, waiting while the ring is full (gorgond drains it on every
 * loop pass; if it died, PR_SET_PDEATHSIG ends us). */
static void emit(wk *w, const struct ipc_wevt *e)
{
    for (unsigned spins = 0;; spins++) {
        int rc = ipc_ring_push(&w->evt, e);
        if (rc == 0)
            return;
        if (rc != -EAGAIN) {
            CM_LOG_ERROR(TAG, "event ring broken: %s", cm_strerror(rc));
            w->gone = true;
            return;
        }
        ipc_doorbell_notify(&w->evt);
        if (w->cfg.parent && getppid() != w->cfg.parent) {
            w->gone = true;
            return;
        }
        usleep(spins < 100 ? 10 : 1000);
    }
}

static void emit_done(wk *w, uint32_t r, enum ipc_finish fin, int result, uint64_t a0,
                      uint64_t a1)
{
    struct ipc_wevt e = {.op = IPC_WEVT_DONE, .finish = (uint8_t)fin, .req = r,
                         .result = result, .n_gen = (uint32_t)w->req[r].n_gen,
                         .arg = {a0, a1}};
    emit(w, &e);
}

static void req_release(wk *w, uint32_t r)
{
    wk_req *q = &w->req[r];
    if (q->st == WK_PREFILL || q->st == WK_DECODE) {
        eng_kv_seq_free(w->kv, q->seq);
        w->reserved -= q->blocks;
        w->n_running--;
        for (uint32_t i = 0; i < w->n_running + 1; i++)
            if (w->run[i] == r) {
                memmove(&w->run[i], &w->run[i + 1], (w->n_running - i) * sizeof(*w->run));
                break;
            }
    }
    eng_sampler_destroy(q->smp);
    q->smp = NULL;
    q->st = WK_FREE;
}

static void queue_remove(wk *w, uint32_t r)
{
    uint32_t prev = UINT32_MAX;
    for (uint32_t i = w->q_head; i != UINT32_MAX; prev = i, i = w->req[i].next_q) {
        if (i != r)
            continue;
        if (prev == UINT32_MAX)
            w->q_head = w->req[i].next_q;
        else
            w->req[prev].next_q = w->req[i].next_q;
        if (w->q_tail == r)
            w->q_tail = prev;
        w->n_queued--;
        return;
    }
}

static void cmd_start(wk *w, const struct ipc_wcmd *c)
{
    uint32_t r = c->req;
    wk_req *q = &w->req[r];
    if (q->st != WK_FREE) {
        CM_LOG_WARN(TAG, "START for request %u that is already running: ignored", r);
        return;
    }
    int64_t n = c->n_prompt;
    int64_t positions = n + (int64_t)c->max_tokens - 1;
    if (n < 1 || c->max_tokens < 1 || positions > w->n_ctx ||
        (size_t)n * sizeof(int32_t) > w->reg.layout.slot_in_bytes) {
        emit_done(w, r, IPC_FINISH_ERROR, -EINVAL, 0, 0);
        return;
    }
    q->blocks = (positions + w->block_size - 1) / w->block_size;
    if (q->blocks > w->n_blocks) {
        emit_done(w, r, IPC_FINISH_ERROR, -E2BIG, (uint64_t)q->blocks, (uint64_t)w->n_blocks);
        return;
    }
    /* One copy out of shared memory; ids are checked here, not trusted. */
    memcpy(q->prompt, ipc_region_slot_in(&w->reg, r), (size_t)n * sizeof(int32_t));
    for (int64_t i = 0; i < n; i++)
        if (q->prompt[i] < 0 || q->prompt[i] >= w->n_vocab) {
            emit_done(w, r, IPC_FINISH_ERROR, -EINVAL, 0, 0);
            return;
        }
    eng_sampler_cfg sc = {.temperature = c->temperature, .top_k = c->top_k, .top_p = c->top_p,
                          .min_p = c->min_p, .repeat_penalty = c->repeat_penalty,
                          .seed = c->seed};
    int rc = eng_sampler_create(&q->smp, &sc, w->n_vocab);
    if (rc < 0) {
        CM_LOG_WARN(TAG, "request %u: sampler: %s", r, eng_error());
        emit_done(w, r, IPC_FINISH_ERROR, rc, 0, 0);
        return;
    }
    for (int64_t i = 0; i < n; i++)
        eng_sampler_accept(q->smp, q->prompt[i]);
    q->n_prompt = n;
    q->n_done = 0;
    q->n_gen = 0;
    q->max_tokens = c->max_tokens;
    q->st = WK_QUEUED;
    q->next_q = UINT32_MAX;
    if (w->q_tail == UINT32_MAX)
        w->q_head = r;
    else
        w->req[w->q_tail].next_q = r;
    w->q_tail = r;
    w->n_queued++;
}

static void cmd_cancel(wk *w, uint32_t r)
{
    wk_req *q = &w->req[r];
    if (q->st == WK_FREE)
        return; /* already finished: its DONE is on the way */
    if (q->st == WK_QUEUED)
        queue_remove(w, r);
    req_release(w, r);
    emit_done(w, r, IPC_FINISH_CANCELLED, -ECANCELED, 0, 0);
}

/* Read every command; 1 if any, 0 if none, -1 when the ring is broken. */
static int read_commands(wk *w)
{
    int any = 0;
    for (;;) {
        struct ipc_wcmd c;
        int rc = ipc_ring_pop(&w->cmd, &c);
        if (rc == 0)
            return any;
        if (rc < 0) {
            CM_LOG_ERROR(TAG, "command ring broken: %s", cm_strerror(rc));
            return -1;
        }
        any = 1;
        if (c.req >= w->n_req) {
            CM_LOG_WARN(TAG, "command for request %u out of range: ignored", c.req);
            continue;
        }
        if (c.op == IPC_WCMD_START)
            cmd_start(w, &c);
        else if (c.op == IPC_WCMD_CANCEL)
            cmd_cancel(w, c.req);
        else
            CM_LOG_WARN(TAG, "unknown command %u: ignored", c.op);
    }
}

/* FIFO admission against the worst case of every running request. */
static void admit(wk *w)
{
    while (w->q_head != UINT32_MAX && w->n_running < (uint32_t)w->cfg.max_seqs) {
        uint32_t r = w->q_head;
        wk_req *q = &w->req[r];
        if (w->reserved + q->blocks > w->n_blocks)
            return; /* waits for running requests to finish */
        int seq = eng_kv_seq_alloc(w->kv);
        if (seq < 0)
            return;
        w->q_head = q->next_q;
        if (w->q_head == UINT32_MAX)
            w->q_tail = UINT32_MAX;
        w->n_queued--;
        q->seq = seq;
        q->st = WK_PREFILL;
        w->reserved += q->blocks;
        w->run[w->n_running++] = r;
    }
}

static void emit_step_stats(wk *w, uint16_t batch)
{
    uint64_t kv_used = (uint64_t)(w->n_blocks - eng_kv_free_blocks(w->kv));
    uint64_t a0 = (uint64_t)w->n_queued | (uint64_t)w->n_running << 32;
    uint64_t a1 = kv_used | (uint64_t)w->n_blocks << 32;
    if (a0 == w->last_stats[0] && a1 == w->last_stats[1] && batch == w->last_batch)
        return;
    w->last_stats[0] = a0;
    w->last_stats[1] = a1;
    w->last_batch = batch;
    struct ipc_wevt e = {.op = IPC_WEVT_STEP, .n_tokens = batch, .arg = {a0, a1}};
    emit(w, &e);
}

/* One forward over every running sequence, then sampling. */
static void step(wk *w)
{
    int n_in = 0;
    int64_t budget = w->cfg.max_batch_tokens;
    /* Decode tokens first: a long prompt must not stall running streams. */
    for (uint32_t i = 0; i < w->n_running; i++) {
        wk_req *q = &w->req[w->run[i]];
        if (q->st != WK_DECODE || budget < 1)
            continue;
        w->ins[n_in] = (eng_seq_in){.seq = q->seq, .tokens = &q->last, .n_tokens = 1};
        w->row_req[n_in++] = w->run[i];
        budget--;
    }
    for (uint32_t i = 0; i < w->n_running && budget > 0; i++) {
        wk_req *q = &w->req[w->run[i]];
        if (q->st != WK_PREFILL)
            continue;
        int64_t chunk = q->n_prompt - q->n_done;
        if (chunk > budget)
            chunk = budget;
        bool last = q->n_done + chunk == q->n_prompt;
        w->ins[n_in] = (eng_seq_in){.seq = q->seq, .tokens = q->prompt + q->n_done,
                                    .n_tokens = chunk, .want = last ? NULL : w->no_out};
        w->row_req[n_in++] = w->run[i];
        budget -= chunk;
    }
    if (n_in == 0)
        return;
    int64_t n_out = eng_forward(w->ctx, w->kv, w->ins, n_in, w->logits, NULL);
    if (n_out < 0) {
        /* Nothing changed in the cache: fail the requests of this step. */
        CM_LOG_ERROR(TAG, "forward of %d sequences failed: %s", n_in, eng_error());
        for (int i = 0; i < n_in; i++) {
            uint32_t r = w->row_req[i];
            req_release(w, r);
            emit_done(w, r, IPC_FINISH_ERROR, (int)n_out, 0, 0);
        }
        return;
    }
    int64_t row = 0;
    int32_t bos = w->tok ? eng_tok_bos(w->tok) : -1;
    for (int i = 0; i < n_in; i++) {
        uint32_t r = w->row_req[i];
        wk_req *q = &w->req[r];
        if (q->st == WK_PREFILL) {
            q->n_done += w->ins[i].n_tokens;
            if (q->n_done < q->n_prompt)
                continue; /* no output row for a middle chunk */
        }
        float *lg = w->logits + row++ * w->n_vocab;
        int32_t t = eng_sampler_sample(q->smp, lg);
        eng_sampler_accept(q->smp, t);
        q->n_gen++;
        q->last = t;
        q->st = WK_DECODE;
        struct ipc_wevt e = {.op = IPC_WEVT_TOKEN, .n_tokens = 1, .req = r,
                             .n_gen = (uint32_t)q->n_gen, .tokens = {t}};
        emit(w, &e);
        /* Same end rule as eng_generate: BOS or an end-of-generation token. */
        bool end = t == bos || (w->tok && eng_tok_is_eog(w->tok, t));
        if (end || q->n_gen >= q->max_tokens) {
            req_release(w, r);
            emit_done(w, r, end ? IPC_FINISH_EOS : IPC_FINISH_LENGTH, 0, 0, 0);
        }
    }
    emit_step_stats(w, (uint16_t)n_in);
}

static int setup(wk *w)
{
    int rc = ipc_region_map(&w->reg, w->cfg.region_fd);
    if (rc < 0) {
        CM_LOG_ERROR(TAG, "cannot map the worker region: %s", cm_strerror(rc));
        return rc;
    }
    if ((rc = ipc_region_sq(&w->reg, IPC_RING_CONSUMER, &w->cmd)) < 0 ||
        (rc = ipc_region_cq(&w->reg, IPC_RING_PRODUCER, &w->evt)) < 0)
        return rc;
    if (w->cfg.wake_fd >= 0 && (rc = ipc_ring_set_wake_fd(&w->evt, w->cfg.wake_fd)) < 0)
        return rc;
    rc = kn_ctx_create(&w->kn, &(kn_ctx_cfg){.n_threads = w->cfg.n_threads,
                                             .variant = KN_VARIANT_AUTO});
    if (rc < 0) {
        CM_LOG_ERROR(TAG, "kernels: %s", cm_strerror(rc));
        return rc;
    }
    rc = eng_model_open(&w->m, w->cfg.model_path);
    if (rc < 0) {
        CM_LOG_ERROR(TAG, "cannot load %s: %s", w->cfg.model_path, eng_error());
        return rc;
    }
    const eng_hparams *hp = eng_model_hparams(w->m);
    w->tok = eng_model_tokenizer(w->m);
    w->n_vocab = hp->n_vocab;
    w->n_ctx = hp->n_ctx;
    w->n_req = w->reg.layout.n_slots;
    if (w->cfg.max_seqs <= 0)
        w->cfg.max_seqs = 64;
    if ((uint32_t)w->cfg.max_seqs > w->n_req)
        w->cfg.max_seqs = (int)w->n_req;
    if (w->cfg.block_size <= 0)
        w->cfg.block_size = 16;
    if (w->cfg.max_batch_tokens <= 0)
        w->cfg.max_batch_tokens = 256;
    if (w->cfg.max_batch_tokens < w->cfg.max_seqs)
        w->cfg.max_batch_tokens = w->cfg.max_seqs;
    w->block_size = w->cfg.block_size;
    int64_t per_seq = (w->n_ctx + w->block_size - 1) / w->block_size;
    w->n_blocks = w->cfg.kv_blocks > 0 ? w->cfg.kv_blocks : per_seq * w->cfg.max_seqs / 4;
    if (w->n_blocks < 1)
        w->n_blocks = 1;
    eng_kv_cfg kc;
    eng_model_kv_cfg(w->m, w->cfg.block_size, w->n_blocks, w->cfg.max_seqs, w->n_ctx, &kc);
    if ((rc = eng_kv_create(&w->kv, &kc)) < 0) {
        CM_LOG_ERROR(TAG, "KV cache of %" PRId64 " blocks: %s", w->n_blocks, eng_error());
        return rc;
    }
    rc = eng_ctx_create(&w->ctx, w->m,
                        &(eng_ctx_cfg){.kn = w->kn, .max_tokens = w->cfg.max_batch_tokens,
                                       .max_outputs = w->cfg.max_seqs, .max_ctx = w->n_ctx});
    if (rc < 0) {
        CM_LOG_ERROR(TAG, "forward context: %s", eng_error());
        return rc;
    }
    w->req = calloc(w->n_req, sizeof(*w->req));
    w->run = calloc(w->n_req, sizeof(*w->run));
    w->ins = calloc((size_t)w->cfg.max_seqs, sizeof(*w->ins));
    w->row_req = calloc((size_t)w->cfg.max_seqs, sizeof(*w->row_req));
    w->no_out = calloc((size_t)w->cfg.max_batch_tokens, 1);
    w->logits = malloc((size_t)w->cfg.max_seqs * (size_t)w->n_vocab * sizeof(float));
    if (!w->req || !w->run || !w->ins || !w->row_req || !w->no_out || !w->logits)
        return -ENOMEM;
    int64_t max_prompt = w->n_ctx;
    for (uint32_t i = 0; i < w->n_req; i++)
        if (!(w->req[i].prompt = malloc((size_t)max_prompt * sizeof(int32_t))))
            return -ENOMEM;
    w->q_head = w->q_tail = UINT32_MAX;
    CM_LOG_INFO(TAG, "%s: ctx %" PRId64 ", KV %" PRId64 " blocks of %d, %d sequences, %" PRId64
                " tokens per step, %d threads",
                w->cfg.model_path, w->n_ctx, w->n_blocks, w->cfg.block_size, w->cfg.max_seqs,
                w->cfg.max_batch_tokens, kn_ctx_threads(w->kn));
    return 0;
}

static void teardown(wk *w)
{
    if (w->req)
        for (uint32_t i = 0; i < w->n_req; i++) {
            eng_sampler_destroy(w->req[i].smp);
            free(w->req[i].prompt);
        }
    free(w->req);
    free(w->run);
    free(w->ins);
    free(w->row_req);
    free(w->no_out);
    free(w->logits);
    eng_ctx_destroy(w->ctx);
    eng_kv_destroy(w->kv);
    eng_model_close(w->m);
    kn_ctx_destroy(w->kn);
    ipc_region_unmap(&w->reg);
}

int eng_worker_run(const eng_worker_cfg *cfg)
{
    /* A worker without its gorgond has no one to answer: die with it. */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (cfg->parent && getppid() != cfg->parent)
        return 0; /* the parent died before the prctl */
    wk *w = calloc(1, sizeof(*w));
    if (!w)
        return -ENOMEM;
    w->cfg = *cfg;
    w->reg.fd = -1;
    int rc = setup(w);
    if (rc < 0) {
        teardown(w);
        free(w);
        return rc;
    }
    struct ipc_wevt ready = {.op = IPC_WEVT_READY,
                             .arg = {(uint64_t)w->n_blocks, (uint64_t)w->cfg.max_seqs}};
    emit(w, &ready);
    emit_step_stats(w, 0);
    ipc_doorbell_notify(&w->evt);
    while (!w->gone) {
        int got = read_commands(w);
        if (got < 0)
            break;
        admit(w);
        if (w->n_running == 0) {
            emit_step_stats(w, 0);
            ipc_doorbell_notify(&w->evt);
            if (got == 0) {
                if (cfg->parent && getppid() != cfg->parent)
                    break;
                int wr = ipc_doorbell_wait(&w->cmd, WK_IDLE_WAIT_NS);
                if (wr < 0 && wr != -ETIMEDOUT && wr != -EINTR) {
                    CM_LOG_ERROR(TAG, "waiting for commands: %s", cm_strerror(wr));
                    break;
                }
            }
            continue;
        }
        step(w);
        ipc_doorbell_notify(&w->evt);
    }
    teardown(w);
    free(w);
    return 0;
}
