"""Queues that end by themselves (auto-delete, x-expires), a consumer told by basic.cancel that its queue was
deleted, queue names Chute does not allow, channel-wide prefetch, channel.flow, transactions and single active
consumers."""

from __future__ import annotations

import time

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker

import chute
from tests.amqp.conftest import chute_only


def gone(channel_factory, queue: str, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            channel_factory().queue_declare(queue, passive=True)
        except ChannelClosedByBroker as exc:
            assert exc.reply_code == 404
            return True
        time.sleep(0.02)
    return False


def test_auto_delete_queue_goes_with_its_last_consumer(connection, channel, name):
    channel.queue_declare(name, auto_delete=True)
    tag = channel.basic_consume(name, lambda *a: None)
    channel.queue_declare(name, passive=True)  # still there while consumed
    channel.basic_cancel(tag)
    assert gone(connection.channel, name)


@chute_only
def test_x_expires_deletes_an_unused_queue(server, channel, name):
    channel.queue_declare(name, arguments={"x-expires": 100})
    deadline = time.monotonic() + 10
    with chute.Client(server.url) as client:  # looking through AMQP (a declare) would count as using it
        while name in [q.name for q in client.list_queues()]:
            assert time.monotonic() < deadline, "the queue outlived its x-expires"
            time.sleep(0.02)


def test_consumer_is_cancelled_when_its_queue_is_deleted(server, connection, channel, name):
    channel.queue_declare(name)
    cancelled = []
    channel.add_on_cancel_callback(lambda method: cancelled.append(method.method.consumer_tag))
    tag = channel.basic_consume(name, lambda *a: None)
    connection.channel().queue_delete(name)  # from another channel of the same connection
    deadline = time.monotonic() + 10
    while not cancelled and time.monotonic() < deadline:
        connection.process_data_events(time_limit=0.05)
    assert cancelled == [tag]


@chute_only
def test_names_chute_does_not_allow_are_mapped_and_come_back(server, channel, name):
    queue = f"{name}@host:with/odd chars"
    assert channel.queue_declare(queue).method.queue == queue
    channel.confirm_delivery()
    channel.basic_publish("", queue, b"odd")
    method, _, body = channel.basic_get(queue, auto_ack=True)
    assert body == b"odd" and method.routing_key == queue
    with chute.Client(server.url) as client:
        assert f"{name}_x40_host_x3a_with_x2f_odd_x20_chars" in [q.name for q in client.list_queues()]


def test_channel_wide_prefetch(connection, channel, name):
    channel.queue_declare(name)
    for i in range(6):
        channel.basic_publish("", name, str(i).encode())
    channel.basic_qos(prefetch_count=3, global_qos=True)
    received = []
    for _ in range(2):
        channel.basic_consume(name, lambda ch, method, props, body: received.append(method.delivery_tag))
    connection.process_data_events(time_limit=0.5)
    assert len(received) == 3  # shared by the channel's two consumers


def test_channel_flow_off_is_not_implemented_as_in_rabbitmq(connection, channel, name):
    channel.flow(True)
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as caught:
        channel.flow(False)
    assert caught.value.reply_code == 540


def test_exclusive_consumer(connection, channel, name):
    channel.queue_declare(name)
    channel.basic_consume(name, lambda *a: None, exclusive=True)
    with pytest.raises(ChannelClosedByBroker) as caught:
        connection.channel().basic_consume(name, lambda *a: None)
    assert caught.value.reply_code == 403


def test_transactions_hold_publishes_and_acks_until_commit(connection, name):
    channel = connection.channel()
    channel.queue_declare(name)
    channel.tx_select()
    channel.basic_publish("", name, b"one")
    channel.basic_publish("", name, b"two")
    other = connection.channel()
    assert other.queue_declare(name, passive=True).method.message_count == 0  # not before the commit
    channel.tx_commit()
    assert other.queue_declare(name, passive=True).method.message_count == 2
    channel.basic_publish("", name, b"rolled back")
    channel.tx_rollback()
    method, _, body = channel.basic_get(name)
    assert body == b"one"
    channel.basic_ack(method.delivery_tag)
    channel.tx_rollback()  # the ack is forgotten: still unacked
    channel.close()
    got = [other.basic_get(name, auto_ack=True)[2] for _ in range(3)]
    assert got == [b"one", b"two", None]


def test_tx_and_confirm_modes_exclude_each_other(connection):
    channel = connection.channel()
    channel.confirm_delivery()
    with pytest.raises(ChannelClosedByBroker) as caught:
        channel.tx_select()
    assert caught.value.reply_code == 406
    with pytest.raises(ChannelClosedByBroker) as caught:
        connection.channel().tx_commit()
    assert caught.value.reply_code == 406


def test_single_active_consumer(server, name):
    connections = [pika.BlockingConnection(pika.URLParameters(server.amqp_url)) for _ in range(2)]
    try:
        first, second = (c.channel() for c in connections)
        first.queue_declare(name, arguments={"x-single-active-consumer": True})
        got: dict[str, list] = {"first": [], "second": []}
        tag = first.basic_consume(name, lambda ch, m, p, body: got["first"].append(body), auto_ack=True)
        second.basic_consume(name, lambda ch, m, p, body: got["second"].append(body), auto_ack=True)
        for i in range(3):
            first.basic_publish("", name, str(i).encode())
        deadline = time.monotonic() + 10
        while len(got["first"]) < 3:
            assert time.monotonic() < deadline
            connections[0].process_data_events(time_limit=0.05)
        connections[1].process_data_events(time_limit=0.3)
        assert got == {"first": [b"0", b"1", b"2"], "second": []}  # only the active consumer gets messages
        first.basic_cancel(tag)
        first.basic_publish("", name, b"3")
        while not got["second"]:
            assert time.monotonic() < deadline, "the next consumer did not become active"
            connections[1].process_data_events(time_limit=0.05)
        assert got["second"] == [b"3"]
    finally:
        for connection in connections:
            connection.close()


@chute_only
def test_restart_deletes_leftover_exclusive_queues_and_keeps_flags(tmp_path):
    from chute.testing import running_server

    with running_server(str(tmp_path)) as server:
        connection = pika.BlockingConnection(pika.URLParameters(server.amqp_url))
        channel = connection.channel()
        exclusive = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_declare("kept", durable=True, arguments={"x-max-priority": 3})
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker):  # 320 at the stop: pika closes its sockets
        connection.process_data_events(time_limit=5)
    with running_server(str(tmp_path)) as server:  # the exclusive queue's connection belonged to the last run
        channel = pika.BlockingConnection(pika.URLParameters(server.amqp_url)).channel()
        with pytest.raises(ChannelClosedByBroker) as caught:
            channel.queue_declare(exclusive, passive=True)
        assert caught.value.reply_code == 404
        channel = channel.connection.channel()
        with pytest.raises(ChannelClosedByBroker) as caught:  # its declared arguments were kept
            channel.queue_declare("kept", durable=True)
        assert caught.value.reply_code == 406
        channel.connection.close()


@chute_only
def test_restart_deletes_non_durable_queues_and_keeps_durable_ones(tmp_path):
    from chute.testing import running_server

    with running_server(str(tmp_path)) as server:
        connection = pika.BlockingConnection(pika.URLParameters(server.amqp_url))
        channel = connection.channel()
        channel.confirm_delivery()
        channel.queue_declare("transient", durable=False)
        channel.queue_declare("lasting", durable=True)
        for queue in ("transient", "lasting"):
            channel.basic_publish("", queue, b"kept?", pika.BasicProperties(delivery_mode=2))
        connection.close()
    with running_server(str(tmp_path)) as server:
        connection = pika.BlockingConnection(pika.URLParameters(server.amqp_url))
        channel = connection.channel()
        with pytest.raises(ChannelClosedByBroker) as caught:
            channel.queue_declare("transient", passive=True)
        assert caught.value.reply_code == 404
        channel = connection.channel()
        assert channel.basic_get("lasting", auto_ack=True)[2] == b"kept?"
        connection.close()


def test_a_queue_named_with_any_characters_is_declared_and_used(server, channel, name):
    """RabbitMQ takes any UTF-8 queue name up to 255 bytes; queue.declare-ok used to fail to encode one outside
    pamqp's old name domain (541, the connection closed)."""
    odd = f"{name} é!$%&(*)'\"?"
    assert channel.queue_declare(odd).method.queue == odd
    channel.confirm_delivery()
    channel.basic_publish("", odd, b"hello")
    assert channel.queue_declare(odd, passive=True).method.message_count == 1
    method, _, body = channel.basic_get(odd, auto_ack=True)
    assert body == b"hello" and method.routing_key == odd


def test_unbinding_what_is_gone_does_nothing(connection, channel, name):
    """As in RabbitMQ 3.10: queue.unbind and exchange.unbind naming a queue or exchange that does not exist answer
    unbind-ok (they were 404, which closed the channel of a client tidying up). Found by test_lifecycle_model.py."""
    channel.exchange_declare(name, "direct")
    channel.queue_declare(name)
    channel.queue_unbind(name, f"{name}-no-exchange", "k")
    channel.queue_unbind(f"{name}-no-queue", name, "k")
    channel.exchange_unbind(name, f"{name}-no-source", "k")
    channel.exchange_unbind(f"{name}-no-destination", name, "k")
    channel.queue_unbind(name, name, "never-bound")
    with pytest.raises(ChannelClosedByBroker) as raised:  # the default exchange is still refused
        connection.channel().queue_unbind(name, "", "k")
    assert raised.value.reply_code == 403
