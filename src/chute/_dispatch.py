"""`Dispatcher`: serves the broker's push consumers from one pass per turn of the event loop, instead of one task
per consumer waiting on its queue.

A push consumer (the network server's `ServerConsumer`) is *watched* under its queue's name. When an operation
leaves ready messages in a queue (the core's `changed`), the broker tells the dispatcher, which marks that
queue's consumers due; once per turn of the loop, the pass runs `pump(dispatcher)` of every due consumer, and
each leases what its credit allows (`lease`) and writes its deliveries. With a thousand queues sharing the
traffic, a commit that fills hundreds of them costs one callback instead of hundreds of task wake-ups (a future,
a timer and a coroutine resumption each); the delivery-count records of the whole pass go to the store in one
append, and its leases share one timer per deadline (`BrokerCore.begin_leases`). Deliveries take their messages
from the core's `recent` (core/recent.py) when they can: no record read and decoded again.

Invariants:
- a watched consumer is made due after anything that may let it deliver: its queue gained ready messages or was
  deleted, the broker closes (`wake_all`), or the consumer itself asks (`wake`: credit came back, its transport
  became writable, a rate limit lets a message go). A consumer out of credit (`blocked`) is not made due by its
  queue's changes (it could not take anything); the sweep looks at it.
- the sweep, every SWEEP_S while consumers are watched, makes due every consumer whose queue holds ready
  messages (a blocked one then re-counts its credit against the leases that ended): a wake missed for whatever
  reason costs at most SWEEP_S, never a stuck consumer. No timer runs while no consumer is watched.
- `pump` runs only from the pass, a callback of its own (or `pass_now` at the end of such a callback: the broker's
  settlement of a group commit's publishes), never inside a core operation: the core's `changed` is not being
  iterated and no caller's durability token is pending. The pass ends with one `Broker._after`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

from chute.core.queue import Entry
from chute.model import Delivery

if TYPE_CHECKING:
    from chute.broker import Broker

SWEEP_S = 0.5  # how soon a consumer whose wake was missed, or whose leases ended elsewhere, delivers again


class PushConsumer(Protocol):
    queue: str  # the queue's name
    blocked: bool  # out of credit: its queue's changes do not make it due

    def pump(self, dispatcher: Dispatcher) -> None: ...


class Dispatcher:
    """The push consumers of one broker, and the pass that serves the due ones."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.watched: dict[str, dict[PushConsumer, None]] = {}  # queue name -> its consumers, in arrival order
        self.due: dict[PushConsumer, None] = {}  # made due since the last pass, in order
        self._scheduled: asyncio.Handle | None = None  # the pass's callback, once one is due
        self._sweep: asyncio.TimerHandle | None = None
        self._now = 0.0  # the pass's clock reading

    # -- who is watched -------------------------------------------------------------------------------------

    def watch(self, consumer: PushConsumer) -> None:
        """Serve `consumer` from now on (it is due at once)."""
        self.watched.setdefault(consumer.queue, {})[consumer] = None
        if self._sweep is None:
            loop = self.broker._event_loop()
            self._sweep = loop.call_later(SWEEP_S, self._sweep_now)
        self.wake(consumer)

    def unwatch(self, consumer: PushConsumer) -> None:
        """Serve `consumer` no more (idempotent)."""
        consumers = self.watched.get(consumer.queue)
        if consumers is not None:
            consumers.pop(consumer, None)
            if not consumers:
                del self.watched[consumer.queue]
        self.due.pop(consumer, None)
        if not self.watched and self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

    # -- making consumers due -------------------------------------------------------------------------------

    def wake(self, consumer: PushConsumer) -> None:
        """Make `consumer` due: its `pump` runs in the next pass."""
        self.due[consumer] = None
        if self._scheduled is None:
            self._scheduled = self.broker._event_loop().call_soon(self._pass)

    def queue_changed(self, name: str, gone: bool = False) -> None:
        """Queue `name` gained ready messages (or, `gone`, was deleted): its consumers with credit are due."""
        consumers = self.watched.get(name)
        if consumers:
            due = self.due
            for consumer in consumers:
                if gone or not consumer.blocked:
                    due[consumer] = None
            if self._scheduled is None:
                self._scheduled = self.broker._event_loop().call_soon(self._pass)

    def wake_all(self) -> None:
        """Every watched consumer is due (the broker is closing: each finds out and ends)."""
        for consumers in list(self.watched.values()):
            for consumer in consumers:
                self.wake(consumer)

    def _sweep_now(self) -> None:
        self._sweep = None
        if not self.watched:
            return
        queues = self.broker.core.queues
        for name, consumers in self.watched.items():
            queue = queues.get(name)
            if queue is None or queue.ready:
                for consumer in consumers:
                    self.wake(consumer)
        self._sweep = self.broker._event_loop().call_later(SWEEP_S, self._sweep_now)

    # -- the pass -------------------------------------------------------------------------------------------

    def pass_now(self) -> None:
        """Run the pass now rather than in the next turn of the loop, if one is due (the broker's callback that
        placed a group commit's publishes: their deliveries leave in the same turn as the publishers' replies).
        Only from a callback of its own, never inside a core operation."""
        handle = self._scheduled
        if handle is not None:
            handle.cancel()
            self._pass()

    def _pass(self) -> None:
        """Pump every due consumer (those made due meanwhile wait for the next pass), then one `_after`."""
        self._scheduled = None
        due, self.due = self.due, {}
        if not due:
            return
        broker = self.broker
        self._now = broker.clock()
        broker._pending_token = None
        broker.core.begin_leases()  # one lease timer for the pass, not one per consumer
        try:
            for consumer in due:
                consumer.pump(self)
        finally:
            broker.core.end_leases()
            if broker._state == "serving":
                broker._after(housekeep=False)

    def lease(self, name: str, max_messages: int, lease_s: float | None, max_bytes: int | None) -> list[Entry]:
        """In a pass: lease up to `max_messages` ready messages of queue `name` (as `Broker._lease`; its records
        go to the store with the pass's others). Raises BrokerClosed if the broker is not serving."""
        broker = self.broker
        if broker._state != "serving":
            broker._check()  # raises
        return broker.core.receive(name, max_messages, self._now, lease_s, max_bytes)

    def deliveries(self, name: str, entries: list[Entry]) -> list[Delivery] | None:
        """In a pass: the deliveries of leased `entries` if every message is at hand (as
        `Broker._cached_deliveries`); None if one must be read from disk
        (then `Broker._read_deliveries`)."""
        return self.broker._cached_deliveries(name, entries)
