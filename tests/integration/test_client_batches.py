"""Issue 16's client calls against a real server on 127.0.0.1: `get_many` and `len()` of a push consumer,
`ack_nowait` with bounded ACK requests in flight and `flush()`, cancellation and connection loss while acks are in
flight, the fsync policy in `server_info`, `delete_queue` / `delete_topic` with `missing_ok`.
"""

from __future__ import annotations

import asyncio

import pytest

import chute
from chute.errors import BrokerClosed, ConnectionLost, InvalidArgument, InvalidReceipt, QueueNotFound, TopicNotFound
from chute.protocol.messages import AckRequest
from chute.testing import serving

pytestmark = pytest.mark.timeout(60)


async def until(condition, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)


async def received(client, queue: str, count: int) -> list:
    """`count` deliveries of `queue`, leased by one long poll after another."""
    deliveries = []
    while len(deliveries) < count:
        deliveries += await client.receive(queue, count - len(deliveries), wait_s=5)
    return deliveries


# -- get_many and len ----------------------------------------------------------------------------------------------


async def test_get_many_returns_what_is_buffered_at_once():
    async with serving() as server, chute.AsyncClient(server.url) as client:
        await client.create_queue("q")
        async with await client.consume("q", prefetch=10) as consumer:
            assert len(consumer) == 0 and consumer  # an empty consumer is still true
            await client.publish_batch("q", [b"%d" % i for i in range(5)])
            await until(lambda: len(consumer) == 5)
            first = await consumer.get_many(3, timeout=0)
            assert [d.body for d in first] == [b"0", b"1", b"2"] and len(consumer) == 2
            rest = await consumer.get_many(10, timeout=0)
            assert [d.body for d in rest] == [b"3", b"4"] and len(consumer) == 0
            assert await consumer.get_many(10, timeout=0.05) == []
            await consumer.ack(first + rest)
            with pytest.raises(InvalidArgument):
                await consumer.get_many(0)


async def test_get_many_waits_only_for_the_first():
    async with serving() as server, chute.AsyncClient(server.url) as client:
        await client.create_queue("q")
        consumer = await client.consume("q", prefetch=100)
        waiting = asyncio.ensure_future(consumer.get_many(100, timeout=30))
        await until(lambda: server.server.broker.dispatcher.watched.get("q"))
        await client.publish("q", b"only")
        batch = await asyncio.wait_for(waiting, 10)  # one message, long before 30 s
        assert [d.body for d in batch] == [b"only"]
        await consumer.ack(batch)
        await consumer.close()
        assert await consumer.get_many(10, timeout=5) == []  # closed: at once


async def test_a_cancelled_get_many_takes_nothing():
    async with serving() as server, chute.AsyncClient(server.url) as client:
        await client.create_queue("q")
        consumer = await client.consume("q")
        waiting = asyncio.ensure_future(consumer.get_many(10, timeout=30))
        await until(lambda: server.server.broker.dispatcher.watched.get("q"))
        waiting.cancel()
        await client.publish_batch("q", [b"a", b"b"])
        await until(lambda: len(consumer) == 2)
        assert [d.body for d in await consumer.get_many(10)] == [b"a", b"b"]
        await consumer.close()


async def test_readers_waiting_together_are_all_served_and_timed_out_gets_leave_nothing_behind():
    async with serving() as server, chute.AsyncClient(server.url) as client:
        await client.create_queue("q")
        consumer = await client.consume("q", prefetch=100)
        for _ in range(50):  # a poller that finds nothing, again and again
            assert await consumer.get(timeout=0.001) is None
        assert consumer._waiters == []
        readers = [asyncio.ensure_future(consumer.get(timeout=10)) for _ in range(3)]
        await until(lambda: len(consumer._waiters) == 3)
        await client.publish_batch("q", [b"a", b"b", b"c"])
        got = await asyncio.gather(*readers)
        assert sorted(d.body for d in got) == [b"a", b"b", b"c"]
        ending = asyncio.ensure_future(consumer.__anext__())
        await until(lambda: len(consumer._waiters) == 1)
        await consumer.ack(got)
        await consumer.close()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(ending, 5)


def test_the_blocking_consumer_get_many_and_len(chute_server):
    with chute.Client(chute_server.url) as client:
        client.create_queue("q")
        client.publish_many("q", [b"a", b"b", b"c"])
        with client.consume("q", prefetch=10) as consumer:
            batch = consumer.get_many(3, timeout=5)
            while len(batch) < 3:
                batch += consumer.get_many(3 - len(batch), timeout=5)
            assert sorted(d.body for d in batch) == [b"a", b"b", b"c"] and len(consumer) == 0
            futures = [consumer.ack_nowait(d) for d in batch]
            client.flush()
            assert all(f.done() and f.result() is None for f in futures)
        assert client.queue_stats("q").acked == 3


def test_the_blocking_iterator_gives_back_what_it_took_and_did_not_yield(chute_server):
    with chute.Client(chute_server.url) as client:
        client.create_queue("it", lease_s=600)
        client.publish_many("it", [b"%d" % i for i in range(10)])
        consumer = client.consume("it", prefetch=10)
        iterator = iter(consumer)
        first = next(iterator)  # takes all that has arrived in one go, yields one
        iterator.close()  # as a `for` loop left with `break` does
        rest = []
        while len(rest) < 9:
            rest += consumer.get_many(10, timeout=5)
        assert [d.body for d in [first, *rest]] == [b"%d" % i for i in range(10)]  # none lost, in order
        client.ack([first, *rest])
        client.publish_many("it", [b"a", b"b", b"c"])
        while client.queue_stats("it").in_flight < 3:  # the DELIVER frames come before this reply
            pass
        assert len(consumer) == 3
        iterator = iter(consumer)
        delivery = next(iterator)  # takes the three, yields one
        consumer.close()  # closed meanwhile: what the iterator still holds goes back to the queue at once
        iterator.close()
        client.ack(delivery)
        stats = client.queue_stats("it")
        assert (stats.acked, stats.ready, stats.in_flight) == (11, 2, 0)


# -- ack_nowait and flush ------------------------------------------------------------------------------------------


async def test_ack_nowait_keeps_at_most_the_limit_of_ack_requests_in_flight():
    async with serving() as server, chute.AsyncClient(server.url, max_acks_in_flight=2) as client:
        await client.create_queue("q")
        await client.publish_batch("q", [b"%d" % i for i in range(200)])
        deliveries = await received(client, "q", 200)
        sent = []
        request = client._link.request

        def counting(op, payload, *args):
            if isinstance(payload, AckRequest):
                sent.append(len(payload.receipts))
            return request(op, payload, *args)

        client._link.request = counting
        futures = [client.ack_nowait(d) for d in deliveries]
        assert client._acks.in_flight == 2  # the rest wait for an answer
        await client.flush()
        assert all(f.done() and f.exception() is None for f in futures)
        assert sum(sent) == 200 and len(sent) < 200  # batched while requests were in flight
        assert sent[:2] == [1, 1]  # the first two went at once, alone
        stats = await client.queue_stats("q")
        assert (stats.acked, stats.in_flight, stats.ready) == (200, 0, 0)


async def test_an_unknown_receipt_fails_only_its_own_future():
    async with serving() as server, chute.AsyncClient(server.url, max_acks_in_flight=1) as client:
        await client.create_queue("q")
        await client.publish_batch("q", [b"a", b"b"])
        first, second = await received(client, "q", 2)
        done_once = client.ack_nowait(first)  # goes at once
        again = client.ack_nowait(first)  # waits, then shares a request with `second`
        other = client.ack_nowait(second)
        await client.flush()
        assert done_once.result() is None and other.result() is None
        with pytest.raises(InvalidReceipt) as caught:
            again.result()
        assert caught.value.receipts == [first.receipt]
        assert (await client.queue_stats("q")).acked == 2


async def test_an_ack_cancelled_before_it_left_is_withdrawn():
    async with serving() as server, chute.AsyncClient(server.url, max_acks_in_flight=1) as client:
        await client.create_queue("q", lease_s=600)
        await client.publish_batch("q", [b"a", b"b"])
        first, second = await received(client, "q", 2)
        sent = client.ack_nowait(first)
        withdrawn = client.ack_nowait(second)
        withdrawn.cancel()
        await client.flush()
        assert sent.result() is None and withdrawn.cancelled()
        stats = await client.queue_stats("q")
        assert (stats.acked, stats.in_flight) == (1, 1)  # the second is still leased, not acked
        await client.ack(second)  # and can still be acked


async def test_acks_across_queues_share_one_future():
    async with serving() as server, chute.AsyncClient(server.url) as client:
        for name in ("a", "b"):
            await client.create_queue(name)
            await client.publish(name, b"x")
        deliveries = await received(client, "a", 1) + await received(client, "b", 1)
        await client.ack_nowait(deliveries)
        assert [(await client.queue_stats(n)).acked for n in ("a", "b")] == [1, 1]
        assert (await client.ack_nowait([])) is None


async def test_a_killed_connection_fails_the_acks_in_flight_and_the_messages_come_again():
    async with serving() as server, chute.AsyncClient(server.url, max_acks_in_flight=1) as client:
        await client.create_queue("q", lease_s=600)
        await client.publish_batch("q", [b"a", b"b", b"c"])
        deliveries = await received(client, "q", 3)
        in_flight = client.ack_nowait(deliveries[0])
        waiting = client.ack_nowait(deliveries[1:])
        assert client._acks.in_flight == 1
        client._link.transport.abort()  # before any answer could be read
        await client.flush()  # returns: every ack is answered, by an error
        for future in (in_flight, waiting):
            with pytest.raises(ConnectionLost):
                future.result()
        assert client._acks.in_flight == 0 and not client._acks.waiting
        await until(lambda: client.connections == 2)
        again = await client.receive("q", 3, wait_s=5)  # released at once, not after the 600 s lease
        while len(again) < 2:
            again += await client.receive("q", 3, wait_s=5)
        assert {b"b", b"c"} <= {d.body for d in again}  # never acked: delivered again
        assert all(d.delivery_count == 2 for d in again)
        await client.ack(again)


async def test_stopping_the_server_ends_the_acks_in_flight():
    async with serving() as server:
        async with chute.AsyncClient(server.url, max_acks_in_flight=1, reconnect=False, timeout=10) as client:
            await client.create_queue("q")
            await client.publish_batch("q", [b"a", b"b"])
            deliveries = await received(client, "q", 2)
            futures = [client.ack_nowait(d) for d in deliveries]
            await server.server.stop()
            await client.flush()
            for future in futures:  # acked before the stop, or failed: never left pending
                assert future.done() and (future.exception() is None
                                          or isinstance(future.exception(), ConnectionLost | BrokerClosed))  # fmt: skip
        with pytest.raises(BrokerClosed):
            client.ack_nowait(deliveries)


async def test_an_ack_cancelled_after_it_left_still_happens():
    async with serving() as server, chute.AsyncClient(server.url) as client:
        await client.create_queue("q")
        await client.publish("q", b"a")
        [delivery] = await received(client, "q", 1)
        future = client.ack_nowait(delivery)
        assert client._acks.in_flight == 1  # the request left with the call

        async def wait_for_it() -> None:
            await future

        waiter = asyncio.ensure_future(wait_for_it())
        await asyncio.sleep(0)  # the task now awaits the future
        waiter.cancel()  # which cancels the future it awaits too
        await client.flush()
        assert waiter.cancelled() and future.cancelled()
        assert (await client.queue_stats("q")).acked == 1


async def test_flush_waits_for_every_publish_made_before_it():
    async with serving() as server, chute.AsyncClient(server.url) as client:
        await client.create_queue("q")
        alone = client.publish_nowait("q", b"first")  # sent at once: in flight when flush starts
        await client.flush()
        assert alone.done()
        gathered = [client.publish_nowait("q", b"%d" % i, headers={"i": str(i)}) for i in range(2500)]
        await client.flush()
        assert alone.done() and all(f.done() for f in gathered)
        ids = [alone.result()] + [f.result() for f in gathered]
        assert ids == sorted(ids) and len(set(ids)) == 2501
        assert (await client.queue_stats("q")).ready == 2501
        with pytest.raises(InvalidArgument):
            client.publish_nowait("q", "text")


async def test_a_publish_future_cancelled_by_its_caller_is_still_published():
    async with serving() as server, chute.AsyncClient(server.url) as client:
        await client.create_queue("q")
        future = client.publish_nowait("q", b"x")
        future.cancel()
        await client.flush()
        assert [d.body for d in await client.peek("q")] == [b"x"]


# -- server_info and missing_ok ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fsync", ["always", "interval", "never"])
async def test_server_info_reports_the_fsync_policy(fsync):
    async with serving(fsync=fsync) as server, chute.AsyncClient(server.url) as client:
        info = client.server_info
        assert info.fsync == fsync and info.server.startswith("chute/") and info.max_frame_bytes > 0


async def test_delete_with_missing_ok():
    async with serving() as server, chute.AsyncClient(server.url) as client:
        with pytest.raises(QueueNotFound):
            await client.delete_queue("nope")
        with pytest.raises(TopicNotFound):
            await client.delete_topic("nope")
        await client.delete_queue("nope", missing_ok=True)
        await client.delete_topic("nope", missing_ok=True)
        await client.create_queue("q")
        await client.create_topic("t")
        await client.delete_queue("q", missing_ok=True)
        await client.delete_topic("t", missing_ok=True)
        assert await client.list_queues() == [] and await client.list_topics() == []


def test_the_blocking_client_server_info_and_missing_ok(chute_server):
    with chute.Client(chute_server.url) as client:
        assert client.server_info.fsync == chute_server.server.config.fsync
        client.delete_queue("nope", missing_ok=True)
        client.delete_topic("nope", missing_ok=True)
        with pytest.raises(QueueNotFound):
            client.delete_queue("nope")
        with pytest.raises(QueueNotFound):
            client.publish_many("nope", [b"a", b"b"])
        client.create_queue("many")
        assert len(set(client.publish_many("many", [b"%d" % i for i in range(3000)]))) == 3000
