"""AMQP connections are visible like native ones: the HTTP API's connection and consumer lists, the overview and
`/metrics` (AMQP connections, channels and consumers beside the native connections, each queue's consumers)."""

from __future__ import annotations

import json
import time
import urllib.request

import pika

from chute.testing import running_server
from tests.amqp.conftest import chute_only

pytestmark = chute_only


def _get(server, path: str) -> str:
    with urllib.request.urlopen(server.http_url + path, timeout=10) as response:
        return response.read().decode()


def _metric(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_start} not in /metrics")


def test_amqp_connections_in_the_api_overview_and_metrics():
    with running_server() as server:
        params = pika.URLParameters(server.amqp_url)
        params.client_properties = {"connection_name": "billing-worker"}
        connection = pika.BlockingConnection(params)
        try:
            first, second = connection.channel(), connection.channel()
            first.queue_declare("invoices")
            first.basic_publish("", "invoices", b"one")
            first.basic_qos(prefetch_count=7)
            first.basic_consume("invoices", lambda *args: None, consumer_tag="billing-1")
            deadline = time.monotonic() + 10
            while True:  # until the delivery is out, unacked
                connection.process_data_events(time_limit=0.05)
                [listed] = json.loads(_get(server, "/api/v1/connections"))["connections"]
                if listed["leased"] == 1 or time.monotonic() > deadline:
                    break
            assert (listed["protocol"], listed["client_name"], listed["channels"], listed["leased"]) == (
                "amqp", "billing-worker", 2, 1)  # fmt: skip
            assert listed["peer"].startswith("127.0.0.1:") and listed["user"] == "anonymous"
            [consumer] = listed["consumers"]
            assert (consumer["queue"], consumer["tag"], consumer["prefetch"], consumer["unacked"]) == (
                "invoices", "billing-1", 7, 1)  # fmt: skip
            assert json.loads(_get(server, "/api/v1/consumers"))["consumers"] == [consumer]
            overview = json.loads(_get(server, "/api/v1/overview"))
            assert (overview["connections"], overview["consumers"]) == (1, 1)
            metrics = _get(server, "/metrics")
            assert _metric(metrics, "chute_amqp_connections") == 1
            assert _metric(metrics, "chute_connections") == 0  # native ones
            assert _metric(metrics, "chute_amqp_channels") == 2
            assert _metric(metrics, "chute_amqp_consumers") == 1
            assert _metric(metrics, 'chute_queue_consumers{queue="invoices"}') == 1
            second.close()
        finally:
            connection.close()
        deadline = time.monotonic() + 10
        while json.loads(_get(server, "/api/v1/connections"))["connections"]:
            assert time.monotonic() < deadline, "the closed connection is still listed"
            time.sleep(0.02)  # polling the HTTP API from outside the server: no condition to await here
        assert _metric(_get(server, "/metrics"), "chute_amqp_connections") == 0
