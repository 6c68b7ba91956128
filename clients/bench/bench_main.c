/* gorgon-bench: one program, one suite per subcommand. */
#include <stdio.h>
#include <string.h>

#include "clients/bench/bench.h"
#include "common/cm_version.h"

struct suite {
    const char *name;
    int (*main)(int argc, char **argv);
    const char *what;
};

static const struct suite suites[] = {
    {"ipc", bench_ipc_main, "round trip client -> gorgond -> client: shm busy-poll, shm futex, AF_UNIX"},
    {"engine", bench_engine_main, "prefill and decode tokens/s against the memory-bandwidth roofline"},
    {"medusa", bench_medusa_main, "Medusa vs plain greedy: tokens/step, head acceptance, speedup, step cost"},
    {"serve", bench_serve_main,
     "load gorgond (shm) or any OpenAI server (--base-url): TTFT/TPOT/ITL/E2EL, throughput (vllm bench serve)"},
};

static void usage(FILE *f)
{
    fprintf(f, "usage: gorgon-bench SUITE [options] [--json]\n\nsuites:\n");
    for (size_t i = 0; i < sizeof(suites) / sizeof(suites[0]); i++)
        fprintf(f, "  %-8s %s\n", suites[i].name, suites[i].what);
    fprintf(f, "\n`gorgon-bench SUITE --help` lists a suite's options.\n");
}

int main(int argc, char **argv)
{
    if (cm_version_requested(argc, argv, "gorgon-bench"))
        return 0;
    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    for (size_t i = 0; i < sizeof(suites) / sizeof(suites[0]); i++)
        if (!strcmp(argv[1], suites[i].name))
            return suites[i].main(argc - 1, argv + 1);
    fprintf(stderr, "gorgon-bench: unknown suite '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}
