/* cm_cpus_usable and its parts: the affinity mask, the cgroup CPU quota
 * (against fake cgroup trees in a temporary directory), $GORGON_CPUS and
 * the spin budget. Whatever depends on the cached value runs in a forked
 * child so that each case computes it afresh. */
#include <criterion/criterion.h>
#include <errno.h>
#include <limits.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/cm_cpu.h"

/* Runs fn in a child process; returns its exit status (fn's return). */
static int in_child(int (*fn)(void *), void *arg)
{
    fflush(NULL);
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0)
        _exit(fn(arg));
    int st;
    cr_assert_eq(waitpid(pid, &st, 0), pid);
    cr_assert(WIFEXITED(st), "child died (status %d)", st);
    return WEXITSTATUS(st);
}

static int one_cpu_child(void *arg)
{
    (void)arg;
    unsetenv("GORGON_CPUS");
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) != 0)
        return 10;
    int first = -1;
    for (int i = 0; i < CPU_SETSIZE && first < 0; i++)
        if (CPU_ISSET(i, &set))
            first = i;
    CPU_ZERO(&set);
    CPU_SET(first, &set);
    if (sched_setaffinity(0, sizeof(set), &set) != 0)
        return 11;
    if (cm_cpus_affinity() != 1)
        return 12;
    if (cm_cpus_usable() != 1)
        return 13;
    /* One CPU: a pool of one may spin, a second spinner may not. */
    if (!cm_spin_allowed(1) || cm_spin_allowed(2))
        return 14;
    return 0;
}

Test(common_cpu, usable_follows_a_restricted_affinity_mask)
{
    cr_assert_eq(in_child(one_cpu_child, NULL), 0);
}

Test(common_cpu, affinity_counts_the_mask)
{
    cpu_set_t set;
    cr_assert_eq(sched_getaffinity(0, sizeof(set), &set), 0);
    cr_assert_eq(cm_cpus_affinity(), CPU_COUNT(&set));
    cr_assert_leq(cm_cpus_affinity(), cm_cpu()->n_cpus);
}

static int env_child(void *arg)
{
    setenv("GORGON_CPUS", arg, 1);
    return cm_cpus_usable();
}

static int real_child(void *arg)
{
    (void)arg;
    unsetenv("GORGON_CPUS");
    return cm_cpus_usable();
}

Test(common_cpu, env_overrides_and_bad_values_are_ignored)
{
    cr_assert_eq(in_child(env_child, "3"), 3);
    cr_assert_eq(in_child(env_child, "17"), 17);
    int real = in_child(real_child, NULL);
    cr_assert_geq(real, 1);
    cr_assert_leq(real, cm_cpus_affinity());
    cr_assert_eq(in_child(env_child, "0"), real);
    cr_assert_eq(in_child(env_child, "abc"), real);
    cr_assert_eq(in_child(env_child, "4x"), real);
}

static int spin_child(void *arg)
{
    (void)arg;
    setenv("GORGON_CPUS", "2", 1);
    if (!cm_spin_allowed(2) || cm_spin_allowed(3))
        return 1;
    if (cm_spinners_add(1) != 1 || cm_spinners() != 1)
        return 2;
    /* The registered spinner takes one of the two CPUs. */
    if (!cm_spin_allowed(1) || cm_spin_allowed(2))
        return 3;
    if (cm_spinners_add(-1) != 0)
        return 4;
    if (!cm_spin_allowed(2))
        return 5;
    return 0;
}

Test(common_cpu, spin_allowed_counts_registered_spinners)
{
    cr_assert_eq(in_child(spin_child, NULL), 0);
}

/* A fake cgroup tree under a temporary directory. */
static char g_root[64];
static char g_proc[PATH_MAX];

static void make_root(void)
{
    snprintf(g_root, sizeof(g_root), "/tmp/gorgon-cgroup-XXXXXX");
    cr_assert_not_null(mkdtemp(g_root));
    snprintf(g_proc, sizeof(g_proc), "%s/proc-cgroup", g_root);
}

static void remove_root(void)
{
    char cmd[PATH_MAX + 16];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", g_root);
    cr_assert_eq(system(cmd), 0);
}

/* Writes `text` to ROOT/REL, creating the directories on the way. */
static void put(const char *rel, const char *text)
{
    char path[PATH_MAX];
    snprintf(path, sizeof(path), "%s/%s", g_root, rel);
    for (char *p = path + strlen(g_root) + 1; *p; p++) {
        if (*p == '/') {
            *p = '\0';
            mkdir(path, 0755);
            *p = '/';
        }
    }
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f, "%s: %s", path, strerror(errno));
    fputs(text, f);
    fclose(f);
}

static int limit(void)
{
    return cm_cpus_cgroup_limit(g_proc, g_root);
}

Test(common_cpu, cgroup_v2_takes_the_smallest_quota_on_the_path, .init = make_root,
     .fini = remove_root)
{
    put("proc-cgroup", "0::/app/job\n");
    put("app/job/cpu.max", "max 100000\n");
    cr_assert_eq(limit(), 0, "max is no limit");
    put("app/cpu.max", "150000 100000\n");
    cr_assert_eq(limit(), 2, "1.5 CPUs round up to 2");
    put("cpu.max", "350000 100000\n");
    cr_assert_eq(limit(), 2, "an ancestor's larger quota does not raise it");
    put("app/job/cpu.max", "50000 100000\n");
    cr_assert_eq(limit(), 1, "half a CPU is one");
}

Test(common_cpu, cgroup_v2_missing_path_uses_the_root, .init = make_root, .fini = remove_root)
{
    /* A container without a cgroup namespace: /proc says /docker/abc, the
     * mount shows the container's own cgroup at the root. */
    put("proc-cgroup", "0::/docker/abc\n");
    cr_assert_eq(limit(), 0);
    put("cpu.max", "300000 100000\n");
    cr_assert_eq(limit(), 3);
}

Test(common_cpu, cgroup_v2_hybrid_unified_mount, .init = make_root, .fini = remove_root)
{
    put("proc-cgroup", "1:cpu:/\n0::/svc\n");
    put("unified/svc/cpu.max", "200000 100000\n");
    cr_assert_eq(limit(), 2);
}

Test(common_cpu, cgroup_v1_cfs_quota, .init = make_root, .fini = remove_root)
{
    put("proc-cgroup", "4:memory:/m\n2:cpu,cpuacct:/grp\n0::/\n");
    put("cpu,cpuacct/grp/cpu.cfs_quota_us", "-1\n");
    put("cpu,cpuacct/grp/cpu.cfs_period_us", "100000\n");
    cr_assert_eq(limit(), 0, "-1 is no limit");
    put("cpu,cpuacct/grp/cpu.cfs_quota_us", "250000\n");
    cr_assert_eq(limit(), 3);
    /* The memory controller's path is not the cpu one. */
    put("cpu,cpuacct/m/cpu.cfs_quota_us", "100000\n");
    put("cpu,cpuacct/m/cpu.cfs_period_us", "100000\n");
    cr_assert_eq(limit(), 3);
    /* "cpuacct" alone is not the cpu controller. */
    put("proc-cgroup", "2:cpuacct:/m\n");
    cr_assert_eq(limit(), 0);
}

Test(common_cpu, cgroup_v1_separate_cpu_mount, .init = make_root, .fini = remove_root)
{
    put("proc-cgroup", "1:cpu:/a/b\n");
    put("cpu/a/cpu.cfs_quota_us", "400000\n");
    put("cpu/a/cpu.cfs_period_us", "100000\n");
    cr_assert_eq(limit(), 4);
}

Test(common_cpu, cgroup_unreadable_proc_file_is_an_error)
{
    cr_assert_eq(cm_cpus_cgroup_limit("/nonexistent/cgroup", "/sys/fs/cgroup"), -ENOENT);
}

Test(common_cpu, usable_is_at_most_affinity_and_cached)
{
    int n = cm_cpus_usable();
    cr_assert_geq(n, 1);
    if (!getenv("GORGON_CPUS"))
        cr_assert_leq(n, cm_cpus_affinity());
    cr_assert_eq(cm_cpus_usable(), n);
}
