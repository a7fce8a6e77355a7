"""Relays: fan-out and dead-lettering to queues of other shards, as a transactional outbox in the source's shard.

A subscription of a topic (shard A) to a queue of another shard (B) is made, in A, to a **relay queue**
`chute.relay.<queue>`: an ordinary durable queue of A, so the topic's publish and its copy for the relay are
one group commit in A (confirm = committed in the topic's shard, as for fan-out inside a shard). The node that
serves A runs one **relay task** per relay queue: it receives a batch from the relay queue, publishes it into the
real queue through the router (here, or on B's owner over the peer protocol), then acks the batch in A.

    publish(topic) ──► shard A: topic ──► relay queue chute.relay.q ──(relay task)──► router ──► shard B: q
                       (one commit in A)                      dedup id "chute.relay:<A>:<message id>[:<source>]"

Invariants:
- at-least-once: a batch is acked in A only after its publish into `q` was confirmed; a crash, a lost
  connection or a takeover in between delivers the batch again (the relay queue's lease ends, or the new owner
  of A recovers it as ready) and the relay publishes it again with the same dedup ids, so `q`'s dedup window
  (`dedup_window_s`, 300 s by default) keeps the copy out; a retry later than that window duplicates;
- order: one relay task per relay queue, one batch in flight, so a subscription's messages reach `q` in the
  order the relay queue delivers them (priority, then publish order), except a message `q` refuses for good,
  which is retried later while the others go on (`_refused`: a refused batch is halved until it fits); a batch
  a full `reject-dead-letter` queue refuses is acked instead: that queue put all of it in its dead-letter queue
  (halving would dead-letter it again and again);
- a relay task runs only on the node serving the relay queue's shard (it consumes its local broker); when the
  shard moves, the task ends with the broker and the new owner starts its own (`Relays.scan`, on every change
  of the node and every `SCAN_S`);
- a relay queue that feeds no subscription any more is deleted once it is empty (after an unsubscribe, the
  messages already in it are still forwarded); when `q` no longer exists, its relays' subscriptions are removed
  and the relay queue deleted, as deleting a queue removes its subscriptions in one broker.

Dead-letter queues of another shard work the same way: a queue of shard A whose dead-letter queue `d` lives in
shard B dead-letters, in A, into relay queue `chute.relay.d` (its `dead_letter_queue` setting names the relay
there; the router shows `d`), and the relay forwards each dead letter with two headers saying why and whence:
`chute-dead-letter-reason` (max_deliveries, expired, overflow, rejected) and `chute-dead-letter-source` (the
queue it left). The router (native protocol, CLI, AMQP) and `ShardView` (HTTP API, SQS) turn them back into
`Delivery.dead_letter_reason` and `dead_letter_source` (`lift_relayed`). Deleting `d` is refused while a
queue of any shard dead-letters into it (`refuse_if_dead_letter_queue`: the router asks every node for the queues
naming `d` or `chute.relay.d`); a dead letter whose `d` is gone all the same is dropped, as it is in one broker
without a dead-letter queue.

What a relayed copy keeps: body, headers, priority, FIFO group, the remaining TTL (not a dead letter's: in its
dead-letter queue only that queue's TTL counts, as in one broker), and the subject of a topic's message, which a
queue publish cannot carry: it travels as header `chute-relay-subject` and is put back in the message when read
(so AMQP readers get the routing key of the subject, as on one broker). Not kept: the message id (`q` numbers its
own). Stored with the relay's dedup id (the topic applied the publisher's), but read with the original's publish
time and the publisher's dedup id, which travel as header `chute-relay-origin` (`lift_relayed`), as one broker
shows its one stored message. Headers the copy
adds are left out when they would take it over the limits of a message's headers (`_carried`), and only copies
the cluster made (their dedup ids say so) are read back: a user's message with such headers keeps them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import time

import msgspec

from chute.errors import BrokerClosed, ChuteError, QueueFull, QueueInUse, QueueNotFound, Unavailable
from chute.model import (
    DEAD_LETTER_REASONS,
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    Publish,
    QueueSettings,
    SubscriptionInfo,
    TopicInfo,
)

log = logging.getLogger("chute.cluster")

PREFIX = "chute.relay."
REDRIVE_BATCH = 100  # relayed dead letters sent back to their sources per round trip
REDRIVE_LEASE_S = 300.0  # held while a redrive looks at them (released or acked before it returns)
REASON_HEADER = "chute-dead-letter-reason"
SOURCE_HEADER = "chute-dead-letter-source"
SUBJECT_HEADER = "chute-relay-subject"  # a topic message's subject, which a queue publish cannot carry
ORIGIN_HEADER = "chute-relay-origin"  # "<publish ms>[ <dedup id>]" of the message the copy was made of
LIFTED_HEADERS = frozenset({REASON_HEADER, SOURCE_HEADER, SUBJECT_HEADER, ORIGIN_HEADER})
COPY_DEDUP_PREFIXES = ("chute.relay:", "chute.redrive:")  # the dedup ids of relayed and redriven copies
BATCH = 500  # messages per relayed publish: one group commit on each side
BATCH_BYTES = 4 * 2**20  # and at most this many bytes of bodies (a batch of one may be larger)
LEASE_S = 60.0  # a batch's lease in the relay queue: longer than a forwarded call's wait for an owner (15 s)
WAIT_S = 1.0  # a relay's long poll; also how often an idle relay looks whether it is still needed
RETRY_S = 0.5  # after a failed publish (the target's shard is being taken over), before the next try
FAILED_RETRY_S = 5.0  # a message refused for good (a bug, or a limit) is retried after this, logged, not dropped
MAX_NAME_CHARS = 200  # model.NAME_RE: a queue name is at most 200 characters
SCAN_S = 2.0  # how often the relay queues of this node's shards are looked for besides change events
FRESH_S = 30.0  # a relay queue just made is never retired for feeding nothing yet: its subscription (or the
# queue dead-lettering into it) is made right after it, and may take a while to commit on a loaded node

# A relay queue never dead-letters (no max_deliveries) and never expires its messages (a message's own TTL
# still applies): what it holds has been confirmed to a publisher.
RELAY_SETTINGS = QueueSettings(lease_s=LEASE_S)


def relay_name(queue: str) -> str:
    """The relay queue that carries a topic shard's fan-out to `queue` of another shard."""
    return PREFIX + queue


def relayed_queue(name: str) -> str | None:
    """The real queue a relay queue named `name` feeds, or None if `name` is not a relay queue's."""
    return name[len(PREFIX) :] if name.startswith(PREFIX) else None


def fits(queue: str) -> bool:
    """Can `queue` get a relay queue (its name plus the prefix within the name limit)?"""
    return len(PREFIX) + len(queue) <= MAX_NAME_CHARS


def real_subscription(info: SubscriptionInfo) -> SubscriptionInfo:
    """A subscription to a relay queue as users see it: to the relay's queue."""
    real = relayed_queue(info.queue)
    return info if real is None else msgspec.structs.replace(info, queue=real)


def real_topic(info: TopicInfo) -> TopicInfo:
    """A topic as users see it: its subscriptions through relay queues name their real queues."""
    if not any(relayed_queue(s.queue) is not None for s in info.subscriptions):
        return info
    return msgspec.structs.replace(info, subscriptions=[real_subscription(s) for s in info.subscriptions])


def subscribed_name(broker, topic: str, pattern: str, queue: str) -> str:
    """The queue name of `topic`'s subscription (`pattern`, `queue`) in `broker`: `queue`, or its relay queue's
    when the subscription goes through one."""
    found = broker.core.topics.get(topic)
    relayed = (pattern, relay_name(queue))
    if found is not None and (pattern, queue) not in found.subscriptions and relayed in found.subscriptions:
        return relay_name(queue)
    return queue


def backlog(broker) -> int:
    """Messages waiting in the relay queues of one shard's broker (ready, in flight or delayed)."""
    total = 0
    for name in [name for name in broker.core.queues if name.startswith(PREFIX)]:
        stats = broker.queue_stats(name)
        total += stats.ready + stats.in_flight + stats.delayed
    return total


class Relays:
    """The relay tasks of one node's router: one per relay queue of a shard this node serves."""

    def __init__(self, router) -> None:
        self.router = router  # the root ClusterBroker: publishes go through it, to the queue's shard
        self._tasks: dict[tuple[int, str], asyncio.Task] = {}
        self._wake = asyncio.Event()
        self._scanner: asyncio.Task | None = None
        self.relayed = 0  # messages forwarded since start (for status)
        self._closed = False
        self._fresh: dict[str, float] = {}  # relay queue -> when this node made it (monotonic)

    def made(self, name: str) -> None:
        """Relay queue `name` was just made (or reused) for a subscription or a dead-letter queue: keep it."""
        self._fresh[name] = time.monotonic()
        self.changed()

    def unused(self, name: str) -> None:
        """A subscription through relay queue `name` ended: it may be retired as soon as it is empty."""
        self._fresh.pop(name, None)
        self.changed()

    def _retirable(self, name: str) -> bool:
        made = self._fresh.get(name)
        if made is not None and time.monotonic() - made < FRESH_S:
            return False
        self._fresh.pop(name, None)
        return True

    def start(self) -> None:
        self._scanner = asyncio.get_running_loop().create_task(self._scan_loop())

    def changed(self) -> None:
        """A shard came or went, or a subscription changed: look again now."""
        self._wake.set()

    async def close(self) -> None:
        self._closed = True
        tasks = [t for t in (self._scanner, *self._tasks.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    def lag(self) -> dict[int, int]:
        """Messages waiting in the relay queues of each shard served here (ready, in flight or delayed)."""
        return {shard: backlog(broker) for shard, broker in self._served().items()}

    def _served(self) -> dict[int, object]:
        node = self.router.node
        found = {}
        for shard in range(node.shards):
            broker = node.local_broker(shard)
            if broker is not None and broker._state == "serving":
                found[shard] = broker
        return found

    async def _scan_loop(self) -> None:
        while not self._closed:
            self.scan()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SCAN_S):
                    await self._wake.wait()

    def scan(self) -> None:
        """Start a relay task for every relay queue of a served shard that has none running."""
        for key, task in list(self._tasks.items()):
            if task.done():
                del self._tasks[key]
        if self.router._draining:  # the server stops: long polls end at once; relays resume on the next owner
            return
        for shard, broker in self._served().items():
            for name in list(broker.core.queues):
                if name.startswith(PREFIX) and (shard, name) not in self._tasks:
                    task = asyncio.get_running_loop().create_task(self._relay(shard, broker, name))
                    self._tasks[(shard, name)] = task

    async def _relay(self, shard: int, broker, name: str) -> None:
        """Forward relay queue `name` of `shard` while this node serves it with `broker`."""
        target = relayed_queue(name)
        deliveries: list = []
        batch = BATCH  # halved while the real queue refuses batches, doubled back after each that it takes
        try:
            while self.router.node.local_broker(shard) is broker and name in broker.core.queues:
                if self.router._draining:
                    return
                deliveries = await broker.receive(name, batch, wait_s=WAIT_S, lease_s=LEASE_S, max_bytes=BATCH_BYTES)
                if not deliveries:
                    if self._retirable(name) and await _retire_if_unused(broker, name):
                        return
                    continue
                try:
                    await self.router.publish_batch(target, [_copy(shard, d) for d in deliveries])
                except QueueNotFound:
                    if await _target_gone(broker, name, target, deliveries):
                        return
                    continue
                except QueueFull as exc:
                    if await dead_letters_refused(self.router, target):
                        log.info("relay %s of shard %d: %r refused %d messages and dead-lettered them: %s", name,
                                 shard, target, len(deliveries), exc.message)  # fmt: skip
                        await broker.ack(name, [d.receipt for d in deliveries])
                    else:
                        batch = await self._refused(shard, broker, name, deliveries, exc)
                    deliveries = []
                    continue
                except ChuteError as exc:
                    batch = await self._refused(shard, broker, name, deliveries, exc)
                    deliveries = []
                    continue
                await broker.ack(name, [d.receipt for d in deliveries])
                self.relayed += len(deliveries)
                deliveries = []
                batch = min(BATCH, batch * 2)
        except (BrokerClosed, QueueNotFound):
            return  # the shard was handed back or dropped (its new owner relays), or the relay queue deleted
        except ChuteError as exc:  # an ack refused, or the shard's store failed: the scan restarts us (the node
            # reopens a failed shard); what this batch leased is given back now rather than when its lease ends
            log.warning("relay %s of shard %d stopped: %s", name, shard, exc.message)
            if deliveries:
                with contextlib.suppress(ChuteError):
                    await broker.nack(name, [d.receipt for d in deliveries])

    async def _refused(self, shard: int, broker, name: str, deliveries: list, exc: ChuteError) -> int:
        """A batch of relay queue `name` was refused by its real queue: give it back and return the next batch's
        size. The real queue publishes a batch whole or not at all, and a relay's batch gathers many publishes:
        a queue with room for fewer (max_length or max_bytes with overflow `reject`), or one message it refuses
        for good, refused every batch, and the relay stalled for ever. So such a batch is halved until it fits,
        or is one message: one the queue has no room for waits (the queue is full), one refused for good is
        given back with a delay, to be retried and logged again, while the messages behind it go on."""
        target = relayed_queue(name)
        level = logging.INFO if exc.retryable else logging.ERROR
        log.log(level, "relay %s of shard %d: cannot publish %d messages to %r yet: %s", name, shard,
                len(deliveries), target, exc.message)  # fmt: skip
        splits = isinstance(exc, QueueFull) or not exc.retryable
        delay_s = FAILED_RETRY_S if len(deliveries) == 1 and not exc.retryable else 0.0
        with contextlib.suppress(ChuteError):
            await broker.nack(name, [d.receipt for d in deliveries], delay_s=delay_s)
        if splits and len(deliveries) > 1:
            return max(1, len(deliveries) // 2)  # at once: the first half may fit
        # a back-off, not a wait for a condition: nothing announces that the owner came back or made room (and a
        # refusal of every message, such as a peer's authentication failing, is not retried in a tight loop)
        await asyncio.sleep(RETRY_S)
        return 1 if splits else BATCH


def _copy(shard: int, delivery) -> Publish:
    message = delivery.message
    ttl_s = None
    if message.expires_at is not None and delivery.dead_letter_reason is None:
        # (a dead letter's own TTL ended with it: in its dead-letter queue only that queue's TTL counts, from now,
        # as in one broker and in RabbitMQ, which drops a dead letter's expiration)
        ttl_s = max(0.001, message.expires_at - time.time())
    return Publish(body=message.body, headers=_carried(delivery), priority=message.priority,
                   group=message.group, ttl_s=ttl_s, dedup_id=relay_dedup_id(shard, delivery))  # fmt: skip


def _carried(delivery) -> dict[str, str] | None:
    """A copy's headers: the message's own, plus what a queue publish cannot carry in its fields — the subject
    of a topic's message (SUBJECT_HEADER), the original's publish time and dedup id (ORIGIN_HEADER), and a dead
    letter's reason and source — if they still fit the limits of a message's headers (model.MAX_HEADERS,
    MAX_HEADER_BYTES). What does not fit is left out (the origin first, then the dead letter's, then the
    subject): a publish over those limits is refused for good, and the relay would retry the batch forever,
    holding back every message behind this one. A dead letter's own headers from an
    earlier relay are replaced, or dropped when the new ones do not fit."""
    message = delivery.message
    own = dict(message.headers or {})
    subject = {SUBJECT_HEADER: message.subject} if message.subject is not None else {}
    extra = {**subject, ORIGIN_HEADER: _origin(delivery)}
    dead: dict[str, str] = {}
    if delivery.dead_letter_reason is not None:
        own.pop(REASON_HEADER, None)
        own.pop(SOURCE_HEADER, None)
        dead = {REASON_HEADER: delivery.dead_letter_reason, SOURCE_HEADER: delivery.dead_letter_source or ""}
    for added in ({**extra, **dead}, {**subject, **dead}, dead, {}):
        headers = {**own, **added}
        if len(headers) <= MAX_HEADERS and sum(len(k) + len(v) for k, v in headers.items()) <= MAX_HEADER_BYTES:
            return headers or None
    return own or None  # (not reached: the message's own headers were within the limits when published)


def _origin(delivery) -> str:
    """ORIGIN_HEADER's value for a copy of `delivery`'s message: its publish time in milliseconds and the dedup id
    its publisher gave it, which a reader of the copy sees, as one broker shows the one stored message (the copy
    itself is stored with the relay's dedup id, and its own id and time). A copy of a copy keeps the first's."""
    message = delivery.message
    if _copied(delivery):
        return (message.headers or {}).get(ORIGIN_HEADER) or str(round(message.publish_time * 1000))
    ms = round(message.publish_time * 1000)
    return f"{ms} {message.dedup_id}" if message.dedup_id is not None else str(ms)


def relay_dedup_id(shard: int, delivery) -> str:
    """The dedup id of a relayed copy: the same each time the same entry of the relay queue is forwarded
    (message ids are unique in a shard and kept by recovery). A dead letter adds its source queue (hashed, to
    stay within the 128 characters of a dedup id): one message fanned out to two queues of the shard that both
    dead-letter into the relay is two dead letters."""
    dedup_id = f"chute.relay:{shard}:{delivery.message.id}"
    if delivery.dead_letter_reason is not None:
        source = (delivery.dead_letter_source or "").encode()
        dedup_id += ":" + hashlib.blake2s(source, digest_size=8).hexdigest()
    return dedup_id


def _feeding(broker, name: str) -> list[tuple[str, str]]:
    """(topic, pattern) of the subscriptions of `broker` that feed queue `name`, read from the queue's `feeds`,
    whose keys are (topic name, (pattern, queue name)); none if the queue is gone."""
    queue = broker.core.queues.get(name)
    return [] if queue is None else [(topic, pattern) for topic, (pattern, _) in queue.feeds]


def _dead_lettering(broker, name: str) -> list[str]:
    """The queues of `broker` whose dead-letter queue is `name` (the core's `dead_letter_users`), by name."""
    return sorted(broker.core.dead_letter_users.get(name, ()))


def _copied(delivery) -> bool:
    """Whether a delivery's message is a copy a relay or a redrive made (not a user's, whatever its headers)."""
    return (delivery.message.dedup_id or "").startswith(COPY_DEDUP_PREFIXES)


def lift_relayed(delivery) -> None:
    """A copy a relay (or a redrive) made as one broker would hand the message out: its subject, the publish
    time and dedup id of the message it copies, and a dead letter's reason and source queue, from its headers
    back in the message's and the delivery's fields (the headers go). Only the cluster's copies, known by their
    dedup ids, are lifted: a user's message with such headers keeps them, as on one broker."""
    message = delivery.message
    headers = message.headers
    if not headers or not _copied(delivery) or LIFTED_HEADERS.isdisjoint(headers):
        return
    kept = {key: value for key, value in headers.items() if key not in LIFTED_HEADERS}
    subject = message.subject if message.subject is not None else headers.get(SUBJECT_HEADER)
    fields: dict = {"headers": kept, "subject": subject}
    ms, _, dedup_id = headers.get(ORIGIN_HEADER, "").partition(" ")
    if ms.isdigit():
        fields.update(publish_time=int(ms) / 1000.0, dedup_id=dedup_id or None)
    delivery.message = msgspec.structs.replace(message, **fields)  # (messages may be shared)
    if REASON_HEADER in headers and delivery.dead_letter_reason is None:
        reason = headers[REASON_HEADER]
        delivery.dead_letter_source = headers.get(SOURCE_HEADER) or None
        if reason in DEAD_LETTER_REASONS:
            delivery.dead_letter_reason = reason


def real_settings(info):
    """A QueueInfo as users see it: a dead-letter queue behind a relay queue by its own name."""
    real = relayed_queue(info.settings.dead_letter_queue or "")
    if real is None:
        return info
    return msgspec.structs.replace(info, settings=msgspec.structs.replace(info.settings, dead_letter_queue=real))


async def _retire_if_unused(broker, name: str) -> bool:
    """Delete relay queue `name` if it feeds nothing and holds nothing; True if it is gone."""
    if name not in broker.core.queues:
        return True
    if _feeding(broker, name) or _dead_lettering(broker, name):
        return False
    stats = broker.queue_stats(name)
    if stats.ready or stats.in_flight or stats.delayed:
        return False
    await broker.delete_queue(name)
    log.info("relay queue %s deleted: no subscription feeds it any more", name)
    return True


async def _target_gone(broker, name: str, target: str, deliveries) -> bool:
    """`target` was deleted: its subscriptions through this relay end, and the relay queue with them; while
    queues still dead-letter into the relay, their dead letters are dropped (as without a dead-letter queue).
    True if the relay queue is gone."""
    for topic, pattern in _feeding(broker, name):
        with contextlib.suppress(ChuteError):
            await broker.unsubscribe(topic, pattern, name)
    if _dead_lettering(broker, name):
        log.warning("relay %s: dead-letter queue %r no longer exists; %d dead letters of %s dropped", name, target,
                    len(deliveries), ", ".join(_dead_lettering(broker, name)))  # fmt: skip
        await broker.ack(name, [d.receipt for d in deliveries])
        return False
    with contextlib.suppress(ChuteError):
        await broker.delete_queue(name)
    log.info("relay queue %s deleted: its queue %r no longer exists", name, target)
    return True


async def refuse_if_dead_letter_queue(router, name: str) -> None:
    """QueueInUse, as a single broker says it, if a queue of any shard dead-letters into `name`; Unavailable
    (retryable) while a shard has no live owner to ask (a takeover is under way)."""
    node = router.node
    if router.forward:  # (a forwarded call's local view answers for its own shards: its sender asked the rest)
        for shard in range(node.shards):
            owner = node.owner(shard)
            if node.local_broker(shard) is None and not (owner is not None and owner.alive and owner.port):
                raise Unavailable(f"shard {shard} has no live owner now (a takeover is under way); retry")
    sources = router.dead_letter_sources(name)
    sources = await sources if inspect.isawaitable(sources) else sources
    if sources:
        raise QueueInUse(f"queue {name!r} is the dead-letter queue of {', '.join(sources)}")


async def dead_letters_refused(router, queue: str, shard: int | None = None) -> bool:
    """Does `queue`, which just refused a publish as full, dead-letter what it refuses (overflow
    `reject-dead-letter`, with a dead-letter queue)? Then what it refused is a dead letter again, and sending it
    once more would make another: the caller settles it instead. False if that cannot be asked now (the caller
    then goes on as for `reject`). `shard`: ask the copy in that shard (a moving queue's new one), not the one
    the router serves the name from (a node serving the old copy serves it from there)."""
    try:
        info = router.queue_info(queue) if shard is None else router._on_shard(shard, "queue_info", queue)
        info = await info if inspect.isawaitable(info) else info
    except ChuteError:
        return False
    settings = info.settings
    return settings.overflow == "reject-dead-letter" and settings.dead_letter_queue is not None


async def redrive_relayed(broker, router, shard: int, queue: str, budget: int | None) -> int:
    """Send the dead letters that relays brought into `queue` (of `shard`, served here by `broker`) back to their
    source queues in other shards, as a single broker's redrive does for its own: each is received, published
    into its source through `router` (headers without the dead-letter ones; a dedup id from its id here, so a
    retry after a crash adds no copy within the source's dedup window), then acked. Other messages of `queue` are
    left where they were (received, then released at the end: their receive count goes up by one). At most
    `budget` are moved (None: all); returns how many. An error (a source queue full with overflow `reject`, which
    one broker's redrive would fill all the same; its node lost) ends the redrive, and what it leased and did not
    move is released at once (it was left leased for REDRIVE_LEASE_S); a source full with `reject-dead-letter`
    put the batch back in its dead-letter queue itself, so that batch is acked here before the error."""
    moved, passed = 0, []
    by_source: dict[str, list] = {}  # (the batch being sent back: what is left of it is released on an error)
    scan = broker.queue_stats(queue).ready  # what is there now: a loop never walks what it released itself
    try:
        while scan > 0 and (budget is None or moved < budget):
            want = min(REDRIVE_BATCH, scan) if budget is None else min(REDRIVE_BATCH, scan, budget - moved)
            deliveries = await broker.receive(queue, want, lease_s=REDRIVE_LEASE_S)
            if not deliveries:
                break
            scan -= len(deliveries)
            by_source = {}
            for delivery in deliveries:
                headers = delivery.message.headers or {}
                source = headers.get(SOURCE_HEADER) if REASON_HEADER in headers and _copied(delivery) else None
                if source:
                    by_source.setdefault(source, []).append(delivery)
                else:
                    passed.append(delivery.receipt)
            for source in list(by_source):
                back = by_source[source]
                try:
                    await router.publish_batch(source, [_back(shard, d) for d in back])
                except QueueNotFound:  # its source is gone: it stays a dead letter, as in one broker
                    passed += [d.receipt for d in by_source.pop(source)]
                    continue
                except QueueFull:  # a full `reject-dead-letter` source dead-lettered them again: not twice
                    if await dead_letters_refused(router, source):
                        await broker.ack(queue, [d.receipt for d in by_source.pop(source)])
                    raise
                await broker.ack(queue, [d.receipt for d in by_source.pop(source)])
                moved += len(back)
    finally:
        passed += [d.receipt for back in by_source.values() for d in back]
        if passed:
            broker.release(queue, passed)
    return moved


def _back(shard: int, delivery) -> Publish:
    message = delivery.message
    headers = {k: v for k, v in (message.headers or {}).items() if k not in (REASON_HEADER, SOURCE_HEADER)}
    return Publish(body=message.body, headers=headers or None, priority=message.priority, group=message.group,
                   dedup_id=f"chute.redrive:{shard}:{message.id}")  # fmt: skip
