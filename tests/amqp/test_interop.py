"""One model across fronts: a message published with pika is read by the native client and the other way
round; an AMQP exchange is the Chute topic `exchange.NAME`, a binding its subscription."""

from __future__ import annotations

import pika
import pytest

import chute
from tests.amqp.conftest import chute_only

pytestmark = [pytest.mark.timeout(60), chute_only]


def test_pika_publishes_native_client_reads(server, channel, name):
    channel.queue_declare(name)
    channel.confirm_delivery()
    properties = pika.BasicProperties(content_type="text/plain", correlation_id="c-7",
                                      headers={"region": "eu", "attempt": 2})  # fmt: skip
    channel.basic_publish("", name, b"from pika", properties)
    with chute.Client(server.url) as client:
        [delivery] = client.receive(name, wait_s=5)
        assert delivery.body == b"from pika"
        assert delivery.headers["region"] == "eu"  # a string header is a plain Chute header
        assert delivery.headers["amqp-content-type"] == "text/plain"
        assert delivery.headers["amqp-correlation-id"] == "c-7"
        assert "amqp-table" in delivery.headers  # the integer travels in the packed table
        client.ack(delivery)
    assert channel.basic_get(name) == (None, None, None)


def test_native_client_publishes_pika_reads(server, channel, name):
    with chute.Client(server.url) as client:
        client.create_queue(name)
        message_id = client.publish(name, b"from chute", headers={"kind": "native"}, priority=4)
    method, properties, body = channel.basic_get(name, auto_ack=True)
    assert body == b"from chute"
    assert properties.headers == {"kind": "native"}
    assert properties.message_id == str(message_id) and properties.priority == 4
    assert (method.exchange, method.routing_key) == ("", name)


def test_exchange_is_a_topic_binding_a_subscription(server, channel, name):
    channel.exchange_declare(name, "topic")
    queue = channel.queue_declare(f"{name}-q").method.queue
    channel.queue_bind(queue, name, "orders.*")
    with chute.Client(server.url) as client:
        [topic] = [t for t in client.list_topics() if t.name == f"exchange.{name}"]
        assert [(s.pattern, s.queue) for s in topic.subscriptions] == [("orders.*", queue)]
        client.publish(f"exchange.{name}", b"native to a topic", subject="orders.created")
    method, _, body = channel.basic_get(queue, auto_ack=True)
    assert body == b"native to a topic" and method.routing_key == "orders.created"


def test_native_creates_stay_idempotent_on_what_amqp_declared(server, channel, name):
    channel.exchange_declare(name, "fanout")
    channel.queue_declare(f"{name}-q")
    channel.queue_bind(f"{name}-q", name)
    with chute.Client(server.url) as client:  # AMQP's metadata (attributes) does not make these conflict
        client.create_queue(f"{name}-q")
        client.create_topic(f"exchange.{name}")
        client.publish(f"exchange.{name}", b"still bound")
    assert channel.basic_get(f"{name}-q", auto_ack=True)[2] == b"still bound"
