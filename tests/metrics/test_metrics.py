"""GET /metrics against a live server over real sockets: values follow what clients do, names follow the
Prometheus conventions, the output parses with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import re
import tempfile

import aiohttp
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import chute
from chute.errors import Unauthenticated
from chute.model import Publish
from chute.server import Server, ServerConfig, auth, metrics
from chute.server.auth import Principal
from chute.testing import RunningServer, serving

pytestmark = pytest.mark.timeout(60)


class Scrape:
    """One parsed scrape: families by name and every sample by (name, labels)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value for f in self.families.values() for s in f.samples
        }

    def __call__(self, name: str, **labels) -> float | None:
        return self.samples.get((name, tuple(sorted(labels.items()))))

    def queues(self) -> set[str]:
        return {dict(labels)["queue"] for name, labels in self.samples if dict(labels).get("queue") is not None}


async def scrape(server, **headers) -> Scrape:
    url = f"http://127.0.0.1:{server.http_port}/metrics"
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
        return Scrape(await response.text())


async def until(server, check, timeout: float = 5.0) -> Scrape:
    """Scrape until `check(scrape)` holds (state that changes when a connection's close reaches the server)."""
    async with asyncio.timeout(timeout):
        while True:
            result = await scrape(server)
            if check(result):
                return result
            await asyncio.sleep(0.01)


async def test_queue_depths_and_counters_follow_publish_receive_ack_nack_redeliver_and_dead_letter():
    async with serving() as server, chute.AsyncClient(server.url) as client:
        await client.create_queue("jobs-dlq")
        await client.create_queue("jobs", dead_letter_queue="jobs-dlq", lease_s=30)
        await client.create_queue("plain")
        before = await scrape(server)
        assert before("chute_queue_messages_ready", queue="jobs") == 0
        assert before("chute_queue_dead_letter_messages", queue="jobs") == 0
        assert before("chute_queue_dead_letter_messages", queue="plain") is None  # no dead-letter queue

        await client.publish_batch("jobs", [b"a", b"b", b"c", b"d"])
        await client.publish("jobs", b"later", delay_s=3600)
        after_publish = await scrape(server)
        assert after_publish("chute_queue_messages_published_total", queue="jobs") == 5
        assert after_publish("chute_queue_messages_ready", queue="jobs") == 4
        assert after_publish("chute_queue_messages_delayed", queue="jobs") == 1
        assert after_publish("chute_queue_messages_bytes", queue="jobs") == 4 + len(b"later")
        assert after_publish("chute_queue_oldest_message_age_seconds", queue="jobs") > 0
        assert after_publish("chute_queue_oldest_message_age_seconds", queue="plain") == 0

        first = await client.receive("jobs", 3)
        assert len(first) == 3
        received = await scrape(server)
        assert received("chute_queue_messages_in_flight", queue="jobs") == 3
        assert received("chute_queue_messages_ready", queue="jobs") == 1
        assert received("chute_queue_messages_delivered_total", queue="jobs") == 3

        await client.ack(first[0])
        await client.nack(first[1])
        await client.nack(first[2], dead_letter=True)
        settled = await scrape(server)
        assert settled("chute_queue_messages_acked_total", queue="jobs") == 1
        assert settled("chute_queue_messages_nacked_total", queue="jobs") == 2
        assert settled("chute_queue_messages_dead_lettered_total", queue="jobs") == 1
        assert settled("chute_queue_messages_in_flight", queue="jobs") == 0
        assert settled("chute_queue_messages_ready", queue="jobs") == 2
        assert settled("chute_queue_messages_ready", queue="jobs-dlq") == 1
        assert settled("chute_queue_dead_letter_messages", queue="jobs") == 1
        assert settled("chute_queue_messages_published_total", queue="jobs-dlq") == 0  # arrived, not published

        again = await client.receive("jobs", 2)
        assert sorted(d.body for d in again) == [b"b", b"d"]
        redelivered = await scrape(server)
        assert redelivered("chute_queue_messages_redelivered_total", queue="jobs") == 1  # b, after its nack
        assert redelivered("chute_queue_messages_delivered_total", queue="jobs") == 5


async def test_connections_and_consumers_are_counted_with_real_clients():
    async with serving() as server, chute.AsyncClient(server.url) as watcher:
        await watcher.create_queue("jobs")
        await watcher.create_queue("mail")
        one = await until(server, lambda s: s("chute_connections") == 1)
        assert one("chute_consumers") == 0 and one("chute_queue_consumers", queue="jobs") == 0

        async with chute.AsyncClient(server.url) as worker:
            jobs = [await worker.consume("jobs", prefetch=5), await worker.consume("jobs", prefetch=5)]
            mail = await worker.consume("mail")
            busy = await until(server, lambda s: s("chute_consumers") == 3)
            assert busy("chute_connections") == 2
            assert busy("chute_queue_consumers", queue="jobs") == 2
            assert busy("chute_queue_consumers", queue="mail") == 1
            await mail.close()
            fewer = await until(server, lambda s: s("chute_consumers") == 2)
            assert fewer("chute_queue_consumers", queue="mail") == 0
            for consumer in jobs:
                await consumer.close()
        gone = await until(server, lambda s: s("chute_connections") == 1)
        assert gone("chute_consumers") == 0


async def test_fsync_histogram_and_log_size_after_publishes_on_the_file_store():
    async with serving(fsync="always") as server, chute.AsyncClient(server.url) as client:
        await client.create_queue("jobs")
        start = await scrape(server)
        fsyncs = start("chute_fsync_duration_seconds_count")
        for _ in range(5):
            await client.publish("jobs", b"x" * 1000)  # each confirmed after its own group fsync
        after = await scrape(server)
        assert after("chute_fsync_duration_seconds_count") >= fsyncs + 5
        assert after("chute_fsync_duration_seconds_sum") > start("chute_fsync_duration_seconds_sum")
        family = after.families["chute_fsync_duration_seconds"]
        buckets = [(s.labels["le"], s.value) for s in family.samples if s.name.endswith("_bucket")]
        bounds = [float(le) for le, _ in buckets]
        assert bounds[0] == 0.00005 and bounds[-2] == 1.0 and bounds[-1] == float("inf") and bounds == sorted(bounds)
        counts = [count for _, count in buckets]
        assert counts == sorted(counts) and counts[-1] == after("chute_fsync_duration_seconds_count")
        assert after("chute_log_bytes") > 5000 and after("chute_log_segments") >= 1
        assert after("chute_log_written_bytes_total") > start("chute_log_written_bytes_total") + 5000
        assert after("chute_store_read_only") == 0 and after("chute_healthy") == 1


@contextlib.asynccontextmanager
async def memory_server():
    """A server over an in-memory broker (`serving()` builds a file-store broker)."""
    with tempfile.TemporaryDirectory(prefix="chute-test-") as data_dir:
        config = ServerConfig(data_dir=data_dir, host="127.0.0.1", port=0, http_port=0)
        server = await Server(config, broker=chute.Broker.in_memory()).start()
        try:
            yield RunningServer(server.url, server.port, server.http_port, data_dir, server)
        finally:
            await server.stop()


async def test_memory_store_shows_no_fsyncs_and_no_disk():
    async with memory_server() as server, chute.AsyncClient(server.url) as client:
        await client.create_queue("jobs")
        await client.publish("jobs", b"x")
        result = await scrape(server)
    assert result("chute_fsync_duration_seconds_count") == 0
    assert result("chute_log_bytes") == 0 == result("chute_checkpoint_bytes")
    assert result("chute_log_appends_total") > 0
    assert result("chute_queue_messages_ready", queue="jobs") == 1


async def test_a_deleted_queue_disappears_and_ephemeral_queues_are_only_counted():
    async with serving() as server, chute.AsyncClient(server.url) as client:
        await client.create_queue("short-lived")
        await client.create_queue("kept")
        await client.create_topic("news")
        await client.subscribe("news", ">", "kept")
        broker = server.server.broker
        listener = await broker.subscribe_ephemeral("news")
        await client.publish("news", b"hello", subject="news.today")
        seen = await scrape(server)
        assert seen.queues() == {"short-lived", "kept"}  # the ephemeral queue has no series of its own
        assert seen("chute_queues") == 2 and seen("chute_ephemeral_queues") == 1
        assert seen("chute_ephemeral_queue_messages_ready") == 1  # nobody has received it yet
        assert seen("chute_topic_retained_bytes", topic="news") == 0  # no retention
        assert seen("chute_topic_subscriptions", topic="news") == 2
        await listener.close()

        await client.delete_queue("short-lived")
        after = await scrape(server)
        assert after.queues() == {"kept"}
        assert not any(dict(labels).get("queue") == "short-lived" for _, labels in after.samples)
        assert "short-lived" not in after.text
        assert after("chute_queues") == 1 and after("chute_ephemeral_queues") == 0


# The conventions of https://prometheus.io/docs/practices/naming/ that a program can check.
UNIT_WORDS = {"seconds", "bytes"}
FORBIDDEN_UNITS = {"milliseconds", "ms", "microseconds", "kilobytes", "megabytes", "minutes", "hours", "kb", "mb"}


async def test_every_name_follows_the_prometheus_conventions():
    async with serving(fsync="always") as server, chute.AsyncClient(server.url) as client:
        await client.create_queue("dlq")
        await client.create_queue("jobs", dead_letter_queue="dlq")
        await client.create_topic("news")
        result = await scrape(server)
    types = re.findall(r"^# TYPE (\S+) (\S+)$", result.text, re.MULTILINE)
    helps = dict(re.findall(r"^# HELP (\S+) (.*)$", result.text, re.MULTILINE))
    assert len(types) == len({name for name, _ in types}) > 30  # each family once
    for name, kind in types:
        words = name.split("_")
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
        assert words[0] == "chute" or name.startswith("process_"), name  # process_*: prometheus_client's standard
        assert len(helps.get(name, "")) > 10, f"{name} has no HELP"
        assert not FORBIDDEN_UNITS & set(words), f"{name}: use base units"
        if kind == "counter":
            assert name.endswith("_total"), name
            words = words[:-1]
        else:
            assert not name.endswith("_total"), name
        unit_words = UNIT_WORDS & set(words)
        if unit_words:  # a unit, when there is one, ends the name
            assert words[-1] in UNIT_WORDS, name
    for family in result.families.values():
        for sample in family.samples:
            assert set(sample.labels) <= {"queue", "topic", "version", "le"}, sample
    assert result("chute_queue_messages_ready", queue="jobs") == 0


async def test_the_registry_and_the_fast_text_give_the_same_series():
    async with serving() as server, chute.AsyncClient(server.url) as client:
        await client.create_queue("dlq")
        await client.create_queue("jobs", dead_letter_queue="dlq")
        await client.create_topic("news")
        await client.subscribe("news", ">", "jobs")
        await client.publish_batch("jobs", [Publish(body=b"x", priority=3), b"yy"])
        await client.receive("jobs")
        registry, collector, _ = metrics.make_registry(server.server)
        slow = Scrape(generate_latest(registry).decode())
        fast = Scrape(metrics.render(list(collector.server_families()), collector.tables())[0].decode())
    slow_samples = {key: value for key, value in slow.samples.items() if not key[0].startswith("process_")}
    assert slow_samples.keys() == fast.samples.keys()
    assert any(key[0].startswith("process_") for key in slow.samples)  # the registry holds the process collector
    for key, value in slow_samples.items():
        if key[0] == "chute_queue_oldest_message_age_seconds":
            assert fast.samples[key] == pytest.approx(value, abs=1.0)
        else:
            assert fast.samples[key] == value, key


def test_label_values_are_escaped_as_the_text_format_requires():
    table = metrics.Table("queue", metrics.QUEUE_COLUMNS[:1], [('a"b\\c\nd', 1)])
    [family] = text_string_to_metric_families(table.render())
    assert family.samples[0].labels == {"queue": 'a"b\\c\nd'}


async def test_the_process_series_are_read_from_proc_off_the_event_loop(monkeypatch):
    """Resident memory, CPU and open files come with every scrape, and their reads of /proc (system calls that can
    wait in the kernel) are made in the scrape's worker thread, never on the loop that serves the clients."""
    import os
    import threading

    from prometheus_client import ProcessCollector

    threads: list[threading.Thread] = []
    real = ProcessCollector.collect

    def collect(self):
        threads.append(threading.current_thread())
        return real(self)

    monkeypatch.setattr(ProcessCollector, "collect", collect)
    async with serving() as server:
        result = await scrape(server)
    loop_thread = threading.current_thread()  # `serving` runs the server on this test's loop
    assert threads and all(thread is not loop_thread for thread in threads)
    with open("/proc/self/status") as status:
        rss_kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    assert 0.5 * rss_kb * 1024 < result("process_resident_memory_bytes") < 2 * rss_kb * 1024
    assert result("process_cpu_seconds_total") > 0
    assert 0 < result("process_open_fds") <= len(os.listdir("/proc/self/fd")) + 16


async def test_gzip_when_asked_plain_text_otherwise():
    async with serving() as server, chute.AsyncClient(server.url) as client:
        for i in range(20):
            await client.create_queue(f"queue-{i}")
        url = f"http://127.0.0.1:{server.http_port}/metrics"
        async with aiohttp.ClientSession(auto_decompress=False) as http:
            async with http.get(url, headers={"Accept-Encoding": "gzip"}) as response:
                assert response.headers["Content-Encoding"] == "gzip"
                zipped = Scrape(gzip.decompress(await response.read()).decode())
            async with http.get(url, headers={"Accept-Encoding": "identity"}) as response:
                assert "Content-Encoding" not in response.headers
                plain = Scrape((await response.read()).decode())
    assert zipped.queues() == plain.queues() == {f"queue-{i}" for i in range(20)}


async def test_wrong_credentials_get_401_with_a_challenge_and_nothing_is_read(monkeypatch):
    async def refuse(request):
        raise Unauthenticated("wrong token")

    monkeypatch.setattr(auth, "authenticate", refuse)
    async with serving() as server, aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{server.http_port}/metrics"
        async with http.get(url) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"] == auth.CHALLENGE
            assert response.content_type == "text/plain"
            body = await response.text()
    assert "wrong token" in body and "chute_" not in body


async def test_a_caller_sees_only_the_queues_and_topics_it_may_see(monkeypatch):
    class Limited(Principal, frozen=True):
        def can_see(self, kind, name):
            return name.startswith("team-a")

    async def as_team_a(request):
        return Limited(name="team-a")

    async with serving() as server, chute.AsyncClient(server.url) as client:
        for name in ("team-a-jobs", "team-b-jobs"):
            await client.create_queue(name)
            await client.create_topic(name.replace("jobs", "news"))
        monkeypatch.setattr(auth, "authenticate", as_team_a)
        result = await scrape(server)
    assert result.queues() == {"team-a-jobs"}
    topics = {dict(labels).get("topic") for _, labels in result.samples} - {None}
    assert topics == {"team-a-news"}
    assert result("chute_connections") == 1  # server-wide values are shown to every authenticated caller


def test_a_server_not_started_exports_only_its_health():
    server = Server(ServerConfig(data_dir="/nonexistent-never-created", port=0, http_port=0))
    collector = metrics.BrokerCollector(server)
    names = {family.name for family in collector.collect()}
    assert names == {"chute_build", "chute_healthy"}
    assert collector.tables() == []


async def test_a_thousand_queues_each_get_every_series_in_one_scrape():
    async with serving() as server:
        broker = server.server.broker
        names = [f"q{i:04d}" for i in range(1000)]
        for name in names:
            await broker.create_queue(name)
        await broker.publish("q0999", b"last")
        result = await scrape(server, **{"Accept-Encoding": "gzip"})
    assert result.queues() == set(names)
    per_queue = [column.name for column in metrics.QUEUE_COLUMNS if column.name != "chute_queue_dead_letter_messages"]
    for column in per_queue:
        assert sum(1 for name, _ in result.samples if name == column) == 1000, column
    assert result("chute_queue_messages_ready", queue="q0999") == 1
    assert result("chute_queues") == 1000


@pytest.mark.parametrize(
    ("header", "expected"),
    [("gzip", True), ("gzip, deflate", True), ("deflate, GZIP;q=0.5", True), ("*", True), ("gzip;q=0", False),
     ("identity", False), ("", False), ("gzip;q=zero", False)],
)  # fmt: skip
def test_accept_encoding_is_read_with_its_quality(header, expected):
    assert metrics.accepts_gzip(header) is expected
