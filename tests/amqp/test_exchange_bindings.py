"""Exchange-to-exchange bindings and headers-exchange matching on typed values, as RabbitMQ 3.10 routes them."""

from __future__ import annotations

import datetime
from decimal import Decimal

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker

from tests.amqp.test_routing import drain


def _queue(channel, name: str, suffix: str) -> str:
    queue = f"{name}-{suffix}"
    channel.queue_declare(queue)
    return queue


def test_exchange_to_exchange_bindings_route_by_each_exchanges_type(channel, name):
    front, orders, audit = f"{name}-front", f"{name}-orders", f"{name}-audit"
    channel.exchange_declare(front, "topic")
    channel.exchange_declare(orders, "direct")
    channel.exchange_declare(audit, "fanout", internal=True)
    channel.exchange_bind(orders, front, "orders.#")  # destination, source, key
    channel.exchange_bind(audit, front, "#")
    created = _queue(channel, name, "created")
    every = _queue(channel, name, "every")
    channel.queue_bind(created, orders, "orders.created")
    channel.queue_bind(every, audit)
    channel.confirm_delivery()
    channel.basic_publish(front, "orders.created", b"one")
    channel.basic_publish(front, "orders.paid", b"two")
    channel.basic_publish(front, "users.new", b"three")
    assert drain(channel, created) == [b"one"]
    assert drain(channel, every) == [b"one", b"two", b"three"]
    channel.exchange_unbind(audit, front, "#")
    channel.basic_publish(front, "orders.created", b"four")
    assert drain(channel, created) == [b"four"] and drain(channel, every) == []


def test_delivery_shows_the_exchange_published_to(channel, name):
    source, destination = f"{name}-src", f"{name}-dst"
    channel.exchange_declare(source, "fanout")
    channel.exchange_declare(destination, "fanout")
    channel.exchange_bind(destination, source)
    queue = _queue(channel, name, "q")
    channel.queue_bind(queue, destination)
    channel.confirm_delivery()
    channel.basic_publish(source, "the.key", b"x")
    method, _, body = channel.basic_get(queue, auto_ack=True)
    assert body == b"x" and method.exchange == source and method.routing_key == "the.key"


def test_a_loop_of_bindings_delivers_to_each_queue_once(channel, name):
    a, b, c = (f"{name}-{x}" for x in "abc")
    for exchange in (a, b, c):
        channel.exchange_declare(exchange, "fanout")
    channel.exchange_bind(b, a)
    channel.exchange_bind(c, b)
    channel.exchange_bind(a, c)  # a -> b -> c -> a
    queue = _queue(channel, name, "q")
    for exchange in (a, b, c):
        channel.queue_bind(queue, exchange)  # reachable along three paths
    channel.confirm_delivery()
    channel.basic_publish(b, "", b"once")
    assert drain(channel, queue) == [b"once"]


def test_unroutable_through_bindings_is_returned_with_mandatory(channel, name):
    source, destination = f"{name}-src", f"{name}-dst"
    channel.exchange_declare(source, "direct")
    channel.exchange_declare(destination, "fanout")
    channel.exchange_bind(destination, source, "k")
    channel.confirm_delivery()
    with pytest.raises(pika.exceptions.UnroutableError):
        channel.basic_publish(source, "k", b"nowhere", mandatory=True)


def test_bind_to_a_missing_exchange_is_404_and_to_the_default_403(channel, name):
    channel.exchange_declare(name, "fanout")
    with pytest.raises(ChannelClosedByBroker) as caught:
        channel.exchange_bind(name, f"{name}-missing")
    assert caught.value.reply_code == 404
    channel = channel.connection.channel()
    with pytest.raises(ChannelClosedByBroker) as caught:
        channel.exchange_bind(name, "")
    assert caught.value.reply_code == 403


def test_exchange_delete_if_unused_counts_exchange_bindings(channel, name):
    source, destination = f"{name}-src", f"{name}-dst"
    channel.exchange_declare(source, "fanout")
    channel.exchange_declare(destination, "fanout")
    channel.exchange_bind(destination, source)
    with pytest.raises(ChannelClosedByBroker) as caught:
        channel.exchange_delete(source, if_unused=True)
    assert caught.value.reply_code == 406
    channel = channel.connection.channel()
    channel.exchange_delete(destination)  # its bindings go with it
    channel.exchange_delete(source, if_unused=True)


CASES = [  # (binding arguments, message headers, routed?) as RabbitMQ 3.10 answers them
    ({"a": 1}, {"a": 1}, True),
    ({"a": 1}, {"a": "1"}, False),
    ({"a": 1}, {"a": True}, False),
    ({"a": True}, {"a": True}, True),
    ({"a": 1}, {"a": 2**40}, False),
    ({"a": 2**40}, {"a": 2**40}, True),
    ({"a": Decimal("1.5")}, {"a": Decimal("1.5")}, True),
    ({"a": Decimal("1")}, {"a": 1}, False),
    ({"a": 5}, {"a": datetime.datetime(1970, 1, 1, 0, 0, 5)}, True),
    ({"a": None}, {"a": 5}, True),
    ({"a": None}, {"b": 5}, False),
    ({"a": {"b": 1}}, {"a": {"b": 1}}, True),
    ({"a": [1, 2]}, {"a": [1, 2]}, True),
    ({"a": [1, 2]}, {"a": [2, 1]}, False),
    ({"x-match": "any", "a": 1, "b": "two"}, {"b": "two"}, True),
    ({"x-match": "all", "a": 1, "b": "two"}, {"b": "two"}, False),
    ({"x-match": "all", "x-a": "1"}, {}, True),
    ({"x-match": "all-with-x", "x-a": "1"}, {}, False),
    ({"x-match": "all-with-x", "x-a": "1"}, {"x-a": "1"}, True),
    ({"x-match": "any", "x-a": "1"}, {"x-a": "1"}, False),
    ({"x-match": "any-with-x", "x-a": "1"}, {"x-a": "1"}, True),
    ({"x-match": "any"}, {"a": "1"}, False),
]


def test_headers_exchange_matches_typed_values_as_rabbitmq(channel, name):
    channel.exchange_declare(name, "headers")
    queues = []
    for i, (arguments, _, _) in enumerate(CASES):
        queues.append(_queue(channel, name, str(i)))
        channel.queue_bind(queues[-1], name, arguments=arguments)
    channel.confirm_delivery()
    for i, (_, headers, _) in enumerate(CASES):
        channel.basic_publish(name, "", f"m{i}".encode(), pika.BasicProperties(headers=headers))
    for i, (arguments, headers, routed) in enumerate(CASES):
        got = [body for body in drain(channel, queues[i]) if body == f"m{i}".encode()]
        assert bool(got) == routed, (arguments, headers)


def test_unknown_x_match_is_406_with_rabbitmqs_text(channel, name):
    channel.exchange_declare(name, "headers")
    queue = _queue(channel, name, "q")
    with pytest.raises(ChannelClosedByBroker) as caught:
        channel.queue_bind(queue, name, arguments={"x-match": "bogus", "a": "1"})
    assert caught.value.reply_code == 406 and "Invalid x-match field value" in caught.value.reply_text


def test_headers_exchange_to_exchange_binding(channel, name):
    source, destination = f"{name}-src", f"{name}-dst"
    channel.exchange_declare(source, "headers")
    channel.exchange_declare(destination, "fanout")
    channel.exchange_bind(destination, source, arguments={"x-match": "all", "level": 3})
    queue = _queue(channel, name, "q")
    channel.queue_bind(queue, destination)
    channel.confirm_delivery()
    channel.basic_publish(source, "", b"three", pika.BasicProperties(headers={"level": 3}))
    channel.basic_publish(source, "", b"four", pika.BasicProperties(headers={"level": 4}))
    assert drain(channel, queue) == [b"three"]
