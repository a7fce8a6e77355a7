"""Fan-out to queues of other shards (src/chute/cluster/relay.py), with in-process nodes whose shards the test
assigns (routing_helpers.py): a topic's subscriptions to a queue of its own shard and to queues of other nodes'
shards each get every publish once; relay queues stay out of listings and subscriptions name the real queue;
a relay retried with the same messages adds nothing (the dedup ids); unsubscribing drains and removes the relay;
deleting the queue ends its relayed subscriptions; the relay moves with its shard."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from chute import AsyncClient
from chute.cluster import relay as relay_module
from chute.cluster.placement import home_shard
from chute.cluster.relay import PREFIX, relay_name
from chute.errors import InvalidName
from chute.model import Publish
from tests.cluster.routing_helpers import clients_of, static_cluster

pytestmark = pytest.mark.timeout(60)


def name_on(shard_wanted, shards: int, prefix: str) -> str:
    i = 0
    while True:
        name = f"{prefix}-{i}"
        if shard_wanted(home_shard(name, shards)):
            return name
        i += 1


async def drain(client, queue: str, count: int, *, ack: bool = True) -> list[bytes]:
    """Receive until `count` messages came (or 10 s passed without one); then make sure nothing more comes."""
    bodies: list[bytes] = []
    while len(bodies) < count:
        got = await client.receive(queue, 100, wait_s=10)
        if not got:
            break
        bodies += [d.message.body for d in got]
        if ack:
            await client.ack_receipts(queue, [d.receipt for d in got])
    bodies += [d.message.body for d in await client.receive(queue, 100, wait_s=0.3)]
    return bodies


def broker_of(directory, name: str):
    shard = home_shard(name, directory.shards)
    return directory.nodes[directory.owners[shard]].brokers[shard]


def retire_checks(monkeypatch) -> list:
    """The answers of the relays' checks whether their relay queue may go (`_retire_if_unused`, asked by an idle
    relay once a subscription through its queue ended), in order: (relay queue, True if it deleted the queue, False,
    or the error it raised). A test of what stays waits for the first: by then a queue deleted by mistake is gone."""
    answers: list = []
    retire = relay_module._retire_if_unused

    async def recorded(broker, name: str) -> bool:
        try:
            gone = await retire(broker, name)
        except Exception as exc:
            answers.append((name, exc))
            raise
        answers.append((name, gone))
        return gone

    monkeypatch.setattr(relay_module, "_retire_if_unused", recorded)
    return answers


async def test_every_publish_arrives_once_in_a_queue_of_the_topics_shard_and_in_queues_of_other_nodes():
    async with static_cluster(3, 6) as (servers, directory):
        a, b, c = [await AsyncClient(s.url, reconnect=False).connect() for s in servers]
        try:
            topic = name_on(lambda s: s == 0, 6, "events")  # shard 0: node-0
            far = [name_on(lambda s, n=n: s == n, 6, "far") for n in (1, 2)]  # shards of node-1 and node-2
            for queue in far:
                await c.create_queue(queue)
                await c.publish(queue, b"first")  # not empty: it stays in its shard (an empty one would move)
            await a.create_topic(topic)
            await b.subscribe(topic, ">", "near")  # created in the topic's shard
            await c.subscribe(topic, ">", far[0])  # through node-2, which serves neither shard
            info = await a.subscribe(topic, ">", far[1])
            assert info.queue == far[1]
            bodies = [f"m{i}".encode() for i in range(120)]
            for i, body in enumerate(bodies):
                await (a, b, c)[i % 3].publish(topic, body)
            assert await drain(a, "near", len(bodies)) == bodies  # once each, in order
            for client, queue in ((b, far[0]), (c, far[1])):
                assert await drain(client, queue, 1 + len(bodies)) == [b"first", *bodies], queue
            for client in (a, b, c):  # the relay queues are the cluster's: not listed, not named
                assert not [q.name for q in await client.list_queues() if q.name.startswith(PREFIX)]
                subs = next(t for t in await client.list_topics() if t.name == topic).subscriptions
                assert sorted(s.queue for s in subs) == sorted(["near", *far])
            assert relay_name(far[0]) in broker_of(directory, topic).core.queues
            assert servers[0].broker.relays.lag() == {0: 0, 3: 0}  # node-0's shards: everything forwarded
            assert servers[0].broker.relays.relayed == 2 * len(bodies)
            with pytest.raises(InvalidName, match="reserved"):
                await a.create_queue(relay_name("mine"))
        finally:
            for client in (a, b, c):
                await client.close()


async def test_a_relay_repeating_a_batch_adds_no_copy_and_unsubscribing_removes_the_relay():
    async with static_cluster(2, 4) as (servers, directory):
        a, b = [await AsyncClient(s.url, reconnect=False).connect() for s in servers]
        try:
            topic = name_on(lambda s: s % 2 == 0, 4, "topic")  # node-0
            queue = name_on(lambda s: s % 2 == 1, 4, "queue")  # node-1
            await b.create_queue(queue)
            await b.publish(queue, b"first")
            assert len(await b.receive(queue, 1, wait_s=5, lease_s=600)) == 1  # in flight: the queue stays in its shard
            await a.create_topic(topic)
            await a.subscribe(topic, "x.>", queue, filter={"kind": "a"})
            assert relay_name(queue) in broker_of(directory, topic).core.queues
            await b.publish(topic, b"one", subject="x.y", headers={"kind": "a"}, priority=3)
            await b.publish(topic, b"filtered out", subject="x.y", headers={"kind": "b"})
            got = await b.receive(queue, 10, wait_s=10)
            assert [(d.message.body, d.message.headers, d.message.priority) for d in got] == [
                (b"one", {"kind": "a"}, 3)
            ]
            # a relay that crashed after publishing and before acking publishes the batch again, with the same
            # dedup ids (derived from the message's id in the topic's shard): the queue keeps one copy (the
            # copy is stored with the relay's dedup id; a reader sees the publisher's, here none)
            assert got[0].message.dedup_id is None
            relay = relay_name(queue)
            await b.nack(got)
            stored = await broker_of(directory, queue).peek(queue, 10)
            dedup_id = stored[0].message.dedup_id
            got = await b.receive(queue, 1, wait_s=5)
            assert dedup_id is not None and dedup_id.startswith(f"chute.relay:{home_shard(topic, 4)}:")
            await b.ack_receipts(queue, [got[0].receipt])
            again = Publish(body=b"one", dedup_id=dedup_id)
            await servers[0].broker.publish_batch(queue, [again, again])
            assert (await b.queue_stats(queue)).ready == 0
            topic_broker = broker_of(directory, topic)

            await a.unsubscribe(topic, "x.>", queue)
            assert next(t for t in await b.list_topics() if t.name == topic).subscriptions == []
            await _until(lambda: relay not in topic_broker.core.queues)
            await b.publish(topic, b"after", subject="x.y", headers={"kind": "a"})
            await b.publish(queue, b"direct")
            assert await drain(b, queue, 1) == [b"direct"]  # "after" never came: no subscription
        finally:
            for client in (a, b):
                await client.close()


async def test_a_relay_queue_still_feeding_a_subscription_stays_when_another_through_it_ends(monkeypatch):
    answers = retire_checks(monkeypatch)
    async with static_cluster(2, 4) as (servers, directory), clients_of(servers) as (a, b):
        topic = name_on(lambda s: s % 2 == 0, 4, "topic")  # node-0
        queue = name_on(lambda s: s % 2 == 1, 4, "queue")  # node-1
        await b.create_queue(queue)
        await b.publish(queue, b"first")  # not empty: it stays in its shard
        await a.create_topic(topic)
        await a.subscribe(topic, "a.>", queue)
        await a.subscribe(topic, "b.>", queue)  # through the same relay queue
        await a.unsubscribe(topic, "a.>", queue)
        await _until(lambda: answers)  # the relay looked whether its relay queue may go
        assert answers[0] == (relay_name(queue), False)
        assert relay_name(queue) in broker_of(directory, topic).core.queues
        subs = next(t for t in await b.list_topics() if t.name == topic).subscriptions
        assert [(s.pattern, s.queue) for s in subs] == [("b.>", queue)]
        await b.publish(topic, b"through the subscription left", subject="b.x")
        assert await drain(b, queue, 2) == [b"first", b"through the subscription left"]


async def test_subscribing_a_queue_deleted_through_another_node_makes_it_again_as_on_one_broker():
    # A node whose cached placement row still named a queue another node had just deleted looked for it where
    # the row said and answered queue_not_found, where one broker makes the missing queue it subscribes.
    async with static_cluster(2, 4) as (servers, directory), clients_of(servers) as (a, b):
        queue = name_on(lambda s: s % 2 == 0, 4, "gone")  # node-0
        topic = name_on(lambda s: s == 1, 4, "news")  # node-1
        await a.create_queue(queue)
        await b.publish(queue, b"looked up")  # node-1 caches its row
        assert await drain(a, queue, 1) == [b"looked up"]
        await b.create_topic(topic)
        await a.delete_queue(queue)  # node-0 removes the row; node-1's cache still names it
        await b.subscribe(topic, ">", queue)
        await b.publish(topic, b"fanned out")
        assert await drain(a, queue, 1) == [b"fanned out"]
        subs = next(t for t in await a.list_topics() if t.name == topic).subscriptions
        assert [s.queue for s in subs] == [queue]


async def _until(condition, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.05)


async def test_a_dead_letter_queue_in_another_shard_gets_dead_letters_with_their_reason_and_source():
    async with static_cluster(2, 4) as (servers, directory):
        a, b = [await AsyncClient(s.url, reconnect=False).connect() for s in servers]
        try:
            source = name_on(lambda s: s % 2 == 1, 4, "work")  # node-1
            dlq = name_on(lambda s: s % 2 == 0, 4, "dead")  # node-0
            other = name_on(lambda s: s % 2 == 1 and s != home_shard(source, 4), 4, "more")
            await b.create_queue(dlq)
            info = await a.create_queue(source, max_deliveries=2, dead_letter_queue=dlq)  # via node-0
            assert info.settings.dead_letter_queue == dlq  # as the user named it
            await a.create_queue(other)
            info = await a.update_queue(other, dead_letter_queue=dlq)
            assert info.settings.dead_letter_queue == dlq
            listed = {q.name: q.settings.dead_letter_queue for q in await b.list_queues()}
            assert listed == {source: dlq, other: dlq, dlq: None}

            await b.publish(source, b"refused", headers={"k": "v"})
            await a.nack(await a.receive(source, 1, wait_s=5), dead_letter=True)
            await a.publish(source, b"twice")
            for _ in range(2):  # the second delivery given back reaches max_deliveries
                got = await b.receive(source, 1, wait_s=5)
                assert [d.message.body for d in got] == [b"twice"]
                await b.nack(got)
            await a.publish(other, b"tired")
            await b.nack(await b.receive(other, 1, wait_s=5), dead_letter=True)

            dead = []
            while len(dead) < 3:
                got = await b.receive(dlq, 10, wait_s=10)
                assert got, f"only {[d.message.body for d in dead]} were dead-lettered"
                dead += got
            seen = {d.message.body: (d.dead_letter_reason, d.dead_letter_source, d.message.headers) for d in dead}
            assert seen == {
                b"refused": ("rejected", source, {"k": "v"}),
                b"twice": ("max_deliveries", source, {}),
                b"tired": ("rejected", other, {}),
            }
        finally:
            for client in (a, b):
                await client.close()


async def test_one_message_dead_lettered_by_two_queues_of_a_shard_is_two_dead_letters():
    async with static_cluster(2, 4) as (servers, _):
        a, b = [await AsyncClient(s.url, reconnect=False).connect() for s in servers]
        try:
            topic = name_on(lambda s: s == 1, 4, "orders")  # node-1
            dlq = name_on(lambda s: s == 0, 4, "dead")  # node-0
            await a.create_queue(dlq)
            await a.create_topic(topic)
            for queue in ("billing", "shipping"):  # made by the subscriptions, in the topic's shard
                await a.subscribe(topic, ">", queue)
                await a.update_queue(queue, dead_letter_queue=dlq)
            await a.publish(topic, b"order 1")
            for queue in ("billing", "shipping"):
                await b.nack(await b.receive(queue, 1, wait_s=5), dead_letter=True)
            dead = []
            while len(dead) < 2:
                got = await a.receive(dlq, 10, wait_s=10)
                assert got, f"only {len(dead)} dead letters came"
                dead += got
            assert sorted((d.message.body, d.dead_letter_source) for d in dead) == [
                (b"order 1", "billing"),
                (b"order 1", "shipping"),
            ]
        finally:
            for client in (a, b):
                await client.close()


async def test_through_the_http_api_a_subscription_and_dead_letters_cross_shards_too():
    async with static_cluster(2, 4, http=True) as (servers, directory):
        a = await AsyncClient(servers[0].url, reconnect=False).connect()
        try:
            topic = name_on(lambda s: s % 2 == 1, 4, "news")  # node-1
            queue = name_on(lambda s: s % 2 == 0, 4, "inbox")  # node-0
            dlq = name_on(lambda s: s % 2 == 1, 4, "graveyard")  # node-1
            await a.create_queue(dlq)
            await a.create_queue(queue, dead_letter_queue=dlq)
            await a.create_topic(topic)
            base = f"http://127.0.0.1:{servers[0].http_port}/api/v1"  # node-0: the topic's requests go to node-1
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{base}/topics/{topic}/subscriptions", json={"queue": queue}) as answer:
                    assert answer.status == 201, await answer.text()
                    assert (await answer.json())["queue"] == queue
                async with http.get(f"{base}/topics/{topic}/subscriptions") as answer:
                    assert [s["queue"] for s in (await answer.json())["subscriptions"]] == [queue]
                async with http.post(f"{base}/topics/{topic}/messages", json={"body": "hello"}) as answer:
                    assert answer.status in (200, 201), await answer.text()
                got = await a.receive(queue, 1, wait_s=10)
                assert [d.message.body for d in got] == [b"hello"]
                await a.nack(got, dead_letter=True)  # into node-1's dead-letter queue, through a relay on node-0
                receive = {"max_messages": 1, "wait_s": 10}
                async with http.post(f"{base}/queues/{dlq}/receive", json=receive) as answer:  # served by node-1
                    dead = (await answer.json())["deliveries"]
                assert [(m["dead_letter_reason"], m["dead_letter_source"]) for m in dead] == [("rejected", queue)]
                async with http.delete(f"{base}/topics/{topic}/subscriptions",
                                       params={"pattern": ">", "queue": queue}) as answer:  # fmt: skip
                    assert answer.status in (200, 204), await answer.text()
                async with http.get(f"{base}/topics/{topic}/subscriptions") as answer:
                    assert (await answer.json())["subscriptions"] == []
                other = name_on(lambda s: s % 2 == 0, 4, "outbox")  # placed with its dead-letter queue (node-1)
                async with http.put(f"{base}/queues/{other}", json={"dead_letter_queue": dlq}) as answer:
                    assert answer.status == 201, await answer.text()
                    assert (await answer.json())["settings"]["dead_letter_queue"] == dlq
                async with http.patch(f"{base}/queues/{queue}", json={"dead_letter_queue": None}) as answer:
                    assert answer.status == 200, await answer.text()
                async with http.patch(f"{base}/queues/{queue}", json={"dead_letter_queue": dlq}) as answer:
                    assert (await answer.json())["settings"]["dead_letter_queue"] == dlq
        finally:
            await a.close()


async def test_a_relayed_copy_shows_the_publish_time_and_dedup_id_of_the_message_as_one_broker_does():
    # one broker hands out the one stored message everywhere: its publish time and its publisher's dedup id in
    # every subscribed queue, and in a dead-letter queue; a relay's copy is a new message (its own id, the
    # relay's dedup id), but a reader sees the original's time and dedup id
    async with static_cluster(2, 4) as (servers, _):
        a, b = [await AsyncClient(s.url, reconnect=False).connect() for s in servers]
        try:
            topic = name_on(lambda s: s % 2 == 0, 4, "prices")  # node-0
            far = name_on(lambda s: s % 2 == 1, 4, "ticker")  # node-1
            dlq = name_on(lambda s: s % 2 == 0, 4, "graves")  # node-0
            await b.create_queue(dlq)
            await b.create_queue(far, dead_letter_queue=dlq)
            await b.publish(far, b"first")  # not empty: it stays in its shard
            await a.create_topic(topic)
            await a.subscribe(topic, ">", "near")  # in the topic's shard: one broker's behaviour
            await a.subscribe(topic, ">", far)
            # delayed, so the relay copies it well after it was published
            await b.publish(topic, b"tick", dedup_id="tick-1", delay_s=0.3)
            near = (await a.receive("near", 1, wait_s=10))[0].message
            got = await b.receive(far, 2, wait_s=10)
            got += [] if len(got) == 2 else await b.receive(far, 1, wait_s=10)
            copy = next(d for d in got if d.message.body == b"tick")
            assert (copy.message.publish_time, copy.message.dedup_id) == (near.publish_time, "tick-1")
            assert copy.message.headers == {}
            await asyncio.sleep(0.05)
            await b.nack([copy], dead_letter=True)  # to node-0's dead-letter queue, through a relay on node-1
            dead = (await a.receive(dlq, 1, wait_s=10))[0]
            assert (dead.message.body, dead.dead_letter_reason, dead.dead_letter_source) == (b"tick", "rejected", far)
            assert (dead.message.publish_time, dead.message.dedup_id) == (near.publish_time, "tick-1")
            assert dead.message.headers == {}
            # a message published without a dedup id shows none, wherever it was relayed
            await b.publish(topic, b"tock")
            tock = [d for d in await b.receive(far, 1, wait_s=10) if d.message.body == b"tock"]
            assert [d.message.dedup_id for d in tock] == [None]
        finally:
            for client in (a, b):
                await client.close()
