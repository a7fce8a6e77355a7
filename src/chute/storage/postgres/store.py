"""PostgresStore: the storage contract (storage/api.py) on PostgreSQL — one log stream per broker, fenced.

A store owns one *stream* (named by the node, `--node-name`): its records are rows `(stream_id, ref) -> kind,
payload` of `chute_records`, its checkpoint a row of `chute_checkpoints` plus the snapshot's parts. Several brokers
share one database, each with its own stream; a broker taking over another's stream opens it (docs/cluster.md).

Concurrency: `append` runs on the event loop: it assigns refs, keeps the payloads in a pending group and in the
cache, and returns the group's future. One flush task at a time hands the whole pending group to the database
thread (db.py), which inserts it with one statement (or one transaction of several, for a group over 16 MiB) and
commits; appends made meanwhile form the next group. So many publishes and acks share one round trip and one
commit (PostgreSQL's WAL flush under synchronous_commit), never one per message.

Refs are `chunk << 32 | index`: a chunk is a run of records of about `chunk_max_bytes` (PostgreSQL's row costs
included). Live references are counted per chunk in memory (like the file store's segments); after a checkpoint,
the rows of chunks it covers that hold no live reference are deleted with one range DELETE on the primary key,
and sparse chunks are named for compaction. Each open starts a new chunk above every ref in the stream.

Invariants:
- a token resolves only after its group's transaction committed; a group whose commit failed or whose outcome is
  unknown (the connection broke) fails its token, and the store is read-only from then on (like the file store
  after a failed fsync: the broker's memory may now differ from what is stored, so only a reopen, which
  recovers from the database, makes it writable again);
- every write (group, checkpoint, deletion, clean flag) is checked against the epoch taken at open in the same
  statement or transaction: once another store opened the stream, this one never writes again (`StorageFailed`
  naming the new owner; read-only);
- refs increase in append order and across reopens; groups commit one at a time, in order, so the stored log
  is always a prefix of what was appended (no gaps);
- rows are deleted only by a checkpoint transaction that covers them, and only in chunks without live references.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

from chute.errors import InvalidArgument, StorageCorrupt, StorageFailed, StorageFull, StorageReadOnly
from chute.storage.api import (
    FsyncPolicy,
    Record,
    Recovered,
    RecoveryReport,
    SnapshotData,
    Store,
    StoreStats,
    snapshot_pieces,
)
from chute.storage.postgres.db import Corrupt, Database, Fenced, Stopped
from chute.storage.postgres.schema import SchemaError
from chute.storage.postgres.url import describe, redact

ROW_BYTES = 80  # about what a record costs PostgreSQL beyond its payload: tuple header, columns, index entry
SPARSE_FRACTION = 0.25  # a chunk with fewer live records than this share is worth compacting (as file segments)
REPLAY_BATCH = 5000  # records fetched per round trip while recovering
# what a cached record costs beyond its payload: an OrderedDict entry (slot and link), its int key and the bytes
# header (~170 bytes by tracemalloc, with the dict's spare slots)
CACHE_ITEM_BYTES = 176
CACHE_MAX_BYTES = 8 * 2**20  # a store's read cache by default
MAX_STREAM_NAME = 200
LAZY_FLUSH_S = 0.1  # records appended lazily (delivery counts) wait at most this long for a group commit


class PostgresStore(Store):
    """The log of stream `stream` in the PostgreSQL database at `url` (libpq URL; several hosts allowed).

    `fsync_policy`: `always` — a group is confirmed when its commit is durable (the server's synchronous_commit,
    raised to `on` if the server has it `off`); `interval` and `never` — sessions use synchronous_commit=off:
    a commit returns before its WAL is flushed, so a PostgreSQL crash (not a Chute crash) may lose the last
    ~0.6 s of confirmed groups (3 x wal_writer_delay).

    `statement_timeout_s`: a group commit or a read without an answer by then has failed (a database machine
    that vanished without closing its connections must not hang publishers); a group's outcome is then unknown."""

    def __init__(
        self,
        url: str,
        *,
        stream: str = "default",
        fsync_policy: FsyncPolicy = "always",
        chunk_max_bytes: int = 16 * 2**20,
        cache_max_bytes: int = CACHE_MAX_BYTES,
        connect_timeout_s: float = 10.0,
        statement_timeout_s: float = 30.0,
    ) -> None:
        if fsync_policy not in ("always", "interval", "never"):
            raise InvalidArgument(f"fsync_policy must be always, interval or never, got {fsync_policy!r}")
        if not isinstance(url, str) or not url.startswith(("postgresql://", "postgres://")):
            raise InvalidArgument(f"a PostgreSQL store URL starts with postgresql://, got {redact(str(url))!r}")
        if not stream or len(stream) > MAX_STREAM_NAME or not stream.isprintable():
            raise InvalidArgument(f"a stream (node) name is 1 to {MAX_STREAM_NAME} printable characters")
        self.url = url
        self.stream = stream
        self.fsync_policy = fsync_policy
        self.chunk_max_bytes = max(chunk_max_bytes, ROW_BYTES + 1)
        self.cache_max_bytes = cache_max_bytes
        self.connect_timeout_s = connect_timeout_s
        self.statement_timeout_s = statement_timeout_s
        self.where = describe(url)  # host:port/database, for messages (never the password)
        self.epoch = 0
        self.previous_owner: str | None = None
        self._db: Database | None = None
        self._chunks: dict[int, list[int]] = {}  # chunk -> [bytes, records, live]
        self._active = 0
        self._active_bytes = 0
        self._next_index = 0
        self._pending: tuple[list[int], list[int], list[bytes]] = ([], [], [])
        self._pending_bytes = 0
        self._group: asyncio.Future | None = None
        self._flusher: asyncio.Task | None = None
        self._lazy_timer: asyncio.TimerHandle | None = None
        self._committed_ref = 0  # refs below this are committed
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_bytes = 0
        self._failure: Exception | None = None
        self._checkpoint_at = 0  # the position (a ref) the stored checkpoint covers: refs below it
        self._generation = 0
        self._stats = StoreStats()
        self._appended = 0
        self._opened = self._closed = False

    async def _call(self, coro):
        """Run a coroutine of the database side (db.py) on its thread and await its result. A cancellation that
        is not our caller's own (the database side stopped under it) comes out as Stopped."""
        try:
            return await asyncio.wrap_future(self._db.submit(coro))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            raise Stopped(
                f"the connections of stream {self.stream!r} were closed under a statement", sent=True
            ) from None

    # -- open / recovery --------------------------------------------------------------------------------------

    async def open(self) -> Recovered:
        if self._opened:
            raise StorageFailed("store is already open")
        self._opened = True
        synchronous_commit = None if self.fsync_policy == "always" else "off"
        self._db = Database(self.url, self.stream, synchronous_commit=synchronous_commit,
                            connect_timeout_s=self.connect_timeout_s,
                            statement_timeout_s=self.statement_timeout_s)  # fmt: skip
        try:
            opened = await self._call(self._db.open())
        except BaseException as exc:
            self._closed = True
            await asyncio.to_thread(self._db.stop)
            if isinstance(exc, asyncio.CancelledError):
                raise  # our caller's own cancellation (the database side's shows as Stopped)
            raise self._open_error(exc) from None
        self.epoch, self.previous_owner = opened.epoch, opened.previous_owner
        checkpoint = opened.checkpoint
        self._generation, self._checkpoint_at = checkpoint.generation, checkpoint.position
        self._stats.checkpoint_file_bytes = len(checkpoint.snapshot or b"")
        for chunk, (records, size) in checkpoint.chunks.items():
            self._chunks[chunk] = [size, records, 0]
        top = max([opened.max_ref >> 32, checkpoint.position >> 32, *self._chunks], default=0)
        self._active, self._active_bytes, self._next_index = top + 1, 0, 0  # never reuse a ref, even a deleted one
        self._chunks[self._active] = [0, 0, 0]
        self._committed_ref = self._active << 32
        report = RecoveryReport(clean_shutdown=opened.clean)
        return Recovered(checkpoint.snapshot, self._replay(checkpoint.position, report), report)

    def _open_error(self, exc: BaseException) -> Exception:
        if isinstance(exc, SchemaError):
            return StorageFailed(f"PostgreSQL at {self.where}: {exc}")
        if isinstance(exc, Corrupt):
            return StorageCorrupt(f"PostgreSQL at {self.where}: {exc}")
        if isinstance(exc, InvalidArgument | StorageFailed):
            return exc
        return StorageFailed(f"cannot open stream {self.stream!r} in PostgreSQL at {self.where}: {_reason(exc)}")

    def _replay(self, position: int, report: RecoveryReport) -> Iterator[tuple[int, int, bytes]]:
        """The records from `position` on, fetched in batches (blocking: call from a thread, or accept it)."""
        chunks, after = self._chunks, position
        while True:
            try:
                batch = self._db.call(self._db.replay(after, REPLAY_BATCH))
            except Exception as exc:
                raise StorageFailed(
                    f"cannot recover stream {self.stream!r} from {self.where}: {_reason(exc)}"
                ) from None
            for ref, kind, payload in batch:
                info = chunks.get(ref >> 32)
                if info is None:
                    info = chunks[ref >> 32] = [0, 0, 0]
                info[0] += len(payload) + ROW_BYTES
                info[1] += 1
                report.records += 1
                yield ref, kind, payload
            if len(batch) < REPLAY_BATCH:
                report.segments = len(chunks)
                return
            after = batch[-1][0] + 1

    # -- append and group commit ------------------------------------------------------------------------------

    def append(self, records: Sequence[Record]) -> tuple[list[int], asyncio.Future]:
        refs = self._add(records)
        return refs, self._token()

    def append_lazy(self, records: Sequence[Record]) -> list[int]:
        """Records nobody waits for (delivery counts) go with the next group commit, or LAZY_FLUSH_S from now:
        a quiet broker does not commit once more for each delivery's count."""
        refs = self._add(records)
        if self._flusher is None and self._lazy_timer is None:
            self._lazy_timer = asyncio.get_running_loop().call_later(LAZY_FLUSH_S, self._lazy_flush)
        return refs

    def _lazy_flush(self) -> None:
        self._lazy_timer = None
        if self._pending[0] and self._flusher is None and self._failure is None and not self._closed:
            self._token()

    def _add(self, records: Sequence[Record]) -> list[int]:
        """Give `records` their refs, put them in the pending group and the cache; the refs."""
        if self._failure is not None or self._closed or self._db is None:
            raise StorageReadOnly(self._read_only_reason())
        pending_refs, pending_kinds, pending_payloads = self._pending
        info = self._chunks[self._active]
        limit, cache = self.chunk_max_bytes, self._cache if self.cache_max_bytes else None
        refs, added, cached = [], 0, 0
        for kind, payload in records:
            size = len(payload) + ROW_BYTES
            if self._active_bytes + size > limit and self._next_index:
                self._active += 1
                self._active_bytes = self._next_index = 0
                info = self._chunks[self._active] = [0, 0, 0]
            ref = self._active << 32 | self._next_index
            self._next_index += 1
            self._active_bytes += size
            info[0] += size
            info[1] += 1
            added += len(payload)
            refs.append(ref)
            pending_refs.append(ref)
            pending_kinds.append(kind)
            pending_payloads.append(payload)
            if cache is not None:
                cache[ref] = payload
                cached += len(payload) + CACHE_ITEM_BYTES
        self._pending_bytes += added
        self._appended += added + ROW_BYTES * len(refs)
        self._stats.appends += 1
        if cache is not None:
            self._cache_bytes += cached
            if self._cache_bytes > self.cache_max_bytes:
                self._trim_cache()
        return refs

    def _token(self) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        if self._group is None:
            self._group = loop.create_future()
            self._group.add_done_callback(_retrieve)
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush_loop())
        return self._group

    async def _flush_loop(self) -> None:
        """Commit each pending group in turn until nothing is pending (one transaction at a time, in order)."""
        try:
            while self._pending[0] and self._failure is None:
                (refs, kinds, payloads), size = self._pending, self._pending_bytes
                self._pending, self._pending_bytes = ([], [], []), 0
                group, self._group = self._group, None
                end = self._active << 32 | self._next_index  # every ref appended so far is in this group
                started = time.perf_counter()
                try:
                    await self._call(self._db.insert(refs, kinds, payloads, size))
                except Exception as exc:
                    self._fail(exc, group, len(refs))
                    return
                self._stats.observe_fsync(time.perf_counter() - started)
                self._stats.bytes_written += size
                self._committed_ref = end
                if group is not None and not group.done():
                    group.set_result(None)
        finally:
            self._flusher = None

    def _fail(self, exc: BaseException, group: asyncio.Future | None, records: int = 0) -> None:
        """Make the store read-only for good and fail the group in flight and the pending one."""
        error: Exception
        if isinstance(exc, Stopped) and not exc.sent:
            error = StorageFailed(f"{exc}: nothing more is written; the store is read-only")
        elif isinstance(exc, Fenced):
            error = StorageFailed(f"fenced: {exc}; this store may not write it any more and is read-only")
        elif _is_disk_full(exc):
            error = StorageFull(f"PostgreSQL at {self.where} is out of disk space: {exc}; nothing more is confirmed")
        elif isinstance(exc, TimeoutError) and records:
            error = StorageFailed(
                f"no answer from PostgreSQL at {self.where} within {self.statement_timeout_s:g} s to a group commit "
                f"of {records} record(s): its outcome is unknown (it may be stored); nothing more is confirmed and "
                "the store is read-only until the broker restarts"
            )
        elif _connection_lost(exc):
            what = f"a group commit of {records} record(s)" if records else "a write"
            error = StorageFailed(
                f"connection to PostgreSQL at {self.where} lost during {what}: its outcome is unknown (it may be "
                "stored); nothing more is confirmed and the store is read-only until the broker restarts"
            )
        else:
            error = StorageFailed(f"PostgreSQL at {self.where} refused a write: {_reason(exc)}; the store is read-only")
        if self._failure is None:
            self._failure = error
        self._stats.read_only = True
        for future in (group, self._group):
            if future is not None and not future.done():
                future.set_exception(self._failure)
        self._group = None
        self._pending, self._pending_bytes = ([], [], []), 0

    def _read_only_reason(self) -> str:
        if self._failure is not None:
            return f"the store is read-only after an earlier failure: {self._failure}"
        return "the store is closed" if self._closed else "the store is not open"

    async def flush(self) -> None:
        """Wait until everything appended so far is committed."""
        while self._flusher is not None:
            await asyncio.shield(self._flusher)
        if self._failure is not None:
            raise self._failure

    # -- reads ------------------------------------------------------------------------------------------------

    def read_cached(self, ref: int) -> bytes | None:
        return self._cache.get(ref)

    async def read(self, refs: Sequence[int]) -> list[bytes]:
        result: list[bytes | None] = [self._cache.get(ref) for ref in refs]
        missing = [i for i, payload in enumerate(result) if payload is None]
        if not missing:
            return result
        if self._db is None:
            raise StorageFailed(f"stream {self.stream!r}: the store is not open")
        wanted = [refs[i] for i in missing]
        for ref in wanted:  # held until read: a checkpoint must not delete the chunk under the read (as FileStore)
            self.track(ref)
        try:
            newest = max(wanted)
            while newest >= self._committed_ref and self._flusher is not None and self._failure is None:
                await asyncio.shield(self._flusher)  # only records not yet committed are waited for
            try:
                found = await self._call(self._db.read(wanted))
            except Exception as exc:
                raise StorageFailed(f"cannot read from PostgreSQL at {self.where}: {_reason(exc)}") from None
        finally:
            for ref in wanted:
                self.release(ref)
        for i, ref in zip(missing, wanted, strict=True):
            payload = found.get(ref)
            if payload is None:
                raise StorageCorrupt(f"stream {self.stream!r} at {self.where}: record {ref} (chunk {ref >> 32}) is "
                                     "missing")  # fmt: skip
            result[i] = payload
        return result

    def resize_cache(self, max_bytes: int) -> None:
        """Bound the read cache to `max_bytes` from now on, dropping its oldest records at once if it holds more (a
        cluster node shares one budget among the shards it holds: each shard's part changes as shards come and
        go)."""
        self.cache_max_bytes = max_bytes
        self._trim_cache()

    def _trim_cache(self) -> None:
        cache, limit = self._cache, self.cache_max_bytes
        while self._cache_bytes > limit and cache:
            _, payload = cache.popitem(last=False)
            self._cache_bytes -= len(payload) + CACHE_ITEM_BYTES

    # -- live references and space ----------------------------------------------------------------------------

    def track(self, ref: int, count: int = 1) -> None:
        info = self._chunks.get(ref >> 32)
        if info is not None:
            info[2] += count

    def release(self, ref: int, count: int = 1) -> None:
        info = self._chunks.get(ref >> 32)
        if info is not None:
            info[2] -= count

    def sparse_segments(self) -> Callable[[int], bool]:
        covered = self._checkpoint_at >> 32
        sparse = {
            chunk
            for chunk, (_, records, live) in self._chunks.items()
            if chunk < covered and chunk != self._active and 0 < live < records * SPARSE_FRACTION
        }
        return lambda ref: (ref >> 32) in sparse

    # -- checkpoint and close ---------------------------------------------------------------------------------

    async def checkpoint(self, snapshot: SnapshotData) -> None:
        if self._failure is not None or self._closed or self._db is None:
            raise StorageReadOnly(self._read_only_reason())
        pieces = snapshot_pieces(snapshot)  # stored as they are, never joined on the loop (db.store_checkpoint)
        position = self._active << 32 | self._next_index  # now: the snapshot stands for every record before it
        covered = position >> 32
        counts = {chunk: (info[1], info[0]) for chunk, info in self._chunks.items() if chunk <= covered}
        if self._pending[0] and self._flusher is None:
            self._token()
        await self.flush()
        dead = sorted(c for c, info in self._chunks.items() if c < covered and info[2] <= 0 and c != self._active)
        for chunk in dead:
            counts.pop(chunk, None)
        generation = self._generation + 1
        try:
            await self._call(self._db.store_checkpoint(generation, position, counts, pieces, _ranges(dead)))
        except Exception as exc:
            self._fail(exc, None)
            raise self._failure from None
        self._generation, self._checkpoint_at = generation, position
        self._stats.checkpoint_file_bytes = sum(map(len, pieces))
        for chunk in dead:
            del self._chunks[chunk]

    async def close(self) -> None:
        if self._closed or not self._opened:
            self._closed = True
            return
        if self._failure is None:
            if self._pending[0] and self._flusher is None:
                self._token()
            with contextlib.suppress(Exception):
                await self.flush()
                await self._call(self._db.mark_clean())
        self._closed = True
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
        await asyncio.to_thread(self._db.stop)

    def sever(self) -> None:
        """Drop every connection at once without flushing or closing anything, as when the process dies (the
        server rolls back what was in flight). For tests; the store is unusable afterwards."""
        self._closed = True
        if self._db is not None:
            self._db.stop(sever=True)

    async def backend_pids(self) -> list[int]:
        """The PostgreSQL server process ids of this store's connections (for tests and diagnostics)."""
        return await self._call(self._db.backend_pids())

    @property
    def read_only(self) -> bool:
        return self._failure is not None

    def stats(self) -> StoreStats:
        """Counters; `segments` are chunks and `bytes_on_disk` their estimated size in PostgreSQL."""
        self._stats.segments = len(self._chunks)
        self._stats.bytes_on_disk = sum(info[0] for info in self._chunks.values())
        return self._stats

    @property
    def bytes_appended(self) -> int:
        """Bytes appended since open, row costs included (cheap: for deciding when to checkpoint)."""
        return self._appended


def _ranges(chunks: list[int]) -> list[tuple[int, int]]:
    """Sorted chunk ids as ref ranges [low, high), consecutive chunks merged (one index range scan each)."""
    ranges: list[tuple[int, int]] = []
    for chunk in chunks:
        if ranges and ranges[-1][1] == chunk << 32:
            ranges[-1] = (ranges[-1][0], (chunk + 1) << 32)
        else:
            ranges.append((chunk << 32, (chunk + 1) << 32))
    return ranges


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return redact(text.splitlines()[0])


def _connection_lost(exc: BaseException) -> bool:
    import asyncpg

    lost = (
        asyncpg.exceptions.ConnectionDoesNotExistError,
        asyncpg.exceptions.InterfaceError,
        asyncpg.PostgresConnectionError,
        asyncpg.exceptions.AdminShutdownError,
        OSError,
        TimeoutError,
        Stopped,
        asyncpg.exceptions.InternalClientError,  # the state a connection killed by the server can leave
    )
    return isinstance(exc, lost)


def _is_disk_full(exc: BaseException) -> bool:
    import asyncpg

    return isinstance(exc, asyncpg.exceptions.DiskFullError)


def _retrieve(future: asyncio.Future) -> None:
    """Mark a group's exception as seen: the callers awaiting it get it; nobody else must be warned."""
    if not future.cancelled():
        future.exception()
