"""`chute db migrate` and `chute cluster forget`: changes an operator makes to a cluster's PostgreSQL database
without starting a node.

- `chute db migrate --store URL` brings the database's Chute schema up to date (creating it in an empty
  database), as a node would at start, and says which version it found and which it holds now.
- `chute cluster forget NODE --store URL` removes a dead (or cleanly stopped) node's row from `chute_nodes`, so it
  is no longer listed, and frees the shards still named for it whose lease has ended.

Invariants:
- one line on stderr and exit status 1 for a bad URL, an unreachable server, a newer or foreign schema, a
  database without a cluster, an unknown node or a node that is alive — and then nothing is written;
- `forget` decides "alive" by the database's clock, in the transaction that deletes the row (the row locked), so
  a node that heartbeats meanwhile is never forgotten; a forgotten node that starts again simply registers again.
"""

from __future__ import annotations

import click

from chute.cli.cluster import cluster
from chute.cli.common import CommandFailed, json_option, print_json, run_command
from chute.storage.postgres.url import describe, redact

TIMEOUT_S = 10.0
STORE_OPTION = click.option(
    "--store", envvar="CHUTE_STORE", required=True, metavar="URL",
    help="The cluster's database: postgresql://user@host/db (or $CHUTE_STORE).",
)  # fmt: skip


@click.group()
def db() -> None:
    """The database of a Chute cluster on PostgreSQL (`chute serve --store URL`)."""


@db.command("migrate")
@STORE_OPTION
@json_option
@run_command
async def migrate(store: str, as_json: bool) -> None:
    """Bring the database's Chute schema up to date without starting a node (nodes also do it at start)."""
    from chute.storage.postgres.schema import SCHEMA_VERSION, SchemaError
    from chute.storage.postgres.schema import migrate as apply

    connection = await _connect(store)
    try:
        try:
            found = await apply(connection)
        except SchemaError as exc:
            raise CommandFailed(f"PostgreSQL at {describe(store)}: {exc}") from None
        except Exception as exc:
            raise CommandFailed(
                f"cannot migrate the schema in PostgreSQL at {describe(store)}: {_first_line(exc)}"
            ) from None
    finally:
        await connection.close()
    if as_json:
        print_json({"found": found, "now": SCHEMA_VERSION, "changed": found != SCHEMA_VERSION})
    elif found == SCHEMA_VERSION:
        click.echo(f"schema version {found}: up to date, nothing changed")
    else:
        was = f"schema version {found}" if found else "no Chute schema"
        click.echo(f"{was} found; now schema version {SCHEMA_VERSION}")


@cluster.command("forget")
@click.argument("node")
@STORE_OPTION
@run_command
async def forget(node: str, store: str) -> None:
    """Remove NODE, dead or stopped, from the cluster's list of nodes (refused while it is alive)."""
    from chute.cluster.membership import notify

    connection = await _connect(store)
    try:
        present = await connection.fetchval("SELECT to_regclass('chute_nodes') IS NOT NULL", timeout=TIMEOUT_S)
        if not present:
            raise CommandFailed(f"PostgreSQL at {describe(store)} holds no Chute cluster (no chute_nodes table)")
        async with connection.transaction():
            row = await connection.fetchrow(
                """
                SELECT NOT stopped AND now() - heartbeat_at < lease_s * interval '1 second' AS alive,
                       extract(epoch FROM now() - heartbeat_at)::float8 AS age
                FROM chute_nodes WHERE name = $1 FOR UPDATE
                """,
                node, timeout=TIMEOUT_S,
            )  # fmt: skip
            if row is None:
                raise CommandFailed(f"no node {node!r} in the cluster at {describe(store)} (see chute cluster status)")
            if row["alive"]:
                raise CommandFailed(f"node {node!r} is alive (heartbeat {max(row['age'], 0.0):.1f} s ago): stop it "
                                    "first, or wait until its lease has passed")  # fmt: skip
            freed = await connection.fetch(
                "UPDATE chute_shards SET owner = NULL WHERE owner = $1 AND lease_until <= now() RETURNING shard",
                node, timeout=TIMEOUT_S,
            )  # fmt: skip
            await connection.execute("DELETE FROM chute_nodes WHERE name = $1", node, timeout=TIMEOUT_S)
            await notify(connection, f"forgot {node}")
    except CommandFailed:
        raise
    except Exception as exc:
        where = describe(store)
        raise CommandFailed(f"cannot forget node {node!r} in PostgreSQL at {where}: {_first_line(exc)}") from None
    finally:
        await connection.close()
    shards = f"; freed shards {', '.join(str(shard) for shard in sorted(r['shard'] for r in freed))}" if freed else ""
    click.echo(f"forgot node {node}{shards}")


async def _connect(url: str):
    if not url.startswith(("postgresql://", "postgres://")):
        raise CommandFailed(f"--store must be a postgresql:// URL, got {redact(url)!r}")
    try:
        import asyncpg
    except ImportError as exc:
        raise CommandFailed(f"this command needs asyncpg ({exc}): pip install 'chute[postgres]'") from None
    try:
        return await asyncpg.connect(url, timeout=TIMEOUT_S)
    except Exception as exc:
        raise CommandFailed(f"cannot connect to PostgreSQL at {describe(url)}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return redact((str(exc).strip() or type(exc).__name__).splitlines()[0])
