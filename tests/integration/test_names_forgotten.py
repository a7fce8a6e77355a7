"""Nothing reachable from a server names a queue, topic, exchange or dedup id that is gone (issue 12: memory
follows what is stored, never what passed through).

Queues come and go all day: an RPC client's reply queue per connection, an ephemeral subscription per consumer,
Celery's queues, tests. A table that keeps a name after its queue is deleted grows with that churn forever, a
few hundred bytes at a time, which no per-message test sees (the AMQP front had two such tables). So this test
churns names through every front with its real client (native, HTTP API, SQS, AMQP), then walks everything
reachable from the `Server` object, on the server's own loop (where nothing changes under the walk), for any
string that still contains the churned names' marker, and reports the path to it. The same walk looks for the
ids (ints) of acked messages (through the native protocol, AMQP and SQS), their receipts, and SQS's MessageIds
and receipt handles: none may stay reachable once acked or deleted (the core's packed per-message columns are
not looked into; tests/unit/test_flat_memory.py measures those).

The recent-messages cache (bounded; its messages carry their dedup ids) is emptied first and the timer heap
compacted to its live timers (a stale dedup sweep keeps its window until it fires)."""

from __future__ import annotations

import collections
import gc
import json
import logging
import types
import urllib.request

import pika
import pytest

import chute
from chute.server.sqs.messages import chute_id_of
from chute.testing import running_server
from tests.server_loop import compact_timers, on_server_loop
from tests.sqs.boto3_support import client_for

pytestmark = pytest.mark.timeout(120)

MARKER = "zqchurn"
# Not followed: the program (types, modules, functions, code), values that hold no names, and log handlers (the
# records pytest keeps of the log are its output, not a server's state)
_OPAQUE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.CodeType, types.FrameType,
           types.MethodType, bytes, bytearray, memoryview, int, float, logging.Handler)  # fmt: skip


def paths_to_marker(root: object, marker: str | None, limit: int = 20, values: frozenset = frozenset()) -> list[str]:
    """Breadth-first over the objects reachable from `root` (dict keys and values, attributes, slots and struct
    fields, and whatever else the collector says an object refers to): the paths to strings containing
    `marker`, and to ints and strings in `values`. Modules, classes and functions are not followed (they are the
    program, not its state), nor bytes and arrays (an int packed in them is not seen)."""
    seen, found = {id(root)}, []
    pending = collections.deque([(root, "server")])
    while pending and len(found) < limit:
        value, path = pending.popleft()
        if isinstance(value, str):
            if (marker is not None and marker in value) or value in values:
                found.append(path)
            continue
        if type(value) is int:
            if value in values:
                found.append(path)
            continue
        if isinstance(value, _OPAQUE):
            continue
        children: list[tuple[object, str]] = []
        if isinstance(value, dict):
            for key, item in value.items():
                children += [(key, f"{path}[key {str(key)[:40]}]"), (item, f"{path}[{str(key)[:40]}]")]
        else:
            fields = getattr(type(value), "__struct_fields__", None) or ()
            children += [(getattr(value, field, None), f"{path}.{field}") for field in fields]
            for cls in type(value).__mro__:
                for field in getattr(cls, "__slots__", ()):
                    if isinstance(field, str) and hasattr(value, field):
                        children.append((getattr(value, field), f"{path}.{field}"))
            if isinstance(getattr(value, "__dict__", None), dict):
                children += [(item, f"{path}.{key}") for key, item in vars(value).items()]
        try:
            children += [(child, f"{path}/{type(child).__name__}") for child in gc.get_referents(value)]
        except Exception:  # an object whose referents cannot be listed: its fields were taken above
            pass
        for child, child_path in children:
            if id(child) not in seen:
                seen.add(id(child))
                pending.append((child, child_path))
    return found


def _settle_and_scan(server, marker: str | None = MARKER, values: frozenset = frozenset()) -> list[str]:
    core = server.server.broker.core

    def settle_and_scan() -> list[str]:
        core.recent.clear()
        compact_timers(core)
        return paths_to_marker(server.server, marker, values=values)

    return on_server_loop(server, settle_and_scan)


def _native(server, i: int) -> None:
    queue, topic = f"{MARKER}-nq{i}", f"{MARKER}-nt{i}"
    with chute.Client(server.url) as client:
        client.create_queue(queue, dedup_window_s=0.5)
        client.create_topic(topic)
        client.subscribe(topic, ">", queue)
        client.publish(topic, b"fanned out")
        client.publish(queue, b"deduplicated", dedup_id=f"{MARKER}-dedup{i}")
        with client.consume(queue) as consumer:
            got: list = []
            while len(got) < 2:
                batch = consumer.get_many(10, timeout=10)
                assert batch, f"{len(got)} of 2 delivered"
                got += batch
            consumer.ack(got)
        with client.subscribe_ephemeral(topic, ">") as ephemeral:  # a temporary queue of the connection
            client.publish(topic, b"to the ephemeral subscription")
            assert ephemeral.get(timeout=10) is not None
        client.unsubscribe(topic, ">", queue)
        client.delete_topic(topic)
        client.delete_queue(queue)


def _http(server, i: int) -> None:
    base = f"{server.http_url}/api/v1/queues/{MARKER}-hq{i}"
    for method, path, body in (("PUT", "", {}), ("POST", "/messages", {"body": "b"}), ("GET", "/stats", None),
                               ("POST", "/purge", {}), ("DELETE", "", None)):  # fmt: skip
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        urllib.request.urlopen(request, timeout=10).close()


def _sqs(server, i: int) -> None:
    sqs = client_for(server.http_port)
    try:
        for name, attributes in ((f"{MARKER}-sq{i}", {}), (f"{MARKER}-sf{i}.fifo", {"FifoQueue": "true"})):
            url = sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
            extra = {"MessageGroupId": "g", "MessageDeduplicationId": f"{MARKER}-{i}"} if attributes else {}
            sqs.send_message(QueueUrl=url, MessageBody="m", **extra)
            for message in sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", []):
                sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
            sqs.purge_queue(QueueUrl=url)
            sqs.delete_queue(QueueUrl=url)
    finally:
        sqs.close()


def _amqp(server, i: int) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(server.amqp_url))
    try:
        channel = connection.channel()
        queue, exchange = f"{MARKER}-aq{i}", f"{MARKER}-ax{i}"
        channel.exchange_declare(exchange, "topic")
        channel.queue_declare(queue, arguments={"x-dead-letter-exchange": f"{MARKER}-nowhere", "x-expires": 60_000})
        channel.queue_bind(queue, exchange, routing_key="#")
        channel.basic_publish(exchange, "k", b"m", pika.BasicProperties(message_id=f"{MARKER}-id{i}"))
        method, _, _ = channel.basic_get(queue)
        assert method is not None
        channel.basic_reject(method.delivery_tag, requeue=False)
        tag = channel.basic_consume(queue, lambda *a: None)
        channel.basic_cancel(tag)
        channel.exchange_delete(exchange)
        channel.queue_delete(queue)
    finally:
        connection.close()


def test_no_name_of_what_is_gone_stays_reachable_from_the_server():
    with running_server(fsync="always") as server:
        for i in range(3):
            for front in (_native, _http, _sqs, _amqp):
                front(server, i)
            urllib.request.urlopen(f"{server.http_url}/metrics", timeout=10).close()  # labels of the queues
            urllib.request.urlopen(f"{server.http_url}/api/v1/queues", timeout=10).close()
        assert not [name for name in server.server.broker.core.queues if MARKER in name]
        assert _settle_and_scan(server) == []


def test_the_walk_finds_the_names_of_what_exists():
    """The walk reaches each front's tables: with the queues not deleted, it finds their names."""
    with running_server() as server:
        with chute.Client(server.url) as client:
            client.create_queue(f"{MARKER}-kept")
        connection = pika.BlockingConnection(pika.URLParameters(server.amqp_url))
        try:
            connection.channel().queue_declare(f"{MARKER}-amqp", arguments={"x-dead-letter-exchange": "x"})
            paths = _settle_and_scan(server)
        finally:
            connection.close()
    assert any(".core.queues[key" in path and "-kept" in path for path in paths), paths
    assert any(path.startswith("server.amqp.") for path in paths), paths


def test_no_id_of_an_acked_message_stays_reachable_from_the_server():
    """Message ids (ints, where names are strings) the same way: once acked, the ids and receipts of messages
    published to a queue and fanned out by a topic, delivered, nacked, redelivered, and acked, are reachable from
    nothing; the id of a message still leased is found (the walk reaches where a delivery in flight keeps it)."""
    with running_server(fsync="always") as server, chute.Client(server.url) as client:
        client.create_queue("ids-q")
        client.create_topic("ids-t")
        for queue in ("ids-s1", "ids-s2"):
            client.create_queue(queue)
            client.subscribe("ids-t", ">", queue)
        client.publish_batch("ids-q", [b"p2p"] * 20)
        client.publish_batch("ids-t", [b"fanned out"] * 20)
        acked: set[int] = set()
        for queue in ("ids-q", "ids-s1", "ids-s2"):
            first = _received(client, queue, 20)
            client.nack(first[:5])  # redelivered, then acked with the rest
            client.ack(first[5:])
            again = _received(client, queue, 5)
            client.ack(again)
            acked |= {d.message.id for d in first + again} | {d.receipt for d in first + again}
        assert len(acked) == 40 + 60 + 15  # ids; receipts of the first deliveries and of the redeliveries
        client.publish("ids-q", b"leased")  # (also the id generator's latest: not one of the acked)
        (leased,) = _received(client, "ids-q", 1)
        # (the first receipt of a run is the receipt counter's base, a constant of the run)
        assert [p for p in _settle_and_scan(server, None, frozenset(acked)) if not p.endswith(".receipt_base")] == []
        paths = _settle_and_scan(server, None, frozenset({leased.message.id}))
        assert any(not path.endswith(".ids.last") for path in paths), paths


def test_no_id_of_a_message_acked_over_amqp_stays_reachable():
    """Through AMQP (pika): the ids of messages got, rejected back to the queue, got again and acked (each
    delivery's `message_id`, which the broker sets to its id), and the broker receipts their delivery tags stood
    for, are reachable from nothing; the id and receipt of a message got and not yet acked are found."""
    with running_server(fsync="always") as server:
        connection = pika.BlockingConnection(pika.URLParameters(server.amqp_url))
        try:
            channel = connection.channel()
            channel.queue_declare("ids-aq")
            for _ in range(10):
                channel.basic_publish("", "ids-aq", b"m")
            gone: set = set()
            got = [_amqp_got(channel, "ids-aq") for _ in range(10)]
            gone |= _amqp_receipts(server)  # the broker's receipts behind the delivery tags
            for method, _ in got[:3]:
                channel.basic_reject(method.delivery_tag, requeue=True)
            for method, _ in got[3:]:
                channel.basic_ack(method.delivery_tag)
            again = [_amqp_got(channel, "ids-aq") for _ in range(3)]
            gone |= _amqp_receipts(server)
            for method, _ in again:
                channel.basic_ack(method.delivery_tag)
            for _, properties in got + again:
                gone |= {properties.message_id, int(properties.message_id)}
            assert len(gone) == 20 + 13  # ids as strings and ints; a receipt per delivery
            channel.basic_publish("", "ids-aq", b"kept")  # (also the id generator's latest)
            _, kept = _amqp_got(channel, "ids-aq")
            (kept_receipt,) = _amqp_receipts(server)
            # (the first receipt of a run is the receipt counter's base, a constant of the run)
            assert [p for p in _settle_and_scan(server, None, frozenset(gone)) if not p.endswith(".receipt_base")] == []
            paths = _settle_and_scan(server, None, frozenset({int(kept.message_id)}))
            assert any(not path.endswith(".ids.last") for path in paths), paths
            assert _settle_and_scan(server, None, frozenset({kept_receipt}))  # (one path per object: the first)
        finally:
            connection.close()


def _amqp_receipts(server) -> set[int]:
    """The broker receipts every AMQP channel holds for its unacked delivery tags, read on the server's loop."""

    def receipts() -> set[int]:
        return {receipt for session in server.server.amqp.sessions for channel in session.channels.values()
                for _, receipt, _, _, _ in channel.unacked.values()}  # fmt: skip

    return on_server_loop(server, receipts)


def _amqp_got(channel, queue: str) -> tuple:
    for _ in range(100):  # (basic.get does not wait: a publish may not be placed yet)
        method, properties, _ = channel.basic_get(queue)
        if method is not None:
            return method, properties
        channel.connection.sleep(0.05)
    raise AssertionError(f"nothing to get from {queue}")


def test_no_id_or_receipt_handle_of_a_deleted_sqs_message_stays_reachable():
    """Through SQS: the ids, MessageIds and receipt handles of messages received and deleted, on a standard
    queue (each received twice, its first handle gone stale) and a FIFO queue, are reachable from nothing; the id
    of a message received and not deleted is found."""
    with running_server(fsync="always") as server:
        sqs = client_for(server.http_port)
        try:
            gone: set = set()
            for name, attributes in (("ids-sq", {}), ("ids-sf.fifo", {"FifoQueue": "true"})):
                url = sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
                for i in range(10):
                    fifo = {"MessageGroupId": f"g{i}", "MessageDeduplicationId": f"d{i}"} if attributes else {}
                    sqs.send_message(QueueUrl=url, MessageBody=f"m{i}", **fifo)
                # a standard queue's messages visible again at once, received again (their first handles stale)
                messages = [] if attributes else _sqs_received(sqs, url, 10, VisibilityTimeout=0)
                again = _sqs_received(sqs, url, 10)
                for message in again:
                    sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
                for message in messages + again:
                    gone |= {message["MessageId"], message["ReceiptHandle"], chute_id_of(message["MessageId"])}
            url = sqs.create_queue(QueueName="ids-kept")["QueueUrl"]
            sqs.send_message(QueueUrl=url, MessageBody="kept")  # (also the id generator's latest)
            (kept,) = _sqs_received(sqs, url, 1)
        finally:
            sqs.close()
        # (a FIFO queue's dedup window keeps each id for its 5 minutes, as SQS does: stored state, bounded by it)
        left = [p for p in _settle_and_scan(server, None, frozenset(gone)) if ".fifo].dedup.table[" not in p]
        assert left == []
        paths = _settle_and_scan(server, None, frozenset({chute_id_of(kept["MessageId"])}))
        assert any(not path.endswith(".ids.last") for path in paths), paths


def _sqs_received(sqs, url: str, count: int, **options) -> list[dict]:
    got: list[dict] = []
    while len(got) < count:
        batch = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=min(10, count - len(got)), WaitTimeSeconds=5,
                                    **options).get("Messages", [])  # fmt: skip
        assert batch, f"{url}: {len(got)} of {count} received"
        got += batch
    return got


def _received(client, queue: str, count: int) -> list:
    got: list = []
    while len(got) < count:
        batch = client.receive(queue, max_messages=count - len(got), wait_s=10)
        assert batch, f"{queue}: {len(got)} of {count} delivered"
        got += batch
    return got
