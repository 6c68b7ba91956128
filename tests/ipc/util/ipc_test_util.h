/* Helpers shared by the tests/ipc suites: shared mappings for fork-based
 * cross-process tests, child reaping with a watchdog, ring pairs. */
#ifndef GORGON_TESTS_IPC_UTIL_H
#define GORGON_TESTS_IPC_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "ipc/ipc.h"

/* Sanitizer builds run the same tests on fewer messages. */
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define ITU_SANITIZED 1
#else
#define ITU_SANITIZED 0
#endif
#define ITU_SCALE(release, sanitized) (ITU_SANITIZED ? (sanitized) : (release))

/* MAP_SHARED|MAP_ANONYMOUS memory that survives fork() (zeroed). */
void *itu_shared_map(size_t bytes);
void itu_shared_unmap(void *p, size_t bytes);

/* Bytes needed by itu_ring_init for a ring of n entries. */
size_t itu_ring_bytes(uint32_t n);
/* Format a ring at mem (64-aligned) and attach a view for role. */
void itu_ring_init(void *mem, uint32_t n, int format, enum ipc_ring_role role, ipc_ring *out);

/* Wait for a child; kill it if it runs past timeout_ms. Returns its exit
 * status (0..255), 128+signal when killed by a signal, or -1 on timeout. */
int itu_wait_child(pid_t pid, int timeout_ms);

/* Number of open fds of this process (from /proc/self/fd). */
int itu_count_fds(void);

#endif
