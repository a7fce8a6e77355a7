"""Losing the database machine: a primary with a synchronous standby, the primary killed under load and the standby
promoted, as an operator (or Patroni) does it. The node reaches the database through a libpq multi-host URL with
`target_session_attrs=read-write`, finds the new primary by itself, and nothing it confirmed is lost.

Why nothing confirmed can be lost: the primary runs with `synchronous_standby_names` naming the standby and Chute
commits with `synchronous_commit = on`, so a commit returns (and a publish is confirmed) only once the standby has
flushed it. The test checks exactly that: every publish confirmed before, during and after the failover is there
afterwards, read through the node from the promoted standby.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

import chute
from chute.errors import ChuteError
from tests.cluster.processes import NodeProcess
from tests.postgres.server import PostgresServer, available

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(not available(), reason="PostgreSQL is not installed (apt-get install postgresql)"),
]

STANDBY_NAME = "chute_standby"
QUEUES = [f"failover-{i}" for i in range(4)]
BATCH = 10
RECOVER_WITHIN_S = 90.0  # from the promotion to the first publish confirmed again (lease, reconnect, recovery)


async def wait_for_sync_standby(primary_url: str, timeout_s: float = 60.0) -> None:
    """Until the primary reports the standby streaming as its synchronous standby (nothing to wait on: polled)."""
    deadline = time.monotonic() + timeout_s
    connection = await asyncpg.connect(primary_url)
    try:
        while True:
            state = await connection.fetchval(
                "SELECT sync_state FROM pg_stat_replication WHERE application_name = $1", STANDBY_NAME
            )
            if state == "sync":
                return
            assert time.monotonic() < deadline, f"the standby never became synchronous (state {state})"
            await asyncio.sleep(0.1)
    finally:
        await connection.close()


class Publishers:
    """One publisher per queue through the node, retrying what fails; `confirmed` holds what the node confirmed."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.confirmed: dict[str, list[bytes]] = {q: [] for q in QUEUES}
        self.confirmed_at = 0.0
        self.errors: list[str] = []
        self._stop = asyncio.Event()
        self._serial = 0
        self._task: asyncio.Task | None = None

    def start(self) -> Publishers:
        self._task = asyncio.ensure_future(asyncio.gather(*(self._run(q) for q in QUEUES)))
        return self

    async def stop(self) -> None:
        self._stop.set()
        await self._task

    async def _run(self, queue: str) -> None:
        async with chute.AsyncClient(self.url, timeout=10, reconnect=True) as client:
            while not self._stop.is_set():
                bodies = []
                for _ in range(BATCH):
                    self._serial += 1
                    bodies.append(b"%s %d" % (queue.encode(), self._serial))
                try:
                    await client.publish_batch(queue, bodies)
                except (ChuteError, OSError, TimeoutError) as exc:
                    if isinstance(exc, ChuteError):
                        assert exc.retryable, f"a publish failed for good during the failover: {exc}"
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(0.1)  # the node is finding the new primary: do not spin meanwhile
                    continue
                self.confirmed[queue].extend(bodies)
                self.confirmed_at = time.monotonic()
                await asyncio.sleep(0.02)


async def test_the_primary_killed_and_the_standby_promoted_lose_nothing_confirmed(tmp_path):
    primary = PostgresServer(settings={"synchronous_standby_names": STANDBY_NAME}).start()
    standby = None
    node = None
    try:
        standby = PostgresServer(standby_of=primary, settings={"cluster_name": STANDBY_NAME}).start()
        await wait_for_sync_standby(primary.url)
        url = (
            f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/postgres"
            "?target_session_attrs=read-write"
        )
        node = NodeProcess(url, "node-0", str(tmp_path / "node-0"), "--shards", "4", lease_s=3.0)
        async with chute.AsyncClient(node.url, timeout=30) as client:
            for queue in QUEUES:
                await client.create_queue(queue)

        load = Publishers(node.url).start()
        deadline = time.monotonic() + 60
        while sum(map(len, load.confirmed.values())) < 400:  # a steady load is running
            assert time.monotonic() < deadline, f"no load got through: {load.errors[-3:]}"
            await asyncio.sleep(0.05)

        errors_before = len(load.errors)
        primary.stop(mode="immediate")  # the database machine is lost (as a crash: no checkpoint, no goodbye)
        killed_at = time.monotonic()
        while len(load.errors) == errors_before:  # the outage is felt: publishes fail (retryably) until promotion
            assert time.monotonic() - killed_at < 60, "publishes kept being confirmed with the primary gone"
            await asyncio.sleep(0.05)
        promoter = await asyncpg.connect(standby.url)
        try:
            assert await promoter.fetchval("SELECT pg_promote(wait => true)")
        finally:
            await promoter.close()
        promoted_at = time.monotonic()

        while load.confirmed_at < promoted_at:  # the node found the new primary by itself
            elapsed = time.monotonic() - promoted_at
            assert elapsed < RECOVER_WITHIN_S, f"nothing confirmed {elapsed:.0f} s after the promotion: " + (
                f"{load.errors[-3:]}\n{node.text[-3000:]}"
            )
            await asyncio.sleep(0.1)
        recovered_s = load.confirmed_at - promoted_at
        after = sum(map(len, load.confirmed.values()))
        deadline = time.monotonic() + 60
        while sum(map(len, load.confirmed.values())) < after + 200:  # and keeps serving
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await load.stop()

        async with chute.AsyncClient(node.url, timeout=30) as client:
            for queue in QUEUES:
                stored: set[bytes] = set()
                while True:
                    deliveries = await client.receive(queue, max_messages=500, wait_s=0.5)
                    if not deliveries:
                        break
                    stored.update(d.body for d in deliveries)
                    await client.ack(deliveries)
                lost = [body for body in load.confirmed[queue] if body not in stored]
                assert not lost, f"{queue}: {len(lost)} confirmed publishes lost in the failover, e.g. {lost[:3]}"
        print(
            f"\nfailover: primary killed, standby promoted {promoted_at - killed_at:.1f} s later; publishes "
            f"confirmed again {recovered_s:.1f} s after the promotion; "
            f"{sum(map(len, load.confirmed.values()))} confirmed, none lost; {len(load.errors)} retryable failures"
        )
    finally:
        if node is not None:
            node.kill()
        if standby is not None:
            standby.destroy()
        primary.destroy()
