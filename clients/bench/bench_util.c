#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "clients/bench/bench.h"

int bench_parse_i64(const char *suite, const char *opt, const char *s, int64_t lo, int64_t hi,
                    int64_t *out)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr,
                "gorgon-bench %s: %s: expected an integer in [%" PRId64 ", %" PRId64
                "], got \"%s\"\n",
                suite, opt, lo, hi, s);
        return -EINVAL;
    }
    *out = v;
    return 0;
}

int bench_parse_f64(const char *suite, const char *opt, const char *s, double lo, double hi,
                    double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v) || v < lo || v > hi) {
        fprintf(stderr, "gorgon-bench %s: %s: expected a number in [%g, %g], got \"%s\"\n",
                suite, opt, lo, hi, s);
        return -EINVAL;
    }
    *out = v;
    return 0;
}

void bench_json_puts(const char *s)
{
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            printf("\\%c", ch);
        else if (ch < 0x20)
            printf("\\u%04x", ch);
        else
            putchar(ch);
    }
}
