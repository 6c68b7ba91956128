/* gorgon-bench serve --base-url: the workload over any OpenAI-compatible
 * HTTP server (gorgon-sidecar, llama.cpp's llama-server, vLLM).
 *
 * Each request is a streaming POST to base_url + endpoint (`"stream": true`,
 * `"stream_options": {"include_usage": true}`); libcurl's multi interface
 * drives every request in flight from this one thread, reusing connections
 * (one easy handle per in-flight slot). The response is Server-Sent Events:
 * `data: {json}` lines, events ended by a blank line, `data: [DONE]` last.
 * Timing follows vllm's backend_request_func: TTFT at the first chunk with
 * non-empty text, ITL between chunks with text, E2EL at the last one.
 * Output tokens come from the usage chunk when the server sends one, else
 * one per chunk with text. A status other than 200, a stream that is not
 * SSE, an `{"error": ...}` event (or llama-server's `error:` line), bad
 * JSON or a transport error fails the request with that message. */
#include <curl/curl.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clients/bench/bench.h"
#include "common/common.h"

#define ERR_BODY_MAX 2048 /* bytes of an error body kept for the message */
#define EV_MAX (16u << 20) /* one SSE event larger than this is an error */

typedef struct buf {
    char *p;
    size_t len, cap;
} buf;

static int buf_add(buf *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 1024;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p)
            return -ENOMEM;
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
    return 0;
}

/* One in-flight slot: an easy handle and the state of its current request. */
typedef struct hslot {
    CURL *easy;
    struct bench_http *h;
    bench_sreq *r;
    char *body;  /* request JSON (jansson's, freed with free) */
    buf in;      /* bytes not yet split into lines */
    buf ev;      /* data of the SSE event being read */
    buf errbody; /* body of a failed response */
    long status;
    bool checked;   /* status and content type looked at */
    bool sse;       /* 200 with text/event-stream */
    bool usage_out; /* the server counted output tokens */
    char errbuf[CURL_ERROR_SIZE];
} hslot;

struct bench_http {
    CURLM *multi;
    struct curl_slist *headers;
    char *url; /* base_url + endpoint */
    char *unix_socket; /* or NULL: TCP to the URL's host */
    char *model;
    bool chat;
    hslot *slots;
    size_t n_slots;
    size_t *free_list;
    size_t n_free;
};

static bool curl_ready;

/* Record the failure and stop the transfer (the write callback returns 0). */
static size_t slot_fail_stop(hslot *q, const char *what, const char *detail)
{
    bench_sreq_fail(q->r, "%s%s%s", what, detail ? ": " : "", detail ? detail : "");
    return 0;
}

/* One complete SSE event (its data) at time t. 0, or -1 when the request
 * failed (recorded) and the transfer should stop. */
static int on_event(hslot *q, const char *data, size_t len, uint64_t t)
{
    if (len == 6 && !memcmp(data, "[DONE]", 6))
        return 0;
    json_error_t je;
    json_t *o = json_loadb(data, len, 0, &je);
    if (!o || !json_is_object(o)) {
        bench_sreq_fail(q->r, "bad JSON in the stream (%s): %.200s", o ? "not an object" : je.text,
                        data);
        json_decref(o);
        return -1;
    }
    json_t *err = json_object_get(o, "error");
    if (err && !json_is_null(err)) {
        json_t *msg = json_is_object(err) ? json_object_get(err, "message") : err;
        char *dump = json_is_string(msg) ? NULL : json_dumps(err, JSON_COMPACT);
        bench_sreq_fail(q->r, "error event in the stream: %s",
                        json_is_string(msg) ? json_string_value(msg) : dump ? dump : "?");
        free(dump);
        json_decref(o);
        return -1;
    }
    json_t *choices = json_object_get(o, "choices");
    json_t *c0 = json_is_array(choices) ? json_array_get(choices, 0) : NULL;
    if (c0) {
        json_t *text = q->h->chat ? json_object_get(json_object_get(c0, "delta"), "content")
                                  : json_object_get(c0, "text");
        if (json_is_string(text) && json_string_length(text) > 0) {
            bench_sreq *r = q->r;
            if (!r->t_first)
                r->t_first = t;
            else if (bench_sreq_add_itl(r, (double)(t - r->t_last) / 1e6) < 0) {
                bench_sreq_fail(r, "out of memory for its inter-token latencies");
                json_decref(o);
                return -1;
            }
            r->t_last = t;
            r->n_chunks++;
        }
    }
    json_t *usage = json_object_get(o, "usage");
    if (json_is_object(usage)) {
        json_t *ct = json_object_get(usage, "completion_tokens");
        json_t *pt = json_object_get(usage, "prompt_tokens");
        if (json_is_integer(ct) && json_integer_value(ct) >= 0) {
            q->r->n_out = (uint32_t)json_integer_value(ct);
            q->usage_out = true;
        }
        if (json_is_integer(pt) && json_integer_value(pt) >= 0)
            q->r->n_in = (uint32_t)json_integer_value(pt);
    }
    json_decref(o);
    return 0;
}

/* Split q->in into lines and feed the SSE fields. 0 or -1 (failed). */
static int on_lines(hslot *q, uint64_t t)
{
    size_t start = 0;
    for (;;) {
        char *nl = memchr(q->in.p + start, '\n', q->in.len - start);
        if (!nl)
            break;
        size_t end = (size_t)(nl - q->in.p), len = end - start;
        const char *line = q->in.p + start;
        if (len && line[len - 1] == '\r')
            len--;
        start = end + 1;
        if (len == 0) { /* blank line: the event is complete */
            if (q->ev.len) {
                int rc = on_event(q, q->ev.p, q->ev.len - 1, t); /* without its last '\n' */
                q->ev.len = 0;
                if (rc < 0)
                    return -1;
            }
        } else if (len >= 5 && !memcmp(line, "data:", 5)) {
            const char *v = line + 5;
            size_t vl = len - 5;
            if (vl && *v == ' ')
                v++, vl--;
            if (q->ev.len + vl > EV_MAX) {
                bench_sreq_fail(q->r, "an SSE event larger than %u bytes", EV_MAX);
                return -1;
            }
            if (buf_add(&q->ev, v, vl) < 0 || buf_add(&q->ev, "\n", 1) < 0) {
                bench_sreq_fail(q->r, "out of memory reading the stream");
                return -1;
            }
        } else if (len >= 6 && !memcmp(line, "error:", 6)) {
            /* llama-server's way to fail a stream: an `error: {json}` line */
            size_t sp = len > 6 && line[6] == ' ';
            bench_sreq_fail(q->r, "error in the stream: %.*s", (int)(len - 6 - sp), line + 6 + sp);
            return -1;
        } /* else a comment (":...") or a field we do not use (event:, id:, retry:) */
    }
    memmove(q->in.p, q->in.p + start, q->in.len - start);
    q->in.len -= start;
    return 0;
}

static size_t on_write(char *p, size_t size, size_t nmemb, void *ud)
{
    hslot *q = ud;
    size_t n = size * nmemb;
    uint64_t t = cm_now_ns();
    if (!q->checked) {
        q->checked = true;
        curl_easy_getinfo(q->easy, CURLINFO_RESPONSE_CODE, &q->status);
        char *ct = NULL;
        curl_easy_getinfo(q->easy, CURLINFO_CONTENT_TYPE, &ct);
        q->sse = q->status == 200 && ct && !strncasecmp(ct, "text/event-stream", 17);
    }
    if (!q->sse) { /* keep the start of the body for the message */
        size_t room = ERR_BODY_MAX - q->errbody.len;
        if (room && buf_add(&q->errbody, p, n < room ? n : room) < 0)
            return slot_fail_stop(q, "out of memory", NULL);
        return n;
    }
    if (buf_add(&q->in, p, n) < 0)
        return slot_fail_stop(q, "out of memory reading the stream", NULL);
    return on_lines(q, t) < 0 ? 0 : n;
}

/* The transfer of q ended with result cr: settle its request. */
static void slot_finish(hslot *q, CURLcode cr)
{
    bench_sreq *r = q->r;
    uint64_t t = cm_now_ns();
    r->done = true;
    if (r->failed)
        return; /* the callback recorded why */
    if (cr != CURLE_OK) {
        bench_sreq_fail(r, "%s", q->errbuf[0] ? q->errbuf : curl_easy_strerror(cr));
        return;
    }
    if (!q->checked) /* no body at all */
        curl_easy_getinfo(q->easy, CURLINFO_RESPONSE_CODE, &q->status);
    if (q->status != 200) {
        bench_sreq_fail(r, "HTTP %ld: %s", q->status, q->errbody.len ? q->errbody.p : "(empty body)");
        return;
    }
    if (!q->sse) {
        char *ct = NULL;
        curl_easy_getinfo(q->easy, CURLINFO_CONTENT_TYPE, &ct);
        bench_sreq_fail(r, "the response is not an event stream (Content-Type: %s): %.200s",
                        ct ? ct : "none", q->errbody.len ? q->errbody.p : "");
        return;
    }
    /* an event the server did not end with a blank line */
    if (q->in.len && buf_add(&q->in, "\n\n", 2) == 0 && on_lines(q, t) < 0)
        return;
    if (q->ev.len && on_event(q, q->ev.p, q->ev.len - 1, t) < 0)
        return;
    if (!r->n_chunks) {
        bench_sreq_fail(r, "the stream ended without a chunk of text");
        return;
    }
    if (!q->usage_out)
        r->n_out = r->n_chunks;
}

static int slot_setup(bench_http *h, hslot *q)
{
    q->easy = curl_easy_init();
    if (!q->easy)
        return -ENOMEM;
    q->h = h;
    curl_easy_setopt(q->easy, CURLOPT_URL, h->url);
    curl_easy_setopt(q->easy, CURLOPT_UNIX_SOCKET_PATH, h->unix_socket);
    curl_easy_setopt(q->easy, CURLOPT_HTTPHEADER, h->headers);
    curl_easy_setopt(q->easy, CURLOPT_WRITEFUNCTION, on_write);
    curl_easy_setopt(q->easy, CURLOPT_WRITEDATA, q);
    curl_easy_setopt(q->easy, CURLOPT_PRIVATE, q);
    curl_easy_setopt(q->easy, CURLOPT_ERRORBUFFER, q->errbuf);
    curl_easy_setopt(q->easy, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(q->easy, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(q->easy, CURLOPT_CONNECTTIMEOUT_MS, 10000L);
    curl_easy_setopt(q->easy, CURLOPT_POST, 1L);
    return 0;
}

/* The request body of the next request: JSON from jansson (free with
 * free). A token-id prompt is drawn into ids (room for w->in_max) and its
 * length stored in *n_in (0 for a text prompt); called once per request,
 * in request order, so both drivers send the same prompts. */
static char *make_body(const bench_http *h, const bench_workload *w, int64_t max_tokens,
                       int32_t *ids, uint32_t *n_in)
{
    *n_in = 0;
    json_t *o = json_object();
    if (h->model)
        json_object_set_new(o, "model", json_string(h->model));
    if (h->chat) {
        json_t *m = json_object();
        json_object_set_new(m, "role", json_string("user"));
        json_object_set_new(m, "content", json_string(w->prompt));
        json_t *msgs = json_array();
        json_array_append_new(msgs, m);
        json_object_set_new(o, "messages", msgs);
    } else if (w->prompt) {
        json_object_set_new(o, "prompt", json_string(w->prompt));
    } else {
        int64_t n = bench_serve_prompt_ids(w, ids);
        *n_in = (uint32_t)n;
        json_t *a = json_array();
        for (int64_t i = 0; i < n; i++)
            json_array_append_new(a, json_integer(ids[i]));
        json_object_set_new(o, "prompt", a);
    }
    json_object_set_new(o, "max_tokens", json_integer(max_tokens));
    json_object_set_new(o, "temperature", json_real(w->temperature));
    json_object_set_new(o, "stream", json_true());
    json_t *so = json_object();
    json_object_set_new(so, "include_usage", json_true());
    json_object_set_new(o, "stream_options", so);
    char *s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    return s;
}

static int ensure_slots(bench_http *h, size_t n)
{
    if (n <= h->n_slots)
        return 0;
    hslot *s = realloc(h->slots, n * sizeof(*s));
    if (!s)
        return -ENOMEM;
    h->slots = s;
    /* the slots may have moved: point the handles at their new addresses */
    for (size_t i = 0; i < h->n_slots; i++) {
        curl_easy_setopt(s[i].easy, CURLOPT_WRITEDATA, &s[i]);
        curl_easy_setopt(s[i].easy, CURLOPT_PRIVATE, &s[i]);
        curl_easy_setopt(s[i].easy, CURLOPT_ERRORBUFFER, s[i].errbuf);
    }
    size_t *fl = realloc(h->free_list, n * sizeof(*fl));
    if (!fl)
        return -ENOMEM;
    h->free_list = fl;
    for (size_t i = h->n_slots; i < n; i++) {
        memset(&s[i], 0, sizeof(s[i]));
        h->n_slots = i + 1; /* so destroy frees it even if setup fails */
        if (slot_setup(h, &s[i]) < 0)
            return -ENOMEM;
    }
    return 0;
}

static int run(bench_http *h, const bench_workload *w, int64_t max_tokens, int64_t max_inflight,
               bench_sreq *rq, double *dur_s)
{
    if (ensure_slots(h, (size_t)max_inflight) < 0) {
        fprintf(stderr, "gorgon-bench serve: out of memory\n");
        return -ENOMEM;
    }
    int32_t *ids = w->prompt ? NULL : malloc((size_t)w->in_max * sizeof(int32_t));
    if (!w->prompt && !ids) {
        fprintf(stderr, "gorgon-bench serve: out of memory\n");
        return -ENOMEM;
    }
    h->n_free = 0;
    for (size_t i = (size_t)max_inflight; i-- > 0;)
        h->free_list[h->n_free++] = i;
    int64_t n = w->n_prompts, issued = 0, finished = 0, inflight = 0;
    int rc = 0;
    uint64_t t0 = cm_now_ns(), next_arrival = t0;
    while (finished < n) {
        uint64_t now = cm_now_ns();
        while (issued < n && now >= next_arrival && inflight < max_inflight) {
            hslot *q = &h->slots[h->free_list[--h->n_free]];
            bench_sreq *r = &rq[issued++];
            free(q->body);
            q->body = make_body(h, w, max_tokens, ids, &r->n_in);
            q->r = r;
            q->in.len = q->ev.len = q->errbody.len = 0;
            q->status = 0;
            q->checked = q->sse = q->usage_out = false;
            q->errbuf[0] = '\0';
            next_arrival += bench_serve_next_gap_ns(w);
            if (!q->body) {
                bench_sreq_fail(r, "out of memory for the request body");
                r->done = true;
                h->free_list[h->n_free++] = (size_t)(q - h->slots);
                finished++;
                continue;
            }
            curl_easy_setopt(q->easy, CURLOPT_POSTFIELDS, q->body);
            curl_easy_setopt(q->easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)strlen(q->body));
            r->t_submit = cm_now_ns();
            CURLMcode mc = curl_multi_add_handle(h->multi, q->easy);
            if (mc != CURLM_OK) {
                bench_sreq_fail(r, "curl_multi_add_handle: %s", curl_multi_strerror(mc));
                r->done = true;
                h->free_list[h->n_free++] = (size_t)(q - h->slots);
                finished++;
                continue;
            }
            inflight++;
        }
        int running;
        CURLMcode mc = curl_multi_perform(h->multi, &running);
        if (mc != CURLM_OK) {
            fprintf(stderr, "gorgon-bench serve: curl_multi_perform: %s\n", curl_multi_strerror(mc));
            rc = -EIO;
            break;
        }
        CURLMsg *m;
        int left;
        while ((m = curl_multi_info_read(h->multi, &left))) {
            if (m->msg != CURLMSG_DONE)
                continue;
            char *priv = NULL;
            curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, &priv);
            hslot *q = (hslot *)priv;
            CURLcode cr = m->data.result; /* read before the handle is removed */
            curl_multi_remove_handle(h->multi, q->easy);
            slot_finish(q, cr);
            h->free_list[h->n_free++] = (size_t)(q - h->slots);
            inflight--;
            finished++;
        }
        if (finished == n)
            break;
        /* sleep in poll until a socket is ready or the next arrival is due */
        int timeout_ms = 1000;
        if (issued < n && inflight < max_inflight) {
            uint64_t t = cm_now_ns();
            timeout_ms = next_arrival <= t ? 0 : (int)((next_arrival - t) / 1000000u);
            if (timeout_ms > 1000)
                timeout_ms = 1000;
        }
        if (timeout_ms > 0 || inflight > 0) {
            mc = curl_multi_poll(h->multi, NULL, 0, timeout_ms, NULL);
            if (mc != CURLM_OK) {
                fprintf(stderr, "gorgon-bench serve: curl_multi_poll: %s\n", curl_multi_strerror(mc));
                rc = -EIO;
                break;
            }
        }
    }
    *dur_s = (double)(cm_now_ns() - t0) / 1e9;
    if (rc < 0) /* leave no handle attached */
        for (size_t i = 0; i < h->n_slots; i++)
            curl_multi_remove_handle(h->multi, h->slots[i].easy);
    free(ids);
    return rc;
}

int bench_http_run(bench_http *h, const bench_workload *w, int64_t max_inflight, bench_sreq *rq,
                   double *dur_s)
{
    return run(h, w, w->out_len, max_inflight, rq, dur_s);
}

static size_t collect(char *p, size_t size, size_t nmemb, void *ud)
{
    return buf_add(ud, p, size * nmemb) < 0 ? 0 : size * nmemb;
}

/* GET base/v1/models: the first model's id (heap), or NULL (why printed). */
static char *first_model(const char *base, const char *unix_socket,
                         const struct curl_slist *headers)
{
    char *url = NULL, *id = NULL;
    buf body = {0};
    char errbuf[CURL_ERROR_SIZE] = "";
    CURL *e = curl_easy_init();
    if (!e || asprintf(&url, "%s/v1/models", base) < 0) {
        url = NULL;
        goto out;
    }
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_UNIX_SOCKET_PATH, unix_socket);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, collect);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, &body);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, errbuf);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, 10000L);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, 30000L);
    CURLcode cr = curl_easy_perform(e);
    long status = 0;
    curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &status);
    if (cr != CURLE_OK) {
        fprintf(stderr, "gorgon-bench serve: %s%s%s: %s\n", url, unix_socket ? " over " : "",
                unix_socket ? unix_socket : "", errbuf[0] ? errbuf : curl_easy_strerror(cr));
        goto out;
    }
    json_t *o = status == 200 && body.len ? json_loadb(body.p, body.len, 0, NULL) : NULL;
    json_t *m0 = json_array_get(json_object_get(o, "data"), 0);
    json_t *v = json_object_get(m0, "id");
    if (json_is_string(v))
        id = strdup(json_string_value(v));
    else
        fprintf(stderr,
                "gorgon-bench serve: %s gave no model (HTTP %ld%s%.200s); sending no \"model\" "
                "(give --model NAME if the server needs one)\n",
                url, status, body.len ? ": " : "", body.len ? body.p : "");
    json_decref(o);
out:
    free(body.p);
    free(url);
    if (e)
        curl_easy_cleanup(e);
    return id;
}

int bench_http_open(bench_http **out, const bench_http_cfg *cfg, const bench_workload *w)
{
    *out = NULL;
    const char *u = cfg->base_url;
    if (strncmp(u, "http://", 7) && strncmp(u, "https://", 8)) {
        fprintf(stderr, "gorgon-bench serve: --base-url \"%s\": expected http://HOST:PORT or "
                        "https://HOST:PORT\n", u);
        return -EINVAL;
    }
    if (cfg->endpoint[0] != '/') {
        fprintf(stderr, "gorgon-bench serve: --endpoint \"%s\": expected a path starting with / "
                        "(e.g. /v1/completions)\n", cfg->endpoint);
        return -EINVAL;
    }
    size_t el = strlen(cfg->endpoint);
    bool chat = el >= 17 && !strcmp(cfg->endpoint + el - 17, "/chat/completions");
    if (chat && !w->prompt) {
        fprintf(stderr, "gorgon-bench serve: --endpoint %s needs --prompt TEXT (random token-id "
                        "prompts are for /v1/completions)\n", cfg->endpoint);
        return -EINVAL;
    }
    if (!curl_ready) {
        if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
            fprintf(stderr, "gorgon-bench serve: curl_global_init failed\n");
            return -EIO;
        }
        curl_ready = true;
    }
    bench_http *h = calloc(1, sizeof(*h));
    if (!h)
        goto nomem;
    h->chat = chat;
    size_t bl = strlen(u);
    while (bl > 0 && u[bl - 1] == '/')
        bl--;
    char *base = strndup(u, bl);
    if (!base || asprintf(&h->url, "%s%s", base, cfg->endpoint) < 0) {
        h->url = NULL;
        free(base);
        goto nomem;
    }
    char *auth = NULL;
    if (cfg->api_key && asprintf(&auth, "Authorization: Bearer %s", cfg->api_key) < 0) {
        free(base);
        goto nomem;
    }
    struct curl_slist *hd = NULL, *t;
    /* "Expect:" off: curl would wait for a 100 Continue before a large body */
    const char *fixed[] = {"Content-Type: application/json", "Accept: text/event-stream", "Expect:",
                           auth};
    for (size_t i = 0; i < sizeof(fixed) / sizeof(fixed[0]) && fixed[i]; i++) {
        if (!(t = curl_slist_append(hd, fixed[i]))) {
            curl_slist_free_all(hd);
            free(auth);
            free(base);
            goto nomem;
        }
        hd = t;
    }
    free(auth);
    h->headers = hd;
    if (cfg->unix_socket && !(h->unix_socket = strdup(cfg->unix_socket))) {
        free(base);
        goto nomem;
    }
    h->model = cfg->model ? strdup(cfg->model) : first_model(base, h->unix_socket, hd);
    free(base);
    h->multi = curl_multi_init();
    if (!h->multi || (cfg->model && !h->model))
        goto nomem;
    /* Warm-up: one short request (the first prompt, 2 tokens); its failure
     * says the server or the arguments are wrong, as vllm's initial test. */
    bench_workload ww = *w;
    ww.n_prompts = 1;
    ww.rate = INFINITY;
    bench_sreq r = {0};
    double dur;
    int rc = run(h, &ww, w->out_len < 2 ? w->out_len : 2, 1, &r, &dur);
    if (rc == 0 && r.failed) {
        fprintf(stderr, "gorgon-bench serve: warm-up request to %s%s%s failed: %s\n", h->url,
                h->unix_socket ? " over " : "", h->unix_socket ? h->unix_socket : "",
                r.err ? r.err : "(no message)");
        rc = -EIO;
    }
    free(r.itl);
    free(r.err);
    if (rc < 0) {
        bench_http_destroy(h);
        return rc;
    }
    *out = h;
    return 0;
nomem:
    fprintf(stderr, "gorgon-bench serve: out of memory\n");
    bench_http_destroy(h);
    return -ENOMEM;
}

void bench_http_destroy(bench_http *h)
{
    if (!h)
        return;
    for (size_t i = 0; i < h->n_slots; i++) {
        hslot *q = &h->slots[i];
        if (h->multi)
            curl_multi_remove_handle(h->multi, q->easy);
        curl_easy_cleanup(q->easy);
        free(q->body);
        free(q->in.p);
        free(q->ev.p);
        free(q->errbody.p);
    }
    free(h->slots);
    free(h->free_list);
    if (h->multi)
        curl_multi_cleanup(h->multi);
    curl_slist_free_all(h->headers);
    free(h->url);
    free(h->unix_socket);
    free(h->model);
    free(h);
}
