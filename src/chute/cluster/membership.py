"""Membership: the cluster's settings and its nodes, as rows of PostgreSQL (schema version 2).

    chute_cluster   one row: `shards`, fixed by the first node that set the database up
    chute_nodes     one row per node name: addresses, `incarnation` (the process that runs the name now),
                    `heartbeat_at` and `lease_s`; alive while `now() - heartbeat_at < lease_s` and not `stopped`

Every time is the database's (`now()`), never a node's clock: nodes whose clocks disagree still agree on who is
alive. Every change of membership or ownership is announced on the NOTIFY channel CHANNEL, so nodes react at
once; polling at each heartbeat is the fallback when a notification is missed.

Invariants:
- the number of shards never changes once stored; a node asking for another number is refused (ClusterError);
- a heartbeat renews a node's row only for its own incarnation: a second process started with the same name
  takes the name over, and the first finds out at its next heartbeat (`superseded`) and serves nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass

from chute.errors import InvalidArgument

CHANNEL = "chute_cluster"  # NOTIFY channel: payload "<what> <node>" (joined, left, took 3, gave 3, ...)
DEFAULT_SHARDS = 16
MAX_SHARDS = 4096  # each shard is a stream, a broker and up to three connections on its owner: stay reasonable


class ClusterError(InvalidArgument):
    """The database's cluster cannot be joined as asked (another shard count, say); the message says why."""


@dataclass(frozen=True)
class NodeInfo:
    """A node as the others see it: where to reach it and whether its heartbeat is current."""

    name: str
    host: str
    port: int | None
    http_port: int | None
    amqp_port: int | None
    alive: bool
    heartbeat_age_s: float = 0.0
    started_at: str = ""
    incarnation: str = ""  # the process that runs the name now (a restart changes it)


async def notify(connection, what: str) -> None:
    await connection.execute("SELECT pg_notify($1, $2)", CHANNEL, what)


async def setup_shards(connection, wanted: int | None, *, timeout: float | None = None) -> int:
    """The cluster's number of shards: stored by the first node (`wanted`, or DEFAULT_SHARDS), read by later
    ones. Raises ClusterError if `wanted` is given and differs from the stored number (nothing changed)."""
    if wanted is not None and not 1 <= wanted <= MAX_SHARDS:
        raise ClusterError(f"shards must be between 1 and {MAX_SHARDS}, got {wanted}")
    async with connection.transaction():
        await connection.execute(
            "INSERT INTO chute_cluster (id, shards) VALUES (1, $1) ON CONFLICT DO NOTHING",
            wanted or DEFAULT_SHARDS, timeout=timeout,
        )  # fmt: skip
        shards = await connection.fetchval("SELECT shards FROM chute_cluster WHERE id = 1", timeout=timeout)
        if wanted is not None and wanted != shards:
            raise ClusterError(
                f"the cluster in this database has {shards} shards (fixed when it was set up), not {wanted}: "
                "leave out --shards or give the same number"
            )
        await connection.execute(
            "INSERT INTO chute_shards (shard) SELECT generate_series(0, $1 - 1) ON CONFLICT DO NOTHING",
            shards, timeout=timeout,
        )  # fmt: skip
    return shards


async def register(connection, node: NodeInfo, incarnation: str, lease_s: float, *, timeout=None) -> None:
    """Make `node` alive under `incarnation` (taking the name over from any earlier process) and announce it."""
    await connection.execute(
        """
        INSERT INTO chute_nodes (name, incarnation, host, port, http_port, amqp_port, lease_s)
        VALUES ($1, $2, $3, $4, $5, $6, $7)
        ON CONFLICT (name) DO UPDATE SET incarnation = EXCLUDED.incarnation, host = EXCLUDED.host,
            port = EXCLUDED.port, http_port = EXCLUDED.http_port, amqp_port = EXCLUDED.amqp_port,
            lease_s = EXCLUDED.lease_s, started_at = now(), heartbeat_at = now(), stopped = false
        """,
        node.name, incarnation, node.host, node.port, node.http_port, node.amqp_port, lease_s, timeout=timeout,
    )  # fmt: skip
    await notify(connection, f"joined {node.name}")


async def advertise(connection, node: NodeInfo, incarnation: str, *, timeout=None) -> None:
    """Update the addresses of our row (ports become known once the listeners are bound)."""
    await connection.execute(
        "UPDATE chute_nodes SET host = $3, port = $4, http_port = $5, amqp_port = $6 "
        "WHERE name = $1 AND incarnation = $2",
        node.name, incarnation, node.host, node.port, node.http_port, node.amqp_port, timeout=timeout,
    )  # fmt: skip
    await notify(connection, f"moved {node.name}")


async def heartbeat(connection, name: str, incarnation: str, *, timeout=None) -> bool:
    """Renew our row; False if another process took our name over (then we must serve nothing)."""
    row = await connection.fetchval(
        "UPDATE chute_nodes SET heartbeat_at = now() WHERE name = $1 AND incarnation = $2 RETURNING 1",
        name, incarnation, timeout=timeout,
    )  # fmt: skip
    return row is not None


async def leave(connection, name: str, incarnation: str, *, timeout=None) -> None:
    """A clean stop: the others see us gone now instead of after our lease."""
    await connection.execute(
        "UPDATE chute_nodes SET stopped = true WHERE name = $1 AND incarnation = $2", name, incarnation,
        timeout=timeout,
    )  # fmt: skip
    await notify(connection, f"left {name}")


async def nodes(connection, *, timeout=None) -> list[NodeInfo]:
    """Every node the database knows, by name, with `alive` and the heartbeat's age by the database's clock."""
    rows = await connection.fetch(
        """
        SELECT name, host, port, http_port, amqp_port, started_at::text AS started_at, incarnation,
               extract(epoch FROM now() - heartbeat_at)::float8 AS age,
               NOT stopped AND now() - heartbeat_at < lease_s * interval '1 second' AS alive
        FROM chute_nodes ORDER BY name
        """,
        timeout=timeout,
    )
    return [
        NodeInfo(r["name"], r["host"], r["port"], r["http_port"], r["amqp_port"], r["alive"], max(r["age"], 0.0),
                 r["started_at"], r["incarnation"])
        for r in rows
    ]  # fmt: skip


async def view(connection, *, timeout=None) -> dict:
    """The whole cluster as the database holds it (for `chute cluster status`): shards, nodes with what each
    holds, and per shard its owner and its queue and topic counts (from the placement). Reads only."""
    shards = await connection.fetchval("SELECT shards FROM chute_cluster WHERE id = 1", timeout=timeout)
    rows = await connection.fetch(
        """
        SELECT s.shard, s.owner, s.owner IS NOT NULL AND s.lease_until > now() AS held,
               count(p.name) FILTER (WHERE p.kind = 'queue') AS queues,
               count(p.name) FILTER (WHERE p.kind = 'topic') AS topics
        FROM chute_shards s LEFT JOIN chute_placement p ON p.shard = s.shard
        GROUP BY s.shard ORDER BY s.shard
        """,
        timeout=timeout,
    )
    table = [dict(row) for row in rows]
    listed = []
    for node in await nodes(connection, timeout=timeout):
        held = [row for row in table if row["owner"] == node.name and row["held"]]
        listed.append({
            "name": node.name, "host": node.host, "port": node.port, "http_port": node.http_port,
            "amqp_port": node.amqp_port, "alive": node.alive, "heartbeat_age_s": round(node.heartbeat_age_s, 3),
            "started_at": node.started_at, "shards": [row["shard"] for row in held],
            "queues": sum(row["queues"] for row in held), "topics": sum(row["topics"] for row in held),
        })  # fmt: skip
    unowned = [row["shard"] for row in table if not row["held"]]
    return {"shards": shards, "nodes": listed, "unowned": unowned, "shard_table": table}
