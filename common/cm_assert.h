/* Assertions for internal invariants only — never for anything input can reach
 * (shared memory, files, sockets, config). A failed CM_ASSERT is a gorgon bug. */
#ifndef GORGON_CM_ASSERT_H
#define GORGON_CM_ASSERT_H

#include <stdio.h>
#include <stdlib.h>

#define CM_ASSERT(cond)                                                        \
    do {                                                                       \
        if (__builtin_expect(!(cond), 0)) {                                    \
            fprintf(stderr, "%s:%d: %s: internal invariant failed: %s\n",      \
                    __FILE__, __LINE__, __func__, #cond);                      \
            abort();                                                           \
        }                                                                      \
    } while (0)

#define CM_STATIC_ASSERT(cond, msg) _Static_assert(cond, msg)

#define CM_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define CM_LIKELY(x) __builtin_expect(!!(x), 1)
#define CM_UNLIKELY(x) __builtin_expect(!!(x), 0)
#define CM_CACHELINE 64

#endif
