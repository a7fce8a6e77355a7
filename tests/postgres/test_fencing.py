"""Fencing: a store that lost its stream to another (a second open takes over) never writes again.

The takeover bumps the stream's epoch; every write checks the epoch in the same statement or transaction. So the
first store's next group, checkpoint or clean-shutdown flag writes nothing, fails with an error naming the new
owner, and the store is read-only; what it confirmed before the takeover is the new owner's to recover."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from chute.errors import StorageFailed, StorageReadOnly
from chute.storage.postgres import PostgresStore
from chute.storage.postgres import db as database
from tests.postgres.helpers import stored_payloads, wait_for_lock_waiters
from tests.postgres.server import unique_name


async def _records(store_factory) -> list[tuple[int, int, bytes]]:
    store = store_factory()
    recovered = await store.open()
    records = list(recovered.records)
    await store.close()
    return records


async def test_second_open_takes_over_and_the_first_can_never_write(postgres_url):
    stream = unique_name("fence")

    def factory():
        return PostgresStore(postgres_url, stream=stream, chunk_max_bytes=4096)

    first = factory()
    await first.open()
    before, token = first.append([(1, b"before takeover")])
    await token
    second = factory()
    await second.open()  # takes the stream over: a new epoch
    assert second.epoch == first.epoch + 1
    assert "pid" in second.previous_owner
    recovered_by_second = [(1, b"before takeover")]

    _, token = first.append([(1, b"after takeover 1"), (1, b"after takeover 2")])
    with pytest.raises(StorageFailed, match="fenced: stream .* was taken over .*epoch 2"):
        await token
    assert first.read_only
    with pytest.raises(StorageReadOnly, match="taken over"):
        first.append([(1, b"after takeover 3")])
    with pytest.raises(StorageReadOnly):
        await first.checkpoint(b"a stale snapshot")
    assert await first.read(before) == [b"before takeover"]  # reads still work: they change nothing

    mine, token = second.append([(1, b"the new owner's")])
    await token
    await first.close()  # its clean-shutdown flag is not written either
    await second.close()
    records = await _records(factory)
    assert [(kind, payload) for _, kind, payload in records] == recovered_by_second + [(1, b"the new owner's")]


async def test_a_fenced_checkpoint_stores_nothing_and_deletes_nothing(postgres_url):
    stream = unique_name("fence")

    def factory():
        return PostgresStore(postgres_url, stream=stream, chunk_max_bytes=200)

    first = factory()
    await first.open()
    refs, token = first.append([(1, b"x" * 150) for _ in range(6)])  # several chunks, none tracked: all dead
    await token
    second = factory()
    recovered = await second.open()
    assert [payload for _, _, payload in recovered.records] == [b"x" * 150] * 6
    with pytest.raises(StorageFailed, match="fenced"):
        await first.checkpoint(b"stale")  # would delete every chunk it thinks dead
    for ref in refs:
        second.track(ref)
    assert await second.read(refs) == [b"x" * 150] * 6
    await second.close()
    await first.close()
    assert len(await stored_payloads(postgres_url, stream)) == 6


async def test_takeover_waits_for_a_write_in_flight_and_then_fences(postgres_url):
    """A group already inside its statement when the takeover starts commits first (it was the owner's), and the
    takeover sees it; the next group of the old owner is fenced."""
    stream = unique_name("fence")
    first = PostgresStore(postgres_url, stream=stream)
    await first.open()
    _, token = first.append([(1, b"warm up")])
    await token
    blocker = await asyncpg.connect(postgres_url)
    try:
        lock = blocker.transaction()
        await lock.start()
        # a row lock on a record the group will insert (same primary key) makes the group wait inside its
        # statement, holding its share lock on the stream row
        ref = (first._active << 32) | first._next_index
        await blocker.execute(
            "INSERT INTO chute_records (stream_id, ref, kind, payload) VALUES ($1, $2, 1, 'x')",
            first._db.stream_id,
            ref,
        )
        _, in_flight = first.append([(1, b"in flight")])
        await wait_for_lock_waiters(blocker, 1)  # the group waits for the blocker
        second = PostgresStore(postgres_url, stream=stream)
        opening = asyncio.ensure_future(second.open())
        await wait_for_lock_waiters(blocker, 2)  # the takeover waits for the group
        await lock.rollback()  # the group goes on and commits; then the takeover proceeds
        await in_flight
        recovered = await opening
        assert [payload for _, _, payload in recovered.records] == [b"warm up", b"in flight"]
        _, late = first.append([(1, b"late")])
        with pytest.raises(StorageFailed, match="fenced"):
            await late
        await second.close()
        await first.close()
    finally:
        await blocker.close()


def test_every_write_statement_checks_the_epoch():
    """The fencing rule in the SQL itself: each write statement or transaction names the epoch."""
    assert "epoch = $2 FOR SHARE" in database.INSERT_GROUP
    assert "epoch = $2 FOR SHARE" in database.CHECK_EPOCH
