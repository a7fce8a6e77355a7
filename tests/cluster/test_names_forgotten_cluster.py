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
from tests.amqp.test_declare_races import _delete_exchange
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
