"""Deduplication window of one queue or topic: dedup id -> (expires, message id).

Invariant: an id is remembered until `expires` (publish time + the window), then forgotten by the next sweep;
`order` holds (expires, dedup id) in insertion order, which is expiry order while the window is unchanged (a
shorter window after an update only makes some ids live a little longer). The broker sweeps a window with a
timer (`timer_at`) so ids are forgotten on time even when no publish looks them up: memory holds the ids of the
window, never every id that ever passed. `lookup` changes nothing, so a publish refused after its dedup check
leaves the window as it was.
"""

from __future__ import annotations

from collections import deque


class DedupWindow:
    """Remembers recent dedup ids so a repeated publish is confirmed but not stored twice. `lookup` never
    returns an id past its window, even one not yet swept from `order`."""

    __slots__ = ("table", "order", "timer_at")

    def __init__(self) -> None:
        self.table: dict[str, tuple[float, int]] = {}
        self.order: deque[tuple[float, str]] = deque()
        self.timer_at: float | None = None  # when the broker's sweep timer for this window fires

    def lookup(self, dedup_id: str, now: float) -> int | None:
        """The id of the message published with `dedup_id` within the window, or None. Changes nothing."""
        found = self.table.get(dedup_id)
        return found[1] if found is not None and found[0] > now else None

    def remember(self, dedup_id: str, message_id: int, expires: float) -> None:
        self.table[dedup_id] = (expires, message_id)
        self.order.append((expires, dedup_id))

    def forget(self, dedup_id: str, message_id: int) -> None:
        """Forget `dedup_id` if it still stands for `message_id` (a publish that failed to become durable)."""
        found = self.table.get(dedup_id)
        if found is not None and found[1] == message_id:
            del self.table[dedup_id]

    def expire(self, now: float) -> None:
        order, table = self.order, self.table
        while order and order[0][0] <= now:
            _, dedup_id = order.popleft()
            found = table.get(dedup_id)
            if found is not None and found[0] <= now:
                del table[dedup_id]

    def next_expiry(self) -> float | None:
        """When the oldest remembered id expires (None: nothing is remembered)."""
        return self.order[0][0] if self.order else None

    def items(self) -> list[tuple[str, float, int]]:
        """(dedup id, expires, message id), soonest expiry first (so a restored window expires in order)."""
        return sorted(((key, expires, message_id) for key, (expires, message_id) in self.table.items()),
                      key=lambda item: item[1])  # fmt: skip
