"""Helpers for the boto3 suite: one Chute server per test module, a boto3 SQS client for it, unique queue names,
and an independent implementation of the MD5 algorithms AWS documents (current botocore no longer checks them).

    def test_x(sqs, name): url = sqs.create_queue(QueueName=name)["QueueUrl"]
"""

from __future__ import annotations

import hashlib
import itertools
import re
import struct
import time

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from chute.testing import running_server

_counter = itertools.count()
CONFIG = Config(retries={"total_max_attempts": 1}, read_timeout=30, connect_timeout=5)


@pytest.fixture(scope="module")
def sqs_server():
    with running_server() as server:
        yield server


def client_for(port: int):
    return boto3.client("sqs", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                        aws_access_key_id="test", aws_secret_access_key="test", config=CONFIG)  # fmt: skip


@pytest.fixture(scope="module")
def sqs(sqs_server):
    client = client_for(sqs_server.http_port)
    yield client
    client.close()


@pytest.fixture
def name(request) -> str:
    """A queue name unique in the module's server (SQS names: letters, digits, '-' and '_')."""
    stem = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)[:60]
    return f"{stem}-{next(_counter)}"


def error_of(excinfo) -> tuple[str, int]:
    """(the error code botocore maps to an exception, the HTTP status) of a raised ClientError."""
    error: ClientError = excinfo.value
    response = error.response
    code = response["Error"].get("QueryErrorCode") or response["Error"]["Code"]
    return code, response["ResponseMetadata"]["HTTPStatusCode"]


def attributes(sqs, url: str, *names: str) -> dict[str, str]:
    return sqs.get_queue_attributes(QueueUrl=url, AttributeNames=list(names) or ["All"]).get("Attributes", {})


def wait_until(condition, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def wait_for_receiver(server, queue: str) -> None:
    """Until a receive (a long poll) waits on `queue` in the broker."""
    wait_until(lambda: bool(server.server.broker._waiters.get(queue)), what=f"a receiver on {queue}")


def md5_of_body(body: str) -> str:
    return hashlib.md5(body.encode("utf-8")).hexdigest()


def md5_of_message_attributes(attrs: dict) -> str:
    """AWS's documented algorithm, written independently of the server's."""
    buffer = b""
    for key in sorted(attrs):
        value = attrs[key]
        for text in (key, value["DataType"]):
            data = text.encode("utf-8")
            buffer += struct.pack("!I", len(data)) + data
        if "BinaryValue" in value:
            data = value["BinaryValue"]
            buffer += b"\x02" + struct.pack("!I", len(data)) + data
        else:
            data = value["StringValue"].encode("utf-8")
            buffer += b"\x01" + struct.pack("!I", len(data)) + data
    return hashlib.md5(buffer).hexdigest()
