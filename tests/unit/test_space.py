"""Space: acked messages free their files; a few stuck messages are compacted forward instead of pinning files;
checkpoints bound what recovery replays."""

from __future__ import annotations

import asyncio
import threading

from chute import Broker, Publish
from chute.storage import FileStore


async def test_acked_messages_free_their_segments(tmp_path):
    async with Broker(store=FileStore(tmp_path, segment_max_bytes=16 * 1024), checkpoint_bytes=1 << 40) as broker:
        await broker.create_queue("q")
        for _ in range(20):
            await broker.publish_batch("q", [Publish(body=b"x" * 200) for _ in range(50)])
        grown = broker.store.stats().segments
        while deliveries := await broker.receive("q", 100):
            await broker.ack("q", [d.receipt for d in deliveries])
        await broker.checkpoint()
        assert broker.store.stats().segments <= 2 < grown


async def test_stuck_messages_are_compacted_forward(tmp_path):
    async with Broker(store=FileStore(tmp_path, segment_max_bytes=16 * 1024), checkpoint_bytes=1 << 40) as broker:
        await broker.create_queue("q", lease_s=3600)
        stuck_ids = []
        for batch in range(20):
            ids = await broker.publish_batch("q", [Publish(body=b"%d-%d" % (batch, i) * 20) for i in range(50)])
            stuck_ids.append(ids[0])  # the first message of each batch is never acked
        while deliveries := await broker.receive("q", 100):
            await broker.ack("q", [d.receipt for d in deliveries if d.id not in stuck_ids])
        grown = broker.store.stats().bytes_on_disk
        await broker.checkpoint()  # finds sparse segments and copies their live records forward
        await broker.checkpoint()  # covers the copies: the old segments go
        assert broker.store.stats().bytes_on_disk < grown / 4
    async with Broker(store=FileStore(tmp_path, segment_max_bytes=16 * 1024)) as broker:
        stats = broker.queue_stats("q")
        assert stats.ready == len(stuck_ids)
        bodies = sorted(d.body for d in await broker.receive("q", 100))
        assert bodies == sorted(b"%d-0" % batch * 20 for batch in range(20))


async def test_restart_replays_only_the_tail_after_a_checkpoint(tmp_path):
    async with Broker(store=FileStore(tmp_path)) as broker:
        await broker.create_queue("q")
        for _ in range(10):
            await broker.publish_batch("q", [Publish(body=b"x") for _ in range(100)])
        await broker.checkpoint()
        await broker.publish("q", b"tail")
    store = FileStore(tmp_path)
    async with Broker(store=store) as broker:
        assert broker.recovery.records <= 2  # close() checkpointed too: nothing or almost nothing to replay
        assert broker.queue_stats("q").ready == 1001


async def test_an_idle_broker_checkpoints_once_its_interval_is_over(tmp_path):
    """After a busy spell the broker goes quiet: the checkpoint still follows, so the acked messages' files go and
    the checkpoint stands for the (empty) state, without waiting for the next client request."""
    store = FileStore(tmp_path, segment_max_bytes=16 * 1024)
    async with Broker(store=store, checkpoint_bytes=1 << 40, checkpoint_interval_s=0.3) as broker:
        await broker.create_queue("q")
        for _ in range(20):
            await broker.publish_batch("q", [Publish(body=b"x" * 200) for _ in range(50)])
        while deliveries := await broker.receive("q", 100):
            await broker.ack("q", [d.receipt for d in deliveries])
        grown = store.stats().segments
        checkpoints = broker.checkpoints
        for _ in range(200):  # nothing else is asked of the broker meanwhile
            if broker.checkpoints > checkpoints and store.stats().segments <= 2:
                break
            await asyncio.sleep(0.02)
        assert broker.checkpoints > checkpoints
        assert store.stats().segments <= 2 < grown


async def test_commits_go_on_while_a_checkpoint_file_is_written(tmp_path):
    """The checkpoint's file is written on its own thread: a publish made while that write is held (a slow disk,
    a large checkpoint) is confirmed without waiting for it."""
    store = FileStore(tmp_path)
    entered, gate = threading.Event(), threading.Event()
    real = store.fs._write_file

    def write_file(path, data) -> None:
        if path.endswith("checkpoint.tmp"):
            entered.set()
            gate.wait(30)
        real(path, data)

    store.fs._write_file = write_file
    async with Broker(store=store, checkpoint_bytes=1 << 40) as broker:
        await broker.create_queue("q")
        await broker.publish("q", b"before")
        checkpoint = asyncio.ensure_future(broker.checkpoint())
        try:
            assert await asyncio.to_thread(entered.wait, 10)
            await asyncio.wait_for(broker.publish("q", b"during"), 10)  # confirmed while the checkpoint is held
            assert not checkpoint.done()
        finally:
            gate.set()
        await checkpoint
    async with Broker(store=FileStore(tmp_path)) as broker:
        assert sorted(d.body for d in await broker.receive("q", 10)) == [b"before", b"during"]
