"""`ClusterConsumers`: a cluster node's AMQP consumers in the cluster's consumer registry (chute.cluster.consumers).

On one broker the front decides over a queue's consumers from memory (front.py). On a cluster node a queue's
consumers may be connected to any node, so these decisions go through the registry, a table every node shares:
- basic.consume registers its consumer before ConsumeOk (`register`), which refuses an exclusive consumer while
  any other exists and any consumer while an exclusive one exists, over all nodes (403 ACCESS_REFUSED);
- x-single-active-consumer: a consumer of such a queue delivers only while it is the live consumer that
  registered first, as this node last read it (`active`); the reading is renewed every RECHECK_S and at once
  after this node's consumers of such a queue start or end, and is trusted for at most TRUST_S: a node that
  cannot read the registry stops its consumers of such queues rather than risk a second active one;
- queue.declare-ok's consumer_count, if-unused and auto-delete count every node's consumers (`count`).

Invariants:
- every consumer this node started (and has not ended) has a row, and only those: a row whose delete failed is
  removed by the next `reconcile` (every RECONCILE_S), a row swept while this node was cut off from the database
  is made again (with a newer id);
- when a consumer's process dies, its row stops counting at once (the registry's liveness test), so the next
  registered consumer of a single-active queue takes over within about the node's lease plus RECHECK_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chute.amqp.front import AmqpFront

log = logging.getLogger("chute.amqp")
RECHECK_S = 1.0  # how often a node with consumers of single-active queues reads which consumer is active
TRUST_S = 3.0  # how long that reading stays good when the registry cannot be read again
RECONCILE_S = 5.0  # how often a node makes its rows match its live consumers (and deletes those of dead ones)
LEAVE_WAIT_S = 3.0  # longest a cancel-ok or close-ok waits for the ended consumers' rows to go


class ClusterConsumers:
    def __init__(self, front: AmqpFront) -> None:
        self.front = front
        self.registry = front.broker.consumer_registry
        self.mine: dict = {}  # AmqpConsumer -> its registry id (every live consumer of this node)
        self.first: dict[str, int] = {}  # single-active queue -> the registry id of its active consumer
        self.read_at = -1e9  # when `first` was last read (monotonic)
        self._poke = asyncio.Event()
        self._leaving: set[asyncio.Task] = set()  # rows being deleted
        self._writing = asyncio.Lock()  # a registration is never taken for a stale row by a reconcile under way
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    def stop(self) -> asyncio.Task | None:
        if self._task is not None:
            self._task.cancel()
        return self._task

    async def register(self, consumer) -> bool:
        """Register `consumer` (before ConsumeOk); False if an exclusive consumer holds its queue, or if it is
        exclusive and the queue has a consumer (of any node)."""
        async with self._writing:
            registration = await self.registry.register(consumer.queue, exclusive=consumer.exclusive,
                                                        priority=consumer.priority)  # fmt: skip
            if registration is None:
                return False
            self.mine[consumer] = registration
        if consumer.queue in self.front.single_active:
            self._poke.set()
        return True

    def ended(self, consumer) -> None:
        """`consumer` ended (cancel, its channel or connection closed): its row goes now (or at the next
        reconcile, if the database cannot be reached)."""
        registration = self.mine.pop(consumer, None)
        if registration is None:
            return
        task = asyncio.ensure_future(self.registry.unregister([registration]))
        self._leaving.add(task)
        task.add_done_callback(self._left)
        if consumer.queue in self.front.single_active:
            self._poke.set()

    def _left(self, task: asyncio.Task) -> None:
        self._leaving.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.info("AMQP: a consumer's row stays until the next reconcile: %s", task.exception())

    @property
    def leaving(self) -> bool:
        """Whether rows of ended consumers are being deleted."""
        return bool(self._leaving)

    async def left(self) -> None:
        """Until the rows of the consumers that ended so far are deleted (or failed to be, or LEAVE_WAIT_S passed):
        cancel-ok and close-ok wait for it, so the queue is free on every node once the client hears its consumer
        is gone."""
        if self._leaving:
            await asyncio.wait(list(self._leaving), timeout=LEAVE_WAIT_S)

    def active(self, consumer) -> bool:
        """Whether `consumer`, of a single-active queue, is the active consumer of the cluster."""
        registration = self.mine.get(consumer)
        if registration is None or time.monotonic() - self.read_at > TRUST_S:
            return False
        return self.first.get(consumer.queue) == registration

    async def count(self, queue: str) -> int:
        """The consumers of `queue` on every node (this node's own, if the registry cannot be read)."""
        try:
            return await self.registry.count(queue)
        except Exception as exc:  # the database is away: what this node knows
            log.info("AMQP: cannot count the consumers of %r in the registry: %s", queue, exc)
            return self.front.consumers[queue]

    async def _watch(self) -> None:
        """Read which consumer of each single-active queue is active (every RECHECK_S, or at once when poked),
        wake a consumer of this node that became active; reconcile this node's rows every RECONCILE_S."""
        reconciled = time.monotonic()
        while not self.front.closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RECHECK_S):
                    await self._poke.wait()
            self._poke.clear()
            try:
                await self._read_first()
                if time.monotonic() - reconciled >= RECONCILE_S:
                    reconciled = time.monotonic()
                    await self._reconcile()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is away: look again at the next turn
                log.info("AMQP: the consumer registry cannot be read: %s", exc)

    async def _read_first(self) -> None:
        queues = {consumer.queue for consumer in self.mine if consumer.queue in self.front.single_active}
        if not queues:
            self.first = {}
            self.read_at = time.monotonic()
            return
        first = await self.registry.first(queues)
        self.read_at = time.monotonic()
        before, self.first = self.first, first
        for consumer, registration in self.mine.items():
            if first.get(consumer.queue) == registration and before.get(consumer.queue) != registration:
                consumer.channel.credit.set()  # it became the active one

    async def _reconcile(self) -> None:
        async with self._writing:
            live = {registration: (consumer.queue, consumer.exclusive, consumer.priority)
                    for consumer, registration in self.mine.items()}  # fmt: skip
            renewed = await self.registry.reconcile(live)
        if renewed:
            for consumer, registration in list(self.mine.items()):
                if registration in renewed:
                    self.mine[consumer] = renewed.pop(registration)
            if renewed:  # their consumers ended during the reconcile
                await self.registry.unregister(renewed.values())
            self._poke.set()
        swept = await self.registry.sweep()
        if swept:
            log.info("AMQP: %d consumers of nodes that are gone left the registry", swept)
