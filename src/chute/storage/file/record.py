"""Byte formats of the file store: segment header, record frame, checkpoint file (see docs/storage-format.md).

Segment file `<id:020d>.seg`:

    0        8        10       12                20       24
    +--------+--------+--------+-----------------+--------+
    | magic  | version| zero   | segment id u64  | crc32  |   then record frames, back to back
    +--------+--------+--------+-----------------+--------+

Record frame (little-endian):

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

SEGMENT_MAGIC = b"CHUTESEG"
CHECKPOINT_MAGIC = b"CHUTECKP"
VERSION = 1

SEGMENT_HEADER = struct.Struct("<8sHHQ")  # + u32 crc
SEGMENT_HEADER_SIZE = SEGMENT_HEADER.size + 4
FRAME = struct.Struct("<IIB")
FRAME_SIZE = FRAME.size
MAX_PAYLOAD = 256 * 2**20  # far above any message (1 MiB default) or snapshot chunk; bounds a garbage length
CHECKPOINT_HEADER = struct.Struct("<8sHHQQIQ")  # + u32 crc
CHECKPOINT_HEADER_SIZE = CHECKPOINT_HEADER.size + 4
TABLE_ITEM = struct.Struct("<QI")
_KIND_BYTES = [bytes([k]) for k in range(256)]
KIND_CRC = [zlib.crc32(b) for b in _KIND_BYTES]  # crc32 of the kind byte: a frame's crc continues from it


def segment_header(segment_id: int) -> bytes:
    head = SEGMENT_HEADER.pack(SEGMENT_MAGIC, VERSION, 0, segment_id)
    return head + struct.pack("<I", zlib.crc32(head))


def check_segment_header(data: bytes, segment_id: int) -> str | None:
    """None if `data` starts with a valid header for `segment_id`, else what is wrong."""
    if len(data) < SEGMENT_HEADER_SIZE:
        return "segment header is cut short"
    head = data[: SEGMENT_HEADER.size]
    magic, version, _, found_id = SEGMENT_HEADER.unpack(head)
    (crc,) = struct.unpack_from("<I", data, SEGMENT_HEADER.size)
    if magic != SEGMENT_MAGIC or zlib.crc32(head) != crc:
        return "segment header is damaged"
    if version != VERSION:
        return f"segment format version {version} is not supported"
    if found_id != segment_id:
        return f"segment header names segment {found_id}"
    return None


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


def encode_checkpoint(position: tuple[int, int], records_per_segment: dict[int, int], snapshot: bytes) -> bytes:
    table = b"".join(TABLE_ITEM.pack(seg, count) for seg, count in sorted(records_per_segment.items()))
    head = CHECKPOINT_HEADER.pack(
        CHECKPOINT_MAGIC, VERSION, 0, position[0], position[1], len(records_per_segment), len(snapshot)
    )
    crc = zlib.crc32(snapshot, zlib.crc32(table, zlib.crc32(head)))
    return head + struct.pack("<I", crc) + table + snapshot


def decode_checkpoint(data: bytes) -> tuple[tuple[int, int], dict[int, int], bytes]:
    """(position, records per segment, snapshot); ValueError if anything does not check out."""
    if len(data) < CHECKPOINT_HEADER_SIZE:
        raise ValueError("checkpoint is cut short")
    magic, version, _, seg, pos, count, length = CHECKPOINT_HEADER.unpack_from(data, 0)
    if magic != CHECKPOINT_MAGIC:
        raise ValueError("not a checkpoint file")
    if version != VERSION:
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
