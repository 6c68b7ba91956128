/* The tensor-parallel split rule (see tp_split.h). */
#include "engine/model/tp_split.h"

#include <errno.h>
#include <inttypes.h>

#include "engine/model/eng_err.h"

int eng_tp_split_check(int tp, int n_head, int n_kv_head, int64_t ffn_dim, int64_t n_vocab)
{
    if (tp < 1)
        return eng_fail(-EINVAL, "model: a tensor-parallel group of %d ranks", tp);
    if (n_head % tp)
        return eng_fail(-EINVAL, "model: tensor parallelism over %d ranks does not divide the "
                                 "%d attention heads",
                        tp, n_head);
    if (n_kv_head >= tp && n_kv_head % tp)
        return eng_fail(-EINVAL, "model: tensor parallelism over %d ranks does not divide the "
                                 "%d KV heads",
                        tp, n_kv_head);
    if (n_kv_head < tp && tp % n_kv_head)
        return eng_fail(-EINVAL, "model: %d ranks cannot share the %d KV heads evenly (with "
                                 "fewer KV heads than ranks, the rank count must be a multiple "
                                 "of them)",
                        tp, n_kv_head);
    if (ffn_dim % tp)
        return eng_fail(-EINVAL, "model: tensor parallelism over %d ranks does not divide the "
                                 "FFN width %" PRId64,
                        tp, ffn_dim);
    /* every rank gets ceil(n_vocab / tp) rows but the last: it must get some */
    if ((int64_t)(tp - 1) * ((n_vocab + tp - 1) / tp) >= n_vocab)
        return eng_fail(-EINVAL, "model: %d ranks for a vocabulary of %" PRId64
                                 ": the last rank would have no rows",
                        tp, n_vocab);
    return 0;
}
