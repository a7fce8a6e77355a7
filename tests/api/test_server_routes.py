"""The server's own routes (overview, connections, consumers, login, whoami), the OpenAPI document and the API
page, and the route table they all come from."""

from __future__ import annotations

import asyncio
import html.parser
import time
import urllib.request

import pytest

import chute
from chute.errors import ERRORS
from chute.server.api import ROUTES

pytestmark = pytest.mark.timeout(60)


async def test_overview_counts_and_totals(api):
    await api.ok("PUT", "/queues/a")
    await api.ok("PUT", "/queues/b")
    await api.ok("PUT", "/topics/t")
    await api.ok("POST", "/queues/a/messages/batch", {"messages": [{"body": "x"}, {"body": "yy"}]})
    await api.ok("POST", "/queues/b/messages", {"body": "z"})
    await api.ok("POST", "/queues/b/receive", {})
    overview = await api.ok("GET", "/overview")
    assert (overview["queues"], overview["topics"], overview["state"]) == (2, 1, "serving")
    totals = overview["totals"]
    assert (totals["ready"], totals["in_flight"], totals["published"], totals["bytes"]) == (2, 1, 3, 4)
    assert overview["version"] and 0 <= overview["uptime_s"] < 600 and abs(overview["time"] - time.time()) < 60
    assert overview["storage"]["segments"] >= 1 and overview["storage"]["read_only"] is False


async def test_connections_and_consumers_of_native_clients(api):
    await api.ok("PUT", "/queues/q")
    assert await api.ok("GET", "/connections") == {"connections": []}
    async with chute.AsyncClient(api.server.url, name="worker-7") as client:
        consumer = await client.consume("q", prefetch=5)
        await api.ok("POST", "/queues/q/messages", {"body": "for the consumer"})
        delivery = await asyncio.wait_for(consumer.__anext__(), 10)
        [connection] = (await api.ok("GET", "/connections"))["connections"]
        assert connection["client_name"] == "worker-7" and connection["user"] == "anonymous"
        assert connection["peer"].startswith("127.0.0.1:") and connection["leased"] == 1
        assert abs(connection["connected_at"] - time.time()) < 60
        [info] = connection["consumers"]
        assert (info["queue"], info["prefetch"], info["unacked"], info["connection_id"]) == (
            "q",
            5,
            1,
            connection["id"],
        )
        assert (await api.ok("GET", "/consumers"))["consumers"] == [info]
        assert (await api.ok("GET", "/overview"))["consumers"] == 1
        await client.ack(delivery)
        await consumer.close()


async def test_whoami_and_login_with_auth_off(api):
    me = await api.ok("GET", "/whoami")
    assert (me["name"], me["auth_enabled"], me["superuser"]) == ("anonymous", False, True)
    login = await api.ok("POST", "/login", {"user": "someone", "password": "anything"})
    assert isinstance(login["token"], str) and login["expires_s"] > 0
    assert (await api.error("POST", "/login", {"user": "someone"}))[:2] == (400, "invalid_argument")


async def test_openapi_document_describes_every_route(api):
    async with api.session.get(api.base + "/openapi.json") as response:
        assert response.status == 200 and response.content_type == "application/json"
        doc = await response.json()
    assert doc["openapi"].startswith("3.1") and set(doc["components"]["securitySchemes"]) == {"bearer", "basic"}
    schemas = doc["components"]["schemas"]
    assert {"Error", "PublishMessage", "DeliveryOut", "QueueSettings", "QueueDetail"} <= set(schemas)
    assert schemas["PublishMessage"]["additionalProperties"] is False  # unknown fields are refused
    for route in ROUTES:
        operation = doc["paths"][route.path][route.method.lower()]
        responses = operation["responses"]
        assert str(route.status if route.reply else 204) in responses, route.path
        errors = [r for status, r in responses.items() if int(status) >= 400]
        assert errors and all(r["content"]["application/json"]["schema"]["$ref"].endswith("/Error") for r in errors)
        if route.body is not None:
            assert "$ref" in operation["requestBody"]["content"]["application/json"]["schema"]
            assert "413" in responses and "400" in responses
        if "{name}" in route.path:
            assert operation["parameters"][0]["in"] == "path"
        if route.access == "public":
            assert operation["security"] == []
        else:
            assert "401" in responses
    operations = {(p, m) for p, item in doc["paths"].items() for m in item}
    assert len(operations) == len(ROUTES)
    documented_errors = " ".join(r["description"] for item in doc["paths"].values() for op in item.values()
                                 for r in op["responses"].values())  # fmt: skip
    assert "`queue_not_found` (2001)" in documented_errors
    assert all(e.name in {x.name for x in ERRORS} for e in ERRORS)


class _Collector(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.sources: list[str] = []

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def handle_starttag(self, tag, attrs) -> None:
        self.sources += [value for name, value in attrs if name in ("src", "href") and value.startswith("http")]


async def test_api_page_is_readable_html_from_the_document(api):
    async with api.session.get(api.base + "/api") as response:
        assert response.status == 200 and response.content_type == "text/html"
        page = await response.text()
    parser = _Collector()
    parser.feed(page)
    text = " ".join(parser.text)
    for route in ROUTES:
        assert route.path in text and route.summary in text
    assert "PublishMessage" in text and "queue_not_found" in text
    assert parser.sources == []  # nothing fetched from the network
    assert "<script" not in page


def test_route_table_is_complete_and_consistent():
    keys = [(route.method, route.path) for route in ROUTES]
    assert len(keys) == len(set(keys))
    for route in ROUTES:
        assert route.path.startswith("/api/v1/")
        assert (route.kind is not None) == ("{name}" in route.path), route.path
        assert route.access in ("publish", "consume", "manage", "see", "user", "superuser", "public")
        if route.method in ("PUT", "PATCH") or route.path.endswith(("/messages", "/batch", "/ack", "/nack")):
            assert route.body is not None or route.method == "GET", route.path


def test_the_api_on_a_server_running_on_a_thread(chute_server):
    """chute.testing's running_server (the chute_server fixture) runs the server on a thread: the API works there."""
    with urllib.request.urlopen(f"http://127.0.0.1:{chute_server.http_port}/api/v1/whoami", timeout=10) as response:
        assert response.status == 200 and b'"superuser":true' in response.read()
