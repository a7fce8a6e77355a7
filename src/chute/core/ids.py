"""Message ids: 64-bit ints that carry their publish time and sort in publish order.

    id = publish_ms << 20 | sequence

Invariant: ids handed out by one generator strictly increase, even if the clock steps back (the generator keeps
the last millisecond and borrows from the future when a millisecond's 2**20 sequence numbers run out). After a
restart the generator is advanced past the largest id recovered, so ids are never reused.
"""

from __future__ import annotations

SEQ_BITS = 20
SEQ_MASK = (1 << SEQ_BITS) - 1


class IdGenerator:
    """Hands out message ids; `now` is seconds since the epoch, passed in."""

    __slots__ = ("last",)

    def __init__(self, last: int = 0) -> None:
        self.last = last

    def next(self, now: float) -> int:
        candidate = int(now * 1000) << SEQ_BITS
        last = self.last
        self.last = candidate if candidate > last else last + 1
        return self.last

    def next_many(self, now: float, count: int) -> range:
        """`count` consecutive ids, as `next` would give them one by one."""
        candidate = int(now * 1000) << SEQ_BITS
        first = candidate if candidate > self.last else self.last + 1
        self.last = first + count - 1
        return range(first, first + count)

    def advance(self, seen: int) -> None:
        """Make sure later ids are greater than `seen`."""
        if seen > self.last:
            self.last = seen


def publish_time(message_id: int) -> float:
    """The publish time (seconds since the epoch) an id carries."""
    return (message_id >> SEQ_BITS) / 1000.0
