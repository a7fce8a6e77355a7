"""Peers: the connections a node keeps to the other nodes of its cluster, to forward calls to a shard's owner.

One `Peer` per other node (by name and native address), holding one `chute.AsyncClient` (requests are
pipelined by correlation id, so one connection carries every forwarded call, long polls included; it reconnects
by itself). A `Peer` offers the part of `chute.Broker`'s API the router forwards, with the same signatures.

Forwarded calls are marked: the connection says `PEER_CLIENT` in its HELLO, and the receiving node's session then
serves it through the router's local view, which never forwards again (no loops): a call for a shard the
receiver does not own fails there with `unavailable`, and the sender looks up the owner again.

Invariants: receipts are passed through untouched (opaque; the owner's broker issued them); an error of the
owner comes back as the same ChuteError; a connection that breaks during a call becomes `unavailable` (retryable;
the call's outcome is unknown, as with any lost connection). Settling over the wire has no `lapsed` acks and no
release: a release is a nack without delay (ready again at once), which is what a release does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from chute.client import AsyncClient
from chute.errors import ChuteError, ConnectionLost, RequestTimeout, Unavailable
from chute.model import Delivery, Publish, QueueInfo, QueueStats, SubscriptionInfo, TopicInfo
from chute.protocol import messages as m
from chute.protocol.frames import Op

log = logging.getLogger("chute.cluster")
PEER_CLIENT = "chute-peer"  # HELLO's client name on forwarding connections: "chute-peer <node name>"
PEER_TIMEOUT_S = 30.0  # a forwarded call's own timeout (a long poll gets its wait on top)
CLOSE_S = 5.0  # how long closing the pool waits for its connections to end


class Peer:
    """Another node, reached over the native protocol. Methods mirror `chute.Broker`'s."""

    def __init__(self, name: str, url: str, *, origin: str, token: str | None = None,
                 tls_ca: str | None = None) -> None:  # fmt: skip
        self.name = name
        self.url = url
        self._options = {"token": token, "tls_ca": tls_ca, "timeout": PEER_TIMEOUT_S, "connect_timeout": 5.0,
                         "name": f"{PEER_CLIENT} {origin}", "linger_s": 0.0, "reconnect": False}  # fmt: skip
        self._client: AsyncClient | None = None
        self._connecting: asyncio.Task | None = None
        self._closing: set[asyncio.Task] = set()  # clients of lost connections being closed
        self.closed = False

    async def _ready(self) -> AsyncClient:
        """The connected client; a new one after a lost connection (no reconnect loop: a call for a dead node
        must fail at once, so the router can look for the shard's next owner)."""
        if self._connecting is None:
            self._client = AsyncClient(self.url, **self._options)
            self._connecting = asyncio.ensure_future(self._client.connect())
        client, connecting = self._client, self._connecting
        try:
            await asyncio.shield(connecting)
        except ChuteError as exc:
            self._drop(connecting)
            raise Unavailable(f"node {self.name} ({self.url}) cannot be reached: {exc.message}") from None
        return client

    def _drop(self, connecting: asyncio.Task) -> None:
        if self._connecting is connecting:
            self._connecting, client = None, self._client
            if client is not None:
                task = asyncio.ensure_future(client.close())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
                task.add_done_callback(lambda done: done.cancelled() or done.exception())

    async def _do(self, call):
        client = await self._ready()
        connecting = self._connecting
        try:
            return await call(client)
        except (ConnectionLost, RequestTimeout) as exc:
            self._drop(connecting)
            raise Unavailable(f"node {self.name} was lost during the call (its outcome is unknown): "
                              f"{exc.message}") from None  # fmt: skip
        except ChuteError as exc:
            if client._fatal is not None or client.closed:  # the connection ended: the next call opens another
                self._drop(connecting)
            if exc.name == "broker_closed" and client._fatal is not None:
                raise Unavailable(f"node {self.name} is gone: {exc.message}") from None
            raise

    async def _manage(self, method: str, kind, **args):
        return await self._do(lambda client: client._manage(method, kind, **args))

    async def close(self) -> None:
        self.closed = True
        closing = [*self._closing]
        if self._client is not None and self._connecting is not None:
            closing.append(asyncio.ensure_future(self._client.close()))
        if closing:
            await asyncio.wait(closing, timeout=CLOSE_S)

    # -- messages ---------------------------------------------------------------------------------------------

    async def publish_batch(self, dest: str, messages: Sequence[Publish]) -> list[int]:
        return await self._do(lambda client: client.publish_batch(dest, list(messages)))

    async def receive(self, queue: str, max_messages: int = 1, *, wait_s: float = 0.0, lease_s: float | None = None,
                      max_bytes: int | None = None) -> list[Delivery]:  # fmt: skip
        return await self._do(lambda client: client.receive(queue, max_messages, wait_s=wait_s, lease_s=lease_s))

    async def ack(self, queue: str, receipts: int | Sequence[int], *, lapsed: bool = False,
                  dead_lettered: bool = False) -> None:  # fmt: skip
        receipts = [receipts] if isinstance(receipts, int) else list(receipts)
        request = m.AckRequest(queue=queue, receipts=receipts, dead_lettered=dead_lettered)
        await self._do(lambda client: client._call(Op.ACK, request, m.Empty))

    async def nack(self, queue: str, receipts: int | Sequence[int], *, delay_s: float = 0.0,
                   dead_letter: bool = False) -> None:  # fmt: skip
        receipts = [receipts] if isinstance(receipts, int) else list(receipts)
        request = m.NackRequest(queue=queue, receipts=receipts, delay_s=delay_s, dead_letter=dead_letter)
        await self._do(lambda client: client._call(Op.NACK, request, m.Empty))

    async def extend(self, queue: str, receipts: int | Sequence[int], lease_s: float) -> None:
        receipts = [receipts] if isinstance(receipts, int) else list(receipts)
        request = m.ExtendRequest(queue=queue, receipts=receipts, lease_s=lease_s)
        await self._do(lambda client: client._call(Op.EXTEND, request, m.Empty))

    async def release(self, queue: str, receipts: Sequence[int]) -> None:
        if receipts:
            with contextlib.suppress(ChuteError):  # leases that ended meanwhile, a node gone: they come back anyway
                await self.nack(queue, list(receipts))

    async def subscribe_ephemeral(self, topic: str, pattern: str = ">", *, filter: dict | None = None,
                                  prefetch: int = 256):  # fmt: skip
        """An ephemeral subscription on the owner, consumed over this connection (an `AsyncConsumer`)."""
        return await self._do(lambda client: client.subscribe_ephemeral(topic, pattern, filter=filter,
                                                                        prefetch=prefetch))  # fmt: skip

    async def peek(self, queue: str, max_messages: int = 10) -> list[Delivery]:
        return await self._manage("peek", list[Delivery], queue=queue, max_messages=max_messages)

    async def redrive(self, queue: str, max_messages: int | None = None) -> int:
        return await self._manage("redrive", int, queue=queue, max_messages=max_messages)

    # -- management -------------------------------------------------------------------------------------------

    async def create_queue(self, name: str, **settings) -> QueueInfo:
        return await self._manage("create_queue", QueueInfo, name=name, **settings)

    async def update_queue(self, name: str, **changes) -> QueueInfo:
        return await self._manage("update_queue", QueueInfo, name=name, **changes)

    async def delete_queue(self, name: str) -> None:
        await self._manage("delete_queue", None, name=name)

    async def purge_queue(self, name: str, *, in_flight: bool = False) -> int:
        return await self._manage("purge_queue", int, name=name, in_flight=in_flight)

    async def list_queues(self) -> list[QueueInfo]:
        return await self._manage("list_queues", list[QueueInfo])

    async def queue_stats(self, name: str) -> QueueStats:
        return await self._manage("queue_stats", QueueStats, name=name)

    async def create_topic(self, name: str, **settings) -> TopicInfo:
        return await self._manage("create_topic", TopicInfo, name=name, **settings)

    async def update_topic(self, name: str, **changes) -> TopicInfo:
        return await self._manage("update_topic", TopicInfo, name=name, **changes)

    async def delete_topic(self, name: str) -> None:
        await self._manage("delete_topic", None, name=name)

    async def list_topics(self) -> list[TopicInfo]:
        return await self._manage("list_topics", list[TopicInfo])

    async def topic_info(self, name: str) -> TopicInfo:
        return await self._manage("topic_info", TopicInfo, name=name)

    async def queue_info(self, name: str) -> QueueInfo:
        return await self._manage("queue_info", QueueInfo, name=name)

    async def route(self, topic: str, subject: str, headers: dict[str, str] | None = None) -> list[str]:
        return await self._manage("route", list[str], topic=topic, subject=subject, headers=headers)

    async def dead_letter_sources(self, name: str) -> list[str]:
        return await self._manage("dead_letter_sources", list[str], name=name)

    async def subscribe(self, topic: str, pattern: str, queue: str, *, filter: dict | None = None,
                        start: str | float = "now") -> SubscriptionInfo:  # fmt: skip
        return await self._manage("subscribe", SubscriptionInfo, topic=topic, pattern=pattern, queue=queue,
                                  filter=filter, start=start)  # fmt: skip

    async def update_subscription(self, topic: str, pattern: str, queue: str, *,
                                  filter: dict | None = None) -> SubscriptionInfo:  # fmt: skip
        return await self._manage("update_subscription", SubscriptionInfo, topic=topic, pattern=pattern,
                                  queue=queue, filter=filter)  # fmt: skip

    async def unsubscribe(self, topic: str, pattern: str, queue: str) -> None:
        await self._manage("unsubscribe", None, topic=topic, pattern=pattern, queue=queue)


class Peers:
    """The pool: one `Peer` per other node, made on first use, replaced when the node's address changes."""

    def __init__(self, origin: str, *, token: str | None = None, tls: bool = False,
                 tls_ca: str | None = None) -> None:  # fmt: skip
        self.origin = origin
        self.token = token
        self.scheme = "chutes" if tls else "chute"
        self.tls_ca = tls_ca
        self._peers: dict[str, Peer] = {}
        self._closing: set[asyncio.Task] = set()

    def get(self, owner) -> Peer:
        """The peer for `owner` (a NodeInfo: name, host, port)."""
        host = f"[{owner.host}]" if ":" in owner.host else owner.host
        url = f"{self.scheme}://{host}:{owner.port}"
        peer = self._peers.get(owner.name)
        if peer is None or peer.url != url:
            if peer is not None:  # the node moved (restarted elsewhere): its old connection ends
                task = asyncio.ensure_future(peer.close())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
            peer = self._peers[owner.name] = Peer(owner.name, url, origin=self.origin, token=self.token,
                                                  tls_ca=self.tls_ca)  # fmt: skip
        return peer

    async def close(self) -> None:
        peers, self._peers = list(self._peers.values()), {}
        await asyncio.gather(*(peer.close() for peer in peers), *self._closing, return_exceptions=True)
