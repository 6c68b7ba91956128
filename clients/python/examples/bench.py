"""Throughput and latency of the Python package against a running gorgond.

    PYTHONPATH=clients/python python3 clients/python/examples/bench.py [--socket PATH]
        [--tokens 256] [--runs 20] [--streams 8]

Prints: ping round trip (median of 2000), one blocking stream's tokens/s
(median over runs), and N concurrent AsyncClient streams' aggregate tokens/s.
"""

import argparse
import asyncio
import statistics
import time

import gorgon


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--streams", type=int, default=8)
    a = ap.parse_args()

    with gorgon.Client(a.socket) as c:
        rtts = sorted(c.ping() for _ in range(2000))
        print("ping: median %.1f us, p99 %.1f us" % (rtts[1000] * 1e6, rtts[1980] * 1e6))
        rates, chunks = [], 0
        for _ in range(a.runs):
            t0 = time.perf_counter()
            g = c.generate("Once upon a time", max_tokens=a.tokens, temperature=0.8, seed=1)
            for _ in g:
                chunks += 1
            dt = time.perf_counter() - t0
            rates.append(g.usage.completion_tokens / dt)
        print("blocking stream: %.0f tokens/s (median of %d runs of %d tokens, %.1f chunks/run)"
              % (statistics.median(rates), a.runs, a.tokens, chunks / a.runs))

    async def streams():
        async with gorgon.AsyncClient(a.socket) as c:
            async def one(i):
                g = c.generate("Once upon a time", max_tokens=a.tokens, temperature=0.8, seed=i + 1)
                async for _ in g:
                    pass
                return g.usage.completion_tokens

            await one(0)  # event fd set up
            t0 = time.perf_counter()
            n = await asyncio.gather(*(one(i) for i in range(a.streams)))
            return sum(n), time.perf_counter() - t0

    tokens, dt = asyncio.run(streams())
    print("asyncio: %d streams, %d tokens in %.3f s: %.0f tokens/s" % (a.streams, tokens, dt,
                                                                        tokens / dt))


if __name__ == "__main__":
    main()
