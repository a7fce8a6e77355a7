"""basic.*, confirm.select and channel.flow: publishing, consuming, getting and settling messages.

Publishing: a run of consecutive basic.publish on a channel becomes one `Broker.publish_batch` per destination
(the default exchange publishes to the queue named by the routing key; an exchange to its topic, with the routing
key as the subject; an exchange with exchange-to-exchange or typed headers bindings, or an alternate exchange,
to the queues the front routes it to, routing.py, with one `Broker.publish_many`). Unroutable messages are not
stored: with `mandatory` they come back as basic.return (312 NO_ROUTE) before their confirm. In confirm mode,
basic.ack goes out once the broker's durable confirm came (so a confirm means durable, as on every front);
basic.nack when the broker refused the message (a full queue with x-overflow reject-publish, a storage failure).

Consuming: see channel.py (prefetch, leases, settling).
"""

from __future__ import annotations

import asyncio
import functools
import secrets
from typing import TYPE_CHECKING

from pamqp import commands

from chute.amqp import exchanges as ex
from chute.amqp import publish_routing, reply_to, routing, state
from chute.amqp.channel import AmqpConsumer, lease_s
from chute.amqp.declare import _no_exchange, _no_queue, _owned_elsewhere, queue_name
from chute.amqp.errors import (
    ACCESS_REFUSED,
    NO_ROUTE,
    NOT_ALLOWED,
    NOT_IMPLEMENTED,
    PRECONDITION_FAILED,
    AmqpError,
    connection_error,
    from_chute,
)
from chute.amqp.mapping import EXCHANGE_HEADER, ROUTING_KEY_HEADER, to_publish
from chute.errors import BrokerClosed, ChuteError, QueueFull, QueueNotFound, TopicNotFound
from chute.server.auth import check

if TYPE_CHECKING:
    from chute.amqp.channel import Channel
    from chute.amqp.connection import Content
    from chute.amqp.session import AmqpSession

MAX_BATCH = 1000  # publishes taken together into one broker call


# -- publishing -------------------------------------------------------------------------------------------------


def publish(session: AmqpSession, channel: Channel, batch: list[Content]) -> asyncio.Task | None:
    """Route a run of publishes and start their broker calls (one task per destination run), in order. On a
    cluster node, what routing needs is read first (publish_routing.py), in a task (returned) that runs after
    the channel's previous one. Acks, nacks and rejections that came before are carried out first (an ack that
    frees room in a full queue precedes the publish it came before); while some are still under way (a nack, a
    rejection republished with x-death), the batch waits for them in a task (returned), and the channel's later
    batches after it."""
    settling = session.flush_settles() + [task for task in session.settling if not task.done()]
    if session.front.routed:
        return publish_routing.start(session, channel, batch, _publish, after=settling)
    previous = channel.routing
    if not settling and (previous is None or previous.done()):
        _publish(session, channel, batch, CoreFacts(session.broker.core))
        return None
    task = session.spawn(_publish_after(session, channel, batch, previous, settling))
    channel.routing = task
    channel.publishing.add(task)
    task.add_done_callback(channel.publishing.discard)
    return task


async def _publish_after(session: AmqpSession, channel: Channel, batch: list[Content], previous, settling) -> None:
    waits = settling + ([previous] if previous is not None and not previous.done() else [])
    await asyncio.wait(waits)
    if not (channel.closed or session.closed):
        _publish(session, channel, batch, CoreFacts(session.broker.core))


class CoreFacts:
    """What routing a publish needs to know, read from one broker's core at once."""

    __slots__ = ("core",)

    def __init__(self, core) -> None:
        self.core = core

    def exchange(self, book, name: str) -> dict | None:
        return book.exchanges.get(name)

    def has_queue(self, name: str, mandatory: bool) -> bool:
        return name in self.core.queues

    def routes(self, topic: str, subject: str, headers: dict, mandatory: bool) -> bool:
        found = self.core.topics.get(topic)
        return found is not None and bool(found.route(subject, headers))

    def queues(self, topic: str, subject: str, headers: dict) -> list[str]:
        found = self.core.topics.get(topic)
        return [queue.name for queue in found.route(subject, headers)] if found is not None else []

    def zero_word_queues(self, topic: str, headers: dict) -> list[str]:
        found = self.core.topics.get(topic)
        if found is None:
            return []
        zero = {s.queue.name for (pattern, _), s in found.subscriptions.items() if pattern in ex.ZERO_WORD_PATTERNS}
        return [queue.name for queue in found.route(ex.FANOUT_SUBJECT, headers) if queue.name in zero]

    def existing(self, names: set[str]) -> set[str]:
        return names.intersection(self.core.queues)


def _publish(session: AmqpSession, channel: Channel, batch: list[Content], facts) -> None:
    group_dest, group = None, []
    for content in batch:
        try:
            user_id = content.properties.user_id if content.properties is not None else None
            if user_id and user_id != session.user_name:  # as RabbitMQ: a message cannot claim another user
                raise AmqpError(PRECONDITION_FAILED, f"user_id property set to '{user_id}' but authenticated user "
                                f"was '{session.user_name}'")  # fmt: skip
            reply_to.stamp(channel, content)
            if reply_to.is_reply(content):  # direct reply-to: straight to the requesting channel, not stored
                dest, message, routable = None, None, reply_to.deliver(session, content)
                if routable:
                    _flush(session, channel, group_dest, group)
                    group_dest, group = None, []
                    if channel.confirm:
                        channel.publish_seq += 1
                        _confirm_now(session, channel, channel.publish_seq)
                    continue
            else:
                dest, message, routable = _route(session, content, facts)
        except (AmqpError, ChuteError) as exc:
            _flush(session, channel, group_dest, group)
            if isinstance(exc, ChuteError):
                exc = from_chute(exc)
            exc.blame(content.method)
            if exc.connection:
                session.fail(exc)
            else:
                session.channel_error(channel.number, exc)
            return
        seq = 0
        if channel.confirm:
            channel.publish_seq += 1
            seq = channel.publish_seq
            channel.unconfirmed.add(seq)
        if not routable:
            method = content.method
            if method.mandatory:
                session.write(session.conn.send_content(channel.number, commands.Basic.Return(
                    reply_code=NO_ROUTE, reply_text="NO_ROUTE", exchange=method.exchange,
                    routing_key=method.routing_key), content.properties, content.body))  # fmt: skip
            if seq:
                _confirm(session, channel, [seq], True)
            continue
        if dest != group_dest:
            _flush(session, channel, group_dest, group)
            group_dest, group = dest, []
        group.append((message, seq))
    _flush(session, channel, group_dest, group)


def _confirm_now(session: AmqpSession, channel: Channel, seq: int) -> None:
    """basic.ack for a publish that needs no broker call, after the publishes before it were confirmed."""
    earlier = list(channel.publishing)
    channel.unconfirmed.add(seq)
    if not earlier:
        _confirm(session, channel, [seq], True)
        return

    async def after() -> None:
        await asyncio.wait(earlier)
        _confirm(session, channel, [seq], True)

    task = session.spawn(after())
    channel.publishing.add(task)
    task.add_done_callback(channel.publishing.discard)


def _route(session: AmqpSession, content: Content, facts):
    """(destination, Chute publish, routable) of one basic.publish; AmqpError for a refused one."""
    method = content.method
    if method.immediate:
        raise connection_error(NOT_IMPLEMENTED, "immediate=true", method)
    exchange, key = method.exchange, method.routing_key
    if not exchange:
        if not key:
            return "", None, False
        key = ex.chute_queue(key)
        check(session.principal, "publish", "queue", key)
        return key, to_publish(content.properties, content.body), facts.has_queue(key, method.mandatory)
    declared = facts.exchange(session.front.book, exchange)
    dest = ex.topic_name(exchange)
    if declared is None:
        raise _no_exchange(exchange)
    if declared["internal"]:
        raise AmqpError(ACCESS_REFUSED, f"cannot publish to internal exchange '{exchange}' in vhost '/'")
    check(session.principal, "publish", "topic", dest)
    kind = declared["type"]
    if session.front.book.front_routed(exchange) or (kind == "topic" and not key):
        return _route_by_front(session, content, exchange, facts)
    subject = ex.HEADERS_SUBJECT if kind == "headers" else ex.subject(key)
    if subject is None and kind == "fanout":
        subject = ex.FANOUT_SUBJECT
    message = to_publish(content.properties, content.body, subject)
    headers = message.headers if message.headers is not None else {}
    headers[EXCHANGE_HEADER] = exchange
    if kind == "headers":
        headers[ROUTING_KEY_HEADER] = key
    message.headers = headers
    routable = subject is not None and facts.routes(dest, subject, headers, method.mandatory)
    return dest, message, routable


def _route_by_front(session: AmqpSession, content: Content, exchange: str, facts):
    """(queues, Chute publish, routable) of a publish routed by the front (routing.py): the queues reached from
    `exchange` through its bindings and its exchange-to-exchange bindings, each once. An exchange whose bindings
    take the message nowhere (no queue, no exchange) passes it on to its alternate exchange, as RabbitMQ does;
    every exchange is visited once, so a loop of alternates ends."""
    method = content.method
    key, table = method.routing_key, (content.properties.headers if content.properties is not None else None)
    book = session.front.book
    message = to_publish(content.properties, content.body)
    headers = message.headers if message.headers is not None else {}
    headers[EXCHANGE_HEADER] = exchange
    headers[ROUTING_KEY_HEADER] = key
    message.headers = headers
    subject = ex.subject(key)
    queues: set[str] = set()
    seen, todo = {exchange}, [exchange]
    while todo:
        name = todo.pop()
        declared = facts.exchange(book, name)
        if declared is None:
            continue
        kind = declared["type"]
        routed_subject = ex.HEADERS_SUBJECT if kind == "headers" else subject
        if routed_subject is None and kind == "fanout":
            routed_subject = ex.FANOUT_SUBJECT
        if kind == "topic" and not key:  # no words: only the bindings that match none (see exchanges.py)
            reached = set(facts.zero_word_queues(ex.topic_name(name), headers))
        elif routed_subject is not None:
            reached = set(facts.queues(ex.topic_name(name), routed_subject, headers))
        else:
            reached = set()
        if kind == "headers":
            reached.update(b["queue"] for b in book.bindings if b["exchange"] == name and "table" in b
                           and routing.headers_match(routing.arguments_of(b), table))  # fmt: skip
        onward = [binding["destination"] for binding in book.exchange_bindings
                  if binding["source"] == name and routing.binding_matches(kind, binding, key, table)]  # fmt: skip
        alternate = ex.alternate_of(declared)
        if not reached and not onward and alternate is not None:
            onward.append(alternate)
        queues.update(reached)
        for destination in onward:
            if destination not in seen:
                seen.add(destination)
                todo.append(destination)
    queues = facts.existing(queues)
    return tuple(sorted(queues)), message, bool(queues)


def _flush(session: AmqpSession, channel: Channel, dest: str | tuple | None, group: list) -> None:
    if not group:
        return
    if isinstance(dest, str) and not session.front.routed:
        _publish_now(session, channel, dest, group)
        return
    task = session.spawn(_commit(session, channel, dest, group))
    channel.publishing.add(task)
    task.add_done_callback(channel.publishing.discard)


def _publish_now(session: AmqpSession, channel: Channel, dest: str, group: list) -> None:
    """One destination on one broker, without a task: prepared now, confirmed by the broker's own callback once
    durable and placed (as the native session's `_publish_now`); a lone publish costs no task and no extra turn
    of the loop. `channel.publishing` holds the store's future meanwhile (the channel's next method waits for it,
    and the broker places the messages before any waiter resumes)."""
    messages = [message for message, _ in group]
    seqs = [seq for _, seq in group if seq]
    size = sum([len(message.body) for message in messages])
    then = functools.partial(_published, session, channel, seqs, size)
    try:
        _, future = session.broker._publish(dest, messages, then)
    except ChuteError as exc:
        _refused(session, channel, seqs, exc)
        return
    if future is None:  # nothing to wait for (every message a repeated dedup id)
        _confirm(session, channel, seqs, True)
        return
    session.server.publishing(session, size)  # unconfirmed bytes count against the memory high-water mark
    if future not in channel.publishing:
        channel.publishing.add(future)
        future.add_done_callback(channel.publishing.discard)


def _published(session: AmqpSession, channel: Channel, seqs: list[int], size: int, _ids, error) -> None:
    session.server.publishing(session, -size)
    if error is None:
        _confirm(session, channel, seqs, True)
    elif isinstance(error, ChuteError):
        _refused(session, channel, seqs, error)
    else:  # the broker was cancelled under us (shutting down)
        _refused(session, channel, seqs, BrokerClosed("the server is shutting down"))


async def _commit(session: AmqpSession, channel: Channel, dest: str | tuple, group: list) -> None:
    messages = [message for message, _ in group]
    seqs = [seq for _, seq in group if seq]
    size = sum(len(message.body) for message in messages)
    session.server.publishing(session, size)
    try:
        if isinstance(dest, tuple):  # routed by the front: several queues at once
            results = await session.broker.publish_many([(queue, messages) for queue in dest])
            for result in results:  # a refusal (reject-publish) nacks, as RabbitMQ does when one queue refuses
                if isinstance(result, ChuteError) and not isinstance(result, QueueNotFound):
                    raise result
        else:
            await session.broker.publish_batch(dest, messages)
    except ChuteError as exc:
        _refused(session, channel, seqs, exc)
        return
    finally:
        session.server.publishing(session, -size)
    _confirm(session, channel, seqs, True)


def _refused(session: AmqpSession, channel: Channel, seqs: list[int], exc: ChuteError) -> None:
    """A publish the broker did not take: a full queue (reject-publish) nacks it; a queue or exchange deleted
    meanwhile acks it (as unroutable); anything else nacks it and closes the channel (or the connection)."""
    if isinstance(exc, QueueFull | QueueNotFound | TopicNotFound):
        _confirm(session, channel, seqs, isinstance(exc, QueueNotFound | TopicNotFound))
        return
    _confirm(session, channel, seqs, False)
    error = from_chute(exc, commands.Basic.Publish())
    if error.connection:
        session.fail(error)
    elif not channel.closed:
        session.channel_error(channel.number, error)


def _confirm(session: AmqpSession, channel: Channel, seqs: list[int], ok: bool) -> None:
    """basic.ack (or nack) for these sequence numbers: one frame with `multiple` when they are all that is left
    below the highest."""
    if not seqs or channel.closed:
        return
    pending = channel.unconfirmed
    pending.difference_update(seqs)
    last = max(seqs)
    conn, number = session.conn, channel.number
    kind = commands.Basic.Ack if ok else commands.Basic.Nack
    if len(seqs) > 1 and (not pending or min(pending) > last):
        session.write(conn.send_method(number, kind(delivery_tag=last, multiple=True)))
        return
    session.write(b"".join(conn.send_method(number, kind(delivery_tag=seq)) for seq in seqs))


# -- consuming --------------------------------------------------------------------------------------------------


async def _consumable(session: AmqpSession, channel: Channel, method) -> str:
    name = queue_name(channel, method.queue, method)
    if await state.refresh_queue(session.front, name) is None:
        raise _no_queue(name)
    check(session.principal, "consume", "queue", name)
    if await _owned_elsewhere(session, name, fresh=True):
        raise _no_queue(name)
    return name


async def basic_qos(session: AmqpSession, channel: Channel, method) -> object:
    if method.prefetch_size:
        raise connection_error(NOT_IMPLEMENTED, f"prefetch_size!=0 ({method.prefetch_size})", method)  # as RabbitMQ
    if method.global_:
        channel.prefetch = method.prefetch_count
    else:
        channel.consumer_prefetch = method.prefetch_count
    channel.credit.set()
    return commands.Basic.QosOk()


async def basic_consume(session: AmqpSession, channel: Channel, method) -> object:
    name = await _consumable(session, channel, method) if method.queue != reply_to.PSEUDO_QUEUE else ""
    front = session.front
    tag = method.consumer_tag or "amq.ctag-" + secrets.token_urlsafe(16)
    if tag in channel.consumers or (channel.reply_to is not None and channel.reply_to[1] == tag):
        raise connection_error(NOT_ALLOWED, f"attempt to reuse consumer tag '{tag}'", method)
    if method.queue == reply_to.PSEUDO_QUEUE:
        reply_to.consume(session, channel, method, tag)
        return None if method.nowait else commands.Basic.ConsumeOk(consumer_tag=tag)
    if name in front.exclusive_consumers or (method.exclusive and front.consumers[name]):
        raise AmqpError(ACCESS_REFUSED, f"queue '{name}' in vhost '/' in exclusive use")
    priority = _consumer_priority(method.arguments or {})
    consumer = AmqpConsumer(channel, tag, name, bool(method.no_ack), bool(method.exclusive), channel.consumer_prefetch,
                            priority)  # fmt: skip
    if front.cluster_consumers is not None:  # a cluster node: exclusive use is decided over every node's consumers
        if not await front.cluster_consumers.register(consumer):
            raise AmqpError(ACCESS_REFUSED, f"queue '{name}' in vhost '/' in exclusive use")
        if channel.closed or session.closed:  # it closed while the registry was asked
            front.cluster_consumers.ended(consumer)
            return None
    channel.consumers[tag] = consumer
    front.consumer_started(name, consumer)
    if method.exclusive:
        front.exclusive_consumers.add(name)
    if not method.nowait:
        session.write(session.conn.send_method(channel.number, commands.Basic.ConsumeOk(consumer_tag=tag)))
    consumer.task = asyncio.ensure_future(consumer.run())
    return None


def _consumer_priority(arguments: dict) -> int:
    """basic.consume's `x-priority` (any integer, default 0), as RabbitMQ reads it; 406 for another type."""
    value = arguments.get("x-priority", 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise AmqpError(PRECONDITION_FAILED, f"invalid arg 'x-priority' for consumer: {value!r} (an integer)")
    return value


async def basic_cancel(session: AmqpSession, channel: Channel, method) -> object:
    channel.cancel(method.consumer_tag)
    if session.front.cluster_consumers is not None:
        await session.front.cluster_consumers.left()
    return commands.Basic.CancelOk(consumer_tag=method.consumer_tag)


async def basic_get(session: AmqpSession, channel: Channel, method) -> object:
    name = await _consumable(session, channel, method)
    broker = session.broker
    session.front.used(name)
    deliveries = await broker.receive(name, 1, lease_s=lease_s(session))
    if not deliveries:
        return commands.Basic.GetEmpty()
    if channel.closed:
        broker.release(name, [d.receipt for d in deliveries])
        return None
    count = await state.ready(broker, name)
    if channel.closed:
        broker.release(name, [d.receipt for d in deliveries])
        return None
    channel.deliver(None, deliveries, get_count=count, get_no_ack=bool(method.no_ack))
    return None


async def basic_ack(session: AmqpSession, channel: Channel, method) -> object:
    settle(channel, method)


async def basic_nack(session: AmqpSession, channel: Channel, method) -> object:
    settle(channel, method)


async def basic_reject(session: AmqpSession, channel: Channel, method) -> object:
    settle(channel, method)


def settle(channel: Channel, method) -> None:
    """basic.ack, basic.nack or basic.reject."""
    if isinstance(method, commands.Basic.Ack):
        _settle(channel, method, method.delivery_tag, method.multiple, "ack", True)
    elif isinstance(method, commands.Basic.Nack):
        _settle(channel, method, method.delivery_tag, method.multiple, "nack", method.requeue)
    else:
        _settle(channel, method, method.delivery_tag, False, "nack", method.requeue)


def _settle(channel: Channel, method, tag: int, multiple: bool, action: str, requeue: bool) -> None:
    if channel.tx is not None:  # a transaction: checked now, carried out at tx.commit
        if tag not in channel.unacked and (tag or not multiple):
            raise AmqpError(PRECONDITION_FAILED, f"unknown delivery tag {tag}", method=method)
        channel.tx.settles.append((method, tag, multiple, action, requeue))
        return
    channel.settle(method, tag, multiple, action, requeue)


async def basic_recover(session: AmqpSession, channel: Channel, method) -> object:
    channel.recover()
    return commands.Basic.RecoverOk() if isinstance(method, commands.Basic.Recover) else None


async def confirm_select(session: AmqpSession, channel: Channel, method) -> object:
    if channel.tx is not None:
        raise AmqpError(PRECONDITION_FAILED, "cannot switch from tx to confirm mode")
    channel.confirm = True
    return commands.Confirm.SelectOk()


async def channel_flow(session: AmqpSession, channel: Channel, method) -> object:
    """As RabbitMQ: a client may not stop the server's deliveries this way (540), only say it goes on."""
    if not method.active:
        raise connection_error(NOT_IMPLEMENTED, "active=false", method)
    return commands.Channel.FlowOk(active=True)


async def not_implemented(session: AmqpSession, channel: Channel, method) -> object:
    raise connection_error(NOT_IMPLEMENTED, f"{method.name} is not supported by Chute (see docs/amqp.md)", method)


HANDLERS = {
    commands.Basic.Qos: basic_qos,
    commands.Basic.Consume: basic_consume,
    commands.Basic.Cancel: basic_cancel,
    commands.Basic.Get: basic_get,
    commands.Basic.Ack: basic_ack,
    commands.Basic.Nack: basic_nack,
    commands.Basic.Reject: basic_reject,
    commands.Basic.Recover: basic_recover,
    commands.Basic.RecoverAsync: basic_recover,
    commands.Confirm.Select: confirm_select,
    commands.Channel.Flow: channel_flow,
}
