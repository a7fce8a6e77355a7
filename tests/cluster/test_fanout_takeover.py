"""Fan-out across shards through a takeover: two `chute serve --store` processes on PostgreSQL; a topic in a
shard of node-b with subscriptions to a queue of its own shard and to a queue of node-a's shard (through a relay
queue); node-b is SIGKILLed mid-stream. Every publish confirmed to the publisher arrives in both queues, once
each: the topic's own queue gets it in the topic's commit, the other through the relay, which node-a restarts
when it takes the shard over and whose repeated publishes the queue's dedup window keeps out."""

from __future__ import annotations

import asyncio
import collections
import os

import pytest

from chute import AsyncClient
from chute.cluster.placement import home_shard
from chute.errors import ChuteError
from tests.cluster.processes import ClusterWatch, NodeProcess, balanced
from tests.postgres.helpers import fresh_database

pytestmark = pytest.mark.timeout(240)
SHARDS = 4
LEASE_S = 3.0
MESSAGES = int(os.environ.get("CHUTE_FANOUT_MESSAGES", "300"))


def name_owned_by(owners: dict, node: str, prefix: str) -> str:
    return next(f"{prefix}{i}" for i in range(10_000) if owners[home_shard(f"{prefix}{i}", SHARDS)] == node)


async def publish_until_confirmed(client, topic: str, index: int) -> int:
    """Publish message `index` until it is confirmed (retrying retryable failures with its dedup id)."""
    failures = 0
    while True:
        try:
            await client.publish(topic, f"m{index}".encode(), dedup_id=f"m{index}")
            return failures
        except ChuteError as exc:
            assert exc.retryable, exc
            failures += 1
            assert failures < 600, exc


async def collect(client, queue: str, wanted: set[bytes]) -> collections.Counter:
    """Receive and ack from `queue` until every body of `wanted` came; then a last look for extra copies."""
    seen: collections.Counter = collections.Counter()
    while not wanted <= set(seen):
        got = await client.receive(queue, 500, wait_s=20)
        assert got, f"{len(wanted - set(seen))} confirmed messages never reached {queue}"
        seen.update(d.message.body for d in got)
        await client.ack_receipts(queue, [d.receipt for d in got])
    for delivery in await client.receive(queue, 500, wait_s=1.0):
        seen[delivery.message.body] += 1
    return seen


async def test_fan_out_to_another_shard_survives_the_topic_owners_death(postgres_url, tmp_path):
    url = await fresh_database(postgres_url)
    names = ["node-a", "node-b"]
    nodes = []
    try:
        for name in names:
            nodes.append(await asyncio.to_thread(NodeProcess, url, name, str(tmp_path / name), "--shards",
                                                 str(SHARDS), lease_s=LEASE_S))  # fmt: skip
        async with ClusterWatch(url) as watch:
            owners = await watch.until(balanced(names, SHARDS), 60)
            topic = name_owned_by(owners, "node-b", "events")
            far = name_owned_by(owners, "node-a", "far")
            async with AsyncClient(nodes[0].url, reconnect=False) as a:
                await a.create_queue(far)
                await a.create_topic(topic)
                await a.subscribe(topic, ">", "near")  # made in the topic's shard
                await a.subscribe(topic, ">", far)  # through a relay queue in the topic's shard
                failures = 0
                for index in range(MESSAGES):
                    if index == MESSAGES // 3:
                        await asyncio.to_thread(nodes[1].kill)  # mid-stream: relayed and unrelayed messages
                    failures += await publish_until_confirmed(a, topic, index)
                await watch.until(lambda o: all(owner == "node-a" for owner in o.values()), 60)
                wanted = {f"m{i}".encode() for i in range(MESSAGES)}
                near_seen = await collect(a, "near", wanted)
                far_seen = await collect(a, far, wanted)
                print(f"{failures} publishes failed retryably during the takeover; extra copies: near "
                      f"{sum(near_seen.values()) - MESSAGES}, {far} {sum(far_seen.values()) - MESSAGES}")  # fmt: skip
                assert set(near_seen) == wanted and set(far_seen) == wanted
                assert max(near_seen.values()) == 1, "a confirmed publish was stored twice in the topic's shard"
                assert max(far_seen.values()) == 1, "the relay's retry after the takeover made a second copy"
                assert [q.name for q in await a.list_queues()] == sorted(["near", far])
    finally:
        for node in nodes:
            await asyncio.to_thread(node.kill)
