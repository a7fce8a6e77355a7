"""GET /metrics: the broker's state in the Prometheus text format (names and meanings in docs/metrics.md).

Each `Server` has its own `CollectorRegistry` (never prometheus_client's global one: a process may run many
servers, tests do) holding `BrokerCollector`, which reads the broker, the sessions and the store when scraped,
and prometheus_client's `ProcessCollector` (resident memory, CPU, open files; from Linux's /proc).

Per-queue and per-topic series are gathered as a `Table` (one row per queue: its label and one value per
column) that renders itself in two ways from one definition: as prometheus_client metric families (what the
registry yields, e.g. to `generate_latest(registry)`), and straight to exposition text, which is what GET /metrics
sends: with 10,000 queues prometheus_client's generic renderer takes over ten times longer for the same bytes
(a test checks that both give the same series). Server-wide families are few and go through prometheus_client.

Invariants:
- nothing is counted between scrapes: an idle broker pays nothing, and every value is read at scrape time in
  one pass over the queues (the counters themselves live in the core, the sessions and the store), done for
  GET /metrics in slices of SCRAPE_SLICE_QUEUES queues with a turn of the event loop between them (each row is
  one queue's values at one instant; the rows of 10,000 queues span a few turns);
- broker state is read only on the event loop (it is not thread-safe); the snapshot (plain values) is then
  rendered, and gzipped when asked, in a worker thread, where the process collector reads /proc too (its reads
  and directory listing are system calls that never run on the loop);
- per-queue series exist only for durable queues that exist: a deleted queue disappears from the next scrape;
  ephemeral queues (the private queues of live push subscriptions) are only counted (see docs/metrics.md);
- the caller is authenticated before anything is read; a non-superuser sees only the queues and topics it
  may see (`Principal.can_see`); server-wide values are shown to every authenticated caller.
"""

from __future__ import annotations

import asyncio
import gzip
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from operator import attrgetter
from typing import TYPE_CHECKING, NamedTuple

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from chute.errors import Unauthenticated
from chute.server import auth
from chute.server.looplag import LoopLagMonitor
from chute.storage.api import FSYNC_BUCKETS_S

if TYPE_CHECKING:
    from chute.model import QueueStats
    from chute.server.app import Server

SCRAPE_SLICE_QUEUES = 1000  # queues read per turn of the event loop while answering GET /metrics (~3 ms)
GZIP_MIN_BYTES = 4096  # smaller bodies are sent as they are: compressing them saves less than it costs
GZIP_LEVEL = 1  # the text is very repetitive: level 1 already shrinks it ~20x, at a fraction of level 6's CPU
REGISTRY_KEY = web.AppKey("metrics_registry", CollectorRegistry)  # the server's registry, for embedders and tests

Filter = Callable[[str], bool]


class Column(NamedTuple):
    """One family of a `Table`: its exposition name (counters end in `_total`), type and HELP text; `source` is
    the `QueueStats` field it shows, for the per-queue columns read from there."""

    name: str
    type: str  # "gauge" or "counter"
    help: str
    source: str = ""


QUEUE_STATS_COLUMNS = (
    Column("chute_queue_messages_ready", "gauge", "Messages ready to be delivered now (FIFO messages waiting "
           "behind their group's head included).", "ready"),
    Column("chute_queue_messages_in_flight", "gauge", "Messages delivered and leased, not yet acked.", "in_flight"),
    Column("chute_queue_messages_delayed", "gauge", "Messages not ready before a delay (publish or nack delay).",
           "delayed"),
    Column("chute_queue_messages_bytes", "gauge", "Body bytes of the queue's messages (ready, delayed and in "
           "flight).", "bytes"),
    Column("chute_queue_oldest_message_age_seconds", "gauge", "Age of the oldest ready message (since it was "
           "published); 0 when none is ready.", "oldest_age_s"),
    Column("chute_queue_messages_published_total", "counter", "Messages published to the queue or routed to it "
           "from a topic (messages dead-lettered into it are not counted here).", "published"),
    Column("chute_queue_messages_delivered_total", "counter", "Deliveries from the queue, redeliveries included.",
           "delivered"),
    Column("chute_queue_messages_acked_total", "counter", "Deliveries acked.", "acked"),
    Column("chute_queue_messages_nacked_total", "counter", "Deliveries given back by a nack.", "nacked"),
    Column("chute_queue_messages_redelivered_total", "counter", "Deliveries of a message delivered before.",
           "redelivered"),
    Column("chute_queue_messages_dead_lettered_total", "counter", "Messages the queue sent to its dead-letter "
           "queue (or dropped, without one): too many deliveries, expired, rejected or pushed out by overflow.",
           "dead_lettered"),
)  # fmt: skip
_stats_values = attrgetter(*(column.source for column in QUEUE_STATS_COLUMNS))

QUEUE_COLUMNS = (
    *QUEUE_STATS_COLUMNS,
    Column("chute_queue_consumers", "gauge", "Push consumers on the queue (native connections)."),
    Column("chute_queue_dead_letter_messages", "gauge", "Messages ready in the queue's dead-letter queue (that "
           "queue's own chute_queue_messages_ready, shown for every queue that names it). Only for queues with "
           "a dead-letter queue."),
)  # fmt: skip

TOPIC_COLUMNS = (
    Column("chute_topic_subscriptions", "gauge", "Subscriptions of the topic (ephemeral ones included)."),
    Column("chute_topic_retained_bytes", "gauge", "Body bytes the topic retains for new subscriptions."),
)


class Table:
    """Series of one label: `rows[i]` is (label value, one value per column); a None value is no sample."""

    def __init__(self, label: str, columns: Sequence[Column], rows: list[tuple]) -> None:
        self.label = label
        self.columns = columns
        self.rows = rows

    def families(self) -> Iterator[Metric]:
        """As prometheus_client metric families (counter names lose `_total` there; it comes back in the text)."""
        for i, column in enumerate(self.columns, 1):
            kind = CounterMetricFamily if column.type == "counter" else GaugeMetricFamily
            family = kind(column.name, column.help, labels=[self.label])
            for row in self.rows:
                if row[i] is not None:
                    family.add_metric([row[0]], row[i])
            yield family

    def render(self) -> str:
        """Straight to the text format: the same lines prometheus_client writes, without a Sample per value."""
        label = self.label
        prefixes = [f'{{{label}="{_escape_label(row[0])}"}} ' for row in self.rows]
        out: list[str] = []
        for i, (name, kind, text, _) in enumerate(self.columns, 1):
            out.append(f"# HELP {name} {_escape_help(text)}\n# TYPE {name} {kind}\n")
            out.extend(f"{name}{prefix}{_number(row[i])}\n" for prefix, row in zip(prefixes, self.rows, strict=True)
                       if row[i] is not None)  # fmt: skip
        return "".join(out)


def _escape_label(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    return str(value) if type(value) is int else floatToGoString(value)


class BrokerCollector(Collector):
    """Reads a `Server` (its broker, sessions and store) at scrape time, on the event loop."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def describe(self) -> list[Metric]:
        return []  # nothing to check at registration; and registering must not read a broker still recovering

    def collect(self) -> Iterator[Metric]:
        """Every family, for a registry (GET /metrics uses `server_families` and `tables` directly)."""
        yield from self.server_families()
        for table in self.tables():
            yield from table.families()

    def readable(self) -> bool:
        """False while recovering (the core and the store are rebuilt in a thread) or before start."""
        return self.server.state in ("serving", "stopping")

    def server_families(self) -> Iterator[Metric]:
        """The server-wide families: health, connections, consumers, queue counts, the store."""
        server = self.server
        yield InfoMetricFamily("chute_build", "Version of the Chute server.", value={"version": server.name})
        healthy = server.state == "serving" and server.broker.healthy
        yield _gauge("chute_healthy", "1 while serving with a writable store (as /healthz), else 0.", int(healthy))
        node = getattr(server.broker, "node", None)
        if node is not None:  # a cluster node (`--store`): its view of the cluster, even while starting
            yield from _cluster(node)
            relays = getattr(server.broker, "relays", None)
            if relays is not None:
                yield _gauge("chute_cluster_relay_backlog", "Messages waiting in the relay queues of this node's "
                             "shards for queues of other shards (fan-out and dead letters not forwarded yet).",
                             sum(relays.lag().values()))  # fmt: skip
        if not self.readable():
            return
        yield from _loop_lag(server.loop_lag)
        yield _gauge("chute_connections", "Open native-protocol connections.", len(server.sessions))
        amqp = list(server.amqp.sessions) if getattr(server, "amqp", None) is not None else []
        yield _gauge("chute_amqp_connections", "Open AMQP 0-9-1 connections (docs/amqp.md).", len(amqp))
        yield _gauge("chute_amqp_channels", "Open AMQP 0-9-1 channels.", sum(len(s.channels) for s in amqp))
        yield _gauge("chute_amqp_consumers", "AMQP 0-9-1 consumers (basic.consume).",
                     sum(len(s.consumer_list()) for s in amqp))  # fmt: skip
        consumers = sum(len(session.consumers) for session in server.sessions)
        yield _gauge("chute_consumers", "Push consumers on native connections (on every queue, ephemeral "
                     "ones included).", consumers)  # fmt: skip
        yield _gauge("chute_unconfirmed_publish_bytes", "Bytes of publishes received and not yet confirmed "
                     "(held against the memory high-water mark).", server.publish_bytes)  # fmt: skip
        yield _counter("chute_memory_high_water_pauses", "Times publishers were paused at the memory "
                       "high-water mark.", server.backpressure_pauses)  # fmt: skip
        queues = server.broker.core.queues.values()
        ephemeral = [q for q in queues if q.ephemeral]
        yield _gauge("chute_queues", "Durable queues.", len(queues) - len(ephemeral))
        yield _gauge("chute_ephemeral_queues", "Ephemeral queues (private queues of live push subscriptions).",
                     len(ephemeral))  # fmt: skip
        yield _gauge("chute_ephemeral_queue_messages_ready", "Messages ready in ephemeral queues, in all.",
                     sum(q.ready for q in ephemeral))  # fmt: skip
        yield _gauge("chute_topics", "Topics (each with its subscriptions).", len(server.broker.core.topics))
        yield from self._store()

    def _store(self) -> Iterator[Metric]:
        store = self.server.broker.store
        stats = store.stats()
        yield _gauge("chute_log_bytes", "Bytes of the log's segment files on disk (0 for the memory store).",
                     stats.bytes_on_disk)  # fmt: skip
        yield _gauge("chute_log_segments", "Segment files of the log.", stats.segments)
        yield _gauge("chute_checkpoint_bytes", "Bytes of the stored checkpoint file.", stats.checkpoint_file_bytes)
        yield _counter("chute_checkpoints", "Checkpoints stored since the broker started (the one at a clean stop "
                       "aside).", self.server.broker.checkpoints)  # fmt: skip
        yield _counter("chute_log_written_bytes", "Bytes written to the log since the broker started.",
                       stats.bytes_written)  # fmt: skip
        yield _counter("chute_log_appends", "Appends to the log (each a batch of records) since the broker "
                       "started.", stats.appends)  # fmt: skip
        yield _gauge("chute_store_read_only", "1 after a write or fsync failure made the store read-only.",
                     int(store.read_only))  # fmt: skip
        yield _fsync_histogram(list(stats.fsync_buckets), stats.fsync_seconds_total)

    def tables(self, see_queue: Filter | None = None, see_topic: Filter | None = None) -> list[Table]:
        """The per-queue and per-topic series, limited to the names the filters accept (all without one)."""
        if not self.readable():
            return []
        return [self._queue_table(see_queue), self._topic_table(see_topic)]

    async def tables_in_slices(self, see_queue: Filter | None = None, see_topic: Filter | None = None) -> list[Table]:
        """As `tables`, reading SCRAPE_SLICE_QUEUES queues per turn of the event loop, so a scrape of many queues
        never holds it for the whole read. The rows are not one instant's: each queue's row is."""
        if not self.readable():
            return []
        names = self._queue_names(see_queue)
        stats: dict[str, QueueStats] = {}
        for start in range(0, len(names), SCRAPE_SLICE_QUEUES):
            if start:
                await asyncio.sleep(0)
                if not self.readable():
                    return []
            self._read_stats(names[start : start + SCRAPE_SLICE_QUEUES], stats)
        return [self._rows(stats), self._topic_table(see_topic)]

    def _queue_table(self, see: Filter | None) -> Table:
        stats: dict[str, QueueStats] = {}
        self._read_stats(self._queue_names(see), stats)
        return self._rows(stats)

    def _queue_names(self, see: Filter | None) -> list[str]:
        queues = self.server.broker.core.queues.values()
        return [q.name for q in queues if not q.ephemeral and (see is None or see(q.name))]

    def _read_stats(self, names: list[str], into: dict[str, QueueStats]) -> None:
        broker = self.server.broker
        for name in names:
            if name in broker.core.queues:  # (gone since the names were read: a slice ago)
                into[name] = broker.queue_stats(name)

    def _rows(self, stats: dict[str, QueueStats]) -> Table:
        server = self.server
        queues = server.broker.core.queues
        consumers = Counter(c.queue for session in server.sessions for c in session.consumers.values())
        if getattr(server, "amqp", None) is not None:
            consumers.update(server.amqp.consumers)  # AMQP consumers per queue
        rows = []  # in QUEUE_COLUMNS order: the QueueStats fields, then consumers and dead-letter depth
        for name, queue_stats in stats.items():
            queue = queues.get(name)
            dlq = stats.get(queue.settings.dead_letter_queue) if queue is not None else None  # None: no (visible) one
            rows.append((name, *_stats_values(queue_stats), consumers.get(name, 0),
                         dlq.ready if dlq is not None else None))  # fmt: skip
        return Table("queue", QUEUE_COLUMNS, rows)

    def _topic_table(self, see: Filter | None) -> Table:
        topics = [t for t in self.server.broker.core.topics.values() if see is None or see(t.name)]
        rows = [(t.name, len(t.subscriptions), t.retained_bytes) for t in topics]
        return Table("topic", TOPIC_COLUMNS, rows)


def _fsync_histogram(counts: list[int], seconds: float) -> Metric:
    """The histogram from a copy of the store's per-bucket counts (cumulative here, so `+Inf` is the count)."""
    buckets, total = [], 0
    for bound, count in zip([*map(str, FSYNC_BUCKETS_S), "+Inf"], counts, strict=True):
        total += count
        buckets.append((bound, total))
    return HistogramMetricFamily("chute_fsync_duration_seconds", "Time of each group-commit fsync of the log "
                                 "(its segment files and, for new files, the directory), measured in the "
                                 "store's writer thread.", buckets=buckets, sum_value=seconds)  # fmt: skip


def _cluster(node) -> Iterator[Metric]:
    """A cluster node's families (chute.cluster.node.ClusterNode): its own view, read without a database call."""
    status = node.status()
    nodes = status["nodes"]
    yield _gauge("chute_cluster_shards", "Shards of the cluster (fixed by its first node).", status["shards"])
    yield _gauge("chute_cluster_node_shards", "Shards this node serves now.", len(status["serving"]))
    yield _gauge("chute_cluster_shards_unowned", "Shards without a live owner, as this node last read the "
                 "database (a takeover or hand-over under way).", len(status["unowned"]))  # fmt: skip
    yield _gauge("chute_cluster_nodes", "Nodes registered in the cluster's database (dead ones included until "
                 "`chute cluster forget`).", len(nodes))  # fmt: skip
    yield _gauge("chute_cluster_nodes_alive", "Nodes whose heartbeat is younger than their lease.",
                 sum(1 for n in nodes if n["alive"]))  # fmt: skip
    yield _counter("chute_cluster_takeovers", "Shards this node opened (took over or claimed) since it started.",
                   status["takeovers"])  # fmt: skip
    yield _gauge("chute_cluster_database_reachable", "1 while this node's last heartbeat reached PostgreSQL, else 0.",
                 int(node.database_reachable))  # fmt: skip
    yield _gauge("chute_cluster_heartbeat_age_seconds", "Seconds since this node's last heartbeat the database "
                 "accepted (past the lease, the node serves nothing).",
                 node.heartbeat_age_s)  # fmt: skip
    yield _gauge("chute_cluster_node_healthy", "1 while this node runs, reaches the database, holds its lease "
                 "and its name, else 0.", int(status["healthy"]))  # fmt: skip


def _loop_lag(monitor: LoopLagMonitor) -> Iterator[Metric]:
    yield HistogramMetricFamily("chute_event_loop_lag_seconds", "How late the event loop ran a timer due every "
                                f"{monitor.interval_s:g} s: the stalls every client felt.",
                                buckets=monitor.cumulative(), sum_value=monitor.sum_s)  # fmt: skip
    yield _gauge("chute_event_loop_lag_max_seconds", "Largest event-loop lag measured since the server began serving.",
                 monitor.max_s)  # fmt: skip
    yield HistogramMetricFamily("chute_event_loop_lag_on_cpu_seconds", "The part of each event-loop lag its "
                                "thread spent on the CPU: the loop's own hold.", buckets=monitor.on_cpu.cumulative(),
                                sum_value=monitor.on_cpu.sum_s)  # fmt: skip
    yield _gauge("chute_event_loop_lag_on_cpu_max_seconds", "Largest on-CPU part of an event-loop lag since the "
                 "server began serving.", monitor.on_cpu.max_s)  # fmt: skip
    yield HistogramMetricFamily("chute_event_loop_lag_waiting_seconds", "The part of each event-loop lag its thread "
                                "was ready but waited for a core (other processes held them; Linux only). The rest "
                                "of a lag beyond this and the on-CPU part, it was blocked: on the GIL another "
                                "server thread held, or in the kernel.", buckets=monitor.waiting.cumulative(),
                                sum_value=monitor.waiting.sum_s)  # fmt: skip
    yield _gauge("chute_event_loop_lag_waiting_max_seconds", "Largest part of an event-loop lag spent waiting for a "
                 "core since the server began serving.", monitor.waiting.max_s)  # fmt: skip


def _gauge(name: str, text: str, value: float) -> Metric:
    return GaugeMetricFamily(name, text, value=value)


def _counter(name: str, text: str, value: float) -> Metric:
    return CounterMetricFamily(name, text, value=value)


class _Frozen(Collector):
    """Families already collected, for rendering away from the event loop."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


def make_registry(server: Server) -> tuple[CollectorRegistry, BrokerCollector, list[Collector]]:
    """A registry of its own for `server` with the broker collector and the others (the process collector),
    which are also returned separately."""
    registry = CollectorRegistry(auto_describe=False)
    collector = BrokerCollector(server)
    registry.register(collector)
    others: list[Collector] = [ProcessCollector(registry=registry)]
    return registry, collector, others


def render(families: list[Metric], tables: list[Table], gzip_ok: bool = False,
           others: Sequence[Collector] = ()) -> tuple[bytes, bool]:  # fmt: skip
    """The exposition text (gzipped if the client accepts it and it is worth it); runs in a worker thread. The
    `others` (the process collector: reads of /proc, system calls that may wait) are collected here, off the loop."""
    families = families + [family for other in others for family in other.collect()]
    body = generate_latest(_Frozen(families)) + "".join(table.render() for table in tables).encode()
    if gzip_ok and len(body) >= GZIP_MIN_BYTES:
        return gzip.compress(body, GZIP_LEVEL), True
    return body, False


def accepts_gzip(accept_encoding: str) -> bool:
    """True if an Accept-Encoding header allows gzip (`gzip` or `*`, not with q=0)."""
    for item in accept_encoding.lower().split(","):
        coding, _, params = item.partition(";")
        if coding.strip() in ("gzip", "x-gzip", "*"):
            params = params.strip()
            if not params.startswith("q="):
                return True
            try:
                return float(params[2:]) > 0
            except ValueError:
                return False
    return False


def add_routes(app: web.Application, server: Server) -> None:
    registry, collector, others = make_registry(server)
    app[REGISTRY_KEY] = registry

    async def metrics(request: web.Request) -> web.Response:
        try:
            principal = await auth.authenticate(request)
        except Unauthenticated as exc:
            return web.Response(status=401, text=f"{exc.message}\n", headers={"WWW-Authenticate": auth.CHALLENGE})
        if principal.superuser:
            tables = await collector.tables_in_slices()
        else:
            tables = await collector.tables_in_slices(lambda name: principal.can_see("queue", name),
                                                      lambda name: principal.can_see("topic", name))  # fmt: skip
        families = list(collector.server_families())
        gzip_ok = accepts_gzip(request.headers.get("Accept-Encoding", ""))
        body, gzipped = await asyncio.to_thread(render, families, tables, gzip_ok, others)
        headers = {"Content-Type": CONTENT_TYPE_LATEST, "Cache-Control": "no-store", "Vary": "Accept-Encoding"}
        if gzipped:
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, headers=headers)

    app.router.add_get("/metrics", metrics)
