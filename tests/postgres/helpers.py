"""Helpers of the PostgreSQL store's tests: a look at the database from the side."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import asyncpg


@contextlib.asynccontextmanager
async def connected(url: str):
    connection = await asyncpg.connect(url)
    try:
        yield connection
    finally:
        await connection.close()


async def wait_for_lock_waiters(connection, count: int, *, at_most: bool = False) -> None:
    """Until `count` backends (or, `at_most`, no more than `count`) wait for a lock (polled: PostgreSQL offers
    nothing to wait on for this)."""
    for _ in range(2000):
        await connection.execute("SELECT pg_stat_clear_snapshot()")  # else a transaction sees its first look again
        waiting = await connection.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
        if waiting <= count if at_most else waiting >= count:
            return
        await asyncio.sleep(0.01)
    activity = await connection.fetch("SELECT state, wait_event_type, wait_event, query FROM pg_stat_activity")
    raise AssertionError(f"fewer than {count} backends ever waited for a lock: {[dict(a) for a in activity]}")


async def stored_payloads(url: str, stream: str) -> list[bytes]:
    """The payloads stored for `stream`, in ref order."""
    async with connected(url) as connection:
        rows = await connection.fetch(
            "SELECT payload FROM chute_records r JOIN chute_streams s ON s.id = r.stream_id WHERE s.name = $1 "
            "ORDER BY ref",
            stream,
        )
    return [row[0] for row in rows]


async def fresh_database(url: str) -> str:
    """A new, empty database on the server of `url`; returns its URL."""
    name = f"chute_test_{uuid.uuid4().hex[:10]}"
    async with connected(url) as connection:
        await connection.execute(f'CREATE DATABASE "{name}"')
    return url.rsplit("/", 1)[0] + f"/{name}"
