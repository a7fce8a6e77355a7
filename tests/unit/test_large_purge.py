"""Purges and deletes of large queues go in steps (no stall), and remove what a purge or delete promises.

A purge of a queue with more than `PURGE_STEP` messages removes them in steps of one turn of the event loop each;
every message published before the call is gone (in-flight ones stay, unless `in_flight=True`: SQS's PurgeQueue),
and the result survives a restart, small or large. A publish still being made durable while a queue is purged
survives the purge, and a restart. A deleted large queue gives its messages' space back in the background.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from chute import Publish
from chute.core.admin import PURGE_STEP
from chute.errors import InvalidArgument, InvalidReceipt, QueueNotFound
from tests.held_fsync import HeldFsync
from tests.processes import without_checkpoint

pytestmark = pytest.mark.timeout(90)

BIG = 2 * PURGE_STEP + 1234


async def _fill(broker, name: str, count: int, **options) -> None:
    for start in range(0, count, 5000):
        await broker.publish_batch(name, [Publish(body=b"m", **options) for _ in range(min(5000, count - start))])


async def test_large_purge_removes_everything_but_in_flight_and_survives_restart(broker, clock, reopen):
    await broker.create_queue("q", fifo=True)
    await _fill(broker, "q", BIG)
    await broker.publish_batch("q", [Publish(body=b"late", delay_s=60) for _ in range(10)])
    await broker.publish_batch("q", [Publish(body=b"g", group="a") for _ in range(50)])  # 49 wait behind a head
    held = await broker.receive("q", 3)
    assert await broker.purge_queue("q") == BIG + 10 + 50 - 3
    stats = broker.queue_stats("q")
    assert (stats.ready, stats.delayed, stats.in_flight) == (0, 0, 3)
    assert broker.core.queue("q").bytes == sum(len(d.body) for d in held)
    broker = await reopen(broker)
    clock.advance(120)
    broker.tick()
    left = await broker.receive("q", 100)
    assert sorted(d.id for d in left) == sorted(d.id for d in held)  # only the in-flight ones came back
    await broker.close()


@pytest.mark.parametrize("size", ["small", "large"])
async def test_purge_with_in_flight_removes_every_message_for_good(broker, clock, reopen, size):
    await broker.create_queue("q", fifo=True)
    count = 20 if size == "small" else BIG
    await _fill(broker, "q", count)
    await broker.publish_batch("q", [Publish(body=b"late", delay_s=60) for _ in range(10)])
    await broker.publish_batch("q", [Publish(body=b"g", group="a") for _ in range(50)])  # 49 wait behind a head
    held = await broker.receive("q", 3, lease_s=30)
    assert await broker.purge_queue("q", in_flight=True) == count + 10 + 50
    stats = broker.queue_stats("q")
    assert (stats.ready, stats.delayed, stats.in_flight, stats.bytes) == (0, 0, 0, 0)
    with pytest.raises(InvalidReceipt):  # the purged deliveries' receipts name nothing now
        await broker.ack("q", [d.receipt for d in held])
    with pytest.raises(InvalidReceipt):
        await broker.nack("q", [held[0].receipt])
    assert broker.core.index_sizes()["in_flight"] == 0
    clock.advance(120)  # past the leases and the delays
    broker.tick()
    assert await broker.receive("q", 100) == []
    await broker.publish("q", b"after", group="a")  # group "a" is not stuck behind its purged head
    [after] = await broker.receive("q", 10)
    assert after.body == b"after"
    broker = await reopen(without_checkpoint(broker))  # leases do not survive a restart: the purged in-flight
    clock.advance(120)  # ones must not come back when the log is replayed
    broker.tick()
    assert [d.body for d in await broker.receive("q", 100)] == [b"after"]
    await broker.close()


async def test_purge_in_flight_must_be_a_boolean(broker):
    await broker.create_queue("q")
    await broker.publish("q", b"x")
    with pytest.raises(InvalidArgument):
        await broker.purge_queue("q", in_flight="yes")
    assert broker.queue_stats("q").ready == 1


async def test_a_publish_being_made_durable_during_a_purge_survives_it_and_a_restart(broker, store_kind, reopen):
    if store_kind != "file":
        pytest.skip("only the file store makes a publish wait for an fsync")
    await broker.create_queue("q")
    await broker.publish("q", b"before")
    gate = HeldFsync(SimpleNamespace(server=SimpleNamespace(broker=broker)))
    gate.hold()
    publish = asyncio.ensure_future(broker.publish("q", b"during"))
    for _ in range(100):
        if broker.core.pending_plans:
            break
        await asyncio.sleep(0)
    assert broker.core.pending_plans and not publish.done()  # written, waiting for its fsync
    purge = asyncio.ensure_future(broker.purge_queue("q", in_flight=True))
    await asyncio.sleep(0)
    gate.release()
    assert await purge == 1  # "before"; "during" was not in the queue yet
    await publish
    assert [d.body for d in await broker.peek("q")] == [b"during"]
    broker = await reopen(without_checkpoint(broker))
    assert [d.body for d in await broker.peek("q")] == [b"during"]  # the PURGE record spared it on replay too
    await broker.close()


async def test_publishes_during_a_large_purge_are_kept_or_removed_never_half(broker):
    await broker.create_queue("q")
    await _fill(broker, "q", BIG)
    purge = asyncio.ensure_future(broker.purge_queue("q"))
    await asyncio.sleep(0)  # the purge has taken its first step; the loop is free between steps
    assert not purge.done()
    await broker.publish("q", b"during")
    removed = await purge
    stats = broker.queue_stats("q")
    assert removed + stats.ready == BIG + 1  # every message before the call went; the new one went or stayed
    assert removed >= BIG


async def test_large_purge_of_a_deleted_queue_stops(broker):
    await broker.create_queue("q")
    await _fill(broker, "q", BIG)
    purge = asyncio.ensure_future(broker.purge_queue("q"))
    await asyncio.sleep(0)
    await broker.delete_queue("q")
    with pytest.raises(QueueNotFound):
        await purge


async def test_deleting_a_large_queue_gives_its_space_back(broker, store_kind):
    await broker.create_queue("q")
    await _fill(broker, "q", BIG)
    held = await broker.receive("q", 10)
    assert held
    await broker.delete_queue("q")
    assert "q" not in [q.name for q in broker.list_queues()]
    for _ in range(100):
        if not broker.core.detached:
            break
        await asyncio.sleep(0.01)
    assert not broker.core.detached
    await broker.checkpoint()
    if store_kind == "file":
        assert all(info[2] == 0 for info in broker.store._segments.values())  # no live reference is left
    else:
        assert not broker.store._live
    await broker.create_queue("q")  # the name is free again, and empty
    assert broker.queue_stats("q").ready == 0


async def test_large_redrive_goes_in_steps_and_moves_everything(broker, reopen):
    await broker.create_queue("dlq")
    await broker.create_queue("q", dead_letter_queue="dlq", max_deliveries=1)
    count = PURGE_STEP * 2 + 77
    await _fill(broker, "q", count)
    while deliveries := await broker.receive("q", 5000):
        await broker.nack("q", [d.receipt for d in deliveries])  # the first delivery was the last: dead-lettered
    assert broker.queue_stats("dlq").ready == count
    redrive = asyncio.ensure_future(broker.redrive("dlq"))
    await asyncio.sleep(0)
    assert not redrive.done()  # the loop is free between steps
    assert await redrive == count
    assert (broker.queue_stats("dlq").ready, broker.queue_stats("q").ready) == (0, count)
    assert await broker.redrive("dlq", 10) == 0
    broker = await reopen(broker)
    assert (broker.queue_stats("dlq").ready, broker.queue_stats("q").ready) == (0, count)
    await broker.close()
