"""exchange.* and queue.* methods: declaring, binding and deleting, on Chute topics, subscriptions and queues.

Permissions (server/auth.py): declaring, binding, purging and deleting need `manage` on the queue (and on the
exchange's topic for bindings); a passive declare needs any permission on the name. Every check comes before the
broker is touched, so a refused method changes nothing.

RabbitMQ's rules and texts are followed where a client can tell: the default exchange cannot be declared, bound
or deleted (403); names starting with `amq.` are reserved (403); redeclaring with other flags, type or arguments
is 406 (`inequivalent arg ...`); a queue another connection declared exclusive is 405; deleting a queue or an
exchange that does not exist succeeds.
"""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING

import msgspec
from pamqp import commands

from chute.amqp import exchanges as ex
from chute.amqp import metadata, reply_to, routing, state
from chute.amqp.errors import (
    ACCESS_REFUSED,
    COMMAND_INVALID,
    NOT_FOUND,
    NOT_IMPLEMENTED,
    PRECONDITION_FAILED,
    AmqpError,
    connection_error,
    locked,
)
from chute.amqp.mapping import queue_settings
from chute.errors import InvalidArgument, QueueExists, QueueNotFound, SubscriptionNotFound, TopicNotFound
from chute.model import TopicSettings
from chute.server.auth import check

if TYPE_CHECKING:
    from chute.amqp.channel import Channel
    from chute.amqp.session import AmqpSession

log = logging.getLogger("chute.amqp")
VHOST = "'/'"


def _no_exchange(name: str) -> AmqpError:
    return AmqpError(NOT_FOUND, f"no exchange '{name}' in vhost {VHOST}")


def _no_queue(name: str) -> AmqpError:
    return AmqpError(NOT_FOUND, f"no queue '{name}' in vhost {VHOST}")


def _see(session: AmqpSession, kind: str, name: str) -> None:
    if not session.principal.can_see(kind, name):
        check(session.principal, "manage", kind, name)  # raises Forbidden naming the caller


def plain(value):
    """Arguments as JSON-safe data (for the exchange book and for comparing declarations)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return str(value)


# -- exchanges --------------------------------------------------------------------------------------------------


async def exchange_declare(session: AmqpSession, channel: Channel, method) -> object:
    name, book = method.exchange, session.front.book
    if not name:
        raise AmqpError(ACCESS_REFUSED, "operation not permitted on the default exchange")
    await state.refresh_exchange(session.front, name)
    current = book.exchanges.get(name)
    if method.passive:
        if current is None:
            raise _no_exchange(name)
        _see(session, "topic", ex.topic_name(name))
        return commands.Exchange.DeclareOk()
    if method.exchange_type not in ex.TYPES:
        raise connection_error(COMMAND_INVALID, f"unknown exchange type '{method.exchange_type}'")
    arguments = method.arguments or {}
    if ex.ALTERNATE in arguments and not isinstance(arguments[ex.ALTERNATE], str):
        raise AmqpError(PRECONDITION_FAILED, f"invalid type '{_field_type(arguments[ex.ALTERNATE])}' for arg "
                        f"'{ex.ALTERNATE}' in exchange '{name}' in vhost {VHOST}")  # fmt: skip
    wanted = {"type": method.exchange_type, "durable": bool(method.durable), "auto_delete": bool(method.auto_delete),
              "internal": bool(method.internal), "arguments": plain(arguments)}  # fmt: skip
    if current is not None:
        for key in ("type", "durable", "auto_delete", "internal"):
            if current[key] != wanted[key]:
                raise AmqpError(PRECONDITION_FAILED, f"inequivalent arg '{key}' for exchange '{name}' in vhost "
                                f"{VHOST}: received '{wanted[key]}' but current is '{current[key]}'")  # fmt: skip
        _same_alternate(name, current, wanted)
        return commands.Exchange.DeclareOk()
    if name.startswith("amq."):
        raise AmqpError(ACCESS_REFUSED, f"exchange name '{name}' contains reserved prefix 'amq.*'")
    topic = ex.topic_name(name)
    check(session.principal, "manage", "topic", topic)
    alternate = ex.alternate_of(wanted)
    alternate_topic = ex.possible_topic(alternate) if alternate is not None else None
    if alternate_topic is not None:
        # as RabbitMQ asks for write permission on the alternate: what this exchange routes nowhere is published
        # there (a name no topic can have is no exchange, and never will be: such messages stay unroutable)
        check(session.principal, "publish", "topic", alternate_topic)
    forgets = session.front.forgets
    if await state.topic_settings(session.broker, topic) is None:  # created with its declaration, in one record
        attributes = metadata.created_with(session.front.stored, "topic", name, wanted)
        await session.broker.create_topic(topic, TopicSettings(attributes=attributes))
    if session.front.forgets != forgets and await state.topic_settings(session.broker, topic) is None:
        return commands.Exchange.DeclareOk()  # another connection deleted it as it was made: keep nothing of it
    book.exchanges[name] = wanted
    await session.front.save_book()
    return commands.Exchange.DeclareOk()


def _same_alternate(name: str, current: dict, wanted: dict) -> None:
    """406 for a redeclaration naming another alternate exchange: of an exchange's arguments, RabbitMQ compares
    only this one."""
    have, want = current["arguments"].get(ex.ALTERNATE), wanted["arguments"].get(ex.ALTERNATE)
    if have == want:
        return
    if have is not None and want is not None:
        differs = f"received '{want}' but current is '{have}'"
    else:
        differs = f"received {_shown(want)} but current is {_shown(have)}"
    raise AmqpError(PRECONDITION_FAILED, f"inequivalent arg '{ex.ALTERNATE}' for exchange '{name}' in vhost "
                    f"{VHOST}: {differs}")  # fmt: skip


def _shown(value) -> str:
    return "none" if value is None else f"the value '{value}' of type '{_field_type(value)}'"


def _field_type(value) -> str:
    """RabbitMQ's name for the AMQP field type a decoded value most likely came as (for its error texts)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "signedint" if -(2**31) <= value < 2**31 else "long"
    kinds = {str: "longstr", bytes: "binary", bytearray: "binary", float: "double", dict: "table", list: "array"}
    for kind, text in kinds.items():
        if isinstance(value, kind):
            return text
    if value is None:
        return "void"
    return type(value).__name__.lower()  # decimal, datetime (timestamp)


async def exchange_delete(session: AmqpSession, channel: Channel, method) -> object:
    name, book = method.exchange, session.front.book
    if not name or name.startswith("amq."):
        raise AmqpError(ACCESS_REFUSED, f"operation not permitted on the {name or 'default'} exchange")
    await state.refresh_exchange(session.front, name)
    if name not in book.exchanges:
        return commands.Exchange.DeleteOk()
    topic = ex.topic_name(name)
    check(session.principal, "manage", "topic", topic)
    if method.if_unused and await _exchange_in_use(session, name):
        raise AmqpError(PRECONDITION_FAILED, f"exchange '{name}' in vhost {VHOST} in use")
    try:
        await session.broker.delete_topic(topic)
    except TopicNotFound:
        pass
    metadata.forget(session.front.stored, "topic", topic)
    session.front.forgets += 1
    session.front.exchanges_read.pop(name, None)
    book.exchanges.pop(name, None)  # (two connections may delete it at once)
    book.bindings = [b for b in book.bindings if b["exchange"] != name]
    book.exchange_bindings = [b for b in book.exchange_bindings if name not in (b["source"], b["destination"])]
    await session.front.save_book()
    return commands.Exchange.DeleteOk()


async def _exchange_in_use(session: AmqpSession, name: str) -> bool:
    """Whether exchange `name` has bindings: to queues (in the book, or on a cluster node its topic's
    subscriptions, which may have been made through another node) or to other exchanges."""
    book = session.front.book
    if any(b["exchange"] == name for b in book.bindings) or any(b["source"] == name for b in book.exchange_bindings):
        return True
    if not session.front.routed:
        return False
    try:
        info = await state.value(session.broker.topic_info(ex.topic_name(name)))
    except TopicNotFound:
        return False
    return bool(info.subscriptions)


async def _bound_exchanges(session: AmqpSession, method) -> tuple[dict, dict]:
    """The source and destination of exchange.bind / unbind (403 for the default exchange, 404 if missing), with
    `manage` on both topics checked."""
    book = session.front.book
    for name in (method.source, method.destination):
        if not name:
            raise AmqpError(ACCESS_REFUSED, "operation not permitted on the default exchange")
    for name in (method.destination, method.source):
        await state.refresh_exchange(session.front, name)
    for name in (method.destination, method.source):  # after both reads: one may be deleted as the other is read
        if name not in book.exchanges:
            raise _no_exchange(name)
    for name in (method.destination, method.source):
        check(session.principal, "manage", "topic", ex.topic_name(name))
    return book.exchanges[method.source], book.exchanges[method.destination]


def _find_exchange_binding(book, method, arguments: dict) -> dict | None:
    for each in book.exchange_bindings:
        if (each["source"], each["destination"], each["key"], each["arguments"]) == \
                (method.source, method.destination, method.routing_key, arguments):  # fmt: skip
            return each
    return None


async def exchange_bind(session: AmqpSession, channel: Channel, method) -> object:
    """An exchange-to-exchange binding: messages the source routes with this key (or headers) go on to the
    destination too. Routed by the front (routing.py); a loop of bindings delivers to each queue once."""
    source, _ = await _bound_exchanges(session, method)
    book = session.front.book
    arguments = method.arguments or {}
    if source["type"] == "headers":
        routing.match_mode(arguments)
    if _find_exchange_binding(book, method, plain(arguments)) is None:
        book.exchange_bindings.append({"source": method.source, "destination": method.destination,
                                       "key": method.routing_key, "arguments": plain(arguments),
                                       "table": routing.pack(arguments)})  # fmt: skip
        await session.front.save_book()
    return commands.Exchange.BindOk()


async def exchange_unbind(session: AmqpSession, channel: Channel, method) -> object:
    try:
        await _bound_exchanges(session, method)
    except AmqpError as exc:
        if exc.code != NOT_FOUND:
            raise
        return commands.Exchange.UnbindOk()  # as RabbitMQ: unbinding from an exchange that is gone does nothing
    book = session.front.book
    binding = _find_exchange_binding(book, method, plain(method.arguments or {}))
    if binding is not None:
        book.exchange_bindings.remove(binding)
        await session.front.save_book()
    return commands.Exchange.UnbindOk()


# -- queues -----------------------------------------------------------------------------------------------------


async def _owned_elsewhere(session: AmqpSession, name: str, *, fresh: bool = False) -> bool:
    """405 if another connection owns exclusive queue `name`. On a cluster node the owner may be a connection of
    another node (the queue's record names it): True if that connection is gone and the queue was deleted for it
    now (the caller goes on as for a queue that does not exist). `fresh`: the caller has just read the record."""
    front = session.front
    owner = front.exclusive.get(name)
    if owner is not None:
        if owner is not session:
            raise locked(name)
        return False
    if not front.routed:
        return False
    if not fresh:
        await state.refresh_queue(front, name)
    return await front.exclusive_gone(session, name, front.book.queues.get(name))


def queue_name(channel: Channel, name: str, method) -> str:
    """The Chute queue a method names: "" means the channel's last declared queue."""
    if name:
        return ex.chute_queue(name)
    if not channel.last_queue:
        raise AmqpError(NOT_FOUND, "no previously declared queue", method=method)
    return channel.last_queue


async def queue_declare(session: AmqpSession, channel: Channel, method) -> object:
    broker, front = session.broker, session.front
    name = method.queue
    if method.passive and name == reply_to.PSEUDO_QUEUE:  # direct reply-to's pseudo-queue always exists
        return commands.Queue.DeclareOk(queue=name, message_count=0, consumer_count=0)
    if method.passive:
        name = queue_name(channel, name, method)
        if await state.refresh_queue(front, name) is None:
            raise _no_queue(name)
        _see(session, "queue", name)
        if await _owned_elsewhere(session, name, fresh=True):
            raise _no_queue(name)
    else:
        if not name:
            name = "amq.gen-" + secrets.token_urlsafe(16)
        elif name.startswith("amq."):
            raise AmqpError(ACCESS_REFUSED, f"queue name '{name}' contains reserved prefix 'amq.*'")
        else:
            name = ex.chute_queue(name)
        check(session.principal, "manage", "queue", name)
        await _owned_elsewhere(session, name)
        forgets = front.forgets
        await _declare(session, name, method)
        if front.forgets != forgets and await state.refresh_queue(front, name) is None:
            # another connection deleted it as it was made: the declare came first, the delete after; keep nothing
            await front.forget_queue(name)
            return DeclareOk(queue=method.queue or ex.amqp_queue(name), message_count=0, consumer_count=0)
    front.used(name)
    channel.last_queue = name
    # the name as the client gave it (two AMQP names can share a Chute queue: `a@` and `a_x40_`), else its AMQP name
    shown = method.queue or ex.amqp_queue(name)
    return DeclareOk(queue=shown, message_count=await state.ready(broker, name),
                     consumer_count=await front.consumer_count(name))  # fmt: skip


class DeclareOk(commands.Queue.DeclareOk):
    """queue.declare-ok for any queue name: pamqp checks the name against AMQP's old `queue-name` domain (ASCII
    letters, digits and `-_.:@#,/+ `) and refused to encode a name RabbitMQ takes (any UTF-8 up to 255 bytes, as
    queue.declare brings it: `é`, `!`), so the declare failed with 541 and closed the connection."""

    def validate(self) -> None:
        return None


async def _declare(session: AmqpSession, name: str, method) -> None:
    """Create the queue, or check that this declaration is equivalent to the one that created it (406 if not,
    naming the first argument that differs, as RabbitMQ does)."""
    broker, front = session.broker, session.front
    arguments = method.arguments or {}
    declared = {"durable": bool(method.durable), "auto_delete": bool(method.auto_delete),
                "exclusive": bool(method.exclusive), "arguments": plain(arguments)}  # fmt: skip
    if method.exclusive and session.owner_tag is not None:  # a cluster node: other nodes must see who owns it
        declared["owner"] = session.owner_tag
    existing = await state.refresh_queue(front, name)
    current = front.book.queues.get(name)
    if current is not None and existing is not None:
        for key in ("durable", "auto_delete"):
            if current[key] != declared[key]:
                raise AmqpError(PRECONDITION_FAILED, f"inequivalent arg '{key}' for queue '{method.queue}' in vhost "
                                f"{VHOST}: received '{str(declared[key]).lower()}' but current is "
                                f"'{str(current[key]).lower()}'")  # fmt: skip
        for key in sorted(set(current["arguments"]) | set(declared["arguments"])):
            if current["arguments"].get(key) != declared["arguments"].get(key):
                raise AmqpError(PRECONDITION_FAILED, f"inequivalent arg '{key}' for queue '{method.queue}' in vhost "
                                f"{VHOST}: received {declared['arguments'].get(key)!r} but current is "
                                f"{current['arguments'].get(key)!r}")  # fmt: skip
        return
    target = await dead_letter_target(session, arguments)
    settings = queue_settings(arguments, target if target != name else None)  # (itself: dead_letter.py)
    if existing is None:  # created with its declaration, in one record
        attributes = metadata.created_with(front.stored, "queue", name, declared)
        settings = msgspec.structs.replace(settings, attributes=attributes)
        if settings.dead_letter_queue is not None:
            await state.place_near(broker, name, settings.dead_letter_queue)
    try:
        await broker.create_queue(name, settings)
    except QueueExists:
        raise AmqpError(PRECONDITION_FAILED, f"inequivalent arg for queue '{method.queue}' in vhost {VHOST}: its "
                        "arguments differ from the existing queue's settings") from None  # fmt: skip
    front.book.queues[name] = declared
    front.adopt(name, declared, owner=session)
    front.note_queue(name, settings)
    if "x-dead-letter-exchange" in arguments and settings.dead_letter_queue is None:
        front.pending_dead_letters.add(name)
    await front.save_book()
    if front.pending_dead_letters:
        await resolve_dead_letters(session)


async def dead_letter_target(session: AmqpSession, arguments: dict) -> str | None:
    """The Chute dead-letter queue of `x-dead-letter-exchange` and `-routing-key`: the default exchange names the
    queue; another exchange must route the routing key to exactly one queue (406 if it routes to several). None
    while there is no such queue yet: as in RabbitMQ, dead letters are dropped until there is one
    (`resolve_dead_letters` looks again after each queue.declare and queue.bind). It may be the declared queue
    itself, which its settings cannot name: a rejection then puts the message back in it (dead_letter.py)."""
    if "x-dead-letter-exchange" not in arguments:
        return None
    exchange = arguments["x-dead-letter-exchange"]
    key = arguments.get("x-dead-letter-routing-key")
    broker = session.broker
    if exchange == "":
        key = ex.chute_queue(key or "")
        if not key:
            raise AmqpError(PRECONDITION_FAILED, "x-dead-letter-exchange '' needs x-dead-letter-routing-key (the "
                            "dead-letter queue)")  # fmt: skip
        return key if await state.queue_exists(broker, key) else None
    await state.refresh_exchange(session.front, exchange)
    if exchange not in session.front.book.exchanges:
        return None
    subject = ex.subject(key or "") or ""
    queues = await state.route(broker, ex.topic_name(exchange), subject, {}) or []
    if len(queues) > 1:
        raise AmqpError(PRECONDITION_FAILED, f"dead-letter exchange '{exchange}' must route "
                        f"{'the key ' + repr(key) if key else 'messages'} to exactly one queue (it routes to "
                        f"{len(queues)}): Chute dead-letters to one queue")  # fmt: skip
    return queues[0] if queues else None


async def resolve_dead_letters(session: AmqpSession) -> None:
    """Give the queues whose dead-letter exchange led nowhere yet their dead-letter queue, if it exists now."""
    front = session.front
    for name in sorted(front.pending_dead_letters):
        declared = front.book.queues.get(name)
        queue = await state.queue_settings(session.broker, name)
        if declared is None or queue is None or queue.dead_letter_queue is not None:
            front.pending_dead_letters.discard(name)
            continue
        try:
            target = await dead_letter_target(session, declared["arguments"])
        except AmqpError:
            continue
        if target is not None and target != name:
            forgets = front.forgets
            try:
                info = await session.broker.update_queue(name, dead_letter_queue=target)
            except (InvalidArgument, QueueNotFound) as exc:  # (a cluster) the dead-letter queue is in another
                # shard: still none
                if not front.routed:
                    raise
                log.info("AMQP: queue %r cannot dead-letter to %r yet: %s", name, target, exc.message)
                continue
            front.pending_dead_letters.discard(name)
            if front.forgets == forgets:
                front.note_queue(name, info.settings)
            else:  # (a cluster node) it forgot a queue meanwhile, perhaps this one: read it again, not note a ghost
                await state.refresh_queue(front, name)


async def queue_bind(session: AmqpSession, channel: Channel, method) -> object:
    exchange, book, broker = method.exchange, session.front.book, session.broker
    name = queue_name(channel, method.queue, method)
    if not exchange:
        raise AmqpError(ACCESS_REFUSED, "operation not permitted on the default exchange")
    forgets = session.front.forgets
    if await state.refresh_queue(session.front, name) is None:
        raise _no_queue(name)
    await state.refresh_exchange(session.front, exchange)
    declared = book.exchanges.get(exchange)
    if declared is None:
        raise _no_exchange(exchange)
    topic = ex.topic_name(exchange)
    check(session.principal, "manage", "topic", topic)
    check(session.principal, "manage", "queue", name)
    if await _owned_elsewhere(session, name):
        raise _no_queue(name)
    if await state.topic_settings(broker, topic) is None:  # a predeclared exchange's first binding (or a topic
        await broker.create_topic(topic)  # deleted natively)
    arguments = plain(method.arguments or {})
    if book.find(exchange, name, method.routing_key, arguments) is not None:
        return commands.Queue.BindOk()
    binding = {"exchange": exchange, "queue": name, "key": method.routing_key, "arguments": arguments}
    if declared["type"] == "headers" and routing.typed(method.arguments or {}):
        binding["table"] = routing.pack(method.arguments or {})  # matched by the front (routing.py)
        binding["slots"] = []
    elif declared["type"] == "headers":
        filters = ex.headers_filters(arguments)
        taken = {slot for other in book.bound(exchange, name) for slot in other.get("slots", ())}
        free = [slot for slot in range(ex.MAX_HEADERS_SLOTS) if slot not in taken][: len(filters)]
        if len(free) < len(filters):
            raise AmqpError(NOT_IMPLEMENTED, f"queue '{method.queue}' has too many headers bindings on '{exchange}'")
        for slot, header_filter in zip(free, filters):
            await broker.subscribe(topic, ex.slot_pattern(slot), name, filter=header_filter)
        binding["slots"] = free
    else:
        for pattern in ex.patterns(declared["type"], method.routing_key):
            await broker.subscribe(topic, pattern, name)
    if session.front.forgets != forgets and not await _both_there(session.front, name, exchange):
        return commands.Queue.BindOk()  # deleted as it was bound: the bind came first, the delete took it away
    book.bindings.append(binding)
    await session.front.save_book()
    if session.front.pending_dead_letters:
        await resolve_dead_letters(session)
    return commands.Queue.BindOk()


async def _both_there(front, queue: str, exchange: str) -> bool:
    """Whether queue and exchange both exist still (read again: this node forgot a queue or an exchange since
    they were last read, perhaps one of these)."""
    if await state.refresh_queue(front, queue) is None:
        return False
    await state.refresh_exchange(front, exchange)
    return exchange in front.book.exchanges


async def queue_unbind(session: AmqpSession, channel: Channel, method) -> object:
    exchange, book, broker = method.exchange, session.front.book, session.broker
    name = queue_name(channel, method.queue, method)
    if not exchange:
        raise AmqpError(ACCESS_REFUSED, "operation not permitted on the default exchange")
    await state.refresh_exchange(session.front, exchange)
    declared = book.exchanges.get(exchange)
    if declared is None or await state.refresh_queue(session.front, name) is None:
        return commands.Queue.UnbindOk()  # as RabbitMQ: unbinding what is gone does nothing
    topic = ex.topic_name(exchange)
    check(session.principal, "manage", "topic", topic)
    check(session.principal, "manage", "queue", name)
    arguments = plain(method.arguments or {})
    binding = book.find(exchange, name, method.routing_key, arguments)
    if binding is None:
        return commands.Queue.UnbindOk()
    book.bindings.remove(binding)
    if declared["type"] == "headers":
        mine, still = [ex.slot_pattern(slot) for slot in binding.get("slots", ())], set()
    else:
        mine = ex.patterns(declared["type"], method.routing_key)
        still = {p for other in book.bound(exchange, name) for p in ex.patterns(declared["type"], other["key"])}
        if declared["type"] == "topic" and ex.FANOUT_SUBJECT not in mine:
            # a binding like `.#` made by an earlier version also subscribed `_`, which it no longer needs
            mine = [*mine, ex.FANOUT_SUBJECT]
    for pattern in mine:
        if pattern not in still:
            try:
                await broker.unsubscribe(topic, pattern, name)
            except SubscriptionNotFound:
                pass
    await session.front.save_book()
    return commands.Queue.UnbindOk()


async def queue_purge(session: AmqpSession, channel: Channel, method) -> object:
    name = queue_name(channel, method.queue, method)
    if not await state.queue_exists(session.broker, name):
        raise _no_queue(name)
    check(session.principal, "manage", "queue", name)
    if await _owned_elsewhere(session, name):
        raise _no_queue(name)
    return commands.Queue.PurgeOk(message_count=await session.broker.purge_queue(name))


async def queue_delete(session: AmqpSession, channel: Channel, method) -> object:
    broker, front = session.broker, session.front
    name = queue_name(channel, method.queue, method)
    if not await state.queue_exists(broker, name):
        return commands.Queue.DeleteOk(message_count=0)
    check(session.principal, "manage", "queue", name)
    if await _owned_elsewhere(session, name):
        return commands.Queue.DeleteOk(message_count=0)
    stats = await state.value(broker.queue_stats(name))
    if method.if_unused and (front.consumers[name] or (front.routed and (await front.consumer_count(name)
                                                                          or state.used_recently(stats)))):
        # (on a cluster node: an AMQP consumer of any node, or a queue another node's consumer of any protocol uses)
        raise AmqpError(PRECONDITION_FAILED, f"queue '{name}' in vhost {VHOST} in use")
    if method.if_empty and stats.ready + stats.in_flight + stats.delayed:
        raise AmqpError(PRECONDITION_FAILED, f"queue '{name}' in vhost {VHOST} is not empty")
    for other in await state.dead_letter_sources(broker, name):
        await state.refresh_queue(front, other)
        if other not in front.book.queues:
            break  # a queue of another front: the broker refuses (406), as before
        await broker.update_queue(other, dead_letter_queue=None)  # RabbitMQ drops its dead letters now
        front.pending_dead_letters.add(other)
        front.note_queue(other, None)
    try:
        await broker.delete_queue(name)
    except QueueNotFound:
        return commands.Queue.DeleteOk(message_count=0)
    await front.forget_queue(name)
    return commands.Queue.DeleteOk(message_count=stats.ready)


HANDLERS = {
    commands.Exchange.Declare: exchange_declare,
    commands.Exchange.Delete: exchange_delete,
    commands.Exchange.Bind: exchange_bind,
    commands.Exchange.Unbind: exchange_unbind,
    commands.Queue.Declare: queue_declare,
    commands.Queue.Bind: queue_bind,
    commands.Queue.Unbind: queue_unbind,
    commands.Queue.Purge: queue_purge,
    commands.Queue.Delete: queue_delete,
}
