/* gorgon-sidecar — an OpenAI-compatible HTTP server beside the application,
 * reaching gorgond only through libgorgon's shared-memory rings.
 *
 * Request path: --threads serving threads (sc_engine.c) each run one
 * libmicrohttpd daemon (sc_http.c, external epoll mode, all on one
 * listening socket) and own one generating gorgon_client. The daemon's
 * callback parses and checks a request, submits it to gorgond on its
 * thread's client, and suspends the connection; the same thread reaps the
 * completions, appends text to the request, resumes the connection and runs
 * the daemon, whose content reader formats the Server-Sent Events. Nothing
 * crosses a thread between the request and its first token. A full ring (no
 * free slot) keeps the request waiting on its thread, never in a callback.
 * Short round trips that are not generations (/tokenize, /metrics' counters,
 * /health, the model info) use a second client shared under a mutex
 * (sc_ctl_*), bounded by libgorgon's 1 s timeouts.
 *
 * Lifetimes: an sc_req is reference-counted: the HTTP connection, the engine
 * (from submission to its final chunk) and a streaming response each hold
 * one. It lives on the serving thread of its connection; its output fields
 * are under its mutex all the same (MHD_stop_daemon's completion callbacks
 * run on the main thread, after the serving threads ended).
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
/* Append s[0..len) as a JSON string, quotes included, as jansson's
 * json_dumps writes it (\\ \" \b \f \n \r \t, other control characters
 * as \u00XX, everything else verbatim) after sc_utf8_clean's replacement of
 * invalid UTF-8: the same bytes, without the copy and the JSON objects. */
void sc_buf_add_json(sc_buf *b, const char *s, size_t len);

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

/* ---- generation requests and the serving threads (sc_engine.c) ---------- */

enum sc_req_state {
    SC_REQ_NEW,     /* not submitted yet (waiting for a slot) */
    SC_REQ_RUNNING, /* submitted; text may be arriving */
    SC_REQ_DONE,    /* final chunk seen (finish/usage or error set) */
};

struct MHD_Connection;

typedef struct sc_req {
    atomic_int refs;
    pthread_mutex_t mu;
    /* ---- input: set by the access handler before sc_engine_submit, then read-only */
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
    /* ---- its serving thread only */
    uint32_t gid;
    bool cancel_sent;
    uint64_t t_last;
    struct sc_req *next;      /* its serving thread's waiting/active list */
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

struct MHD_Daemon;

typedef struct sc_engine_cfg {
    const char *socket;   /* gorgond's socket (NULL: libgorgon's default) */
    long max_queue;       /* requests held waiting for a slot before 503 (all threads) */
    struct MHD_Daemon *const *daemons; /* from sc_http_start: one serving thread each */
    unsigned n_daemons;
} sc_engine_cfg;

/* Start one serving thread per daemon (-errno: none left running). The
 * daemons are the threads' from then on, until sc_engine_stop: it fails the
 * requests they hold ("the sidecar is shutting down"), lets each daemon
 * write what it can of that, and joins them; the caller then stops the
 * daemons (sc_http_stop). */
int sc_engine_start(const sc_engine_cfg *cfg);
void sc_engine_stop(void);
/* From a daemon callback (its serving thread): submit r to gorgond on the
 * thread's client now, or let it wait on the thread for a free slot; either
 * way the engine takes a reference until r's final chunk. On return r->state
 * is SC_REQ_RUNNING (gorgond has it), SC_REQ_NEW (waiting) or SC_REQ_DONE
 * (failed, with its error). -EAGAIN when max_queue requests wait,
 * -ESHUTDOWN (nothing taken). */
int sc_engine_submit(sc_req *r);
/* The client of r went away: cancel it (from its daemon's completion
 * callback; the serving thread sends the cancellation on its next pass). */
void sc_engine_cancel(sc_req *r);
/* The completion-notification mechanism the serving threads wait on (for logs). */
const char *sc_engine_wait_kind(void);

/* With r->mu held: if the HTTP side suspended r's connection and there is
 * something for it now, mark it resumed and return it for sc_http_resume,
 * which the caller calls after unlocking r->mu (the connection stays
 * suspended, so valid, until then); else NULL. */
struct MHD_Connection *sc_http_wake_locked(sc_req *r);
/* MHD_resume_connection(c) (c's serving thread; the loop then runs the
 * daemon to write what is new). NULL is a no-op. */
void sc_http_resume(struct MHD_Connection *c);

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
