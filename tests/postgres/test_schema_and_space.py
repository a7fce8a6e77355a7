"""The schema the store creates (versioned, refused when newer or foreign) and how its rows are reclaimed."""

from __future__ import annotations

import asyncio
import zlib

import pytest

from chute.errors import InvalidArgument, StorageCorrupt, StorageFailed
from chute.storage.postgres import SCHEMA_VERSION, PostgresStore
from chute.storage.postgres import db as database
from tests.postgres.helpers import connected, fresh_database, stored_payloads
from tests.postgres.server import unique_name


async def _tables(url: str) -> set[str]:
    async with connected(url) as connection:
        rows = await connection.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {row[0] for row in rows}


async def test_first_open_creates_the_versioned_schema_once(postgres_url):
    url = await fresh_database(postgres_url)
    for _ in range(2):
        store = PostgresStore(url, stream="a")
        await store.open()
        await store.close()
    assert await _tables(url) == {
        "chute_schema_version", "chute_streams", "chute_records", "chute_checkpoints", "chute_snapshot_parts",
        "chute_cluster", "chute_nodes", "chute_shards", "chute_placement",  # version 2: the cluster
        "chute_users",  # version 3: the cluster's users
        "chute_consumers",  # version 4: every node's AMQP consumers
    }  # fmt: skip
    async with connected(url) as connection:
        versions = await connection.fetch("SELECT version FROM chute_schema_version ORDER BY version")
        assert [tuple(r) for r in versions] == [(v,) for v in range(1, SCHEMA_VERSION + 1)]  # one per migration


async def test_a_newer_schema_is_refused_and_left_untouched(postgres_url):
    url = await fresh_database(postgres_url)
    store = PostgresStore(url, stream="a")
    await store.open()
    await store.close()
    async with connected(url) as connection:
        await connection.execute("INSERT INTO chute_schema_version (version) VALUES ($1)", SCHEMA_VERSION + 1)
    with pytest.raises(StorageFailed, match=f"schema is version {SCHEMA_VERSION + 1}, newer than .*upgrade Chute"):
        await PostgresStore(url, stream="b").open()
    async with connected(url) as connection:
        assert await connection.fetchval("SELECT count(*) FROM chute_streams WHERE name = 'b'") == 0


async def test_a_database_that_is_not_chutes_is_refused_and_left_untouched(postgres_url):
    url = await fresh_database(postgres_url)
    async with connected(url) as connection:
        await connection.execute("CREATE TABLE chute_records (id int)")
    with pytest.raises(StorageFailed, match="has tables chute_records but no chute_schema_version: it is not a Chute"):
        await PostgresStore(url, stream="a").open()
    assert await _tables(url) == {"chute_records"}


async def test_other_applications_tables_are_left_alone(postgres_url):
    url = await fresh_database(postgres_url)
    async with connected(url) as connection:
        await connection.execute("CREATE TABLE orders (id int)")
    store = PostgresStore(url, stream="a")
    await store.open()
    await store.close()
    assert "orders" in await _tables(url)


async def test_bad_urls_and_names_are_clear_errors_without_the_password(postgres_url):
    with pytest.raises(InvalidArgument, match="starts with postgresql://"):
        PostgresStore("mysql://u:secret@h/db")
    with pytest.raises(InvalidArgument, match="stream"):
        PostgresStore(postgres_url, stream="")
    missing = postgres_url.rsplit("/", 1)[0].replace("postgres@", "postgres:hunter2@") + "/no_such_database"
    with pytest.raises(StorageFailed, match="no_such_database") as failure:
        await PostgresStore(missing, stream="a").open()
    assert "hunter2" not in str(failure.value)
    with pytest.raises(StorageFailed, match="127.0.0.1:1/"):
        await PostgresStore("postgresql://postgres:hunter2@127.0.0.1:1/postgres", stream="a").open()


async def test_dead_chunks_are_deleted_by_the_checkpoint_that_covers_them(postgres_url):
    stream = unique_name("space")
    store = PostgresStore(postgres_url, stream=stream, chunk_max_bytes=1000)
    await store.open()
    refs, token = store.append([(1, b"z" * 300) for _ in range(40)])  # 2 records (with row costs) per chunk
    await token
    for ref in refs:
        store.track(ref)
    before = store.stats().segments
    assert before > 10
    for ref in refs[:-1]:
        store.release(ref)
    await store.checkpoint(b"S")
    assert store.stats().segments == 1  # the last record's chunk, still the active one
    assert await stored_payloads(postgres_url, stream) == [b"z" * 300] * 2  # the live one and its chunk's other
    assert await store.read([refs[-1]]) == [b"z" * 300]
    await store.close()
    reopened = PostgresStore(postgres_url, stream=stream)
    recovered = await reopened.open()
    assert recovered.snapshot == b"S" and list(recovered.records) == []
    reopened.track(refs[-1])
    assert await reopened.read([refs[-1]]) == [b"z" * 300]
    await reopened.close()


async def test_sparse_chunks_are_named_for_compaction(postgres_url):
    store = PostgresStore(postgres_url, stream=unique_name("space"), chunk_max_bytes=4000)
    await store.open()
    refs, token = store.append([(1, b"z" * 300) for _ in range(40)])
    await token
    for ref in refs:
        store.track(ref)
    first_chunk = [r for r in refs if r >> 32 == refs[0] >> 32]
    assert len(first_chunk) >= 8
    for ref in first_chunk[1:]:
        store.release(ref)
    await store.checkpoint(b"S")
    sparse = store.sparse_segments()
    assert sparse(first_chunk[0]) and not sparse(refs[-1])
    await store.close()


async def test_a_snapshot_in_many_parts_and_a_group_in_many_statements(postgres_url, monkeypatch):
    monkeypatch.setattr(database, "SNAPSHOT_PART_BYTES", 1000)
    monkeypatch.setattr(database, "STATEMENT_MAX_BYTES", 5000)
    stream = unique_name("parts")
    store = PostgresStore(postgres_url, stream=stream)
    await store.open()
    snapshot = bytes(range(256)) * 40  # 10,240 bytes: 11 parts
    await store.checkpoint(snapshot)
    payloads = [bytes([i]) * 700 for i in range(30)]  # 21,000 bytes: one transaction of 5 statements
    _, token = store.append([(2, p) for p in payloads])
    await token
    await store.close()
    reopened = PostgresStore(postgres_url, stream=stream)
    recovered = await reopened.open()
    assert recovered.snapshot == snapshot
    assert [p for _, _, p in recovered.records] == payloads
    await reopened.close()


async def test_a_snapshot_in_pieces_is_stored_as_they_are_and_recovered_whole(postgres_url, monkeypatch):
    """A forked checkpoint hands its snapshot over in pieces (the image, then its tail's buffers): the store keeps
    each piece as parts of its own (never joined into one value on the event loop) and a reopen recovers the same
    bytes as one snapshot, with the same size and CRC as the bytes given whole."""
    monkeypatch.setattr(database, "SNAPSHOT_PART_BYTES", 1000)
    stream = unique_name("pieces")
    pieces = [bytes(range(250)) * 10, bytearray(b"tail-1" * 2), memoryview(b"tail-2" * 200), b""]
    whole = b"".join(pieces)  # 2,500 + 12 + 1,200 bytes
    store = PostgresStore(postgres_url, stream=stream)
    await store.open()
    await store.checkpoint(pieces)
    assert store.stats().checkpoint_file_bytes == len(whole)
    await store.close()
    async with connected(postgres_url) as connection:
        sizes = await connection.fetch(
            "SELECT length(p.data) FROM chute_snapshot_parts p JOIN chute_streams s ON s.id = p.stream_id "
            "WHERE s.name = $1 ORDER BY p.part",
            stream,
        )
        stored = await connection.fetchrow(
            "SELECT c.snapshot_bytes, c.snapshot_crc32 FROM chute_checkpoints c JOIN chute_streams s "
            "ON s.id = c.stream_id WHERE s.name = $1",
            stream,
        )
    assert [row[0] for row in sizes] == [1000, 1000, 500, 12, 1000, 200]  # each piece cut at the part size
    assert tuple(stored) == (len(whole), zlib.crc32(whole))
    reopened = PostgresStore(postgres_url, stream=stream)
    assert (await reopened.open()).snapshot == whole
    await reopened.close()


async def test_a_missing_snapshot_part_is_reported_not_skipped(postgres_url, monkeypatch):
    monkeypatch.setattr(database, "SNAPSHOT_PART_BYTES", 1000)
    stream = unique_name("parts")
    store = PostgresStore(postgres_url, stream=stream)
    await store.open()
    await store.checkpoint(b"s" * 5000)
    await store.close()
    async with connected(postgres_url) as connection:
        await connection.execute(
            "DELETE FROM chute_snapshot_parts p USING chute_streams s WHERE s.id = p.stream_id AND s.name = $1 "
            "AND p.part = 2",
            stream,
        )
    with pytest.raises(StorageCorrupt, match="4 of 5 snapshot parts"):
        await PostgresStore(postgres_url, stream=stream).open()


@pytest.mark.parametrize(("policy", "server", "session"), [("always", "off", "on"), ("always", "remote_apply",
                         "remote_apply"), ("interval", "on", "off"), ("never", "on", "off")])  # fmt: skip
async def test_the_fsync_policy_sets_what_a_commit_waits_for(postgres_url, policy, server, session):
    """`always`: a confirm means flushed (never below `on`; a stronger server setting, such as waiting for a
    standby, is kept); `interval` / `never`: commits return before the WAL flush."""
    url = await fresh_database(postgres_url)
    async with connected(url) as connection:
        await connection.execute(f"ALTER DATABASE {url.rsplit('/', 1)[1]} SET synchronous_commit = {server}")
    store = PostgresStore(url, stream="a", fsync_policy=policy)
    await store.open()
    assert await store._call(store._db.writer.fetchval("SHOW synchronous_commit")) == session
    await store.close()


async def test_lazy_records_go_with_the_next_group_or_soon_after(postgres_url):
    """Delivery counts (appended lazily) cost no commit of their own when a group follows, and are committed
    within LAZY_FLUSH_S when none does; their order with other records is kept."""
    stream = unique_name("lazy")
    store = PostgresStore(postgres_url, stream=stream)
    await store.open()
    store.append_lazy([(7, b"count 1")])
    _, token = store.append([(1, b"message")])
    await token
    assert store.stats().fsyncs == 1  # one commit for both
    store.append_lazy([(7, b"count 2")])
    for _ in range(500):  # the lazy timer's commit (awaited by polling the store's own counter)
        if store.stats().fsyncs == 2:
            break
        await asyncio.sleep(0.01)
    assert await stored_payloads(postgres_url, stream) == [b"count 1", b"message", b"count 2"]
    await store.close()
