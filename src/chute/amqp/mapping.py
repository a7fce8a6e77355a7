"""AMQP messages ↔ Chute messages, and queue arguments ↔ queue settings.

A Chute message has a body, string headers, a priority (0-9) and a TTL. An AMQP message's properties and header
table are kept in its Chute headers, in a reversible way that other fronts can read:

- each property that is set becomes the header `amqp-<property>` (`amqp-content-type`, `amqp-correlation-id`,
  `amqp-reply-to`, `amqp-message-id`, `amqp-type`, `amqp-app-id`, `amqp-user-id`, `amqp-cluster-id`,
  `amqp-content-encoding`, `amqp-expiration`; `amqp-delivery-mode`, `amqp-priority` and `amqp-timestamp` as
  decimal integers);
- each entry of the header table whose value is a string (and whose name does not start with `amqp-`) becomes a
  header of the same name, so `{"region": "eu"}` is the Chute header `region: eu` for a native consumer;
- every other entry (numbers, booleans, decimals, timestamps, byte arrays, nested tables and arrays, void, and
  names starting with `amqp-`) goes into one header, `amqp-table`: the base64 of the AMQP field table holding
  them, exactly as the wire carries it, so every field type comes back unchanged.

A Chute message published by another front arrives at an AMQP consumer with its headers as a table of strings;
the message id becomes `message-id` unless the message had one, `publish_time` the `timestamp`, and a
dead-lettered message gets an `x-death` header as RabbitMQ writes it (xdeath.py): the broker's last
dead-lettering of it added to the entries its table already holds (those a rejection wrote, dead_letter.py).
A header value its property cannot carry (too long, out of range, refused by pamqp) stays in the table under its
header's name, so every delivery can be encoded: the content header is encoded by hand (`content_header`), the
same bytes as pamqp's.

Priority: AMQP's 0-255 is clamped to Chute's 0-9 (`amqp-priority` keeps the original). Expiration: the
`expiration` property (milliseconds, a string) is the message's TTL.
"""

from __future__ import annotations

import base64
import datetime
import struct
from decimal import Decimal

from pamqp import commands, decode, encode

from chute.amqp.errors import PRECONDITION_FAILED, AmqpError
from chute.amqp.exchanges import amqp_queue, routing_key
from chute.amqp.xdeath import add_death, as_sent
from chute.model import MAX_DELAY_S, MAX_PRIORITY, Delivery, Publish, QueueSettings

Properties = commands.Basic.Properties
PREFIX = "amqp-"
TABLE_HEADER = "amqp-table"
EXCHANGE_HEADER = "amqp-exchange"  # the exchange a message was published to (its routing key is the subject)
ROUTING_KEY_HEADER = "amqp-routing-key"  # a headers-exchange publish's routing key (its subject is fixed)
_STRING_PROPERTIES = ("content_type", "content_encoding", "correlation_id", "reply_to", "expiration", "message_id",
                      "message_type", "user_id", "app_id", "cluster_id")  # fmt: skip
_NUMBER_PROPERTIES = ("delivery_mode", "priority")
_HEADER_OF = {name: PREFIX + ("type" if name == "message_type" else name).replace("_", "-")
              for name in (*_STRING_PROPERTIES, *_NUMBER_PROPERTIES, "timestamp")}  # fmt: skip
_PROPERTY_OF = {header: name for name, header in _HEADER_OF.items()}
MESSAGE_ID_HEADER, TIMESTAMP_HEADER = _HEADER_OF["message_id"], _HEADER_OF["timestamp"]
REASONS = {"rejected": "rejected", "expired": "expired", "overflow": "maxlen", "max_deliveries": "delivery_limit"}


def to_publish(properties, body: bytes, routing_subject: str | None = None, *, options: bool = True) -> Publish:
    """The Chute publish of an AMQP message (406 if its expiration is not a number of milliseconds). `options`:
    read Chute's options from the header table (x-delay, x-deduplication-header, x-group-id; 406 for a bad one);
    False for a dead letter's republish, which does not carry them over (another front may have set any string
    under those names)."""
    headers: dict[str, str] = {}
    ttl_s = None
    priority = 0
    if properties is not None:
        for name in _STRING_PROPERTIES:
            value = getattr(properties, name, None)
            if value:
                headers[_HEADER_OF[name]] = value
        for name in _NUMBER_PROPERTIES:
            value = getattr(properties, name, None)
            if value is not None:
                headers[_HEADER_OF[name]] = str(value)
        if properties.priority:
            priority = min(int(properties.priority), MAX_PRIORITY)
        stamp = properties.timestamp
        if stamp is not None:
            headers[_HEADER_OF["timestamp"]] = str(int(stamp.replace(tzinfo=datetime.UTC).timestamp())
                                                   if isinstance(stamp, datetime.datetime) else int(stamp))  # fmt: skip
        if properties.expiration:
            ttl_s = _expiration_s(properties.expiration)
        if properties.headers:
            _pack_table(properties.headers, headers)
            chute_options = _chute_options(properties.headers) if options else None
            if chute_options:
                return Publish(body=body, headers=headers or None, priority=priority, ttl_s=ttl_s,
                               subject=routing_subject, **chute_options)  # fmt: skip
    return Publish(body=body, headers=headers or None, priority=priority, ttl_s=ttl_s, subject=routing_subject)


# Chute's per-message features through AMQP headers (each stays in the header table as well).
DELAY_HEADER = "x-delay"  # milliseconds, as RabbitMQ's delayed-message plugin names it
DEDUP_HEADER = "x-deduplication-header"  # as RabbitMQ's message-deduplication plugin names it
GROUP_HEADER = "x-group-id"  # a FIFO group key (queues declared with x-chute-fifo)


def _chute_options(table: dict) -> dict:
    options = {}
    delay = table.get(DELAY_HEADER)
    if delay is not None:
        if isinstance(delay, bool) or not isinstance(delay, int | Decimal) or not 0 <= delay <= MAX_DELAY_S * 1000:
            raise AmqpError(PRECONDITION_FAILED, f"{DELAY_HEADER} must be 0 to {int(MAX_DELAY_S * 1000)} ms")
        options["delay_s"] = int(delay) / 1000.0
    for header, key in ((DEDUP_HEADER, "dedup_id"), (GROUP_HEADER, "group")):
        value = table.get(header)
        if value is not None:
            if not isinstance(value, str) or not 1 <= len(value) <= 128:
                raise AmqpError(PRECONDITION_FAILED, f"{header} must be a string of 1 to 128 characters")
            options[key] = value
    return options


def _expiration_s(text: str) -> float:
    if not _is_milliseconds(text):
        raise AmqpError(PRECONDITION_FAILED, f"invalid expiration {text!r}: a number of milliseconds")
    return max(int(text), 1) / 1000.0


def _pack_table(table: dict, headers: dict[str, str]) -> None:
    rest = {}
    for name, value in table.items():
        if isinstance(value, str) and name and not name.startswith(PREFIX):
            headers[name] = value
        else:
            rest[name] = value
    if rest:
        try:
            packed = encode.field_table(_byte_arrays(rest))[4:]
        except (TypeError, ValueError) as exc:
            raise AmqpError(PRECONDITION_FAILED, f"cannot store the header table: {exc}") from None
        headers[TABLE_HEADER] = base64.b64encode(packed).decode()


def _byte_arrays(value):
    """A long string that is not UTF-8 arrives as bytes, which pamqp encodes only as a byte array: keep it so."""
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, dict):
        return {k: _byte_arrays(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_byte_arrays(v) for v in value]
    return value


def _unpack_table(text: str) -> dict:
    try:
        raw = base64.b64decode(text)
        return decode.field_table(len(raw).to_bytes(4, "big") + raw)[1]
    except Exception:  # not ours: keep it as a string
        return {TABLE_HEADER: text}


def to_properties(delivery: Delivery, *, queue: str | None = None) -> Properties:
    """The AMQP properties of a stored message (see the module docstring)."""
    values, table = _property_values(delivery)
    if values.get("timestamp") is not None:
        values["timestamp"] = _stamp(values["timestamp"])
    return Properties(headers=table or None, **values)


def content_header(delivery: Delivery) -> bytes:
    """The payload of the content-header frame of a delivery: what `to_properties` gives, encoded by hand (every
    delivery has one, and pamqp's generic marshalling plus the datetime of its timestamp cost several
    microseconds); the same bytes as pamqp's (tested)."""
    values, table = _property_values(delivery)
    encoded = encode_content_header(len(delivery.message.body), values, table or None)
    if encoded is None:  # a table entry AMQP cannot encode: the entries that do, and the properties
        table = {name: value for name, value in table.items() if _encodes({name: value})}
        encoded = encode_content_header(len(delivery.message.body), values, table or None)
    return encoded


def _encodes(table: dict) -> bool:
    try:
        encode.field_table(table)
    except (ValueError, TypeError, struct.error):
        return False
    return True


def _property_values(delivery: Delivery) -> tuple[dict, dict]:
    """(properties but the header table, header table) of a delivery; the timestamp in whole seconds."""
    message = delivery.message
    values: dict = {}
    table: dict = {}
    for name, value in message.headers.items():
        prop = _PROPERTY_OF.get(name)
        if prop is not None:
            values[prop] = value
        elif name == TABLE_HEADER:
            table.update(_unpack_table(value))
        elif name in (EXCHANGE_HEADER, ROUTING_KEY_HEADER):
            continue
        else:
            table[name] = value
    for name in (*_NUMBER_PROPERTIES, "timestamp"):
        number = _int(values.get(name))
        if number is not None:
            values[name] = number
        elif values.get(name) == "":
            values[name] = None  # (other text, which no number property fits, goes to the table below)
    for name in [name for name, value in values.items() if value is not None and not _FITS[name](value)]:
        # a value from another front that the property cannot carry stays visible in the table, under its header
        table[_HEADER_OF[name]] = message.headers.get(_HEADER_OF[name], str(values.pop(name)))
    if "timestamp" not in values:
        values["timestamp"] = int(message.publish_time)
    if "message_id" not in values:
        values["message_id"] = str(message.id)
    if "priority" not in values and message.priority:
        values["priority"] = message.priority
    for name in [name for name in table if len(name.encode()) > 255]:
        del table[name]  # (a field table's names are short strings: AMQP cannot carry this header at all)
    if delivery.dead_letter_reason is not None:  # the broker's last dead-lettering (earlier ones: in the table)
        exchange, key = origin(delivery, dead_letter_source=True)
        add_death(table, queue=amqp_queue(delivery.dead_letter_source or ""),
                  reason=REASONS.get(delivery.dead_letter_reason, delivery.dead_letter_reason), exchange=exchange,
                  routing_keys=[key], time=_stamp(int(message.publish_time)))  # fmt: skip
    as_sent(table)
    return values, table


def _short(value) -> bool:
    return type(value) is str and len(value.encode()) <= 255


def _is_milliseconds(text: str) -> bool:
    """An expiration as RabbitMQ takes it: ASCII digits only (str.isdigit alone takes '²', which int() refuses)."""
    return text.isascii() and text.isdigit()


MAX_TIMESTAMP = 253_402_300_799  # 9999-12-31T23:59:59Z: the last second a datetime (pamqp's timestamp) can hold
# what each property can carry (AMQP's domains, and what pamqp checks: a delivery mode is 1 or 2, a cluster id
# is empty; an expiration is a number of milliseconds, as RabbitMQ accepts it and clients such as aio-pika parse
# it); anything else stays in the header table
_FITS = {**{name: _short for name in _STRING_PROPERTIES}, "cluster_id": lambda value: value == "",
         "expiration": lambda value: _short(value) and _is_milliseconds(value),
         "delivery_mode": lambda value: value in (1, 2),
         "priority": lambda value: type(value) is int and 0 <= value <= 255,
         "timestamp": lambda value: type(value) is int and 0 <= value <= MAX_TIMESTAMP}  # fmt: skip


# basic's property flags, first property first (AMQP 0-9-1, 4.2.6.1: bit 15 down to bit 2), and how each encodes
_PROPERTY_ORDER = (("content_type", "s"), ("content_encoding", "s"), ("headers", "t"), ("delivery_mode", "o"),
                   ("priority", "o"), ("correlation_id", "s"), ("reply_to", "s"), ("expiration", "s"),
                   ("message_id", "s"), ("timestamp", "T"), ("message_type", "s"), ("user_id", "s"),
                   ("app_id", "s"), ("cluster_id", "s"))  # fmt: skip
_CONTENT_HEADER_START = (60).to_bytes(2, "big") + bytes(2)  # class basic, weight 0


def encode_content_header(body_size: int, values: dict, table: dict | None) -> bytes | None:
    """class 60 | weight 0 | body size u64 | property flags u16 | the properties that are set, in flag order
    (shortstr, octet, u64 seconds, field table), from `_property_values` (every value fits its property); None if
    the table will not encode."""
    flags = 0
    parts = [_CONTENT_HEADER_START, body_size.to_bytes(8, "big"), b""]
    bit = 1 << 15
    for name, kind in _PROPERTY_ORDER:
        value = table if kind == "t" else values.get(name)
        if value is not None and value != "":
            if kind == "s":
                raw = value.encode()
                parts += (len(raw).to_bytes(1, "big"), raw)
            elif kind == "o":
                parts.append(value.to_bytes(1, "big"))
            elif kind == "T":
                parts.append(value.to_bytes(8, "big"))
            else:
                try:
                    parts.append(encode.field_table(value))
                except (ValueError, TypeError, struct.error):
                    return None
            flags |= bit
        bit >>= 1
    parts[2] = flags.to_bytes(2, "big")
    return b"".join(parts)


def origin(delivery: Delivery, *, dead_letter_source: bool = False) -> tuple[str, str]:
    """The exchange and routing key a message was published with (for a message from another front: "" and the
    queue's name, or with `dead_letter_source` the queue it was dead-lettered from)."""
    message = delivery.message
    exchange = message.headers.get(EXCHANGE_HEADER, "")
    key = message.headers.get(ROUTING_KEY_HEADER)
    if key is not None:
        return exchange, key
    if message.subject is not None:
        return exchange, routing_key(message.subject)
    queue = delivery.dead_letter_source if dead_letter_source and delivery.dead_letter_source else delivery.queue
    return exchange, amqp_queue(queue)


def on_the_wire(exchange: str, key: str) -> tuple[str, str]:
    """The exchange and routing key of a basic.deliver or basic.get-ok: short strings, so a name of over 255 bytes
    (only another front can make one: a long subject, or such an `amqp-exchange` header) is sent empty."""
    if len(exchange) > 63 or len(key) > 63:  # (a character is at most 4 bytes: shorter ones always fit)
        exchange = exchange if len(exchange.encode()) <= 255 else ""
        key = key if len(key.encode()) <= 255 else ""
    return exchange, key


def dead_lettered_as(arguments: dict | None, exchange: str, key: str) -> tuple[str, str]:
    """The exchange and routing key of a message dead-lettered from a queue declared with `arguments`, as RabbitMQ
    republishes it: the queue's `x-dead-letter-exchange`, with its `x-dead-letter-routing-key` if it has one, else
    the message's own key. (`exchange`, `key`: the message's in that queue.)"""
    if not arguments or "x-dead-letter-exchange" not in arguments:
        return exchange, key
    dead_key = arguments.get("x-dead-letter-routing-key")
    return str(arguments["x-dead-letter-exchange"]), str(dead_key) if dead_key is not None else key


def _stamp(seconds: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).replace(tzinfo=None)


def _int(text) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


# -- queue arguments ----------------------------------------------------------------------------------------------

QUEUE_TYPES = ("classic", "quorum")
OVERFLOWS = {"drop-head": "drop-oldest", "reject-publish": "reject", "reject-publish-dlx": "reject-dead-letter"}
ACCEPTED_ARGUMENTS = {"x-message-ttl", "x-dead-letter-exchange", "x-dead-letter-routing-key", "x-max-length",
                      "x-max-length-bytes", "x-overflow", "x-max-priority", "x-queue-type", "x-delivery-limit",
                      "x-queue-mode", "x-queue-master-locator", "x-queue-version", "x-expires",
                      "x-single-active-consumer", "x-chute-fifo", "x-chute-rate-limit", "x-chute-delay",
                      "x-chute-dedup-window"}  # fmt: skip


def queue_settings(arguments: dict | None, dead_letter_queue: str | None) -> QueueSettings:
    """The Chute settings of `queue.declare`'s arguments (406 for a value RabbitMQ would refuse). The dead-letter
    exchange has been resolved to a queue by the caller (`dead_letter_queue`)."""
    args = arguments or {}
    values: dict = {}
    for name in args:
        if name.startswith("x-") and name not in ACCEPTED_ARGUMENTS:
            raise AmqpError(PRECONDITION_FAILED, f"queue argument {name!r} is not supported by Chute")
    ttl = args.get("x-message-ttl")
    if ttl is not None:
        values["retention_s"] = max(_non_negative("x-message-ttl", ttl), 1) / 1000.0
    for name, key in (("x-max-length", "max_length"), ("x-max-length-bytes", "max_bytes"),
                      ("x-delivery-limit", "max_deliveries")):  # fmt: skip
        if name in args:
            values[key] = max(_non_negative(name, args[name]), 1) if key != "max_deliveries" else \
                _non_negative(name, args[name]) + 1  # fmt: skip
    overflow = args.get("x-overflow")
    if overflow is not None:
        if overflow not in OVERFLOWS:
            raise AmqpError(PRECONDITION_FAILED, f"invalid arg 'x-overflow' for queue: {overflow!r}")
        values["overflow"] = OVERFLOWS[overflow]
    elif "max_length" in values or "max_bytes" in values:
        values["overflow"] = "drop-oldest"  # RabbitMQ's default: drop-head
    priority = args.get("x-max-priority")
    if priority is not None:
        _non_negative("x-max-priority", priority)
        if priority > 255:
            raise AmqpError(PRECONDITION_FAILED, "invalid arg 'x-max-priority' for queue: above 255")
    queue_type = args.get("x-queue-type")
    if queue_type is not None and queue_type not in QUEUE_TYPES:
        raise AmqpError(PRECONDITION_FAILED, f"invalid arg 'x-queue-type' for queue: {queue_type!r} (classic or "
                        "quorum)")  # fmt: skip
    if not isinstance(args.get("x-single-active-consumer", False), bool):
        raise AmqpError(PRECONDITION_FAILED, "invalid arg 'x-single-active-consumer' for queue: a boolean")
    expires = args.get("x-expires")
    if expires is not None and _non_negative("x-expires", expires) < 1:
        raise AmqpError(PRECONDITION_FAILED, "invalid arg 'x-expires' for queue: must be at least 1 (ms)")
    _chute_settings(args, values)
    if dead_letter_queue is not None:
        values["dead_letter_queue"] = dead_letter_queue
    return QueueSettings(lease_s=QueueSettings().lease_s, **values)


def _chute_settings(args: dict, values: dict) -> None:
    """Chute's own queue features: x-chute-fifo (FIFO groups), x-chute-rate-limit (deliveries per second),
    x-chute-delay and x-chute-dedup-window (milliseconds). Ranges are checked with the settings (406)."""
    fifo = args.get("x-chute-fifo")
    if fifo is not None:
        if not isinstance(fifo, bool):
            raise AmqpError(PRECONDITION_FAILED, "invalid arg 'x-chute-fifo' for queue: a boolean")
        values["fifo"] = fifo
    rate = args.get("x-chute-rate-limit")
    if rate is not None:
        if isinstance(rate, bool) or not isinstance(rate, int | float | Decimal):
            raise AmqpError(PRECONDITION_FAILED, "invalid arg 'x-chute-rate-limit' for queue: a number")
        values["rate_limit"] = float(rate)
    for name, key in (("x-chute-delay", "delay_s"), ("x-chute-dedup-window", "dedup_window_s")):
        if name in args:
            values[key] = _non_negative(name, args[name]) / 1000.0


def _non_negative(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | Decimal) or value < 0:
        raise AmqpError(PRECONDITION_FAILED, f"invalid arg {name!r} for queue: {value!r} (a non-negative integer)")
    return int(value)
