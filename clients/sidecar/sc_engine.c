/* The serving threads, and the control client for short round trips.
 *
 * Each serving thread (sc_loop) runs one libmicrohttpd daemon (external
 * epoll mode; sc_http.c's callbacks run inside sc_http_run) and owns one
 * generating gorgon_client, its own gorgond session. A generation is
 * submitted by its HTTP callback (sc_engine_submit) on the thread's client
 * at once, and its completions are reaped by the same thread, which resumes
 * the request's connection and runs the daemon to write the event: no
 * request crosses a thread on its way to gorgond or back (an HTTP thread
 * handing requests to a separate engine thread cost two wake-ups and a
 * lock hand-off on every request's first token).
 *
 * Submitting: a request starts at once, from its access handler, unless
 * others wait ahead of it on this thread or there is no free slot (-EAGAIN,
 * for the request or for the tokenize round trip that a request without
 * max_tokens needs first): then it waits on the thread's `waiting` list,
 * which the loop submits in order as slots free up; no callback ever waits
 * for a slot. --max-queue bounds the waiting requests of all threads
 * together. A round trip (that tokenize, the control client's) holds the
 * thread's other connections while it lasts, as it held the engine thread
 * or an HTTP thread before. Cancellations (a client that went away: MHD's
 * completion callback, run by the same thread) are flagged on the request
 * and sent on the loop's next pass.
 *
 * Waiting: one epoll set per thread holds its eventfd (sc_engine_stop),
 * libgorgon's completion event fd (gorgon_event_fd, written by gorgond
 * under the NEED_WAKEUP protocol; it also wakes on gorgond's hang-up) and
 * the daemon's epoll fd. The loop runs the daemon when that fd is readable,
 * when it resumed a connection, or when a connection timeout is due;
 * submits what waits; sends cancellations; reaps with gorgon_poll until it
 * is empty; arms with gorgon_event_arm (1: more are ready, reap again) and
 * sleeps in epoll_wait: no spinning and no timeouts while idle or
 * streaming. Against an older gorgond without the event fd (-EOPNOTSUPP) it
 * reaps with gorgon_wait in SC_WAIT_NS slices while requests run, running
 * the daemon between slices (HTTP then waits at most that long), and polls
 * its eventfd, gorgond's socket and the daemon's fd when idle.
 *
 * Everything about a request happens on the thread that accepted its
 * connection; the main thread touches requests only after the serving
 * threads ended (MHD_stop_daemon's completion callbacks).
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

#include "clients/sidecar/sc_http.h"
#include "clients/sidecar/sidecar.h"
#include "common/cm_log.h"
#include "common/cm_time.h"

#define TAG "sidecar"
#define SC_WAIT_NS 200000        /* gorgon_wait slice while streams run */
#define SC_RECONNECT_NS 200000000 /* between attempts while gorgond is down */
#define SC_CQ_BATCH 64

enum { EV_STOP, EV_GORGON, EV_HTTP }; /* epoll data of a loop's fds */

/* One serving thread. Only that thread touches it, but for efd (written by
 * sc_engine_stop) and what sc_engine_start/stop set up and tear down. */
typedef struct sc_loop {
    pthread_t th;
    bool started;
    struct MHD_Daemon *mhd;
    int mhd_fd;     /* the daemon's epoll fd */
    int efd;        /* eventfd: sc_engine_stop rings it */
    int epfd;
    gorgon_client *cli;
    int evfd;       /* cli's gorgon_event_fd, -1 when gorgond has none */
    sc_req *waiting, **waiting_tail;
    sc_req *active;
    bool http_due;  /* run the daemon before sleeping (a connection was resumed) */
    uint64_t next_connect;
    char down_why[256];
} sc_loop;

static struct {
    sc_engine_cfg cfg;
    sc_loop *loops;
    unsigned n_loops;
    atomic_bool stop;
    atomic_bool legacy_wait;
} E;

/* The serving thread's own loop (NULL on other threads). */
static _Thread_local sc_loop *self;

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

const char *sc_engine_wait_kind(void)
{
    if (atomic_load(&E.legacy_wait))
        return "gorgon_wait in 200 us slices while streams run (this gorgond has no completion "
               "event fd), poll() on an eventfd, gorgond's socket and the HTTP daemon when idle";
    return "epoll on libgorgon's completion event fd (gorgon_event_fd/gorgon_event_arm), the "
           "HTTP daemon's epoll fd and an eventfd, in each serving thread";
}

/* ---- serving-thread helpers ------------------------------------------------ */

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

/* Resume c (from sc_http_wake_locked, r->mu released) and have the loop
 * run the daemon before it sleeps. */
static void resume(struct MHD_Connection *c)
{
    if (!c)
        return;
    sc_http_resume(c);
    if (self)
        self->http_due = true;
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
    struct MHD_Connection *c = sc_http_wake_locked(r);
    pthread_mutex_unlock(&r->mu);
    resume(c);
}

static void unlink_active(sc_loop *L, sc_req *r)
{
    for (sc_req **p = &L->active; *p; p = &(*p)->next)
        if (*p == r) {
            *p = r->next;
            return;
        }
}

static void drop_client(sc_loop *L, const char *why)
{
    snprintf(L->down_why, sizeof(L->down_why), "%s", why);
    CM_LOG_WARN(TAG, "lost gorgond: %s", why);
    while (L->active) {
        sc_req *r = L->active;
        L->active = r->next;
        fail(r, -EPIPE, "gorgond went away (%s)", why);
        atomic_fetch_sub(&sc_running, 1);
        sc_req_unref(r);
    }
    if (L->evfd >= 0)
        epoll_ctl(L->epfd, EPOLL_CTL_DEL, L->evfd, NULL);
    L->evfd = -1;
    gorgon_close(L->cli);
    L->cli = NULL;
    L->next_connect = cm_now_ns() + SC_RECONNECT_NS;
}

static void try_connect(sc_loop *L)
{
    uint64_t now = cm_now_ns();
    if (now < L->next_connect)
        return;
    gorgon_opts o = {.socket_path = E.cfg.socket};
    int rc = gorgon_connect(&L->cli, &o);
    if (rc < 0) {
        L->cli = NULL;
        snprintf(L->down_why, sizeof(L->down_why), "%s: %s%s%s", gorgon_last_socket(),
                 gorgon_strerror(rc), *gorgon_last_refusal() ? ": " : "", gorgon_last_refusal());
        L->next_connect = now + SC_RECONNECT_NS;
        return;
    }
    CM_LOG_INFO(TAG, "connected to gorgond (%s, session %u)", gorgon_last_socket(),
                gorgon_session_id(L->cli));
    rc = gorgon_event_fd(L->cli);
    if (rc >= 0) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = EV_GORGON};
        if (epoll_ctl(L->epfd, EPOLL_CTL_ADD, rc, &ev) == 0) {
            L->evfd = rc;
            atomic_store(&E.legacy_wait, false);
            return;
        }
        rc = -errno;
    }
    if (rc == -EPIPE) {
        drop_client(L, "event fd: gorgond went away");
        return;
    }
    L->evfd = -1;
    if (!atomic_exchange(&E.legacy_wait, true))
        CM_LOG_WARN(TAG, "no completion event fd (%s): waiting with gorgon_wait slices",
                    gorgon_strerror(rc));
}

/* Fill in what the request needs from the model: max_tokens when the
 * client gave none (the rest of the context): a tokenize round trip on L's
 * client. 0, 1 to retry later (no free slot for it), or < 0 after failing r. */
static int prepare(sc_loop *L, sc_req *r)
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
        int rc = gorgon_tokenize(L->cli, r->prompt, r->prompt_len,
                                 m.bos >= 0 ? GORGON_TOK_ADD_BOS : 0, ids, (size_t)m.n_ctx + 1);
        free(ids);
        if (rc == -EAGAIN)
            return 1;
        if (rc == -ENOSPC)
            n = (int64_t)m.n_ctx + 1;
        else if (rc < 0) {
            fail(r, rc, "cannot tokenize the prompt: %s%s%s", gorgon_strerror(rc),
                 *gorgon_last_error(L->cli) ? ": " : "", gorgon_last_error(L->cli));
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

/* Start r, which holds the engine's reference, on L's client: 0 when
 * gorgond has it (r joins `active`), 1 when it has to wait (no free slot,
 * or the client just went away: r->next untouched), -1 when it ended (r is
 * done with its reason, and the engine's reference is dropped). */
static int start(sc_loop *L, sc_req *r)
{
    pthread_mutex_lock(&r->mu);
    bool gone = r->gone;
    pthread_mutex_unlock(&r->mu);
    int rc;
    if (gone) {
        fail(r, -ECANCELED, "the client went away before the request started");
        sc_metrics_cancelled();
        goto ended;
    }
    if ((rc = prepare(L, r)) == 1)
        return 1;
    if (rc < 0)
        goto ended;
    rc = gorgon_generate_submit(L->cli, &r->gp, (uint64_t)(uintptr_t)r, &r->gid);
    if (rc == -EAGAIN)
        return 1; /* every slot busy: stays first in line */
    if (rc == -EPIPE) {
        drop_client(L, "submit: gorgond went away");
        return 1;
    }
    if (rc < 0) {
        fail(r, rc, "%s", gorgon_strerror(rc));
        goto ended;
    }
    pthread_mutex_lock(&r->mu);
    r->state = SC_REQ_RUNNING;
    pthread_mutex_unlock(&r->mu);
    r->next = L->active;
    L->active = r;
    atomic_fetch_add(&sc_running, 1);
    return 0;
ended:
    sc_req_unref(r);
    return -1;
}

int sc_engine_submit(sc_req *r)
{
    sc_loop *L = self;
    if (!L || atomic_load(&E.stop))
        return -ESHUTDOWN;
    if (atomic_load(&sc_queued) >= E.cfg.max_queue)
        return -EAGAIN;
    sc_req_ref(r); /* the engine's, until the final chunk */
    if (!L->waiting && L->cli && start(L, r) != 1)
        return 0; /* gorgond has it, or it ended with its reason */
    r->next = NULL;
    *L->waiting_tail = r;
    L->waiting_tail = &r->next;
    atomic_fetch_add(&sc_queued, 1);
    return 0;
}

void sc_engine_cancel(sc_req *r)
{
    /* Called by MHD's completion callback: on the request's serving thread,
     * inside sc_http_run, after which the loop goes round (submit_waiting,
     * send_cancels) before it sleeps; or after the threads ended. */
    pthread_mutex_lock(&r->mu);
    r->gone = true;
    pthread_mutex_unlock(&r->mu);
}

/* Submit waiting requests in order while gorgond takes them. */
static void submit_waiting(sc_loop *L)
{
    while (L->waiting && L->cli) {
        sc_req *r = L->waiting, *next = r->next;
        if (start(L, r) == 1)
            return;
        L->waiting = next;
        if (!next)
            L->waiting_tail = &L->waiting;
        atomic_fetch_sub(&sc_queued, 1);
    }
}

static void send_cancels(sc_loop *L)
{
    for (sc_req *r = L->active; r && L->cli; r = r->next) {
        if (r->cancel_sent)
            continue;
        pthread_mutex_lock(&r->mu);
        bool gone = r->gone;
        pthread_mutex_unlock(&r->mu);
        if (!gone)
            continue;
        int rc = gorgon_cancel(L->cli, r->gid);
        if (rc == -EAGAIN)
            return; /* SQ full: try again on the next pass */
        r->cancel_sent = true;
        if (rc == -EPIPE) {
            drop_client(L, "cancel: gorgond went away");
            return;
        }
    }
}

static void on_completion(sc_loop *L, const gorgon_completion *c)
{
    if (c->opcode != GORGON_OP_GENERATE)
        return;
    sc_req *r = (sc_req *)(uintptr_t)c->user_data;
    gorgon_gen_chunk ch;
    gorgon_generate_chunk_of(L->cli, c, &ch);
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
    struct MHD_Connection *conn = sc_http_wake_locked(r);
    pthread_mutex_unlock(&r->mu);
    resume(conn);
    if (ch.done) {
        unlink_active(L, r);
        atomic_fetch_sub(&sc_running, 1);
        sc_req_unref(r);
    }
}

/* Handle completions; the count, or < 0 once the client was dropped. */
static int handle(sc_loop *L, const gorgon_completion *cq, int n, const char *what)
{
    if (n == -EPIPE || n == -EPROTO) {
        drop_client(L, what);
        return -1;
    }
    for (int i = 0; i < n; i++)
        on_completion(L, &cq[i]);
    return n;
}

static void drain_efd(sc_loop *L)
{
    uint64_t v;
    ssize_t n = read(L->efd, &v, sizeof(v));
    (void)n;
}

/* Sleep until the eventfd, the completion event fd or the daemon's fd is
 * readable, or the daemon's next connection timeout. */
static void sleep_loop(sc_loop *L)
{
    struct epoll_event ev[3];
    int k = epoll_wait(L->epfd, ev, 3, sc_http_timeout_ms(L->mhd));
    if (k == 0)
        L->http_due = true; /* a connection timeout is due */
    for (int i = 0; i < k; i++) {
        if (ev[i].data.u32 == EV_STOP)
            drain_efd(L);
        else if (ev[i].data.u32 == EV_HTTP)
            L->http_due = true;
        /* EV_GORGON: the next gorgon_poll reaps (and the next arm empties it) */
    }
}

/* Without an event fd, idle: the eventfd, gorgond's hang-up, the daemon. */
static void sleep_legacy(sc_loop *L)
{
    struct pollfd pf[3] = {{.fd = L->efd, .events = POLLIN},
                           {.fd = gorgon_fd(L->cli), .events = POLLRDHUP},
                           {.fd = L->mhd_fd, .events = POLLIN}};
    int k = poll(pf, 3, sc_http_timeout_ms(L->mhd));
    if (k == 0 || pf[2].revents)
        L->http_due = true;
    if (k > 0 && pf[0].revents)
        drain_efd(L);
    if (k > 0 && (pf[1].revents & (POLLHUP | POLLRDHUP | POLLERR)))
        drop_client(L, "gorgond closed the connection");
}

static void *loop_main(void *arg)
{
    sc_loop *L = arg;
    self = L;
    gorgon_completion cq[SC_CQ_BATCH];
    L->http_due = true;
    for (;;) {
        if (atomic_load(&E.stop))
            break;
        if (L->http_due) {
            L->http_due = false;
            sc_http_run(L->mhd); /* new requests, resumed connections, cancellations */
            /* more to do at once (an event formatted after the header went
             * out is written on the next run): run again before sleeping */
            L->http_due = sc_http_timeout_ms(L->mhd) == 0;
        }
        if (!L->cli)
            try_connect(L);
        if (!L->cli) {
            /* nobody to run them: refuse what waits rather than hang */
            while (L->waiting) {
                sc_req *r = L->waiting;
                L->waiting = r->next;
                atomic_fetch_sub(&sc_queued, 1);
                fail(r, -ECONNREFUSED, "gorgond is not reachable (%s)", L->down_why);
                sc_req_unref(r);
            }
            L->waiting_tail = &L->waiting;
            if (!L->http_due)
                sleep_loop(L);
            continue;
        }
        submit_waiting(L);
        send_cancels(L);
        if (!L->cli)
            continue;
        int n = handle(L, cq, gorgon_poll(L->cli, cq, SC_CQ_BATCH), "poll: gorgond went away");
        if (n != 0 || L->http_due)
            continue; /* more may be ready, slots may have freed up, events to write */
        if (L->evfd >= 0) {
            int armed = gorgon_event_arm(L->cli);
            if (armed == 1) {
                /* completions arrived meanwhile: reap them, and look at the
                 * daemon too, which only sleeping would otherwise notice */
                L->http_due = true;
                continue;
            }
            if (armed < 0) {
                drop_client(L, "arm: gorgond went away");
                continue;
            }
            sleep_loop(L);
        } else if (gorgon_inflight(L->cli) == 0) {
            sleep_legacy(L);
        } else {
            drain_efd(L); /* the loop looks at the stop flag each slice anyway */
            handle(L, cq, gorgon_wait(L->cli, cq, SC_CQ_BATCH, SC_WAIT_NS),
                   "wait: gorgond went away");
            L->http_due = true;
        }
    }
    /* shutting down: fail everything still held, and let the daemon write
     * what it can of the answers before the main thread stops it */
    while (L->waiting) {
        sc_req *r = L->waiting;
        L->waiting = r->next;
        atomic_fetch_sub(&sc_queued, 1);
        fail(r, -ESHUTDOWN, "the sidecar is shutting down");
        sc_req_unref(r);
    }
    L->waiting_tail = &L->waiting;
    while (L->active) {
        sc_req *r = L->active;
        L->active = r->next;
        if (L->cli)
            gorgon_cancel(L->cli, r->gid);
        fail(r, -ESHUTDOWN, "the sidecar is shutting down");
        atomic_fetch_sub(&sc_running, 1);
        sc_req_unref(r);
    }
    /* a few runs, none waiting: an event is formatted in one and written
     * in the next */
    for (int i = 0; i < 4; i++) {
        sc_http_run(L->mhd);
        if (sc_http_timeout_ms(L->mhd) != 0)
            break;
    }
    if (L->evfd >= 0)
        epoll_ctl(L->epfd, EPOLL_CTL_DEL, L->evfd, NULL);
    L->evfd = -1;
    gorgon_close(L->cli);
    L->cli = NULL;
    self = NULL;
    return NULL;
}

static void loop_fini(sc_loop *L)
{
    if (L->efd >= 0)
        close(L->efd);
    if (L->epfd >= 0)
        close(L->epfd);
    L->efd = L->epfd = -1;
}

static int loop_init(sc_loop *L, struct MHD_Daemon *d)
{
    *L = (sc_loop){.mhd = d, .mhd_fd = sc_http_fd(d), .efd = -1, .epfd = -1, .evfd = -1};
    L->waiting_tail = &L->waiting;
    L->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    L->epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event es = {.events = EPOLLIN, .data.u32 = EV_STOP};
    struct epoll_event eh = {.events = EPOLLIN, .data.u32 = EV_HTTP};
    if (L->efd < 0 || L->epfd < 0 || L->mhd_fd < 0 ||
        epoll_ctl(L->epfd, EPOLL_CTL_ADD, L->efd, &es) < 0 ||
        epoll_ctl(L->epfd, EPOLL_CTL_ADD, L->mhd_fd, &eh) < 0) {
        int err = L->mhd_fd < 0 ? -EINVAL : -errno;
        loop_fini(L);
        return err;
    }
    return 0;
}

int sc_engine_start(const sc_engine_cfg *cfg)
{
    E.cfg = *cfg;
    atomic_store(&E.stop, false);
    E.loops = calloc(cfg->n_daemons, sizeof(*E.loops));
    if (!E.loops)
        return -ENOMEM;
    E.n_loops = 0;
    int rc = 0;
    for (unsigned i = 0; i < cfg->n_daemons && rc == 0; i++) {
        sc_loop *L = &E.loops[i];
        if ((rc = loop_init(L, cfg->daemons[i])) < 0)
            break;
        E.n_loops++;
        rc = -pthread_create(&L->th, NULL, loop_main, L);
        L->started = rc == 0;
    }
    if (rc < 0)
        sc_engine_stop();
    return rc;
}

void sc_engine_stop(void)
{
    if (!E.loops)
        return;
    atomic_store(&E.stop, true);
    for (unsigned i = 0; i < E.n_loops; i++) {
        uint64_t one = 1;
        ssize_t n = write(E.loops[i].efd, &one, sizeof(one));
        (void)n; /* EAGAIN: the counter is already non-zero, the loop will look */
    }
    for (unsigned i = 0; i < E.n_loops; i++) {
        if (E.loops[i].started)
            pthread_join(E.loops[i].th, NULL);
        loop_fini(&E.loops[i]);
    }
    free(E.loops);
    E.loops = NULL;
    E.n_loops = 0;
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
