"""Three cluster nodes on one PostgreSQL (in-process Servers with `--store`, real ClusterNodes), and clients of
every kind through every node: the native client, the HTTP API, boto3 against the SQS API and the CLI each see
one broker — what is created, published or received through one node is seen, received or acked through the
others, wherever its shard is."""

from __future__ import annotations

import asyncio
import json
import sys

import aiohttp
import pytest

from chute import AsyncClient
from chute.cluster.placement import home_shard
from chute.server.config import ServerConfig
from tests.cluster.inprocess import running_nodes

pytestmark = pytest.mark.timeout(180)
SHARDS = 6


def _config(url: str, name: str, data_dir: str) -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0, http_port=0, amqp_port=None, store=url,
                        node_name=name, shards=SHARDS, cluster_lease_s=4.0, cluster_heartbeat_s=0.3,
                        data_dir=data_dir)  # fmt: skip


@pytest.fixture
async def cluster(postgres_url, tmp_path):
    async with running_nodes(postgres_url, tmp_path, 3, SHARDS, _config) as servers:
        yield servers


def one_name_per_shard(prefix: str) -> list[str]:
    found: dict[int, str] = {}
    i = 0
    while len(found) < SHARDS:
        found.setdefault(home_shard(f"{prefix}{i}", SHARDS), f"{prefix}{i}")
        i += 1
    return [found[s] for s in range(SHARDS)]


async def test_native_clients_through_every_node(cluster):
    a, b, c = [await AsyncClient(s.url, reconnect=False).connect() for s in cluster]
    try:
        names = one_name_per_shard("native-")
        for name in names:
            await a.create_queue(name, lease_s=30)
            ids = await b.publish_batch(name, [b"x", b"y"])
            got = await c.receive(name, 2, wait_s=5)
            assert [d.message.id for d in got] == ids
            await a.ack_receipts(name, [d.receipt for d in got])
            assert (await b.queue_stats(name)).acked == 2
        for client in (a, b, c):
            assert [q.name for q in await client.list_queues()] == sorted(names)
        consumer = await c.consume(names[0], prefetch=5)
        await a.publish_batch(names[0], [f"m{i}".encode() for i in range(12)])
        seen = []
        async for delivery in consumer:
            seen.append(delivery.message.body)
            await c.ack(delivery)
            if len(seen) == 12:
                break
        await consumer.close()
        assert sorted(seen) == sorted(f"m{i}".encode() for i in range(12))
        await a.create_topic("events")
        await b.subscribe("events", ">", "events-audit")  # created in the topic's shard
        await c.publish("events", b"e1", subject="user.created")
        assert [d.message.body for d in await a.receive("events-audit", 5, wait_s=5)] == [b"e1"]
    finally:
        for client in (a, b, c):
            await client.close()


async def test_the_http_api_through_every_node(cluster):
    base = [f"http://127.0.0.1:{s.http_port}/api/v1" for s in cluster]
    names = one_name_per_shard("http-")
    async with aiohttp.ClientSession() as http:
        for name in names:
            async with http.put(f"{base[0]}/queues/{name}", json={"lease_s": 30}) as answer:
                assert answer.status == 201, await answer.text()
            async with http.post(f"{base[1]}/queues/{name}/messages", json={"body": "hello"}) as answer:
                assert answer.status in (200, 201), await answer.text()
            async with http.post(f"{base[2]}/queues/{name}/receive", json={"max_messages": 1, "wait_s": 5}) as answer:
                assert answer.status == 200, await answer.text()
                deliveries = (await answer.json())["deliveries"]
            assert len(deliveries) == 1
            async with http.post(f"{base[0]}/queues/{name}/ack", json={"receipts": [deliveries[0]["receipt"]]}) \
                    as answer:  # fmt: skip
                assert answer.status in (200, 204), await answer.text()
            async with http.get(f"{base[1]}/queues/{name}/stats") as answer:
                assert (await answer.json())["acked"] == 1
        for each in base:
            async with http.get(f"{each}/queues") as answer:
                assert sorted(q["name"] for q in (await answer.json())["queues"]) == sorted(names)
        async with http.get(f"{base[2]}/queues/nothing-here") as answer:
            assert answer.status == 404
        async with http.delete(f"{base[2]}/queues/{names[1]}") as answer:
            assert answer.status in (200, 204)
        async with http.get(f"{base[0]}/queues/{names[1]}") as answer:
            assert answer.status == 404


async def test_boto3_against_the_sqs_api_of_every_node(cluster):
    boto3 = pytest.importorskip("boto3")

    def client(server):
        return boto3.client("sqs", endpoint_url=f"http://127.0.0.1:{server.http_port}", region_name="us-east-1",
                            aws_access_key_id="test", aws_secret_access_key="test")  # fmt: skip

    def scenario() -> None:
        a, b, c = (client(s) for s in cluster)
        names = one_name_per_shard("sqs-")
        for name in names:
            url = a.create_queue(QueueName=name)["QueueUrl"]
            b.send_message(QueueUrl=url, MessageBody=f"to {name}")
            got = c.receive_message(QueueUrl=url, MaxNumberOfMessages=1, WaitTimeSeconds=5)["Messages"]
            assert got[0]["Body"] == f"to {name}"
            a.delete_message(QueueUrl=url, ReceiptHandle=got[0]["ReceiptHandle"])
            assert "Messages" not in b.receive_message(QueueUrl=url, WaitTimeSeconds=0)
        listed = c.list_queues()["QueueUrls"]
        assert sorted(u.rsplit("/", 1)[1] for u in listed) == sorted(names)

    await asyncio.to_thread(scenario)


async def test_the_cli_lists_every_queue_of_the_cluster_from_any_node(cluster):
    names = one_name_per_shard("cli-")
    async with AsyncClient(cluster[0].url) as client:
        for name in names:
            await client.create_queue(name)
    for server in cluster:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "chute.cli", "queue", "list", "--url", server.url, "--json",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        assert sorted(item["name"] for item in json.loads(out)) == sorted(names)
