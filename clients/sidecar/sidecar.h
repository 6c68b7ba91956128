/* gorgon-sidecar — an OpenAI-compatible HTTP server beside the application,
 * reaching gorgond only through libgorgon's shared-memory rings.
 *
 * Request path: libmicrohttpd's epoll threads (sc_http.c) parse and check a
 * request, then hand it to the engine thread (sc_engine.c) through a locked
 * queue and an eventfd, and suspend the connection. The engine thread owns
 * the one generating gorgon_client: it submits, reaps completions, appends
 * text to the request and resumes its connection; the HTTP thread formats
 * the Server-Sent Events itself. An HTTP thread therefore never waits on a
 * ring: a full ring (no free slot) keeps the request queued in the engine.
 * Short round trips that are not generations (/tokenize, /metrics' counters,
 * /health, the model info) use a second client shared under a mutex
 * (sc_ctl_*), bounded by libgorgon's 1 s timeouts.
 *
 * Lifetimes: an sc_req is reference-counted: the HTTP connection, the engine
 * (from submission to its final chunk) and a streaming response each hold
 * one. Its output fields are under its mutex.
 */
#ifndef GORGON_SIDECAR_H
#define GORGON_SIDECAR_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "clients/gorgon.h"

/* ---- chat templates (sc_chat.c) --------------------------------------- */

enum sc_chat_kind {
    SC_CHAT_PLAIN = 0, /* no template: "role: content" lines */
    SC_CHAT_LLAMA2,
    SC_CHAT_LLAMA3,
    SC_CHAT_CHATML,
    SC_CHAT_ZEPHYR,
    SC_CHAT_MISTRAL,
    SC_CHAT_GEMMA,
};

typedef struct sc_msg {
    const char *role;
    const char *content;
    size_t content_len;
} sc_msg;

/* The family a GGUF tokenizer.chat_template belongs to; *known is false
 * when the text names none of them (the caller announces the fallback:
 * ChatML for an unknown template, PLAIN for none). */
enum sc_chat_kind sc_chat_detect(const char *tmpl, bool *known);
const char *sc_chat_name(enum sc_chat_kind k);
/* Render messages with the generation prompt, as the family's template does
 * (bos_token included where the template writes it). Returns a malloc'd
 * NUL-terminated string (*len its length), or NULL with err (cap bytes)
 * saying why (a role order or role the template refuses). */
char *sc_chat_render(enum sc_chat_kind k, const sc_msg *m, size_t n, size_t *len, char *err,
                     size_t cap);
/* The BOS text a family's rendering starts with ("" if none): gorgond adds
 * the real BOS token to a text prompt, so the sidecar drops this prefix. */
const char *sc_chat_bos(enum sc_chat_kind k);

/* ---- growing strings and UTF-8 (sc_util.c) ----------------------------- */

typedef struct sc_buf {
    char *p; /* NUL-terminated while not oom */
    size_t len, cap;
    bool oom; /* an append failed: the buffer is unusable */
} sc_buf;

void sc_buf_add(sc_buf *b, const char *s, size_t n);
void sc_buf_adds(sc_buf *b, const char *s);
void sc_buf_addf(sc_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Hand the string over (caller frees), or NULL after oom (freed). */
char *sc_buf_take(sc_buf *b, size_t *len);


/* Bytes of buf[0..len) that end on a whole UTF-8 sequence (an incomplete
 * trailing sequence is held back until more bytes come, unless final). */
size_t sc_utf8_complete(const char *buf, size_t len, bool final);
/* A copy of s[0..len) with invalid UTF-8 replaced by U+FFFD (malloc'd). */
char *sc_utf8_clean(const char *s, size_t len, size_t *out_len);

/* ---- metrics (sc_metrics.c) ------------------------------------------- */

enum sc_endpoint {
    SC_EP_COMPLETIONS,
    SC_EP_CHAT,
    SC_EP_MODELS,
    SC_EP_HEALTH,
    SC_EP_METRICS,
    SC_EP_TOKENIZE,
    SC_EP_DETOKENIZE,
    SC_EP_OTHER,
    SC_EP_COUNT,
};
const char *sc_endpoint_name(enum sc_endpoint e);

void sc_metrics_request(enum sc_endpoint e, unsigned status);
void sc_metrics_tokens(uint32_t prompt, uint32_t completion);
void sc_metrics_ttft(uint64_t ns);
void sc_metrics_itl(uint64_t ns);
void sc_metrics_e2e(uint64_t ns);
void sc_metrics_cancelled(void);
extern atomic_long sc_running, sc_queued;
/* Append the Prometheus text exposition (sidecar series, then gorgond's
 * when st is not NULL) to a malloc'd buffer; NULL on out of memory. */
char *sc_metrics_render(const gorgon_counters *st, const gorgon_group *groups, int n_groups,
                        size_t *len);

/* ---- generation requests and the engine thread (sc_engine.c) ------------ */

enum sc_req_state {
    SC_REQ_NEW,     /* queued for the engine */
    SC_REQ_RUNNING, /* submitted; text may be arriving */
    SC_REQ_DONE,    /* final chunk seen (finish/usage or error set) */
};

struct MHD_Connection;

typedef struct sc_req {
    atomic_int refs;
    pthread_mutex_t mu;
    /* ---- input: set by the HTTP thread before sc_engine_submit, then read-only */
    enum sc_endpoint ep;
    bool stream, include_usage;
    bool want_max;            /* max_tokens not given: fill the context */
    char id[48];
    char model[128];
    int64_t created;
    char *prompt;             /* text (malloc'd) or NULL */
    size_t prompt_len;
    int32_t *ids;             /* token ids (malloc'd) or NULL */
    size_t n_ids;
    char stops[GORGON_GEN_MAX_STOP][64];
    const char *stop_ptrs[GORGON_GEN_MAX_STOP];
    gorgon_gen_params gp;
    uint64_t t_start;         /* request received (ns) */
    /* ---- engine-only */
    uint32_t gid;
    bool cancel_sent;
    uint64_t t_last;
    struct sc_req *next;      /* engine lists */
    /* ---- under mu */
    enum sc_req_state state;
    struct MHD_Connection *conn; /* NULL once the connection is gone */
    bool suspended;
    bool gone;                /* the client went away: cancel */
    char *text;               /* generated bytes not yet taken by the HTTP side */
    size_t text_len, text_cap;
    bool first_sent;          /* HTTP side: the role chunk/first chunk went out */
    int finish;               /* enum gorgon_finish */
    int32_t error;            /* 0 or -errno (final) */
    char errmsg[512];
    gorgon_gen_usage usage;
    /* ---- HTTP side: the SSE bytes formatted but not yet written */
    char *sse;
    size_t sse_len, sse_off;
    bool sse_ended;           /* [DONE] formatted */
} sc_req;

sc_req *sc_req_create(void);
void sc_req_ref(sc_req *r);
void sc_req_unref(sc_req *r);

typedef struct sc_engine_cfg {
    const char *socket;   /* gorgond's socket (NULL: libgorgon's default) */
    uint32_t n_ctx;       /* for requests without max_tokens */
    long max_queue;       /* requests held waiting for a slot before 503 */
} sc_engine_cfg;

/* Start/stop the engine thread. sc_engine_stop fails the requests it holds
 * ("the sidecar is shutting down") and resumes their connections. */
int sc_engine_start(const sc_engine_cfg *cfg);
void sc_engine_stop(void);
/* Queue r (takes a reference). -EAGAIN when max_queue requests wait. */
int sc_engine_submit(sc_req *r);
/* The client of r went away: cancel it (any thread). */
void sc_engine_cancel(sc_req *r);
/* The completion-notification mechanism the engine waits on (for logs). */
const char *sc_engine_wait_kind(void);

/* Resume r's connection if the HTTP side suspended it (r->mu held). */
void sc_http_wake_locked(sc_req *r);

/* ---- the control client (sc_engine.c) ----------------------------------- */

typedef struct sc_model {
    bool ok;
    char name[128];
    uint32_t n_ctx, n_vocab;
    int32_t bos, eos;
    enum sc_chat_kind chat;
} sc_model;

/* Lock the control client, connecting when needed: NULL (unlocked) when
 * gorgond cannot be reached, with the reason in why. */
gorgon_client *sc_ctl_lock(char *why, size_t cap);
/* Unlock; broken: the last call returned a transport error (drop it). */
void sc_ctl_unlock(bool broken);
/* The served model (cached since the last connect): 0, or -errno with why. */
int sc_ctl_model(sc_model *out, char *why, size_t cap);
void sc_ctl_init(const char *socket);
void sc_ctl_fini(void);

#endif
