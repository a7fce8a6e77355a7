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


def test_a_header_no_amqp_property_can_carry_reaches_amqp_consumers_in_the_table(server, channel, name):
    # another front may give a message any string under an `amqp-` property's header; a value the property
    # cannot carry (pamqp refuses it, the wire has no room for it) used to make every delivery of it an internal
    # error that closed the consumer's connection, again at each redelivery: it now travels in the header table
    odd = {"amqp-cluster-id": "c1", "amqp-delivery-mode": "0", "amqp-message-id": "m" * 300,
           "amqp-timestamp": str(2**62), "amqp-priority": "300", "region": "eu"}  # fmt: skip
    with chute.Client(server.url) as client:
        client.create_queue(name)
        odd_id = client.publish(name, b"odd", headers=odd)
        client.publish(name, b"plain")
    method, properties, body = channel.basic_get(name, auto_ack=True)
    assert body == b"odd"
    assert properties.headers == odd  # every one of them, as the Chute headers were
    assert properties.cluster_id is None and properties.delivery_mode is None and properties.priority is None
    assert properties.message_id == str(odd_id) and properties.timestamp is not None  # as for any native message
    assert channel.basic_get(name, auto_ack=True)[2] == b"plain"  # the channel and connection lived on


@pytest.mark.parametrize("headers", [{"amqp-exchange": "e" * 300}, {"amqp-routing-key": "k" * 300},
                                     {"amqp-exchange": "e" * 200}, {"amqp-exchange": "é!\x01<x>"},
                                     {"amqp-table": "!!not base64"}, {"amqp-table": "AAAA"}])  # fmt: skip
def test_other_odd_headers_from_another_front_are_delivered_too(server, channel, name, headers):
    # an exchange or routing key AMQP cannot carry (over 255 bytes) is delivered empty, any shorter one as it is
    # (pamqp's GetOk refused names over 127 characters or outside its pattern: basic.get failed with 541); an
    # `amqp-table` that is not base64 stays a string header (one that decodes to some table is delivered as that)
    with chute.Client(server.url) as client:
        client.create_queue(name)
        client.publish(name, b"odd", headers=headers)
        client.publish(name, b"plain")
    method, properties, body = channel.basic_get(name, auto_ack=True)
    assert body == b"odd" and len(method.exchange) < 256 and len(method.routing_key) < 256
    exchange = headers.get("amqp-exchange", "")
    assert method.exchange == (exchange if len(exchange.encode()) < 256 else "")
    if headers.get("amqp-table") == "!!not base64":
        assert properties.headers == headers
    assert channel.basic_get(name, auto_ack=True)[2] == b"plain"


@pytest.mark.parametrize("headers", [{"amqp-timestamp": "soon"}, {"amqp-priority": "high"},
                                     {"amqp-delivery-mode": "persistent"}])  # fmt: skip
def test_a_number_property_header_that_is_not_a_number_stays_in_the_table(server, channel, name, headers):
    # a numeric property's header holding text (another front's) was dropped: neither property nor table entry
    with chute.Client(server.url) as client:
        client.create_queue(name)
        client.publish(name, b"odd", headers=headers)
    _, properties, body = channel.basic_get(name, auto_ack=True)
    assert body == b"odd" and properties.headers == headers
    assert properties.delivery_mode is None and properties.priority is None and properties.timestamp is not None
