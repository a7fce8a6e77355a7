"""Chute in `python -m benchmarks.peers`: `chute serve --fsync always` in a subprocess (chute.bench's
`BrokerProcess`), measured by chute.bench's own workloads (`Bench.w_p2p`, `w_latency`, `w_fanout`) with the same
options the peers get, and a backlog filled with chute.bench's `publish_all`."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from benchmarks._peer_common import START_TIMEOUT_S, Opts, PeerError, bounded, run_async
from chute.bench import Bench, BenchError, BrokerProcess, Options, body_of, publish_all
from chute.client import AsyncClient

NAME = "chute"
BINARY = ""
QUEUE = "backlog"


def version() -> str:
    from importlib.metadata import version as dist_version

    return f"chute {dist_version('chute')} (this work tree), fsync always"


def client_version() -> str:
    return "chute.AsyncClient"


@dataclass
class Server(BrokerProcess):
    """chute.bench's BrokerProcess (`chute serve --fsync always`, a fresh data directory), which can also restart
    on the same data directory and report how long that took."""

    announce: Callable[[str], None] = field(default=lambda text: None, repr=False)

    def __post_init__(self) -> None:
        self.fsync = "always"

    def start(self, timeout_s: float = START_TIMEOUT_S, check: Callable[[], Awaitable[None]] | None = None) -> float:
        started = time.perf_counter()
        try:
            BrokerProcess.start(self, timeout_s, keep_data=True)  # a fresh directory the first time
        except BenchError as exc:
            raise PeerError(f"chute: {exc}") from None
        self.announce(f"started chute serve (pid {self.pid}) at {self.url}, data in {self.data_dir}")
        if check is not None:
            try:
                run_async(self._checked(check, timeout_s))
            except BaseException:
                self.stop()
                raise
        return time.perf_counter() - started

    async def _checked(self, check: Callable[[], Awaitable[None]], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await asyncio.wait_for(check(), 5.0)
                return
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise PeerError(f"chute did not serve its backlog within {timeout_s:g} s ({exc!r})") from None
            await asyncio.sleep(0.01)

    def restart(self, kill: bool, check: Callable[[], Awaitable[None]]) -> tuple[float, float]:
        """(seconds to stop, seconds until it serves again and `check` passes)."""
        stopped = self.halt(kill)
        return stopped, self.start(check=check)

    def kill_now(self) -> None:
        """From a signal handler: SIGKILL, reap, delete the data directory."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def options(opts: Opts, workload: str) -> Options:
    return Options(workloads=[workload], messages=opts.messages, size=opts.size, rate=opts.rate,
                   duration=opts.duration, subscriptions=opts.subscriptions, fsync="always", window=opts.window,
                   prefetch=opts.prefetch, ack_batch=opts.batch, acks_in_flight=opts.in_flight,
                   max_lag=opts.max_lag, timeout_s=60.0)  # fmt: skip


async def _bench(server: Server, opts: Opts, workload: str) -> dict[str, float]:
    bench = Bench(server.url, options(opts, workload), server)
    try:
        rows = await bounded(bench.run(workload), opts.timeout_s * 2, workload)
    except BenchError as exc:
        raise PeerError(str(exc)) from None
    return {row.metric.replace("broker ", "server ", 1): row.value for row in rows}


async def p2p(server: Server, opts: Opts) -> dict[str, float]:
    return await _bench(server, opts, "p2p")


async def latency(server: Server, opts: Opts) -> dict[str, float]:
    return await _bench(server, opts, "latency")


async def fanout(server: Server, opts: Opts) -> dict[str, float]:
    return await _bench(server, opts, "fanout")


def _client(server: Server) -> AsyncClient:
    return AsyncClient(server.url, timeout=60.0, reconnect=False, name="chute-peers")


async def fill(server: Server, count: int, opts: Opts) -> None:
    """Publish `count` messages to the backlog queue (nobody consumes it)."""
    async with _client(server) as client:
        await client.create_queue(QUEUE, lease_s=300)  # idempotent with the same settings
        await bounded(publish_all(client, lambda i: QUEUE, count, body_of(opts.size), opts.window),
                      opts.timeout_s * 10, "backlog")  # fmt: skip


async def verify(server: Server, count: int) -> None:
    async with _client(server) as client:
        stats = await client.queue_stats(QUEUE)
    if stats.ready != count:
        raise PeerError(f"the backlog queue holds {stats.ready} of {count} messages")
