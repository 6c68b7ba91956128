/* ap — gorgond, the supervisor: one io_uring loop that accepts clients on the
 * control socket, gives each a sealed shared-memory region (its session),
 * busy-polls every session's submission ring for `poll_us`, then sleeps on
 * IORING_OP_FUTEX_WAIT of every SQ doorbell together with the accept, the
 * client hang-up polls, a signalfd and the stats timer.
 *
 * With cfg.model set it also serves GENERATE: it keeps the tokenizer, runs
 * one gorgon-worker process (model, KV cache, batching scheduler) over a
 * shared command/event ring pair, watches it with a pidfd and the event
 * ring's doorbell in the same loop, and streams decoded text to clients
 * (appliance/ap_gen.c).
 *
 * Threading: single-threaded. Everything here runs on the loop thread; the
 * only cross-process state is the client regions, which are untrusted.
 *
 *   ap_config cfg;
 *   ap_config_defaults(&cfg);
 *   if (ap_config_from_args(&cfg, argc, argv) < 0) return 2;   // file + flags
 *   ap_server *srv;
 *   if (ap_server_create(&srv, &cfg) < 0) return 1;
 *   int rc = ap_server_run(srv);          // returns 0 after SIGTERM/SIGINT
 *   ap_server_destroy(srv);               // unlinks the socket
 */
#ifndef GORGON_AP_H
#define GORGON_AP_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/types.h>

#define AP_MAX_ALLOW 64
#define AP_PATH_MAX 108 /* sizeof(sockaddr_un.sun_path) */

typedef struct ap_config {
    char socket[AP_PATH_MAX];
    char config_path[4096]; /* "" when no --config; SIGHUP re-reads log_level from it */
    uid_t allow_uids[AP_MAX_ALLOW];
    size_t n_allow_uids;
    gid_t allow_gids[AP_MAX_ALLOW];
    size_t n_allow_gids;
    int64_t poll_us;          /* busy-poll budget before sleeping; 0: sleep at once;
                               * -1 (auto): AP_POLL_US_AUTO when the CPUs allow it */
    uint32_t sq_entries;      /* per client, power of two */
    uint32_t cq_entries;      /* per client, power of two */
    uint32_t slots;           /* request slots per client */
    uint32_t slot_in_bytes;   /* per slot */
    uint32_t slot_out_bytes;  /* per slot */
    uint32_t max_clients;     /* established sessions at once */
    uint32_t max_handshakes;  /* connections waiting for their hello, all uids */
    uint32_t max_handshakes_per_uid;
    uint32_t socket_mode;     /* permission bits of the socket file */
    char socket_group[64];    /* group of the socket file; "" = gorgond's own */
    int64_t stats_interval_s; /* 0: no periodic stats line */
    bool hugepages;
    int numa_node; /* -1: no binding */
    int log_level; /* enum cm_log_level */
    bool foreground;
    bool eventfd_doorbells; /* force the eventfd fallback (testing) */
    /* generation (appliance/ap_gen.c) */
    char model[4096];        /* GGUF model; "" = no generation (GENERATE -> -ENOTSUP) */
    int threads;             /* worker kernel threads (per rank; 0: its share of the CPUs) */
    int tp;                  /* tensor-parallel ranks of the worker group (1: one process) */
    int replicas;            /* worker groups serving at once (data parallelism) */
    bool disaggregated;      /* mode = disaggregated: prompts run in prefill groups,
                              * decoding in decode groups (docs/disaggregation.md) */
    int prefill_groups, decode_groups; /* disaggregated: groups of each role */
    char cpus[256];          /* CPUs the ranks are pinned to, split evenly ("0-3,6"; "":
                              * not pinned) */
    int64_t kv_blocks;       /* worker KV pool blocks (0: auto) */
    uint32_t max_seqs;       /* sequences the worker decodes at once */
    uint32_t batch_tokens;   /* new tokens per forward (prefill chunk budget) */
    uint32_t max_requests;   /* generate requests in flight, all clients together */
    uint32_t max_requests_per_uid;     /* ... of one uid (0: no cap of its own) */
    uint32_t max_requests_per_session; /* ... of one connection (0: its slots) */
    int64_t grace_ms;        /* SIGTERM: time in-flight requests get to finish */
    char medusa[4096];       /* Medusa heads directory; "" = plain decoding */
    char medusa_tree[4096];  /* tree spec; "" = the fitted one in the directory */
    uint32_t medusa_max_batch; /* largest batch that speculates; 0 = measured */
    int64_t worker_timeout_ms;       /* no step for this long with work: killed (0: never) */
    int64_t worker_start_timeout_ms; /* no READY this long after start: killed (0: never) */
    /* Where the worker runs the model: "cpu", "cuda" or "cuda:N" (the
     * grammar of kn_device_parse; gorgond itself never touches the
     * device). One device per gorgond: with a CUDA device tp, replicas and
     * the disaggregated mode are refused at load (docs/gpu.md). */
    char device[32];
    double kv_fraction; /* on a device with kv_blocks 0: share of the free memory
                         * the KV pool takes, (0, 1] */
    bool allow_tf32;    /* on a device: F32 weights' GEMMs may round to TF32 */
} ap_config;

/* Built-in defaults (socket: $GORGON_SOCKET, else IPC_DEFAULT_SOCKET). */
void ap_config_defaults(ap_config *cfg);
/* The worker runs on a CUDA device (device = cuda or cuda:N). */
static inline bool ap_config_on_device(const ap_config *cfg)
{
    return strncmp(cfg->device, "cuda", 4) == 0;
}
/* Worker groups gorgond runs: replicas, or prefill + decode groups. */
static inline int ap_config_groups(const ap_config *cfg)
{
    return cfg->disaggregated ? cfg->prefill_groups + cfg->decode_groups : cfg->replicas;
}
/* Apply `--config FILE` (section [gorgond]) first, then every other flag on
 * top (flags override the file). Returns 0, 1 when --help/--version was
 * printed (caller exits 0), or -EINVAL with the error printed to stderr. */
int ap_config_from_args(ap_config *cfg, int argc, char **argv);
/* A CPU list "0-3,6" into cpus[] (at most cap); the count, or -EINVAL
 * (message to stderr) for a malformed list, a CPU >= 1024 or a repeat. */
int ap_cpu_list_parse(const char *s, int *cpus, int cap);
/* Apply the [gorgond] keys of one INI file. 0, -ENOENT or -EINVAL (message
 * printed to stderr naming the key). */
int ap_config_load_file(ap_config *cfg, const char *path);
void ap_config_usage(FILE *f);

typedef struct ap_server ap_server;

/* Listen on cfg->socket (creating its parent directory) and set up the loop.
 * On error nothing is left open and the reason is logged. */
int ap_server_create(ap_server **out, const ap_config *cfg);
/* Run until SIGTERM/SIGINT: 0 on a clean stop, -errno on a fatal error. */
int ap_server_run(ap_server *srv);
/* Close every session, unlink the socket, free. NULL is a no-op. */
void ap_server_destroy(ap_server *srv);

/* Service-manager notifications (sd_notify(3)), defined by the program
 * (gorgond.c; no-ops outside systemd). ap_server_run calls ready once, when
 * the socket listens and the worker has loaded the model (at once without
 * one), and stopping when SIGTERM/SIGINT starts the shutdown. */
void ap_notify_ready(const ap_config *cfg);
void ap_notify_stopping(const ap_config *cfg, uint32_t in_flight);

#endif
