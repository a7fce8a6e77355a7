"""A real Chute server with its AMQP listener on 127.0.0.1 (ephemeral ports), shared by a test module, and
unique names so tests do not see one another's queues."""

from __future__ import annotations

import itertools
import uuid

import pika
import pytest

from chute.testing import running_server

_COUNTER = itertools.count()


@pytest.fixture(scope="module")
def server():
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
