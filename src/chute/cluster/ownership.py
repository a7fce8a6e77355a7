"""Ownership: which node holds which shard, as leased rows of `chute_shards`, and the plan that balances them.

A row says who *should* hold a shard: `owner` (a node name) while `lease_until > now()` (the database's clock).
The owner renews the leases of its shards with each heartbeat. It is not the fencing: holding a shard means
having opened its stream (`shard-<n>`), which increments the stream's epoch in chute_streams, and every write
of the previous holder is checked against that epoch (storage/postgres). So a row and a stream can disagree for
a moment (a node that lost its lease still has the broker open) without any harm: it can no longer write.

Balance: with `n` alive nodes sorted by name, the first `shards % n` own ⌈shards/n⌉ shards, the others
⌊shards/n⌋. A node over its target hands shards back (closing their brokers cleanly first); a node under it
claims shards that are unowned, whose lease expired, or that carry its own name (a restart of the same node).
Nodes compute the plan independently from the same rows; a claim is one conditional UPDATE, so two nodes
racing for one shard cannot both get it.

Invariants: `plan` is pure (no I/O, deterministic for its inputs); a claim or a renewal succeeds only while the
row is free, expired or already ours; a release clears the row only if it is still ours.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass


@dataclass(frozen=True)
class ShardRow:
    """A row of chute_shards as read: `held` is whether its lease is current by the database's clock."""

    shard: int
    owner: str | None
    held: bool
    expires_in_s: float = 0.0  # while held: how long its lease has left, by the database's clock


def target(me: str, alive: list[str], shards: int) -> int:
    """How many shards `me` should hold among the `alive` nodes (me included whatever the list says)."""
    names = sorted(set(alive) | {me})
    base, extra = divmod(shards, len(names))
    return base + (1 if names.index(me) < extra else 0)


def plan(me: str, alive: list[str], rows: list[ShardRow], held: set[int], busy: set[int]) -> tuple[list, list]:
    """(shards to claim, shards to hand back) for node `me`, which holds `held` now (some of them `busy`: being
    opened or closed). Candidates to claim come in an order of their own per node, so nodes starting together
    try different shards first."""
    want = target(me, alive, len(rows))
    have = len(held)
    if have > want:
        spare = sorted(held - busy, key=lambda s: _spread(me, s), reverse=True)
        return [], spare[: have - want]
    if have == want:
        return [], []
    alive_set = set(alive)
    free = [
        row.shard for row in rows
        if row.shard not in held and row.shard not in busy
        and (row.owner is None or row.owner == me or not row.held or row.owner not in alive_set)
    ]  # fmt: skip
    own_name_first = {row.shard for row in rows if row.owner == me}
    free.sort(key=lambda s: (s not in own_name_first, _spread(me, s)))
    return free[: want - have], []


def _spread(me: str, shard: int) -> int:
    return zlib.crc32(f"{me}/{shard}".encode())


# -- SQL ------------------------------------------------------------------------------------------------------


async def rows(connection, *, timeout=None) -> list[ShardRow]:
    records = await connection.fetch(
        """
        SELECT shard, owner, owner IS NOT NULL AND lease_until > now() AS held,
               coalesce(extract(epoch FROM lease_until - now()), 0)::float8 AS expires_in_s
        FROM chute_shards ORDER BY shard
        """,
        timeout=timeout,
    )
    return [ShardRow(r["shard"], r["owner"], r["held"], max(r["expires_in_s"], 0.0)) for r in records]


async def claim(connection, shard: int, me: str, lease_s: float, *, timeout=None) -> bool:
    """Take the row of `shard` if it is free, expired, held by a node that stopped, or ours; True if taken."""
    taken = await connection.fetchval(
        """
        UPDATE chute_shards s SET owner = $2, lease_until = now() + $3 * interval '1 second', changed_at = now()
        WHERE shard = $1 AND (owner IS NULL OR owner = $2 OR lease_until IS NULL OR lease_until <= now()
            OR EXISTS (SELECT 1 FROM chute_nodes n WHERE n.name = s.owner AND n.stopped))
        RETURNING shard
        """,
        shard, me, lease_s, timeout=timeout,
    )  # fmt: skip
    return taken is not None


async def renew(connection, shards: list[int], me: str, lease_s: float, *, timeout=None) -> set[int]:
    """Extend our leases of `shards`; the ones still ours (a shard missing from the answer was taken from us)."""
    if not shards:
        return set()
    records = await connection.fetch(
        "UPDATE chute_shards SET lease_until = now() + $3 * interval '1 second' "
        "WHERE shard = ANY($1::int[]) AND owner = $2 RETURNING shard",
        shards, me, lease_s, timeout=timeout,
    )  # fmt: skip
    return {r["shard"] for r in records}


async def release(connection, shard: int, me: str, *, timeout=None) -> None:
    """Clear the row of `shard` if it is still ours (after its broker closed)."""
    await connection.execute(
        "UPDATE chute_shards SET owner = NULL, lease_until = NULL, changed_at = now() WHERE shard = $1 AND owner = $2",
        shard, me, timeout=timeout,
    )  # fmt: skip
