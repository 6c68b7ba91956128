#include "engine/model/eng_err.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static _Thread_local char g_msg[512];

int eng_fail(int err, const char *fmt, ...)
{
    /* Formatted aside first: callers wrap an earlier failure's message,
     * eng_fail(rc, "...: %s", eng_error()), whose text is g_msg itself
     * (vsnprintf onto its own argument is undefined). */
    char msg[sizeof(g_msg)];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    memcpy(g_msg, msg, sizeof(g_msg));
    return err;
}

const char *eng_error(void)
{
    return g_msg;
}

void eng_error_clear(void)
{
    g_msg[0] = '\0';
}
