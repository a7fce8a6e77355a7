"""Measure one GET /metrics of a server with many queues: `python -m tests.metrics.measure_scrape [queues]`.

Prints the time spent reading the broker on the event loop, rendering (ours and prometheus_client's generic
renderer for the same families), the HTTP scrape with and without gzip, the bytes sent, and the longest the
event loop went without running while a scrape was answered. Figures are in docs/metrics.md.
"""

from __future__ import annotations

import asyncio
import gzip
import statistics
import sys
import time

import aiohttp
from prometheus_client.exposition import generate_latest

from chute.server import metrics
from chute.testing import serving

SCRAPES = 5


async def loop_stall_during(coroutine) -> float:
    """The longest gap between two turns of a 1 ms ticker while `coroutine` runs (seconds)."""
    longest = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal longest
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            longest, last = max(longest, now - last), now

    task = asyncio.create_task(ticker())
    try:
        await coroutine
    finally:
        done.set()
        await task
    return longest


async def main(queues: int) -> None:
    async with serving() as server:
        broker = server.server.broker
        started = time.perf_counter()
        for i in range(queues):
            await broker.create_queue(f"queue-{i:05d}")
        for i in range(0, queues, 10):
            await broker.publish(f"queue-{i:05d}", b"x" * 100)
        print(f"{queues} queues made in {time.perf_counter() - started:.1f} s")

        collector = metrics.BrokerCollector(server.server)
        started = time.perf_counter()
        families, tables = list(collector.server_families()), collector.tables()
        read_s = time.perf_counter() - started
        started = time.perf_counter()
        body, _ = metrics.render(families, tables)
        render_s = time.perf_counter() - started
        started = time.perf_counter()
        zipped = gzip.compress(body, metrics.GZIP_LEVEL)
        gzip_s = time.perf_counter() - started
        started = time.perf_counter()
        generic = generate_latest(metrics._Frozen(collector.collect()))
        generic_s = time.perf_counter() - started
        print(f"read on the loop {read_s * 1000:.0f} ms; render {render_s * 1000:.0f} ms "
              f"(prometheus_client's generic renderer: {generic_s * 1000:.0f} ms for {len(generic) / 1e6:.2f} MB); "
              f"gzip {gzip_s * 1000:.0f} ms; {len(body) / 1e6:.2f} MB, gzipped {len(zipped) / 1e6:.2f} MB")  # fmt: skip

        url = f"http://127.0.0.1:{server.http_port}/metrics"
        async with aiohttp.ClientSession(auto_decompress=False) as http:

            async def get(encoding: str) -> int:
                async with http.get(url, headers={"Accept-Encoding": encoding}) as response:
                    return len(await response.read())

            for encoding in ("identity", "gzip"):
                times, stalls = [], []
                for _ in range(SCRAPES):
                    started = time.perf_counter()
                    stalls.append(await loop_stall_during(get(encoding)))
                    times.append(time.perf_counter() - started)
                size = await get(encoding)
                print(f"GET /metrics ({encoding}): median {statistics.median(times) * 1000:.0f} ms, "
                      f"best {min(times) * 1000:.0f} ms, {size / 1e6:.2f} MB sent; longest loop stall "
                      f"median {statistics.median(stalls) * 1000:.0f} ms")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000))
