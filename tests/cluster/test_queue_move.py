"""An empty queue moving to its topic's shard (router.py, `_move_empty_queue`) while clients publish (native and
SQS), receive and ack it through every node: nothing confirmed is lost, nothing acked comes back, and no call is
answered `queue_not_found` (SQS: QueueDoesNotExist) for the queue that exists throughout (a retryable error at
worst). In-process nodes on
StaticNodes (routing_helpers.py), shard s owned by node s % 3."""

from __future__ import annotations

import asyncio

import pytest
import requests

from chute import AsyncClient
from chute.cluster.placement import home_shard
from chute.errors import ChuteError
from tests.cluster.routing_helpers import static_cluster
from tests.cluster.test_fanout_relay import name_on

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
