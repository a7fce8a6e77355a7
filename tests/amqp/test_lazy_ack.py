"""An AMQP basic.ack does not force a group commit of its own (`Broker.ack_lazy`): it is applied at once, its
record rides with the next group commit or goes after the store's lazy delay, a clean restart keeps it, and a
SIGKILL loses nothing that was confirmed (an ack not yet written may come back: at-least-once)."""

from __future__ import annotations

import os
import signal
import time

import pika
import pytest

from chute.storage.file import log as file_log
from chute.testing import running_server
from tests.amqp.conftest import chute_only
from tests.amqp.test_sigkill import free_port, serve

pytestmark = [pytest.mark.timeout(120), chute_only]
PERSISTENT = pika.BasicProperties(delivery_mode=2)


def fsyncs(running) -> int:
    return sum(running.server.broker.core.store.stats().fsync_buckets)


def publish(channel, *bodies: bytes) -> None:
    for body in bodies:
        channel.basic_publish("", "jobs", body, PERSISTENT)  # returns once confirmed (durable)


def ready(channel) -> int:
    return channel.queue_declare("jobs", passive=True).method.message_count


def drain(url: str) -> list[bytes]:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    stored = []
    while (got := channel.basic_get("jobs", auto_ack=True))[0] is not None:
        stored.append(got[2])
    connection.close()
    return stored


def test_an_ack_is_applied_at_once_without_a_commit_and_kept_by_a_clean_restart(tmp_path, monkeypatch):
    monkeypatch.setattr(file_log, "LAZY_FLUSH_S", 60.0)  # only a commit or the close can write the ack here
    with running_server(str(tmp_path), fsync="always") as running:
        connection = pika.BlockingConnection(pika.URLParameters(running.amqp_url))
        channel = connection.channel()
        channel.confirm_delivery()
        channel.queue_declare("jobs", durable=True)
        publish(channel, b"a", b"b")
        method, _, body = channel.basic_get("jobs")
        assert body == b"a"
        before = fsyncs(running)
        channel.basic_ack(method.delivery_tag)
        assert ready(channel) == 1  # the next method sees it: gone from the queue, "b" left
        publish(channel, b"c")
        assert fsyncs(running) == before + 1, "the ack forced a group commit of its own"
        assert drain(running.amqp_url) == [b"b", b"c"]  # and "a" is not leased any more: not given back either
        publish(channel, b"d")
        connection.close()
    with running_server(str(tmp_path), fsync="always") as running:
        assert drain(running.amqp_url) == [b"d"], "an acked message came back"


def test_sigkill_keeps_an_ack_that_rode_with_a_later_commit_or_the_lazy_delay(tmp_path):
    port = free_port()
    url = f"amqp://guest:guest@127.0.0.1:{port}/"
    data = tmp_path / "data"
    with (tmp_path / "serve.log").open("w") as log:
        server = serve(data, port, log)
        try:
            connection = pika.BlockingConnection(pika.URLParameters(url))
            channel = connection.channel()
            channel.confirm_delivery()
            channel.queue_declare("jobs", durable=True)
            publish(channel, b"a", b"b", b"c")
            got_a = channel.basic_get("jobs")[0]
            got_b = channel.basic_get("jobs")[0]
            channel.basic_ack(got_a.delivery_tag)
            publish(channel, b"d")  # its group commit carries the ack of "a" (records stay in order)
            on_disk = log_bytes(data)
            channel.basic_ack(got_b.delivery_tag)  # nothing follows: the lazy delay writes it
            assert ready(channel) == 2  # "c" and "d"
            deadline = time.monotonic() + 30
            while log_bytes(data) == on_disk:
                assert time.monotonic() < deadline, "the ack was not written within 30 s"
                time.sleep(0.01)
            connection.close()  # nothing leased is left: closing writes nothing
            server.send_signal(signal.SIGKILL)
            server.wait(10)
            server = serve(data, port, log)
            assert sorted(drain(url)) == [b"c", b"d"], "a confirmed publish was lost or an ack undone"
        finally:
            if server.poll() is None:
                server.terminate()
                server.wait(30)


def log_bytes(directory) -> int:
    """What the server has written to its log files (a SIGKILL keeps what was written): their bytes up to the
    zeros of the space reserved after the frames (a file's size runs ahead of what was written)."""
    total = 0
    for root, _, names in os.walk(directory):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                total += len(f.read().rstrip(b"\0"))
    return total
