"""`Channel` and `AmqpConsumer`: one AMQP channel's deliveries, prefetch and acknowledgements.

A channel numbers its deliveries (delivery tags 1, 2, 3, ...) and maps each unacked tag to the Chute queue and
receipt it stands for. basic.ack / nack / reject settle tags (with `multiple`, every tag up to one); closing the
channel (or the connection) releases every unacked delivery at once, so another consumer gets it.

Prefetch: basic.qos with global=false sets the limit of each consumer started afterwards (as RabbitMQ does);
global=true the limit of the whole channel. A consumer leases at most its remaining credit (the smaller of the
two) per batch, and nothing while the connection's write buffer is full.

Consumer timeout: a delivery left unacked for the server's `amqp_consumer_timeout_s` (RabbitMQ's
`consumer_timeout`, 30 min by default) closes its channel with 406 PRECONDITION_FAILED, as RabbitMQ does, which
gives every unacked delivery of the channel back. Deliveries are leased a minute longer than that (`lease_s`),
so the lease never ends first while the channel lives; a no-ack consumer's deliveries are acked as they are sent
(at most once).

On a cluster node, a consumer of a queue that another node serves long-polls it there (up to POLL_S per call);
a poll still running when its consumer is cancelled runs to its end and gives back what it leased at once.

Invariants: every tag in `unacked` is leased from the broker under its receipt and released or settled exactly
once; a consumer's deliveries are written in tag order; after `close()` nothing more is delivered on the channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING

from pamqp import commands

from chute.amqp import dead_letter, reply_to
from chute.amqp.errors import PRECONDITION_FAILED, AmqpError
from chute.amqp.frames import deliver_method, get_ok_method
from chute.amqp.mapping import content_header, on_the_wire
from chute.errors import ChuteError, QueueNotFound
from chute.model import MAX_LEASE_S, Delivery

if TYPE_CHECKING:
    from chute.amqp.session import AmqpSession

log = logging.getLogger("chute.amqp")
LEASE_MARGIN_S = 60.0  # a lease outlasts the consumer timeout by this much: the channel closes first
POLL_S = 1.0  # longest single long poll of a consumer
MAX_BATCH = 256  # deliveries leased per batch
CREDIT_RECHECK_S = 0.5
CONSUMER_IDS = itertools.count(1)


class AmqpConsumer:
    __slots__ = ("channel", "tag", "queue", "no_ack", "exclusive", "prefetch", "outstanding", "task", "priority", "id")

    def __init__(self, channel: Channel, tag: str, queue: str, no_ack: bool, exclusive: bool, prefetch: int,
                 priority: int = 0):  # fmt: skip
        self.channel = channel
        self.tag = tag
        self.queue = queue
        self.no_ack = no_ack
        self.exclusive = exclusive
        self.prefetch = prefetch  # 0: unlimited
        self.outstanding = 0  # unacked deliveries of this consumer
        self.id = next(CONSUMER_IDS)  # shown in the HTTP API and the dashboard
        self.priority = priority  # x-priority: higher ones get messages first while they have prefetch room
        self.task: asyncio.Task | None = None

    def credit(self) -> int:
        channel = self.channel
        credit = MAX_BATCH
        if self.prefetch and not self.no_ack:
            credit = min(credit, self.prefetch - self.outstanding)
        if channel.prefetch and not self.no_ack:
            credit = min(credit, channel.prefetch - len(channel.unacked))
        return credit

    async def run(self) -> None:
        channel = self.channel
        session = channel.session
        broker = session.broker
        try:
            while not channel.closed:
                await session.writable.wait()
                credit = self.credit() if session.front.may_deliver(self.queue, self) else 0
                if credit <= 0:
                    channel.credit.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(CREDIT_RECHECK_S):
                            await channel.credit.wait()
                    continue
                if session.front.routed and not broker.holds(self.queue):  # another node's: long-poll it there
                    deliveries = await self._long_poll(broker, credit)
                    if not deliveries:
                        continue
                elif not session.front.routed and _none_ready(broker, self.queue):
                    deliveries = []  # (no receive that would find nothing: wait for the queue's next change)
                else:
                    deliveries = await broker.receive(self.queue, credit, lease_s=lease_s(session),
                                                      max_bytes=session.body_budget)  # fmt: skip
                if not deliveries:
                    # Wait without leasing (as receive's own long poll would, at the same cost): once woken, the
                    # loop asks `may_deliver` again, so a consumer of higher priority that arrived meanwhile
                    # goes first.
                    await broker._wait_ready(self.queue, POLL_S)
                    continue
                if channel.closed or self.task is None:
                    broker.release(self.queue, [d.receipt for d in deliveries])
                    return
                channel.deliver(self, deliveries)
        except asyncio.CancelledError:
            raise
        except QueueNotFound:  # the queue was deleted: RabbitMQ tells the client with basic.cancel
            channel.consumer_gone(self, notify=True)
        except ChuteError as exc:
            log.info("consumer %s on %s ended: %s", self.tag, self.queue, exc.message)
            channel.consumer_gone(self, notify=True)
        except Exception:
            log.exception("consumer %s on %s failed", self.tag, self.queue)
            channel.consumer_gone(self, notify=True)


    async def _long_poll(self, broker, credit: int) -> list[Delivery]:
        """(Cluster node) receive with a wait of up to POLL_S. The call runs to its end even if the consumer is
        cancelled meanwhile (basic.cancel, the channel closing): what it leased then is released at once, rather
        than left invisible for a whole lease by a reply nobody reads."""
        session = self.channel.session
        fetch = asyncio.ensure_future(broker.receive(self.queue, credit, lease_s=lease_s(session), wait_s=POLL_S,
                                                     max_bytes=session.body_budget))  # fmt: skip
        try:
            return await asyncio.shield(fetch)
        except asyncio.CancelledError:
            fetch.add_done_callback(functools.partial(_release_late, broker, self.queue))
            raise


def _none_ready(broker, name: str) -> bool:
    """(One broker) whether queue `name` exists and has no ready message now."""
    queue = broker.core.queues.get(name)
    return queue is not None and not queue.ready


def _release_late(broker, queue: str, fetch: asyncio.Future) -> None:
    if not fetch.cancelled() and fetch.exception() is None and fetch.result():
        broker.release(queue, [delivery.receipt for delivery in fetch.result()])


def lease_s(session: AmqpSession) -> float:
    """The lease of an AMQP delivery: longer than the consumer timeout, at most Chute's longest lease."""
    return min(MAX_LEASE_S, session.server.config.amqp_consumer_timeout_s + LEASE_MARGIN_S)


class Channel:
    """One open channel of a session."""

    def __init__(self, session: AmqpSession, number: int) -> None:
        self.session = session
        self.number = number
        self.consumers: dict[str, AmqpConsumer] = {}
        # tag -> (queue, receipt, consumer or None for basic.get, loop time sent, the delivery if its queue
        # dead-letters: a rejection republishes it with x-death, see dead_letter.py)
        self.unacked: OrderedDict[int, tuple[str, int, AmqpConsumer | None, float, Delivery | None]] = OrderedDict()
        self.next_tag = 1
        self.prefetch = 0  # channel-wide limit (qos global=true); 0: none
        self.consumer_prefetch = 0  # limit of consumers started from now on (qos global=false)
        self.confirm = False
        self.publish_seq = 0  # last publish sequence number in confirm mode
        self.unconfirmed: set[int] = set()
        self.publishing: set[asyncio.Task] = set()  # publish batches not yet confirmed by the broker
        self.routing: asyncio.Task | None = None  # (cluster node) the last batch's routing (publish_routing.py)
        self.tx = None  # tx.Transaction after tx.select: publishes and settles wait for tx.commit
        self.reply_to: tuple[str, str] | None = None  # (token, consumer tag) of a direct reply-to consumer
        self.last_queue = ""  # the queue of the last queue.declare ("" in later methods means this one)
        self.credit = asyncio.Event()
        self._timeout: asyncio.TimerHandle | None = None  # the consumer-timeout check of the oldest one
        self.closed = False
        self.inbox: list = []  # events waiting for the channel's worker (methods run one at a time, in order)
        self.worker: asyncio.Task | None = None

    # -- delivering -------------------------------------------------------------------------------------------

    def deliver(self, consumer: AmqpConsumer | None, deliveries: list[Delivery], *, get_count: int = 0,
                get_no_ack: bool = False) -> None:
        """Number the deliveries, remember them as unacked (unless no-ack) and write them."""
        session = self.session
        conn = session.conn
        parts = []
        acks = []
        now = session.loop_time()
        for delivery in deliveries:
            tag = self.next_tag
            self.next_tag += 1
            properties = content_header(delivery)
            exchange, key = on_the_wire(*session.front.origin_of(delivery))
            redelivered = delivery.delivery_count > 1
            if consumer is None:  # basic.get
                method = get_ok_method(tag, redelivered, exchange, key, get_count)
                no_ack = get_no_ack
            else:
                method = deliver_method(consumer.tag, tag, redelivered, exchange, key)
                no_ack = consumer.no_ack
            if no_ack:
                acks.append(delivery.receipt)
            else:
                keep = delivery if session.front.dead_letters(delivery.queue) else None
                self.unacked[tag] = (delivery.queue, delivery.receipt, consumer, now, keep)
                if consumer is not None:
                    consumer.outstanding += 1
            parts.append(conn.send_content(self.number, method, properties, delivery.body))
        session.write(b"".join(parts))
        if self._timeout is None and self.unacked:
            self._timeout = asyncio.get_running_loop().call_later(session.server.config.amqp_consumer_timeout_s,
                                                                  self._check_timeout)  # fmt: skip
        if consumer is not None and consumer.credit() <= 0:
            session.front.consumer_full(consumer.queue)
        if acks:
            session.settle_later(deliveries[0].queue, "ack", acks)

    def _check_timeout(self) -> None:
        """The oldest unacked delivery's consumer timeout: 406 closes the channel if it passed, else look again
        when it will."""
        self._timeout = None
        if self.closed or not self.unacked:
            return
        session = self.session
        timeout_s = session.server.config.amqp_consumer_timeout_s
        oldest = next(iter(self.unacked.values()))  # tags are in the order they were sent
        left = oldest[3] + timeout_s - session.loop_time()
        if left > 0:
            self._timeout = asyncio.get_running_loop().call_later(left, self._check_timeout)
            return
        session.channel_error(self.number, AmqpError(PRECONDITION_FAILED, f"delivery acknowledgement on channel "
                              f"{self.number} timed out. Timeout value used: {round(timeout_s * 1000)} ms. This "
                              "timeout value can be configured, see consumers doc guide to learn more"))  # fmt: skip

    def settle(self, method, tag: int, multiple: bool, action: str, requeue: bool = True) -> None:
        """basic.ack / nack / reject: settle `tag` (and every earlier one with `multiple`); 406 if unknown."""
        if multiple:
            tags = [t for t in self.unacked if t <= tag] if tag else list(self.unacked)
        elif tag in self.unacked:
            tags = [tag]
        else:
            tags = []
        if not tags and (tag or not multiple):
            raise AmqpError(PRECONDITION_FAILED, f"unknown delivery tag {tag}", method=method)
        by_queue: dict[str, list[int]] = {}
        rejected: dict[str, list[Delivery]] = {}  # deliveries dead-lettered with their x-death (dead_letter.py)
        for each in tags:
            queue, receipt, consumer, _, delivery = self.unacked.pop(each)
            if consumer is not None:
                consumer.outstanding -= 1
            if delivery is not None and action != "ack" and not requeue:
                rejected.setdefault(queue, []).append(delivery)
            else:
                by_queue.setdefault(queue, []).append(receipt)
        self.credit.set()
        for queue, receipts in by_queue.items():
            self.session.settle_later(queue, action if action == "ack" else ("nack" if requeue else "reject"),
                                      receipts)  # fmt: skip
        for queue, deliveries in rejected.items():
            task = self.session.spawn(dead_letter.reject(self.session, queue, deliveries))
            self.publishing.add(task)  # tx.commit waits for it
            task.add_done_callback(self.publishing.discard)
            self.session.track_settling(task)

    def recover(self) -> None:
        """basic.recover: every unacked delivery goes back to its queue (delivered again, marked redelivered)."""
        self._release_unacked()
        self.credit.set()

    def consumer_gone(self, consumer: AmqpConsumer, *, notify: bool) -> None:
        if self.consumers.get(consumer.tag) is consumer:
            del self.consumers[consumer.tag]
            if consumer.exclusive:
                self.session.front.exclusive_consumers.discard(consumer.queue)
            self.session.front.consumer_ended(consumer.queue, consumer)
            if notify and not self.closed and self.session.capabilities.get("consumer_cancel_notify"):
                self.session.write(self.session.conn.send_method(self.number, commands.Basic.Cancel(
                    consumer_tag=consumer.tag, nowait=True)))  # fmt: skip
        consumer.task = None

    def cancel(self, tag: str) -> None:
        if self.reply_to is not None and self.reply_to[1] == tag:
            reply_to.forget(self)
            return
        consumer = self.consumers.get(tag)
        if consumer is not None:
            task = consumer.task
            self.consumer_gone(consumer, notify=False)
            if task is not None:
                task.cancel()

    def close(self) -> None:
        """The channel ends: stop its consumers, release its unacked deliveries."""
        if self.closed:
            return
        self.closed = True
        self.credit.set()
        if self._timeout is not None:
            self._timeout.cancel()
            self._timeout = None
        for tag in list(self.consumers):
            self.cancel(tag)
        reply_to.forget(self)
        if self.worker is not None and self.worker is not asyncio.current_task():
            self.worker.cancel()
        self.inbox.clear()
        self._release_unacked()

    def _release_unacked(self) -> None:
        by_queue: dict[str, list[int]] = {}
        for queue, receipt, consumer, _, _ in self.unacked.values():
            by_queue.setdefault(queue, []).append(receipt)
            if consumer is not None:
                consumer.outstanding -= 1
        self.unacked.clear()
        for queue, receipts in by_queue.items():
            self.session.broker.release(queue, receipts)
