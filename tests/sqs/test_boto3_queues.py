"""boto3 against Chute: queue actions — create, URLs, lists, attributes (defaults, ranges, persistence), tags,
purge, delete, dead-letter sources, and the shape of errors on the wire."""

from __future__ import annotations

import json
import urllib.request

import pytest
from botocore.exceptions import ClientError

from chute.testing import running_server
from tests.sqs import boto3_support
from tests.sqs.boto3_support import attributes, client_for, error_of

sqs_server, sqs, name = boto3_support.sqs_server, boto3_support.sqs, boto3_support.name  # the fixtures


def test_create_get_list_delete(sqs, sqs_server, name):
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    assert url == f"http://127.0.0.1:{sqs_server.http_port}/000000000000/{name}"
    assert sqs.get_queue_url(QueueName=name)["QueueUrl"] == url
    assert url in sqs.list_queues(QueueNamePrefix=name)["QueueUrls"]
    sqs.delete_queue(QueueUrl=url)
    assert sqs.list_queues(QueueNamePrefix=name).get("QueueUrls", []) == []
    with pytest.raises(sqs.exceptions.QueueDoesNotExist) as excinfo:
        sqs.get_queue_url(QueueName=name)
    assert error_of(excinfo) == ("QueueDoesNotExist", 400)
    with pytest.raises(sqs.exceptions.QueueDoesNotExist):
        sqs.send_message(QueueUrl=url, MessageBody="x")


def test_list_queues_prefix_and_pagination(sqs, name):
    names = [f"{name}-{i}" for i in range(7)]
    for queue in names:
        sqs.create_queue(QueueName=queue)
    sqs.create_queue(QueueName=f"other-{name}")
    assert len(sqs.list_queues(QueueNamePrefix=name)["QueueUrls"]) == 7
    seen, token = [], None
    for _ in range(10):
        page = sqs.list_queues(QueueNamePrefix=name, MaxResults=3, **({"NextToken": token} if token else {}))
        seen += page["QueueUrls"]
        assert len(page["QueueUrls"]) <= 3
        token = page.get("NextToken")
        if token is None:
            break
    assert [u.rsplit("/", 1)[1] for u in seen] == sorted(names)
    paginated = sqs.get_paginator("list_queues").paginate(QueueNamePrefix=name, PaginationConfig={"PageSize": 2})
    assert sum(len(p.get("QueueUrls", [])) for p in paginated) == 7


def test_create_existing_queue(sqs, name):
    url = sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "7"})["QueueUrl"]
    assert sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "7"})["QueueUrl"] == url
    assert sqs.create_queue(QueueName=name)["QueueUrl"] == url
    with pytest.raises(sqs.exceptions.QueueNameExists) as excinfo:
        sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "8"})
    assert error_of(excinfo) == ("QueueNameExists", 400)
    assert excinfo.value.response["Error"]["Code"] == "QueueAlreadyExists"  # the legacy code, from the header


@pytest.mark.parametrize(
    ("queue", "attrs"),
    [
        ("has space", {}),
        ("x" * 81, {}),
        ("dot.ted", {}),
        ("", {}),
        ("nofifo.fifo", {}),
        ("nosuffix", {"FifoQueue": "true"}),
    ],
)
def test_invalid_queue_names(sqs, queue, attrs):
    with pytest.raises(ClientError) as excinfo:
        sqs.create_queue(QueueName=queue, Attributes=attrs)
    assert error_of(excinfo)[0] in ("InvalidParameterValue", "MissingParameter")
    assert error_of(excinfo)[1] == 400


def test_default_attributes(sqs, name):
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    attrs = attributes(sqs, url)
    assert {k: attrs[k] for k in ("VisibilityTimeout", "DelaySeconds", "MessageRetentionPeriod",
                                  "MaximumMessageSize", "ReceiveMessageWaitTimeSeconds")} == {
        "VisibilityTimeout": "30", "DelaySeconds": "0", "MessageRetentionPeriod": "345600",
        "MaximumMessageSize": "1048576", "ReceiveMessageWaitTimeSeconds": "0",
    }  # fmt: skip
    assert attrs["QueueArn"] == f"arn:aws:sqs:us-east-1:000000000000:{name}"
    assert attrs["ApproximateNumberOfMessages"] == "0"
    assert int(attrs["CreatedTimestamp"]) > 1_700_000_000
    assert "FifoQueue" not in attrs and "RedrivePolicy" not in attrs
    assert attributes(sqs, url, "VisibilityTimeout") == {"VisibilityTimeout": "30"}


def test_set_and_get_every_settable_attribute(sqs, name):
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    values = {
        "VisibilityTimeout": "45", "DelaySeconds": "3", "MessageRetentionPeriod": "600",
        "MaximumMessageSize": "2048", "ReceiveMessageWaitTimeSeconds": "4",
        "Policy": '{"Version":"2012-10-17","Statement":[]}', "SqsManagedSseEnabled": "true",
        "KmsMasterKeyId": "alias/aws/sqs", "KmsDataKeyReusePeriodSeconds": "300",
        "RedriveAllowPolicy": '{"redrivePermission":"denyAll"}',
    }  # fmt: skip
    sqs.set_queue_attributes(QueueUrl=url, Attributes=values)
    got = attributes(sqs, url)
    assert {k: got[k] for k in values} == values
    assert int(got["LastModifiedTimestamp"]) >= int(got["CreatedTimestamp"])
    sqs.set_queue_attributes(QueueUrl=url, Attributes={"VisibilityTimeout": "0"})
    assert attributes(sqs, url, "VisibilityTimeout") == {"VisibilityTimeout": "0"}


@pytest.mark.parametrize(
    ("attribute", "value", "code"),
    [
        ("VisibilityTimeout", "43201", "InvalidAttributeValue"),
        ("VisibilityTimeout", "-1", "InvalidAttributeValue"),
        ("VisibilityTimeout", "ten", "InvalidAttributeValue"),
        ("DelaySeconds", "901", "InvalidAttributeValue"),
        ("MessageRetentionPeriod", "59", "InvalidAttributeValue"),
        ("MessageRetentionPeriod", "1209601", "InvalidAttributeValue"),
        ("MaximumMessageSize", "1023", "InvalidAttributeValue"),
        ("MaximumMessageSize", "1048577", "InvalidAttributeValue"),
        ("ReceiveMessageWaitTimeSeconds", "21", "InvalidAttributeValue"),
        ("SqsManagedSseEnabled", "yes", "InvalidAttributeValue"),
        ("NoSuchAttribute", "1", "InvalidAttributeName"),
        ("QueueArn", "arn:aws:sqs:us-east-1:000000000000:x", "InvalidAttributeName"),
        ("ApproximateNumberOfMessages", "3", "InvalidAttributeName"),
        ("FifoQueue", "true", "InvalidAttributeName"),
        ("ContentBasedDeduplication", "true", "InvalidAttributeName"),
        ("RedrivePolicy", "{not json", "InvalidParameterValue"),
        ("RedrivePolicy", '{"maxReceiveCount": 3}', "InvalidParameterValue"),
        ("RedriveAllowPolicy", '{"redrivePermission": "some"}', "InvalidParameterValue"),
    ],
)
def test_attribute_errors(sqs, name, attribute, value, code):
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    with pytest.raises(ClientError) as excinfo:
        sqs.set_queue_attributes(QueueUrl=url, Attributes={attribute: value})
    assert error_of(excinfo) == (code, 400)
    with pytest.raises(ClientError) as excinfo:
        sqs.create_queue(QueueName=f"{name}-new", Attributes={attribute: value})
    assert error_of(excinfo)[0] == ("InvalidParameterValue" if attribute == "FifoQueue" else code)  # no .fifo
    assert sqs.list_queues(QueueNamePrefix=f"{name}-new").get("QueueUrls", []) == []
    with pytest.raises(ClientError) as excinfo:
        sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["Nope"])
    assert error_of(excinfo) == ("InvalidAttributeName", 400)


def test_redrive_policy_and_dead_letter_sources(sqs, name):
    dlq = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
    dlq_arn = attributes(sqs, dlq, "QueueArn")["QueueArn"]
    policy = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 3})
    sources = [sqs.create_queue(QueueName=f"{name}-s{i}", Attributes={"RedrivePolicy": policy})["QueueUrl"]
               for i in range(3)]  # fmt: skip
    assert json.loads(attributes(sqs, sources[0], "RedrivePolicy")["RedrivePolicy"]) == {
        "deadLetterTargetArn": dlq_arn, "maxReceiveCount": 3}  # fmt: skip
    assert sorted(sqs.list_dead_letter_source_queues(QueueUrl=dlq)["queueUrls"]) == sources
    page = sqs.list_dead_letter_source_queues(QueueUrl=dlq, MaxResults=2)
    assert len(page["queueUrls"]) == 2 and page["NextToken"]
    rest = sqs.list_dead_letter_source_queues(QueueUrl=dlq, MaxResults=2, NextToken=page["NextToken"])
    assert page["queueUrls"] + rest["queueUrls"] == sources and "NextToken" not in rest
    sqs.set_queue_attributes(QueueUrl=sources[2], Attributes={"RedrivePolicy": ""})
    assert "RedrivePolicy" not in attributes(sqs, sources[2])
    with pytest.raises(ClientError) as excinfo:  # Chute keeps a dead-letter queue while queues use it
        sqs.delete_queue(QueueUrl=dlq)
    assert error_of(excinfo) == ("InvalidParameterValue", 400)
    missing = json.dumps({"deadLetterTargetArn": dlq_arn + "-gone", "maxReceiveCount": 3})
    with pytest.raises(sqs.exceptions.QueueDoesNotExist):
        sqs.set_queue_attributes(QueueUrl=sources[0], Attributes={"RedrivePolicy": missing})
    too_many = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 1001})
    with pytest.raises(ClientError) as excinfo:
        sqs.set_queue_attributes(QueueUrl=sources[0], Attributes={"RedrivePolicy": too_many})
    assert error_of(excinfo) == ("InvalidParameterValue", 400)


def test_redrive_allow_policy_is_enforced(sqs, name):
    dlq = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
    dlq_arn = attributes(sqs, dlq, "QueueArn")["QueueArn"]
    allowed = sqs.create_queue(QueueName=f"{name}-allowed")["QueueUrl"]
    other = sqs.create_queue(QueueName=f"{name}-other")["QueueUrl"]
    allowed_arn = attributes(sqs, allowed, "QueueArn")["QueueArn"]
    rule = json.dumps({"redrivePermission": "byQueue", "sourceQueueArns": [allowed_arn]})
    sqs.set_queue_attributes(QueueUrl=dlq, Attributes={"RedriveAllowPolicy": rule})
    policy = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 2})
    sqs.set_queue_attributes(QueueUrl=allowed, Attributes={"RedrivePolicy": policy})
    with pytest.raises(ClientError) as excinfo:
        sqs.set_queue_attributes(QueueUrl=other, Attributes={"RedrivePolicy": policy})
    assert error_of(excinfo) == ("InvalidParameterValue", 400)


def test_tags(sqs, name):
    url = sqs.create_queue(QueueName=name, tags={"team": "core", "env": "ci"})["QueueUrl"]
    assert sqs.list_queue_tags(QueueUrl=url)["Tags"] == {"team": "core", "env": "ci"}
    sqs.tag_queue(QueueUrl=url, Tags={"env": "prod", "cost": "42"})
    assert sqs.list_queue_tags(QueueUrl=url)["Tags"] == {"team": "core", "env": "prod", "cost": "42"}
    sqs.untag_queue(QueueUrl=url, TagKeys=["team", "cost", "absent"])
    assert sqs.list_queue_tags(QueueUrl=url)["Tags"] == {"env": "prod"}
    sqs.untag_queue(QueueUrl=url, TagKeys=["env"])
    assert sqs.list_queue_tags(QueueUrl=url).get("Tags", {}) == {}
    with pytest.raises(ClientError) as excinfo:
        sqs.tag_queue(QueueUrl=url, Tags={f"k{i}": "v" for i in range(51)})
    assert error_of(excinfo) == ("InvalidParameterValue", 400)


def test_counts_and_purge(sqs, name):
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    for i in range(5):
        sqs.send_message(QueueUrl=url, MessageBody=f"m{i}")
    sqs.send_message(QueueUrl=url, MessageBody="later", DelaySeconds=60)
    sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=2)
    counts = attributes(sqs, url, "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
                        "ApproximateNumberOfMessagesDelayed")  # fmt: skip
    assert counts == {"ApproximateNumberOfMessages": "3", "ApproximateNumberOfMessagesNotVisible": "2",
                      "ApproximateNumberOfMessagesDelayed": "1"}  # fmt: skip
    sqs.purge_queue(QueueUrl=url)
    assert attributes(sqs, url, "ApproximateNumberOfMessages")["ApproximateNumberOfMessages"] == "0"
    assert sqs.receive_message(QueueUrl=url).get("Messages", []) == []


def test_attributes_and_tags_survive_a_restart(tmp_path):
    def create(port):
        sqs = client_for(port)
        url = sqs.create_queue(QueueName="kept", Attributes={"MaximumMessageSize": "4096",
                               "ReceiveMessageWaitTimeSeconds": "2", "VisibilityTimeout": "12"},
                               tags={"a": "b"})["QueueUrl"]  # fmt: skip
        created = attributes(sqs, url)["CreatedTimestamp"]
        sqs.close()
        return created

    with running_server(str(tmp_path)) as server:
        created = create(server.http_port)
    with running_server(str(tmp_path)) as server:
        sqs = client_for(server.http_port)
        url = sqs.get_queue_url(QueueName="kept")["QueueUrl"]
        got = attributes(sqs, url)
        assert (got["MaximumMessageSize"], got["ReceiveMessageWaitTimeSeconds"], got["VisibilityTimeout"]) == (
            "4096", "2", "12")  # fmt: skip
        assert got["CreatedTimestamp"] == created
        assert sqs.list_queue_tags(QueueUrl=url)["Tags"] == {"a": "b"}
        sqs.close()


def _raw(port: int, target: str, body: dict) -> tuple[int, dict, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/", data=json.dumps(body).encode(), method="POST",
        headers={"X-Amz-Target": target, "Content-Type": "application/x-amz-json-1.0"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


def test_errors_carry_json_type_and_query_error_header(sqs_server):
    status, headers, body = _raw(sqs_server.http_port, "AmazonSQS.GetQueueUrl", {"QueueName": "absent"})
    assert status == 400
    assert body["__type"] == "com.amazonaws.sqs#QueueDoesNotExist" and body["message"]
    assert headers["x-amzn-query-error"] == "AWS.SimpleQueueService.NonExistentQueue;Sender"
    status, headers, body = _raw(sqs_server.http_port, "AmazonSQS.NoSuchAction", {})
    assert (status, body["__type"]) == (400, "com.amazonaws.sqs#InvalidAction")
    status, _, body = _raw(sqs_server.http_port, "AmazonSQS.CreateQueue", {})
    assert (status, body["__type"]) == (400, "com.amazonaws.sqs#MissingParameter")
