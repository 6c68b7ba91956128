/* A checker of the Prometheus text exposition format (0.0.4), for the
 * sidecar's /metrics: line syntax (names, labels and their escapes, values),
 * # TYPE before a family's samples and at most once, families contiguous,
 * no duplicate series, histograms with cumulative buckets, an le="+Inf"
 * bucket equal to _count, and a _sum. */
#ifndef GORGON_TESTS_PROM_CHECK_H
#define GORGON_TESTS_PROM_CHECK_H

#include <stddef.h>

/* 0 when page is valid, else -1 with err (cap bytes) naming the line and
 * the rule it breaks. */
int prom_check(const char *page, char *err, size_t cap);

#endif
