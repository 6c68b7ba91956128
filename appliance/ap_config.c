/* gorgond configuration: defaults, then the [gorgond] section of --config,
 * then flags. Every bad value is reported naming the key or flag. */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "appliance/ap.h"
#include "common/cm_device.h"
#include "common/common.h"
#include "ipc/ipc.h"

void ap_config_defaults(ap_config *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    snprintf(cfg->socket, sizeof(cfg->socket), "%s", ipc_socket_path(NULL));
    cfg->poll_us = -1; /* auto */
    cfg->sq_entries = 256;
    cfg->cq_entries = 512;
    cfg->slots = 64;
    cfg->slot_in_bytes = 16384;
    cfg->slot_out_bytes = 65536;
    cfg->max_clients = 256;
    cfg->max_handshakes = 64;
    cfg->max_handshakes_per_uid = 8;
    cfg->socket_mode = 0660;
    cfg->stats_interval_s = 60;
    cfg->numa_node = -1;
    cfg->log_level = CM_LOG_INFO;
    cfg->threads = 0; /* auto: the worker uses the CPUs it may (kn_threads_auto) */
    cfg->tp = 1;
    cfg->replicas = 1;
    cfg->prefill_groups = cfg->decode_groups = 1;
    cfg->max_seqs = 64;
    cfg->batch_tokens = 256;
    cfg->max_requests = 512;
    cfg->max_requests_per_uid = 256;
    cfg->max_requests_per_session = 64;
    cfg->grace_ms = 5000;
    /* A step is at most batch_tokens of prefill: the worst case we serve
     * on CPUs, 256 tokens of a 7B model on 2 cores, is ~35 s
     * (docs/decisions.md, "Worker watchdog"). */
    cfg->worker_timeout_ms = 60000;
    cfg->worker_start_timeout_ms = 120000;
    snprintf(cfg->device, sizeof(cfg->device), "cpu");
    cfg->kv_fraction = 0.9;
}

void ap_config_usage(FILE *f)
{
    fprintf(f,
            "usage: gorgond [options]\n"
            "  --config FILE        INI file, section [gorgond] (flags override it)\n"
            "  --socket PATH        control socket (default: $GORGON_SOCKET or %s)\n"
            "  --allow-uid U[,U..]  uids allowed to connect (root and our own uid always are)\n"
            "  --allow-gid G[,G..]  gids allowed to connect\n"
            "  --poll-us N|auto     busy-poll budget before sleeping (0: sleep at once;\n"
            "                       auto: 50 when gorgond, the worker's threads and a\n"
            "                       client each have a CPU, else 0)\n"
            "  --sq-entries N       submission ring entries per client (power of two)\n"
            "  --cq-entries N       completion ring entries per client (power of two)\n"
            "  --slots N            request slots per client\n"
            "  --slot-in-bytes N    input buffer per slot\n"
            "  --slot-out-bytes N   output buffer per slot\n"
            "  --max-clients N      sessions at once (more get -EUSERS)\n"
            "  --max-handshakes N   connections waiting for their hello, all users (default 64;\n"
            "                       beyond it the oldest of the user with the most is dropped)\n"
            "  --max-handshakes-per-uid N  the same, per uid (default 8)\n"
            "  --socket-mode MODE   permission bits of the socket, octal (default 0660)\n"
            "  --socket-group G     group of the socket, name or number (default: group\n"
            "                       'gorgon' when it exists, else gorgond's own)\n"
            "  --stats-interval-s N log a stats line every N s (0: never)\n"
            "  --hugepages          back regions with huge pages when possible\n"
            "  --numa-node N        bind regions to NUMA node N (-1: no binding)\n"
            "  --log-level L        error|warn|info|debug|trace\n"
            "  --foreground         do not fork into the background\n"
            "  --eventfd-doorbells  sleep on eventfds even if io_uring FUTEX_WAIT works\n"
            "  --model FILE.gguf    serve generation with this model (worker: gorgon-worker)\n"
            "  --threads N          worker kernel threads, per rank (default 0: the usable\n"
            "                       CPUs, shared among the ranks)\n"
            "  --tp N               tensor parallelism: the worker is a group of N rank\n"
            "                       processes, each holding 1/N of the weights (default 1)\n"
            "  --replicas N         N worker groups serving at once, each request routed to\n"
            "                       the least busy one (default 1)\n"
"  --mode M            colocated (default: a group runs prompts and decoding)\n"
            "                       or disaggregated (prompts in prefill groups, decoding in\n"
            "                       decode groups, the KV handed over in a shared pool)\n"
            "  --prefill-groups N   disaggregated: prefill groups (default 1)\n"
            "  --decode-groups N    disaggregated: decode groups (default 1)\n"
            "  --cpus LIST          pin the ranks (of all groups) to even shares of these\n"
            "                       CPUs, e.g. 0-3\n"
            "                       (default: not pinned)\n"
            "  --kv-blocks N        worker KV pool, 16-position blocks (0: auto)\n"
            "  --device D           where the worker runs the model: cpu (default), cuda\n"
            "                       (device 0) or cuda:N; one GPU per gorgond: no tp > 1,\n"
            "                       replicas > 1 or mode = disaggregated with a GPU\n"
            "  --kv-fraction F      on a GPU with kv_blocks 0: the KV pool takes F of the\n"
            "                       device memory free after the weights (0 < F <= 1;\n"
            "                       default 0.9)\n"
            "  --allow-tf32         on a GPU, F32 weights' GEMMs may round to TF32\n"
            "  --max-seqs N         sequences decoded together (default 64)\n"
            "  --batch-tokens N     new tokens per forward pass, prefill chunks (default 256)\n"
            "  --max-requests N     generate requests in flight, all clients (default 512)\n"
            "  --max-requests-per-uid N      ... of one uid (default 256; 0: no own cap)\n"
            "  --max-requests-per-session N  ... of one connection (default 64; 0: no own cap)\n"
            "  --grace-ms N         SIGTERM: time in-flight requests get to finish (default 5000)\n"
            "  --medusa DIR         decode greedy requests with these Medusa heads\n"
            "  --medusa-tree SPEC   tree: a built-in name or a list such as \"[[0],[0,0],[1]]\"\n"
            "                       (default: DIR/medusa_choices.json, else a 17-node tree)\n"
            "  --medusa-max-batch N speculate only while at most N sequences decode\n"
            "                       (0, default: measured at start-up and from acceptance)\n"
            "  --worker-timeout-ms N kill a worker that completes no step for N ms while it\n"
            "                       has requests (default 60000; 0: never)\n"
            "  --worker-start-timeout-ms N  kill a worker not ready N ms after its start\n"
            "                       (default 120000; 0: never)\n"
            "  -h, --help           this text\n"
            "  --version            the version, then exit\n"
            "config keys: socket socket_mode socket_group allow_uids allow_gids poll_us\n"
            "  sq_entries cq_entries slots slot_in_bytes slot_out_bytes max_clients\n"
            "  max_handshakes max_handshakes_per_uid stats_interval_s hugepages numa_node\n"
            "  log_level foreground eventfd_doorbells model threads tp replicas mode\n"
            "  prefill_groups decode_groups cpus kv_blocks device kv_fraction allow_tf32\n"
            "  max_seqs batch_tokens max_requests max_requests_per_uid max_requests_per_session\n"
            "  grace_ms medusa medusa_tree medusa_max_batch\n"
            "  worker_timeout_ms worker_start_timeout_ms\n",
            IPC_DEFAULT_SOCKET);
}

static int parse_i64(const char *what, const char *s, int64_t min, int64_t max, int64_t *out)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 0);
    if (errno || end == s || *end || v < min || v > max) {
        fprintf(stderr, "gorgond: %s: '%s' is not an integer in [%lld, %lld]\n", what, s,
                (long long)min, (long long)max);
        return -EINVAL;
    }
    *out = v;
    return 0;
}

static int parse_u32(const char *what, const char *s, uint32_t min, uint32_t max, uint32_t *out)
{
    int64_t v;
    int rc = parse_i64(what, s, min, max, &v);
    if (rc == 0)
        *out = (uint32_t)v;
    return rc;
}

static int parse_id_list(const char *what, const char *s, uint32_t *ids, size_t *n)
{
    char buf[1024];
    if (strlen(s) >= sizeof(buf)) {
        fprintf(stderr, "gorgond: %s: list too long\n", what);
        return -EINVAL;
    }
    strcpy(buf, s);
    size_t k = 0;
    char *save = NULL;
    for (char *tok = strtok_r(buf, ", ", &save); tok; tok = strtok_r(NULL, ", ", &save)) {
        int64_t v;
        if (k == AP_MAX_ALLOW) {
            fprintf(stderr, "gorgond: %s: more than %d ids\n", what, AP_MAX_ALLOW);
            return -EINVAL;
        }
        CM_TRY(parse_i64(what, tok, 0, UINT32_MAX - 1, &v));
        ids[k++] = (uint32_t)v;
    }
    *n = k;
    return 0;
}

/* The worker's device, normalised (cm_device_parse: the grammar the
 * kernels take; gorgond itself never links them). */
static int parse_device(const char *what, const char *s, char *out, size_t cap)
{
    int idx;
    if (cm_device_parse(s, &idx) < 0) {
        fprintf(stderr, "gorgond: %s: '%s' is not cpu, cuda or cuda:N\n", what, s);
        return -EINVAL;
    }
    if (idx < 0)
        snprintf(out, cap, "cpu"); /* "device =": the CPU, as for the kernels */
    else if (!strcmp(s, "cuda"))
        snprintf(out, cap, "cuda"); /* as written: messages quote it */
    else
        snprintf(out, cap, "cuda:%d", idx); /* "cuda:007" is cuda:7 */
    return 0;
}

static int parse_bool(const char *what, const char *s, bool *out)
{
    if (!strcmp(s, "1") || !strcasecmp(s, "true") || !strcasecmp(s, "yes") || !strcasecmp(s, "on")) {
        *out = true;
        return 0;
    }
    if (!strcmp(s, "0") || !strcasecmp(s, "false") || !strcasecmp(s, "no") || !strcasecmp(s, "off")) {
        *out = false;
        return 0;
    }
    fprintf(stderr, "gorgond: %s: '%s' is not a boolean\n", what, s);
    return -EINVAL;
}

/* One key = value, from the file ("gorgond.key") or a flag (long name). */
static int set_str(const char *key, const char *val, char *dst, size_t cap)
{
    if (strlen(val) >= cap) {
        fprintf(stderr, "gorgond: %s: longer than %zu bytes\n", key, cap - 1);
        return -EINVAL;
    }
    snprintf(dst, cap, "%s", val);
    return 0;
}

static int apply(ap_config *cfg, const char *key, const char *val)
{
    if (!strcmp(key, "socket")) {
        if (!*val || strlen(val) >= sizeof(cfg->socket)) {
            fprintf(stderr, "gorgond: socket: path empty or longer than %zu bytes\n",
                    sizeof(cfg->socket) - 1);
            return -EINVAL;
        }
        snprintf(cfg->socket, sizeof(cfg->socket), "%s", val);
        return 0;
    }
    if (!strcmp(key, "allow_uids") || !strcmp(key, "allow_uid"))
        return parse_id_list(key, val, cfg->allow_uids, &cfg->n_allow_uids);
    if (!strcmp(key, "allow_gids") || !strcmp(key, "allow_gid"))
        return parse_id_list(key, val, cfg->allow_gids, &cfg->n_allow_gids);
    if (!strcmp(key, "poll_us")) {
        if (!strcmp(val, "auto")) {
            cfg->poll_us = -1;
            return 0;
        }
        return parse_i64(key, val, 0, 10000000, &cfg->poll_us);
    }
    if (!strcmp(key, "sq_entries"))
        return parse_u32(key, val, IPC_RING_MIN_ENTRIES, IPC_RING_MAX_ENTRIES, &cfg->sq_entries);
    if (!strcmp(key, "cq_entries"))
        return parse_u32(key, val, IPC_RING_MIN_ENTRIES, IPC_RING_MAX_ENTRIES, &cfg->cq_entries);
    if (!strcmp(key, "slots"))
        return parse_u32(key, val, 1, IPC_MAX_SLOTS, &cfg->slots);
    if (!strcmp(key, "slot_in_bytes"))
        return parse_u32(key, val, 64, IPC_SLOT_MAX_BYTES, &cfg->slot_in_bytes);
    if (!strcmp(key, "slot_out_bytes"))
        return parse_u32(key, val, 64, IPC_SLOT_MAX_BYTES, &cfg->slot_out_bytes);
    if (!strcmp(key, "max_clients"))
        return parse_u32(key, val, 1, 65536, &cfg->max_clients);
    if (!strcmp(key, "max_handshakes"))
        return parse_u32(key, val, 1, 65536, &cfg->max_handshakes);
    if (!strcmp(key, "max_handshakes_per_uid"))
        return parse_u32(key, val, 1, 65536, &cfg->max_handshakes_per_uid);
    if (!strcmp(key, "socket_mode")) {
        /* octal always, as chmod takes it: "660" is not decimal 660 */
        char *end;
        errno = 0;
        unsigned long v = strtoul(val, &end, 8);
        if (errno || end == val || *end || v > 0777 || val[0] == '-') {
            fprintf(stderr, "gorgond: socket_mode: '%s' is not an octal mode in 0..0777\n",
                    val);
            return -EINVAL;
        }
        cfg->socket_mode = (uint32_t)v;
        return 0;
    }
    if (!strcmp(key, "socket_group"))
        return set_str(key, val, cfg->socket_group, sizeof(cfg->socket_group));
    if (!strcmp(key, "stats_interval_s"))
        return parse_i64(key, val, 0, 86400 * 365, &cfg->stats_interval_s);
    if (!strcmp(key, "hugepages"))
        return parse_bool(key, val, &cfg->hugepages);
    if (!strcmp(key, "foreground"))
        return parse_bool(key, val, &cfg->foreground);
    if (!strcmp(key, "eventfd_doorbells"))
        return parse_bool(key, val, &cfg->eventfd_doorbells);
    if (!strcmp(key, "numa_node")) {
        int64_t v;
        CM_TRY(parse_i64(key, val, -1, 1023, &v));
        cfg->numa_node = (int)v;
        return 0;
    }
    if (!strcmp(key, "model"))
        return set_str(key, val, cfg->model, sizeof(cfg->model));
    if (!strcmp(key, "medusa"))
        return set_str(key, val, cfg->medusa, sizeof(cfg->medusa));
    if (!strcmp(key, "medusa_tree"))
        return set_str(key, val, cfg->medusa_tree, sizeof(cfg->medusa_tree));
    if (!strcmp(key, "medusa_max_batch"))
        return parse_u32(key, val, 0, 4096, &cfg->medusa_max_batch);
    if (!strcmp(key, "threads")) {
        int64_t v;
        CM_TRY(parse_i64(key, val, 0, 1024, &v));
        cfg->threads = (int)v;
        return 0;
    }
    if (!strcmp(key, "tp")) {
        int64_t v;
        CM_TRY(parse_i64(key, val, 1, 64, &v));
        cfg->tp = (int)v;
        return 0;
    }
    if (!strcmp(key, "replicas")) {
        int64_t v;
        CM_TRY(parse_i64(key, val, 1, 64, &v));
        cfg->replicas = (int)v;
        return 0;
    }
    if (!strcmp(key, "mode")) {
        if (!strcmp(val, "colocated") || !strcmp(val, "disaggregated")) {
            cfg->disaggregated = val[0] == 'd';
            return 0;
        }
        fprintf(stderr, "gorgond: mode: '%s' is not colocated or disaggregated\n", val);
        return -EINVAL;
    }
    if (!strcmp(key, "prefill_groups") || !strcmp(key, "decode_groups")) {
        int64_t v;
        CM_TRY(parse_i64(key, val, 1, 32, &v));
        *(key[0] == 'p' ? &cfg->prefill_groups : &cfg->decode_groups) = (int)v;
        return 0;
    }
    if (!strcmp(key, "cpus")) {
        int cpus[1024];
        if (*val && ap_cpu_list_parse(val, cpus, 1024) < 0)
            return -EINVAL;
        return set_str(key, val, cfg->cpus, sizeof(cfg->cpus));
    }
    if (!strcmp(key, "kv_blocks"))
        return parse_i64(key, val, 0, (int64_t)1 << 32, &cfg->kv_blocks);
    if (!strcmp(key, "device"))
        return parse_device(key, val, cfg->device, sizeof(cfg->device));
    if (!strcmp(key, "allow_tf32"))
        return parse_bool(key, val, &cfg->allow_tf32);
    if (!strcmp(key, "kv_fraction")) {
        char *end;
        errno = 0;
        double f = strtod(val, &end);
        if (errno || end == val || *end || !(f > 0 && f <= 1)) {
            fprintf(stderr, "gorgond: kv_fraction: '%s' is not a number in (0, 1]\n", val);
            return -EINVAL;
        }
        cfg->kv_fraction = f;
        return 0;
    }
    if (!strcmp(key, "max_seqs"))
        return parse_u32(key, val, 1, 4096, &cfg->max_seqs);
    if (!strcmp(key, "batch_tokens"))
        return parse_u32(key, val, 1, 1u << 20, &cfg->batch_tokens);
    if (!strcmp(key, "max_requests"))
        return parse_u32(key, val, 1, IPC_MAX_SLOTS, &cfg->max_requests);
    if (!strcmp(key, "max_requests_per_uid"))
        return parse_u32(key, val, 0, IPC_MAX_SLOTS, &cfg->max_requests_per_uid);
    if (!strcmp(key, "max_requests_per_session"))
        return parse_u32(key, val, 0, IPC_MAX_SLOTS, &cfg->max_requests_per_session);
    if (!strcmp(key, "grace_ms"))
        return parse_i64(key, val, 0, 3600000, &cfg->grace_ms);
    if (!strcmp(key, "worker_timeout_ms"))
        return parse_i64(key, val, 0, 86400000, &cfg->worker_timeout_ms);
    if (!strcmp(key, "worker_start_timeout_ms"))
        return parse_i64(key, val, 0, 86400000, &cfg->worker_start_timeout_ms);
    if (!strcmp(key, "log_level")) {
        int lvl = cm_log_parse_level(val);
        if (lvl < 0) {
            fprintf(stderr, "gorgond: log_level: '%s' is not error|warn|info|debug|trace\n", val);
            return -EINVAL;
        }
        cfg->log_level = lvl;
        return 0;
    }
    fprintf(stderr, "gorgond: unknown key '%s'\n", key);
    return -EINVAL;
}

static bool is_pow2(uint32_t v)
{
    return v && !(v & (v - 1));
}

int ap_cpu_list_parse(const char *s, int *cpus, int cap)
{
    int n = 0;
    const char *p = s;
    while (*p) {
        char *end;
        long a = strtol(p, &end, 10), b = a;
        if (end == p || a < 0 || a >= 1024)
            goto bad;
        p = end;
        if (*p == '-') {
            b = strtol(p + 1, &end, 10);
            if (end == p + 1 || b < a || b >= 1024)
                goto bad;
            p = end;
        }
        for (long c = a; c <= b; c++) {
            for (int i = 0; i < n; i++)
                if (cpus[i] == c) {
                    fprintf(stderr, "gorgond: cpus: '%s' names CPU %ld twice\n", s, c);
                    return -EINVAL;
                }
            if (n == cap)
                goto bad;
            cpus[n++] = (int)c;
        }
        if (*p == ',')
            p++;
        else if (*p)
            goto bad;
    }
    if (n > 0)
        return n;
bad:
    fprintf(stderr, "gorgond: cpus: '%s' is not a CPU list such as 0-3,6 (CPUs below 1024)\n",
            s);
    return -EINVAL;
}

static int check(const ap_config *cfg)
{
    if (cfg->cpus[0]) {
        int cpus[1024];
        int n = ap_cpu_list_parse(cfg->cpus, cpus, 1024);
        if (n < 0)
            return n;
        if (n < cfg->tp * ap_config_groups(cfg)) {
            char ranks[96];
            if (ap_config_groups(cfg) > 1)
                snprintf(ranks, sizeof ranks, "tp = %d x %s = %d: %d", cfg->tp,
                         cfg->disaggregated ? "prefill + decode groups" : "replicas",
                         ap_config_groups(cfg), cfg->tp * ap_config_groups(cfg));
            else
                snprintf(ranks, sizeof ranks, "tp = %d", cfg->tp);
            fprintf(stderr, "gorgond: %s ranks need at least one CPU each; cpus = %s gives %d\n",
                    ranks, cfg->cpus, n);
            return -EINVAL;
        }
    }
    /* One GPU per gorgond for now: a worker group is one process on one
     * device (docs/gpu.md). */
    if (ap_config_on_device(cfg) && cfg->tp > 1) {
        fprintf(stderr, "gorgond: device = %s with tp = %d: tensor parallelism on GPUs needs "
                        "NCCL groups, which the worker does not have yet (one GPU per gorgond: "
                        "tp = 1)\n", cfg->device, cfg->tp);
        return -EINVAL;
    }
    if (ap_config_on_device(cfg) && cfg->disaggregated) {
        fprintf(stderr, "gorgond: device = %s with mode = disaggregated: the prefill -> decode "
                        "hand-off pool is host shared memory, which GPU workers do not read "
                        "(one GPU per gorgond: mode = colocated)\n", cfg->device);
        return -EINVAL;
    }
    if (ap_config_on_device(cfg) && cfg->replicas > 1) {
        fprintf(stderr, "gorgond: device = %s with replicas = %d: one GPU per gorgond for now "
                        "(replicas = 1; run one gorgond per GPU)\n", cfg->device, cfg->replicas);
        return -EINVAL;
    }
    if (cfg->disaggregated && cfg->replicas > 1) {
        fprintf(stderr, "gorgond: replicas = %d is for mode = colocated; disaggregated mode "
                        "sizes its groups with prefill_groups and decode_groups\n",
                cfg->replicas);
        return -EINVAL;
    }
    if (!is_pow2(cfg->sq_entries) || !is_pow2(cfg->cq_entries)) {
        fprintf(stderr, "gorgond: sq_entries (%u) and cq_entries (%u) must be powers of two\n",
                cfg->sq_entries, cfg->cq_entries);
        return -EINVAL;
    }
    if (cfg->slot_out_bytes < sizeof(struct ipc_stats)) {
        fprintf(stderr, "gorgond: slot_out_bytes must be at least %zu\n", sizeof(struct ipc_stats));
        return -EINVAL;
    }
    return 0;
}

int ap_config_load_file(ap_config *cfg, const char *path)
{
    cm_config *c;
    int rc = cm_config_load(&c, path);
    if (rc < 0) {
        fprintf(stderr, "gorgond: config %s: %s\n", path,
                rc == -ENOENT ? "no such file" : cm_config_error());
        return rc;
    }
    size_t n = cm_config_count(c);
    for (size_t i = 0; i < n && rc == 0; i++) {
        const char *key, *val;
        if (cm_config_entry(c, i, &key, &val) < 0)
            continue;
        if (strncmp(key, "gorgond.", 8) != 0)
            continue; /* other sections belong to other programs */
        rc = apply(cfg, key + 8, val);
        if (rc < 0)
            fprintf(stderr, "gorgond: in %s [gorgond] %s\n", path, key + 8);
    }
    cm_config_destroy(c);
    return rc;
}

enum {
    OPT_CONFIG = 256,
    OPT_SOCKET,
    OPT_ALLOW_UID,
    OPT_ALLOW_GID,
    OPT_POLL_US,
    OPT_SQ,
    OPT_CQ,
    OPT_SLOTS,
    OPT_SLOT_IN,
    OPT_SLOT_OUT,
    OPT_MAX_CLIENTS,
    OPT_STATS,
    OPT_HUGEPAGES,
    OPT_NUMA,
    OPT_LOG_LEVEL,
    OPT_FOREGROUND,
    OPT_EVENTFD,
    OPT_MODEL,
    OPT_THREADS,
    OPT_TP,
    OPT_REPLICAS,
    OPT_MODE,
    OPT_PREFILL_GROUPS,
    OPT_DECODE_GROUPS,
    OPT_CPUS,
    OPT_KV_BLOCKS,
    OPT_MAX_SEQS,
    OPT_BATCH_TOKENS,
    OPT_MAX_REQUESTS,
    OPT_GRACE,
    OPT_MEDUSA,
    OPT_MEDUSA_TREE,
    OPT_MEDUSA_MAX_BATCH,
    OPT_WORKER_TIMEOUT,
    OPT_WORKER_START_TIMEOUT,
    OPT_MAX_HANDSHAKES,
    OPT_MAX_HANDSHAKES_UID,
    OPT_SOCKET_MODE,
    OPT_SOCKET_GROUP,
    OPT_MAX_REQ_UID,
    OPT_MAX_REQ_SESSION,
    OPT_DEVICE,
    OPT_KV_FRACTION,
    OPT_ALLOW_TF32,
    OPT_HELP, /* (the order above is long_opts' order: errors name the flag from it) */
};

static const struct option long_opts[] = {
    {"config", required_argument, NULL, OPT_CONFIG},
    {"socket", required_argument, NULL, OPT_SOCKET},
    {"allow-uid", required_argument, NULL, OPT_ALLOW_UID},
    {"allow-gid", required_argument, NULL, OPT_ALLOW_GID},
    {"poll-us", required_argument, NULL, OPT_POLL_US},
    {"sq-entries", required_argument, NULL, OPT_SQ},
    {"cq-entries", required_argument, NULL, OPT_CQ},
    {"slots", required_argument, NULL, OPT_SLOTS},
    {"slot-in-bytes", required_argument, NULL, OPT_SLOT_IN},
    {"slot-out-bytes", required_argument, NULL, OPT_SLOT_OUT},
    {"max-clients", required_argument, NULL, OPT_MAX_CLIENTS},
    {"stats-interval-s", required_argument, NULL, OPT_STATS},
    {"hugepages", no_argument, NULL, OPT_HUGEPAGES},
    {"numa-node", required_argument, NULL, OPT_NUMA},
    {"log-level", required_argument, NULL, OPT_LOG_LEVEL},
    {"foreground", no_argument, NULL, OPT_FOREGROUND},
    {"eventfd-doorbells", no_argument, NULL, OPT_EVENTFD},
    {"model", required_argument, NULL, OPT_MODEL},
    {"threads", required_argument, NULL, OPT_THREADS},
    {"tp", required_argument, NULL, OPT_TP},
    {"replicas", required_argument, NULL, OPT_REPLICAS},
    {"mode", required_argument, NULL, OPT_MODE},
    {"prefill-groups", required_argument, NULL, OPT_PREFILL_GROUPS},
    {"decode-groups", required_argument, NULL, OPT_DECODE_GROUPS},
    {"cpus", required_argument, NULL, OPT_CPUS},
    {"kv-blocks", required_argument, NULL, OPT_KV_BLOCKS},
    {"max-seqs", required_argument, NULL, OPT_MAX_SEQS},
    {"batch-tokens", required_argument, NULL, OPT_BATCH_TOKENS},
    {"max-requests", required_argument, NULL, OPT_MAX_REQUESTS},
    {"grace-ms", required_argument, NULL, OPT_GRACE},
    {"medusa", required_argument, NULL, OPT_MEDUSA},
    {"medusa-tree", required_argument, NULL, OPT_MEDUSA_TREE},
    {"medusa-max-batch", required_argument, NULL, OPT_MEDUSA_MAX_BATCH},
    {"worker-timeout-ms", required_argument, NULL, OPT_WORKER_TIMEOUT},
    {"worker-start-timeout-ms", required_argument, NULL, OPT_WORKER_START_TIMEOUT},
    {"max-handshakes", required_argument, NULL, OPT_MAX_HANDSHAKES},
    {"max-handshakes-per-uid", required_argument, NULL, OPT_MAX_HANDSHAKES_UID},
    {"socket-mode", required_argument, NULL, OPT_SOCKET_MODE},
    {"socket-group", required_argument, NULL, OPT_SOCKET_GROUP},
    {"max-requests-per-uid", required_argument, NULL, OPT_MAX_REQ_UID},
    {"max-requests-per-session", required_argument, NULL, OPT_MAX_REQ_SESSION},
    {"device", required_argument, NULL, OPT_DEVICE},
    {"kv-fraction", required_argument, NULL, OPT_KV_FRACTION},
    {"allow-tf32", no_argument, NULL, OPT_ALLOW_TF32},
    {"help", no_argument, NULL, OPT_HELP},
    {NULL, 0, NULL, 0},
};

static const char *opt_key(int c)
{
    switch (c) {
    case OPT_SOCKET: return "socket";
    case OPT_ALLOW_UID: return "allow_uids";
    case OPT_ALLOW_GID: return "allow_gids";
    case OPT_POLL_US: return "poll_us";
    case OPT_SQ: return "sq_entries";
    case OPT_CQ: return "cq_entries";
    case OPT_SLOTS: return "slots";
    case OPT_SLOT_IN: return "slot_in_bytes";
    case OPT_SLOT_OUT: return "slot_out_bytes";
    case OPT_MAX_CLIENTS: return "max_clients";
    case OPT_STATS: return "stats_interval_s";
    case OPT_NUMA: return "numa_node";
    case OPT_LOG_LEVEL: return "log_level";
    case OPT_MODEL: return "model";
    case OPT_THREADS: return "threads";
    case OPT_TP: return "tp";
    case OPT_REPLICAS: return "replicas";
    case OPT_MODE: return "mode";
    case OPT_PREFILL_GROUPS: return "prefill_groups";
    case OPT_DECODE_GROUPS: return "decode_groups";
    case OPT_CPUS: return "cpus";
    case OPT_KV_BLOCKS: return "kv_blocks";
    case OPT_MAX_SEQS: return "max_seqs";
    case OPT_BATCH_TOKENS: return "batch_tokens";
    case OPT_MAX_REQUESTS: return "max_requests";
    case OPT_GRACE: return "grace_ms";
    case OPT_MEDUSA: return "medusa";
    case OPT_MEDUSA_TREE: return "medusa_tree";
    case OPT_MEDUSA_MAX_BATCH: return "medusa_max_batch";
    case OPT_WORKER_TIMEOUT: return "worker_timeout_ms";
    case OPT_WORKER_START_TIMEOUT: return "worker_start_timeout_ms";
    case OPT_MAX_HANDSHAKES: return "max_handshakes";
    case OPT_MAX_HANDSHAKES_UID: return "max_handshakes_per_uid";
    case OPT_SOCKET_MODE: return "socket_mode";
    case OPT_SOCKET_GROUP: return "socket_group";
    case OPT_MAX_REQ_UID: return "max_requests_per_uid";
    case OPT_MAX_REQ_SESSION: return "max_requests_per_session";
    case OPT_DEVICE: return "device";
    case OPT_KV_FRACTION: return "kv_fraction";
    default: return NULL;
    }
}

int ap_config_from_args(ap_config *cfg, int argc, char **argv)
{
    /* Pass 1: only --config and --help, so the file is applied before any flag. */
    opterr = 0;
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, "h", long_opts, NULL)) != -1) {
        if (c == OPT_HELP || c == 'h') {
            ap_config_usage(stdout);
            return 1;
        }
        if (c == OPT_CONFIG) {
            if (strlen(optarg) >= sizeof(cfg->config_path)) {
                fprintf(stderr, "gorgond: --config: path too long\n");
                return -EINVAL;
            }
            snprintf(cfg->config_path, sizeof(cfg->config_path), "%s", optarg);
            CM_TRY(ap_config_load_file(cfg, optarg));
        }
    }
    opterr = 1;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", long_opts, NULL)) != -1) {
        const char *key = opt_key(c);
        if (key) {
            int rc = apply(cfg, key, optarg);
            if (rc < 0) {
                fprintf(stderr, "gorgond: bad value for --%s\n", long_opts[c - OPT_CONFIG].name);
                return rc;
            }
            continue;
        }
        switch (c) {
        case OPT_CONFIG:
        case OPT_HELP:
        case 'h': break;
        case OPT_HUGEPAGES: cfg->hugepages = true; break;
        case OPT_ALLOW_TF32: cfg->allow_tf32 = true; break;
        case OPT_FOREGROUND: cfg->foreground = true; break;
        case OPT_EVENTFD: cfg->eventfd_doorbells = true; break;
        default:
            ap_config_usage(stderr);
            return -EINVAL;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "gorgond: unexpected argument '%s'\n", argv[optind]);
        return -EINVAL;
    }
    return check(cfg);
}
