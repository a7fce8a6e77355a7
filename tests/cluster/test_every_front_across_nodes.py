"""Every front of one node reads what every front of another node publishes: the cross-front tests of
tests/integration (test_every_front_publishes_to_every_front.py, test_every_front_reads_every_message.py) on two
cluster nodes on PostgreSQL, publishing through one node and reading through the other. Their queues and topics
fall on both nodes' shards, so messages are forwarded (native, AMQP), proxied (HTTP API, SQS) and fanned out
through relays to queues of other shards, and dead letters relayed to dead-letter queues of other shards. A
relay's copies reach their queue a moment after the publish is confirmed, so each queue is read once it holds
them all.

For each reader, as on one broker: every receive succeeds, every message is reached in order, values are
carried as the docs say (subjects too: a relayed copy keeps its topic's subject, cd75845), dead letters carry
their x-death. CHUTE_XFRONT_MESSAGES and CHUTE_XFRONT_SEED size and seed the messages, as in those tests.
"""

from __future__ import annotations

import asyncio
import base64
import random
from dataclasses import dataclass

import pika
import pytest
import requests

import chute
from chute.errors import ChuteError
from chute.server.config import ServerConfig
from tests.cluster.inprocess import running_nodes
from tests.integration import test_every_front_publishes_to_every_front as every_front
from tests.integration import test_every_front_reads_every_message as every_message
from tests.sqs.boto3_support import client_for
from tests.sqs.compat_support import query_client

pytestmark = pytest.mark.timeout(180)
SHARDS = 4


def _config(url: str, name: str, data_dir: str) -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0, http_port=0, amqp_port=0, store=url, node_name=name,
                        shards=SHARDS, cluster_lease_s=4.0, cluster_heartbeat_s=0.3, data_dir=data_dir)  # fmt: skip


@dataclass(frozen=True)
class Front:
    """A node's addresses, as the integration tests' helpers take a running server's."""

    url: str
    http_port: int
    amqp_url: str


@pytest.fixture
async def nodes(postgres_url, tmp_path):
    async with running_nodes(postgres_url, tmp_path, 2, SHARDS, _config) as servers:
        yield [Front(s.url, s.http_port, f"amqp://guest:guest@127.0.0.1:{s.amqp_port}/%2F") for s in servers]


def publish_then_read(publisher: Front, reader_node: Front, tmp_path, front: str) -> list[str]:
    """Publish through `front` of one node, read through every reader of the other; the failures."""
    rnd = random.Random(f"{every_front.SEED}-{front}")
    queues = [f"{front}-to-{reader}" for reader in every_front.READERS]
    with chute.Client(publisher.url) as native:
        for queue in queues:
            native.create_queue(queue)
            native.create_queue(f"{queue}-never")  # (await_ready's bounded waits)
    if front == "http":
        sent = every_front.publish_http(publisher, rnd, queues)
    elif front == "amqp":
        sent = every_front.publish_amqp(publisher, rnd, queues)
    else:
        client = client_for(publisher.http_port) if front == "sqs-json" else query_client(
            f"http://127.0.0.1:{publisher.http_port}", tmp_path)  # fmt: skip
        sent = every_front.publish_sqs(client, rnd, queues)
    assert len(sent) > every_front.MESSAGES // 2
    failures = []
    for reader, queue in zip(every_front.READERS, queues, strict=True):
        try:
            every_front.await_ready(reader_node, queue, len(sent))  # (a relay's copies come a moment later)
            got = every_front.read(reader_node, tmp_path, reader, queue, len(sent))
            every_front.check(front, reader, sent, got)
        except Exception as exc:  # every reader is tried: the report names each one that failed
            failures.append(f"{front} -> {reader} ({queue}): {type(exc).__name__}: {str(exc)[:2000]}")
    return failures


@pytest.mark.parametrize("front", ["http", "amqp", "sqs-json", "sqs-query"])
async def test_what_one_nodes_front_publishes_every_front_of_another_node_reads(nodes, tmp_path, front):
    failures = await asyncio.to_thread(publish_then_read, nodes[0], nodes[1], tmp_path, front)
    assert not failures, "\n".join(failures)


def reject_then_read(rejecter_node: Front, reader_node: Front, tmp_path, rejecter: str) -> list[str]:
    rnd = random.Random(f"{every_front.SEED}-dead-{rejecter}")
    sources = [f"dead-{rejecter}-{reader}" for reader in every_front.READERS]
    with chute.Client(rejecter_node.url) as native:
        for queue in sources:  # a source and its dead-letter queue: on one shard or on two
            native.create_queue(f"{queue}-dlq")
            native.create_queue(queue, dead_letter_queue=f"{queue}-dlq")
            native.create_queue(f"{queue}-dlq-never")
            native.create_queue(f"{queue}-never")
    sent = every_front.publish_http(reader_node, rnd, sources)
    expected = sorted(sent, key=lambda message: -message.priority)
    failures = []
    for reader, queue in zip(every_front.READERS, sources, strict=True):
        try:
            every_front.await_ready(reader_node, queue, len(sent))  # (a relay's copies come a moment later)
            every_front.reject_all(rejecter_node, rejecter, queue, len(sent))
            every_front.await_ready(reader_node, f"{queue}-dlq", len(sent))
            got = every_front.read(reader_node, tmp_path, reader, f"{queue}-dlq", len(sent))
            bodies = [message.body for message in expected[: 100 if reader == "http-peek" else None]]
            if reader.startswith("sqs"):
                show = every_front.xml_shown if reader == "sqs-query" else (lambda text: text)
                bodies = [show(body.decode(errors="replace")) for body in bodies]
            assert [body for body, _ in got] == bodies
            for message, (_, shown) in zip(expected, got, strict=False):
                if reader in ("pika-get", "pika-consume", "aio-pika"):
                    _, table, _ = every_front.amqp_view(reader, shown)
                    death = table["x-death"][0]
                    assert (death["queue"], death["reason"], death["count"]) == (queue, "rejected", 1)
                elif reader.startswith(("native", "http")) and rejecter != "pika":
                    assert shown == message.headers
        except Exception as exc:
            failures.append(f"{rejecter} -> {reader} ({queue}): {type(exc).__name__}: {str(exc)[:2000]}")
    return failures


@pytest.mark.parametrize("rejecter", ["native", "http", "pika"])
async def test_dead_letters_rejected_through_one_node_are_read_through_every_front_of_another(nodes, tmp_path,
                                                                                            rejecter):  # fmt: skip
    failures = await asyncio.to_thread(reject_then_read, nodes[0], nodes[1], tmp_path, rejecter)
    assert not failures, "\n".join(failures)


def native_then_read(publisher: Front, reader_node: Front, tmp_path) -> None:
    """Hostile native messages (any bytes, odd headers near the limits, FIFO groups) through one node, read
    through SQS JSON and query, pika and the HTTP API of the other."""
    rnd = random.Random(every_message.SEED)
    fronts = every_message.FRONTS
    published: list[bytes] = []
    with chute.Client(publisher.url) as native:
        for front in fronts:
            native.create_queue(front)
        for body, headers, group in every_message.hostile_messages(rnd, every_message.MESSAGES):
            try:
                for front in fronts:
                    native.publish(front, body, headers=headers, group=group)
            except ChuteError:  # refused with a clear error, before any front's queue took it
                continue
            published.append(body)
    assert len(published) > every_message.MESSAGES // 2
    texts = [body.decode(errors="replace") for body in published]
    json_client = client_for(reader_node.http_port)
    url = json_client.get_queue_url(QueueName="sqs-json")["QueueUrl"]
    assert every_message.sqs_bodies(json_client, url) == texts
    xml_client = query_client(f"http://127.0.0.1:{reader_node.http_port}", tmp_path)
    url = xml_client.get_queue_url(QueueName="sqs-query")["QueueUrl"]
    assert every_message.sqs_bodies(xml_client, url) == [every_message.xml_shown(text) for text in texts]
    connection = pika.BlockingConnection(pika.URLParameters(reader_node.amqp_url))
    try:
        channel = connection.channel()
        amqp_bodies = []
        for _ in range(len(published) + 1):
            method, _properties, body = channel.basic_get("amqp", auto_ack=True)
            if method is None:
                break
            amqp_bodies.append(body)
    finally:
        connection.close()
    assert amqp_bodies == published
    base = f"http://127.0.0.1:{reader_node.http_port}/api/v1/queues/http"
    http_bodies: list[bytes] = []
    for _ in range(len(published) + 1):
        answer = requests.post(f"{base}/receive", json={"max_messages": 10}, timeout=30)
        assert answer.status_code == 200, answer.text
        deliveries = answer.json()["deliveries"]
        if not deliveries:
            break
        for delivery in deliveries:
            message = delivery["message"]
            encoded = message["body"]
            http_bodies.append(encoded.encode() if message["body_encoding"] == "utf-8" else base64.b64decode(encoded))
        acked = requests.post(f"{base}/ack", json={"receipts": [d["receipt"] for d in deliveries]}, timeout=30)
        assert acked.status_code == 200, acked.text
    assert http_bodies == published


async def test_hostile_native_messages_through_one_node_are_read_through_every_front_of_another(nodes, tmp_path):
    await asyncio.to_thread(native_then_read, nodes[0], nodes[1], tmp_path)
