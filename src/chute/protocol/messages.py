"""Payload types of the native protocol, one per opcode (MessagePack maps via msgspec).

Messages, deliveries, settings and stats are the public types of `chute.model`, so the wire carries exactly what
the in-process API returns. Decoding is typed: a payload of the wrong shape is a ProtocolError, never a crash.

Invariant: fields are only ever added with a default (older peers omit them); none is renamed or retyped.

The payloads made per message or per frame (publish, reply, deliver, ack...) are `gc=False`, like `Publish` and
`Delivery`: untracked by the garbage collector, so the thousands a busy client or broker has in flight neither
trigger its collections nor get walked by them. Safe because they hold only data (never a payload of their own
kind, never themselves), so they cannot be part of a reference cycle; keep it so when adding fields.
"""

from __future__ import annotations

from typing import Any

import msgspec

from chute.model import Delivery, Publish


class Hello(msgspec.Struct, kw_only=True):
    versions: list[int]
    token: str | None = None
    client: str = ""
    heartbeat_s: float = 10.0
    user: str | None = None
    password: str | None = None


class Welcome(msgspec.Struct, kw_only=True):
    version: int
    server: str
    heartbeat_s: float
    max_frame_bytes: int
    max_message_bytes: int
    fsync: str | None = None
    """The server's fsync policy: "always" (a confirm means fsynced), "interval" (fsync every 100 ms: a confirm
    may precede it), "never"; None from a server that predates the field."""


class ErrorBody(msgspec.Struct, kw_only=True):
    code: int
    name: str
    message: str
    retryable: bool = False
    receipts: list[int] | None = None


class Goaway(msgspec.Struct, kw_only=True):
    reason: str = ""


class PublishGroup(msgspec.Struct, kw_only=True, gc=False):
    dest: str
    messages: list[Publish]


class PublishRequest(msgspec.Struct, kw_only=True, gc=False, omit_defaults=True):  # `more` only when there are more
    dest: str
    messages: list[Publish]
    more: list[PublishGroup] | None = None
    """Protocol 2: messages for more destinations in the same request (docs/protocol.md, section 7). Each
    destination's messages are stored or refused as a whole, on their own."""


class PublishFailure(msgspec.Struct, kw_only=True, gc=False):
    group: int
    """0: the request's `dest` and `messages`; i: its `more[i - 1]`."""
    error: ErrorBody


class PublishReply(msgspec.Struct, kw_only=True, gc=False, omit_defaults=True):  # `failed` only when something failed
    ids: list[int]
    """One id per message, in request order (`messages`, then each of `more`); 0 for a message of a failed
    group."""
    failed: list[PublishFailure] | None = None
    """Protocol 2: the groups of a request with `more` that were refused, with why."""


class ConsumeRequest(msgspec.Struct, kw_only=True):
    consumer: int
    """Chosen by the client (1..2^31, unique among its consumers on this connection), so DELIVER frames that
    arrive right behind the reply already have a known consumer."""
    queue: str
    prefetch: int = 100
    lease_s: float | None = None
    topic: str | None = None
    """Set (with `queue` ""): consume an ephemeral subscription of this topic, made for this consumer and ended
    with it (CANCEL, its end, or the connection's)."""
    pattern: str = ">"
    """With `topic`: the subscription's subject pattern."""
    filter: dict[str, Any] | None = None
    """With `topic`: the subscription's header filter."""


class ConsumeReply(msgspec.Struct, kw_only=True):
    consumer: int
    queue: str | None = None
    """For an ephemeral subscription: the name of its private queue (the `queue` of its deliveries)."""


class Deliver(msgspec.Struct, kw_only=True, gc=False):
    consumer: int
    deliveries: list[Delivery]
    end: ErrorBody | None = None
    """Set when the server ended this consumer (its queue was deleted, the broker is closing)."""


class CancelRequest(msgspec.Struct, kw_only=True, gc=False):
    consumer: int


class ReceiveRequest(msgspec.Struct, kw_only=True, gc=False):
    queue: str
    max_messages: int = 1
    wait_s: float = 0.0
    lease_s: float | None = None


class ReceiveReply(msgspec.Struct, kw_only=True, gc=False):
    deliveries: list[Delivery]


class AckRequest(msgspec.Struct, kw_only=True, gc=False, omit_defaults=True):
    queue: str
    receipts: list[int]
    dead_lettered: bool = False  # the sender dead-lettered them itself: counted as nacked and dead-lettered


class NackRequest(msgspec.Struct, kw_only=True, gc=False):
    queue: str
    receipts: list[int]
    delay_s: float = 0.0
    dead_letter: bool = False


class ExtendRequest(msgspec.Struct, kw_only=True, gc=False):
    queue: str
    receipts: list[int]
    lease_s: float


class CallRequest(msgspec.Struct, kw_only=True):
    method: str
    args: dict[str, Any] = {}


class CallReply(msgspec.Struct, kw_only=True):
    result: Any = None


class Empty(msgspec.Struct, gc=False):
    pass
