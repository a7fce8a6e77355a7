"""Byte formats of the file store: segment header, record frame, checkpoint file (see docs/storage-format.md).

Segment file `<id:020d>.seg`:

    0        8        10       12                20       24
    +--------+--------+--------+-----------------+--------+
    | magic  | version| zero   | segment id u64  | crc32  |   then record frames, back to back
    +--------+--------+--------+-----------------+--------+

Batch frame (format version 2; little-endian): every `append` call writes one, with all its records:

    0            4            8
    +------------+------------+---------------------------------------------------+
    | length u32 | crc32 u32  | record, record, ...  (length bytes, crc32 over them) |
    +------------+------------+---------------------------------------------------+
    record:  | kind u8 | length u32 | back u32 | payload |   back = this record's distance from its frame's start

A record's ref is the position of its record header; `back` leads from it to the frame, whose crc a read checks.

Record frame (format version 1, still read; segments written before format 2 hold these):

    0            4            8      9
    +------------+------------+------+-----------------+
    | length u32 | crc32 u32  | kind | payload         |   length = len(payload);
    +------------+------------+------+-----------------+   crc32 over kind byte + payload

Checkpoint file `checkpoint`:

    +--------+---------+------+--------+--------+----------+--------------+----------+-------+---------+
    | magic  | version | zero | seg u64| pos u64| count u32| snapshot len | crc32    | table | snapshot|
    |  8     |   u16   | u16  |        |        |          |    u64       | u32      |       |         |
    +--------+---------+------+--------+--------+----------+--------------+----------+-------+---------+
    table = count x (segment id u64, records u32): records written to each sealed segment; crc32 covers the
    header fields before it, the table and the snapshot.

Invariant: every decoder here checks lengths before slicing and returns None (or raises ValueError) on bad bytes;
it never returns a frame whose crc does not match.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

SEGMENT_MAGIC = b"CHUTESEG"
CHECKPOINT_MAGIC = b"CHUTECKP"
VERSION = 2  # the format of segments written now (batch frames)
VERSIONS = (1, 2)  # the formats read: a format-1 segment is read as it is and compacted away (storage-format.md)
CHECKPOINT_VERSION = 1  # the checkpoint file's own format did not change with segment format 2

SEGMENT_HEADER = struct.Struct("<8sHHQ")  # + u32 crc
SEGMENT_HEADER_SIZE = SEGMENT_HEADER.size + 4
FRAME = struct.Struct("<IIB")  # format 1's record frame
FRAME_SIZE = FRAME.size
BATCH = struct.Struct("<II")  # format 2's batch frame header: length, crc32 of the records after it
BATCH_SIZE = BATCH.size
RECORD = struct.Struct("<BII")  # format 2's record header: kind, payload length, distance back to the frame
RECORD_SIZE = RECORD.size
MAX_PAYLOAD = 256 * 2**20  # far above any message (1 MiB default) or snapshot chunk; bounds a garbage length
CHECKPOINT_HEADER = struct.Struct("<8sHHQQIQ")  # + u32 crc
CHECKPOINT_HEADER_SIZE = CHECKPOINT_HEADER.size + 4
TABLE_ITEM = struct.Struct("<QI")
_KIND_BYTES = [bytes([k]) for k in range(256)]
KIND_CRC = [zlib.crc32(b) for b in _KIND_BYTES]  # crc32 of the kind byte: a frame's crc continues from it


def segment_header(segment_id: int, version: int = VERSION) -> bytes:
    head = SEGMENT_HEADER.pack(SEGMENT_MAGIC, version, 0, segment_id)
    return head + struct.pack("<I", zlib.crc32(head))


def segment_version(data: bytes, segment_id: int) -> int | str:
    """The format version of the segment whose file starts with `data`, or what is wrong with its header."""
    if len(data) < SEGMENT_HEADER_SIZE:
        return "segment header is cut short"
    head = data[: SEGMENT_HEADER.size]
    magic, version, _, found_id = SEGMENT_HEADER.unpack(head)
    (crc,) = struct.unpack_from("<I", data, SEGMENT_HEADER.size)
    if magic != SEGMENT_MAGIC or zlib.crc32(head) != crc:
        return "segment header is damaged"
    if version not in VERSIONS:
        return f"segment format version {version} is not supported (this Chute reads {VERSIONS})"
    if found_id != segment_id:
        return f"segment header names segment {found_id}"
    return version


def check_segment_header(data: bytes, segment_id: int) -> str | None:
    """None if `data` starts with a valid header for `segment_id` (of a format this Chute reads), else what is
    wrong."""
    found = segment_version(data, segment_id)
    return found if isinstance(found, str) else None


def encode_frame(out: bytearray, kind: int, payload: bytes) -> int:
    """Append one frame to `out`; return its size."""
    crc = zlib.crc32(payload, KIND_CRC[kind])
    out += FRAME.pack(len(payload), crc, kind)
    out += payload
    return FRAME_SIZE + len(payload)


def decode_frame(data, pos: int) -> tuple[int, memoryview, int] | None:
    """(kind, payload view, next pos) of the frame at `pos`, or None if it is cut short or fails its crc."""
    if pos + FRAME_SIZE > len(data):
        return None
    length, crc, kind = FRAME.unpack_from(data, pos)
    end = pos + FRAME_SIZE + length
    if length > MAX_PAYLOAD or end > len(data) or kind == 0:
        return None
    payload = memoryview(data)[pos + FRAME_SIZE : end]
    if zlib.crc32(payload, KIND_CRC[kind]) != crc:
        return None
    return kind, payload, end


def encode_records(out: bytearray, records, at: int, frame_pos: int) -> list[int]:
    """Append format-2 records to `out`, the first at file position `at` of a frame starting at `frame_pos`;
    return their positions. The frame's header must then be (re)written with the new length and crc."""
    positions = []
    pack = RECORD.pack
    for kind, payload in records:
        length = len(payload)
        positions.append(at)
        out += pack(kind, length, at - frame_pos)
        out += payload
        at += RECORD_SIZE + length
    return positions


def encode_batch(out: bytearray, records, pos: int) -> list[int]:
    """Append one batch frame holding `records` ((kind, payload) pairs, at least one) to `out`, the frame
    starting at file position `pos`; return the position of each record (its ref within the segment)."""
    frame_at = len(out)
    out += bytes(BATCH_SIZE)  # filled in once the records' crc is known
    positions = encode_records(out, records, pos + BATCH_SIZE, pos)
    body = memoryview(out)[frame_at + BATCH_SIZE :]
    BATCH.pack_into(out, frame_at, len(body), zlib.crc32(body))
    body.release()
    return positions


def decode_batch(data, pos: int) -> tuple[list[tuple[int, int, memoryview]], int] | None:
    """([(position, kind, payload view), ...], next pos) of the batch frame at `pos`, or None if it is cut short,
    fails its crc or its records do not exactly fill it."""
    if pos + BATCH_SIZE > len(data):
        return None
    length, crc = BATCH.unpack_from(data, pos)
    start, end = pos + BATCH_SIZE, pos + BATCH_SIZE + length
    if length < RECORD_SIZE or length > MAX_PAYLOAD or end > len(data):
        return None  # (an all-zero region is never a frame: its length is 0)
    view = memoryview(data)
    if zlib.crc32(view[start:end]) != crc:
        return None
    records = []
    at = start
    while at < end:
        if at + RECORD_SIZE > end:
            return None
        kind, size, back = RECORD.unpack_from(data, at)
        stop = at + RECORD_SIZE + size
        if kind == 0 or back != at - pos or stop > end:
            return None
        records.append((at, kind, view[at + RECORD_SIZE : stop]))
        at = stop
    return records, end


def record_in_batch(body, at: int) -> bytes | None:
    """The payload of the record at offset `at` of a batch frame's records (`body`, verified already), or None
    if no record starts there."""
    if at < 0 or at + RECORD_SIZE > len(body):
        return None
    kind, length, back = RECORD.unpack_from(body, at)
    if kind == 0 or back != at + BATCH_SIZE or at + RECORD_SIZE + length > len(body):
        return None
    return bytes(body[at + RECORD_SIZE : at + RECORD_SIZE + length])  # (a record is small: two copies beat a view)


def encode_checkpoint(position: tuple[int, int], records_per_segment: dict[int, int], snapshot: bytes) -> bytes:
    return b"".join(checkpoint_pieces(position, records_per_segment, [snapshot]))


def checkpoint_pieces(position: tuple[int, int], records_per_segment: dict[int, int], snapshot: Sequence) -> list:
    """The checkpoint file's bytes in pieces: its header, checksum and table as one, then the snapshot's own
    pieces as they are (a large snapshot is never copied into one buffer; the checksum is chained over the
    pieces, and zlib computes it without the GIL)."""
    table = b"".join(TABLE_ITEM.pack(seg, count) for seg, count in sorted(records_per_segment.items()))
    length = sum(len(piece) for piece in snapshot)
    head = CHECKPOINT_HEADER.pack(
        CHECKPOINT_MAGIC, CHECKPOINT_VERSION, 0, position[0], position[1], len(records_per_segment), length
    )
    crc = zlib.crc32(table, zlib.crc32(head))
    for piece in snapshot:
        crc = zlib.crc32(piece, crc)
    return [head + struct.pack("<I", crc) + table, *snapshot]


def decode_checkpoint(data: bytes) -> tuple[tuple[int, int], dict[int, int], bytes]:
    """(position, records per segment, snapshot); ValueError if anything does not check out."""
    if len(data) < CHECKPOINT_HEADER_SIZE:
        raise ValueError("checkpoint is cut short")
    magic, version, _, seg, pos, count, length = CHECKPOINT_HEADER.unpack_from(data, 0)
    if magic != CHECKPOINT_MAGIC:
        raise ValueError("not a checkpoint file")
    if version != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint format version {version} is not supported")
    (crc,) = struct.unpack_from("<I", data, CHECKPOINT_HEADER.size)
    table_end = CHECKPOINT_HEADER_SIZE + count * TABLE_ITEM.size
    if table_end + length != len(data):
        raise ValueError("checkpoint length does not match its header")
    table, snapshot = data[CHECKPOINT_HEADER_SIZE:table_end], data[table_end:]
    if zlib.crc32(snapshot, zlib.crc32(table, zlib.crc32(data[: CHECKPOINT_HEADER.size]))) != crc:
        raise ValueError("checkpoint failed its checksum")
    counts = dict(TABLE_ITEM.iter_unpack(table))
    return (seg, pos), counts, snapshot
