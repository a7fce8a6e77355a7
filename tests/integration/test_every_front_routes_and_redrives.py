"""Every front reads what AMQP exchanges route, what SQS FIFO queues hold and what dead-letter queues get, when
another front published it: hostile messages (the generators of test_every_front_publishes_to_every_front.py)
through

- a topic exchange with pattern bindings (`#`, `*`, `#` in the middle) and a headers exchange (x-match all and
  any), published by the native client and the HTTP API to `exchange.X` with subjects (canonical ones, and
  odd ones: empty words, `_`-words that are not hex, long) and by pika with hostile routing keys (dots at the
  ends, empty words, `#` and `*` as characters, non-ASCII, up to 255 bytes); routed as RabbitMQ routes the
  routing key (docs/amqp.md) and read through native receive, the HTTP API, SQS JSON and query, pika and aio-pika;
- SQS FIFO queues holding messages with group and dedup ids set through SQS, natively (any characters: control
  characters, non-ASCII, 128 characters) and through AMQP (`x-group-id`, `x-deduplication-header`), read
  through SQS JSON and query (MessageGroupId, MessageDeduplicationId, SequenceNumber), native receive and pika;
- dead letters of SQS messages (RedrivePolicy with maxReceiveCount), then moved back by StartMessageMoveTask,
  of AMQP messages rejected to an x-dead-letter-exchange, and of both nacked natively, each read through every
  front.

Each reader must answer every receive and reach every message it should, in order. CHUTE_XFRONT_MESSAGES sets
how many messages each front publishes (default 20), CHUTE_XFRONT_SEED the generator's seed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import re
import string
import time

import aio_pika
import pika
import pytest
import requests

import chute
from chute.errors import ChuteError
from chute.testing import running_server
from tests.integration.test_every_front_publishes_to_every_front import (
    WAIT_S,
    Sent,
    amqp_properties,
    amqp_view,
    any_body,
    check,
    plain,
    read_http,
    read_native,
    read_pika_get,
    read_sqs,
    reject_all,
    routing_key,
    sent_through_amqp,
    shown_property,
    sqs_attributes,
    text,
    xml_shown,
)
from tests.sqs.boto3_support import client_for
from tests.sqs.compat_support import query_client

MESSAGES = int(os.environ.get("CHUTE_XFRONT_MESSAGES", "20"))
SEED = int(os.environ.get("CHUTE_XFRONT_SEED", "20261205"))
READERS = ("native", "http", "sqs-json", "sqs-query", "pika-get", "aio-pika")
TOPIC_KEYS = ("#", "a.#", "#.b", "*.*", "a.*.b", "*", "#.é.#", "a.#.b", "_.#", "*.#")
HEADERS_BINDINGS = ({"x-match": "all", "k": "v"}, {"x-match": "any", "k": "v", "é": "ü\x00"}, {"x-match": "all"},
                    {"x-match": "all", "k": "v", "l": ""}, {"x-match": "any"})  # fmt: skip
HEADERS_SUBJECT = ".".join(["_"] * 8)  # docs/amqp.md: the subject headers-exchange subscriptions match
KEY_WORDS = ("a", "b", "é", "", "#", "*", "_", "_41", "a b", "x" * 40, "\x00", "\U0001f600", "-", "A.")
SQS_ID = string.ascii_letters + string.digits + string.punctuation  # what SQS takes in group and dedup ids


# -- routing as RabbitMQ does it, on routing keys ---------------------------------------------------------------


def word_as_subject(word: str) -> str:
    """docs/amqp.md: a word that is not letters, digits, `-`, `_`, or that starts with `_`, is `_` + hex."""
    if re.fullmatch(r"[A-Za-z0-9-][A-Za-z0-9_-]*", word):
        return word
    return "_" + word.encode().hex()


def as_subject(key: str) -> str | None:
    subject = ".".join(word_as_subject(word) for word in key.split("."))
    return subject if len(subject) <= 255 else None


def topic_matches(binding: str, words: list[str]) -> bool:
    """RabbitMQ's topic matching: `*` one word, `#` zero or more."""
    pattern = binding.split(".")

    def match(p: int, w: int) -> bool:
        if p == len(pattern):
            return w == len(words)
        if pattern[p] == "#":
            return any(match(p + 1, i) for i in range(w, len(words) + 1))
        return w < len(words) and (pattern[p] == "*" or pattern[p] == words[w]) and match(p + 1, w + 1)

    return match(0, 0)


def headers_match(binding: dict, headers: dict) -> bool:
    spec = {k: v for k, v in binding.items() if not k.startswith("x-")}
    found = [headers.get(name) == value for name, value in spec.items()]
    return all(found) if binding["x-match"] == "all" else any(found)


class Routed(Sent):
    """A message published to an exchange: the routing key an AMQP reader sees, the words it is routed by."""

    def __init__(self, body, headers, *, key: str, words: list[str] | None, exchange: str, **own) -> None:
        super().__init__(body, headers, **own)
        self.key, self.words, self.exchange = key, words, exchange


def hostile_key(rnd: random.Random) -> str:
    key = ".".join(rnd.choice(KEY_WORDS) for _ in range(rnd.randint(1, 5)))
    return key if rnd.random() < 0.9 else (key + ".") * 30  # sometimes long: too long as a subject


def odd_subject(rnd: random.Random) -> str:
    """A subject as a native client may write it: canonical for a routing key, or not (`_zz`, `_2e`, long)."""
    if rnd.random() < 0.6:
        return as_subject(hostile_key(rnd)) or "a"
    words = ("a", "b", "_zz", "_2e", "_", "_c3", "_00", "_c3a9", "x" * 60, "_2a", "_23", "-")
    return ".".join(rnd.choice(words) for _ in range(rnd.randint(1, 6)))


def publish_to_exchanges(server, rnd: random.Random) -> tuple[list[Routed], list[Routed]]:
    """(to the topic exchange, to the headers exchange): native, HTTP and pika publishes, in that order."""
    topic, headers = [], []
    with chute.Client(server.url) as native:
        for _ in range(MESSAGES):
            body, subject = any_body(rnd), odd_subject(rnd)
            try:
                native.publish("exchange.xt", body, subject=subject)
            except ChuteError:  # a subject Chute does not take (over 255 characters): refused, clearly
                assert len(subject) > 255
                continue
            words = subject.split(".")
            topic.append(Routed(body, {}, key=routing_key(subject), words=words, exchange="", subject=subject))
        for _ in range(MESSAGES):
            body, values = any_body(rnd), header_values(rnd)
            native.publish("exchange.xh", body, subject=HEADERS_SUBJECT, headers=values)
            headers.append(Routed(body, values, key="", words=None, exchange="xh"))
            if rnd.random() < 0.2:  # docs/amqp.md: another subject reaches no headers binding
                native.publish("exchange.xh", body, subject=rnd.choice(("a", HEADERS_SUBJECT + "._")), headers=values)
    base = f"http://127.0.0.1:{server.http_port}/api/v1/topics"
    for _ in range(MESSAGES):
        body, subject = text(rnd, rnd.randint(0, 30)), odd_subject(rnd)
        answer = requests.post(f"{base}/exchange.xt/messages", json={"body": body, "subject": subject}, timeout=30)
        if len(subject) > 255:
            assert answer.status_code == 400, answer.text
            continue
        assert answer.status_code == 201, answer.text
        topic.append(Routed(body.encode(), {}, key=routing_key(subject), words=subject.split("."), exchange="",
                            subject=subject))  # fmt: skip
    connection = pika.BlockingConnection(pika.URLParameters(server.amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for _ in range(MESSAGES):
            body, key = any_body(rnd), hostile_key(rnd)
            if len(key.encode()) > 255:
                continue  # (a shortstr: pika cannot send it)
            channel.basic_publish("xt", key, body)
            subject = as_subject(key)
            words = [word_as_subject(word) for word in key.split(".")] if subject is not None else None
            topic.append(Routed(body, {}, key=key, words=words, exchange="xt"))
        for _ in range(MESSAGES):
            body, values = any_body(rnd), header_values(rnd)
            key = hostile_key(rnd)[:50]
            channel.basic_publish("xh", key, body, pika.BasicProperties(headers=values))
            headers.append(Routed(body, values, key=key, words=None, exchange="xh"))
    finally:
        connection.close()
    return topic, headers


def header_values(rnd: random.Random) -> dict[str, str]:
    values = {}
    for name in ("k", "é", "l"):
        if rnd.random() < 0.6:
            values[name] = rnd.choice(("v", "ü\x00", "", "V", "v ", text(rnd, 3)))
    return values


def declare_exchanges(server) -> dict[str, tuple[str, object, str]]:
    """Queue per (binding, reader) -> (exchange, binding key or arguments, reader)."""
    queues = {}
    connection = pika.BlockingConnection(pika.URLParameters(server.amqp_url))
    try:
        channel = connection.channel()
        channel.exchange_declare("xt", "topic")
        channel.exchange_declare("xh", "headers")
        for reader in READERS:
            for i, key in enumerate(TOPIC_KEYS):
                queue = f"xt-{i}-{reader}"
                channel.queue_declare(queue)
                channel.queue_bind(queue, "xt", key)
                queues[queue] = ("xt", key, reader)
            for i, arguments in enumerate(HEADERS_BINDINGS):
                queue = f"xh-{i}-{reader}"
                channel.queue_declare(queue)
                channel.queue_bind(queue, "xh", "", arguments)
                queues[queue] = ("xh", arguments, reader)
    finally:
        connection.close()
    return queues


def read_aio_pika_all(server, queue: str, count: int) -> list[tuple[bytes, object]]:
    """aio-pika's basic.get until the queue is empty (bounded)."""

    async def get() -> list[tuple[bytes, object]]:
        got = []
        async with await aio_pika.connect(server.amqp_url) as connection:
            channel = await connection.channel()
            source = await channel.get_queue(queue, ensure=False)
            for _ in range(count + 1):
                message = await source.get(no_ack=True, fail=False, timeout=WAIT_S)
                if message is None:
                    break
                got.append((message.body, message))
        return got

    return asyncio.run(get())


def read(server, tmp_path, reader: str, queue: str, count: int) -> list:
    if reader.startswith("sqs"):
        client = client_for(server.http_port) if reader == "sqs-json" else query_client(
            f"http://127.0.0.1:{server.http_port}", tmp_path)  # fmt: skip
        return read_sqs(client, queue, count)
    readers = {"native": read_native, "http": read_http, "pika-get": read_pika_get, "aio-pika": read_aio_pika_all}
    return readers[reader](server, queue, count)


def bodies_as(reader: str, bodies: list[bytes]) -> list:
    if reader.startswith("sqs"):
        show = xml_shown if reader == "sqs-query" else (lambda text: text)
        return [show(body.decode(errors="replace")) for body in bodies]
    return bodies


def shown_route(reader: str, shown) -> tuple[str, str]:
    if reader == "aio-pika":
        return shown.exchange, shown.routing_key
    method, _ = shown
    return method.exchange, method.routing_key


@pytest.fixture(scope="module")
def server():
    with running_server() as running:
        yield running


@pytest.mark.timeout(180)
def test_exchanges_route_what_every_front_publishes_as_rabbitmq_routes_its_key(server, tmp_path):
    rnd = random.Random(f"{SEED}-exchanges")
    queues = declare_exchanges(server)
    topic, headers = publish_to_exchanges(server, rnd)
    assert len(topic) > MESSAGES and len(headers) == 2 * MESSAGES
    failures = []
    for queue, (exchange, binding, reader) in queues.items():
        if exchange == "xt":
            key = " ".join(word if word in ("*", "#") else word_as_subject(word) for word in binding.split("."))
            expected = [m for m in topic if m.words is not None and topic_matches(key.replace(" ", "."), m.words)]
        else:
            expected = [m for m in headers if headers_match(binding, m.headers)]
        try:
            got = read(server, tmp_path, reader, queue, len(expected))
            assert [body for body, _ in got] == bodies_as(reader, [m.body for m in expected])
            for message, (_, shown) in zip(expected, got, strict=True):
                if reader in ("native", "http"):
                    continue
                if reader in ("pika-get", "aio-pika") and exchange == "xt":
                    key = message.key if len(message.key.encode()) <= 255 else ""
                    # docs/amqp.md: a message published to `exchange.X` by another front shows exchange ""
                    assert shown_route(reader, shown) == (message.exchange, key), message.key
        except Exception as exc:  # every reader is tried: the report names each one that failed
            failures.append(f"{queue} {binding!r}: {type(exc).__name__}: {str(exc)[:1500]}")
    assert not failures, "\n".join(failures)


# -- SQS FIFO queues: group and dedup ids from every front -----------------------------------------------------


def hostile_id(rnd: random.Random, serial: int) -> str:
    """Any characters a native client or AMQP takes: control characters, non-ASCII, up to 128 characters."""
    tail = f"#{serial}"
    return rnd.choice((text(rnd, rnd.choice((0, 1, 10, 120))), "\x00\x01", "é" * 60, " ", "a\nb"))[:120] + tail


def sqs_id(rnd: random.Random, serial: int) -> str:
    tail = f"~{serial}"
    return "".join(rnd.choice(SQS_ID) for _ in range(rnd.choice((1, 10, 128 - len(tail))))) + tail


class Keyed(Sent):
    def __init__(self, body: bytes, group: str | None, dedup_id: str | None) -> None:
        super().__init__(body, {})
        self.group, self.dedup_id = group, dedup_id


def publish_fifo(server, tmp_path, rnd: random.Random, queues: list[str]) -> list[Keyed]:
    sent = []
    json_client = client_for(server.http_port)
    urls = [json_client.create_queue(QueueName=queue, Attributes={"FifoQueue": "true"})["QueueUrl"]
            for queue in queues]  # fmt: skip
    serial = iter(range(10**6))
    groups = [sqs_id(rnd, next(serial)) for _ in range(3)]
    xml_client = query_client(f"http://127.0.0.1:{server.http_port}", tmp_path)
    for i in range(MESSAGES):  # through JSON and query, alone and in batches (punctuation: XML's <>&"' too)
        body = "".join(rnd.choice(string.printable[:-2]) for _ in range(rnd.randint(1, 30)))  # (no \x0b, \x0c)
        group, dedup_id = rnd.choice(groups), sqs_id(rnd, next(serial))
        client = json_client if i % 2 else xml_client
        for url in urls:
            if i % 4 < 2:
                client.send_message(QueueUrl=url, MessageBody=body, MessageGroupId=group,
                                    MessageDeduplicationId=dedup_id)  # fmt: skip
            else:
                entry = {"Id": "e", "MessageBody": body, "MessageGroupId": group, "MessageDeduplicationId": dedup_id}
                assert not client.send_message_batch(QueueUrl=url, Entries=[entry]).get("Failed")
        sent.append(Keyed(body.encode(), group, dedup_id))
    for bad in ("", "x" * 129, "é", "a b", "\x00"):  # refused, clearly, as AWS refuses them
        with pytest.raises(json_client.exceptions.ClientError, match="InvalidParameterValue"):
            json_client.send_message(QueueUrl=urls[0], MessageBody="b", MessageGroupId=bad,
                                     MessageDeduplicationId="d")  # fmt: skip
    groups = [hostile_id(rnd, next(serial)) for _ in range(3)]
    with chute.Client(server.url) as native:
        for _ in range(MESSAGES):
            body, group, dedup_id = any_body(rnd), rnd.choice(groups), hostile_id(rnd, next(serial))
            for queue in queues:
                native.publish(queue, body, group=group, dedup_id=dedup_id)
            sent.append(Keyed(body, group, dedup_id))
    connection = pika.BlockingConnection(pika.URLParameters(server.amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for _ in range(MESSAGES):
            body, group, dedup_id = any_body(rnd), rnd.choice(groups), hostile_id(rnd, next(serial))
            table = {"x-group-id": group, "x-deduplication-header": dedup_id}
            for queue in queues:
                channel.basic_publish("", queue, body, pika.BasicProperties(headers=table))
            sent.append(Keyed(body, group, dedup_id))
    finally:
        connection.close()
    return sent


def read_native_messages(server, queue: str, count: int) -> list[tuple[bytes, chute.Message]]:
    got = []
    with chute.Client(server.url) as client:
        for _ in range(count + 1):
            deliveries = client.receive(queue, 10)
            if not deliveries:
                break
            got += [(d.message.body, d.message) for d in deliveries]
            client.ack(deliveries)
    return got


def by_group(messages: list) -> dict[str, list]:
    groups: dict[str, list] = {}
    for group, item in messages:
        groups.setdefault(group, []).append(item)
    return groups


@pytest.mark.timeout(180)
def test_fifo_group_and_dedup_ids_of_every_front_are_read_through_every_front(server, tmp_path):
    rnd = random.Random(f"{SEED}-fifo")
    readers = ("sqs-json", "sqs-query", "native", "pika-get")
    queues = [f"fifo-{reader}.fifo" for reader in readers]
    sent = publish_fifo(server, tmp_path, rnd, queues)
    failures = []
    for reader, queue in zip(readers, queues, strict=True):
        try:
            if reader == "native":
                got = read_native_messages(server, queue, len(sent))
            else:
                got = read(server, tmp_path, reader, queue, len(sent))
            expected = by_group([(m.group, m) for m in sent])
            assert len(got) == len(sent)
            if reader.startswith("sqs"):
                for seen in sqs_groups(reader, got, expected):
                    numbers = [int(m["Attributes"]["SequenceNumber"]) for m in seen]
                    assert numbers == sorted(numbers) and all(len(m["Attributes"]["SequenceNumber"]) == 20
                                                              for m in seen)  # fmt: skip
            elif reader == "native":
                shown = by_group([(message.group, (body, message.dedup_id)) for body, message in got])
                assert shown == {group: [(m.body, m.dedup_id) for m in messages]
                                 for group, messages in expected.items()}  # fmt: skip
            else:
                bodies = sorted(body for body, _ in got)
                assert bodies == sorted(m.body for m in sent)
        except Exception as exc:  # every reader is tried: the report names each one that failed
            failures.append(f"{reader}: {type(exc).__name__}: {str(exc)[:1500]}")
    assert not failures, "\n".join(failures)


def sqs_groups(reader: str, got: list, expected: dict) -> list[list[dict]]:
    """An SQS reader's messages of a FIFO queue, checked group by group against `expected` (group -> messages
    sent, in order): the same groups, each with its bodies and dedup ids in order; each group's messages."""
    show = xml_shown if reader == "sqs-query" else (lambda text: text)
    shown = by_group([(message["Attributes"]["MessageGroupId"], message) for _, message in got])
    assert sorted(shown) == sorted(show(group) for group in expected)
    groups = []
    for group, messages in expected.items():
        seen = shown[show(group)]
        assert [m["Body"] for m in seen] == bodies_as(reader, [m.body for m in messages])
        assert [m["Attributes"]["MessageDeduplicationId"] for m in seen] == [show(m.dedup_id) for m in messages]
        groups.append(seen)
    return groups


# -- dead letters of SQS and AMQP messages ----------------------------------------------------------------------


def await_ready(server, queue: str, count: int) -> None:
    """Wait (bounded) until `count` messages are ready in `queue`."""
    with chute.Client(server.url) as client:
        client.create_queue(f"{queue}-never")  # (idempotent)
        for _ in range(int(WAIT_S * 100)):
            if client.queue_stats(queue).ready >= count:
                return
            client.receive(f"{queue}-never", wait_s=0.01)  # a bounded wait for the broker to move on
        raise AssertionError(f"{queue}: {client.queue_stats(queue).ready} of {count} arrived")


def sqs_sent(rnd: random.Random) -> tuple[str, dict, dict, dict[str, str]]:
    """(body, attributes, extra send arguments, the headers docs/sqs.md says they become)."""
    chars = "".join(c for c in string.printable + "é\u2028\U0001f600" if c not in "\x0b\x0c")
    body = "".join(rnd.choice(chars) for _ in range(rnd.randint(1, 60)))
    attributes = sqs_attributes(rnd)
    headers = {}
    for name, value in attributes.items():
        binary = value.get("BinaryValue")
        headers[name] = base64.b64encode(binary).decode() if binary is not None else value["StringValue"]
        if value["DataType"] != "String":
            headers["sqs:type:" + name] = value["DataType"]
    extra = {}
    if rnd.random() < 0.3:
        trace = "".join(rnd.choice(chars) for _ in range(20))
        extra["MessageSystemAttributes"] = {"AWSTraceHeader": {"DataType": "String", "StringValue": trace}}
        headers["sqs:AWSTraceHeader"] = trace
    return body, attributes, extra, headers


DEATH_HEADERS = ("amqp-table", "amqp-exchange", "amqp-routing-key")
FIRST_DEATH = ("x-first-death-reason", "x-first-death-queue", "x-first-death-exchange")
# docs/amqp.md: a rejection's republish drops the expiration (as RabbitMQ does) and gives the message the id and
# timestamp AMQP readers were shown
REPUBLISHED = ("amqp-expiration", "amqp-message-id", "amqp-timestamp")


def check_dead(front: str, reader: str, sent: list[Sent], got: list, source: str | None) -> None:
    """A dead letter reads as its message did, give or take what dead-lettering adds (x-death, its route)."""
    expected = sorted(sent, key=lambda message: -message.priority)
    assert [body for body, _ in got] == bodies_as(reader, [m.body for m in expected])
    for message, (_, shown) in zip(expected, got, strict=True):
        if reader in ("native", "http"):
            # (what dead-lettering adds: x-death in amqp-table, over any string x-death the publisher set, as
            # RabbitMQ writes it; the first death, the route; what a rejection's republish changes)
            ours = (*DEATH_HEADERS, "x-death", *FIRST_DEATH, *REPUBLISHED) if front == "amqp" else ()
            assert {k: v for k, v in shown.items() if k not in ours} == {
                k: v for k, v in message.headers.items() if k not in ours}  # fmt: skip
        elif reader.startswith("sqs"):
            if front == "sqs":
                assert shown.get("MessageAttributes", {}) == message.own["attributes"]
                assert shown["Attributes"].get("AWSTraceHeader") == message.headers.get("sqs:AWSTraceHeader")
            if source is not None:
                assert shown["Attributes"]["DeadLetterQueueSourceArn"].endswith(":" + source)
        else:
            properties, table, _ = amqp_view(reader, shown)
            if front == "amqp":
                values = message.own["properties"]
                for name, value in values.items():
                    if name == "headers":
                        # (x-death and the first death as RabbitMQ writes them, over any the publisher set)
                        death = ("x-death", *FIRST_DEATH)
                        assert {k: v for k, v in table.items() if k not in death} == {
                            k: v for k, v in plain(value).items() if k not in death}  # fmt: skip
                    elif name not in ("expiration",):
                        assert shown_property(properties, name) == str(value), name
            if source is not None:
                assert table["x-death"][0]["queue"] == source


def publish_sqs_to(server, rnd: random.Random, queues: list[str]) -> list[Sent]:
    client = client_for(server.http_port)
    urls = [client.get_queue_url(QueueName=queue)["QueueUrl"] for queue in queues]
    sent = []
    for _ in range(MESSAGES):
        body, attributes, extra, headers = sqs_sent(rnd)
        for url in urls:
            client.send_message(QueueUrl=url, MessageBody=body, MessageAttributes=attributes, **extra)
        sent.append(Sent(body.encode(), headers, attributes=attributes))
    return sent


def publish_amqp_to(server, rnd: random.Random, queues: list[str]) -> list[Sent]:
    connection = pika.BlockingConnection(pika.URLParameters(server.amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        sent = []
        for _ in range(MESSAGES):
            body, values = any_body(rnd), amqp_properties(rnd)
            for queue in queues:
                channel.basic_publish("", queue, body, pika.BasicProperties(**values))
            sent.append(sent_through_amqp(body, values))
        return sent
    finally:
        connection.close()


def redrive_by_receive_count(server, queues: list[str], count: int) -> None:
    """Receive every message twice with VisibilityTimeout 0: maxReceiveCount 1 dead-letters them."""
    client = client_for(server.http_port)
    for queue in queues:
        url = client.get_queue_url(QueueName=queue)["QueueUrl"]
        for _ in range(2 * count + 2):
            got = client.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=0,
                                         WaitTimeSeconds=0).get("Messages", [])  # fmt: skip
            if not got and client.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"][
                    "ApproximateNumberOfMessages"] == "0":  # fmt: skip
                break


def move(client, source: str, destination: str | None = None) -> int:
    """Run a StartMessageMoveTask from `source` (back to the sources, or to `destination`); how many it moved."""
    arns = [client.get_queue_attributes(QueueUrl=client.get_queue_url(QueueName=name)["QueueUrl"],
                                        AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
            for name in (source, destination) if name is not None]  # fmt: skip
    client.start_message_move_task(SourceArn=arns[0], **({"DestinationArn": arns[1]} if destination else {}))
    for _ in range(int(WAIT_S * 100)):
        [task, *_] = client.list_message_move_tasks(SourceArn=arns[0])["Results"]
        if task["Status"] != "RUNNING":
            assert task["Status"] == "COMPLETED", task
            return task["ApproximateNumberOfMessagesMoved"]
        time.sleep(0.01)  # (a task's progress is only seen by asking)
    raise AssertionError(f"the move task from {source} did not end")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", ["sqs-redrive", "sqs-move-back", "sqs-nack", "sqs-redrive-move-to", "amqp-reject",
                                  "amqp-reject-move-back", "amqp-nack", "amqp-nack-move-to", "amqp-reject-move-to"])
def test_dead_letters_of_sqs_and_amqp_messages_are_read_through_every_front(server, tmp_path, case):
    rnd = random.Random(f"{SEED}-{case}")
    sources = [f"dl-{case}-{reader}" for reader in READERS]
    client = client_for(server.http_port)
    if case.startswith("sqs"):
        for queue in sources:
            dlq = client.create_queue(QueueName=f"{queue}-dlq")["QueueUrl"]
            arn = client.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
            policy = json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": "1"})
            client.create_queue(QueueName=queue, Attributes={"RedrivePolicy": policy})
            client.create_queue(QueueName=f"{queue}-dest")
        sent = publish_sqs_to(server, rnd, sources)
    else:
        connection = pika.BlockingConnection(pika.URLParameters(server.amqp_url))
        try:
            channel = connection.channel()
            for queue in sources:
                channel.queue_declare(f"{queue}-dlq")
                channel.queue_declare(f"{queue}-dest", arguments={"x-max-priority": 9})
                channel.queue_declare(queue, arguments={"x-dead-letter-exchange": "", "x-max-priority": 9,
                                                        "x-dead-letter-routing-key": f"{queue}-dlq"})  # fmt: skip
        finally:
            connection.close()
        sent = publish_amqp_to(server, rnd, sources)
    front = case.split("-")[0]
    failures = []
    for reader, queue in zip(READERS, sources, strict=True):
        try:
            if case.startswith(("sqs-redrive", "sqs-move-back")):
                redrive_by_receive_count(server, [queue], len(sent))
            elif case.startswith("amqp-reject"):
                reject_all(server, "pika", queue, len(sent))
            else:
                reject_all(server, "native", queue, len(sent))
            await_ready(server, f"{queue}-dlq", len(sent))
            read_from, source = f"{queue}-dlq", queue
            if case.endswith("-move-back"):
                moved = move(client, f"{queue}-dlq")
                if case == "amqp-reject-move-back":  # docs/sqs.md: the broker does not know where they came from
                    assert moved == 0
                    moved = move(client, f"{queue}-dlq", queue)  # ... so they are moved there by name
                assert moved == len(sent)
                read_from, source = queue, None
            elif case.endswith("-move-to"):  # moved on with their attributes, no longer dead letters
                assert move(client, f"{queue}-dlq", f"{queue}-dest") == len(sent)
                read_from, source = f"{queue}-dest", None
            got = read(server, tmp_path, reader, read_from, len(sent))
            if case.endswith("-move-back") and not reader.startswith(("pika", "aio")) and front == "sqs":
                check(front + "-json" if front == "sqs" else front, reader, sent, got)
            else:
                # (an AMQP rejection publishes the dead letter again: SQS cannot name its source, docs/sqs.md)
                known = front == "amqp" and not reader.startswith("sqs") or front == "sqs" and reader.startswith("sqs")
                check_dead(front, reader, sent, got, source if known or case == "amqp-nack" else None)
        except Exception as exc:  # every reader is tried: the report names each one that failed
            failures.append(f"{reader}: {type(exc).__name__}: {str(exc)[:1500]}")
    assert not failures, "\n".join(failures)


@pytest.mark.timeout(180)
def test_fifo_dead_letters_keep_their_groups_through_redrive_and_move_back(server, tmp_path):
    """Native messages with hostile group and dedup ids in an SQS FIFO queue whose RedrivePolicy sends them to a
    FIFO dead-letter queue: read there through SQS JSON and query (groups, dedup ids, sequence numbers, source),
    then moved back by StartMessageMoveTask and read again, each group in order."""
    rnd = random.Random(f"{SEED}-fifo-dead")
    client = client_for(server.http_port)
    readers = ("sqs-json", "sqs-query")
    for reader in readers:
        dlq = client.create_queue(QueueName=f"fd-{reader}-dlq.fifo", Attributes={"FifoQueue": "true"})["QueueUrl"]
        arn = client.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        policy = json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": "1"})
        client.create_queue(QueueName=f"fd-{reader}.fifo", Attributes={"FifoQueue": "true", "RedrivePolicy": policy})
    serial = iter(range(10**6))
    groups = [hostile_id(rnd, next(serial)) for _ in range(3)]
    sent = []
    with chute.Client(server.url) as native:
        for _ in range(MESSAGES):
            body, group, dedup_id = any_body(rnd), rnd.choice(groups), hostile_id(rnd, next(serial))
            for reader in readers:
                native.publish(f"fd-{reader}.fifo", body, group=group, dedup_id=dedup_id)
            sent.append(Keyed(body, group, dedup_id))
    failures = []
    for reader in readers:
        mine = [Keyed(m.body, m.group, m.dedup_id) for m in sent]  # (each reader's queue: its own dedup ids)
        expected = by_group([(m.group, m) for m in mine])
        try:
            source = f"fd-{reader}.fifo"
            redrive_by_receive_count(server, [source], len(sent))
            await_ready(server, f"fd-{reader}-dlq.fifo", len(sent))
            for queue, dead in ((f"fd-{reader}-dlq.fifo", True), (source, False)):
                if not dead:
                    dlq = client.get_queue_url(QueueName=f"fd-{reader}-dlq.fifo")["QueueUrl"]
                    arn = client.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"][
                        "QueueArn"]  # fmt: skip
                    client.start_message_move_task(SourceArn=arn)
                    await_ready(server, source, len(sent))
                got = read(server, tmp_path, reader, queue, len(sent))
                for seen in sqs_groups(reader, got, expected):
                    if dead:
                        assert {m["Attributes"]["DeadLetterQueueSourceArn"].rsplit(":", 1)[1] for m in seen} == {
                            source}  # fmt: skip
                if not dead:
                    break
                # (read and deleted: publish them again to the source, and dead-letter them once more)
                with chute.Client(server.url) as native:
                    for message in mine:  # (a new dedup id: the first is remembered for 5 minutes)
                        message.dedup_id = message.dedup_id[-100:] + "!"
                        native.publish(source, message.body, group=message.group, dedup_id=message.dedup_id)
                redrive_by_receive_count(server, [source], len(sent))
                await_ready(server, f"fd-{reader}-dlq.fifo", len(sent))
        except Exception as exc:  # every reader is tried: the report names each one that failed
            failures.append(f"{reader}: {type(exc).__name__}: {str(exc)[:1500]}")
    assert not failures, "\n".join(failures)
