"""A rejected delivery (basic.reject / basic.nack with requeue=false) of a queue that dead-letters.

The broker moves a dead-lettered message without rewriting it (its body and headers are stored once), so it
knows only the last dead-lettering. To keep the whole `x-death` history as RabbitMQ does (xdeath.py), a rejection
from an AMQP consumer is carried out here instead: the message is published again to the queue's dead-letter
queue with its header table holding the new `x-death` entry (added to those it had), then the delivery is
acked. The other reasons (expired, maxlen, delivery_limit) stay the broker's; their entry is added when the
message is delivered (mapping.py), so a message going round a loop of dead-letter queues (rejected in one,
expired in the other) shows every (queue, reason) with its count.

As RabbitMQ does, the republished message loses its per-message expiration; Chute's own options that would
change its fate there (a delay, a dedup id) are not carried over. Publish first, then ack: a crash between the two
delivers the message twice (at least once), never zero times. If the dead-letter queue refuses it (gone, full),
the broker's own dead-lettering is used (without the history). A header no AMQP table can carry (a name over 255
bytes, from another front) is carried over unchanged.

A publish refused by a full queue whose `x-overflow` is `reject-publish-dlx` is the broker's to dead-letter (the
queue's overflow is `reject-dead-letter`, for every front): its entry, reason `maxlen`, is added at delivery.
"""

from __future__ import annotations

import datetime
import logging
from typing import TYPE_CHECKING

from chute.amqp import state
from chute.amqp.declare import dead_letter_target
from chute.amqp.errors import AmqpError
from chute.amqp.exchanges import amqp_queue
from chute.amqp.mapping import (
    EXCHANGE_HEADER,
    ROUTING_KEY_HEADER,
    dead_lettered_as,
    to_properties,
    to_publish,
)
from chute.amqp.xdeath import add_death
from chute.errors import ChuteError
from chute.model import Delivery, Publish

if TYPE_CHECKING:
    from chute.amqp.session import AmqpSession

log = logging.getLogger("chute.amqp")


def republished(front, delivery: Delivery, reason: str = "rejected") -> Publish:
    """The message of a rejected delivery as it goes to the dead-letter queue, with the rejection in x-death, and
    the exchange and routing key RabbitMQ gives a dead letter (the queue's dead-letter exchange and routing key:
    the next death, and the dead-letter queue's consumers, see those)."""
    properties = to_properties(delivery)
    exchange, key = front.origin_of(delivery)
    table = dict(properties.headers or {})
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None, microsecond=0)
    add_death(table, queue=amqp_queue(delivery.queue), reason=reason, exchange=exchange, routing_keys=[key],
              time=now)  # fmt: skip
    properties.headers = table
    properties.expiration = None
    message = delivery.message
    publish = to_publish(properties, delivery.body, options=False)  # to a queue: the key goes in a header
    publish.group = message.group
    publish.priority = message.priority
    declared = front.book.queues.get(delivery.queue)
    exchange, key = dead_lettered_as(declared["arguments"] if declared is not None else None, exchange, key)
    headers = publish.headers if publish.headers is not None else {}
    for name, value in message.headers.items():
        if len(name.encode()) > 255:  # no AMQP table can hold it (another front's, say a 256-character SQS
            headers[name] = value  # attribute name): carried over as it was, for the other fronts
    headers[EXCHANGE_HEADER], headers[ROUTING_KEY_HEADER] = exchange, key
    publish.headers = headers
    return publish


async def _target(session: AmqpSession, queue: str) -> str | None:
    """Where `queue`'s dead letters go, or None."""
    found = await state.queue_settings(session.broker, queue)
    target = found.dead_letter_queue if found is not None else None
    declared = session.front.book.queues.get(queue)
    if target is None and found is not None and declared is not None:
        # no dead-letter queue in its settings: its dead-letter exchange may lead back to itself (RabbitMQ puts
        # the message back at the tail with its x-death), or to a queue made since
        try:
            target = await dead_letter_target(session, declared["arguments"])
        except AmqpError:
            target = None  # (an exchange that routes to several queues: dropped, as the broker would)
    return target


async def reject(session: AmqpSession, queue: str, deliveries: list[Delivery]) -> None:
    """Dead-letter rejected deliveries of `queue` with their x-death history (see the module docstring)."""
    broker = session.broker
    receipts = [delivery.receipt for delivery in deliveries]
    target = await _target(session, queue)
    if target is not None:
        try:
            await broker.publish_batch(target, [republished(session.front, delivery) for delivery in deliveries])
        except ChuteError:
            target = None
    if target is None:
        await broker.nack(queue, receipts, dead_letter=True)
        return
    await broker.ack(queue, receipts, dead_lettered=True)  # counted as the broker counts its own dead letters
