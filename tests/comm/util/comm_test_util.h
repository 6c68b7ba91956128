/* Helpers for the tests/comm suites: a group of forked rank processes over
 * one shared-memory region, each running a rank function and reporting
 * through memory shared with the test process. */
#ifndef GORGON_TESTS_COMM_UTIL_H
#define GORGON_TESTS_COMM_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "engine/comm/comm.h"

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define CTU_SANITIZED 1
#else
#define CTU_SANITIZED 0
#endif
#define CTU_SCALE(release, sanitized) (CTU_SANITIZED ? (sanitized) : (release))

/* What one rank reports. */
struct ctu_result {
    int rc;             /* the rank function's return (0 or -errno) */
    int started;        /* 1 once attached */
    int ready;          /* set by rank functions that want to be waited for */
    int fd;             /* the region (inherited from the test process) */
    uint64_t t_end_ns;  /* cm_now_ns() when the rank function returned */
    uint64_t u64[8];    /* free for the test (hashes, counters) */
    char msg[512];      /* failure description, or comm_last_error */
};

struct ctu_group;
/* Runs in the rank process; returns 0 or -errno and explains failures in
 * res->msg (ctu_fail). */
typedef int (*ctu_rank_fn)(comm *c, struct ctu_result *res, void *arg);

struct ctu_group {
    int fd;
    int n;
    pid_t pid[COMM_SHM_MAX_RANKS];
    struct ctu_result *res; /* n entries, shared with the ranks */
    void *shared;           /* shared_bytes of zeroed memory for the test */
    size_t shared_bytes;
};

/* Create the region for cfg, fork cfg->n_ranks ranks that attach with opts
 * and run fn(arg). Returns 0 or -errno (with a Criterion failure). */
int ctu_start(struct ctu_group *g, const comm_shm_cfg *cfg, const comm_shm_opts *opts,
              ctu_rank_fn fn, void *arg, size_t shared_bytes);
/* ctu_start, and *shared_out = g->shared before the fork (for rank
 * functions whose arg points at the pointer). */
int ctu_start_shared(struct ctu_group *g, const comm_shm_cfg *cfg, const comm_shm_opts *opts,
                     ctu_rank_fn fn, void *arg, size_t shared_bytes, void **shared_out);
/* Reap every rank (killing those that outlive timeout_ms); returns the
 * number of ranks that did not exit 0. Frees nothing. */
int ctu_wait(struct ctu_group *g, int timeout_ms);
/* Reap rank r only (killing it past timeout_ms); returns its wait status,
 * or -1 when it was not running. */
int ctu_wait_rank(struct ctu_group *g, int r, int timeout_ms);
void ctu_free(struct ctu_group *g);
/* Start, wait (60 s) and free; asserts every rank succeeded. */
void ctu_run(int n_ranks, size_t buf_bytes, size_t p2p_bytes, ctu_rank_fn fn, void *arg);

/* Record a failure in res->msg; returns rc. */
int ctu_fail(struct ctu_result *res, int rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Deterministic test data: xorshift64*, floats with spread-out exponents
 * (so that the order of additions changes the rounded result). */
uint64_t ctu_rand(uint64_t *state);
float ctu_rand_float(uint64_t *state);
/* FNV-1a over bytes. */
uint64_t ctu_hash(const void *p, size_t n);

/* The region's barrier arrival count (white box: offset 384 of the layout in
 * docs/comm.md), read through a mapping of fd; for tests that must act only
 * once the other ranks are blocked in a barrier. */
uint32_t ctu_barrier_count(int fd);

#endif
