"""boto3 against Chute with auth on: access keys are verified with SigV4 and mapped to users and their grants."""

from __future__ import annotations

import json
import urllib.request

import boto3
import pytest
from botocore.exceptions import ClientError

from chute.server.users import AccessKey, Grant, User
from chute.testing import running_server
from tests.sqs.boto3_support import CONFIG, error_of

USERS = [
    User(name="admin", superuser=True, access_keys=[AccessKey(id="AKCHADMIN", secret="admin-secret")]),
    User(name="alice", access_keys=[AccessKey(id="AKCHALICE", secret="alice-secret")],
         grants=[Grant(allow=["publish", "consume"], queues="alice-*")]),
]  # fmt: skip


@pytest.fixture(scope="module")
def server():
    with running_server(users=USERS) as running:
        yield running


def _client(server, key: str, secret: str):
    return boto3.client("sqs", endpoint_url=f"http://127.0.0.1:{server.http_port}", region_name="eu-west-1",
                        aws_access_key_id=key, aws_secret_access_key=secret, config=CONFIG)  # fmt: skip


def test_unknown_key_and_wrong_secret_are_refused(server):
    with pytest.raises(ClientError) as excinfo:
        _client(server, "AKCHNOBODY", "x").list_queues()
    assert error_of(excinfo) == ("InvalidClientTokenId", 403)
    with pytest.raises(ClientError) as excinfo:
        _client(server, "AKCHALICE", "not-her-secret").list_queues()
    assert error_of(excinfo) == ("SignatureDoesNotMatch", 403)
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.http_port}/", data=b"{}", method="POST",
        headers={"X-Amz-Target": "AmazonSQS.ListQueues", "Content-Type": "application/x-amz-json-1.0"},
    )  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as unsigned:
        urllib.request.urlopen(request, timeout=10)
    assert unsigned.value.code in (400, 403)
    assert json.loads(unsigned.value.read())["__type"].startswith("com.amazonaws.sqs#")


def test_grants_apply(server):
    admin = _client(server, "AKCHADMIN", "admin-secret")
    alice = _client(server, "AKCHALICE", "alice-secret")
    mine = admin.create_queue(QueueName="alice-jobs")["QueueUrl"]
    theirs = admin.create_queue(QueueName="bob-jobs")["QueueUrl"]
    assert mine.endswith("/000000000000/alice-jobs")
    assert admin.get_queue_attributes(QueueUrl=mine, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"] == (
        "arn:aws:sqs:eu-west-1:000000000000:alice-jobs")  # the region the request was signed for
    alice.send_message(QueueUrl=mine, MessageBody="hers")
    [message] = alice.receive_message(QueueUrl=mine)["Messages"]
    alice.delete_message(QueueUrl=mine, ReceiptHandle=message["ReceiptHandle"])
    assert alice.list_queues()["QueueUrls"] == [mine]
    for call, params in (
        (alice.send_message, {"QueueUrl": theirs, "MessageBody": "x"}),
        (alice.receive_message, {"QueueUrl": theirs}),
        (alice.create_queue, {"QueueName": "alice-new"}),
        (alice.purge_queue, {"QueueUrl": mine}),
        (alice.delete_queue, {"QueueUrl": mine}),
        (alice.set_queue_attributes, {"QueueUrl": mine, "Attributes": {"DelaySeconds": "1"}}),
    ):
        with pytest.raises(ClientError) as excinfo:
            call(**params)
        assert error_of(excinfo) == ("AccessDenied", 403), call
    assert admin.receive_message(QueueUrl=theirs).get("Messages", []) == []  # a refused send sent nothing
    assert "alice-new" not in str(admin.list_queues().get("QueueUrls", []))
