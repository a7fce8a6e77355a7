"""500 AMQP connections at once (aio-pika), each publishing with confirms: every publish lands, and closing
them all leaves the server with no AMQP connection."""

from __future__ import annotations

import asyncio
import os
import resource

import aio_pika
import pytest

from chute.testing import serving

pytestmark = pytest.mark.timeout(120)
CONNECTIONS = int(os.environ.get("CHUTE_AMQP_CONNECTIONS", "500"))


async def test_many_concurrent_connections():
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2 * CONNECTIONS + 200:  # both ends live in this process
        pytest.skip(f"needs {2 * CONNECTIONS + 200} file descriptors, the limit is {soft}")
    async with serving() as server:
        async with await aio_pika.connect(server.amqp_url) as setup:
            await (await setup.channel()).declare_queue("many")
        gate = asyncio.Semaphore(50)  # connect 50 at a time; all stay open together

        async def open_one() -> aio_pika.abc.AbstractConnection:
            async with gate:
                return await aio_pika.connect(server.amqp_url)

        connections = await asyncio.gather(*(open_one() for _ in range(CONNECTIONS)))
        try:
            assert len(server.server.amqp.sessions) == CONNECTIONS
            channels = await asyncio.gather(*(c.channel(publisher_confirms=True) for c in connections))
            await asyncio.gather(*(ch.default_exchange.publish(aio_pika.Message(str(i).encode()), routing_key="many")
                                   for i, ch in enumerate(channels)))  # fmt: skip
            assert server.server.broker.queue_stats("many").ready == CONNECTIONS
        finally:
            closed = await asyncio.gather(*(c.close() for c in connections), return_exceptions=True)
        # a close that failed would leave its socket to the garbage collector, and the test would fail later
        # with nothing but an unclosed-socket warning: name the failure instead
        failed = [result for result in closed if isinstance(result, BaseException)]
        assert not failed, f"{len(failed)} of {len(closed)} connections failed to close: {failed[0]!r}"
        for _ in range(500):
            if not server.server.amqp.sessions:
                break
            await asyncio.sleep(0.01)
        assert not server.server.amqp.sessions
