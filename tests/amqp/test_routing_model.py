"""AMQP routing against a model: random topologies of exchanges (direct, fanout, topic, headers), queue bindings,
exchange-to-exchange bindings and alternate exchanges, then random publishes among unbinds and exchange deletions,
and the queues each message reaches compared with a small reference router written from RabbitMQ's rules. With
`CHUTE_AMQP_TARGET=rabbitmq` the same examples run against RabbitMQ, which is how the model itself is checked.

The model: an exchange routes a message to the destinations of its matching bindings (queues and exchanges);
every exchange reached is visited once; an exchange whose own bindings match nothing passes the message to its
alternate exchange; a queue gets a message once however many paths lead to it. Matching: direct by equal keys;
fanout always; topic by words, `*` one word and `#` zero or more (an empty key has no words; `a..b` has an empty
one); headers with `x-match` all (the default) or
any over the binding's arguments not starting with `x-` (`all-with-x`, `any-with-x`: over every argument but
`x-match`), a value equal in type and value. CHUTE_AMQP_ROUTING_EXAMPLES sizes the run (default 50).
"""

from __future__ import annotations

import os
import uuid

import pika
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.amqp.test_routing import drain

pytestmark = pytest.mark.timeout(300)
EXAMPLES = int(os.environ.get("CHUTE_AMQP_ROUTING_EXAMPLES", "50"))
EXCHANGES, QUEUES = 4, 4
KINDS = ("direct", "fanout", "topic", "headers")
WORDS = ("a", "b", "")  # an empty word too: "", "a..b", ".a"

_key = st.lists(st.sampled_from(WORDS), min_size=1, max_size=3).map(".".join)
_pattern = st.lists(st.sampled_from((*WORDS, "*", "#")), min_size=1, max_size=3).map(".".join)
# string and integer values (1 and "1" differ), and an `x-` header that only the `-with-x` matches look at
_headers = st.dictionaries(st.sampled_from(("h1", "h2", "x-h")), st.sampled_from(("x", "y", "1", 1)), max_size=3)
_match = st.sampled_from((None, "all", "any", "all-with-x", "any-with-x"))


@st.composite
def topologies(draw) -> dict:
    kinds = [draw(st.sampled_from(KINDS)) for _ in range(EXCHANGES)]
    # an alternate among the exchanges (itself included), one that does not exist, or none
    alternates = [draw(st.one_of(st.none(), st.integers(0, EXCHANGES))) for _ in range(EXCHANGES)]

    def binding(source: int) -> tuple:
        if kinds[source] == "headers":
            match = draw(_match)
            arguments = dict(draw(_headers))
            if match is not None:
                arguments["x-match"] = match
            return "", arguments
        return draw(_pattern if kinds[source] == "topic" else _key), {}

    queue_bindings = []
    for _ in range(draw(st.integers(0, 8))):
        source = draw(st.integers(0, EXCHANGES - 1))
        queue_bindings.append((source, draw(st.integers(0, QUEUES - 1)), *binding(source)))
    exchange_bindings = []
    for _ in range(draw(st.integers(0, 4))):
        source = draw(st.integers(0, EXCHANGES - 1))
        exchange_bindings.append((source, draw(st.integers(0, EXCHANGES - 1)), *binding(source)))
    return {"kinds": kinds, "alternates": alternates, "queues": queue_bindings, "exchanges": exchange_bindings}


# what happens after the topology is made: publishes, and now and then a binding removed or an exchange deleted
_operations = st.lists(st.one_of(
    st.tuples(st.just("publish"), st.integers(0, EXCHANGES - 1), _key, _headers),
    st.tuples(st.just("unbind"), st.integers(0, 7)),  # the n-th queue binding made (if there is one)
    st.tuples(st.just("unbind-exchange"), st.integers(0, 3)),  # the n-th exchange-to-exchange binding
    st.tuples(st.just("delete"), st.integers(0, EXCHANGES - 1)),
), min_size=1, max_size=10)  # fmt: skip


def _topic_matches(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_topic_matches(rest, words[i:]) for i in range(len(words) + 1))
    return bool(words) and head in ("*", words[0]) and _topic_matches(rest, words[1:])


def _words(key: str) -> list[str]:
    """A key's words for topic matching: an empty key has none (RabbitMQ: `.#` does not match the key "")."""
    return key.split(".") if key else []


def _matches(kind: str, key: str, arguments: dict, routing_key: str, headers: dict) -> bool:
    if kind == "fanout":
        return True
    if kind == "direct":
        return key == routing_key
    if kind == "topic":
        return _topic_matches(_words(key), _words(routing_key))
    match = arguments.get("x-match", "all")
    wanted = {name: value for name, value in arguments.items()
              if name != "x-match" and (match.endswith("-with-x") or not name.startswith("x-"))}  # fmt: skip
    hits = [name in headers and type(headers[name]) is type(value) and headers[name] == value
            for name, value in wanted.items()]  # fmt: skip
    return any(hits) if match.startswith("any") else all(hits)


def model_route(topology: dict, exchange: int, routing_key: str, headers: dict) -> set[int]:
    """The queues RabbitMQ's rules send a message to (see the module docstring); `topology["deleted"]` are
    exchanges that no longer exist."""
    kinds, alternates = topology["kinds"], topology["alternates"]
    reached: set[int] = set()
    seen, todo = {exchange}, [exchange]
    while todo:
        current = todo.pop()
        if current >= EXCHANGES or current in topology["deleted"]:  # an alternate that does not exist
            continue
        kind = kinds[current]
        queues = {q for source, q, key, args in topology["queues"]
                  if source == current and _matches(kind, key, dict(args), routing_key, headers)}  # fmt: skip
        onward = [d for source, d, key, args in topology["exchanges"]
                  if source == current and _matches(kind, key, dict(args), routing_key, headers)]  # fmt: skip
        if not queues and not onward and alternates[current] is not None:
            onward.append(alternates[current])
        reached |= queues
        for destination in onward:
            if destination not in seen:
                seen.add(destination)
                todo.append(destination)
    return reached


@given(topologies(), _operations)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_messages_reach_the_queues_the_model_routes_them_to(server, topology, operations):
    prefix = f"rm{uuid.uuid4().hex[:10]}"
    exchange = [f"{prefix}-x{i}" for i in range(EXCHANGES + 1)]  # the last is never declared
    queue = [f"{prefix}-q{i}" for i in range(QUEUES)]
    # the model's bindings: a binding made twice is one binding, as in RabbitMQ
    model = dict(topology, deleted=set(), queues=[], exchanges=[])
    for kind in ("queues", "exchanges"):
        for source, target, key, arguments in topology[kind]:
            made = (source, target, key, tuple(sorted(arguments.items())))
            if made not in model[kind]:
                model[kind].append(made)
    with pika.BlockingConnection(pika.URLParameters(server.amqp_url)) as connection:
        channel = connection.channel()
        for i, kind in enumerate(topology["kinds"]):
            alternate = topology["alternates"][i]
            arguments = {"alternate-exchange": exchange[alternate]} if alternate is not None else None
            channel.exchange_declare(exchange[i], kind, auto_delete=False, arguments=arguments)
        for name in queue:
            channel.queue_declare(name, auto_delete=True)
        for source, q, key, arguments in model["queues"]:
            channel.queue_bind(queue[q], exchange[source], key, arguments=dict(arguments) or None)
        for source, destination, key, arguments in model["exchanges"]:
            channel.exchange_bind(exchange[destination], exchange[source], key, arguments=dict(arguments) or None)
        channel.confirm_delivery()
        expected: dict[int, list[bytes]] = {q: [] for q in range(QUEUES)}
        for n, operation in enumerate(operations):
            if operation[0] == "unbind" and operation[1] < len(model["queues"]):
                source, q, key, arguments = model["queues"].pop(operation[1])
                channel.queue_unbind(queue[q], exchange[source], key, arguments=dict(arguments) or None)
            elif operation[0] == "unbind-exchange" and operation[1] < len(model["exchanges"]):
                source, destination, key, arguments = model["exchanges"].pop(operation[1])
                channel.exchange_unbind(exchange[destination], exchange[source], key,
                                        arguments=dict(arguments) or None)  # fmt: skip
            elif operation[0] == "delete" and operation[1] not in model["deleted"]:
                x = operation[1]
                channel.exchange_delete(exchange[x])
                model["deleted"].add(x)  # and its bindings, from it and to it
                model["queues"] = [b for b in model["queues"] if b[0] != x]
                model["exchanges"] = [b for b in model["exchanges"] if x not in b[:2]]
            elif operation[0] == "publish" and operation[1] not in model["deleted"]:
                _, x, routing_key, headers = operation
                body = f"m{n}".encode()
                routes = model_route(model, x, routing_key, headers)
                try:
                    channel.basic_publish(exchange[x], routing_key, body, pika.BasicProperties(headers=headers),
                                          mandatory=True)  # fmt: skip
                    returned = False
                except pika.exceptions.UnroutableError:
                    returned = True
                assert returned == (not routes), (n, operation, model)
                for q in routes:
                    expected[q].append(body)
        got = {q: sorted(drain(channel, queue[q])) for q in range(QUEUES)}
        assert got == {q: sorted(bodies) for q, bodies in expected.items()}, model
        for name in exchange[:EXCHANGES]:
            channel.exchange_delete(name)
        for name in queue:
            channel.queue_delete(name)
