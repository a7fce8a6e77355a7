"""Recovery of the file store: validate the log after the checkpoint, cut a torn tail, replay records.

Rules (docs/storage-format.md):
- only segments at or after the checkpoint position are read; older ones are kept for their live records.
- a segment's frames end where only zeros follow (space preallocated for frames to come, never a frame: a frame's
  length is never 0), or at the end of its file.
- a frame that fails its length or crc check in the LAST segment, with no valid frame after it, is a torn tail
  (a write cut short by a crash): the file is truncated there and the cut is reported with file and position.
- any other bad frame, or a bad header of a segment that is not the last, is corruption: `StorageCorrupt` names
  the file and position. Nothing is ever skipped silently.
- validation (crc of every frame) runs first and copies no payload; the replay pass then yields one record at a
  time, so recovery never holds the whole tail in memory.
- each segment is read in its own format (its header's version): format-1 record frames or format-2 batch
  frames; a frame is a unit, so a batch is replayed whole or, as a torn tail, not at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from chute.errors import StorageCorrupt
from chute.storage.api import RecoveryReport
from chute.storage.file.fs import Fs
from chute.storage.file.record import SEGMENT_HEADER_SIZE, decode_batch, decode_frame, segment_version

ZERO_SCAN_BYTES = 2**20  # `data_end` looks for the last non-zero byte this many bytes at a time


def segment_name(segment_id: int) -> str:
    return f"{segment_id:020d}.seg"


def segment_ids(fs: Fs, directory: str) -> list[int]:
    return sorted(int(name[:-4]) for name in fs.listdir(directory) if name.endswith(".seg") and name[:-4].isdigit())


@dataclass
class LogShape:
    """What validation learned: each segment's valid end, record count and format version."""

    ends: dict[int, int] = field(default_factory=dict)
    records: dict[int, int] = field(default_factory=dict)
    versions: dict[int, int] = field(default_factory=dict)
    dropped: list[int] = field(default_factory=list)  # segments removed as torn (header never completed)


def validate(
    fs: Fs, directory: str, segments: list[int], start: tuple[int, int], counts: dict[int, int], report: RecoveryReport
) -> LogShape:
    """Check every frame after `start`; truncate a torn tail; raise StorageCorrupt on damage elsewhere."""
    shape = LogShape()
    _check_contiguous(directory, segments, start)
    for index, segment in enumerate(segments):
        path = f"{directory}/{segment_name(segment)}"
        last = index == len(segments) - 1
        if segment < start[0]:  # covered by the checkpoint: only its header is read, for its format
            version = segment_version(fs.pread(path, 0, SEGMENT_HEADER_SIZE), segment)
            if isinstance(version, str):
                raise StorageCorrupt(f"{path} at 0: {version}")
            shape.versions[segment] = version
            shape.ends[segment] = fs.size(path)
            shape.records[segment] = counts.get(segment, 0)
            continue
        data = fs.read_file(path)
        version = segment_version(data, segment)
        if isinstance(version, str):
            if not last:
                raise StorageCorrupt(f"{path} at 0: {version}")
            _cut(report, path, 0, data_end(data))  # (its preallocated zeros are not counted)
            fs.unlink(path)
            shape.dropped.append(segment)
            continue
        pos = start[1] if segment == start[0] else SEGMENT_HEADER_SIZE
        count = counts.get(segment, 0) if segment == start[0] else 0
        if len(data) < pos:  # the checkpoint was stored only after these bytes were fsynced: they were lost since
            raise StorageCorrupt(f"{path} at {len(data)}: the checkpoint covers this segment up to {pos}")
        shape.versions[segment] = version
        end = data_end(data)  # (a frame may end in zeros, past `end`: its length says so)
        while pos < end:
            found = _records(data, pos, version)
            if found is None:
                if not last or _valid_frame_after(data, pos, end, version):
                    raise StorageCorrupt(f"{path} at {pos}: record fails its length or checksum")
                _cut(report, path, pos, end - pos)
                fs.truncate(path, pos)
                fs.fsync(path)
                break
            count += len(found[0])
            pos = found[1]
        shape.ends[segment] = pos
        shape.records[segment] = count
    report.segments = len(shape.ends)
    return shape


def _check_contiguous(directory: str, segments: list[int], start: tuple[int, int]) -> None:
    """From the checkpoint's segment on, segment ids run without a gap: a missing file there lost records."""
    if not segments:
        if start != (0, 0):
            raise StorageCorrupt(f"{directory}/{segment_name(start[0])} at 0: the checkpoint's segment is missing")
        return
    later = [s for s in segments if s >= start[0]]
    if start != (0, 0) and (not later or later[0] != start[0]):
        raise StorageCorrupt(f"{directory}/{segment_name(start[0])} at 0: the checkpoint's segment is missing")
    for before, after in zip(later, later[1:]):
        if after != before + 1:
            raise StorageCorrupt(
                f"{directory}/{segment_name(before + 1)} at 0: missing between {segment_name(before)} and "
                f"{segment_name(after)}"
            )


def _cut(report: RecoveryReport, path: str, pos: int, size: int) -> None:
    report.truncated_at = (path, pos)
    report.truncated_bytes = size
    report.problems.append(f"torn tail: cut {size} bytes of {path} at {pos}")


def _records(data, pos: int, version: int) -> tuple[list[tuple[int, int, memoryview]], int] | None:
    """The records of the frame at `pos` of a segment of format `version`, and where the next frame starts; None
    if the frame is cut short or damaged."""
    if version == 1:
        frame = decode_frame(data, pos)
        return None if frame is None else ([(pos, frame[0], frame[1])], frame[2])
    return decode_batch(data, pos)


def data_end(data: bytes) -> int:
    """The length of `data` without the zeros at its end."""
    end = len(data)
    while end:
        start = max(0, end - ZERO_SCAN_BYTES)
        kept = len(data[start:end].rstrip(b"\0"))
        if kept:
            return start + kept
        end = start
    return 0


def _valid_frame_after(data: bytes, pos: int, end: int, version: int) -> bool:
    """True if some valid frame starts after `pos` (and before `end`, where only zeros follow): then the bad
    frame is damage, not a torn tail."""
    for candidate in range(pos + 1, end):
        if _records(data, candidate, version) is not None:
            return True
    return False


def replay(
    fs: Fs, directory: str, shape: LogShape, start: tuple[int, int], report: RecoveryReport
) -> Iterator[tuple[int, int, bytes]]:
    """Yield (ref, kind, payload) for every record after `start`, in order (validated already)."""
    for segment in sorted(shape.ends):
        if segment < start[0]:
            continue
        path = f"{directory}/{segment_name(segment)}"
        data = fs.read_file(path)
        pos = start[1] if segment == start[0] else SEGMENT_HEADER_SIZE
        end = shape.ends[segment]
        base = segment << 32
        version = shape.versions[segment]
        while pos < end:
            records, pos = _records(data, pos, version)
            for at, kind, payload in records:
                yield base | at, kind, bytes(payload)
                report.records += 1
            del records
        del data
