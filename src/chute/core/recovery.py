"""Recovery and compaction: snapshot the state, rebuild it from a snapshot plus the log tail, move live records.

Replay applies each record exactly as the live operation changed the state, reusing the `_apply_*` methods and
`place`; while replaying, `index` maps (queue id -> message id -> entry) so acks and moves find their entries.
After replay every live ref is tracked again in the store (live counts are not persisted).

Compaction: `compaction_scan(pred)` finds, in steps (core/compaction.py), the live holders of each record the
store wants to move; `relocate(moves, scan)` appends each payload again as a COPY record and points the holders
still at the old ref to the new one. A COPY replays as "every holder of this message now lives at this ref", so
the old file can go once a checkpoint covers it.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable, Iterable

import msgspec

from chute.core import records as rec
from chute.core import snapshot as snap
from chute.core.compaction import CompactionScan
from chute.core.queue import GONE, PACKED, Entry, Queue
from chute.core.state import BrokerState, entered_expiry
from chute.errors import StorageCorrupt

# what a record or snapshot that passed its checksum but means nothing to this version raises while applied
_UNREADABLE = (msgspec.DecodeError, msgspec.ValidationError, KeyError, ValueError, TypeError, IndexError)


class RecoveryOps(BrokerState):
    """snapshot / restore / compaction."""

    index: dict[int, _QueueIndex] | None = None

    # -- snapshot ---------------------------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The durable state as bytes, including publishes still being made durable."""
        pending: dict[Queue, list[Entry]] = {}
        retained_pending = []
        for plan in self.pending_plans:
            for queue, entries, _ in plan.placements:
                if not queue.ephemeral:
                    pending.setdefault(queue, []).extend(entries)
            retained_pending.extend(plan.retains)
        queues = [snap.queue_image(q, pending.get(q, [])) for q in self.queues.values() if not q.ephemeral]
        topics = []
        for topic in self.topics.values():
            retained = [tuple(item) for item in topic.retained]
            retained += [(mid, ref, size) for t, mid, ref, size in retained_pending if t is topic]
            subscriptions = [
                (s.pattern, s.queue.id, s.filter.spec) for s in topic.subscriptions.values() if not s.queue.ephemeral
            ]
            topics.append(
                snap.TopicImage(
                    topic.id,
                    topic.name,
                    msgspec.to_builtins(topic.settings),
                    subscriptions,
                    sorted(retained),
                    topic.dedup.items(),
                )  # fmt: skip
            )
        image = snap.Snapshot(snap.VERSION, self.ids.last, self.next_queue_id, self.next_topic_id, queues, topics)
        return snap.encode(image)

    def pending_refs(self) -> list[int]:
        """Refs of the durable records of publishes still being made durable: not tracked before they are placed,
        so a checkpoint must hold them (track, then release) or a store could reclaim them first."""
        refs = [e.ref for plan in self.pending_plans for queue, entries, _ in plan.placements if not queue.ephemeral
                for e in entries]  # fmt: skip
        refs += [ref for plan in self.pending_plans for _, _, ref, _ in plan.retains]
        return refs

    # -- restore ----------------------------------------------------------------------------------------------

    def restore(self, snapshot: bytes | None, records: Iterable[tuple[int, int, bytes]], now: float) -> int:
        """Rebuild state from a snapshot and the records after it; return how many records were replayed."""
        self.index = {}
        store, self.store = self.store, _Uncounted()  # live counts are rebuilt below, once
        try:
            tail = []
            if snapshot is not None:
                try:
                    image, tail = snap.decode(snapshot)
                    self._load(image, now)
                except (*_UNREADABLE, zlib.error) as exc:
                    raise StorageCorrupt(f"the checkpoint's snapshot cannot be read: {exc}") from None
            replayed = 0
            apply = self._replay_one
            for ref, kind, payload in itertools.chain(tail, records):  # a tail: records appended as it was made
                try:
                    apply(ref, kind, payload, now)
                except _UNREADABLE as exc:
                    raise StorageCorrupt(
                        f"segment {ref >> 32} at {ref & 0xFFFFFFFF}: record of kind {kind} cannot be applied: {exc!r}"
                    ) from None
                replayed += 1
        finally:
            self.store = store
            self.index = None
        self.outbox.clear()  # replaying emits nothing new
        for queue in self.queues.values():
            track = self.store.track
            for ref in queue.refs():
                track(ref)
        for topic in self.topics.values():
            for item in topic.retained:
                self.store.track(item[1])
            self.trim_topic(topic, now)
        for owner in (*self.queues.values(), *self.topics.values()):
            owner.dedup.expire(now)
            self.watch_dedup(owner.dedup)
        return replayed

    def _load(self, image: snap.Snapshot, now: float) -> None:
        self.ids.advance(image.last_id)
        for q in image.queues:
            queue = self._apply_create_queue({"id": q.id, "name": q.name, "settings": q.settings})
            split = snap.split_plain(q.entries)  # the plain backlog goes straight into packed columns
            if split is None or not queue.load_packed(*split[0]):
                self.place_batch(queue, snap.decode_entries(q.entries), now)
            elif split[1]:
                self.place_batch(queue, split[1], now)
            for key, expires, message_id in q.dedup:
                queue.dedup.remember(key, message_id, expires)
        for t in image.topics:
            topic = self._apply_create_topic({"id": t.id, "name": t.name, "settings": t.settings})
            for pattern, queue_id, spec in t.subscriptions:
                self._apply_subscribe({"topic_id": t.id, "pattern": pattern, "queue_id": queue_id, "filter": spec})
            for message_id, ref, size in t.retained:
                topic.retain(message_id, ref, size)
            for key, expires, message_id in t.dedup:
                topic.dedup.remember(key, message_id, expires)
        self.next_queue_id = max(self.next_queue_id, image.next_queue_id)
        self.next_topic_id = max(self.next_topic_id, image.next_topic_id)

    def _replay_one(self, ref: int, kind: int, payload: bytes, now: float) -> None:
        record = rec.DECODERS[kind](payload)
        if kind == rec.MESSAGE:
            self._replay_message(ref, record, now)
        elif kind == rec.COPY:
            self._move_holders(record.id, ref)
        elif kind == rec.REMOVE:
            queue = self.queues_by_id.get(record.queue_id)
            entries = self._entries_of(record.queue_id)
            for message_id in record.ids:
                entry = self._pop_entry(queue, entries, message_id)
                if entry is not None:
                    queue.remove(entry)
        elif kind == rec.MOVE:
            self._replay_move(record, now)
        elif kind == rec.META:
            self._replay_meta(record)
        elif kind == rec.PURGE:
            queue = self.queues_by_id.get(record.queue_id)
            if queue is not None:
                kept = set(record.kept_ids)
                entries = self._entries_of(queue.id)
                for message_id in [m for m in entries.ids() if m not in kept]:
                    while (entry := entries.pop(message_id)) is not None:
                        queue.remove(entry)
                queue.drop_packed_except(kept)
        elif kind == rec.DELIVERED:
            entries = self._entries_of(record.queue_id)
            queue = self.queues_by_id.get(record.queue_id)
            for message_id in record.ids:
                entry = entries.get(message_id)
                if queue is not None and (entry is None or entry.state == PACKED):  # a packed slot has no count
                    view = entry or queue.find_packed(message_id)
                    entry = queue.unpack(view) if view is not None else None
                    if entry is not None:
                        entries.replace(message_id, view, entry)
                if entry is not None:
                    entry.deliveries += 1
        elif kind == rec.ENQUEUE:
            queue = self.queues_by_id.get(record.queue_id)
            if queue is not None:
                for message_id, entry_ref, size, priority, group, expires_ms in record.entries:
                    self._replay_place(queue, Entry(message_id, entry_ref, size, priority, group, expires_ms / 1e3),
                                       0.0, now)  # fmt: skip

    def _replay_place(self, queue: Queue, entry: Entry, ready_at: float, now: float) -> None:
        self.place(queue, entry, ready_at, now)
        if queue.id in self.index:
            self.index[queue.id].add(entry)

    def _entries_of(self, queue_id: int) -> _QueueIndex:
        """Message id -> entry objects of one queue, built on first need (a clean restart replays nothing). Packed
        messages are not indexed (no object per message): `_pop_entry` finds them in their columns."""
        entries = self.index.get(queue_id)
        if entries is None:
            entries = _QueueIndex()
            queue = self.queues_by_id.get(queue_id)
            if queue is not None:
                for entry in queue.objects():
                    entries.add(entry)
            self.index[queue_id] = entries
        return entries

    @staticmethod
    def _pop_entry(queue: Queue | None, entries: _QueueIndex, message_id: int) -> Entry | None:
        """The entry (or a view of the packed message) a record about `message_id` in `queue` names, taken out of
        the index."""
        entry = entries.pop(message_id, None)
        if entry is None and queue is not None:
            entry = queue.find_packed(message_id)
        return entry

    def _replay_message(self, ref: int, record: rec.MessageRecord, now: float) -> None:
        self.ids.advance(record.id)
        size = len(record.body)
        publish_s = record.publish_ms / 1000.0
        for queue_id in record.queue_ids:
            queue = self.queues_by_id.get(queue_id)
            if queue is not None:
                ready_ms, expires_ms = record.times_in(queue_id)
                entry = Entry(record.id, ref, size, record.priority, record.group, expires_ms / 1000.0)
                self._replay_place(queue, entry, ready_ms / 1000.0, now)
                expires = publish_s + queue.settings.dedup_window_s
                if record.dedup_id is not None and not record.topic_id and expires > now:
                    queue.dedup.remember(record.dedup_id, record.id, expires)
        topic = self.topics_by_id.get(record.topic_id) if record.topic_id else None
        if topic is not None:
            if topic.retains:
                topic.retain(record.id, ref, size)
            expires = publish_s + topic.settings.dedup_window_s
            if record.dedup_id is not None and expires > now:
                topic.dedup.remember(record.dedup_id, record.id, expires)

    def _replay_move(self, record: rec.MoveRecord, now: float) -> None:
        source = self.queues_by_id.get(record.from_queue_id)
        target = self.queues_by_id.get(record.to_queue_id)
        entries = self._entries_of(record.from_queue_id)
        for message_id in record.ids:
            entry = self._pop_entry(source, entries, message_id)
            if entry is None or source is None:
                continue
            source.remove(entry)
            if target is None:
                continue
            dead = (record.reason, source.id) if record.reason else None
            # the move's own time is not logged: the target's TTL counts from the replay (never sooner than live)
            self._replay_place(target, Entry(entry.id, entry.ref, entry.size, entry.priority, None,
                                             entered_expiry(target, now), 0, dead), 0.0, now)  # fmt: skip

    def _replay_meta(self, record: rec.MetaRecord) -> None:
        op, args = record.op, record.args
        if op == "create_queue":
            self._apply_create_queue(args)
        elif op == "update_queue":
            self._apply_update_queue(args)
        elif op == "delete_queue":
            queue = self.queues_by_id.get(args["id"])
            if queue is not None:
                self._apply_delete_queue(queue)
                self.index.pop(queue.id, None)
        elif op == "create_topic":
            self._apply_create_topic(args)
        elif op == "update_topic":
            self._apply_update_topic(args)
        elif op == "delete_topic":
            topic = self.topics_by_id.get(args["id"])
            if topic is not None:
                self._apply_delete_topic(topic)
        elif op == "subscribe":
            self._apply_subscribe(args)
        elif op == "unsubscribe":
            self._apply_unsubscribe(args)
        else:
            raise ValueError(f"unknown META op {op!r}")

    def _move_holders(self, message_id: int, new_ref: int) -> None:
        for queue_id, queue in list(self.queues_by_id.items()):
            for entry in self._entries_of(queue_id).all(message_id):
                if entry.state != PACKED:
                    entry.ref = new_ref
            for priority in queue.levels:
                queue.repoint_packed(priority, message_id, None, new_ref)
        for topic in self.topics.values():
            retained = topic.retained
            for i, item in enumerate(retained):
                if item[0] == message_id:
                    retained[i] = (message_id, new_ref, item[2])

    # -- compaction -------------------------------------------------------------------------------------------

    def compaction_scan(self, in_sparse_file: Callable[[int], bool]) -> CompactionScan:
        """A search, to run in steps, for the live durable records that sit in files the store wants to reclaim."""
        return CompactionScan(self, in_sparse_file)

    def relocate(self, moves: list[tuple[int, bytes]], scan: CompactionScan) -> None:
        """Append each (old ref, payload) again as a COPY record and point the holders `scan` found, if still
        live and still at the old ref, at the new ref. Costs what it moves, not what is stored."""
        if not moves:
            return
        new_refs, _ = self.store.append([(rec.COPY, payload) for _, payload in moves])
        store = self.store
        retained = {}
        for (old, _), new in zip(moves, new_refs, strict=True):
            for entry in scan.holders_of(old):
                if entry.state == PACKED:  # a view: the packed slot, if still there, holds the ref
                    queue = scan.queue_of(entry)
                    if queue is not None and queue.repoint_packed(entry.priority, entry.id, old, new):
                        store.track(new)
                        store.release(old)
                elif entry.state != GONE and entry.ref == old:
                    store.track(new)
                    store.release(old)
                    entry.ref = new
            if old in scan.retained_refs:
                retained[old] = new
        if retained:
            self._relocate_retained(retained)

    def _relocate_retained(self, mapping: dict[int, int]) -> None:
        for topic in self.topics.values():
            items = topic.retained
            for i, (message_id, ref, size) in enumerate(items):
                new = mapping.get(ref)
                if new is not None:
                    self.store.track(new)
                    self.store.release(ref)
                    items[i] = (message_id, new, size)


class _Uncounted:
    """Stands in for the store during replay: reference counting waits until the state is rebuilt."""

    def track(self, ref: int, count: int = 1) -> None:
        pass

    def release(self, ref: int, count: int = 1) -> None:
        pass

    def track_many(self, refs) -> None:
        pass

    def release_many(self, refs) -> None:
        pass


class _QueueIndex:
    """Message id -> entry for replay. One message id can have several entries in one queue (a dead-letter queue
    fed by two subscriptions of the same topic), so repeats go to `more`; any of them may answer a record about
    that id, since they differ only in where they were dead-lettered from."""

    __slots__ = ("one", "more")

    def __init__(self) -> None:
        self.one: dict[int, Entry] = {}
        self.more: dict[int, list[Entry]] = {}

    def add(self, entry: Entry) -> None:
        if entry.id in self.one:
            self.more.setdefault(entry.id, []).append(entry)
        else:
            self.one[entry.id] = entry

    def get(self, message_id: int) -> Entry | None:
        return self.one.get(message_id)

    def pop(self, message_id: int, default: None = None) -> Entry | None:
        extra = self.more.get(message_id)
        if extra:
            entry = extra.pop()
            if not extra:
                del self.more[message_id]
            return entry
        return self.one.pop(message_id, default)

    def replace(self, message_id: int, old: Entry | None, new: Entry) -> None:
        """`new` stands for `old` (an unpacked view) from now on, or is added if `old` was not indexed."""
        if old is not None and self.one.get(message_id) is old:
            self.one[message_id] = new
        elif old is not None and old in self.more.get(message_id, ()):
            extra = self.more[message_id]
            extra[extra.index(old)] = new
        else:
            self.add(new)

    def all(self, message_id: int) -> list[Entry]:
        first = self.one.get(message_id)
        return ([first] if first is not None else []) + self.more.get(message_id, [])

    def ids(self) -> list[int]:
        return list(self.one)
