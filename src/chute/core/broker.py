"""BrokerCore: the whole broker logic, pure and synchronous.

It is assembled from one mixin per concern, each in its own module:
- state.py       registries, timers, record outbox, dead-lettering
- admin.py       queues, topics, subscriptions
- publishing.py  prepare / commit / abort of a publish
- delivery.py    receive, ack, nack, extend, peek, redrive, timers
- recovery.py    snapshot, restore, compaction

Invariant: no asyncio, sockets, threads, clocks or os here (checked by import-linter): every method takes `now`
when time matters, and the only side effects are on in-memory state and `store.append/track/release`.
`chute.broker.Broker` wraps it for asyncio.
"""

from __future__ import annotations

from chute.core.admin import AdminOps
from chute.core.delivery import DeliveryOps
from chute.core.publishing import PublishOps
from chute.core.recovery import RecoveryOps


class BrokerCore(AdminOps, PublishOps, DeliveryOps, RecoveryOps):
    """The pure broker. See the modules of the mixins for each operation's contract."""
