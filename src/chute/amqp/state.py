"""What the AMQP front reads of the broker's state, on one broker or through a cluster node's router.

On a plain `chute.Broker` (one node) every read is the core's, at once. On a cluster node the broker is the
router (`ClusterBroker`, `routed = True`), whose shards may be served by other nodes: each read becomes a call
the router answers for any shard (`queue_info`, `topic_info`, `route`, `dead_letter_sources`, `queue_stats`;
chute/_reads.py), at once for this node's shards and over the peer connection for the others. The functions
here are coroutines; the hot paths (publishing, delivering) keep their direct reads when the broker is not
routed.

`refresh_exchange` / `refresh_queue` bring the exchange book (exchanges.py) up to date with what the topic's or
queue's `attributes` say now (metadata.py), for a node whose book cannot have seen changes made through other
nodes. On one broker the book is always up to date (every change goes through this front), so they do nothing.

Invariant: a read changes nothing; a queue or topic that does not exist reads as None (or empty), never an error.
A refresh whose read was in flight while this node forgot a queue or an exchange (`front.forgets` moved) reads
again before it takes anything (up to READS_WHILE_FORGETTING times): settings read before a delete and taken
after it would keep the name in the book, the front's tables and its `stored` copy, after its queue is gone.
"""

from __future__ import annotations

import inspect
import time

from chute.amqp import exchanges as ex
from chute.amqp import metadata
from chute.errors import QueueNotFound, TopicNotFound
from chute.model import QueueSettings, TopicSettings

EXCHANGE_FRESH_S = 1.0  # how long a routed node trusts its book's copy of an exchange for publishes
IN_USE_S = 2.5  # (routed) a queue asked for messages this recently is in use by some node's consumer
USE_MARGIN_S = 0.2  # (routed) what `IN_USE_S` allows for the queue's node's clock and the call's own time
READS_WHILE_FORGETTING = 3  # reads of one refresh at most, while this node forgets queues or exchanges meanwhile


def routed(broker) -> bool:
    """Whether `broker` is a cluster node's router (its state is not all in this process)."""
    return getattr(broker, "routed", False)


async def value(result):
    """`result`, awaited if the router answered with an awaitable."""
    return await result if inspect.isawaitable(result) else result


async def queue_settings(broker, name: str) -> QueueSettings | None:
    """The settings of queue `name`, or None if there is no such queue."""
    if not routed(broker):
        queue = broker.core.queues.get(name)
        return queue.settings if queue is not None else None
    try:
        return (await value(broker.queue_info(name))).settings
    except QueueNotFound:
        return None


async def queue_exists(broker, name: str) -> bool:
    if not routed(broker):
        return name in broker.core.queues
    return await queue_settings(broker, name) is not None


async def topic_settings(broker, name: str) -> TopicSettings | None:
    """The settings of topic `name`, or None if there is no such topic."""
    if not routed(broker):
        topic = broker.core.topics.get(name)
        return topic.settings if topic is not None else None
    try:
        return (await value(broker.topic_info(name))).settings
    except TopicNotFound:
        return None


async def route(broker, topic: str, subject: str, headers: dict | None) -> list[str] | None:
    """The queues a message to `topic` with `subject` and `headers` reaches now; None if there is no such topic."""
    if not routed(broker):
        found = broker.core.topics.get(topic)
        return [queue.name for queue in found.route(subject, headers)] if found is not None else None
    try:
        return await value(broker.route(topic, subject, headers))
    except TopicNotFound:
        return None


async def zero_word_route(broker, topic: str, headers: dict | None) -> list[str]:
    """The queues a topic-exchange publish with the empty routing key reaches: those `route` gives for its subject
    that have a subscription of a binding matching no words (exchanges.ZERO_WORD_PATTERNS)."""
    reached = await route(broker, topic, ex.FANOUT_SUBJECT, headers)
    if not reached:
        return []
    try:
        info = await value(broker.topic_info(topic))
    except TopicNotFound:
        return []
    zero = {s.queue for s in info.subscriptions if s.pattern in ex.ZERO_WORD_PATTERNS}
    return [queue for queue in reached if queue in zero]


async def dead_letter_sources(broker, name: str) -> list[str]:
    """The queues whose dead-letter queue is `name`."""
    if not routed(broker):
        return sorted(q.name for q in broker.core.queues.values() if q.settings.dead_letter_queue == name)
    return await value(broker.dead_letter_sources(name))


async def ready(broker, name: str) -> int:
    """Messages ready in queue `name` (0 if it is gone)."""
    try:
        return (await value(broker.queue_stats(name))).ready
    except QueueNotFound:
        return 0


async def place_near(broker, name: str, dead_letter_queue: str) -> None:
    """(A routed node) place a new queue in the shard of its dead-letter queue: a queue and its dead-letter queue
    share a shard (the broker moves a dead letter inside one shard)."""
    if not routed(broker):
        return
    shard = await broker.placement.shard_of(dead_letter_queue, "queue")
    if shard is not None:
        await broker.placement.place(name, "queue", near=shard)


async def refresh_exchange(front, name: str, *, max_age_s: float = 0.0) -> None:
    """(A routed node) take exchange `name`'s declaration and exchange-to-exchange bindings from its topic's
    attributes, unless this node read them less than `max_age_s` ago. A predeclared exchange stays declared."""
    if not routed(front.broker) or not name:
        return
    now = time.monotonic()
    if max_age_s and now - front.exchanges_read.get(name, -1e9) < max_age_s:
        return
    settings = await _settled(front, topic_settings, ex.TOPIC_PREFIX + name)
    metadata.take_topic(front.book, front.stored, name, settings)
    if settings is None and name in ex.PREDECLARED_NAMES:
        front.predeclare(name)
    if settings is None and name not in ex.PREDECLARED_NAMES:
        front.exchanges_read.pop(name, None)  # no entry for a name that names nothing (it would outlive nothing)
    else:
        front.exchanges_read[name] = now


async def refresh_queue(front, name: str) -> QueueSettings | None:
    """(A routed node) take queue `name`'s declared flags and AMQP bindings from its attributes; its settings."""
    if not routed(front.broker):
        return await queue_settings(front.broker, name)
    settings = await _settled(front, queue_settings, name)
    metadata.take_queue(front.book, front.stored, name, settings)
    front.note_queue(name, settings)
    return settings


async def _settled(front, read, name: str):
    """`read(broker, name)`, read again while this node forgot a queue or an exchange meanwhile (the first read
    may predate that delete), at most READS_WHILE_FORGETTING reads in all."""
    for _ in range(READS_WHILE_FORGETTING):
        forgets = front.forgets
        settings = await read(front.broker, name)
        if front.forgets == forgets:
            break
    return settings


def used_recently(stats, window_s: float = IN_USE_S) -> bool:
    """Whether a queue's `stats` show a consumer of some node using it within the last `window_s`: it holds
    leased messages, or it asked for messages (a consumer with room asks at least once a second, a long poll's
    length). How a cluster node judges the use of a queue by other nodes' consumers, which it cannot count."""
    recent = stats.received_age_s is not None and stats.received_age_s < window_s - USE_MARGIN_S
    return stats.in_flight > 0 or recent
