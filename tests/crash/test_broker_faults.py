"""A dead-letter queue fed by two subscriptions across a power cut (the other broker-level fault tests are in
test_faults.py)."""

from __future__ import annotations

from chute import Broker
from chute.storage import FileStore, MemoryFs


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
