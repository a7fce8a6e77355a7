"""Publishing: validate a batch, deduplicate, make room, write one record per message, and place it once durable.

A publish is two steps so that nothing unconfirmed is ever delivered:
1. `prepare_publish` validates the whole batch (nothing is half-applied on bad input), assigns ids, appends one
   MESSAGE record per message (the body once, with the ids of every queue it goes to) and returns a plan holding
   the store's durability token. Pending messages count against max_length / max_bytes and the dedup window.
2. once the token resolves, `commit_publish` makes the entries ready (or delayed); if it failed,
   `abort_publish` forgets them. Until then no consumer sees them.

Invariants:
- a refused publish changes nothing: every reason to refuse (bad input, a missing destination, a `reject` queue
  without room, a read-only log) is found before the first change (dead-lettering overflow, ids, dedup ids,
  records). Only the store's append comes after, and it fails only on a read-only log, checked first. The one
  exception: a `reject-dead-letter` queue without room refuses the publish as a whole too, but the messages it
  refused are written to its dead-letter queue first (one MESSAGE record each, then a MOVE record: what
  `drop-oldest` writes for its own batch messages), without their dedup ids (the publisher was refused: a retry
  must not be taken for a repeat). Their plan is in `refused_plans`, for the caller to settle once durable, as
  any plan; the publisher gets QueueFull at once, so such a dead letter is best effort (RabbitMQ's
  `reject-publish-dlx`).
- `drop-oldest` never refuses for length or size: it drops the queue's oldest ready messages, then the batch's
  own oldest (and any larger than max_bytes by itself), until the rest fits; dropped batch messages are still
  written once and moved to the dead-letter queue by a MOVE record in the same append (or not written at all
  without one), so replay rebuilds the same queues. Publishes still being made durable are left out of that
  reckoning (they are older): when one is placed, the queue's oldest ready messages go if it is over its limits.
- a message routed to a queue takes the queue's default delay and TTL unless it has its own; where that makes
  its times in a queue differ from its own, the record lists them (`queue_times`), so replay needs no settings.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from chute.core import records as rec
from chute.core.ids import publish_time
from chute.core.queue import Entry, Queue
from chute.core.routing import validate_subject
from chute.core.state import BrokerState
from chute.core.timers import RETAIN
from chute.core.topic import Topic
from chute.errors import ChuteError, InvalidArgument, MessageTooLarge, QueueFull, QueueNotFound, StorageReadOnly
from chute.model import (
    MAX_DEDUP_ID_CHARS,
    MAX_DELAY_S,
    MAX_GROUP_CHARS,
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    MAX_PRIORITY,
    MAX_RETENTION_S,
    Message,
    Publish,
)
from chute.storage.api import Durable


class PublishPlan:
    """What `prepare_publish` decided; hand it back to `commit_publish` or `abort_publish`."""

    __slots__ = ("ids", "token", "placements", "sizes", "dropped", "dedups", "retains", "refused")

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.token: Durable | None = None
        # (queue, entries, source): entry.deadline holds its ready time; `source` is None, or the queue whose
        # overflow sent these batch messages straight to `queue`, its dead-letter queue
        self.placements: list[tuple[Queue, list[Entry], Queue | None]] = []
        self.sizes: list[int] = []  # the body bytes of each placement's entries
        self.dropped: list[tuple[Queue, int]] = []  # batch messages a queue dropped for overflow (no DLQ)
        self.dedups: list[tuple[object, str, int]] = []
        self.retains: list[tuple[Topic, int, int, int]] = []
        self.refused = False  # dead letters of a refused publish: counted dead, not published


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
        fanout = None  # plain messages to a topic: the queues every one of them goes to (one route for all)
        if queue is not None:
            targets = None
            routes = {queue: range(len(new))} if new else {}
        elif plain:
            targets, fanout = None, topic.route(topic.name, None)
            routes = {target: range(len(new)) for target in fanout}
        else:
            targets = [topic.route(m.subject or topic.name, m.headers) for m in new]
            routes = {}
            for index, queues in enumerate(targets):
                for target in queues:
                    routes.setdefault(target, []).append(index)
        durable = (topic is not None and topic.retains) or any(not target.ephemeral for target in routes)
        victims, dropped, refusing = self._plan_room(routes, new)
        if refusing:
            if not self.store.read_only:
                self._dead_letter_refused(refusing, new, now)
            raise QueueFull(_full_text(refusing[0][0], self._overflow_target(refusing[0][0])))
        if self.store.read_only and new and durable:
            raise StorageReadOnly("the log is read-only after an earlier storage failure: publishes are refused")
        # nothing below refuses: from here on the publish changes state
        for target, entries in victims.items():
            self.dead_letter(target, entries, "overflow", now)
        if not new:  # every message repeats a dedup id: nothing to write
            new_ids = []
        elif queue is not None and not dropped:
            new_ids = self._write_to_queue(new, queue, now, plan, plain)
        elif fanout is not None and not dropped and not any(t.settings.delay_s or t.settings.retention_s
                                                            for t in fanout):  # fmt: skip
            new_ids = self._write_fanout(new, fanout, topic, now, plan)
        else:
            if targets is None:
                targets = [fanout if fanout is not None else [queue]] * len(new)
            new_ids = self._write_routed(new, targets, topic, now, plan, dropped)
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

    def prepare_publish_many(self, groups: Sequence[tuple[str, Sequence[Publish]]],
                             now: float) -> list[tuple[PublishPlan, list[int]] | ChuteError]:  # fmt: skip
        """`prepare_publish` for several (dest, messages) groups, in order; for each, (its plan, its ids) or the
        error that refused it (a refused group changes nothing; the others go on). Consecutive *plain* groups --
        bodies without options, to a durable queue with no default delay or TTL and room for them -- share one
        plan and one append: a producer spreading messages over a thousand queues sends groups of one or two
        messages, and the work per group, not per message, was what such a publish cost."""
        results: list = []
        run: PublishPlan | None = None  # the plan of the current run of plain groups
        records: list[tuple[int, bytes]] = []  # its records, appended when the run ends
        stored: list[Message] | None = None  # its messages as consumers will see them, if `recent` keeps them
        for dest, messages in groups:
            queue = self.queues.get(dest)
            if queue is not None and messages and self._plain_group(queue, messages):
                if run is None:
                    run, records, stored = PublishPlan(), self.outbox, [] if self.recent.wanted() else None
                    self.outbox = []
                results.append((run, self._plain_records(queue, messages, now, run, records, stored)))
                continue
            if run is not None:
                self._append_run(run, records, stored)
                run = None
            try:
                plan = self.prepare_publish(dest, messages, now)
            except ChuteError as exc:
                results.append(exc)
                continue
            results.append((plan, plan.ids))
        if run is not None:
            self._append_run(run, records, stored)
        return results

    def _plain_group(self, queue: Queue, messages: Sequence[Publish]) -> bool:
        """Can this group take the plain path (see `prepare_publish_many`)? Changes nothing."""
        settings, limit = queue.settings, self.max_message_bytes
        if queue.ephemeral or settings.delay_s or settings.retention_s or self.store.read_only:
            return False
        size = 0
        for m in messages:
            if not (
                type(m) is Publish and type(m.body) is bytes and len(m.body) <= limit and m.headers is None
                and m.priority == 0 and m.delay_s is None and m.ttl_s is None and m.group is None
                and m.dedup_id is None and m.subject is None
            ):  # fmt: skip
                return False
            size += len(m.body)
        return queue.has_room(len(messages), size)

    def _plain_records(self, queue: Queue, messages: Sequence[Publish], now: float, plan: PublishPlan,
                       records: list, stored: list[Message] | None) -> list[int]:  # fmt: skip
        """Add a plain group's MESSAGE records to `records`, its messages to `stored` (unless None) and its entries
        (refs to come) to `plan`."""
        ids = self.ids.next_many(now, len(messages))
        now_ms, queue_ids, encode, kind = int(now * 1000), [queue.id], rec.encode, rec.MESSAGE
        publish_time = now_ms / 1000.0  # (as a delivery decodes it from the record)
        entries, size = [], 0
        for m, message_id in zip(messages, ids):
            body = m.body
            records.append((kind, encode((message_id, now_ms, 0, queue_ids, 0, 0, 0, None, None, None, None, body))))
            entries.append(Entry(message_id, 0, len(body)))
            if stored is not None:
                stored.append(Message(id=message_id, body=body, headers={}, publish_time=publish_time))
            size += len(body)
        self._hold(queue, entries, plan, None, size)
        plan.ids += ids
        return list(ids)

    def _append_run(self, plan: PublishPlan, records: list[tuple[int, bytes]], stored: list[Message] | None) -> None:
        """Append a run's records (after what the outbox held before it), give its entries their refs and keep
        its messages in `recent`."""
        refs, plan.token = self.store.append(records)
        first = at = len(refs) - len(plan.ids)
        for _, entries, _ in plan.placements:
            for entry in entries:
                entry.ref = refs[at]
                at += 1
        if stored is not None:
            self.recent.put_many(refs[first:], stored, sum(plan.sizes))
        self.pending_plans.add(plan)

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

    def _plan_room(self, routes: dict[Queue, Sequence[int]], new: Sequence[Publish]):
        """Decide, changing nothing, how every target queue takes its messages (`routes`: queue -> positions in
        `new`): for a `drop-oldest` one without room, choose what it drops. Return (victims: queue -> its ready
        entries to dead-letter, dropped: queue -> positions it drops, refusing: the (queue, positions) of every
        `reject` or `reject-dead-letter` queue without room, which refuse the publish)."""
        victims: dict[Queue, list[Entry]] = {}
        dropped: dict[Queue, set[int]] = {}
        refusing: list[tuple[Queue, Sequence[int]]] = []
        for queue, positions in routes.items():
            sizes = [len(new[i].body) for i in positions]
            if queue.has_room(len(sizes), sum(sizes)):
                continue
            if queue.settings.overflow != "drop-oldest":
                refusing.append((queue, positions))
                continue
            old, own = queue.overflow(sizes)
            if old:
                victims[queue] = old
            if own:
                dropped[queue] = {positions[i] for i in own}
        return victims, dropped, refusing

    def _dead_letter_refused(self, refusing: list[tuple[Queue, Sequence[int]]], new: Sequence[Publish],
                             now: float) -> None:  # fmt: skip
        """Write the messages `reject-dead-letter` queues refused to their dead-letter queues (see the module
        docstring); their plan goes to `refused_plans`. Nothing for a `reject` queue, or one without a durable
        dead-letter queue."""
        messages: list[Publish] = []
        targets: list[list[Queue]] = []
        moved: dict[Queue, set[int]] = {}
        for queue, positions in refusing:
            if queue.settings.overflow != "reject-dead-letter" or self._overflow_target(queue) is None:
                continue
            moved[queue] = set(range(len(messages), len(messages) + len(positions)))
            for i in positions:
                message = new[i]
                if message.dedup_id is not None:
                    message = msgspec.structs.replace(message, dedup_id=None)
                messages.append(message)
                targets.append([queue])
        if not messages:
            return
        plan = PublishPlan()
        plan.refused = True
        plan.ids = self._write_routed(messages, targets, None, now, plan, moved)
        self.pending_plans.add(plan)
        self.refused_plans.append(plan)

    def _overflow_target(self, queue: Queue) -> Queue | None:
        """Where `queue`'s overflow goes: its durable dead-letter queue, or None (dropped), as `dead_letter` does."""
        dlq = self.queues.get(queue.settings.dead_letter_queue or "")
        return None if dlq is None or queue.ephemeral or dlq.ephemeral else dlq

    def _write_routed(self, new, targets, topic: Topic | None, now: float, plan: PublishPlan, dropped) -> list[int]:
        """Append one MESSAGE record per stored message (the body once, listing every durable queue it goes to,
        with its own times in the queues whose defaults differ), then a MOVE record per queue that sends some of
        the batch to its dead-letter queue for overflow; fill the plan; return the new messages' ids. `targets`:
        the queues of each message; `topic`: None for a queue publish that drops some of its own batch."""
        records, ephemeral, places, new_ids = self.outbox, [], [], []
        self.outbox = []
        retains = topic is not None and topic.retains
        topic_id = topic.id if topic is not None else 0
        now_ms = int(now * 1000)
        moves: dict[tuple[Queue, Queue], list[int]] = {}
        for index, (message, queues) in enumerate(zip(new, targets, strict=True)):
            message_id = self.ids.next(now)
            new_ids.append(message_id)
            own = (now + message.delay_s if message.delay_s else 0.0, now + message.ttl_s if message.ttl_s else 0.0)
            durable, transient, queue_times = [], [], []
            for target in queues:
                dlq = None
                if index in dropped.get(target, ()):
                    dlq = self._overflow_target(target)
                    if dlq is None:
                        plan.dropped.append((target, 1))
                        continue
                    moves.setdefault((target, dlq), []).append(message_id)
                when = _times_in(target, message, now, own)
                (transient if target.ephemeral else durable).append((target, dlq, when))
                if when != own and not target.ephemeral:
                    queue_times.append((target.id, int(when[0] * 1000), int(when[1] * 1000)))
            fields = (
                message_id, now_ms, topic_id, [place[0].id for place in durable], int(own[0] * 1000),
                int(own[1] * 1000), message.priority, message.group, message.dedup_id, message.subject,
                message.headers, message.body,
            )  # fmt: skip
            payload = rec.encode((*fields, queue_times) if queue_times else fields)  # the array of a MessageRecord
            if durable or retains:
                records.append((rec.MESSAGE, payload))
                places.append((message, message_id, durable, len(records) - 1))
            if transient:
                ephemeral.append((payload, message, message_id, transient))
        overflow = rec.REASON_CODES["overflow"]
        for (source, dlq), ids in moves.items():  # after the MESSAGE records: replay places them, then moves them
            records.append((rec.MOVE, rec.encode(rec.MoveRecord(source.id, dlq.id, overflow, ids))))
        by_queue: dict[tuple[Queue, Queue | None], list[Entry]] = {}
        if records:
            refs, plan.token = self.store.append(records)
            for message, message_id, durable, index in places:
                _collect(by_queue, message, message_id, refs[index], durable)
                if retains:
                    plan.retains.append((topic, message_id, refs[index], len(message.body)))
        if ephemeral:
            refs, _ = self.ephemeral_store.append([(rec.MESSAGE, item[0]) for item in ephemeral])
            for ref, (_, message, message_id, transient) in zip(refs, ephemeral, strict=True):
                _collect(by_queue, message, message_id, ref, transient)
        for (target, source), entries in by_queue.items():
            self._hold(target, entries, plan, source)
        return new_ids

    def _write_fanout(self, new, queues: list[Queue], topic: Topic, now: float, plan: PublishPlan) -> range:
        """Plain messages (bodies only) to a topic, every one routed to the same `queues`, none of which has a default
        delay or TTL: what `_write_routed` does, without routing or timing each message. One MESSAGE record per
        message lists its durable queues; their entries share its ref (the body is stored once)."""
        durable = [target for target in queues if not target.ephemeral]
        transient = [target for target in queues if target.ephemeral]
        records = self.outbox
        self.outbox = []
        first = len(records)
        now_ms, topic_id, queue_ids = int(now * 1000), topic.id, [target.id for target in durable]
        new_ids = self.ids.next_many(now, len(new))
        encode, kind = rec.encode, rec.MESSAGE
        payloads = [encode((message_id, now_ms, topic_id, queue_ids, 0, 0, 0, None, None, None, None, m.body))
                    for m, message_id in zip(new, new_ids)]  # fmt: skip
        retains = topic.retains
        if durable or retains:
            records += [(kind, payload) for payload in payloads]
        sizes = [len(m.body) for m in new]
        if records:
            refs, plan.token = self.store.append(records)
            refs = refs[first:]
            size = sum(sizes)
            for target in durable:  # (each queue's entries made at C speed: Entry(id, ref, size))
                self._hold(target, list(map(Entry, new_ids, refs, sizes)), plan, None, size)
            if durable and self.recent.wanted():
                publish_time = now_ms / 1000.0  # (as a delivery decodes it from the record)
                self.recent.put_many(refs, [Message(id=message_id, body=m.body, headers={}, publish_time=publish_time)
                                            for m, message_id in zip(new, new_ids)], size)  # fmt: skip
            if retains:
                plan.retains += [(topic, i, ref, size) for i, ref, size in zip(new_ids, refs, sizes)]
        if transient:
            refs, _ = self.ephemeral_store.append([(kind, payload) for payload in payloads])
            for target in transient:
                self._hold(target, list(map(Entry, new_ids, refs, sizes)), plan)
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
        stored: list[Message] = []  # plain messages as consumers will see them, if `recent` keeps them
        keep = not queue.ephemeral and self.recent.wanted()
        if plain and not default_delay and not default_ttl:  # bodies only: the hot path of a busy queue
            publish_time = now_ms / 1000.0  # (as a delivery decodes it from the record)
            for m, message_id in zip(new, new_ids):
                body = m.body
                records.append(
                    (kind, encode((message_id, now_ms, 0, queue_ids, 0, 0, 0, None, None, None, None, body)))
                )
                entries.append(Entry(message_id, 0, len(body)))
                if keep:
                    stored.append(Message(id=message_id, body=body, headers={}, publish_time=publish_time))
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
        if stored:
            self.recent.put_many(refs[first:], stored, plan.sizes[-1])
        return new_ids

    @staticmethod
    def _hold(queue: Queue, entries: list[Entry], plan: PublishPlan, source: Queue | None = None,
              size: int | None = None) -> None:  # fmt: skip
        """Count pending entries (of `size` body bytes in all, if known) against the queue's limits until the plan
        is committed or aborted."""
        if size is None:
            size = sum([e.size for e in entries])
        plan.placements.append((queue, entries, source))
        plan.sizes.append(size)
        queue.pending += len(entries)
        queue.pending_bytes += size

    def commit_publish(self, plan: PublishPlan, now: float) -> None:
        """The plan's records are durable: place its entries (ready or delayed) and retain topic messages."""
        self.pending_plans.discard(plan)
        for (queue, entries, source), size in zip(plan.placements, plan.sizes, strict=True):
            queue.pending -= len(entries)
            queue.pending_bytes -= size
            if self.queues.get(queue.name) is not queue:
                continue  # the queue was deleted while the publish was being written
            if len(entries) == 1:  # (cheaper without the batch's list)
                self.store_of(queue).track(entries[0].ref)
            else:
                self.store_of(queue).track_many([entry.ref for entry in entries])
            if source is None:
                queue.counters["published"] += len(entries)
            elif plan.refused:  # refused by `source`, dead-lettered: never published there
                source.counters["dead"] += len(entries)
            else:  # published to `source`, dead-lettered at once for overflow
                plan.dropped.append((source, len(entries)))
            self.place_batch(queue, entries, now)
            if queue.settings.overflow == "drop-oldest" and source is None:
                # publishes made durable together can overfill it (each was planned without the others)
                self.dead_letter(queue, queue.overflow([])[0], "overflow", now)
        for queue, count in plan.dropped:
            queue.counters["published"] += count
            queue.counters["dead"] += count
        for topic, message_id, ref, size in plan.retains:
            if self.topics.get(topic.name) is topic:
                self.store.track(ref)
                topic.retain(message_id, ref, size)
        for topic in {t for t, *_ in plan.retains}:
            self.trim_topic(topic, now)

    def abort_publish(self, plan: PublishPlan) -> None:
        """The plan's records did not become durable: forget its entries and dedup ids."""
        self.pending_plans.discard(plan)
        for (queue, entries, _), size in zip(plan.placements, plan.sizes, strict=True):
            queue.pending -= len(entries)
            queue.pending_bytes -= size
        for window, key, message_id in plan.dedups:
            window.forget(key, message_id)

    def enqueue_retained(self, name: str, items: list[tuple], now: float) -> None:
        """Give retained topic messages to a new subscription's queue: (id, ref, size, priority, group,
        expires_ms) each; the body is shared, not copied. A message without a TTL of its own takes the queue's
        default TTL, counted from its publish time (the ENQUEUE record holds the result)."""
        queue = self.queue(name)
        ttl_s = queue.settings.retention_s
        if ttl_s:
            items = [(*item[:5], item[5] or int((publish_time(item[0]) + ttl_s) * 1000)) for item in items]
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
            self.timers.add(when, RETAIN, topic.id, None)


def _full_text(queue: Queue, dlq: Queue | None) -> str:
    """QueueFull's text for `queue` (whose dead-letter queue is `dlq`, or None)."""
    text = f"queue {queue.name!r} is full (max_length / max_bytes) and rejects publishes"
    if queue.settings.overflow == "reject-dead-letter" and dlq is not None:
        text += f" (they go to its dead-letter queue {dlq.name!r})"
    return text


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


def _times_in(queue: Queue, message: Publish, now: float, own: tuple[float, float]) -> tuple[float, float]:
    """(ready_at, expires) of `message` in `queue`: its own delay and TTL, else the queue's defaults."""
    ready_at, expires = own
    settings = queue.settings
    if message.delay_s is None and settings.delay_s:
        ready_at = now + settings.delay_s
    if message.ttl_s is None and settings.retention_s:
        expires = now + settings.retention_s
    return ready_at, expires


def _collect(by_queue: dict, message: Publish, message_id: int, ref: int, places: list) -> None:
    """Add a stored message's entries to `by_queue`, keyed (queue, overflowing source or None)."""
    for target, dlq, (ready_at, expires) in places:
        if dlq is None:
            by_queue.setdefault((target, None), []).append(_entry(message_id, ref, message, expires, ready_at))
        else:
            dead = (rec.REASON_CODES["overflow"], target.id)
            by_queue.setdefault((dlq, target), []).append(
                Entry(message_id, ref, len(message.body), message.priority, None, 0.0, 0, dead)
            )


def _entry(message_id: int, ref: int, message: Publish, expires: float, ready_at: float) -> Entry:
    # entry.deadline: when it becomes ready; kept in a snapshot taken while the publish is pending
    return Entry(message_id, ref, len(message.body), message.priority, message.group, expires, 0, None, ready_at)
