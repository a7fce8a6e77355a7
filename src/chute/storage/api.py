"""The storage interface: a durable, append-only log of typed records plus one checkpoint.

The broker core keeps all state (queues, leases, indexes) in memory and describes every durable change as a
record: `(kind, payload)`, where `kind` is a small int and `payload` bytes the core encoded. A store only has to
keep those records in order, make them durable, read back the payload of one record by its `ref`, and keep the
latest checkpoint (a snapshot of the core's state, bytes) so that recovery replays only the records appended
after it.

Contract (every store, proven by tests/contract):
- `append(records)` is synchronous: it assigns each record a `ref` (an int, unique and increasing within a store)
  and returns them with a `Durable` token. Awaiting the token returns once every record of this call (and of
  every earlier call) is durable under the store's fsync policy, or raises `StorageFailed` / `StorageFull`.
  After a failure the store is read-only: later appends raise `StorageReadOnly` at once.
- records are replayed by `open()` in append order, each with its ref; records after the torn tail are dropped
  and reported, never silently.
- `checkpoint(snapshot)` makes every record appended so far durable, then stores `snapshot` atomically as
  standing for all of them; `open()` afterwards yields the snapshot and only the records appended after it.
  A snapshot is bytes, or a sequence of bytes-like pieces that stand for their concatenation (a forked
  snapshot's tail comes so: one buffer of tens of megabytes would hold the event loop to build); `open()`
  yields it as one `bytes` either way.
- space: `track(ref)` / `release(ref)` count live references to a record (`track_many` / `release_many`: the
  same for a batch of refs, a ref named twice counting twice). Records whose files hold no live
  reference and that a checkpoint covers may be deleted; `sparse_segments()` names files worth compacting (the
  core re-appends their live records and releases the old refs).
- the store never interprets payloads.

Several brokers on one database (the PostgreSQL store, storage/postgres; docs/cluster.md): each broker keeps the
state of the queues it owns in memory, so a shared store gives each broker its own log stream (rows keyed by broker
id and ref), its own checkpoint and its own live counts behind this same interface; the queues are partitioned
between brokers, and a broker taking over another's queues opens that broker's stream and recovers it. Two brokers
serving one queue at the same time is not what this interface is for: leases live in one broker's memory.
"""

from __future__ import annotations

import abc
import logging
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

# a checkpoint's snapshot: bytes, or pieces that stand for their concatenation, in order
SnapshotData = bytes | Sequence[bytes | bytearray | memoryview]

FsyncPolicy = Literal["always", "interval", "never"]

Record = tuple[int, bytes]
"""(kind, payload): kind in 1..255, chosen by the core; payload is opaque to the store."""


class Durable(Awaitable[None]):
    """The durability token `append` returns. `await token` waits for durability; `done()` says if it is."""

    __slots__ = ()

    @abc.abstractmethod
    def done(self) -> bool: ...

    @abc.abstractmethod
    def __await__(self): ...


@dataclass
class RecoveryReport:
    """What recovery found. `truncated_at` (file, pos) is set when a torn tail was cut there; `truncated_bytes` is
    how much was cut (0 for an empty segment file left by a crash right after it was created)."""

    records: int = 0
    segments: int = 0
    truncated_at: tuple[str, int] | None = None
    truncated_bytes: int = 0
    clean_shutdown: bool = False
    problems: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        """One line for a log: what was replayed, how the last run ended, what was repaired."""
        ended = "a clean shutdown" if self.clean_shutdown else "no clean shutdown (first start or a crash)"
        text = f"{self.records} records from {self.segments} segment(s) after {ended}"
        if self.truncated_at is not None:
            text += f"; torn tail cut at {self.truncated_at[0]}:{self.truncated_at[1]} ({self.truncated_bytes} bytes)"
        if self.problems:
            text += f"; {len(self.problems)} problem(s): " + "; ".join(self.problems)
        return text


@dataclass
class Recovered:
    """What `open()` hands back: the latest snapshot (or None) and the records appended after it."""

    snapshot: bytes | None
    records: Iterator[tuple[int, int, bytes]]  # (ref, kind, payload), in append order
    report: RecoveryReport


FSYNC_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
"""Upper bounds (seconds) of the fsync latency histogram: from a fast NVMe flush (~50 µs) to a struggling disk
(1 s); slower fsyncs fall in the overflow bucket."""


@dataclass
class StoreStats:
    """Counters for stats and metrics.

    Thread safety: a store's writer thread is the only writer of the fsync fields (`observe_fsync`); a reader
    on another thread copies `fsync_buckets` and takes the count as the copy's sum, so its histogram is
    consistent (the sum may lag one observation behind)."""

    bytes_on_disk: int = 0
    segments: int = 0
    checkpoint_file_bytes: int = 0
    """Size of the stored checkpoint file (0 without one)."""
    appends: int = 0
    fsyncs: int = 0
    fsync_seconds_total: float = 0.0
    fsync_buckets: list[int] = field(default_factory=lambda: [0] * (len(FSYNC_BUCKETS_S) + 1))
    """Group-commit fsyncs by latency: [i] counts those in (FSYNC_BUCKETS_S[i-1], FSYNC_BUCKETS_S[i]]; the
    last item counts those slower than the last bound. Not cumulative."""
    bytes_written: int = 0
    read_only: bool = False
    slow_fsync_s: float | None = field(default=None, metadata={"setting": True})  # (not a counter: never summed)
    """Each fsync slower than this is logged on `chute.holds` (set by a server with CHUTE_HOLD_REPORT_MS,
    server/holdreport.py: a message waits behind a slow sync without any hold of the loop); None: not logged."""

    def observe_fsync(self, seconds: float) -> None:
        """Count one fsync (of a group: its files and perhaps the directory) that took `seconds`."""
        self.fsync_buckets[bisect_left(FSYNC_BUCKETS_S, seconds)] += 1
        self.fsync_seconds_total += seconds
        self.fsyncs += 1
        if self.slow_fsync_s is not None and seconds > self.slow_fsync_s:
            logging.getLogger("chute.holds").warning("a group commit's fsync took %.1f ms", seconds * 1000)


class Store(abc.ABC):
    """A durable append-only log of records plus one checkpoint. See the module docstring for the contract."""

    fsync_policy: FsyncPolicy = "always"

    @abc.abstractmethod
    async def open(self) -> Recovered:
        """Recover the log. Call once, before anything else. Raises `StorageCorrupt` for damage before the tail."""

    @abc.abstractmethod
    def append(self, records: Sequence[Record]) -> tuple[list[int], Durable]:
        """Append records in order; return their refs and a token that resolves once they are durable."""

    def append_lazy(self, records: Sequence[Record]) -> list[int]:
        """Append records nobody waits for (delivery counts): a store may hold them back to go with the next
        group commit, for a short while (FileStore: LAZY_FLUSH_S). A crash may lose the last of them; their
        order with every other record is kept. Returns their refs. By default the same as `append`."""
        return self.append(records)[0]

    @abc.abstractmethod
    async def read(self, refs: Sequence[int]) -> list[bytes]:
        """Return the payloads of the records at `refs` (each must be a live ref when read is called), in the same
        order. A read in progress holds its refs as live until it returns: their holders may release them
        meanwhile (compaction moves an entry whose body is being read) and no checkpoint deletes them under it."""

    @abc.abstractmethod
    def read_cached(self, ref: int) -> bytes | None:
        """Return the payload at `ref` if it is in memory (no I/O), else None."""

    @abc.abstractmethod
    def track(self, ref: int, count: int = 1) -> None:
        """Count `count` more live references to the record at `ref`."""

    @abc.abstractmethod
    def release(self, ref: int, count: int = 1) -> None:
        """Count `count` fewer live references to the record at `ref`."""

    def track_many(self, refs: Sequence[int]) -> None:
        """`track(ref)` for each of `refs` (one call for a batch of deliveries or placements: a store may count
        them in one go)."""
        track = self.track
        for ref in refs:
            track(ref)

    def release_many(self, refs: Sequence[int]) -> None:
        """`release(ref)` for each of `refs` (one call for a batch of acks: a store may count them in one go)."""
        release = self.release
        for ref in refs:
            release(ref)

    @abc.abstractmethod
    def sparse_segments(self) -> Callable[[int], bool]:
        """A predicate on refs: True for records in files worth compacting (mostly dead, covered by a checkpoint)."""

    @abc.abstractmethod
    async def checkpoint(self, snapshot: SnapshotData) -> None:
        """Make everything appended durable, store `snapshot` (bytes, or pieces standing for their
        concatenation) for it atomically, then reclaim dead files."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush and fsync what was appended, mark a clean shutdown and release files. Idempotent."""

    @property
    @abc.abstractmethod
    def read_only(self) -> bool:
        """True after a storage failure: appends are refused until the store is reopened."""

    @abc.abstractmethod
    def stats(self) -> StoreStats:
        """Counters for stats and metrics."""

    @property
    def bytes_appended(self) -> int:
        """Bytes appended since open; cheap enough to read after every operation (checkpoint scheduling)."""
        return self.stats().bytes_written


def snapshot_pieces(snapshot: SnapshotData) -> Sequence[bytes | bytearray | memoryview]:
    """The pieces of a checkpoint's snapshot (bytes is one piece)."""
    return (snapshot,) if isinstance(snapshot, bytes | bytearray | memoryview) else snapshot


def snapshot_bytes(snapshot: SnapshotData) -> bytes:
    """A checkpoint's snapshot as one `bytes` (for stores that keep it so: a copy when it came in pieces)."""
    return snapshot if isinstance(snapshot, bytes) else b"".join(snapshot_pieces(snapshot))
