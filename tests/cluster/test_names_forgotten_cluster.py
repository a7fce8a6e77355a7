"""On a cluster too, nothing reachable from a node names a queue, topic, exchange or dedup id that is gone (issue
12: memory follows what is stored): tests/integration/test_names_forgotten.py's churn through every front, run
through both nodes of a two-node cluster on PostgreSQL, so names owned by one node are used and deleted through
the other (forwarded calls, fan-out relays, placements, an AMQP node's caches), then the same walk from each
node's `Server`; and the ids and receipts of messages acked through a node that forwards half the calls."""

from __future__ import annotations

import asyncio
import types

import pika
import pytest

from chute.amqp import state as amqp_state
from chute.client import AsyncClient
from chute.cluster import placement as placement_module
from chute.cluster.placement import MemoryPlacement, Placed, home_shard
from tests.cluster.inprocess import running_nodes
from tests.cluster.test_amqp_cluster import SHARDS, _config
from tests.integration.test_names_forgotten import MARKER, _amqp, _http, _native, _sqs, paths_to_marker
from tests.server_loop import compact_timers

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def nodes(postgres_url, tmp_path):
    async with running_nodes(postgres_url, tmp_path, 2, SHARDS, _config) as servers:
        yield servers


def _addresses(server) -> types.SimpleNamespace:
    return types.SimpleNamespace(url=f"chute://127.0.0.1:{server.port}", http_port=server.http_port,
                                 http_url=f"http://127.0.0.1:{server.http_port}",
                                 amqp_url=f"amqp://127.0.0.1:{server.amqp_port}/")  # fmt: skip


def _settle(server) -> None:
    """Empty each local broker's recent messages and compact its timers to the live ones (the test's loop is the
    nodes' loop: nothing runs meanwhile)."""
    for broker in server.broker.node.local_brokers().values():
        broker.core.recent.clear()
        compact_timers(broker.core)


async def test_no_name_of_what_is_gone_stays_reachable_from_any_node(nodes):
    for i in range(4):  # names on every shard, through either node
        through = _addresses(nodes[i % 2])
        for front in (_native, _http, _sqs, _amqp):
            await asyncio.to_thread(front, through, i)
    for server in nodes:
        _settle(server)
    found = {server.broker.node.name: paths_to_marker(server, MARKER) for server in nodes}
    assert found == {server.broker.node.name: [] for server in nodes}


async def test_no_id_or_receipt_of_an_acked_message_stays_reachable_from_any_node(nodes):
    """Ids and receipts the same way, with every call made through node-0: a queue on each shard (half of them
    owned by node-1, so every call about them forwarded), messages delivered, nacked, redelivered and acked."""
    names: dict[int, str] = {}
    i = 0
    while len(names) < SHARDS:  # one queue name per shard
        names.setdefault(placement_module.home_shard(f"ids-{i}", SHARDS), f"ids-{i}")
        i += 1
    queues = list(names.values())
    gone: set[int] = set()
    async with AsyncClient(f"chute://127.0.0.1:{nodes[0].port}", reconnect=False) as client:
        for queue in queues:
            await client.create_queue(queue)
            await client.publish_batch(queue, [b"m"] * 10)
            first = await _received(client, queue, 10)
            await client.nack(first[:3])
            await client.ack(first[3:])
            again = await _received(client, queue, 3)
            await client.ack(again)
            gone |= {d.message.id for d in first + again} | {d.receipt for d in first + again}
            await client.publish(queue, b"kept")  # (its shard's latest id: not one of those acked)
    for server in nodes:
        _settle(server)
    # (a broker's first receipt is its receipt counter's base, a constant of its run)
    found = {server.broker.node.name: [p for p in paths_to_marker(server, None, values=frozenset(gone))
                                       if not p.endswith(".receipt_base")] for server in nodes}  # fmt: skip
    assert found == {server.broker.node.name: [] for server in nodes}


async def _received(client, queue: str, count: int) -> list:
    got: list = []
    while len(got) < count:
        batch = await client.receive(queue, max_messages=count - len(got), wait_s=10)
        assert batch, f"{queue}: {len(got)} of {count} delivered"
        got += batch
    return got


async def test_a_nodes_placement_cache_is_bounded(monkeypatch):
    """Rows of names deleted through another node cannot be forgotten here when they go: the cache keeps the
    CACHE_MAX rows cached last, and a row dropped from it is read again when used (and a name gone meanwhile is
    found gone)."""
    monkeypatch.setattr(placement_module, "CACHE_MAX", 3)
    book: dict = {}
    elsewhere, here = MemoryPlacement(4, book), MemoryPlacement(4, book)  # two nodes' views of one table
    for i in range(5):
        await elsewhere.place(f"q{i}", "queue")
        assert (await here.lookup(f"q{i}")).name == f"q{i}"
    assert list(here._cache) == ["q2", "q3", "q4"]
    await here.lookup("q2")  # a hit changes nothing (the cache is first in, first out)
    await elsewhere.forget("q0", "queue")
    assert await here.lookup("q0") is None  # not cached: read, and gone
    assert (await here.lookup("q1")).shard == placement_module.home_shard("q1", 4)  # read again
    assert list(here._cache) == ["q3", "q4", "q1"]


class _SlowReads(MemoryPlacement):
    """A placement whose reads can be held between reading a row and returning it, as a database read in flight."""

    def __init__(self, shards: int, book: dict) -> None:
        super().__init__(shards, book)
        self.read_done, self.release = asyncio.Event(), asyncio.Event()
        self.release.set()

    async def _read(self, name: str):
        placed = await super()._read(name)
        self.read_done.set()
        await self.release.wait()
        return placed


@pytest.mark.parametrize("change", ["forget here", "deleted elsewhere", "moved", "refreshed"])
async def test_a_row_read_while_it_changes_is_not_cached(change):
    """A lookup whose read returns after the row was deleted (or moved) gives its caller what it read, but the
    cache does not keep it: a deleted queue's row would outlive it (found on a loaded machine, where a rejected
    AMQP message's dead-lettering looked its queue up while the queue was deleted: its row stayed cached on both
    nodes), and a moved queue's old row would be used again."""
    book: dict = {}
    elsewhere, here = MemoryPlacement(4, book), _SlowReads(4, book)
    await elsewhere.place("q", "queue")
    here.release.clear()
    reading = asyncio.create_task(here.lookup("q"))
    await asyncio.wait_for(here.read_done.wait(), 5)  # the old row is read; the lookup has not returned yet
    if change == "forget here":
        await here.forget("q", "queue")
    elif change == "deleted elsewhere":
        await elsewhere.forget("q", "queue")
        here.uncache("q")  # (what a node does when the owner it forwarded the delete to says it is done)
    elif change == "moved":
        assert await elsewhere.move("q", "queue", home_shard("q", 4), (home_shard("q", 4) + 1) % 4)
        here.uncache("q")
    else:
        book["q"] = Placed("q", "queue", (home_shard("q", 4) + 2) % 4)
        refreshing = asyncio.create_task(here.refresh("q"))
        await asyncio.sleep(0)
    here.release.set()
    assert (await asyncio.wait_for(reading, 5)) == Placed("q", "queue", home_shard("q", 4))  # what it read
    if change == "refreshed":
        assert await asyncio.wait_for(refreshing, 5) == book["q"]
    assert here._cache.get("q") in (None, book.get("q"))  # nothing, or the row as it is now
    assert await here.lookup("q") == book.get("q")


@pytest.mark.parametrize("kind", ["queue", "exchange"])
async def test_an_amqp_read_in_flight_while_its_queue_or_exchange_is_deleted_keeps_nothing(nodes, kind):
    """A cluster node's AMQP front reads a queue's (or an exchange's) settings from the node that owns it and takes
    them into its book. If this node deletes that queue while the read is in flight, settings read before the
    delete must not be taken after it: the name would stay in the book and the front's tables after what it names
    is gone. (The same race as the placement cache's, above; the refresh reads again and finds it gone.)"""
    node = nodes[0]
    front, router = node.amqp, node.broker
    name = f"{MARKER}-straddle-{kind}"

    def declare() -> None:
        connection = pika.BlockingConnection(pika.URLParameters(_addresses(node).amqp_url))
        try:
            channel = connection.channel()
            if kind == "queue":
                channel.queue_declare(name, arguments={"x-dead-letter-exchange": f"{MARKER}-nowhere"})
            else:
                channel.exchange_declare(name, "topic")
        finally:
            connection.close()

    await asyncio.to_thread(declare)
    held, release = asyncio.Event(), asyncio.Event()
    info_call = "queue_info" if kind == "queue" else "topic_info"
    original = getattr(router, info_call)

    async def slow_info(*args, **kwargs):  # the first read returns what it read only once released
        result = await amqp_state.value(original(*args, **kwargs))
        if not held.is_set():
            held.set()
            await release.wait()
        return result

    setattr(router, info_call, slow_info)
    try:
        if kind == "queue":
            reading = asyncio.create_task(amqp_state.refresh_queue(front, name))
        else:
            reading = asyncio.create_task(amqp_state.refresh_exchange(front, name))
        await asyncio.wait_for(held.wait(), 10)  # the settings are read; the refresh has not taken them yet
        if kind == "queue":
            await front._delete(name)  # what queue.delete and x-expires do
        else:
            await asyncio.to_thread(_delete_exchange, _addresses(node).amqp_url, name)
        release.set()
        await asyncio.wait_for(reading, 10)
    finally:
        setattr(router, info_call, original)
    assert name not in front.book.queues and name not in front.book.exchanges
    assert name not in front.dead_lettering and name not in front.exchanges_read
    assert not [key for key in front.stored if name in key[1]]
    _settle(node)
    assert paths_to_marker(node, "straddle") == []


def _held_once(original, matches, held: asyncio.Event, release: asyncio.Event):
    """`original` (a router method), whose first call with arguments that `matches` does its work, sets `held`
    and answers only once `release` is set: the caller's next step waits while the test acts."""

    async def holding(*args, **kwargs):
        result = await amqp_state.value(original(*args, **kwargs))
        if matches(*args) and not held.is_set():
            held.set()
            await release.wait()
        return result

    return holding


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


async def test_a_queue_deleted_while_its_dead_letter_queue_is_given_keeps_nothing(nodes):
    """A queue declared with a dead-letter exchange that leads nowhere yet gets its dead-letter queue once a bind
    makes one (RabbitMQ's behaviour; declare.resolve_dead_letters). If this node deletes the queue while that
    update is in flight, what the update returned must not be noted after the delete: the node would keep an
    entry for a queue that is gone."""
    node = nodes[0]
    front, router = node.amqp, node.broker
    name, exchange, target = (f"{MARKER}-dl-straddle-{part}" for part in ("queue", "exchange", "target"))
    url = _addresses(node).amqp_url

    def declare(channel) -> None:
        channel.queue_declare(name, arguments={"x-dead-letter-exchange": exchange})
        channel.exchange_declare(exchange, "fanout")
        channel.queue_declare(target)

    await asyncio.to_thread(_on_channel, url, declare)
    assert name in front.pending_dead_letters
    held, release = asyncio.Event(), asyncio.Event()
    original = router.update_queue
    router.update_queue = _held_once(original, lambda queue: queue == name, held, release)  # the update is made
    try:
        # the bind that gives `name` its dead-letter queue
        binding = asyncio.create_task(asyncio.to_thread(_on_channel, url, lambda c: c.queue_bind(target, exchange)))
        await asyncio.wait_for(held.wait(), 10)
        await front._delete(name)  # what queue.delete and x-expires do
        release.set()
        await asyncio.wait_for(binding, 10)
    finally:
        router.update_queue = original
    assert name not in front.book.queues and name not in front.dead_lettering
    assert name not in front.pending_dead_letters
    await asyncio.to_thread(_delete_exchange, url, exchange)  # the rest as any user would delete it
    await asyncio.to_thread(_delete_queue, url, target)
    _settle(node)
    assert paths_to_marker(node, "dl-straddle") == []


async def test_a_queue_deleted_while_it_is_declared_keeps_nothing(nodes):
    """Another connection deletes a queue while its queue.declare is being made (between the queue's creation
    and the declare's answer): the declare is answered, and the node keeps nothing of the queue (its book, its
    expiry countdown, its pending dead-letter exchange)."""
    node = nodes[0]
    front, router = node.amqp, node.broker
    name = f"{MARKER}-declare-straddle"
    held, release = asyncio.Event(), asyncio.Event()
    original = router.create_queue
    arguments = {"x-expires": 60_000, "x-dead-letter-exchange": f"{MARKER}-nowhere"}

    def declare(channel) -> None:
        channel.queue_declare(name, arguments=arguments)

    router.create_queue = _held_once(original, lambda queue, *_: queue == name, held, release)  # the queue is made
    try:
        declaring = asyncio.create_task(asyncio.to_thread(_on_channel, _addresses(node).amqp_url, declare))
        await asyncio.wait_for(held.wait(), 10)
        await front._delete(name)
        release.set()
        await asyncio.wait_for(declaring, 10)
    finally:
        router.create_queue = original
    assert name not in front.book.queues and name not in front.dead_lettering
    assert name not in front.pending_dead_letters and name not in front.expires and name not in front._expiry
    _settle(node)
    assert paths_to_marker(node, "declare-straddle") == []


@pytest.mark.parametrize("deleted", ["queue", "exchange"])
async def test_a_queue_or_exchange_deleted_while_it_is_bound_keeps_no_binding(nodes, deleted):
    """Another connection deletes the queue (or the exchange) of a queue.bind while the bind is being made: the
    bind is answered, and the node's book keeps no binding of what is gone."""
    node = nodes[0]
    front, router = node.amqp, node.broker
    name, exchange = f"{MARKER}-bind-straddle-queue", f"{MARKER}-bind-straddle-exchange"
    url = _addresses(node).amqp_url
    held, release = asyncio.Event(), asyncio.Event()
    original = router.subscribe

    def declare(channel) -> None:
        channel.queue_declare(name)
        channel.exchange_declare(exchange, "direct")

    await asyncio.to_thread(_on_channel, url, declare)
    router.subscribe = _held_once(original, lambda topic, pattern, queue, *_: queue == name, held, release)
    try:
        bind = asyncio.to_thread(_on_channel, url, lambda channel: channel.queue_bind(name, exchange, "key"))
        binding = asyncio.create_task(bind)
        await asyncio.wait_for(held.wait(), 10)
        if deleted == "queue":
            await front._delete(name)
        else:
            await asyncio.to_thread(_delete_exchange, url, exchange)
        release.set()
        await asyncio.wait_for(binding, 10)
    finally:
        router.subscribe = original
    assert not [b for b in front.book.bindings if name in b["queue"] or exchange in b["exchange"]]
    await asyncio.to_thread(_delete_queue if deleted == "exchange" else _delete_exchange, url,
                            name if deleted == "exchange" else exchange)  # fmt: skip
    _settle(node)
    assert paths_to_marker(node, "bind-straddle") == []


async def test_an_exchange_deleted_while_it_is_bound_to_another_keeps_no_binding(nodes):
    """exchange.bind reads its destination, then its source: the destination, deleted by another connection
    while the source is read, is not found (404, as if deleted first; it failed with 541 and closed the
    connection) and leaves no exchange binding in the node's book."""
    node = nodes[0]
    front, router = node.amqp, node.broker
    source, destination = f"{MARKER}-xbind-straddle-source", f"{MARKER}-xbind-straddle-destination"
    url = _addresses(node).amqp_url
    held, release = asyncio.Event(), asyncio.Event()
    original = router.topic_info

    def declare(channel) -> None:
        channel.exchange_declare(source, "direct")
        channel.exchange_declare(destination, "fanout")

    def bind(channel) -> None:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            channel.exchange_bind(destination, source, "key")
        assert refused.value.reply_code == 404 and destination in refused.value.reply_text

    await asyncio.to_thread(_on_channel, url, declare)
    front.exchanges_read.clear()  # the bind reads both again
    router.topic_info = _held_once(original, lambda topic, *_: source in topic, held, release)  # the source's read
    try:
        binding = asyncio.create_task(asyncio.to_thread(_on_channel, url, bind))
        await asyncio.wait_for(held.wait(), 10)
        await asyncio.to_thread(_delete_exchange, url, destination)
        release.set()
        await asyncio.wait_for(binding, 10)
    finally:
        router.topic_info = original
    assert not [b for b in front.book.exchange_bindings if destination in (b["source"], b["destination"])]
    await asyncio.to_thread(_delete_exchange, url, source)
    _settle(node)
    assert paths_to_marker(node, "xbind-straddle") == []


async def test_an_exchange_deleted_while_it_is_declared_keeps_nothing(nodes):
    """Another connection deletes an exchange (twice at once) while its exchange.declare is being made: every
    call is answered, and the node's book keeps nothing of the exchange."""
    node = nodes[0]
    front, router = node.amqp, node.broker
    name = f"{MARKER}-xdeclare-straddle"
    url = _addresses(node).amqp_url
    held, release = asyncio.Event(), asyncio.Event()
    original_create, original_delete = router.create_topic, router.delete_topic
    arrivals: list[str] = []
    both_deleting = asyncio.Event()

    async def slow_delete(topic, *args, **kwargs):  # the first delete waits for the second: the two overlap
        if name in topic:
            arrivals.append(topic)
            if len(arrivals) == 2:
                both_deleting.set()
            await asyncio.wait_for(both_deleting.wait(), 10)
        return await original_delete(topic, *args, **kwargs)

    slow_create = _held_once(original_create, lambda topic, *_: name in topic, held, release)  # the topic is made
    router.create_topic, router.delete_topic = slow_create, slow_delete
    try:
        declare = asyncio.to_thread(_on_channel, url, lambda channel: channel.exchange_declare(name, "topic"))
        declaring = asyncio.create_task(declare)
        await asyncio.wait_for(held.wait(), 10)
        deletes = [asyncio.to_thread(_delete_exchange, url, name) for _ in range(2)]
        await asyncio.wait_for(asyncio.gather(*deletes), 15)
        assert len(arrivals) == 2  # both deletes reached the router before either had forgotten the exchange
        release.set()
        await asyncio.wait_for(declaring, 10)
    finally:
        router.create_topic, router.delete_topic = original_create, original_delete
    assert name not in front.book.exchanges and name not in front.exchanges_read
    _settle(node)
    assert paths_to_marker(node, "xdeclare-straddle") == []
