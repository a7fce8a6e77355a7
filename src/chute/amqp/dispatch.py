"""Running a channel's methods: one at a time, in order, in a worker task that exists while the channel has work.

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


async def run(session: AmqpSession, channel: Channel, method) -> None:
    """Carry out one method and send its reply (unless nowait); errors close the channel or the connection."""
    handler = HANDLERS.get(type(method))
    try:
        if handler is None:
            raise connection_error(NOT_IMPLEMENTED, f"{method.name} is not implemented", method)
        reply = await handler(session, channel, method)
    except AmqpError as exc:
        exc.blame(method)
        if exc.connection:
            session.fail(exc)
        else:
            session.channel_error(channel.number, exc)
        return
    except ChuteError as exc:
        error = from_chute(exc, method)
        if error.connection:
            session.fail(error)
        else:
            session.channel_error(channel.number, error)
        return
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.exception("AMQP %s from %s failed", method.name, session.peer)
        session.fail(connection_error(INTERNAL_ERROR, f"internal error: {type(exc).__name__}", method))
        return
    if reply is not None and not getattr(method, "nowait", False) and not channel.closed:
        session.write(session.conn.send_method(channel.number, reply))
