"""One heap of deadlines for the whole broker: lease ends, delays, expiries, retention trims.

Idle queues cost nothing per tick: nothing polls; the async layer sleeps until `next_deadline()`.
Entries are never removed from the middle: a timer whose subject changed (a lease extended, a message acked) is
recognised as stale when it fires and ignored. Invariant: `pop_due(now)` yields timers in deadline order, ties in
insertion order.
"""

from __future__ import annotations

import heapq
from itertools import count

LEASE, DELAY, EXPIRE, RETAIN = range(4)


class Timers:
    """A heap of (when, seq, kind, owner, subject)."""

    __slots__ = ("heap", "_seq")

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, int, object, object]] = []
        self._seq = count()

    def add(self, when: float, kind: int, owner: object, subject: object) -> None:
        heapq.heappush(self.heap, (when, next(self._seq), kind, owner, subject))

    def next_deadline(self) -> float | None:
        return self.heap[0][0] if self.heap else None

    def pop_due(self, now: float):
        """Yield (when, kind, owner, subject) of every timer due at `now`, earliest first."""
        heap = self.heap
        while heap and heap[0][0] <= now:
            when, _, kind, owner, subject = heapq.heappop(heap)
            yield when, kind, owner, subject

    def __len__(self) -> int:
        return len(self.heap)
