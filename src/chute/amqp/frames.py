"""AMQP 0-9-1 frames: the constants of the framing layer, and decoding of method and content-header payloads
(pamqp does the general case; the methods every message carries are decoded and encoded by hand).

    frame:  type u8 | channel u16 | size u32 | payload (size bytes) | 0xCE
    method payload:  class id u16 | method id u16 | arguments

Invariant: `decode_method` and `decode_header` return a pamqp object or raise AmqpError 501 FRAME_ERROR (a
connection exception), whatever the bytes; the hand-made codecs give exactly what pamqp gives (property-tested).
"""

from __future__ import annotations

import struct

from pamqp import commands, header

from chute.amqp.errors import FRAME_ERROR, connection_error

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_HEADER = struct.Struct(">BHI")
FRAME_METHOD, FRAME_HEADER_TYPE, FRAME_BODY, FRAME_HEARTBEAT = 1, 2, 3, 8
FRAME_END = 0xCE
FRAME_OVERHEAD = 8  # 7 bytes of header and the frame-end octet
HEARTBEAT_BYTES = b"\x08\x00\x00\x00\x00\x00\x00\xce"
FRAME_MIN_SIZE = 4096  # the spec's floor: every peer accepts frames this large
HANDSHAKE_FRAME_MAX = 131_072  # frames accepted before tune-ok (start-ok carries the client's properties)
DEFAULT_FRAME_MAX = 131_072  # offered in connection.tune (RabbitMQ's default)
DEFAULT_CHANNEL_MAX = 2047  # offered in connection.tune (RabbitMQ's default)
CONNECTION_CLASS = 10
CHANNEL_CLASS = 20


def decode_method(payload: bytes):
    if len(payload) < 4:
        raise connection_error(FRAME_ERROR, "method frame too short")
    index = int.from_bytes(payload[:4], "big")
    fast = _FAST.get(index)
    if fast is not None:  # the methods of every message: decoded by hand (pamqp's generic path is slow)
        try:
            return fast(payload)
        except (IndexError, UnicodeDecodeError):
            raise connection_error(FRAME_ERROR, f"cannot decode {commands.INDEX_MAPPING[index].name}") from None
    cls = commands.INDEX_MAPPING.get(index)
    if cls is None:
        raise connection_error(FRAME_ERROR, f"unknown method {index >> 16}.{index & 0xFFFF}")
    method = cls()
    try:
        method.unmarshal(payload[4:])
    except Exception as exc:  # pamqp raises struct.error, ValueError, IndexError, KeyError... on bad bytes
        raise connection_error(FRAME_ERROR, f"cannot decode {method.name}: {type(exc).__name__}") from None
    return method


def _publish(payload: bytes):
    """basic.publish: class 60 method 40 | ticket u16 | exchange shortstr | routing-key shortstr | bits."""
    size = payload[6]
    exchange = payload[7 : 7 + size].decode()
    at = 7 + size
    key_size = payload[at]
    key = payload[at + 1 : at + 1 + key_size].decode()
    if len(payload) < at + 2 + key_size:
        raise IndexError("truncated")
    bits = payload[at + 1 + key_size]
    method = commands.Basic.Publish.__new__(commands.Basic.Publish)
    method.ticket = int.from_bytes(payload[4:6], "big")
    method.exchange, method.routing_key = exchange, key
    method.mandatory, method.immediate = bool(bits & 1), bool(bits & 2)
    return method


def _ack(payload: bytes):
    """basic.ack: class 60 method 80 | delivery-tag u64 | bits (multiple)."""
    if len(payload) < 13:
        raise IndexError("truncated")
    method = commands.Basic.Ack.__new__(commands.Basic.Ack)
    method.delivery_tag = int.from_bytes(payload[4:12], "big")
    method.multiple = bool(payload[12] & 1)
    return method


_FAST = {commands.Basic.Publish.index: _publish, commands.Basic.Ack.index: _ack}


def decode_header(payload: bytes):
    content_header = header.ContentHeader()
    try:
        content_header.unmarshal(payload)
    except Exception as exc:  # as in _decode_method
        raise connection_error(FRAME_ERROR, f"cannot decode a content header: {type(exc).__name__}") from None
    if content_header.class_id != commands.Basic.frame_id:
        raise connection_error(FRAME_ERROR, f"content header of class {content_header.class_id}")
    return content_header


# Methods a client may send on a channel (True), beyond channel.open and basic.publish which are handled above.
CLIENT_METHODS = {
    commands.Channel.Close: True, commands.Channel.CloseOk: True, commands.Channel.Flow: True,
    commands.Channel.FlowOk: True,
    commands.Exchange.Declare: True, commands.Exchange.Delete: True, commands.Exchange.Bind: True,
    commands.Exchange.Unbind: True,
    commands.Queue.Declare: True, commands.Queue.Bind: True, commands.Queue.Unbind: True,
    commands.Queue.Purge: True, commands.Queue.Delete: True,
    commands.Basic.Qos: True, commands.Basic.Consume: True, commands.Basic.Cancel: True, commands.Basic.Get: True,
    commands.Basic.Ack: True, commands.Basic.Nack: True, commands.Basic.Reject: True,
    commands.Basic.Recover: True, commands.Basic.RecoverAsync: True,
    commands.Confirm.Select: True,
    commands.Tx.Select: True, commands.Tx.Commit: True, commands.Tx.Rollback: True,
}  # fmt: skip


_DELIVER_INDEX = commands.Basic.Deliver.index.to_bytes(4, "big")
_GET_OK_INDEX = commands.Basic.GetOk.index.to_bytes(4, "big")


def deliver_method(consumer_tag: str, tag: int, redelivered: bool, exchange: str, key: str) -> bytes:
    """The payload of a basic.deliver method frame, encoded by hand: it goes out with every message, and pamqp's
    generic marshalling costs several microseconds (`send_content` takes the bytes as they are).

        class 60, method 60 | consumer-tag shortstr | delivery-tag u64 | redelivered octet | exchange shortstr
        | routing-key shortstr
    """
    ctag, name, rkey = consumer_tag.encode(), exchange.encode(), key.encode()
    return b"".join((_DELIVER_INDEX, len(ctag).to_bytes(1, "big"), ctag, tag.to_bytes(8, "big"),
                     b"\x01" if redelivered else b"\x00", len(name).to_bytes(1, "big"), name,
                     len(rkey).to_bytes(1, "big"), rkey))  # fmt: skip


def get_ok_method(tag: int, redelivered: bool, exchange: str, key: str, message_count: int) -> bytes:
    """The payload of a basic.get-ok method frame, encoded by hand as basic.deliver's is, so that both carry the
    same exchange names: pamqp's GetOk refuses any name outside its own pattern (`[a-zA-Z0-9-_.:@#,/+ ]`, at most
    127 characters), which a message from another front (its `amqp-exchange` header) may hold, while AMQP allows
    any short string, as RabbitMQ does.

        class 60, method 71 | delivery-tag u64 | redelivered octet | exchange shortstr | routing-key shortstr
        | message-count u32
    """
    name, rkey = exchange.encode(), key.encode()
    return b"".join((_GET_OK_INDEX, tag.to_bytes(8, "big"), b"\x01" if redelivered else b"\x00",
                     len(name).to_bytes(1, "big"), name, len(rkey).to_bytes(1, "big"), rkey,
                     message_count.to_bytes(4, "big")))  # fmt: skip
