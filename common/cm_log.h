/* Logging: levels, a module tag per message, a pluggable sink.
 *
 * The default sink writes "LEVEL tag: message" lines to stderr. Level comes
 * from cm_log_set_level() or $GORGON_LOG (error|warn|info|debug|trace).
 * Not for hot paths: formatting costs microseconds. */
#ifndef GORGON_CM_LOG_H
#define GORGON_CM_LOG_H

#include <stdarg.h>

enum cm_log_level {
    CM_LOG_ERROR = 0,
    CM_LOG_WARN = 1,
    CM_LOG_INFO = 2,
    CM_LOG_DEBUG = 3,
    CM_LOG_TRACE = 4,
};

/* A sink receives the formatted message (no trailing newline). It may be
 * called from any thread; calls are serialised by cm_log. */
typedef void (*cm_log_sink)(void *ctx, enum cm_log_level lvl, const char *tag,
                            const char *msg);

void cm_log_set_level(enum cm_log_level lvl);
enum cm_log_level cm_log_get_level(void);
/* sink NULL restores the stderr sink. */
void cm_log_set_sink(cm_log_sink sink, void *ctx);
/* Parse "error".."trace" (or 0..4); returns the level or -EINVAL. */
int cm_log_parse_level(const char *s);
const char *cm_log_level_name(enum cm_log_level lvl);

void cm_log(enum cm_log_level lvl, const char *tag, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void cm_vlog(enum cm_log_level lvl, const char *tag, const char *fmt, va_list ap);

#define CM_LOG_ENABLED(lvl) ((int)(lvl) <= (int)cm_log_get_level())
#define CM_LOG_AT(lvl, tag, ...)                                               \
    do {                                                                       \
        if (CM_LOG_ENABLED(lvl))                                               \
            cm_log(lvl, tag, __VA_ARGS__);                                     \
    } while (0)
#define CM_LOG_ERROR(tag, ...) CM_LOG_AT(CM_LOG_ERROR, tag, __VA_ARGS__)
#define CM_LOG_WARN(tag, ...) CM_LOG_AT(CM_LOG_WARN, tag, __VA_ARGS__)
#define CM_LOG_INFO(tag, ...) CM_LOG_AT(CM_LOG_INFO, tag, __VA_ARGS__)
#define CM_LOG_DEBUG(tag, ...) CM_LOG_AT(CM_LOG_DEBUG, tag, __VA_ARGS__)
#define CM_LOG_TRACE(tag, ...) CM_LOG_AT(CM_LOG_TRACE, tag, __VA_ARGS__)

#endif
