"""AMQP transactions (tx.select, tx.commit, tx.rollback) on a channel.

After tx.select, the channel's publishes and acks / nacks / rejects are held (delivery tags are checked as they
come: an unknown one is 406 at once; exchanges and queues are looked at on commit). tx.commit carries them out in
the order they came — publishes as one batch per destination run, then the settles — and answers commit-ok once
all of it is durable; tx.rollback forgets them (the deliveries stay unacked). A transactional channel cannot use
confirm mode and the other way round (406), as in RabbitMQ. Like RabbitMQ's, these transactions are not atomic
across queues: a failure during a commit can leave part of it done.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from pamqp import commands

from chute.amqp import basic
from chute.amqp.errors import PRECONDITION_FAILED, AmqpError

if TYPE_CHECKING:
    from chute.amqp.channel import Channel
    from chute.amqp.session import AmqpSession


class Transaction:
    __slots__ = ("publishes", "settles")

    def __init__(self) -> None:
        self.publishes: list = []  # connection.Content events
        self.settles: list = []  # (method, tag, multiple, action, requeue)


async def tx_select(session: AmqpSession, channel: Channel, method) -> object:
    if channel.confirm:
        raise AmqpError(PRECONDITION_FAILED, "cannot switch from confirm to tx mode")
    if channel.tx is None:
        channel.tx = Transaction()
    return commands.Tx.SelectOk()


def _transaction(channel: Channel) -> Transaction:
    if channel.tx is None:
        raise AmqpError(PRECONDITION_FAILED, "channel is not transactional")
    return channel.tx


async def tx_commit(session: AmqpSession, channel: Channel, method) -> object:
    tx = _transaction(channel)
    publishes, settles = tx.publishes, tx.settles
    tx.publishes, tx.settles = [], []
    if publishes:
        routing = basic.publish(session, channel, publishes)
        if routing is not None:  # a cluster node reads what routing needs first (publish_routing.py)
            await asyncio.wait([routing])
        if channel.closed:  # a publish was refused (no such exchange, ...): the channel is closed with it
            return None
    for each in settles:
        channel.settle(*each)
    waiting = list(channel.publishing) + session.flush_settles(durable_acks=True)
    if waiting:
        await asyncio.wait(waiting)
    return commands.Tx.CommitOk()


async def tx_rollback(session: AmqpSession, channel: Channel, method) -> object:
    tx = _transaction(channel)
    tx.publishes, tx.settles = [], []
    return commands.Tx.RollbackOk()


HANDLERS = {commands.Tx.Select: tx_select, commands.Tx.Commit: tx_commit, commands.Tx.Rollback: tx_rollback}
