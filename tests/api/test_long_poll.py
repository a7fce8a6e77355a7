"""Long polling and concurrency over HTTP: a waiting receive is answered by a publish from another request, a
client that hangs up during a long poll loses nothing, a stopping server answers waiting polls, many concurrent
requests deliver every message exactly once, HTTP and the native protocol see the same broker, and requests
during recovery are told to come back (503) instead of reading half-restored state."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

import chute
from chute import Broker
from chute.server import Server, ServerConfig
from chute.storage.memory import MemoryStore
from chute.testing import RunningServer, serving
from tests.api.conftest import Api

pytestmark = pytest.mark.timeout(60)
WAIT_LIMIT_S = 10.0


async def until(condition, what: str) -> None:
    """Wait (bounded) until `condition()` holds, yielding to the server's tasks between checks."""
    deadline = time.monotonic() + WAIT_LIMIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def waiting(api: Api, queue: str) -> bool:
    return bool(api.server.server.broker._waiters.get(queue))


async def test_long_poll_is_answered_by_a_publish(api):
    await api.ok("PUT", "/queues/q")
    started = time.monotonic()
    poll = asyncio.ensure_future(api.ok("POST", "/queues/q/receive", {"wait_s": 30}))
    await until(lambda: waiting(api, "q"), "the receive to wait in the broker")
    await api.ok("POST", "/queues/q/messages", {"body": "wake up"})
    [delivery] = (await asyncio.wait_for(poll, WAIT_LIMIT_S))["deliveries"]
    assert delivery["message"]["body"] == "wake up" and time.monotonic() - started < WAIT_LIMIT_S


async def test_long_poll_with_nothing_to_receive_returns_empty(api):
    await api.ok("PUT", "/queues/q")
    started = time.monotonic()
    assert (await api.ok("POST", "/queues/q/receive", {"wait_s": 0.3}))["deliveries"] == []
    assert time.monotonic() - started >= 0.25


async def test_a_client_that_hangs_up_during_a_long_poll_loses_nothing(api):
    await api.ok("PUT", "/queues/q", {"lease_s": 600})  # a lost lease would hide the message for 10 minutes
    async with aiohttp.ClientSession() as other:
        request = other.post(f"{api.base}/api/v1/queues/q/receive", json={"wait_s": 30})
        poll = asyncio.ensure_future(request.__aenter__())
        await until(lambda: waiting(api, "q"), "the receive to wait in the broker")
        poll.cancel()
    await until(lambda: not waiting(api, "q"), "the abandoned poll to end")
    await api.ok("POST", "/queues/q/messages", {"body": "not lost"})
    [delivery] = (await api.ok("POST", "/queues/q/receive", {"wait_s": 5}))["deliveries"]
    assert delivery["message"]["body"] == "not lost" and delivery["delivery_count"] == 1


async def test_a_client_that_hangs_up_after_the_lease_gets_its_messages_released(api):
    """The poll leases the message after the client is gone but before the server noticed: it is released."""
    await api.ok("PUT", "/queues/q", {"lease_s": 600})
    async with aiohttp.ClientSession() as other:
        request = other.post(f"{api.base}/api/v1/queues/q/receive", json={"wait_s": 30})
        poll = asyncio.ensure_future(request.__aenter__())
        await until(lambda: waiting(api, "q"), "the receive to wait in the broker")
        poll.cancel()
        await asyncio.gather(poll, return_exceptions=True)
    await api.ok("POST", "/queues/q/messages", {"body": "maybe leased by the abandoned poll"})
    stats = api.server.server.broker.queue_stats
    await until(lambda: stats("q").in_flight == 0 and stats("q").ready == 1, "the message to be ready")


async def test_stopping_server_answers_waiting_long_polls():
    async with serving() as server, aiohttp.ClientSession() as session:
        api = Api(server, session)
        await api.ok("PUT", "/queues/q")
        poll = asyncio.ensure_future(api.call("POST", "/queues/q/receive", {"wait_s": 50}))
        await until(lambda: waiting(api, "q"), "the receive to wait in the broker")
        started = time.monotonic()
        stopping = asyncio.ensure_future(server.server.stop())
        status, payload = await asyncio.wait_for(poll, WAIT_LIMIT_S)
        await stopping
        assert (status, payload) == (200, {"deliveries": []}) and time.monotonic() - started < WAIT_LIMIT_S


async def test_concurrent_publishes_then_receives_deliver_each_message_exactly_once(api):
    await api.ok("PUT", "/queues/q")
    count = 50
    published = await asyncio.gather(*(api.ok("POST", "/queues/q/messages", {"body": f"m{i}"}) for i in range(count)))
    ids = {reply["id"] for reply in published}
    assert len(ids) == count
    replies = await asyncio.gather(
        *(api.ok("POST", "/queues/q/receive", {"max_messages": 3, "wait_s": 0.5}) for _ in range(30))
    )
    deliveries = [d for reply in replies for d in reply["deliveries"]]
    assert sorted(d["message"]["id"] for d in deliveries) == sorted(ids)  # every one, none twice
    await asyncio.gather(*(api.ok("POST", "/queues/q/ack", {"receipts": [d["receipt"]]}) for d in deliveries))
    stats = await api.ok("GET", "/queues/q/stats")
    assert (stats["ready"], stats["in_flight"], stats["acked"]) == (0, 0, count)


async def test_http_and_native_clients_share_queues(api):
    await api.ok("PUT", "/queues/from-http", {"max_deliveries": 4})
    async with chute.AsyncClient(api.server.url) as client:
        assert [q.name for q in await client.list_queues()] == ["from-http"]
        await client.create_queue("from-native", lease_s=12)
        detail = await api.ok("GET", "/queues/from-native")
        assert detail["settings"]["lease_s"] == 12
        await api.ok("POST", "/queues/from-native/messages", {"body": "to native"})
        [delivery] = await client.receive("from-native", wait_s=5)
        assert delivery.body == b"to native"
        await client.ack(delivery)
        message_id = await client.publish("from-http", b"\x00\xff binary")
        [received] = (await api.ok("POST", "/queues/from-http/receive", {}))["deliveries"]
        assert received["message"]["id"] == str(message_id) and received["message"]["body_encoding"] == "base64"


class _SlowStore(MemoryStore):
    """A store whose recovery waits until the test lets it finish."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def open(self):
        await self.release.wait()
        return await super().open()


async def test_requests_during_recovery_get_503_then_work(tmp_path):
    store = _SlowStore()
    config = ServerConfig(data_dir=str(tmp_path), host="127.0.0.1", port=0, http_port=0, fsync="never")
    server = Server(config, broker=Broker(store=store))
    starting = asyncio.ensure_future(server.start())
    try:
        await until(lambda: server.http_port is not None, "the HTTP listener")
        async with aiohttp.ClientSession() as session:
            api = Api(RunningServer("", 0, server.http_port, str(tmp_path), server), session)
            status, name, message = await api.error("GET", "/queues")
            assert (status, name) == (503, "broker_closed") and "recovering" in message
            assert (await api.error("PUT", "/queues/q"))[:2] == (503, "broker_closed")
            store.release.set()
            await asyncio.wait_for(starting, WAIT_LIMIT_S)
            await api.ok("PUT", "/queues/q", expect=201)
    finally:
        store.release.set()
        await asyncio.wait_for(asyncio.shield(starting), WAIT_LIMIT_S)
        await server.stop()
