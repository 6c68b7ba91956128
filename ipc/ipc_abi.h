/* ipc_abi.h — every byte that crosses a process boundary in gorgon.
 *
 * A client region is one sealed memfd that gorgond creates per session and
 * hands to the client over the control socket (SCM_RIGHTS). Layout, all
 * offsets from the region start, each part 64-byte (cache line) aligned:
 *
 *   [ipc_region_hdr]                      4096 bytes (one page)
 *   [SQ: ipc_ring_shared + sq_entries × ipc_sqe]   client → gorgond
 *   [CQ: ipc_ring_shared + cq_entries × ipc_cqe]   gorgond → client
 *   [n_slots × (ipc_slot_hdr + in_bytes + out_bytes)]
 *
 * The same ring layout (ipc_ring_shared + 64-byte entries) is used between
 * gorgond and its workers (command and event rings).
 *
 * Rules (ARCHITECTURE.md §3): fixed-width fields, explicit padding, offsets
 * never pointers. Everything in a region may be scribbled on by the peer at
 * any time: the reader copies a descriptor out once, then validates the copy
 * (ipc_sqe_validate); indices are checked (tail - head <= entries) and masked.
 *
 * Sleep protocol (the io_uring SQPOLL / AF_XDP NEED_WAKEUP pattern): the
 * consumer of a ring sets IPC_RING_NEED_WAKEUP in that ring's `flags`, issues
 * a full fence, re-checks the ring, then futex-waits on `doorbell`. The
 * producer publishes the tail, issues a full fence, and only if the flag is
 * set increments `doorbell` and calls FUTEX_WAKE. Doorbells are plain
 * (non-private) futex words: the memory is shared between processes.
 */
#ifndef GORGON_IPC_ABI_H
#define GORGON_IPC_ABI_H

#include <stddef.h>
#include <stdint.h>

#define IPC_MAGIC 0x4e4f4752u /* "RGON" little-endian: 'R','G','O','N' */
#define IPC_ABI_VERSION 4u /* 2: GENERATE/CANCEL, worker rings, generation stats;
                            * 3: Medusa (NO_MEDUSA flag, usage, stats);
                            * 4: EVENT_FD, PROMPT_PART, 256-byte stats */
#define IPC_DESC_SIZE 64u
#define IPC_CACHELINE 64u
#define IPC_HDR_BYTES 4096u

/* Limits a region may be created with (checked at create and at map). */
#define IPC_RING_MIN_ENTRIES 2u
#define IPC_RING_MAX_ENTRIES 65536u
#define IPC_MAX_SLOTS 4096u
#define IPC_SLOT_MAX_BYTES (64u << 20) /* per input or output buffer */

/* ---- rings ------------------------------------------------------------- */

/* ring flags (ipc_ring_shared.flags), set by the ring's consumer */
#define IPC_RING_NEED_WAKEUP 1u
/* The consumer sleeps in poll() on an eventfd instead of on the futex (kernel
 * without IORING_OP_FUTEX_WAIT): a producer that holds that eventfd (handed
 * over with the region, see ipc_ctl_send_welcome_wake) writes it instead of
 * calling FUTEX_WAKE. The doorbell word is still incremented. */
#define IPC_RING_WAKE_EVENTFD 2u

/* Control block at the start of each ring. head is written only by the
 * consumer, tail only by the producer; each on its own cache line so the two
 * sides never false-share. Indices are free-running u32: entry = idx & mask. */
struct ipc_ring_shared {
    uint32_t head; /* consumer: next entry to read (atomic) */
    uint8_t pad0[IPC_CACHELINE - 4];
    uint32_t tail; /* producer: next entry to write (atomic) */
    uint8_t pad1[IPC_CACHELINE - 4];
    uint32_t flags;    /* consumer-set IPC_RING_NEED_WAKEUP (atomic) */
    uint32_t doorbell; /* futex word: producer increments, then wakes (atomic) */
    uint8_t pad2[IPC_CACHELINE - 8];
};
_Static_assert(sizeof(struct ipc_ring_shared) == 3 * IPC_CACHELINE, "ring control block");
_Static_assert(offsetof(struct ipc_ring_shared, tail) == IPC_CACHELINE, "tail on its own line");
_Static_assert(offsetof(struct ipc_ring_shared, flags) == 2 * IPC_CACHELINE, "flags line");

/* ---- descriptors -------------------------------------------------------- */

/* Opcodes (ipc_sqe.opcode). The table in the server decides what is valid. */
enum ipc_op {
    IPC_OP_NOP = 0,
    IPC_OP_PING = 1,     /* echo in[in_off, +in_len) into the slot's output */
    IPC_OP_GENERATE = 2, /* ipc_gen_params in the slot's input; streams output (see below) */
    IPC_OP_CANCEL = 3,   /* cancel the GENERATE running in `slot` */
    IPC_OP_STATS = 4,    /* write an ipc_stats into the slot's output */
    IPC_OP_MODEL_INFO = 5, /* arg[0]: byte offset into the chat template; writes an
                            * ipc_model_info, then template bytes from that offset */
    IPC_OP_TOKENIZE = 6,   /* text in the input, arg[0] IPC_TOK_F_*; int32 ids out,
                            * result = their count (-ENOSPC: more than fit) */
    IPC_OP_DETOKENIZE = 7, /* int32 ids in the input; text out, result = its bytes */
    IPC_OP_EVENT_FD = 8,   /* gorgond makes a pipe, sends its read end over the
                            * control socket (ipc_ctl_send_fd, IPC_FD_EVENT) and
                            * from then on wakes the CQ's consumer by writing
                            * the pipe (IPC_RING_WAKE_EVENTFD); result 0, or
                            * -EALREADY (the session has one: no message) */
    IPC_OP_PROMPT_PART = 9, /* a piece of a prompt too large for one slot input:
                             * the input bytes are appended to what the slot has
                             * staged; arg[0] = the offset they go at (must equal
                             * the bytes staged so far: 0 starts over). A
                             * GENERATE with IPC_GEN_F_STAGED on that slot takes
                             * the staged bytes as the start of its prompt.
                             * result: bytes staged now */
    IPC_OP__COUNT,
};

/* Submission: client → gorgond. */
struct ipc_sqe {
    uint8_t opcode;  /* enum ipc_op */
    uint8_t flags;   /* none defined yet: must be 0 */
    uint16_t rsvd0;  /* must be 0 */
    uint32_t slot;   /* request slot index < n_slots */
    uint64_t user_data; /* opaque, echoed in every completion */
    uint32_t in_off; /* payload in the slot's input buffer */
    uint32_t in_len;
    uint64_t arg[4]; /* opcode-specific */
    uint8_t pad[8];
};
_Static_assert(sizeof(struct ipc_sqe) == IPC_DESC_SIZE, "sqe is one descriptor");
_Static_assert(offsetof(struct ipc_sqe, user_data) == 8, "sqe layout");
_Static_assert(offsetof(struct ipc_sqe, in_off) == 16, "sqe layout");
_Static_assert(offsetof(struct ipc_sqe, arg) == 24, "sqe layout");

/* completion flags (ipc_cqe.flags) */
#define IPC_CQE_F_MORE 1u /* more completions will follow for this request */

/* Completion: gorgond → client. */
struct ipc_cqe {
    uint8_t opcode; /* the request's opcode */
    uint8_t flags;  /* IPC_CQE_F_* */
    uint16_t rsvd0;
    uint32_t slot;
    uint64_t user_data;
    int32_t result;   /* >= 0 success (opcode-specific count), < 0 -errno */
    uint32_t out_off; /* new output bytes: [out_off, out_off + out_len) of the slot's output */
    uint32_t out_len;
    uint32_t rsvd1;
    uint64_t arg[4]; /* opcode-specific (usage, timings) */
};
_Static_assert(sizeof(struct ipc_cqe) == IPC_DESC_SIZE, "cqe is one descriptor");
_Static_assert(offsetof(struct ipc_cqe, result) == 16, "cqe layout");
_Static_assert(offsetof(struct ipc_cqe, arg) == 32, "cqe layout");

/* ---- request slots ------------------------------------------------------ */

/* Each slot: this header, then in_bytes of input, then out_bytes of output.
 * The client owns slot allocation; gorgond tracks privately which slots are
 * in flight and refuses a second request on a busy slot. */
struct ipc_slot_hdr {
    uint32_t out_consumed; /* client: output bytes it has consumed (atomic; streaming flow control) */
    uint32_t rsvd[15];
};
_Static_assert(sizeof(struct ipc_slot_hdr) == IPC_CACHELINE, "slot header");

/* ---- GENERATE ------------------------------------------------------------
 *
 * Request: the slot's input at in_off holds an ipc_gen_params; prompt and
 * stop strings follow at offsets relative to the params (all inside in_len).
 * The client zeroes the slot's ipc_slot_hdr.out_consumed before submitting.
 *
 * Output: the slot's output buffer is a BYTE RING of slot_out_bytes. gorgond
 * writes stream position w at buffer offset w % slot_out_bytes and never
 * lets w - out_consumed exceed slot_out_bytes; one completion never wraps
 * (out_off + out_len <= slot_out_bytes). The client adds out_len to
 * out_consumed (atomic release store) once it is done with a chunk's bytes.
 * Chunks carry IPC_CQE_F_MORE, result = bytes, arg[0] = tokens so far. The
 * last completion has no MORE flag and may carry the final bytes:
 *   result  0 (finished) or -errno (failed / cancelled: the bytes are then a
 *           NUL-free error message, not generated text)
 *   arg[0]  bits 0..7 enum ipc_finish; bits 8..31 tokens accepted from
 *           Medusa candidates; bits 32..63 Medusa steps that decoded this
 *           request (both 0 when it was decoded plainly)
 *   arg[1]  prompt tokens | completion tokens << 32
 *   arg[2]  time to first token, ns (0 when no token was produced)
 *   arg[3]  total time, ns (submission seen -> final completion)
 * With IPC_GEN_F_OUT_IDS the bytes are little-endian int32 token ids, every
 * chunk a multiple of 4 bytes at a 4-aligned offset (an EOS/BOS token that
 * ends the stream is not sent; stop strings still end it, but the ids of
 * the tokens that formed the stop string have already been sent).
 *
 * CANCEL: sqe.slot names the slot of a running GENERATE; result 0 (the
 * GENERATE then ends with -ECANCELED, IPC_FINISH_CANCELLED) or -ENOENT. */
#define IPC_GEN_F_PROMPT_IDS 1u /* prompt is int32 token ids (BOS included by the caller) */
#define IPC_GEN_F_OUT_IDS 2u    /* stream token ids instead of text */
#define IPC_GEN_F_NO_MEDUSA 4u  /* decode plainly even when Medusa heads are loaded */
#define IPC_GEN_F_STAGED 8u     /* the prompt starts with the slot's IPC_OP_PROMPT_PART
                                 * bytes; prompt_off/prompt_len hold the rest */
#define IPC_GEN_F__ALL \
    (IPC_GEN_F_PROMPT_IDS | IPC_GEN_F_OUT_IDS | IPC_GEN_F_NO_MEDUSA | IPC_GEN_F_STAGED)
#define IPC_GEN_FINISH_MASK 0xffu /* arg[0] of the final completion */
#define IPC_GEN_MAX_STOP 8       /* stop strings */
#define IPC_GEN_MAX_STOP_LEN 63  /* bytes of one, without its NUL */

enum ipc_finish {
    IPC_FINISH_NONE = 0,
    IPC_FINISH_EOS = 1,       /* end-of-sequence token */
    IPC_FINISH_STOP = 2,      /* a stop string */
    IPC_FINISH_LENGTH = 3,    /* max_tokens */
    IPC_FINISH_CANCELLED = 4, /* IPC_OP_CANCEL, or gorgond stopping */
    IPC_FINISH_ERROR = 5,     /* result < 0: the output holds the message */
};

struct ipc_gen_params {
    uint32_t flags;       /* IPC_GEN_F_* */
    uint32_t max_tokens;  /* >= 1; prompt + max_tokens <= the model's context */
    float temperature;    /* >= 0 (0: greedy) */
    float top_p;          /* (0, 1]; 1: off */
    float min_p;          /* [0, 1) */
    float repeat_penalty; /* 0 or 1: off; else > 0 */
    int32_t top_k;        /* <= 0: off */
    uint32_t n_stop;      /* <= IPC_GEN_MAX_STOP */
    uint64_t seed;
    uint32_t prompt_off, prompt_len; /* bytes, from the start of these params */
    uint32_t stop_off, stop_len;     /* n_stop NUL-terminated strings, packed */
    uint32_t rsvd[2];                /* must be 0 */
};
_Static_assert(sizeof(struct ipc_gen_params) == 64, "gen params");

/* ---- gorgond <-> worker -------------------------------------------------------
 *
 * A worker region is an ipc region (same header and layout) that gorgond
 * creates per worker process and passes as an inherited fd: its SQ is the
 * command ring (gorgond -> worker, ipc_wcmd), its CQ the event ring (worker ->
 * gorgond, ipc_wevt), and slot i belongs to worker request i: its input holds
 * the prompt as int32 token ids. gorgond hands a request slot to the worker
 * with START and owns it again after the worker's DONE for it. */
enum ipc_wcmd_op {
    IPC_WCMD_START = 1,  /* run request `req` */
    IPC_WCMD_CANCEL = 2, /* drop request `req` (answered by DONE, CANCELLED) */
    /* Disaggregated mode (ipc_kv.h). ADOPT, to a decode group: continue
     * request `req` whose prompt KV a prefill group wrote: the START fields
     * plus `first` (the token sampled after the prompt, already streamed)
     * and `n_blocks`; its block table and sampler state are in the
     * request's IN area. Answered by ADOPTED (or DONE). */
    IPC_WCMD_ADOPT = 3,
    /* RECLAIM, to a prefill group: the `n_blocks` blocks in the IN area of
     * `req` are the group's again, and its hold on `req` (since HANDOFF)
     * is over. No answer. */
    IPC_WCMD_RECLAIM = 4,
};

#define IPC_WCMD_F_NO_MEDUSA 1u /* START: never decode this request with Medusa */

struct ipc_wcmd {
    uint8_t op;
    uint8_t flags; /* IPC_WCMD_F_* */
    uint8_t rsvd0[2];
    uint32_t req;        /* request slot */
    uint32_t n_prompt;   /* ids in the slot's input */
    uint32_t max_tokens;
    float temperature, top_p, min_p, repeat_penalty;
    int32_t top_k;
    uint32_t rsvd1;
    uint64_t seed;
    int32_t first;     /* ADOPT */
    uint32_t n_blocks; /* ADOPT, RECLAIM */
    uint8_t pad[8];
};
_Static_assert(sizeof(struct ipc_wcmd) == IPC_DESC_SIZE, "worker command is one descriptor");

enum ipc_wevt_op {
    IPC_WEVT_READY = 1, /* model loaded: arg[0] kv blocks, arg[1] max sequences */
    IPC_WEVT_TOKEN = 2, /* tokens[0..n_tokens) sampled for req; arg[0] Medusa steps
                         * and arg[1] tokens accepted from Medusa candidates for req
                         * so far */
    IPC_WEVT_DONE = 3,  /* req finished: finish, result; the slot is gorgond's again */
    IPC_WEVT_STEP = 4,  /* scheduler state after a step: arg[0] queued | running << 32,
                         * arg[1] kv used | kv total << 32; n_tokens = sequences in
                         * that step's forward; result = the largest decode batch
                         * at which Medusa still pays (measured; 0: no Medusa) */
    /* Disaggregated mode (ipc_kv.h). HANDOFF, from a prefill group: req's
     * prompt is in the KV (arg[0] positions), its table (arg[1] blocks)
     * and sampler state in its OUT area, tokens[0] its first token (already
     * sent in a TOKEN event); the group holds the blocks until
     * gorgond sends RECLAIM. ADOPTED, from a decode group: req runs there
     * now; the arg[1] blocks it gave in exchange are in req's OUT area. */
    IPC_WEVT_HANDOFF = 5,
    IPC_WEVT_ADOPTED = 6,
};

struct ipc_wevt {
    uint8_t op;
    uint8_t finish;    /* DONE: enum ipc_finish */
    uint16_t n_tokens; /* TOKEN: <= 8 */
    uint32_t req;
    int32_t result;    /* DONE: 0 or -errno (-E2BIG: arg[0] blocks needed, arg[1] pool;
                        * -EIO from a device: arg[] holds the failing kernel's name,
                        * up to 16 bytes, NUL-padded, untrusted) */
    uint32_t n_gen;    /* tokens generated for req so far */
    int32_t tokens[8];
    uint64_t arg[2];
};
_Static_assert(sizeof(struct ipc_wevt) == IPC_DESC_SIZE, "worker event is one descriptor");

/* ---- region header ------------------------------------------------------ */

/* Written once by gorgond before the fd is sent; read-only by convention
 * afterwards (the client re-validates it at map time, gorgond never reads it
 * back: it keeps its own private copy of the layout). */
struct ipc_region_hdr {
    uint32_t magic;       /* IPC_MAGIC */
    uint32_t abi_version; /* IPC_ABI_VERSION */
    uint64_t region_bytes;
    uint32_t sq_entries; /* power of two */
    uint32_t cq_entries; /* power of two */
    uint32_t n_slots;
    uint32_t slot_in_bytes;  /* multiple of 64 */
    uint32_t slot_out_bytes; /* multiple of 64 */
    uint32_t session_id;
    uint64_t sq_off; /* -> ipc_ring_shared, entries follow at sq_off + sizeof(ipc_ring_shared) */
    uint64_t cq_off;
    uint64_t slots_off;   /* slot i at slots_off + i * slot_stride */
    uint64_t slot_stride; /* sizeof(ipc_slot_hdr) + in + out */
    uint8_t pad[IPC_HDR_BYTES - 72];
};
_Static_assert(sizeof(struct ipc_region_hdr) == IPC_HDR_BYTES, "region header is one page");
_Static_assert(offsetof(struct ipc_region_hdr, sq_off) == 40, "hdr layout");
_Static_assert(offsetof(struct ipc_region_hdr, slot_stride) == 64, "hdr layout");

/* ---- control socket ----------------------------------------------------- */

/* client → gorgond, first message on the SOCK_SEQPACKET control socket */
struct ipc_hello {
    uint32_t magic;       /* IPC_MAGIC */
    uint32_t abi_version; /* IPC_ABI_VERSION */
    uint32_t flags;       /* none yet: 0 */
    uint32_t rsvd;
};
_Static_assert(sizeof(struct ipc_hello) == 16, "hello");

/* gorgond → client, carries the region fd via SCM_RIGHTS when status == 0 */
struct ipc_welcome {
    uint32_t magic;
    uint32_t abi_version; /* server's version */
    int32_t status;       /* 0 or -errno (-EPROTONOSUPPORT, -EACCES, -EUSERS) */
    uint32_t session_id;
    uint64_t region_bytes;
    char reason[48]; /* NUL-terminated text when status < 0 */
};
_Static_assert(sizeof(struct ipc_welcome) == 72, "welcome");

/* gorgond → client after the welcome: one fd (SCM_RIGHTS) and what it is for. */
#define IPC_FD_EVENT 1u /* IPC_OP_EVENT_FD's pipe read end */
struct ipc_fd_msg {
    uint32_t magic; /* IPC_MAGIC */
    uint32_t kind;  /* IPC_FD_* */
};
_Static_assert(sizeof(struct ipc_fd_msg) == 8, "fd message");

/* IPC_OP_MODEL_INFO output (gorgond → client): this header, then
 * chunk_len bytes of the chat template starting at chunk_off (the request's
 * arg[0]); a client reads the rest with further requests. */
struct ipc_model_info {
    uint32_t n_ctx, n_vocab;
    int32_t bos, eos;      /* -1: none */
    uint32_t template_len; /* the whole tokenizer.chat_template (0: none) */
    uint32_t chunk_off, chunk_len;
    uint32_t rsvd;
    char name[128]; /* general.name, else the file name; NUL-terminated */
};
_Static_assert(sizeof(struct ipc_model_info) == 160, "model info");

#define IPC_TOK_F_ADD_BOS 1u /* IPC_OP_TOKENIZE: prepend BOS (when the model has one) */

/* IPC_OP_STATS output (gorgond → client) */
struct ipc_stats {
    uint64_t clients_now;
    uint64_t clients_total;
    uint64_t sessions_reclaimed;
    uint64_t requests_total;
    uint64_t protocol_errors;
    uint64_t loop_wakeups;
    /* generation (ABI 2; all 0 without a model) */
    uint64_t gen_queued;       /* admitted by the worker, waiting for KV room */
    uint64_t gen_running;      /* prefilling or decoding */
    uint64_t gen_tokens_total; /* tokens generated since start */
    uint64_t gen_tokens_per_s_milli; /* over the last full second, x1000 */
    uint64_t kv_blocks_used;
    uint64_t kv_blocks_total;
    uint64_t decode_batch_max; /* most sequences in one forward pass so far */
    uint64_t gen_requests_total;
    uint64_t gen_failed;       /* ended with an error (cancellations not counted) */
    uint64_t worker_restarts;
    /* Medusa (ABI 3; all 0 without heads) */
    uint64_t medusa_steps;      /* sequence-steps decoded with Medusa */
    uint64_t medusa_accepted;   /* candidate tokens those steps accepted */
    uint64_t medusa_max_batch;  /* decode batch up to which Medusa pays now (measured) */
    /* robustness (ABI 3, in what were reserved words; 0 from older daemons) */
    uint64_t gen_waiting;        /* held by gorgond for fair admission, not in the worker yet */
    uint64_t handshakes_pending; /* connections accepted that have not said hello */
    uint64_t handshakes_dropped; /* pending ones evicted (limits) or timed out */
    uint64_t watchdog_kills;     /* hung workers killed (no step / no READY in time) */
    uint64_t step_max_us;        /* longest worker step while requests waited on it */
    /* ABI 4 */
    uint64_t gen_cancelled;      /* ended cancelled (gorgon_cancel, client gone, shutdown) */
    /* ABI 4, later words (0 from older daemons, which send no group rows) */
    uint64_t gen_groups;         /* worker groups (replicas); their rows follow this struct */
    uint64_t gen_tp;             /* ranks per group */
    uint64_t gen_handoff_waiting; /* disaggregated: requests handed off, not adopted yet */
    uint64_t gen_handoffs_total;  /* disaggregated: prefill -> decode hand-offs */
    uint64_t rsvd[3];            /* 0 */
};
_Static_assert(sizeof(struct ipc_stats) == 256, "stats");

/* IPC_OP_STATS output after the ipc_stats: one row per worker group, as
 * many as fit in the slot's output (out_len says how many came). */
#define IPC_GROUP_MAX_RANKS 64u
enum ipc_group_state {
    IPC_GROUP_STARTING = 0,   /* started, the model not loaded yet */
    IPC_GROUP_READY = 1,      /* serving */
    IPC_GROUP_RESTARTING = 2, /* no process: a restart failed, or gorgond is stopping */
    IPC_GROUP_FAILED = 3,     /* given up (died before loading the model, repeatedly) */
};
enum ipc_group_role {
    IPC_GROUP_COLOCATED = 0, /* prompts and decoding */
    IPC_GROUP_PREFILL = 1,   /* disaggregated: prompts, then the KV is handed off */
    IPC_GROUP_DECODE = 2,    /* disaggregated: decodes what prefill groups handed off */
};
struct ipc_group_stats {
    uint32_t group;
    uint32_t n_ranks;
    uint32_t state;     /* enum ipc_group_state */
    uint32_t in_worker; /* requests sent to it and not done */
    uint64_t waiting;   /* requests waiting in gorgond whose prompt is in its region */
    uint64_t queued, running, kv_blocks_used, kv_blocks_total; /* its last STEP report */
    uint64_t tokens_total, requests_total, restarts, watchdog_kills;
    uint64_t decode_batch_max, step_max_us, medusa_max_batch;
    int32_t pid[IPC_GROUP_MAX_RANKS]; /* pid of rank r, 0 when not running */
    uint32_t role;            /* enum ipc_group_role */
    uint32_t handoff_waiting; /* decode group: handed-off requests not adopted yet */
    uint64_t handoffs_total;  /* prefill: requests handed off; decode: adopted */
};
_Static_assert(sizeof(struct ipc_group_stats) == 384, "group stats");

#endif
