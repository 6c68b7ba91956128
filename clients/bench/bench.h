/* gorgon-bench suites. Each suite is `int bench_<suite>_main(int argc, char **argv)`
 * (argv[0] is the suite name), prints a table to stdout and, with --json, one
 * JSON object; returns a process exit status. */
#ifndef GORGON_BENCH_H
#define GORGON_BENCH_H

int bench_ipc_main(int argc, char **argv);
int bench_engine_main(int argc, char **argv);
int bench_serve_main(int argc, char **argv);
int bench_medusa_main(int argc, char **argv);

/* Helpers shared by the suites (bench_util.c). */
#include <stdint.h>
/* Parse option `opt` of suite `suite`: an integer / finite number in
 * [lo, hi]. 0, or -EINVAL after printing an error naming the option. */
int bench_parse_i64(const char *suite, const char *opt, const char *s, int64_t lo, int64_t hi,
                    int64_t *out);
int bench_parse_f64(const char *suite, const char *opt, const char *s, double lo, double hi,
                    double *out);
/* Print s as a JSON string body (quotes, backslashes, control bytes escaped). */
void bench_json_puts(const char *s);

#endif
