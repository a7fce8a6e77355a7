"""Model-based test: random publish / receive / ack / nack / time / restart / power-cut sequences against a
reference model, checking the guarantees of DESIGN.md §1 after every step.

The broker runs on a hand-driven clock over the memory store, over the file store on the in-memory fs shim,
where `power_cut` drops everything not fsynced, and over the PostgreSQL store (a real server), where `power_cut`
drops the store's connections without a goodbye, as when the process dies (the server rolls back what was in
flight), and the next broker takes the stream over (a new epoch). Invariants checked after every step:
- every confirmed, unacked message is in the queue (ready, delayed or in flight) — after restarts and power cuts;
- no acked message ever comes back; no message is in flight twice;
- the queue's counts equal the model's;
- messages of equal priority that were never delivered before come out in publish order;
- a dedup id repeated within the window returns the original id and stores nothing.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from chute import Broker, Publish
from chute.errors import InvalidReceipt
from chute.storage import FileStore, MemoryFs, MemoryStore
from tests.conftest import Clock
from tests.postgres import server as postgres_server
from tests.processes import abandon_broker, end_background

LEASE_S = 10.0
DEDUP_WINDOW_S = 300.0


class QueueMachine(RuleBasedStateMachine):
    """One queue, one store kind (set by the subclass)."""

    store_kind = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = Clock()
        self.fs = MemoryFs()
        self.memory_store = MemoryStore()
        self.stream = postgres_server.unique_name("model")  # the PostgreSQL store's stream (one per machine)
        self.live: dict[int, bytes] = {}  # confirmed, not acked: must be in the queue
        self.acked: set[int] = set()
        self.held: dict[int, tuple[int, float]] = {}  # receipt -> (id, lease deadline)
        self.delivered_ever: set[int] = set()
        self.delayed_ids: set[int] = set()
        self.last_fresh = 0
        self.dedup: dict[str, tuple[int, float]] = {}
        self.counter = 0
        self.broker = self._run(self._start())
        self._run(self.broker.create_queue("q", lease_s=LEASE_S, dedup_window_s=DEDUP_WINDOW_S))

    def _run(self, coro):
        return self.loop.run_until_complete(coro)

    def _store(self):
        if self.store_kind == "memory":
            return self.memory_store
        if self.store_kind == "postgres":
            from chute.storage.postgres import PostgresStore

            return PostgresStore(postgres_server.shared_url(), stream=self.stream, chunk_max_bytes=4096)
        return FileStore("/model/data", fs=self.fs, segment_max_bytes=4096)

    async def _start(self) -> Broker:
        return await Broker(store=self._store(), clock=self.clock, auto_tick=False, checkpoint_bytes=8192).start()

    def teardown(self) -> None:
        self._run(self.broker.close())
        self.loop.close()

    # -- rules ------------------------------------------------------------------------------------------------

    @rule(
        count=st.integers(1, 5),
        priority=st.sampled_from([0, 0, 0, 5]),
        delay=st.sampled_from([None, None, None, 5.0]),
        dedup=st.sampled_from([None, None, "a", "b"]),
    )
    def publish(self, count, priority, delay, dedup):
        messages = []
        for _ in range(count):
            self.counter += 1
            messages.append(Publish(body=b"m%d" % self.counter, priority=priority, delay_s=delay, dedup_id=dedup))
        ids = self._run(self.broker.publish_batch("q", messages))
        now = self.clock()
        for message, message_id in zip(messages, ids, strict=True):
            if dedup is not None:
                seen = self.dedup.get(dedup)
                if seen is not None and now < seen[1]:
                    assert message_id == seen[0], "a repeated dedup id must return the original id"
                    continue
                self.dedup[dedup] = (message_id, now + DEDUP_WINDOW_S)
            assert message_id not in self.live and message_id not in self.acked
            self.live[message_id] = message.body
            if delay or priority:
                self.delayed_ids.add(message_id)  # outside the simple publish-order check

    @rule(count=st.integers(1, 6))
    def receive(self, count):
        deliveries = self._run(self.broker.receive("q", count))
        held_ids = {message_id for message_id, _ in self.held.values()}
        for delivery in deliveries:
            assert delivery.id in self.live, "an acked or unknown message was delivered"
            assert delivery.body == self.live[delivery.id]
            assert delivery.id not in held_ids, "a message is in flight twice"
            held_ids.add(delivery.id)
            if delivery.id not in self.delivered_ever and delivery.id not in self.delayed_ids:
                assert delivery.id > self.last_fresh, "equal-priority messages out of publish order"
                self.last_fresh = delivery.id
            self.delivered_ever.add(delivery.id)
            self.held[delivery.receipt] = (delivery.id, self.clock() + LEASE_S)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def ack(self, data):
        receipts = data.draw(st.lists(st.sampled_from(sorted(self.held)), min_size=1, max_size=4, unique=True))
        self._run(self.broker.ack("q", receipts))
        for receipt in receipts:
            message_id, _ = self.held.pop(receipt)
            del self.live[message_id]
            self.acked.add(message_id)

    @rule(receipt=st.integers(1, 1000))
    def ack_unknown(self, receipt):
        with pytest.raises(InvalidReceipt):
            self._run(self.broker.ack("q", [receipt]))

    @precondition(lambda self: self.held)
    @rule(data=st.data(), delay=st.sampled_from([0.0, 0.0, 3.0]))
    def nack(self, data, delay):
        receipt = data.draw(st.sampled_from(sorted(self.held)))
        self._run(self.broker.nack("q", receipt, delay_s=delay))
        del self.held[receipt]

    @rule(seconds=st.sampled_from([1.0, 4.0, 11.0, 400.0]))
    def advance(self, seconds):
        self.clock.advance(seconds)
        self.broker.tick()
        now = self.clock()
        self.held = {r: (m, deadline) for r, (m, deadline) in self.held.items() if deadline > now}

    @rule()
    def restart(self):
        self._run(self.broker.close())
        self.broker = self._run(self._start())
        self.held.clear()  # leases do not survive a restart

    @precondition(lambda self: self.store_kind != "memory")
    @rule()
    def power_cut(self):
        if self.store_kind == "postgres":
            self.broker.store.sever()  # the old process is gone: its connections drop, the server rolls back
            self._run(end_background(self.broker))
        else:
            self.fs.crash()
            self._run(abandon_broker(self.broker))  # the old process is gone
        self.broker = self._run(self._start())
        self.held.clear()

    # -- invariants -------------------------------------------------------------------------------------------

    @invariant()
    def queue_holds_exactly_the_live_messages(self):
        stats = self.broker.queue_stats("q")
        assert stats.in_flight == len(self.held)
        assert stats.ready + stats.delayed + stats.in_flight == len(self.live)
        stored = self._run(self.broker.peek("q", 100_000))
        ids = [d.id for d in stored]
        assert len(ids) == len(set(ids))
        assert set(ids) == set(self.live), "confirmed messages missing or acked ones back"


class TestMemoryStoreModel(QueueMachine.TestCase):
    pass


class FileQueueMachine(QueueMachine):
    store_kind = "file"


class TestFileStoreModel(FileQueueMachine.TestCase):
    pass


class PostgresQueueMachine(QueueMachine):
    store_kind = "postgres"


@postgres_server.required
class TestPostgresStoreModel(PostgresQueueMachine.TestCase):
    settings = postgres_server.model_settings()
