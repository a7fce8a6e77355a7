"""SIGKILL under load: every confirmed publish survives, no confirmed ack is undone, nothing is duplicated.

Each round starts the worker (tests/crash/worker.py) on the same data directory, waits until its log has grown
to a random number of lines (or, in some rounds, kills it a random moment after it started opening the broker,
so kills also land in recovery), kills it with SIGKILL, then opens the directory in this process and holds what
is stored against the logs of every round so far.

The checker only peeks (it never acks): the queues keep their backlog from round to round, so recovery meets a
growing state, old checkpoints, compaction and the torn tails of earlier rounds, and what a round saw stays the
reference for the next one. Its broker does write (a checkpoint and the clean-shutdown marker at close). After
the last round the checker drains every queue with receive + ack, and a last reopen must find them empty.

Per queue and round, with "intended" = an ack was sent (I line) and may or may not have landed:
- lost:        a confirmed publish (P) that is not stored and was never intended to be acked;
- undone:      a confirmed ack (A) whose message is stored;
- duplicated:  a seq stored twice in one queue;
- damaged:     a stored body or headers that differ from what was published for its seq;
- phantom:     a stored seq that was never even tried (T) for this queue's source;
- resurrected: a seq of an earlier round, absent at the previous check, stored again;
- vanished:    a seq stored at the previous check, absent now, with no ack intended since;
- split:       a topic message of this round stored in one subscription queue but not in the other (unless an
               ack was intended there): a fan-out publish lands whole or not at all.

Size: CHUTE_CRASH_ROUNDS (default 20; then half as many again with every checkpoint of the worker rebuilt by a
child, chute/_replay_child.py). Randomness: CHUTE_CRASH_SEED (default 20261128; printed with -s).
Run with -s to see the recovery reports of every round.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from chute import Broker
from chute.storage import FileStore
from tests.crash.worker import FAN_QUEUES, QUEUES, SEGMENT_MAX_BYTES, SOURCE, TOPIC, body_of, headers_of, seq_of

ROUNDS = int(os.environ.get("CHUTE_CRASH_ROUNDS", "20"))
SEED = int(os.environ.get("CHUTE_CRASH_SEED") or 20261128)  # fixed by default: CI runs are repeatable
ROOT = Path(__file__).resolve().parents[2]
WORKER_TIME_LIMIT_S = 30.0
PROGRESS_DEADLINE_S = 60.0  # a worker that has not logged the awaited lines by then is stuck


@dataclass
class RoundLog:
    """The events of one worker run: seqs by destination (T, P) or queue (I, A)."""

    tried: dict[str, set[int]] = field(default_factory=lambda: collections.defaultdict(set))
    confirmed: dict[str, set[int]] = field(default_factory=lambda: collections.defaultdict(set))
    intended: dict[str, set[int]] = field(default_factory=lambda: collections.defaultdict(set))
    acked: dict[str, set[int]] = field(default_factory=lambda: collections.defaultdict(set))
    lines: int = 0
    started: bool = False
    ended: bool = False
    violations: list[str] = field(default_factory=list)


def read_log(path: Path) -> RoundLog:
    log = RoundLog()
    data = path.read_bytes() if path.exists() else b""
    complete = data[: data.rfind(b"\n") + 1].decode()  # a line cut short by the kill was never acted upon
    by_tag = {"T": log.tried, "P": log.confirmed, "I": log.intended, "A": log.acked}
    for line in complete.splitlines():
        log.lines += 1
        tag, *fields = line.split()
        if tag in by_tag:
            by_tag[tag][fields[0]].update(int(s) for s in fields[1:])
        elif tag == "S":
            log.started = True
        elif tag == "E":
            log.ended = True
        elif tag == "X":
            log.violations.append(line)
    return log


@dataclass
class History:
    """Every round's log so far, merged."""

    tried: dict[str, set[int]] = field(default_factory=lambda: collections.defaultdict(set))
    confirmed: dict[str, set[int]] = field(default_factory=lambda: collections.defaultdict(set))
    intended: dict[str, set[int]] = field(default_factory=lambda: collections.defaultdict(set))
    acked: dict[str, set[int]] = field(default_factory=lambda: collections.defaultdict(set))

    def add(self, log: RoundLog) -> None:
        for name in ("tried", "confirmed", "intended", "acked"):
            mine, theirs = getattr(self, name), getattr(log, name)
            for key, seqs in theirs.items():
                mine[key] |= seqs


class LogWatcher:
    """Counts the lines of a log another process appends to, reading only what is new."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.lines = path, 0, 0

    def poll(self) -> int:
        if self.path.exists():
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
            self.offset += len(chunk)
            self.lines += chunk.count(b"\n")
        return self.lines


async def wait_for_lines(watcher: LogWatcher, count: int, process: subprocess.Popen) -> bool:
    """Wait until the log has `count` lines (True) or the worker exited by itself (False). A file another
    process appends to offers nothing to await, so this polls, with a deadline."""
    deadline = time.monotonic() + PROGRESS_DEADLINE_S
    while watcher.poll() < count:
        if process.poll() is not None:
            return False
        if time.monotonic() > deadline:
            raise AssertionError(f"worker logged {watcher.lines} lines in {PROGRESS_DEADLINE_S} s, awaited {count}")
        await asyncio.sleep(0.002)
    return True


async def run_worker(round_number: int, data_dir: Path, log_path: Path, rng: random.Random) -> str:
    """Start the worker, SIGKILL it at a random moment; return how the run ended."""
    err_path = log_path.with_suffix(".err")
    with open(err_path, "wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.crash.worker", str(data_dir), str(log_path), "--seed", str(round_number),
             "--time-limit", str(WORKER_TIME_LIMIT_S)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
        try:
            watcher = LogWatcher(log_path)
            if rng.random() < 0.2:  # during recovery, setup, or the first steps
                alive = await wait_for_lines(watcher, 1, process)
                target = "opening"
                if alive:
                    await asyncio.sleep(rng.uniform(0.0, 0.4))
            else:
                lines = rng.randint(10, 2500)
                alive = await wait_for_lines(watcher, lines, process)
                target = f"{lines} lines"
                if alive:
                    await asyncio.sleep(rng.uniform(0.0, 0.003))  # not always right after a log line
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                how = f"killed at {target}"
            else:
                how = f"exited with {process.returncode} before {target}"
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)
    if process.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"round {round_number}: worker {how}; stderr:\n{err_path.read_text()[-3000:]}")
    return how


def describe(report) -> str:
    cut = "no torn tail"
    if report.truncated_at is not None:
        name, pos = Path(report.truncated_at[0]).name, report.truncated_at[1]
        cut = f"torn tail cut: {name} at {pos} ({report.truncated_bytes} bytes)"
    extra = f"; problems: {report.problems}" if report.problems and report.truncated_at is None else ""
    return (
        f"replayed {report.records} records, {report.segments} segments, "
        f"clean_shutdown={report.clean_shutdown}, {cut}{extra}"
    )


async def stored_messages(data_dir: Path) -> tuple[dict[str, list], object]:
    """What a broker opened on `data_dir` holds: (seq, body, headers) per queue, in delivery order."""
    async with Broker(store=FileStore(data_dir, segment_max_bytes=SEGMENT_MAX_BYTES)) as broker:
        stored = {}
        for queue in QUEUES:
            stored[queue] = [(seq_of(d.body), d.body, d.headers) for d in await broker.peek(queue, 10**9)]
            stats = broker.queue_stats(queue)
            assert stats.ready + stats.delayed + stats.in_flight == len(stored[queue]), (queue, stats)
        return stored, broker.recovery


def check_round(
    stored: dict[str, list], history: History, this_round: RoundLog, before: History, previous: dict[str, set[int]]
) -> list[str]:
    """The invariants of the module docstring; returns what is broken."""
    problems = []

    def fail(kind: str, queue: str, seqs) -> None:
        if seqs:
            problems.append(f"{kind} in {queue}: {len(seqs)} seq(s), e.g. {sorted(seqs)[:8]}")

    present: dict[str, set[int]] = {}
    for queue in QUEUES:
        source = SOURCE[queue]
        seqs = [seq for seq, _, _ in stored[queue]]
        present[queue] = here = set(seqs)
        fail("duplicated", queue, {s for s, n in collections.Counter(seqs).items() if n > 1})
        fail("damaged", queue, {s for s, b, h in stored[queue] if b != body_of(s) or h != headers_of(s)})
        fail("phantom", queue, here - history.tried[source])
        fail("lost", queue, history.confirmed[source] - history.intended[queue] - here)
        fail("undone", queue, history.acked[queue] & here)
        fail("resurrected", queue, (here & before.tried[source]) - previous[queue])
        fail("vanished", queue, previous[queue] - here - this_round.intended[queue])
    a, b = FAN_QUEUES
    for queue, other in ((a, b), (b, a)):
        only_here = this_round.tried[TOPIC] & (present[queue] - present[other])
        fail("split", f"{queue} (not {other})", only_here - this_round.intended[other])
    previous.update(present)
    return problems


@pytest.mark.crash
@pytest.mark.timeout(60 + 10 * ROUNDS)
@pytest.mark.parametrize("children", [False, True], ids=["checkpoints-as-sized", "every-checkpoint-by-a-child"])
async def test_sigkill_under_load_loses_nothing_confirmed(tmp_path, monkeypatch, children):
    rounds = ROUNDS
    if children:  # the worker's checkpoints are all rebuilt from the files by a child (chute/_replay_child.py)
        monkeypatch.setenv("CHUTE_SNAPSHOT_FORK_MIN_ENTRIES", "0")
        rounds = max(1, ROUNDS // 2)
    data_dir, rng = tmp_path / "data", random.Random(SEED)
    history, previous = History(), {queue: set() for queue in QUEUES}
    summary, started = [], time.monotonic()
    print(f"\nSIGKILL campaign: {rounds} rounds, CHUTE_CRASH_SEED={SEED}, children={children}, data in {data_dir}")
    for round_number in range(1, rounds + 1):
        log_path = tmp_path / f"round{round_number:03d}.log"
        how = await run_worker(round_number, data_dir, log_path, rng)
        this_round = read_log(log_path)
        before = History()
        before.add(history)
        history.add(this_round)
        assert not this_round.violations, f"round {round_number} (seed {SEED}): worker saw {this_round.violations}"
        stored, report = await stored_messages(data_dir)
        line = (
            f"round {round_number:2d}: {how}, {this_round.lines} log lines; stored "
            + ", ".join(f"{q} {len(stored[q])}" for q in QUEUES)
            + f"; recovery: {describe(report)}"
        )
        summary.append((report, line))
        print(line)
        problems = check_round(stored, history, this_round, before, previous)
        assert not problems, f"round {round_number} (seed {SEED}, logs in {tmp_path}):\n" + "\n".join(problems)

    # drain with receive + ack; a reopen must then find every queue empty
    async with Broker(store=FileStore(data_dir, segment_max_bytes=SEGMENT_MAX_BYTES)) as broker:
        for queue in QUEUES:
            drained = []
            while batch := await broker.receive(queue, 500):
                drained += [seq_of(d.body) for d in batch]
                await broker.ack(queue, [d.receipt for d in batch])
            assert sorted(drained) == sorted(previous[queue]), f"{queue}: receive gives what peek showed, once"
    async with Broker(store=FileStore(data_dir, segment_max_bytes=SEGMENT_MAX_BYTES)) as broker:
        for queue in QUEUES:
            assert await broker.peek(queue, 10) == [], f"{queue}: acked messages came back after a restart"
        final = describe(broker.recovery)
    torn = sum(report.truncated_at is not None for report, _ in summary)
    print(f"after draining and reopening: {final}")
    print(f"{rounds} rounds in {time.monotonic() - started:.1f} s; torn tails cut in {torn} of them")


def test_checker_flags_each_kind_of_violation(tmp_path):
    """The checker itself: a fabricated history and store, with one violation of each kind."""

    def log_of(name: str, *lines: str) -> RoundLog:
        path = tmp_path / name
        path.write_text("".join(line + "\n" for line in lines) + "P crash 1000")  # plus an unfinished line
        return read_log(path)

    def stored_of(**seqs_by_queue):
        return {q: [(s, body_of(s), headers_of(s)) for s in seqs_by_queue.get(q.replace("-", "_"), [])] for q in QUEUES}

    first = log_of("1", "T crash 1 2 3 4", "P crash 1 2 3 4", "T fan 5 6", "P fan 5 6", "I crash 1", "A crash 1")
    assert first.confirmed["crash"] == {1, 2, 3, 4}
    history, previous = History(), {q: set() for q in QUEUES}
    history.add(first)
    assert (
        check_round(stored_of(crash=[2, 3, 4], fan_a=[5, 6], fan_b=[5, 6]), history, first, History(), previous) == []
    )

    second = log_of("2", "T crash 7 8", "P crash 7", "T fan 9", "I crash 2", "A crash 2", "I fan-a 5")
    before = History()
    before.add(history)
    history.add(second)
    stored = stored_of(crash=[1, 2, 7, 7, 99], fan_a=[6, 9], fan_b=[5, 6])
    stored["crash"].append((3, b"seq=3;tampered", headers_of(3)))
    problems = "\n".join(check_round(stored, history, second, before, previous))
    for expected in (
        "duplicated in crash: 1 seq(s), e.g. [7]",
        "damaged in crash: 1 seq(s), e.g. [3]",
        "phantom in crash: 1 seq(s), e.g. [99]",
        "lost in crash: 1 seq(s), e.g. [4]",
        "undone in crash: 2 seq(s), e.g. [1, 2]",
        "resurrected in crash: 1 seq(s), e.g. [1]",
        "vanished in crash: 1 seq(s), e.g. [4]",
        "split in fan-a (not fan-b): 1 seq(s), e.g. [9]",
    ):
        assert expected in problems, problems
    assert "fan-b:" not in problems  # 5 is missing from fan-a only, where its ack was intended
