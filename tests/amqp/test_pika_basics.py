"""pika's BlockingConnection against Chute: declare, publish with confirms, consume, get, ack / nack / reject,
prefetch, properties and headers, and the errors RabbitMQ sends, as pika reports them."""

from __future__ import annotations

import datetime
import time
from decimal import Decimal

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker, ConnectionClosedByBroker, NackError, UnroutableError


def test_hello_world_with_confirms_consume_and_ack(channel, name):
    channel.confirm_delivery()
    channel.queue_declare(name, durable=True)
    for i in range(10):
        channel.basic_publish("", name, f"m{i}".encode(), pika.BasicProperties(delivery_mode=2))
    bodies = []
    for method, _properties, body in channel.consume(name, inactivity_timeout=5):
        assert method is not None, "no delivery within 5 s"
        bodies.append(body)
        channel.basic_ack(method.delivery_tag)
        if len(bodies) == 10:
            break
    channel.cancel()
    assert bodies == [f"m{i}".encode() for i in range(10)]
    assert channel.queue_declare(name, passive=True).method.message_count == 0


def test_get_and_get_empty(channel, name):
    channel.queue_declare(name)
    assert channel.basic_get(name) == (None, None, None)
    channel.basic_publish("", name, b"one")
    channel.basic_publish("", name, b"two")
    method, _, body = channel.basic_get(name, auto_ack=True)
    assert body == b"one" and method.message_count == 1
    method, _, body = channel.basic_get(name)
    assert body == b"two" and method.message_count == 0
    channel.basic_ack(method.delivery_tag)
    assert channel.basic_get(name) == (None, None, None)


def test_nack_requeues_and_marks_redelivered_reject_drops(channel, name):
    channel.queue_declare(name)
    channel.basic_publish("", name, b"x")
    method, _, _ = channel.basic_get(name)
    assert not method.redelivered
    channel.basic_nack(method.delivery_tag, requeue=True)
    method, _, body = channel.basic_get(name)
    assert body == b"x" and method.redelivered
    channel.basic_reject(method.delivery_tag, requeue=False)  # no dead-letter queue: dropped
    assert channel.basic_get(name) == (None, None, None)


def test_ack_multiple_and_nack_multiple(channel, name):
    channel.queue_declare(name)
    for i in range(6):
        channel.basic_publish("", name, str(i).encode())
    tags = [channel.basic_get(name)[0].delivery_tag for _ in range(6)]
    channel.basic_ack(tags[2], multiple=True)  # 0, 1, 2
    channel.basic_nack(tags[5], multiple=True, requeue=True)  # 3, 4, 5 back
    got = sorted(channel.basic_get(name, auto_ack=True)[2] for _ in range(3))
    assert got == [b"3", b"4", b"5"]
    assert channel.basic_get(name) == (None, None, None)


def test_unacked_messages_return_when_the_channel_closes(connection, name):
    first = connection.channel()
    first.queue_declare(name)
    first.basic_publish("", name, b"kept")
    assert first.basic_get(name)[2] == b"kept"
    first.close()  # not acked: back in the queue
    second = connection.channel()
    method, _, body = second.basic_get(name)
    assert body == b"kept" and method.redelivered


def test_recover_redelivers_unacked(channel, name):
    channel.queue_declare(name)
    channel.basic_publish("", name, b"r")
    channel.basic_get(name)
    channel.basic_recover(requeue=True)
    method, _, body = channel.basic_get(name)
    assert body == b"r" and method.redelivered


def test_prefetch_limits_unacked_deliveries(connection, channel, name):
    channel.queue_declare(name)
    for i in range(5):
        channel.basic_publish("", name, str(i).encode())
    channel.basic_qos(prefetch_count=2)
    received = []
    channel.basic_consume(name, lambda ch, method, props, body: received.append(method.delivery_tag))
    connection.process_data_events(time_limit=0.5)
    assert len(received) == 2  # two unacked: no more until one is acked
    channel.basic_ack(received[0])
    deadline = 50
    while len(received) < 3 and deadline:
        connection.process_data_events(time_limit=0.1)
        deadline -= 1
    assert len(received) == 3


def test_properties_and_header_table_round_trip(channel, name):
    channel.queue_declare(name)
    stamp = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)  # pika decodes timestamps as UTC
    headers = {"text": "plain", "int": 42, "negative": -7, "big": 2**40, "bool": True, "decimal": Decimal("3.14"),
               "time": stamp, "bytes": b"\x00\xff", "nested": {"a": [1, "two", {"b": None}]}, "list": [1, 2, 3],
               "void": None, "amqp-clash": "kept apart"}  # fmt: skip
    properties = pika.BasicProperties(content_type="application/json", content_encoding="gzip", headers=headers,
                                      delivery_mode=2, priority=3, correlation_id="c-1", reply_to="replies",
                                      message_id="m-1", timestamp=1_700_000_000, type="order.created",
                                      user_id="guest", app_id="tests")  # fmt: skip
    channel.basic_publish("", name, b"{}", properties)
    _, got, body = channel.basic_get(name, auto_ack=True)
    assert body == b"{}"
    for field in ("content_type", "content_encoding", "delivery_mode", "priority", "correlation_id", "reply_to",
                  "message_id", "timestamp", "type", "user_id", "app_id"):  # fmt: skip
        assert getattr(got, field) == getattr(properties, field), field
    assert got.headers["time"] == stamp
    assert got.headers["bytes"] == b"\x00\xff"
    assert got.headers["decimal"] == Decimal("3.14")
    assert got.headers == headers


def test_mandatory_unroutable_publish_is_returned(channel, name):
    channel.confirm_delivery()
    with pytest.raises(UnroutableError):
        channel.basic_publish("", f"{name}-missing", b"lost", mandatory=True)
    channel.basic_publish("", f"{name}-missing", b"dropped silently")  # not mandatory: confirmed, dropped


def test_a_user_id_that_is_not_the_connections_user_is_406(connection, name):
    # as RabbitMQ: the user_id property, when set, must name the user the connection logged in as (guest here)
    channel = connection.channel()
    channel.queue_declare(name)
    channel.confirm_delivery()
    channel.basic_publish("", name, b"mine", pika.BasicProperties(user_id="guest"))
    with pytest.raises(ChannelClosedByBroker) as caught:
        channel.basic_publish("", name, b"forged", pika.BasicProperties(user_id="mallory"))
    assert caught.value.reply_code == 406
    assert "user_id property set to 'mallory' but authenticated user was 'guest'" in caught.value.reply_text
    other = connection.channel()
    assert other.queue_declare(name, passive=True).method.message_count == 1  # the forged one was not stored
    _, properties, body = other.basic_get(name, auto_ack=True)
    assert body == b"mine" and properties.user_id == "guest"


def test_passive_declare_of_a_missing_queue_is_404(channel, name):
    with pytest.raises(ChannelClosedByBroker) as caught:
        channel.queue_declare(name, passive=True)
    assert caught.value.reply_code == 404
    assert f"no queue '{name}'" in caught.value.reply_text


def test_redeclare_with_other_arguments_is_406(connection, name):
    channel = connection.channel()
    channel.queue_declare(name, arguments={"x-max-length": 10})
    with pytest.raises(ChannelClosedByBroker) as caught:
        channel.queue_declare(name, arguments={"x-max-length": 20})
    assert caught.value.reply_code == 406
    other = connection.channel()
    other.exchange_declare(name, "direct")
    with pytest.raises(ChannelClosedByBroker) as caught:
        other.exchange_declare(name, "fanout")
    assert caught.value.reply_code == 406 and "inequivalent arg 'type'" in caught.value.reply_text


def test_unknown_delivery_tag_is_406(channel, name):
    channel.queue_declare(name)
    channel.basic_ack(99)
    with pytest.raises(ChannelClosedByBroker) as caught:
        channel.queue_declare(name, passive=True)  # the channel was closed by the bad ack
    assert caught.value.reply_code == 406 and "unknown delivery tag 99" in caught.value.reply_text


def test_exclusive_queue_is_locked_to_its_connection_and_deleted_with_it(server, connection, name):
    channel = connection.channel()
    queue = channel.queue_declare("", exclusive=True).method.queue
    assert queue.startswith("amq.gen-")
    other = pika.BlockingConnection(pika.URLParameters(server.amqp_url))
    try:
        with pytest.raises(ChannelClosedByBroker) as caught:
            other.channel().basic_consume(queue, lambda *a: None)
        assert caught.value.reply_code == 405
        connection.close()
        check = other.channel()
        for _ in range(100):  # the queue goes once the owner's connection has ended
            try:
                check.queue_declare(queue, passive=True)
            except ChannelClosedByBroker as exc:
                assert exc.reply_code == 404
                break
            other.sleep(0.02)
        else:
            pytest.fail("the exclusive queue outlived its connection")
    finally:
        other.close()


def test_default_exchange_and_reserved_names_are_403(channel, name):
    with pytest.raises(ChannelClosedByBroker) as caught:
        channel.queue_declare("amq.mine")
    assert caught.value.reply_code == 403


def test_publish_to_a_missing_exchange_is_404(channel, name):
    channel.confirm_delivery()
    with pytest.raises(ChannelClosedByBroker) as caught:
        channel.basic_publish(f"{name}-nope", "k", b"x")
    assert caught.value.reply_code == 404 and "no exchange" in caught.value.reply_text


def test_other_vhost_is_refused_with_530(server):
    params = pika.URLParameters(server.amqp_url + "other")
    with pytest.raises((ConnectionClosedByBroker, pika.exceptions.ProbableAccessDeniedError)) as caught:
        pika.BlockingConnection(params)
    if isinstance(caught.value, ConnectionClosedByBroker):
        assert caught.value.reply_code == 530


def test_purge_and_delete_if_empty_if_unused(channel, name):
    channel.queue_declare(name)
    for _ in range(3):
        channel.basic_publish("", name, b"x")
    with pytest.raises(ChannelClosedByBroker) as caught:
        channel.queue_delete(name, if_empty=True)
    assert caught.value.reply_code == 406
    channel = channel.connection.channel()
    assert channel.queue_purge(name).method.message_count == 3
    channel.basic_consume(name, lambda *a: None)
    with pytest.raises(ChannelClosedByBroker) as caught:
        channel.queue_delete(name, if_unused=True)
    assert caught.value.reply_code == 406
    channel = channel.connection.channel()
    assert channel.queue_delete(name).method.message_count == 0
    assert channel.queue_delete(name).method.message_count == 0  # gone already: still delete-ok


def test_reject_publish_overflow_nacks_the_publish(channel, name):
    channel.confirm_delivery()
    channel.queue_declare(name, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    channel.basic_publish("", name, b"first")
    with pytest.raises(NackError):
        channel.basic_publish("", name, b"second")
    assert channel.basic_get(name, auto_ack=True)[2] == b"first"


def test_a_message_larger_than_a_frame_round_trips(channel, name):
    body = bytes(range(256)) * 2000  # 512,000 bytes: several body frames each way (frame_max 131,072)
    channel.queue_declare(name)
    channel.confirm_delivery()
    channel.basic_publish("", name, body)
    assert channel.basic_get(name, auto_ack=True)[2] == body


def test_work_queue_fair_dispatch_with_prefetch_one(server, name):
    """RabbitMQ's tutorial 2: two workers with prefetch 1 share the tasks; an unacked one is not given more."""
    connections = [pika.BlockingConnection(pika.URLParameters(server.amqp_url)) for _ in range(2)]
    try:
        producer = connections[0].channel()
        producer.queue_declare(name, durable=True)
        producer.confirm_delivery()
        for i in range(6):
            producer.basic_publish("", name, str(i).encode(), pika.BasicProperties(delivery_mode=2))
        busy, idle = (c.channel() for c in connections)
        for channel in (busy, idle):
            channel.basic_qos(prefetch_count=1)
        held = []
        busy.basic_consume(name, lambda ch, method, props, body: held.append(body))  # never acks
        done = []

        def work(ch, method, props, body):
            done.append(body)
            ch.basic_ack(method.delivery_tag)

        connections[0].process_data_events(time_limit=0.3)
        idle.basic_consume(name, work)
        deadline = time.monotonic() + 10
        while len(done) < 5:
            assert time.monotonic() < deadline, f"only {done} done"
            connections[1].process_data_events(time_limit=0.1)
            connections[0].process_data_events(time_limit=0)
        assert len(held) == 1 and sorted(held + done) == [str(i).encode() for i in range(6)]
    finally:
        for connection in connections:
            connection.close()


def test_redeclaring_with_other_flags_or_arguments_is_406(connection, name):
    channel = connection.channel()
    channel.queue_declare(name, durable=True, arguments={"x-max-priority": 5})
    channel.queue_declare(name, durable=True, arguments={"x-max-priority": 5})  # the same: fine
    for flags, arguments, what in ((False, {"x-max-priority": 5}, "durable"), (True, {}, "x-max-priority"),
                                   (True, {"x-max-priority": 6}, "x-max-priority")):  # fmt: skip
        with pytest.raises(ChannelClosedByBroker) as caught:
            connection.channel().queue_declare(name, durable=flags, arguments=arguments)
        assert caught.value.reply_code == 406 and f"inequivalent arg '{what}'" in caught.value.reply_text
