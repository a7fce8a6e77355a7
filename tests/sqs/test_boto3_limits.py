"""boto3 against Chute: the limits the server enforces with AWS's error codes and statuses (boto3 checks almost
none of them itself): batch sizes and entry ids, body size and characters, message attribute rules, value
ranges of every parameter."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from tests.sqs import boto3_support
from tests.sqs.boto3_support import error_of

sqs_server, sqs, name = boto3_support.sqs_server, boto3_support.sqs, boto3_support.name  # the fixtures


@pytest.fixture
def url(sqs, name) -> str:
    return sqs.create_queue(QueueName=name, Attributes={"MaximumMessageSize": "1024"})["QueueUrl"]


def _raises(call, code: str, status: int = 400, **params) -> None:
    with pytest.raises(ClientError) as excinfo:
        call(**params)
    assert error_of(excinfo) == (code, status)


def _sends(n: int) -> list[dict]:
    return [{"Id": f"m{i}", "MessageBody": "x"} for i in range(n)]


def test_batch_entries(sqs, url):
    _raises(sqs.send_message_batch, "TooManyEntriesInBatchRequest", QueueUrl=url, Entries=_sends(11))
    _raises(sqs.send_message_batch, "EmptyBatchRequest", QueueUrl=url, Entries=[])
    _raises(sqs.send_message_batch, "BatchEntryIdsNotDistinct", QueueUrl=url,
            Entries=[{"Id": "same", "MessageBody": "a"}, {"Id": "same", "MessageBody": "b"}])  # fmt: skip
    for bad_id in ("has space", "x" * 81, "dot.ted"):
        _raises(sqs.send_message_batch, "InvalidBatchEntryId", QueueUrl=url,
                Entries=[{"Id": bad_id, "MessageBody": "a"}])  # fmt: skip
    deletes = [{"Id": f"d{i}", "ReceiptHandle": "h"} for i in range(11)]
    _raises(sqs.delete_message_batch, "TooManyEntriesInBatchRequest", QueueUrl=url, Entries=deletes)
    _raises(sqs.delete_message_batch, "BatchEntryIdsNotDistinct", QueueUrl=url,
            Entries=[{"Id": "a", "ReceiptHandle": "h"}, {"Id": "a", "ReceiptHandle": "h"}])  # fmt: skip
    changes = [{"Id": f"c{i}", "ReceiptHandle": "h", "VisibilityTimeout": 1} for i in range(11)]
    _raises(sqs.change_message_visibility_batch, "TooManyEntriesInBatchRequest", QueueUrl=url, Entries=changes)
    _raises(sqs.change_message_visibility_batch, "EmptyBatchRequest", QueueUrl=url, Entries=[])
    assert sqs.receive_message(QueueUrl=url).get("Messages", []) == []  # a refused batch sends nothing
    assert len(sqs.send_message_batch(QueueUrl=url, Entries=_sends(10))["Successful"]) == 10


def test_batch_request_too_long(sqs, name):
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    entries = [{"Id": f"m{i}", "MessageBody": "x" * 200_000} for i in range(6)]
    _raises(sqs.send_message_batch, "BatchRequestTooLong", QueueUrl=url, Entries=entries)


def test_body_size(sqs, url):
    sqs.send_message(QueueUrl=url, MessageBody="x" * 1024)
    _raises(sqs.send_message, "InvalidParameterValue", QueueUrl=url, MessageBody="x" * 1025)
    _raises(sqs.send_message, "InvalidParameterValue", QueueUrl=url, MessageBody="é" * 513)  # bytes, not chars
    attribute = {"a": {"DataType": "String", "StringValue": "y" * 100}}  # names, types and values count too
    _raises(sqs.send_message, "InvalidParameterValue", QueueUrl=url, MessageBody="x" * 1000,
            MessageAttributes=attribute)  # fmt: skip
    result = sqs.send_message_batch(QueueUrl=url, Entries=[{"Id": "ok", "MessageBody": "x"},
                                                           {"Id": "big", "MessageBody": "x" * 1025}])  # fmt: skip
    assert [s["Id"] for s in result["Successful"]] == ["ok"]
    assert [(f["Id"], f["Code"]) for f in result["Failed"]] == [("big", "InvalidParameterValue")]


@pytest.mark.parametrize("body", ["nul \x00", "bell \x07", "\ufffe", "surrogate-free but \x1f"])
def test_characters_outside_the_allowed_set(sqs, url, body):
    _raises(sqs.send_message, "InvalidMessageContents", QueueUrl=url, MessageBody=body)


def test_allowed_characters(sqs, url):
    body = "tab\t lf\n cr\r ascii ~ latin é cjk 漢 emoji 🎉 private \ue000 top \U0010fffd"
    sqs.send_message(QueueUrl=url, MessageBody=body)
    [message] = sqs.receive_message(QueueUrl=url)["Messages"]
    assert message["Body"] == body


def test_empty_body(sqs, url):
    with pytest.raises(ClientError) as excinfo:
        sqs.send_message(QueueUrl=url, MessageBody="")
    assert error_of(excinfo)[0] in ("InvalidParameterValue", "MissingParameter")


@pytest.mark.parametrize(
    "attribute_name",
    ["AWS.reserved", "amazon.reserved", ".lead", "trail.", "dou..ble", "sp ace", "x" * 257, "ü", "newline\n"],
)
def test_attribute_names(sqs, url, attribute_name):
    _raises(sqs.send_message, "InvalidParameterValue", QueueUrl=url, MessageBody="x",
            MessageAttributes={attribute_name: {"DataType": "String", "StringValue": "v"}})  # fmt: skip


@pytest.mark.parametrize(
    "value",
    [
        {"DataType": "Strin", "StringValue": "v"},
        {"DataType": "", "StringValue": "v"},
        {"DataType": "String", "StringValue": ""},
        {"DataType": "Number", "StringValue": "12abc"},
        {"DataType": "Number", "StringValue": "1" * 39},
        {"DataType": "Binary", "StringValue": "not binary"},
        {"DataType": "String", "StringValue": "nul \x00"},
    ],
)
def test_attribute_values(sqs, url, value):
    _raises(sqs.send_message, "InvalidParameterValue", QueueUrl=url, MessageBody="x", MessageAttributes={"a": value})


def test_at_most_ten_attributes(sqs, url):
    many = {f"a{i}": {"DataType": "String", "StringValue": "v"} for i in range(11)}
    _raises(sqs.send_message, "InvalidParameterValue", QueueUrl=url, MessageBody="x", MessageAttributes=many)
    sqs.send_message(QueueUrl=url, MessageBody="x", MessageAttributes=dict(list(many.items())[:10]))


@pytest.mark.parametrize(
    "params",
    [
        {"MaxNumberOfMessages": 0},
        {"MaxNumberOfMessages": 11},
        {"WaitTimeSeconds": 21},
        {"WaitTimeSeconds": -1},
        {"VisibilityTimeout": 43_201},
        {"VisibilityTimeout": -1},
    ],
)
def test_receive_ranges(sqs, url, params):
    _raises(sqs.receive_message, "InvalidParameterValue", QueueUrl=url, **params)


@pytest.mark.parametrize("delay", [-1, 901])
def test_delay_range(sqs, url, delay):
    _raises(sqs.send_message, "InvalidParameterValue", QueueUrl=url, MessageBody="x", DelaySeconds=delay)
    result = sqs.send_message_batch(QueueUrl=url, Entries=[{"Id": "a", "MessageBody": "x", "DelaySeconds": delay}])
    assert [f["Code"] for f in result["Failed"]] == ["InvalidParameterValue"]


def test_list_ranges(sqs):
    _raises(sqs.list_queues, "InvalidParameterValue", MaxResults=0)
    _raises(sqs.list_queues, "InvalidParameterValue", MaxResults=1001)
    _raises(sqs.list_queues, "InvalidParameterValue", MaxResults=5, NextToken="%%%not-a-token%%%")
