"""Broker.publish_many: several destinations in one step, each stored or refused on its own, one frame on disk."""

from __future__ import annotations

from chute import Broker, Publish
from chute.errors import QueueFull, QueueNotFound, StorageFailed
from chute.storage import FileStore
from chute.storage.file.record import SEGMENT_HEADER_SIZE, decode_batch


async def test_groups_are_stored_or_refused_on_their_own(broker):
    await broker.create_queue("a")
    await broker.create_queue("b")
    out = await broker.publish_many([
        ("a", [Publish(body=b"a1"), Publish(body=b"a2")]),
        ("nowhere", [Publish(body=b"x")]),
        ("b", [Publish(body=b"b1")]),
    ])  # fmt: skip
    assert isinstance(out[1], QueueNotFound)
    assert len(out[0]) == 2 and len(out[2]) == 1
    assert [d.body for d in await broker.receive("a", 10)] == [b"a1", b"a2"]
    assert [d.body for d in await broker.receive("b", 10)] == [b"b1"]


async def test_every_group_shares_one_frame_of_the_log(tmp_path, clock):
    broker = await Broker(store=FileStore(tmp_path), clock=clock, auto_tick=False).start()
    try:
        for i in range(20):
            await broker.create_queue(f"q{i}")
        await broker.store.flush()
        (segment,) = tmp_path.glob("*.seg")
        before = broker.store.stats().bytes_on_disk  # where the log ends (the file has space reserved after it)
        await broker.publish_many([(f"q{i}", [Publish(body=b"m%d" % i)]) for i in range(20)])
        records, end = decode_batch(segment.read_bytes(), before)
        assert len(records) == 20 and end == broker.store.stats().bytes_on_disk  # one frame, one crc, for twenty
        assert before > SEGMENT_HEADER_SIZE
    finally:
        await broker.close()


async def test_a_store_failure_fails_every_group(tmp_path, clock):
    from chute.storage import MemoryFs

    fs = MemoryFs()
    broker = await Broker(store=FileStore(tmp_path, fs=fs), clock=clock, auto_tick=False).start()
    try:
        await broker.create_queue("a")
        await broker.create_queue("b")
        fs.fail("fsync", 5)
        out = await broker.publish_many([("a", [Publish(body=b"1")]), ("b", [Publish(body=b"2")])])
        assert all(isinstance(result, StorageFailed) for result in out)
        assert await broker.receive("a", 10) == [] and await broker.receive("b", 10) == []
    finally:
        await broker.close()


async def test_plain_and_other_groups_mixed_keep_order_limits_and_survive_a_restart(tmp_path, clock):
    """Plain groups (bodies only, to ordinary queues) share one plan; groups with options, to a queue with a
    default delay, or over a limit go the full way. Each is stored or refused on its own, a queue named twice
    keeps publish order, and everything replays from the log."""
    broker = await Broker(store=FileStore(tmp_path), clock=clock, auto_tick=False).start()
    try:
        await broker.create_queue("a")
        await broker.create_queue("b")
        await broker.create_queue("small", max_length=2)
        await broker.create_queue("later", delay_s=5)
        out = await broker.publish_many([
            ("a", [Publish(body=b"a1")]),
            ("b", [Publish(body=b"b1", priority=3)]),  # an option: the full path, between two plain runs
            ("a", [Publish(body=b"a2"), Publish(body=b"a3")]),
            ("small", [Publish(body=b"s1"), Publish(body=b"s2")]),
            ("small", [Publish(body=b"s3")]),  # no room after the group before: refused alone
            ("later", [Publish(body=b"l1")]),  # the queue's default delay: the full path
            ("b", [Publish(body=b"b2")]),
        ])  # fmt: skip
        assert isinstance(out[4], QueueFull)
        ids = [i for result in out if not isinstance(result, Exception) for i in result]
        assert len(ids) == 8 and ids == sorted(ids)  # one id per stored message, in publish order
        assert [d.body for d in await broker.receive("a", 10)] == [b"a1", b"a2", b"a3"]
        assert [d.body for d in await broker.receive("b", 10)] == [b"b1", b"b2"]  # priority 3 first
        assert broker.queue_stats("small").ready == 2
        assert broker.queue_stats("later").delayed == 1
    finally:
        await broker.close()
    broker = await Broker(store=FileStore(tmp_path), clock=clock, auto_tick=False).start()
    try:
        assert broker.queue_stats("a").ready == 3  # leased, not acked, before the restart
        assert [d.body for d in await broker.receive("small", 10)] == [b"s1", b"s2"]
        clock.advance(6)
        broker.tick()
        assert [d.body for d in await broker.receive("later", 10)] == [b"l1"]
    finally:
        await broker.close()
