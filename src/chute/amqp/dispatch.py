"""Running a channel's methods: one at a time, in order, in a worker task that exists while the channel has work.

Two kinds of method need no worker when nothing waits before them on their channel (no worker, nothing queued,
no transaction): a run of basic.publish, published at the end of the read that brought it (the session's
`_publish_read`, one batch as the worker would make), and basic.ack, nack or reject, settled at once
(`settle_now`). A lone message then costs no task and no extra turn of the loop.

Consecutive publishes are taken together (`basic.publish`: one broker call per destination run). Before any
other method, acks gathered so far are handed to the broker and the channel's publishes are awaited until
stored (RabbitMQ's order: a basic.get or queue.delete after a publish sees it); acks and nacks wait for nothing.
A method's `AmqpError` closes its channel (or the connection, for a connection exception); a Chute error becomes
the channel exception RabbitMQ sends for it (`errors.from_chute`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from pamqp import commands

from chute.amqp import basic, declare, tx
from chute.amqp.connection import Content
from chute.amqp.errors import INTERNAL_ERROR, NOT_IMPLEMENTED, AmqpError, connection_error, from_chute
from chute.errors import ChuteError

if TYPE_CHECKING:
    from chute.amqp.channel import Channel
    from chute.amqp.session import AmqpSession

log = logging.getLogger("chute.amqp")
HANDLERS = {**declare.HANDLERS, **basic.HANDLERS, **tx.HANDLERS}
SETTLING = (commands.Basic.Ack, commands.Basic.Nack, commands.Basic.Reject)


async def work(session: AmqpSession, channel: Channel) -> None:
    """Run a channel's methods in order; consecutive publishes go as one batch."""
    inbox = channel.inbox
    try:
        while inbox and not channel.closed and not session.closed:
            if isinstance(inbox[0], Content) and channel.tx is not None:  # held until tx.commit
                channel.tx.publishes.append(inbox.pop(0))
                continue
            if isinstance(inbox[0], Content):
                publish_run(session, channel)
                continue
            method = inbox.pop(0)
            if not isinstance(method, SETTLING):
                session.flush_settles()
                if channel.publishing:
                    # RabbitMQ's order: what a channel published is in its queues before its next method (on a
                    # cluster node a batch's routing task starts its broker calls later: they are waited for too)
                    while channel.publishing:
                        await asyncio.wait(list(channel.publishing))
                elif session.tasks:
                    await asyncio.sleep(0)  # let work spawned before this method take its first step
            await run(session, channel, method)
    finally:
        channel.worker = None


def publish_run(session: AmqpSession, channel: Channel) -> None:
    """Publish the run of basic.publish at the head of the channel's inbox (up to basic.MAX_BATCH) as one batch."""
    inbox = channel.inbox
    count = 1
    while count < len(inbox) and count < basic.MAX_BATCH and isinstance(inbox[count], Content):
        count += 1
    batch = inbox[:count]
    del inbox[:count]
    try:
        basic.publish(session, channel, batch)
    except Exception as exc:  # a bug: this connection ends, the others go on
        log.exception("AMQP publish from %s failed", session.peer)
        session.fail(connection_error(INTERNAL_ERROR, f"internal error: {type(exc).__name__}"))


async def run(session: AmqpSession, channel: Channel, method) -> None:
    """Carry out one method and send its reply (unless nowait); errors close the channel or the connection."""
    handler = HANDLERS.get(type(method))
    try:
        if handler is None:
            raise connection_error(NOT_IMPLEMENTED, f"{method.name} is not implemented", method)
        reply = await handler(session, channel, method)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        failed(session, channel, method, exc)
        return
    if reply is not None and not getattr(method, "nowait", False) and not channel.closed:
        session.write(session.conn.send_method(channel.number, reply))


def settle_now(session: AmqpSession, channel: Channel, method) -> None:
    """basic.ack, nack or reject on a channel with nothing before it to run: carried out at once, without a
    worker (they wait for nothing, and answer nothing)."""
    try:
        basic.settle(channel, method)
    except Exception as exc:
        failed(session, channel, method, exc)


def failed(session: AmqpSession, channel: Channel, method, exc: Exception) -> None:
    """`method` raised `exc`: an AmqpError closes the channel (or the connection) with its code, a Chute error with
    the code RabbitMQ sends for it, anything else (a bug) closes this connection with 541."""
    if isinstance(exc, AmqpError):
        exc.blame(method)
        error = exc
    elif isinstance(exc, ChuteError):
        error = from_chute(exc, method)
    else:
        log.exception("AMQP %s from %s failed", method.name, session.peer, exc_info=exc)
        error = connection_error(INTERNAL_ERROR, f"internal error: {type(exc).__name__}", method)
    if error.connection:
        session.fail(error)
    else:
        session.channel_error(channel.number, error)
