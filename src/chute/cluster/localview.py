"""What this node holds, seen as one broker's state: for the parts of the server that read a broker's state
directly (`/metrics`, the HTTP API's overview) rather than through calls that the router can forward.

`LocalCore` merges the `core.queues` and `core.topics` of the shards this node serves now (names are unique
across shards, except ephemeral queues, which each shard's broker numbers from 1: the first one wins here, and
the router names them by shard for everything else). `LocalStore` sums their stores' counters.

Invariant: read-only views, rebuilt on each access, so they follow ownership changes; nothing here forwards:
"per node" is what `/metrics` means in a cluster (docs/cluster.md).
"""

from __future__ import annotations

from collections import ChainMap
from dataclasses import fields

from chute.errors import QueueNotFound, TopicNotFound
from chute.storage.api import StoreStats


class LocalCore:
    """The merged core state of a node's local shards (read-only)."""

    def __init__(self, brokers) -> None:
        self._brokers = brokers  # a callable: the local brokers now

    @property
    def queues(self) -> ChainMap:
        return ChainMap(*(broker.core.queues for broker in self._brokers()))

    @property
    def topics(self) -> ChainMap:
        return ChainMap(*(broker.core.topics for broker in self._brokers()))

    def queue(self, name: str):
        found = self.queues.get(name)
        if found is None:
            raise QueueNotFound(f"no queue is named {name!r}")
        return found

    def topic(self, name: str):
        found = self.topics.get(name)
        if found is None:
            raise TopicNotFound(f"no topic is named {name!r}")
        return found


class LocalStore:
    """The stores of a node's local shards, counted together."""

    def __init__(self, brokers, where: str) -> None:
        self._brokers = brokers
        self.where = where

    @property
    def read_only(self) -> bool:
        return any(broker.store.read_only for broker in self._brokers())

    def stats(self) -> StoreStats:
        total = StoreStats()
        for broker in self._brokers():
            stats = broker.store.stats()
            for field in fields(StoreStats):
                if field.metadata.get("setting"):  # (e.g. the slow-fsync threshold of the hold report)
                    continue
                mine, theirs = getattr(total, field.name), getattr(stats, field.name)
                if isinstance(mine, list):
                    setattr(total, field.name, [a + b for a, b in zip(mine, theirs, strict=False)])
                elif isinstance(mine, bool):
                    setattr(total, field.name, mine or theirs)
                else:
                    setattr(total, field.name, mine + theirs)
        return total
