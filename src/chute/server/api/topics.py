"""Handlers of /api/v1/topics/...: topics (create, list, describe, update, delete), publishing to them,
receiving from them (an ephemeral subscription for one request) and their subscriptions (list, subscribe, change
the filter, unsubscribe).

Invariants: a topic route only ever acts on a topic (a queue of the same name is `topic_not_found`);
subscribing, changing a subscription's filter and unsubscribing need `manage` on the topic (the route) and on
the queue it feeds (checked here, before anything changes), since they decide what that queue receives. A
receive's ephemeral subscription is gone when its handler ends, however it ends (answered, client gone,
cancelled).
"""

from __future__ import annotations

import inspect

from chute.model import validate_name
from chute.server import auth
from chute.server.api import models as m
from chute.server.api.call import Call
from chute.server.api.queues import REPLY_BODY_BYTES, delivery_out, publish_many, publish_one, while_connected


async def list_topics(call: Call) -> m.TopicList:
    listed = call.broker.list_topics()
    listed = await listed if inspect.isawaitable(listed) else listed  # a cluster's router asks other nodes
    return m.TopicList(topics=[t for t in listed if call.principal.can_see("topic", t.name)])


async def create_topic(call: Call):
    existed = call.name in call.broker.core.topics
    info = await call.broker.create_topic(call.name, call.body)
    return (200 if existed else 201), info


async def get_topic(call: Call):
    return call.broker.topic_info(call.name)


async def update_topic(call: Call):
    return await call.broker.update_topic(call.name, **m.changes_of(call.body))


async def delete_topic(call: Call) -> None:
    await call.broker.delete_topic(call.name)


async def publish_to_topic(call: Call) -> m.Published:
    call.broker.core.topic(call.name)  # a topic route never publishes to a queue
    return await publish_one(call)


async def publish_batch_to_topic(call: Call) -> m.PublishedBatch:
    call.broker.core.topic(call.name)
    return await publish_many(call)


async def receive_from_topic(call: Call) -> m.DeliveryList:
    """Messages published to the topic while the request waits: an ephemeral subscription lives for the request
    (at most once, receipt null, nothing to ack)."""
    request, broker = call.body, call.broker
    queue = broker.ephemeral_subscription(call.name, request.pattern, filter=request.filter)
    try:
        leasing = broker.receive(queue, request.max_messages, wait_s=request.wait_s, max_bytes=REPLY_BODY_BYTES)
        deliveries = await while_connected(call, leasing) if request.wait_s > 0 else await leasing
    finally:
        broker.end_ephemeral(queue)
    return m.DeliveryList(deliveries=[delivery_out(d) for d in deliveries])


async def list_subscriptions(call: Call) -> m.SubscriptionList:
    return m.SubscriptionList(subscriptions=call.broker.topic_info(call.name).subscriptions)


async def subscribe(call: Call):
    body = call.body
    auth.check(call.principal, "manage", "queue", body.queue)
    info = await call.broker.subscribe(call.name, body.pattern, body.queue, filter=body.filter, start=body.start)
    return 201, info


async def update_subscription(call: Call):
    queue = validate_name(call.query["queue"])
    auth.check(call.principal, "manage", "queue", queue)
    return await call.broker.update_subscription(call.name, call.query["pattern"], queue, filter=call.body.filter)


async def unsubscribe(call: Call) -> None:
    queue = validate_name(call.query["queue"])
    auth.check(call.principal, "manage", "queue", queue)
    await call.broker.unsubscribe(call.name, call.query["pattern"], queue)
