"""Golden bytes: the formats in docs/storage-format.md, pinned so a change to them cannot go unnoticed."""

from __future__ import annotations

import zlib

from chute.storage.file.record import (
    decode_batch,
    decode_checkpoint,
    encode_batch,
    encode_checkpoint,
    encode_frame,
    segment_header,
    segment_version,
)


def test_segment_header_bytes():
    header = segment_header(1)
    assert header.hex() == "4348555445534547020000000100000000000000ec245076"  # format 2
    assert header[:8] == b"CHUTESEG" and len(header) == 24
    assert int.from_bytes(header[20:], "little") == zlib.crc32(header[:20])
    assert segment_version(header, 1) == 2


def test_format_1_segment_header_bytes_are_still_read():
    header = segment_header(1, version=1)
    assert header.hex() == "43485554455345470100000001000000000000001cf6ce01"
    assert segment_version(header, 1) == 1
    assert "not supported" in segment_version(segment_header(1, version=3), 1)


def test_batch_frame_bytes():
    out = bytearray()
    assert encode_batch(out, [(1, b"hi"), (3, b"")], 24) == [32, 43]  # records' positions: refs in the segment
    # length 20 | crc32 of the records | kind 1, length 2, back 8, "hi" | kind 3, length 0, back 19
    assert out.hex() == "14000000" "cef64b6d" "01" "02000000" "08000000" "6869" "03" "00000000" "13000000"
    assert int.from_bytes(out[4:8], "little") == zlib.crc32(bytes(out[8:]))
    records, end = decode_batch(bytes(out), 0)
    assert [(at, kind, bytes(p)) for at, kind, p in records] == [(8, 1, b"hi"), (19, 3, b"")] and end == 28


def test_format_1_record_frame_bytes():
    frame = bytearray()
    encode_frame(frame, 1, b"hi")
    # length 2 | crc32(b"\x01hi") | kind 1 | payload
    assert frame.hex() == "02000000" + zlib.crc32(b"\x01hi").to_bytes(4, "little").hex() + "01" + b"hi".hex()
    assert frame.hex() == "02000000768bc967016869"


def test_checkpoint_bytes_round_trip():
    data = encode_checkpoint((1, 24), {1: 2}, b"S")
    assert data.hex() == (
        "4348555445434b50" "0100" "0000" "0100000000000000" "1800000000000000" "01000000" "0100000000000000"
        "c9d91f4a" "0100000000000000" "02000000" "53"
    )  # fmt: skip
    assert decode_checkpoint(data) == ((1, 24), {1: 2}, b"S")
