#include "tests/sidecar/util/prom_check.h"

#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_FAM 256
#define MAX_SERIES 4096

typedef struct fam {
    char name[128];
    char type[16];
    bool has_samples, closed, typed;
    /* histogram state (per label set without le: the sidecar's have none) */
    double last_bucket, inf_bucket, count;
    bool has_inf, has_count, has_sum, has_bucket;
    double last_le;
} fam;

static int fail(char *err, size_t cap, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int fail(char *err, size_t cap, int line, const char *fmt, ...)
{
    int n = snprintf(err, cap, "line %d: ", line);
    va_list ap;
    va_start(ap, fmt);
    if (n >= 0 && (size_t)n < cap)
        vsnprintf(err + n, cap - (size_t)n, fmt, ap);
    va_end(ap);
    return -1;
}

static bool name_start(char c, bool colon)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || (colon && c == ':');
}

static bool name_char(char c, bool colon)
{
    return name_start(c, colon) || (c >= '0' && c <= '9');
}

/* Length of a metric (colon) or label name at s, 0 if none. */
static size_t name_len(const char *s, bool colon)
{
    if (!name_start(*s, colon))
        return 0;
    size_t n = 1;
    while (name_char(s[n], colon))
        n++;
    return n;
}

static bool parse_value(const char *s, size_t n, double *v)
{
    char buf[64];
    if (n == 0 || n >= sizeof(buf))
        return false;
    memcpy(buf, s, n);
    buf[n] = '\0';
    if (!strcmp(buf, "+Inf") || !strcmp(buf, "Inf")) {
        *v = INFINITY;
        return true;
    }
    if (!strcmp(buf, "-Inf")) {
        *v = -INFINITY;
        return true;
    }
    if (!strcmp(buf, "NaN")) {
        *v = NAN;
        return true;
    }
    for (size_t i = 0; i < n; i++)
        if (!strchr("0123456789+-.eE", buf[i]))
            return false;
    char *end;
    *v = strtod(buf, &end);
    return *end == '\0';
}

static fam *find(fam *f, int n, const char *name)
{
    for (int i = 0; i < n; i++)
        if (!strcmp(f[i].name, name))
            return &f[i];
    return NULL;
}

static int hist_close(fam *h, char *err, size_t cap, int line)
{
    if (strcmp(h->type, "histogram") || !h->has_samples)
        return 0;
    if (!h->has_inf)
        return fail(err, cap, line, "histogram %s has no le=\"+Inf\" bucket", h->name);
    if (!h->has_count || !h->has_sum)
        return fail(err, cap, line, "histogram %s lacks _count or _sum", h->name);
    if (h->inf_bucket != h->count)
        return fail(err, cap, line, "histogram %s: +Inf bucket %g != _count %g", h->name,
                    h->inf_bucket, h->count);
    return 0;
}

int prom_check(const char *page, char *err, size_t cap)
{
    static fam fams[MAX_FAM];
    static char series[MAX_SERIES][256];
    int nf = 0, ns = 0, ln = 0;
    fam *cur = NULL;
    size_t plen = strlen(page);
    if (plen == 0 || page[plen - 1] != '\n')
        return fail(err, cap, 0, "the page does not end with a newline");
    for (const char *p = page; *p;) {
        const char *eol = strchr(p, '\n');
        size_t n = (size_t)(eol - p);
        char line[1024];
        ln++;
        if (n >= sizeof(line))
            return fail(err, cap, ln, "line too long");
        memcpy(line, p, n);
        line[n] = '\0';
        p = eol + 1;
        if (n == 0)
            continue;
        if (line[0] == '#') {
            char kw[8], name[160], rest[512] = "";
            if (sscanf(line, "# %7s %159s %511[^\n]", kw, name, rest) < 2 ||
                (strcmp(kw, "HELP") && strcmp(kw, "TYPE")))
                continue; /* a plain comment */
            if (name_len(name, true) != strlen(name))
                return fail(err, cap, ln, "bad metric name '%s' in # %s", name, kw);
            fam *f = find(fams, nf, name);
            if (f && f->closed)
                return fail(err, cap, ln, "# %s for %s after its family ended", kw, name);
            if (!f) {
                if (nf == MAX_FAM)
                    return fail(err, cap, ln, "too many families");
                if (cur && hist_close(cur, err, cap, ln) < 0)
                    return -1;
                if (cur)
                    cur->closed = true;
                f = &fams[nf++];
                memset(f, 0, sizeof(*f));
                snprintf(f->name, sizeof(f->name), "%s", name);
                snprintf(f->type, sizeof(f->type), "untyped");
                f->last_le = -INFINITY;
                cur = f;
            }
            if (!strcmp(kw, "TYPE")) {
                static const char *types[] = {"counter", "gauge", "histogram", "summary",
                                              "untyped"};
                bool ok = false;
                for (size_t i = 0; i < 5; i++)
                    ok |= !strcmp(rest, types[i]);
                if (!ok)
                    return fail(err, cap, ln, "unknown type '%s'", rest);
                if (f->has_samples)
                    return fail(err, cap, ln, "# TYPE %s after its samples", name);
                if (f->typed)
                    return fail(err, cap, ln, "second # TYPE for %s", name);
                f->typed = true;
                snprintf(f->type, sizeof(f->type), "%s", rest);
            }
            continue;
        }
        /* a sample: name[{labels}] value [timestamp] */
        size_t nl = name_len(line, true);
        if (!nl)
            return fail(err, cap, ln, "bad metric name in '%s'", line);
        char name[160];
        snprintf(name, sizeof(name), "%.*s", (int)nl, line);
        const char *s = line + nl;
        char labels[512] = "";
        double le = NAN;
        bool has_le = false;
        if (*s == '{') {
            const char *start = s;
            s++;
            while (*s != '}') {
                size_t k = name_len(s, false);
                if (!k)
                    return fail(err, cap, ln, "bad label name at '%s'", s);
                char lname[64];
                snprintf(lname, sizeof(lname), "%.*s", (int)k, s);
                s += k;
                if (s[0] != '=' || s[1] != '"')
                    return fail(err, cap, ln, "label %s: expected =\"", lname);
                s += 2;
                char val[256];
                size_t vn = 0;
                while (*s != '"') {
                    if (!*s)
                        return fail(err, cap, ln, "unterminated label value");
                    if (*s == '\\') {
                        if (s[1] != '\\' && s[1] != '"' && s[1] != 'n')
                            return fail(err, cap, ln, "bad escape \\%c", s[1]);
                        s++;
                    }
                    if (vn < sizeof(val) - 1)
                        val[vn++] = *s;
                    s++;
                }
                val[vn] = '\0';
                s++;
                if (!strcmp(lname, "le")) {
                    has_le = true;
                    if (!parse_value(val, strlen(val), &le))
                        return fail(err, cap, ln, "le=\"%s\" is not a number", val);
                }
                if (*s == ',')
                    s++;
                else if (*s != '}')
                    return fail(err, cap, ln, "expected , or } after a label");
            }
            s++;
            snprintf(labels, sizeof(labels), "%.*s", (int)(s - start), start);
        }
        if (*s != ' ')
            return fail(err, cap, ln, "expected a space before the value");
        s++;
        const char *sp = strchr(s, ' ');
        double v;
        if (!parse_value(s, sp ? (size_t)(sp - s) : strlen(s), &v))
            return fail(err, cap, ln, "'%s' is not a value", s);
        if (sp) {
            for (const char *t = sp + 1; *t; t++)
                if ((*t < '0' || *t > '9') && *t != '-')
                    return fail(err, cap, ln, "bad timestamp '%s'", sp + 1);
        }
        /* its family: the name itself, or a histogram/summary base */
        fam *f = find(fams, nf, name);
        const char *suffix = NULL;
        if (!f) {
            static const char *sfx[] = {"_bucket", "_sum", "_count"};
            for (size_t i = 0; i < 3 && !f; i++) {
                size_t L = strlen(name), S = strlen(sfx[i]);
                if (L > S && !strcmp(name + L - S, sfx[i])) {
                    char base[160];
                    snprintf(base, sizeof(base), "%.*s", (int)(L - S), name);
                    fam *b = find(fams, nf, base);
                    if (b && (!strcmp(b->type, "histogram") || !strcmp(b->type, "summary"))) {
                        f = b;
                        suffix = sfx[i];
                    }
                }
            }
        }
        if (!f)
            return fail(err, cap, ln, "sample %s before any # TYPE of its family", name);
        if (f->closed || f != cur)
            return fail(err, cap, ln, "sample %s: its family %s is not contiguous", name, f->name);
        if (!strcmp(f->type, "histogram")) {
            if (!suffix)
                return fail(err, cap, ln, "histogram %s: sample without _bucket/_sum/_count",
                            f->name);
            if (!strcmp(suffix, "_bucket")) {
                if (!has_le)
                    return fail(err, cap, ln, "bucket without le");
                if (!(le > f->last_le))
                    return fail(err, cap, ln, "buckets of %s not in increasing le", f->name);
                if (f->has_bucket && v < f->last_bucket)
                    return fail(err, cap, ln, "buckets of %s not cumulative (%g < %g)", f->name,
                                v, f->last_bucket);
                f->last_le = le;
                f->last_bucket = v;
                f->has_bucket = true;
                if (isinf(le)) {
                    f->has_inf = true;
                    f->inf_bucket = v;
                }
            } else if (!strcmp(suffix, "_count")) {
                f->has_count = true;
                f->count = v;
            } else {
                f->has_sum = true;
            }
        } else if (!strcmp(f->type, "counter") && v < 0) {
            return fail(err, cap, ln, "counter %s is negative", name);
        }
        f->has_samples = true;
        char key[256];
        snprintf(key, sizeof(key), "%s%s", name, labels);
        for (int i = 0; i < ns; i++)
            if (!strcmp(series[i], key))
                return fail(err, cap, ln, "duplicate series %s", key);
        if (ns < MAX_SERIES)
            snprintf(series[ns++], sizeof(series[0]), "%s", key);
    }
    if (cur && hist_close(cur, err, cap, ln) < 0)
        return -1;
    return 0;
}
