"""The README's examples, run as written (with a loop bounded where the README's runs forever)."""

from __future__ import annotations

import asyncio

import chute


async def test_readme_examples(tmp_path):
    async with chute.Broker(tmp_path / "chute-data") as broker:
        await broker.create_queue("jobs", lease_s=30)
        await broker.publish("jobs", b'{"resize": 42}', headers={"kind": "image"})
        for delivery in await broker.receive("jobs", max_messages=10, wait_s=5):
            await broker.ack("jobs", delivery.receipt)

        await broker.publish("jobs", b"pushed")
        async with broker.consume("jobs", prefetch=50) as consumer:
            async for delivery in consumer:
                await consumer.ack(delivery)
                break

        await broker.create_queue("work.dlq")
        await broker.create_queue("work", max_deliveries=5, dead_letter_queue="work.dlq")
        await broker.publish("work", b"job")
        [delivery] = await broker.receive("work")
        await broker.nack("work", delivery.receipt, delay_s=30)
        await broker.publish("work", b"bad job")
        [delivery] = await broker.receive("work")
        await broker.nack("work", delivery.receipt, dead_letter=True)
        assert await broker.redrive("work.dlq") == 1

        await broker.create_queue("payments", fifo=True, dedup_window_s=300)
        await broker.publish("payments", b"paid", group="order-17", dedup_id="evt-991", priority=5)
        await broker.publish("payments", b"remind", delay_s=3600, ttl_s=86400)

        await broker.create_queue("emails.dlq")
        await broker.create_queue(
            "emails", max_length=100_000, overflow="drop-oldest", dead_letter_queue="emails.dlq", rate_limit=50
        )

        await broker.create_topic("orders", retention_s=86400)
        await broker.create_queue("eu-big")
        await broker.publish("orders", b"early", subject="orders.new.eu", headers={"amount": "250"})
        await broker.subscribe(
            "orders", "orders.*.eu", "eu-big", filter={"amount": {"range": {"gte": 100}}}, start="earliest"
        )
        async with await broker.subscribe_ephemeral("orders", "orders.>") as live:
            await broker.publish("orders", b"...", subject="orders.new.eu", headers={"amount": "250"})
            delivery = await asyncio.wait_for(live.__anext__(), 5)
            assert delivery.body == b"..."

        stats = broker.queue_stats("eu-big")
        assert stats.ready == 2  # the retained message and the new one
        assert len(await broker.peek("eu-big", 10)) == 2
