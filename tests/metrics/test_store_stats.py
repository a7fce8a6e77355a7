"""The storage counters /metrics reads: the fsync latency histogram and the checkpoint file's size."""

from __future__ import annotations

import os

import pytest

from chute.storage.api import FSYNC_BUCKETS_S, StoreStats
from chute.storage.file import FileStore
from chute.storage.memory import MemoryStore

pytestmark = pytest.mark.timeout(30)


def test_fsync_buckets_count_each_observation_once_by_upper_bound():
    stats = StoreStats()
    for seconds in (0.00001, FSYNC_BUCKETS_S[0], 0.0003, 1.0, 7.0):
        stats.observe_fsync(seconds)
    assert stats.fsyncs == 5 == sum(stats.fsync_buckets)
    assert stats.fsync_buckets[0] == 2  # a bound is inclusive (Prometheus `le`)
    assert stats.fsync_buckets[FSYNC_BUCKETS_S.index(0.0005)] == 1
    assert stats.fsync_buckets[FSYNC_BUCKETS_S.index(1.0)] == 1
    assert stats.fsync_buckets[-1] == 1  # slower than every bound
    assert stats.fsync_seconds_total == pytest.approx(8.00036)


async def test_file_store_observes_every_group_fsync_and_knows_its_checkpoint_size(tmp_path):
    store = FileStore(tmp_path, fsync_policy="always")
    await store.open()
    for i in range(5):
        _, token = store.append([(1, b"x" * 100 * (i + 1))])
        await token
    stats = store.stats()
    assert stats.fsyncs >= 5 and sum(stats.fsync_buckets) == stats.fsyncs
    assert stats.fsync_seconds_total > 0
    assert stats.checkpoint_file_bytes == 0
    await store.checkpoint(b"snapshot" * 50)
    size = os.path.getsize(tmp_path / "checkpoint")
    assert store.stats().checkpoint_file_bytes == size > 400
    await store.close()

    again = FileStore(tmp_path, fsync_policy="always")
    await again.open()
    assert again.stats().checkpoint_file_bytes == size  # known after a restart too
    assert again.stats().bytes_on_disk > 0 and again.stats().segments >= 1
    await again.close()


async def test_file_store_without_fsync_observes_none_until_close(tmp_path):
    store = FileStore(tmp_path, fsync_policy="never")
    await store.open()
    _, token = store.append([(1, b"x")])
    await token
    assert store.stats().fsyncs == 0 == sum(store.stats().fsync_buckets)
    await store.close()


async def test_memory_store_has_no_fsyncs_and_no_disk():
    store = MemoryStore()
    await store.open()
    _, token = store.append([(1, b"x")])
    await token
    stats = store.stats()
    assert stats.fsyncs == 0 == sum(stats.fsync_buckets)
    assert stats.bytes_on_disk == 0 == stats.checkpoint_file_bytes


def test_a_nodes_shards_are_counted_together_and_a_setting_is_not_summed():
    """A cluster node's /metrics sums its shards' counters (cluster/localview.py); the hold report's slow-fsync
    threshold, set on a shard's stats, is a setting and stays out of the sum."""
    from types import SimpleNamespace

    from chute.cluster.localview import LocalStore

    first, second = StoreStats(appends=3, read_only=False), StoreStats(appends=4, read_only=True)
    first.observe_fsync(0.002)
    first.slow_fsync_s = second.slow_fsync_s = 0.01
    shards = [SimpleNamespace(store=SimpleNamespace(stats=lambda s=s: s)) for s in (first, second)]
    total = LocalStore(lambda: shards, "here").stats()
    assert total.appends == 7 and total.read_only and total.fsyncs == 1 and sum(total.fsync_buckets) == 1
    assert total.slow_fsync_s is None
