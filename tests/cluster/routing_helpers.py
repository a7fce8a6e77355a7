"""Helpers of the router tests: `StaticNode`, a cluster node whose shards are assigned by the test, and
`static_cluster`, in-process Servers on such nodes; `clients_of`, a client connected to each.

`StaticNode` has the seam of `chute.cluster.node.ClusterNode` that the router uses (`shards`, `name`,
`placement`, `local_broker`, `owner`, `on_change`, `healthy`, `status`, `advertise`, `start`, `stop`) over
in-memory brokers and a `MemoryPlacement` shared by the nodes of one test, so routing is tested without
PostgreSQL, with ownership moved by hand (`ClusterNode` itself has its own tests, and the multi-node tests on
PostgreSQL use it).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass, replace

from chute import AsyncClient, Broker
from chute.cluster.peers import Peers
from chute.cluster.placement import MemoryPlacement
from chute.cluster.router import ClusterBroker
from chute.server.app import Server
from chute.server.config import ServerConfig


@dataclass(frozen=True)
class Info:
    name: str
    host: str
    port: int | None
    http_port: int | None = None
    amqp_port: int | None = None
    alive: bool = True


class Directory:
    """What every node of a static cluster knows: who owns each shard, and each node's address."""

    def __init__(self, shards: int) -> None:
        self.shards = shards
        self.book: dict = {}
        self.owners: dict[int, str] = {}
        self.nodes: dict[str, StaticNode] = {}

    def changed(self) -> None:
        for node in self.nodes.values():
            for callback in list(node.on_change):
                callback(-1, False)


class StaticNode:
    def __init__(self, directory: Directory, name: str) -> None:
        self.directory = directory
        self.name = name
        self.shards = directory.shards
        self.placement = MemoryPlacement(directory.shards, directory.book)
        self.info = Info(name, "127.0.0.1", None)
        self.on_change: list = []
        self.brokers: dict[int, Broker] = {}
        self.healthy = True
        self.where = "memory"
        directory.nodes[name] = self

    def local_broker(self, shard: int):
        return self.brokers.get(shard)

    def owner(self, shard: int):
        name = self.directory.owners.get(shard)
        if name is None:
            return None
        return self.directory.nodes[name].info

    def status(self) -> dict:
        return {"node": self.name, "healthy": self.healthy, "serving": sorted(self.brokers)}

    async def advertise(self, host=None, port=None, http_port=None, amqp_port=None) -> None:
        self.info = replace(self.info, host=host or "127.0.0.1", port=port, http_port=http_port, amqp_port=amqp_port)

    async def start(self):
        return self

    async def take(self, shard: int) -> Broker:
        broker = await Broker.in_memory().start()
        self.brokers[shard] = broker
        self.directory.owners[shard] = self.name
        self.directory.changed()
        return broker

    async def drop(self, shard: int) -> None:
        broker = self.brokers.pop(shard, None)
        if self.directory.owners.get(shard) == self.name:
            del self.directory.owners[shard]
        if broker is not None:
            await broker.close()
        self.directory.changed()

    async def stop(self) -> None:
        for shard in list(self.brokers):
            await self.drop(shard)


@contextlib.asynccontextmanager
async def static_cluster(count: int = 3, shards: int = 6, *, wait_owner_s: float = 3.0, http: bool = False,
                         token: str | None = None):  # fmt: skip
    """`count` in-process Servers on StaticNodes; shard s is owned by node s % count. Yields (servers, directory)."""
    directory = Directory(shards)
    nodes = [StaticNode(directory, f"node-{i}") for i in range(count)]
    for shard in range(shards):
        await nodes[shard % count].take(shard)
    servers = []
    data_dir = tempfile.mkdtemp(prefix="chute-routing-")  # users file (none) and SQS key
    try:
        for node in nodes:
            config = ServerConfig(host="127.0.0.1", port=0, http_port=0 if http else None, amqp_port=None,
                                  data_dir=data_dir, token=token)  # fmt: skip
            peers = Peers(node.name, token=token)
            server = Server(config, broker=ClusterBroker(node, wait_owner_s=wait_owner_s, peers=peers))
            await server.start()
            servers.append(server)
        yield servers, directory
    finally:
        for server in servers:
            await server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@contextlib.asynccontextmanager
async def clients_of(servers):
    """A client connected to each of `servers` (no reconnection), in order; closed on the way out."""
    clients: list[AsyncClient] = []
    try:
        for server in servers:
            clients.append(await AsyncClient(server.url, reconnect=False).connect())
        yield clients
    finally:
        for client in clients:
            await client.close()
