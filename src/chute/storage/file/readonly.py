"""Reading a live data directory without changing it: the checkpoint and the records up to a given position.

A checkpoint's snapshot can be built by another process from the files alone (chute/_replay_child.py): the
state at position P is the stored checkpoint plus the records after it and before P, replayed as recovery
replays them. The broker keeps appending meanwhile, so this reader differs from recovery (recovery.py) on purpose:
- it never writes: no torn tail is cut, no marker removed, no lock taken (the broker holds the lock);
- it stops at P: records at or after P are left out, even inside a frame that holds records on both sides (a
  group's frame takes later records until it is handed to the writer);
- anything it cannot read is an error (StorageCorrupt): every frame before P was written before the reader
  started, so a bad one is damage, never a tail being written.

Invariant: the caller makes sure the records before P are written (the store's `flush`) and that no checkpoint
is stored and no segment deleted while it reads (the broker's checkpoint lock).
"""

from __future__ import annotations

from collections.abc import Iterator

from chute.errors import StorageCorrupt
from chute.storage.file.fs import Fs
from chute.storage.file.record import SEGMENT_HEADER_SIZE, decode_checkpoint, segment_version
from chute.storage.file.recovery import _check_contiguous, _records, data_end, segment_ids, segment_name

CHECKPOINT = "checkpoint"  # (log.CHECKPOINT: the file store's name for it)


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
        data = fs.read_file(path)
        version = segment_version(data[:SEGMENT_HEADER_SIZE], segment)
        if isinstance(version, str):
            raise StorageCorrupt(f"{path} at 0: {version}")
        base = segment << 32
        last = segment == end_ref >> 32
        limit = (end_ref & 0xFFFFFFFF) if last else data_end(data)
        pos = start[1] if segment == start[0] else SEGMENT_HEADER_SIZE
        while pos < limit:
            found = _records(data, pos, version)
            if found is None:
                raise StorageCorrupt(f"{path} at {pos}: a frame before the position asked for cannot be read")
            records, pos = found
            for at, kind, payload in records:
                if base | at >= end_ref:
                    return
                yield base | at, kind, bytes(payload)
        del data
