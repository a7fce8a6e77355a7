"""Topics and subscriptions over HTTP: create, list, describe, update, delete; publish with subjects; subscribe,
change a subscription's filter, unsubscribe; retention with `start: earliest`."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.timeout(60)


async def bodies(api, queue: str) -> list[str]:
    reply = await api.ok("POST", f"/queues/{queue}/receive", {"max_messages": 100})
    return [d["message"]["body"] for d in reply["deliveries"]]


async def test_topic_lifecycle(api):
    created = await api.ok("PUT", "/topics/orders", {"retention_s": 60}, expect=201)
    assert created == {"name": "orders", "settings": {**created["settings"], "retention_s": 60}, "subscriptions": []}
    await api.ok("PUT", "/topics/orders", {"retention_s": 60}, expect=200)
    assert (await api.error("PUT", "/topics/orders", {"retention_s": 61}))[:2] == (409, "topic_exists")
    await api.ok("PUT", "/topics/audit", expect=201)
    assert [t["name"] for t in (await api.ok("GET", "/topics"))["topics"]] == ["audit", "orders"]
    updated = await api.ok("PATCH", "/topics/orders", {"retention_bytes": 1000, "retention_s": None})
    assert (updated["settings"]["retention_bytes"], updated["settings"]["retention_s"]) == (1000, None)
    assert (await api.error("PATCH", "/topics/orders", {"retention_bytes": 0}))[:2] == (400, "invalid_argument")
    assert (await api.ok("GET", "/topics/orders"))["settings"]["retention_bytes"] == 1000
    assert await api.ok("DELETE", "/topics/orders", expect=204) is None
    assert (await api.error("GET", "/topics/orders"))[:2] == (404, "topic_not_found")
    assert (await api.error("PUT", "/queues/audit"))[:2] == (409, "topic_exists")  # one namespace


async def test_subscriptions_route_by_pattern_and_filter(api):
    await api.ok("PUT", "/topics/orders")
    for queue in ("eu", "all"):
        await api.ok("PUT", f"/queues/{queue}")
    sub = await api.ok("POST", "/topics/orders/subscriptions", {"pattern": "orders.*.eu", "queue": "eu"}, expect=201)
    assert (sub["topic"], sub["pattern"], sub["queue"], sub["filter"]) == ("orders", "orders.*.eu", "eu", None)
    await api.ok("POST", "/topics/orders/subscriptions", {"queue": "all", "filter": {"vip": "yes"}})
    listed = (await api.ok("GET", "/topics/orders/subscriptions"))["subscriptions"]
    assert sorted((s["pattern"], s["queue"]) for s in listed) == [(">", "all"), ("orders.*.eu", "eu")]
    await api.ok("POST", "/topics/orders/messages", {"body": "1", "subject": "orders.new.eu"}, expect=201)
    await api.ok("POST", "/topics/orders/messages/batch", {"messages": [
        {"body": "2", "subject": "orders.new.us", "headers": {"vip": "yes"}},
        {"body": "3", "subject": "orders.paid.eu", "headers": {"vip": "no"}},
    ]})  # fmt: skip
    assert await bodies(api, "eu") == ["1", "3"]
    assert await bodies(api, "all") == ["2"]

    changed = await api.ok("PATCH", "/topics/orders/subscriptions?pattern=%3E&queue=all", {"filter": None})
    assert changed["filter"] is None
    await api.ok("POST", "/topics/orders/messages", {"body": "4", "headers": {"vip": "no"}})
    assert await bodies(api, "all") == ["4"]
    status, name, _ = await api.error("PATCH", "/topics/orders/subscriptions?pattern=a.b&queue=all", {"filter": None})
    assert (status, name) == (404, "subscription_not_found")
    bad_filter = {"filter": {"vip": {"bogus": 1}}}
    status, name, _ = await api.error("PATCH", "/topics/orders/subscriptions?pattern=%3E&queue=all", bad_filter)
    assert (status, name) == (400, "invalid_argument")

    assert await api.ok("DELETE", "/topics/orders/subscriptions?pattern=%3E&queue=all", expect=204) is None
    status, name, _ = await api.error("DELETE", "/topics/orders/subscriptions?pattern=%3E&queue=all")
    assert (status, name) == (404, "subscription_not_found")
    await api.ok("POST", "/topics/orders/messages", {"body": "5"})
    assert await bodies(api, "all") == []


async def test_subscription_errors(api):
    await api.ok("PUT", "/topics/t")
    await api.ok("PUT", "/queues/q")
    status, name, _ = await api.error("POST", "/topics/t/subscriptions", {"queue": "missing"})
    assert (status, name) == (404, "queue_not_found")
    status, name, _ = await api.error("POST", "/topics/t/subscriptions", {"queue": "q", "pattern": "a.>.b"})
    assert (status, name) == (400, "invalid_name")
    status, name, _ = await api.error("POST", "/topics/t/subscriptions", {"queue": "q", "start": "yesterday"})
    assert (status, name) == (400, "invalid_argument")
    assert (await api.error("POST", "/topics/t/messages", {"body": "x", "subject": "a.*"}))[1] == "invalid_name"
    assert (await api.error("POST", "/topics/q/messages", {"body": "x"}))[:2] == (404, "topic_not_found")
    assert (await api.ok("GET", "/topics/t"))["subscriptions"] == []


async def test_retained_messages_for_a_new_subscription(api):
    await api.ok("PUT", "/topics/t", {"retention_s": 3600})
    await api.ok("POST", "/topics/t/messages", {"body": "old"})
    await api.ok("PUT", "/queues/late")
    await api.ok("POST", "/topics/t/subscriptions", {"queue": "late", "start": "earliest"})
    await api.ok("POST", "/topics/t/messages", {"body": "new"})
    assert await bodies(api, "late") == ["old", "new"]
