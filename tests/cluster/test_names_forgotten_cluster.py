"""On a cluster too, nothing reachable from a node names a queue, topic, exchange or dedup id that is gone (issue
12: memory follows what is stored): tests/integration/test_names_forgotten.py's churn through every front, run
through both nodes of a two-node cluster on PostgreSQL, so names owned by one node are used and deleted through
the other (forwarded calls, fan-out relays, placements, an AMQP node's caches), then the same walk from each
node's `Server`."""

from __future__ import annotations

import asyncio
import types

import pytest

from chute.cluster import placement as placement_module
from chute.cluster.placement import MemoryPlacement
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
