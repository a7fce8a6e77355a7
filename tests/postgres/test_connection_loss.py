"""Losing the database: a group whose commit did not happen, or whose outcome is unknown, is never confirmed.

Connections are cut for real: the server kills the store's backend (pg_terminate_backend), or the whole server
stops as in a crash (SIGQUIT) and starts again. A group is held "in flight" by a row lock that a side connection
holds on the primary key the group inserts, so the cut lands while the statement runs."""

from __future__ import annotations

import asyncio

import pytest

from chute.errors import StorageFailed, StorageReadOnly
from chute.storage.postgres import PostgresStore
from tests.postgres.helpers import connected, wait_for_lock_waiters
from tests.postgres.server import PostgresServer, bin_dir, unique_name


async def _hold_next_ref(connection, store: PostgresStore):
    """Start a transaction on `connection` that inserts the row the store's next record will be: the store's next
    group then waits inside its statement until the transaction ends. Returns the transaction."""
    transaction = connection.transaction()
    await transaction.start()
    ref = store._active << 32 | store._next_index
    await connection.execute(
        "INSERT INTO chute_records (stream_id, ref, kind, payload) VALUES ($1, $2, 1, 'x')", store._db.stream_id, ref
    )
    return transaction


async def _recovered_payloads(url: str, stream: str) -> list[bytes]:
    store = PostgresStore(url, stream=stream)
    recovered = await store.open()
    payloads = [payload for _, _, payload in recovered.records]
    await store.close()
    return payloads


async def test_a_group_whose_backend_is_killed_mid_statement_is_not_confirmed(postgres_url):
    stream = unique_name("loss")
    store = PostgresStore(postgres_url, stream=stream)
    await store.open()
    _, token = store.append([(1, b"confirmed")])
    await token
    writer_pid = (await store.backend_pids())[0]
    async with connected(postgres_url) as side:
        held = await _hold_next_ref(side, store)
        _, in_flight = store.append([(1, b"cut off 1"), (1, b"cut off 2")])
        await wait_for_lock_waiters(side, 1)
        assert await side.fetchval("SELECT pg_terminate_backend($1)", writer_pid)
        with pytest.raises(StorageFailed, match="lost during a group commit of 2 record.*outcome is unknown"):
            await in_flight
        assert store.read_only and store.stats().read_only
        with pytest.raises(StorageReadOnly, match="outcome is unknown"):
            store.append([(1, b"later")])
        await held.rollback()
    await store.close()
    assert await _recovered_payloads(postgres_url, stream) == [b"confirmed"]  # the cut statement rolled back


async def test_an_idle_connection_killed_fails_the_next_group_and_loses_nothing_confirmed(postgres_url):
    stream = unique_name("loss")
    store = PostgresStore(postgres_url, stream=stream)
    await store.open()
    _, token = store.append([(1, b"one"), (1, b"two")])
    await token
    async with connected(postgres_url) as side:
        await side.fetchval("SELECT pg_terminate_backend($1)", (await store.backend_pids())[0])
    _, token = store.append([(1, b"three")])
    with pytest.raises(StorageFailed, match=r"connection to PostgreSQL at 127\.0\.0\.1:\d+/postgres lost"):
        await token
    assert store.read_only
    await store.close()
    recovered = await _recovered_payloads(postgres_url, stream)
    assert recovered[:2] == [b"one", b"two"] and len(recovered) == 2


async def test_reads_survive_a_killed_reader_connection(postgres_url):
    store = PostgresStore(postgres_url, stream=unique_name("loss"), cache_max_bytes=0)  # every read asks the database
    await store.open()
    refs, token = store.append([(1, b"a"), (1, b"b")])
    await token
    assert await store.read(refs) == [b"a", b"b"]
    reader_pid = (await store.backend_pids())[-1]
    async with connected(postgres_url) as side:
        assert await side.fetchval("SELECT application_name FROM pg_stat_activity WHERE pid = $1", reader_pid) == (
            f"chute:{store.stream}"
        )
        await side.fetchval("SELECT pg_terminate_backend($1)", reader_pid)
    assert await store.read(refs[::-1]) == [b"b", b"a"]  # reconnected once: reads change nothing
    assert not store.read_only
    await store.close()


@pytest.fixture(scope="module")
def private_server():
    """A PostgreSQL of this module's own, which the tests stop and start; it asks for a password over TCP."""
    if bin_dir() is None:
        pytest.skip("PostgreSQL is not installed")
    server = PostgresServer(password="s3cret-pw").start()
    yield server
    server.destroy()


async def test_postgres_crashing_mid_group_loses_nothing_confirmed_and_a_reopen_recovers(private_server):
    url, stream = private_server.url, unique_name("crash")
    store = PostgresStore(url, stream=stream)
    await store.open()
    _, token = store.append([(1, b"confirmed %d" % i) for i in range(100)])
    await token
    async with connected(url) as side:
        await _hold_next_ref(side, store)
        _, in_flight = store.append([(1, b"in flight")])
        await wait_for_lock_waiters(side, 1)
        private_server.stop(mode="immediate")  # SIGQUIT: every backend dies at once, no checkpoint (a crash)
        with pytest.raises(StorageFailed, match="outcome is unknown"):
            await in_flight
    assert store.read_only
    await store.close()
    private_server.start()  # crash recovery replays the WAL: every commit confirmed before is there
    recovered = await _recovered_payloads(url, stream)
    assert recovered == [b"confirmed %d" % i for i in range(100)]


async def test_opening_while_postgres_is_down_is_one_clear_error(private_server):
    store = PostgresStore(private_server.url, stream=unique_name("down"), connect_timeout_s=5)
    private_server.stop()
    try:
        with pytest.raises(StorageFailed, match=r"cannot open stream .* in PostgreSQL at 127\.0\.0\.1:\d+/postgres"):
            await store.open()
        with pytest.raises(StorageReadOnly):
            store.append([(1, b"x")])
    finally:
        private_server.start()


async def test_a_wrong_password_is_one_clear_error_that_does_not_repeat_it(private_server):
    wrong = private_server.url.replace("s3cret-pw", "hunter2")
    with pytest.raises(StorageFailed, match="password authentication failed") as failure:
        await PostgresStore(wrong, stream="a").open()
    assert "hunter2" not in str(failure.value) and "s3cret" not in str(failure.value)


async def test_a_group_without_an_answer_in_time_fails_unconfirmed(postgres_url):
    """A database that stops answering (a machine gone without closing connections) must not hang publishers."""
    stream = unique_name("loss")
    store = PostgresStore(postgres_url, stream=stream, statement_timeout_s=0.3)
    await store.open()
    _, token = store.append([(1, b"confirmed")])
    await token
    async with connected(postgres_url) as side:
        held = await _hold_next_ref(side, store)
        _, in_flight = store.append([(1, b"never answered")])
        with pytest.raises(StorageFailed, match=r"no answer from PostgreSQL .* within 0.3 s .*outcome is unknown"):
            await in_flight
        assert store.read_only
        # the driver asks the server to cancel the statement; once it is gone the group can never commit (had the
        # lock been released first, it could have: the outcome really is unknown until then)
        await wait_for_lock_waiters(side, 0, at_most=True)
        await held.rollback()
    await store.close()
    assert await _recovered_payloads(postgres_url, stream) == [b"confirmed"]


async def test_concurrent_reads_share_the_reader_connection_one_at_a_time(postgres_url):
    """Two receives reading bodies at once (after a takeover nothing is cached): neither breaks the other."""
    store = PostgresStore(postgres_url, stream=unique_name("reads"), cache_max_bytes=0)
    await store.open()
    refs, token = store.append([(1, b"x%d" % i) for i in range(200)])
    await token
    answers = await asyncio.gather(*(store.read(refs[i::8]) for i in range(8)))
    assert answers == [[b"x%d" % j for j in range(i, 200, 8)] for i in range(8)]
    assert not store.read_only
    await store.close()


async def test_a_connect_cancelled_once_its_socket_is_open_leaves_no_connection(postgres_url, monkeypatch):
    """A connection is set up after its socket opens (the session's synchronous_commit is read). A connect
    cancelled there (a stop, a cancelled checkpoint's side connection) closes the socket: it was left open,
    and found only by the collector."""
    import asyncpg

    from chute.storage.postgres.db import Database

    made: list[asyncpg.Connection] = []
    real = asyncpg.connect

    async def connect_then_cancelled(*args, **kwargs):
        connection = await real(*args, **kwargs)
        made.append(connection)
        asyncio.current_task().cancel()  # lands at the setup's first wait
        return connection

    monkeypatch.setattr(asyncpg, "connect", connect_then_cancelled)
    db = Database(postgres_url, unique_name("cancel"), synchronous_commit=None, connect_timeout_s=10,
                  statement_timeout_s=10)  # fmt: skip
    try:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wrap_future(db.submit(db._connect()))
        assert len(made) == 1 and made[0].is_closed()
    finally:
        await asyncio.to_thread(db.stop)
