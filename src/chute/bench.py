"""The workloads of `chute bench`: a broker measured over the network, from a separate client process.

    rows = run_bench(Options(workloads=["p2p", "latency"]), url=None)   # None: start a broker subprocess

Workloads (256-byte bodies unless told otherwise; every publish waits for its durable confirmation):

- `p2p`: one producer and one consumer connection on one queue. The producer keeps up to `window` publishes
  unconfirmed (`publish_nowait`, so the client batches them) and stays at most `max_lag` messages ahead of the
  consumer (a steady state with a shallow queue, not a growing backlog); the consumer (`consume`, prefetch) acks
  in batches with a few ack requests in flight. Reports end to end msg/s (first publish to last ack confirmed),
  then the publish-only confirm rate on a second queue nobody consumes, then the rate of draining that backlog.
- `latency`: publish at a fixed rate (a 1 ms pacing loop sends whatever is due, never one sleep per message);
  each body starts with its send time (`time.perf_counter`, same process as the consumer); the consumer records
  receive time - send time. Reports p50 / p99 / p99.9 / max in ms. During the measured window this process's own
  garbage collector leaves alone what existed before it (`collector_out_of_the_window`), and the producer holds
  only the publishes in flight: a full collection of the harness took 20-50 ms and showed as the broker's max.
- `fanout`: a topic with K subscriptions (pattern `>`), each to its own queue with its own consumer connection;
  reports deliveries/s = N * K / (first publish to last ack confirmed).
- `queues`: Q queues, publishes round-robin across them, one consumer per queue; reports msg/s. Then, only when
  this module started the broker (it knows the PID): the broker's CPU while 10,000 idle queues and 1,000 idle
  connections exist, as % of one core (utime + stime from /proc/PID/stat over the idle period).
- `backlog`: publish N messages and consume none; reports the broker's RSS (VmRSS from /proc/PID/status) before
  and with the backlog (only when this module started the broker).

Without a URL every workload gets a fresh broker, so one workload's leftovers (memory kept by the allocator,
checkpoints, compaction) never show in the next one's figures. p2p also reports the CPU both processes used
during the end-to-end run (the broker's only when started here), to show which side is the bottleneck.

Invariants: a broker this module starts runs in its own process (`python -m chute.cli serve`) and is stopped
(SIGTERM, then SIGKILL after a timeout) and its data directory deleted whatever happens; everything a workload
creates on a broker given by URL has a fresh `bench-<pid>-<random>` name and is deleted afterwards.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import math
import os
import queue as queue_mod
import re
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from chute.client import AsyncClient
from chute.errors import ChuteError

WORKLOADS = ("p2p", "latency", "fanout", "queues", "backlog")

# --messages when not given, per workload (sized so that the default run takes about a minute and a half)
DEFAULT_MESSAGES = {"p2p": 100_000, "fanout": 25_000, "queues": 50_000, "backlog": 100_000}

TARGETS = {
    ("p2p", "end to end"): "≥ 50,000",
    ("latency", "p99"): "≤ 5",
    ("fanout", "deliveries"): "≥ 100,000",
    ("queues", "idle CPU"): "< 1",
    ("backlog", "RSS with backlog"): "≤ 100",
}

BROKER_START_TIMEOUT_S = 60.0
BROKER_STOP_TIMEOUT_S = 30.0
LISTENING_RE = re.compile(r"native protocol listening on (chute://127\.0\.0\.1:\d+)")
HTTP_RE = re.compile(r"HTTP listening on (http://127\.0\.0\.1:\d+)")
STAMP = struct.Struct("<d")


class BenchError(Exception):
    """A failure with its own one-line message (the broker did not start, a workload could not finish)."""


@dataclass
class Options:
    workloads: Sequence[str] = WORKLOADS
    messages: int | None = None  # None: DEFAULT_MESSAGES per workload
    size: int = 256
    rate: float = 2000.0
    duration: float = 5.0
    subscriptions: int = 4
    queues: int = 1000
    fsync: str = "always"
    idle_queues: int = 10_000
    idle_connections: int = 1000
    idle_s: float = 10.0
    window: int = 2000  # most unconfirmed publishes per producer
    prefetch: int = 2000  # p2p / fanout consumers
    ack_batch: int = 500  # p2p / fanout consumers
    acks_in_flight: int = 4
    max_lag: int = 10_000  # p2p / fanout: most messages the producer may be ahead of its consumers (0: no limit)
    timeout_s: float = 60.0  # per client call

    def messages_for(self, workload: str) -> int:
        return self.messages if self.messages is not None else DEFAULT_MESSAGES[workload]


@dataclass
class Row:
    workload: str
    metric: str
    value: float | None  # None: not measurable here (n/a)
    unit: str

    @property
    def target(self) -> str:
        return TARGETS.get((self.workload, self.metric), "")

    def as_dict(self) -> dict:
        return {"workload": self.workload, "metric": self.metric, "value": self.value, "unit": self.unit}


# -- the broker subprocess --------------------------------------------------------------------------------------


def context_switches(pid: int) -> int:
    """Voluntary plus involuntary context switches of a process's live threads (/proc/<pid>/task/*/status): at a
    low rate, about one wake-up of a thread each, which is what a message's CPU goes with."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                total += sum(int(line.split()[1]) for line in f if line.split(":")[0].endswith("ctxt_switches"))
        except OSError:  # the thread ended meanwhile
            pass
    return total


def end_process(process: subprocess.Popen, signum: int, timeout_s: float) -> int | None:
    """Send `signum` to a running process and wait for its exit (SIGKILL after `timeout_s`); return its exit
    status. Does nothing to a process that has already exited."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@dataclass
class BrokerProcess:
    """`chute serve` in a subprocess on a free port, with its data in a fresh temporary directory (`prefix`, under
    `parent`), its HTTP listener on a free port too when `http` (then `http_url` is set). The benchmarks of
    benchmarks/ (soak, stalls, peers) start their brokers through this class."""

    fsync: str = "always"
    process: subprocess.Popen | None = None
    url: str = ""
    data_dir: str = ""
    http: bool = False
    http_url: str = ""
    prefix: str = "chute-bench-"
    parent: str | None = None
    log_path: str | None = None  # the broker's stderr is also appended to this file
    _tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=20))

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout_s: float = BROKER_START_TIMEOUT_S, keep_data: bool = False) -> BrokerProcess:
        """Start the broker (on the data directory it already has if `keep_data`: a restart) and wait until it
        listens. Raises BenchError (the broker stopped) if it exits first or takes longer than `timeout_s`."""
        if not keep_data or not self.data_dir:
            self.data_dir = tempfile.mkdtemp(prefix=self.prefix, dir=self.parent)
        command = [sys.executable, "-m", "chute.cli", "serve", "--data-dir", self.data_dir, "--port", "0",
                   "--http-port", "0" if self.http else "-1", "--fsync", self.fsync, "--log-level", "info"]  # fmt: skip
        self.url = self.http_url = ""
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, errors="replace")  # fmt: skip
        lines: queue_mod.Queue[str | None] = queue_mod.Queue()
        # The broker logs to stderr for as long as it runs: drain the pipe for good, or a full pipe blocks it.
        threading.Thread(target=self._drain, args=(self.process, lines), name="chute-bench-broker-stderr",
                         daemon=True).start()  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while not self.url:  # the HTTP line comes first, then the native one
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue_mod.Empty:
                self.stop()
                raise BenchError(f"the broker did not start listening within {timeout_s:g} s") from None
            if line is None:
                self.stop()
                raise BenchError(f"the broker exited before listening: {self.last_words()}")
            if found := HTTP_RE.search(line):
                self.http_url = found.group(1)
            if found := LISTENING_RE.search(line):
                self.url = found.group(1)
        if self.http and not self.http_url:
            self.stop()
            raise BenchError("the broker did not say where its HTTP listener is")
        return self

    def _drain(self, process: subprocess.Popen, lines: queue_mod.Queue) -> None:
        assert process.stderr is not None
        announced = False
        with contextlib.ExitStack() as files:
            files.enter_context(process.stderr)  # this process's pipe, closed once drained (a restart makes a new one)
            copy = None  # (line-buffered: a harness may read it while the broker runs, e.g. benchmarks.stalls)
            if self.log_path:
                copy = files.enter_context(open(self.log_path, "a", encoding="utf-8", buffering=1))
            for line in process.stderr:
                self._tail.append(line)
                if copy is not None:
                    copy.write(line)
                if not announced:
                    lines.put(line)
                    announced = LISTENING_RE.search(line) is not None
        lines.put(None)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def last_words(self) -> str:
        """The broker's last line on stderr (for errors)."""
        return self._tail[-1].strip() if self._tail else "no output"

    def halt(self, kill: bool = False, timeout_s: float = BROKER_STOP_TIMEOUT_S) -> float:
        """SIGTERM (or SIGKILL) and wait for the exit, keeping the data (for a restart); return the seconds it
        took."""
        started = time.perf_counter()
        if self.process is not None:
            end_process(self.process, signal.SIGKILL if kill else signal.SIGTERM, timeout_s)
        return time.perf_counter() - started

    def stop(self, timeout_s: float = BROKER_STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait for the exit (SIGKILL after `timeout_s`), delete the data directory. Idempotent."""
        code = None
        if self.process is not None:
            code = end_process(self.process, signal.SIGTERM, timeout_s)
        if self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        return code

    def cpu_seconds(self) -> float:
        """utime + stime of the broker process (all its threads), in seconds."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / 1e6
        raise BenchError("no VmRSS in /proc status")


# -- helpers ----------------------------------------------------------------------------------------------------


class Names:
    """Fresh names for what a run creates, so that a shared broker is never disturbed."""

    def __init__(self) -> None:
        self.prefix = f"bench-{os.getpid()}-{secrets.token_hex(3)}"

    def __call__(self, *parts: object) -> str:
        return "-".join([self.prefix, *map(str, parts)])


def body_of(size: int) -> bytes:
    return b"x" * size


class Lag:
    """Keeps a producer at most `limit` messages ahead of its consumers (`copies` deliveries per message)."""

    def __init__(self, limit: int, copies: int = 1) -> None:
        self.limit = limit
        self.copies = copies
        self.received = 0
        self._event = asyncio.Event()

    def got(self, delivery: object = None) -> None:
        self.received += 1
        self._event.set()

    async def wait(self, sent: int) -> None:
        while sent - self.received // self.copies > self.limit:
            self._event.clear()
            await self._event.wait()


async def publish_all(client: AsyncClient, dests: Callable[[int], str], count: int, body: bytes, window: int,
                      lag: Lag | None = None) -> None:  # fmt: skip
    """Publish `count` messages (the i-th to `dests(i)`), keeping at most `window` unconfirmed (and, with `lag`,
    at most `lag.limit` not yet received by the consumers)."""
    outstanding: collections.deque[asyncio.Future] = collections.deque()
    publish = client.publish_nowait
    for i in range(count):
        if lag is not None and not i % 100:
            await lag.wait(i)
        outstanding.append(publish(dests(i), body))
        while len(outstanding) >= window:
            await outstanding.popleft()
    for future in outstanding:
        await future


async def drain(client: AsyncClient, queue: str, count: int, *, prefetch: int, ack_batch: int,
                acks_in_flight: int, on_delivery: Callable | None = None) -> None:  # fmt: skip
    """Consume `count` deliveries of `queue` and ack them in batches of `ack_batch` (at most `acks_in_flight`
    ack requests at a time); return once every ack is confirmed."""
    if count <= 0:
        return
    consumer = await client.consume(queue, prefetch=prefetch, lease_s=300)
    slots = asyncio.Semaphore(acks_in_flight)
    acks: set[asyncio.Task] = set()
    failures: list[BaseException] = []

    async def ack(batch: list) -> None:
        try:
            await client.ack(batch)
        except ChuteError as exc:
            failures.append(exc)
        finally:
            slots.release()

    got = 0
    pending: list = []
    try:
        async for delivery in consumer:
            if on_delivery is not None:
                on_delivery(delivery)
            pending.append(delivery)
            got += 1
            if len(pending) >= ack_batch or got >= count:
                await slots.acquire()
                task = asyncio.get_running_loop().create_task(ack(pending))
                acks.add(task)
                task.add_done_callback(acks.discard)
                pending = []
            if got >= count:
                break
        if acks:
            await asyncio.gather(*acks)
    finally:
        await consumer.close()
    if failures:
        raise failures[0]
    if got < count:
        raise BenchError(f"the consumer of {queue} ended after {got} of {count} messages")


async def open_clients(url: str, count: int, timeout_s: float, name: str) -> list[AsyncClient]:
    clients = [AsyncClient(url, timeout=timeout_s, reconnect=False, name=name) for _ in range(count)]
    for start in range(0, count, 100):
        await asyncio.gather(*(client.connect() for client in clients[start : start + 100]))
    return clients


async def close_clients(clients: Sequence[AsyncClient]) -> None:
    await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)


async def in_chunks(calls: Sequence[Callable[[], Awaitable]], chunk: int = 500) -> None:
    """Run management calls, `chunk` at a time (pipelined on the connection, so the broker group-commits)."""
    for start in range(0, len(calls), chunk):
        await asyncio.gather(*(call() for call in calls[start : start + chunk]))


async def delete_queues(client: AsyncClient, names: Sequence[str]) -> None:
    calls = [lambda name=name: client.delete_queue(name) for name in names]
    for start in range(0, len(calls), 500):
        await asyncio.gather(*(call() for call in calls[start : start + 500]), return_exceptions=True)


@contextlib.contextmanager
def collector_out_of_the_window():
    """Keep this process's own garbage collector out of a latency measurement: what exists when the window opens
    is collected once and frozen (`gc.freeze`) until it closes. Without it a full collection of the harness (every
    object of chute, the client and the libraries: 20-50 ms here) showed as a latency spike of the broker
    measured (BENCHMARKS.md, ninth session). Also used by the peers' harness, for every system alike."""
    global _windows_open
    _windows_open += 1
    if _windows_open == 1:  # (only the outermost window freezes and unfreezes)
        gc.collect()
        gc.freeze()
    try:
        yield
    finally:
        _windows_open -= 1
        if not _windows_open:
            gc.unfreeze()


_windows_open = 0


def settle_done(futures: collections.deque) -> None:
    """Drop the confirmed publishes from the front of `futures` (raising the first failure), so a paced
    producer holds only what is in flight, not every future of the run."""
    while futures and futures[0].done():
        futures.popleft().result()


async def publish_paced(send: Callable[[], asyncio.Future], total: int, rate: float) -> None:
    """Call `send` (one publish, returning its confirm's future) `total` times at `rate` per second: a 1 ms pacing
    loop sends whatever is due (never one sleep per message). Returns once all are confirmed."""
    futures: collections.deque = collections.deque()
    sent, start = 0, time.perf_counter()
    while sent < total:
        due = min(total, int((time.perf_counter() - start) * rate) + 1)
        while sent < due:
            futures.append(send())
            sent += 1
        settle_done(futures)
        await asyncio.sleep(0.001)
    await asyncio.gather(*futures)


def stamped(producer: AsyncClient, queue: str, padding: bytes) -> Callable[[], asyncio.Future]:
    """A `send` for publish_paced: each body is its send time (STAMP) + `padding`."""
    return lambda: producer.publish_nowait(queue, STAMP.pack(time.perf_counter()) + padding)


def percentile(ordered: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of sorted values."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


# -- workloads --------------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, url: str, options: Options, broker: BrokerProcess | None,
                 progress: Callable[[str], None] = lambda text: None) -> None:  # fmt: skip
        self.url = url
        self.options = options
        self.broker = broker
        self.progress = progress
        self.names = Names()
        self.admin: AsyncClient | None = None

    def client(self, role: str) -> AsyncClient:
        return AsyncClient(self.url, timeout=self.options.timeout_s, reconnect=False, name=f"chute-bench-{role}")

    async def run(self, workload: str) -> list[Row]:
        self.progress(workload)
        async with self.client("admin") as self.admin:
            return await getattr(self, f"w_{workload}")()

    def cpu(self) -> tuple[float, float, float]:
        """(wall clock, this process's CPU, the broker's CPU or nan), in seconds."""
        broker = self.broker.cpu_seconds() if self.broker is not None else math.nan
        return time.perf_counter(), time.process_time(), broker

    def cpu_rows(self, workload: str, before: tuple[float, float, float]) -> list[Row]:
        """The CPU both sides used since `before`, as % of one core."""
        wall, client, broker = (now - then for now, then in zip(self.cpu(), before, strict=True))
        return [
            Row(workload, "broker CPU", None if math.isnan(broker) else broker / wall * 100, "% of a core"),
            Row(workload, "client CPU", client / wall * 100, "% of a core"),
        ]

    async def w_p2p(self) -> list[Row]:
        o = self.options
        n, body = o.messages_for("p2p"), body_of(o.size)
        e2e, only = self.names("p2p"), self.names("p2p-publish")
        await self.admin.create_queue(e2e, lease_s=300)
        await self.admin.create_queue(only, lease_s=300)
        try:
            async with self.client("producer") as producer, self.client("consumer") as consumer:
                lag = Lag(o.max_lag) if o.max_lag else None
                draining = asyncio.get_running_loop().create_task(
                    drain(consumer, e2e, n, prefetch=o.prefetch, ack_batch=o.ack_batch,
                          acks_in_flight=o.acks_in_flight, on_delivery=lag and lag.got))  # fmt: skip
                await asyncio.sleep(0.05)  # let the consumer start before the clock does
                before = self.cpu()
                start = time.perf_counter()
                publishing = asyncio.get_running_loop().create_task(publish_all(producer, lambda i: e2e, n, body,
                                                                                o.window, lag))  # fmt: skip
                await asyncio.gather(publishing, draining)
                end_to_end = time.perf_counter() - start
                cpu = self.cpu_rows("p2p", before)

                start = time.perf_counter()
                await publish_all(producer, lambda i: only, n, body, o.window)
                publish_only = time.perf_counter() - start

                start = time.perf_counter()
                await drain(consumer, only, n, prefetch=o.prefetch, ack_batch=o.ack_batch,
                            acks_in_flight=o.acks_in_flight)  # fmt: skip
                consume_only = time.perf_counter() - start
        finally:
            await delete_queues(self.admin, [e2e, only])
        return [
            Row("p2p", "end to end", n / end_to_end, "msg/s"),
            *cpu,
            Row("p2p", "publish confirmed", n / publish_only, "msg/s"),
            Row("p2p", "consume backlog", n / consume_only, "msg/s"),
        ]

    async def w_latency(self) -> list[Row]:
        o = self.options
        total = max(1, int(o.rate * o.duration))
        name = self.names("latency")
        padding = b"x" * max(0, o.size - STAMP.size)
        samples: list[float] = []
        await self.admin.create_queue(name, lease_s=300)
        try:
            async with self.client("producer") as producer, self.client("consumer") as consumer:

                def received(delivery) -> None:
                    samples.append(time.perf_counter() - STAMP.unpack_from(delivery.body)[0])

                draining = asyncio.get_running_loop().create_task(
                    drain(consumer, name, total, prefetch=1000, ack_batch=50, acks_in_flight=4,
                          on_delivery=received))  # fmt: skip
                await asyncio.sleep(0.05)
                pid = self.broker.pid if self.broker is not None else None
                with collector_out_of_the_window():
                    before = self.cpu()
                    switched = context_switches(pid) if pid else 0
                    await publish_paced(stamped(producer, name, padding), total, o.rate)
                    await draining
                    after = self.cpu()
                    switched = context_switches(pid) - switched if pid else None
                cpu = self.cpu_rows("latency", before)
        finally:
            await delete_queues(self.admin, [name])
        ordered = sorted(samples)
        rows = [Row("latency", label, percentile(ordered, p) * 1000, "ms")
                for label, p in (("p50", 50), ("p99", 99), ("p99.9", 99.9), ("max", 100))]  # fmt: skip
        broker_s = after[2] - before[2]  # nan when the broker is not ours
        per_message = None if math.isnan(broker_s) else broker_s / total * 1e6
        switches = None if switched is None else switched / total
        return [*rows, *cpu, Row("latency", "broker CPU per message", per_message, "µs"),
                Row("latency", "broker switches per message", switches, "")]  # fmt: skip

    async def w_fanout(self) -> list[Row]:
        o = self.options
        n, k, body = o.messages_for("fanout"), o.subscriptions, body_of(o.size)
        topic = self.names("fanout")
        queues = [self.names("fanout", i) for i in range(k)]
        await self.admin.create_topic(topic)
        try:
            for queue in queues:
                await self.admin.create_queue(queue, lease_s=300)
                await self.admin.subscribe(topic, ">", queue)
            consumers = await open_clients(self.url, k, o.timeout_s, "chute-bench-consumer")
            try:
                async with self.client("producer") as producer:
                    loop = asyncio.get_running_loop()
                    lag = Lag(o.max_lag, copies=k) if o.max_lag else None
                    draining = [loop.create_task(drain(client, queue, n, prefetch=o.prefetch, ack_batch=o.ack_batch,
                                                       acks_in_flight=o.acks_in_flight, on_delivery=lag and lag.got))
                                for client, queue in zip(consumers, queues, strict=True)]  # fmt: skip
                    await asyncio.sleep(0.05)
                    start = time.perf_counter()
                    await asyncio.gather(publish_all(producer, lambda i: topic, n, body, o.window, lag), *draining)
                    elapsed = time.perf_counter() - start
            finally:
                await close_clients(consumers)
        finally:
            await self.admin.delete_topic(topic)
            await delete_queues(self.admin, queues)
        return [Row("fanout", "deliveries", n * k / elapsed, "deliveries/s")]

    async def w_queues(self) -> list[Row]:
        o = self.options
        n, q, body = o.messages_for("queues"), o.queues, body_of(o.size)
        names = [self.names("queues", i) for i in range(q)]
        await in_chunks([lambda name=name: self.admin.create_queue(name, lease_s=300) for name in names])
        rows = []
        try:
            connections = 4 if q >= 4 else 1
            consumers = await open_clients(self.url, connections, o.timeout_s, "chute-bench-consumer")
            try:
                async with self.client("producer") as producer:
                    loop = asyncio.get_running_loop()
                    draining = [loop.create_task(drain(consumers[j % connections], name, n // q + (j < n % q),
                                                       prefetch=64, ack_batch=16, acks_in_flight=2))
                                for j, name in enumerate(names)]  # fmt: skip
                    await asyncio.sleep(0.2)
                    start = time.perf_counter()
                    await asyncio.gather(publish_all(producer, lambda i: names[i % q], n, body, o.window), *draining)
                    elapsed = time.perf_counter() - start
            finally:
                await close_clients(consumers)
            rows.append(Row("queues", f"{q:,} queues", n / elapsed, "msg/s"))
        finally:
            await delete_queues(self.admin, names)
        rows += await self._idle()
        return rows

    async def _idle(self) -> list[Row]:
        o = self.options
        metric = "idle CPU"
        if self.broker is None:
            return [Row("queues", metric, None, "% of a core")]
        # only on a broker started for this workload (so the idle queues are not deleted: the broker goes away)
        self.progress(f"idle: {o.idle_queues:,} queues, {o.idle_connections:,} connections, {o.idle_s:g} s")
        names = [self.names("idle", i) for i in range(o.idle_queues)]
        await in_chunks([lambda name=name: self.admin.create_queue(name) for name in names])
        clients = await open_clients(self.url, o.idle_connections, o.timeout_s, "chute-bench-idle")
        try:
            await asyncio.sleep(1.0)  # let the broker settle (checkpoints, the last acks)
            cpu_before, wall_before = self.broker.cpu_seconds(), time.perf_counter()
            await asyncio.sleep(o.idle_s)
            cpu = self.broker.cpu_seconds() - cpu_before
            wall = time.perf_counter() - wall_before
        finally:
            await close_clients(clients)
        return [Row("queues", metric, cpu / wall * 100, "% of a core")]

    async def w_backlog(self) -> list[Row]:
        o = self.options
        n, body = o.messages_for("backlog"), body_of(o.size)
        name = self.names("backlog")
        await self.admin.create_queue(name, lease_s=300)
        rows = []
        try:
            before = self.broker.rss_mb() if self.broker is not None else None
            async with self.client("producer") as producer:
                await publish_all(producer, lambda i: name, n, body, o.window)
            await asyncio.sleep(0.5)
            stats = await self.admin.queue_stats(name)
            if stats.ready < n:
                raise BenchError(f"the backlog queue holds {stats.ready} of {n} messages")
            rows.append(Row("backlog", "RSS before", before, "MB"))
            rows.append(Row("backlog", "RSS with backlog", self.broker.rss_mb() if self.broker else None, "MB"))
        finally:
            await delete_queues(self.admin, [name])
        return rows


def run_bench(options: Options, url: str | None, progress: Callable[[str], None] = lambda text: None,
              started: Callable[[BrokerProcess], None] = lambda broker: None) -> list[Row]:  # fmt: skip
    """Run the workloads against `url`, or each against a fresh broker subprocess started (and stopped) here, so
    that one workload's leftovers (memory, checkpoints, compaction) never show in the next one's figures."""
    rows: list[Row] = []
    for workload in options.workloads:
        broker = None
        if url is None:
            broker = BrokerProcess(fsync=options.fsync).start()
            started(broker)
        try:
            rows += _run_loop(Bench(url or broker.url, options, broker, progress).run(workload))
        finally:
            if broker is not None:
                broker.stop()
    return rows


def _run_loop(coro: Awaitable[list[Row]]) -> list[Row]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)
