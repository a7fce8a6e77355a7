"""The AMQP front through any node of a cluster: two nodes on one PostgreSQL (in-process Servers with `--store`,
real ClusterNodes, their AMQP listeners on ephemeral ports), pika and kombu against the node that does not own
the queues and exchanges they use, the native client alongside. What a client does through one node is what it
would do on one broker: declarations, bindings, confirms, acks, gets and RabbitMQ's errors."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import kombu
import pika
import pytest
from pika.exceptions import ChannelClosedByBroker, UnroutableError

from chute import AsyncClient
from chute.cluster.placement import home_shard
from chute.server.app import Server
from chute.server.config import ServerConfig
from tests.cluster.inprocess import running_nodes

pytestmark = pytest.mark.timeout(180)
SHARDS = 4


def _config(url: str, name: str, data_dir: str) -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0, http_port=0, amqp_port=0, store=url, node_name=name,
                        shards=SHARDS, cluster_lease_s=4.0, cluster_heartbeat_s=0.3, data_dir=data_dir)  # fmt: skip


@pytest.fixture
async def nodes(postgres_url, tmp_path):
    async with running_nodes(postgres_url, tmp_path, 2, SHARDS, _config) as servers:
        yield servers


def owned_by(server: Server, prefix: str, count: int = 1, *, topic: bool = False, avoid: set | None = None) -> list:
    """`count` names starting with `prefix` whose home shards `server` owns (as an exchange's topic if `topic`),
    each on a different shard if it can, and not on the shards in `avoid`."""
    node = server.broker.node
    mine = {shard for shard in range(SHARDS) if node.local_broker(shard) is not None} - (avoid or set())
    found: dict[int, str] = {}
    i = 0
    while len(found) < min(count, len(mine)) and i < 10_000:
        name = f"{prefix}{i}"
        shard = home_shard(f"exchange.{name}" if topic else name, SHARDS)
        if shard in mine:
            found.setdefault(shard, name)
        i += 1
    names = list(found.values())
    while len(names) < count:  # more names than shards: share them
        names.append(f"{names[0]}-{len(names)}")
    return names


def drained(channel, queue: str) -> list[bytes]:
    """Every body `basic_get` (auto-ack) returns from `queue` until it answers get-empty."""
    got = []
    while True:
        method, _, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return got
        got.append(body)


def dead_letter(channel, queue: str) -> tuple[bytes, dict]:
    """The body and headers of the first message consumed (and acked) from dead-letter queue `queue`, within 10 s."""
    method, properties, body = next(channel.consume(queue, inactivity_timeout=10))
    assert method is not None, "no dead letter within 10 s"
    channel.basic_ack(method.delivery_tag)
    channel.cancel()
    return body, properties.headers


def _url(server: Server) -> str:
    return f"amqp://guest:guest@127.0.0.1:{server.amqp_port}/%2F"


def _shard_of(name: str) -> int:
    return home_shard(name, SHARDS)


async def test_pika_through_the_node_that_owns_nothing_it_uses(nodes):
    a, b = nodes
    exchange = owned_by(a, "ex-", topic=True)[0]
    topic_shard = _shard_of(f"exchange.{exchange}")
    on_a = owned_by(a, "qa-", avoid={topic_shard})[0]  # another shard of node A than the exchange's
    on_b = owned_by(b, "qb-")[0]

    def scenario() -> dict:
        connection = pika.BlockingConnection(pika.URLParameters(_url(b)))
        channel = connection.channel()
        channel.confirm_delivery()
        channel.exchange_declare(exchange, "direct", durable=True)
        for queue, key in ((on_a, "to-a"), (on_b, "to-b")):
            channel.queue_declare(queue, durable=True)
            channel.queue_bind(queue, exchange, routing_key=key)
        for i in range(20):
            channel.basic_publish(exchange, "to-a" if i % 2 == 0 else "to-b", f"m{i}".encode(),
                                  pika.BasicProperties(delivery_mode=2), mandatory=True)  # fmt: skip
        with pytest.raises(UnroutableError):  # confirmed, and returned: nothing is bound with this key
            channel.basic_publish(exchange, "nowhere", b"lost", mandatory=True)
        counts = {q: channel.queue_declare(q, passive=True).method.message_count for q in (on_a, on_b)}
        got: list[bytes] = []

        def on_message(ch, method, properties, body):
            got.append(body)
            ch.basic_ack(method.delivery_tag)
            if len(got) == 10:
                ch.stop_consuming()

        channel.basic_qos(prefetch_count=4)
        channel.basic_consume(on_a, on_message)
        channel.start_consuming()
        gets = []
        while True:
            method, _, body = channel.basic_get(on_b)
            if method is None:
                break
            gets.append((body, method.message_count))
            channel.basic_ack(method.delivery_tag)
        connection.close()
        return {"counts": counts, "consumed": got, "got": gets}

    result = await asyncio.to_thread(scenario)
    assert result["counts"] == {on_a: 10, on_b: 10}
    assert result["consumed"] == [f"m{i}".encode() for i in range(0, 20, 2)]  # in publish order
    assert [body for body, _ in result["got"]] == [f"m{i}".encode() for i in range(1, 20, 2)]
    assert [left for _, left in result["got"]] == list(range(9, -1, -1))  # get-ok's message_count
    async with AsyncClient(a.url) as native:  # the acks reached the owners: nothing left, nothing in flight
        for queue in (on_a, on_b):
            stats = await native.queue_stats(queue)
            assert (stats.ready, stats.in_flight, stats.acked) == (0, 0, 10)
    # the queues went to the exchange's shard (fan-out stays in one shard), whichever node held them
    assert {on_a, on_b} <= set(a.broker.node.local_broker(topic_shard).core.queues)


async def test_an_exchange_declared_through_one_node_is_used_through_the_other(nodes):
    a, b = nodes
    exchange = owned_by(b, "shared-ex-", topic=True)[0]
    queue = owned_by(a, "shared-q-")[0]

    def declare_on_a() -> None:
        connection = pika.BlockingConnection(pika.URLParameters(_url(a)))
        channel = connection.channel()
        channel.exchange_declare(exchange, "topic", durable=True)
        channel.queue_declare(queue, durable=True)
        channel.queue_bind(queue, exchange, routing_key="orders.#")
        connection.close()

    def use_on_b() -> list[bytes]:
        connection = pika.BlockingConnection(pika.URLParameters(_url(b)))
        channel = connection.channel()
        channel.confirm_delivery()
        channel.exchange_declare(exchange, passive=True)
        with pytest.raises(ChannelClosedByBroker) as refused:  # B knows its type: a redeclaration must match
            channel.exchange_declare(exchange, "fanout", durable=True)
        assert refused.value.reply_code == 406
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(exchange, "orders.eu.created", b"routed by the topic's shard", mandatory=True)
        method, _, body = channel.basic_get(queue, auto_ack=True)
        connection.close()
        return [body] if method is not None else []

    await asyncio.to_thread(declare_on_a)
    assert await asyncio.to_thread(use_on_b) == [b"routed by the topic's shard"]


async def test_a_queue_made_with_the_native_client_on_one_node_is_consumed_with_pika_on_the_other(nodes):
    a, b = nodes
    queue = owned_by(a, "native-")[0]
    async with AsyncClient(a.url) as native:
        await native.create_queue(queue, lease_s=60)
        await native.publish_batch(queue, [f"n{i}".encode() for i in range(5)])

        def consume_on_b() -> tuple[int, list[bytes]]:
            connection = pika.BlockingConnection(pika.URLParameters(_url(b)))
            channel = connection.channel()
            count = channel.queue_declare(queue, passive=True).method.message_count
            got: list[bytes] = []
            for method, _, body in channel.consume(queue, inactivity_timeout=10):
                assert method is not None, "nothing came within 10 s"
                got.append(body)
                channel.basic_ack(method.delivery_tag)
                if len(got) == 5:
                    break
            channel.cancel()
            connection.close()
            return count, got

        count, got = await asyncio.to_thread(consume_on_b)
        assert count == 5
        assert got == [f"n{i}".encode() for i in range(5)]
        stats = await native.queue_stats(queue)
        assert (stats.ready, stats.in_flight, stats.acked) == (0, 0, 5)


async def test_errors_through_a_node_are_those_of_one_broker(nodes):
    a, b = nodes
    missing = owned_by(a, "missing-")[0]
    existing = owned_by(a, "exists-")[0]
    async with AsyncClient(a.url) as native:
        await native.create_queue(existing)

    def errors_on_b() -> list[tuple[int, str]]:
        connection = pika.BlockingConnection(pika.URLParameters(_url(b)))
        seen = []
        for action in (lambda ch: ch.queue_declare(missing, passive=True),
                       lambda ch: ch.basic_get(missing),
                       lambda ch: ch.exchange_declare(f"no-such-exchange-{missing}", passive=True),
                       lambda ch: ch.queue_bind(existing, f"no-such-exchange-{missing}", "k")):  # fmt: skip
            channel = connection.channel()
            with pytest.raises(ChannelClosedByBroker) as closed:
                action(channel)
            seen.append((closed.value.reply_code, closed.value.reply_text))
        channel = connection.channel()
        assert channel.queue_declare(existing, passive=True).method.message_count == 0  # the channel works after
        connection.close()
        return seen

    seen = await asyncio.to_thread(errors_on_b)
    assert seen == [
        (404, f"NOT_FOUND - no queue '{missing}' in vhost '/'"),
        (404, f"NOT_FOUND - no queue '{missing}' in vhost '/'"),
        (404, f"NOT_FOUND - no exchange 'no-such-exchange-{missing}' in vhost '/'"),
        (404, f"NOT_FOUND - no exchange 'no-such-exchange-{missing}' in vhost '/'"),
    ]


async def test_kombu_simple_queue_through_the_node_that_does_not_own_it(nodes):
    a, b = nodes
    name = owned_by(a, "kombu-")[0]

    def scenario() -> list:
        with kombu.Connection(_url(b)) as connection:
            queue = connection.SimpleQueue(name)
            for i in range(3):
                queue.put({"n": i})
            received = []
            for _ in range(3):
                message = queue.get(timeout=10)
                received.append(message.payload)
                message.ack()
            with pytest.raises(queue.Empty):
                queue.get(timeout=0.3)
            queue.close()
            return received

    assert await asyncio.to_thread(scenario) == [{"n": 0}, {"n": 1}, {"n": 2}]
    async with AsyncClient(a.url) as native:
        stats = await native.queue_stats(name)
        assert (stats.ready, stats.in_flight, stats.acked) == (0, 0, 3)


async def test_a_rejection_through_the_other_node_dead_letters_with_x_death(nodes):
    a, b = nodes
    dead, source = owned_by(a, "dlq-")[0], f"dl-source-{owned_by(a, 'x')[0]}"

    def scenario():
        connection = pika.BlockingConnection(pika.URLParameters(_url(b)))
        channel = connection.channel()
        channel.confirm_delivery()
        channel.queue_declare(dead, durable=True)  # first: the source is then placed in its shard
        channel.queue_declare(source, durable=True, arguments={"x-dead-letter-exchange": "",
                                                                "x-dead-letter-routing-key": dead})  # fmt: skip
        channel.basic_publish("", source, b"refused", pika.BasicProperties(headers={"k": "v"}))
        for method, _, _ in channel.consume(source, inactivity_timeout=10):
            assert method is not None, "nothing came within 10 s"
            channel.basic_reject(method.delivery_tag, requeue=False)
            break
        channel.cancel()
        got = dead_letter(channel, dead)
        connection.close()
        return got

    body, headers = await asyncio.to_thread(scenario)
    assert body == b"refused" and headers["k"] == "v"
    (death,) = headers["x-death"]
    assert (death["queue"], death["reason"], death["count"]) == (source, "rejected", 1)
    assert headers["x-first-death-reason"] == "rejected"
    assert home_shard(dead, SHARDS) == (await a.broker.placement.lookup(source)).shard  # placed with its DLQ
    stats = await b.broker.queue_stats(source)  # settled through b, on a's shard: counted as a dead letter there
    assert (stats.dead_lettered, stats.nacked, stats.acked) == (1, 1, 0)


async def test_exchange_to_exchange_bindings_made_through_one_node_route_publishes_through_the_other(nodes):
    a, b = nodes
    upstream = owned_by(a, "up-", topic=True)[0]
    downstream = owned_by(b, "down-", topic=True)[0]
    queue = owned_by(a, "e2e-q-")[0]

    def bind_on_a() -> None:
        connection = pika.BlockingConnection(pika.URLParameters(_url(a)))
        channel = connection.channel()
        channel.exchange_declare(upstream, "topic", durable=True)
        channel.exchange_declare(downstream, "fanout", durable=True)
        channel.exchange_bind(downstream, upstream, routing_key="logs.#")
        channel.queue_declare(queue, durable=True)
        channel.queue_bind(queue, downstream)
        connection.close()

    def publish_on_b() -> list[bytes]:
        connection = pika.BlockingConnection(pika.URLParameters(_url(b)))
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(upstream, "logs.app.error", b"followed", mandatory=True)
        with pytest.raises(UnroutableError):
            channel.basic_publish(upstream, "metrics.cpu", b"matches no binding", mandatory=True)
        got = drained(channel, queue)
        connection.close()
        return got

    await asyncio.to_thread(bind_on_a)
    assert await asyncio.to_thread(publish_on_b) == [b"followed"]


async def test_an_alternate_exchange_declared_through_one_node_catches_unroutable_publishes_through_the_other(nodes):
    a, b = nodes
    orders = owned_by(a, "ae-orders-", topic=True)[0]
    unrouted = owned_by(b, "ae-unrouted-", topic=True)[0]  # the alternate lives in another shard
    created, caught = owned_by(a, "ae-created-")[0], owned_by(b, "ae-caught-")[0]

    def declare_on_a() -> None:
        connection = pika.BlockingConnection(pika.URLParameters(_url(a)))
        channel = connection.channel()
        channel.exchange_declare(unrouted, "fanout", durable=True)
        channel.exchange_declare(orders, "direct", durable=True, arguments={"alternate-exchange": unrouted})
        for queue, exchange, key in ((created, orders, "created"), (caught, unrouted, "")):
            channel.queue_declare(queue, durable=True)
            channel.queue_bind(queue, exchange, key)
        connection.close()

    def publish_on_b() -> tuple[list[bytes], list[bytes], tuple]:
        connection = pika.BlockingConnection(pika.URLParameters(_url(b)))
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(orders, "created", b"bound", mandatory=True)
        channel.basic_publish(orders, "paid", b"caught", mandatory=True)  # the alternate routes it: no return
        bound = drained(channel, created)
        method, _, body = channel.basic_get(caught, auto_ack=True)
        connection.close()
        return bound, [body], (method.exchange, method.routing_key)

    await asyncio.to_thread(declare_on_a)
    assert await asyncio.to_thread(publish_on_b) == ([b"bound"], [b"caught"], (orders, "paid"))


async def test_the_empty_routing_key_reaches_only_bindings_matching_no_words_through_the_other_node(nodes):
    a, b = nodes
    logs = owned_by(a, "ek-logs-", topic=True)[0]
    every, single = owned_by(a, "ek-every-")[0], owned_by(b, "ek-single-")[0]

    def scenario() -> tuple[list[bytes], list[bytes]]:
        with pika.BlockingConnection(pika.URLParameters(_url(a))) as connection:
            channel = connection.channel()
            channel.exchange_declare(logs, "topic", durable=True)
            for queue, key in ((every, "#"), (single, "*")):
                channel.queue_declare(queue, durable=True)
                channel.queue_bind(queue, logs, key)
        with pika.BlockingConnection(pika.URLParameters(_url(b))) as connection:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_publish(logs, "", b"no words", mandatory=True)
            channel.basic_publish(logs, "one", b"one word", mandatory=True)
            return drained(channel, every), drained(channel, single)

    assert await asyncio.to_thread(scenario) == ([b"no words", b"one word"], [b"one word"])


async def test_a_consumer_cancelled_during_its_long_poll_of_another_node_leaves_nothing_leased(nodes):
    a, b = nodes
    queue = owned_by(a, "cancelled-")[0]
    async with AsyncClient(a.url) as native:
        await native.create_queue(queue, lease_s=60)

        def consume_then_cancel() -> None:
            connection = pika.BlockingConnection(pika.URLParameters(_url(b)))
            channel = connection.channel()
            tag = channel.basic_consume(queue, lambda *args: None)  # waits on node A for up to a second
            channel.basic_cancel(tag)
            connection.close()

        await asyncio.to_thread(consume_then_cancel)
        await native.publish(queue, b"published while the cancelled poll was still waiting")
        got = await native.receive(queue, 1, wait_s=10)  # released at once, not left leased for a lease
        assert [d.message.body for d in got] == [b"published while the cancelled poll was still waiting"]


async def test_a_native_consumer_stopped_during_its_long_poll_of_another_node_leaves_nothing_leased(nodes):
    """The native protocol's push consumer through a node that does not own the queue polls the owner; stopped
    mid-poll, what the poll leases afterwards is released at once (not hidden for the queue's 60 s lease)."""
    a, b = nodes
    queue = owned_by(a, "native-cancelled-")[0]
    async with AsyncClient(a.url) as native, AsyncClient(b.url) as through_b:
        await native.create_queue(queue, lease_s=60)
        consumer = await through_b.consume(queue, prefetch=10)
        deadline = time.monotonic() + 10
        while not any(c.task is not None for s in b.sessions for c in s.consumers.values()):  # its poll is running
            assert time.monotonic() < deadline, "the consumer never started polling node A"
            await asyncio.sleep(0.01)
        await consumer.close()
        await native.publish(queue, b"published while the stopped poll was still waiting")
        got = await native.receive(queue, 1, wait_s=10)
        assert [d.message.body for d in got] == [b"published while the stopped poll was still waiting"]


async def test_a_celery_worker_on_one_node_runs_tasks_sent_through_the_other(nodes, tmp_path, monkeypatch):
    pytest.importorskip("celery")
    from tests.amqp.test_celery import APP, start_worker, stop

    a, b = nodes
    (tmp_path / "chute_amqp_celery_app.py").write_text(APP)
    results = tmp_path / "results"
    results.mkdir()
    urls = {server: f"amqp://guest:guest@127.0.0.1:{server.amqp_port}//" for server in nodes}
    env = dict(os.environ, TEST_BROKER_URL=urls[b], TEST_RESULTS_DIR=str(results), PYTHONPATH=str(tmp_path))
    monkeypatch.setenv("TEST_BROKER_URL", urls[a])  # this process sends through node A, the worker reads node B
    monkeypatch.setenv("TEST_RESULTS_DIR", str(results))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "chute_amqp_celery_app", raising=False)
    import chute_amqp_celery_app as tasks

    worker, log = start_worker(tmp_path, env, "worker.log")
    try:
        def send_and_wait() -> list[int]:
            handles = [tasks.add.delay(i, i) for i in range(10)]
            return [handle.get(timeout=90) for handle in handles]

        assert await asyncio.to_thread(send_and_wait) == [2 * i for i in range(10)]
        runs = (results / "runs").read_text().split()
        assert sorted(runs) == sorted(f"add-{i}-{i}" for i in range(10))  # each exactly once
    except BaseException:
        print((tmp_path / "worker.log").read_text()[-6000:])
        raise
    finally:
        await asyncio.to_thread(stop, worker)
        log.close()
        tasks.app.pool.force_close_all()
        tasks.app.close()


async def test_typed_headers_bindings_made_through_one_node_route_publishes_through_the_other(nodes):
    a, b = nodes
    exchange = owned_by(a, "typed-ex-", topic=True)[0]
    queue = owned_by(b, "typed-q-")[0]

    def bind_on_a() -> None:
        connection = pika.BlockingConnection(pika.URLParameters(_url(a)))
        channel = connection.channel()
        channel.exchange_declare(exchange, "headers", durable=True)
        channel.queue_declare(queue, durable=True)
        channel.queue_bind(queue, exchange, arguments={"x-match": "all", "level": 3})  # an integer: typed
        connection.close()

    def publish_on_b() -> list[bytes]:
        connection = pika.BlockingConnection(pika.URLParameters(_url(b)))
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(exchange, "", b"level 3", pika.BasicProperties(headers={"level": 3}), mandatory=True)
        with pytest.raises(UnroutableError):
            channel.basic_publish(exchange, "", b"level 4", pika.BasicProperties(headers={"level": 4}),
                                  mandatory=True)  # fmt: skip
        got = drained(channel, queue)
        connection.close()
        return got

    await asyncio.to_thread(bind_on_a)
    assert await asyncio.to_thread(publish_on_b) == [b"level 3"]


async def test_a_dead_letter_relayed_from_another_shard_carries_x_death(nodes):
    """A queue whose dead-letter queue is in another shard (set after both exist, so a relay carries the dead
    letters): a message expired there reaches the dead-letter queue with its x-death entry, as on one broker."""
    a, b = nodes
    dead = owned_by(a, "far-dlq-")[0]
    source = owned_by(b, "far-src-")[0]
    async with AsyncClient(a.url, reconnect=False) as native:
        await native.create_queue(dead)
        await native.create_queue(source)
        await native.update_queue(source, dead_letter_queue=dead)  # a relay queue in the source's shard

    def scenario():
        connection = pika.BlockingConnection(pika.URLParameters(_url(a)))
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("", source, b"too late", pika.BasicProperties(headers={"k": "v"}, expiration="50"))
        got = dead_letter(channel, dead)
        connection.close()
        return got

    body, headers = await asyncio.to_thread(scenario)
    assert body == b"too late" and headers["k"] == "v"
    assert not any(name.startswith("chute-dead-letter") for name in headers)
    (death,) = headers["x-death"]
    assert (death["queue"], death["reason"], death["count"]) == (source, "expired", 1)
    assert headers["x-first-death-reason"] == "expired" and headers["x-first-death-queue"] == source
