"""PUBLISH requests settled together: the requests of many connections that share one group commit are answered,
and their messages delivered to push consumers, by one settlement of that commit (`Broker._settle_batch`), in
order and never before the fsync; a failed commit answers each of them with the store's error and delivers none."""

from __future__ import annotations

import asyncio
import errno

import pytest

import chute
from chute.errors import StorageFailed
from chute.testing import serving
from tests.held_fsync import HeldFsync

pytestmark = pytest.mark.timeout(60)

PRODUCERS = 4
PER_PRODUCER = 5


async def _until(condition, what: str) -> None:
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


async def test_publishes_of_many_connections_in_one_commit_are_confirmed_and_delivered_in_order():
    async with serving(fsync="always") as server, chute.AsyncClient(server.url) as consuming:
        await consuming.create_queue("q")
        consumer = await consuming.consume("q", prefetch=1000)
        producers = [await chute.AsyncClient(server.url).connect() for _ in range(PRODUCERS)]
        try:
            held = HeldFsync(server)
            await producers[0].publish("q", b"first")  # durable before the hold
            assert (await consumer.get(5)).body == b"first"
            held.hold()
            blocker = asyncio.ensure_future(consuming.publish("q", b"held"))  # its commit waits in fsync
            await _until(lambda: server.server.publish_bytes == 4, "the held commit")
            sends = [asyncio.ensure_future(producer.publish("q", f"{p}-{i}".encode()))
                     for i in range(PER_PRODUCER) for p, producer in enumerate(producers)]  # fmt: skip
            # every publish appended behind the held commit: the next group commit holds them all
            await _until(lambda: server.server.publish_bytes == 4 + 3 * len(sends), "every publish to be appended")
            assert not any(send.done() for send in sends)  # nothing is confirmed before its fsync
            assert await consumer.get(0.05) is None  # and nothing is delivered
            held.release()
            ids = await asyncio.gather(blocker, *sends)
            assert len(set(ids)) == len(ids)
            got = [await consumer.get(5) for _ in range(len(ids))]
            bodies = [d.body for d in got]
            assert bodies[0] == b"held"
            for p in range(PRODUCERS):  # each connection's messages in the order it published them
                mine = [b for b in bodies if b.startswith(f"{p}-".encode())]
                assert mine == [f"{p}-{i}".encode() for i in range(PER_PRODUCER)]
            await consuming.ack(got)
            assert server.server.publish_bytes == 0
        finally:
            for producer in producers:
                await producer.close()


async def test_a_failed_commit_answers_every_publish_in_it_with_the_error_and_delivers_none():
    async with serving(fsync="always") as server, chute.AsyncClient(server.url) as consuming:
        await consuming.create_queue("q")
        consumer = await consuming.consume("q", prefetch=1000)
        producers = [await chute.AsyncClient(server.url, reconnect=False).connect() for _ in range(PRODUCERS)]
        try:
            held = HeldFsync(server)
            held.hold()
            blocker = asyncio.ensure_future(consuming.publish("q", b"held"))  # its commit waits in fsync
            # in fsync, not only appended: a fault armed before its fsync began would fail it (seen under load)
            await _until(held.waiting.is_set, "the held commit's fsync")
            sends = [asyncio.ensure_future(producer.publish("q", f"{p}".encode()))
                     for p, producer in enumerate(producers)]  # fmt: skip
            await _until(lambda: server.server.publish_bytes == 4 + len(sends), "every publish to be appended")
            server.server.broker.store.fs.fail("fsync", errno.EIO)  # the next commit (theirs) fails its fsync
            held.release()
            assert await blocker  # the held commit was fsynced before the fault was armed: confirmed
            outcomes = await asyncio.gather(*sends, return_exceptions=True)
            assert all(isinstance(outcome, StorageFailed) for outcome in outcomes), outcomes
            assert (await consumer.get(5)).body == b"held"
            assert await consumer.get(0.1) is None  # none of the failed publishes is delivered
            assert server.server.publish_bytes == 0
        finally:
            for producer in producers:
                await producer.close()
