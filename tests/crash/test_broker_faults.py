"""The broker over a failing disk: EIO and ENOSPC reject the affected publishes, keep what was confirmed, and
leave the broker serving reads; a power cut loses nothing confirmed."""

from __future__ import annotations

import errno

import pytest

from chute import Broker, Publish
from chute.errors import StorageFailed, StorageFull, StorageReadOnly
from chute.storage import FileStore, MemoryFs


@pytest.mark.parametrize(
    ("op", "code", "error"), [("fsync", errno.EIO, StorageFailed), ("write", errno.ENOSPC, StorageFull)]
)
async def test_failed_fsync_rejects_publishes_and_keeps_serving_reads(tmp_path, op, code, error):
    fs = MemoryFs()
    broker = await Broker(store=FileStore(tmp_path, fs=fs)).start()
    await broker.create_queue("q")
    await broker.publish_batch("q", [Publish(body=b"kept-%d" % i) for i in range(3)])
    fs.fail(op, code)
    with pytest.raises(error):
        await broker.publish("q", b"lost")
    assert not broker.healthy
    with pytest.raises(StorageReadOnly):
        await broker.publish("q", b"refused")
    got = await broker.receive("q", 10)  # reads go on
    assert [d.body for d in got] == [b"kept-0", b"kept-1", b"kept-2"]
    stats = broker.queue_stats("q")
    assert stats.ready + stats.in_flight == 3  # the failed publish is not in the queue
    await broker.close()
    fs.crash()
    async with Broker(store=FileStore(tmp_path, fs=fs)) as again:
        assert sorted(d.body for d in await again.receive("q", 10)) == [b"kept-0", b"kept-1", b"kept-2"]


async def test_power_cut_keeps_confirmed_publishes_and_acks(tmp_path):
    fs = MemoryFs()
    broker = await Broker(store=FileStore(tmp_path, fs=fs)).start()
    await broker.create_queue("q")
    await broker.publish_batch("q", [Publish(body=b"%d" % i) for i in range(10)])
    got = await broker.receive("q", 4)
    await broker.ack("q", [d.receipt for d in got])
    fs.crash()  # no close: the process and the machine are gone
    broker.store._executor.shutdown(wait=True)
    async with Broker(store=FileStore(tmp_path, fs=fs)) as again:
        assert [d.body for d in await again.receive("q", 20)] == [b"%d" % i for i in range(4, 10)]


async def test_shared_dead_letter_queue_survives_a_power_cut(tmp_path):
    """One topic message dead-lettered from two subscriptions into one DLQ: acking one copy stays acked."""
    fs = MemoryFs()
    broker = await Broker(store=FileStore(tmp_path, fs=fs), checkpoint_bytes=1 << 40).start()
    await broker.create_queue("dlq")
    await broker.create_topic("t")
    for name in ("a", "b"):
        await broker.create_queue(name, dead_letter_queue="dlq")
        await broker.subscribe("t", ">", name)
    await broker.publish("t", b"poison")
    for name in ("a", "b"):
        [delivery] = await broker.receive(name)
        await broker.nack(name, delivery.receipt, dead_letter=True)
    dead = await broker.receive("dlq", 10)
    assert len(dead) == 2 and dead[0].id == dead[1].id
    await broker.ack("dlq", [dead[0].receipt, dead[1].receipt])
    fs.crash()
    broker.store._executor.shutdown(wait=True)
    async with Broker(store=FileStore(tmp_path, fs=fs)) as again:
        assert await again.peek("dlq", 10) == []  # both acked copies stay acked
