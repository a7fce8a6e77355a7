"""Preallocated segments: the active segment's file has its space reserved ahead of the writer (zeros past the
last frame, RESERVE_BYTES at a time), so most group commits' syncs change neither the file's size nor its
allocation. Recovery finds the
end of the frames where only zeros follow; a torn write into those zeros is a torn tail; sealed segments and a
cleanly stopped broker's files hold their frames only.

A copy of a running store's directory stands for what a SIGKILL leaves (the page cache's view of the files);
the store itself is left open, as a killed process would leave it, and closed at the end of each test.
"""

from __future__ import annotations

import errno
import os
import random
import shutil

import pytest

from chute.errors import StorageCorrupt
from chute.storage import FileStore, MemoryFs
from chute.storage.file import log
from chute.storage.file.recovery import segment_name

SEGMENT = 64 * 1024


async def _open(path, **options):
    store = FileStore(path, segment_max_bytes=options.pop("segment_max_bytes", SEGMENT), **options)
    recovered = await store.open()
    return store, [p for _, _, p in recovered.records], recovered.report


async def _append(store, payloads):
    for payload in payloads:
        await store.append([(1, payload)])[1]


def _sizes(path):
    return {name: os.path.getsize(path / name) for name in sorted(os.listdir(path)) if name.endswith(".seg")}


def _killed_copy(path, into):
    """The directory as a SIGKILL would leave it (without the lock, which dies with the process)."""
    shutil.copytree(path, into, ignore=shutil.ignore_patterns("lock"))
    return into


async def test_the_active_segment_is_preallocated_and_a_stopped_one_holds_its_frames_only(tmp_path):
    store, _, _ = await _open(tmp_path / "log")
    await _append(store, [b"a" * 100, b"b" * 100])
    (name, size), = _sizes(tmp_path / "log").items()
    assert size == SEGMENT  # reserved while the store runs (SEGMENT < RESERVE_BYTES: the whole segment)
    end = store.stats().bytes_on_disk
    assert 200 < end < 400
    await store.close()
    assert _sizes(tmp_path / "log") == {name: end}  # cut to its frames at a clean stop
    store, got, report = await _open(tmp_path / "log")
    assert got == [b"a" * 100, b"b" * 100] and report.truncated_at is None
    assert _sizes(tmp_path / "log") == {name: SEGMENT}  # reserved again for what comes next
    await _append(store, [b"c"])
    await store.close()
    store, got, _ = await _open(tmp_path / "log")
    assert got == [b"a" * 100, b"b" * 100, b"c"]
    await store.close()


async def test_sealed_segments_are_cut_to_their_frames(tmp_path):
    store, _, _ = await _open(tmp_path / "log", segment_max_bytes=4096)
    payloads = [bytes([65 + i % 26]) * 700 for i in range(30)]
    await _append(store, payloads)
    sizes = _sizes(tmp_path / "log")
    assert len(sizes) >= 5
    *sealed, active = sizes.values()
    assert active == 4096 and all(size < 4096 for size in sealed)
    copy = _killed_copy(tmp_path / "log", tmp_path / "killed")
    again, got, report = await _open(copy, segment_max_bytes=4096)
    assert got == payloads and report.truncated_at is None
    await again.close()
    await store.close()


async def test_a_killed_store_recovers_every_confirmed_record_and_goes_on_where_its_frames_end(tmp_path):
    store, _, _ = await _open(tmp_path / "log")
    payloads = [b"record-%d" % i for i in range(50)] + [b"ends in zeros" + bytes(300)]
    await _append(store, payloads)
    copy = _killed_copy(tmp_path / "log", tmp_path / "killed")
    again, got, report = await _open(copy)
    assert got == payloads  # the last frame's own zeros are part of it, not the reserved space
    assert report.truncated_at is None and report.problems == []
    await _append(again, [b"after"])
    await again.close()
    again, got, _ = await _open(copy)
    assert got == payloads + [b"after"]
    await again.close()
    await store.close()


# (fixed bytes, the random ones from a seed: a run is repeatable, and its test ids are the same in every process)
@pytest.mark.parametrize("torn", [b"\x07", b"\x40\x00\x00\x00\x12\x34", random.Random(98).randbytes(37) + b"\x01"],
                         ids=["one-byte", "a-frame-header", "random-bytes"])
async def test_a_write_torn_into_the_reserved_zeros_is_cut_as_a_torn_tail(tmp_path, torn):
    store, _, _ = await _open(tmp_path / "log")
    await _append(store, [b"kept-1", b"kept-2"])
    end = store.stats().bytes_on_disk
    copy = _killed_copy(tmp_path / "log", tmp_path / "killed")
    segment = copy / segment_name(1)
    with open(segment, "r+b") as f:
        f.seek(end)
        f.write(torn)  # a group's write, cut short by the crash: the zeros after it are the reserved space
    again, got, report = await _open(copy)
    assert got == [b"kept-1", b"kept-2"]
    assert report.truncated_at == (str(segment), end)
    assert report.truncated_bytes == len(torn.rstrip(b"\0"))
    await _append(again, [b"after"])
    await again.close()
    again, got, report = await _open(copy)
    assert got == [b"kept-1", b"kept-2", b"after"] and report.truncated_at is None
    await again.close()
    await store.close()


async def test_damage_before_valid_frames_is_corruption_even_with_reserved_zeros_after_them(tmp_path):
    store, _, _ = await _open(tmp_path / "log")
    refs = []
    for payload in (b"first", b"second", b"third"):
        more, token = store.append([(1, payload)])
        refs += more
        await token
    copy = _killed_copy(tmp_path / "log", tmp_path / "killed")
    with open(copy / segment_name(1), "r+b") as f:
        f.seek((refs[1] & 0xFFFFFFFF) + 12)  # inside the second record's payload
        f.write(b"X")
    with pytest.raises(StorageCorrupt, match="fails its length or checksum"):
        await _open(copy)
    await store.close()


async def test_without_preallocation_the_log_grows_as_it_is_written(tmp_path):
    """Preallocation is best effort: a file system that refuses it (here ENOSPC for the reserve, as on a nearly
    full disk) leaves files that grow with each write, and nothing else changes."""
    fs = MemoryFs()
    fs.fail("preallocate", errno.ENOSPC, times=100)
    store, _, _ = await _open(tmp_path, fs=fs, segment_max_bytes=2048)
    payloads = [b"p%03d" % i * 40 for i in range(40)]
    await _append(store, payloads)
    assert not store.read_only
    fs.crash()
    again, got, report = await _open(tmp_path, fs=fs, segment_max_bytes=2048)
    assert got == payloads and report.truncated_at is None
    await again.close()


async def test_a_power_cut_keeps_every_confirmed_record_with_preallocated_segments(tmp_path):
    """MemoryFs models the reserve as zeros after the data: a power cut keeps the synced frames and zeros."""
    fs = MemoryFs()
    store, _, _ = await _open(tmp_path, fs=fs, segment_max_bytes=2048)
    confirmed = [b"c%03d" % i * 30 for i in range(60)]
    await _append(store, confirmed)
    store.append([(1, b"unconfirmed")])  # not awaited: may or may not survive
    fs.crash()
    again, got, _ = await _open(tmp_path, fs=fs, segment_max_bytes=2048)
    assert got[: len(confirmed)] == confirmed and got[len(confirmed) :] in ([], [b"unconfirmed"])
    await again.close()


async def test_the_reserve_runs_ahead_of_the_frames_a_step_at_a_time(tmp_path, monkeypatch):
    """Space is reserved RESERVE_BYTES ahead of the frames (not the whole segment at once: a directory of a
    running broker holds its data plus one step), and again each time the frames reach it."""
    monkeypatch.setattr(log, "RESERVE_BYTES", 1000)
    store, _, _ = await _open(tmp_path / "log", segment_max_bytes=SEGMENT)
    payloads = [bytes([97 + i % 26]) * 150 for i in range(40)]
    seen = set()
    for payload in payloads:
        await _append(store, [payload])
        end = store.stats().bytes_on_disk
        (size,) = _sizes(tmp_path / "log").values()
        assert end < size <= end + 1000 + 160  # (+ the frame that made it reserve the next step)
        seen.add(size)
    assert len(seen) >= 5  # reserved again and again as the frames went on
    copy = _killed_copy(tmp_path / "log", tmp_path / "killed")
    again, got, report = await _open(copy)
    assert got == payloads and report.truncated_at is None
    await again.close()
    await store.close()
