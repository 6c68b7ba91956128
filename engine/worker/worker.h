/* engine worker — the process that owns the model, the paged KV cache and
 * one sampler per request, and runs the continuous-batching decode loop for
 * gorgond (program gorgon-worker, engine/worker/main.c).
 *
 * Role in the request path: gorgond tokenizes and validates, then pushes
 * IPC_WCMD_START (prompt ids in the request's slot) on the command ring of
 * the worker region (ipc_abi.h, "gorgond <-> worker"); the worker streams
 * back IPC_WEVT_TOKEN per generated token and IPC_WEVT_DONE when the request
 * ends (EOS or BOS token, max_tokens, cancel, error), and gorgond decodes
 * the ids to text and applies stop strings.
 *
 * Scheduler (one thread, step by step):
 *   QUEUED  -> admitted in FIFO order when its worst case
 *              ceil((prompt + max_tokens - 1) / block_size) KV blocks fit
 *              beside every running request's worst case (so a running
 *              request never runs out of KV); a request whose worst case
 *              exceeds the whole pool is refused at once (-E2BIG);
 *   PREFILL -> prompt chunks, at most `max_batch_tokens` new tokens per step
 *              for all sequences together (decode tokens go first);
 *   DECODE  -> one token per step;
 * every step is ONE eng_forward() over all running sequences; commands are
 * read at step boundaries, so new requests join the running batch at the
 * next step and a cancelled request's KV blocks go back at the next step.
 *
 * Threading: eng_worker_run() runs the loop on the calling thread (the
 * kernels' thread pool does the parallel work) until gorgond goes away.
 *
 *   eng_worker_cfg cfg = {.model_path = "m.gguf", .region_fd = 3, .wake_fd = -1,
 *                         .n_threads = 2};
 *
 * A tensor-parallel group is tp such processes (docs/tensor-parallel.md):
 * rank 0 as above plus .tp, .rank = 0, .comm_fd; ranks 1..tp-1 with
 * .region_fd = -1. Any rank that stops aborts the communicator, so the
 * others stop too and gorgond restarts the group.
 *   return eng_worker_run(&cfg) < 0;
 *
 * On a device (.device = "cuda" or "cuda:N", docs/gpu.md) the weights and
 * the KV pool live in device memory; one process, one device: tensor
 * parallelism and the disaggregated roles are refused (eng_worker_cfg_check).
 * A CUDA error in a step leaves the kernel ctx unusable: the step's requests
 * end with -EIO, the message is logged, and the worker exits
 * (ENG_WORKER_EXIT_DEVICE_LOST) so that gorgond restarts it.
 */
#ifndef GORGON_ENG_WORKER_H
#define GORGON_ENG_WORKER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* gorgon-worker's exit status (sysexits.h numbers), which gorgond reads:
 * DEVICE: the configured device cannot serve this model (no CUDA backend in
 * this build, no driver or device, the weights or a KV pool do not fit):
 * starting it again cannot help, gorgond gives up (and stops, when no
 * worker was ever ready). DEVICE_LOST: the device failed while serving (a
 * sticky CUDA error): gorgond restarts the worker as after any death. */
#define ENG_WORKER_EXIT_DEVICE 78      /* EX_CONFIG */
#define ENG_WORKER_EXIT_DEVICE_LOST 74 /* EX_IOERR */

enum eng_worker_role {
    ENG_WORKER_BOTH = 0, /* colocated: prefill and decode */
    ENG_WORKER_PREFILL,  /* runs prompts, streams the first token, hands the KV off */
    ENG_WORKER_DECODE,   /* adopts handed-off requests and decodes them */
};

typedef struct eng_worker_cfg {
    const char *model_path;
    int region_fd;            /* worker region (ipc region), taken over */
    int wake_fd;              /* eventfd to write for gorgond (eventfd doorbells), else -1 */
    int n_threads;            /* kernel threads; 0: kn_threads_auto() (usable CPUs) */
    int64_t kv_blocks;        /* KV pool blocks; 0: enough for max_seqs full contexts / 4 */
    int block_size;           /* positions per KV block; 0: 16 */
    int max_seqs;             /* running sequences at once; 0: 64 */
    int64_t max_batch_tokens; /* new tokens per forward; 0: 256 */
    pid_t parent;             /* exit when the parent is no longer this pid (0: no check) */
    /* Medusa: heads directory (NULL: none), tree (NULL: the fitted
     * medusa_choices.json in the directory, else a 17-node default) and the
     * largest decode batch that speculates (0: measured at start-up and
     * re-evaluated from the acceptance seen). */
    const char *medusa_dir;
    const char *medusa_tree;
    int medusa_max_batch;
    /* Tensor parallelism: rank `rank` of `tp` (tp 0 or 1: the whole model).
     * Every rank gets the same configuration and the group's comm region
     * (comm_fd, engine/comm). Rank 0 owns the worker region (region_fd) and
     * talks to gorgond; at each step it broadcasts the commands it read (the
     * prompts copied once out of the slots) and every rank then runs the
     * same scheduler over its shard, so all make the same collective calls.
     * The other ranks take no region (region_fd -1) and emit nothing. */
    int tp, rank, comm_fd;
    /* the ranks run pinned to disjoint CPUs: waits in collectives spin
     * first (else they spin only when every rank's threads fit the usable
     * CPUs) */
    bool pinned;
    /* groups like this one on the machine (gorgond's replicas; 0 or 1:
     * this one alone): their ranks count against the CPUs too when
     * deciding whether unpinned ranks may spin */
    int groups;
    /* Disaggregated serving (docs/disaggregation.md, ipc/ipc_kv.h): the
     * role, the shared KV pool's control memfd and this rank's pool memfd
     * (-1 both: a private pool), and the group's id in the owner table
     * (its blocks are those owner[] gives it; kv_blocks is ignored). */
    enum eng_worker_role role;
    int kv_ctl_fd, kv_pool_fd;
    uint32_t kv_owner;
    /* Where the model runs: NULL or "cpu", "cuda" or "cuda:N"
     * (kn_device_parse). On a device with kv_blocks 0 the KV pool takes
     * kv_fraction (0 < F <= 1; 0: 0.9) of the device memory still free
     * once the weights, the forward's scratch and the output buffers are
     * in place, at most what max_seqs full contexts can use. */
    const char *device;
    double kv_fraction;
    /* Tensor parallelism: a collective inside a step that sees no progress
     * this long ends the group (a hung or stopped rank). gorgond passes its
     * worker_timeout_ms, so every rank and gorgond's own watchdog use one
     * setting; 0: WK's default (30 s); < 0: no limit. */
    int64_t step_timeout_ms;
} eng_worker_cfg;

/* The combinations a worker refuses before loading anything: a device
 * string kn_device_parse does not take, kv_fraction outside (0, 1], and on
 * a device tensor parallelism (device TP needs NCCL groups, not built yet)
 * or a disaggregated role (the hand-off pool is host shared memory).
 * 0, or -EINVAL with the reason in why (cap bytes). */
int eng_worker_cfg_check(const eng_worker_cfg *cfg, char *why, size_t cap);

/* Load the model, map the region, announce READY and serve until the
 * parent dies or the command ring breaks. Returns 0 when gorgond went away,
 * or -errno with the message logged: -ENODEV when the configured device
 * cannot serve (see ENG_WORKER_EXIT_DEVICE), -ENOTRECOVERABLE when it
 * failed while serving (the step's requests were failed with -EIO first),
 * another -errno for any other setup error. */
int eng_worker_run(const eng_worker_cfg *cfg);

#endif
