"""Fan-out across shards through a takeover: two `chute serve --store` processes on PostgreSQL; a topic in a
shard of node-b with subscriptions to a queue of its own shard and to a queue of node-a's shard (through a relay
queue); node-b is SIGKILLed mid-stream. Every publish confirmed to the publisher arrives in both queues, once
each: the topic's own queue gets it in the topic's commit, the other through the relay, which node-a restarts
when it takes the shard over and whose repeated publishes the queue's dedup window keeps out."""

from __future__ import annotations

import asyncio
import collections
import os

import aiohttp
import pytest

from chute import AsyncClient
from chute.cluster.placement import home_shard
from chute.errors import ChuteError
from chute.model import Publish
from tests.cluster.processes import ClusterWatch, balanced, node_processes
from tests.postgres.helpers import fresh_database

pytestmark = pytest.mark.timeout(240)
SHARDS = 4
LEASE_S = 3.0
MESSAGES = int(os.environ.get("CHUTE_FANOUT_MESSAGES", "3000"))
BATCH = 100  # publishes per request
WAVE = 10  # requests at once: the relay has a backlog to forward when the kill comes


async def relay_backlog(http_url: str) -> float:
    """`chute_cluster_relay_backlog` of a node's /metrics."""
    async with aiohttp.ClientSession() as session, session.get(f"{http_url}/metrics") as answer:
        text = await answer.text()
    return next(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("chute_cluster_relay_backlog "))  # fmt: skip


def name_owned_by(owners: dict, node: str, prefix: str) -> str:
    return next(f"{prefix}{i}" for i in range(10_000) if owners[home_shard(f"{prefix}{i}", SHARDS)] == node)


async def publish_until_confirmed(client, topic: str, first: int, confirmed: asyncio.Event | None = None) -> int:
    """Publish messages `first`..`first + BATCH` until confirmed (retrying retryable failures with their dedup
    ids, so a batch whose outcome was unknown is not stored twice). The failures."""
    batch = [Publish(body=f"m{i}".encode(), dedup_id=f"m{i}") for i in range(first, min(first + BATCH, MESSAGES))]
    failures = 0
    while True:
        try:
            await client.publish_batch(topic, batch)
            if confirmed is not None:
                confirmed.set()
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
    async with (
        node_processes(url, names, tmp_path, "--shards", str(SHARDS), lease_s=LEASE_S) as nodes,
        ClusterWatch(url) as watch,
    ):
        owners = await watch.until(balanced(names, SHARDS), 60)
        topic = name_owned_by(owners, "node-b", "events")
        far = name_owned_by(owners, "node-a", "far")
        async with AsyncClient(nodes[0].url, reconnect=False) as a:
            await a.create_queue(far)
            await a.publish(far, b"before")  # not empty: it stays in node-a's shard (an empty one would move)
            await a.create_topic(topic)
            await a.subscribe(topic, ">", "near")  # made in the topic's shard
            await a.subscribe(topic, ">", far)  # through a relay queue in the topic's shard
            failures = 0
            backlog = None
            for wave in range(0, MESSAGES, BATCH * WAVE):
                firsts = range(wave, min(wave + BATCH * WAVE, MESSAGES), BATCH)
                confirmed = asyncio.Event()
                sent = asyncio.gather(*(publish_until_confirmed(a, topic, f, confirmed) for f in firsts))
                if backlog is None and wave >= MESSAGES // 3:  # mid-stream: publishes and relays in flight
                    await confirmed.wait()
                    backlog = await relay_backlog(nodes[1].http_url)
                    await asyncio.to_thread(nodes[1].kill)
                failures += sum(await sent)
            await watch.until(lambda o: all(owner == "node-a" for owner in o.values()), 60)
            wanted = {f"m{i}".encode() for i in range(MESSAGES)}
            near_seen = await collect(a, "near", wanted)
            far_seen = await collect(a, far, wanted | {b"before"})
            assert far_seen.pop(b"before") == 1
            print(f"{backlog} messages waited in the relay queue at the kill; "
                  f"{failures} publishes failed retryably during the takeover; extra copies: near "
                  f"{sum(near_seen.values()) - MESSAGES}, {far} {sum(far_seen.values()) - MESSAGES}")  # fmt: skip
            assert set(near_seen) == wanted and set(far_seen) == wanted
            assert max(near_seen.values()) == 1, "a confirmed publish was stored twice in the topic's shard"
            assert max(far_seen.values()) == 1, "the relay's retry after the takeover made a second copy"
            assert [q.name for q in await a.list_queues()] == sorted(["near", far])
            assert home_shard(far, SHARDS) != home_shard(topic, SHARDS)
