/* CPU feature detection (cpuid + xgetbv), read once and cached.
 * Kernels pick their variant from this at run time: the build never assumes
 * the build machine's ISA. $GORGON_CPU_MAX=scalar|avx2|avx512 caps what is
 * reported (to test or benchmark a lower tier). */
#ifndef GORGON_CM_CPU_H
#define GORGON_CM_CPU_H

#include <stdbool.h>

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
/* e.g. "avx2 fma f16c avx512f avx512bw ..." into buf; returns buf. */
const char *cm_cpu_describe(char *buf, unsigned long len);

#endif
