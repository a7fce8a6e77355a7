"""The public data types: settings, messages, deliveries and stats.

Everything here is plain data (msgspec Structs), so the same types are encoded on the wire, in the HTTP API, in
snapshots and in tests. Validation of settings lives next to the type (`validate()`), raising errors from the one
table in `chute.errors`; nothing here does I/O.

Units are in the names: `_s` seconds (float), `_ms` milliseconds (int), `_bytes` bytes.
"""

from __future__ import annotations

import re
from typing import Literal

import msgspec

from chute.errors import InvalidArgument, InvalidName

# A name is what people type in a CLI and see in a URL: short, printable, no separators that need quoting.
# 1..200 characters (leaves room for the SQS `.fifo` suffix and a prefix within SQS's 80-char limit when mapped).
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}$")

MAX_PRIORITY = 9
MAX_DELAY_S = 15 * 24 * 3600.0  # "seconds up to days": SQS stops at 15 minutes, we allow 15 days
MAX_LEASE_S = 12 * 3600.0  # SQS's visibility timeout ceiling
MAX_RETENTION_S = 365 * 24 * 3600.0
MAX_DEDUP_WINDOW_S = 7 * 24 * 3600.0
MAX_HEADERS = 64
MAX_HEADER_BYTES = 16 * 1024  # all names and values together
MAX_GROUP_CHARS = 128
MAX_DEDUP_ID_CHARS = 128
MAX_TAGS = 50  # SQS's limit of tags per queue
MAX_TAG_KEY_CHARS = 128
MAX_TAG_VALUE_CHARS = 256
MAX_ATTRIBUTES = 32
MAX_ATTRIBUTE_KEY_CHARS = 64
MAX_ATTRIBUTE_VALUE_CHARS = 20 * 1024  # room for an SQS access policy

Overflow = Literal["reject", "drop-oldest", "reject-dead-letter"]
OnExpiry = Literal["dead-letter", "drop"]
DeadLetterReason = Literal["max_deliveries", "expired", "overflow", "rejected"]
DEAD_LETTER_REASONS: tuple[DeadLetterReason, ...] = ("max_deliveries", "expired", "overflow", "rejected")


def validate_name(name: object, what: str = "queue") -> str:
    """Return `name` if it is a valid queue or topic name, else raise InvalidName."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidName(
            f"invalid {what} name {name!r}: use 1-200 letters, digits, '_', '-' or '.', starting with a letter or digit"
        )
    return name


def _check_range(field: str, value: float | int | None, low: float, high: float, *, allow_none=True) -> None:
    if value is None:
        if not allow_none:
            raise InvalidArgument(f"{field} is required")
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise InvalidArgument(f"{field} must be a number, got {value!r}")
    if not low <= value <= high:
        raise InvalidArgument(f"{field} must be between {low:g} and {high:g}, got {value!r}")


def _check_mapping(field: str, value: object, max_items: int, max_key: int, max_value: int) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise InvalidArgument(f"{field} must be a mapping of strings, got {type(value).__name__}")
    if len(value) > max_items:
        raise InvalidArgument(f"{field}: at most {max_items} entries, got {len(value)}")
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str) or not 1 <= len(key) <= max_key:
            raise InvalidArgument(f"{field}: keys of 1-{max_key} characters mapping to strings, got {key!r}")
        if len(item) > max_value:
            raise InvalidArgument(f"{field}: the value of {key!r} is longer than {max_value} characters")


class QueueSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings of a queue. `None` means unlimited / off."""

    lease_s: float = 30.0
    """Default lease (visibility timeout) of a delivery."""
    max_deliveries: int | None = None
    """After this many deliveries without an ack the message is dead-lettered (reason `max_deliveries`)."""
    dead_letter_queue: str | None = None
    """Queue that receives dead-lettered messages; without one they are dropped."""
    delay_s: float = 0.0
    """Default delay before a published message becomes ready."""
    retention_s: float | None = None
    """Default message TTL: a message older than this is dead-lettered (reason `expired`), see `on_expiry`. A
    message dead-lettered into this queue, or redriven back into it, gets this TTL counted from that moment (as
    RabbitMQ does; SQS counts a dead-letter queue's retention from the first publish instead)."""
    on_expiry: OnExpiry = "dead-letter"
    """What becomes of a message whose TTL ends: `dead-letter` (to the dead-letter queue with reason `expired`,
    as RabbitMQ does; dropped if there is none) or `drop` (deleted even if there is a dead-letter queue, as SQS
    does: queues created through the SQS API have `drop`)."""
    max_length: int | None = None
    max_bytes: int | None = None
    overflow: Overflow = "reject"
    """At max_length / max_bytes: `reject` the publish (QueueFull); `reject-dead-letter` it and put the refused
    messages in the dead-letter queue (reason `overflow`; RabbitMQ's `reject-publish-dlx`); or `drop-oldest`
    into the dead-letter queue."""
    rate_limit: float | None = None
    """Delivery rate limit in messages per second (token bucket; a spike is delivered at this pace)."""
    rate_burst: float | None = None
    """Token bucket size; defaults to max(1, rate_limit)."""
    dedup_window_s: float = 300.0
    """A publish repeating a dedup id within this window is confirmed but not stored twice."""
    fifo: bool = False
    """FIFO groups: within a group key one message in flight at a time, strictly in order."""
    tags: dict[str, str] | None = None
    """Labels for people and tools (SQS `TagQueue`); Chute gives them no meaning. At most 50."""
    attributes: dict[str, str] | None = None
    """Protocol extras Chute keeps but does not act on, by name (e.g. the SQS attributes `MaximumMessageSize`,
    `ReceiveMessageWaitTimeSeconds`, `RedriveAllowPolicy`, `CreatedTimestamp`). At most 32."""

    def validate(self, name: str = "") -> QueueSettings:
        """Return self if every setting is in range, else raise InvalidArgument naming the setting."""
        _check_range("lease_s", self.lease_s, 0.001, MAX_LEASE_S, allow_none=False)
        _check_range("max_deliveries", self.max_deliveries, 1, 1_000_000)
        _check_range("delay_s", self.delay_s, 0, MAX_DELAY_S, allow_none=False)
        _check_range("retention_s", self.retention_s, 0.001, MAX_RETENTION_S)
        _check_range("max_length", self.max_length, 1, 2**40)
        _check_range("max_bytes", self.max_bytes, 1, 2**50)
        _check_range("rate_limit", self.rate_limit, 0.001, 10_000_000)
        _check_range("rate_burst", self.rate_burst, 1, 10_000_000)
        _check_range("dedup_window_s", self.dedup_window_s, 0, MAX_DEDUP_WINDOW_S, allow_none=False)
        if self.overflow not in ("reject", "drop-oldest", "reject-dead-letter"):
            raise InvalidArgument(
                f"overflow must be 'reject', 'reject-dead-letter' or 'drop-oldest', got {self.overflow!r}"
            )
        if self.on_expiry not in ("dead-letter", "drop"):
            raise InvalidArgument(f"on_expiry must be 'dead-letter' or 'drop', got {self.on_expiry!r}")
        if self.rate_burst is not None and self.rate_limit is None:
            raise InvalidArgument("rate_burst needs rate_limit")
        if self.dead_letter_queue is not None:
            validate_name(self.dead_letter_queue, "dead-letter queue")
            if self.dead_letter_queue == name:
                raise InvalidArgument("a queue cannot be its own dead-letter queue")
        _check_mapping("tags", self.tags, MAX_TAGS, MAX_TAG_KEY_CHARS, MAX_TAG_VALUE_CHARS)
        _check_mapping("attributes", self.attributes, MAX_ATTRIBUTES, MAX_ATTRIBUTE_KEY_CHARS,
                       MAX_ATTRIBUTE_VALUE_CHARS)  # fmt: skip
        return self


class TopicSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings of a topic. Retention keeps published messages so a new subscription can start in the past."""

    retention_s: float | None = None
    retention_bytes: int | None = None
    dedup_window_s: float = 300.0
    attributes: dict[str, str] | None = None
    """Protocol extras Chute keeps but does not act on, by name (e.g. an AMQP exchange's type and flags,
    docs/amqp.md). At most 32. Stored with the topic in the log and checkpoints, so they are as durable as it."""

    def validate(self, name: str = "") -> TopicSettings:
        """Return self if every setting is in range, else raise InvalidArgument naming the setting."""
        _check_range("retention_s", self.retention_s, 0.001, MAX_RETENTION_S)
        _check_range("retention_bytes", self.retention_bytes, 1, 2**50)
        _check_range("dedup_window_s", self.dedup_window_s, 0, MAX_DEDUP_WINDOW_S, allow_none=False)
        _check_mapping("attributes", self.attributes, MAX_ATTRIBUTES, MAX_ATTRIBUTE_KEY_CHARS,
                       MAX_ATTRIBUTE_VALUE_CHARS)  # fmt: skip
        return self


# The per-message types (Publish, Message, Delivery) are made, decoded and dropped for every message on both ends of
# a connection; as `gc=False` Structs they are not tracked by the cyclic garbage collector, so they neither count
# towards its collections nor get walked by them (the collections of a busy broker or client were mostly these).
# Safe because they never form reference cycles: their fields are bytes, str, numbers, a str -> str dict, and a
# Delivery's Message.


class Publish(msgspec.Struct, kw_only=True, gc=False):
    """One message to publish: a body and its options.

    Not tracked by the garbage collector (`gc=False`: see the note above `Publish`)."""

    body: bytes
    headers: dict[str, str] | None = None
    priority: int = 0
    """0..9; higher is delivered first."""
    delay_s: float | None = None
    """None: the queue's default delay."""
    ttl_s: float | None = None
    """None: the queue's retention."""
    group: str | None = None
    dedup_id: str | None = None
    subject: str | None = None
    """Topic publishes only: the subject matched by subscription patterns (default: the topic name)."""


class Message(msgspec.Struct, kw_only=True, gc=False):
    """A stored message as a consumer or a browser sees it. Read-only by convention: the deliveries of one stored
    message (to several queues, or again after a redelivery) may share one `Message`.

    Not tracked by the garbage collector (`gc=False`: see the note above `Publish`)."""

    id: int
    body: bytes
    headers: dict[str, str]
    publish_time: float
    priority: int = 0
    subject: str | None = None
    group: str | None = None
    dedup_id: str | None = None
    expires_at: float | None = None


class Delivery(msgspec.Struct, kw_only=True, gc=False):
    """One hand-over of a message: ack or nack it with `receipt` before `lease_deadline`.

    Not tracked by the garbage collector (`gc=False`: see the note above `Publish`)."""

    queue: str
    receipt: int
    delivery_count: int
    message: Message
    lease_deadline: float = 0.0
    dead_letter_reason: DeadLetterReason | None = None
    dead_letter_source: str | None = None

    @property
    def body(self) -> bytes:
        return self.message.body

    @property
    def headers(self) -> dict[str, str]:
        return self.message.headers

    @property
    def id(self) -> int:
        return self.message.id


class QueueInfo(msgspec.Struct, kw_only=True):
    name: str
    settings: QueueSettings
    ephemeral: bool = False


class TopicInfo(msgspec.Struct, kw_only=True):
    name: str
    settings: TopicSettings
    subscriptions: list[SubscriptionInfo] = []


class SubscriptionInfo(msgspec.Struct, kw_only=True):
    topic: str
    pattern: str
    queue: str
    filter: dict | None = None
    ephemeral: bool = False


class QueueStats(msgspec.Struct, kw_only=True):
    """A queue's depth and counters. Counters count since the broker started."""

    name: str
    ready: int
    in_flight: int
    delayed: int
    bytes: int
    dead_lettered: int
    """Messages this queue sent to its dead-letter queue (or dropped, without one)."""
    oldest_age_s: float
    published: int
    delivered: int
    acked: int
    nacked: int
    redelivered: int
    received_age_s: float | None = None
    """Seconds since a consumer last asked this queue for messages (a receive, a long poll's look, a push
    consumer's lease), None if none did since the broker started: a consumer waiting in a long poll asks at least
    once a second. (A cluster's AMQP front counts a queue as in use by another node with it.)"""
