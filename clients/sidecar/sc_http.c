/* The HTTP side: libmicrohttpd's access handler, the OpenAI request checks
 * and the response bodies (jansson), Server-Sent Events from a content
 * reader that suspends its connection until the text it waits for is there.
 * Every callback runs on the serving thread that runs the daemon
 * (sc_engine.c), the one that also reaps the request's completions.
 *
 * A connection's life: the first call of the access handler checks the
 * route, the API key and Content-Length (413 before any body byte is read);
 * body calls append to a bounded buffer; the last call parses and, for a
 * generation, submits an sc_req (sc_engine_submit) and suspends. It is
 * resumed on the request's first text (streaming) or its end (not
 * streaming), and the handler runs again to queue the response. A streaming
 * response's reader formats events from the text the engine appended,
 * suspending again when there is none. MHD's completion callback cancels a
 * generation whose client went away.
 */
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <limits.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "clients/sidecar/sc_http.h"
#include "clients/sidecar/sidecar.h"
#include "common/cm_time.h"

static sc_http_cfg H;
static int64_t started_at;
static atomic_ulong id_seq;

/* ---- per-connection state ------------------------------------------------- */

typedef struct conn_ctx {
    enum sc_endpoint ep;
    sc_buf body;
    bool replied;
    unsigned status;
    sc_req *req;
} conn_ctx;

/* ---- responses -------------------------------------------------------------- */

static enum MHD_Result queue(struct MHD_Connection *conn, conn_ctx *cx, unsigned status,
                             const char *type, char *body, size_t len, int retry_after)
{
    struct MHD_Response *rsp =
        MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
    if (!rsp) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(rsp, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    if (retry_after > 0) {
        char v[16];
        snprintf(v, sizeof(v), "%d", retry_after);
        MHD_add_response_header(rsp, MHD_HTTP_HEADER_RETRY_AFTER, v);
    }
    if (status == MHD_HTTP_UNAUTHORIZED)
        MHD_add_response_header(rsp, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer");
    enum MHD_Result rc = MHD_queue_response(conn, status, rsp);
    MHD_destroy_response(rsp);
    cx->replied = true;
    cx->status = status;
    return rc;
}

static enum MHD_Result reply_json(struct MHD_Connection *conn, conn_ctx *cx, unsigned status,
                                  json_t *j, int retry_after)
{
    char *s = j ? json_dumps(j, JSON_COMPACT) : NULL;
    json_decref(j);
    if (!s)
        return MHD_NO;
    size_t n = strlen(s);
    /* a trailing newline, as curl users expect */
    char *t = realloc(s, n + 2);
    if (!t) {
        free(s);
        return MHD_NO;
    }
    t[n] = '\n';
    t[n + 1] = '\0';
    return queue(conn, cx, status, "application/json", t, n + 1, retry_after);
}

static const char *error_type(unsigned status)
{
    switch (status) {
    case 400: case 404: case 405: case 413: return "invalid_request_error";
    case 401: return "authentication_error";
    case 429: return "rate_limit_error";
    default: return "server_error";
    }
}

static json_t *error_obj(unsigned status, const char *msg, const char *param, const char *code)
{
    return json_pack("{s:{s:s,s:s,s:s?,s:s?}}", "error", "message", msg, "type",
                     error_type(status), "param", param, "code", code);
}

static enum MHD_Result reply_error(struct MHD_Connection *conn, conn_ctx *cx, unsigned status,
                                   const char *param, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
static enum MHD_Result reply_error(struct MHD_Connection *conn, conn_ctx *cx, unsigned status,
                                   const char *param, const char *code, const char *fmt, ...)
{
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    size_t clean_len;
    char *clean = sc_utf8_clean(msg, strlen(msg), &clean_len);
    json_t *j = error_obj(status, clean ? clean : "error", param, code);
    free(clean);
    return reply_json(conn, cx, status, j,
                      status == 429 || status == 503 ? (status == 429 ? 1 : 2) : 0);
}

/* ---- request parsing ----------------------------------------------------------- */

typedef struct perr {
    char msg[512];
    const char *param; /* NULL or pbuf */
    char pbuf[96];
    const char *code;
} perr;

static int bad(perr *e, const char *param, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int bad(perr *e, const char *param, const char *code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof(e->msg), fmt, ap);
    va_end(ap);
    e->param = NULL;
    if (param) {
        snprintf(e->pbuf, sizeof(e->pbuf), "%s", param);
        e->param = e->pbuf;
    }
    e->code = code;
    return -1;
}

static const char *json_kind(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a number";
    case JSON_TRUE: case JSON_FALSE: return "a boolean";
    default: return "null";
    }
}

static int wrong_type(perr *e, const char *name, const char *want, const json_t *v)
{
    return bad(e, name, "invalid_type", "Invalid type for '%s': expected %s, but got %s instead.",
               name, want, json_kind(v));
}

typedef struct gen {
    sc_req *r;
    perr *e;
    bool chat;
    json_t *prompt, *messages, *stream_options;
    bool have_max;
    double temperature;
    bool greedy_top_p;
} gen;

typedef int (*param_fn)(gen *g, const char *name, json_t *v);

static int p_number(gen *g, const char *name, json_t *v, double lo, double hi, double *out)
{
    if (!json_is_number(v))
        return wrong_type(g->e, name, "a number", v);
    double d = json_number_value(v);
    if (!(d >= lo && d <= hi))
        return bad(g->e, name, "invalid_value", "%g is not a valid value for '%s': it must be in "
                   "[%g, %g].", d, name, lo, hi);
    *out = d;
    return 0;
}

static int p_ignore(gen *g, const char *name, json_t *v)
{
    (void)g, (void)name, (void)v;
    return 0;
}

static int p_model(gen *g, const char *name, json_t *v)
{
    if (!json_is_string(v))
        return wrong_type(g->e, name, "a string", v);
    return 0; /* one model is served: any name selects it, responses name it */
}

static int p_prompt(gen *g, const char *name, json_t *v)
{
    if (json_is_array(v) && json_array_size(v) == 1 && json_is_string(json_array_get(v, 0)))
        v = json_array_get(v, 0); /* a batch of one prompt */
    if (json_is_string(v) || json_is_array(v)) {
        g->prompt = v;
        return 0;
    }
    return wrong_type(g->e, name, "a string or an array of token ids", v);
}

static int p_messages(gen *g, const char *name, json_t *v)
{
    if (!json_is_array(v))
        return wrong_type(g->e, name, "an array", v);
    g->messages = v;
    return 0;
}

static int p_max_tokens(gen *g, const char *name, json_t *v)
{
    if (json_is_null(v))
        return 0;
    if (!json_is_integer(v))
        return wrong_type(g->e, name, "an integer", v);
    json_int_t n = json_integer_value(v);
    if (n < 1 || n > INT32_MAX)
        return bad(g->e, name, "invalid_value", "Invalid '%s': %" JSON_INTEGER_FORMAT " is not "
                   "an integer >= 1.", name, n);
    g->r->gp.max_tokens = (int32_t)n;
    g->have_max = true;
    return 0;
}

static int p_temperature(gen *g, const char *name, json_t *v)
{
    if (json_is_null(v))
        return 0;
    return p_number(g, name, v, 0, 2, &g->temperature);
}

static int p_top_p(gen *g, const char *name, json_t *v)
{
    if (json_is_null(v))
        return 0;
    double d = 0;
    if (p_number(g, name, v, 0, 1, &d) < 0)
        return -1;
    g->r->gp.top_p = (float)d;
    g->greedy_top_p = d == 0; /* only the most likely token survives */
    return 0;
}

static int p_top_k(gen *g, const char *name, json_t *v)
{
    if (json_is_null(v))
        return 0;
    if (!json_is_integer(v))
        return wrong_type(g->e, name, "an integer", v);
    json_int_t k = json_integer_value(v);
    if (k < -1 || k > INT32_MAX)
        return bad(g->e, name, "invalid_value", "Invalid '%s': %" JSON_INTEGER_FORMAT
                   " (use 0 or -1 for no limit).", name, k);
    g->r->gp.top_k = k < 0 ? 0 : (int32_t)k;
    return 0;
}

static int p_min_p(gen *g, const char *name, json_t *v)
{
    double d = 0;
    if (json_is_null(v))
        return 0;
    if (p_number(g, name, v, 0, 0.999999, &d) < 0)
        return -1;
    g->r->gp.min_p = (float)d;
    return 0;
}

static int p_repeat_penalty(gen *g, const char *name, json_t *v)
{
    double d = 0;
    if (json_is_null(v))
        return 0;
    if (p_number(g, name, v, 0, 100, &d) < 0)
        return -1;
    g->r->gp.repeat_penalty = (float)d;
    return 0;
}

static int p_stop(gen *g, const char *name, json_t *v)
{
    sc_req *r = g->r;
    if (json_is_null(v))
        return 0;
    json_t *one[1] = {v};
    size_t n = 1;
    if (json_is_array(v)) {
        n = json_array_size(v);
        if (n > GORGON_GEN_MAX_STOP)
            return bad(g->e, name, "invalid_value", "Invalid '%s': %zu stop sequences; gorgon takes "
                       "at most %d.", name, n, GORGON_GEN_MAX_STOP);
    } else if (!json_is_string(v)) {
        return wrong_type(g->e, name, "a string or an array of strings", v);
    }
    for (size_t i = 0; i < n; i++) {
        json_t *s = json_is_array(v) ? json_array_get(v, i) : one[0];
        if (!json_is_string(s))
            return wrong_type(g->e, name, "a string or an array of strings", s);
        size_t len = json_string_length(s);
        if (len == 0 || len >= sizeof(r->stops[0]) || memchr(json_string_value(s), 0, len))
            return bad(g->e, name, "invalid_value", "Invalid '%s': stop sequence %zu is %zu bytes; "
                       "each must be 1 to %zu bytes (no NUL).", name, i, len,
                       sizeof(r->stops[0]) - 1);
        memcpy(r->stops[r->gp.n_stop], json_string_value(s), len + 1);
        r->stop_ptrs[r->gp.n_stop] = r->stops[r->gp.n_stop];
        r->gp.n_stop++;
    }
    r->gp.stop = r->gp.n_stop ? r->stop_ptrs : NULL;
    return 0;
}

static int p_seed(gen *g, const char *name, json_t *v)
{
    if (json_is_null(v))
        return 0;
    if (!json_is_integer(v))
        return wrong_type(g->e, name, "an integer", v);
    g->r->gp.seed = (uint64_t)json_integer_value(v);
    return 0;
}

static int p_n(gen *g, const char *name, json_t *v)
{
    if (json_is_null(v))
        return 0;
    if (!json_is_integer(v))
        return wrong_type(g->e, name, "an integer", v);
    if (json_integer_value(v) != 1)
        return bad(g->e, name, "unsupported_value", "Unsupported value for '%s': %" JSON_INTEGER_FORMAT
                   ". gorgon-sidecar returns one choice per request (n must be 1); send several "
                   "requests instead.", name, json_integer_value(v));
    return 0;
}

static int p_penalty(gen *g, const char *name, json_t *v)
{
    if (json_is_null(v))
        return 0;
    if (!json_is_number(v))
        return wrong_type(g->e, name, "a number", v);
    if (json_number_value(v) != 0)
        return bad(g->e, name, "unsupported_value", "Unsupported parameter: '%s' is not supported "
                   "by gorgon (only 0 is accepted); use 'repeat_penalty' (llama.cpp's "
                   "multiplicative penalty) instead.", name);
    return 0;
}

static int p_logprobs(gen *g, const char *name, json_t *v)
{
    if (json_is_null(v) || json_is_false(v))
        return 0;
    if (!json_is_boolean(v) && !json_is_integer(v))
        return wrong_type(g->e, name, g->chat ? "a boolean" : "an integer", v);
    return bad(g->e, name, "unsupported_value", "Unsupported parameter: '%s': gorgon does not "
               "return log probabilities.", name);
}

static int p_top_logprobs(gen *g, const char *name, json_t *v)
{
    if (json_is_null(v) || (json_is_integer(v) && json_integer_value(v) == 0))
        return 0;
    return bad(g->e, name, "unsupported_value", "Unsupported parameter: '%s': gorgon does not "
               "return log probabilities.", name);
}

static int p_stream(gen *g, const char *name, json_t *v)
{
    if (json_is_null(v))
        return 0;
    if (!json_is_boolean(v))
        return wrong_type(g->e, name, "a boolean", v);
    g->r->stream = json_is_true(v);
    return 0;
}

static int p_stream_options(gen *g, const char *name, json_t *v)
{
    if (json_is_null(v))
        return 0;
    if (!json_is_object(v))
        return wrong_type(g->e, name, "an object", v);
    const char *k;
    json_t *x;
    json_object_foreach(v, k, x) {
        if (strcmp(k, "include_usage"))
            return bad(g->e, "stream_options", "unknown_parameter",
                       "Unrecognized stream_options field: '%s'.", k);
        if (!json_is_boolean(x))
            return wrong_type(g->e, "stream_options.include_usage", "a boolean", x);
        g->r->include_usage = json_is_true(x);
    }
    g->stream_options = v;
    return 0;
}

static int p_user(gen *g, const char *name, json_t *v)
{
    if (!json_is_string(v) && !json_is_null(v))
        return wrong_type(g->e, name, "a string", v);
    return 0;
}

/* Accepted only with the value that means "off" (what OpenAI defaults to). */
static int p_off(gen *g, const char *name, json_t *v)
{
    bool off = json_is_null(v) || json_is_false(v) ||
               (json_is_integer(v) && json_integer_value(v) == (strcmp(name, "best_of") ? 0 : 1)) ||
               (json_is_object(v) && json_object_size(v) == 0) ||
               (json_is_array(v) && json_array_size(v) == 0) ||
               (json_is_string(v) && !strcmp(json_string_value(v), "none"));
    if (!strcmp(name, "response_format") && json_is_object(v)) {
        json_t *t = json_object_get(v, "type");
        off = json_object_size(v) == 1 && json_is_string(t) && !strcmp(json_string_value(t), "text");
    }
    if (off)
        return 0;
    return bad(g->e, name, "unsupported_value", "Unsupported parameter: '%s' is not supported by "
               "gorgon-sidecar with this value.", name);
}

#define EP_C 1u
#define EP_CHAT 2u
static const struct param {
    const char *name;
    unsigned eps;
    param_fn fn;
} params[] = {
    {"model", EP_C | EP_CHAT, p_model},
    {"prompt", EP_C, p_prompt},
    {"messages", EP_CHAT, p_messages},
    {"max_tokens", EP_C | EP_CHAT, p_max_tokens},
    {"max_completion_tokens", EP_CHAT, p_max_tokens},
    {"temperature", EP_C | EP_CHAT, p_temperature},
    {"top_p", EP_C | EP_CHAT, p_top_p},
    {"stop", EP_C | EP_CHAT, p_stop},
    {"seed", EP_C | EP_CHAT, p_seed},
    {"n", EP_C | EP_CHAT, p_n},
    {"presence_penalty", EP_C | EP_CHAT, p_penalty},
    {"frequency_penalty", EP_C | EP_CHAT, p_penalty},
    {"logprobs", EP_C | EP_CHAT, p_logprobs},
    {"top_logprobs", EP_CHAT, p_top_logprobs},
    {"stream", EP_C | EP_CHAT, p_stream},
    {"stream_options", EP_C | EP_CHAT, p_stream_options},
    {"user", EP_C | EP_CHAT, p_user},
    {"echo", EP_C, p_off},
    {"best_of", EP_C, p_off},
    {"suffix", EP_C, p_off},
    {"logit_bias", EP_C | EP_CHAT, p_off},
    {"tools", EP_CHAT, p_off},
    {"functions", EP_CHAT, p_off},
    {"tool_choice", EP_CHAT, p_off},
    {"function_call", EP_CHAT, p_off},
    {"response_format", EP_CHAT, p_off},
    {"parallel_tool_calls", EP_CHAT, p_ignore},
    {"store", EP_CHAT, p_ignore},
    {"metadata", EP_CHAT, p_ignore},
    {"service_tier", EP_C | EP_CHAT, p_ignore},
    /* llama.cpp / vLLM extensions, passed to gorgond's sampler */
    {"top_k", EP_C | EP_CHAT, p_top_k},
    {"min_p", EP_C | EP_CHAT, p_min_p},
    {"repeat_penalty", EP_C | EP_CHAT, p_repeat_penalty},
};

/* The text of a message's content: a string, or an array of text parts. */
static int message_text(perr *e, size_t i, json_t *c, sc_buf *out)
{
    char pname[64];
    snprintf(pname, sizeof(pname), "messages[%zu].content", i);
    if (json_is_null(c))
        return 0;
    if (json_is_string(c)) {
        sc_buf_add(out, json_string_value(c), json_string_length(c));
        return 0;
    }
    if (!json_is_array(c))
        return wrong_type(e, pname, "a string or an array of content parts", c);
    for (size_t k = 0; k < json_array_size(c); k++) {
        json_t *part = json_array_get(c, k);
        json_t *type = json_object_get(part, "type"), *text = json_object_get(part, "text");
        if (!json_is_object(part) || !json_is_string(type))
            return wrong_type(e, pname, "content parts (objects with a 'type')", part);
        if (strcmp(json_string_value(type), "text") || !json_is_string(text))
            return bad(e, pname, "unsupported_value", "Unsupported content part '%s' in "
                       "messages[%zu]: gorgon serves text only.", json_string_value(type), i);
        sc_buf_add(out, json_string_value(text), json_string_length(text));
    }
    return 0;
}

static int build_chat_prompt(gen *g, const sc_model *m)
{
    size_t n = json_array_size(g->messages);
    if (n == 0)
        return bad(g->e, "messages", "invalid_value", "Invalid 'messages': empty array. Expected "
                   "an array with minimum length 1.");
    sc_msg *msgs = calloc(n, sizeof(*msgs));
    sc_buf *texts = calloc(n, sizeof(*texts));
    int rc = -1;
    if (!msgs || !texts) {
        bad(g->e, NULL, NULL, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *o = json_array_get(g->messages, i);
        char pname[64];
        snprintf(pname, sizeof(pname), "messages[%zu]", i);
        if (!json_is_object(o)) {
            wrong_type(g->e, pname, "an object", o);
            goto out;
        }
        json_t *role = json_object_get(o, "role");
        snprintf(pname, sizeof(pname), "messages[%zu].role", i);
        if (!json_is_string(role)) {
            if (!role)
                bad(g->e, pname, "missing_required_parameter", "Missing required parameter: "
                    "'messages[%zu].role'.", i);
            else
                wrong_type(g->e, pname, "a string", role);
            goto out;
        }
        const char *rs = json_string_value(role);
        if (strcmp(rs, "system") && strcmp(rs, "user") && strcmp(rs, "assistant") &&
            strcmp(rs, "developer")) {
            bad(g->e, pname, "invalid_value", "Invalid value: '%s'. Supported roles are 'system', "
                "'developer', 'user' and 'assistant'.", rs);
            goto out;
        }
        const char *k;
        json_t *x;
        json_object_foreach(o, k, x) {
            if (strcmp(k, "role") && strcmp(k, "content") && strcmp(k, "name")) {
                snprintf(pname, sizeof(pname), "messages[%zu].%s", i, k);
                bad(g->e, pname, "unknown_parameter", "Unrecognized field in messages[%zu]: '%s'.",
                    i, k);
                goto out;
            }
        }
        if (message_text(g->e, i, json_object_get(o, "content"), &texts[i]) < 0)
            goto out;
        sc_buf_add(&texts[i], "", 0);
        if (texts[i].oom) {
            bad(g->e, NULL, NULL, "out of memory");
            goto out;
        }
        /* "developer" is OpenAI's newer name for the system role */
        msgs[i] = (sc_msg){.role = strcmp(rs, "developer") ? rs : "system", .content = texts[i].p,
                           .content_len = texts[i].len};
    }
    char why[256] = "";
    size_t len;
    char *p = sc_chat_render(m->chat, msgs, n, &len, why, sizeof(why));
    if (!p) {
        bad(g->e, "messages", "invalid_value", "%s", why);
        goto out;
    }
    const char *bos = sc_chat_bos(m->chat);
    size_t nb = strlen(bos);
    if (nb && len >= nb && !memcmp(p, bos, nb)) {
        memmove(p, p + nb, len - nb + 1); /* gorgond prepends the real BOS token */
        len -= nb;
    }
    g->r->prompt = p;
    g->r->prompt_len = len;
    rc = 0;
out:
    for (size_t i = 0; texts && i < n; i++)
        free(texts[i].p);
    free(texts);
    free(msgs);
    return rc;
}

static int build_prompt(gen *g, const sc_model *m)
{
    sc_req *r = g->r;
    json_t *p = g->prompt;
    if (json_is_string(p)) {
        if (json_string_length(p) == 0)
            return bad(g->e, "prompt", "invalid_value", "Invalid 'prompt': the prompt is empty.");
        r->prompt = strndup(json_string_value(p), json_string_length(p));
        r->prompt_len = json_string_length(p);
        if (!r->prompt)
            return bad(g->e, NULL, NULL, "out of memory");
        return 0;
    }
    size_t n = json_array_size(p);
    if (n == 0)
        return bad(g->e, "prompt", "invalid_value", "Invalid 'prompt': empty array.");
    if (n > m->n_ctx)
        return bad(g->e, "prompt", "context_length_exceeded", "This model's maximum context "
                   "length is %u tokens, however your prompt has %zu tokens.", m->n_ctx, n);
    r->ids = malloc((n + 1) * sizeof(int32_t));
    if (!r->ids)
        return bad(g->e, NULL, NULL, "out of memory");
    /* OpenAI token prompts carry no BOS; gorgond takes ids as given, so
     * add it as a text prompt would get it. */
    size_t k = 0;
    json_t *first = json_array_get(p, 0);
    if (m->bos >= 0 && !(json_is_integer(first) && json_integer_value(first) == m->bos))
        r->ids[k++] = m->bos;
    for (size_t i = 0; i < n; i++) {
        json_t *x = json_array_get(p, i);
        if (!json_is_integer(x))
            return wrong_type(g->e, "prompt", "a string or an array of token ids (integers)", x);
        json_int_t id = json_integer_value(x);
        if (id < 0 || id >= (json_int_t)m->n_vocab)
            return bad(g->e, "prompt", "invalid_value", "Invalid 'prompt': token id %"
                       JSON_INTEGER_FORMAT " at index %zu is not in [0, %u).", id, i, m->n_vocab);
        r->ids[k++] = (int32_t)id;
    }
    r->n_ids = k;
    r->gp.prompt_ids = r->ids;
    r->gp.n_ids = k;
    r->gp.flags |= GORGON_GEN_PROMPT_IDS;
    return 0;
}

/* Parse a generation body into r. 0, or -1 with e filled. */
static int parse_gen(sc_req *r, json_t *body, bool chat, const sc_model *m, perr *e)
{
    gen g = {.r = r, .e = e, .chat = chat, .temperature = 1.0};
    if (!json_is_object(body))
        return bad(e, NULL, "invalid_type", "The request body must be a JSON object, not %s.",
                   json_kind(body));
    const char *k;
    json_t *v;
    json_object_foreach(body, k, v) {
        const struct param *p = NULL;
        for (size_t i = 0; i < sizeof(params) / sizeof(params[0]); i++)
            if (!strcmp(params[i].name, k) && (params[i].eps & (chat ? EP_CHAT : EP_C))) {
                p = &params[i];
                break;
            }
        if (!p)
            return bad(e, k, "unknown_parameter", "Unrecognized request argument supplied: %s", k);
        if (p->fn(&g, p->name, v) < 0)
            return -1;
    }
    if (g.stream_options && !r->stream)
        return bad(e, "stream_options", "invalid_value", "The 'stream_options' parameter is only "
                   "allowed when 'stream' is enabled.");
    if (chat && !g.messages)
        return bad(e, "messages", "missing_required_parameter",
                   "Missing required parameter: 'messages'.");
    if (!chat && !g.prompt)
        return bad(e, "prompt", "missing_required_parameter",
                   "Missing required parameter: 'prompt'.");
    r->gp.temperature = g.greedy_top_p ? 0.0f : (float)g.temperature;
    if (g.greedy_top_p)
        r->gp.top_p = 0;
    if (!g.have_max) {
        if (chat)
            r->want_max = true; /* the rest of the context, as OpenAI's chat does */
        else
            r->gp.max_tokens = 16; /* OpenAI's completions default */
    }
    if (r->gp.max_tokens > 0 && (uint32_t)r->gp.max_tokens >= m->n_ctx)
        return bad(e, chat ? (json_object_get(body, "max_completion_tokens")
                                  ? "max_completion_tokens" : "max_tokens") : "max_tokens",
                   "context_length_exceeded", "This model's maximum context length is %u tokens, "
                   "however you requested %d tokens for the completion.", m->n_ctx,
                   r->gp.max_tokens);
    return chat ? build_chat_prompt(&g, m) : build_prompt(&g, m);
}

/* ---- generation responses --------------------------------------------------------- */

static const char *finish_name(int finish)
{
    return finish == GORGON_FINISH_LENGTH ? "length" : "stop";
}

static json_t *usage_obj(const sc_req *r)
{
    return json_pack("{s:I,s:I,s:I}", "prompt_tokens", (json_int_t)r->usage.prompt_tokens,
                     "completion_tokens", (json_int_t)r->usage.completion_tokens, "total_tokens",
                     (json_int_t)r->usage.prompt_tokens + (json_int_t)r->usage.completion_tokens);
}

/* HTTP status for a request that failed before any text. */
static unsigned status_of(int32_t err, const char **code, int *retry)
{
    *retry = 0;
    *code = NULL;
    switch (err) {
    case -EINVAL: case -EMSGSIZE: case -E2BIG:
        *code = "invalid_value";
        return 400;
    case -EBUSY: case -EAGAIN:
        *retry = 1;
        *code = "rate_limit_exceeded";
        return 429;
    case -EPIPE: case -ECONNREFUSED: case -ENOENT: case -ESHUTDOWN: case -ENOTSUP:
    case -EUSERS: case -ECANCELED:
        *retry = 2;
        return 503;
    default:
        return 500;
    }
}

/* The start of a streamed event: "data: " and the keys every chunk opens
 * with. Events are written directly, with the bytes json_dumps(JSON_COMPACT)
 * gives for the objects OpenAI defines (keys in this order): no JSON
 * objects to build and dump for every token. */
static void chunk_head(sc_buf *b, const sc_req *r)
{
    bool chat = r->ep == SC_EP_CHAT;
    char num[32];
    sc_buf_adds(b, "data: {\"id\":");
    sc_buf_add_json(b, r->id, strlen(r->id));
    sc_buf_adds(b, chat ? ",\"object\":\"chat.completion.chunk\",\"created\":"
                        : ",\"object\":\"text_completion\",\"created\":");
    sc_buf_add(b, num, (size_t)snprintf(num, sizeof(num), "%" PRId64, r->created));
    sc_buf_adds(b, ",\"model\":");
    sc_buf_add_json(b, r->model, strlen(r->model));
}

/* A chunk with one choice: text (NULL: none; chat: no "content"), the
 * assistant role (chat, first chunk) and finish_reason (NULL: null). With
 * stream_options.include_usage every chunk but the last has "usage":null. */
static void sse_chunk(sc_buf *b, const sc_req *r, const char *text, size_t len, bool role,
                      const char *finish)
{
    chunk_head(b, r);
    if (r->ep == SC_EP_CHAT) {
        sc_buf_adds(b, ",\"choices\":[{\"index\":0,\"delta\":{");
        if (role)
            sc_buf_adds(b, text ? "\"role\":\"assistant\"," : "\"role\":\"assistant\"");
        if (text) {
            sc_buf_adds(b, "\"content\":");
            sc_buf_add_json(b, text, len);
        }
        sc_buf_adds(b, "},\"logprobs\":null,\"finish_reason\":");
    } else {
        sc_buf_adds(b, ",\"choices\":[{\"text\":");
        sc_buf_add_json(b, text ? text : "", text ? len : 0);
        sc_buf_adds(b, ",\"index\":0,\"logprobs\":null,\"finish_reason\":");
    }
    if (finish)
        sc_buf_add_json(b, finish, strlen(finish));
    else
        sc_buf_adds(b, "null");
    sc_buf_adds(b, r->include_usage ? "}],\"usage\":null}\n\n" : "}]}\n\n");
}

/* The last chunk of a stream with stream_options.include_usage. */
static void sse_usage(sc_buf *b, const sc_req *r)
{
    char num[96];
    chunk_head(b, r);
    sc_buf_add(b, num, (size_t)snprintf(num, sizeof(num),
                                        ",\"choices\":[],\"usage\":{\"prompt_tokens\":%" PRIu32
                                        ",\"completion_tokens\":%" PRIu32
                                        ",\"total_tokens\":%" PRIu64 "}}\n\n",
                                        r->usage.prompt_tokens, r->usage.completion_tokens,
                                        (uint64_t)r->usage.prompt_tokens +
                                            r->usage.completion_tokens));
}

static void sse_event(sc_buf *b, json_t *j)
{
    char *s = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    if (!s) {
        b->oom = true;
        return;
    }
    sc_buf_adds(b, "data: ");
    sc_buf_adds(b, s);
    sc_buf_adds(b, "\n\n");
    free(s);
}

/* Format the next events of a stream into r->sse. Returns 0 with events,
 * 1 when there is nothing yet (the caller suspended the connection: r->mu
 * was held for the check), -1 on out of memory. */
static int sse_refill(sc_req *r, struct MHD_Connection *conn)
{
    sc_buf b = {0};
    pthread_mutex_lock(&r->mu);
    bool done = r->state == SC_REQ_DONE;
    size_t n = sc_utf8_complete(r->text, r->text_len, done);
    if (n == 0 && !done) {
        r->suspended = true;
        MHD_suspend_connection(conn);
        pthread_mutex_unlock(&r->mu);
        return 1;
    }
    if (n || (!r->first_sent && r->ep == SC_EP_CHAT)) {
        /* invalid UTF-8 in the text becomes U+FFFD (sc_buf_add_json) */
        sse_chunk(&b, r, n ? r->text : "", n, !r->first_sent, NULL);
        r->first_sent = true;
    }
    memmove(r->text, r->text + n, r->text_len - n);
    r->text_len -= n;
    pthread_mutex_unlock(&r->mu);
    if (done) {
        /* r->mu not needed: the engine writes nothing after DONE */
        if (r->error < 0) {
            const char *code;
            int retry;
            unsigned st = status_of(r->error, &code, &retry);
            sse_event(&b, error_obj(st, r->errmsg[0] ? r->errmsg : "generation failed", NULL,
                                    code));
        } else {
            sse_chunk(&b, r, NULL, 0, false, finish_name(r->finish));
            if (r->include_usage)
                sse_usage(&b, r);
        }
        sc_buf_adds(&b, "data: [DONE]\n\n");
        r->sse_ended = true;
    }
    free(r->sse);
    r->sse = sc_buf_take(&b, &r->sse_len);
    r->sse_off = 0;
    return r->sse ? 0 : -1;
}

typedef struct stream_cls {
    sc_req *r;
    struct MHD_Connection *conn;
    int corked_fd; /* the connection's socket while it is corked, else -1 */
    bool gave;     /* a call returned bytes */
} stream_cls;

/* The head of a stream goes out in one segment with its first event:
 * libmicrohttpd (0.9.75) sends the header of a callback response on its own
 * and pushes it, so the client would wake for the header and again for the
 * first token. reply_stream corks the TCP socket; the reader uncorks it on
 * its next call (libmicrohttpd has written the bytes the previous call gave
 * by then) or as soon as it has nothing to give, so nothing stays corked
 * while the stream waits. libmicrohttpd never corks a plain socket itself
 * on Linux (it buffers with MSG_MORE), so the two do not conflict; but on a
 * connection's first response it pushes the header by turning TCP_NODELAY
 * on, which flushes the cork: that header still goes out alone. */
static void uncork(stream_cls *s)
{
    if (s->corked_fd < 0)
        return;
    int off = 0;
    (void)setsockopt(s->corked_fd, IPPROTO_TCP, TCP_CORK, &off, sizeof(off));
    s->corked_fd = -1;
}

static ssize_t stream_read(void *cls, uint64_t pos, char *buf, size_t max)
{
    (void)pos;
    stream_cls *s = cls;
    sc_req *r = s->r;
    if (s->gave)
        uncork(s);
    while (r->sse_off >= r->sse_len) {
        if (r->sse_ended) {
            uncork(s);
            return MHD_CONTENT_READER_END_OF_STREAM;
        }
        int rc = sse_refill(r, s->conn);
        if (rc != 0)
            uncork(s);
        if (rc == 1)
            return 0;
        if (rc < 0)
            return MHD_CONTENT_READER_END_WITH_ERROR;
    }
    size_t n = r->sse_len - r->sse_off;
    if (n > max)
        n = max;
    memcpy(buf, r->sse + r->sse_off, n);
    r->sse_off += n;
    s->gave = true;
    return (ssize_t)n;
}

static void stream_free(void *cls)
{
    stream_cls *s = cls;
    sc_req_unref(s->r);
    free(s);
}

static enum MHD_Result reply_stream(struct MHD_Connection *conn, conn_ctx *cx, sc_req *r)
{
    stream_cls *s = malloc(sizeof(*s));
    if (!s)
        return MHD_NO;
    *s = (stream_cls){.r = r, .conn = conn, .corked_fd = -1};
    sc_req_ref(r);
    struct MHD_Response *rsp =
        MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384, stream_read, s, stream_free);
    if (!rsp) {
        stream_free(s);
        return MHD_NO;
    }
    MHD_add_response_header(rsp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
    MHD_add_response_header(rsp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
    enum MHD_Result rc = MHD_queue_response(conn, 200, rsp);
    MHD_destroy_response(rsp);
    cx->replied = true;
    cx->status = 200;
    /* Queued: libmicrohttpd writes the header once this handler returns,
     * and calls the reader for the first event (see uncork). A Unix socket
     * (--unix) refuses TCP_CORK: nothing to coalesce there. */
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    int on = 1;
    if (rc == MHD_YES && ci &&
        setsockopt(ci->connect_fd, IPPROTO_TCP, TCP_CORK, &on, sizeof(on)) == 0)
        s->corked_fd = ci->connect_fd;
    return rc;
}

static enum MHD_Result reply_whole(struct MHD_Connection *conn, conn_ctx *cx, sc_req *r)
{
    size_t len;
    char *text = sc_utf8_clean(r->text ? r->text : "", r->text_len, &len);
    if (!text)
        return MHD_NO;
    json_t *choice;
    if (r->ep == SC_EP_CHAT)
        choice = json_pack("{s:i,s:{s:s,s:s%},s:n,s:s}", "index", 0, "message", "role",
                           "assistant", "content", text, len, "logprobs", "finish_reason",
                           finish_name(r->finish));
    else
        choice = json_pack("{s:s%,s:i,s:n,s:s}", "text", text, len, "index", 0, "logprobs",
                           "finish_reason", finish_name(r->finish));
    free(text);
    json_t *j = json_pack("{s:s,s:s,s:I,s:s,s:[o],s:o}", "id", r->id, "object",
                          r->ep == SC_EP_CHAT ? "chat.completion" : "text_completion", "created",
                          (json_int_t)r->created, "model", r->model, "choices", choice, "usage",
                          usage_obj(r));
    return reply_json(conn, cx, 200, j, 0);
}

struct MHD_Connection *sc_http_wake_locked(sc_req *r)
{
    if (r->suspended && r->conn && (r->stream || r->state == SC_REQ_DONE)) {
        r->suspended = false;
        return r->conn;
    }
    return NULL;
}

void sc_http_resume(struct MHD_Connection *c)
{
    if (c)
        MHD_resume_connection(c);
}

/* The generation request is back from a suspension (or just queued). */
static enum MHD_Result gen_progress(struct MHD_Connection *conn, conn_ctx *cx)
{
    sc_req *r = cx->req;
    pthread_mutex_lock(&r->mu);
    bool done = r->state == SC_REQ_DONE;
    bool have_text = r->text_len > 0;
    if (!done && !(r->stream && have_text)) {
        r->suspended = true;
        MHD_suspend_connection(conn);
        pthread_mutex_unlock(&r->mu);
        return MHD_YES;
    }
    pthread_mutex_unlock(&r->mu);
    if (done && r->error < 0 && (!r->stream || !have_text)) {
        const char *code;
        int retry;
        unsigned st = status_of(r->error, &code, &retry);
        const char *param = NULL;
        if (st == 400)
            param = strstr(r->errmsg, "max_tokens") ? "max_tokens"
                    : r->ep == SC_EP_CHAT           ? "messages"
                                                    : "prompt";
        if (st == 400 && strstr(r->errmsg, "context"))
            code = "context_length_exceeded";
        return reply_error(conn, cx, st, param, code, "%s",
                           r->errmsg[0] ? r->errmsg : "generation failed");
    }
    if (r->stream)
        return reply_stream(conn, cx, r);
    return reply_whole(conn, cx, r);
}

static enum MHD_Result handle_gen(struct MHD_Connection *conn, conn_ctx *cx, json_t *body)
{
    bool chat = cx->ep == SC_EP_CHAT;
    sc_model m;
    char why[256];
    if (sc_ctl_model(&m, why, sizeof(why)) < 0 || !m.ok)
        return reply_error(conn, cx, 503, NULL, NULL, "%s", why);
    sc_req *r = sc_req_create();
    if (!r)
        return MHD_NO;
    r->ep = cx->ep;
    r->t_start = cm_now_ns();
    r->created = (int64_t)time(NULL);
    snprintf(r->id, sizeof(r->id), "%s-%" PRIx64 "%06lx", chat ? "chatcmpl" : "cmpl",
             (uint64_t)started_at, (unsigned long)atomic_fetch_add(&id_seq, 1));
    snprintf(r->model, sizeof(r->model), "%s", m.name);
    r->conn = conn;
    perr e = {0};
    if (parse_gen(r, body, chat, &m, &e) < 0) {
        sc_req_unref(r);
        return reply_error(conn, cx, 400, e.param, e.code, "%s", e.msg);
    }
    if (r->prompt) {
        r->gp.prompt = r->prompt;
        r->gp.prompt_len = r->prompt_len;
    }
    cx->req = r;
    int rc = sc_engine_submit(r);
    if (rc < 0) {
        cx->req = NULL;
        r->conn = NULL;
        sc_req_unref(r);
        if (rc == -EAGAIN)
            return reply_error(conn, cx, 503, NULL, "queue_full", "gorgon-sidecar holds %ld "
                               "requests waiting for gorgond already; retry later.", H.max_queue);
        return reply_error(conn, cx, 503, NULL, NULL, "the sidecar is shutting down");
    }
    return gen_progress(conn, cx);
}

/* ---- the other endpoints -------------------------------------------------------- */

static enum MHD_Result handle_models(struct MHD_Connection *conn, conn_ctx *cx)
{
    sc_model m;
    char why[256];
    if (sc_ctl_model(&m, why, sizeof(why)) < 0 || !m.ok)
        return reply_error(conn, cx, 503, NULL, NULL, "%s", why);
    json_t *j = json_pack("{s:s,s:[{s:s,s:s,s:I,s:s,s:I,s:I}]}", "object", "list", "data", "id",
                          m.name, "object", "model", "created", (json_int_t)started_at,
                          "owned_by", "gorgon", "context_length", (json_int_t)m.n_ctx,
                          "max_model_len", (json_int_t)m.n_ctx);
    return reply_json(conn, cx, 200, j, 0);
}

static enum MHD_Result handle_health(struct MHD_Connection *conn, conn_ctx *cx)
{
    char why[256], name[128];
    gorgon_model mi;
    int rc = -EPIPE;
    /* A control session that lost gorgond (-EPIPE) is dropped and tried
     * once more: the answer then says whether gorgond is reachable now,
     * not that an old connection broke. */
    for (int attempt = 0; attempt < 2 && rc == -EPIPE; attempt++) {
        gorgon_client *c = sc_ctl_lock(why, sizeof(why));
        if (!c)
            return reply_json(conn, cx, 503,
                              json_pack("{s:s,s:s}", "status", "unavailable", "error", why), 2);
        rc = gorgon_model_info(c, &mi);
        snprintf(name, sizeof(name), "%s", rc == 0 ? mi.name : "");
        sc_ctl_unlock(rc < 0 && rc != -ENOTSUP);
    }
    if (rc < 0)
        return reply_json(conn, cx, 503, json_pack("{s:s,s:s}", "status", "unavailable", "error",
                                                   rc == -ENOTSUP ? "gorgond serves no model"
                                                                  : gorgon_strerror(rc)), 2);
    return reply_json(conn, cx, 200, json_pack("{s:s,s:s}", "status", "ok", "model", name), 0);
}

static enum MHD_Result handle_metrics(struct MHD_Connection *conn, conn_ctx *cx)
{
    char why[256];
    gorgon_counters st;
    static _Thread_local gorgon_group groups[GORGON_GROUP_MAX_RANKS];
    int n_groups = 0;
    bool have = false;
    gorgon_client *c = sc_ctl_lock(why, sizeof(why));
    if (c) {
        int rc = gorgon_stats(c, &st);
        if (rc == 0 && (n_groups = gorgon_groups(c, groups, GORGON_GROUP_MAX_RANKS)) < 0)
            rc = n_groups;
        have = rc == 0;
        sc_ctl_unlock(rc < 0);
    }
    size_t len;
    char *text = sc_metrics_render(have ? &st : NULL, groups, have ? n_groups : 0, &len);
    if (!text)
        return MHD_NO;
    return queue(conn, cx, 200, "text/plain; version=0.0.4; charset=utf-8", text, len, 0);
}

static enum MHD_Result handle_tokenize(struct MHD_Connection *conn, conn_ctx *cx, json_t *body)
{
    json_t *content = NULL;
    bool add_special = false, with_pieces = false;
    const char *k;
    json_t *v;
    if (!json_is_object(body))
        return reply_error(conn, cx, 400, NULL, "invalid_type", "The request body must be a JSON "
                           "object, not %s.", json_kind(body));
    json_object_foreach(body, k, v) {
        if (!strcmp(k, "content")) {
            if (!json_is_string(v))
                return reply_error(conn, cx, 400, k, "invalid_type", "Invalid type for 'content': "
                                   "expected a string, but got %s instead.", json_kind(v));
            content = v;
        } else if (!strcmp(k, "add_special") || !strcmp(k, "with_pieces")) {
            if (!json_is_boolean(v))
                return reply_error(conn, cx, 400, k, "invalid_type", "Invalid type for '%s': "
                                   "expected a boolean, but got %s instead.", k, json_kind(v));
            *(strcmp(k, "add_special") ? &with_pieces : &add_special) = json_is_true(v);
        } else {
            return reply_error(conn, cx, 400, k, "unknown_parameter",
                               "Unrecognized request argument supplied: %s", k);
        }
    }
    if (!content)
        return reply_error(conn, cx, 400, "content", "missing_required_parameter",
                           "Missing required parameter: 'content'.");
    size_t len = json_string_length(content);
    size_t cap = len + 8;
    int32_t *ids = malloc(cap * sizeof(int32_t));
    if (!ids)
        return MHD_NO;
    char why[256];
    gorgon_client *c = sc_ctl_lock(why, sizeof(why));
    if (!c) {
        free(ids);
        return reply_error(conn, cx, 503, NULL, NULL, "%s", why);
    }
    int n = gorgon_tokenize(c, json_string_value(content), len,
                            add_special ? GORGON_TOK_ADD_BOS : 0, ids, cap);
    json_t *arr = json_array();
    for (int i = 0; n > 0 && i < n; i++) {
        if (!with_pieces) {
            json_array_append_new(arr, json_integer(ids[i]));
            continue;
        }
        char piece[256];
        int32_t two[2] = {ids[i] == 0 ? 0 : ids[i], 0};
        int pn = gorgon_detokenize(c, two, 1, piece, sizeof(piece));
        size_t cl;
        char *clean = sc_utf8_clean(piece, pn > 0 ? (size_t)pn : 0, &cl);
        json_array_append_new(arr, json_pack("{s:i,s:s%}", "id", ids[i], "piece",
                                             clean ? clean : "", clean ? cl : 0));
        free(clean);
    }
    char err[256];
    snprintf(err, sizeof(err), "%s", n < 0 ? gorgon_last_error(c) : "");
    sc_ctl_unlock(n == -EPIPE);
    free(ids);
    if (n < 0) {
        json_decref(arr);
        unsigned st = n == -ENOSPC ? 400 : 503;
        return reply_error(conn, cx, st, st == 400 ? "content" : NULL, NULL, "tokenize: %s%s%s",
                           n == -ENOSPC ? "the text has more tokens than one request holds"
                                        : gorgon_strerror(n), *err ? ": " : "", err);
    }
    return reply_json(conn, cx, 200, json_pack("{s:o}", "tokens", arr), 0);
}

static enum MHD_Result handle_detokenize(struct MHD_Connection *conn, conn_ctx *cx, json_t *body)
{
    json_t *tokens = NULL;
    const char *k;
    json_t *v;
    if (!json_is_object(body))
        return reply_error(conn, cx, 400, NULL, "invalid_type", "The request body must be a JSON "
                           "object, not %s.", json_kind(body));
    json_object_foreach(body, k, v) {
        if (strcmp(k, "tokens"))
            return reply_error(conn, cx, 400, k, "unknown_parameter",
                               "Unrecognized request argument supplied: %s", k);
        tokens = v;
    }
    if (!json_is_array(tokens))
        return reply_error(conn, cx, 400, "tokens", tokens ? "invalid_type"
                                                           : "missing_required_parameter",
                           "'tokens' must be an array of token ids (integers).");
    size_t n = json_array_size(tokens);
    int32_t *ids = malloc((n + 1) * sizeof(int32_t));
    if (!ids)
        return MHD_NO;
    for (size_t i = 0; i < n; i++) {
        json_t *x = json_array_get(tokens, i);
        if (!json_is_integer(x) || json_integer_value(x) < 0 ||
            json_integer_value(x) > INT32_MAX) {
            free(ids);
            return reply_error(conn, cx, 400, "tokens", "invalid_value", "'tokens'[%zu] is not a "
                               "token id (a non-negative integer).", i);
        }
        ids[i] = (int32_t)json_integer_value(x);
    }
    char why[256];
    gorgon_client *c = sc_ctl_lock(why, sizeof(why));
    if (!c) {
        free(ids);
        return reply_error(conn, cx, 503, NULL, NULL, "%s", why);
    }
    size_t cap = n * 64 + 64;
    char *out = malloc(cap);
    int rc = out ? gorgon_detokenize(c, ids, n, out, cap) : -ENOMEM;
    char err[256];
    snprintf(err, sizeof(err), "%s", rc < 0 ? gorgon_last_error(c) : "");
    sc_ctl_unlock(rc == -EPIPE);
    free(ids);
    if (rc < 0) {
        free(out);
        unsigned st = rc == -EINVAL || rc == -ENOSPC ? 400 : 503;
        return reply_error(conn, cx, st, st == 400 ? "tokens" : NULL, NULL, "detokenize: %s%s%s",
                           gorgon_strerror(rc), *err ? ": " : "", err);
    }
    size_t cl;
    char *clean = sc_utf8_clean(out, (size_t)rc, &cl);
    free(out);
    if (!clean)
        return MHD_NO;
    json_t *j = json_pack("{s:s%}", "content", clean, cl);
    free(clean);
    return reply_json(conn, cx, 200, j, 0);
}

/* ---- routing ----------------------------------------------------------------------- */

static const struct route {
    const char *path;
    const char *method;
    enum sc_endpoint ep;
    bool public_; /* answered without the API key */
} routes[] = {
    {"/v1/completions", "POST", SC_EP_COMPLETIONS, false},
    {"/v1/chat/completions", "POST", SC_EP_CHAT, false},
    {"/v1/models", "GET", SC_EP_MODELS, false},
    {"/health", "GET", SC_EP_HEALTH, true},
    {"/metrics", "GET", SC_EP_METRICS, true},
    {"/tokenize", "POST", SC_EP_TOKENIZE, false},
    {"/detokenize", "POST", SC_EP_DETOKENIZE, false},
};

static bool key_ok(struct MHD_Connection *conn)
{
    const char *a = MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
                                                MHD_HTTP_HEADER_AUTHORIZATION);
    if (!a || strncasecmp(a, "Bearer ", 7))
        return false;
    a += 7;
    size_t n = strlen(a), m = strlen(H.api_key);
    /* compare in time independent of where they differ */
    unsigned diff = (unsigned)(n ^ m);
    for (size_t i = 0; i < m; i++)
        diff |= (unsigned)(unsigned char)(i < n ? a[i] : 0) ^ (unsigned char)H.api_key[i];
    return diff == 0;
}

static enum MHD_Result first_call(struct MHD_Connection *conn, conn_ctx *cx, const char *url,
                                  const char *method)
{
    const struct route *rt = NULL;
    bool path_known = false;
    for (size_t i = 0; i < sizeof(routes) / sizeof(routes[0]); i++)
        if (!strcmp(routes[i].path, url)) {
            path_known = true;
            if (!strcmp(routes[i].method, method))
                rt = &routes[i];
        }
    cx->ep = rt ? rt->ep : SC_EP_OTHER;
    if (!rt && path_known)
        return reply_error(conn, cx, 405, NULL, "method_not_allowed", "%s is not allowed on %s.",
                           method, url);
    if (!rt)
        return reply_error(conn, cx, 404, NULL, "not_found", "No such endpoint: %s %s.", method,
                           url);
    if (H.api_key && !rt->public_ && !key_ok(conn))
        return reply_error(conn, cx, 401, NULL, "invalid_api_key", "Incorrect API key provided: "
                           "send 'Authorization: Bearer <key>' with the key given to "
                           "gorgon-sidecar --api-key.");
    const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
                                                 MHD_HTTP_HEADER_CONTENT_LENGTH);
    if (cl) {
        char *end;
        unsigned long long n = strtoull(cl, &end, 10);
        if (n > H.max_body)
            return reply_error(conn, cx, 413, NULL, "request_too_large", "The request body is %llu "
                               "bytes; gorgon-sidecar takes at most %zu (--max-body).", n,
                               H.max_body);
    }
    return MHD_YES;
}

static enum MHD_Result access_cb(void *cls, struct MHD_Connection *conn, const char *url,
                                 const char *method, const char *version, const char *upload,
                                 size_t *upload_size, void **con_cls)
{
    (void)cls, (void)version;
    conn_ctx *cx = *con_cls;
    if (!cx) {
        cx = calloc(1, sizeof(*cx));
        if (!cx)
            return MHD_NO;
        *con_cls = cx;
        return first_call(conn, cx, url, method);
    }
    if (cx->replied) {
        *upload_size = 0; /* answered already (413, 401...): drop the rest */
        return MHD_YES;
    }
    if (*upload_size) {
        if (cx->body.len + *upload_size > H.max_body) {
            /* A chunked body without Content-Length grew past the limit.
             * libmicrohttpd 0.9.75 cannot answer in the middle of an
             * upload, so the connection is closed here, unread (with
             * Content-Length the 413 goes out in first_call). */
            cx->status = 413;
            cx->replied = true;
            return MHD_NO;
        }
        sc_buf_add(&cx->body, upload, *upload_size);
        *upload_size = 0;
        return cx->body.oom ? MHD_NO : MHD_YES;
    }
    if (cx->req)
        return gen_progress(conn, cx);
    switch (cx->ep) {
    case SC_EP_MODELS: return handle_models(conn, cx);
    case SC_EP_HEALTH: return handle_health(conn, cx);
    case SC_EP_METRICS: return handle_metrics(conn, cx);
    default: break;
    }
    json_error_t je;
    json_t *body = json_loadb(cx->body.p ? cx->body.p : "", cx->body.len, JSON_REJECT_DUPLICATES,
                              &je);
    if (!body)
        return reply_error(conn, cx, 400, NULL, "invalid_json", "We could not parse the JSON body "
                           "of your request: %s (line %d, column %d).", je.text, je.line,
                           je.column);
    enum MHD_Result rc;
    switch (cx->ep) {
    case SC_EP_TOKENIZE: rc = handle_tokenize(conn, cx, body); break;
    case SC_EP_DETOKENIZE: rc = handle_detokenize(conn, cx, body); break;
    default: rc = handle_gen(conn, cx, body); break;
    }
    json_decref(body);
    return rc;
}

static void completed_cb(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    (void)cls, (void)conn;
    conn_ctx *cx = *con_cls;
    if (!cx)
        return;
    *con_cls = NULL;
    sc_metrics_request(cx->ep, cx->replied ? cx->status : 499);
    if (cx->req) {
        sc_req *r = cx->req;
        pthread_mutex_lock(&r->mu);
        r->conn = NULL;
        r->suspended = false;
        bool running = r->state != SC_REQ_DONE;
        pthread_mutex_unlock(&r->mu);
        if (running || toe != MHD_REQUEST_TERMINATED_COMPLETED_OK)
            sc_engine_cancel(r);
        sc_req_unref(r);
    }
    free(cx->body.p);
    free(cx);
}

static void log_cb(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    fprintf(stderr, "gorgon-sidecar: libmicrohttpd: ");
    vfprintf(stderr, fmt, ap);
}

int sc_http_start(const sc_http_cfg *cfg, struct MHD_Daemon **d, char *why, size_t cap)
{
    H = *cfg;
    started_at = (int64_t)time(NULL);
    /* External epoll mode: the serving threads run the daemons, so a
     * callback submits to gorgond and a resumed connection is written
     * without a thread hop (and no inter-thread channel is needed: a
     * connection is only ever resumed by the thread that runs it). */
    unsigned flags = MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG;
    /* MHD creates an IPv4 socket unless told: an IPv6 address to bind
     * (--listen [::1]:PORT) then failed with EAFNOSUPPORT */
    if (cfg->listen_fd < 0 && cfg->addr && cfg->addr->sa_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    int lfd = cfg->listen_fd;
    for (unsigned i = 0; i < cfg->threads; i++) {
        struct MHD_OptionItem opts[4];
        int n = 0;
        if (lfd >= 0)
            opts[n++] = (struct MHD_OptionItem){MHD_OPTION_LISTEN_SOCKET, lfd, NULL};
        else
            opts[n++] = (struct MHD_OptionItem){MHD_OPTION_SOCK_ADDR, 0, (void *)cfg->addr};
        opts[n++] = (struct MHD_OptionItem){MHD_OPTION_CONNECTION_TIMEOUT, 300, NULL};
        opts[n++] = (struct MHD_OptionItem){MHD_OPTION_END, 0, NULL};
        d[i] = MHD_start_daemon(flags, cfg->port, NULL, NULL, access_cb, NULL,
                                MHD_OPTION_EXTERNAL_LOGGER, log_cb, NULL,
                                MHD_OPTION_NOTIFY_COMPLETED, completed_cb, NULL,
                                MHD_OPTION_ARRAY, opts, MHD_OPTION_END);
        const union MHD_DaemonInfo *li =
            d[i] && lfd < 0 ? MHD_get_daemon_info(d[i], MHD_DAEMON_INFO_LISTEN_FD) : NULL;
        if (li)
            lfd = li->listen_fd; /* the others accept on d[0]'s socket */
        if (!d[i] || lfd < 0) {
            snprintf(why, cap, "libmicrohttpd could not start (address in use, or bad address?)");
            sc_http_stop(d, i + (d[i] != NULL));
            return -1;
        }
    }
    return 0;
}

void sc_http_stop(struct MHD_Daemon **d, unsigned n)
{
    /* all but d[0] let go of the shared listening socket first */
    for (unsigned i = 1; i < n; i++)
        if (d[i])
            (void)MHD_quiesce_daemon(d[i]);
    for (unsigned i = 0; i < n; i++) {
        if (d[i])
            MHD_stop_daemon(d[i]);
        d[i] = NULL;
    }
}

unsigned short sc_http_port(struct MHD_Daemon *d)
{
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(d, MHD_DAEMON_INFO_BIND_PORT);
    return di ? di->port : 0;
}

int sc_http_fd(struct MHD_Daemon *d)
{
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(d, MHD_DAEMON_INFO_EPOLL_FD);
    return di ? di->epoll_fd : -1;
}

void sc_http_run(struct MHD_Daemon *d)
{
    (void)MHD_run(d);
}

int sc_http_timeout_ms(struct MHD_Daemon *d)
{
    MHD_UNSIGNED_LONG_LONG ms;
    if (MHD_get_timeout(d, &ms) != MHD_YES)
        return -1;
    return ms > INT_MAX ? INT_MAX : (int)ms;
}
