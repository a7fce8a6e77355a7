"""Alternate exchanges (the `alternate-exchange` argument of exchange.declare), as RabbitMQ 3.10 routes them: a
message an exchange routes nowhere goes on to its alternate exchange, with the same routing key and headers."""

from __future__ import annotations

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker

from tests.amqp.conftest import chute_only
from tests.amqp.test_routing import drain


def _queue(channel, name: str, suffix: str) -> str:
    queue = f"{name}-{suffix}"
    channel.queue_declare(queue)
    return queue


def _with_ae(channel, exchange: str, kind: str, ae: str) -> None:
    channel.exchange_declare(exchange, kind, arguments={"alternate-exchange": ae})


def _orders_with_ae(channel, name: str) -> tuple[str, str, str]:
    """A direct exchange whose key `created` reaches one queue, and whose alternate (a fanout) another:
    (exchange, queue of `created`, queue of the alternate)."""
    orders, unrouted = f"{name}-orders", f"{name}-unrouted"
    channel.exchange_declare(unrouted, "fanout")
    _with_ae(channel, orders, "direct", unrouted)
    created, caught = _queue(channel, name, "created"), _queue(channel, name, "caught")
    channel.queue_bind(created, orders, "created")
    channel.queue_bind(caught, unrouted)
    return orders, created, caught


def test_what_the_exchange_routes_nowhere_goes_to_its_alternate(channel, name):
    orders, created, caught = _orders_with_ae(channel, name)
    channel.confirm_delivery()
    channel.basic_publish(orders, "created", b"one")
    channel.basic_publish(orders, "paid", b"two", pika.BasicProperties(headers={"region": "eu"}))
    assert drain(channel, created) == [b"one"]
    method, properties, body = channel.basic_get(caught, auto_ack=True)
    assert body == b"two"
    assert (method.exchange, method.routing_key) == (orders, "paid")  # as published, not the alternate's
    assert properties.headers == {"region": "eu"}
    assert channel.basic_get(caught, auto_ack=True) == (None, None, None)


def test_a_mandatory_publish_the_alternate_routes_is_not_returned(channel, name):
    orders, unrouted = f"{name}-orders", f"{name}-unrouted"
    channel.exchange_declare(unrouted, "fanout")
    _with_ae(channel, orders, "topic", unrouted)
    caught = _queue(channel, name, "caught")
    channel.queue_bind(caught, unrouted)
    channel.confirm_delivery()
    channel.basic_publish(orders, "a.b", b"caught", mandatory=True)  # no UnroutableError
    assert drain(channel, caught) == [b"caught"]


def test_alternates_are_followed_in_a_chain_and_a_loop_ends(channel, name):
    first, second, third = (f"{name}-{x}" for x in ("first", "second", "third"))
    _with_ae(channel, first, "direct", second)
    _with_ae(channel, second, "direct", third)
    _with_ae(channel, third, "topic", first)  # back to the start: each exchange is tried once
    at_second, at_third = _queue(channel, name, "at-second"), _queue(channel, name, "at-third")
    channel.queue_bind(at_second, second, "two")
    channel.queue_bind(at_third, third, "three.#")
    channel.confirm_delivery()
    channel.basic_publish(first, "two", b"a")
    channel.basic_publish(first, "three.x", b"b")
    with pytest.raises(pika.exceptions.UnroutableError):
        channel.basic_publish(first, "four", b"c", mandatory=True)  # round the loop, then nowhere
    assert drain(channel, at_second) == [b"a"]
    assert drain(channel, at_third) == [b"b"]


def test_an_alternate_that_does_not_exist_leaves_the_message_unroutable(channel, name):
    orders = f"{name}-orders"
    _with_ae(channel, orders, "direct", f"{name}-missing")
    channel.confirm_delivery()
    with pytest.raises(pika.exceptions.UnroutableError):
        channel.basic_publish(orders, "k", b"lost", mandatory=True)
    channel.basic_publish(orders, "k", b"dropped")  # without mandatory: confirmed and dropped, as RabbitMQ does


def test_an_alternate_declared_later_is_used_from_then_on(channel, name):
    orders, unrouted = f"{name}-orders", f"{name}-unrouted"
    _with_ae(channel, orders, "direct", unrouted)
    channel.exchange_declare(unrouted, "fanout")
    caught = _queue(channel, name, "caught")
    channel.queue_bind(caught, unrouted)
    channel.confirm_delivery()
    channel.basic_publish(orders, "k", b"late")
    assert drain(channel, caught) == [b"late"]


def test_the_alternate_is_not_used_when_an_exchange_binding_takes_the_message(channel, name):
    """The alternate belongs to the exchange that routes a message nowhere: an exchange-to-exchange binding is a
    route, even if the exchange it leads to routes the message nowhere (that exchange's own alternate is used)."""
    front, inner, front_ae, inner_ae = (f"{name}-{x}" for x in ("front", "inner", "front-ae", "inner-ae"))
    for exchange in (front_ae, inner_ae):
        channel.exchange_declare(exchange, "fanout")
    _with_ae(channel, front, "direct", front_ae)
    _with_ae(channel, inner, "direct", inner_ae)
    channel.exchange_bind(inner, front, "k")
    at_front_ae, at_inner_ae = _queue(channel, name, "front-ae"), _queue(channel, name, "inner-ae")
    channel.queue_bind(at_front_ae, front_ae)
    channel.queue_bind(at_inner_ae, inner_ae)
    channel.confirm_delivery()
    channel.basic_publish(front, "k", b"through-inner")
    channel.basic_publish(front, "other", b"nowhere-at-front")
    assert drain(channel, at_inner_ae) == [b"through-inner"]
    assert drain(channel, at_front_ae) == [b"nowhere-at-front"]


def test_a_headers_exchange_sends_what_matches_no_binding_to_its_alternate(channel, name):
    matched, unrouted = f"{name}-matched", f"{name}-unrouted"
    channel.exchange_declare(unrouted, "fanout")
    _with_ae(channel, matched, "headers", unrouted)
    eu, caught = _queue(channel, name, "eu"), _queue(channel, name, "caught")
    channel.queue_bind(eu, matched, arguments={"x-match": "all", "region": "eu"})
    channel.queue_bind(caught, unrouted)
    channel.confirm_delivery()
    channel.basic_publish(matched, "", b"eu", pika.BasicProperties(headers={"region": "eu"}))
    channel.basic_publish(matched, "", b"us", pika.BasicProperties(headers={"region": "us"}))
    assert drain(channel, eu) == [b"eu"]
    assert drain(channel, caught) == [b"us"]


def test_a_redeclaration_with_another_alternate_is_refused(connection, name):
    channel = connection.channel()
    channel.exchange_declare(f"{name}-a", "fanout")
    _with_ae(channel, name, "direct", f"{name}-a")
    _with_ae(channel, name, "direct", f"{name}-a")  # the same: fine
    with pytest.raises(ChannelClosedByBroker) as raised:
        _with_ae(channel, name, "direct", f"{name}-b")
    assert raised.value.reply_code == 406


@chute_only
def test_native_publishes_to_the_exchange_topic_are_unchanged(server, channel, name):
    """Only AMQP publishes follow the alternate (docs/amqp.md): a native publish to `exchange.X` reaches X's
    subscriptions, and nothing else."""
    from chute.client import Client

    orders, created, caught = _orders_with_ae(channel, name)
    with Client(server.url) as client:
        client.publish(f"exchange.{orders}", b"native", subject="created")
    assert drain(channel, created) == [b"native"]
    assert drain(channel, caught) == []


@pytest.mark.parametrize("value, kind", [(5, "signedint"), (True, "bool")])
def test_an_alternate_that_is_not_a_string_is_406(connection, name, value, kind):
    with pytest.raises(ChannelClosedByBroker) as raised:
        _with_ae(connection.channel(), name, "direct", value)
    assert raised.value.reply_code == 406
    assert raised.value.reply_text == (f"PRECONDITION_FAILED - invalid type '{kind}' for arg 'alternate-exchange' in "
                                       f"exchange '{name}' in vhost '/'")  # fmt: skip


def test_a_redeclaration_compares_the_alternate_and_no_other_argument(connection, name):
    channel = connection.channel()
    channel.exchange_declare(name, "direct", arguments={"x-anything": 1})
    channel.exchange_declare(name, "direct", arguments={"x-anything": 2})  # RabbitMQ compares only the alternate
    with pytest.raises(ChannelClosedByBroker) as raised:
        _with_ae(channel, name, "direct", "other")
    assert raised.value.reply_text == (f"PRECONDITION_FAILED - inequivalent arg 'alternate-exchange' for exchange "
                                       f"'{name}' in vhost '/': received the value 'other' of type 'longstr' but "
                                       "current is none")  # fmt: skip


@chute_only
def test_declaring_an_alternate_needs_the_publish_permission_on_it():
    from chute.server.users import Grant
    from chute.testing import running_server
    from tests.auth.conftest import make_user

    grants = [Grant(allow=["publish", "manage"], topics="exchange.mine.*"), Grant(allow=["manage"], topics="*")]
    with running_server(users=[make_user("alice", "alice-pw", grants=grants)]) as server:
        url = server.amqp_url.replace("amqp://", "amqp://alice:alice-pw@")
        with pika.BlockingConnection(pika.URLParameters(url)) as connection:
            channel = connection.channel()
            channel.exchange_declare("mine.ae", "fanout")
            channel.exchange_declare("theirs", "fanout")
            _with_ae(channel, "mine.orders", "direct", "mine.ae")
            with pytest.raises(ChannelClosedByBroker) as raised:
                _with_ae(channel, "mine.payments", "direct", "theirs")  # could publish there through it
            assert raised.value.reply_code == 403


@chute_only
def test_the_alternate_is_kept_across_a_restart(tmp_path, name):
    from chute.testing import running_server

    orders, unrouted = f"{name}-orders", f"{name}-unrouted"
    with running_server(str(tmp_path)) as server, pika.BlockingConnection(pika.URLParameters(server.amqp_url)) as c:
        channel = c.channel()
        channel.exchange_declare(unrouted, "fanout", durable=True)
        _with_ae(channel, orders, "direct", unrouted)
        channel.queue_declare(f"{name}-caught", durable=True)
        channel.queue_bind(f"{name}-caught", unrouted)
    with running_server(str(tmp_path)) as server, pika.BlockingConnection(pika.URLParameters(server.amqp_url)) as c:
        channel = c.channel()
        channel.confirm_delivery()
        channel.basic_publish(orders, "k", b"after the restart", mandatory=True)
        assert drain(channel, f"{name}-caught") == [b"after the restart"]
