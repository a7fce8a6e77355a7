"""The `chute` commands that talk to a broker, each run as a subprocess (`python -m chute.cli`) against a real
server on 127.0.0.1 (one per module, `chute.testing.running_server`); results are checked through `chute.Client`.

Every test uses its own queue and topic names, so the tests share the server without seeing each other.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid

import click
import pytest
from click.testing import CliRunner

import chute
from chute.cli import main
from chute.testing import running_server

pytestmark = pytest.mark.timeout(120)
RUN_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def server():
    with running_server() as running:
        yield running


@pytest.fixture
def client(server):
    with chute.Client(server.url) as c:
        yield c


@pytest.fixture
def name() -> str:
    """A prefix unique to the test: `f"{name}-q"` is a queue no other test uses."""
    return f"t{uuid.uuid4().hex[:10]}"


def run(
    *args: str, url: str | None = None, input: str | bytes | None = None, env: dict | None = None, text: bool = True
) -> subprocess.CompletedProcess:
    """`chute ARGS` with CHUTE_URL=url (when given); stdin from `input` (else empty)."""
    environment = {**os.environ, **({"CHUTE_URL": url} if url else {}), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "chute.cli", *args],
        input=input if input is not None else ("" if text else b""),
        capture_output=True,
        text=text,
        env=environment,
        timeout=RUN_TIMEOUT_S,
    )


def run_all(commands: list[tuple[str, ...]], url: str) -> list[subprocess.CompletedProcess]:
    """`run` for each command, all at once (a CLI process takes ~0.4 s to start)."""
    env = {**os.environ, "CHUTE_URL": url}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "chute.cli", *args],
            stdin=subprocess.DEVNULL,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in commands
    ]
    results = []
    for args, process in zip(commands, processes):
        out, err = process.communicate(timeout=RUN_TIMEOUT_S)
        results.append(subprocess.CompletedProcess(args, process.returncode, out, err))
    return results


def ok(*args: str, **options) -> subprocess.CompletedProcess:
    result = run(*args, **options)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"chute://127.0.0.1:{port}"


# -- help -------------------------------------------------------------------------------------------------------


def _command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for command_name, command in group.commands.items():
        paths.append((*prefix, command_name))
        if isinstance(command, click.Group):
            paths += _command_paths(command, (*prefix, command_name))
    return paths


def test_help_of_every_command():
    """`chute --help` as a user runs it (a subprocess), then every command's and group's help in this process (the
    same click objects: one interpreter start each cost ~13 s of CPU for ~40 commands)."""
    paths = _command_paths(main)
    for expected in [("publish",), ("consume",), ("queue", "redrive"), ("topic", "list"), ("subscribe",)]:
        assert expected in paths
    done = run("--help")
    assert done.returncode == 0 and "Usage:" in done.stdout and "publish" in done.stdout, done.stderr
    runner = CliRunner()
    for path in paths:
        result = runner.invoke(main, [*path, "--help"], env={"CHUTE_URL": None})
        assert result.exit_code == 0, (path, result.output, result.exception)
        assert "Usage:" in result.output and len(result.output.splitlines()) > 3, path


# -- publish ----------------------------------------------------------------------------------------------------


def test_publish_arguments_with_options(server, client, name):
    queue = f"{name}-q"
    ok("queue", "create", queue, url=server.url)
    result = ok(
        "publish",
        queue,
        "first",
        "second",
        "-H",
        "k=v",
        "--header",
        "eq=a=b",
        "--priority",
        "7",
        "--group",
        "g1",
        "--ttl",
        "600",
        "--ids",
        url=server.url,
    )
    ids = [int(line) for line in result.stdout.split()]
    assert len(ids) == 2 and result.stderr.strip() == f"published 2 messages to {queue}"
    deliveries = client.receive(queue, 10)
    assert [d.body for d in deliveries] == [b"first", b"second"] and [d.id for d in deliveries] == ids
    message = deliveries[0].message
    assert message.headers == {"k": "v", "eq": "a=b"}
    assert (message.priority, message.group) == (7, "g1")
    assert message.expires_at is not None and message.expires_at > time.time() + 500
    client.ack(deliveries)


def test_publish_delay_dedup_and_subject(server, client, name):
    queue, topic = f"{name}-q", f"{name}-t"
    client.create_queue(queue)
    ok("publish", queue, "later", "--delay", "60", url=server.url)
    assert client.queue_stats(queue).delayed == 1
    ok("publish", queue, "once", "--dedup-id", "d1", url=server.url)
    ok("publish", queue, "once", "--dedup-id", "d1", url=server.url)
    assert client.queue_stats(queue).ready == 1
    client.create_topic(topic)
    ok("subscribe", topic, "orders.*", queue, url=server.url)
    ok("publish", topic, "routed", "--subject", "orders.new", url=server.url)
    ok("publish", topic, "not routed", "--subject", "audit.x", url=server.url)
    assert [d.body for d in client.peek(queue)] == [b"once", b"routed", b"later"]  # peek lists delayed ones last


def test_publish_lines_of_stdin(server, client, name):
    queue = f"{name}-q"
    client.create_queue(queue)
    result = ok("publish", queue, input="one\ntwo \n\nthree\r\nlast", url=server.url)
    assert result.stdout == "" and "published 5 messages" in result.stderr
    assert [d.body for d in client.peek(queue)] == [b"one", b"two ", b"", b"three\r", b"last"]


def test_publish_many_lines_fast(server, client, name):
    queue = f"{name}-q"
    client.create_queue(queue)
    started = time.monotonic()
    ok("publish", queue, input="".join(f"{i}\n" for i in range(50_000)), url=server.url)
    assert time.monotonic() - started < 20
    assert client.queue_stats(queue).ready == 50_000


def test_publish_failure_says_how_many_were_confirmed(server, client, name):
    queue = f"{name}-q"
    result = run("publish", queue, "a", "b", url=server.url)
    assert_one_line_error(result, 1, "(queue_not_found)", "confirmed 0 of 2 messages")
    client.create_queue(queue, max_length=2)
    ok("publish", queue, "a", "b", url=server.url)
    result = run("publish", queue, "c", url=server.url)
    assert_one_line_error(result, 1, "(queue_full)", "confirmed 0 of 1 message")
    assert client.queue_stats(queue).ready == 2


# -- consume ----------------------------------------------------------------------------------------------------


def test_consume_count_prints_and_acks_only_what_it_needs(server, client, name):
    queue = f"{name}-q"
    client.create_queue(queue)
    client.publish_many(queue, [b"m%d" % i for i in range(5)])
    result = ok("consume", queue, "--count", "3", url=server.url)
    assert result.stdout == "m0\nm1\nm2\n" and "consumed 3 messages" in result.stderr
    stats = client.queue_stats(queue)
    assert (stats.ready, stats.in_flight, stats.acked, stats.delivered) == (2, 0, 3, 3)  # nothing leased in vain


def test_consume_count_waits_for_messages(server, client, name):
    queue = f"{name}-q"
    client.create_queue(queue)
    process = subprocess.Popen(
        [sys.executable, "-m", "chute.cli", "consume", queue, "--count", "2", "--url", server.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        broker = server.server.broker
        while not (broker._waiters.get(queue) or broker.dispatcher.watched.get(queue)):  # until it waits for messages
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.01)
        client.publish(queue, b"a")
        client.publish(queue, b"b")
        out, err = process.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        process.kill()
    assert process.returncode == 0 and out == "a\nb\n", err


def test_consume_until_idle_with_push_consumer(server, client, name):
    queue = f"{name}-q"
    client.create_queue(queue)
    client.publish_many(queue, [str(i).encode() for i in range(1000)])
    started = time.monotonic()
    result = ok("consume", queue, "--timeout", "0.5", "--prefetch", "50", url=server.url)
    assert time.monotonic() - started < 15
    assert result.stdout.split() == [str(i) for i in range(1000)]
    stats = client.queue_stats(queue)
    assert (stats.ready, stats.in_flight, stats.acked) == (0, 0, 1000)


def test_consume_empty_queue_exits_after_timeout(server, client, name):
    queue = f"{name}-q"
    client.create_queue(queue)
    started = time.monotonic()
    result = ok("consume", queue, "--timeout", "0.3", url=server.url)
    assert result.stdout == "" and 0.3 <= time.monotonic() - started < 15
    assert "consumed 0 messages" in result.stderr


@pytest.mark.parametrize("count", [None, "2"])
def test_consume_no_ack_gives_messages_back(server, client, name, count):
    queue = f"{name}-q"
    client.create_queue(queue)
    client.publish_many(queue, [b"a", b"b", b"c"])
    options = ["--count", count] if count else ["--timeout", "0.3"]
    result = ok("consume", queue, "--no-ack", *options, url=server.url)
    assert result.stdout == ("a\nb\n" if count else "a\nb\nc\n")
    stats = client.queue_stats(queue)
    assert (stats.ready, stats.in_flight, stats.acked) == (3, 0, 0)


def test_consume_json_and_undecodable_bodies(server, client, name):
    queue = f"{name}-q"
    client.create_queue(queue)
    [first] = client.publish_many(queue, [b"caf\xc3\xa9 \xff"], headers={"k": "v"})
    result = ok("consume", queue, "--count", "1", "--json", url=server.url)
    record = json.loads(result.stdout)
    assert record == {
        "id": first,
        "body": "café \\xff",
        "headers": {"k": "v"},
        "delivery_count": 1,
        "priority": 0,
        "subject": None,
    }
    client.publish(queue, b"\xfe\n")
    assert ok("consume", queue, "--count", "1", url=server.url).stdout == "\\xfe\n\n"


# -- queues -----------------------------------------------------------------------------------------------------


def test_queue_create_with_every_setting(server, client, name):
    queue, dlq = f"{name}-q", f"{name}-dlq"
    client.create_queue(dlq)
    every_setting = [
        "--lease", "12", "--max-deliveries", "4", "--dead-letter-queue", dlq, "--delay", "1.5",
        "--retention", "3600", "--on-expiry", "drop", "--max-length", "100", "--max-bytes", "100000",
        "--overflow", "drop-oldest", "--rate-limit", "50", "--rate-burst", "5", "--dedup-window", "60", "--fifo",
    ]  # fmt: skip
    result = ok("queue", "create", queue, *every_setting, url=server.url)
    assert queue in result.stdout
    [info] = [q for q in client.list_queues() if q.name == queue]
    assert info.settings == chute.QueueSettings(
        lease_s=12,
        max_deliveries=4,
        dead_letter_queue=dlq,
        delay_s=1.5,
        retention_s=3600,
        on_expiry="drop",
        max_length=100,
        max_bytes=100_000,
        overflow="drop-oldest",
        rate_limit=50,
        rate_burst=5,
        dedup_window_s=60,
        fifo=True,
    )
    ok("queue", "create", queue, *every_setting, url=server.url)  # the same settings again: idempotent
    assert_one_line_error(run("queue", "create", queue, url=server.url), 1, "(queue_exists)")


def test_queue_list_stats_peek_purge_delete(server, client, name):
    queue, other = f"{name}-q", f"{name}-other"
    client.create_queue(queue)
    client.create_queue(other)
    client.publish_many(queue, [b"x" * 200, b"hello [bold]world[/bold] :smile:"], headers={"h": "1"})
    client.publish(queue, b"third")
    client.receive(queue, 1, lease_s=60)  # the first, now in flight
    readers = [
        ("queue", "list"),
        ("queue", "list", "--json"),
        ("queue", "stats", queue),
        ("queue", "stats", queue, "--json"),
        ("queue", "peek", queue),
        ("queue", "peek", queue, "--json"),
    ]
    results = run_all(readers, url=server.url)
    assert all(r.returncode == 0 and r.stderr == "" for r in results), results
    listing, listing_json, stats_table, stats_json, peek, peek_json = (r.stdout for r in results)

    [row] = [line for line in listing.splitlines() if line.split() and line.split()[0] == queue]
    assert row.split() == [queue, "2", "1", "0", "0"]
    assert other in listing and "in flight" in listing
    by_name = {q["name"]: q for q in json.loads(listing_json)}
    assert by_name[queue]["stats"]["in_flight"] == 1 and by_name[other]["settings"]["lease_s"] == 30.0

    for field in ("ready", "in_flight", "delayed", "bytes", "published", "acked", "redelivered"):
        assert field in stats_table
    stats = json.loads(stats_json)
    assert (stats["name"], stats["published"], stats["ready"]) == (queue, 3, 2)

    assert "hello [bold]world[/bold] :smile:" in peek  # shown as is, not as markup
    assert "h=1" in peek and "x" * 50 in peek and "x" * 61 not in peek  # the long body is shortened
    assert [(r["body"], r["headers"]) for r in json.loads(peek_json)] == [
        ("hello [bold]world[/bold] :smile:", {"h": "1"}),
        ("third", {}),
        ("x" * 200, {"h": "1"}),  # peek lists the messages in flight last
    ]

    assert ok("queue", "purge", queue, url=server.url).stdout == f"purged 2 messages from {queue}\n"
    assert client.queue_stats(queue).ready == 0
    ok("queue", "delete", other, url=server.url)
    assert other not in ok("queue", "list", url=server.url).stdout
    assert_one_line_error(run("queue", "stats", other, url=server.url), 1, f"'{other}'", "(queue_not_found)")


def test_queue_stats_of_a_queue_nobody_received_from(server, name):
    ok("queue", "create", name, url=server.url)
    table = ok("queue", "stats", name, url=server.url).stdout
    [line] = [line for line in table.splitlines() if line.startswith("received_age_s")]
    assert line.split() == ["received_age_s", "never"] and "None" not in table


def test_queue_redrive_after_dead_lettering(server, client, name):
    queue, dlq = f"{name}-q", f"{name}-dlq"
    ok("queue", "create", dlq, url=server.url)
    ok("queue", "create", queue, "--max-deliveries", "1", "--dead-letter-queue", dlq, url=server.url)
    client.publish_many(queue, [b"a", b"b", b"c"])
    client.nack(client.receive(queue, 3), dead_letter=True)
    assert client.queue_stats(dlq).ready == 3
    peek = ok("queue", "peek", dlq, url=server.url).stdout
    assert "rejected" in peek and queue in peek  # the dead-letter reason and source
    assert ok("queue", "redrive", dlq, "--max", "1", url=server.url).stdout == f"moved 1 message back from {dlq}\n"
    assert ok("queue", "redrive", dlq, url=server.url).stdout.strip() == f"moved 2 messages back from {dlq}"
    assert (client.queue_stats(queue).ready, client.queue_stats(dlq).ready) == (3, 0)
    assert ok("consume", queue, "--count", "3", url=server.url).stdout.split() == ["a", "b", "c"]


# -- topics and subscriptions -----------------------------------------------------------------------------------


def test_topics_and_subscriptions(server, client, name):
    topic, queue, other = f"{name}-t", f"{name}-q", f"{name}-t2"
    ok("topic", "create", topic, "--retention", "600", "--retention-bytes", "1000000", url=server.url)
    client.create_topic(other)
    client.create_queue(queue)
    client.publish(topic, b"old-eu", subject="orders.eu", headers={"region": "eu"})
    client.publish(topic, b"old-us", subject="orders.us", headers={"region": "us"})
    ok("subscribe", topic, "orders.*", queue, "--filter", "region=eu", "--start", "earliest", url=server.url)
    assert [d.body for d in client.peek(queue)] == [b"old-eu"]  # retained, filtered

    listing, listing_json = (r.stdout for r in run_all([("topic", "list"), ("topic", "list", "--json")], server.url))
    [row] = [line for line in listing.splitlines() if line.startswith(topic + " ")]
    assert "600 s" in row and f"orders.* -> {queue}" in row and "eu" in row
    assert other in listing
    topics = {t["name"]: t for t in json.loads(listing_json)}
    assert topics[topic]["subscriptions"][0]["queue"] == queue and topics[other]["subscriptions"] == []

    ok("unsubscribe", topic, "orders.*", queue, url=server.url)
    assert_one_line_error(run("unsubscribe", topic, "orders.*", queue, url=server.url), 1, "(subscription_not_found)")
    ok("topic", "delete", other, url=server.url)
    assert other not in {t.name for t in client.list_topics()}
    assert_one_line_error(run("topic", "delete", other, url=server.url), 1, "(topic_not_found)")


def test_subscribe_creates_nothing(server, client, name):
    topic, queue = f"{name}-t", f"{name}-q"
    assert_one_line_error(run("subscribe", topic, ">", queue, url=server.url), 1, "(topic_not_found)")
    client.create_topic(topic)
    assert_one_line_error(run("subscribe", topic, ">", queue, url=server.url), 1, f"'{queue}'", "(queue_not_found)")
    assert queue not in {q.name for q in client.list_queues()}


# -- errors and the broker URL ----------------------------------------------------------------------------------


def test_unknown_queue_is_one_line(server, name):
    queue = f"{name}-missing"
    commands = [
        ("consume", queue, "--count", "1"),
        ("consume", queue),
        ("queue", "stats", queue),
        ("queue", "peek", queue),
        ("queue", "purge", queue),
        ("queue", "redrive", queue),
        ("queue", "delete", queue),
    ]
    for args, result in zip(commands, run_all(commands, url=server.url)):
        assert result.returncode == 1, args
        assert_one_line_error(result, 1, f"'{queue}'", "(queue_not_found)")


def test_no_broker_is_one_line():
    url = closed_port_url()
    commands = [("queue", "list"), ("publish", "q", "x"), ("consume", "q", "--count", "1"), ("consume", "q")]
    for args, result in zip(commands, run_all(commands, url=url)):
        assert result.returncode == 1, args
        assert_one_line_error(result, 1, "(connection_lost)", url)


USAGE_ERRORS = [  # (command line, what its one line must say; run as `python -m chute.cli`, so no "chute")
    (("publish", "q", "x", "--priority", "10"), [" publish:", "'--priority'", "10", "from 0 to 9"]),
    (("publish", "q", "x", "--priority", "high"), ["'--priority'", "'high'", "an integer from 0 to 9"]),
    (("publish", "q", "x", "--header", "novalue"), ["'--header'", "NAME=VALUE"]),
    (("publish", "q", "x", "--delay", "-1"), ["'--delay'", "-1"]),
    (("publish", "q", "x", "--priority"), [" publish:", "'--priority' requires an argument"]),
    (("publish",), [" publish:", "missing argument 'DEST'"]),
    (("publish", "q", "x", "--prio", "3"), ["no such option '--prio'", "did you mean --group or --priority"]),
    (("consume", "q", "--count", "0"), [" consume:", "'--count'"]),
    (("consume", "q", "--follow", "--timeout", "1"), ["--follow"]),
    (("queue", "create", "q", "--overflow", "sometimes"),
     [" queue create:", "'--overflow'", "reject, reject-dead-letter, drop-oldest"]),
    (("queue", "create", "q", "--on-expiry", "later"), ["'--on-expiry'", "dead-letter", "drop"]),
    (("queue", "create", "q", "extra"), [" queue create:", "unexpected extra argument (extra)"]),
    (("queue", "list", "--timeout", "0"), ["'--timeout'", "a number, above 0 and at most 86400"]),
    (("subscribe", "t", ">", "q", "--start", "yesterday"), ["'--start'", "yesterday"]),
    (("subscribe", "t", ">", "q", "--filter", "region"), ["'--filter'"]),
    (("queue", "list", "--url", "http://127.0.0.1:6160"), ["'--url'"]),
    (("queue", "nonsense"), [" queue:", "no such command 'nonsense'", "commands: create, delete, list"]),
    (("nonsense",), ["no such command 'nonsense'", "commands: bench, cluster, consume, db, publish"]),
    (("--bogus",), ["no such option '--bogus'"]),
    (("user", "grant", "a", "--allow", "fly", "--queues", "*"), [" user grant:", "'--allow'"]),
]


def test_usage_errors_are_one_line_naming_the_flag_and_what_it_allows():
    commands = [args for args, _ in USAGE_ERRORS]
    for (args, fragments), result in zip(USAGE_ERRORS, run_all(commands, url=closed_port_url()), strict=True):
        assert result.stdout == "", args
        assert_one_line_error(result, 2, *fragments)
        assert result.stderr.rstrip().endswith(" --help')"), result.stderr  # where to read more


def test_usage_errors_in_process():
    """The same through click's runner: the group turns every usage error into one line, whichever command."""
    runner = CliRunner()
    for args, fragments in USAGE_ERRORS[:6]:
        result = runner.invoke(main, list(args), prog_name="chute", env={"CHUTE_URL": closed_port_url()})
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert all(fragment in lines[0] for fragment in fragments), lines[0]


def test_help_is_unchanged_and_a_bare_group_shows_its_help():
    runner = CliRunner()
    result = runner.invoke(main, ["publish", "--help"], prog_name="chute")
    assert result.exit_code == 0 and result.output.startswith("Usage: chute publish [OPTIONS] DEST [BODY]...")
    assert "--priority" in result.output
    bare = runner.invoke(main, ["queue"], prog_name="chute")
    assert bare.exit_code == 2 and "Usage: chute queue [OPTIONS] COMMAND [ARGS]..." in bare.output
    assert "Commands:" in bare.output


def test_chute_url_from_environment_and_url_flag_wins(server, client, name):
    queue = f"{name}-q"
    result = subprocess.run(
        [sys.executable, "-m", "chute.cli", "queue", "create", queue],
        env={**os.environ, "CHUTE_URL": server.url},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr
    assert queue in {q.name for q in client.list_queues()}
    ok("publish", queue, "x", "--url", server.url, env={"CHUTE_URL": closed_port_url()})
    assert client.queue_stats(queue).ready == 1
    assert_one_line_error(run("queue", "list", env={"CHUTE_URL": closed_port_url()}), 1, "(connection_lost)")


def test_stdout_closed_early_acks_only_what_was_printed(server, client, name):
    queue = f"{name}-q"
    client.create_queue(queue)
    client.publish_many(queue, [b"%d" % i for i in range(20_000)])
    process = subprocess.Popen(
        [sys.executable, "-m", "chute.cli", "consume", queue, "--url", server.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout.readline() == b"0\n"
        process.stdout.close()  # like `chute consume q | head -1`
        err = process.stderr.read()
        assert process.wait(timeout=RUN_TIMEOUT_S) == 141 and err == b""
    finally:
        process.kill()
        process.stderr.close()
    stats = client.queue_stats(queue)
    assert stats.in_flight == 0 and 1 <= stats.acked < 20_000 and stats.ready == 20_000 - stats.acked
