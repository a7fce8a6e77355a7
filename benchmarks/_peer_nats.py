"""NATS JetStream as a peer of `python -m benchmarks.peers`: a file-stored stream per queue, durable pull
consumers with explicit acks, nats-py.

Durability: `nats-server -js -sd <tmp>`. A publish is confirmed by JetStream's PubAck once the message is written
to the stream's file, but nats-server 2.9 does not fsync it then: it syncs its files every 2 minutes and has no
setting to sync every write (`sync_interval: always` came with 2.10), so a JetStream confirmation is weaker than
Chute's or Redis's here (lost with the machine, not with the process) and NATS's figures carry that advantage.
Retention follows what Chute does with the message: a work-queue stream for point-to-point and latency (an ack
deletes the message), an interest stream for fan-out (deleted once all 4 durable consumers acked it), a limits
stream (with one durable consumer that reads nothing) for the backlog.

Consumption: nats-py's `fetch()` is one request per batch and waits for a whole batch; the consumer here keeps
`prefetch` messages requested instead, as nats.go's `Consume()` does and as Chute's prefetch does: pull requests of
`batch` messages (no expiry: only as many as will arrive) sent to `$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`
whenever fewer than `prefetch - batch` are outstanding, messages handled in the subscription's callback. An ack is
`msg.ack()` (the protocol's fire-and-forget `+ACK`); each batch of acks is then confirmed by a PING/PONG round
trip (`flush`), at most `in_flight` at a time, which proves the server read them (it applies them in order).
"""

from __future__ import annotations

import asyncio
import collections
import json
import shutil
import subprocess
import time
from collections.abc import Callable

import nats
from nats.js import api

from benchmarks._peer_common import Acks, CpuClock, Opts, PeerError, ServerProcess, bounded, latency_metrics
from chute.bench import STAMP, Lag, body_of, collector_out_of_the_window, settle_done

NAME = "nats"
BINARY = "nats-server"


def version() -> str:
    if shutil.which(BINARY) is None:
        return ""
    return subprocess.run([BINARY, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()


def client_version() -> str:
    from importlib.metadata import version as dist_version

    return f"nats-py {dist_version('nats-py')}"


class Server(ServerProcess):
    def __init__(self, announce: Callable[[str], None] = lambda text: None) -> None:
        super().__init__(name=BINARY, announce=announce)

    def command(self) -> list[str]:
        return [BINARY, "-js", "-sd", self.data_dir, "-a", "127.0.0.1", "-p", str(self.port)]

    async def connect(self) -> nats.NATS:
        async def quiet(exc: Exception) -> None:  # errors surface where they matter (a call fails)
            pass

        return await nats.connect(f"nats://127.0.0.1:{self.port}", allow_reconnect=False, connect_timeout=5,
                                  reconnect_time_wait=0.01, max_reconnect_attempts=0, error_cb=quiet)  # fmt: skip

    async def probe(self) -> None:
        nc = await self.connect()
        try:
            await nc.jetstream().account_info()
        finally:
            await nc.close()


async def add_stream(js, name: str, retention: api.RetentionPolicy, consumers: list[str]) -> None:
    await js.add_stream(api.StreamConfig(name=name, subjects=[name], storage=api.StorageType.FILE,
                                         retention=retention))  # fmt: skip
    for durable in consumers:
        await js.add_consumer(name, api.ConsumerConfig(durable_name=durable, ack_policy=api.AckPolicy.EXPLICIT,
                                                       ack_wait=300, max_ack_pending=20_000))  # fmt: skip


async def publish(nc: nats.NATS, subject: str, count: int, body: bytes, opts: Opts, lag: Lag | None = None) -> None:
    """`js.publish_async` each message, keeping at most `opts.window` PubAcks outstanding."""
    js = nc.jetstream(publish_async_max_pending=opts.window + 1)
    outstanding: collections.deque[asyncio.Future] = collections.deque()
    for i in range(count):
        if lag is not None and not i % 100:
            await lag.wait(i)
        outstanding.append(await js.publish_async(subject, body))
        while len(outstanding) >= opts.window:
            await outstanding.popleft()
    for future in outstanding:
        await future


async def consume(nc: nats.NATS, stream: str, durable: str, count: int, opts: Opts, *, prefetch: int | None = None,
                  ack_batch: int | None = None, on_body: Callable[[bytes], None] | None = None) -> None:  # fmt: skip
    """Pull `count` messages of `stream`'s consumer `durable`, keeping `prefetch` requested, acking each and
    confirming the acks every `ack_batch` messages; return once every ack is confirmed."""
    prefetch = prefetch or opts.prefetch
    ack_batch = ack_batch or opts.batch
    chunk = min(opts.batch, prefetch)
    next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
    inbox = nc.new_inbox()
    acks = Acks(opts.in_flight)
    done = asyncio.get_running_loop().create_future()
    state = {"requested": 0, "got": 0}
    failures: list[BaseException] = []

    async def request() -> None:
        while state["requested"] < count and state["requested"] - state["got"] <= prefetch - chunk:
            n = min(chunk, count - state["requested"])
            state["requested"] += n
            await nc.publish(next_subject, json.dumps({"batch": n}).encode(), reply=inbox)

    async def on_message(msg) -> None:
        try:
            if msg.headers and msg.headers.get("Status"):
                raise PeerError(f"pull request for {stream}: {msg.headers.get('Status')} "
                                f"{msg.headers.get('Description', '')}")  # fmt: skip
            if on_body is not None:
                on_body(msg.data)
            await msg.ack()
            state["got"] += 1
            got = state["got"]
            if not got % ack_batch or got >= count:
                await acks.send(nc.flush)
            if got >= count:
                if not done.done():
                    done.set_result(None)
                return
            await request()
        except Exception as exc:
            failures.append(exc)
            if not done.done():
                done.set_result(None)

    sub = await nc.subscribe(inbox, cb=on_message, pending_msgs_limit=4 * prefetch + 1000)
    try:
        await request()
        await bounded(asyncio.shield(done), opts.timeout_s, f"the consumer of {stream}")
        if failures:
            raise failures[0]
        await acks.wait()
    finally:
        await sub.unsubscribe()


async def p2p(server: Server, opts: Opts) -> dict[str, float]:
    n, body = opts.messages_for("p2p"), body_of(opts.size)
    producer, consumer = await server.connect(), await server.connect()
    try:
        js = producer.jetstream()
        for stream in ("p2p", "p2p-publish"):
            await add_stream(js, stream, api.RetentionPolicy.WORK_QUEUE, ["c"])
        lag = Lag(opts.max_lag) if opts.max_lag else None
        draining = asyncio.get_running_loop().create_task(
            consume(consumer, "p2p", "c", n, opts, on_body=lag and (lambda body: lag.got())))  # fmt: skip
        await asyncio.sleep(0.05)
        clock = CpuClock(server.pid)
        start = time.perf_counter()
        await bounded(asyncio.gather(publish(producer, "p2p", n, body, opts, lag), draining), opts.timeout_s, "p2p")
        end_to_end = time.perf_counter() - start
        cpu = clock.metrics()

        start = time.perf_counter()
        await bounded(publish(producer, "p2p-publish", n, body, opts), opts.timeout_s, "publish")
        publish_only = time.perf_counter() - start
        start = time.perf_counter()
        await consume(consumer, "p2p-publish", "c", n, opts)
        consume_only = time.perf_counter() - start
    finally:
        await producer.close()
        await consumer.close()
    return {"end to end": n / end_to_end, **cpu, "publish confirmed": n / publish_only,
            "consume backlog": n / consume_only}  # fmt: skip


async def latency(server: Server, opts: Opts) -> dict[str, float]:
    total = opts.latency_total
    padding = b"x" * max(0, opts.size - STAMP.size)
    samples: list[float] = []
    producer, consumer = await server.connect(), await server.connect()

    def received(body: bytes) -> None:
        samples.append(time.perf_counter() - STAMP.unpack_from(body)[0])

    try:
        js = producer.jetstream(publish_async_max_pending=total + 1)
        await add_stream(js, "latency", api.RetentionPolicy.WORK_QUEUE, ["c"])
        draining = asyncio.get_running_loop().create_task(
            consume(consumer, "latency", "c", total, opts, prefetch=1000, ack_batch=50, on_body=received))  # fmt: skip
        await asyncio.sleep(0.05)
        with collector_out_of_the_window():  # (as for every system: the harness's pauses are not NATS's)
            clock = CpuClock(server.pid)
            futures: collections.deque = collections.deque()
            sent = 0
            start = time.perf_counter()
            deadline = time.monotonic() + opts.duration + opts.timeout_s
            while sent < total and time.monotonic() < deadline:
                due = min(total, int((time.perf_counter() - start) * opts.rate) + 1)
                while sent < due:
                    futures.append(await js.publish_async("latency", STAMP.pack(time.perf_counter()) + padding))
                    sent += 1
                settle_done(futures)
                await asyncio.sleep(0.001)
            await bounded(asyncio.gather(*futures), opts.timeout_s, "latency publishes")
            await draining
            cpu = clock.metrics()
        cpu["server CPU per message"] = clock.server_seconds() / total * 1e6
        cpu["server switches per message"] = clock.server_switches() / total
    finally:
        await producer.close()
        await consumer.close()
    return latency_metrics(samples) | cpu


async def fanout(server: Server, opts: Opts) -> dict[str, float]:
    n, k, body = opts.messages_for("fanout"), opts.subscriptions, body_of(opts.size)
    producer = await server.connect()
    consumers = [await server.connect() for _ in range(k)]
    try:
        await add_stream(producer.jetstream(), "fanout", api.RetentionPolicy.INTEREST, [f"c{i}" for i in range(k)])
        lag = Lag(opts.max_lag, copies=k) if opts.max_lag else None
        loop = asyncio.get_running_loop()
        draining = [loop.create_task(consume(c, "fanout", f"c{i}", n, opts, on_body=lag and (lambda body: lag.got())))
                    for i, c in enumerate(consumers)]  # fmt: skip
        await asyncio.sleep(0.05)
        start = time.perf_counter()
        await bounded(asyncio.gather(publish(producer, "fanout", n, body, opts, lag), *draining), opts.timeout_s,
                      "fanout")  # fmt: skip
        elapsed = time.perf_counter() - start
    finally:
        await asyncio.gather(producer.close(), *(c.close() for c in consumers), return_exceptions=True)
    return {"deliveries": n * k / elapsed}


async def fill(server: Server, count: int, opts: Opts) -> None:
    """Add `count` messages to the backlog stream (limits retention, one durable consumer that reads nothing)."""
    nc = await server.connect()
    try:
        js = nc.jetstream()
        try:
            await js.stream_info("backlog")
        except nats.js.errors.NotFoundError:
            await add_stream(js, "backlog", api.RetentionPolicy.LIMITS, ["c"])
        await bounded(publish(nc, "backlog", count, body_of(opts.size), opts), opts.timeout_s * 10, "backlog")
    finally:
        await nc.close()


async def verify(server: Server, count: int) -> None:
    nc = await server.connect()
    try:
        info = await nc.jetstream().stream_info("backlog")
    finally:
        await nc.close()
    if info.state.messages != count:
        raise PeerError(f"the backlog stream holds {info.state.messages} of {count} messages")
