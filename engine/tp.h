/* engine tp — run one tensor-parallel group inside this process: tp threads,
 * one rank each, joined by a shared-memory communicator (engine/comm).
 *
 * Role: gorgon-run --tp, gorgon-bench engine --tp and the tests drive a
 * sharded model (eng_model_open_tp) this way; gorgond's worker groups run
 * the same ranks as processes over the same communicator.
 *
 * Each rank's function opens its shard, makes its kernels context, eng_ctx
 * (cfg.comm = c) and KV cache, and runs the same calls as every other rank
 * (SPMD): same batches, same order. Greedy decoding needs no broadcast: the
 * gathered logits are the same bits on every rank, so every rank picks the
 * same token.
 *
 *   static int rank_main(int rank, comm *c, void *arg) { ... return 0; }
 *   int rc = eng_tp_run(2, rank_main, &args, &(eng_tp_opts){0});
 *   if (rc < 0) fprintf(stderr, "%s\n", eng_error());
 *
 * Threading: call from any thread; it returns when every rank returned.
 */
#ifndef GORGON_ENG_TP_H
#define GORGON_ENG_TP_H

#include <stdint.h>

#include "engine/comm/comm.h"

typedef int (*eng_tp_rank_fn)(int rank, comm *c, void *arg);

typedef struct eng_tp_opts {
    int threads_per_rank; /* each rank's kernel threads (the comm's spin policy
                           * counts them); 0: 1 */
    int64_t timeout_ms;   /* a collective wait without progress this long fails
                           * the group; 0: 30 s */
} eng_tp_opts;

/* Run fn(rank, c, arg) for rank 0..tp-1 on tp threads (tp 1: on this thread,
 * c NULL) and wait for all. A rank returning < 0 aborts the communicator, so
 * the others' collectives return instead of waiting. Returns 0 when every
 * rank returned 0, else the first failing rank's code, its eng_error()
 * message (prefixed "rank R: ") carried to this thread. -EINVAL for tp < 1
 * or > COMM_SHM_MAX_RANKS; -errno when the region or threads cannot be made. */
int eng_tp_run(int tp, eng_tp_rank_fn fn, void *arg, const eng_tp_opts *opts);

#endif
