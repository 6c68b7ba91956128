#include "common/cm_cpu.h"
#include "common/cm_log.h"

#include <cpuid.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static struct cm_cpu_features g_feat;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static uint64_t xgetbv0(void)
{
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

static void detect(void)
{
    unsigned a, b, c, d;
    struct cm_cpu_features f = {0};
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    f.n_cpus = n > 0 ? (int)n : 1;

    if (!__get_cpuid(1, &a, &b, &c, &d))
        goto out;
    f.sse42 = c & bit_SSE4_2;
    f.fma = c & bit_FMA;
    f.f16c = c & bit_F16C;
    bool osxsave = c & bit_OSXSAVE;
    bool avx_hw = c & bit_AVX;
    uint64_t xcr0 = osxsave ? xgetbv0() : 0;
    /* The OS must save YMM (bits 1,2) and for AVX-512 also opmask/ZMM (5,6,7). */
    bool ymm_os = (xcr0 & 0x6) == 0x6;
    bool zmm_os = (xcr0 & 0xe6) == 0xe6;
    f.avx = avx_hw && ymm_os;
    if (!f.avx) {
        f.fma = f.f16c = false;
        goto out;
    }
    if (__get_cpuid_max(0, NULL) >= 7) {
        __cpuid_count(7, 0, a, b, c, d);
        f.avx2 = b & bit_AVX2;
        if (zmm_os) {
            f.avx512f = b & bit_AVX512F;
            f.avx512bw = b & bit_AVX512BW;
            f.avx512vl = b & bit_AVX512VL;
            f.avx512dq = b & bit_AVX512DQ;
            f.avx512_vnni = c & (1u << 11);
        }
        __cpuid_count(7, 1, a, b, c, d);
        f.avx_vnni = a & (1u << 4);
        if (zmm_os)
            f.avx512_bf16 = a & (1u << 5);
    }

    const char *cap = getenv("GORGON_CPU_MAX");
    if (cap && strcmp(cap, "avx2") == 0) {
        f.avx512f = f.avx512bw = f.avx512vl = f.avx512dq = false;
        f.avx512_vnni = f.avx512_bf16 = false;
    } else if (cap && strcmp(cap, "scalar") == 0) {
        int keep = f.n_cpus;
        memset(&f, 0, sizeof(f));
        f.n_cpus = keep;
    }
out:
    g_feat = f;
}

const struct cm_cpu_features *cm_cpu(void)
{
    pthread_once(&g_once, detect);
    return &g_feat;
}

const char *cm_cpu_describe(char *buf, unsigned long len)
{
    const struct cm_cpu_features *f = cm_cpu();
    snprintf(buf, len, "%s%s%s%s%s%s%s%s%s%s%s(%d cpus)",
             f->avx2 ? "avx2 " : "", f->fma ? "fma " : "", f->f16c ? "f16c " : "",
             f->avx512f ? "avx512f " : "", f->avx512bw ? "avx512bw " : "",
             f->avx512vl ? "avx512vl " : "", f->avx512dq ? "avx512dq " : "",
             f->avx512_vnni ? "avx512_vnni " : "", f->avx512_bf16 ? "avx512_bf16 " : "",
             f->avx_vnni ? "avx_vnni " : "", f->sse42 ? "sse4.2 " : "", f->n_cpus);
    return buf;
}

/* Usable CPUs ------------------------------------------------------------ */

int cm_cpus_affinity(void)
{
    /* Large enough for any machine we run on; a mask that does not fit
     * (EINVAL) falls back to the online count. */
    cpu_set_t *set = CPU_ALLOC(8192);
    size_t size = CPU_ALLOC_SIZE(8192);
    int n = 0;
    if (set && sched_getaffinity(0, size, set) == 0)
        n = CPU_COUNT_S(size, set);
    CPU_FREE(set);
    if (n < 1)
        n = cm_cpu()->n_cpus;
    return n < 1 ? 1 : n;
}

/* Reads the first line of DIR/NAME into buf; false if there is none. */
static bool read_line(const char *dir, const char *name, char *buf, size_t len)
{
    char path[PATH_MAX];
    if (snprintf(path, sizeof(path), "%s/%s", dir, name) >= (int)sizeof(path))
        return false;
    FILE *f = fopen(path, "re");
    if (!f)
        return false;
    bool ok = fgets(buf, (int)len, f) != NULL;
    fclose(f);
    return ok;
}

/* Whole CPUs granted by quota/period (rounded up), 0 for no limit. */
static int quota_cpus(long long quota, long long period)
{
    if (quota <= 0 || period <= 0)
        return 0;
    long long n = (quota + period - 1) / period;
    return n > INT_MAX ? INT_MAX : (int)n;
}

/* The limit set in one cgroup directory: v2 "cpu.max" ("max 100000" or
 * "150000 100000") or v1 cpu.cfs_quota_us (-1: none) over cfs_period_us. */
static int dir_limit(const char *dir)
{
    char line[128];
    if (read_line(dir, "cpu.max", line, sizeof(line))) {
        long long quota, period;
        if (strncmp(line, "max", 3) == 0)
            return 0;
        if (sscanf(line, "%lld %lld", &quota, &period) == 2)
            return quota_cpus(quota, period);
        return 0;
    }
    if (read_line(dir, "cpu.cfs_quota_us", line, sizeof(line))) {
        long long quota = strtoll(line, NULL, 10), period = 0;
        if (read_line(dir, "cpu.cfs_period_us", line, sizeof(line)))
            period = strtoll(line, NULL, 10);
        return quota_cpus(quota, period);
    }
    return 0;
}

/* The smallest limit over ROOT/PATH and each of its ancestors up to ROOT
 * (0: none). `path` starts with '/'. */
static int walk_limit(const char *root, const char *path)
{
    char dir[PATH_MAX];
    if (snprintf(dir, sizeof(dir), "%s%s", root, path) >= (int)sizeof(dir))
        return 0;
    size_t root_len = strlen(root);
    int best = 0;
    for (;;) {
        size_t len = strlen(dir);
        while (len > root_len && dir[len - 1] == '/')
            dir[--len] = '\0';
        int n = dir_limit(dir);
        if (n > 0 && (best == 0 || n < best))
            best = n;
        if (len <= root_len)
            return best;
        char *slash = strrchr(dir + root_len, '/');
        if (!slash)
            dir[root_len] = '\0';
        else
            *slash = '\0';
    }
}

static int min_limit(int a, int b)
{
    if (a == 0)
        return b;
    if (b == 0)
        return a;
    return a < b ? a : b;
}

/* Whether the comma-separated controller list `ctl` names "cpu". */
static bool has_cpu_controller(const char *ctl, size_t len)
{
    const char *p = ctl, *end = ctl + len;
    while (p < end) {
        const char *comma = memchr(p, ',', (size_t)(end - p));
        const char *tok_end = comma ? comma : end;
        if (tok_end - p == 3 && memcmp(p, "cpu", 3) == 0)
            return true;
        p = tok_end + 1;
    }
    return false;
}

int cm_cpus_cgroup_limit(const char *proc_cgroup, const char *cgroup_root)
{
    FILE *f = fopen(proc_cgroup, "re");
    if (!f)
        return -errno;
    static const char *const v1_dirs[] = {"cpu", "cpu,cpuacct", "cpuacct,cpu"};
    char line[PATH_MAX + 64];
    int best = 0;
    while (fgets(line, sizeof(line), f)) {
        /* "ID:CONTROLLERS:PATH"; v2 has ID 0 and no controllers. */
        line[strcspn(line, "\n")] = '\0';
        char *c1 = strchr(line, ':');
        char *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
        if (!c2 || c2[1] != '/')
            continue;
        const char *path = c2 + 1;
        char root[PATH_MAX];
        if (c2 == c1 + 1) {
            best = min_limit(best, walk_limit(cgroup_root, path));
            if (snprintf(root, sizeof(root), "%s/unified", cgroup_root) < (int)sizeof(root))
                best = min_limit(best, walk_limit(root, path));
        } else if (has_cpu_controller(c1 + 1, (size_t)(c2 - c1 - 1))) {
            for (size_t i = 0; i < sizeof(v1_dirs) / sizeof(v1_dirs[0]); i++)
                if (snprintf(root, sizeof(root), "%s/%s", cgroup_root, v1_dirs[i]) <
                    (int)sizeof(root))
                    best = min_limit(best, walk_limit(root, path));
        }
    }
    fclose(f);
    return best;
}

static atomic_int g_usable; /* 0: not computed yet */
static atomic_int g_spinners;

static int detect_usable(void)
{
    const char *env = getenv("GORGON_CPUS");
    if (env && *env) {
        char *end;
        errno = 0;
        long v = strtol(env, &end, 10);
        if (errno == 0 && *end == '\0' && v >= 1 && v <= 4096)
            return (int)v;
        CM_LOG_WARN("cpu", "ignoring GORGON_CPUS=%s (want a count of 1..4096)", env);
    }
    int n = cm_cpus_affinity();
    int quota = cm_cpus_cgroup_limit("/proc/self/cgroup", "/sys/fs/cgroup");
    if (quota > 0 && quota < n)
        n = quota;
    return n < 1 ? 1 : n;
}

int cm_cpus_usable(void)
{
    int n = atomic_load_explicit(&g_usable, memory_order_relaxed);
    if (n > 0)
        return n;
    /* Racing first calls compute the same value; any of them may store it. */
    n = detect_usable();
    atomic_store_explicit(&g_usable, n, memory_order_relaxed);
    return n;
}

int cm_spinners_add(int delta)
{
    return atomic_fetch_add_explicit(&g_spinners, delta, memory_order_relaxed) + delta;
}

int cm_spinners(void)
{
    return atomic_load_explicit(&g_spinners, memory_order_relaxed);
}

bool cm_spin_allowed(int own)
{
    return own + cm_spinners() <= cm_cpus_usable();
}
