"""Consumer priorities (`x-priority`) and basic.qos's prefetch_size, as RabbitMQ has them: a consumer of higher
priority gets the messages while it has prefetch room, the others get the rest; prefetch_size other than 0 is
RabbitMQ's connection.close 540."""

from __future__ import annotations

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker, ConnectionClosedByBroker

from chute.testing import running_server
from tests.amqp.conftest import chute_only


def _collect(connection, got: dict, total: int) -> None:
    for _ in range(100):
        if sum(len(each) for each in got.values()) >= total:
            return
        connection.process_data_events(time_limit=0.1)
    raise AssertionError(f"only {got} within 10 s")


def test_higher_priority_consumer_gets_messages_while_it_has_room(connection, channel, name):
    channel.queue_declare(name)
    got: dict[str, list] = {"high": [], "low": []}
    channel.basic_qos(prefetch_count=3)
    channel.basic_consume(name, lambda ch, m, p, b: got["high"].append(m.delivery_tag), arguments={"x-priority": 10})
    channel.basic_qos(prefetch_count=0)
    channel.basic_consume(name, lambda ch, m, p, b: got["low"].append(m.delivery_tag))
    publisher = connection.channel()
    publisher.confirm_delivery()
    for i in range(10):
        publisher.basic_publish("", name, str(i).encode())
    _collect(connection, got, 10)
    assert len(got["high"]) == 3 and len(got["low"]) == 7  # the high one is full after 3 unacked
    for tag in got["low"]:
        channel.basic_ack(tag)
    channel.basic_ack(got["high"][-1], multiple=True)  # room again: the next messages go to it first
    got["high"].clear()
    for i in range(3):
        publisher.basic_publish("", name, str(i).encode())
    _collect(connection, got, 10)
    assert len(got["high"]) == 3


def test_negative_priority_consumer_is_last(connection, channel, name):
    channel.queue_declare(name)
    got: dict[str, list] = {"normal": [], "negative": []}
    channel.basic_consume(name, lambda ch, m, p, b: got["negative"].append(b), auto_ack=True,
                          arguments={"x-priority": -5})  # fmt: skip
    channel.basic_consume(name, lambda ch, m, p, b: got["normal"].append(b), auto_ack=True)
    publisher = connection.channel()
    publisher.confirm_delivery()
    for i in range(5):
        publisher.basic_publish("", name, str(i).encode())
    _collect(connection, got, 5)
    assert got == {"normal": [str(i).encode() for i in range(5)], "negative": []}


def test_priority_that_is_not_an_integer_is_406(channel, name):
    channel.queue_declare(name)
    with pytest.raises(ChannelClosedByBroker) as caught:
        channel.basic_consume(name, lambda *a: None, arguments={"x-priority": "high"})
    assert caught.value.reply_code == 406


def test_prefetch_size_zero_is_accepted_other_sizes_are_540(connection, channel):
    channel.basic_qos(prefetch_size=0, prefetch_count=10)
    with pytest.raises((ConnectionClosedByBroker, ChannelClosedByBroker)) as caught:
        channel.basic_qos(prefetch_size=4096, prefetch_count=10)
    assert caught.value.reply_code == 540
    assert "prefetch_size!=0 (4096)" in caught.value.reply_text
    assert not connection.is_open


@chute_only
def test_unacked_delivery_past_the_consumer_timeout_closes_the_channel_and_goes_back():
    with running_server(amqp_consumer_timeout_s=0.5) as server:
        connection = pika.BlockingConnection(pika.URLParameters(server.amqp_url))
        try:
            channel = connection.channel()
            channel.queue_declare("slow")
            channel.basic_publish("", "slow", b"job")
            with pytest.raises(ChannelClosedByBroker) as caught:
                for count, _delivery in enumerate(channel.consume("slow", inactivity_timeout=0.1)):  # never acks
                    assert count < 100, "the channel was not closed within 10 s"
            assert caught.value.reply_code == 406
            assert "delivery acknowledgement on channel" in caught.value.reply_text
            assert "Timeout value used: 500 ms" in caught.value.reply_text
            method, _, body = connection.channel().basic_get("slow", auto_ack=True)  # back in its queue at once
            assert body == b"job" and method.redelivered
        finally:
            connection.close()


@chute_only
def test_a_delivery_acked_in_time_keeps_the_channel_open():
    with running_server(amqp_consumer_timeout_s=0.5) as server:
        connection = pika.BlockingConnection(pika.URLParameters(server.amqp_url))
        try:
            channel = connection.channel()
            channel.queue_declare("quick")
            for i in range(3):
                channel.basic_publish("", "quick", str(i).encode())
                method, _, _ = channel.basic_get("quick")
                connection.process_data_events(time_limit=0.3)
                channel.basic_ack(method.delivery_tag)
            connection.process_data_events(time_limit=0.6)  # past the timeout of every delivery, all acked
            assert channel.is_open
        finally:
            connection.close()
