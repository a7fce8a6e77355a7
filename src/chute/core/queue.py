"""One queue's in-memory index: which messages are ready, delayed, waiting in a FIFO group, or in flight.

A queue holds `Entry` objects, small references to stored messages (the body stays in the store). An entry is in
exactly one state:

    DELAYED ──due──► READY ──lease──► IN_FLIGHT ──ack / dead-letter / drop──► GONE
       ▲               ▲  ▲                │
       │               │  └──nack/expiry───┘
     publish ──────────┘
                WAITING (FIFO group: behind the group's head) ──head leaves──► READY

Invariants:
- ready order: highest priority first; within a priority, ascending message id (= publish order). New messages
  arrive in id order and go to the tail of a deque (O(1)); returned ones (nack, lease expiry, delay ended) go to
  a small heap merged with the deque by id, so they keep their place in line.
- removal from the middle (expiry, purge) is lazy: the entry is marked GONE and skipped when popped. Lazy
  entries never pile up: GONE entries at the front of a line are dropped at once (expiry and drop-oldest take
  the oldest), and when the lines hold more than twice the ready entries plus `LINE_SLACK`, they are rebuilt
  (amortised O(1) per removal). So the index grows with what is stored, never with what passed through.
- FIFO groups: at most one entry of a group is READY or IN_FLIGHT (the group's head); the others wait in the
  group's deque in id order and the next one becomes ready only when the head leaves the queue.
- the counters (`ready`, `waiting`, `delayed`, `in_flight`, `bytes`) always equal what the structures hold.
- lapsed receipts: an entry whose lease ended (timeout, nack, consumer gone) keeps its last receipt, and
  `lapsed` maps that receipt to it until it is leased again or leaves the queue. So the latest receipt of a
  message back in line still names it (SQS deletes it with that receipt handle), while an older one names
  nothing. `lapsed` holds at most one item per stored entry, never more than the queue holds.
- no I/O, no clock: callers pass `now` and decide what to log.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterator

import msgspec

from chute.core.dedup import DedupWindow
from chute.core.ids import publish_time
from chute.core.ratelimit import TokenBucket
from chute.model import QueueSettings

READY, WAITING, DELAYED, IN_FLIGHT, GONE = range(5)

LINE_SLACK = 1024  # lazily removed entries tolerated in a queue's ready lines before they are rebuilt


class Entry(msgspec.Struct, gc=False, eq=False):
    """A message's place in one queue. `ref` locates the stored record; `dead` is (reason, source queue id).

    A msgspec Struct with `gc=False`: a backlog holds millions of these, and untracked by the cyclic garbage
    collector they cost no GC passes and 16 bytes less each (they never form reference cycles: their fields are
    ints, floats, strings and tuples of ints). `eq=False`: compared and hashed by identity, so sets work."""

    id: int
    ref: int
    size: int
    priority: int = 0
    group: str | None = None
    expires: float = 0.0  # seconds since the epoch; 0.0 = never
    deliveries: int = 0
    dead: tuple[int, int] | None = None
    deadline: float = 0.0  # lease end while IN_FLIGHT; ready time while DELAYED or being published
    state: int = GONE
    receipt: int = 0
    first_delivered: float = 0.0  # when it was first leased in this run (0.0: not yet); memory only

    @property
    def publish_time(self) -> float:
        return publish_time(self.id)


def _by_id(entry: Entry) -> int:
    return entry.id


class _Level:
    """Ready entries of one priority: `fresh` in id order, `returned` a heap of (id, identity, entry)."""

    __slots__ = ("fresh", "returned")

    def __init__(self) -> None:
        self.fresh: deque[Entry] = deque()
        self.returned: list[tuple[int, int, Entry]] = []  # (id, identity tie-break, entry)

    def push(self, entry: Entry) -> None:
        fresh = self.fresh
        if not fresh or fresh[-1].id < entry.id:
            fresh.append(entry)
        else:
            heapq.heappush(self.returned, (entry.id, id(entry), entry))

    def head(self) -> Entry | None:
        """The next READY entry (smallest id), dropping GONE ones met on the way; None if empty."""
        fresh, returned = self.fresh, self.returned
        while fresh and fresh[0].state != READY:
            fresh.popleft()
        while returned and returned[0][2].state != READY:
            heapq.heappop(returned)
        if returned and (not fresh or returned[0][0] < fresh[0].id):
            return returned[0][2]
        return fresh[0] if fresh else None

    def pop(self) -> Entry | None:
        entry = self.head()
        if entry is None:
            return None
        if self.returned and self.returned[0][2] is entry:
            heapq.heappop(self.returned)
        else:
            self.fresh.popleft()
        return entry

    def __len__(self) -> int:
        return len(self.fresh) + len(self.returned)

    def tidy_front(self) -> None:
        """Drop entries that are no longer READY from the front of both lines."""
        fresh, returned = self.fresh, self.returned
        while fresh and fresh[0].state != READY:
            fresh.popleft()
        while returned and returned[0][2].state != READY:
            heapq.heappop(returned)

    def rebuild(self) -> None:
        """Keep only the READY entries (order kept)."""
        self.fresh = deque(e for e in self.fresh if e.state == READY)
        self.returned = [item for item in self.returned if item[2].state == READY]
        heapq.heapify(self.returned)

    def entries(self) -> Iterator[Entry]:
        for entry in self.fresh:
            if entry.state == READY:
                yield entry
        for _, _, entry in self.returned:
            if entry.state == READY:
                yield entry


class Queue:
    """A queue's index and counters. `id` is the durable number used in log records."""

    def __init__(self, id: int, name: str, settings: QueueSettings, *, ephemeral: bool = False) -> None:
        self.id = id
        self.name = name
        self.ephemeral = ephemeral
        self.settings = settings
        self.levels: dict[int, _Level] = {}
        self.priorities: list[int] = []  # priorities with a level, highest first
        self.in_flight: dict[int, Entry] = {}  # receipt -> entry
        self.lapsed: dict[int, Entry] = {}  # last receipt -> entry, for entries whose lease ended (see header)
        self.delayed: set[Entry] = set()
        self.delayed_heads: set[Entry] = set()  # FIFO: group heads nacked with a delay
        self.groups: dict[str, deque[Entry]] = {}  # FIFO: waiting entries of groups whose head is out
        self.ready = 0
        self.waiting = 0
        self.bytes = 0
        self.pending = 0  # published, not yet durable: counted against max_length
        self.pending_bytes = 0
        self.dedup = DedupWindow()
        self.bucket: TokenBucket | None = None
        self.counters = {"published": 0, "delivered": 0, "acked": 0, "nacked": 0, "redelivered": 0, "dead": 0}
        self.apply_settings(settings)

    def apply_settings(self, settings: QueueSettings) -> None:
        """Take new settings; the rate limiter restarts full when its rate changes."""
        old = self.settings
        self.settings = settings
        if settings.rate_limit is None:
            self.bucket = None
        elif self.bucket is None or (old.rate_limit, old.rate_burst) != (
            settings.rate_limit,
            settings.rate_burst,
        ):
            self.bucket = TokenBucket(settings.rate_limit, settings.rate_burst)

    # -- sizes ------------------------------------------------------------------------------------------------

    @property
    def length(self) -> int:
        return self.ready + self.waiting + len(self.delayed) + len(self.in_flight)

    def has_room(self, count: int, size: int) -> bool:
        """True if `count` more messages of `size` bytes in all fit under max_length and max_bytes."""
        s = self.settings
        if s.max_length is not None and self.length + self.pending + count > s.max_length:
            return False
        return s.max_bytes is None or self.bytes + self.pending_bytes + size <= s.max_bytes

    # -- placing entries --------------------------------------------------------------------------------------

    def add(self, entry: Entry, ready_at: float, now: float) -> bool:
        """Place a new entry; return True if it is DELAYED until `ready_at` (the caller sets a timer)."""
        self.bytes += entry.size
        if ready_at > now:
            entry.state = DELAYED
            entry.deadline = ready_at
            self.delayed.add(entry)
            return True
        self._enqueue(entry)
        return False

    def add_batch(self, entries: list[Entry], now: float) -> bool:
        """Place new entries (each ready at `entry.deadline`, 0 = now); return True if any became ready."""
        if self._add_plain(entries):
            return True
        became_ready = False
        fifo = self.settings.fifo
        for entry in entries:
            self.bytes += entry.size
            ready_at = entry.deadline
            if ready_at > now:
                entry.state = DELAYED
                self.delayed.add(entry)
                continue
            entry.deadline = 0.0
            became_ready = True
            if fifo and entry.group is not None:
                self._enqueue(entry)
                continue
            level = self.levels.get(entry.priority)
            if level is None:
                self._make_ready(entry)
                continue
            entry.state = READY
            level.push(entry)
            self.ready += 1
        return became_ready

    def _add_plain(self, entries: list[Entry]) -> bool:
        """The common batch, placed in one go: every entry ready now, of priority 0, with no group, newer than the
        tail of the priority-0 line (a publish's entries, in id order). False (nothing done) for any other."""
        level = self.levels.get(0)
        if level is None or not entries:
            return False
        fresh = level.fresh
        last = fresh[-1].id if fresh else -1
        size = 0
        for entry in entries:
            if entry.deadline or entry.priority or entry.group is not None or entry.id <= last:
                return False
            last = entry.id
            size += entry.size
        for entry in entries:
            entry.state = READY
        fresh.extend(entries)
        self.ready += len(entries)
        self.bytes += size
        return True

    def undelay(self, entry: Entry) -> None:
        """A delay ended: the entry joins the ready line (or its group's)."""
        if entry.state == DELAYED:
            self.delayed.discard(entry)
            if entry in self.delayed_heads:
                self.delayed_heads.discard(entry)
                self._make_ready(entry)
            else:
                self._enqueue(entry)

    def _enqueue(self, entry: Entry) -> None:
        group = entry.group
        if group is not None and self.settings.fifo:
            waiting = self.groups.get(group)
            if waiting is not None:
                entry.state = WAITING
                waiting.append(entry)
                self.waiting += 1
                return
            self.groups[group] = deque()
        self._make_ready(entry)

    def _make_ready(self, entry: Entry) -> None:
        entry.state = READY
        level = self.levels.get(entry.priority)
        if level is None:
            level = self.levels[entry.priority] = _Level()
            self.priorities = sorted(self.levels, reverse=True)
        level.push(entry)
        self.ready += 1

    def pop_many(self, count: int, max_bytes: int | None = None, *, first_may_exceed: bool = True) -> list[Entry]:
        """Take up to `count` ready entries in delivery order (highest priority, then oldest); the caller leases
        or removes them. With `max_bytes`, stop before the bodies would add up to more (but take the first entry
        whatever its size if `first_may_exceed`): a batch that has to fit a frame."""
        taken: list[Entry] = []
        room = max_bytes  # body bytes still allowed; below 0 only after a first entry larger than the budget
        for priority in self.priorities:
            level = self.levels[priority]
            fresh = level.fresh
            while len(taken) < count:
                if level.returned:
                    entry = level.head()
                    if entry is None:
                        break
                else:
                    while fresh and fresh[0].state != READY:
                        fresh.popleft()
                    if not fresh:
                        break
                    entry = fresh[0]  # no returned entries: the fresh deque alone is in order
                if room is not None:
                    if entry.size > room and (taken or not first_may_exceed):
                        count = len(taken)  # full: ends the outer loop too
                        break
                    room -= entry.size
                if level.returned:
                    level.pop()
                else:
                    fresh.popleft()
                taken.append(entry)
            if len(taken) >= count:
                break
        self.ready -= len(taken)
        return taken

    def oldest_ready(self) -> Entry | None:
        """The ready entry with the smallest id, without taking it."""
        best = None
        for level in self.levels.values():
            entry = level.head()
            if entry is not None and (best is None or entry.id < best.id):
                best = entry
        return best

    def ready_by_age(self) -> Iterator[Entry]:
        """Ready entries, oldest (smallest id) first, lazily and without changing anything: drop-oldest's
        candidates. Take what is needed before changing the queue."""
        lines = []
        for level in self.levels.values():
            lines.append(e for e in level.fresh if e.state == READY)
            if level.returned:
                lines.append(item[2] for item in sorted(level.returned) if item[2].state == READY)
        return heapq.merge(*lines, key=_by_id)

    def overflow(self, sizes: list[int]) -> tuple[list[Entry], list[int]]:
        """drop-oldest, for new messages of `sizes` (oldest first): the ready entries to drop (oldest first) and
        the positions in `sizes` of the new messages to drop (any larger than max_bytes by itself, then the
        oldest) so that the rest fits under max_length and max_bytes. Changes nothing. Publishes still being made
        durable (`pending`) are not counted: they are older than these, so they are trimmed when they are placed
        (`overflow([])` then names what is over the limits)."""
        s = self.settings
        max_length = s.max_length if s.max_length is not None else float("inf")
        max_bytes = s.max_bytes if s.max_bytes is not None else float("inf")
        length, used = self.length, self.bytes
        dropped = [i for i, size in enumerate(sizes) if size > max_bytes]
        kept = [i for i, size in enumerate(sizes) if size <= max_bytes]
        count, total = len(kept), sum(sizes[i] for i in kept)
        victims: list[Entry] = []
        if length + count > max_length or used + total > max_bytes:
            for entry in self.ready_by_age():
                victims.append(entry)
                length, used = length - 1, used - entry.size
                if length + count <= max_length and used + total <= max_bytes:
                    break
        for i in kept:
            if length + count <= max_length and used + total <= max_bytes:
                break
            dropped.append(i)
            count, total = count - 1, total - sizes[i]
        return victims, sorted(dropped)

    def lease(self, entry: Entry, receipt: int) -> None:
        if entry.receipt:
            self.lapsed.pop(entry.receipt, None)
        entry.state = IN_FLIGHT
        entry.receipt = receipt
        entry.deliveries += 1
        self.in_flight[receipt] = entry

    def requeue(self, entry: Entry) -> None:
        """An in-flight entry comes back (nack, lease end): it keeps its place in line and its group's head, and
        its receipt (now a lapsed one)."""
        del self.in_flight[entry.receipt]
        self.lapsed[entry.receipt] = entry
        self._make_ready(entry)

    def delay(self, entry: Entry, until: float) -> None:
        """An in-flight entry comes back at `until` (nack with a delay); `undelay` puts it back in line."""
        del self.in_flight[entry.receipt]
        self.lapsed[entry.receipt] = entry
        entry.deadline = until
        entry.state = DELAYED
        self.delayed.add(entry)
        if entry.group is not None and self.settings.fifo:
            self.delayed_heads.add(entry)  # still its group's head: comes back first, not behind the group

    def remove(self, entry: Entry) -> None:
        """Take an entry out of the queue for good (ack, dead-letter, drop); promote its group's next one."""
        state = entry.state
        if state == GONE:
            return
        if state == IN_FLIGHT:
            del self.in_flight[entry.receipt]
        elif entry.receipt:
            self.lapsed.pop(entry.receipt, None)
        if state == READY:
            self.ready -= 1  # stays in its level until popped (lazy)
        elif state == DELAYED:
            self.delayed.discard(entry)
            if entry in self.delayed_heads:
                self.delayed_heads.discard(entry)
                state = IN_FLIGHT  # it was its group's head: the group moves on below
        elif state == WAITING:
            self.waiting -= 1
            self.groups[entry.group].remove(entry)
            entry.state = GONE
            self.bytes -= entry.size
            return
        entry.state = GONE
        self.bytes -= entry.size
        if state == READY:
            self._tidy(entry.priority)
        if entry.group is not None and self.settings.fifo and state != DELAYED:
            self._promote(entry.group)

    def _tidy(self, priority: int) -> None:
        """After a READY entry was removed lazily: drop dead entries at the front of its line, and rebuild the
        lines if dead entries make up most of them."""
        level = self.levels.get(priority)
        if level is None:
            return
        level.tidy_front()
        if len(level) > 2 * self.ready + LINE_SLACK:  # one line's size: a cheap lower bound of all lines'
            for each in self.levels.values():
                each.rebuild()

    def _promote(self, group: str) -> None:
        waiting = self.groups.get(group)
        if waiting is None:
            return
        if waiting:
            self.waiting -= 1
            self._make_ready(waiting.popleft())
        else:
            del self.groups[group]

    # -- browsing ---------------------------------------------------------------------------------------------

    def entries(self) -> Iterator[Entry]:
        """Every live entry: ready (in delivery order per priority), waiting, delayed, in flight. Lazy: taking the
        first few (a peek) costs a few steps, not a sort of the whole backlog."""
        for priority in self.priorities:
            level = self.levels[priority]
            fresh = (e for e in level.fresh if e.state == READY)  # already in id order
            returned = [item[2] for item in sorted(level.returned) if item[2].state == READY]
            yield from heapq.merge(fresh, returned, key=_by_id)
        for waiting in self.groups.values():
            yield from waiting
        yield from sorted(self.delayed, key=lambda e: e.id)
        yield from self.in_flight.values()

    def backlog(self) -> Iterator[Entry]:
        """Every live entry not in flight (ready, waiting, delayed), lazily and in no particular order; the oldest
        ready ones come first. For taking a purge in steps (nothing may change while it is iterated)."""
        for level in self.levels.values():
            for entry in level.fresh:
                if entry.state == READY:
                    yield entry
            for item in level.returned:
                if item[2].state == READY:
                    yield item[2]
        for waiting in self.groups.values():
            yield from waiting
        yield from self.delayed

    def detach(self) -> list[list[Entry]]:
        """Empty the queue at once, without touching its entries; return them (as `entry_lists`) for the caller
        to release in steps. Only for a queue that is being deleted: its entries are never looked at again by
        the queue (its timers find it unregistered)."""
        lists = self.entry_lists()
        self.levels = {}
        self.priorities = []
        self.in_flight = {}
        self.lapsed = {}
        self.delayed = set()
        self.delayed_heads = set()
        self.groups = {}
        self.ready = self.waiting = self.bytes = 0
        return lists

    def clear(self, *, in_flight: bool = False) -> list[Entry]:
        """Remove every entry that is not in flight (purge), or every entry with `in_flight`; return them."""
        removed = [e for e in self.entries() if in_flight or e.state != IN_FLIGHT]
        for entry in removed:
            entry.state = GONE
            self.bytes -= entry.size
        self.levels.clear()
        self.priorities = []
        self.delayed.clear()
        self.delayed_heads.clear()
        self.lapsed.clear()  # lapsed entries are never in flight: all of them went
        self.ready = self.waiting = 0
        if in_flight:
            self.in_flight.clear()
        heads = {e.group for e in self.in_flight.values() if e.group is not None}
        self.groups = {g: deque() for g in heads} if self.settings.fifo else {}
        return removed

    def entry_lists(self) -> list[list[Entry]]:
        """Every structure that holds entries, each copied as a plain list at C speed (so ~1 ms per 100,000
        entries): for walks done in slices between which the queue changes (compaction's scan). No order; may
        include entries already GONE (lazily removed), and an entry may appear twice (a stale heap item)."""
        lists = []
        for level in self.levels.values():
            lists.append(list(level.fresh))
            if level.returned:
                lists.append([item[2] for item in level.returned])
        lists.extend(list(waiting) for waiting in self.groups.values() if waiting)
        lists.append(list(self.delayed))
        lists.append(list(self.in_flight.values()))
        return lists

    def newest_ref(self) -> int:
        """The ref of the newest ready entry of any priority (0 if none): cheap, a bound for compaction's probe."""
        return max((level.fresh[-1].ref for level in self.levels.values() if level.fresh), default=0)
