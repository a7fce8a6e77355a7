"""The management half of `chute.Broker`: queues, topics and subscriptions, their settings and stats.

`ManagementApi` is a mixin of `Broker` (broker.py) and uses its engine room (`_check`, `_run`, `_durable`,
`core`, `store`, `clock`); it holds no state of its own. Every call validates through the core before anything
changes, and returns once the change is durable.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import msgspec

from chute.consumer import Consumer
from chute.core import records as rec
from chute.core.admin import PURGE_STEP
from chute.core.ids import publish_time
from chute.core.routing import Pattern
from chute.errors import ChuteError, InvalidArgument
from chute.model import QueueInfo, QueueSettings, QueueStats, SubscriptionInfo, TopicInfo, TopicSettings

if TYPE_CHECKING:
    from chute.core.broker import BrokerCore

# What the private queue of an ephemeral subscription holds at most: a consumer that falls behind (or stops
# reading its connection) loses the oldest messages, at most once, rather than growing the broker's memory
# without bound; the pending limits of a NATS subscription (65,536 messages, 64 MiB) are the precedent.
EPHEMERAL_LIMITS = QueueSettings(max_length=65_536, max_bytes=64 * 2**20, overflow="drop-oldest")


class ManagementApi:
    """create / update / delete / purge / list queues; topics; subscriptions; stats."""

    core: BrokerCore

    async def create_queue(self, name: str, settings: QueueSettings | None = None, **settings_kw) -> QueueInfo:
        """Create a queue (idempotent with the same settings; QueueExists with others). Settings may be given as
        a QueueSettings or as keywords (`lease_s=10, max_deliveries=5, ...`)."""
        self._check()
        if settings is None:
            settings = _convert(QueueSettings, settings_kw)
        elif settings_kw:
            raise InvalidArgument("give settings or keywords, not both")
        queue, _ = self._run(self.core.create_queue, name, settings)
        await self._durable()
        return QueueInfo(name=queue.name, settings=queue.settings)

    async def update_queue(self, name: str, **changes) -> QueueInfo:
        """Change some settings of a queue (keywords as in QueueSettings)."""
        self._check()
        queue = self._run(self.core.update_queue, name, changes)
        await self._durable()
        return QueueInfo(name=queue.name, settings=queue.settings)

    async def delete_queue(self, name: str) -> None:
        """Delete a queue with its messages and the subscriptions that feed it."""
        self._check()
        self._run(self.core.delete_queue, name)
        if self.core.detached:  # a large queue: its messages' space is given back in steps, in the background
            self._release_task = asyncio.ensure_future(self._release_detached())
        await self._durable()

    async def _release_detached(self) -> None:
        while self.core.release_detached(PURGE_STEP) and self._state == "serving":
            await asyncio.sleep(0)

    async def purge_queue(self, name: str, *, in_flight: bool = False) -> int:
        """Remove every message of a queue that is not in flight; return how many. With `in_flight=True`, the
        messages in flight go too (as SQS's PurgeQueue does): they never come back when their lease ends, and
        their receipts are unknown from then on (an ack or nack of one raises InvalidReceipt).

        A small queue is purged at once (one PURGE record). A large one is purged in steps of `PURGE_STEP`
        messages, one turn of the event loop each, so other work goes on: every message published before the
        call is removed (unless in flight and not `in_flight`); one published during it may be removed too (as
        with SQS's PurgeQueue). Each step is durable on its own: a crash in the middle leaves the rest. Either
        way the purge holds after a restart."""
        self._check()
        if not isinstance(in_flight, bool):
            raise InvalidArgument(f"in_flight must be true or false, got {in_flight!r}")
        queue = self.core.queue(name)
        if (queue.length if in_flight else queue.length - len(queue.in_flight)) <= PURGE_STEP:
            count = self._run(self.core.purge_queue, name, in_flight=in_flight)
            await self._durable()
            return count
        up_to_id, total, token = self.core.ids.last, 0, None
        while True:
            count = self._run(self.core.purge_step, name, PURGE_STEP, up_to_id, in_flight=in_flight)
            token = self._pending_token or token
            total += count
            if count < PURGE_STEP:
                break
            await asyncio.sleep(0)
            self._check()
        self._pending_token = token  # the store confirms in order: the last step's token covers the others
        await self._durable()
        return total

    def list_queues(self) -> list[QueueInfo]:
        """Durable queues, by name."""
        return [
            QueueInfo(name=q.name, settings=q.settings)
            for q in sorted(self.core.queues.values(), key=lambda q: q.name)
            if not q.ephemeral
        ]

    def queue_stats(self, name: str) -> QueueStats:
        """Depth and counters of a queue."""
        queue = self.core.queue(name)
        oldest = queue.oldest_ready()
        counters = queue.counters
        return QueueStats(
            name=name, ready=queue.ready + queue.waiting, in_flight=len(queue.in_flight), delayed=len(queue.delayed),
            bytes=queue.bytes, dead_lettered=counters["dead"],
            oldest_age_s=max(0.0, self.clock() - oldest.publish_time) if oldest is not None else 0.0,
            published=counters["published"], delivered=counters["delivered"], acked=counters["acked"],
            nacked=counters["nacked"], redelivered=counters["redelivered"],
            received_age_s=None if queue.received_at is None else max(0.0, self.clock() - queue.received_at),
        )  # fmt: skip

    async def create_topic(self, name: str, settings: TopicSettings | None = None, **settings_kw) -> TopicInfo:
        """Create a topic (idempotent with the same settings)."""
        self._check()
        if settings is None:
            settings = _convert(TopicSettings, settings_kw)
        topic, _ = self._run(self.core.create_topic, name, settings)
        await self._durable()
        return self._topic_info(topic)

    async def update_topic(self, name: str, **changes) -> TopicInfo:
        """Change some settings of a topic (keywords as in TopicSettings); a lower retention trims at once."""
        self._check()
        topic = self._run(self.core.update_topic, name, changes, self.clock())
        await self._durable()
        return self._topic_info(topic)

    async def delete_topic(self, name: str) -> None:
        """Delete a topic and its subscriptions; their queues stay."""
        self._check()
        self._run(self.core.delete_topic, name)
        await self._durable()

    def topic_info(self, name: str) -> TopicInfo:
        """A topic's settings and subscriptions (TopicNotFound if there is none)."""
        return self._topic_info(self.core.topic(name))

    def list_topics(self) -> list[TopicInfo]:
        return [self._topic_info(t) for t in sorted(self.core.topics.values(), key=lambda t: t.name)]

    def _topic_info(self, topic) -> TopicInfo:
        subscriptions = [
            SubscriptionInfo(
                topic=topic.name,
                pattern=s.pattern,
                queue=s.queue.name,
                filter=s.filter.spec or None,
                ephemeral=s.queue.ephemeral,
            )  # fmt: skip
            for s in topic.subscriptions.values()
        ]
        return TopicInfo(name=topic.name, settings=topic.settings, subscriptions=subscriptions)

    async def subscribe(
        self, topic: str, pattern: str, queue: str, *, filter: dict | None = None, start: str | float = "now"
    ) -> SubscriptionInfo:
        """Bind `pattern` (+ header `filter`) on `topic` to `queue`. `start`: "now", "earliest" (every retained
        message) or a timestamp (retained messages published at or after it)."""
        self._check()
        since = _start_time(start)
        subscription = self._run(self.core.subscribe, topic, pattern, queue, filter)
        if since is not None:
            binding, self._pending_token = self._pending_token, None  # taken before the backfill awaits
            await self._backfill(subscription, since)
            await self._durable()
            await self._wait_for(binding)
        else:
            await self._durable()
        return SubscriptionInfo(topic=topic, pattern=subscription.pattern, queue=queue,
                                filter=subscription.filter.spec or None)  # fmt: skip

    async def _backfill(self, subscription, since: float) -> None:
        topic = subscription.topic
        items = [item for item in topic.retained if publish_time(item[0]) >= since]
        payloads = await self.store.read([ref for _, ref, _ in items]) if items else []
        chosen = []
        pattern = Pattern(subscription.pattern)
        for (message_id, ref, size), payload in zip(items, payloads, strict=True):
            record = rec.decode_message(payload)
            if pattern.matches(record.subject or topic.name) and subscription.filter.matches(record.headers or {}):
                chosen.append((message_id, ref, size, record.priority, record.group, record.expires_ms))
        still_retained = {item[0] for item in topic.retained}  # retention may have trimmed some while we read
        chosen = [item for item in chosen if item[0] in still_retained]
        if chosen and subscription.queue.name in self.core.queues:
            self._run(self.core.enqueue_retained, subscription.queue.name, chosen, self.clock())

    async def update_subscription(
        self, topic: str, pattern: str, queue: str, *, filter: dict | None = None
    ) -> SubscriptionInfo:
        """Replace the header filter of an existing subscription (`None`: no filter); SubscriptionNotFound if
        `queue` is not bound to `pattern` on `topic`."""
        self._check()
        subscription = self._run(self.core.update_subscription, topic, pattern, queue, filter)
        await self._durable()
        return SubscriptionInfo(topic=topic, pattern=subscription.pattern, queue=queue,
                                filter=subscription.filter.spec or None,
                                ephemeral=subscription.queue.ephemeral)  # fmt: skip

    async def unsubscribe(self, topic: str, pattern: str, queue: str) -> None:
        self._check()
        self._run(self.core.unsubscribe, topic, pattern, queue)
        await self._durable()

    async def subscribe_ephemeral(
        self, topic: str, pattern: str = ">", *, filter: dict | None = None, prefetch: int = 100
    ) -> Consumer:
        """A consumer of a subscription that lives only as long as it does: in memory, at-most-once (messages
        published while nobody listens are not kept; a delivered message is never delivered again)."""
        queue = self.ephemeral_subscription(topic, pattern, filter=filter)
        return Consumer(self, queue, prefetch=prefetch, lease_s=None, owns_queue=True)

    def ephemeral_subscription(self, topic: str, pattern: str = ">", *, filter: dict | None = None) -> str:
        """Bind `pattern` (+ `filter`) on `topic` to a new private in-memory queue and return its name. Nothing
        is written to the log; the queue keeps at most EPHEMERAL_LIMITS (the oldest go first); whoever made it
        ends it with `end_ephemeral` (a network consumer, when it or its connection ends)."""
        self._check()
        queue = self.core.create_ephemeral_queue()
        queue.apply_settings(EPHEMERAL_LIMITS)
        try:
            self._run(self.core.subscribe, topic, pattern, queue.name, filter)
        except ChuteError:
            self.core.delete_queue(queue.name)
            raise
        return queue.name

    def end_ephemeral(self, queue: str) -> None:
        """Delete an ephemeral subscription's queue, with its subscription and messages, and wake whoever waits
        on it. A no-op if it is gone already (or is not an ephemeral queue)."""
        found = self.core.queues.get(queue)
        if found is not None and found.ephemeral:
            self.core.delete_queue(queue)
        self._queue_deleted_or_closed(queue)


def _convert(cls, values: dict):
    try:
        return msgspec.convert(values, cls)
    except msgspec.ValidationError as exc:
        raise InvalidArgument(f"invalid settings: {exc}") from None


def _start_time(start: str | float) -> float | None:
    if start == "now":
        return None
    if start == "earliest":
        return 0.0
    if isinstance(start, int | float) and not isinstance(start, bool) and start >= 0:
        return float(start)
    raise InvalidArgument(f"start must be 'now', 'earliest' or a timestamp, got {start!r}")
