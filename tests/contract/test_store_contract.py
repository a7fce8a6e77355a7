"""One contract suite for every store (storage/api.py): memory, file on the real disk, file on the memory fs, and
PostgreSQL (a real server, tests/postgres/server.py; each test on a stream of its own)."""

from __future__ import annotations

import contextlib

import pytest

from chute.errors import StorageReadOnly
from chute.storage import FileStore, MemoryFs, MemoryStore


@pytest.fixture(params=["memory", "file-os", "file-memfs", "postgres"])
def factory(request, tmp_path):
    """A function that returns the store to use for the next (re)open of the same data."""
    kind = request.param
    if kind == "memory":
        store = MemoryStore()
        return lambda: store
    if kind == "postgres":
        from chute.storage.postgres import PostgresStore
        from tests.postgres.server import unique_name

        url, stream = request.getfixturevalue("postgres_url"), unique_name()
        return lambda: PostgresStore(url, stream=stream, chunk_max_bytes=4096)
    fs = MemoryFs() if kind == "file-memfs" else None
    return lambda: FileStore(tmp_path / "data", segment_max_bytes=4096, fs=fs)


async def _opened(factory):
    store = factory()
    recovered = await store.open()
    return store, recovered


async def test_append_assigns_increasing_refs_and_reads_back(factory):
    store, recovered = await _opened(factory)
    assert recovered.snapshot is None and list(recovered.records) == []
    refs, token = store.append([(1, b"a"), (2, b"bb"), (3, b"")])
    more, token2 = store.append([(1, b"d" * 1000) for _ in range(10)])
    await token
    await token2
    assert token.done() and token2.done()
    all_refs = refs + more
    assert all_refs == sorted(all_refs) and len(set(all_refs)) == 13
    assert await store.read([refs[1], refs[0], refs[2]]) == [b"bb", b"a", b""]
    assert await store.read(more) == [b"d" * 1000] * 10
    await store.close()


async def test_reopen_replays_in_order(factory):
    store, _ = await _opened(factory)
    payloads = [bytes([i]) * i for i in range(1, 40)]
    refs, token = store.append([(5, p) for p in payloads])
    await token
    await store.close()
    store, recovered = await _opened(factory)
    replayed = list(recovered.records)
    assert [(r, k, p) for r, k, p in replayed] == [(r, 5, p) for r, p in zip(refs, payloads, strict=True)]
    await store.close()


async def test_checkpoint_replays_only_later_records(factory):
    store, _ = await _opened(factory)
    _, token = store.append([(1, b"before")])
    await token
    await store.checkpoint(b"SNAP")
    later, token = store.append([(1, b"after")])
    await token
    await store.close()
    store, recovered = await _opened(factory)
    assert recovered.snapshot == b"SNAP"
    assert list(recovered.records) == [(later[0], 1, b"after")]
    await store.close()


async def test_live_records_stay_readable_across_checkpoints(factory):
    store, _ = await _opened(factory)
    refs, token = store.append([(1, b"x" * 500) for _ in range(30)])  # several small segments
    await token
    keep = refs[3]
    for ref in refs:
        store.track(ref)
    for ref in refs:
        if ref != keep:
            store.release(ref)
    await store.checkpoint(b"S")
    more, token = store.append([(1, b"y")])
    await token
    await store.checkpoint(b"S2")
    assert await store.read([keep]) == [b"x" * 500]
    await store.close()
    store, recovered = await _opened(factory)
    list(recovered.records)
    assert await store.read([keep]) == [b"x" * 500]
    await store.close()


async def _forty_live_records(tmp_path):
    """A file store with small segments holding 40 tracked records of 300 bytes (several segments)."""
    store = FileStore(tmp_path / "d", segment_max_bytes=2048)
    await store.open()
    refs, token = store.append([(1, b"z" * 300) for _ in range(40)])
    await token
    for ref in refs:
        store.track(ref)
    return store, refs


async def test_file_store_counts_batches_as_refs_one_by_one(tmp_path):
    """`track_many` / `release_many` count what `track` / `release` of each ref would: a batch within one segment
    (counted in one step), one across segments, a ref named twice."""
    one_by_one, refs = await _forty_live_records(tmp_path / "a")
    batched, same_refs = await _forty_live_records(tmp_path / "b")
    assert refs == same_refs
    first = [r for r in refs if r >> 32 == refs[0] >> 32]
    assert 1 < len(first) < len(refs)
    batches = [("track", first + [first[0]]), ("release", refs[1:]), ("release", [first[0], first[0]]),
               ("track", refs[-3:]), ("release", [])]  # fmt: skip
    for verb, batch in batches:
        for ref in batch:
            getattr(one_by_one, verb)(ref)
        getattr(batched, verb + "_many")(batch)

    def live(store):
        return {segment: info[2] for segment, info in store._segments.items()}

    assert live(batched) == live(one_by_one)
    assert live(batched)[refs[0] >> 32] == len(first) + (len(first) + 1) - (len(first) - 1) - 2  # (tracked once first)
    for store in (one_by_one, batched):
        await store.close()


async def test_file_store_reclaims_dead_segments(tmp_path):
    store, refs = await _forty_live_records(tmp_path)
    before = store.stats().segments
    assert before > 4
    for ref in refs[:-1]:
        store.release(ref)
    await store.checkpoint(b"S")
    after = store.stats().segments
    assert after < before
    assert await store.read([refs[-1]]) == [b"z" * 300]
    await store.close()


async def test_sparse_segments_are_named_for_compaction(tmp_path):
    store, refs = await _forty_live_records(tmp_path)
    first_segment = [r for r in refs if r >> 32 == refs[0] >> 32]
    for ref in first_segment[1:]:
        store.release(ref)
    await store.checkpoint(b"S")
    sparse = store.sparse_segments()
    assert sparse(first_segment[0])
    assert not sparse(refs[-1])
    await store.close()


async def test_second_store_on_same_directory_is_refused(tmp_path):
    from chute.errors import StorageFailed

    first = FileStore(tmp_path / "d")
    await first.open()
    second = FileStore(tmp_path / "d")
    with pytest.raises(StorageFailed, match="in use"):
        await second.open()
    await first.close()


async def test_a_reopen_waits_out_a_forked_childs_copy_of_the_lock(tmp_path):
    """A child the broker's process forks (a checkpoint's snapshot) shares the lock until its first step closes
    its copy: a store of the same process that closes and opens again meanwhile gets the directory, not an "in
    use" error. (The child here keeps its copy for 150 ms.)"""
    import os
    import signal
    import time

    first = FileStore(tmp_path / "d")
    await first.open()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        time.sleep(0.15)
        os._exit(0)
    try:
        await first.close()
        again = FileStore(tmp_path / "d")
        await again.open()
        await again.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


async def test_closed_store_refuses_appends(tmp_path):
    store = FileStore(tmp_path / "d")
    await store.open()
    await store.close()
    with pytest.raises(StorageReadOnly):
        store.append([(1, b"x")])
