"""SQS sends count toward the memory high-water mark: SendMessage and SendMessageBatch hold their request body's
bytes until the messages are durable or the send failed; over the mark they are answered `RequestThrottled`
(HTTP 403, the code and status botocore retries in its legacy, standard and adaptive modes), in the JSON protocol
before the body is read; below half of the mark sends go through again; the accounting comes back to 0 after a
success, a failure and a client that hangs up.

Durability is held by making the file store's fsync wait (the store's writer thread blocks in `Fs._fsync` until
the test releases it); boto3 calls that must wait for it run in threads."""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from chute.testing import running_server
from tests.held_fsync import HeldFsync
from tests.sqs.boto3_support import client_for, error_of, wait_until
from tests.sqs.compat_support import query_client

pytestmark = pytest.mark.timeout(90)
MARK = 2**20  # the smallest memory_high_water_bytes allowed
BODY = 250_000  # five of these are over the mark (and each is under SQS's 256 KiB)
WAIT_LIMIT_S = 10.0


@pytest.fixture
def running():
    with running_server(fsync="always", memory_high_water_bytes=MARK) as server:
        held = HeldFsync(server)
        server.fsync = held
        try:
            yield server
        finally:
            held.release()  # a stopping server flushes: never leave its writer waiting


@pytest.fixture
def sqs(running):
    client = client_for(running.http_port)  # retries off: every error is seen as sent
    yield client
    client.close()


@pytest.fixture
def pool():
    with ThreadPoolExecutor(8) as executor:
        yield executor


def raw_send(port: int, length: int, body: bytes = b"") -> socket.socket:
    """A connection that sent a JSON-protocol SendMessage's head announcing `length` bytes, and `body`."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_LIMIT_S)
    head = ("POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Amz-Target: AmazonSQS.SendMessage\r\n"
            f"Content-Type: application/x-amz-json-1.0\r\nContent-Length: {length}\r\n\r\n")  # fmt: skip
    sock.sendall(head.encode() + body)
    return sock


def test_in_flight_sends_are_counted_until_durable(running, sqs, pool):
    server = running.server
    url = sqs.create_queue(QueueName="q")["QueueUrl"]
    running.fsync.hold()
    one = pool.submit(sqs.send_message, QueueUrl=url, MessageBody="a" * BODY)
    batch = pool.submit(sqs.send_message_batch, QueueUrl=url,
                        Entries=[{"Id": str(i), "MessageBody": "b" * 1000} for i in range(3)])  # fmt: skip
    wait_until(lambda: server.publish_bytes > BODY + 3000, what="both sends to be counted")
    assert server.publish_bytes < BODY + 3000 + 1000  # the request bodies: messages plus a little JSON
    assert not one.done() and not batch.done()  # not durable yet: not answered yet
    running.fsync.release()
    assert one.result(WAIT_LIMIT_S)["MessageId"]
    assert len(batch.result(WAIT_LIMIT_S)["Successful"]) == 3
    assert server.publish_bytes == 0


def test_over_the_mark_sends_are_throttled(running, sqs, pool, tmp_path):
    server = running.server
    url = sqs.create_queue(QueueName="q")["QueueUrl"]
    running.fsync.hold()
    sends = [pool.submit(sqs.send_message, QueueUrl=url, MessageBody=f"{i}" * BODY) for i in range(5)]
    wait_until(lambda: server.memory_paused, what="the memory high-water mark")
    assert server.publish_bytes > MARK and server.backpressure_pauses == 1

    with pytest.raises(sqs.exceptions.RequestThrottled) as excinfo:  # the error botocore models for sends
        sqs.send_message(QueueUrl=url, MessageBody="refused")
    assert error_of(excinfo) == ("RequestThrottled", 403)
    assert "high-water mark" in excinfo.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as excinfo:
        sqs.send_message_batch(QueueUrl=url, Entries=[{"Id": "1", "MessageBody": "refused"}])
    assert error_of(excinfo) == ("RequestThrottled", 403)

    # Only the head is sent: the answer comes without the server waiting for (or reading) the body.
    with raw_send(running.http_port, 1_000_000) as sock, sock.makefile("rb") as answer:
        assert answer.readline().split()[1] == b"403"
        headers = {}
        while (line := answer.readline().strip()) and b":" in line:
            key, _, value = line.partition(b":")
            headers[key.strip().lower()] = value.strip()
        assert headers[b"x-amzn-query-error"] == b"RequestThrottled;Sender"
        sock.sendall(b"x" * 1_000_000)  # the body it announced (the server discards it): a clean end

    # The query protocol (its action is in the form): the same code, in XML.
    legacy = query_client(running.http_url, tmp_path)
    with pytest.raises(ClientError) as excinfo:
        legacy.send_message(QueueUrl=url, MessageBody="refused")
    assert error_of(excinfo) == ("RequestThrottled", 403)

    # botocore retries it, in the default (legacy) mode and in the standard one.
    for mode in ("legacy", "standard"):
        retrying = boto3.client("sqs", endpoint_url=running.http_url, region_name="us-east-1",
                                aws_access_key_id="test", aws_secret_access_key="test",
                                config=Config(retries={"mode": mode, "total_max_attempts": 2}))  # fmt: skip
        with pytest.raises(ClientError) as excinfo:
            retrying.send_message(QueueUrl=url, MessageBody="refused")
        assert excinfo.value.response["ResponseMetadata"]["RetryAttempts"] == 1, mode
        retrying.close()

    # Other actions are served as usual.
    assert sqs.receive_message(QueueUrl=url).get("Messages", []) == []  # nothing is durable yet
    running.fsync.release()
    assert all(send.result(WAIT_LIMIT_S)["MessageId"] for send in sends)
    wait_until(lambda: server.publish_bytes == 0, what="the accounting to come back to 0")
    assert not server.memory_paused
    # Below the mark again: sends go through; none of the refused ones was stored.
    sqs.send_message(QueueUrl=url, MessageBody="after")
    legacy.send_message(QueueUrl=url, MessageBody="after, in XML")
    assert server.publish_bytes == 0
    bodies = []
    while got := sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages"):
        bodies += [m["Body"] for m in got]
    assert sorted(bodies) == sorted([f"{i}" * BODY for i in range(5)] + ["after", "after, in XML"])


def test_the_accounting_comes_back_to_0_after_failed_sends(running, sqs, tmp_path):
    server = running.server
    url = sqs.create_queue(QueueName="q")["QueueUrl"]
    with pytest.raises(ClientError) as excinfo:
        sqs.send_message(QueueUrl=url + "-missing", MessageBody="x" * BODY)
    assert error_of(excinfo) == ("QueueDoesNotExist", 400)
    with pytest.raises(ClientError) as excinfo:
        sqs.send_message_batch(QueueUrl=url, Entries=[{"Id": "1", "MessageBody": "x" * BODY}] * 2)
    assert error_of(excinfo) == ("BatchEntryIdsNotDistinct", 400)
    legacy = query_client(running.http_url, tmp_path)
    with pytest.raises(ClientError) as excinfo:
        legacy.send_message(QueueUrl=url + "-missing", MessageBody="x" * BODY)
    assert error_of(excinfo) == ("AWS.SimpleQueueService.NonExistentQueue", 400)
    assert server.publish_bytes == 0 and not server.memory_paused


def test_a_client_that_hangs_up_while_its_body_is_sent(running, sqs):
    server = running.server
    url = sqs.create_queue(QueueName="q")["QueueUrl"]
    start = json.dumps({"QueueUrl": url, "MessageBody": ""})[:-2].encode()  # the body's first bytes
    with raw_send(running.http_port, 500_000, start + b"x" * 100_000):
        # Counted from before the body is read: the announced length, up to the request limit.
        wait_until(lambda: server.publish_bytes == 500_000, what="the announced body to be counted")
    wait_until(lambda: server.publish_bytes == 0, what="the accounting to come back to 0")
    assert sqs.receive_message(QueueUrl=url).get("Messages", []) == []


def test_a_client_that_hangs_up_while_its_send_waits_for_fsync(running, sqs):
    """The send goes on (the message is stored) and holds its bytes until it is durable."""
    server = running.server
    url = sqs.create_queue(QueueName="q")["QueueUrl"]
    running.fsync.hold()
    body = json.dumps({"QueueUrl": url, "MessageBody": "w" * 100_000}).encode()
    with raw_send(running.http_port, len(body), body) as sock:
        wait_until(lambda: server.publish_bytes == len(body), what="the send to be counted")
        ours = sock.getsockname()
        [handler] = [h for h in list(server._http_runner.server.connections)  # aiohttp's side of this connection
                     if h.transport is not None and h.transport.get_extra_info("peername") == ours]  # fmt: skip
    wait_until(lambda: handler.transport is None, what="the server to see the hang-up")
    assert server.publish_bytes == len(body)  # still in flight: held until durable
    running.fsync.release()
    wait_until(lambda: server.publish_bytes == 0, what="the accounting to come back to 0")
    assert [m["Body"] for m in sqs.receive_message(QueueUrl=url, WaitTimeSeconds=5)["Messages"]] == ["w" * 100_000]
