"""One heap of deadlines for the whole broker: lease ends, delays, expiries, retention trims, dedup sweeps.

Idle queues cost nothing per tick: nothing polls; the async layer sleeps until `next_deadline()`.
Entries are never removed from the middle: a timer whose subject changed (a lease extended, a message acked) is
recognised as stale when it fires and ignored.

Stale timers must not pile up: a message acked long before its expiry, or a lease batch acked at once, leaves a
timer behind that would otherwise live until its deadline (days, for an SQS queue's 4-day retention). So the
heap is compacted: whenever its load has grown past twice its load after the last compaction (plus `SLACK`), its
items are moved, a bounded amount of work per call (`STEP`), into a new heap, and the stale ones (judged by the owner's
`live` predicate) are dropped. Work is counted by each item's `weight`, the lookups `live` may make for it: a
stale lease timer names up to thousands of receipts, each looked up, and a budget counted in items let one call
hold the loop 13-30 ms in a soak (BENCHMARKS.md, issue 12). A call moves at least `MIN_ITEMS` items, so a
compaction of M items ends within M / `MIN_ITEMS` adds however heavy they are. Until the move is over the old
heap's remaining items stay a valid heap (items are only ever taken from its end, or its top), so
`next_deadline` and `pop_due` look at both. No call does more than `STEP` units of moving work (or `MIN_ITEMS`
items), so a compaction never stalls the event loop, and the heap's load stays within about twice the live
timers' plus `SLACK` (four times plus twice `SLACK` if every item is heavy), whatever the traffic that passed
through.

The load is what the items hold, counted by the owner's `size` (default 1 an item): a dispatcher's pass leases
from hundreds of queues under one timer, whose subject is a (queue id, receipts) pair per queue, so one item may
hold a thousand pairs. Counted in items, a heap of such timers stayed under `SLACK` items while holding millions
of pairs of acked messages until their leases ran out (8 MB a round of `chute bench --workload queues` with
300 s leases: BENCHMARKS.md, issue 12); counted in what they hold, it is compacted like any other.

That bound follows the heap's load at its last compaction, so it does not shrink by itself when most timers go
stale at once and nothing new comes: a burst of messages with a 4-day expiry, all consumed, or a large queue
deleted or purged, would keep every stale timer (and the entry it names) until its deadline. So the broker's
housekeeping also asks `mostly_stale()` (a sample of the items judged by `live`) at each checkpoint, starts a
compaction with `compact()` when half or more look stale, and drives it to the end with `step()`, a bounded
amount of work per turn of the loop, even when no timer is added or due.

Invariants:
- `pop_due(now)` yields timers in deadline order, ties in insertion order;
- a timer item is a `Timer` struct the cyclic garbage collector never tracks (`gc=False`). A broker holds one
  for about every message in flight, delayed or with an expiry, tens of thousands living for seconds to days: as
  tuples naming their queue they were tracked, so every young collection walked the new ones, every middle one
  the survivors, and every full one all of them (5-10, ~25 and ~40 ms holds of the loop, or of whichever thread
  allocated at the wrong moment, in a 7,000 msg/s soak). Untracked, they cost the collector nothing. So an item
  must never be part of a reference cycle: its owner is a queue's or topic's id (looked up when the timer fires,
  so a deleted queue is not kept alive by its stale timers either), a dedup window (which refers to nothing but
  its ids), or None; its subject an Entry (itself untracked), receipts, or a lease batch's (queue id, receipts)
  pairs.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from itertools import count

import msgspec

LEASE, DELAY, EXPIRE, RETAIN, DEDUP = range(5)

SLACK = 4096  # stale timers tolerated before compaction starts: small enough to be noise in memory
STEP = 256  # units of work (items, or receipts looked up) per call while compacting: ~0.05 ms
MIN_ITEMS = 4  # items moved per call however heavy: 4 stale leases of 1,000 receipts are ~0.5 ms
SAMPLE_BUDGET = 16_384  # lookups `mostly_stale` may make (~2 ms); 256 stale leases of 1,000 receipts: 25-60 ms

_SAMPLER = random.Random()  # draws the items `mostly_stale` looks at


class Timer(msgspec.Struct, gc=False, order=True):
    """One timer: ordered by (when, seq), seq being unique (so owner and subject are never compared)."""

    when: float
    seq: int
    kind: int
    owner: object  # a queue's or topic's id, a dedup window, or None (see the module's invariants)
    subject: object


Live = Callable[[float, int, object, object], bool]
Weight = Callable[[int, object, object], int]
Size = Callable[[int, object, object], int]


def _one(kind: int, owner: object, subject: object) -> int:
    return 1


class Timers:
    """A heap of Timer(when, seq, kind, owner, subject). `live(when, kind, owner, subject)` tells whether a timer
    can still do anything; it is asked only while compacting. `weight(kind, owner, subject)` (default 1) is what
    asking costs, in units of `STEP`; `size(kind, owner, subject)` (default 1, and O(1)) what the item holds, in
    units of `SLACK`."""

    __slots__ = ("heap", "_old", "_seq", "_live", "_weight", "_size", "_compact_at", "load")

    def __init__(self, live: Live | None = None, weight: Weight | None = None, size: Size | None = None) -> None:
        self.heap: list[Timer] = []
        self._old: list[Timer] = []  # the heap being compacted away (a valid heap; emptied from its end)
        self._seq = count()
        self._live = live
        self._weight = weight or _one
        self._size = size or _one
        self._compact_at = SLACK
        self.load = 0  # the sizes of the items in both heaps, summed

    def add(self, when: float, kind: int, owner: object, subject: object) -> None:
        heapq.heappush(self.heap, Timer(when, next(self._seq), kind, owner, subject))
        self.load += self._size(kind, owner, subject)
        if self._old:
            self._move(STEP)
        elif self.load > self._compact_at and self._live is not None:
            self._old, self.heap = self.heap, []
            self._move(STEP)

    def _move(self, budget: int) -> None:
        """Move items from the old heap's end to the new heap, dropping stale ones, until `budget` units of work
        are spent (and at least `MIN_ITEMS` items)."""
        old, heap, live, weight = self._old, self.heap, self._live, self._weight
        push, pop = heapq.heappush, old.pop
        moved = dropped = 0
        while old and (budget > 0 or moved < MIN_ITEMS):
            item = pop()
            moved += 1
            budget -= weight(item.kind, item.owner, item.subject)
            if live(item.when, item.kind, item.owner, item.subject):
                push(heap, item)
            else:
                dropped += self._size(item.kind, item.owner, item.subject)
        self.load -= dropped
        if not old:
            self._compact_at = 2 * self.load + SLACK

    @property
    def compacting(self) -> bool:
        return bool(self._old)

    def mostly_stale(self, sample: int = 256, budget: int = SAMPLE_BUDGET) -> bool:
        """Do half or more of the items look stale? Judged by `live` on up to `sample` items drawn at random (with
        replacement), fewer if their weights spend `budget` first (at least one); False for a heap whose load is
        within `SLACK`, without a `live` predicate, or being compacted."""
        heap, live, weight, rng = self.heap, self._live, self._weight, _SAMPLER
        if self.load <= SLACK or live is None or self._old:
            return False
        judged = stale = 0
        while judged < sample and (budget > 0 or not judged):
            item = heap[rng.randrange(len(heap))]
            budget -= weight(item.kind, item.owner, item.subject)
            judged += 1
            if not live(item.when, item.kind, item.owner, item.subject):
                stale += 1
        return 2 * stale >= judged

    def compact(self) -> None:
        """Start a compaction now (unless one is under way): `step`, `add` and `pop_due` move the items on."""
        if not self._old and self.heap and self._live is not None:
            self._old, self.heap = self.heap, []

    def step(self, budget: int = STEP) -> bool:
        """Move `budget` units of work of the compaction under way; True while some are left to move."""
        if self._old:
            self._move(budget)
        return bool(self._old)

    def next_deadline(self) -> float | None:
        heap, old = self.heap, self._old
        if old and (not heap or old[0] < heap[0]):
            return old[0].when
        return heap[0].when if heap else None

    def pop_due(self, now: float):
        """Yield (when, kind, owner, subject) of every timer due at `now`, earliest first."""
        while True:
            heap, old = self.heap, self._old  # read again each time: a fired timer may add timers
            if old and old[0].when <= now and (not heap or old[0] < heap[0]):
                item = heapq.heappop(old)
            elif heap and heap[0].when <= now:
                item = heapq.heappop(heap)
            else:
                break
            self.load -= self._size(item.kind, item.owner, item.subject)
            yield item.when, item.kind, item.owner, item.subject
        if self._old:
            self._move(STEP)

    def __len__(self) -> int:
        return len(self.heap) + len(self._old)
