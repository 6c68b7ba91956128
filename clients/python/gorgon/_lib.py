"""ctypes view of libgorgon (clients/gorgon.h): the structures, field for
field in the header's order, and the prototypes of the functions the
package calls.

The structures must match the C layout exactly: tests/test_layout.py
compares every size and field offset with what the C compiler says
(tests/python/test_python.c writes those numbers for it).

Which library is loaded: $GORGON_LIBRARY when set, else the build tree's
build/lib/libgorgon.so.0 when this package runs from a checkout of gorgon,
else the system's (ctypes.util.find_library("gorgon"), then
"libgorgon.so.0" through the dynamic loader's search path).
"""

import ctypes
import ctypes.util
import os
import threading

c_char_p = ctypes.c_char_p
c_int = ctypes.c_int
c_int32 = ctypes.c_int32
c_int64 = ctypes.c_int64
c_uint32 = ctypes.c_uint32
c_uint64 = ctypes.c_uint64
c_size_t = ctypes.c_size_t
c_float = ctypes.c_float
c_double = ctypes.c_double
c_void_p = ctypes.c_void_p

# gorgon_opts.flags
GORGON_BUSY_POLL = 1
GORGON_NO_SPIN = 2

# gorgon_tokenize flags
GORGON_TOK_ADD_BOS = 1

# gorgon_gen_params.flags
GORGON_GEN_PROMPT_IDS = 1
GORGON_GEN_WANT_IDS = 2
GORGON_GEN_NO_MEDUSA = 4
GORGON_GEN_MAX_STOP = 8
# The longest stop string gorgond takes, in bytes (ipc/ipc_abi.h
# IPC_GEN_MAX_STOP_LEN; gorgon.h says "1..63 bytes").
GORGON_GEN_MAX_STOP_LEN = 63

# enum gorgon_finish
FINISH_NAMES = {0: "none", 1: "eos", 2: "stop", 3: "length", 4: "cancelled", 5: "error"}


class GorgonOpts(ctypes.Structure):
    _fields_ = [
        ("socket_path", c_char_p),
        ("flags", c_uint32),
        ("spin_ns", c_int64),
    ]


class GorgonCounters(ctypes.Structure):
    _fields_ = [
        ("clients_now", c_uint64),
        ("clients_total", c_uint64),
        ("sessions_reclaimed", c_uint64),
        ("requests_total", c_uint64),
        ("protocol_errors", c_uint64),
        ("loop_wakeups", c_uint64),
        ("gen_queued", c_uint64),
        ("gen_running", c_uint64),
        ("gen_tokens_total", c_uint64),
        ("gen_tokens_per_s", c_double),
        ("kv_blocks_used", c_uint64),
        ("kv_blocks_total", c_uint64),
        ("decode_batch_max", c_uint64),
        ("gen_requests_total", c_uint64),
        ("gen_failed", c_uint64),
        ("worker_restarts", c_uint64),
        ("medusa_steps", c_uint64),
        ("medusa_accepted", c_uint64),
        ("medusa_max_batch", c_uint64),
        ("gen_waiting", c_uint64),
        ("handshakes_pending", c_uint64),
        ("handshakes_dropped", c_uint64),
        ("watchdog_kills", c_uint64),
        ("step_max_us", c_uint64),
        ("gen_cancelled", c_uint64),
        ("gen_handoff_waiting", c_uint64),
        ("gen_handoffs_total", c_uint64),
    ]


GORGON_GROUP_MAX_RANKS = 64
GROUP_STATES = {0: "starting", 1: "ready", 2: "restarting", 3: "failed"}
GROUP_ROLES = {0: "colocated", 1: "prefill", 2: "decode"}


class GorgonGroup(ctypes.Structure):
    _fields_ = [
        ("group", c_uint32),
        ("n_ranks", c_uint32),
        ("state", c_int),
        ("in_worker", c_uint32),
        ("waiting", c_uint64),
        ("queued", c_uint64),
        ("running", c_uint64),
        ("kv_blocks_used", c_uint64),
        ("kv_blocks_total", c_uint64),
        ("tokens_total", c_uint64),
        ("requests_total", c_uint64),
        ("restarts", c_uint64),
        ("watchdog_kills", c_uint64),
        ("decode_batch_max", c_uint64),
        ("step_max_us", c_uint64),
        ("medusa_max_batch", c_uint64),
        ("pid", c_int32 * GORGON_GROUP_MAX_RANKS),
        ("role", c_int),
        ("handoff_waiting", c_uint32),
        ("handoffs_total", c_uint64),
    ]


class GorgonModel(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char * 128),
        ("n_ctx", c_uint32),
        ("n_vocab", c_uint32),
        ("bos", c_int32),
        ("eos", c_int32),
        ("chat_template", c_char_p),
    ]


class GorgonGenParams(ctypes.Structure):
    _fields_ = [
        ("prompt", c_char_p),
        ("prompt_len", c_size_t),
        ("prompt_ids", ctypes.POINTER(c_int32)),
        ("n_ids", c_size_t),
        ("max_tokens", c_int32),
        ("temperature", c_float),
        ("top_k", c_int32),
        ("top_p", c_float),
        ("min_p", c_float),
        ("repeat_penalty", c_float),
        ("seed", c_uint64),
        ("stop", ctypes.POINTER(c_char_p)),
        ("n_stop", c_int),
        ("flags", c_uint32),
    ]


class GorgonGenUsage(ctypes.Structure):
    _fields_ = [
        ("prompt_tokens", c_uint32),
        ("completion_tokens", c_uint32),
        ("ttft_ns", c_uint64),
        ("total_ns", c_uint64),
        ("medusa_steps", c_uint32),
        ("medusa_accepted", c_uint32),
        ("seed", c_uint64),
    ]


class GorgonGenChunk(ctypes.Structure):
    _fields_ = [
        # c_void_p, not c_char_p: the text is not NUL-terminated (len says
        # how long) and ctypes would stop a c_char_p at the first NUL.
        ("text", c_void_p),
        ("len", c_size_t),
        ("ids", ctypes.POINTER(c_int32)),
        ("n_ids", c_size_t),
        ("done", c_int),
        ("finish", c_int),
        ("error", c_int32),
        ("usage", GorgonGenUsage),
    ]


class GorgonRequest(ctypes.Structure):
    _fields_ = [
        ("opcode", c_uint32),
        ("slot", c_uint32),
        ("in_len", c_uint32),
        ("user_data", c_uint64),
    ]


class GorgonCompletion(ctypes.Structure):
    _fields_ = [
        ("user_data", c_uint64),
        ("result", c_int32),
        ("opcode", c_uint32),
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("out", c_void_p),
        ("out_len", c_size_t),
        ("arg", c_uint64 * 4),
    ]


# Every structure of gorgon.h, by its C name (tests/test_layout.py).
STRUCTS = {
    "gorgon_opts": GorgonOpts,
    "gorgon_request": GorgonRequest,
    "gorgon_completion": GorgonCompletion,
    "gorgon_counters": GorgonCounters,
    "gorgon_group": GorgonGroup,
    "gorgon_model": GorgonModel,
    "gorgon_gen_params": GorgonGenParams,
    "gorgon_gen_usage": GorgonGenUsage,
    "gorgon_gen_chunk": GorgonGenChunk,
}

_client_p = c_void_p

# name: (restype, argtypes)
_PROTOTYPES = {
    "gorgon_connect": (c_int, [ctypes.POINTER(c_void_p), ctypes.POINTER(GorgonOpts)]),
    "gorgon_close": (None, [_client_p]),
    "gorgon_last_socket": (c_char_p, []),
    "gorgon_last_refusal": (c_char_p, []),
    "gorgon_strerror": (c_char_p, [c_int]),
    "gorgon_last_error": (c_char_p, [_client_p]),
    "gorgon_ping": (c_int, [_client_p, c_void_p, c_size_t, c_int64, ctypes.POINTER(c_uint64)]),
    "gorgon_stats": (c_int, [_client_p, ctypes.POINTER(GorgonCounters)]),
    "gorgon_groups": (c_int, [_client_p, ctypes.POINTER(GorgonGroup), c_size_t]),
    "gorgon_model_info": (c_int, [_client_p, ctypes.POINTER(GorgonModel)]),
    "gorgon_tokenize": (c_int, [_client_p, c_char_p, c_size_t, c_uint32,
                                ctypes.POINTER(c_int32), c_size_t]),
    "gorgon_detokenize": (c_int, [_client_p, ctypes.POINTER(c_int32), c_size_t,
                                  c_void_p, c_size_t]),
    "gorgon_finish_name": (c_char_p, [c_int]),
    "gorgon_generate_submit": (c_int, [_client_p, ctypes.POINTER(GorgonGenParams), c_uint64,
                                       ctypes.POINTER(c_uint32)]),
    "gorgon_generate_next": (c_int, [_client_p, c_uint32, ctypes.POINTER(GorgonGenChunk),
                                     c_int64]),
    "gorgon_cancel": (c_int, [_client_p, c_uint32]),
    "gorgon_fd": (c_int, [_client_p]),
    "gorgon_inflight": (c_uint32, [_client_p]),
    "gorgon_session_id": (c_uint32, [_client_p]),
}

# Newer calls: bound when the loaded library has them (AsyncClient needs
# them and says so when they are missing).
_OPTIONAL = {
    "gorgon_event_fd": (c_int, [_client_p]),
    "gorgon_event_arm": (c_int, [_client_p]),
}

SONAME = "libgorgon.so.0"

_lock = threading.Lock()
_lib = None


def _candidates():
    env = os.environ.get("GORGON_LIBRARY")
    if env:
        # An explicit choice: only that one, so a typo is an error and not
        # a silent fallback to another libgorgon.
        return [env], True
    out = []
    # clients/python/gorgon/_lib.py -> the checkout's root
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.normpath(os.path.join(here, "..", "..", ".."))
    if os.path.isfile(os.path.join(root, "clients", "gorgon.h")):
        tree = os.path.join(root, "build", "lib", SONAME)
        if os.path.exists(tree):
            out.append(tree)
    found = ctypes.util.find_library("gorgon")
    if found:
        out.append(found)
    out.append(SONAME)
    return out, False


def load():
    """The loaded libgorgon (a ctypes.CDLL), loading it on first use.
    Raises OSError naming every place tried when none loads."""
    global _lib
    with _lock:
        if _lib is not None:
            return _lib
        names, explicit = _candidates()
        errors = []
        lib = None
        for name in names:
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError as e:
                errors.append("%s: %s" % (name, e))
        if lib is None:
            where = "$GORGON_LIBRARY" if explicit else "the build tree and the system"
            raise OSError("libgorgon not found in %s (%s); set GORGON_LIBRARY to the path "
                          "of libgorgon.so.0" % (where, "; ".join(errors)))
        for name, (res, args) in _PROTOTYPES.items():
            fn = getattr(lib, name)
            fn.restype = res
            fn.argtypes = args
        for name, (res, args) in _OPTIONAL.items():
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.restype = res
                fn.argtypes = args
        _lib = lib
        return lib


def library_path():
    """The file the loaded libgorgon came from (from /proc/self/maps)."""
    lib = load()
    addr = ctypes.cast(lib.gorgon_connect, c_void_p).value
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if lo <= addr < hi and len(parts) >= 6:
                    return parts[5]
    except OSError:
        pass
    return lib._name


def has_event_fd():
    lib = load()
    return hasattr(lib, "gorgon_event_fd") and hasattr(lib, "gorgon_event_arm")


def strerror(rc):
    return load().gorgon_strerror(rc).decode("utf-8", "replace")
