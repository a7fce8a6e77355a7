"""Stray copies: a queue left in a shard that its placement row no longer names, by a move cut short.

An empty queue moves to its topic's shard (router.py, `_move_empty_queue`): its row first, then the new copy,
then what reached the old copy meanwhile carried over, and the old copy deleted. When the old shard's node dies,
or hands the shard over, in between, the old copy survives in that shard's recovered broker. Its row names the
new shard, but the node that serves the old one serves the name from its own broker (a local broker holding a
name serves it), so what was published through that node was confirmed in a copy that readers through the other
nodes never see, and what the old copy held before was never carried over.

So whenever a node starts serving a shard (a new broker: a takeover, a hand-over, a reopen), it looks each of its
queues up again. A queue whose row names another shard is a stray copy: the queue is made in that shard if it is
missing there (the move was cut before it), what the stray holds is carried over (confirmed there before acked
here, as the move does), and the stray is deleted once it is empty. A stray that something in its shard still
depends on (a subscription, a queue dead-lettering into it) is left alone and logged: a move never starts for
such a queue, so it is not one of these.

Invariant: a stray is deleted only once it is empty, in the same step of the event loop that finds it so; an
error (the row's shard without an owner, a queue that refuses) ends the sweep of that queue with a warning, and
the next broker of the shard sweeps again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref

import msgspec

from chute.cluster.relay import PREFIX as RELAY_PREFIX
from chute.errors import ChuteError, QueueNotFound

log = logging.getLogger("chute.cluster")

EPHEMERAL = "~"  # router.EPHEMERAL: ephemeral queues are never placed


class Strays:
    """The stray-copy sweeps of one node's router (`changed` on every change of the node)."""

    def __init__(self, router) -> None:
        self.router = router  # the root ClusterBroker
        self._swept: weakref.WeakSet = weakref.WeakSet()  # brokers already looked at
        self._tasks: set[asyncio.Task] = set()

    def changed(self) -> None:
        """Sweep the brokers of shards this node serves that were not swept yet."""
        node = self.router.node
        for shard in range(node.shards):
            broker = node.local_broker(shard)
            if broker is None or broker in self._swept or broker._state != "serving":
                continue
            self._swept.add(broker)
            task = asyncio.get_running_loop().create_task(self._sweep(shard, broker))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _sweep(self, shard: int, broker) -> None:
        for name in list(broker.core.queues):
            if name.startswith((RELAY_PREFIX, EPHEMERAL)):
                continue
            try:
                placed = await self.router.placement.refresh(name)
                if placed is None or placed.kind != "queue" or placed.shard == shard:
                    continue
                if _depended_on(broker, name):
                    log.warning("queue %r of shard %d is placed in shard %d but still used in its shard; left",
                                name, shard, placed.shard)  # fmt: skip
                    continue
                await self._retire(shard, broker, name, placed.shard)
            except ChuteError as exc:
                log.warning("stray copy of queue %r in shard %d: %s; the next owner of the shard looks again",
                            name, shard, exc.message)  # fmt: skip

    async def _retire(self, shard: int, broker, name: str, target: int) -> None:
        """Make `name` in shard `target` if it is missing there, carry the stray's messages over, delete it."""
        router = self.router
        try:
            await router._on_shard(target, "queue_stats", name)
        except QueueNotFound:  # the move was cut before the new copy was made: make it, with the stray's settings
            settings = msgspec.to_builtins(broker.core.queues[name].settings)
            await router._on_shard(target, "create_queue", name, **settings)
        log.warning("queue %r: a stray copy in shard %d (its row names shard %d, a move cut short); carrying "
                    "what it holds over", name, shard, target)  # fmt: skip
        while router.node.local_broker(shard) is broker and name in broker.core.queues:
            left = broker.queue_stats(name)
            if not (left.ready or left.in_flight or left.delayed):
                with contextlib.suppress(QueueNotFound):
                    await broker.delete_queue(name)  # no await between the look and the delete's core step
                log.info("stray copy of queue %r in shard %d deleted", name, shard)
                return
            await router._carry_over(broker, name, target)  # (it waits a moment when nothing is ready)


def _depended_on(broker, name: str) -> bool:
    """Whether a subscription or a queue of `broker` feeds queue `name` (the queue's `feeds`, the core's
    `dead_letter_users`: no walk over every topic and queue of the shard)."""
    queue = broker.core.queues.get(name)  # (gone meanwhile: the sweep awaited its placement row)
    return bool(queue is not None and queue.feeds) or bool(broker.core.dead_letter_users.get(name))
