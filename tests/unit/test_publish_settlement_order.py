"""Publishes waiting for the same group commit are placed in the order they were made, whichever way they came
(`Broker._publish`, settled together by one callback, or `publish_many`), so a queue delivers them in publish
order; and each `_publish` caller is told (`then`) only after its messages are placed."""

from __future__ import annotations

import asyncio
import threading

import pytest

from chute import Broker, Publish
from chute.storage import FileStore

pytestmark = pytest.mark.timeout(30)


async def _until(condition) -> None:
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("timed out")


async def test_publishes_sharing_a_commit_are_placed_in_the_order_they_were_made(tmp_path):
    broker = await Broker(store=FileStore(tmp_path, fsync_policy="always")).start()
    gate = threading.Event()
    gate.set()
    fs = broker.store.fs
    real = fs._fsync
    fs._fsync = lambda path: (gate.wait(10), real(path))[1]  # the writer waits in fsync until the gate opens
    try:
        await broker.create_queue("q")  # (waits for its own commit: the gate is open)
        gate.clear()
        held = asyncio.ensure_future(broker.publish("q", b"held"))  # its commit waits in fsync
        await _until(lambda: broker.store._flusher is not None and not broker.store._pending)
        told: list[tuple[bytes, int]] = []

        def then(body: bytes):
            # told after its messages are placed: the queue already counts them as ready
            return lambda ids, error: told.append((body, broker.queue_stats("q").ready))

        broker._publish("q", [Publish(body=b"a")], then(b"a"))  # the next commit: settled by one callback...
        appended = broker.store.bytes_appended
        many = asyncio.ensure_future(broker.publish_many([("q", [Publish(body=b"b")])]))
        await _until(lambda: broker.store.bytes_appended > appended)  # b is prepared, in the same commit
        broker._publish("q", [Publish(body=b"c")], then(b"c"))  # ... which must not place c before b
        broker._publish("q", [Publish(body=b"d")], then(b"d"))
        gate.set()
        await asyncio.gather(held, many)
        await _until(lambda: len(told) == 3)
        assert told == [(b"a", 2), (b"c", 5), (b"d", 5)]  # c and d settled together, after b
        deliveries = await broker.receive("q", 10)
        assert [d.body for d in deliveries] == [b"held", b"a", b"b", b"c", b"d"]
    finally:
        gate.set()
        await broker.close()
