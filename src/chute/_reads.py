"""Reads of one broker's state that the fronts need beyond `ManagementApi`'s listings (a mixin of `Broker`).

They answer from the core at once (plain functions, no I/O, nothing changes), so a front on a single broker
pays a function call; a cluster node's router (cluster/router.py) offers the same names for any shard, answering
at once for its own shards and with an awaitable for the others (forwarded to the owner as CALLs).

- `queue_info(name)`: a queue's settings (with the opaque `attributes` other fronts keep there), QueueNotFound;
- `route(topic, subject, headers)`: the names of the queues a message with this subject and headers would reach
  now (each once; ephemeral subscriptions' queues included), TopicNotFound;
- `dead_letter_sources(name)`: the queues whose dead-letter queue is `name` (none if there is no such queue).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from chute.model import QueueInfo

if TYPE_CHECKING:
    from chute.core.broker import BrokerCore


class StateReads:
    core: BrokerCore

    def queue_info(self, name: str) -> QueueInfo:
        """A queue's name and settings (QueueNotFound if there is none)."""
        queue = self.core.queue(name)
        return QueueInfo(name=queue.name, settings=queue.settings, ephemeral=queue.ephemeral)

    def route(self, topic: str, subject: str, headers: dict[str, str] | None = None) -> list[str]:
        """The queues a message published to `topic` with `subject` and `headers` would reach now, by name."""
        return [queue.name for queue in self.core.topic(topic).route(subject, headers)]

    def dead_letter_sources(self, name: str) -> list[str]:
        """The queues that dead-letter into `name`, sorted by name."""
        return sorted(q.name for q in self.core.queues.values() if q.settings.dead_letter_queue == name)
