"""Group commit in the file store: what is appended while a group is being written and fsynced becomes the next
group, confirmed only after its own fsync; delivery counts (lazy records) never make a group of their own, yet
are written with the next group, by a checkpoint or at close.

The fsyncs are held by the test (`GatedFs`), so which group a record lands in is decided, not raced.
"""

from __future__ import annotations

import asyncio
import threading

from chute.storage import FileStore, MemoryFs

WAIT_S = 10.0


class GatedFs(MemoryFs):
    """A MemoryFs whose segment fsyncs, once `hold()` was called, each wait for a permit from `allow()`."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Semaphore(0)  # released by each held fsync as it starts waiting
        self.permits = threading.Semaphore(0)
        self.held = False

    def hold(self) -> None:
        self.held = True

    def allow(self, count: int = 1) -> None:
        self.permits.release(count)

    def let_go(self) -> None:
        self.held = False
        self.permits.release(100)

    async def in_fsync(self) -> None:
        """Until the writer thread is inside a held fsync."""
        assert await asyncio.to_thread(self.entered.acquire, True, WAIT_S), "the writer never reached its fsync"

    def _fsync(self, path) -> None:
        if self.held:
            self.entered.release()
            assert self.permits.acquire(timeout=WAIT_S), "the test never allowed this fsync"
        super()._fsync(path)


async def _open(tmp_path, fs: MemoryFs) -> FileStore:
    store = FileStore(tmp_path, fs=fs)
    await store.open()
    _, token = store.append([(1, b"first")])  # the segment file exists (and its name is durable) from here on
    await token
    return store


async def _records_after_power_cut(tmp_path, fs: GatedFs) -> tuple[bytes | None, list[bytes]]:
    fs.let_go()
    fs.crash()
    store = FileStore(tmp_path, fs=fs)
    recovered = await store.open()
    records = [payload for _, _, payload in recovered.records]
    await store.close()
    return recovered.snapshot, records


async def test_appends_made_during_a_write_are_the_next_group_and_wait_for_its_own_fsync(tmp_path):
    fs = GatedFs()
    store = await _open(tmp_path, fs)
    fsyncs = store.stats().fsyncs
    fs.hold()
    _, a = store.append([(1, b"a")])
    await fs.in_fsync()
    _, b = store.append([(1, b"b")])
    _, c = store.append([(1, b"c")])
    fs.allow()  # a's fsync ends
    await a
    await fs.in_fsync()  # the writer went on with b and c, one group
    assert not b.done() and not c.done()  # written, not yet fsynced: not confirmed
    fs.allow()
    await asyncio.wait_for(asyncio.gather(b, c), WAIT_S)
    assert store.stats().fsyncs == fsyncs + 2
    assert await _records_after_power_cut(tmp_path, fs) == (None, [b"first", b"a", b"b", b"c"])


async def test_delivery_counts_never_make_a_group_of_their_own(tmp_path):
    fs = GatedFs()
    store = await _open(tmp_path, fs)
    fsyncs = store.stats().fsyncs
    fs.hold()
    _, a = store.append([(1, b"a")])
    await fs.in_fsync()
    store.append_lazy([(2, b"count")])  # a delivery count, nobody waits for it
    fs.let_go()
    await a
    _, e = store.append([(1, b"e")])
    await e
    assert store.stats().fsyncs == fsyncs + 2  # a; then the count together with e (not a group for the count)
    assert await _records_after_power_cut(tmp_path, fs) == (None, [b"first", b"a", b"count", b"e"])


async def test_a_checkpoint_taken_while_a_group_is_written_covers_pending_delivery_counts(tmp_path):
    fs = GatedFs()
    store = await _open(tmp_path, fs)
    fs.hold()
    _, a = store.append([(1, b"a")])
    await fs.in_fsync()
    store.append_lazy([(2, b"count")])
    checkpoint = asyncio.ensure_future(store.checkpoint(b"snapshot"))
    await asyncio.sleep(0)  # the checkpoint takes its position (after the count) while a is still being written
    fs.let_go()
    await asyncio.wait_for(checkpoint, WAIT_S)
    assert a.done()
    # a power cut right after: the checkpoint's position is in the durable log (the count was written before it)
    fs.crash()
    reopened = FileStore(tmp_path, fs=fs)
    recovered = await reopened.open()
    records = list(recovered.records)
    await reopened.close()
    assert recovered.snapshot == b"snapshot" and records == []
    assert recovered.report.truncated_at is None and not recovered.report.problems


async def test_delivery_counts_pending_at_close_are_written(tmp_path):
    fs = GatedFs()
    store = await _open(tmp_path, fs)
    fs.hold()
    _, a = store.append([(1, b"a")])
    await fs.in_fsync()
    store.append_lazy([(2, b"count")])
    closing = asyncio.ensure_future(store.close())  # while a is still being written
    await asyncio.sleep(0)
    fs.let_go()
    await asyncio.wait_for(closing, WAIT_S)
    assert await _records_after_power_cut(tmp_path, fs) == (None, [b"first", b"a", b"count"])
