"""Generation parameters: checked here, with a message naming the field
(the same rules and words as gorgond's), then packed into a
gorgon_gen_params."""

import ctypes
import errno as _errno
import math

from . import _lib
from .errors import GorgonError

INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1


def _bad(msg):
    return GorgonError(_errno.EINVAL, msg)


def _int(name, v, lo, hi):
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad("%s: %r is not an integer" % (name, v))
    if v < lo or v > hi:
        raise _bad("%s %d: must be in [%d, %d]" % (name, v, lo, hi))
    return v


def _float(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad("%s: %r is not a number" % (name, v))
    v = float(v)
    if not math.isfinite(v):
        raise _bad("%s %r: must be a finite number" % (name, v))
    return v


def _stops(stop):
    if stop is None:
        return []
    if isinstance(stop, (str, bytes)):
        stop = [stop]
    try:
        stop = list(stop)
    except TypeError:
        raise _bad("stop: %r is not a string or a list of strings" % (stop,)) from None
    if len(stop) > _lib.GORGON_GEN_MAX_STOP:
        raise _bad("stop: %d strings, at most %d" % (len(stop), _lib.GORGON_GEN_MAX_STOP))
    out = []
    for s in stop:
        if isinstance(s, str):
            b = s.encode("utf-8")
        elif isinstance(s, bytes):
            b = s
        else:
            raise _bad("stop: %r is not a string" % (s,))
        if not 1 <= len(b) <= _lib.GORGON_GEN_MAX_STOP_LEN or b"\0" in b:
            raise _bad("stop: %r is %d bytes; a stop string is 1 to %d bytes without NUL"
                       % (s, len(b), _lib.GORGON_GEN_MAX_STOP_LEN))
        out.append(b)
    return out


class Packed:
    """A gorgon_gen_params and the buffers its pointers point into (they
    must stay alive until gorgon_generate_submit returned)."""

    def __init__(self, prompt, max_tokens, temperature, top_p, top_k, min_p,
                 repeat_penalty, stop, seed, medusa):
        p = _lib.GorgonGenParams()
        if isinstance(prompt, str):
            self.prompt = prompt.encode("utf-8")
        elif isinstance(prompt, (bytes, bytearray)):
            self.prompt = bytes(prompt)
        elif prompt is None:
            raise _bad("prompt: missing (a string, or a list of token ids)")
        else:
            try:
                ids = [_int("prompt token id", t, 0, INT32_MAX) for t in prompt]
            except TypeError:
                raise _bad("prompt: %r is neither a string nor a list of token ids"
                           % (prompt,)) from None
            if not ids:
                raise _bad("prompt: an empty list of token ids (give at least BOS)")
            self.ids = (_lib.c_int32 * len(ids))(*ids)
            self.prompt = None
            p.prompt_ids = ctypes.cast(self.ids, ctypes.POINTER(_lib.c_int32))
            p.n_ids = len(ids)
            p.flags |= _lib.GORGON_GEN_PROMPT_IDS
        if self.prompt is not None:
            if b"\0" in self.prompt:
                raise _bad("prompt: contains a NUL byte")
            p.prompt = self.prompt
            p.prompt_len = len(self.prompt)
        p.max_tokens = _int("max_tokens", max_tokens, 1, INT32_MAX)
        t = _float("temperature", temperature)
        if t < 0:
            raise _bad("temperature %g: must be >= 0" % t)
        p.temperature = t
        tp = _float("top_p", top_p)
        if not 0 < tp <= 1:
            raise _bad("top_p %g: must be in (0, 1]" % tp)
        p.top_p = tp
        p.top_k = _int("top_k", top_k, 0, INT32_MAX)
        mp = _float("min_p", min_p)
        if not 0 <= mp < 1:
            raise _bad("min_p %g: must be in [0, 1)" % mp)
        p.min_p = mp
        rp = _float("repeat_penalty", repeat_penalty)
        if rp < 0:
            raise _bad("repeat_penalty %g: must be >= 0" % rp)
        p.repeat_penalty = rp
        if seed is not None:
            p.seed = _int("seed", seed, 0, UINT64_MAX)
        stops = _stops(stop)
        if stops:
            self.stop = (_lib.c_char_p * len(stops))(*stops)
            p.stop = ctypes.cast(self.stop, ctypes.POINTER(_lib.c_char_p))
            p.n_stop = len(stops)
        if not medusa:
            p.flags |= _lib.GORGON_GEN_NO_MEDUSA
        self.params = p
