/* engine error text: functions return -errno, and when the cause is worth
 * telling a user (a bad model file, a bad tokenizer, a prompt too long) they
 * also leave a message here, thread-local, naming what was wrong.
 *
 *   int rc = eng_gguf_open(&g, path);
 *   if (rc < 0) fprintf(stderr, "%s: %s\n", path, eng_error());
 */
#ifndef GORGON_ENG_ERR_H
#define GORGON_ENG_ERR_H

/* Record a message (printf format); returns `err` so that callers can write
 * `return eng_fail(-EBADMSG, "tensor %s: offset past end", name);`. */
int eng_fail(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* The last message recorded on this thread ("" when none). */
const char *eng_error(void);
void eng_error_clear(void);

#endif
