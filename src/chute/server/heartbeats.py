"""`Sweeper`: one timer for the heartbeats and dead-peer checks of every native connection of a server.

An idle broker with many connections used to keep one loop timer per connection (re-armed every half heartbeat
interval); the sweeper keeps them all on one timer instead. Each session asks to be looked at again at a time of
its choosing (`at`: when its next HEARTBEAT falls due, or when its peer would have been silent for too long);
times are rounded *up* to a grid of `tick_s(interval)` (at most `TICK_S`), so the checks of many connections fall
into the same slot and run in one wakeup of the event loop. A slot's sessions get `sweep(now)`, which does the
checks and returns the next time to look (None: forget me). Then the sweeper calls `on_sweep()` once (the server
looks at its users file there), and at least every `every_s` while any session is registered.

Invariants: a session is looked at no earlier than the time it asked for and at most one grid step later (plus
the loop's own lateness); a check never runs before its slot's time (`now` passed to `sweep` is at least the
slot's time); a sweep always moves a session to a later slot, so one wakeup cannot loop; with no session
registered there is no timer at all.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Callable
from typing import Protocol

TICK_S = 0.25  # the coarsest grid: with the default 10 s interval a heartbeat goes out 5 to 5.25 s into a silence


def tick_s(interval_s: float) -> float:
    """The grid step for a connection with this heartbeat interval: fine enough for short intervals."""
    return min(TICK_S, interval_s / 8)


class Swept(Protocol):
    heartbeat_s: float  # its heartbeat interval: picks its grid

    def sweep(self, now: float) -> float | None: ...


class Sweeper:
    def __init__(self, loop: asyncio.AbstractEventLoop, on_sweep: Callable[[], None] | None = None,
                 every_s: float | None = None) -> None:  # fmt: skip
        self.loop = loop
        self.on_sweep = on_sweep
        self.every_s = every_s
        self._slots: dict[float, list[Swept]] = {}  # slot time -> sessions to look at then
        self._times: list[float] = []  # heap of the slot times in `_slots`
        self._due: dict[Swept, float] = {}  # session -> its slot (entries elsewhere are stale and skipped)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._swept_at = loop.time()
        self._sweeping: float | None = None  # the slot being swept
        self.wakeups = 0  # for tests and measurements

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, item: Swept) -> bool:
        return item in self._due

    def schedule(self, item: Swept, at: float) -> None:
        """Look at `item` at `at`, rounded up to the grid of its heartbeat interval (and always after the slot
        being swept now); replaces the item's earlier request."""
        step = tick_s(item.heartbeat_s)
        if self._sweeping is not None and at <= self._sweeping:
            at = self._sweeping + step * 0.5
        slot = math.ceil(at / step) * step
        if slot < at:  # float rounding
            slot += step
        if not self._due:
            self._swept_at = self.loop.time()
        self._due[item] = slot
        items = self._slots.get(slot)
        if items is None:
            self._slots[slot] = [item]
            heapq.heappush(self._times, slot)
        else:
            items.append(item)
        if self._sweeping is None:
            self._arm()

    def discard(self, item: Swept) -> None:
        if self._due.pop(item, None) is not None and not self._due:
            self._slots.clear()
            self._times.clear()
            if self._sweeping is None:
                self._arm()

    def _arm(self) -> None:
        if not self._due:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = self._timer_at = None
            return
        at = self._times[0]
        if self.every_s is not None:
            at = min(at, self._swept_at + self.every_s)
        if self._timer_at is not None and self._timer_at <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self.loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self._timer = self._timer_at = None
        self.wakeups += 1
        now = self.loop.time()
        times, slots, due = self._times, self._slots, self._due
        try:
            # the loop's clock may read a hair before the slot it woke us for (millisecond timers): it is due
            while times and times[0] <= now + 0.001:
                slot = self._sweeping = heapq.heappop(times)
                for item in slots.pop(slot):
                    if due.get(item) != slot:
                        continue  # rescheduled or discarded since
                    del due[item]
                    try:
                        at = item.sweep(max(now, slot))
                    except Exception as exc:  # a bug in one session must not stop the others' heartbeats
                        self.loop.call_exception_handler({"message": "heartbeat sweep failed", "exception": exc})
                        at = None
                    if at is not None and item not in due:
                        self.schedule(item, at)
        finally:
            self._sweeping = None
        self._swept_at = now
        if self.on_sweep is not None and due:
            self.on_sweep()
        self._arm()
