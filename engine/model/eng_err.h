/* engine error text: functions return -errno, and when the cause is worth
 * telling a user (a bad model file, a bad tokenizer, a prompt too long) they
 * also leave a message here, thread-local, naming what was wrong.
 *
 *   int rc = eng_gguf_open(&g, path);
 *   if (rc < 0) fprintf(stderr, "%s: %s\n", path, eng_error());
 */
#ifndef GORGON_ENG_ERR_H
#define GORGON_ENG_ERR_H

#include "common/cm_err.h"

/* Record a message (printf format); returns `err` so that callers can write
 * `return eng_fail(-EBADMSG, "tensor %s: offset past end", name);`. */
int eng_fail(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Run a backend op (or kn_buf_* call) and, when it fails, return from the
 * calling function with eng_fail naming who ran which op. Only an argument
 * the engine got wrong makes an op fail, but it is reported, not ignored. */
#define ENG_OP(who, what, call)                                                                \
    do {                                                                                       \
        int rc_ = (call);                                                                      \
        if (rc_ < 0)                                                                           \
            return eng_fail(rc_, "%s: backend %s failed: %s", who, what, cm_strerror(rc_));   \
    } while (0)

/* The last message recorded on this thread ("" when none). */
const char *eng_error(void);
void eng_error_clear(void);

#endif
