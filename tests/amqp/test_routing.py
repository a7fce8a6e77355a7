"""Exchanges with pika: direct, fanout, topic (`*` and `#` anywhere), headers (x-match all), bindings and
unbindings, as in RabbitMQ's tutorials; and the queue arguments users rely on (TTL, dead-lettering with x-death,
max length with drop-head, priorities)."""

from __future__ import annotations

import time

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker

from tests.amqp.conftest import chute_only


def drain(channel, queue: str) -> list[bytes]:
    bodies = []
    while True:
        method, _, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return bodies
        bodies.append(body)


def wait_for(channel, queue: str, count: int, timeout_s: float = 10.0) -> list:
    """basic.get until `count` messages came (a condition awaited, bounded)."""
    got = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            assert time.monotonic() < deadline, f"only {len(got)} of {count} messages within {timeout_s} s"
            channel.connection.sleep(0.01)
            continue
        got.append((method, properties, body))
    return got


def test_fanout_publish_subscribe(channel, name):
    channel.exchange_declare(name, "fanout")
    queues = [channel.queue_declare("", exclusive=True).method.queue for _ in range(3)]
    for queue in queues:
        channel.queue_bind(queue, name)
    channel.confirm_delivery()
    channel.basic_publish(name, "ignored", b"log line")
    for queue in queues:
        assert drain(channel, queue) == [b"log line"]


def test_direct_routing(channel, name):
    channel.exchange_declare(name, "direct")
    errors = channel.queue_declare("", exclusive=True).method.queue
    everything = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(errors, name, "error")
    for severity in ("info", "warning", "error"):
        channel.queue_bind(everything, name, severity)
    channel.confirm_delivery()
    for severity in ("info", "warning", "error", "debug"):
        channel.basic_publish(name, severity, severity.encode())
    assert drain(channel, errors) == [b"error"]
    assert drain(channel, everything) == [b"info", b"warning", b"error"]
    method, _, _ = channel.basic_get(everything) or (None, None, None)
    assert method is None


def test_topic_wildcards_as_in_the_tutorial(channel, name):
    channel.exchange_declare(name, "topic")
    q1 = channel.queue_declare("", exclusive=True).method.queue
    q2 = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(q1, name, "*.orange.*")
    channel.queue_bind(q2, name, "*.*.rabbit")
    channel.queue_bind(q2, name, "lazy.#")
    channel.confirm_delivery()
    keys = ["quick.orange.rabbit", "lazy.orange.elephant", "quick.orange.fox", "lazy.brown.fox", "lazy.pink.rabbit",
            "quick.brown.fox", "orange", "quick.orange.new.rabbit", "lazy.orange.new.rabbit", "lazy"]  # fmt: skip
    for key in keys:
        channel.basic_publish(name, key, key.encode())
    assert drain(channel, q1) == [b"quick.orange.rabbit", b"lazy.orange.elephant", b"quick.orange.fox"]
    assert drain(channel, q2) == [b"quick.orange.rabbit", b"lazy.orange.elephant", b"lazy.brown.fox",
                                  b"lazy.pink.rabbit", b"lazy.orange.new.rabbit", b"lazy"]  # fmt: skip


def test_topic_hash_anywhere_and_odd_keys(channel, name):
    channel.exchange_declare(name, "topic")
    tail = channel.queue_declare("", exclusive=True).method.queue
    middle = channel.queue_declare("", exclusive=True).method.queue
    everything = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(tail, name, "#.error")
    channel.queue_bind(middle, name, "a.#.z")
    channel.queue_bind(everything, name, "#")
    channel.confirm_delivery()
    keys = ["error", "x.error", "x.y.error", "errors", "a.z", "a.b.z", "a.b.c.z", "a.b", "", "weird key:with/chars",
            "x..error"]  # fmt: skip
    for key in keys:
        channel.basic_publish(name, key, key.encode())
    assert drain(channel, tail) == [b"error", b"x.error", b"x.y.error", b"x..error"]
    assert drain(channel, middle) == [b"a.z", b"a.b.z", b"a.b.c.z"]
    assert drain(channel, everything) == [key.encode() for key in keys]


def test_the_empty_routing_key_has_no_words(channel, name):
    """As in RabbitMQ: a topic exchange routes the empty key to the bindings that match no words (`#`, `#.#`, the
    empty binding key), not to `*`, `*.#` or `.#`, which need a word; the same through an exchange-to-exchange
    binding from a topic exchange. Found by test_routing_model.py."""
    channel.exchange_declare(name, "topic")
    queues = {}
    for key in ("#", "#.#", "", "*", "*.#", ".#", "#."):
        queues[key] = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(queues[key], name, key)
    inner = f"{name}-inner"
    channel.exchange_declare(inner, "fanout")
    channel.exchange_bind(inner, name, "*.*")  # needs two words: the empty key does not go this way
    behind = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(behind, inner)
    channel.confirm_delivery()
    channel.basic_publish(name, "", b"no words", pika.BasicProperties(headers={"h": "v"}))
    channel.basic_publish(name, ".", b"two empty words")
    got = {key: drain(channel, queue) for key, queue in queues.items()}
    assert got == {"#": [b"no words", b"two empty words"], "#.#": [b"no words", b"two empty words"],
                   "": [b"no words"], "*": [], "*.#": [b"two empty words"], ".#": [b"two empty words"],
                   "#.": [b"two empty words"]}  # fmt: skip
    assert drain(channel, behind) == [b"two empty words"]
    channel.basic_publish(name, "", b"again")
    method, properties, _ = channel.basic_get(queues[""], auto_ack=True)
    assert (method.exchange, method.routing_key) == (name, "")
    channel.queue_unbind(queues[".#"], name, ".#")
    channel.basic_publish(name, ".", b"unbound")
    assert drain(channel, queues[".#"]) == []


def test_delivery_carries_exchange_and_routing_key(channel, name):
    channel.exchange_declare(name, "topic")
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, name, "orders.*")
    channel.confirm_delivery()
    channel.basic_publish(name, "orders.created", b"o")
    method, _, _ = channel.basic_get(queue, auto_ack=True)
    assert (method.exchange, method.routing_key) == (name, "orders.created")
    channel.basic_publish("", queue, b"direct")
    method, _, _ = channel.basic_get(queue, auto_ack=True)
    assert (method.exchange, method.routing_key) == ("", queue)


def test_unbind_keeps_what_other_bindings_need(channel, name):
    channel.exchange_declare(name, "topic")
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, name, "a.#")  # a, a.>
    channel.queue_bind(queue, name, "a")  # a (shared)
    channel.queue_unbind(queue, name, "a")
    channel.confirm_delivery()
    channel.basic_publish(name, "a", b"still routed by a.#")
    assert drain(channel, queue) == [b"still routed by a.#"]
    channel.queue_unbind(queue, name, "a.#")
    channel.basic_publish(name, "a", b"unrouted")
    assert drain(channel, queue) == []


def test_headers_exchange_match_all_and_any(channel, name):
    channel.exchange_declare(name, "headers")
    every = channel.queue_declare("", exclusive=True).method.queue
    some = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(every, name, arguments={"x-match": "all", "format": "pdf", "type": "report"})
    channel.queue_bind(some, name, arguments={"x-match": "any", "format": "zip", "type": "log"})
    channel.queue_bind(some, name, arguments={"x-match": "all", "urgent": "yes"})  # a second binding, same queue
    channel.confirm_delivery()
    sent = [{"format": "pdf", "type": "report"}, {"format": "pdf"}, {"format": "zip", "type": "report"},
            {"type": "log"}, {"urgent": "yes", "format": "zip"}, {}]  # fmt: skip
    for headers in sent:
        channel.basic_publish(name, "rk", repr(headers).encode(), pika.BasicProperties(headers=headers))
    assert drain(channel, every) == [repr(sent[0]).encode()]
    assert drain(channel, some) == [repr(h).encode() for h in (sent[2], sent[3], sent[4])]
    channel.queue_unbind(some, name, arguments={"x-match": "any", "format": "zip", "type": "log"})
    for headers in sent:
        channel.basic_publish(name, "rk", repr(headers).encode(), pika.BasicProperties(headers=headers))
    method, properties, body = channel.basic_get(some, auto_ack=True)
    assert body == repr(sent[4]).encode() and method.routing_key == "rk" and properties.headers == sent[4]
    assert drain(channel, some) == []


def test_predeclared_amq_topic_exchange(channel, name):
    channel.exchange_declare("amq.topic", "topic", passive=True)
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, "amq.topic", f"{name}.#")
    channel.confirm_delivery()
    channel.basic_publish("amq.topic", f"{name}.x", b"via amq.topic")
    assert drain(channel, queue) == [b"via amq.topic"]


def test_exchange_delete_if_unused(channel, name):
    channel.exchange_declare(name, "fanout")
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, name)
    with pytest.raises(ChannelClosedByBroker) as caught:
        channel.exchange_delete(name, if_unused=True)
    assert caught.value.reply_code == 406
    channel = channel.connection.channel()
    channel.exchange_delete(name)
    with pytest.raises(ChannelClosedByBroker) as caught:
        channel.exchange_declare(name, passive=True)
    assert caught.value.reply_code == 404


def test_message_ttl_dead_letters_with_x_death(channel, name):
    dlq = f"{name}-dead"
    channel.queue_declare(dlq)
    channel.queue_declare(name, arguments={"x-message-ttl": 50, "x-dead-letter-exchange": "",
                                           "x-dead-letter-routing-key": dlq})  # fmt: skip
    channel.confirm_delivery()
    channel.basic_publish("", name, b"short-lived")
    [(_, properties, body)] = wait_for(channel, dlq, 1)
    assert body == b"short-lived"
    [death] = properties.headers["x-death"]
    assert death["reason"] == "expired" and death["queue"] == name and death["count"] == 1
    assert death["exchange"] == "" and death["routing-keys"] == [name]


def test_per_message_expiration(channel, name):
    channel.queue_declare(name)
    channel.confirm_delivery()
    channel.basic_publish("", name, b"gone", pika.BasicProperties(expiration="1"))
    channel.basic_publish("", name, b"kept")
    channel.connection.sleep(0.05)  # the expiration is a time: let it pass
    assert drain(channel, name) == [b"kept"]


@pytest.mark.parametrize("expiration", ["\u00b2", "1.5", "-1", "soon"])
def test_an_expiration_that_is_not_ascii_digits_is_refused_with_406(connection, channel, name, expiration):
    # '²' passed str.isdigit and then failed int(): a 541 that closed the whole connection, not just the channel
    channel.queue_declare(name)
    with pytest.raises(ChannelClosedByBroker) as refused:
        channel.basic_publish("", name, b"odd", pika.BasicProperties(expiration=expiration))
        channel.queue_declare(name, passive=True)  # a round trip: the refusal has come by its end
    assert refused.value.reply_code == 406
    assert connection.is_open and connection.channel().queue_declare(name, passive=True).method.message_count == 0


def test_reject_dead_letters_through_a_named_exchange(channel, name):
    dlx, dlq = f"{name}-dlx", f"{name}-dlq"
    channel.exchange_declare(dlx, "fanout")
    channel.queue_declare(dlq)
    channel.queue_bind(dlq, dlx)
    channel.queue_declare(name, arguments={"x-dead-letter-exchange": dlx})
    channel.confirm_delivery()
    channel.basic_publish("", name, b"bad")
    method, _, _ = channel.basic_get(name)
    channel.basic_reject(method.delivery_tag, requeue=False)
    [(_, properties, body)] = wait_for(channel, dlq, 1)
    assert body == b"bad" and properties.headers["x-death"][0]["reason"] == "rejected"


def test_max_length_drops_the_head(channel, name):
    channel.queue_declare(name, arguments={"x-max-length": 2})
    channel.confirm_delivery()
    for body in (b"1", b"2", b"3"):
        channel.basic_publish("", name, body)
    assert drain(channel, name) == [b"2", b"3"]


def one_message_queue(channel, name: str, overflow: str) -> str:
    """Queue `name` holding at most one message, with `overflow`, dead-lettering into a queue of its own (whose
    name is returned); the channel in confirm mode."""
    dead = f"{name}-dead"
    channel.queue_declare(dead)
    channel.queue_declare(name, arguments={"x-max-length": 1, "x-overflow": overflow, "x-dead-letter-exchange": "",
                                           "x-dead-letter-routing-key": dead})  # fmt: skip
    channel.confirm_delivery()
    return dead


@pytest.mark.parametrize("settle", ["ack", "reject"])
def test_a_settle_that_frees_room_comes_before_the_publish_after_it(channel, name, settle):
    """A full queue (reject-publish), then on one channel: settle its message, publish another. The settle came
    first, so the publish finds room (acks and rejections were carried out after the publishes of the same
    read, which were refused). Found by test_length_limit_model.py."""
    dead = one_message_queue(channel, name, "reject-publish")
    for round_ in range(5):
        channel.basic_publish("", name, f"first {round_}".encode())
        method, _, _ = channel.basic_get(name)
        if settle == "ack":
            channel.basic_ack(method.delivery_tag)
        else:
            channel.basic_reject(method.delivery_tag, requeue=False)
        channel.basic_publish("", name, f"second {round_}".encode())  # no NackError: there is room
        assert drain(channel, name) == [f"second {round_}".encode()]
    rejected = 5 if settle == "reject" else 0
    got = [body for _, _, body in wait_for(channel, dead, rejected)]
    assert got == [f"first {n}".encode() for n in range(rejected)]
    assert drain(channel, dead) == []


def test_priorities(channel, name):
    channel.queue_declare(name, arguments={"x-max-priority": 10, "x-queue-type": "classic"})
    channel.confirm_delivery()
    for priority in (1, 5, 0, 9):
        channel.basic_publish("", name, str(priority).encode(), pika.BasicProperties(priority=priority))
    assert drain(channel, name) == [b"9", b"5", b"1", b"0"]


def test_unsupported_queue_argument_is_406(channel, name):
    with pytest.raises(ChannelClosedByBroker) as caught:
        channel.queue_declare(name, arguments={"x-queue-type": "stream"})
    assert caught.value.reply_code == 406


@chute_only
def test_chutes_own_features_through_headers_and_arguments(channel, name):
    channel.queue_declare(name, arguments={"x-chute-fifo": True, "x-chute-dedup-window": 60_000})
    channel.confirm_delivery()

    def publish(body: bytes, **headers) -> None:
        channel.basic_publish("", name, body, pika.BasicProperties(headers=headers))

    publish(b"a1", **{"x-group-id": "a"})
    publish(b"a2", **{"x-group-id": "a"})
    publish(b"b1", **{"x-group-id": "b"})
    publish(b"once", **{"x-deduplication-header": "k1"})
    publish(b"twice", **{"x-deduplication-header": "k1"})  # a repeat: confirmed, not stored
    publish(b"later", **{"x-delay": 300})
    first = [channel.basic_get(name) for _ in range(4)]
    assert [body for _, _, body in first] == [b"a1", b"b1", b"once", None]  # a2 waits for a1; "later" is delayed
    channel.basic_ack(first[0][0].delivery_tag)
    [(_, _, a2)] = wait_for(channel, name, 1)
    assert a2 == b"a2"
    [(_, _, later)] = wait_for(channel, name, 1)
    assert later == b"later"
    channel.basic_recover(requeue=True)
    assert sorted(body for _, _, body in wait_for(channel, name, 2)) == [b"b1", b"once"]
    assert drain(channel, name) == []
