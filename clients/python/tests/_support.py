"""What the tests share: where gorgond, the models and the CLI are.

tests/python/test_python.c starts a gorgond with stories260K and sets
GORGON_SOCKET, GORGON_LIBRARY, GORGON_TEST_GORGOND_PID, GORGON_TEST_CLI,
GORGON_TEST_MODELS and GORGON_TEST_LAYOUT. By hand:

    GORGON_SOCKET=/tmp/g.sock PYTHONPATH=clients/python \
        /usr/bin/python3 -m unittest discover -v -s clients/python/tests

(tests that need one of the other variables fail, naming it).
"""

import os
import signal
import sys
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
PKG = os.path.dirname(HERE)
ROOT = os.path.normpath(os.path.join(PKG, "..", ".."))

if PKG not in sys.path:
    sys.path.insert(0, PKG)

import gorgon  # noqa: E402


def env(name):
    v = os.environ.get(name)
    if not v:
        raise unittest.TestCase.failureException(
            "%s is not set (tests/python/test_python.c sets it)" % name)
    return v


def socket_path():
    return env("GORGON_SOCKET")


def models_dir():
    return os.environ.get("GORGON_TEST_MODELS") or os.path.join(ROOT, "..", "shared", "models")


def model_file(rel):
    p = os.path.join(models_dir(), rel)
    if not os.path.exists(p):
        raise unittest.TestCase.failureException("test model %s not found "
                                                 "(set GORGON_TEST_MODELS)" % p)
    return p


def read_golden(rel):
    with open(model_file(rel), "rb") as f:
        return f.read().decode("utf-8")


def wait_until(pred, timeout=10.0, what="condition"):
    """Poll pred() (observable state, not time) until it is true."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise unittest.TestCase.failureException("timed out waiting for " + what)
        time.sleep(0.005)


def gorgond_pid():
    return int(env("GORGON_TEST_GORGOND_PID"))


def worker_pid():
    """The gorgon-worker child of the test's gorgond (from /proc)."""
    parent = gorgond_pid()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == parent and comm.startswith("gorgon-worker"):
            return int(d)
    raise unittest.TestCase.failureException("gorgond %d has no gorgon-worker child" % parent)


class FrozenWorker:
    """`with FrozenWorker():` stops gorgond's worker (SIGSTOP) so requests
    wait for it; it continues at the end of the block."""

    def __enter__(self):
        self.pid = worker_pid()
        os.kill(self.pid, signal.SIGSTOP)
        return self

    def __exit__(self, *exc):
        try:
            os.kill(self.pid, signal.SIGCONT)
        except ProcessLookupError:
            if exc[0] is None:  # else the test's own failure says more
                raise unittest.TestCase.failureException(
                    "gorgon-worker %d died while it was stopped (gorgond's watchdog?)" % self.pid)


def idle(c):
    """gorgond runs, queues and holds nothing for any request."""
    st = c.stats()
    return (st.gen_running == 0 and st.gen_queued == 0 and st.gen_waiting == 0
            and st.kv_blocks_used == 0)
