"""Messages at the limits of what one broker accepts, carried across shards by the cluster's relays and
forwarding: what one node accepts must arrive, read as on one broker, wherever the queue lives. In-process nodes
on StaticNodes (routing_helpers.py), shard s owned by node s % 2, so no PostgreSQL is needed."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import aiohttp
import pytest

from chute import AsyncClient
from chute.model import MAX_HEADER_BYTES, MAX_HEADERS
from tests.cluster.routing_helpers import static_cluster
from tests.cluster.test_fanout_relay import name_on

pytestmark = pytest.mark.timeout(60)


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
