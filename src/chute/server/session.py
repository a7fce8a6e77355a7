"""`Session`: one native-protocol connection, an asyncio.Protocol over `chute.protocol.Connection`.

Frames are decoded sans-I/O; each request runs as one task (a publish batch is one request, never one task per
message) and is answered by exactly one REPLY or ERROR with its correlation id, in completion order. Push
consumers (`ServerConsumer`) have no task: the broker's dispatcher pumps them (one pass per loop turn for every
consumer whose queue gained messages) and they send DELIVER frames while they have prefetch credit.

Invariants:
- `leased[queue]` holds every receipt delivered on this connection and not yet settled through it; when the
  connection ends they are released at once, so another consumer gets those messages without waiting for leases.
  A queue's key goes when its last receipt is settled, or at the next heartbeat once the queue is gone or its
  leases ended: a connection that lives for months keeps no key per queue it ever consumed from.
- A peer that breaks the protocol gets one ERROR frame and the connection is closed; it never affects others.
- No frame exceeds `max_frame_bytes`: the broker leases at most a frame's worth of bodies per batch, and a DELIVER
  batch (or a RECEIVE reply) that large headers still make too big is cut (`protocol.sizes`).
- Auth: HELLO's credentials are checked (off the event loop for passwords) before WELCOME; frames pipelined behind
  HELLO wait (reading paused) until then. Every request is checked against `principal` before the broker is
  touched: a refused one is answered `forbidden` and changes nothing; the connection stays open.
- Backpressure: reading stops while the transport's write buffer is full (a peer that does not read its replies
  cannot make us buffer without bound) and while the server is over its memory high-water mark; consumers do not
  fetch more while the write buffer is full (a slow consumer only slows itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import itertools
import logging
import time
import weakref
from typing import TYPE_CHECKING

from chute.broker import unknown_receipts
from chute.errors import (
    BrokerClosed,
    ChuteError,
    ConsumerNotFound,
    FrameTooLarge,
    InvalidArgument,
    QueueNotFound,
)
from chute.protocol import messages as m
from chute.protocol.connection import HEARTBEAT_BYTES, Connection, Frame
from chute.protocol.frames import Op
from chute.protocol.sizes import body_budget, fitting
from chute.server.auth import ANONYMOUS, IDLE_RECHECK_S, Principal, check, dest_kind
from chute.server.calls import check_call
from chute.server.heartbeats import Sweeper

if TYPE_CHECKING:
    from chute.server.app import Server

_SESSION_IDS = itertools.count(1)
log = logging.getLogger("chute.server")

CREDIT_RECHECK_S = 0.5  # through a cluster's router: how soon leases that ended free a consumer's credit
POLL_S = 1.0  # through a cluster's router: longest single long-poll of a push consumer
MAX_DELIVER_BATCH = 256  # deliveries per DELIVER frame
MAX_BATCHES_PER_PASS = 8  # DELIVER frames a consumer writes in one dispatcher pass before the others' turn
DEAD_PEER_INTERVALS = 3  # a peer silent this many heartbeat intervals is considered dead

# One heartbeat sweeper per server (server/heartbeats.py): a single timer for every connection's heartbeats and
# dead-peer checks, which also makes idle connections look at the users file every IDLE_RECHECK_S.
_SWEEPERS: weakref.WeakKeyDictionary[Server, Sweeper] = weakref.WeakKeyDictionary()


def sweeper_of(server: Server, loop: asyncio.AbstractEventLoop) -> Sweeper:
    sweeper = _SWEEPERS.get(server)
    if sweeper is None or sweeper.loop is not loop:
        sweeper = _SWEEPERS[server] = Sweeper(loop, lambda: server.auth.poll(IDLE_RECHECK_S), IDLE_RECHECK_S)
    return sweeper


class ServerConsumer:
    """A push consumer on one session: keeps at most `prefetch` deliveries unsettled. An ephemeral one consumes
    the private queue of an ephemeral subscription made for it, which it ends when it ends (at-most-once: its
    deliveries have receipt 0, need no ack and take no credit).

    It has no task of its own: the broker's dispatcher (chute/_dispatch.py) calls `pump` in its pass when the
    queue gained ready messages, credit came back or the transport became writable. Only reading bodies from disk
    runs a task (`reading`), after which it asks for the next pass. Through a cluster's router (a broker without a
    dispatcher, whose queues may be on other nodes) it runs a task of long-poll receives instead (`_run_routed`)."""

    def __init__(self, session: Session, consumer_id: int, queue: str, prefetch: int, lease_s: float | None,
                 *, ephemeral: bool = False):  # fmt: skip
        self.session = session
        self.id = consumer_id
        self.queue = queue
        self.prefetch = prefetch
        self.lease_s = float(lease_s) if type(lease_s) is int else lease_s  # (checked by each receive)
        self.ephemeral = ephemeral
        self.outstanding: set[int] = set()
        self.blocked = False  # out of credit: settlements (or the dispatcher's sweep) wake it
        self.ended = False
        self.reading: asyncio.Task | None = None  # bodies being read from disk
        self._timer: asyncio.TimerHandle | None = None  # a rate limit lets the next message go
        self._dispatcher = getattr(session.broker, "dispatcher", None)  # None: a cluster's router (`_run_routed`)
        self.task: asyncio.Task | None = None  # `_run_routed` only
        self.credit = asyncio.Event()  # `_run_routed` only: set when deliveries are settled
        self.max_frame = session.server.config.max_frame_bytes
        self.budget = body_budget(self.max_frame)  # the bodies of one DELIVER frame

    def start(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.watch(self)
        else:
            self.task = asyncio.get_running_loop().create_task(self._run_routed(self.max_frame, self.budget))

    def stop(self) -> None:
        """Deliver no more (deliveries being read from disk are released); an ephemeral subscription is gone when
        this returns. Idempotent."""
        if self.ended:
            return
        self.ended = True
        if self._dispatcher is not None:
            self._dispatcher.unwatch(self)
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
        if self._timer is not None:
            self._timer.cancel()
        if self.reading is not None:
            self.reading.cancel()
        if self.ephemeral:
            self.session.broker.end_ephemeral(self.queue)

    def settled(self, receipts) -> None:
        if self.outstanding:
            self.outstanding.difference_update(receipts)
            if self._dispatcher is None:
                self.credit.set()
            elif self.blocked:
                self.blocked = False
                self._dispatcher.wake(self)

    def writable(self) -> None:
        """The transport takes writes again."""
        if not self.ended and self._dispatcher is not None:
            self._dispatcher.wake(self)

    def pump(self, dispatcher) -> None:
        """Deliver while there is credit, ready messages and a writable transport (the dispatcher's pass)."""
        if self.ended or self.reading is not None or self.session.closed:
            return
        try:
            self._pump(dispatcher)
        except ChuteError as exc:  # the queue was deleted, the broker is closing, ...
            self._end(exc)
        except Exception as exc:  # a bug: end this consumer, keep the connection
            log.exception("consumer %s on %s failed", self.id, self.queue)
            self._end(ChuteError(f"consumer failed: {exc}"))

    def _pump(self, dispatcher) -> None:
        session, broker, name = self.session, self.session.broker, self.queue
        if broker._state != "serving":
            broker._check()  # raises
        queue = broker.core.queues.get(name)
        if queue is None:
            raise QueueNotFound(f"queue {name!r} was deleted")
        max_frame, budget = self.max_frame, self.budget
        for _ in range(MAX_BATCHES_PER_PASS):
            if not session.can_write:
                return  # `writable()` wakes us
            credit = self.prefetch - len(self.outstanding)
            if credit <= 0:
                self.outstanding &= queue.in_flight.keys()  # leases that ended (and were redelivered) free credit
                credit = self.prefetch - len(self.outstanding)
                if credit <= 0:
                    self.blocked = True
                    return
            self.blocked = False
            if not queue.ready:
                return  # the queue's next change makes us due
            entries = dispatcher.lease(name, min(credit, MAX_DELIVER_BATCH), self.lease_s, budget)
            if not entries:  # a rate limit holds them back
                self._retry_at(broker.core.rate_ready_at(name, broker.clock()))
                return
            deliveries = dispatcher.deliveries(name, entries)
            if deliveries is None:
                self.reading = asyncio.ensure_future(self._read(entries, max_frame))
                return
            self._deliver(deliveries, max_frame)
        dispatcher.wake(self)  # more to do: in the next pass, after the others' turn

    def _retry_at(self, when: float | None) -> None:
        if when is None or self._timer is not None:
            return
        delay = max(0.001, when - self.session.broker.clock())
        self._timer = self.session._loop.call_later(delay, self._rate_allows)

    def _rate_allows(self) -> None:
        self._timer = None
        if not self.ended:
            self._dispatcher.wake(self)

    async def _read(self, entries: list, max_frame: int) -> None:
        """Read bodies that left the cache, deliver them, ask for the next pass."""
        broker = self.session.broker
        try:
            deliveries = await broker._read_deliveries(self.queue, entries)  # releases them if it fails
        except asyncio.CancelledError:
            raise
        except ChuteError as exc:
            self.reading = None
            self._end(exc)
            return
        except Exception as exc:
            log.exception("consumer %s on %s failed", self.id, self.queue)
            self.reading = None
            self._end(ChuteError(f"consumer failed: {exc}"))
            return
        self.reading = None
        if self.ended or self.session.closed:
            broker.release(self.queue, [d.receipt for d in deliveries if d.receipt])
            return
        self._deliver(deliveries, max_frame)
        self._dispatcher.wake(self)

    def _end(self, end: ChuteError) -> None:
        """The server ends this consumer: tell the peer why (an END on DELIVER)."""
        self.stop()
        session = self.session
        session.consumers.pop(self.id, None)
        if not session.closed:
            body = m.ErrorBody(code=end.code, name=end.name, message=end.message, retryable=end.retryable)
            session.write(Op.DELIVER, m.Deliver(consumer=self.id, deliveries=[], end=body))

    async def _run_routed(self, max_frame: int, budget: int) -> None:
        """Through a cluster's router: long-poll receives of at most the credit, wherever the queue is."""
        session, broker, name = self.session, self.session.broker, self.queue
        end: ChuteError | None = None
        try:
            while not session.closed:
                if not session.writable.is_set():
                    await session.writable.wait()
                    continue
                credit = self.prefetch - len(self.outstanding)
                if credit <= 0:
                    self.credit.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(CREDIT_RECHECK_S):
                            await self.credit.wait()
                    continue
                fetch = asyncio.ensure_future(broker.receive(name, min(credit, MAX_DELIVER_BATCH), wait_s=POLL_S,
                                                             lease_s=self.lease_s, max_bytes=budget))  # fmt: skip
                try:
                    deliveries = await asyncio.shield(fetch)
                except asyncio.CancelledError:
                    # stopped during the poll (CANCEL, the connection closing): the poll runs to its end on the
                    # queue's node, and what it leased then is given back at once, not left hidden for a lease
                    fetch.add_done_callback(functools.partial(_release_late, broker, name))
                    raise
                if session.closed:
                    broker.release(name, [d.receipt for d in deliveries if d.receipt])
                    return
                if deliveries:
                    self._deliver(deliveries, max_frame)
        except asyncio.CancelledError:
            raise
        except ChuteError as exc:
            end = exc
        except Exception as exc:
            log.exception("consumer %s on %s failed", self.id, self.queue)
            end = ChuteError(f"consumer failed: {exc}")
        if end is not None:
            self._end(end)
        else:
            session.consumers.pop(self.id, None)
            self.stop()

    def _deliver(self, deliveries: list, max_frame: int) -> None:
        session = self.session
        receipts = [d.receipt for d in deliveries if d.receipt]
        if receipts:
            self.outstanding.update(receipts)
            session.track(self.queue, receipts)
        try:
            session.write(Op.DELIVER, m.Deliver(consumer=self.id, deliveries=deliveries))
        except FrameTooLarge:  # the bodies fit (max_bytes), large headers did not: cut the batch
            while deliveries:
                count = fitting(deliveries, max_frame)
                batch, deliveries = deliveries[:count], deliveries[count:]
                session.write(Op.DELIVER, m.Deliver(consumer=self.id, deliveries=batch))


class Session(asyncio.Protocol):
    """One client connection."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.broker = server.broker
        self.conn = Connection("server", max_frame_bytes=server.config.max_frame_bytes)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.closed = False
        self.writable = asyncio.Event()  # for tasks that wait until the transport takes writes again
        self.writable.set()
        self.can_write = True  # = writable.is_set(), read without a call by the dispatcher's pass
        self.requests: set[asyncio.Task] = set()
        self.consumers: dict[int, ServerConsumer] = {}
        self.leased: dict[str, set[int]] = {}
        self._paused: set[str] = set()  # why reading is paused: "write", "memory", "shutdown"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: Sweeper | None = None  # looks at us for heartbeats and silence (`sweep`)
        self.heartbeat_s = server.config.heartbeat_s
        self._last_received = self._last_sent = 0.0
        self.publish_bytes = 0
        self.id = next(_SESSION_IDS)  # shown in the HTTP API and dashboard
        self.connected_at = time.time()
        self.client_name = ""  # what the client called itself in HELLO
        self.principal: Principal = ANONYMOUS  # who authenticated in HELLO (server/auth.py)
        self.credential: tuple | None = None  # what HELLO authenticated with (None before WELCOME)
        self._held: list[Frame] | None = None  # frames that came behind HELLO while it is being checked
        self._out: list[bytes] | None = None  # bytes for the peer in this turn of the loop (`_send`)
        self._fast_ack = not getattr(self.broker, "routed", False)  # through a cluster's router, ACK is a task
        self._tasked = False  # a frame of this read became a task: later PUBLISHes of the read take tasks too

    # -- transport callbacks ------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        loop = self._loop = asyncio.get_running_loop()
        self._last_received = self._last_sent = loop.time()
        if not self.server.admit(self):
            return
        self._sweeper = sweeper_of(self.server, loop)
        self._sweeper.schedule(self, self._last_received + DEAD_PEER_INTERVALS * self.heartbeat_s)  # no HELLO yet

    def data_received(self, data: bytes) -> None:
        self._last_received = self._loop.time()
        if data == HEARTBEAT_BYTES and self.conn.heartbeat_only(data):
            return  # an idle client's sign of life: nothing more to do (the common case of an idle broker)
        try:
            frames = self.conn.receive_data(data)
        except ChuteError as exc:
            self.fail(exc)
            return
        self._tasked = False
        for frame in frames:
            if self.closed:
                return
            if self._held is not None:  # the handshake is being checked: keep the order
                self._held.append(frame)
                continue
            self._dispatch(frame)

    def _dispatch(self, frame: Frame) -> None:
        op = frame.op
        if op is Op.HEARTBEAT:
            return
        if op is Op.ACK and self._fast_ack:
            self._ack_now(frame)
            return
        if op is Op.PUBLISH and not self._tasked and self._fast_ack and not frame.body.more:  # (a router: a task)
            self._publish_now(frame)
            return
        self._tasked = True  # a PUBLISH behind this frame runs after it too (a task's first step runs next turn)
        if op is Op.HELLO:
            self._held = []
            self.pause_reading("handshake")
            task = asyncio.ensure_future(self._hello(frame.body))
        else:
            task = asyncio.ensure_future(self._request(frame))
        self.requests.add(task)
        task.add_done_callback(self.requests.discard)

    def eof_received(self) -> bool:
        return False  # close our side too

    def pause_writing(self) -> None:
        self.writable.clear()
        self.can_write = False
        self.pause_reading("write")

    def resume_writing(self) -> None:
        self.writable.set()
        self.can_write = True
        self.resume_reading("write")
        for consumer in self.consumers.values():
            consumer.writable()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.conn.state = "closed"
        self.writable.set()  # let waiting consumers run to their end
        self.can_write = True
        if self._sweeper is not None:
            self._sweeper.discard(self)
        for consumer in list(self.consumers.values()):
            consumer.stop()
        self.consumers.clear()
        for queue, receipts in self.leased.items():
            if receipts:
                self.broker.release(queue, list(receipts))
        self.leased.clear()
        self.server.forget(self)

    # -- writing and closing --------------------------------------------------------------------------------

    def write(self, op: Op, payload=None, correlation_id: int = 0) -> None:
        if self.closed or self.transport is None:
            return
        try:
            data = self.conn.send(op, payload, correlation_id)
        except ChuteError as exc:  # the reply is larger than a frame (e.g. a huge peek): say so instead
            if not correlation_id:
                raise
            data = self.conn.error_frame(exc, correlation_id)
        self._send(data)
        self._last_sent = self._loop.time()

    def _send(self, data: bytes) -> None:
        """Queue bytes for the peer; everything queued in one turn of the event loop goes in one write (with a
        thousand consumers on a connection, one system call instead of one per DELIVER)."""
        out = self._out
        if out is None:
            self._out = [data]
            self._loop.call_soon(self._flush_out)
        else:
            out.append(data)

    def _flush_out(self) -> None:
        out, self._out = self._out, None
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def fail(self, exc: ChuteError) -> None:
        """Send a connection-level ERROR and close (a protocol violation, refused handshake, ...)."""
        if self.closed or self.transport is None:
            return
        log.info("closing connection from %s: %s (%s)", self.peer, exc.message, exc.name)
        with contextlib.suppress(Exception):
            self._send(self.conn.error_frame(exc))
        self.closed = True  # nothing more is read or answered; connection_lost still releases leases
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._flush_out()  # what was answered before the close goes first
            self.transport.close()

    def pause_reading(self, reason: str) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self._paused.add(reason)

    def resume_reading(self, reason: str) -> None:
        self._paused.discard(reason)
        if not self._paused and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def sweep(self, now: float) -> float | None:
        """The heartbeat sweeper looks at us (at the time we asked for, or a grid step later): close the
        connection if the peer was silent for DEAD_PEER_INTERVALS intervals, send HEARTBEAT after half an interval
        of our own silence (never before WELCOME), forget ended leases. Returns when to look again: when our next
        HEARTBEAT falls due or the peer's silence would become too long, whichever comes first."""
        if self.closed:
            return None
        dead_after = DEAD_PEER_INTERVALS * self.heartbeat_s
        if now - self._last_received > dead_after:
            log.info("connection from %s: no frame for %.1f s, closing", self.peer, now - self._last_received)
            self.transport.abort()
            return None
        if self.leased:
            self._prune_leases()
        if self.conn.welcome is None:
            return self._last_received + dead_after
        half = self.heartbeat_s * 0.5
        if now - self._last_sent >= half:
            self._send(HEARTBEAT_BYTES)
            self._last_sent = now
        return min(self._last_sent + half, self._last_received + dead_after)

    def _prune_leases(self) -> None:
        """Forget receipts whose lease ended (they were released or redelivered elsewhere)."""
        routed = getattr(self.broker, "routed", False)  # a cluster's router: leases are on the shards' brokers
        for name, receipts in list(self.leased.items()):
            queue = None if routed else self.broker.core.queues.get(name)
            if queue is not None and receipts:
                receipts.intersection_update(queue.in_flight.keys())
            if not receipts or (queue is None and not routed):  # (a router's: released when the connection ends)
                del self.leased[name]

    def track(self, queue: str, receipts) -> None:
        if receipts:
            leased = self.leased.get(queue)
            if leased is None:
                leased = self.leased[queue] = set()
            leased.update(receipts)

    def _settled(self, queue: str, receipts) -> None:
        leased = self.leased.get(queue)
        if leased:
            leased.difference_update(receipts)
            if not leased:  # no key per queue ever consumed through a long-lived connection
                del self.leased[queue]
        dispatcher = getattr(self.broker, "dispatcher", None)  # (a cluster's router has none)
        consumers = dispatcher.watched.get(queue, ()) if dispatcher is not None else self.consumers.values()
        for consumer in consumers:  # the queue's consumers, not all of ours
            if consumer.session is self and consumer.queue == queue:
                consumer.settled(receipts)

    # -- requests ---------------------------------------------------------------------------------------------

    async def _hello(self, hello: m.Hello) -> None:
        try:
            self.principal = await self.server.auth.hello(hello)
        except ChuteError as exc:
            self.fail(exc)
            return
        if self.closed:
            return
        self.credential = self.server.auth.credential(hello)
        self.client_name = hello.client[:200]
        for_peer = getattr(self.server.broker, "for_peer", None)
        if for_peer is not None:  # a cluster node: another node's forwarding connection is served locally only
            self.broker = for_peer(self.client_name)
        if 0.05 <= hello.heartbeat_s <= 3600:
            self.heartbeat_s = hello.heartbeat_s
        try:
            self._send(self.conn.accept(hello, server=self.server.name, heartbeat_s=self.heartbeat_s,
                                        max_message_bytes=self.server.config.max_message_bytes,
                                        fsync=self.server.config.fsync))  # fmt: skip
        except ChuteError as exc:
            self.fail(exc)
            return
        self._last_sent = self._loop.time()
        if self._sweeper is not None:  # the interval in force may have changed: heartbeats from now on
            self._sweeper.schedule(self, self._last_sent + self.heartbeat_s * 0.5)
        held, self._held = self._held or [], None
        self._tasked = False
        for frame in held:
            if self.closed:
                return
            self._dispatch(frame)
        self.resume_reading("handshake")

    async def _request(self, frame: Frame) -> None:
        corr = frame.correlation_id
        try:
            if not self.principal.superuser:
                self._permit(frame.op, frame.body)
            reply = await HANDLERS[frame.op](self, frame.body)
        except ChuteError as exc:
            self.write_error(exc, corr)
            return
        except asyncio.CancelledError:
            self.write_error(BrokerClosed("the server is shutting down"), corr)
            raise
        except Exception as exc:
            log.exception("request %s from %s failed", frame.op.name, self.peer)
            self.write_error(ChuteError(f"internal error: {type(exc).__name__}"), corr)
            return
        self.write(Op.REPLY, reply, corr)

    def _permit(self, op: Op, body) -> None:
        """Forbidden unless the principal may make this request (checked before the broker is touched)."""
        principal = self.principal
        if op is Op.PUBLISH:
            if not body.more:  # several destinations: each group is checked on its own (_publish_many)
                check(principal, "publish", dest_kind(self.broker, body.dest), body.dest)
        elif op is Op.CONSUME and body.topic is not None:  # an ephemeral subscription: as consuming the topic
            check(principal, "consume", "topic", body.topic)
        elif op in (Op.CONSUME, Op.RECEIVE, Op.ACK, Op.NACK, Op.EXTEND):
            check(principal, "consume", "queue", body.queue)
        elif op is Op.CALL:
            check_call(body.method, body.args)  # bad arguments are invalid_argument, before forbidden
            for permission, kind, name in CALL_PERMISSIONS[body.method](body.args):
                if permission == "see":
                    if not principal.can_see(kind, name):
                        check(principal, "manage", kind, name)  # raises, naming the caller and the name
                else:
                    check(principal, permission, kind, name)

    def write_error(self, exc: ChuteError, correlation_id: int) -> None:
        if self.closed or self.transport is None:
            return
        self._send(self.conn.error_frame(exc, correlation_id))

    async def _publish(self, request: m.PublishRequest) -> m.PublishReply:
        if request.more:
            return await self._publish_many(request)
        size = sum(len(message.body) for message in request.messages)
        self.server.publishing(self, size)
        try:
            return m.PublishReply(ids=await self.broker.publish_batch(request.dest, request.messages))
        finally:
            self.server.publishing(self, -size)

    def _publish_now(self, frame: Frame) -> None:
        """PUBLISH to one destination without a task: prepared now, answered (by the broker's callback on the
        store's future, after it placed the messages) once durable, never before."""
        corr, request = frame.correlation_id, frame.body
        messages = request.messages
        size = sum([len(message.body) for message in messages])
        then = functools.partial(self._published, corr, size)
        try:
            if not self.principal.superuser:
                self._permit(Op.PUBLISH, request)
            ids, future = self.broker._publish(request.dest, messages, then)
        except Exception as exc:
            self._answer_error(exc, corr, "PUBLISH")
            return
        if future is None:  # nothing to wait for (every message a repeated dedup id)
            self.write(Op.REPLY, m.PublishReply(ids=ids), corr)
            return
        self.server.publishing(self, size)  # unconfirmed bytes count against the memory high-water mark

    def _published(self, corr: int, size: int, ids: list[int], error: BaseException | None) -> None:
        """The messages of PUBLISH `corr` are durable and placed (or the store failed: `error`): answer it."""
        self.server.publishing(self, -size)
        if error is None:
            self.write(Op.REPLY, m.PublishReply(ids=ids), corr)
        else:
            self._answer_error(error, corr, "PUBLISH")

    async def _publish_many(self, request: m.PublishRequest) -> m.PublishReply:
        """Protocol 2: a PUBLISH with messages for several destinations; each group is authorized, stored or
        refused on its own, and the reply says which failed."""
        groups = [(request.dest, request.messages)] + [(group.dest, group.messages) for group in request.more]
        allowed, failed = [], []
        principal = self.principal
        for index, (dest, messages) in enumerate(groups):
            try:
                if not isinstance(dest, str) or not messages:
                    raise InvalidArgument("every group of a publish needs a destination and at least one message")
                if not principal.superuser:
                    check(principal, "publish", dest_kind(self.broker, dest), dest)
            except ChuteError as exc:
                failed.append(m.PublishFailure(group=index, error=self.conn.error_body(exc)))
                continue
            allowed.append(index)
        size = sum(len(message.body) for _, messages in groups for message in messages)
        self.server.publishing(self, size)
        try:
            outcomes = await self.broker.publish_many([groups[i] for i in allowed]) if allowed else []
        finally:
            self.server.publishing(self, -size)
        ids: list[list[int] | None] = [None] * len(groups)
        for index, outcome in zip(allowed, outcomes, strict=True):
            if isinstance(outcome, ChuteError):
                failed.append(m.PublishFailure(group=index, error=self.conn.error_body(outcome)))
            else:
                ids[index] = outcome
        flat = []
        for group_ids, (_, messages) in zip(ids, groups, strict=True):
            flat += group_ids if group_ids is not None else [0] * len(messages)
        failed.sort(key=lambda failure: failure.group)
        return m.PublishReply(ids=flat, failed=failed or None)

    async def _consume(self, request: m.ConsumeRequest) -> m.ConsumeReply:
        prefetch = request.prefetch
        if isinstance(prefetch, bool) or not 1 <= prefetch <= 100_000:
            raise InvalidArgument(f"prefetch must be from 1 to 100000, got {prefetch!r}")
        if not 1 <= request.consumer <= 2**31 or request.consumer in self.consumers:
            raise InvalidArgument(f"consumer id {request.consumer} is out of range or already in use")
        if self.closed:  # the connection ended before this request ran: nobody would stop the consumer
            raise BrokerClosed("the connection is closed")
        self.broker._check()
        if request.topic is None:
            if not getattr(self.broker, "routed", False):
                self.broker.core.queue(request.queue)  # QueueNotFound now rather than in the consumer
            else:  # a cluster's router: asks the queue's shard
                await _awaited(self.broker.queue_stats(request.queue))
            consumer = ServerConsumer(self, request.consumer, request.queue, prefetch, request.lease_s)
        elif request.queue:
            raise InvalidArgument("CONSUME takes a queue or a topic (an ephemeral subscription), not both")
        else:
            queue = self.broker.ephemeral_subscription(request.topic, request.pattern, filter=request.filter)
            queue = await _awaited(queue)
            if self.closed:
                self.broker.end_ephemeral(queue)
                raise BrokerClosed("the connection is closed")
            consumer = ServerConsumer(self, request.consumer, queue, prefetch, None, ephemeral=True)
        self.consumers[consumer.id] = consumer
        consumer.start()
        return m.ConsumeReply(consumer=consumer.id, queue=consumer.queue if consumer.ephemeral else None)

    async def _cancel(self, request: m.CancelRequest) -> m.Empty:
        consumer = self.consumers.pop(request.consumer, None)
        if consumer is None:
            raise ConsumerNotFound(f"no consumer {request.consumer} on this connection")
        consumer.stop()
        return m.Empty()

    async def _receive(self, request: m.ReceiveRequest) -> m.ReceiveReply:
        max_frame = self.server.config.max_frame_bytes
        deliveries = await self.broker.receive(
            request.queue, request.max_messages, wait_s=request.wait_s, lease_s=request.lease_s,
            max_bytes=body_budget(max_frame),
        )  # fmt: skip
        count = fitting(deliveries, max_frame)
        if count < len(deliveries):  # large headers: the reply is one frame, so the rest goes back at once
            self.broker.release(request.queue, [d.receipt for d in deliveries[count:] if d.receipt])
            deliveries = deliveries[:count]
        if self.closed:
            self.broker.release(request.queue, [d.receipt for d in deliveries if d.receipt])
        else:
            self.track(request.queue, [d.receipt for d in deliveries if d.receipt])
        return m.ReceiveReply(deliveries=deliveries)

    def _answer_error(self, exc: BaseException, corr: int, op: str) -> None:
        """Answer request `corr` with the error that ended it (as `_request` does)."""
        if isinstance(exc, ChuteError):
            self.write_error(exc, corr)
        else:
            log.error("request %s from %s failed", op, self.peer, exc_info=exc)
            self.write_error(ChuteError(f"internal error: {type(exc).__name__}"), corr)

    def _ack_now(self, frame: Frame) -> None:
        """ACK, the request a busy consumer sends most, without a task: acked now, answered (by a callback on
        the store's future) once the acks are durable, never before."""
        corr, request = frame.correlation_id, frame.body
        try:
            if not self.principal.superuser:
                self._permit(Op.ACK, request)
            self._settled(request.queue, request.receipts)
            token, unknown = self.broker._ack(request.queue, request.receipts, dead_lettered=request.dead_lettered)
        except Exception as exc:
            self._answer_error(exc, corr, "ACK")
            return
        if isinstance(token, asyncio.Future):
            token.add_done_callback(functools.partial(self._acked, corr, unknown))
        elif token is None:
            self._acked(corr, unknown, None)
        else:  # a store whose token is not a future: a task waits for it
            task = asyncio.ensure_future(self._ack_durable(token, corr, unknown))
            self.requests.add(task)
            task.add_done_callback(self.requests.discard)

    async def _ack_durable(self, token, corr: int, unknown: list[int]) -> None:
        try:
            await self.broker._wait_for(token)
        except ChuteError as exc:
            self.write_error(exc, corr)
            return
        self._acked(corr, unknown, None)

    def _acked(self, corr: int, unknown: list[int], done: asyncio.Future | None) -> None:
        """The acks of request `corr` are durable (or failed): answer it."""
        error = None if done is None else _outcome(done)
        if error is None and unknown:
            error = unknown_receipts(unknown, "acked")
        if error is None:
            self.write(Op.REPLY, m.Empty(), corr)
        else:
            self._answer_error(error, corr, "ACK")

    async def _ack(self, request: m.AckRequest) -> m.Empty:
        self._settled(request.queue, request.receipts)
        await self.broker.ack(request.queue, request.receipts, dead_lettered=request.dead_lettered)
        return m.Empty()

    async def _nack(self, request: m.NackRequest) -> m.Empty:
        self._settled(request.queue, request.receipts)
        await self.broker.nack(request.queue, request.receipts, delay_s=request.delay_s,
                               dead_letter=request.dead_letter)  # fmt: skip
        return m.Empty()

    async def _extend(self, request: m.ExtendRequest) -> m.Empty:
        await self.broker.extend(request.queue, request.receipts, request.lease_s)
        return m.Empty()

    async def _call(self, request: m.CallRequest) -> m.CallReply:
        check_call(request.method, request.args)
        result = getattr(self.broker, request.method)(**request.args)
        if inspect.isawaitable(result):
            result = await result
        if request.method == "peek":  # browsing leases nothing: return what fits one frame
            result = result[: fitting(result, self.server.config.max_frame_bytes)] if result else result
        elif request.method in ("list_queues", "list_topics") and not self.principal.superuser:
            kind = "queue" if request.method == "list_queues" else "topic"
            result = [each for each in result if self.principal.can_see(kind, each.name)]
        return m.CallReply(result=result)


async def _awaited(value):
    """`value`, awaited if it is awaitable (a cluster's router answers remote questions asynchronously)."""
    return await value if inspect.isawaitable(value) else value


def _outcome(done: asyncio.Future) -> BaseException | None:
    """The error a store's future ended with (None: durable)."""
    return BrokerClosed("the server is shutting down") if done.cancelled() else done.exception()


def _name(kind: str, key: str = "name", permission: str = "manage"):
    return lambda args: [(permission, kind, args[key])]


# What each CALL needs: (permission, kind, name) triples; "see" is any permission (lists are filtered instead).
CALL_PERMISSIONS = {
    "create_queue": _name("queue"), "update_queue": _name("queue"), "delete_queue": _name("queue"),
    "purge_queue": _name("queue"), "redrive": _name("queue", "queue"),
    "queue_stats": _name("queue", permission="see"), "peek": _name("queue", "queue", "consume"),
    "create_topic": _name("topic"), "update_topic": _name("topic"), "delete_topic": _name("topic"),
    "subscribe": lambda args: [("manage", "topic", args["topic"]), ("manage", "queue", args["queue"])],
    "update_subscription": lambda args: [("manage", "topic", args["topic"]), ("manage", "queue", args["queue"])],
    "unsubscribe": lambda args: [("manage", "topic", args["topic"]), ("manage", "queue", args["queue"])],
    "list_queues": lambda args: [], "list_topics": lambda args: [],
    "topic_info": _name("topic", permission="see"), "queue_info": _name("queue", permission="see"),
    "route": _name("topic", "topic", "see"), "dead_letter_sources": _name("queue", permission="see"),
}  # fmt: skip


HANDLERS = {
    Op.PUBLISH: Session._publish,
    Op.CONSUME: Session._consume,
    Op.CANCEL: Session._cancel,
    Op.RECEIVE: Session._receive,
    Op.ACK: Session._ack,
    Op.NACK: Session._nack,
    Op.EXTEND: Session._extend,
    Op.CALL: Session._call,
}


def _release_late(broker, queue: str, fetch: asyncio.Future) -> None:
    """A routed consumer's poll that ended after its consumer stopped: release what it leased."""
    if not fetch.cancelled() and fetch.exception() is None and fetch.result():
        broker.release(queue, [delivery.receipt for delivery in fetch.result() if delivery.receipt])
