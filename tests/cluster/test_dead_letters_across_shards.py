"""A dead-letter queue in another shard than its sources, seen through every front of every node as on one broker:
the HTTP API names the real dead-letter queue and lists its sources; SQS's GetQueueAttributes shows its ARN,
SetQueueAttributes accepts it, ListDeadLetterSourceQueues lists the sources; and deleting it is refused (native,
HTTP, SQS) while a queue of any shard dead-letters into it, then allowed once none does. In-process nodes on
StaticNodes (routing_helpers.py), shard s owned by node s % 2."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from chute import AsyncClient
from chute.cluster.relay import relay_name
from chute.errors import QueueInUse, QueueNotFound, Unavailable
from chute.model import Publish
from tests.cluster.routing_helpers import clients_of, static_cluster
from tests.cluster.test_fanout_relay import _until, broker_of, drain, name_on, retire_checks

pytestmark = pytest.mark.timeout(60)


def sqs(server):
    boto3 = pytest.importorskip("boto3")
    return boto3.client("sqs", endpoint_url=f"http://127.0.0.1:{server.http_port}", region_name="us-east-1",
                        aws_access_key_id="test", aws_secret_access_key="test")  # fmt: skip


async def test_a_dead_letter_queue_of_another_shard_through_every_front():
    async with static_cluster(2, 4, http=True) as (servers, _):
        a, b = [await AsyncClient(s.url, reconnect=False).connect() for s in servers]
        try:
            dlq = name_on(lambda s: s % 2 == 0, 4, "graves")  # node-0
            source = name_on(lambda s: s % 2 == 1, 4, "jobs")  # node-1
            later = name_on(lambda s: s == 3, 4, "later")  # node-1
            await a.create_queue(dlq)
            await b.create_queue(source, max_deliveries=3, dead_letter_queue=dlq)
            await b.create_queue(later)

            for server in servers:  # either node: the real name and the sources of every shard
                base = f"http://127.0.0.1:{server.http_port}/api/v1"
                async with aiohttp.ClientSession() as http:
                    async with http.get(f"{base}/queues/{source}") as answer:
                        assert (await answer.json())["settings"]["dead_letter_queue"] == dlq
                    async with http.get(f"{base}/queues/{dlq}") as answer:
                        assert (await answer.json())["dead_letter_sources"] == [source]
                    async with http.get(f"{base}/queues") as answer:
                        listed = {q["name"]: q for q in (await answer.json())["queues"]}
                        assert listed[dlq]["dead_letter_sources"] == [source]
                        assert listed[source]["settings"]["dead_letter_queue"] == dlq
                    async with http.delete(f"{base}/queues/{dlq}") as answer:
                        assert answer.status == 409, await answer.text()
                        assert "dead-letter queue of" in (await answer.text())
            for client in (a, b):
                with pytest.raises(QueueInUse, match=source):
                    await client.delete_queue(dlq)

            def through_sqs() -> None:
                first, second = sqs(servers[0]), sqs(servers[1])
                dlq_url, source_url, later_url = (first.get_queue_url(QueueName=n)["QueueUrl"]
                                                  for n in (dlq, source, later))  # fmt: skip
                policy = json.loads(second.get_queue_attributes(QueueUrl=source_url, AttributeNames=["RedrivePolicy"])
                                    ["Attributes"]["RedrivePolicy"])  # fmt: skip
                assert policy["deadLetterTargetArn"].endswith(f":{dlq}") and policy["maxReceiveCount"] == 3
                dlq_arn = first.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]
                second.set_queue_attributes(QueueUrl=later_url, Attributes={"RedrivePolicy": json.dumps(
                    {"deadLetterTargetArn": dlq_arn["QueueArn"], "maxReceiveCount": 2})})  # fmt: skip
                policy = json.loads(first.get_queue_attributes(QueueUrl=later_url, AttributeNames=["RedrivePolicy"])
                                    ["Attributes"]["RedrivePolicy"])  # fmt: skip
                assert policy == {"deadLetterTargetArn": dlq_arn["QueueArn"], "maxReceiveCount": 2}
                for client in (first, second):
                    listed = client.list_dead_letter_source_queues(QueueUrl=dlq_url)["queueUrls"]
                    assert sorted(url.rsplit("/", 1)[1] for url in listed) == sorted([source, later])
                    with pytest.raises(client.exceptions.ClientError, match="dead-letter queue of"):
                        client.delete_queue(QueueUrl=dlq_url)
                for url in (source_url, later_url):  # no queue dead-letters into it any more: it may go
                    first.set_queue_attributes(QueueUrl=url, Attributes={"RedrivePolicy": ""})
                assert first.list_dead_letter_source_queues(QueueUrl=dlq_url)["queueUrls"] == []
                second.delete_queue(QueueUrl=dlq_url)

            await asyncio.to_thread(through_sqs)
            assert dlq not in {q.name for q in await a.list_queues()}
        finally:
            for client in (a, b):
                await client.close()


async def test_dead_letters_relayed_from_another_shard_are_redriven_to_their_source():
    """Native redrive (through the node not holding the dead-letter queue), the HTTP API's, and SQS's
    StartMessageMoveTask all send relayed dead letters back into their source queue on the other shard, with
    their own headers; a message published straight into the dead-letter queue stays there."""
    async with static_cluster(2, 4, http=True) as (servers, _):
        a, b = [await AsyncClient(s.url, reconnect=False).connect() for s in servers]
        try:
            dlq = name_on(lambda s: s % 2 == 0, 4, "parked")  # node-0
            source = name_on(lambda s: s % 2 == 1, 4, "tasks")  # node-1
            await a.create_queue(dlq)
            await b.create_queue(source, dead_letter_queue=dlq)
            await b.publish_batch(source, [Publish(body=b"job %d" % i, headers={"k": "v"}) for i in range(5)])
            await b.nack(await b.receive(source, 5, wait_s=5), dead_letter=True)
            await a.publish(dlq, b"stay")
            await until(lambda: _ready(a, dlq), 6)  # the relay has brought all five

            assert await b.redrive(dlq, max_messages=2) == 2  # via node-1's router, forwarded to node-0
            base = f"http://127.0.0.1:{servers[1].http_port}/api/v1"
            async with aiohttp.ClientSession() as http, http.post(f"{base}/queues/{dlq}/redrive",
                                                                     json={"max_messages": 2}) as answer:  # fmt: skip
                assert (await answer.json())["moved"] == 2, await answer.text()

            def move_task() -> None:
                client = sqs(servers[1])
                url = client.get_queue_url(QueueName=dlq)["QueueUrl"]
                arn = client.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
                client.start_message_move_task(SourceArn=arn)

            await asyncio.to_thread(move_task)
            back = []
            while len(back) < 5:
                got = await a.receive(source, 10, wait_s=10)
                assert got, f"only {[d.message.body for d in back]} came back"
                back += got
            assert sorted(d.message.body for d in back) == [b"job %d" % i for i in range(5)]
            assert all(d.message.headers == {"k": "v"} and d.dead_letter_reason is None for d in back)
            assert [d.message.body for d in await a.peek(dlq, 10)] == [b"stay"]
        finally:
            for client in (a, b):
                await client.close()


async def _ready(client, queue: str) -> int:
    return (await client.queue_stats(queue)).ready


async def until(count, wanted: int, timeout_s: float = 10.0) -> None:
    """Until `await count()` reaches `wanted` (a relay works in the background: nothing to await but its effect)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while (seen := await count()) < wanted:
        assert asyncio.get_running_loop().time() < deadline, f"{seen} of {wanted}"
        await asyncio.sleep(0.05)


async def test_deleting_a_dead_letter_queue_waits_for_every_shard_to_have_an_owner():
    """While a shard has no live owner (a takeover under way), nobody can say whether one of its queues
    dead-letters into the queue: the delete is refused as retryable, and goes through once the shard is held."""
    async with static_cluster(2, 4, wait_owner_s=0.2) as (servers, directory):
        a = await AsyncClient(servers[0].url, reconnect=False).connect()
        try:
            dlq = name_on(lambda s: s == 0, 4, "lonely")
            await a.create_queue(dlq)
            await directory.nodes["node-1"].drop(3)  # node-1 died holding shard 3
            with pytest.raises(Unavailable, match="no live owner"):
                await a.delete_queue(dlq)
            assert dlq in {q.name for q in await a.list_queues()}
            await directory.nodes["node-0"].take(3)  # taken over
            await a.delete_queue(dlq)
            assert dlq not in {q.name for q in await a.list_queues()}
        finally:
            await a.close()


async def test_a_relay_queue_still_a_dead_letter_queue_stays_when_the_last_subscription_through_it_ends(monkeypatch):
    # Its shard would refuse to delete it while a queue names it (QueueInUse), so nothing would be lost if the
    # relay tried; but the relay would stop with a warning, and the dead letters wait for the next scan to start
    # it again: so the test looks at the check's answer and at the relay's task.
    answers = retire_checks(monkeypatch)
    async with static_cluster(2, 4) as (servers, directory), clients_of(servers) as (a, b):
        dlq = name_on(lambda s: s % 2 == 0, 4, "graves")  # node-0
        topic = name_on(lambda s: s == 1, 4, "news")  # node-1
        source = name_on(lambda s: s == 1, 4, "jobs")  # node-1: dead-letters through the same relay queue
        relay = relay_name(dlq)
        await a.create_queue(dlq)
        await a.publish(dlq, b"first")  # not empty: it stays in its shard
        await b.create_topic(topic)
        await b.subscribe(topic, ">", dlq)
        await b.create_queue(source, dead_letter_queue=dlq)
        await b.unsubscribe(topic, ">", dlq)
        await _until(lambda: answers)  # the relay looked whether its relay queue may go
        assert answers[0] == (relay, False)
        relays = servers[1].broker.relays
        task = relays._tasks[(1, relay)]
        assert relay in broker_of(directory, topic).core.queues and not task.done()
        await b.publish(source, b"dead-lettered")
        await b.nack(await b.receive(source, 1, wait_s=5), dead_letter=True)
        assert await drain(a, dlq, 2) == [b"first", b"dead-lettered"]


async def test_a_relay_whose_queue_is_gone_ends_its_subscriptions_and_drops_its_dead_letters():
    # A delete of a queue racing a create that names it as dead-letter queue through another node (the delete
    # asked every shard for queues dead-lettering into it before the create's shard had one) leaves a queue
    # dead-lettering into a queue that is gone, through the relay queue of a subscription to it: once the relay
    # finds the queue gone, it ends the subscription through it and drops the dead letters (as one broker does
    # without a dead-letter queue), and the relay queue stays while the queue names it (its shard refuses to
    # delete it).
    async with static_cluster(2, 4) as (servers, directory), clients_of(servers) as (a, b):
        gone = name_on(lambda s: s % 2 == 0, 4, "gone")  # node-0
        topic = name_on(lambda s: s == 1, 4, "news")  # node-1
        source = name_on(lambda s: s == 1, 4, "jobs")  # node-1: its relay queue is the subscription's
        relay = relay_name(gone)
        await a.create_queue(gone)
        await b.publish(gone, b"first")  # not empty, so it stays in its shard; node-1 caches its row
        await b.create_topic(topic)
        await b.subscribe(topic, ">", gone)
        await b.create_queue(source, dead_letter_queue=gone)
        await broker_of(directory, gone).delete_queue(gone)  # what the racing delete leaves: no queue, no row
        await directory.nodes["node-0"].placement.forget(gone, "queue")
        shard = broker_of(directory, topic)
        assert shard.core.queues[source].settings.dead_letter_queue == relay
        await b.publish(topic, b"for the queue gone")
        await b.publish(source, b"dead-lettered")
        await b.nack(await b.receive(source, 1, wait_s=5), dead_letter=True)

        def settled() -> bool:
            stats = shard.queue_stats(relay)
            return not shard.core.topics[topic].subscriptions and not (stats.ready or stats.in_flight)

        await _until(settled)
        assert relay in shard.core.queues
        assert next(t for t in await a.list_topics() if t.name == topic).subscriptions == []


async def test_a_dead_letter_queue_deleted_through_another_node_is_refused_as_on_one_broker():
    # A node whose cached placement row still named a queue another node had just deleted let a queue be created
    # (or changed) to dead-letter into it, through a relay queue: its dead letters were later dropped. One broker
    # refuses a dead-letter queue that does not exist.
    async with static_cluster(2, 4) as (servers, directory), clients_of(servers) as (a, b):
        gone = name_on(lambda s: s % 2 == 0, 4, "gone")  # node-0
        source = name_on(lambda s: s == 1, 4, "jobs")  # node-1
        kept = name_on(lambda s: s == 3, 4, "kept")  # node-1
        await a.create_queue(gone)
        await b.publish(gone, b"looked up")  # node-1 caches its row
        await b.create_queue(kept)
        await a.delete_queue(gone)  # node-0 removes the row; node-1's cache still names it
        with pytest.raises(QueueNotFound, match="does not exist"):
            await b.create_queue(source, dead_letter_queue=gone)
        with pytest.raises(QueueNotFound, match="does not exist"):
            await b.update_queue(kept, dead_letter_queue=gone)
        listed = {q.name: q.settings.dead_letter_queue for q in await b.list_queues()}
        assert source not in listed and listed[kept] is None
        await a.create_queue(gone)  # made again: named at once, through either node
        await b.create_queue(source, dead_letter_queue=gone)
        assert {q.name: q.settings.dead_letter_queue for q in await a.list_queues()}[source] == gone
