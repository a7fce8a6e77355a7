"""Topics: pattern and header-filter routing, fan-out with one stored body, ephemeral subscriptions, retention."""

from __future__ import annotations

import asyncio

import pytest

from chute import Publish
from chute.errors import (
    InvalidArgument,
    InvalidName,
    QueueExists,
    SubscriptionNotFound,
    TopicExists,
    TopicNotFound,
)


async def test_patterns_route_to_matching_subscriptions(broker):
    await broker.create_topic("orders")
    for name in ("eu", "all", "new"):
        await broker.create_queue(name)
    await broker.subscribe("orders", "orders.*.eu", "eu")
    await broker.subscribe("orders", ">", "all")
    await broker.subscribe("orders", "orders.new.>", "new")
    await broker.publish("orders", b"1", subject="orders.new.eu")
    await broker.publish("orders", b"2", subject="orders.paid.us")
    await broker.publish("orders", b"3", subject="orders.new.us.ca")
    assert [d.body for d in await broker.receive("eu", 10)] == [b"1"]
    assert [d.body for d in await broker.receive("all", 10)] == [b"1", b"2", b"3"]
    assert [d.body for d in await broker.receive("new", 10)] == [b"1", b"3"]


async def test_header_filters(broker):
    await broker.create_topic("t")
    await broker.create_queue("big")
    await broker.subscribe("t", ">", "big", filter={"amount": {"range": {"gte": 100}}, "region": {"in": ["eu", "uk"]}})
    await broker.publish("t", b"a", headers={"amount": "150", "region": "eu"})
    await broker.publish("t", b"b", headers={"amount": "50", "region": "eu"})
    await broker.publish("t", b"c", headers={"amount": "500", "region": "us"})
    await broker.publish("t", b"d", headers={"region": "uk"})
    assert [d.body for d in await broker.receive("big", 10)] == [b"a"]


async def test_a_queue_bound_twice_gets_one_copy(broker):
    await broker.create_topic("t")
    await broker.create_queue("q")
    await broker.subscribe("t", ">", "q")
    await broker.subscribe("t", "a.*", "q")
    await broker.publish("t", b"x", subject="a.b")
    assert len(await broker.receive("q", 10)) == 1


async def test_fan_out_stores_the_body_once(store_kind, tmp_path, clock):
    """Bytes written per message with 8 subscriptions stay within 1.2x those of a single queue."""
    if store_kind != "file":
        pytest.skip("bytes on disk are a file-store matter")
    from chute import Broker
    from tests.conftest import make_store

    async def bytes_for(subscriptions: int) -> int:
        async with Broker(store=make_store("file", tmp_path / f"s{subscriptions}"), clock=clock) as b:
            await b.create_topic("t")
            for i in range(subscriptions):
                await b.create_queue(f"q{i}")
                await b.subscribe("t", ">", f"q{i}")
            before = b.store.stats().bytes_written
            await b.publish_batch("t", [Publish(body=b"x" * 256) for _ in range(200)])
            return b.store.stats().bytes_written - before

    one, eight = await bytes_for(1), await bytes_for(8)
    assert eight <= 1.2 * one


async def test_ephemeral_subscription_is_at_most_once_and_goes_away(broker):
    await broker.create_topic("t")
    await broker.publish("t", b"before")  # nobody listens: not kept
    consumer = await broker.subscribe_ephemeral("t", ">")
    await broker.publish("t", b"during")
    delivery = await asyncio.wait_for(consumer.__anext__(), 5)
    assert delivery.body == b"during" and delivery.receipt == 0
    assert [s.ephemeral for s in broker.list_topics()[0].subscriptions] == [True]
    await consumer.close()
    assert broker.list_topics()[0].subscriptions == []
    assert broker.list_queues() == []


async def test_ephemeral_only_topic_writes_nothing(store_kind, tmp_path, clock):
    if store_kind != "file":
        pytest.skip("bytes on disk are a file-store matter")
    from chute import Broker
    from tests.conftest import make_store

    async with Broker(store=make_store("file", tmp_path / "d"), clock=clock) as b:
        await b.create_topic("t")
        consumer = await b.subscribe_ephemeral("t")
        before = b.store.stats().bytes_written
        await b.publish_batch("t", [Publish(body=b"x" * 100) for _ in range(10)])
        assert b.store.stats().bytes_written == before
        assert len([await consumer.__anext__() for _ in range(10)]) == 10
        await consumer.close()


async def test_retention_lets_new_subscriptions_start_in_the_past(broker, clock):
    await broker.create_topic("t", retention_s=3600)
    await broker.publish("t", b"old", subject="a.x")
    clock.advance(100)
    cut = clock()
    await broker.publish("t", b"new", subject="a.y")
    await broker.publish("t", b"other", subject="b.z")
    for name in ("from_start", "from_cut", "from_now"):
        await broker.create_queue(name)
    await broker.subscribe("t", "a.*", "from_start", start="earliest")
    await broker.subscribe("t", "a.*", "from_cut", start=cut)
    await broker.subscribe("t", "a.*", "from_now")
    assert [d.body for d in await broker.receive("from_start", 10)] == [b"old", b"new"]
    assert [d.body for d in await broker.receive("from_cut", 10)] == [b"new"]
    assert await broker.receive("from_now", 10) == []
    clock.advance(3550)
    broker.tick()
    assert len(broker.core.topics["t"].retained) == 2  # "old" aged out


async def test_retention_by_bytes(broker):
    await broker.create_topic("t", retention_bytes=250)
    for _ in range(5):
        await broker.publish("t", b"x" * 100)
    assert broker.core.topics["t"].retained_bytes <= 250


async def test_topic_errors(broker):
    await broker.create_topic("t")
    await broker.create_queue("q")
    with pytest.raises(TopicExists):
        await broker.create_topic("t", retention_s=5)
    with pytest.raises(QueueExists):
        await broker.create_topic("q")
    with pytest.raises(TopicExists):
        await broker.create_queue("t")
    with pytest.raises(TopicNotFound):
        await broker.subscribe("nope", ">", "q")
    for bad in ("a.>.b", "", "a..b", "a*"):
        with pytest.raises(InvalidName):
            await broker.subscribe("t", bad, "q")
    with pytest.raises(InvalidArgument):
        await broker.subscribe("t", ">", "q", filter={"h": {"bogus": 1}})
    with pytest.raises(InvalidName):
        await broker.publish("t", b"x", subject="a.*")
    with pytest.raises(SubscriptionNotFound):
        await broker.unsubscribe("t", ">", "q")
    assert broker.list_topics()[0].subscriptions == []


async def test_topic_dedup_and_unsubscribe(broker):
    await broker.create_topic("t")
    await broker.create_queue("q")
    await broker.subscribe("t", ">", "q")
    a = await broker.publish("t", b"x", dedup_id="d1")
    assert await broker.publish("t", b"x", dedup_id="d1") == a
    await broker.unsubscribe("t", ">", "q")
    await broker.publish("t", b"y")
    assert [d.body for d in await broker.receive("q", 10)] == [b"x"]


async def test_topics_survive_restart(broker, reopen):
    await broker.create_topic("t", retention_s=1000)
    await broker.create_queue("q")
    await broker.subscribe("t", "a.>", "q", filter={"k": "v"})
    await broker.publish("t", b"1", subject="a.b", headers={"k": "v"})
    broker2 = await reopen(broker)
    try:
        [topic] = broker2.list_topics()
        assert topic.subscriptions[0].filter is not None
        await broker2.publish("t", b"2", subject="a.c", headers={"k": "v"})
        await broker2.publish("t", b"3", subject="a.c", headers={"k": "w"})
        assert [d.body for d in await broker2.receive("q", 10)] == [b"1", b"2"]
        assert len(broker2.core.topics["t"].retained) == 3
    finally:
        await broker2.close()


async def test_delete_queue_removes_its_subscriptions(broker):
    await broker.create_topic("t")
    await broker.create_queue("q")
    await broker.subscribe("t", ">", "q")
    await broker.delete_queue("q")
    assert broker.list_topics()[0].subscriptions == []
    await broker.publish("t", b"x")


async def test_a_queue_fed_by_many_topics_leaves_them_all_when_deleted_and_keeps_nothing_of_them(broker, reopen):
    # a queue knows the subscriptions that feed it (deleting one walks those, not every topic): kept through
    # subscribe again, unsubscribe, a topic's deletion and a restart
    for name in ("t1", "t2", "t3", "other"):
        await broker.create_topic(name)
    for name in ("q", "r"):
        await broker.create_queue(name)
    await broker.subscribe("t1", "a.>", "q")
    await broker.subscribe("t1", "b.*", "q")
    await broker.subscribe("t1", "a.>", "q", filter={"k": "v"})  # the same binding again: replaced
    await broker.subscribe("t2", ">", "q")
    await broker.subscribe("t3", ">", "q")
    await broker.subscribe("t1", ">", "r")
    await broker.subscribe("other", ">", "r")

    def feeds(name: str) -> list:
        return sorted(broker.core.queues[name].feeds)

    assert feeds("q") == [("t1", ("a.>", "q")), ("t1", ("b.*", "q")), ("t2", (">", "q")), ("t3", (">", "q"))]
    await broker.unsubscribe("t1", "b.*", "q")
    await broker.delete_topic("t3")
    broker = await reopen(broker)
    assert feeds("q") == [("t1", ("a.>", "q")), ("t2", (">", "q"))]
    assert feeds("r") == [("other", (">", "r")), ("t1", (">", "r"))]
    await broker.delete_queue("q")
    topics = {t.name: sorted((s.pattern, s.queue) for s in t.subscriptions) for t in broker.list_topics()}
    assert topics == {"t1": [(">", "r")], "t2": [], "other": [(">", "r")]}
    await broker.publish("t1", b"x", subject="a.b")
    assert [d.body for d in await broker.receive("r", 10)] == [b"x"]
    await broker.delete_topic("t1")
    assert feeds("r") == [("other", (">", "r"))]
    await broker.close()


async def test_subscribing_again_replaces_the_filter(broker, reopen):
    await broker.create_topic("t")
    await broker.create_queue("q")
    await broker.subscribe("t", ">", "q", filter={"k": "a"})
    await broker.subscribe("t", ">", "q", filter={"k": "b"})
    await broker.publish("t", b"a", headers={"k": "a"})
    await broker.publish("t", b"b", headers={"k": "b"})
    assert [d.body for d in await broker.receive("q", 10)] == [b"b"]
    assert len(broker.list_topics()[0].subscriptions) == 1


async def test_a_plain_batch_fans_out_to_durable_and_ephemeral_queues_and_is_retained(broker, reopen, clock):
    """Bodies without options published to a topic in one batch (the fan-out path that routes once for the
    batch): each durable queue gets every message in order, an ephemeral subscription gets them at most once,
    a queue with a default TTL gets them with its TTL, the topic retains them, and all of it survives a restart."""
    await broker.create_topic("t", retention_s=1000)
    for name in ("a", "b"):
        await broker.create_queue(name)
        await broker.subscribe("t", ">", name)
    live = await broker.subscribe_ephemeral("t", ">")
    bodies = [b"m%d" % i for i in range(5)]
    ids = await broker.publish_batch("t", [Publish(body=body) for body in bodies])
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert [(await asyncio.wait_for(live.__anext__(), 5)).body for _ in bodies] == bodies
    await live.close()
    await broker.create_queue("ttl", retention_s=60)  # a default TTL: the per-message path, same outcome
    await broker.subscribe("t", ">", "ttl")
    late = await broker.publish_batch("t", [Publish(body=b"late")])
    assert [d.message.expires_at for d in await broker.receive("ttl", 10)] == [clock() + 60]
    broker = await reopen(broker)
    for name in ("a", "b"):
        assert [(d.id, d.body) for d in await broker.receive(name, 10)] == [*zip(ids, bodies), (late[0], b"late")]
    assert len(broker.core.topics["t"].retained) == 6
    await broker.close()
