"""An empty queue moving to its topic's shard (router.py, `_move_empty_queue`) while clients publish (native and
SQS), receive and ack it through every node: nothing confirmed is lost, nothing acked comes back, and no call is
answered `queue_not_found` (SQS: QueueDoesNotExist) for the queue that exists throughout (a retryable error at
worst). In-process nodes on
StaticNodes (routing_helpers.py), shard s owned by node s % 3."""

from __future__ import annotations

import asyncio

import pytest
import requests

from chute import AsyncClient, Broker
from chute.cluster.placement import Placed, home_shard
from chute.cluster.relay import relay_name
from chute.errors import ChuteError
from tests.cluster.routing_helpers import clients_of, static_cluster
from tests.cluster.test_fanout_relay import broker_of, name_on
from tests.cluster.test_fanout_relay import drain as drain_count

pytestmark = pytest.mark.timeout(60)


class Retryable(str):
    retryable = True


async def test_calls_during_a_queue_move_lose_nothing_and_never_say_not_found():
    # The placement row moved first and the queue was created in the new shard after a round trip: a node that
    # looked the row up in between asked the new shard, which did not hold the queue yet, and answered
    # queue_not_found to a publish (and a receive) of a queue that existed all along.
    async with static_cluster(3, 6, http=True) as (servers, directory):
        a, b, c = [await AsyncClient(s.url, reconnect=False).connect() for s in servers]
        try:
            topic = name_on(lambda s: s == 0, 6, "moves")  # node-0
            queue = name_on(lambda s: s == 1, 6, "mover")  # node-1: it moves the queue
            await a.create_topic(topic)
            await b.create_queue(queue, max_deliveries=4)  # empty: node-0 and node-2 never looked it up
            outcomes: dict[str, object] = {}
            received: list = []
            started: list[asyncio.Task] = []

            async def publish(client, body: bytes) -> None:
                try:
                    await client.publish(queue, body)
                    outcomes[body.decode()] = "confirmed"
                except ChuteError as exc:
                    outcomes[body.decode()] = exc

            def send_sqs(server, body: str) -> None:  # SQS's JSON protocol through `server`'s HTTP port
                endpoint = f"http://127.0.0.1:{server.http_port}"
                answer = requests.post(f"{endpoint}/", json={"QueueUrl": queue, "MessageBody": body}, timeout=30,
                                       headers={"X-Amz-Target": "AmazonSQS.SendMessage",
                                                "Content-Type": "application/x-amz-json-1.0"})  # fmt: skip
                outcomes[body] = "confirmed" if answer.status_code == 200 else \
                    Retryable(answer.text) if answer.status_code in (500, 503) else answer.text  # fmt: skip

            async def receive(client) -> None:
                try:
                    got = await client.receive(queue, 10, wait_s=1.0)
                    await client.ack_receipts(queue, [d.receipt for d in got])
                    received.extend(d.message.body for d in got)
                except ChuteError as exc:
                    outcomes["receive"] = exc

            placement = directory.nodes["node-1"].placement
            moved_row = placement.move

            async def move(*args):
                moved = await moved_row(*args)
                if moved:  # the row names the topic's shard now; the queue is not created there yet
                    await b.publish(queue, b"acked-at-the-old-copy")  # node-1 still serves the old copy
                    got = await b.receive(queue, 1, wait_s=0)
                    await b.ack_receipts(queue, [d.receipt for d in got])
                    assert [d.message.body for d in got] == [b"acked-at-the-old-copy"]
                    await publish(b, b"left-in-the-old-copy")  # carried over to the new copy
                    calls = [publish(a, b"via-node-0"), publish(c, b"via-node-2"), receive(c),
                             asyncio.to_thread(send_sqs, servers[0], "sqs-via-node-0"),
                             asyncio.to_thread(send_sqs, servers[2], "sqs-via-node-2")]  # fmt: skip
                    started.extend(asyncio.ensure_future(call) for call in calls)
                    await asyncio.sleep(0.3)  # they reach the new shard before the queue does
                return moved

            placement.move = move
            await b.subscribe(topic, ">", queue)
            await asyncio.gather(*started)
            await a.publish(topic, b"fanned-out")
            wrong = {k: v for k, v in outcomes.items() if v != "confirmed" and not getattr(v, "retryable", False)}
            assert wrong == {}
            confirmed = sorted(k.encode() for k, v in outcomes.items() if v == "confirmed") + [b"fanned-out"]
            while True:
                got = await a.receive(queue, 10, wait_s=0.5)
                if not got:
                    break
                received += [d.message.body for d in got]
                await a.ack_receipts(queue, [d.receipt for d in got])
            assert sorted(received) == sorted(confirmed)  # each once; the acked one never again
            assert queue in directory.nodes["node-0"].brokers[home_shard(topic, 6)].core.queues
            assert all(queue not in broker.core.queues for broker in directory.nodes["node-1"].brokers.values())
        finally:
            for client in (a, b, c):
                await client.close()


async def test_a_stray_copy_left_by_a_move_cut_short_is_carried_over_when_its_shard_is_served_again():
    # A move cut short (the old shard's node died or handed the shard over between the row's move and the old
    # copy's deletion) left the old copy in the shard's recovered broker: its row named the new shard, but the
    # node serving the old one served the name from that copy, so a publish through it was confirmed where no
    # reader through another node looked, and what the copy held was never carried over.
    async with static_cluster(2, 4) as (servers, directory):
        a, b = [await AsyncClient(s.url, reconnect=False).connect() for s in servers]
        try:
            moved = name_on(lambda s: s == 3, 4, "moved")  # row and new copy on node-1's shard 3
            cut = name_on(lambda s: s == 1, 4, "cut")  # row on shard 1; cut before its new copy was made
            await b.create_queue(moved)
            directory.book[cut] = Placed(cut, "queue", 1)
            old = await Broker.in_memory().start()  # shard 2's broker as node-0 recovers it after the cut
            for name in (moved, cut):
                await old.create_queue(name, max_deliveries=3)
                await old.publish(name, b"held by the old copy")
            await old.publish(moved, b"confirmed through the old shard's node")
            await serve_recovered(directory, "node-0", 2, old)
            got = {name: sorted(await drain(b, name)) for name in (moved, cut)}
            assert got == {moved: [b"confirmed through the old shard's node", b"held by the old copy"],
                           cut: [b"held by the old copy"]}  # fmt: skip
            await _until(lambda: moved not in old.core.queues and cut not in old.core.queues)
            assert directory.nodes["node-1"].brokers[1].core.queues[cut].settings.max_deliveries == 3
            await a.publish(moved, b"through node-0 afterwards")  # reaches the queue readers see
            assert await drain(b, moved) == [b"through node-0 afterwards"]
        finally:
            for client in (a, b):
                await client.close()


async def test_a_stray_copy_still_used_in_its_shard_is_left_with_its_messages_and_an_unused_one_is_carried_over():
    # A stray that a subscription or a queue of its shard feeds is left alone: retiring it would delete the
    # subscription with it, or carry its messages over and then fail to delete it (its shard refuses while a queue
    # dead-letters into it). The sweep looks at a shard's queues in the order they were made, so once the unused
    # stray made after them is gone, the used ones were looked at.
    async with static_cluster(2, 4) as (servers, directory):
        b = await AsyncClient(servers[1].url, reconnect=False).connect()
        try:
            fed, dead, unused = [name_on(lambda s: s == 3, 4, prefix) for prefix in ("fed", "dead", "unused")]
            topic = name_on(lambda s: s == 2, 4, "feeds")  # the old shard's topic and queue that use the strays
            source = name_on(lambda s: s == 2, 4, "source")
            for name in (fed, dead, unused):  # rows and copies on node-1's shard 3
                await b.create_queue(name)
            old = await Broker.in_memory().start()  # shard 2's broker as node-0 recovers it after cut moves
            for name in (fed, dead, unused):
                await old.create_queue(name)
                await old.publish(name, b"held by the old copy")
            await old.create_topic(topic)
            await old.subscribe(topic, ">", fed)
            await old.create_queue(source, dead_letter_queue=dead)
            directory.book[topic] = Placed(topic, "topic", 2)
            directory.book[source] = Placed(source, "queue", 2)
            await serve_recovered(directory, "node-0", 2, old)
            await _until(lambda: unused not in old.core.queues)
            assert await drain(b, unused) == [b"held by the old copy"]
            assert {name: old.queue_stats(name).ready for name in (fed, dead)} == {fed: 1, dead: 1}
            assert (">", fed) in old.core.topics[topic].subscriptions
            assert old.core.queues[source].settings.dead_letter_queue == dead
        finally:
            await b.close()


async def test_a_stray_copy_carried_into_a_full_copy_that_dead_letters_what_it_refuses_is_dead_lettered_once():
    # The copy the row names was full and dead-letters what it refuses (overflow reject-dead-letter): it
    # dead-lettered what the stray held, but the sweep took its refusal for an error and left the stray holding
    # the messages, leased, for the next sweep to carry (and dead-letter) again.
    async with static_cluster(2, 4) as (servers, directory):
        b = await AsyncClient(servers[1].url, reconnect=False).connect()
        try:
            name = name_on(lambda s: s == 3, 4, "full")  # row and new copy on node-1's shard 3
            dlq = name_on(lambda s: s == 3, 4, "refused")
            await b.create_queue(dlq)
            await b.create_queue(name, max_length=1, overflow="reject-dead-letter", dead_letter_queue=dlq)
            await b.publish(name, b"fills the copy")
            old = await Broker.in_memory().start()  # shard 2's broker as node-0 recovers it after a cut move
            await old.create_queue(name)
            await old.publish(name, b"held by the stray")
            await serve_recovered(directory, "node-0", 2, old)
            await _until(lambda: name not in old.core.queues)
            assert await drain(b, dlq) == [b"held by the stray"]
            assert await drain(b, name) == [b"fills the copy"]
        finally:
            await b.close()


async def test_an_empty_queue_fed_by_a_subscription_of_its_shard_stays_and_is_fed_through_a_relay():
    # Moving it to the new topic's shard would delete the old copy, and the subscription of its own shard's topic
    # with it: that topic's publishes would reach it no more.
    async with static_cluster(2, 4) as (servers, directory), clients_of(servers) as (a, b):
        queue = name_on(lambda s: s == 1, 4, "fed")  # node-1
        near = name_on(lambda s: s == 1, 4, "near")  # node-1: feeds the queue in its shard
        far = name_on(lambda s: s == 0, 4, "far")  # node-0
        await b.create_queue(queue)
        await b.create_topic(near)
        await b.subscribe(near, ">", queue)
        await a.create_topic(far)
        info = await a.subscribe(far, ">", queue)  # empty, but fed in its shard: it stays
        assert info.queue == queue
        assert queue in broker_of(directory, queue).core.queues
        assert relay_name(queue) in broker_of(directory, far).core.queues
        await a.publish(near, b"from the topic of its shard")
        await b.publish(far, b"from the topic of the other shard")
        got = await drain_count(b, queue, 2)
        assert sorted(got) == [b"from the topic of its shard", b"from the topic of the other shard"]


async def test_an_empty_dead_letter_queue_of_a_queue_of_its_shard_stays_and_is_fed_through_a_relay():
    # Moving it would delete the old copy, which its shard refuses while a queue dead-letters into it: the move
    # would fail half done (row and new copy made), and the subscribe with it.
    async with static_cluster(2, 4) as (servers, directory), clients_of(servers) as (a, b):
        queue = name_on(lambda s: s == 1, 4, "graves")  # node-1
        source = name_on(lambda s: s == 1, 4, "work")  # node-1: dead-letters into the queue in its shard
        topic = name_on(lambda s: s == 0, 4, "far")  # node-0
        await b.create_queue(queue)
        await b.create_queue(source, dead_letter_queue=queue)
        await a.create_topic(topic)
        info = await b.subscribe(topic, ">", queue)  # empty, but a dead-letter queue in its shard: it stays
        assert info.queue == queue
        assert queue in broker_of(directory, queue).core.queues
        assert relay_name(queue) in broker_of(directory, topic).core.queues
        await a.publish(source, b"dead-lettered")
        await b.nack(await b.receive(source, 1, wait_s=5), dead_letter=True)
        await a.publish(topic, b"from the topic of the other shard")
        got = await drain_count(b, queue, 2)
        assert sorted(got) == [b"dead-lettered", b"from the topic of the other shard"]


async def serve_recovered(directory, node_name: str, shard: int, broker) -> None:
    """`node_name` serves `shard` from `broker` from now on (as if it had recovered the shard's store into it)."""
    node = directory.nodes[node_name]
    await node.drop(shard)
    node.brokers[shard], directory.owners[shard] = broker, node_name
    directory.changed()


async def drain(client, queue: str) -> list[bytes]:
    bodies: list[bytes] = []
    while got := await client.receive(queue, 10, wait_s=2 if not bodies else 0.3):
        bodies += [d.message.body for d in got]
        await client.ack_receipts(queue, [d.receipt for d in got])
    return bodies


async def _until(condition, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.05)
