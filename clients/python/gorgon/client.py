"""Client: a blocking connection to gorgond, and Generation, the iterator
of one streaming request.

Threading: a Client may be shared between threads; its calls into
libgorgon are serialised by a lock (libgorgon's clients are one thread at
a time). For throughput from many threads, give each its own Client.

Ctrl-C: every wait inside libgorgon is cut into slices of SLICE_S, so a
KeyboardInterrupt is raised within that time; a generation it interrupts
is cancelled in gorgond (gorgon_cancel) before the exception goes on.
"""

import codecs
import ctypes
import dataclasses
import errno as _errno
import os
import threading
from typing import Optional

from . import _lib
from ._params import Packed
from .errors import GorgonError

# The longest a blocking call waits inside libgorgon before Python gets to
# run its signal handlers (Ctrl-C).
SLICE_S = 0.05
_SLICE_NS = int(SLICE_S * 1e9)
# How long a cancelled request may take to report its end (gorgond answers
# a cancel from its own loop, at once; this only bounds a sick daemon).
_CANCEL_DRAIN_S = 5.0


@dataclasses.dataclass(frozen=True)
class Usage:
    """How a generation ended (the final chunk of gorgon_generate_next)."""
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "eos", "stop", "length", "cancelled" or "error"
    seed: int           # the sampling seed it ran with (pass it back to reproduce)
    ttft_ns: int        # gorgond saw the request -> first token
    total_ns: int       # gorgond saw the request -> final completion
    medusa_steps: int = 0
    medusa_accepted: int = 0

    @property
    def total_tokens(self):
        return self.prompt_tokens + self.completion_tokens


def _usage_of(chunk):
    u = chunk.usage
    return Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                 finish_reason=_lib.FINISH_NAMES.get(chunk.finish, "none"), seed=u.seed,
                 ttft_ns=u.ttft_ns, total_ns=u.total_ns, medusa_steps=u.medusa_steps,
                 medusa_accepted=u.medusa_accepted)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    name: str
    n_ctx: int                 # context length (prompt + new tokens)
    n_vocab: int
    bos: Optional[int]         # None when the model has none
    eos: Optional[int]
    chat_template: str         # "" when the model has none


Stats = dataclasses.make_dataclass(
    "Stats", [(name, float if ctype is _lib.c_double else int)
              for name, ctype in _lib.GorgonCounters._fields_],
    frozen=True, namespace={"__doc__": "gorgond's counters (gorgon_counters in gorgon.h)."})
Stats.__module__ = __name__


@dataclasses.dataclass(frozen=True)
class Group:
    """One worker group of gorgond (gorgon_group in gorgon.h): `replicas`
    of them serve at once (or prefill and decode groups, with
    mode = disaggregated), each of `tp` rank processes."""
    group: int
    state: str                 # "starting", "ready", "restarting" or "failed"
    pids: tuple                # pid of each rank (0: not running)
    in_worker: int             # requests it holds
    waiting: int               # requests waiting in gorgond, headed for it
    queued: int
    running: int
    kv_blocks_used: int
    kv_blocks_total: int
    tokens_total: int
    requests_total: int
    restarts: int
    watchdog_kills: int
    decode_batch_max: int
    step_max_us: int
    medusa_max_batch: int
    role: str = "colocated"    # "colocated", "prefill" or "decode"
    handoff_waiting: int = 0   # decode: requests handed to it, not adopted yet
    handoffs_total: int = 0    # prefill: requests handed off; decode: adopted


class Completion(str):
    """The whole text of a generation (a str), with its .usage."""

    usage: Usage

    def __new__(cls, text, usage):
        self = super().__new__(cls, text)
        self.usage = usage
        return self


class _Stream:
    """One GENERATE request's state, shared by the sync and async iterators:
    turns gorgon_gen_chunk results into text and the final usage."""

    def __init__(self, client, req):
        self.client = client
        self.req = req
        self.done = False
        self.usage = None
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.chunk = _lib.GorgonGenChunk()

    def step(self, timeout_ns):
        """One gorgon_generate_next: the text it brought ("" when none yet,
        or on a split UTF-8 character), None on a timeout; at the end sets
        done and usage. Raises GorgonError for a failed request (done)."""
        cli = self.client
        ch = self.chunk
        with cli._lock:
            h = cli._handle()
            rc = cli._L.gorgon_generate_next(h, self.req, ctypes.byref(ch), timeout_ns)
            data = ctypes.string_at(ch.text, ch.len) if ch.text and ch.len else b""
        if rc == 1:
            return self.decoder.decode(data)
        if rc == 0:
            self.done = True
            self.usage = _usage_of(ch)
            return self.decoder.decode(data, final=True)
        if rc == -_errno.ETIMEDOUT and not ch.done:
            return None
        self.done = True
        if ch.done:
            # The request failed (or was cancelled): gorgond's message is
            # the final chunk's text.
            self.usage = _usage_of(ch)
            if rc == -_errno.ECANCELED and self.usage.finish_reason == "cancelled":
                return ""
            msg = data.decode("utf-8", "replace") or _lib.strerror(rc)
            raise GorgonError(-rc, msg)
        raise cli._error(rc, "generate")

    def cancel(self):
        """gorgon_cancel: 0, or -ENOENT when the request already ended."""
        with self.client._lock:
            return self.client._L.gorgon_cancel(self.client._handle(), self.req)

    def abandon(self):
        """Leave the request to the client, which cancels it and reads its
        end on its next call (so the slot comes back)."""
        if not self.done:
            self.done = True
            self.client._abandoned.append(self.req)


class Generation:
    """The text of one generation, chunk by chunk (str), as gorgond streams
    it. After the last chunk, .usage holds how it ended (tokens, finish
    reason, seed). Failures raise GorgonError from the iteration.

    Leaving the loop early (break, an exception) cancels the request when
    the Generation is closed or garbage-collected; `with` closes it."""

    def __init__(self, client, req):
        self._s = _Stream(client, req)

    @property
    def usage(self) -> Optional[Usage]:
        """None until the generation ended."""
        return self._s.usage

    @property
    def finish_reason(self) -> Optional[str]:
        return self._s.usage.finish_reason if self._s.usage else None

    def __iter__(self):
        return self

    def __next__(self):
        try:
            s = self._s
            while not s.done:
                text = s.step(_SLICE_NS)
                if text:
                    return text
        except KeyboardInterrupt:
            self._interrupted()
            raise
        raise StopIteration

    def _interrupted(self):
        s = self._s
        if s.done:
            return
        try:
            if s.cancel() < 0:
                # -ENOENT: it had ended already, between the interrupted
                # call and here.
                s.done = True
                return
            _drain(s)
        finally:
            s.abandon()

    def cancel(self):
        """Stop the generation now; the iteration then ends with
        finish_reason "cancelled" (unless it had ended already)."""
        s = self._s
        if s.done:
            return
        try:
            if s.cancel() < 0:
                s.done = True
                return
            _drain(s)
        finally:
            s.abandon()

    close = cancel

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self._s.abandon()
        except Exception:
            pass


def _drain(s):
    """Read a cancelled stream to its final chunk (bounded)."""
    deadline = _monotonic() + _CANCEL_DRAIN_S
    while not s.done and _monotonic() < deadline:
        try:
            s.step(_SLICE_NS)
        except GorgonError:
            pass


def _monotonic():
    import time
    return time.monotonic()


class Client:
    """A connection to gorgond.

    socket -- the control socket's path; None: $GORGON_SOCKET, else
              /run/gorgon/gorgon.sock (libgorgon's default)

    Use it as a context manager, or call close(). Raises GorgonError when
    gorgond cannot be reached or refuses the connection."""

    def __init__(self, socket=None, *, busy_poll=False):
        self._L = _lib.load()
        self._lock = threading.RLock()
        self._abandoned = []
        self._h = None
        opts = _lib.GorgonOpts()
        if socket is not None:
            opts.socket_path = os.fsencode(socket)
        if busy_poll:
            opts.flags = _lib.GORGON_BUSY_POLL
        h = ctypes.c_void_p()
        rc = self._L.gorgon_connect(ctypes.byref(h), ctypes.byref(opts))
        if rc < 0:
            path = (self._L.gorgon_last_socket() or b"").decode("utf-8", "replace")
            why = (self._L.gorgon_last_refusal() or b"").decode("utf-8", "replace")
            msg = "cannot connect to gorgond at %s: %s" % (path, _lib.strerror(rc))
            if why and why not in msg:
                msg += " (%s)" % why
            raise GorgonError(-rc, msg)
        self._h = h

    # ---- lifetime -------------------------------------------------------------

    def close(self):
        """Hang up (gorgond cancels what is still running). Idempotent."""
        with self._lock:
            if self._h is not None:
                self._L.gorgon_close(self._h)
                self._h = None

    @property
    def closed(self):
        return self._h is None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            if self._h is not None:
                self._L.gorgon_close(self._h)
                self._h = None
        except Exception:
            pass

    def _handle(self):
        if self._h is None:
            raise GorgonError(_errno.EBADF, "the client is closed")
        return self._h

    def _error(self, rc, what):
        """GorgonError for a library return rc < 0: gorgond's message when
        this call's round trip carried one, else the errno's text."""
        msg = ""
        if self._h is not None and rc != -_errno.EPIPE:
            msg = (self._L.gorgon_last_error(self._h) or b"").decode("utf-8", "replace")
        return GorgonError(-rc, "%s: %s" % (what, msg or _lib.strerror(rc)))

    def _reap_abandoned(self):
        """Cancel and read to their end the generations nobody reads any
        more, so their slots come back (called under the lock)."""
        if not self._abandoned:
            return
        ch = _lib.GorgonGenChunk()
        keep = []
        for req in self._abandoned:
            self._L.gorgon_cancel(self._h, req)
            while True:
                rc = self._L.gorgon_generate_next(self._h, req, ctypes.byref(ch), 0)
                if rc != 1:
                    break
            if rc == -_errno.ETIMEDOUT and not ch.done:
                keep.append(req)
        self._abandoned[:] = keep

    # ---- generation -------------------------------------------------------------

    def _submit(self, prompt, max_tokens, temperature, top_p, top_k, min_p, repeat_penalty,
                stop, seed, medusa):
        packed = Packed(prompt, max_tokens, temperature, top_p, top_k, min_p, repeat_penalty,
                        stop, seed, medusa)
        req = ctypes.c_uint32()
        with self._lock:
            h = self._handle()
            self._reap_abandoned()
            rc = self._L.gorgon_generate_submit(h, ctypes.byref(packed.params), 0,
                                                ctypes.byref(req))
            if rc < 0:
                raise self._error(rc, "generate")
        return req.value

    def generate(self, prompt, *, max_tokens=256, temperature=0.0, top_p=1.0, top_k=0,
                 min_p=0.0, repeat_penalty=1.0, stop=None, seed=None, medusa=True):
        """Start a generation; returns a Generation (iterate it for text).

        prompt      -- text (gorgond adds BOS), or a list of token ids (BOS
                       included by you)
        max_tokens  -- new tokens, >= 1
        temperature -- 0: greedy; top_p in (0, 1], top_k (0: off), min_p in
                       [0, 1), repeat_penalty (1: off) shape the sampling
        stop        -- a string or up to 8 strings (1 to 63 bytes each): the
                       text ends before the first one that appears
        seed        -- sampling seed; None: a random one for a sampled
                       request (Generation.usage.seed says which)
        medusa      -- False: decode plainly even when gorgond has Medusa heads
        """
        req = self._submit(prompt, max_tokens, temperature, top_p, top_k, min_p,
                           repeat_penalty, stop, seed, medusa)
        try:
            return Generation(self, req)
        except BaseException:  # Ctrl-C right after the submit: reaped later
            self._abandoned.append(req)
            raise

    def complete(self, prompt, **kw):
        """The whole text of a generation (generate()'s arguments), as a
        Completion: a str with .usage."""
        g = self.generate(prompt, **kw)
        with g:
            text = "".join(g)
        return Completion(text, g.usage)

    # ---- round trips ------------------------------------------------------------

    def ping(self, payload=b"gorgon", timeout=1.0):
        """Round trip of one PING through gorgond: the time it took, in
        seconds. Raises GorgonError (ETIMEDOUT) after `timeout` seconds."""
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        payload = bytes(payload)
        rtt = ctypes.c_uint64()
        with self._lock:
            h = self._handle()
            self._reap_abandoned()
            rc = self._L.gorgon_ping(h, payload, len(payload), int(timeout * 1e9),
                                     ctypes.byref(rtt))
            if rc < 0:
                raise self._error(rc, "ping")
        return rtt.value / 1e9

    def stats(self):
        """gorgond's counters, as a Stats (fields of gorgon_counters)."""
        st = _lib.GorgonCounters()
        with self._lock:
            h = self._handle()
            self._reap_abandoned()
            rc = self._L.gorgon_stats(h, ctypes.byref(st))
            if rc < 0:
                raise self._error(rc, "stats")
        return Stats(**{name: getattr(st, name) for name, _ in _lib.GorgonCounters._fields_})

    def groups(self):
        """gorgond's worker groups, a list of Group ([] without a model)."""
        rows = (_lib.GorgonGroup * _lib.GORGON_GROUP_MAX_RANKS)()
        with self._lock:
            h = self._handle()
            self._reap_abandoned()
            n = self._L.gorgon_groups(h, rows, len(rows))
            if n < 0:
                raise self._error(n, "groups")
        out = []
        for r in rows[:min(n, len(rows))]:
            out.append(Group(
                group=r.group, state=_lib.GROUP_STATES.get(r.state, str(r.state)),
                pids=tuple(r.pid[:r.n_ranks]),
                role=_lib.GROUP_ROLES.get(r.role, str(r.role)),
                **{name: getattr(r, name) for name, _ in _lib.GorgonGroup._fields_
                   if name not in ("group", "state", "n_ranks", "pid", "role")}))
        return out

    def model_info(self):
        """What gorgond serves, as a ModelInfo. GorgonError ENOTSUP when
        gorgond runs without a model."""
        mi = _lib.GorgonModel()
        with self._lock:
            h = self._handle()
            self._reap_abandoned()
            rc = self._L.gorgon_model_info(h, ctypes.byref(mi))
            if rc < 0:
                raise self._error(rc, "model_info")
            tmpl = (mi.chat_template or b"").decode("utf-8", "replace")
        return ModelInfo(name=mi.name.decode("utf-8", "replace"), n_ctx=mi.n_ctx,
                         n_vocab=mi.n_vocab, bos=None if mi.bos < 0 else mi.bos,
                         eos=None if mi.eos < 0 else mi.eos, chat_template=tmpl)

    def tokenize(self, text, *, add_bos=False):
        """Token ids of text, by gorgond's tokenizer (the one prompts go
        through); add_bos prepends BOS as a prompt gets it."""
        b = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        flags = _lib.GORGON_TOK_ADD_BOS if add_bos else 0
        # No tokenizer makes more than one id per byte, plus BOS and a
        # leading-space piece: one try fits unless the slot does not.
        cap = len(b) + 8
        ids = (_lib.c_int32 * cap)()
        with self._lock:
            h = self._handle()
            self._reap_abandoned()
            rc = self._L.gorgon_tokenize(h, b, len(b), flags, ids, cap)
            if rc < 0:
                raise self._error(rc, "tokenize")
        return list(ids[:rc])

    def detokenize(self, ids):
        """Text of token ids (a leading BOS is dropped, as in generation
        output). GorgonError EINVAL names an id out of range."""
        try:
            ids = [int(i) for i in ids]
        except (TypeError, ValueError):
            raise GorgonError(_errno.EINVAL, "detokenize: %r is not a list of token ids"
                              % (ids,)) from None
        for i in ids:
            if not -2**31 <= i < 2**31:
                raise GorgonError(_errno.EINVAL, "detokenize: id %d is not a 32-bit id" % i)
        arr = (_lib.c_int32 * max(1, len(ids)))(*ids)
        cap = 32 * len(ids) + 64
        with self._lock:
            h = self._handle()
            self._reap_abandoned()
            while True:
                buf = ctypes.create_string_buffer(cap)
                rc = self._L.gorgon_detokenize(h, arr, len(ids), buf, cap)
                if rc == -_errno.ENOSPC and cap < (1 << 26):
                    cap *= 8
                    continue
                if rc < 0:
                    raise self._error(rc, "detokenize")
                return buf.raw[:rc].decode("utf-8", "replace")

    # ---- introspection ------------------------------------------------------------

    @property
    def session_id(self):
        with self._lock:
            return self._L.gorgon_session_id(self._handle())

    @property
    def inflight(self):
        """Requests submitted whose end was not read yet."""
        with self._lock:
            return self._L.gorgon_inflight(self._handle())
