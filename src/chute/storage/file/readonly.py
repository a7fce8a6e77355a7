"""Reading a live data directory without changing it: the checkpoint and the records up to a given position.

A checkpoint's snapshot can be built by another process from the files alone (chute/_replay_child.py): the
state at position P is the stored checkpoint plus the records after it and before P, replayed as recovery
replays them. The broker keeps appending meanwhile, so this reader differs from recovery (recovery.py) on purpose:
- it never writes: no torn tail is cut, no marker removed, no lock taken (the broker holds the lock);
- it stops at P: records at or after P are left out, even inside a frame that holds records on both sides (a
  group's frame takes later records until it is handed to the writer);
- anything it cannot read is an error (StorageCorrupt): every frame before P was written before the reader
  started, so a bad one is damage, never a tail being written;
- it reads a segment a window at a time (WINDOW_BYTES, or one frame if that is larger), not whole: the reader
  runs beside the broker, and a whole 64 MiB segment was most of its memory.

Invariant: the caller makes sure the records before P are written (the store's `flush`) and that no checkpoint
is stored and no segment deleted while it reads (the broker's checkpoint lock).
"""

from __future__ import annotations

from collections.abc import Iterator

from chute.errors import StorageCorrupt
from chute.storage.file.fs import Fs
from chute.storage.file.record import (
    BATCH_SIZE,
    FRAME_SIZE,
    MAX_PAYLOAD,
    SEGMENT_HEADER_SIZE,
    decode_checkpoint,
    segment_version,
)
from chute.storage.file.recovery import _check_contiguous, _records, segment_ids, segment_name

CHECKPOINT = "checkpoint"  # (log.CHECKPOINT: the file store's name for it)
WINDOW_BYTES = 4 * 2**20  # what the reader holds of a segment at a time (a segment is 64 MiB)


def checkpoint_and_records(
    fs: Fs, directory: str, end_ref: int
) -> tuple[bytes | None, Iterator[tuple[int, int, bytes]]]:
    """(the stored checkpoint's snapshot or None, the records after its position and before `end_ref`)."""
    segments = segment_ids(fs, directory)
    start = (segments[0], SEGMENT_HEADER_SIZE) if segments else (0, 0)
    snapshot = None
    path = f"{directory}/{CHECKPOINT}"
    if fs.exists(path):
        try:
            start, _, snapshot = decode_checkpoint(fs.read_file(path))
        except ValueError as exc:
            raise StorageCorrupt(f"{path} at 0: {exc}") from None
    end = (end_ref >> 32, end_ref & 0xFFFFFFFF)
    if start > end:
        raise StorageCorrupt(f"{path}: its position {start} is after the one asked for, {end}")
    _check_contiguous(directory, segments, start)
    wanted = [s for s in segments if start[0] <= s <= end[0]]
    if end[1] > SEGMENT_HEADER_SIZE and (not wanted or wanted[-1] != end[0]):
        raise StorageCorrupt(f"{directory}/{segment_name(end[0])} at 0: missing")
    return snapshot, _records_between(fs, directory, wanted, start, end_ref)


def _records_between(
    fs: Fs, directory: str, segments: list[int], start: tuple[int, int], end_ref: int
) -> Iterator[tuple[int, int, bytes]]:
    for segment in segments:
        path = f"{directory}/{segment_name(segment)}"
        version = segment_version(fs.pread(path, 0, SEGMENT_HEADER_SIZE), segment)
        if isinstance(version, str):
            raise StorageCorrupt(f"{path} at 0: {version}")
        pos = start[1] if segment == start[0] else SEGMENT_HEADER_SIZE
        if not (yield from _segment_records(fs, path, segment, version, pos, end_ref)):
            return


def _segment_records(fs: Fs, path: str, segment: int, version: int, pos: int, end_ref: int):
    """Yield the records of one segment from `pos`, reading it WINDOW_BYTES at a time (a frame larger than that
    in one read of its own); return False once a record at or after `end_ref` was reached, else True."""
    last = segment == end_ref >> 32
    size = fs.size(path)
    limit = (end_ref & 0xFFFFFFFF) if last else size
    if limit > size:
        raise StorageCorrupt(f"{path} at {size}: the file ends before the position asked for, {limit}")
    header = FRAME_SIZE if version == 1 else BATCH_SIZE  # either begins with the u32 length of what follows it
    base = segment << 32
    # (windows run to the file's end, not to `limit`: a frame may hold records on both sides of the position)
    window_at, window = pos, fs.pread(path, pos, min(WINDOW_BYTES, size - pos)) if pos < limit else b""
    while pos < limit:
        found = _records(window, pos - window_at, version)
        if found is None:
            if window_at != pos:  # the frame may run past the window: read again from its start
                window_at, window = pos, fs.pread(path, pos, min(WINDOW_BYTES, size - pos))
                continue
            length = int.from_bytes(window[:4], "little") if len(window) >= header else 0
            whole = min(header + length, size - pos)
            if 0 < length <= MAX_PAYLOAD and whole > len(window):  # larger than a window: read all of it
                window = fs.pread(path, pos, whole)
                continue
            if not last and _zeros(fs, path, pos, size):
                return True  # a sealed segment's records end here; its reserved space follows
            raise StorageCorrupt(f"{path} at {pos}: a frame before the position asked for cannot be read")
        records, end = found
        for at, kind, payload in records:
            ref = base | (window_at + at)
            if ref >= end_ref:
                return False
            yield ref, kind, bytes(payload)
        pos = window_at + end
    return True


def _zeros(fs: Fs, path: str, pos: int, end: int) -> bool:
    """True if the bytes from `pos` to `end` of the file are all zeros (read a window at a time)."""
    while pos < end:
        window = fs.pread(path, pos, min(WINDOW_BYTES, end - pos))
        if not window or window.strip(b"\0"):
            return False
        pos += len(window)
    return True
