"""Handlers of /api/v1/queues/...: queues (create, list, describe, update, delete, stats, purge, redrive) and
their messages (publish, peek, receive with long polling, ack, nack, extend).

Invariants: a queue route only ever acts on a queue (a topic of the same name is `queue_not_found`); a receive
whose client goes away, or whose handler is cancelled, gives back what it leased at once (no message waits for
a lease nobody will settle); a reply carries at most `max_messages` deliveries and about `REPLY_BODY_BYTES` of
bodies.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import inspect

from aiohttp import web

from chute.errors import InvalidArgument
from chute.model import Delivery, Publish, QueueInfo
from chute.server.api import models as m
from chute.server.api.call import Call

REPLY_BODY_BYTES = 8 * 2**20  # bodies per receive / peek reply (a delivery of one larger message still goes)
DISCONNECT_POLL_S = 0.2  # how soon a long poll notices its client is gone


# -- conversions ----------------------------------------------------------------------------------------------


def body_bytes(message: m.PublishMessage, index: int | None = None) -> bytes:
    where = "body" if index is None else f"messages[{index}].body"
    if message.body_encoding == "base64":
        try:
            return base64.b64decode(message.body, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidArgument(f"{where} is not valid base64") from None
    try:
        return message.body.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{where} is not valid UTF-8 text") from None


def to_publish(message: m.PublishMessage, index: int | None = None) -> Publish:
    return Publish(body=body_bytes(message, index), headers=message.headers, priority=message.priority,
                   delay_s=message.delay_s, ttl_s=message.ttl_s, group=message.group, dedup_id=message.dedup_id,
                   subject=message.subject)  # fmt: skip


def delivery_out(delivery: Delivery) -> m.DeliveryOut:
    message = delivery.message
    try:
        body, encoding = message.body.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        body, encoding = base64.b64encode(message.body).decode("ascii"), "base64"
    out = m.MessageOut(id=str(message.id), body=body, body_encoding=encoding, headers=message.headers,
                       publish_time=message.publish_time, priority=message.priority, subject=message.subject,
                       group=message.group, dedup_id=message.dedup_id, expires_at=message.expires_at)  # fmt: skip
    receipt = delivery.receipt
    return m.DeliveryOut(queue=delivery.queue, receipt=str(receipt) if receipt else None,
                         delivery_count=delivery.delivery_count,
                         lease_deadline=delivery.lease_deadline if receipt else None, message=out,
                         dead_letter_reason=delivery.dead_letter_reason,
                         dead_letter_source=delivery.dead_letter_source)  # fmt: skip


def _cut(deliveries: list[Delivery], max_bytes: int = REPLY_BODY_BYTES) -> int:
    """How many of `deliveries` fit `max_bytes` of bodies (at least one)."""
    total = 0
    for count, delivery in enumerate(deliveries):
        total += len(delivery.message.body)
        if total > max_bytes and count:
            return count
    return len(deliveries)


def _receipts(ids: list[str]) -> list[int]:
    return [int(receipt) for receipt in ids]


def detail(call: Call, info: QueueInfo, sources: dict[str, list[str]]) -> m.QueueDetail:
    return m.QueueDetail(name=info.name, settings=info.settings, ephemeral=info.ephemeral,
                         stats=call.broker.queue_stats(info.name),
                         dead_letter_sources=sources.get(info.name, []))  # fmt: skip


def dead_letter_sources(call: Call) -> dict[str, list[str]]:
    sources: dict[str, list[str]] = {}
    for queue in sorted(call.broker.core.queues.values(), key=lambda q: q.name):
        dlq = queue.settings.dead_letter_queue
        if dlq is not None:
            sources.setdefault(dlq, []).append(queue.name)
    return sources


# -- queues ---------------------------------------------------------------------------------------------------


async def list_queues(call: Call) -> m.QueueList:
    listed = call.broker.list_queues()
    listed = await listed if inspect.isawaitable(listed) else listed  # a cluster's router asks other nodes
    visible = [q for q in listed if call.principal.can_see("queue", q.name)]
    if not getattr(call.broker, "routed", False):
        sources = dead_letter_sources(call)
        return m.QueueList(queues=[detail(call, info, sources) for info in visible])
    sources: dict[str, list[str]] = {}  # a cluster's: every shard's queues by their real dead-letter queues
    for info in listed:
        if info.settings.dead_letter_queue is not None:
            sources.setdefault(info.settings.dead_letter_queue, []).append(info.name)
    stats = await asyncio.gather(*(_awaited(call.broker.queue_stats(q.name)) for q in visible), return_exceptions=True)
    return m.QueueList(queues=[
        m.QueueDetail(name=info.name, settings=info.settings, ephemeral=info.ephemeral, stats=found,
                      dead_letter_sources=sources.get(info.name, []))
        for info, found in zip(visible, stats, strict=True) if not isinstance(found, BaseException)
    ])  # fmt: skip


async def _awaited(value):
    return await value if inspect.isawaitable(value) else value


async def create_queue(call: Call) -> tuple[int, m.QueueDetail]:
    existed = call.name in call.broker.core.queues
    info = await call.broker.create_queue(call.name, call.body)
    return (200 if existed else 201), await _detail(call, info)


async def get_queue(call: Call) -> m.QueueDetail:
    return await _detail(call, await _awaited(call.broker.queue_info(call.name)))


async def update_queue(call: Call) -> m.QueueDetail:
    info = await call.broker.update_queue(call.name, **m.changes_of(call.body))
    return await _detail(call, info)


async def _detail(call: Call, info: QueueInfo) -> m.QueueDetail:
    """One queue's detail; in a cluster its dead-letter sources may live in other shards (the router asks them)."""
    sources = await _awaited(call.broker.dead_letter_sources(info.name))
    return detail(call, info, {info.name: sources})


async def delete_queue(call: Call) -> None:
    await call.broker.delete_queue(call.name)


async def queue_stats(call: Call):
    return call.broker.queue_stats(call.name)


async def purge_queue(call: Call) -> m.Purged:
    return m.Purged(purged=await call.broker.purge_queue(call.name))


async def redrive(call: Call) -> m.Redriven:
    return m.Redriven(moved=await call.broker.redrive(call.name, call.body.max_messages))


# -- messages -------------------------------------------------------------------------------------------------


async def publish_one(call: Call) -> m.Published:
    """Publish the body's one message to `call.name` (the caller checked it is a queue, or a topic)."""
    [message_id] = await call.broker.publish_batch(call.name, [to_publish(call.body)])
    return m.Published(id=str(message_id))


async def publish_many(call: Call) -> m.PublishedBatch:
    """Publish the body's messages, in order, to `call.name` (checked by the caller, as for publish_one)."""
    messages = [to_publish(message, i) for i, message in enumerate(call.body.messages)]
    return m.PublishedBatch(ids=[str(i) for i in await call.broker.publish_batch(call.name, messages)])


async def publish(call: Call) -> m.Published:
    call.broker.core.queue(call.name)  # a queue route never publishes to a topic
    return await publish_one(call)


async def publish_batch(call: Call) -> m.PublishedBatch:
    call.broker.core.queue(call.name)
    return await publish_many(call)


async def peek(call: Call) -> m.MessageList:
    deliveries = await call.broker.peek(call.name, call.query["max_messages"])
    return m.MessageList(messages=[delivery_out(d) for d in deliveries[: _cut(deliveries)]])


async def receive(call: Call) -> m.DeliveryList:
    request, broker, name = call.body, call.broker, call.name
    broker.core.queue(name)
    leasing = broker.receive(name, request.max_messages, wait_s=request.wait_s, lease_s=request.lease_s,
                             max_bytes=REPLY_BODY_BYTES)  # fmt: skip
    deliveries = await while_connected(call, leasing) if request.wait_s > 0 else await leasing
    if _gone(call.request):  # nobody will read the reply: give the messages back now
        _release(call, deliveries)
        deliveries = []
    return m.DeliveryList(deliveries=[delivery_out(d) for d in deliveries])


async def while_connected(call: Call, leasing) -> list[Delivery]:
    """Run a long poll; end it early (with []) if the client disconnects. If this handler is cancelled, what the
    poll leased is released, whenever the poll ends."""
    task = asyncio.ensure_future(leasing)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                break
            if _gone(call.request):
                task.cancel()
                await asyncio.wait({task})
                break
    except asyncio.CancelledError:
        task.cancel()
        task.add_done_callback(lambda done: _release_result(call, done))
        raise
    if task.cancelled():
        return []
    return task.result()


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _release(call: Call, deliveries: list[Delivery]) -> None:
    receipts = [d.receipt for d in deliveries if d.receipt]
    if receipts:
        call.broker.release(call.name, receipts)


def _release_result(call: Call, task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is None:
        _release(call, task.result())


async def ack(call: Call) -> m.Empty:
    await call.broker.ack(call.name, _receipts(call.body.receipts))
    return m.Empty()


async def nack(call: Call) -> m.Empty:
    body = call.body
    await call.broker.nack(call.name, _receipts(body.receipts), delay_s=body.delay_s, dead_letter=body.dead_letter)
    return m.Empty()


async def extend(call: Call) -> m.Empty:
    await call.broker.extend(call.name, _receipts(call.body.receipts), call.body.lease_s)
    return m.Empty()
