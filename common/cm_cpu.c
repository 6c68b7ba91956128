#include "common/cm_cpu.h"

#include <cpuid.h>
#include <pthread.h>
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
