#include "tests/ipc/util/ipc_test_util.h"

#include <dirent.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

void *itu_shared_map(size_t bytes)
{
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

void itu_shared_unmap(void *p, size_t bytes)
{
    if (p)
        munmap(p, bytes);
}

size_t itu_ring_bytes(uint32_t n)
{
    return sizeof(struct ipc_ring_shared) + (size_t)n * IPC_DESC_SIZE;
}

void itu_ring_init(void *mem, uint32_t n, int format, enum ipc_ring_role role, ipc_ring *out)
{
    struct ipc_ring_shared *sh = mem;
    if (format)
        ipc_ring_format(sh);
    ipc_ring_attach(out, sh, (uint8_t *)mem + sizeof(*sh), n, role);
}

int itu_wait_child(pid_t pid, int timeout_ms)
{
    struct timespec nap = {.tv_sec = 0, .tv_nsec = 1000000};
    for (int waited = 0;; waited++) {
        int st;
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid) {
            if (WIFEXITED(st))
                return WEXITSTATUS(st);
            if (WIFSIGNALED(st))
                return 128 + WTERMSIG(st);
        } else if (r < 0) {
            return -1;
        }
        if (waited >= timeout_ms) {
            kill(pid, SIGKILL);
            waitpid(pid, &st, 0);
            return -1;
        }
        nanosleep(&nap, NULL);
    }
}

int itu_count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    if (!d)
        return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n - 1; /* the DIR's own fd */
}
