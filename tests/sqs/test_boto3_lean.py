"""The lean boto3 client docs/sqs-clients.md suggests for speed: unsigned requests and no parameter validation.
With auth off it works like any client (and the server still checks every parameter); with auth on the server
refuses it, because unsigned requests carry no credentials."""

from __future__ import annotations

import boto3
import botocore
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from chute.server.users import AccessKey, User
from chute.testing import running_server
from tests.sqs.boto3_support import CONFIG, error_of, md5_of_body, sqs_server  # noqa: F401 (a fixture)

LEAN = CONFIG.merge(Config(signature_version=botocore.UNSIGNED, parameter_validation=False))


def _lean(port: int):
    return boto3.client("sqs", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1", config=LEAN)


def test_a_lean_client_sends_receives_and_deletes_with_auth_off(sqs_server):  # noqa: F811
    sqs = _lean(sqs_server.http_port)
    url = sqs.create_queue(QueueName="lean-jobs")["QueueUrl"]
    entries = [{"Id": str(i), "MessageBody": f"job {i}"} for i in range(10)]
    sent = sqs.send_message_batch(QueueUrl=url, Entries=entries)
    assert len(sent["Successful"]) == 10 and not sent.get("Failed")
    got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1)["Messages"]
    assert sorted(m["Body"] for m in got) == sorted(e["MessageBody"] for e in entries)
    assert all(m["MD5OfBody"] == md5_of_body(m["Body"]) for m in got)
    handles = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(got)]
    assert len(sqs.delete_message_batch(QueueUrl=url, Entries=handles)["Successful"]) == 10
    assert "Messages" not in sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)


def test_without_client_side_validation_the_server_still_checks(sqs_server):  # noqa: F811
    sqs = _lean(sqs_server.http_port)
    url = sqs.create_queue(QueueName="lean-checks")["QueueUrl"]
    with pytest.raises(ClientError) as excinfo:
        sqs.receive_message(QueueUrl=url, MaxNumberOfMessages="ten")  # boto3 would have refused this itself
    assert error_of(excinfo)[1] == 400
    with pytest.raises(ClientError) as excinfo:
        sqs.send_message_batch(QueueUrl=url, Entries=[{"Id": str(i), "MessageBody": "x"} for i in range(11)])
    assert error_of(excinfo) == ("TooManyEntriesInBatchRequest", 400)


def test_with_auth_on_an_unsigned_client_is_refused():
    with running_server(users=[User(name="admin", superuser=True, access_keys=[AccessKey(id="AK", secret="s")])]) as s:
        sqs = _lean(s.http_port)
        with pytest.raises(ClientError) as excinfo:
            sqs.list_queues()
        assert error_of(excinfo) == ("IncompleteSignature", 400)
