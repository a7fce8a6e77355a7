"""Delivering: leases, acks, nacks, redelivery, dead-lettering, redrive, and the timers that drive them.

Invariants:
- a leased entry is in exactly one queue's `in_flight`, under a receipt never handed out before by this broker
  (receipts start from a random base each boot, so a receipt from before a restart is simply unknown).
- when a lease ends (timeout or nack) the entry goes back to the ready line with its delivery count kept (the
  next delivery increments it), unless it has reached max_deliveries or expired: then it is dead-lettered.
- ephemeral queues are at-most-once: an entry delivered from one is removed at once, with no lease.
- the rate limiter is consulted only for messages actually handed out.
"""

from __future__ import annotations

from chute.core import records as rec
from chute.core.queue import DELAYED, IN_FLIGHT, READY, WAITING, Entry, Queue
from chute.core.state import BrokerState, entered_expiry
from chute.core.timers import DEDUP, DELAY, EXPIRE, LEASE, RETAIN
from chute.errors import InvalidArgument
from chute.model import MAX_DELAY_S, MAX_LEASE_S


def _check_lease(lease_s: float) -> float:
    if type(lease_s) is float and 0.001 <= lease_s <= MAX_LEASE_S:  # the common case, checked in one go
        return lease_s
    if isinstance(lease_s, bool) or not isinstance(lease_s, int | float) or not 0.001 <= lease_s <= MAX_LEASE_S:
        raise InvalidArgument(f"lease_s must be a number from 0.001 to {MAX_LEASE_S:g}, got {lease_s!r}")
    return float(lease_s)


class DeliveryOps(BrokerState):
    """receive / ack / nack / extend / peek / redrive / tick."""

    def receive(
        self, name: str, max_messages: int, now: float, lease_s: float | None = None, max_bytes: int | None = None
    ) -> list[Entry]:
        """Lease up to `max_messages` ready messages of a queue; each leased entry carries receipt and deadline.
        With `max_bytes`, their bodies add up to at most that much (or the batch is one message)."""
        queue = self.queue(name)
        if type(max_messages) is not int and (isinstance(max_messages, bool) or not isinstance(max_messages, int)) \
                or max_messages < 1:  # fmt: skip
            raise InvalidArgument(f"max_messages must be a positive integer, got {max_messages!r}")
        lease = _check_lease(lease_s if lease_s is not None else queue.settings.lease_s)
        queue.received_at = now
        wanted = min(max_messages, queue.ready)
        if wanted and queue.bucket is not None:
            wanted = queue.bucket.take(wanted, now)
        taken: list[Entry] = []
        room = max_bytes
        while wanted > len(taken):
            batch = queue.pop_many(wanted - len(taken), room, first_may_exceed=not taken)
            if not batch:
                break
            if room is not None and wanted > len(taken) + len(batch):  # (only another round needs what is left)
                room = max(0, room - sum(e.size for e in batch))
            for e in batch:  # (a loop that builds nothing until it finds an expired one: they are rare)
                if e.expires and e.expires <= now:
                    expired = [e for e in batch if e.expires and e.expires <= now]
                    for entry in expired:
                        entry.state = READY  # popped but still counted as present until dead-lettered
                        queue.ready += 1
                    self.dead_letter(queue, expired, "expired", now)
                    batch = [e for e in batch if e.state == READY]
                    break
            taken.extend(batch)
        if queue.bucket is not None and wanted > len(taken):
            queue.bucket.give_back(wanted - len(taken))
        if queue.ephemeral:  # at-most-once: out of the queue at once; the caller releases the ref once read
            for entry in taken:
                entry.state = READY
                queue.ready += 1
                queue.remove(entry)
                entry.deliveries = 1
            queue.counters["delivered"] += len(taken)
            return taken
        if not taken:
            return taken
        deadline = now + lease
        receipt = self.next_receipt
        in_flight = queue.in_flight
        redelivered = 0
        for entry in taken:
            if entry.deliveries:
                redelivered += 1
                if entry.receipt:  # leased before: its lapsed receipt names it no more
                    queue.lapsed.pop(entry.receipt, None)
            elif not entry.first_delivered:
                entry.first_delivered = now
            entry.state = IN_FLIGHT
            entry.receipt = receipt
            entry.deadline = deadline
            entry.deliveries += 1
            in_flight[receipt] = entry
            receipt += 1
        # one timer per batch, naming its receipts (not its entries: an acked batch must not keep them alive); in a
        # lease batch (`begin_leases`), one per deadline for every queue's batches
        receipts = range(self.next_receipt, receipt)
        if self.lease_batch is None:
            self.timers.add(deadline, LEASE, queue.id, receipts)
        else:
            self.lease_batch.setdefault(deadline, []).append((queue.id, receipts))
        self.next_receipt = receipt
        queue.counters["delivered"] += len(taken)
        queue.counters["redelivered"] += redelivered
        self.emit(rec.DELIVERED, rec.DeliveredRecord(queue.id, [e.id for e in taken]))
        return taken

    def begin_leases(self) -> None:
        """Until `end_leases`, receives share their lease timers: one per deadline (a dispatcher's pass leases
        from hundreds of queues at one `now`), not one per receive."""
        self.lease_batch = {}

    def end_leases(self) -> None:
        """Set the timers of the receives since `begin_leases`: LEASE with no owner names (queue id, receipts)
        pairs."""
        batch, self.lease_batch = self.lease_batch, None
        for deadline, leased in (batch or {}).items():
            if len(leased) == 1:
                self.timers.add(deadline, LEASE, leased[0][0], leased[0][1])
            else:
                self.timers.add(deadline, LEASE, None, tuple(leased))

    def _leased(self, queue: Queue, receipts) -> tuple[list[Entry], list[int]]:
        found = list(map(queue.in_flight.get, receipts))  # (looked up at C speed; unknown ones are rare)
        unknown = []
        if None in found:
            unknown = [receipt for receipt, entry in zip(receipts, found) if entry is None]
            found = [entry for entry in found if entry is not None]
        if len(found) > 1 and len(set(found)) < len(found):  # a receipt named twice: settle its entry once
            found = list(dict.fromkeys(found))
        return found, unknown

    def ack(self, name: str, receipts, *, lapsed: bool = False, dead_lettered: bool = False) -> list[int]:
        """Remove the leased messages; return the receipts that were not (or no longer) leased. With `lapsed`,
        a receipt whose lease ended also removes its message if nobody has leased it since (SQS's DeleteMessage
        with the latest receipt handle); an older receipt names nothing. With `dead_lettered`, the caller has
        dead-lettered the messages itself (the AMQP front republishes a rejected message with its x-death
        history): they are counted as nacked and dead-lettered, as a `nack(dead_letter=True)` counts them, not
        as acked."""
        queue = self.queue(name)
        entries, unknown = self._leased(queue, receipts)
        if lapsed and unknown and queue.lapsed:
            entries, unknown = self._lapsed(queue, entries, unknown)
        if dead_lettered:
            queue.counters["nacked"] += len(entries)
            queue.counters["dead"] += len(entries)
        else:
            queue.counters["acked"] += len(entries)
        self.drop(queue, entries, rec.ACKED)
        return unknown

    @staticmethod
    def _lapsed(queue: Queue, entries: list[Entry], receipts: list[int]) -> tuple[list[Entry], list[int]]:
        """`entries` plus the entries that `receipts` name as lapsed ones (each once); the receipts left."""
        found, unknown = set(entries), []
        for receipt in receipts:
            entry = queue.lapsed.get(receipt)
            if entry is None or entry in found:
                unknown.append(receipt)
            else:
                found.add(entry)
                entries.append(entry)
        return entries, unknown

    def nack(self, name: str, receipts, now: float, *, delay_s: float = 0.0, dead_letter: bool = False) -> list[int]:
        """Return leased messages now or after `delay_s`, or dead-letter them (`rejected`); return unknown ones."""
        if isinstance(delay_s, bool) or not isinstance(delay_s, int | float) or not 0 <= delay_s <= MAX_DELAY_S:
            raise InvalidArgument(f"delay_s must be a number from 0 to {MAX_DELAY_S:g}, got {delay_s!r}")
        queue = self.queue(name)
        entries, unknown = self._leased(queue, receipts)
        queue.counters["nacked"] += len(entries)
        if dead_letter:
            self.dead_letter(queue, entries, "rejected", now)
        else:
            for entry in entries:
                self._lease_ended(queue, entry, now, delay_s)
        return unknown

    def extend(self, name: str, receipts, lease_s: float, now: float) -> list[int]:
        """Set the lease of leased messages to end `lease_s` from now; return unknown receipts."""
        lease = _check_lease(lease_s)
        queue = self.queue(name)
        entries, unknown = self._leased(queue, receipts)
        for entry in entries:
            entry.deadline = now + lease
        if entries:
            self.timers.add(now + lease, LEASE, queue.id, tuple(e.receipt for e in entries))
        return unknown

    def release_receipts(self, name: str, receipts, now: float) -> None:
        """A consumer went away: its leased messages become available at once."""
        queue = self.queues.get(name)
        if queue is not None:
            for entry in self._leased(queue, receipts)[0]:
                self._lease_ended(queue, entry, now, 0.0)

    def _lease_ended(self, queue: Queue, entry: Entry, now: float, delay_s: float) -> None:
        if entry.expires and entry.expires <= now:
            self.dead_letter(queue, [entry], "expired", now)
            return
        limit = queue.settings.max_deliveries
        if limit is not None and entry.deliveries >= limit:
            self.dead_letter(queue, [entry], "max_deliveries", now)
            return
        if delay_s > 0:
            queue.delay(entry, now + delay_s)
            self.timers.add(now + delay_s, DELAY, queue.id, entry)
        else:
            queue.requeue(entry)
            self.changed.add(queue)

    def peek(self, name: str, max_messages: int) -> list[Entry]:
        """The next messages in delivery order (then waiting, delayed, in flight), without leasing them."""
        queue = self.queue(name)
        result = []
        for entry in queue.entries():
            if len(result) >= max_messages:
                break
            result.append(entry)
        return result

    def redrive(self, name: str, max_messages: int | None, now: float) -> int:
        """Move dead-lettered messages of queue `name` back to their source queues; return how many moved."""
        dlq = self.queue(name)
        moved = 0
        by_source: dict[int, list[Entry]] = {}
        for entry in dlq.entries():  # lazy: a redrive of a few looks at a few (nothing is moved until below)
            if max_messages is not None and moved >= max_messages:
                break
            if entry.dead is None or entry.state == IN_FLIGHT:
                continue
            source = self.queues_by_id.get(entry.dead[1])
            if source is None:
                continue
            by_source.setdefault(source.id, []).append(entry)
            moved += 1
        for source_id, entries in by_source.items():
            source = self.queues_by_id[source_id]
            expires = entered_expiry(source, now)
            for entry in entries:
                dlq.remove(entry)
                self.place(source, Entry(entry.id, entry.ref, entry.size, entry.priority, None, expires), 0.0, now)
            self.emit(rec.MOVE, rec.MoveRecord(dlq.id, source_id, rec.ACKED, [e.id for e in entries]))
        return moved

    def tick(self, now: float) -> None:
        """Fire every timer due at `now`: lease ends, delays, expiries, retention trims."""
        for when, kind, owner, subject in self.timers.pop_due(now):
            if kind == LEASE:  # owner: a queue id; None: (queue id, receipts) pairs of a lease batch
                for queue_id, receipts in subject if owner is None else ((owner, subject),):
                    queue = self.timer_queue(queue_id)
                    if queue is None:
                        continue  # deleted since
                    in_flight = queue.in_flight
                    for receipt in receipts:
                        entry = in_flight.get(receipt)
                        if entry is not None and entry.deadline == when:
                            self._lease_ended(queue, entry, now, 0.0)
            elif kind == DELAY:
                queue = self.timer_queue(owner)
                if queue is not None and subject.state == DELAYED:
                    queue.undelay(subject)
                    self.changed.add(queue)
            elif kind == EXPIRE:
                queue = self.timer_queue(owner)
                if queue is not None and subject.state in (READY, WAITING, DELAYED):
                    self.dead_letter(queue, [subject], "expired", now)
            elif kind == RETAIN:
                topic = self.topics_by_id.get(owner)
                if topic is not None and topic.trim_at == when:
                    topic.trim_at = None
                    self.trim_topic(topic, now)
            elif kind == DEDUP and owner.timer_at == when:
                owner.timer_at = None
                owner.expire(now)
                self.watch_dedup(owner)

    def next_deadline(self) -> float | None:
        """When `tick` has something to do next, or None."""
        return self.timers.next_deadline()

    def rate_ready_at(self, name: str, now: float) -> float | None:
        """When a rate-limited queue with ready messages can deliver again (None: not limited or nothing ready)."""
        queue = self.queues.get(name)
        if queue is None or queue.bucket is None or not queue.ready:
            return None
        return queue.bucket.next_ready(now)
