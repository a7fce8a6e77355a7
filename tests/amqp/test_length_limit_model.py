"""Length limits against a model: a queue with `x-max-length` and/or `x-max-length-bytes` and each `x-overflow`
(drop-head, reject-publish, reject-publish-dlx), dead-lettering into a sink queue; random runs of confirmed
publishes of bodies of 1-4 bytes, gets, acks and rejections (with and without requeue), each outcome compared
with a model of a RabbitMQ 3.10 classic queue. With `CHUTE_AMQP_TARGET=rabbitmq` the same runs check the model
against RabbitMQ.

The model: only ready messages count (not those delivered and unacked). drop-head: a publish goes in, then the
oldest ready messages are dead-lettered (reason `maxlen`) while a limit is exceeded. reject-publish: a publish that
would take the queue over a limit is refused with basic.nack (a body larger than `x-max-length-bytes` always is);
reject-publish-dlx dead-letters it as well. A message requeued goes back to its place;
with drop-head, the oldest then go while a limit is exceeded.

Chute's documented differences (docs/amqp.md), modelled for the Chute target: the limits count every message the
queue holds, delivered and unacked ones too (a Chute queue's `max_length` and `max_bytes`), so a requeue never
takes it over a limit; a body larger than `x-max-length-bytes` by itself goes to the dead-letter queue rather than
the messages before it. CHUTE_AMQP_LIMIT_EXAMPLES sizes the run (default 30).
"""

from __future__ import annotations

import os
import time
import uuid

import pika
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.amqp.conftest import TARGET
from tests.amqp.test_routing import drain

pytestmark = pytest.mark.timeout(300)
EXAMPLES = int(os.environ.get("CHUTE_AMQP_LIMIT_EXAMPLES", "30"))

_limits = st.tuples(
    st.one_of(st.none(), st.integers(1, 3)),  # x-max-length
    st.one_of(st.none(), st.integers(2, 8)),  # x-max-length-bytes
    st.sampled_from(("drop-head", "reject-publish", "reject-publish-dlx")),
).filter(lambda limits: limits[0] is not None or limits[1] is not None)
_operations = st.lists(st.one_of(
    st.tuples(st.just("publish"), st.integers(1, 4)),  # a body of this many bytes
    st.just(("get",)),
    st.tuples(st.just("settle"), st.sampled_from(("ack", "requeue", "reject")), st.integers(0, 3)),
), min_size=1, max_size=16)  # fmt: skip


class LimitedQueue:
    def __init__(self, max_length: int | None, max_bytes: int | None, overflow: str, *, chute: bool) -> None:
        self.max_length, self.max_bytes, self.overflow = max_length, max_bytes, overflow
        self.chute = chute  # Chute's documented differences (docs/amqp.md, and the module docstring)
        self.ready: list[tuple[int, bytes]] = []  # (publish number, body), in order
        self.unacked: dict[int, tuple[int, bytes]] = {}  # delivery tag -> message
        self.sink: list[bytes] = []
        self.tag = 0

    def _over(self, extra: int = 0, extra_bytes: int = 0) -> bool:
        held = self.ready + (list(self.unacked.values()) if self.chute else [])
        size = sum(len(body) for _, body in held) + extra_bytes
        return (self.max_length is not None and len(held) + extra > self.max_length) or (
            self.max_bytes is not None and size > self.max_bytes
        )

    def publish(self, number: int, body: bytes) -> bool:
        """True if confirmed (basic.ack), False if refused (basic.nack)."""
        if self.overflow != "drop-head":
            if self._over(1, len(body)):
                if self.overflow == "reject-publish-dlx":
                    self.sink.append(body)
                return False
            self.ready.append((number, body))
            return True
        if self.chute and self.max_bytes is not None and len(body) > self.max_bytes:
            self.sink.append(body)  # larger than the limit by itself: it goes, not the messages before it
            return True
        self.ready.append((number, body))
        while self.ready and self._over():
            self.sink.append(self.ready.pop(0)[1])
        return True

    def get(self) -> bytes | None:
        if not self.ready:
            return None
        message = self.ready.pop(0)
        self.tag += 1
        self.unacked[self.tag] = message
        return message[1]

    def settle(self, tag: int, how: str) -> None:
        message = self.unacked.pop(tag)
        if how == "requeue":
            self._back([message])
        elif how == "reject":
            self.sink.append(message[1])

    def recover(self) -> None:
        messages, self.unacked = list(self.unacked.values()), {}
        self._back(messages)

    def _back(self, messages: list) -> None:
        """Requeued messages go back to their places; with drop-head, the oldest then go while over a limit."""
        self.ready = sorted(self.ready + messages)
        while self.overflow == "drop-head" and not self.chute and self.ready and self._over():
            self.sink.append(self.ready.pop(0)[1])


@given(_limits, _operations)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_length_limits_are_what_the_model_keeps(server, limits, operations):
    max_length, max_bytes, overflow = limits
    prefix = f"lm{uuid.uuid4().hex[:10]}"
    queue, sink = f"{prefix}-q", f"{prefix}-sink"
    model = LimitedQueue(max_length, max_bytes, overflow, chute=TARGET == "chute")
    arguments = {"x-overflow": overflow, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": sink}
    if max_length is not None:
        arguments["x-max-length"] = max_length
    if max_bytes is not None:
        arguments["x-max-length-bytes"] = max_bytes
    with pika.BlockingConnection(pika.URLParameters(server.amqp_url)) as connection:
        channel = connection.channel()
        channel.queue_declare(sink)
        channel.queue_declare(queue, arguments=arguments)
        channel.confirm_delivery()
        for n, operation in enumerate(operations):
            if operation[0] == "publish":
                body = bytes([97 + n % 26]) * operation[1]
                expected = model.publish(n, body)
                try:
                    channel.basic_publish("", queue, body)
                    confirmed = True
                except pika.exceptions.NackError:
                    confirmed = False
                assert confirmed == expected, (n, operations, limits)
            elif operation[0] == "get":
                method, _, body = channel.basic_get(queue)
                assert (body if method is not None else None) == model.get(), (n, operations, limits)
            elif model.unacked:
                tag = sorted(model.unacked)[operation[2] % len(model.unacked)]
                if operation[1] == "ack":
                    channel.basic_ack(tag)
                else:
                    channel.basic_reject(tag, requeue=operation[1] == "requeue")
                model.settle(tag, operation[1])
        channel.basic_recover(requeue=True)  # what is still unacked goes back, then everything is read
        model.recover()
        left = drain(channel, queue)
        assert left == [body for _, body in model.ready], (operations, limits)
        deadline = time.monotonic() + 10  # dead letters are published again in the background
        sunk: list[bytes] = []
        while len(sunk) < len(model.sink) and time.monotonic() < deadline:
            sunk += drain(channel, sink)
            connection.sleep(0.01)
        assert sorted(sunk + drain(channel, sink)) == sorted(model.sink), (operations, limits)
        channel.queue_delete(queue)
        channel.queue_delete(sink)
