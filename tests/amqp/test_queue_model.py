"""A queue's settling against a model: random runs of publish, basic.get, ack, nack and reject (with and without
multiple and requeue) and basic.recover on one channel, each answer compared with a small model of a RabbitMQ
classic queue. With `CHUTE_AMQP_TARGET=rabbitmq` the same runs check the model against RabbitMQ.

The model: messages are got in publish order (in a queue with `x-max-priority`, highest priority first); a
message requeued (nack or reject with requeue, recover) goes back to its place and comes again with `redelivered`
set; get-ok's `message_count` is the ready messages left; an ack, nack or reject with `multiple` settles every
unsettled delivery up to its tag; one without requeue removes the message (the queue has no dead-letter
exchange). One difference is documented, and modelled: a Chute queue orders by priority without `x-max-priority`
too. CHUTE_AMQP_QUEUE_EXAMPLES sizes the run (default 40).
"""

from __future__ import annotations

import os
import uuid

import pika
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.amqp.conftest import TARGET

pytestmark = pytest.mark.timeout(300)
EXAMPLES = int(os.environ.get("CHUTE_AMQP_QUEUE_EXAMPLES", "40"))

_operations = st.lists(st.one_of(
    st.tuples(st.just("publish"), st.integers(0, 3)),  # a priority (a priority queue's; a classic one ignores it)
    st.just(("get",)),
    st.tuples(st.sampled_from(("ack", "nack", "reject")), st.integers(0, 5), st.booleans(), st.booleans()),
    st.just(("recover",)),
), min_size=1, max_size=25)  # fmt: skip


class ClassicQueue:
    """What RabbitMQ answers, for one consumer channel."""

    def __init__(self, priorities: bool) -> None:
        self.priorities = priorities
        self.priority: dict[int, int] = {}
        self.ready: list[int] = []  # message numbers, in the order they are got
        self.unsettled: dict[int, int] = {}  # delivery tag -> message number
        self.delivered: set[int] = set()
        self.tag = 0

    def publish(self, number: int, priority: int) -> None:
        self.priority[number] = priority if self.priorities else 0
        self.ready.append(number)
        self._order()

    def _order(self) -> None:
        self.ready.sort(key=lambda number: (-self.priority[number], number))

    def get(self) -> tuple[int, bool, int] | None:
        """(message, redelivered, message_count) or None for get-empty."""
        if not self.ready:
            return None
        number = self.ready.pop(0)
        self.tag += 1
        self.unsettled[self.tag] = number
        redelivered = number in self.delivered
        self.delivered.add(number)
        return number, redelivered, len(self.ready)

    def settle(self, tags: list[int], requeue: bool) -> None:
        for tag in tags:
            number = self.unsettled.pop(tag)
            if requeue:
                self.ready.append(number)
        self._order()

    def covered(self, tag: int, multiple: bool) -> list[int]:
        return sorted(t for t in self.unsettled if t <= tag) if multiple else [tag]


@pytest.mark.parametrize("priorities", [False, True], ids=["classic", "x-max-priority"])
@given(operations=_operations)
@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
def test_gets_and_settles_answer_as_the_model(server, priorities, operations):
    name = f"qm{uuid.uuid4().hex[:10]}"
    model = ClassicQueue(priorities or TARGET == "chute")  # every Chute queue honours priorities (docs/amqp.md)
    with pika.BlockingConnection(pika.URLParameters(server.amqp_url)) as connection:
        channel = connection.channel()
        channel.queue_declare(name, arguments={"x-max-priority": 5} if priorities else None)
        channel.confirm_delivery()
        published = 0
        for step, operation in enumerate(operations):
            kind = operation[0]
            if kind == "publish":
                properties = pika.BasicProperties(priority=operation[1])
                channel.basic_publish("", name, str(published).encode(), properties)
                model.publish(published, operation[1])
                published += 1
            elif kind == "get":
                method, _, body = channel.basic_get(name)
                expected = model.get()
                got = None if method is None else (int(body), method.redelivered, method.message_count)
                assert got == expected, (step, operations)
                if method is not None:
                    assert method.delivery_tag == model.tag
            elif kind == "recover":
                channel.basic_recover(requeue=True)
                model.settle(sorted(model.unsettled), requeue=True)
            else:
                _, pick, multiple, requeue = operation
                if not model.unsettled:
                    continue  # an unknown tag closes the channel (tested elsewhere)
                tag = sorted(model.unsettled)[pick % len(model.unsettled)]
                if kind == "ack":
                    channel.basic_ack(tag, multiple=multiple)
                elif kind == "nack":
                    channel.basic_nack(tag, multiple=multiple, requeue=requeue)
                else:
                    channel.basic_reject(tag, requeue=requeue)
                    multiple = False
                model.settle(model.covered(tag, multiple), requeue=requeue and kind != "ack")
        left = []
        while (got := channel.basic_get(name, auto_ack=True))[0] is not None:
            left.append(int(got[2]))
        assert left == model.ready, operations  # what is left, in order
        channel.queue_delete(name)
