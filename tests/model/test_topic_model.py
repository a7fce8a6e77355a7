"""Fan-out against a brute-force model: every subscription queue holds exactly the messages whose subject and
headers match it, once each, in publish order — also after a restart and after a power cut."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from chute import Broker
from chute.core.filters import compile_filter
from chute.core.routing import Pattern
from chute.storage import FileStore, MemoryFs
from tests.conftest import Clock
from tests.processes import abandon_broker

SUBJECTS = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3).map(".".join)
PATTERNS = st.sampled_from([">", "a.>", "*", "a.*", "*.b", "a.b", "b.>", "*.*.c"])
FILTERS = st.sampled_from([None, {"k": "1"}, {"k": {"in": ["1", "2"]}}, {"k": {"exists": False}}])
MESSAGES = st.lists(st.tuples(SUBJECTS, st.sampled_from([None, "1", "2", "3"])), min_size=1, max_size=25)


@given(
    subscriptions=st.lists(st.tuples(PATTERNS, FILTERS), min_size=1, max_size=5),
    before=MESSAGES,
    after=MESSAGES,
    ending=st.sampled_from(["restart", "power_cut", "none"]),
)
def test_fan_out_matches_brute_force(subscriptions, before, after, ending):
    asyncio.run(_scenario(subscriptions, before, after, ending))


async def _scenario(subscriptions, before, after, ending):
    fs, clock = MemoryFs(), Clock()

    def open_broker() -> Broker:
        return Broker(store=FileStore("/fan/data", fs=fs, segment_max_bytes=2048), clock=clock, auto_tick=False)

    broker = await open_broker().start()
    await broker.create_topic("t")
    for i, (pattern, spec) in enumerate(subscriptions):
        await broker.create_queue(f"q{i}")
        await broker.subscribe("t", pattern, f"q{i}", filter=spec)
    sent = []
    for subject, header in before:
        headers = {"k": header} if header is not None else None
        await broker.publish("t", b"%s|%d" % (subject.encode(), len(sent)), subject=subject, headers=headers)
        sent.append((subject, headers or {}))
    if ending == "restart":
        await broker.close()
        broker = await open_broker().start()
    elif ending == "power_cut":
        fs.crash()
        await abandon_broker(broker)
        broker = await open_broker().start()
    for subject, header in after:
        headers = {"k": header} if header is not None else None
        await broker.publish("t", b"%s|%d" % (subject.encode(), len(sent)), subject=subject, headers=headers)
        sent.append((subject, headers or {}))
    for i, (pattern, spec) in enumerate(subscriptions):
        matcher, header_filter = Pattern(pattern), compile_filter(spec)
        expected = [
            n
            for n, (subject, headers) in enumerate(sent)
            if matcher.matches(subject) and header_filter.matches(headers)
        ]
        got = [int(d.body.split(b"|")[1]) for d in await broker.peek(f"q{i}", 1000)]
        assert got == expected, f"subscription {pattern!r} {spec!r}"
    await broker.close()
