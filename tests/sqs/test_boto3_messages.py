"""boto3 against Chute: sending, receiving, deleting, visibility, long polling, delays, dead-lettering and
message move tasks, with the MD5s and system attributes AWS documents."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from botocore.exceptions import ClientError

from chute.server.sqs.common import sqs_state
from chute.testing import running_server
from tests.sqs import boto3_support
from tests.sqs.boto3_support import (
    attributes,
    error_of,
    md5_of_body,
    md5_of_message_attributes,
    wait_for_receiver,
    wait_until,
)

sqs_server, sqs, name = boto3_support.sqs_server, boto3_support.sqs, boto3_support.name  # the fixtures

ATTRIBUTES = {
    "text": {"DataType": "String", "StringValue": "héllo ✓"},
    "count": {"DataType": "Number", "StringValue": "-12.5e3"},
    "blob": {"DataType": "Binary", "BinaryValue": b"\x00\xff\x10binary"},
    "doc": {"DataType": "String.json", "StringValue": '{"a": 1}'},
    "raw": {"DataType": "Binary.gz", "BinaryValue": b"\x1f\x8b"},
}


def test_md5_helper_matches_a_known_vector():
    attrs = {"a": {"DataType": "String", "StringValue": "x"}, "b": {"DataType": "Binary", "BinaryValue": b"\x00\x01"},
             "n": {"DataType": "Number", "StringValue": "42"}}  # fmt: skip
    assert md5_of_message_attributes(attrs) == "a072d7bddeec047541e23af075fac2b0"  # as moto computes it


def test_send_receive_delete_with_attributes_and_md5s(sqs, name):
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    body = "Grüße 🌍 <xml> & \t\n\r"
    sent = sqs.send_message(QueueUrl=url, MessageBody=body, MessageAttributes=ATTRIBUTES,
                            MessageSystemAttributes={"AWSTraceHeader": {"DataType": "String",
                                                                        "StringValue": "Root=1-abc"}})  # fmt: skip
    assert sent["MD5OfMessageBody"] == md5_of_body(body)
    assert sent["MD5OfMessageAttributes"] == md5_of_message_attributes(ATTRIBUTES)
    assert sent["MD5OfMessageSystemAttributes"] == md5_of_message_attributes(
        {"AWSTraceHeader": {"DataType": "String", "StringValue": "Root=1-abc"}})  # fmt: skip
    [message] = sqs.receive_message(QueueUrl=url, MessageAttributeNames=["All"],
                                    MessageSystemAttributeNames=["All"])["Messages"]  # fmt: skip
    assert message["MessageId"] == sent["MessageId"]
    assert message["Body"] == body and message["MD5OfBody"] == md5_of_body(body)
    assert message["MessageAttributes"] == ATTRIBUTES
    assert message["MD5OfMessageAttributes"] == md5_of_message_attributes(message["MessageAttributes"])
    system = message["Attributes"]
    assert system["ApproximateReceiveCount"] == "1" and system["AWSTraceHeader"] == "Root=1-abc"
    assert abs(int(system["SentTimestamp"]) - time.time() * 1000) < 60_000
    assert int(system["ApproximateFirstReceiveTimestamp"]) >= int(system["SentTimestamp"])
    assert "SequenceNumber" not in system and "MessageGroupId" not in system
    sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    assert attributes(sqs, url, "ApproximateNumberOfMessagesNotVisible")["ApproximateNumberOfMessagesNotVisible"] == "0"
    assert sqs.receive_message(QueueUrl=url).get("Messages", []) == []


def test_message_attribute_names_select(sqs, name):
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    for i in range(5):
        sqs.send_message(QueueUrl=url, MessageBody=f"m{i}", MessageAttributes=ATTRIBUTES)
    selections = {("text", "blob"): {"text", "blob"}, ("d.*",): set(), ("All",): set(ATTRIBUTES),
                  (".*",): set(ATTRIBUTES)}  # fmt: skip
    messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=1)["Messages"]
    assert "MessageAttributes" not in messages[0] and "MD5OfMessageAttributes" not in messages[0]
    assert "Attributes" not in messages[0]
    for wanted, expected in selections.items():
        [message] = sqs.receive_message(QueueUrl=url, MessageAttributeNames=list(wanted))["Messages"]
        got = message.get("MessageAttributes", {})
        assert set(got) == expected
        if got:
            assert message["MD5OfMessageAttributes"] == md5_of_message_attributes(got)
    prefix_url = sqs.create_queue(QueueName=f"{name}-p")["QueueUrl"]
    sqs.send_message(QueueUrl=prefix_url, MessageBody="x", MessageAttributes={
        "app.one": {"DataType": "String", "StringValue": "1"}, "app.two": {"DataType": "String", "StringValue": "2"},
        "other": {"DataType": "String", "StringValue": "3"}})  # fmt: skip
    [message] = sqs.receive_message(QueueUrl=prefix_url, MessageAttributeNames=["app.*"])["Messages"]
    assert set(message["MessageAttributes"]) == {"app.one", "app.two"}


def test_system_attribute_names_select(sqs, name):
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="x")
    [message] = sqs.receive_message(QueueUrl=url, AttributeNames=["SentTimestamp", "ApproximateReceiveCount"],
                                    VisibilityTimeout=0)["Messages"]  # fmt: skip
    assert set(message["Attributes"]) == {"SentTimestamp", "ApproximateReceiveCount"}
    with pytest.raises(ClientError) as excinfo:
        sqs.receive_message(QueueUrl=url, MessageSystemAttributeNames=["NoSuchThing"])
    assert error_of(excinfo) == ("InvalidAttributeName", 400)


def test_visibility_timeout_expiry_and_redelivery(sqs, name):
    url = sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "1"})["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="again")
    [first] = sqs.receive_message(QueueUrl=url, AttributeNames=["All"])["Messages"]
    assert sqs.receive_message(QueueUrl=url).get("Messages", []) == []  # invisible while leased
    started = time.monotonic()
    [second] = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=5, AttributeNames=["All"])["Messages"]
    assert time.monotonic() - started < 4
    assert second["MessageId"] == first["MessageId"] and second["ReceiptHandle"] != first["ReceiptHandle"]
    assert second["Attributes"]["ApproximateReceiveCount"] == "2"
    assert second["Attributes"]["ApproximateFirstReceiveTimestamp"] == first["Attributes"][
        "ApproximateFirstReceiveTimestamp"]  # fmt: skip
    sqs.delete_message(QueueUrl=url, ReceiptHandle=first["ReceiptHandle"])  # outdated: succeeds, deletes nothing
    sqs.delete_message(QueueUrl=url, ReceiptHandle=second["ReceiptHandle"])
    assert attributes(sqs, url, "ApproximateNumberOfMessagesNotVisible")["ApproximateNumberOfMessagesNotVisible"] == "0"


def test_receive_with_visibility_timeout_zero_is_visible_at_once(sqs, name):
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="x")
    sqs.receive_message(QueueUrl=url, VisibilityTimeout=0)
    [message] = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=2, AttributeNames=["ApproximateReceiveCount"])[
        "Messages"]  # fmt: skip
    assert message["Attributes"]["ApproximateReceiveCount"] == "2"


def test_change_message_visibility(sqs, name):
    url = sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "1"})["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="x")
    [message] = sqs.receive_message(QueueUrl=url)["Messages"]
    sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=30)
    assert sqs.receive_message(QueueUrl=url, WaitTimeSeconds=2).get("Messages", []) == []  # outlives the 1 s
    sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0)
    [again] = sqs.receive_message(QueueUrl=url, VisibilityTimeout=30)["Messages"]
    with pytest.raises(ClientError) as excinfo:  # the old handle names it no more (it was received again)
        sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=5)
    assert error_of(excinfo) == ("InvalidParameterValue", 400)
    with pytest.raises(ClientError) as excinfo:
        sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=again["ReceiptHandle"], VisibilityTimeout=43_201)
    assert error_of(excinfo) == ("InvalidParameterValue", 400)
    result = sqs.change_message_visibility_batch(QueueUrl=url, Entries=[
        {"Id": "good", "ReceiptHandle": again["ReceiptHandle"], "VisibilityTimeout": 0},
        {"Id": "stale", "ReceiptHandle": message["ReceiptHandle"], "VisibilityTimeout": 10},
        {"Id": "forged", "ReceiptHandle": "bm90LWEtaGFuZGxl", "VisibilityTimeout": 10}])  # fmt: skip
    assert [s["Id"] for s in result["Successful"]] == ["good"]
    assert {f["Id"]: (f["Code"], f["SenderFault"]) for f in result["Failed"]} == {
        "stale": ("InvalidParameterValue", True), "forged": ("ReceiptHandleIsInvalid", True)}  # fmt: skip
    assert len(sqs.receive_message(QueueUrl=url).get("Messages", [])) == 1  # "good" made it visible


def test_receipt_handles_forged_garbled_or_for_another_queue(sqs, name):
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    other = sqs.create_queue(QueueName=f"{name}-other")["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="x")
    [message] = sqs.receive_message(QueueUrl=url)["Messages"]
    handle = message["ReceiptHandle"]
    tampered = handle[:-4] + ("AAAA" if not handle.endswith("AAAA") else "BBBB")
    for bad in ("garbage!", "", "x" * 2000, tampered):
        with pytest.raises(ClientError) as excinfo:
            sqs.delete_message(QueueUrl=url, ReceiptHandle=bad)
        assert error_of(excinfo)[0] in ("ReceiptHandleIsInvalid", "MissingParameter")
    with pytest.raises(ClientError) as excinfo:
        sqs.delete_message(QueueUrl=other, ReceiptHandle=handle)
    assert error_of(excinfo) == ("ReceiptHandleIsInvalid", 400)
    sqs.delete_message(QueueUrl=url, ReceiptHandle=handle)


def test_batches_send_delete(sqs, name):
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    entries = [{"Id": f"e{i}", "MessageBody": f"body {i}", "MessageAttributes": {
        "i": {"DataType": "Number", "StringValue": str(i)}}} for i in range(9)]  # fmt: skip
    entries.append({"Id": "bad", "MessageBody": "nul \x00 char"})
    result = sqs.send_message_batch(QueueUrl=url, Entries=entries)
    assert [s["Id"] for s in result["Successful"]] == [f"e{i}" for i in range(9)]
    for sent, entry in zip(result["Successful"], entries, strict=False):
        assert sent["MD5OfMessageBody"] == md5_of_body(entry["MessageBody"])
        assert sent["MD5OfMessageAttributes"] == md5_of_message_attributes(entry["MessageAttributes"])
    assert [(f["Id"], f["Code"], f["SenderFault"]) for f in result["Failed"]] == [
        ("bad", "InvalidMessageContents", True)]  # fmt: skip
    received = []
    for _ in range(10):
        received += sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
        if len(received) >= 9:
            break
    assert sorted(m["Body"] for m in received) == sorted(f"body {i}" for i in range(9))
    deleted = sqs.delete_message_batch(QueueUrl=url, Entries=[
        *({"Id": f"d{i}", "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(received)),
        {"Id": "junk", "ReceiptHandle": "junk"}])  # fmt: skip
    assert len(deleted["Successful"]) == 9
    assert [(f["Id"], f["Code"]) for f in deleted["Failed"]] == [("junk", "ReceiptHandleIsInvalid")]
    assert attributes(sqs, url, "ApproximateNumberOfMessagesNotVisible")["ApproximateNumberOfMessagesNotVisible"] == "0"


def test_long_poll_is_released_by_a_publish_from_another_thread(sqs, sqs_server, name):
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    result: dict = {}

    def poll():
        started = time.monotonic()
        result["messages"] = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=20).get("Messages", [])
        result["elapsed"] = time.monotonic() - started

    thread = threading.Thread(target=poll)
    thread.start()
    wait_for_receiver(sqs_server, name)
    other = boto3_support.client_for(sqs_server.http_port)
    other.send_message(QueueUrl=url, MessageBody="wake up")
    other.close()
    thread.join(15)
    assert not thread.is_alive()
    assert [m["Body"] for m in result["messages"]] == ["wake up"] and result["elapsed"] < 10


def test_long_poll_waits_for_the_queue_default(sqs, name):
    url = sqs.create_queue(QueueName=name, Attributes={"ReceiveMessageWaitTimeSeconds": "1"})["QueueUrl"]
    started = time.monotonic()
    assert sqs.receive_message(QueueUrl=url).get("Messages", []) == []
    assert 0.9 <= time.monotonic() - started < 5
    started = time.monotonic()
    sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0)
    assert time.monotonic() - started < 0.9


def test_a_long_poll_whose_client_hangs_up_leases_nothing(sqs, sqs_server, name):
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    body = json.dumps({"QueueUrl": url, "WaitTimeSeconds": 20}).encode()
    request = (f"POST / HTTP/1.1\r\nHost: 127.0.0.1:{sqs_server.http_port}\r\nX-Amz-Target: AmazonSQS.ReceiveMessage"
               f"\r\nContent-Type: application/x-amz-json-1.0\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", sqs_server.http_port), timeout=10) as conn:
        conn.sendall(request)
        wait_for_receiver(sqs_server, name)
    wait_until(lambda: not sqs_server.server.broker._waiters.get(name), what="the hung-up poll to end")
    sqs.send_message(QueueUrl=url, MessageBody="for the living")
    [message] = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=5, AttributeNames=["All"])["Messages"]
    assert message["Body"] == "for the living" and message["Attributes"]["ApproximateReceiveCount"] == "1"


def test_delays(sqs, name):
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="late", DelaySeconds=1)
    assert attributes(sqs, url, "ApproximateNumberOfMessagesDelayed")["ApproximateNumberOfMessagesDelayed"] == "1"
    assert sqs.receive_message(QueueUrl=url).get("Messages", []) == []
    started = time.monotonic()
    [message] = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=5)["Messages"]
    assert message["Body"] == "late" and time.monotonic() - started < 4
    delayed = sqs.create_queue(QueueName=f"{name}-q", Attributes={"DelaySeconds": "1"})["QueueUrl"]
    sqs.send_message(QueueUrl=delayed, MessageBody="queue default")
    sqs.send_message(QueueUrl=delayed, MessageBody="now", DelaySeconds=0)  # the message's own delay wins
    [first] = sqs.receive_message(QueueUrl=delayed)["Messages"]
    assert first["Body"] == "now"
    [second] = sqs.receive_message(QueueUrl=delayed, WaitTimeSeconds=5)["Messages"]
    assert second["Body"] == "queue default"


def _dead_lettered(sqs, name: str, max_receives: int = 2) -> tuple[str, str, str]:
    """(source url, dlq url, dlq arn) after one message went to the DLQ by exceeding maxReceiveCount."""
    dlq = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
    dlq_arn = attributes(sqs, dlq, "QueueArn")["QueueArn"]
    policy = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receives)})
    url = sqs.create_queue(QueueName=name, Attributes={"RedrivePolicy": policy})["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="poison", MessageAttributes={"k": {"DataType": "String",
                                                                                   "StringValue": "v"}})  # fmt: skip
    for receive in range(1, max_receives + 1):
        [message] = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=2, VisibilityTimeout=0,
                                        AttributeNames=["ApproximateReceiveCount"])["Messages"]  # fmt: skip
        assert message["Attributes"]["ApproximateReceiveCount"] == str(receive)
    return url, dlq, dlq_arn


def test_dead_lettering_after_max_receive_count(sqs, name):
    url, dlq, _ = _dead_lettered(sqs, name, max_receives=2)
    [dead] = sqs.receive_message(QueueUrl=dlq, WaitTimeSeconds=2, AttributeNames=["All"],
                                 MessageAttributeNames=["All"])["Messages"]  # fmt: skip
    assert sqs.receive_message(QueueUrl=url).get("Messages", []) == []
    assert dead["Body"] == "poison" and dead["MessageAttributes"] == {"k": {"DataType": "String", "StringValue": "v"}}
    assert dead["Attributes"]["DeadLetterQueueSourceArn"] == f"arn:aws:sqs:us-east-1:000000000000:{name}"


def test_message_move_task_back_to_the_source(sqs, name):
    url, dlq, dlq_arn = _dead_lettered(sqs, name)
    handle = sqs.start_message_move_task(SourceArn=dlq_arn)["TaskHandle"]
    assert handle
    wait_until(lambda: sqs.list_message_move_tasks(SourceArn=dlq_arn)["Results"][0]["Status"] == "COMPLETED",
               what="the move task")  # fmt: skip
    [task] = sqs.list_message_move_tasks(SourceArn=dlq_arn)["Results"]
    assert task["ApproximateNumberOfMessagesMoved"] == 1 and "TaskHandle" not in task
    [message] = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=2)["Messages"]
    assert message["Body"] == "poison"
    with pytest.raises(ClientError) as excinfo:  # a finished task cannot be cancelled
        sqs.cancel_message_move_task(TaskHandle=handle)
    assert error_of(excinfo) == ("ResourceNotFoundException", 404)
    with pytest.raises(ClientError) as excinfo:  # the source must be a dead-letter queue
        sqs.start_message_move_task(SourceArn=attributes(sqs, url, "QueueArn")["QueueArn"])
    assert error_of(excinfo) == ("InvalidParameterValue", 400)


def test_message_move_task_to_another_queue_and_cancel(sqs, name):
    url, dlq, dlq_arn = _dead_lettered(sqs, name)
    for i in range(4):
        sqs.send_message(QueueUrl=dlq, MessageBody=f"extra {i}")
    target = sqs.create_queue(QueueName=f"{name}-target")["QueueUrl"]
    target_arn = attributes(sqs, target, "QueueArn")["QueueArn"]
    handle = sqs.start_message_move_task(SourceArn=dlq_arn, DestinationArn=target_arn,
                                         MaxNumberOfMessagesPerSecond=1)["TaskHandle"]  # fmt: skip
    [running] = sqs.list_message_move_tasks(SourceArn=dlq_arn)["Results"]
    assert running["Status"] == "RUNNING" and running["TaskHandle"] == handle
    assert running["DestinationArn"] == target_arn and running["MaxNumberOfMessagesPerSecond"] == 1
    with pytest.raises(ClientError):  # one running task per source
        sqs.start_message_move_task(SourceArn=dlq_arn, DestinationArn=target_arn)
    moved = sqs.cancel_message_move_task(TaskHandle=handle)["ApproximateNumberOfMessagesMoved"]
    assert 1 <= moved < 5
    [task] = sqs.list_message_move_tasks(SourceArn=dlq_arn)["Results"]
    assert task["Status"] == "CANCELLED" and task["ApproximateNumberOfMessagesMoved"] == moved
    counts = [int(attributes(sqs, q, "ApproximateNumberOfMessages")["ApproximateNumberOfMessages"])
              for q in (dlq, target)]  # fmt: skip
    assert counts == [5 - moved, moved]
    [first] = sqs.receive_message(QueueUrl=target, MessageAttributeNames=["All"])["Messages"]
    assert first["Body"] == "poison" and first["MessageAttributes"]["k"]["StringValue"] == "v"
    with pytest.raises(ClientError) as excinfo:
        sqs.start_message_move_task(SourceArn=dlq_arn + "-missing")
    assert error_of(excinfo) == ("ResourceNotFoundException", 404)


def test_receipt_handles_from_before_a_restart_are_outdated_not_forged(tmp_path):
    with running_server(str(tmp_path)) as server:
        sqs = boto3_support.client_for(server.http_port)
        url = sqs.create_queue(QueueName="standard")["QueueUrl"]
        fifo = sqs.create_queue(QueueName="ordered.fifo", Attributes={"FifoQueue": "true",
                                "ContentBasedDeduplication": "true"})["QueueUrl"]  # fmt: skip
        sqs.send_message(QueueUrl=url, MessageBody="kept")
        sqs.send_message(QueueUrl=fifo, MessageBody="kept", MessageGroupId="g")
        [old] = sqs.receive_message(QueueUrl=url)["Messages"]
        [old_fifo] = sqs.receive_message(QueueUrl=fifo)["Messages"]
        sqs.close()
    with running_server(str(tmp_path)) as server:
        sqs = boto3_support.client_for(server.http_port)
        sqs.delete_message(QueueUrl=url, ReceiptHandle=old["ReceiptHandle"])  # outdated: accepted, deletes nothing
        with pytest.raises(ClientError) as excinfo:
            sqs.delete_message(QueueUrl=fifo, ReceiptHandle=old_fifo["ReceiptHandle"])
        assert error_of(excinfo) == ("InvalidParameterValue", 400)
        assert "expired" in excinfo.value.response["Error"]["Message"]
        [again] = sqs.receive_message(QueueUrl=url, AttributeNames=["ApproximateReceiveCount"])["Messages"]
        assert again["Body"] == "kept" and again["Attributes"]["ApproximateReceiveCount"] == "2"
        sqs.close()


def test_a_server_stops_promptly_during_a_slow_move_task(caplog):
    with running_server() as server:
        sqs = boto3_support.client_for(server.http_port)
        dlq = sqs.create_queue(QueueName="slow-dlq")["QueueUrl"]
        dlq_arn = attributes(sqs, dlq, "QueueArn")["QueueArn"]
        sqs.create_queue(QueueName="slow-source", Attributes={
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 1})})  # fmt: skip
        target = sqs.create_queue(QueueName="slow-target")["QueueUrl"]
        for i in range(5):
            sqs.send_message(QueueUrl=dlq, MessageBody=f"m{i}")
        sqs.start_message_move_task(SourceArn=dlq_arn, DestinationArn=attributes(sqs, target, "QueueArn")["QueueArn"],
                                    MaxNumberOfMessagesPerSecond=1)  # fmt: skip
        sqs.close()
        started = time.monotonic()
    assert time.monotonic() - started < 5
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    [task] = sqs_state(server.server).move_tasks
    assert task.status in ("CANCELLED", "FAILED") and task.runner.done()  # ended with the server, not left pending


def test_message_move_task_to_another_queue_keeps_priorities(sqs, sqs_server, name):
    """A move to DestinationArn publishes each message again with its priority (one published through AMQP or
    natively has one): it was published with priority 0, behind the destination's own messages."""
    import chute

    _, dlq, dlq_arn = _dead_lettered(sqs, name, max_receives=1)
    target = sqs.create_queue(QueueName=f"{name}-target")["QueueUrl"]
    with chute.Client(sqs_server.url) as native:
        native.publish(f"{name}-dlq", b"urgent", priority=9)
        native.publish(f"{name}-target", b"middling", priority=5)
        sqs.receive_message(QueueUrl=sqs.get_queue_url(QueueName=name)["QueueUrl"], WaitTimeSeconds=1)  # -> dlq
        wait_until(lambda: native.queue_stats(f"{name}-dlq").ready == 2, what="the dead letter")
        sqs.start_message_move_task(SourceArn=dlq_arn,
                                    DestinationArn=attributes(sqs, target, "QueueArn")["QueueArn"])  # fmt: skip
        wait_until(lambda: native.queue_stats(f"{name}-target").ready == 3, what="the move")
        deliveries = native.receive(f"{name}-target", 10)
    assert [(d.message.body, d.message.priority) for d in deliveries] == [
        (b"urgent", 9), (b"middling", 5), (b"poison", 0)]  # fmt: skip
