"""The one module where the PostgreSQL store talks to PostgreSQL: a thread with its own event loop and three
asyncpg connections, and every SQL statement the store runs.

Why a thread: the broker's loop must never wait on the database, recovery hands the core a plain iterator of
records (consumed in a worker thread, or on the loop by tests), and a checkpoint must not hold up group commits.
So, like the file store's writer thread, the database work runs beside the broker: `submit(coro)` schedules a
coroutine of this class on the database loop and returns a concurrent future.

Connections (each with application_name `chute:<stream>`):
- `writer`  — group commits (one statement, or one transaction, per group, never more than one at a time),
  the clean-shutdown flag, taking the stream at open and the replay after it (nothing is appended before the
  replay ends);
- `checkpointer` — checkpoint transactions (snapshot parts, deletion of dead chunks), beside group commits;
- `reader`  — reads of bodies; reconnected once if it breaks (reads change nothing).
The last two connect on first use.

Fencing: every write carries the epoch this store took at open, checked in the same statement or transaction:
`SELECT 1 FROM chute_streams WHERE id = $1 AND epoch = $2 FOR SHARE`. A takeover (`open` by another store)
updates the stream row under FOR UPDATE, so it waits for writes in flight (share locks) to end, and every write
that starts after it re-checks the new row version and finds another epoch: it writes nothing (`Fenced`).

Every statement that a group commit or a read sends has a timeout (`statement_timeout_s`): a database that stops
answering fails it instead of hanging its callers.

Tests cut connections here (`sever`: every socket closed at once, as when the process dies) and kill backends
from the server side (pg_terminate_backend on `backend_pids()`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import socket
import struct
import threading
import zlib
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field

import asyncpg

from chute.storage.postgres.schema import migrate

SNAPSHOT_PART_BYTES = 8 * 2**20  # a snapshot is stored in parts: no single value near PostgreSQL's 1 GB limit
STATEMENT_MAX_BYTES = 16 * 2**20  # a group larger than this is inserted by several statements in one transaction
STOP_WAIT_S = 5.0  # at stop, how long statements already sent may take to end before they are cancelled
IDLE_IN_TRANSACTION_S = 30  # the server ends a transaction of ours left idle this long (a client cut off)

CHECK_EPOCH = "SELECT 1 FROM chute_streams WHERE id = $1 AND epoch = $2 FOR SHARE"
INSERT_GROUP = """
INSERT INTO chute_records (stream_id, ref, kind, payload)
SELECT $1, r.ref, r.kind, r.payload FROM unnest($3::bigint[], $4::smallint[], $5::bytea[]) AS r(ref, kind, payload)
WHERE EXISTS (SELECT 1 FROM chute_streams WHERE id = $1 AND epoch = $2 FOR SHARE)
"""
READ = "SELECT ref, payload FROM chute_records WHERE stream_id = $1 AND ref = ANY($2::bigint[])"
REPLAY = """
SELECT ref, kind, payload FROM chute_records WHERE stream_id = $1 AND ref >= $2 ORDER BY ref LIMIT $3
"""
DELETE_RANGE = "DELETE FROM chute_records WHERE stream_id = $1 AND ref >= $2 AND ref < $3"
STORE_CHECKPOINT = """
INSERT INTO chute_checkpoints (stream_id, generation, position, chunk_table, snapshot_bytes, snapshot_parts,
                               snapshot_crc32)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (stream_id) DO UPDATE SET generation = EXCLUDED.generation, position = EXCLUDED.position,
    chunk_table = EXCLUDED.chunk_table, snapshot_bytes = EXCLUDED.snapshot_bytes,
    snapshot_parts = EXCLUDED.snapshot_parts, snapshot_crc32 = EXCLUDED.snapshot_crc32, stored_at = now()
"""
CHUNK_ENTRY = struct.Struct("<QQQ")  # a chunk table entry: chunk id, records, bytes (little-endian u64s)


class Fenced(Exception):
    """The stream's epoch moved on: another store opened it; this one must never write again."""


class Stopped(Exception):
    """The store stopped its database thread: nothing more is sent. `sent`: the statement had been sent (and
    was cut off, so its outcome is unknown) rather than refused before sending."""

    def __init__(self, message: str, *, sent: bool = False) -> None:
        super().__init__(message)
        self.sent = sent


class Corrupt(Exception):
    """Stored data does not add up (a missing snapshot part, a CRC mismatch, a missing record)."""


@dataclass
class Checkpoint:
    """The stored checkpoint of a stream, as `open` finds it."""

    generation: int = 0
    position: int = 0
    chunks: dict[int, tuple[int, int]] = field(default_factory=dict)  # chunk -> (records, bytes) before position
    snapshot: bytes | None = None


@dataclass
class Opened:
    """What `open` found: the stream's id, the epoch now ours, the latest checkpoint, the highest ref, and how
    the previous owner left it."""

    stream_id: int
    epoch: int
    checkpoint: Checkpoint
    max_ref: int
    clean: bool
    previous_owner: str | None


class Database:
    """The database side of one PostgresStore. Coroutines run on its own loop, through `submit`."""

    def __init__(
        self, url: str, stream: str, *, synchronous_commit: str | None, connect_timeout_s: float,
        statement_timeout_s: float,
    ) -> None:  # fmt: skip
        self.url = url
        self.stream = stream
        self.synchronous_commit = synchronous_commit  # None: the server's own setting
        self.connect_timeout_s = connect_timeout_s
        self.statement_timeout_s = statement_timeout_s  # a group or a read without an answer by then has failed
        self.owner = f"{socket.gethostname()} pid {os.getpid()}"
        self.stream_id = 0
        self.epoch = 0
        self.writer: asyncpg.Connection | None = None
        self.checkpointer: asyncpg.Connection | None = None
        self.reader: asyncpg.Connection | None = None
        self._connecting = asyncio.Lock()
        # one read at a time on the reader connection: asyncpg refuses a second operation on a busy connection,
        # and the retry below would then cut the first read's connection (two receives of bodies not cached,
        # as after a takeover, broke each other)
        self._reading = asyncio.Lock()
        self._submitting = threading.Lock()
        self._stopping = False
        # asyncio's own loop, not uvloop: closing a uvloop loop from the thread that stopped it runs libuv again,
        # and after a severed connection that was seen to wait forever (1 in a few thousand power cuts)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=f"chute-pg-{stream}", daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine) -> concurrent.futures.Future:
        """Run `coro` on the database loop; its result or exception comes back in the returned future. Raises
        Stopped (closing `coro`) once `stop` has begun."""
        with self._submitting:
            if self._stopping:
                coro.close()
                raise Stopped(f"the connections of stream {self.stream!r} are closed")
            return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine):
        """Run `coro` on the database loop and wait for it (from any thread but the database loop's)."""
        return self.submit(coro).result()

    # -- connections ------------------------------------------------------------------------------------------

    async def _connect(self) -> asyncpg.Connection:
        settings = {"application_name": f"chute:{self.stream}"[:63],
                    "idle_in_transaction_session_timeout": f"{IDLE_IN_TRANSACTION_S}s"}  # fmt: skip
        if self.synchronous_commit is not None:
            settings["synchronous_commit"] = self.synchronous_commit
        connection = await asyncpg.connect(self.url, timeout=self.connect_timeout_s, server_settings=settings)
        try:
            if self.synchronous_commit is None and await connection.fetchval("SHOW synchronous_commit") == "off":
                # the server confirms commits before they are durable: under the `always` policy a confirm must
                # mean committed and flushed, so this session asks for at least a local flush
                await connection.execute("SET synchronous_commit = on")
        except BaseException:  # failed or cancelled (a stop, a cancelled checkpoint): no one else will close it
            connection.terminate()
            raise
        return connection

    async def _side(self, name: str) -> asyncpg.Connection:
        """The `checkpointer` or `reader` connection, connected on first use (once, however many ask)."""
        async with self._connecting:
            if getattr(self, name) is None:
                setattr(self, name, await self._connect())
        return getattr(self, name)

    def connections(self) -> list[asyncpg.Connection]:
        return [c for c in (self.writer, self.checkpointer, self.reader) if c is not None]

    async def backend_pids(self) -> list[int]:
        """The server process ids of this store's connections (tests kill them with pg_terminate_backend)."""
        return [c.get_server_pid() for c in self.connections()]

    # -- open -------------------------------------------------------------------------------------------------

    async def open(self) -> Opened:
        """Connect, migrate the schema, take the stream (a new epoch: from now on only we may write it) and load
        its checkpoint. Waits for writes in flight of a previous owner to end."""
        self.writer = await self._connect()  # the others connect on first use: most opens are followed by
        await migrate(self.writer)  # appends long before any read misses the cache or any checkpoint
        connection = self.writer
        async with connection.transaction():
            row = await connection.fetchrow(
                "SELECT id, epoch, owner, clean FROM chute_streams WHERE name = $1 FOR UPDATE", self.stream
            )
            if row is None:
                await connection.execute(
                    "INSERT INTO chute_streams (name, epoch, owner) VALUES ($1, 0, $2) ON CONFLICT DO NOTHING",
                    self.stream, self.owner,
                )  # fmt: skip
                row = await connection.fetchrow(
                    "SELECT id, epoch, NULL AS owner, false AS clean FROM chute_streams WHERE name = $1 FOR UPDATE",
                    self.stream,
                )  # fmt: skip
            self.stream_id, self.epoch = row["id"], row["epoch"] + 1
            await connection.execute(
                "UPDATE chute_streams SET epoch = $2, owner = $3, opened_at = now(), clean = false WHERE id = $1",
                self.stream_id, self.epoch, self.owner,
            )  # fmt: skip
            checkpoint = await self._load_checkpoint(connection)
            max_ref = await connection.fetchval(
                "SELECT max(ref) FROM chute_records WHERE stream_id = $1", self.stream_id
            )
        return Opened(self.stream_id, self.epoch, checkpoint, max_ref or 0, row["clean"], row["owner"])

    async def _load_checkpoint(self, connection: asyncpg.Connection) -> Checkpoint:
        row = await connection.fetchrow("SELECT * FROM chute_checkpoints WHERE stream_id = $1", self.stream_id)
        if row is None:
            return Checkpoint()
        parts = await connection.fetch(
            "SELECT part, data FROM chute_snapshot_parts WHERE stream_id = $1 AND generation = $2 ORDER BY part",
            self.stream_id, row["generation"],
        )  # fmt: skip
        snapshot = b"".join(part["data"] for part in parts)
        where = f"stream {self.stream!r} checkpoint generation {row['generation']}"
        if [part["part"] for part in parts] != list(range(row["snapshot_parts"])):
            raise Corrupt(f"{where}: {len(parts)} of {row['snapshot_parts']} snapshot parts present")
        if len(snapshot) != row["snapshot_bytes"] or zlib.crc32(snapshot) != row["snapshot_crc32"]:
            raise Corrupt(f"{where}: the snapshot fails its length or CRC-32")
        table = row["chunk_table"]
        if len(table) % CHUNK_ENTRY.size:
            raise Corrupt(f"{where}: the chunk table is {len(table)} bytes, not a multiple of {CHUNK_ENTRY.size}")
        chunks = {chunk: (records, size) for chunk, records, size in CHUNK_ENTRY.iter_unpack(table)}
        return Checkpoint(row["generation"], row["position"], chunks, snapshot)

    async def replay(self, after: int, limit: int) -> list[tuple[int, int, bytes]]:
        """The next `limit` records (ref, kind, payload) from ref `after` on, in ref order."""
        rows = await self.writer.fetch(REPLAY, self.stream_id, after, limit)  # nothing is appended before
        return [(row[0], row[1], row[2]) for row in rows]

    # -- writes -----------------------------------------------------------------------------------------------

    async def insert(self, refs: list[int], kinds: list[int], payloads: list[bytes], size: int) -> None:
        """Commit one group: all of it, checked against our epoch, or nothing (Fenced, or the driver's error)."""
        connection = self.writer
        if size <= STATEMENT_MAX_BYTES:
            status = await connection.execute(
                INSERT_GROUP, self.stream_id, self.epoch, refs, kinds, payloads, timeout=self.statement_timeout_s
            )
            if _rows(status) != len(refs):
                raise Fenced(await self._fenced_by(connection))
            return
        async with connection.transaction():
            start = 0
            while start < len(refs):
                end, taken = start, 0
                while end < len(refs) and (end == start or taken + len(payloads[end]) <= STATEMENT_MAX_BYTES):
                    taken += len(payloads[end])
                    end += 1
                status = await connection.execute(
                    INSERT_GROUP, self.stream_id, self.epoch, refs[start:end], kinds[start:end], payloads[start:end],
                    timeout=self.statement_timeout_s,
                )  # fmt: skip
                if _rows(status) != end - start:
                    raise Fenced(await self._fenced_by(connection))
                start = end

    async def _fenced_by(self, connection: asyncpg.Connection) -> str:
        """Who holds the stream now (for the error message)."""
        row = await connection.fetchrow("SELECT epoch, owner FROM chute_streams WHERE id = $1", self.stream_id)
        now = f"epoch {row['epoch']}, opened by {row['owner']}" if row else "the stream row is gone"
        return f"stream {self.stream!r} was taken over ({now}; ours was epoch {self.epoch})"

    async def store_checkpoint(
        self, generation: int, position: int, chunks: dict[int, tuple[int, int]],
        snapshot: Sequence[bytes | bytearray | memoryview], dead: Sequence[tuple[int, int]],
    ) -> None:  # fmt: skip
        """In one transaction checked against our epoch: store the snapshot of `generation` for `position`,
        forget older generations, delete the records of the dead ref ranges [low, high).

        The snapshot comes in pieces (one, or a forked checkpoint's image and its tail's buffers) and is never
        joined: each piece is stored as parts of at most SNAPSHOT_PART_BYTES (views, not copies), and its CRC is
        chained over them (zlib computes it without the GIL), so the event loop is not held by a copy of it."""
        connection = await self._side("checkpointer")
        parts, crc, size = [], 0, 0
        for piece in snapshot:
            view = memoryview(piece).cast("B")
            parts += [view[i : i + SNAPSHOT_PART_BYTES] for i in range(0, len(view), SNAPSHOT_PART_BYTES)]
            crc, size = zlib.crc32(view, crc), size + len(view)
        async with connection.transaction():
            if await connection.fetchval(CHECK_EPOCH, self.stream_id, self.epoch) is None:
                raise Fenced(await self._fenced_by(connection))
            await connection.copy_records_to_table(
                "chute_snapshot_parts", columns=["stream_id", "generation", "part", "data"],
                records=[(self.stream_id, generation, i, part) for i, part in enumerate(parts)],
            )  # fmt: skip
            table = b"".join(CHUNK_ENTRY.pack(chunk, *chunks[chunk]) for chunk in sorted(chunks))
            await connection.execute(
                STORE_CHECKPOINT, self.stream_id, generation, position, table, size, len(parts), crc
            )
            await connection.execute(
                "DELETE FROM chute_snapshot_parts WHERE stream_id = $1 AND generation <> $2",
                self.stream_id, generation,
            )  # fmt: skip
            if dead:  # one statement per range of consecutive chunks, all sent at once
                await connection.executemany(DELETE_RANGE, [(self.stream_id, low, high) for low, high in dead])

    async def mark_clean(self) -> None:
        """Note a clean shutdown (reported by the next open), if the stream is still ours."""
        await self.writer.execute(
            "UPDATE chute_streams SET clean = true WHERE id = $1 AND epoch = $2", self.stream_id, self.epoch
        )

    # -- reads ------------------------------------------------------------------------------------------------

    async def read(self, refs: list[int]) -> dict[int, bytes]:
        """The payloads of `refs` that exist. The reader connection is opened again once if it broke. Reads take
        turns on that connection."""
        async with self._reading:
            try:
                rows = await (await self._side("reader")).fetch(
                    READ, self.stream_id, refs, timeout=self.statement_timeout_s
                )
            except Exception:  # a broken connection shows in many ways (a server-side kill: often a protocol state)
                with contextlib.suppress(Exception):
                    self.reader.terminate()
                self.reader = await self._connect()
                rows = await self.reader.fetch(READ, self.stream_id, refs, timeout=self.statement_timeout_s)
        return {row[0]: row[1] for row in rows}

    # -- end --------------------------------------------------------------------------------------------------

    async def close_connections(self) -> None:
        for connection in self.connections():
            try:
                await asyncio.wait_for(connection.close(), timeout=5)
            except Exception:
                connection.terminate()
        self.writer = self.checkpointer = self.reader = None

    async def sever_connections(self) -> None:
        """Close every socket at once, without a goodbye: what the server sees when the process dies."""
        for connection in self.connections():
            connection.terminate()
        self.writer = self.checkpointer = self.reader = None

    def stop(self, *, sever: bool = False) -> None:
        """Close (or sever) the connections, let what was sent end (it fails fast without a connection; after
        STOP_WAIT_S it is cancelled) and end the thread. Idempotent; not from the database loop."""
        with self._submitting:
            if self._stopping:
                return
            self._stopping = True  # from now on nothing new is submitted
        finish = asyncio.run_coroutine_threadsafe(self._finish(sever), self.loop)
        with contextlib.suppress(Exception):
            finish.result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()

    async def _finish(self, sever: bool) -> None:
        await (self.sever_connections() if sever else self.close_connections())
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        if others:
            _, late = await asyncio.wait(others, timeout=STOP_WAIT_S)
            for task in late:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
        if self.connections():  # made meanwhile (a side connection was being connected when the stop began)
            await (self.sever_connections() if sever else self.close_connections())
        for _ in range(3):  # the transports' connection_lost callbacks (which close the sockets) run before the stop
            await asyncio.sleep(0)


def _rows(status: str) -> int:
    """The row count of a command status such as 'INSERT 0 100'."""
    return int(status.rsplit(" ", 1)[-1])
