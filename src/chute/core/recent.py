"""`RecentMessages`: the messages stored or read lately, as consumers see them (`Message`), by ref.

A delivery needs its message's `Message`: read from the store (its cache, or the disk) and decoded. Most
deliveries of a busy broker follow their publish closely, and a fan-out delivers one message to several queues, so
the core keeps the `Message` of each plain message it has just stored, and the broker keeps each one it has just
decoded; a delivery then takes it from here without reading or decoding anything.

Invariants:
- a ref names one record for the whole life of a store (the storage contract: unique and increasing), and a
  record never changes: a kept message is never stale. Only messages that read the same in every queue are kept
  (none whose ready or expiry time differs between queues), and only refs of the broker's durable store (an
  ephemeral queue's store numbers its records on its own).
- bounded, whatever the traffic: two generations of at most MAX_COUNT messages or MAX_BYTES of bodies each. When
  the newer one is full it becomes the older one and the older one is dropped, so memory holds at most twice
  that; a message no longer kept is simply read and decoded again.
- kept only while it serves: when the newer generation fills without a delivery having been served from here
  since the last turn (`used`), both are dropped, and nothing more is kept until a delivery looks here again: a
  backlog building up while nobody consumes costs no memory here.
"""

from __future__ import annotations

from collections.abc import Iterable

from chute.model import Message

MAX_COUNT = 2048
MAX_BYTES = 1 << 20


class RecentMessages:
    """Recent `Message`s by ref, in two generations."""

    __slots__ = ("new", "old", "new_bytes", "max_count", "max_bytes", "used", "dormant")

    def __init__(self, max_count: int = MAX_COUNT, max_bytes: int = MAX_BYTES) -> None:
        self.new: dict[int, Message] = {}
        self.old: dict[int, Message] = {}
        self.new_bytes = 0
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.used = False  # a delivery was served from here since the last turn (set by its reader)
        self.dormant = False  # a generation filled unused: keep nothing until `used` again

    def wanted(self) -> bool:
        """Whether messages put now would be kept (a publisher need not build them otherwise)."""
        return not self.dormant or self._wake()

    def get(self, ref: int) -> Message | None:
        message = self.new.get(ref)
        return message if message is not None else self.old.get(ref)

    def put(self, ref: int, message: Message) -> None:
        if self.dormant and not self._wake():
            return
        if len(self.new) >= self.max_count or self.new_bytes >= self.max_bytes:
            self._turn()
            if self.dormant:
                return
        self.new[ref] = message
        self.new_bytes += len(message.body)

    def put_many(self, refs: Iterable[int], messages: list[Message], size: int) -> None:
        """Keep `messages` (their bodies `size` bytes in all) under `refs`, in the same order."""
        if self.dormant and not self._wake():
            return
        if len(self.new) + len(messages) > self.max_count or self.new_bytes + size > self.max_bytes:
            self._turn()
            if self.dormant or len(messages) > self.max_count or size > self.max_bytes:
                return  # nobody reads here, or larger than a generation on its own: not kept
        self.new.update(zip(refs, messages))
        self.new_bytes += size

    def resize(self, max_count: int, max_bytes: int) -> None:
        """Keep at most `max_count` messages and `max_bytes` of bodies a generation from now on. Smaller limits
        drop both generations at once (they may hold more; a kept message is only a saved decode), so the bound
        holds from the call on."""
        if max_count < self.max_count or max_bytes < self.max_bytes:
            self.new, self.old, self.new_bytes = {}, {}, 0
        self.max_count, self.max_bytes = max_count, max_bytes

    def clear(self) -> None:
        self.new, self.old, self.new_bytes, self.dormant = {}, {}, 0, False

    def __len__(self) -> int:
        return len(self.new) + len(self.old)

    def _turn(self) -> None:
        self.old, self.new, self.new_bytes = self.new if self.used else {}, {}, 0
        self.dormant = not self.used
        self.used = False

    def _wake(self) -> bool:
        """Dormant: keep messages again if a delivery has looked here since (True)."""
        if self.used:
            self.dormant = False
            return True
        return False
