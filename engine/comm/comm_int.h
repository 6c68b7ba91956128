/* comm internals shared by the front end (comm.c) and the backends: the ops
 * table and the communicator's common part. Not for other modules. */
#ifndef GORGON_COMM_INT_H
#define GORGON_COMM_INT_H

#include <stdarg.h>

#include "engine/comm/comm.h"

/* One backend. The front end has already checked the arguments (ranks in
 * range, peer != self, NULL only with zero sizes, no size overflow, in/out
 * overlap) and that n/bytes > 0, so each slot only does the work. Every slot
 * returns 0 or -errno and, on error, leaves its reason with comm_seterr. */
struct comm_ops {
    const char *name;
    /* buffers are device memory: the front end neither touches them nor
     * short-cuts one-rank calls (they run on the device, in stream order) */
    bool device_memory;
    int (*all_reduce_sum_f32)(comm *c, float *buf, size_t n);
    int (*all_gather)(comm *c, const void *in, void *out, size_t bytes_per_rank);
    int (*broadcast)(comm *c, void *buf, size_t bytes, int root);
    int (*send)(comm *c, const void *buf, size_t bytes, int peer);
    int (*recv)(comm *c, void *buf, size_t bytes, int peer);
    int (*barrier)(comm *c);
    /* (optional) already range-checked; NULL: -EOPNOTSUPP. */
    int (*set_timeout_ms)(comm *c, int64_t timeout_ms);
    /* Any thread; idempotent; the first reason wins. */
    void (*abort)(comm *c, const char *why);
    /* Any thread. */
    bool (*aborted)(comm *c, char *why, size_t cap);
    /* Frees the backend's state and c itself. */
    void (*destroy)(comm *c);
};

/* The part every backend's communicator starts with. */
struct comm {
    const struct comm_ops *ops;
    int rank;
    int size;
    char err[256];
};

/* Record the reason of the failing call (owning thread only); returns rc. */
int comm_seterr(comm *c, int rc, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Names of the calls, for mismatch messages. */
enum comm_op {
    COMM_OP_NONE = 0,
    COMM_OP_ALL_REDUCE_SUM_F32 = 1,
    COMM_OP_ALL_GATHER = 2,
    COMM_OP_BROADCAST = 3,
    COMM_OP_BARRIER = 4,
    COMM_OP__COUNT
};
const char *comm_op_name(uint32_t op);

#endif
