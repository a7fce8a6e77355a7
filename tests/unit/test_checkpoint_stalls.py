"""Housekeeping in slices: compaction's search runs in steps between which the queues change (acks, leases), and
what it moves stays correct."""

from __future__ import annotations

import pytest

from chute import Broker, Publish
from chute.core import compaction
from chute.storage import FileStore

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
