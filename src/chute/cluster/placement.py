"""Placement: which shard holds each queue and topic of a cluster (table `chute_placement`).

    chute_placement(name text PRIMARY KEY, kind 'queue' | 'topic', shard integer, placed_at)

Rules (docs/cluster.md, "Placement"):
- queues and topics share one namespace cluster-wide, as they do in one broker: a name has at most one row;
- a new queue or topic goes to `home_shard(name)` (a stable hash: every node computes the same), except a queue
  created *for a subscription*, which goes `near` its topic's shard, so fan-out stays inside one shard;
- the row is written before the object is created in its shard (`place` is idempotent: a second call returns
  the row the first wrote, whoever wrote it), and removed after the object is deleted (`forget`); a row whose
  shard does not hold the object is "not found" for callers (the router checks with the shard);
- a row changes shard only when the router moves an empty queue to the shard of a topic it is subscribed to
  (`move`, conditional on the shard it was at).

Each node caches what it has looked up; a name it does not know
is looked up in the database every time (a queue created through another node is found at once). `forget`
drops the cached row; a node that still has a stale row (the name deleted and placed again elsewhere by another
node) learns it when the shard answers "not found" and the router calls `refresh`. A name deleted through
another node is never forgotten here that way, so the cache is bounded: at most `CACHE_MAX` rows, the
longest-cached dropped first (a dropped row is read again when next used), so queue churn through other nodes
costs a bounded amount of memory, not a row per name ever seen. A lookup whose read was in flight while a row was
dropped (forgotten, uncached, moved or refreshed) does not cache what it read: the read may predate the change,
and a deleted name's row kept that way would outlive its queue (and be used if the name were created again).

`MemoryPlacement` is the in-memory twin (one dict, shared by the nodes of one process): same rules, no database.
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Literal

import msgspec

from chute.errors import InvalidArgument, QueueExists, TopicExists, Unavailable

Kind = Literal["queue", "topic"]
ARRIVING_S = 5.0  # how long a call waits for a name whose row names a shard that does not hold it yet (the row
# is written first: a queue being created, or moved to its topic's shard, is there after one round trip)
CACHE_MAX = 65_536  # rows a node keeps cached (~200 bytes each): beyond it, the longest-cached row is dropped
ARRIVING_POLL_S = 0.05  # while waiting, how often the row is read and the call tried again

# The table, created by the schema migration (storage/postgres/schema.py, version 2) or, on a database from
# before it, by `Placement.start` (IF NOT EXISTS, under the migration's advisory lock).
PLACEMENT_DDL = """
CREATE TABLE IF NOT EXISTS chute_placement (
    name text PRIMARY KEY,
    kind text NOT NULL CHECK (kind IN ('queue', 'topic')),
    shard integer NOT NULL CHECK (shard >= 0),
    placed_at timestamptz NOT NULL DEFAULT now()
);
"""
MIGRATION_LOCK = 0x43487574  # the schema's advisory lock key: table creation never races a migration
QUERY_TIMEOUT_S = 10.0  # a placement query that takes longer means the database is away: unavailable


class Placed(msgspec.Struct, frozen=True):
    """Where one queue or topic lives."""

    name: str
    kind: str
    shard: int


def home_shard(name: str, shards: int) -> int:
    """The shard a new queue or topic goes to: CRC-32 of its UTF-8 name, modulo the shard count (stable across
    processes and versions, unlike Python's `hash`)."""
    return zlib.crc32(name.encode()) % shards


def _check_kind(kind: str) -> None:
    if kind not in ("queue", "topic"):
        raise InvalidArgument(f"kind must be 'queue' or 'topic', got {kind!r}")


def namespace_error(name: str, wanted: str, found: Placed) -> QueueExists | TopicExists:
    """The error of creating `name` as a `wanted` when it exists as the other kind (as one broker says it)."""
    if found.kind == "topic":
        return TopicExists(f"{name!r} is a topic; queues and topics share one namespace")
    return QueueExists(f"{name!r} is a queue; queues and topics share one namespace")


class _Base:
    """What both placements share: the shard count, the cache, the rules of `place`."""

    def __init__(self, shards: int) -> None:
        if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= 4096:
            raise InvalidArgument(f"shards must be an integer from 1 to 4096, got {shards!r}")
        self.shards = shards
        self._cache: dict[str, Placed] = {}
        self._drops = 0  # rows dropped from the cache so far: a read that straddles a drop is not cached

    async def lookup(self, name: str) -> Placed | None:
        """The row of `name` (cached once seen), or None if it is not placed."""
        placed = self._cache.get(name)
        if placed is None:
            drops = self._drops
            placed = await self._read(name)
            # (a row read before a delete and returned after it: the caller gets it, the cache does not keep it)
            if placed is not None and self._drops == drops:
                self._keep(placed)
        return placed

    def _drop(self, name: str) -> None:
        self._drops += 1
        self._cache.pop(name, None)

    def _keep(self, placed: Placed) -> None:
        cache = self._cache
        cache.pop(placed.name, None)  # (re-inserted last: the newest)
        while len(cache) >= CACHE_MAX:
            del cache[next(iter(cache))]  # the longest-cached row
        cache[placed.name] = placed

    async def shard_of(self, name: str, kind: Kind | None = None) -> int | None:
        """The shard of `name` (of that kind, if given), or None."""
        placed = await self.lookup(name)
        if placed is None or (kind is not None and placed.kind != kind):
            return None
        return placed.shard

    async def place(self, name: str, kind: Kind, near: int | None = None) -> Placed:
        """The row for a new `kind` named `name`: written if there is none (in its home shard, or in shard `near`),
        else the existing one. QueueExists / TopicExists if the name is taken by the other kind."""
        _check_kind(kind)
        shard = home_shard(name, self.shards) if near is None else near
        if not 0 <= shard < self.shards:
            raise InvalidArgument(f"shard {shard} out of range 0..{self.shards - 1}")
        placed = self._cache.get(name) or await self._insert(Placed(name, kind, shard))
        self._keep(placed)
        if placed.kind != kind:
            raise namespace_error(name, kind, placed)
        return placed

    async def forget(self, name: str, kind: Kind) -> None:
        """Remove the row of `name` (a deleted queue or topic); nothing if there is none or it is another kind."""
        self._drop(name)
        await self._delete(name, kind)
        self._drop(name)  # (and what a lookup in flight meanwhile kept)

    def uncache(self, name: str) -> None:
        """Drop this node's cached row of `name` only (another node deleted it and removed the row)."""
        self._drop(name)

    async def move(self, name: str, kind: Kind, from_shard: int, to_shard: int) -> bool:
        """Point the row of `name` at `to_shard` if it is at `from_shard` now; True if it was moved. (The router
        moves an empty queue to its topic's shard; other nodes learn it when the old shard says not found.)"""
        self._drop(name)
        moved = await self._move(name, kind, from_shard, to_shard)
        self._drop(name)
        await self.lookup(name)
        return moved

    async def refresh(self, name: str) -> Placed | None:
        """Read the row of `name` again (the cached one may be stale)."""
        self._drop(name)
        return await self.lookup(name)

    async def _read(self, name: str) -> Placed | None:
        raise NotImplementedError

    async def _insert(self, placed: Placed) -> Placed:
        raise NotImplementedError

    async def _delete(self, name: str, kind: str) -> None:
        raise NotImplementedError

    async def _move(self, name: str, kind: str, from_shard: int, to_shard: int) -> bool:
        raise NotImplementedError


class MemoryPlacement(_Base):
    """The in-memory twin: the rows live in `book`, a dict that several nodes of one process may share."""

    def __init__(self, shards: int, book: dict[str, Placed] | None = None) -> None:
        super().__init__(shards)
        self.book = {} if book is None else book

    async def start(self) -> MemoryPlacement:
        return self

    async def close(self) -> None:
        pass

    async def _read(self, name: str) -> Placed | None:
        return self.book.get(name)

    async def _insert(self, placed: Placed) -> Placed:
        return self.book.setdefault(placed.name, placed)

    async def _delete(self, name: str, kind: str) -> None:
        if name in self.book and self.book[name].kind == kind:
            del self.book[name]

    async def _move(self, name: str, kind: str, from_shard: int, to_shard: int) -> bool:
        if self.book.get(name) != Placed(name, kind, from_shard):
            return False
        self.book[name] = Placed(name, kind, to_shard)
        return True


class Placement(_Base):
    """The placement table in PostgreSQL, read and written through a small asyncpg pool on the caller's loop.
    Database errors become Unavailable (retryable): a call that needs placement cannot go on without it."""

    def __init__(self, url: str, shards: int, *, pool=None) -> None:
        super().__init__(shards)
        self.url = url
        self._pool = pool
        self._own_pool = pool is None

    async def start(self) -> Placement:
        """Connect (unless given a pool) and make sure the table exists."""
        if self._pool is None:
            import asyncpg

            self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=4, command_timeout=QUERY_TIMEOUT_S)
        async with self._pool.acquire() as connection, connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await connection.execute(PLACEMENT_DDL)
        return self

    async def close(self) -> None:
        if self._pool is not None and self._own_pool:
            pool, self._pool = self._pool, None
            await pool.close()

    async def _run(self, method: str, query: str, *args):
        if self._pool is None:
            raise Unavailable("placement is not started")
        try:
            async with asyncio.timeout(QUERY_TIMEOUT_S):
                return await getattr(self._pool, method)(query, *args)
        except (OSError, TimeoutError) as exc:
            raise Unavailable(f"the cluster's database cannot be reached for placement: {exc}") from None
        except Exception as exc:  # asyncpg's errors (a lost connection, a server shutting down, ...)
            if type(exc).__module__.startswith("asyncpg"):
                raise Unavailable(f"placement query failed: {type(exc).__name__}: {exc}") from None
            raise

    async def _read(self, name: str) -> Placed | None:
        row = await self._run("fetchrow", "SELECT kind, shard FROM chute_placement WHERE name = $1", name)
        return None if row is None else Placed(name, row["kind"], row["shard"])

    async def _insert(self, placed: Placed) -> Placed:
        row = await self._run(
            "fetchrow",
            "WITH new AS (INSERT INTO chute_placement (name, kind, shard) VALUES ($1, $2, $3) "
            "ON CONFLICT (name) DO NOTHING RETURNING kind, shard) "
            "SELECT kind, shard FROM new UNION ALL SELECT kind, shard FROM chute_placement WHERE name = $1 LIMIT 1",
            placed.name, placed.kind, placed.shard,
        )  # fmt: skip
        if row is None:  # another node's insert committed after this statement's snapshot: read it now
            return await self._read(placed.name) or await self._insert(placed)
        return Placed(placed.name, row["kind"], row["shard"])

    async def _delete(self, name: str, kind: str) -> None:
        await self._run("execute", "DELETE FROM chute_placement WHERE name = $1 AND kind = $2", name, kind)

    async def _move(self, name: str, kind: str, from_shard: int, to_shard: int) -> bool:
        status = await self._run(
            "execute", "UPDATE chute_placement SET shard = $4, placed_at = now() WHERE name = $1 AND kind = $2 "
            "AND shard = $3", name, kind, from_shard, to_shard,
        )  # fmt: skip
        return status == "UPDATE 1"
