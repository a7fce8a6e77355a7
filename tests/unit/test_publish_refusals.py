"""Overflow and refusals: drop-oldest never refuses for length or size, and a refused publish changes nothing.

"Nothing" is what a user or an operator could see: every queue's messages and stats, the broker's index sizes
(`BrokerCore.index_sizes()`: ready lines, timers, dedup windows...) and the records appended to the log.
"""

from __future__ import annotations

import asyncio
import errno

import msgspec
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from chute import Broker, Publish
from chute.core.broker import BrokerCore
from chute.errors import (
    ChuteError,
    InvalidArgument,
    InvalidName,
    MessageTooLarge,
    QueueFull,
    QueueNotFound,
    StorageFailed,
    StorageReadOnly,
)
from chute.model import QueueSettings
from chute.storage import FileStore, MemoryFs
from chute.storage.memory import MemoryStore


async def _bodies(broker, name):
    return [(d.body, d.dead_letter_reason, d.dead_letter_source) for d in await broker.peek(name, 100)]


async def test_drop_oldest_batch_longer_than_the_limit_keeps_the_newest(broker, reopen):
    await broker.create_queue("dlq")
    await broker.create_queue("q", max_length=3, overflow="drop-oldest", dead_letter_queue="dlq")
    await broker.publish_batch("q", [Publish(body=b"p0"), Publish(body=b"p1")])
    ids = await broker.publish_batch("q", [Publish(body=b"b%d" % i) for i in range(4)])
    assert len(set(ids)) == 4
    assert await _bodies(broker, "q") == [(b"b1", None, None), (b"b2", None, None), (b"b3", None, None)]
    dead = [(b"p0", "overflow", "q"), (b"p1", "overflow", "q"), (b"b0", "overflow", "q")]
    assert await _bodies(broker, "dlq") == dead
    stats = broker.queue_stats("q")
    assert (stats.ready, stats.published, stats.dead_lettered) == (3, 6, 3)
    broker = await reopen(broker)  # the log says the same: the batch's b0 went straight to the dead-letter queue
    assert [b for b, *_ in await _bodies(broker, "q")] == [b"b1", b"b2", b"b3"]
    assert await _bodies(broker, "dlq") == dead
    assert await broker.redrive("dlq") == 3  # a dead-lettered batch message knows where it came from
    assert [b for b, *_ in await _bodies(broker, "q")] == [b"p0", b"p1", b"b0", b"b1", b"b2", b"b3"]  # id order


async def test_drop_oldest_without_dead_letter_queue_drops_the_batch_head(broker, reopen):
    await broker.create_queue("q", max_length=2, overflow="drop-oldest")
    await broker.publish("q", b"old")
    await broker.publish_batch("q", [Publish(body=b"a"), Publish(body=b"b"), Publish(body=b"c")])
    assert [b for b, *_ in await _bodies(broker, "q")] == [b"b", b"c"]
    assert broker.queue_stats("q").dead_lettered == 2
    broker = await reopen(broker)
    assert [b for b, *_ in await _bodies(broker, "q")] == [b"b", b"c"]


async def test_drop_oldest_keeps_in_flight_messages_and_drops_new_ones_instead(broker):
    await broker.create_queue("dlq")
    await broker.create_queue("q", max_length=2, overflow="drop-oldest", dead_letter_queue="dlq")
    await broker.publish_batch("q", [Publish(body=b"x"), Publish(body=b"y")])
    assert len(await broker.receive("q", 2)) == 2  # both in flight: nothing old can go
    await broker.publish("q", b"new")
    assert broker.queue_stats("q").in_flight == 2
    assert await _bodies(broker, "dlq") == [(b"new", "overflow", "q")]


async def test_drop_oldest_by_bytes(broker, reopen):
    await broker.create_queue("dlq")
    await broker.create_queue("q", max_bytes=10, overflow="drop-oldest", dead_letter_queue="dlq")
    await broker.publish("q", b"x" * 6)
    await broker.publish_batch("q", [Publish(body=b"a" * 4), Publish(body=b"b" * 5), Publish(body=b"c" * 5)])
    assert [b for b, *_ in await _bodies(broker, "q")] == [b"b" * 5, b"c" * 5]
    await broker.publish("q", b"z" * 11)  # can never fit: dead-lettered, not refused, and nothing else goes
    assert [b for b, *_ in await _bodies(broker, "q")] == [b"b" * 5, b"c" * 5]
    assert [b for b, *_ in await _bodies(broker, "dlq")] == [b"x" * 6, b"a" * 4, b"z" * 11]
    assert broker.queue_stats("q").bytes == 10
    broker = await reopen(broker)
    assert [b for b, *_ in await _bodies(broker, "q")] == [b"b" * 5, b"c" * 5]
    assert [b for b, *_ in await _bodies(broker, "dlq")] == [b"x" * 6, b"a" * 4, b"z" * 11]


async def test_drop_oldest_on_a_topic_batch(broker, reopen):
    await broker.create_queue("dlq")
    await broker.create_queue("small", max_length=2, overflow="drop-oldest", dead_letter_queue="dlq")
    await broker.create_queue("all")
    await broker.create_topic("t")
    await broker.subscribe("t", ">", "small")
    await broker.subscribe("t", ">", "all")
    await broker.publish_batch("t", [Publish(body=b"m%d" % i) for i in range(3)])
    assert [b for b, *_ in await _bodies(broker, "small")] == [b"m1", b"m2"]
    assert [b for b, *_ in await _bodies(broker, "all")] == [b"m0", b"m1", b"m2"]
    assert await _bodies(broker, "dlq") == [(b"m0", "overflow", "small")]
    broker = await reopen(broker)
    assert [b for b, *_ in await _bodies(broker, "small")] == [b"m1", b"m2"]
    assert [b for b, *_ in await _bodies(broker, "all")] == [b"m0", b"m1", b"m2"]
    assert await _bodies(broker, "dlq") == [(b"m0", "overflow", "small")]


# -- a refused publish changes nothing -------------------------------------------------------------------------


async def _observe(broker: Broker) -> dict:
    """Everything a refused publish must leave as it was."""
    core = broker.core
    queues = {}
    for name in sorted(core.queues):
        stats = msgspec.to_builtins(broker.queue_stats(name))
        stats.pop("oldest_age_s")
        queues[name] = (stats, [(d.id, d.body, d.dead_letter_reason) for d in await broker.peek(name, 100)])
    log = broker.store.stats()
    dedup = {name: sorted(q.dedup.table) for name, q in core.queues.items()}
    dedup.update({name: sorted(t.dedup.table) for name, t in core.topics.items()})
    return {"index": core.index_sizes(), "queues": queues, "dedup": dedup,
            "log": (log.appends, log.bytes_written), "outbox": list(core.outbox)}  # fmt: skip


async def _setup(broker, clock) -> None:
    """Queues at their limits, with a dead-letter queue, a topic over them, in-flight and expired dedup ids."""
    await broker.create_queue("dlq")
    await broker.create_queue("dropping", max_length=3, overflow="drop-oldest", dead_letter_queue="dlq",
                              dedup_window_s=1)  # fmt: skip
    await broker.create_queue("full", max_length=2)
    await broker.create_queue("heavy", max_bytes=10)
    await broker.create_topic("t", dedup_window_s=1)
    await broker.subscribe("t", "a.>", "dropping")
    await broker.subscribe("t", "a.b", "full")
    await broker.publish_batch("dropping", [Publish(body=b"d%d" % i, dedup_id=f"d{i}") for i in range(3)])
    await broker.publish_batch("full", [Publish(body=b"f0"), Publish(body=b"f1")])
    await broker.publish("heavy", b"h" * 8)
    await broker.publish("t", b"t0", subject="a.x", dedup_id="t0")
    await broker.receive("dropping", 1)
    clock.advance(2)  # the dedup ids above have expired but are not swept yet (no tick)


REFUSALS = [  # (destination, batch, error)
    ("full", [Publish(body=b"x")], QueueFull),
    ("heavy", [Publish(body=b"x" * 3)], QueueFull),
    ("t", [Publish(body=b"x", subject="a.c"), Publish(body=b"y", subject="a.b")], QueueFull),  # dropping, then full
    ("t", [Publish(body=b"x", subject="a.c", dedup_id="n1"), Publish(body=b"y", subject="a.b")], QueueFull),
    ("dropping", [Publish(body=b"x", dedup_id="n2"), Publish(body=b"x" * (2 << 20))], MessageTooLarge),
    ("dropping", [Publish(body=b"x"), Publish(body=b"y", headers={"k": "v" * 70_000})], MessageTooLarge),
    ("dropping", [Publish(body=b"x"), Publish(body=b"y", priority=10)], InvalidArgument),
    ("dropping", [Publish(body=b"x"), Publish(body=b"y", ttl_s=0)], InvalidArgument),
    ("dropping", [Publish(body=b"x"), Publish(body=b"y", subject="a.b")], InvalidArgument),
    ("dropping", [Publish(body=b"x"), "not a message"], InvalidArgument),
    ("dropping", [], InvalidArgument),
    ("t", [Publish(body=b"x", subject="a.c"), Publish(body=b"y", subject="a..b")], InvalidName),
    ("nowhere", [Publish(body=b"x")], QueueNotFound),
]


@pytest.mark.parametrize(("dest", "batch", "error"), REFUSALS, ids=[f"{e.__name__}-{d}" for d, _, e in REFUSALS])
async def test_a_refused_publish_changes_nothing(broker, clock, dest, batch, error):
    await _setup(broker, clock)
    before = await _observe(broker)
    with pytest.raises(error):
        await broker.publish_batch(dest, batch)
    assert await _observe(broker) == before  # the refused batch's dedup ids (n1, n2) were not kept either


async def test_a_publish_refused_by_a_read_only_log_changes_nothing(tmp_path, clock):
    fs = MemoryFs()
    broker = Broker(store=FileStore(tmp_path, fs=fs), clock=clock, auto_tick=False)
    await broker.start()
    try:
        await _setup(broker, clock)
        tail = broker.ephemeral_subscription("t", "e.>")  # in memory: still fed while the log is read-only
        fs.fail("write", errno.EIO)
        with pytest.raises(StorageFailed):
            await broker.publish("dlq", b"lost")  # the log is read-only from now on
        before = await _observe(broker)
        for dest, batch in [("dropping", [Publish(body=b"x")]), ("t", [Publish(body=b"x", subject="a.c")])]:
            with pytest.raises(StorageReadOnly):
                await broker.publish_batch(dest, batch)  # drop-oldest would have moved d1 to the DLQ first
            assert await _observe(broker) == before
        await broker.publish("t", b"live", subject="e.x")
        assert [d.body for d in await broker.receive(tail)] == [b"live"]
    finally:
        await broker.close()


def test_refusal_errors_are_chute_errors():
    assert all(issubclass(error, ChuteError) for _, _, error in REFUSALS)


# -- the same as a property, on the pure core ---------------------------------------------------------------------

BATCHES = st.lists(  # (body size, valid?) per message: an invalid one (priority 10) makes the batch refused
    st.tuples(st.integers(0, 12), st.booleans().map(lambda ok: ok or None)), min_size=1, max_size=6
)  # fmt: skip
STEPS = st.lists(st.one_of(st.tuples(st.just("publish"), BATCHES), st.tuples(st.just("lease"), st.integers(1, 3))),
                 max_size=12)  # fmt: skip


def _core_state(core: BrokerCore, store: MemoryStore) -> tuple:
    queues = {
        name: (q.length, q.ready, q.bytes, dict(q.counters), sorted(e.id for e in q.entries()))
        for name, q in core.queues.items()
    }  # fmt: skip
    return core.index_sizes(), queues, store.stats().appends, len(core.outbox)


@given(
    max_length=st.none() | st.integers(1, 5),
    max_bytes=st.none() | st.integers(12, 30),
    overflow=st.sampled_from(["reject", "drop-oldest", "reject-dead-letter"]),
    dlq=st.booleans(),
    steps=STEPS,
)
@example(max_length=3, max_bytes=None, overflow="drop-oldest", dlq=True,  # the case
         steps=[("publish", [(2, True)] * 2), ("publish", [(2, True)] * 4)])  # fmt: skip
@example(
    max_length=None,
    max_bytes=12,
    overflow="drop-oldest",
    dlq=False,
    steps=[("publish", [(5, True)] * 2), ("lease", 1), ("publish", [(4, True), (13, True), (6, True)])],
)
def test_refused_publishes_change_nothing_and_drop_oldest_keeps_the_newest(max_length, max_bytes, overflow, dlq,
                                                                             steps):  # fmt: skip
    store = MemoryStore()
    core = BrokerCore(store)
    now = 1_800_000_000.0
    core.create_queue("dlq", QueueSettings())
    settings = QueueSettings(max_length=max_length, max_bytes=max_bytes, overflow=overflow,
                             dead_letter_queue="dlq" if dlq else None)  # fmt: skip
    queue, _ = core.create_queue("q", settings)
    core.flush()
    for kind, arg in steps:
        now += 1
        if kind == "lease":
            core.receive("q", arg, now)
            core.flush()
            continue
        batch = [Publish(body=b"x" * size, priority=0 if valid else 10) for size, valid in arg]
        before = _core_state(core, store)
        sizes = [size for size, _ in arg]
        try:
            plan = core.prepare_publish("q", batch, now)
        except (InvalidArgument, QueueFull) as exc:
            if isinstance(exc, QueueFull) and overflow == "reject-dead-letter" and dlq:
                # refused as a whole, and every message of it written to the dead-letter queue
                dead_before = sorted(e.id for e in core.queues["dlq"].entries())
                (refused,) = core.refused_plans
                core.refused_plans.clear()
                core.commit_publish(refused, now)
                core.flush()
                dead_now = sorted(e.id for e in core.queues["dlq"].entries())
                assert dead_now == sorted(dead_before + refused.ids) and len(refused.ids) == len(batch)
                assert (queue.length, sorted(e.id for e in queue.entries())) == (before[1]["q"][0], before[1]["q"][4])
                continue
            assert _core_state(core, store) == before and not core.refused_plans
            assert isinstance(exc, InvalidArgument) or overflow != "drop-oldest"
            continue
        core.commit_publish(plan, now)
        core.flush()
        kept = [i for i, message_id in enumerate(plan.ids) if any(e.id == message_id for e in queue.entries())]
        fitting = [i for i, size in enumerate(sizes) if max_bytes is None or size <= max_bytes]
        assert kept == fitting[len(fitting) - len(kept) :]  # the newest of those that can fit at all
        if overflow == "drop-oldest":  # never over its limits, whatever it held in flight
            assert max_length is None or queue.length <= max_length
            assert max_bytes is None or queue.bytes <= max_bytes
        stats = queue.counters
        dead_in_dlq = sum(1 for e in core.queues["dlq"].entries() if e.dead is not None)
        assert dead_in_dlq == (stats["dead"] if dlq else 0)


def test_drop_oldest_keeps_the_newest_of_publishes_made_durable_together():
    """Publishes waiting for the same group commit are each planned without the others; when they are placed,
    the oldest go, not the newest (a burst of single publishes into a small queue)."""
    core = BrokerCore(MemoryStore())
    now = 1_800_000_000.0
    core.create_queue("dlq", QueueSettings())
    queue, _ = core.create_queue("q", QueueSettings(max_length=2, overflow="drop-oldest", dead_letter_queue="dlq"))
    plans = [core.prepare_publish("q", [Publish(body=b"m%d" % i)], now) for i in range(4)]  # none durable yet
    for plan in plans:
        core.commit_publish(plan, now)
    ids = [plan.ids[0] for plan in plans]
    assert [e.id for e in queue.entries()] == ids[2:]
    assert [e.id for e in core.queues["dlq"].entries()] == ids[:2]
    assert queue.counters["dead"] == 2


async def test_concurrent_publishes_into_a_full_drop_oldest_queue_survive_a_restart(broker, reopen):
    await broker.create_queue("dlq")
    await broker.create_queue("q", max_length=2, overflow="drop-oldest", dead_letter_queue="dlq")
    ids = await asyncio.gather(*(broker.publish("q", b"m%d" % i) for i in range(5)))
    kept = [d.message.id for d in await broker.peek("q")]
    assert kept == sorted(ids)[-2:]
    broker = await reopen(broker)  # the MOVE records written as they were placed replay the same
    assert [d.message.id for d in await broker.peek("q")] == kept
    assert sorted(d.message.id for d in await broker.peek("dlq")) == sorted(ids)[:3]


# -- reject-dead-letter: refused, and the refused messages dead-lettered (RabbitMQ's reject-publish-dlx) --------


async def _placed(broker: Broker) -> None:
    """Wait until every publish written is placed: a refused publish's dead letters are placed once durable, after
    the publisher got its QueueFull."""

    async def poll() -> None:
        while broker.core.pending_plans:
            await asyncio.sleep(0.001)

    await asyncio.wait_for(poll(), 5)


async def test_reject_dead_letter_refuses_the_publish_and_dead_letters_what_it_refused(broker, reopen):
    await broker.create_queue("dlq")
    await broker.create_queue("q", max_length=2, overflow="reject-dead-letter", dead_letter_queue="dlq")
    await broker.publish_batch("q", [Publish(body=b"a"), Publish(body=b"b")])
    with pytest.raises(QueueFull):
        await broker.publish_batch("q", [Publish(body=b"c", headers={"k": "v"}), Publish(body=b"d", priority=3)])
    await _placed(broker)
    assert [b for b, *_ in await _bodies(broker, "q")] == [b"a", b"b"]  # never went in
    dead = [(b"d", "overflow", "q"), (b"c", "overflow", "q")]  # (priority first)
    assert await _bodies(broker, "dlq") == dead
    (first, *_) = await broker.peek("dlq", 1)
    assert first.message.priority == 3
    stats = broker.queue_stats("q")
    assert (stats.ready, stats.published, stats.dead_lettered) == (2, 2, 2)  # refused: not published
    broker = await reopen(broker)  # the log says the same
    assert [b for b, *_ in await _bodies(broker, "q")] == [b"a", b"b"]
    assert await _bodies(broker, "dlq") == dead
    assert [d.message.headers for d in await broker.peek("dlq", 100)] == [{}, {"k": "v"}]


async def test_reject_dead_letter_forgets_the_refused_dedup_ids(broker):
    """The publisher was refused: a retry with the same dedup id once there is room is stored, not taken for a
    repeat (the dead letter does not keep the id)."""
    await broker.create_queue("dlq")
    await broker.create_queue("q", max_length=1, overflow="reject-dead-letter", dead_letter_queue="dlq")
    await broker.publish("q", b"first")
    with pytest.raises(QueueFull):
        await broker.publish("q", b"retried", dedup_id="once")
    [delivery] = await broker.receive("q")
    await broker.ack("q", [delivery.receipt])
    retried = await broker.publish("q", b"retried", dedup_id="once")
    assert [d.message.id for d in await broker.peek("q")] == [retried]
    assert [d.body for d in await broker.peek("dlq")] == [b"retried"]


async def test_reject_dead_letter_on_a_topic_refuses_it_as_a_whole(broker, reopen):
    """A topic publish that a full reject-dead-letter queue refuses reaches no queue; the messages that queue
    refused go to its dead-letter queue, those it was not routed go nowhere."""
    await broker.create_queue("dlq")
    await broker.create_queue("small", max_length=1, overflow="reject-dead-letter", dead_letter_queue="dlq")
    await broker.create_queue("all")
    await broker.create_topic("t")
    await broker.subscribe("t", "red", "small")
    await broker.subscribe("t", ">", "all")
    await broker.publish("t", b"first", subject="red")
    with pytest.raises(QueueFull):
        await broker.publish_batch("t", [Publish(body=b"r", subject="red"), Publish(body=b"g", subject="green")])
    await _placed(broker)
    assert [b for b, *_ in await _bodies(broker, "all")] == [b"first"]
    assert await _bodies(broker, "dlq") == [(b"r", "overflow", "small")]
    broker = await reopen(broker)
    assert [b for b, *_ in await _bodies(broker, "all")] == [b"first"]
    assert await _bodies(broker, "dlq") == [(b"r", "overflow", "small")]


async def test_reject_dead_letter_without_a_dead_letter_queue_only_refuses(broker, clock):
    await broker.create_queue("q", max_length=1, overflow="reject-dead-letter")
    await broker.publish("q", b"first")
    before = await _observe(broker)
    with pytest.raises(QueueFull):
        await broker.publish("q", b"refused")
    assert await _observe(broker) == before
