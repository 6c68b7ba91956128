"""AsyncClient: gorgon for asyncio, with no helper thread.

The event loop watches libgorgon's event fd (gorgon_event_fd) with
loop.add_reader. When it becomes readable, one pass reads every open
stream without waiting (gorgon_generate_next with timeout 0) into its
AsyncGeneration's queue, then arms the fd again (gorgon_event_arm): 1 means
more completions are ready (another pass), 0 armed (wait for the fd), < 0
gorgond is gone (every stream fails with EPIPE).

Round trips that gorgond answers from its own loop (stats, ping,
model_info, tokenize, detokenize) run inline: they take microseconds and
never wait for the model.
"""

import asyncio
import errno as _errno
import weakref

from . import _lib
from .client import Client, Completion, _Stream
from .errors import GorgonError

_END = object()


class AsyncGeneration:
    """The text of one generation, chunk by chunk, for `async for`. After
    the last chunk, .usage holds how it ended. A failed request raises
    GorgonError from the iteration. Cancelling the task that iterates it
    (asyncio.CancelledError, e.g. Ctrl-C under asyncio.run) cancels the
    request in gorgond."""

    def __init__(self, aclient, req):
        self._ac = aclient
        self._s = _Stream(aclient._c, req)
        self._q = asyncio.Queue()
        self._ended = False

    @property
    def usage(self):
        return self._s.usage

    @property
    def finish_reason(self):
        return self._s.usage.finish_reason if self._s.usage else None

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._ended:
            raise StopAsyncIteration
        try:
            item = await self._q.get()
        except asyncio.CancelledError:
            self._cancel_request()
            raise
        if item is _END:
            self._ended = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        return item

    def _cancel_request(self):
        """Ask gorgond to stop; the pump reads the end."""
        if not self._s.done and not self._ac.closed:
            self._s.cancel()

    async def cancel(self):
        """Stop the generation and wait for its end (finish_reason
        "cancelled" unless it had ended already)."""
        self._cancel_request()
        while not self._ended:
            try:
                await self.__anext__()
            except StopAsyncIteration:
                break
            except GorgonError:
                break

    aclose = cancel

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.cancel()

    def __del__(self):
        try:
            if not self._s.done:
                self._s.abandon()
                self._ac._kick_threadsafe()
        except Exception:
            pass


class AsyncClient:
    """A connection to gorgond for asyncio programs (same socket rules as
    Client). Use `async with`, or call `await close()`. One event loop uses
    it (the one running when the first generation starts)."""

    def __init__(self, socket=None):
        self._c = Client(socket)
        self._L = self._c._L
        self._loop = None
        self._fd = None
        self._streams = weakref.WeakValueDictionary()  # req -> AsyncGeneration
        self._pending = False

    @property
    def client(self):
        """The blocking Client underneath (same connection)."""
        return self._c

    @property
    def closed(self):
        return self._c.closed

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self):
        self._close()

    def _close(self):
        if self._fd is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        self._fd = None
        self._fail_all(GorgonError(_errno.EBADF, "the client is closed"))
        self._c.close()

    def __del__(self):
        try:
            if not self._c.closed:
                self._close()
        except Exception:
            pass

    # ---- the event fd --------------------------------------------------------------

    def _attach(self):
        loop = asyncio.get_running_loop()
        if self._loop is None:
            if not _lib.has_event_fd():
                raise GorgonError(_errno.ENOSYS, "AsyncClient: this libgorgon has no "
                                  "gorgon_event_fd (%s): update libgorgon"
                                  % _lib.library_path())
            with self._c._lock:
                fd = self._L.gorgon_event_fd(self._c._handle())
                if fd < 0:
                    raise self._c._error(fd, "gorgon_event_fd")
            self._loop = loop
            self._fd = fd
            loop.add_reader(fd, self._pump)
        elif loop is not self._loop:
            raise GorgonError(_errno.EINVAL, "AsyncClient: used from a second event loop")

    def _kick(self):
        """Run a pass soon (completions may sit in libgorgon's stash, which
        no fd wake-up announces: after a round trip, a cancel, a drop)."""
        if self._loop is not None and not self._pending:
            self._pending = True
            self._loop.call_soon(self._pump)

    def _kick_threadsafe(self):
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._kick)

    def _fail_all(self, exc):
        for g in list(self._streams.values()):
            if not g._s.done:
                g._s.done = True
                g._q.put_nowait(exc)
        self._streams.clear()

    def _pump(self):
        self._pending = False
        c = self._c
        if c.closed:
            return
        # A bound on passes so a flood of completions cannot starve the
        # loop's other callbacks: the rest comes in the next turn.
        for _ in range(64):
            progressed = False
            with c._lock:
                c._reap_abandoned()
                for req, g in list(self._streams.items()):
                    s = g._s
                    while not s.done:
                        try:
                            text = s.step(0)
                        except GorgonError as e:
                            g._q.put_nowait(e)
                            break
                        if text is None:
                            break
                        progressed = True
                        if text:
                            g._q.put_nowait(text)
                    if s.done:
                        # after an error queued above, _END is never read
                        progressed = True
                        g._q.put_nowait(_END)
                        self._streams.pop(req, None)
                rc = self._L.gorgon_event_arm(c._h)
            if rc == 0:
                return  # armed: the fd wakes us
            if rc < 0:
                self._fail_all(c._error(rc, "gorgond"))
                if self._fd is not None:
                    self._loop.remove_reader(self._fd)
                    self._fd = None
                return
            if not progressed:
                # Ready completions none of our streams takes (a late
                # answer to a round trip that timed out): the next call
                # that polls drops them; look again shortly.
                self._loop.call_later(0.005, self._kick)
                return
        self._kick()

    # ---- generation ------------------------------------------------------------------

    def generate(self, prompt, *, max_tokens=256, temperature=0.0, top_p=1.0, top_k=0,
                 min_p=0.0, repeat_penalty=1.0, stop=None, seed=None, medusa=True):
        """Start a generation (Client.generate's arguments); returns an
        AsyncGeneration for `async for`. Call it from a coroutine."""
        self._attach()
        req = self._c._submit(prompt, max_tokens, temperature, top_p, top_k, min_p,
                              repeat_penalty, stop, seed, medusa)
        g = AsyncGeneration(self, req)
        self._streams[req] = g
        self._kick()
        return g

    async def complete(self, prompt, **kw):
        """The whole text of a generation (generate()'s arguments), as a
        Completion: a str with .usage."""
        g = self.generate(prompt, **kw)
        parts = []
        try:
            async for t in g:
                parts.append(t)
        finally:
            # Cancelled or failed midway: stop it in gorgond (the pump
            # reads its end).
            g._cancel_request()
        return Completion("".join(parts), g.usage)

    # ---- round trips (inline) ----------------------------------------------------------

    def _after(self, v):
        self._kick()
        return v

    async def ping(self, payload=b"gorgon", timeout=1.0):
        return self._after(self._c.ping(payload, timeout))

    async def stats(self):
        return self._after(self._c.stats())

    async def groups(self):
        return self._after(self._c.groups())

    async def model_info(self):
        return self._after(self._c.model_info())

    async def tokenize(self, text, *, add_bos=False):
        return self._after(self._c.tokenize(text, add_bos=add_bos))

    async def detokenize(self, ids):
        return self._after(self._c.detokenize(ids))
