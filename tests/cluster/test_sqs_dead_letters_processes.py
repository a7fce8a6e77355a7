"""SQS dead-lettering across shards on three `chute serve --store` processes on PostgreSQL, seen by boto3 through
the node that owns neither queue: CreateQueue with a RedrivePolicy naming a queue of another node's shard is
accepted, GetQueueAttributes names the real dead-letter queue's ARN, a message received more than
maxReceiveCount times lands in that queue with its source (DeadLetterQueueSourceArn) as on one node, the
dead-letter queue cannot be deleted while in use, and a move task sends the message back to its source. Then,
through the same node, the HTTP API's queue details name the real dead-letter queue and its source, a native
rejection dead-letters with its reason and source, and the HTTP redrive sends it back once."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from chute import AsyncClient
from chute.cluster.placement import home_shard
from tests.cluster.processes import ClusterWatch, NodeProcess, balanced, node_processes
from tests.postgres.helpers import fresh_database

pytestmark = pytest.mark.timeout(240)
SHARDS = 6


def name_owned_by(owners: dict, node: str, prefix: str) -> str:
    return next(f"{prefix}{i}" for i in range(10_000) if owners[home_shard(f"{prefix}{i}", SHARDS)] == node)


def scenario(endpoint: str, dlq_name: str, source_name: str) -> None:
    boto3 = pytest.importorskip("boto3")
    sqs = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1",
                       aws_access_key_id="test", aws_secret_access_key="test")  # fmt: skip
    dlq_url = sqs.create_queue(QueueName=dlq_name)["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    policy = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 2})
    source_url = sqs.create_queue(QueueName=source_name, Attributes={"RedrivePolicy": policy})["QueueUrl"]
    source_arn = sqs.get_queue_attributes(QueueUrl=source_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    shown = sqs.get_queue_attributes(QueueUrl=source_url, AttributeNames=["RedrivePolicy"])["Attributes"]
    assert json.loads(shown["RedrivePolicy"]) == {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 2}
    assert sqs.list_dead_letter_source_queues(QueueUrl=dlq_url)["queueUrls"] == [source_url]

    sqs.send_message(QueueUrl=source_url, MessageBody="poison")
    for _ in range(2):  # received maxReceiveCount times, never deleted
        got = sqs.receive_message(QueueUrl=source_url, VisibilityTimeout=0, WaitTimeSeconds=10)["Messages"]
        assert [m["Body"] for m in got] == ["poison"]
    dead: list = []
    deadline = time.monotonic() + 30
    while not dead and time.monotonic() < deadline:  # the third receive dead-letters it, through the relay
        again = sqs.receive_message(QueueUrl=source_url, VisibilityTimeout=0, WaitTimeSeconds=1)
        assert again.get("Messages", []) == []
        dead = sqs.receive_message(QueueUrl=dlq_url, WaitTimeSeconds=2, VisibilityTimeout=0,
                                   MessageSystemAttributeNames=["All"]).get("Messages", [])  # fmt: skip
    assert [m["Body"] for m in dead] == ["poison"], "the dead letter never reached the other shard's queue"
    assert dead[0]["Attributes"]["DeadLetterQueueSourceArn"] == source_arn

    with pytest.raises(sqs.exceptions.ClientError, match="InvalidParameterValue"):
        sqs.delete_queue(QueueUrl=dlq_url)

    task = sqs.start_message_move_task(SourceArn=dlq_arn)["TaskHandle"]
    deadline = time.monotonic() + 30
    back: list = []
    while not back and time.monotonic() < deadline:
        back = sqs.receive_message(QueueUrl=source_url, WaitTimeSeconds=2).get("Messages", [])
    assert [m["Body"] for m in back] == ["poison"], f"move task {task} did not send it back"
    sqs.delete_message(QueueUrl=source_url, ReceiptHandle=back[0]["ReceiptHandle"])
    assert sqs.receive_message(QueueUrl=source_url, WaitTimeSeconds=1).get("Messages", []) == []
    assert sqs.receive_message(QueueUrl=dlq_url, WaitTimeSeconds=1).get("Messages", []) == []


async def http_and_native(node: NodeProcess, dlq: str, source: str) -> None:
    base = f"{node.http_url}/api/v1"
    async with aiohttp.ClientSession() as http, AsyncClient(node.url, reconnect=False) as client:
        async with http.get(f"{base}/queues/{source}") as answer:
            assert (await answer.json())["settings"]["dead_letter_queue"] == dlq
        async with http.get(f"{base}/queues/{dlq}") as answer:
            assert (await answer.json())["dead_letter_sources"] == [source]
        await client.publish(source, b"refused", headers={"k": "v"})
        await client.nack(await client.receive(source, 1, wait_s=10), dead_letter=True)
        dead = await client.receive(dlq, 1, wait_s=20)  # through the relay to node-a's shard
        assert [(d.message.body, d.dead_letter_reason, d.dead_letter_source) for d in dead] == [
            (b"refused", "rejected", source)
        ]
        await client.nack(dead)  # back in the dead-letter queue, to be redriven
        async with http.post(f"{base}/queues/{dlq}/redrive", json={"max_messages": None}) as answer:
            assert (await answer.json())["moved"] == 1, await answer.text()
        back = await client.receive(source, 10, wait_s=20)
        assert [(d.message.body, d.message.headers, d.dead_letter_reason) for d in back] == [
            (b"refused", {"k": "v"}, None)
        ]
        await client.ack_receipts(source, [d.receipt for d in back])
        assert await client.receive(source, 10, wait_s=1) == []
        assert await client.receive(dlq, 10, wait_s=1) == []


async def test_sqs_dead_letters_across_shards_through_a_third_node(postgres_url, tmp_path):
    url = await fresh_database(postgres_url)
    names = ["node-a", "node-b", "node-c"]
    async with node_processes(url, names, tmp_path, "--shards", str(SHARDS)) as nodes:
        async with ClusterWatch(url) as watch:
            owners = await watch.until(balanced(names, SHARDS), 90)
        dlq = name_owned_by(owners, "node-a", "graves")
        source = name_owned_by(owners, "node-b", "jobs")
        await asyncio.to_thread(scenario, nodes[2].http_url, dlq, source)
        await http_and_native(nodes[2], dlq, source)
