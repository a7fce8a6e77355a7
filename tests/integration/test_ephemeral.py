"""Ephemeral subscriptions over the network (`AsyncClient.subscribe_ephemeral`, `Client.subscribe_ephemeral`): live
messages of a topic for as long as the consumer and its connection last, and nothing left in the broker after
either ends, however it ends.

A real server on 127.0.0.1 in the test's event loop; the broker's state is read directly to prove what is left.
"""

from __future__ import annotations

import asyncio

import pytest

import chute
import chute._management
import chute.client.consumer
from chute.errors import ChuteError, ConnectionLost, Forbidden, InvalidArgument, InvalidName, TopicNotFound
from chute.model import Publish, QueueSettings
from chute.protocol.frames import Op
from chute.server.session import HANDLERS
from chute.server.users import Grant, User, hash_password
from chute.testing import serving

pytestmark = pytest.mark.timeout(60)


def ephemeral_state(broker) -> tuple[list[str], list[tuple[str, str]]]:
    """The ephemeral queues of the broker, and the (topic, queue) pairs of subscriptions that feed one."""
    queues = sorted(q.name for q in broker.core.queues.values() if q.ephemeral)
    subscriptions = sorted(
        (topic.name, s.queue.name)
        for topic in broker.core.topics.values()
        for s in topic.subscriptions.values()
        if s.queue.ephemeral
    )
    return queues, subscriptions


def assert_nothing_left(broker) -> None:
    assert ephemeral_state(broker) == ([], [])
    assert not [name for name in broker._waiters if name.startswith("~")]
    assert not [name for name in broker.dispatcher.watched if name.startswith("~")]
    assert [q.name for q in broker.list_queues()] == sorted(q.name for q in broker.list_queues())  # still listable
    assert all(not s.ephemeral for t in broker.list_topics() for s in t.subscriptions)


async def until(condition, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)


async def test_live_messages_of_a_topic_by_pattern_and_filter_with_nothing_to_ack():
    async with serving() as server, chute.AsyncClient(server.url) as client:
        broker = server.server.broker
        await client.create_topic("orders")
        await client.publish("orders", b"before", subject="orders.eu")  # nobody listened: never delivered
        consumer = await client.subscribe_ephemeral("orders", "orders.*", filter={"kind": "new"})
        assert consumer.queue.startswith("~") and consumer.topic == "orders"
        assert ephemeral_state(broker) == ([consumer.queue], [("orders", consumer.queue)])
        [topic] = await client.list_topics()
        assert [(s.pattern, s.ephemeral) for s in topic.subscriptions] == [("orders.*", True)]
        assert [q.name for q in await client.list_queues()] == []  # private queues are not listed

        await client.publish("orders", b"a", subject="orders.eu", headers={"kind": "new"})
        await client.publish("orders", b"b", subject="orders.eu", headers={"kind": "old"})  # filtered out
        await client.publish("orders", b"c", subject="other.eu", headers={"kind": "new"})  # pattern mismatch
        await client.publish("orders", b"d", subject="orders.us", headers={"kind": "new"})
        first, second = await consumer.get(5), await consumer.get(5)
        assert [first.body, second.body] == [b"a", b"d"]
        assert (first.receipt, first.queue, first.delivery_count) == (0, consumer.queue, 1)
        await consumer.ack([first, second])  # receipt 0: nothing to ack, and no error
        assert await consumer.get(0.2) is None
        await consumer.close()
        assert_nothing_left(broker)


async def test_many_messages_arrive_in_order_beyond_prefetch():
    async with serving() as server, chute.AsyncClient(server.url) as client:
        await client.create_topic("ticks")
        consumer = await client.subscribe_ephemeral("ticks", prefetch=10)
        await client.publish_batch("ticks", [str(i).encode() for i in range(1000)])
        got = [(await consumer.get(5)).body for _ in range(1000)]
        assert got == [str(i).encode() for i in range(1000)]
        await consumer.close()
        assert_nothing_left(server.server.broker)


async def test_closing_the_consumer_removes_the_subscription_and_the_connection_stays():
    async with serving() as server, chute.AsyncClient(server.url) as client:
        broker = server.server.broker
        await client.create_topic("t")
        first = await client.subscribe_ephemeral("t")
        second = await client.subscribe_ephemeral("t", "t")
        assert len(ephemeral_state(broker)[0]) == 2
        await first.close()
        assert ephemeral_state(broker) == ([second.queue], [("t", second.queue)])  # at once, when close returns
        await client.publish("t", b"x")
        assert (await second.get(5)).body == b"x"
        assert await first.get(0) is None
        await second.close()
        assert_nothing_left(broker)
        assert server.server.sessions and all(not s.consumers for s in server.server.sessions)


async def test_closing_the_client_removes_its_subscriptions():
    async with serving() as server:
        broker = server.server.broker
        async with chute.AsyncClient(server.url) as client:
            await client.create_topic("t")
            await client.subscribe_ephemeral("t", "a.>")
            await client.subscribe_ephemeral("t", "b.>")
            assert len(ephemeral_state(broker)[1]) == 2
        await until(lambda: not server.server.sessions)
        assert_nothing_left(broker)
        await broker.publish("t", b"nobody listens", subject="a.b")  # routed nowhere, kept nowhere
        assert_nothing_left(broker)


async def test_a_killed_connection_removes_its_subscriptions():
    async with serving() as server, chute.AsyncClient(server.url, reconnect=False) as client:
        broker = server.server.broker
        await client.create_topic("t")
        consumer = await client.subscribe_ephemeral("t")
        await client.publish("t", b"queued but never read")
        await until(lambda: broker.core.queues[consumer.queue].counters["published"] == 1)
        client._link.transport.abort()  # no CANCEL, no close: the connection just ends
        with pytest.raises(ConnectionLost):
            async for _ in consumer:
                pass
        await until(lambda: not server.server.sessions)
        assert_nothing_left(broker)


async def test_a_connection_the_server_drops_removes_its_subscriptions():
    async with serving() as server, chute.AsyncClient(server.url, reconnect=False) as client:
        broker = server.server.broker
        await client.create_topic("t")
        await client.subscribe_ephemeral("t")
        [session] = server.server.sessions
        session.transport.abort()
        await until(lambda: session.closed)
        assert_nothing_left(broker)  # gone as soon as the server saw the connection end


async def test_after_a_reconnect_a_new_subscription_replaces_the_old_one():
    async with serving() as server, chute.AsyncClient(server.url) as client:
        broker = server.server.broker
        await client.create_topic("t")
        consumer = await client.subscribe_ephemeral("t")
        old_queue = consumer.queue
        client._link.transport.abort()
        await until(lambda: client.connections == 2 and consumer.queue != old_queue)
        queues, subscriptions = ephemeral_state(broker)
        assert queues == [consumer.queue] and subscriptions == [("t", consumer.queue)]
        await client.publish("t", b"after")
        assert (await consumer.get(5)).body == b"after"
    await until(lambda: not server.server.sessions)
    assert_nothing_left(broker)


async def test_bad_requests_change_nothing():
    async with serving() as server, chute.AsyncClient(server.url) as client:
        broker = server.server.broker
        with pytest.raises(TopicNotFound):
            await client.subscribe_ephemeral("missing")
        await client.create_topic("t")
        await client.create_queue("q")
        with pytest.raises(InvalidName):
            await client.subscribe_ephemeral("t", "a.>.b")
        with pytest.raises(InvalidArgument):
            await client.subscribe_ephemeral("t", filter={"kind": {"no-such-operator": 1}})
        with pytest.raises(TopicNotFound):
            await client.subscribe_ephemeral("q")  # a queue is not a topic
        assert_nothing_left(broker)
        assert all(not s.consumers for s in server.server.sessions)


def _user(name: str, grants) -> User:
    return User(name=name, password_hash=hash_password("pw", log2_n=10), grants=grants)


async def test_it_takes_the_consume_permission_on_the_topic():
    users = [
        _user("reader", [Grant(allow=["consume"], topics="events.*")]),
        _user("publisher", [Grant(allow=["publish"], topics="events.*"), Grant(allow=["consume"], queues="*")]),
        _user("admin", [Grant(allow=["manage"], topics="*")]),
    ]
    async with serving(users=users, token="root") as server:
        broker = server.server.broker
        async with chute.AsyncClient(server.url, token="root") as root:
            await root.create_topic("events.a")
            await root.create_topic("other")
        async with chute.AsyncClient(server.url, user="reader", password="pw") as reader:
            consumer = await reader.subscribe_ephemeral("events.a")
            with pytest.raises(Forbidden):
                await reader.subscribe_ephemeral("other")
            await consumer.close()
        for name in ("publisher", "admin"):
            async with chute.AsyncClient(server.url, user=name, password="pw") as client:
                with pytest.raises(Forbidden):
                    await client.subscribe_ephemeral("events.a")
        assert_nothing_left(broker)


def test_the_blocking_client(chute_server):
    with chute.Client(chute_server.url) as client:
        client.create_topic("t")
        consumer = client.subscribe_ephemeral("t", "t")
        client.publish("t", b"one")
        assert consumer.get(5).body == b"one"
        [topic] = client.list_topics()
        assert [s.ephemeral for s in topic.subscriptions] == [True]
        consumer.close()
        [topic] = client.list_topics()
        assert topic.subscriptions == []


async def test_the_broker_keeps_at_most_its_limit_for_a_reader_that_falls_behind(monkeypatch):
    monkeypatch.setattr(chute._management, "EPHEMERAL_LIMITS", QueueSettings(max_length=5, overflow="drop-oldest"))
    async with serving() as server:
        broker = server.server.broker
        await broker.create_topic("t")
        async with await broker.subscribe_ephemeral("t") as live:  # not read while these are published
            await broker.publish_batch("t", [Publish(body=b"%d" % i) for i in range(20)])
            for i in range(20, 25):
                await broker.publish("t", b"%d" % i)
            assert broker.core.queues[live.queue].length == 5
            assert [(await live.__anext__()).body for _ in range(5)] == [b"20", b"21", b"22", b"23", b"24"]
        assert_nothing_left(broker)


async def test_a_client_that_falls_behind_drops_the_oldest_and_counts_them(monkeypatch):
    monkeypatch.setattr(chute.client.consumer, "EPHEMERAL_MAX_BUFFERED", 10)
    async with serving() as server, chute.AsyncClient(server.url) as client:
        await client.create_topic("t")
        consumer = await client.subscribe_ephemeral("t")
        await client.publish_batch("t", [b"%d" % i for i in range(50)])
        await until(lambda: consumer.dropped + len(consumer) == 50)
        assert consumer.dropped == 40
        assert [d.body for d in await consumer.get_many(100)] == [b"%d" % i for i in range(40, 50)]
        await consumer.close()


async def test_a_broker_without_ephemeral_subscriptions_over_the_network_is_named(monkeypatch):
    """A server from before ignores CONSUME's `topic` and looks for the queue "": the client says what is wrong."""
    original = HANDLERS[Op.CONSUME]

    async def older(session, request):
        request.topic = None
        return await original(session, request)

    monkeypatch.setitem(HANDLERS, Op.CONSUME, older)
    async with serving() as server, chute.AsyncClient(server.url) as client:
        await client.create_topic("t")
        with pytest.raises(ChuteError, match="no ephemeral subscriptions over the network"):
            await client.subscribe_ephemeral("t")
        assert not client._consumers
        assert_nothing_left(server.server.broker)
