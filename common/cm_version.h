/* common version — what every gorgon program answers to --version: the git
 * description of the tree it was built from (`git describe --always
 * --dirty --tags`, "unknown" outside a git checkout), baked in at build
 * time.
 *
 *   int main(int argc, char **argv) {
 *       if (cm_version_requested(argc, argv, "gorgond"))
 *           return 0;
 *       ...
 */
#ifndef GORGON_CM_VERSION_H
#define GORGON_CM_VERSION_H

const char *cm_version(void);

/* When argv[1] is "--version": print "PROG (gorgon) VERSION" on stdout and
 * return 1, and the caller exits 0. Otherwise 0, and nothing is printed. */
int cm_version_requested(int argc, char **argv, const char *prog);

#endif
