"""Bad input over HTTP: every failure is the JSON error shape with the status of the error table (checked on
every error by the `api` fixture), never a 500 or an HTML page, and it changes nothing."""

from __future__ import annotations

import asyncio
import io
import json

import pytest

from chute.server.http import MAX_BODY_BYTES
from tests.api.conftest import check_error

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    "data, words",
    [
        ("{", "malformed JSON"),
        ('{"body": "x"} trailing', "malformed JSON"),
        ("[1, 2]", "Expected `object`"),
        ('"just a string"', "Expected `object`"),
        ("\xff\xfe", "malformed JSON"),
    ],
)
async def test_malformed_json(api, data, words):
    await api.ok("PUT", "/queues/q")
    status, name, message = await api.error("POST", "/queues/q/messages", data=data.encode("latin-1"))
    assert (status, name) == (400, "invalid_argument") and words in message
    assert (await api.ok("GET", "/queues/q/stats"))["published"] == 0


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/queues/q/messages", {"body": 5}, "$.body"),
        ("/queues/q/messages", {"body": "x", "priority": "high"}, "$.priority"),
        ("/queues/q/messages", {"body": "x", "priority": 10}, "$.priority"),
        ("/queues/q/messages", {"body": "x", "headers": {"k": 1}}, "$.headers"),
        ("/queues/q/messages", {"body": "x", "body_encoding": "latin-1"}, "$.body_encoding"),
        ("/queues/q/messages", {"body": "x", "delay_s": -1}, "$.delay_s"),
        ("/queues/q/messages", {}, "body"),
        ("/queues/q/messages/batch", {"messages": []}, "$.messages"),
        ("/queues/q/messages/batch", {"messages": [{"body": "x"}] * 1001}, "$.messages"),
        ("/queues/q/receive", {"max_messages": 0}, "$.max_messages"),
        ("/queues/q/receive", {"max_messages": 1001}, "$.max_messages"),
        ("/queues/q/receive", {"wait_s": 61}, "$.wait_s"),
        ("/queues/q/receive", {"wait_s": True}, "$.wait_s"),
        ("/queues/q/receive", {"lease_s": 0}, "$.lease_s"),
        ("/queues/q/ack", {"receipts": [12]}, "$.receipts[0]"),
        ("/queues/q/ack", {"receipts": ["-1"]}, "$.receipts[0]"),
        ("/queues/q/ack", {"receipts": []}, "$.receipts"),
        ("/queues/q/ack", {}, "receipts"),
        ("/queues/q/nack", {"receipts": ["1"], "delay_s": "soon"}, "$.delay_s"),
        ("/queues/q/extend", {"receipts": ["1"]}, "lease_s"),
        ("/queues/q/redrive", {"max_messages": 0}, "$.max_messages"),
    ],
)
async def test_wrong_types_and_out_of_range_values_name_the_field(api, path, body, field):
    await api.ok("PUT", "/queues/q")
    status, name, message = await api.error("POST", path, body)
    assert (status, name) == (400, "invalid_argument") and field in message, message


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("POST", "/queues/q/messages", {"body": "x", "colour": "red"}),
        ("POST", "/queues/q/receive", {"max_messages": 1, "visibility": 3}),
        ("PUT", "/queues/q2", {"lease": 3}),
        ("PATCH", "/queues/q", {"lease": 3}),
        ("PUT", "/topics/t", {"retention": 3}),
        ("POST", "/login", {"user": "u", "password": "p", "otp": "1"}),
    ],
)
async def test_unknown_fields_are_refused(api, method, path, body):
    await api.ok("PUT", "/queues/q")
    status, name, message = await api.error(method, path, body)
    assert (status, name) == (400, "invalid_argument") and "unknown field" in message
    assert [q["name"] for q in (await api.ok("GET", "/queues"))["queues"]] == ["q"]


async def test_settings_out_of_range_change_nothing(api):
    assert (await api.error("PUT", "/queues/q", {"lease_s": 0}))[:2] == (400, "invalid_argument")
    assert (await api.error("PUT", "/queues/q", {"dead_letter_queue": "missing"}))[:2] == (404, "queue_not_found")
    assert (await api.error("PUT", "/queues/q", {"max_length": "ten"}))[:2] == (400, "invalid_argument")
    assert (await api.error("PUT", "/queues/q", {"dead_letter_queue": "q"}))[:2] == (400, "invalid_argument")
    assert (await api.ok("GET", "/queues")) == {"queues": []}


async def test_oversized_bodies(api):
    await api.ok("PUT", "/queues/q")
    status, name, _ = await api.error("POST", "/queues/q/messages", data=io.BytesIO(b"x" * (MAX_BODY_BYTES + 1)))
    assert (status, name) == (413, "message_too_large")
    big = "x" * (1024 * 1024 + 1)  # over the broker's default max_message_bytes, under the HTTP body limit
    status, name, _ = await api.error("POST", "/queues/q/messages", data=io.BytesIO(json.dumps({"body": big}).encode()))
    assert (status, name) == (413, "message_too_large")
    assert (await api.ok("GET", "/queues/q/stats"))["published"] == 0


@pytest.mark.parametrize(
    "method, path, body, expected",
    [
        ("GET", "/queues/nope", None, "queue_not_found"),
        ("GET", "/queues/nope/stats", None, "queue_not_found"),
        ("PATCH", "/queues/nope", {"lease_s": 3}, "queue_not_found"),
        ("DELETE", "/queues/nope", None, "queue_not_found"),
        ("POST", "/queues/nope/messages", {"body": "x"}, "queue_not_found"),
        ("POST", "/queues/nope/messages/batch", {"messages": [{"body": "x"}]}, "queue_not_found"),
        ("GET", "/queues/nope/messages", None, "queue_not_found"),
        ("POST", "/queues/nope/receive", {"wait_s": 1}, "queue_not_found"),
        ("POST", "/queues/nope/ack", {"receipts": ["1"]}, "queue_not_found"),
        ("POST", "/queues/nope/purge", None, "queue_not_found"),
        ("POST", "/queues/nope/redrive", None, "queue_not_found"),
        ("GET", "/topics/nope", None, "topic_not_found"),
        ("PATCH", "/topics/nope", {"retention_s": 5}, "topic_not_found"),
        ("DELETE", "/topics/nope", None, "topic_not_found"),
        ("POST", "/topics/nope/messages", {"body": "x"}, "topic_not_found"),
        ("GET", "/topics/nope/subscriptions", None, "topic_not_found"),
        ("POST", "/topics/nope/subscriptions", {"queue": "q"}, "topic_not_found"),
        ("DELETE", "/topics/nope/subscriptions?pattern=%3E&queue=q", None, "topic_not_found"),
    ],
)
async def test_unknown_names(api, method, path, body, expected):
    await api.ok("PUT", "/queues/q")
    status, name, message = await api.error(method, path, body)
    assert (status, name) == (404, expected) and "nope" in message


@pytest.mark.parametrize("name", ["-x", "a%20b", "%C3%A9", "x" * 201, "~1", "a*"])
async def test_invalid_names(api, name):
    for method, path, body in [
        ("PUT", f"/queues/{name}", None),
        ("GET", f"/queues/{name}", None),
        ("POST", f"/queues/{name}/messages", {"body": "x"}),
        ("PUT", f"/topics/{name}", None),
    ]:
        status, error, _ = await api.error(method, path, body)
        assert (status, error) == (400, "invalid_name"), (method, path)
    assert await api.ok("GET", "/queues") == {"queues": []}


async def test_unknown_routes_and_wrong_methods(api):
    for path in ("/nope", "/queues/q/nope", "/queues/", "/queues/q/messages/batch/x"):
        assert (await api.error("GET", path))[:2] == (404, "route_not_found")
    assert (await api.error("GET", "/v2/queues", prefix="/api"))[:2] == (404, "route_not_found")
    status, name, message = await api.error("DELETE", "/overview")
    assert (status, name) == (405, "method_not_allowed") and "GET" in message
    async with api.session.post(api.base + "/api/v1/queues") as response:
        assert response.status == 405 and "GET" in response.headers["Allow"]
        assert response.content_type == "application/json"
    async with api.session.post(api.base + "/openapi.json") as response:
        assert response.status == 405 and (await response.json())["error"]["name"] == "method_not_allowed"


async def test_other_paths_keep_their_own_behaviour(api):
    async with api.session.get(api.base + "/healthz") as response:
        assert response.status == 200 and (await response.json())["status"] == "serving"
    async with api.session.get(api.base + "/no-such-page") as response:
        assert response.status == 404 and "error" not in (await response.text())[:20]


async def test_missing_query_parameters(api):
    await api.ok("PUT", "/topics/t")
    status, name, message = await api.error("DELETE", "/topics/t/subscriptions?pattern=%3E")
    assert (status, name) == (400, "invalid_argument") and "queue" in message
    status, name, message = await api.error("PATCH", "/topics/t/subscriptions?pattern=%3E&queue=-bad", {"filter": 1})
    assert (status, name) == (400, "invalid_argument") and "'queue'" in message  # the query is checked first


# -- requests that aiohttp's HTTP parser refuses, over a raw socket ---------------------------------------------

PUBLISH = b"POST /api/v1/queues/q/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
MALFORMED = {  # what a client sends in one go, and a word of the answer's message
    "request-line-too-long": (b"GET /api/v1/queues?" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", "8190 bytes"),
    "header-too-long": (b"GET /api/v1/queues HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", "8190"),
    "too-many-headers": (b"GET /api/v1/queues HTTP/1.1\r\n" + b"X-H: y\r\n" * 200 + b"\r\n", "Too many headers"),
    "bad-chunk-size": (PUBLISH + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", "chunk size"),
    "chunked-and-length": (PUBLISH + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}", "Content-Length"),
    "bad-content-length": (PUBLISH + b"Content-Length: two\r\n\r\n{}", "Content-Length"),
    "bad-method": (b"G@T /api/v1/queues HTTP/1.1\r\nHost: x\r\n\r\n", "method"),
    "bad-version": (b"GET /api/v1/queues HTTP/7.0\r\nHost: x\r\n\r\n", "version"),
    "bad-header-name": (b"GET /metrics HTTP/1.1\r\nHost: x\r\nBad Name: y\r\n\r\n", "header"),
    "tls-on-plain-http": (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(64), "HTTPS"),
}


async def exchange(port: int, *parts: bytes, until: bytes | None = None) -> tuple[int, dict, bytes]:
    """Send `parts` on a new connection (before each part after the first, read up to `until`); return the
    final answer's status, its JSON body, and what followed it before the server closed the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for i, part in enumerate(parts):
            if i:
                await reader.readuntil(until)
            writer.write(part)
            await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        headers = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:-2])
        assert headers[b"Content-Type"].startswith(b"application/json"), head
        body = await reader.readexactly(int(headers[b"Content-Length"]))
        rest = await reader.read()  # the server closes the connection after such an answer
        return status, json.loads(body), rest
    finally:
        writer.close()


@pytest.mark.parametrize("name", list(MALFORMED))
async def test_requests_the_http_parser_refuses_get_the_json_error_shape(api, name):
    await api.ok("PUT", "/queues/q")
    data, words = MALFORMED[name]
    status, payload, rest = await exchange(api.server.http_port, data)
    check_error(status, payload)
    assert (status, payload["error"]["name"]) == (400, "protocol_error") and words in payload["error"]["message"]
    assert rest == b""
    assert (await api.ok("GET", "/queues/q/stats"))["published"] == 0  # nothing changed, the server goes on


@pytest.mark.parametrize("path", [b"/api/v1/queues/q/messages", b"/"], ids=["api", "sqs"])
async def test_a_body_that_breaks_its_chunked_encoding_midway_is_refused(api, path):
    await api.ok("PUT", "/queues/q")
    head = (
        PUBLISH.replace(b"/api/v1/queues/q/messages", path)
        + b"Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
    )
    # the 100 Continue says the handler has the request: the broken chunk reaches a body being read
    status, payload, rest = await exchange(api.server.http_port, head, b'9\r\n{"body": \r\nzz\r\n', until=b"\r\n\r\n")
    check_error(status, payload)
    assert (status, payload["error"]["name"]) == (400, "protocol_error") and "chunk" in payload["error"]["message"]
    assert rest == b""
    assert (await api.ok("GET", "/queues/q/stats"))["published"] == 0
