"""x-death as RabbitMQ writes it: one entry per (queue, reason), its count going up, the most recent first, and
the x-first-death-* headers kept, for a message going round a loop of dead-letter queues."""

from __future__ import annotations

import time

import pika
import pytest
import requests
from pamqp import commands

import chute
from tests.amqp.conftest import chute_only
from tests.amqp.raw import Raw
from tests.amqp.test_routing import one_message_queue


def get_one(channel, queue: str, timeout_s: float = 10.0):
    """basic.get (not acked) until a message comes (a condition awaited, bounded)."""
    deadline = time.monotonic() + timeout_s
    while True:
        method, properties, body = channel.basic_get(queue)
        if method is not None:
            return method, properties, body
        assert time.monotonic() < deadline, f"no message in {queue} within {timeout_s} s"
        channel.connection.sleep(0.01)


def summary(properties) -> list[tuple]:
    return [(each["queue"], each["reason"], each["count"]) for each in properties.headers.get("x-death", [])]


def test_x_death_round_a_dead_letter_loop(channel, name):
    work, retry = f"{name}-work", f"{name}-retry"
    channel.queue_declare(work, arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": retry})
    channel.queue_declare(retry, arguments={"x-message-ttl": 30, "x-dead-letter-exchange": "",
                                            "x-dead-letter-routing-key": work})  # fmt: skip
    channel.confirm_delivery()
    channel.basic_publish("", work, b"flaky", pika.BasicProperties(headers={"attempt": "first"}))
    seen = []
    for _ in range(3):  # rejected in work, expired in retry, back in work: three times round
        method, properties, body = get_one(channel, work)
        assert body == b"flaky" and properties.headers["attempt"] == "first"
        seen.append(summary(properties))
        channel.basic_reject(method.delivery_tag, requeue=False)
    assert seen == [
        [],
        [(retry, "expired", 1), (work, "rejected", 1)],
        [(retry, "expired", 2), (work, "rejected", 2)],
    ]
    method, properties, _ = get_one(channel, retry)  # the third rejection, before it expires: rejected is newest
    assert summary(properties) == [(work, "rejected", 3), (retry, "expired", 2)]
    headers = properties.headers
    assert headers["x-first-death-queue"] == work and headers["x-first-death-reason"] == "rejected"
    assert headers["x-first-death-exchange"] == ""
    death = headers["x-death"][0]
    assert death["exchange"] == "" and isinstance(death["routing-keys"], list) and "time" in death


def test_queues_dead_lettering_into_each_other_can_be_deleted(channel, name):
    first, second = f"{name}-first", f"{name}-second"
    channel.queue_declare(first, arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": second})
    channel.queue_declare(second, arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": first})
    channel.queue_delete(first)  # the dead-letter queue of `second`: RabbitMQ deletes it all the same
    channel.confirm_delivery()
    channel.basic_publish("", second, b"x")
    method, _, _ = get_one(channel, second)
    channel.basic_reject(method.delivery_tag, requeue=False)  # its dead-letter queue is gone: dropped
    channel.queue_delete(second)
    channel.queue_declare(second, passive=False)
    assert channel.basic_get(second) == (None, None, None)


def test_a_dead_letter_carries_its_dead_letter_exchange_and_routing_key_as_rabbitmq_republishes_it(channel, name):
    """Published to an exchange, rejected into a queue (default exchange, x-dead-letter-routing-key), expired from
    there through a named dead-letter exchange: each hop shows the exchange and routing key the dead letter was
    republished with, in the delivery and in the next x-death entry, as RabbitMQ does."""
    source, dead_exchange, work, retry = f"{name}-ex", f"{name}-dlx", f"{name}-work", f"{name}-retry"
    channel.exchange_declare(source, "direct")
    channel.exchange_declare(dead_exchange, "direct")
    channel.queue_declare(work, arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": retry})
    channel.queue_declare(retry, arguments={"x-message-ttl": 30, "x-dead-letter-exchange": dead_exchange,
                                            "x-dead-letter-routing-key": "back"})  # fmt: skip
    channel.queue_bind(work, source, "orders.new")
    channel.queue_bind(work, dead_exchange, "back")
    channel.confirm_delivery()
    channel.basic_publish(source, "orders.new", b"once more", pika.BasicProperties(headers={"a": "b"}))
    method, properties, _ = get_one(channel, work)
    assert (method.exchange, method.routing_key) == (source, "orders.new")
    channel.basic_reject(method.delivery_tag, requeue=False)  # to retry, then expired back to work
    method, properties, body = get_one(channel, work)
    assert body == b"once more" and properties.headers["a"] == "b"
    assert (method.exchange, method.routing_key) == (dead_exchange, "back")
    deaths = [(d["queue"], d["reason"], d["count"], d["exchange"], list(d["routing-keys"]))
              for d in properties.headers["x-death"]]  # fmt: skip
    assert deaths == [(retry, "expired", 1, "", [retry]), (work, "rejected", 1, source, ["orders.new"])]
    assert properties.headers["x-first-death-exchange"] == source
    channel.basic_ack(method.delivery_tag)


def test_x_death_count_goes_on_the_wire_as_a_64_bit_integer(server, channel, name):
    """RabbitMQ sends each x-death `count` as a signed 64-bit field value (`l`): clients in typed languages read it
    as such (Go's `death["count"].(int64)`), so a smaller type would break them. Read off the raw frames."""
    work, dead = f"{name}-work", f"{name}-dead"
    channel.queue_declare(dead)
    channel.queue_declare(work, arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dead})
    channel.confirm_delivery()
    channel.basic_publish("", work, b"once")
    method, _, _ = get_one(channel, work)
    channel.basic_reject(method.delivery_tag, requeue=False)
    get_one(channel, dead)  # it is there (left unacked: the raw client below gets it once this channel closes)
    channel.close()
    raw = Raw(server.server.amqp_port)
    try:
        raw.handshake()  # channel 1 open
        deadline = time.monotonic() + 10
        while True:
            raw.method(1, commands.Basic.Get(queue=dead, no_ack=True))
            reply = raw.read()
            assert reply is not None
            if isinstance(reply[1], commands.Basic.GetOk):
                break
            assert time.monotonic() < deadline, "the dead letter did not come back"
        while b"once" not in raw.buffer:  # the content header and body frames, as sent
            data = raw.sock.recv(65536)
            assert data, "connection closed"
            raw.buffer += data
        assert b"\x05countl\x00\x00\x00\x00\x00\x00\x00\x01" in raw.buffer
    finally:
        raw.close()


@chute_only
def test_a_rejected_message_from_another_front_with_odd_chute_option_headers_is_dead_lettered(server, channel, name):
    # x-delay, x-group-id: AMQP publishes are checked for them, but a native or HTTP message may hold any string
    # there; the republish to the dead-letter queue read them again and failed (a background error: the message
    # stayed unacked, back in its queue at every rejection); a dead letter does not carry them over as options
    work, dead = f"{name}-work", f"{name}-dead"
    odd = {"x-delay": "soon", "x-group-id": "g" * 200, "region": "eu"}
    with chute.Client(server.url) as client:
        client.create_queue(dead)
        client.create_queue(work, dead_letter_queue=dead)
        client.publish(work, b"odd", headers=odd)
    method, _, _ = get_one(channel, work)
    channel.basic_reject(method.delivery_tag, requeue=False)
    method, properties, body = get_one(channel, dead)
    assert body == b"odd" and summary(properties) == [(work, "rejected", 1)]
    assert {key: properties.headers[key] for key in odd} == odd
    channel.basic_ack(method.delivery_tag)
    assert channel.queue_declare(work, passive=True).method.message_count == 0
    with chute.Client(server.url) as client:
        assert client.peek(work) == []  # not in flight either


@chute_only
def test_a_header_amqp_cannot_show_survives_a_rejection_to_the_dead_letter_queue(server, channel, name):
    # a 256-character name (a valid SQS attribute name) cannot be in an AMQP table: the consumer does not see it,
    # but the republish to the dead-letter queue used to lose it for every other front
    work, dead = f"{name}-work", f"{name}-dead"
    long_name = "n" * 256
    with chute.Client(server.url) as client:
        client.create_queue(dead)
        client.create_queue(work, dead_letter_queue=dead)
        client.publish(work, b"long", headers={long_name: "kept", f"sqs:type:{long_name}": "Binary"})
        method, properties, _ = get_one(channel, work)
        assert long_name not in (properties.headers or {})
        channel.basic_reject(method.delivery_tag, requeue=False)
        [delivery] = client.receive(dead, wait_s=10)
    assert delivery.message.headers[long_name] == "kept"
    assert delivery.message.headers[f"sqs:type:{long_name}"] == "Binary"


@chute_only
def test_a_rejection_is_counted_as_a_dead_letter_not_as_an_ack(server, channel, name):
    """A rejected message is republished to the dead-letter queue (for its x-death history) and its delivery
    settled: the queue's counters (and `chute_queue_messages_dead_lettered_total`) show a nacked, dead-lettered
    message, as for a dead letter the broker moves itself, not an acked one."""
    work, dead = f"{name}-work", f"{name}-dead"
    channel.queue_declare(dead)
    channel.queue_declare(work, arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dead})
    channel.confirm_delivery()
    for body in (b"rejected", b"acked"):
        channel.basic_publish("", work, body)
    first, _, _ = get_one(channel, work)
    channel.basic_reject(first.delivery_tag, requeue=False)
    get_one(channel, dead)
    second, _, _ = get_one(channel, work)
    channel.basic_ack(second.delivery_tag)
    deadline = time.monotonic() + 10
    with chute.Client(server.url) as client:
        while (stats := client.queue_stats(work)).acked < 1:  # (basic.ack is applied lazily, at once or soon)
            assert time.monotonic() < deadline, "the ack was not applied"
            time.sleep(0.01)
    assert (stats.dead_lettered, stats.nacked, stats.acked) == (1, 1, 1)
    scraped = requests.get(f"http://127.0.0.1:{server.http_port}/metrics", timeout=10).text
    assert f'chute_queue_messages_dead_lettered_total{{queue="{work}"}} 1' in scraped


def test_a_queue_that_dead_letters_into_itself_gets_its_rejections_back(channel, name):
    """RabbitMQ puts a message rejected from a queue whose dead-letter routing key names that queue back at its
    tail, with its x-death count rising: a retry count kept in the message. A Chute queue cannot be its own
    dead-letter queue, so it had no dead-letter queue, and the rejection dropped the message."""
    channel.queue_declare(name, arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": name})
    channel.confirm_delivery()
    channel.basic_publish("", name, b"again")
    channel.basic_publish("", name, b"behind")
    seen = []
    for _ in range(3):
        method, properties, body = get_one(channel, name)
        seen.append((body, _deaths(properties)))
        channel.basic_reject(method.delivery_tag, requeue=False)
    assert seen == [(b"again", []), (b"behind", []), (b"again", [(name, "rejected", 1)])]
    method, properties, body = get_one(channel, name)
    assert (body, _deaths(properties)) == (b"behind", [(name, "rejected", 1)])
    channel.basic_ack(method.delivery_tag)
    method, properties, body = get_one(channel, name)
    assert (body, _deaths(properties)) == (b"again", [(name, "rejected", 2)])
    channel.basic_ack(method.delivery_tag)


def _deaths(properties) -> list[tuple]:
    return summary(properties) if properties.headers else []


def test_reject_publish_dlx_nacks_and_dead_letters_what_it_refuses(channel, name):
    """x-overflow reject-publish-dlx: a publish that finds the queue full is nacked and dead-lettered, with an
    x-death entry of reason maxlen (it was only nacked)."""
    dead = one_message_queue(channel, name, "reject-publish-dlx")
    channel.basic_publish("", name, b"kept")
    properties = pika.BasicProperties(headers={"k": "v"}, correlation_id="c-1")
    with pytest.raises(pika.exceptions.NackError):
        channel.basic_publish("", name, b"refused", properties)
    method, got, body = get_one(channel, dead)
    assert body == b"refused" and got.correlation_id == "c-1" and got.headers["k"] == "v"
    assert summary(got) == [(name, "maxlen", 1)]
    (death,) = got.headers["x-death"]
    assert (death["exchange"], list(death["routing-keys"])) == ("", [name])
    assert got.headers["x-first-death-reason"] == "maxlen"
    channel.basic_ack(method.delivery_tag)
    assert channel.queue_declare(name, passive=True).method.message_count == 1  # it never went in


def test_reject_publish_dlx_dead_letters_a_publish_through_an_exchange(channel, name):
    """The same through a direct exchange: the publish is nacked and dead-lettered, its x-death naming the
    exchange and routing key it was published with."""
    dead = one_message_queue(channel, name, "reject-publish-dlx")
    exchange = f"{name}-x"
    channel.exchange_declare(exchange, "direct")
    channel.queue_bind(name, exchange, "k")
    channel.basic_publish(exchange, "k", b"kept")
    with pytest.raises(pika.exceptions.NackError):
        channel.basic_publish(exchange, "k", b"refused", pika.BasicProperties(message_id="m-1"))
    method, got, body = get_one(channel, dead)
    assert (body, got.message_id) == (b"refused", "m-1")
    assert summary(got) == [(name, "maxlen", 1)]
    (death,) = got.headers["x-death"]
    assert (death["exchange"], list(death["routing-keys"])) == (exchange, ["k"])
    assert (method.exchange, method.routing_key) == ("", dead)  # the queue's dead-letter exchange and key
    channel.basic_ack(method.delivery_tag)
    assert channel.queue_declare(name, passive=True).method.message_count == 1
