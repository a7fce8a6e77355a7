"""`chute.Broker`: the asyncio face of the broker, usable in-process; the network server calls the same API.

The pure `BrokerCore` decides everything; this module adds what needs an event loop:
- durability: a call returns only after the records it wrote are durable (the store's token); a publish is
  placed in its queues by a callback on that token, so even a cancelled publisher's confirmed message is placed,
  and no consumer ever sees a message whose publish was not confirmed;
- time: one timer handle, set for the core's next deadline (lease ends, delays, expiries, retention), or, with
  `auto_tick=False`, nothing at all: tests move their own clock and call `tick()`;
- waiting: long-polling receivers wait on one future per call, woken when their queue gains ready messages;
- housekeeping (`_housekeeping.py`, a mixin): checkpoints (every `checkpoint_bytes` of log or
  `checkpoint_interval_s`) after compaction of sparse files, one at a time, in the background.

Invariant: the event loop never blocks on disk (the store does its I/O in threads; recovery runs in a thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from chute import _forked_snapshot as forked_snapshot
from chute._dispatch import Dispatcher
from chute._housekeeping import Housekeeping, return_freed_memory
from chute._management import ManagementApi
from chute._reads import StateReads
from chute.consumer import Consumer
from chute.core import records as rec
from chute.core.broker import BrokerCore
from chute.core.queue import Entry
from chute.core.recent import RecentMessages
from chute.core.state import DEFAULT_MAX_MESSAGE_BYTES
from chute.errors import BrokerClosed, ChuteError, InvalidArgument, InvalidReceipt
from chute.model import (
    Delivery,
    Message,
    Publish,
)
from chute.storage.api import FsyncPolicy, RecoveryReport, Store
from chute.storage.file import FileStore
from chute.storage.memory import MemoryStore

DEFAULT_DATA_DIR = "./chute-data"
log = logging.getLogger("chute.broker")
REDRIVE_STEP = 5_000  # messages a redrive moves per turn of the event loop (a few ms)


class Broker(ManagementApi, StateReads, Housekeeping):
    """A durable broker in this process. Use `async with Broker(path) as broker:` (or `await start()` /
    `await close()`). Durable by default: `Broker()` keeps its data in ./chute-data; `Broker.in_memory()` keeps
    nothing (for tests)."""

    def __init__(
        self,
        data_dir: str | os.PathLike = DEFAULT_DATA_DIR,
        *,
        store: Store | None = None,
        fsync: FsyncPolicy = "always",
        clock: Callable[[], float] = time.time,
        auto_tick: bool = True,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        checkpoint_bytes: int = 256 * 2**20,
        checkpoint_interval_s: float = 60.0,
    ) -> None:
        if store is None:
            store = FileStore(Path(data_dir), fsync_policy=fsync)
        elif data_dir != DEFAULT_DATA_DIR:
            raise InvalidArgument("give a data_dir or a store, not both")
        self.store = store
        self.clock = clock
        self.auto_tick = auto_tick
        self.core = BrokerCore(store, receipt_base=secrets.randbits(40) << 20, max_message_bytes=max_message_bytes)
        self.core.on_queue_deleted = self._queue_deleted
        self.checkpoint_bytes = checkpoint_bytes
        self.checkpoint_interval_s = checkpoint_interval_s
        self.recovery: RecoveryReport | None = None
        self._waiters: dict[str, list[asyncio.Future]] = {}
        self.dispatcher = Dispatcher(self)  # the push consumers (the server's), served a pass per loop turn
        self._draining = False  # set by end_long_polls: receive() no longer waits
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._housekeeping: asyncio.Task | None = None
        self._checkpointing = asyncio.Lock()
        self.checkpoints = 0  # checkpoints stored since start (for /metrics)
        self._written_at_checkpoint = 0
        self._checkpoint_time = 0.0
        self._state = "new"

    @classmethod
    def in_memory(cls, **options) -> Broker:
        """A broker on a MemoryStore: same behaviour, no durability, no files. For tests and throwaway use."""
        return cls(store=MemoryStore(), **options)

    # -- lifecycle --------------------------------------------------------------------------------------------

    async def start(self) -> Broker:
        """Recover the store and start serving. Raises StorageCorrupt if stored data is damaged."""
        if self._state != "new":
            raise InvalidArgument(f"broker is {self._state}; start() is called once")
        self._state = "recovering"
        self._loop = asyncio.get_running_loop()
        recovered = await self.store.open()
        self.recovery = recovered.report
        await asyncio.to_thread(self.core.restore, recovered.snapshot, recovered.records, self.clock())
        return_freed_memory()  # recovery's transient buffers (snapshot, columns) would otherwise stay in RSS
        self._freeze_recovered_state()
        self._written_at_checkpoint = self.store.bytes_appended
        self._checkpoint_time = time.monotonic()
        self._state = "serving"
        self._after()
        report = recovered.report
        if report.records and not report.clean_shutdown and not self.store.read_only and (
            self._housekeeping is None or self._housekeeping.done()
        ):
            # a crash left a log tail that recovery replayed: checkpoint now, in the background, so that crashes
            # coming sooner than checkpoint_interval_s apart (a shard taken over again and again) never let the
            # tail, and the time of the next recovery, grow with what passed through
            self._start_checkpoint()
        return self

    def end_long_polls(self) -> None:
        """A graceful stop begins: waiting receivers return now (with what is ready, else []) and later
        receives do not wait, so in-flight requests finish before the broker closes."""
        self._draining = True
        for waiters in self._waiters.values():
            for future in waiters:
                if not future.done():
                    future.set_result(None)

    async def close(self) -> None:
        """Stop: wake waiting receivers with BrokerClosed, checkpoint, flush and close the store. Idempotent."""
        if self._state in ("closed", "new"):
            self._state = "closed"
            return
        self._state = "closing"
        if self._timer is not None:
            self._timer.cancel()
        if self._idle_check is not None:
            self._idle_check.cancel()
        for waiters in self._waiters.values():
            for future in waiters:
                if not future.done():
                    future.set_exception(BrokerClosed("broker closed"))
        self._waiters.clear()
        self.dispatcher.wake_all()  # push consumers find the broker closing and end
        forked_snapshot.cut_short(self.store)  # a checkpoint's child would only delay the closing one
        if self._housekeeping is not None:
            with contextlib.suppress(Exception):
                await self._housekeeping
        if not self.store.read_only:
            with contextlib.suppress(ChuteError):
                await self.closing_checkpoint()  # (a large state's snapshot is forked: no hold of the loop)
        self._thaw()
        await self.store.close()
        self._state = "closed"

    async def __aenter__(self) -> Broker:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def healthy(self) -> bool:
        """True while serving with a writable store."""
        return self._state == "serving" and not self.store.read_only

    def _check(self) -> None:
        if self._state != "serving":
            raise BrokerClosed(f"broker is {self._state}")

    # -- publish ----------------------------------------------------------------------------------------------

    async def publish(self, dest: str, body: bytes, **options) -> int:
        """Publish one message to a queue or topic; return its id once durable. Options as in `Publish`."""
        return (await self.publish_batch(dest, [Publish(body=body, **options)]))[0]

    async def publish_batch(self, dest: str, messages: Sequence[Publish]) -> list[int]:
        """Publish messages in order; return their ids once all are durable (a repeated dedup id returns the
        original's id). Raises before storing anything on bad input; StorageFailed/StorageFull if the store
        could not make them durable (none of them is then delivered)."""
        ids, future = self._publish(dest, messages)
        if future is not None:
            await asyncio.shield(future)
        return ids

    def _publish(self, dest: str, messages: Sequence[Publish],
                 then: Callable[[list[int], BaseException | None], None] | None = None,
                 ) -> tuple[list[int], asyncio.Future | None]:  # fmt: skip
        """The step of `publish_batch` that does not wait: (the ids, the future that is done once they are durable
        and placed, or None if nothing had to be written). A callback added to the future runs after the
        messages were placed (or forgotten, if the store failed: the future then holds the store's error).
        `then(ids, error)`, if given, is called once the messages are placed (error None) or forgotten (the
        store's error), by the broker's own callback on that future (no callback of the caller's own is
        scheduled); not called if the returned future is None (nothing to wait for)."""
        self._check()
        plan = self._run(self.core.prepare_publish, dest, messages, self.clock())
        self._pending_token = None  # the plan holds it
        token = plan.token
        if token is None:
            self._settle(plan, None)
            return plan.ids, None
        settling = self._settling
        if settling is not None and settling[0] is token and not token.done():
            # the same group commit, and no other callback was added to it since: one callback settles them all,
            # in the order they were prepared (so messages are placed in publish order)
            settling[1].append((plan, then))
            return plan.ids, token
        if isinstance(token, asyncio.Future):
            future = token
            batch = [(plan, then)]
            self._settling = (token, batch)
        else:  # a store whose token is a plain awaitable
            future = asyncio.ensure_future(token)
            batch = [(plan, then)]
        future.add_done_callback(functools.partial(self._settle_batch, batch))
        return plan.ids, future

    _settling: tuple[asyncio.Future, list] | None = None  # the store future `_publish` last waited on, its plans

    def _settle_batch(self, batch: list, done: asyncio.Future) -> None:
        """The store future of `_publish`es resolved: place (or forget) their plans in order, with one `_after`,
        tell each caller (`then`), and serve the push consumers at once (a pass of the dispatcher here instead of
        one more turn of the loop: this is a callback of its own, no core operation is running)."""
        if self._settling is not None and self._settling[1] is batch:
            self._settling = None
        core, now = self.core, self.clock()
        error = BrokerClosed("the server is shutting down") if done.cancelled() else done.exception()
        if error is None:
            for plan, _ in batch:
                core.commit_publish(plan, now)
        else:
            for plan, _ in batch:
                core.abort_publish(plan)
        serving = self._state == "serving"
        if serving:
            self._after(housekeep=False)  # nothing was appended: `_publish`'s own `_after` looked at checkpoints
        for plan, then in batch:
            if then is not None:
                try:
                    then(plan.ids, error)
                except Exception:  # one caller's bug must not keep the others unanswered
                    log.exception("a publish callback failed")
        if serving:
            self.dispatcher.pass_now()

    async def publish_many(self, groups: Sequence[tuple[str, Sequence[Publish]]]) -> list[list[int] | ChuteError]:
        """Publish to several destinations at once: for each (dest, messages) group, in order, its ids once
        durable, or the error that refused it (a refused group stores nothing; the others go on). Every group's
        records go to the store in the same turn of the event loop, so they share one group commit (and one
        frame of the file store). A store failure fails every group it covers."""
        self._check()
        now = self.clock()
        waits: dict[int, asyncio.Future] = {}
        self._pending_token = None
        try:  # as `_run`, with one `_after` for every group
            outcomes = self.core.prepare_publish_many(groups, now)
            settling: dict[int, list] = {}  # the plans each future settles, in order (one callback, one `_after`)
            for outcome in outcomes:
                if isinstance(outcome, ChuteError):
                    continue
                plan = outcome[0]
                if plan.token is None:
                    if plan in self.core.pending_plans:
                        self.core.commit_publish(plan, now)
                    continue
                future = waits.get(id(plan.token))
                if future is None:
                    self._settling = None  # a later `_publish` on this future settles after these plans, in order
                    future = waits[id(plan.token)] = asyncio.ensure_future(plan.token)
                    settling[id(plan.token)] = plans = []
                    future.add_done_callback(functools.partial(self._settle_all, plans))
                plans = settling[id(plan.token)]
                if not plans or plans[-1] is not plan:  # a plan shared by several groups is settled once
                    plans.append(plan)
        finally:
            self._after()
            self._pending_token = None  # the plans hold it
        if waits:
            await asyncio.shield(asyncio.gather(*waits.values(), return_exceptions=True))
        out: list[list[int] | ChuteError] = []
        for outcome in outcomes:
            if isinstance(outcome, ChuteError):
                out.append(outcome)
                continue
            plan, ids = outcome
            future = waits.get(id(plan.token)) if plan.token is not None else None
            error = None if future is None else future.exception()
            if error is not None and not isinstance(error, ChuteError):
                raise error
            out.append(error if error is not None else ids)
        return out

    def _settle(self, plan, done: asyncio.Future | None) -> None:
        """Place a publish whose records are durable, or forget it if the store failed (the publisher gets
        the store's error from the awaited future)."""
        if done is None or (not done.cancelled() and done.exception() is None):
            self.core.commit_publish(plan, self.clock())
        else:
            self.core.abort_publish(plan)
        if self._state == "serving":
            self._after()

    def _settle_all(self, plans: list, done: asyncio.Future) -> None:
        """`_settle` for the plans of one store future, in order, with one `_after` for them all."""
        core, now = self.core, self.clock()
        if not done.cancelled() and done.exception() is None:
            for plan in plans:
                core.commit_publish(plan, now)
        else:
            for plan in plans:
                core.abort_publish(plan)
        if self._state == "serving":
            self._after()

    # -- consume ----------------------------------------------------------------------------------------------

    async def receive(
        self,
        queue: str,
        max_messages: int = 1,
        *,
        wait_s: float = 0.0,
        lease_s: float | None = None,
        max_bytes: int | None = None,
    ) -> list[Delivery]:
        """Lease up to `max_messages` messages, waiting up to `wait_s` for the first (long poll). Returns [] if
        none came. Each delivery must be acked (or nacked) before its lease ends, or it is delivered again.
        `max_bytes` bounds the sum of the bodies (a batch of one may exceed it): a batch that must fit a frame."""
        self._check()
        if isinstance(wait_s, bool) or not isinstance(wait_s, int | float) or not 0 <= wait_s <= 3600:
            raise InvalidArgument(f"wait_s must be from 0 to 3600 seconds, got {wait_s!r}")
        loop = asyncio.get_running_loop()
        give_up = loop.time() + wait_s
        while True:
            entries = self._lease(queue, max_messages, lease_s, max_bytes)
            if entries:
                deliveries = self._cached_deliveries(queue, entries)
                return deliveries if deliveries is not None else await self._read_deliveries(queue, entries)
            remaining = give_up - loop.time()
            if remaining <= 0 or self._draining:
                return []
            await self._wait_ready(queue, remaining)

    def _lease(self, queue: str, max_messages: int, lease_s: float | None, max_bytes: int | None) -> list[Entry]:
        """The step of `receive` that does not wait: lease what is ready now (validated by the core)."""
        if self._state != "serving":
            raise BrokerClosed(f"broker is {self._state}")
        self._pending_token = None
        try:
            return self.core.receive(queue, max_messages, self.clock(), lease_s, max_bytes)
        finally:
            self._after(housekeep=False)  # a checkpoint falls due by the next other operation or the idle check

    async def _wait_ready(self, queue: str, timeout: float) -> None:
        """Until `queue` changes, its rate limit lets a message go, or `timeout` passes. BrokerClosed if closing."""
        self._check()
        rate_at = self.core.rate_ready_at(queue, self.clock())
        if rate_at is not None:
            timeout = min(timeout, max(0.001, rate_at - self.clock()))
        await self._wait(queue, timeout)

    async def _wait(self, queue: str, timeout: float) -> None:
        """Until `queue` changes or `timeout` passes (a plain timer on the future: a thousand consumers wait
        here, and asyncio.timeout costs several times more per wait)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()  # (a getpid() system call: once, not per wait)
        future = loop.create_future()
        waiters = self._waiters.get(queue)
        if waiters is None:
            waiters = self._waiters[queue] = []
        waiters.append(future)
        timer = loop.call_later(timeout, _wake, future)
        try:
            await future
        finally:
            timer.cancel()
            if future in waiters:
                waiters.remove(future)

    _loop: asyncio.AbstractEventLoop | None = None  # the loop the broker serves (cached by `_wait`)

    def _cached_deliveries(self, queue_name: str, entries: list[Entry]) -> list[Delivery] | None:
        """The deliveries of leased `entries` if every message is in `core.recent` or its body in the store's
        cache (no coroutine, no wait); None (and nothing changed) if one must be read from disk: then
        `_read_deliveries`. What it decodes goes to `core.recent`: the same message for another queue (fan-out),
        or again after a redelivery, is not decoded twice."""
        core = self.core
        queue = core.queues.get(queue_name)
        if queue is not None and queue.ephemeral:
            store = core.ephemeral_store  # (another numbering of refs: nothing of it is in `recent`)
            payloads = []
            for entry in entries:
                payload = store.read_cached(entry.ref)
                if payload is None:
                    return None
                payloads.append(payload)
            for entry in entries:
                store.release(entry.ref)  # delivered at most once: the body is no longer needed
            return [
                _delivery(queue_name, payload, e.receipt, e.deliveries, e.deadline, e.dead, core)
                for payload, e in zip(payloads, entries, strict=True)
            ]
        recent = core.recent
        recent.used = True
        read_cached, kept, older = core.store.read_cached, recent.new.get, recent.old.get
        deliveries = []
        append = deliveries.append
        for e in entries:
            ref = e.ref
            message = kept(ref) or older(ref)
            if message is None:
                payload = read_cached(ref)
                if payload is None:
                    return None  # (what was decoded stays in `recent`: nothing else changed)
                message = _message(queue_name, payload, core, recent, ref)
            if e.dead is None:
                append(Delivery(queue=queue_name, receipt=e.receipt, delivery_count=e.deliveries,
                                message=message, lease_deadline=e.deadline))  # fmt: skip
            else:
                append(_dead_delivery(queue_name, message, e.receipt, e.deliveries, e.deadline, e.dead, core))
        return deliveries

    async def _read_deliveries(self, queue: str, entries: list[Entry]) -> list[Delivery]:
        """The deliveries of leased `entries`, reading bodies from disk; if that fails (or is cancelled), the
        entries are released: not handed out, not leased."""
        try:
            return await self._deliveries(queue, entries)
        except BaseException:
            self.release(queue, [e.receipt for e in entries if e.receipt])
            raise

    async def _deliveries(self, queue_name: str, entries: list[Entry]) -> list[Delivery]:
        queue = self.core.queues.get(queue_name)
        store = self.core.store_of(queue) if queue is not None else self.store
        leases = [(e.receipt, e.deliveries, e.deadline, e.dead) for e in entries]
        payloads = [store.read_cached(e.ref) for e in entries]
        missing = [i for i, p in enumerate(payloads) if p is None]
        if missing:
            for i, payload in zip(missing, await store.read([entries[i].ref for i in missing]), strict=True):
                payloads[i] = payload
        if queue is not None and queue.ephemeral:
            for entry in entries:
                store.release(entry.ref)  # delivered at most once: the body is no longer needed
        return [
            _delivery(queue_name, payload, receipt, count, deadline, dead, self.core)
            for payload, (receipt, count, deadline, dead) in zip(payloads, leases, strict=True)
        ]

    def consume(self, queue: str, *, prefetch: int = 100, lease_s: float | None = None) -> Consumer:
        """A push-style consumer: `async for delivery in broker.consume("q")`, at most `prefetch` unacked."""
        self._check()
        self.core.queue(queue)
        return Consumer(self, queue, prefetch=prefetch, lease_s=lease_s)

    async def ack(self, queue: str, receipts: int | Sequence[int], *, lapsed: bool = False,
                  dead_lettered: bool = False) -> None:  # fmt: skip
        """Ack deliveries: they are removed for good once this returns. Receipts not (or no longer) leased
        raise InvalidReceipt after the others were acked (`error.receipts` lists them). With `lapsed=True`, a
        receipt whose lease has ended still removes its message if nobody has received it since (SQS's
        DeleteMessage with the latest receipt handle). With `dead_lettered=True`, the caller dead-lettered the
        messages itself: the queue counts them as nacked and dead-lettered, not acked."""
        token, unknown = self._ack(queue, receipts, lapsed=lapsed, dead_lettered=dead_lettered)
        await self._wait_for(token)
        _raise_unknown(unknown, "acked")

    def _ack(self, queue: str, receipts: int | Sequence[int], *, lapsed: bool = False,
             dead_lettered: bool = False) -> tuple[object, list[int]]:  # fmt: skip
        """The step of `ack` that does not wait: (the durability token of its records or None, unknown receipts).
        The caller waits for the token before telling anyone the acks are done."""
        self._check()
        receipts = [receipts] if isinstance(receipts, int) else receipts
        unknown = self._run(self.core.ack, queue, receipts, lapsed=lapsed is True, dead_lettered=dead_lettered is True)
        token, self._pending_token = self._pending_token, None
        return token, unknown

    def ack_lazy(self, queue: str, receipts: Sequence[int]) -> list[int]:
        """Ack deliveries without forcing a group commit, for a client that is never told when its ack is durable
        (an AMQP basic.ack): applied at once (the messages are gone from the queue), the records ride with the
        next group commit or the store's lazy delay (FileStore: LAZY_FLUSH_S). A crash before then may deliver
        the messages again (at-least-once). Returns the receipts not (or no longer) leased; the others are acked."""
        self._check()
        core = self.core
        self._pending_token = None
        try:
            return core.ack(queue, receipts)
        finally:
            if core.outbox and not core.store.read_only:
                outbox, core.outbox = core.outbox, []
                core.store.append_lazy(outbox)
            self._after()

    async def nack(
        self, queue: str, receipts: int | Sequence[int], *, delay_s: float = 0.0, dead_letter: bool = False
    ) -> None:
        """Give deliveries back: ready again now, after `delay_s`, or dead-lettered (reason `rejected`)."""
        self._check()
        receipts = [receipts] if isinstance(receipts, int) else receipts
        unknown = self._run(self.core.nack, queue, receipts, self.clock(), delay_s=delay_s, dead_letter=dead_letter)
        await self._durable()
        _raise_unknown(unknown, "nacked")

    async def extend(self, queue: str, receipts: int | Sequence[int], lease_s: float) -> None:
        """Make leases end `lease_s` seconds from now."""
        self._check()
        receipts = [receipts] if isinstance(receipts, int) else receipts
        _raise_unknown(self._run(self.core.extend, queue, receipts, lease_s, self.clock()), "extended")

    def release(self, queue: str, receipts: Sequence[int]) -> None:
        """A consumer is gone: its leased messages are available again at once."""
        if self._state == "serving":
            self._run(self.core.release_receipts, queue, receipts, self.clock())

    async def peek(self, queue: str, max_messages: int = 10) -> list[Delivery]:
        """Browse messages in delivery order without leasing them (receipt 0)."""
        self._check()
        entries = self.core.peek(queue, max_messages)
        items = [(e.ref, e.deliveries, e.dead) for e in entries]
        store = self.core.store_of(self.core.queue(queue))
        payloads = await store.read([ref for ref, _, _ in items]) if items else []
        return [
            _delivery(queue, payload, 0, count, 0.0, dead, self.core)
            for payload, (_, count, dead) in zip(payloads, items, strict=True)
        ]

    async def redrive(self, queue: str, max_messages: int | None = None) -> int:
        """Move dead-lettered messages of `queue` back to the queues they came from; return how many. Goes in steps
        of `REDRIVE_STEP` messages (a MOVE record each), one turn of the event loop each, so a large redrive never
        stalls other work; a crash in the middle leaves the rest where it was."""
        self._check()
        moved, token = 0, None
        while True:
            step = REDRIVE_STEP if max_messages is None else min(REDRIVE_STEP, max_messages - moved)
            count = self._run(self.core.redrive, queue, step, self.clock())
            token = self._pending_token or token
            moved += count
            if count < step or step == 0:
                break
            await asyncio.sleep(0)
            self._check()
        self._pending_token = token  # the store confirms in order: the last step's token covers the others
        await self._durable()
        return moved

    # -- the engine room --------------------------------------------------------------------------------------

    def _run(self, operation, *args, **kwargs):
        """Run a core operation, then flush its records, wake receivers and reset the timer — even if it raised
        (a failed publish may have dead-lettered overflow first)."""
        self._pending_token = None
        try:
            return operation(*args, **kwargs)
        finally:
            self._after()

    def _after(self, housekeep: bool = True):
        """Flush the records of the operation just run, wake receivers of the queues it changed, move the timer
        earlier if the core's next deadline did, and (unless `housekeep` is False: a lease, which writes only a
        lazy delivery count) start a checkpoint if one is due."""
        core = self.core
        if core.outbox:
            self._pending_token = core.flush()
        if core.refused_plans:  # the dead letters of a refused publish: placed once durable, nobody waits
            refused, core.refused_plans = core.refused_plans, []
            for plan in refused:  # (each wrote records: its token is never None)
                asyncio.ensure_future(plan.token).add_done_callback(functools.partial(self._settle, plan))
        if core.changed:
            pushed = self.dispatcher.watched
            for queue in core.changed:
                waiters = self._waiters.get(queue.name)
                if waiters:
                    for future in waiters:
                        if not future.done():
                            future.set_result(None)
                    waiters.clear()
                if queue.name in pushed:
                    self.dispatcher.queue_changed(queue.name)
            core.changed.clear()
        if self.auto_tick and self._state == "serving":
            self._schedule()
            if housekeep:
                self._maybe_housekeep()

    _pending_token = None

    async def _durable(self) -> None:
        """Wait until the records of the operation just run are durable."""
        token, self._pending_token = self._pending_token, None
        await self._wait_for(token)

    @staticmethod
    async def _wait_for(token) -> None:
        """Wait for one durability token (None: nothing was written)."""
        if isinstance(token, asyncio.Future):
            await asyncio.shield(token)  # a cancelled caller must not cancel the store's group future
        elif token is not None:
            await token

    def _schedule(self) -> None:
        deadline = self.core.next_deadline()
        if deadline is None or (self._timer_at is not None and self._timer_at <= deadline):
            return
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer_at = deadline
        self._timer = loop.call_later(max(0.0, deadline - self.clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        self.tick()

    def tick(self) -> None:
        """Fire due timers (lease ends, delays, expiries) at the clock's `now`. Called by the timer, or by tests
        that run with `auto_tick=False` and move their own clock."""
        if self._state == "serving":
            self._run(self.core.tick, self.clock())

    def _queue_deleted(self, queue) -> None:
        self._queue_deleted_or_closed(queue.name)

    def _queue_deleted_or_closed(self, name: str) -> None:
        """Wake everyone waiting on queue `name` so they notice it is gone (or their consumer closed)."""
        for future in self._waiters.pop(name, []):
            if not future.done():
                future.set_result(None)
        self.dispatcher.queue_changed(name, gone=True)

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        """The loop the broker serves (cached: asking asyncio for it costs a getpid() system call)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _delivery(queue: str, payload: bytes, receipt, count, deadline, dead, core) -> Delivery:
    # the hot path of every delivery: keyword arguments left at their defaults are not passed (each costs time)
    message = _message(queue, payload, core)
    if dead is None:
        return Delivery(queue=queue, receipt=receipt, delivery_count=count, message=message, lease_deadline=deadline)
    return _dead_delivery(queue, message, receipt, count, deadline, dead, core)


def _message(queue: str, payload: bytes, core, recent: RecentMessages | None = None, ref: int = 0) -> Message:
    """The `Message` of a stored MESSAGE record as queue `queue` delivers it; kept in `recent` under `ref` unless
    its times differ between queues (a topic message with the TTL of each queue)."""
    record = rec.decode_message(payload)
    expires_ms = record.expires_ms
    if record.queue_times and queue in core.queues:  # a topic message whose TTL here is the queue's default
        expires_ms = record.times_in(core.queues[queue].id)[1]
    if record.priority or expires_ms or record.subject is not None or record.group is not None \
            or record.dedup_id is not None:  # fmt: skip
        message = Message(
            id=record.id, body=record.body, headers=record.headers or {}, publish_time=record.publish_ms / 1000.0,
            priority=record.priority, subject=record.subject, group=record.group, dedup_id=record.dedup_id,
            expires_at=expires_ms / 1000.0 if expires_ms else None,
        )  # fmt: skip
    else:
        message = Message(id=record.id, body=record.body, headers=record.headers or {},
                          publish_time=record.publish_ms / 1000.0)  # fmt: skip
    if recent is not None and not record.queue_times:
        recent.put(ref, message)
    return message


def _dead_delivery(queue: str, message: Message, receipt, count, deadline, dead, core) -> Delivery:
    source_queue = core.queues_by_id.get(dead[1])
    return Delivery(queue=queue, receipt=receipt, delivery_count=count, message=message, lease_deadline=deadline,
                    dead_letter_reason=rec.REASON_NAMES.get(dead[0]),
                    dead_letter_source=source_queue.name if source_queue is not None else None)  # fmt: skip


def _raise_unknown(unknown: list[int], verb: str) -> None:
    if unknown:
        raise unknown_receipts(unknown, verb)


def unknown_receipts(unknown: list[int], verb: str) -> InvalidReceipt:
    """The error of a settlement that named receipts not (or no longer) leased."""
    error = InvalidReceipt(
        f"{len(unknown)} receipt(s) not leased (never issued, already acked, or lease ended); the others were {verb}"
    )
    error.receipts = unknown
    return error
