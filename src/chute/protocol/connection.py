"""`Connection`: the native protocol's state machine for one end of one connection, sans-I/O.

    conn = Connection("client")
    sock.send(conn.hello(token="..."))
    for frame in conn.receive_data(sock.recv(65536)): ...
    sock.send(conn.send(Op.PUBLISH, PublishRequest(...), correlation_id=7))

`receive_data` accepts any split of the byte stream (whole frames, many frames, or one byte at a time) and
returns the complete frames it now holds, with typed payloads. It raises ProtocolError, FrameTooLarge or
UnsupportedVersion when the peer breaks the protocol; the caller then sends `error_frame(exc)` and closes.

Invariants: the first frame a server accepts is HELLO and the first a client accepts is WELCOME or ERROR; a
frame never exceeds `max_frame_bytes` (64 KiB before the handshake); an opcode is accepted only in its
direction. REPLY payloads stay raw bytes here: only the requester knows their type (`decode_reply`).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from chute.errors import ChuteError, FrameTooLarge, ProtocolError, UnsupportedVersion
from chute.protocol import messages as m
from chute.protocol.frames import (
    CLIENT_OPS,
    DEFAULT_MAX_FRAME_BYTES,
    HANDSHAKE_MAX_FRAME_BYTES,
    HEADER,
    HEADER_SIZE,
    LENGTH_OVERHEAD,
    MAX_CORRELATION_ID,
    PROTOCOL_VERSIONS,
    REQUESTS,
    SERVER_OPS,
    Op,
)

Role = Literal["client", "server"]

PAYLOAD_TYPES: dict[Op, type | None] = {
    Op.HELLO: m.Hello,
    Op.WELCOME: m.Welcome,
    Op.HEARTBEAT: None,
    Op.GOAWAY: m.Goaway,
    Op.ERROR: m.ErrorBody,
    Op.REPLY: None,  # raw: decoded by the requester, who knows the type
    Op.PUBLISH: m.PublishRequest,
    Op.CONSUME: m.ConsumeRequest,
    Op.DELIVER: m.Deliver,
    Op.CANCEL: m.CancelRequest,
    Op.RECEIVE: m.ReceiveRequest,
    Op.ACK: m.AckRequest,
    Op.NACK: m.NackRequest,
    Op.EXTEND: m.ExtendRequest,
    Op.CALL: m.CallRequest,
}
_DECODERS = {op: msgspec.msgpack.Decoder(t) for op, t in PAYLOAD_TYPES.items() if t is not None}
_REPLY_DECODERS: dict[type, msgspec.msgpack.Decoder] = {}
_ENCODER = msgspec.msgpack.Encoder()
_OPS: dict[int, Op] = {int(op): op for op in Op}
_HANDSHAKE_OPS = frozenset({Op.HELLO, Op.WELCOME})

HEARTBEAT_BYTES = HEADER.pack(LENGTH_OVERHEAD, Op.HEARTBEAT, 0, 0)  # the whole HEARTBEAT frame (10 bytes)


class Frame(msgspec.Struct, frozen=True, gc=False):
    """One received frame: its opcode, correlation id and payload (a messages.* Struct, raw bytes for REPLY,
    None for HEARTBEAT). (A msgspec Struct: made in C, one per frame received.)"""

    op: Op
    correlation_id: int
    body: Any

    def __repr__(self) -> str:
        return f"Frame({self.op.name}, {self.correlation_id}, {self.body!r})"


class Connection:
    """One end of a native-protocol connection. Holds the receive buffer and the handshake state."""

    def __init__(self, role: Role, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if role not in ("client", "server"):
            raise ValueError(f"role must be 'client' or 'server', not {role!r}")
        self.role = role
        self.max_frame_bytes = max_frame_bytes
        self.state: Literal["handshake", "open", "closed"] = "handshake"
        self.version: int | None = None
        self.welcome: m.Welcome | None = None
        self._accepts = CLIENT_OPS if role == "server" else SERVER_OPS
        self._buffer = bytearray()

    # -- receiving --------------------------------------------------------------------------------------------

    def heartbeat_only(self, data: bytes) -> bool:
        """True if `data` is exactly one HEARTBEAT frame (id 0, no flags) that `receive_data` would accept now
        with nothing else to return or change: then the caller may skip `receive_data` (an idle peer's sign of
        life costs a comparison). False: feed `data` to `receive_data` as usual."""
        return data == HEARTBEAT_BYTES and self.state == "open" and not self._buffer

    def receive_data(self, data: bytes) -> list[Frame]:
        """Feed bytes from the peer; return the frames completed by them (possibly none)."""
        if self.state == "closed":
            raise ProtocolError("connection is closed")
        buffer = self._buffer
        buffer += data
        frames: list[Frame] = []
        start = 0
        end = len(buffer)
        try:
            while end - start >= HEADER_SIZE:
                length, opcode, _flags, correlation_id = HEADER.unpack_from(buffer, start)
                limit = self.max_frame_bytes if self.state == "open" else HANDSHAKE_MAX_FRAME_BYTES
                if length < LENGTH_OVERHEAD:
                    raise ProtocolError(f"frame length {length} is shorter than its header")
                if length + 4 > limit:
                    if self.state == "handshake":  # e.g. an HTTP or TLS client on the native port
                        raise FrameTooLarge(
                            f"first frame of {length + 4} bytes exceeds the {limit} bytes allowed before the "
                            "handshake: is the peer speaking the Chute protocol?"
                        )
                    raise FrameTooLarge(f"frame of {length + 4} bytes exceeds the limit of {limit} bytes")
                if end - start < length + 4:
                    break
                payload = memoryview(buffer)[start + HEADER_SIZE : start + 4 + length]
                try:
                    frames.append(self._frame(opcode, correlation_id, payload))
                finally:
                    payload.release()
                start += length + 4
        except ChuteError:
            self.state = "closed"
            raise
        finally:
            if start:
                del buffer[:start]
        return frames

    def _frame(self, opcode: int, correlation_id: int, payload: memoryview) -> Frame:
        op = _OPS.get(opcode)  # (a dict, not Op(opcode): the enum's constructor is two Python calls per frame)
        if op is None:
            raise ProtocolError(f"unknown opcode 0x{opcode:02x}")
        if op not in self._accepts:
            raise ProtocolError(f"a {self.role} does not accept {op.name} frames")
        if self.state == "open":  # (the common case first, with set lookups only: reading `Op.X` on CPython
            if op in _HANDSHAKE_OPS:  # 3.11 costs ~100 ns each, as the enum's metaclass hooks attribute reads)
                raise ProtocolError(f"{op.name} after the handshake")
            if correlation_id == 0 and op in REQUESTS:
                raise ProtocolError(f"{op.name} needs a non-zero correlation id")
            return Frame(op, correlation_id, self._decode(op, payload))
        if self.state == "handshake":
            expected = (Op.HELLO,) if self.role == "server" else (Op.WELCOME, Op.ERROR)
            if op not in expected:
                raise ProtocolError(f"expected {' or '.join(o.name for o in expected)} first, got {op.name}")
        elif op in _HANDSHAKE_OPS:
            raise ProtocolError(f"{op.name} after the handshake")
        if op in REQUESTS and correlation_id == 0:
            raise ProtocolError(f"{op.name} needs a non-zero correlation id")
        body = self._decode(op, payload)
        if op is Op.HELLO:
            self.state = "open"  # the server answers with welcome() or an error that closes the connection
        elif op is Op.WELCOME:
            self._accept_welcome(body)
        return Frame(op, correlation_id, body)

    @staticmethod
    def _decode(op: Op, payload: memoryview):
        decoder = _DECODERS.get(op)
        if decoder is None:
            if op is Op.HEARTBEAT:
                return None
            return bytes(payload)
        try:
            return decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            # msgspec lets a str that is not UTF-8 escape as UnicodeDecodeError: the peer's fault all the same
            raise ProtocolError(f"bad {op.name} payload: {exc}") from None

    def _accept_welcome(self, welcome: m.Welcome) -> None:
        if welcome.version not in PROTOCOL_VERSIONS:
            raise UnsupportedVersion(f"server chose protocol version {welcome.version}, we speak {PROTOCOL_VERSIONS}")
        self.version = welcome.version
        self.welcome = welcome
        self.max_frame_bytes = welcome.max_frame_bytes
        self.state = "open"

    # -- sending ----------------------------------------------------------------------------------------------

    def send(self, op: Op, payload: msgspec.Struct | None = None, correlation_id: int = 0) -> bytes:
        """The bytes of one frame. Raises FrameTooLarge (and sends nothing) if it would exceed the limit."""
        if not 0 <= correlation_id <= MAX_CORRELATION_ID:
            raise ValueError(f"correlation id {correlation_id} out of range")
        # (the payload encoded on its own and joined to its header: for the small frames of a busy broker, one
        # per delivery or reply, a third cheaper than encoding into a buffer behind a header and copying that out)
        body = _ENCODER.encode(payload) if payload is not None else b""
        size = HEADER_SIZE + len(body)
        if size > self.max_frame_bytes:
            raise FrameTooLarge(f"frame of {size} bytes exceeds the limit of {self.max_frame_bytes} bytes")
        return HEADER.pack(size - 4, op, 0, correlation_id) + body

    def hello(self, *, token: str | None = None, client: str = "", heartbeat_s: float = 10.0,
              user: str | None = None, password: str | None = None) -> bytes:  # fmt: skip
        """Client: the first frame (credentials: a token, or a user and password)."""
        return self.send(Op.HELLO, m.Hello(versions=list(PROTOCOL_VERSIONS), token=token, client=client,
                                           heartbeat_s=heartbeat_s, user=user, password=password))  # fmt: skip

    def accept(self, hello: m.Hello, *, server: str, heartbeat_s: float, max_message_bytes: int,
               fsync: str | None = None) -> bytes:  # fmt: skip
        """Server: answer a HELLO with WELCOME, choosing the highest common version (UnsupportedVersion if
        there is none); `fsync` is the server's fsync policy, for clients to check what a confirm means."""
        common = set(hello.versions) & set(PROTOCOL_VERSIONS)
        if not common:
            self.state = "closed"
            raise UnsupportedVersion(f"client speaks versions {hello.versions}, server speaks {PROTOCOL_VERSIONS}")
        self.version = max(common)
        self.welcome = m.Welcome(version=self.version, server=server, heartbeat_s=heartbeat_s,
                                 max_frame_bytes=self.max_frame_bytes, max_message_bytes=max_message_bytes,
                                 fsync=fsync)  # fmt: skip
        return self.send(Op.WELCOME, self.welcome)

    def error_frame(self, exc: ChuteError, correlation_id: int = 0) -> bytes:
        """An ERROR frame for `exc` (a reply if `correlation_id`, else a connection error)."""
        return self.send(Op.ERROR, self.error_body(exc), correlation_id)

    @staticmethod
    def error_body(exc: ChuteError) -> m.ErrorBody:
        """`exc` as it travels: in an ERROR frame, or inside a reply (a failed group of a PUBLISH)."""
        return m.ErrorBody(code=exc.code, name=exc.name, message=exc.message, retryable=exc.retryable,
                           receipts=getattr(exc, "receipts", None))  # fmt: skip


def decode_reply(payload: bytes, kind: type):
    """Decode a REPLY payload as `kind` (the type the request expects); ProtocolError if it does not fit."""
    decoder = _REPLY_DECODERS.get(kind)
    if decoder is None:
        decoder = _REPLY_DECODERS[kind] = msgspec.msgpack.Decoder(kind)
    try:
        return decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"bad REPLY payload: {exc}") from None


def error_from(body: m.ErrorBody) -> ChuteError:
    """The ChuteError an ERROR frame stands for (a plain ChuteError with its code if the code is unknown)."""
    from chute.errors import BY_CODE

    cls = BY_CODE.get(body.code)
    if cls is None:
        exc = ChuteError(body.message)
        exc.code, exc.name, exc.retryable = body.code, body.name, body.retryable
    else:
        exc = cls(body.message)
    if body.receipts:
        exc.receipts = body.receipts
    return exc
