"""Redis as a peer of `python -m benchmarks.peers`: a stream per queue, consumer groups, redis-py asyncio.

Durability: `redis-server --appendonly yes --appendfsync always --save ''`: every write command is in the AOF and
fsynced before its reply is sent (Redis group-commits one fsync per event-loop turn), so a confirmed XADD or XACK
is on disk, as a confirmed Chute publish or ack is. A message is an entry `b=<body>` of a stream; a delivery is an
XREADGROUP that puts it in the group's pending entries list (Chute's lease); an ack is XACK (the entry leaves the
pending list but stays in the stream: Redis does no deletion work, which Chute's ack does; XDEL is not sent).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Callable

import redis.asyncio as aioredis

from benchmarks._peer_common import Acks, CpuClock, Opts, PeerError, ServerProcess, bounded, latency_metrics
from chute.bench import STAMP, Lag, body_of, collector_out_of_the_window

NAME = "redis"
BINARY = "redis-server"
FIELD = b"b"
GROUP = "g"


def version() -> str:
    if shutil.which(BINARY) is None:
        return ""
    out = subprocess.run([BINARY, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    return out


def client_version() -> str:
    import redis

    try:
        import hiredis

        parser = f"hiredis {hiredis.__version__}"
    except ImportError:
        parser = "pure-Python parser"
    return f"redis-py {redis.__version__} ({parser})"


class Server(ServerProcess):
    def __init__(self, announce: Callable[[str], None] = lambda text: None) -> None:
        super().__init__(name=BINARY, announce=announce)

    def command(self) -> list[str]:
        return [BINARY, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", self.data_dir,
                "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
                "--logfile", ""]  # fmt: skip

    def client(self) -> aioredis.Redis:
        return aioredis.Redis(host="127.0.0.1", port=self.port, protocol=2, socket_timeout=60,
                              socket_connect_timeout=5)  # fmt: skip

    async def probe(self) -> None:
        r = self.client()
        try:
            await r.ping()
        finally:
            await r.aclose()


async def publish(r: aioredis.Redis, stream: str, count: int, body: bytes, opts: Opts, lag: Lag | None = None) -> None:
    """XADD `count` entries in pipelines of `opts.batch`, at most `opts.in_flight` pipelines (= `opts.window`
    unconfirmed publishes) at a time, each on its own pooled connection."""
    pipelines = Acks(opts.in_flight)
    sent = 0
    while sent < count:
        if lag is not None:
            await lag.wait(sent)
        n = min(opts.batch, count - sent)
        pipe = r.pipeline(transaction=False)
        for _ in range(n):
            pipe.xadd(stream, {FIELD: body})
        await pipelines.send(pipe.execute)
        sent += n
    await pipelines.wait()


async def consume(r: aioredis.Redis, stream: str, count: int, opts: Opts, *, group: str = GROUP,
                  read: int | None = None, ack_batch: int | None = None,
                  on_body: Callable[[bytes], None] | None = None) -> None:  # fmt: skip
    """XREADGROUP up to `read` (the prefetch) entries at a time, XACK them in batches of `ack_batch` with at most
    `opts.in_flight` XACKs in flight; return once `count` entries are acked."""
    read = read or opts.prefetch
    ack_batch = ack_batch or opts.batch
    acks = Acks(opts.in_flight)
    got = 0
    pending: list[bytes] = []
    deadline = time.monotonic() + opts.timeout_s
    while got < count:
        if time.monotonic() > deadline:
            raise PeerError(f"the consumer of {stream} got {got} of {count} entries in {opts.timeout_s:g} s")
        reply = await r.xreadgroup(group, "c", {stream: ">"}, count=min(read, count - got), block=1000)
        for _name, entries in reply or ():
            for entry_id, fields in entries:
                if on_body is not None:
                    on_body(fields[FIELD])
                pending.append(entry_id)
                got += 1
                if len(pending) >= ack_batch or got >= count:
                    ids, pending = pending, []
                    await acks.send(lambda ids=ids: r.xack(stream, group, *ids))
    await acks.wait()


async def _group(r: aioredis.Redis, stream: str, group: str = GROUP) -> None:
    await r.xgroup_create(stream, group, id="0", mkstream=True)


async def p2p(server: Server, opts: Opts) -> dict[str, float]:
    n, body = opts.messages_for("p2p"), body_of(opts.size)
    producer, consumer = server.client(), server.client()
    try:
        for stream in ("p2p", "p2p-publish"):
            await _group(producer, stream)
        lag = Lag(opts.max_lag) if opts.max_lag else None
        draining = asyncio.get_running_loop().create_task(
            consume(consumer, "p2p", n, opts, on_body=lag and (lambda body: lag.got())))  # fmt: skip
        await asyncio.sleep(0.05)  # let the consumer start before the clock does
        clock = CpuClock(server.pid)
        start = time.perf_counter()
        await bounded(asyncio.gather(publish(producer, "p2p", n, body, opts, lag), draining), opts.timeout_s, "p2p")
        end_to_end = time.perf_counter() - start
        cpu = clock.metrics()

        start = time.perf_counter()
        await bounded(publish(producer, "p2p-publish", n, body, opts), opts.timeout_s, "publish")
        publish_only = time.perf_counter() - start
        start = time.perf_counter()
        await bounded(consume(consumer, "p2p-publish", n, opts), opts.timeout_s, "consume")
        consume_only = time.perf_counter() - start
    finally:
        await producer.aclose()
        await consumer.aclose()
    return {"end to end": n / end_to_end, **cpu, "publish confirmed": n / publish_only,
            "consume backlog": n / consume_only}  # fmt: skip


async def latency(server: Server, opts: Opts) -> dict[str, float]:
    total = opts.latency_total
    padding = b"x" * max(0, opts.size - STAMP.size)
    samples: list[float] = []
    producer, consumer = server.client(), server.client()

    def received(body: bytes) -> None:
        samples.append(time.perf_counter() - STAMP.unpack_from(body)[0])

    try:
        await _group(producer, "latency")
        draining = asyncio.get_running_loop().create_task(
            consume(consumer, "latency", total, opts, read=1000, ack_batch=50, on_body=received))  # fmt: skip
        await asyncio.sleep(0.05)
        with collector_out_of_the_window():  # (as for every system: the harness's pauses are not Redis's)
            clock = CpuClock(server.pid)
            pipelines = Acks(64)
            sent = 0
            start = time.perf_counter()
            deadline = time.monotonic() + opts.duration + opts.timeout_s
            while sent < total and time.monotonic() < deadline:
                due = min(total, int((time.perf_counter() - start) * opts.rate) + 1)
                if due > sent:  # one pipeline per 1 ms tick with whatever is due (Chute's client batches alike)
                    pipe = producer.pipeline(transaction=False)
                    for _ in range(due - sent):
                        pipe.xadd("latency", {FIELD: STAMP.pack(time.perf_counter()) + padding})
                    await pipelines.send(pipe.execute)
                    sent = due
                await asyncio.sleep(0.001)
            await bounded(pipelines.wait(), opts.timeout_s, "latency publishes")
            await bounded(draining, opts.timeout_s, "latency consumer")
            cpu = clock.metrics()
        cpu["server CPU per message"] = clock.server_seconds() / total * 1e6
        cpu["server switches per message"] = clock.server_switches() / total
    finally:
        await producer.aclose()
        await consumer.aclose()
    return latency_metrics(samples) | cpu


async def fanout(server: Server, opts: Opts) -> dict[str, float]:
    n, k, body = opts.messages_for("fanout"), opts.subscriptions, body_of(opts.size)
    producer = server.client()
    consumers = [server.client() for _ in range(k)]
    try:
        for i in range(k):
            await _group(producer, "fanout", f"g{i}")
        lag = Lag(opts.max_lag, copies=k) if opts.max_lag else None
        loop = asyncio.get_running_loop()
        draining = [loop.create_task(consume(c, "fanout", n, opts, group=f"g{i}",
                                             on_body=lag and (lambda body: lag.got())))
                    for i, c in enumerate(consumers)]  # fmt: skip
        await asyncio.sleep(0.05)
        start = time.perf_counter()
        await bounded(asyncio.gather(publish(producer, "fanout", n, body, opts, lag), *draining), opts.timeout_s,
                      "fanout")  # fmt: skip
        elapsed = time.perf_counter() - start
    finally:
        await asyncio.gather(producer.aclose(), *(c.aclose() for c in consumers), return_exceptions=True)
    return {"deliveries": n * k / elapsed}


async def fill(server: Server, count: int, opts: Opts) -> None:
    """Add `count` entries to the backlog stream (a consumer group exists, nobody reads)."""
    r = server.client()
    try:
        if not await r.exists("backlog"):
            await _group(r, "backlog")
        await bounded(publish(r, "backlog", count, body_of(opts.size), opts), opts.timeout_s * 10, "backlog")
    finally:
        await r.aclose()


async def verify(server: Server, count: int) -> None:
    r = server.client()
    try:
        length = await r.xlen("backlog")  # LOADING error while the AOF is replayed
    finally:
        await r.aclose()
    if length != count:
        raise PeerError(f"the backlog stream holds {length} of {count} entries")
