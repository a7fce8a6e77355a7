"""Housekeeping that does not hold the event loop: compaction's search runs in steps between which the queues
change (acks, leases), and what it moves stays correct; a large snapshot is built in a forked child while the
broker keeps working, and the records appended meanwhile travel in the checkpoint, so a restart sees them all."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import sys
import time

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chute import Broker, Publish
from chute import _forked_snapshot as forked_snapshot
from chute import _housekeeping as housekeeping_module
from chute.core import compaction
from chute.core import snapshot as snap
from chute.storage import FileStore
from chute.storage.file import log as file_log
from chute.storage.file.record import decode_checkpoint
from chute.storage.memory import MemoryStore

pytestmark = pytest.mark.timeout(60)
SEGMENT_BYTES = 16 * 1024


async def stuck_backlog(broker: Broker) -> tuple[list[int], dict[int, int]]:
    """20 batches of 50 messages; all acked but the first of each batch, which stays leased: sparse files with
    one live record each. Returns the stuck ids and their receipts."""
    await broker.create_queue("q", lease_s=3600)
    stuck, receipts = [], {}
    for batch in range(20):
        ids = await broker.publish_batch("q", [Publish(body=b"%d-%d" % (batch, i) * 20) for i in range(50)])
        stuck.append(ids[0])
    while deliveries := await broker.receive("q", 100):
        await broker.ack("q", [d.receipt for d in deliveries if d.id not in stuck])
        receipts.update((d.id, d.receipt) for d in deliveries if d.id in stuck)
    return stuck, receipts


async def test_compaction_moves_what_is_still_live_when_the_queue_changes_between_steps(tmp_path):
    async with Broker(store=FileStore(tmp_path, segment_max_bytes=SEGMENT_BYTES), checkpoint_bytes=1 << 40) as broker:
        stuck, receipts = await stuck_backlog(broker)
        await broker.store.checkpoint(broker.core.snapshot())  # a checkpoint without its compaction
        grown = broker.store.stats().bytes_on_disk
        scan = broker.core.compaction_scan(broker.store.sparse_segments())
        steps = 0
        while not scan.step(budget=2):
            steps += 1
            if steps == 3:  # gone while the scan runs (one already seen by it, one not yet)
                await broker.ack("q", [receipts[stuck[0]], receipts[stuck[-1]]])
        assert steps > 3
        refs = scan.refs()
        assert len(refs) == 19  # the one acked before the scan reached it is not found
        broker._run(broker.core.relocate, list(zip(refs, await broker.store.read(refs), strict=True)), scan)
        await broker.ack("q", [receipts[stuck[5]]])  # acked after its move: the new ref is released
        await broker.checkpoint()
        await broker.checkpoint()  # covers the copies: the old files go
        assert broker.store.stats().bytes_on_disk < grown / 2
        kept = sorted(set(stuck) - {stuck[0], stuck[-1], stuck[5]})
    async with Broker(store=FileStore(tmp_path, segment_max_bytes=SEGMENT_BYTES)) as broker:
        deliveries = await broker.receive("q", 100)
        assert sorted(d.id for d in deliveries) == kept
        by_id = {d.id: d.body for d in deliveries}
        assert all(by_id[i].startswith(b"%d-0" % stuck.index(i)) for i in kept)


async def test_a_scan_stops_at_its_limit_and_the_rest_moves_next_time(tmp_path, monkeypatch):
    monkeypatch.setattr(compaction, "SCAN_STEP_ENTRIES", 1)
    monkeypatch.setattr(compaction, "SCAN_MAX_REFS", 5)
    async with Broker(store=FileStore(tmp_path, segment_max_bytes=SEGMENT_BYTES), checkpoint_bytes=1 << 40) as broker:
        stuck, _ = await stuck_backlog(broker)
        await broker.store.checkpoint(broker.core.snapshot())
        scan = broker.core.compaction_scan(broker.store.sparse_segments())
        while not scan.step():
            pass
        assert len(scan.refs()) == 5
        for _ in range(6):
            await broker.checkpoint()  # each compaction moves what its scan found, in slices
        assert broker.store.stats().segments <= 3
    async with Broker(store=FileStore(tmp_path, segment_max_bytes=SEGMENT_BYTES)) as broker:
        assert sorted(d.id for d in await broker.receive("q", 100)) == sorted(stuck)


# -- snapshots built in a forked child ------------------------------------------------------------------------


def stored_snapshot(path) -> bytes:
    return decode_checkpoint((path / "checkpoint").read_bytes())[2]


async def until_forked(broker: Broker, task: asyncio.Task) -> None:
    while "append" not in vars(broker.store):
        assert not task.done(), "the checkpoint ended without forking"
        await asyncio.sleep(0.001)


@pytest.fixture
def always_fork(monkeypatch):
    monkeypatch.setattr(forked_snapshot, "FORK_MIN_ENTRIES", 0)
    monkeypatch.setattr(forked_snapshot, "REPLAY", False)  # a fork on real files too (test_replayed_snapshot.py)


async def test_a_forked_checkpoint_carries_what_happened_while_the_child_worked(tmp_path, always_fork):
    data, copy = tmp_path / "data", tmp_path / "copy"
    async with Broker(store=FileStore(data), checkpoint_bytes=1 << 40) as broker:
        await broker.create_queue("dlq")
        await broker.create_queue("q", dead_letter_queue="dlq")
        before = await broker.publish_batch("q", [Publish(body=b"old-%d" % i) for i in range(100)])
        snapshot = broker.core.snapshot

        def slow_snapshot():  # runs in the child: the operations below all happen while it works
            time.sleep(0.5)
            return snapshot()

        broker.core.snapshot = slow_snapshot
        task = asyncio.create_task(broker.checkpoint())
        await until_forked(broker, task)
        during = await broker.publish_batch("q", [Publish(body=b"new-%d" % i) for i in range(10)])
        deliveries = await broker.receive("q", 5)
        await broker.ack("q", [d.receipt for d in deliveries[:3]])
        await broker.nack("q", deliveries[3].receipt, dead_letter=True)
        await task
        assert "append" not in vars(broker.store)
        image, tail = snap.decode(stored_snapshot(data))
        assert stored_snapshot(data)[:2] == bytes([0x93, snap.TAILED]) and len(tail) >= 4
        await broker.store.flush()
        shutil.copytree(data, copy)  # the process dies here: no closing checkpoint
    async with Broker(store=FileStore(copy)) as broker:
        assert broker.recovery.records == 0  # all of it came from the checkpoint: image and tail
        ready = await broker.receive("q", 1000)
        gone = {d.id for d in deliveries[:4]}
        assert sorted(d.id for d in ready) == sorted(set(before + during) - gone)
        counts = {d.id: d.delivery_count for d in ready}
        assert counts.pop(deliveries[4].id) == 2 and set(counts.values()) == {1}  # its first delivery was kept
        assert [d.id for d in await broker.receive("dlq", 10)] == [deliveries[3].id]


async def test_a_clean_stop_forks_a_large_states_snapshot_and_the_loop_keeps_running(tmp_path, always_fork):
    """The checkpoint of a clean stop: a large state's snapshot is built in a child (here a slow one), so the loop
    goes on meanwhile; a restart finds every message in that checkpoint."""
    made_here: list[int] = []  # pids that built a snapshot in this process's memory (the child's list is its own)
    broker = Broker(store=FileStore(tmp_path), checkpoint_bytes=1 << 40)
    await broker.start()
    await broker.create_queue("q", lease_s=3600)
    ids = await broker.publish_batch("q", [Publish(body=b"m-%d" % i) for i in range(200)])
    leased = await broker.receive("q", 20)
    snapshot = broker.core.snapshot

    def slow_snapshot():
        made_here.append(os.getpid())
        time.sleep(0.3)  # in the child; on the loop it would hold it this long
        return snapshot()

    broker.core.snapshot = slow_snapshot
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    running = asyncio.create_task(ticker())
    try:
        await broker.close()
    finally:
        running.cancel()
    assert made_here == []  # not built in this process
    assert ticks >= 5, ticks  # ~30 turns of 10 ms while the child worked, none if the loop had been held
    async with Broker(store=FileStore(tmp_path)) as broker:
        assert broker.recovery.records == 0  # all of it from the closing checkpoint
        ready = await broker.receive("q", 1000)
        assert sorted(d.id for d in ready) == sorted(ids)
        counts = {d.id: d.delivery_count for d in ready}
        assert {counts[d.id] for d in leased} == {2}  # the leased ones came back, their first delivery counted


async def test_a_clean_stop_snapshots_a_small_state_on_the_loop(tmp_path):
    made_here: list[int] = []
    async with Broker(store=FileStore(tmp_path)) as broker:
        await broker.create_queue("q")
        ids = await broker.publish_batch("q", [Publish(body=b"x") for _ in range(10)])
        snapshot = broker.core.snapshot

        def noted_snapshot():
            made_here.append(os.getpid())
            return snapshot()

        broker.core.snapshot = noted_snapshot
    assert made_here == [os.getpid()]  # below the forking threshold: no child for it
    async with Broker(store=FileStore(tmp_path)) as broker:
        assert broker.recovery.records == 0
        assert [d.id for d in await broker.receive("q", 100)] == ids


async def test_a_child_that_fails_means_a_snapshot_made_on_the_loop(tmp_path, always_fork, monkeypatch):
    monkeypatch.setattr(forked_snapshot, "_child", lambda *args: os._exit(3))
    async with Broker(store=FileStore(tmp_path), checkpoint_bytes=1 << 40) as broker:
        await broker.create_queue("q")
        ids = await broker.publish_batch("q", [Publish(body=b"x") for _ in range(10)])
        await broker.checkpoint()
        assert "append" not in vars(broker.store)
        assert stored_snapshot(tmp_path)[:2] != bytes([0x93, snap.TAILED])
        await broker.store.flush()
        shutil.copytree(tmp_path, tmp_path.parent / "copy")
    async with Broker(store=FileStore(tmp_path.parent / "copy")) as broker:
        assert broker.recovery.records == 0
        assert [d.id for d in await broker.receive("q", 100)] == ids


async def test_an_append_the_tail_missed_drops_the_forked_image(always_fork):
    async with Broker(store=MemoryStore(), checkpoint_bytes=1 << 40) as broker:
        await broker.create_queue("q")
        await broker.publish_batch("q", [Publish(body=b"x") for _ in range(10)])
        task = asyncio.create_task(broker.checkpoint())
        await until_forked(broker, task)
        broker.store.stats().appends += 1  # as if some path appended around the wrapped `append`
        await task
        assert broker.store._snapshot[:2] != bytes([0x93, snap.TAILED])  # built on the loop instead


def test_small_states_and_other_systems_do_not_fork(monkeypatch):
    core = Broker.in_memory().core
    assert not forked_snapshot.worth_forking(core)  # empty
    monkeypatch.setattr(forked_snapshot, "FORK_MIN_ENTRIES", 0)
    assert forked_snapshot.worth_forking(core) == (sys.platform == "linux")
    monkeypatch.setattr(forked_snapshot.sys, "platform", "darwin")
    assert not forked_snapshot.worth_forking(core)


async def test_a_recovered_backlog_is_kept_out_of_full_collections_until_close(tmp_path, monkeypatch):
    monkeypatch.setattr(housekeeping_module, "GC_FREEZE_MIN_ENTRIES", 5)
    assert gc.get_freeze_count() == 0
    async with Broker(store=FileStore(tmp_path)) as broker:
        await broker.create_queue("q")
        await broker.publish_batch("q", [Publish(body=b"x") for _ in range(3)])
        assert gc.get_freeze_count() == 0  # nothing recovered: nothing frozen
    async with Broker(store=FileStore(tmp_path)) as broker:
        assert gc.get_freeze_count() == 0  # 3 entries: below the threshold
        await broker.publish_batch("q", [Publish(body=b"x") for _ in range(3)])
    async with Broker(store=FileStore(tmp_path)) as broker:
        assert gc.get_freeze_count() > 0
        deliveries = await broker.receive("q", 10)  # frozen objects still work, and are still freed
        assert len(deliveries) == 6
    assert gc.get_freeze_count() == 0


async def test_a_large_dedup_window_or_topic_history_forks_too(monkeypatch):
    """A snapshot walks remembered dedup ids and retained topic messages as well as queued entries: a queue with
    an empty backlog but a full dedup window (or a topic keeping its history) is as large a state to snapshot."""
    monkeypatch.setattr(forked_snapshot, "FORK_MIN_ENTRIES", 300)
    async with Broker.in_memory() as broker:
        await broker.create_queue("q", dedup_window_s=300)
        for start in (0, 200):
            await broker.publish_batch("q", [Publish(body=b"x", dedup_id=f"id-{i}") for i in range(start, start + 200)])
            await broker.ack("q", [d.receipt for d in await broker.receive("q", 200)])
        assert broker.queue_stats("q").ready == 0
        assert forked_snapshot.worth_forking(broker.core) == (sys.platform == "linux")  # 400 ids remembered
    async with Broker.in_memory() as broker:
        await broker.create_topic("t", retention_s=3600)
        await broker.publish_batch("t", [Publish(body=b"x") for _ in range(400)])
        assert forked_snapshot.worth_forking(broker.core) == (sys.platform == "linux")


@pytest.mark.skipif(sys.platform != "linux", reason="forked snapshots are Linux only")
async def test_what_forks_is_what_would_hold_the_loop_not_how_many_entries():
    """Plain messages are copied as columns (~0.1 us each): 12,000 of them snapshot on the loop in ~1 ms. As many
    delayed messages are objects, ~0.7 us each (~8 ms), and 3,000 messages of three priorities ~4 us each: those
    fork (the threshold used to count entries of any kind: 20,000)."""
    for name, options, forks in (("plain", {}, False), ("delayed", {"delay_s": 600}, True)):
        async with Broker.in_memory() as broker:
            await broker.create_queue(name)
            for _ in range(12):
                await broker.publish_batch(name, [Publish(body=b"x", **options) for _ in range(1000)])
            assert forked_snapshot.worth_forking(broker.core) == forks, name
    async with Broker.in_memory() as broker:
        await broker.create_queue("prio")
        await broker.publish_batch("prio", [Publish(body=b"x", priority=i % 3) for i in range(3000)])
        assert forked_snapshot.worth_forking(broker.core)


# -- a forked snapshot's pieces -------------------------------------------------------------------------------


def tailed_at_once(image: bytes, records: list) -> bytes:
    """The reference: a TAILED snapshot encoded in one call, as it was before it came in pieces."""
    return msgspec.msgpack.encode(snap.Tailed(snap.TAILED, image, records))


@settings(max_examples=200, deadline=None)
@given(
    image=st.lists(st.binary(max_size=300), max_size=4),
    image_size=st.sampled_from([0, 255, 256, 65_535, 65_536]),
    records=st.lists(
        st.tuples(st.integers(0, 1 << 62), st.integers(1, 40), st.binary(max_size=600), st.booleans()), max_size=40
    ),
    chunk=st.integers(1, 2_000),
)
def test_a_tail_in_pieces_is_the_tailed_snapshot_byte_for_byte(image, image_size, records, chunk):
    """Encoded as its records come, in buffers of a few hundred kilobytes, with MessagePack headers of our own
    around them: end to end, the same bytes as msgspec's encoding of the whole `Tailed` (what recovery decodes)."""
    image = [*image, bytes(image_size)]
    tail = snap.TailEncoder()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(snap, "TAIL_CHUNK_BYTES", chunk)
        for at in range(0, len(records), 7):  # as appends of several records come
            tail.add(
                (ref, kind, memoryview(payload) if view else payload)
                for ref, kind, payload, view in records[at : at + 7]
            )
    plain = [(ref, kind, payload) for ref, kind, payload, _ in records]
    assert tail.count == len(records)
    pieces = snap.tailed_pieces(image, tail)
    assert b"".join(pieces) == tailed_at_once(b"".join(image), plain)
    assert msgspec.msgpack.decode(b"".join(pieces), type=snap.Tailed).tail == plain


def test_array_headers_of_every_width():
    """A tail of 15, 16, 65,535 and 65,536 records: each width of MessagePack's array header."""
    for count in (15, 16, 65_535, 65_536):
        tail = snap.TailEncoder()
        tail.add((ref, 1, b"") for ref in range(count))
        assert b"".join(snap.tailed_pieces([b"i"], tail)) == tailed_at_once(
            b"i", [(ref, 1, b"") for ref in range(count)]
        )


async def test_a_forked_checkpoint_never_joins_its_tail(tmp_path, always_fork, monkeypatch):
    """A burst appended while the child works reaches the store as buffers of TAIL_CHUNK_BYTES or so, not as
    one buffer of the whole tail (its copy would hold the loop: 20-40 ms after a fast burst); the file the
    store writes from them holds the same snapshot, and a restart recovers every message from it."""
    monkeypatch.setattr(snap, "TAIL_CHUNK_BYTES", 4096)
    handed: list = []
    store = FileStore(tmp_path / "data")
    checkpoint = store.checkpoint

    async def keep(snapshot):
        handed.append(snapshot)
        await checkpoint(snapshot)

    store.checkpoint = keep
    async with Broker(store=store, checkpoint_bytes=1 << 40) as broker:
        await broker.create_queue("q")
        before = await broker.publish_batch("q", [Publish(body=b"old") for _ in range(10)])
        snapshot = broker.core.snapshot
        burst_done = tmp_path / "burst-done"

        def snapshot_after_the_burst():  # in the child: the image waits until the whole burst is in the tail
            deadline = time.monotonic() + 30
            while not burst_done.exists() and time.monotonic() < deadline:
                time.sleep(0.001)
            return snapshot()

        broker.core.snapshot = snapshot_after_the_burst
        task = asyncio.create_task(broker.checkpoint())
        await until_forked(broker, task)
        during = []
        for _ in range(20):
            during += await broker.publish_batch("q", [Publish(body=os.urandom(200)) for _ in range(50)])
        burst_done.touch()
        await task
        (pieces,) = handed
        assert not isinstance(pieces, bytes) and len(pieces) > 20
        assert len(snap.decode(b"".join(pieces))[1]) >= 1000  # the burst's records, at least, are the tail
        assert max(len(piece) for piece in pieces) < 4096 + 1024  # a buffer and at most one record more
        assert b"".join(pieces) == stored_snapshot(tmp_path / "data")
        await broker.store.flush()
        shutil.copytree(tmp_path / "data", tmp_path / "copy")
    async with Broker(store=FileStore(tmp_path / "copy")) as broker:
        assert broker.recovery.records == 0  # image and tail, all from the checkpoint
        assert sorted(d.id for d in await broker.receive("q", 2000)) == sorted(before + during)


@pytest.mark.parametrize("snapshot", [b"", b"s" * 2500, [b"s" * 700, bytearray(b"t" * 1800), memoryview(b"u" * 3)]])
async def test_the_file_store_writes_a_snapshot_in_pieces_as_one(tmp_path, snapshot, monkeypatch):
    """A snapshot given in pieces makes the same checkpoint file as its bytes joined, in synced steps that cross
    the pieces' boundaries."""
    monkeypatch.setattr(file_log, "CHECKPOINT_STEP_BYTES", 1000)
    monkeypatch.setattr(file_log, "CHECKPOINT_STEP_PAUSE_S", 0)
    joined = bytes(snapshot) if isinstance(snapshot, bytes) else b"".join(snapshot)
    files = []
    for form in (snapshot, joined):
        store = FileStore(tmp_path / str(len(files)))
        await store.open()
        store.append([(1, b"r")])
        await store.checkpoint(form)
        files.append((tmp_path / str(len(files)) / "checkpoint").read_bytes())
        assert store.stats().checkpoint_file_bytes == len(files[-1])
        await store.close()
    assert files[0] == files[1] and decode_checkpoint(files[0])[2] == joined
