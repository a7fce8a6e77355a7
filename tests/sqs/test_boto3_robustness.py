"""No request shape makes the SQS API fail with an internal error: every action, with each of its parameters
(from botocore's own service model) given a value of every wrong JSON type, answers a 4xx SQS error in JSON."""

from __future__ import annotations

import http.client
import json

import botocore.session
import pytest

from tests.sqs import boto3_support

sqs_server, sqs, name = boto3_support.sqs_server, boto3_support.sqs, boto3_support.name  # the fixtures

MODEL = botocore.session.get_session().get_service_model("sqs")
WRONG_VALUES = [None, 0, -1, 10**30, 1.5, True, "", "x" * 300, [], [1], {}, {"a": 1}, [{"Id": None}]]
SKIPPED = {"AddPermission", "RemovePermission"}


def _post(conn: http.client.HTTPConnection, action: str, params: object) -> tuple[int, dict]:
    conn.request("POST", "/", body=json.dumps(params), headers={
        "X-Amz-Target": f"AmazonSQS.{action}", "Content-Type": "application/x-amz-json-1.0"})  # fmt: skip
    response = conn.getresponse()
    return response.status, json.loads(response.read() or b"{}")


@pytest.mark.parametrize("action", sorted(set(MODEL.operation_names) - SKIPPED))
def test_wrong_types_are_client_errors(sqs, sqs_server, name, action):
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    arn = f"arn:aws:sqs:us-east-1:000000000000:{name}"
    valid = {"QueueUrl": url, "QueueName": name, "SourceArn": arn}
    members = MODEL.operation_model(action).input_shape.members
    conn = http.client.HTTPConnection("127.0.0.1", sqs_server.http_port, timeout=30)
    try:
        for member in members:
            for value in WRONG_VALUES:
                params = {k: v for k, v in valid.items() if k in members} | {member: value}
                status, body = _post(conn, action, params)
                assert status < 500, (action, member, value, body)
                if status >= 400:
                    assert body["__type"].startswith("com.amazonaws.sqs#"), body
        for garbage in (b"not json", b"[1, 2]", b'"string"'):
            conn.request("POST", "/", body=garbage, headers={"X-Amz-Target": f"AmazonSQS.{action}"})
            response = conn.getresponse()
            assert 400 <= response.status < 500 and b"com.amazonaws.sqs#" in response.read()
    finally:
        conn.close()
