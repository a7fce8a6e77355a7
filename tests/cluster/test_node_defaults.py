"""What a node is when `chute serve --store` is given no `--node-name` or `--cluster-lease`: named after its
machine (plus its port when it listens on its own, so nodes on one machine differ), with the 5 s lease whose
takeover bound docs/cluster.md states (measured in test_takeover.py)."""

from __future__ import annotations

import socket

import pytest

from chute.cluster.node import DEFAULT_LEASE_S, default_node_name
from chute.errors import InvalidArgument
from chute.server.app import cluster_broker
from chute.server.config import ServerConfig

pytestmark = pytest.mark.timeout(30)
URL = "postgresql://chute@127.0.0.1:1/chute"  # never connected to: the node is only built


def test_a_node_without_a_name_is_named_after_its_machine_and_its_own_port():
    host = socket.gethostname()
    assert cluster_broker(ServerConfig(store=URL)).node.name == host  # the default port
    assert cluster_broker(ServerConfig(store=URL, port=0)).node.name == host  # any free port: not in the name
    assert cluster_broker(ServerConfig(store=URL, port=7160)).node.name == f"{host}-7160"
    assert default_node_name(7161) != default_node_name(7160)  # two nodes on one machine
    assert cluster_broker(ServerConfig(store=URL, node_name="node-1", port=7160)).node.name == "node-1"
    with pytest.raises(InvalidArgument, match="node_name"):
        ServerConfig(store=URL, node_name="").validate()


def test_the_default_lease_is_five_seconds_as_documented():
    assert ServerConfig().cluster_lease_s == DEFAULT_LEASE_S == 5.0
    node = cluster_broker(ServerConfig(store=URL)).node
    assert node.lease_s == 5.0 and node.heartbeat_s == 1.0  # five renewals per lease
