"""`chute subscribe --ephemeral` and `chute tail`: live messages of a topic printed while the command runs, and
nothing left in the broker after it ends. Each command is a subprocess against a real server on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid

import pytest

import chute
from chute.testing import running_server

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server():
    with running_server() as running:
        yield running


@pytest.fixture
def client(server):
    with chute.Client(server.url) as c:
        yield c


@pytest.fixture
def topic(client) -> str:
    name = f"t{uuid.uuid4().hex[:10]}"
    client.create_topic(name)
    return name


def start(server, *args: str) -> subprocess.Popen:
    """Run a command; return once it says it is listening (its subscription exists)."""
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "CHUTE_URL": server.url})  # fmt: skip
    line = process.stderr.readline()
    assert line.startswith("listening to "), line + process.stderr.read()
    return process


def ephemeral_subscriptions(client, topic: str) -> list:
    [info] = [t for t in client.list_topics() if t.name == topic]
    return [s for s in info.subscriptions if s.ephemeral]


def test_subscribe_ephemeral_prints_live_messages_until_ctrl_c(server, client, topic):
    client.publish(topic, b"before", subject="a.b")
    process = start(server, sys.executable, "-m", "chute.cli", "subscribe", "--ephemeral", topic, "a.*")
    [subscription] = ephemeral_subscriptions(client, topic)
    assert subscription.pattern == "a.*"
    client.publish(topic, b"one", subject="a.b")
    client.publish(topic, b"skipped", subject="b.b")
    client.publish(topic, b"two", subject="a.c")
    assert process.stdout.readline() == "one\n"
    assert process.stdout.readline() == "two\n"
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert out == "" and err.strip() == f"printed 2 messages from {topic}"
    assert ephemeral_subscriptions(client, topic) == []


def test_tail_with_a_filter_json_and_a_count(server, client, topic):
    process = start(server, sys.executable, "-m", "chute", "tail", topic, "--filter", "kind=new", "--json", "-n", "2")
    client.publish(topic, b"old", headers={"kind": "old"})
    client.publish(topic, b"first", headers={"kind": "new"})
    client.publish(topic, b"second", headers={"kind": "new"})
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert [json.loads(line)["body"] for line in out.splitlines()] == ["first", "second"]
    assert ephemeral_subscriptions(client, topic) == []


def test_a_killed_tail_leaves_nothing(server, client, topic):
    process = start(server, sys.executable, "-m", "chute", "tail", topic)
    assert len(ephemeral_subscriptions(client, topic)) == 1
    process.kill()
    process.communicate(timeout=60)
    for _ in range(500):  # the server notices the connection's end
        if not ephemeral_subscriptions(client, topic):
            break
        client.list_topics()  # a round trip, not a sleep
    assert ephemeral_subscriptions(client, topic) == []


def test_usage_errors(server, topic):
    env = {**os.environ, "CHUTE_URL": server.url}
    for args, fragment in (
        (("subscribe", topic, ">"), "QUEUE"),
        (("subscribe", "--ephemeral", topic, ">", "q"), "QUEUE"),
        (("subscribe", "--ephemeral", "--start", "earliest", topic, ">"), "--start"),
    ):
        result = subprocess.run([sys.executable, "-m", "chute.cli", *args], capture_output=True, text=True, env=env,
                                timeout=60)  # fmt: skip
        assert result.returncode == 2 and fragment in result.stderr, result.stderr


def test_an_unknown_topic_is_one_line(server):
    result = subprocess.run([sys.executable, "-m", "chute", "tail", "no-such-topic"], capture_output=True, text=True,
                            env={**os.environ, "CHUTE_URL": server.url}, timeout=60)  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["error: topic 'no-such-topic' does not exist (topic_not_found)"]
