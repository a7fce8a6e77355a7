"""Torn and corrupted files under a broker: a torn tail is cut and reported, damage elsewhere is StorageCorrupt
naming the file and position, and nothing is ever skipped silently.

The data directories are made by a real broker with small segments (SEGMENT bytes, so a few hundred messages
fill a couple of dozen files) and one explicit checkpoint a third of the way in. Two kinds of directory:
- a crash image: a copy of the directory taken while the broker is still open, right after its last publish
  was confirmed. That is what SIGKILL leaves: no clean-shutdown marker, the last segment's file still holds its
  reserved space (zeros after its frames), and the last two thirds of the log lie after the checkpoint, so
  recovery validates them frame by frame;
- after a clean close: the close checkpoints, so the checkpoint covers the whole log and recovery reads no
  frame before its position (that is what keeps recovery time independent of the history).

Positions are computed by parsing the segment files (tests/crash does not trust the store to locate frames).
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from chute import Broker, Publish
from chute.core import records as rec
from chute.errors import StorageCorrupt
from chute.storage import FileStore
from chute.storage.file.record import (
    BATCH_SIZE,
    RECORD_SIZE,
    SEGMENT_HEADER_SIZE,
    decode_batch,
    decode_checkpoint,
    segment_version,
)

SEGMENT = 2048
MESSAGES = 300
BATCH = 10
CHECKPOINT_AFTER = 100


def body_of(seq: int) -> bytes:
    return b"m%04d:" % seq + b"x" * (40 + seq % 50)


def seq_of(body: bytes) -> int:
    return int(body[1:5])


def open_broker(path: Path) -> Broker:
    return Broker(store=FileStore(path, segment_max_bytes=SEGMENT), checkpoint_bytes=1 << 40)


async def populate(tmp_path: Path, kind: str) -> Path:
    """Publish MESSAGES messages to queue "q"; return a crash image or the directory after a clean close."""
    source = tmp_path / "broker"
    broker = await Broker(
        store=FileStore(source, segment_max_bytes=SEGMENT), checkpoint_bytes=1 << 40, checkpoint_interval_s=3600
    ).start()
    await broker.create_queue("q")
    start = 0
    while start < MESSAGES:  # batches of BATCH (one frame each, or two across a segment's end), the last ten alone
        size = BATCH if start < MESSAGES - BATCH else 1
        await broker.publish_batch("q", [Publish(body=body_of(s)) for s in range(start, start + size)])
        start += size
        if start == CHECKPOINT_AFTER:
            await broker.checkpoint()
    if kind == "crash":
        image = tmp_path / "image"
        shutil.copytree(source, image)  # everything confirmed is in the files: SIGKILL would leave just this
        await broker.close()
        return image
    await broker.close()
    return source


@dataclass
class Frame:
    """A batch frame (format 2): what one append wrote."""

    pos: int
    end: int
    seqs: list[int]  # of its MESSAGE records


def segments(path: Path) -> list[Path]:
    return sorted(path.glob("*.seg"))


def data_end(data: bytes) -> int:
    """Where the zeros at the end of a file begin (space reserved for frames to come, in a running log's file)."""
    return len(data.rstrip(b"\0"))


def frames(segment: Path) -> list[Frame]:
    data = segment.read_bytes()
    assert segment_version(data, int(segment.stem)) == 2, "test setup: a segment of format 2"
    found, pos = [], SEGMENT_HEADER_SIZE
    while pos < data_end(data):  # (a frame may itself end in zeros: it is parsed whole)
        decoded = decode_batch(data, pos)
        assert decoded is not None, f"test setup: {segment} does not parse at {pos}"
        records, end = decoded
        seqs = [seq_of(rec.decode_message(bytes(p)).body) for _, kind, p in records if kind == rec.MESSAGE]
        found.append(Frame(pos, end, seqs))
        pos = end
    return found


def checkpoint_position(path: Path) -> tuple[int, int]:
    position, _, _ = decode_checkpoint((path / "checkpoint").read_bytes())
    return position


def message_seqs(segment_files: list[Path]) -> list[int]:
    return [seq for segment in segment_files for f in frames(segment) for seq in f.seqs]


async def stored(broker: Broker) -> list[int]:
    return [seq_of(d.body) for d in await broker.peek("q", 10**6)]


async def publish_more_and_reopen(path: Path, expected: list[int]) -> None:
    """The log goes on after a repair: a new publish lands at the right place and everything is read back."""
    async with open_broker(path) as broker:
        await broker.publish_batch("q", [Publish(body=body_of(s)) for s in range(9000, 9005)])
    async with open_broker(path) as broker:
        assert broker.recovery.truncated_at is None, broker.recovery
        assert await stored(broker) == expected + list(range(9000, 9005))


def flip_bit(path: Path, pos: int, bit: int = 0x10) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= bit
    path.write_bytes(bytes(data))


def snapshot_files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


# -- (a) the last segment cut short -----------------------------------------------------------------------------

CUTS = ["1 byte", "4 bytes", "half the last frame", "the last frame exactly", "into the frame before", "into header"]


@pytest.mark.parametrize("cut", CUTS)
async def test_truncated_last_segment_is_cut_and_reported(tmp_path, cut):
    path = await populate(tmp_path, "crash")
    files = segments(path)
    last = files[-1]
    last_frames = frames(last)
    assert len(last_frames) >= 2 and checkpoint_position(path)[0] < int(last.stem), "test setup"
    final = last_frames[-1]
    size = final.end
    assert last.stat().st_size == SEGMENT > size, "test setup: the running log's last file has space reserved"
    new_size = {
        "1 byte": size - 1,
        "4 bytes": size - 4,
        "half the last frame": (final.pos + final.end) // 2,
        "the last frame exactly": final.pos,
        "into the frame before": final.pos - 3,
        "into header": 10,
    }[cut]
    data = last.read_bytes()
    with open(last, "r+b") as f:  # the bytes after the cut never reached the disk: the reserved zeros are left
        f.seek(new_size)
        f.write(bytes(size - new_size))
    written = data[:new_size]
    survivors = message_seqs(files[:-1]) + [seq for f in last_frames if f.end <= new_size for seq in f.seqs]
    torn = [f for f in last_frames if f.pos < new_size < f.end]

    async with open_broker(path) as broker:
        report = broker.recovery
        assert await stored(broker) == survivors  # every record before the cut, in publish order
    assert not report.clean_shutdown
    if cut == "into header":  # a segment whose header never made it to disk is removed and reported
        assert report.truncated_at == (str(last), 0) and report.truncated_bytes == data_end(written)
        assert not last.exists()
    elif torn:  # (the bytes cut are counted up to the reserved zeros)
        assert report.truncated_at == (str(last), torn[0].pos)
        assert report.truncated_bytes == data_end(written) - torn[0].pos
        assert last.stat().st_size == torn[0].pos
        assert any(str(last) in problem and f"at {torn[0].pos}" in problem for problem in report.problems)
    else:  # cut on a frame boundary: nothing is torn, the log simply ends earlier (like a kill before the write)
        assert report.truncated_at is None and report.truncated_bytes == 0
    await publish_more_and_reopen(path, survivors)


# -- (b) garbage after the last record ---------------------------------------------------------------------------


def garbage(kind: str) -> bytes:
    if kind == "random":
        return random.Random(7).randbytes(101)
    # a frame header promising more payload than follows: a write cut short
    return (100).to_bytes(4, "little") + (12345).to_bytes(4, "little") + bytes([rec.MESSAGE]) + b"p" * 20


@pytest.mark.parametrize("kind", ["random", "half a frame"])
@pytest.mark.parametrize("image", ["crash", "clean"])
async def test_garbage_after_the_last_record_is_cut_and_reported(tmp_path, image, kind):
    """Garbage where the next frame would go: written over the reserved zeros of a crash image's last file, or
    appended to a cleanly closed one's."""
    path = await populate(tmp_path, image)
    files = segments(path)
    last = files[-1]
    size = frames(last)[-1].end
    everything = message_seqs(files)
    assert everything == list(range(MESSAGES)), "test setup"
    junk = garbage(kind)
    with open(last, "r+b") as f:
        f.seek(size)
        f.write(junk)

    async with open_broker(path) as broker:
        report = broker.recovery
        assert await stored(broker) == everything
    assert report.truncated_at == (str(last), size) and report.truncated_bytes == len(junk)
    assert last.stat().st_size == size
    await publish_more_and_reopen(path, everything)


@pytest.mark.parametrize("image", ["crash", "clean"])
async def test_zeros_after_the_last_record_are_where_the_log_ends(tmp_path, image):
    """Zeros after the last frame (the reserved space of a running log's file, or a file whose size was made
    durable before its data) are never a frame: the log ends there, and the next write goes there."""
    path = await populate(tmp_path, image)
    files = segments(path)
    last = files[-1]
    size = frames(last)[-1].end
    everything = message_seqs(files)
    with open(last, "ab") as f:
        f.write(bytes(37))

    async with open_broker(path) as broker:
        report = broker.recovery
        assert await stored(broker) == everything
    assert report.truncated_at is None and report.problems == []
    assert last.stat().st_size == size  # a clean stop cuts the file to its frames
    await publish_more_and_reopen(path, everything)


# -- (c) a bit flipped before the tail ---------------------------------------------------------------------------

PLACES = ["segment header", "length field", "crc field", "kind byte", "payload", "middle of the file"]


def place_to_flip(segment: Path, place: str) -> tuple[int, int]:
    """(byte to flip, position the report must name): the frame holding the byte, or 0 for the header."""
    chosen = frames(segment)[len(frames(segment)) // 2]
    if place == "segment header":
        return 13, 0
    if place == "middle of the file":
        middle = segment.stat().st_size // 2
        [holder] = [f for f in frames(segment) if f.pos <= middle < f.end]
        return middle, holder.pos
    offset = {"length field": 1, "crc field": 5, "kind byte": BATCH_SIZE, "payload": BATCH_SIZE + RECORD_SIZE + 3}
    return chosen.pos + offset[place], chosen.pos


@pytest.mark.parametrize("place", PLACES)
async def test_bit_flip_in_an_earlier_segment_is_storage_corrupt(tmp_path, place):
    path = await populate(tmp_path, "crash")
    files = segments(path)
    after_checkpoint = [s for s in files[:-1] if int(s.stem) > checkpoint_position(path)[0]]
    assert len(after_checkpoint) >= 3, "test setup: several segments between the checkpoint and the last"
    target = after_checkpoint[len(after_checkpoint) // 2]
    flipped, reported = place_to_flip(target, place)
    flip_bit(target, flipped)
    before = snapshot_files(path)

    for _ in range(2):  # the failed open released the directory: a second attempt says the same
        with pytest.raises(StorageCorrupt) as caught:
            await open_broker(path).start()
        assert str(target) in caught.value.message and f"at {reported}" in caught.value.message, caught.value
    assert snapshot_files(path) == before  # nothing repaired, nothing cut, nothing skipped


async def test_bit_flip_in_the_last_segment_before_valid_records_is_storage_corrupt(tmp_path):
    path = await populate(tmp_path, "crash")
    last = segments(path)[-1]
    first = frames(last)[0]
    flip_bit(last, first.pos + BATCH_SIZE + RECORD_SIZE + 1)
    before = snapshot_files(path)
    with pytest.raises(StorageCorrupt) as caught:
        await open_broker(path).start()
    assert f"{last} at {first.pos}" in caught.value.message
    assert snapshot_files(path) == before  # not mistaken for a torn tail: valid frames follow


async def test_damaged_checkpoint_is_storage_corrupt(tmp_path):
    path = await populate(tmp_path, "clean")
    flip_bit(path / "checkpoint", (path / "checkpoint").stat().st_size // 2)
    with pytest.raises(StorageCorrupt) as caught:
        await open_broker(path).start()
    assert str(path / "checkpoint") in caught.value.message


async def test_bit_flip_in_a_checkpointed_segment_is_reported_when_read(tmp_path):
    """Segments a checkpoint covers are not re-read at open (recovery time must not grow with the history), so
    the damage shows when the message is read: StorageCorrupt naming file and position, never a wrong body."""
    path = await populate(tmp_path, "clean")
    files = segments(path)
    assert checkpoint_position(path)[0] >= int(files[-1].stem), "test setup: the checkpoint covers every file"
    target = files[len(files) // 2]
    victim = frames(target)[1]
    flip_bit(target, victim.pos + BATCH_SIZE + RECORD_SIZE + 5)
    async with open_broker(path) as broker:
        with pytest.raises(StorageCorrupt) as caught:
            await broker.peek("q", 10**6)
        assert f"{target} at {victim.pos}" in caught.value.message
        delivered = []
        with pytest.raises(StorageCorrupt) as caught:
            while batch := await broker.receive("q", 1):
                delivered += [seq_of(d.body) for d in batch]
        assert f"{target} at {victim.pos}" in caught.value.message
        assert delivered == list(range(victim.seqs[0]))  # everything before its frame, intact and in order


async def test_truncated_checkpointed_segment_is_reported_and_later_publishes_survive(tmp_path):
    path = await populate(tmp_path, "clean")
    last = segments(path)[-1]
    final = frames(last)[-1]
    os.truncate(last, last.stat().st_size - 3)
    try:
        broker = await open_broker(path).start()
    except StorageCorrupt as corrupt:  # acceptable: the checkpoint promised bytes that are gone
        assert str(last) in corrupt.message
        return
    try:
        assert broker.recovery.truncated_at == (str(last), final.pos), broker.recovery  # or: reported as a cut
        await broker.publish("q", body_of(9999))  # confirmed after the repair
    finally:
        await broker.close()
    async with open_broker(path) as broker:
        assert (await stored(broker))[-1] == 9999


# -- a segment file gone -----------------------------------------------------------------------------------------


async def test_missing_segment_after_the_checkpoint_is_storage_corrupt(tmp_path):
    path = await populate(tmp_path, "crash")
    after_checkpoint = [s for s in segments(path)[:-1] if int(s.stem) > checkpoint_position(path)[0]]
    missing = after_checkpoint[len(after_checkpoint) // 2]
    missing.unlink()
    with pytest.raises(StorageCorrupt) as caught:
        await open_broker(path).start()
    assert missing.name in caught.value.message


async def test_missing_checkpointed_segment_is_storage_corrupt(tmp_path):
    path = await populate(tmp_path, "clean")
    last = segments(path)[-1]
    assert checkpoint_position(path)[0] == int(last.stem), "test setup"
    last.unlink()
    try:
        broker = await open_broker(path).start()
    except StorageCorrupt as corrupt:
        assert last.name in corrupt.message
        return
    try:  # if it opens, it must at least keep what it confirms from now on: publish, then SIGKILL (a copy)
        await broker.publish("q", body_of(9999))
        shutil.copytree(path, tmp_path / "killed")
    finally:
        await broker.close()
    async with open_broker(tmp_path / "killed") as again:
        assert 9999 in [seq_of(d.body) for d in (await again.peek("q", 10**6))[-1:]]
