"""The AMQP 0-9-1 benchmark (issue 15, Performance): publisher confirms and manual acks, point-to-point or fan-out.

    python -m benchmarks.amqp [--workload p2p|fanout] [--producers 1] [--consumers 1] [--messages 20000]
                              [--size 256] [--client aio-pika|pika] [--window 1000] [--prefetch 1000]
                              [--fsync always] [--target chute|rabbitmq|both] [--runs 1] [--json] [--url amqp://...]

`--workload p2p`: producers publish `--messages` bodies of `--size` bytes (shared between `--producers`
processes) to one durable queue through the default exchange; `--consumers` processes consume it. `--workload
fanout`: they publish to a durable fanout exchange bound to 4 durable queues, and each queue has `--consumers`
processes of its own. Producers are in confirm mode: with `--client aio-pika` up to `--window` publishes await
their confirms at once (the way a throughput-minded client publishes); with `--client pika` a BlockingConnection
publishes one message and waits for its confirm before the next (the way most pika code is written). Consumers
(aio-pika) consume with prefetch `--prefetch` and ack each message. Every client is its own process (clients are
imported before the common start), so with several of them the server, not one Python process, can be the limit.

The figure is messages/s end to end: messages published divided by the time from the common start to the last
ack of their last delivery (fan-out: deliveries/s is 4 times that); each run also reports the publish rate, the
1-minute load average at its end, and the CPU seconds per 1,000 messages of the server, of all producers and of
all consumers (on a shared machine, where the CPU goes says more than a noisy rate), and the rate the server's
CPU per message would allow if it had one core to itself (`server_bound_msg_per_s`: its limit, not the clients').

The server runs as a subprocess on 127.0.0.1: `chute serve` on a fresh data directory (fsync `always` unless
--fsync says otherwise; PYTHONPATH picks which Chute, e.g. an older checkout's src for an A/B), or Debian's
`rabbitmq-server` (`--target rabbitmq`, if installed; its own defaults, so its confirms come after its own fsync
policy for durable queues and persistent messages). Nothing here is a test: figures go to BENCHMARKS.md with the
machine they were measured on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time

QUEUE = "bench-p2p"
FANOUT = "bench-fanout"  # the exchange, and its queues bench-fanout-0 ... -3
FANOUT_QUEUES = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen | None, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout_s:g} s")


class ChuteServer:
    def __init__(self, fsync: str) -> None:
        self.data_dir = tempfile.mkdtemp(prefix="chute-bench-amqp-")
        self.port = free_port()
        command = [sys.executable, "-m", "chute.cli", "serve", "--data-dir", self.data_dir, "--port", "0",
                   "--http-port", "-1", "--amqp-port", str(self.port), "--fsync", fsync,
                   "--log-level", "warning"]  # fmt: skip
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        wait_for_port(self.port, self.process)
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def cpu_s(self) -> float:
        return _cpu_of(self.process.pid)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        shutil.rmtree(self.data_dir, ignore_errors=True)


class RabbitServer:
    """Debian's rabbitmq-server on a free port, with its data in a temporary directory."""

    def __init__(self) -> None:
        binary = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # runs as us (/usr/sbin's switches to the rabbitmq user)
        if not os.path.exists(binary):
            raise RuntimeError("rabbitmq-server is not installed (apt-get install -y rabbitmq-server)")
        self.base = tempfile.mkdtemp(prefix="rabbit-bench-")
        self.epmd_before = set(_pids_of("epmd"))  # RabbitMQ starts Erlang's port mapper if none runs
        self.port = free_port()
        dist = free_port()
        env = dict(os.environ, RABBITMQ_NODE_PORT=str(self.port), RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
                   RABBITMQ_DIST_PORT=str(dist), RABBITMQ_MNESIA_BASE=f"{self.base}/mnesia",
                   RABBITMQ_LOG_BASE=f"{self.base}/log", RABBITMQ_NODENAME=f"bench{self.port}@localhost",
                   RABBITMQ_PID_FILE=f"{self.base}/pid", HOME=self.base)  # fmt: skip
        self.process = subprocess.Popen([binary], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)  # fmt: skip
        wait_for_port(self.port, self.process, 120)
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def cpu_s(self) -> float:
        total = 0.0
        for pid in _descendants(self.process.pid):
            total += _cpu_of(pid)
        return total

    def stop(self) -> None:
        os.killpg(self.process.pid, 15)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
        for pid in set(_pids_of("epmd")) - self.epmd_before:  # the port mapper this server started
            with contextlib.suppress(OSError):
                os.kill(pid, 15)
        shutil.rmtree(self.base, ignore_errors=True)


def _cpu_of(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def _pids_of(program: str) -> list[int]:
    """Processes running `program` (by /proc/PID/comm)."""
    found = []
    for each in os.listdir("/proc"):
        if each.isdigit():
            try:
                with open(f"/proc/{each}/comm") as file:
                    if file.read().strip() == program:
                        found.append(int(each))
            except OSError:
                continue
    return found


def _descendants(pid: int) -> list[int]:
    found = [pid]
    for each in os.listdir("/proc"):
        if each.isdigit():
            try:
                with open(f"/proc/{each}/stat") as file:
                    parent = int(file.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                continue
            if parent in found:
                found.append(int(each))
    return found


# -- clients --------------------------------------------------------------------------------------------------


def _queues(workload: str) -> list[str]:
    return [QUEUE] if workload == "p2p" else [f"{FANOUT}-{i}" for i in range(FANOUT_QUEUES)]


def producer(url: str, workload: str, messages: int, size: int, client: str, window: int, start, results) -> None:
    body = b"x" * size
    exchange, key = ("", QUEUE) if workload == "p2p" else (FANOUT, "")
    import aio_pika  # noqa: F401  (imported before the start: its CPU is not the benchmark's)
    import pika

    start.wait()
    began, cpu = time.perf_counter(), time.process_time()
    if client == "pika":
        connection = pika.BlockingConnection(pika.URLParameters(url))
        channel = connection.channel()
        channel.confirm_delivery()
        properties = pika.BasicProperties(delivery_mode=2)
        for _ in range(messages):
            channel.basic_publish(exchange, key, body, properties)
        connection.close()
    else:
        asyncio.run(_aio_produce(url, exchange, key, messages, body, window))
    elapsed = time.perf_counter() - began
    results.put(("producer", elapsed, time.process_time() - cpu))


async def _aio_produce(url: str, exchange_name: str, key: str, messages: int, body: bytes, window: int) -> None:
    import aio_pika

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = channel.default_exchange if not exchange_name else await channel.get_exchange(exchange_name)
        gate = asyncio.Semaphore(window)

        async def one() -> None:
            try:
                await exchange.publish(aio_pika.Message(body, delivery_mode=2), routing_key=key)
            finally:
                gate.release()

        tasks = []
        for _ in range(messages):
            await gate.acquire()
            tasks.append(asyncio.ensure_future(one()))
        await asyncio.gather(*tasks)


def consumer(url: str, queue: str, slot: int, prefetch: int, counts, last_ack, start, stop, results) -> None:
    """Consume `queue` and ack each message until `stop` is set; counts[slot] and last_ack[slot] (monotonic
    time of the latest ack) tell the parent how far it got."""
    import aio_pika  # noqa: F401  (imported before the start: its CPU is not the benchmark's)

    start.wait()
    began, cpu = time.perf_counter(), time.process_time()
    asyncio.run(_aio_consume(url, queue, slot, prefetch, counts, last_ack, stop))
    results.put(("consumer", time.perf_counter() - began, time.process_time() - cpu))


async def _aio_consume(url: str, queue_name: str, slot: int, prefetch: int, counts, last_ack, stop) -> None:
    import aio_pika

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.declare_queue(queue_name, durable=True)
        count = 0

        async def on_message(message) -> None:
            nonlocal count
            await message.ack()
            count += 1
            counts[slot] = count
            last_ack[slot] = time.monotonic()

        await queue.consume(on_message)
        while not stop.is_set():
            await asyncio.sleep(0.05)


async def _declare(url: str, workload: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        if workload == "fanout":
            exchange = await channel.declare_exchange(FANOUT, aio_pika.ExchangeType.FANOUT, durable=True)
        for name in _queues(workload):
            await channel.declare_queue(name, durable=True)
            await channel.queue_delete(name)
            queue = await channel.declare_queue(name, durable=True)
            if workload == "fanout":
                await queue.bind(exchange)


class External:
    """A server someone else runs (`--url`): e.g. under a profiler."""

    def __init__(self, url: str) -> None:
        self.url = url

    def cpu_s(self) -> float:
        return 0.0

    def stop(self) -> None:
        pass


def _server(target: str, args):
    if args.url:
        return External(args.url)
    return ChuteServer(args.fsync) if target == "chute" else RabbitServer()


def run_once(target: str, args) -> dict:
    server = _server(target, args)
    queues = _queues(args.workload)
    consumers = [queue for queue in queues for _ in range(args.consumers)]
    expected = args.messages * len(queues)  # deliveries: each message once per queue
    try:
        asyncio.run(_declare(server.url, args.workload))
        ctx = mp.get_context("spawn")
        start, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
        counts = ctx.Array("q", len(consumers), lock=False)
        last_ack = ctx.Array("d", len(consumers), lock=False)
        shares = [args.messages // args.producers + (i < args.messages % args.producers) for i in range(args.producers)]
        procs = [ctx.Process(target=consumer, args=(server.url, queue, slot, args.prefetch, counts, last_ack, start,
                                                    stop, results)) for slot, queue in enumerate(consumers)]
        procs += [ctx.Process(target=producer, args=(server.url, args.workload, share, args.size, args.client,
                                                     args.window, start, results)) for share in shares]  # fmt: skip
        for each in procs:
            each.start()
        time.sleep(1.0 + 0.2 * len(procs))  # the processes have imported their client
        cpu_before = server.cpu_s()
        began = time.monotonic()
        start.set()
        deadline = began + args.max_seconds
        while sum(counts) < expected:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {sum(counts)} of {expected} deliveries acked in {args.max_seconds:g} s")
            time.sleep(0.05)
        elapsed = max(last_ack) - began
        server_cpu = server.cpu_s() - cpu_before
        stop.set()
        got = [results.get(timeout=60) for _ in procs]
        for each in procs:
            each.join(30)
    finally:
        server.stop()
    n = args.messages
    publish_s = max(e for role, e, _ in got if role == "producer")
    cpu = {role: sum(c for r, _, c in got if r == role) for role in ("producer", "consumer")}
    return {
        "target": target, "workload": args.workload, "client": args.client, "producers": args.producers,
        "consumers": len(consumers), "messages": n, "deliveries": expected, "size": args.size, "fsync": args.fsync,
        "msg_per_s": round(n / elapsed), "deliveries_per_s": round(expected / elapsed),
        "publish_msg_per_s": round(n / publish_s),
        "server_bound_msg_per_s": round(n / server_cpu) if server_cpu else None,  # if the server had a core to itself
        "cpu_ms_per_1000": {"server": round(server_cpu / n * 1e6, 1), "producers": round(cpu["producer"] / n * 1e6, 1),
                            "consumers": round(cpu["consumer"] / n * 1e6, 1)},
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workload", choices=["p2p", "fanout"], default="p2p")
    parser.add_argument("--producers", type=int, default=1, help="producer processes (the messages are shared)")
    parser.add_argument("--consumers", type=int, default=1, help="consumer processes per queue")
    parser.add_argument("--client", choices=["aio-pika", "pika"], default="aio-pika")
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--prefetch", type=int, default=1000)
    parser.add_argument("--fsync", choices=["always", "interval", "never"], default="always")
    parser.add_argument("--target", choices=["chute", "rabbitmq", "both"], default="chute")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=600)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--url", help="an AMQP URL of a server already running (its CPU is then not measured)")
    args = parser.parse_args()
    if args.producers < 1 or args.consumers < 1 or args.messages < 1:
        parser.error("--producers, --consumers and --messages must be at least 1")
    targets = ["chute", "rabbitmq"] if args.target == "both" else [args.target]
    print(f"# {platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}", file=sys.stderr)
    for _ in range(args.runs):
        for target in targets:
            result = run_once(target, args)
            print(json.dumps(result) if args.json else
                  f"{target:8} {args.workload:6} {args.client:8} P{args.producers} C{result['consumers']} "
                  f"{result['msg_per_s']:>7} msg/s end to end ({result['deliveries_per_s']} deliveries/s; "
                  f"server alone on a core: {result['server_bound_msg_per_s']} msg/s; load {result['load_avg_1m']}) "
                  f"(publish {result['publish_msg_per_s']} msg/s); CPU ms per 1,000 msgs: "
                  f"{result['cpu_ms_per_1000']}")  # fmt: skip


if __name__ == "__main__":
    main()
