"""ClusterNode: one Chute node of a cluster on PostgreSQL — membership, the shards it holds, takeover, fencing.

A cluster has a fixed number of shards (chute_cluster). Each shard is one PostgresStore stream (`shard-<n>`)
and, on the node that holds it, one ordinary `chute.Broker` over that store. The node:

    start()      connect, migrate, read or set the shard count, register (chute_nodes), claim its share of
                 the shards and open their brokers (recovering each from PostgreSQL), then heartbeat
    heartbeat    every `heartbeat_s`, or at once on a NOTIFY: renew its row and its shards' leases, read the
                 nodes and shards, then claim (open) or hand back (close cleanly, then release) shards to reach
                 its share (ownership.plan); a shard whose lease was not renewed, or whose store failed
                 (fenced or read-only), is dropped at once and may be claimed again later (reopen = recover)
    stop()       hand back every shard (each broker closed cleanly: checkpoint, clean flag), leave

The seam with the router (src/chute/cluster/router.py): `local_broker(shard)`, `owner(shard)`,
`wait_owner(shard, timeout_s)`, `placement`, `status()`, `healthy`, `on_change` callbacks `(shard, held)`.

Invariants:
- a shard's broker is served (returned by `local_broker`) only after it recovered, and only while its lease
  was renewed within `lease_s` by this node's clock (the lease in the database, renewed at the same moment by
  the database's clock, runs a little longer): a node cut off from the database longer than its lease drops
  every shard, since it must assume the others took them over, and is unhealthy until it reaches the
  database again;
- a node never writes a shard another node opened after it: that is the store's epoch check, not this module's
  bookkeeping, so a paused or partitioned node is harmless whatever it believes;
- a shard is opened by at most one task of this node at a time (`_busy`);
- the read caches of the shards' stores together hold at most NODE_CACHE_BYTES, however many shards the node
  holds (`shard_cache_bytes`: an equal part for each shard it holds now, at most a single store's default, at
  least MIN_SHARD_CACHE_BYTES, so more than 128 shards held may take more); likewise the shards' recent messages
  (core/recent.py) keep at most NODE_RECENT_COUNT messages and NODE_RECENT_BYTES of bodies a generation in all
  (`shard_recent_limits`). The parts are set again whenever a shard comes or goes (`_share_budgets`), and a
  smaller part takes effect at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
from collections.abc import Callable

from chute.broker import Broker
from chute.cluster import membership, ownership, relay
from chute.cluster.membership import NodeInfo
from chute.core import recent
from chute.errors import InvalidArgument, StorageFailed
from chute.storage.postgres.url import describe, redact

log = logging.getLogger("chute.cluster")

# A SIGKILLed node's shards are served again within the lease plus their recovery (up to ~4 s on a loaded 2-core
# machine): 5 s keeps that within the 10 s promised (docs/cluster.md); a longer pause than the lease (a stalled
# VM) costs a node its shards, which is safe (the epoch) but slow: raise `--cluster-lease` where pauses are long.
DEFAULT_LEASE_S = 5.0
DEFAULT_HEARTBEAT_S = 1.0
EXPIRY_MARGIN_S = 0.02  # look this long after a lease's end (the database's clock ticks on meanwhile too)
TAKE_CONCURRENCY = 4  # shards opened at once: recovery is CPU work on this node; more would only queue
POOL_SIZE = 4  # heartbeats, claims and releases, placement lookups
# The read caches of a node's shard stores share one budget: each shard's store gets an equal part of it, so a
# node holding every shard (the last one up) holds at most the budget, and one holding a few keeps a single
# store's full cache for each. (With the single store's 8 MiB each, an idle node holding 16 shards grew to
# ~320 MB of RSS once traffic had filled them.)
NODE_CACHE_BYTES = 32 * 2**20
MIN_SHARD_CACHE_BYTES = 256 * 2**10


# The recent messages each shard's broker keeps (two generations, core/recent.py) share a budget the same way: a
# single broker keeps up to recent.MAX_COUNT messages and recent.MAX_BYTES of bodies a generation, a node eight
# times that in all, so a node of up to 8 shards keeps each shard's in full. A message not kept is decoded again
# when delivered: with benchmarks.cluster's p2p clients driving one in-process node of 16 shards (consumers lag
# their producers), 47-62 % of deliveries were decoded with a single broker's 2,048 a shard, 77-84 % with 1,024
# (this budget), 89-94 % with 512 (BENCHMARKS.md, twenty-fourth session).
# (With a single broker's each, a node holding 16 shards kept up to 65,536 `Message`s: ~29 MB with 256-byte
# bodies, by tracemalloc.)
NODE_RECENT_COUNT = 8 * recent.MAX_COUNT
NODE_RECENT_BYTES = 8 * recent.MAX_BYTES
MIN_SHARD_RECENT_COUNT = 64
MIN_SHARD_RECENT_BYTES = 32 * 2**10


def shard_recent_limits(shards: int) -> tuple[int, int]:
    """(messages, bytes of bodies) a generation of one shard's recent messages keeps on a node holding `shards`:
    its part of NODE_RECENT_COUNT and NODE_RECENT_BYTES, never more than a single broker keeps."""
    shards = max(shards, 1)
    return (min(recent.MAX_COUNT, max(MIN_SHARD_RECENT_COUNT, NODE_RECENT_COUNT // shards)),
            min(recent.MAX_BYTES, max(MIN_SHARD_RECENT_BYTES, NODE_RECENT_BYTES // shards)))  # fmt: skip


def shard_cache_bytes(shards: int) -> int:
    """The read cache of one shard's store on a node holding `shards`: its part of NODE_CACHE_BYTES, never more
    than a single store's default."""
    from chute.storage.postgres.store import CACHE_MAX_BYTES  # (imported when used, as `_default_broker` does)

    return max(MIN_SHARD_CACHE_BYTES, min(CACHE_MAX_BYTES, NODE_CACHE_BYTES // max(shards, 1)))


class ClusterNode:
    """Node `name` of the cluster in the PostgreSQL database at `url`.

    `shards`: the number of shards when this node sets the database up (None: the stored number, or 16 for a
    new cluster); a different number than the stored one is refused at start. `lease_s`: how long a node
    (and its shards) stays alive without a heartbeat; `heartbeat_s`: how often it renews (default: 1 s, or a
    quarter of a shorter lease). `broker_factory(shard)`
    makes the (unstarted) broker of a shard; by default a Broker over PostgresStore(url, stream="shard-<n>")."""

    def __init__(
        self,
        url: str,
        name: str,
        *,
        shards: int | None = None,
        lease_s: float = DEFAULT_LEASE_S,
        heartbeat_s: float | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        http_port: int | None = None,
        amqp_port: int | None = None,
        fsync: str = "always",
        broker_factory: Callable[[int], Broker] | None = None,
        broker_options: dict | None = None,
    ) -> None:
        if heartbeat_s is None:  # at least 4 renewals per lease: one lost heartbeat never costs the shards
            heartbeat_s = min(DEFAULT_HEARTBEAT_S, lease_s / 4)
        if not 0.05 <= heartbeat_s < lease_s:
            raise InvalidArgument(f"the heartbeat ({heartbeat_s} s) must be shorter than the lease ({lease_s} s)")
        if not name or len(name) > 200 or not name.isprintable():
            raise InvalidArgument("a node name is 1 to 200 printable characters")
        self.url = url
        self.name = name
        self.wanted_shards = shards
        self.shards = 0  # known after start
        self.lease_s = lease_s
        self.heartbeat_s = heartbeat_s
        self.fsync = fsync
        self.info = NodeInfo(name, _reachable_host(host), port, http_port, amqp_port, True)
        self.incarnation = f"{socket.gethostname()}:{secrets.token_hex(6)}"
        self.where = describe(url)
        self._factory = broker_factory or self._default_broker
        self._broker_options = broker_options or {}
        self.placement = None  # chute.cluster.placement.Placement on this node's pool, once started
        self.on_change: list[Callable[[int, bool], None]] = []  # called with (shard, held) after each change
        self._brokers: dict[int, Broker] = {}
        self._held: set[int] = set()  # shards whose rows we hold (opening, serving or closing)
        self._busy: dict[int, asyncio.Task] = {}
        self._giving: set[int] = set()  # shards being handed back (still held until their row is cleared)
        self._closing: set[asyncio.Task] = set()  # dropped brokers being severed and closed
        self._take_slots = asyncio.Semaphore(TAKE_CONCURRENCY)
        self._nodes: dict[str, NodeInfo] = {}
        self._rows: dict[int, ownership.ShardRow] = {}
        self._view_changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._pool = None
        self._listener = None
        self._loop_task: asyncio.Task | None = None
        self._expiry: asyncio.TimerHandle | None = None  # wakes the heartbeat loop when a lease ends
        self._renewed_at = 0.0  # monotonic time our last successful renewal was sent
        self._reachable = False
        self.superseded = False
        self.state = "new"  # new, starting, running, stopping, stopped
        self.takeovers = 0  # shards opened since start (for status and metrics)
        self.last_error: str | None = None

    # -- the seam -------------------------------------------------------------------------------------------

    def local_broker(self, shard: int) -> Broker | None:
        """The running broker of `shard` if this node serves it now, else None."""
        broker = self._brokers.get(shard)
        if broker is None or not self._lease_current():
            return None
        return broker

    def local_brokers(self) -> dict[int, Broker]:
        """Every shard this node serves now, with its broker."""
        return dict(self._brokers) if self._lease_current() else {}

    def owner(self, shard: int) -> NodeInfo | None:
        """Who serves `shard` as far as this node knows (its last look at the database, or itself), or None while
        nobody holds it. `alive` is False for a node whose heartbeat lapsed (its shards are about to move)."""
        if shard in self._brokers and self._lease_current():
            return self.info
        row = self._rows.get(shard)
        if row is None or row.owner is None or not row.held or row.owner == self.name:
            return None
        return self._nodes.get(row.owner)

    async def wait_owner(self, shard: int, timeout_s: float) -> NodeInfo | None:
        """The live owner of `shard`, waiting up to `timeout_s` for one (a takeover, a hand-back); None if none
        came."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.owner(shard)
            if found is not None and found.alive:
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            changed = self._view_changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), left)

    async def running(self, name: str, incarnation: str) -> bool:
        """Whether process `incarnation` still runs node `name` and is alive (AMQP's exclusive queues belong to
        a connection of one process). A view that does not say yes is read again from the database first, so a
        node that has just started is not taken for gone."""
        if name == self.name:
            return incarnation == self.incarnation
        info = self._nodes.get(name)
        if info is not None and info.alive and info.incarnation == incarnation:
            return True
        async with self._pool.acquire(timeout=self._timeout) as connection:
            nodes = await membership.nodes(connection, timeout=self._timeout)
        return any(each.name == name and each.alive and each.incarnation == incarnation for each in nodes)

    async def wait_changed(self, timeout_s: float) -> bool:
        """Wait until this node's view changes (a heartbeat read the rows, a shard was taken or handed back);
        False if `timeout_s` passed first."""
        try:
            await asyncio.wait_for(self._view_changed.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    @property
    def healthy(self) -> bool:
        """True while running and in touch with the database (its lease renewed within `lease_s`)."""
        return self.state == "running" and self._reachable and self._lease_current() and not self.superseded

    @property
    def database_reachable(self) -> bool:
        """Did this node's last heartbeat reach PostgreSQL? (Read-only, for metrics and health.)"""
        return self._reachable

    @property
    def heartbeat_age_s(self) -> float:
        """Seconds since the last heartbeat the database accepted (by this node's monotonic clock; infinite
        before the first). Past `lease_s` the node serves nothing."""
        return time.monotonic() - self._renewed_at if self._renewed_at else float("inf")

    @property
    def unhealthy_reason(self) -> str | None:
        """Why this node is not healthy, in words for `/healthz`; None while it is."""
        if self.superseded:
            return "another process runs this node name"
        if self.state != "running":
            return self.state
        if not self._reachable or not self._lease_current():
            return "cannot reach the database; writes fail"
        return None

    def status(self) -> dict:
        """This node's view of the cluster (no database call): for `/healthz`, the dashboard and the HTTP API."""
        nodes = []
        for info in sorted(self._nodes.values(), key=lambda n: n.name):
            owned = sorted(r.shard for r in self._rows.values() if r.owner == info.name and r.held)
            nodes.append({"name": info.name, "host": info.host, "port": info.port, "http_port": info.http_port,
                          "amqp_port": info.amqp_port, "alive": info.alive,
                          "heartbeat_age_s": round(info.heartbeat_age_s, 3), "shards": owned})  # fmt: skip
        local = {}
        for shard, broker in sorted(self._brokers.items()):
            with contextlib.suppress(Exception):
                queues = [q for q in broker.list_queues() if relay.relayed_queue(q.name) is None]
                local[str(shard)] = {"queues": len(queues), "topics": len(broker.list_topics()),
                                     "healthy": broker.healthy, "relay_backlog": relay.backlog(broker)}  # fmt: skip
        unowned = sorted(r.shard for r in self._rows.values() if r.owner is None or not r.held)
        return {"node": self.name, "state": self.state, "healthy": self.healthy, "shards": self.shards,
                "lease_s": self.lease_s, "store": self.where, "serving": sorted(self._brokers),
                "local": local, "nodes": nodes, "unowned": unowned, "takeovers": self.takeovers,
                "last_error": self.last_error}  # fmt: skip

    async def advertise(self, host: str | None = None, port: int | None = None, http_port: int | None = None,
                        amqp_port: int | None = None) -> None:  # fmt: skip
        """Publish this node's addresses (once its listeners are bound and their ports known)."""
        info = self.info
        self.info = NodeInfo(self.name, _reachable_host(host) if host else info.host,
                             port if port is not None else info.port,
                             http_port if http_port is not None else info.http_port,
                             amqp_port if amqp_port is not None else info.amqp_port, True)  # fmt: skip
        if self._pool is not None:
            async with self._pool.acquire() as connection:
                await membership.advertise(connection, self.info, self.incarnation, timeout=self._timeout)

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> ClusterNode:
        """Join the cluster and open this node's share of the shards. Raises InvalidArgument or StorageFailed
        (one clear line) for a database that cannot be used; nothing is held then."""
        if self.state != "new":
            raise InvalidArgument(f"cluster node is {self.state}; start() is called once")
        self.state = "starting"
        try:
            await self._connect()
        except BaseException:
            self.state = "stopped"
            await self._close_pool()
            raise
        self._loop_task = asyncio.get_running_loop().create_task(self._heartbeats())
        await self._tick()  # the first share of the shards, before the node says it is serving
        if self._busy:
            await asyncio.wait(list(self._busy.values()))
        self.state = "running"
        log.info("node %s joined the cluster at %s (%d shards, lease %.1f s); serving shards %s", self.name,
                 self.where, self.shards, self.lease_s, sorted(self._brokers) or "none yet")  # fmt: skip
        return self

    async def _connect(self) -> None:
        import asyncpg

        from chute.storage.postgres.schema import SchemaError, migrate

        try:
            settings = {"application_name": f"chute-node:{self.name}"[:63]}
            # every connection made at start: an acquire that had to connect under its timeout could be cut off
            # in the middle of the handshake, which asyncpg leaves as an unclosed socket
            self._pool = await asyncpg.create_pool(self.url, min_size=POOL_SIZE, max_size=POOL_SIZE,
                                                   timeout=self._timeout, server_settings=settings)  # fmt: skip
            async with self._pool.acquire() as connection:
                await migrate(connection)
                self.shards = await membership.setup_shards(connection, self.wanted_shards, timeout=self._timeout)
                await membership.register(connection, self.info, self.incarnation, self.lease_s,
                                          timeout=self._timeout)  # fmt: skip
            self._renewed_at = time.monotonic()
            self._reachable = True
            await self._listen()
        except InvalidArgument:
            raise
        except SchemaError as exc:
            raise StorageFailed(f"PostgreSQL at {self.where}: {exc}") from None
        except Exception as exc:
            raise StorageFailed(f"cannot join the cluster in PostgreSQL at {self.where}: {_reason(exc)}") from None
        from chute.cluster.placement import Placement

        self.placement = await Placement(self.url, self.shards, pool=self._pool).start()

    @property
    def pool(self):
        """The node's asyncpg pool (for placement lookups): POOL_SIZE connections, reconnecting by itself."""
        return self._pool

    @property
    def _timeout(self) -> float:
        return max(1.0, min(5.0, self.lease_s / 2))

    async def _listen(self) -> None:
        """A connection of its own for LISTEN: each notification wakes the heartbeat loop."""
        import asyncpg

        if self._listener is not None:
            with contextlib.suppress(Exception):
                self._listener.terminate()
            self._listener = None
        listener = await asyncpg.connect(self.url, timeout=self._timeout)
        await listener.add_listener(membership.CHANNEL, self._notified)
        self._listener = listener

    def _notified(self, connection, pid, channel, payload) -> None:
        if not payload.endswith(f" {self.name}"):
            self._wake.set()

    async def stop(self) -> None:
        """Hand back every shard (each broker closed cleanly first), leave the cluster, close. Idempotent."""
        if self.state in ("stopped", "stopping"):
            return
        self.state = "stopping"
        if self._expiry is not None:
            self._expiry.cancel()
        if self._loop_task is not None:
            # Python 3.11's wait_for can swallow a cancel that lands as `_wake` is set: the loop also ends on the
            # state, and the cancel is repeated until the task is done
            while not self._loop_task.done():
                self._loop_task.cancel()
                self._wake.set()
                await asyncio.wait({self._loop_task}, timeout=1.0)
            with contextlib.suppress(BaseException):
                await self._loop_task
        if self._busy:
            await asyncio.gather(*self._busy.values(), return_exceptions=True)
        await asyncio.gather(*(self._give(shard) for shard in list(self._held)), *self._closing,
                             return_exceptions=True)  # fmt: skip
        if self._pool is not None and self._reachable:
            with contextlib.suppress(Exception):
                async with self._pool.acquire(timeout=self._timeout) as connection:
                    await membership.leave(connection, self.name, self.incarnation, timeout=self._timeout)
        await self._close_pool()
        self.state = "stopped"
        self._changed()

    async def _close_pool(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._listener.close(), self._timeout)
            self._listener = None
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), self._timeout)
            self._pool.terminate()
            self._pool = None

    # -- heartbeats -----------------------------------------------------------------------------------------

    async def _heartbeats(self) -> None:
        """Heartbeat every `heartbeat_s`, or at once when notified, until cancelled or the node is stopping."""
        while self.state not in ("stopping", "stopped"):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.heartbeat_s)
            if self.state in ("stopping", "stopped"):
                return
            self._wake.clear()
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not end the heartbeats: the node would lose every shard
                log.exception("node %s: heartbeat failed", self.name)

    async def _tick(self) -> None:
        """One heartbeat: renew, look, then claim or hand back shards (in tasks of their own)."""
        await self._drop_failed()
        sent, asked = time.monotonic(), sorted(self._held)  # claims made meanwhile are not judged by this renewal
        try:
            async with self._pool.acquire(timeout=self._timeout) as connection:
                ours = await membership.heartbeat(connection, self.name, self.incarnation, timeout=self._timeout)
                kept = await ownership.renew(connection, asked, self.name, self.lease_s, timeout=self._timeout)
                nodes = await membership.nodes(connection, timeout=self._timeout)
                rows = await ownership.rows(connection, timeout=self._timeout)
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as exc:
            await self._unreachable(exc)
            return
        if not self._reachable:
            log.warning("node %s: PostgreSQL at %s answers again", self.name, self.where)
            with contextlib.suppress(Exception):
                await self._listen()  # notifications stopped with the old connection
        self._reachable, self.last_error = True, None
        if not ours:
            await self._superseded()
            return
        self._renewed_at = sent
        for shard in (set(asked) - kept) & self._held:
            log.warning("node %s: shard %d was taken over by %s", self.name, shard, _owner_of(rows, shard))
            await self._drop(shard)
        self._nodes = {info.name: info for info in nodes}
        self._rows = {row.shard: row for row in rows}
        self._wake_at_next_expiry(rows)
        self._changed()
        if self.state in ("starting", "running"):
            self._act(nodes, rows)

    def _wake_at_next_expiry(self, rows: list[ownership.ShardRow]) -> None:
        """Look again just after the next lease of another node's shard ends, rather than up to a heartbeat
        later: a dead node's shards are claimed as soon as their leases let them."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        ends = [row.expires_in_s for row in rows if row.held and row.owner != self.name]
        if ends and min(ends) < self.heartbeat_s:
            self._expiry = asyncio.get_running_loop().call_later(min(ends) + EXPIRY_MARGIN_S, self._wake.set)

    def _act(self, nodes: list[NodeInfo], rows: list[ownership.ShardRow]) -> None:
        alive = [info.name for info in nodes if info.alive]
        keeping = self._held - self._giving  # shards being handed back no longer count as ours
        take, give = ownership.plan(self.name, alive, rows, keeping, set(self._busy))
        for shard in take:
            self._spawn(shard, self._take(shard))
        for shard in give:
            self._spawn(shard, self._give(shard))

    def _spawn(self, shard: int, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._busy[shard] = task
        task.add_done_callback(lambda _, shard=shard: self._busy.pop(shard, None))

    async def _unreachable(self, exc: Exception) -> None:
        reason = _reason(exc)
        if self._reachable:
            log.warning("node %s: cannot reach PostgreSQL at %s: %s", self.name, self.where, reason)
        self._reachable, self.last_error = False, f"cannot reach PostgreSQL at {self.where}: {reason}"
        if self._held and not self._lease_current():
            log.error("node %s: no heartbeat for %.1f s (lease %.1f s): the others may have taken its shards "
                      "over; it stops serving shards %s", self.name, time.monotonic() - self._renewed_at,
                      self.lease_s, sorted(self._held))  # fmt: skip
            await asyncio.gather(*(self._drop(shard) for shard in list(self._held)))
        self._changed()

    async def _superseded(self) -> None:
        if not self.superseded:
            log.error("node %s: another process took the node name over (%s); this one serves nothing more",
                      self.name, self.where)  # fmt: skip
        self.superseded = True
        self.last_error = "another process runs this node name now"
        await asyncio.gather(*(self._drop(shard) for shard in list(self._held)))
        self._changed()

    def _lease_current(self) -> bool:
        return time.monotonic() - self._renewed_at < self.lease_s

    def _changed(self) -> None:
        event, self._view_changed = self._view_changed, asyncio.Event()
        event.set()

    def _announce(self, shard: int, held: bool) -> None:
        self._share_budgets()
        for callback in list(self.on_change):
            try:
                callback(shard, held)
            except Exception:
                log.exception("node %s: a shard-change callback failed", self.name)
        self._changed()

    def _share_budgets(self) -> None:
        """Give each shard served now its part of the node's cache and recent-message budgets, counting those
        claimed and still being opened (which get theirs when served)."""
        held = max(len(self._held), len(self._brokers))
        cache_bytes, recent_limits = shard_cache_bytes(held), shard_recent_limits(held)
        for broker in self._brokers.values():
            resize = getattr(broker.store, "resize_cache", None)  # (a PostgreSQL store; a test's may be another)
            if resize is not None:
                resize(cache_bytes)
            broker.core.recent.resize(*recent_limits)

    # -- taking, handing back, dropping ---------------------------------------------------------------------

    def _default_broker(self, shard: int) -> Broker:
        from chute.storage.postgres import PostgresStore

        held = max(len(self._held), 1)  # (claimed, this one included; its parts are set again once it serves)
        store = PostgresStore(self.url, stream=f"shard-{shard}", fsync_policy=self.fsync,
                              cache_max_bytes=shard_cache_bytes(held))  # fmt: skip
        broker = Broker(store=store, **self._broker_options)
        broker.core.recent.resize(*shard_recent_limits(held))
        return broker

    async def _take(self, shard: int) -> None:
        """Claim the row of `shard`, open its broker (the store's open fences the previous holder, and recovery
        makes its unacked deliveries ready again), then serve it."""
        async with self._take_slots:
            try:
                async with self._pool.acquire(timeout=self._timeout) as connection:
                    if not await ownership.claim(connection, shard, self.name, self.lease_s, timeout=self._timeout):
                        return
                    self._held.add(shard)
                    await membership.notify(connection, f"took {shard} {self.name}")
            except Exception as exc:
                log.warning("node %s: cannot claim shard %d: %s", self.name, shard, _reason(exc))
                return
            started = time.monotonic()
            broker = self._factory(shard)
            try:
                await broker.start()
            except Exception as exc:
                log.warning("node %s: cannot open shard %d: %s", self.name, shard, _reason(exc))
                with contextlib.suppress(Exception):
                    await broker.close()
                await self._release(shard)
                return
            if shard not in self._held:  # lost while opening: write nothing more
                await self._close(broker, sever=True)
                return
            if self.state not in ("starting", "running"):  # stopping: hand it back cleanly
                await self._close(broker)
                await self._release(shard)
                return
            self._brokers[shard] = broker
            self.takeovers += 1
            log.info("node %s: serving shard %d (opened in %.2f s, epoch %s)", self.name, shard,
                     time.monotonic() - started, getattr(broker.store, "epoch", "?"))  # fmt: skip
            self._announce(shard, True)

    async def _give(self, shard: int) -> None:
        """Hand `shard` back: stop serving it, close its broker cleanly (checkpoint), then clear its row."""
        self._giving.add(shard)
        try:
            broker = self._brokers.pop(shard, None)
            if broker is not None:
                self._announce(shard, False)
                await self._close(broker, sever=not self._reachable)
            await self._release(shard)
        finally:
            self._giving.discard(shard)
        log.info("node %s: handed shard %d back", self.name, shard)

    async def _release(self, shard: int) -> None:
        self._held.discard(shard)
        self._share_budgets()  # (one shard fewer claimed: the others' parts grow)
        if self._pool is None:
            return
        with contextlib.suppress(Exception):
            async with self._pool.acquire(timeout=self._timeout) as connection:
                await ownership.release(connection, shard, self.name, timeout=self._timeout)
                await membership.notify(connection, f"gave {shard} {self.name}")

    async def _drop(self, shard: int) -> None:
        """Stop serving `shard` at once, writing nothing more (it was taken from us, or we cannot tell)."""
        self._held.discard(shard)
        broker = self._brokers.pop(shard, None)
        if broker is not None:
            self._announce(shard, False)
            self._close_later(broker)

    def _close_later(self, broker: Broker) -> None:
        """Sever and close a dropped broker in a task of its own: the heartbeats never wait for it."""
        task = asyncio.get_running_loop().create_task(self._close(broker, sever=True))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _drop_failed(self) -> None:
        """Shards whose store failed (fenced, or a write's outcome unknown) are closed; still ours, they are
        claimed again by this tick's plan, and reopening recovers them from what PostgreSQL committed."""
        for shard, broker in list(self._brokers.items()):
            if not broker.healthy and shard not in self._busy:
                log.warning("node %s: shard %d failed (%s); closing it to reopen from PostgreSQL", self.name,
                            shard, getattr(broker.store, "_failure", None) or "not serving")  # fmt: skip
                self._brokers.pop(shard, None)
                self._held.discard(shard)  # our row stays: the plan claims it again (owner = us) and reopens
                self._announce(shard, False)
                self._close_later(broker)

    @staticmethod
    async def _close(broker: Broker, *, sever: bool = False) -> None:
        """Close a shard's broker; with `sever`, its connections are cut first, so nothing more is written and
        nothing waits on an unreachable database."""
        if sever:
            store = broker.store
            if hasattr(store, "sever"):
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(store.sever)
        try:
            await broker.close()
        except Exception as exc:
            log.warning("closing a shard's broker: %s", _reason(exc))


def default_node_name(port: int | None = None) -> str:
    """The name of a node started without `--node-name`: this machine's host name, so a node restarted on its
    machine takes back its shards at once; plus `-<port>` when its native port is neither the default (6160) nor
    0 (any free port), so nodes on one machine, which listen on different ports, get different names. (With
    port 0 the port changes at each start and would make each start a new node: name such nodes.)"""
    from chute.protocol.frames import DEFAULT_PORT

    host = socket.gethostname() or "chute"
    return host if port in (None, 0, DEFAULT_PORT) else f"{host}-{port}"


def _reachable_host(host: str) -> str:
    """A wildcard listening address (0.0.0.0, ::) is no address to reach: advertise this machine's name."""
    return socket.gethostname() if host in ("", "0.0.0.0", "::") else host


def _owner_of(rows: list[ownership.ShardRow], shard: int) -> str:
    for row in rows:
        if row.shard == shard:
            return row.owner or "nobody"
    return "nobody"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return redact(text.splitlines()[0])
