"""Failures raise GorgonError with the errno and a message naming what was
wrong: bad parameters (checked before anything is sent, in gorgond's words),
parameters only gorgond can judge, a socket with no gorgond, a closed client,
a library that is not there."""

import errno
import os
import subprocess
import sys
import tempfile
import unittest

import _support
from _support import gorgon


class ParamErrorTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.c = gorgon.Client(_support.socket_path())

    @classmethod
    def tearDownClass(cls):
        cls.c.close()

    def bad(self, field, **kw):
        prompt = kw.pop("prompt", "Once upon a time")
        with self.assertRaises(gorgon.GorgonError) as cm:
            self.c.generate(prompt, **kw)
        e = cm.exception
        self.assertEqual(e.errno, errno.EINVAL, str(e))
        self.assertIn(field, e.message)
        self.assertIn(field, str(e))
        self.assertIn("EINVAL", str(e))
        return e

    def test_bad_numbers_name_their_field(self):
        self.assertIn("(0, 1]", self.bad("top_p", top_p=2).message)
        self.bad("top_p", top_p=0)
        self.bad("top_p", top_p=float("nan"))
        self.assertIn("must be >= 0", self.bad("temperature", temperature=-0.5).message)
        self.bad("temperature", temperature=float("inf"))
        self.bad("max_tokens", max_tokens=0)
        self.bad("max_tokens", max_tokens=-3)
        self.bad("max_tokens", max_tokens=2**31)
        self.bad("top_k", top_k=-1)
        self.bad("min_p", min_p=1.0)
        self.bad("repeat_penalty", repeat_penalty=-1)
        self.bad("seed", seed=-1)
        self.bad("seed", seed=2**64)

    def test_bad_types_name_their_field(self):
        self.bad("max_tokens", max_tokens="10")
        self.bad("max_tokens", max_tokens=True)
        self.bad("max_tokens", max_tokens=2.5)
        self.bad("temperature", temperature="hot")
        self.bad("seed", seed=1.5)
        self.bad("prompt", prompt=None)
        self.bad("prompt", prompt=[])
        self.bad("prompt", prompt=3)
        self.bad("prompt token id", prompt=[1, -4])
        self.bad("prompt", prompt="a\0b")

    def test_bad_stop_strings(self):
        self.assertIn("at most 8", self.bad("stop", stop=["s%d" % i for i in range(9)]).message)
        self.assertIn("1 to 63 bytes", self.bad("stop", stop="").message)
        self.bad("stop", stop="x" * 64)
        self.bad("stop", stop=[5])
        self.bad("stop", stop=7)
        # 63 bytes is fine, counted in UTF-8 bytes
        self.c.complete("Once", max_tokens=2, stop="x" * 63)
        self.bad("stop", stop="\u00e9" * 32)

    def test_gorgond_judges_what_needs_the_model(self):
        # top_k beyond the vocabulary and a prompt + max_tokens beyond the
        # context are gorgond's to refuse: the request's final chunk names
        # the field, raised from the iteration.
        g = self.c.generate("Once", top_k=100000)
        with self.assertRaises(gorgon.GorgonError) as cm:
            list(g)
        self.assertEqual(cm.exception.errno, errno.EINVAL)
        self.assertIn("top_k 100000", cm.exception.message)
        self.assertIn("512", cm.exception.message)
        self.assertEqual(g.finish_reason, "error")
        n_ctx = self.c.model_info().n_ctx
        with self.assertRaises(gorgon.GorgonError) as cm:
            self.c.complete("Once upon a time", max_tokens=n_ctx)
        self.assertEqual(cm.exception.errno, errno.EINVAL)
        self.assertIn("exceeds the context", cm.exception.message)
        # the client goes on working
        self.assertTrue(self.c.complete("Once", max_tokens=3))

    def test_detokenize_bad_id_names_it(self):
        with self.assertRaises(gorgon.GorgonError) as cm:
            self.c.detokenize([1, 99999])
        self.assertEqual(cm.exception.errno, errno.EINVAL)
        self.assertIn("99999", cm.exception.message)
        with self.assertRaises(gorgon.GorgonError) as cm:
            self.c.detokenize([1, 2**40])
        self.assertEqual(cm.exception.errno, errno.EINVAL)
        with self.assertRaises(gorgon.GorgonError):
            self.c.detokenize("hello")


class ConnectionErrorTest(unittest.TestCase):
    def test_no_gorgond_on_socket(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "nobody.sock")
            with self.assertRaises(gorgon.GorgonError) as cm:
                gorgon.Client(path)
        e = cm.exception
        self.assertEqual(e.errno, errno.ENOENT)
        self.assertIn(path, e.message)
        self.assertIn("cannot connect", e.message)

    def test_socket_from_environment(self):
        old = os.environ.get("GORGON_SOCKET")
        try:
            os.environ["GORGON_SOCKET"] = "/nonexistent/gorgon-test.sock"
            with self.assertRaises(gorgon.GorgonError) as cm:
                gorgon.Client()
            self.assertIn("/nonexistent/gorgon-test.sock", cm.exception.message)
        finally:
            if old is None:
                del os.environ["GORGON_SOCKET"]
            else:
                os.environ["GORGON_SOCKET"] = old
        with gorgon.Client() as c:  # $GORGON_SOCKET again
            self.assertGreater(c.ping(), 0)

    def test_closed_client(self):
        c = gorgon.Client(_support.socket_path())
        g = c.generate("Once upon a time", max_tokens=100)
        c.close()
        c.close()  # idempotent
        self.assertTrue(c.closed)
        for call in (c.ping, c.stats, c.model_info, lambda: c.complete("x"),
                     lambda: list(g)):
            with self.assertRaises(gorgon.GorgonError) as cm:
                call()
            self.assertEqual(cm.exception.errno, errno.EBADF)
            self.assertIn("closed", cm.exception.message)

    def test_missing_library_is_named(self):
        code = "import gorgon\ntry:\n  gorgon.Client()\nexcept OSError as e:\n  print(e)\n"
        env = dict(os.environ, GORGON_LIBRARY="/nonexistent/libgorgon.so.0")
        p = subprocess.run([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=30)
        out = p.stdout.decode()
        self.assertEqual(p.returncode, 0, out)
        self.assertIn("/nonexistent/libgorgon.so.0", out)
        self.assertIn("GORGON_LIBRARY", out)

    def test_library_path_is_the_one_asked_for(self):
        want = os.environ.get("GORGON_LIBRARY")
        got = gorgon.library_path()
        self.assertTrue(os.path.exists(got), got)
        if want:
            self.assertEqual(os.path.realpath(got), os.path.realpath(want))


if __name__ == "__main__":
    unittest.main()
