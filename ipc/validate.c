/* Descriptor validation: the one place that decides whether an SQE copied out
 * of untrusted shared memory may reach the server's handlers.
 *
 * Classification: a field with a value no valid request can carry (opcode,
 * flags, reserved bytes, slot index) is -EINVAL; a payload window that does
 * not fit its buffer (in_off/in_len) is -EPROTO, "bad framing". Every reason
 * is a static string naming the field, so callers can log or return it
 * without allocating. Arithmetic is done in 64 bits: in_off + in_len of two
 * u32 cannot overflow there. */
#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>

#include "ipc/ipc.h"

int ipc_sqe_validate(const struct ipc_sqe *sqe, const struct ipc_region_hdr *layout,
                     const char **why)
{
    const char *dummy;
    if (!why)
        why = &dummy;
    *why = NULL;
    if (!sqe || !layout)
        return *why = "sqe or layout is NULL", -EINVAL;
    if (sqe->opcode >= IPC_OP__COUNT)
        return *why = "opcode: unknown", -EINVAL;
    if (sqe->flags != 0)
        return *why = "flags: must be 0", -EINVAL;
    if (sqe->rsvd0 != 0)
        return *why = "rsvd0: must be 0", -EINVAL;
    for (size_t i = 0; i < sizeof(sqe->pad); i++)
        if (sqe->pad[i] != 0)
            return *why = "pad: must be 0", -EINVAL;
    if (sqe->slot >= layout->n_slots)
        return *why = "slot: >= n_slots", -EINVAL;
    if (sqe->in_off > layout->slot_in_bytes)
        return *why = "in_off: beyond the slot input buffer", -EPROTO;
    if ((uint64_t)sqe->in_off + sqe->in_len > layout->slot_in_bytes)
        return *why = "in_len: in_off + in_len beyond the slot input buffer", -EPROTO;
    return 0;
}

static bool finite_in(float v, float lo, float hi)
{
    return isfinite(v) && v >= lo && v <= hi;
}

int ipc_gen_params_check(const struct ipc_gen_params *p, char *why, size_t cap)
{
#define BAD(...) return snprintf(why, cap, __VA_ARGS__), -EINVAL
    if (cap)
        why[0] = '\0';
    if (p->flags & ~IPC_GEN_F__ALL)
        BAD("flags: unknown bits 0x%x", p->flags & ~IPC_GEN_F__ALL);
    if (p->rsvd[0] || p->rsvd[1])
        BAD("reserved fields must be 0");
    if (!finite_in(p->temperature, 0.0f, 1e6f))
        BAD("temperature %g: must be >= 0", (double)p->temperature);
    if (!(isfinite(p->top_p) && p->top_p > 0.0f && p->top_p <= 1.0f))
        BAD("top_p %g: must be in (0, 1]", (double)p->top_p);
    if (!(isfinite(p->min_p) && p->min_p >= 0.0f && p->min_p < 1.0f))
        BAD("min_p %g: must be in [0, 1)", (double)p->min_p);
    if (!finite_in(p->repeat_penalty, 0.0f, 1e6f))
        BAD("repeat_penalty %g: must be >= 0", (double)p->repeat_penalty);
    if (p->top_k < 0)
        BAD("top_k %d: must be >= 0", p->top_k);
    if (p->max_tokens < 1)
        BAD("max_tokens %u: must be >= 1", p->max_tokens);
    if (p->n_stop > IPC_GEN_MAX_STOP)
        BAD("%u stop strings: at most %d", p->n_stop, IPC_GEN_MAX_STOP);
    return 0;
#undef BAD
}
