"""A real Chute server with its AMQP listener on 127.0.0.1 (ephemeral ports), shared by a test module, and
unique names so tests do not see one another's queues.

`CHUTE_AMQP_TARGET=rabbitmq` runs the modules that use only AMQP clients (the `server` fixture's `amqp_url`)
against Debian's `rabbitmq-server` instead (started on free ports by benchmarks/amqp.py's `RabbitServer`), so the
same tests show where Chute and RabbitMQ differ; tests that look inside Chute are marked `chute_only`."""

from __future__ import annotations

import itertools
import os
import types
import uuid

import pika
import pytest

from chute.testing import running_server

_COUNTER = itertools.count()


TARGET = os.environ.get("CHUTE_AMQP_TARGET", "chute")
chute_only = pytest.mark.skipif(TARGET != "chute", reason="looks inside Chute")


@pytest.fixture(scope="module")
def server():
    if TARGET == "rabbitmq":
        from benchmarks.amqp import RabbitServer

        rabbit = RabbitServer()
        try:
            yield types.SimpleNamespace(amqp_url=rabbit.url.replace("guest:guest@", ""), url=None,
                                        server=types.SimpleNamespace(amqp_port=rabbit.port))  # fmt: skip
        finally:
            rabbit.stop()
        return
    with running_server() as running:
        yield running


@pytest.fixture
def name() -> str:
    """A queue/exchange name no other test uses."""
    return f"t{next(_COUNTER)}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def connection(server):
    conn = pika.BlockingConnection(pika.URLParameters(server.amqp_url))
    yield conn
    if conn.is_open:
        conn.close()


@pytest.fixture
def channel(connection):
    return connection.channel()
