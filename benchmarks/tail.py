"""Where the slowest messages of a latency run waited (issue 12: a p99.9 or max miss with no hold of the loop).

A latency harness records, for every message, when it was sent, when its publish was confirmed and when the
consumer received it (`Timeline`). Beside it run three watchers on the harness's own clock (`time.perf_counter`):
- `ChildWatch`, a thread polling `/proc/<broker>/task/*/children` every `interval` seconds, notes the spans in which
  the broker had a child process (the checkpoint's replay child, which shares the machine's cores);
- `HarnessLag`, a task on the harness's loop, notes each time that loop woke late by more than `threshold` (the
  client's own pauses count in every latency measured);
- `Canary`, a bystander process doing nothing but 1 ms sleeps, notes each time it woke late, with how much of the
  lateness it spent runnable but waiting for a core (its run-queue wait, /proc/thread-self/schedstat) and the
  machine's steal time meanwhile (/proc/stat). When the broker, the harness and the canary are late together, the
  machine was (every core busy, or the VM not run); a canary late without waiting for a core was not run at all.

`explain_tail` then takes the slowest messages (the top 1 - quantile) and says, for them against the whole run:
how many were sent while a child ran (against the share of the run a child ran), how their wait splits into
"until the publish was confirmed" (the broker's commit: its loop, its writer thread, the disk's sync) and "from
the confirm to the delivery" (dispatch and the consumer's side), how many were in flight during a span of each
cause (`in_flight_during`: the watchers above, and the slow fsyncs and loop holds a broker with
CHUTE_HOLD_REPORT_MS logged, read by `broker_log_spans`), and their episodes (`episodes`). It proves nothing
alone; it says which cause to look at.

Invariants: every time is a `time.perf_counter()` reading of this process (the canary's and the broker log's
wall-clock times are converted); a message never confirmed or never received is left out of the split (a run
that loses messages fails elsewhere); the watchers are bounded by the run (the thread stops on `stop()`, the task
when cancelled, the canary when its stdin ends).
"""

from __future__ import annotations

import asyncio
import glob
import json
import math
import os
import re
import select
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class Timeline:
    """Per-message times, indexed by the message's number in the run; NaN where a time is not (yet) known. The
    lists are made whole at the start: growing them, or dicts, during the run would hold the harness's loop (a
    resize copies them) and show as latency."""

    def __init__(self, total: int = 0) -> None:
        self.sent = [math.nan] * total
        self.confirmed = [math.nan] * total
        self.received = [math.nan] * total
        self.count = 0  # messages sent so far

    def send(self, at: float) -> int:
        index, self.count = self.count, self.count + 1
        self.sent[index] = at
        return index

    def done(self, i: int) -> bool:
        """Message `i` was sent and received."""
        return i < self.count and not math.isnan(self.received[i])

    def was_confirmed(self, i: int) -> bool:
        return not math.isnan(self.confirmed[i])


class ChildWatch:
    """A thread noting the spans in which process `pid` had at least one child (`spans`: [start, end) pairs)."""

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        self.pattern = f"/proc/{pid}/task/*/children"
        self.interval = interval
        self.spans: list[tuple[float, float]] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="child-watch", daemon=True)

    def start(self) -> ChildWatch:
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, float]]:
        self._stopping.set()
        self._thread.join(timeout=5)
        return self.spans

    def has_child(self) -> bool:
        for path in glob.glob(self.pattern):
            try:
                with open(path) as f:
                    if f.read().strip():
                        return True
            except OSError:  # (a thread that ended between the glob and the open)
                continue
        return False

    def _run(self) -> None:
        opened: float | None = None
        while not self._stopping.is_set():
            now, running = time.perf_counter(), self.has_child()
            if running and opened is None:
                opened = now
            elif not running and opened is not None:
                self.spans.append((opened, now))
                opened = None
            self._stopping.wait(self.interval)
        if opened is not None:
            self.spans.append((opened, time.perf_counter()))


class HarnessLag:
    """Notes (woke_at, lateness) each time this loop woke more than `threshold` s late from a `period` s sleep."""

    def __init__(self, period: float = 0.001, threshold: float = 0.003) -> None:
        self.period, self.threshold = period, threshold
        self.late: list[tuple[float, float]] = []
        self.largest = 0.0

    async def run(self) -> None:
        while True:
            due = time.perf_counter() + self.period
            await asyncio.sleep(self.period)
            woke = time.perf_counter()
            lateness = woke - due
            self.largest = max(self.largest, lateness)
            if lateness > self.threshold:
                self.late.append((woke, lateness))


def _inside(at: float, spans: list[tuple[float, float]]) -> bool:
    return any(start <= at < end for start, end in spans)


def explain_tail(timeline: Timeline, child_spans: list[tuple[float, float]], harness_late: list[tuple[float, float]],
                 quantile: float = 99.9, wall_offset: float = 0.0,
                 canary_late: list[tuple[float, float, float, float]] = (),
                 other_spans: dict[str, list[tuple[float, float]]] | None = None) -> dict:  # fmt: skip
    """The slowest messages (the top 1 - `quantile`% by latency, at least one) against the whole run; ms.
    `other_spans` (e.g. broker_log_spans) join the sources of `in_flight_during`."""
    latency = {i: timeline.received[i] - timeline.sent[i] for i in range(timeline.count) if timeline.done(i)}
    if not latency:
        return {"messages": 0}
    count = max(1, math.ceil(round(len(latency) * (1 - quantile / 100), 6)))  # (the top ones, however many tie)
    slow = sorted(latency, key=latency.__getitem__)[-count:]
    bound = latency[slow[0]]
    start, end = min(timeline.sent[i] for i in latency), max(timeline.received[i] for i in latency)
    child_time = sum(max(0.0, min(e, end) - max(s, start)) for s, e in child_spans)
    # a late wake of the harness counts for a message in flight when it woke (sent before, received after)
    late_windows = [(woke - lateness, woke) for woke, lateness in harness_late]

    def split(indices: list[int]) -> dict:
        confirm = [timeline.confirmed[i] - timeline.sent[i] for i in indices if timeline.was_confirmed(i)]
        deliver = [timeline.received[i] - timeline.confirmed[i] for i in indices if timeline.was_confirmed(i)]
        return {
            "confirm_wait_ms_median": statistics.median(confirm) * 1000 if confirm else math.nan,
            "confirm_wait_ms_max": max(confirm) * 1000 if confirm else math.nan,
            "confirm_to_delivery_ms_median": statistics.median(deliver) * 1000 if deliver else math.nan,
            "confirm_to_delivery_ms_max": max(deliver) * 1000 if deliver else math.nan,
        }

    return {
        "episodes": episodes(timeline, slow, child_spans, harness_late, wall_offset, canary_late),
        "quantile": quantile,
        "bound_ms": bound * 1000,
        "messages": len(slow),
        "sent_while_a_child_ran": sum(_inside(timeline.sent[i], child_spans) for i in slow),
        "share_of_run_with_a_child": child_time / (end - start) if end > start else math.nan,
        "children": len(child_spans),
        "harness_late_wakes": len(late_windows),
        "canary_late_wakes": len(canary_late),
        "canary_late_max_ms": max((late for _, late, _, _ in canary_late), default=0.0) * 1000,
        "slow": split(slow),
        "all": split(list(latency)),
        "in_flight_during": in_flight_during(timeline, slow, {
            "a late wake of the harness": late_windows,
            "a late wake of the canary": [(woke - lateness, woke) for woke, lateness, _, _ in canary_late],
            "a checkpoint child": child_spans,
            **(other_spans or {}),
        }),
    }  # fmt: skip


EPISODE_GAP_S = 0.05  # slow messages sent less than this apart are one episode


def episodes(timeline: Timeline, slow: list[int], child_spans: list[tuple[float, float]],
             harness_late: list[tuple[float, float]], wall_offset: float,
             canary_late: list[tuple[float, float, float, float]] = (), limit: int = 10) -> list[dict]:  # fmt: skip
    """The slow messages grouped by send time (a gap over EPISODE_GAP_S starts a new group), worst `limit` first:
    when (`time.time()` scale, `wall_offset` = time.time() - perf_counter()), how many, their largest latency and
    confirm wait, the harness's and the canary's largest lateness while they were in flight (the canary's with
    its run-queue wait and the steal time in it), and whether a child ran meanwhile."""
    groups: list[list[int]] = []
    for i in sorted(slow, key=timeline.sent.__getitem__):
        if groups and timeline.sent[i] - timeline.sent[groups[-1][-1]] <= EPISODE_GAP_S:
            groups[-1].append(i)
        else:
            groups.append([i])
    result = []
    for group in groups:
        began, ended = timeline.sent[group[0]], max(timeline.received[i] for i in group)
        late = [lateness for woke, lateness in harness_late if woke - lateness < ended and woke > began]
        bystander = max(((lateness, waited, steal) for woke, lateness, waited, steal in canary_late
                         if woke - lateness < ended and woke > began), default=(0.0, 0.0, 0.0))  # fmt: skip
        result.append({
            "at": began + wall_offset,
            "messages": len(group),
            "latency_max_ms": max(timeline.received[i] - timeline.sent[i] for i in group) * 1000,
            "confirm_wait_max_ms": max((timeline.confirmed[i] - timeline.sent[i] for i in group
                                        if timeline.was_confirmed(i)), default=math.nan) * 1000,
            "harness_late_max_ms": max(late, default=0.0) * 1000,
            "canary_late_max_ms": bystander[0] * 1000,
            "canary_waited_ms": bystander[1] * 1000,
            "canary_steal_ms": bystander[2] * 1000,
            "child": any(s < ended and e > began for s, e in child_spans),
        })  # fmt: skip
    result.sort(key=lambda episode: -episode["latency_max_ms"])
    return result[:limit]


class Canary:
    """A bystander process (`python -m benchmarks.tail`) noting its own late wakes; `stop()` returns them as
    (woke_at, lateness, waited_for_a_core, steal) tuples of seconds on this process's perf_counter scale."""

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None

    def start(self) -> Canary:
        self._process = subprocess.Popen([sys.executable, "-m", "benchmarks.tail"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True, cwd=REPO)  # fmt: skip
        if self._process.stdout.readline() != "ready\n":  # (its loop runs from now on)
            raise RuntimeError("the canary process did not start")
        return self

    def stop(self) -> list[tuple[float, float, float, float]]:
        if self._process is None:
            return []
        out, _ = self._process.communicate("", timeout=30)  # (EOF on its stdin ends it)
        offset = time.time() - time.perf_counter()
        return [(wall - offset, late, waited, steal) for wall, late, waited, steal in json.loads(out or "[]")]


def _runqueue_wait_s() -> float:
    with open("/proc/thread-self/schedstat") as f:
        return int(f.read().split()[1]) / 1e9


def _steal_s() -> float:
    with open("/proc/stat") as f:
        return int(f.readline().split()[8]) / os.sysconf("SC_CLK_TCK")


def canary(period: float = 0.001, threshold: float = 0.003, limit: int = 100_000) -> None:
    """The canary's body: wake every `period` s until its stdin ends, then print its late wakes (wall clock). A
    wake's lateness is the time since the previous wake less `period`, so a pause during the canary's own
    bookkeeping (its /proc reads, ~0.05 ms) counts too, not only one during its sleep."""
    late: list[tuple[float, float, float, float]] = []
    waited, steal = _runqueue_wait_s(), _steal_s()
    print("ready", flush=True)
    woke = time.perf_counter()
    while True:
        if select.select([sys.stdin], [], [], period)[0]:
            break  # (EOF: the harness is done)
        now = time.perf_counter()
        lateness, woke = now - woke - period, now
        now_waited, now_steal = _runqueue_wait_s(), _steal_s()
        if lateness > threshold and len(late) < limit:
            late.append((time.time(), lateness, now_waited - waited, now_steal - steal))
        waited, steal = now_waited, now_steal
    json.dump(late, sys.stdout)


if __name__ == "__main__":
    canary()


def in_flight_during(timeline: Timeline, slow: list[int], sources: dict[str, list[tuple[float, float]]]) -> dict:
    """For each source of spans ([began, ended) on the perf_counter scale), how many of the `slow` messages were
    in flight (sent before the span ended, received after it began) during one of its spans; and how many during
    none of them. A message may count under several sources."""
    counts = dict.fromkeys(sources, 0)
    unexplained = 0
    for i in slow:
        sent, received = timeline.sent[i], timeline.received[i]
        hit = False
        for name, spans in sources.items():
            if any(began < received and ended > sent for began, ended in spans):
                counts[name] += 1
                hit = True
        unexplained += not hit
    return {**counts, "none of these": unexplained}


LOG_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) WARNING chute\.holds: "
    r"(?:a group commit's fsync took (?P<fsync>[\d.]+) ms|event loop held ~(?P<held>[\d.]+) ms)"
)


def broker_log_spans(path: str, wall_offset: float) -> dict[str, list[tuple[float, float]]]:
    """The slow fsyncs and loop holds a broker with CHUTE_HOLD_REPORT_MS logged (its log's local times, to the
    ms), as spans ending when each was logged, on this process's perf_counter scale (`wall_offset` = time.time()
    - perf_counter())."""
    spans: dict[str, list[tuple[float, float]]] = {"a slow fsync (broker log)": [], "a loop hold (broker log)": []}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            match = LOG_LINE.match(line)
            if match is None:
                continue
            logged = time.mktime(time.strptime(match[1], "%Y-%m-%d %H:%M:%S")) + int(match[2]) / 1000 - wall_offset
            if match["fsync"] is not None:
                spans["a slow fsync (broker log)"].append((logged - float(match["fsync"]) / 1000, logged + 0.001))
            else:
                spans["a loop hold (broker log)"].append((logged - float(match["held"]) / 1000, logged + 0.001))
    return spans
