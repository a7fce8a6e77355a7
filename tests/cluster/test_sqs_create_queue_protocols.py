"""SQS CreateQueue with a RedrivePolicy through a node owning neither queue, in the query protocol (form fields
`Attribute.N.Name` / `Attribute.N.Value`) as in the JSON protocol: the new queue is placed in its dead-letter
queue's shard, and a message received maxReceiveCount times is dead-lettered there with its source. In-process
nodes on StaticNodes (routing_helpers.py), shard s owned by node s % 3."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
import requests

from tests.cluster.routing_helpers import static_cluster
from tests.cluster.test_fanout_relay import name_on

pytestmark = pytest.mark.timeout(60)
JSON_TYPE = "application/x-amz-json-1.0"


def call(endpoint: str, protocol: str, action: str, params: dict) -> dict:
    """One SQS action in `protocol` ("query" or "json"); the fields this test reads, as a dict."""
    if protocol == "json":
        answer = requests.post(f"{endpoint}/", json=params, timeout=30,
                               headers={"X-Amz-Target": f"AmazonSQS.{action}", "Content-Type": JSON_TYPE})  # fmt: skip
        assert answer.status_code == 200, answer.text
        return answer.json()
    form = {"Action": action}
    for key, value in params.items():
        if key == "Attributes":
            for i, (name, text) in enumerate(value.items(), 1):
                form[f"Attribute.{i}.Name"], form[f"Attribute.{i}.Value"] = name, text
        elif key == "AttributeNames":
            for i, name in enumerate(value, 1):
                form[f"AttributeName.{i}"] = name
        else:
            form[key] = str(value)
    answer = requests.post(f"{endpoint}/", data=form, timeout=30)
    assert answer.status_code == 200, answer.text
    text = answer.text
    found: dict = {"Messages": [{"Body": body} for body in re.findall(r"<Body>(.*?)</Body>", text)]}
    url = re.search(r"<QueueUrl>(.*?)</QueueUrl>", text)
    found["QueueUrl"] = url.group(1) if url else None
    found["Attributes"] = dict(re.findall(r"<Name>(.*?)</Name>\s*<Value>(.*?)</Value>", text))
    return found


@pytest.mark.parametrize("protocol", ["query", "json"])
async def test_create_queue_with_a_redrive_policy_through_a_node_owning_neither_queue(protocol: str):
    # The query protocol's CreateQueue placed the queue in its home shard (the placement read only a JSON body
    # for the RedrivePolicy), where the JSON protocol's was placed in its dead-letter queue's shard.
    async with static_cluster(3, 6, http=True) as (servers, directory):
        dlq = name_on(lambda s: s % 3 == 0, 6, "graves")  # node-0
        source = name_on(lambda s: s % 3 == 1, 6, "orders")  # home on node-1; asked through node-2
        endpoint = f"http://127.0.0.1:{servers[2].http_port}"

        def scenario() -> list:
            dlq_url = call(endpoint, protocol, "CreateQueue", {"QueueName": dlq})["QueueUrl"]
            policy = json.dumps({"deadLetterTargetArn": f"arn:aws:sqs:us-east-1:000000000000:{dlq}",
                                 "maxReceiveCount": 2})  # fmt: skip
            url = call(endpoint, protocol, "CreateQueue", {"QueueName": source,
                                                           "Attributes": {"RedrivePolicy": policy}})["QueueUrl"]
            shown = call(endpoint, protocol, "GetQueueAttributes", {"QueueUrl": url,
                                                                    "AttributeNames": ["RedrivePolicy"]})
            assert json.loads(shown["Attributes"]["RedrivePolicy"].replace("&quot;", '"'))["maxReceiveCount"] == 2
            call(endpoint, protocol, "SendMessage", {"QueueUrl": url, "MessageBody": "poison"})
            for _ in range(2):
                got = call(endpoint, protocol, "ReceiveMessage", {"QueueUrl": url, "VisibilityTimeout": 0,
                                                                   "WaitTimeSeconds": 5})  # fmt: skip
                assert [m["Body"] for m in got["Messages"]] == ["poison"]
            got = call(endpoint, protocol, "ReceiveMessage", {"QueueUrl": url, "WaitTimeSeconds": 1})
            assert got.get("Messages", []) == []  # the third receive dead-lettered it
            return call(endpoint, protocol, "ReceiveMessage", {"QueueUrl": dlq_url, "WaitTimeSeconds": 5}).get(
                "Messages", [])  # fmt: skip

        dead = await asyncio.to_thread(scenario)
        assert [m["Body"] for m in dead] == ["poison"]
        assert directory.book[source].shard == directory.book[dlq].shard  # with its dead-letter queue
        node = directory.nodes[directory.owners[directory.book[dlq].shard]]
        assert node.brokers[directory.book[dlq].shard].core.queues[source].settings.dead_letter_queue == dlq
