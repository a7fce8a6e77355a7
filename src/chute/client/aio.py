"""`AsyncClient`: the asyncio client of the native protocol.

    async with chute.AsyncClient("chute://127.0.0.1:6160") as client:
        await client.create_queue("jobs", max_deliveries=5)
        await client.publish("jobs", b"hello")          # returns the id once the broker made it durable
        async for delivery in client.consume("jobs"):
            ...; await client.ack(delivery)

Contract:
- Every call has a timeout (`timeout=` per client, default 30 s) and raises RequestTimeout when it passes; the
  request may still be carried out by the broker.
- `publish` returns only after the broker confirmed the message durable. Calls made close together are batched
  into one frame: with nothing in flight, what is published in one turn of the event loop leaves at the end of
  that turn; later ones wait up to `linger_s` (or until `max_batch` messages) while an earlier batch is in
  flight, like a Kafka producer. `publish_batch` sends its messages as one frame.
- `ack_nowait` returns a future at once; acks made close together share ACK requests, at most
  `max_acks_in_flight` of them outstanding (client/_acks.py). `flush()` waits for every publish and ack.
- When the connection breaks, the client reconnects with exponential backoff (0.05 s doubling to 5 s) and
  starts its consumers again. Calls in flight at the break fail with ConnectionLost (retryable: a publish with a
  dedup id is safe to retry); calls made while reconnecting wait for the new connection within their timeout.
  The broker released every delivery of the broken connection that was not acked: it is delivered again (to
  this client's restarted consumers or to others), so a dropped connection means redelivery, never loss.
- Credentials come from the URL (`chute://user:password@host`, `chute://TOKEN@host`) or the `user=`/`password=`/
  `token=` arguments; `chutes://` connects with TLS, verifying the server's certificate and host name against the
  system's CAs, or the PEM file `tls_ca=` (default $CHUTE_TLS_CA).
- Errors are the ChuteError subclasses of `chute.errors`, with the broker's stable codes.

Invariant: one `Link` at a time; requests are only written to an open link.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
import socket
import ssl
from collections.abc import Sequence
from typing import Any, TypeVar

import msgspec

from chute.client._acks import Acks
from chute.client._publisher import Publisher, checked_body
from chute.client.consumer import AsyncConsumer
from chute.client.link import Link, refusal
from chute.client.url import parse, resolve_url
from chute.errors import (
    BrokerClosed,
    ChuteError,
    ConnectionLost,
    InvalidArgument,
    QueueNotFound,
    RequestTimeout,
    TopicNotFound,
)
from chute.model import (
    Delivery,
    Publish,
    QueueInfo,
    QueueStats,
    SubscriptionInfo,
    TopicInfo,
)
from chute.protocol import messages as m
from chute.protocol.frames import Op
from chute.protocol.sizes import publish_size

log = logging.getLogger("chute.client")
T = TypeVar("T")

BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 5.0


def client_tls_context(cafile: str | None) -> ssl.SSLContext:
    """TLS 1.2+, certificate and host name verified against the system's CAs, or only `cafile` if given."""
    try:
        context = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidArgument(f"cannot load the CA file {cafile}: {getattr(exc, 'strerror', None) or exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class AsyncClient:
    """A connection to a Chute broker, for asyncio code. Use `async with AsyncClient(url) as client:` or
    `client = await AsyncClient(url).connect()` ... `await client.close()`."""

    def __init__(
        self,
        url: str | None = None,
        *,
        token: str | None = None,
        user: str | None = None,
        password: str | None = None,
        tls_ca: str | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
        reconnect: bool = True,
        linger_s: float = 0.002,
        max_batch: int = 1000,
        heartbeat_s: float = 10.0,
        name: str = "",
        max_acks_in_flight: int = 8,
    ) -> None:
        self.url = resolve_url(url)
        parsed = parse(self.url)
        self.host, self.port = parsed.host, parsed.port
        self.token = token if token is not None else parsed.token
        self.user = user if user is not None else parsed.user
        self.password = password if password is not None else parsed.password
        self.ssl = client_tls_context(tls_ca or os.environ.get("CHUTE_TLS_CA") or None) if parsed.tls else None
        for key, value in (("timeout", timeout), ("connect_timeout", connect_timeout), ("heartbeat_s", heartbeat_s)):
            if not 0 < value <= 86400:
                raise InvalidArgument(f"{key} must be a positive number of seconds, got {value!r}")
        if not 0 <= linger_s <= 1 or not 1 <= max_batch <= 100_000:
            raise InvalidArgument("linger_s must be 0..1 s and max_batch 1..100000")
        if isinstance(max_acks_in_flight, bool) or not isinstance(max_acks_in_flight, int) \
                or not 1 <= max_acks_in_flight <= 1000:  # fmt: skip
            raise InvalidArgument(f"max_acks_in_flight must be 1..1000, got {max_acks_in_flight!r}")
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.reconnect = reconnect
        self.linger_s = linger_s
        self.max_batch = max_batch
        self.heartbeat_s = heartbeat_s
        self.name = name
        self.closed = False
        self.connections = 0  # how many links were opened (1 + reconnects)
        self._link: Link | None = None
        self._connected = asyncio.Event()
        self._supervisor: asyncio.Task | None = None
        self._consumers: dict[int, AsyncConsumer] = {}  # by server consumer id, on the current link
        self._all_consumers: set[AsyncConsumer] = set()
        self._consumer_ids = itertools.count(1)
        self._publisher = Publisher(self, linger_s, max_batch)
        self._fatal: ChuteError | None = None
        self._acks = Acks(self, max_acks_in_flight)

    # -- connection -----------------------------------------------------------------------------------------

    async def connect(self) -> AsyncClient:
        """Open the connection (raises if the broker cannot be reached or refuses us)."""
        if self._link is None:
            await self._open()
            self._supervisor = asyncio.get_running_loop().create_task(self._supervise())
        return self

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def server_info(self) -> m.Welcome | None:
        """What the broker said in the handshake of the current connection: protocol `version`, `server` name and
        version, `heartbeat_s`, `max_frame_bytes`, `max_message_bytes`, and `fsync`, its fsync policy ("always":
        a publish or ack confirm means fsynced; "interval", "never"; None from a broker before Chute 0.2).
        None before `connect()`."""
        return self._link.conn.welcome if self._link is not None else None

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, link = await loop.create_connection(
                    lambda: Link(on_deliver=self._on_deliver, heartbeat_s=self.heartbeat_s),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                )
                sock = link.transport.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                link.start(self.token, self.name, self.user, self.password)
                await link.ready
        except TimeoutError:
            raise ConnectionLost(f"could not connect to {self.url} within {self.connect_timeout} s") from None
        except ssl.SSLCertVerificationError as exc:
            raise ConnectionLost(
                f"TLS: the certificate of {self.host} is not trusted ({exc.verify_message}); give the CA's "
                "certificate with tls_ca= (CLI: --tls-ca, or $CHUTE_TLS_CA)"
            ) from None
        except ssl.SSLError as exc:
            raise ConnectionLost(f"TLS with {self.url} failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise ConnectionLost(f"could not connect to {self.url}: {exc.strerror or exc}") from None
        self._link = link
        self._publisher.connected(loop, link.conn.version)
        self.connections += 1
        self._connected.set()

    async def _supervise(self) -> None:
        """Wait for the link to end; reconnect with backoff and restart consumers, until closed."""
        while not self.closed:
            link = self._link
            error = await link.lost
            self._connected.clear()
            self._acks.connection_lost(error)
            self._consumers.clear()
            for consumer in self._all_consumers:
                consumer._reset()
            self._publisher.connection_lost()
            if self.closed:
                return
            if not self.reconnect or refusal(error):
                self._fatal = error
                for consumer in list(self._all_consumers):
                    consumer._end(error)
                self._connected.set()  # wake waiters so they see the error
                return
            log.warning("connection to %s lost (%s); reconnecting", self.url, error.message)
            delay = BACKOFF_FIRST_S
            while not self.closed:
                try:
                    await self._open()
                    break
                except ChuteError as exc:
                    if refusal(exc):
                        self._fatal = exc
                        for consumer in list(self._all_consumers):
                            consumer._end(exc)
                        self._connected.set()
                        return
                    await asyncio.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, BACKOFF_MAX_S)
            for consumer in list(self._all_consumers):
                if not consumer.closed:
                    with contextlib.suppress(ChuteError):
                        await self._start_consumer(consumer)

    async def _ready_link(self, deadline: float) -> Link:
        while True:
            if self._fatal is not None:
                raise self._fatal
            if self.closed:
                raise BrokerClosed("the client is closed")
            link = self._link
            if link is not None and link.open and self._connected.is_set():
                return link
            if link is None:
                raise ConnectionLost("not connected: call connect() or use `async with`")
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise RequestTimeout("no connection to the broker within the timeout")
            try:
                async with asyncio.timeout(remaining):
                    await self._connected.wait()
                    if not (self._link.open or self._fatal):
                        await asyncio.sleep(0.01)
            except TimeoutError:
                raise RequestTimeout("no connection to the broker within the timeout") from None

    async def _call(self, op: Op, payload, kind: type[T], timeout: float | None = None) -> T:
        loop = asyncio.get_running_loop()
        timeout = self.timeout if timeout is None else timeout
        deadline = loop.time() + timeout
        link = await self._ready_link(deadline)
        return await link.request(op, payload, kind, deadline, timeout)

    async def close(self) -> None:
        """Send pending publishes, stop consumers and close the connection. Idempotent."""
        if self.closed:
            return
        with contextlib.suppress(ChuteError):
            await self.flush()
        for consumer in list(self._all_consumers):
            with contextlib.suppress(ChuteError):
                await consumer.close()
        self.closed = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        if self._link is not None:
            self._link.close()
            await self._link.wait_closed()
        self._connected.set()

    # -- management -----------------------------------------------------------------------------------------

    async def _manage(self, method: str, kind: Any, **args) -> Any:
        reply = await self._call(Op.CALL, m.CallRequest(method=method, args=args), m.CallReply)
        try:
            return msgspec.convert(reply.result, kind) if kind is not None else None
        except msgspec.ValidationError as exc:
            raise ChuteError(f"unexpected reply to {method}: {exc}") from None

    async def create_queue(self, name: str, **settings) -> QueueInfo:
        """Create a queue (idempotent with the same settings; QueueExists with others). Settings are the
        fields of `chute.QueueSettings`: lease_s, max_deliveries, dead_letter_queue, delay_s, retention_s,
        on_expiry, max_length, max_bytes, overflow, rate_limit, rate_burst, dedup_window_s, fifo, tags,
        attributes."""
        return await self._manage("create_queue", QueueInfo, name=name, **settings)

    async def update_queue(self, name: str, **changes) -> QueueInfo:
        """Change some settings of a queue."""
        return await self._manage("update_queue", QueueInfo, name=name, **changes)

    async def delete_queue(self, name: str, *, missing_ok: bool = False) -> None:
        """Delete a queue with its messages and the subscriptions that feed it. QueueNotFound if there is no such
        queue, unless `missing_ok`."""
        try:
            await self._manage("delete_queue", None, name=name)
        except QueueNotFound:
            if not missing_ok:
                raise

    async def purge_queue(self, name: str) -> int:
        """Remove every message of the queue that is not in flight; return how many."""
        return await self._manage("purge_queue", int, name=name)

    async def list_queues(self) -> list[QueueInfo]:
        return await self._manage("list_queues", list[QueueInfo])

    async def queue_stats(self, name: str) -> QueueStats:
        """Depth (ready, in flight, delayed, bytes) and counters of a queue."""
        return await self._manage("queue_stats", QueueStats, name=name)

    async def create_topic(self, name: str, **settings) -> TopicInfo:
        """Create a topic (idempotent with the same settings): retention_s, retention_bytes, dedup_window_s."""
        return await self._manage("create_topic", TopicInfo, name=name, **settings)

    async def update_topic(self, name: str, **changes) -> TopicInfo:
        """Change some settings of a topic (retention_s, retention_bytes, dedup_window_s); a lower retention
        trims retained messages at once."""
        return await self._manage("update_topic", TopicInfo, name=name, **changes)

    async def delete_topic(self, name: str, *, missing_ok: bool = False) -> None:
        """Delete a topic and its subscriptions (their queues stay). TopicNotFound if there is no such topic,
        unless `missing_ok`."""
        try:
            await self._manage("delete_topic", None, name=name)
        except TopicNotFound:
            if not missing_ok:
                raise

    async def list_topics(self) -> list[TopicInfo]:
        return await self._manage("list_topics", list[TopicInfo])

    async def subscribe(self, topic: str, pattern: str, queue: str, *, filter: dict | None = None,
                        start: str | float = "now") -> SubscriptionInfo:  # fmt: skip
        """Route messages of `topic` whose subject matches `pattern` (and headers match `filter`) to `queue`.
        `start`: "now", "earliest" or a timestamp, to receive retained messages."""
        return await self._manage("subscribe", SubscriptionInfo, topic=topic, pattern=pattern, queue=queue,
                                  filter=filter, start=start)  # fmt: skip

    async def update_subscription(self, topic: str, pattern: str, queue: str, *,
                                  filter: dict | None = None) -> SubscriptionInfo:  # fmt: skip
        """Replace the header filter of the subscription binding `pattern` on `topic` to `queue` (None: no filter);
        subscription_not_found if there is no such binding."""
        return await self._manage("update_subscription", SubscriptionInfo, topic=topic, pattern=pattern,
                                  queue=queue, filter=filter)  # fmt: skip

    async def unsubscribe(self, topic: str, pattern: str, queue: str) -> None:
        await self._manage("unsubscribe", None, topic=topic, pattern=pattern, queue=queue)

    async def peek(self, queue: str, max_messages: int = 10) -> list[Delivery]:
        """Browse messages in delivery order without leasing them."""
        return await self._manage("peek", list[Delivery], queue=queue, max_messages=max_messages)

    async def redrive(self, queue: str, max_messages: int | None = None) -> int:
        """Move dead-lettered messages of `queue` back to where they came from; return how many."""
        return await self._manage("redrive", int, queue=queue, max_messages=max_messages)

    # -- publish --------------------------------------------------------------------------------------------

    async def publish(
        self,
        dest: str,
        body: bytes,
        *,
        headers: dict[str, str] | None = None,
        priority: int = 0,
        delay_s: float | None = None,
        ttl_s: float | None = None,
        group: str | None = None,
        dedup_id: str | None = None,
        subject: str | None = None,
        timeout: float | None = None,
    ) -> int:
        """Publish one message to a queue or topic; return its id once the broker has made it durable."""
        message = Publish(body=checked_body(body), headers=headers, priority=priority, delay_s=delay_s, ttl_s=ttl_s,
                          group=group, dedup_id=dedup_id, subject=subject)  # fmt: skip
        future = self._publisher.add(dest, message, publish_size(message))
        timeout = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(future)
        except TimeoutError:
            # the caller hears of it now; the message's own outcome, later, is nobody's to log
            future.add_done_callback(lambda done: done.cancelled() or done.exception())
            raise RequestTimeout(f"publish not confirmed within {timeout} s") from None

    def publish_nowait(self, dest: str, body: bytes, **options) -> asyncio.Future[int]:
        """Queue one message for the next batch and return a future of its id (set once durable); options as for
        `publish`. The fast way to publish many: call it for each message, then `await flush()` once (or await the
        futures). An unawaited failure is logged by asyncio."""
        return self._publisher.publish_nowait(dest, body, options)

    async def publish_batch(self, dest: str, messages: Sequence[Publish | bytes],
                            *, timeout: float | None = None) -> list[int]:  # fmt: skip
        """Publish messages in order as one request (split into several frames only if they exceed the
        frame size); return their ids once all are durable."""
        return await self._publisher.publish_batch(dest, messages, timeout)

    async def flush(self) -> None:
        """Send every batched publish now and wait until every publish made before the call is confirmed (or
        failed), and every `ack_nowait` is answered. Errors stay on the futures."""
        await self._publisher.flush()
        await self._acks.flush()

    # -- consume --------------------------------------------------------------------------------------------

    async def receive(self, queue: str, max_messages: int = 1, *, wait_s: float = 0.0,
                      lease_s: float | None = None) -> list[Delivery]:  # fmt: skip
        """Lease up to `max_messages`, waiting up to `wait_s` for the first (long poll); [] if none came."""
        request = m.ReceiveRequest(queue=queue, max_messages=max_messages, wait_s=wait_s, lease_s=lease_s)
        timeout = max(self.timeout, wait_s + self.timeout) if isinstance(wait_s, int | float) else None
        reply = await self._call(Op.RECEIVE, request, m.ReceiveReply, timeout)
        return reply.deliveries

    async def consume(self, queue: str, *, prefetch: int = 100, lease_s: float | None = None) -> AsyncConsumer:
        """Start a push consumer: `async for delivery in await client.consume("jobs")`. At most `prefetch`
        deliveries are unsettled at a time; settle them with `client.ack` / `nack`."""
        consumer = AsyncConsumer(self, queue, prefetch, lease_s)
        await self._start_consumer(consumer)
        self._all_consumers.add(consumer)
        return consumer

    async def subscribe_ephemeral(self, topic: str, pattern: str = ">", *, filter: dict | None = None,
                                  prefetch: int = 100) -> AsyncConsumer:  # fmt: skip
        """A push consumer of a subscription that lives as long as the consumer: messages of `topic` whose subject
        matches `pattern` (and headers match `filter`) published from now on, until `close()` (or the client's
        close, or the connection's end). At most once: deliveries have receipt 0 and need no ack; nothing is
        kept while nobody listens (after a reconnect a new subscription starts). Such deliveries take no credit:
        `prefetch` only bounds how many travel in one DELIVER batch, and a reader more than
        `consumer.EPHEMERAL_MAX_BUFFERED` deliveries behind loses the oldest (`consumer.dropped`). Needs the
        `consume` permission on the topic; TopicNotFound, InvalidName (pattern), InvalidArgument (filter)."""
        consumer = AsyncConsumer(self, "", prefetch, None, topic=topic, pattern=pattern, filter=filter)
        await self._start_consumer(consumer)
        self._all_consumers.add(consumer)
        return consumer

    async def _start_consumer(self, consumer: AsyncConsumer) -> None:
        consumer_id = next(self._consumer_ids)
        request = m.ConsumeRequest(consumer=consumer_id, queue=consumer.queue, prefetch=consumer.prefetch,
                                   lease_s=consumer.lease_s)  # fmt: skip
        if consumer.topic is not None:
            request.queue, request.topic = "", consumer.topic
            request.pattern, request.filter = consumer.pattern, consumer.filter
        self._consumers[consumer_id] = consumer  # before the request: DELIVER may follow the reply at once
        consumer.server_id = consumer_id
        try:
            try:
                reply = await self._call(Op.CONSUME, request, m.ConsumeReply)
            except QueueNotFound:
                if consumer.topic is None:
                    raise
                reply = m.ConsumeReply(consumer=consumer_id)  # a broker that ignored `topic` and looked for ""
            if consumer.topic is not None:
                if reply.queue is None:  # a broker from before ephemeral subscriptions over the network
                    raise ChuteError("this broker has no ephemeral subscriptions over the network (upgrade it)")
                consumer.queue = reply.queue
        except BaseException:
            self._consumers.pop(consumer_id, None)
            consumer.server_id = None
            raise

    async def _cancel_consumer(self, consumer: AsyncConsumer) -> None:
        self._all_consumers.discard(consumer)
        server_id, consumer.server_id = consumer.server_id, None
        if server_id is not None and self._consumers.pop(server_id, None) is not None:
            link = self._link
            if link is not None and link.open:
                with contextlib.suppress(ChuteError):
                    await self._call(Op.CANCEL, m.CancelRequest(consumer=server_id), m.Empty)

    def _on_deliver(self, deliver: m.Deliver) -> None:
        consumer = self._consumers.get(deliver.consumer)
        if consumer is None:
            return  # cancelled meanwhile: what it got is released when settled or when we disconnect
        if deliver.deliveries:
            consumer._feed(deliver.deliveries)
        if deliver.end is not None:
            from chute.protocol.connection import error_from

            self._consumers.pop(deliver.consumer, None)
            self._all_consumers.discard(consumer)
            consumer.server_id = None
            consumer._end(error_from(deliver.end))

    # -- settle ---------------------------------------------------------------------------------------------

    async def ack(self, deliveries: Delivery | Sequence[Delivery]) -> None:
        """Ack deliveries (of one or several queues); returns once the acks are durable. Receipts no longer
        leased (lease ended, connection broke since) raise InvalidReceipt after the others were acked."""
        for queue, receipts in _by_queue(deliveries).items():
            await self._call(Op.ACK, m.AckRequest(queue=queue, receipts=receipts), m.Empty)

    async def nack(self, deliveries: Delivery | Sequence[Delivery], *, delay_s: float = 0.0,
                   dead_letter: bool = False) -> None:  # fmt: skip
        """Give deliveries back: ready again now, after `delay_s`, or dead-lettered (reason `rejected`)."""
        for queue, receipts in _by_queue(deliveries).items():
            request = m.NackRequest(queue=queue, receipts=receipts, delay_s=delay_s, dead_letter=dead_letter)
            await self._call(Op.NACK, request, m.Empty)

    async def extend(self, deliveries: Delivery | Sequence[Delivery], lease_s: float) -> None:
        """Make the leases of deliveries end `lease_s` seconds from now."""
        for queue, receipts in _by_queue(deliveries).items():
            await self._call(Op.EXTEND, m.ExtendRequest(queue=queue, receipts=receipts, lease_s=lease_s), m.Empty)

    def ack_nowait(self, deliveries: Delivery | Sequence[Delivery]) -> asyncio.Future[None]:
        """Ack deliveries without waiting: returns a future that is done once the acks are durable (or with
        their error: InvalidReceipt naming the receipts no longer leased, ConnectionLost, ...). Acks made while
        `max_acks_in_flight` ACK requests are outstanding gather and go together when one is answered. A failed
        ack means the message will be delivered again; failures are logged. Cancelling the future before its
        request left withdraws the ack. `flush()` (and `close()`) wait for all of them."""
        if self.closed:
            raise BrokerClosed("the client is closed")
        return self._acks.add(_by_queue(deliveries))

    async def ack_receipts(self, queue: str, receipts: Sequence[int]) -> None:
        """Ack by receipt numbers (when deliveries were passed around as plain data)."""
        await self._call(Op.ACK, m.AckRequest(queue=queue, receipts=list(receipts)), m.Empty)


def _by_queue(deliveries: Delivery | Sequence[Delivery]) -> dict[str, list[int]]:
    if isinstance(deliveries, Delivery):
        deliveries = [deliveries]
    grouped: dict[str, list[int]] = {}
    queue, receipts = None, []  # the run of the current queue (an ack batch is mostly one queue's deliveries)
    for delivery in deliveries:
        if type(delivery) is not Delivery and not isinstance(delivery, Delivery):
            raise InvalidArgument(f"expected Delivery objects, got {type(delivery).__name__}")
        if delivery.receipt:
            if delivery.queue != queue:
                queue = delivery.queue
                receipts = grouped.setdefault(queue, [])
            receipts.append(delivery.receipt)
    return grouped
