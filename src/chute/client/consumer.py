"""`AsyncConsumer`: a push consumer over the network, `async for delivery in client.consume("jobs")`.

The server sends deliveries while this consumer has fewer than `prefetch` unsettled; acks and nacks (through
the consumer or the client) return credit. After a reconnect the client starts the consumer again on the new
connection: deliveries received before the break were released by the server and will come again, so acking
them raises InvalidReceipt (at-least-once: the message is not lost, it is delivered again).

An ephemeral consumer (`client.subscribe_ephemeral(topic, pattern)`) consumes a subscription the broker makes for
it and ends with it: when it is closed, when the client closes, when the connection breaks. Its deliveries are
at most once (receipt 0: nothing to ack); after a reconnect a new subscription is made, and what was published
in between is not delivered.

Invariant: `_buffer` holds deliveries received and not yet yielded; closing nacks them at once (they go back to
the queue without waiting for their lease).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from chute.errors import ChuteError, InvalidArgument
from chute.model import Delivery

if TYPE_CHECKING:
    from chute.client.aio import AsyncClient

log = logging.getLogger("chute.client")
# Deliveries an ephemeral consumer buffers at most: they take no credit, so the broker sends them as fast as the
# connection carries them; a reader that falls behind loses the oldest (at most once), counted in `dropped`, as a
# NATS subscription past its pending limit does, instead of growing without bound.
EPHEMERAL_MAX_BUFFERED = 65_536


class AsyncConsumer:
    """Async iterator of deliveries from one queue; `close()` (or `async with`) ends it."""

    def __init__(self, client: AsyncClient, queue: str, prefetch: int, lease_s: float | None, *,
                 topic: str | None = None, pattern: str = ">", filter: dict | None = None) -> None:  # fmt: skip
        self.client = client
        self.queue = queue
        """The queue consumed; for an ephemeral subscription, its private queue (a new one after a reconnect)."""
        self.topic = topic
        """Set for an ephemeral subscription: the topic, with `pattern` and `filter`."""
        self.pattern = pattern
        self.filter = filter
        self.dropped = 0
        """Ephemeral consumers: deliveries dropped, oldest first, because more than EPHEMERAL_MAX_BUFFERED waited."""
        self.prefetch = prefetch
        self.lease_s = lease_s
        self.server_id: int | None = None
        self.closed = False
        self.error: ChuteError | None = None
        self._buffer: deque[Delivery] = deque()
        self._waiters: list[asyncio.Future] = []  # readers waiting for a delivery or the end (`_wake`)
        self._runner: asyncio.Task | None = None

    def __aiter__(self) -> AsyncConsumer:
        return self

    def __len__(self) -> int:
        """How many deliveries have arrived and not been taken yet (what `get_many` returns at once)."""
        return len(self._buffer)

    def __bool__(self) -> bool:
        return True  # a consumer is a consumer, even with nothing buffered

    async def __anext__(self) -> Delivery:
        while not self._buffer:
            if self.error is not None:
                raise self.error
            if self.closed:
                raise StopAsyncIteration
            # (a future of its own per waiting reader, as asyncio.Event makes, without its per-call overhead)
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:  # cancelled (a `get` timed out): no longer waiting
                with contextlib.suppress(ValueError):  # (unless `_wake` took it already)
                    self._waiters.remove(waiter)
                raise
        return self._buffer.popleft()

    def _wake(self) -> None:
        """Every waiting reader looks again (a delivery came, or the consumer ended)."""
        waiters = self._waiters
        if waiters:
            self._waiters = []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def get(self, timeout: float | None = None) -> Delivery | None:
        """The next delivery, or None after `timeout` seconds without one (or when the consumer is closed)."""
        try:
            if timeout is None:  # (no timeout context: its scheduling costs more than the wait for a delivery)
                return await self.__anext__()
            async with asyncio.timeout(timeout):
                return await self.__anext__()
        except (TimeoutError, StopAsyncIteration):
            return None

    async def get_many(self, max_n: int, timeout: float | None = None) -> list[Delivery]:
        """Up to `max_n` deliveries: at once what has arrived; if nothing has, wait up to `timeout` seconds (None:
        no limit) for the first and return it with whatever came with it. [] after `timeout`, or when the consumer
        is closed. Raises the error that ended the consumer (e.g. ConnectionLost without reconnect)."""
        if isinstance(max_n, bool) or not isinstance(max_n, int) or max_n < 1:
            raise InvalidArgument(f"max_n must be a positive integer, got {max_n!r}")
        batch: list[Delivery] = []
        if not self._buffer:
            first = await self.get(timeout)
            if first is None:
                return batch
            batch.append(first)
        buffer = self._buffer
        while buffer and len(batch) < max_n:
            batch.append(buffer.popleft())
        return batch

    def _feed(self, deliveries: list[Delivery]) -> None:
        buffer = self._buffer
        buffer.extend(deliveries)
        if self.topic is not None and len(buffer) > EPHEMERAL_MAX_BUFFERED:
            excess = len(buffer) - EPHEMERAL_MAX_BUFFERED
            if not self.dropped:
                log.warning("ephemeral subscription of %s %s: the reader fell behind by more than %d messages; the "
                            "oldest are dropped (see consumer.dropped)", self.topic, self.pattern,
                            EPHEMERAL_MAX_BUFFERED)  # fmt: skip
            for _ in range(excess):
                buffer.popleft()
            self.dropped += excess
        self._wake()

    async def _put_back(self, deliveries: list[Delivery]) -> None:
        """Deliveries taken and not handed to the application (the blocking iterator stopped): first again, or
        back to the queue at once if the consumer was closed meanwhile."""
        if self.closed:
            with contextlib.suppress(ChuteError):
                await self.client.nack(deliveries)
            return
        self._buffer.extendleft(reversed(deliveries))
        self._wake()

    def _end(self, error: ChuteError | None) -> None:
        self.error = error
        self.closed = True
        self._wake()

    def _reset(self) -> None:
        """The connection broke: what was buffered was released by the server."""
        self._buffer.clear()
        self.server_id = None

    async def ack(self, deliveries: Delivery | Sequence[Delivery]) -> None:
        await self.client.ack(deliveries)

    def ack_nowait(self, deliveries: Delivery | Sequence[Delivery]) -> asyncio.Future[None]:
        """Ack without waiting (see AsyncClient.ack_nowait): a future, done once the acks are durable."""
        return self.client.ack_nowait(deliveries)

    async def nack(self, deliveries: Delivery | Sequence[Delivery], *, delay_s: float = 0.0,
                   dead_letter: bool = False) -> None:  # fmt: skip
        await self.client.nack(deliveries, delay_s=delay_s, dead_letter=dead_letter)

    async def extend(self, deliveries: Delivery | Sequence[Delivery], lease_s: float) -> None:
        await self.client.extend(deliveries, lease_s)

    def run(self, callback: Callable[[Delivery], Awaitable[None]]) -> asyncio.Task:
        """Call `callback` for each delivery in a background task: ack when it returns (without waiting for the
        ack: `ack_nowait`, so the next delivery is handled meanwhile; `client.flush()` waits for the acks), nack
        (requeue now) when it raises. Returns the task; it ends when the consumer is closed."""

        async def loop() -> None:
            async for delivery in self:
                try:
                    await callback(delivery)
                except Exception:
                    log.exception("consumer callback failed on message %s; nacking it", delivery.id)
                    with contextlib.suppress(ChuteError):
                        await self.nack(delivery)
                else:
                    with contextlib.suppress(ChuteError):  # the client is closed: it will be delivered again
                        self.ack_nowait(delivery)  # a failed ack is logged (and the message comes again)

        self._runner = asyncio.get_running_loop().create_task(loop())
        return self._runner

    async def close(self) -> None:
        """Stop the consumer; deliveries received but not yet yielded go back to the queue at once."""
        if self.closed and self.server_id is None:
            return
        self.closed = True
        self._wake()
        await self.client._cancel_consumer(self)
        unyielded, self._buffer = list(self._buffer), deque()
        if unyielded:
            with contextlib.suppress(ChuteError):
                await self.client.nack(unyielded)
        if self._runner is not None and self._runner is not asyncio.current_task():
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner

    async def __aenter__(self) -> AsyncConsumer:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
