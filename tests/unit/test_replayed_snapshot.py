"""A checkpoint's snapshot rebuilt by a new program from the data directory's files (chute/_replay_child.py,
storage/file/readonly.py): it is the state at the position it was given, whatever was appended after it, and
the broker's checkpoints use it where the files are real ones."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import time
import zlib

import msgspec
import pytest

from chute import Broker, Publish, _replay_child
from chute import _forked_snapshot as forked_snapshot
from chute.core import snapshot as snap
from chute.errors import StorageCorrupt
from chute.storage import FileStore
from chute.storage.file import readonly
from chute.storage.file.readonly import checkpoint_and_records
from chute.storage.file.record import decode_checkpoint

pytestmark = pytest.mark.timeout(60)


def canonical(snapshot: bytes) -> list:
    """A snapshot as plain data, with the lists whose order means nothing sorted, and the dedup windows' ends in
    whole milliseconds (as the log records them: a state rebuilt from it has no finer ones)."""
    image, tail = snap.decode(snapshot)
    assert tail == []
    plain = msgspec.to_builtins(image)
    for queue in plain[4]:
        queue[4] = sorted((key, int(expires * 1000), message_id) for key, expires, message_id in queue[4])
    for topic in plain[5]:
        topic[3].sort()  # subscriptions
        topic[5] = sorted((key, int(expires * 1000), message_id) for key, expires, message_id in topic[5])
    plain[4].sort()
    plain[5].sort()
    return plain


async def busy_state(broker: Broker) -> None:
    """Queues, a topic with two subscriptions and retained messages, priorities, delays, expiries, dedup ids,
    groups, deliveries, acks, nacks, dead letters and a purge."""
    await broker.create_queue("dlq")
    await broker.create_queue("q", dedup_window_s=600, max_deliveries=2, dead_letter_queue="dlq")
    await broker.create_queue("other")
    await broker.create_topic("t", retention_s=600)
    await broker.subscribe("t", ">", "q")
    await broker.subscribe("t", "a.>", "other")
    for i in range(30):
        await broker.publish_batch("q", [
            Publish(body=b"%d-%d" % (i, j), priority=j % 3, dedup_id=f"d{i}.{j}" if j % 2 else None,
                    delay_s=300 if j == 4 else None, ttl_s=600 if j == 5 else None, group="g" if j == 6 else None)
            for j in range(8)])  # fmt: skip
        await broker.publish("t", b"topic %d" % i, subject="a.b" if i % 2 else "c")
    got = await broker.receive("q", 40)
    await broker.ack("q", [d.receipt for d in got[:20]])
    await broker.nack("q", [d.receipt for d in got[20:30]])
    await broker.nack("q", [got[30].receipt], dead_letter=True)
    await broker.receive("q", 5)  # in flight at the snapshot: ready again in it, their counts kept
    await broker.publish_batch("other", [Publish(body=b"o%d" % i) for i in range(20)])
    await broker.purge_queue("other")


async def test_the_child_rebuilds_the_state_at_its_position_not_after_it(tmp_path):
    async with Broker(store=FileStore(tmp_path, segment_max_bytes=8192), checkpoint_bytes=1 << 40) as broker:
        await busy_state(broker)
        await broker.checkpoint()  # the child starts from a stored checkpoint, then replays what follows it
        await busy_state_more(broker)
        await broker.store.flush()
        point = broker.store.replay_point()
        directory, end_ref = point.directory, point.end_ref
        now = broker.clock()
        expected = canonical(broker.core.snapshot())  # the state at end_ref: nothing appended since
        await busy_state_more(broker)  # appended after the position (some into the same segment)
        await broker.store.flush()
        image = zlib.decompress(_replay_child.build(directory, end_ref, now))
        assert canonical(image) == expected
        assert canonical(image) != canonical(broker.core.snapshot())  # what came later is not in it


async def busy_state_more(broker: Broker) -> None:
    ids = await broker.publish_batch("q", [Publish(body=b"more", dedup_id=None) for _ in range(7)])
    got = await broker.receive("q", 9)
    await broker.ack("q", [d.receipt for d in got if d.id in ids[:3]])
    await broker.publish("t", b"later", subject="a.c")


async def test_the_child_reads_from_the_start_of_a_log_without_a_checkpoint(tmp_path):
    async with Broker(store=FileStore(tmp_path, segment_max_bytes=4096), checkpoint_bytes=1 << 40) as broker:
        await busy_state(broker)
        await broker.store.flush()
        point = broker.store.replay_point()
        directory, end_ref = point.directory, point.end_ref
        expected = canonical(broker.core.snapshot())
        assert not (tmp_path / "checkpoint").exists()
        image = zlib.decompress(_replay_child.build(directory, end_ref, broker.clock()))
        assert canonical(image) == expected


async def test_a_damaged_frame_before_the_position_is_an_error_not_a_shorter_state(tmp_path):
    async with Broker(store=FileStore(tmp_path), checkpoint_bytes=1 << 40) as broker:
        await broker.create_queue("q")
        await broker.publish_batch("q", [Publish(body=b"x" * 100) for _ in range(50)])
        await broker.store.flush()
        point = broker.store.replay_point()
        directory, end_ref = point.directory, point.end_ref
        segment = sorted(tmp_path.glob("*.seg"))[-1]
        original = segment.read_bytes()
        data = bytearray(original)
        data[200] ^= 0xFF
        segment.write_bytes(bytes(data))
        with pytest.raises(StorageCorrupt, match="cannot be read"):
            snapshot, records = checkpoint_and_records(broker.store.fs, directory, end_ref)
            list(records)
        with pytest.raises(StorageCorrupt):
            _replay_child.build(directory, end_ref, broker.clock())
        segment.write_bytes(original)


def test_the_child_program_reports_failure_with_its_status(tmp_path):
    import subprocess

    done = subprocess.run([sys.executable, "-m", "chute._replay_child", str(tmp_path / "none"), "123", "0"],
                          capture_output=True, timeout=30)  # fmt: skip
    assert done.returncode == 1 and done.stdout == b""
    assert b"chute checkpoint child" in done.stderr


async def test_a_checkpoint_on_real_files_is_rebuilt_by_the_child_and_stored_at_its_position(tmp_path, monkeypatch):
    monkeypatch.setattr(forked_snapshot, "FORK_MIN_ENTRIES", 0)
    forks, argvs = [], []
    fork = forked_snapshot._fork
    monkeypatch.setattr(forked_snapshot, "_fork", lambda: forks.append(1) or fork())  # (the closing one forks)
    argv_of = forked_snapshot._replay_argv

    def slow_child(*args):  # the child starts half a second late: the operations below happen meanwhile
        argv = argv_of(*args)
        argvs.append(argv)
        return ["/bin/sh", "-c", 'sleep 0.5; exec "$0" "$@"', *argv]

    monkeypatch.setattr(forked_snapshot, "_replay_argv", slow_child)
    data, copy = tmp_path / "data", tmp_path / "copy"
    async with Broker(store=FileStore(data), checkpoint_bytes=1 << 40) as broker:
        await broker.create_queue("q")
        before = await broker.publish_batch("q", [Publish(body=b"old-%d" % i) for i in range(100)])
        task = asyncio.create_task(broker.checkpoint())
        while not argvs:
            await asyncio.sleep(0.001)
        during = await broker.publish_batch("q", [Publish(body=b"new-%d" % i) for i in range(10)])
        deliveries = await broker.receive("q", 5)
        await broker.ack("q", [d.receipt for d in deliveries[:3]])
        assert not task.done()
        await task
        assert not forks
        position, _, stored = decode_checkpoint((data / "checkpoint").read_bytes())
        image, tail = snap.decode(stored)
        assert tail == [] and sum(len(q.entries.ids) // 8 for q in image.queues) == 100  # the state before
        assert (position[0] << 32 | position[1]) == int(argvs[0][4])
        await broker.store.flush()
        shutil.copytree(data, copy)  # the process dies here: no closing checkpoint
    async with Broker(store=FileStore(copy)) as broker:
        assert broker.recovery.records > 0  # what came while the child worked is replayed from the log
        ready = await broker.receive("q", 1000)
        assert sorted(d.id for d in ready) == sorted(set(before + during) - {d.id for d in deliveries[:3]})
        counts = {d.id: d.delivery_count for d in ready}
        assert {counts[d.id] for d in deliveries[3:]} == {2} and len(set(counts.values()) - {1, 2}) == 0


async def test_a_stop_cuts_a_working_checkpoint_child_short(tmp_path, monkeypatch, caplog):
    """A stop does not wait for a periodic checkpoint's child (rebuilding a burst can take seconds): it is killed,
    not counted as a failure, and the closing checkpoint has everything."""
    monkeypatch.setattr(forked_snapshot, "FORK_MIN_ENTRIES", 0)
    monkeypatch.setattr(forked_snapshot, "_replay_failures", 0)
    argv_of = forked_snapshot._replay_argv
    late = "import os, sys, time; time.sleep(30); os.execv(sys.argv[1], sys.argv[1:])"  # one process, then the child
    monkeypatch.setattr(forked_snapshot, "_replay_argv", lambda *args: [sys.executable, "-c", late, *argv_of(*args)])
    broker = Broker(store=FileStore(tmp_path), checkpoint_bytes=1 << 40)
    await broker.start()
    await broker.create_queue("q")
    ids = await broker.publish_batch("q", [Publish(body=b"m-%d" % i) for i in range(100)])
    broker._start_checkpoint()  # as the broker starts one every checkpoint_bytes
    async with asyncio.timeout(10):
        while not forked_snapshot._working:
            await asyncio.sleep(0.005)
    (child,) = forked_snapshot._working
    started = time.monotonic()
    await broker.close()
    assert time.monotonic() - started < 10  # the child would have slept 30 s
    async with asyncio.timeout(10):  # killed, and reaped by its reading thread
        while os.path.exists(f"/proc/{child}"):
            await asyncio.sleep(0.01)
    assert forked_snapshot._replay_failures == 0 and not forked_snapshot._working
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "child" in r.getMessage()]
    async with Broker(store=FileStore(tmp_path)) as broker:
        assert broker.recovery.records == 0  # the closing checkpoint holds it all
        assert sorted(d.id for d in await broker.receive("q", 1000)) == sorted(ids)


async def test_a_child_that_fails_means_a_forked_snapshot(tmp_path, monkeypatch):
    monkeypatch.setattr(forked_snapshot, "FORK_MIN_ENTRIES", 0)
    monkeypatch.setattr(forked_snapshot, "_replay_argv", lambda *args: [sys.executable, "-c", "raise SystemExit(3)"])
    monkeypatch.setattr(forked_snapshot, "_replay_failures", 0)
    forks = []
    fork = forked_snapshot._fork
    monkeypatch.setattr(forked_snapshot, "_fork", lambda: forks.append(1) or fork())
    async with Broker(store=FileStore(tmp_path), checkpoint_bytes=1 << 40) as broker:
        await broker.create_queue("q")
        ids = await broker.publish_batch("q", [Publish(body=b"x") for _ in range(10)])
        await broker.checkpoint()
        assert forks and forked_snapshot._replay_failures == 1
        for _ in range(forked_snapshot.REPLAY_MAX_FAILURES):
            await broker.publish("q", b"y")
            await broker.checkpoint()
        assert forked_snapshot._replay_failures == forked_snapshot.REPLAY_MAX_FAILURES  # no child tried any more
    async with Broker(store=FileStore(tmp_path)) as broker:
        assert [d.id for d in await broker.receive("q", 100)][:10] == ids


def test_a_store_of_files_in_memory_has_no_point_a_child_could_read(tmp_path):
    from chute.storage import MemoryFs

    assert FileStore("/x", fs=MemoryFs()).replay_point() is None


@pytest.mark.parametrize("window", [16, 100, 1000, 5000])
async def test_reading_a_window_at_a_time_gives_every_record_a_whole_read_gives(tmp_path, monkeypatch, window):
    """The reader holds a window of a segment, not all of it: frames across a window's end, frames larger than a
    window (a 3,000-byte body), the reserved zeros after a sealed segment's records, and the position inside the
    last segment give the same records, in the same order, as reading each file in one go."""
    async with Broker(store=FileStore(tmp_path, segment_max_bytes=16384), checkpoint_bytes=1 << 40) as broker:
        await broker.create_queue("q")
        for i in range(40):
            await broker.publish_batch("q", [Publish(body=bytes([65 + j]) * (3000 if (i + j) % 7 == 0 else 40 + i))
                                             for j in range(5)])  # fmt: skip
            got = await broker.receive("q", 3)
            await broker.ack("q", [d.receipt for d in got[:2]])
        await broker.store.flush()
        point = broker.store.replay_point()
        await broker.publish("q", b"after the position")
        await broker.store.flush()
        assert len(list(tmp_path.glob("*.seg"))) >= 3
        _, records = checkpoint_and_records(broker.store.fs, point.directory, point.end_ref)
        whole = list(records)
        monkeypatch.setattr(readonly, "WINDOW_BYTES", window)
        _, records = checkpoint_and_records(broker.store.fs, point.directory, point.end_ref)
        assert list(records) == whole
    assert len(whole) > 200 and all(ref < point.end_ref for ref, _, _ in whole)
    assert not any(payload.endswith(b"after the position") for _, _, payload in whole)


async def test_a_damaged_frame_is_an_error_whatever_the_window(tmp_path, monkeypatch):
    async with Broker(store=FileStore(tmp_path, segment_max_bytes=16384), checkpoint_bytes=1 << 40) as broker:
        await broker.create_queue("q")
        for _ in range(10):
            await broker.publish_batch("q", [Publish(body=b"x" * 700) for _ in range(8)])
        await broker.store.flush()
        point = broker.store.replay_point()
        first = sorted(tmp_path.glob("*.seg"))[0]
        data = bytearray(first.read_bytes())
        data[6000] ^= 0xFF  # inside a sealed segment's records
        first.write_bytes(bytes(data))
        for window in (64, 4096, 1 << 20):
            monkeypatch.setattr(readonly, "WINDOW_BYTES", window)
            with pytest.raises(StorageCorrupt, match="cannot be read"):
                list(checkpoint_and_records(broker.store.fs, point.directory, point.end_ref)[1])
