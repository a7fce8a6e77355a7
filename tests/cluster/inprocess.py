"""In-process cluster nodes for the multi-node tests on PostgreSQL: `Server`s with `--store`, real ClusterNodes,
their listeners on ephemeral loopback ports, started on a fresh database and stopped however the test ends.

`running_nodes` yields once every node serves its equal share of the shards and sees a live, advertised owner for
every shard, so a test's first call through any node finds its owner."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from chute.server.app import Server
from chute.server.config import ServerConfig
from tests.postgres.helpers import fresh_database


async def balanced(servers: list[Server], shards: int, timeout_s: float = 60.0) -> None:
    """Until each node serves shards / len(servers) shards and every node sees a live owner with an advertised port
    for every shard."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = [s.broker.node for s in servers]
        if all(len(n.local_brokers()) == shards // len(servers) for n in nodes) and all(
            (o := n.owner(shard)) is not None and o.alive and o.port for n in nodes for shard in range(shards)
        ):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"never balanced: {[n.status() for n in nodes]}")
        await asyncio.sleep(0.1)  # the nodes' views change on their heartbeats; nothing to await across them


@contextlib.asynccontextmanager
async def running_nodes(postgres_url: str, tmp_path, count: int, shards: int,
                        config: Callable[[str, str, str], ServerConfig]) -> AsyncIterator[list[Server]]:  # fmt: skip
    """`count` nodes `node-0`… on a fresh database, each made by `config(url, name, data_dir)`."""
    url = await fresh_database(postgres_url)
    servers: list[Server] = []
    try:
        for i in range(count):
            servers.append(await Server(config(url, f"node-{i}", str(tmp_path / f"node-{i}"))).start())
        await balanced(servers, shards)
        yield servers
    finally:
        for server in reversed(servers):
            await server.stop()
