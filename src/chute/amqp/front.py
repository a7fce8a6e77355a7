"""`AmqpFront`: the AMQP 0-9-1 listener of a `Server` and what its connections share.

It holds the exchange book (exchanges.py), which connection owns each exclusive queue, how many AMQP consumers
each queue has (for declare-ok's consumer_count, if-unused and auto-delete) and the open sessions. It reaches the
rest of the server only through `server.broker`, `server.auth`, `server.config` and `server.publishing` (the memory
high-water mark), so the AMQP area does not depend on the native one.

Lifecycle: `start()` after the broker has recovered (RabbitMQ's predeclared exchanges `amq.direct`, `amq.fanout`,
`amq.topic`, `amq.headers` and `amq.match` exist from then on); `stop(grace_s)` closes the listener, lets in-flight
work finish and closes every connection with 320 CONNECTION_FORCED, before the broker closes.

Invariants:
- at most `max_connections` AMQP connections (counted apart from native ones);
- an exclusive queue is deleted when its connection ends, a non-durable one at the next start (one broker). On a
  cluster node an exclusive queue's record names its connection (`owner_tag`: node, incarnation, serial), every
  other connection of any node gets 405, and once that connection's process is gone the queue is deleted by the
  first method naming it or by the sweep of the node serving its shard;
- an auto-delete queue is deleted when its last consumer goes, a queue with x-expires when it has been unused
  (no consumer, no declare, no basic.get) that long; on a cluster node either deletion waits until no consumer
  of any node used the queue for IN_USE_S (`_used_elsewhere`);
- an x-single-active-consumer queue delivers to one consumer at a time, the first registered (then the next,
  when it goes); a consumer delivers only while no consumer of higher `x-priority` on its queue has prefetch
  room. The last three are kept in memory; on a cluster node, exclusive consumers, the single active consumer
  and consumer counts are decided over every node's consumers (consumer_registry.py), priorities per node.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
from collections import Counter
from typing import TYPE_CHECKING

from chute.amqp import metadata, reply_to, state
from chute.amqp.consumer_registry import ClusterConsumers
from chute.amqp.errors import CONNECTION_FORCED, AmqpError, locked
from chute.amqp.exchanges import PREDECLARED_NAMES, ExchangeBook
from chute.amqp.mapping import dead_lettered_as, origin
from chute.amqp.session import AmqpSession
from chute.amqp.state import IN_USE_S, used_recently
from chute.errors import ChuteError, QueueNotFound
from chute.server.config import DEFAULT_AMQP_PORT

if TYPE_CHECKING:
    from chute.server.app import Server

log = logging.getLogger("chute.amqp")
STOP_TASKS_S = 0.5  # (routed) how long stop() waits for the sweep and the reply inbox to end
SWEEP_S = 5.0  # (routed) how often a node looks for exclusive queues of its shards whose connection is gone
SWEEP_STEP = 500  # (routed) queues looked at per turn of the loop by that sweep
PREDECLARED = dict(zip(PREDECLARED_NAMES, ("direct", "fanout", "topic", "headers", "headers"), strict=True))
__all__ = ["AmqpFront", "DEFAULT_AMQP_PORT"]


class AmqpFront:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.broker = server.broker
        self.book = ExchangeBook()
        self.stored: dict = {}  # the metadata last written into the log (metadata.py)
        self.sessions: set[AmqpSession] = set()
        self.consumers: Counter[str] = Counter()  # queue -> AMQP consumers on it
        self.exclusive: dict[str, AmqpSession] = {}  # queue -> the connection that owns it
        self.auto_delete: set[str] = set()
        self.exclusive_consumers: set[str] = set()  # queues with an exclusive consumer
        self.expires: dict[str, float] = {}  # queue -> x-expires (s): deleted after this long unused
        self.single_active: dict[str, list] = {}  # x-single-active-consumer queue -> its consumers, active first
        self.reply_channels: dict = {}  # direct reply-to token -> the channel it stands for (reply_to.py)
        self.pending_dead_letters: set[str] = set()  # queues whose dead-letter exchange leads nowhere yet
        self.ranked: dict[str, list] = {}  # queue -> its consumers by x-priority, highest first
        self._expiry: dict[str, asyncio.TimerHandle] = {}
        self._used_at: dict[str, float] = {}  # x-expires queue -> when `used` last restarted its countdown
        self.port: int | None = None
        self._listener: asyncio.base_events.Server | None = None
        self._saving = asyncio.Lock()
        self._serials = itertools.count(1)
        self._sweeper: asyncio.Task | None = None
        self._replies: asyncio.Task | None = None
        self.closing = False  # stop() began: the background tasks end
        self.routed = state.routed(self.broker)  # a cluster node: the book is read through (state.py)
        self.exchanges_read: dict[str, float] = {}  # (routed) exchange -> when its metadata was last read
        self.dead_lettering: dict[str, bool] = {}  # (routed) queue -> has a dead-letter queue, as last read
        self.forgets = 0  # queues and exchanges forgotten so far (state.py: a read that straddles one reads again)
        self.cluster_consumers = ClusterConsumers(self) if self.routed else None  # (routed) every node's consumers
        server.auth.on_change.append(self.users_changed)

    async def save_book(self) -> None:
        """Make the book's changes durable in the log (metadata.py; one write at a time, with the latest state)."""
        self.book.changed()  # before any wait: the next publish sees the new bindings
        async with self._saving:
            await metadata.store(self.book, self.broker, self.stored)

    async def start(self, host: str, port: int, ssl=None) -> None:
        legacy = None
        if not self.routed:
            core = self.broker.core
            self.stored = metadata.load(self.book, core)
            legacy = metadata.import_legacy(self.book, core, self.server.config.data_dir)
        self._predeclare()
        if not self.routed:  # a cluster node's queues belong to the cluster: no node deletes them at its start
            await self._restore()
        if legacy is not None:
            await self.save_book()
            metadata.retire_legacy(legacy)
            log.info("AMQP: imported %s into the log", legacy)
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(lambda: AmqpSession(self), host, port, reuse_address=True,
                                                  backlog=1024, ssl=ssl)  # fmt: skip
        for sock in self._listener.sockets:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.port = self._listener.sockets[0].getsockname()[1]
        if self.routed:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_exclusive())
            self._replies = asyncio.get_running_loop().create_task(reply_to.serve_inbox(self))
            self.cluster_consumers.start()
        log.info("AMQP 0-9-1 listening on %s://%s:%d", "amqps" if ssl else "amqp", host, self.port)

    def adopt(self, name: str, declared: dict, owner: AmqpSession | None = None) -> None:
        """Take a queue's declared flags and arguments into effect (at its declaration, or at start-up)."""
        if declared["exclusive"] and owner is not None:
            self.exclusive[name] = owner
        if declared["auto_delete"]:
            self.auto_delete.add(name)
        arguments = declared["arguments"]
        if arguments.get("x-single-active-consumer"):
            self.single_active.setdefault(name, [])
        if arguments.get("x-expires") is not None:
            self.set_expires(name, int(arguments["x-expires"]) / 1000.0)

    async def _restore(self) -> None:
        """At start-up: queues declared through AMQP get their flags back; exclusive ones, whose connections
        belonged to an earlier run, and non-durable ones (`durable=False`) are deleted, as RabbitMQ deletes them
        at a restart."""
        changed = False
        for name, declared in list(self.book.queues.items()):
            if name not in self.broker.core.queues:
                del self.book.queues[name]
                changed = True
            elif declared["exclusive"] or not declared["durable"]:
                with contextlib.suppress(ChuteError):
                    await self.broker.delete_queue(name)
                del self.book.queues[name]
                self.book.bindings = [b for b in self.book.bindings if b["queue"] != name]
                changed = True
            else:
                self.adopt(name, declared)
                settings = self.broker.core.queues[name].settings
                if "x-dead-letter-exchange" in declared["arguments"] and settings.dead_letter_queue is None:
                    self.pending_dead_letters.add(name)
                if declared["arguments"].get("x-overflow") == "reject-publish-dlx" and settings.overflow == "reject":
                    # declared before the broker dead-lettered refused publishes itself (the front did): upgraded
                    await self.broker.update_queue(name, overflow="reject-dead-letter")
        if changed:
            await self.save_book()

    def _predeclare(self) -> None:
        """RabbitMQ's predeclared exchanges exist from the start (their topics are made at their first binding,
        so a server nobody binds on through AMQP has no extra topics)."""
        for name in PREDECLARED:
            self.predeclare(name)

    def predeclare(self, name: str) -> None:
        self.book.exchanges.setdefault(name, {"type": PREDECLARED[name], "durable": True, "auto_delete": False,
                                              "internal": False, "arguments": {}})  # fmt: skip

    def note_queue(self, name: str, settings) -> None:
        """(Routed) what this node last read of a queue's settings: whether it dead-letters (`dead_letters`). A
        single broker reads its core instead, so it keeps nothing here: an entry per queue ever declared would
        outlive the queue."""
        if not self.routed:
            return
        if settings is None:
            self.dead_lettering.pop(name, None)
        else:
            self.dead_lettering[name] = settings.dead_letter_queue is not None

    async def stop(self, grace_s: float) -> None:
        self.closing = True
        tasks = [task for task in (self._sweeper, self._replies) if task is not None]
        for task in tasks:
            task.cancel()
        watching = self.cluster_consumers.stop() if self.cluster_consumers is not None else None
        if watching is not None:
            tasks.append(watching)
        if tasks:  # a long poll of another node's shard may answer its cancellation only when it ends
            await asyncio.wait(tasks, timeout=STOP_TASKS_S)
        if self._listener is not None:
            self._listener.close()
        if self.sessions:
            await asyncio.gather(*(session.shutdown(grace_s) for session in list(self.sessions)))
        for _ in range(40):  # close-ok round trips (bounded: a session aborts itself after CLOSE_WAIT_S)
            if not self.sessions:
                break
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.abort()
        if self._listener is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await self._listener.wait_closed()

    # -- sessions ---------------------------------------------------------------------------------------------

    def admit(self, session: AmqpSession) -> bool:
        if self.server.state != "serving" or len(self.sessions) >= self.server.config.max_connections:
            return False
        self.sessions.add(session)
        if self.routed:
            name, incarnation = self.broker.process
            session.owner_tag = f"{name}|{incarnation}|{next(self._serials)}"
        if self.server.memory_paused:
            session.pause_reading("memory")
        return True

    def forget(self, session: AmqpSession) -> None:
        self.sessions.discard(session)
        if session.publish_bytes:
            self.server.publishing(session, -session.publish_bytes)
        owned = [name for name, owner in self.exclusive.items() if owner is session]
        for name in owned:
            del self.exclusive[name]
            self._delete_later(name)

    def users_changed(self) -> None:
        """Close (320 CONNECTION_FORCED, as RabbitMQ does for a deleted user) every AMQP connection whose
        credential was revoked or whose permissions changed; a client that reconnects gets the new ones."""
        auth = self.server.auth
        for session in list(self.sessions):
            if session.credential is not None and not auth.still_valid(session.principal, session.credential):
                session.fail(AmqpError(CONNECTION_FORCED, "this connection's user, credentials or permissions "
                                       "changed", connection=True))  # fmt: skip

    def memory(self, paused: bool) -> None:
        for session in self.sessions:
            session.memory(paused)

    def server_properties(self) -> dict:
        return {
            "product": "Chute", "version": self.server.name.partition("/")[2], "platform": "Python",
            "information": "AMQP 0-9-1 front of Chute (docs/amqp.md)",
            "capabilities": {"publisher_confirms": True, "basic.nack": True, "consumer_cancel_notify": True,
                             "connection.blocked": True, "authentication_failure_close": True,
                             "per_consumer_qos": True, "exchange_exchange_bindings": True,
                             "direct_reply_to": True, "consumer_priorities": True},
        }  # fmt: skip

    # -- queue ownership and consumers --------------------------------------------------------------------------

    def consumer_started(self, queue: str, consumer=None) -> None:
        if self.routed and queue not in self.auto_delete and queue not in self.expires:
            declared = self.book.queues.get(queue)  # as read when the consume began (another node may have
            if declared is not None:  # declared it): this node's last consumer's end must look at it too
                if declared["auto_delete"]:
                    self.auto_delete.add(queue)
                if declared["arguments"].get("x-expires") is not None:
                    self.expires[queue] = int(declared["arguments"]["x-expires"]) / 1000.0
        if self.routed and queue not in self.single_active:
            declared = self.book.queues.get(queue)
            if declared is not None and declared["arguments"].get("x-single-active-consumer"):
                self.single_active.setdefault(queue, [])
        self.consumers[queue] += 1
        if consumer is not None:
            ranked = self.ranked.setdefault(queue, [])
            ranked.append(consumer)
            ranked.sort(key=lambda each: -each.priority)
        waiting = self.single_active.get(queue)
        if waiting is not None and consumer is not None:
            waiting.append(consumer)
        self.used(queue)

    def may_deliver(self, queue: str, consumer) -> bool:
        """False for a consumer of an x-single-active-consumer queue that is not the active one (the first
        registered of those still there), and for one while a consumer of higher `x-priority` on the same queue
        has prefetch room (and a connection that is not blocked on writing). On a cluster node the active consumer
        of a single-active queue is the one of the whole cluster (consumer_registry.py); priorities rank only the
        consumers of this node."""
        waiting = self.single_active.get(queue)
        if waiting is not None and self.routed:
            if not self.cluster_consumers.active(consumer):
                return False
        elif waiting and waiting[0] is not consumer:
            return False
        ranked = self.ranked.get(queue)
        if ranked:
            for other in ranked:
                if other.priority <= consumer.priority:
                    break
                if other.task is not None and other.credit() > 0 and other.channel.session.writable.is_set():
                    return False
        return True

    def dead_letters(self, queue: str) -> bool:
        """Whether `queue` has a dead-letter queue (its rejected deliveries get x-death, see dead_letter.py); on
        a cluster node, as read when its consumer started or its basic.get ran (`note_queue`). Also true for a
        queue declared with a dead-letter exchange that leads nowhere yet, or back to the queue itself (which no
        queue's settings can say): a rejection looks again (`dead_letter.reject`)."""
        declared = self.book.queues.get(queue)
        if declared is not None and "x-dead-letter-exchange" in declared["arguments"]:
            return True
        if self.routed:
            return self.dead_lettering.get(queue, False)
        found = self.broker.core.queues.get(queue)
        return found is not None and found.settings.dead_letter_queue is not None

    def origin_of(self, delivery) -> tuple[str, str]:
        """The exchange and routing key a delivered message has in its queue, as RabbitMQ shows them: those it was
        published with, or for a message the broker dead-lettered here, those its source queue's dead-letter
        exchange and routing key gave it (when this front knows how that queue was declared)."""
        exchange, key = origin(delivery)
        source = delivery.dead_letter_source
        if source is not None:
            declared = self.book.queues.get(source)
            if declared is not None:
                exchange, key = dead_lettered_as(declared["arguments"], *origin(delivery, dead_letter_source=True))
        return exchange, key

    def consumer_full(self, queue: str) -> None:
        """A consumer of `queue` used up its prefetch room: consumers of lower priority may go on now."""
        for other in self.ranked.get(queue, ()):
            other.channel.credit.set()

    def consumer_ended(self, queue: str, consumer=None) -> None:
        if self.cluster_consumers is not None and consumer is not None:
            self.cluster_consumers.ended(consumer)
        ranked = self.ranked.get(queue)
        if ranked is not None and consumer in ranked:
            ranked.remove(consumer)
            if not ranked:
                del self.ranked[queue]
            self.consumer_full(queue)
        waiting = self.single_active.get(queue)
        if waiting is not None and consumer in waiting:
            first = waiting[0] is consumer
            waiting.remove(consumer)
            if first and waiting:
                waiting[0].channel.credit.set()  # the next one becomes active now
        self.consumers[queue] -= 1
        if self.consumers[queue] <= 0:
            del self.consumers[queue]
            if queue in self.auto_delete:
                self._delete_later(queue, if_unused=True)
                return
        self.used(queue)

    def set_expires(self, queue: str, seconds: float) -> None:
        self.expires[queue] = seconds
        self.used(queue)

    def used(self, queue: str) -> None:
        """The queue was declared, consumed from or read (basic.get): its x-expires countdown starts again,
        and runs only while it has no consumer. (In memory: after a restart the queue stays until redeclared.)"""
        seconds = self.expires.get(queue)
        if seconds is None:
            return
        self._used_at[queue] = asyncio.get_running_loop().time()
        timer = self._expiry.pop(queue, None)
        if timer is not None:
            timer.cancel()
        if not self.consumers[queue]:
            self._expiry[queue] = asyncio.get_running_loop().call_later(seconds, self._expire, queue)

    def _expire(self, queue: str) -> None:
        self._expiry.pop(queue, None)
        if self.consumers[queue]:
            return
        if self.routed and queue in self.expires:
            self._delete_later(queue, if_unused=True)
        elif self.expires.pop(queue, None) is not None:
            self._delete_later(queue)

    def _delete_later(self, name: str, *, if_unused: bool = False) -> None:
        """Delete queue `name` (its connection ended, its last consumer went, it expired). On a cluster node, for
        the last two (`if_unused`), only once no consumer of another node uses it either (`_used_elsewhere`)."""
        if self.server.state != "serving":
            return
        if self.routed and if_unused:
            task = asyncio.ensure_future(self._delete_if_unused(name))
        else:
            self.auto_delete.discard(name)
            task = asyncio.ensure_future(self._delete(name))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _delete_if_unused(self, name: str) -> None:
        """(Routed) wait IN_USE_S, then delete `name` if no consumer of any node used it meanwhile; else look
        again later: an x-expires queue after its countdown, an auto-delete one after IN_USE_S (the node whose
        consumers use it deletes it when its own last consumer goes)."""
        began = asyncio.get_running_loop().time()
        await asyncio.sleep(IN_USE_S)
        if self.server.state != "serving" or self.consumers[name] or self._used_at.get(name, -1.0) > began:
            return  # used through this node meanwhile: a consumer's end or the new countdown will look again
        try:
            busy = await self._used_elsewhere(name, IN_USE_S)
        except QueueNotFound:
            await self.forget_queue(name)
            return
        except ChuteError:  # unavailable (a takeover): look again later
            busy = True
        if busy:
            if name in self.expires:
                self.used(name)
            elif name in self.auto_delete:
                self._delete_later(name, if_unused=True)
            return
        self.auto_delete.discard(name)
        self.expires.pop(name, None)
        log.info("AMQP: queue %r deleted: unused (auto-delete or x-expires)", name)
        await self._delete(name)

    async def _used_elsewhere(self, name: str, window_s: float) -> bool:
        """Whether an AMQP consumer of any node is registered on queue `name`, or a consumer (of any node and any
        protocol) used it within the last `window_s` (`used_recently`)."""
        if await self.cluster_consumers.count(name):
            return True
        return used_recently(await state.value(self.broker.queue_stats(name)), window_s)

    async def consumer_count(self, name: str) -> int:
        """The AMQP consumers of queue `name`: of every node on a cluster node (the registry), else of this one."""
        if self.cluster_consumers is not None:
            return await self.cluster_consumers.count(name)
        return self.consumers[name]

    async def _delete(self, name: str) -> None:
        with contextlib.suppress(ChuteError):
            await self.broker.delete_queue(name)
        await self.forget_queue(name)

    # -- exclusive queues in a cluster ---------------------------------------------------------------------------

    async def exclusive_gone(self, session: AmqpSession, name: str, declared: dict | None) -> bool:
        """(Routed) whether `name` was an exclusive queue whose connection is gone, and is deleted now; 405 if
        another live connection, of this node or another, owns it. The owner is `declared["owner"]` (the
        connection's `owner_tag`: node name, incarnation, serial): its connection ended if its node's process
        is no longer alive (died, stopped, or restarted as another incarnation), or if it was a connection of
        this process that is closed."""
        owner = (declared or {}).get("owner") if (declared or {}).get("exclusive") else None
        if not owner or owner == getattr(session, "owner_tag", None):
            return False
        node, _, rest = owner.partition("|")
        incarnation = rest.partition("|")[0]
        if (node, incarnation) == tuple(self.broker.process):
            if any(each.owner_tag == owner for each in self.sessions):  # a live connection of this node
                raise locked(name)
        elif await self.broker.process_running(node, incarnation):
            raise locked(name)
        with contextlib.suppress(QueueNotFound):
            await self.broker.delete_queue(name)
        await self.forget_queue(name)
        log.info("AMQP: exclusive queue %r outlived its connection (%s): deleted", name, owner)
        return True

    async def _sweep_exclusive(self) -> None:
        """(Routed) every SWEEP_S, delete the exclusive queues of this node's shards whose connection is gone
        (its node died or left): RabbitMQ deletes them with their connection, which another node cannot see."""
        while not self.closing:
            await asyncio.sleep(SWEEP_S)
            try:
                for i, (name, queue) in enumerate(list(self.broker.core.queues.items())):
                    if i % SWEEP_STEP == SWEEP_STEP - 1:
                        await asyncio.sleep(0)  # many queues: the loop serves others between steps
                    if not metadata.may_be_exclusive(queue.settings):
                        continue
                    declared = metadata.declared_queue(queue.settings)
                    if declared is not None and declared.get("exclusive") and declared.get("owner"):
                        with contextlib.suppress(AmqpError):
                            await self.exclusive_gone(None, name, declared)
            except asyncio.CancelledError:
                raise
            except Exception:  # the database away, a shard moving: the next sweep looks again
                log.warning("AMQP: the sweep of exclusive queues failed", exc_info=True)

    async def forget_queue(self, name: str) -> None:
        """A queue is gone: drop its bindings from the book."""
        self.forgets += 1
        before = len(self.book.bindings)
        self.book.bindings = [b for b in self.book.bindings if b["queue"] != name]
        self.exclusive.pop(name, None)
        self.auto_delete.discard(name)
        self.expires.pop(name, None)
        self._used_at.pop(name, None)
        self.single_active.pop(name, None)
        self.dead_lettering.pop(name, None)
        self.pending_dead_letters.discard(name)
        changed = self.book.queues.pop(name, None) is not None
        timer = self._expiry.pop(name, None)
        if timer is not None:
            timer.cancel()
        if changed or len(self.book.bindings) != before:
            await self.save_book()
