"""The SQS query protocol (older SDKs): a form-encoded `Action=...` request in, an XML document out.

    POST / (or /<account>/<queue>)    Action=SendMessage&Version=2012-11-05&QueueUrl=...&MessageBody=hi
                                      &MessageAttribute.1.Name=a&MessageAttribute.1.Value.DataType=String
                                      &MessageAttribute.1.Value.StringValue=x
    200 text/xml                      <SendMessageResponse xmlns="http://queue.amazonaws.com/doc/2012-11-05/">
                                        <SendMessageResult><MessageId>...</MessageId>...</SendMessageResult>
                                        <ResponseMetadata><RequestId>...</RequestId></ResponseMetadata>
                                      </SendMessageResponse>
    4xx/5xx text/xml                  <ErrorResponse><Error><Type>Sender</Type><Code>AWS.SimpleQueueService.
                                        NonExistentQueue</Code><Message>...</Message><Detail/></Error>
                                        <RequestId>...</RequestId></ErrorResponse>

`parse_form` turns the flattened form into the JSON-protocol-shaped params of `actions.call` and `render_result`
turns its result back into XML. Both follow the names of the query protocol's service model (2012-11-05): a
list or map member is flattened under a singular element name (`AttributeName.1`, `Attribute.1.Name` /
`.Value`, `SendMessageBatchRequestEntry.2.MessageBody`, `MessageAttribute.1.Value.StringValue`, `Tag.1.Key`),
the tables `LISTS` and `MAPS` below. The JSON member names (`AttributeNames.1`, as kombu sends them) and the
non-flattened `Name.member.N` form are accepted too.

Invariants: every request gets exactly one XML document (a result or an `ErrorResponse` with the legacy query
code and the error's HTTP status); an error other than `SqsError` becomes `InternalError` (500) and is logged;
values are escaped so that an XML parser gives back exactly the string the action returned (`\\r` included);
a character XML 1.0 cannot carry at all (a control character other than tab, LF and CR, U+FFFE, U+FFFF: SQS
refuses them, but a message from another front may hold them) is shown as U+FFFD, so every answer is a document
a parser accepts, and a received message's MD5s are those of the body and attributes as shown.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from chute.errors import ChuteError
from chute.server.sqs import messages as msgs
from chute.server.sqs.errors import SqsError, from_chute

if TYPE_CHECKING:
    from chute.server.sqs.actions import SqsContext

log = logging.getLogger("chute.server.sqs")

XML_NAMESPACE = "http://queue.amazonaws.com/doc/2012-11-05/"
CONTENT_TYPE = "text/xml"

# Form keys that are not action parameters: the protocol's own and those of query-string signing.
PROTOCOL_KEYS = frozenset(
    {"Action", "Version", "AWSAccessKeyId", "Signature", "SignatureMethod", "SignatureVersion", "Timestamp",
     "Expires", "SecurityToken"}
)  # fmt: skip

# Flattened lists: element name in the form -> JSON member name.
LISTS: dict[str, str] = {
    "AttributeName": "AttributeNames",
    "MessageSystemAttributeName": "MessageSystemAttributeNames",
    "MessageAttributeName": "MessageAttributeNames",
    "TagKey": "TagKeys",
    "SendMessageBatchRequestEntry": "Entries",
    "DeleteMessageBatchRequestEntry": "Entries",
    "ChangeMessageVisibilityBatchRequestEntry": "Entries",
    "StringListValue": "StringListValues",
    "BinaryListValue": "BinaryListValues",
    "AWSAccountId": "AWSAccountIds",
    "ActionName": "Actions",
}
LISTS |= {json_name: json_name for json_name in LISTS.values()}

# Flattened maps: element name in the form -> (JSON member name, key element, value element).
MAPS: dict[str, tuple[str, str, str]] = {
    "Attribute": ("Attributes", "Name", "Value"),
    "Attributes": ("Attributes", "Name", "Value"),
    "MessageAttribute": ("MessageAttributes", "Name", "Value"),
    "MessageAttributes": ("MessageAttributes", "Name", "Value"),
    "MessageSystemAttribute": ("MessageSystemAttributes", "Name", "Value"),
    "MessageSystemAttributes": ("MessageSystemAttributes", "Name", "Value"),
    "Tag": ("Tags", "Key", "Value"),
    "Tags": ("Tags", "Key", "Value"),
}
# CreateQueue's tags are a lower-case member in the JSON protocol.
MAP_NAME_BY_ACTION: dict[tuple[str, str], str] = {("CreateQueue", "Tags"): "tags"}

# Members whose value is an integer (the form carries text).
INTEGERS = frozenset(
    {"DelaySeconds", "MaxNumberOfMessages", "VisibilityTimeout", "WaitTimeSeconds", "MaxResults",
     "MaxNumberOfMessagesPerSecond"}
)  # fmt: skip

# Actions whose queue may be named by the request path instead of a QueueUrl parameter (old SDKs post to the
# queue's URL).
WITHOUT_QUEUE_URL = frozenset(
    {"CreateQueue", "GetQueueUrl", "ListQueues", "StartMessageMoveTask", "ListMessageMoveTasks",
     "CancelMessageMoveTask"}
)  # fmt: skip

# Actions whose response has no <ActionResult> element (their output shape is empty).
WITHOUT_RESULT = frozenset(
    {"DeleteMessage", "DeleteQueue", "SetQueueAttributes", "ChangeMessageVisibility", "PurgeQueue", "TagQueue",
     "UntagQueue", "AddPermission", "RemovePermission"}
)  # fmt: skip

# Result lists: JSON member -> the element repeated for each item ("{action}" is the action's name).
RESULT_LISTS: dict[str, str] = {
    "QueueUrls": "QueueUrl",
    "queueUrls": "QueueUrl",
    "Messages": "Message",
    "Successful": "{action}ResultEntry",
    "Failed": "BatchResultErrorEntry",
    "Results": "ListMessageMoveTasksResultEntry",
    "StringListValues": "StringListValue",
    "BinaryListValues": "BinaryListValue",
}
# Result maps: JSON member -> (element per entry, key element, value element).
RESULT_MAPS: dict[str, tuple[str, str, str]] = {
    "Attributes": ("Attribute", "Name", "Value"),
    "MessageAttributes": ("MessageAttribute", "Name", "Value"),
    "Tags": ("Tag", "Key", "Value"),
}

_INDEX = re.compile(r"[1-9][0-9]{0,5}")


# The characters of XML 1.0 (its `Char` production); any other is shown as U+FFFD.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
REPLACEMENT = "\ufffd"


async def handle_query(request: web.Request, ctx: SqsContext, form: Mapping[str, Any]) -> web.Response:
    """Run the action a query-protocol form names and answer with its XML result or XML error."""
    from chute.server.sqs import actions  # on first use: parsing and rendering need no action module

    request_id = msgs.request_id()
    action = ""
    try:
        action, params = parse_form(form)
        if "QueueUrl" not in params and action not in WITHOUT_QUEUE_URL and _is_queue_path(request.path):
            params["QueueUrl"] = ctx.base_url + request.path
        result = await actions.call(ctx, action, params)
        body, status = render_result(action, result, request_id), 200
    except Exception as exc:  # every failure becomes one ErrorResponse
        error = as_sqs_error(exc, action)
        body, status = render_error(error, request_id), error.status
    return web.Response(body=body, status=status, content_type=CONTENT_TYPE, headers={"x-amzn-RequestId": request_id})


def as_sqs_error(exc: Exception, action: str = "") -> SqsError:
    """The SqsError to answer for any exception raised while handling a request."""
    if isinstance(exc, SqsError):
        return exc
    if isinstance(exc, ChuteError):
        return from_chute(exc)
    log.exception("SQS %s failed", action or "request")
    return SqsError("InternalError", "We encountered an internal error. Please try again.")


def parse_form(form: Mapping[str, Any]) -> tuple[str, dict]:
    """The action and its JSON-shaped params from a query-protocol form (a dict or a multi-dict)."""
    action = form.get("Action")
    if not isinstance(action, str) or not action:
        raise SqsError("MissingAction", "The request must contain the parameter Action.")
    tree: dict = {}
    for key, value in form.items():
        if key in PROTOCOL_KEYS or key.startswith("X-Amz-") or not isinstance(value, str):
            continue
        _insert(tree, key, value)
    return action, _structure(tree, action)


def _insert(tree: dict, key: str, value: str) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SqsError("InvalidQueryParameter", f"The parameter {key} conflicts with another parameter.")
        node = child
    if isinstance(node.get(parts[-1]), dict) or not all(parts):
        raise SqsError("InvalidQueryParameter", f"The parameter {key} is malformed.")
    node[parts[-1]] = value


def _structure(tree: dict, action: str) -> dict:
    """A JSON structure from a subtree of the form (members by name)."""
    result: dict = {}
    for name, node in tree.items():
        if name in LISTS:
            result[LISTS[name]] = [_value(item, name, action) for item in _items(node, name)]
        elif name in MAPS:
            json_name, key_name, value_name = MAPS[name]
            json_name = MAP_NAME_BY_ACTION.get((action, json_name), json_name)
            result[json_name] = _map(node, name, key_name, value_name, action)
        else:
            result[name] = _value(node, name, action)
    return result


def _value(node: str | dict, name: str, action: str) -> Any:
    if isinstance(node, dict):
        return _structure(node, action)
    if name in INTEGERS:
        try:
            return int(node)
        except ValueError:
            raise SqsError("InvalidParameterValue", f"Value {node!r} for parameter {name} is invalid.") from None
    return node


def _items(node: str | dict, name: str) -> list:
    """The items of a flattened list (`Name.1`, `Name.2`, ...) or a wrapped one (`Name.member.1`), in order; an
    unnumbered `Name=x` (as boto 2 sends `AttributeName=All`) is a list of one."""
    if isinstance(node, str):
        return [node]
    if set(node) == {"member"}:
        node = node["member"]
    if not isinstance(node, dict) or not all(_INDEX.fullmatch(index) for index in node):
        raise SqsError("InvalidQueryParameter", f"The parameter {name} must be numbered: {name}.1, {name}.2, ...")
    return [node[index] for index in sorted(node, key=int)]


def _map(node: str | dict, name: str, key_name: str, value_name: str, action: str) -> dict:
    result = {}
    if isinstance(node, dict) and set(node) == {"entry"}:
        node = node["entry"]
    # `Attribute.Name=x&Attribute.Value=y`, unnumbered (boto 2's SetQueueAttributes), is a map of one.
    entries = [node] if isinstance(node, dict) and key_name in node else _items(node, name)
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get(key_name), str) or value_name not in entry:
            raise SqsError("MissingParameter", f"Each {name}.N needs a {key_name} and a {value_name}.")
        result[entry[key_name]] = _value(entry[value_name], value_name, action)
    return result


def _is_queue_path(path: str) -> bool:
    parts = path.strip("/").split("/")
    return len(parts) == 2 and all(parts)


def render_result(action: str, result: dict, request_id: str) -> bytes:
    """The XML response document of a successful action."""
    out = [f'<?xml version="1.0" encoding="UTF-8"?>\n<{action}Response xmlns="{XML_NAMESPACE}">']
    if action == "ReceiveMessage" and result.get("Messages"):
        result = {**result, "Messages": [_as_shown(message) for message in result["Messages"]]}
    if action not in WITHOUT_RESULT:
        out.append(f"<{action}Result>")
        _render_members(out, result, action)
        out.append(f"</{action}Result>")
    out.append(f"<ResponseMetadata><RequestId>{request_id}</RequestId></ResponseMetadata></{action}Response>")
    return "".join(out).encode()


def render_error(error: SqsError, request_id: str) -> bytes:
    """The XML `ErrorResponse` document of an error, with its legacy query code."""
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<ErrorResponse xmlns="{XML_NAMESPACE}"><Error>'
        f"<Type>{error.fault}</Type><Code>{escape(error.query_code)}</Code>"
        f"<Message>{escape(error.message)}</Message><Detail/></Error>"
        f"<RequestId>{request_id}</RequestId></ErrorResponse>"
    ).encode()


def _as_shown(message: dict) -> dict:
    """A received message as its XML shows it: characters XML cannot carry replaced, and its MD5s those of what
    is shown (older SDKs check them against the body and attributes they parsed)."""
    changed: dict[str, Any] = {}
    body = message.get("Body")
    if body and _NOT_XML.search(body):
        changed["Body"] = shown = _NOT_XML.sub(REPLACEMENT, body)
        changed["MD5OfBody"] = msgs.md5_hex(shown.encode())
    attributes = message.get("MessageAttributes")
    if attributes and any(_NOT_XML.search(value.get("StringValue", "")) for value in attributes.values()):
        attributes = {name: {**value, "StringValue": _NOT_XML.sub(REPLACEMENT, value["StringValue"])}
                      if "StringValue" in value else value for name, value in attributes.items()}  # fmt: skip
        changed["MessageAttributes"] = attributes
        changed["MD5OfMessageAttributes"] = msgs.md5_of_attributes(attributes)
    return {**message, **changed} if changed else message


def _render_members(out: list[str], members: Mapping[str, Any], action: str) -> None:
    for name, value in members.items():
        if value is None:
            continue
        if isinstance(value, list):
            element = RESULT_LISTS.get(name, name).format(action=action)
            for item in value:
                _render_element(out, element, item, action)
        elif isinstance(value, dict) and name in RESULT_MAPS:
            element, key_name, value_name = RESULT_MAPS[name]
            for key, item in value.items():
                out.append(f"<{element}><{key_name}>{escape(key)}</{key_name}>")
                _render_element(out, value_name, item, action)
                out.append(f"</{element}>")
        else:
            _render_element(out, name, value, action)


def _render_element(out: list[str], element: str, value: Any, action: str) -> None:
    if isinstance(value, dict):
        out.append(f"<{element}>")
        _render_members(out, value, action)
        out.append(f"</{element}>")
    elif isinstance(value, bool):
        out.append(f"<{element}>{'true' if value else 'false'}</{element}>")
    else:
        out.append(f"<{element}>{escape(str(value))}</{element}>")


_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "\r": "&#13;", '"': "&quot;"})


def escape(text: str) -> str:
    """Text for an XML element, escaped so that a parser returns it unchanged (a bare \\r would become \\n); a
    character XML cannot carry, even as a reference, becomes U+FFFD."""
    if _NOT_XML.search(text):
        text = _NOT_XML.sub(REPLACEMENT, text)
    return text.translate(_ESCAPES)
