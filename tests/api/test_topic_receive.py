"""`POST /api/v1/topics/{name}/receive`: an ephemeral subscription for the duration of one request. It gets what
is published while it waits (by pattern and filter), at most once, and leaves nothing in the broker however the
request ends: answered, timed out, its client gone, refused."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from chute.server.users import Grant, User, hash_password
from chute.testing import serving
from tests.api.conftest import Api

pytestmark = pytest.mark.timeout(60)


def ephemeral_left(api: Api) -> list:
    core = api.server.server.broker.core
    queues = [q.name for q in core.queues.values() if q.ephemeral]
    subscriptions = [s.queue.name for t in core.topics.values() for s in t.subscriptions.values() if s.queue.ephemeral]
    return queues + subscriptions


async def until_subscribed(api: Api, topic: str) -> None:
    async with asyncio.timeout(10):
        while not api.server.server.broker.core.topics[topic].subscriptions:
            await asyncio.sleep(0.005)


async def test_a_receive_gets_what_is_published_while_it_waits(api):
    await api.ok("PUT", "/topics/orders")
    await api.ok("POST", "/topics/orders/messages", {"body": "before", "subject": "orders.eu"})
    poll = asyncio.ensure_future(api.ok("POST", "/topics/orders/receive", {
        "pattern": "orders.*", "filter": {"kind": "new"}, "max_messages": 10, "wait_s": 30}))  # fmt: skip
    await until_subscribed(api, "orders")
    [subscription] = (await api.ok("GET", "/topics/orders/subscriptions"))["subscriptions"]
    assert subscription["ephemeral"] is True and subscription["pattern"] == "orders.*"
    await api.ok("POST", "/topics/orders/messages/batch", {"messages": [
        {"body": "skipped", "subject": "orders.eu", "headers": {"kind": "old"}},
        {"body": "one", "subject": "orders.eu", "headers": {"kind": "new"}},
        {"body": "two", "subject": "orders.us", "headers": {"kind": "new"}},
    ]})  # fmt: skip
    reply = await poll
    assert [d["message"]["body"] for d in reply["deliveries"]] == ["one", "two"]
    assert all(d["receipt"] is None and d["lease_deadline"] is None for d in reply["deliveries"])
    assert ephemeral_left(api) == []
    assert (await api.ok("GET", "/topics/orders/subscriptions"))["subscriptions"] == []


async def test_a_receive_that_times_out_or_answers_at_once_leaves_nothing(api):
    await api.ok("PUT", "/topics/t")
    assert (await api.ok("POST", "/topics/t/receive", {"wait_s": 0.1}))["deliveries"] == []
    assert (await api.ok("POST", "/topics/t/receive"))["deliveries"] == []
    assert ephemeral_left(api) == []


async def test_a_client_that_hangs_up_leaves_nothing(api):
    await api.ok("PUT", "/topics/t")
    async with aiohttp.ClientSession() as other:
        request = other.post(f"{api.base}/api/v1/topics/t/receive", json={"wait_s": 30})
        poll = asyncio.ensure_future(request.__aenter__())
        await until_subscribed(api, "t")
        poll.cancel()
    async with asyncio.timeout(10):
        while ephemeral_left(api):
            await asyncio.sleep(0.01)


async def test_bad_requests_make_nothing(api):
    await api.ok("PUT", "/queues/q")
    await api.ok("PUT", "/topics/t")
    assert (await api.error("POST", "/topics/missing/receive", {}))[:2] == (404, "topic_not_found")
    assert (await api.error("POST", "/topics/q/receive", {}))[:2] == (404, "topic_not_found")
    assert (await api.error("POST", "/topics/t/receive", {"pattern": "a.>.b"}))[:2] == (400, "invalid_name")
    assert (await api.error("POST", "/topics/t/receive", {"filter": {"k": {"bad-op": 1}}}))[1] == "invalid_argument"
    assert (await api.error("POST", "/topics/t/receive", {"wait_s": 61}))[1] == "invalid_argument"
    assert ephemeral_left(api) == []


async def test_it_takes_the_consume_permission_on_the_topic():
    users = [
        User(name="reader", password_hash=hash_password("pw", log2_n=10),
             grants=[Grant(allow=["consume"], topics="t")]),
        User(name="writer", password_hash=hash_password("pw", log2_n=10),
             grants=[Grant(allow=["publish", "manage"], topics="t"), Grant(allow=["consume"], queues="*")]),
    ]  # fmt: skip
    async with serving(users=users, token="root") as running, aiohttp.ClientSession() as session:
        api = Api(running, session)
        await api.ok("PUT", "/topics/t", headers={"Authorization": "Bearer root"})
        reader = aiohttp.encode_basic_auth("reader", "pw")
        writer = aiohttp.encode_basic_auth("writer", "pw")
        assert (await api.ok("POST", "/topics/t/receive", {}, headers={"Authorization": reader})) == {
            "deliveries": []}  # fmt: skip
        status, name, _ = await api.error("POST", "/topics/t/receive", {}, headers={"Authorization": writer})
        assert (status, name) == (403, "forbidden")
        assert ephemeral_left(api) == []
