/* The engine thread: the one gorgon_client that generates, and the control
 * client for short round trips.
 *
 * HTTP threads queue requests on an inbox (E.mu) and ring E.efd (an
 * eventfd). The engine thread moves them to `waiting`, submits them in
 * order while gorgond has free slots (-EAGAIN leaves the rest waiting: no
 * HTTP thread ever waits on a full ring), reaps completions with gorgon_poll
 * and appends each text chunk to its request, then resumes the request's
 * connection (sc_http_wake_locked). Cancellations (a client that went away)
 * are flagged on the request and picked up on the next pass.
 *
 * Waiting: one epoll set holds E.efd and libgorgon's completion event fd
 * (gorgon_event_fd, which gorgond writes under the NEED_WAKEUP protocol and
 * which also wakes on gorgond's hang-up). The thread reaps with gorgon_poll
 * until it is empty, arms with gorgon_event_arm (1: more are ready, reap
 * again) and sleeps in epoll_wait until either a completion or a new
 * request/cancellation arrives: no spinning and no timeouts while idle or
 * streaming. Against an older gorgond without the event fd (-EOPNOTSUPP) it
 * falls back to gorgon_wait in SC_WAIT_NS slices while requests run (new
 * requests then wait at most that long) and poll() on E.efd and the control
 * socket when idle.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "clients/sidecar/sidecar.h"
#include "common/cm_log.h"
#include "common/cm_time.h"

#define TAG "sidecar"
#define SC_WAIT_NS 200000        /* gorgon_wait slice while streams run */
#define SC_RECONNECT_NS 200000000 /* between attempts while gorgond is down */
#define SC_CQ_BATCH 64

static struct {
    sc_engine_cfg cfg;
    pthread_t th;
    bool started;
    int efd;
    pthread_mutex_t mu; /* inbox, n_inbox, stop */
    sc_req *inbox, **inbox_tail;
    long n_inbox;
    bool stop;
    /* engine thread only */
    int epfd;
    gorgon_client *cli;
    int evfd; /* cli's gorgon_event_fd, -1 when gorgond has none */
    atomic_bool legacy_wait;
    sc_req *waiting, **waiting_tail;
    sc_req *active;
    uint64_t next_connect;
    char down_why[256];
} E = {.mu = PTHREAD_MUTEX_INITIALIZER, .efd = -1, .epfd = -1, .evfd = -1};

/* ---- requests ------------------------------------------------------------ */

sc_req *sc_req_create(void)
{
    sc_req *r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    atomic_init(&r->refs, 1);
    pthread_mutex_init(&r->mu, NULL);
    return r;
}

void sc_req_ref(sc_req *r)
{
    atomic_fetch_add_explicit(&r->refs, 1, memory_order_relaxed);
}

void sc_req_unref(sc_req *r)
{
    if (!r || atomic_fetch_sub_explicit(&r->refs, 1, memory_order_acq_rel) != 1)
        return;
    pthread_mutex_destroy(&r->mu);
    free(r->prompt);
    free(r->ids);
    free(r->text);
    free(r->sse);
    free(r);
}

static void ring(void)
{
    uint64_t one = 1;
    ssize_t n = write(E.efd, &one, sizeof(one));
    (void)n; /* EAGAIN: the counter is already non-zero, the engine will look */
}

int sc_engine_submit(sc_req *r)
{
    pthread_mutex_lock(&E.mu);
    if (E.stop || E.n_inbox + atomic_load(&sc_queued) >= E.cfg.max_queue) {
        pthread_mutex_unlock(&E.mu);
        return E.stop ? -ESHUTDOWN : -EAGAIN;
    }
    sc_req_ref(r);
    r->next = NULL;
    *E.inbox_tail = r;
    E.inbox_tail = &r->next;
    E.n_inbox++;
    pthread_mutex_unlock(&E.mu);
    ring();
    return 0;
}

void sc_engine_cancel(sc_req *r)
{
    pthread_mutex_lock(&r->mu);
    bool running = r->state != SC_REQ_DONE;
    r->gone = true;
    pthread_mutex_unlock(&r->mu);
    if (running)
        ring();
}

const char *sc_engine_wait_kind(void)
{
    if (atomic_load(&E.legacy_wait))
        return "gorgon_wait in 200 us slices while streams run (this gorgond has no completion "
               "event fd), poll() on an eventfd and gorgond's socket when idle";
    return "epoll on libgorgon's completion event fd (gorgon_event_fd/gorgon_event_arm) and the "
           "request eventfd";
}

/* ---- engine-thread helpers ------------------------------------------------ */

/* Append to r's text (r->mu held). */
static int add_text(sc_req *r, const char *s, size_t n)
{
    if (r->text_len + n > r->text_cap) {
        size_t cap = r->text_cap ? r->text_cap : 1024;
        while (cap < r->text_len + n)
            cap *= 2;
        char *p = realloc(r->text, cap);
        if (!p)
            return -ENOMEM;
        r->text = p;
        r->text_cap = cap;
    }
    memcpy(r->text + r->text_len, s, n);
    r->text_len += n;
    return 0;
}

/* Finish r with an error before or after it reached gorgond. */
static void fail(sc_req *r, int32_t err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void fail(sc_req *r, int32_t err, const char *fmt, ...)
{
    pthread_mutex_lock(&r->mu);
    r->state = SC_REQ_DONE;
    r->error = err;
    r->finish = GORGON_FINISH_ERROR;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->errmsg, sizeof(r->errmsg), fmt, ap);
    va_end(ap);
    sc_http_wake_locked(r);
    pthread_mutex_unlock(&r->mu);
}

static void unlink_active(sc_req *r)
{
    for (sc_req **p = &E.active; *p; p = &(*p)->next)
        if (*p == r) {
            *p = r->next;
            return;
        }
}

static void drop_client(const char *why)
{
    snprintf(E.down_why, sizeof(E.down_why), "%s", why);
    CM_LOG_WARN(TAG, "lost gorgond: %s", why);
    while (E.active) {
        sc_req *r = E.active;
        E.active = r->next;
        fail(r, -EPIPE, "gorgond went away (%s)", why);
        atomic_fetch_sub(&sc_running, 1);
        sc_req_unref(r);
    }
    if (E.evfd >= 0)
        epoll_ctl(E.epfd, EPOLL_CTL_DEL, E.evfd, NULL);
    E.evfd = -1;
    gorgon_close(E.cli);
    E.cli = NULL;
    E.next_connect = cm_now_ns() + SC_RECONNECT_NS;
}

static void try_connect(void)
{
    uint64_t now = cm_now_ns();
    if (now < E.next_connect)
        return;
    gorgon_opts o = {.socket_path = E.cfg.socket};
    int rc = gorgon_connect(&E.cli, &o);
    if (rc < 0) {
        E.cli = NULL;
        snprintf(E.down_why, sizeof(E.down_why), "%s: %s%s%s", gorgon_last_socket(),
                 gorgon_strerror(rc), *gorgon_last_refusal() ? ": " : "", gorgon_last_refusal());
        E.next_connect = now + SC_RECONNECT_NS;
        return;
    }
    CM_LOG_INFO(TAG, "connected to gorgond (%s, session %u)", gorgon_last_socket(),
                gorgon_session_id(E.cli));
    rc = gorgon_event_fd(E.cli);
    if (rc >= 0) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = 1};
        if (epoll_ctl(E.epfd, EPOLL_CTL_ADD, rc, &ev) == 0) {
            E.evfd = rc;
            atomic_store(&E.legacy_wait, false);
            return;
        }
        rc = -errno;
    }
    if (rc == -EPIPE) {
        drop_client("event fd: gorgond went away");
        return;
    }
    E.evfd = -1;
    if (!atomic_exchange(&E.legacy_wait, true))
        CM_LOG_WARN(TAG, "no completion event fd (%s): waiting with gorgon_wait slices",
                    gorgon_strerror(rc));
}

/* Fill in what the request needs from the model: max_tokens when the
 * client gave none (the rest of the context). 0, 1 to retry later (no free
 * slot for the tokenize round trip), or < 0 after failing r. */
static int prepare(sc_req *r)
{
    if (!r->want_max)
        return 0;
    sc_model m;
    char why[256];
    if (sc_ctl_model(&m, why, sizeof(why)) < 0) {
        fail(r, -EPIPE, "%s", why);
        return -1;
    }
    int64_t n = (int64_t)r->n_ids;
    if (r->prompt) {
        int32_t *ids = malloc(((size_t)m.n_ctx + 1) * sizeof(int32_t));
        if (!ids) {
            fail(r, -ENOMEM, "out of memory");
            return -1;
        }
        int rc = gorgon_tokenize(E.cli, r->prompt, r->prompt_len,
                                 m.bos >= 0 ? GORGON_TOK_ADD_BOS : 0, ids, (size_t)m.n_ctx + 1);
        free(ids);
        if (rc == -EAGAIN)
            return 1;
        if (rc == -ENOSPC)
            n = (int64_t)m.n_ctx + 1;
        else if (rc < 0) {
            fail(r, rc, "cannot tokenize the prompt: %s%s%s", gorgon_strerror(rc),
                 *gorgon_last_error(E.cli) ? ": " : "", gorgon_last_error(E.cli));
            return -1;
        } else
            n = rc;
    }
    if (n >= (int64_t)m.n_ctx) {
        fail(r, -EINVAL, "prompt (%s%" PRId64 " tokens) leaves no room in the context (%u)",
             n > (int64_t)m.n_ctx ? "over " : "", n > (int64_t)m.n_ctx ? (int64_t)m.n_ctx : n,
             m.n_ctx);
        return -1;
    }
    r->gp.max_tokens = (int32_t)((int64_t)m.n_ctx - n);
    r->want_max = false;
    return 0;
}

/* Submit waiting requests in order while gorgond takes them. */
static void submit_waiting(void)
{
    while (E.waiting && E.cli) {
        sc_req *r = E.waiting;
        pthread_mutex_lock(&r->mu);
        bool gone = r->gone;
        pthread_mutex_unlock(&r->mu);
        int rc = 0;
        if (gone) {
            fail(r, -ECANCELED, "the client went away before the request started");
            sc_metrics_cancelled();
            rc = -1;
        } else if ((rc = prepare(r)) == 1) {
            return;
        }
        if (rc == 0) {
            rc = gorgon_generate_submit(E.cli, &r->gp, (uint64_t)(uintptr_t)r, &r->gid);
            if (rc == -EAGAIN)
                return; /* every slot busy: stays first in line */
            if (rc == -EPIPE) {
                drop_client("submit: gorgond went away");
                return;
            }
            if (rc < 0)
                fail(r, rc, "%s", gorgon_strerror(rc));
        }
        E.waiting = r->next;
        if (!E.waiting)
            E.waiting_tail = &E.waiting;
        atomic_fetch_sub(&sc_queued, 1);
        if (rc == 0) {
            pthread_mutex_lock(&r->mu);
            r->state = SC_REQ_RUNNING;
            pthread_mutex_unlock(&r->mu);
            r->next = E.active;
            E.active = r;
            atomic_fetch_add(&sc_running, 1);
        } else {
            sc_req_unref(r);
        }
    }
}

static void send_cancels(void)
{
    for (sc_req *r = E.active; r && E.cli; r = r->next) {
        if (r->cancel_sent)
            continue;
        pthread_mutex_lock(&r->mu);
        bool gone = r->gone;
        pthread_mutex_unlock(&r->mu);
        if (!gone)
            continue;
        int rc = gorgon_cancel(E.cli, r->gid);
        if (rc == -EAGAIN)
            return; /* SQ full: try again on the next pass */
        r->cancel_sent = true;
        if (rc == -EPIPE) {
            drop_client("cancel: gorgond went away");
            return;
        }
    }
}

static void on_completion(const gorgon_completion *c)
{
    if (c->opcode != GORGON_OP_GENERATE)
        return;
    sc_req *r = (sc_req *)(uintptr_t)c->user_data;
    gorgon_gen_chunk ch;
    gorgon_generate_chunk_of(E.cli, c, &ch);
    uint64_t now = cm_now_ns();
    pthread_mutex_lock(&r->mu);
    /* a final completion may carry the last text too (unlike
     * gorgon_generate_next's final chunk); a failed one carries the message */
    if (!ch.done || ch.error == 0) {
        if (ch.len) {
            if (add_text(r, ch.text, ch.len) < 0) {
                r->gone = true; /* cannot keep the text: stop it */
                snprintf(r->errmsg, sizeof(r->errmsg), "out of memory");
            }
            if (!r->t_last)
                sc_metrics_ttft(now - r->t_start);
            else
                sc_metrics_itl(now - r->t_last);
            r->t_last = now;
        }
    }
    if (ch.done) {
        r->state = SC_REQ_DONE;
        r->finish = ch.finish;
        r->error = ch.error;
        r->usage = ch.usage;
        if (ch.error < 0)
            snprintf(r->errmsg, sizeof(r->errmsg), "%.*s", (int)ch.len, ch.text ? ch.text : "");
        if (ch.error == -ECANCELED && r->gone)
            sc_metrics_cancelled();
        sc_metrics_e2e(now - r->t_start);
        sc_metrics_tokens(ch.usage.prompt_tokens, ch.usage.completion_tokens);
    }
    sc_http_wake_locked(r);
    pthread_mutex_unlock(&r->mu);
    if (ch.done) {
        unlink_active(r);
        atomic_fetch_sub(&sc_running, 1);
        sc_req_unref(r);
    }
}

/* Handle completions; the count, or < 0 once the client was dropped. */
static int handle(const gorgon_completion *cq, int n, const char *what)
{
    if (n == -EPIPE || n == -EPROTO) {
        drop_client(what);
        return -1;
    }
    for (int i = 0; i < n; i++)
        on_completion(&cq[i]);
    return n;
}

static void drain_efd(void)
{
    uint64_t v;
    ssize_t n = read(E.efd, &v, sizeof(v));
    (void)n;
}

static void *engine_main(void *arg)
{
    (void)arg;
    gorgon_completion cq[SC_CQ_BATCH];
    for (;;) {
        pthread_mutex_lock(&E.mu);
        bool stop = E.stop;
        if (E.inbox) {
            *E.waiting_tail = E.inbox;
            E.waiting_tail = E.inbox_tail;
            atomic_fetch_add(&sc_queued, E.n_inbox);
            E.inbox = NULL;
            E.inbox_tail = &E.inbox;
            E.n_inbox = 0;
        }
        pthread_mutex_unlock(&E.mu);
        if (stop)
            break;
        if (!E.cli)
            try_connect();
        if (!E.cli) {
            /* nobody to run them: refuse what waits rather than hang */
            while (E.waiting) {
                sc_req *r = E.waiting;
                E.waiting = r->next;
                atomic_fetch_sub(&sc_queued, 1);
                fail(r, -ECONNREFUSED, "gorgond is not reachable (%s)", E.down_why);
                sc_req_unref(r);
            }
            E.waiting_tail = &E.waiting;
            struct pollfd pf = {.fd = E.efd, .events = POLLIN};
            if (poll(&pf, 1, 1000) > 0)
                drain_efd();
            continue;
        }
        submit_waiting();
        send_cancels();
        if (!E.cli)
            continue;
        int n = handle(cq, gorgon_poll(E.cli, cq, SC_CQ_BATCH), "poll: gorgond went away");
        if (n != 0)
            continue; /* more may be ready, and slots may have freed up */
        if (E.evfd >= 0) {
            int armed = gorgon_event_arm(E.cli);
            if (armed == 1)
                continue; /* completions arrived meanwhile: reap them */
            if (armed < 0) {
                drop_client("arm: gorgond went away");
                continue;
            }
            struct epoll_event ev[2];
            int k = epoll_wait(E.epfd, ev, 2, -1);
            for (int i = 0; i < k; i++)
                if (ev[i].data.u32 == 0)
                    drain_efd();
            /* the event fd: the next gorgon_poll reaps (and the next arm empties it) */
        } else if (gorgon_inflight(E.cli) == 0) {
            struct pollfd pf[2] = {{.fd = E.efd, .events = POLLIN},
                                   {.fd = gorgon_fd(E.cli), .events = POLLRDHUP}};
            if (poll(pf, 2, -1) > 0) {
                if (pf[0].revents)
                    drain_efd();
                if (pf[1].revents & (POLLHUP | POLLRDHUP | POLLERR))
                    drop_client("gorgond closed the connection");
            }
        } else {
            drain_efd(); /* the loop looks at the inbox each slice anyway */
            handle(cq, gorgon_wait(E.cli, cq, SC_CQ_BATCH, SC_WAIT_NS), "wait: gorgond went away");
        }
    }
    /* shutting down: fail everything still held */
    while (E.waiting) {
        sc_req *r = E.waiting;
        E.waiting = r->next;
        fail(r, -ESHUTDOWN, "the sidecar is shutting down");
        sc_req_unref(r);
    }
    while (E.active) {
        sc_req *r = E.active;
        E.active = r->next;
        if (E.cli)
            gorgon_cancel(E.cli, r->gid);
        fail(r, -ESHUTDOWN, "the sidecar is shutting down");
        sc_req_unref(r);
    }
    if (E.evfd >= 0)
        epoll_ctl(E.epfd, EPOLL_CTL_DEL, E.evfd, NULL);
    E.evfd = -1;
    gorgon_close(E.cli);
    E.cli = NULL;
    return NULL;
}

int sc_engine_start(const sc_engine_cfg *cfg)
{
    E.cfg = *cfg;
    E.inbox_tail = &E.inbox;
    E.waiting_tail = &E.waiting;
    E.efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (E.efd < 0)
        return -errno;
    E.epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = 0};
    if (E.epfd < 0 || epoll_ctl(E.epfd, EPOLL_CTL_ADD, E.efd, &ev) < 0) {
        int err = -errno;
        close(E.efd);
        if (E.epfd >= 0)
            close(E.epfd);
        E.efd = E.epfd = -1;
        return err;
    }
    int rc = pthread_create(&E.th, NULL, engine_main, NULL);
    if (rc) {
        close(E.efd);
        close(E.epfd);
        E.efd = E.epfd = -1;
        return -rc;
    }
    E.started = true;
    return 0;
}

void sc_engine_stop(void)
{
    if (!E.started)
        return;
    pthread_mutex_lock(&E.mu);
    E.stop = true;
    sc_req *in = E.inbox;
    E.inbox = NULL;
    E.inbox_tail = &E.inbox;
    E.n_inbox = 0;
    pthread_mutex_unlock(&E.mu);
    ring();
    pthread_join(E.th, NULL);
    while (in) {
        sc_req *r = in;
        in = r->next;
        fail(r, -ESHUTDOWN, "the sidecar is shutting down");
        sc_req_unref(r);
    }
    close(E.efd);
    close(E.epfd);
    E.efd = E.epfd = -1;
    E.started = false;
}

/* ---- the control client ------------------------------------------------------- */

static struct {
    pthread_mutex_t mu;
    const char *socket;
    gorgon_client *cli;
    sc_model model;
    bool announced;
    enum sc_chat_kind last_chat;
    char last_tmpl_head[64];
} C = {.mu = PTHREAD_MUTEX_INITIALIZER};

void sc_ctl_init(const char *socket)
{
    C.socket = socket;
}

void sc_ctl_fini(void)
{
    pthread_mutex_lock(&C.mu);
    gorgon_close(C.cli);
    C.cli = NULL;
    pthread_mutex_unlock(&C.mu);
}

/* Read the model and announce its chat template handling (once, and again
 * whenever it changes after a reconnect). C.mu held. */
static int load_model(char *why, size_t cap)
{
    gorgon_model mi;
    int rc = gorgon_model_info(C.cli, &mi);
    if (rc == -ENOTSUP) {
        C.model = (sc_model){0};
        snprintf(why, cap, "gorgond serves no model (start it with --model)");
        return rc;
    }
    if (rc < 0) {
        snprintf(why, cap, "model info: %s", gorgon_strerror(rc));
        return rc;
    }
    bool known;
    enum sc_chat_kind k = sc_chat_detect(mi.chat_template, &known);
    C.model = (sc_model){.ok = true, .n_ctx = mi.n_ctx, .n_vocab = mi.n_vocab, .bos = mi.bos,
                         .eos = mi.eos, .chat = k};
    snprintf(C.model.name, sizeof(C.model.name), "%s", mi.name);
    char head[64];
    snprintf(head, sizeof(head), "%s", mi.chat_template);
    if (!C.announced || k != C.last_chat || strcmp(head, C.last_tmpl_head)) {
        if (!*mi.chat_template)
            fprintf(stderr, "gorgon-sidecar: model '%s' has no chat template: chat requests use "
                            "the plain fallback (\"role: content\" lines, then \"assistant:\")\n",
                    mi.name);
        else if (!known)
            fprintf(stderr, "gorgon-sidecar: model '%s': chat template not recognised (it is "
                            "none of Llama 2, Llama 3, ChatML, Zephyr, Mistral, Gemma): chat "
                            "requests use the ChatML fallback\n",
                    mi.name);
        else
            fprintf(stderr, "gorgon-sidecar: model '%s': chat template %s\n", mi.name,
                    sc_chat_name(k));
        C.announced = true;
        C.last_chat = k;
        snprintf(C.last_tmpl_head, sizeof(C.last_tmpl_head), "%s", head);
    }
    return 0;
}

gorgon_client *sc_ctl_lock(char *why, size_t cap)
{
    pthread_mutex_lock(&C.mu);
    if (C.cli && (poll(&(struct pollfd){.fd = gorgon_fd(C.cli), .events = POLLRDHUP}, 1, 0) > 0)) {
        gorgon_close(C.cli); /* gorgond hung up since the last use */
        C.cli = NULL;
    }
    if (!C.cli) {
        gorgon_opts o = {.socket_path = C.socket};
        int rc = gorgon_connect(&C.cli, &o);
        if (rc < 0) {
            C.cli = NULL;
            C.model.ok = false;
            snprintf(why, cap, "gorgond is not reachable at %s: %s%s%s", gorgon_last_socket(),
                     gorgon_strerror(rc), *gorgon_last_refusal() ? ": " : "",
                     gorgon_last_refusal());
            pthread_mutex_unlock(&C.mu);
            return NULL;
        }
        char w[256];
        if (load_model(w, sizeof(w)) < 0 && C.model.ok)
            C.model.ok = false;
    }
    return C.cli;
}

void sc_ctl_unlock(bool broken)
{
    if (broken) {
        gorgon_close(C.cli);
        C.cli = NULL;
    }
    pthread_mutex_unlock(&C.mu);
}

int sc_ctl_model(sc_model *out, char *why, size_t cap)
{
    if (!sc_ctl_lock(why, cap))
        return -ECONNREFUSED;
    int rc = 0;
    if (!C.model.ok) {
        rc = load_model(why, cap);
        if (rc < 0 && rc != -ENOTSUP) {
            sc_ctl_unlock(true);
            return rc;
        }
    }
    *out = C.model;
    sc_ctl_unlock(false);
    return rc;
}
