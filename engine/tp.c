/* An in-process tensor-parallel group: one thread per rank over a
 * shared-memory communicator. */
#include "engine/tp.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/common.h"
#include "engine/model/eng_err.h"

typedef struct tp_rank {
    int rank, fd, rc;
    const eng_tp_opts *opts;
    eng_tp_rank_fn fn;
    void *arg;
    char msg[512];
} tp_rank;

static void *rank_thread(void *p)
{
    tp_rank *r = p;
    comm_shm_opts o = COMM_SHM_OPTS_DEFAULT;
    o.threads_per_rank = r->opts->threads_per_rank > 0 ? r->opts->threads_per_rank : 1;
    if (r->opts->timeout_ms > 0)
        o.timeout_ms = r->opts->timeout_ms;
    comm *c;
    char why[256];
    r->rc = comm_shm_attach(&c, r->fd, r->rank, &o, why, sizeof why);
    if (r->rc < 0) {
        snprintf(r->msg, sizeof r->msg, "cannot join the group: %s", why);
        comm_shm_abort_fd(r->fd, "a rank could not attach", why, sizeof why);
        return NULL;
    }
    eng_error_clear();
    r->rc = r->fn(r->rank, c, r->arg);
    if (r->rc < 0) {
        snprintf(r->msg, sizeof r->msg, "%s", *eng_error() ? eng_error() : cm_strerror(r->rc));
        char ab[600];
        snprintf(ab, sizeof ab, "rank %d failed: %s", r->rank, r->msg);
        comm_abort(c, ab);
    }
    comm_destroy(c);
    return NULL;
}

int eng_tp_run(int tp, eng_tp_rank_fn fn, void *arg, const eng_tp_opts *opts)
{
    const eng_tp_opts dflt = {0};
    if (!opts)
        opts = &dflt;
    if (tp < 1 || tp > COMM_SHM_MAX_RANKS || !fn)
        return eng_fail(-EINVAL, "tp: a group of %d ranks (1..%d)", tp, COMM_SHM_MAX_RANKS);
    if (tp == 1)
        return fn(0, NULL, arg);
    char why[256];
    int fd = comm_shm_create(&(comm_shm_cfg){.n_ranks = tp}, why, sizeof why);
    if (fd < 0)
        return eng_fail(fd, "tp: cannot create the group's shared memory: %s", why);
    tp_rank *r = calloc((size_t)tp, sizeof(*r));
    pthread_t *th = calloc((size_t)tp, sizeof(*th));
    int rc = r && th ? 0 : -ENOMEM, started = 0;
    for (int i = 0; rc == 0 && i < tp; i++) {
        r[i] = (tp_rank){.rank = i, .fd = fd, .opts = opts, .fn = fn, .arg = arg};
        int e = pthread_create(&th[i], NULL, rank_thread, &r[i]);
        if (e) {
            rc = eng_fail(-e, "tp: cannot start rank %d's thread: %s", i, strerror(e));
            comm_shm_abort_fd(fd, "the group could not start", why, sizeof why);
        } else {
            started++;
        }
    }
    for (int i = 0; i < started; i++)
        pthread_join(th[i], NULL);
    /* The first rank that failed on its own (not merely aborted by another). */
    int first = -1;
    for (int i = 0; rc == 0 && i < started; i++)
        if (r[i].rc < 0 && (first < 0 || (r[first].rc == -ECONNABORTED && r[i].rc != -ECONNABORTED)))
            first = i;
    if (rc == 0 && first >= 0)
        rc = eng_fail(r[first].rc, "rank %d: %s", first, r[first].msg);
    close(fd);
    free(r);
    free(th);
    return rc;
}
