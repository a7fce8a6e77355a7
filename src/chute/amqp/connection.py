"""`AmqpConnection`: the server's side of one AMQP 0-9-1 connection, sans-I/O (bytes in, events out).

    conn = AmqpConnection()
    for event in conn.receive_data(data): ...     # Header, Method, Content, ChannelError
    transport.write(conn.send_method(channel, commands.Basic.QosOk()))

pamqp decodes and encodes the methods and content headers; this module owns the framing and every rule of the
protocol that does not need the broker:

    header ──(AMQP 0-9-1 protocol header)──► start-ok ──► tune-ok ──► open ──► opened ──► (closing) ──► closed

- frames: `type u8 | channel u16 | size u32 | payload | 0xCE`; a frame larger than the negotiated frame_max, a
  missing frame-end octet, an unknown frame type or a payload pamqp cannot decode is a connection exception 501
  FRAME_ERROR; a protocol header other than AMQP 0-9-1's gets the server's own header back and the connection
  closes (`BadProtocolHeader`), as the specification says.
- channel 0 carries only connection methods (504 CHANNEL_ERROR, as RabbitMQ), other channels only the other
  classes (503 COMMAND_INVALID); a channel above channel_max is 530 NOT_ALLOWED; a method on a channel that is
  not open, or channel.open on one that is, is 504 CHANNEL_ERROR.
- content: basic.publish is followed on its channel by one content header and body frames up to its body size;
  anything else on that channel meanwhile is 505 UNEXPECTED_FRAME, and so are content frames with no publish.
  The three are delivered as one `Content` event. A body above `max_message_bytes` is a channel exception (406),
  reported as a `ChannelError` event; its frames are then dropped.
- after the server closed a channel (`close_channel`) everything on it is dropped until channel.close-ok.

Invariant: any byte string fed to `receive_data` gives events or raises `AmqpError` (connection=True) — never
another exception (fuzz-tested); after it raised, the connection is `closed` and accepts nothing more.
"""

from __future__ import annotations

from typing import Literal

from pamqp import commands, frame, header

from chute.amqp.errors import (
    CHANNEL_ERROR,
    COMMAND_INVALID,
    FRAME_ERROR,
    NOT_ALLOWED,
    PRECONDITION_FAILED,
    UNEXPECTED_FRAME,
    AmqpError,
    connection_error,
)
from chute.amqp.frames import (
    CLIENT_METHODS,
    CONNECTION_CLASS,
    DEFAULT_CHANNEL_MAX,
    DEFAULT_FRAME_MAX,
    FRAME_BODY,
    FRAME_END,
    FRAME_HEADER,
    FRAME_HEADER_TYPE,
    FRAME_HEARTBEAT,
    FRAME_METHOD,
    FRAME_MIN_SIZE,
    FRAME_OVERHEAD,
    HANDSHAKE_FRAME_MAX,
    HEARTBEAT_BYTES,
    PROTOCOL_HEADER,
    decode_header,
    decode_method,
)

State = Literal["header", "start-ok", "tune-ok", "open", "opened", "closing", "closed"]


class BadProtocolHeader(AmqpError):
    """The peer did not start with AMQP 0-9-1's protocol header: send PROTOCOL_HEADER and close."""

    def __init__(self, text: str) -> None:
        super().__init__(FRAME_ERROR, text, connection=True)


class Header:
    """The protocol header arrived: the server sends connection.start."""

    __slots__ = ()


class Method:
    __slots__ = ("channel", "method")

    def __init__(self, channel: int, method) -> None:
        self.channel = channel
        self.method = method

    def __repr__(self) -> str:
        return f"Method({self.channel}, {self.method.name})"


class Content:
    """basic.publish with its properties and body."""

    __slots__ = ("channel", "method", "properties", "body")

    def __init__(self, channel: int, method, properties, body: bytes) -> None:
        self.channel = channel
        self.method = method
        self.properties = properties
        self.body = body


class ChannelError:
    """A channel exception found while framing (the channel is now closing: send `close_channel`'s bytes)."""

    __slots__ = ("channel", "error")

    def __init__(self, channel: int, error: AmqpError) -> None:
        self.channel = channel
        self.error = error


class _Pending:
    """A publish waiting for its content header and body."""

    __slots__ = ("method", "properties", "size", "parts", "received", "discard")

    def __init__(self, method) -> None:
        self.method = method
        self.properties = None
        self.size = -1  # unknown until the content header
        self.parts: list[bytes] = []
        self.received = 0
        self.discard = False


class AmqpConnection:
    """Framing and protocol rules of one server-side connection (see the module docstring)."""

    def __init__(self, *, max_message_bytes: int = 2**27, frame_max: int = DEFAULT_FRAME_MAX,
                 channel_max: int = DEFAULT_CHANNEL_MAX) -> None:  # fmt: skip
        self.state: State = "header"
        self.frame_max = HANDSHAKE_FRAME_MAX
        self.offered_frame_max = frame_max
        self.offered_channel_max = channel_max
        self.channel_max = channel_max
        self.heartbeat_s = 0
        self.max_message_bytes = max_message_bytes
        self.channels: dict[int, str] = {}  # channel -> "open" | "closing"
        self._pending: dict[int, _Pending] = {}
        self._buffer = bytearray()

    # -- receiving --------------------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list:
        if self.state == "closed":
            raise connection_error(COMMAND_INVALID, "connection is closed")
        buffer = self._buffer
        buffer += data
        events: list = []
        start = 0
        try:
            if self.state == "header":
                if len(buffer) < 8:
                    if not PROTOCOL_HEADER.startswith(bytes(buffer[:8])):
                        raise BadProtocolHeader("not an AMQP 0-9-1 protocol header")
                    return events
                if bytes(buffer[:8]) != PROTOCOL_HEADER:
                    raise BadProtocolHeader(f"unsupported protocol header {bytes(buffer[:8])!r}")
                start = 8
                self.state = "start-ok"
                events.append(Header())
            end = len(buffer)
            while end - start >= 7:
                kind, channel, size = FRAME_HEADER.unpack_from(buffer, start)
                if size + FRAME_OVERHEAD > self.frame_max:
                    raise connection_error(FRAME_ERROR, f"frame of {size + FRAME_OVERHEAD} bytes exceeds frame_max "
                                                        f"{self.frame_max}")  # fmt: skip
                if end - start < size + FRAME_OVERHEAD:
                    break
                if buffer[start + 7 + size] != FRAME_END:
                    raise connection_error(FRAME_ERROR, "frame-end octet missing")
                payload = bytes(buffer[start + 7 : start + 7 + size])
                start += size + FRAME_OVERHEAD
                self._frame(kind, channel, payload, events)
        except AmqpError:
            self.state = "closed"
            raise
        finally:
            if start:
                del buffer[:start]
        return events

    def _frame(self, kind: int, channel: int, payload: bytes, events: list) -> None:
        if kind == FRAME_HEARTBEAT:
            if channel != 0:
                raise connection_error(FRAME_ERROR, f"heartbeat frame on channel {channel}")
            return
        if kind == FRAME_METHOD:
            self._method(channel, decode_method(payload), events)
        elif kind in (FRAME_HEADER_TYPE, FRAME_BODY):
            self._content(kind, channel, payload, events)
        else:
            raise connection_error(FRAME_ERROR, f"unknown frame type {kind}")

    def _method(self, channel: int, method, events: list) -> None:
        class_id = method.index >> 16
        state = self.state
        if state == "closing":  # we sent connection.close: only close / close-ok matter
            if isinstance(method, commands.Connection.Close | commands.Connection.CloseOk) and channel == 0:
                events.append(Method(0, method))
            return
        if state != "opened":
            self._handshake(channel, method, events)
            return
        if channel == 0:
            if class_id != CONNECTION_CLASS:  # 504, as RabbitMQ answers it
                raise connection_error(CHANNEL_ERROR, f"{method.name} on channel 0", method)
            if not isinstance(method, commands.Connection.Close | commands.Connection.CloseOk
                              | commands.Connection.Blocked | commands.Connection.Unblocked):  # fmt: skip
                raise connection_error(COMMAND_INVALID, f"unexpected {method.name} after the handshake", method)
            events.append(Method(0, method))
            return
        if class_id == CONNECTION_CLASS:
            raise connection_error(COMMAND_INVALID, f"{method.name} on channel {channel}", method)
        if channel > self.channel_max:
            raise connection_error(NOT_ALLOWED, f"channel {channel} exceeds channel_max {self.channel_max}", method)
        status = self.channels.get(channel)
        if status == "closing":
            if isinstance(method, commands.Channel.CloseOk):
                del self.channels[channel]
            elif isinstance(method, commands.Channel.Close):
                events.append(Method(channel, method))  # both sides closed: the session answers close-ok
            return
        if channel in self._pending:
            raise connection_error(UNEXPECTED_FRAME, f"{method.name} on channel {channel} while a publish's "
                                                     "content was expected", method)  # fmt: skip
        if isinstance(method, commands.Channel.Open):
            if status is not None:
                raise connection_error(CHANNEL_ERROR, f"channel {channel} is already open", method)
            self.channels[channel] = "open"
        elif status is None:
            raise connection_error(CHANNEL_ERROR, f"expected 'channel.open' on channel {channel}", method)
        elif isinstance(method, commands.Basic.Publish):
            self._pending[channel] = _Pending(method)
            return
        elif not CLIENT_METHODS.get(type(method), False):
            raise connection_error(COMMAND_INVALID, f"a client may not send {method.name}", method)
        events.append(Method(channel, method))

    def _handshake(self, channel: int, method, events: list) -> None:
        expected = {"start-ok": commands.Connection.StartOk, "tune-ok": commands.Connection.TuneOk,
                    "open": commands.Connection.Open}.get(self.state)  # fmt: skip
        if channel == 0 and isinstance(method, commands.Connection.Close):
            events.append(Method(0, method))
            return
        if expected is None or channel != 0 or not isinstance(method, expected):
            want = expected.name if expected is not None else "the protocol header"
            raise connection_error(COMMAND_INVALID, f"expected {want}, got {method.name}", method)
        if isinstance(method, commands.Connection.TuneOk):
            self._tune_ok(method)
            self.state = "open"
        elif isinstance(method, commands.Connection.StartOk):
            pass  # the session checks the credentials, then sends tune (`tune`)
        events.append(Method(0, method))

    def _tune_ok(self, method) -> None:
        frame_max = method.frame_max or self.offered_frame_max
        if frame_max < FRAME_MIN_SIZE or frame_max > self.offered_frame_max:
            raise connection_error(NOT_ALLOWED, f"frame_max {method.frame_max} is outside {FRAME_MIN_SIZE}.."
                                                f"{self.offered_frame_max}", method)  # fmt: skip
        channel_max = method.channel_max or self.offered_channel_max
        if channel_max > self.offered_channel_max:
            raise connection_error(NOT_ALLOWED, f"channel_max {channel_max} exceeds {self.offered_channel_max}",
                                   method)  # fmt: skip
        self.frame_max = frame_max
        self.channel_max = channel_max
        self.heartbeat_s = method.heartbeat

    def _content(self, kind: int, channel: int, payload: bytes, events: list) -> None:
        pending = self._pending.get(channel)
        if pending is None:
            if self.channels.get(channel) == "closing":
                return
            what = "content header" if kind == FRAME_HEADER_TYPE else "content body"
            raise connection_error(UNEXPECTED_FRAME, f"{what} frame on channel {channel} without basic.publish")
        if kind == FRAME_HEADER_TYPE:
            if pending.size >= 0:
                raise connection_error(UNEXPECTED_FRAME, f"second content header on channel {channel}")
            content_header = decode_header(payload)
            pending.properties = content_header.properties
            pending.size = content_header.body_size
            if pending.size > self.max_message_bytes:
                pending.discard = True
                error = AmqpError(PRECONDITION_FAILED, f"message size {pending.size} is larger than configured max "
                                  f"size {self.max_message_bytes}", method=pending.method)  # fmt: skip
                self.channels[channel] = "closing"
                events.append(ChannelError(channel, error))
        else:
            if pending.size < 0:
                raise connection_error(UNEXPECTED_FRAME, f"content body before the content header on {channel}")
            pending.received += len(payload)
            if pending.received > pending.size:
                raise connection_error(FRAME_ERROR, f"content body on channel {channel} exceeds its declared size")
            if not pending.discard:
                pending.parts.append(payload)
        if pending.received == pending.size:
            del self._pending[channel]
            if not pending.discard:
                body = pending.parts[0] if len(pending.parts) == 1 else b"".join(pending.parts)
                events.append(Content(channel, pending.method, pending.properties, body))

    # -- sending ----------------------------------------------------------------------------------------------

    def start(self, server_properties: dict, mechanisms: str) -> bytes:
        """connection.start (the answer to the protocol header)."""
        return frame.marshal(commands.Connection.Start(server_properties=server_properties, mechanisms=mechanisms,
                                                       locales="en_US"), 0)  # fmt: skip

    def tune(self, heartbeat_s: int) -> bytes:
        """connection.tune (after start-ok's credentials were accepted)."""
        self.state = "tune-ok"
        tune = commands.Connection.Tune(channel_max=self.offered_channel_max, frame_max=self.offered_frame_max,
                                        heartbeat=heartbeat_s)  # fmt: skip
        return frame.marshal(tune, 0)

    def open_ok(self) -> bytes:
        self.state = "opened"
        return frame.marshal(commands.Connection.OpenOk(), 0)

    def send_method(self, channel: int, method) -> bytes:
        return frame.marshal(method, channel)

    def send_content(self, channel: int, method, properties, body: bytes) -> bytes:
        """A method with content (basic.deliver, basic.get-ok, basic.return): method, header and body frames.
        `method` may be a method's encoded payload (bytes) instead of a pamqp method, and `properties` the content
        header's encoded payload (bytes) instead of pamqp properties."""
        if isinstance(method, bytes):
            parts = [FRAME_HEADER.pack(FRAME_METHOD, channel, len(method)), method, b"\xce"]
        else:
            parts = [frame.marshal(method, channel)]
        if isinstance(properties, bytes):  # the content header's payload, encoded already (mapping.content_header)
            parts += (FRAME_HEADER.pack(FRAME_HEADER_TYPE, channel, len(properties)), properties, b"\xce")
        else:
            parts.append(frame.marshal(header.ContentHeader(0, len(body), properties), channel))
        step = self.frame_max - FRAME_OVERHEAD
        for offset in range(0, len(body), step):
            chunk = body[offset : offset + step]
            parts.append(FRAME_HEADER.pack(FRAME_BODY, channel, len(chunk)))
            parts.append(chunk)
            parts.append(b"\xce")
        return b"".join(parts)

    def close_channel(self, channel: int, error: AmqpError) -> bytes:
        """channel.close for a channel exception; the channel drops frames until channel.close-ok."""
        self.channels[channel] = "closing"
        self._pending.pop(channel, None)
        close = commands.Channel.Close(reply_code=error.code, reply_text=error.text, class_id=error.class_id,
                                       method_id=error.method_id)  # fmt: skip
        return frame.marshal(close, channel)

    def channel_closed(self, channel: int) -> bytes:
        """channel.close-ok for the client's channel.close."""
        self.channels.pop(channel, None)
        self._pending.pop(channel, None)
        return frame.marshal(commands.Channel.CloseOk(), channel)

    def close(self, error: AmqpError) -> bytes:
        """connection.close: the connection then only waits for close-ok (or the peer's close)."""
        self.state = "closing"
        close = commands.Connection.Close(reply_code=error.code, reply_text=error.text, class_id=error.class_id,
                                          method_id=error.method_id)  # fmt: skip
        return frame.marshal(close, 0)


__all__ = ["AmqpConnection", "BadProtocolHeader", "Header", "Method", "Content", "ChannelError", "HEARTBEAT_BYTES",
           "PROTOCOL_HEADER"]
