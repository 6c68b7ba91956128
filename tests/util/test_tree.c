#include "tests/util/test_tree.h"

#include <criterion/criterion.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

/* The directory `up` levels above this executable. */
static void exe_up(char *out, size_t cap, int up)
{
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    cr_assert_gt(n, 0, "cannot read /proc/self/exe");
    self[n] = '\0';
    for (int i = 0; i < up; i++) {
        char *slash = strrchr(self, '/');
        cr_assert(slash && slash != self, "%s is not inside build/<mode>/tests/", self);
        *slash = '\0';
    }
    cr_assert_lt((size_t)snprintf(out, cap, "%s", self), cap);
}

const char *tu_build_dir(void)
{
    static char dir[PATH_MAX];
    exe_up(dir, sizeof(dir), 2); /* .../build/<mode>/tests/NAME */
    return dir;
}

const char *tu_repo_root(void)
{
    static char dir[PATH_MAX];
    exe_up(dir, sizeof(dir), 4);
    return dir;
}

const char *tu_bin(const char *name)
{
    static char path[PATH_MAX];
    cr_assert_lt((size_t)snprintf(path, sizeof(path), "%s/bin/%s", tu_build_dir(), name),
                 sizeof(path));
    cr_assert_eq(access(path, X_OK), 0, "%s not built: run `make`", path);
    return path;
}

void tu_child_dies_with_test(pid_t parent)
{
    /* the death signal survives exec (but for setuid programs, which tests
     * do not start); checking the parent afterwards closes the window in
     * which it died before the prctl */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent)
        _exit(127);
}
