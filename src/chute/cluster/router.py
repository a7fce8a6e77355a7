"""`ClusterBroker`: "the broker" of a cluster node — `chute.Broker`'s public API, routed by name to shards.

Every queue and topic lives in one shard (placement.py); each shard is a whole `chute.Broker` on the node that
owns it (node.py). A call naming a queue or topic goes to the broker of its shard: in this process when this
node owns the shard, else to the owner over the native protocol (peers.py). Listings merge every shard.

    front (session, HTTP API, SQS, AMQP) ──► ClusterBroker ──► local Broker of shard s   (this node owns s)
                                                       └────► Peer(owner of s) ──► its ClusterBroker.local

Rules:
- routing: a name held by a local shard's broker is served there at once; else its placement row gives the
  shard (not placed = not found, as one broker says it), and the shard's owner serves it; a row naming a shard
  that does not hold the name yet (it is being created or moved there) is waited for, up to ARRIVING_S;
- a shard with no live owner (its node died; the takeover is under way) is waited for up to `wait_owner_s`,
  then the call fails with `unavailable` (retryable) having changed nothing;
- no loops: `local` is the view that peers' connections use; it never forwards, and a call for a shard this node
  does not own fails there with `unavailable`, so the sender looks up the owner again (within its wait). One
  exception, bounded: a peer's subscribe of a queue held here to a topic of another shard moves the queue, which
  creates it (and carries over what reached it) in the topic's shard and subscribes it there through this
  node's router: one hop to a node whose local view finds the queue in the topic's shard and moves nothing;
- a new queue or topic gets its placement row first, then is created in its shard; a queue made for a
  subscription (subscribe to a queue that does not exist yet) is placed in its topic's shard, so fan-out stays
  in one shard; an empty queue of another shard moves there (by the node holding it); a subscription of a
  topic to another queue of another shard goes through a relay queue in the topic's shard (relay.py), made by
  the node serving that shard (one more hop when the queue's node was asked first); relay queues are left out
  of listings and shown under their real queue's name in subscriptions;
- receipts stay opaque: they are routed by the queue they came from;
- ephemeral subscriptions' queues get names that say their shard (`~<shard>.<n>`), since each shard's broker
  numbers its own from 1.

Methods that `chute.Broker` has as plain functions (`queue_stats`, `topic_info`, `list_queues`, `list_topics`,
`ephemeral_subscription`) answer at once for what this node holds, and otherwise return an awaitable: the
native session and the routed fronts await what is awaitable.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import time
from collections.abc import Sequence

import msgspec

from chute.cluster.consumers import ConsumerRegistry
from chute.cluster.localview import LocalCore, LocalStore
from chute.cluster.peers import PEER_CLIENT, Peers
from chute.cluster.placement import ARRIVING_POLL_S, ARRIVING_S, namespace_error
from chute.cluster.relay import (
    RELAY_SETTINGS,
    Relays,
    dead_letters_refused,
    fits,
    lift_relayed,
    real_settings,
    real_subscription,
    real_topic,
    redrive_relayed,
    refuse_if_dead_letter_queue,
    relay_name,
    relayed_queue,
    subscribed_name,
)
from chute.cluster.strays import Strays
from chute.consumer import Consumer
from chute.errors import (
    BrokerClosed,
    ChuteError,
    InvalidArgument,
    InvalidName,
    QueueFull,
    QueueNotFound,
    TopicNotFound,
    Unavailable,
)
from chute.model import Delivery, Publish, QueueInfo, SubscriptionInfo, TopicInfo, validate_name

log = logging.getLogger("chute.cluster")
WAIT_OWNER_S = 15.0  # how long a call waits for a shard without a live owner (a takeover: lease + recovery)
RECHECK_S = 0.2  # while waiting, how often ownership is looked at again (besides the node's change events)
REMOTE_POLL_S = 0.1  # `_wait_ready` for a queue of another node: how long before its caller looks again
EPHEMERAL = "~"


class ClusterBroker:
    """The router of one node. `await start()` starts the node (membership, shards); `close()` stops it."""

    def __init__(self, node, *, peers: Peers | None = None, wait_owner_s: float = WAIT_OWNER_S,
                 forward: bool = True, _shared: ClusterBroker | None = None) -> None:  # fmt: skip
        self.node = node
        self.forward = forward
        self.wait_owner_s = wait_owner_s
        self._root = _shared or self
        self.recovery = None
        self.checkpoints = 0
        self.consumer_registry = ConsumerRegistry(node)  # every node's AMQP consumers (consumers.py)
        if _shared is None:
            self.peers = peers or Peers(node.name)
            self._changed = asyncio.Event()
            self._state_value = "new"
            self._draining = False
            self._relays: dict[str, object] = {}  # "~r<n>" -> AsyncConsumer of an owner's ephemeral subscription
            self._relay_numbers = itertools.count(1)
            self.relays = Relays(self)
            self.strays = Strays(self)
            self.local = ClusterBroker(node, wait_owner_s=0.0, forward=False, _shared=self)
        else:  # the local view shares the pool, the state and the change event of its router
            self.peers, self._changed, self.relays = _shared.peers, _shared._changed, _shared.relays
            self.strays = _shared.strays
            self.local = self

    routed = True  # the server's fronts: calls go through the router (no `_lease`/`_ack` fast paths)

    @property
    def core(self) -> LocalCore:
        """The merged state of the shards this node serves now (for /metrics and overviews; read-only)."""
        return LocalCore(self._local_brokers)

    @property
    def store(self) -> LocalStore:
        """The stores of the shards this node serves now, counted together."""
        return LocalStore(self._local_brokers, getattr(self.node, "where", "?"))

    @property
    def placement(self):
        """The node's placement (set when the node starts)."""
        return self.node.placement

    # -- lifecycle --------------------------------------------------------------------------------------------

    @property
    def _state(self) -> str:
        return self._root._state_value

    @_state.setter
    def _state(self, value: str) -> None:
        self._root._state_value = value

    async def start(self) -> ClusterBroker:
        listeners = getattr(self.node, "on_change", None)
        if isinstance(listeners, list):
            listeners.append(self._node_changed)
        await self.node.start()
        self._state = "serving"
        self.relays.start()
        self.strays.changed()
        return self

    def _node_changed(self, *_args) -> None:
        """The node gained or lost a shard, or learned of another node's change: waiting calls look again, and
        relays of shards gained start."""
        self._changed.set()
        self.relays.changed()
        if self._state == "serving":
            self.strays.changed()

    async def close(self) -> None:
        """Stop forwarding, hand the node's shards back (their brokers close cleanly) and leave. Idempotent."""
        if self._state == "closed":
            return
        self._state = "closing"
        await self.relays.close()
        await self.strays.close()
        if _BACKGROUND:  # forwarded releases, relays being closed
            await asyncio.wait(list(_BACKGROUND), timeout=5.0)
        await self.peers.close()
        await self.node.stop()
        self._state = "closed"

    async def __aenter__(self) -> ClusterBroker:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def end_long_polls(self) -> None:
        self._root._draining = True
        for broker in self._local_brokers():
            broker.end_long_polls()

    @property
    def healthy(self) -> bool:
        """Serving, and the node reaches the database (a node cut off from it serves nothing)."""
        if self._state != "serving":
            return False
        healthy = getattr(self.node, "healthy", None)
        if healthy is None:
            healthy = self.node.status().get("healthy", True)
        return bool(healthy)

    def _check(self) -> None:
        if self._state != "serving":
            raise BrokerClosed(f"broker is {self._state}")

    def for_peer(self, client_name: str) -> ClusterBroker:
        """The broker a native session serves: the local view for another node's forwarding connection (its
        calls are never forwarded again), else this router."""
        return self.local if client_name.startswith(PEER_CLIENT) else self

    @property
    def process(self) -> tuple[str, str]:
        """This node's name and incarnation (which process runs the name now)."""
        return self.node.name, getattr(self.node, "incarnation", "")

    async def process_running(self, name: str, incarnation: str) -> bool:
        """Whether process `incarnation` of node `name` is alive (node.py `running`; yes when the node cannot
        tell)."""
        running = getattr(self.node, "running", None)
        return True if running is None else await running(name, incarnation)

    def kind_of(self, name: str) -> str:
        """The kind of `name`, "topic" or "queue", as far as this node knows without asking (for permission checks)."""
        holder = self._local_holder(name)
        if holder is not None:
            return "topic" if name in holder.core.topics else "queue"
        placed = self.placement._cache.get(name) if self.placement is not None else None
        return placed.kind if placed is not None else "queue"

    def holds(self, name: str) -> bool:
        """Whether this node serves the shard of queue or topic `name` now (its calls are answered here)."""
        return self._local_holder(name) is not None

    # -- finding the broker of a name ---------------------------------------------------------------------------

    def _local_brokers(self) -> list:
        brokers = (self.node.local_broker(shard) for shard in range(self.node.shards))
        return [broker for broker in brokers if broker is not None]

    def _local_holder(self, name: str):
        """The local broker holding queue or topic `name` now, or None."""
        if name.startswith(EPHEMERAL):
            shard, real = _ephemeral_parts(name)
            return self.node.local_broker(shard) if shard is not None else None
        for broker in self._local_brokers():
            core = broker.core
            if (name in core.queues or name in core.topics) and broker._state == "serving":
                return broker  # (a shard being handed back is not: its calls wait for the next owner)
        return None

    async def _shard_of(self, name: str, missing: type[ChuteError] = QueueNotFound) -> int:
        if name.startswith(EPHEMERAL):
            shard, _ = _ephemeral_parts(name)
            if shard is None:
                raise missing(f"no queue or topic is named {name!r}")
            return shard
        placed = await self.placement.lookup(name)
        if placed is None:
            raise missing(f"no {'topic' if missing is TopicNotFound else 'queue or topic'} is named {name!r}")
        return placed.shard

    async def _owner(self, shard: int, deadline: float):
        """The local broker of `shard`, or the peer of its live owner; waits for one until `deadline`."""
        loop = asyncio.get_running_loop()
        while True:
            self._check()
            broker = self.node.local_broker(shard)
            if broker is not None and broker._state == "serving":
                return broker
            if self.forward:
                owner = self.node.owner(shard)
                if owner is not None and owner.alive and owner.name != self.node.name and owner.port:
                    return self.peers.get(owner)
            remaining = deadline - loop.time()
            if remaining <= 0 or self._root._draining:
                if not self.forward:
                    raise Unavailable(f"node {self.node.name} does not own shard {shard} (any more)")
                raise Unavailable(f"shard {shard} has no live owner now (a takeover is under way); retry")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, RECHECK_S)):
                    await self._changed.wait()

    def _owner_now(self, shard: int):
        """The local broker of `shard`; Unavailable if this node does not serve it now (no waiting)."""
        broker = self.node.local_broker(shard)
        if broker is not None and broker._state == "serving":
            return broker
        raise Unavailable(f"node {self.node.name} does not own shard {shard} (any more)")

    async def _on_shard(self, shard: int, method: str, *args, **kwargs):
        """Call `method` on the broker of `shard` (local or a peer), waiting for an owner within the bound; a
        peer that answers `unavailable` (it lost the shard) is asked again once the owner changed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_owner_s
        while True:
            target = await self._owner(shard, deadline)
            try:
                result = getattr(target, method)(*args, **kwargs)
                return await result if inspect.isawaitable(result) else result
            except (Unavailable, BrokerClosed) as exc:
                # Refused before anything was done: a peer that does not own the shard, or a local broker that
                # is being handed back (its calls check the state first). A lost connection is Unavailable too,
                # but the router cannot tell: retrying can repeat the call, which at-least-once allows.
                if loop.time() >= deadline or self._state != "serving" or not self.forward:
                    raise
                log.debug("shard %d: %s; looking for its owner again", shard, exc.message)
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RECHECK_S):
                        await self._changed.wait()

    async def _on_name(self, name: str, method: str, *args, missing: type[ChuteError] = QueueNotFound, **kwargs):
        """Call `method` on the broker holding `name`; a stale placement row (the shard says not found, another
        node moved the name meanwhile) is read again. A row naming the shard that says not found is a name on its
        way there (its row is written first: a queue being created, or moved to its topic's shard while it
        exists elsewhere): the call is tried again while the row stays, for up to ARRIVING_S, rather than
        answered not found for a queue that exists. (Only the router that forwards waits: a peer's local view
        answers at once, and its sender waits.)"""
        self._check()
        holder = self._local_holder(name)
        if holder is not None:
            result = getattr(holder, method)(*args, **kwargs)
            return await result if inspect.isawaitable(result) else result
        shard = await self._shard_of(name, missing)
        deadline = asyncio.get_running_loop().time() + ARRIVING_S
        while True:
            try:
                return await self._on_shard(shard, method, *args, **kwargs)
            except (QueueNotFound, TopicNotFound):
                placed = await self.placement.refresh(name)
                if placed is None or (placed.shard == shard and not self.forward):
                    raise
                if asyncio.get_running_loop().time() >= deadline:
                    raise
                if placed.shard == shard:
                    await asyncio.sleep(ARRIVING_POLL_S)  # (a poll: nothing announces the queue's arrival)
                shard = placed.shard
                holder = self._local_holder(name)
                if holder is not None:
                    result = getattr(holder, method)(*args, **kwargs)
                    return await result if inspect.isawaitable(result) else result

    # -- publish ----------------------------------------------------------------------------------------------

    async def publish(self, dest: str, body: bytes, **options) -> int:
        return (await self.publish_batch(dest, [Publish(body=body, **options)]))[0]

    async def publish_batch(self, dest: str, messages: Sequence[Publish]) -> list[int]:
        return await self._on_name(dest, "publish_batch", dest, messages)

    async def publish_many(self, groups: Sequence[tuple[str, Sequence[Publish]]]) -> list[list[int] | ChuteError]:
        """As `Broker.publish_many`: each group stored or refused on its own, results in order. Groups of one
        local broker still share its group commit; the others go to their owners concurrently."""
        self._check()
        results: list = [None] * len(groups)
        by_broker: dict[int, tuple[object, list[int]]] = {}
        remote: list[int] = []
        for index, (dest, _) in enumerate(groups):
            holder = self._local_holder(dest) if isinstance(dest, str) else None
            if holder is None:
                remote.append(index)
            else:
                by_broker.setdefault(id(holder), (holder, []))[1].append(index)

        async def local(broker, indexes: list[int]) -> None:
            outcomes = await broker.publish_many([groups[i] for i in indexes])
            for i, outcome in zip(indexes, outcomes, strict=True):
                results[i] = outcome

        async def routed(index: int) -> None:
            dest, messages = groups[index]
            try:
                results[index] = await self.publish_batch(dest, messages)
            except ChuteError as exc:
                results[index] = exc

        await asyncio.gather(*(local(b, ix) for b, ix in by_broker.values()), *(routed(i) for i in remote))
        return results

    # -- consume ----------------------------------------------------------------------------------------------

    async def receive(self, queue: str, max_messages: int = 1, *, wait_s: float = 0.0, lease_s: float | None = None,
                      max_bytes: int | None = None) -> list[Delivery]:  # fmt: skip
        if self._root._draining:
            wait_s = 0.0
        if queue.startswith(EPHEMERAL):
            relay = self._root._relays.get(queue)
            if relay is not None:
                return await self._relayed(queue, relay, max_messages, wait_s)
            shard, real = _ephemeral_parts(queue)
            broker = self.node.local_broker(shard) if shard is not None else None
            if broker is None:
                raise QueueNotFound(f"no queue is named {queue!r} (its subscription ended)")
            deliveries = await broker.receive(real, max_messages, wait_s=wait_s, lease_s=lease_s, max_bytes=max_bytes)
            for delivery in deliveries:
                delivery.queue = queue
            return deliveries
        return _lifted(await self._on_name(queue, "receive", queue, max_messages, wait_s=wait_s, lease_s=lease_s,
                                           max_bytes=max_bytes))  # fmt: skip

    async def _relayed(self, name: str, relay, max_messages: int, wait_s: float) -> list[Delivery]:
        """Deliveries of an ephemeral subscription on another node, as they arrive over the peer connection."""
        try:
            deliveries = await relay.get_many(max_messages, timeout=wait_s)
        except ChuteError as exc:
            self._root._relays.pop(name, None)
            raise Unavailable(f"the node serving this ephemeral subscription was lost: {exc.message}") from None
        for delivery in deliveries:
            delivery.queue = name
        return deliveries

    async def ack(self, queue: str, receipts: int | Sequence[int], *, lapsed: bool = False,
                  dead_lettered: bool = False) -> None:  # fmt: skip
        await self._on_name(queue, "ack", queue, receipts, lapsed=lapsed, dead_lettered=dead_lettered)

    def ack_lazy(self, queue: str, receipts: Sequence[int]) -> list[int]:
        """As `Broker.ack_lazy` (an AMQP basic.ack: nobody waits for it to be durable): for a queue of a shard
        served here, applied at once and stored with that shard's next group commit; for another node's queue,
        forwarded as an ordinary (durable) ack in the background, whose failure is logged. Returns the receipts
        known not to be leased (none for a forwarded ack: the owner's answer comes later)."""
        self._check()
        if queue in self._root._relays:
            return []  # an ephemeral subscription relayed from another node: delivered at most once, no acks
        holder = self._local_holder(queue)
        if holder is not None:
            return holder.ack_lazy(_ephemeral_parts(queue)[1] if queue.startswith(EPHEMERAL) else queue, receipts)
        task = asyncio.ensure_future(self._ack_forwarded(queue, list(receipts)))
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)
        return []

    async def _ack_forwarded(self, queue: str, receipts: list[int]) -> None:
        try:
            await self.ack(queue, receipts)
        except ChuteError as exc:
            log.info("a forwarded ack of %d receipts of queue %r failed: %s", len(receipts), queue, exc.message)

    async def nack(self, queue: str, receipts: int | Sequence[int], *, delay_s: float = 0.0,
                   dead_letter: bool = False) -> None:  # fmt: skip
        await self._on_name(queue, "nack", queue, receipts, delay_s=delay_s, dead_letter=dead_letter)

    async def extend(self, queue: str, receipts: int | Sequence[int], lease_s: float) -> None:
        await self._on_name(queue, "extend", queue, receipts, lease_s)

    def release(self, queue: str, receipts: Sequence[int]) -> None:
        """A consumer is gone: its leased messages are available again (at once here; a forwarded release goes
        in the background, and a lease that ends first gives them back anyway)."""
        if not receipts or self._state != "serving":
            return
        holder = self._local_holder(queue)
        if holder is not None:
            holder.release(_ephemeral_parts(queue)[1] if queue.startswith(EPHEMERAL) else queue, receipts)
            return
        task = asyncio.ensure_future(self._release_remote(queue, list(receipts)))
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)

    async def _release_remote(self, queue: str, receipts: list[int]) -> None:
        with contextlib.suppress(ChuteError):
            await self._on_name(queue, "release", queue, receipts)

    def consume(self, queue: str, *, prefetch: int = 100, lease_s: float | None = None) -> Consumer:
        """A push-style consumer in this process (as `Broker.consume`), wherever the queue's shard is."""
        self._check()
        return Consumer(self, queue, prefetch=prefetch, lease_s=lease_s)

    async def _wait_ready(self, queue: str, timeout: float) -> None:
        """Until `queue` may have messages, without leasing (the AMQP front's consumers wait so): the wait of
        its shard's broker when it is here, else a short pause (a remote wait would need a request of its own)."""
        holder = self._local_holder(queue)
        if holder is not None:
            await holder._wait_ready(_ephemeral_parts(queue)[1] if queue.startswith(EPHEMERAL) else queue, timeout)
        else:
            await asyncio.sleep(min(timeout, REMOTE_POLL_S))

    def _queue_deleted_or_closed(self, name: str) -> None:
        """(For `Consumer.close`: its long polls end by themselves within a poll.)"""

    async def peek(self, queue: str, max_messages: int = 10) -> list[Delivery]:
        return _lifted(await self._on_name(queue, "peek", queue, max_messages))

    async def redrive(self, queue: str, max_messages: int | None = None) -> int:
        """As `Broker.redrive`, by the node holding `queue`: its shard's own dead letters, then those relayed from
        queues of other shards, sent back through the (forwarding) router (relay.py's `redrive_relayed`)."""
        holder = self._local_holder(queue)
        if holder is None:
            return await self._on_name(queue, "redrive", queue, max_messages)  # (the owner's local view: below)
        moved = await holder.redrive(queue, max_messages)
        if max_messages is not None and moved >= max_messages:
            return moved
        shard = next(s for s in range(self.node.shards) if self.node.local_broker(s) is holder)
        budget = None if max_messages is None else max_messages - moved
        return moved + await redrive_relayed(holder, self._root, shard, queue, budget)

    # -- queues -----------------------------------------------------------------------------------------------

    async def create_queue(self, name: str, settings=None, **settings_kw) -> QueueInfo:
        """Place the queue (its home shard, unless it exists), then create it there."""
        self._check()
        if settings is not None:
            if settings_kw:
                raise InvalidArgument("give settings or keywords, not both")
            settings_kw = dict(msgspec.to_builtins(settings))
        _check_name(name)
        placed = await self.placement.place(name, "queue")
        if not self.forward and self.node.local_broker(placed.shard) is None:  # a peer moved it here meanwhile
            placed = await self.placement.refresh(name) or placed
        return await self._create_in(placed, "create_queue", name, settings_kw)

    async def _create_in(self, placed, method: str, name: str, settings_kw: dict):
        try:
            if method == "create_queue":
                return await self._queue_settings_call(placed.shard, method, name, settings_kw)
            return await self._on_shard(placed.shard, method, name, **settings_kw)
        except (InvalidName, InvalidArgument):
            with contextlib.suppress(ChuteError):  # nothing was created: the name is free again
                if await self._absent(placed):
                    await self.placement.forget(name, placed.kind)
            raise

    async def _absent(self, placed) -> bool:
        """Does the shard of `placed` hold no object of that name?"""
        try:
            if placed.kind == "queue":
                await self._on_shard(placed.shard, "queue_stats", placed.name)
            else:
                await self._on_shard(placed.shard, "topic_info", placed.name)
        except (QueueNotFound, TopicNotFound):
            return True
        return False

    async def update_queue(self, name: str, **changes) -> QueueInfo:
        self._check()
        holder = self._local_holder(name)
        if holder is None or name.startswith(EPHEMERAL):
            return real_settings(await self._on_name(name, "update_queue", name, **changes))
        changes = await self._dead_letter_here(holder, changes)
        return real_settings(await holder.update_queue(name, **changes))

    async def _queue_settings_call(self, shard: int, method: str, name: str, settings_kw: dict) -> QueueInfo:
        """`create_queue` or `update_queue` on `shard`: here with a dead-letter queue of another shard replaced
        by its relay queue, else by the owner's local view (which does the same)."""
        broker = self.node.local_broker(shard)
        if broker is None or broker._state != "serving":
            return real_settings(await self._on_shard(shard, method, name, **settings_kw))
        settings_kw = await self._dead_letter_here(broker, settings_kw)
        return real_settings(await getattr(broker, method)(name, **settings_kw))

    async def _dead_letter_here(self, broker, settings_kw: dict) -> dict:
        """Settings for a queue of local `broker`: a dead-letter queue that lives in another shard becomes the
        relay queue that forwards to it (made here if missing), relay.py."""
        dlq = settings_kw.get("dead_letter_queue")
        if not isinstance(dlq, str) or dlq in broker.core.queues or relayed_queue(dlq) is not None:
            return settings_kw
        # the row as it is now, not as cached: a queue deleted through another node is refused here as one
        # broker refuses a missing dead-letter queue, not named through a relay that drops its dead letters
        placed = await self.placement.refresh(dlq)
        if placed is None or placed.kind != "queue":
            return settings_kw  # the shard refuses it: no such queue
        if not fits(dlq):
            raise InvalidArgument(f"dead-letter queue {dlq!r} lives in another shard, and its name is too long for "
                                  "a relay queue (at most 188 characters)")  # fmt: skip
        relay = relay_name(dlq)
        self.relays.made(relay)  # (first: its relay must not retire it before the queue names it)
        if relay not in broker.core.queues:
            await broker.create_queue(relay, RELAY_SETTINGS)
            log.info("dead letters for queue %r of another shard go through relay queue %s", dlq, relay)
        return {**settings_kw, "dead_letter_queue": relay}

    async def delete_queue(self, name: str) -> None:
        """Delete in its shard, then remove its placement row; refused while a queue of any shard dead-letters into
        it (its own shard's broker checks its own queues; a relay queue stands for those of other shards)."""
        self._check()
        await refuse_if_dead_letter_queue(self, name)
        try:
            await self._on_name(name, "delete_queue", name)
        except QueueNotFound:
            placed = await self.placement.lookup(name)
            if placed is not None and placed.kind == "queue":
                await self.placement.forget(name, "queue")  # a row left by a failed create
            raise
        await self.placement.forget(name, "queue")

    async def purge_queue(self, name: str, *, in_flight: bool = False) -> int:
        return await self._on_name(name, "purge_queue", name, in_flight=in_flight)

    def list_queues(self):
        """Durable queues of every shard, by name (an awaitable when other nodes own shards: it asks them)."""
        mine = [real_settings(q) for broker in self._local_brokers() for q in broker.list_queues()
                if not _is_relay(q.name)]  # fmt: skip
        if not self.forward or not self._remote_owners():
            return sorted(mine, key=lambda q: q.name)
        return self._merged("list_queues", mine)

    def _remote_owners(self) -> list:
        owners = {}
        for shard in range(self.node.shards):
            if self.node.local_broker(shard) is None:
                owner = self.node.owner(shard)
                if owner is not None and owner.alive and owner.name != self.node.name and owner.port:
                    owners[owner.name] = owner
        return list(owners.values())

    async def _merged(self, method: str, mine: list) -> list:
        async def ask(owner) -> list:
            try:
                return await getattr(self.peers.get(owner), method)()
            except ChuteError as exc:  # a node lost meanwhile: its shards show again once taken over
                log.warning("listing: node %s did not answer %s: %s", owner.name, method, exc.message)
                return []

        answers = await asyncio.gather(*(ask(owner) for owner in self._remote_owners()))
        found = {item.name: item for item in mine}
        for answer in answers:
            for item in answer:
                if not _is_relay(item.name):
                    found.setdefault(item.name, item)
        return [found[name] for name in sorted(found)]

    def queue_stats(self, name: str):
        holder = self._local_holder(name)
        if holder is not None:
            return holder.queue_stats(name)
        return self._on_name(name, "queue_stats", name)

    # -- topics -----------------------------------------------------------------------------------------------

    async def create_topic(self, name: str, settings=None, **settings_kw) -> TopicInfo:
        self._check()
        if settings is not None:
            settings_kw = dict(msgspec.to_builtins(settings))
        _check_name(name)
        placed = await self.placement.place(name, "topic")
        return await self._create_in(placed, "create_topic", name, settings_kw)

    async def update_topic(self, name: str, **changes) -> TopicInfo:
        return await self._on_name(name, "update_topic", name, missing=TopicNotFound, **changes)

    async def delete_topic(self, name: str) -> None:
        try:
            await self._on_name(name, "delete_topic", name, missing=TopicNotFound)
        except TopicNotFound:
            placed = await self.placement.lookup(name)
            if placed is not None and placed.kind == "topic":
                await self.placement.forget(name, "topic")
            raise
        await self.placement.forget(name, "topic")

    def topic_info(self, name: str):
        holder = self._local_holder(name)
        if holder is not None:
            return real_topic(holder.topic_info(name))
        return self._remote_topic_info(name)

    async def _remote_topic_info(self, name: str) -> TopicInfo:
        return real_topic(await self._on_name(name, "topic_info", name, missing=TopicNotFound))

    def list_topics(self):
        mine = [real_topic(t) for broker in self._local_brokers() for t in broker.list_topics()]
        if not self.forward or not self._remote_owners():
            return sorted(mine, key=lambda t: t.name)
        return self._merged("list_topics", mine)

    # -- state reads (chute._reads) ---------------------------------------------------------------------------

    def queue_info(self, name: str):
        """As `Broker.queue_info`, for a queue of any shard (an awaitable for another node's)."""
        holder = self._local_holder(name)
        if holder is not None and not name.startswith(EPHEMERAL):
            return holder.queue_info(name)
        return self._on_name(name, "queue_info", name)

    def route(self, topic: str, subject: str, headers: dict[str, str] | None = None):
        """As `Broker.route`: asked of the topic's shard, whose subscriptions name its queues and the relay queues
        of queues in other shards (named here by their real queues)."""
        holder = self._local_holder(topic)
        if holder is not None:
            return _real_names(holder.route(topic, subject, headers))
        return self._route_remote(topic, subject, headers)

    async def _route_remote(self, topic: str, subject: str, headers: dict[str, str] | None) -> list[str]:
        return _real_names(await self._on_name(topic, "route", topic, subject, headers, missing=TopicNotFound))

    def dead_letter_sources(self, name: str):
        """As `Broker.dead_letter_sources`, over every shard: the queues whose dead-letter queue is `name`, in its own
        shard or through a relay queue in theirs (an awaitable when other nodes own shards: it asks each of them; a
        forwarded call, served by the local view, answers for this node's shards only)."""
        relay = relay_name(name)
        mine = {source for broker in self._local_brokers() if broker._state == "serving"
                for source in (*broker.dead_letter_sources(name), *broker.dead_letter_sources(relay))}  # fmt: skip
        if not self.forward or not self._remote_owners():
            return sorted(mine)
        return self._sources_merged(name, mine)

    async def _sources_merged(self, name: str, mine: set[str]) -> list[str]:
        async def ask(owner) -> list[str]:
            try:
                return await self.peers.get(owner).dead_letter_sources(name)
            except ChuteError as exc:  # a node lost meanwhile: its shards answer again once taken over
                log.warning("dead-letter sources: node %s did not answer: %s", owner.name, exc.message)
                return []

        for answer in await asyncio.gather(*(ask(owner) for owner in self._remote_owners())):
            mine.update(answer)
        return sorted(mine)

    # -- subscriptions ----------------------------------------------------------------------------------------

    async def subscribe(self, topic: str, pattern: str, queue: str, *, filter: dict | None = None,
                        start: str | float = "now") -> SubscriptionInfo:  # fmt: skip
        """As `Broker.subscribe`; a queue that does not exist yet is created (default settings) in the topic's
        shard, and an empty queue of another shard is moved there (by the node serving its shard). Another queue
        of another shard is fed through a relay queue in the topic's shard (relay.py), made by the node serving
        that shard."""
        self._check()
        topic_shard = await self._shard_of(topic, TopicNotFound)
        # the row as it is now, not as cached: a queue deleted through another node is made again here, as one
        # broker makes a missing queue it subscribes, not looked for where the stale row says (queue_not_found)
        placed = await self.placement.refresh(queue)
        if placed is None:
            _check_name(queue)
            placed = await self.placement.place(queue, "queue", near=topic_shard)
            if placed.shard == topic_shard:
                await self._on_shard(topic_shard, "create_queue", queue)
        if placed.kind != "queue":
            raise namespace_error(queue, "queue", placed)
        if placed.shard != topic_shard and await self._move_empty_queue(queue, placed.shard, topic_shard):
            return real_subscription(await self._root._on_shard(topic_shard, "subscribe", topic, pattern, queue,
                                                                filter=filter, start=start))  # fmt: skip
        if placed.shard != topic_shard and self.forward and self.node.local_broker(placed.shard) is None:
            # The queue's shard is another node's: that node moves the queue if it can (its local view, above),
            # and subscribes it; else it subscribes it through a relay in the topic's shard (below).
            return real_subscription(await self._on_shard(placed.shard, "subscribe", topic, pattern, queue,
                                                          filter=filter, start=start))  # fmt: skip
        if placed.shard != topic_shard and not self.forward:  # a peer's row may be newer than the one cached here
            placed = await self.placement.refresh(queue) or placed
        broker = self.node.local_broker(topic_shard)
        if placed.shard != topic_shard and broker is not None and broker._state == "serving":
            return await self._subscribe_relayed(broker, topic, pattern, queue, filter, start)
        # the topic's shard is another node's: its local view subscribes (through a relay if the queue is not in
        # its shard); from a peer's call this is the same bounded extra hop as a move's
        return real_subscription(await self._root._on_shard(topic_shard, "subscribe", topic, pattern, queue,
                                                            filter=filter, start=start))  # fmt: skip

    async def _subscribe_relayed(self, broker, topic: str, pattern: str, queue: str, filter: dict | None,
                                 start: str | float) -> SubscriptionInfo:  # fmt: skip
        """Subscribe `topic` (in `broker`, served here) to `queue` of another shard through a relay queue."""
        if not fits(queue):
            raise InvalidArgument(f"queue {queue!r} lives in another shard than topic {topic!r}, and its name is "
                                  "too long for a relay queue (at most 188 characters)")  # fmt: skip
        relay = relay_name(queue)
        self.relays.made(relay)  # (first: its relay must not retire it before the subscription is made)
        if relay not in broker.core.queues:
            await broker.create_queue(relay, RELAY_SETTINGS)
        info = await broker.subscribe(topic, pattern, relay, filter=filter, start=start)
        log.info("topic %r feeds queue %r of another shard through relay queue %s", topic, queue, relay)
        return real_subscription(info)

    async def _move_empty_queue(self, queue: str, old: int, new: int) -> bool:
        """Move `queue` from shard `old` (served here) to shard `new` (its topic's), if it holds no message, feeds
        no dead-letter queue of another shard and nothing in `old` depends on it (a subscription, a queue that
        dead-letters into it): placement row first, the queue created in `new`, then anything published to the
        old one meanwhile (through a node that still had the old row) moved across, and the old queue deleted in
        the same step of the event loop that finds it empty. True if it moved. Only a queue of a shard served
        here moves: that last step must not be interleaved with a publish. The local view moves too (for a peer
        whose router asked this node, the queue's owner): the new copy is made through the router, one hop to the
        topic's shard, whose local view never moves anything further (the queue is in its shard by then)."""
        broker = self.node.local_broker(old)
        if broker is None or queue not in broker.core.queues:
            return False
        settings = broker.core.queues[queue].settings
        stats = broker.queue_stats(queue)
        if stats.ready or stats.in_flight or stats.delayed:
            return False
        if broker.core.queues[queue].feeds:  # a subscription of `old` feeds it (core/topic.py keeps `feeds`)
            return False
        if broker.core.dead_letter_users.get(queue):  # a queue of `old` dead-letters into it
            return False
        dlq = settings.dead_letter_queue
        if dlq is not None and await self.placement.shard_of(dlq, "queue") != new:
            return False
        if not await self.placement.move(queue, "queue", old, new):
            return False
        await self._root._on_shard(new, "create_queue", queue, **msgspec.to_builtins(settings))
        while True:
            source = self.node.local_broker(old)
            if source is None or queue not in source.core.queues:
                return True  # the shard moved away meanwhile: its queue goes with it, unrouted (as a stale row)
            left = source.queue_stats(queue)
            if not (left.ready or left.in_flight or left.delayed):
                await source.delete_queue(queue)  # no await between the look and the delete's core step
                log.info("queue %r moved from shard %d to shard %d (its topic's)", queue, old, new)
                return True
            await self._carry_over(source, queue, new)

    async def _carry_over(self, source, queue: str, new: int) -> None:
        """Move what reached the old copy of a moving queue to the new one (confirmed there before acked here)."""
        deliveries = await source.receive(queue, 1000, wait_s=0.0, lease_s=60.0)
        if not deliveries:
            await asyncio.sleep(0.05)  # in flight or delayed there: their leases or delays end first
            return
        now = time.time()  # (what is left of a TTL goes with the message; its dedup id too, so a publisher's retry
        # of it through the new copy is kept out there as it would have been here)
        messages = [Publish(body=d.message.body, headers=d.message.headers or None, priority=d.message.priority,
                            group=d.message.group, dedup_id=d.message.dedup_id,
                            ttl_s=None if d.message.expires_at is None else max(0.001, d.message.expires_at - now))
                    for d in deliveries]  # fmt: skip
        receipts = [d.receipt for d in deliveries]
        try:
            await self._root._on_shard(new, "publish_batch", queue, messages)
        except QueueFull as exc:
            if not await dead_letters_refused(self._root, queue, new):
                source.release(queue, receipts)  # they wait in the old copy, ready, not leased for a minute
                raise
            # the new copy dead-lettered what it refused (overflow `reject-dead-letter`): carrying it again would
            # make a second dead letter of each
            log.info("queue %r: its new copy refused %d messages carried over and dead-lettered them: %s", queue,
                     len(deliveries), exc.message)  # fmt: skip
        except ChuteError:
            source.release(queue, receipts)
            raise
        await source.ack(queue, receipts)

    async def update_subscription(self, topic: str, pattern: str, queue: str, *,
                                  filter: dict | None = None) -> SubscriptionInfo:  # fmt: skip
        return real_subscription(await self._on_subscription("update_subscription", topic, pattern, queue,
                                                              filter=filter))  # fmt: skip

    async def unsubscribe(self, topic: str, pattern: str, queue: str) -> None:
        """As `Broker.unsubscribe`; a relay queue left feeding nothing is deleted by its relay once it has
        forwarded what it holds."""
        await self._on_subscription("unsubscribe", topic, pattern, queue)

    async def _on_subscription(self, method: str, topic: str, pattern: str, queue: str, **kwargs):
        """A call on subscription (`pattern`, `queue`) of `topic`: by the broker of the topic's shard here, under
        the name its subscription has there (the queue's, or its relay queue's); else by the owner's local view."""
        self._check()
        holder = self._local_holder(topic)
        if holder is None:
            return await self._on_name(topic, method, topic, pattern, queue, missing=TopicNotFound, **kwargs)
        name = subscribed_name(holder, topic, pattern, queue)
        result = await getattr(holder, method)(topic, pattern, name, **kwargs)
        if name != queue and method == "unsubscribe":
            self.relays.unused(name)
        return result

    def ephemeral_subscription(self, topic: str, pattern: str = ">", *, filter: dict | None = None):
        """A private in-memory queue bound to `topic` in its shard, named `~<shard>.<n>` when this node serves
        the shard; else (an awaitable) one on the owner, relayed over the peer connection and named `~r<n>`."""
        self._check()
        holder = self._local_holder(topic)
        if holder is not None:
            return self._ephemeral_name(holder, holder.ephemeral_subscription(topic, pattern, filter=filter))
        return self._remote_ephemeral(topic, pattern, filter)

    async def _remote_ephemeral(self, topic: str, pattern: str, filter: dict | None) -> str:
        """An ephemeral subscription on the owner of the topic's shard, relayed here: named `~r<n>`."""
        shard = await self._shard_of(topic, TopicNotFound)
        target = await self._owner(shard, asyncio.get_running_loop().time() + self.wait_owner_s)
        if hasattr(target, "core"):  # taken over by this node meanwhile
            return self._ephemeral_name(target, target.ephemeral_subscription(topic, pattern, filter=filter))
        relay = await target.subscribe_ephemeral(topic, pattern, filter=filter)
        name = f"{EPHEMERAL}r{next(self._root._relay_numbers)}"
        self._root._relays[name] = relay
        return name

    def _ephemeral_name(self, broker, real: str) -> str:
        for shard in range(self.node.shards):
            if self.node.local_broker(shard) is broker:
                return f"{EPHEMERAL}{shard}.{real[len(EPHEMERAL) :]}"
        raise Unavailable("the topic's shard moved meanwhile")

    def end_ephemeral(self, queue: str) -> None:
        relay = self._root._relays.pop(queue, None)
        if relay is not None:
            task = asyncio.ensure_future(relay.close())
            _BACKGROUND.add(task)
            task.add_done_callback(_BACKGROUND.discard)
            return
        shard, real = _ephemeral_parts(queue)
        broker = self.node.local_broker(shard) if shard is not None else None
        if broker is not None:
            broker.end_ephemeral(real)


_BACKGROUND: set[asyncio.Task] = set()


def _is_relay(name: str) -> bool:
    return relayed_queue(name) is not None


def _real_names(queues: list[str]) -> list[str]:
    """Queue names with each relay queue's replaced by its real queue's."""
    return [relayed_queue(name) or name for name in queues]


def _lifted(deliveries: list[Delivery]) -> list[Delivery]:
    """Deliveries with the dead-letter reason and source of relayed dead letters in their fields (relay.py)."""
    for delivery in deliveries:
        lift_relayed(delivery)
    return deliveries


def _ephemeral_parts(name: str) -> tuple[int | None, str]:
    """`~<shard>.<n>` -> (shard, `~<n>`); (None, name) for anything else."""
    head, dot, tail = name[len(EPHEMERAL) :].partition(".")
    if not dot or not head.isdigit():
        return None, name
    return int(head), EPHEMERAL + tail


def _check_name(name: str) -> None:
    """A name is checked before a placement row is written for it (the shard checks it again); names of relay
    queues are the cluster's."""
    validate_name(name)
    if relayed_queue(name) is not None:
        raise InvalidName(
            f"invalid queue name {name!r}: names starting with 'chute.relay.' are reserved for the "
            "cluster's relay queues"
        )

