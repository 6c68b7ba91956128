"""Generation through the package: greedy text equals the model's goldens
and the `gorgon generate` CLI byte for byte; stop strings, seeds, usage,
several streams on one client, early exits that give the slot back."""

import subprocess
import threading
import unittest

import _support
from _support import gorgon

LILY = "stories260K/golden_greedy_prompt_LilyAndTom_n64.txt"


class GenerateTest(unittest.TestCase):
    def setUp(self):
        self.c = gorgon.Client(_support.socket_path())
        self.addCleanup(self.c.close)

    # "Lily and Tom" is BOS + 4 tokens: the golden's 64 steps (BOS
    # included) are 60 new tokens; the golden file is the prompt, the text
    # and a newline.
    def test_generate_greedy_equals_golden(self):
        g = self.c.generate("Lily and Tom", max_tokens=60)
        self.assertIsNone(g.usage)
        chunks = list(g)
        self.assertTrue(all(isinstance(t, str) and t for t in chunks))
        self.assertEqual("Lily and Tom" + "".join(chunks) + "\n", _support.read_golden(LILY))
        self.assertEqual(g.usage.prompt_tokens, 5)
        self.assertEqual(g.usage.completion_tokens, 60)
        self.assertEqual(g.usage.total_tokens, 65)
        self.assertEqual(g.usage.finish_reason, "length")
        self.assertEqual(g.finish_reason, "length")
        self.assertEqual(g.usage.seed, 0)  # greedy without a seed
        self.assertGreater(g.usage.ttft_ns, 0)
        self.assertGreaterEqual(g.usage.total_ns, g.usage.ttft_ns)
        self.assertEqual(list(g), [])  # exhausted stays exhausted

    def test_complete_greedy_equals_golden(self):
        r = self.c.complete("Lily and Tom", max_tokens=60)
        self.assertIsInstance(r, str)
        self.assertEqual("Lily and Tom" + r + "\n", _support.read_golden(LILY))
        self.assertEqual(r.usage.completion_tokens, 60)
        self.assertEqual(r.usage.finish_reason, "length")

    def test_greedy_from_bos_equals_golden_n256(self):
        r = self.c.complete("", max_tokens=256)
        self.assertEqual(r + "\n", _support.read_golden("stories260K/golden_greedy_n256.txt"))
        self.assertEqual(r.usage.prompt_tokens, 1)

    def test_token_id_prompt_equals_text_prompt(self):
        ids = self.c.tokenize("Lily and Tom", add_bos=True)
        self.assertEqual(self.c.complete(ids, max_tokens=40),
                         self.c.complete("Lily and Tom", max_tokens=40))

    def cli(self, *args):
        p = subprocess.run([_support.env("GORGON_TEST_CLI"), "generate",
                            "--socket", _support.socket_path()] + list(args),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(p.returncode, 0, p.stderr)
        return p.stdout.decode("utf-8")

    def test_equals_cli_greedy_and_sampled(self):
        want = self.cli("-p", "Once upon a time", "-n", "80")
        self.assertEqual(self.c.complete("Once upon a time", max_tokens=80) + "\n", want)
        want = self.cli("-p", "The cat", "-n", "50", "--temp", "0.9", "--top-p", "0.8",
                        "--seed", "4242")
        got = self.c.complete("The cat", max_tokens=50, temperature=0.9, top_p=0.8, seed=4242)
        self.assertEqual(got + "\n", want)
        self.assertEqual(got.usage.seed, 4242)

    def test_stop_string_ends_text_before_it(self):
        full = self.c.complete("Lily and Tom", max_tokens=60)
        cut = full.index("park")
        r = self.c.complete("Lily and Tom", max_tokens=60, stop="park")
        self.assertEqual(r, full[:cut])
        self.assertEqual(r.usage.finish_reason, "stop")
        # several stop strings: the first one to appear wins
        r = self.c.complete("Lily and Tom", max_tokens=60, stop=["box", "toys", "zzzz"])
        self.assertEqual(r, full[:full.index("toys")])
        self.assertEqual(r.usage.finish_reason, "stop")
        # a stop string that never appears changes nothing
        r = self.c.complete("Lily and Tom", max_tokens=60, stop=["zebra"])
        self.assertEqual(r, full)
        self.assertEqual(r.usage.finish_reason, "length")

    def test_seed_reproduces_sampled_text(self):
        kw = dict(max_tokens=60, temperature=1.0, top_p=0.9)
        a = self.c.complete("Once upon a time", seed=133742, **kw)
        b = self.c.complete("Once upon a time", seed=133742, **kw)
        self.assertEqual(a, b)
        self.assertEqual(a.usage.seed, 133742)
        # without a seed each run draws one, reported in the usage, which
        # reproduces it
        runs = [self.c.complete("Once upon a time", **kw) for _ in range(4)]
        seeds = {r.usage.seed for r in runs}
        self.assertEqual(len(seeds), 4, "4 unseeded runs drew %s" % seeds)
        self.assertNotIn(0, seeds)
        self.assertGreater(len(set(runs)), 1, "4 unseeded runs gave the same text")
        again = self.c.complete("Once upon a time", seed=runs[0].usage.seed, **kw)
        self.assertEqual(again, runs[0])

    def test_eos_finish(self):
        r = self.c.complete("", max_tokens=2000)
        self.assertEqual(r.usage.finish_reason, "eos")
        self.assertLess(r.usage.completion_tokens, 2000)

    def test_two_streams_on_one_client_interleave(self):
        ref_a = self.c.complete("Lily and Tom", max_tokens=60)
        ref_b = self.c.complete("Once upon a time", max_tokens=60)
        ga = self.c.generate("Lily and Tom", max_tokens=60)
        gb = self.c.generate("Once upon a time", max_tokens=60)
        a, b = [], []
        ia, ib = iter(ga), iter(gb)
        live = {"a": (ia, a), "b": (ib, b)}
        while live:
            for k in list(live):
                it, out = live[k]
                t = next(it, None)
                if t is None:
                    del live[k]
                else:
                    out.append(t)
                    # other round trips meanwhile on the same client
                    self.c.ping()
        self.assertEqual("".join(a), ref_a)
        self.assertEqual("".join(b), ref_b)
        self.assertEqual(ga.usage.finish_reason, "length")
        self.assertEqual(gb.usage.finish_reason, "length")

    def test_threads_share_a_client(self):
        ref = self.c.complete("Lily and Tom", max_tokens=60)
        got = [None] * 4
        errors = []

        def run(i):
            try:
                got[i] = self.c.complete("Lily and Tom", max_tokens=60)
            except Exception as e:  # reported below
                errors.append(e)

        ts = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        self.assertEqual(errors, [])
        self.assertEqual(got, [ref] * 4)

    def test_break_and_cancel_give_slots_back(self):
        # More abandoned generations than a client has slots: each must
        # come back, or submits would fail with EAGAIN.
        for i in range(80):
            g = self.c.generate("Once upon a time", max_tokens=200)
            next(g)
            if i % 2:
                g.cancel()
                self.assertEqual(g.finish_reason, "cancelled")
                self.assertEqual(list(g), [])
            else:
                del g  # dropped mid-stream: reaped by the client's next call
        self.assertEqual("Lily and Tom" + self.c.complete("Lily and Tom", max_tokens=60) + "\n",
                         _support.read_golden(LILY))
        _support.wait_until(lambda: _support.idle(self.c), what="gorgond idle")
        self.assertEqual(self.c.inflight, 0)

    def test_with_block_cancels_unfinished(self):
        with self.c.generate("Once upon a time", max_tokens=300) as g:
            first = next(g)
            self.assertTrue(first)
        self.assertEqual(g.finish_reason, "cancelled")
        self.assertLess(g.usage.completion_tokens, 300)
        _support.wait_until(lambda: _support.idle(self.c), what="gorgond idle")

    def test_multibyte_prompt(self):
        # Characters outside the 512-token vocabulary go through
        # byte-fallback tokens, one byte each: the prompt still counts them
        # and the text streams as str.
        prompt = "Lily said: \u00e9t\u00e9 \u2603"
        ids = self.c.tokenize(prompt, add_bos=True)
        self.assertEqual(self.c.detokenize(ids), prompt)
        g = self.c.generate(prompt, max_tokens=40)
        text = "".join(g)
        self.assertEqual(g.usage.prompt_tokens, len(ids))
        self.assertEqual(text, self.c.complete(prompt, max_tokens=40))


if __name__ == "__main__":
    unittest.main()
