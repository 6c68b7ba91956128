/* gorgon-bench suites. Each suite is `int bench_<suite>_main(int argc, char **argv)`
 * (argv[0] is the suite name), prints a table to stdout and, with --json, one
 * JSON object; returns a process exit status. */
#ifndef GORGON_BENCH_H
#define GORGON_BENCH_H

int bench_ipc_main(int argc, char **argv);
int bench_engine_main(int argc, char **argv);
int bench_serve_main(int argc, char **argv);
int bench_medusa_main(int argc, char **argv);

#endif
