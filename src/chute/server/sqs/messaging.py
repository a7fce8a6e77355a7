"""The SQS message actions: SendMessage(+Batch), ReceiveMessage, DeleteMessage(+Batch),
ChangeMessageVisibility(+Batch).

Mapping: a message is published to the Chute queue of the same name (body as UTF-8; message attributes as
headers, see messages.py; DelaySeconds -> delay_s; MessageGroupId -> group; MessageDeduplicationId -> dedup_id,
or the SHA-256 of the body with ContentBasedDeduplication). ReceiveMessage leases (VisibilityTimeout -> lease_s;
0 is a lease of 1 ms), DeleteMessage acks, ChangeMessageVisibility extends a lease (0: gives the message back at
once).

Invariants: a batch is checked as a whole first (EmptyBatchRequest, TooManyEntriesInBatchRequest,
InvalidBatchEntryId, BatchEntryIdsNotDistinct, BatchRequestTooLong) and then entry by entry, each bad entry
reported in `Failed` while the good ones go ahead; a long poll whose client hung up gives back what it leased.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time

from chute.errors import InvalidReceipt
from chute.model import Delivery, Publish
from chute.server.sqs import messages as msgs
from chute.server.sqs import queueattrs
from chute.server.sqs.common import SqsContext, action, integer, queue_of, required_string, string_list
from chute.server.sqs.errors import SqsError

MAX_BATCH_ENTRIES = 10
MAX_BATCH_BYTES = 1_048_576
MAX_VISIBILITY_S = 43_200
MIN_LEASE_S = 0.001  # VisibilityTimeout 0: visible again (almost) at once
DISCONNECT_POLL_S = 0.5
_ENTRY_ID = re.compile(r"^[A-Za-z0-9_\-]{1,80}$")
_ID_CHARS = re.compile(r"^[A-Za-z0-9!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~]{1,128}$")
SYSTEM_ATTRIBUTE_NAMES = (
    "All", "SenderId", "SentTimestamp", "ApproximateReceiveCount", "ApproximateFirstReceiveTimestamp",
    "SequenceNumber", "MessageDeduplicationId", "MessageGroupId", "AWSTraceHeader", "DeadLetterQueueSourceArn",
)  # fmt: skip


# -- sending ----------------------------------------------------------------------------------------------------


def _prepare(queue, entry: dict) -> tuple[Publish, dict, int]:
    """(the Publish, the MD5s to answer with, the size SQS counts) for one message, or SqsError."""
    settings = queue.settings
    kept = settings.attributes or {}
    body = msgs.check_body(entry.get("MessageBody"))
    attributes, attributes_size = msgs.check_message_attributes(entry.get("MessageAttributes"))
    system, system_size = msgs.check_message_attributes(entry.get("MessageSystemAttributes"), system=True)
    for name, value in system.items():
        if value["DataType"] != "String" or "StringValue" not in value:
            raise SqsError("InvalidParameterValue", f"Message system attribute {name} must be of type String.")
    data = body.encode()
    size = len(data) + attributes_size + system_size
    limit = int(kept.get("MaximumMessageSize", queueattrs.DEFAULT_MAX_MESSAGE_BYTES))
    if size > limit:
        raise SqsError("InvalidParameterValue", f"One or more parameters are invalid. Reason: Message must be "
                       f"shorter than {limit} bytes.")  # fmt: skip
    delay = integer(entry, "DelaySeconds", 0, 900)
    group = entry.get("MessageGroupId")
    dedup_id = entry.get("MessageDeduplicationId")
    for name, value in (("MessageGroupId", group), ("MessageDeduplicationId", dedup_id)):
        if value is not None and (not isinstance(value, str) or not _ID_CHARS.match(value)):
            raise SqsError("InvalidParameterValue", f"Value {value} for parameter {name} is invalid. Reason: it must "
                           "be 1-128 alphanumeric or punctuation characters.")  # fmt: skip
    if settings.fifo:
        if delay:  # 0 is accepted (and changes nothing): only a real per-message delay is refused
            raise SqsError("InvalidParameterValue", f"Value {delay} for parameter DelaySeconds is invalid. Reason: "
                           "The request include parameter that is not valid for this queue type.")  # fmt: skip
        if group is None:
            raise SqsError("MissingParameter", "The request must contain the parameter MessageGroupId.")
        if dedup_id is None:
            if kept.get("ContentBasedDeduplication") != "true":
                raise SqsError("InvalidParameterValue", "The queue should either have ContentBasedDeduplication "
                               "enabled or MessageDeduplicationId provided explicitly")  # fmt: skip
            dedup_id = hashlib.sha256(data).hexdigest()
    elif dedup_id is not None:
        raise SqsError("InvalidParameterValue", "Value for parameter MessageDeduplicationId is invalid. Reason: The "
                       "request include parameter that is not valid for this queue type.")  # fmt: skip
    if settings.fifo:
        delay = None  # a FIFO queue's messages take the queue's delay
    publish = Publish(body=data, headers=msgs.to_headers(attributes, system),
                      delay_s=float(delay) if delay is not None else None, group=group, dedup_id=dedup_id)  # fmt: skip
    answer = {"MD5OfMessageBody": msgs.md5_hex(data)}
    if attributes:
        answer["MD5OfMessageAttributes"] = msgs.md5_of_attributes(attributes)
    if system:
        answer["MD5OfMessageSystemAttributes"] = msgs.md5_of_attributes(system)
    return publish, answer, size


def _sent(answer: dict, chute_id: int, fifo: bool) -> dict:
    answer["MessageId"] = msgs.message_id(chute_id)
    if fifo:
        answer["SequenceNumber"] = msgs.sequence_number(chute_id)
    return answer


@action
async def send_message(ctx: SqsContext, params: dict) -> dict:
    queue = queue_of(ctx, params, "publish")
    publish, answer, _ = _prepare(queue, params)
    [chute_id] = await ctx.broker.publish_batch(queue.name, [publish])
    return _sent(answer, chute_id, queue.settings.fifo)


def _entries(params: dict) -> list[dict]:
    """The batch's entries, checked as a whole."""
    entries = params.get("Entries")
    if not entries:
        raise SqsError("EmptyBatchRequest", "There should be at least one entry in the request.")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise SqsError("InvalidParameterValue", "Entries must be a list of structures.")
    if len(entries) > MAX_BATCH_ENTRIES:
        raise SqsError("TooManyEntriesInBatchRequest", f"Maximum number of entries per request are "
                       f"{MAX_BATCH_ENTRIES}. You have sent {len(entries)}.")  # fmt: skip
    seen: set[str] = set()
    for entry in entries:
        entry_id = entry.get("Id")
        if not isinstance(entry_id, str) or not _ENTRY_ID.match(entry_id):
            raise SqsError("InvalidBatchEntryId", "A batch entry id can only contain alphanumeric characters, "
                           "hyphens and underscores. It can be at most 80 letters long.")  # fmt: skip
        if entry_id in seen:
            raise SqsError("BatchEntryIdsNotDistinct", f"Id {entry_id} repeated.")
        seen.add(entry_id)
    return entries


def _failed(entry_id: str, error: SqsError) -> dict:
    return {"Id": entry_id, "SenderFault": error.sender_fault, "Code": error.code, "Message": error.message}


@action
async def send_message_batch(ctx: SqsContext, params: dict) -> dict:
    queue = queue_of(ctx, params, "publish")
    entries = _entries(params)
    total = sum(len(str(e.get("MessageBody", "")).encode()) for e in entries)
    if total > MAX_BATCH_BYTES:
        raise SqsError("BatchRequestTooLong", f"Batch requests cannot be longer than {MAX_BATCH_BYTES} bytes. You "
                       f"have sent {total} bytes.")  # fmt: skip
    if queue.settings.fifo and any(entry.get("MessageGroupId") is None for entry in entries):
        # AWS refuses the whole batch (not the entry) when an entry to a FIFO queue has no group
        raise SqsError("InvalidParameterValue", "The request must contain the parameter MessageGroupId.")
    failed: list[dict] = []
    good: list[tuple[str, Publish, dict]] = []
    total = 0
    for entry in entries:
        try:
            publish, answer, size = _prepare(queue, entry)
        except SqsError as error:
            failed.append(_failed(entry["Id"], error))
            continue
        total += size
        good.append((entry["Id"], publish, answer))
    if total > MAX_BATCH_BYTES:
        raise SqsError("BatchRequestTooLong", f"Batch requests cannot be longer than {MAX_BATCH_BYTES} bytes. You "
                       f"have sent {total} bytes.")  # fmt: skip
    successful = []
    if good:
        ids = await ctx.broker.publish_batch(queue.name, [publish for _, publish, _ in good])
        for (entry_id, _, answer), chute_id in zip(good, ids, strict=True):
            successful.append({"Id": entry_id} | _sent(answer, chute_id, queue.settings.fifo))
    return {"Successful": successful, "Failed": failed}


# -- receiving --------------------------------------------------------------------------------------------------


@action
async def receive_message(ctx: SqsContext, params: dict) -> dict:
    queue = queue_of(ctx, params, "consume")
    count = integer(params, "MaxNumberOfMessages", 1, MAX_BATCH_ENTRIES, 1)
    default_wait = int((queue.settings.attributes or {}).get("ReceiveMessageWaitTimeSeconds", "0"))
    wait = integer(params, "WaitTimeSeconds", 0, 20, default_wait)
    visibility = integer(params, "VisibilityTimeout", 0, MAX_VISIBILITY_S)
    lease_s = None if visibility is None else float(visibility) or MIN_LEASE_S
    system_names = string_list(params, "AttributeNames") + string_list(params, "MessageSystemAttributeNames")
    for name in system_names:
        if name not in SYSTEM_ATTRIBUTE_NAMES:
            raise SqsError("InvalidAttributeName", f"Unknown Attribute {name}.")
    attribute_names = string_list(params, "MessageAttributeNames")
    deliveries = await _receive(ctx, queue.name, count, wait, lease_s)
    if not deliveries:
        return {}
    now_ms = int(time.time() * 1000)
    return {"Messages": [_message(ctx, d, system_names, attribute_names, now_ms) for d in deliveries]}


async def _receive(ctx: SqsContext, name: str, count: int, wait: int, lease_s: float | None) -> list[Delivery]:
    """Lease up to `count` messages, long-polling up to `wait` seconds; if the client hangs up meanwhile, give
    everything back and return []."""
    broker = ctx.broker
    if not wait or "disconnected" not in ctx.extra:
        deliveries = await broker.receive(name, count, wait_s=wait, lease_s=lease_s)
    elif deliveries := await broker.receive(name, count, wait_s=0, lease_s=lease_s):
        pass  # ready at once (a busy queue): no long poll, so no task to watch for a hang-up
    else:
        task = asyncio.ensure_future(broker.receive(name, count, wait_s=wait, lease_s=lease_s))
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if not task.done() and ctx.disconnected():
                    task.cancel()
                    break
            deliveries = await task
        except asyncio.CancelledError:
            task.cancel()
            if task.done() and not task.cancelled() and task.exception() is None:
                broker.release(name, [d.receipt for d in task.result()])
            if ctx.disconnected():
                return []
            raise
    if deliveries and ctx.disconnected():
        broker.release(name, [d.receipt for d in deliveries])
        return []
    return deliveries


def _first_received(ctx: SqsContext, delivery: Delivery, now_ms: int) -> int:
    """ApproximateFirstReceiveTimestamp: when the core first leased the message in this run (kept on its entry,
    so it goes when the message goes); now if that is unknown."""
    queue = ctx.broker.core.queues.get(delivery.queue)
    entry = queue.in_flight.get(delivery.receipt) if queue is not None else None
    if entry is None or not entry.first_delivered:
        return now_ms
    return int(entry.first_delivered * 1000)


def _message(ctx: SqsContext, delivery: Delivery, system_names: list[str], attribute_names: list[str],
             now_ms: int) -> dict:  # fmt: skip
    message = delivery.message
    state = ctx.state
    first = _first_received(ctx, delivery, now_ms)
    data = message.body
    try:
        body = data.decode()
    except UnicodeDecodeError:  # a binary body published natively: SQS bodies are text, so shown with U+FFFD
        body = data.decode(errors="replace")
        data = body.encode()
    result = {
        "MessageId": msgs.message_id(message.id),
        "ReceiptHandle": msgs.make_receipt_handle(state.handle_key, delivery.queue, delivery.receipt, message.id),
        "MD5OfBody": msgs.md5_hex(data),
        "Body": body,
    }
    attributes, system = msgs.from_headers(message.headers) if message.headers else ({}, {})
    if system_names:
        every = "All" in system_names
        values = {
            "SenderId": ctx.account_id,
            "SentTimestamp": str(int(message.publish_time * 1000)),
            "ApproximateReceiveCount": str(delivery.delivery_count),
            "ApproximateFirstReceiveTimestamp": str(first),
        }
        if message.group is not None:
            values["MessageGroupId"] = message.group
        if message.dedup_id is not None:
            values["MessageDeduplicationId"] = message.dedup_id
        queue = ctx.broker.core.queues.get(delivery.queue)
        if queue is not None and queue.settings.fifo:
            values["SequenceNumber"] = msgs.sequence_number(message.id)
        if "AWSTraceHeader" in system:
            values["AWSTraceHeader"] = system["AWSTraceHeader"]
        if delivery.dead_letter_source is not None:
            values["DeadLetterQueueSourceArn"] = ctx.arn(delivery.dead_letter_source)
        chosen = values if every else {k: v for k, v in values.items() if k in system_names}
        if chosen:
            result["Attributes"] = chosen
    selected = msgs.select_attributes(attributes, attribute_names)
    if selected:
        result["MessageAttributes"] = selected
        result["MD5OfMessageAttributes"] = msgs.md5_of_attributes(selected)
    return result


# -- deleting and changing visibility ---------------------------------------------------------------------------


def _receipt(ctx: SqsContext, queue, handle: object) -> tuple[int, int]:
    """(Chute receipt, message id) of a receipt handle issued for `queue`."""
    name, receipt, chute_id = msgs.parse_receipt_handle(ctx.state.handle_key, handle)
    if name != queue.name:
        raise SqsError("ReceiptHandleIsInvalid", f'The input receipt handle "{handle}" is not a valid receipt '
                       "handle for this queue.")  # fmt: skip
    return receipt, chute_id


def _expired(handle: object) -> SqsError:
    return SqsError("InvalidParameterValue", f"Value {handle} for parameter ReceiptHandle is invalid. Reason: The "
                    "receipt handle has expired.")  # fmt: skip


def _purged(ctx: SqsContext, queue, receipt: int) -> bool:
    """Did a PurgeQueue remove the message this receipt (issued in this run) named, or find it gone already?"""
    mark = ctx.state.purges.get(queue.name)
    if mark is None or mark.queue_id != queue.id:
        return False
    return ctx.broker.core.receipt_base <= receipt < mark.receipts_below


@action
async def delete_message(ctx: SqsContext, params: dict) -> dict:
    """A standard queue deletes with the latest receipt handle even after the visibility timeout ended, as long
    as nobody has received the message since; an older handle (or one of a deleted message) succeeds and deletes
    nothing. A FIFO queue refuses a handle whose visibility timeout ended, as AWS does."""
    queue = queue_of(ctx, params, "consume")
    handle = required_string(params, "ReceiptHandle")
    receipt, chute_id = _receipt(ctx, queue, handle)
    fifo = queue.settings.fifo
    try:
        await ctx.broker.ack(queue.name, [receipt], lapsed=not fifo)
    except InvalidReceipt:
        if fifo and not _purged(ctx, queue, receipt):
            raise _expired(handle) from None
    return {}


@action
async def delete_message_batch(ctx: SqsContext, params: dict) -> dict:
    queue = queue_of(ctx, params, "consume")
    entries = _entries(params)
    fifo = queue.settings.fifo
    failed: list[dict] = []
    chosen: list[tuple[str, int, int]] = []
    handles = {entry["Id"]: entry.get("ReceiptHandle") for entry in entries}
    for entry in entries:
        try:
            receipt, chute_id = _receipt(ctx, queue, entry.get("ReceiptHandle"))
        except SqsError as error:
            failed.append(_failed(entry["Id"], error))
            continue
        chosen.append((entry["Id"], receipt, chute_id))
    unknown: set[int] = set()
    if chosen:
        try:
            await ctx.broker.ack(queue.name, [receipt for _, receipt, _ in chosen], lapsed=not fifo)
        except InvalidReceipt as error:
            unknown = set(error.receipts)
    successful = []
    for entry_id, receipt, _ in chosen:
        if receipt in unknown and fifo and not _purged(ctx, queue, receipt):
            failed.append(_failed(entry_id, _expired(handles[entry_id])))
            continue
        successful.append({"Id": entry_id})
    return {"Successful": successful, "Failed": failed}


async def _change_visibility(ctx: SqsContext, queue, handle: object, visibility: object) -> None:
    receipt, chute_id = _receipt(ctx, queue, handle)
    seconds = integer({"VisibilityTimeout": visibility}, "VisibilityTimeout", 0, MAX_VISIBILITY_S)
    if seconds is None:
        raise SqsError("MissingParameter", "The request must contain the parameter VisibilityTimeout.")
    try:
        if seconds == 0:
            await ctx.broker.nack(queue.name, [receipt])
        else:
            await ctx.broker.extend(queue.name, [receipt], float(seconds))
    except InvalidReceipt:
        lapsed = queue.lapsed.get(receipt)
        if lapsed is not None and lapsed.id == chute_id:  # the latest handle of a message back in line
            raise SqsError("MessageNotInflight", "The message referred to is not in flight (its visibility "
                           "timeout ended).") from None  # fmt: skip
        raise SqsError(
            "InvalidParameterValue",
            f"Value {handle} for parameter ReceiptHandle is invalid. Reason: "
            "Message does not exist or is not available for visibility timeout change.",
        ) from None


@action
async def change_message_visibility(ctx: SqsContext, params: dict) -> dict:
    queue = queue_of(ctx, params, "consume")
    handle = required_string(params, "ReceiptHandle")
    await _change_visibility(ctx, queue, handle, params.get("VisibilityTimeout"))
    return {}


@action
async def change_message_visibility_batch(ctx: SqsContext, params: dict) -> dict:
    queue = queue_of(ctx, params, "consume")
    successful, failed = [], []
    for entry in _entries(params):
        try:
            await _change_visibility(ctx, queue, entry.get("ReceiptHandle"), entry.get("VisibilityTimeout"))
        except SqsError as error:
            failed.append(_failed(entry["Id"], error))
        else:
            successful.append({"Id": entry["Id"]})
    return {"Successful": successful, "Failed": failed}
