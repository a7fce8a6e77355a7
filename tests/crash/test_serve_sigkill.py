"""`chute serve` killed with SIGKILL while a client publishes with confirms and a consumer acks.

Each round starts the real `chute serve` on the same data directory; in this process a producer publishes
numbered messages (recording each confirm) and a consumer acks them in batches (recording each ack before it is
sent as "intended" and after its reply as "acked"); at a random moment the server is killed with SIGKILL. After
the restart the stored messages of the queue must satisfy, over all rounds so far:
- every confirmed publish is stored, unless an ack of it was intended;
- no confirmed ack is undone (an acked message is never stored again);
- nothing is stored twice, and nothing is stored that was never published.
After each check the checker acks every stored message (and the ledger counts them as acked), so the backlog
never outgrows one round.

A second case stops the server cleanly (SIGTERM) at that moment and kills it with SIGKILL 0-60 ms later, every
snapshot forked (CHUTE_SNAPSHOT_FORK_MIN_ENTRIES=0): the kill lands while connections close, while the closing
snapshot's child works or while the closing checkpoint is written, or after a clean exit.

Size: CHUTE_CRASH_ROUNDS // 10 rounds (at least 2) per case. Randomness: CHUTE_CRASH_SEED.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal

import pytest

import chute
from chute.errors import ChuteError
from tests.crash.serve import ServeProcess

ROUNDS = max(2, int(os.environ.get("CHUTE_CRASH_ROUNDS", "20")) // 10)
SEED = int(os.environ.get("CHUTE_CRASH_SEED") or 20261128)
QUEUE = "work"

pytestmark = [pytest.mark.crash, pytest.mark.timeout(300)]


class Ledger:
    def __init__(self) -> None:
        self.tried: set[int] = set()
        self.confirmed: set[int] = set()
        self.intended: set[int] = set()
        self.acked: set[int] = set()
        self.next_seq = 0


async def _produce(client: chute.AsyncClient, ledger: Ledger) -> None:
    while True:
        batch = list(range(ledger.next_seq, ledger.next_seq + 100))
        ledger.next_seq += 100
        ledger.tried.update(batch)
        futures = [client.publish_nowait(QUEUE, b"%d" % seq, headers={"seq": str(seq)}) for seq in batch]
        results = await asyncio.gather(*futures, return_exceptions=True)
        for seq, result in zip(batch, results, strict=True):
            if isinstance(result, int):
                ledger.confirmed.add(seq)
        if any(isinstance(r, BaseException) for r in results):
            return


async def _consume(client: chute.AsyncClient, ledger: Ledger, rng: random.Random) -> None:
    consumer = await client.consume(QUEUE, prefetch=200)
    pending = []
    async for delivery in consumer:
        pending.append(delivery)
        if len(pending) >= rng.randint(1, 50):
            seqs = [int(d.body) for d in pending]
            ledger.intended.update(seqs)
            await client.ack(pending)
            ledger.acked.update(seqs)
            pending = []


async def _round(url: str, ledger: Ledger, rng: random.Random, kill) -> None:
    producer = await chute.AsyncClient(url, reconnect=False, timeout=10).connect()
    consumer = await chute.AsyncClient(url, reconnect=False, timeout=10).connect()
    await producer.create_queue(QUEUE, lease_s=600)
    tasks = [asyncio.ensure_future(_produce(producer, ledger)), asyncio.ensure_future(_consume(consumer, ledger, rng))]
    await asyncio.sleep(rng.uniform(0.2, 1.2))
    await kill()
    for task in tasks:
        with contextlib.suppress(ChuteError, asyncio.TimeoutError):
            async with asyncio.timeout(15):
                await task
    for client in (producer, consumer):
        with contextlib.suppress(ChuteError):
            await client.close()


async def _stored_then_acked(url: str) -> list[int]:
    """The stored messages; then they are acked, so the backlog stays one round's size. (Read with receive, in
    as many replies as it takes: one peek reply holds only what fits in a frame, ~58,000 of these messages.)"""
    async with chute.AsyncClient(url) as client:
        stats = await client.queue_stats(QUEUE)
        assert stats.in_flight == 0 and stats.delayed == 0  # leases do not survive a restart; nothing is delayed
        deliveries: list = []
        while batch := await client.receive(QUEUE, 10_000, lease_s=600):
            deliveries += batch
        assert len(deliveries) == stats.ready, "receive missed some of what the stats count"
        for start in range(0, len(deliveries), 5_000):
            await client.ack(deliveries[start : start + 5_000])
        assert (await client.queue_stats(QUEUE)).ready == 0
    seqs = [int(d.body) for d in deliveries]
    assert all(d.headers == {"seq": str(int(d.body))} for d in deliveries), "a stored message was damaged"
    return seqs


@pytest.mark.parametrize("stop", ["sigkill", "sigterm-then-sigkill"])
def test_sigkill_under_publish_and_ack_loses_nothing_confirmed(tmp_path, monkeypatch, stop):
    rng = random.Random(SEED)
    data = str(tmp_path / "data")
    ledger = Ledger()
    if stop == "sigterm-then-sigkill":
        monkeypatch.setenv("CHUTE_SNAPSHOT_FORK_MIN_ENTRIES", "0")  # the closing snapshot too is a child's
    stopped_cleanly = 0
    for round_no in range(ROUNDS):
        server = ServeProcess(data)

        async def kill(server=server) -> None:
            if stop == "sigkill":
                server.kill()
                return
            server.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(rng.uniform(0, 0.06))
            server.kill()

        try:
            asyncio.run(_round(server.url, ledger, rng, kill))
            stopped_cleanly += server.process.returncode == 0
        finally:
            if server.process.poll() is None:
                server.kill()
        checker = ServeProcess(data)
        try:
            stored = asyncio.run(_stored_then_acked(checker.url))
        finally:
            assert checker.terminate() == 0, b"".join(checker.log).decode(errors="replace")
        present = set(stored)
        assert len(stored) == len(present), f"round {round_no}: duplicated messages"
        lost = ledger.confirmed - ledger.intended - present
        undone = ledger.acked & present
        phantom = present - ledger.tried
        assert not lost, f"round {round_no}: {len(lost)} confirmed messages lost, e.g. {sorted(lost)[:5]}"
        assert not undone, f"round {round_no}: {len(undone)} acked messages came back, e.g. {sorted(undone)[:5]}"
        assert not phantom, f"round {round_no}: messages never published are stored: {sorted(phantom)[:5]}"
        print(f"round {round_no}: confirmed {len(ledger.confirmed)}, acked {len(ledger.acked)}, stored {len(present)}")
        ledger.intended |= present  # acked by the checker: a confirmed ack is never undone
        ledger.acked |= present
    assert ledger.confirmed and ledger.acked, "the workload did nothing: the test proves nothing"
    print(f"{stop}: {stopped_cleanly} of {ROUNDS} servers exited cleanly before the SIGKILL")
