/* comm's NCCL backend. Everywhere: a machine that cannot run it (no NCCL
 * in the build, no libnccl/libcudart, no driver, no GPU) gets a clear
 * error from every entry point, never a crash or a hang; bad arguments are
 * refused. On a GPU: a one-rank group forms (the only group one GPU allows:
 * NCCL refuses two ranks on one device), its collectives run on the device
 * and give the right bytes, and an abort from another thread ends the
 * communicator. The GPU tests are skipped, with the reason, without one. */
#include <criterion/criterion.h>
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/comm/comm.h"

/* Devices, or the skip reason in why (and a negative code). */
static int devices(char *why, size_t cap)
{
    int n = comm_nccl_devices(why, cap);
    if (n == 0)
        snprintf(why, cap, "no CUDA device");
    return n;
}

Test(comm_nccl, without_a_usable_gpu_every_entry_point_says_why)
{
    char why[256] = "";
    int n = devices(why, sizeof why);
    if (n > 0)
        cr_skip_test("this machine has %d CUDA device(s): the refusals are for machines "
                     "without one", n);
    cr_assert(n == 0 || n == -EOPNOTSUPP || n == -ENOENT || n == -ENODEV, "devices: %d (%s)",
              n, why);
    cr_assert(why[0], "no reason given for %d", n);
    comm_nccl_id id;
    char why2[256] = "";
    int rc = comm_nccl_unique_id(&id, why2, sizeof why2);
    if (n == -EOPNOTSUPP || n == -ENOENT) { /* no backend or no library: nothing works */
        cr_assert_eq(rc, n, "unique_id: %d (%s)", rc, why2);
        cr_assert_str_eq(why2, why);
    }
    comm *c = (comm *)(uintptr_t)1; /* must come back NULL */
    char why3[256] = "";
    rc = comm_nccl_init(&c, &id, 1, 0, NULL, why3, sizeof why3);
    cr_assert_eq(rc, n < 0 ? n : -ENODEV, "init: %d (%s)", rc, why3);
    cr_assert_null(c);
    cr_assert(why3[0], "init gave no reason");
}

Test(comm_nccl, bad_arguments_are_refused_before_anything_loads)
{
    comm_nccl_id id = {{0}};
    comm *c;
    char why[256];
    cr_assert_eq(comm_nccl_unique_id(NULL, why, sizeof why),
                 devices(why, sizeof why) == -EOPNOTSUPP ? -EOPNOTSUPP : -EINVAL);
    int none = comm_nccl_devices(why, sizeof why) == -EOPNOTSUPP;
    cr_assert_eq(comm_nccl_init(&c, &id, 2, 2, NULL, why, sizeof why),
                 none ? -EOPNOTSUPP : -EINVAL);
    if (!none)
        cr_assert(strstr(why, "rank 2 of 2"), "%s", why);
    cr_assert_eq(comm_nccl_init(&c, &id, 0, 0, NULL, why, sizeof why),
                 none ? -EOPNOTSUPP : -EINVAL);
    comm_nccl_opts o = COMM_NCCL_OPTS_DEFAULT;
    o.timeout_ms = 0;
    cr_assert_eq(comm_nccl_init(&c, &id, 1, 0, &o, why, sizeof why),
                 none ? -EOPNOTSUPP : -EINVAL);
}

/* ---- on a GPU ------------------------------------------------------------------ */

static struct {
    int (*Malloc)(void **, size_t);
    int (*Free)(void *);
    int (*Memcpy)(void *, const void *, size_t, int);
} rt;

static void need_gpu(void)
{
    char why[256];
    int n = devices(why, sizeof why);
    if (n <= 0)
        cr_skip_test("needs a CUDA device: %s", why);
    const char *env = getenv("GORGON_CUDART_LIB");
    void *h = dlopen(env && *env ? env : "libcudart.so", RTLD_NOW);
    if (!h)
        h = dlopen("/usr/local/cuda/lib64/libcudart.so", RTLD_NOW);
    cr_assert_not_null(h, "libcudart: %s", dlerror());
    *(void **)&rt.Malloc = dlsym(h, "cudaMalloc");
    *(void **)&rt.Free = dlsym(h, "cudaFree");
    *(void **)&rt.Memcpy = dlsym(h, "cudaMemcpy");
    cr_assert(rt.Malloc && rt.Free && rt.Memcpy);
}

enum { H2D = 1, D2H = 2 }; /* cudaMemcpyKind */

static comm *one_rank(void)
{
    comm_nccl_id id;
    char why[256];
    cr_assert_eq(comm_nccl_unique_id(&id, why, sizeof why), 0, "%s", why);
    comm *c;
    cr_assert_eq(comm_nccl_init(&c, &id, 1, 0, NULL, why, sizeof why), 0, "%s", why);
    cr_assert_str_eq(comm_backend(c), "nccl");
    cr_assert_eq(comm_size(c), 1);
    return c;
}

Test(comm_nccl, one_rank_collectives_run_on_the_device, .timeout = 120)
{
    need_gpu();
    comm *c = one_rank();
    enum { N = 768 };
    float host[N], back[N];
    for (int i = 0; i < N; i++)
        host[i] = (float)i * 0.5f - 7.0f;
    float *d, *d2;
    cr_assert_eq(rt.Malloc((void **)&d, sizeof host), 0);
    cr_assert_eq(rt.Malloc((void **)&d2, sizeof host), 0);
    cr_assert_eq(rt.Memcpy(d, host, sizeof host, H2D), 0);
    cr_assert_eq(comm_all_reduce_sum_f32(c, d, N), 0, "%s", comm_last_error(c));
    cr_assert_eq(rt.Memcpy(back, d, sizeof back, D2H), 0);
    cr_assert_eq(memcmp(back, host, sizeof host), 0, "one-rank all-reduce changed the data");
    /* all_gather out of place: a device copy through NCCL */
    cr_assert_eq(comm_all_gather(c, d, d2, sizeof host), 0, "%s", comm_last_error(c));
    cr_assert_eq(rt.Memcpy(back, d2, sizeof back, D2H), 0);
    cr_assert_eq(memcmp(back, host, sizeof host), 0, "all_gather did not copy");
    cr_assert_eq(comm_broadcast(c, d, sizeof host, 0), 0, "%s", comm_last_error(c));
    cr_assert_eq(comm_barrier(c), 0, "%s", comm_last_error(c));
    rt.Free(d);
    rt.Free(d2);
    comm_destroy(c);
}

static void *abort_later(void *arg)
{
    comm_abort(arg, "test: aborted from another thread");
    return NULL;
}

Test(comm_nccl, abort_from_another_thread_ends_the_communicator, .timeout = 120)
{
    need_gpu();
    comm *c = one_rank();
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, abort_later, c), 0);
    pthread_join(t, NULL);
    char why[256];
    cr_assert(comm_aborted(c, why, sizeof why));
    cr_assert(strstr(why, "from another thread"), "%s", why);
    cr_assert_eq(comm_barrier(c), -ECONNABORTED);
    cr_assert(strstr(comm_last_error(c), "from another thread"), "%s", comm_last_error(c));
    comm_destroy(c);
}
