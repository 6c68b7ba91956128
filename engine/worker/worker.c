/* The worker loop: see engine/worker/worker.h.
 *
 * Everything the loop needs is allocated at setup or at admission (the
 * request's sampler); a step allocates nothing. The command ring is written
 * by gorgond: each command is copied out once and checked before use. */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <unistd.h>

#include "common/common.h"
#include "engine/comm/comm.h"
#include "engine/engine.h"
#include "engine/medusa/medusa.h"
#include "engine/medusa/medusa_fit.h"
#include "engine/worker/worker.h"
#include "ipc/ipc.h"
#include "ipc/ipc_kv.h"

#define TAG "worker"
#define WK_IDLE_WAIT_NS 200000000 /* idle sleep slice: bounds how late a dead parent is seen */
#define WK_MED_MAX_ROWS 256      /* tree rows of one step at most (sizes the Medusa batch cap) */
#define WK_MED_PROBE 32          /* steps between Medusa probes while it does not pay,
                                  * per unit of tree-step cost */
#define WK_MED_EWMA 0.05         /* weight of one step in the tokens-per-step average */
#define WK_MED_WARMUP 8          /* first steps speculate whatever the cost: they measure
                                  * the acceptance the limit is computed from */
#define WK_MED_CAL_PROMPT 64     /* calibration: context of each sequence (attention's share
                                  * of a step grows with it; less when the model's is short) */
#define WK_MED_CAL_REPS 5        /* calibration: timed steps of each kind per batch size
                                  * (min taken) */
#define WK_PLAN_MAGIC 0x4e4c5047u /* "GPLN": a step plan of rank 0 (tensor parallelism) */
#define WK_PLAN_MIN (1u << 20)   /* bytes of commands + prompts one plan carries, at least */
#define WK_STEP_TIMEOUT_MS 30000 /* cfg.step_timeout_ms 0: a collective inside a step that
                                  * sees no progress this long ends the group (a hung rank) */

/* WK_HANDOFF (prefill role): the prompt's blocks left for a decode group;
 * the request holds its reservation until gorgond's RECLAIM. */
enum wk_state { WK_FREE = 0, WK_QUEUED, WK_PREFILL, WK_DECODE, WK_HANDOFF };

typedef struct wk_req {
    enum wk_state st;
    int seq;
    eng_sampler *smp;
    int32_t *prompt; /* private copy: [max_prompt] */
    int64_t n_prompt, n_done, max_tokens, n_gen, blocks;
    int32_t last;    /* the last token emitted, not yet in the KV cache */
    uint32_t next_q; /* FIFO link (UINT32_MAX: end) */
    /* Medusa: med_ok = greedy request that may speculate; med_pending = the
     * decoder holds the logits and hidden state at the token before `last`
     * (from which `last` was taken), so a Medusa step can run. */
    bool med_ok, med_pending, med_now;
    uint32_t med_steps, med_acc;
    /* ADOPT (decode role): queued to continue a handed-off request with
     * `first` after n_hand blocks (table in the worker's hand_tbl) */
    bool adopt;
    int32_t first;
    uint32_t n_hand;
} wk_req;

typedef struct wk {
    eng_worker_cfg cfg;
    ipc_region reg; /* rank 0 only */
    ipc_ring cmd, evt;
    uint32_t slot_in; /* bytes of a request slot's input (the prompt's ids) */
    /* tensor parallelism (cm NULL: a whole model) */
    comm *cm;
    uint8_t *plan; /* commands read this pass (+ their prompts), [plan_cap] */
    size_t plan_len, plan_cap;
    kn_ctx *kn;
    bool on_device;   /* kn runs on a CUDA device (cfg.device) */
    bool dev_failed;  /* its ctx hit a sticky error: the worker exits */
    int64_t weight_bytes; /* device memory the weights took (on a device) */
    eng_model *m;
    const eng_tok *tok;
    eng_ctx *ctx;
    eng_kv *kv;
    int64_t n_vocab, n_ctx, block_size, n_blocks;
    uint32_t n_req;
    wk_req *req;
    /* disaggregated serving: the shared pool (kvc.fd -1: a private one) */
    ipc_kv_ctl kvc;
    void *pool;
    size_t pool_bytes;
    int64_t max_hand;   /* table entries of one hand-off */
    int32_t *hand_tbl;  /* [n_req][max_hand] adopted tables (decode role) */
    int32_t *xfer;      /* [max_hand] scratch */
    uint8_t *payload;   /* rank 0 without TP: a command's hand-off payload */
    uint32_t q_head, q_tail; /* FIFO of QUEUED requests */
    uint32_t n_queued, n_running;
    int64_t reserved; /* worst-case blocks of running requests */
    uint32_t *run;    /* running requests in admission order */
    eng_seq_in *ins;
    uint8_t *no_out;  /* all zero: a prefill chunk that needs no logits */
    uint32_t *row_req;
    float *logits;  /* [max_out][n_vocab] backend */
    float *hidden;  /* [max_out][dim] backend */
    int32_t *ids_d; /* [max_out] backend: argmax of output rows */
    int32_t *ids;   /* [max_out] host copy */
    float *row;     /* [n_vocab] host: a sampling request's logits row */
    /* TP: rows sampled from their top-k alone (eng_forward_topk), per
     * output row: k, temperature, and the candidates [max_seqs][TOPK_MAX] */
    int32_t *tk_k;
    float *tk_temp;
    eng_cand *tk_top;
    uint64_t last_stats[2];
    uint16_t last_batch;
    int32_t last_limit;
    uint64_t last_stats_ns; /* an unchanged STEP is still sent this often: the heartbeat */
    bool gone;
    /* Medusa (md NULL: no heads configured) */
    eng_medusa_heads *mh;
    eng_medusa_tree *tree;
    eng_medusa *md;
    int nn;           /* tree nodes */
    int med_cap;      /* most sequences in one Medusa step */
    int med_fixed;    /* > 0: configured batch limit (no cost model) */
    double *med_cost; /* [med_cap + 1]: tree step / plain step cost at batch b (measured) */
    double med_tps;   /* tokens per Medusa step per sequence, running average */
    uint32_t med_measured; /* Medusa steps folded into med_tps */
    int med_limit;    /* largest batch at which Medusa pays now */
    uint32_t med_skip;  /* steps since the last Medusa step while it did not pay */
    int *med_seqs;
    uint32_t *med_req;
    eng_medusa_result *med_res;
} wk;

/* Push an event, waiting while the ring is full (gorgond drains it on every
 * loop pass; if it died, PR_SET_PDEATHSIG ends us). */
static void emit(wk *w, const struct ipc_wevt *e)
{
    if (w->cfg.rank > 0)
        return; /* rank 0 speaks for the group */
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

static void run_remove(wk *w, uint32_t r)
{
    w->n_running--;
    for (uint32_t i = 0; i < w->n_running + 1; i++)
        if (w->run[i] == r) {
            memmove(&w->run[i], &w->run[i + 1], (w->n_running - i) * sizeof(*w->run));
            break;
        }
}

static void req_release(wk *w, uint32_t r)
{
    wk_req *q = &w->req[r];
    if (q->st == WK_PREFILL || q->st == WK_DECODE) {
        eng_kv_seq_free(w->kv, q->seq);
        if (w->md)
            eng_medusa_seq_end(w->md, q->seq);
        w->reserved -= q->blocks;
        run_remove(w, r);
    } else if (q->st == WK_HANDOFF) {
        w->reserved -= q->blocks;
    }
    eng_sampler_destroy(q->smp);
    q->smp = NULL;
    q->st = WK_FREE;
}

/* rc from a backend call in a step: true when the device failed (a
 * sticky CUDA error: every later call on the kernel ctx fails too). The
 * first time the reason is logged and the loop set to end, so that the
 * worker exits and gorgond starts a fresh one on a fresh ctx. Never on
 * the CPU. */
static bool device_lost(wk *w, int64_t rc, const char *what)
{
    if (!w->on_device || rc != -EIO)
        return false;
    if (!w->dev_failed) {
        const char *ke = kn_ctx_error(w->kn), *ee = eng_error();
        const bool both = ke[0] && !strstr(ee, ke);
        CM_LOG_ERROR(TAG, "%s failed on device %s: %s%s%s; the step's requests fail with -EIO "
                     "and the worker exits (its kernel context is unusable) for gorgond to "
                     "restart it",
                     what, kn_ctx_device(w->kn), ee[0] ? ee : ke, both ? ": " : "",
                     both ? ke : "");
    }
    w->dev_failed = true;
    w->gone = true;
    return true;
}

/* The kernel a device error names, for the DONE event's arg[] (16 bytes,
 * NUL-padded): kn_ctx_error reads "op: <CUDA error>" or "<CUDA error>
 * (last kernel issued: op)". */
static void failed_kernel(const wk *w, uint64_t arg[2])
{
    char name[16] = {0};
    const char *m = kn_ctx_error(w->kn), *p = strstr(m, "(last kernel issued: ");
    size_t n;
    if (p) {
        p += strlen("(last kernel issued: ");
        n = strcspn(p, ")");
    } else {
        p = m;
        n = strcspn(p, ": ");
    }
    memcpy(name, p, n < sizeof(name) ? n : sizeof(name));
    memcpy(arg, name, sizeof(name));
}

/* End the requests of a step's rows [0, n_in) that are still running
 * (those that finished in it have had their DONE) with `result` (after a
 * device error, with the failing kernel's name). */
static void fail_rows(wk *w, int n_in, int result)
{
    uint64_t arg[2] = {0, 0};
    if (w->dev_failed)
        failed_kernel(w, arg);
    for (int i = 0; i < n_in; i++) {
        uint32_t r = w->row_req[i];
        if (w->req[r].st == WK_FREE)
            continue;
        req_release(w, r);
        emit_done(w, r, IPC_FINISH_ERROR, result, arg[0], arg[1]);
    }
}

/* Emit tokens t[0..n) for request r, in TOKEN events of up to 8; the
 * request ends at the first BOS or end-of-generation token (same end rule
 * as eng_generate) or at max_tokens, and what follows is dropped. Returns
 * the tokens emitted. */
static int emit_tokens(wk *w, uint32_t r, const int32_t *t, int n)
{
    wk_req *q = &w->req[r];
    const int32_t bos = w->tok ? eng_tok_bos(w->tok) : -1;
    struct ipc_wevt e = {.op = IPC_WEVT_TOKEN, .req = r};
    bool end = false, eos = false;
    int i = 0;
    while (i < n && !end) {
        eng_sampler_accept(q->smp, t[i]);
        q->n_gen++;
        q->last = t[i];
        e.tokens[e.n_tokens++] = t[i];
        eos = t[i] == bos || (w->tok && eng_tok_is_eog(w->tok, t[i]));
        end = eos || q->n_gen >= q->max_tokens;
        i++;
        if (e.n_tokens == 8 || end || i == n) {
            e.n_gen = (uint32_t)q->n_gen;
            e.arg[0] = q->med_steps;
            e.arg[1] = q->med_acc;
            emit(w, &e);
            e.n_tokens = 0;
        }
    }
    if (end) {
        req_release(w, r);
        emit_done(w, r, eos ? IPC_FINISH_EOS : IPC_FINISH_LENGTH, 0, 0, 0);
    }
    return i;
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

/* The number of prompt ids a START or ADOPT carries, or -1 when its count
 * is bad (then it is refused before its prompt is read). */
static int64_t start_words(const wk *w, const struct ipc_wcmd *c)
{
    if (c->op != IPC_WCMD_START && c->op != IPC_WCMD_ADOPT)
        return -1;
    int64_t n = c->n_prompt;
    return n >= 1 && (size_t)n * sizeof(int32_t) <= w->slot_in ? n : -1;
}

/* The checks and state START and ADOPT share: the request's reservation,
 * Medusa eligibility, its prompt (copied and checked) and sampler. false
 * when it was refused (DONE sent). */
static bool req_init(wk *w, const struct ipc_wcmd *c, const int32_t *prompt)
{
    uint32_t r = c->req;
    wk_req *q = &w->req[r];
    if (q->st != WK_FREE) {
        CM_LOG_WARN(TAG, "command %u for request %u that is already running: ignored", c->op, r);
        return false;
    }
    int64_t n = c->n_prompt;
    int64_t positions = n + (int64_t)c->max_tokens - 1;
    if (start_words(w, c) < 0 || c->max_tokens < 1 || positions > w->n_ctx) {
        emit_done(w, r, IPC_FINISH_ERROR, -EINVAL, 0, 0);
        return false;
    }
    q->blocks = (positions + w->block_size - 1) / w->block_size;
    /* (In a prefill group too: every group's share is the same size, so a
     * request the decode group could never adopt is refused before its
     * prompt runs.) */
    if (q->blocks > w->n_blocks) {
        emit_done(w, r, IPC_FINISH_ERROR, -E2BIG, (uint64_t)q->blocks, (uint64_t)w->n_blocks);
        return false;
    }
    /* A prefill group holds the prompt only: the decode group reserves the
     * rest when it adopts the request. */
    if (w->cfg.role == ENG_WORKER_PREFILL)
        q->blocks = (n + w->block_size - 1) / w->block_size;
    /* Medusa serves greedy requests (its greedy acceptance is exactly
     * greedy decoding); a tree step writes n_nodes positions past the
     * sequence, so such a request reserves that slack too, when the pool
     * and context allow it, else it decodes plainly. */
    q->med_ok = false;
    if (w->md && !(c->flags & IPC_WCMD_F_NO_MEDUSA) && c->temperature == 0.0f &&
        (c->repeat_penalty == 0.0f || c->repeat_penalty == 1.0f)) {
        int64_t mpos = positions + w->nn < w->n_ctx ? positions + w->nn : w->n_ctx;
        int64_t mblocks = (mpos + w->block_size - 1) / w->block_size;
        if (mblocks <= w->n_blocks) {
            q->blocks = mblocks;
            q->med_ok = true;
        }
    }
    q->med_pending = q->med_now = false;
    q->med_steps = q->med_acc = 0;
    q->adopt = false;
    /* One copy out of shared memory; ids are checked here, not trusted. */
    memcpy(q->prompt, prompt, (size_t)n * sizeof(int32_t));
    for (int64_t i = 0; i < n; i++)
        if (q->prompt[i] < 0 || q->prompt[i] >= w->n_vocab) {
            emit_done(w, r, IPC_FINISH_ERROR, -EINVAL, 0, 0);
            return false;
        }
    eng_sampler_cfg sc = {.temperature = c->temperature, .top_k = c->top_k, .top_p = c->top_p,
                          .min_p = c->min_p, .repeat_penalty = c->repeat_penalty,
                          .seed = c->seed};
    int rc = eng_sampler_create(&q->smp, &sc, w->n_vocab);
    if (rc < 0) {
        CM_LOG_WARN(TAG, "request %u: sampler: %s", r, eng_error());
        emit_done(w, r, IPC_FINISH_ERROR, rc, 0, 0);
        return false;
    }
    for (int64_t i = 0; i < n; i++)
        eng_sampler_accept(q->smp, q->prompt[i]);
    q->n_prompt = n;
    q->n_done = 0;
    q->n_gen = 0;
    q->max_tokens = c->max_tokens;
    return true;
}

static void enqueue(wk *w, uint32_t r)
{
    wk_req *q = &w->req[r];
    q->st = WK_QUEUED;
    q->next_q = UINT32_MAX;
    if (w->q_tail == UINT32_MAX)
        w->q_head = r;
    else
        w->req[w->q_tail].next_q = r;
    w->q_tail = r;
    w->n_queued++;
}

static void cmd_start(wk *w, const struct ipc_wcmd *c, const int32_t *prompt)
{
    if (w->cfg.role == ENG_WORKER_DECODE) {
        CM_LOG_WARN(TAG, "START for request %u in a decode group: refused", c->req);
        emit_done(w, c->req, IPC_FINISH_ERROR, -EPROTO, 0, 0);
        return;
    }
    if (req_init(w, c, prompt))
        enqueue(w, c->req);
}

/* A command's hand-off payload (ADOPT, RECLAIM): the RNG state, then the
 * n_blocks block ids, copied once out of the request's IN area. */
#define WK_HAND_HDR (4 * sizeof(uint64_t))
static bool has_payload(const wk *w, const struct ipc_wcmd *c)
{
    return (c->op == IPC_WCMD_ADOPT || c->op == IPC_WCMD_RECLAIM) && w->kvc.fd >= 0 &&
           c->n_blocks <= w->max_hand;
}

static size_t payload_bytes(const struct ipc_wcmd *c)
{
    return WK_HAND_HDR + (size_t)c->n_blocks * sizeof(int32_t);
}

/* ADOPT (decode role): the request continues here from `first`, over the
 * blocks a prefill group wrote; admitted in FIFO order like START. */
static void cmd_adopt(wk *w, const struct ipc_wcmd *c, const int32_t *prompt, const uint8_t *hp)
{
    const uint32_t r = c->req;
    if (w->cfg.role != ENG_WORKER_DECODE || !hp || c->first < 0 || c->first >= w->n_vocab ||
        c->max_tokens < 2) {
        CM_LOG_WARN(TAG, "bad ADOPT of request %u (%u blocks, first token %d): refused", r,
                    c->n_blocks, c->first);
        emit_done(w, r, IPC_FINISH_ERROR, -EPROTO, 0, 0);
        return;
    }
    if (!req_init(w, c, prompt))
        return;
    wk_req *q = &w->req[r];
    if ((int64_t)c->n_blocks > q->blocks ||
        (int64_t)c->n_blocks * w->block_size < q->n_prompt) {
        CM_LOG_WARN(TAG, "ADOPT of request %u: %u blocks for a %" PRId64 "-token prompt", r,
                    c->n_blocks, q->n_prompt);
        req_release(w, r);
        emit_done(w, r, IPC_FINISH_ERROR, -EPROTO, 0, 0);
        return;
    }
    uint64_t rng[4];
    memcpy(rng, hp, sizeof rng);
    eng_sampler_rng_set(q->smp, rng);
    eng_sampler_accept(q->smp, c->first);
    memcpy(w->hand_tbl + (size_t)r * (size_t)w->max_hand, hp + WK_HAND_HDR,
           (size_t)c->n_blocks * sizeof(int32_t));
    q->adopt = true;
    q->first = c->first;
    q->n_hand = c->n_blocks;
    q->n_gen = 1;
    enqueue(w, r);
}

/* RECLAIM (prefill role): blocks are this group's again (a decode group's
 * exchange, or a hand-off that did not happen), and the request's hold
 * since HANDOFF ends. */
static void cmd_reclaim(wk *w, const struct ipc_wcmd *c, const uint8_t *hp)
{
    if (!hp) {
        CM_LOG_WARN(TAG, "bad RECLAIM of request %u (%u blocks): ignored", c->req, c->n_blocks);
        return;
    }
    memcpy(w->xfer, hp + WK_HAND_HDR, (size_t)c->n_blocks * sizeof(int32_t));
    if (eng_kv_give(w->kv, w->xfer, c->n_blocks) < 0)
        CM_LOG_WARN(TAG, "RECLAIM of request %u: %s", c->req, eng_error());
    if (w->req[c->req].st == WK_HANDOFF)
        req_release(w, c->req);
}

static void cmd_cancel(wk *w, uint32_t r)
{
    wk_req *q = &w->req[r];
    if (q->st == WK_FREE || q->st == WK_HANDOFF)
        return; /* already finished (its DONE is on the way) or handed off: gorgond ends
                 * the hold with RECLAIM */
    if (q->st == WK_QUEUED)
        queue_remove(w, r);
    req_release(w, r);
    emit_done(w, r, IPC_FINISH_CANCELLED, -ECANCELED, 0, 0);
}

static void apply_cmd(wk *w, const struct ipc_wcmd *c, const int32_t *prompt,
                      const uint8_t *hp)
{
    if (c->op == IPC_WCMD_START)
        cmd_start(w, c, prompt);
    else if (c->op == IPC_WCMD_CANCEL)
        cmd_cancel(w, c->req);
    else if (c->op == IPC_WCMD_ADOPT)
        cmd_adopt(w, c, prompt, hp);
    else if (c->op == IPC_WCMD_RECLAIM)
        cmd_reclaim(w, c, hp);
    else
        CM_LOG_WARN(TAG, "unknown command %u: ignored", c->op);
}

/* Rank 0: read the commands (as many as one plan holds under TP); 1 if
 * any, 0 if none, -1 when the ring is broken. Under TP each command and its
 * prompt (copied once out of the slot: a client cannot change it between
 * the ranks' reads) go into the plan, and the command is applied from it. */
static int read_commands(wk *w)
{
    int any = 0;
    w->plan_len = 0;
    for (;;) {
        if (w->cm && w->plan_cap - w->plan_len < sizeof(struct ipc_wcmd) + w->slot_in +
                                                     WK_HAND_HDR +
                                                     (size_t)w->max_hand * sizeof(int32_t))
            return any; /* the rest goes with the next step's plan */
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
        int64_t n = start_words(w, &c);
        const int32_t *prompt =
            n > 0 ? (const int32_t *)(const void *)ipc_region_slot_in(&w->reg, c.req) : NULL;
        const uint8_t *hp = NULL;
        if (w->cm) {
            memcpy(w->plan + w->plan_len, &c, sizeof c);
            w->plan_len += sizeof c;
            if (n > 0) {
                memcpy(w->plan + w->plan_len, prompt, (size_t)n * sizeof(int32_t));
                prompt = (const int32_t *)(w->plan + w->plan_len);
                w->plan_len += (size_t)n * sizeof(int32_t);
            }
        }
        if (has_payload(w, &c)) {
            /* copied once out of the IN area, which gorgond wrote before
             * pushing the command */
            uint8_t *dst = w->cm ? w->plan + w->plan_len : w->payload;
            const struct ipc_kv_area *a = ipc_kv_area(&w->kvc, IPC_KV_IN, w->cfg.kv_owner, c.req);
            memcpy(dst, a->rng, WK_HAND_HDR);
            memcpy(dst + WK_HAND_HDR, a->blocks, (size_t)c.n_blocks * sizeof(int32_t));
            hp = dst;
            if (w->cm)
                w->plan_len += payload_bytes(&c);
        }
        apply_cmd(w, &c, prompt, hp);
    }
}

/* ---- tensor parallelism: rank 0's plan, the other ranks' replay -------------- */

struct wk_plan_hdr {
    uint32_t magic, flags;
    uint64_t len;
};

static int comm_failed(wk *w, int rc, const char *what)
{
    char why[256];
    if (comm_aborted(w->cm, why, sizeof why))
        CM_LOG_ERROR(TAG, "rank %d: the group stopped (%s): %s", w->cfg.rank, what, why);
    else
        CM_LOG_ERROR(TAG, "rank %d: %s: %s", w->cfg.rank, what, comm_last_error(w->cm));
    w->gone = true;
    return rc;
}

/* Rank 0: the commands read this pass go to every rank before the step. */
static int send_plan(wk *w)
{
    struct wk_plan_hdr h = {.magic = WK_PLAN_MAGIC, .len = w->plan_len};
    int rc = comm_broadcast(w->cm, &h, sizeof h, 0);
    if (rc == 0 && h.len)
        rc = comm_broadcast(w->cm, w->plan, (size_t)h.len, 0);
    return rc < 0 ? comm_failed(w, rc, "sending the step plan") : 0;
}

/* The collectives' limit inside a step (cfg.step_timeout_ms). */
static int64_t step_timeout(const wk *w)
{
    const int64_t t = w->cfg.step_timeout_ms;
    return t == 0 ? WK_STEP_TIMEOUT_MS : t < 0 ? -1 : t;
}

/* Ranks 1..: wait (without limit: rank 0 may be idle) for rank 0's plan
 * and apply its commands as rank 0 did. 0, or < 0 when the group stops. */
static int recv_plan(wk *w)
{
    struct wk_plan_hdr h;
    comm_set_timeout_ms(w->cm, -1);
    int rc = comm_broadcast(w->cm, &h, sizeof h, 0);
    comm_set_timeout_ms(w->cm, step_timeout(w));
    if (rc < 0)
        return comm_failed(w, rc, "waiting for rank 0's plan");
    if (h.magic != WK_PLAN_MAGIC || h.len > w->plan_cap) {
        comm_abort(w->cm, "a rank received a malformed step plan");
        return comm_failed(w, -EPROTO, "step plan");
    }
    if (h.len && (rc = comm_broadcast(w->cm, w->plan, (size_t)h.len, 0)) < 0)
        return comm_failed(w, rc, "receiving the step plan");
    size_t off = 0;
    while (off + sizeof(struct ipc_wcmd) <= h.len) {
        struct ipc_wcmd c;
        memcpy(&c, w->plan + off, sizeof c);
        off += sizeof c;
        int64_t n = start_words(w, &c);
        const int32_t *prompt = NULL;
        const uint8_t *hp = NULL;
        if (n > 0) {
            if (off + (size_t)n * sizeof(int32_t) > h.len)
                break;
            prompt = (const int32_t *)(w->plan + off);
            off += (size_t)n * sizeof(int32_t);
        }
        if (c.req < w->n_req && has_payload(w, &c)) {
            if (off + payload_bytes(&c) > h.len)
                break;
            hp = w->plan + off;
            off += payload_bytes(&c);
        }
        if (c.req < w->n_req)
            apply_cmd(w, &c, prompt, hp);
    }
    if (off != h.len) {
        comm_abort(w->cm, "a rank received a malformed step plan");
        return comm_failed(w, -EPROTO, "step plan");
    }
    return 0;
}

/* An ADOPT admitted: its sequence takes the handed-off blocks, as many of
 * ours go back to the prefill group (OUT area, ADOPTED), and it decodes
 * from `first` (one plain step, then Medusa if it may). */
static void adopt_admitted(wk *w, uint32_t r)
{
    wk_req *q = &w->req[r];
    const int32_t *tbl = w->hand_tbl + (size_t)r * (size_t)w->max_hand;
    if (eng_kv_seq_adopt(w->kv, q->seq, tbl, q->n_hand, q->n_prompt, w->xfer) < 0) {
        CM_LOG_WARN(TAG, "ADOPT of request %u: %s", r, eng_error());
        req_release(w, r);
        emit_done(w, r, IPC_FINISH_ERROR, -EPROTO, 0, 0);
        return;
    }
    if (w->cfg.rank == 0) {
        struct ipc_kv_area *a = ipc_kv_area(&w->kvc, IPC_KV_OUT, 0, r);
        memcpy(a->blocks, w->xfer, (size_t)q->n_hand * sizeof(int32_t));
        a->n_blocks = q->n_hand;
        a->kv_len = (uint32_t)q->n_prompt;
    }
    q->adopt = false;
    q->st = WK_DECODE;
    q->n_done = q->n_prompt;
    q->last = q->first;
    struct ipc_wevt e = {.op = IPC_WEVT_ADOPTED, .req = r, .n_gen = (uint32_t)q->n_gen,
                         .arg = {(uint64_t)q->n_prompt, q->n_hand}};
    emit(w, &e);
}

/* Prefill role, after a request's first token: its prompt's blocks leave
 * for a decode group (table and RNG state in the OUT area, HANDOFF); the
 * request keeps its reservation until gorgond's RECLAIM. */
static void hand_off(wk *w, uint32_t r)
{
    wk_req *q = &w->req[r];
    int64_t n = eng_kv_seq_detach(w->kv, q->seq, w->xfer, w->max_hand);
    CM_ASSERT(n >= 0); /* max_hand holds a whole context's table */
    if (w->cfg.rank == 0) {
        struct ipc_kv_area *a = ipc_kv_area(&w->kvc, IPC_KV_OUT, 0, r);
        eng_sampler_rng_get(q->smp, a->rng);
        memcpy(a->blocks, w->xfer, (size_t)n * sizeof(int32_t));
        a->n_blocks = (uint32_t)n;
        a->kv_len = (uint32_t)q->n_prompt;
    }
    run_remove(w, r);
    q->st = WK_HANDOFF;
    struct ipc_wevt e = {.op = IPC_WEVT_HANDOFF, .req = r, .n_gen = (uint32_t)q->n_gen,
                         .tokens = {q->last}, .arg = {(uint64_t)q->n_prompt, (uint64_t)n}};
    emit(w, &e);
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
        if (q->adopt)
            adopt_admitted(w, r);
    }
}

static void emit_step_stats(wk *w, uint16_t batch)
{
    uint64_t kv_used = (uint64_t)(w->n_blocks - eng_kv_free_blocks(w->kv));
    uint64_t a0 = (uint64_t)w->n_queued | (uint64_t)w->n_running << 32;
    uint64_t a1 = kv_used | (uint64_t)w->n_blocks << 32;
    int32_t limit = w->md ? w->med_limit : 0;
    /* Unchanged stats are not resent, except every 100 ms: gorgond's
     * watchdog counts any event as progress, and a step may yield nothing
     * else (a long prompt's prefill chunks). */
    uint64_t now = cm_now_ns();
    if (a0 == w->last_stats[0] && a1 == w->last_stats[1] && batch == w->last_batch &&
        limit == w->last_limit && now - w->last_stats_ns < 100000000u)
        return;
    w->last_stats_ns = now;
    w->last_stats[0] = a0;
    w->last_stats[1] = a1;
    w->last_batch = batch;
    w->last_limit = limit;
    struct ipc_wevt e = {.op = IPC_WEVT_STEP, .n_tokens = batch, .result = limit,
                         .arg = {a0, a1}};
    emit(w, &e);
}

/* Largest batch at which a Medusa step (med_tps tokens per sequence for
 * med_cost[b] times a plain step's time) beats plain decoding. */
static void med_update_limit(wk *w)
{
    if (w->med_fixed > 0) {
        w->med_limit = w->med_fixed;
        return;
    }
    int lim = 0;
    for (int b = 1; b <= w->med_cap; b++)
        if (w->med_tps > w->med_cost[b])
            lim = b;
    w->med_limit = lim;
}

/* Which decoding requests take a Medusa step now: those whose decoder
 * state is ready and whose tree fits their reservation and the context,
 * when there are at most med_limit of them (the measured break-even, or
 * the configured limit); with a measured limit also during the warm-up and
 * in occasional probes, so that the acceptance estimate follows the
 * traffic. Returns how many, listed in med_seqs/med_req. */
static int med_select(wk *w)
{
    int n = 0, n_elig = 0;
    for (uint32_t i = 0; i < w->n_running; i++) {
        uint32_t r = w->run[i];
        wk_req *q = &w->req[r];
        q->med_now = false;
        if (q->st != WK_DECODE || !q->med_pending)
            continue;
        int64_t len = eng_kv_seq_len(w->kv, q->seq);
        int64_t room = q->blocks * w->block_size < w->n_ctx ? q->blocks * w->block_size : w->n_ctx;
        if (len < 0 || len + w->nn > room)
            continue;
        n_elig++;
        if (n == w->med_cap)
            continue; /* counted for the decision, decoded plainly */
        w->med_seqs[n] = q->seq;
        w->med_req[n++] = r;
    }
    if (n == 0)
        return 0;
    /* Warm-up steps speculate to measure the acceptance; after that, above
     * the limit only probes do (at most med_cap sequences), spaced by the
     * step's cost so that they add at most about 1/WK_MED_PROBE to the time
     * of plain decoding. */
    bool warm = w->med_fixed == 0 && w->med_measured < WK_MED_WARMUP;
    if (!warm && n_elig > w->med_limit &&
        (w->med_fixed > 0 || ++w->med_skip < WK_MED_PROBE * w->med_cost[n]))
        return 0;
    w->med_skip = 0;
    for (int i = 0; i < n; i++)
        w->req[w->med_req[i]].med_now = true;
    return n;
}

/* After a Medusa step: emit each sequence's accepted tokens and the next
 * root (the argmax at the last accepted one, which the next step verifies
 * from), and fold the step into the tokens-per-step average. */
static void med_emit(wk *w, int n_med)
{
    double sum = 0;
    for (int i = 0; i < n_med; i++) {
        uint32_t r = w->med_req[i];
        wk_req *q = &w->req[r];
        const eng_medusa_result *res = &w->med_res[i];
        CM_ASSERT(res->tokens[0] == q->last);
        int32_t t[ENG_MEDUSA_MAX_DEPTH + 1];
        int n = 0;
        for (int d = 1; d <= res->n_accepted; d++)
            t[n++] = res->tokens[d];
        t[n++] = eng_medusa_seq_root(w->md, q->seq);
        sum += res->n_tokens;
        q->med_steps++;
        q->med_acc += (uint32_t)res->n_accepted;
        int done = emit_tokens(w, r, t, n);
        if (done <= res->n_accepted) /* ended inside the accepted tokens */
            q->med_acc -= (uint32_t)(res->n_accepted - done);
    }
    /* A plain mean over the warm-up, then an exponential average. */
    double a = w->med_measured < WK_MED_WARMUP ? 1.0 / (w->med_measured + 1) : WK_MED_EWMA;
    w->med_tps = (1.0 - a) * w->med_tps + a * sum / n_med;
    w->med_measured++;
    med_update_limit(w);
}

/* ids[i] = argmax of logits rows [first, first + n) on the backend; only
 * the ids come back. */
static int argmax_rows(wk *w, int64_t first, int64_t n)
{
    int rc = kn_ctx_ops(w->kn)->argmax(w->kn, w->logits + first * w->n_vocab, n, w->n_vocab,
                                       w->ids_d);
    if (rc == 0)
        rc = kn_buf_download(w->kn, w->ids, w->ids_d, (size_t)n * sizeof(int32_t));
    return rc;
}

/* The next token of request q from its output row into *t: greedy takes
 * the argmax the backend computed (ids, from argmax_rows), a sampler
 * downloads the row. 0, or the download's -errno (only a device that
 * failed: the row is a buffer of ours). */
static int sample_row(wk *w, const wk_req *q, int64_t row, int32_t argmax, int32_t *t)
{
    if (eng_sampler_is_greedy(q->smp)) {
        *t = argmax;
        return 0;
    }
    int rc = kn_buf_download(w->kn, w->row, w->logits + row * w->n_vocab,
                             (size_t)w->n_vocab * sizeof(float));
    if (rc < 0)
        return rc;
    *t = eng_sampler_sample(q->smp, w->row);
    return 0;
}

/* Tensor parallelism or a device, without Medusa: when every output row of
 * the step is greedy or sampled from its top-k alone (eng_sampler_topk),
 * note each row's k and temperature and return the largest k (the ranks
 * then exchange, and a device downloads, that many candidates per row
 * instead of whole rows); else 0. */
static int topk_plan(wk *w, int n_in)
{
    if ((!w->cm && !w->on_device) || w->md)
        return 0;
    int kmax = 1, o = 0;
    for (int i = 0; i < n_in; i++) {
        const wk_req *q = &w->req[w->row_req[i]];
        if (q->st == WK_PREFILL && q->n_done + w->ins[i].n_tokens < q->n_prompt)
            continue; /* a middle chunk: no output row */
        const int k = eng_sampler_is_greedy(q->smp) ? 1 : eng_sampler_topk(q->smp);
        if (k < 1 || k > ENG_TOPK_MAX)
            return 0;
        w->tk_k[o] = k;
        w->tk_temp[o++] = k == 1 ? 1.0f : eng_sampler_temperature(q->smp);
        kmax = k > kmax ? k : kmax;
    }
    return kmax;
}

/* One forward over every running sequence, then sampling. */
static void step(wk *w)
{
    int n_in = 0;
    int n_med = w->md ? med_select(w) : 0;
    if (n_med > 0) {
        int64_t rc = eng_medusa_step_prepare(w->md, w->kv, w->med_seqs, n_med, w->ins);
        if (rc < 0) {
            /* A broken invariant of this loop, not of a request: run plainly. */
            CM_LOG_ERROR(TAG, "medusa step: %s", eng_error());
            for (int i = 0; i < n_med; i++)
                w->req[w->med_req[i]].med_now = false;
            n_med = 0;
        }
        for (int i = 0; i < n_med; i++)
            w->row_req[n_in++] = w->med_req[i];
    }
    int64_t budget = w->cfg.max_batch_tokens;
    /* Decode tokens first: a long prompt must not stall running streams. */
    for (uint32_t i = 0; i < w->n_running; i++) {
        wk_req *q = &w->req[w->run[i]];
        if (q->st != WK_DECODE || q->med_now || budget < 1)
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
    /* Without Medusa and with every request greedy, only the argmax ids are
     * needed: under TP the ranks then exchange one (max, id) pair per row
     * instead of whole logits rows. */
    bool ids_only = !w->md;
    for (int i = 0; i < n_in && ids_only; i++)
        ids_only = eng_sampler_is_greedy(w->req[w->row_req[i]].smp);
    const int kmax = ids_only ? 0 : topk_plan(w, n_in);
    int64_t n_out = ids_only   ? eng_forward_greedy(w->ctx, w->kv, w->ins, n_in, w->logits, NULL,
                                                    w->ids)
                    : kmax > 0 ? eng_forward_topk(w->ctx, w->kv, w->ins, n_in, w->logits, w->tk_k,
                                                  w->tk_temp, kmax, w->tk_top)
                               : eng_forward(w->ctx, w->kv, w->ins, n_in, w->logits, w->hidden);
    if (n_out < 0) {
        /* Nothing changed in the cache: fail the requests of this step (on
         * a device that failed, with -EIO, and the worker then exits). */
        if (!device_lost(w, n_out, "a forward"))
            CM_LOG_ERROR(TAG, "forward of %d sequences failed: %s", n_in, eng_error());
        if (w->cm && comm_aborted(w->cm, NULL, 0))
            w->gone = true; /* a rank is gone: gorgond restarts the group */
        if (n_med > 0)
            eng_medusa_step_abort(w->md, w->med_seqs, n_med);
        fail_rows(w, n_in, (int)n_out);
        return;
    }
    int64_t row = 0;
    if (n_med > 0) {
        int64_t got = eng_medusa_step_finish(w->md, w->kv, w->med_seqs, n_med, w->logits,
                                             w->hidden, w->med_res);
        if (got < 0 && device_lost(w, got, "a Medusa step")) {
            fail_rows(w, n_in, -EIO);
            return;
        }
        CM_ASSERT(got > 0);
        row = (int64_t)n_med * w->nn;
    }
    const int64_t first = row;
    int rc;
    if (kmax > 0) { /* the greedy rows' ids: their one candidate */
        for (int64_t o = 0; o < n_out; o++)
            w->ids[o] = w->tk_top[o * kmax].id;
    } else if (!ids_only && n_out > first &&
               (rc = argmax_rows(w, first, n_out - first)) < 0) {
        if (device_lost(w, rc, "the argmax of the logits")) {
            fail_rows(w, n_in, -EIO);
            return;
        }
        CM_LOG_ERROR(TAG, "argmax on the backend failed");
        w->gone = true;
        return;
    }
    const int64_t dim = eng_model_hparams(w->m)->dim;
    for (int i = n_med; i < n_in; i++) {
        uint32_t r = w->row_req[i];
        wk_req *q = &w->req[r];
        if (q->st == WK_PREFILL) {
            q->n_done += w->ins[i].n_tokens;
            if (q->n_done < q->n_prompt)
                continue; /* no output row for a middle chunk */
        }
        const float *lg = w->logits + row * w->n_vocab, *hd = w->hidden + row * dim;
        const int32_t am = w->ids[row - first];
        q->st = WK_DECODE;
        int32_t t = am;
        rc = 0;
        if (q->med_ok) {
            /* Keep the decoder ready: a later step may speculate from here. */
            rc = eng_medusa_seq_begin(w->md, q->seq, lg, hd, 0);
            q->med_pending = rc == 0;
            t = am;
        } else if (kmax > 0 && !eng_sampler_is_greedy(q->smp)) {
            t = eng_sampler_sample_topk(q->smp, w->tk_top + row * kmax, w->tk_k[row]);
        } else {
            rc = sample_row(w, q, row, am, &t);
        }
        if (rc < 0 && device_lost(w, rc, q->med_ok ? "Medusa's decoder" : "a logits download")) {
            fail_rows(w, n_in, -EIO);
            return;
        }
        CM_ASSERT(rc == 0); /* on the CPU neither can fail: buffers of ours */
        row++;
        emit_tokens(w, r, &t, 1);
        if (w->cfg.role == ENG_WORKER_PREFILL && q->st == WK_DECODE)
            hand_off(w, r);
    }
    if (n_med > 0)
        med_emit(w, n_med);
    emit_step_stats(w, (uint16_t)n_in);
}

/* Heads, tree and decoder from the configuration. */
static int med_open(wk *w)
{
    const eng_hparams *hp = eng_model_hparams(w->m);
    const char *dir = w->cfg.medusa_dir;
    int rc = eng_medusa_heads_open(&w->mh, dir, hp->dim, hp->n_vocab);
    if (rc < 0) {
        CM_LOG_ERROR(TAG, "medusa heads %s: %s", dir, eng_error());
        return rc;
    }
    const char *from = "";
    if ((rc = eng_medusa_tree_choose(&w->tree, w->cfg.medusa_tree, dir, &from)) < 0) {
        CM_LOG_ERROR(TAG, "medusa tree: %s", eng_error());
        return rc;
    }
    rc = eng_medusa_create(&w->md, &(eng_medusa_cfg){.model = w->m, .kn = w->kn,
                                                     .heads = w->mh, .tree = w->tree,
                                                     .max_seqs = w->cfg.max_seqs,
                                                     .accept = ENG_MEDUSA_GREEDY,
                                                     .comm = w->cm});
    if (rc < 0) {
        CM_LOG_ERROR(TAG, "medusa decoder: %s", eng_error());
        return rc;
    }
    w->nn = w->tree->n_nodes;
    w->med_cap = WK_MED_MAX_ROWS / w->nn;
    if (w->med_cap < 1)
        w->med_cap = 1;
    if (w->med_cap > w->cfg.max_seqs)
        w->med_cap = w->cfg.max_seqs;
    w->med_fixed = w->cfg.medusa_max_batch;
    if (w->med_fixed > w->med_cap)
        w->med_fixed = w->med_cap;
    w->med_cost = calloc((size_t)w->med_cap + 1, sizeof(double));
    w->med_seqs = calloc((size_t)w->med_cap, sizeof(int));
    w->med_req = calloc((size_t)w->med_cap, sizeof(uint32_t));
    w->med_res = calloc((size_t)w->med_cap, sizeof(eng_medusa_result));
    if (!w->med_cost || !w->med_seqs || !w->med_req || !w->med_res)
        return -ENOMEM;
    CM_LOG_INFO(TAG, "medusa: %d heads from %s, tree of %d nodes (depth %d) from %s",
                eng_medusa_heads_count(w->mh), dir, w->nn, w->tree->max_depth,
                w->cfg.medusa_tree ? w->cfg.medusa_tree : from);
    return 0;
}

static void cal_free(wk *w, int n)
{
    for (int i = 0; i < n; i++) {
        eng_medusa_seq_end(w->md, w->med_seqs[i]);
        eng_kv_seq_free(w->kv, w->med_seqs[i]);
    }
}

/* Time a plain decode step and a Medusa step over b dummy sequences; the
 * ratio, or 0 when the pool or context has no room for b of them. */
static double cal_ratio(wk *w, int b)
{
    const int R = WK_MED_CAL_REPS;
    const int64_t after = R + (int64_t)R * (w->tree->max_depth + 1) + w->nn;
    const int64_t P = WK_MED_CAL_PROMPT + after <= w->n_ctx ? WK_MED_CAL_PROMPT
                                                             : w->n_ctx - after;
    const int64_t need = P + after;
    const int64_t dim = eng_model_hparams(w->m)->dim;
    if (P < 1 || b * ((need + w->block_size - 1) / w->block_size) > eng_kv_free_blocks(w->kv))
        return 0;
    int32_t prompt[WK_MED_CAL_PROMPT], next[WK_MED_MAX_ROWS];
    for (int64_t i = 0; i < P; i++)
        prompt[i] = (int32_t)((i * 7919 + 1) % w->n_vocab);
    double ratio = 0;
    int n = 0;
    for (; n < b; n++) {
        int s = eng_kv_seq_alloc(w->kv);
        if (s < 0)
            goto out;
        w->med_seqs[n] = s;
        /* one sequence at a time, in chunks the forward context takes */
        for (int64_t off = 0; off < P; off += w->cfg.max_batch_tokens) {
            int64_t k = P - off < w->cfg.max_batch_tokens ? P - off : w->cfg.max_batch_tokens;
            bool last = off + k == P;
            eng_seq_in in = {.seq = s, .tokens = prompt + off, .n_tokens = k,
                             .want = last ? NULL : w->no_out};
            if (eng_forward(w->ctx, w->kv, &in, 1, w->logits + (int64_t)n * w->n_vocab,
                            w->hidden + (int64_t)n * dim) != (last ? 1 : 0)) {
                n++;
                goto out;
            }
        }
    }
    for (int i = 0; i < b; i++) {
        eng_medusa_seq_begin(w->md, w->med_seqs[i], w->logits + (int64_t)i * w->n_vocab,
                             w->hidden + (int64_t)i * dim, 0);
        next[i] = eng_medusa_seq_root(w->md, w->med_seqs[i]);
    }
    /* Plain and tree steps alternate, so that a stretch of interference
     * (another process on the CPUs) slows both kinds rather than one. */
    double plain = 1e30, tree = 1e30;
    for (int r = 0; r < R; r++) {
        for (int i = 0; i < b; i++)
            w->ins[i] = (eng_seq_in){.seq = w->med_seqs[i], .tokens = &next[i], .n_tokens = 1};
        uint64_t t0 = cm_now_ns();
        if (eng_forward(w->ctx, w->kv, w->ins, b, w->logits, w->hidden) != b ||
            argmax_rows(w, 0, b) < 0)
            goto out;
        memcpy(next, w->ids, (size_t)b * sizeof(int32_t));
        double dt = (double)(cm_now_ns() - t0);
        plain = dt < plain ? dt : plain;
        t0 = cm_now_ns();
        if (eng_medusa_step_prepare(w->md, w->kv, w->med_seqs, b, w->ins) < 0)
            goto out;
        if (eng_forward(w->ctx, w->kv, w->ins, b, w->logits, w->hidden) < 0) {
            eng_medusa_step_abort(w->md, w->med_seqs, b);
            goto out;
        }
        eng_medusa_step_finish(w->md, w->kv, w->med_seqs, b, w->logits, w->hidden, w->med_res);
        dt = (double)(cm_now_ns() - t0);
        tree = dt < tree ? dt : tree;
    }
    /* A tree step does a plain step's work and more: a ratio below 1 is
     * noise, and would let heads that accept nothing look worth it. */
    ratio = tree > plain ? tree / plain : 1.0;
out:
    cal_free(w, n);
    return ratio;
}

/* med_cost[b] for b = 1..med_cap from steps timed at b = 1, 2, 4, ...
 * (between two measured sizes the larger one's ratio: speculation is not
 * assumed to pay where it was not measured to). Sizes the pool cannot hold
 * for calibration are not used. */
static int med_calibrate(wk *w)
{
    if (w->med_fixed > 0) {
        med_update_limit(w);
        CM_LOG_INFO(TAG, "medusa: up to %d sequences per step (configured)", w->med_limit);
        return 0;
    }
    char msg[512];
    size_t at = 0;
    int last = 0;
    for (int b = 1;; b = b * 2 < w->med_cap ? b * 2 : w->med_cap) {
        double r = cal_ratio(w, b);
        if (r <= 0)
            break;
        for (int k = last + 1; k <= b; k++)
            w->med_cost[k] = r;
        last = b;
        if (at < sizeof(msg))
            at += (size_t)snprintf(msg + at, sizeof(msg) - at, " %d:%.2f", b, r);
        if (b == w->med_cap)
            break;
    }
    for (int k = last + 1; k <= w->med_cap; k++)
        w->med_cost[k] = INFINITY;
    if (last == 0) {
        CM_LOG_WARN(TAG, "medusa: no KV room to measure a tree step: Medusa is off");
        eng_medusa_destroy(w->md);
        w->md = NULL;
        return 0;
    }
    med_update_limit(w);
    CM_LOG_INFO(TAG, "medusa: tree step / plain step by batch:%s; the batch limit follows "
                "from the tokens per step measured over the first %d steps and then as they "
                "run", msg, WK_MED_WARMUP);
    return 0;
}

/* Tensor parallelism: the Medusa costs are rank 0's measurements (the
 * ranks timed the same steps, but clocks differ), so that every rank's
 * scheduler takes the same decisions. */
static int share_calibration(wk *w)
{
    int32_t on = w->md != NULL;
    int rc = comm_broadcast(w->cm, &on, sizeof on, 0);
    if (rc == 0 && on && w->md)
        rc = comm_broadcast(w->cm, w->med_cost, ((size_t)w->med_cap + 1) * sizeof(double), 0);
    if (rc < 0)
        return comm_failed(w, rc, "sharing the Medusa calibration");
    if (!on && w->md) { /* rank 0 found no room to measure: off everywhere */
        eng_medusa_destroy(w->md);
        w->md = NULL;
    } else if (on && !w->md) {
        return comm_failed(w, -EPROTO, "Medusa is on at rank 0 only");
    }
    if (w->md)
        med_update_limit(w);
    return 0;
}

/* Tensor parallelism: join the group's communicator; rank 0 tells the
 * others the region's shape (they have no region). */
static int join_group(wk *w)
{
    char why[256];
    comm_shm_opts o = COMM_SHM_OPTS_DEFAULT;
    o.threads_per_rank = kn_ctx_threads(w->kn);
    /* Pinned ranks own their CPUs: spin first. Otherwise spin only when
     * every rank's threads (of every group), gorgond's loop and a client
     * waiting for tokens each have a CPU (gorgond's poll_us = auto rule): spinning ranks on a
     * full machine take the CPU from the rank, gorgond or client they wait
     * for (measured on 2 CPUs, gorgon-bench serve c=4: 0.9x the throughput of
     * sleeping at once). */
    const int groups = w->cfg.groups > 1 ? w->cfg.groups : 1;
    o.spin = w->cfg.pinned                                                  ? 1
             : cm_spin_allowed(groups * w->cfg.tp * o.threads_per_rank + 2) ? -1
                                                                            : 0;
    o.timeout_ms = -1; /* loading: gorgond's worker_start_timeout_ms bounds it */
    int rc = comm_shm_attach(&w->cm, w->cfg.comm_fd, w->cfg.rank, &o, why, sizeof why);
    if (rc < 0) {
        CM_LOG_ERROR(TAG, "rank %d of %d: cannot join the group: %s", w->cfg.rank, w->cfg.tp,
                     why);
        return rc;
    }
    if (comm_size(w->cm) != w->cfg.tp) {
        CM_LOG_ERROR(TAG, "rank %d: the group's region has %d ranks, not --tp %d", w->cfg.rank,
                     comm_size(w->cm), w->cfg.tp);
        return -EINVAL;
    }
    uint64_t shape[2] = {w->n_req, w->slot_in};
    if ((rc = comm_broadcast(w->cm, shape, sizeof shape, 0)) < 0)
        return comm_failed(w, rc, "receiving the region's shape");
    if (shape[0] < 1 || shape[0] > UINT32_MAX || shape[1] > UINT32_MAX)
        return comm_failed(w, -EPROTO, "the region's shape");
    w->n_req = (uint32_t)shape[0];
    w->slot_in = (uint32_t)shape[1];
    /* room for several commands with whole prompts (same on every rank) */
    w->plan_cap = 4 * (sizeof(struct ipc_wcmd) + w->slot_in);
    if (w->plan_cap < WK_PLAN_MIN)
        w->plan_cap = WK_PLAN_MIN;
    if (!(w->plan = malloc(w->plan_cap)))
        return -ENOMEM;
    return 0;
}

/* Disaggregated serving: the cache lives in the shared pool (this rank's
 * pool memfd), and starts with the blocks owner[] gives this group. */
static int shared_pool(wk *w, eng_kv_cfg *kc, int32_t **own)
{
    char why[256];
    int rc = ipc_kv_ctl_map(&w->kvc, w->cfg.kv_ctl_fd, why, sizeof why);
    if (rc < 0) {
        CM_LOG_ERROR(TAG, "shared KV pool control area: %s", why);
        return rc;
    }
    const struct ipc_kv_hdr *h = w->kvc.hdr;
    w->max_hand = h->max_blocks;
    const int64_t per_seq = (w->n_ctx + w->block_size - 1) / w->block_size;
    if (h->n_req < w->n_req || w->max_hand < per_seq || w->cfg.kv_owner >= h->n_groups) {
        CM_LOG_ERROR(TAG, "shared KV pool: areas for %u groups' %u requests of %u blocks; this "
                     "worker is group %u with %u requests of up to %" PRId64 " blocks (block "
                     "size %" PRId64 ")",
                     h->n_groups, h->n_req, h->max_blocks, w->cfg.kv_owner, w->n_req, per_seq,
                     w->block_size);
        return -EPROTO;
    }
    kc->n_blocks = h->n_blocks;
    w->pool_bytes = eng_kv_pool_bytes(kc);
    if (!w->pool_bytes)
        return -EINVAL;
    if ((rc = ipc_kv_pool_map(w->cfg.kv_pool_fd, w->pool_bytes, &w->pool, why, sizeof why)) < 0) {
        CM_LOG_ERROR(TAG, "shared KV pool (rank %d): %s", w->cfg.rank, why);
        return rc;
    }
    close(w->cfg.kv_pool_fd); /* the mapping stays */
    kc->mem = w->pool;
    kc->mem_size = w->pool_bytes;
    if (!(*own = malloc((size_t)h->n_blocks * sizeof(int32_t))))
        return -ENOMEM;
    int64_t n = 0;
    for (uint32_t b = 0; b < h->n_blocks; b++)
        if (__atomic_load_n(&w->kvc.owner[b], __ATOMIC_ACQUIRE) == w->cfg.kv_owner)
            (*own)[n++] = (int32_t)b;
    if (n == 0) {
        CM_LOG_ERROR(TAG, "shared KV pool: no block belongs to group %u", w->cfg.kv_owner);
        return -EPROTO;
    }
    kc->own = *own;
    kc->n_own = n;
    w->n_blocks = n;
    w->hand_tbl = malloc((size_t)w->n_req * (size_t)w->max_hand * sizeof(int32_t));
    w->xfer = malloc((size_t)w->max_hand * sizeof(int32_t));
    w->payload = malloc(WK_HAND_HDR + (size_t)w->max_hand * sizeof(int32_t));
    if (!w->hand_tbl || !w->xfer || !w->payload)
        return -ENOMEM;
    CM_LOG_INFO(TAG, "%s group %u: %" PRId64 " of the shared pool's %u KV blocks",
                w->cfg.role == ENG_WORKER_PREFILL ? "prefill" : "decode", w->cfg.kv_owner, n,
                h->n_blocks);
    return 0;
}

int eng_worker_cfg_check(const eng_worker_cfg *cfg, char *why, size_t cap)
{
    int cuda;
    if (kn_device_parse(cfg->device, &cuda) < 0) {
        snprintf(why, cap, "device '%s' is not cpu, cuda or cuda:N", cfg->device);
        return -EINVAL;
    }
    if (!(cfg->kv_fraction >= 0 && cfg->kv_fraction <= 1)) {
        snprintf(why, cap, "kv_fraction %g is not in (0, 1]", cfg->kv_fraction);
        return -EINVAL;
    }
    if (cuda < 0)
        return 0;
    if (cfg->tp > 1) {
        snprintf(why, cap, "tensor parallelism (tp %d) on device %s is not supported: device "
                 "ranks need NCCL groups, which the worker does not have yet (one device, "
                 "tp 1)", cfg->tp, cfg->device);
        return -EINVAL;
    }
    if (cfg->role != ENG_WORKER_BOTH || cfg->kv_ctl_fd >= 0) {
        snprintf(why, cap, "disaggregated serving (a prefill or decode role) on device %s is "
                 "not supported: the hand-off KV pool is host shared memory, which device "
                 "kernels do not read (colocated only)", cfg->device);
        return -EINVAL;
    }
    return 0;
}

/* The kernel ctx: this CPU's thread pool, or the configured device. A
 * device this process cannot use is -ENODEV, logged with the reason (this
 * build's, the driver's, or an index past the devices present). */
static int open_kernels(wk *w)
{
    const char *dev = w->cfg.device;
    int cuda = -1;
    (void)kn_device_parse(dev, &cuda); /* checked by eng_worker_cfg_check */
    if (cuda >= 0) {
        char why[256] = "";
        int n = kn_cuda_device_count(why, sizeof why);
        if (n <= 0) {
            CM_LOG_ERROR(TAG, "cannot use device %s: %s", dev, why[0] ? why : cm_strerror(n));
            return -ENODEV;
        }
        if (cuda >= n) {
            CM_LOG_ERROR(TAG, "cannot use device %s: this machine has %d CUDA device%s "
                         "(cuda:0 to cuda:%d)", dev, n, n == 1 ? "" : "s", n - 1);
            return -ENODEV;
        }
    }
    int rc = kn_ctx_create(&w->kn, &(kn_ctx_cfg){.n_threads = w->cfg.n_threads,
                                                 .variant = KN_VARIANT_AUTO, .device = dev});
    if (rc < 0 && cuda >= 0) {
        CM_LOG_ERROR(TAG, "cannot use device %s: %s (the kernels' message above says why)", dev,
                     cm_strerror(rc));
        return -ENODEV;
    }
    if (rc < 0) {
        CM_LOG_ERROR(TAG, "kernels: %s", cm_strerror(rc));
        return rc;
    }
    w->on_device = cuda >= 0;
    return 0;
}

/* On a device: upload the weights and note the memory they took. Weights
 * that do not fit are -ENODEV (no restart can help; the message gives
 * needed and free GiB). */
static int place_weights(wk *w)
{
    size_t free0 = 0, free1 = 0, total = 0;
    const bool known = kn_ctx_mem_info(w->kn, &free0, &total) == 0;
    int rc = eng_model_to_device(w->m, w->kn);
    if (rc < 0) {
        CM_LOG_ERROR(TAG, "cannot place %s on device %s: %s", w->cfg.model_path,
                     kn_ctx_device(w->kn), eng_error());
        return rc == -ENOMEM ? -ENODEV : rc;
    }
    if (known && kn_ctx_mem_info(w->kn, &free1, &total) == 0 && free0 > free1)
        w->weight_bytes = (int64_t)(free0 - free1);
    else
        w->weight_bytes = eng_model_shard_weight_bytes(w->m);
    return 0;
}

/* On a device with kv_blocks = 0 (auto): floor(kv_fraction x free device
 * memory / bytes of one block), the memory free once the weights, the
 * forward's scratch and the output buffers are in place; at most every
 * sequence at full context (more could never be used). -ENODEV when not
 * one block fits. */
static int device_kv_blocks(wk *w, const eng_kv_cfg *kc, int64_t *out)
{
    size_t free_b = 0, total_b = 0;
    int rc = kn_ctx_mem_info(w->kn, &free_b, &total_b);
    if (rc < 0) {
        CM_LOG_ERROR(TAG, "device %s: cannot read its free memory to size the KV pool (%s): "
                     "set kv_blocks", kn_ctx_device(w->kn), cm_strerror(rc));
        return -ENODEV;
    }
    eng_kv_cfg one = *kc;
    one.n_blocks = 1;
    const size_t per = eng_kv_pool_bytes(&one);
    const double f = w->cfg.kv_fraction > 0 ? w->cfg.kv_fraction : 0.9;
    const double fit = per ? floor(f * (double)free_b / (double)per) : 0;
    const int64_t per_seq = (w->n_ctx + w->block_size - 1) / w->block_size;
    const int64_t most = per_seq * w->cfg.max_seqs;
    int64_t n = fit < (double)most ? (int64_t)fit : most;
    if (n < 1) {
        CM_LOG_ERROR(TAG, "device %s: no room for the KV cache: kv_fraction %.2f of %.2f GiB "
                     "free is less than one block of %zu bytes",
                     kn_ctx_device(w->kn), f, (double)free_b / (1 << 30), per);
        return -ENODEV;
    }
    CM_LOG_INFO(TAG, "KV pool on %s: %" PRId64 " blocks of %d positions (%.2f GiB): kv_fraction "
                "%.2f of the %.2f GiB free after the weights%s",
                kn_ctx_device(w->kn), n, w->cfg.block_size,
                (double)n * (double)per / (1 << 30), f, (double)free_b / (1 << 30),
                n == most ? " (capped: every sequence at full context)" : "");
    if (n < per_seq)
        CM_LOG_WARN(TAG, "the KV pool holds %" PRId64 " positions, fewer than the model's "
                    "context of %" PRId64 ": longer requests are refused",
                    n * w->block_size, w->n_ctx);
    *out = n;
    return 0;
}

static int setup(wk *w)
{
    int rc;
    char why[512];
    if ((rc = eng_worker_cfg_check(&w->cfg, why, sizeof why)) < 0) {
        CM_LOG_ERROR(TAG, "%s", why);
        return rc;
    }
    if (w->cfg.rank == 0) {
        if ((rc = ipc_region_map(&w->reg, w->cfg.region_fd)) < 0) {
            CM_LOG_ERROR(TAG, "cannot map the worker region: %s", cm_strerror(rc));
            return rc;
        }
        if ((rc = ipc_region_sq(&w->reg, IPC_RING_CONSUMER, &w->cmd)) < 0 ||
            (rc = ipc_region_cq(&w->reg, IPC_RING_PRODUCER, &w->evt)) < 0)
            return rc;
        if (w->cfg.wake_fd >= 0 && (rc = ipc_ring_set_wake_fd(&w->evt, w->cfg.wake_fd)) < 0)
            return rc;
        w->n_req = w->reg.layout.n_slots;
        w->slot_in = w->reg.layout.slot_in_bytes;
    }
    if ((rc = open_kernels(w)) < 0)
        return rc;
    if (w->cfg.tp > 1 && (rc = join_group(w)) < 0)
        return rc;
    rc = eng_model_open_tp(&w->m, w->cfg.model_path, w->cfg.rank, w->cfg.tp > 1 ? w->cfg.tp : 1);
    if (rc < 0) {
        CM_LOG_ERROR(TAG, "cannot load %s: %s", w->cfg.model_path, eng_error());
        return rc;
    }
    if (w->on_device && (rc = place_weights(w)) < 0)
        return rc;
    const eng_hparams *hp = eng_model_hparams(w->m);
    w->tok = eng_model_tokenizer(w->m);
    w->n_vocab = hp->n_vocab;
    w->n_ctx = hp->n_ctx;
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
    if (w->cfg.medusa_dir && w->cfg.role != ENG_WORKER_PREFILL && (rc = med_open(w)) < 0)
        return rc;
    /* Trees ride on top of the prefill budget (decode and trees first, so
     * they never starve prompts of a step). */
    int64_t tree_rows = w->md ? (int64_t)w->med_cap * w->nn : 0;
    int64_t max_out = w->cfg.max_seqs + tree_rows;
    rc = eng_ctx_create(&w->ctx, w->m,
                        &(eng_ctx_cfg){.kn = w->kn, .max_tokens = w->cfg.max_batch_tokens + tree_rows,
                                       .max_outputs = max_out, .max_ctx = w->n_ctx,
                                       .comm = w->cm});
    if (rc < 0) {
        CM_LOG_ERROR(TAG, "forward context: %s", eng_error());
        return rc;
    }
    w->req = calloc(w->n_req, sizeof(*w->req));
    w->run = calloc(w->n_req, sizeof(*w->run));
    w->ins = calloc((size_t)w->cfg.max_seqs, sizeof(*w->ins));
    w->row_req = calloc((size_t)w->cfg.max_seqs, sizeof(*w->row_req));
    w->no_out = calloc((size_t)w->cfg.max_batch_tokens, 1);
    w->ids = malloc((size_t)max_out * sizeof(int32_t));
    w->row = malloc((size_t)w->n_vocab * sizeof(float));
    if (!w->req || !w->run || !w->ins || !w->row_req || !w->no_out || !w->ids || !w->row)
        return -ENOMEM;
    if (w->cm) {
        w->tk_k = malloc((size_t)w->cfg.max_seqs * sizeof(*w->tk_k));
        w->tk_temp = malloc((size_t)w->cfg.max_seqs * sizeof(*w->tk_temp));
        w->tk_top = malloc((size_t)w->cfg.max_seqs * ENG_TOPK_MAX * sizeof(*w->tk_top));
        if (!w->tk_k || !w->tk_temp || !w->tk_top)
            return -ENOMEM;
    }
    if ((rc = kn_buf_alloc(w->kn, (size_t)max_out * (size_t)w->n_vocab * sizeof(float),
                           (void **)&w->logits)) < 0 ||
        (rc = kn_buf_alloc(w->kn, (size_t)max_out * (size_t)hp->dim * sizeof(float),
                           (void **)&w->hidden)) < 0 ||
        (rc = kn_buf_alloc(w->kn, (size_t)max_out * sizeof(int32_t), (void **)&w->ids_d)) < 0) {
        CM_LOG_ERROR(TAG, "output buffers for %" PRId64 " rows: %s", max_out, cm_strerror(rc));
        return rc;
    }
    /* The KV pool last: on a device it takes what the rest left free. */
    eng_kv_cfg kc;
    eng_model_kv_cfg(w->m, w->cfg.block_size, w->n_blocks, w->cfg.max_seqs, w->n_ctx, &kc);
    if (w->on_device && w->cfg.kv_blocks <= 0) {
        if ((rc = device_kv_blocks(w, &kc, &w->n_blocks)) < 0)
            return rc;
        kc.n_blocks = w->n_blocks;
    }
    int32_t *own = NULL;
    if (w->cfg.kv_ctl_fd >= 0 && (rc = shared_pool(w, &kc, &own)) < 0)
        return rc;
    rc = eng_kv_create(&w->kv, w->kn, &kc);
    free(own);
    if (rc < 0) {
        if (w->on_device && rc == -ENOMEM) {
            CM_LOG_ERROR(TAG, "KV cache of %" PRId64 " blocks (%.2f GiB) does not fit on device "
                         "%s: %s; lower kv_blocks or kv_fraction", w->n_blocks,
                         (double)eng_kv_pool_bytes(&kc) / (1 << 30), kn_ctx_device(w->kn),
                         eng_error());
            return -ENODEV;
        }
        CM_LOG_ERROR(TAG, "KV cache of %" PRId64 " blocks: %s", w->n_blocks, eng_error());
        return rc;
    }
    if (w->md && (rc = med_calibrate(w)) < 0)
        return rc;
    if (w->cm && (rc = share_calibration(w)) < 0)
        return rc;
    if (w->cm)
        comm_set_timeout_ms(w->cm, step_timeout(w));
    int64_t max_prompt = w->n_ctx;
    for (uint32_t i = 0; i < w->n_req; i++)
        if (!(w->req[i].prompt = malloc((size_t)max_prompt * sizeof(int32_t))))
            return -ENOMEM;
    w->q_head = w->q_tail = UINT32_MAX;
    /* A device that failed while starting (Medusa's calibration steps
     * report no errors): its ctx is unusable. */
    if (w->on_device && (rc = kn_sync(w->kn)) < 0) {
        CM_LOG_ERROR(TAG, "device %s failed while starting: %s", kn_ctx_device(w->kn),
                     kn_ctx_error(w->kn));
        return rc;
    }
    if (w->on_device)
        CM_LOG_INFO(TAG, "device %s, weights %.2f GiB, KV pool %" PRId64 " blocks (%.2f GiB); "
                    "%s: ctx %" PRId64 ", %d sequences, %" PRId64 " tokens per step",
                    kn_ctx_device(w->kn), (double)w->weight_bytes / (1 << 30), w->n_blocks,
                    (double)eng_kv_pool_bytes(&kc) / (1 << 30), w->cfg.model_path, w->n_ctx,
                    w->cfg.max_seqs, w->cfg.max_batch_tokens);
    else
        CM_LOG_INFO(TAG, "%s: ctx %" PRId64 ", KV %" PRId64 " blocks of %d, %d sequences, %" PRId64
                    " tokens per step, %d threads",
                    w->cfg.model_path, w->n_ctx, w->n_blocks, w->cfg.block_size,
                    w->cfg.max_seqs, w->cfg.max_batch_tokens, kn_ctx_threads(w->kn));
    if (w->cm)
        CM_LOG_INFO(TAG, "rank %d of %d: %.1f MiB of weights", w->cfg.rank, w->cfg.tp,
                    (double)eng_model_shard_weight_bytes(w->m) / (1 << 20));
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
    if (w->kn) {
        kn_buf_free(w->kn, w->logits);
        kn_buf_free(w->kn, w->hidden);
        kn_buf_free(w->kn, w->ids_d);
    }
    free(w->ids);
    free(w->row);
    free(w->tk_k);
    free(w->tk_temp);
    free(w->tk_top);
    free(w->med_cost);
    free(w->med_seqs);
    free(w->med_req);
    free(w->med_res);
    eng_medusa_destroy(w->md);
    eng_medusa_tree_destroy(w->tree);
    eng_medusa_heads_close(w->mh);
    eng_ctx_destroy(w->ctx);
    eng_kv_destroy(w->kv);
    eng_model_close(w->m);
    kn_ctx_destroy(w->kn);
    ipc_region_unmap(&w->reg);
    if (w->cm) /* the others stop too: gorgond restarts the group */
        comm_abort(w->cm, w->cfg.rank == 0 ? "rank 0 stopped" : "a rank stopped");
    comm_destroy(w->cm);
    free(w->plan);
    free(w->hand_tbl);
    free(w->xfer);
    free(w->payload);
    if (w->pool)
        munmap(w->pool, w->pool_bytes);
    ipc_kv_ctl_unmap(&w->kvc);
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
    w->kvc.fd = -1;
    int rc = setup(w);
    if (rc < 0) {
        teardown(w);
        free(w);
        return rc;
    }
    struct ipc_wevt ready = {.op = IPC_WEVT_READY,
                             .arg = {(uint64_t)w->n_blocks, (uint64_t)w->cfg.max_seqs}};
    const bool leader = w->cfg.rank == 0;
    if (leader) {
        emit(w, &ready);
        emit_step_stats(w, 0);
        ipc_doorbell_notify(&w->evt);
    }
    while (!w->gone) {
        int got = 0;
        if (leader) {
            got = read_commands(w);
            if (got < 0)
                break;
            /* Under TP the other ranks replay this pass: its commands, then
             * the same admission and step. */
            if (w->cm && (w->plan_len || w->n_running || w->n_queued) && send_plan(w) < 0)
                break;
        } else if (recv_plan(w) < 0) {
            break;
        }
        admit(w);
        if (w->n_running == 0) {
            if (!leader)
                continue;
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
        if (leader)
            ipc_doorbell_notify(&w->evt);
    }
    const bool lost = w->dev_failed;
    teardown(w);
    free(w);
    return lost ? -ENOTRECOVERABLE : 0;
}
