"""One queue's in-memory index: which messages are ready, delayed, waiting in a FIFO group, or in flight.

A queue holds references to stored messages (the body stays in the store): `Entry` objects, except for the
backlog at rest of *plain* messages, which is packed in columns (see below). An entry is in exactly one state:

    DELAYED ──due──► READY ──lease──► IN_FLIGHT ──ack / dead-letter / drop──► GONE
       ▲               ▲  ▲                │
       │               │  └──nack/expiry───┘
     publish ──────────┘
                WAITING (FIFO group: behind the group's head) ──head leaves──► READY

Packed messages: a READY message is plain when it holds nothing but its id, ref and size (never leased, no
group, no expiry, no dead-letter reason; its priority is its line's). Plain ones newer than the tail of their
priority's packed line are kept there as three columns (`array` of ids, refs, sizes: 20 bytes a message, no
object); an Entry is made only when one leaves the line (`pop_many`) or must change in a way a slot cannot hold
(`unpack`: a delivery count replayed). Everything else (returned, grouped, delayed, expiring, dead-lettered, in
flight) stays an Entry as before. Anything that shows packed messages (`entries`, `backlog`, `ready_by_age`,
`oldest_ready`, `find_packed`) makes *views*: new Entry objects in state PACKED, changed by nothing. A view names
its message for `remove` (found by id in the line: O(log n)) for the synchronous walks that pick and then remove
(purge steps, drop-oldest); once the message left the line, removing a view of it does nothing. An Entry given to
`add`/`add_batch`/`_make_ready` that gets packed becomes such a view (its state is PACKED).

Invariants:
- ready order: highest priority first; within a priority, ascending message id (= publish order). New messages
  arrive in id order and go to the tail of their line (packed if plain, else a deque; O(1)); returned ones (nack,
  lease expiry, delay ended, or any older than their line's tail) go to a small heap; the three lines of a
  priority are merged by id, so every message keeps its place in line.
- removal from the middle (expiry, purge) is lazy: an entry is marked GONE (a packed slot: size -1) and skipped
  when popped. Lazy entries never pile up: removed entries at the front of a line are dropped at once (expiry and
  drop-oldest take the oldest), and when the lines hold more than twice the ready entries plus `LINE_SLACK`, they
  are rebuilt (amortised O(1) per removal). A packed line cuts its consumed head once it passes half the arrays,
  and frees its arrays when emptied. So the index grows with what is stored, never with what passed through.
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
from array import array
from bisect import bisect_left
from collections import deque
from collections.abc import Iterator
from itertools import repeat
from typing import TYPE_CHECKING

import msgspec

from chute.core.dedup import DedupWindow
from chute.core.ids import publish_time
from chute.core.ratelimit import TokenBucket
from chute.model import QueueSettings

if TYPE_CHECKING:
    from chute.core.topic import Subscription

READY, WAITING, DELAYED, IN_FLIGHT, GONE, PACKED = range(6)
# PACKED: the state of a *view*, an Entry made to show (or name, for `Queue.remove`) a message that lives in a
# packed line as columns; changing a view changes nothing else

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


_PACKED_SIZE_LIMIT = 2**31  # sizes are packed as 32-bit ints; a larger message stays an Entry


def _is_plain(entry: Entry) -> bool:
    """True if a ready entry holds nothing but id, ref and size (and its level's priority): it can be packed."""
    return (
        entry.group is None
        and not entry.expires
        and not entry.deliveries
        and entry.dead is None
        and not entry.receipt
        and entry.size < _PACKED_SIZE_LIMIT
    )


STAGE = 4096  # plain entries a packed line keeps as objects at its tail before packing them in one go


_MINUS_ONE = array("i", [-1]).tobytes()


def _removed(sizes: array) -> list[int]:
    """Positions of the removed slots (-1) of a sizes column, found at C speed (a byte search): a window of -1's
    bytes not on a slot boundary is skipped (sizes are otherwise below 2**31, so it spans a -1 and its neighbour)."""
    data, width, gone = sizes.tobytes(), sizes.itemsize, []
    at = data.find(_MINUS_ONE)
    while at >= 0:
        if at % width:
            at = data.find(_MINUS_ONE, at + 1)
        else:
            gone.append(at // width)
            at = data.find(_MINUS_ONE, at + width)
    return gone


class _Packed:
    """The plain ready messages of one priority, in id order, as columns: `ids`, `refs` (64-bit), `sizes` (32-bit;
    -1 marks a slot removed lazily), 20 bytes a message and no object. `head` is the first slot not yet taken;
    the consumed prefix is cut off once it passes half the arrays (amortised O(1) per message), and the arrays are
    emptied (their memory freed) when the last slot is taken.

    New entries are first `staged` (kept as the Entry objects they are, after the columns, from `shead` on) and
    packed `STAGE` at a time, so a line that is consumed as fast as it fills (the usual case) never converts its
    messages at all; `flush` packs them at once for anything but taking from the front."""

    __slots__ = ("ids", "refs", "sizes", "head", "staged", "shead")

    def __init__(self) -> None:
        self.ids = array("q")
        self.refs = array("q")
        self.sizes = array("i")
        self.head = 0
        self.staged: list[Entry] = []
        self.shead = 0

    def __len__(self) -> int:
        return len(self.ids) - self.head + len(self.staged) - self.shead

    def accepts(self, message_id: int) -> bool:
        """True if `message_id` can go at the tail (newer than every slot, or the line is empty)."""
        if self.shead < len(self.staged):
            return self.staged[-1].id < message_id
        return self.head == len(self.ids) or self.ids[-1] < message_id

    def stage(self, entries: list[Entry]) -> None:
        """Add plain entries (ids ascending, newer than the tail) at the tail; they become views (PACKED)."""
        for entry in entries:
            entry.state = PACKED
        self.staged.extend(entries)
        if len(self.staged) - self.shead > STAGE:
            self.flush()

    def flush(self) -> None:
        """Pack the staged entries into the columns."""
        staged = self.staged
        if self.shead < len(staged):
            if self.head and self.head == len(self.ids):
                self._reset()
            rest = staged[self.shead :]
            self.ids.fromlist([e.id for e in rest])
            self.refs.fromlist([e.ref for e in rest])
            self.sizes.fromlist([e.size for e in rest])
        if staged:
            self.staged = []
            self.shead = 0

    def take_staged(self, count: int) -> list[Entry]:
        """Take up to `count` staged entries from the front (when the columns are used up), READY."""
        start = self.shead
        taken = self.staged[start : start + count]
        for entry in taken:
            entry.state = READY
        self.shead = start + len(taken)
        if self.shead == len(self.staged):
            self.staged = []
            self.shead = 0
        elif self.shead > STAGE:
            del self.staged[: self.shead]
            self.shead = 0
        return taken

    def tidy(self) -> None:
        """Skip removed slots at the head; cut the consumed prefix when it is long."""
        sizes, head, n = self.sizes, self.head, len(self.ids)
        while head < n and sizes[head] < 0:
            head += 1
        self.head = head
        if head == n:
            if n:
                self._reset()
        elif head > 4096 and head * 2 > n:
            del self.ids[:head], self.refs[:head], self.sizes[:head]
            self.head = 0

    def _reset(self) -> None:
        self.ids = array("q")
        self.refs = array("q")
        self.sizes = array("i")
        self.head = 0

    def find(self, message_id: int) -> int:
        """The index of the live slot of `message_id`, or -1."""
        self.flush()
        ids = self.ids
        i = bisect_left(ids, message_id, self.head)
        if i < len(ids) and ids[i] == message_id and self.sizes[i] >= 0:
            return i
        return -1

    def rebuild(self) -> None:
        """Keep only the live slots (order kept)."""
        self.flush()
        h = self.head
        live = [i for i, size in enumerate(self.sizes[h:], h) if size >= 0]
        ids, refs, sizes = self.ids, self.refs, self.sizes
        self.ids = array("q", [ids[i] for i in live])
        self.refs = array("q", [refs[i] for i in live])
        self.sizes = array("i", [sizes[i] for i in live])
        self.head = 0

    def live(self) -> tuple[array, array, array]:
        """Copies of the live slots' columns (C-speed when nothing was removed lazily)."""
        self.flush()
        h = self.head
        ids, refs, sizes = self.ids[h:], self.refs[h:], self.sizes[h:]
        gone = _removed(sizes)
        if gone:  # copy the runs between removed slots: no step per live message
            runs, prev = [], 0
            for at in gone + [len(sizes)]:
                if at > prev:
                    runs.append((prev, at))
                prev = at + 1
            columns = []
            for column, code in ((ids, "q"), (refs, "q"), (sizes, "i")):
                out = array(code)
                for a, b in runs:
                    out.extend(column[a:b])
                columns.append(out)
            ids, refs, sizes = columns
        return ids, refs, sizes

    def views(self, priority: int) -> Iterator[Entry]:
        """A view (a new Entry in state PACKED) of each live slot, in id order, lazily."""
        self.flush()
        ids, refs, sizes = self.ids, self.refs, self.sizes
        i = self.head
        while i < len(ids):
            size = sizes[i]
            if size >= 0:
                yield Entry(ids[i], refs[i], size, priority, None, 0.0, 0, None, 0.0, PACKED)
            i += 1


class _Level:
    """Ready entries of one priority: `packed` (plain messages, in id order, as columns), `fresh` (other entries,
    in id order) and `returned` (a heap of (id, identity, entry): entries older than their line's tail)."""

    __slots__ = ("priority", "packed", "fresh", "returned")

    def __init__(self, priority: int) -> None:
        self.priority = priority
        self.packed = _Packed()
        self.fresh: deque[Entry] = deque()
        self.returned: list[tuple[int, int, Entry]] = []  # (id, identity tie-break, entry)

    def push(self, entry: Entry) -> None:
        """Add a READY entry. A plain one newer than the packed tail is packed: the entry becomes a view."""
        if _is_plain(entry):
            packed = self.packed
            if packed.accepts(entry.id):
                packed.stage([entry])
                return
        else:
            fresh = self.fresh
            if not fresh or fresh[-1].id < entry.id:
                fresh.append(entry)
                return
        heapq.heappush(self.returned, (entry.id, id(entry), entry))

    def front(self) -> int:
        """Which line holds the next READY entry (smallest id): 1 packed, 2 fresh, 3 returned, 0 none. Drops
        removed entries met at the fronts."""
        self.tidy_front()
        packed, fresh, returned = self.packed, self.fresh, self.returned
        best, which = None, 0
        if packed.head < len(packed.ids):
            best, which = packed.ids[packed.head], 1
        elif packed.shead < len(packed.staged):  # (the staged entries come after every column slot)
            best, which = packed.staged[packed.shead].id, 1
        if fresh and (best is None or fresh[0].id < best):
            best, which = fresh[0].id, 2
        if returned and (best is None or returned[0][0] < best):
            which = 3
        return which

    def peek(self, which: int) -> Entry:
        """The front entry of line `which` (see `front`): a view for the packed line."""
        if which == 1:
            p = self.packed
            h = p.head
            if h == len(p.ids):
                return p.staged[p.shead]  # a staged entry is a view already (PACKED)
            return Entry(p.ids[h], p.refs[h], p.sizes[h], self.priority, None, 0.0, 0, None, 0.0, PACKED)
        return self.fresh[0] if which == 2 else self.returned[0][2]

    def take(self, which: int) -> Entry:
        """Remove and return the front entry of line `which`, READY (made for a packed slot)."""
        if which == 1:
            p = self.packed
            h = p.head
            if h == len(p.ids):
                return p.take_staged(1)[0]
            entry = Entry(p.ids[h], p.refs[h], p.sizes[h], self.priority, None, 0.0, 0, None, 0.0, READY)
            p.head = h + 1
            p.tidy()
            return entry
        if which == 2:
            return self.fresh.popleft()
        return heapq.heappop(self.returned)[2]

    def head(self) -> Entry | None:
        """The next READY entry (a view if packed), dropping removed ones met on the way; None if empty."""
        which = self.front()
        return self.peek(which) if which else None

    def pop(self) -> Entry | None:
        which = self.front()
        return self.take(which) if which else None

    def __len__(self) -> int:
        return len(self.packed) + len(self.fresh) + len(self.returned)

    def tidy_front(self) -> None:
        """Drop entries that are no longer READY from the front of every line."""
        fresh, returned = self.fresh, self.returned
        self.packed.tidy()
        while fresh and fresh[0].state != READY:
            fresh.popleft()
        while returned and returned[0][2].state != READY:
            heapq.heappop(returned)

    def rebuild(self) -> None:
        """Keep only the READY entries (order kept)."""
        self.packed.rebuild()
        self.fresh = deque(e for e in self.fresh if e.state == READY)
        self.returned = [item for item in self.returned if item[2].state == READY]
        heapq.heapify(self.returned)

    def objects(self) -> Iterator[Entry]:
        """The READY entries that are objects (not packed), in no particular order."""
        for entry in self.fresh:
            if entry.state == READY:
                yield entry
        for _, _, entry in self.returned:
            if entry.state == READY:
                yield entry

    def in_order(self) -> Iterator[Entry]:
        """Every READY entry in id order (views for packed ones), lazily; sorts only the (small) returned heap."""
        lines = [self.packed.views(self.priority), (e for e in self.fresh if e.state == READY)]
        if self.returned:
            lines.append(item[2] for item in sorted(self.returned) if item[2].state == READY)
        return heapq.merge(*lines, key=_by_id)


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
        self.received_at: float | None = None  # when a consumer last asked for messages (not stored: in memory)
        self.feeds: dict[tuple[str, tuple[str, str]], Subscription] = {}  # (topic name, key) -> a subscription to it
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
        """The common batch, packed in one go: every entry plain and ready now, of priority 0, newer than the tail
        of the priority-0 packed line (a publish's entries, in id order); they become views. False (nothing done)
        for any other."""
        level = self.levels.get(0)
        if level is None or not entries:
            return False
        packed = level.packed
        if packed.shead < len(packed.staged):
            last = packed.staged[-1].id
        else:
            last = packed.ids[-1] if packed.head < len(packed.ids) else -1
        size = 0
        for entry in entries:  # _is_plain, inlined: this runs for every message published
            if (
                entry.deadline or entry.priority or entry.group is not None or entry.expires or entry.deliveries
                or entry.dead is not None or entry.receipt or entry.id <= last
            ):  # fmt: skip
                return False
            last = entry.id
            size += entry.size
        if size >= _PACKED_SIZE_LIMIT:  # (one message this large: keep it an Entry)
            return False
        packed.stage(entries)
        self.ready += len(entries)
        self.bytes += size
        return True

    def load_packed(self, priority: int, ids: array, refs: array, sizes: array) -> bool:
        """Recovery's fast path: place plain ready messages given as columns (ids ascending, all newer than the
        level's packed tail). False (nothing done) if they do not fit that rule."""
        if not ids:
            return True
        level = self.levels.get(priority)
        if level is None:
            level = self.levels[priority] = _Level(priority)
            self.priorities = sorted(self.levels, reverse=True)
        packed = level.packed
        packed.flush()
        if not packed.accepts(ids[0]) or any(a >= b for a, b in zip(ids, ids[1:])) or min(sizes) < 0:
            return False
        packed.tidy()
        packed.ids.extend(ids)
        packed.refs.extend(refs)
        packed.sizes.extend(sizes)
        self.ready += len(ids)
        self.bytes += sum(sizes)
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
            level = self.levels[entry.priority] = _Level(entry.priority)
            self.priorities = sorted(self.levels, reverse=True)
        level.push(entry)
        self.ready += 1

    def pop_many(self, count: int, max_bytes: int | None = None, *, first_may_exceed: bool = True) -> list[Entry]:
        """Take up to `count` ready entries in delivery order (highest priority, then oldest); the caller leases
        or removes them (packed messages are made into entries here). With `max_bytes`, stop before the bodies
        would add up to more (but take the first entry whatever its size if `first_may_exceed`): a batch that has
        to fit a frame."""
        taken: list[Entry] = []
        room = max_bytes  # body bytes still allowed; below 0 only after a first entry larger than the budget
        for priority in self.priorities:
            level = self.levels[priority]
            if not level.fresh and not level.returned:  # the packed line alone: read its columns in a tight loop
                packed = level.packed
                ids, refs, sizes = packed.ids, packed.refs, packed.sizes
                i, n = packed.head, len(ids)
                while i < n and len(taken) < count:
                    j = min(n, i + count - len(taken))
                    if room is not None:  # cut where the bodies would exceed the budget
                        k, live = i, len(taken)
                        for size in sizes[i:j]:
                            if size >= 0:
                                if size > room and (live or not first_may_exceed):
                                    count = live  # full: ends the outer loop too
                                    break
                                room -= size
                                live += 1
                            k += 1
                        j = k
                    if -1 in sizes[i:j]:  # removed slots among them: one at a time
                        for k in range(i, j):
                            if sizes[k] >= 0:
                                taken.append(Entry(ids[k], refs[k], sizes[k], priority, None, 0.0, 0, None, 0.0, READY))
                    else:  # the rule: make the entries at C speed
                        taken.extend(map(Entry, ids[i:j], refs[i:j], sizes[i:j], repeat(priority), repeat(None),
                                         repeat(0.0), repeat(0), repeat(None), repeat(0.0), repeat(READY)))  # fmt: skip
                    if j == i:
                        break
                    i = j
                packed.head = i
                packed.tidy()
                if len(taken) < count and packed.staged and packed.head == len(packed.ids):  # then the staged ones
                    want = count - len(taken)
                    if room is not None:
                        staged, k, live = packed.staged, packed.shead, len(taken)
                        while k < len(staged) and k - packed.shead < want:
                            size = staged[k].size
                            if size > room and (live or not first_may_exceed):
                                count = live
                                break
                            room -= size
                            live += 1
                            k += 1
                        want = k - packed.shead
                    taken.extend(packed.take_staged(want))
            else:
                while len(taken) < count:
                    which = level.front()
                    if not which:
                        break
                    if room is not None:
                        size = level.peek(which).size
                        if size > room and (taken or not first_may_exceed):
                            count = len(taken)  # full: ends the outer loop too
                            break
                        room -= size
                    entry = level.take(which)
                    entry.state = READY
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
        """Ready entries (views for packed ones), oldest (smallest id) first, lazily and without changing
        anything: drop-oldest's candidates. Take what is needed before changing the queue."""
        return heapq.merge(*(level.in_order() for level in self.levels.values()), key=_by_id)

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
        if state == PACKED:
            self._remove_packed(entry)
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

    def remove_many(self, entries: list[Entry]) -> None:
        """`remove` each of `entries` (an ack's batch): in-flight entries of a queue without FIFO groups (nothing
        to promote) are taken out in one tight loop, the others one at a time by `remove`."""
        if self.settings.fifo:
            for entry in entries:
                self.remove(entry)
            return
        in_flight, freed = self.in_flight, 0
        for entry in entries:
            if entry.state == IN_FLIGHT:
                del in_flight[entry.receipt]
                entry.state = GONE
                freed += entry.size
            else:
                self.remove(entry)
        self.bytes -= freed

    def _remove_packed(self, view: Entry) -> None:
        """Remove the message a view names from its packed line (lazily: its slot is marked), if still there."""
        level = self.levels.get(view.priority)
        i = level.packed.find(view.id) if level is not None else -1
        view.state = GONE
        if i < 0:
            return
        level.packed.sizes[i] = -1
        self.ready -= 1
        self.bytes -= view.size
        self._tidy(view.priority)

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
        """Every live entry: ready (in delivery order per priority; views for packed ones), waiting, delayed, in
        flight. Lazy: taking the first few (a peek) costs a few steps, not a sort of the whole backlog."""
        for priority in self.priorities:
            yield from self.levels[priority].in_order()
        for waiting in self.groups.values():
            yield from waiting
        yield from sorted(self.delayed, key=lambda e: e.id)
        yield from self.in_flight.values()

    def objects(self) -> Iterator[Entry]:
        """Every live entry that is an object (all but the packed messages), in no particular order."""
        for level in self.levels.values():
            yield from level.objects()
        for waiting in self.groups.values():
            yield from waiting
        yield from self.delayed
        yield from self.in_flight.values()

    def packed_columns(self) -> list[tuple[int, array, array, array]]:
        """(priority, ids, refs, sizes) of each level's live packed messages: copies, no object per message."""
        return [(p, *level.packed.live()) for p, level in self.levels.items() if len(level.packed)]

    def refs(self) -> Iterator[int]:
        """The ref of every live entry (packed ones read from their columns)."""
        for level in self.levels.values():
            packed = level.packed
            packed.flush()
            for ref, size in zip(packed.refs[packed.head :], packed.sizes[packed.head :]):
                if size >= 0:
                    yield ref
        for entry in self.objects():
            yield entry.ref

    def find_packed(self, message_id: int) -> Entry | None:
        """A view of the packed message `message_id` (any priority), or None."""
        for priority, level in self.levels.items():
            packed = level.packed
            i = packed.find(message_id)
            if i >= 0:
                return Entry(message_id, packed.refs[i], packed.sizes[i], priority, None, 0.0, 0, None, 0.0, PACKED)
        return None

    def unpack(self, view: Entry) -> Entry | None:
        """Make the packed message a view names an object (READY, in its line's heap: it keeps its place), for a
        change a packed slot cannot hold (a delivery count); None if it is no longer packed."""
        level = self.levels.get(view.priority)
        i = level.packed.find(view.id) if level is not None else -1
        if i < 0:
            return None
        packed = level.packed
        entry = Entry(view.id, packed.refs[i], packed.sizes[i], view.priority, None, 0.0, 0, None, 0.0, READY)
        packed.sizes[i] = -1
        packed.tidy()
        heapq.heappush(level.returned, (entry.id, id(entry), entry))
        view.state = GONE
        return entry

    def repoint_packed(self, priority: int, message_id: int, old: int | None, new: int) -> bool:
        """Point the packed message `message_id` at `new` if it is there (and at `old`, unless None)."""
        level = self.levels.get(priority)
        i = level.packed.find(message_id) if level is not None else -1
        if i < 0 or (old is not None and level.packed.refs[i] != old):
            return False
        level.packed.refs[i] = new
        return True

    def backlog(self) -> Iterator[Entry]:
        """Every live entry not in flight (ready, waiting, delayed; views for packed ones), lazily and in no
        particular order; the oldest ready ones come first. For taking a purge in steps (nothing may change while
        it is iterated)."""
        for level in self.levels.values():
            yield from level.packed.views(level.priority)
            yield from level.objects()
        for waiting in self.groups.values():
            yield from waiting
        yield from self.delayed

    def detach(self) -> list[list[Entry] | array]:
        """Empty the queue at once, without touching its entries; return them (as `entry_lists`, plus an array of
        refs per packed line) for the caller to release in steps. Only for a queue that is being deleted: its
        entries are never looked at again by the queue (its timers find it unregistered)."""
        lists: list[list[Entry] | array] = [refs for _, _, refs, _ in self.packed_columns()]
        lists += self.entry_lists()
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
        """Remove every entry that is not in flight (purge), or every entry with `in_flight`; return them (views
        for packed ones)."""
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

    def drop_packed_except(self, kept: set[int]) -> int:
        """Remove every packed message whose id is not in `kept` (a purge being replayed); return how many."""
        count = 0
        for level in self.levels.values():
            packed = level.packed
            packed.flush()
            for i in range(packed.head, len(packed.ids)):
                size = packed.sizes[i]
                if size >= 0 and packed.ids[i] not in kept:
                    packed.sizes[i] = -1
                    self.ready -= 1
                    self.bytes -= size
                    count += 1
            packed.tidy()
        if count:
            for level in self.levels.values():
                level.rebuild()
        return count

    def entry_lists(self) -> list[list[Entry]]:
        """Every structure that holds entry objects, each copied as a plain list at C speed (so ~1 ms per 100,000
        entries): for walks done in slices between which the queue changes (compaction's scan). No order; may
        include entries already GONE (lazily removed), and an entry may appear twice (a stale heap item). Packed
        messages are not in them: see `packed_columns`."""
        lists = []
        for level in self.levels.values():
            if level.fresh:
                lists.append(list(level.fresh))
            if level.returned:
                lists.append([item[2] for item in level.returned])
        lists.extend(list(waiting) for waiting in self.groups.values() if waiting)
        lists.append(list(self.delayed))
        lists.append(list(self.in_flight.values()))
        return lists

    def newest_ref(self) -> int:
        """The ref of the newest ready entry of any priority (0 if none): cheap, a bound for compaction's probe."""
        refs = [level.packed.staged[-1].ref if level.packed.staged else level.packed.refs[-1]
                for level in self.levels.values() if len(level.packed)]  # fmt: skip
        refs += [level.fresh[-1].ref for level in self.levels.values() if level.fresh]
        return max(refs, default=0)
