"""Golden bytes: the formats in docs/storage-format.md, pinned so a change to them cannot go unnoticed."""

from __future__ import annotations

import zlib

from chute.storage.file.record import decode_checkpoint, encode_checkpoint, encode_frame, segment_header


def test_segment_header_bytes():
    header = segment_header(1)
    assert header.hex() == "43485554455345470100000001000000000000001cf6ce01"
    assert header[:8] == b"CHUTESEG" and len(header) == 24
    assert int.from_bytes(header[20:], "little") == zlib.crc32(header[:20])


def test_record_frame_bytes():
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
