"""AsyncClient: `async for` driven by libgorgon's event fd through
loop.add_reader, no helper thread. Concurrent streams on one client equal
the blocking client's text; the loop stays free while gorgond's worker is
stopped (and nothing polls meanwhile); cancelling the iterating task cancels
the request; errors and round trips."""

import asyncio
import errno
import threading
import unittest

import _support
from _support import gorgon

LILY = "stories260K/golden_greedy_prompt_LilyAndTom_n64.txt"


class AsyncTest(unittest.TestCase):
    def setUp(self):
        self.sync = gorgon.Client(_support.socket_path())
        self.addCleanup(self.sync.close)

    def run_async(self, coro, timeout=60):
        return asyncio.run(asyncio.wait_for(coro, timeout))

    @staticmethod
    async def collect(g):
        parts = []
        async for t in g:
            assert isinstance(t, str) and t
            parts.append(t)
        return "".join(parts)

    def test_two_concurrent_streams_equal_the_blocking_client(self):
        want_a = self.sync.complete("Lily and Tom", max_tokens=200)
        want_b = self.sync.complete("Once upon a time", max_tokens=200, temperature=0.9,
                                    seed=77)
        threads = threading.active_count()

        async def main():
            async with gorgon.AsyncClient(_support.socket_path()) as c:
                ga = c.generate("Lily and Tom", max_tokens=200)
                gb = c.generate("Once upon a time", max_tokens=200, temperature=0.9, seed=77)
                self.assertEqual(c.client.inflight, 2)  # both in flight at once
                a, b = await asyncio.gather(self.collect(ga), self.collect(gb))
                self.assertEqual(threading.active_count(), threads, "a helper thread ran")
                return a, b, ga, gb

        a, b, ga, gb = self.run_async(main())
        self.assertEqual(a, want_a)
        self.assertEqual(b, want_b)
        self.assertEqual(ga.usage.completion_tokens, 200)
        self.assertEqual(gb.usage.seed, 77)
        self.assertEqual(gb.finish_reason, "length")

    def test_eight_streams_on_one_client(self):
        prompts = ["Lily and Tom", "Once upon a time", "The cat", "A big dog", "Tim had",
                   "The sun", "One day", "Sue and Ben"]
        want = [self.sync.complete(p, max_tokens=80, stop="park") for p in prompts]

        async def main():
            async with gorgon.AsyncClient(_support.socket_path()) as c:
                gs = [c.generate(p, max_tokens=80, stop="park") for p in prompts]
                return await asyncio.gather(*(self.collect(g) for g in gs)), gs

        got, gs = self.run_async(main())
        self.assertEqual(got, want)
        for g, w in zip(gs, want):
            self.assertEqual(g.usage, g.usage)
            self.assertEqual(g.finish_reason, w.usage.finish_reason)

    def test_complete_equals_golden(self):
        async def main():
            async with gorgon.AsyncClient(_support.socket_path()) as c:
                return await c.complete("Lily and Tom", max_tokens=60)

        r = self.run_async(main())
        self.assertEqual("Lily and Tom" + r + "\n", _support.read_golden(LILY))
        self.assertEqual(r.usage.finish_reason, "length")
        self.assertEqual(r.usage.prompt_tokens, 5)

    def test_waits_on_the_fd_while_the_worker_is_stopped(self):
        pumps = 0

        async def main(c, frozen):
            before = self.sync.stats().gen_requests_total
            g = c.generate("Lily and Tom", max_tokens=60)
            task = asyncio.ensure_future(self.collect(g))
            while self.sync.stats().gen_requests_total == before:
                await asyncio.sleep(0.001)
            # gorgond holds the request; no token can come. The loop runs
            # other work meanwhile, and no pass over the streams runs for
            # nothing (it waits for the fd, it does not poll).
            await asyncio.sleep(0.01)
            settled = pumps
            ticks = 0
            for _ in range(100):
                await asyncio.sleep(0.001)
                ticks += 1
            self.assertEqual(ticks, 100)
            self.assertFalse(task.done())
            self.assertEqual(pumps, settled, "the client polled while nothing came")
            self.assertFalse(g.usage)
            frozen.__exit__(None, None, None)  # the worker goes on: the fd wakes us
            text = await task
            self.assertGreater(pumps, settled, "woken without a pass over the streams?")
            return text

        async def outer():
            async with gorgon.AsyncClient(_support.socket_path()) as c:
                pump = c._pump

                def counting_pump():
                    nonlocal pumps
                    pumps += 1
                    pump()

                c._pump = counting_pump  # before add_reader takes it
                # take the fd before the worker stops
                await self.collect(c.generate("x", max_tokens=1))
                frozen = _support.FrozenWorker().__enter__()
                try:
                    return await main(c, frozen)
                finally:
                    frozen.__exit__(None, None, None)

        text = self.run_async(outer())
        self.assertEqual("Lily and Tom" + text + "\n", _support.read_golden(LILY))

    def test_cancelling_the_task_cancels_the_request(self):
        async def main():
            async with gorgon.AsyncClient(_support.socket_path()) as c:
                await self.collect(c.generate("x", max_tokens=1))
                with _support.FrozenWorker():
                    before = self.sync.stats().gen_requests_total
                    g = c.generate("Once upon a time", max_tokens=200)
                    task = asyncio.ensure_future(self.collect(g))
                    while self.sync.stats().gen_requests_total == before:
                        await asyncio.sleep(0.001)
                    await asyncio.sleep(0.005)  # the task waits in __anext__
                    task.cancel()
                    with self.assertRaises(asyncio.CancelledError):
                        await task
                    # gorgond ends it at once, worker stopped or not
                    while g.usage is None:
                        await asyncio.sleep(0.001)
                    self.assertEqual(g.finish_reason, "cancelled")
                    self.assertEqual(c.client.inflight, 0)
                # and the client goes on
                return await c.complete("Lily and Tom", max_tokens=60)

        r = self.run_async(main())
        self.assertEqual("Lily and Tom" + r + "\n", _support.read_golden(LILY))
        _support.wait_until(lambda: _support.idle(self.sync), what="gorgond idle")

    def test_cancel_and_break(self):
        async def main():
            async with gorgon.AsyncClient(_support.socket_path()) as c:
                g = c.generate("Once upon a time", max_tokens=400)
                async for _ in g:
                    break
                await g.cancel()
                self.assertEqual(g.finish_reason, "cancelled")
                # dropped mid-stream, many times over the client's slots
                for _ in range(80):
                    g = c.generate("Once upon a time", max_tokens=200)
                    async for _ in g:
                        break
                    del g
                return await c.complete("Lily and Tom", max_tokens=60)

        r = self.run_async(main())
        self.assertEqual("Lily and Tom" + r + "\n", _support.read_golden(LILY))
        _support.wait_until(lambda: _support.idle(self.sync), what="gorgond idle")

    def test_errors(self):
        async def main():
            async with gorgon.AsyncClient(_support.socket_path()) as c:
                with self.assertRaises(gorgon.GorgonError) as cm:
                    c.generate("x", top_p=2)
                self.assertEqual(cm.exception.errno, errno.EINVAL)
                self.assertIn("top_p", cm.exception.message)
                with self.assertRaises(gorgon.GorgonError) as cm:
                    await c.complete("x", max_tokens=0)
                self.assertIn("max_tokens", cm.exception.message)
                g = c.generate("x", top_k=100000)
                with self.assertRaises(gorgon.GorgonError) as cm:
                    await self.collect(g)
                self.assertIn("top_k 100000", cm.exception.message)
                self.assertEqual(g.finish_reason, "error")
                g = c.generate("Once upon a time", max_tokens=100)
            # closed under a running stream: it fails, naming why
            with self.assertRaises(gorgon.GorgonError) as cm:
                await self.collect(g)
            self.assertEqual(cm.exception.errno, errno.EBADF)

        self.run_async(main())

    def test_round_trips_while_streaming(self):
        async def main():
            async with gorgon.AsyncClient(_support.socket_path()) as c:
                g = c.generate("Once upon a time", max_tokens=200)
                first = await g.__anext__()
                mi = await c.model_info()
                ids = await c.tokenize("Lily and Tom", add_bos=True)
                text = await c.detokenize(ids)
                st = await c.stats()
                rtt = await c.ping()
                rest = await self.collect(g)
                return first + rest, mi, ids, text, st, rtt

        full, mi, ids, text, st, rtt = self.run_async(main())
        self.assertEqual(full, self.sync.complete("Once upon a time", max_tokens=200))
        self.assertEqual(mi.n_vocab, 512)
        self.assertEqual(ids, self.sync.tokenize("Lily and Tom", add_bos=True))
        self.assertEqual(text, "Lily and Tom")
        self.assertGreaterEqual(st.gen_requests_total, 1)
        self.assertGreater(rtt, 0)


if __name__ == "__main__":
    unittest.main()
