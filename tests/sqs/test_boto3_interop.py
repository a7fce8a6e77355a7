"""An SQS queue is a Chute queue: a queue made through boto3 is used from chute.AsyncClient, and the reverse;
message attributes and headers cross over both ways; queue attributes are Chute settings."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from botocore.exceptions import ClientError

import chute
from tests.sqs import boto3_support
from tests.sqs.boto3_support import attributes, error_of, md5_of_body, md5_of_message_attributes

sqs_server, sqs, name = boto3_support.sqs_server, boto3_support.sqs, boto3_support.name  # the fixtures


async def test_a_queue_made_by_boto3_is_used_natively(sqs, sqs_server, name):
    dlq = (await asyncio.to_thread(sqs.create_queue, QueueName=f"{name}-dlq"))["QueueUrl"]
    dlq_arn = attributes(sqs, dlq, "QueueArn")["QueueArn"]
    url = (await asyncio.to_thread(sqs.create_queue, QueueName=name, Attributes={
        "VisibilityTimeout": "45", "DelaySeconds": "0", "MessageRetentionPeriod": "3600",
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 4})}))["QueueUrl"]  # fmt: skip
    await asyncio.to_thread(sqs.send_message, QueueUrl=url, MessageBody="from boto3", MessageAttributes={
        "kind": {"DataType": "String", "StringValue": "order"}, "n": {"DataType": "Number", "StringValue": "7"},
        "bin": {"DataType": "Binary", "BinaryValue": b"\x01\x02"}})  # fmt: skip
    async with chute.AsyncClient(sqs_server.url) as client:
        [info] = [q for q in await client.list_queues() if q.name == name]
        settings = info.settings
        assert (settings.lease_s, settings.retention_s, settings.dead_letter_queue, settings.max_deliveries) == (
            45, 3600, f"{name}-dlq", 4)  # fmt: skip
        [delivery] = await client.receive(name, wait_s=5)
        assert delivery.body == b"from boto3"
        blob = base64.b64encode(b"\x01\x02").decode()
        assert delivery.headers == {"kind": "order", "n": "7", "sqs:type:n": "Number", "bin": blob,
                                    "sqs:type:bin": "Binary"}  # fmt: skip
        await client.ack(delivery)
        # only names SendMessage would take show as attributes (the others stay native headers)
        refused = {"bad name!": "x", "newline\n": "x", ".lead": "x", "trail.": "x", "dou..ble": "x",
                   "n" * 257: "x", "AWS.trace": "x", "amazon.x": "x"}  # fmt: skip
        await client.publish(name, b"from chute", headers={"origin": "native", "n" * 256: "long", **refused})
    [message] = (await asyncio.to_thread(sqs.receive_message, QueueUrl=url, MessageAttributeNames=["All"],
                                         WaitTimeSeconds=5))["Messages"]  # fmt: skip
    assert message["Body"] == "from chute"
    assert message["MessageAttributes"] == {"origin": {"DataType": "String", "StringValue": "native"},
                                            "n" * 256: {"DataType": "String", "StringValue": "long"}}  # fmt: skip
    assert message["MD5OfMessageAttributes"] == md5_of_message_attributes(message["MessageAttributes"])


async def test_a_native_queue_is_used_through_boto3(sqs, sqs_server, name):
    async with chute.AsyncClient(sqs_server.url) as client:
        await client.create_queue(name, lease_s=5, delay_s=0, fifo=False)
        await client.publish(name, b"\xffnot utf-8")
        await client.publish(name, b"plain")
        url = (await asyncio.to_thread(sqs.get_queue_url, QueueName=name))["QueueUrl"]
        assert url in (await asyncio.to_thread(sqs.list_queues, QueueNamePrefix=name))["QueueUrls"]
        got = attributes(sqs, url)
        assert got["VisibilityTimeout"] == "5" and got["MessageRetentionPeriod"] == "1209600"  # kept forever
        assert got["ApproximateNumberOfMessages"] == "2"
        messages = (await asyncio.to_thread(sqs.receive_message, QueueUrl=url, MaxNumberOfMessages=10))["Messages"]
        assert [m["Body"] for m in messages] == ["\ufffdnot utf-8", "plain"]  # undecodable bytes are replaced
        assert [m["MD5OfBody"] for m in messages] == [md5_of_body(m["Body"]) for m in messages]  # of what is shown
        for message in messages:
            await asyncio.to_thread(sqs.delete_message, QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
        stats = await client.queue_stats(name)
        assert (stats.ready, stats.in_flight, stats.acked) == (0, 0, 2)
        await asyncio.to_thread(sqs.set_queue_attributes, QueueUrl=url, Attributes={"VisibilityTimeout": "9"})
        [info] = [q for q in await client.list_queues() if q.name == name]
        assert info.settings.lease_s == 9
        await asyncio.to_thread(sqs.delete_queue, QueueUrl=url)
        assert name not in [q.name for q in await client.list_queues()]


async def test_a_topic_name_is_not_an_sqs_queue(sqs, sqs_server, name):
    async with chute.AsyncClient(sqs_server.url) as client:
        await client.create_topic(name)
    with pytest.raises(ClientError) as excinfo:
        await asyncio.to_thread(sqs.create_queue, QueueName=name)
    assert error_of(excinfo) == ("QueueNameExists", 400)
    with pytest.raises(ClientError) as excinfo:
        await asyncio.to_thread(sqs.get_queue_url, QueueName=name)
    assert error_of(excinfo) == ("QueueDoesNotExist", 400)


async def test_expired_messages_are_deleted_not_dead_lettered_as_on_aws(sqs, sqs_server, name):
    dlq = (await asyncio.to_thread(sqs.create_queue, QueueName=f"{name}-dlq"))["QueueUrl"]
    dlq_arn = attributes(sqs, dlq, "QueueArn")["QueueArn"]
    url = (await asyncio.to_thread(sqs.create_queue, QueueName=name, Attributes={
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 2})}))["QueueUrl"]  # fmt: skip
    async with chute.AsyncClient(sqs_server.url) as client:
        [info] = [q for q in await client.list_queues() if q.name == name]
        assert info.settings.on_expiry == "drop" and info.settings.dead_letter_queue == f"{name}-dlq"
        await client.update_queue(name, retention_s=0.2)  # below SQS's 60 s minimum: only Chute can wait less
        await asyncio.to_thread(sqs.send_message, QueueUrl=url, MessageBody="short-lived")
        async with asyncio.timeout(10):
            while (await client.queue_stats(name)).ready:
                await asyncio.sleep(0.05)
        assert (await client.queue_stats(f"{name}-dlq")).ready == 0  # gone, not moved to the dead-letter queue
    assert attributes(sqs, dlq, "ApproximateNumberOfMessages")["ApproximateNumberOfMessages"] == "0"
