"""Every front reads what every other front publishes: hostile messages published through the HTTP API (to a
topic, with subjects), AMQP (pika: every basic property and every field type in the header table, through a
fanout exchange), SQS's JSON protocol and SQS's query protocol (String, Number, Binary and custom-typed
attributes, AWSTraceHeader), each read through the native client (receive and consume), the HTTP API (receive
and peek), SQS JSON and query (ReceiveMessage with All attributes), pika (basic.get and basic.consume) and
aio-pika (consume), each reader from its own queue holding the same messages; and dead letters, rejected through
one front and read through every other.

For each reader: every receive succeeds, every message is reached in order (priority first, as the queues
order them), and values are carried as the docs say where the reader's front can carry them: headers exactly for
native and HTTP readers (docs/amqp.md and docs/sqs.md say how AMQP properties and SQS attributes become headers),
properties and typed header tables for AMQP readers of AMQP messages, attributes for SQS readers of SQS messages,
string headers as table entries, properties or attributes otherwise; x-death for AMQP readers of dead letters.
Bugs this found: an `amqp-expiration` header aio-pika could not parse (8e11d35), a rejection to a dead-letter
queue failing on another front's `x-delay` or `x-group-id` (edf0d25) and losing headers AMQP cannot show
(3873f76). CHUTE_XFRONT_MESSAGES sets how many messages each front publishes (default 40), CHUTE_XFRONT_SEED the
generator's seed.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import os
import random
import string
from decimal import Decimal

import aio_pika
import pika
import pytest
import requests

import chute
from chute.testing import running_server
from tests.sqs.boto3_support import client_for
from tests.sqs.compat_support import query_client

MESSAGES = int(os.environ.get("CHUTE_XFRONT_MESSAGES", "40"))
SEED = int(os.environ.get("CHUTE_XFRONT_SEED", "20261205"))
READERS = ("native", "native-consume", "http", "http-peek", "sqs-json", "sqs-query", "pika-get", "pika-consume",
           "aio-pika")  # fmt: skip
WAIT_S = 10.0  # the longest any one read waits for a message known to be there
# text pools: printable ASCII, characters XML or SQS refuse (and some they take), name characters, markup
POOLS = (string.printable, "\x00\x01\x1b\x7f\x85\u2028\ufffe\uffff\ud7ff\U0001f600é", "aZ0-_.", " \t\r\n<>&\"'")
SQS_CHARS = "".join(c for c in string.printable + "é\u2028\U0001f600\ud7ff\ue000\ufffd" if c not in "\x0b\x0c")
# header names other fronts read specially (AMQP properties and options, SQS types, x-death) or cannot carry
NAMES = ("amqp-message-id", "amqp-timestamp", "amqp-priority", "amqp-expiration", "amqp-reply-to", "amqp-user-id",
         "amqp-content-type", "amqp-delivery-mode", "amqp-cluster-id", "amqp-table", "amqp-exchange",
         "amqp-routing-key", "sqs:type:a", "sqs:type:b.c", "sqs:AWSTraceHeader", "x-death", "x-first-death-queue",
         "x-delay", "x-group-id", "x-deduplication-header", "a", "b.c", "n" * 256)  # fmt: skip
PROPERTY_HEADERS = {"content_type": "amqp-content-type", "content_encoding": "amqp-content-encoding",
                    "correlation_id": "amqp-correlation-id", "reply_to": "amqp-reply-to", "message_id":
                    "amqp-message-id", "type": "amqp-type", "app_id": "amqp-app-id", "expiration": "amqp-expiration",
                    "priority": "amqp-priority", "delivery_mode": "amqp-delivery-mode"}  # fmt: skip


class Sent:
    """One message as published: its body, the Chute headers its front documents for it, and what its own
    front's readers get back (AMQP properties and table, SQS attributes)."""

    def __init__(self, body: bytes, headers: dict[str, str], priority: int = 0, **own) -> None:
        self.body, self.headers, self.priority, self.own = body, headers, priority, own


# -- publishers ---------------------------------------------------------------------------------------------------


def text(rnd: random.Random, n: int) -> str:
    return "".join(rnd.choice(rnd.choice(POOLS)) for _ in range(n))


def any_body(rnd: random.Random) -> bytes:
    if rnd.random() < 0.3:
        return bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 40)))  # not UTF-8, most likely
    return text(rnd, rnd.randint(0, 60)).encode()


def header_value(rnd: random.Random) -> str:
    return rnd.choice((rnd.choice(("Binary", "Number", "String.x", "-1", "256", "7", "0", "", "AAE=", "soon")),
                       base64.b64encode(rnd.randbytes(rnd.randint(0, 30))).decode(),
                       text(rnd, rnd.choice((1, 5, 40, 300)))))  # fmt: skip


def subject_word(rnd: random.Random) -> str:
    # `_` + hex is how AMQP routing-key words that are not subject words travel ("_" is the empty word)
    return rnd.choice(("orders", "eu", "a-b", "x_y", "_", "_41", "_2e", "_zz", "_c3a9", "9"))


def publish_http(server, rnd: random.Random, queues: list[str]) -> list[Sent]:
    """To a topic that every queue subscribes to, with random subjects; bodies in base64."""
    base = f"http://127.0.0.1:{server.http_port}/api/v1"
    topic = f"{queues[0]}-topic"
    assert requests.put(f"{base}/topics/{topic}", json={}, timeout=30).status_code == 201
    for queue in queues:
        answer = requests.post(f"{base}/topics/{topic}/subscriptions", json={"queue": queue, "pattern": ">"},
                               timeout=30)  # fmt: skip
        assert answer.status_code == 201, answer.text
    sent = []
    for _ in range(MESSAGES):
        body = any_body(rnd)
        headers = {}
        for _ in range(rnd.randint(0, 8)):
            headers[rnd.choice(NAMES) if rnd.random() < 0.7 else text(rnd, rnd.randint(1, 20))] = header_value(rnd)
        message = {"body": base64.b64encode(body).decode(), "body_encoding": "base64", "headers": headers,
                   "priority": rnd.choice((0, 0, 0, 5, 9)),
                   "subject": ".".join(subject_word(rnd) for _ in range(rnd.randint(1, 4)))}  # fmt: skip
        answer = requests.post(f"{base}/topics/{topic}/messages", json=message, timeout=30)
        if answer.status_code == 400:  # refused with a clear error (a header name the model does not take)
            continue
        assert answer.status_code == 201, answer.text
        sent.append(Sent(body, headers, message["priority"], subject=message["subject"]))
    return sent


def field_value(rnd: random.Random, depth: int = 0):
    """A value of any AMQP field type pika encodes (nested up to two levels)."""
    kind = rnd.randrange(10 if depth < 2 else 8)
    if kind == 0:
        return text(rnd, rnd.choice((0, 3, 30, 300)))
    if kind == 1:
        return rnd.randbytes(rnd.randint(0, 20))
    if kind == 2:
        return rnd.random() < 0.5
    if kind == 3:
        return rnd.choice((0, 1, -1, 127, -128, 255, 32767, -32768, 2**31 - 1, -(2**31), 2**31, 2**63 - 1, -(2**63)))
    if kind == 4:
        return Decimal(rnd.choice(("1.5", "-3.25", "0", "123456.789", "7")))
    if kind == 5:
        return datetime.datetime(rnd.randint(1970, 2100), 1, 2, 3, 4, 5)
    if kind == 6:
        return None
    if kind == 7:
        return rnd.randint(-(10**9), 10**9)
    if kind == 8:
        return {text(rnd, rnd.randint(1, 10)): field_value(rnd, depth + 1) for _ in range(rnd.randint(0, 4))}
    return [field_value(rnd, depth + 1) for _ in range(rnd.randint(0, 4))]


def amqp_properties(rnd: random.Random) -> dict:
    values = {}
    for name in ("content_type", "content_encoding", "correlation_id", "reply_to", "message_id", "type", "app_id"):
        if rnd.random() < 0.4:
            values[name] = text(rnd, rnd.choice((1, 10, 60)))
    if rnd.random() < 0.3:
        values["expiration"] = str(rnd.choice((86_400_000, 3_600_000)))  # long enough not to expire here
    if rnd.random() < 0.4:
        values["priority"] = rnd.choice((0, 3, 9, 10, 255))
    if rnd.random() < 0.5:
        values["delivery_mode"] = rnd.choice((1, 2))
    if rnd.random() < 0.5:
        # (up to 2**32 - 1: pamqp reads a larger timestamp as milliseconds, so it would not come back as sent)
        values["timestamp"] = rnd.choice((0, 1, 2**31, 2**32 - 1, rnd.randrange(2**32)))
    if rnd.random() < 0.8:
        table = {}
        for _ in range(rnd.randint(0, 6)):
            name = rnd.choice(NAMES[:-1]) if rnd.random() < 0.4 else text(rnd, rnd.randint(1, 20))
            table[name] = field_value(rnd)
        for option in ("x-delay", "x-group-id", "x-deduplication-header"):  # Chute's options: not these here
            table.pop(option, None)
        values["headers"] = table
    return values


def publish_amqp(server, rnd: random.Random, queues: list[str]) -> list[Sent]:
    """Through a fanout exchange bound to every queue, in confirm mode."""
    connection = pika.BlockingConnection(pika.URLParameters(server.amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        exchange = f"{queues[0]}-fanout"
        channel.exchange_declare(exchange, "fanout")
        for queue in queues:
            channel.queue_bind(queue, exchange)
        sent = []
        for _ in range(MESSAGES):
            body, values = any_body(rnd), amqp_properties(rnd)
            channel.basic_publish(exchange, "", body, pika.BasicProperties(**values))
            sent.append(sent_through_amqp(body, values))
        return sent
    finally:
        connection.close()


def sent_through_amqp(body: bytes, values: dict) -> Sent:
    """A message published with pika with these properties, and the Chute headers docs/amqp.md gives it."""
    headers = {PROPERTY_HEADERS[n]: str(v) for n, v in values.items() if n in PROPERTY_HEADERS}
    if "timestamp" in values:
        headers["amqp-timestamp"] = str(values["timestamp"])
    for name, value in values.get("headers", {}).items():
        if isinstance(value, str) and not name.startswith("amqp-"):
            headers[name] = value
    return Sent(body, headers, min(values.get("priority", 0), 9), properties=values)


def sqs_attributes(rnd: random.Random) -> dict:
    attributes = {}
    for _ in range(rnd.randint(0, 10)):
        name = rnd.choice(NAMES[:-1] + ("n" * 256,)) if rnd.random() < 0.5 else "".join(
            rnd.choice("aZ0_-") for _ in range(rnd.randint(1, 12)))  # fmt: skip
        if ":" in name:
            continue
        kind = rnd.choice(("String", "Number", "Binary", "String.json", "Number.int", "Binary.gz"))
        if kind.startswith("Binary"):
            attributes[name] = {"DataType": kind, "BinaryValue": rnd.randbytes(rnd.randint(1, 30))}
        elif kind.startswith("Number"):
            attributes[name] = {"DataType": kind, "StringValue": rnd.choice(("1", "-5", "3.25", "1e5", "256", "2"))}
        else:
            value = "".join(rnd.choice(SQS_CHARS) for _ in range(rnd.choice((1, 5, 40, 300))))
            attributes[name] = {"DataType": kind, "StringValue": value}
    return attributes


def publish_sqs(client, rnd: random.Random, queues: list[str]) -> list[Sent]:
    """To each queue in turn (SQS has no fan-out of its own)."""
    urls = [client.get_queue_url(QueueName=queue)["QueueUrl"] for queue in queues]
    sent = []
    for _ in range(MESSAGES):
        body = "".join(rnd.choice(SQS_CHARS) for _ in range(rnd.randint(1, 60)))
        attributes = sqs_attributes(rnd)
        extra = {}
        if rnd.random() < 0.2:
            trace = "".join(rnd.choice(SQS_CHARS) for _ in range(20))
            extra["MessageSystemAttributes"] = {"AWSTraceHeader": {"DataType": "String", "StringValue": trace}}
        for url in urls:
            client.send_message(QueueUrl=url, MessageBody=body, MessageAttributes=attributes, **extra)
        headers = {}  # docs/sqs.md: each attribute a header, its type in `sqs:type:<name>` unless String
        for name, value in attributes.items():
            binary = value.get("BinaryValue")
            headers[name] = base64.b64encode(binary).decode() if binary is not None else value["StringValue"]
            if value["DataType"] != "String":
                headers["sqs:type:" + name] = value["DataType"]
        if extra:
            headers["sqs:AWSTraceHeader"] = extra["MessageSystemAttributes"]["AWSTraceHeader"]["StringValue"]
        sent.append(Sent(body.encode(), headers, attributes=attributes))
    return sent


# -- readers: each returns (body, what the front shows of the message) in the order received ----------------------


def read_native(server, queue: str, count: int) -> list[tuple[bytes, dict]]:
    got = []
    with chute.Client(server.url) as client:
        for _ in range(count + 1):
            deliveries = client.receive(queue, 10)
            if not deliveries:
                break
            got += [(d.message.body, d.message.headers) for d in deliveries]
            client.ack(deliveries)
    return got


def read_native_consume(server, queue: str, count: int) -> list[tuple[bytes, dict]]:
    got = []
    with chute.Client(server.url) as client:
        consumer = client.consume(queue, prefetch=10)
        while len(got) < count:
            delivery = consumer.get(timeout=WAIT_S)
            assert delivery is not None, f"{queue}: {len(got)} of {count} consumed"
            got.append((delivery.message.body, delivery.message.headers))
            client.ack(delivery)
    return got


def http_message(message: dict) -> tuple[bytes, dict]:
    body = message["body"]
    return (body.encode() if message["body_encoding"] == "utf-8" else base64.b64decode(body)), message["headers"]


def read_http(server, queue: str, count: int) -> list[tuple[bytes, dict]]:
    base = f"http://127.0.0.1:{server.http_port}/api/v1/queues/{queue}"
    got = []
    for _ in range(count + 1):
        answer = requests.post(f"{base}/receive", json={"max_messages": 10}, timeout=30)
        assert answer.status_code == 200, answer.text
        deliveries = answer.json()["deliveries"]
        if not deliveries:
            break
        got += [http_message(delivery["message"]) for delivery in deliveries]
        acked = requests.post(f"{base}/ack", json={"receipts": [d["receipt"] for d in deliveries]}, timeout=30)
        assert acked.status_code == 200, acked.text
    return got


def read_http_peek(server, queue: str, count: int) -> list[tuple[bytes, dict]]:
    answer = requests.get(f"http://127.0.0.1:{server.http_port}/api/v1/queues/{queue}/messages",
                          params={"max_messages": min(count + 1, 100)}, timeout=30)  # fmt: skip
    assert answer.status_code == 200, answer.text
    return [http_message(delivery["message"]) for delivery in answer.json()["messages"]]


def read_sqs(client, queue: str, count: int) -> list[tuple[str, dict]]:
    url = client.get_queue_url(QueueName=queue)["QueueUrl"]
    got = []
    for _ in range(count + 1):  # bounded: ten at a time, each receive deletes what it got
        messages = client.receive_message(QueueUrl=url, MaxNumberOfMessages=10, MessageAttributeNames=["All"],
                                          AttributeNames=["All"], MessageSystemAttributeNames=["All"],
                                          WaitTimeSeconds=0).get("Messages", [])  # fmt: skip
        if not messages:
            break
        got += [(m["Body"], m) for m in messages]
        entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)]
        assert not client.delete_message_batch(QueueUrl=url, Entries=entries).get("Failed")
    return got


def read_pika_get(server, queue: str, count: int) -> list[tuple[bytes, tuple]]:
    connection = pika.BlockingConnection(pika.URLParameters(server.amqp_url))
    try:
        channel = connection.channel()
        got = []
        for _ in range(count + 1):
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                break
            got.append((body, (method, properties)))
        return got
    finally:
        connection.close()


def read_pika_consume(server, queue: str, count: int) -> list[tuple[bytes, tuple]]:
    connection = pika.BlockingConnection(pika.URLParameters(server.amqp_url))
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=10)
        got = []
        for method, properties, body in channel.consume(queue, inactivity_timeout=WAIT_S):
            assert method is not None, f"{queue}: {len(got)} of {count} consumed"
            got.append((body, (method, properties)))
            channel.basic_ack(method.delivery_tag)
            if len(got) == count:
                break
        channel.cancel()
        return got
    finally:
        connection.close()


def read_aio_pika(server, queue: str, count: int) -> list[tuple[bytes, object]]:
    async def consume() -> list[tuple[bytes, object]]:
        got = []
        async with await aio_pika.connect(server.amqp_url) as connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=10)
            source = await channel.get_queue(queue, ensure=False)
            async with asyncio.timeout(WAIT_S + count / 10), source.iterator() as messages:
                async for message in messages:
                    await message.ack()
                    got.append((message.body, message))
                    if len(got) == count:
                        break
        return got

    return asyncio.run(consume())


# -- what each reader must show -------------------------------------------------------------------------------------

HEADER_PROPERTY = {"amqp-content-type": "content_type", "amqp-content-encoding": "content_encoding",
                   "amqp-correlation-id": "correlation_id", "amqp-reply-to": "reply_to",
                   "amqp-message-id": "message_id", "amqp-type": "type", "amqp-app-id": "app_id",
                   "amqp-user-id": "user_id", "amqp-cluster-id": "cluster_id", "amqp-expiration": "expiration",
                   "amqp-priority": "priority", "amqp-delivery-mode": "delivery_mode",
                   "amqp-timestamp": "timestamp"}  # fmt: skip
NOT_IN_TABLES = ("amqp-exchange", "amqp-routing-key", "amqp-table")  # read by the AMQP front itself
SQS_NAME = string.ascii_letters + string.digits + "_.-"


def xml_shown(text: str) -> str:
    ok = lambda o: o in (9, 10, 13) or 0x20 <= o <= 0xD7FF or 0xE000 <= o <= 0xFFFD or o >= 0x10000  # noqa: E731
    return "".join(c if ok(ord(c)) else "\ufffd" for c in text)


def plain(value):
    """A decoded field value in one form whichever client decoded it (pika or aio-pika's pamqp)."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, datetime.datetime):
        return value.replace(tzinfo=None) if value.tzinfo is None else value.astimezone(datetime.UTC).replace(
            tzinfo=None)  # fmt: skip
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def shown_property(shown, name: str) -> str:
    """An AMQP property as the string its Chute header holds ("" when unset)."""
    value = getattr(shown, name, None)
    if value is None:
        return ""
    if isinstance(value, datetime.datetime):
        return str(int(value.replace(tzinfo=datetime.UTC).timestamp()) if value.tzinfo is None else
                   int(value.timestamp()))  # fmt: skip
    if name == "expiration" and isinstance(value, float):  # aio-pika's seconds
        return str(round(value * 1000))
    return str(int(value)) if name in ("priority", "delivery_mode") else str(value)


def amqp_view(reader: str, shown) -> tuple[object, dict, object]:
    """(properties, header table, basic.deliver / get-ok method or None) of an AMQP reader's message."""
    if reader == "aio-pika":
        return shown, plain(dict(shown.headers or {})), shown
    method, properties = shown
    return properties, plain(properties.headers or {}), method


def routing_key(subject: str) -> str:
    """docs/amqp.md: a subject word `_` + hex is the routing-key word of those UTF-8 bytes."""
    words = []
    for word in subject.split("."):
        try:
            words.append(bytes.fromhex(word[1:]).decode() if word.startswith("_") else word)
        except ValueError:
            words.append(word)
    return ".".join(words)


def check_amqp(front: str, reader: str, sent: Sent, shown) -> None:
    properties, table, method = amqp_view(reader, shown)
    if front == "amqp":  # everything comes back: the properties set, every field of the table with its type
        values = sent.own["properties"]
        for name, value in values.items():
            if name == "headers":
                assert table == plain(value)
            elif name == "timestamp":
                assert shown_property(properties, name) == str(value)
            elif name != "expiration":
                assert shown_property(properties, name) == str(value), name
        return
    for name, value in sent.headers.items():
        if len(name.encode()) > 255 or name in NOT_IN_TABLES or "amqp-table" in sent.headers:
            continue  # (not shown; or a table header from another front whose entries may stand for any name)
        prop = HEADER_PROPERTY.get(name)
        if prop is not None and shown_property(properties, prop) == value:
            continue
        if value == "" and prop in ("priority", "delivery_mode"):  # unset: aio-pika shows its defaults
            continue
        assert table.get(name) == value, (name, value, table.get(name))
    if front == "http" and reader != "aio-pika":  # the routing key of the subject (or of its headers)
        exchange = sent.headers.get("amqp-exchange", "")
        key = sent.headers.get("amqp-routing-key", routing_key(sent.own["subject"]))
        assert method.exchange == (exchange if len(exchange.encode()) < 256 else "")
        assert method.routing_key == (key if len(key.encode()) < 256 else "")


def check_sqs(front: str, reader: str, sent: Sent, message: dict) -> None:
    attributes = message.get("MessageAttributes", {})
    show = xml_shown if reader == "sqs-query" else (lambda text: text)
    if front.startswith("sqs"):
        assert attributes == sent.own["attributes"]
        trace = sent.headers.get("sqs:AWSTraceHeader")
        assert message["Attributes"].get("AWSTraceHeader") == trace
        return
    for name, value in sent.headers.items():
        # docs/sqs.md: shown only under a name SendMessage would take (no leading, trailing or double dot, not
        # AWS./Amazon., 1-256 characters of SQS_NAME)
        well_formed = (set(name) <= set(SQS_NAME) and 1 <= len(name) <= 256 and not name.startswith(".")
                       and not name.endswith(".") and ".." not in name
                       and not name.lower().startswith(("aws.", "amazon.")))  # fmt: skip
        if well_formed and value and "sqs:type:" + name not in sent.headers:  # typed: as their type says
            assert attributes[name] == {"DataType": "String", "StringValue": show(value)}, name
        elif not well_formed:
            assert name not in attributes


def check(front: str, reader: str, sent: list[Sent], got: list) -> None:
    expected = sorted(sent, key=lambda message: -message.priority)  # each queue: priority first, then in order
    if reader == "http-peek":
        expected = expected[:100]
    if reader.startswith("sqs"):
        show = xml_shown if reader == "sqs-query" else (lambda text: text)
        assert [body for body, _ in got] == [show(message.body.decode(errors="replace")) for message in expected]
    else:
        assert [body for body, _ in got] == [message.body for message in expected]
    for message, (_, shown) in zip(expected, got, strict=True):
        if reader.startswith(("native", "http")):
            ours = ("amqp-table", "amqp-exchange") if front == "amqp" else ()  # (the AMQP front's own headers)
            assert {k: v for k, v in shown.items() if k not in ours} == message.headers
        elif reader.startswith("sqs"):
            check_sqs(front, reader, message, shown)
        else:
            check_amqp(front, reader, message, shown)


# -- the tests ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    with running_server() as running:
        yield running


def read(server, tmp_path, reader: str, queue: str, count: int) -> list:
    if reader.startswith("sqs"):
        client = client_for(server.http_port) if reader == "sqs-json" else query_client(
            f"http://127.0.0.1:{server.http_port}", tmp_path)  # fmt: skip
        return read_sqs(client, queue, count)
    readers = {"native": read_native, "native-consume": read_native_consume, "http": read_http,
               "http-peek": read_http_peek, "pika-get": read_pika_get, "pika-consume": read_pika_consume,
               "aio-pika": read_aio_pika}  # fmt: skip
    return readers[reader](server, queue, count)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("front", ["http", "amqp", "sqs-json", "sqs-query"])
def test_what_one_front_publishes_every_front_reads(server, tmp_path, front):
    rnd = random.Random(f"{SEED}-{front}")
    queues = [f"{front}-to-{reader}" for reader in READERS]
    with chute.Client(server.url) as native:
        for queue in queues:
            native.create_queue(queue)
    if front == "http":
        sent = publish_http(server, rnd, queues)
    elif front == "amqp":
        sent = publish_amqp(server, rnd, queues)
    else:
        client = client_for(server.http_port) if front == "sqs-json" else query_client(
            f"http://127.0.0.1:{server.http_port}", tmp_path)  # fmt: skip
        sent = publish_sqs(client, rnd, queues)
    assert len(sent) > MESSAGES // 2  # most of them were accepted: the readers have something to read
    failures = []
    for reader, queue in zip(READERS, queues, strict=True):
        try:
            check(front, reader, sent, read(server, tmp_path, reader, queue, len(sent)))
        except Exception as exc:  # every reader is tried: the report names each one that failed
            failures.append(f"{reader}: {type(exc).__name__}: {str(exc)[:2000]}")
    assert not failures, "\n".join(failures)


def reject_all(server, rejecter: str, queue: str, count: int) -> None:
    """Dead-letter every message of `queue` through one front: a native nack, an HTTP nack or an AMQP reject."""
    if rejecter == "native":
        with chute.Client(server.url) as client:
            for _ in range(count + 1):
                deliveries = client.receive(queue, 10)
                if not deliveries:
                    return
                client.nack(deliveries, dead_letter=True)
    elif rejecter == "http":
        base = f"http://127.0.0.1:{server.http_port}/api/v1/queues/{queue}"
        for _ in range(count + 1):
            deliveries = requests.post(f"{base}/receive", json={"max_messages": 10}, timeout=30).json()["deliveries"]
            if not deliveries:
                return
            receipts = [delivery["receipt"] for delivery in deliveries]
            answer = requests.post(f"{base}/nack", json={"receipts": receipts, "dead_letter": True}, timeout=30)
            assert answer.status_code == 200, answer.text
    else:
        connection = pika.BlockingConnection(pika.URLParameters(server.amqp_url))
        try:
            channel = connection.channel()
            for _ in range(count + 1):
                method, _, _ = channel.basic_get(queue)
                if method is None:
                    return
                channel.basic_reject(method.delivery_tag, requeue=False)
        finally:
            connection.close()


def await_ready(server, queue: str, count: int) -> None:
    """Wait (bounded) until `count` messages are ready in `queue` (an AMQP rejection republishes them)."""
    with chute.Client(server.url) as client:
        for _ in range(int(WAIT_S * 100)):
            if client.queue_stats(queue).ready >= count:
                return
            client.receive(f"{queue}-never", wait_s=0.01)  # a bounded wait for the broker to move on
        raise AssertionError(f"{queue}: {client.queue_stats(queue).ready} of {count} dead letters arrived")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("rejecter", ["native", "http", "pika"])
def test_dead_letters_rejected_through_one_front_are_read_through_every_front(server, tmp_path, rejecter):
    rnd = random.Random(f"{SEED}-dead-{rejecter}")
    sources = [f"dead-{rejecter}-{reader}" for reader in READERS]
    with chute.Client(server.url) as native:
        for queue in sources:
            native.create_queue(f"{queue}-dlq")
            native.create_queue(queue, dead_letter_queue=f"{queue}-dlq")
            native.create_queue(f"{queue}-dlq-never")
    sent = publish_http(server, rnd, sources)  # hostile headers, any bytes, priorities, subjects
    expected = sorted(sent, key=lambda message: -message.priority)
    failures = []
    for reader, queue in zip(READERS, sources, strict=True):
        try:
            reject_all(server, rejecter, queue, len(sent))
            await_ready(server, f"{queue}-dlq", len(sent))
            got = read(server, tmp_path, reader, f"{queue}-dlq", len(sent))
            bodies = [message.body for message in expected[: 100 if reader == "http-peek" else None]]
            if reader.startswith("sqs"):
                show = xml_shown if reader == "sqs-query" else (lambda text: text)
                bodies = [show(body.decode(errors="replace")) for body in bodies]
            assert [body for body, _ in got] == bodies
            for message, (_, shown) in zip(expected, got, strict=False):
                if reader in ("pika-get", "pika-consume", "aio-pika"):
                    _, table, _ = amqp_view(reader, shown)
                    death = table["x-death"][0]
                    assert (death["queue"], death["reason"], death["count"]) == (queue, "rejected", 1)
                elif reader.startswith(("native", "http")) and rejecter != "pika":  # (moved, not rewritten)
                    assert shown == message.headers
        except Exception as exc:  # every reader is tried: the report names each one that failed
            failures.append(f"{reader}: {type(exc).__name__}: {str(exc)[:2000]}")
    assert not failures, "\n".join(failures)
