"""The query protocol without a server: flattened forms become the JSON-shaped params the actions take, and
results and errors become the XML documents botocore's query parser reads back to the same values."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import MultiDict

from chute.server.sqs.errors import SqsError
from chute.server.sqs.messages import md5_hex, md5_of_attributes
from chute.server.sqs.query import parse_form, render_error, render_result

NS = "{http://queue.amazonaws.com/doc/2012-11-05/}"


def form(action: str, **fields) -> MultiDict:
    return MultiDict({"Action": action, "Version": "2012-11-05"} | {k.replace("__", "."): v for k, v in fields.items()})


def test_create_queue_with_attributes_and_tags():
    action, params = parse_form(
        form("CreateQueue", QueueName="jobs.fifo", Attribute__1__Name="FifoQueue", Attribute__1__Value="true",
             Attribute__2__Name="VisibilityTimeout", Attribute__2__Value="45", Tag__1__Key="team", Tag__1__Value="a")
    )  # fmt: skip
    assert action == "CreateQueue"
    assert params == {
        "QueueName": "jobs.fifo",
        "Attributes": {"FifoQueue": "true", "VisibilityTimeout": "45"},
        "tags": {"team": "a"},
    }


def test_send_message_with_typed_attributes_and_integers():
    _, params = parse_form(
        form("SendMessage", QueueUrl="http://h/0/q", MessageBody="hi", DelaySeconds="5",
             MessageAttribute__1__Name="s", MessageAttribute__1__Value__DataType="String",
             MessageAttribute__1__Value__StringValue="x",
             MessageAttribute__2__Name="b", MessageAttribute__2__Value__DataType="Binary",
             MessageAttribute__2__Value__BinaryValue="AAE=",
             MessageSystemAttribute__1__Name="AWSTraceHeader",
             MessageSystemAttribute__1__Value__DataType="String",
             MessageSystemAttribute__1__Value__StringValue="Root=1-5759e988-bd862e3fe1be46a994272793")
    )  # fmt: skip
    assert params == {
        "QueueUrl": "http://h/0/q",
        "MessageBody": "hi",
        "DelaySeconds": 5,
        "MessageAttributes": {
            "s": {"DataType": "String", "StringValue": "x"},
            "b": {"DataType": "Binary", "BinaryValue": "AAE="},
        },
        "MessageSystemAttributes": {
            "AWSTraceHeader": {"DataType": "String", "StringValue": "Root=1-5759e988-bd862e3fe1be46a994272793"}
        },
    }


def test_batch_entries_keep_their_numeric_order():
    fields = {}
    for i in (10, 2, 1):
        fields[f"SendMessageBatchRequestEntry__{i}__Id"] = f"m{i}"
        fields[f"SendMessageBatchRequestEntry__{i}__MessageBody"] = f"body {i}"
    fields["SendMessageBatchRequestEntry__2__DelaySeconds"] = "3"
    fields["SendMessageBatchRequestEntry__2__MessageAttribute__1__Name"] = "n"
    fields["SendMessageBatchRequestEntry__2__MessageAttribute__1__Value__DataType"] = "Number"
    fields["SendMessageBatchRequestEntry__2__MessageAttribute__1__Value__StringValue"] = "7"
    _, params = parse_form(form("SendMessageBatch", QueueUrl="u", **fields))
    assert [entry["Id"] for entry in params["Entries"]] == ["m1", "m2", "m10"]
    assert params["Entries"][1] == {
        "Id": "m2", "MessageBody": "body 2", "DelaySeconds": 3,
        "MessageAttributes": {"n": {"DataType": "Number", "StringValue": "7"}},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("action", "prefix"),
    [("DeleteMessageBatch", "DeleteMessageBatchRequestEntry"),
     ("ChangeMessageVisibilityBatch", "ChangeMessageVisibilityBatchRequestEntry")],
)  # fmt: skip
def test_delete_and_change_visibility_batches(action, prefix):
    fields = {f"{prefix}__1__Id": "a", f"{prefix}__1__ReceiptHandle": "r+/=", f"{prefix}__1__VisibilityTimeout": "0"}
    _, params = parse_form(form(action, QueueUrl="u", **fields))
    assert params == {"QueueUrl": "u", "Entries": [{"Id": "a", "ReceiptHandle": "r+/=", "VisibilityTimeout": 0}]}


def test_receive_message_lists_in_every_spelling():
    _, params = parse_form(
        form("ReceiveMessage", QueueUrl="u", MaxNumberOfMessages="10", WaitTimeSeconds="20", VisibilityTimeout="7",
             AttributeName__1="All", MessageSystemAttributeName__1="SentTimestamp",
             MessageAttributeNames__1="a", MessageAttributeNames__2="b.*", ReceiveRequestAttemptId="x")
    )  # fmt: skip
    assert params == {
        "QueueUrl": "u", "MaxNumberOfMessages": 10, "WaitTimeSeconds": 20, "VisibilityTimeout": 7,
        "AttributeNames": ["All"], "MessageSystemAttributeNames": ["SentTimestamp"],
        "MessageAttributeNames": ["a", "b.*"], "ReceiveRequestAttemptId": "x",
    }  # fmt: skip
    _, wrapped = parse_form(form("ReceiveMessage", QueueUrl="u", AttributeName__member__1="All"))
    assert wrapped["AttributeNames"] == ["All"]


def test_boto2_style_unnumbered_parameters():
    _, params = parse_form(form("GetQueueAttributes", QueueUrl="u", AttributeName="All"))
    assert params["AttributeNames"] == ["All"]
    _, params = parse_form(form("SetQueueAttributes", QueueUrl="u", Attribute__Name="DelaySeconds",
                                Attribute__Value="4"))  # fmt: skip
    assert params["Attributes"] == {"DelaySeconds": "4"}


def test_tags_and_untag_and_list_queues():
    _, params = parse_form(form("TagQueue", QueueUrl="u", Tag__1__Key="a", Tag__1__Value="", Tag__2__Key="b",
                                Tag__2__Value="2"))  # fmt: skip
    assert params == {"QueueUrl": "u", "Tags": {"a": "", "b": "2"}}
    _, params = parse_form(form("UntagQueue", QueueUrl="u", TagKey__1="a", TagKey__2="b"))
    assert params == {"QueueUrl": "u", "TagKeys": ["a", "b"]}
    _, params = parse_form(form("ListQueues", QueueNamePrefix="j", MaxResults="2", NextToken="t"))
    assert params == {"QueueNamePrefix": "j", "MaxResults": 2, "NextToken": "t"}


def test_signing_and_protocol_fields_are_not_params():
    _, params = parse_form(form("ListQueues", AWSAccessKeyId="k", Signature="s", SignatureVersion="2",
                                SignatureMethod="HmacSHA256", Timestamp="t", **{"X-Amz-Date": "d"}))  # fmt: skip
    assert params == {}


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({}, "MissingAction"),
        ({"Action": "SendMessage", "DelaySeconds": "soon"}, "InvalidParameterValue"),
        ({"Action": "SendMessage", "AttributeName.x": "a"}, "InvalidQueryParameter"),
        ({"Action": "SendMessage", "AttributeName.0": "a"}, "InvalidQueryParameter"),
        ({"Action": "SendMessage", "Attribute.1.Name": "a"}, "MissingParameter"),
        ({"Action": "SendMessage", "QueueUrl": "a", "QueueUrl.1": "b"}, "InvalidQueryParameter"),
        ({"Action": "SendMessage", "QueueUrl..x": "a"}, "InvalidQueryParameter"),
    ],
)
def test_malformed_forms_are_sender_errors(fields, code):
    with pytest.raises(SqsError) as error:
        parse_form(MultiDict(fields))
    assert error.value.code == code
    assert error.value.status == 400


def parse_xml(data: bytes) -> ET.Element:
    return ET.fromstring(data)


def test_a_result_renders_lists_maps_and_nested_values():
    result = {
        "Messages": [
            {
                "MessageId": "m1", "ReceiptHandle": "r<&>", "MD5OfBody": "x", "Body": "a\r\nb <tag> & \"q\"",
                "Attributes": {"SentTimestamp": "1", "ApproximateReceiveCount": "2"},
                "MD5OfMessageAttributes": "y",
                "MessageAttributes": {"s": {"DataType": "String", "StringValue": "v"},
                                      "b": {"DataType": "Binary", "BinaryValue": "AAE="}},
            },
            {"MessageId": "m2", "Body": ""},
        ]
    }  # fmt: skip
    root = parse_xml(render_result("ReceiveMessage", result, "req-1"))
    assert root.tag == NS + "ReceiveMessageResponse"
    messages = root.findall(f"{NS}ReceiveMessageResult/{NS}Message")
    assert [m.findtext(NS + "MessageId") for m in messages] == ["m1", "m2"]
    assert messages[0].findtext(NS + "Body") == 'a\r\nb <tag> & "q"'
    assert messages[0].findtext(NS + "ReceiptHandle") == "r<&>"
    attributes = {a.findtext(NS + "Name"): a.findtext(NS + "Value") for a in messages[0].findall(NS + "Attribute")}
    assert attributes == {"SentTimestamp": "1", "ApproximateReceiveCount": "2"}
    binary = messages[0].findall(NS + "MessageAttribute")[1]
    assert binary.findtext(NS + "Name") == "b"
    assert binary.findtext(f"{NS}Value/{NS}BinaryValue") == "AAE="
    assert root.findtext(f"{NS}ResponseMetadata/{NS}RequestId") == "req-1"


def test_batch_results_name_their_entries_after_the_action():
    result = {
        "Successful": [{"Id": "a", "MessageId": "m", "MD5OfMessageBody": "x"}],
        "Failed": [{"Id": "b", "SenderFault": True, "Code": "InvalidParameterValue", "Message": "no"}],
    }
    root = parse_xml(render_result("SendMessageBatch", result, "r"))
    body = root.find(NS + "SendMessageBatchResult")
    assert body.find(f"{NS}SendMessageBatchResultEntry/{NS}MessageId").text == "m"
    assert body.find(f"{NS}BatchResultErrorEntry/{NS}SenderFault").text == "true"


def test_empty_results_and_results_without_a_result_element():
    root = parse_xml(render_result("ReceiveMessage", {}, "r"))
    assert root.find(NS + "ReceiveMessageResult") is not None
    root = parse_xml(render_result("DeleteMessage", {}, "r"))
    assert root.find(NS + "DeleteMessageResult") is None
    assert root.findtext(f"{NS}ResponseMetadata/{NS}RequestId") == "r"


def test_list_queues_and_tags():
    root = parse_xml(render_result("ListQueues", {"QueueUrls": ["u1", "u2"], "NextToken": "t"}, "r"))
    assert [e.text for e in root.iter(NS + "QueueUrl")] == ["u1", "u2"]
    assert root.findtext(f"{NS}ListQueuesResult/{NS}NextToken") == "t"
    root = parse_xml(render_result("ListQueueTags", {"Tags": {"k": "v"}}, "r"))
    assert root.findtext(f"{NS}ListQueueTagsResult/{NS}Tag/{NS}Key") == "k"


def test_an_error_document_carries_the_legacy_code():
    error = SqsError("QueueDoesNotExist", "The specified queue does not exist <here>.")
    root = parse_xml(render_error(error, "r"))
    assert root.tag == NS + "ErrorResponse"
    assert root.findtext(f"{NS}Error/{NS}Type") == "Sender"
    assert root.findtext(f"{NS}Error/{NS}Code") == "AWS.SimpleQueueService.NonExistentQueue"
    assert root.findtext(f"{NS}Error/{NS}Message") == "The specified queue does not exist <here>."
    assert root.findtext(NS + "RequestId") == "r"
    assert parse_xml(render_error(SqsError("InternalError"), "r")).findtext(f"{NS}Error/{NS}Type") == "Receiver"


# What XML 1.0 can carry (its Char production): a parser refuses a document with any other character, even as a
# character reference, so the renderer shows those as U+FFFD.
def xml_char(c: str) -> bool:
    o = ord(c)
    return o in (0x9, 0xA, 0xD) or 0x20 <= o <= 0xD7FF or 0xE000 <= o <= 0xFFFD or 0x10000 <= o <= 0x10FFFF


def as_shown(text: str) -> str:
    return "".join(c if xml_char(c) else "\ufffd" for c in text)


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(codec="utf-8")))
def test_any_text_renders_as_a_document_a_parser_accepts(text):
    root = parse_xml(render_result("GetQueueUrl", {"QueueUrl": text}, "r"))
    assert (root.findtext(f"{NS}GetQueueUrlResult/{NS}QueueUrl") or "") == as_shown(text)
    root = parse_xml(render_result("ListQueueTags", {"Tags": {text: text}}, "r"))
    assert (root.findtext(f"{NS}ListQueueTagsResult/{NS}Tag/{NS}Key") or "") == as_shown(text)
    root = parse_xml(render_error(SqsError("InvalidParameterValue", f"Value {text} is invalid."), "r"))
    assert root.findtext(f"{NS}Error/{NS}Message") == f"Value {as_shown(text)} is invalid."


def test_a_received_message_xml_cannot_carry_is_shown_with_the_md5s_of_what_is_shown():
    # a natively published body and header may hold control characters that SQS itself refuses at SendMessage
    body, value = "a\x00b\x1bc\ufffed\tok\r\n", "v\x0bw"
    attributes = {"h": {"DataType": "String", "StringValue": value},
                  "b": {"DataType": "Binary", "BinaryValue": "AAE="}}  # fmt: skip
    message = {"MessageId": "m1", "ReceiptHandle": "r", "MD5OfBody": md5_hex(body.encode()), "Body": body,
               "MD5OfMessageAttributes": md5_of_attributes(attributes), "MessageAttributes": attributes}  # fmt: skip
    clean = {"MessageId": "m2", "ReceiptHandle": "r2", "MD5OfBody": md5_hex(b"fine"), "Body": "fine"}
    root = parse_xml(render_result("ReceiveMessage", {"Messages": [message, clean]}, "r"))
    shown, second = root.findall(f"{NS}ReceiveMessageResult/{NS}Message")
    assert shown.findtext(NS + "Body") == "a\ufffdb\ufffdc\ufffdd\tok\r\n"
    assert shown.findtext(NS + "MD5OfBody") == md5_hex("a\ufffdb\ufffdc\ufffdd\tok\r\n".encode())
    values = {a.findtext(NS + "Name"): a.find(NS + "Value") for a in shown.findall(NS + "MessageAttribute")}
    assert values["h"].findtext(NS + "StringValue") == "v\ufffdw"
    assert values["b"].findtext(NS + "BinaryValue") == "AAE="
    expected = md5_of_attributes({"h": {"DataType": "String", "StringValue": "v\ufffdw"}, "b": attributes["b"]})
    assert shown.findtext(NS + "MD5OfMessageAttributes") == expected
    assert second.findtext(NS + "Body") == "fine"
    assert second.findtext(NS + "MD5OfBody") == md5_hex(b"fine")
    assert message["Body"] == body  # the action's result is not changed: the JSON protocol carries it as it is
