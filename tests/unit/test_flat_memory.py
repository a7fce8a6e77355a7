"""Flat memory: the core's per-message structures follow what is stored, never what passed through.

A broker that runs for months sees billions of messages; anything it keeps per message after the message is gone
(a stale timer, a lazily removed entry, an expired dedup id) is a leak however small. These tests push many
messages through every feature with a hand-driven clock and check that `index_sizes()` comes back to its
baseline, and that it does not grow with the number of messages while traffic goes on.
"""

from __future__ import annotations

import gc
import random
import weakref

import msgspec
import pytest

from chute import Publish
from chute.core.dedup import DedupWindow
from chute.core.state import timer_size, timer_weight
from chute.core.timers import DEDUP, DELAY, EXPIRE, LEASE, MIN_ITEMS, RETAIN, SAMPLE_BUDGET, SLACK, Timer, Timers

pytestmark = pytest.mark.timeout(60)

DAY = 86_400.0


async def _setup(broker) -> None:
    await broker.create_queue("dlq")
    # SQS's default: every message carries a 4-day expiry, which must not keep a timer alive after its ack
    await broker.create_queue("q", retention_s=4 * DAY, max_deliveries=3, dead_letter_queue="dlq",
                              dedup_window_s=5)  # fmt: skip
    await broker.create_queue("fifo", fifo=True, retention_s=DAY)
    await broker.create_queue("ttl", retention_s=5, on_expiry="drop")  # expires with nobody consuming
    await broker.create_topic("t")
    for name in ("s1", "s2", "s3"):
        await broker.create_queue(name, retention_s=DAY)
        await broker.subscribe("t", ">", name)


async def _traffic(broker, clock, rounds: int, rng: random.Random) -> None:
    """Rounds of mixed traffic; every message ends acked, expired or dead-lettered and drained."""
    for r in range(rounds):
        await broker.publish_batch("q", [Publish(body=b"m", dedup_id=f"d{r}-{i % 40}") for i in range(50)])
        await broker.publish_batch("q", [Publish(body=b"late", delay_s=0.5, ttl_s=3 * DAY) for _ in range(5)])
        await broker.publish_batch("fifo", [Publish(body=b"g", group=f"g{i % 4}") for i in range(20)])
        await broker.publish_batch("ttl", [Publish(body=b"x") for _ in range(20)])
        await broker.publish_batch("t", [Publish(body=b"fan", subject="t.a") for _ in range(10)])
        for name in ("q", "fifo", "s1", "s2", "s3", "dlq"):
            while deliveries := await broker.receive(name, rng.choice((1, 7, 50))):  # small batches: many leases
                keep = [d for d in deliveries if rng.random() < 0.1]
                done = [d.receipt for d in deliveries if d not in keep]
                if done:
                    await broker.ack(name, done)
                if keep:
                    await broker.nack(name, [d.receipt for d in keep], delay_s=0.2)
        clock.advance(0.3)
        broker.tick()
    clock.advance(1.0)
    broker.tick()
    for name in ("q", "fifo", "s1", "s2", "s3", "dlq"):  # what came back from delays
        while deliveries := await broker.receive(name, 100):
            await broker.ack(name, [d.receipt for d in deliveries])


@pytest.fixture
async def manual_broker(broker):
    broker.auto_tick = False  # the test moves the clock and ticks
    return broker


async def test_traffic_leaves_nothing_behind(manual_broker, clock):
    broker, rng = manual_broker, random.Random(7)
    await _setup(broker)
    baseline = broker.core.index_sizes()
    await _traffic(broker, clock, 40, rng)
    clock.advance(5 * DAY)  # past every lease, delay, expiry and dedup window
    broker.tick()
    after = broker.core.index_sizes()
    assert after == baseline
    assert all(broker.queue_stats(name).ready == 0 for name in ("q", "fifo", "ttl", "s1", "s2", "s3"))
    assert len(broker.core.timers) == 0


async def test_structures_do_not_grow_with_traffic(manual_broker, clock):
    """With traffic still going on (leases, 4-day expiries and dedup windows not yet over), the structures stay
    bounded by a constant: three times the messages leave them no bigger than once did."""
    broker, rng = manual_broker, random.Random(11)
    await _setup(broker)
    await _traffic(broker, clock, 60, rng)
    first = broker.core.index_sizes()
    await _traffic(broker, clock, 180, rng)
    later = broker.core.index_sizes()
    # ~23,000 stale timers would be there without compaction (a 4-day expiry per message, a lease per batch)
    assert later["timers"] <= 2 * SLACK + 2 * first["timers"]
    for key in ("ready_lines", "group_lines", "in_flight", "delayed", "retained", "pending_plans"):
        assert later[key] <= first[key] + 10, key
    assert later["dedup"] <= first["dedup"] + 100  # 5 s of ids: a function of the window, not of the traffic


async def test_snapshot_size_follows_the_backlog(manual_broker, clock):
    broker, rng = manual_broker, random.Random(3)
    await _setup(broker)
    await _traffic(broker, clock, 5, rng)
    clock.advance(5 * DAY)
    broker.tick()
    small = len(broker.core.snapshot())
    await _traffic(broker, clock, 60, rng)
    clock.advance(5 * DAY)
    broker.tick()
    assert len(broker.core.snapshot()) <= small + 64


async def test_ready_lines_shed_entries_expired_in_the_middle(manual_broker, clock):
    """Per-message TTLs expire out of order: the lazily removed entries are dropped once they outnumber the
    live ones, so a queue nobody consumes does not keep them."""
    broker = manual_broker
    await broker.create_queue("q")
    await broker.publish_batch("q", [Publish(body=b"keep")])  # a live head keeps the line from emptying
    for _ in range(40):
        await broker.publish_batch("q", [Publish(body=b"x", ttl_s=1.0) for _ in range(200)])
        await broker.publish_batch("q", [Publish(body=b"y")])
        clock.advance(1.5)
        broker.tick()
    sizes = broker.core.index_sizes()
    assert broker.queue_stats("q").ready == 41
    assert sizes["ready_lines"] <= 2 * 41 + 1024 + 200


def test_timer_compaction_keeps_live_timers_in_order():
    rng = random.Random(5)
    dead: set[int] = set()
    timers = Timers(lambda when, kind, owner, subject: subject not in dead)
    expected = []
    for i in range(60_000):
        when = rng.uniform(0, 1000)
        timers.add(when, DEDUP, None, i)
        expected.append((when, i))
        if rng.random() < 0.9:
            dead.add(i)
        assert len(timers) <= 2 * SLACK + 3 * (len(expected) - len(dead)) + 600
    fired = [(when, subject) for when, _, _, subject in timers.pop_due(2000.0)]
    live = sorted((w, i) for w, i in expected if i not in dead)
    assert [item for item in fired if item[1] not in dead] == live
    assert len(fired) < len(expected) / 2  # most stale timers were dropped before firing
    assert len(timers) == 0


def test_a_compaction_step_is_bounded_by_lookups_not_by_timers():
    # A stale lease timer names up to thousands of receipts and judging it looks each one up: moving a fixed
    # number of such timers per add held the loop 13-30 ms in a soak. Each call's work is bounded by the items'
    # weight (at least MIN_ITEMS items move), and the heap still stays bounded when every item is heavy.
    receipts_per_lease = 1000
    looked_up = [0]
    live_leases: set[int] = set()

    def live(when, kind, owner, subject):
        if subject.start in live_leases:
            looked_up[0] += 1  # the first receipt looked up is still leased
            return True
        looked_up[0] += len(subject)  # as BrokerState.timer_live looks up each receipt of a stale lease
        return False

    timers = Timers(live, timer_weight)
    most_per_call = 0
    for i in range(30_000):
        subject = range(i * receipts_per_lease, (i + 1) * receipts_per_lease)
        if i % 50 == 0:
            live_leases.add(subject.start)
        looked_up[0] = 0
        timers.add(float(i), LEASE, 1, subject)
        most_per_call = max(most_per_call, looked_up[0])
        assert len(timers) <= 2 * SLACK + 4 * len(live_leases) + 600
    assert 0 < most_per_call <= MIN_ITEMS * receipts_per_lease  # the old STEP of 128 timers: 128,000 lookups
    fired = [subject.start for _, _, _, subject in timers.pop_due(1e9)]
    assert [start for start in fired if start in live_leases] == sorted(live_leases)
    assert len(fired) < 30_000 / 2


def test_judging_whether_a_heap_is_mostly_stale_is_bounded_by_lookups_too():
    looked_up = [0]

    def live(when, kind, owner, subject):
        looked_up[0] += len(subject)  # every lease below is stale: each of its receipts is looked up
        return False

    timers = Timers(live, timer_weight)
    for i in range(2 * SLACK):  # (more than SLACK: a compaction is started on `add`, so fill the heap directly)
        timers.heap.append(Timer(float(i), i, LEASE, 1, range(i * 1000, (i + 1) * 1000)))
    timers.load = len(timers.heap)
    assert timers.mostly_stale()
    assert looked_up[0] <= SAMPLE_BUDGET + 1000  # 256 such leases: 256,000 lookups


async def test_passes_over_many_queues_leave_no_acked_lease_behind(manual_broker):
    """A dispatcher's pass leases from every push consumer's queue under one timer per deadline, naming a (queue
    id, receipts) pair per queue. Counted in items, a heap of such timers never reached the compaction threshold
    while it held the pairs of every acked message until their leases ran out: 8 MB a round of `chute bench
    --workload queues` (1,000 queues, 300 s leases), 58 -> 246 MB over 20 rounds. The heap is compacted by what its
    items hold, so the pairs of acked leases stay within a constant however many passes go by."""
    broker, queues, passes = manual_broker, 300, 60
    names = [f"q{i}" for i in range(queues)]
    for name in names:
        await broker.create_queue(name)
    core, timers = broker.core, broker.core.timers

    def pairs_held() -> int:  # counted from the items themselves, not from the heap's own tally
        items = [*timers.heap, *timers._old]
        return sum(len(item.subject) if item.owner is None else 1 for item in items if item.kind == LEASE)

    most = 0
    for _ in range(passes):
        await broker.publish_many([(name, [Publish(body=b"m")]) for name in names])
        now = broker.clock()
        core.begin_leases()
        leased = {name: core.receive(name, 1, now, 300.0) for name in names}
        core.end_leases()
        for name, entries in leased.items():
            await broker.ack(name, [e.receipt for e in entries])
        most = max(most, pairs_held())
        assert timers.load == sum(timer_size(i.kind, i.owner, i.subject) for i in (*timers.heap, *timers._old))
    assert most <= 2 * SLACK + 2 * queues  # without the compaction by size: passes * queues = 18,000 pairs
    assert sum(broker.queue_stats(name).in_flight for name in names) == 0


def test_the_weight_of_a_timer_is_the_lookups_judging_it_takes():
    assert timer_weight(LEASE, 7, range(10, 1010)) == 1000
    assert timer_weight(LEASE, None, ((7, range(0, 30)), (8, (31, 32)))) == 32
    assert timer_weight(EXPIRE, 7, object()) == timer_weight(DEDUP, object(), 1.0) == 1


def test_the_size_of_a_timer_is_what_it_holds():
    assert timer_size(LEASE, None, ((7, range(0, 30)), (8, (31, 32)), (9, range(5)))) == 3  # a pass's pairs
    assert timer_size(LEASE, 7, range(10, 1010)) == 1  # one range, however many receipts
    assert timer_size(EXPIRE, 7, object()) == timer_size(DEDUP, object(), None) == 1


BURST = 20_000


async def _consume_all(broker, name: str) -> None:
    while deliveries := await broker.receive(name, 1000):
        await broker.ack(name, [d.receipt for d in deliveries])


@pytest.mark.parametrize("ending", ["consumed", "deleted", "purged"])
async def test_a_burst_that_is_gone_gives_its_timers_back_at_the_next_checkpoint(manual_broker, ending):
    # Every message of a queue with a retention has an expiry timer. Once the burst is gone (acked, its queue
    # deleted or purged) and nothing else comes, those timers are all stale, but the heap only compacts itself
    # when it grows: without the checkpoint's check they (and the entries they name) stayed for 4 days.
    broker = manual_broker
    await broker.create_queue("other")
    await broker.create_queue("q", retention_s=4 * DAY)
    for _ in range(BURST // 1000):
        await broker.publish_batch("q", [Publish(body=b"m") for _ in range(1000)])
    await broker.publish_batch("other", [Publish(body=b"live", ttl_s=DAY) for _ in range(10)])
    if ending == "consumed":
        await _consume_all(broker, "q")
    elif ending == "deleted":
        await broker.delete_queue("q")
    else:
        assert await broker.purge_queue("q") == BURST
    assert len(broker.core.timers) >= BURST  # stale, waiting for their deadlines
    await broker.checkpoint()
    assert len(broker.core.timers) == 10  # the live ones of "other"
    assert broker.core.timers.next_deadline() is not None


async def test_a_heap_of_mostly_live_timers_is_left_alone_by_the_checkpoint(manual_broker):
    broker = manual_broker
    await broker.create_queue("q", retention_s=4 * DAY)
    for _ in range(BURST // 1000):
        await broker.publish_batch("q", [Publish(body=b"m") for _ in range(1000)])
    timers = broker.core.timers
    assert not timers.mostly_stale()
    before = list(timers.heap)
    await broker.checkpoint()
    assert timers.heap == before and not timers.compacting


def test_an_explicit_compaction_keeps_the_live_timers_in_order():
    rng = random.Random(9)
    dead: set[int] = set()
    timers = Timers(lambda when, kind, owner, subject: subject not in dead)
    expected = [(rng.uniform(0, 1000), i) for i in range(3 * SLACK)]
    for when, i in expected:
        timers.add(when, DEDUP, None, i)
    dead.update(i for _, i in expected if i % 3)  # two thirds go stale at once
    assert timers.mostly_stale()
    timers.compact()
    assert timers.compacting
    timers.add(500.0, DEDUP, None, "new")  # added while the compaction is under way
    while timers.step(100):
        pass
    assert not timers.compacting and len(timers) == SLACK + 1
    fired = [(when, subject) for when, _, _, subject in timers.pop_due(2000.0)]
    assert fired == sorted([(w, i) for w, i in expected if i not in dead] + [(500.0, "new")], key=lambda t: t[0])


async def test_timers_cost_the_collector_nothing_and_keep_no_deleted_queue_alive(manual_broker):
    """Every kind of timer (lease, lease batch, delay, expiry, retention, dedup sweep) is an item the cyclic garbage
    collector does not track: tens of thousands of them live for seconds to days, and walking them made its
    collections hold the loop for 5-40 ms. A deleted queue's stale timers name it by id, so they do not keep it
    (and its messages) alive until their deadlines."""
    broker = manual_broker
    await broker.create_queue("q", retention_s=DAY, dedup_window_s=60)
    await broker.create_queue("r")
    await broker.create_topic("t", retention_s=60)
    await broker.publish_batch("q", [Publish(body=b"m", dedup_id=f"d{i}") for i in range(300)])
    await broker.publish_batch("q", [Publish(body=b"later", delay_s=30) for _ in range(100)])
    await broker.publish_batch("t", [Publish(body=b"kept", subject="t.a") for _ in range(10)])
    await broker.publish_batch("r", [Publish(body=b"r") for _ in range(10)])
    await broker.receive("q", 50, lease_s=30)
    core, now = broker.core, broker.clock()
    core.begin_leases()  # as a dispatcher's pass does: one timer for both queues' leases of one deadline
    core.receive("q", 50, now, 40.0)
    core.receive("r", 10, now, 40.0)
    core.end_leases()
    timers = core.timers
    assert {item.kind for item in timers.heap} == {LEASE, DELAY, EXPIRE, RETAIN, DEDUP} and len(timers) > 400
    assert [item for item in timers.heap if item.kind == LEASE and item.owner is None]  # the pass's batch
    assert not [item for item in timers.heap if gc.is_tracked(item)]
    gc.collect()  # tuples of atoms are untracked by the collection that first sees them (pairs: by the next one)
    gc.collect()
    assert not [item for item in timers.heap if gc.is_tracked(item.subject)]
    queue = weakref.ref(broker.core.queues["q"])
    await broker.delete_queue("q")
    gc.collect()
    assert len(timers) > 400  # stale now, until their deadlines or the next compaction
    assert queue() is None


async def test_a_dedup_window_costs_the_collector_nothing(manual_broker):
    """A busy dedup window remembers one id per publish for minutes: as tuples they were most of what each young
    collection walked (8-10 ms holds of the loop in a soak). Each is an untracked struct, forgotten on time."""
    broker = manual_broker
    await broker.create_queue("q", dedup_window_s=60)
    await broker.publish_batch("q", [Publish(body=b"m", dedup_id=f"d{i}") for i in range(100)])
    window = broker.core.queues["q"].dedup
    assert len(window.table) == len(window.order) == 100
    assert not [item for item in (*window.table.values(), *window.order) if gc.is_tracked(item)]
    await broker.publish_batch("q", [Publish(body=b"again", dedup_id="d7")])
    assert broker.queue_stats("q").ready == 100  # still deduplicated
    broker.clock.advance(61)
    broker.tick()
    assert not window.table and not window.order


def test_a_dedup_window_snapshots_as_the_format_says_without_a_tuple_per_id():
    """A snapshot's dedup window is a list of (dedup id, expires, message id), soonest expiry first: the window's
    own items encode to exactly those bytes (no tuple built per id), and decode back as such tuples."""
    window = DedupWindow()
    for i in (3, 1, 2):
        window.remember(f"id-{i}", 100 + i, 1000.0 + i)
    window.remember("int-expiry", 7, 999)  # (an expiry that happens to be an int encodes as one either way)
    expected = [("int-expiry", 999, 7), ("id-1", 1001.0, 101), ("id-2", 1002.0, 102), ("id-3", 1003.0, 103)]
    encoded = msgspec.msgpack.encode(window.items())
    assert encoded == msgspec.msgpack.encode(expected)
    assert msgspec.msgpack.decode(encoded, type=list[tuple[str, float, int]]) == expected
