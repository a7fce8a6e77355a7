"""THE route table of the HTTP API: every route with its access rule, models, success status, query parameters,
the errors it may answer besides the common ones, and its handler. The dispatcher (call.py), the OpenAPI
document (openapi.py), the API page and the tests (auth's included) all read this one table.

Invariant: every route here is served, documented and authorized the same way; nothing under /api/v1 is served
that is not in the table.
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from chute.errors import (
    InvalidReceipt,
    QueueExists,
    QueueFull,
    QueueInUse,
    QueueNotFound,
    ServerBusy,
    StorageFailed,
    StorageFull,
    StorageReadOnly,
    SubscriptionNotFound,
    TopicExists,
    TopicNotFound,
    Unauthenticated,
)
from chute.model import QueueSettings, QueueStats, SubscriptionInfo, TopicInfo, TopicSettings
from chute.server.api import cluster as c
from chute.server.api import models as m
from chute.server.api import queues as q
from chute.server.api import system as s
from chute.server.api import topics as t
from chute.server.api.call import Query, Route

V1 = "/api/v1"
WRITE = (StorageFailed, StorageFull, StorageReadOnly)
QUEUE = (QueueNotFound,)
TOPIC = (TopicNotFound,)
PUBLISH = (QueueFull, ServerBusy, *WRITE)  # server_busy: over the memory high-water mark (call.py)

PEEK_COUNT = Query("max_messages", Annotated[int, Meta(ge=1, le=m.MAX_PEEK)], "how many messages (1..100)", 10)
BINDING = (
    Query("pattern", Annotated[str, Meta(min_length=1, max_length=1000)], "the subscription's subject pattern"),
    Query("queue", m.Name, "the queue the subscription feeds"),
)


def _route(method: str, path: str, handler, summary: str, access, kind=None, **options) -> Route:
    return Route(method, V1 + path, handler, summary, access, kind, **options)


ROUTES: tuple[Route, ...] = (
    # -- queues ----------------------------------------------------------------------------------------------
    _route("GET", "/queues", q.list_queues, "List queues (those the caller may see)", "user", reply=m.QueueList),
    _route("PUT", "/queues/{name}", q.create_queue, "Create a queue (idempotent with the same settings)", "manage",
           "queue", body=QueueSettings, body_required=False, reply=m.QueueDetail, status=201,
           errors=(QueueExists, TopicExists, QueueNotFound, *WRITE),
           description="201 if created, 200 if it existed with the same settings; 409 `queue_exists` if with "
                       "others. `queue_not_found`: the dead-letter queue does not exist."),
    _route("GET", "/queues/{name}", q.get_queue, "Describe a queue: settings, stats, dead-letter sources", "see",
           "queue", reply=m.QueueDetail, errors=QUEUE),
    _route("PATCH", "/queues/{name}", q.update_queue, "Change some settings of a queue", "manage", "queue",
           body=m.QueueSettingsPatch, reply=m.QueueDetail, errors=(*QUEUE, *WRITE)),
    _route("DELETE", "/queues/{name}", q.delete_queue, "Delete a queue with its messages", "manage", "queue",
           errors=(*QUEUE, QueueInUse, *WRITE)),
    _route("GET", "/queues/{name}/stats", q.queue_stats, "A queue's depths and counters", "see", "queue",
           reply=QueueStats, errors=QUEUE),
    _route("POST", "/queues/{name}/messages", q.publish, "Publish a message (answered once durable)", "publish",
           "queue", body=m.PublishMessage, reply=m.Published, status=201, errors=(*QUEUE, *PUBLISH)),
    _route("POST", "/queues/{name}/messages/batch", q.publish_batch, "Publish messages in order (1..1000)",
           "publish", "queue", body=m.PublishBatch, reply=m.PublishedBatch, status=201,
           errors=(*QUEUE, *PUBLISH)),
    _route("GET", "/queues/{name}/messages", q.peek, "Peek at messages in delivery order (leases nothing)",
           "consume", "queue", reply=m.MessageList, query=(PEEK_COUNT,), errors=QUEUE),
    _route("POST", "/queues/{name}/receive", q.receive, "Receive messages under a lease, with long polling",
           "consume", "queue", body=m.ReceiveRequest, body_required=False, reply=m.DeliveryList, errors=QUEUE,
           description="Waits up to `wait_s` for the first message; `deliveries` is empty if none came. At most "
                       "`max_messages` deliveries and about 8 MiB of bodies per reply."),
    _route("POST", "/queues/{name}/ack", q.ack, "Ack deliveries: they are removed for good", "consume", "queue",
           body=m.AckRequest, reply=m.Empty, errors=(*QUEUE, InvalidReceipt, *WRITE),
           description="Unknown receipts: 400 `invalid_receipt` listing them in `error.receipts`; the others "
                       "were acked."),
    _route("POST", "/queues/{name}/nack", q.nack, "Give deliveries back (now, later, or to the dead-letter queue)",
           "consume", "queue", body=m.NackRequest, reply=m.Empty, errors=(*QUEUE, InvalidReceipt, *WRITE)),
    _route("POST", "/queues/{name}/extend", q.extend, "Extend leases", "consume", "queue", body=m.ExtendRequest,
           reply=m.Empty, errors=(*QUEUE, InvalidReceipt)),
    _route("POST", "/queues/{name}/purge", q.purge_queue, "Remove every message that is not in flight", "manage",
           "queue", reply=m.Purged, errors=(*QUEUE, *WRITE)),
    _route("POST", "/queues/{name}/redrive", q.redrive, "Move dead-lettered messages back to their queues",
           "manage", "queue", body=m.RedriveRequest, body_required=False, reply=m.Redriven,
           errors=(*QUEUE, *PUBLISH)),
    # -- topics ----------------------------------------------------------------------------------------------
    _route("GET", "/topics", t.list_topics, "List topics (those the caller may see)", "user", reply=m.TopicList,
           tag="topics"),
    _route("PUT", "/topics/{name}", t.create_topic, "Create a topic (idempotent with the same settings)",
           "manage", "topic", body=TopicSettings, body_required=False, reply=TopicInfo, status=201,
           errors=(TopicExists, QueueExists, *WRITE), tag="topics",
           description="201 if created, 200 if it existed with the same settings; 409 `topic_exists` if with "
                       "others."),
    _route("GET", "/topics/{name}", t.get_topic, "Describe a topic with its subscriptions", "see", "topic",
           reply=TopicInfo, errors=TOPIC, tag="topics"),
    _route("PATCH", "/topics/{name}", t.update_topic, "Change some settings of a topic", "manage", "topic",
           body=m.TopicSettingsPatch, reply=TopicInfo, errors=(*TOPIC, *WRITE), tag="topics"),
    _route("DELETE", "/topics/{name}", t.delete_topic, "Delete a topic and its subscriptions (queues stay)",
           "manage", "topic", errors=(*TOPIC, *WRITE), tag="topics"),
    _route("POST", "/topics/{name}/messages", t.publish_to_topic, "Publish a message to a topic", "publish",
           "topic", body=m.PublishMessage, reply=m.Published, status=201, errors=(*TOPIC, *PUBLISH),
           tag="topics"),
    _route("POST", "/topics/{name}/messages/batch", t.publish_batch_to_topic, "Publish messages to a topic",
           "publish", "topic", body=m.PublishBatch, reply=m.PublishedBatch, status=201,
           errors=(*TOPIC, *PUBLISH), tag="topics"),
    _route("POST", "/topics/{name}/receive", t.receive_from_topic, "Receive messages published while waiting",
           "consume", "topic", body=m.TopicReceiveRequest, body_required=False, reply=m.DeliveryList,
           errors=TOPIC, tag="topics",
           description="An ephemeral subscription (`pattern`, `filter`) lives for the request: it waits up to "
                       "`wait_s` for the first message published to the topic meanwhile and answers with at most "
                       "`max_messages`. At most once: receipts are null, nothing to ack; messages published "
                       "between requests are not kept. `invalid_name`: a bad pattern."),
    _route("GET", "/topics/{name}/subscriptions", t.list_subscriptions, "List a topic's subscriptions", "see",
           "topic", reply=m.SubscriptionList, errors=TOPIC, tag="topics"),
    _route("POST", "/topics/{name}/subscriptions", t.subscribe, "Subscribe a queue to a topic", "manage", "topic",
           body=m.SubscribeRequest, reply=SubscriptionInfo, status=201, errors=(*TOPIC, *QUEUE, *WRITE),
           tag="topics", description="Needs `manage` on the topic and on the queue. The same pattern and "
                                     "queue again replace the filter."),
    _route("PATCH", "/topics/{name}/subscriptions", t.update_subscription, "Change a subscription's filter",
           "manage", "topic", body=m.SubscriptionPatch, reply=SubscriptionInfo, query=BINDING,
           errors=(*TOPIC, SubscriptionNotFound, *WRITE), tag="topics",
           description="Needs `manage` on the topic and on the queue."),
    _route("DELETE", "/topics/{name}/subscriptions", t.unsubscribe, "Unsubscribe a queue", "manage", "topic",
           query=BINDING, errors=(*TOPIC, SubscriptionNotFound, *WRITE), tag="topics",
           description="Needs `manage` on the topic and on the queue."),
    # -- the server ------------------------------------------------------------------------------------------
    _route("GET", "/overview", s.overview, "Version, state, counts, totals of every visible queue, storage",
           "user", reply=m.Overview, tag="server"),
    _route("GET", "/connections", s.connections, "Native-protocol connections with their consumers (superuser)",
           "superuser", reply=m.ConnectionList, tag="server"),
    _route("GET", "/consumers", s.consumers, "Push consumers on queues the caller may see", "user",
           reply=m.ConsumerList, tag="server"),
    _route("GET", "/cluster", c.cluster_status, "The cluster's nodes and the shards each holds, as this node sees "
           "it", "user", reply=c.ClusterStatus, tag="server",
           description="`enabled: false` (and nothing else) on a broker that is not a cluster node (no `--store`)."),
    _route("POST", "/login", s.login, "Trade a user's password for a session token (for Bearer)", "public",
           body=m.LoginRequest, reply=m.LoginReply, errors=(Unauthenticated,), tag="auth"),
    _route("GET", "/whoami", s.whoami, "Who the credentials belong to, and their permissions", "user",
           reply=m.WhoAmI, tag="auth"),
)  # fmt: skip
