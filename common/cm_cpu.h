/* CPU feature detection (cpuid + xgetbv), read once and cached.
 * Kernels pick their variant from this at run time: the build never assumes
 * the build machine's ISA. $GORGON_CPU_MAX=scalar|avx2|avx512 caps what is
 * reported (to test or benchmark a lower tier). */
#ifndef GORGON_CM_CPU_H
#define GORGON_CM_CPU_H

#include <stdbool.h>
#include <stddef.h>

struct cm_cpu_features {
    bool sse42;
    bool avx;
    bool avx2;
    bool fma;
    bool f16c;
    bool avx512f;
    bool avx512bw;
    bool avx512vl;
    bool avx512dq;
    bool avx512_vnni;
    bool avx512_bf16;
    bool avx_vnni;
    int n_cpus; /* online logical CPUs */
};

const struct cm_cpu_features *cm_cpu(void);

/* The CPUs this process may really keep busy at the same time: the CPUs in
 * its affinity mask, lowered to its cgroup CPU quota rounded up (cgroup v2
 * cpu.max, or v1 cpu.cfs_quota_us / cpu.cfs_period_us, the smallest over its
 * cgroup and every ancestor); at least 1. n_cpus (online CPUs) overstates it
 * under taskset, cpusets and container quotas, and a thread pool sized or
 * spinning by n_cpus then fights itself for the CPUs it has.
 * Computed on the first call and cached for the life of the process (call it
 * before changing the affinity mask if the change must not count);
 * $GORGON_CPUS=N (1..4096) overrides it, for tests and benchmarks. Any
 * thread may call it. */
int cm_cpus_usable(void);

/* Busy-waiting threads outside the kernel pool (the worker's command poll, a
 * progress poller): each one registers itself for as long as it may spin, so
 * that a pool deciding whether its own threads may spin counts them too.
 * cm_spinners_add returns the new total; any thread may call both. */
int cm_spinners_add(int delta);
int cm_spinners(void);

/* Whether `own` threads may busy-wait beside the registered spinners: true
 * when own + cm_spinners() <= cm_cpus_usable(), i.e. when every spinner can
 * have a CPU of its own. Otherwise a spinner takes the CPU that the thread
 * it waits for needs, and waiting must sleep instead. */
bool cm_spin_allowed(int own);

/* The parts of cm_cpus_usable, uncached and without $GORGON_CPUS (tests and
 * diagnostics).
 * cm_cpus_affinity: CPUs in the calling thread's affinity mask (>= 1; the
 * online count if the mask cannot be read).
 * cm_cpus_cgroup_limit: the CPU quota, rounded up to whole CPUs, of the
 * cgroup named in `proc_cgroup` (a /proc/PID/cgroup file) and its ancestors,
 * looked up under `cgroup_root` (normally /sys/fs/cgroup): cgroup v2's
 * cpu.max in ROOT/PATH... or ROOT/unified/PATH..., v1's cfs files in
 * ROOT/cpu/PATH..., ROOT/cpu,cpuacct/PATH... or ROOT/cpuacct,cpu/PATH....
 * A path that does not exist under the root (a container without a cgroup
 * namespace) still finds the root's own files. Returns the limit in CPUs,
 * 0 when there is none ("max", -1, no files), or -errno when `proc_cgroup`
 * cannot be read. */
int cm_cpus_affinity(void);
int cm_cpus_cgroup_limit(const char *proc_cgroup, const char *cgroup_root);
/* e.g. "avx2 fma f16c avx512f avx512bw ..." into buf; returns buf. */
const char *cm_cpu_describe(char *buf, unsigned long len);

#endif
