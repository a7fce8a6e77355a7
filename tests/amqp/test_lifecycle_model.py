"""Declarations, bindings, deletions and their errors against a model: random runs of queue.declare, exchange.declare
(passive or not, with flags that may differ from the existing ones), queue.bind / unbind, queue.delete (if-empty),
exchange.delete (if-unused), queue.purge, basic.get and confirmed publishes, over two queue and two exchange
names, each answer (or channel error code) compared with a model of RabbitMQ 3.10. With
`CHUTE_AMQP_TARGET=rabbitmq` the same runs check the model against RabbitMQ.

The model: a passive declaration of what does not exist is 404; a declaration whose flags (durable, auto-delete,
an exchange's type and internal) or queue arguments differ from the existing one's is 406; binding, purging and
getting need the queue (and exchange): 404; deleting or unbinding what does not exist succeeds; queue.delete with
if-empty of a queue holding messages, and exchange.delete with if-unused of an exchange with bindings, are 406; a
publish to an exchange that does not exist closes the channel with 404, to an internal one with 403. Deleting a
queue or an exchange removes its bindings; an auto-delete exchange goes with its last binding. Each error closes
the channel, and the run goes on on a new one. CHUTE_AMQP_LIFECYCLE_EXAMPLES sizes the run (default 40).
"""

from __future__ import annotations

import os
import uuid

import pika
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pika.exceptions import ChannelClosedByBroker

pytestmark = pytest.mark.timeout(300)
EXAMPLES = int(os.environ.get("CHUTE_AMQP_LIFECYCLE_EXAMPLES", "40"))

_q = st.integers(0, 1)
_x = st.integers(0, 1)
_key = st.sampled_from(("a", "b"))
_operations = st.lists(st.one_of(
    # durable, auto-delete, x-max-length, passive
    st.tuples(st.just("declare-queue"), _q, st.booleans(), st.booleans(), st.sampled_from((None, 5)), st.booleans()),
    # type, durable, auto-delete, internal, passive
    st.tuples(st.just("declare-exchange"), _x, st.sampled_from(("direct", "fanout")), st.booleans(), st.booleans(),
              st.booleans(), st.booleans()),
    st.tuples(st.just("bind"), _q, _x, _key),
    st.tuples(st.just("unbind"), _q, _x, _key),
    st.tuples(st.just("delete-queue"), _q, st.booleans()),  # if-empty
    st.tuples(st.just("delete-exchange"), _x, st.booleans()),  # if-unused
    st.tuples(st.just("purge"), _q),
    st.tuples(st.just("get"), _q),
    st.tuples(st.just("publish"), _x, _key),
), min_size=1, max_size=20)  # fmt: skip


class Broker:
    def __init__(self) -> None:
        self.queues: dict[int, dict] = {}  # {"durable", "count"}
        self.exchanges: dict[int, dict] = {}  # {"type", "durable"}
        self.bindings: set[tuple[int, int, str]] = set()  # (queue, exchange, key)

    def run(self, operation: tuple) -> int | tuple:
        """The error code the operation closes the channel with, or ("ok", what the answer shows)."""
        kind = operation[0]
        if kind == "declare-queue":
            _, q, durable, auto_delete, max_length, passive = operation
            found = self.queues.get(q)
            if passive:
                return 404 if found is None else ("ok", found["count"])
            flags = (durable, auto_delete, max_length)
            if found is None:
                self.queues[q] = {"flags": flags, "count": 0}
                return ("ok", 0)
            return 406 if found["flags"] != flags else ("ok", found["count"])
        if kind == "declare-exchange":
            _, x, type_, durable, auto_delete, internal, passive = operation
            found = self.exchanges.get(x)
            if passive:
                return 404 if found is None else ("ok", None)
            flags = (type_, durable, auto_delete, internal)
            if found is None:
                self.exchanges[x] = {"flags": flags, "type": type_, "auto_delete": auto_delete, "internal": internal}
                return ("ok", None)
            return 406 if found["flags"] != flags else ("ok", None)
        if kind == "bind":
            _, q, x, key = operation
            if q not in self.queues or x not in self.exchanges:
                return 404
            self.bindings.add((q, x, key))
            return ("ok", None)
        if kind == "unbind":  # of what does not exist, too: nothing to do
            if operation[1:] in self.bindings:
                self.bindings.discard(operation[1:])
                self._auto_delete(operation[2])
            return ("ok", None)
        if kind == "delete-queue":
            _, q, if_empty = operation
            found = self.queues.get(q)
            if found is None:
                return ("ok", 0)
            if if_empty and found["count"]:
                return 406
            del self.queues[q]
            exchanges = {b[1] for b in self.bindings if b[0] == q}
            self.bindings = {b for b in self.bindings if b[0] != q}
            for x in exchanges:
                self._auto_delete(x)
            return ("ok", found["count"])
        if kind == "delete-exchange":
            _, x, if_unused = operation
            if x not in self.exchanges:
                return ("ok", None)
            if if_unused and any(b[1] == x for b in self.bindings):
                return 406
            del self.exchanges[x]
            self.bindings = {b for b in self.bindings if b[1] != x}
            return ("ok", None)
        if kind == "purge":
            found = self.queues.get(operation[1])
            if found is None:
                return 404
            count, found["count"] = found["count"], 0
            return ("ok", count)
        if kind == "get":
            found = self.queues.get(operation[1])
            if found is None:
                return 404
            if not found["count"]:
                return ("ok", None)
            found["count"] -= 1
            return ("ok", found["count"])
        _, x, key = operation  # publish
        exchange = self.exchanges.get(x)
        if exchange is None:
            return 404
        if exchange["internal"]:
            return 403
        reached = {q for q, bound_x, bound_key in self.bindings
                   if bound_x == x and (exchange["type"] == "fanout" or bound_key == key)}  # fmt: skip
        for q in reached:  # (a queue bound twice to one exchange gets one copy)
            self.queues[q]["count"] += 1
        return ("ok", None)

    def _auto_delete(self, x: int) -> None:
        """An auto-delete exchange goes when its last binding does."""
        if self.exchanges[x]["auto_delete"] and not any(b[1] == x for b in self.bindings):
            del self.exchanges[x]


def _do(channel, operation: tuple, queue: list[str], exchange: list[str]):
    kind = operation[0]
    if kind == "declare-queue":
        _, q, durable, auto_delete, max_length, passive = operation
        arguments = {"x-max-length": max_length} if max_length is not None else None
        declared = channel.queue_declare(queue[q], durable=durable, auto_delete=auto_delete, arguments=arguments,
                                         passive=passive)  # fmt: skip
        return ("ok", declared.method.message_count)
    if kind == "declare-exchange":
        _, x, type_, durable, auto_delete, internal, passive = operation
        channel.exchange_declare(exchange[x], type_, durable=durable, auto_delete=auto_delete, internal=internal,
                                 passive=passive)  # fmt: skip
        return ("ok", None)
    if kind == "bind":
        channel.queue_bind(queue[operation[1]], exchange[operation[2]], operation[3])
        return ("ok", None)
    if kind == "unbind":
        channel.queue_unbind(queue[operation[1]], exchange[operation[2]], operation[3])
        return ("ok", None)
    if kind == "delete-queue":
        return ("ok", channel.queue_delete(queue[operation[1]], if_empty=operation[2]).method.message_count)
    if kind == "delete-exchange":
        channel.exchange_delete(exchange[operation[1]], if_unused=operation[2])
        return ("ok", None)
    if kind == "purge":
        return ("ok", channel.queue_purge(queue[operation[1]]).method.message_count)
    if kind == "get":
        method, _, _ = channel.basic_get(queue[operation[1]], auto_ack=True)
        return ("ok", None if method is None else method.message_count)
    channel.basic_publish(exchange[operation[1]], operation[2], b"m")
    return ("ok", None)


@given(_operations)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_declarations_and_deletions_answer_as_the_model(server, operations):
    prefix = f"lc{uuid.uuid4().hex[:10]}"
    queue = [f"{prefix}-q{i}" for i in range(2)]
    exchange = [f"{prefix}-x{i}" for i in range(2)]
    model = Broker()
    with pika.BlockingConnection(pika.URLParameters(server.amqp_url)) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        for step, operation in enumerate(operations):
            expected = model.run(operation)
            try:
                got = _do(channel, operation, queue, exchange)
            except ChannelClosedByBroker as exc:
                got = exc.reply_code
                channel = connection.channel()
                channel.confirm_delivery()
            assert got == expected, (step, operations)
        for name in queue:
            channel.queue_delete(name)
        for name in exchange:
            channel.exchange_delete(name)
