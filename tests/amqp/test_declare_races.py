"""Races of AMQP declares, binds and deletes (issue 12: memory follows what is stored). The front notes a name
after an `await` (the queue or topic being made, a binding stored, a setting read); if another connection deletes
that name meanwhile, the note must not outlive it: the book, the dead-letter and expiry tables and the saved book
keep nothing of what is gone, and every call gets the answer it would get had the delete come first or last.

Each test holds one broker call (`_straddle`) at the moment in question, deletes through the front or a second
connection, releases the call, then walks everything reachable from the server for the churned names
(tests/integration/test_names_forgotten.py). On a single node the held call is the `Broker`'s, which waits on the
group commit; on a node of a two-node cluster on PostgreSQL it is the router's (forwarded calls, reads through)."""

from __future__ import annotations

import asyncio

import pika
import pytest

from chute.amqp import state as amqp_state
from chute.server.app import Server
from chute.server.config import ServerConfig
from tests.cluster.inprocess import running_nodes
from tests.cluster.test_amqp_cluster import SHARDS, _config
from tests.integration.test_names_forgotten import MARKER, paths_to_marker
from tests.server_loop import compact_timers

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(params=["single", "cluster"])
async def node(request, tmp_path):
    """A `Server` on this test's loop with its AMQP listener on an ephemeral port: alone on a data directory, or
    the first of a two-node cluster on PostgreSQL."""
    if request.param == "single":
        config = ServerConfig(host="127.0.0.1", port=0, http_port=0, amqp_port=0, data_dir=str(tmp_path / "data"))
        server = await Server(config).start()
        try:
            yield server
        finally:
            await server.stop()
        return
    async with running_nodes(request.getfixturevalue("postgres_url"), tmp_path, 2, SHARDS, _config) as servers:
        yield servers[0]


def _amqp_url(server: Server) -> str:
    return f"amqp://127.0.0.1:{server.amqp_port}/"


def _settle(server: Server) -> None:
    """Empty each broker's recent messages and compact its timers to the live ones (the test's loop is the
    server's: nothing runs meanwhile)."""
    node = getattr(server.broker, "node", None)
    for broker in node.local_brokers().values() if node is not None else [server.broker]:
        broker.core.recent.clear()
        compact_timers(broker.core)


async def _straddle(node: Server, method: str, matches, act, delete) -> None:
    """`act(channel)` on a new connection, whose first call of the broker's `method` with arguments that `matches`
    does its work and is then held (the front's next step waits); meanwhile `await delete()`; then the call
    answers and `act` finishes."""
    broker = node.broker  # a cluster node's: its router
    held, release = asyncio.Event(), asyncio.Event()
    original = getattr(broker, method)

    async def holding(*args, **kwargs):
        result = await amqp_state.value(original(*args, **kwargs))
        if matches(*args) and not held.is_set():
            held.set()
            await release.wait()
        return result

    setattr(broker, method, holding)
    try:
        acting = asyncio.create_task(asyncio.to_thread(_on_channel, _amqp_url(node), act))
        await asyncio.wait_for(held.wait(), 10)
        await delete()
        release.set()
        await asyncio.wait_for(acting, 10)
    finally:
        release.set()
        setattr(broker, method, original)


def _on_channel(url: str, act) -> None:
    """`act(channel)` on a channel of a new connection to `url` (closed after)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        act(connection.channel())
    finally:
        connection.close()


def _delete_exchange(url: str, name: str) -> None:
    _on_channel(url, lambda channel: channel.exchange_delete(name))


def _delete_queue(url: str, name: str) -> None:
    _on_channel(url, lambda channel: channel.queue_delete(name))


async def test_a_queue_deleted_while_its_dead_letter_queue_is_given_keeps_nothing(node):
    """A queue declared with a dead-letter exchange that leads nowhere yet gets its dead-letter queue once a bind
    makes one (RabbitMQ's behaviour; declare.resolve_dead_letters). If this node deletes the queue while that
    update is in flight, what the update returned must not be noted after the delete: the node would keep an
    entry for a queue that is gone."""
    front = node.amqp
    name, exchange, target = (f"{MARKER}-dl-straddle-{part}" for part in ("queue", "exchange", "target"))
    url = _amqp_url(node)

    def declare(channel) -> None:
        channel.queue_declare(name, arguments={"x-dead-letter-exchange": exchange})
        channel.exchange_declare(exchange, "fanout")
        channel.queue_declare(target)

    await asyncio.to_thread(_on_channel, url, declare)
    assert name in front.pending_dead_letters
    # the bind that gives `name` its dead-letter queue, held once the update is made; the delete is what
    # queue.delete and x-expires do
    await _straddle(node, "update_queue", lambda queue: queue == name,
                    lambda channel: channel.queue_bind(target, exchange), lambda: front._delete(name))  # fmt: skip
    assert name not in front.book.queues and name not in front.dead_lettering
    assert name not in front.pending_dead_letters
    await asyncio.to_thread(_delete_exchange, url, exchange)  # the rest as any user would delete it
    await asyncio.to_thread(_delete_queue, url, target)
    _settle(node)
    assert paths_to_marker(node, "dl-straddle") == []


async def test_a_queue_deleted_while_it_is_declared_keeps_nothing(node):
    """Another connection deletes a queue while its queue.declare is being made (between the queue's creation
    and the declare's answer): the declare is answered, and the node keeps nothing of the queue (its book, its
    expiry countdown, its pending dead-letter exchange)."""
    front = node.amqp
    name = f"{MARKER}-declare-straddle"
    arguments = {"x-expires": 60_000, "x-dead-letter-exchange": f"{MARKER}-nowhere"}

    def declare(channel) -> None:
        channel.queue_declare(name, arguments=arguments)

    await _straddle(node, "create_queue", lambda queue, *_: queue == name, declare, lambda: front._delete(name))
    assert name not in front.book.queues and name not in front.dead_lettering
    assert name not in front.pending_dead_letters and name not in front.expires and name not in front._expiry
    _settle(node)
    assert paths_to_marker(node, "declare-straddle") == []


@pytest.mark.parametrize("deleted", ["queue", "exchange"])
async def test_a_queue_or_exchange_deleted_while_it_is_bound_keeps_no_binding(node, deleted):
    """Another connection deletes the queue (or the exchange) of a queue.bind while the bind is being made: the
    bind is answered, and the node's book keeps no binding of what is gone."""
    front = node.amqp
    name, exchange = f"{MARKER}-bind-straddle-queue", f"{MARKER}-bind-straddle-exchange"
    url = _amqp_url(node)

    def declare(channel) -> None:
        channel.queue_declare(name)
        channel.exchange_declare(exchange, "direct")

    await asyncio.to_thread(_on_channel, url, declare)

    def delete():
        return front._delete(name) if deleted == "queue" else asyncio.to_thread(_delete_exchange, url, exchange)

    await _straddle(node, "subscribe", lambda topic, pattern, queue, *_: queue == name,
                    lambda channel: channel.queue_bind(name, exchange, "key"), delete)  # fmt: skip
    assert not [b for b in front.book.bindings if name in b["queue"] or exchange in b["exchange"]]
    await asyncio.to_thread(_delete_queue if deleted == "exchange" else _delete_exchange, url,
                            name if deleted == "exchange" else exchange)  # fmt: skip
    _settle(node)
    assert paths_to_marker(node, "bind-straddle") == []


@pytest.mark.parametrize("node", ["cluster"], indirect=True)  # a single node reads both from its book: no await
async def test_an_exchange_deleted_while_it_is_bound_to_another_keeps_no_binding(node):
    """exchange.bind reads its destination, then its source: the destination, deleted by another connection
    while the source is read, is not found (404, as if deleted first; it failed with 541 and closed the
    connection) and leaves no exchange binding in the node's book."""
    front = node.amqp
    source, destination = f"{MARKER}-xbind-straddle-source", f"{MARKER}-xbind-straddle-destination"
    url = _amqp_url(node)

    def declare(channel) -> None:
        channel.exchange_declare(source, "direct")
        channel.exchange_declare(destination, "fanout")

    def bind(channel) -> None:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            channel.exchange_bind(destination, source, "key")
        assert refused.value.reply_code == 404 and destination in refused.value.reply_text

    await asyncio.to_thread(_on_channel, url, declare)
    front.exchanges_read.clear()  # the bind reads both again
    # held: the source's read
    await _straddle(node, "topic_info", lambda topic, *_: source in topic, bind,
                    lambda: asyncio.to_thread(_delete_exchange, url, destination))  # fmt: skip
    assert not [b for b in front.book.exchange_bindings if destination in (b["source"], b["destination"])]
    await asyncio.to_thread(_delete_exchange, url, source)
    _settle(node)
    assert paths_to_marker(node, "xbind-straddle") == []


# a single node does not read through: a delete finds no exchange in the book until the declare is answered
@pytest.mark.parametrize("node", ["cluster"], indirect=True)
async def test_an_exchange_deleted_while_it_is_declared_keeps_nothing(node):
    """Another connection deletes an exchange (twice at once) while its exchange.declare is being made: every
    call is answered, and the node's book keeps nothing of the exchange."""
    front, router = node.amqp, node.broker
    name = f"{MARKER}-xdeclare-straddle"
    url = _amqp_url(node)
    original_delete = router.delete_topic
    arrivals: list[str] = []
    both_deleting = asyncio.Event()

    async def slow_delete(topic, *args, **kwargs):  # the first delete waits for the second: the two overlap
        if name in topic:
            arrivals.append(topic)
            if len(arrivals) == 2:
                both_deleting.set()
            await asyncio.wait_for(both_deleting.wait(), 10)
        return await original_delete(topic, *args, **kwargs)

    async def delete_twice() -> None:
        deletes = [asyncio.to_thread(_delete_exchange, url, name) for _ in range(2)]
        await asyncio.wait_for(asyncio.gather(*deletes), 15)
        assert len(arrivals) == 2  # both deletes reached the router before either had forgotten the exchange

    router.delete_topic = slow_delete
    try:  # the declare is held once the topic is made
        await _straddle(node, "create_topic", lambda topic, *_: name in topic,
                        lambda channel: channel.exchange_declare(name, "topic"), delete_twice)  # fmt: skip
    finally:
        router.delete_topic = original_delete
    assert name not in front.book.exchanges and name not in front.exchanges_read
    _settle(node)
    assert paths_to_marker(node, "xdeclare-straddle") == []
