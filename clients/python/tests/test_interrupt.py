"""Ctrl-C: a Python process blocked in a generation (gorgond's worker is
stopped, so no token comes) gets SIGINT: the package cancels the request in
gorgond, which ends it as "cancelled", and KeyboardInterrupt ends the
process."""

import os
import signal
import subprocess
import sys
import unittest

import _support
from _support import gorgon

CHILD = r"""
import signal
import sys
import gorgon

# As in an interactive program: Ctrl-C raises KeyboardInterrupt (a shell
# that started the tests in the background may have left SIGINT ignored,
# which a child inherits, and a test runner may have blocked it).
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])

mode = sys.argv[1]
c = gorgon.Client()
g = None
try:
    if mode == "iterate":
        g = c.generate("Once upon a time", max_tokens=100)
        print("blocking", flush=True)
        for text in g:
            print("text", repr(text), flush=True)
    else:
        print("blocking", flush=True)
        c.complete("Once upon a time", max_tokens=100)
except KeyboardInterrupt:
    # What the package left behind, before KeyboardInterrupt ends us.
    print("finish", g.finish_reason if g else "-", "inflight", c.inflight, flush=True)
    # The client still works (gorgond answers this from its own loop).
    print("ping", c.ping() > 0, flush=True)
    raise
print("not interrupted", flush=True)
"""


def in_futex_wait(pid):
    """The process sleeps in a futex wait (where libgorgon waits), or, where
    the kernel hides wchan, at least sleeps."""
    try:
        with open("/proc/%d/wchan" % pid) as f:
            wchan = f.read().strip()
        if wchan and wchan != "0":
            return "futex" in wchan
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
        return stat[stat.rindex(")") + 2] == "S"
    except OSError:
        return False


class InterruptTest(unittest.TestCase):
    def setUp(self):
        self.c = gorgon.Client(_support.socket_path())
        self.addCleanup(self.c.close)

    def interrupt(self, mode):
        before = self.c.stats()
        with _support.FrozenWorker():
            p = subprocess.Popen([sys.executable, "-c", CHILD, mode], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, env=dict(os.environ))
            try:
                # The child's request reached gorgond: it now waits for a
                # token that cannot come while the worker is stopped.
                line = p.stdout.readline()
                if line != b"blocking\n":
                    self.fail("the child said %r: %r" % (line, p.communicate()))
                _support.wait_until(
                    lambda: self.c.stats().gen_requests_total > before.gen_requests_total,
                    what="the child's request")
                # It sleeps in libgorgon's wait (a futex) for a token that
                # cannot come while the worker is stopped: Ctrl-C now.
                _support.wait_until(lambda: p.poll() is not None or in_futex_wait(p.pid),
                                    what="the child to block")
                if p.poll() is not None:
                    self.fail("the child exited early: %r" % (p.communicate(),))
                p.send_signal(signal.SIGINT)
                out, err = p.communicate(timeout=20)
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            st = self.c.stats()
        out, err = out.decode(), err.decode()
        # Python ends an uncaught KeyboardInterrupt by SIGINT.
        self.assertEqual(p.returncode, -signal.SIGINT, "stdout %r\nstderr %r" % (out, err))
        self.assertIn("KeyboardInterrupt", err)
        self.assertNotIn("text", out)  # the frozen worker made no token
        self.assertIn("ping True", out)
        self.assertEqual(st.gen_requests_total, before.gen_requests_total + 1)
        # A cancel is not a failure, and nothing stays behind in gorgond.
        _support.wait_until(lambda: _support.idle(self.c), what="gorgond idle")
        self.assertEqual(self.c.stats().gen_failed, before.gen_failed)
        return out

    def test_ctrl_c_cancels_iteration(self):
        out = self.interrupt("iterate")
        # gorgond ended the request as cancelled (its final chunk) before
        # the process went away, and the slot came back.
        self.assertIn("finish cancelled inflight 0", out)

    def test_ctrl_c_cancels_complete(self):
        out = self.interrupt("complete")
        self.assertIn("finish - inflight 0", out)


if __name__ == "__main__":
    unittest.main()
