"""Three `chute serve --store` processes on one PostgreSQL, as users run them: the shards balance (5-6 of 16 each);
a node SIGKILLed under load has its shards taken over by the others within its lease and a few seconds (measured),
its unacked deliveries become ready again, and no confirmed publish is lost — published through a live node to
the survivors' shards throughout, and to the dead node's shards once they are taken over. The dead node
restarts under its name and the cluster balances again. `CHUTE_CLUSTER_ROUNDS` sets how many nodes are killed
(default 3); `CHUTE_CLUSTER_LEASE_S` the lease (default: `chute serve`'s own, 5 s, whose takeover bound docs/cluster.md
states: a publish confirmed on every shard of the dead node within 10 s of the kill).
"""

from __future__ import annotations

import asyncio
import os
import re
import time

import pytest

import chute
from chute.cluster.node import DEFAULT_LEASE_S
from chute.cluster.placement import home_shard
from chute.errors import ChuteError
from tests.cluster.processes import ClusterWatch, NodeProcess, balanced
from tests.postgres.helpers import fresh_database

ROUNDS = int(os.environ.get("CHUTE_CLUSTER_ROUNDS", "3"))
LEASE_S = float(os.environ["CHUTE_CLUSTER_LEASE_S"]) if os.environ.get("CHUTE_CLUSTER_LEASE_S") else None
SHARDS = 16
# asserted over every round at the end (so a campaign reports all its rounds): with the default lease, the bound
# docs/cluster.md promises; with another, the lease plus as much for recovery on a loaded machine
TAKEOVER_LIMIT_S = 10.0 if LEASE_S is None else 2 * LEASE_S + 7.0
TAKEOVER_WAIT_S = 60.0
OPENED = re.compile(r"serving shard \d+ \(opened in ([\d.]+) s")
BATCH = 20
LOAD_PAUSE_S = 0.05  # between a publisher's batches: a steady load (up to 6,400 msg/s), not a flood that only
# grows the backlog each round drains
CALL_TIMEOUT_S = 5.0  # a publish not confirmed by then counts as failed (not confirmed) and is tried anew


def queue_per_shard() -> dict[int, str]:
    """One queue name living in each shard (names go to their home shard: CRC-32 of the name)."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < SHARDS:
        name = f"jobs-{i}"
        found.setdefault(home_shard(name, SHARDS), name)
        i += 1
    return found


class Load:
    """Publishers through one live node: batches to every queue in turn; what was confirmed is kept per queue."""

    def __init__(self, url: str, queues: dict[int, str]) -> None:
        self.url = url
        self.queues = queues
        self.confirmed: dict[str, list[bytes]] = {name: [] for name in queues.values()}
        self.failed = 0
        self.last_error = ""
        self.confirmed_at: dict[str, float] = {}  # queue -> when its latest batch was confirmed
        self._stop = asyncio.Event()
        self._progress = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._serial = 0

    def start(self) -> Load:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self) -> None:
        await asyncio.gather(*(self._publisher(name) for name in self.queues.values()))

    async def _publisher(self, name: str) -> None:
        """One publisher (and connection) per queue: a shard without an owner holds up only its own queue."""
        async with chute.AsyncClient(self.url, timeout=CALL_TIMEOUT_S, reconnect=True) as client:
            while not self._stop.is_set():
                await self._publish(client, name)
                await asyncio.sleep(LOAD_PAUSE_S)

    async def _publish(self, client, name: str) -> None:
        bodies = []
        for _ in range(BATCH):
            self._serial += 1
            bodies.append(b"%s %d" % (name.encode(), self._serial))
        try:
            await client.publish_batch(name, bodies)
        except ChuteError as exc:  # retryable while a shard has no owner; not confirmed, so not expected
            assert exc.retryable or isinstance(exc, chute.errors.ConnectionLost | chute.errors.RequestTimeout), exc
            self.failed += 1
            self.last_error = f"{name}: {exc!r}"
            return
        self.confirmed[name] += bodies
        self.confirmed_at[name] = time.monotonic()
        progress, self._progress = self._progress, asyncio.Event()
        progress.set()

    async def until_confirmed_after(self, names: list[str], since: float, timeout_s: float) -> float:
        """Wait until a batch to each of `names` was confirmed after `since`; the time the last one was."""
        deadline = time.monotonic() + timeout_s
        while True:
            latest = [self.confirmed_at.get(name, 0.0) for name in names]
            if min(latest) > since:
                return max(latest)
            left = deadline - time.monotonic()
            assert left > 0, (f"no publish confirmed since {since:.2f} for {names}: latest {latest}, "
                              f"{self.failed} batches failed, last error {self.last_error}")
            try:
                await asyncio.wait_for(self._progress.wait(), left)
            except TimeoutError:
                pass

    async def stop(self) -> None:
        self._stop.set()
        await self._task


async def drain(url: str, names: list[str]) -> dict[str, list[bytes]]:
    """Every message of `names`, received and acked through one node."""
    got: dict[str, list[bytes]] = {}
    async with chute.AsyncClient(url, timeout=30, reconnect=False) as client:
        for name in names:
            got[name] = []
            while deliveries := await client.receive(name, 1000, wait_s=0):
                got[name] += [d.body for d in deliveries]
                await client.ack(deliveries)
    return got


@pytest.mark.timeout(120 + 60 * ROUNDS)
async def test_survivors_take_over_a_killed_node_under_load_and_nothing_confirmed_is_lost(postgres_url, tmp_path):
    url = await fresh_database(postgres_url)
    names = [f"node-{i}" for i in range(3)]
    nodes = {name: NodeProcess(url, name, str(tmp_path / name), lease_s=LEASE_S) for name in names}
    queues = queue_per_shard()
    takeovers: list[tuple[float, float]] = []
    try:
        async with ClusterWatch(url) as watch:
            await watch.until(balanced(names), 60)
            async with chute.AsyncClient(nodes[names[0]].url, timeout=30, reconnect=False) as client:
                for name in queues.values():
                    await client.create_queue(name)
            for round_ in range(ROUNDS):
                owners = await watch.until(balanced(names), 60)
                assert sorted(list(owners.values()).count(n) for n in names) == [5, 5, 6]
                victim = names[round_ % 3]
                front = names[(round_ + 1) % 3]
                theirs = [queues[s] for s, owner in owners.items() if owner == victim]
                load = Load(nodes[front].url, queues).start()
                # a consumer takes some messages of the victim's first queue and never acks them
                while not load.confirmed[theirs[0]]:
                    await load.until_confirmed_after([theirs[0]], 0.0, 30)
                async with chute.AsyncClient(nodes[front].url, timeout=30, reconnect=False) as client:
                    unacked = await client.receive(theirs[0], 10, lease_s=600)
                assert unacked
                # delivery counts ride with the next group commit (docs/cluster.md): let one pass before the kill
                await load.until_confirmed_after([theirs[0]], time.monotonic(), 30)

                survivors = [n for n in names if n != victim]
                marks = {n: len(nodes[n].lines) for n in survivors}
                nodes[victim].kill()
                killed = time.monotonic()
                await watch.until(lambda o, survivors=survivors: set(o.values()) <= set(survivors), TAKEOVER_WAIT_S)
                claimed = time.monotonic()
                served = await load.until_confirmed_after(theirs, killed, TAKEOVER_WAIT_S)
                takeovers.append((claimed - killed, served - killed))
                opening = [float(m[1]) for n in survivors for line in nodes[n].lines[marks[n]:]
                           if (m := OPENED.search(line))]  # fmt: skip
                print(f"round {round_ + 1}: {victim} killed; its {len(theirs)} shards claimed after "
                      f"{claimed - killed:.2f} s, serving after {served - killed:.2f} s (opening took "
                      f"{max(opening, default=0):.2f} s at most)", flush=True)  # fmt: skip
                await load.until_confirmed_after(list(queues.values()), served, 30)  # more load after takeover
                await load.stop()

                # its unacked deliveries are ready again on the new owner, counted as redeliveries
                async with chute.AsyncClient(nodes[front].url, timeout=30, reconnect=False) as client:
                    again = await client.receive(theirs[0], 1000, wait_s=0)
                    redelivered = {d.id: d for d in again}
                    assert {d.id for d in unacked} <= set(redelivered)
                    counts = [redelivered[d.id].delivery_count for d in unacked]
                    assert all(count >= 2 for count in counts), counts
                    await client.ack(again)
                # every publish confirmed this round is stored: drained through a survivor (queues start empty)
                got = await drain(nodes[front].url, list(queues.values()))
                for name, bodies in load.confirmed.items():
                    missing = set(bodies) - set(got[name]) - {d.body for d in again}
                    assert not missing, f"round {round_ + 1}: {len(missing)} confirmed publishes to {name} lost"
                assert sum(map(len, load.confirmed.values())) > 0

                nodes[victim] = NodeProcess(url, victim, str(tmp_path / victim), lease_s=LEASE_S)  # rejoins
            await watch.until(balanced(names), 60)
    finally:
        for node in nodes.values():
            node.kill()
        if os.environ.get("CHUTE_CLUSTER_LOGS"):
            for node in nodes.values():
                print(f"--- {node.name}\n{node.text[-6000:]}")
    serving = sorted(t for _, t in takeovers)
    print(f"takeover (kill -> a publish confirmed on every shard of the dead node), lease "
          f"{LEASE_S or DEFAULT_LEASE_S} s, "
          f"{len(serving)} rounds: min {serving[0]:.2f} s, median {serving[len(serving) // 2]:.2f} s, "
          f"max {serving[-1]:.2f} s")  # fmt: skip
    assert serving[-1] < TAKEOVER_LIMIT_S



@pytest.mark.timeout(240)
async def test_a_rolling_restart_under_load_loses_nothing(postgres_url, tmp_path):
    """Each node in turn stopped with SIGTERM (it hands its shards back, cleanly closed, and leaves: the others
    take them at once, without waiting for a lease) and started again, under load through another node."""
    url = await fresh_database(postgres_url)
    names = [f"node-{i}" for i in range(3)]
    nodes = {name: NodeProcess(url, name, str(tmp_path / name), lease_s=LEASE_S) for name in names}
    queues = queue_per_shard()
    try:
        async with ClusterWatch(url) as watch:
            await watch.until(balanced(names), 60)
            async with chute.AsyncClient(nodes[names[0]].url, timeout=30, reconnect=False) as client:
                for name in queues.values():
                    await client.create_queue(name)
            for step, name in enumerate(names):
                front = names[(step + 1) % 3]
                load = Load(nodes[front].url, queues).start()
                await load.until_confirmed_after(list(queues.values()), 0.0, 30)
                stopped = time.monotonic()
                assert await asyncio.to_thread(nodes[name].stop) == 0
                others = [n for n in names if n != name]
                await watch.until(lambda o, others=others: set(o.values()) <= set(others),
                                  LEASE_S or DEFAULT_LEASE_S)  # before its lease
                moved = time.monotonic() - stopped
                nodes[name] = NodeProcess(url, name, str(tmp_path / name), lease_s=LEASE_S)
                await watch.until(balanced(names), 60)
                await load.until_confirmed_after(list(queues.values()), time.monotonic(), 30)
                await load.stop()
                got = await drain(nodes[front].url, list(queues.values()))
                for queue, bodies in load.confirmed.items():
                    missing = set(bodies) - set(got[queue])
                    assert not missing, f"{name} restarted: {len(missing)} confirmed publishes to {queue} lost"
                print(f"{name} stopped: its shards held by the others {moved:.2f} s after SIGTERM", flush=True)
    finally:
        for node in nodes.values():
            node.kill()
