"""The cluster's consumer registry: every node's AMQP consumers, as rows of PostgreSQL (schema version 4).

    chute_consumers   one row per AMQP consumer of any node: its queue, the process that runs it (node name and
                      incarnation), whether it is exclusive, its x-priority, and `id` (a sequence: the order in
                      which consumers registered)

What it is for: what RabbitMQ decides over all of a queue's consumers holds across nodes, whichever node each
consumer is connected to —
- basic.consume with `exclusive`: refused (403 ACCESS_REFUSED) while a consumer of any node uses the queue, and no
  consumer of any node joins an exclusive one;
- x-single-active-consumer: the live consumer that registered first is the one that delivers (`first`);
- queue.declare-ok's consumer_count, queue.delete's if-unused and auto-delete count the consumers of every node.

Invariants:
- a row counts only while its process is alive (its row in chute_nodes has the same incarnation, a current
  lease and is not stopped): a node that dies or stops takes its consumers with it, before anyone deletes a
  row; `sweep` deletes the rows of processes that are gone;
- `register` is one transaction under a transaction-level advisory lock on the queue's name, so two exclusive
  consumers (or an exclusive one and any other) of one queue cannot both register, whichever nodes they use;
- a node's own rows are made to match its live consumers by `reconcile` (the front calls it periodically): a
  row whose delete failed (the database was away) goes, and a consumer whose row was swept while its node was
  cut off gets a new one (a newer id: it is now the last registered).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from chute.errors import Unavailable

CONSUMER_LOCK = 0x43436F6E  # first key of pg_advisory_xact_lock(key, hashtext(queue)) ("CCon")

# A consumer row whose process is alive (the same test as membership.nodes' `alive`).
LIVE = """EXISTS (SELECT 1 FROM chute_nodes n WHERE n.name = c.node AND n.incarnation = c.incarnation
                  AND NOT n.stopped AND now() - n.heartbeat_at < n.lease_s * interval '1 second')"""


async def register(connection, queue: str, node: str, incarnation: str, *, exclusive: bool, priority: int,
                   timeout: float | None = None) -> int | None:  # fmt: skip
    """Add a consumer of `queue` run by process (`node`, `incarnation`); its id, or None if refused: `exclusive`
    while a live consumer uses the queue, or any consumer while a live exclusive one does."""
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", CONSUMER_LOCK, queue,
                                 timeout=timeout)  # fmt: skip
        row = await connection.fetchrow(
            f"SELECT count(*) AS n, coalesce(bool_or(exclusive), false) AS held FROM chute_consumers c "
            f"WHERE queue = $1 AND {LIVE}",
            queue, timeout=timeout,
        )  # fmt: skip
        if row["held"] or (exclusive and row["n"]):
            return None
        return await connection.fetchval(
            "INSERT INTO chute_consumers (queue, node, incarnation, exclusive, priority) VALUES ($1, $2, $3, $4, $5) "
            "RETURNING id",
            queue, node, incarnation, exclusive, priority, timeout=timeout,
        )  # fmt: skip


async def unregister(connection, ids: Iterable[int], *, timeout: float | None = None) -> None:
    await connection.execute("DELETE FROM chute_consumers WHERE id = ANY($1::bigint[])", list(ids), timeout=timeout)


async def count(connection, queue: str, *, timeout: float | None = None) -> int:
    """The live consumers of `queue`, of every node."""
    return await connection.fetchval(f"SELECT count(*) FROM chute_consumers c WHERE queue = $1 AND {LIVE}", queue,
                                     timeout=timeout)  # fmt: skip


async def first(connection, queues: Iterable[str], *, timeout: float | None = None) -> dict[str, int]:
    """For each of `queues` that has a live consumer, the id of the one that registered first."""
    rows = await connection.fetch(
        f"SELECT DISTINCT ON (queue) queue, id FROM chute_consumers c WHERE queue = ANY($1::text[]) AND {LIVE} "
        "ORDER BY queue, id",
        list(queues), timeout=timeout,
    )  # fmt: skip
    return {row["queue"]: row["id"] for row in rows}


async def reconcile(connection, node: str, incarnation: str, live: dict[int, tuple[str, bool, int]], *,
                    timeout: float | None = None) -> dict[int, int]:  # fmt: skip
    """Make the rows of process (`node`, `incarnation`) be exactly its `live` consumers (id -> queue, exclusive,
    priority); delete the rows of the node's earlier processes. Returns {old id: new id} for consumers whose row
    was gone (swept while this node was cut off) and is registered again."""
    async with connection.transaction():
        await connection.execute(
            "DELETE FROM chute_consumers WHERE node = $1 AND (incarnation <> $2 OR NOT id = ANY($3::bigint[]))",
            node, incarnation, list(live), timeout=timeout,
        )  # fmt: skip
        rows = await connection.fetch("SELECT id FROM chute_consumers WHERE node = $1 AND incarnation = $2", node,
                                      incarnation, timeout=timeout)  # fmt: skip
        present = {row["id"] for row in rows}
        renewed = {}
        for old in sorted(set(live) - present):
            queue, exclusive, priority = live[old]
            renewed[old] = await connection.fetchval(
                "INSERT INTO chute_consumers (queue, node, incarnation, exclusive, priority) "
                "VALUES ($1, $2, $3, $4, $5) RETURNING id",
                queue, node, incarnation, exclusive, priority, timeout=timeout,
            )  # fmt: skip
    return renewed


async def sweep(connection, *, timeout: float | None = None) -> int:
    """Delete the rows of processes that are gone; how many."""
    result = await connection.execute(f"DELETE FROM chute_consumers c WHERE NOT {LIVE}", timeout=timeout)
    return int(result.rpartition(" ")[2] or 0)


class ConsumerRegistry:
    """The registry as one node uses it: its process's identity and its pool (a ClusterNode's)."""

    def __init__(self, node) -> None:
        self.node = node

    async def _run(self, call, *args, **kwargs):
        """`call` on a connection of the node's pool; Unavailable (retryable) if the database cannot be reached."""
        node = self.node
        try:
            async with node.pool.acquire(timeout=node._timeout) as connection:
                return await call(connection, *args, timeout=node._timeout, **kwargs)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # asyncpg's errors, OSError, a timeout, the pool closed
            raise Unavailable(f"the cluster's consumer registry in PostgreSQL cannot be reached: {exc}") from exc

    async def register(self, queue: str, *, exclusive: bool, priority: int) -> int | None:
        return await self._run(register, queue, self.node.name, self.node.incarnation, exclusive=exclusive,
                               priority=priority)  # fmt: skip

    async def unregister(self, ids: Iterable[int]) -> None:
        await self._run(unregister, ids)

    async def count(self, queue: str) -> int:
        return await self._run(count, queue)

    async def first(self, queues: Iterable[str]) -> dict[str, int]:
        return await self._run(first, queues)

    async def reconcile(self, live: dict[int, tuple[str, bool, int]]) -> dict[int, int]:
        return await self._run(reconcile, self.node.name, self.node.incarnation, live)

    async def sweep(self) -> int:
        return await self._run(sweep)
