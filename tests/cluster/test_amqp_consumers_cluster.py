"""AMQP consumers across the nodes of a cluster (two in-process nodes on one PostgreSQL, aio-pika), and the
consumer registry under them (chute.cluster.consumers, on a database of its own).

What RabbitMQ decides over all of a queue's consumers holds whichever node each consumer is connected to:
- an exclusive consumer holds its queue on every node (403 ACCESS_REFUSED for any other consumer, and for an
  exclusive one while another consumer exists);
- queue.declare-ok's consumer_count counts every node's consumers;
- an x-single-active-consumer queue delivers to one consumer of the whole cluster, the first registered; when it
  is cancelled, or its node stops, the next one takes over."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aio_pika
import aiormq.exceptions
import asyncpg
import pytest

from chute.amqp.consumer_registry import TRUST_S, ClusterConsumers
from chute.cluster import consumers as registry
from chute.storage.postgres.schema import migrate
from tests.cluster.inprocess import running_nodes
from tests.cluster.test_amqp_cluster import SHARDS, _config, _url, owned_by
from tests.postgres.helpers import connected, fresh_database

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def nodes(postgres_url, tmp_path):
    async with running_nodes(postgres_url, tmp_path, 2, SHARDS, _config) as servers:
        yield servers


async def _channel(server) -> tuple[aio_pika.abc.AbstractConnection, aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect(_url(server))
    return connection, await connection.channel()


@contextlib.asynccontextmanager
async def _channels(*servers):
    """A connection and a channel through each of `servers`: [(connection, channel), ...], closed at the end."""
    opened = []
    try:
        for server in servers:
            opened.append(await _channel(server))
        yield opened
    finally:
        for connection, _ in opened:
            await connection.close()


async def _ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    pass


@pytest.mark.parametrize("home", [0, 1], ids=["queue-on-the-exclusive-consumers-node", "queue-on-the-other-node"])
async def test_an_exclusive_consumer_holds_its_queue_through_every_node(nodes, home):
    a, b = nodes
    name = owned_by(nodes[home], "xcons-")[0]
    async with _channels(a, b) as [(conn_a, ch_a), (conn_b, ch_b)]:
        queue_a = await ch_a.declare_queue(name)
        tag = await queue_a.consume(_ignore, exclusive=True)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused, match="in exclusive use"):
            await (await ch_b.declare_queue(name, passive=True)).consume(_ignore)
        ch_b = await conn_b.channel()  # the refusal closed the channel
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused, match="in exclusive use"):
            await (await ch_b.declare_queue(name, passive=True)).consume(_ignore, exclusive=True)

        await queue_a.cancel(tag)  # the queue is free again, through either node
        ch_b = await conn_b.channel()
        queue_b = await ch_b.declare_queue(name, passive=True)
        await queue_b.consume(_ignore)
        ch_a = await conn_a.channel()  # now node B's (plain) consumer keeps node A's exclusive one out
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused, match="in exclusive use"):
            await (await ch_a.declare_queue(name, passive=True)).consume(_ignore, exclusive=True)


async def test_declare_ok_counts_the_consumers_of_every_node(nodes):
    a, b = nodes
    name = owned_by(a, "count-")[0]
    async with _channels(a, b) as [(conn_a, ch_a), (_, ch_b)]:
        queue_a = await ch_a.declare_queue(name)
        await queue_a.consume(_ignore)
        await queue_a.consume(_ignore)
        queue_b = await ch_b.declare_queue(name, passive=True)
        tag_b = await queue_b.consume(_ignore)
        for channel in (ch_a, ch_b):
            declared = await channel.declare_queue(name, passive=True)
            assert declared.declaration_result.consumer_count == 3
        await queue_b.cancel(tag_b)
        assert (await ch_a.declare_queue(name, passive=True)).declaration_result.consumer_count == 2
        await conn_a.close()  # its consumers go with it
        assert (await ch_b.declare_queue(name, passive=True)).declaration_result.consumer_count == 0


class _Received:
    """What one consumer got (acked as it arrives)."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.changed = asyncio.Event()

    async def __call__(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.bodies.append(message.body)
        self.changed.set()
        await message.ack()

    async def until(self, count: int, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.bodies) < count:
            self.changed.clear()
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"got {len(self.bodies)} of {count} within {timeout_s} s"
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except TimeoutError:
                pass


async def _publish(channel, name: str, bodies: list[bytes]) -> None:
    for body in bodies:
        await channel.default_exchange.publish(aio_pika.Message(body), routing_key=name)


@pytest.mark.parametrize("first_on", [0, 1], ids=["first-on-the-queues-node", "first-on-the-other-node"])
async def test_a_single_active_consumer_queue_delivers_to_one_consumer_of_the_cluster(nodes, first_on):
    name = owned_by(nodes[0], "sac-")[0]
    first_node, second_node = nodes[first_on], nodes[1 - first_on]
    async with _channels(first_node, second_node, nodes[0]) as [(_, ch_1), (_, ch_2), (_, ch_p)]:
        queue_1 = await ch_1.declare_queue(name, arguments={"x-single-active-consumer": True})
        got_1, got_2 = _Received(), _Received()
        tag_1 = await queue_1.consume(got_1)
        queue_2 = await ch_2.declare_queue(name, arguments={"x-single-active-consumer": True})
        await queue_2.consume(got_2)

        await _publish(ch_p, name, [b"a%d" % i for i in range(20)])
        await got_1.until(20)
        assert got_1.bodies == [b"a%d" % i for i in range(20)]  # all of them, in order, to the active one
        assert got_2.bodies == []  # the other node's consumer waits its turn

        await queue_1.cancel(tag_1)  # the next one registered becomes the active one, on its node
        await _publish(ch_p, name, [b"b%d" % i for i in range(20)])
        await got_2.until(20)
        assert got_2.bodies == [b"b%d" % i for i in range(20)]
        assert len(got_1.bodies) == 20


async def test_when_the_active_consumers_node_stops_the_next_consumer_takes_over(nodes):
    a, b = nodes
    name = owned_by(a, "sac-stop-")[0]
    async with _channels(b, a) as [(_, ch_b), (_, ch_a)]:
        got_b, got_a = _Received(), _Received()
        queue_b = await ch_b.declare_queue(name, arguments={"x-single-active-consumer": True})
        await queue_b.consume(got_b)
        await (await ch_a.declare_queue(name, arguments={"x-single-active-consumer": True})).consume(got_a)
        await _publish(ch_a, name, [b"x%d" % i for i in range(20)])  # through the queue's node, whose consumer waits
        await got_b.until(20)
        assert got_a.bodies == []

        await b.stop()  # its connection and consumer go with it; the consumer of node A is the active one now
        await _publish(ch_a, name, [b"y%d" % i for i in range(5)])
        await got_a.until(5, timeout_s=30.0)
        assert got_a.bodies == [b"y%d" % i for i in range(5)]


# -- the registry itself ---------------------------------------------------------------------------------------


@pytest.fixture
async def database(postgres_url):
    url = await fresh_database(postgres_url)
    async with connected(url) as connection:
        await migrate(connection)
        for name, incarnation in (("n1", "i1"), ("n2", "i2")):
            await connection.execute("INSERT INTO chute_nodes (name, incarnation, host, lease_s) VALUES ($1, $2, "
                                     "'127.0.0.1', 60)", name, incarnation)  # fmt: skip
    return url


async def test_only_one_of_concurrent_exclusive_consumers_registers(database):
    connections = [await asyncpg.connect(database) for _ in range(6)]
    try:
        ids = await asyncio.gather(*(registry.register(connection, "q", f"n{1 + i % 2}", f"i{1 + i % 2}",
                                                       exclusive=True, priority=0)
                                     for i, connection in enumerate(connections)))  # fmt: skip
        assert sum(each is not None for each in ids) == 1
        assert await registry.register(connections[0], "q", "n1", "i1", exclusive=False, priority=0) is None
        assert await registry.register(connections[0], "other", "n1", "i1", exclusive=False, priority=0)
    finally:
        for connection in connections:
            await connection.close()


async def test_rows_of_a_process_that_is_gone_do_not_count_and_are_swept(database):
    async with connected(database) as connection:
        first = await registry.register(connection, "q", "n1", "i1", exclusive=False, priority=0)
        second = await registry.register(connection, "q", "n2", "i2", exclusive=False, priority=5)
        assert await registry.first(connection, ["q", "none"]) == {"q": first}
        assert await registry.count(connection, "q") == 2

        await connection.execute("UPDATE chute_nodes SET incarnation = 'i1-restarted' WHERE name = 'n1'")
        assert await registry.first(connection, ["q"]) == {"q": second}  # n1's process is gone
        assert await registry.count(connection, "q") == 1
        await connection.execute("UPDATE chute_nodes SET heartbeat_at = now() - interval '61 s' WHERE name = 'n2'")
        assert await registry.count(connection, "q") == 0  # n2 died: its lease (60 s) ran out
        await connection.execute("UPDATE chute_nodes SET heartbeat_at = now(), stopped = true WHERE name = 'n2'")
        assert await registry.count(connection, "q") == 0  # n2 stopped
        assert await registry.register(connection, "q", "n1", "i1-restarted", exclusive=True, priority=0)

        assert await registry.sweep(connection) == 2
        assert await registry.count(connection, "q") == 1


async def test_reconcile_makes_a_nodes_rows_match_its_live_consumers(database):
    async with connected(database) as connection:
        kept = await registry.register(connection, "q", "n1", "i1", exclusive=False, priority=0)
        stale = await registry.register(connection, "q", "n1", "i1", exclusive=False, priority=0)
        await connection.execute("INSERT INTO chute_consumers (queue, node, incarnation) VALUES ('q', 'n1', 'i0')")
        other = await registry.register(connection, "q", "n2", "i2", exclusive=False, priority=0)
        swept = 10**9  # a consumer whose row went while its node was cut off
        renewed = await registry.reconcile(connection, "n1", "i1", {kept: ("q", False, 0), swept: ("r", True, 3)})
        assert list(renewed) == [swept]
        rows = await connection.fetch("SELECT id, queue, node, exclusive, priority FROM chute_consumers ORDER BY id")
        assert [tuple(row) for row in rows] == [
            (kept, "q", "n1", False, 0), (other, "q", "n2", False, 0), (renewed[swept], "r", "n1", True, 3),
        ]  # fmt: skip
        assert stale not in {row["id"] for row in rows}


def test_a_node_that_cannot_read_the_registry_lets_no_consumer_be_the_active_one():
    class Consumer:
        queue = "q"

    front = type("Front", (), {"broker": type("Broker", (), {"consumer_registry": None})(), "single_active": {}})()
    consumers = ClusterConsumers(front)
    mine, other = Consumer(), Consumer()
    consumers.mine.update({mine: 7, other: 8})
    consumers.first, consumers.read_at = {"q": 7}, time.monotonic()
    assert consumers.active(mine) and not consumers.active(other)
    consumers.read_at -= TRUST_S + 0.1  # the last reading is too old: the database could not be read since
    assert not consumers.active(mine)


async def test_a_consume_while_the_registry_cannot_be_reached_is_refused_and_registers_nothing(nodes, monkeypatch):
    a, _ = nodes
    name = owned_by(a, "noreg-")[0]
    registry_of_a = a.amqp.cluster_consumers.registry
    async with _channels(a) as [(_, channel)]:
        queue = await channel.declare_queue(name)
        monkeypatch.setattr(type(registry_of_a.node), "pool", property(lambda node: _Unreachable()))
        with pytest.raises(aiormq.exceptions.ConnectionInternalError, match="consumer registry .* cannot be reached"):
            await queue.consume(_ignore)
        monkeypatch.undo()  # the database is back
    assert a.amqp.cluster_consumers.mine == {}
    assert await registry_of_a.count(name) == 0


class _Unreachable:
    """A pool whose connections cannot be had (the database is away)."""

    def acquire(self, **_options):
        return self

    async def __aenter__(self):
        raise OSError("connection refused")

    async def __aexit__(self, *exc):
        return False
