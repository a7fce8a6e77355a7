"""The AMQP front keeps nothing of a queue or exchange once it is gone (issue 12: memory follows what is stored).

RPC clients and Celery make a server-named exclusive queue per connection, so a broker serving them sees
thousands of queues come and go each hour; anything the front keeps by name after the queue is deleted grows
with that churn, never shrinking. These tests churn queues (exclusive, auto-delete, with a dead-letter exchange,
deleted by hand) and exchanges through pika, then look through every table the front keeps by name."""

from __future__ import annotations

from collections.abc import Iterator

import pika
import pytest

from tests.amqp.conftest import chute_only

pytestmark = [pytest.mark.timeout(120), chute_only]


def _names_held(front) -> Iterator[tuple[str, str]]:
    """(table, name) for every name a per-name table of the front or its exchange book holds."""
    for owner, prefix in ((front, "front"), (front.book, "book")):
        for attribute, value in vars(owner).items():
            if isinstance(value, dict):
                for key in value:
                    yield f"{prefix}.{attribute}", key if isinstance(key, str) else repr(key)
            elif isinstance(value, (set, frozenset)):
                for item in value:
                    yield f"{prefix}.{attribute}", item if isinstance(item, str) else repr(item)
            elif isinstance(value, list):  # bindings: dicts naming queues and exchanges
                for item in value:
                    if isinstance(item, dict):
                        yield f"{prefix}.{attribute}", " ".join(str(v) for v in item.values())


def _held(front, marker: str) -> list[tuple[str, str]]:
    return [(table, name) for table, name in _names_held(front) if marker in name]


def test_queues_that_came_and_went_leave_nothing_in_the_front(server, name):
    front = server.server.amqp
    connection = pika.BlockingConnection(pika.URLParameters(server.amqp_url))
    try:
        channel = connection.channel()
        channel.exchange_declare(f"{name}-dlx", "fanout")
        for i in range(5):
            owner = pika.BlockingConnection(pika.URLParameters(server.amqp_url))
            rpc = owner.channel()
            reply = rpc.queue_declare("", exclusive=True).method.queue  # an RPC client's reply queue
            rpc.queue_bind(reply, "amq.direct", routing_key=reply)
            rpc.basic_publish("amq.direct", reply, b"answer")
            method, _, _ = rpc.basic_get(reply)
            rpc.basic_reject(method.delivery_tag, requeue=False)
            tag = rpc.basic_consume(reply, lambda *a: None)
            rpc.basic_cancel(tag)
            owner.close()  # the exclusive queue goes with its connection

            work = f"{name}-work{i}"
            channel.queue_declare(work, arguments={"x-dead-letter-exchange": f"{name}-dlx"})
            channel.queue_declare(f"{work}-nowhere", arguments={"x-dead-letter-exchange": f"{name}-none{i}"})
            channel.queue_bind(work, "amq.topic", routing_key="jobs.#")
            channel.basic_publish("", work, b"job")
            method, _, _ = channel.basic_get(work)
            channel.basic_reject(method.delivery_tag, requeue=False)  # dead-lettered (to nowhere bound)
            channel.queue_delete(work)
            channel.queue_delete(f"{work}-nowhere")

            gone = channel.queue_declare(f"{name}-auto{i}", auto_delete=True).method.queue
            tag = channel.basic_consume(gone, lambda *a: None)
            channel.basic_cancel(tag)  # its last consumer gone: deleted

            channel.exchange_declare(f"{name}-x{i}", "topic")
            channel.exchange_bind(f"{name}-x{i}", "amq.topic", routing_key="#")
            channel.exchange_delete(f"{name}-x{i}")
        channel.exchange_delete(f"{name}-dlx")
    finally:
        connection.close()
    assert not server.server.broker.core.queues.keys() & {f"{name}-work0", f"{name}-auto0"}
    assert _held(front, name) == []
    assert _held(front, "amq.gen-") == []


def test_the_check_sees_what_a_live_queue_holds(server, name):
    """The look through the front's tables finds a queue while it exists (so an empty result above means
    something)."""
    front = server.server.amqp
    connection = pika.BlockingConnection(pika.URLParameters(server.amqp_url))
    try:
        channel = connection.channel()
        channel.queue_declare(f"{name}-live", arguments={"x-dead-letter-exchange": f"{name}-nowhere"})
        channel.queue_bind(f"{name}-live", "amq.topic", routing_key="a.b")
        tables = {table for table, _ in _held(front, f"{name}-live")}
        assert {"book.queues", "book.bindings"} <= tables
        channel.queue_delete(f"{name}-live")
        assert _held(front, f"{name}-live") == []
    finally:
        connection.close()
