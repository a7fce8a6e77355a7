"""Deduplication window of one queue or topic: dedup id -> what it was remembered as (expiry, message id).

Invariant: an id is remembered until `expires` (publish time + the window), then forgotten by the next sweep;
`order` holds the same `Remembered` items in insertion order, which is expiry order while the window is
unchanged (a shorter window after an update only makes some ids live a little longer). The broker sweeps a window
with a timer (`timer_at`) so ids are forgotten on time even when no publish looks them up: memory holds the ids of
the window, never every id that ever passed. `lookup` changes nothing, so a publish refused after its dedup check
leaves the window as it was.

A window remembers an id with one `Remembered` struct the cyclic garbage collector never tracks (`gc=False`): a
busy window allocates one per publish and keeps it for minutes, and as two tuples each they made most of what the
young collections walked (an 8-10 ms hold of the loop every few tens of seconds in a soak; BENCHMARKS.md, issue
12). It refers to nothing but a float, an int and a str, so it can never be part of a reference cycle.
"""

from __future__ import annotations

from collections import deque
from operator import attrgetter

import msgspec


class Remembered(msgspec.Struct, gc=False, array_like=True):
    """An id as remembered; encoded as a snapshot's `(dedup id, expires, message id)` (core/snapshot.py)."""

    dedup_id: str
    expires: float
    message_id: int


_EXPIRES = attrgetter("expires")


class DedupWindow:
    """Remembers recent dedup ids so a repeated publish is confirmed but not stored twice. `lookup` never
    returns an id past its window, even one not yet swept from `order`."""

    __slots__ = ("table", "order", "timer_at")

    def __init__(self) -> None:
        self.table: dict[str, Remembered] = {}
        self.order: deque[Remembered] = deque()
        self.timer_at: float | None = None  # when the broker's sweep timer for this window fires

    def lookup(self, dedup_id: str, now: float) -> int | None:
        """The id of the message published with `dedup_id` within the window, or None. Changes nothing."""
        found = self.table.get(dedup_id)
        return found.message_id if found is not None and found.expires > now else None

    def remember(self, dedup_id: str, message_id: int, expires: float) -> None:
        item = Remembered(dedup_id, expires, message_id)
        self.table[dedup_id] = item
        self.order.append(item)

    def forget(self, dedup_id: str, message_id: int) -> None:
        """Forget `dedup_id` if it still stands for `message_id` (a publish that failed to become durable)."""
        found = self.table.get(dedup_id)
        if found is not None and found.message_id == message_id:
            del self.table[dedup_id]

    def expire(self, now: float) -> None:
        order, table = self.order, self.table
        while order and order[0].expires <= now:
            item = order.popleft()
            if table.get(item.dedup_id) is item:  # not forgotten, nor remembered again since
                del table[item.dedup_id]

    def clear(self) -> None:
        """Forget every id (the queue or topic is deleted): its sweep timer, which may fire minutes later, then
        holds an empty window, not the ids of something gone."""
        self.table = {}
        self.order = deque()

    def next_expiry(self) -> float | None:
        """When the oldest remembered id expires (None: nothing is remembered)."""
        return self.order[0].expires if self.order else None

    def items(self) -> list[Remembered]:
        """What the window remembers, soonest expiry first (so a restored window expires in order). Each item
        encodes as the snapshot's (dedup id, expires, message id): no tuple is built per id, which for a window
        of 42,000 ids took 5-15 ms of a checkpoint made on the loop (1-1.4 ms now)."""
        return sorted(self.table.values(), key=_EXPIRES)
