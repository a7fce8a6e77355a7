"""GET /api/v1/cluster: the cluster as the node answering sees it (its `ClusterNode.status()`), for the dashboard's
Cluster view and for operators; no database call per request (the node's last heartbeat read the rows).

Invariants: a server that is not a cluster node (no `--store`) answers `enabled: false` with nothing else, so
the dashboard can ask any broker; the reply names nodes, addresses and shard numbers, never a queue or topic
(only their counts per shard this node serves), so any signed-in user may read it.
"""

from __future__ import annotations

import msgspec

from chute.server.api.call import Call
from chute.server.api.models import Reply


class ClusterNodeInfo(Reply):
    name: str
    host: str
    port: int | None
    http_port: int | None
    amqp_port: int | None
    alive: bool
    heartbeat_age_s: float
    shards: list[int]


NODE_FIELDS = tuple(f.name for f in msgspec.structs.fields(ClusterNodeInfo))


class LocalShard(Reply):
    shard: int
    queues: int
    topics: int
    healthy: bool
    relay_backlog: int = 0  # messages in this shard's relay queues, not forwarded to other shards yet


LOCAL_FIELDS = ("queues", "topics", "healthy", "relay_backlog")


class ClusterStatus(Reply, omit_defaults=True):
    enabled: bool
    node: str | None = None  # the node that answered
    state: str | None = None  # new, starting, running, stopping, stopped
    healthy: bool | None = None  # running, in touch with the database, its lease and its name held
    shards: int | None = None  # in the cluster
    lease_s: float | None = None
    store: str | None = None  # the database's hosts/name (never the user or password)
    serving: list[int] | None = None  # shards this node serves now
    local: list[LocalShard] | None = None
    nodes: list[ClusterNodeInfo] | None = None  # every node the database knows, by name
    unowned: list[int] | None = None  # shards without a live owner
    takeovers: int | None = None  # shards this node opened since it started
    last_error: str | None = None


async def cluster_status(call: Call) -> ClusterStatus:
    node = getattr(call.server.broker, "node", None)
    if node is None:
        return ClusterStatus(enabled=False)
    status = node.status()
    local = [LocalShard(shard=int(shard), **{f: values[f] for f in LOCAL_FIELDS})
             for shard, values in status["local"].items()]  # fmt: skip
    nodes = [ClusterNodeInfo(**{f: n[f] for f in NODE_FIELDS}) for n in status["nodes"]]
    return ClusterStatus(
        enabled=True, node=status["node"], state=status["state"], healthy=status["healthy"],
        shards=status["shards"], lease_s=status["lease_s"], store=status["store"], serving=status["serving"],
        local=local, nodes=nodes, unowned=status["unowned"],
        takeovers=status["takeovers"], last_error=status["last_error"],
    )  # fmt: skip
