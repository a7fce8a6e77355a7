"""Queues over HTTP, as a client in any language would use them: create, list, describe, update, delete, stats;
publish (single, batch, UTF-8 and base64 bodies, binary bodies), peek, receive, ack, nack, extend, purge, redrive."""

from __future__ import annotations

import asyncio
import base64

import pytest

pytestmark = pytest.mark.timeout(60)


async def test_create_is_idempotent_and_conflicts_on_other_settings(api):
    created = await api.ok("PUT", "/queues/jobs", {"lease_s": 5, "max_deliveries": 3}, expect=201)
    assert created["name"] == "jobs" and created["settings"]["lease_s"] == 5
    assert created["stats"]["ready"] == 0 and created["dead_letter_sources"] == []
    again = await api.ok("PUT", "/queues/jobs", {"lease_s": 5, "max_deliveries": 3}, expect=200)
    assert again["settings"] == created["settings"]
    assert (await api.error("PUT", "/queues/jobs", {"lease_s": 6}))[:2] == (409, "queue_exists")
    assert (await api.ok("PUT", "/queues/defaults", expect=201))["settings"]["lease_s"] == 30  # no body: defaults


async def test_list_describe_update_delete(api):
    await api.ok("PUT", "/queues/dead")
    await api.ok("PUT", "/queues/b", {"dead_letter_queue": "dead", "max_deliveries": 2})
    await api.ok("PUT", "/queues/a")
    listed = await api.ok("GET", "/queues")
    assert [q["name"] for q in listed["queues"]] == ["a", "b", "dead"]
    dead = await api.ok("GET", "/queues/dead")
    assert dead["dead_letter_sources"] == ["b"]
    updated = await api.ok("PATCH", "/queues/a", {"lease_s": 7, "max_length": 10, "rate_limit": None})
    assert (updated["settings"]["lease_s"], updated["settings"]["max_length"]) == (7, 10)
    cleared = await api.ok("PATCH", "/queues/a", {"max_length": None})
    assert cleared["settings"]["max_length"] is None and cleared["settings"]["lease_s"] == 7
    assert (await api.error("PATCH", "/queues/a", {"lease_s": -1}))[:2] == (400, "invalid_argument")
    assert (await api.ok("GET", "/queues/a"))["settings"]["lease_s"] == 7  # nothing half-applied
    assert (await api.ok("GET", "/queues/a"))["settings"]["on_expiry"] == "dead-letter"
    assert (await api.ok("PATCH", "/queues/a", {"on_expiry": "drop"}))["settings"]["on_expiry"] == "drop"
    assert (await api.error("PATCH", "/queues/a", {"on_expiry": "later"}))[:2] == (400, "invalid_argument")
    assert (await api.error("DELETE", "/queues/dead"))[:2] == (409, "queue_in_use")
    assert await api.ok("DELETE", "/queues/a", expect=204) is None
    assert (await api.error("GET", "/queues/a"))[:2] == (404, "queue_not_found")
    stats = await api.ok("GET", "/queues/b/stats")
    assert stats["name"] == "b" and stats["ready"] == 0 and "oldest_age_s" in stats


async def test_publish_receive_ack_round_trip(api):
    await api.ok("PUT", "/queues/q")
    published = await api.ok("POST", "/queues/q/messages", {"body": "hello", "headers": {"k": "v"}, "priority": 3},
                             expect=201)  # fmt: skip
    assert isinstance(published["id"], str) and published["id"].isdigit()
    [peeked] = (await api.ok("GET", "/queues/q/messages"))["messages"]
    assert peeked["receipt"] is None and peeked["message"]["body"] == "hello"
    reply = await api.ok("POST", "/queues/q/receive", {"max_messages": 10, "lease_s": 60})
    [delivery] = reply["deliveries"]
    message = delivery["message"]
    assert (message["id"], message["body"], message["body_encoding"]) == (published["id"], "hello", "utf-8")
    assert message["headers"] == {"k": "v"} and message["priority"] == 3 and delivery["delivery_count"] == 1
    assert isinstance(delivery["receipt"], str) and delivery["lease_deadline"] > message["publish_time"]
    assert (await api.ok("GET", "/queues/q/stats"))["in_flight"] == 1
    assert await api.ok("POST", "/queues/q/ack", {"receipts": [delivery["receipt"]]}) == {}
    stats = await api.ok("GET", "/queues/q/stats")
    assert (stats["ready"], stats["in_flight"], stats["acked"]) == (0, 0, 1)
    status, name, _ = await api.error("POST", "/queues/q/ack", {"receipts": [delivery["receipt"]]})
    assert (status, name) == (400, "invalid_receipt")
    _, payload = await api.call("POST", "/queues/q/ack", {"receipts": [delivery["receipt"], "12345"]})
    assert sorted(payload["error"]["receipts"]) == sorted([delivery["receipt"], "12345"])


async def test_batch_publish_keeps_order_and_receive_respects_max_messages(api):
    await api.ok("PUT", "/queues/q")
    bodies = [f"m{i}" for i in range(20)]
    ids = (await api.ok("POST", "/queues/q/messages/batch", {"messages": [{"body": b} for b in bodies]}))["ids"]
    assert len(ids) == 20 and len(set(ids)) == 20
    first = (await api.ok("POST", "/queues/q/receive", {"max_messages": 15}))["deliveries"]
    rest = (await api.ok("POST", "/queues/q/receive", {"max_messages": 15}))["deliveries"]
    assert [d["message"]["body"] for d in first + rest] == bodies and len(first) == 15
    assert (await api.ok("POST", "/queues/q/receive", {}))["deliveries"] == []  # empty body: the defaults
    assert (await api.ok("POST", "/queues/q/receive"))["deliveries"] == []


async def test_binary_and_base64_bodies(api):
    await api.ok("PUT", "/queues/q")
    raw = bytes(range(256))
    await api.ok("POST", "/queues/q/messages", {"body": base64.b64encode(raw).decode(), "body_encoding": "base64"})
    await api.ok("POST", "/queues/q/messages", {"body": base64.b64encode(b"text").decode(), "body_encoding": "base64"})
    await api.ok("POST", "/queues/q/messages", {"body": "héllo ✓"})
    deliveries = (await api.ok("POST", "/queues/q/receive", {"max_messages": 3}))["deliveries"]
    binary, text, unicode = (d["message"] for d in deliveries)
    assert binary["body_encoding"] == "base64" and base64.b64decode(binary["body"]) == raw
    assert (text["body"], text["body_encoding"]) == ("text", "utf-8")  # valid UTF-8 comes back as text
    assert unicode["body"] == "héllo ✓"
    status, name, message = await api.error("POST", "/queues/q/messages", {"body": "%%%", "body_encoding": "base64"})
    assert (status, name) == (400, "invalid_argument") and "base64" in message
    status, name, message = await api.error(
        "POST", "/queues/q/messages/batch", {"messages": [{"body": "ok"}, {"body": "!", "body_encoding": "base64"}]}
    )
    assert (status, name) == (400, "invalid_argument") and "messages[1]" in message
    assert (await api.ok("GET", "/queues/q/stats"))["published"] == 3  # the failed batch stored nothing


async def test_nack_extend_and_dead_letter_then_redrive(api):
    await api.ok("PUT", "/queues/dlq")
    await api.ok("PUT", "/queues/q", {"dead_letter_queue": "dlq"})
    await api.ok("POST", "/queues/q/messages/batch", {"messages": [{"body": "a"}, {"body": "b"}]})
    a, b = (await api.ok("POST", "/queues/q/receive", {"max_messages": 2, "lease_s": 30}))["deliveries"]
    await api.ok("POST", "/queues/q/extend", {"receipts": [a["receipt"]], "lease_s": 600})
    assert (await api.ok("POST", "/queues/q/receive", {}))["deliveries"] == []  # both still leased
    assert (await api.error("POST", "/queues/q/extend", {"receipts": ["1"], "lease_s": 5}))[1] == "invalid_receipt"
    await api.ok("POST", "/queues/q/nack", {"receipts": [a["receipt"]]})
    await api.ok("POST", "/queues/q/nack", {"receipts": [b["receipt"]], "dead_letter": True})
    [redelivered] = (await api.ok("POST", "/queues/q/receive", {}))["deliveries"]
    assert redelivered["message"]["body"] == "a" and redelivered["delivery_count"] == 2
    [dead] = (await api.ok("GET", "/queues/dlq/messages?max_messages=5"))["messages"]
    assert (dead["dead_letter_reason"], dead["dead_letter_source"]) == ("rejected", "q")
    assert await api.ok("POST", "/queues/dlq/redrive", {"max_messages": None}) == {"moved": 1}
    assert await api.ok("POST", "/queues/dlq/redrive") == {"moved": 0}
    assert (await api.ok("GET", "/queues/q/stats"))["ready"] == 1
    assert await api.ok("POST", "/queues/q/purge") == {"purged": 1}
    assert (await api.ok("GET", "/queues/q/stats"))["in_flight"] == 1  # purge keeps what is in flight


async def test_peek_bounds_and_queue_full(api):
    await api.ok("PUT", "/queues/q", {"max_length": 3})
    await api.ok("POST", "/queues/q/messages/batch", {"messages": [{"body": str(i)} for i in range(3)]})
    assert len((await api.ok("GET", "/queues/q/messages?max_messages=2"))["messages"]) == 2
    for bad in ("0", "101", "x", "1.5"):
        assert (await api.error("GET", f"/queues/q/messages?max_messages={bad}"))[:2] == (400, "invalid_argument")
    status, name, _ = await api.error("POST", "/queues/q/messages", {"body": "over"})
    assert (status, name) == (429, "queue_full")


async def test_a_publish_refused_by_a_reject_dead_letter_queue_is_dead_lettered(api):
    """overflow `reject-dead-letter` (RabbitMQ's reject-publish-dlx) for a publish over HTTP: 429 queue_full, and
    the refused message in the dead-letter queue, reason overflow."""
    await api.ok("PUT", "/queues/dlq")
    await api.ok("PUT", "/queues/q", {"max_length": 1, "overflow": "reject-dead-letter", "dead_letter_queue": "dlq"})
    await api.ok("POST", "/queues/q/messages", {"body": "kept"})
    status, name, _ = await api.error("POST", "/queues/q/messages", {"body": "over"})
    assert (status, name) == (429, "queue_full")
    async with asyncio.timeout(5):  # placed once durable, after the refusal was answered
        while not (dead := (await api.ok("GET", "/queues/dlq/messages"))["messages"]):
            await asyncio.sleep(0.01)
    shown = [(d["message"]["body"], d["dead_letter_reason"], d["dead_letter_source"]) for d in dead]
    assert shown == [("over", "overflow", "q")]
    assert [d["message"]["body"] for d in (await api.ok("GET", "/queues/q/messages"))["messages"]] == ["kept"]
    status, name, text = await api.error("PATCH", "/queues/q", {"overflow": "reject-publish-dlx"})
    assert (status, name) == (400, "invalid_argument") and "overflow" in text


async def test_queue_routes_do_not_reach_topics(api):
    await api.ok("PUT", "/topics/t")
    assert (await api.error("POST", "/queues/t/messages", {"body": "x"}))[:2] == (404, "queue_not_found")
    assert (await api.error("GET", "/queues/t"))[:2] == (404, "queue_not_found")
    assert (await api.error("PUT", "/queues/t"))[:2] == (409, "topic_exists")
