"""MemoryStore: the storage contract kept in memory — the reference implementation and the test twin.

Nothing survives the process, but within it the store behaves like a durable one: `open()` on the same instance
after `close()` replays the last snapshot and the records after it, so tests can restart a broker on it.
Tokens are done at once (every append is "durable" immediately; there is nothing to crash).

With `replayable=False` (the broker's store for ephemeral queues) no log is kept: a payload lives exactly as long
as something tracks it.

Invariants: refs increase in append order; a payload is kept while it is tracked or still needed for replay
(appended after the last checkpoint).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from chute.storage.api import (
    Durable,
    Record,
    Recovered,
    RecoveryReport,
    SnapshotData,
    Store,
    StoreStats,
    snapshot_bytes,
)


class _Done(Durable):
    """A token that is already resolved."""

    __slots__ = ()

    def done(self) -> bool:
        return True

    def __await__(self):
        return _nothing().__await__()


async def _nothing() -> None:
    return None


_DONE = _Done()


class MemoryStore(Store):
    """Keeps records in dicts. See the module docstring."""

    fsync_policy = "never"

    def __init__(self, *, replayable: bool = True) -> None:
        self.replayable = replayable
        self._records: dict[int, tuple[int, bytes]] = {}
        self._log: list[int] = []  # refs appended since the last checkpoint, in order
        self._live: dict[int, int] = {}
        self._snapshot: bytes | None = None
        self._next_ref = 1
        self._stats = StoreStats()

    async def open(self) -> Recovered:
        self._live.clear()
        records = [(ref, *self._records[ref]) for ref in self._log]
        report = RecoveryReport(records=len(records), segments=1, clean_shutdown=True)
        return Recovered(self._snapshot, iter(records), report)

    def append(self, records: Sequence[Record]) -> tuple[list[int], Awaitable[None]]:
        refs = list(range(self._next_ref, self._next_ref + len(records)))
        self._next_ref += len(records)
        stored = self._records
        for ref, record in zip(refs, records, strict=True):
            stored[ref] = record
            self._stats.bytes_written += len(record[1]) + 9
        if self.replayable:
            self._log.extend(refs)
        self._stats.appends += 1
        return refs, _DONE

    async def read(self, refs: Sequence[int]) -> list[bytes]:
        return [self._records[ref][1] for ref in refs]

    def read_cached(self, ref: int) -> bytes | None:
        record = self._records.get(ref)
        return record[1] if record is not None else None

    def track(self, ref: int, count: int = 1) -> None:
        self._live[ref] = self._live.get(ref, 0) + count

    def release(self, ref: int, count: int = 1) -> None:
        left = self._live.get(ref, 0) - count
        if left > 0:
            self._live[ref] = left
            return
        self._live.pop(ref, None)
        if not self.replayable:
            self._records.pop(ref, None)

    def sparse_segments(self) -> Callable[[int], bool]:
        return lambda ref: False  # nothing to compact in memory

    async def checkpoint(self, snapshot: SnapshotData) -> None:
        self._snapshot = snapshot_bytes(snapshot)
        self._log.clear()
        for ref in [ref for ref in self._records if ref not in self._live]:
            del self._records[ref]

    async def close(self) -> None:
        return None

    @property
    def read_only(self) -> bool:
        return False

    def stats(self) -> StoreStats:
        self._stats.bytes_on_disk = 0
        return self._stats
