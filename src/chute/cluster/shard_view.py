"""`ShardView`: a shard's `chute.Broker` as the HTTP API and SQS handlers of its owner get it (http_forward.py).

The handlers run on the shard's own broker, exactly as on a single broker; this view adds only what crosses
shards (relay.py), so that those fronts agree with the router:

- `subscribe` to a queue placed in another shard goes through a relay queue (the router's `_subscribe_relayed`);
  `update_subscription` and `unsubscribe` find a subscription under its relay queue's name;
- `topic_info` and `list_topics` name the real queue of a subscription through a relay; `list_queues` leaves
  relay queues out;
- `receive` and `peek` give relayed dead letters their reason and source;
- `create_queue` and `update_queue` with a dead-letter queue of another shard set it through a relay queue (the
  router's `_dead_letter_here`), and answer with the real name; `queue_info` answers for a queue of any shard,
  with the real name of its dead-letter queue;
- `dead_letter_sources` names the queues of every shard that dead-letter into a queue (the router's), and
  `delete_queue` refuses to delete such a queue, as a single broker refuses it for its own queues;
- `redrive` also sends dead letters relayed from other shards back to their sources (`redrive_relayed`), and
  `publish_batch` to a queue of another shard goes through the router (an SQS move task's destination).

Everything else is the broker's own attribute (`core`, `store`, `publish_batch`, ...). Invariant: the view holds
no state; a handler may keep it for one request only.
"""

from __future__ import annotations

import inspect

import msgspec

from chute.cluster.relay import (
    lift_relayed,
    real_settings,
    real_subscription,
    real_topic,
    refuse_if_dead_letter_queue,
    relay_name,
    relayed_queue,
    subscribed_name,
)


class ShardView:
    """The broker of `shard` (served here), seen through the router `router` of this node."""

    def __init__(self, broker, router, shard: int) -> None:
        self._broker = broker
        self._router = router
        self._shard = shard

    def __getattr__(self, name: str):
        return getattr(self._broker, name)

    async def subscribe(self, topic: str, pattern: str, queue: str, *, filter: dict | None = None,
                        start: str | float = "now"):  # fmt: skip
        broker = self._broker
        if queue not in broker.core.queues and relayed_queue(queue) is None:
            placed = await self._router.placement.lookup(queue)
            if placed is not None and placed.kind == "queue" and placed.shard != self._shard:
                return await self._router._subscribe_relayed(broker, topic, pattern, queue, filter, start)
        return await broker.subscribe(topic, pattern, queue, filter=filter, start=start)

    async def update_subscription(self, topic: str, pattern: str, queue: str, *, filter: dict | None = None):
        name = subscribed_name(self._broker, topic, pattern, queue)
        info = await self._broker.update_subscription(topic, pattern, name, filter=filter)
        return info if name == queue else real_subscription(info)

    async def unsubscribe(self, topic: str, pattern: str, queue: str) -> None:
        name = subscribed_name(self._broker, topic, pattern, queue)
        await self._broker.unsubscribe(topic, pattern, name)
        if name == relay_name(queue):
            self._router.relays.unused(name)

    async def create_queue(self, name: str, settings=None, **settings_kw):
        """As `Broker.create_queue`; a dead-letter queue of another shard is fed through a relay queue."""
        if settings is not None and settings.dead_letter_queue is not None:
            wanted = {"dead_letter_queue": settings.dead_letter_queue}
            dlq = (await self._router._dead_letter_here(self._broker, wanted))["dead_letter_queue"]
            settings = msgspec.structs.replace(settings, dead_letter_queue=dlq)
        elif settings is None:
            settings_kw = await self._router._dead_letter_here(self._broker, settings_kw)
        return real_settings(await self._broker.create_queue(name, settings, **settings_kw))

    async def update_queue(self, name: str, **changes):
        """As `Broker.update_queue`; a dead-letter queue of another shard is fed through a relay queue."""
        changes = await self._router._dead_letter_here(self._broker, changes)
        return real_settings(await self._broker.update_queue(name, **changes))

    def queue_info(self, name: str):
        """As `Broker.queue_info`, for a queue of any shard (an awaitable for another node's)."""
        if name in self._broker.core.queues:
            return real_settings(self._broker.queue_info(name))
        return self._queue_info_elsewhere(name)

    async def _queue_info_elsewhere(self, name: str):
        info = self._router.queue_info(name)
        return real_settings(await info if inspect.isawaitable(info) else info)

    def dead_letter_sources(self, name: str):
        return self._router.dead_letter_sources(name)

    async def delete_queue(self, name: str) -> None:
        await refuse_if_dead_letter_queue(self._router, name)
        await self._broker.delete_queue(name)

    async def redrive(self, queue: str, max_messages: int | None = None) -> int:
        """As `Broker.redrive`, then the dead letters relayed from queues of other shards (the router's)."""
        return await self._router.redrive(queue, max_messages)

    async def publish_batch(self, dest: str, messages, **kwargs):
        core = self._broker.core
        if dest in core.queues or dest in core.topics:
            return await self._broker.publish_batch(dest, messages, **kwargs)
        return await self._router.publish_batch(dest, messages, **kwargs)

    def topic_info(self, name: str):
        return real_topic(self._broker.topic_info(name))

    def list_topics(self):
        return [real_topic(info) for info in self._broker.list_topics()]

    def list_queues(self):
        return [real_settings(info) for info in self._broker.list_queues() if relayed_queue(info.name) is None]

    async def receive(self, queue: str, *args, **kwargs):
        deliveries = await self._broker.receive(queue, *args, **kwargs)
        for delivery in deliveries:
            lift_relayed(delivery)
        return deliveries

    async def peek(self, queue: str, *args, **kwargs):
        deliveries = await self._broker.peek(queue, *args, **kwargs)
        for delivery in deliveries:
            lift_relayed(delivery)
        return deliveries
