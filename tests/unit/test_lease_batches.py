"""Lease batches (`BrokerCore.begin_leases` / `end_leases`, used by the dispatcher's pass): receives from many
queues share one timer per deadline, and every lease in it still ends on time, each in its own queue, unless it
was acked, extended or its queue deleted; stale batch timers are compacted away like single ones."""

from __future__ import annotations

from chute import Publish
from chute.core.broker import BrokerCore
from chute.core.timers import SLACK
from chute.model import QueueSettings
from chute.storage.memory import MemoryStore

NOW = 1_800_000_000.0


def _core(queues: int) -> BrokerCore:
    core = BrokerCore(MemoryStore())
    for i in range(queues):
        core.create_queue(f"q{i}", QueueSettings(lease_s=10))
        plan = core.prepare_publish(f"q{i}", [Publish(body=b"a"), Publish(body=b"b")], NOW)
        core.commit_publish(plan, NOW)
    core.flush()
    return core


def test_leases_of_a_batch_share_a_timer_and_each_ends_in_its_own_queue():
    core = _core(3)
    timers_before = len(core.timers)
    core.begin_leases()
    leased = {f"q{i}": core.receive(f"q{i}", 1, NOW) for i in range(3)}
    core.end_leases()
    assert len(core.timers) == timers_before + 1  # one timer for three receives at one `now`
    core.ack("q0", [leased["q0"][0].receipt])  # acked: stays gone
    core.extend("q1", [leased["q1"][0].receipt], 30, NOW + 5)  # extended: not ended by the batch timer
    core.delete_queue("q2")  # deleted: nothing to do
    core.tick(NOW + 10)
    assert [core.queues[f"q{i}"].ready for i in range(2)] == [1, 1]
    assert core.queues["q1"].in_flight  # still leased until NOW + 35
    core.tick(NOW + 35)
    again = core.receive("q1", 2, NOW + 35)
    assert [(e.id, e.deliveries) for e in again] == [(leased["q1"][0].id, 2), (again[1].id, 1)]


def test_a_lapsed_batch_returns_its_messages_in_order():
    core = _core(2)
    core.begin_leases()
    first = [core.receive(f"q{i}", 2, NOW) for i in range(2)]
    core.end_leases()
    core.tick(NOW + 10)
    for i in range(2):
        back = core.receive(f"q{i}", 2, NOW + 11)
        assert [e.id for e in back] == [e.id for e in first[i]] and all(e.deliveries == 2 for e in back)


def test_acked_batch_timers_are_compacted_away():
    core = _core(4)
    for round_ in range(3 * SLACK):  # each round leaves one stale batch timer behind
        now = NOW + round_ * 0.001
        core.begin_leases()
        leased = [(f"q{i}", core.receive(f"q{i}", 2, now)) for i in range(4)]
        core.end_leases()
        for name, entries in leased:
            core.nack(name, [e.receipt for e in entries], now)  # back at once: the timer is stale
    assert len(core.timers) < 2 * SLACK  # compaction dropped the stale ones instead of keeping them all
