"""Messages at the limits of what one broker accepts, carried across shards by the cluster's relays and
forwarding: what one node accepts must arrive, read as on one broker, wherever the queue lives. In-process nodes
on StaticNodes (routing_helpers.py), shard s owned by node s % 2, so no PostgreSQL is needed."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import aiohttp
import msgspec
import pytest
import requests

from chute import AsyncClient
from chute.cluster import relay
from chute.cluster.placement import home_shard
from chute.errors import QueueFull
from chute.model import MAX_HEADER_BYTES, MAX_HEADERS, Publish
from tests.cluster.routing_helpers import static_cluster
from tests.cluster.test_fanout_relay import name_on

pytestmark = pytest.mark.timeout(60)
KEEPER = b"keeps the queue in its shard"


async def drain(client: AsyncClient, queue: str, count: int, timeout_s: float = 10.0) -> list:
    """Deliveries of `queue` (acked) until `count` came or `timeout_s` passed."""
    got: list = []
    async with asyncio.timeout(timeout_s):
        while len(got) < count:
            batch = await client.receive(queue, 10, wait_s=1.0)
            if batch:
                await client.ack(batch)
            got += batch
    return got


async def test_a_dead_letter_with_headers_at_the_limits_reaches_a_dead_letter_queue_of_another_shard():
    # The relay added its two headers (reason, source) to every dead letter it forwarded: a message whose headers
    # were at 16 KiB went over the limit, the publish was refused for good, and the relay retried the batch every
    # 5 s forever, holding back every dead letter behind it.
    async with static_cluster(2, 4) as (servers, _), AsyncClient(servers[1].url) as client:
        dlq = name_on(lambda s: s % 2 == 0, 4, "graves")  # node-0
        source = name_on(lambda s: s % 2 == 1, 4, "jobs")  # node-1
        await client.create_queue(dlq)
        await client.create_queue(source, dead_letter_queue=dlq)
        full = {"h": "v" * (MAX_HEADER_BYTES - 1)}
        many = {f"h{i}": "v" for i in range(MAX_HEADERS - 1)}
        await client.publish(source, b"full", headers=full)
        await client.publish(source, b"many", headers=many)
        await client.publish(source, b"plain", headers={"k": "v"})
        await client.nack(await client.receive(source, 3, wait_s=5), dead_letter=True)

        dead = {d.message.body: d for d in await drain(client, dlq, 3)}
        assert sorted(dead) == [b"full", b"many", b"plain"]
        assert dead[b"full"].message.headers == full and dead[b"full"].dead_letter_reason is None
        assert dead[b"many"].message.headers == many and dead[b"many"].dead_letter_reason is None
        assert dead[b"plain"].message.headers == {"k": "v"}
        assert (dead[b"plain"].dead_letter_reason, dead[b"plain"].dead_letter_source) == ("rejected", source)


async def test_a_publish_of_the_largest_body_through_the_http_api_of_a_forwarding_node():
    # The forwarding node handed aiohttp the request's body as bytes, and aiohttp warns of a bytes body over
    # 1 MiB (a ResourceWarning): a base64 body near max_message_bytes failed with 500 where warnings are errors.
    async with static_cluster(2, 4, http=True) as (servers, _):
        queue = name_on(lambda s: s % 2 == 1, 4, "large")  # node-1
        async with AsyncClient(servers[0].url) as client:
            await client.create_queue(queue)
            largest = client.server_info.max_message_bytes
            body = bytes(range(256)) * (largest // 256) + b"\xff" * (largest % 256)
            message = json.dumps({"body": base64.b64encode(body).decode(), "body_encoding": "base64",
                                  "headers": {"h": "v" * (MAX_HEADER_BYTES - 1)}}).encode()  # fmt: skip
            async with aiohttp.ClientSession() as http:
                for server in servers:  # the owner, then the node that forwards
                    url = f"http://127.0.0.1:{server.http_port}/api/v1/queues/{queue}/messages"
                    headers = {"Content-Type": "application/json"}
                    async with http.post(url, data=io.BytesIO(message), headers=headers) as answer:
                        assert answer.status == 201, await answer.text()
            got = await drain(client, queue, 2)
            assert [d.message.body for d in got] == [body, body]


async def until_leased_elsewhere(client: AsyncClient, queue: str):
    """Keep `queue` from moving to a topic's shard on subscribe: one message of it leased for the test's length."""
    await client.publish(queue, KEEPER)
    (kept,) = await client.receive(queue, 1, wait_s=5, lease_s=600)
    return kept


async def test_a_topic_message_relayed_to_a_queue_of_another_shard_keeps_its_subject():
    # A relayed copy is a queue publish, which carries no subject: readers of a queue of another shard than its
    # topic's got none (AMQP readers the queue's name as routing key), where one broker gives the topic's.
    async with static_cluster(2, 4, http=True) as (servers, _):
        a, b = [await AsyncClient(s.url, reconnect=False).connect() for s in servers]
        try:
            topic = name_on(lambda s: s % 2 == 0, 4, "events")  # node-0
            queue = name_on(lambda s: s % 2 == 1, 4, "audit")  # node-1
            await b.create_queue(queue)
            await until_leased_elsewhere(b, queue)
            await a.create_topic(topic)
            await a.subscribe(topic, ">", queue)
            many = {f"h{i}": "v" for i in range(MAX_HEADERS)}  # no room for one more header
            await b.publish(topic, b"one", subject="orders.eu", headers={"k": "v"})
            await b.publish(topic, b"full", subject="orders.us", headers=many)
            await a.publish(topic, b"two", subject="_41.x")
            for client in (a, b):  # peeked through each node, then received through the other
                peeked = [d for d in await client.peek(queue, 10) if d.message.body != KEEPER]
                assert [(d.message.body, d.message.subject) for d in peeked] == [
                    (b"one", "orders.eu"), (b"full", None), (b"two", "_41.x")]  # fmt: skip
            for server in servers:
                async with aiohttp.ClientSession() as http:
                    url = f"http://127.0.0.1:{server.http_port}/api/v1/queues/{queue}/messages"
                    async with http.get(url, params={"max_messages": 10}) as answer:
                        messages = [m["message"] for m in (await answer.json())["messages"]]
                        shown = [(m["subject"], m["headers"]) for m in messages if m["body"] != KEEPER.decode()]
                        assert shown == [("orders.eu", {"k": "v"}), (None, many), ("_41.x", {})]
            got = await drain(a, queue, 3)
            assert [(d.message.body, d.message.subject, d.message.headers) for d in got] == [
                (b"one", "orders.eu", {"k": "v"}), (b"full", None, many), (b"two", "_41.x", {})]  # fmt: skip
        finally:
            for client in (a, b):
                await client.close()


async def test_a_users_message_with_the_relays_header_names_keeps_them():
    # Relayed dead letters' reason and source are headers, read back into the delivery's fields: any message
    # with those header names was shown so, its headers gone, where one broker shows them as they were.
    async with static_cluster(2, 4, http=True) as (servers, _):
        headers = {"chute-dead-letter-reason": "rejected", "chute-dead-letter-source": "elsewhere",
                   "chute-relay-subject": "a.b", "k": "v"}  # fmt: skip
        async with AsyncClient(servers[0].url) as client:
            for queue in (name_on(lambda s: s % 2 == 0, 4, "own"), name_on(lambda s: s % 2 == 1, 4, "own")):
                await client.create_queue(queue)
                await client.publish(queue, b"mine", headers=headers)
                assert [d.message.headers for d in await client.peek(queue)] == [headers]
                for server in servers:
                    async with aiohttp.ClientSession() as http:
                        url = f"http://127.0.0.1:{server.http_port}/api/v1/queues/{queue}/messages"
                        async with http.get(url) as answer:
                            assert [m["message"]["headers"] for m in (await answer.json())["messages"]] == [headers]
                (got,) = await drain(client, queue, 1)
                assert (got.message.headers, got.message.subject, got.dead_letter_reason) == (headers, None, None)


async def test_a_queue_url_is_read_by_a_forwarding_node_as_the_sqs_front_reads_it():
    # The forwarding node took the QueueUrl's last segment as it was: a name in percent-encoding, or a URL with a
    # query or a fragment, named no placed queue, so it answered QueueDoesNotExist where the owner sends.
    async with static_cluster(2, 4, http=True) as (servers, _):
        queue = name_on(lambda s: s % 2 == 1, 4, "urls")  # node-1
        async with AsyncClient(servers[0].url) as client:
            await client.create_queue(queue)

        def send_all() -> list[tuple]:
            answers = []
            for server in servers:  # the owner, then the node that forwards
                endpoint = f"http://127.0.0.1:{server.http_port}"
                encoded = "".join(f"%{ord(c):02X}" for c in queue)
                for url in (f"{endpoint}/000000000000/{encoded}", f"{endpoint}/000000000000/{queue}?a=b",
                            f"{endpoint}/000000000000/{queue}#c", queue):  # fmt: skip
                    form = {"Action": "SendMessage", "QueueUrl": url, "MessageBody": "m"}
                    query = requests.post(f"{endpoint}/", data=form, timeout=30)
                    headers = {"X-Amz-Target": "AmazonSQS.SendMessage", "Content-Type": "application/x-amz-json-1.0"}
                    sent = requests.post(f"{endpoint}/", json={"QueueUrl": url, "MessageBody": "m"}, headers=headers,
                                         timeout=30)  # fmt: skip
                    answers.append((server.http_port, url, query.status_code, sent.status_code))
            return answers

        answers = await asyncio.to_thread(send_all)
        assert [answer for answer in answers if answer[2:] != (200, 200)] == []
        async with AsyncClient(servers[0].url) as client:
            assert (await client.queue_stats(queue)).ready == len(answers) * 2


async def test_a_redrive_sends_back_only_the_dead_letters_relays_brought():
    # A redrive sent back, to the queue its header named, any message of a dead-letter queue with the relay's
    # headers: a user's message published there with them too, where one broker leaves it in place.
    async with static_cluster(2, 4) as (servers, _), AsyncClient(servers[1].url) as client:
        dlq = name_on(lambda s: s % 2 == 0, 4, "graves")  # node-0
        source = name_on(lambda s: s % 2 == 1, 4, "jobs")  # node-1
        await client.create_queue(dlq)
        await client.create_queue(source, dead_letter_queue=dlq)
        await client.publish(source, b"dead")
        await client.nack(await client.receive(source, 1, wait_s=5), dead_letter=True)
        forged = {"chute-dead-letter-reason": "rejected", "chute-dead-letter-source": source}
        await client.publish(dlq, b"mine", headers=forged)
        leased: list = []
        async with asyncio.timeout(10):
            while len(leased) < 2:  # until the relay brought the dead letter (long polls), then both ready again
                leased += await client.receive(dlq, 2, wait_s=5)
        await client.nack(leased)
        assert await client.redrive(dlq) == 1
        assert [d.message.body for d in await drain(client, source, 1)] == [b"dead"]
        (mine,) = await drain(client, dlq, 1)
        assert (mine.message.body, mine.message.headers, mine.dead_letter_reason) == (b"mine", forged, None)


async def relayed_topic(client: AsyncClient, queue: str, **settings):
    """A topic of node-0 subscribed to `queue` of node-1 (through a relay queue in the topic's shard); (topic, the
    delivery of the message that keeps the queue in its shard)."""
    topic = name_on(lambda s: s % 2 == 0, 4, "events")
    await client.create_queue(queue, **settings)
    kept = await until_leased_elsewhere(client, queue)
    await client.create_topic(topic)
    await client.subscribe(topic, ">", queue)
    return topic, kept


async def test_a_relay_fills_a_queue_with_less_room_than_its_backlog():
    # A relay published its backlog in batches of up to 500, and a queue publishes a batch whole or not at all: a
    # queue with room for fewer (max_length with overflow `reject`) refused every batch, even empty, and the relay
    # stalled for ever. One broker takes each publish of the topic as it comes.
    async with static_cluster(2, 4) as (servers, _), AsyncClient(servers[0].url) as client:
        queue = name_on(lambda s: s % 2 == 1, 4, "small")  # node-1
        topic, kept = await relayed_topic(client, queue, max_length=5, overflow="reject")
        await client.publish_batch(topic, [Publish(body=f"m{i}".encode(), subject="a") for i in range(12)])
        await client.ack(kept)
        got = await drain(client, queue, 12)
        assert [d.message.body for d in got] == [f"m{i}".encode() for i in range(12)]


async def test_a_relay_into_a_full_reject_dead_letter_queue_dead_letters_each_copy_once():
    # A full queue with overflow `reject-dead-letter` dead-letters every batch it refuses: a relay that halved such
    # a batch and tried again would have it dead-lettered again and again, and then wait for room for ever.
    async with static_cluster(2, 4) as (servers, _), AsyncClient(servers[0].url) as client:
        dead = name_on(lambda s: s % 2 == 1, 4, "dead")  # node-1; `small` is placed in its shard
        await client.create_queue(dead)
        queue = name_on(lambda s: s % 2 == 1, 4, "small")
        topic, _ = await relayed_topic(client, queue, max_length=1, overflow="reject-dead-letter",
                                       dead_letter_queue=dead)  # fmt: skip
        await client.publish_batch(topic, [Publish(body=f"m{i}".encode(), subject="a") for i in range(6)])
        got = await drain(client, dead, 6)
        assert sorted(d.message.body for d in got) == [f"m{i}".encode() for i in range(6)]
        assert {(d.dead_letter_reason, d.dead_letter_source) for d in got} == {("overflow", queue)}
        async with asyncio.timeout(10):  # the relay acked what was dead-lettered: its queue empties
            while (stats := await client.queue_stats(relay.relay_name(queue))).ready + stats.in_flight:
                await asyncio.sleep(0.05)
        assert await client.receive(dead, 10, wait_s=0.3) == []  # each copy once
        assert [d.message.body for d in await client.peek(queue)] == [KEEPER]


async def redrive_into_a_full_source(client: AsyncClient, overflow: str) -> tuple[str, str]:
    """Dead letters a and b of `source` (node-1, at most 2 messages, `overflow`) in `dlq` (node-0), brought by
    the relay; `source` filled again; then a redrive of `dlq`, refused as `source` is full. (dlq, source)."""
    dlq = name_on(lambda s: s % 2 == 0, 4, "graves")
    source = name_on(lambda s: s % 2 == 1, 4, "jobs")
    await client.create_queue(dlq)
    await client.create_queue(source, dead_letter_queue=dlq, max_length=2, overflow=overflow)
    await client.publish_batch(source, [b"a", b"b"])
    await client.nack(await client.receive(source, 2, wait_s=5), dead_letter=True)
    leased: list = []
    async with asyncio.timeout(10):
        while len(leased) < 2:  # until the relay brought both (long polls), then ready again
            leased += await client.receive(dlq, 2, wait_s=5)
    await client.nack(leased)
    await client.publish_batch(source, [b"c", b"d"])  # full
    with pytest.raises(QueueFull):
        await client.redrive(dlq)
    return dlq, source


async def test_a_redrive_into_a_full_reject_dead_letter_source_leaves_each_dead_letter_once():
    # The full source dead-letters the redriven batch again (back into the dead-letter queue, through the relay),
    # and the failed redrive released the originals as well: every dead letter was there twice.
    async with static_cluster(2, 4) as (servers, _), AsyncClient(servers[1].url) as client:
        dlq, source = await redrive_into_a_full_source(client, "reject-dead-letter")
        got = await drain(client, dlq, 2)  # dead-lettered again by the source, for overflow
        assert sorted(d.message.body for d in got) == [b"a", b"b"]
        assert {(d.dead_letter_reason, d.dead_letter_source) for d in got} == {("overflow", source)}
        async with asyncio.timeout(10):  # the relay has brought everything back
            while (stats := await client.queue_stats(relay.relay_name(dlq))).ready + stats.in_flight:
                await asyncio.sleep(0.05)
        assert await client.receive(dlq, 10, wait_s=0.3) == []  # each once


async def test_a_message_the_queue_refuses_for_good_holds_up_no_other(monkeypatch):
    # A relay's batch refused for good (here a copy the queue refuses, made so by the test) was retried whole
    # every 5 s, for ever: one such message held up every message behind it. Now it alone is retried.
    copy = relay._copy

    def refused_copy(shard, delivery):
        made = copy(shard, delivery)
        return msgspec.structs.replace(made, priority=99) if delivery.message.body == b"poison" else made

    monkeypatch.setattr(relay, "_copy", refused_copy)
    async with static_cluster(2, 4) as (servers, directory), AsyncClient(servers[0].url) as client:
        queue = name_on(lambda s: s % 2 == 1, 4, "jobs")  # node-1
        topic, _ = await relayed_topic(client, queue)
        bodies = [b"m0", b"poison", b"m1", b"m2", b"m3"]
        await client.publish_batch(topic, [Publish(body=body, subject="a") for body in bodies])
        got = await drain(client, queue, 4)
        assert [d.message.body for d in got] == [b"m0", b"m1", b"m2", b"m3"]
        shard = home_shard(topic, 4)
        stats = directory.nodes[directory.owners[shard]].brokers[shard].queue_stats(relay.relay_name(queue))
        assert stats.ready + stats.delayed + stats.in_flight == 1  # kept, to be retried


async def test_a_redrive_that_fails_leaves_no_dead_letter_leased():
    # A redrive whose publish into a source failed (here a full source queue with overflow `reject`) kept the
    # dead letters it had received leased for 300 s, out of sight of every reader.
    async with static_cluster(2, 4) as (servers, _), AsyncClient(servers[1].url) as client:
        dlq, source = await redrive_into_a_full_source(client, "reject")
        stats = await client.queue_stats(dlq)
        assert (stats.ready, stats.in_flight) == (2, 0)
