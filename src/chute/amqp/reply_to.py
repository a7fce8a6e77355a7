"""Direct reply-to (RabbitMQ's `amq.rabbitmq.reply-to` pseudo-queue): RPC replies without a reply queue.

A client consumes from `amq.rabbitmq.reply-to` with no-ack (a consumer that would ack is 406, as in RabbitMQ), then
publishes requests with `reply_to` set to that name. Before routing such a request, the front replaces `reply_to`
with `amq.rabbitmq.reply-to.<token>`, the token standing for the requesting channel (a request from a channel that
does not consume from the pseudo-queue is 406). A responder publishes its reply to the default exchange with that
name as routing key; the reply goes straight to the requesting channel's consumer, as a basic.deliver with
exchange "" and that routing key, without being stored (at most once: if that channel is gone, the reply is
unroutable and dropped, or returned with `mandatory`). In confirm mode the responder's publish is confirmed at
once.

Invariant: a token stands for one channel while its reply consumer lives, and is forgotten when it is cancelled or
the channel closes; tokens are random, so one connection cannot guess another's.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from pamqp import commands

from chute.amqp.errors import PRECONDITION_FAILED, AmqpError
from chute.amqp.frames import deliver_method

if TYPE_CHECKING:
    from chute.amqp.channel import Channel
    from chute.amqp.connection import Content
    from chute.amqp.session import AmqpSession

PSEUDO_QUEUE = "amq.rabbitmq.reply-to"
PREFIX = PSEUDO_QUEUE + "."


def consume(session: AmqpSession, channel: Channel, method, tag: str) -> None:
    """basic.consume on the pseudo-queue: the channel's reply consumer (406 unless no-ack)."""
    if not method.no_ack:
        raise AmqpError(PRECONDITION_FAILED, "reply consumer cannot acknowledge", method=method)
    if channel.reply_to is not None:
        raise AmqpError(PRECONDITION_FAILED, "reply consumer already set", method=method)
    token = secrets.token_urlsafe(18)
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
    """Hand a reply to the channel it is for; False if there is none (unroutable)."""
    key = content.method.routing_key
    channel = session.front.reply_channels.get(key[len(PREFIX):])
    if channel is None or channel.closed or channel.reply_to is None:
        return False
    target = channel.session
    tag = channel.next_tag
    channel.next_tag += 1
    method = deliver_method(channel.reply_to[1], tag, False, "", key)
    properties = content.properties if content.properties is not None else commands.Basic.Properties()
    target.write(target.conn.send_content(channel.number, method, properties, content.body))
    return True
