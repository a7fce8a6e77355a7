"""A message routed from a topic takes its subscription queue's default delay and TTL (its own still win), and a
restart rebuilds the same ready and expiry times, whether it replays the log or loads a checkpoint."""

from __future__ import annotations

import pytest

from chute import Publish
from chute.core.queue import DELAYED


async def _subscribed(broker) -> None:
    await broker.create_queue("dlq")
    await broker.create_queue("slow", delay_s=10)
    await broker.create_queue("short", retention_s=5, dead_letter_queue="dlq")
    await broker.create_queue("both", delay_s=20, retention_s=60)
    await broker.create_queue("plain")
    await broker.create_topic("t")
    for queue in ("slow", "short", "both", "plain"):
        await broker.subscribe("t", ">", queue)


def _times(broker) -> dict:
    """queue -> {message id: (ready time, expiry) in ms}: what a restart must rebuild."""
    times = {}
    for name, queue in broker.core.queues.items():
        times[name] = {
            e.id: (int(e.deadline * 1000) if e.state == DELAYED else 0, int(e.expires * 1000))
            for e in queue.entries()
        }  # fmt: skip
    return times


async def _bodies(broker, name):
    return sorted(d.body for d in await broker.peek(name, 100))


async def test_routed_messages_take_the_queues_defaults(broker, clock):
    await _subscribed(broker)
    await broker.publish("t", b"default")
    await broker.publish("t", b"own", delay_s=0, ttl_s=100)
    await broker.publish_batch("t", [Publish(body=b"late", delay_s=30)])
    assert await _bodies(broker, "plain") == [b"default", b"late", b"own"]
    assert await _bodies(broker, "short") == [b"default", b"late", b"own"]
    assert broker.queue_stats("slow").delayed == 2  # default (its 10 s), late (its own 30 s)
    assert await _bodies(broker, "slow") == [b"default", b"late", b"own"]
    assert [d.body for d in await broker.receive("slow", 10)] == [b"own"]  # its own delay 0 wins
    clock.advance(6)
    broker.tick()
    dead = [(d.body, d.dead_letter_reason) for d in await broker.peek("dlq")]
    assert dead == [(b"default", "expired"), (b"late", "expired")]  # "own" has its own TTL of 100 s
    clock.advance(5)
    broker.tick()
    assert [d.body for d in await broker.receive("slow", 10)] == [b"default"]
    assert [d.body for d in await broker.receive("both", 10)] == [b"own"]
    clock.advance(10)
    broker.tick()
    assert [d.body for d in await broker.receive("both", 10)] == [b"default"]
    assert broker.queue_stats("plain").delayed == 1  # only "late" waits there: plain has no default


async def test_a_direct_publish_and_a_routed_one_land_alike(broker):
    await _subscribed(broker)
    await broker.publish("t", b"routed")
    await broker.publish("both", b"direct")
    [(routed_ready, routed_expiry), (direct_ready, direct_expiry)] = _times(broker)["both"].values()
    assert (routed_ready, routed_expiry) == (direct_ready, direct_expiry)


@pytest.mark.parametrize("checkpoint", ["none", "before", "after"])
async def test_a_restart_rebuilds_the_same_times(broker, clock, reopen, store_kind, checkpoint):
    await _subscribed(broker)
    await broker.publish("t", b"first")
    if checkpoint == "before":
        await broker.checkpoint()  # the snapshot holds "first"; "second" is replayed from the log after it
    clock.advance(1)
    await broker.publish_batch("t", [Publish(body=b"second"), Publish(body=b"own", ttl_s=2, delay_s=1)])
    if checkpoint == "after":
        await broker.checkpoint()
    await broker.update_queue("slow", delay_s=500)  # later settings do not change what was published before
    await broker.update_queue("short", retention_s=500)
    expected = _times(broker)
    assert expected["slow"] and expected["short"]
    broker = await reopen(broker)
    assert _times(broker) == expected
    clock.advance(4)  # 5 s after "first", 4 s after the others
    broker.tick()
    assert await _bodies(broker, "short") == [b"second"]  # "first" expired at 5 s, "own" at 2 s
    assert await _bodies(broker, "dlq") == [b"first", b"own"]


async def test_retained_messages_take_the_new_subscriptions_default_ttl(broker, clock, reopen):
    await broker.create_topic("t", retention_s=3600)
    await broker.publish("t", b"old")
    clock.advance(100)
    await broker.publish("t", b"new")
    await broker.publish("t", b"own", ttl_s=1000)
    await broker.create_queue("dlq")
    await broker.create_queue("short", retention_s=150, dead_letter_queue="dlq")
    await broker.subscribe("t", ">", "short", start="earliest")
    clock.advance(60)  # "old" is 160 s old, "new" 60 s: the queue's TTL counts from the publish time
    broker.tick()
    assert await _bodies(broker, "dlq") == [b"old"]
    broker = await reopen(broker)
    assert await _bodies(broker, "short") == [b"new", b"own"]
    clock.advance(100)
    broker.tick()
    assert await _bodies(broker, "short") == [b"own"]  # its own TTL of 1,000 s wins
    assert await _bodies(broker, "dlq") == [b"new", b"old"]


async def test_a_delivery_shows_the_expiry_it_has_in_its_queue(broker, clock):
    await _subscribed(broker)
    await broker.publish("t", b"m")
    [short] = await broker.receive("short")
    [plain] = await broker.receive("plain")
    assert (short.message.expires_at, plain.message.expires_at) == (clock() + 5, None)
    [peeked] = await broker.peek("both")
    assert peeked.message.expires_at == clock() + 60
