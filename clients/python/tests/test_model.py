"""Model info, gorgond's tokenizer, stats and ping through the package."""

import struct
import unittest

import _support
from _support import gorgon


def gguf_u32(path, key):
    """A uint32 metadata value of a GGUF file, read here independently of
    gorgon (GGUF v3: header, then key/value pairs)."""
    with open(path, "rb") as f:
        data = f.read(1 << 20)
    magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", data, 0)
    assert magic == b"GGUF", magic
    off = 24
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def skip(t, off):
        if t in sizes:
            return off + sizes[t]
        if t == 8:  # string
            (n,) = struct.unpack_from("<Q", data, off)
            return off + 8 + n
        if t == 9:  # array
            et, n = struct.unpack_from("<IQ", data, off)
            off += 12
            for _ in range(n):
                off = skip(et, off)
            return off
        raise ValueError("GGUF type %d" % t)

    for _ in range(n_kv):
        (klen,) = struct.unpack_from("<Q", data, off)
        k = data[off + 8:off + 8 + klen].decode()
        off += 8 + klen
        (t,) = struct.unpack_from("<I", data, off)
        off += 4
        if k == key:
            assert t == 4, (k, t)
            return struct.unpack_from("<I", data, off)[0]
        off = skip(t, off)
    raise KeyError(key)


class ModelTest(unittest.TestCase):
    def setUp(self):
        self.c = gorgon.Client(_support.socket_path())
        self.addCleanup(self.c.close)

    def test_model_info_matches_the_gguf(self):
        mi = self.c.model_info()
        self.assertIsInstance(mi, gorgon.ModelInfo)
        path = _support.model_file("stories260K/stories260K.gguf")
        self.assertEqual(mi.n_ctx, gguf_u32(path, "llama.context_length"))
        self.assertEqual(mi.n_vocab, 512)  # models README: vocab 512, BOS 1, EOS 2
        self.assertEqual(mi.bos, 1)
        self.assertEqual(mi.eos, 2)
        self.assertEqual(mi.chat_template, "")
        self.assertTrue(mi.name)

    def test_tokenize_round_trip(self):
        text = "Once upon a time, Lily and Tom went to the park."
        ids = self.c.tokenize(text, add_bos=True)
        self.assertEqual(ids[0], 1)
        self.assertTrue(all(0 <= i < 512 for i in ids))
        self.assertEqual(self.c.tokenize(text), ids[1:])
        self.assertEqual(self.c.detokenize(ids), text)
        self.assertEqual(self.c.tokenize(""), [])
        self.assertEqual(self.c.detokenize([]), "")
        # The prompt of a generation is counted with the same tokenizer.
        r = self.c.complete(text, max_tokens=1)
        self.assertEqual(r.usage.prompt_tokens, len(ids))

    def test_tokenize_long_text(self):
        text = "Lily and Tom went to the park. " * 40
        ids = self.c.tokenize(text, add_bos=True)
        self.assertGreater(len(ids), 200)
        self.assertEqual(self.c.detokenize(ids), text)

    def test_stats_count_requests(self):
        before = self.c.stats()
        self.assertIsInstance(before, gorgon.Stats)
        self.assertGreaterEqual(before.clients_now, 1)
        self.assertGreater(before.kv_blocks_total, 0)
        r = self.c.complete("Once upon a time", max_tokens=20)
        after = self.c.stats()
        self.assertEqual(after.gen_requests_total, before.gen_requests_total + 1)
        self.assertGreaterEqual(after.gen_tokens_total, before.gen_tokens_total +
                                r.usage.completion_tokens)
        self.assertGreater(after.requests_total, before.requests_total)
        self.assertIsInstance(after.gen_tokens_per_s, float)
        with gorgon.Client(_support.socket_path()) as c2:
            self.assertEqual(c2.stats().clients_now, after.clients_now + 1)
        _support.wait_until(lambda: self.c.stats().clients_now == after.clients_now,
                            what="the second client's session to go")

    def test_groups(self):
        gs = self.c.groups()
        self.assertEqual(len(gs), 1)
        g = gs[0]
        self.assertIsInstance(g, gorgon.Group)
        self.assertEqual((g.group, g.state), (0, "ready"))
        self.assertEqual((g.role, g.handoff_waiting, g.handoffs_total), ("colocated", 0, 0))
        self.assertEqual(self.c.stats().gen_handoffs_total, 0)
        self.assertEqual(len(g.pids), 1)
        self.assertGreater(g.pids[0], 0)
        with open("/proc/%d/stat" % g.pids[0]) as f:
            self.assertIn("(gorgon-worker)", f.read())
        self.assertEqual(g.kv_blocks_total, self.c.stats().kv_blocks_total)
        before = g.requests_total
        self.c.complete("Once upon a time", max_tokens=5)
        self.assertEqual(self.c.groups()[0].requests_total, before + 1)

    def test_stats_and_ping_while_streaming(self):
        g = self.c.generate("Once upon a time", max_tokens=200)
        first = next(g)
        st = self.c.stats()
        self.assertGreaterEqual(st.gen_requests_total, 1)
        self.assertGreater(self.c.ping(b"x" * 100), 0)
        rest = "".join(g)
        self.assertEqual(first + rest, self.c.complete("Once upon a time", max_tokens=200))

    def test_ping(self):
        rtt = self.c.ping()
        self.assertGreater(rtt, 0)
        self.assertLess(rtt, 1.0)
        self.assertGreater(self.c.ping("text payload"), 0)
        self.assertGreater(self.c.session_id, 0)


if __name__ == "__main__":
    unittest.main()
