"""The broker's in-memory state and the helpers every operation shares: lookups, log output, dead-lettering.

Invariants:
- the core never does I/O: it appends records to a store (a synchronous call that returns a durability token)
  and tells the caller, through `changed`, which queues gained ready messages. The caller awaits the tokens.
- every change to durable state is described by the records emitted in the same operation, in the order the
  change happened; replaying them (core/recovery.py) after the last snapshot rebuilds the same durable state.
- ephemeral queues keep their messages in `ephemeral_store` (a memory store): they never write to disk.
- names are one namespace: a name is a queue or a topic, never both.
"""

from __future__ import annotations

from collections.abc import Callable

from chute.core import records as rec
from chute.core.dedup import DedupWindow
from chute.core.ids import IdGenerator
from chute.core.queue import DELAYED, GONE, Entry, Queue
from chute.core.recent import RecentMessages
from chute.core.timers import DEDUP, DELAY, EXPIRE, LEASE, RETAIN, Timers
from chute.core.topic import Topic
from chute.errors import QueueNotFound, TopicNotFound
from chute.storage.api import Durable, Store
from chute.storage.memory import MemoryStore

DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024  # a broker, not a blob store: larger bodies belong in object storage
EPHEMERAL_PREFIX = "~"  # not a valid user name: ephemeral queue names never collide with durable ones


def timer_weight(kind: int, owner, subject) -> int:
    """What `BrokerState.timer_live` may cost for a timer: one lookup per receipt of a lease, one for the rest."""
    if kind != LEASE:
        return 1
    if owner is None:  # a lease batch: (queue id, receipts) pairs
        return sum(len(receipts) for _, receipts in subject)
    return len(subject)


def timer_size(kind: int, owner, subject) -> int:
    """What a timer holds, for the heap's load (core/timers.py): a lease batch its (queue id, receipts) pairs, one
    for a pass over hundreds of queues' push consumers; any other timer one (a receipts range is one object)."""
    return len(subject) if owner is None and kind == LEASE else 1


class BrokerState:
    """Registries, timers, the id and receipt counters, and the record outbox."""

    def __init__(
        self,
        store: Store,
        *,
        receipt_base: int = 1,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.store = store
        self.ephemeral_store: Store = MemoryStore(replayable=False)
        self.max_message_bytes = max_message_bytes
        self.queues: dict[str, Queue] = {}
        self.queues_by_id: dict[int, Queue] = {}
        self.dead_letter_users: dict[str, set[str]] = {}  # a dead-letter queue's name -> the queues naming it
        self.topics: dict[str, Topic] = {}
        self.topics_by_id: dict[int, Topic] = {}
        self.next_queue_id = 1
        self.next_topic_id = 1
        self.ids = IdGenerator()
        self.timers = Timers(self.timer_live, timer_weight, timer_size)
        self.receipt_base = receipt_base  # receipts below it are from another run (or never issued)
        self.next_receipt = receipt_base
        self.changed: set[Queue] = set()
        self.outbox: list[tuple[int, bytes]] = []
        self.pending_plans: set = set()  # publish plans written but not yet committed or aborted
        self.refused_plans: list = []  # of those, the dead letters of refused publishes, for the caller to settle
        self.lease_batch: dict[float, list] | None = None  # deadline -> [(queue, receipts)] (DeliveryOps.begin_leases)
        self.detached: list = []  # (store, entry lists) of deleted queues whose refs are released in steps
        self.on_queue_deleted: Callable[[Queue], None] | None = None
        self.recent = RecentMessages()  # plain messages just stored, by ref: their deliveries need not decode them

    # -- lookups ----------------------------------------------------------------------------------------------

    def queue(self, name: str) -> Queue:
        queue = self.queues.get(name)
        if queue is None:
            raise QueueNotFound(f"queue {name!r} does not exist")
        return queue

    def topic(self, name: str) -> Topic:
        topic = self.topics.get(name)
        if topic is None:
            raise TopicNotFound(f"topic {name!r} does not exist")
        return topic

    def timer_live(self, when: float, kind: int, owner, subject) -> bool:
        """Can this timer still do anything when it fires? (Asked while the timer heap is compacted; a timer
        judged dead here would have been ignored by `tick`.)"""
        if kind == LEASE:  # owner: a queue id; None: (queue id, receipts) pairs of a lease batch
            for queue_id, receipts in subject if owner is None else ((owner, subject),):
                queue = self.timer_queue(queue_id)
                if queue is None:
                    continue
                in_flight = queue.in_flight
                for receipt in receipts:
                    entry = in_flight.get(receipt)
                    if entry is not None and entry.deadline == when:
                        return True
            return False
        if kind == DELAY:
            return subject.state == DELAYED and self.timer_queue(owner) is not None
        if kind == EXPIRE:  # in flight still counts: the entry may come back before it expires
            return subject.state != GONE and self.timer_queue(owner) is not None
        if kind == RETAIN:
            topic = self.topics_by_id.get(owner)
            return topic is not None and topic.trim_at == when
        return kind == DEDUP and owner.timer_at == when

    def timer_queue(self, queue_id: int) -> Queue | None:
        """The queue a timer names by its id, or None if it was deleted since (ids are never reused; an ephemeral
        queue's is minus its number)."""
        if queue_id > 0:
            return self.queues_by_id.get(queue_id)
        return self.queues.get(f"{EPHEMERAL_PREFIX}{-queue_id}")

    def index_sizes(self) -> dict[str, int]:
        """How many items the per-message structures hold, summed over queues and topics: what must follow what
        is stored (backlog, in flight, delayed, dedup windows, retained messages), never what passed through.
        O(queues + topics); for tests, soak runs and stats, not for every operation."""
        queues, topics = self.queues.values(), self.topics.values()
        return {
            "timers": len(self.timers),
            "timer_load": self.timers.load,
            "ready_lines": sum(len(level) for q in queues for level in q.levels.values()),
            "group_lines": sum(len(waiting) for q in queues for waiting in q.groups.values()),
            "in_flight": sum(len(q.in_flight) for q in queues),
            "lapsed": sum(len(q.lapsed) for q in queues),
            "delayed": sum(len(q.delayed) + len(q.delayed_heads) for q in queues),
            "dedup": sum(len(o.dedup.table) + len(o.dedup.order) for o in (*queues, *topics)),
            "retained": sum(len(t.retained) for t in topics),
            "pending_plans": len(self.pending_plans),
        }

    def watch_dedup(self, window: DedupWindow) -> None:
        """Make sure a timer will forget `window`'s ids when they expire, even if no publish looks them up."""
        first = window.next_expiry()
        if first is not None and window.timer_at is None:
            window.timer_at = first
            self.timers.add(first, DEDUP, window, None)

    def store_of(self, queue: Queue) -> Store:
        return self.ephemeral_store if queue.ephemeral else self.store

    # -- log output -------------------------------------------------------------------------------------------

    def emit(self, kind: int, record: object) -> None:
        """Queue a record for the durable log; `flush()` appends everything emitted, in order."""
        self.outbox.append((kind, rec.encode(record)))

    def flush(self) -> Durable | None:
        """Append the emitted records; return their durability token (None if there were none)."""
        if not self.outbox:
            return None
        outbox, self.outbox = self.outbox, []
        if self.store.read_only:  # delivery counts are best effort: a read-only log still serves receives
            outbox = [record for record in outbox if record[0] != rec.DELIVERED]
            if not outbox:
                return None
        if all(record[0] == rec.DELIVERED for record in outbox):  # nobody waits: they go with the next commit
            self.store.append_lazy(outbox)
            return None
        return self.store.append(outbox)[1]

    # -- placing and removing entries -------------------------------------------------------------------------

    def place(self, queue: Queue, entry: Entry, ready_at: float, now: float) -> None:
        """Put a new entry in `queue`, with the timers its delay and expiry need."""
        if queue.add(entry, ready_at, now):
            self.timers.add(ready_at, DELAY, queue.id, entry)
        else:
            self.changed.add(queue)
        if entry.expires:
            self.timers.add(entry.expires, EXPIRE, queue.id, entry)

    def place_batch(self, queue: Queue, entries: list[Entry], now: float) -> None:
        """Put new entries (each ready at `entry.deadline`) in `queue`, with the timers their delays and expiries
        need."""
        if queue.add_batch(entries, now):
            self.changed.add(queue)
        timers = self.timers
        for entry in entries:
            if entry.state == DELAYED:
                timers.add(entry.deadline, DELAY, queue.id, entry)
            if entry.expires:
                timers.add(entry.expires, EXPIRE, queue.id, entry)

    def drop(self, queue: Queue, entries: list[Entry], reason: int) -> None:
        """Remove entries for good (ack, or a drop without a dead-letter queue) and release their refs."""
        if not entries:
            return
        store = self.store_of(queue)
        if len(entries) == 1:  # (one ack: cheaper without the batch's list)
            queue.remove(entries[0])
            store.release(entries[0].ref)
        else:
            queue.remove_many(entries)
            store.release_many([e.ref for e in entries])
        if not queue.ephemeral:
            self.emit(rec.REMOVE, rec.RemoveRecord(queue.id, reason, [e.id for e in entries]))
        if queue.settings.fifo:
            self.changed.add(queue)

    def dead_letter(self, queue: Queue, entries: list[Entry], reason: str, now: float) -> None:
        """Move entries to the queue's dead-letter queue with `reason`; drop them if it has none (or if they
        expired on a queue whose `on_expiry` is `drop`)."""
        if not entries:
            return
        code = rec.REASON_CODES[reason]
        queue.counters["dead"] += len(entries)
        dlq = self.queues.get(queue.settings.dead_letter_queue or "")
        if (
            dlq is None
            or queue.ephemeral
            or dlq.ephemeral
            or (reason == "expired" and queue.settings.on_expiry == "drop")
        ):
            self.drop(queue, entries, code)
            return
        expires = entered_expiry(dlq, now)
        for entry in entries:
            queue.remove(entry)
            moved = Entry(entry.id, entry.ref, entry.size, entry.priority, None, expires, 0, (code, queue.id))
            self.place(dlq, moved, 0.0, now)
        self.emit(rec.MOVE, rec.MoveRecord(queue.id, dlq.id, code, [e.id for e in entries]))
        if queue.settings.fifo:
            self.changed.add(queue)


def entered_expiry(queue: Queue, now: float) -> float:
    """When a message moved into `queue` at `now` (dead-lettered into it, or redriven back) expires there: the
    queue's own TTL counted from the move, as RabbitMQ does for a dead-lettered message (its TTL in the queue it
    left, and a per-message TTL, do not follow it); 0.0 (never) for a queue without a TTL."""
    ttl = queue.settings.retention_s
    return now + ttl if ttl else 0.0
