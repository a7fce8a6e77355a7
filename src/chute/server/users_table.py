"""The users of a cluster, kept in its PostgreSQL database (table `chute_users`) instead of a node's users file.

Every node of a cluster (`chute serve --store URL`) reads the same users, passwords, API tokens and SQS access
keys, so a client signs in on any node; `chute user ... --store URL` edits them (docs/security.md,
docs/cluster.md). The document is the users file's own JSON (server/users.py, `UsersDocument`), one row with a
version number bumped by every edit, so a node's recheck costs one tiny query a second and a reload only after a
change.

`UsersTable` has the interface of `UsersFile` (users, generation, error, exists, due, refresh, load, edit, save):
the server's Authenticator and the CLI take either. The first connection brings the schema up to date (a `chute
user add --store URL` may come before any node started). Its methods block (they run their own event loop, with one
connection kept between calls), as the file's do: the server calls them in a worker thread, the CLI directly.

Invariants:
- an edit is a transaction that locks the row (`FOR UPDATE`), so two concurrent edits never lose one another's
  change; what is stored always passed `check_users`;
- a refresh that fails (database away, malformed document) keeps the users already known and records `error`:
  a node that cannot reach its database goes on signing in the users it knew;
- one call at a time per object (the Authenticator refreshes one at a time; the CLI is single-threaded).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

import msgspec

from chute.errors import InvalidArgument
from chute.server.users import User, UsersDocument, check_users, decode_users

CONNECT_TIMEOUT_S = 10.0
STATEMENT_TIMEOUT_S = 10.0


class UsersTable:
    """The `chute_users` row of the cluster database at `url` (the schema is made by the cluster's migrations)."""

    RECHECK_S = 1.0

    def __init__(self, url: str) -> None:
        from chute.storage.postgres.url import describe

        self.url = url
        self.where = f"chute_users in PostgreSQL at {describe(url)}"
        self.path = self.where  # what messages name (UsersFile's `path`)
        self.users: list[User] = []
        self.generation = 0
        self.error: str | None = None
        self.exists = False  # a users document is stored (even listing nobody: auth stays on)
        self._version: int | None = None
        self._checked_at = -1e9
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connection = None

    # -- the UsersFile interface --------------------------------------------------------------------------

    def due(self, now: float, every_s: float | None = None) -> bool:
        return now - self._checked_at >= (self.RECHECK_S if every_s is None else every_s)

    def refresh(self, now: float | None = None) -> bool:
        """Re-read the users if their version changed. True if the users changed. A failure keeps the users
        known and records `error`."""
        self._checked_at = time.monotonic() if now is None else now
        try:
            version, document = self._run(self._fetch(with_document=False))
            if version == self._version:
                return False
            version, document = self._run(self._fetch(with_document=True))
            users = decode_users(document, self.where) if document is not None else []
        except InvalidArgument as exc:
            self.error = exc.message
            return False
        except Exception as exc:
            self.error = f"cannot read {self.where}: {_reason(exc)}"
            self._reset()
            return False
        self.exists = document is not None
        self._version, self.users, self.error = version, users, None
        self.generation += 1
        return True

    def load(self) -> list[User]:
        """The stored users ([] if none); InvalidArgument if they cannot be read."""
        try:
            _, document = self._run(self._fetch(with_document=True))
        except Exception as exc:
            self._reset()
            raise InvalidArgument(f"cannot read {self.where}: {_reason(exc)}") from None
        return decode_users(document, self.where) if document is not None else []

    @contextlib.contextmanager
    def edit(self) -> Iterator[list[User]]:
        """Lock the row, load, let the caller change the list, then store it (one transaction). Database
        failures come out as InvalidArgument (one line), having changed nothing."""
        transaction = None
        try:
            connection = self._run(self._connect())
            transaction = connection.transaction()
            self._run(transaction.start())
            row = self._run(connection.fetchrow("SELECT document FROM chute_users WHERE id = 1 FOR UPDATE"))
        except InvalidArgument:
            self._abandon(transaction)
            raise
        except Exception as exc:
            self._abandon(transaction)
            raise InvalidArgument(f"cannot edit {self.where}: {_reason(exc)}") from None
        try:
            users = decode_users(row["document"], self.where) if row is not None else []
            yield users
            checked = check_users(users, self.where)
        except BaseException:
            self._abandon(transaction)
            raise
        try:
            self._run(self._store(connection, checked))
            self._run(transaction.commit())
        except Exception as exc:
            self._abandon(transaction)
            raise InvalidArgument(f"cannot edit {self.where}: {_reason(exc)}") from None

    def _abandon(self, transaction) -> None:
        """Roll back (if we got as far as a transaction); a connection that cannot is dropped."""
        if transaction is not None:
            try:
                self._run(transaction.rollback())
                return
            except Exception:
                pass
        self._reset()

    def save(self, users: list[User]) -> None:
        """Store `users` as they are (replacing what is stored)."""
        with self.edit() as stored:
            stored[:] = users

    def close(self) -> None:
        self._reset()
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    # -- the database ---------------------------------------------------------------------------------------

    def _run(self, coro):
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(asyncio.wait_for(coro, STATEMENT_TIMEOUT_S + CONNECT_TIMEOUT_S))

    async def _connect(self):
        if self._connection is None or self._connection.is_closed():
            import asyncpg

            from chute.storage.postgres.schema import SchemaError, migrate

            connection = await asyncpg.connect(self.url, timeout=CONNECT_TIMEOUT_S)
            try:
                await migrate(connection)  # the table exists from here on (a CLI may come before any node)
            except SchemaError as exc:
                connection.terminate()
                raise InvalidArgument(f"PostgreSQL at {self.where}: {exc}") from None
            except BaseException:
                connection.terminate()
                raise
            self._connection = connection
        return self._connection

    async def _fetch(self, *, with_document: bool) -> tuple[int | None, bytes | None]:
        connection = await self._connect()
        if with_document:
            row = await connection.fetchrow("SELECT version, document FROM chute_users WHERE id = 1")
            return (None, None) if row is None else (row["version"], row["document"])
        return await connection.fetchval("SELECT version FROM chute_users WHERE id = 1"), None

    @staticmethod
    async def _store(connection, users: list[User]) -> None:
        document = msgspec.json.encode(UsersDocument(users=users))
        await connection.execute(
            "INSERT INTO chute_users (id, version, document) VALUES (1, 1, $1) "
            "ON CONFLICT (id) DO UPDATE SET version = chute_users.version + 1, document = $1, changed_at = now()",
            document,
        )

    def _reset(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.terminate()


def _reason(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
