"""Exclusive queues in a cluster: a queue declared exclusive through one node belongs to that connection on every
node (405 RESOURCE_LOCKED for any other connection, whichever node it uses and whichever node serves the queue),
is deleted when that connection closes, and is deleted too when the connection's node stops or dies, since its
connection is gone with it (as RabbitMQ deletes exclusive queues when their owner's node goes down). Two nodes on
one PostgreSQL, in-process Servers; pika as the client."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker

from chute import AsyncClient
from chute.amqp import front as amqp_front
from tests.cluster.inprocess import balanced, running_nodes
from tests.cluster.test_amqp_cluster import SHARDS, _config, _url, owned_by

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def nodes(postgres_url, tmp_path, monkeypatch):
    monkeypatch.setattr(amqp_front, "SWEEP_S", 0.5)
    async with running_nodes(postgres_url, tmp_path, 2, SHARDS, _config) as servers:
        yield servers


def _refusals(server, queue: str) -> list[int]:
    """The reply code of each method another connection (through `server`) may not use on exclusive `queue`."""
    connection = pika.BlockingConnection(pika.URLParameters(_url(server)))
    codes = []
    try:
        for action in (lambda ch: ch.queue_declare(queue, exclusive=True),
                       lambda ch: ch.queue_declare(queue, passive=True),
                       lambda ch: ch.basic_get(queue),
                       lambda ch: ch.basic_consume(queue, lambda *a: None),
                       lambda ch: ch.queue_purge(queue),
                       lambda ch: ch.queue_bind(queue, "amq.direct", routing_key=queue),
                       lambda ch: ch.queue_delete(queue)):  # fmt: skip
            channel = connection.channel()
            try:
                action(channel)
                codes.append(200)
            except ChannelClosedByBroker as closed:
                codes.append(closed.reply_code)
    finally:
        connection.close()
    return codes


def _exists(server, queue: str) -> bool:
    """Whether a passive queue.declare through `server` finds `queue` (404 means it does not)."""
    connection = pika.BlockingConnection(pika.URLParameters(_url(server)))
    try:
        connection.channel().queue_declare(queue, passive=True)
        return True
    except ChannelClosedByBroker as closed:
        assert closed.reply_code == 404, closed
        return False
    finally:
        with contextlib.suppress(Exception):
            connection.close()


async def _until_gone(server, queue: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while await asyncio.to_thread(_exists, server, queue):
        assert time.monotonic() < deadline, f"{queue} still exists after {timeout_s} s"
        await asyncio.sleep(0.2)


def _declare_exclusive(server, queues: list[str]) -> pika.BlockingConnection:
    """A connection through `server` that declares each of `queues` exclusive and puts one message in each."""
    connection = pika.BlockingConnection(pika.URLParameters(_url(server)))
    channel = connection.channel()
    channel.confirm_delivery()
    for queue in queues:
        channel.queue_declare(queue, exclusive=True)
        channel.basic_publish("", queue, b"mine")
    return connection


async def test_an_exclusive_queue_belongs_to_its_connection_on_every_node(nodes):
    a, b = nodes
    on_a, on_b = owned_by(a, "excl-a-")[0], owned_by(b, "excl-b-")[0]
    owner = await asyncio.to_thread(_declare_exclusive, b, [on_a, on_b])
    try:
        for through in (a, b):  # another connection, through the node serving the queue or the other one
            for queue in (on_a, on_b):
                assert await asyncio.to_thread(_refusals, through, queue) == [405] * 7, (through.url, queue)

        def owner_uses_them() -> list:
            channel = owner.channel()
            got = [channel.basic_get(queue, auto_ack=True)[2] for queue in (on_a, on_b)]
            channel.queue_bind(on_a, "amq.direct", routing_key="k")
            return got

        assert await asyncio.to_thread(owner_uses_them) == [b"mine", b"mine"]
    finally:
        await asyncio.to_thread(owner.close)
    for queue in (on_a, on_b):  # the connection closed: its queues go, on whichever node they live
        await _until_gone(a, queue)
    async with AsyncClient(a.url) as native:
        assert not {on_a, on_b} & {info.name for info in await native.list_queues()}


async def test_the_exclusive_queues_of_a_stopped_node_are_deleted_by_the_others(nodes):
    a, b = nodes
    on_a, on_b = owned_by(a, "gone-a-")[0], owned_by(b, "gone-b-")[0]
    touched = owned_by(a, "gone-t-")[0]
    owner = await asyncio.to_thread(_declare_exclusive, b, [on_a, on_b, touched])
    await b.stop()  # its connections end with it; what they owned is left to the node that remains
    with contextlib.suppress(Exception):
        owner.close()
    await balanced([a], SHARDS)  # node A serves every shard (during the takeover a deletion is `unavailable`)

    def declare_again() -> int:  # a new connection may take the name at once: the old owner is gone
        connection = pika.BlockingConnection(pika.URLParameters(_url(a)))
        try:
            return connection.channel().queue_declare(touched, exclusive=True).method.message_count
        finally:
            connection.close()

    assert await asyncio.to_thread(declare_again) == 0  # a new queue, not the old one with its message
    await _until_gone(a, touched)  # and it went with that connection
    for queue in (on_a, on_b):  # the others, which nobody touches, go by the sweep of the node serving them now
        await _until_gone(a, queue)


async def test_a_queue_declared_exclusive_on_one_broker_has_no_owner_in_its_record(tmp_path):
    """On one broker the exclusive owner stays in memory (the queue is deleted at the next start anyway)."""
    from chute.server.app import Server
    from chute.server.config import ServerConfig

    server = await Server(ServerConfig(host="127.0.0.1", port=0, http_port=0, amqp_port=0,
                                       data_dir=str(tmp_path / "one"))).start()  # fmt: skip
    try:
        connection = await asyncio.to_thread(_declare_exclusive, server, ["solo"])
        attributes = server.broker.core.queues["solo"].settings.attributes
        assert '"exclusive":true' in attributes["amqp-queue"] and "owner" not in attributes["amqp-queue"]
        assert await asyncio.to_thread(_refusals, server, "solo") == [405] * 7
        await asyncio.to_thread(connection.close)
    finally:
        await server.stop()
