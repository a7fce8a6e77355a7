"""The memory high-water mark over AMQP: while unconfirmed publishes hold more bytes than the mark, AMQP
connections that announced the capability get connection.blocked (and none is read); once the bytes are
confirmed (below half of the mark) they get connection.unblocked and the publishes go on. Durability is held by
making the file store's fsync wait (tests/held_fsync.py)."""

from __future__ import annotations

import time

import pika
import pytest
from pamqp import commands

from chute.testing import running_server
from tests.amqp.raw import Raw
from tests.held_fsync import HeldFsync

pytestmark = pytest.mark.timeout(60)
MARK = 2**20  # the smallest memory_high_water_bytes allowed


def test_blocked_then_unblocked_around_the_memory_mark():
    with running_server(fsync="always", memory_high_water_bytes=MARK) as running:
        held = HeldFsync(running)
        watcher = Raw(running.server.amqp_port)
        publisher = pika.BlockingConnection(pika.URLParameters(running.amqp_url))
        try:
            watcher.handshake(capabilities={"connection.blocked": True})
            channel = publisher.channel()
            channel.queue_declare("big", durable=True)
            held.hold()
            for _ in range(5):  # 1.5 MB, unconfirmed while the fsync is held: over the mark
                channel.basic_publish("", "big", b"x" * 300_000)
            publisher.process_data_events(time_limit=0.1)
            watcher.expect(commands.Connection.Blocked)
            server = running.server
            assert server.memory_paused
            held.release()
            watcher.expect(commands.Connection.Unblocked)
            deadline = time.monotonic() + 10
            while channel.queue_declare("big", passive=True).method.message_count < 5:
                assert time.monotonic() < deadline, "the publishes did not all land"
                publisher.sleep(0.01)
            assert server.backpressure_pauses >= 1 and server.publish_bytes == 0
        finally:
            held.release()
            watcher.close()
            publisher.close()
