"""`Consumer`: a push-style consumer with a prefetch limit, over `Broker.receive`.

`async for delivery in broker.consume("jobs", prefetch=50)` yields deliveries as they become ready and keeps at
most `prefetch` of them unacked: when the limit is reached it waits for acks before fetching more. Acks and nacks
made through the consumer return credit at once; acks made through the broker are noticed within
`CREDIT_RECHECK_S`. Closing the consumer (or leaving `async with`) releases its unacked messages at once, so
another consumer gets them without waiting for their leases to end.

Invariant: `outstanding` holds exactly the receipts this consumer handed out and has not seen settled.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from chute.errors import InvalidArgument, QueueNotFound
from chute.model import Delivery

if TYPE_CHECKING:
    from chute.broker import Broker

CREDIT_RECHECK_S = 0.5  # how soon acks made outside the consumer free its prefetch credit
POLL_S = 1.0  # longest single long-poll; the loop re-checks `closed` between polls


class Consumer:
    """Async iterator of deliveries from one queue. Use `async with` or call `close()` when done."""

    def __init__(
        self, broker: Broker, queue: str, *, prefetch: int, lease_s: float | None, owns_queue: bool = False
    ) -> None:
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or not 1 <= prefetch <= 100_000:
            raise InvalidArgument(f"prefetch must be an integer from 1 to 100000, got {prefetch!r}")
        self.broker = broker
        self.queue = queue
        self.prefetch = prefetch
        self.lease_s = lease_s
        self.owns_queue = owns_queue
        self.closed = False
        self.outstanding: set[int] = set()
        self._buffer: deque[Delivery] = deque()
        self._credit = asyncio.Event()

    def __aiter__(self) -> Consumer:
        return self

    async def __anext__(self) -> Delivery:
        while not self._buffer:
            if self.closed:
                raise StopAsyncIteration
            credit = await self._wait_for_credit()
            if credit <= 0:
                continue
            try:
                deliveries = await self.broker.receive(self.queue, credit, wait_s=POLL_S, lease_s=self.lease_s)
            except QueueNotFound:
                if self.closed:
                    raise StopAsyncIteration from None
                raise
            for delivery in deliveries:
                if delivery.receipt:
                    self.outstanding.add(delivery.receipt)
            self._buffer.extend(deliveries)
        return self._buffer.popleft()

    async def _wait_for_credit(self) -> int:
        while not self.closed:
            credit = self.prefetch - len(self.outstanding) - len(self._buffer)
            if credit > 0:
                return credit
            queue = self.broker.core.queues.get(self.queue)
            if queue is not None:
                self.outstanding &= queue.in_flight.keys()
                if len(self.outstanding) < self.prefetch:
                    continue
            self._credit.clear()
            try:
                async with asyncio.timeout(CREDIT_RECHECK_S):
                    await self._credit.wait()
            except TimeoutError:
                pass
        return 0

    async def ack(self, deliveries: Delivery | int | Sequence[Delivery | int]) -> None:
        """Ack deliveries received from this consumer (see `Broker.ack`)."""
        receipts = _receipts(deliveries)
        self.outstanding.difference_update(receipts)
        self._credit.set()
        if receipts:
            await self.broker.ack(self.queue, receipts)

    async def nack(self, deliveries, *, delay_s: float = 0.0, dead_letter: bool = False) -> None:
        """Nack deliveries received from this consumer (see `Broker.nack`)."""
        receipts = _receipts(deliveries)
        self.outstanding.difference_update(receipts)
        self._credit.set()
        if receipts:
            await self.broker.nack(self.queue, receipts, delay_s=delay_s, dead_letter=dead_letter)

    async def close(self) -> None:
        """Stop consuming; unacked messages (also those fetched but not yet yielded) are released at once."""
        if self.closed:
            return
        self.closed = True
        unacked = list(self.outstanding)
        self.outstanding.clear()
        self._buffer.clear()
        self.broker.release(self.queue, unacked)
        if self.owns_queue and self.queue in self.broker.core.queues:
            self.broker.core.delete_queue(self.queue)
        self.broker._queue_deleted_or_closed(self.queue)
        self._credit.set()

    async def __aenter__(self) -> Consumer:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _receipts(deliveries) -> list[int]:
    """Receipts of deliveries given as Delivery objects or receipts, one or many; receipt 0 (at-most-once
    deliveries of ephemeral subscriptions) needs no ack and is left out."""
    if isinstance(deliveries, Delivery | int):
        deliveries = [deliveries]
    receipts = (d.receipt if isinstance(d, Delivery) else d for d in deliveries)
    return [receipt for receipt in receipts if receipt]
