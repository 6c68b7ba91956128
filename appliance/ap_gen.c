/* Generation in gorgond: the worker process and the requests it serves.
 *
 * gorgond owns what is cheap and per-client: validating GENERATE, encoding
 * the prompt, decoding the worker's token ids with one streaming decoder per
 * request, stop strings, the byte ring of the client's slot output and the
 * completions. The worker (gorgon-worker, engine/worker/worker.h) owns the model,
 * the KV cache, the samplers and the batching scheduler; it ends a request
 * itself on EOS/BOS and max_tokens (the same rule as eng_generate), and
 * gorgond ends it early on a stop string, a cancel or a client that went
 * away, by sending CANCEL (the worker frees the KV at its next step).
 *
 * A request holds one worker request slot ("gen" below) from submission
 * until BOTH its final completion was posted to the client AND the worker's
 * DONE for it was seen; the worker slot is reused only then, so an event is
 * never attributed to the wrong request.
 *
 * The worker is `replicas` groups of `tp` rank processes (ap_group); a
 * request runs in one of them, the least busy when it is sent.
 *
 * Disaggregated mode (docs/disaggregation.md): prefill groups and decode
 * groups over one shared KV pool (ipc/ipc_kv.h). A request starts in the
 * least busy prefill group, which streams its first token and hands the
 * prompt's KV off (HANDOFF: its block table); gorgond checks the blocks
 * against the owner table it alone writes, marks them in transit and sends
 * ADOPT to the least busy decode group, which takes them when it has room
 * and gives as many of its free blocks back (ADOPTED); those go to the
 * prefill group with RECLAIM. A hand-off that does not complete (the
 * decode group refuses, cancels or dies first) returns the prompt's blocks
 * to the prefill group the same way: blocks are never lost or shared.
 *
 * Worker death: every request its group held ends with -EIO and a message
 * saying so; nothing is retried (a half-streamed answer cannot be replayed without
 * duplicating text, and a request that streamed nothing may still have side
 * effects the client timed). The worker is restarted at once; after three
 * deaths in a row before it reported READY gorgond gives up on it and
 * GENERATE fails with -EIO.
 *
 * On a GPU (device = cuda[:N], docs/gpu.md) gorgond passes the device to
 * the worker and never touches it itself. A worker that cannot use the
 * device (ENG_WORKER_EXIT_DEVICE: no CUDA backend, no driver or device,
 * the model does not fit) is not started again: when no worker was ever
 * ready, gorgond stops with an error (its log has the worker's reason),
 * else generation is disabled. A worker whose device failed while serving
 * (ENG_WORKER_EXIT_DEVICE_LOST) is restarted like any other. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <numa.h>
#include <numaif.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "appliance/ap_int.h"
#include "common/common.h"
#include "engine/comm/comm.h"
#include "engine/model/eng_err.h"
#include "engine/model/gguf.h"
#include "engine/model/stop.h"
#include "engine/model/tokenizer.h"
#include "engine/model/tp_split.h"
#include "engine/worker/worker.h" /* its exit statuses */
#include "ipc/ipc_kv.h"

#define TAG "gorgond"
#define AP_GEN_PEND 16384u   /* text a request may hold while its client does not read
                              * (at least 4 tokens' worth for vocabularies of long pieces) */
#define AP_EVT_ENTRIES 4096u /* worker event ring */
#define AP_EVT_BURST 256u
#define AP_WORKER_MAX_EARLY_DEATHS 3
#define AP_TP_MAX 64 /* ranks of a worker group (gorgon-worker --tp) */

enum gen_state { G_FREE = 0, G_ACTIVE, G_ZOMBIE /* client side done, worker still holds it */ };

typedef struct ap_gen {
    uint8_t state;
    bool waiting;   /* admitted by gorgond, START not sent yet (fair-share queue) */
    bool in_worker; /* START sent, DONE not seen yet */
    bool final;     /* result decided; the final completion is still to be posted */
    bool listed;    /* on the flush list */
    uint32_t sess_idx, sess_gen, slot;
    uint32_t grp; /* the group whose region holds its prompt (and that runs it) */
    /* disaggregated: hand = 1 from HANDOFF until ADOPTED (the blocks, n_hand
     * of them in blocks[], are in transit from prefill group pgrp), 2 after */
    uint8_t hand;
    uint32_t pgrp, n_hand;
    int32_t *blocks; /* [max_hand] */
    uid_t uid;
    uint64_t seq;             /* submission order (FIFO within a session) */
    struct ipc_wcmd start;    /* sent when the request leaves the waiting queue */
    uint64_t user_data;
    uint32_t flags;
    eng_tok_stream ts;
    eng_stop stop;
    uint64_t t_submit, t_first, t_end;
    uint32_t n_prompt, n_gen;
    uint32_t med_steps, med_acc; /* Medusa steps / accepted tokens so far (worker's count) */
    uint32_t out_w; /* stream position in the slot's output ring */
    int32_t result;
    uint8_t finish;
    uint32_t n_pend;
    char *pend; /* [pend_cap] */
} ap_gen;

/* Requests per uid, for the per-uid cap and for fair admission: the uid
 * least recently served goes first (round-robin across uids; within a uid,
 * across its sessions; within a session, in submission order). */
typedef struct ap_uid_use {
    uid_t uid;
    uint32_t n_active;  /* requests whose client side is not over */
    uint32_t n_waiting; /* of those, not yet sent to the worker */
    uint64_t last_served;
} ap_uid_use;

/* A worker group: tp rank processes that serve as one worker (rank 0
 * talks to gorgond through the group's region; ranks 1.. only to rank 0,
 * through the comm region). gorgond runs `replicas` of them; a request is
 * served by one group from START to DONE. */
typedef struct ap_group {
    uint32_t idx;
    enum ipc_group_role role;
    pid_t pid; /* rank 0 */
    int pidfd, wake_fd;
    /* ranks 1..tp-1 (tp > 1): their pids and pidfds, and the group's comm
     * region (engine/comm); any rank's death stops and restarts the group */
    pid_t rpid[AP_TP_MAX];
    int rpidfd[AP_TP_MAX];
    int comm_fd;
    uint32_t wgen;
    ipc_region reg;
    ipc_ring cmd, evt;
    bool have_worker, ready, failed, evt_armed, pid_armed;
    bool no_device; /* failed: its worker cannot use the configured device */
    int early_deaths;
    uint32_t n_in_worker; /* requests sent to it whose DONE is not seen yet */
    uint32_t n_waiting;   /* waiting requests whose prompt is in this region */
    /* watchdog: progress_ns is the last event (every step yields one: the
     * worker resends unchanged STEP stats every 100 ms), or when the worker
     * got work while idle; spawn_ns bounds the wait for READY. */
    uint64_t spawn_ns, progress_ns, step_gap_max_ns;
    char killed_why[160]; /* set when gorgond itself killed the worker */
    uint64_t queued, running, kv_used, kv_total, batch_max, tokens_total, requests_total,
        restarts, watchdog_kills, med_limit;
    uint32_t hand_wait;      /* decode: ADOPTs sent, ADOPTED not seen */
    uint64_t handoffs_total; /* prefill: HANDOFFs; decode: ADOPTEDs */
} ap_group;

struct ap_gen_state {
    eng_tok *tok;
    char name[128];       /* general.name, else the file name without .gguf */
    char *chat_template;  /* tokenizer.chat_template, NULL if none */
    uint32_t template_len;
    int64_t n_ctx;
    size_t prompt_cap; /* bytes a connection may stage for prompts */
    int32_t n_vocab, bos;
    char *piece, *text;
    size_t piece_cap, text_cap, pend_cap;
    uint32_t n_gens;
    ap_gen *g;
    uint32_t *free_list, n_free;
    uint32_t *list, n_list; /* gens with output or a final completion to post */
    uint32_t n_active;      /* G_ACTIVE */
    ap_uid_use *uids;       /* [n_gens], n_uids in use */
    uint32_t n_uids;
    uint32_t n_waiting;     /* G_ACTIVE and waiting */
    uint64_t submit_seq, serve_seq;
    char bin[PATH_MAX]; /* gorgon-worker */
    uint32_t n_groups;  /* replicas, or prefill + decode groups */
    ap_group *grp;      /* [n_groups] (disaggregated: prefill groups first) */
    /* disaggregated: the shared KV pool (kvc.fd -1: none), one pool memfd
     * per rank index, and the owner table's authoritative copy */
    ipc_kv_ctl kvc;
    int pool_fd[AP_TP_MAX];
    uint32_t *owner;
    uint32_t n_blocks, max_hand;
    int32_t *scratch; /* [max_hand] */
    uint64_t handoffs_total;
    bool ever_ready; /* some group said READY since gorgond started */
    /* counters over all groups */
    uint64_t tokens_total, requests_total, failed_total, cancelled_total, med_steps, med_acc;
    uint64_t rate_t0, rate_tok0, rate_milli;
    bool rate_full;
};

static int worker_spawn(struct ap_server *srv, ap_group *W);

/* ---- worker process ------------------------------------------------------- */

static int find_worker(char *out, size_t cap)
{
    const char *env = getenv("GORGON_WORKER");
    if (env && *env) {
        snprintf(out, cap, "%s", env);
        return access(out, X_OK) == 0 ? 0 : -ENOENT;
    }
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    if (n <= 0)
        return -ENOENT;
    self[n] = '\0';
    char *slash = strrchr(self, '/');
    if (!slash)
        return -ENOENT;
    *slash = '\0';
    /* Beside gorgond (the build tree), else where `make install` puts it:
     * PREFIX/libexec/gorgon/ for gorgond in PREFIX/bin/. */
    if ((size_t)snprintf(out, cap, "%s/gorgon-worker", self) >= cap)
        return -ENAMETOOLONG;
    if (access(out, X_OK) == 0)
        return 0;
    if ((size_t)snprintf(out, cap, "%s/../libexec/gorgon/gorgon-worker", self) >= cap)
        return -ENAMETOOLONG;
    return access(out, X_OK) == 0 ? 0 : -ENOENT;
}

/* io_uring tags of a group's polls: the group and the rank in the index,
 * its incarnation in the generation (a poll of a group since restarted is
 * ignored). */
static uint64_t grp_ud(enum ap_tag tag, const ap_group *W, int rank)
{
    return ap_ud(tag, W->wgen, W->idx * AP_TP_MAX + (uint32_t)rank);
}

static void arm_pid(struct ap_server *srv, ap_group *W)
{
    struct io_uring_sqe *sqe = ap_get_sqe(srv);
    if (!sqe)
        return;
    io_uring_prep_poll_add(sqe, W->pidfd, POLLIN);
    io_uring_sqe_set_data64(sqe, grp_ud(AP_TAG_WK_PID, W, 0));
    W->pid_armed = true;
}

static uint32_t pow2_at_least(uint32_t v)
{
    uint32_t p = 2;
    while (p < v)
        p *= 2;
    return p;
}

static void arm_rank_pid(struct ap_server *srv, ap_group *W, int r)
{
    struct io_uring_sqe *sqe = ap_get_sqe(srv);
    if (!sqe)
        return;
    io_uring_prep_poll_add(sqe, W->rpidfd[r], POLLIN);
    io_uring_sqe_set_data64(sqe, grp_ud(AP_TAG_WK_PID, W, r));
}

/* Kill and reap ranks 1.. of the group and drop its comm region. */
static void stop_ranks(ap_group *W)
{
    for (int r = 1; r < AP_TP_MAX; r++) {
        if (W->rpid[r] > 0) {
            kill(W->rpid[r], SIGKILL);
            waitpid(W->rpid[r], NULL, 0);
        }
        if (W->rpidfd[r] >= 0)
            close(W->rpidfd[r]);
        W->rpid[r] = 0;
        W->rpidfd[r] = -1;
    }
    if (W->comm_fd >= 0)
        close(W->comm_fd);
    W->comm_fd = -1;
}

/* The CPUs rank r of group grp is pinned to: share grp * tp + r of
 * cfg->cpus split evenly among all ranks of all groups; 0 when no list is
 * configured (the ranks then float over gorgond's CPUs: pinning on a
 * shared host only moves the contention, docs/decisions.md). */
static int rank_cpus(const ap_config *cfg, uint32_t grp, int r, cpu_set_t *set)
{
    int list[1024];
    const int ranks = cfg->tp * ap_config_groups(cfg);
    int n = cfg->cpus[0] ? ap_cpu_list_parse(cfg->cpus, list, 1024) : 0;
    if (n < ranks) /* (checked at start: a list has a CPU per rank) */
        return 0;
    const int k = n / ranks, share = (int)grp * cfg->tp + r;
    CPU_ZERO(set);
    for (int i = share * k; i < (share + 1) * k; i++)
        CPU_SET(list[i], set);
    return k;
}

#define AP_NODE_MAX 1024 /* nodes a memory policy mask below covers */

/* The NUMA node all of set's CPUs are on; -1 when they span several, or
 * the machine has one node (nothing to bind). */
static int cpus_node(const cpu_set_t *set)
{
    if (numa_available() < 0 || numa_num_configured_nodes() < 2)
        return -1;
    int node = -1;
    for (int c = 0; c < CPU_SETSIZE; c++) {
        if (!CPU_ISSET(c, set))
            continue;
        int n = numa_node_of_cpu(c);
        if (n < 0 || n >= AP_NODE_MAX || (node >= 0 && n != node))
            return -1;
        node = n;
    }
    return node;
}

/* Fork and exec rank r of worker group W (rank 0: the region at fd 3, the
 * wake eventfd at fd 4; with tp > 1 the comm region at fd 5); its pid or
 * -errno. */
static pid_t spawn_rank(struct ap_server *srv, ap_group *W, int r)
{
    struct ap_gen_state *G = srv->gen;
    const ap_config *cfg = &srv->cfg;
    cpu_set_t set;
    const int ncpu = rank_cpus(cfg, W->idx, r, &set);
    /* A rank pinned to one node's CPUs gets its memory there (weights it
     * packs, KV, activations): preferred, not bound, so that a full node
     * spills over rather than the rank being killed. */
    const int node = ncpu > 0 ? cpus_node(&set) : -1;
    const int word_bits = 8 * (int)sizeof(unsigned long);
    unsigned long nodemask[AP_NODE_MAX / (8 * sizeof(unsigned long))] = {0};
    if (node >= 0) {
        nodemask[node / word_bits] |= 1ul << (node % word_bits);
        CM_LOG_INFO(TAG, "worker group %u rank %d: memory on NUMA node %d (its CPUs' node)",
                    W->idx, r, node);
    }
    /* threads 0 with several ranks: each rank takes its share of the CPUs */
    const int ranks = cfg->tp * ap_config_groups(cfg), usable = cm_cpus_usable();
    const int threads = cfg->threads > 0 || ranks == 1
                            ? cfg->threads
                            : (ncpu > 0 ? ncpu : (usable / ranks > 0 ? usable / ranks : 1));
    char a_threads[16], a_kv[24], a_seqs[16], a_batch[16], a_parent[16], a_wake[16];
    char a_mbatch[16], a_tp[16], a_rank[16], a_groups[16], a_owner[16], a_kvf[32], a_step[24];
    snprintf(a_threads, sizeof(a_threads), "%d", threads);
    snprintf(a_kv, sizeof(a_kv), "%" PRId64, cfg->kv_blocks);
    snprintf(a_seqs, sizeof(a_seqs), "%u", cfg->max_seqs);
    snprintf(a_batch, sizeof(a_batch), "%u", cfg->batch_tokens);
    snprintf(a_parent, sizeof(a_parent), "%d", (int)getpid());
    snprintf(a_wake, sizeof(a_wake), "%d", W->wake_fd >= 0 ? 4 : -1);
    snprintf(a_mbatch, sizeof(a_mbatch), "%u", cfg->medusa_max_batch);
    snprintf(a_tp, sizeof(a_tp), "%d", cfg->tp);
    snprintf(a_rank, sizeof(a_rank), "%d", r);
    snprintf(a_groups, sizeof(a_groups), "%d", ap_config_groups(cfg));
    snprintf(a_owner, sizeof(a_owner), "%u", W->idx);
    snprintf(a_kvf, sizeof(a_kvf), "%.15g", cfg->kv_fraction);
    /* (the longest line, TP + disaggregated + Medusa, has 49 entries) */
    const char *argv[64] = {G->bin,          "--model",     cfg->model,   "--threads", a_threads,
                            "--kv-blocks",   a_kv,          "--max-seqs", a_seqs,
                            "--batch-tokens", a_batch,      "--parent",   a_parent,
                            "--log-level",   cm_log_level_name(cm_log_get_level()),
                            "--device",      cfg->device,   "--kv-fraction", a_kvf};
    int argc = 0;
    while (argv[argc])
        argc++;
    if (cfg->allow_tf32)
        argv[argc++] = "--allow-tf32";
    if (r == 0) {
        argv[argc++] = "--region-fd";
        argv[argc++] = "3";
        argv[argc++] = "--wake-fd";
        argv[argc++] = a_wake;
    }
    if (cfg->tp > 1) {
        argv[argc++] = "--tp";
        argv[argc++] = a_tp;
        argv[argc++] = "--rank";
        argv[argc++] = a_rank;
        argv[argc++] = "--comm-fd";
        argv[argc++] = "5";
        /* the ranks' collectives give up when gorgond's watchdog would:
         * one setting for the group (0 there: no watchdog, no limit) */
        snprintf(a_step, sizeof(a_step), "%lld",
                 cfg->worker_timeout_ms > 0 ? (long long)cfg->worker_timeout_ms : -1ll);
        argv[argc++] = "--step-timeout-ms";
        argv[argc++] = a_step;
        if (ncpu > 0)
            argv[argc++] = "--pinned"; /* its CPUs are its own: collectives may spin */
        if (ap_config_groups(cfg) > 1) {
            argv[argc++] = "--groups";
            argv[argc++] = a_groups;
        }
    }
    if (W->role != IPC_GROUP_COLOCATED) {
        argv[argc++] = "--role";
        argv[argc++] = W->role == IPC_GROUP_PREFILL ? "prefill" : "decode";
        argv[argc++] = "--kv-ctl-fd";
        argv[argc++] = "6";
        argv[argc++] = "--kv-pool-fd";
        argv[argc++] = "7";
        argv[argc++] = "--kv-owner";
        argv[argc++] = a_owner;
    }
    if (cfg->medusa[0] && W->role != IPC_GROUP_PREFILL) {
        argv[argc++] = "--medusa";
        argv[argc++] = cfg->medusa;
        argv[argc++] = "--medusa-max-batch";
        argv[argc++] = a_mbatch;
        if (cfg->medusa_tree[0]) {
            argv[argc++] = "--medusa-tree";
            argv[argc++] = cfg->medusa_tree;
        }
    }
    CM_ASSERT(argc < (int)(sizeof(argv) / sizeof(argv[0])));
    argv[argc] = NULL;
    pid_t pid = fork();
    if (pid < 0) {
        int rc = cm_neg_errno();
        CM_LOG_ERROR(TAG, "fork for worker group %u rank %d: %s", W->idx, r, cm_strerror(rc));
        return rc;
    }
    if (pid == 0) {
        /* Child: undo what gorgond set for itself, then put the region at fd
         * 3, the wake eventfd at fd 4 and the comm region at fd 5 (dup2
         * clears close-on-exec). */
        sigset_t all;
        sigfillset(&all);
        sigprocmask(SIG_UNBLOCK, &all, NULL);
        signal(SIGPIPE, SIG_DFL);
        int rfd = r == 0 ? fcntl(W->reg.fd, F_DUPFD_CLOEXEC, 10) : -1;
        int wfd = r == 0 && W->wake_fd >= 0 ? fcntl(W->wake_fd, F_DUPFD_CLOEXEC, 10) : -1;
        int cfd = W->comm_fd >= 0 ? fcntl(W->comm_fd, F_DUPFD_CLOEXEC, 10) : -1;
        const bool kv = W->role != IPC_GROUP_COLOCATED;
        int kfd = kv ? fcntl(G->kvc.fd, F_DUPFD_CLOEXEC, 10) : -1;
        int pfd = kv ? fcntl(G->pool_fd[r], F_DUPFD_CLOEXEC, 10) : -1;
        if ((r == 0 && (rfd < 0 || dup2(rfd, 3) < 0)) || (wfd >= 0 && dup2(wfd, 4) < 0) ||
            (cfd >= 0 && dup2(cfd, 5) < 0) ||
            (kv && (kfd < 0 || pfd < 0 || dup2(kfd, 6) < 0 || dup2(pfd, 7) < 0)))
            _exit(126);
        if (ncpu > 0 && sched_setaffinity(0, sizeof set, &set) < 0)
            _exit(126);
        if (node >= 0 && set_mempolicy(MPOL_PREFERRED, nodemask, AP_NODE_MAX + 1) < 0)
            _exit(126);
        execv(G->bin, (char *const *)argv);
        _exit(127);
    }
    return pid;
}

static int worker_spawn(struct ap_server *srv, ap_group *W)
{
    struct ap_gen_state *G = srv->gen;
    const ap_config *cfg = &srv->cfg;
    W->wgen++;
    W->ready = false;
    W->spawn_ns = cm_now_ns();
    W->killed_why[0] = '\0';
    memset(&W->reg, 0, sizeof(W->reg));
    W->reg.fd = -1;
    size_t in_bytes = ((size_t)G->n_ctx * sizeof(int32_t) + 63) & ~(size_t)63;
    ipc_region_cfg rc_cfg = {
        /* START (or ADOPT), CANCEL and RECLAIM at most once per request
         * between two DONEs: the command ring can never fill. */
        .sq_entries = pow2_at_least(4 * G->n_gens),
        .cq_entries = AP_EVT_ENTRIES,
        .n_slots = G->n_gens,
        .slot_in_bytes = (uint32_t)in_bytes,
        .slot_out_bytes = 64,
        .numa_node = -1,
        .name = "gorgon-worker",
    };
    int rc = ipc_region_create(&W->reg, &rc_cfg);
    if (rc < 0) {
        CM_LOG_ERROR(TAG, "worker group %u region: %s", W->idx, cm_strerror(rc));
        return rc;
    }
    if ((rc = ipc_region_sq(&W->reg, IPC_RING_PRODUCER, &W->cmd)) < 0 ||
        (rc = ipc_region_cq(&W->reg, IPC_RING_CONSUMER, &W->evt)) < 0)
        goto fail;
    W->wake_fd = -1;
    if (!srv->futex_uring) {
        W->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (W->wake_fd < 0) {
            rc = cm_neg_errno();
            goto fail;
        }
        if ((rc = ipc_ring_set_wake_fd(&W->evt, W->wake_fd)) < 0)
            goto fail;
    }
    if (cfg->tp > 1) {
        char why[256];
        W->comm_fd = comm_shm_create(&(comm_shm_cfg){.n_ranks = cfg->tp}, why, sizeof why);
        if (W->comm_fd < 0) {
            rc = W->comm_fd;
            W->comm_fd = -1;
            CM_LOG_ERROR(TAG, "worker group %u comm region: %s", W->idx, why);
            goto fail;
        }
    }
    /* Ranks 1.. first: rank 0 waits for them to join before it is ready. */
    for (int r = cfg->tp - 1; r >= 0; r--) {
        pid_t pid = spawn_rank(srv, W, r);
        if (pid < 0) {
            rc = (int)pid;
            goto fail;
        }
        int pfd = (int)syscall(SYS_pidfd_open, pid, 0);
        if (pfd < 0) {
            rc = cm_neg_errno();
            CM_LOG_ERROR(TAG, "pidfd_open: %s", cm_strerror(rc));
            kill(pid, SIGKILL);
            waitpid(pid, NULL, 0);
            goto fail;
        }
        if (r == 0) {
            W->pid = pid;
            W->pidfd = pfd;
        } else {
            W->rpid[r] = pid;
            W->rpidfd[r] = pfd;
        }
    }
    /* The worker has its own fd now. */
    close(W->reg.fd);
    W->reg.fd = -1;
    W->have_worker = true;
    W->evt_armed = false;
    arm_pid(srv, W);
    for (int r = 1; r < cfg->tp; r++)
        arm_rank_pid(srv, W, r);
    char grp[48] = "";
    if (ap_config_groups(cfg) > 1)
        snprintf(grp, sizeof grp, " %u%s", W->idx,
                 W->role == IPC_GROUP_PREFILL  ? " (prefill)"
                 : W->role == IPC_GROUP_DECODE ? " (decode)"
                                               : "");
    if (cfg->tp > 1)
        CM_LOG_INFO(TAG, "worker group%s of %d ranks started (rank 0: pid %d): %s", grp, cfg->tp,
                    (int)W->pid, cfg->model);
    else
        CM_LOG_INFO(TAG, "worker%s pid %d started: %s", grp, (int)W->pid, cfg->model);
    return 0;
fail:
    stop_ranks(W);
    if (W->pid > 0) {
        kill(W->pid, SIGKILL);
        waitpid(W->pid, NULL, 0);
        close(W->pidfd);
        W->pid = 0;
        W->pidfd = -1;
    }
    if (W->wake_fd >= 0)
        close(W->wake_fd);
    W->wake_fd = -1;
    ipc_region_unmap(&W->reg);
    return rc;
}

static void push_cmd(ap_group *W, const struct ipc_wcmd *c)
{
    int rc = ipc_ring_push(&W->cmd, c);
    /* The ring is sized so that it cannot be full (see worker_spawn); a
     * failure means the worker scribbled on the head: it is killed and
     * restarted, which fails its requests. */
    if (rc < 0) {
        CM_LOG_ERROR(TAG, "worker group %u command ring: %s; killing the worker", W->idx,
                     cm_strerror(rc));
        if (W->pid > 0)
            kill(W->pid, SIGKILL);
        return;
    }
    ipc_doorbell_notify(&W->cmd);
}

static void send_cancel(struct ap_gen_state *G, uint32_t gi)
{
    ap_group *W = &G->grp[G->g[gi].grp];
    if (!W->have_worker || !G->g[gi].in_worker)
        return;
    struct ipc_wcmd c = {.op = IPC_WCMD_CANCEL, .req = gi};
    push_cmd(W, &c);
}

/* in_worker transitions, counted for the watchdog: an idle worker that
 * gets work starts its step clock now, not at its last step. */
static void set_in_worker(struct ap_gen_state *G, ap_gen *g, bool on)
{
    ap_group *W = &G->grp[g->grp];
    if (g->in_worker == on)
        return;
    g->in_worker = on;
    if (on && W->n_in_worker++ == 0)
        W->progress_ns = cm_now_ns();
    else if (!on)
        W->n_in_worker--;
}

/* ---- requests --------------------------------------------------------------- */

static void list_add(struct ap_gen_state *G, uint32_t gi)
{
    if (G->g[gi].listed)
        return;
    G->g[gi].listed = true;
    G->list[G->n_list++] = gi;
}

static ap_uid_use *uid_use(struct ap_gen_state *G, uid_t uid)
{
    for (uint32_t i = 0; i < G->n_uids; i++)
        if (G->uids[i].uid == uid)
            return &G->uids[i];
    return NULL;
}

/* Off the waiting queue: sent to the worker, or decided without it. */
static void unwait(struct ap_gen_state *G, ap_gen *g)
{
    if (!g->waiting)
        return;
    g->waiting = false;
    G->n_waiting--;
    G->grp[g->grp].n_waiting--;
    ap_uid_use *u = uid_use(G, g->uid);
    if (u)
        u->n_waiting--;
}

/* The client side of an active request is over (final posted, cancelled,
 * client gone): it no longer counts against its uid and session, and a
 * request still waiting never goes to the worker. */
static void leave_active(struct ap_server *srv, ap_gen *g)
{
    struct ap_gen_state *G = srv->gen;
    G->n_active--;
    unwait(G, g);
    ap_uid_use *u = uid_use(G, g->uid);
    if (u && --u->n_active == 0)
        *u = G->uids[--G->n_uids]; /* swap-remove */
    ap_session *s = &srv->sess[g->sess_idx];
    if (s->gen == g->sess_gen && s->n_gen_active)
        s->n_gen_active--;
}

static void gen_free(struct ap_server *srv, uint32_t gi)
{
    struct ap_gen_state *G = srv->gen;
    ap_gen *g = &G->g[gi];
    if (g->state == G_ACTIVE)
        leave_active(srv, g);
    g->state = G_FREE;
    g->final = false;
    g->n_pend = 0;
    G->free_list[G->n_free++] = gi;
}

/* Client side of the request is over (final posted or client gone). */
static void gen_client_done(struct ap_server *srv, uint32_t gi)
{
    ap_gen *g = &srv->gen->g[gi];
    if (g->in_worker) {
        if (g->state == G_ACTIVE)
            leave_active(srv, g);
        g->state = G_ZOMBIE;
        g->final = false;
        g->n_pend = 0;
    } else {
        gen_free(srv, gi);
    }
}

static void pend_text(ap_gen *g, const char *s, size_t n)
{
    memcpy(g->pend + g->n_pend, s, n);
    g->n_pend += (uint32_t)n;
}

/* Decide the result; the completion is posted by flush(). A message
 * replaces whatever text was still pending (the request failed). */
static void finalize(struct ap_gen_state *G, uint32_t gi, int32_t result, enum ipc_finish fin,
                     const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static void finalize(struct ap_gen_state *G, uint32_t gi, int32_t result, enum ipc_finish fin,
                     const char *fmt, ...)
{
    ap_gen *g = &G->g[gi];
    if (g->state != G_ACTIVE || g->final)
        return;
    g->final = true;
    unwait(G, g); /* decided: it must not start in the worker any more */
    g->result = result;
    g->finish = (uint8_t)fin;
    g->t_end = cm_now_ns();
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(g->pend, G->pend_cap, fmt, ap);
        va_end(ap);
        g->n_pend = n < 0 ? 0 : (uint32_t)((size_t)n < G->pend_cap ? (size_t)n : G->pend_cap - 1);
    }
    if (result < 0 && fin == IPC_FINISH_ERROR)
        G->failed_total++;
    else if (fin == IPC_FINISH_CANCELLED)
        G->cancelled_total++;
    list_add(G, gi);
}

/* Post what fits of a request's pending output and, once everything is
 * out, its final completion. */
static void flush(struct ap_server *srv, uint32_t gi)
{
    struct ap_gen_state *G = srv->gen;
    ap_gen *g = &G->g[gi];
    if (g->state != G_ACTIVE)
        return;
    ap_session *s = &srv->sess[g->sess_idx];
    if (s->state != AP_SESS_LIVE || s->gen != g->sess_gen) {
        gen_client_done(srv, gi); /* cannot happen: session close detaches first */
        return;
    }
    const uint32_t cap = s->reg.layout.slot_out_bytes;
    uint8_t *out = ipc_region_slot_out(&s->reg, g->slot);
    struct ipc_slot_hdr *hdr = ipc_region_slot(&s->reg, g->slot);
    uint32_t consumed = atomic_load_explicit((_Atomic uint32_t *)&hdr->out_consumed,
                                             memory_order_acquire);
    uint32_t used = g->out_w - consumed;
    if (used > cap) {
        /* out_consumed is the client's: a value past what was written is a
         * broken client, like a bad ring index. */
        srv->ctr.protocol_errors++;
        CM_LOG_WARN(TAG, "pid %d: slot %u out_consumed %u is past the %u bytes written",
                    (int)s->pid, g->slot, consumed, g->out_w);
        ap_session_close(srv, s, "protocol error (out_consumed)");
        return;
    }
    uint32_t room = cap - used;
    bool posted = false;
    for (;;) {
        uint32_t off = g->out_w % cap;
        uint32_t k, skip = 0;
        bool last;
        if (g->final && g->result < 0) {
            /* A failure's message goes whole into the final completion,
             * never partly as text chunks (the client would read its start
             * as generated text): where the stream stands when it fits
             * before the ring's end, else from offset 0, the tail skipped;
             * cut to the ring's size. It waits for room like text does. */
            k = g->n_pend < cap ? g->n_pend : cap;
            if (k > cap - off) {
                skip = cap - off;
                off = 0;
            }
            if (skip + k > room)
                break;
            g->n_pend = k;
            last = true;
        } else {
            k = g->n_pend;
            if (k > room)
                k = room;
            if (k > cap - off)
                k = cap - off;
            if (g->flags & IPC_GEN_F_OUT_IDS)
                k &= ~3u;
            last = g->final && k == g->n_pend;
            if (k == 0 && !last)
                break;
        }
        struct ipc_cqe c = {.opcode = IPC_OP_GENERATE, .slot = g->slot,
                            .user_data = g->user_data, .out_off = off, .out_len = k};
        uint32_t pos = s->cq.local;
        if (last) {
            c.result = g->result;
            c.arg[0] = g->finish | (uint64_t)(g->med_acc & 0xffffffu) << 8 |
                       (uint64_t)g->med_steps << 32;
            c.arg[1] = (uint64_t)g->n_prompt | (uint64_t)g->n_gen << 32;
            c.arg[2] = g->t_first ? g->t_first - g->t_submit : 0;
            c.arg[3] = g->t_end - g->t_submit;
        } else {
            c.flags = IPC_CQE_F_MORE;
            c.result = (int32_t)k;
            c.arg[0] = g->n_gen;
        }
        if (k)
            memcpy(out + off, g->pend, k);
        int rc = ipc_ring_push(&s->cq, &c);
        if (rc == -EAGAIN)
            break; /* the client does not reap: retried on the next pass */
        if (rc < 0) {
            srv->ctr.protocol_errors++;
            ap_session_close(srv, s, "protocol error (CQ index)");
            return;
        }
        posted = true;
        g->out_w += skip + k;
        room -= skip + k;
        g->n_pend -= k;
        memmove(g->pend, g->pend + k, g->n_pend);
        if (last) {
            s->slot_gen[g->slot] = -1;
            s->slot_used[g->slot] = 1;
            s->slot_busy_until[g->slot] = pos + 1;
            gen_client_done(srv, gi);
            break;
        }
    }
    if (posted)
        ipc_doorbell_notify(&s->cq);
}

static void flush_list(struct ap_server *srv)
{
    struct ap_gen_state *G = srv->gen;
    uint32_t keep = 0;
    for (uint32_t i = 0; i < G->n_list; i++) {
        uint32_t gi = G->list[i];
        flush(srv, gi);
        ap_gen *g = &G->g[gi];
        if (g->state == G_ACTIVE && (g->n_pend || g->final))
            G->list[keep++] = gi;
        else
            g->listed = false;
    }
    G->n_list = keep;
}

/* The group that takes the next waiting request: of those with a worker
 * and room, the one with the fewest requests (ready ones first, then the
 * lowest index); NULL when none has room. A group's room is what it can
 * run plus one, ready for the next free place, so its own FIFO never
 * stands between a newcomer and that place. What it can run: max_seqs, or,
 * when its last report had requests waiting for KV room, what it was
 * running then (a stale report only delays a dispatch until the next DONE:
 * n_in_worker is exact and drops below it). */
static ap_group *group_with_room(struct ap_server *srv)
{
    struct ap_gen_state *G = srv->gen;
    ap_group *best = NULL;
    for (uint32_t i = 0; i < G->n_groups; i++) {
        ap_group *W = &G->grp[i];
        uint64_t room = W->queued ? W->running : srv->cfg.max_seqs;
        if (!W->have_worker || W->n_in_worker >= room + 1 || W->role == IPC_GROUP_DECODE)
            continue;
        if (!best || (W->ready && !best->ready) ||
            (W->ready == best->ready && W->n_in_worker < best->n_in_worker))
            best = W;
    }
    return best;
}

/* The group whose region a new request's prompt goes to (where it will
 * most likely run): the one with a worker and the fewest requests sent or
 * waiting; NULL when no group has a worker. */
static ap_group *group_for_prompt(struct ap_gen_state *G)
{
    ap_group *best = NULL;
    for (uint32_t i = 0; i < G->n_groups; i++) {
        ap_group *W = &G->grp[i];
        if (W->have_worker && W->role != IPC_GROUP_DECODE &&
            (!best || W->n_in_worker + W->n_waiting < best->n_in_worker + best->n_waiting))
            best = W;
    }
    return best;
}

/* Waiting request g now belongs to group W: its prompt moves there. */
static void move_prompt(struct ap_gen_state *G, ap_gen *g, ap_group *W)
{
    if (g->grp == W->idx)
        return;
    uint32_t gi = (uint32_t)(g - G->g);
    ap_group *from = &G->grp[g->grp];
    memcpy(ipc_region_slot_in(&W->reg, gi), ipc_region_slot_in(&from->reg, gi),
           (size_t)g->start.n_prompt * sizeof(int32_t));
    if (g->waiting) {
        from->n_waiting--;
        W->n_waiting++;
    }
    g->grp = W->idx;
}

/* Send waiting requests to the groups while they have room for them: the
 * uid served least recently first, then its session served least
 * recently, then that session's oldest request, to the least busy group
 * (group_with_room). */
static void dispatch_waiting(struct ap_server *srv)
{
    struct ap_gen_state *G = srv->gen;
    ap_group *W;
    while (G->n_waiting && (W = group_with_room(srv))) {
        ap_uid_use *u = NULL;
        for (uint32_t i = 0; i < G->n_uids; i++)
            if (G->uids[i].n_waiting && (!u || G->uids[i].last_served < u->last_served))
                u = &G->uids[i];
        if (!u)
            break; /* counts out of step: cannot happen */
        ap_gen *best = NULL;
        uint64_t best_sess = 0;
        for (uint32_t gi = 0; gi < G->n_gens; gi++) {
            ap_gen *g = &G->g[gi];
            if (!g->waiting || g->uid != u->uid)
                continue;
            uint64_t sl = srv->sess[g->sess_idx].last_served;
            if (!best || sl < best_sess || (sl == best_sess && g->seq < best->seq)) {
                best = g;
                best_sess = sl;
            }
        }
        if (!best)
            break;
        move_prompt(G, best, W);
        unwait(G, best);
        u->last_served = srv->sess[best->sess_idx].last_served = ++G->serve_seq;
        set_in_worker(G, best, true);
        W->requests_total++;
        push_cmd(W, &best->start);
    }
}

/* Medusa counts of a TOKEN event: the worker's running totals for the
 * request (they only grow; a smaller value is a worker bug and ignored). */
static void on_medusa(struct ap_gen_state *G, uint32_t gi, uint64_t steps, uint64_t acc)
{
    ap_gen *g = &G->g[gi];
    if (g->state != G_ACTIVE || g->final || steps < g->med_steps || acc < g->med_acc ||
        steps > UINT32_MAX || acc > UINT32_MAX)
        return;
    G->med_steps += steps - g->med_steps;
    G->med_acc += acc - g->med_acc;
    g->med_steps = (uint32_t)steps;
    g->med_acc = (uint32_t)acc;
}

/* One token from the worker. */
static void on_token(struct ap_gen_state *G, uint32_t gi, int32_t t, uint32_t n_gen)
{
    ap_gen *g = &G->g[gi];
    if (g->state != G_ACTIVE || g->final)
        return; /* ended here already (stop string, cancel): the worker catches up */
    if (!g->t_first)
        g->t_first = cm_now_ns();
    g->n_gen = n_gen;
    if (t < 0 || t >= G->n_vocab) {
        finalize(G, gi, -EIO, IPC_FINISH_ERROR, "worker sent token id %d out of range", t);
        send_cancel(G, gi);
        return;
    }
    bool end = t == G->bos || eng_tok_is_eog(G->tok, t);
    bool ids = (g->flags & IPC_GEN_F_OUT_IDS) != 0;
    size_t room = G->pend_cap - g->n_pend;
    if (room < G->text_cap + ENG_TOK_STREAM_SLACK + sizeof(int32_t)) {
        finalize(G, gi, -ENOBUFS, IPC_FINISH_ERROR,
                 "client did not read its output: %u bytes pending", g->n_pend);
        send_cancel(G, gi);
        return;
    }
    if (ids && !end)
        pend_text(g, (const char *)&t, sizeof(t));
    size_t tlen = 0;
    int fin;
    if (end) {
        tlen = eng_stop_flush(&g->stop, G->text, G->text_cap);
        fin = ENG_FINISH_EOS;
    } else {
        int64_t plen = eng_tok_stream_push(G->tok, &g->ts, t, G->piece, G->piece_cap);
        fin = eng_stop_feed(&g->stop, t, G->piece, plen > 0 ? (size_t)plen : 0, G->text,
                            G->text_cap, &tlen);
        if (fin < 0) {
            finalize(G, gi, fin, IPC_FINISH_ERROR, "stop-string filter failed");
            send_cancel(G, gi);
            return;
        }
    }
    if (!ids)
        pend_text(g, G->text, tlen);
    if (fin == ENG_FINISH_NONE) {
        list_add(G, gi);
        return;
    }
    if (fin != ENG_FINISH_STOP && !ids) {
        /* Like eng_generate: an incomplete UTF-8 tail becomes U+FFFD. */
        int64_t f = eng_tok_stream_flush(G->tok, &g->ts, G->piece, G->piece_cap);
        if (f > 0)
            pend_text(g, G->piece, (size_t)f);
    }
    enum ipc_finish why = fin == ENG_FINISH_EOS    ? IPC_FINISH_EOS
                          : fin == ENG_FINISH_STOP ? IPC_FINISH_STOP
                                                   : IPC_FINISH_LENGTH;
    finalize(G, gi, 0, why, NULL);
    if (why == IPC_FINISH_STOP)
        send_cancel(G, gi); /* EOS and LENGTH: the worker ends it by the same rule */
}

/* ---- disaggregated: KV hand-off -------------------------------------------- */

static void set_owner(struct ap_gen_state *G, const int32_t *blocks, uint32_t n, uint32_t owner)
{
    for (uint32_t i = 0; i < n; i++) {
        G->owner[blocks[i]] = owner;
        __atomic_store_n(&G->kvc.owner[blocks[i]], owner, __ATOMIC_RELEASE);
    }
}

/* Send blocks[0..n) to prefill group P (RECLAIM of request gi): they are
 * P's again, and P's hold on gi ends. A group without a worker gets
 * nothing: its next start finds them in owner[]. */
static void reclaim(struct ap_gen_state *G, uint32_t P, uint32_t gi, const int32_t *blocks,
                    uint32_t n)
{
    set_owner(G, blocks, n, P);
    ap_group *W = &G->grp[P];
    if (!W->have_worker)
        return;
    struct ipc_kv_area *a = ipc_kv_area(&G->kvc, IPC_KV_IN, P, gi);
    memcpy(a->blocks, blocks, (size_t)n * sizeof(int32_t));
    a->n_blocks = n;
    struct ipc_wcmd c = {.op = IPC_WCMD_RECLAIM, .req = gi, .n_blocks = n};
    push_cmd(W, &c);
}

/* A hand-off that will not complete (the decode group refused, cancelled
 * or lost the request before adopting it): the prompt's blocks go back. */
static void hand_back(struct ap_gen_state *G, ap_gen *g)
{
    if (g->hand != 1)
        return;
    G->grp[g->grp].hand_wait--;
    g->hand = 0;
    reclaim(G, g->pgrp, (uint32_t)(g - G->g), g->blocks, g->n_hand);
}

/* Copy and check a worker's OUT area for request gi: n blocks, each in the
 * pool, distinct and owned by group `owner` per gorgond's table. The
 * blocks land in out[]; false (message logged) when anything is off. */
static bool take_blocks(struct ap_gen_state *G, const ap_group *W, uint32_t gi, uint64_t n,
                        uint32_t owner, int32_t *out, uint64_t *rng)
{
    const struct ipc_kv_area *a = ipc_kv_area(&G->kvc, IPC_KV_OUT, 0, gi);
    uint32_t an = a->n_blocks;
    if (an != n || n > G->max_hand) {
        CM_LOG_ERROR(TAG, "worker group %u: hand-off of request %u names %" PRIu64 " blocks, "
                     "its area %u (at most %u)", W->idx, gi, n, an, G->max_hand);
        return false;
    }
    memcpy(out, a->blocks, (size_t)n * sizeof(int32_t));
    if (rng)
        memcpy(rng, a->rng, sizeof a->rng);
    uint32_t i = 0;
    for (; i < n; i++) {
        const int32_t b = out[i];
        if (b < 0 || (uint32_t)b >= G->n_blocks || G->owner[b] != owner)
            break;
        G->owner[b] = IPC_KV_TRANSIT - 1; /* marks duplicates; restored below */
    }
    for (uint32_t j = 0; j < i; j++)
        G->owner[out[j]] = owner;
    if (i < n) {
        CM_LOG_ERROR(TAG, "worker group %u: hand-off of request %u names block %d, which is "
                     "out of the pool, listed twice or not the group's", W->idx, gi, out[i]);
        return false;
    }
    return true;
}

/* The decode group that adopts the next hand-off: of those with a worker,
 * the one with the fewest requests; NULL when none has one. */
static ap_group *decode_group(struct ap_gen_state *G)
{
    ap_group *best = NULL;
    for (uint32_t i = 0; i < G->n_groups; i++) {
        ap_group *W = &G->grp[i];
        if (W->role == IPC_GROUP_DECODE && W->have_worker &&
            (!best || W->n_in_worker < best->n_in_worker))
            best = W;
    }
    return best;
}

/* HANDOFF from prefill group P: the request moves to a decode group. */
static void on_handoff(struct ap_server *srv, ap_group *P, const struct ipc_wevt *e)
{
    struct ap_gen_state *G = srv->gen;
    const uint32_t gi = e->req;
    ap_gen *g = &G->g[gi];
    uint64_t rng[4];
    if (P->role != IPC_GROUP_PREFILL ||
        !take_blocks(G, P, gi, e->arg[1], P->idx, g->blocks, rng) ||
        e->arg[0] != g->start.n_prompt) {
        CM_LOG_ERROR(TAG, "worker group %u: bad HANDOFF of request %u; killing the worker",
                     P->idx, gi);
        if (P->pid > 0)
            kill(P->pid, SIGKILL); /* its death fails the request */
        return;
    }
    const uint32_t n = (uint32_t)e->arg[1];
    P->handoffs_total++;
    G->handoffs_total++;
    set_in_worker(G, g, false); /* P's part is over (its hold ends with RECLAIM) */
    ap_group *D = g->state == G_ACTIVE && !g->final ? decode_group(G) : NULL;
    if (!D) {
        reclaim(G, P->idx, gi, g->blocks, n);
        if (g->state == G_ZOMBIE)
            gen_free(srv, gi);
        else
            finalize(G, gi, -EIO, IPC_FINISH_ERROR,
                     "no decode group is running to continue this request");
        return;
    }
    set_owner(G, g->blocks, n, IPC_KV_TRANSIT);
    g->hand = 1;
    g->pgrp = P->idx;
    g->n_hand = n;
    struct ipc_kv_area *a = ipc_kv_area(&G->kvc, IPC_KV_IN, D->idx, gi);
    memcpy(a->rng, rng, sizeof rng);
    memcpy(a->blocks, g->blocks, (size_t)n * sizeof(int32_t));
    a->n_blocks = n;
    a->kv_len = (uint32_t)e->arg[0];
    move_prompt(G, g, D);
    D->hand_wait++;
    D->requests_total++;
    set_in_worker(G, g, true);
    struct ipc_wcmd c = g->start;
    c.op = IPC_WCMD_ADOPT;
    c.first = e->tokens[0];
    c.n_blocks = n;
    push_cmd(D, &c);
}

/* ADOPTED from decode group D: the blocks it gave in exchange go to the
 * request's prefill group. */
static void on_adopted(struct ap_server *srv, ap_group *D, const struct ipc_wevt *e)
{
    struct ap_gen_state *G = srv->gen;
    const uint32_t gi = e->req;
    ap_gen *g = &G->g[gi];
    if (g->hand != 1 || e->arg[1] != g->n_hand ||
        !take_blocks(G, D, gi, e->arg[1], D->idx, G->scratch, NULL)) {
        CM_LOG_ERROR(TAG, "worker group %u: bad ADOPTED of request %u; killing the worker",
                     D->idx, gi);
        if (D->pid > 0)
            kill(D->pid, SIGKILL);
        return;
    }
    g->hand = 2;
    D->hand_wait--;
    D->handoffs_total++;
    set_owner(G, g->blocks, g->n_hand, D->idx);
    reclaim(G, g->pgrp, gi, G->scratch, g->n_hand);
}

static void on_done(struct ap_server *srv, const struct ipc_wevt *e)
{
    struct ap_gen_state *G = srv->gen;
    uint32_t gi = e->req;
    ap_gen *g = &G->g[gi];
    if (!g->in_worker)
        return;
    set_in_worker(G, g, false);
    hand_back(G, g); /* ended in a decode group before it adopted the blocks */
    g->hand = 0;
    if (g->state == G_ZOMBIE) {
        gen_free(srv, gi);
        return;
    }
    if (g->state != G_ACTIVE || g->final)
        return; /* freed when its final completion is posted */
    if (e->result == -E2BIG)
        finalize(G, gi, -E2BIG, IPC_FINISH_ERROR,
                 "request needs %" PRIu64 " KV blocks, the worker's whole pool has %" PRIu64
                 " (shorten prompt/max_tokens or raise kv_blocks)",
                 e->arg[0], e->arg[1]);
    else if (e->result == -EIO && ap_config_on_device(&srv->cfg)) {
        /* the kernel's name, as the worker wrote it: printable bytes only */
        char k[17];
        memcpy(k, e->arg, 16);
        k[16] = '\0';
        for (int i = 0; k[i]; i++)
            if (k[i] < 0x21 || k[i] > 0x7e)
                k[i] = '?';
        finalize(G, gi, -EIO, IPC_FINISH_ERROR,
                 "the worker's device %s failed in kernel %s while running this request (the "
                 "CUDA error is in gorgond's log); the worker restarts, the request was not "
                 "retried",
                 srv->cfg.device, k[0] ? k : "(unknown)");
    }
    else if (e->result < 0)
        finalize(G, gi, e->result, IPC_FINISH_ERROR, "worker failed the request: %s",
                 cm_strerror(e->result));
    else
        /* The worker's end rule is gorgond's own: reaching here means the
         * two disagreed; end the request with what was produced. */
        finalize(G, gi, 0, e->finish >= IPC_FINISH_EOS && e->finish <= IPC_FINISH_LENGTH
                               ? (enum ipc_finish)e->finish
                               : IPC_FINISH_LENGTH,
                 NULL);
}

static void rate_update(struct ap_gen_state *G)
{
    uint64_t now = cm_now_ns();
    if (!G->rate_t0) {
        G->rate_t0 = now;
        G->rate_tok0 = G->tokens_total;
        return;
    }
    uint64_t dt = now - G->rate_t0;
    if (dt < 1000000000ull) {
        /* Before the first full second, the partial one. */
        if (!G->rate_full && dt >= 100000000ull)
            G->rate_milli = (G->tokens_total - G->rate_tok0) * 1000000000000ull / dt;
        return;
    }
    G->rate_full = true;
    G->rate_milli = (G->tokens_total - G->rate_tok0) * 1000000000000ull / dt;
    G->rate_t0 = now;
    G->rate_tok0 = G->tokens_total;
}

/* The longest a step took while requests waited on it: logged when it
 * grows past a quarter of worker_timeout_ms, so an operator sees the
 * margin shrink before the watchdog fires on a merely slow worker. */
static void note_step_gap(struct ap_server *srv, ap_group *W, uint64_t gap_ns)
{
    W->step_gap_max_ns = gap_ns;
    uint64_t limit_ns = (uint64_t)srv->cfg.worker_timeout_ms * 1000000u;
    if (limit_ns && gap_ns * 4 > limit_ns)
        CM_LOG_WARN(TAG, "worker group %u: a step took %.1f ms, %.0f%% of "
                    "worker_timeout_ms=%lld",
                    W->idx, (double)gap_ns / 1e6, 100.0 * (double)gap_ns / (double)limit_ns,
                    (long long)srv->cfg.worker_timeout_ms);
}

/* When group W's watchdog fires (0: not armed): no READY within
 * worker_start_timeout_ms of its start, or no step for worker_timeout_ms
 * while it holds requests. */
static uint64_t group_deadline(const struct ap_server *srv, const ap_group *W)
{
    if (!W->have_worker || W->killed_why[0] || W->pid <= 0)
        return 0;
    if (!W->ready && srv->cfg.worker_start_timeout_ms > 0)
        return W->spawn_ns + (uint64_t)srv->cfg.worker_start_timeout_ms * 1000000u + 1;
    if (W->ready && W->n_in_worker && srv->cfg.worker_timeout_ms > 0)
        return W->progress_ns + (uint64_t)srv->cfg.worker_timeout_ms * 1000000u + 1;
    return 0;
}

/* Kill a group that is alive but not working (its deadline passed). Its
 * pidfd then reports the death and worker_died() fails its requests and
 * restarts it, as for a crash. */
static void watchdog(struct ap_server *srv, ap_group *W, uint64_t now)
{
    uint64_t deadline = group_deadline(srv, W);
    if (!deadline || now < deadline)
        return;
    const ap_config *cfg = &srv->cfg;
    if (!W->ready)
        snprintf(W->killed_why, sizeof(W->killed_why),
                 "killed by gorgond: not ready %lld ms after its start "
                 "(worker_start_timeout_ms=%lld)",
                 (long long)((now - W->spawn_ns) / 1000000u),
                 (long long)cfg->worker_start_timeout_ms);
    else
        snprintf(W->killed_why, sizeof(W->killed_why),
                 "killed by gorgond: no step for %lld ms with %u requests "
                 "(worker_timeout_ms=%lld)",
                 (long long)((now - W->progress_ns) / 1000000u), W->n_in_worker,
                 (long long)cfg->worker_timeout_ms);
    W->watchdog_kills++; /* worker_died() logs it, with killed_why */
    kill(W->pid, SIGKILL);
}

uint64_t ap_gen_deadline(const struct ap_server *srv)
{
    const struct ap_gen_state *G = srv->gen;
    uint64_t first = 0;
    for (uint32_t i = 0; G && i < G->n_groups; i++) {
        uint64_t d = group_deadline(srv, &G->grp[i]);
        if (d && (!first || d < first))
            first = d;
    }
    return first;
}

/* Drain group W's event ring; the number of events handled. An event
 * about a request the group does not hold is a worker bug (or a hostile
 * worker) and is ignored: it never touches another group's request. */
static int drain_events(struct ap_server *srv, ap_group *W)
{
    struct ap_gen_state *G = srv->gen;
    if (!W->have_worker)
        return 0;
    int total = 0;
    for (;;) {
        struct ipc_wevt ev[AP_EVT_BURST];
        int n = ipc_ring_pop_burst(&W->evt, ev, AP_EVT_BURST);
        if (n < 0) {
            CM_LOG_ERROR(TAG, "worker group %u event ring index impossible; killing the worker",
                         W->idx);
            if (W->pid > 0)
                kill(W->pid, SIGKILL);
            return total;
        }
        for (int i = 0; i < n; i++) {
            const struct ipc_wevt *e = &ev[i];
            if (e->op != IPC_WEVT_READY && e->op != IPC_WEVT_STEP &&
                (e->req >= G->n_gens || !G->g[e->req].in_worker || G->g[e->req].grp != W->idx))
                continue;
            switch (e->op) {
            case IPC_WEVT_READY:
                W->ready = true;
                G->ever_ready = true;
                W->progress_ns = cm_now_ns();
                W->early_deaths = 0;
                W->kv_total = e->arg[0];
                CM_LOG_INFO(TAG, "worker group %u (pid %d) ready on %s: %" PRIu64 " KV blocks, "
                            "%" PRIu64 " sequences", W->idx, (int)W->pid, srv->cfg.device,
                            e->arg[0], e->arg[1]);
                break;
            case IPC_WEVT_STEP:
                W->queued = (uint32_t)e->arg[0];
                W->running = e->arg[0] >> 32;
                W->kv_used = (uint32_t)e->arg[1];
                W->kv_total = e->arg[1] >> 32;
                if (e->n_tokens > W->batch_max)
                    W->batch_max = e->n_tokens;
                W->med_limit = e->result > 0 ? (uint64_t)e->result : 0;
                break;
            case IPC_WEVT_TOKEN: {
                uint32_t k = e->n_tokens <= 8 ? e->n_tokens : 8;
                /* Counted before the tokens: the last one may end the request. */
                on_medusa(G, e->req, e->arg[0], e->arg[1]);
                for (uint32_t j = 0; j < k; j++)
                    on_token(G, e->req, e->tokens[j], e->n_gen - (k - 1 - j));
                W->tokens_total += k;
                G->tokens_total += k;
                break;
            }
            case IPC_WEVT_DONE: on_done(srv, e); break;
            case IPC_WEVT_HANDOFF: on_handoff(srv, W, e); break;
            case IPC_WEVT_ADOPTED: on_adopted(srv, W, e); break;
            default: break;
            }
        }
        total += n;
        if ((uint32_t)n < AP_EVT_BURST)
            break;
    }
    if (total) {
        /* Every step yields events (tokens at least; STEP only when the
         * scheduler's state changed): any event is progress. */
        uint64_t now = cm_now_ns();
        if (W->n_in_worker && W->ready && now - W->progress_ns > W->step_gap_max_ns)
            note_step_gap(srv, W, now - W->progress_ns);
        W->progress_ns = now;
        rate_update(G);
    }
    return total;
}

/* Rank r > 0 of group W ended: stop the group (rank 0's death then fails
 * the requests, naming this rank, and restarts it). */
static void rank_died(struct ap_server *srv, ap_group *W, int r)
{
    if (r >= AP_TP_MAX || W->rpid[r] <= 0)
        return; /* already reaped with its group */
    int st = 0;
    pid_t got = waitpid(W->rpid[r], &st, WNOHANG);
    if (got == 0) {
        arm_rank_pid(srv, W, r); /* spurious readiness: not dead yet */
        return;
    }
    char how[64];
    if (got == W->rpid[r] && WIFSIGNALED(st))
        snprintf(how, sizeof how, "was killed by signal %d", WTERMSIG(st));
    else if (got == W->rpid[r] && WIFEXITED(st))
        snprintf(how, sizeof how, "exited with status %d", WEXITSTATUS(st));
    else
        snprintf(how, sizeof how, "is gone");
    char grp[32] = "the worker group";
    if (ap_config_groups(&srv->cfg) > 1)
        snprintf(grp, sizeof grp, "worker group %u", W->idx);
    if (!W->killed_why[0])
        snprintf(W->killed_why, sizeof(W->killed_why),
                 "rank %d of %s (pid %d) %s; gorgond stopped the group", r, grp,
                 (int)W->rpid[r], how);
    CM_LOG_ERROR(TAG, "rank %d of %s (pid %d) %s: stopping the group", r, grp,
                 (int)W->rpid[r], how);
    close(W->rpidfd[r]);
    W->rpidfd[r] = -1;
    W->rpid[r] = 0;
    char why[128];
    if (W->comm_fd >= 0)
        comm_shm_abort_fd(W->comm_fd, W->killed_why, why, sizeof why);
    if (W->pid > 0)
        kill(W->pid, SIGKILL); /* its pidfd reports it: worker_died() */
}

static void worker_died(struct ap_server *srv, ap_group *W)
{
    struct ap_gen_state *G = srv->gen;
    int st = 0;
    pid_t r = waitpid(W->pid, &st, WNOHANG);
    if (r == 0)
        return; /* spurious readiness: not dead yet */
    W->pid_armed = false;
    /* Tokens it produced before dying are real: deliver them first. */
    drain_events(srv, W);
    char how[sizeof(W->killed_why)];
    const int code = r == W->pid && WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    if (W->killed_why[0])
        snprintf(how, sizeof(how), "%s", W->killed_why);
    else if (r == W->pid && WIFSIGNALED(st))
        snprintf(how, sizeof(how), "killed by signal %d", WTERMSIG(st));
    else if (code == ENG_WORKER_EXIT_DEVICE)
        snprintf(how, sizeof(how), "exited with status %d: it cannot use device %s (its "
                 "message above says why)", code, srv->cfg.device);
    else if (code == ENG_WORKER_EXIT_DEVICE_LOST)
        snprintf(how, sizeof(how), "exited with status %d: device %s failed (its message "
                 "above has the CUDA error)", code, srv->cfg.device);
    else if (code >= 0)
        snprintf(how, sizeof(how), "exited with status %d", code);
    else
        snprintf(how, sizeof(how), "gone");
    char grp[32] = "";
    if (ap_config_groups(&srv->cfg) > 1)
        snprintf(grp, sizeof grp, " of group %u", W->idx);
    CM_LOG_ERROR(TAG, "worker%s pid %d %s%s", grp, (int)W->pid, how,
                 W->ready ? "" : " before it was ready");
    stop_ranks(W); /* a group lives and dies together */
    if (W->evt_armed) {
        struct io_uring_sqe *sqe = ap_get_sqe(srv);
        if (sqe) {
            io_uring_prep_cancel64(sqe, grp_ud(AP_TAG_WK_EVT, W, 0), 0);
            io_uring_sqe_set_data64(sqe, ap_ud(AP_TAG_NONE, 0, 0));
        }
        W->evt_armed = false;
    }
    for (uint32_t gi = 0; gi < G->n_gens; gi++) {
        ap_gen *g = &G->g[gi];
        if (!g->in_worker || g->grp != W->idx)
            continue;
        set_in_worker(G, g, false);
        hand_back(G, g);
        g->hand = 0;
        if (g->state == G_ZOMBIE)
            gen_free(srv, gi);
        else
            finalize(G, gi, -EIO, IPC_FINISH_ERROR,
                     "the worker process%s died (%s) while running this request; it was not "
                     "retried",
                     grp, how);
    }
    close(W->pidfd);
    W->pidfd = -1;
    W->pid = 0;
    W->have_worker = false;
    if (W->wake_fd >= 0)
        close(W->wake_fd);
    W->wake_fd = -1;
    W->queued = W->running = W->kv_used = 0;
    /* Requests still waiting had not started: they go to the next worker,
     * whose region gets their prompts (slot gi of the old one), or to
     * another group when this one cannot come back. */
    ipc_region old = W->reg;
    memset(&W->reg, 0, sizeof W->reg);
    W->reg.fd = -1;
    if (!W->ready && !W->killed_why[0] && code == ENG_WORKER_EXIT_DEVICE) {
        /* No restart can make the device usable (or the model fit). At
         * start-up the user wants gorgond to fail with the reason, not to
         * listen and fail every request. */
        W->failed = W->no_device = true;
        if (!G->ever_ready && !srv->fatal) {
            CM_LOG_ERROR(TAG, "device = %s cannot serve %s (the worker's message above says "
                         "why): stopping", srv->cfg.device, srv->cfg.model);
            srv->fatal = -ENODEV;
            srv->stopping = true;
        } else {
            CM_LOG_ERROR(TAG, "the worker%s cannot use device %s: %s", grp, srv->cfg.device,
                         G->n_groups > 1 ? "the group is given up" : "generation disabled");
        }
    } else if (!W->ready && ++W->early_deaths >= AP_WORKER_MAX_EARLY_DEATHS) {
        W->failed = true;
        CM_LOG_ERROR(TAG, "the worker%s died %d times before loading the model: %s (see the "
                     "worker's messages above)", grp, W->early_deaths,
                     G->n_groups > 1 ? "the group is given up" : "generation disabled");
    } else if (!srv->stopping && !srv->draining) {
        W->restarts++;
        if (worker_spawn(srv, W) < 0)
            W->failed = true;
    }
    ap_group *to = W->have_worker ? W : group_for_prompt(G);
    for (uint32_t gi = 0; gi < G->n_gens; gi++) {
        ap_gen *g = &G->g[gi];
        if (!g->waiting || g->grp != W->idx)
            continue;
        if (to) {
            memcpy(ipc_region_slot_in(&to->reg, gi), ipc_region_slot_in(&old, gi),
                   (size_t)g->start.n_prompt * sizeof(int32_t));
            W->n_waiting--;
            to->n_waiting++;
            g->grp = to->idx;
        } else if (W->no_device) {
            finalize(G, gi, -EIO, IPC_FINISH_ERROR,
                     "the worker cannot use device %s (see gorgond's log): generation is "
                     "disabled", srv->cfg.device);
        } else if (W->failed) {
            finalize(G, gi, -EIO, IPC_FINISH_ERROR,
                     "the worker cannot load the model (see gorgond's log): generation is "
                     "disabled");
        }
    }
    ipc_region_unmap(&old);
}

/* "dir/stories260K.gguf" -> "stories260K" */
static void model_file_name(const char *path, char *out, size_t cap)
{
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    size_t n = strlen(base);
    if (n > 5 && !strcmp(base + n - 5, ".gguf"))
        n -= 5;
    snprintf(out, cap, "%.*s", (int)n, base);
}

/* Disaggregated mode: the shared KV pool. Each group gets an equal share
 * of it: kv_blocks, or (0) what a colocated worker takes by default. */
static int shared_pool_create(struct ap_server *srv)
{
    struct ap_gen_state *G = srv->gen;
    const ap_config *cfg = &srv->cfg;
    const int64_t bs = 16; /* the worker's block size */
    const int64_t per_seq = (G->n_ctx + bs - 1) / bs;
    const int64_t seqs = cfg->max_seqs < G->n_gens ? cfg->max_seqs : G->n_gens;
    int64_t share = cfg->kv_blocks > 0 ? cfg->kv_blocks : per_seq * seqs / 4;
    if (share < 1)
        share = 1;
    if (share * G->n_groups > INT32_MAX / bs) {
        CM_LOG_ERROR(TAG, "kv_blocks = %" PRId64 " for each of %u groups is too large a pool",
                     share, G->n_groups);
        return -EINVAL;
    }
    G->n_blocks = (uint32_t)(share * G->n_groups);
    G->max_hand = (uint32_t)per_seq;
    int rc = ipc_kv_ctl_create(&G->kvc, G->n_blocks, G->n_gens, G->max_hand, G->n_groups);
    if (rc < 0) {
        CM_LOG_ERROR(TAG, "shared KV pool control area: %s", cm_strerror(rc));
        return rc;
    }
    G->owner = malloc((size_t)G->n_blocks * sizeof(uint32_t));
    G->scratch = malloc((size_t)G->max_hand * sizeof(int32_t));
    if (!G->owner || !G->scratch)
        return -ENOMEM;
    for (uint32_t b = 0; b < G->n_blocks; b++)
        G->owner[b] = G->kvc.owner[b] = (uint32_t)(b / share);
    for (uint32_t i = 0; i < G->n_gens; i++)
        if (!(G->g[i].blocks = malloc((size_t)G->max_hand * sizeof(int32_t))))
            return -ENOMEM;
    for (int r = 0; r < cfg->tp; r++)
        if ((G->pool_fd[r] = ipc_kv_pool_create()) < 0) {
            rc = G->pool_fd[r];
            G->pool_fd[r] = -1;
            CM_LOG_ERROR(TAG, "shared KV pool: %s", cm_strerror(rc));
            return rc;
        }
    CM_LOG_INFO(TAG, "disaggregated: %d prefill and %d decode groups of %d rank%s; shared KV "
                "pool of %u blocks of %" PRId64 " positions, %" PRId64 " per group",
                cfg->prefill_groups, cfg->decode_groups, cfg->tp, cfg->tp > 1 ? "s" : "",
                G->n_blocks, bs, share);
    return 0;
}

/* ---- gorgond hooks (ap_int.h) -------------------------------------------------- */

int ap_gen_create(struct ap_server *srv)
{
    struct ap_gen_state *G = calloc(1, sizeof(*G));
    if (!G)
        return -ENOMEM;
    srv->gen = G;
    G->n_groups = (uint32_t)ap_config_groups(&srv->cfg);
    G->kvc.fd = -1;
    for (int r = 0; r < AP_TP_MAX; r++)
        G->pool_fd[r] = -1;
    if (!(G->grp = calloc(G->n_groups, sizeof(*G->grp))))
        return -ENOMEM;
    for (uint32_t i = 0; i < G->n_groups; i++) {
        ap_group *W = &G->grp[i];
        W->idx = i;
        W->role = !srv->cfg.disaggregated                      ? IPC_GROUP_COLOCATED
                  : i < (uint32_t)srv->cfg.prefill_groups ? IPC_GROUP_PREFILL
                                                           : IPC_GROUP_DECODE;
        W->pidfd = W->wake_fd = W->reg.fd = W->comm_fd = -1;
        for (int r = 0; r < AP_TP_MAX; r++)
            W->rpidfd[r] = -1;
    }
    if (!srv->cfg.model[0])
        return 0;
    eng_gguf *gg;
    int rc = eng_gguf_open(&gg, srv->cfg.model);
    if (rc < 0) {
        CM_LOG_ERROR(TAG, "model %s: %s", srv->cfg.model, eng_error());
        return rc;
    }
    uint32_t nctx = 2048; /* eng_model's default when the key is absent */
    (void)eng_gguf_get_u32(gg, "llama.context_length", &nctx);
    const char *str;
    size_t len;
    if (eng_gguf_get_str(gg, "general.name", &str, &len) == 0 && len)
        snprintf(G->name, sizeof(G->name), "%.*s", (int)len, str);
    else
        model_file_name(srv->cfg.model, G->name, sizeof(G->name));
    if (eng_gguf_get_str(gg, "tokenizer.chat_template", &str, &len) == 0 && len &&
        len < UINT32_MAX) {
        if (!(G->chat_template = malloc(len + 1))) {
            eng_gguf_close(gg);
            return -ENOMEM;
        }
        memcpy(G->chat_template, str, len);
        G->chat_template[len] = '\0';
        G->template_len = (uint32_t)len;
    }
    if (srv->cfg.tp > 1) {
        /* Refuse a split the ranks would refuse, before starting any. */
        uint32_t nh = 0, nkv = 0, ffn = 0;
        (void)eng_gguf_get_u32(gg, "llama.attention.head_count", &nh);
        nkv = nh;
        (void)eng_gguf_get_u32(gg, "llama.attention.head_count_kv", &nkv);
        (void)eng_gguf_get_u32(gg, "llama.feed_forward_length", &ffn);
        const struct eng_gguf_tensor *emb = eng_gguf_find_tensor(gg, "token_embd.weight");
        int64_t nv = emb && emb->n_dims >= 2 ? emb->ne[1] : 0;
        if (nh == 0 || nkv == 0 || nv == 0 ||
            eng_tp_split_check(srv->cfg.tp, (int)nh, (int)nkv, ffn, nv) < 0) {
            CM_LOG_ERROR(TAG, "model %s: tp = %d: %s", srv->cfg.model, srv->cfg.tp,
                         nh && nkv && nv ? eng_error() : "not a llama model with heads");
            eng_gguf_close(gg);
            return -EINVAL;
        }
    }
    rc = eng_tok_create(&G->tok, gg);
    eng_gguf_close(gg);
    if (rc < 0) {
        CM_LOG_ERROR(TAG, "model %s: tokenizer: %s", srv->cfg.model, eng_error());
        return rc;
    }
    G->n_ctx = nctx;
    G->n_vocab = eng_tok_n_vocab(G->tok);
    /* No token covers more text than its piece (byte fallback: one byte a
     * token): a prompt longer than this cannot fit the context, so that is
     * all a connection may stage (IPC_OP_PROMPT_PART). */
    size_t per_tok = eng_tok_max_piece_bytes(G->tok);
    G->prompt_cap = (size_t)nctx * (per_tok > 4 ? per_tok : 4) + 4096;
    G->bos = eng_tok_bos(G->tok);
    G->piece_cap = 3 * eng_tok_max_piece_bytes(G->tok) + ENG_TOK_STREAM_SLACK;
    G->text_cap = G->piece_cap + ENG_STOP_MAX_LEN;
    G->pend_cap = AP_GEN_PEND > 4 * G->text_cap ? AP_GEN_PEND : 4 * G->text_cap;
    G->piece = malloc(G->piece_cap);
    G->text = malloc(G->text_cap);
    G->n_gens = srv->cfg.max_requests;
    G->uids = calloc(G->n_gens, sizeof(*G->uids));
    G->g = calloc(G->n_gens, sizeof(*G->g));
    G->free_list = calloc(G->n_gens, sizeof(uint32_t));
    G->list = calloc(G->n_gens, sizeof(uint32_t));
    if (!G->piece || !G->text || !G->g || !G->free_list || !G->list || !G->uids)
        return -ENOMEM;
    for (uint32_t i = 0; i < G->n_gens; i++) {
        if (!(G->g[i].pend = malloc(G->pend_cap)))
            return -ENOMEM;
        G->free_list[G->n_free++] = G->n_gens - 1 - i;
    }
    if ((rc = find_worker(G->bin, sizeof(G->bin))) < 0) {
        CM_LOG_ERROR(TAG, "gorgon-worker not found next to gorgond, in ../libexec/gorgon/ "
                     "or at $GORGON_WORKER: %s",
                     cm_strerror(rc));
        return rc;
    }
    CM_LOG_INFO(TAG, "model %s: context %" PRId64 ", vocabulary %d", srv->cfg.model, G->n_ctx,
                G->n_vocab);
    if (srv->cfg.disaggregated && (rc = shared_pool_create(srv)) < 0)
        return rc;
    for (uint32_t i = 0; i < G->n_groups; i++)
        if ((rc = worker_spawn(srv, &G->grp[i])) < 0)
            return rc;
    return 0;
}

void ap_gen_destroy(struct ap_server *srv)
{
    struct ap_gen_state *G = srv->gen;
    if (!G)
        return;
    for (uint32_t i = 0; G->grp && i < G->n_groups; i++) {
        ap_group *W = &G->grp[i];
        if (W->pid > 0) {
            kill(W->pid, SIGKILL);
            waitpid(W->pid, NULL, 0);
        }
        stop_ranks(W);
        if (W->pidfd >= 0)
            close(W->pidfd);
        if (W->wake_fd >= 0)
            close(W->wake_fd);
        ipc_region_unmap(&W->reg);
    }
    free(G->grp);
    if (G->g)
        for (uint32_t i = 0; i < G->n_gens; i++) {
            free(G->g[i].pend);
            free(G->g[i].blocks);
        }
    ipc_kv_ctl_unmap(&G->kvc);
    for (int r = 0; r < AP_TP_MAX; r++)
        if (G->pool_fd[r] >= 0)
            close(G->pool_fd[r]);
    free(G->owner);
    free(G->scratch);
    free(G->g);
    free(G->uids);
    free(G->free_list);
    free(G->list);
    free(G->piece);
    free(G->text);
    free(G->chat_template);
    eng_tok_destroy(G->tok);
    free(G);
    srv->gen = NULL;
}

int ap_gen_poll(struct ap_server *srv)
{
    struct ap_gen_state *G = srv->gen;
    int n = 0;
    for (uint32_t i = 0; i < G->n_groups; i++)
        n += drain_events(srv, &G->grp[i]);
    if (G->n_waiting)
        dispatch_waiting(srv);
    uint64_t deadline = ap_gen_deadline(srv);
    if (deadline && !n) {
        uint64_t now = cm_now_ns();
        if (now >= deadline)
            for (uint32_t i = 0; i < G->n_groups; i++)
                watchdog(srv, &G->grp[i], now);
    }
    if (G->n_list)
        flush_list(srv);
    return n;
}

bool ap_gen_busy(const struct ap_server *srv)
{
    return srv->gen->n_list > 0;
}

uint32_t ap_gen_active(const struct ap_server *srv)
{
    return srv->gen->n_active;
}

/* Arm group W's event doorbell; 1 when its ring has events already. */
static int arm_group(struct ap_server *srv, ap_group *W)
{
    if (!W->have_worker)
        return 0;
    uint32_t val;
    if (ipc_doorbell_prepare(&W->evt, &val) != 0)
        return 1;
    if (W->evt_armed)
        return 0;
    struct io_uring_sqe *sqe = ap_get_sqe(srv);
    if (!sqe)
        return 1;
    if (W->wake_fd >= 0)
        io_uring_prep_poll_add(sqe, W->wake_fd, POLLIN);
    else
        ipc_uring_prep_futex_wait(sqe, &W->evt.sh->doorbell, val);
    io_uring_sqe_set_data64(sqe, grp_ud(AP_TAG_WK_EVT, W, 0));
    W->evt_armed = true;
    return 0;
}

int ap_gen_arm(struct ap_server *srv)
{
    struct ap_gen_state *G = srv->gen;
    int work = 0;
    for (uint32_t i = 0; i < G->n_groups; i++)
        work |= arm_group(srv, &G->grp[i]);
    return work;
}

void ap_gen_disarm_flag(struct ap_server *srv)
{
    struct ap_gen_state *G = srv->gen;
    for (uint32_t i = 0; i < G->n_groups; i++)
        if (G->grp[i].have_worker)
            ipc_doorbell_finish(&G->grp[i].evt);
}

void ap_gen_dispatch(struct ap_server *srv, uint64_t ud, int res)
{
    struct ap_gen_state *G = srv->gen;
    const uint32_t gidx = ap_ud_idx(ud) / AP_TP_MAX, rank = ap_ud_idx(ud) % AP_TP_MAX;
    if (gidx >= G->n_groups)
        return;
    ap_group *W = &G->grp[gidx];
    if (ap_ud_gen(ud) != (W->wgen & 0xffffffu))
        return; /* for a worker that is gone */
    if (ap_ud_tag(ud) == AP_TAG_WK_EVT) {
        W->evt_armed = false;
        if (W->wake_fd >= 0)
            (void)ipc_wake_fd_drain(W->wake_fd);
    } else if (ap_ud_tag(ud) == AP_TAG_WK_PID && rank > 0) {
        if (res == -ECANCELED)
            return;
        rank_died(srv, W, (int)rank);
    } else if (ap_ud_tag(ud) == AP_TAG_WK_PID) {
        W->pid_armed = false;
        if (res == -ECANCELED)
            return;
        worker_died(srv, W);
        if (W->have_worker && !W->pid_armed && W->pid > 0)
            arm_pid(srv, W); /* it was a spurious wake-up */
    }
}

static int reject(ap_session *s, const struct ipc_sqe *sqe, struct ipc_cqe *cqe, int err,
                  const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static int reject(ap_session *s, const struct ipc_sqe *sqe, struct ipc_cqe *cqe, int err,
                  const char *fmt, ...)
{
    char *out = (char *)ipc_region_slot_out(&s->reg, sqe->slot);
    size_t cap = s->reg.layout.slot_out_bytes;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(out, cap, fmt, ap);
    va_end(ap);
    cqe->result = err;
    cqe->out_off = 0;
    cqe->out_len = n < 0 ? 0 : (uint32_t)((size_t)n < cap ? (size_t)n : cap - 1);
    cqe->arg[0] = IPC_FINISH_ERROR;
    return 1;
}

/* A GENERATE whose prompt starts with `staged` (IPC_OP_PROMPT_PART bytes,
 * owned by the caller) and goes on with the inline bytes. */
static int submit_staged(struct ap_server *srv, ap_session *s, const struct ipc_sqe *sqe,
                         struct ipc_cqe *cqe, const uint8_t *staged, size_t staged_len);

int ap_gen_submit(struct ap_server *srv, ap_session *s, const struct ipc_sqe *sqe,
                  struct ipc_cqe *cqe)
{
    /* Whatever the slot staged belongs to this request: taken now, freed
     * whatever the outcome (never left for the slot's next request). */
    uint8_t *staged = NULL;
    size_t staged_len = 0;
    if (s->stage && sqe->slot < s->stage_n && s->stage[sqe->slot]) {
        staged = s->stage[sqe->slot];
        staged_len = s->stage_len[sqe->slot];
        s->stage[sqe->slot] = NULL;
        s->stage_len[sqe->slot] = 0;
        s->staged -= staged_len;
    }
    int rc = submit_staged(srv, s, sqe, cqe, staged, staged_len);
    free(staged);
    return rc;
}

int ap_gen_prompt_part(struct ap_server *srv, ap_session *s, const struct ipc_sqe *sqe,
                       struct ipc_cqe *cqe)
{
    struct ap_gen_state *G = srv->gen;
    if (!G->tok)
        return reject(s, sqe, cqe, -ENOTSUP,
                      "gorgond was started without --model: generation is not available");
    uint32_t slot = sqe->slot;
    if (!s->stage) {
        uint32_t n = s->reg.layout.n_slots;
        s->stage = calloc(n, sizeof(*s->stage));
        s->stage_len = calloc(n, sizeof(*s->stage_len));
        if (!s->stage || !s->stage_len) {
            free(s->stage);
            free(s->stage_len);
            s->stage = NULL;
            s->stage_len = NULL;
            return reject(s, sqe, cqe, -ENOMEM, "out of memory");
        }
        s->stage_n = n;
    }
    if (sqe->arg[0] == 0)
        ap_stage_drop(s, slot);
    else if (sqe->arg[0] != s->stage_len[slot])
        return reject(s, sqe, cqe, -EINVAL, "prompt part at offset %llu: %u bytes are staged",
                      (unsigned long long)sqe->arg[0], s->stage_len[slot]);
    size_t have = s->stage_len[slot];
    if (s->staged + sqe->in_len > G->prompt_cap) {
        ap_stage_drop(s, slot);
        return reject(s, sqe, cqe, -EMSGSIZE,
                      "prompt: more than %zu bytes staged on this connection (more than a "
                      "%" PRId64 "-token context can hold)", G->prompt_cap, G->n_ctx);
    }
    uint8_t *buf = realloc(s->stage[slot], have + sqe->in_len + 1);
    if (!buf) {
        ap_stage_drop(s, slot);
        return reject(s, sqe, cqe, -ENOMEM, "out of memory");
    }
    memcpy(buf + have, ipc_region_slot_in(&s->reg, slot) + sqe->in_off, sqe->in_len);
    s->stage[slot] = buf;
    s->stage_len[slot] = (uint32_t)(have + sqe->in_len);
    s->staged += sqe->in_len;
    cqe->result = (int32_t)s->stage_len[slot];
    return 1;
}

static int submit_staged(struct ap_server *srv, ap_session *s, const struct ipc_sqe *sqe,
                         struct ipc_cqe *cqe, const uint8_t *staged, size_t staged_len)
{
    struct ap_gen_state *G = srv->gen;
    if (!G->tok)
        return reject(s, sqe, cqe, -ENOTSUP,
                      "gorgond was started without --model: generation is not available");
    if (srv->draining)
        return reject(s, sqe, cqe, -ESHUTDOWN, "gorgond is shutting down");
    /* Its prompt goes to the region of the group likely to run it. */
    ap_group *W = group_for_prompt(G);
    if (!W) {
        bool all_failed = true, no_device = false;
        for (uint32_t i = 0; i < G->n_groups; i++) {
            all_failed &= G->grp[i].failed;
            no_device |= G->grp[i].no_device;
        }
        if (all_failed && no_device)
            return reject(s, sqe, cqe, -EIO,
                          "the worker cannot use device %s (see gorgond's log): generation is "
                          "disabled", srv->cfg.device);
        return all_failed ? reject(s, sqe, cqe, -EIO,
                                   "the worker cannot load the model (see gorgond's log): "
                                   "generation is disabled")
                          : reject(s, sqe, cqe, -EIO,
                                   "no worker is running (restarting after a failure)");
    }
    struct ipc_gen_params p;
    if (sqe->in_len < sizeof(p))
        return reject(s, sqe, cqe, -EINVAL, "GENERATE input: %u bytes, need at least %zu "
                      "(struct ipc_gen_params)", sqe->in_len, sizeof(p));
    const uint8_t *in = ipc_region_slot_in(&s->reg, sqe->slot) + sqe->in_off;
    memcpy(&p, in, sizeof(p)); /* one copy; everything below checks the copy */
    char why[96];
    if (ipc_gen_params_check(&p, why, sizeof(why)) < 0)
        return reject(s, sqe, cqe, -EINVAL, "%s", why);
    if (p.top_k > G->n_vocab)
        return reject(s, sqe, cqe, -EINVAL, "top_k %d: must be in [0, %d]", p.top_k, G->n_vocab);
    if ((uint64_t)p.prompt_off + p.prompt_len > sqe->in_len ||
        (uint64_t)p.stop_off + p.stop_len > sqe->in_len)
        return reject(s, sqe, cqe, -EINVAL, "prompt or stop strings outside the %u input bytes",
                      sqe->in_len);
    /* Stop strings: copied out of shared memory before they are parsed. */
    char stops[IPC_GEN_MAX_STOP][IPC_GEN_MAX_STOP_LEN + 1];
    const char *stop_ptrs[IPC_GEN_MAX_STOP];
    {
        char sb[IPC_GEN_MAX_STOP * (IPC_GEN_MAX_STOP_LEN + 1)];
        if (p.stop_len > sizeof(sb))
            return reject(s, sqe, cqe, -EINVAL, "stop strings: %u bytes, at most %zu", p.stop_len,
                          sizeof(sb));
        memcpy(sb, in + p.stop_off, p.stop_len);
        size_t at = 0;
        for (uint32_t i = 0; i < p.n_stop; i++) {
            const char *z = memchr(sb + at, '\0', p.stop_len - at);
            size_t len = z ? (size_t)(z - (sb + at)) : 0;
            if (!z || len == 0 || len > IPC_GEN_MAX_STOP_LEN)
                return reject(s, sqe, cqe, -EINVAL,
                              "stop string %u: must be 1..%d bytes and NUL-terminated", i,
                              IPC_GEN_MAX_STOP_LEN);
            memcpy(stops[i], sb + at, len + 1);
            stop_ptrs[i] = stops[i];
            at += len + 1;
        }
    }
    if (!G->n_free)
        return reject(s, sqe, cqe, -EBUSY,
                      "too many generate requests in flight (max_requests=%u)", G->n_gens);
    ap_uid_use *u = uid_use(G, s->uid);
    const ap_config *cfg = &srv->cfg;
    if (u && cfg->max_requests_per_uid && u->n_active >= cfg->max_requests_per_uid)
        return reject(s, sqe, cqe, -EBUSY,
                      "uid %u has %u generate requests in flight (max_requests_per_uid=%u)",
                      (unsigned)s->uid, u->n_active, cfg->max_requests_per_uid);
    if (cfg->max_requests_per_session && s->n_gen_active >= cfg->max_requests_per_session)
        return reject(s, sqe, cqe, -EBUSY,
                      "this connection has %u generate requests in flight "
                      "(max_requests_per_session=%u)",
                      s->n_gen_active, cfg->max_requests_per_session);
    uint32_t gi = G->free_list[G->n_free - 1];
    ap_gen *g = &G->g[gi];
    int32_t *ids = (int32_t *)ipc_region_slot_in(&W->reg, gi);
    int64_t n;
    if (!(p.flags & IPC_GEN_F_STAGED))
        staged_len = 0; /* staged without a GENERATE that asks for it: dropped */
    size_t plen = staged_len + p.prompt_len;
    if (p.flags & IPC_GEN_F_PROMPT_IDS) {
        if (plen % 4 || plen == 0)
            return reject(s, sqe, cqe, -EINVAL, "prompt ids: %zu bytes is not a positive multiple "
                          "of 4", plen);
        n = (int64_t)(plen / 4);
        if (n > G->n_ctx)
            return reject(s, sqe, cqe, -EINVAL, "prompt of %" PRId64 " tokens is longer than the "
                          "context (%" PRId64 ")", n, G->n_ctx);
        if (staged_len)
            memcpy(ids, staged, staged_len);
        memcpy((uint8_t *)ids + staged_len, in + p.prompt_off, p.prompt_len);
        for (int64_t i = 0; i < n; i++)
            if (ids[i] < 0 || ids[i] >= G->n_vocab)
                return reject(s, sqe, cqe, -EINVAL, "prompt id %" PRId64 ": %d is not in "
                              "[0, %d)", i, ids[i], G->n_vocab);
    } else {
        /* The encoder allocates scratch for the text; its input is a
         * private copy (the client may scribble during the encode). */
        char *text = malloc(plen + 1);
        if (!text)
            return reject(s, sqe, cqe, -ENOMEM, "out of memory");
        if (staged_len)
            memcpy(text, staged, staged_len);
        memcpy(text + staged_len, in + p.prompt_off, p.prompt_len);
        n = eng_tok_encode(G->tok, text, plen, eng_tok_add_bos(G->tok), ids, (size_t)G->n_ctx);
        free(text);
        if (n == -ENOSPC)
            return reject(s, sqe, cqe, -EINVAL, "prompt is longer than the context (%" PRId64
                          " tokens)", G->n_ctx);
        if (n < 0)
            return reject(s, sqe, cqe, (int)n, "prompt cannot be tokenized: %s", eng_error());
        if (n == 0)
            return reject(s, sqe, cqe, -EINVAL, "prompt is empty (and the model adds no BOS)");
    }
    if (n + (int64_t)p.max_tokens > G->n_ctx)
        return reject(s, sqe, cqe, -EINVAL, "prompt (%" PRId64 " tokens) + max_tokens (%u) "
                      "exceeds the context (%" PRId64 ")", n, p.max_tokens, G->n_ctx);
    memset(&g->stop, 0, sizeof(g->stop));
    int rc = eng_stop_init(&g->stop, &(eng_stop_cfg){.stop = stop_ptrs, .n_stop = (int)p.n_stop,
                                                     .max_tokens = p.max_tokens});
    if (rc < 0)
        return reject(s, sqe, cqe, rc, "stop strings: %s", eng_error());
    G->n_free--;
    g->state = G_ACTIVE;
    g->final = false;
    /* g->listed stays: an entry left on the flush list by the previous
     * request of this gen now serves this one (never two entries). */
    g->sess_idx = s->idx;
    g->sess_gen = s->gen;
    g->slot = sqe->slot;
    g->user_data = sqe->user_data;
    g->flags = p.flags;
    eng_tok_stream_init(&g->ts, ids[n - 1]);
    g->t_submit = cm_now_ns();
    g->t_first = g->t_end = 0;
    g->n_prompt = (uint32_t)n;
    g->n_gen = 0;
    g->med_steps = g->med_acc = 0;
    g->out_w = 0;
    g->n_pend = 0;
    g->result = 0;
    g->finish = 0;
    s->slot_gen[sqe->slot] = (int32_t)gi;
    G->n_active++;
    G->requests_total++;
    if (!u) {
        u = &G->uids[G->n_uids++]; /* at most one per active request: fits */
        *u = (ap_uid_use){.uid = s->uid};
    }
    u->n_active++;
    s->n_gen_active++;
    g->uid = s->uid;
    g->seq = ++G->submit_seq;
    g->start = (struct ipc_wcmd){.op = IPC_WCMD_START,
                         .flags = (p.flags & IPC_GEN_F_NO_MEDUSA) ? IPC_WCMD_F_NO_MEDUSA : 0,
                         .req = gi,
                         .n_prompt = (uint32_t)n,
                         .max_tokens = p.max_tokens,
                         .temperature = p.temperature,
                         .top_p = p.top_p,
                         .min_p = p.min_p,
                         .repeat_penalty = p.repeat_penalty,
                         .top_k = p.top_k,
                         .seed = p.seed};
    g->grp = W->idx;
    g->waiting = true;
    G->n_waiting++;
    W->n_waiting++;
    u->n_waiting++;
    dispatch_waiting(srv);
    return 0;
}

int ap_gen_cancel(struct ap_server *srv, ap_session *s, uint32_t slot)
{
    struct ap_gen_state *G = srv->gen;
    int32_t gi = s->slot_gen ? s->slot_gen[slot] : -1;
    if (gi < 0 || G->g[gi].state != G_ACTIVE || G->g[gi].final)
        return -ENOENT;
    finalize(G, (uint32_t)gi, -ECANCELED, IPC_FINISH_CANCELLED, "cancelled by the client");
    send_cancel(G, (uint32_t)gi);
    return 0;
}

/* Every group has loaded the model (or was given up), one at least. */
bool ap_gen_ready(const struct ap_server *srv)
{
    const struct ap_gen_state *G = srv->gen;
    bool any = false;
    for (uint32_t i = 0; G && i < G->n_groups; i++) {
        if (!G->grp[i].ready && !G->grp[i].failed)
            return false;
        any |= G->grp[i].ready;
    }
    return any;
}

void ap_gen_session_closed(struct ap_server *srv, ap_session *s)
{
    struct ap_gen_state *G = srv->gen;
    if (!G || !s->slot_gen)
        return;
    for (uint32_t slot = 0; slot < s->reg.layout.n_slots; slot++) {
        int32_t gi = s->slot_gen[slot];
        if (gi < 0)
            continue;
        s->slot_gen[slot] = -1;
        send_cancel(G, (uint32_t)gi);
        gen_client_done(srv, (uint32_t)gi);
    }
}

void ap_gen_abort_all(struct ap_server *srv, const char *why)
{
    struct ap_gen_state *G = srv->gen;
    for (uint32_t gi = 0; gi < G->n_gens; gi++)
        if (G->g[gi].state == G_ACTIVE && !G->g[gi].final) {
            finalize(G, gi, -ECANCELED, IPC_FINISH_CANCELLED, "%s", why);
            send_cancel(G, gi);
        }
    flush_list(srv);
}

void ap_gen_fill_stats(const struct ap_server *srv, struct ipc_stats *st)
{
    struct ap_gen_state *G = srv->gen;
    if (!G)
        return;
    rate_update(G);
    st->gen_waiting = G->n_waiting;
    st->gen_tokens_total = G->tokens_total;
    st->gen_tokens_per_s_milli = G->rate_milli;
    st->gen_requests_total = G->requests_total;
    st->gen_failed = G->failed_total;
    st->gen_cancelled = G->cancelled_total;
    st->medusa_steps = G->med_steps;
    st->medusa_accepted = G->med_acc;
    st->gen_groups = G->tok ? G->n_groups : 0;
    st->gen_tp = G->tok ? (uint64_t)srv->cfg.tp : 0;
    st->gen_handoffs_total = G->handoffs_total;
    /* the groups': sums, and the largest of the per-step figures */
    for (uint32_t i = 0; i < G->n_groups; i++) {
        const ap_group *W = &G->grp[i];
        st->gen_queued += W->queued;
        st->gen_running += W->running;
        st->kv_blocks_used += W->kv_used;
        st->kv_blocks_total += W->kv_total;
        st->worker_restarts += W->restarts;
        st->watchdog_kills += W->watchdog_kills;
        if (W->batch_max > st->decode_batch_max)
            st->decode_batch_max = W->batch_max;
        if (W->step_gap_max_ns / 1000u > st->step_max_us)
            st->step_max_us = W->step_gap_max_ns / 1000u;
        if (W->med_limit > st->medusa_max_batch)
            st->medusa_max_batch = W->med_limit;
        st->gen_handoff_waiting += W->hand_wait;
    }
}

size_t ap_gen_fill_groups(const struct ap_server *srv, void *out, size_t cap)
{
    const struct ap_gen_state *G = srv->gen;
    size_t n = 0;
    for (; G && G->tok && n < G->n_groups && n < cap; n++) {
        const ap_group *W = &G->grp[n];
        struct ipc_group_stats r = {
            .group = W->idx,
            .n_ranks = (uint32_t)srv->cfg.tp,
            .state = W->failed         ? IPC_GROUP_FAILED
                     : !W->have_worker ? IPC_GROUP_RESTARTING
                     : W->ready        ? IPC_GROUP_READY
                                       : IPC_GROUP_STARTING,
            .in_worker = W->n_in_worker,
            .waiting = W->n_waiting,
            .queued = W->queued,
            .running = W->running,
            .kv_blocks_used = W->kv_used,
            .kv_blocks_total = W->kv_total,
            .tokens_total = W->tokens_total,
            .requests_total = W->requests_total,
            .restarts = W->restarts,
            .watchdog_kills = W->watchdog_kills,
            .decode_batch_max = W->batch_max,
            .step_max_us = W->step_gap_max_ns / 1000u,
            .medusa_max_batch = W->med_limit,
            .role = W->role,
            .handoff_waiting = W->hand_wait,
            .handoffs_total = W->handoffs_total,
        };
        r.pid[0] = W->pid > 0 ? W->pid : 0;
        for (int k = 1; k < srv->cfg.tp && k < (int)IPC_GROUP_MAX_RANKS; k++)
            r.pid[k] = W->rpid[k] > 0 ? W->rpid[k] : 0;
        memcpy((uint8_t *)out + n * sizeof r, &r, sizeof r);
    }
    return n;
}

/* ---- model info and tokens (IPC_OP_MODEL_INFO / TOKENIZE / DETOKENIZE) ---- */

static int no_model(ap_session *s, const struct ipc_sqe *sqe, struct ipc_cqe *cqe)
{
    return reject(s, sqe, cqe, -ENOTSUP,
                  "gorgond was started without --model: no model, no tokenizer");
}

int ap_gen_model_info(struct ap_server *srv, ap_session *s, const struct ipc_sqe *sqe,
                      struct ipc_cqe *cqe)
{
    struct ap_gen_state *G = srv->gen;
    if (!G->tok)
        return no_model(s, sqe, cqe);
    uint64_t off = sqe->arg[0];
    if (off > G->template_len)
        return reject(s, sqe, cqe, -EINVAL, "chat template offset %llu is past its %u bytes",
                      (unsigned long long)off, G->template_len);
    struct ipc_model_info mi = {
        .n_ctx = (uint32_t)G->n_ctx,
        .n_vocab = (uint32_t)G->n_vocab,
        .bos = eng_tok_bos(G->tok),
        .eos = eng_tok_eos(G->tok),
        .template_len = G->template_len,
        .chunk_off = (uint32_t)off,
    };
    size_t cap = s->reg.layout.slot_out_bytes - sizeof(mi);
    size_t left = G->template_len - off;
    mi.chunk_len = (uint32_t)(left < cap ? left : cap);
    snprintf(mi.name, sizeof(mi.name), "%s", G->name);
    uint8_t *out = ipc_region_slot_out(&s->reg, sqe->slot);
    memcpy(out, &mi, sizeof(mi));
    if (mi.chunk_len)
        memcpy(out + sizeof(mi), G->chat_template + off, mi.chunk_len);
    cqe->out_off = 0;
    cqe->out_len = (uint32_t)sizeof(mi) + mi.chunk_len;
    cqe->result = (int32_t)cqe->out_len;
    return 1;
}

int ap_gen_tokenize(struct ap_server *srv, ap_session *s, const struct ipc_sqe *sqe,
                    struct ipc_cqe *cqe)
{
    struct ap_gen_state *G = srv->gen;
    if (!G->tok)
        return no_model(s, sqe, cqe);
    if (sqe->arg[0] & ~(uint64_t)IPC_TOK_F_ADD_BOS)
        return reject(s, sqe, cqe, -EINVAL, "tokenize flags: unknown bits 0x%llx",
                      (unsigned long long)(sqe->arg[0] & ~(uint64_t)IPC_TOK_F_ADD_BOS));
    /* A private copy: the client may scribble on its input meanwhile. */
    char *text = malloc((size_t)sqe->in_len + 1);
    if (!text)
        return reject(s, sqe, cqe, -ENOMEM, "out of memory");
    memcpy(text, ipc_region_slot_in(&s->reg, sqe->slot) + sqe->in_off, sqe->in_len);
    size_t cap = s->reg.layout.slot_out_bytes / sizeof(int32_t);
    int32_t *ids = malloc(cap * sizeof(int32_t));
    int64_t n = ids ? eng_tok_encode(G->tok, text, sqe->in_len,
                                     (sqe->arg[0] & IPC_TOK_F_ADD_BOS) != 0, ids, cap)
                    : -ENOMEM;
    free(text);
    if (n < 0) {
        free(ids);
        if (n == -ENOSPC)
            return reject(s, sqe, cqe, -ENOSPC, "more than %zu tokens: they do not fit in the "
                          "slot's output (slot_out_bytes)", cap);
        return reject(s, sqe, cqe, (int)n, "cannot tokenize: %s", eng_error());
    }
    memcpy(ipc_region_slot_out(&s->reg, sqe->slot), ids, (size_t)n * sizeof(int32_t));
    free(ids);
    cqe->out_off = 0;
    cqe->out_len = (uint32_t)n * (uint32_t)sizeof(int32_t);
    cqe->result = (int32_t)n;
    return 1;
}

int ap_gen_detokenize(struct ap_server *srv, ap_session *s, const struct ipc_sqe *sqe,
                      struct ipc_cqe *cqe)
{
    struct ap_gen_state *G = srv->gen;
    if (!G->tok)
        return no_model(s, sqe, cqe);
    if (sqe->in_len % sizeof(int32_t))
        return reject(s, sqe, cqe, -EINVAL, "detokenize: %u bytes is not a whole number of "
                      "int32 ids", sqe->in_len);
    size_t n = sqe->in_len / sizeof(int32_t);
    int32_t *ids = malloc(n ? n * sizeof(int32_t) : 1);
    if (!ids)
        return reject(s, sqe, cqe, -ENOMEM, "out of memory");
    memcpy(ids, ipc_region_slot_in(&s->reg, sqe->slot) + sqe->in_off, n * sizeof(int32_t));
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= G->n_vocab) {
            int32_t bad = ids[i];
            free(ids);
            return reject(s, sqe, cqe, -EINVAL, "id %zu: %d is not in [0, %d)", i, bad,
                          G->n_vocab);
        }
    size_t cap = s->reg.layout.slot_out_bytes;
    char *out = (char *)ipc_region_slot_out(&s->reg, sqe->slot);
    int64_t len = eng_tok_decode(G->tok, ids, n, -1, out, cap);
    free(ids);
    if (len < 0)
        return reject(s, sqe, cqe, (int)len, len == -ENOSPC
                          ? "the text does not fit in the slot's output (slot_out_bytes)"
                          : "cannot detokenize");
    cqe->out_off = 0;
    cqe->out_len = (uint32_t)len;
    cqe->result = (int32_t)len;
    return 1;
}
