"""Membership and ownership with in-process nodes on one PostgreSQL: nodes share the shards evenly, rebalance
when one joins or leaves, agree on the shard count, and a second process with a node's name takes it over."""

from __future__ import annotations

import asyncio
import time

import pytest

from chute.cluster import ClusterError, ClusterNode
from chute.cluster.ownership import ShardRow, plan, target
from chute.errors import ChuteError, StorageFailed
from chute.storage.postgres.schema import SCHEMA_V1, SCHEMA_VERSION
from tests.postgres.helpers import connected, fresh_database

HEARTBEAT_S = 0.2
LEASE_S = 2.0


def _node(url: str, name: str, **options) -> ClusterNode:
    options.setdefault("heartbeat_s", HEARTBEAT_S)
    options.setdefault("lease_s", LEASE_S)
    return ClusterNode(url, name, **options)


async def until(nodes: list[ClusterNode], predicate, timeout_s: float = 30.0) -> None:
    """Wait until `predicate()` holds, looking again each time a node's view changes."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"never held; nodes serve {[(n.name, sorted(n.local_brokers())) for n in nodes]}")
        waits = [asyncio.ensure_future(n.wait_changed(left)) for n in nodes]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()


def _serving(nodes: list[ClusterNode]) -> list[set[int]]:
    return [set(n.local_brokers()) for n in nodes]


def _balanced(nodes: list[ClusterNode], shards: int) -> bool:
    held = _serving(nodes)
    low, high = shards // len(nodes), -(-shards // len(nodes))
    every = set().union(*held)
    return every == set(range(shards)) and sum(map(len, held)) == shards and all(low <= len(h) <= high for h in held)


def test_the_plan_gives_each_node_its_share_and_only_free_shards():
    assert [target(n, ["a", "b", "c"], 16) for n in "abc"] == [6, 5, 5]
    assert target("d", ["a", "b", "c"], 16) == 4  # a node not yet seen as alive counts itself
    rows = [ShardRow(0, "a", True), ShardRow(1, None, False), ShardRow(2, "b", False), ShardRow(3, "b", True)]
    take, give = plan("c", ["a", "b", "c"], rows, held=set(), busy=set())
    assert len(take) == 1 and set(take) <= {1, 2}  # its share (1 of 4): unowned or expired, never b's held one
    assert not give
    take, _ = plan("c", ["a", "c"], rows, held=set(), busy=set())  # b is dead: its shards are free
    assert len(take) == 2 and set(take) <= {1, 2, 3}
    take, give = plan("a", ["a", "b"], rows, held={0, 1, 2, 3}, busy={3})
    assert not take and len(give) == 2 and 3 not in give  # a busy shard is never handed back


async def test_nodes_share_the_shards_evenly_and_rebalance_as_nodes_join_and_leave(postgres_url):
    url = await fresh_database(postgres_url)
    a = await _node(url, "node-a").start()
    assert a.shards == 16 and set(a.local_brokers()) == set(range(16))  # alone, it holds every shard
    b = await _node(url, "node-b").start()
    c = await _node(url, "node-c").start()
    nodes = [a, b, c]
    await until(nodes, lambda: _balanced(nodes, 16))
    assert sorted(len(s) for s in _serving(nodes)) == [5, 5, 6]
    # what was written in a shard is there on its next owner: shard 0's broker moves from its holder on a stop
    holder = next(n for n in nodes if 0 in n.local_brokers())
    await holder.local_broker(0).create_queue("moved")
    await holder.local_broker(0).publish("moved", b"kept")
    await holder.stop()
    rest = [n for n in nodes if n is not holder]
    await until(rest, lambda: _balanced(rest, 16))
    assert sorted(len(s) for s in _serving(rest)) == [8, 8]
    new_holder = next(n for n in rest if 0 in n.local_brokers())
    assert [d.body for d in await new_holder.local_broker(0).peek("moved")] == [b"kept"]
    status = new_holder.status()
    assert status["healthy"] and status["shards"] == 16 and not status["unowned"]
    assert {n["name"]: n["alive"] for n in status["nodes"]} == {"node-a": True, "node-b": True, "node-c": True} | {
        holder.name: False
    }
    for node in rest:
        await node.stop()
    async with connected(url) as connection:
        assert await connection.fetchval("SELECT count(*) FROM chute_shards WHERE owner IS NOT NULL") == 0
        assert await connection.fetchval("SELECT bool_and(clean) FROM chute_streams") is True  # closed cleanly


async def test_the_shard_count_is_fixed_by_the_first_node(postgres_url):
    url = await fresh_database(postgres_url)
    first = await _node(url, "first", shards=4).start()
    assert first.shards == 4 and set(first.local_brokers()) == {0, 1, 2, 3}
    with pytest.raises(ClusterError, match="has 4 shards .*not 8"):
        await _node(url, "second", shards=8).start()
    later = await _node(url, "later").start()  # no --shards: the stored number
    assert later.shards == 4
    await later.stop()
    await first.stop()


async def test_an_unreachable_database_is_one_clear_error_without_the_password():
    node = _node("postgresql://chute:hunter2@127.0.0.1:1/chute", "n")
    with pytest.raises(StorageFailed, match="cannot join the cluster in PostgreSQL at 127.0.0.1:1/chute") as caught:
        await node.start()
    assert "hunter2" not in str(caught.value)
    assert not node.healthy and node.local_broker(0) is None


async def test_a_second_process_with_the_same_name_takes_the_node_over(postgres_url):
    """The second start wins, loudly: it reopens the name's shards (fencing the first), and the first, at its
    next heartbeat, finds its name taken and serves nothing more."""
    url = await fresh_database(postgres_url)
    first = await _node(url, "twin", shards=2).start()
    await first.local_broker(0).create_queue("q")
    second = await _node(url, "twin", shards=2).start()
    assert set(second.local_brokers()) == {0, 1}  # its own name's shards, taken at once (no lease to wait)
    await until([first], lambda: first.superseded)
    assert not first.healthy and first.local_brokers() == {}
    assert second.healthy and "q" in {q.name for q in second.local_broker(0).list_queues()}
    await first.stop()
    await second.stop()


async def test_a_shard_whose_store_failed_is_reopened_from_postgres(postgres_url):
    """A lost connection under a group commit makes a store read-only (its outcome is unknown); the node closes
    that shard's broker and opens it again, recovering from what PostgreSQL committed."""
    url = await fresh_database(postgres_url)
    node = await _node(url, "n", shards=2).start()
    broker = node.local_broker(0)
    await broker.create_queue("q")
    await broker.publish("q", b"kept")
    async with connected(url) as connection:
        for pid in await broker.store.backend_pids():
            await connection.execute("SELECT pg_terminate_backend($1)", pid)
    with pytest.raises(ChuteError) as failed:
        await broker.publish("q", b"its outcome is unknown")
    assert failed.value.retryable and not broker.healthy
    await until([node], lambda: node.local_broker(0) not in (None, broker))
    again = node.local_broker(0)
    assert again.healthy and node.healthy
    assert [d.body for d in await again.peek("q", 10)][0] == b"kept"
    await again.publish("q", b"after")
    await node.stop()


async def test_a_version_1_database_is_migrated_to_the_current_version_and_keeps_its_streams(postgres_url):
    url = await fresh_database(postgres_url)
    async with connected(url) as connection:  # what Chute before the cluster created
        await connection.execute(SCHEMA_V1)
        await connection.execute("INSERT INTO chute_schema_version (version) VALUES (1)")
        await connection.execute("INSERT INTO chute_streams (name, epoch, owner) VALUES ('default', 3, 'old')")
    node = await _node(url, "n", shards=1).start()
    await node.stop()
    async with connected(url) as connection:
        versions = [r[0] for r in await connection.fetch("SELECT version FROM chute_schema_version ORDER BY 1")]
        assert versions == list(range(1, SCHEMA_VERSION + 1))  # every later migration, once
        streams = {r["name"]: r["epoch"] for r in await connection.fetch("SELECT name, epoch FROM chute_streams")}
        assert streams == {"default": 3, "shard-0": 1}
