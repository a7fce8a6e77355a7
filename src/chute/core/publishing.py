"""Publishing: validate a batch, deduplicate, make room, write one record per message, and place it once durable.

A publish is two steps so that nothing unconfirmed is ever delivered:
1. `prepare_publish` validates the whole batch (nothing is half-applied on bad input), assigns ids, appends one
   MESSAGE record per message (the body once, with the ids of every queue it goes to) and returns a plan holding
   the store's durability token. Pending messages count against max_length / max_bytes and the dedup window.
2. once the token resolves, `commit_publish` makes the entries ready (or delayed); if it failed,
   `abort_publish` forgets them. Until then no consumer sees them.
"""

from __future__ import annotations

from collections.abc import Sequence

from chute.core import records as rec
from chute.core.queue import Entry, Queue
from chute.core.routing import validate_subject
from chute.core.state import BrokerState
from chute.core.timers import RETAIN
from chute.core.topic import Topic
from chute.errors import InvalidArgument, MessageTooLarge, QueueFull, QueueNotFound
from chute.model import (
    MAX_DEDUP_ID_CHARS,
    MAX_DELAY_S,
    MAX_GROUP_CHARS,
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    MAX_PRIORITY,
    MAX_RETENTION_S,
    Publish,
)
from chute.storage.api import Durable


class PublishPlan:
    """What `prepare_publish` decided; hand it back to `commit_publish` or `abort_publish`."""

    __slots__ = ("ids", "token", "placements", "dedups", "retains")

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.token: Durable | None = None
        self.placements: list[tuple[Queue, list[Entry]]] = []  # entry.deadline holds its ready time
        self.dedups: list[tuple[object, str, int]] = []
        self.retains: list[tuple[Topic, int, int, int]] = []


class PublishOps(BrokerState):
    """The publish path."""

    def prepare_publish(self, dest: str, messages: Sequence[Publish], now: float) -> PublishPlan:
        """Validate and log a batch for a queue or topic named `dest`. Raises before changing anything."""
        if not messages:
            raise InvalidArgument("a publish needs at least one message")
        queue = self.queues.get(dest)
        topic = self.topics.get(dest) if queue is None else None
        if queue is None and topic is None:
            raise QueueNotFound(f"no queue or topic is named {dest!r}")
        limit = self.max_message_bytes
        keyed = False  # does any message carry a dedup id?
        plain = True  # are all messages bodies without options?
        for message in messages:
            if (  # the plain message, checked in one go; anything else gets the full checks
                type(message) is Publish and type(message.body) is bytes and len(message.body) <= limit
                and message.headers is None and message.priority == 0 and message.delay_s is None
                and message.ttl_s is None and message.group is None and message.dedup_id is None
                and message.subject is None
            ):  # fmt: skip
                continue
            self._validate(message, topic is not None)
            keyed = keyed or message.dedup_id is not None
            plain = False
        plan = PublishPlan()
        window = queue.dedup if queue is not None else topic.dedup
        new, slots = self._deduplicate(window, messages, now) if keyed else (messages, None)
        if queue is not None:
            targets = None
            need = {queue: [len(new), sum(len(m.body) for m in new)]} if new else {}
        else:
            targets = [topic.route(m.subject or topic.name, m.headers) for m in new]
            need = {}
            for message, queues in zip(new, targets, strict=True):
                for target in queues:
                    counts = need.setdefault(target, [0, 0])
                    counts[0] += 1
                    counts[1] += len(message.body)
        self._make_room(need, now)
        if queue is not None:
            new_ids = self._write_to_queue(new, queue, now, plan, plain)
        else:
            new_ids = self._write_to_topic(new, targets, topic, now, plan)
        if not keyed:
            plan.ids = list(new_ids)
        else:
            plan.ids = [new_ids[slot] if slot >= 0 else -slot for slot in slots]
            window_s = (queue or topic).settings.dedup_window_s
            for message, message_id in zip(new, new_ids, strict=True):
                if message.dedup_id is not None and window_s > 0:
                    window.remember(message.dedup_id, message_id, now + window_s)
                    plan.dedups.append((window, message.dedup_id, message_id))
            self.watch_dedup(window)
        self.pending_plans.add(plan)
        return plan

    def _validate(self, m: Publish, to_topic: bool) -> None:
        if not isinstance(m, Publish):
            raise InvalidArgument(f"expected a Publish, got {type(m).__name__}")
        if isinstance(m.body, bytearray | memoryview):
            m.body = bytes(m.body)
        if not isinstance(m.body, bytes):
            raise InvalidArgument(f"a message body must be bytes, got {type(m.body).__name__}")
        if len(m.body) > self.max_message_bytes:
            raise MessageTooLarge(f"body of {len(m.body)} bytes exceeds the limit of {self.max_message_bytes}")
        if m.headers:
            _check_headers(m.headers)
        if isinstance(m.priority, bool) or not isinstance(m.priority, int) or not 0 <= m.priority <= MAX_PRIORITY:
            raise InvalidArgument(f"priority must be an integer from 0 to {MAX_PRIORITY}, got {m.priority!r}")
        _check_seconds("delay_s", m.delay_s, 0.0, MAX_DELAY_S)
        _check_seconds("ttl_s", m.ttl_s, 0.001, MAX_RETENTION_S)
        _check_key("group", m.group, MAX_GROUP_CHARS)
        _check_key("dedup_id", m.dedup_id, MAX_DEDUP_ID_CHARS)
        if m.subject is not None:
            if not to_topic:
                raise InvalidArgument("subject is for topic publishes; this destination is a queue")
            validate_subject(m.subject)

    def _deduplicate(self, window, messages, now) -> tuple[list[Publish], list[int]]:
        """Split a batch into the messages to store and, per input message, a slot: an index into those
        (>= 0), or minus the id of the recent message it repeats (< 0)."""
        new: list[Publish] = []
        slots: list[int] = []
        seen: dict[str, int] = {}
        for message in messages:
            key = message.dedup_id
            if key is not None:
                if key in seen:
                    slots.append(seen[key])
                    continue
                found = window.lookup(key, now)
                if found is not None:
                    slots.append(-found)
                    continue
                seen[key] = len(new)
            slots.append(len(new))
            new.append(message)
        return new, slots

    def _make_room(self, need: dict[Queue, list[int]], now: float) -> None:
        """Check max_length / max_bytes of every target queue for [count, bytes] more; drop the oldest where the
        policy says so, else raise QueueFull."""
        for queue, (count, size) in need.items():
            if queue.has_room(count, size):
                continue
            if queue.settings.overflow == "drop-oldest":
                while not queue.has_room(count, size):
                    victim = queue.oldest_ready()
                    if victim is None:
                        break
                    self.dead_letter(queue, [victim], "overflow", now)
            if not queue.has_room(count, size):
                raise QueueFull(f"queue {queue.name!r} is full (max_length / max_bytes) and rejects publishes")

    def _write_to_topic(self, new, targets, topic: Topic, now: float, plan: PublishPlan) -> list[int]:
        """Append one MESSAGE record per stored message (listing every queue it goes to); fill the plan's
        placements and retains; return the new messages' ids."""
        records, ephemeral, places, new_ids = self.outbox, [], [], []
        self.outbox = []
        retains = topic.retains
        now_ms = int(now * 1000)
        for message, queues in zip(new, targets, strict=True):
            message_id = self.ids.next(now)
            new_ids.append(message_id)
            durable = [q for q in queues if not q.ephemeral]
            ready_at = now + message.delay_s if message.delay_s else 0.0
            expires = now + message.ttl_s if message.ttl_s else 0.0
            record = rec.MessageRecord(
                message_id, now_ms, topic.id, [q.id for q in durable], int(ready_at * 1000), int(expires * 1000),
                message.priority, message.group, message.dedup_id, message.subject, message.headers, message.body,
            )  # fmt: skip
            payload = rec.encode(record)
            if durable or retains:
                records.append((rec.MESSAGE, payload))
                places.append((message, message_id, durable, ready_at, expires, len(records) - 1))
            transient = [q for q in queues if q.ephemeral]
            if transient:
                ephemeral.append((payload, message, message_id, transient, ready_at, expires))
        by_queue: dict[Queue, list[Entry]] = {}
        if records:
            refs, plan.token = self.store.append(records)
            for message, message_id, durable, ready_at, expires, index in places:
                ref, size = refs[index], len(message.body)
                for target in durable:
                    by_queue.setdefault(target, []).append(_entry(message_id, ref, message, expires, ready_at))
                if retains:
                    plan.retains.append((topic, message_id, ref, size))
        if ephemeral:
            refs, _ = self.ephemeral_store.append([(rec.MESSAGE, item[0]) for item in ephemeral])
            for ref, (_, message, message_id, queues, ready_at, expires) in zip(refs, ephemeral, strict=True):
                for target in queues:
                    by_queue.setdefault(target, []).append(_entry(message_id, ref, message, expires, ready_at))
        for target, entries in by_queue.items():
            self._hold(target, entries, plan)
        return new_ids

    def _write_to_queue(self, new, queue: Queue, now: float, plan: PublishPlan, plain: bool) -> range:
        """The common case, kept lean: every message goes to one queue. `plain`: no message has options."""
        records = self.outbox
        self.outbox = []
        first = len(records)
        settings = queue.settings
        default_delay, default_ttl = settings.delay_s, settings.retention_s
        queue_ids = [queue.id]
        now_ms = int(now * 1000)
        encode, kind = rec.encode, rec.MESSAGE
        new_ids = self.ids.next_many(now, len(new))
        entries = []
        if plain and not default_delay and not default_ttl:  # bodies only: the hot path of a busy queue
            for m, message_id in zip(new, new_ids):
                body = m.body
                records.append(
                    (kind, encode((message_id, now_ms, 0, queue_ids, 0, 0, 0, None, None, None, None, body)))
                )
                entries.append(Entry(message_id, 0, len(body)))
            new = ()
        for m, message_id in zip(new, new_ids):
            delay_s = m.delay_s if m.delay_s is not None else default_delay
            ttl_s = m.ttl_s if m.ttl_s is not None else default_ttl
            ready_at = now + delay_s if delay_s else 0.0
            expires = now + ttl_s if ttl_s else 0.0
            # a tuple encodes to the same MessagePack array as rec.MessageRecord (array_like), a little faster
            payload = encode((
                message_id, now_ms, 0, queue_ids, int(ready_at * 1000) if delay_s else 0,
                int(expires * 1000) if ttl_s else 0, m.priority, m.group, m.dedup_id, None, m.headers, m.body,
            ))  # fmt: skip
            records.append((kind, payload))
            entries.append(Entry(message_id, 0, len(m.body), m.priority, m.group, expires, 0, None, ready_at))
        refs, plan.token = self.store_of(queue).append(records)
        for entry, ref in zip(entries, refs[first:], strict=True):
            entry.ref = ref
        self._hold(queue, entries, plan)
        return new_ids

    @staticmethod
    def _hold(queue: Queue, entries: list[Entry], plan: PublishPlan) -> None:
        """Count pending entries against the queue's limits until the plan is committed or aborted."""
        plan.placements.append((queue, entries))
        queue.pending += len(entries)
        queue.pending_bytes += sum(e.size for e in entries)

    def commit_publish(self, plan: PublishPlan, now: float) -> None:
        """The plan's records are durable: place its entries (ready or delayed) and retain topic messages."""
        self.pending_plans.discard(plan)
        for queue, entries in plan.placements:
            queue.pending -= len(entries)
            queue.pending_bytes -= sum(e.size for e in entries)
            if self.queues.get(queue.name) is not queue:
                continue  # the queue was deleted while the publish was being written
            track = self.store_of(queue).track
            for entry in entries:
                track(entry.ref)
            queue.counters["published"] += len(entries)
            self.place_batch(queue, entries, now)
        for topic, message_id, ref, size in plan.retains:
            if self.topics.get(topic.name) is topic:
                self.store.track(ref)
                topic.retain(message_id, ref, size)
        for topic in {t for t, *_ in plan.retains}:
            self.trim_topic(topic, now)

    def abort_publish(self, plan: PublishPlan) -> None:
        """The plan's records did not become durable: forget its entries and dedup ids."""
        self.pending_plans.discard(plan)
        for queue, entries in plan.placements:
            queue.pending -= len(entries)
            queue.pending_bytes -= sum(e.size for e in entries)
        for window, key, message_id in plan.dedups:
            window.forget(key, message_id)

    def enqueue_retained(self, name: str, items: list[tuple], now: float) -> None:
        """Give retained topic messages to a new subscription's queue: (id, ref, size, priority, group,
        expires_ms) each; the body is shared, not copied."""
        queue = self.queue(name)
        for message_id, ref, size, priority, group, expires_ms in items:
            self.store.track(ref)
            queue.counters["published"] += 1
            self.place(queue, Entry(message_id, ref, size, priority, group, expires_ms / 1000.0), 0.0, now)
        self.emit(rec.ENQUEUE, rec.EnqueueRecord(queue.id, [tuple(item) for item in items]))

    def trim_topic(self, topic: Topic, now: float) -> None:
        """Apply retention limits to a topic and set a timer for the next trim by age."""
        for ref in topic.trim(now):
            self.store.release(ref)
        when = topic.next_trim()
        if when is not None and (topic.trim_at is None or when < topic.trim_at):
            topic.trim_at = when  # one timer per topic at a time, not one per publish
            self.timers.add(when, RETAIN, topic, None)


def _check_headers(headers: object) -> None:
    if not isinstance(headers, dict):
        raise InvalidArgument(f"headers must be a dict of str to str, got {type(headers).__name__}")
    if len(headers) > MAX_HEADERS:
        raise InvalidArgument(f"at most {MAX_HEADERS} headers per message, got {len(headers)}")
    total = 0
    for key, value in headers.items():
        if not isinstance(key, str) or not isinstance(value, str) or not key:
            raise InvalidArgument(f"header {key!r}: names and values must be strings, names non-empty")
        total += len(key) + len(value)
    if total > MAX_HEADER_BYTES:
        raise MessageTooLarge(f"headers take {total} characters; the limit is {MAX_HEADER_BYTES}")


def _check_seconds(name: str, value: object, low: float, high: float) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise InvalidArgument(f"{name} must be a number from {low:g} to {high:g} seconds, got {value!r}")


def _check_key(name: str, value: object, max_chars: int) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not 1 <= len(value) <= max_chars:
        raise InvalidArgument(f"{name} must be a string of 1 to {max_chars} characters, got {value!r}")


def _entry(message_id: int, ref: int, message: Publish, expires: float, ready_at: float) -> Entry:
    # entry.deadline: when it becomes ready; kept in a snapshot taken while the publish is pending
    return Entry(message_id, ref, len(message.body), message.priority, message.group, expires, 0, None, ready_at)
