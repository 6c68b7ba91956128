#include "common/cm_log.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

static const char *const level_names[] = {"ERROR", "WARN", "INFO", "DEBUG", "TRACE"};

static _Atomic int g_level = -1; /* -1: not yet read from $GORGON_LOG */
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static cm_log_sink g_sink;
static void *g_sink_ctx;

int cm_log_parse_level(const char *s)
{
    if (!s || !*s)
        return -EINVAL;
    for (int i = 0; i < (int)(sizeof(level_names) / sizeof(level_names[0])); i++)
        if (strcasecmp(s, level_names[i]) == 0)
            return i;
    if (strcasecmp(s, "warning") == 0)
        return CM_LOG_WARN;
    if (s[0] >= '0' && s[0] <= '4' && s[1] == '\0')
        return s[0] - '0';
    return -EINVAL;
}

const char *cm_log_level_name(enum cm_log_level lvl)
{
    if ((int)lvl < 0 || (int)lvl > CM_LOG_TRACE)
        return "?";
    return level_names[lvl];
}

void cm_log_set_level(enum cm_log_level lvl)
{
    atomic_store_explicit(&g_level, (int)lvl, memory_order_relaxed);
}

enum cm_log_level cm_log_get_level(void)
{
    int l = atomic_load_explicit(&g_level, memory_order_relaxed);
    if (l < 0) {
        int p = cm_log_parse_level(getenv("GORGON_LOG"));
        l = p >= 0 ? p : CM_LOG_INFO;
        atomic_store_explicit(&g_level, l, memory_order_relaxed);
    }
    return (enum cm_log_level)l;
}

void cm_log_set_sink(cm_log_sink sink, void *ctx)
{
    pthread_mutex_lock(&g_lock);
    g_sink = sink;
    g_sink_ctx = ctx;
    pthread_mutex_unlock(&g_lock);
}

void cm_vlog(enum cm_log_level lvl, const char *tag, const char *fmt, va_list ap)
{
    char msg[1024];
    int saved = errno;
    vsnprintf(msg, sizeof(msg), fmt, ap);
    pthread_mutex_lock(&g_lock);
    if (g_sink) {
        g_sink(g_sink_ctx, lvl, tag ? tag : "-", msg);
    } else {
        fprintf(stderr, "%-5s %s: %s\n", cm_log_level_name(lvl), tag ? tag : "-", msg);
    }
    pthread_mutex_unlock(&g_lock);
    errno = saved;
}

void cm_log(enum cm_log_level lvl, const char *tag, const char *fmt, ...)
{
    if (!CM_LOG_ENABLED(lvl))
        return;
    va_list ap;
    va_start(ap, fmt);
    cm_vlog(lvl, tag, fmt, ap);
    va_end(ap);
}
