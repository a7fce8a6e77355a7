"""The packed ready line: plain backlogged messages kept as columns, not objects (core/queue.py `_Packed`).

What a user would notice if it went wrong: messages delivered out of order (packed ones mixed with returned,
prioritised or expiring ones), a purge, drop-oldest or peek that misses or repeats one, a restart that loses or
reorders the backlog, or memory that grows by an object per backlogged message again.
"""

from __future__ import annotations

import gc
import random
import tracemalloc

import pytest

from chute import Publish
from chute.core.queue import IN_FLIGHT, LINE_SLACK, PACKED, READY, Entry, Queue
from chute.model import QueueSettings

pytestmark = pytest.mark.timeout(120)


async def _ids(broker, name: str, count: int = 1000) -> list[int]:
    """Receive and ack everything ready; the message ids in delivery order."""
    seen = []
    while deliveries := await broker.receive(name, min(count, 100)):
        seen.extend(d.message.id for d in deliveries)
        await broker.ack(name, [d.receipt for d in deliveries])
    return seen


async def test_returned_messages_keep_their_place_among_packed_ones(broker):
    await broker.create_queue("q")
    ids = await broker.publish_batch("q", [Publish(body=b"m%d" % i) for i in range(10)])
    first = await broker.receive("q", 3)
    assert [d.message.id for d in first] == ids[:3]
    await broker.nack("q", [first[1].receipt])  # back in line, before every packed one
    await broker.ack("q", [first[0].receipt, first[2].receipt])
    urgent = await broker.publish_batch("q", [Publish(body=b"u", priority=5)])
    more = await broker.publish_batch("q", [Publish(body=b"late")])
    assert await _ids(broker, "q") == urgent + [ids[1]] + ids[3:] + more


async def test_expiring_and_plain_messages_are_delivered_in_publish_order(broker, clock):
    await broker.create_queue("dlq")
    await broker.create_queue("q", dead_letter_queue="dlq")
    plain = await broker.publish_batch("q", [Publish(body=b"p") for _ in range(3)])
    ttl = await broker.publish_batch("q", [Publish(body=b"t", ttl_s=5) for _ in range(3)])
    keep = await broker.publish_batch("q", [Publish(body=b"k", ttl_s=500) for _ in range(2)])
    tail = await broker.publish_batch("q", [Publish(body=b"p") for _ in range(3)])
    assert [d.message.id for d in await broker.peek("q", 20)] == plain + ttl + keep + tail
    clock.advance(10)
    broker.tick()
    assert await _ids(broker, "q") == plain + keep + tail
    assert await _ids(broker, "dlq") == ttl
    assert broker.queue_stats("q").ready == 0 and broker.core.queue("q").bytes == 0


async def test_peek_shows_packed_messages_without_taking_them(broker):
    await broker.create_queue("q")
    ids = await broker.publish_batch("q", [Publish(body=b"b%d" % i) for i in range(50)])
    peeked = await broker.peek("q", 5)
    assert [(d.message.id, d.body) for d in peeked] == [(i, b"b%d" % n) for n, i in enumerate(ids[:5])]
    assert broker.queue_stats("q").ready == 50
    assert await _ids(broker, "q") == ids


async def test_purge_and_drop_oldest_remove_packed_messages(broker):
    await broker.create_queue("dlq")
    await broker.create_queue("q", max_length=5, overflow="drop-oldest", dead_letter_queue="dlq")
    ids = await broker.publish_batch("q", [Publish(body=b"x") for _ in range(8)])
    assert broker.queue_stats("q").ready == 5
    assert [d.message.id for d in await broker.peek("q", 10)] == ids[3:]
    leased = await broker.receive("q", 1)
    assert await broker.purge_queue("q") == 4
    stats = broker.queue_stats("q")
    assert (stats.ready, stats.in_flight, broker.core.queue("q").bytes) == (0, 1, 1)
    await broker.ack("q", [leased[0].receipt])
    assert await _ids(broker, "dlq") == ids[:3]
    after = await broker.publish_batch("q", [Publish(body=b"y") for _ in range(2)])
    assert await _ids(broker, "q") == after


async def test_large_purge_in_steps_removes_every_packed_message(broker):
    await broker.create_queue("q")
    for _ in range(5):
        await broker.publish_batch("q", [Publish(body=b"z") for _ in range(1000)])
    assert await broker.purge_queue("q") == 5000
    assert broker.queue_stats("q").ready == 0
    assert broker.core.index_sizes()["ready_lines"] == 0
    assert await broker.receive("q", 10) == []


async def test_packed_backlog_survives_a_restart(broker, reopen, clock):
    await broker.create_queue("dlq")
    await broker.create_queue("q", dead_letter_queue="dlq")
    ids = await broker.publish_batch("q", [Publish(body=b"m%d" % i) for i in range(2000)])
    first = await broker.receive("q", 2)
    await broker.nack("q", [first[0].receipt])  # a delivery count: no longer plain
    await broker.ack("q", [first[1].receipt])
    prio = await broker.publish_batch("q", [Publish(body=b"hi", priority=3)])
    broker = await reopen(broker)
    queue = broker.core.queue("q")
    assert len(queue.levels[0].packed) == 1998  # the plain backlog came back as columns, not objects
    deliveries = await broker.receive("q", 3)
    assert [d.message.id for d in deliveries] == prio + [ids[0], ids[2]]
    assert [d.delivery_count for d in deliveries] == [1, 2, 1]
    await broker.ack("q", [d.receipt for d in deliveries])
    assert await _ids(broker, "q") == ids[3:]


async def test_replayed_records_reach_packed_messages(broker, reopen, store_kind):
    """Acks, deliveries and purges logged after a checkpoint of a packed backlog are replayed onto it."""
    if store_kind != "file":
        pytest.skip("needs a log replayed over a checkpoint")
    await broker.create_queue("q")
    await broker.create_queue("r")
    ids = await broker.publish_batch("q", [Publish(body=b"m%d" % i) for i in range(300)])
    await broker.publish_batch("r", [Publish(body=b"r") for _ in range(40)])
    await broker.store.checkpoint(broker.core.snapshot())
    got = await broker.receive("q", 3)
    await broker.ack("q", [got[0].receipt])  # REMOVE
    await broker.nack("q", [got[1].receipt])  # DELIVERED: its count must survive
    await broker.purge_queue("r")  # PURGE of packed messages
    broker.core.snapshot = lambda: None  # no checkpoint at close: recovery replays the records above
    broker.store.checkpoint = _no_checkpoint
    broker = await reopen(broker)
    deliveries = await broker.receive("q", 2)
    assert [(d.message.id, d.delivery_count) for d in deliveries] == [(ids[1], 2), (ids[2], 2)]  # both leased before
    assert broker.queue_stats("q").ready == 297
    assert broker.queue_stats("r").ready == 0


async def _no_checkpoint(snapshot) -> None:
    pass


def _entry(message_id: int, *, expires: float = 0.0) -> Entry:
    return Entry(message_id, message_id * 10, 7, 0, None, expires)


@pytest.mark.parametrize("stage", [3, 4096])
def test_pop_order_matches_a_model_under_random_operations(stage, monkeypatch):
    """Random adds (plain and not), pops, returns and removals from the middle: the queue always hands out the
    smallest ready id first, its counters match, and lazily removed slots stay bounded. With a tiny `STAGE`, new
    plain messages are packed into columns almost at once; with the default, most stay staged."""
    monkeypatch.setattr("chute.core.queue.STAGE", stage)
    rng = random.Random(12)
    queue = Queue(1, "q", QueueSettings())
    model: set[int] = set()
    out: dict[int, Entry] = {}
    next_id = 1
    for _ in range(8_000):
        op = rng.random()
        if op < 0.45:
            batch = [_entry(next_id + i, expires=0.0 if rng.random() < 0.8 else 1e12) for i in range(rng.randint(1, 5))]
            next_id += len(batch)
            queue.add_batch(batch, 0.0)
            model.update(e.id for e in batch)
        elif op < 0.7:
            taken = queue.pop_many(rng.randint(1, 4))
            assert [e.id for e in taken] == sorted(model)[: len(taken)]
            assert len(taken) == min(len(model), len(taken)) and (taken or not model)
            for entry in taken:
                assert entry.state == READY
                model.discard(entry.id)
                queue.lease(entry, entry.id)
                out[entry.id] = entry
        elif op < 0.85 and out:
            entry = out.pop(rng.choice(list(out)))
            queue.requeue(entry)
            model.add(entry.id)
        elif model:
            victim_id = rng.choice(sorted(model)[:50] if rng.random() < 0.5 else sorted(model)[-50:])
            view = next(e for e in queue.entries() if e.id == victim_id and e.state in (READY, PACKED))
            queue.remove(view)
            model.discard(victim_id)
        assert queue.ready == len(model)
        assert sum(len(level) for level in queue.levels.values()) <= 2 * queue.ready + LINE_SLACK + 5
    assert [e.id for e in queue.entries() if e.state in (READY, PACKED)] == sorted(model)


def test_a_backlog_costs_less_than_60_bytes_a_message_in_the_core():
    """100,000 plain messages backlogged in one queue (memory store, in process): what the core allocates for
    them, measured with tracemalloc, is under 60 bytes a message (an Entry object alone was 112). The memory
    store's copy of each record is not the core's: it is dropped before measuring."""
    import asyncio

    from chute import Broker
    from chute.storage.memory import MemoryStore

    count = 100_000

    async def fill() -> tuple[int, Broker]:
        broker = Broker(store=MemoryStore(), auto_tick=False)
        await broker.start()
        await broker.create_queue("q")
        await broker.publish_batch("q", [Publish(body=b"warm")])
        await _ids(broker, "q")
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        for _ in range(count // 1000):
            await broker.publish_batch("q", [Publish(body=b"x" * 16) for _ in range(1000)])
        broker.store._records.clear()  # the stored records (bodies, encoded in core/publishing.py) are the store's
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        core = [tracemalloc.Filter(True, "*/chute/core/*")]
        grown = sum(s.size_diff for s in after.filter_traces(core).compare_to(before.filter_traces(core), "filename"))
        return grown, broker

    async def run() -> int:
        grown, broker = await fill()
        try:
            assert broker.queue_stats("q").ready == count
        finally:
            await broker.close()
        return grown

    grown = asyncio.run(run())
    assert grown / count < 60, f"{grown / count:.1f} B a message"


def _rows_of(entries) -> list[tuple]:
    return sorted((e.id, e.ref, e.size, e.priority, e.group, e.expires, e.deliveries, e.dead) for e in entries)


@pytest.mark.parametrize("mix", ["plain", "some-not-plain", "mostly-not-plain", "two-priorities"])
def test_a_queue_image_round_trips_its_packed_and_other_entries(mix):
    """A snapshot writes packed messages from their columns with the other entries merged in by id, and recovery
    reads the plain ones back into columns: the same entries come back, in the same delivery order."""
    from chute.core import snapshot as snap

    rng = random.Random(mix)
    queue = Queue(1, "q", QueueSettings())
    batch = []
    for i in range(1, 3001):
        entry = Entry(i, i * 100, 10 + i % 7)
        if mix == "some-not-plain" and rng.random() < 0.02 or mix == "mostly-not-plain" and rng.random() < 0.9:
            entry.expires = 2e9 + i
            entry.deliveries = rng.randint(0, 3)
            entry.dead = (2, 9) if rng.random() < 0.3 else None
        if mix == "two-priorities" and rng.random() < 0.05:
            entry.priority = 4
        batch.append(entry)
    queue.add_batch(batch, 0.0)
    leased = queue.pop_many(5)  # in flight: in the image as entries (ready again after a restart)
    for k, entry in enumerate(leased):
        queue.lease(entry, k + 1)
    expected = _rows_of(queue.entries())

    columns = snap.queue_image(queue, []).entries
    copy = Queue(1, "q", QueueSettings())
    split = snap.split_plain(columns)
    if mix == "mostly-not-plain":
        assert split is None
        copy.add_batch(snap.decode_entries(columns), 0.0)
    else:
        assert split is not None and copy.load_packed(*split[0])
        copy.add_batch(split[1], 0.0)
        assert len(copy.levels[split[0][0]].packed) >= 2000  # the plain ones came back as columns
    assert _rows_of(copy.entries()) == [(i, r, s, p, g, x, d, dead) for i, r, s, p, g, x, d, dead in expected]
    assert copy.ready == len(expected) and copy.bytes == sum(row[2] for row in expected)
    # delivery order: priority, then id (the leased ones are ready again, in their place)
    assert [e.id for e in copy.pop_many(10_000)] == [i for _, i in sorted((-row[3], row[0]) for row in expected)]


def test_live_columns_skip_removed_slots_anywhere():
    """The columns a snapshot, a compaction scan or a queue delete reads leave out lazily removed messages,
    wherever they are (first, adjacent, last)."""
    queue = Queue(1, "q", QueueSettings())
    queue.add_batch([Entry(i, i * 10, 0xFFFFFF if i % 2 else i) for i in range(1, 10_001)], 0.0)
    removed = {2, 3, 4, 5000, 5001, 9999, 10_000}
    for view in [e for e in queue.entries() if e.id in removed]:
        queue.remove(view)
    [(priority, ids, refs, sizes)] = queue.packed_columns()
    kept = [i for i in range(1, 10_001) if i not in removed]
    assert (priority, list(ids), list(refs)) == (0, kept, [i * 10 for i in kept])
    assert list(sizes) == [0xFFFFFF if i % 2 else i for i in kept]
    assert sorted(queue.refs()) == [i * 10 for i in kept]
    assert queue.ready == len(kept)


@pytest.mark.parametrize("fifo", [False, True])
def test_remove_many_is_remove_of_each(fifo):
    """`Queue.remove_many` (an ack's batch: in-flight entries of a queue without groups in one loop) leaves the
    queue as `remove` of each entry would: in flight, ready, packed views, entries gone already, FIFO groups."""

    def build() -> tuple[Queue, list[Entry]]:
        queue = Queue(1, "q", QueueSettings(fifo=fifo))
        queue.add_batch([Entry(i, i * 10, 10 + i, 0, "g" if fifo and i % 3 == 0 else None) for i in range(1, 41)],
                        0.0)  # fmt: skip
        leased = queue.pop_many(12)
        for receipt, entry in enumerate(leased, 100):
            queue.lease(entry, receipt)
        ready = [e for e in queue.entries() if e.state != IN_FLIGHT][:5]  # views of packed ones, or entries
        gone = leased[0]
        queue.remove(gone)
        return queue, leased[1:8] + ready + [gone] + leased[8:]

    one_by_one, entries = build()
    for entry in entries:
        one_by_one.remove(entry)
    batched, same = build()
    batched.remove_many(same)

    def counters(queue: Queue) -> tuple:
        return queue.ready, queue.waiting, len(queue.in_flight), queue.bytes, queue.length

    assert counters(batched) == counters(one_by_one)
    assert sorted(batched.in_flight) == sorted(one_by_one.in_flight)
    assert [e.state for e in same] == [e.state for e in entries]
    assert [e.id for e in batched.pop_many(100)] == [e.id for e in one_by_one.pop_many(100)]
