"""aiobotocore against Chute: what an asyncio application does with SQS, through one shared client — queues, sends
and batches, long polls released by other tasks, deletes, visibility, message attributes with their MD5s, FIFO
queues, errors, SigV4 with auth on — and the example in docs/sqs-clients.md, run as written."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import time
from pathlib import Path

import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError

from chute.server.users import AccessKey, Grant, User
from chute.testing import running_server
from tests.sqs import boto3_support
from tests.sqs.boto3_support import error_of, md5_of_body, md5_of_message_attributes

pytestmark = pytest.mark.timeout(60)

sqs_server, name = boto3_support.sqs_server, boto3_support.name  # the fixtures

DOC = (Path(__file__).parents[2] / "docs" / "sqs-clients.md").read_text(encoding="utf-8")


def _config(**options) -> AioConfig:
    return AioConfig(retries={"total_max_attempts": 1}, read_timeout=30, connect_timeout=5, **options)


def _client(port: int, key: str = "test", secret: str = "test", **options):
    """An aiobotocore SQS client (an async context manager), as an application makes one."""
    return get_session().create_client("sqs", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                                       aws_access_key_id=key, aws_secret_access_key=secret,
                                       config=_config(**options))  # fmt: skip


@pytest.fixture
async def sqs(sqs_server):
    async with _client(sqs_server.http_port) as client:
        yield client


async def _until(condition, what: str, timeout_s: float = 10.0) -> None:
    """Until `condition()` holds, without blocking the event loop."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def _receivers(server, queue: str) -> int:
    """How many receives (long polls) wait on `queue` in the broker."""
    return len(server.server.broker._waiters.get(queue) or ())


async def _count(sqs, url: str) -> tuple[int, int]:
    got = (await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]))["Attributes"]  # fmt: skip
    return int(got["ApproximateNumberOfMessages"]), int(got["ApproximateNumberOfMessagesNotVisible"])


def test_the_documented_example_runs_as_written(sqs_server):
    section = DOC.split("## aiobotocore (asyncio)\n", 1)[1].split("\n## ", 1)[0]
    [example] = re.findall(r"```python\n(.*?)```", section, re.S)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(example.replace("127.0.0.1:6161", f"127.0.0.1:{sqs_server.http_port}"), {})
    assert printed.getvalue() == "report 7 is ready\n"
    import chute

    with chute.Client(sqs_server.url) as client:  # the SQS queue is the Chute queue: sent once, deleted once
        stats = client.queue_stats("reports")
        assert (stats.published, stats.acked, stats.ready, stats.in_flight) == (1, 1, 0, 0)


async def test_create_get_url_list_and_delete_queues(sqs, name):
    url = (await sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "45"}))["QueueUrl"]
    assert re.fullmatch(rf"http://127\.0\.0\.1:\d+/000000000000/{name}", url)
    assert (await sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "45"}))["QueueUrl"] == url
    assert (await sqs.get_queue_url(QueueName=name))["QueueUrl"] == url
    others = [(await sqs.create_queue(QueueName=f"{name}-{i}"))["QueueUrl"] for i in range(3)]
    assert sorted((await sqs.list_queues(QueueNamePrefix=name))["QueueUrls"]) == sorted([url, *others])
    paginator = sqs.get_paginator("list_queues")
    pages = [page async for page in paginator.paginate(QueueNamePrefix=name, PaginationConfig={"PageSize": 2})]
    assert [len(page["QueueUrls"]) for page in pages] == [2, 2]  # the async paginator follows NextToken
    assert sorted(u for page in pages for u in page["QueueUrls"]) == sorted([url, *others])
    got = await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["VisibilityTimeout", "QueueArn"])
    assert got["Attributes"] == {"VisibilityTimeout": "45", "QueueArn": f"arn:aws:sqs:us-east-1:000000000000:{name}"}
    await sqs.delete_queue(QueueUrl=others[0])
    assert others[0] not in (await sqs.list_queues(QueueNamePrefix=name))["QueueUrls"]


async def test_send_batch_receive_and_delete_batch(sqs, name):
    url = (await sqs.create_queue(QueueName=name))["QueueUrl"]
    one = await sqs.send_message(QueueUrl=url, MessageBody="single")
    assert one["MD5OfMessageBody"] == md5_of_body("single")
    entries = [{"Id": f"e{i}", "MessageBody": f"batch {i}"} for i in range(9)]
    batch = await sqs.send_message_batch(QueueUrl=url, Entries=entries)
    assert sorted(r["Id"] for r in batch["Successful"]) == sorted(e["Id"] for e in entries)
    assert batch.get("Failed", []) == []
    assert {r["MD5OfMessageBody"] for r in batch["Successful"]} == {md5_of_body(e["MessageBody"]) for e in entries}
    received = []
    while len(received) < 10:
        got = await sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        assert got.get("Messages"), f"only {len(received)} of 10 messages came back"
        received += got["Messages"]
    assert sorted(m["Body"] for m in received) == sorted(["single"] + [e["MessageBody"] for e in entries])
    assert all(m["MD5OfBody"] == md5_of_body(m["Body"]) for m in received)
    assert await _count(sqs, url) == (0, 10)  # all in flight
    [first, *rest] = received
    await sqs.delete_message(QueueUrl=url, ReceiptHandle=first["ReceiptHandle"])
    deleted = await sqs.delete_message_batch(QueueUrl=url, Entries=[
        {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(rest)] + [
        {"Id": "bogus", "ReceiptHandle": "not-a-receipt-handle"}])  # fmt: skip
    assert sorted(r["Id"] for r in deleted["Successful"]) == sorted(str(i) for i in range(len(rest)))
    assert [f["Id"] for f in deleted["Failed"]] == ["bogus"] and deleted["Failed"][0]["SenderFault"] is True
    assert await _count(sqs, url) == (0, 0)
    assert (await sqs.receive_message(QueueUrl=url, VisibilityTimeout=0)).get("Messages", []) == []


async def test_sends_from_many_tasks_at_once_through_one_client(sqs, name):
    url = (await sqs.create_queue(QueueName=name))["QueueUrl"]
    sent = await asyncio.gather(*(sqs.send_message(QueueUrl=url, MessageBody=f"task {i}") for i in range(50)))
    assert len({r["MessageId"] for r in sent}) == 50
    bodies = []
    while len(bodies) < 50:
        got = (await sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1)).get("Messages")
        assert got, f"only {len(bodies)} of 50 messages came back"
        bodies += [m["Body"] for m in got]
        await sqs.delete_message_batch(QueueUrl=url, Entries=[
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(got)])  # fmt: skip
    assert sorted(bodies) == sorted(f"task {i}" for i in range(50))


async def test_a_long_poll_is_released_by_a_send_from_another_task(sqs, sqs_server, name):
    url = (await sqs.create_queue(QueueName=name))["QueueUrl"]
    started = time.monotonic()
    receive = asyncio.create_task(sqs.receive_message(QueueUrl=url, WaitTimeSeconds=20, MaxNumberOfMessages=10))
    await _until(lambda: _receivers(sqs_server, name) == 1, "the long poll to reach the server")
    assert not receive.done()
    sent = await sqs.send_message(QueueUrl=url, MessageBody="wake up")  # same client, while the poll is open
    got = await asyncio.wait_for(receive, 10)
    assert time.monotonic() - started < 10  # released by the send, not by the 20 s wait
    [message] = got["Messages"]
    assert (message["MessageId"], message["Body"]) == (sent["MessageId"], "wake up")


async def test_long_polls_on_several_queues_share_a_client(sqs_server, name):
    """Three tasks each wait on their queue; a fourth sends to each in turn through the same client."""
    async with _client(sqs_server.http_port, max_pool_connections=4) as sqs:
        names = [f"{name}-{i}" for i in range(3)]
        urls = [(await sqs.create_queue(QueueName=n))["QueueUrl"] for n in names]
        polls = [asyncio.create_task(sqs.receive_message(QueueUrl=u, WaitTimeSeconds=20)) for u in urls]
        await _until(lambda: all(_receivers(sqs_server, n) == 1 for n in names), "three long polls")
        for i, url in enumerate(urls):
            await sqs.send_message(QueueUrl=url, MessageBody=f"for {i}")
            [message] = (await asyncio.wait_for(polls[i], 10))["Messages"]
            assert message["Body"] == f"for {i}"
            assert not any(poll.done() for poll in polls[i + 1 :])  # the others still wait


async def test_change_visibility_hides_and_returns_a_message(sqs, name):
    url = (await sqs.create_queue(QueueName=name))["QueueUrl"]
    await sqs.send_message_batch(QueueUrl=url, Entries=[{"Id": "a", "MessageBody": "a"},
                                                        {"Id": "b", "MessageBody": "b"}])  # fmt: skip
    got = (await sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=1))["Messages"]
    assert sorted(m["Body"] for m in got) == ["a", "b"]
    for message in got:  # keep them past the 1 s they were received for
        await sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"],
                                            VisibilityTimeout=300)  # fmt: skip
    assert (await sqs.receive_message(QueueUrl=url, WaitTimeSeconds=2)).get("Messages", []) == []
    changed = await sqs.change_message_visibility_batch(QueueUrl=url, Entries=[
        {"Id": m["Body"], "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 0} for m in got])  # fmt: skip
    assert sorted(r["Id"] for r in changed["Successful"]) == ["a", "b"]
    wanted = {"MessageSystemAttributeNames": ["ApproximateReceiveCount"]}
    again = (await sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=2, **wanted))["Messages"]
    assert sorted(m["Body"] for m in again) == ["a", "b"]
    assert {m["Attributes"]["ApproximateReceiveCount"] for m in again} == {"2"}
    with pytest.raises(ClientError) as excinfo:  # the first receive's handle names it no more (received again)
        await sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=got[0]["ReceiptHandle"],
                                            VisibilityTimeout=5)  # fmt: skip
    assert error_of(excinfo) == ("InvalidParameterValue", 400)


ATTRIBUTES = {
    "text": {"DataType": "String", "StringValue": "héllo ✓"},
    "count": {"DataType": "Number", "StringValue": "42"},
    "blob": {"DataType": "Binary", "BinaryValue": b"\x00\xffbytes"},
    "doc": {"DataType": "String.json", "StringValue": '{"a": 1}'},
}


async def test_message_attributes_round_trip_with_their_md5s(sqs, name):
    url = (await sqs.create_queue(QueueName=name))["QueueUrl"]
    body = "Grüße 🌍 <xml> & \t\n"
    sent = await sqs.send_message(QueueUrl=url, MessageBody=body, MessageAttributes=ATTRIBUTES)
    assert sent["MD5OfMessageBody"] == md5_of_body(body)
    assert sent["MD5OfMessageAttributes"] == md5_of_message_attributes(ATTRIBUTES)
    [message] = (await sqs.receive_message(QueueUrl=url, MessageAttributeNames=["All"]))["Messages"]
    assert message["Body"] == body and message["MD5OfBody"] == md5_of_body(body)
    assert message["MessageAttributes"] == ATTRIBUTES  # binary values come back as bytes
    assert message["MD5OfMessageAttributes"] == md5_of_message_attributes(ATTRIBUTES)
    await sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0)
    [selected] = (await sqs.receive_message(QueueUrl=url, WaitTimeSeconds=2, MessageAttributeNames=["text"]))[
        "Messages"]  # fmt: skip
    assert selected["MessageAttributes"] == {"text": ATTRIBUTES["text"]}
    assert selected["MD5OfMessageAttributes"] == md5_of_message_attributes({"text": ATTRIBUTES["text"]})


async def test_fifo_queue_keeps_order_and_drops_duplicates(sqs, name):
    url = (await sqs.create_queue(QueueName=f"{name}.fifo", Attributes={"FifoQueue": "true"}))["QueueUrl"]
    ids, sequence = {}, []
    for body in ("one", "two", "three", "four"):
        sent = await sqs.send_message(QueueUrl=url, MessageBody=body, MessageGroupId="orders",
                                      MessageDeduplicationId=f"dedup-{body}")  # fmt: skip
        ids[body] = sent["MessageId"]
        sequence.append(int(sent["SequenceNumber"]))
    assert sequence == sorted(sequence) and len(set(sequence)) == 4
    retry = await sqs.send_message(QueueUrl=url, MessageBody="two, sent again", MessageGroupId="orders",
                                   MessageDeduplicationId="dedup-two")  # fmt: skip
    assert retry["MessageId"] == ids["two"]  # accepted as the message already sent, not queued again
    batch = await sqs.send_message_batch(QueueUrl=url, Entries=[
        {"Id": "5", "MessageBody": "five", "MessageGroupId": "orders", "MessageDeduplicationId": "dedup-five"},
        {"Id": "1", "MessageBody": "one again", "MessageGroupId": "orders", "MessageDeduplicationId": "dedup-one"},
    ])  # fmt: skip
    assert {r["Id"]: r["MessageId"] for r in batch["Successful"]}["1"] == ids["one"]
    bodies = []
    while True:
        wanted = {"MessageSystemAttributeNames": ["MessageGroupId"]}
        got = (await sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, **wanted)).get("Messages", [])
        if not got:
            break
        for message in got:
            assert message["Attributes"]["MessageGroupId"] == "orders"
            bodies.append(message["Body"])
            await sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
        assert len(bodies) <= 5, bodies
    assert bodies == ["one", "two", "three", "four", "five"]


async def test_a_missing_queue_raises_the_clients_queue_does_not_exist(sqs, sqs_server, name):
    with pytest.raises(sqs.exceptions.QueueDoesNotExist) as excinfo:
        await sqs.get_queue_url(QueueName=f"{name}-nowhere")
    assert error_of(excinfo) == ("QueueDoesNotExist", 400)
    with pytest.raises(sqs.exceptions.QueueDoesNotExist):
        await sqs.send_message(QueueUrl=f"http://127.0.0.1:{sqs_server.http_port}/000000000000/{name}-nowhere",
                               MessageBody="lost")  # fmt: skip
    url = (await sqs.create_queue(QueueName=name))["QueueUrl"]
    await sqs.delete_queue(QueueUrl=url)
    with pytest.raises(sqs.exceptions.QueueDoesNotExist):
        await sqs.receive_message(QueueUrl=url)


USERS = [
    User(name="worker", access_keys=[AccessKey(id="AKCHWORKER", secret="worker-secret")],
         grants=[Grant(allow=["publish", "consume"], queues="jobs-*")]),
    User(name="admin", superuser=True, access_keys=[AccessKey(id="AKCHADMIN", secret="admin-secret")]),
]  # fmt: skip


@pytest.fixture(scope="module")
def auth_server():
    with running_server(users=USERS) as running:
        yield running


async def test_with_auth_on_signed_requests_work_and_a_wrong_secret_is_refused(auth_server):
    port = auth_server.http_port
    async with _client(port, "AKCHADMIN", "admin-secret") as admin:
        url = (await admin.create_queue(QueueName="jobs-async"))["QueueUrl"]
    async with _client(port, "AKCHWORKER", "worker-secret") as worker:
        await worker.send_message(QueueUrl=url, MessageBody="signed")
        [message] = (await worker.receive_message(QueueUrl=url, WaitTimeSeconds=2))["Messages"]
        assert message["Body"] == "signed"
        await worker.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
        with pytest.raises(ClientError) as excinfo:  # signed correctly, but not granted
            await worker.create_queue(QueueName="other")
        assert error_of(excinfo) == ("AccessDenied", 403)
    async with _client(port, "AKCHWORKER", "not-the-secret") as wrong:
        for call, params in ((wrong.list_queues, {}), (wrong.send_message, {"QueueUrl": url, "MessageBody": "x"})):
            with pytest.raises(ClientError) as excinfo:
                await call(**params)
            assert error_of(excinfo) == ("SignatureDoesNotMatch", 403)
    async with _client(port, "AKCHADMIN", "admin-secret") as admin:  # the refused send sent nothing
        assert (await admin.receive_message(QueueUrl=url)).get("Messages", []) == []
