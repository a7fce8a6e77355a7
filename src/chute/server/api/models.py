"""The JSON shapes of the HTTP API (docs/http-api.md): msgspec Structs that validate requests and describe
responses; /openapi.json is generated from these same types.

Invariants: request models forbid unknown fields and carry their ranges (`Meta`), so a decoded request is
well-typed and in range before any handler runs (the core still checks what depends on state); 64-bit numbers
(message ids, receipts) are strings in JSON; a message body travels as a string, UTF-8 or base64
(`body_encoding`). Settings reuse `chute.model.QueueSettings` / `TopicSettings`, so a new setting appears in the
API, its schema and its PATCH model at once.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from chute.model import (
    MAX_DELAY_S,
    MAX_LEASE_S,
    MAX_PRIORITY,
    NAME_RE,
    DeadLetterReason,
    QueueSettings,
    QueueStats,
    SubscriptionInfo,
    TopicInfo,
    TopicSettings,
)

MAX_BATCH = 1000  # messages per publish batch, deliveries per receive
MAX_PEEK = 100
MAX_WAIT_S = 60.0  # a long poll longer than this outlives many proxies' idle timeouts
MAX_RECEIPTS = 10_000  # per ack / nack / extend

Name = Annotated[str, Meta(pattern=NAME_RE.pattern, description="a queue or topic name")]
Id = Annotated[str, Meta(pattern=r"^[0-9]{1,20}$", description="a 64-bit integer, as a string")]
Receipts = Annotated[list[Id], Meta(min_length=1, max_length=MAX_RECEIPTS)]
BodyEncoding = Literal["utf-8", "base64"]
Seconds = Annotated[float, Meta(ge=0)]


class Model(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base of request bodies: unknown fields are refused."""


class Reply(msgspec.Struct, kw_only=True):
    """Base of response bodies."""


# -- errors ---------------------------------------------------------------------------------------------------


class ErrorDetail(Reply, omit_defaults=True):
    name: str
    """Stable error name from the error table (`chute.errors`)."""
    code: int
    message: str
    retryable: bool
    receipts: list[Id] | None = None
    """invalid_receipt only: the receipts that were not leased (the others were settled)."""


class Error(Reply):
    """Every error response: status from the error table, this body."""

    error: ErrorDetail


# -- settings -------------------------------------------------------------------------------------------------


def _patch_of(settings: type[msgspec.Struct], name: str, doc: str) -> type[msgspec.Struct]:
    """A model with every field of `settings`, each optional (absent = unchanged)."""
    fields = [(f.name, f.type | UnsetType, UNSET) for f in msgspec.structs.fields(settings)]
    patch = msgspec.defstruct(name, fields, kw_only=True, forbid_unknown_fields=True, module=__name__)
    patch.__doc__ = doc
    return patch


QueueSettingsPatch = _patch_of(
    QueueSettings, "QueueSettingsPatch", "Some queue settings; a field left out stays, null means unlimited / off."
)
TopicSettingsPatch = _patch_of(
    TopicSettings, "TopicSettingsPatch", "Some topic settings; a field left out is unchanged, null means off."
)


def changes_of(patch: msgspec.Struct) -> dict[str, Any]:
    """The fields a PATCH body gave, as builtins."""
    return {key: value for key, value in msgspec.structs.asdict(patch).items() if value is not UNSET}


class QueueDetail(Reply):
    name: str
    settings: QueueSettings
    stats: QueueStats
    dead_letter_sources: list[str]
    """Queues whose dead-letter queue this is."""
    ephemeral: bool = False


class QueueList(Reply):
    queues: list[QueueDetail]


class TopicList(Reply):
    topics: list[TopicInfo]


class SubscriptionList(Reply):
    subscriptions: list[SubscriptionInfo]


# -- messages -------------------------------------------------------------------------------------------------


class PublishMessage(Model):
    """One message to publish; only `body` is required."""

    body: str
    body_encoding: BodyEncoding = "utf-8"
    headers: dict[str, str] | None = None
    priority: Annotated[int, Meta(ge=0, le=MAX_PRIORITY)] = 0
    delay_s: Annotated[float, Meta(ge=0, le=MAX_DELAY_S)] | None = None
    """null: the queue's default delay."""
    ttl_s: Annotated[float, Meta(gt=0)] | None = None
    """null: the queue's retention."""
    group: str | None = None
    dedup_id: str | None = None
    subject: str | None = None
    """Topics only: the subject subscriptions' patterns match (default: the topic's name)."""


class PublishBatch(Model):
    messages: Annotated[list[PublishMessage], Meta(min_length=1, max_length=MAX_BATCH)]


class Published(Reply):
    id: Id


class PublishedBatch(Reply):
    ids: list[Id]


class MessageOut(Reply):
    id: Id
    body: str
    body_encoding: BodyEncoding
    headers: dict[str, str]
    publish_time: float
    priority: int = 0
    subject: str | None = None
    group: str | None = None
    dedup_id: str | None = None
    expires_at: float | None = None


class DeliveryOut(Reply):
    """One delivery: ack or nack it with `receipt` before `lease_deadline`. Peeked messages have no receipt."""

    queue: str
    receipt: Id | None
    delivery_count: int
    lease_deadline: float | None
    message: MessageOut
    dead_letter_reason: DeadLetterReason | None = None
    dead_letter_source: str | None = None


class MessageList(Reply):
    messages: list[DeliveryOut]


class DeliveryList(Reply):
    deliveries: list[DeliveryOut]


class ReceiveRequest(Model):
    max_messages: Annotated[int, Meta(ge=1, le=MAX_BATCH)] = 1
    wait_s: Annotated[float, Meta(ge=0, le=MAX_WAIT_S)] = 0.0
    """Long poll: wait up to this long for the first message."""
    lease_s: Annotated[float, Meta(ge=0.001, le=MAX_LEASE_S)] | None = None
    """null: the queue's lease."""


class TopicReceiveRequest(Model):
    pattern: Annotated[str, Meta(min_length=1, max_length=1000)] = ">"
    """The subject pattern of the ephemeral subscription (`>`: every subject)."""
    filter: dict[str, Any] | None = None
    """Header filter, e.g. {"region": "eu"} or {"amount": {"gt": 100}}."""
    max_messages: Annotated[int, Meta(ge=1, le=MAX_BATCH)] = 1
    wait_s: Annotated[float, Meta(ge=0, le=MAX_WAIT_S)] = 0.0
    """Wait up to this long for the first message published during the request."""


class AckRequest(Model):
    receipts: Receipts


class NackRequest(Model):
    receipts: Receipts
    delay_s: Annotated[float, Meta(ge=0, le=MAX_DELAY_S)] = 0.0
    dead_letter: bool = False
    """Dead-letter now (reason `rejected`) instead of making the message ready again."""


class ExtendRequest(Model):
    receipts: Receipts
    lease_s: Annotated[float, Meta(ge=0.001, le=MAX_LEASE_S)]
    """The leases end this many seconds from now."""


class Empty(Reply):
    pass


class Purged(Reply):
    purged: int


class RedriveRequest(Model):
    max_messages: Annotated[int, Meta(ge=1)] | None = None


class Redriven(Reply):
    moved: int


# -- topics ---------------------------------------------------------------------------------------------------


class SubscribeRequest(Model):
    queue: Name
    pattern: Annotated[str, Meta(min_length=1, max_length=1000)] = ">"
    filter: dict[str, Any] | None = None
    """Header filter, e.g. {"region": "eu"} or {"amount": {"gt": 100}}."""
    start: Literal["now", "earliest"] | Annotated[float, Meta(ge=0)] = "now"
    """`now`, `earliest` (every retained message) or a Unix time (retained messages published since)."""


class SubscriptionPatch(Model):
    filter: dict[str, Any] | None
    """The new header filter (null: none)."""


# -- server ---------------------------------------------------------------------------------------------------


class ConsumerInfo(Reply):
    id: int
    connection_id: int
    queue: str
    prefetch: int
    unacked: int
    tag: str = ""
    """An AMQP consumer's consumer tag ("" for native consumers)."""


class ConnectionInfo(Reply):
    id: int
    peer: str
    client_name: str
    user: str
    connected_at: float
    consumers: list[ConsumerInfo]
    leased: int
    """Deliveries received on this connection and not yet settled."""
    protocol: str = "native"
    """`native` or `amqp` (AMQP 0-9-1, docs/amqp.md)."""
    channels: int = 0
    """AMQP: open channels."""


class ConnectionList(Reply):
    connections: list[ConnectionInfo]


class ConsumerList(Reply):
    consumers: list[ConsumerInfo]


class Totals(Reply):
    """Sums over the queues the caller may see."""

    ready: int = 0
    in_flight: int = 0
    delayed: int = 0
    bytes: int = 0
    dead_lettered: int = 0
    published: int = 0
    delivered: int = 0
    acked: int = 0
    nacked: int = 0
    redelivered: int = 0


class StorageInfo(Reply):
    log_bytes: int
    segments: int
    read_only: bool


class Overview(Reply):
    version: str
    state: str
    uptime_s: float
    time: float
    queues: int
    topics: int
    connections: int
    consumers: int
    totals: Totals
    storage: StorageInfo


class LoginRequest(Model):
    user: Annotated[str, Meta(max_length=200)]
    password: Annotated[str, Meta(max_length=1000)]


class LoginReply(Reply):
    token: str
    expires_s: float


class WhoAmI(Reply):
    name: str
    auth_enabled: bool
    superuser: bool
    permissions: list[dict[str, Any]]
