"""A cluster node's shard stores share one read-cache budget, and its shard brokers one budget of recent messages
(issue 12: memory follows what is stored, and a node holding every shard must not hold every shard's full
caches): each store's cache and each broker's recent messages are its part of the node's budget, traffic through
every shard never fills them past it, and what falls out of a cache is read back from PostgreSQL, so every
message is still delivered whole."""

from __future__ import annotations

import pytest

import chute
from chute.cluster import node as node_module
from chute.cluster.placement import home_shard
from chute.core import recent
from chute.storage.postgres.store import CACHE_MAX_BYTES
from tests.cluster.inprocess import balanced, running_nodes
from tests.cluster.test_forwarding import SHARDS, _config, one_name_per_shard

pytestmark = pytest.mark.timeout(120)


def test_each_shard_gets_its_part_of_the_budget():
    assert node_module.shard_cache_bytes(16) == node_module.NODE_CACHE_BYTES // 16
    assert node_module.shard_cache_bytes(1) == CACHE_MAX_BYTES  # a few shards: each a single store's whole cache
    assert node_module.shard_cache_bytes(4) == CACHE_MAX_BYTES
    assert node_module.shard_cache_bytes(4096) == node_module.MIN_SHARD_CACHE_BYTES


def test_each_shard_keeps_its_part_of_the_recent_messages():
    assert node_module.shard_recent_limits(1) == (recent.MAX_COUNT, recent.MAX_BYTES)  # as a single broker
    assert node_module.shard_recent_limits(16) == (node_module.NODE_RECENT_COUNT // 16,
                                                   node_module.NODE_RECENT_BYTES // 16)  # fmt: skip
    assert node_module.shard_recent_limits(4096) == (node_module.MIN_SHARD_RECENT_COUNT,
                                                     node_module.MIN_SHARD_RECENT_BYTES)  # fmt: skip


async def test_a_node_holding_every_shard_keeps_its_caches_within_the_budget(postgres_url, tmp_path, monkeypatch):
    budget = SHARDS * 16 * 2**10  # 16 KiB a shard: a few dozen 1 KB messages overflow each cache
    monkeypatch.setattr(node_module, "NODE_CACHE_BYTES", budget)
    monkeypatch.setattr(node_module, "MIN_SHARD_CACHE_BYTES", 1)
    monkeypatch.setattr(node_module, "NODE_RECENT_COUNT", SHARDS * 8)  # 8 a generation a shard: 60 overflow it
    monkeypatch.setattr(node_module, "MIN_SHARD_RECENT_COUNT", 1)
    async with running_nodes(postgres_url, tmp_path, 1, SHARDS, _config) as (server,):
        brokers = server.broker.node.local_brokers()
        assert len(brokers) == SHARDS  # the only node holds every shard
        assert {broker.store.cache_max_bytes for broker in brokers.values()} == {budget // SHARDS}
        assert {broker.core.recent.max_count for broker in brokers.values()} == {8}
        queues = one_name_per_shard("cached-")
        async with chute.AsyncClient(f"chute://127.0.0.1:{server.port}") as client:
            for queue in queues:
                await client.create_queue(queue)
                await _publish(client, queue)
            assert sum(broker.store._cache_bytes for broker in brokers.values()) <= budget
            assert all(len(broker.core.recent) <= 2 * 8 for broker in brokers.values())  # two generations
            for queue in queues:
                await client.ack(await _delivered_whole(client, queue))
            assert sum(broker.store._cache_bytes for broker in brokers.values()) <= budget
            assert all(len(broker.core.recent) <= 2 * 8 for broker in brokers.values())


async def test_each_shards_part_follows_the_shards_the_node_holds(postgres_url, tmp_path, monkeypatch):
    """Two nodes hold half the shards each, with half the parts a node holding every shard gives; when one stops,
    the other takes its shards over and every shard's part shrinks at once, so the node stays within its budget
    even for shards no traffic touches again."""
    budget = SHARDS * 16 * 2**10
    monkeypatch.setattr(node_module, "NODE_CACHE_BYTES", budget)
    monkeypatch.setattr(node_module, "MIN_SHARD_CACHE_BYTES", 1)
    monkeypatch.setattr(node_module, "NODE_RECENT_COUNT", SHARDS * 8)
    monkeypatch.setattr(node_module, "MIN_SHARD_RECENT_COUNT", 1)
    async with running_nodes(postgres_url, tmp_path, 2, SHARDS, _config) as (staying, leaving):
        for server in (staying, leaving):
            brokers = server.broker.node.local_brokers().values()
            assert {b.store.cache_max_bytes for b in brokers} == {budget // (SHARDS // 2)}
            assert {b.core.recent.max_count for b in brokers} == {8 * 2}
        queues = one_name_per_shard("parts-")
        urls = {node.name: f"chute://127.0.0.1:{server.port}" for server in (staying, leaving)
                for node in [server.broker.node]}  # fmt: skip
        for queue in queues:  # through the shard's owner: each cache filled to its part
            owner = staying if staying.broker.node.local_broker(_shard(queue)) else leaving
            async with chute.AsyncClient(urls[owner.broker.node.name]) as client:
                await client.create_queue(queue)
                await _publish(client, queue)
        await leaving.stop()  # hands its shards back; the other node takes them over
        await balanced([staying], SHARDS)
        brokers = staying.broker.node.local_brokers().values()
        assert {b.store.cache_max_bytes for b in brokers} == {budget // SHARDS}
        assert {b.core.recent.max_count for b in brokers} == {8}
        assert all(b.store._cache_bytes <= budget // SHARDS for b in brokers)  # trimmed to the smaller part at once
        assert all(len(b.core.recent) <= 2 * 8 for b in brokers)
        async with chute.AsyncClient(urls[staying.broker.node.name]) as client:  # nothing lost on the way
            for queue in queues:
                await _delivered_whole(client, queue)


def _shard(queue: str) -> int:
    return home_shard(queue, SHARDS)


def _bodies(queue: str) -> list[bytes]:
    return [f"{queue}:{i}:".encode() + b"x" * 1000 for i in range(60)]


async def _publish(client, queue: str) -> None:
    bodies = _bodies(queue)
    for first in range(0, len(bodies), 4):  # batches that fit a generation of recent messages, so they are kept
        await client.publish_batch(queue, bodies[first : first + 4])


async def _delivered_whole(client, queue: str) -> list:
    """Every message of `queue`, each body whole (what fell out of a cache is read back from PostgreSQL)."""
    got: list = []
    while len(got) < 60:
        batch = await client.receive(queue, max_messages=60, wait_s=5)
        assert batch, f"{queue}: {len(got)} of 60 delivered"
        got += batch
    assert sorted(m.body for m in got) == sorted(_bodies(queue))
    return got
