"""Routing across a node's death: three `chute serve --store` processes; the node owning a queue's shard is
SIGKILLed; calls for that queue through the survivors wait for the takeover (or fail retryably, never otherwise),
then succeed; what was confirmed before is there, and what was leased but not acked is delivered again."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from chute import AsyncClient
from chute.cluster.placement import home_shard
from chute.errors import ChuteError
from tests.cluster.processes import ClusterWatch, balanced, node_processes
from tests.postgres.helpers import fresh_database

pytestmark = pytest.mark.timeout(240)
SHARDS = 6
LEASE_S = 3.0


async def test_calls_for_a_dead_nodes_shard_wait_for_the_takeover_then_succeed(postgres_url, tmp_path):
    url = await fresh_database(postgres_url)
    names = ["node-a", "node-b", "node-c"]
    async with (
        node_processes(url, names, tmp_path, "--shards", str(SHARDS), lease_s=LEASE_S) as nodes,
        ClusterWatch(url) as watch,
    ):
        owners = await watch.until(balanced(names, SHARDS), 60)
        queue = next(f"q{i}" for i in range(1000) if owners[home_shard(f"q{i}", SHARDS)] == "node-c")
        a = await AsyncClient(nodes[0].url, reconnect=False).connect()
        b = await AsyncClient(nodes[1].url, reconnect=False).connect()
        try:
            await a.create_queue(queue, lease_s=60)
            await a.publish_batch(queue, [b"one", b"two", b"three"])
            leased = await b.receive(queue, 1, wait_s=5)  # leased on node-c, never acked
            assert [d.message.body for d in leased] == [b"one"]

            await asyncio.to_thread(nodes[2].kill)
            killed_at = time.monotonic()
            failures = []
            while True:  # a publish through node-a: waits for the takeover, or fails retryably, then works
                try:
                    await a.publish(queue, b"after", dedup_id="after-the-kill")
                    break
                except ChuteError as exc:
                    assert exc.retryable, exc
                    failures.append(exc.name)
                assert time.monotonic() - killed_at < 60, failures
            took_s = time.monotonic() - killed_at
            await watch.until(balanced(names[:2], SHARDS), 60)
            publish_url = f"{nodes[1].http_url}/api/v1/queues/{queue}/messages"  # the other survivor's HTTP API
            async with aiohttp.ClientSession() as http, http.post(publish_url, json={"body": "via http"}) as answer:
                assert answer.status in (200, 201), await answer.text()

            bodies: list[bytes] = []
            while len(bodies) < 5:
                got = await b.receive(queue, 10, wait_s=5)
                assert got, f"only {bodies} came back"
                bodies += [d.message.body for d in got]
                await a.ack_receipts(queue, [d.receipt for d in got])
            assert sorted(bodies) == sorted([b"one", b"two", b"three", b"after", b"via http"])  # "one": again
            print(f"a publish via a survivor succeeded {took_s:.2f} s after the kill; failures: {failures}")
            assert took_s < LEASE_S + 20, took_s
        finally:
            await a.close()
            await b.close()
