"""`chute cluster status`: the nodes of a Chute cluster and what each holds, read from its PostgreSQL database.

It reads the cluster's tables directly (`--store`, default $CHUTE_STORE), so it works while every node is down,
and writes nothing. Output: one row per node (address, alive, heartbeat age by the database's clock, shards
held with their queue and topic counts), then the shards nobody holds; `--json` prints one JSON document.

Invariant: one line on stderr and exit status 1 for a database that cannot be read or holds no Chute cluster.
"""

from __future__ import annotations

import click
from rich.text import Text

from chute.cli.admin import _show, _table
from chute.cli.common import CommandFailed, json_option, print_json, run_command
from chute.storage.postgres.url import describe, redact

TIMEOUT_S = 10.0


@click.group()
def cluster() -> None:
    """A Chute cluster on PostgreSQL (`chute serve --store URL` on several machines)."""


@cluster.command("status")
@click.option(
    "--store", envvar="CHUTE_STORE", required=True, metavar="URL",
    help="The cluster's database: postgresql://user@host/db (or $CHUTE_STORE).",
)  # fmt: skip
@json_option
@run_command
async def status(store: str, as_json: bool) -> None:
    """Nodes, whether each is alive, its heartbeat's age, the shards it holds and their queues and topics."""
    found = await _read(store)
    if as_json:
        print_json(found)
        return
    table = _table("NODE", "ADDRESS", "ALIVE", "HEARTBEAT", "SHARDS", "QUEUES", "TOPICS",
                   numeric=("QUEUES", "TOPICS"))  # fmt: skip
    for node in found["nodes"]:
        address = f"{node['host']}:{node['port']}" if node["port"] else node["host"]
        table.add_row(
            Text(node["name"]), Text(address), "yes" if node["alive"] else "no",
            f"{node['heartbeat_age_s']:.1f} s ago", Text(_ranges(node["shards"]) or "-"),
            str(node["queues"]), str(node["topics"]),
        )  # fmt: skip
    _show(table)
    alive = sum(node["alive"] for node in found["nodes"])
    unowned = found["unowned"]
    click.echo(f"{found['shards']} shards, {alive} of {len(found['nodes'])} nodes alive; "
               + (f"unowned shards: {_ranges(unowned)}" if unowned else "every shard is held"))  # fmt: skip


async def _read(url: str) -> dict:
    if not url.startswith(("postgresql://", "postgres://")):
        raise CommandFailed(f"--store must be a postgresql:// URL, got {redact(url)!r}")
    try:
        import asyncpg
    except ImportError as exc:
        raise CommandFailed(f"chute cluster needs asyncpg ({exc}): pip install 'chute[postgres]'") from None
    from chute.cluster.membership import view

    where = describe(url)
    try:
        connection = await asyncpg.connect(url, timeout=TIMEOUT_S)
    except Exception as exc:
        raise CommandFailed(f"cannot connect to PostgreSQL at {where}: {_first_line(exc)}") from None
    try:
        present = await connection.fetchval("SELECT to_regclass('chute_nodes') IS NOT NULL", timeout=TIMEOUT_S)
        if not present:
            raise CommandFailed(f"PostgreSQL at {where} holds no Chute cluster (no chute_nodes table): start a node "
                                "with `chute serve --store URL` first")  # fmt: skip
        return await view(connection, timeout=TIMEOUT_S)
    except CommandFailed:
        raise
    except Exception as exc:
        raise CommandFailed(f"cannot read the cluster in PostgreSQL at {where}: {_first_line(exc)}") from None
    finally:
        await connection.close()


def _first_line(exc: BaseException) -> str:
    return redact((str(exc).strip() or type(exc).__name__).splitlines()[0])


def _ranges(shards: list[int]) -> str:
    """`[0, 1, 2, 5, 7, 8]` as `0-2,5,7-8`."""
    parts: list[tuple[int, int]] = []
    for shard in shards:
        if parts and parts[-1][1] == shard - 1:
            parts[-1] = (parts[-1][0], shard)
        else:
            parts.append((shard, shard))
    return ",".join(f"{low}" if low == high else f"{low}-{high}" for low, high in parts)
