"""Event-loop lag: how late the loop runs a callback that was due, as a histogram for /metrics.

A `LoopLagMonitor` keeps one timer on the loop: every `interval_s` (0.1 s) it runs, notes how much later than
its due time it ran (`loop.time()` now minus the time it was scheduled for), and schedules itself again. A loop
held by one long callback (a big snapshot, a scrape, a purge) makes that lateness grow by as long as it was held,
so the histogram shows the stalls every client of this server felt, whatever caused them. A hold shorter than
the interval is seen only if the timer falls due during it: benchmarks that look for every hold over a few
milliseconds (benchmarks/stalls.py) set a shorter interval with CHUTE_LOOP_LAG_INTERVAL_S (a lag is then
under-measured by at most that interval).

Each lag is also split by where the loop's thread was. At every tick the monitor reads the thread's CPU time
(`time.thread_time()`): the CPU it used since the previous tick bounds how much of the lag the loop spent running
code (`on_cpu`, its own histogram). The rest of a lag the thread was off the CPU: waiting for a core that other
processes held (a loaded machine, a noisy neighbour on a VM) or blocked in the kernel (a page fault to disk, a
blocking system call). A lag that is mostly on CPU is the server's own hold; one that is mostly off CPU is the
machine's, and no change to the server's code would remove it.

Invariants:
- cost: one timer callback, one read of the thread's CPU clock and a few integer operations per `interval_s`,
  whatever the load; nothing per message or per connection (10 wake-ups a second are invisible next to an idle
  server's sweeper);
- the lag of one tick is counted once, in the first bucket whose bound is >= it (cumulated only when rendered);
  `max_s` is the largest lag seen since the monitor started; the same holds for `on_cpu`;
- a tick's on-CPU part is min(lag, the thread's CPU time since the previous tick): never more than its lag, and
  an upper bound of the loop's own share (the CPU of the window before the timer fell due is counted too, so the
  bound is loose by at most the interval's work);
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
    text = os.environ.get(INTERVAL_ENV)
    if text is None:
        return DEFAULT_INTERVAL_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.001 <= value <= 10:
        raise ValueError(f"{INTERVAL_ENV} must be a number of seconds from 0.001 to 10, not {text!r}")
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
    """Measures how late the event loop runs a periodic callback (this histogram) and how much of each lateness
    the loop's thread spent on the CPU (`on_cpu`). `start()` on the loop, `stop()` when done."""

    def __init__(self, interval_s: float | None = None) -> None:
        super().__init__()
        self.interval_s = interval_from_env() if interval_s is None else interval_s
        self.on_cpu = LagHistogram()
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._cpu = 0.0  # the loop thread's CPU time when the previous tick ran

    @property
    def running(self) -> bool:
        return self._handle is not None

    def start(self) -> None:
        """Begin measuring on the running loop (idempotent)."""
        if self._handle is None:
            self._cpu = time.thread_time()
            self._schedule(asyncio.get_running_loop())

    def stop(self) -> None:
        """Stop measuring; the figures stay readable. Idempotent."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def observe(self, lag_s: float, cpu_s: float | None = None) -> None:
        """Count one lateness and, given the loop thread's CPU time since the previous tick, its on-CPU part
        (also for tests; without `cpu_s` the whole lag counts as on CPU)."""
        super().observe(lag_s)
        self.on_cpu.observe(min(lag_s, lag_s if cpu_s is None else cpu_s))

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        self._due = loop.time() + self.interval_s
        self._handle = loop.call_at(self._due, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        cpu = time.thread_time()
        self.observe(loop.time() - self._due, cpu - self._cpu)
        self._cpu = cpu
        self._schedule(loop)
