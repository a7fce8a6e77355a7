"""The Chute cluster on PostgreSQL (docs/cluster.md): shards, nodes, placement and routing.

Modules: `node.py` (ClusterNode: membership, the shards this node holds, takeover, fencing on loss),
`membership.py` (chute_cluster and chute_nodes: shard count, heartbeats, who is alive), `ownership.py`
(chute_shards: leased ownership rows and the balancing plan), `placement.py` (which shard holds a queue or
topic), `router.py` (ClusterBroker: the Broker API over every shard, local or forwarded), `peers.py`
(connections to other nodes).
"""

from chute.cluster.membership import ClusterError, NodeInfo
from chute.cluster.node import ClusterNode

__all__ = ["ClusterError", "ClusterNode", "NodeInfo"]
