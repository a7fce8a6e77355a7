"""Chute: a durable message broker for Python — queues and topics on an append-only log.

async with chute.Broker("./chute-data") as broker:
    await broker.create_queue("jobs")
    await broker.publish("jobs", b"hello")
    [delivery] = await broker.receive("jobs")
    await broker.ack("jobs", delivery.receipt)
"""

from chute.broker import Broker
from chute.client import AsyncClient, AsyncConsumer, Client
from chute.consumer import Consumer
from chute.errors import ChuteError
from chute.model import (
    Delivery,
    Message,
    Publish,
    QueueInfo,
    QueueSettings,
    QueueStats,
    SubscriptionInfo,
    TopicInfo,
    TopicSettings,
)

__all__ = [
    "AsyncClient",
    "AsyncConsumer",
    "Broker",
    "Client",
    "ChuteError",
    "Consumer",
    "Delivery",
    "Message",
    "Publish",
    "QueueInfo",
    "QueueSettings",
    "QueueStats",
    "SubscriptionInfo",
    "TopicInfo",
    "TopicSettings",
]

__version__ = "0.1.0"
