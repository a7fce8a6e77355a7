"""A read in progress keeps the records it reads: a checkpoint may not delete their file (or chunk) under it.

Found by the SIGKILL campaign (issue 12): a receive whose body was not cached started a read of the entry's ref;
while the read waited, a checkpoint's compaction moved that entry to a copy of its record, the old segment's live
count fell to zero and the checkpoint deleted it, so the read failed with "read of a deleted segment" although
nothing was wrong on disk (the next start recovered every message). A store now counts the refs of a read in
progress as live until the read returns.

Each test holds the read where it waits (the file store's reader thread; a lock on the PostgreSQL table) while the
holder lets go and a checkpoint runs, so the race runs in the same order every time.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from chute.storage import FileStore

pytestmark = pytest.mark.timeout(90)

SMALL = 4096  # bytes per segment / chunk
FIRST = b"first" + b"!" * 3900  # fills a segment (a chunk) by itself: nothing else keeps that file


async def fill(store, first: bytes) -> int:
    """Append `first`, hold it (as a queue entry would), then roll past its segment or chunk with records held
    for good; return the first one's ref."""
    refs, token = store.append([(1, first)])
    await token
    store.track(refs[0])
    for i in range(40):  # held too: only the first record's file or chunk may become free of holders
        filler, token = store.append([(1, b"filler %d " % i + b"." * 200)])
        store.track(filler[0])
    await token
    return refs[0]


async def test_file_store_keeps_a_segment_under_a_read_through_a_checkpoint(tmp_path):
    store = FileStore(tmp_path, segment_max_bytes=SMALL, cache_max_bytes=0)
    await store.open()
    ref = await fill(store, FIRST)
    segment = tmp_path / f"{ref >> 32:020d}.seg"
    assert store.stats().segments > 2, "test setup: the first segment is sealed"

    go = threading.Event()
    store._reader.submit(go.wait, 30)  # the reader thread is busy: the read waits behind it
    try:
        reading = asyncio.ensure_future(store.read([ref]))
        await asyncio.sleep(0)  # the read has begun (and holds its ref)
        store.release(ref)  # the holder lets go, as compaction does when it moves an entry
        await store.checkpoint(b"snapshot")  # covers the segment, which no entry holds any more
        assert segment.exists(), "the checkpoint deleted the segment under a read in progress"
    finally:
        go.set()
    assert await reading == [FIRST]

    await store.checkpoint(b"snapshot")  # nothing reads or holds it now: it goes
    assert not segment.exists()
    await store.close()


async def test_postgres_store_keeps_a_chunk_under_a_read_through_a_checkpoint(postgres_url):
    from chute.storage.postgres import PostgresStore
    from tests.postgres.helpers import connected, wait_for_lock_waiters
    from tests.postgres.server import unique_name

    name = unique_name("read-pin")
    store = PostgresStore(postgres_url, stream=name, chunk_max_bytes=SMALL, cache_max_bytes=0)
    await store.open()
    ref = await fill(store, FIRST)
    rows_of_chunk = (
        "SELECT count(*) FROM chute_records r JOIN chute_streams s ON s.id = r.stream_id "
        "WHERE s.name = $1 AND r.ref >> 32 = $2"
    )
    async with connected(postgres_url) as side:
        transaction = side.transaction()
        await transaction.start()
        await side.execute("LOCK TABLE chute_records IN ACCESS EXCLUSIVE MODE")  # the read's SELECT waits
        try:
            reading = asyncio.ensure_future(store.read([ref]))
            await wait_for_lock_waiters(side, 1)
            store.release(ref)
            # the checkpoint must not delete the chunk under the read (a DELETE would wait for our lock: the test
            # would time out here rather than pass)
            await asyncio.wait_for(store.checkpoint(b"snapshot"), 30)
            assert await side.fetchval(rows_of_chunk, name, ref >> 32) > 0
        finally:
            await transaction.rollback()
        assert await reading == [FIRST]
        await store.checkpoint(b"snapshot")
        assert await side.fetchval(rows_of_chunk, name, ref >> 32) == 0
    await store.close()
