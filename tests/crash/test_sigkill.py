"""SIGKILL under load: every confirmed publish survives, no confirmed ack is undone, nothing is duplicated.

Each round starts the worker (tests/crash/worker.py) on the same data directory, lets it publish and ack until
its log has grown by a random amount, kills it with SIGKILL at that moment, then opens the directory in this
process and compares what is stored with the worker's log. Rounds run on one directory, so recovery also meets
the checkpoints, compaction and torn tails of the rounds before. Size: CHUTE_CRASH_ROUNDS (default 20).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chute import Broker

ROUNDS = int(os.environ.get("CHUTE_CRASH_ROUNDS", "20"))
ROOT = Path(__file__).resolve().parents[2]


def _read_log(path: Path) -> dict[str, set[int]]:
    events = {"P": set(), "F": set(), "I": set(), "A": set()}
    if not path.exists():
        return events
    for line in path.read_text().splitlines():
        tag, *seqs = line.split()
        if tag in events:
            events[tag].update(int(s) for s in seqs)
    return events


async def _wait_for_lines(path: Path, count: int, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= count:
            return
        if process.poll() is not None:
            raise AssertionError(f"worker exited early with {process.returncode}; see {path.with_suffix('.err')}")
        await asyncio.sleep(0.01)  # polling a file another process writes: there is nothing to await
    raise AssertionError("worker made no progress")


async def _stored_bodies(data_dir: Path) -> tuple[dict[str, list[int]], object]:
    async with Broker(data_dir) as broker:
        stored = {}
        for queue in ("crash", "fan-a"):
            deliveries = await broker.peek(queue, 10_000_000)
            stored[queue] = [int(d.body[1:]) for d in deliveries]
        return stored, broker.recovery


@pytest.mark.crash
@pytest.mark.timeout(600)
async def test_sigkill_under_load_loses_nothing_confirmed(tmp_path):
    data_dir, rng = tmp_path / "data", random.Random(1234)
    torn = 0
    for round_number in range(1, ROUNDS + 1):
        log_path = tmp_path / f"round{round_number}.log"
        with open(tmp_path / f"round{round_number}.err", "wb") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "tests.crash.worker", str(data_dir), str(log_path), str(round_number)],
                cwd=ROOT,
                stderr=stderr,
            )
            try:
                await _wait_for_lines(log_path, rng.randint(5, 400), process, timeout_s=60)
                process.send_signal(signal.SIGKILL)
            finally:
                process.kill()
                process.wait(timeout=30)
        history = [_read_log(tmp_path / f"round{n}.log") for n in range(1, round_number + 1)]
        confirmed = {tag: set().union(*(h[tag] for h in history)) for tag in ("P", "F", "A", "I")}
        stored, report = await _stored_bodies(data_dir)
        torn += report.truncated_bytes > 0
        everything = stored["crash"] + stored["fan-a"]
        assert len(everything) == len(set(everything)), "a message is stored twice"
        present = set(everything)
        lost = (confirmed["P"] | confirmed["F"]) - confirmed["A"] - confirmed["I"] - present
        assert not lost, f"round {round_number}: confirmed publishes missing: {sorted(lost)[:10]}"
        undone = confirmed["A"] & present
        assert not undone, f"round {round_number}: confirmed acks undone: {sorted(undone)[:10]}"
    print(f"{ROUNDS} SIGKILL rounds; torn tails cut in {torn}")
