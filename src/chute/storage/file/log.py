"""FileStore: the default durable store — a segmented append-only log with group commit and checkpoints.

Concurrency: `append` runs on the event loop and only encodes frames into an in-memory buffer. At the end of
that turn of the loop the whole buffer goes to a single long-lived writer thread (write, then fsync under the
`always` policy), one group at a time, through a queue; the thread resolves one future for everything that was
in it, the group, with one call back to the loop. What was appended meanwhile is the next group: the thread takes
it itself when it is done (under `_hand_lock`, which the loop holds while it appends), so a busy log costs one
wake-up of the loop per group and none of the thread; when the thread has gone idle the loop hands the next group
over. Delivery counts (lazy records) alone never make a group: they wait for the next one or LAZY_FLUSH_S. So many
publishes and acks share one write and one fsync, and the loop never blocks on disk.
A checkpoint's file (megabytes, written then fsynced and renamed) is written on a third thread, after the writer
thread made the segments durable up to the checkpoint's position, so group commits never wait behind it; it goes
to the disk in synced steps of CHECKPOINT_STEP_BYTES with a pause between them, so a group commit's fsync never
waits behind the whole file either.
Reads that miss the cache run in a second thread, so they never queue behind a write and its fsync; they only
ask for bytes already written (`_written_ref`), and a segment file is never unlinked while a read runs.

Invariants:
- a token resolves only after its bytes were written and, under `always`, fsynced — never before.
- refs are `segment id << 32 | pos` and increase in append order; a record never spans two segments.
- records go in batch frames (one crc, one cache entry each): an `append` call starts a frame or, while the
  group is still being gathered, extends the group's last frame up to FRAME_MERGE_BYTES; a frame never spans
  segments or groups. A ref is the position of its record's header in the file (docs/storage-format.md).
- segments of format 1 (written before format 2) are read as they are, never appended to, and count as sparse
  once a checkpoint covers them, so compaction rewrites their live records in format 2 and they are deleted.
- after any write or fsync error the store is read-only for good (the state of the page cache after a failed
  fsync is unknown, so it is never retried): the failed group and every later append fail.
- a segment file is deleted only when a checkpoint covers it and it holds no live record.
- the writer writes each group's bytes at the position where the segment's written bytes end (`_file_ends`),
  never elsewhere: the active segment's file has space reserved up to RESERVE_BYTES ahead (zeros after the
  frames, so most syncs change neither size nor allocation) and a frame never follows a gap. A segment is cut
  to its frames (`_seal`), durably, before the next segment's file is created, and the last one at a clean
  close.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import queue
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from zlib import crc32

from chute.errors import StorageCorrupt, StorageFailed, StorageFull, StorageReadOnly
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
from chute.storage.file import recovery
from chute.storage.file.fs import Fs, OsFs
from chute.storage.file.record import (
    BATCH,
    BATCH_SIZE,
    FRAME_SIZE,
    MAX_PAYLOAD,
    RECORD,
    RECORD_SIZE,
    SEGMENT_HEADER_SIZE,
    checkpoint_pieces,
    decode_batch,
    decode_checkpoint,
    decode_frame,
    encode_batch,
    encode_records,
    record_in_batch,
    segment_header,
)

CHECKPOINT = "checkpoint"
CLEAN_MARKER = "clean-shutdown"
LOCK = "lock"
SPARSE_FRACTION = 0.25  # a sealed segment with fewer live records than this share is worth compacting
READ_GAP_BYTES = 64 * 2**10  # records closer than this in one file are read with one pread (bytes between wasted)
READ_SPAN_BYTES = 2**20  # the most one coalesced pread asks for, beyond the last record's own length
CACHE_ITEM_BYTES = 120  # what a cached frame costs beyond its records (dict slot, list slot, int key, bytes header)
CACHE_TRIM = 0.75  # a full cache drops its oldest frames down to this share of its limit, in one go
READ_TAIL_BYTES = 4096  # guess of the last record's length in a span; a longer record costs one more pread
MASK = 0xFFFFFFFF
LAZY_FLUSH_S = 0.1  # records appended lazily (delivery counts) wait at most this long for a group commit
FRAME_MERGE_BYTES = 64 * 2**10  # appends of one group share a frame up to this size (a read checks a whole frame)
RESERVE_BYTES = 4 * 2**20  # a segment's file space is reserved this far ahead of its frames (see `_reserve`)
CHECKPOINT_STEP_BYTES = 2**20  # a checkpoint file is written and synced in steps of this size ...
CHECKPOINT_STEP_PAUSE_S = 0.005  # ... with this pause between them, so group commits are never stuck behind it all


class FileStore(Store):
    """The durable log in directory `path`. See the module docstring and docs/storage-format.md."""

    def __init__(
        self,
        path: str | Path,
        *,
        fsync_policy: FsyncPolicy = "always",
        fsync_interval_ms: int = 100,
        segment_max_bytes: int = 64 * 2**20,
        cache_max_bytes: int = 8 * 2**20,
        fs: Fs | None = None,
    ) -> None:
        if fsync_policy not in ("always", "interval", "never"):
            raise ValueError(f"fsync_policy must be always, interval or never, got {fsync_policy!r}")
        self.directory = str(Path(path).absolute())
        self.fsync_policy = fsync_policy
        self.fsync_interval_s = fsync_interval_ms / 1000.0
        self.segment_max_bytes = max(segment_max_bytes, SEGMENT_HEADER_SIZE + BATCH_SIZE + RECORD_SIZE + 1)
        self.cache_max_bytes = cache_max_bytes
        self.fs = fs if fs is not None else OsFs()
        self._executor: _Writer | None = None  # the writer thread: write, fsync, checkpoint, delete
        self._reader: ThreadPoolExecutor | None = None  # reads of bodies not in the cache
        self._checkpointer: ThreadPoolExecutor | None = None  # checkpoint files, never in the way of a commit
        self._files_lock = threading.Lock()  # held by a read, and by whoever unlinks a segment file
        # held by the loop while it appends or forms a group, and by the writer thread while it takes the next
        # group itself (`_write_group`): the pending bytes, the open frame and the group future change together
        self._hand_lock = threading.Lock()
        # writer thread only: segment id -> where its written bytes end in its file (the active segment's, and
        # a sealed one's until it is cut to that length); beyond it the file holds preallocated zeros
        self._file_ends: dict[int, int] = {}
        self._reserved: dict[int, int] = {}  # writer thread only: segment id -> its file's reserved size
        self._segments: dict[int, list[int]] = {}  # segment id -> [size, records, live]
        self._format1: set[int] = set()  # segments of format 1 (read as they are, compacted away)
        self._active = 0
        self._active_size = 0
        # (segment id, file position of the first byte, bytes) not yet handed to the writer
        self._pending: list[tuple[int, int, bytearray]] = []
        self._open_frame: list | None = None  # [buffer, header offset, file pos, crc, length] of the frame appends
        # may still extend: the last one in the pending bytes, not yet handed to the writer
        self._group: asyncio.Future | None = None
        self._lazy_timer: asyncio.TimerHandle | None = None
        self._flusher: asyncio.Future | None = None  # set while groups are being written (done when none is)
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop of the groups being written
        self._cache: dict[int, bytes] = {}  # a frame's ref -> its records (format 2), in append order
        self._cache_starts: list[int] = []  # the cached frames' refs, ascending (= insertion order)
        self._cache_bytes = 0
        self._failure: Exception | None = None
        self._checkpoint_at = (0, 0)
        self._unsynced: set[int] = set()
        self._last_fsync = time.monotonic()
        self._stats = StoreStats()
        self._appended = 0
        self._written_ref = 0  # refs below this are in the files (written, perhaps not yet fsynced)
        self._locked = False
        self._opened = self._closed = False

    def _path(self, segment: int) -> str:
        return f"{self.directory}/{recovery.segment_name(segment)}"

    # -- open / recovery --------------------------------------------------------------------------------------

    async def open(self) -> Recovered:
        if self._opened:
            raise StorageFailed("store is already open")
        self._opened = True
        self._executor = _Writer("chute-log")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="chute-read")
        self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="chute-checkpoint")
        loop = self._loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._open)
        except BaseException:
            if self._locked:
                self.fs.unlock(f"{self.directory}/{LOCK}")  # a failed open must not keep the directory locked
            self._executor.shutdown(wait=False)
            self._reader.shutdown(wait=False)
            self._checkpointer.shutdown(wait=False)
            raise

    def _open(self) -> Recovered:
        fs, directory = self.fs, self.directory
        fs.makedirs(directory)
        if not fs.lock(f"{directory}/{LOCK}"):
            raise StorageFailed(f"data directory {directory} is in use by another broker")
        self._locked = True
        report = RecoveryReport()
        report.clean_shutdown = fs.exists(f"{directory}/{CLEAN_MARKER}")
        if fs.exists(f"{directory}/{CHECKPOINT}.tmp"):
            fs.unlink(f"{directory}/{CHECKPOINT}.tmp")  # a checkpoint interrupted before its rename
        snapshot, counts = None, {}
        segments = recovery.segment_ids(fs, directory)
        start = (segments[0], SEGMENT_HEADER_SIZE) if segments else (0, 0)
        if fs.exists(f"{directory}/{CHECKPOINT}"):
            try:
                stored = fs.read_file(f"{directory}/{CHECKPOINT}")
                start, counts, snapshot = decode_checkpoint(stored)
            except ValueError as exc:
                raise StorageCorrupt(f"{directory}/{CHECKPOINT} at 0: {exc}") from None
            self._checkpoint_at = start
            self._stats.checkpoint_file_bytes = len(stored)
        shape = recovery.validate(fs, directory, segments, start, counts, report)
        for segment, end in shape.ends.items():
            self._segments[segment] = [end, shape.records.get(segment, 0), 0]
        self._format1 = {segment for segment, version in shape.versions.items() if version == 1}
        last = max(self._segments, default=None)
        if last is not None:
            self._written_ref = last << 32 | self._segments[last][0]
        if last is not None and last not in self._format1:
            self._active, self._active_size = last, self._segments[last][0]
            self._file_ends[last] = self._active_size
            self._reserve(last, self._active_size)
        else:  # a new directory, or one of format 1: format 2 is never appended to a format-1 segment
            self._new_segment(max(segments + [start[0]], default=0) + 1)  # never reuse a checkpointed id
        if report.clean_shutdown:
            fs.unlink(f"{directory}/{CLEAN_MARKER}")
            fs.fsync_dir(directory)
        records = recovery.replay(fs, directory, shape, start, report)
        return Recovered(snapshot, records, report)

    def _new_segment(self, segment: int) -> None:
        self._open_frame = None
        header = bytearray(segment_header(segment))
        self._segments[segment] = [len(header), 0, 0]
        self._pending.append((segment, 0, header))
        self._active, self._active_size = segment, len(header)

    # -- append and group commit ------------------------------------------------------------------------------

    def append(self, records: Sequence[Record]) -> tuple[list[int], asyncio.Future]:
        with self._hand_lock:
            refs = self._frame_records(records)
            return refs, self._token()

    def append_lazy(self, records: Sequence[Record]) -> list[int]:
        """Records nobody waits for go with the next group commit, or LAZY_FLUSH_S from now: a quiet broker
        does not write and fsync once more for each delivery's count."""
        with self._hand_lock:
            refs = self._frame_records(records)
        if self._flusher is None and self._lazy_timer is None:
            self._lazy_timer = asyncio.get_running_loop().call_later(LAZY_FLUSH_S, self._lazy_flush)
        return refs

    def _lazy_flush(self) -> None:
        self._lazy_timer = None
        if self._pending and self._flusher is None and self._failure is None and not self._closed:
            with self._hand_lock:
                self._token()

    def _frame_records(self, records: Sequence[Record]) -> list[int]:
        if self._failure is not None or self._closed:
            raise StorageReadOnly(f"the log is read-only after an earlier failure: {self._failure}")
        refs: list[int] = []
        first, count = 0, len(records)
        while first < count:
            # the records that fit in the active segment form one frame (a record larger than a whole segment
            # gets a segment of its own); the rest start a new segment
            size, limit = self._active_size + BATCH_SIZE, self.segment_max_bytes
            last = first
            while last < count and (size + RECORD_SIZE + len(records[last][1]) <= limit or last == first):
                size += RECORD_SIZE + len(records[last][1])
                last += 1
            if size > limit and self._active_size > SEGMENT_HEADER_SIZE:
                self._roll()  # not even the first record fits after what the segment holds
                continue
            self._append_frame(records, first, last, size - self._active_size - BATCH_SIZE, refs)
            first = last
            if first < count:
                self._roll()
        self._stats.appends += 1
        if self._cache_bytes > self.cache_max_bytes:
            self._trim_cache()
        return refs

    def _append_frame(self, records: Sequence[Record], first: int, last: int, size: int, refs: list[int]) -> None:
        """Frame records[first:last] (`size` bytes with their headers) into the active segment's pending bytes:
        in the group's open frame if it has room, else in a new one; cache what was added."""
        pending, segment, pos = self._pending, self._active, self._active_size
        if not pending or pending[-1][0] != segment:
            pending.append((segment, pos, bytearray()))
        buffer = pending[-1][2]
        chunk = records[first:last] if first or last < len(records) else records
        base, start, frame = segment << 32, len(buffer), self._open_frame
        if frame is not None and frame[0] is buffer and frame[4] + size <= FRAME_MERGE_BYTES:
            positions = encode_records(buffer, chunk, pos, frame[2])
            added = memoryview(buffer)[start:]
            frame[3] = crc32(added, frame[3])
            frame[4] += len(added)
            BATCH.pack_into(buffer, frame[1], frame[4], frame[3])
            body = self._cache.get(base | frame[2])
            if body is not None:
                body += added
                self._cache_bytes += len(added)
            added.release()
        else:
            positions = encode_batch(buffer, chunk, pos)
            length, crc = BATCH.unpack_from(buffer, start)
            self._open_frame = [buffer, start, pos, crc, length]
            if self.cache_max_bytes:
                self._cache[base | pos] = bytearray(memoryview(buffer)[start + BATCH_SIZE :])
                self._cache_starts.append(base | pos)
                self._cache_bytes += length + CACHE_ITEM_BYTES
        refs += [base | p for p in positions]
        grown = len(buffer) - start
        info = self._segments[segment]
        info[0] = self._active_size = pos + grown
        info[1] += last - first
        self._appended += grown

    def _roll(self) -> None:
        """Seal the active segment and start the next one."""
        self._new_segment(self._active + 1)

    def _token(self) -> asyncio.Future:
        """The future of the group the pending appends will be written in (called with `_hand_lock` held)."""
        group = self._group
        if group is not None and self._flusher is not None:  # the common case under load, kept cheap
            return group
        if self._flusher is None:  # (a getpid() system call: once per busy spell, not per token)
            loop = self._loop = asyncio.get_running_loop()
        else:
            loop = self._loop
        if group is None:
            group = self._group = loop.create_future()  # (its failure is marked seen by `_fail`)
        if self._flusher is None:
            # the hand-over waits for the end of this turn of the loop: appends made in it join the group
            self._flusher = loop.create_future()
            loop.call_soon(self._hand_over)
        return group

    def _hand_over(self) -> None:
        """Loop: give everything pending, as one group, to the writer thread (one group there at a time; appends
        made meanwhile form the next one, which the writer thread takes itself when it is done, or `_written`
        hands over)."""
        with self._hand_lock:
            taken = self._take_group() if self._pending and self._failure is None else None
        if taken is None:
            self._flushed()
            return
        if self._lazy_timer is not None:
            self._cancel_lazy_timer()  # the delivery counts it was for are in this group
        if not self._executor.post(self._write_group, self._loop, *taken):
            self._flushed()  # the writer is gone (a simulated power cut): nothing more is written or confirmed

    def _take_group(self) -> tuple[list[tuple[int, int, bytearray]], bool, int, asyncio.Future | None]:
        """(buffers, fsync?, end ref, future) of everything pending, now a group for the writer thread; called
        with `_hand_lock` held, on the loop or on the writer thread."""
        batch, self._pending = self._pending, []
        self._open_frame = None  # the writer has these bytes now: later appends start a new frame
        group, self._group = self._group, None
        end_ref = self._active << 32 | self._active_size  # everything appended so far is in this batch
        sync = self.fsync_policy == "always" or (
            self.fsync_policy == "interval" and time.monotonic() - self._last_fsync >= self.fsync_interval_s
        )
        return batch, sync, end_ref, group

    def _write_group(self, loop, batch: list[tuple[int, int, bytearray]], sync: bool, end_ref: int, group) -> None:
        """Writer thread: write (and fsync) one group, then tell the loop, with one call. If appends that someone
        waits for came meanwhile (and no other job waits its turn), take them as the next group and go on: the
        loop need not wake this thread again, and the next write starts at once."""
        while True:
            try:
                self._write(batch, sync)
            except OSError as exc:
                error: OSError | None = exc
            except Exception as exc:  # a bug: fail the group (and the log) rather than leave its publishers waiting
                error = OSError(errno.EIO, f"{type(exc).__name__}: {exc}")
            else:
                error = None
            following = None
            if error is None and self._executor.idle():
                with self._hand_lock:
                    if self._group is not None and self._pending and self._failure is None and not self._closed:
                        following = self._take_group()
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to tell
                loop.call_soon_threadsafe(self._written, end_ref, group, error, following is not None)
            if following is None:
                return
            batch, sync, end_ref, group = following

    def _written(self, end_ref: int, group: asyncio.Future | None, error: OSError | None, went_on: bool) -> None:
        """Loop: a group is written (and fsynced if asked): confirm it; unless the writer thread went on with
        the next group itself (`went_on`), hand over the next, if any."""
        if error is not None:
            self._fail(error, group)
            self._flushed(after_failure=True)
            return
        self._written_ref = end_ref
        if group is not None and not group.done():
            group.set_result(None)
        if went_on:  # the writer thread took what was pending: it reports that group the same way
            if self._lazy_timer is not None:
                self._cancel_lazy_timer()
            return
        if self._group is not None:  # someone waits for what was appended meanwhile: the next group
            self._hand_over()
            return
        self._flushed()
        if self._pending and self._lazy_timer is None and not self._closed:
            # only lazy records (delivery counts) came meanwhile: they wait for the next commit (or the lazy
            # timer) rather than cost a write and an fsync of their own, with the wake-ups that go with them;
            # else every group's deliveries would make one more group, and that group's deliveries another
            self._lazy_timer = self._loop.call_later(LAZY_FLUSH_S, self._lazy_flush)

    def _cancel_lazy_timer(self) -> None:
        """Loop: no pending delivery count needs the lazy timer any more (a quiet broker wakes less)."""
        if self._lazy_timer is not None and not self._pending:
            self._lazy_timer.cancel()
            self._lazy_timer = None

    def _flushed(self, after_failure: bool = False) -> None:
        """Loop: nothing is pending or being written any more."""
        flusher, self._flusher = self._flusher, None
        if flusher is not None and not flusher.done():
            flusher.set_result(None)
        if not after_failure and self.fsync_policy == "interval" and self._unsynced and not self._closed:
            self._loop.call_later(self.fsync_interval_s, self._interval_fsync)

    def _interval_fsync(self) -> None:
        if self._unsynced and self._flusher is None and self._failure is None and not self._closed:
            self._flusher = asyncio.get_running_loop().create_task(self._sync_only())

    async def _sync_only(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._write, [], True)
        except OSError as exc:
            self._fail(exc, None)
        finally:
            self._flusher = None
        if self._pending:
            with self._hand_lock:
                self._token()

    def _write(self, batch: list[tuple[int, int, bytearray]], sync: bool) -> None:
        """Writer thread: write each buffer at its place in its segment file (a new segment's file is created
        with its space preallocated, and the segment before it sealed); fsync if asked (and the directory for
        new files)."""
        fs, new_files, ends = self.fs, False, self._file_ends
        before: list[tuple[str, int | None]] = []  # (path, end before this batch; None: the file is new)
        try:
            for segment, pos, data in batch:
                if not data:
                    continue
                path = self._path(segment)
                end = ends.get(segment)
                if end is None and pos == 0:  # a new segment
                    self._seal(segment - 1)
                    before.append((path, None))
                    new_files = True
                elif end != pos:  # a bug; writing anyway would leave a gap recovery reports as corruption
                    raise RuntimeError(f"{path}: bytes for position {pos}, but its written bytes end at {end}")
                else:
                    before.append((path, end))
                if pos + len(data) > self._reserved.get(segment, 0):
                    self._reserve(segment, pos + len(data))
                fs.write_at(path, pos, data)
                ends[segment] = pos + len(data)
                self._unsynced.add(segment)
                self._stats.bytes_written += len(data)
            self._sync(sync, new_files)
        except OSError:
            self._undo(before)
            raise

    def _reserve(self, segment: int, need: int) -> None:
        """Writer thread: reserve the segment's file space for `need` bytes and RESERVE_BYTES more (up to the
        segment's size), so most group commits change neither its size nor its allocation (a cheaper sync).
        Best effort: where the file system refuses, the file grows as it is written."""
        size = max(need, min(need + RESERVE_BYTES, self.segment_max_bytes))
        self._reserved[segment] = size
        with contextlib.suppress(OSError):
            self.fs.preallocate(self._path(segment), size)

    def _seal(self, segment: int) -> None:
        """Writer thread: cut a segment's file to its written bytes (its unused preallocated zeros go) and make
        that durable before the next segment's file exists; a sealed segment's size is then its end."""
        end = self._file_ends.pop(segment, None)
        self._reserved.pop(segment, None)
        if end is not None:
            self.fs.truncate(self._path(segment), end)
            self.fs.fsync(self._path(segment))

    def _undo(self, before: list[tuple[str, int | None]]) -> None:
        """Best effort after a failed write or fsync: cut the failed group's bytes off again, so a restart does
        not replay publishes that were rejected. If this fails too, recovery may replay them (at-least-once)."""
        fs = self.fs
        self._file_ends.clear()  # the store is read-only from now on: nothing is written after this
        self._reserved.clear()
        try:
            for path, size in reversed(before):
                if size is None:
                    if fs.exists(path):
                        with self._files_lock:
                            fs.unlink(path)
                else:
                    fs.truncate(path, size)
                    fs.fsync(path)
            fs.fsync_dir(self.directory)
        except OSError:
            pass

    def _sync(self, sync: bool, new_files: bool) -> None:
        fs = self.fs
        if sync and self._unsynced:
            started = time.perf_counter()
            for segment in sorted(self._unsynced):
                if segment in self._segments:
                    fs.fsync(self._path(segment))
            if new_files:
                fs.fsync_dir(self.directory)
            self._unsynced.clear()
            self._last_fsync = time.monotonic()
            self._stats.observe_fsync(time.perf_counter() - started)

    def _fail(self, exc: OSError, group: asyncio.Future | None) -> None:
        where = exc.filename or self.directory
        if exc.errno == errno.ENOSPC:
            error: Exception = StorageFull(f"disk full writing {where}: nothing more is confirmed")
        else:
            error = StorageFailed(f"{where}: {exc.strerror or exc} (errno {exc.errno}); the log is now read-only")
        self._failure = error
        self._stats.read_only = True
        with self._hand_lock:
            pending_group, self._group = self._group, None
            self._pending = []
            self._open_frame = None
        for future in (group, pending_group):
            if future is not None and not future.done():
                future.set_exception(error)
                future.exception()  # seen: its publishers get it; nobody else must be warned

    async def flush(self) -> None:
        """Wait until everything appended so far is written (and fsynced under `always`)."""
        while self._flusher is not None:
            await asyncio.shield(self._flusher)
        if self._failure is not None:
            raise self._failure

    # -- reads ------------------------------------------------------------------------------------------------

    def read_cached(self, ref: int) -> bytes | None:
        starts = self._cache_starts
        i = bisect_right(starts, ref) - 1
        if i < 0:
            return None
        start = starts[i]
        return record_in_batch(self._cache[start], ref - start - BATCH_SIZE)

    async def read(self, refs: Sequence[int]) -> list[bytes]:
        result: list[bytes | None] = [self.read_cached(ref) for ref in refs]
        missing = [i for i, payload in enumerate(result) if payload is None]
        if missing:
            wanted = [refs[i] for i in missing]
            # the read holds what it reads until it is done: meanwhile the holder may let go (compaction moves an
            # entry being delivered to a copy of its record) and a checkpoint must not delete the segment under it
            for ref in wanted:
                self.track(ref)
            try:
                newest = max(wanted)
                while newest >= self._written_ref and self._flusher is not None and self._failure is None:
                    # only bytes not yet written are waited for (never the writer's whole backlog); a failure here
                    # concerns writes, and reads of what is on disk go on
                    with contextlib.suppress(StorageFailed, StorageFull):
                        await asyncio.shield(self._flusher)
                loop = asyncio.get_running_loop()
                found = await loop.run_in_executor(self._reader, self._read_many, wanted)
            finally:
                for ref in wanted:
                    self.release(ref)
            for i, payload in zip(missing, found, strict=True):
                result[i] = payload
        return result

    def _read_many(self, refs: list[int]) -> list[bytes]:
        """Reader thread: the payloads of `refs` (all written), records near each other in one pread."""
        found: dict[int, bytes] = {}
        ordered = sorted(set(refs))
        with self._files_lock:  # no segment file is unlinked (and its fd closed) under a read
            start = 0
            while start < len(ordered):
                first = ordered[start]
                end = start + 1
                while (
                    end < len(ordered)
                    and ordered[end] >> 32 == first >> 32
                    and ordered[end] - ordered[end - 1] <= READ_GAP_BYTES
                    and ordered[end] - first <= READ_SPAN_BYTES
                ):
                    end += 1
                if first >> 32 in self._format1:
                    self._read_span_format1(ordered[start:end], found)
                else:
                    self._read_span(ordered[start:end], found)
                start = end
        return [found[ref] for ref in refs]

    def _segment_path(self, ref: int) -> str:
        segment = ref >> 32
        path = self._path(segment)
        if segment not in self._segments:  # deleted (its records were all released): never recreate the file
            raise StorageCorrupt(f"{path} at {ref & MASK}: read of a deleted segment")
        return path

    def _read_span(self, refs: list[int], found: dict[int, bytes]) -> None:
        """Read records of one format-2 segment, in ascending order: one pread for the span, plus one for each
        frame that starts before it or ends after it; every frame is checked against its crc."""
        path = self._segment_path(refs[0])
        base = refs[0] & MASK
        data = self.fs.pread(path, base, (refs[-1] & MASK) - base + RECORD_SIZE + READ_TAIL_BYTES)
        frames: dict[int, tuple[int, memoryview] | None] = {}  # frame pos -> (its pos, its bytes) once checked
        for ref in refs:
            pos = ref & MASK
            at = pos - base
            inside = at + RECORD_SIZE <= len(data)
            head = data[at : at + RECORD_SIZE] if inside else self.fs.pread(path, pos, RECORD_SIZE)
            back = RECORD.unpack(head)[2] if len(head) == RECORD_SIZE else pos + 1
            frame_pos = pos - back
            if frame_pos not in frames:
                frames[frame_pos] = self._frame(path, data, base, frame_pos) if frame_pos >= 0 else None
            frame = frames[frame_pos]
            payload = None if frame is None else record_in_batch(frame, pos - frame_pos - BATCH_SIZE)
            if payload is None:
                raise StorageCorrupt(f"{path} at {max(frame_pos, 0)}: record fails its length or checksum")
            found[ref] = payload

    def _frame(self, path: str, data: bytes, base: int, pos: int) -> memoryview | None:
        """The records of the batch frame at `pos` (from `data`, read at `base`, where it lies in it), if it
        passes its crc; else None."""
        at = pos - base
        if at < 0 or at + BATCH_SIZE > len(data):
            data, at = self.fs.pread(path, pos, BATCH_SIZE), 0
            if len(data) < BATCH_SIZE:
                return None
        length = BATCH.unpack_from(data, at)[0]
        end = at + BATCH_SIZE + length
        if length > MAX_PAYLOAD:
            return None
        if end > len(data):  # the frame goes on past what was read
            data, at = data[at:] + self.fs.pread(path, pos + len(data) - at, end - len(data)), 0
        decoded = decode_batch(data, at)
        if decoded is None:
            return None
        return memoryview(data)[at + BATCH_SIZE : decoded[1]]

    def _read_span_format1(self, refs: list[int], found: dict[int, bytes]) -> None:
        """Read records of one format-1 segment, in ascending order, with one pread (plus one per record it cut
        short)."""
        path = self._segment_path(refs[0])
        base = refs[0] & MASK
        data = self.fs.pread(path, base, (refs[-1] & MASK) - base + FRAME_SIZE + READ_TAIL_BYTES)
        for ref in refs:
            at = (ref & MASK) - base
            frame = decode_frame(data, at)
            if frame is None:  # cut short by the span (or damaged): read this record alone
                head = self.fs.pread(path, base + at, FRAME_SIZE)
                length = int.from_bytes(head[:4], "little") if len(head) == FRAME_SIZE else 0
                frame = decode_frame(head + self.fs.pread(path, base + at + FRAME_SIZE, length), 0)
                if frame is None:
                    raise StorageCorrupt(f"{path} at {base + at}: record fails its length or checksum")
            found[ref] = bytes(frame[1])

    def _trim_cache(self) -> None:
        """Drop the oldest cached frames (the lowest refs: the cache holds appended frames in order) down to
        CACHE_TRIM of the limit, in one go."""
        cache, starts, target = self._cache, self._cache_starts, self.cache_max_bytes * CACHE_TRIM
        dropped, freed = 0, 0
        for start in starts:
            if self._cache_bytes - freed <= target:
                break
            freed += len(cache.pop(start)) + CACHE_ITEM_BYTES
            dropped += 1
        del starts[:dropped]
        self._cache_bytes -= freed

    # -- live references and space ----------------------------------------------------------------------------

    def track(self, ref: int, count: int = 1) -> None:
        info = self._segments.get(ref >> 32)
        if info is not None:
            info[2] += count

    def release(self, ref: int, count: int = 1) -> None:
        info = self._segments.get(ref >> 32)
        if info is not None:
            info[2] -= count
        # the body stays cached: another holder (a fan-out subscription) may still read it; the cache is bounded

    def track_many(self, refs: Sequence[int]) -> None:
        self._count_many(refs, 1)

    def release_many(self, refs: Sequence[int]) -> None:
        self._count_many(refs, -1)

    def _count_many(self, refs: Sequence[int], step: int) -> None:
        """`track` (step 1) or `release` (step -1) each of `refs`, without a call each."""
        segments = self._segments
        if len(refs) > 2:
            segment = min(refs) >> 32
            if max(refs) >> 32 == segment:  # the common case: a batch of one segment counts in one step
                info = segments.get(segment)
                if info is not None:
                    info[2] += step * len(refs)
                return
        for ref in refs:
            info = segments.get(ref >> 32)
            if info is not None:
                info[2] += step

    def sparse_segments(self) -> Callable[[int], bool]:
        covered = self._checkpoint_at[0]
        sparse = {
            segment
            for segment, (_, records, live) in self._segments.items()
            if segment < covered
            and segment != self._active
            and live > 0
            and (live < records * SPARSE_FRACTION or segment in self._format1)  # format 1 is upgraded
        }
        return lambda ref: (ref >> 32) in sparse

    # -- checkpoint and close ---------------------------------------------------------------------------------

    async def checkpoint(self, snapshot: SnapshotData, at: ReplayPoint | None = None) -> None:
        """As `Store.checkpoint`; with `at` (from `replay_point`), `snapshot` stands for the state at that earlier
        position, and recovery replays the log from there."""
        if self._failure is not None:
            raise StorageReadOnly(f"the log is read-only after an earlier failure: {self._failure}")
        with self._hand_lock:
            position = (self._active, self._active_size) if at is None else at.position
            self._open_frame = None  # the position is a frame boundary: a later append must not grow the frame
            if self._pending:  # before it; a group, so that lazy records pending behind one being written go too
                self._token()
        await self.flush()
        loop = asyncio.get_running_loop()
        if at is None:
            counts = {segment: info[1] for segment, info in self._segments.items() if segment <= position[0]}
        else:
            counts = at.counts
        try:
            # the writer thread makes the segments durable up to `position` (at once under `always`); the file
            # of the checkpoint, megabytes with its fsyncs, is written on its own thread, so group commits go on
            await loop.run_in_executor(self._executor, self._sync_for_checkpoint)
            await loop.run_in_executor(self._checkpointer, self._store_checkpoint, position, counts, snapshot)
        except OSError as exc:
            self._fail(exc, None)
            raise self._failure from None
        self._checkpoint_at = position
        dead = [s for s, info in self._segments.items() if s < position[0] and info[2] <= 0 and s != self._active]
        if dead:
            for segment in dead:
                del self._segments[segment]
                self._format1.discard(segment)
            await loop.run_in_executor(self._executor, self._delete, dead)

    def _sync_for_checkpoint(self) -> None:
        """Writer thread: fsync what is written and not yet durable (the `interval` and `never` policies)."""
        fs, directory = self.fs, self.directory
        if self._unsynced:
            for segment in sorted(self._unsynced):
                fs.fsync(self._path(segment))  # the snapshot must never cover records a crash could lose
            fs.fsync_dir(directory)
            self._unsynced.clear()

    def _store_checkpoint(self, position, counts, snapshot: SnapshotData) -> None:
        """Checkpoint thread: write the checkpoint file beside the old one, then put it in its place.

        The file goes to the disk in steps of CHECKPOINT_STEP_BYTES, each synced, with a pause between them: a
        group commit's fsync that lands meanwhile then waits behind one step at most, not behind the whole file
        (on ext4 a log fsync's journal commit waits for the data blocks being written back with it). A snapshot
        in pieces is written piece by piece, never joined (tens of megabytes copied would hold the GIL)."""
        fs, directory = self.fs, self.directory
        tmp = f"{directory}/{CHECKPOINT}.tmp"
        step, written = CHECKPOINT_STEP_BYTES, 0
        for piece in checkpoint_pieces(position, counts, snapshot_pieces(snapshot)):
            view = memoryview(piece)
            while len(view):
                if written and written % step == 0:  # a step is written: sync it, let group commits through
                    fs.fsync(tmp)
                    time.sleep(CHECKPOINT_STEP_PAUSE_S)
                part = view[: step - written % step]  # (steps cross the pieces' boundaries)
                view = view[len(part) :]
                if written:
                    fs.append(tmp, part)
                else:
                    fs.write_file(tmp, part)
                written += len(part)
        fs.fsync(tmp)  # the new checkpoint's bytes are durable before its name replaces the old one
        fs.rename(tmp, f"{directory}/{CHECKPOINT}")
        fs.fsync_dir(directory)  # the rename itself survives a power cut
        self._stats.checkpoint_file_bytes = written

    def _delete(self, segments: list[int]) -> None:
        with self._files_lock:
            for segment in segments:
                self._file_ends.pop(segment, None)
                self._reserved.pop(segment, None)
                self.fs.unlink(self._path(segment))
        self.fs.fsync_dir(self.directory)  # deletions are durable (harmless if lost: recovery skips them)

    async def close(self) -> None:
        if self._closed or not self._opened:
            self._closed = True
            return
        if self._failure is None:
            if self._pending:
                with self._hand_lock:
                    self._token()
            try:
                await self.flush()
                await asyncio.get_running_loop().run_in_executor(self._executor, self._close_clean)
            except (OSError, StorageFailed, StorageFull):
                pass
        self._closed = True
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
        if self._locked:
            self.fs.unlock(f"{self.directory}/{LOCK}")
            self._locked = False
        if self._reader is not None:
            # reads run in order: once this no-op ran, none is left, and the loop never waited on the disk
            await asyncio.get_running_loop().run_in_executor(self._reader, _nothing)
            self._reader.shutdown(wait=True)  # before the files close
        if self._checkpointer is not None:
            self._checkpointer.shutdown(wait=True)  # a checkpoint file being written is finished first
        self.fs.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def _close_clean(self) -> None:
        self._write([], True)
        self._seal(self._active)  # a stopped broker's files hold their records only
        self.fs.write_file(f"{self.directory}/{CLEAN_MARKER}", b"")
        self.fs.fsync(f"{self.directory}/{CLEAN_MARKER}")
        self.fs.fsync_dir(self.directory)

    @property
    def read_only(self) -> bool:
        return self._failure is not None

    def stats(self) -> StoreStats:
        """Counters; `bytes_on_disk` is summed over segments, so call this for reports, not per operation."""
        self._stats.segments = len(self._segments)
        self._stats.bytes_on_disk = sum(info[0] for info in self._segments.values())
        return self._stats

    def replay_point(self) -> ReplayPoint | None:
        """The end of the log now, made a frame boundary, for a checkpoint whose snapshot another process rebuilds
        from the files (chute/_replay_child.py) once `flush` has written what was appended, and which is then
        stored at this position (`checkpoint(snapshot, at=point)`); None if the files are not real ones (a test's
        MemoryFs) or the log is read-only or closed."""
        if not isinstance(self.fs, OsFs) or self._failure is not None or self._closed or not self._opened:
            return None
        with self._hand_lock:
            position = (self._active, self._active_size)
            self._open_frame = None  # a later append must not grow the frame that ends here
            counts = {segment: info[1] for segment, info in self._segments.items() if segment <= position[0]}
        return ReplayPoint(self.directory, position, counts)

    @property
    def bytes_appended(self) -> int:
        """Bytes appended since the store was opened (cheap: for deciding when to checkpoint)."""
        return self._appended


@dataclass(frozen=True)
class ReplayPoint:
    """A position of the log that is a frame boundary, with the records per segment up to it."""

    directory: str
    position: tuple[int, int]
    counts: dict[int, int]

    @property
    def end_ref(self) -> int:
        return self.position[0] << 32 | self.position[1]


class _Writer(Executor):
    """The writer thread: runs its jobs one at a time, in the order given. Group commits are `post`ed (no
    concurrent.futures.Future, and one call back to the loop per group, made by the job itself); other work
    (open, checkpoint syncs, deletions, close) is `submit`ted as to any executor, in the same order."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._stopped = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn, /, *args, **kwargs) -> Future:
        if self._stopped:
            raise RuntimeError("cannot schedule new futures after shutdown")
        future: Future = Future()
        self._jobs.put((future, fn, args, kwargs))
        return future

    def idle(self) -> bool:
        """True if no job waits its turn (called by the running job, on the thread)."""
        return not self._stopped and self._jobs.empty()

    def post(self, fn, *args) -> bool:
        """Run `fn(*args)` on the thread (it reports its own outcome); False if the writer was shut down."""
        if self._stopped:
            return False
        self._jobs.put((None, fn, args, None))
        return True

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if not self._stopped:
            self._stopped = True
            self._jobs.put(None)
        if wait and self._thread is not threading.current_thread():
            self._thread.join()

    def _serve(self) -> None:
        jobs = self._jobs
        while (job := jobs.get()) is not None:
            future, fn, args, kwargs = job
            if future is None:
                with contextlib.suppress(Exception):  # a posted job reports its own outcome; the thread lives on
                    fn(*args)
            elif future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)


def _nothing() -> None:
    pass
