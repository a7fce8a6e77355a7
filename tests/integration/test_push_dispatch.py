"""Push consumers served by the broker's dispatcher (one pass per loop turn for every consumer whose queue gained
messages): many consumers on one connection fed by one multi-destination publish, credit that comes back through
leases that ended rather than acks, and the end of a consumer whose queue is deleted."""

from __future__ import annotations

import pytest

import chute
from chute.errors import QueueNotFound
from chute.testing import serving

pytestmark = pytest.mark.timeout(60)


async def test_a_publish_to_many_queues_reaches_every_consumer_of_one_connection_in_order():
    async with serving() as server, chute.AsyncClient(server.url) as admin, \
            chute.AsyncClient(server.url) as consuming:  # fmt: skip
        names = [f"q{i}" for i in range(200)]
        for name in names:
            await admin.create_queue(name)
        consumers = [await consuming.consume(name, prefetch=2) for name in names]
        for round_ in range(3):  # one request carries a message for every queue, three times
            for name in names:
                admin.publish_nowait(name, f"{name}-{round_}".encode())
        await admin.flush()
        for index, (name, consumer) in enumerate(zip(names, consumers, strict=True)):
            first = [await consumer.get(5) for _ in range(2)]
            if index < 3:
                assert await consumer.get(0.05) is None  # prefetch 2: the third waits for credit
            await consuming.ack(first)
            third = await consumer.get(5)
            assert [d.body for d in [*first, third]] == [f"{name}-{r}".encode() for r in range(3)]
            await consuming.ack(third)
        assert [(await admin.queue_stats(name)).acked for name in names[:5]] == [3] * 5


async def test_a_consumer_out_of_credit_gets_its_messages_again_when_their_leases_end():
    async with serving() as server, chute.AsyncClient(server.url) as client:
        await client.create_queue("q", lease_s=0.3)
        await client.publish_batch("q", [b"a", b"b"])
        consumer = await client.consume("q", prefetch=1)
        first = await consumer.get(5)
        assert (first.body, first.delivery_count) == (b"a", 1)  # never acked: no credit until its lease ends
        again = await consumer.get(5)
        assert (again.body, again.delivery_count) == (b"a", 2)
        await client.ack(again)
        last = await consumer.get(5)
        assert (last.body, last.delivery_count) == (b"b", 1)
        await client.ack(last)
        await consumer.close()


async def test_deleting_the_queue_ends_its_consumers_and_only_theirs():
    async with serving() as server, chute.AsyncClient(server.url) as client:
        await client.create_queue("doomed")
        await client.create_queue("kept")
        doomed = await client.consume("doomed")
        kept = await client.consume("kept")
        await client.delete_queue("doomed")
        with pytest.raises(QueueNotFound):
            await doomed.get(5)
        assert server.server.broker.dispatcher.watched.keys() == {"kept"}
        await client.publish("kept", b"still served")
        assert (await kept.get(5)).body == b"still served"
