"""`Link`: one TCP connection of a client, an asyncio.Protocol over the sans-I/O `Connection`.

It matches replies to requests by correlation id, hands DELIVER frames to consumers, sends heartbeats and
notices a dead server (no frame for 3 heartbeat intervals). A Link is never reused: when it is lost every pending
request fails with ConnectionLost (or the error the server closed it with) and the client makes a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable

from chute.errors import ChuteError, ConnectionLost, ProtocolError, RequestTimeout
from chute.protocol import messages as m
from chute.protocol.connection import Connection, decode_reply, error_from
from chute.protocol.frames import MAX_CORRELATION_ID, Op

DEAD_PEER_INTERVALS = 3
_DELIVER, _REPLY, _ERROR = Op.DELIVER, Op.REPLY, Op.ERROR  # the opcodes each received frame is compared with
CLOSE_WAIT_S = 2.0  # how long close() waits for a TLS close_notify exchange before giving up on it


class Link(asyncio.Protocol):
    def __init__(self, *, on_deliver: Callable[[m.Deliver], None], heartbeat_s: float) -> None:
        self.conn = Connection("client")
        self.on_deliver = on_deliver
        self.heartbeat_s = heartbeat_s
        self.transport: asyncio.Transport | None = None
        self.pending: dict[int, tuple[asyncio.Future, type]] = {}
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()  # WELCOME or the refusal
        self.lost: asyncio.Future = asyncio.get_running_loop().create_future()  # the error that ended it
        self.disconnected = asyncio.Event()  # the transport is gone (for TLS: after its close_notify exchange)
        self.goaway = False
        self.writable = asyncio.Event()
        self.writable.set()
        self._ids = itertools.count(1)
        self._timer: asyncio.TimerHandle | None = None
        self._last_received = self._last_sent = 0.0

    # -- transport callbacks ------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._last_received = self._last_sent = asyncio.get_running_loop().time()

    def start(self, token: str | None, client: str, user: str | None = None, password: str | None = None) -> None:
        self._send(self.conn.hello(token=token, client=client, heartbeat_s=self.heartbeat_s, user=user,
                                   password=password))  # fmt: skip

    def data_received(self, data: bytes) -> None:
        self._last_received = asyncio.get_running_loop().time()
        try:
            frames = self.conn.receive_data(data)
        except ChuteError as exc:
            self._abort(exc)
            return
        for frame in frames:
            op = frame.op
            if op is _DELIVER:  # (module globals: reading `Op.X` costs ~100 ns on CPython 3.11)
                self.on_deliver(frame.body)
            elif op is _REPLY or (op is _ERROR and frame.correlation_id):
                waiter = self.pending.pop(frame.correlation_id, None)
                if waiter is None:
                    continue  # its caller gave up (timeout); the reply is dropped
                future, kind = waiter
                if future.done():
                    continue
                if op is _ERROR:
                    future.set_exception(error_from(frame.body))
                    continue
                try:
                    future.set_result(decode_reply(frame.body, kind))
                except ChuteError as exc:
                    future.set_exception(exc)
                    self._abort(exc)
                    return
            elif op is Op.WELCOME:
                if not self.ready.done():
                    self.ready.set_result(frame.body)
                self._schedule_heartbeat()
            elif op is Op.ERROR:  # a connection error: the server closes the connection
                self._abort(error_from(frame.body))
                return
            elif op is Op.GOAWAY:
                self.goaway = True

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disconnected.set()
        self._finish(ConnectionLost(f"connection to the broker lost{f': {exc}' if exc else ''}"))

    # -- requests -----------------------------------------------------------------------------------------------

    @property
    def open(self) -> bool:
        return not self.lost.done() and self.ready.done() and not self.ready.exception()

    def request(self, op: Op, payload, kind: type, deadline: float, timeout_s: float) -> asyncio.Future:
        """Send a request; the future gets the decoded reply, the error, or RequestTimeout at `deadline` (loop
        time). One timer handle per request: cheaper than a timeout context around the await."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if self.lost.done():
            future.set_exception(self.lost.result())
            return future
        corr = next(self._ids)
        if corr > MAX_CORRELATION_ID:
            self._ids = itertools.count(2)
            corr = 1
        data = self.conn.send(op, payload, corr)  # FrameTooLarge raises here, before anything is sent
        self.pending[corr] = (future, kind)
        timer = loop.call_at(deadline, self._expire, corr, future, op, timeout_s)

        def settled(done: asyncio.Future) -> None:
            timer.cancel()
            if done.cancelled():  # its caller was cancelled: a late reply is dropped
                self.pending.pop(corr, None)

        future.add_done_callback(settled)
        self._send(data)
        return future

    def _expire(self, corr: int, future: asyncio.Future, op: Op, timeout_s: float) -> None:
        if not future.done():
            self.pending.pop(corr, None)  # a late reply is dropped
            future.set_exception(RequestTimeout(f"no reply to {op.name} within {timeout_s} s"))

    def send_heartbeat(self) -> None:
        self._send(self.conn.send(Op.HEARTBEAT))

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        elif self.transport is None:
            self.disconnected.set()
        self._finish(ConnectionLost("connection closed by the client"))

    async def wait_closed(self, timeout_s: float = CLOSE_WAIT_S) -> None:
        """Wait (bounded) until the transport is really closed: a TLS close needs a round trip."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self.disconnected.wait()

    # -- internals ----------------------------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
            self._last_sent = asyncio.get_running_loop().time()

    def _abort(self, exc: ChuteError) -> None:
        self._finish(exc)
        if self.transport is not None:
            self.transport.abort()

    def _finish(self, exc: ChuteError) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if not self.ready.done():
            self.ready.set_exception(exc)
            self.ready.exception()  # mark retrieved: nobody may be waiting
        if not self.lost.done():
            self.lost.set_result(exc)
        pending, self.pending = self.pending, {}
        for future, _ in pending.values():
            if not future.done():
                future.set_exception(exc)
        self.writable.set()

    def _schedule_heartbeat(self) -> None:
        welcome = self.conn.welcome
        interval = welcome.heartbeat_s if welcome is not None else self.heartbeat_s
        self._timer = asyncio.get_running_loop().call_later(interval / 2, self._on_heartbeat)

    def _on_heartbeat(self) -> None:
        if self.lost.done():
            return
        now = asyncio.get_running_loop().time()
        interval = self.conn.welcome.heartbeat_s
        if now - self._last_received > DEAD_PEER_INTERVALS * interval:
            self._abort(ConnectionLost(f"no frame from the broker for {now - self._last_received:.1f} s"))
            return
        if now - self._last_sent >= interval / 2:
            self.send_heartbeat()
        self._schedule_heartbeat()


def refusal(error: ChuteError) -> bool:
    """True for errors that a reconnect cannot fix (bad token, no common version, protocol bugs)."""
    return (
        error.closes_connection
        and not error.retryable
        and not isinstance(error, ConnectionLost)
        or isinstance(error, ProtocolError)
    )
