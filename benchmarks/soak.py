"""A soak benchmark: a mixed, steady workload against a `chute serve` subprocess, sampled over time (issue 12).

    python -m benchmarks.soak                                  # 300,000 messages or 120 s, whichever ends first
    python -m benchmarks.soak --messages 20000000 --seconds 7200 --rate 5000 --png docs/soak.png

Needs matplotlib for the PNG (`pip install -e '.[bench]'`). `--help` lists the knobs of every lane.

All the lanes run at once, each publishing at its share of `--rate` (msg/s) from one producer connection, each
queue consumed by its own connection:
- `p2p`: one queue, acked;
- `nack`: a share of first deliveries are nacked with `delay_s`, acked when they come back;
- `topic`: a topic with three subscriptions (pattern `>`), each to its own queue, each consumed and acked;
- `dedup`: publishes with dedup ids, a share of them repeating a recent id (within the queue's window);
- `delayed`: publishes with a random `delay_s`;
- `ttl`: a queue with a retention (TTL) whose consumer keeps up with only part of it, so messages expire into its
  dead-letter queue, which is consumed and acked too;
- `slow`: a consumer that alternates phases at half and then twice the publish rate, so its backlog grows for a
  phase and then shrinks back to nothing in half the next one (a saw-tooth).

Every `--sample-s` it records the broker's RSS (VmRSS), the checkpoint file's size and the bytes of the data
directory, fsync latency and event-loop lag (per-interval quantiles from the bucket deltas of the histograms on
`/metrics`; the lag histogram only if the broker exports it), and the largest parts of a lag in the interval
spent on the CPU and waiting for a core (`chute_event_loop_lag_on_cpu_seconds`, `..._waiting_seconds`;
docs/metrics.md: a lag mostly waiting was the machine, not the broker's code). Also the messages published and
acked so far, rates and the backlog. It writes the samples (CSV), a summary (JSON) and a PNG, and prints the
summary with the targets: after warm-up RSS stays within ±10% of its median; disk stays within the backlog plus a
few segments.

Invariants: the broker started here is always stopped (SIGTERM, then SIGKILL) and its data directory deleted,
whatever happens; every loop ends by the message count or the deadline (the run is cut at `--seconds` plus a
bounded grace period); nothing here asserts speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from benchmarks import soak_report as report
from chute.bench import BenchError, BrokerProcess
from chute.client import AsyncClient
from chute.errors import ChuteError

# share of the publish rate per lane (sums to 1)
LANES = {"p2p": 0.30, "nack": 0.10, "topic": 0.15, "dedup": 0.10, "delayed": 0.10, "ttl": 0.10, "slow": 0.15}
SUBSCRIPTIONS = 3
SEGMENT_BYTES = 64 * 2**20  # FileStore's segment_max_bytes; `chute serve` has no setting for it
# The files a checkpoint does not yet cover stay: a checkpoint comes every 256 MiB of log (4 segments) or 60 s,
# plus the active segment. Beyond that, disk should hold only the backlog.
FEW_SEGMENTS = 5
RSS_SPREAD_TARGET = 0.10
TICK_S = 0.01  # the producer's pacing step: it sends whatever is due, never one sleep per message
MAX_CATCH_UP_S = 0.5  # a producer held back (window full) catches up at most this much of its schedule
ACK_INTERVAL_S = 0.02  # consumers ack (and nack) what they hold at this pace, one request at a time
# A paced consumer's prefetch: credit comes back once per ack round (ACK_INTERVAL_S plus an fsync, ~50 ms on a
# loaded machine), so 200 lets it take ~4,000 msg/s, well above its pace (50 could not keep up with 1,200 msg/s).
# Leased messages do not expire, so the TTL lane's expiries come from what waits in the queue, not from this.
PACED_PREFETCH = 200
STOP_GRACE_S = 30.0  # after the deadline: the last confirms, acks and the consumers' close
COLUMNS = ["t_s", "published", "acked", "publish_rate", "ack_rate", "backlog", "backlog_bytes", "slow_backlog",
           "rss_mb", "broker_cpu_pct", "disk_bytes", "log_bytes", "checkpoint_bytes", "checkpoints", "segments",
           "fsyncs", "fsync_p50_ms", "fsync_p99_ms", "fsync_max_ms", "loop_lag_p99_ms", "loop_lag_max_ms",
           "loop_lag_on_cpu_max_ms", "loop_lag_waiting_max_ms", "errors"]  # fmt: skip


@dataclass
class Options:
    messages: int = 300_000
    seconds: float = 120.0
    rate: float = 2500.0  # msg/s published, over all lanes
    size: int = 256
    sample_s: float = 1.0
    warmup_fraction: float = 0.2
    fsync: str = "always"
    nack_share: float = 0.2
    nack_delay_s: float = 1.0
    dedup_repeat_share: float = 0.1
    dedup_window_s: float = 60.0
    max_delay_s: float = 5.0
    ttl_s: float = 2.0
    ttl_consume_share: float = 0.5
    slow_phase_s: float = 15.0
    window: int = 20_000  # most unconfirmed publishes
    prefetch: int = 1000
    data_parent: str | None = None  # where the temporary data directory goes (None: the system's temp dir)
    out_dir: str = "benchmarks/results"
    png: str | None = None  # None: <out_dir>/soak-<stamp>.png
    progress_s: float = 10.0
    broker_log: str | None = None  # the broker's stderr is appended here too (with CHUTE_HOLD_REPORT_MS: its holds)


@dataclass
class Counters:
    sent: int = 0
    published: int = 0  # confirmed
    acked: int = 0  # confirmed
    nacked: int = 0
    dedup_repeats: int = 0
    errors: int = 0
    first_error: str = ""

    def error(self, exc: BaseException) -> None:
        self.errors += 1
        self.first_error = self.first_error or f"{type(exc).__name__}: {exc}"


# -- the broker ------------------------------------------------------------------------------------------------


@dataclass
class SoakBroker(BrokerProcess):
    """`chute serve` as `chute.bench.BrokerProcess` starts it, with its HTTP port on (for `/metrics`)."""

    http: bool = True
    prefix: str = "chute-soak-"


# -- what is sampled -------------------------------------------------------------------------------------------


@dataclass
class Scrape:
    """What one `/metrics` scrape gives the soak: gauges, per-queue sums and cumulative histogram buckets."""

    gauges: dict[str, float] = field(default_factory=dict)
    queues: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> queue -> value
    histograms: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # name -> [(le, count)]


def parse_metrics(text: str) -> Scrape:
    scrape = Scrape()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                buckets = scrape.histograms.setdefault(family.name, [])
                buckets.append((float(sample.labels["le"]), sample.value))
            elif "queue" in sample.labels:
                scrape.queues.setdefault(sample.name, {})[sample.labels["queue"]] = sample.value
            elif not sample.labels:
                scrape.gauges[sample.name] = sample.value
    for buckets in scrape.histograms.values():
        buckets.sort()
    return scrape


def bucket_deltas(now: list[tuple[float, float]], before: list[tuple[float, float]] | None) -> list[tuple]:
    """Cumulative buckets of what was observed between two scrapes."""
    if not before:
        return now
    previous = dict(before)
    return [(le, count - previous.get(le, 0.0)) for le, count in now]


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The q-quantile of cumulative buckets, interpolated linearly inside its bucket (as Prometheus's
    histogram_quantile); None when nothing was observed. In the +Inf bucket: the largest finite bound."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank and count > below:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = (le if not math.isinf(le) else lower), count
    return lower


def highest_bucket(buckets: list[tuple[float, float]]) -> float | None:
    """Upper bound of the highest bucket that gained an observation (the largest finite bound for +Inf)."""
    finite = [le for le, _ in buckets if not math.isinf(le)]
    below = 0.0
    top = None
    for le, count in buckets:
        if count > below:
            top = le if not math.isinf(le) else finite[-1]
        below = count
    return top


def disk_usage(directory: str) -> tuple[int, int]:
    """(bytes of every file under `directory`, bytes of its checkpoint file), files vanishing meanwhile skipped."""
    total = checkpoint = 0
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                size = os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                continue
            total += size
            if name == "checkpoint" and root == directory:
                checkpoint = size
    return total, checkpoint


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def fetch_or_none(url: str) -> str | None:
    """`fetch`, or None if the broker did not answer within its timeout (or at all)."""
    try:
        return fetch(url)
    except OSError:  # URLError and socket timeouts are OSErrors
        return None


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


class Sampler:
    """One row of COLUMNS every `sample_s`, from /proc, the data directory, `/metrics` and the counters."""

    def __init__(self, broker: SoakBroker, counters: Counters) -> None:
        self.broker = broker
        self.counters = counters
        self.rows: list[dict] = []
        self.start = time.monotonic()
        self._last: tuple[float, int, int, float] = (self.start, 0, 0, broker.cpu_seconds())
        self._histograms: dict[str, list] = {}
        self.last: Scrape | None = None
        self.scrape_failures = 0
        self._last_text = ""

    async def sample(self) -> dict:
        if not self.broker.alive():
            raise BenchError(f"the broker exited during the soak: {self.broker.last_words()}")
        now, c = time.monotonic(), self.counters
        rss, cpu = self.broker.rss_mb(), self.broker.cpu_seconds()
        (disk, checkpoint), text = await asyncio.gather(
            asyncio.to_thread(disk_usage, self.broker.data_dir),
            asyncio.to_thread(fetch_or_none, self.broker.http_url + "/metrics"),
        )
        if text is None:  # a scrape that took over 10 s is a finding, not the end of the run: counted, reported
            self.scrape_failures += 1
            text = self._last_text
        self._last_text = text
        scrape = self.last = parse_metrics(text)
        then, published, acked, cpu_then = self._last
        dt = max(now - then, 1e-9)
        self._last = (now, c.published, c.acked, cpu)
        depth = [scrape.queues.get(f"chute_queue_messages_{k}", {}) for k in ("ready", "in_flight", "delayed")]
        fsync = self._interval("chute_fsync_duration_seconds", scrape)
        lag = self._interval("chute_event_loop_lag_seconds", scrape)
        on_cpu = self._interval("chute_event_loop_lag_on_cpu_seconds", scrape)
        waiting = self._interval("chute_event_loop_lag_waiting_seconds", scrape)
        row = {
            "t_s": round(now - self.start, 3), "published": c.published, "acked": c.acked,
            "publish_rate": (c.published - published) / dt, "ack_rate": (c.acked - acked) / dt,
            "backlog": int(sum(sum(d.values()) for d in depth)),
            "backlog_bytes": int(sum(scrape.queues.get("chute_queue_messages_bytes", {}).values())),
            "slow_backlog": int(sum(d.get("soak-slow", 0) for d in depth)),
            "rss_mb": rss, "broker_cpu_pct": (cpu - cpu_then) / dt * 100, "disk_bytes": disk,
            "log_bytes": int(scrape.gauges.get("chute_log_bytes", 0)), "checkpoint_bytes": checkpoint,
            "checkpoints": scrape.gauges.get("chute_checkpoints_total"),  # None from a broker without it
            "segments": int(scrape.gauges.get("chute_log_segments", 0)),
            "fsyncs": int(fsync[-1][1]) if fsync else 0,
            "fsync_p50_ms": ms(quantile(fsync, 0.5)), "fsync_p99_ms": ms(quantile(fsync, 0.99)),
            "fsync_max_ms": ms(highest_bucket(fsync)),
            "loop_lag_p99_ms": ms(quantile(lag, 0.99)), "loop_lag_max_ms": ms(highest_bucket(lag)),
            "loop_lag_on_cpu_max_ms": ms(highest_bucket(on_cpu)),
            "loop_lag_waiting_max_ms": ms(highest_bucket(waiting)),
            "errors": c.errors,
        }  # fmt: skip
        self.rows.append(row)
        return row

    def _interval(self, name: str, scrape: Scrape) -> list[tuple[float, float]]:
        buckets = scrape.histograms.get(name)
        if buckets is None:
            return []
        deltas = bucket_deltas(buckets, self._histograms.get(name))
        self._histograms[name] = buckets
        return deltas

    def queue_totals(self) -> dict[str, dict[str, int]]:
        """Per queue, the broker's own counters at the last sample (published, acked, nacked, dead-lettered)."""
        kinds = ("published", "acked", "nacked", "dead_lettered")
        series = {kind: self.last.queues.get(f"chute_queue_messages_{kind}_total", {}) for kind in kinds}
        names = sorted({queue for values in series.values() for queue in values})
        return {queue: {kind: int(series[kind].get(queue, 0)) for kind in kinds} for queue in names}

    @property
    def lag_exported(self) -> bool:
        return "chute_event_loop_lag_seconds" in self._histograms


# -- the workload ----------------------------------------------------------------------------------------------


class Pacer:
    """Lets through at most `rate_at(t)` events per second (t: seconds since start), in bursts of `burst`."""

    def __init__(self, rate_at: Callable[[float], float], burst: float) -> None:
        self.rate_at = rate_at
        self.burst = burst
        self.start = self.last = time.monotonic()
        self.tokens = 0.0

    async def take(self) -> None:
        while True:
            now = time.monotonic()
            rate = self.rate_at(now - self.start)
            self.tokens = min(self.burst, self.tokens + rate * (now - self.last))
            self.last = now
            if self.tokens >= 1:
                self.tokens -= 1
                return
            await asyncio.sleep(max(0.005, (1 - self.tokens) / max(rate, 1e-3)))


def slow_rate(o: Options) -> Callable[[float], float]:
    """The slow consumer's pace: half the lane's publish rate, then twice it, `slow_phase_s` each. Twice, not one
    and a half: a pace that drains exactly what the slow phase left would leave whatever it fell short of (a busy
    machine, ack round trips) every cycle, and the backlog would creep up instead of going back to nothing."""
    publish = o.rate * LANES["slow"]
    return lambda t: publish * (0.5 if int(t / o.slow_phase_s) % 2 == 0 else 2.0)


async def create_layout(admin: AsyncClient, o: Options) -> list[str]:
    """Create the queues, the topic and its subscriptions; return the queues to consume."""
    for name in ("soak-p2p", "soak-nack", "soak-delayed", "soak-slow", "soak-ttl-dlq"):
        await admin.create_queue(name, lease_s=60)
    await admin.create_queue("soak-dedup", lease_s=60, dedup_window_s=o.dedup_window_s)
    await admin.create_queue("soak-ttl", lease_s=60, retention_s=o.ttl_s, dead_letter_queue="soak-ttl-dlq")
    await admin.create_topic("soak-topic")
    subscribed = [f"soak-sub-{i}" for i in range(SUBSCRIPTIONS)]
    for name in subscribed:
        await admin.create_queue(name, lease_s=60)
        await admin.subscribe("soak-topic", ">", name)
    return ["soak-p2p", "soak-nack", *subscribed, "soak-dedup", "soak-delayed", "soak-ttl", "soak-ttl-dlq",
            "soak-slow"]  # fmt: skip


class Producer:
    """Publishes every lane's share of `rate` from one connection, at most `window` unconfirmed."""

    def __init__(self, client: AsyncClient, o: Options, counters: Counters, rng: random.Random) -> None:
        self.client, self.o, self.counters, self.rng = client, o, counters, rng
        self.body = b"x" * o.size
        self.recent_ids: list[str] = []
        self._room = asyncio.Event()

    async def run(self, deadline: float) -> None:
        o, c = self.o, self.counters
        credit = dict.fromkeys(LANES, 0.0)
        last = time.monotonic()
        while c.sent < o.messages and last < deadline:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            for lane, share in LANES.items():
                rate = o.rate * share
                credit[lane] = min(rate * MAX_CATCH_UP_S, credit[lane] + rate * (now - last))
                due = min(int(credit[lane]), o.messages - c.sent)
                credit[lane] -= due
                for _ in range(due):
                    self.publish(lane)
            last = now
            while c.sent - c.published - c.errors > o.window and time.monotonic() < deadline:
                self._room.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), timeout=1.0)
        await asyncio.wait_for(self.client.flush(), timeout=max(1.0, deadline + STOP_GRACE_S - time.monotonic()))

    def publish(self, lane: str) -> None:
        options: dict = {}
        dest = f"soak-{lane}"  # the topic lane publishes to the topic soak-topic, the others to their queue
        if lane == "dedup":
            options["dedup_id"] = self.dedup_id()
        elif lane == "delayed":
            options["delay_s"] = self.rng.uniform(0.5, self.o.max_delay_s)
        self.counters.sent += 1
        self.client.publish_nowait(dest, self.body, **options).add_done_callback(self._confirmed)

    def dedup_id(self) -> str:
        recent = self.recent_ids
        if recent and self.rng.random() < self.o.dedup_repeat_share:
            self.counters.dedup_repeats += 1
            return self.rng.choice(recent)
        fresh = f"d{self.counters.sent}"
        if len(recent) < 1000:
            recent.append(fresh)
        else:
            recent[self.counters.sent % 1000] = fresh
        return fresh

    def _confirmed(self, future: asyncio.Future) -> None:
        if future.cancelled():
            self.counters.error(ChuteError("publish cancelled"))
        elif future.exception() is not None:
            self.counters.error(future.exception())
        else:
            self.counters.published += 1
        self._room.set()


class Consumer:
    """Consumes one queue (optionally paced), acks in batches every ACK_INTERVAL_S; on the nack lane, nacks a
    share of first deliveries with a delay."""

    def __init__(self, client: AsyncClient, queue: str, o: Options, counters: Counters, rng: random.Random,
                 pacer: Pacer | None = None) -> None:  # fmt: skip
        self.client, self.queue, self.o, self.counters, self.rng, self.pacer = client, queue, o, counters, rng, pacer
        self.nack_share = o.nack_share if queue == "soak-nack" else 0.0
        self.acks: list = []
        self.nacks: list = []

    async def run(self, stop: asyncio.Event) -> None:
        consumer = await self.client.consume(self.queue, prefetch=PACED_PREFETCH if self.pacer else self.o.prefetch)
        settling = asyncio.get_running_loop().create_task(self._settle_until(stop))
        try:
            while not stop.is_set():
                delivery = await consumer.get(timeout=0.1)
                if delivery is None:
                    continue
                if delivery.delivery_count == 1 and self.rng.random() < self.nack_share:
                    self.nacks.append(delivery)
                else:
                    self.acks.append(delivery)
                if self.pacer is not None:
                    await self.pacer.take()
        finally:
            await settling
            await consumer.close()

    async def _settle_until(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(ACK_INTERVAL_S)
            await self._settle()
        await self._settle()

    async def _settle(self) -> None:
        acks, self.acks, nacks, self.nacks = self.acks, [], self.nacks, []
        try:
            if acks:
                await self.client.ack(acks)
                self.counters.acked += len(acks)
            if nacks:
                await self.client.nack(nacks, delay_s=self.o.nack_delay_s)
                self.counters.nacked += len(nacks)
        except ChuteError as exc:
            self.counters.error(exc)


async def soak(o: Options, broker: SoakBroker, say: Callable[[str], None]) -> tuple[Sampler, Counters, float]:
    """Run the workload against `broker` until `o.messages` are sent or `o.seconds` pass; return the sampler,
    the counters and the elapsed seconds."""
    counters, rng = Counters(), random.Random(12)
    producer = AsyncClient(broker.url, timeout=60, reconnect=False, name="soak-producer")
    clients = [producer]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        await producer.connect()
        queues = await create_layout(producer, o)
        clients += [AsyncClient(broker.url, timeout=60, reconnect=False, name=f"soak-{queue}") for queue in queues]
        await asyncio.gather(*(client.connect() for client in clients[1:]))
        pacers = {"soak-slow": Pacer(slow_rate(o), burst=50),
                  "soak-ttl": Pacer(lambda t: o.rate * LANES["ttl"] * o.ttl_consume_share, burst=50)}  # fmt: skip
        consumers = [loop.create_task(Consumer(client, queue, o, counters, rng, pacers.get(queue)).run(stop))
                     for client, queue in zip(clients[1:], queues, strict=True)]  # fmt: skip
        sampler = Sampler(broker, counters)
        await sampler.sample()
        start = time.monotonic()
        deadline = start + o.seconds
        producing = loop.create_task(Producer(producer, o, counters, rng).run(deadline))
        try:
            await sample_until(sampler, o, producing, say)
        finally:
            stop.set()
            producing.cancel()
            await asyncio.wait_for(asyncio.gather(*consumers, return_exceptions=True), timeout=STOP_GRACE_S)
        elapsed = time.monotonic() - start
        await sampler.sample()
        return sampler, counters, elapsed
    finally:
        await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)


async def sample_until(sampler: Sampler, o: Options, producing: asyncio.Task, say: Callable[[str], None]) -> None:
    """Sample every `sample_s` while the producer runs; report progress every `progress_s`."""
    next_sample = next_progress = time.monotonic()
    while not producing.done():
        next_sample += o.sample_s
        await asyncio.wait({producing}, timeout=max(0.0, next_sample - time.monotonic()))
        if producing.done():
            break
        row = await sampler.sample()
        if time.monotonic() >= next_progress:
            next_progress += o.progress_s
            say(
                f"t={row['t_s']:.0f}s published {row['published']:,} acked {row['acked']:,} "
                f"backlog {row['backlog']:,} RSS {row['rss_mb']:.1f} MB disk {row['disk_bytes'] / 2**20:.1f} MiB"
            )
    producing.result()  # raises what stopped the producer


# -- the command -----------------------------------------------------------------------------------------------


def run(o: Options, say: Callable[[str], None] = print) -> dict:
    """Start a broker, soak it, stop it; write the CSV, JSON and PNG; return the report (also in the JSON)."""
    broker = SoakBroker(fsync=o.fsync, parent=o.data_parent, log_path=o.broker_log).start()
    say(f"broker pid {broker.pid} at {broker.url}, data in {broker.data_dir}, fsync {o.fsync}")
    version = source_version()
    say(f"chute at {version['commit']}" + (" with uncommitted changes" if version["uncommitted_changes"] else ""))
    try:
        sampler, counters, elapsed = run_loop(soak(o, broker, say))
        lag_exported = sampler.lag_exported
    finally:
        code = broker.stop()
    if code not in (0, None):
        say(f"warning: the broker exited with status {code}")
    summary = report.summarize(sampler.rows, asdict(counters), elapsed, o.warmup_fraction, SEGMENT_BYTES,
                               FEW_SEGMENTS, RSS_SPREAD_TARGET, lag_exported)  # fmt: skip
    exact = sampler.last.gauges.get("chute_event_loop_lag_max_seconds") if sampler.last else None
    summary["loop_lag_max_since_start_ms"] = ms(exact)
    summary["scrape_failures"] = sampler.scrape_failures
    if sampler.scrape_failures:
        say(f"warning: {sampler.scrape_failures} scrape(s) of /metrics got no answer within 10 s")
    machine = {**report.machine(), **version}
    result = {"options": asdict(o), "machine": machine, "counters": asdict(counters), "summary": summary,
              "queues": sampler.queue_totals()}  # fmt: skip
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(o.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / f"soak-{stamp}.csv", "json": out / f"soak-{stamp}.json",
             "png": Path(o.png) if o.png else out / f"soak-{stamp}.png"}  # fmt: skip
    result["files"] = {kind: str(path) for kind, path in paths.items()}
    report.write_csv(paths["csv"], sampler.rows, COLUMNS)
    report.write_json(paths["json"], result)
    cpu = result["machine"]
    title = (
        f"Chute soak: {counters.published:,} messages in {elapsed:.0f} s at {o.rate:g} msg/s, fsync {o.fsync} "
        f"({cpu['nproc']} cores, {cpu['cpu'] or 'unknown CPU'})"
    )
    paths["png"].parent.mkdir(parents=True, exist_ok=True)
    report.draw(paths["png"], sampler.rows, summary, title, SEGMENT_BYTES)
    for line in report.describe(summary, asdict(counters), result["queues"], FEW_SEGMENTS, RSS_SPREAD_TARGET):
        say(line)
    say("wrote " + ", ".join(str(path) for path in paths.values()))
    return result


def source_version() -> dict:
    """The commit of the chute package the broker ran, and whether its source had uncommitted changes."""
    import chute

    source = Path(chute.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=source, capture_output=True,
                                text=True, timeout=10).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=source, capture_output=True,
                               text=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "uncommitted_changes": None}
    return {"commit": commit or None, "uncommitted_changes": bool(dirty) if commit else None}


def run_loop(coro):
    """Run `coro` on a fresh loop (uvloop when installed, as `chute serve` and the client's users would)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def parse_args(argv: list[str] | None) -> Options:
    d = Options()
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--messages", type=int, default=d.messages, help="stop after publishing this many (default %(default)s)")
    add("--seconds", type=float, default=d.seconds, help="stop after this long (default %(default)s)")
    add("--rate", type=float, default=d.rate, help="msg/s published over all lanes (default %(default)s)")
    add("--size", type=int, default=d.size, help="body bytes (default %(default)s)")
    add("--sample-s", type=float, default=d.sample_s, help="sampling period (default %(default)s)")
    add("--warmup-fraction", type=float, default=d.warmup_fraction, help="share of the run left out of the RSS "
        "and disk targets (default %(default)s)")  # fmt: skip
    add("--fsync", choices=["always", "interval", "never"], default=d.fsync)
    add("--nack-share", type=float, default=d.nack_share)
    add("--nack-delay-s", type=float, default=d.nack_delay_s)
    add("--dedup-repeat-share", type=float, default=d.dedup_repeat_share)
    add("--dedup-window-s", type=float, default=d.dedup_window_s)
    add("--max-delay-s", type=float, default=d.max_delay_s)
    add("--ttl-s", type=float, default=d.ttl_s)
    add("--ttl-consume-share", type=float, default=d.ttl_consume_share)
    add("--slow-phase-s", type=float, default=d.slow_phase_s, help="length of each phase of the slow consumer")
    add("--window", type=int, default=d.window, help="most unconfirmed publishes (default %(default)s)")
    add("--data-parent", default=d.data_parent, help="directory for the temporary data directory")
    add("--out-dir", default=d.out_dir, help="CSV, JSON (and PNG) go here (default %(default)s)")
    add("--png", default=d.png, help="where the PNG goes (default: in --out-dir)")
    add("--progress-s", type=float, default=d.progress_s, help="progress line period (default %(default)s)")
    add("--broker-log", default=d.broker_log, help="append the broker's log to this file (with "
        "CHUTE_HOLD_REPORT_MS set, what held its loop)")  # fmt: skip
    args = p.parse_args(argv)
    if args.messages < 1 or args.seconds <= 0 or args.rate <= 0 or args.sample_s <= 0 or args.slow_phase_s <= 0:
        p.error("--messages, --seconds, --rate, --sample-s and --slow-phase-s must be positive")
    return Options(**vars(args))


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    try:
        result = run(options, say=lambda text: print(text, flush=True))
    except (BenchError, ChuteError, OSError) as exc:
        print(f"soak failed: {exc}", file=sys.stderr)
        return 1
    return 1 if result["counters"]["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
