/* gorgon-worker — started by gorgond, never by hand: owns the model and runs
 * the continuous-batching decode loop (engine/worker/worker.h) over the worker
 * region whose fd it inherits. */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/common.h"
#include "engine/worker/worker.h"

static void usage(FILE *f)
{
    fputs("usage: gorgon-worker --model FILE --region-fd FD [--wake-fd FD] [--threads N]\n"
          "                     [--kv-blocks N] [--max-seqs N] [--batch-tokens N]\n"
          "                     [--medusa DIR [--medusa-tree SPEC] [--medusa-max-batch N]]\n"
          "                     [--parent PID] [--log-level LEVEL]\n"
          "                     [--device cpu|cuda|cuda:N] [--kv-fraction F] [--allow-tf32]\n"
          "                     [--tp N --rank R --comm-fd FD [--pinned] [--groups G]\n"
          "                      [--step-timeout-ms MS]]\n"
          "                     [--role prefill|decode --kv-ctl-fd FD --kv-pool-fd FD\n"
          "                      --kv-owner ID]\n"
          "Started by gorgond; serves the worker region passed as an inherited fd.\n"
          "With --tp N, one of N tensor-parallel ranks joined by the comm region FD:\n"
          "rank 0 serves the region, ranks 1..N-1 take no --region-fd. A collective\n"
          "inside a step that sees no progress for --step-timeout-ms (default 30000;\n"
          "-1: no limit; gorgond passes its worker_timeout_ms) ends the group.\n"
          "With --role, a prefill or decode group of disaggregated serving over the\n"
          "shared KV pool (control memfd, this rank's pool memfd, the group's owner id).\n"
          "--threads 0: as many kernel threads as CPUs this process may use (affinity\n"
          "mask and cgroup quota; default 1).\n"
          "--device: where the model runs (default cpu); on a CUDA device the weights and\n"
          "the KV pool are in device memory, and --kv-blocks 0 sizes the pool to\n"
          "--kv-fraction F (0 < F <= 1, default 0.9) of the memory free after the\n"
          "weights. One device per worker: no --tp > 1, no --role.\n"
          "Exit status 78: the device cannot serve this model (restarting cannot help);\n"
          "74: the device failed while serving.\n",
          f);
}

static int num(const char *opt, const char *s, long long lo, long long hi, long long *out)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "gorgon-worker: %s: '%s' is not a number in [%lld, %lld]\n", opt, s, lo,
                hi);
        return -EINVAL;
    }
    *out = v;
    return 0;
}

int main(int argc, char **argv)
{
    if (cm_version_requested(argc, argv, "gorgon-worker"))
        return 0;
    eng_worker_cfg cfg = {.region_fd = -1, .wake_fd = -1, .n_threads = 1, .tp = 1,
                          .comm_fd = -1, .kv_ctl_fd = -1, .kv_pool_fd = -1,
                          .device = "cpu", .kv_fraction = 0.9};
    enum { O_REGION = 256, O_WAKE, O_KV, O_SEQS, O_BATCH, O_PARENT, O_LOG, O_MEDUSA, O_MTREE,
           O_MBATCH, O_TP, O_RANK, O_COMM, O_PINNED, O_GROUPS,
           O_ROLE, O_KVCTL, O_KVPOOL, O_KVOWNER, O_DEVICE, O_KVFRAC, O_STEPTO, O_TF32 };
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},       {"threads", required_argument, 0, 't'},
        {"region-fd", required_argument, 0, O_REGION}, {"wake-fd", required_argument, 0, O_WAKE},
        {"kv-blocks", required_argument, 0, O_KV},  {"max-seqs", required_argument, 0, O_SEQS},
        {"batch-tokens", required_argument, 0, O_BATCH},
        {"parent", required_argument, 0, O_PARENT}, {"log-level", required_argument, 0, O_LOG},
        {"medusa", required_argument, 0, O_MEDUSA}, {"medusa-tree", required_argument, 0, O_MTREE},
        {"medusa-max-batch", required_argument, 0, O_MBATCH},
        {"tp", required_argument, 0, O_TP},         {"rank", required_argument, 0, O_RANK},
        {"comm-fd", required_argument, 0, O_COMM}, {"pinned", no_argument, 0, O_PINNED},
        {"groups", required_argument, 0, O_GROUPS},
        {"role", required_argument, 0, O_ROLE},     {"kv-ctl-fd", required_argument, 0, O_KVCTL},
        {"kv-pool-fd", required_argument, 0, O_KVPOOL},
        {"kv-owner", required_argument, 0, O_KVOWNER},
        {"device", required_argument, 0, O_DEVICE}, {"kv-fraction", required_argument, 0, O_KVFRAC},
        {"step-timeout-ms", required_argument, 0, O_STEPTO},
        {"allow-tf32", no_argument, 0, O_TF32},
        {"help", no_argument, 0, 'h'},              {0, 0, 0, 0},
    };
    int c;
    long long v = 0;
    while ((c = getopt_long(argc, argv, "m:t:h", opts, NULL)) != -1) {
        int rc = 0;
        switch (c) {
        case 'm': cfg.model_path = optarg; break;
        case 't': rc = num("--threads", optarg, 0, 256, &v), cfg.n_threads = (int)v; break;
        case O_REGION: rc = num("--region-fd", optarg, 0, 1 << 20, &v), cfg.region_fd = (int)v; break;
        case O_WAKE: rc = num("--wake-fd", optarg, -1, 1 << 20, &v), cfg.wake_fd = (int)v; break;
        case O_KV: rc = num("--kv-blocks", optarg, 0, 1ll << 40, &v), cfg.kv_blocks = v; break;
        case O_SEQS: rc = num("--max-seqs", optarg, 0, 4096, &v), cfg.max_seqs = (int)v; break;
        case O_BATCH:
            rc = num("--batch-tokens", optarg, 0, 1 << 20, &v), cfg.max_batch_tokens = v;
            break;
        case O_MEDUSA: cfg.medusa_dir = optarg; break;
        case O_MTREE: cfg.medusa_tree = optarg; break;
        case O_MBATCH:
            rc = num("--medusa-max-batch", optarg, 0, 4096, &v), cfg.medusa_max_batch = (int)v;
            break;
        case O_TP: rc = num("--tp", optarg, 1, 64, &v), cfg.tp = (int)v; break;
        case O_RANK: rc = num("--rank", optarg, 0, 63, &v), cfg.rank = (int)v; break;
        case O_COMM: rc = num("--comm-fd", optarg, 0, 1 << 20, &v), cfg.comm_fd = (int)v; break;
        case O_PINNED: cfg.pinned = true; break;
        case O_GROUPS: rc = num("--groups", optarg, 1, 64, &v), cfg.groups = (int)v; break;
        case O_ROLE:
            if (!strcmp(optarg, "prefill")) {
                cfg.role = ENG_WORKER_PREFILL;
            } else if (!strcmp(optarg, "decode")) {
                cfg.role = ENG_WORKER_DECODE;
            } else {
                fprintf(stderr, "gorgon-worker: --role: '%s' is not prefill or decode\n", optarg);
                return 2;
            }
            break;
        case O_KVCTL: rc = num("--kv-ctl-fd", optarg, 0, 1 << 20, &v), cfg.kv_ctl_fd = (int)v; break;
        case O_KVPOOL:
            rc = num("--kv-pool-fd", optarg, 0, 1 << 20, &v), cfg.kv_pool_fd = (int)v;
            break;
        case O_KVOWNER:
            rc = num("--kv-owner", optarg, 0, 1 << 20, &v), cfg.kv_owner = (uint32_t)v;
            break;
        case O_DEVICE: cfg.device = optarg; break;
        case O_TF32: setenv("GORGON_ALLOW_TF32", "1", 1); break; /* read by the CUDA matmul */
        case O_STEPTO:
            rc = num("--step-timeout-ms", optarg, -1, 86400000, &v), cfg.step_timeout_ms = v;
            break;
        case O_KVFRAC: {
            char *end;
            errno = 0;
            double f = strtod(optarg, &end);
            if (errno || end == optarg || *end || !(f > 0 && f <= 1)) {
                fprintf(stderr, "gorgon-worker: --kv-fraction: '%s' is not a number in (0, 1]\n",
                        optarg);
                return 2;
            }
            cfg.kv_fraction = f;
            break;
        }
        case O_PARENT: rc = num("--parent", optarg, 0, 1ll << 31, &v), cfg.parent = (pid_t)v; break;
        case O_LOG: {
            int lvl = cm_log_parse_level(optarg);
            if (lvl < 0) {
                fprintf(stderr, "gorgon-worker: --log-level: unknown level '%s'\n", optarg);
                return 2;
            }
            cm_log_set_level((enum cm_log_level)lvl);
            break;
        }
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
        if (rc < 0)
            return 2;
    }
    if (!cfg.model_path || (cfg.rank == 0 && cfg.region_fd < 0)) {
        fprintf(stderr, "gorgon-worker: --model and (for rank 0) --region-fd are required\n");
        usage(stderr);
        return 2;
    }
    if (cfg.rank >= cfg.tp || (cfg.tp > 1 && cfg.comm_fd < 0)) {
        fprintf(stderr, "gorgon-worker: --rank %d --tp %d%s: a rank below --tp, and --comm-fd "
                        "with --tp > 1\n",
                cfg.rank, cfg.tp, cfg.comm_fd < 0 ? " without --comm-fd" : "");
        return 2;
    }
    if (cfg.role != ENG_WORKER_BOTH && (cfg.kv_ctl_fd < 0 || cfg.kv_pool_fd < 0)) {
        fprintf(stderr, "gorgon-worker: --role needs --kv-ctl-fd and --kv-pool-fd (the shared "
                        "KV pool)\n");
        return 2;
    }
    char why[512];
    if (eng_worker_cfg_check(&cfg, why, sizeof why) < 0) {
        fprintf(stderr, "gorgon-worker: %s\n", why);
        return 2;
    }
    int rc = eng_worker_run(&cfg);
    return rc == -ENODEV             ? ENG_WORKER_EXIT_DEVICE
           : rc == -ENOTRECOVERABLE ? ENG_WORKER_EXIT_DEVICE_LOST
           : rc < 0                 ? 1
                                    : 0;
}
