"""Event-loop lag: how late the loop runs a callback that was due, as a histogram for /metrics.

A `LoopLagMonitor` keeps one timer on the loop: every `interval_s` (0.1 s) it runs, notes how much later than
its due time it ran (`loop.time()` now minus the time it was scheduled for), and schedules itself again. A loop
held by one long callback (a big snapshot, a scrape, a purge) makes that lateness grow by as long as it was held,
so the histogram shows the stalls every client of this server felt, whatever caused them. A hold shorter than
the interval is seen only if the timer falls due during it: benchmarks that look for every hold over a few
milliseconds (benchmarks/stalls.py) set a shorter interval with CHUTE_LOOP_LAG_INTERVAL_S (a lag is then
under-measured by at most that interval).

Each lag is also split by where the loop's thread was. At every tick the monitor reads the thread's CPU time
(`time.thread_time()`) and, on Linux, how long the scheduler kept it runnable but without a core (the run-queue
wait in /proc/thread-self/schedstat, read with one `pread`). Since the previous tick:
- `on_cpu`: the CPU the thread used, at most the lag: the loop running code, the server's own hold;
- `waiting`: the run-queue wait, at most the rest of the lag: the thread was ready but other processes held the
  cores (clients on the same machine, a neighbour on a shared VM): the machine's stall, not the server's;
- the rest of a lag the thread was blocked: waiting for the GIL that another of the server's threads held (the
  writer, a checkpoint, the database thread: the server's own hold again), or in the kernel (a page fault served
  from disk, a blocking system call).

Invariants:
- cost: one timer callback, a read of the thread's CPU clock, one `pread` and a few integer operations per `interval_s`,
  whatever the load; nothing per message or per connection (10 wake-ups a second are invisible next to an idle
  server's sweeper);
- the lag of one tick is counted once, in the first bucket whose bound is >= it (cumulated only when rendered);
  `max_s` is the largest lag seen since the monitor started; the same holds for `on_cpu` and `waiting`;
- a tick's parts never add up to more than its lag: on_cpu = min(lag, CPU time since the previous tick), waiting
  = min(lag - on_cpu, run-queue wait since the previous tick); each is an upper bound of its share (the window
  before the timer fell due counts too, so the bound is loose by at most one interval's worth);
- without /proc/thread-self/schedstat (not Linux) `waiting` stays empty and its share counts as blocked;
- state is touched only on the event loop (the tick and the scrape both run there).
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from bisect import bisect_left

# from half a millisecond (timer noise: libuv's timers have millisecond resolution) to one second
LAG_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
DEFAULT_INTERVAL_S = 0.1  # coarse on purpose: the cost of watching must stay far below 1% of an idle core
INTERVAL_ENV = "CHUTE_LOOP_LAG_INTERVAL_S"  # for benchmarks: a finer interval catches shorter holds


def interval_from_env() -> float:
    """The monitor's interval: CHUTE_LOOP_LAG_INTERVAL_S if set (seconds, 0.001 to 10), else the default."""
    value = number_from_env(INTERVAL_ENV, 0.001, 10, "seconds")
    return DEFAULT_INTERVAL_S if value is None else value


def number_from_env(name: str, low: float, high: float, unit: str) -> float | None:
    """The number in the environment variable `name`, None if it is not set; ValueError (naming the variable and
    the range) if it is not a number from `low` to `high` (an empty value included)."""
    text = os.environ.get(name)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not low <= value <= high:
        raise ValueError(f"{name} must be a number of {unit} from {low:g} to {high:g}, not {text!r}")
    return value


class LagHistogram:
    """Counts of lags by bucket (not cumulative; the last bucket is +Inf), their sum and their max."""

    def __init__(self) -> None:
        self.buckets = [0] * (len(LAG_BUCKETS_S) + 1)
        self.count = 0
        self.sum_s = 0.0
        self.max_s = 0.0

    def observe(self, lag_s: float) -> None:
        lag_s = max(lag_s, 0.0)
        self.buckets[bisect_left(LAG_BUCKETS_S, lag_s)] += 1
        self.count += 1
        self.sum_s += lag_s
        if lag_s > self.max_s:
            self.max_s = lag_s

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, observations at or below it) per bucket, `+Inf` last: the Prometheus shape."""
        result, total = [], 0
        for bound, count in zip([*map(str, LAG_BUCKETS_S), "+Inf"], self.buckets, strict=True):
            total += count
            result.append((bound, total))
        return result


class LoopLagMonitor(LagHistogram):
    """Measures how late the event loop runs a periodic callback (this histogram), and how much of each lateness
    its thread spent on the CPU (`on_cpu`) and waiting for a core (`waiting`). `start()` on the loop, `stop()`
    when done."""

    def __init__(self, interval_s: float | None = None) -> None:
        super().__init__()
        self.interval_s = interval_from_env() if interval_s is None else interval_s
        self.on_cpu = LagHistogram()
        self.waiting = LagHistogram()
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._cpu = 0.0  # the loop thread's CPU time when the previous tick ran
        self._schedstat: int | None = None  # the loop thread's /proc schedstat, open while running (Linux)
        self._waited = 0.0  # its run-queue wait when the previous tick ran

    @property
    def running(self) -> bool:
        return self._handle is not None

    def start(self) -> None:
        """Begin measuring on the running loop (idempotent)."""
        if self._handle is None:
            self._schedstat = _open_schedstat()  # (thread-self: opened on the loop's thread, it stays that one's)
            self._cpu, self._waited = time.thread_time(), self._runqueue_wait()
            self._schedule(asyncio.get_running_loop())

    def stop(self) -> None:
        """Stop measuring; the figures stay readable. Idempotent."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._schedstat is not None:
            os.close(self._schedstat)
            self._schedstat = None

    def observe(self, lag_s: float, cpu_s: float | None = None, waited_s: float = 0.0) -> None:
        """Count one lateness and, given the loop thread's CPU time and run-queue wait since the previous tick,
        its on-CPU and waiting parts (also for tests; without `cpu_s` the whole lag counts as on CPU)."""
        super().observe(lag_s)
        lag_s = max(lag_s, 0.0)
        on_cpu = lag_s if cpu_s is None else min(lag_s, max(cpu_s, 0.0))
        self.on_cpu.observe(on_cpu)
        self.waiting.observe(min(lag_s - on_cpu, waited_s))

    def _runqueue_wait(self) -> float:
        if self._schedstat is None:
            return 0.0
        try:
            return int(os.pread(self._schedstat, 128, 0).split()[1]) / 1e9
        except (OSError, ValueError, IndexError):
            return 0.0

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        self._due = loop.time() + self.interval_s
        self._handle = loop.call_at(self._due, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        cpu, waited = time.thread_time(), self._runqueue_wait()
        self.observe(loop.time() - self._due, cpu - self._cpu, waited - self._waited)
        self._cpu, self._waited = cpu, waited
        self._schedule(loop)


def _open_schedstat() -> int | None:
    """A descriptor on the calling thread's scheduler statistics, or None where there are none."""
    try:
        fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
    except OSError:
        return None
    try:
        int(os.pread(fd, 128, 0).split()[1])
    except (OSError, ValueError, IndexError):
        os.close(fd)
        return None
    return fd
