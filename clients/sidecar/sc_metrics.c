/* /metrics: the sidecar's own series (requests by endpoint and status,
 * tokens, latency histograms as vLLM names them) and gorgond's counters,
 * in the Prometheus text exposition format 0.0.4. Writers are the serving
 * threads; every cell is a relaxed atomic (a scrape may see a histogram
 * mid-update, which Prometheus tolerates). */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clients/sidecar/sidecar.h"

#define N_STATUS 600

static const char *const ep_names[SC_EP_COUNT] = {
    [SC_EP_COMPLETIONS] = "/v1/completions", [SC_EP_CHAT] = "/v1/chat/completions",
    [SC_EP_MODELS] = "/v1/models",           [SC_EP_HEALTH] = "/health",
    [SC_EP_METRICS] = "/metrics",            [SC_EP_TOKENIZE] = "/tokenize",
    [SC_EP_DETOKENIZE] = "/detokenize",      [SC_EP_OTHER] = "other",
};

const char *sc_endpoint_name(enum sc_endpoint e)
{
    return ep_names[e];
}

static atomic_ulong requests[SC_EP_COUNT][N_STATUS];
static atomic_ulong prompt_tokens, completion_tokens, cancelled;
atomic_long sc_running, sc_queued;

typedef struct hist {
    const char *name, *help;
    const double *le; /* upper bounds in seconds */
    int n;
    atomic_ulong bucket[16];
    atomic_ulong count, sum_ns;
} hist;

static const double ttft_le[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                 0.1,    0.25,  0.5,    1,     2.5,  5,     10};
static const double itl_le[] = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                                0.025,  0.05,    0.1,    0.25,  0.5,    1};
static const double e2e_le[] = {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120};

#define NLE(a) ((int)(sizeof(a) / sizeof((a)[0])))
static hist h_ttft = {.name = "gorgon_sidecar_time_to_first_token_seconds",
                      .help = "Request received to first token out of gorgond",
                      .le = ttft_le, .n = NLE(ttft_le)};
static hist h_itl = {.name = "gorgon_sidecar_inter_token_latency_seconds",
                     .help = "Time between successive text chunks of a stream",
                     .le = itl_le, .n = NLE(itl_le)};
static hist h_e2e = {.name = "gorgon_sidecar_e2e_request_latency_seconds",
                     .help = "Request received to final chunk", .le = e2e_le, .n = NLE(e2e_le)};

static void observe(hist *h, uint64_t ns)
{
    double s = (double)ns / 1e9;
    for (int i = 0; i < h->n; i++)
        if (s <= h->le[i]) {
            atomic_fetch_add_explicit(&h->bucket[i], 1, memory_order_relaxed);
            break;
        }
    atomic_fetch_add_explicit(&h->count, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->sum_ns, ns, memory_order_relaxed);
}

void sc_metrics_ttft(uint64_t ns) { observe(&h_ttft, ns); }
void sc_metrics_itl(uint64_t ns) { observe(&h_itl, ns); }
void sc_metrics_e2e(uint64_t ns) { observe(&h_e2e, ns); }

void sc_metrics_request(enum sc_endpoint e, unsigned status)
{
    if (status >= N_STATUS)
        status = 0;
    atomic_fetch_add_explicit(&requests[e][status], 1, memory_order_relaxed);
}

void sc_metrics_tokens(uint32_t prompt, uint32_t completion)
{
    atomic_fetch_add_explicit(&prompt_tokens, prompt, memory_order_relaxed);
    atomic_fetch_add_explicit(&completion_tokens, completion, memory_order_relaxed);
}

void sc_metrics_cancelled(void)
{
    atomic_fetch_add_explicit(&cancelled, 1, memory_order_relaxed);
}

static unsigned long ld(atomic_ulong *a)
{
    return atomic_load_explicit(a, memory_order_relaxed);
}

static void head(sc_buf *b, const char *name, const char *type, const char *help)
{
    sc_buf_addf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void render_hist(sc_buf *b, hist *h)
{
    head(b, h->name, "histogram", h->help);
    unsigned long cum = 0;
    for (int i = 0; i < h->n; i++) {
        cum += ld(&h->bucket[i]);
        sc_buf_addf(b, "%s_bucket{le=\"%g\"} %lu\n", h->name, h->le[i], cum);
    }
    unsigned long count = ld(&h->count);
    /* count is bumped after the bucket: never report +Inf below a bucket */
    sc_buf_addf(b, "%s_bucket{le=\"+Inf\"} %lu\n", h->name, count > cum ? count : cum);
    sc_buf_addf(b, "%s_sum %.9f\n", h->name, (double)ld(&h->sum_ns) / 1e9);
    sc_buf_addf(b, "%s_count %lu\n", h->name, count > cum ? count : cum);
}

static void gauge(sc_buf *b, const char *name, const char *help, double v)
{
    head(b, name, "gauge", help);
    sc_buf_addf(b, "%s %.17g\n", name, v);
}

static void counter(sc_buf *b, const char *name, const char *help, unsigned long long v)
{
    head(b, name, "counter", help);
    sc_buf_addf(b, "%s %llu\n", name, v);
}

/* One labelled sample per worker group. */
static void per_group(sc_buf *b, const char *name, const char *type, const char *help,
                      const gorgon_group *g, int n, size_t field_off)
{
    head(b, name, type, help);
    for (int i = 0; i < n; i++)
        sc_buf_addf(b, "%s{group=\"%u\"} %llu\n", name, g[i].group,
                    (unsigned long long)*(const uint64_t *)((const char *)&g[i] + field_off));
}

char *sc_metrics_render(const gorgon_counters *st, const gorgon_group *groups, int n_groups,
                        size_t *len)
{
    sc_buf b = {0};
    head(&b, "gorgon_sidecar_requests_total", "counter",
         "HTTP requests answered, by endpoint and status code");
    for (int e = 0; e < SC_EP_COUNT; e++)
        for (int s = 0; s < N_STATUS; s++) {
            unsigned long v = ld(&requests[e][s]);
            if (v)
                sc_buf_addf(&b, "gorgon_sidecar_requests_total{endpoint=\"%s\",status=\"%d\"} %lu\n",
                            ep_names[e], s, v);
        }
    counter(&b, "gorgon_sidecar_prompt_tokens_total", "Prompt tokens of finished requests",
            ld(&prompt_tokens));
    counter(&b, "gorgon_sidecar_generation_tokens_total", "Tokens generated for finished requests",
            ld(&completion_tokens));
    counter(&b, "gorgon_sidecar_requests_cancelled_total",
            "Generations cancelled because their client went away", ld(&cancelled));
    gauge(&b, "gorgon_sidecar_requests_running", "Generations submitted to gorgond, not finished",
          (double)atomic_load(&sc_running));
    gauge(&b, "gorgon_sidecar_requests_queued",
          "Generations waiting in the sidecar for a free gorgond slot",
          (double)atomic_load(&sc_queued));
    render_hist(&b, &h_ttft);
    render_hist(&b, &h_itl);
    render_hist(&b, &h_e2e);
    gauge(&b, "gorgon_up", "1 when gorgond answered this scrape", st ? 1 : 0);
    if (st) {
        gauge(&b, "gorgon_requests_running", "Generations running in gorgond's worker",
              (double)st->gen_running);
        gauge(&b, "gorgon_requests_queued", "Generations in the worker waiting for KV blocks",
              (double)st->gen_queued);
        gauge(&b, "gorgon_requests_waiting", "Generations gorgond holds before the worker",
              (double)st->gen_waiting);
        gauge(&b, "gorgon_kv_blocks_used", "KV cache blocks in use", (double)st->kv_blocks_used);
        gauge(&b, "gorgon_kv_blocks_total", "KV cache blocks", (double)st->kv_blocks_total);
        counter(&b, "gorgon_generation_tokens_total", "Tokens gorgond generated",
                st->gen_tokens_total);
        counter(&b, "gorgon_generate_requests_total", "Generate requests gorgond accepted",
                st->gen_requests_total);
        counter(&b, "gorgon_generate_failed_total", "Generate requests that failed",
                st->gen_failed);
        counter(&b, "gorgon_generate_cancelled_total",
                "Generate requests cancelled (by their client, a disconnect or shutdown)",
                st->gen_cancelled);
        counter(&b, "gorgon_medusa_steps_total", "Sequence-steps decoded with Medusa heads",
                st->medusa_steps);
        counter(&b, "gorgon_medusa_accepted_tokens_total",
                "Candidate tokens the Medusa steps accepted", st->medusa_accepted);
        counter(&b, "gorgon_worker_restarts_total", "Worker processes restarted",
                st->worker_restarts);
        gauge(&b, "gorgon_clients", "Clients connected to gorgond", (double)st->clients_now);
        counter(&b, "gorgon_handoffs_total",
                "Requests handed from a prefill to a decode group (mode = disaggregated)",
                st->gen_handoffs_total);
        gauge(&b, "gorgon_handoff_waiting",
              "Requests handed off that no decode group has adopted yet (waiting for KV room)",
              (double)st->gen_handoff_waiting);
    }
    if (n_groups > 0) {
        head(&b, "gorgon_group_up", "gauge",
             "1 when the worker group serves (0: starting, restarting or given up)");
        for (int i = 0; i < n_groups; i++)
            sc_buf_addf(&b, "gorgon_group_up{group=\"%u\"} %d\n", groups[i].group,
                        groups[i].state == GORGON_GROUP_READY);
        static const char *const roles[] = {"colocated", "prefill", "decode"};
        head(&b, "gorgon_group_role", "gauge", "1, labelled with the worker group's role");
        for (int i = 0; i < n_groups; i++)
            sc_buf_addf(&b, "gorgon_group_role{group=\"%u\",role=\"%s\"} 1\n", groups[i].group,
                        (unsigned)groups[i].role < 3 ? roles[groups[i].role] : "colocated");
        per_group(&b, "gorgon_group_requests_running", "gauge",
                  "Generations running in the worker group", groups, n_groups,
                  offsetof(gorgon_group, running));
        per_group(&b, "gorgon_group_kv_blocks_used", "gauge",
                  "KV cache blocks in use in the worker group", groups, n_groups,
                  offsetof(gorgon_group, kv_blocks_used));
        per_group(&b, "gorgon_group_generation_tokens_total", "counter",
                  "Tokens the worker group generated", groups, n_groups,
                  offsetof(gorgon_group, tokens_total));
        per_group(&b, "gorgon_group_restarts_total", "counter",
                  "Restarts of the worker group", groups, n_groups,
                  offsetof(gorgon_group, restarts));
    }
    return sc_buf_take(&b, len);
}
