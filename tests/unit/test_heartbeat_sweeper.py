"""The server's heartbeat sweeper (chute.server.heartbeats): one loop timer for every connection's checks.

The tests run the sweeper on a hand-driven loop (its clock moves only to the next timer): the bounds on when an item
is looked at are the sweeper's own, without a busy machine's lateness in them, and nothing sleeps. The server's
heartbeats over real sockets are tests/protocol/test_heartbeats.py."""

from __future__ import annotations

import heapq
import itertools
import random

from chute.server.heartbeats import TICK_S, Sweeper, tick_s


class Item:
    """Asks to be looked at every `period` seconds, `times` times; records when it was looked at."""

    def __init__(self, loop, heartbeat_s: float, period: float, times: int) -> None:
        self.loop = loop
        self.heartbeat_s = heartbeat_s
        self.period = period
        self.left = times
        self.asked: list[float] = []  # times asked for
        self.seen: list[tuple[float, float]] = []  # (now passed to sweep, loop time at the call)

    def ask(self, sweeper: Sweeper, at: float) -> None:
        self.asked.append(at)
        sweeper.schedule(self, at)

    def sweep(self, now: float) -> float | None:
        self.seen.append((now, self.loop.time()))
        self.left -= 1
        if self.left <= 0:
            return None
        at = now + self.period
        self.asked.append(at)
        return at


class Timer:
    """A timer of `HandDrivenLoop` (the sweeper only cancels it)."""

    def __init__(self, callback) -> None:
        self.callback, self.cancelled = callback, False

    def cancel(self) -> None:
        self.cancelled = True


class HandDrivenLoop:
    """What the sweeper uses of an event loop (`time`, `call_at`, `call_exception_handler`), on a clock that moves
    only when the test runs the next timer, to that timer's time."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now
        self._timers: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()
        self.errors: list[dict] = []  # what call_exception_handler was given

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback) -> Timer:
        timer = Timer(callback)
        heapq.heappush(self._timers, (when, next(self._order), timer))
        return timer

    def call_exception_handler(self, context: dict) -> None:
        self.errors.append(context)

    def run_next(self) -> bool:
        """Move the clock to the next live timer and run it; False when there is none."""
        while self._timers:
            when, _, timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            self.now = max(self.now, when)
            timer.callback()
            return True
        return False

    def run_until(self, at: float) -> None:
        """Run the timers due by `at`, then move the clock to `at`."""
        while any(when <= at and not timer.cancelled for when, _, timer in self._timers):
            self.run_next()
        self.now = max(self.now, at)


EPSILON = 1e-9  # float rounding of slot times


def test_many_items_share_few_wakeups_and_each_is_looked_at_on_time():
    loop = HandDrivenLoop()
    sweeper = Sweeper(loop)
    rng = random.Random(7)
    start = loop.time()
    items = [Item(loop, 2.0, 0.3, 3) for _ in range(300)]
    for item in items:
        item.ask(sweeper, start + rng.uniform(0.0, 0.5))
    while loop.run_next():
        pass
    assert len(sweeper) == 0
    step = tick_s(2.0)
    for item in items:
        assert len(item.seen) == 3
        for asked, (now, actual) in zip(item.asked, item.seen, strict=True):
            assert asked <= now == actual  # never early, and `now` is when it runs
            assert actual - asked <= step + EPSILON  # at most a grid step late
    # 900 checks over about 1.1 s, on a 0.25 s grid: one wakeup per slot, not one per check
    assert sweeper.wakeups <= 6, sweeper.wakeups
    assert sweeper._timer is None  # nothing registered: no timer


def test_short_intervals_get_a_finer_grid():
    loop = HandDrivenLoop()
    sweeper = Sweeper(loop)
    item = Item(loop, 0.05, 0.025, 8)
    item.ask(sweeper, loop.time() + 0.025)
    while loop.run_next():
        pass
    assert tick_s(0.05) < TICK_S and len(item.seen) == 8
    for asked, (now, actual) in zip(item.asked, item.seen, strict=True):
        assert asked <= now == actual and actual - asked <= tick_s(0.05) + EPSILON


def test_discarded_and_rescheduled_items():
    loop = HandDrivenLoop()
    sweeper = Sweeper(loop)
    start = loop.time()
    gone, moved = Item(loop, 1.0, 1.0, 1), Item(loop, 1.0, 1.0, 1)
    gone.ask(sweeper, start + 0.05)
    moved.ask(sweeper, start + 0.05)
    moved.ask(sweeper, start + 0.4)  # replaces its first request
    sweeper.discard(gone)
    loop.run_until(start + 0.2)
    assert gone.seen == [] and moved.seen == []
    while loop.run_next():
        pass
    assert gone.seen == [] and len(moved.seen) == 1
    assert start + 0.4 <= moved.seen[0][1] <= start + 0.4 + tick_s(1.0) + EPSILON  # its slot, a grid step at most
    assert len(sweeper) == 0 and sweeper._timer is None


def test_on_sweep_runs_at_least_every_every_s_while_items_are_registered():
    loop = HandDrivenLoop()
    calls: list[float] = []
    sweeper = Sweeper(loop, lambda: calls.append(loop.time()), every_s=0.1)
    start = loop.time()
    item = Item(loop, 100.0, 50.0, 1)
    item.ask(sweeper, start + 50.0)  # nothing due for a long time
    loop.run_until(start + 0.55)
    assert len(calls) == 5 and item.seen == [], calls
    assert calls[0] - start <= 0.1 + EPSILON
    assert all(b - a <= 0.1 + EPSILON for a, b in zip(calls, calls[1:], strict=False))
    sweeper.discard(item)
    assert not loop.run_next()  # no items: no timer, no calls
    assert len(calls) == 5 and sweeper._timer is None


def test_a_failing_item_does_not_stop_the_others():
    loop = HandDrivenLoop()

    class Broken(Item):
        def sweep(self, now):
            raise RuntimeError("bug")

    sweeper = Sweeper(loop)
    broken, fine = Broken(loop, 1.0, 0.1, 1), Item(loop, 1.0, 0.1, 2)
    broken.ask(sweeper, loop.time() + 0.01)
    fine.ask(sweeper, loop.time() + 0.01)
    while loop.run_next():
        pass
    assert len(fine.seen) == 2 and broken not in sweeper and len(sweeper) == 0
    assert [type(context["exception"]) for context in loop.errors] == [RuntimeError]
