/* Where a test finds the programs and files of the build tree it belongs to
 * (linked into every test binary, tests/util/). A test binary lives at
 * <repo>/build/<mode>/tests/NAME, so an ASan test runs the ASan programs of
 * the same build. Static storage; never NULL: the calling test fails with a
 * clear message when something is missing. */
#ifndef GORGON_TEST_TREE_H
#define GORGON_TEST_TREE_H

#include <sys/types.h>

/* <repo>/build/<mode> */
const char *tu_build_dir(void);
/* <repo> */
const char *tu_repo_root(void);
/* <repo>/build/<mode>/bin/NAME, which must be executable ("not built: run
 * make" otherwise). Overwritten by the next call. */
const char *tu_bin(const char *name);

/* In a child just forked by the test (before exec): the child gets SIGKILL
 * when `parent`, the test process, dies. A test killed by its timeout or a
 * crash then leaves no gorgond, sidecar or server behind, holding the test
 * runner's output pipe open (tests/run-tests.sh would wait on it forever)
 * or a port. Exits 127 if the parent is already gone. */
void tu_child_dies_with_test(pid_t parent);

#endif
