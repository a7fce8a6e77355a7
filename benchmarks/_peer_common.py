"""What the systems of `python -m benchmarks.peers` share: the options, a server subprocess on loopback with its
own temporary directory, /proc readings, and the bounded helpers every workload uses."""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from chute.bench import DEFAULT_MESSAGES, context_switches, end_process

START_TIMEOUT_S = 120.0  # a peer recovering a 1,000,000-message backlog may take a while
STOP_TIMEOUT_S = 30.0


class PeerError(Exception):
    """A failure with its own one-line message."""


@dataclass
class Opts:
    messages: int | None = None  # p2p and fanout; None: chute.bench's DEFAULT_MESSAGES per workload
    size: int = 256
    rate: float = 2000.0  # latency
    duration: float = 10.0  # latency
    subscriptions: int = 4  # fanout
    window: int = 2000  # most unconfirmed publishes per producer (chute.bench.Options.window)
    batch: int = 500  # publishes per Redis pipeline; acks per ack request (chute.bench.Options.ack_batch)
    in_flight: int = 4  # pipelines / ack requests in flight (chute.bench.Options.acks_in_flight)
    prefetch: int = 2000  # chute.bench.Options.prefetch
    max_lag: int = 10_000  # chute.bench.Options.max_lag
    backlog: Sequence[int] = (100_000, 1_000_000)
    timeout_s: float = 120.0  # a bound on every wait of a workload

    def messages_for(self, workload: str) -> int:
        return self.messages if self.messages is not None else DEFAULT_MESSAGES[workload]

    @property
    def latency_total(self) -> int:
        return max(1, int(self.rate * self.duration))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
    raise PeerError("no VmRSS in /proc status")


def percentile(ordered: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of sorted values."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


def latency_metrics(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {label: percentile(ordered, p) * 1000 for label, p in (("p50", 50), ("p99", 99), ("p99.9", 99.9),
                                                                  ("max", 100))}  # fmt: skip


class CpuClock:
    """Wall clock, this process's CPU and a server's CPU and context switches since it was made; `metrics()` as %
    of one core."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.wall, self.client, self.server = time.perf_counter(), time.process_time(), proc_cpu_seconds(pid)
        self.switches = context_switches(pid)

    def server_switches(self) -> int:
        """The server's context switches (all its threads) since this clock was made."""
        return context_switches(self.pid) - self.switches

    def server_seconds(self) -> float:
        """The server's CPU seconds since this clock was made."""
        return proc_cpu_seconds(self.pid) - self.server

    def metrics(self) -> dict[str, float]:
        wall = time.perf_counter() - self.wall
        return {"server CPU": (proc_cpu_seconds(self.pid) - self.server) / wall * 100,
                "client CPU": (time.process_time() - self.client) / wall * 100}  # fmt: skip


async def bounded(awaitable: Awaitable, timeout_s: float, what: str):
    try:
        return await asyncio.wait_for(awaitable, timeout_s)
    except TimeoutError:
        raise PeerError(f"{what} did not finish within {timeout_s:g} s") from None


def run_async(coro: Awaitable):
    """Run a coroutine on a fresh event loop (uvloop when installed, as `chute bench` does)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


@dataclass
class ServerProcess:
    """A peer's server in a subprocess on 127.0.0.1 and a free port, with its data in a fresh temporary directory
    (`<tmp>/data`, its log in `<tmp>/server.log`). `restart` keeps the directory; `stop` deletes it."""

    name: str = "server"
    process: subprocess.Popen | None = None
    port: int = 0
    tmp: str = ""
    announce: Callable[[str], None] = lambda text: None
    _log: object = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def data_dir(self) -> str:
        return os.path.join(self.tmp, "data")

    def command(self) -> list[str]:
        raise NotImplementedError

    async def probe(self) -> None:
        """Return once the server answers; raise while it does not."""
        raise NotImplementedError

    def start(self, timeout_s: float = START_TIMEOUT_S, check: Callable[[], Awaitable[None]] | None = None) -> float:
        """Start the server (on the same port and directory when restarted); return the seconds until it served
        (`probe`, then `check` when given: e.g. until its backlog is there again)."""
        if not self.tmp:
            self.tmp = tempfile.mkdtemp(prefix=f"chute-peers-{self.name}-")
            os.makedirs(self.data_dir)
            self.port = free_port()
        self._log = open(os.path.join(self.tmp, "server.log"), "ab")  # noqa: SIM115 (closed in _reap)
        started = time.perf_counter()
        self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=self._log,
                                        stderr=subprocess.STDOUT, cwd=self.tmp)  # fmt: skip
        self.announce(f"started {self.name} (pid {self.pid}) on 127.0.0.1:{self.port}, data in {self.tmp}")
        try:
            run_async(self._wait_ready(timeout_s, check))
        except BaseException:
            self.stop()
            raise
        return time.perf_counter() - started

    async def _wait_ready(self, timeout_s: float, check: Callable[[], Awaitable[None]] | None) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise PeerError(f"{self.name} exited with status {self.process.returncode}: {self.log_tail()}")
            try:
                await asyncio.wait_for(self.probe(), 5.0)
                if check is not None:
                    await asyncio.wait_for(check(), 5.0)
                return
            except Exception as exc:  # not up yet, or still loading its data
                if time.monotonic() > deadline:
                    raise PeerError(f"{self.name} did not serve within {timeout_s:g} s ({exc!r})") from None
            await asyncio.sleep(0.01)

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.tmp, "server.log"), "rb") as f:
                lines = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return lines[-1] if lines else "no output"

    def halt(self, kill: bool = False, timeout_s: float = STOP_TIMEOUT_S) -> float:
        """SIGTERM (or SIGKILL) and wait for the exit, keeping the data; return the seconds it took."""
        started = time.perf_counter()
        if self.process is not None:
            end_process(self.process, signal.SIGKILL if kill else signal.SIGTERM, timeout_s)
        self._reap()
        return time.perf_counter() - started

    def restart(self, kill: bool, check: Callable[[], Awaitable[None]]) -> tuple[float, float]:
        """(seconds to stop, seconds until it serves again and `check` passes)."""
        stopped = self.halt(kill)
        return stopped, self.start(check=check)

    def _reap(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        """Stop the server whatever happens and delete its directory. Idempotent."""
        try:
            self.halt()
        finally:
            if self.tmp:
                shutil.rmtree(self.tmp, ignore_errors=True)

    def kill_now(self) -> None:
        """From a signal handler: SIGKILL, reap, delete the directory."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def rss_mb(self) -> float:
        return proc_rss_mb(self.pid)

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)


class Acks:
    """Ack requests in flight, at most `limit` at a time; `wait()` returns when all are confirmed (or raises)."""

    def __init__(self, limit: int) -> None:
        self._slots = asyncio.Semaphore(limit)
        self._tasks: set[asyncio.Task] = set()
        self._failures: list[BaseException] = []

    async def send(self, make: Callable[[], Awaitable]) -> None:
        await self._slots.acquire()

        async def run() -> None:
            try:
                await make()
            except Exception as exc:
                self._failures.append(exc)
            finally:
                self._slots.release()

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks)
        if self._failures:
            raise self._failures[0]
