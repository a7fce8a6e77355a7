"""Queues: publish, receive, ack, leases, redelivery, ordering, stats — on both stores, with a hand-driven clock."""

from __future__ import annotations

import pytest

from chute import Publish
from chute.errors import (
    InvalidArgument,
    InvalidName,
    InvalidReceipt,
    MessageTooLarge,
    QueueExists,
    QueueNotFound,
)


async def test_publish_receive_ack(broker):
    await broker.create_queue("jobs")
    message_id = await broker.publish("jobs", b"hello", headers={"k": "v"})
    [delivery] = await broker.receive("jobs")
    assert delivery.body == b"hello"
    assert delivery.headers == {"k": "v"}
    assert delivery.id == message_id
    assert delivery.delivery_count == 1
    await broker.ack("jobs", delivery.receipt)
    assert await broker.receive("jobs") == []
    stats = broker.queue_stats("jobs")
    assert (stats.ready, stats.in_flight, stats.published, stats.delivered, stats.acked) == (0, 0, 1, 1, 1)


async def test_batch_publish_keeps_order(broker):
    await broker.create_queue("q")
    ids = await broker.publish_batch("q", [Publish(body=str(i).encode()) for i in range(50)])
    assert ids == sorted(ids) and len(set(ids)) == 50
    got = await broker.receive("q", 100)
    assert [d.body for d in got] == [str(i).encode() for i in range(50)]


async def test_one_consumer_at_a_time_while_leased(broker, clock):
    await broker.create_queue("q", lease_s=10)
    await broker.publish("q", b"x")
    [first] = await broker.receive("q")
    assert await broker.receive("q") == []
    clock.advance(9.9)
    broker.tick()
    assert await broker.receive("q") == []
    clock.advance(0.2)
    broker.tick()
    [again] = await broker.receive("q")
    assert again.id == first.id and again.delivery_count == 2
    assert again.receipt != first.receipt
    with pytest.raises(InvalidReceipt):
        await broker.ack("q", first.receipt)  # the old lease ended
    await broker.ack("q", again.receipt)
    assert broker.queue_stats("q").redelivered == 1


async def test_extend_lease(broker, clock):
    await broker.create_queue("q", lease_s=5)
    await broker.publish("q", b"x")
    [d] = await broker.receive("q")
    clock.advance(4)
    await broker.extend("q", d.receipt, 10)
    clock.advance(5)
    broker.tick()
    assert await broker.receive("q") == []
    clock.advance(6)
    broker.tick()
    assert len(await broker.receive("q")) == 1


async def test_receive_lease_override(broker, clock):
    await broker.create_queue("q", lease_s=100)
    await broker.publish("q", b"x")
    await broker.receive("q", lease_s=1)
    clock.advance(1.5)
    broker.tick()
    assert len(await broker.receive("q")) == 1


async def test_nack_requeues_in_place(broker):
    await broker.create_queue("q")
    await broker.publish_batch("q", [Publish(body=b"a"), Publish(body=b"b")])
    [a] = await broker.receive("q")
    await broker.nack("q", a.receipt)
    got = await broker.receive("q", 2)
    assert [d.body for d in got] == [b"a", b"b"]  # a keeps its place in line
    assert got[0].delivery_count == 2


async def test_nack_with_delay(broker, clock):
    await broker.create_queue("q")
    await broker.publish("q", b"a")
    [a] = await broker.receive("q")
    await broker.nack("q", a.receipt, delay_s=30)
    assert broker.queue_stats("q").delayed == 1
    assert await broker.receive("q") == []
    clock.advance(31)
    broker.tick()
    [again] = await broker.receive("q")
    assert again.delivery_count == 2


async def test_priorities(broker):
    await broker.create_queue("q")
    await broker.publish_batch(
        "q",
        [
            Publish(body=b"low1"),
            Publish(body=b"high", priority=9),
            Publish(body=b"low2"),
            Publish(body=b"mid", priority=5),
        ],
    )
    got = await broker.receive("q", 10)
    assert [d.body for d in got] == [b"high", b"mid", b"low1", b"low2"]


async def test_delay_and_queue_default_delay(broker, clock):
    await broker.create_queue("q", delay_s=10, lease_s=1000)
    await broker.publish("q", b"default")
    await broker.publish("q", b"now", delay_s=0)
    await broker.publish("q", b"later", delay_s=100)
    assert [d.body for d in await broker.receive("q", 10)] == [b"now"]
    assert broker.queue_stats("q").delayed == 2
    clock.advance(11)
    broker.tick()
    assert [d.body for d in await broker.receive("q", 10)] == [b"default"]
    clock.advance(100)
    broker.tick()
    assert [d.body for d in await broker.receive("q", 10)] == [b"later"]


async def test_peek_does_not_consume(broker):
    await broker.create_queue("q")
    await broker.publish_batch("q", [Publish(body=b"a"), Publish(body=b"b")])
    peeked = await broker.peek("q", 10)
    assert [p.body for p in peeked] == [b"a", b"b"] and all(p.receipt == 0 for p in peeked)
    assert len(await broker.receive("q", 10)) == 2


async def test_purge_keeps_in_flight(broker):
    await broker.create_queue("q")
    await broker.publish_batch("q", [Publish(body=b"%d" % i) for i in range(5)])
    [d] = await broker.receive("q")
    assert await broker.purge_queue("q") == 4
    stats = broker.queue_stats("q")
    assert (stats.ready, stats.in_flight) == (0, 1)
    await broker.ack("q", d.receipt)


async def test_create_is_idempotent_and_conflicts(broker):
    await broker.create_queue("q", lease_s=5)
    await broker.create_queue("q", lease_s=5)
    with pytest.raises(QueueExists):
        await broker.create_queue("q", lease_s=6)
    assert [q.name for q in broker.list_queues()] == ["q"]


async def test_update_and_delete(broker):
    await broker.create_queue("q")
    info = await broker.update_queue("q", lease_s=3, max_deliveries=4)
    assert info.settings.lease_s == 3 and info.settings.max_deliveries == 4
    with pytest.raises(InvalidArgument):
        await broker.update_queue("q", lease_s=-1)
    with pytest.raises(InvalidArgument):
        await broker.update_queue("q", no_such_setting=1)
    assert broker.list_queues()[0].settings.lease_s == 3  # nothing half-applied
    await broker.publish("q", b"x")
    await broker.delete_queue("q")
    with pytest.raises(QueueNotFound):
        await broker.publish("q", b"x")
    with pytest.raises(QueueNotFound):
        await broker.receive("q")


@pytest.mark.parametrize("name", ["", "-x", "a b", "x" * 201, "é", "a/b", 5, None])
async def test_invalid_names(broker, name):
    with pytest.raises(InvalidName):
        await broker.create_queue(name)
    assert broker.list_queues() == []


@pytest.mark.parametrize(
    "settings",
    [
        {"lease_s": 0},
        {"lease_s": "x"},
        {"max_deliveries": 0},
        {"delay_s": -1},
        {"overflow": "explode"},
        {"rate_limit": 0},
        {"rate_burst": 5},
        {"max_length": 0},
        {"dedup_window_s": -1},
        {"dead_letter_queue": "missing"},
        {"unknown": 1},
    ],
)
async def test_invalid_settings(broker, settings):
    with pytest.raises((InvalidArgument, QueueNotFound)):
        await broker.create_queue("q", **settings)
    assert broker.list_queues() == []


async def test_bad_messages_store_nothing(broker):
    await broker.create_queue("q")
    bad = [
        Publish(body="text"),
        Publish(body=b"x", priority=10),
        Publish(body=b"x", priority=-1),
        Publish(body=b"x", headers={"k": 1}),
        Publish(body=b"x", delay_s=-5),
        Publish(body=b"x", ttl_s=0),
        Publish(body=b"x", group=""),
        Publish(body=b"x", subject="a.b"),
    ]
    for message in bad:
        with pytest.raises(InvalidArgument):
            await broker.publish_batch("q", [Publish(body=b"ok"), message])
    with pytest.raises(MessageTooLarge):
        await broker.publish("q", b"x" * (broker.core.max_message_bytes + 1))
    with pytest.raises(MessageTooLarge):
        await broker.publish("q", b"x", headers={"h": "v" * 20000})
    with pytest.raises(InvalidArgument):
        await broker.publish_batch("q", [])
    assert broker.queue_stats("q").ready == 0


async def test_ack_reports_unknown_receipts_after_acking_the_rest(broker):
    await broker.create_queue("q")
    await broker.publish("q", b"x")
    [d] = await broker.receive("q")
    with pytest.raises(InvalidReceipt) as caught:
        await broker.ack("q", [d.receipt, 12345])
    assert caught.value.receipts == [12345]
    assert broker.queue_stats("q").in_flight == 0


async def test_invalid_receive_arguments(broker):
    await broker.create_queue("q")
    for bad in (0, -1, True, "3"):
        with pytest.raises(InvalidArgument):
            await broker.receive("q", bad)
    with pytest.raises(InvalidArgument):
        await broker.receive("q", 1, lease_s=0)
    with pytest.raises(InvalidArgument):
        await broker.receive("q", 1, wait_s=-1)


async def test_in_memory_broker_and_durable_default(tmp_path, monkeypatch):
    from chute import Broker
    from chute.storage import FileStore, MemoryStore

    async with Broker.in_memory() as broker:
        assert isinstance(broker.store, MemoryStore)
        await broker.create_queue("q")
        await broker.publish("q", b"x")
        assert broker.queue_stats("q").ready == 1
    monkeypatch.chdir(tmp_path)
    async with Broker() as broker:
        assert isinstance(broker.store, FileStore)
        await broker.create_queue("q")
    assert (tmp_path / "chute-data" / "checkpoint").exists()


async def test_receive_max_bytes_bounds_the_bodies_of_a_batch(broker):
    """A batch that must fit a frame: the bodies add up to at most max_bytes, the rest stays ready, in order."""
    await broker.create_queue("q")
    await broker.publish_batch("q", [Publish(body=bytes([i]) * 100) for i in range(10)])
    first = await broker.receive("q", 10, max_bytes=350)
    assert [d.body[0] for d in first] == [0, 1, 2]
    big = await broker.receive("q", 10, max_bytes=50)  # one message larger than the budget still goes alone
    assert [d.body[0] for d in big] == [3]
    rest = await broker.receive("q", 10)
    assert [d.body[0] for d in rest] == list(range(4, 10))
    assert all(d.delivery_count == 1 for d in first + big + rest)


async def test_receive_max_bytes_keeps_priority_order_and_returned_messages(broker):
    await broker.create_queue("q")
    await broker.publish_batch("q", [Publish(body=b"x" * 10, priority=p) for p in (0, 5, 5, 0)])
    [a, b] = await broker.receive("q", 2)
    await broker.nack("q", [a.receipt, b.receipt])  # returned: they keep their place in line
    got = await broker.receive("q", 10, max_bytes=25)
    assert [(d.id, d.message.priority) for d in got] == [(a.id, 5), (b.id, 5)]


async def test_receive_max_bytes_gives_back_unused_rate_tokens(broker):
    await broker.create_queue("q", rate_limit=4.0)  # a burst of 4
    await broker.publish_batch("q", [Publish(body=b"x" * 100) for _ in range(4)])
    assert len(await broker.receive("q", 4, max_bytes=100)) == 1
    assert len(await broker.receive("q", 4)) == 3  # the 3 tokens the first batch left unused


async def test_stats_say_how_long_ago_a_consumer_asked_for_messages(broker, clock):
    await broker.create_queue("q")
    assert broker.queue_stats("q").received_age_s is None  # nobody asked since the broker started
    assert await broker.receive("q") == []  # asking counts, even when nothing is ready
    assert broker.queue_stats("q").received_age_s == 0.0
    clock.advance(7.5)
    await broker.publish("q", b"x")  # publishing does not
    assert broker.queue_stats("q").received_age_s == 7.5
    [delivery] = await broker.receive("q")
    await broker.ack("q", delivery.receipt)
    assert broker.queue_stats("q").received_age_s == 0.0
