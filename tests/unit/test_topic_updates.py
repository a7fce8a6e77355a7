"""Changing a topic's settings and a subscription's filter: applied at once, nothing half-applied on bad input,
and the same after a restart, both from a snapshot and by replaying the log (update_topic, update_subscription)."""

from __future__ import annotations

import pytest

from chute.errors import InvalidArgument, SubscriptionNotFound, TopicNotFound


async def _restart(broker, reopen, *, replay: bool):
    """A clean restart; with `replay`, without the closing checkpoint, so recovery replays the META records."""
    if replay:

        async def no_checkpoint(snapshot: bytes) -> None:
            return None

        broker.store.checkpoint = no_checkpoint
    return await reopen(broker)


async def test_update_topic_changes_settings_and_refuses_bad_ones(broker):
    await broker.create_topic("t")
    info = await broker.update_topic("t", retention_s=60, dedup_window_s=10)
    assert (info.settings.retention_s, info.settings.dedup_window_s) == (60, 10)
    for bad in ({"retention_s": -1}, {"dedup_window_s": "x"}, {"no_such_setting": 1}, {"retention_bytes": 0}):
        with pytest.raises(InvalidArgument):
            await broker.update_topic("t", **bad)
    assert broker.list_topics()[0].settings.retention_s == 60  # nothing half-applied
    with pytest.raises(TopicNotFound):
        await broker.update_topic("nope", retention_s=5)


async def test_lower_retention_trims_at_once_and_new_retention_keeps_new_messages(broker):
    await broker.create_topic("t", retention_bytes=10_000)
    for _ in range(5):
        await broker.publish("t", b"x" * 100)
    assert len(broker.core.topics["t"].retained) == 5
    await broker.update_topic("t", retention_bytes=250)
    assert len(broker.core.topics["t"].retained) == 2
    await broker.update_topic("t", retention_bytes=None)  # retention off: nothing retained any more
    assert len(broker.core.topics["t"].retained) == 0
    await broker.publish("t", b"y")
    assert len(broker.core.topics["t"].retained) == 0


@pytest.mark.parametrize("replay", [False, True], ids=["snapshot", "replay"])
async def test_topic_update_survives_restart(broker, reopen, replay):
    await broker.create_topic("t")
    await broker.create_queue("q")
    await broker.publish("t", b"before")  # not retained: retention was off
    await broker.update_topic("t", retention_s=1000, dedup_window_s=5)
    await broker.publish("t", b"after")
    broker2 = await _restart(broker, reopen, replay=replay)
    try:
        [topic] = broker2.list_topics()
        assert (topic.settings.retention_s, topic.settings.dedup_window_s) == (1000, 5)
        await broker2.subscribe("t", ">", "q", start="earliest")
        assert [d.body for d in await broker2.receive("q", 10)] == [b"after"]
    finally:
        await broker2.close()


async def test_update_subscription_replaces_the_filter(broker):
    await broker.create_topic("t")
    await broker.create_queue("q")
    await broker.subscribe("t", ">", "q", filter={"k": "a"})
    info = await broker.update_subscription("t", ">", "q", filter={"k": "b"})
    assert (info.pattern, info.queue, info.filter) == (">", "q", {"k": {"eq": "b"}})
    await broker.publish("t", b"a", headers={"k": "a"})
    await broker.publish("t", b"b", headers={"k": "b"})
    assert [d.body for d in await broker.receive("q", 10)] == [b"b"]
    info = await broker.update_subscription("t", ">", "q", filter=None)
    assert info.filter is None
    await broker.publish("t", b"c", headers={"k": "c"})
    assert [d.body for d in await broker.receive("q", 10)] == [b"c"]


async def test_update_subscription_errors_change_nothing(broker):
    await broker.create_topic("t")
    await broker.create_queue("q")
    await broker.subscribe("t", ">", "q", filter={"k": "a"})
    with pytest.raises(SubscriptionNotFound):
        await broker.update_subscription("t", "a.b", "q", filter=None)  # no such binding: none is created
    with pytest.raises(InvalidArgument):
        await broker.update_subscription("t", ">", "q", filter={"k": {"bogus": 1}})
    with pytest.raises(TopicNotFound):
        await broker.update_subscription("nope", ">", "q", filter=None)
    [subscription] = broker.list_topics()[0].subscriptions
    assert subscription.filter == {"k": {"eq": "a"}}


@pytest.mark.parametrize("replay", [False, True], ids=["snapshot", "replay"])
async def test_subscription_update_survives_restart(broker, reopen, replay):
    await broker.create_topic("t")
    await broker.create_queue("q")
    await broker.subscribe("t", ">", "q", filter={"k": "a"})
    await broker.update_subscription("t", ">", "q", filter={"k": "b"})
    broker2 = await _restart(broker, reopen, replay=replay)
    try:
        [subscription] = broker2.list_topics()[0].subscriptions
        assert subscription.filter == {"k": {"eq": "b"}}
        await broker2.publish("t", b"a", headers={"k": "a"})
        await broker2.publish("t", b"b", headers={"k": "b"})
        assert [d.body for d in await broker2.receive("q", 10)] == [b"b"]
    finally:
        await broker2.close()
