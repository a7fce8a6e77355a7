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
from chute.errors import QueueInUse
from tests.cluster.routing_helpers import static_cluster
from tests.cluster.test_fanout_relay import name_on

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
