"""gorgond dies under running streams (a private gorgond, killed with
SIGKILL while its worker is stopped so no stream can finish first): the
blocking and the asyncio stream both raise GorgonError EPIPE instead of
hanging, and a new Client then fails to connect naming the socket."""

import asyncio
import errno
import os
import signal
import subprocess
import tempfile
import time
import unittest

import _support
from _support import gorgon


def children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/%s/stat" % d) as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                out.append(int(d))
    return out


class GorgondGoneTest(unittest.TestCase):
    def setUp(self):
        gorgond = os.path.join(os.path.dirname(_support.env("GORGON_TEST_CLI")), "gorgond")
        self.dir = tempfile.TemporaryDirectory(prefix="gorgon-gone-")
        self.addCleanup(self.dir.cleanup)
        self.sock = os.path.join(self.dir.name, "g.sock")
        self.gd = subprocess.Popen([gorgond, "--foreground", "--socket", self.sock, "--log-level",
                                    "error", "--model",
                                    _support.model_file("stories260K/stories260K.gguf")])
        self.addCleanup(self.stop)
        self.worker = None

        def up():
            if self.gd.poll() is not None:
                self.fail("gorgond exited with %d" % self.gd.returncode)
            try:
                with gorgon.Client(self.sock) as c:
                    return c.complete("x", max_tokens=1) is not None
            except gorgon.GorgonError:
                return False

        _support.wait_until(up, timeout=30, what="the private gorgond to serve")

    def stop(self):
        if self.gd.poll() is None:
            self.gd.kill()
        self.gd.wait()
        if self.worker:
            try:
                os.kill(self.worker, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop_worker(self):
        """No token comes after this: no stream can end before gorgond."""
        (self.worker,) = children(self.gd.pid)
        os.kill(self.worker, signal.SIGSTOP)

    def kill_gorgond(self):
        self.gd.kill()
        self.gd.wait()

    def test_blocking_stream_raises_epipe(self):
        c = gorgon.Client(self.sock)
        self.addCleanup(c.close)
        self.stop_worker()
        g = c.generate("Once upon a time", max_tokens=200)
        self.kill_gorgond()
        t0 = time.monotonic()
        with self.assertRaises(gorgon.GorgonError) as cm:
            list(g)
        self.assertEqual(cm.exception.errno, errno.EPIPE, str(cm.exception))
        self.assertIn("gorgond went away", cm.exception.message)
        self.assertLess(time.monotonic() - t0, 5)
        with self.assertRaises(gorgon.GorgonError) as cm:
            c.ping()
        self.assertEqual(cm.exception.errno, errno.EPIPE)
        with self.assertRaises(gorgon.GorgonError) as cm:
            gorgon.Client(self.sock)
        self.assertIn(errno.errorcode[cm.exception.errno], ("ECONNREFUSED", "ENOENT"))
        self.assertIn(self.sock, cm.exception.message)

    def test_async_stream_raises_epipe(self):
        async def main():
            async with gorgon.AsyncClient(self.sock) as c:
                self.assertTrue(await c.complete("Once", max_tokens=3))  # fd taken
                self.stop_worker()
                g = c.generate("Once upon a time", max_tokens=200)
                await asyncio.sleep(0.01)  # the loop waits on the fd meanwhile
                self.kill_gorgond()
                with self.assertRaises(gorgon.GorgonError) as cm:
                    async for _ in g:
                        pass
                return cm.exception

        e = asyncio.run(asyncio.wait_for(main(), 30))
        self.assertEqual(e.errno, errno.EPIPE, str(e))


if __name__ == "__main__":
    unittest.main()
