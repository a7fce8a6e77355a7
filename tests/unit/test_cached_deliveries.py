"""`Broker._cached_deliveries` in the dispatcher's pass: deliveries of one message to several queues (fan-out)
share one decoded `Message`; a batch with a body no longer in the store's cache gives up (None) and is read from
disk instead, with the same deliveries."""

from __future__ import annotations

from chute import Broker
from chute.storage import MemoryStore


class _Evicting(MemoryStore):
    """A store whose cache has lost the bodies of `evicted` refs (they are still read from "disk")."""

    def __init__(self) -> None:
        super().__init__()
        self.evicted: set[int] = set()

    def read_cached(self, ref: int) -> bytes | None:
        return None if ref in self.evicted else super().read_cached(ref)


async def test_fan_out_shares_messages_and_a_body_out_of_cache_is_read(clock):
    store = _Evicting()
    broker = Broker(store=store, clock=clock, auto_tick=False)
    await broker.start()
    try:
        await broker.create_topic("t")
        for name in ("a", "b"):
            await broker.create_queue(name)
            await broker.subscribe("t", ">", name)
        ids = [await broker.publish("t", b"m%d" % i, headers={"i": str(i)}) for i in range(3)]
        core, now = broker.core, clock()
        leased = {name: core.receive(name, 3, now) for name in ("a", "b")}
        shared: dict = {}
        first = broker._cached_deliveries("a", leased["a"], shared)
        assert [(d.queue, d.id, d.body, d.headers) for d in first] == [
            ("a", ids[i], b"m%d" % i, {"i": str(i)}) for i in range(3)
        ]
        store.evicted = {e.ref for e in leased["b"]}  # decoded for "a" already: no body needed
        second = broker._cached_deliveries("b", leased["b"], shared)
        assert [d.message for d in second] == [d.message for d in first]
        assert all(x.message is y.message for x, y in zip(first, second, strict=True))
        assert [d.receipt for d in second] == [e.receipt for e in leased["b"]]

        shared.clear()  # the next pass: nothing decoded yet, and the second body left the cache
        store.evicted = {leased["b"][1].ref}
        assert broker._cached_deliveries("b", leased["b"], shared) is None
        read = await broker._read_deliveries("b", leased["b"])
        assert [(d.queue, d.receipt, d.message) for d in read] == [(d.queue, d.receipt, d.message) for d in second]
    finally:
        await broker.close()
