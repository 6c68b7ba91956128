/* gorgon.h — libgorgon, the client side of gorgon's shared-memory transport.
 *
 * An application connects to gorgond over its control socket once; gorgond
 * hands back a private shared-memory region with a submission ring (SQ), a
 * completion ring (CQ) and request slots. Requests and completions then move
 * through memory only: no syscall while both sides are awake, a futex wake
 * only when the other side sleeps (the NEED_WAKEUP protocol).
 *
 * Conventions: every function returns 0 or a count on success and -errno on
 * failure; errno is left as it was (never the error channel). Handles are
 * opaque. -EPIPE means gorgond went away: close the client and connect again.
 *
 * Threading: a gorgon_client is used by one thread at a time (no internal
 * locks: serialise externally if you share it). Different clients are
 * independent; a process may hold several, one per thread for best latency.
 * gorgon_last_socket()/gorgon_last_refusal() are thread-local.
 *
 * Example, complete (tests/clients/test_install.c extracts the lines between
 * the markers, builds them against an installed libgorgon with pkg-config
 * and runs them):
 *
 * [example]
 *   #include <gorgon.h>
 *   #include <stdio.h>
 *
 *   int main(void)
 *   {
 *       gorgon_client *cli;
 *       int rc = gorgon_connect(&cli, NULL);    // $GORGON_SOCKET or /run/gorgon/gorgon.sock
 *       if (rc < 0) {
 *           fprintf(stderr, "%s %s\n", gorgon_strerror(rc), gorgon_last_refusal());
 *           return 1;
 *       }
 *       uint64_t rtt;
 *       rc = gorgon_ping(cli, "hello", 5, 1000000000, &rtt);    // 5 (bytes echoed)
 *
 *       // asynchronous: submit, then reap
 *       gorgon_submit_ping(cli, "abc", 3, 42);    // user_data 42
 *       gorgon_completion c[16];
 *       int n = gorgon_wait(cli, c, 16, 1000000000);
 *       for (int i = 0; i < n; i++) {
 *           size_t len;
 *           const void *out = gorgon_cqe_output(&c[i], &len);    // valid until the next poll/wait
 *           fprintf(stderr, "request %llu: %d, %zu bytes at %p\n",
 *                   (unsigned long long)gorgon_cqe_user_data(&c[i]), gorgon_cqe_result(&c[i]),
 *                   len, out);
 *       }
 *
 *       // generation: text chunks, then a final chunk with the finish reason and usage
 *       gorgon_gen_params gp = {.prompt = "Once upon a time", .max_tokens = 64};    // greedy
 *       uint32_t req;
 *       if ((rc = gorgon_generate_submit(cli, &gp, 7, &req)) == 0) {
 *           gorgon_gen_chunk ch;
 *           while ((rc = gorgon_generate_next(cli, req, &ch, -1)) == 1)
 *               fwrite(ch.text, 1, ch.len, stdout);    // valid until the next call
 *           // rc == 0: finished (ch.finish, ch.usage; the final chunk has no text)
 *           // rc < 0: failed, and ch.text holds gorgond's message
 *           if (rc < 0)
 *               fprintf(stderr, "failed: %.*s\n", (int)ch.len, ch.text);
 *       }
 *       gorgon_close(cli);
 *       return rc < 0;
 *   }
 * [/example]
 *
 * Build: cc app.c $(pkg-config --cflags --libs gorgon) links libgorgon.so;
 * cc app.c $(pkg-config --cflags --libs gorgon-static) links libgorgon.a
 * (self-contained, plus -luring -lnuma -lm). Not `pkg-config --static
 * gorgon`: beside libgorgon.so in the same directory the linker would still
 * pick the shared library.
 */
#ifndef GORGON_H
#define GORGON_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct gorgon_client gorgon_client;

/* gorgon_opts.flags */
#define GORGON_BUSY_POLL 1u /* gorgon_wait never sleeps: spins for the whole timeout
                             * (lowest latency, burns a core) */
#define GORGON_NO_SPIN 2u   /* gorgon_wait sleeps at once (no spin phase) */

typedef struct gorgon_opts {
    const char *socket_path; /* NULL: $GORGON_SOCKET, else /run/gorgon/gorgon.sock */
    uint32_t flags;          /* GORGON_* */
    int64_t spin_ns;         /* gorgon_wait spin phase before sleeping; 0: default, 50 us
                              * but only while this process's spinning threads,
                              * gorgond and a worker thread each have a CPU of their
                              * own (affinity and cgroup quota counted); else none */
} gorgon_opts;

/* Connect and map the session region. opts may be NULL. Errors:
 * -ENOENT / -ECONNREFUSED (no gorgond on that socket), -EACCES (not in the
 * allow-list), -EUSERS (gorgond full), -EPROTONOSUPPORT (ABI mismatch).
 * gorgon_last_refusal() gives gorgond's reason text for a refusal. */
int gorgon_connect(gorgon_client **out, const gorgon_opts *opts);
/* Unmap and hang up (gorgond reclaims the session). NULL is a no-op. */
void gorgon_close(gorgon_client *cli);
/* The socket path the last gorgon_connect in this thread used, and the
 * reason text of its refusal ("" if none). Thread-local, static storage. */
const char *gorgon_last_socket(void);
const char *gorgon_last_refusal(void);
/* strerror-like text for a -errno from this library (never NULL). */
const char *gorgon_strerror(int err);

/* ---- slots: the request's input and output buffers ------------------- */

/* Take a free slot for a request: slot index (>= 0) or -EAGAIN (all busy). */
int gorgon_slot_acquire(gorgon_client *cli);
/* Give a slot back once its last completion was handled. */
int gorgon_slot_release(gorgon_client *cli, uint32_t slot);
/* A slot's input buffer (write the payload here) and output buffer (the
 * server writes here); *cap receives the capacity. NULL for a bad slot. */
void *gorgon_slot_input(gorgon_client *cli, uint32_t slot, size_t *cap);
const void *gorgon_slot_output(gorgon_client *cli, uint32_t slot, size_t *cap);

/* ---- submitting --------------------------------------------------------- */

enum gorgon_op {
    GORGON_OP_NOP = 0,
    GORGON_OP_PING = 1,  /* echo the slot's input into its output */
    GORGON_OP_GENERATE = 2, /* see gorgon_generate_submit */
    GORGON_OP_CANCEL = 3,   /* see gorgon_cancel */
    GORGON_OP_STATS = 4, /* write gorgond's counters into the output */
};

typedef struct gorgon_request {
    uint32_t opcode;    /* enum gorgon_op */
    uint32_t slot;      /* from gorgon_slot_acquire (ignored for NOP) */
    uint32_t in_len;    /* payload bytes at the start of the slot's input */
    uint64_t user_data; /* echoed in the completion */
} gorgon_request;

/* Push one request on a slot the caller acquired. 0, -EAGAIN (SQ full:
 * reap completions and retry), -EINVAL (bad slot/length), -EPIPE. */
int gorgon_submit(gorgon_client *cli, const gorgon_request *req);
/* Push up to n requests with one publish and at most one wake-up: the
 * count pushed (0 when the SQ is full), or -EINVAL / -EPIPE. */
int gorgon_submit_burst(gorgon_client *cli, const gorgon_request *reqs, uint32_t n);
/* Conveniences that manage the slot: it is taken here and released by the
 * gorgon_poll/gorgon_wait call after the one that returned its completion
 * (so the completion's output stays readable until then).
 * 0, -EAGAIN (no free slot or SQ full), -EMSGSIZE (len > slot), -EPIPE. */
int gorgon_submit_ping(gorgon_client *cli, const void *payload, size_t len, uint64_t user_data);
int gorgon_submit_nop(gorgon_client *cli, uint64_t user_data);

/* ---- completions --------------------------------------------------------- */

typedef struct gorgon_completion {
    uint64_t user_data;
    int32_t result;      /* >= 0 success (PING: bytes echoed), < 0 -errno */
    uint32_t opcode;
    uint32_t slot;
    uint32_t flags;      /* GORGON_CQE_F_MORE: more completions follow */
    const void *out;     /* new output bytes in the slot (NULL if none) */
    size_t out_len;
    uint64_t arg[4];     /* opcode-specific (GENERATE final: finish, usage, timings) */
} gorgon_completion;

#define GORGON_CQE_F_MORE 1u

static inline int32_t gorgon_cqe_result(const gorgon_completion *c) { return c->result; }
static inline uint64_t gorgon_cqe_user_data(const gorgon_completion *c) { return c->user_data; }
static inline const void *gorgon_cqe_output(const gorgon_completion *c, size_t *len)
{
    if (len)
        *len = c->out_len;
    return c->out;
}

/* Reap up to max completions without blocking: the count (0 if none), or
 * -EPROTO (gorgond's CQ indices are impossible) / -EPIPE. */
int gorgon_poll(gorgon_client *cli, gorgon_completion *out, uint32_t max);
/* Like gorgon_poll but waits up to timeout_ns (< 0: forever) for at least
 * one: spins for spin_ns, then sleeps on the CQ doorbell. Wakes up within
 * ~50 ms when gorgond dies (-EPIPE), never hangs. 0 on timeout. */
int gorgon_wait(gorgon_client *cli, gorgon_completion *out, uint32_t max, int64_t timeout_ns);

/* ---- synchronous conveniences ------------------------------------------
 * They work at any time, generations streaming included: completions of
 * other requests that arrive meanwhile are kept for gorgon_poll /
 * gorgon_wait / gorgon_generate_next, in order. Not thread-safe per client
 * (like every call here): one thread uses a client at a time. */

typedef struct gorgon_counters {
    uint64_t clients_now;
    uint64_t clients_total;
    uint64_t sessions_reclaimed;
    uint64_t requests_total;
    uint64_t protocol_errors;
    uint64_t loop_wakeups;
    /* generation (0 without a model) */
    uint64_t gen_queued, gen_running;   /* in the worker: waiting for KV / running */
    uint64_t gen_tokens_total;
    double gen_tokens_per_s;            /* over the last full second */
    uint64_t kv_blocks_used, kv_blocks_total;
    uint64_t decode_batch_max;          /* most sequences in one forward pass */
    uint64_t gen_requests_total, gen_failed, worker_restarts;
    /* Medusa (0 without heads): sequence-steps decoded with it, candidate
     * tokens they accepted (acceptance: tokens per step = 1 + accepted /
     * steps), and the decode batch up to which it currently pays (measured
     * by the worker; larger batches decode plainly). */
    uint64_t medusa_steps, medusa_accepted, medusa_max_batch;
    /* Admission and health: requests gorgond holds before the worker
     * (fair-share queue), connections mid-handshake and those dropped
     * (never said hello in time, or evicted by the pending limits), hung
     * workers killed by the watchdog, and the longest worker step seen
     * while requests waited on it (what worker_timeout_ms must exceed). */
    uint64_t gen_waiting, handshakes_pending, handshakes_dropped, watchdog_kills;
    uint64_t step_max_us;
    /* Generations that ended cancelled (gorgon_cancel, their client gone,
     * gorgond shutting down); gen_failed counts those that ended in error. */
    uint64_t gen_cancelled;
    /* mode = disaggregated: requests handed off by a prefill group that no
     * decode group has adopted yet (waiting for KV room), and hand-offs */
    uint64_t gen_handoff_waiting, gen_handoffs_total;
} gorgon_counters;

/* Round trip of one PING. Returns the bytes echoed (checked byte for byte:
 * -EIO on a mismatch), -ETIMEDOUT, -EAGAIN (every slot busy), or an error
 * from submit/wait. *rtt_ns (may be NULL) gets the round-trip time. */
int gorgon_ping(gorgon_client *cli, const void *payload, size_t len, int64_t timeout_ns,
                uint64_t *rtt_ns);
/* gorgond's counters (IPC_OP_STATS round trip, 1 s timeout). */
int gorgon_stats(gorgon_client *cli, gorgon_counters *st);

#define GORGON_GROUP_MAX_RANKS 64
enum gorgon_group_state {
    GORGON_GROUP_STARTING = 0,   /* its ranks are loading the model */
    GORGON_GROUP_READY = 1,      /* serving */
    GORGON_GROUP_RESTARTING = 2, /* no process (a restart failed, or gorgond is stopping) */
    GORGON_GROUP_FAILED = 3,     /* given up: it died before loading the model, repeatedly */
};

enum gorgon_group_role {
    GORGON_GROUP_COLOCATED = 0, /* runs prompts and decodes them */
    GORGON_GROUP_PREFILL = 1,   /* mode = disaggregated: runs prompts, hands the KV off */
    GORGON_GROUP_DECODE = 2,    /* mode = disaggregated: decodes handed-off requests */
};

/* One worker group of gorgond (`replicas` of them, or prefill and decode
 * groups; `tp` ranks each). */
typedef struct gorgon_group {
    uint32_t group;             /* 0 .. replicas-1 */
    uint32_t n_ranks;           /* tp */
    enum gorgon_group_state state;
    uint32_t in_worker;         /* requests it holds (sent to it, not done) */
    uint64_t waiting;           /* requests waiting in gorgond, headed for it */
    uint64_t queued, running;   /* its scheduler's last report */
    uint64_t kv_blocks_used, kv_blocks_total;
    uint64_t tokens_total, requests_total, restarts, watchdog_kills;
    uint64_t decode_batch_max, step_max_us, medusa_max_batch;
    int32_t pid[GORGON_GROUP_MAX_RANKS]; /* pid of rank r (r < n_ranks); 0: not running */
    enum gorgon_group_role role;
    uint32_t handoff_waiting; /* decode group: requests handed to it, not adopted yet */
    uint64_t handoffs_total;  /* prefill: requests handed off; decode: adopted */
} gorgon_group;

/* gorgond's worker groups, one row each (the IPC_OP_STATS round trip, 1 s
 * timeout): fills out[0 .. min(n, cap)) and returns n, the rows gorgond
 * sent: one per group (0 when it has no model), fewer only when its
 * slot_out_bytes cannot hold them (256 bytes + 384 per group); -errno.
 * out may be NULL when cap is 0. */
int gorgon_groups(gorgon_client *cli, gorgon_group *out, size_t cap);

/* gorgond's message for the last round trip of this client that failed
 * (e.g. "id 3: 99999 is not in [0, 512)"), "" when it sent none. */
const char *gorgon_last_error(const gorgon_client *cli);

/* ---- the model -------------------------------------------------------------------- */

typedef struct gorgon_model {
    char name[128];            /* general.name, else the file name without .gguf */
    uint32_t n_ctx;            /* context length (prompt + new tokens) */
    uint32_t n_vocab;
    int32_t bos, eos;          /* -1 when the model has none */
    const char *chat_template; /* tokenizer.chat_template, "" if none; owned by the
                                * client, valid until the next call or gorgon_close */
} gorgon_model;

/* What gorgond serves. 0, -ENOTSUP (gorgond has no model) or -errno. */
int gorgon_model_info(gorgon_client *cli, gorgon_model *out);

#define GORGON_TOK_ADD_BOS 1u /* prepend BOS, as a prompt gets it */

/* Token ids of text (gorgond's tokenizer, the one prompts go through): the
 * count, -ENOSPC when there are more than cap (or than one slot's output
 * holds), -ENOTSUP without a model, -errno. */
int gorgon_tokenize(gorgon_client *cli, const char *text, size_t len, uint32_t flags,
                    int32_t *ids, size_t cap);
/* Text of ids (a leading BOS is dropped, as in generation output): bytes
 * written, NUL-terminated when there is room; -ENOSPC, -EINVAL (an id out of
 * range: gorgon_last_error says which), -ENOTSUP, -errno. */
int gorgon_detokenize(gorgon_client *cli, const int32_t *ids, size_t n, char *out, size_t cap);

/* ---- generation ------------------------------------------------------------------
 *
 * A GENERATE request runs on a slot (taken by gorgon_generate_submit,
 * released after its final chunk was returned): gorgond streams text into
 * the slot's output ring and completions (IPC_CQE_F_MORE) into the CQ.
 * Either iterate with gorgon_generate_next (blocking, per request; other
 * requests' completions it meets are kept for them and for gorgon_poll), or
 * reap with gorgon_poll/gorgon_wait (opcode GORGON_OP_GENERATE: out/out_len
 * are text bytes, flags GORGON_CQE_F_MORE until the final one, whose arg[]
 * is decoded by gorgon_generate_chunk_of). Output bytes stay valid until the
 * next poll/wait/next call on the client, which then hands them back to
 * gorgond (flow control: gorgond pauses a stream whose client stops
 * reading). */

#define GORGON_GEN_PROMPT_IDS 1u /* prompt_ids/n_ids instead of prompt text */
#define GORGON_GEN_WANT_IDS 2u   /* stream token ids (chunk.ids) instead of text */
#define GORGON_GEN_NO_MEDUSA 4u  /* decode plainly even when gorgond has Medusa heads
                                  * (by default greedy requests speculate) */
#define GORGON_GEN_MAX_STOP 8

typedef struct gorgon_gen_params {
    const char *prompt;        /* text (gorgond adds BOS as the model says) */
    size_t prompt_len;         /* 0: strlen(prompt) */
    const int32_t *prompt_ids; /* with GORGON_GEN_PROMPT_IDS (BOS included by you) */
    size_t n_ids;
    int32_t max_tokens;        /* tokens to generate: >= 1 (0 is an error) */
    float temperature;         /* 0: greedy */
    int32_t top_k;             /* 0: off */
    float top_p;               /* in (0, 1]; 0 or 1: off */
    float min_p;               /* 0: off */
    float repeat_penalty;      /* 0 or 1: off */
    uint64_t seed;             /* 0: a random one for a sampled request (each run
                                * differs); usage.seed says which, to reproduce it */
    const char *const *stop;   /* up to GORGON_GEN_MAX_STOP strings, 1..63 bytes */
    int n_stop;
    uint32_t flags;            /* GORGON_GEN_* */
} gorgon_gen_params;

enum gorgon_finish {
    GORGON_FINISH_NONE = 0,
    GORGON_FINISH_EOS = 1,
    GORGON_FINISH_STOP = 2,
    GORGON_FINISH_LENGTH = 3,
    GORGON_FINISH_CANCELLED = 4,
    GORGON_FINISH_ERROR = 5,
};
const char *gorgon_finish_name(int finish);

typedef struct gorgon_gen_usage {
    uint32_t prompt_tokens, completion_tokens;
    uint64_t ttft_ns;  /* submission seen by gorgond -> first token */
    uint64_t total_ns; /* submission seen by gorgond -> final completion */
    /* Medusa: steps that decoded this request and the candidate tokens they
     * accepted (tokens per step = 1 + accepted / steps); 0 when plain. */
    uint32_t medusa_steps, medusa_accepted;
    /* The sampling seed the request ran with: the caller's, or the random
     * one drawn for a sampled request without one. Pass it back as
     * gorgon_gen_params.seed to reproduce the text. 0 for greedy requests
     * without a seed. */
    uint64_t seed;
} gorgon_gen_usage;

typedef struct gorgon_gen_chunk {
    const char *text;     /* text bytes (or gorgond's error message when it failed) */
    size_t len;
    const int32_t *ids;   /* GORGON_GEN_WANT_IDS: token ids, else NULL */
    size_t n_ids;
    int done;             /* 1 on the final chunk */
    int finish;           /* enum gorgon_finish (final chunk) */
    int32_t error;        /* final: 0 or -errno */
    gorgon_gen_usage usage; /* final chunk */
} gorgon_gen_chunk;

/* Start a generation. *req, an opaque handle (the slot and how many
 * generations that slot has run), names it for gorgon_generate_next and
 * gorgon_cancel; a handle kept after its request ended is refused, never
 * taken for a newer request on the same slot. Completions reaped with
 * gorgon_poll carry the slot, not the handle: match them by user_data. 0, -EINVAL (bad params: gorgon_last_error names the
 * field, with the same message gorgond would give), -EMSGSIZE (a prompt
 * longer than the model's context could ever hold), -EAGAIN (no free slot or
 * SQ full), -ETIMEDOUT, -EPIPE. A prompt larger than a slot's input is sent
 * ahead in slot-sized pieces (one round trip each) before the request; any
 * prompt that fits the context is accepted. Errors that need the model (top_k
 * beyond the vocabulary, prompt + max_tokens over the context) come back from
 * gorgond as the request's final chunk. */
int gorgon_generate_submit(gorgon_client *cli, const gorgon_gen_params *p, uint64_t user_data,
                           uint32_t *req);
/* Next piece of req's stream, waiting up to timeout_ns (< 0: forever):
 * 1 a chunk (more follow), 0 the final chunk of a successful request (no
 * text: every byte came in the chunks before it; finish and usage filled;
 * req is released), < 0 the
 * request failed (final chunk: error, finish, message in text; released),
 * -ETIMEDOUT (nothing yet; chunk->done == 0, req still running), or a
 * transport error (-EPIPE). */
int gorgon_generate_next(gorgon_client *cli, uint32_t req, gorgon_gen_chunk *chunk,
                         int64_t timeout_ns);
/* Ask gorgond to stop req: its stream then ends with -ECANCELED
 * (GORGON_FINISH_CANCELLED); the worker frees its KV at its next step.
 * 0, -ENOENT (not a running generation of this client: finished, stale or
 * never issued; gorgon_last_error says which handle), -EAGAIN, -EPIPE. */
int gorgon_cancel(gorgon_client *cli, uint32_t req);
/* Decode a GENERATE completion reaped by gorgon_poll/gorgon_wait into a
 * chunk (before the next poll/wait). Completions of gorgon_cancel's own
 * CANCEL requests are consumed inside the library, never returned. */
void gorgon_generate_chunk_of(gorgon_client *cli, const gorgon_completion *c,
                              gorgon_gen_chunk *chunk);

/* ---- integration with an event loop ---------------------------------------- */

/* The control socket: POLLHUP/POLLRDHUP on it means gorgond is gone. */
int gorgon_fd(const gorgon_client *cli);
/* A file descriptor for event loops (epoll, poll, select, asyncio's
 * add_reader, libuv, tokio's AsyncFd): it becomes readable when completions
 * may be waiting, once armed with gorgon_event_arm, and when gorgond goes
 * away. The first call asks gorgond for it (one round trip, up to 1 s); later
 * calls return the same fd. The client owns it (gorgon_close closes it):
 * only wait on it, never read or close it. Returns the fd, -EOPNOTSUPP (an
 * older gorgond), -ETIMEDOUT, -EPIPE. Once a client has it, gorgond wakes
 * that client through it: gorgon_wait and gorgon_generate_next keep working
 * (they sleep on it too), but a futex waiter of gorgon_wait_prepare is no
 * longer woken (it still sees the doorbell move at its timeout).
 *
 *     int fd = gorgon_event_fd(cli);   // add to epoll / loop.add_reader
 *     on readable (and once at the start):
 *         do {
 *             // reap without waiting: gorgon_poll(cli, out, n) until 0, or
 *             // gorgon_generate_next(cli, req, &ch, 0) per stream until
 *             // -ETIMEDOUT (or its final chunk)
 *         } while ((rc = gorgon_event_arm(cli)) == 1);
 *         // rc 0: wait for the fd again; rc < 0: gorgond is gone
 */
int gorgon_event_fd(gorgon_client *cli);
/* Before waiting for the event fd: 1 when completions are ready now (reap
 * them, then arm again: do not wait), 0 armed (the fd becomes readable when
 * the next completion is posted), -EPIPE (gorgond is gone, nothing is left
 * to reap), -EINVAL (no gorgon_event_fd yet). Reaping after a wake-up
 * (gorgon_poll, gorgon_wait, gorgon_generate_next with timeout 0) ends the
 * arming; the fd is emptied by the next arm. */
int gorgon_event_arm(gorgon_client *cli);
/* Sleep protocol for callers that wait themselves (e.g. io_uring
 * IORING_OP_FUTEX_WAIT, non-private, 32-bit): gorgon_wait_prepare returns 1
 * if completions are ready (do not sleep), else 0 with *addr and *val set: wait
 * while *addr == *val, then call gorgon_wait_finish and gorgon_poll. Not for
 * a client that took gorgon_event_fd (see there). */
int gorgon_wait_prepare(gorgon_client *cli, const uint32_t **addr, uint32_t *val);
void gorgon_wait_finish(gorgon_client *cli);
/* Requests submitted whose final completion was not reaped yet. */
uint32_t gorgon_inflight(const gorgon_client *cli);
/* Session id gorgond assigned (for logs). */
uint32_t gorgon_session_id(const gorgon_client *cli);

#ifdef __cplusplus
}
#endif

#endif
