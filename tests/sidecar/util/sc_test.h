/* Helpers of the sidecar suites: start gorgon-sidecar beside a real
 * gorgond (tests/clients/util/gd_proc.h), run curl/node/gorgon and collect
 * what they print. */
#ifndef GORGON_TESTS_SC_TEST_H
#define GORGON_TESTS_SC_TEST_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include "tests/util/test_tree.h" /* tu_bin */

typedef struct sct_sidecar {
    pid_t pid;
    char url[128];     /* http://127.0.0.1:PORT */
    char err_path[64]; /* its stderr, for messages */
} sct_sidecar;


/* Start gorgon-sidecar --listen 127.0.0.1:0 --socket gd_sock plus extra
 * arguments (NULL-terminated) and wait for its "listening on" line (10 s).
 * 0, or -errno (the test then fails with sct_stderr()). */
int sct_start(sct_sidecar *s, const char *gd_sock, ...);
/* SIGTERM and wait: its wait status (-1 if it had to be killed). */
int sct_stop(sct_sidecar *s);
/* What it wrote on stderr so far (static storage). */
const char *sct_stderr(const sct_sidecar *s);

/* Run argv (argv[0] looked up in PATH), stdin from /dev/null or from
 * `in` when not NULL, stdout into *out (malloc'd, NUL-terminated; may be
 * NULL), stderr into *err likewise. Returns the wait status. */
int sct_run(const char *const *argv, const char *in, char **out, char **err);
/* Exit status of a finished command, or -1 when it did not exit normally. */
int sct_exit_code(int wait_status);



/* `gorgon generate --socket SOCK -p PROMPT -n N` (greedy): its text without
 * the newline it ends with (malloc'd); the test fails if it fails. */
char *sct_gorgon_generate(const char *sock, const char *prompt, int n);
/* One counter of `gorgon stats --socket SOCK` (the first number after the
 * name); the test fails when it is missing. */
unsigned long long sct_gorgon_stat(const char *sock, const char *name);
/* One sample of a Prometheus text page: the value of the line that starts
 * with `series ` exactly (name and labels), or -1 when there is none. */
double sct_metric(const char *page, const char *series);
#endif
