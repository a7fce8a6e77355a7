"""`Publisher`: the automatic batching of `AsyncClient.publish` / `publish_nowait`, and `publish_batch`.

Messages to one destination gather in a batch: the first goes at once (nothing of that destination in flight);
while a batch is in flight, later messages wait up to `linger_s`, or until `max_batch` messages or a frame's worth
of bytes, then leave as one PUBLISH frame, like a Kafka producer. When a batch's confirm comes back, the futures
of its messages get their ids and what gathered meanwhile leaves at once.

With a server of protocol 2 or later the batching is per connection rather than per destination: messages to
any destinations gather in one request (a PUBLISH with `more` groups), sent at the end of the event loop's turn
when no publish is in flight on the connection (so what is published in the same turn goes along, with no more
delay than the task that sends it would take to start anyway), else after `linger_s`, `max_batch` messages or a
frame's worth. A producer spreading messages
over a thousand queues then sends a few large requests instead of one per message. Each destination's messages
still travel in order, and each destination's group is confirmed or refused on its own.

This is the hot path of a producer: per message, one Publish struct, one future and a few list appends (no task,
no timer, no `get_running_loop()`, which costs a getpid() system call). `flush()` waits for the few batch tasks,
not for every future.

Invariants: a future resolves only with the broker's confirm (its id) or an error; at most one timer per batch;
`sending` holds every batch task not yet settled, so `flush()` returns only when every message sent before it is
confirmed or failed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from chute.errors import ChuteError, ConnectionLost, InvalidArgument
from chute.model import Publish
from chute.protocol import messages as m
from chute.protocol.connection import error_from
from chute.protocol.frames import DEFAULT_MAX_FRAME_BYTES, Op
from chute.protocol.sizes import GROUP_OVERHEAD, MESSAGE_OVERHEAD, body_budget, publish_size

if TYPE_CHECKING:
    from chute.client.aio import AsyncClient


def checked_body(body) -> bytes:
    """`body` as bytes (InvalidArgument unless it is bytes, bytearray or memoryview)."""
    if type(body) is not bytes:
        if not isinstance(body, (bytes, bytearray, memoryview)):  # noqa: UP038 - a tuple is faster here
            raise InvalidArgument(f"body must be bytes, got {type(body).__name__}")
        body = bytes(body)
    return body


class _Batch:
    __slots__ = ("messages", "futures", "size", "limit", "timer")

    def __init__(self, limit: int) -> None:
        self.messages: list[Publish] = []
        self.futures: list[asyncio.Future] = []
        self.size = 0  # an upper bound of the encoded messages (protocol.sizes)
        self.limit = limit
        self.timer: asyncio.TimerHandle | None = None


class Publisher:
    """The publishing half of one AsyncClient."""

    def __init__(self, client: AsyncClient, linger_s: float, max_batch: int) -> None:
        self.client = client
        self.linger_s = linger_s
        self.max_batch = max_batch
        self.loop: asyncio.AbstractEventLoop | None = None  # the client's loop, set when it connects
        self.batches: dict[str, _Batch] = {}  # protocol 1: gathering, by destination
        self.in_flight: dict[str, int] = {}  # batches sent and not confirmed, by destination
        self.sending: set[asyncio.Task] = set()
        # protocol 2: one gathering request for every destination (two lists per destination, no batch object:
        # with a thousand destinations a request holds about one message each, and every object that lives
        # until the confirm is one more for the garbage collector to walk)
        self.any_dest = False
        self.gathering: dict[str, list[Publish]] = {}  # by destination, in the order they came
        self.gathering_futures: dict[str, list[asyncio.Future]] = {}  # the same keys, in the same order
        self.gathered = 0  # messages in `gathering`
        self.gathered_size = 0  # an upper bound of their encoding, group overheads included
        self.requests = 0  # multi-destination requests in flight
        self.timer: asyncio.Handle | None = None  # a linger timer, or the send at the end of this turn
        self.budget = body_budget(DEFAULT_MAX_FRAME_BYTES)  # `frame_budget()` of the current link

    def connected(self, loop: asyncio.AbstractEventLoop, version: int) -> None:
        """A link is up: batch per connection if the server speaks protocol 2 (several destinations a request)."""
        self.loop = loop
        self.any_dest = version >= 2
        self.budget = self.frame_budget()

    def publish_nowait(self, dest: str, body, options: dict) -> asyncio.Future[int]:
        body = checked_body(body)
        if options:
            message = Publish(body=body, **options)
            return self.add(dest, message, publish_size(message))
        return self.add(dest, Publish(body=body), MESSAGE_OVERHEAD + len(body))  # = publish_size, without options

    def add(self, dest: str, message: Publish, size: int) -> asyncio.Future[int]:
        """Put `message` (whose encoded size is at most `size`) in the batch of `dest`; its future."""
        if self.any_dest:
            return self._add_any(dest, message, size)
        loop = self.loop or asyncio.get_running_loop()
        future = loop.create_future()
        batch = self.batches.get(dest)
        if batch is not None and batch.size + size > batch.limit:
            self.send(dest)  # this message would not fit the frame: it starts the next batch
            batch = None
        if batch is None:
            batch = self.batches[dest] = _Batch(self.frame_budget())
        messages = batch.messages
        messages.append(message)
        batch.futures.append(future)
        batch.size += size
        if len(messages) >= self.max_batch or batch.size >= batch.limit or not self.in_flight.get(dest):
            self.send(dest)
        elif batch.timer is None:
            batch.timer = loop.call_later(self.linger_s, self.send, dest)
        return future

    def _add_any(self, dest: str, message: Publish, size: int) -> asyncio.Future[int]:
        """Protocol 2: gather `message` in the connection's next request, whatever its destination."""
        loop = self.loop or asyncio.get_running_loop()
        future = loop.create_future()
        messages = self.gathering.get(dest)
        extra = size if messages is not None else size + GROUP_OVERHEAD + len(dest.encode())
        if self.gathered and self.gathered_size + extra > self.budget:
            self.send_all()  # this message would not fit the frame: it starts the next request
            extra = size + GROUP_OVERHEAD + len(dest.encode())
            messages = None
        if messages is None:
            self.gathering[dest] = [message]
            self.gathering_futures[dest] = [future]
        else:
            messages.append(message)
            self.gathering_futures[dest].append(future)
        self.gathered += 1
        self.gathered_size += extra
        if self.gathered >= self.max_batch:
            self.send_all()
        elif self.timer is None:
            # nothing in flight: the request leaves at the end of this turn of the loop (when a task made now
            # would first run), with whatever else is published in the same turn; else after `linger_s` at most
            if self.requests:
                self.timer = loop.call_later(self.linger_s, self.send_all)
            else:
                self.timer = loop.call_soon(self.send_all)
        return future

    def send_all(self) -> None:
        """Protocol 2: send everything gathered, for every destination, as one request."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.gathering:
            return
        groups, futures = self.gathering, self.gathering_futures
        self.gathering, self.gathering_futures = {}, {}
        self.gathered = self.gathered_size = 0
        self.requests += 1
        task = (self.loop or asyncio.get_running_loop()).create_task(self._publish_groups(groups))
        self.sending.add(task)
        task.add_done_callback(lambda done: self._settle_groups(done, futures))

    async def _publish_groups(self, groups: dict[str, list[Publish]]) -> m.PublishReply:
        rest = iter(groups.items())
        dest, first = next(rest)
        more = [m.PublishGroup(dest=name, messages=messages) for name, messages in rest] or None
        request = m.PublishRequest(dest=dest, messages=first, more=more)
        reply = await self.client._call(Op.PUBLISH, request, m.PublishReply)
        if len(reply.ids) != sum(map(len, groups.values())):
            raise ChuteError(f"broker confirmed {len(reply.ids)} ids for a request of {len(groups)} groups")
        return reply

    def _settle_groups(self, done: asyncio.Task, futures: dict[str, list[asyncio.Future]]) -> None:
        self.sending.discard(done)
        self.requests = max(0, self.requests - 1)
        error = ConnectionLost("publish cancelled") if done.cancelled() else done.exception()
        failed = {}
        if error is None:
            reply = done.result()
            failed = {failure.group: error_from(failure.error) for failure in reply.failed or ()}
            ids = iter(reply.ids)
        for index, group in enumerate(futures.values()):
            group_error = error if error is not None else failed.get(index)
            for future in group:
                message_id = next(ids) if error is None else 0
                if future.done():  # its caller cancelled it: the message is published all the same
                    continue
                if group_error is not None:
                    future.set_exception(group_error)
                else:
                    future.set_result(message_id)
        if self.gathering and not self.requests:
            self.send_all()  # what gathered while this request was in flight goes now

    def frame_budget(self) -> int:
        """The bytes of messages one PUBLISH frame may carry (sized by `protocol.sizes.publish_size`)."""
        welcome = self.client.server_info
        return body_budget(welcome.max_frame_bytes if welcome is not None else DEFAULT_MAX_FRAME_BYTES)

    def send(self, dest: str) -> None:
        """Send the batch of `dest` now (if there is one)."""
        batch = self.batches.pop(dest, None)
        if batch is None or not batch.messages:
            return
        if batch.timer is not None:
            batch.timer.cancel()
        self.in_flight[dest] = self.in_flight.get(dest, 0) + 1
        task = (self.loop or asyncio.get_running_loop()).create_task(self._publish_frame(dest, batch.messages))
        self.sending.add(task)
        task.add_done_callback(lambda done: self._settle(done, dest, batch.futures))

    def _settle(self, done: asyncio.Task, dest: str, futures: list[asyncio.Future]) -> None:
        self.sending.discard(done)
        self.in_flight[dest] = max(0, self.in_flight.get(dest, 1) - 1)
        error = ConnectionLost("publish cancelled") if done.cancelled() else done.exception()
        if error is not None:
            for future in futures:
                if not future.done():
                    future.set_exception(error)
        else:
            for future, message_id in zip(futures, done.result(), strict=True):
                if not future.done():  # its caller cancelled it: the message is published all the same
                    future.set_result(message_id)
        if dest in self.batches and not self.in_flight[dest]:
            self.send(dest)  # what gathered while this batch was in flight goes now

    async def _publish_frame(self, dest: str, messages: list[Publish], timeout: float | None = None) -> list[int]:
        request = m.PublishRequest(dest=dest, messages=messages)
        reply = await self.client._call(Op.PUBLISH, request, m.PublishReply, timeout)
        if len(reply.ids) != len(messages):
            raise ChuteError(f"broker confirmed {len(reply.ids)} of {len(messages)} messages")
        return reply.ids

    async def publish_batch(self, dest: str, messages: Sequence[Publish | bytes], timeout: float | None) -> list[int]:
        items = [Publish(body=bytes(x)) if isinstance(x, bytes | bytearray | memoryview) else x for x in messages]
        ids: list[int] = []
        budget = self.frame_budget()
        start = size = 0
        for i, item in enumerate(items):
            item_size = publish_size(item)
            size += item_size
            if size > budget and i > start:
                ids += await self._publish_frame(dest, items[start:i], timeout)
                start, size = i, item_size
        if start < len(items):
            ids += await self._publish_frame(dest, items[start:], timeout)
        return ids

    async def flush(self) -> None:
        """Send every batch now; wait until every batch sent so far is confirmed or failed."""
        if self.any_dest:
            self.send_all()
        for dest in list(self.batches):
            self.send(dest)
        pending = list(self.sending)  # every message published before this call is in one of them
        if pending:
            await asyncio.wait(pending)  # their settle callbacks ran first: the futures are done

    def connection_lost(self) -> None:
        """The link broke: batches in flight fail by themselves (their requests get ConnectionLost)."""
        self.in_flight.clear()
        self.requests = 0
