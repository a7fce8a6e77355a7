"""Queue features: dead-lettering, redrive, TTL, overflow, rate limits, dedup, FIFO groups, consumers, restarts."""

from __future__ import annotations

import asyncio

import pytest

from chute import Publish
from chute.errors import InvalidArgument, QueueFull, QueueInUse
from tests.processes import without_checkpoint


async def test_max_deliveries_dead_letters_then_redrive(broker, clock):
    await broker.create_queue("dlq")
    await broker.create_queue("q", lease_s=1, max_deliveries=2, dead_letter_queue="dlq")
    await broker.publish("q", b"poison")
    for _ in range(2):
        assert len(await broker.receive("q")) == 1
        clock.advance(2)
        broker.tick()
    assert await broker.receive("q") == []
    [dead] = await broker.peek("dlq")
    assert (dead.body, dead.dead_letter_reason, dead.dead_letter_source) == (b"poison", "max_deliveries", "q")
    assert broker.queue_stats("q").dead_lettered == 1
    assert await broker.redrive("dlq") == 1
    [back] = await broker.receive("q")
    assert back.body == b"poison" and back.delivery_count == 1
    with pytest.raises(QueueInUse):
        await broker.delete_queue("dlq")


@pytest.mark.parametrize("restart", ["replayed", "checkpointed"])
async def test_a_dead_letter_queue_in_use_cannot_be_deleted_until_no_queue_names_it(broker, reopen, restart):
    # which queues name a dead-letter queue is kept as settings change, and rebuilt by recovery: from the log's
    # records (a stop without a checkpoint, as after a crash), or from a checkpoint's queues
    async def restarted(old):
        return await reopen(without_checkpoint(old) if restart == "replayed" else old)

    async def refused(name: str, users: str) -> None:
        with pytest.raises(QueueInUse, match=f"dead-letter queue of {users}$"):
            await broker.delete_queue(name)

    for name in ("dlq", "dlq2"):
        await broker.create_queue(name)
    await broker.create_queue("a", dead_letter_queue="dlq")
    await broker.create_queue("b", dead_letter_queue="dlq")
    await refused("dlq", "a, b")
    await broker.update_queue("a", dead_letter_queue="dlq2")
    for _ in range(2):  # as it is, then after a restart
        await refused("dlq", "b")
        await refused("dlq2", "a")
        broker = await restarted(broker)
    await broker.delete_queue("b")
    await broker.update_queue("a", dead_letter_queue=None)
    broker = await restarted(broker)
    await broker.delete_queue("dlq")
    await broker.delete_queue("dlq2")
    assert broker.core.dead_letter_users == {}
    await broker.create_queue("dlq")  # the name again: nobody names it
    await broker.delete_queue("dlq")
    await broker.close()


async def test_nack_dead_letter_is_rejected(broker):
    await broker.create_queue("dlq")
    await broker.create_queue("q", dead_letter_queue="dlq")
    await broker.publish("q", b"bad")
    [d] = await broker.receive("q")
    await broker.nack("q", d.receipt, dead_letter=True)
    [dead] = await broker.receive("dlq")
    assert dead.dead_letter_reason == "rejected"


async def test_without_dead_letter_queue_messages_are_dropped(broker, clock):
    await broker.create_queue("q", lease_s=1, max_deliveries=1)
    await broker.publish("q", b"x")
    await broker.receive("q")
    clock.advance(2)
    broker.tick()
    stats = broker.queue_stats("q")
    assert (stats.ready, stats.in_flight, stats.dead_lettered) == (0, 0, 1)


async def test_ttl_expiry_dead_letters(broker, clock):
    await broker.create_queue("dlq")
    await broker.create_queue("q", retention_s=60, dead_letter_queue="dlq")
    await broker.publish("q", b"default-ttl")
    await broker.publish("q", b"short", ttl_s=5)
    clock.advance(6)
    broker.tick()
    assert [d.body for d in await broker.peek("q")] == [b"default-ttl"]
    clock.advance(60)
    broker.tick()
    assert broker.queue_stats("q").ready == 0
    dead = await broker.receive("dlq", 10)
    assert sorted(d.body for d in dead) == [b"default-ttl", b"short"]
    assert {d.dead_letter_reason for d in dead} == {"expired"}


async def test_receive_dead_letters_what_expired_before_its_timer_and_delivers_the_rest(broker, clock):
    await broker.create_queue("dlq")
    await broker.create_queue("q", dead_letter_queue="dlq")
    for body, ttl in ((b"a", None), (b"b", 5), (b"c", None), (b"d", 5), (b"e", 50)):
        await broker.publish("q", body, ttl_s=ttl)
    clock.advance(6)  # no tick: the receive finds the expired ones itself
    got = await broker.receive("q", 3)
    assert [d.body for d in got] == [b"a", b"c", b"e"]
    dead = await broker.receive("dlq", 10)
    assert sorted((d.body, d.dead_letter_reason) for d in dead) == [(b"b", "expired"), (b"d", "expired")]
    assert broker.queue_stats("q").ready == 0


async def test_on_expiry_drop_deletes_expired_messages_but_still_dead_letters_the_rest(broker, clock, reopen):
    await broker.create_queue("dlq")
    await broker.create_queue("q", retention_s=60, dead_letter_queue="dlq", lease_s=1, max_deliveries=1,
                              on_expiry="drop")  # fmt: skip
    await broker.publish("q", b"old")
    clock.advance(61)
    broker.tick()
    assert broker.queue_stats("q").ready == 0 and broker.queue_stats("dlq").ready == 0  # dropped, as SQS does
    await broker.publish("q", b"poison")
    await broker.receive("q")
    clock.advance(2)  # the lease ends after the only delivery allowed: dead-lettered, not dropped
    broker.tick()
    assert [d.dead_letter_reason for d in await broker.peek("dlq")] == ["max_deliveries"]
    broker = await reopen(broker)  # the setting is durable
    [info] = [q for q in broker.list_queues() if q.name == "q"]
    assert info.settings.on_expiry == "drop"
    await broker.publish("q", b"after restart", ttl_s=5)
    clock.advance(6)
    broker.tick()
    assert broker.queue_stats("q").ready == 0 and broker.queue_stats("dlq").ready == 1
    info = await broker.update_queue("q", on_expiry="dead-letter")
    assert info.settings.on_expiry == "dead-letter"
    await broker.publish("q", b"kept", ttl_s=5)
    clock.advance(6)
    broker.tick()
    assert sorted(d.dead_letter_reason for d in await broker.peek("dlq", 10)) == ["expired", "max_deliveries"]
    await broker.close()


async def test_on_expiry_must_be_dead_letter_or_drop(broker):
    for bad in ("later", None, 1):
        with pytest.raises(InvalidArgument):
            await broker.create_queue("q", on_expiry=bad)
    await broker.create_queue("q")
    with pytest.raises(InvalidArgument):
        await broker.update_queue("q", on_expiry="sometimes")


async def test_expired_while_leased_dead_letters_when_lease_ends(broker, clock):
    await broker.create_queue("dlq")
    await broker.create_queue("q", lease_s=10, dead_letter_queue="dlq")
    await broker.publish("q", b"x", ttl_s=5)
    await broker.receive("q")
    clock.advance(11)
    broker.tick()
    assert broker.queue_stats("q").ready == 0
    assert broker.queue_stats("dlq").ready == 1


async def test_overflow_reject(broker):
    await broker.create_queue("q", max_length=3)
    await broker.publish_batch("q", [Publish(body=b"1"), Publish(body=b"2")])
    with pytest.raises(QueueFull):
        await broker.publish_batch("q", [Publish(body=b"3"), Publish(body=b"4")])
    assert broker.queue_stats("q").ready == 2  # the whole batch was refused
    await broker.publish("q", b"3")
    with pytest.raises(QueueFull):
        await broker.publish("q", b"4")


async def test_overflow_max_bytes(broker):
    await broker.create_queue("q", max_bytes=10)
    await broker.publish("q", b"x" * 8)
    with pytest.raises(QueueFull):
        await broker.publish("q", b"x" * 3)
    await broker.publish("q", b"x" * 2)


async def test_overflow_drop_oldest_into_dead_letter_queue(broker):
    await broker.create_queue("dlq")
    await broker.create_queue("q", max_length=2, overflow="drop-oldest", dead_letter_queue="dlq")
    for body in (b"1", b"2", b"3", b"4"):
        await broker.publish("q", body)
    assert [d.body for d in await broker.receive("q", 10)] == [b"3", b"4"]
    dead = await broker.receive("dlq", 10)
    assert [(d.body, d.dead_letter_reason) for d in dead] == [(b"1", "overflow"), (b"2", "overflow")]


async def test_rate_limit_paces_a_spike(broker, clock):
    await broker.create_queue("q", rate_limit=10, rate_burst=5)
    await broker.publish_batch("q", [Publish(body=b"%d" % i) for i in range(30)])
    assert len(await broker.receive("q", 100)) == 5
    assert await broker.receive("q", 100) == []
    clock.advance(1.0)
    assert len(await broker.receive("q", 100)) == 5  # 10/s, capped by the burst size
    clock.advance(0.35)
    assert len(await broker.receive("q", 100)) == 3
    assert broker.queue_stats("q").ready == 17  # nothing was dropped


async def test_dedup_window(broker, clock):
    await broker.create_queue("q", dedup_window_s=60)
    first = await broker.publish("q", b"a", dedup_id="order-1")
    again = await broker.publish("q", b"a-again", dedup_id="order-1")
    assert first == again
    ids = await broker.publish_batch("q", [Publish(body=b"b", dedup_id="o2"), Publish(body=b"b2", dedup_id="o2")])
    assert ids[0] == ids[1] != first
    assert broker.queue_stats("q").ready == 2
    clock.advance(61)
    third = await broker.publish("q", b"a", dedup_id="order-1")
    assert third != first
    assert broker.queue_stats("q").ready == 3


async def test_fifo_groups_one_in_flight_per_group(broker):
    await broker.create_queue("q", fifo=True)
    await broker.publish_batch(
        "q",
        [Publish(body=b"a1", group="a"), Publish(body=b"a2", group="a"), Publish(body=b"b1", group="b"),
         Publish(body=b"a3", group="a"), Publish(body=b"b2", group="b")],
    )  # fmt: skip
    first = await broker.receive("q", 10)
    assert [d.body for d in first] == [b"a1", b"b1"]  # groups run in parallel, one each
    assert await broker.receive("q", 10) == []
    await broker.ack("q", first[0].receipt)
    [a2] = await broker.receive("q", 10)
    assert a2.body == b"a2"
    await broker.nack("q", a2.receipt)  # a2 stays its group's head
    [a2_again] = await broker.receive("q", 10)
    assert a2_again.body == b"a2"
    await broker.ack("q", [a2_again.receipt, first[1].receipt])
    assert [d.body for d in await broker.receive("q", 10)] == [b"a3", b"b2"]  # publish order


async def test_fifo_group_head_nacked_with_delay_stays_first(broker, clock):
    await broker.create_queue("q", fifo=True)
    await broker.publish_batch("q", [Publish(body=b"1", group="g"), Publish(body=b"2", group="g")])
    [one] = await broker.receive("q")
    await broker.nack("q", one.receipt, delay_s=5)
    assert await broker.receive("q") == []
    clock.advance(6)
    broker.tick()
    assert [d.body for d in await broker.receive("q", 5)] == [b"1"]


async def test_consumer_prefetch_and_release_on_close(broker):
    await broker.create_queue("q", lease_s=300)
    await broker.publish_batch("q", [Publish(body=b"%d" % i) for i in range(10)])
    consumer = broker.consume("q", prefetch=3)
    got = [await consumer.__anext__() for _ in range(3)]
    assert broker.queue_stats("q").in_flight == 3
    await consumer.ack(got[0])
    got.append(await consumer.__anext__())
    assert [d.body for d in got] == [b"0", b"1", b"2", b"3"]
    await consumer.close()
    stats = broker.queue_stats("q")
    assert (stats.in_flight, stats.ready) == (0, 9)  # released at once, not after the lease
    [again] = await broker.receive("q")
    assert again.body == b"1" and again.delivery_count == 2


async def test_long_poll_woken_by_publish(store_kind, tmp_path):
    from chute import Broker
    from tests.conftest import make_store

    async with Broker(store=make_store(store_kind, tmp_path / "d")) as broker:
        await broker.create_queue("q")
        waiter = asyncio.create_task(broker.receive("q", wait_s=10))
        await asyncio.sleep(0)
        assert not waiter.done()
        await broker.publish("q", b"wake")
        [d] = await asyncio.wait_for(waiter, 5)
        assert d.body == b"wake"
        assert await broker.receive("q", wait_s=0.05) == []


async def test_restart_keeps_unacked_and_forgets_acked(broker, reopen, clock):
    await broker.create_queue("dlq")
    await broker.create_queue("q", dead_letter_queue="dlq", max_deliveries=3)
    await broker.publish_batch("q", [Publish(body=b"%d" % i) for i in range(6)])
    await broker.publish("q", b"delayed", delay_s=100)
    got = await broker.receive("q", 3)
    await broker.ack("q", [got[0].receipt, got[1].receipt])
    await broker.nack("q", got[2].receipt, dead_letter=True)
    broker2 = await reopen(broker)
    try:
        rest = await broker2.receive("q", 10)
        assert [d.body for d in rest] == [b"3", b"4", b"5"]
        await broker2.ack("q", [d.receipt for d in rest])
        [dead] = await broker2.receive("dlq")
        assert (dead.body, dead.dead_letter_reason) == (b"2", "rejected")
        clock.advance(101)
        broker2.tick()
        assert [d.body for d in await broker2.receive("q", 10)] == [b"delayed"]
    finally:
        await broker2.close()


async def test_restart_keeps_delivery_counts_and_settings(broker, reopen):
    await broker.create_queue("q", lease_s=7, fifo=True)
    await broker.publish("q", b"x", group="g")
    await broker.receive("q")
    broker2 = await reopen(broker)
    try:
        assert broker2.list_queues()[0].settings.lease_s == 7
        [d] = await broker2.receive("q")
        assert d.delivery_count == 2
    finally:
        await broker2.close()


async def test_dedup_window_ends_on_time_after_restarts(broker, reopen, clock):
    """Regression (found by the model test): a dedup id whose window ended before a restart must not come back."""
    await broker.create_queue("q", dedup_window_s=300)
    await broker.publish("q", b"b", dedup_id="b")
    old_a = await broker.publish("q", b"a", dedup_id="a")
    clock.advance(400)
    await broker.publish("q", b"b2", dedup_id="b")
    broker2 = await reopen(broker)
    try:
        assert await broker2.publish("q", b"a2", dedup_id="a") != old_a
    finally:
        await broker2.close()


async def test_real_timers_redeliver_and_undelay(store_kind, tmp_path):
    """With the real clock and auto_tick, lease ends and delays fire on their own and wake long polls."""
    from chute import Broker
    from tests.conftest import make_store

    async with Broker(store=make_store(store_kind, tmp_path / "d")) as broker:
        await broker.create_queue("q", lease_s=0.05)
        await broker.publish("q", b"x")
        [first] = await broker.receive("q")
        [again] = await asyncio.wait_for(broker.receive("q", wait_s=5), 10)  # woken by the lease timer
        assert again.id == first.id and again.delivery_count == 2
        await broker.ack("q", again.receipt)
        await broker.publish("q", b"later", delay_s=0.05)
        [later] = await asyncio.wait_for(broker.receive("q", wait_s=5), 10)  # woken by the delay timer
        assert later.body == b"later"


async def test_fifo_order_survives_a_restart_with_the_head_in_flight(broker, reopen):
    await broker.create_queue("q", fifo=True)
    await broker.publish_batch("q", [Publish(body=b"%d" % i, group="g") for i in range(3)])
    [head] = await broker.receive("q")
    assert head.body == b"0"
    broker2 = await reopen(broker)
    try:
        got = []
        while deliveries := await broker2.receive("q", 10):
            got += [d.body for d in deliveries]
            await broker2.ack("q", [d.receipt for d in deliveries])
        assert got == [b"0", b"1", b"2"]
    finally:
        await broker2.close()


async def test_a_dead_letter_queue_with_a_ttl_expires_what_is_dead_lettered_into_it(broker, clock, reopen):
    """The dead-letter queue's own TTL counts from when a message enters it (as RabbitMQ does); the TTL of the
    queue it left, or its own, does not follow it. A redriven message gets its source queue's TTL anew."""
    await broker.create_queue("dlq", retention_s=30)
    await broker.create_queue("q", retention_s=60, dead_letter_queue="dlq")
    await broker.publish("q", b"rejected")
    [d] = await broker.receive("q")
    await broker.nack("q", d.receipt, dead_letter=True)
    clock.advance(20)
    broker.tick()
    [dead] = await broker.peek("dlq")
    assert dead.body == b"rejected"
    clock.advance(11)  # 31 s in the dead-letter queue
    broker.tick()
    assert broker.queue_stats("dlq").ready == 0  # expired there (dropped: the dead-letter queue has none of its own)
    await broker.publish("q", b"expired", ttl_s=5)
    clock.advance(6)
    broker.tick()
    assert broker.queue_stats("dlq").ready == 1
    broker = await reopen(broker)  # the expiry in the dead-letter queue survives a restart
    clock.advance(25)
    broker.tick()
    assert broker.queue_stats("dlq").ready == 1
    assert await broker.redrive("dlq") == 1  # back in "q", whose 60 s TTL starts again
    clock.advance(59)
    broker.tick()
    assert [m.body for m in await broker.peek("q")] == [b"expired"]
    clock.advance(2)
    broker.tick()
    assert broker.queue_stats("q").ready == 0 and broker.queue_stats("dlq").ready == 1
    await broker.close()
