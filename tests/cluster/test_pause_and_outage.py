"""A node paused past its lease (SIGSTOP, then SIGCONT) cannot write what the others took over: it steps down and
rejoins, and nothing confirmed is lost. PostgreSQL stopped under a node: `/healthz` answers 503 and publishes fail
with a retryable error while it is away; once it is back the node serves again by itself, with its data."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
import urllib.error
import urllib.request

import pytest

import chute
from chute.errors import ChuteError
from tests.cluster.processes import ClusterWatch, NodeProcess, balanced
from tests.cluster.test_takeover import queue_per_shard
from tests.postgres.helpers import fresh_database
from tests.postgres.server import PostgresServer, available

LEASE_S = 3.0


def healthz(http_url: str) -> int:
    try:
        with urllib.request.urlopen(f"{http_url}/healthz", timeout=10) as response:
            json.loads(response.read())
            return response.status
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code


async def until_healthz(http_url: str, status: int, timeout_s: float) -> None:
    """Poll /healthz (HTTP offers nothing to wait on) until it answers `status`."""
    deadline = time.monotonic() + timeout_s
    while (got := await asyncio.to_thread(healthz, http_url)) != status:
        assert time.monotonic() < deadline, f"/healthz stayed {got}, never {status}"
        await asyncio.sleep(0.1)


async def publish_until_confirmed(url: str, queue: str, body: bytes, timeout_s: float = 30.0) -> None:
    """Publish `body` through the node at `url`, again after each retryable failure, until it is confirmed."""
    deadline = time.monotonic() + timeout_s
    async with chute.AsyncClient(url, timeout=10, reconnect=True) as client:
        while True:
            try:
                await client.publish(queue, body)
                return
            except ChuteError as exc:
                assert exc.retryable and time.monotonic() < deadline, exc


@pytest.mark.timeout(180)
async def test_a_node_paused_past_its_lease_steps_down_and_rejoins_without_losing_anything(postgres_url, tmp_path):
    url = await fresh_database(postgres_url)
    names = ["node-0", "node-1", "node-2"]
    nodes = {name: NodeProcess(url, name, str(tmp_path / name), lease_s=LEASE_S) for name in names}
    queues = queue_per_shard()
    confirmed: dict[str, list[bytes]] = {name: [] for name in queues.values()}
    try:
        async with ClusterWatch(url) as watch:
            owners = await watch.until(balanced(names), 60)
            front, paused = nodes["node-0"], nodes["node-2"]
            async with chute.AsyncClient(front.url, timeout=30, reconnect=False) as client:
                for name in queues.values():
                    await client.create_queue(name)
                    await client.publish(name, b"before")
                    confirmed[name].append(b"before")
            theirs = [queues[s] for s, owner in owners.items() if owner == paused.name]
            mark = len(paused.lines)

            paused.signal(signal.SIGSTOP)
            await watch.until(lambda o: paused.name not in o.values() and None not in o.values(), 30)
            for name in theirs:  # the others serve its shards now
                await publish_until_confirmed(front.url, name, b"while paused")
                confirmed[name].append(b"while paused")

            paused.signal(signal.SIGCONT)
            # straight to the paused node: it must not serve from the brokers it had (they were taken over)
            async with chute.AsyncClient(paused.url, timeout=30, reconnect=False) as client:
                for name in theirs:
                    try:
                        await client.publish(name, b"after the pause")
                        confirmed[name].append(b"after the pause")
                    except ChuteError as exc:
                        assert exc.retryable, exc
            paused.wait_for(re.compile(r"was taken over by|no heartbeat for .* stops serving|fenced"), 30, start=mark)
            await watch.until(balanced(names), 60)  # it rejoined and holds its share again
            await until_healthz(paused.http_url, 200, 30)
            got: dict[str, list[bytes]] = {}
            async with chute.AsyncClient(paused.url, timeout=30, reconnect=False) as client:
                for name in queues.values():
                    got[name] = [d.body for d in await client.receive(name, 100, wait_s=0)]
        for name, bodies in confirmed.items():
            assert set(bodies) <= set(got[name]), (name, bodies, got[name])
    finally:
        for node in nodes.values():
            node.kill()


@pytest.mark.timeout(180)
@pytest.mark.skipif(not available(), reason="PostgreSQL is not installed")
async def test_a_node_is_unhealthy_while_postgres_is_away_and_serves_again_by_itself(tmp_path):
    server = PostgresServer().start()  # its own server: this test stops it
    try:
        url = await fresh_database(server.url)
        node = NodeProcess(url, "solo", str(tmp_path / "solo"), "--shards", "4", lease_s=LEASE_S)
        async with chute.AsyncClient(node.url, timeout=30, reconnect=True) as client:
            await client.create_queue("jobs")
            await client.publish("jobs", b"before the outage")
            assert await asyncio.to_thread(healthz, node.http_url) == 200
            mark = len(node.lines)

            await asyncio.to_thread(server.stop)
            await until_healthz(node.http_url, 503, 30)
            with pytest.raises(ChuteError) as refused:
                await client.publish("jobs", b"while away")
            assert refused.value.retryable, refused.value
            node.wait_for(re.compile(r"stops serving shards"), 30, start=mark)  # past its lease: it let go

            await asyncio.to_thread(server.start)  # same port and data
            await until_healthz(node.http_url, 200, 60)
            await publish_until_confirmed(node.url, "jobs", b"after the outage")
            bodies = [d.body for d in await client.receive("jobs", 10, wait_s=0)]
        assert bodies[0] == b"before the outage" and b"after the outage" in bodies
        assert node.stop() == 0
    finally:
        server.destroy()
