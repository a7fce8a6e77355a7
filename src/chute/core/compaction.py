"""Compaction's search: which live entries hold records in the files the store wants to reclaim, found in slices.

The search is a `CompactionScan`: `step()` looks at a bounded number of entries and says whether it is done, so
the caller can let other work run between steps (the asyncio broker yields to its event loop); a million-entry
backlog is never walked in one go. It walks plain-list copies of the queues' structures taken when the scan
starts (`Queue.entry_lists`, one C-level copy per structure), never the live structures, which change between
steps.

What a scan finds is a hint, not a promise: entries may be acked, leased or moved between steps. `relocate`
(recovery.py) therefore re-checks each holder when it moves it (still live, still at the old ref) and skips the
others. An entry missed by the scan (placed after it started, or moved between two structures) keeps its old
ref: the old file then stays (its live count is not zero) until a later compaction moves it, and recovery, which
replays a COPY for every holder of the message, agrees either way since both refs hold the same bytes.

Most of the time no file is sparse: a probe of the store's predicate over the segment ids in use (refs are
`segment << 32 | pos`; up to the newest ready entry's segment plus PROBE_SLACK_SEGMENTS) says so, and the scan
then walks nothing (a walk touches every entry, which after a fork costs a page fault per page: see
chute._forked_snapshot).

Invariant: no side effects: a scan only reads; what it found is changed only by `relocate`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from chute.core.queue import GONE, PACKED, Entry, Queue

if TYPE_CHECKING:
    from chute.core.state import BrokerState

SCAN_STEP_ENTRIES = 20_000  # entries looked at per step: a few milliseconds of one core
PROBE_SLACK_SEGMENTS = 1024  # segment ids probed beyond the newest entry's (a cheap over-estimate of the last id)
SCAN_MAX_REFS = 100_000  # records moved per compaction at most (bounds the scan's memory); the rest move next time


class CompactionScan:
    """Holders of live records in sparse files: `holders_of(ref)` and `retained_refs` (refs that topics retain).
    Drive it with `while not scan.step(): ...`; then `refs()` lists what to move."""

    def __init__(self, core: BrokerState, in_sparse_file: Callable[[int], bool]) -> None:
        self.in_sparse_file = in_sparse_file
        self.holders: dict[int, Entry] = {}  # old ref -> its first holder (no list per ref: one is the rule)
        self.more_holders: dict[int, list[Entry]] = {}  # the others (fan-out, dead letters of one message)
        self.retained_refs = {
            item[1] for topic in core.topics.values() for item in topic.retained if in_sparse_file(item[1])
        }
        durable = [queue for queue in core.queues.values() if not queue.ephemeral]
        newest_segment = max((queue.newest_ref() >> 32 for queue in durable), default=0)
        if not any(in_sparse_file(segment << 32) for segment in range(newest_segment + PROBE_SLACK_SEGMENTS)):
            durable = []  # no sparse file at all (the rule): no walk, so no page of the backlog is touched
        self._lists = [entries for queue in durable for entries in queue.entry_lists()]
        self._list = 0
        self._at = 0
        # packed lines: copies of their columns (16 bytes a message), walked after the object lists; a holder found
        # there is a view (state PACKED) and `_view_queue` remembers its queue for `relocate`
        self._packed = [(queue, priority, ids, refs)
                        for queue in durable for priority, ids, refs, _ in queue.packed_columns()]  # fmt: skip
        self._view_queue: dict[Entry, Queue] = {}

    def step(self, budget: int | None = None, max_refs: int | None = None) -> bool:
        """Look at up to `budget` more entries (SCAN_STEP_ENTRIES); return True once every entry has been looked
        at, or once `max_refs` (SCAN_MAX_REFS) records to move were found (checked between slices of `budget`)."""
        budget = SCAN_STEP_ENTRIES if budget is None else budget
        max_refs = SCAN_MAX_REFS if max_refs is None else max_refs
        in_sparse, holders = self.in_sparse_file, self.holders
        setdefault = holders.setdefault
        while budget > 0 and self._list < len(self._lists) and len(holders) < max_refs:
            entries = self._lists[self._list]
            chunk = entries[self._at : self._at + budget]
            for entry in chunk:
                if entry.state != GONE and in_sparse(entry.ref) and setdefault(entry.ref, entry) is not entry:
                    more = self.more_holders.setdefault(entry.ref, [])
                    if entry not in more:  # one structure may list an entry twice (a stale heap item)
                        more.append(entry)
            budget -= len(chunk)
            self._at += len(chunk)
            if self._at >= len(entries):
                self._lists[self._list] = []  # let the copy go
                self._list += 1
                self._at = 0
        while budget > 0 and self._packed and self._list >= len(self._lists) and len(holders) < max_refs:
            queue, priority, ids, refs = self._packed[0]
            end = min(self._at + budget, len(ids))
            for i in range(self._at, end):
                ref = refs[i]
                if in_sparse(ref):
                    view = Entry(ids[i], ref, 0, priority, None, 0.0, 0, None, 0.0, PACKED)
                    self._view_queue[view] = queue
                    if setdefault(ref, view) is not view:
                        self.more_holders.setdefault(ref, []).append(view)
            budget -= end - self._at
            self._at = end
            if end >= len(ids):
                self._packed.pop(0)
                self._at = 0
        return (self._list >= len(self._lists) and not self._packed) or len(holders) >= max_refs

    def holders_of(self, ref: int) -> list[Entry]:
        first = self.holders.get(ref)
        return [] if first is None else [first, *self.more_holders.get(ref, ())]

    def queue_of(self, view: Entry) -> Queue | None:
        """The queue whose packed line a view found by this scan came from."""
        return self._view_queue.get(view)

    def refs(self) -> list[int]:
        """The refs to move, in file order (the store reads neighbours together)."""
        return sorted(self.holders.keys() | self.retained_refs)
