"""`/metrics` of a cluster node shows the cluster as that node sees it (chute_cluster_*): the shards it serves and
the cluster's, nodes alive, takeovers, whether PostgreSQL answers and the heartbeat's age — what an operator's
alerts need when a node dies or the database goes away; and GET /api/v1/cluster, the same view for the
dashboard."""

from __future__ import annotations

import asyncio
import gc
import time

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chute.server.app import Server
from chute.server.config import ServerConfig
from tests.postgres.helpers import fresh_database
from tests.postgres.server import PostgresServer, available

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not available(), reason="PostgreSQL is not installed"),
]
SHARDS = 4


def _config(url: str, name: str) -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0, http_port=0, amqp_port=None, store=url, node_name=name,
                        shards=SHARDS, cluster_lease_s=2.0, cluster_heartbeat_s=0.2,
                        data_dir="/nonexistent-chute-cluster-test")  # fmt: skip


async def scrape(server: Server) -> dict[str, float]:
    """The chute_cluster_* samples of `server`'s /metrics (counters under their `_total` name)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{server.http_port}/metrics") as response,
    ):
        assert response.status == 200
        text = await response.text()
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name.startswith("chute_cluster_")}  # fmt: skip


async def cluster_api(server: Server) -> dict:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{server.http_port}/api/v1/cluster") as response,
    ):
        assert response.status == 200
        return await response.json()


async def healthz(server: Server) -> tuple[int, dict]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{server.http_port}/healthz") as response,
    ):
        return response.status, await response.json()


async def until(server: Server, check, timeout_s: float = 60.0) -> dict[str, float]:
    """Scrape until `check(samples)` holds (the values change on the node's heartbeats)."""
    node, deadline = server.broker.node, time.monotonic() + timeout_s
    while not check(found := await scrape(server)):
        assert time.monotonic() < deadline, f"/metrics never matched: {found}"
        await node.wait_changed(1.0)
    return found


async def test_metrics_of_a_node_follow_the_cluster_and_the_database():
    postgres = PostgresServer().start()  # its own server: the test stops it
    servers: list[Server] = []
    try:
        url = await fresh_database(postgres.url)
        a = await Server(_config(url, "node-a")).start()
        servers.append(a)
        found = await until(
            a, lambda m: m["chute_cluster_node_shards"] == SHARDS and m["chute_cluster_shards_unowned"] == 0
        )
        assert found["chute_cluster_shards"] == SHARDS
        assert found["chute_cluster_nodes"] == 1 and found["chute_cluster_nodes_alive"] == 1
        opened = found["chute_cluster_takeovers_total"]
        assert found["chute_cluster_relay_backlog"] == 0  # no fan-out to other shards waiting
        assert opened >= SHARDS  # each shard opened by this node (again if a late renewal lost one meanwhile)
        assert found["chute_cluster_database_reachable"] == 1 and found["chute_cluster_node_healthy"] == 1
        assert 0 <= found["chute_cluster_heartbeat_age_seconds"] < 2.0

        b = await Server(_config(url, "node-b")).start()  # a join: a hands half its shards over
        servers.append(b)
        await until(a, lambda m: m["chute_cluster_node_shards"] == SHARDS // 2 and m["chute_cluster_nodes_alive"] == 2)
        await until(b, lambda m: m["chute_cluster_node_shards"] == SHARDS // 2 and m["chute_cluster_nodes_alive"] == 2)
        seen = await cluster_api(b)  # the same view as JSON, for the dashboard's Cluster page
        while [n["shards"] for n in seen["nodes"] if n["name"] == "node-b"] != [seen["serving"]]:
            await b.broker.node.wait_changed(1.0)  # the rows it last read are a heartbeat behind what it serves
            seen = await cluster_api(b)
        assert seen["enabled"] and seen["node"] == "node-b" and seen["healthy"] and seen["shards"] == SHARDS
        assert [n["name"] for n in seen["nodes"]] == ["node-a", "node-b"] and all(n["alive"] for n in seen["nodes"])
        held = {n["name"]: n["shards"] for n in seen["nodes"]}
        assert held["node-b"] == seen["serving"] == [s["shard"] for s in seen["local"]]
        assert all(s["relay_backlog"] == 0 for s in seen["local"])
        assert sorted(held["node-a"] + held["node-b"]) == list(range(SHARDS))
        assert seen["nodes"][0]["http_port"] == a.http_port

        await b.stop()  # a clean leave: a takes its shards back, without a lease to wait out
        servers.remove(b)
        found = await until(
            a, lambda m: m["chute_cluster_node_shards"] == SHARDS and m["chute_cluster_nodes_alive"] == 1
        )
        assert found["chute_cluster_nodes"] == 2  # the stopped node stays listed, not alive
        assert found["chute_cluster_takeovers_total"] >= opened + SHARDS // 2  # the leaver's shards, opened here

        await asyncio.to_thread(postgres.stop)  # the database goes away: the node says so, its heartbeat ages
        found = await until(a, lambda m: m["chute_cluster_database_reachable"] == 0)
        assert found["chute_cluster_node_healthy"] == 0
        assert await healthz(a) == (503, {"status": "cannot reach the database; writes fail"})
        found = await until(a, lambda m: m["chute_cluster_heartbeat_age_seconds"] > 2.0)

        await asyncio.to_thread(postgres.start)  # back: reachable again, a fresh heartbeat
        await until(
            a,
            lambda m: (
                m["chute_cluster_database_reachable"] == 1
                and m["chute_cluster_heartbeat_age_seconds"] < 2.0
                and m["chute_cluster_node_shards"] == SHARDS
            ),
        )
    finally:
        for server in reversed(servers):
            await server.stop()
        postgres.destroy()
        gc.collect()  # an asyncpg connection left unclosed would warn here, and fail the test (warnings are errors)
