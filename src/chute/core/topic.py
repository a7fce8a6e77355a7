"""A topic: a named fan-out point with subscriptions and optional retention.

A subscription binds a subject pattern (and an optional header filter) to a queue. Publishing routes a message
to every matching subscription's queue, once per queue even if several of its subscriptions match.

A queue knows the subscriptions that feed it (`Queue.feeds`, kept by `add_subscription` and
`remove_subscription`, the only ways in and out of `subscriptions`), so deleting a queue does not walk every
topic.

Retention keeps (id, ref, size) of recent messages, oldest first, so a new subscription can start from
`earliest` or a timestamp. Invariants: `retained_bytes` is the sum of retained sizes; every retained ref holds
one live reference in the store (taken on publish, given back on trim); trimming is by publish time (carried by
the id) and by total bytes, oldest first.
"""

from __future__ import annotations

from collections import deque

from chute.core.dedup import DedupWindow
from chute.core.filters import HeaderFilter, compile_filter
from chute.core.ids import publish_time
from chute.core.queue import Queue
from chute.core.routing import SubjectIndex, validate_pattern
from chute.model import TopicSettings


class Subscription:
    """A binding of `pattern` (+ header filter) on a topic to a queue."""

    __slots__ = ("topic", "pattern", "queue", "filter")

    def __init__(self, topic: Topic, pattern: str, queue: Queue, filter_spec: dict | None) -> None:
        self.topic = topic
        self.pattern = validate_pattern(pattern)
        self.queue = queue
        self.filter: HeaderFilter = compile_filter(filter_spec)

    @property
    def key(self) -> tuple[str, str]:
        return (self.pattern, self.queue.name)


class Topic:
    """Subscriptions, routing, dedup window and retention of one topic. `id` is its durable number."""

    def __init__(self, id: int, name: str, settings: TopicSettings) -> None:
        self.id = id
        self.name = name
        self.settings = settings
        self.subscriptions: dict[tuple[str, str], Subscription] = {}
        self.index = SubjectIndex()
        self.dedup = DedupWindow()
        self.retained: deque[tuple[int, int, int]] = deque()  # (id, ref, size), oldest first
        self.retained_bytes = 0
        self.published = 0
        self.trim_at: float | None = None  # when the retention timer is set for

    @property
    def retains(self) -> bool:
        return self.settings.retention_s is not None or self.settings.retention_bytes is not None

    def add_subscription(self, subscription: Subscription) -> None:
        """Bind; the same pattern and queue again replaces the earlier binding (and its filter)."""
        key = subscription.key
        self.remove_subscription(key)
        self.subscriptions[key] = subscription
        self.index.add(subscription.pattern, subscription)
        subscription.queue.feeds[(self.name, key)] = subscription

    def remove_subscription(self, key: tuple[str, str]) -> Subscription | None:
        subscription = self.subscriptions.pop(key, None)
        if subscription is not None:
            self.index.remove(subscription.pattern, subscription)
            del subscription.queue.feeds[(self.name, key)]
        return subscription

    def route(self, subject: str, headers: dict[str, str] | None) -> list[Queue]:
        """The queues a message with this subject and headers goes to, each once."""
        queues: list[Queue] = []
        for subscription in self.index.match(subject):
            if subscription.filter.matches(headers or {}) and subscription.queue not in queues:
                queues.append(subscription.queue)
        return queues

    def retain(self, message_id: int, ref: int, size: int) -> None:
        self.retained.append((message_id, ref, size))
        self.retained_bytes += size

    def trim(self, now: float) -> list[int]:
        """Drop retained messages past the time or size limit; return their refs (to release)."""
        settings, retained, dropped = self.settings, self.retained, []
        retention_s = settings.retention_s
        max_bytes = settings.retention_bytes
        while retained:
            message_id, ref, size = retained[0]
            too_old = retention_s is not None and publish_time(message_id) + retention_s <= now
            too_big = max_bytes is not None and self.retained_bytes > max_bytes
            if not (too_old or too_big):
                break
            retained.popleft()
            self.retained_bytes -= size
            dropped.append(ref)
        if not self.retains:
            dropped.extend(ref for _, ref, _ in retained)
            retained.clear()
            self.retained_bytes = 0
        return dropped

    def next_trim(self) -> float | None:
        """When the oldest retained message passes retention_s, or None."""
        if not self.retained or self.settings.retention_s is None:
            return None
        return publish_time(self.retained[0][0]) + self.settings.retention_s
