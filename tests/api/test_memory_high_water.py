"""HTTP API publishes count toward the memory high-water mark, like native ones: from before their body is read
until they are durable or failed, their bytes are held (`Server.publish_bytes`, the metric
`chute_unconfirmed_publish_bytes`); over the mark a publish route answers 503 `server_busy` with `Retry-After: 1`
before reading the body, and nothing of it is published; below half of the mark publishes go through again; the
accounting comes back to 0 after a success, a failure and a client that hangs up.

Durability is held by making the file store's fsync wait (the store's writer thread blocks in `Fs._fsync` until
the test releases it), so publishes stay in flight as long as a test needs."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import json
import re
import time

import aiohttp
import pytest

import chute
from chute.testing import serving
from tests.api.conftest import Api
from tests.held_fsync import HeldFsync

pytestmark = pytest.mark.timeout(60)
MARK = 2**20  # the smallest memory_high_water_bytes allowed
BODY = 300_000  # four of these are over the mark
WAIT_LIMIT_S = 10.0


@pytest.fixture
async def running():
    async with serving(fsync="always", memory_high_water_bytes=MARK) as server:
        yield server


@pytest.fixture
async def fsync(running):
    held = HeldFsync(running)
    try:
        yield held
    finally:
        held.release()  # a stopping server flushes: never leave its writer waiting


@pytest.fixture
async def api(running):
    async with aiohttp.ClientSession() as session:
        yield Api(running, session)


async def until(condition, what: str) -> None:
    """Wait (bounded) until `condition()` holds, yielding to the server's tasks between checks."""
    deadline = time.monotonic() + WAIT_LIMIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def message(size: int = BODY, fill: str = "a") -> dict:
    return {"body": fill * size}


async def metric(api: Api, name: str) -> float:
    async with api.session.get(api.base + "/metrics") as response:
        text = await response.text()
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} is not in /metrics"
    return float(found.group(1))


async def raw_request(port: int, path: str, length: int, body: bytes = b"", *, extra: str = ""):
    """Open a connection and send a POST's head announcing `length` bytes of body, and `body` (maybe less)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {length}\r\n\r\n")  # fmt: skip
    writer.write(head.encode() + body)
    await writer.drain()
    return reader, writer


async def closed(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def over_the_mark(api: Api, fsync: HeldFsync) -> list[asyncio.Future]:
    """Hold fsync and start publishes (queue, queue batch, topic, topic batch) whose bodies together exceed the
    mark; returns them once the server is over it."""
    server = api.server.server
    fsync.hold()
    publishes = [
        asyncio.ensure_future(api.call("POST", "/queues/q/messages", message())),
        asyncio.ensure_future(api.call("POST", "/queues/q/messages/batch", {"messages": [message(BODY // 2)] * 2})),
        asyncio.ensure_future(api.call("POST", "/topics/t/messages", {**message(), "subject": "t.x"})),
        asyncio.ensure_future(api.call("POST", "/topics/t/messages/batch",
                                       {"messages": [{**message(BODY // 2), "subject": "t.y"}] * 2})),
    ]  # fmt: skip
    await until(lambda: server.memory_paused, "the memory high-water mark")
    assert server.publish_bytes > MARK
    return publishes


async def make_queue_and_topic(api: Api) -> None:
    await api.ok("PUT", "/queues/q")
    await api.ok("PUT", "/queues/fed")
    await api.ok("PUT", "/topics/t")
    await api.ok("POST", "/topics/t/subscriptions", {"pattern": "t.>", "queue": "fed"})


async def test_in_flight_http_publishes_are_counted_until_durable(api, fsync):
    server = api.server.server
    await make_queue_and_topic(api)
    assert server.publish_bytes == 0
    fsync.hold()
    one = asyncio.ensure_future(api.call("POST", "/queues/q/messages", message()))
    batch = asyncio.ensure_future(api.call("POST", "/topics/t/messages/batch",
                                           {"messages": [{**message(1000), "subject": "t.a"}] * 3}))  # fmt: skip
    await until(lambda: server.publish_bytes > BODY + 3000, "both publishes to be counted")
    held = server.publish_bytes
    assert held < BODY + 3000 + 1000  # the request bodies: messages plus a little JSON
    assert await metric(api, "chute_unconfirmed_publish_bytes") == held
    assert not server.memory_paused and server.backpressure_pauses == 0
    assert not one.done() and not batch.done()  # not durable yet: not answered yet
    fsync.release()
    assert (await one)[0] == 201 and (await batch)[0] == 201
    assert server.publish_bytes == 0
    assert await metric(api, "chute_unconfirmed_publish_bytes") == 0


async def test_over_the_mark_a_publish_is_refused_before_its_body_is_read(api, fsync):
    server = api.server.server
    await make_queue_and_topic(api)
    publishes = await over_the_mark(api, fsync)
    assert server.backpressure_pauses == 1
    assert await metric(api, "chute_memory_high_water_pauses_total") == 1
    small = {**message(10, "r"), "subject": "t.r"}
    for path, body in [("/queues/q/messages", small), ("/queues/q/messages/batch", {"messages": [small]}),
                       ("/topics/t/messages", small), ("/topics/t/messages/batch", {"messages": [small]})]:  # fmt: skip
        async with api.session.post(f"{api.base}/api/v1{path}", json=body) as response:
            payload = await response.json()
            assert response.status == 503, payload
            assert response.headers["Retry-After"] == "1"
        assert payload["error"]["name"] == "server_busy" and payload["error"]["code"] == 3003
        assert payload["error"]["retryable"] is True
        assert "high-water mark" in payload["error"]["message"]
    # Only the head is sent: the answer comes without the server waiting for (or reading) the body.
    reader, writer = await raw_request(api.server.http_port, "/api/v1/queues/q/messages", 1_000_000)
    try:
        async with asyncio.timeout(WAIT_LIMIT_S):
            status_line = await reader.readline()
        assert status_line.split()[1] == b"503", status_line
        writer.write(b"x" * 1_000_000)  # the body it announced (the server discards it): a clean end
        await writer.drain()
    finally:
        await closed(writer)
    # Other routes are served as usual.
    stats = await api.ok("GET", "/queues/q/stats")
    assert stats["ready"] == 0  # nothing is durable yet
    fsync.release()
    assert [status for status, _ in await asyncio.gather(*publishes)] == [201] * 4
    await until(lambda: server.publish_bytes == 0, "the accounting to come back to 0")
    assert not server.memory_paused
    # Nothing of the refused publishes was stored: q has its 1 + 2, fed its 1 + 2.
    peeked = await api.ok("GET", "/queues/q/messages?max_messages=100")
    assert sorted(len(m["message"]["body"]) for m in peeked["messages"]) == [BODY // 2, BODY // 2, BODY]
    peeked = await api.ok("GET", "/queues/fed/messages?max_messages=100")
    assert sorted(m["message"]["subject"] for m in peeked["messages"]) == ["t.x", "t.y", "t.y"]
    # Below the mark again: publishes go through.
    assert (await api.ok("POST", "/queues/q/messages", message(10, "z"), expect=201))["id"]
    assert (await api.ok("GET", "/queues/q/stats"))["ready"] == 4


async def test_publishes_come_back_only_below_half_of_the_mark(api):
    """The mark's hysteresis, shared with native sessions: an HTTP hold over the mark pauses native sessions and
    refuses HTTP publishes until the held bytes are down to half of the mark."""
    server = api.server.server
    await api.ok("PUT", "/queues/q")
    async with chute.AsyncClient(api.server.url) as client:
        await client.queue_stats("q")  # connected: its session is one of the server's
        [session] = server.sessions
        with server.http_publish() as hold:
            hold.set(MARK + 1)
            assert server.memory_paused and "memory" in session._paused
            assert (await api.error("POST", "/queues/q/messages", message(10)))[:2] == (503, "server_busy")
            hold.set(MARK * 3 // 4)  # under the mark but over half of it: still refused
            assert server.memory_paused and "memory" in session._paused
            assert (await api.error("POST", "/queues/q/messages", message(10)))[:2] == (503, "server_busy")
            hold.set(MARK // 2)
            assert not server.memory_paused and "memory" not in session._paused
            await api.ok("POST", "/queues/q/messages", message(10), expect=201)
            assert server.publish_bytes == MARK // 2  # the publish gave back what it held
        assert server.publish_bytes == 0
        await client.publish("q", b"native")
        assert (await client.queue_stats("q")).ready == 2


async def test_the_accounting_comes_back_to_0_after_failed_publishes(api):
    server = api.server.server
    await api.ok("PUT", "/queues/q")
    assert (await api.error("POST", "/queues/nowhere/messages", message()))[:2] == (404, "queue_not_found")
    assert (await api.error("POST", "/topics/nowhere/messages", message()))[:2] == (404, "topic_not_found")
    assert (await api.error("POST", "/queues/q/messages", data=b'{"body": "x"'))[:2] == (400, "invalid_argument")
    assert (await api.error("POST", "/queues/q/messages", {"body": "x", "nope": 1}))[:2] == (400, "invalid_argument")
    too_big = io.BytesIO(json.dumps({"messages": [message(1_000_000)] * 17}).encode())  # over the 16 MiB limit
    status, name, _ = await api.error("POST", "/queues/q/messages/batch", data=too_big,
                                      headers={"Content-Type": "application/json"})  # fmt: skip
    assert (status, name) == (413, "message_too_large")
    assert server.publish_bytes == 0 and not server.memory_paused
    assert (await api.ok("GET", "/queues/q/stats"))["ready"] == 0


async def test_the_accounting_comes_back_to_0_after_a_storage_failure(api):
    server = api.server.server
    await api.ok("PUT", "/queues/q")
    server.broker.store.fs.fail("fsync", errno.EIO)
    assert (await api.error("POST", "/queues/q/messages", message()))[:2] == (503, "storage_failed")
    assert server.publish_bytes == 0 and not server.memory_paused


async def test_a_client_that_hangs_up_while_its_body_is_sent(api):
    server = api.server.server
    await api.ok("PUT", "/queues/q")
    reader, writer = await raw_request(api.server.http_port, "/api/v1/queues/q/messages", 500_000,
                                       b'{"body": "' + b"h" * 100_000)  # fmt: skip
    try:
        # Counted from before the body is read: the announced length, up to the request limit.
        await until(lambda: server.publish_bytes == 500_000, "the announced body to be counted")
    finally:
        await closed(writer)
    await until(lambda: server.publish_bytes == 0, "the accounting to come back to 0")
    assert (await api.ok("GET", "/queues/q/stats"))["ready"] == 0


async def test_a_client_that_hangs_up_while_its_publish_waits_for_fsync(api, fsync):
    """The publish goes on (it is confirmed and placed) and holds its bytes until it is durable."""
    server = api.server.server
    await api.ok("PUT", "/queues/q")
    fsync.hold()
    body = b'{"body": "' + b"w" * 200_000 + b'"}'
    reader, writer = await raw_request(api.server.http_port, "/api/v1/queues/q/messages", len(body), body)
    try:
        await until(lambda: server.publish_bytes == len(body), "the publish to be counted")
        ours = writer.get_extra_info("sockname")
        [handler] = [h for h in server._http_runner.server.connections  # aiohttp's side of this connection
                     if h.transport is not None and h.transport.get_extra_info("peername") == ours]  # fmt: skip
    finally:
        await closed(writer)
    await until(lambda: handler.transport is None, "the server to see the hang-up")
    assert server.publish_bytes == len(body)  # still in flight: held until durable
    fsync.release()
    await until(lambda: server.publish_bytes == 0, "the accounting to come back to 0")
    await until(lambda: server.broker.queue_stats("q").ready == 1, "the publish to be placed")
