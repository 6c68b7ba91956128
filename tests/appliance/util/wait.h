/* Waiting on observable state in the appliance tests (header-only).
 *
 * A test that needs gorgond, its worker or a client to have reached some
 * state polls for that state (a stats counter, bytes in a ring, a log line,
 * a pid's exit) with AT_WAIT_UNTIL; it never sleeps a fixed time and hopes.
 * The deadline is generous (sanitizer builds on a loaded machine are slow)
 * and reaching it fails the test with the message given. */
#ifndef GORGON_TESTS_APPLIANCE_WAIT_H
#define GORGON_TESTS_APPLIANCE_WAIT_H

#include <criterion/criterion.h>

#include "tests/clients/util/gd_proc.h"

/* Deadline for states that normally take milliseconds. Every test that
 * waits has a .timeout above it, so the message below is what a hang shows. */
#define AT_WAIT_MS 20000

/* Re-evaluate cond every 2 ms until it holds; fail with the printf-style
 * message when deadline_ms pass first. */
#define AT_WAIT_UNTIL(cond, deadline_ms, ...)                                  \
    do {                                                                       \
        uint64_t at_t0_ = gd_now_ms();                                         \
        while (!(cond)) {                                                      \
            if (gd_now_ms() - at_t0_ > (uint64_t)(deadline_ms))                \
                cr_assert_fail(__VA_ARGS__);                                   \
            gd_sleep_ms(2);                                                    \
        }                                                                      \
    } while (0)

/* gorgond is at p->sock; the test fails (never skips) when it is not built. */
#define AT_START(p, ...)                                                       \
    do {                                                                       \
        int at_rc_ = gd_start((p), __VA_ARGS__);                               \
        cr_assert_neq(at_rc_, -ENOENT,                                         \
                      "gorgond not built (looked in $GORGON_GORGOND, the "     \
                      "test's build tree and build/bin/gorgond): run `make`"); \
        cr_assert_eq(at_rc_, 0, "gorgond did not start: %s", strerror(-at_rc_)); \
    } while (0)

#endif
