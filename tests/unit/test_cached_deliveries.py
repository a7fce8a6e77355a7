"""`Broker._cached_deliveries` and the core's `recent` messages: a plain message just published is delivered
without its record being read or decoded, and reads exactly as the decoded record would; deliveries of one message
to several queues (fan-out) share one `Message`; what is neither kept nor in the store's cache gives up (None) and
is read from disk instead, with the same deliveries. `RecentMessages` stays bounded whatever the traffic."""

from __future__ import annotations

import pytest

from chute import Broker, Publish
from chute.core.recent import RecentMessages
from chute.model import Message
from chute.storage import MemoryStore


class _Evicting(MemoryStore):
    """A store whose cache has lost the bodies of `evicted` refs (they are still read from "disk")."""

    def __init__(self) -> None:
        super().__init__()
        self.evicted: set[int] = set()
        self.cached_reads = 0

    def read_cached(self, ref: int) -> bytes | None:
        self.cached_reads += 1
        return None if ref in self.evicted else super().read_cached(ref)


async def _broker(clock, store) -> Broker:
    broker = Broker(store=store, clock=clock, auto_tick=False)
    await broker.start()
    return broker


async def test_fan_out_shares_messages_and_a_body_out_of_cache_is_read(clock):
    store = _Evicting()
    broker = await _broker(clock, store)
    try:
        await broker.create_topic("t")
        for name in ("a", "b"):
            await broker.create_queue(name)
            await broker.subscribe("t", ">", name)
        ids = [await broker.publish("t", b"m%d" % i, headers={"i": str(i)}) for i in range(3)]
        core, now = broker.core, clock()
        leased = {name: core.receive(name, 3, now) for name in ("a", "b")}
        first = broker._cached_deliveries("a", leased["a"])
        assert [(d.queue, d.id, d.body, d.headers) for d in first] == [
            ("a", ids[i], b"m%d" % i, {"i": str(i)}) for i in range(3)
        ]
        store.evicted = {e.ref for e in leased["b"]}  # decoded for "a" already: no body needed
        second = broker._cached_deliveries("b", leased["b"])
        assert [d.message for d in second] == [d.message for d in first]
        assert all(x.message is y.message for x, y in zip(first, second, strict=True))
        assert [d.receipt for d in second] == [e.receipt for e in leased["b"]]

        core.recent.clear()  # forgotten, and the second body left the cache
        store.evicted = {leased["b"][1].ref}
        assert broker._cached_deliveries("b", leased["b"]) is None
        read = await broker._read_deliveries("b", leased["b"])
        assert [(d.queue, d.receipt, d.message) for d in read] == [(d.queue, d.receipt, d.message) for d in second]
    finally:
        await broker.close()


@pytest.mark.parametrize("path", ["publish", "publish_many", "fan-out"])
async def test_a_plain_message_just_published_is_delivered_as_its_record_reads(clock, path):
    store = _Evicting()
    broker = await _broker(clock, store)
    try:
        await broker.create_queue("q")
        bodies = [b"body %d" % i for i in range(5)]
        if path == "publish":
            ids = await broker.publish_batch("q", [Publish(body=body) for body in bodies])
        elif path == "publish_many":
            await broker.create_queue("other")
            outcome = await broker.publish_many([("q", [Publish(body=bodies[0])]), ("other", [Publish(body=b"x")]),
                                                 ("q", [Publish(body=body) for body in bodies[1:]])])  # fmt: skip
            ids = outcome[0] + outcome[2]
        else:
            await broker.create_topic("t")
            await broker.subscribe("t", ">", "q")
            ids = await broker.publish_batch("t", [Publish(body=body) for body in bodies])
        leased = broker.core.receive("q", 10, clock())
        reads = store.cached_reads
        kept = broker._cached_deliveries("q", leased)
        assert store.cached_reads == reads  # nothing read, nothing decoded
        assert [(d.id, d.body) for d in kept] == list(zip(ids, bodies, strict=True))

        broker.core.recent.clear()
        decoded = broker._cached_deliveries("q", leased)
        assert store.cached_reads == reads + len(bodies)
        assert [d.message for d in kept] == [d.message for d in decoded]  # every field, publish time included
    finally:
        await broker.close()


async def test_messages_that_differ_between_queues_are_not_kept(clock):
    broker = await _broker(clock, MemoryStore())
    try:
        await broker.create_topic("t")
        await broker.create_queue("short", retention_s=60)
        await broker.create_queue("long")
        for name in ("short", "long"):
            await broker.subscribe("t", ">", name)
        await broker.publish("t", b"m")
        broker.core.recent.clear()
        now = clock()
        short = broker._cached_deliveries("short", broker.core.receive("short", 1, now))
        long = broker._cached_deliveries("long", broker.core.receive("long", 1, now))
        assert short[0].message.expires_at == pytest.approx(now + 60, abs=0.01)
        assert long[0].message.expires_at is None
        assert len(broker.core.recent) == 0
    finally:
        await broker.close()


def test_recent_messages_are_bounded_by_count_and_bytes():
    recent = RecentMessages(max_count=100, max_bytes=10_000)
    for ref in range(1, 10_001):
        recent.used = True  # deliveries are served from it
        recent.put(ref, Message(id=ref, body=b"x" * 10, headers={}, publish_time=0.0))
        assert len(recent) <= 200
    assert recent.get(10_000) is not None and recent.get(9_801) is not None and recent.get(9_800) is None

    recent.clear()
    for ref in range(0, 1000, 10):  # batches of 10 messages of 1,000 bytes: the bytes bound turns first
        recent.used = True
        recent.put_many(range(ref, ref + 10), [Message(id=i, body=b"y" * 1000, headers={}, publish_time=0.0)
                                               for i in range(10)], 10_000)  # fmt: skip
        assert recent.new_bytes <= 10_000 and len(recent) <= 20
    recent.used = True
    recent.put_many(range(5000, 5200), [Message(id=i, body=b"", headers={}, publish_time=0.0) for i in range(200)], 0)
    assert recent.get(5000) is None and len(recent.new) == 0  # larger than a generation: not kept


def test_recent_messages_nobody_reads_are_not_kept():
    recent = RecentMessages(max_count=100, max_bytes=10_000)
    for ref in range(1, 1001):  # a backlog building up: no delivery served from here
        recent.put(ref, Message(id=ref, body=b"x" * 10, headers={}, publish_time=0.0))
        assert len(recent) <= 100
    assert len(recent) == 0  # the first generation filled unused: dropped, and nothing kept since
    recent.used = True  # a consumer looks again
    recent.put_many([1001, 1002], [Message(id=i, body=b"z", headers={}, publish_time=0.0) for i in (1, 2)], 2)
    assert recent.get(1001) is not None and recent.get(1002) is not None


def test_smaller_limits_take_effect_at_once_and_larger_ones_keep_what_is_there():
    """A cluster node resizes its shards' recent messages as shards come and go (cluster/node.py)."""
    recent = RecentMessages(max_count=100, max_bytes=10_000)
    for ref in range(1, 151):
        recent.used = True
        recent.put(ref, Message(id=ref, body=b"x" * 10, headers={}, publish_time=0.0))
    assert len(recent) == 150  # two generations
    recent.resize(200, 20_000)  # larger: nothing dropped
    assert len(recent) == 150 and recent.get(150) is not None
    recent.resize(10, 1_000)  # smaller: within the new bound from now on
    assert len(recent) == 0
    for ref in range(151, 200):
        recent.used = True
        recent.put(ref, Message(id=ref, body=b"x" * 10, headers={}, publish_time=0.0))
        assert len(recent) <= 20


async def test_a_backlog_nobody_consumes_is_not_kept(clock):
    broker = await _broker(clock, MemoryStore())
    try:
        await broker.create_queue("q")
        for _ in range(5):  # more than a generation, nothing delivered meanwhile
            await broker.publish_batch("q", [Publish(body=b"x" * 10) for _ in range(1000)])
        assert len(broker.core.recent) == 0
        leased = broker.core.receive("q", 1, clock())
        assert broker._cached_deliveries("q", leased)[0].body == b"x" * 10  # a delivery looks again
        await broker.publish_batch("q", [Publish(body=b"new")])
        assert len(broker.core.recent) == 2  # the decoded one and the new one
    finally:
        await broker.close()
