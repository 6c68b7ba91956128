/* Monotonic time in nanoseconds (CLOCK_MONOTONIC, vDSO: no syscall). */
#ifndef GORGON_CM_TIME_H
#define GORGON_CM_TIME_H

#include <stdint.h>
#include <time.h>

static inline uint64_t cm_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline double cm_now_s(void)
{
    return (double)cm_now_ns() * 1e-9;
}

/* Fill a timespec `ns` nanoseconds from now on CLOCK_MONOTONIC. */
static inline struct timespec cm_ts_after_ns(uint64_t ns)
{
    uint64_t t = cm_now_ns() + ns;
    struct timespec ts = {.tv_sec = (time_t)(t / 1000000000ull),
                          .tv_nsec = (long)(t % 1000000000ull)};
    return ts;
}

#endif
