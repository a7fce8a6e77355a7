"""Frame layout and opcodes of the native protocol (docs/protocol.md is the specification).

A frame is a 10-byte header followed by a MessagePack payload:

    length u32 | opcode u8 | flags u8 | correlation id u32 | payload (length - 6 bytes)

All integers are big-endian; `length` counts the bytes after itself. A request carries a correlation id chosen
by the client (non-zero); its one reply (REPLY or ERROR) carries the same id. Frames sent unprompted (HEARTBEAT,
DELIVER, GOAWAY, a connection-level ERROR) carry id 0.

Invariant: an opcode's number and payload type never change within a protocol version; a new version may add
opcodes, and the handshake picks the highest version both ends speak.
"""

from __future__ import annotations

import enum
import struct

PROTOCOL_VERSIONS = (1, 2)  # 2: a PUBLISH may carry messages for several destinations
DEFAULT_PORT = 6160  # the native protocol's port; the HTTP listener defaults to the next one
DEFAULT_HTTP_PORT = 6161

HEADER = struct.Struct(">IBBI")
HEADER_SIZE = HEADER.size  # 10
LENGTH_OVERHEAD = HEADER_SIZE - 4  # bytes counted by `length` besides the payload

DEFAULT_MAX_FRAME_BYTES = 16 * 2**20
HANDSHAKE_MAX_FRAME_BYTES = 64 * 1024  # the first frame of a connection, before limits are negotiated
MAX_CORRELATION_ID = 2**32 - 1


class Op(enum.IntEnum):
    """Opcodes. 0x0_: connection; 0x1_: publish; 0x2_: consume; 0x3_: settle; 0x4_: management."""

    HELLO = 0x01  # client → server, first frame: versions, token
    WELCOME = 0x02  # server → client: chosen version and limits
    HEARTBEAT = 0x03  # either way, no payload
    GOAWAY = 0x04  # server → client: the server is shutting down; finish and reconnect elsewhere/later
    ERROR = 0x05  # reply to a request (its id) or a connection error (id 0, then the connection closes)
    REPLY = 0x06  # the successful reply to a request
    PUBLISH = 0x10  # → REPLY {ids} once durable (the confirm)
    CONSUME = 0x20  # → REPLY {consumer}; then DELIVER frames
    DELIVER = 0x21  # server → client: deliveries for a consumer
    CANCEL = 0x22  # → REPLY {}; the consumer stops; its unacked deliveries stay ackable
    RECEIVE = 0x23  # → REPLY {deliveries} (long poll)
    ACK = 0x30  # → REPLY {} once durable
    NACK = 0x31  # → REPLY {} once durable
    EXTEND = 0x32  # → REPLY {}
    CALL = 0x40  # management: {method, args} → REPLY {result}


CLIENT_OPS = frozenset({Op.HELLO, Op.HEARTBEAT, Op.PUBLISH, Op.CONSUME, Op.CANCEL, Op.RECEIVE, Op.ACK, Op.NACK,
                        Op.EXTEND, Op.CALL})  # fmt: skip
SERVER_OPS = frozenset({Op.WELCOME, Op.HEARTBEAT, Op.GOAWAY, Op.ERROR, Op.REPLY, Op.DELIVER})
REQUESTS = CLIENT_OPS - {Op.HELLO, Op.HEARTBEAT}  # each gets exactly one REPLY or ERROR


def pack_header(opcode: int, correlation_id: int, payload_size: int, flags: int = 0) -> bytes:
    return HEADER.pack(payload_size + LENGTH_OVERHEAD, opcode, flags, correlation_id)
