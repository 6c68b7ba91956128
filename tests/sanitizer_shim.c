/* Linked into every test binary built with a sanitizer (SAN=...): works
 * around two Criterion 2.4 problems that are not ours.
 *
 * 1. LeakSanitizer: Criterion's runner (not the tests) sometimes leaks a
 *    48-byte stats object when tests run in parallel, which would turn into a
 *    failing exit status. Leaks whose stack passes through libcriterion are
 *    suppressed in the runner process only: test bodies run in boxfort
 *    worker processes, where every stack passes through libcriterion (it
 *    calls the test), so the same suppression there would hide every leak a
 *    test or the code it tests makes.
 *
 * 2. ThreadSanitizer: Criterion's sandbox (boxfort) places its inheritable arena at a random
 * address in [0x200000000000, 0x7f0000000000), chosen with rand_r() and
 * checked free with mincore(); it gives up after 10 tries. Under
 * ThreadSanitizer nearly all of that range is TSan's shadow or protected
 * memory, so Criterion aborts at start-up with "Could not initialize
 * inheritable arena" (Snaipe/Criterion#274). We interpose rand_r() and, only
 * for calls made from libcriterion, steer the choice into TSan's "mid app"
 * range (0x550000000000..0x570000000000), where application mappings are
 * allowed. Everyone else gets glibc's rand_r unchanged. */
#include <dlfcn.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Is this a boxfort worker (a process that runs tests)? Boxfort execs each
 * worker with BXFI_MAP in its environment. Read from /proc rather than with
 * getenv: LSan may ask for its suppressions before libc is set up. */
static int in_test_worker(void)
{
    static char env[1 << 17];
    int fd = open("/proc/self/environ", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    size_t n = 0;
    ssize_t k;
    while (n < sizeof(env) - 1 && (k = read(fd, env + n, sizeof(env) - 1 - n)) > 0)
        n += (size_t)k;
    close(fd);
    static const char key[] = "BXFI_MAP=";
    for (size_t i = 0; i < n; i += strnlen(env + i, n - i) + 1)
        if (n - i >= sizeof(key) - 1 && !memcmp(env + i, key, sizeof(key) - 1))
            return 1;
    return 0;
}

const char *__lsan_default_suppressions(void);
const char *__lsan_default_suppressions(void)
{
    return in_test_worker() ? "" : "leak:libcriterion.so\n";
}

int rand_r(unsigned int *seed);

int rand_r(unsigned int *seed)
{
    static int (*real)(unsigned int *);
    if (!real)
        real = (int (*)(unsigned int *))dlsym(RTLD_NEXT, "rand_r");
    int v = real(seed);
    Dl_info di;
    if (dladdr(__builtin_return_address(0), &di) && di.dli_fname &&
        strstr(di.dli_fname, "criterion")) {
        /* boxfort: base = 0x200000000000 + r * 16 MiB; r = 0x350000 is
         * 0x550000000000; keep r within 2^16 of it (1 TiB). */
        return 0x350000 + (v & 0xffff);
    }
    return v;
}
