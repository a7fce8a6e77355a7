"""SIGKILL of `chute serve` under AMQP publishes with confirms and consumer acks: every publish confirmed before
the kill is, after a restart on the same data directory, either still in the queue or was acked by the consumer
(a confirm means durable); nothing is there twice."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pika
import pytest
from pika.exceptions import AMQPError

pytestmark = pytest.mark.timeout(180)
MESSAGES = int(os.environ.get("CHUTE_AMQP_KILL_MESSAGES", "3000"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(data_dir, port: int, log) -> subprocess.Popen:
    command = [sys.executable, "-m", "chute", "serve", "--data-dir", str(data_dir), "--port", "0", "--http-port",
               "-1", "--amqp-port", str(port), "--fsync", "always"]  # fmt: skip
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, "chute serve exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            assert time.monotonic() < deadline, "chute serve did not listen within 60 s"
            time.sleep(0.05)


def test_sigkill_under_confirmed_publishes_and_acks(tmp_path):
    port = free_port()
    url = f"amqp://guest:guest@127.0.0.1:{port}/"
    log = (tmp_path / "serve.log").open("w")
    server = serve(tmp_path / "data", port, log)
    confirmed, acked = [], []
    try:
        setup = pika.BlockingConnection(pika.URLParameters(url))
        setup.channel().queue_declare("jobs", durable=True)
        setup.close()

        def publish() -> None:
            try:
                connection = pika.BlockingConnection(pika.URLParameters(url))
                channel = connection.channel()
                channel.confirm_delivery()
                for i in range(MESSAGES):
                    channel.basic_publish("", "jobs", str(i).encode(), pika.BasicProperties(delivery_mode=2))
                    confirmed.append(str(i).encode())  # basic_publish returned: the broker's ack came
            except (AMQPError, OSError):
                pass  # the server was killed

        def consume() -> None:
            try:
                connection = pika.BlockingConnection(pika.URLParameters(url))
                channel = connection.channel()
                channel.basic_qos(prefetch_count=50)
                for method, _, body in channel.consume("jobs", inactivity_timeout=30):
                    if method is None:
                        return
                    if int(body) % 3 == 0:  # ack a third, leave the rest unacked (back in the queue later)
                        channel.basic_ack(method.delivery_tag)
                        acked.append(body)
            except (AMQPError, OSError):
                pass

        threads = [threading.Thread(target=publish), threading.Thread(target=consume)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while len(confirmed) < MESSAGES // 3:
            assert time.monotonic() < deadline, f"only {len(confirmed)} publishes confirmed in 60 s"
            time.sleep(0.01)
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        for thread in threads:
            thread.join(60)
        killed_after = len(confirmed)
        server = serve(tmp_path / "data", port, log)
        connection = pika.BlockingConnection(pika.URLParameters(url))
        channel = connection.channel()
        stored = []
        while (got := channel.basic_get("jobs", auto_ack=True))[0] is not None:
            stored.append(got[2])
        connection.close()
        assert len(stored) == len(set(stored)), "a message is stored twice"
        missing = set(confirmed) - set(stored) - set(acked)
        assert not missing, f"{len(missing)} confirmed publishes lost (of {killed_after} confirmed)"
        assert acked and len(stored) >= killed_after - len(acked)  # both sides were at work when it was killed
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(30)
        log.close()
