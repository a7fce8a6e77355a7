"""Handlers of the server's own routes: overview, connections and consumers of the native protocol, login and
whoami.

Invariants: the overview's totals sum only the queues the caller may see; consumers are listed only on queues
the caller may see; connections only for a superuser (the route says so).
"""

from __future__ import annotations

import inspect
import time

import msgspec
from aiohttp import web

from chute.errors import ChuteError
from chute.server import auth
from chute.server.api import models as m
from chute.server.api.call import Call

TOTALS = tuple(msgspec.structs.fields(m.Totals))
STARTED = web.AppKey("chute.api.started", float)  # when the HTTP app was made: the server's start


def _version(call: Call) -> str:
    return call.server.name.partition("/")[2] or call.server.name


def _consumers(session) -> list[m.ConsumerInfo]:
    return [
        m.ConsumerInfo(
            id=consumer.id,
            connection_id=session.id,
            queue=consumer.queue,
            prefetch=consumer.prefetch,
            unacked=len(consumer.outstanding),
        )  # fmt: skip
        for consumer in list(session.consumers.values())
    ]


async def overview(call: Call) -> m.Overview:
    broker, server, principal = call.broker, call.server, call.principal
    totals = {f.name: 0 for f in TOTALS}
    listed = broker.list_queues()
    listed = await listed if inspect.isawaitable(listed) else listed  # a cluster's router asks other nodes
    queues = [q for q in listed if principal.can_see("queue", q.name)]
    for queue in queues:
        stats = broker.queue_stats(queue.name)
        if inspect.isawaitable(stats):
            try:
                stats = await stats
            except ChuteError:  # deleted meanwhile, or its node is being taken over
                continue
        for name in totals:
            totals[name] += getattr(stats, name)
    if getattr(broker, "routed", False):
        topic_names = [t.name for t in await _awaited(broker.list_topics())]
    else:
        topic_names = list(broker.core.topics)
    topics = [t for t in topic_names if principal.can_see("topic", t)]
    store = broker.store.stats()
    sessions = list(server.sessions)
    amqp = _amqp_sessions(server)
    return m.Overview(
        version=_version(call), state=server.state, uptime_s=max(0.0, time.time() - call.request.app[STARTED]),
        time=time.time(), queues=len(queues), topics=len(topics), connections=len(sessions) + len(amqp),
        consumers=sum(len(s.consumers) for s in sessions) + sum(len(s.consumer_list()) for s in amqp),
        totals=m.Totals(**totals),
        storage=m.StorageInfo(log_bytes=store.bytes_on_disk, segments=store.segments, read_only=broker.store.read_only),
    )  # fmt: skip


async def _awaited(value):
    return await value if inspect.isawaitable(value) else value


async def connections(call: Call) -> m.ConnectionList:
    items = [
        m.ConnectionInfo(
            id=s.id,
            peer=s.peer,
            client_name=s.client_name,
            user=s.principal.name,
            connected_at=s.connected_at,
            consumers=_consumers(s),
            leased=sum(len(receipts) for receipts in s.leased.values()),
        )  # fmt: skip
        for s in sorted(call.server.sessions, key=lambda s: s.id)
    ]
    items += [msgspec.convert(s.describe(), m.ConnectionInfo) for s in _amqp_sessions(call.server)]
    items.sort(key=lambda c: c.id)
    return m.ConnectionList(connections=items)


def _amqp_sessions(server) -> list:
    """The AMQP front's connections (chute.amqp), listed beside the native ones."""
    front = getattr(server, "amqp", None)
    return sorted(front.sessions, key=lambda s: s.id) if front is not None else []


async def consumers(call: Call) -> m.ConsumerList:
    items = [
        consumer
        for session in sorted(call.server.sessions, key=lambda s: s.id)
        for consumer in _consumers(session)
        if call.principal.can_see("queue", consumer.queue)
    ]
    items += [msgspec.convert(c, m.ConsumerInfo) for s in _amqp_sessions(call.server) for c in s.consumer_list()
              if call.principal.can_see("queue", c["queue"])]  # fmt: skip
    items.sort(key=lambda c: c.connection_id)
    return m.ConsumerList(consumers=items)


async def login(call: Call) -> m.LoginReply:
    token, expires_s = await auth.login(call.request, call.body.user, call.body.password)
    return m.LoginReply(token=token, expires_s=expires_s)


async def whoami(call: Call) -> m.WhoAmI:
    answer = auth.whoami(call.request, call.principal)
    if inspect.isawaitable(answer):
        answer = await answer
    return msgspec.convert(answer, m.WhoAmI)
