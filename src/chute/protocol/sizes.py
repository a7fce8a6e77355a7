"""Upper bounds of what messages take inside a frame, so that batches can be cut to fit `max_frame_bytes`.

Used by the client (PUBLISH batches) and the server (DELIVER batches, RECEIVE replies). Each bound counts the
body, every string as UTF-8, and a generous fixed overhead for the msgpack keys and numbers; it is never less
than the real encoded size.

Invariant: `fitting` returns at least 1 for a non-empty list: a single message always goes out alone (a body is
at most `max_message_bytes`, and the server keeps 64 KiB of every frame for everything else).
"""

from __future__ import annotations

from collections.abc import Sequence

from chute.model import Delivery, Publish

FRAME_RESERVE = 64 * 1024  # room kept in every frame for the header, keys and small fields
REQUEST_RESERVE = 1024  # the frame header and the request's or reply's own keys
MESSAGE_OVERHEAD = 256  # msgpack keys, ids, floats and small fields of one message, rounded up
HEADER_OVERHEAD = 10  # msgpack string prefixes of one header name and value
GROUP_OVERHEAD = 32  # a PUBLISH group's keys and prefixes (protocol 2), beyond its destination's name


def body_budget(max_frame_bytes: int) -> int:
    """The most body bytes one batch may carry (the rest of the frame is for headers and fields)."""
    return max_frame_bytes - FRAME_RESERVE


def _strings_size(headers: dict[str, str] | None, *texts: str | None) -> int:
    size = 0
    for text in texts:
        if text:
            size += len(text.encode())
    if headers:
        size += sum(len(k.encode()) + len(v.encode()) + HEADER_OVERHEAD for k, v in headers.items())
    return size


def publish_size(message: Publish) -> int:
    """An upper bound of the bytes `message` takes inside a PUBLISH frame."""
    size = MESSAGE_OVERHEAD + len(message.body)
    if message.headers or message.group or message.dedup_id or message.subject:
        size += _strings_size(message.headers, message.group, message.dedup_id, message.subject)
    return size


def delivery_size(delivery: Delivery) -> int:
    """An upper bound of the bytes `delivery` takes inside a DELIVER frame or a RECEIVE reply."""
    message = delivery.message
    return (
        MESSAGE_OVERHEAD
        + len(message.body)
        + len(delivery.queue.encode())
        + _strings_size(message.headers, message.subject, message.group, message.dedup_id, delivery.dead_letter_source)
    )


def fitting(deliveries: Sequence[Delivery], max_frame_bytes: int) -> int:
    """How many of `deliveries`, from the first, fit one frame (at least one)."""
    room = max_frame_bytes - REQUEST_RESERVE
    for count, delivery in enumerate(deliveries):
        room -= delivery_size(delivery)
        if room < 0:
            return max(1, count)
    return len(deliveries)
