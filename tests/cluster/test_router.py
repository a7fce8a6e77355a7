"""The router (ClusterBroker) with three in-process nodes whose shards the test assigns (routing_helpers.py):
native clients through every node see one broker — publish via one node, receive via another, ack via a third;
listings merge every shard; fan-out stays in a topic's shard; forwarded calls are never forwarded again; a shard
without an owner fails retryably, then works once a node takes it."""

from __future__ import annotations

import asyncio

import pytest

from chute import AsyncClient
from chute.cluster.placement import home_shard
from chute.errors import InvalidArgument, QueueNotFound, TopicExists, Unauthenticated, Unavailable
from tests.cluster.routing_helpers import static_cluster

pytestmark = pytest.mark.timeout(60)


async def clients(servers):
    return [await AsyncClient(server.url, reconnect=False).connect() for server in servers]


def names_on_each_shard(shards: int, prefix: str) -> list[str]:
    """One queue name per shard (so a test touches every node)."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < shards:
        name = f"{prefix}-{i}"
        found.setdefault(home_shard(name, shards), name)
        i += 1
    return [found[s] for s in range(shards)]


async def test_publish_via_one_node_receive_via_another_ack_via_a_third():
    async with static_cluster(3, 6) as (servers, directory):
        a, b, c = await clients(servers)
        try:
            for name in names_on_each_shard(6, "jobs"):
                await a.create_queue(name, lease_s=30)
                ids = await a.publish_batch(name, [b"one", b"two"])
                got = await b.receive(name, 2, wait_s=5)
                assert [d.message.body for d in got] == [b"one", b"two"]
                assert [d.message.id for d in got] == ids
                await c.ack_receipts(name, [d.receipt for d in got])
                stats = await a.queue_stats(name)
                assert (stats.ready, stats.in_flight, stats.acked) == (0, 0, 2)
                owner = directory.nodes[directory.owners[home_shard(name, 6)]]
                assert name in owner.brokers[home_shard(name, 6)].core.queues  # it lives in its home shard
        finally:
            for client in (a, b, c):
                await client.close()


async def test_listings_merge_every_shard_from_any_node():
    async with static_cluster(3, 6) as (servers, _):
        a, b, c = await clients(servers)
        try:
            names = names_on_each_shard(6, "listed")
            for name in names:
                await a.create_queue(name)
            await b.create_topic("events")
            for client in (a, b, c):
                assert [q.name for q in await client.list_queues()] == sorted(names)
                assert [t.name for t in await client.list_topics()] == ["events"]
            await c.delete_queue(names[0])
            assert [q.name for q in await a.list_queues()] == sorted(names[1:])
            with pytest.raises(QueueNotFound):
                await b.publish(names[0], b"gone")
            with pytest.raises(TopicExists):  # one namespace across the cluster
                await c.create_queue("events")
        finally:
            for client in (a, b, c):
                await client.close()


async def test_push_consumers_through_a_node_that_does_not_own_the_queue():
    async with static_cluster(3, 6) as (servers, directory):
        a, b, _ = await clients(servers)
        try:
            name = next(n for n in names_on_each_shard(6, "push") if directory.owners[home_shard(n, 6)] != "node-1")
            await a.create_queue(name)
            consumer = await b.consume(name, prefetch=10)
            await a.publish_batch(name, [f"m{i}".encode() for i in range(25)])
            bodies = []
            async for delivery in consumer:
                bodies.append(delivery.message.body)
                await b.ack(delivery)
                if len(bodies) == 25:
                    break
            assert sorted(bodies) == sorted(f"m{i}".encode() for i in range(25))
            await consumer.close()
            assert (await a.queue_stats(name)).acked == 25
        finally:
            await a.close()
            await b.close()


async def test_a_topic_fans_out_to_queues_its_subscriptions_create_in_its_shard():
    async with static_cluster(3, 6) as (servers, directory):
        a, b, c = await clients(servers)
        try:
            await a.create_topic("orders")
            await b.subscribe("orders", "orders.eu.*", "eu-orders")  # queues that do not exist yet
            await c.subscribe("orders", "orders.>", "all-orders")
            await a.publish("orders", b"o1", subject="orders.eu.fr")
            await b.publish("orders", b"o2", subject="orders.us.ny")
            assert [d.message.body for d in await c.receive("eu-orders", 10, wait_s=5)] == [b"o1"]
            assert sorted(d.message.body for d in await a.receive("all-orders", 10, wait_s=5)) == [b"o1", b"o2"]
            shard = home_shard("orders", 6)
            broker = directory.nodes[directory.owners[shard]].brokers[shard]
            assert {"eu-orders", "all-orders"} <= set(broker.core.queues)  # both in the topic's shard
            other = next(n for n in names_on_each_shard(6, "elsewhere") if home_shard(n, 6) != shard)
            await a.create_queue(other)
            await a.publish(other, b"keeps it in its shard")  # an empty one would move, whichever node is asked
            with pytest.raises(InvalidArgument, match="cross-shard subscriptions are not supported"):
                await b.subscribe("orders", ">", other)
        finally:
            for client in (a, b, c):
                await client.close()


async def test_a_shard_without_an_owner_fails_retryably_then_serves_once_taken():
    async with static_cluster(2, 2, wait_owner_s=0.5) as (servers, directory):
        a, b = await clients(servers)
        try:
            name = next(n for n in names_on_each_shard(2, "moving") if home_shard(n, 2) == 1)  # owned by node-1
            await a.create_queue(name)
            await a.publish(name, b"before")
            await directory.nodes["node-1"].drop(1)  # its node is gone: nobody owns shard 1
            with pytest.raises(Unavailable) as caught:
                await a.publish(name, b"during")
            assert caught.value.retryable
            broker = await directory.nodes["node-0"].take(1)  # a takeover (in memory: what it had is gone)
            await broker.create_queue(name)
            await a.publish(name, b"after")
            assert [d.message.body for d in await b.receive(name, 10, wait_s=5)] == [b"after"]
        finally:
            await a.close()
            await b.close()


async def test_a_forwarded_call_is_never_forwarded_again():
    async with static_cluster(2, 2, wait_owner_s=0.3) as (servers, directory):
        name = next(n for n in names_on_each_shard(2, "loop") if home_shard(n, 2) == 1)
        async with AsyncClient(servers[1].url) as owner:
            await owner.create_queue(name)
        # node-0 believes node-1 owns shard 1, but node-1 handed it to nobody: a forwarded call fails there
        directory.owners[1] = "node-1"
        await servers[1].broker.node.brokers.pop(1).close()
        async with AsyncClient(servers[0].url, name="chute-peer node-9") as peer_like:
            with pytest.raises(Unavailable, match="does not own shard 1"):
                await peer_like.publish(name, b"x")
        async with AsyncClient(servers[0].url) as client:
            with pytest.raises(Unavailable):
                await client.publish(name, b"x")
        await asyncio.sleep(0)


async def test_the_router_in_process_consumes_a_queue_of_another_node():
    async with static_cluster(2, 2) as (servers, _):
        name = next(n for n in names_on_each_shard(2, "inproc") if home_shard(n, 2) == 1)  # node-1's shard
        router = servers[0].broker
        await router.create_queue(name)
        await router.publish_batch(name, [b"a", b"b", b"c"])
        async with router.consume(name, prefetch=2) as consumer:
            got = []
            async for delivery in consumer:
                got.append(delivery.message.body)
                await consumer.ack(delivery)
                if len(got) == 3:
                    break
        assert got == [b"a", b"b", b"c"]
        assert (await router.queue_stats(name)).acked == 3


async def test_an_empty_queue_served_by_the_node_asked_moves_to_its_topics_shard_on_subscribe():
    async with static_cluster(2, 4) as (servers, directory):
        topic = next(n for n in names_on_each_shard(4, "topic") if directory.owners[home_shard(n, 4)] == "node-1")
        mine = [n for n in names_on_each_shard(4, "declared") if directory.owners[home_shard(n, 4)] == "node-0"]
        empty, full = mine[0], mine[1]
        async with AsyncClient(servers[0].url) as a, AsyncClient(servers[1].url) as b:
            await a.create_topic(topic)
            await a.create_queue(empty, max_deliveries=7)  # declare, then bind: as AMQP clients do
            await a.create_queue(full)
            await a.publish(full, b"keeps it where it is")
            await a.subscribe(topic, ">", empty)
            await b.publish(topic, b"fanned out")
            got = await b.receive(empty, 5, wait_s=5)
            assert [d.message.body for d in got] == [b"fanned out"]
            shard = home_shard(topic, 4)
            moved = directory.nodes["node-1"].brokers[shard].core.queues[empty]
            assert moved.settings.max_deliveries == 7  # with its settings
            assert all(empty not in broker.core.queues for broker in directory.nodes["node-0"].brokers.values())
            assert [q.name for q in await b.list_queues()].count(empty) == 1
            with pytest.raises(InvalidArgument, match="cross-shard"):  # a queue with messages does not move
                await a.subscribe(topic, ">", full)
            assert [d.message.body for d in await b.receive(full, 5, wait_s=5)] == [b"keeps it where it is"]


async def test_an_empty_queue_of_another_node_moves_to_its_topics_shard_when_its_owner_is_asked_by_the_router():
    async with static_cluster(2, 4) as (servers, directory):
        topic = next(n for n in names_on_each_shard(4, "topic") if directory.owners[home_shard(n, 4)] == "node-1")
        queue = next(n for n in names_on_each_shard(4, "theirs") if directory.owners[home_shard(n, 4)] == "node-0")
        async with AsyncClient(servers[0].url) as a, AsyncClient(servers[1].url) as b:
            await b.create_topic(topic)
            await a.create_queue(queue, max_deliveries=5)
            await b.subscribe(topic, ">", queue)  # asked of node-1; the queue is node-0's: node-0 moves it
            await b.publish(topic, b"fanned out")
            assert [d.message.body for d in await a.receive(queue, 5, wait_s=5)] == [b"fanned out"]
            moved = directory.nodes["node-1"].brokers[home_shard(topic, 4)].core.queues[queue]
            assert moved.settings.max_deliveries == 5
            assert all(queue not in broker.core.queues for broker in directory.nodes["node-0"].brokers.values())


async def test_an_ephemeral_subscription_through_a_node_that_does_not_own_the_topic():
    async with static_cluster(2, 2) as (servers, directory):
        topic = next(n for n in names_on_each_shard(2, "live") if directory.owners[home_shard(n, 2)] == "node-1")
        async with AsyncClient(servers[0].url) as a, AsyncClient(servers[1].url) as b:
            await b.create_topic(topic)
            consumer = await a.subscribe_ephemeral(topic, "ticks.*")
            assert consumer.queue.startswith("~r")
            await b.publish(topic, b"t1", subject="ticks.eu")
            await b.publish(topic, b"other", subject="news.eu")
            await a.publish(topic, b"t2", subject="ticks.us")
            got = [await asyncio.wait_for(consumer.get(), 10) for _ in range(2)]
            assert [d.message.body for d in got] == [b"t1", b"t2"]
            assert all(d.receipt == 0 for d in got)  # at most once: nothing to ack
            owner = directory.nodes["node-1"].brokers[home_shard(topic, 2)]
            assert any(q.ephemeral for q in owner.core.queues.values())
            await consumer.close()
            for _ in range(200):  # the owner's private queue ends with the relay (asynchronously)
                if not any(q.ephemeral for q in owner.core.queues.values()):
                    break
                await asyncio.sleep(0.01)
            assert not any(q.ephemeral for q in owner.core.queues.values())


async def test_with_auth_on_nodes_forward_with_the_clusters_token_and_strangers_are_refused():
    async with static_cluster(2, 2, token="cluster-secret") as (servers, directory):
        name = next(n for n in names_on_each_shard(2, "guarded") if directory.owners[home_shard(n, 2)] == "node-1")
        async with AsyncClient(servers[0].url, token="cluster-secret") as a:
            await a.create_queue(name)  # on node-1, through node-0's peer connection
            await a.publish(name, b"secret")
            assert [d.message.body for d in await a.receive(name, 1, wait_s=5)] == [b"secret"]
        with pytest.raises(Unauthenticated):
            async with AsyncClient(servers[0].url, token="wrong", reconnect=False) as stranger:
                await stranger.publish(name, b"nope")
