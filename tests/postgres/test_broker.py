"""A broker on the PostgreSQL store, as users run it: `chute.Broker` in-process and `chute serve --store URL` as a
subprocess. What it confirmed comes back after a restart, a checkpoint, a crash of the process (SIGKILL, or its
connections dropped); acked messages do not."""

from __future__ import annotations

import asyncio
import signal

import pytest

import chute
from chute import Broker, Publish
from chute.storage.postgres import PostgresStore
from tests.crash.serve import ServeProcess
from tests.integration.test_serve import assert_one_line_error, run
from tests.postgres.server import unique_name


def _broker(url: str, stream: str, **options) -> Broker:
    return Broker(store=PostgresStore(url, stream=stream), **options)


async def test_a_broker_gets_its_messages_back_after_restarts_checkpoints_and_a_crash(postgres_url):
    stream = unique_name("broker")
    broker = await _broker(postgres_url, stream).start()
    assert not broker.recovery.clean_shutdown  # a first start, as the file store says it
    await broker.create_queue("orders", lease_s=30)
    await broker.create_topic("events")
    await broker.create_queue("audit")
    await broker.subscribe("events", "order.>", "audit")
    ids = await broker.publish_batch("orders", [Publish(body=b"order %d" % i) for i in range(300)])
    await broker.publish("events", b"created", subject="order.created")
    deliveries = await broker.receive("orders", 100)
    await broker.ack("orders", [d.receipt for d in deliveries])
    acked = {d.id for d in deliveries}
    await broker.close()

    broker = await _broker(postgres_url, stream).start()  # a clean restart (the close stored a checkpoint)
    assert broker.recovery.clean_shutdown
    assert broker.queue_stats("orders").ready == 200
    await broker.checkpoint()
    more = await broker.publish_batch("orders", [Publish(body=b"late %d" % i) for i in range(50)])
    broker.store.sever()  # the process dies: no checkpoint, no clean close

    broker = await _broker(postgres_url, stream).start()
    assert not broker.recovery.clean_shutdown
    stored = await broker.peek("orders", 1000)
    assert [d.id for d in stored] == [i for i in ids if i not in acked] + more
    assert stored[0].body == b"order 100" and stored[-1].body == b"late 49"
    assert [d.body for d in await broker.peek("audit", 10)] == [b"created"]
    await broker.close()


async def test_nodes_with_different_names_keep_separate_streams(postgres_url):
    a = await _broker(postgres_url, unique_name("node-a")).start()
    b = await _broker(postgres_url, unique_name("node-b")).start()
    await a.create_queue("q")
    await a.publish("q", b"for a")
    assert "q" not in {q.name for q in b.list_queues()}
    assert b.healthy and a.healthy  # neither fenced the other
    await a.close()
    await b.close()


def _serve(url: str, node: str, tmp_path) -> ServeProcess:
    return ServeProcess(str(tmp_path / "users"), "--store", url, "--node-name", node)


@pytest.mark.timeout(90)
def test_chute_serve_with_a_postgres_store_keeps_messages_across_sigterm_and_sigkill(postgres_url, tmp_path):
    node = unique_name("serve")
    server = _serve(postgres_url, node, tmp_path)
    assert "127.0.0.1" in server.text and "/postgres" in server.text  # where the data is: the database
    with chute.Client(server.url, reconnect=False, timeout=20) as client:
        client.create_queue("jobs")
        client.publish_batch("jobs", [b"job %d" % i for i in range(100)])
    assert server.stop(signal.SIGTERM) == 0

    server = _serve(postgres_url, node, tmp_path)
    with chute.Client(server.url, reconnect=False, timeout=20) as client:
        client.publish_batch("jobs", [b"job %d" % i for i in range(100, 150)])
    server.stop(signal.SIGKILL)  # confirmed means committed: nothing is lost with the process

    server = _serve(postgres_url, node, tmp_path)
    with chute.Client(server.url, reconnect=False, timeout=20) as client:
        bodies = [d.body for d in client.receive("jobs", 200, wait_s=0)]
    assert bodies == [b"job %d" % i for i in range(150)]
    assert server.stop(signal.SIGTERM) == 0


def test_chute_serve_with_an_unreachable_or_wrong_store_is_one_clear_error(tmp_path):
    result = run("--data-dir", str(tmp_path / "d"), "--port", "0", "--http-port", "-1",
                 "--store", "postgresql://chute:hunter2@127.0.0.1:1/chute")  # fmt: skip
    assert_one_line_error(result, code=1, says="in PostgreSQL at 127.0.0.1:1/chute")
    assert "hunter2" not in result.stderr
    result = run("--data-dir", str(tmp_path / "d"), "--port", "0", "--store", "mysql://h/db")
    assert_one_line_error(result, code=1, says="store must be a postgresql:// URL")


async def test_a_broker_whose_stream_was_taken_over_refuses_writes_and_reports_unhealthy(postgres_url):
    """Two brokers started with one node name: the second takes the stream; the first, still running (a node
    that was cut off and came back), can never write to it again, and says so."""
    from chute.errors import StorageFailed, StorageReadOnly

    stream = unique_name("node")
    old = await _broker(postgres_url, stream).start()
    await old.create_queue("q")
    await old.publish("q", b"confirmed by the old owner")
    new = await _broker(postgres_url, stream).start()
    assert [d.body for d in await new.peek("q", 10)] == [b"confirmed by the old owner"]
    with pytest.raises(StorageFailed, match="fenced: stream .* was taken over"):
        await old.publish("q", b"written after the takeover")
    assert not old.healthy and new.healthy
    with pytest.raises(StorageReadOnly):
        await old.publish("q", b"again")
    await new.publish("q", b"the new owner's")
    await old.close()
    await new.close()
    again = await _broker(postgres_url, stream).start()
    assert [d.body for d in await again.peek("q", 10)] == [b"confirmed by the old owner", b"the new owner's"]
    await again.close()


async def test_a_stream_taken_over_sooner_than_the_checkpoint_interval_replays_only_its_last_run(postgres_url):
    """A shard taken over again and again, each time sooner than `checkpoint_interval_s`: each start that replayed
    a tail checkpoints at once, so the next open replays one run's records, not every run's since the first."""
    stream = unique_name("takeover")
    replayed = []
    for round_ in range(5):
        broker = await _broker(postgres_url, stream, checkpoint_interval_s=3600).start()
        replayed.append(broker.recovery.records)
        if round_ == 0:
            await broker.create_queue("q")
        await broker.publish_batch("q", [Publish(body=b"%d-%d" % (round_, i)) for i in range(200)])
        got = await broker.receive("q", 200)
        await broker.ack("q", [d.receipt for d in got])
        if round_:  # the checkpoint the recovery started (the first run recovered nothing)
            await asyncio.wait_for(broker._housekeeping, 30)
            assert broker.checkpoints == 1
        broker.store.sever()  # the node dies: no checkpoint, no clean close
    assert replayed[0] == 0
    assert max(replayed[2:]) <= replayed[1] * 1.2, replayed  # one run's records, not all runs' so far
    broker = await _broker(postgres_url, stream).start()
    assert broker.queue_stats("q").ready == 0
    await broker.close()
