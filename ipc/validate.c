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
#include <stddef.h>

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
