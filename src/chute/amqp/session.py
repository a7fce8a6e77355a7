"""`AmqpSession`: one AMQP 0-9-1 connection, an asyncio.Protocol over the sans-I/O `AmqpConnection`.

    protocol header ─► connection.start ─► start-ok (PLAIN / AMQPLAIN checked against Chute's users, off the loop)
      ─► connection.tune ─► tune-ok ─► open (vhost "/") ─► open-ok ─► channels ... ─► close / close-ok

Each channel runs its methods one at a time, in order, in a worker task that exists only while the channel has
work (`Channel.inbox`); consecutive publishes are taken together and published as one batch (one record write,
one group commit). Durable work that the client does not wait for (nacks, a batch's confirms) runs in tasks of
its own (`spawn`), started in order, so a later method always sees its effects. Acks are applied at once and
their records ride with the next group commit (`Broker.ack_lazy`): a crash may redeliver a message acked in the
last LAZY_FLUSH_S (at-least-once, as RabbitMQ after a crash), never lose one that was confirmed.

Errors: an `AmqpError` of a method closes its channel (channel.close with the code and the method's ids) or, if
it is a connection exception, the connection (connection.close, then the transport once close-ok came or
`CLOSE_WAIT_S` passed). Bytes that break the framing close the connection with 501/505 at once; nothing of the
broker is touched by a method refused for its arguments or permissions.

Invariants: the same as the native session's — every delivery handed out and not settled is released when its
channel or the connection ends; a peer that breaks the protocol affects nothing but its own connection; reading
stops while the write buffer is full and while the server is above its memory high-water mark (clients that
said they understand it get connection.blocked / unblocked).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from pamqp import commands

from chute.amqp import dispatch
from chute.amqp.channel import Channel
from chute.amqp.connection import (
    HEARTBEAT_BYTES,
    PROTOCOL_HEADER,
    AmqpConnection,
    BadProtocolHeader,
    ChannelError,
    Content,
    Header,
    Method,
)
from chute.amqp.errors import (
    CONNECTION_FORCED,
    NOT_ALLOWED,
    AmqpError,
    connection_error,
)
from chute.amqp.handshake import authenticate, credential, login_name
from chute.errors import ChuteError
from chute.protocol.sizes import body_budget
from chute.server.auth import ANONYMOUS, Principal
from chute.server.session import _SESSION_IDS as SESSION_IDS
from chute.server.session import sweeper_of  # the server's one heartbeat sweeper, shared with native sessions

if TYPE_CHECKING:
    from chute.amqp.front import AmqpFront

log = logging.getLogger("chute.amqp")
HANDSHAKE_TIMEOUT_S = 10.0  # RabbitMQ's handshake_timeout: a connection must be open by then
CLOSE_WAIT_S = 1.0  # how long we wait for close-ok after sending connection.close
MISSED_HEARTBEATS = 2  # a peer silent this many heartbeat intervals is considered dead (as RabbitMQ)


class AmqpSession(asyncio.Protocol):
    """One AMQP client connection."""

    def __init__(self, front: AmqpFront) -> None:
        self.front = front
        self.owner_tag: str | None = None  # (a cluster node) who owns the exclusive queues it declares (front.py)
        self.server = front.server
        self.broker = front.server.broker
        config = front.server.config
        self.conn = AmqpConnection(max_message_bytes=config.max_message_bytes)
        self.body_budget = body_budget(config.max_frame_bytes)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.id = next(SESSION_IDS)  # one numbering with native sessions: the HTTP API lists both
        self.connected_at = time.time()
        self.closed = False
        self.writable = asyncio.Event()
        self.writable.set()
        self.channels: dict[int, Channel] = {}
        self.tasks: set[asyncio.Task] = set()
        self.principal: Principal = ANONYMOUS
        self.credential: tuple | None = None  # what start-ok authenticated with (None before tune)
        self.user_name = ""  # who a published message's user_id property may name (handshake.login_name)
        self.capabilities: dict = {}
        self.client_properties: dict = {}
        self.publish_bytes = 0
        self.heartbeat_s = max(1.0, float(round(config.heartbeat_s)))  # what the sweeper grids by
        self._heartbeat = 0  # negotiated interval (s); 0: off
        self._paused: set[str] = set()
        self._held: list | None = None  # events that came while start-ok's credentials were being checked
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper = None
        self._last_received = self._last_sent = 0.0
        self._closer: asyncio.TimerHandle | None = None
        self._publishing: dict[Channel, None] = {}  # channels whose publishes of this read go without a worker
        self._settles: dict[tuple[str, str], list[int]] = {}  # acks and nacks gathered for one broker call each
        # settles still being carried out (nacks, rejections republished with x-death): a publish after them on
        # this connection waits for them (basic.py), as AMQP's order within a channel asks
        self.settling: set[asyncio.Task] = set()
        self._closing = False  # connection.close sent: only close-ok (or the peer's close) matters now

    # -- transport callbacks ----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._loop = asyncio.get_running_loop()
        self._last_received = self._last_sent = self._loop.time()
        if not self.front.admit(self):
            self.closed = True
            transport.abort()
            return
        self._sweeper = sweeper_of(self.server, self._loop)
        self._sweeper.schedule(self, self._last_received + HANDSHAKE_TIMEOUT_S)

    def data_received(self, data: bytes) -> None:
        self._last_received = self._loop.time()
        if self.closed:
            return
        if data == HEARTBEAT_BYTES and self.conn.state == "opened" and not self._closing:
            return
        try:
            events = self.conn.receive_data(data)
        except BadProtocolHeader:
            self.write(PROTOCOL_HEADER)
            self._abort_soon()
            return
        except AmqpError as exc:
            if self._closing:
                self._abort()
            else:
                self.fail(exc)
            return
        for event in events:
            if self.closed:
                return
            if self._held is not None:
                self._held.append(event)
            else:
                self._event(event)
        if self._publishing:
            self._publish_read()

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self.writable.clear()
        self.pause_reading("write")

    def resume_writing(self) -> None:
        self.writable.set()
        self.resume_reading("write")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.writable.set()
        if self._sweeper is not None:
            self._sweeper.discard(self)
        if self._closer is not None:
            self._closer.cancel()
        for channel in list(self.channels.values()):
            channel.close()
        self.channels.clear()
        self.front.forget(self)

    # -- writing and closing ------------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
            self._last_sent = self._loop.time()

    def spawn(self, coro) -> asyncio.Task:
        """Run durable work the client does not wait for (acks, confirms) in its own task, started in order."""
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def settle_later(self, queue: str, action: str, receipts: list[int]) -> None:
        """Ack ("ack"), requeue ("nack") or dead-letter ("reject") receipts: gathered until the current batch of
        incoming frames is handled, then one broker call per queue and action (one record, one group commit)."""
        if not self._settles:
            self._loop.call_soon(self.flush_settles)
        self._settles.setdefault((queue, action), []).extend(receipts)

    def flush_settles(self, durable_acks: bool = False) -> list[asyncio.Task]:
        """Hand the gathered acks and nacks to the broker now (nacks each in its own task, started in order).
        Acks are applied at once and ride with the next group commit (`Broker.ack_lazy`): a basic.ack has no
        reply, so nobody waits for it to be durable; tx.commit, which answers only once they are, asks for
        `durable_acks` (each ack then in its own task too). A cluster node's `ClusterBroker` has `ack_lazy` too:
        lazy on its own shards, a durable ack forwarded in the background for another node's."""
        if not self._settles:
            return []
        settles, self._settles = self._settles, {}
        broker = self.broker
        ack_lazy = None if durable_acks else getattr(broker, "ack_lazy", None)
        tasks = []
        for (queue, action), receipts in settles.items():
            if action == "ack" and ack_lazy is None:
                tasks.append(self.spawn(broker.ack(queue, receipts)))
            elif action == "ack":
                try:
                    unknown = ack_lazy(queue, receipts)
                except ChuteError as exc:
                    log.info("amqp connection %s: %s", self.peer, exc.message)
                    continue
                if unknown:
                    log.info("amqp connection %s: %d receipts of queue %s were no longer leased", self.peer,
                             len(unknown), queue)  # fmt: skip
            else:
                tasks.append(self.spawn(broker.nack(queue, receipts, dead_letter=action == "reject")))
        for task in tasks:
            self.track_settling(task)
        return tasks

    def track_settling(self, task: asyncio.Task) -> None:
        self.settling.add(task)
        task.add_done_callback(self.settling.discard)

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if isinstance(exc, ChuteError):
                log.info("amqp connection %s: %s", self.peer, exc.message)
            else:
                log.error("amqp connection %s: background work failed", self.peer, exc_info=exc)

    def fail(self, error: AmqpError) -> None:
        """A connection exception: connection.close with its code; the transport closes after close-ok (or after
        CLOSE_WAIT_S). Nothing more is read or run on this connection."""
        if self.closed or self._closing:
            return
        self._closing = True
        log.info("closing AMQP connection from %s: %s", self.peer, error.text)
        if self.conn.state != "header":
            self.write(self.conn.close(error))
        for channel in list(self.channels.values()):
            channel.close()
        self.channels.clear()
        self._abort_soon()

    def _abort_soon(self) -> None:
        if self._closer is None and self._loop is not None:
            self._closer = self._loop.call_later(CLOSE_WAIT_S, self._abort)

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def pause_reading(self, reason: str) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self._paused.add(reason)

    def resume_reading(self, reason: str) -> None:
        self._paused.discard(reason)
        if not self._paused and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def memory(self, paused: bool) -> None:
        """The server crossed its memory high-water mark (up: True) or came back under half of it."""
        if self.capabilities.get("connection.blocked") and self.conn.state == "opened":
            method = commands.Connection.Blocked(reason="low on memory") if paused else commands.Connection.Unblocked()
            self.write(self.conn.send_method(0, method))
        if paused:
            self.pause_reading("memory")
        else:
            self.resume_reading("memory")

    def sweep(self, now: float) -> float | None:
        """Heartbeats and dead peers (the server's one sweeper calls this)."""
        if self.closed or self.transport is None:
            return None
        if self.conn.state != "opened" and self.conn.state != "closing":
            if now - self.connected_at_loop() > HANDSHAKE_TIMEOUT_S:
                log.info("AMQP connection from %s: no handshake within %.0f s", self.peer, HANDSHAKE_TIMEOUT_S)
                self.transport.abort()
                return None
            return now + 1.0
        interval = self._heartbeat
        if not interval:
            return None
        if now - self._last_received > MISSED_HEARTBEATS * interval:
            log.info("AMQP connection from %s: missed heartbeats, closing", self.peer)
            self.transport.abort()
            return None
        half = interval / 2
        if now - self._last_sent >= half:
            self.transport.write(HEARTBEAT_BYTES)
            self._last_sent = now
        return min(self._last_sent + half, self._last_received + MISSED_HEARTBEATS * interval + 0.01)

    # -- what the HTTP API, the dashboard and /metrics show (as for native sessions) ------------------------------

    @property
    def client_name(self) -> str:
        """What the client calls itself: its `connection_name` client property, else its product name."""
        props = self.client_properties or {}
        name = props.get("connection_name") or props.get("product") or ""
        return (name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name))[:200]

    def consumer_list(self) -> list[dict]:
        """This connection's consumers: id, connection_id, queue (Chute's name), prefetch, unacked, tag."""
        return [{"id": consumer.id, "connection_id": self.id, "queue": consumer.queue,
                 "prefetch": consumer.prefetch, "unacked": consumer.outstanding, "tag": consumer.tag}
                for channel in list(self.channels.values())
                for consumer in list(channel.consumers.values())]  # fmt: skip

    def describe(self) -> dict:
        """This connection as the HTTP API lists connections (models.ConnectionInfo's fields)."""
        return {"id": self.id, "peer": self.peer, "client_name": self.client_name, "user": self.principal.name,
                "connected_at": self.connected_at, "consumers": self.consumer_list(), "protocol": "amqp",
                "channels": len(self.channels),
                "leased": sum(len(channel.unacked) for channel in self.channels.values())}  # fmt: skip

    def loop_time(self) -> float:
        return self._loop.time()

    def connected_at_loop(self) -> float:
        return self._loop.time() - (time.time() - self.connected_at)

    async def shutdown(self, grace_s: float) -> None:
        """Graceful stop: stop reading and delivering, let in-flight work finish (confirms go out), then
        connection.close 320 CONNECTION_FORCED and the transport once close-ok came (or soon after)."""
        self.pause_reading("shutdown")
        for channel in self.channels.values():
            for tag in list(channel.consumers):
                channel.cancel(tag)
        pending = list(self.tasks) + [c.worker for c in self.channels.values() if c.worker is not None]
        if pending:
            await asyncio.wait(pending, timeout=grace_s)
        if not self.closed and self.conn.state == "opened":
            self.fail(AmqpError(CONNECTION_FORCED, "broker forced connection closure with reason 'shutdown'",
                                connection=True))  # fmt: skip
        elif not self.closed:
            self._abort()

    # -- events -------------------------------------------------------------------------------------------------

    def _event(self, event) -> None:
        if isinstance(event, Content):
            self._enqueue(event.channel, event)
        elif isinstance(event, Method):
            if event.channel == 0:
                self._connection_method(event.method)
            else:
                self._channel_method(event.channel, event.method)
        elif isinstance(event, ChannelError):
            self.channel_error(event.channel, event.error)
        elif isinstance(event, Header):
            self.write(self.conn.start(self.front.server_properties(), "PLAIN AMQPLAIN"))

    def _connection_method(self, method) -> None:
        if isinstance(method, commands.Connection.StartOk):
            self._held = []
            self.pause_reading("handshake")
            self.spawn(self._start_ok(method))
        elif isinstance(method, commands.Connection.TuneOk):
            self._heartbeat = method.heartbeat
            if method.heartbeat:
                self.heartbeat_s = float(method.heartbeat)
        elif isinstance(method, commands.Connection.Open):
            if method.virtual_host not in ("/", ""):
                self.fail(connection_error(NOT_ALLOWED, f"vhost '{method.virtual_host}' not found (Chute has one "
                                                        "virtual host: '/')", method))  # fmt: skip
                return
            self.write(self.conn.open_ok())
            if self._sweeper is not None:
                self._sweeper.discard(self)
                if self._heartbeat:
                    self._sweeper.schedule(self, self._loop.time() + self._heartbeat / 2)
        elif isinstance(method, commands.Connection.Close):
            registry = self.front.cluster_consumers
            if registry is None:
                with contextlib.suppress(Exception):
                    self.write(self.conn.send_method(0, commands.Connection.CloseOk()))
            self.conn.state = "closed"
            for channel in list(self.channels.values()):
                channel.close()
            self.channels.clear()
            if registry is None:
                self._abort()
            else:  # close-ok once its consumers left the cluster's registry: then no node counts them any more
                self.spawn(self._after_consumers_left(lambda: (self.write(self.conn.send_method(
                    0, commands.Connection.CloseOk())), self._abort())))  # fmt: skip
        elif isinstance(method, commands.Connection.CloseOk):
            self._abort()

    async def _after_consumers_left(self, then) -> None:
        """(Cluster node) `then()` once the consumers that ended have left the registry (or could not)."""
        await self.front.cluster_consumers.left()
        with contextlib.suppress(Exception):
            then()

    async def _start_ok(self, method) -> None:
        try:
            self.principal = await authenticate(self.server.auth, method)
            self.credential = credential(self.server.auth, method)
            self.user_name = login_name(self.server.auth, method, self.principal)
        except AmqpError as exc:
            self.fail(exc)
            return
        if self.closed:
            return
        properties = method.client_properties or {}
        self.client_properties = properties
        capabilities = properties.get("capabilities")
        self.capabilities = capabilities if isinstance(capabilities, dict) else {}
        self.write(self.conn.tune(int(self.heartbeat_s)))
        held, self._held = self._held or [], None
        for event in held:
            if self.closed:
                return
            self._event(event)
        if self._publishing:
            self._publish_read()
        self.resume_reading("handshake")

    # -- channels -----------------------------------------------------------------------------------------------

    def _channel_method(self, number: int, method) -> None:
        if isinstance(method, commands.Channel.Open):
            self.channels[number] = Channel(self, number)
            self.write(self.conn.send_method(number, commands.Channel.OpenOk()))
            return
        if isinstance(method, commands.Channel.Close):
            channel = self.channels.pop(number, None)
            if channel is not None:
                channel.close()
            if self.front.cluster_consumers is not None and self.front.cluster_consumers.leaving:
                self.spawn(self._after_consumers_left(lambda: self.write(self.conn.channel_closed(number))))
            else:
                self.write(self.conn.channel_closed(number))
            return
        if isinstance(method, commands.Channel.CloseOk):
            return
        self._enqueue(number, method)

    def _enqueue(self, number: int, item) -> None:
        channel = self.channels.get(number)
        if channel is None or channel.closed:
            return
        if channel.worker is None and not channel.inbox and channel.tx is None:  # nothing before it to run
            if isinstance(item, Content):
                self._publishing[channel] = None  # published at the end of this read (`_publish_read`), no task
            elif isinstance(item, dispatch.SETTLING):
                dispatch.settle_now(self, channel, item)
                return
        if channel.worker is None and channel not in self._publishing:
            channel.worker = asyncio.ensure_future(dispatch.work(self, channel))
        channel.inbox.append(item)

    def _publish_read(self) -> None:
        """The end of a read: publish the runs of basic.publish that came on idle channels, as their worker would
        (dispatch.py: one run is one batch), without starting one; a channel that also got another method gets
        its worker now, which runs that method after the publishes, in order."""
        channels, self._publishing = self._publishing, {}
        for channel in channels:
            inbox = channel.inbox
            if self.closed:
                return
            if channel.closed or channel.worker is not None:
                continue
            if self.front.routed:  # a cluster node's publishes read what routing needs first, in the worker
                channel.worker = asyncio.ensure_future(dispatch.work(self, channel))
                continue
            while inbox and isinstance(inbox[0], Content) and not channel.closed and channel.tx is None:
                dispatch.publish_run(self, channel)
                if self.closed:
                    return
            if inbox and not channel.closed:
                channel.worker = asyncio.ensure_future(dispatch.work(self, channel))

    def channel_error(self, number: int, error: AmqpError) -> None:
        """A channel exception: channel.close with its code; the channel's deliveries go back at once."""
        if self.closed or self.conn.state != "opened":
            return
        channel = self.channels.pop(number, None)
        if channel is not None:
            channel.close()
        log.info("closing AMQP channel %d of %s: %s", number, self.peer, error.text)
        self.write(self.conn.close_channel(number, error))
