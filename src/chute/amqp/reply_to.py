"""Direct reply-to (RabbitMQ's `amq.rabbitmq.reply-to` pseudo-queue): RPC replies without a reply queue.

A client consumes from `amq.rabbitmq.reply-to` with no-ack (a consumer that would ack is 406, as in RabbitMQ), then
publishes requests with `reply_to` set to that name. Before routing such a request, the front replaces `reply_to`
with `amq.rabbitmq.reply-to.<token>`, the token standing for the requesting channel (a request from a channel that
does not consume from the pseudo-queue is 406). A responder publishes its reply to the default exchange with that
name as routing key; the reply goes straight to the requesting channel's consumer, as a basic.deliver with
exchange "" and that routing key, without being stored (at most once: if that channel is gone, the reply is
unroutable and dropped, or returned with `mandatory`). In confirm mode the responder's publish is confirmed at
once.

On a cluster node the token ends with `.<node name>`: a reply published through another node is relayed there
through that node's reply inbox, a Chute queue `amq.chute.replies.<node>` (placed like any queue, messages kept
INBOX_TTL_S at most) that the node long-polls (`serve_inbox`); each relayed reply carries its routing key and its
content header exactly as published (REPLY_HEADER), so the requester gets the same properties. Still at most
once: an inbox message is acked before its reply is handed on, and a reply for a channel that is gone is dropped
(the responder's node cannot know, so `mandatory` does not return it).

Invariant: a token stands for one channel while its reply consumer lives, and is forgotten when it is cancelled or
the channel closes; tokens are random, so one connection cannot guess another's.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
from typing import TYPE_CHECKING

from pamqp import commands
from pamqp.header import ContentHeader

from chute.amqp.errors import PRECONDITION_FAILED, AmqpError
from chute.amqp.exchanges import chute_queue
from chute.amqp.frames import deliver_method
from chute.errors import ChuteError, QueueExists, QueueNotFound
from chute.model import QueueSettings

if TYPE_CHECKING:
    from chute.amqp.channel import Channel
    from chute.amqp.connection import Content
    from chute.amqp.session import AmqpSession

log = logging.getLogger("chute.amqp")
PSEUDO_QUEUE = "amq.rabbitmq.reply-to"
PREFIX = PSEUDO_QUEUE + "."
INBOX_PREFIX = "amq.chute.replies."  # + node name: where other nodes relay replies for this node's channels
INBOX_TTL_S = 60.0  # a relayed reply nobody took (its node is gone) is dropped after this long
REPLY_HEADER = "amqp-reply"  # a relayed reply's content header (properties), base64
KEY_HEADER = "amqp-reply-key"  # a relayed reply's routing key
INBOX_BATCH = 100
RETRY_S = 1.0  # the inbox could not be made or read (a takeover, the database away): look again after this


def consume(session: AmqpSession, channel: Channel, method, tag: str) -> None:
    """basic.consume on the pseudo-queue: the channel's reply consumer (406 unless no-ack)."""
    if not method.no_ack:
        raise AmqpError(PRECONDITION_FAILED, "reply consumer cannot acknowledge", method=method)
    if channel.reply_to is not None:
        raise AmqpError(PRECONDITION_FAILED, "reply consumer already set", method=method)
    token = secrets.token_urlsafe(18)
    if session.front.routed:
        token += "." + session.broker.process[0]
    channel.reply_to = (token, tag)
    session.front.reply_channels[token] = channel


def forget(channel: Channel) -> None:
    """The channel's reply consumer is cancelled, or the channel closed."""
    if channel.reply_to is not None:
        channel.session.front.reply_channels.pop(channel.reply_to[0], None)
        channel.reply_to = None


def stamp(channel: Channel, content: Content) -> None:
    """A request with reply_to = the pseudo-queue gets the channel's own reply address (406 if it has none)."""
    properties = content.properties
    if properties is None or properties.reply_to != PSEUDO_QUEUE:
        return
    if channel.reply_to is None:
        raise AmqpError(PRECONDITION_FAILED, "fast reply consumer does not exist", method=content.method)
    properties.reply_to = PREFIX + channel.reply_to[0]


def is_reply(content: Content) -> bool:
    method = content.method
    return not method.exchange and method.routing_key.startswith(PREFIX)


def deliver(session: AmqpSession, content: Content) -> bool:
    """Hand a reply to the channel it is for; False if there is none (unroutable). On a cluster node, a reply for
    another node's channel is relayed to that node (True: whether that channel still exists is not known here)."""
    key = content.method.routing_key
    token = key[len(PREFIX):]
    front = session.front
    channel = front.reply_channels.get(token)
    if channel is None and front.routed:
        node = token.partition(".")[2]
        if node and node != session.broker.process[0]:
            _relay(session.broker, node, key, content)
            return True
    return _hand(channel, key, content.properties, content.body)


def _hand(channel: Channel | None, key: str, properties, body: bytes) -> bool:
    if channel is None or channel.closed or channel.reply_to is None:
        return False
    target = channel.session
    tag = channel.next_tag
    channel.next_tag += 1
    method = deliver_method(channel.reply_to[1], tag, False, "", key)
    properties = properties if properties is not None else commands.Basic.Properties()
    target.write(target.conn.send_content(channel.number, method, properties, body))
    return True


def inbox(node: str) -> str:
    """The Chute queue through which other nodes relay replies for node `node`'s channels."""
    return chute_queue(INBOX_PREFIX + node)


def _relay(broker, node: str, key: str, content: Content) -> None:
    header = ContentHeader(0, len(content.body), content.properties or commands.Basic.Properties()).marshal()
    headers = {KEY_HEADER: key, REPLY_HEADER: base64.b64encode(header).decode()}
    task = asyncio.ensure_future(broker.publish(inbox(node), content.body, headers=headers))
    task.add_done_callback(_relayed)


def _relayed(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:  # at most once: the reply is lost, as RabbitMQ's
        log.info("AMQP: a direct reply-to reply could not be relayed: %s", task.exception())  # would be


async def serve_inbox(front) -> None:
    """(A cluster node, for as long as its front runs) make this node's reply inbox, then long-poll it and hand
    each relayed reply to its channel (acked first: at most once)."""
    broker = front.broker
    name = inbox(broker.process[0])
    made = False
    while not front.closing:
        try:
            if not made:
                try:
                    await broker.create_queue(name, QueueSettings(retention_s=INBOX_TTL_S, on_expiry="drop"))
                except QueueExists:
                    pass
                made = True
            deliveries = await broker.receive(name, INBOX_BATCH, wait_s=RETRY_S)
            if deliveries:
                await broker.ack(name, [delivery.receipt for delivery in deliveries])
        except asyncio.CancelledError:
            raise
        except QueueNotFound:  # deleted by hand: made again
            made = False
            await asyncio.sleep(RETRY_S)
            continue
        except ChuteError as exc:
            log.debug("AMQP: reply inbox %s: %s", name, exc)
            await asyncio.sleep(RETRY_S)
            continue
        except Exception:  # a bug: relaying must not end with it
            log.exception("AMQP: reply inbox %s failed", name)
            await asyncio.sleep(RETRY_S)
            continue
        for delivery in deliveries:
            _hand_relayed(front, delivery)


def _hand_relayed(front, delivery) -> None:
    headers = delivery.message.headers
    key = headers.get(KEY_HEADER, "")
    channel = front.reply_channels.get(key[len(PREFIX):])
    if channel is None:
        return
    header = ContentHeader()
    try:
        header.unmarshal(base64.b64decode(headers.get(REPLY_HEADER, "")))
    except Exception:  # not written by a node (someone published to the inbox by hand): not a reply
        log.info("AMQP: a message in the reply inbox that is not a relayed reply was dropped")
        return
    _hand(channel, key, header.properties, delivery.body)
