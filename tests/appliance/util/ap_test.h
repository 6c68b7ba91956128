/* Helpers shared by the appliance suites (header-only). */
#ifndef GORGON_TESTS_AP_TEST_H
#define GORGON_TESTS_AP_TEST_H

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#include "tests/clients/util/gd_proc.h"

/* A child of `parent` whose comm is `comm` (NULL: any child), 0 if none,
 * from /proc. Between fork and exec gorgond's worker child is still called
 * "gorgond": the comm tells the worker proper. */
static inline pid_t ap_child_pid(pid_t parent, const char *comm)
{
    DIR *d = opendir("/proc");
    if (!d)
        return 0;
    pid_t found = 0;
    struct dirent *e;
    while (!found && (e = readdir(d))) {
        char path[300], buf[512];
        if (e->d_name[0] < '0' || e->d_name[0] > '9')
            continue;
        snprintf(path, sizeof(path), "/proc/%s/stat", e->d_name);
        FILE *f = fopen(path, "r");
        if (!f)
            continue;
        size_t n = fread(buf, 1, sizeof(buf) - 1, f);
        fclose(f);
        buf[n] = 0;
        char *rp = strrchr(buf, ')');
        int ppid;
        char *lp = strchr(buf, '(');
        if (rp && lp && sscanf(rp + 2, "%*c %d", &ppid) == 1 && ppid == parent &&
            (!comm || ((size_t)(rp - lp - 1) == strlen(comm) && !strncmp(lp + 1, comm, strlen(comm)))))
            found = (pid_t)atoi(e->d_name);
    }
    closedir(d);
    return found;
}

static inline pid_t ap_worker_pid(pid_t parent)
{
    return ap_child_pid(parent, "gorgon-worker");
}

/* A worker child of `parent` other than `not` (0: any), waited for up to
 * timeout_ms; 0 when none appeared. */
static inline pid_t ap_wait_worker(pid_t parent, pid_t not, long timeout_ms)
{
    uint64_t t0 = gd_now_ms();
    for (;;) {
        pid_t p = ap_worker_pid(parent);
        if (p > 0 && p != not)
            return p;
        if ((long)(gd_now_ms() - t0) > timeout_ms)
            return 0;
        gd_sleep_ms(5);
    }
}

/* gorgond's counters, the test failing when the round trip does. */
static inline gorgon_counters ap_stats(gorgon_client *cli)
{
    gorgon_counters st;
    int rc = gorgon_stats(cli, &st);
    cr_assert_eq(rc, 0, "gorgon_stats: %s", gorgon_strerror(rc));
    return st;
}

/* Read req to its end: the final rc; text appended to buf (NUL-terminated)
 * and, when the request failed, its message in err. */
static inline int ap_drain(gorgon_client *cli, uint32_t req, char *buf, size_t cap, char *err,
                           size_t err_cap, int64_t timeout_ns)
{
    gorgon_gen_chunk ch;
    size_t n = 0;
    int rc;
    if (buf && cap)
        buf[0] = '\0';
    if (err && err_cap)
        err[0] = '\0';
    while ((rc = gorgon_generate_next(cli, req, &ch, timeout_ns)) >= 0) {
        if (buf && ch.len && !ch.error && n + ch.len < cap) {
            memcpy(buf + n, ch.text, ch.len);
            n += ch.len;
            buf[n] = '\0';
        }
        if (rc == 0)
            return 0;
    }
    if (err && err_cap && ch.done && ch.text)
        snprintf(err, err_cap, "%.*s", (int)ch.len, ch.text);
    return rc;
}

#endif
