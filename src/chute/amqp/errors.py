"""AMQP 0-9-1 reply codes and `AmqpError`, the exception that becomes a channel.close or connection.close.

A channel exception (`connection=False`) closes one channel: the server sends channel.close with the code, the
text and the class and method ids of the method that failed, and discards what that channel sends until
channel.close-ok. A connection exception closes the whole connection with connection.close. The codes and their
texts follow what RabbitMQ sends ("NOT_FOUND - no queue 'x' in vhost '/'"), because client libraries and their
users match on them (pika raises ChannelClosedByBroker(404, ...)).

Invariant: `from_chute` maps every Chute error to the reply code RabbitMQ would send for the same situation, and
never turns a channel-level failure into a connection-level one.
"""

from __future__ import annotations

from chute import errors as ce

# Reply codes (AMQP 0-9-1 §1.2 constants, as RabbitMQ uses them).
REPLY_SUCCESS = 200
CONTENT_TOO_LARGE = 311
NO_ROUTE = 312
NO_CONSUMERS = 313
CONNECTION_FORCED = 320
INVALID_PATH = 402
ACCESS_REFUSED = 403
NOT_FOUND = 404
RESOURCE_LOCKED = 405
PRECONDITION_FAILED = 406
FRAME_ERROR = 501
SYNTAX_ERROR = 502
COMMAND_INVALID = 503
CHANNEL_ERROR = 504
UNEXPECTED_FRAME = 505
RESOURCE_ERROR = 506
NOT_ALLOWED = 530
NOT_IMPLEMENTED = 540
INTERNAL_ERROR = 541

NAMES = {
    CONTENT_TOO_LARGE: "CONTENT_TOO_LARGE", NO_ROUTE: "NO_ROUTE", NO_CONSUMERS: "NO_CONSUMERS",
    CONNECTION_FORCED: "CONNECTION_FORCED", INVALID_PATH: "INVALID_PATH", ACCESS_REFUSED: "ACCESS_REFUSED",
    NOT_FOUND: "NOT_FOUND", RESOURCE_LOCKED: "RESOURCE_LOCKED", PRECONDITION_FAILED: "PRECONDITION_FAILED",
    FRAME_ERROR: "FRAME_ERROR", SYNTAX_ERROR: "SYNTAX_ERROR", COMMAND_INVALID: "COMMAND_INVALID",
    CHANNEL_ERROR: "CHANNEL_ERROR", UNEXPECTED_FRAME: "UNEXPECTED_FRAME", RESOURCE_ERROR: "RESOURCE_ERROR",
    NOT_ALLOWED: "NOT_ALLOWED", NOT_IMPLEMENTED: "NOT_IMPLEMENTED", INTERNAL_ERROR: "INTERNAL_ERROR",
}  # fmt: skip


class AmqpError(Exception):
    """A failure the peer is told about with channel.close (`connection=False`) or connection.close."""

    def __init__(self, code: int, text: str, *, connection: bool = False, method=None) -> None:
        self.code = code
        self.connection = connection
        self.text = f"{NAMES.get(code, 'ERROR')} - {text}"[:255]  # a shortstr
        self.class_id, self.method_id = _ids(method)
        super().__init__(self.text)

    def blame(self, method) -> AmqpError:
        """Name `method` as the one that failed (if none was named yet); returns self."""
        if not self.class_id and method is not None:
            self.class_id, self.method_id = _ids(method)
        return self


def connection_error(code: int, text: str, method=None) -> AmqpError:
    return AmqpError(code, text, connection=True, method=method)


def _ids(method) -> tuple[int, int]:
    if method is None:
        return 0, 0
    index = method.index
    return index >> 16, index & 0xFFFF


# Chute errors met while carrying out a method -> the channel exception RabbitMQ sends in that situation.
_CODES: dict[type[ce.ChuteError], int] = {
    ce.QueueNotFound: NOT_FOUND,
    ce.TopicNotFound: NOT_FOUND,
    ce.SubscriptionNotFound: NOT_FOUND,
    ce.ConsumerNotFound: NOT_FOUND,
    ce.QueueExists: PRECONDITION_FAILED,
    ce.TopicExists: PRECONDITION_FAILED,
    ce.QueueInUse: PRECONDITION_FAILED,
    ce.InvalidName: PRECONDITION_FAILED,
    ce.InvalidArgument: PRECONDITION_FAILED,
    ce.InvalidReceipt: PRECONDITION_FAILED,
    ce.MessageTooLarge: PRECONDITION_FAILED,
    ce.Forbidden: ACCESS_REFUSED,
    ce.QueueFull: PRECONDITION_FAILED,
    ce.BrokerClosed: INTERNAL_ERROR,
    ce.StorageFailed: INTERNAL_ERROR,
    ce.StorageFull: RESOURCE_ERROR,
    ce.StorageReadOnly: INTERNAL_ERROR,
}


def from_chute(exc: ce.ChuteError, method=None) -> AmqpError:
    """The channel exception for a Chute error raised while carrying out `method`."""
    code = _CODES.get(type(exc), INTERNAL_ERROR)
    return AmqpError(code, exc.message, connection=code == INTERNAL_ERROR, method=method)


def locked(queue: str) -> AmqpError:
    """405: another connection owns exclusive queue `queue` (RabbitMQ's words)."""
    return AmqpError(RESOURCE_LOCKED, f"cannot obtain exclusive access to locked queue '{queue}' in vhost '/'. It "
                     "could be originally declared on another connection or the exclusive property value does not "
                     "match that of the original declaration.")  # fmt: skip
