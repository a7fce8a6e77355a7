"""Flat memory through the fronts: traffic through a real server's native protocol, HTTP API, SQS API and AMQP
0-9-1 leaves no server-side memory behind once its messages are acked (issue 12, "the servers, the SQS layer,
metrics"; tests/unit/test_flat_memory.py holds the core to the same).

Each test runs rounds of traffic through one front with that front's real client (chute.Client, aiohttp, boto3,
pika): publish, consume, give some back, ack everything, scrape /metrics. After two warm-up rounds (which fill
every bounded cache and size every table for the round's peak), tracemalloc measures what the server's own
modules hold (`chute/` minus the client); four more rounds may not add more than `ALLOWED_BYTES` to it. Those
rounds carry 2,000 messages or more, so a structure kept per message (a receipt map, a seen-id set, a
per-message label) of even 25 bytes a message would exceed it: keeping each ack's receipt list (a test-only patch
of the broker's ack calls) added 98-148 KB in each front's test, where the fronts as they are add -14 to +11 KB,
and no more over 12 rounds than over 4.

What is bounded by a constant by design is shrunk for the test so that the warm-up reaches its bound (the store's
body cache, the recent messages), or settled before each measure: the timer heap keeps up to 4,096 stale timers
(each naming an acked message's entry) before it compacts itself, so it is compacted to its live timers first."""

from __future__ import annotations

import asyncio
import gc
import json
import tracemalloc
import urllib.request
import uuid

import pika
import pytest

import chute
from chute.core import timers
from chute.testing import running_server
from tests.server_loop import compact_timers, on_server_loop
from tests.sqs.boto3_support import client_for

pytestmark = pytest.mark.timeout(240)

WARM_UP, ROUNDS = 2, 4
PER_ROUND = 500  # messages published per round (fan-out and redeliveries add deliveries)
ALLOWED_BYTES = 48 * 1024  # over ROUNDS rounds: what tables resizing and allocator noise may add, not per message


def _shrink_caches(running) -> None:
    broker = running.server.broker
    broker.core.recent.max_count, broker.core.recent.max_bytes = 8, 4 * 1024
    broker.core.store.cache_max_bytes = 64 * 1024


@pytest.fixture(scope="module")
def server():
    with running_server() as running:
        _shrink_caches(running)
        yield running


def _server_side(snapshot: tracemalloc.Snapshot) -> int:
    kept = snapshot.filter_traces([tracemalloc.Filter(True, "*/chute/*"),
                                   tracemalloc.Filter(False, "*/chute/client/*"),
                                   tracemalloc.Filter(False, "*/chute/testing.py")])  # fmt: skip
    return sum(stat.size for stat in kept.statistics("filename"))


def _snapshot(server, settle: bool) -> tracemalloc.Snapshot:
    if settle:
        _scrape(server)
        on_server_loop(server, lambda: compact_timers(server.server.broker.core))
    gc.collect()
    return tracemalloc.take_snapshot()


def _growth(server, one_round, settle: bool = True) -> tuple[int, list[str]]:
    """Run the warm-up, then ROUNDS rounds under tracemalloc; return the server side's growth in bytes over
    those rounds and its largest growing lines (for the failure message). With `settle`, /metrics is scraped
    (its tables are part of what must not grow) and the timer heap compacted to its live timers before each
    measure; without, the server is measured as the rounds left it (what the heap keeps below its threshold
    counts), and no scrape's rendering (100s of KB with hundreds of queues, freed a moment later) is caught
    in flight."""
    for _ in range(WARM_UP):
        one_round()
    tracemalloc.start(1)
    try:
        for _ in range(WARM_UP):  # allocations made before tracing are invisible: trace a warm-up too
            one_round()
        before = _snapshot(server, settle)
        for _ in range(ROUNDS):
            one_round()
        after = _snapshot(server, settle)
    finally:
        tracemalloc.stop()
    growth = _server_side(after) - _server_side(before)
    print(f"server-side growth over {ROUNDS} rounds: {growth} bytes")
    top = [str(stat) for stat in after.compare_to(before, "lineno")[:8] if "/chute/" in str(stat)]
    return growth, top


def _scrape(server) -> None:
    with urllib.request.urlopen(f"{server.http_url}/metrics", timeout=10) as response:
        assert response.status == 200 and b"chute_queue_messages_acked_total" in response.read()


def _assert_nothing_left(server, queues) -> None:
    broker = server.server.broker
    for name in queues:
        stats = broker.queue_stats(name)
        assert (stats.ready, stats.in_flight, stats.delayed) == (0, 0, 0), (name, stats)


def test_the_native_protocol_keeps_nothing_per_message(server):
    prefix = f"n{uuid.uuid4().hex[:6]}"
    queue, topic, subs = f"{prefix}-q", f"{prefix}-t", [f"{prefix}-s{i}" for i in range(2)]
    with chute.Client(server.url) as client:
        client.create_queue(queue, dedup_window_s=0.5)
        client.create_topic(topic)
        for sub in subs:
            client.create_queue(sub)
            client.subscribe(topic, ">", sub)

        def one_round() -> None:
            client.publish_many(queue, [b"x" * 200] * PER_ROUND)
            client.publish_many(topic, [b"y" * 200] * (PER_ROUND // 5))
            for name, count in ((queue, PER_ROUND), *((sub, PER_ROUND // 5) for sub in subs)):
                with client.consume(name, prefetch=100) as consumer:
                    done = 0
                    while done < count:
                        batch = consumer.get_many(100, timeout=10)
                        assert batch, f"{name}: {done} of {count} delivered"
                        given_back = [d for d in batch[:3] if d.delivery_count == 1] if name == queue else []
                        if given_back:
                            consumer.nack(given_back)  # redelivered in this round: a second lease per message
                        consumer.ack([d for d in batch if d not in given_back])
                        done += len(batch) - len(given_back)

        growth, top = _growth(server, one_round)
    _assert_nothing_left(server, [queue, *subs])
    assert growth <= ALLOWED_BYTES, (growth, top)


MANY_QUEUES = 200


def test_push_consumers_on_many_queues_keep_nothing_per_message(monkeypatch):
    """Push consumers on many queues, fed by multi-destination publishes: each dispatcher pass leases from many
    queues under one timer (a (queue id, receipts) pair per queue). Those timers outlived their acked messages
    until their leases ran out (8 MB a round of `chute bench --workload queues`). The heap's compaction threshold
    is shrunk so that what it tolerates is noise here, and the server is measured as the rounds left it (the
    heap not compacted first, as the other tests do): what stays is then what leaks."""
    monkeypatch.setattr(timers, "SLACK", 64)
    with running_server() as server:
        _shrink_caches(server)
        names = [f"m{uuid.uuid4().hex[:6]}-{i}" for i in range(MANY_QUEUES)]
        per_queue = PER_ROUND // MANY_QUEUES + 3

        async def run_round() -> None:
            async with chute.AsyncClient(server.url) as client:
                consumers = [await client.consume(name, prefetch=8, lease_s=300) for name in names]
                sent = [client.publish_nowait(names[i % MANY_QUEUES], b"p" * 200)
                        for i in range(per_queue * MANY_QUEUES)]  # fmt: skip
                await asyncio.gather(*sent)
                for consumer in consumers:
                    done = 0
                    while done < per_queue:
                        batch = await consumer.get_many(per_queue - done, timeout=10)
                        assert batch, f"{consumer}: {done} of {per_queue} delivered"
                        await consumer.ack(batch)
                        done += len(batch)
                    await consumer.close()

        def one_round() -> None:
            asyncio.run(run_round())

        with chute.Client(server.url) as client:
            for name in names:
                client.create_queue(name)
        growth, top = _growth(server, one_round, settle=False)
        _assert_nothing_left(server, names)
    assert growth <= ALLOWED_BYTES, (growth, top)


def test_the_http_api_keeps_nothing_per_message(server):
    queue = f"h{uuid.uuid4().hex[:6]}"
    base = f"{server.http_url}/api/v1/queues/{queue}"

    def call(method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"{}")

    call("PUT", "", {})

    def one_round() -> None:
        for _ in range(PER_ROUND // 100):
            call("POST", "/messages/batch", {"messages": [{"body": "z" * 200} for _ in range(100)]})
        done = 0
        while done < PER_ROUND:
            deliveries = call("POST", "/receive", {"max_messages": 100})["deliveries"]
            assert deliveries, f"{done} of {PER_ROUND} delivered"
            call("POST", "/ack", {"receipts": [d["receipt"] for d in deliveries]})
            done += len(deliveries)

    growth, top = _growth(server, one_round)
    _assert_nothing_left(server, [queue])
    assert growth <= ALLOWED_BYTES, (growth, top)


def test_the_sqs_api_keeps_nothing_per_message(server):
    sqs = client_for(server.http_port)
    name = f"s{uuid.uuid4().hex[:6]}"
    plain = sqs.create_queue(QueueName=name)["QueueUrl"]
    fifo = sqs.create_queue(QueueName=f"{name}.fifo", Attributes={"FifoQueue": "true"})["QueueUrl"]
    # SQS's 5-minute deduplication window would hold every round's ids (stored state, not a leak): shortened
    # through Chute's own API so that each round's ids are forgotten before the next round's
    request = urllib.request.Request(f"{server.http_url}/api/v1/queues/{name}.fifo", method="PATCH",
                                     data=json.dumps({"dedup_window_s": 0.2}).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    urllib.request.urlopen(request, timeout=10).close()
    rounds = iter(range(1_000_000))

    def drain(url: str, count: int) -> None:
        done = batches = 0
        while done < count:
            messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, AttributeNames=["All"])
            messages = messages.get("Messages", [])
            assert messages, f"{url}: {done} of {count} delivered"
            entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)]
            batches += 1
            if batches % 7 == 0:  # visible again at once: received twice, the first receipt lapsed
                for entry in entries:
                    entry["VisibilityTimeout"] = 0
                sqs.change_message_visibility_batch(QueueUrl=url, Entries=entries)
                continue
            assert not sqs.delete_message_batch(QueueUrl=url, Entries=entries).get("Failed")
            done += len(messages)

    def one_round() -> None:
        round_number = next(rounds)
        attributes = {"k": {"DataType": "String", "StringValue": "v"}}
        for _ in range(0, PER_ROUND, 10):
            sqs.send_message_batch(
                QueueUrl=plain,
                Entries=[{"Id": str(i), "MessageBody": "s" * 200, "MessageAttributes": attributes} for i in range(10)],
            )
        for start in range(0, PER_ROUND // 5, 10):
            sqs.send_message_batch(QueueUrl=fifo, Entries=[
                {"Id": str(i), "MessageBody": "f" * 200, "MessageGroupId": f"g{i % 3}",
                 "MessageDeduplicationId": f"{round_number}-{start}-{i}"} for i in range(10)])  # fmt: skip
        drain(plain, PER_ROUND)
        drain(fifo, PER_ROUND // 5)

    try:
        growth, top = _growth(server, one_round)
    finally:
        sqs.close()
    _assert_nothing_left(server, [name, f"{name}.fifo"])
    assert growth <= ALLOWED_BYTES, (growth, top)


def test_amqp_keeps_nothing_per_message(server):
    prefix = f"a{uuid.uuid4().hex[:6]}"
    queue, dlq, exchange = f"{prefix}-q", f"{prefix}-dlq", f"{prefix}-fx"
    subs = [f"{prefix}-s{i}" for i in range(2)]
    connection = pika.BlockingConnection(pika.URLParameters(server.amqp_url))
    channel = connection.channel()
    channel.queue_declare(dlq, durable=True)
    channel.queue_declare(queue, durable=True,
                          arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dlq})  # fmt: skip
    channel.exchange_declare(exchange, "fanout")
    for sub in subs:
        channel.queue_declare(sub, durable=True)
        channel.queue_bind(sub, exchange)
    channel.confirm_delivery()
    channel.basic_qos(prefetch_count=100)

    def drain(name: str, count: int) -> None:
        done, last = 0, None
        for method, _properties, _body in channel.consume(name, inactivity_timeout=10):
            assert method is not None, f"{name}: {done} of {count} delivered"
            if name == queue and method.delivery_tag % 50 == 0 and not method.redelivered:
                channel.basic_nack(method.delivery_tag, requeue=True)  # redelivered later in this drain
                continue
            if name == queue and method.delivery_tag % 97 == 0:
                channel.basic_reject(method.delivery_tag, requeue=False)  # dead-lettered with its x-death
            else:
                last = method.delivery_tag
            done += 1
            if done % 50 == 0 and last is not None:
                channel.basic_ack(last, multiple=True)
                last = None
            if done == count:
                break
        if last is not None:
            channel.basic_ack(last, multiple=True)
        channel.cancel()

    def one_round() -> None:
        for i in range(PER_ROUND):
            properties = pika.BasicProperties(delivery_mode=2, message_id=f"m{i}", correlation_id=str(i),
                                              headers={"n": i})  # fmt: skip
            channel.basic_publish("", queue, b"a" * 200, properties)
            if i % 5 == 0:
                channel.basic_publish(exchange, "", b"b" * 200, properties)
        drain(queue, PER_ROUND)
        for sub in subs:
            drain(sub, PER_ROUND // 5)
        dead = channel.queue_declare(dlq, passive=True).method.message_count
        if dead:
            drain(dlq, dead)

    try:
        growth, top = _growth(server, one_round)
    finally:
        connection.close()
    _assert_nothing_left(server, [queue, dlq, *subs])
    assert growth <= ALLOWED_BYTES, (growth, top)
