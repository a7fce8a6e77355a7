"""The broker over a failing disk, through the fs shim (chute.storage.file.fs): EIO and ENOSPC on write, fsync and
directory fsync, and power cuts.

A MemoryFs models the disk: `fs.fail(op, errno)` makes the next write or fsync raise, and `fs.crash()` is a power
cut (every file reverts to its last fsync, every directory to its last directory fsync). The contract
(errors.py, docs/storage-format.md): the publishes of the failed group raise StorageFailed (StorageFull for
ENOSPC) and are never delivered; what was confirmed before stays readable (receive works); the log is read-only
(StorageReadOnly) until the broker is restarted; after a restart every confirmed message is there, no confirmed
ack is undone, and the failed publish is not.
"""

from __future__ import annotations

import asyncio
import errno
import time

import pytest

from chute import Broker, Publish
from chute.errors import StorageFailed, StorageFull, StorageReadOnly
from chute.storage import FileStore, MemoryFs
from tests.processes import abandon

FAULTS = [
    pytest.param("fsync", errno.EIO, StorageFailed, id="fsync-EIO"),
    pytest.param("fsync", errno.ENOSPC, StorageFull, id="fsync-ENOSPC"),
    pytest.param("write", errno.EIO, StorageFailed, id="write-EIO"),
    pytest.param("write", errno.ENOSPC, StorageFull, id="write-ENOSPC"),
]
KEPT_Q = [b"q-%d" % i for i in range(1, 5)]  # q-0 is acked before the fault
KEPT_T = [b"t-0", b"t-1"]


async def start(fs: MemoryFs, path, **store_options) -> Broker:
    return await Broker(store=FileStore(path, fs=fs, **store_options)).start()


async def setup(broker: Broker) -> None:
    """Queue q with q-0..q-4 (q-0 acked), topic t fanned out to s1 and s2 with t-0, t-1: all confirmed."""
    await broker.create_queue("q", lease_s=600)
    await broker.create_topic("t")
    for name, pattern in (("s1", ">"), ("s2", "t")):
        await broker.create_queue(name, lease_s=600)
        await broker.subscribe("t", pattern, name)
    await broker.publish_batch("q", [Publish(body=b"q-%d" % i) for i in range(5)])
    await broker.publish_batch("t", [Publish(body=body) for body in KEPT_T])
    [first] = await broker.receive("q")
    assert first.body == b"q-0"
    await broker.ack("q", first.receipt)
    [again] = await broker.receive("q")  # in flight when the fault hits: the restart makes it ready again
    assert again.body == b"q-1"


async def fail_a_group(broker: Broker, fs: MemoryFs, op: str, code: int, error: type) -> None:
    """Arm the fault and publish to the queue and the topic in one group: both fail."""
    await broker.store.flush()  # the setup's last records (the receive's delivery count) are written first
    fs.fail(op, code)
    results = await asyncio.gather(
        broker.publish_batch("q", [Publish(body=b"q-failed-%d" % i) for i in range(3)]),
        broker.publish("t", b"t-failed"),
        return_exceptions=True,
    )
    assert [type(r) for r in results] == [error, error], results
    assert not broker.healthy and broker.store.read_only


async def bodies(broker: Broker, queue: str) -> list[bytes]:
    return [d.body for d in await broker.peek(queue, 1000)]


async def assert_confirmed_state(broker: Broker) -> None:
    """After a restart: every confirmed message, in order; no acked one; no failed one."""
    assert await bodies(broker, "q") == KEPT_Q
    for name in ("s1", "s2"):
        assert await bodies(broker, name) == KEPT_T


@pytest.mark.parametrize(
    "cache",
    [
        pytest.param("cached", id="bodies-cached"),
        pytest.param("uncached", id="bodies-on-disk"),
    ],
)
@pytest.mark.parametrize(("op", "code", "error"), FAULTS)
async def test_failed_group_is_rejected_and_reads_go_on(tmp_path, op, code, error, cache):
    fs = MemoryFs()
    # cache_max_bytes=0: every body is read from the files, as for any backlog bigger than the 8 MiB cache
    broker = await start(fs, tmp_path, **({"cache_max_bytes": 0} if cache == "uncached" else {}))
    await setup(broker)
    await fail_a_group(broker, fs, op, code, error)

    with pytest.raises(StorageReadOnly):
        await broker.publish("q", b"refused")
    with pytest.raises(StorageReadOnly):
        await broker.publish("t", b"refused")
    # reads go on: the confirmed messages are delivered, the failed ones never
    got = await broker.receive("q", 100)
    assert [d.body for d in got] == KEPT_Q[1:]  # q-1 is still leased to the consumer of before the fault
    for name in ("s1", "s2"):
        assert [d.body for d in await broker.receive(name, 100)] == KEPT_T
    stats = broker.queue_stats("q")
    assert (stats.ready, stats.in_flight) == (0, len(KEPT_Q))  # no trace of the failed publish
    with pytest.raises(StorageReadOnly):  # an ack cannot be made durable either: it is refused, not confirmed
        await broker.ack("q", [d.receipt for d in got])
    await broker.close()

    fs.crash()  # whatever reached the page cache but not the disk is gone
    async with Broker(store=FileStore(tmp_path, fs=fs)) as again:
        assert again.healthy
        await assert_confirmed_state(again)  # the refused ack did not land: q-2..q-4 are back too
        await again.publish("q", b"after")  # writable again after the restart
        assert (await bodies(again, "q"))[-1] == b"after"


@pytest.mark.parametrize(
    "restart",
    [
        pytest.param("power cut", id="power-cut"),
        pytest.param("process restart", id="process-restart"),
    ],
)
@pytest.mark.parametrize(("op", "code", "error"), FAULTS)
async def test_failed_publish_is_absent_after_a_restart(tmp_path, op, code, error, restart):
    fs = MemoryFs()
    broker = await start(fs, tmp_path)
    await setup(broker)
    await fail_a_group(broker, fs, op, code, error)
    await broker.close()
    if restart == "power cut":
        fs.crash()
    async with Broker(store=FileStore(tmp_path, fs=fs)) as again:
        await assert_confirmed_state(again)


class DirFsyncFails(MemoryFs):
    """A MemoryFs whose next directory fsync fails (`fail("fsync")` would hit the segment's fsync first)."""

    dir_fault: int | None = None

    def fsync_dir(self, path: str) -> None:
        if self.dir_fault is not None:
            code, self.dir_fault = self.dir_fault, None
            raise OSError(code, "injected", path)
        super().fsync_dir(path)


async def test_failed_directory_fsync_of_a_new_segment_rejects_its_publish(tmp_path):
    fs = DirFsyncFails()
    broker = await start(fs, tmp_path, segment_max_bytes=1024)
    await broker.create_queue("q", lease_s=600)
    confirmed = []
    for i in range(20):  # fill the first segment
        body = b"kept-%02d-" % i + b"k" * 100
        await broker.publish("q", body)
        confirmed.append(body)
    segments = len(fs.listdir(str(tmp_path)))
    fs.dir_fault = errno.EIO
    with pytest.raises(StorageFailed):
        for _ in range(20):  # the publish that starts a new segment fails: its name would not survive a power cut
            await broker.publish("q", b"x" * 200)
            confirmed.append(b"x" * 200)
    assert fs.dir_fault is None, "test setup: the directory fsync of a new segment was reached"
    assert len(fs.listdir(str(tmp_path))) == segments  # the failed group's new segment was removed again
    assert [d.body for d in await broker.receive("q", 100)] == confirmed
    await broker.close()
    fs.crash()
    async with Broker(store=FileStore(tmp_path, fs=fs, segment_max_bytes=1024)) as again:
        assert await bodies(again, "q") == confirmed


@pytest.mark.parametrize(("op", "code", "error"), [FAULTS[0], FAULTS[3]])
async def test_failed_checkpoint_makes_the_log_read_only_and_loses_nothing(tmp_path, op, code, error):
    fs = MemoryFs()
    broker = await start(fs, tmp_path)
    await setup(broker)
    await broker.checkpoint()  # a good checkpoint first: the failed one must not replace it
    await broker.publish("q", b"q-5")
    fs.fail(op, code)
    with pytest.raises(error):
        await broker.checkpoint()
    assert not broker.healthy
    with pytest.raises(StorageReadOnly):
        await broker.publish("q", b"refused")
    await broker.close()
    fs.crash()
    async with Broker(store=FileStore(tmp_path, fs=fs)) as again:
        assert await bodies(again, "q") == [*KEPT_Q, b"q-5"]
        for name in ("s1", "s2"):
            assert await bodies(again, name) == KEPT_T


async def test_power_cut_keeps_confirmed_publishes_and_acks(tmp_path):
    fs = MemoryFs()
    broker = await start(fs, tmp_path)
    await broker.create_queue("q")
    await broker.publish_batch("q", [Publish(body=b"%d" % i) for i in range(10)])
    got = await broker.receive("q", 4)
    await broker.ack("q", [d.receipt for d in got])
    fs.crash()  # no close: the process and the machine are gone
    abandon(broker.store)
    async with Broker(store=FileStore(tmp_path, fs=fs)) as again:
        assert [d.body for d in await again.receive("q", 20)] == [b"%d" % i for i in range(4, 10)]


async def test_shared_dead_letter_queue_survives_a_power_cut(tmp_path):
    """One topic message dead-lettered from two subscriptions into one DLQ: acking one copy stays acked."""
    fs = MemoryFs()
    broker = await Broker(store=FileStore(tmp_path, fs=fs), checkpoint_bytes=1 << 40).start()
    await broker.create_queue("dlq")
    await broker.create_topic("t")
    for name in ("a", "b"):
        await broker.create_queue(name, dead_letter_queue="dlq")
        await broker.subscribe("t", ">", name)
    await broker.publish("t", b"poison")
    for name in ("a", "b"):
        [delivery] = await broker.receive(name)
        await broker.nack(name, delivery.receipt, dead_letter=True)
    dead = await broker.receive("dlq", 10)
    assert len(dead) == 2 and dead[0].id == dead[1].id
    await broker.ack("dlq", [dead[0].receipt, dead[1].receipt])
    fs.crash()
    abandon(broker.store)
    async with Broker(store=FileStore(tmp_path, fs=fs)) as again:
        assert await again.peek("dlq", 10) == []  # both acked copies stay acked


async def test_crashes_sooner_than_the_checkpoint_interval_do_not_grow_the_replayed_tail(tmp_path):
    """A broker that recovered from a log tail after a crash checkpoints at once: crashes coming more often than
    `checkpoint_interval_s` (a cluster shard taken over again and again) replay only what the last run wrote."""
    fs = MemoryFs()
    replayed = []
    for round_ in range(5):
        broker = await Broker(store=FileStore(tmp_path, fs=fs), checkpoint_interval_s=3600).start()
        replayed.append(broker.recovery.records)
        if round_ == 0:
            await broker.create_queue("q")
        await broker.publish_batch("q", [Publish(body=b"%d-%d" % (round_, i)) for i in range(200)])
        got = await broker.receive("q", 200)
        await broker.ack("q", [d.receipt for d in got])
        if round_:  # the checkpoint the recovery asked for (the first run recovered nothing)
            deadline = time.monotonic() + 10
            while broker.checkpoints < 1:
                assert time.monotonic() < deadline, "no checkpoint after a recovery that replayed a tail"
                await asyncio.sleep(0.01)
        fs.crash()
        abandon(broker.store)
        await asyncio.sleep(0)
    assert replayed[0] == 0
    assert max(replayed[2:]) <= replayed[1] * 1.2, replayed  # one run's records, not every run's so far
    async with Broker(store=FileStore(tmp_path, fs=fs)) as again:
        assert again.queue_stats("q").ready == 0
