"""`Acks`: acks that do not wait (`AsyncClient.ack_nowait`), batched per queue, with a bounded number of ACK
requests in flight.

`add` returns a future at once. While fewer than `max_in_flight` ACK requests are outstanding, the receipts go
at once in a request of their own; beyond that, the receipts of later calls gather per queue and leave in one
request (of at most MAX_RECEIPTS) as soon as an earlier one is answered. So a consumer that acks each message as
it finishes sends one ACK per message when idle and a few large ones under load, and never has more than
`max_in_flight` ACK requests (and their receipts) on the wire.

Invariants:
- at most `max_in_flight` ACK requests made here are outstanding at any time;
- every future ends: None once its acks are durable, InvalidReceipt naming those of its receipts the broker did not
  know (the others were acked), or the error of its request (ConnectionLost, RequestTimeout, ...);
- a future cancelled before its receipts were sent withdraws them (they are not acked); after, the ack may happen;
- receipts still waiting when the connection is lost fail at once with ConnectionLost: the broker released them
  (they will be delivered again), so they never go out on the next connection.
- a failed ack is logged (one warning per request) and its future's error counts as retrieved: fire-and-forget
  callers see no "exception was never retrieved"; those who await the future still get the error.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from chute.errors import ChuteError, ConnectionLost, InvalidReceipt
from chute.protocol import messages as m
from chute.protocol.frames import Op

if TYPE_CHECKING:
    from chute.client.aio import AsyncClient

log = logging.getLogger("chute.client")
MAX_RECEIPTS = 10_000  # per ACK request: ~90 KB of msgpack, far below any frame limit


class Acks:
    """The ack pipeline of one AsyncClient."""

    def __init__(self, client: AsyncClient, max_in_flight: int) -> None:
        self.client = client
        self.max_in_flight = max_in_flight
        self.in_flight = 0  # ACK requests sent and not answered
        self.waiting: dict[str, list[tuple[asyncio.Future, list[int]]]] = {}  # by queue, in call order
        self.unsettled: set[asyncio.Future] = set()  # every future not yet done (what `flush` waits for)
        self._parts: dict[asyncio.Future, int] = {}  # a call's future -> queues of it not yet acked

    def add(self, grouped: dict[str, list[int]]) -> asyncio.Future[None]:
        """Ack `grouped` receipts (by queue); the future of all of them."""
        future = asyncio.get_running_loop().create_future()
        if not grouped:
            future.set_result(None)
            return future
        self._parts[future] = len(grouped)
        self.unsettled.add(future)
        future.add_done_callback(self._forget)
        for queue, receipts in grouped.items():
            self.waiting.setdefault(queue, []).append((future, receipts))
        self._pump()
        return future

    def _forget(self, future: asyncio.Future) -> None:
        self.unsettled.discard(future)
        self._parts.pop(future, None)
        if not future.cancelled():
            future.exception()  # retrieved: a failure was logged once per request (see the header)

    def _pump(self) -> None:
        """Send what waits, while requests may be added."""
        while self.in_flight < self.max_in_flight and self.waiting:
            queue = next(iter(self.waiting))
            entries = self.waiting[queue]
            batch: list[tuple[asyncio.Future, list[int]]] = []
            receipts: list[int] = []
            while entries and (not receipts or len(receipts) + len(entries[0][1]) <= MAX_RECEIPTS):
                future, part = entries.pop(0)
                if not future.done():  # cancelled by its caller before it was sent: withdrawn
                    batch.append((future, part))
                    receipts += part
            if not entries:
                del self.waiting[queue]
            if not batch:
                continue
            self.in_flight += 1
            request = self.client._call(Op.ACK, m.AckRequest(queue=queue, receipts=receipts), m.Empty)
            task = asyncio.get_running_loop().create_task(request)
            task.add_done_callback(lambda done, batch=batch: self._answered(done, batch))

    def _answered(self, done: asyncio.Task, batch: list[tuple[asyncio.Future, list[int]]]) -> None:
        self.in_flight -= 1
        error = ConnectionLost("the ack was cancelled") if done.cancelled() else done.exception()
        if error is not None:
            log.warning("ack of %d receipt(s) failed: %s", sum(len(r) for _, r in batch), error)
        for future, receipts in batch:
            if error is None:
                self._part_done(future, None)
            elif isinstance(error, InvalidReceipt) and getattr(error, "receipts", None):
                unknown = set(error.receipts).intersection(receipts)
                self._part_done(future, _invalid(unknown) if unknown else None)
            else:
                self._part_done(future, error)
        self._pump()

    def _part_done(self, future: asyncio.Future, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
            return
        self._parts[future] -= 1
        if not self._parts[future]:
            future.set_result(None)

    def connection_lost(self, error: ChuteError) -> None:
        """The link broke: what waits was released by the broker; fail it now (requests in flight fail by
        themselves)."""
        waiting, self.waiting = self.waiting, {}
        lost = ConnectionLost(f"not acked, the connection broke ({error.message}): it will be delivered again")
        if waiting:
            log.warning("%s", lost.message)
        for entries in waiting.values():
            for future, _ in entries:
                self._part_done(future, lost)

    async def flush(self) -> None:
        """Wait until every ack made so far is answered (succeeded or failed: the futures hold the errors)."""
        while self.unsettled:
            await asyncio.wait(list(self.unsettled))


def _invalid(receipts: set[int]) -> InvalidReceipt:
    error = InvalidReceipt(f"{len(receipts)} receipt(s) not acked: no longer leased (they will be delivered again)")
    error.receipts = sorted(receipts)
    return error
