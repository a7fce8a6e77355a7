"""AMQP queue lifecycles in a cluster (two nodes on one PostgreSQL, in-process Servers; pika and aio-pika).

- Exclusive queues: a queue declared exclusive through one node belongs to that connection on every node (405
  RESOURCE_LOCKED for any other connection, whichever node it uses and whichever node serves the queue), is
  deleted when that connection closes, and is deleted too when the connection's node stops or dies, since its
  connection is gone with it (as RabbitMQ deletes exclusive queues when their owner's node goes down).
- auto-delete and x-expires: a node never deletes a queue that a consumer of another node still uses."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aio_pika
import pika
import pytest
from pika.exceptions import ChannelClosedByBroker

from chute import AsyncClient
from chute.amqp import front as amqp_front
from chute.amqp import state
from tests.amqp.test_front_forgets import _names_held
from tests.cluster.inprocess import balanced, running_nodes
from tests.cluster.test_amqp_cluster import SHARDS, _config, _url, owned_by

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def nodes(postgres_url, tmp_path, monkeypatch):
    monkeypatch.setattr(amqp_front, "SWEEP_S", 0.5)
    async with running_nodes(postgres_url, tmp_path, 2, SHARDS, _config) as servers:
        yield servers


def _refusals(server, queue: str) -> list[int]:
    """The reply code of each method another connection (through `server`) may not use on exclusive `queue`."""
    connection = pika.BlockingConnection(pika.URLParameters(_url(server)))
    codes = []
    try:
        for action in (lambda ch: ch.queue_declare(queue, exclusive=True),
                       lambda ch: ch.queue_declare(queue, passive=True),
                       lambda ch: ch.basic_get(queue),
                       lambda ch: ch.basic_consume(queue, lambda *a: None),
                       lambda ch: ch.queue_purge(queue),
                       lambda ch: ch.queue_bind(queue, "amq.direct", routing_key=queue),
                       lambda ch: ch.queue_delete(queue)):  # fmt: skip
            channel = connection.channel()
            try:
                action(channel)
                codes.append(200)
            except ChannelClosedByBroker as closed:
                codes.append(closed.reply_code)
    finally:
        connection.close()
    return codes


def _exists(server, queue: str) -> bool:
    """Whether a passive queue.declare through `server` finds `queue` (404 means it does not)."""
    connection = pika.BlockingConnection(pika.URLParameters(_url(server)))
    try:
        connection.channel().queue_declare(queue, passive=True)
        return True
    except ChannelClosedByBroker as closed:
        assert closed.reply_code == 404, closed
        return False
    finally:
        with contextlib.suppress(Exception):
            connection.close()


async def _until_gone(server, queue: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while await asyncio.to_thread(_exists, server, queue):
        assert time.monotonic() < deadline, f"{queue} still exists after {timeout_s} s"
        await asyncio.sleep(0.2)


def _declare_exclusive(server, queues: list[str]) -> pika.BlockingConnection:
    """A connection through `server` that declares each of `queues` exclusive and puts one message in each."""
    connection = pika.BlockingConnection(pika.URLParameters(_url(server)))
    channel = connection.channel()
    channel.confirm_delivery()
    for queue in queues:
        channel.queue_declare(queue, exclusive=True)
        channel.basic_publish("", queue, b"mine")
    return connection


async def test_an_exclusive_queue_belongs_to_its_connection_on_every_node(nodes):
    a, b = nodes
    on_a, on_b = owned_by(a, "excl-a-")[0], owned_by(b, "excl-b-")[0]
    owner = await asyncio.to_thread(_declare_exclusive, b, [on_a, on_b])
    try:
        for through in (a, b):  # another connection, through the node serving the queue or the other one
            for queue in (on_a, on_b):
                assert await asyncio.to_thread(_refusals, through, queue) == [405] * 7, (through.url, queue)

        def owner_uses_them() -> list:
            channel = owner.channel()
            got = [channel.basic_get(queue, auto_ack=True)[2] for queue in (on_a, on_b)]
            channel.queue_bind(on_a, "amq.direct", routing_key="k")
            return got

        assert await asyncio.to_thread(owner_uses_them) == [b"mine", b"mine"]
    finally:
        await asyncio.to_thread(owner.close)
    for queue in (on_a, on_b):  # the connection closed: its queues go, on whichever node they live
        await _until_gone(a, queue)
    async with AsyncClient(a.url) as native:
        assert not {on_a, on_b} & {info.name for info in await native.list_queues()}


async def test_the_exclusive_queues_of_a_stopped_node_are_deleted_by_the_others(nodes):
    a, b = nodes
    on_a, on_b = owned_by(a, "gone-a-")[0], owned_by(b, "gone-b-")[0]
    touched = owned_by(a, "gone-t-")[0]
    owner = await asyncio.to_thread(_declare_exclusive, b, [on_a, on_b, touched])
    await b.stop()  # its connections end with it; what they owned is left to the node that remains
    with contextlib.suppress(Exception):
        owner.close()
    await balanced([a], SHARDS)  # node A serves every shard (during the takeover a deletion is `unavailable`)

    def declare_again() -> int:  # a new connection may take the name at once: the old owner is gone
        connection = pika.BlockingConnection(pika.URLParameters(_url(a)))
        try:
            return connection.channel().queue_declare(touched, exclusive=True).method.message_count
        finally:
            connection.close()

    assert await asyncio.to_thread(declare_again) == 0  # a new queue, not the old one with its message
    await _until_gone(a, touched)  # and it went with that connection
    for queue in (on_a, on_b):  # the others, which nobody touches, go by the sweep of the node serving them now
        await _until_gone(a, queue)


async def test_a_queue_declared_exclusive_on_one_broker_has_no_owner_in_its_record(tmp_path):
    """On one broker the exclusive owner stays in memory (the queue is deleted at the next start anyway)."""
    from chute.server.app import Server
    from chute.server.config import ServerConfig

    server = await Server(ServerConfig(host="127.0.0.1", port=0, http_port=0, amqp_port=0,
                                       data_dir=str(tmp_path / "one"))).start()  # fmt: skip
    try:
        connection = await asyncio.to_thread(_declare_exclusive, server, ["solo"])
        attributes = server.broker.core.queues["solo"].settings.attributes
        assert '"exclusive":true' in attributes["amqp-queue"] and "owner" not in attributes["amqp-queue"]
        assert await asyncio.to_thread(_refusals, server, "solo") == [405] * 7
        await asyncio.to_thread(connection.close)
    finally:
        await server.stop()


# -- auto-delete and x-expires: a queue in use through another node is not deleted ------------------------------


async def _consumer(server, queue: str, got: list):
    """An aio-pika connection through `server` consuming `queue` (acking each message into `got`)."""
    connection = await aio_pika.connect(_url(server))
    channel = await connection.channel()

    async def on_message(message) -> None:
        got.append(message.body)
        await message.ack()

    tag = await (await channel.get_queue(queue, ensure=False)).consume(on_message)
    return connection, channel, tag


async def _until(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def _publish(server, queue: str, body: bytes) -> None:
    async with await aio_pika.connect(_url(server)) as connection:
        channel = await connection.channel()
        await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue)


async def test_an_expiring_queue_consumed_through_another_node_stays_while_it_is_used(nodes):
    a, b = nodes
    queue = owned_by(a, "expires-")[0]
    async with await aio_pika.connect(_url(b)) as declaring:  # declared through B, whose countdown starts now
        await (await declaring.channel()).declare_queue(queue, arguments={"x-expires": 1000})
    got: list = []
    connection, _, _ = await _consumer(a, queue, got)  # consumed through A
    try:
        await asyncio.sleep(1.0 + amqp_front.IN_USE_S + 1.0)  # B's countdown ended: B found the queue in use
        await _publish(b, queue, b"still here")
        await _until(lambda: _true(got == [b"still here"]))
    finally:
        await connection.close()
    await _until(lambda: _false(asyncio.to_thread(_exists, a, queue)))  # unused now: it expires


async def test_an_auto_delete_queue_stays_while_a_consumer_of_another_node_remains(nodes):
    a, b = nodes
    queue = owned_by(b, "autodel-")[0]
    got_b: list = []
    got_a: list = []
    async with await aio_pika.connect(_url(b)) as declaring:
        await (await declaring.channel()).declare_queue(queue, auto_delete=True)
        first, _, _ = await _consumer(b, queue, got_b)
        second, _, _ = await _consumer(a, queue, got_a)
        await first.close()  # B's last consumer goes; A's remains
        await asyncio.sleep(amqp_front.IN_USE_S + 1.0)
        assert await asyncio.to_thread(_exists, a, queue)
        await _publish(b, queue, b"for a")
        await _until(lambda: _true(got_a == [b"for a"]))
        await second.close()  # the last consumer of all: now it goes
        await _until(lambda: _false(asyncio.to_thread(_exists, b, queue)))


async def _true(value) -> bool:
    return bool(value)


async def _false(awaitable) -> bool:
    return not await awaitable


# -- direct reply-to: a reply published through another node than the requester's ------------------------------


async def test_a_direct_reply_to_reply_through_another_node_reaches_the_requester(nodes):
    a, b = nodes
    queue = owned_by(b, "rpc-")[0]
    replies: asyncio.Queue = asyncio.Queue()
    async with await aio_pika.connect(_url(a)) as requester, await aio_pika.connect(_url(b)) as responder:
        asking = await requester.channel()
        pseudo = await asking.get_queue("amq.rabbitmq.reply-to", ensure=False)
        await pseudo.consume(replies.put, no_ack=True)
        answering = await responder.channel()
        requests = await answering.declare_queue(queue)
        for n in range(3):
            await asking.default_exchange.publish(
                aio_pika.Message(str(n).encode(), reply_to="amq.rabbitmq.reply-to", correlation_id=f"c{n}"),
                routing_key=queue)  # fmt: skip
        for _ in range(3):
            request = await requests.get(timeout=10)
            assert request.reply_to.startswith("amq.rabbitmq.reply-to.") and request.reply_to.endswith(".node-0")
            await answering.default_exchange.publish(  # through node B, for a channel of node A
                aio_pika.Message(str(int(request.body) ** 2).encode(), correlation_id=request.correlation_id,
                                 content_type="text/plain", headers={"n": int(request.body)}),
                routing_key=request.reply_to)  # fmt: skip
            await request.ack()
        got = [await asyncio.wait_for(replies.get(), 10) for _ in range(3)]
    assert sorted((m.correlation_id, m.body, m.content_type, m.headers) for m in got) == [
        ("c0", b"0", "text/plain", {"n": 0}),
        ("c1", b"1", "text/plain", {"n": 1}),
        ("c2", b"4", "text/plain", {"n": 2}),
    ]
    assert all(m.exchange == "" and m.routing_key.startswith("amq.rabbitmq.reply-to.") for m in got)


async def test_a_delete_if_unused_through_one_node_is_refused_while_another_nodes_consumer_uses_the_queue(nodes):
    a, b = nodes
    queue = owned_by(a, "ifunused-")[0]
    got: list = []
    async with await aio_pika.connect(_url(b)) as declaring:
        await (await declaring.channel()).declare_queue(queue, durable=True)
    connection, _, _ = await _consumer(a, queue, got)  # a consumer through A only
    try:
        await _until(lambda: _in_use(a, queue))  # its long polls have reached the queue's node
        async with await aio_pika.connect(_url(b)) as deleting:
            channel = await deleting.channel()
            with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed, match="in use"):
                await channel.queue_delete(queue, if_unused=True)
    finally:
        await connection.close()
    await _until(lambda: _false(_in_use(a, queue)))  # no consumer anywhere now
    async with await aio_pika.connect(_url(b)) as deleting:
        await (await deleting.channel()).queue_delete(queue, if_unused=True)
    assert not await asyncio.to_thread(_exists, a, queue)


async def _in_use(server, queue: str) -> bool:
    """Whether the queue's stats show a consumer of some node using it (the rule the AMQP front applies)."""
    async with AsyncClient(server.url) as native:
        return state.used_recently(await native.queue_stats(queue))


async def test_a_node_keeps_nothing_of_the_queues_and_exchanges_deleted_through_it(nodes):
    """A routed node caches what it read of queues and exchanges (whether a queue dead-letters, when an
    exchange was last read): queues and exchanges that came and went through it, or a publish to an exchange
    that does not exist, leave no entry behind (issue 12: memory follows what is stored)."""
    _, b = nodes

    def churn() -> None:
        connection = pika.BlockingConnection(pika.URLParameters(_url(b)))
        try:
            channel = connection.channel()
            for i in range(3):
                queue, exchange = f"churn-q{i}", f"churn-x{i}"
                channel.queue_declare(queue, arguments={"x-dead-letter-exchange": "churn-nowhere"})
                channel.exchange_declare(exchange, "topic")
                channel.queue_bind(queue, exchange, routing_key="k")
                channel.basic_publish(exchange, "k", b"m")
                deadline = time.monotonic() + 10
                while (got := channel.basic_get(queue))[0] is None:
                    assert time.monotonic() < deadline, "the message never reached the queue"
                    time.sleep(0.05)
                channel.basic_reject(got[0].delivery_tag, requeue=False)
                channel.exchange_delete(exchange)
                channel.queue_delete(queue)
            with contextlib.suppress(ChannelClosedByBroker):
                channel.basic_publish("churn-missing", "k", b"m")
                channel.queue_declare("churn-probe", passive=True)  # the 404 of the publish arrives by then
        finally:
            connection.close()

    await asyncio.to_thread(churn)
    assert [(table, name) for table, name in _names_held(b.amqp) if "churn" in name] == []
