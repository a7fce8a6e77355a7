"""boto3 against Chute: FIFO queues — ordering within a message group with one message in flight per group,
deduplication (explicit ids and content-based, within 5 minutes), sequence numbers, and FIFO-only rules."""

from __future__ import annotations

import hashlib

import pytest
from botocore.exceptions import ClientError

from tests.sqs import boto3_support
from tests.sqs.boto3_support import attributes, error_of

sqs_server, sqs, name = boto3_support.sqs_server, boto3_support.sqs, boto3_support.name  # the fixtures


def _fifo(sqs, name: str, **attrs: str) -> str:
    return sqs.create_queue(QueueName=f"{name}.fifo", Attributes={"FifoQueue": "true", **attrs})["QueueUrl"]


def test_fifo_attributes(sqs, name):
    url = _fifo(sqs, name, ContentBasedDeduplication="true")
    got = attributes(sqs, url)
    assert got["FifoQueue"] == "true" and got["ContentBasedDeduplication"] == "true"
    assert got["DeduplicationScope"] == "queue" and got["FifoThroughputLimit"] == "perQueue"
    sqs.set_queue_attributes(QueueUrl=url, Attributes={"ContentBasedDeduplication": "false"})
    assert attributes(sqs, url, "ContentBasedDeduplication") == {"ContentBasedDeduplication": "false"}


def test_order_within_a_group_and_one_in_flight_per_group(sqs, name):
    url = _fifo(sqs, name, ContentBasedDeduplication="true")
    for group, bodies in (("g1", "abc"), ("g2", "xy")):
        for body in bodies:
            sqs.send_message(QueueUrl=url, MessageBody=body, MessageGroupId=group)
    received = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=30)["Messages"]
    assert sorted(m["Body"] for m in received) == ["a", "x"]  # one message in flight per group
    assert sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", []) == []
    order = {"g1": [], "g2": []}
    for _ in range(10):
        if not received:
            break
        for message in received:
            order["g1" if message["Body"] in "abc" else "g2"].append(message["Body"])
            sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
        received = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
    assert order == {"g1": ["a", "b", "c"], "g2": ["x", "y"]}


def test_a_returned_message_keeps_its_place_in_the_group(sqs, name):
    url = _fifo(sqs, name, ContentBasedDeduplication="true")
    for body in ("first", "second"):
        sqs.send_message(QueueUrl=url, MessageBody=body, MessageGroupId="g")
    [message] = sqs.receive_message(QueueUrl=url)["Messages"]
    sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0)
    [again] = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=2, AttributeNames=["ApproximateReceiveCount"])[
        "Messages"]  # fmt: skip
    assert again["Body"] == "first" and again["Attributes"]["ApproximateReceiveCount"] == "2"


def test_deduplication_by_id_and_by_content(sqs, name):
    url = _fifo(sqs, name)
    one = sqs.send_message(QueueUrl=url, MessageBody="a", MessageGroupId="g", MessageDeduplicationId="d1")
    two = sqs.send_message(QueueUrl=url, MessageBody="b", MessageGroupId="g", MessageDeduplicationId="d1")
    assert one["MessageId"] == two["MessageId"]
    with pytest.raises(ClientError) as excinfo:  # no id and no content-based deduplication
        sqs.send_message(QueueUrl=url, MessageBody="c", MessageGroupId="g")
    assert error_of(excinfo) == ("InvalidParameterValue", 400)
    content = _fifo(sqs, f"{name}-c", ContentBasedDeduplication="true")
    first = sqs.send_message(QueueUrl=content, MessageBody="same", MessageGroupId="g")
    again = sqs.send_message(QueueUrl=content, MessageBody="same", MessageGroupId="other")
    other = sqs.send_message(QueueUrl=content, MessageBody="different", MessageGroupId="g")
    assert first["MessageId"] == again["MessageId"] != other["MessageId"]
    batch = sqs.send_message_batch(QueueUrl=content, Entries=[
        {"Id": "1", "MessageBody": "in batch", "MessageGroupId": "g"},
        {"Id": "2", "MessageBody": "in batch", "MessageGroupId": "g"}])["Successful"]  # fmt: skip
    assert batch[0]["MessageId"] == batch[1]["MessageId"]
    bodies = []
    for _ in range(10):
        messages = sqs.receive_message(QueueUrl=content, MaxNumberOfMessages=10, AttributeNames=["All"]).get(
            "Messages", [])  # fmt: skip
        if not messages:
            break
        for message in messages:
            bodies.append(message["Body"])
            if message["Body"] == "same":
                assert message["Attributes"]["MessageDeduplicationId"] == hashlib.sha256(b"same").hexdigest()
            sqs.delete_message(QueueUrl=content, ReceiptHandle=message["ReceiptHandle"])
    assert bodies == ["same", "different", "in batch"]


def test_sequence_numbers_and_system_attributes(sqs, name):
    url = _fifo(sqs, name)
    sent = [sqs.send_message(QueueUrl=url, MessageBody=f"m{i}", MessageGroupId="g", MessageDeduplicationId=f"d{i}")
            for i in range(3)]  # fmt: skip
    numbers = [s["SequenceNumber"] for s in sent]
    assert all(len(n) == 20 and n.isdigit() for n in numbers) and numbers == sorted(set(numbers))
    [message] = sqs.receive_message(QueueUrl=url, AttributeNames=["All"])["Messages"]
    assert message["Attributes"]["SequenceNumber"] == numbers[0]
    assert message["Attributes"]["MessageGroupId"] == "g"
    assert message["Attributes"]["MessageDeduplicationId"] == "d0"


def test_fifo_only_rules(sqs, name):
    url = _fifo(sqs, name, ContentBasedDeduplication="true")
    with pytest.raises(ClientError) as excinfo:
        sqs.send_message(QueueUrl=url, MessageBody="x")
    assert error_of(excinfo) == ("MissingParameter", 400)
    with pytest.raises(ClientError) as excinfo:
        sqs.send_message(QueueUrl=url, MessageBody="x", MessageGroupId="g", DelaySeconds=5)
    assert error_of(excinfo) == ("InvalidParameterValue", 400)
    with pytest.raises(ClientError) as excinfo:
        sqs.send_message(QueueUrl=url, MessageBody="x", MessageGroupId="bad group id \u00e9")
    assert error_of(excinfo) == ("InvalidParameterValue", 400)
    standard = sqs.create_queue(QueueName=name)["QueueUrl"]
    with pytest.raises(ClientError) as excinfo:
        sqs.send_message(QueueUrl=standard, MessageBody="x", MessageDeduplicationId="d")
    assert error_of(excinfo) == ("InvalidParameterValue", 400)
    dlq_arn = attributes(sqs, standard, "QueueArn")["QueueArn"]
    with pytest.raises(ClientError) as excinfo:  # a FIFO queue's dead-letter queue is a FIFO queue
        sqs.set_queue_attributes(QueueUrl=url, Attributes={
            "RedrivePolicy": f'{{"deadLetterTargetArn": "{dlq_arn}", "maxReceiveCount": 2}}'})  # fmt: skip
    assert error_of(excinfo) == ("InvalidParameterValue", 400)


def test_an_expired_receipt_handle_cannot_delete_from_a_fifo_queue(sqs, name):
    url = _fifo(sqs, name, ContentBasedDeduplication="true")
    sqs.send_message(QueueUrl=url, MessageBody="x", MessageGroupId="g")
    [message] = sqs.receive_message(QueueUrl=url, VisibilityTimeout=0)["Messages"]
    sqs.receive_message(QueueUrl=url, WaitTimeSeconds=2, VisibilityTimeout=30)
    with pytest.raises(ClientError) as excinfo:
        sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    assert error_of(excinfo) == ("InvalidParameterValue", 400)
    assert "expired" in excinfo.value.response["Error"]["Message"]
    result = sqs.delete_message_batch(QueueUrl=url, Entries=[{"Id": "old", "ReceiptHandle": message["ReceiptHandle"]}])
    assert [(f["Id"], f["Code"]) for f in result["Failed"]] == [("old", "InvalidParameterValue")]


def test_a_standard_queue_keeps_a_message_group_without_ordering(sqs, name):
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    for body in ("a", "b"):
        sqs.send_message(QueueUrl=url, MessageBody=body, MessageGroupId="tenant-1")  # fair queues: accepted
    messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, AttributeNames=["MessageGroupId"])["Messages"]
    assert sorted(m["Body"] for m in messages) == ["a", "b"]  # both at once: no FIFO group lock
    assert {m["Attributes"]["MessageGroupId"] for m in messages} == {"tenant-1"}
