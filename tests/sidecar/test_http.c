/* gorgon-sidecar over HTTP with curl, in front of a real gorgond on
 * stories260K: SSE framing byte for byte, /metrics against a Prometheus
 * text-format checker, /health while gorgond is down, OpenAI-style errors
 * naming the parameter, 413/401/404/405, gorgond at capacity (429) and the
 * sidecar's own queue (503), greedy text equal to `gorgon generate` and the
 * stories260K golden, /tokenize and /detokenize against libgorgon, --unix,
 * a stream's head and first event in one segment. */
#include <criterion/criterion.h>
#include <jansson.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tests/clients/util/gd_proc.h"
#include "tests/sidecar/util/prom_check.h"
#include "tests/sidecar/util/sc_test.h"
#include "tests/util/test_models.h"

static gd_proc gd;
static sct_sidecar sc;
static char tmpl_model[160]; /* a GGUF written by a test, removed by teardown */

/* End of a test body: the sidecar must exit 0 on SIGTERM (a crash, a
 * sanitizer report or a hang shows up here, with its stderr). */
#define SC_END()                                                                    \
    do {                                                                            \
        char err_[8192];                                                            \
        snprintf(err_, sizeof(err_), "%s", sct_stderr(&sc));                        \
        int st_ = sct_stop(&sc);                                                    \
        cr_assert_eq(sct_exit_code(st_), 0, "gorgon-sidecar exited with status %d:\n%s", \
                     st_, err_);                                                    \
    } while (0)

static void teardown(void)
{
    sct_stop(&sc);
    gd_stop(&gd);
    if (tmpl_model[0])
        unlink(tmpl_model);
}

static void start_gd(const char *a, const char *b, const char *c, const char *d)
{
    int rc = gd_start(&gd, "--model", tu_model_path("stories260K/stories260K.gguf"), a, b, c, d,
                      NULL);
    cr_assert_eq(rc, 0, "gorgond did not start: %s", strerror(-rc));
}

/* gorgon-sidecar with up to four more arguments (NULL ends them). */
static void start_sidecar(const char *a, const char *b, const char *c, const char *d)
{
    int rc = sct_start(&sc, gd.sock, a, b, c, d, NULL);
    cr_assert_eq(rc, 0, "gorgon-sidecar did not start (%s):\n%s", strerror(-rc), sct_stderr(&sc));
}

typedef struct resp {
    int status;
    char *raw;        /* headers and body as curl printed them */
    const char *head; /* the final response's header block */
    const char *body;
} resp;

/* One request with curl (body from stdin when not NULL; extra: more curl
 * arguments, NULL-terminated). */
static resp http_req(const char *method, const char *path, const char *body, const char *const *extra)
{
    char url[256];
    const char *argv[32];
    int n = 0;
    argv[n++] = "curl";
    argv[n++] = "-sS";
    argv[n++] = "-g"; /* no URL globbing: [::1] is an address */
    argv[n++] = "-i";
    argv[n++] = "-N";
    argv[n++] = "--max-time";
    argv[n++] = "60";
    argv[n++] = "-X";
    argv[n++] = method;
    if (body) {
        argv[n++] = "-H";
        argv[n++] = "Content-Type: application/json";
        argv[n++] = "--data-binary";
        argv[n++] = "@-";
    }
    for (; extra && *extra && n < 28; extra++)
        argv[n++] = *extra;
    if (!strncmp(sc.url, "unix:", 5)) {
        argv[n++] = "--unix-socket";
        argv[n++] = sc.url + 5;
        snprintf(url, sizeof(url), "http://sidecar%s", path);
    } else {
        snprintf(url, sizeof(url), "%s%s", sc.url, path);
    }
    argv[n++] = url;
    argv[n] = NULL;
    resp r = {0};
    char *err;
    int st = sct_run(argv, body, &r.raw, &err);
    cr_assert_eq(sct_exit_code(st), 0, "curl %s %s: status %d: %s", method, path, st, err);
    free(err);
    /* skip 1xx interim responses */
    char *h = r.raw;
    for (;;) {
        char *end = strstr(h, "\r\n\r\n");
        cr_assert_not_null(end, "no header block in: %s", r.raw);
        cr_assert_eq(sscanf(h, "HTTP/%*s %d", &r.status), 1, "no status line: %s", h);
        *end = '\0';
        if (r.status >= 200) {
            r.head = h;
            r.body = end + 4;
            break;
        }
        h = end + 4;
    }
    return r;
}

static resp post(const char *path, const char *body)
{
    return http_req("POST", path, body, NULL);
}

static resp get(const char *path)
{
    return http_req("GET", path, NULL, NULL);
}

static bool has_header(const resp *r, const char *line)
{
    /* header names are case-insensitive; compare the line whole */
    size_t n = strlen(line);
    for (const char *p = r->head; p; p = strstr(p, "\r\n") ? strstr(p, "\r\n") + 2 : NULL)
        if (!strncasecmp(p, line, n) && (p[n] == '\r' || p[n] == '\0'))
            return true;
    return false;
}

static json_t *body_json(const resp *r)
{
    json_error_t je;
    json_t *j = json_loads(r->body, 0, &je);
    cr_assert_not_null(j, "body is not JSON (%s): %s", je.text, r->body);
    return j;
}

/* The error object of a refusal: status, param and a message. */
static void expect_error(const char *path, const char *body, int status, const char *param)
{
    resp r = post(path, body);
    cr_assert_eq(r.status, status, "%s %s: status %d, want %d: %s", path, body, r.status, status,
                 r.body);
    json_t *j = body_json(&r);
    json_t *e = json_object_get(j, "error");
    cr_assert(json_is_object(e), "no error object: %s", r.body);
    cr_assert(json_is_string(json_object_get(e, "message")) &&
              json_string_length(json_object_get(e, "message")) > 0);
    cr_assert(json_is_string(json_object_get(e, "type")));
    cr_assert(json_object_get(e, "code") != NULL, "no 'code' key: %s", r.body);
    json_t *p = json_object_get(e, "param");
    if (param)
        cr_assert(json_is_string(p) && !strcmp(json_string_value(p), param),
                  "%s: param is not '%s': %s", body, param, r.body);
    else
        cr_assert(json_is_null(p), "%s: param should be null: %s", body, r.body);
    json_decref(j);
    free(r.raw);
}

static char *dump(json_t *v)
{
    char *s = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
    cr_assert_not_null(s);
    return s;
}

/* Split an SSE body into its events; each must be exactly "data: X\n\n"
 * with no other newline. Returns the count; ev[i] point into body. */
static int sse_events(char *body, char **ev, int cap)
{
    int n = 0;
    char *p = body;
    while (*p) {
        cr_assert_eq(strncmp(p, "data: ", 6), 0, "event %d does not start with 'data: ': %.80s", n,
                     p);
        char *end = strstr(p, "\n\n");
        cr_assert_not_null(end, "event %d is not ended by a blank line: %.80s", n, p);
        *end = '\0';
        cr_assert_null(strchr(p, '\n'), "event %d spans lines: %s", n, p);
        cr_assert_lt(n, cap);
        ev[n++] = p + 6;
        p = end + 2;
    }
    return n;
}

Test(sidecar_http, sse_framing_is_byte_exact, .fini = teardown, .timeout = 60)
{
    start_gd(NULL, NULL, NULL, NULL);
    start_sidecar(NULL, NULL, NULL, NULL);
    char *want = sct_gorgon_generate(gd.sock, "Once upon a time", 40);
    resp r = post("/v1/completions", "{\"model\":\"x\",\"prompt\":\"Once upon a time\","
                                     "\"max_tokens\":40,\"temperature\":0,\"stream\":true,"
                                     "\"stream_options\":{\"include_usage\":true}}");
    cr_assert_eq(r.status, 200, "%s", r.body);
    cr_assert(has_header(&r, "Content-Type: text/event-stream"), "%s", r.head);
    cr_assert(has_header(&r, "Transfer-Encoding: chunked"), "%s", r.head);
    cr_assert(has_header(&r, "Cache-Control: no-cache"), "%s", r.head);
    size_t blen = strlen(r.body);
    cr_assert_geq(blen, 14);
    cr_assert_str_eq(r.body + blen - 14, "data: [DONE]\n\n", "the stream does not end with [DONE]");
    char *ev[512];
    int n = sse_events((char *)r.body, ev, 512);
    cr_assert_geq(n, 4, "text, final, usage and [DONE]: %d events", n);
    json_t *first = json_loads(ev[0], 0, NULL);
    cr_assert_not_null(first, "%s", ev[0]);
    const char *id = json_string_value(json_object_get(first, "id"));
    json_int_t created = json_integer_value(json_object_get(first, "created"));
    char model[128];
    snprintf(model, sizeof(model), "%s", json_string_value(json_object_get(first, "model")));
    cr_assert(id && !strncmp(id, "cmpl-", 5), "%s", ev[0]);
    cr_assert_gt(created, 1600000000);
    char head[512];
    snprintf(head, sizeof(head), "{\"id\":\"%s\",\"object\":\"text_completion\",\"created\":%lld,"
             "\"model\":\"%s\",", id, (long long)created, model);
    /* text events: exactly this shape, their texts concatenated = gorgon generate */
    size_t got_len = 0;
    static char got[1 << 16];
    for (int i = 0; i < n - 3; i++) {
        json_t *j = json_loads(ev[i], 0, NULL);
        cr_assert_not_null(j, "event %d is not JSON: %s", i, ev[i]);
        json_t *text = json_object_get(json_array_get(json_object_get(j, "choices"), 0), "text");
        cr_assert(json_is_string(text), "%s", ev[i]);
        char *t = dump(text);
        char exp[4096];
        snprintf(exp, sizeof(exp), "%s\"choices\":[{\"text\":%s,\"index\":0,\"logprobs\":null,"
                 "\"finish_reason\":null}],\"usage\":null}", head, t);
        cr_assert_str_eq(ev[i], exp, "event %d", i);
        memcpy(got + got_len, json_string_value(text), json_string_length(text));
        got_len += json_string_length(text);
        free(t);
        json_decref(j);
    }
    got[got_len] = '\0';
    cr_assert_str_eq(got, want, "streamed text != gorgon generate");
    char exp[1024];
    snprintf(exp, sizeof(exp), "%s\"choices\":[{\"text\":\"\",\"index\":0,\"logprobs\":null,"
             "\"finish_reason\":\"length\"}],\"usage\":null}", head);
    cr_assert_str_eq(ev[n - 3], exp);
    snprintf(exp, sizeof(exp), "%s\"choices\":[],\"usage\":{\"prompt_tokens\":5,"
             "\"completion_tokens\":40,\"total_tokens\":45}}", head);
    cr_assert_str_eq(ev[n - 2], exp);
    cr_assert_str_eq(ev[n - 1], "[DONE]");
    json_decref(first);
    free(r.raw);

    /* chat, without include_usage: the role in the first delta, no usage key */
    r = post("/v1/chat/completions", "{\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],"
                                     "\"max_tokens\":12,\"temperature\":0,\"stream\":true}");
    cr_assert_eq(r.status, 200, "%s", r.body);
    n = sse_events((char *)r.body, ev, 512);
    cr_assert_geq(n, 3);
    first = json_loads(ev[0], 0, NULL);
    id = json_string_value(json_object_get(first, "id"));
    created = json_integer_value(json_object_get(first, "created"));
    cr_assert(id && !strncmp(id, "chatcmpl-", 9), "%s", ev[0]);
    snprintf(head, sizeof(head), "{\"id\":\"%s\",\"object\":\"chat.completion.chunk\",\"created\":"
             "%lld,\"model\":\"%s\",", id, (long long)created, model);
    char *t0 = dump(json_object_get(json_object_get(json_array_get(json_object_get(first,
                                                                                    "choices"), 0),
                                                    "delta"), "content"));
    snprintf(exp, sizeof(exp), "%s\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\","
             "\"content\":%s},\"logprobs\":null,\"finish_reason\":null}]}", head, t0);
    cr_assert_str_eq(ev[0], exp);
    for (int i = 1; i < n - 2; i++) {
        json_t *j = json_loads(ev[i], 0, NULL);
        char *t = dump(json_object_get(json_object_get(json_array_get(json_object_get(j,
                                                                                      "choices"),
                                                                      0), "delta"), "content"));
        snprintf(exp, sizeof(exp), "%s\"choices\":[{\"index\":0,\"delta\":{\"content\":%s},"
                 "\"logprobs\":null,\"finish_reason\":null}]}", head, t);
        cr_assert_str_eq(ev[i], exp, "chat event %d", i);
        free(t);
        json_decref(j);
    }
    snprintf(exp, sizeof(exp), "%s\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,"
             "\"finish_reason\":\"length\"}]}", head);
    cr_assert_str_eq(ev[n - 2], exp);
    cr_assert_str_eq(ev[n - 1], "[DONE]");
    free(t0);
    json_decref(first);
    free(r.raw);
    free(want);
    SC_END();
}

Test(sidecar_http, prom_checker_refuses_broken_pages)
{
    char err[256];
    cr_assert_eq(prom_check("# TYPE a counter\na 1\n", err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(prom_check("a 1\n", err, sizeof(err)), -1, "a sample without # TYPE");
    cr_assert_eq(prom_check("# TYPE a counter\na 1", err, sizeof(err)), -1, "no final newline");
    cr_assert_eq(prom_check("# TYPE a counter\na{x=\"1} 1\n", err, sizeof(err)), -1);
    cr_assert_eq(prom_check("# TYPE a counter\na{x=\"\\q\"} 1\n", err, sizeof(err)), -1);
    cr_assert_eq(prom_check("# TYPE a counter\na one\n", err, sizeof(err)), -1);
    cr_assert_eq(prom_check("# TYPE a counter\na 1\na 2\n", err, sizeof(err)), -1, "duplicate");
    cr_assert_eq(prom_check("# TYPE a counter\n# TYPE b gauge\nb 1\na 1\n", err, sizeof(err)), -1,
                 "families interleaved");
    cr_assert_eq(prom_check("# TYPE 1a counter\n", err, sizeof(err)), -1, "bad name");
    const char *h = "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"2\"} %s\n"
                    "h_bucket{le=\"+Inf\"} %s\nh_sum 3\nh_count %s\n";
    char page[512];
    snprintf(page, sizeof(page), h, "3", "3", "3");
    cr_assert_eq(prom_check(page, err, sizeof(err)), 0, "%s", err);
    snprintf(page, sizeof(page), h, "1", "3", "3");
    cr_assert_eq(prom_check(page, err, sizeof(err)), -1, "not cumulative");
    snprintf(page, sizeof(page), h, "3", "3", "4");
    cr_assert_eq(prom_check(page, err, sizeof(err)), -1, "+Inf != count");
}

Test(sidecar_http, metrics_page_is_valid_and_counts_what_happened, .fini = teardown,
     .timeout = 60)
{
    start_gd(NULL, NULL, NULL, NULL);
    start_sidecar(NULL, NULL, NULL, NULL);
    int completion_tokens = 0;
    for (int i = 0; i < 2; i++) {
        resp r = post("/v1/completions", "{\"prompt\":\"Once upon a time\",\"max_tokens\":9,"
                                         "\"temperature\":0}");
        cr_assert_eq(r.status, 200, "%s", r.body);
        json_t *j = body_json(&r);
        completion_tokens += (int)json_integer_value(
            json_object_get(json_object_get(j, "usage"), "completion_tokens"));
        json_decref(j);
        free(r.raw);
    }
    expect_error("/v1/completions", "{\"prompt\":\"x\",\"n\":3}", 400, "n");
    resp m = get("/metrics");
    cr_assert_eq(m.status, 200);
    cr_assert(has_header(&m, "Content-Type: text/plain; version=0.0.4; charset=utf-8"), "%s",
              m.head);
    char err[256];
    cr_assert_eq(prom_check(m.body, err, sizeof(err)), 0, "%s\n%s", err, m.body);
    const char *page = m.body;
    cr_assert_eq(sct_metric(page, "gorgon_sidecar_requests_total{endpoint=\"/v1/completions\","
                                  "status=\"200\"}"), 2, "%s", page);
    cr_assert_eq(sct_metric(page, "gorgon_sidecar_requests_total{endpoint=\"/v1/completions\","
                                  "status=\"400\"}"), 1, "%s", page);
    cr_assert_eq(completion_tokens, 18);
    cr_assert_eq(sct_metric(page, "gorgon_sidecar_generation_tokens_total"), 18);
    cr_assert_eq(sct_metric(page, "gorgon_sidecar_prompt_tokens_total"), 10);
    cr_assert_eq(sct_metric(page, "gorgon_sidecar_time_to_first_token_seconds_count"), 2);
    cr_assert_eq(sct_metric(page, "gorgon_sidecar_e2e_request_latency_seconds_count"), 2);
    /* One gap per text arrival after the first: at most 9 - 1 per request,
     * fewer when gorgond's chunks arrive together (how many do is timing). */
    double itl = sct_metric(page, "gorgon_sidecar_inter_token_latency_seconds_count");
    cr_assert(itl >= 0 && itl <= completion_tokens - 2, "inter-token gaps: %g", itl);
    cr_assert_eq(sct_metric(page, "gorgon_sidecar_requests_running"), 0);
    cr_assert_eq(sct_metric(page, "gorgon_sidecar_requests_queued"), 0);
    cr_assert_eq(sct_metric(page, "gorgon_up"), 1);
    cr_assert_eq(sct_metric(page, "gorgon_generation_tokens_total"),
                 (double)sct_gorgon_stat(gd.sock, "gen_tokens_total"));
    cr_assert_gt(sct_metric(page, "gorgon_kv_blocks_total"), 0);
    cr_assert_geq(sct_metric(page, "gorgon_kv_blocks_used"), 0);
    cr_assert_geq(sct_metric(page, "gorgon_medusa_steps_total"), 0);
    cr_assert_geq(sct_metric(page, "gorgon_medusa_accepted_tokens_total"), 0);
    cr_assert_geq(sct_metric(page, "gorgon_requests_running"), 0);
    /* one worker group, serving, that generated every token */
    cr_assert_eq(sct_metric(page, "gorgon_group_up{group=\"0\"}"), 1, "%s", page);
    cr_assert_eq(sct_metric(page, "gorgon_group_generation_tokens_total{group=\"0\"}"),
                 sct_metric(page, "gorgon_generation_tokens_total"));
    cr_assert_eq(sct_metric(page, "gorgon_group_restarts_total{group=\"0\"}"), 0);
    cr_assert_eq(sct_metric(page, "gorgon_group_role{group=\"0\",role=\"colocated\"}"), 1, "%s",
                 page);
    cr_assert_eq(sct_metric(page, "gorgon_handoffs_total"), 0, "colocated: no hand-off");
    free(m.raw);
    /* this scrape itself is counted on the next one */
    m = get("/metrics");
    cr_assert_eq(sct_metric(m.body, "gorgon_sidecar_requests_total{endpoint=\"/metrics\","
                                    "status=\"200\"}"), 1, "%s", m.body);
    free(m.raw);
    SC_END();
}

Test(sidecar_http, health_is_503_while_gorgond_is_down, .fini = teardown, .timeout = 60)
{
    start_gd(NULL, NULL, NULL, NULL);
    start_sidecar(NULL, NULL, NULL, NULL);
    resp r = get("/health");
    cr_assert_eq(r.status, 200, "%s", r.body);
    json_t *j = body_json(&r);
    cr_assert_str_eq(json_string_value(json_object_get(j, "status")), "ok");
    json_decref(j);
    free(r.raw);
    GD_END(&gd);
    r = get("/health");
    cr_assert_eq(r.status, 503, "%s", r.body);
    cr_assert(has_header(&r, "Retry-After: 2"), "%s", r.head);
    j = body_json(&r);
    cr_assert_str_eq(json_string_value(json_object_get(j, "status")), "unavailable");
    cr_assert(strstr(json_string_value(json_object_get(j, "error")), "not reachable"), "%s",
              r.body);
    json_decref(j);
    free(r.raw);
    r = post("/v1/completions", "{\"prompt\":\"Once\"}");
    cr_assert_eq(r.status, 503, "%s", r.body);
    free(r.raw);
    r = get("/metrics");
    cr_assert_eq(r.status, 200);
    cr_assert_eq(sct_metric(r.body, "gorgon_up"), 0, "%s", r.body);
    free(r.raw);
    SC_END();
}

Test(sidecar_http, errors_are_openai_objects_naming_the_parameter, .fini = teardown,
     .timeout = 60)
{
    start_gd(NULL, NULL, NULL, NULL);
    start_sidecar("--max-body", "4096", NULL, NULL);
    const char *c = "/v1/completions", *ch = "/v1/chat/completions";
    expect_error(c, "{\"prompt\":\"x\",\"n\":2}", 400, "n");
    expect_error(c, "{\"prompt\":\"x\",\"foo\":1}", 400, "foo");
    expect_error(c, "{\"prompt\":5}", 400, "prompt");
    expect_error(c, "{\"max_tokens\":5}", 400, "prompt");
    expect_error(c, "{\"prompt\":\"x\",\"max_tokens\":0}", 400, "max_tokens");
    expect_error(c, "{\"prompt\":\"x\",\"max_tokens\":\"5\"}", 400, "max_tokens");
    expect_error(c, "{\"prompt\":\"x\",\"max_tokens\":5000}", 400, "max_tokens");
    expect_error(c, "{\"prompt\":\"x\",\"temperature\":\"hot\"}", 400, "temperature");
    expect_error(c, "{\"prompt\":\"x\",\"temperature\":3}", 400, "temperature");
    expect_error(c, "{\"prompt\":\"x\",\"top_p\":1.5}", 400, "top_p");
    expect_error(c, "{\"prompt\":\"x\",\"stop\":[1]}", 400, "stop");
    expect_error(c, "{\"prompt\":\"x\",\"seed\":1.5}", 400, "seed");
    expect_error(c, "{\"prompt\":\"x\",\"presence_penalty\":0.5}", 400, "presence_penalty");
    expect_error(c, "{\"prompt\":\"x\",\"frequency_penalty\":1}", 400, "frequency_penalty");
    expect_error(c, "{\"prompt\":\"x\",\"logprobs\":2}", 400, "logprobs");
    expect_error(c, "{\"prompt\":\"x\",\"stream_options\":{\"include_usage\":true}}", 400,
                 "stream_options");
    expect_error(c, "{\"prompt\":[1, 99999]}", 400, "prompt");
    expect_error(c, "{\"prompt\":\"x\",\"stream\":\"yes\"}", 400, "stream");
    expect_error(c, "[1,2]", 400, NULL);
    expect_error(c, "{\"prompt\":", 400, NULL);
    expect_error(ch, "{\"messages\":[]}", 400, "messages");
    expect_error(ch, "{\"messages\":\"hi\"}", 400, "messages");
    expect_error(ch, "{\"messages\":[{\"role\":\"tool\",\"content\":\"x\"}]}", 400,
                 "messages[0].role");
    expect_error(ch, "{\"messages\":[{\"content\":\"x\"}]}", 400, "messages[0].role");
    expect_error(ch, "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\"}]}]}",
                 400, "messages[0].content");
    expect_error(ch, "{\"prompt\":\"x\"}", 400, "prompt");
    /* a prompt over the context (2048 tokens): ids counted here, text by gorgond */
    static char big[65536];
    int n = snprintf(big, sizeof(big), "{\"prompt\":[");
    for (int i = 0; i < 2100; i++)
        n += snprintf(big + n, sizeof(big) - (size_t)n, "%s%d", i ? "," : "", 400 + i % 50);
    snprintf(big + n, sizeof(big) - (size_t)n, "]}");
    /* (over --max-body 4096: first the size limit, unread) */
    resp r = post(c, big);
    cr_assert_eq(r.status, 413, "%s", r.body);
    cr_assert(strstr(r.body, "--max-body"), "%s", r.body);
    free(r.raw);
    /* (and 404 / 405) */
    r = get("/v1/nothing");
    cr_assert_eq(r.status, 404, "%s", r.body);
    free(r.raw);
    r = get("/v1/completions");
    cr_assert_eq(r.status, 405, "%s", r.body);
    free(r.raw);
    sct_stop(&sc);
    start_sidecar(NULL, NULL, NULL, NULL);
    expect_error(c, big, 400, "prompt");
    /* text: 2100 words are over 2048 tokens */
    n = snprintf(big, sizeof(big), "{\"prompt\":\"");
    for (int i = 0; i < 2100; i++)
        n += snprintf(big + n, sizeof(big) - (size_t)n, " dog");
    snprintf(big + n, sizeof(big) - (size_t)n, "\",\"max_tokens\":4}");
    r = post(c, big);
    cr_assert_eq(r.status, 400, "%s", r.body);
    cr_assert(strstr(r.body, "\"param\":\"prompt\"") && strstr(r.body, "context"), "%s", r.body);
    free(r.raw);
    /* chat without max_tokens fills the context: the prompt leaves no room */
    n = snprintf(big, sizeof(big), "{\"messages\":[{\"role\":\"user\",\"content\":\"");
    for (int i = 0; i < 2100; i++)
        n += snprintf(big + n, sizeof(big) - (size_t)n, " dog");
    snprintf(big + n, sizeof(big) - (size_t)n, "\"}]}");
    r = post(ch, big);
    cr_assert_eq(r.status, 400, "%s", r.body);
    cr_assert(strstr(r.body, "\"param\":\"messages\""), "%s", r.body);
    free(r.raw);
    SC_END();
}

Test(sidecar_http, api_key_is_required_except_for_health, .fini = teardown, .timeout = 60)
{
    start_gd(NULL, NULL, NULL, NULL);
    start_sidecar("--api-key", "sekrit", NULL, NULL);
    const char *body = "{\"prompt\":\"Once\",\"max_tokens\":2}";
    resp r = post("/v1/completions", body);
    cr_assert_eq(r.status, 401, "%s", r.body);
    cr_assert(has_header(&r, "WWW-Authenticate: Bearer"), "%s", r.head);
    cr_assert(strstr(r.body, "\"code\":\"invalid_api_key\""), "%s", r.body);
    free(r.raw);
    const char *wrong[] = {"-H", "Authorization: Bearer sekrix", NULL};
    r = http_req("POST", "/v1/completions", body, wrong);
    cr_assert_eq(r.status, 401, "%s", r.body);
    free(r.raw);
    const char *right[] = {"-H", "Authorization: Bearer sekrit", NULL};
    r = http_req("POST", "/v1/completions", body, right);
    cr_assert_eq(r.status, 200, "%s", r.body);
    free(r.raw);
    r = http_req("GET", "/v1/models", NULL, NULL);
    cr_assert_eq(r.status, 401, "%s", r.body);
    free(r.raw);
    r = get("/health");
    cr_assert_eq(r.status, 200, "%s", r.body);
    free(r.raw);
    SC_END();
}

Test(sidecar_http, greedy_text_equals_gorgon_generate_and_the_golden, .fini = teardown,
     .timeout = 60)
{
    start_gd(NULL, NULL, NULL, NULL);
    start_sidecar(NULL, NULL, NULL, NULL);
    /* "Lily and Tom" is BOS + 4 tokens: the golden's 64 steps are 60 new tokens */
    char *want = sct_gorgon_generate(gd.sock, "Lily and Tom", 60);
    resp r = post("/v1/completions", "{\"prompt\":\"Lily and Tom\",\"max_tokens\":60,"
                                     "\"temperature\":0}");
    cr_assert_eq(r.status, 200, "%s", r.body);
    json_t *j = body_json(&r);
    json_t *c0 = json_array_get(json_object_get(j, "choices"), 0);
    const char *text = json_string_value(json_object_get(c0, "text"));
    cr_assert_str_eq(text, want);
    cr_assert_str_eq(json_string_value(json_object_get(c0, "finish_reason")), "length");
    FILE *f = fopen(tu_model_path("stories260K/golden_greedy_prompt_LilyAndTom_n64.txt"), "rb");
    cr_assert_not_null(f);
    static char golden[1 << 16], got[1 << 16];
    size_t gn = fread(golden, 1, sizeof(golden) - 1, f);
    golden[gn] = '\0';
    fclose(f);
    snprintf(got, sizeof(got), "Lily and Tom%s\n", text);
    cr_assert_str_eq(got, golden);
    json_decref(j);
    free(r.raw);
    /* the same prompt as token ids (from /tokenize, BOS added) gives the same text */
    r = post("/tokenize", "{\"content\":\"Lily and Tom\",\"add_special\":true}");
    cr_assert_eq(r.status, 200, "%s", r.body);
    j = body_json(&r);
    char *ids = dump(json_object_get(j, "tokens"));
    json_decref(j);
    free(r.raw);
    char body[512];
    snprintf(body, sizeof(body), "{\"prompt\":%s,\"max_tokens\":60,\"temperature\":0}", ids);
    r = post("/v1/completions", body);
    cr_assert_eq(r.status, 200, "%s", r.body);
    j = body_json(&r);
    cr_assert_str_eq(json_string_value(json_object_get(json_array_get(json_object_get(j, "choices"),
                                                                      0), "text")), want);
    json_decref(j);
    free(r.raw);
    free(ids);
    free(want);
    SC_END();
}

Test(sidecar_http, tokenize_and_detokenize_match_libgorgon, .fini = teardown, .timeout = 60)
{
    start_gd(NULL, NULL, NULL, NULL);
    start_sidecar(NULL, NULL, NULL, NULL);
    gorgon_client *cli = gd_connect(&gd, 0);
    const char *text = "Once upon a time, Lily and Tom";
    int32_t want[64];
    int nw = gorgon_tokenize(cli, text, strlen(text), 0, want, 64);
    cr_assert_gt(nw, 3);
    resp r = post("/tokenize", "{\"content\":\"Once upon a time, Lily and Tom\"}");
    cr_assert_eq(r.status, 200, "%s", r.body);
    json_t *j = body_json(&r);
    json_t *toks = json_object_get(j, "tokens");
    cr_assert_eq(json_array_size(toks), (size_t)nw, "%s", r.body);
    for (int i = 0; i < nw; i++)
        cr_assert_eq(json_integer_value(json_array_get(toks, (size_t)i)), want[i]);
    char *ids = dump(toks);
    json_decref(j);
    free(r.raw);
    char body[1024];
    snprintf(body, sizeof(body), "{\"tokens\":%s}", ids);
    free(ids);
    r = post("/detokenize", body);
    cr_assert_eq(r.status, 200, "%s", r.body);
    j = body_json(&r);
    char dt[256];
    int dn = gorgon_detokenize(cli, want, (size_t)nw, dt, sizeof(dt));
    cr_assert_gt(dn, 0);
    cr_assert_str_eq(json_string_value(json_object_get(j, "content")), dt);
    json_decref(j);
    free(r.raw);
    /* with_pieces: llama.cpp's [{id, piece}] */
    r = post("/tokenize", "{\"content\":\"Once upon\",\"with_pieces\":true}");
    cr_assert_eq(r.status, 200, "%s", r.body);
    j = body_json(&r);
    json_t *p0 = json_array_get(json_object_get(j, "tokens"), 0);
    cr_assert(json_is_integer(json_object_get(p0, "id")) &&
              json_is_string(json_object_get(p0, "piece")), "%s", r.body);
    json_decref(j);
    free(r.raw);
    expect_error("/detokenize", "{\"tokens\":[1,99999]}", 400, "tokens");
    expect_error("/tokenize", "{\"text\":\"x\"}", 400, "text");
    gorgon_close(cli);
}

/* A background streaming request that runs for seconds (repeat_penalty < 1
 * keeps stories260K from ending): the pid of its curl. */
static pid_t long_stream(void)
{
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        char url[256];
        snprintf(url, sizeof(url), "%s/v1/completions", sc.url);
        int nul = open("/dev/null", O_WRONLY);
        dup2(nul, 1);
        dup2(nul, 2);
        execlp("curl", "curl", "-sN", url, "-d",
               "{\"prompt\":\"Once upon a time\",\"max_tokens\":2000,\"temperature\":0,"
               "\"repeat_penalty\":0.5,\"stream\":true}", (char *)NULL);
        _exit(127);
    }
    return pid;
}

static void wait_metric(const char *series, double want)
{
    uint64_t t0 = gd_now_ms();
    for (;;) {
        resp m = get("/metrics");
        double v = sct_metric(m.body, series);
        free(m.raw);
        if (v == want)
            return;
        cr_assert_lt(gd_now_ms() - t0, 20000, "%s stays %g, want %g", series, v, want);
    }
    SC_END();
}

Test(sidecar_http, gorgond_at_capacity_is_429_and_a_full_queue_503, .fini = teardown,
     .timeout = 90)
{
    /* gorgond takes one generation at a time: the second is refused (-EBUSY)
     * (a KV pool for the 2000-token stream: auto sizes it for one request) */
    start_gd("--max-requests", "1", "--kv-blocks", "256");
    start_sidecar("--threads", "1", NULL, NULL);
    pid_t a = long_stream();
    wait_metric("gorgon_sidecar_requests_running", 1);
    resp r = post("/v1/completions", "{\"prompt\":\"Once\",\"max_tokens\":2}");
    cr_assert_eq(r.status, 429, "%s", r.body);
    cr_assert(has_header(&r, "Retry-After: 1"), "%s", r.head);
    cr_assert(strstr(r.body, "max_requests"), "gorgond's reason: %s", r.body);
    free(r.raw);
    kill(a, SIGKILL);
    waitpid(a, NULL, 0);
    wait_metric("gorgon_sidecar_requests_cancelled_total", 1);
    wait_metric("gorgon_sidecar_requests_running", 0);
    sct_stop(&sc);
    gd_stop(&gd);

    /* one slot per client: the sidecar holds the second request itself (and
     * answers /health meanwhile on its only HTTP thread), refuses a third
     * beyond --max-queue 1, and runs the held one once the slot frees up */
    start_gd("--slots", "1", NULL, NULL);
    start_sidecar("--threads", "1", "--max-queue", "1");
    a = long_stream();
    wait_metric("gorgon_sidecar_requests_running", 1);
    pid_t b = long_stream();
    wait_metric("gorgon_sidecar_requests_queued", 1);
    r = get("/health");
    cr_assert_eq(r.status, 200, "%s", r.body);
    free(r.raw);
    r = post("/v1/completions", "{\"prompt\":\"Once\",\"max_tokens\":2}");
    cr_assert_eq(r.status, 503, "%s", r.body);
    cr_assert(has_header(&r, "Retry-After: 2"), "%s", r.head);
    cr_assert(strstr(r.body, "queue_full"), "%s", r.body);
    free(r.raw);
    kill(a, SIGKILL);
    waitpid(a, NULL, 0);
    wait_metric("gorgon_sidecar_requests_queued", 0);
    wait_metric("gorgon_sidecar_requests_running", 1); /* b now runs */
    kill(b, SIGKILL);
    waitpid(b, NULL, 0);
    wait_metric("gorgon_sidecar_requests_running", 0);
    wait_metric("gorgon_sidecar_requests_cancelled_total", 2);
    SC_END();
}

/* The sidecar at sc.url answers /health and a completion, then stops
 * cleanly. */
static void serves_health_and_a_completion(void)
{
    resp r = get("/health");
    cr_assert_eq(r.status, 200, "%s", r.body);
    free(r.raw);
    r = post("/v1/completions", "{\"prompt\":\"Once upon a time\",\"max_tokens\":3}");
    cr_assert_eq(r.status, 200, "%s", r.body);
    free(r.raw);
    SC_END();
}

Test(sidecar_http, serves_on_a_unix_socket, .fini = teardown, .timeout = 60)
{
    start_gd(NULL, NULL, NULL, NULL);
    char path[128];
    snprintf(path, sizeof(path), "%s/sidecar.sock", gd.dir);
    start_sidecar("--unix", path, NULL, NULL);
    cr_assert_eq(strncmp(sc.url, "unix:", 5), 0, "%s", sc.url);
    /* gorgon-bench serve drives it over the same socket (--unix-socket) */
    const char *argv[] = {tu_bin("gorgon-bench"), "serve", "--base-url", "http://localhost",
                          "--unix-socket", path, "--prompt", "Once upon a time", "--max-tokens",
                          "8", "--num-prompts", "3", "--json", NULL};
    char *out, *err;
    int st = sct_run(argv, NULL, &out, &err);
    cr_assert_eq(sct_exit_code(st), 0, "gorgon-bench serve --unix-socket: status %d\n%s%s", st,
                 out, err);
    json_error_t je;
    json_t *j = json_loads(out, 0, &je);
    cr_assert_not_null(j, "gorgon-bench printed no JSON (%s): %s", je.text, out);
    cr_assert_eq(json_integer_value(json_object_get(j, "completed")), 3, "%s", out);
    cr_assert_eq(json_integer_value(json_object_get(j, "failed")), 0, "%s", out);
    cr_assert_eq(json_integer_value(json_object_get(j, "total_output_tokens")), 24, "%s", out);
    json_decref(j);
    free(out);
    free(err);
    serves_health_and_a_completion();
    cr_assert_neq(access(path, F_OK), 0, "the socket file is left behind");
}

Test(sidecar_http, serves_on_ipv6_loopback, .fini = teardown, .timeout = 60)
{
    int fd = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT};
    if (fd < 0 || bind(fd, (struct sockaddr *)&a6, sizeof(a6)) != 0) {
        int e = errno;
        if (fd >= 0)
            close(fd);
        cr_skip_test("this host has no IPv6 loopback to listen on ([::1]: %s)", strerror(e));
    }
    close(fd);
    start_gd(NULL, NULL, NULL, NULL);
    start_sidecar("--listen", "[::1]:0", NULL, NULL);
    cr_assert_eq(strncmp(sc.url, "http://[::1]:", 13), 0, "%s", sc.url);
    serves_health_and_a_completion();
}

/* A model whose GGUF carries `tmpl` as tokenizer.chat_template (random
 * weights from gorgon-mkmodel, stories260K's tokenizer), under gorgond. */
static void start_with_template(const char *tmpl)
{
    char path[160];
    char *model = tmpl_model;
    snprintf(path, sizeof(path), "/tmp/gorgon-sidecar-tmpl-%d.jinja", (int)getpid());
    snprintf(model, sizeof(tmpl_model), "/tmp/gorgon-sidecar-tmpl-%d.gguf", (int)getpid());
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f);
    fputs(tmpl, f);
    fclose(f);
    const char *argv[] = {tu_bin("gorgon-mkmodel"), "--out", model, "--preset", "tiny",
                          "--vocab-from", tu_model_path("stories260K/stories260K.gguf"),
                          "--chat-template", path, NULL};
    char *err;
    int st = sct_run(argv, NULL, NULL, &err);
    unlink(path);
    cr_assert_eq(sct_exit_code(st), 0, "gorgon-mkmodel: %s", err);
    free(err);
    int rc = gd_start(&gd, "--model", model, NULL);
    cr_assert_eq(rc, 0, "gorgond did not start: %s", strerror(-rc));
}

/* The prompt gorgond received for a chat request has as many tokens as
 * `want` (the rendering expected from the template, its BOS text dropped)
 * with BOS: the sidecar rendered exactly that. */
static void expect_rendered(const char *messages, const char *want)
{
    json_t *w = json_string(want);
    char *ws = dump(w);
    json_decref(w);
    char body[2048];
    snprintf(body, sizeof(body), "{\"content\":%s,\"add_special\":true}", ws);
    free(ws);
    resp r = post("/tokenize", body);
    cr_assert_eq(r.status, 200, "%s", r.body);
    json_t *j = body_json(&r);
    size_t n_want = json_array_size(json_object_get(j, "tokens"));
    json_decref(j);
    free(r.raw);
    snprintf(body, sizeof(body), "{\"messages\":%s,\"max_tokens\":1}", messages);
    r = post("/v1/chat/completions", body);
    cr_assert_eq(r.status, 200, "%s", r.body);
    j = body_json(&r);
    json_int_t got = json_integer_value(json_object_get(json_object_get(j, "usage"),
                                                        "prompt_tokens"));
    cr_assert_eq(got, (json_int_t)n_want, "gorgond got %lld prompt tokens; [%s] has %zu",
                 (long long)got, want, n_want);
    json_decref(j);
    free(r.raw);
}

Test(sidecar_http, chat_templates_from_the_gguf_are_announced_and_rendered, .fini = teardown,
     .timeout = 60)
{
    start_with_template("{% set loop_messages = messages %}{% for message in loop_messages %}"
                        "{% set content = '<|start_header_id|>' + message['role'] + "
                        "'<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}"
                        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                        "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}");
    start_sidecar(NULL, NULL, NULL, NULL);
    cr_assert(strstr(sct_stderr(&sc), "chat template Llama 3"), "%s", sct_stderr(&sc));
    expect_rendered("[{\"role\":\"system\",\"content\":\" Be kind. \"},"
                    "{\"role\":\"user\",\"content\":\"Hello\"}]",
                    "<|start_header_id|>system<|end_header_id|>\n\nBe kind.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n");
    SC_END();
    gd_stop(&gd);

    start_with_template("{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + role + "
                        "'\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}");
    start_sidecar(NULL, NULL, NULL, NULL);
    cr_assert(strstr(sct_stderr(&sc), "chat template Gemma"), "%s", sct_stderr(&sc));
    expect_rendered("[{\"role\":\"user\",\"content\":\"Hi\"},{\"role\":\"assistant\","
                    "\"content\":\"Yes\"},{\"role\":\"user\",\"content\":\"Go\"}]",
                    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nYes<end_of_turn>\n"
                    "<start_of_turn>user\nGo<end_of_turn>\n<start_of_turn>model\n");
    expect_error("/v1/chat/completions",
                 "{\"messages\":[{\"role\":\"system\",\"content\":\"x\"},"
                 "{\"role\":\"user\",\"content\":\"Hi\"}]}", 400, "messages");
    SC_END();
    gd_stop(&gd);

    start_with_template("{{ messages | tojson }}");
    start_sidecar(NULL, NULL, NULL, NULL);
    cr_assert(strstr(sct_stderr(&sc), "not recognised") &&
              strstr(sct_stderr(&sc), "ChatML fallback"), "%s", sct_stderr(&sc));
    expect_rendered("[{\"role\":\"user\",\"content\":\"Hi\"}]",
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    SC_END();
}

Test(sidecar_http, a_model_without_template_is_announced_with_the_plain_fallback,
     .fini = teardown, .timeout = 60)
{
    start_gd(NULL, NULL, NULL, NULL);
    start_sidecar(NULL, NULL, NULL, NULL);
    cr_assert(strstr(sct_stderr(&sc), "has no chat template") &&
              strstr(sct_stderr(&sc), "plain fallback"), "%s", sct_stderr(&sc));
    expect_rendered("[{\"role\":\"system\",\"content\":\"Be kind.\"},"
                    "{\"role\":\"user\",\"content\":\"Hello\"}]",
                    "system: Be kind.\nuser: Hello\nassistant:");
    SC_END();
}

/* Streams of concatenated SSE text: what `curl -sN` printed, decoded. */
static char *sse_text(const char *body)
{
    static char buf[1 << 16];
    char *copy = strdup(body);
    char *ev[512];
    int n = sse_events(copy, ev, 512);
    size_t len = 0;
    for (int i = 0; i < n; i++) {
        json_t *j = json_loads(ev[i], 0, NULL);
        json_t *t = json_object_get(json_array_get(json_object_get(j, "choices"), 0), "text");
        if (json_is_string(t) && len + json_string_length(t) < sizeof(buf)) {
            memcpy(buf + len, json_string_value(t), json_string_length(t));
            len += json_string_length(t);
        }
        json_decref(j);
    }
    buf[len] = '\0';
    free(copy);
    return strdup(buf);
}

Test(sidecar_http, concurrent_streams_each_get_their_own_text, .fini = teardown, .timeout = 90)
{
    start_gd(NULL, NULL, NULL, NULL);
    start_sidecar(NULL, NULL, NULL, NULL);
    static const char *prompts[] = {"Lily and Tom", "Once upon a time", "The cat", "A big dog"};
    enum { N = 4 };
    char *want[N];
    for (int i = 0; i < N; i++)
        want[i] = sct_gorgon_generate(gd.sock, prompts[i], 48);
    char out[N][64];
    pid_t pid[N];
    for (int i = 0; i < N; i++) {
        snprintf(out[i], sizeof(out[i]), "/tmp/gorgon-sidecar-conc-%d-%d", (int)getpid(), i);
        char body[256];
        snprintf(body, sizeof(body), "{\"prompt\":\"%s\",\"max_tokens\":48,\"temperature\":0,"
                 "\"stream\":true}", prompts[i]);
        char url[256];
        snprintf(url, sizeof(url), "%s/v1/completions", sc.url);
        pid[i] = fork();
        cr_assert_geq(pid[i], 0);
        if (pid[i] == 0) {
            execlp("curl", "curl", "-sSN", "--max-time", "60", "-o", out[i], url, "-d", body,
                   (char *)NULL);
            _exit(127);
        }
    }
    for (int i = 0; i < N; i++) {
        int st;
        cr_assert_eq(waitpid(pid[i], &st, 0), pid[i]);
        cr_assert_eq(sct_exit_code(st), 0, "curl %d: status %d", i, st);
    }
    for (int i = 0; i < N; i++) {
        FILE *f = fopen(out[i], "rb");
        cr_assert_not_null(f);
        static char body[1 << 16];
        size_t n = fread(body, 1, sizeof(body) - 1, f);
        body[n] = '\0';
        fclose(f);
        unlink(out[i]);
        char *got = sse_text(body);
        cr_assert_str_eq(got, want[i], "stream %d (%s)", i, prompts[i]);
        free(got);
        free(want[i]);
    }
    SC_END();
}

/* A stream's response header used to go out on its own (libmicrohttpd
 * pushes the header of a callback response) and its first event a moment
 * later: the client woke twice before its first token. The sidecar corks
 * the socket until that event is written, so one read gets both; on every
 * response but a connection's first, where libmicrohttpd pushes the header
 * by turning TCP_NODELAY on. */
Test(sidecar_http, a_stream_head_arrives_with_its_first_event, .fini = teardown, .timeout = 60)
{
    start_gd(NULL, NULL, NULL, NULL);
    start_sidecar(NULL, NULL, NULL, NULL);
    unsigned port = 0;
    cr_assert_eq(sscanf(sc.url, "http://127.0.0.1:%u", &port), 1, "%s", sc.url);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    cr_assert_geq(fd, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    cr_assert_eq(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    static const char body[] = "{\"prompt\":\"Once upon a time\",\"max_tokens\":40,"
                               "\"temperature\":0,\"stream\":true}";
    for (int round = 0; round < 4; round++) { /* on one kept-alive connection */
        char req[512];
        int n = snprintf(req, sizeof(req), "POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                         "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n%s",
                         sizeof(body) - 1, body);
        cr_assert_eq(send(fd, req, (size_t)n, MSG_NOSIGNAL), n);
        static char in[1 << 16];
        size_t len = 0;
        struct pollfd pf = {.fd = fd, .events = POLLIN};
        cr_assert_eq(poll(&pf, 1, 20000), 1, "no answer");
        ssize_t k = recv(fd, in, sizeof(in) - 1, 0);
        cr_assert_gt(k, 0);
        len = (size_t)k;
        in[len] = '\0';
        char *end = strstr(in, "\r\n\r\n");
        cr_assert_not_null(end, "round %d: the first read has no whole header: %s", round, in);
        cr_assert_eq(strncmp(in, "HTTP/1.1 200", 12), 0, "%s", in);
        /* the chunk after the header: SIZE\r\ndata: {...}\n\n */
        char *chunk = strstr(end + 4, "\r\n");
        if (round > 0)
            cr_assert(chunk && !strncmp(chunk + 2, "data: {", 7) && strstr(chunk, "\n\n"),
                      "round %d: the first read ends before the first event: %s", round, in);
        /* read the rest of the stream: it ends with the last chunk */
        while (!(len >= 5 && !memcmp(in + len - 5, "0\r\n\r\n", 5))) {
            cr_assert_eq(poll(&pf, 1, 20000), 1, "the stream stalled: %s", in);
            k = recv(fd, in + len, sizeof(in) - 1 - len, 0);
            cr_assert_gt(k, 0, "the stream was cut: %s", in);
            len += (size_t)k;
            in[len] = '\0';
        }
        cr_assert_not_null(strstr(in, "data: [DONE]\n\n"), "%s", in);
    }
    close(fd);
    SC_END();
}
