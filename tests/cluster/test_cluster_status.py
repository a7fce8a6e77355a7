"""`chute cluster status`: what a user sees of a cluster's nodes and shards, read from its database (also while
nodes are down), and one clear line for a database that is not a cluster's."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from chute.cluster import ClusterNode
from tests.integration.test_serve import assert_one_line_error
from tests.postgres.helpers import connected, fresh_database


def _status(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chute", "cluster", "status", *args], capture_output=True, text=True,
                          timeout=60)  # fmt: skip


async def test_status_shows_each_node_its_shards_and_their_queues(postgres_url):
    url = await fresh_database(postgres_url)
    a = await ClusterNode(url, "node-a", shards=4, heartbeat_s=0.2, lease_s=2, port=7001).start()
    b = await ClusterNode(url, "node-b", heartbeat_s=0.2, lease_s=2, port=7002).start()
    while len(a.local_brokers()) != 2 or len(b.local_brokers()) != 2:
        await (a if len(a.local_brokers()) != 2 else b).wait_changed(10)
    shard = min(b.local_brokers())
    async with connected(url) as connection:  # what the router's placement writes for a queue of that shard
        await connection.execute("INSERT INTO chute_placement (name, kind, shard) VALUES ('orders', 'queue', $1)",
                                 shard)  # fmt: skip
    result = await asyncio.to_thread(_status, "--store", url, "--json")
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["shards"] == 4 and found["unowned"] == []
    by_name = {node["name"]: node for node in found["nodes"]}
    assert by_name["node-a"]["alive"] and by_name["node-b"]["alive"]
    assert set(by_name["node-b"]["shards"]) == set(b.local_brokers()) and by_name["node-b"]["queues"] == 1
    assert by_name["node-a"]["port"] == 7001 and by_name["node-a"]["heartbeat_age_s"] < 2

    await b.stop()  # left: not alive, its shards held by node-a once it took them
    while len(a.local_brokers()) != 4:
        await a.wait_changed(10)
    result = await asyncio.to_thread(_status, "--store", url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NODE", "ADDRESS", "ALIVE", "HEARTBEAT", "SHARDS", "QUEUES", "TOPICS"]
    assert lines[1].split()[:3] == ["node-a", "127.0.0.1:7001", "yes"] and lines[1].split()[6] == "0-3"
    assert lines[2].split()[:3] == ["node-b", "127.0.0.1:7002", "no"]
    assert lines[-1] == "4 shards, 1 of 2 nodes alive; every shard is held"
    await a.stop()


async def test_status_of_a_database_without_a_cluster_or_unreachable_is_one_line(postgres_url):
    url = await fresh_database(postgres_url)
    result = await asyncio.to_thread(_status, "--store", url)
    assert_one_line_error(result, code=1, says="holds no Chute cluster (no chute_nodes table)")
    result = await asyncio.to_thread(_status, "--store", "postgresql://me:hunter2@127.0.0.1:1/db")
    assert_one_line_error(result, code=1, says="cannot connect to PostgreSQL at 127.0.0.1:1/db")
    assert "hunter2" not in result.stderr
    result = await asyncio.to_thread(_status, "--store", "mysql://h/db")
    assert_one_line_error(result, code=1, says="--store must be a postgresql:// URL")
