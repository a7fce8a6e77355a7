"""The clients against a real server over real sockets on 127.0.0.1: every call, limits, disconnects.

The server runs in the test's own event loop (`chute.testing.serving`), except where a test needs to kill it.
"""

from __future__ import annotations

import asyncio
import time

import pytest

import chute
from chute.errors import (
    ConnectionLost,
    InvalidArgument,
    InvalidReceipt,
    MessageTooLarge,
    QueueExists,
    QueueNotFound,
    RequestTimeout,
    SubscriptionNotFound,
    TooManyConnections,
    Unauthenticated,
)
from chute.model import Publish
from chute.testing import running_server, serving

pytestmark = pytest.mark.timeout(60)


async def until_waiting(server, queue: str) -> None:
    """Until a receive (long poll or push consumer) is waiting in the broker for messages of `queue`."""
    async with asyncio.timeout(5):
        while not (server.server.broker._waiters.get(queue) or server.server.broker.dispatcher.watched.get(queue)):
            await asyncio.sleep(0.005)


async def test_manage_queues_topics_and_subscriptions():
    async with serving() as server, chute.AsyncClient(server.url) as client:
        await client.create_queue("jobs-dlq")
        info = await client.create_queue("jobs", lease_s=5, max_deliveries=3, dead_letter_queue="jobs-dlq")
        assert info.settings.lease_s == 5 and info.settings.max_deliveries == 3
        assert (await client.create_queue("jobs", lease_s=5, max_deliveries=3, dead_letter_queue="jobs-dlq")).name
        with pytest.raises(QueueExists):
            await client.create_queue("jobs", lease_s=6)
        with pytest.raises(InvalidArgument):
            await client.create_queue("bad", lease_s=-1)
        updated = await client.update_queue("jobs", lease_s=7)
        assert updated.settings.lease_s == 7
        assert {q.name for q in await client.list_queues()} == {"jobs", "jobs-dlq"}

        await client.create_topic("orders", retention_s=60)
        await client.create_queue("eu")
        sub = await client.subscribe("orders", "orders.*.eu", "eu", filter={"kind": "new"})
        assert (sub.pattern, sub.queue) == ("orders.*.eu", "eu")
        [topic] = await client.list_topics()
        assert topic.name == "orders" and [s.queue for s in topic.subscriptions] == ["eu"]
        await client.publish("orders", b"a", subject="orders.1.eu", headers={"kind": "new"})
        await client.publish("orders", b"b", subject="orders.1.us", headers={"kind": "new"})
        await client.publish("orders", b"c", subject="orders.2.eu", headers={"kind": "old"})
        assert [d.body for d in await client.peek("eu")] == [b"a"]
        changed = await client.update_subscription("orders", "orders.*.eu", "eu", filter={"kind": "old"})
        assert changed.filter == {"kind": {"eq": "old"}}  # the normalized form
        await client.publish("orders", b"d", subject="orders.3.eu", headers={"kind": "new"})  # filtered out now
        await client.publish("orders", b"e", subject="orders.3.eu", headers={"kind": "old"})
        assert [d.body for d in await client.peek("eu")] == [b"a", b"e"]
        with pytest.raises(SubscriptionNotFound):
            await client.update_subscription("orders", "orders.*.us", "eu", filter=None)
        topic = await client.update_topic("orders", retention_s=30, dedup_window_s=10)
        assert (topic.settings.retention_s, topic.settings.dedup_window_s) == (30, 10)
        with pytest.raises(InvalidArgument):
            await client.update_topic("orders", retention_s=-1)
        await client.unsubscribe("orders", "orders.*.eu", "eu")
        with pytest.raises(SubscriptionNotFound):
            await client.unsubscribe("orders", "orders.*.eu", "eu")
        await client.delete_topic("orders")
        assert await client.list_topics() == []

        assert await client.purge_queue("eu") == 2
        await client.delete_queue("eu")
        with pytest.raises(QueueNotFound) as raised:
            await client.queue_stats("eu")
        assert raised.value.code == 2001 and "eu" in raised.value.message


async def test_publish_options_and_batches():
    async with serving() as server, chute.AsyncClient(server.url) as client:
        await client.create_queue("q")
        first = await client.publish("q", b"one", headers={"k": "v"}, priority=5, dedup_id="d1")
        assert await client.publish("q", b"one again", dedup_id="d1") == first  # deduplicated
        ids = await client.publish_batch("q", [b"two", Publish(body=b"three", priority=9)])
        assert len(set(ids)) == 2 and first not in ids
        futures = [client.publish_nowait("q", b"n%d" % i) for i in range(500)]
        await client.flush()
        assert all(f.done() and not f.exception() for f in futures)
        stats = await client.queue_stats("q")
        assert stats.ready == 503 and stats.published == 503
        [top] = await client.receive("q", 1)
        assert (top.body, top.delivery_count) == (b"three", 1)  # priority 9 first
        [second] = await client.receive("q", 1)
        assert (second.body, second.headers, second.message.priority) == (b"one", {"k": "v"}, 5)
        await client.ack([top, second])
        delayed = await client.publish("q", b"later", delay_s=60)
        assert delayed and (await client.queue_stats("q")).delayed == 1


async def test_receive_long_poll_is_released_by_a_publish_from_another_connection():
    async with (
        serving() as server,
        chute.AsyncClient(server.url) as consumer,
        chute.AsyncClient(server.url) as producer,
    ):
        await producer.create_queue("q")
        waiting = asyncio.ensure_future(consumer.receive("q", 10, wait_s=20))
        await until_waiting(server, "q")
        assert not waiting.done()
        await producer.publish("q", b"wake up")
        async with asyncio.timeout(5):
            [delivery] = await waiting
        assert delivery.body == b"wake up"
        assert await consumer.receive("q", 1, wait_s=0.05) == []


async def test_ack_nack_extend_and_redrive():
    async with serving() as server, chute.AsyncClient(server.url) as client:
        await client.create_queue("dlq")
        await client.create_queue("q", max_deliveries=2, dead_letter_queue="dlq", lease_s=30)
        await client.publish_batch("q", [b"a", b"b", b"c"])
        a, b, c = await client.receive("q", 3)
        await client.ack(a)
        with pytest.raises(InvalidReceipt) as raised:
            await client.ack([a, b])  # a is gone, b is acked anyway
        assert raised.value.receipts == [a.receipt]
        await client.extend(c, 120)
        [again] = await client.receive("q", 1) or [None]
        assert again is None  # c is still leased
        await client.nack(c, dead_letter=True)
        [dead] = await client.peek("dlq")
        assert dead.dead_letter_reason == "rejected" and dead.dead_letter_source == "q"
        assert await client.redrive("dlq") == 1
        [back] = await client.receive("q", 1)
        assert back.body == b"c"
        await client.nack(back, delay_s=60)
        assert (await client.queue_stats("q")).delayed == 1


async def test_ack_by_receipt_numbers():
    """Deliveries passed around as plain data (a receipt and a queue name) can still be acked."""
    async with serving() as server, chute.AsyncClient(server.url) as client:
        await client.create_queue("q")
        await client.publish_batch("q", [b"a", b"b"])
        receipts = [d.receipt for d in await client.receive("q", 2)]
        await client.ack_receipts("q", receipts)
        stats = await client.queue_stats("q")
        assert (stats.ready, stats.in_flight, stats.acked) == (0, 0, 2)
        with pytest.raises(InvalidReceipt) as raised:
            await client.ack_receipts("q", [receipts[0], 12345])
        assert sorted(raised.value.receipts) == sorted([receipts[0], 12345])


async def test_push_consumer_keeps_at_most_prefetch_unacked():
    async with serving() as server, chute.AsyncClient(server.url) as client:
        await client.create_queue("q")
        await client.publish_batch("q", [b"%d" % i for i in range(50)])
        consumer = await client.consume("q", prefetch=5)
        got = [await consumer.get(5) for _ in range(5)]
        assert all(got)
        assert await consumer.get(0.3) is None  # no credit: nothing more comes
        assert (await client.queue_stats("q")).in_flight == 5
        await client.ack(got)
        rest = []
        while len(rest) < 45:
            delivery = await consumer.get(5)
            assert delivery is not None
            rest.append(delivery)
            await client.ack(delivery)
        assert sorted(int(d.body) for d in got + rest) == list(range(50))
        await consumer.close()
        stats = await client.queue_stats("q")
        assert (stats.ready, stats.in_flight, stats.acked) == (0, 0, 50)


async def test_consumer_callback_acks_on_return_and_nacks_on_error():
    async with serving() as server, chute.AsyncClient(server.url) as client:
        await client.create_queue("dlq")
        await client.create_queue("q2", max_deliveries=2, dead_letter_queue="dlq")
        await client.publish_batch("q2", [b"ok", b"boom"])
        seen: list[bytes] = []
        done = asyncio.Event()

        async def handle(delivery):
            seen.append(delivery.body)
            if len(seen) >= 3:
                done.set()
            if delivery.body == b"boom":
                raise RuntimeError("handler failed")

        consumer = await client.consume("q2", prefetch=10)
        consumer.run(handle)
        async with asyncio.timeout(10):
            await done.wait()
            while (await client.queue_stats("dlq")).ready < 1:
                await asyncio.sleep(0.01)
        await consumer.close()
        assert seen.count(b"ok") == 1 and seen.count(b"boom") == 2
        assert [d.body for d in await client.peek("dlq")] == [b"boom"]


async def test_a_dropped_connection_releases_its_messages_at_once():
    async with serving() as server, chute.AsyncClient(server.url) as other:
        await other.create_queue("q", lease_s=600)  # leases far longer than the test
        await other.publish_batch("q", [b"1", b"2", b"3"])
        gone = await chute.AsyncClient(server.url, reconnect=False).connect()
        consumer = await gone.consume("q", prefetch=10)
        assert [(await consumer.get(5)).body for _ in range(3)] == [b"1", b"2", b"3"]
        received = await gone.receive("q", 1, wait_s=0)
        assert received == []
        gone._link.transport.abort()  # the process "dies": no cancel, no nack
        async with asyncio.timeout(5):
            got = await other.receive("q", 3, wait_s=5)
            while len(got) < 3:
                got += await other.receive("q", 3 - len(got), wait_s=5)
        assert sorted(d.body for d in got) == [b"1", b"2", b"3"]
        assert all(d.delivery_count == 2 for d in got)
        await gone.close()


async def test_a_consumer_that_disconnects_hands_its_messages_to_another_consumer():
    async with serving() as server, chute.AsyncClient(server.url) as steady:
        await steady.create_queue("q", lease_s=600)
        await steady.publish_batch("q", [b"%d" % i for i in range(20)])
        flaky = await chute.AsyncClient(server.url, reconnect=False).connect()
        first = await flaky.consume("q", prefetch=20)
        assert await first.get(5) is not None
        second = await steady.consume("q", prefetch=20)
        assert await second.get(0.3) is None  # everything is leased to the first consumer
        await flaky.close()
        bodies = set()
        async with asyncio.timeout(5):
            while len(bodies) < 20:
                delivery = await second.get(5)
                bodies.add(delivery.body)
                await steady.ack(delivery)
        assert len(bodies) == 20


async def test_errors_are_the_brokers_with_stable_codes():
    async with serving(max_message_bytes=1000) as server, chute.AsyncClient(server.url) as client:
        await client.create_queue("q")
        with pytest.raises(MessageTooLarge) as raised:
            await client.publish("q", b"x" * 1001)
        assert raised.value.code == 1003 and not raised.value.retryable
        with pytest.raises(QueueNotFound):
            await client.publish("nope", b"x")
        with pytest.raises(QueueNotFound):
            await client.consume("nope")
        with pytest.raises(InvalidArgument):
            await client.publish("q", b"x", priority=12)
        assert (await client.queue_stats("q")).ready == 0  # nothing of the failed calls was stored
        await client.publish("q", b"fine")  # the connection is still good


async def test_deleting_a_queue_ends_its_consumers():
    async with serving() as server, chute.AsyncClient(server.url) as client:
        await client.create_queue("q")
        consumer = await client.consume("q")
        await client.delete_queue("q")
        with pytest.raises(QueueNotFound):
            async with asyncio.timeout(5):
                await consumer.__anext__()


async def test_a_token_is_required_when_configured():
    async with serving(token="s3cret") as server:
        with pytest.raises(Unauthenticated):
            await chute.AsyncClient(server.url).connect()
        with pytest.raises(Unauthenticated):
            await chute.AsyncClient(server.url, token="wrong").connect()
        async with chute.AsyncClient(server.url, token="s3cret") as client:
            await client.create_queue("q")
        host_port = server.url.removeprefix("chute://")
        async with chute.AsyncClient(f"chute://s3cret@{host_port}") as client:
            assert [q.name for q in await client.list_queues()] == ["q"]


async def test_connections_beyond_the_limit_are_refused_and_the_others_keep_working():
    async with serving(max_connections=2) as server:
        async with chute.AsyncClient(server.url) as one, chute.AsyncClient(server.url) as two:
            with pytest.raises(TooManyConnections):
                await chute.AsyncClient(server.url, reconnect=False).connect()
            await one.create_queue("q")
            await two.publish("q", b"x")
        async with chute.AsyncClient(server.url) as three:  # room again
            assert (await three.queue_stats("q")).ready == 1


async def test_five_hundred_concurrent_connections():
    async with serving() as server:
        async with chute.AsyncClient(server.url) as admin:
            await admin.create_queue("q")
        clients = await asyncio.gather(*(chute.AsyncClient(server.url).connect() for _ in range(500)))
        try:
            assert len(server.server.sessions) == 500
            await asyncio.gather(*(c.publish("q", b"%d" % i) for i, c in enumerate(clients)))
            batches = await asyncio.gather(*(c.receive("q", 1, wait_s=5) for c in clients))
            assert sorted(int(b[0].body) for b in batches) == list(range(500))
            await asyncio.gather(*(c.ack(b) for c, b in zip(clients, batches)))
        finally:
            await asyncio.gather(*(c.close() for c in clients))
        async with chute.AsyncClient(server.url) as admin:
            stats = await admin.queue_stats("q")
        assert (stats.acked, stats.ready, stats.in_flight) == (500, 0, 0)


async def test_a_slow_consumer_only_slows_itself():
    """A peer that asks for deliveries but never reads its socket fills its own buffers; the server stops
    sending to it, and everyone else goes on at full speed."""
    from chute.protocol import Connection, Op
    from chute.protocol import messages as m

    async with serving() as server, chute.AsyncClient(server.url) as client:
        await client.create_queue("big")
        await client.create_queue("q")
        body = b"x" * 10_000
        for _ in range(4):
            await client.publish_batch("big", [body] * 500)  # 20 MB the slow peer will never read
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        conn = Connection("client")
        writer.write(conn.hello())
        await writer.drain()
        conn.receive_data(await reader.read(65536))
        writer.write(
            conn.send(Op.CONSUME, m.ConsumeRequest(consumer=1, queue="big", prefetch=10_000), correlation_id=1)
        )
        await writer.drain()
        async with asyncio.timeout(10):
            while not any(not s.writable.is_set() for s in server.server.sessions):
                await asyncio.sleep(0.01)  # wait until its socket buffers are full
        stats = await client.queue_stats("big")
        assert stats.in_flight < 2000 and stats.ready > 0  # the server stopped fetching for it
        for _ in range(20):
            await client.publish_batch("q", [b"y"] * 100)
            got = await client.receive("q", 100, wait_s=1)
            assert len(got) == 100
            await client.ack(got)
        writer.close()
        await writer.wait_closed()


async def test_publishers_wait_above_the_memory_high_water_mark():
    """Publishes held unconfirmed (fsync made to wait) pass the 1 MiB mark: the server stops reading, and once the
    disk answers every publish is confirmed and stored once. (Without the held fsync, whether 20 MB of publishes
    ever sat unconfirmed at once depended on how fast the machine synced: the test flaked on a loaded one.)"""
    from tests.held_fsync import HeldFsync

    async with serving(fsync="always", memory_high_water_bytes=2**20) as server:
        held = HeldFsync(server)
        try:
            async with chute.AsyncClient(server.url) as client:
                await client.create_queue("q")
                body = b"z" * 100_000
                held.hold()
                batches = asyncio.gather(*(client.publish_batch("q", [body] * 5) for _ in range(40)))
                deadline = time.monotonic() + 10
                while server.server.backpressure_pauses == 0:
                    assert time.monotonic() < deadline, "the publishers were never paused"
                    await asyncio.sleep(0.01)
                assert server.server.memory_paused
                assert 2**20 < server.server.publish_bytes < 40 * 500_000  # reading stopped before all arrived
                held.release()
                ids = await asyncio.wait_for(batches, 30)
                assert len({i for batch in ids for i in batch}) == 200
                assert server.server.publish_bytes == 0
                assert not server.server.memory_paused
                assert (await client.queue_stats("q")).ready == 200
        finally:
            held.release()


async def test_a_frame_over_the_limit_is_refused_before_sending():
    async with serving(max_frame_bytes=2**20, max_message_bytes=2**19) as server, chute.AsyncClient(server.url) as c:
        await c.create_queue("q")
        assert c.server_info.max_frame_bytes == 2**20
        ids = await c.publish_batch("q", [b"x" * 400_000] * 4)  # split into frames under the limit
        assert len(ids) == 4


async def test_timeouts_on_every_call():
    """A server that completes the handshake and then never answers: calls end with RequestTimeout."""
    from chute.protocol import Connection
    from chute.protocol import messages as m

    async def mute(reader, writer):
        conn = Connection("server")
        try:
            while data := await reader.read(65536):
                for frame in conn.receive_data(data):
                    if frame.body.__class__ is m.Hello:
                        writer.write(conn.accept(frame.body, server="mute", heartbeat_s=10, max_message_bytes=1000))
        finally:
            writer.close()

    mute_server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = mute_server.sockets[0].getsockname()[1]
    async with mute_server:
        async with chute.AsyncClient(f"chute://127.0.0.1:{port}", timeout=0.2) as client:
            with pytest.raises(RequestTimeout):
                await client.create_queue("q")
            with pytest.raises(RequestTimeout):
                await client.publish("q", b"x")
            with pytest.raises(RequestTimeout):
                await client.receive("q", wait_s=0)
        await asyncio.sleep(0.05)  # let the handler see EOF and close its side


async def test_connecting_to_nothing_fails_fast():
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    with pytest.raises(ConnectionLost):
        await chute.AsyncClient(f"chute://127.0.0.1:{port}", connect_timeout=2).connect()


async def test_a_silent_server_is_detected_by_heartbeats():
    """The server handshakes with a 0.2 s heartbeat, then says nothing: the client gives up on it."""
    from chute.protocol import Connection

    async def silent(reader, writer):
        conn = Connection("server")
        try:
            for frame in conn.receive_data(await reader.read(65536)):
                writer.write(conn.accept(frame.body, server="silent", heartbeat_s=0.2, max_message_bytes=1000))
            await reader.read()  # keep the socket open, never answer
        finally:
            writer.close()

    silent_server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = silent_server.sockets[0].getsockname()[1]
    async with silent_server:
        client = await chute.AsyncClient(f"chute://127.0.0.1:{port}", reconnect=False).connect()
        async with asyncio.timeout(5):
            error = await client._link.lost
        assert isinstance(error, ConnectionLost) and "no frame" in error.message
        await client.close()
        await asyncio.sleep(0.05)  # let the handler see EOF and close its side


async def test_the_client_reconnects_and_resumes_its_consumer(tmp_path):
    data = str(tmp_path / "data")
    async with serving(data) as first:
        port = first.port
        client = await chute.AsyncClient(first.url).connect()
        await client.create_queue("q")
        consumer = await client.consume("q", prefetch=10)
        await client.publish("q", b"before")
        assert (await consumer.get(5)).body == b"before"
    # the server is gone (it stopped gracefully); "before" was delivered but not acked
    async with serving(data, port=port) as second:
        async with chute.AsyncClient(second.url) as producer:
            await producer.publish("q", b"after")
        bodies = set()
        async with asyncio.timeout(15):
            while len(bodies) < 2:
                delivery = await consumer.get(15)
                bodies.add(delivery.body)
                await client.ack(delivery)
        assert bodies == {b"before", b"after"}
        assert client.connections == 2
        await client.close()


async def test_graceful_stop_confirms_what_was_in_flight(tmp_path):
    data = str(tmp_path / "data")
    async with serving(data, fsync="always") as server:
        client = await chute.AsyncClient(server.url, reconnect=False).connect()
        await client.create_queue("q")
        futures = [client.publish_nowait("q", b"%d" % i) for i in range(2000)]
        await asyncio.sleep(0)  # some are on the wire when the stop begins
    confirmed = {i for i, f in enumerate(futures) if f.done() and not f.exception()}
    await client.close()  # what was still gathering is sent, and fails: the connection is gone
    for f in futures:
        if f.done():
            f.exception()  # retrieved: some may have failed with ConnectionLost
    async with serving(data) as again, chute.AsyncClient(again.url) as check:
        stored = {int(d.body) for d in await check.peek("q", 5000)}
    assert confirmed <= stored


async def test_graceful_stop_answers_long_polls_at_once(tmp_path):
    """A RECEIVE waiting 60 s does not hold a stop for the grace period: it is answered [] at once."""
    async with serving(str(tmp_path / "data"), shutdown_grace_s=30.0) as server:
        client = await chute.AsyncClient(server.url, reconnect=False, timeout=60).connect()
        await client.create_queue("idle")
        poll = asyncio.create_task(client.receive("idle", wait_s=60.0))
        await until_waiting(server, "idle")
        loop = asyncio.get_running_loop()
        started = loop.time()
        await server.server.stop()
        assert loop.time() - started < 5.0
        assert await poll == []
        await client.close()


def test_the_blocking_client(chute_server):
    with chute.Client(chute_server.url) as client:
        client.create_queue("jobs")
        ids = client.publish_many("jobs", [b"%d" % i for i in range(100)])
        assert len(set(ids)) == 100
        assert client.publish("jobs", b"last", headers={"a": "b"})
        assert client.queue_stats("jobs").ready == 101
        got = client.receive("jobs", 10)
        client.ack(got)
        consumer = client.consume("jobs", prefetch=20)
        handled = consumer.run(lambda delivery: None, max_messages=91)
        assert handled == 91
        consumer.close()
        stats = client.queue_stats("jobs")
        assert (stats.ready, stats.in_flight, stats.acked) == (0, 0, 101)
        assert consumer.get(0.1) is None


def test_chute_url_from_the_environment(monkeypatch):
    with running_server() as server:
        monkeypatch.setenv("CHUTE_URL", server.url)
        with chute.Client() as client:
            assert client.url == server.url
            client.create_queue("from-env")


async def test_a_dropped_publisher_leaves_the_unconfirmed_bytes_at_zero():
    """A connection closed while its publishes wait for fsync: their bytes stay held until the store is done with
    them, then the server's count of unconfirmed bytes is back to 0 (not below: each is released once)."""
    from tests.held_fsync import HeldFsync

    async with serving(fsync="always") as server:
        held = HeldFsync(server)
        try:
            async with chute.AsyncClient(server.url) as setup:
                await setup.create_queue("q")
            client = chute.AsyncClient(server.url)
            await client.connect()
            held.hold()
            pending = [asyncio.ensure_future(client.publish_batch("q", [b"y" * 1000] * 3)) for _ in range(4)]
            deadline = time.monotonic() + 10
            while server.server.publish_bytes < 12_000:
                assert time.monotonic() < deadline, "the publishes were never counted"
                await asyncio.sleep(0.01)
            await client.close()
            await asyncio.gather(*pending, return_exceptions=True)
            assert server.server.publish_bytes == 12_000  # still unconfirmed: the store has them
        finally:
            held.release()
        deadline = time.monotonic() + 10
        while server.server.publish_bytes != 0:
            assert server.server.publish_bytes > 0, f"released twice: {server.server.publish_bytes}"
            assert time.monotonic() < deadline, "the bytes were never released"
            await asyncio.sleep(0.01)
        async with chute.AsyncClient(server.url) as check:
            assert (await check.queue_stats("q")).ready == 12
