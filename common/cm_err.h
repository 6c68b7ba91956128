/* -errno conventions: functions return 0 or a count on success and -errno on
 * failure; errno is never the channel. */
#ifndef GORGON_CM_ERR_H
#define GORGON_CM_ERR_H

#include <errno.h>
#include <string.h>

/* -errno of the last failing libc call (never 0: falls back to -EIO). */
static inline int cm_neg_errno(void)
{
    return errno > 0 ? -errno : -EIO;
}

/* Human-readable text for a negative (or positive) error code. */
static inline const char *cm_strerror(int err)
{
    return strerror(err < 0 ? -err : err);
}

/* Propagate a negative return. */
#define CM_TRY(expr)                                                           \
    do {                                                                       \
        int cm_try_rc_ = (expr);                                               \
        if (cm_try_rc_ < 0)                                                    \
            return cm_try_rc_;                                                 \
    } while (0)

#endif
