"""File store under damage and faults: torn tails, bit flips, EIO, ENOSPC, power cuts."""

from __future__ import annotations

import asyncio
import errno
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chute.errors import StorageCorrupt, StorageFailed, StorageFull, StorageReadOnly
from chute.storage import FileStore, MemoryFs
from chute.storage.file import log
from chute.storage.file.record import BATCH_SIZE, RECORD_SIZE, decode_frame, encode_frame


async def _write(path, payloads, *, segment_max_bytes=1 << 20, fs=None, batch=False):
    """Append `payloads`, each in a group commit of its own, so each has a frame of its own (or all in one)."""
    store = FileStore(path, segment_max_bytes=segment_max_bytes, fs=fs)
    await store.open()
    refs = []
    for group in [payloads] if batch else [[p] for p in payloads]:
        more, token = store.append([(1, p) for p in group])
        refs += more
        await token
    await store.close()
    return refs


def _frame_at(ref: int) -> int:
    """The file position of the frame of a record that has a frame of its own."""
    return (ref & 0xFFFFFFFF) - BATCH_SIZE


async def _reopen(path, *, fs=None, segment_max_bytes=1 << 20):
    store = FileStore(path, segment_max_bytes=segment_max_bytes, fs=fs)
    recovered = await store.open()
    return store, [p for _, _, p in recovered.records], recovered.report


def _segments(path):
    return sorted(p for p in os.listdir(path) if p.endswith(".seg"))


async def test_torn_tail_is_cut_at_every_byte_of_the_last_record(tmp_path):
    payloads = [b"record-%d" % i for i in range(5)]
    refs = await _write(tmp_path / "seed", payloads)
    last_pos = _frame_at(refs[-1])
    seed = (tmp_path / "seed" / _segments(tmp_path / "seed")[0]).read_bytes()
    for cut in range(last_pos, len(seed)):
        path = tmp_path / f"cut{cut}"
        path.mkdir()
        (path / "00000000000000000001.seg").write_bytes(seed[:cut])
        store, got, report = await _reopen(path)
        assert got == payloads[:-1]
        if cut > last_pos:
            assert report.truncated_at == (str(path / "00000000000000000001.seg"), last_pos)
            # (zeros at the end of a file are counted as preallocated space, not as cut bytes)
            assert report.truncated_bytes == len(seed[last_pos:cut].rstrip(b"\0"))
        refs, token = store.append([(1, b"after")])  # the log goes on from the cut
        await token
        await store.close()
        _, got, report = await _reopen(path)
        assert got == payloads[:-1] + [b"after"] and report.truncated_at is None


async def test_garbage_after_the_tail_is_cut_and_reported(tmp_path):
    await _write(tmp_path, [b"a", b"b"])
    segment = tmp_path / _segments(tmp_path)[0]
    size = segment.stat().st_size
    with open(segment, "ab") as f:
        f.write(b"\x00\x17garbage that is not a frame")
    store, got, report = await _reopen(tmp_path)
    assert got == [b"a", b"b"]
    assert report.truncated_at == (str(segment), size)
    await store.close()


async def test_bit_flip_in_a_sealed_segment_is_reported_not_skipped(tmp_path):
    refs = await _write(tmp_path, [b"p" * 200 for _ in range(40)], segment_max_bytes=1024)
    first = tmp_path / _segments(tmp_path)[0]
    data = bytearray(first.read_bytes())
    pos = (refs[1] & 0xFFFFFFFF) + RECORD_SIZE + 10
    data[pos] ^= 0x04
    first.write_bytes(bytes(data))
    with pytest.raises(StorageCorrupt) as caught:
        await _reopen(tmp_path, segment_max_bytes=1024)
    assert str(first) in caught.value.message and f"at {_frame_at(refs[1])}" in caught.value.message


async def test_bit_flip_before_valid_records_in_the_last_segment_is_corruption(tmp_path):
    refs = await _write(tmp_path, [b"q" * 100 for _ in range(10)])
    segment = tmp_path / _segments(tmp_path)[0]
    data = bytearray(segment.read_bytes())
    data[(refs[3] & 0xFFFFFFFF) + RECORD_SIZE + 1] ^= 0x80
    segment.write_bytes(bytes(data))
    with pytest.raises(StorageCorrupt, match="at"):
        await _reopen(tmp_path)


async def test_bit_flip_in_the_tail_record_is_a_torn_tail(tmp_path):
    refs = await _write(tmp_path, [b"q" * 100 for _ in range(10)])
    segment = tmp_path / _segments(tmp_path)[0]
    data = bytearray(segment.read_bytes())
    data[-5] ^= 0x01
    segment.write_bytes(bytes(data))
    store, got, report = await _reopen(tmp_path)
    assert len(got) == 9 and report.truncated_at == (str(segment), _frame_at(refs[-1]))
    await store.close()


async def test_damaged_checkpoint_is_reported(tmp_path):
    store = FileStore(tmp_path)
    await store.open()
    store.append([(1, b"x")])
    await store.checkpoint(b"snapshot")
    await store.close()
    path = tmp_path / "checkpoint"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StorageCorrupt, match="checkpoint"):
        await _reopen(tmp_path)


@pytest.mark.parametrize(
    ("op", "code", "error"),
    [("fsync", errno.EIO, StorageFailed), ("write", errno.EIO, StorageFailed), ("write", errno.ENOSPC, StorageFull)],
)
async def test_write_faults_fail_the_group_and_make_the_log_read_only(tmp_path, op, code, error):
    fs = MemoryFs()
    store = FileStore(tmp_path, fs=fs)
    await store.open()
    confirmed, token = store.append([(1, b"confirmed")])
    await token
    fs.fail(op, code)
    _, failing = store.append([(1, b"never confirmed")])
    with pytest.raises(error):
        await failing
    assert store.read_only
    with pytest.raises(StorageReadOnly):
        store.append([(1, b"later")])
    assert await store.read(confirmed) == [b"confirmed"]  # reads go on
    fs.crash()  # whatever reached the page cache but not the disk is gone
    store2, got, _ = await _reopen(tmp_path, fs=fs)
    assert got == [b"confirmed"]
    await store2.close()


async def test_power_cut_keeps_every_confirmed_record(tmp_path):
    fs = MemoryFs()
    store = FileStore(tmp_path, fs=fs, segment_max_bytes=600)
    await store.open()
    confirmed = []
    for i in range(30):
        _, token = store.append([(1, b"c%03d" % i * 20)])
        await token
        confirmed.append(b"c%03d" % i * 20)
    store.append([(1, b"unconfirmed")])  # not awaited: may or may not survive
    fs.crash()
    store2, got, _ = await _reopen(tmp_path, fs=fs, segment_max_bytes=600)
    assert got[: len(confirmed)] == confirmed
    assert got[len(confirmed) :] in ([], [b"unconfirmed"])
    await store2.close()


async def test_power_cut_during_checkpoint_keeps_the_old_one(tmp_path):
    fs = MemoryFs()
    store = FileStore(tmp_path, fs=fs)
    await store.open()
    _, token = store.append([(1, b"one")])
    await token
    await store.checkpoint(b"first")
    _, token = store.append([(1, b"two")])
    await token
    fs.fail("fsync", errno.EIO)  # the new checkpoint never becomes durable
    with pytest.raises(StorageFailed):
        await store.checkpoint(b"second")
    fs.crash()
    store2 = FileStore(tmp_path, fs=fs)
    recovered = await store2.open()
    assert recovered.snapshot == b"first"
    assert [p for _, _, p in recovered.records] == [b"two"]
    await store2.close()


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=255), st.binary(max_size=64))
def test_frames_round_trip_and_garbage_never_decodes_wrongly(payload, kind, garbage):
    out = bytearray()
    encode_frame(out, kind, payload)
    decoded = decode_frame(bytes(out), 0)
    assert decoded is not None and decoded[0] == kind and bytes(decoded[1]) == payload and decoded[2] == len(out)
    for cut in range(len(out)):
        assert decode_frame(bytes(out[:cut]), 0) is None
    result = decode_frame(garbage, 0)
    assert result is None or result[2] <= len(garbage)


@given(st.binary(min_size=1, max_size=400))
async def test_random_bytes_in_a_segment_give_a_report_or_corruption(tmp_path_factory, junk):
    path = tmp_path_factory.mktemp("junk")
    await _write(path, [b"ok"])
    segment = path / _segments(path)[0]
    segment.write_bytes(segment.read_bytes() + junk)
    try:
        store, got, report = await _reopen(path)
    except StorageCorrupt:
        return
    assert got[0] == b"ok"
    await store.close()


@given(st.integers(min_value=1, max_value=8), st.binary(max_size=64))
async def test_checksummed_but_meaningless_records_are_reported_not_crashed_on(tmp_path_factory, kind, payload):
    """A record that passes its CRC but is not what this version wrote gives StorageCorrupt, never a traceback."""
    from chute import Broker

    path = tmp_path_factory.mktemp("meaningless")
    store = FileStore(path)
    await store.open()
    _, token = store.append([(kind, payload)])
    await token
    await store.close()
    try:
        async with Broker(store=FileStore(path)):
            pass
    except StorageCorrupt as exc:
        assert "segment 1 at" in exc.message


async def test_a_failed_open_releases_the_directory(tmp_path):
    await _write(tmp_path, [b"a"])
    (tmp_path / "checkpoint").write_bytes(b"CHUTECKP broken")
    with pytest.raises(StorageCorrupt):
        await _reopen(tmp_path)
    (tmp_path / "checkpoint").unlink()
    store, got, _ = await _reopen(tmp_path)  # not "in use": the failed open let go of the lock
    assert got == [b"a"]
    await store.close()


async def test_reads_of_written_bodies_do_not_wait_for_a_busy_writer(tmp_path):
    """Regression: an uncached read used to wait until the writer was idle, so steady publishing starved it."""
    import asyncio

    from chute import Broker

    async with Broker(store=FileStore(tmp_path, cache_max_bytes=0)) as broker:
        await broker.create_queue("q")
        await broker.create_queue("other")
        await broker.publish("q", b"waiting")
        stop = asyncio.Event()

        async def publisher():
            while not stop.is_set():
                await broker.publish("other", b"x" * 100)

        publishers = [asyncio.create_task(publisher()) for _ in range(2)]
        try:
            [delivery] = await asyncio.wait_for(broker.receive("q"), 30)
            assert delivery.body == b"waiting"
            assert not any(task.done() for task in publishers)  # served while the writer was still busy
        finally:
            stop.set()
            await asyncio.gather(*publishers)


async def test_appends_of_one_turn_share_a_group_and_groups_confirm_in_order(tmp_path):
    """The writer thread takes one group at a time: what is appended in one turn of the loop shares a group (one
    write, one fsync); what is appended while it is written forms the next; they are confirmed in append order."""
    store = FileStore(tmp_path)
    await store.open()
    first = [store.append([(1, b"a%d" % i)])[1] for i in range(5)]
    assert all(token is first[0] for token in first)
    confirmed: list[int] = []
    tokens = []
    for i in range(20):
        token = store.append([(1, b"b%d" % i)])[1]
        token.add_done_callback(lambda _, i=i: confirmed.append(i))
        tokens.append(token)
        await asyncio.sleep(0)  # a new turn: the group being written is not extended
    await asyncio.gather(first[0], *tokens)
    assert confirmed == list(range(20))
    await store.close()
    store, got, _ = await _reopen(tmp_path)
    assert got == [b"a%d" % i for i in range(5)] + [b"b%d" % i for i in range(20)]
    await store.close()


async def test_an_unexpected_error_in_the_writer_fails_its_group_instead_of_hanging(tmp_path):
    class Broken(MemoryFs):
        broken = False

        def _write_at(self, path, pos, data):
            if self.broken:
                raise ValueError("a bug below the store")
            super()._write_at(path, pos, data)

    fs = Broken()
    store = FileStore(tmp_path, fs=fs)
    await store.open()
    await store.append([(1, b"kept")])[1]
    fs.broken = True
    with pytest.raises(StorageFailed, match="ValueError"):
        await asyncio.wait_for(store.append([(1, b"lost")])[1], 10)
    assert store.read_only
    with pytest.raises(StorageReadOnly):
        store.append([(1, b"refused")])
    await store.close()
    fs.broken = False
    store, got, _ = await _reopen(tmp_path, fs=fs)
    assert got == [b"kept"]
    await store.close()


@pytest.mark.parametrize("cut_at_sync", [None, 1, 3])
async def test_a_checkpoint_file_goes_to_the_disk_in_synced_steps(tmp_path, monkeypatch, cut_at_sync):
    """A checkpoint's file is written and synced a step at a time (so a group commit's fsync waits behind one
    step at most, never behind the whole file); the steps make the same file, and a power cut between two of
    them, or a failed sync of one, keeps the old checkpoint."""
    monkeypatch.setattr(log, "CHECKPOINT_STEP_BYTES", 1000)
    monkeypatch.setattr(log, "CHECKPOINT_STEP_PAUSE_S", 0)
    fs = MemoryFs()
    synced: list[int] = []  # the size of the second checkpoint's file at each of its syncs
    real_fsync = fs._fsync

    def fsync(path) -> None:
        if path.endswith(f"{log.CHECKPOINT}.tmp") and armed:
            synced.append(fs.size(path))
            if len(synced) == cut_at_sync:
                raise OSError(errno.EIO, "injected", path)
        real_fsync(path)

    fs._fsync = fsync
    armed = False
    store = FileStore(tmp_path, fs=fs)
    await store.open()
    await store.checkpoint(b"first")
    armed = True
    _, token = store.append([(1, b"after")])
    await token
    snapshot = os.urandom(10_500)
    if cut_at_sync is None:
        await store.checkpoint(snapshot)
        assert len(synced) == 11 and synced[:10] == [1000 * n for n in range(1, 11)]
        await store.close()
    else:
        with pytest.raises(StorageFailed):
            await store.checkpoint(snapshot)
        assert synced[-1] == 1000 * cut_at_sync
    fs.crash()
    store2 = FileStore(tmp_path, fs=fs)
    recovered = await store2.open()
    assert recovered.snapshot == (b"first" if cut_at_sync else snapshot)
    assert [p for _, _, p in recovered.records] == ([b"after"] if cut_at_sync else [])
    await store2.close()
