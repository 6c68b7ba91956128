/* comm front end: argument checks shared by every backend, then dispatch
 * through the backend's ops table. Checks that need no communication are
 * done here, once, so that every backend refuses the same calls with the
 * same messages; what only the group can see (mismatched calls) is the
 * backend's. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "common/cm_err.h"
#include "engine/comm/comm_int.h"

int comm_seterr(comm *c, int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, sizeof c->err, fmt, ap);
    va_end(ap);
    return rc;
}

const char *comm_op_name(uint32_t op)
{
    static const char *const names[COMM_OP__COUNT] = {
        [COMM_OP_NONE] = "(nothing)",
        [COMM_OP_ALL_REDUCE_SUM_F32] = "all_reduce_sum_f32",
        [COMM_OP_ALL_GATHER] = "all_gather",
        [COMM_OP_BROADCAST] = "broadcast",
        [COMM_OP_BARRIER] = "barrier",
    };
    return op < COMM_OP__COUNT ? names[op] : "(unknown call)";
}

int comm_rank(const comm *c)
{
    return c ? c->rank : -EINVAL;
}

int comm_size(const comm *c)
{
    return c ? c->size : -EINVAL;
}

const char *comm_backend(const comm *c)
{
    return c ? c->ops->name : "(none)";
}

const char *comm_last_error(const comm *c)
{
    return c ? c->err : "communicator is NULL";
}

/* Checks common to every call; clears the previous error. */
static int comm_enter(comm *c, const char *call)
{
    c->err[0] = '\0';
    char why[200];
    if (c->ops->aborted(c, why, sizeof why))
        return comm_seterr(c, -ECONNABORTED, "%s: communicator aborted: %s", call, why);
    return 0;
}

int comm_all_reduce_sum_f32(comm *c, float *buf, size_t n)
{
    if (!c)
        return -EINVAL;
    CM_TRY(comm_enter(c, "all_reduce_sum_f32"));
    if (!buf && n)
        return comm_seterr(c, -EINVAL, "all_reduce_sum_f32: buf is NULL with n = %zu", n);
    if (n > SIZE_MAX / sizeof(float))
        return comm_seterr(c, -EOVERFLOW, "all_reduce_sum_f32: n = %zu floats overflows", n);
    if (n == 0 || (c->size == 1 && !c->ops->device_memory))
        return 0;
    return c->ops->all_reduce_sum_f32(c, buf, n);
}

static bool overlap(const void *a, size_t na, const void *b, size_t nb)
{
    uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
    return na && nb && x < y + nb && y < x + na;
}

int comm_all_gather(comm *c, const void *in, void *out, size_t bytes_per_rank)
{
    if (!c)
        return -EINVAL;
    CM_TRY(comm_enter(c, "all_gather"));
    if (bytes_per_rank > SIZE_MAX / (size_t)c->size)
        return comm_seterr(c, -EOVERFLOW,
                           "all_gather: %zu bytes per rank x %d ranks overflows",
                           bytes_per_rank, c->size);
    if (bytes_per_rank && (!in || !out))
        return comm_seterr(c, -EINVAL, "all_gather: %s is NULL with %zu bytes per rank",
                           in ? "out" : "in", bytes_per_rank);
    size_t total = bytes_per_rank * (size_t)c->size;
    const char *mine = out ? (const char *)out + (size_t)c->rank * bytes_per_rank : NULL;
    if (in != mine && overlap(in, bytes_per_rank, out, total))
        return comm_seterr(c, -EINVAL,
                           "all_gather: in overlaps out other than at out + rank * "
                           "bytes_per_rank (rank %d)",
                           c->rank);
    if (bytes_per_rank == 0)
        return 0;
    if (c->size == 1 && !c->ops->device_memory) {
        if (in != out)
            memcpy(out, in, bytes_per_rank);
        return 0;
    }
    return c->ops->all_gather(c, in, out, bytes_per_rank);
}

int comm_broadcast(comm *c, void *buf, size_t bytes, int root)
{
    if (!c)
        return -EINVAL;
    CM_TRY(comm_enter(c, "broadcast"));
    if (root < 0 || root >= c->size)
        return comm_seterr(c, -EINVAL, "broadcast: root %d is not a rank (size %d)", root,
                           c->size);
    if (!buf && bytes)
        return comm_seterr(c, -EINVAL, "broadcast: buf is NULL with %zu bytes", bytes);
    if (bytes == 0 || (c->size == 1 && !c->ops->device_memory))
        return 0;
    return c->ops->broadcast(c, buf, bytes, root);
}

static int check_peer(comm *c, const char *call, const void *buf, size_t bytes, int peer)
{
    if (peer < 0 || peer >= c->size)
        return comm_seterr(c, -EINVAL, "%s: peer %d is not a rank (size %d)", call, peer,
                           c->size);
    if (peer == c->rank)
        return comm_seterr(c, -EINVAL, "%s: peer %d is this rank", call, peer);
    if (!buf && bytes)
        return comm_seterr(c, -EINVAL, "%s: buf is NULL with %zu bytes", call, bytes);
    return 0;
}

int comm_send(comm *c, const void *buf, size_t bytes, int peer)
{
    if (!c)
        return -EINVAL;
    CM_TRY(comm_enter(c, "send"));
    CM_TRY(check_peer(c, "send", buf, bytes, peer));
    return c->ops->send(c, buf, bytes, peer);
}

int comm_recv(comm *c, void *buf, size_t bytes, int peer)
{
    if (!c)
        return -EINVAL;
    CM_TRY(comm_enter(c, "recv"));
    CM_TRY(check_peer(c, "recv", buf, bytes, peer));
    return c->ops->recv(c, buf, bytes, peer);
}

int comm_barrier(comm *c)
{
    if (!c)
        return -EINVAL;
    CM_TRY(comm_enter(c, "barrier"));
    if (c->size == 1 && !c->ops->device_memory)
        return 0;
    return c->ops->barrier(c);
}

int comm_set_timeout_ms(comm *c, int64_t timeout_ms)
{
    if (!c)
        return -EINVAL;
    c->err[0] = '\0';
    if (timeout_ms == 0 || timeout_ms < -1 || timeout_ms > COMM_TIMEOUT_MAX_MS)
        return comm_seterr(c, -EINVAL, "set_timeout_ms: %lld: must be -1 or 1..%lld",
                           (long long)timeout_ms, (long long)COMM_TIMEOUT_MAX_MS);
    if (!c->ops->set_timeout_ms)
        return comm_seterr(c, -EOPNOTSUPP, "set_timeout_ms: the %s backend has no timeout",
                           c->ops->name);
    return c->ops->set_timeout_ms(c, timeout_ms);
}

void comm_abort(comm *c, const char *why)
{
    if (c)
        c->ops->abort(c, why && why[0] ? why : "(no reason given)");
}

bool comm_aborted(comm *c, char *why, size_t cap)
{
    if (!c) {
        if (cap)
            why[0] = '\0';
        return false;
    }
    return c->ops->aborted(c, why, cap);
}

void comm_destroy(comm *c)
{
    if (c)
        c->ops->destroy(c);
}
