"""SQS edge cases where the AWS API reference decides (issue 13), in both protocols (JSON via boto3, query/XML via
botocore with the query model): PurgeQueue removes every message, in flight and delayed ones too, durably, at
most once a minute per queue; receipt handles that are not ours, of deleted messages, or whose visibility
timeout has ended; FIFO's DelaySeconds 0 and a batch entry without MessageGroupId."""

from __future__ import annotations

import time

import pytest
from botocore.exceptions import ClientError

from chute.server.sqs.common import sqs_state
from chute.testing import running_server
from tests.sqs import boto3_support
from tests.sqs.boto3_support import attributes, client_for, wait_until
from tests.sqs.compat_support import query_client

sqs_server, name = boto3_support.sqs_server, boto3_support.name  # the fixtures

COUNTS = ("ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible", "ApproximateNumberOfMessagesDelayed")
NOTHING_LEFT = dict.fromkeys(COUNTS, "0")


@pytest.fixture(scope="module", params=["json", "query"])
def sqs(request, sqs_server, tmp_path_factory):
    """A client of the module's server in each protocol."""
    if request.param == "json":
        client = client_for(sqs_server.http_port)
    else:
        client = query_client(f"http://127.0.0.1:{sqs_server.http_port}", tmp_path_factory.mktemp("query"))
    yield client
    client.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def purge_clock(sqs_server):
    """The clock that times PurgeQueueInProgress, moved by hand."""
    state = sqs_state(sqs_server.server)
    state.clock = clock = FakeClock()
    yield clock
    state.clock = time.monotonic


def error_of(excinfo) -> tuple[str, int]:
    """(code, HTTP status): the short code in the JSON protocol, the legacy one in the query protocol."""
    response = excinfo.value.response
    return response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"]


def failures(result: dict) -> dict[str, str]:
    return {f["Id"]: f["Code"] for f in result.get("Failed", [])}


# -- PurgeQueue -------------------------------------------------------------------------------------------------


def test_purge_removes_visible_in_flight_and_delayed_messages_for_good(sqs, name, purge_clock):
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    for i in range(4):
        sqs.send_message(QueueUrl=url, MessageBody=f"m{i}")
    sqs.send_message(QueueUrl=url, MessageBody="delayed", DelaySeconds=1)
    taken = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=2, VisibilityTimeout=1)["Messages"]
    assert len(taken) == 2
    assert attributes(sqs, url, *COUNTS) == dict(zip(COUNTS, ("2", "2", "1"), strict=True))
    sqs.purge_queue(QueueUrl=url)
    assert attributes(sqs, url, *COUNTS) == NOTHING_LEFT
    # the leases (1 s) and the delay (1 s) end during this poll: nothing comes back
    assert sqs.receive_message(QueueUrl=url, WaitTimeSeconds=2).get("Messages", []) == []
    assert attributes(sqs, url, *COUNTS) == NOTHING_LEFT
    # the purged messages' handles: deleting succeeds (AWS: deleting a deleted message does), changing visibility
    # says the message does not exist
    sqs.delete_message(QueueUrl=url, ReceiptHandle=taken[0]["ReceiptHandle"])
    with pytest.raises(ClientError) as excinfo:
        sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=taken[1]["ReceiptHandle"], VisibilityTimeout=5)
    assert error_of(excinfo) == ("InvalidParameterValue", 400)
    assert "Message does not exist or is not available" in excinfo.value.response["Error"]["Message"]
    deleted = sqs.delete_message_batch(QueueUrl=url, Entries=[
        {"Id": f"d{i}", "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(taken)])  # fmt: skip
    assert len(deleted["Successful"]) == 2 and not deleted.get("Failed")


def test_purge_of_a_fifo_queue_removes_group_heads_in_flight(sqs, name, purge_clock):
    url = sqs.create_queue(QueueName=f"{name}.fifo", Attributes={"FifoQueue": "true",
                           "ContentBasedDeduplication": "true"})["QueueUrl"]  # fmt: skip
    for i in range(3):
        sqs.send_message(QueueUrl=url, MessageBody=f"a{i}", MessageGroupId="a")
    [head] = sqs.receive_message(QueueUrl=url, VisibilityTimeout=60)["Messages"]
    assert head["Body"] == "a0"
    sqs.purge_queue(QueueUrl=url)
    assert attributes(sqs, url, *COUNTS) == NOTHING_LEFT
    sqs.delete_message(QueueUrl=url, ReceiptHandle=head["ReceiptHandle"])  # purged: succeeds, as on AWS
    sqs.send_message(QueueUrl=url, MessageBody="after", MessageGroupId="a")  # the group is not stuck
    [message] = sqs.receive_message(QueueUrl=url)["Messages"]
    assert message["Body"] == "after"


def test_a_second_purge_within_60_seconds_is_refused(sqs, name, purge_clock):
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    other = sqs.create_queue(QueueName=f"{name}-other")["QueueUrl"]
    sqs.purge_queue(QueueUrl=url)
    sqs.send_message(QueueUrl=url, MessageBody="kept")
    purge_clock.now += 59
    with pytest.raises(ClientError) as excinfo:
        sqs.purge_queue(QueueUrl=url)
    code, status = error_of(excinfo)
    assert code in ("PurgeQueueInProgress", "AWS.SimpleQueueService.PurgeQueueInProgress") and status == 403
    assert "Only one PurgeQueue operation" in excinfo.value.response["Error"]["Message"]
    assert attributes(sqs, url, "ApproximateNumberOfMessages")["ApproximateNumberOfMessages"] == "1"  # untouched
    sqs.purge_queue(QueueUrl=other)  # another queue is not held up
    purge_clock.now += 1.5
    sqs.purge_queue(QueueUrl=url)
    assert attributes(sqs, url, "ApproximateNumberOfMessages")["ApproximateNumberOfMessages"] == "0"
    sqs.delete_queue(QueueUrl=url)  # a new queue of the same name may be purged at once
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    sqs.purge_queue(QueueUrl=url)


def test_purged_in_flight_messages_stay_gone_after_a_restart(tmp_path):
    with running_server(str(tmp_path)) as server:
        sqs = client_for(server.http_port)
        url = sqs.create_queue(QueueName="jobs", Attributes={"VisibilityTimeout": "300"})["QueueUrl"]
        sqs.send_message_batch(QueueUrl=url, Entries=[{"Id": f"e{i}", "MessageBody": f"m{i}"} for i in range(5)])
        sqs.send_message(QueueUrl=url, MessageBody="delayed", DelaySeconds=900)
        assert len(sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=3)["Messages"]) == 3
        sqs.purge_queue(QueueUrl=url)
        sqs.send_message(QueueUrl=url, MessageBody="after the purge")
        sqs.close()
    with running_server(str(tmp_path)) as server:  # leases do not survive a restart: purged ones must not return
        sqs = client_for(server.http_port)
        url = sqs.get_queue_url(QueueName="jobs")["QueueUrl"]
        assert attributes(sqs, url, *COUNTS) == dict(zip(COUNTS, ("1", "0", "0"), strict=True))
        [message] = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]
        assert message["Body"] == "after the purge"
        sqs.close()


# -- receipt handles --------------------------------------------------------------------------------------------


def test_receipt_handles_that_are_not_ours_are_invalid_with_status_400(sqs, name):
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    other = sqs.create_queue(QueueName=f"{name}-other")["QueueUrl"]
    sqs.send_message(QueueUrl=other, MessageBody="x")
    [message] = sqs.receive_message(QueueUrl=other, VisibilityTimeout=60)["Messages"]
    handle = message["ReceiptHandle"]
    bad = {"garbage": "not a receipt handle at all", "truncated": handle[: len(handle) // 2],
           "tampered": handle[:-6] + ("AAAAAA" if not handle.endswith("AAAAAA") else "BBBBBB"),
           "other": handle}  # fmt: skip
    for what, value in bad.items():
        with pytest.raises(ClientError) as excinfo:
            sqs.delete_message(QueueUrl=url, ReceiptHandle=value)
        assert error_of(excinfo) == ("ReceiptHandleIsInvalid", 400), what
        with pytest.raises(ClientError) as excinfo:
            sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=value, VisibilityTimeout=10)
        assert error_of(excinfo) == ("ReceiptHandleIsInvalid", 400), what
    deleted = sqs.delete_message_batch(QueueUrl=url, Entries=[
        {"Id": what, "ReceiptHandle": value} for what, value in bad.items()])  # fmt: skip
    assert failures(deleted) == dict.fromkeys(bad, "ReceiptHandleIsInvalid") and not deleted.get("Successful")
    assert all(f["SenderFault"] for f in deleted["Failed"])
    changed = sqs.change_message_visibility_batch(QueueUrl=url, Entries=[
        {"Id": what, "ReceiptHandle": value, "VisibilityTimeout": 10} for what, value in bad.items()])  # fmt: skip
    assert failures(changed) == dict.fromkeys(bad, "ReceiptHandleIsInvalid") and not changed.get("Successful")
    # the other queue's message was not touched by any of this
    assert attributes(sqs, other, "ApproximateNumberOfMessagesNotVisible")[
        "ApproximateNumberOfMessagesNotVisible"] == "1"  # fmt: skip
    sqs.delete_message(QueueUrl=other, ReceiptHandle=handle)


def test_changing_the_visibility_of_a_deleted_message_is_an_invalid_parameter(sqs, name):
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    sqs.send_message_batch(QueueUrl=url, Entries=[{"Id": "a", "MessageBody": "a"}, {"Id": "b", "MessageBody": "b"}])
    messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=2, VisibilityTimeout=60)["Messages"]
    assert len(messages) == 2
    gone, alive = messages
    sqs.delete_message(QueueUrl=url, ReceiptHandle=gone["ReceiptHandle"])
    with pytest.raises(ClientError) as excinfo:
        sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=gone["ReceiptHandle"], VisibilityTimeout=30)
    assert error_of(excinfo) == ("InvalidParameterValue", 400)
    assert excinfo.value.response["Error"]["Message"] == (
        f"Value {gone['ReceiptHandle']} for parameter ReceiptHandle is invalid. Reason: Message does not exist or is "
        "not available for visibility timeout change.")  # fmt: skip
    with pytest.raises(ClientError) as excinfo:  # visibility 0 (give it back) likewise
        sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=gone["ReceiptHandle"], VisibilityTimeout=0)
    assert error_of(excinfo) == ("InvalidParameterValue", 400)
    changed = sqs.change_message_visibility_batch(QueueUrl=url, Entries=[
        {"Id": "gone", "ReceiptHandle": gone["ReceiptHandle"], "VisibilityTimeout": 30},
        {"Id": "alive", "ReceiptHandle": alive["ReceiptHandle"], "VisibilityTimeout": 30}])  # fmt: skip
    assert failures(changed) == {"gone": "InvalidParameterValue"}
    assert [s["Id"] for s in changed["Successful"]] == ["alive"]
    sqs.delete_message(QueueUrl=url, ReceiptHandle=gone["ReceiptHandle"])  # deleting again succeeds


def _lapse(sqs, url: str) -> dict:
    """Receive the queue's one message with a lease that ends at once; return it once it is visible again."""
    [message] = sqs.receive_message(QueueUrl=url, VisibilityTimeout=0)["Messages"]
    wait_until(lambda: attributes(sqs, url, "ApproximateNumberOfMessages")["ApproximateNumberOfMessages"] == "1",
               what="the lease to end")  # fmt: skip
    return message


def test_the_latest_handle_deletes_a_message_whose_visibility_timeout_ended(sqs, name):
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="once")
    message = _lapse(sqs, url)
    with pytest.raises(ClientError) as excinfo:  # it exists but is not in flight
        sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=30)
    assert error_of(excinfo)[0] in ("MessageNotInflight", "AWS.SimpleQueueService.MessageNotInflight")
    sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    assert attributes(sqs, url, *COUNTS) == NOTHING_LEFT
    assert sqs.receive_message(QueueUrl=url).get("Messages", []) == []
    # in a batch too
    sqs.send_message(QueueUrl=url, MessageBody="twice")
    message = _lapse(sqs, url)
    deleted = sqs.delete_message_batch(
        QueueUrl=url,
        Entries=[
            {"Id": "a", "ReceiptHandle": message["ReceiptHandle"]},
            {"Id": "b", "ReceiptHandle": message["ReceiptHandle"]},
        ],
    )
    assert sorted(s["Id"] for s in deleted["Successful"]) == ["a", "b"]
    assert attributes(sqs, url, *COUNTS) == NOTHING_LEFT


def test_an_older_handle_of_a_message_received_again_deletes_nothing(sqs, name):
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="again")
    first = _lapse(sqs, url)
    [second] = sqs.receive_message(QueueUrl=url, VisibilityTimeout=60)["Messages"]
    assert second["MessageId"] == first["MessageId"]
    sqs.delete_message(QueueUrl=url, ReceiptHandle=first["ReceiptHandle"])  # succeeds, deletes nothing
    assert attributes(sqs, url, "ApproximateNumberOfMessagesNotVisible")[
        "ApproximateNumberOfMessagesNotVisible"] == "1"  # fmt: skip
    with pytest.raises(ClientError) as excinfo:
        sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=first["ReceiptHandle"], VisibilityTimeout=0)
    assert error_of(excinfo) == ("InvalidParameterValue", 400)
    sqs.delete_message(QueueUrl=url, ReceiptHandle=second["ReceiptHandle"])
    assert attributes(sqs, url, *COUNTS) == NOTHING_LEFT


def test_a_fifo_queue_refuses_the_handle_of_a_message_whose_visibility_timeout_ended(sqs, name):
    url = sqs.create_queue(QueueName=f"{name}.fifo", Attributes={"FifoQueue": "true",
                           "ContentBasedDeduplication": "true"})["QueueUrl"]  # fmt: skip
    sqs.send_message(QueueUrl=url, MessageBody="x", MessageGroupId="g")
    message = _lapse(sqs, url)
    with pytest.raises(ClientError) as excinfo:
        sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    assert error_of(excinfo) == ("InvalidParameterValue", 400)
    assert "The receipt handle has expired" in excinfo.value.response["Error"]["Message"]
    assert attributes(sqs, url, "ApproximateNumberOfMessages")["ApproximateNumberOfMessages"] == "1"


# -- FIFO sends -------------------------------------------------------------------------------------------------


def test_fifo_accepts_delay_seconds_zero_and_refuses_others(sqs, name):
    url = sqs.create_queue(QueueName=f"{name}.fifo", Attributes={"FifoQueue": "true",
                           "ContentBasedDeduplication": "true"})["QueueUrl"]  # fmt: skip
    sqs.send_message(QueueUrl=url, MessageBody="zero", MessageGroupId="g", DelaySeconds=0)
    sent = sqs.send_message_batch(QueueUrl=url, Entries=[
        {"Id": "zero", "MessageBody": "batch zero", "MessageGroupId": "g", "DelaySeconds": 0},
        {"Id": "five", "MessageBody": "batch five", "MessageGroupId": "g", "DelaySeconds": 5}])  # fmt: skip
    assert [s["Id"] for s in sent["Successful"]] == ["zero"] and failures(sent) == {"five": "InvalidParameterValue"}
    with pytest.raises(ClientError) as excinfo:
        sqs.send_message(QueueUrl=url, MessageBody="five", MessageGroupId="g", DelaySeconds=5)
    assert error_of(excinfo) == ("InvalidParameterValue", 400)
    bodies = []
    for _ in range(2):
        [message] = sqs.receive_message(QueueUrl=url)["Messages"]
        bodies.append(message["Body"])
        sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    assert bodies == ["zero", "batch zero"]


def test_a_fifo_batch_with_an_entry_without_group_is_refused_whole(sqs, name):
    url = sqs.create_queue(QueueName=f"{name}.fifo", Attributes={"FifoQueue": "true",
                           "ContentBasedDeduplication": "true"})["QueueUrl"]  # fmt: skip
    with pytest.raises(ClientError) as excinfo:
        sqs.send_message_batch(QueueUrl=url, Entries=[
            {"Id": "good", "MessageBody": "good", "MessageGroupId": "g"},
            {"Id": "lost", "MessageBody": "no group"}])  # fmt: skip
    assert error_of(excinfo) == ("InvalidParameterValue", 400)
    assert excinfo.value.response["Error"]["Message"] == "The request must contain the parameter MessageGroupId."
    assert attributes(sqs, url, *COUNTS) == NOTHING_LEFT
    assert sqs.receive_message(QueueUrl=url).get("Messages", []) == []
