#include "engine/model/eng_err.h"

#include <stdarg.h>
#include <stdio.h>

static _Thread_local char g_msg[512];

int eng_fail(int err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_msg, sizeof(g_msg), fmt, ap);
    va_end(ap);
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
