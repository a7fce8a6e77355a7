"""The one error table of Chute.

Every error a user can see is a subclass of `ChuteError` listed in `ERRORS`. Each has a stable `name` and
numeric `code` (never reused or renumbered), the HTTP status the HTTP API answers with, whether a retry of the
same call can succeed (`retryable`), and whether the network server closes the connection after sending it
(`closes_connection`). The wire protocol, the HTTP API and the docs are all generated from this table.

Invariant: codes are grouped by thousands (1xxx bad input and protocol, 2xxx not found / conflict, 3xxx
capacity, 4xxx authentication, 5xxx storage, broker and connection state) and a code, once published, keeps
its meaning forever.
"""

from __future__ import annotations


class ChuteError(Exception):
    """Root of every error Chute raises on purpose."""

    name = "chute_error"
    code = 1000
    http_status = 500
    retryable = False
    closes_connection = False

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.name)
        self.message = message or self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class InvalidName(ChuteError):
    """A queue, topic or subscription name breaks the naming rules."""

    name, code, http_status = "invalid_name", 1001, 400


class InvalidArgument(ChuteError):
    """An argument or setting is out of range, of the wrong type or inconsistent with another."""

    name, code, http_status = "invalid_argument", 1002, 400


class MessageTooLarge(ChuteError):
    """A message body or its headers exceed the configured maximum size."""

    name, code, http_status = "message_too_large", 1003, 413


class InvalidReceipt(ChuteError):
    """A receipt (delivery tag) is unknown: never issued, already acked, or its lease has ended."""

    name, code, http_status = "invalid_receipt", 1004, 400


class ProtocolError(ChuteError):
    """A frame broke the native protocol (bad header, unknown opcode, undecodable payload, wrong order). The
    server answers with this error and closes the connection."""

    name, code, http_status, closes_connection = "protocol_error", 1005, 400, True


class FrameTooLarge(ChuteError):
    """A frame is larger than the negotiated maximum frame size; the connection is closed."""

    name, code, http_status, closes_connection = "frame_too_large", 1006, 413, True


class UnsupportedVersion(ChuteError):
    """Client and server share no protocol version; the connection is closed."""

    name, code, http_status, closes_connection = "unsupported_version", 1007, 400, True


class MethodNotAllowed(ChuteError):
    """HTTP only: the path exists but not with this method (the `Allow` header lists those it has)."""

    name, code, http_status = "method_not_allowed", 1008, 405


class QueueNotFound(ChuteError):
    """No queue has this name."""

    name, code, http_status = "queue_not_found", 2001, 404


class QueueExists(ChuteError):
    """A queue with this name exists with different settings."""

    name, code, http_status = "queue_exists", 2002, 409


class TopicNotFound(ChuteError):
    """No topic has this name."""

    name, code, http_status = "topic_not_found", 2003, 404


class TopicExists(ChuteError):
    """A topic with this name exists with different settings."""

    name, code, http_status = "topic_exists", 2004, 409


class SubscriptionNotFound(ChuteError):
    """No subscription binds this topic, pattern and queue."""

    name, code, http_status = "subscription_not_found", 2005, 404


class QueueInUse(ChuteError):
    """The queue cannot be deleted: it is the dead-letter queue of another queue or the target of a subscription."""

    name, code, http_status = "queue_in_use", 2006, 409


class QueueFull(ChuteError):
    """The queue is at its max length or max bytes and its overflow policy is `reject` (or `reject-dead-letter`:
    the refused messages went to its dead-letter queue)."""

    name, code, http_status, retryable = "queue_full", 3001, 429, True


class TooManyConnections(ChuteError):
    """The server is at its max connections; this one is refused and closed."""

    name, code, http_status, retryable, closes_connection = "too_many_connections", 3002, 503, True, True


class ServerBusy(ChuteError):
    """HTTP only: the server holds more unconfirmed publish data than its memory high-water mark, so an HTTP
    publish is refused before its body is read (with `Retry-After: 1`); retry once publishes have been confirmed.
    Native publishers are not refused: the server stops reading from them instead."""

    name, code, http_status, retryable = "server_busy", 3003, 503, True


class Unauthenticated(ChuteError):
    """The handshake carried no token or a wrong one; the connection is closed."""

    name, code, http_status, closes_connection = "unauthenticated", 4001, 401, True


class Forbidden(ChuteError):
    """The caller is authenticated but lacks the permission (publish, consume or manage) on this queue or
    topic. Nothing was changed."""

    name, code, http_status = "forbidden", 4002, 403


class StorageFailed(ChuteError):
    """The store could not make the change durable (EIO and the like). Nothing was confirmed; the log is now
    read-only until the broker is restarted."""

    name, code, http_status, retryable = "storage_failed", 5001, 503, True


class StorageFull(ChuteError):
    """The disk is full (ENOSPC). Nothing was confirmed; reads go on."""

    name, code, http_status, retryable = "storage_full", 5002, 507, True


class StorageReadOnly(ChuteError):
    """An earlier storage failure made the log read-only: writes are refused until restart."""

    name, code, http_status, retryable = "storage_read_only", 5003, 503, True


class StorageCorrupt(ChuteError):
    """Stored data failed its checksum outside the log tail; the report names the file and position."""

    name, code, http_status = "storage_corrupt", 5004, 500


class BrokerClosed(ChuteError):
    """The broker is closed or closing."""

    name, code, http_status, retryable = "broker_closed", 5005, 503, True


class ConsumerNotFound(ChuteError):
    """No consumer with this id on this connection (never started, or already cancelled)."""

    name, code, http_status = "consumer_not_found", 2007, 404


class RouteNotFound(ChuteError):
    """HTTP only: no route has this path (see GET /openapi.json for those there are)."""

    name, code, http_status = "route_not_found", 2008, 404


class ConnectionLost(ChuteError):
    """Client side: the connection to the broker broke before the reply came. The request may or may not have
    been carried out (a publish with a dedup id can be retried safely)."""

    name, code, http_status, retryable = "connection_lost", 5006, 503, True


class RequestTimeout(ChuteError):
    """Client side: no reply came within the call's timeout. The request may still be carried out."""

    name, code, http_status, retryable = "timeout", 5007, 504, True


class Unavailable(ChuteError):
    """Cluster only: the shard holding this queue or topic has no live owner right now (its node died and the
    takeover is not done, or the node asked no longer owns it). Nothing was changed; retry in a few seconds."""

    name, code, http_status, retryable = "unavailable", 5008, 503, True


ERRORS: tuple[type[ChuteError], ...] = (
    InvalidName,
    InvalidArgument,
    MessageTooLarge,
    InvalidReceipt,
    ProtocolError,
    FrameTooLarge,
    UnsupportedVersion,
    MethodNotAllowed,
    QueueNotFound,
    QueueExists,
    TopicNotFound,
    TopicExists,
    SubscriptionNotFound,
    QueueInUse,
    ConsumerNotFound,
    RouteNotFound,
    QueueFull,
    TooManyConnections,
    ServerBusy,
    Unauthenticated,
    Forbidden,
    StorageFailed,
    StorageFull,
    StorageReadOnly,
    StorageCorrupt,
    BrokerClosed,
    ConnectionLost,
    RequestTimeout,
    Unavailable,
)

BY_CODE: dict[int, type[ChuteError]] = {cls.code: cls for cls in ERRORS}
BY_NAME: dict[str, type[ChuteError]] = {cls.name: cls for cls in ERRORS}
