/* Growing strings and UTF-8 checks for the sidecar. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clients/sidecar/sidecar.h"

static bool grow(sc_buf *b, size_t need)
{
    if (b->oom)
        return false;
    if (b->len + need + 1 <= b->cap)
        return true;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + need + 1)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
        free(b->p);
        *b = (sc_buf){.oom = true};
        return false;
    }
    b->p = p;
    b->cap = cap;
    return true;
}

void sc_buf_add(sc_buf *b, const char *s, size_t n)
{
    if (!grow(b, n))
        return;
    if (n)
        memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

void sc_buf_adds(sc_buf *b, const char *s)
{
    sc_buf_add(b, s, strlen(s));
}

void sc_buf_addf(sc_buf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || !grow(b, (size_t)n))
        return;
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

char *sc_buf_take(sc_buf *b, size_t *len)
{
    if (b->oom)
        return NULL;
    if (!b->p)
        sc_buf_add(b, "", 0);
    char *p = b->p;
    if (len)
        *len = b->len;
    *b = (sc_buf){0};
    return p;
}

/* Length of the valid UTF-8 sequence at s (1..4), 0 if invalid, or -1 if
 * it is a valid prefix cut short by the end of the buffer. */
static int seq_len(const unsigned char *s, size_t avail)
{
    unsigned c = s[0];
    int n;
    unsigned min;
    if (c < 0x80)
        return 1;
    if (c >= 0xc2 && c <= 0xdf) {
        n = 2;
        min = 0x80;
    } else if (c >= 0xe0 && c <= 0xef) {
        n = 3;
        min = 0x800;
    } else if (c >= 0xf0 && c <= 0xf4) {
        n = 4;
        min = 0x10000;
    } else {
        return 0;
    }
    unsigned cp = c & (0x7fu >> n);
    for (int i = 1; i < n; i++) {
        if ((size_t)i >= avail)
            return -1;
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3fu);
        /* overlong or surrogate prefixes are known after the second byte */
        if (i == 1 && n == 3 && ((c == 0xe0 && s[1] < 0xa0) || (c == 0xed && s[1] > 0x9f)))
            return 0;
        if (i == 1 && n == 4 && ((c == 0xf0 && s[1] < 0x90) || (c == 0xf4 && s[1] > 0x8f)))
            return 0;
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    return n;
}

size_t sc_utf8_complete(const char *buf, size_t len, bool final)
{
    if (final)
        return len;
    const unsigned char *s = (const unsigned char *)buf;
    size_t i = 0;
    while (i < len) {
        int n = seq_len(s + i, len - i);
        if (n < 0)
            return i; /* hold the incomplete tail back */
        i += n ? (size_t)n : 1;
    }
    return len;
}

char *sc_utf8_clean(const char *buf, size_t len, size_t *out_len)
{
    const unsigned char *s = (const unsigned char *)buf;
    sc_buf b = {0};
    size_t i = 0, run = 0;
    while (i < len) {
        int n = seq_len(s + i, len - i);
        if (n > 0) {
            i += (size_t)n;
            continue;
        }
        sc_buf_add(&b, buf + run, i - run);
        sc_buf_adds(&b, "\xef\xbf\xbd");
        i++;
        run = i;
    }
    sc_buf_add(&b, buf + run, len - run);
    return sc_buf_take(&b, out_len);
}

void sc_buf_add_json(sc_buf *b, const char *s, size_t len)
{
    static const char hex[] = "0123456789ABCDEF";
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0, run = 0; /* s[run..i) is waiting to be copied verbatim */
    sc_buf_add(b, "\"", 1);
    while (i < len) {
        unsigned c = u[i];
        if (c >= 0x20 && c != '"' && c != '\\' && c < 0x80) {
            i++;
            continue;
        }
        if (c >= 0x80) {
            int n = seq_len(u + i, len - i);
            if (n > 0) {
                i += (size_t)n;
                continue;
            }
            sc_buf_add(b, s + run, i - run);
            sc_buf_adds(b, "\xef\xbf\xbd"); /* one per byte, as sc_utf8_clean */
            run = ++i;
            continue;
        }
        sc_buf_add(b, s + run, i - run);
        char esc[6] = {'\\', 0};
        size_t n = 2;
        switch (c) {
        case '"': esc[1] = '"'; break;
        case '\\': esc[1] = '\\'; break;
        case '\b': esc[1] = 'b'; break;
        case '\f': esc[1] = 'f'; break;
        case '\n': esc[1] = 'n'; break;
        case '\r': esc[1] = 'r'; break;
        case '\t': esc[1] = 't'; break;
        default:
            memcpy(esc + 1, "u00", 3);
            esc[4] = hex[c >> 4];
            esc[5] = hex[c & 15];
            n = 6;
        }
        sc_buf_add(b, esc, n);
        run = ++i;
    }
    sc_buf_add(b, s + run, len - run);
    sc_buf_add(b, "\"", 1);
}
