"""Lapsed receipts: the latest receipt of a message whose lease ended still names it until it is leased again
(`Broker.ack(..., lapsed=True)`, SQS's DeleteMessage), an older one names nothing, and a plain ack is unchanged.
Receipts named twice in one call settle their message once."""

from __future__ import annotations

import pytest

from chute import Publish
from chute.errors import InvalidReceipt


async def _lapsed(broker, clock, queue: str = "q"):
    """Lease the next message for 10 s and let the lease end; return that delivery."""
    [delivery] = await broker.receive(queue, 1, lease_s=10)
    clock.advance(11)
    broker.tick()
    assert broker.queue_stats(queue).in_flight == 0
    return delivery


async def test_the_latest_receipt_of_a_lapsed_lease_removes_its_message_durably(broker, clock, reopen):
    await broker.create_queue("q")
    await broker.publish_batch("q", [Publish(body=b"a"), Publish(body=b"b")])
    first = await _lapsed(broker, clock)
    with pytest.raises(InvalidReceipt):  # a plain ack is as before: the lease is over
        await broker.ack("q", first.receipt)
    assert broker.queue_stats("q").ready == 2
    await broker.ack("q", first.receipt, lapsed=True)
    assert broker.queue_stats("q").ready == 1 and broker.core.index_sizes()["lapsed"] == 0
    with pytest.raises(InvalidReceipt):  # gone: its receipt names nothing any more
        await broker.ack("q", first.receipt, lapsed=True)
    broker = await reopen(broker)
    assert [d.body for d in await broker.receive("q", 10)] == [b"b"]
    await broker.close()


async def test_an_older_receipt_of_a_message_leased_again_names_nothing(broker, clock):
    await broker.create_queue("q")
    await broker.publish("q", b"x")
    first = await _lapsed(broker, clock)
    [second] = await broker.receive("q", 1, lease_s=10)
    assert second.id == first.id
    with pytest.raises(InvalidReceipt):
        await broker.ack("q", first.receipt, lapsed=True)
    assert broker.queue_stats("q").in_flight == 1
    await broker.ack("q", second.receipt)
    assert broker.core.index_sizes()["lapsed"] == 0 and broker.queue_stats("q").ready == 0


async def test_a_lapsed_group_head_removed_lets_its_group_move_on(broker, clock):
    await broker.create_queue("q", fifo=True)
    await broker.publish_batch("q", [Publish(body=b"1", group="g"), Publish(body=b"2", group="g")])
    head = await _lapsed(broker, clock)
    assert head.body == b"1"
    await broker.ack("q", head.receipt, lapsed=True)
    [following] = await broker.receive("q", 10)
    assert following.body == b"2"


async def test_a_receipt_named_twice_settles_its_message_once(broker):
    await broker.create_queue("q")
    await broker.create_queue("r")
    await broker.create_topic("t")
    await broker.subscribe("t", ">", "q")
    await broker.subscribe("t", ">", "r")
    await broker.publish_batch("t", [Publish(body=b"one"), Publish(body=b"two")])  # one body, two queues each
    deliveries = await broker.receive("q", 2, lease_s=10)
    await broker.nack("q", [deliveries[0].receipt] * 2)
    assert broker.queue_stats("q").ready == 1
    await broker.ack("q", [deliveries[1].receipt] * 2)
    stats = broker.queue_stats("q")
    assert (stats.ready, stats.in_flight, stats.acked) == (1, 0, 1)
    assert [d.body for d in await broker.receive("r", 10)] == [b"one", b"two"]  # the other queue's share is intact
