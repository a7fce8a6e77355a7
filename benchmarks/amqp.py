"""The AMQP 0-9-1 benchmark (issue 15, Performance): point-to-point with publisher confirms and manual acks.

    python -m benchmarks.amqp [--messages 20000] [--size 256] [--client aio-pika|pika] [--window 1000]
                              [--prefetch 1000] [--fsync always] [--target chute|rabbitmq|both] [--runs 1] [--json]
                              [--url amqp://...]

A producer process publishes `--messages` bodies of `--size` bytes to one durable queue through the default
exchange, in confirm mode: with `--client aio-pika` up to `--window` publishes await their confirms at once (the
way a throughput-minded client publishes); with `--client pika` a BlockingConnection publishes one message and
waits for its confirm before the next (the way most pika code is written). A consumer process (aio-pika) consumes
with prefetch `--prefetch` and acks each message. The figure is messages/s end to end: messages acked by the
consumer divided by the time from the common start to the last ack; each run also reports the publish rate and
the CPU seconds per 1,000 messages of the server, the producer and the consumer (on a shared machine, where the
CPU goes says more than a noisy rate).

The server runs as a subprocess on 127.0.0.1: `chute serve` on a fresh data directory (fsync `always` unless
--fsync says otherwise), or Debian's `rabbitmq-server` (`--target rabbitmq`, if installed; its own defaults, so
its confirms come after its own fsync policy for durable queues and persistent messages). Nothing here is a test:
figures go to BENCHMARKS.md with the machine they were measured on.
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


def producer(url: str, messages: int, size: int, client: str, window: int, start, results) -> None:
    body = b"x" * size
    start.wait()
    began = time.perf_counter()
    if client == "pika":
        import pika

        connection = pika.BlockingConnection(pika.URLParameters(url))
        channel = connection.channel()
        channel.confirm_delivery()
        properties = pika.BasicProperties(delivery_mode=2)
        for _ in range(messages):
            channel.basic_publish("", QUEUE, body, properties)
        connection.close()
    else:
        asyncio.run(_aio_produce(url, messages, body, window))
    elapsed = time.perf_counter() - began
    results.put(("producer", elapsed, time.process_time()))


async def _aio_produce(url: str, messages: int, body: bytes, window: int) -> None:
    import aio_pika

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = channel.default_exchange
        gate = asyncio.Semaphore(window)

        async def one() -> None:
            try:
                await exchange.publish(aio_pika.Message(body, delivery_mode=2), routing_key=QUEUE)
            finally:
                gate.release()

        tasks = []
        for _ in range(messages):
            await gate.acquire()
            tasks.append(asyncio.ensure_future(one()))
        await asyncio.gather(*tasks)


def consumer(url: str, messages: int, prefetch: int, start, results) -> None:
    start.wait()
    began = time.perf_counter()
    asyncio.run(_aio_consume(url, messages, prefetch))
    results.put(("consumer", time.perf_counter() - began, time.process_time()))


async def _aio_consume(url: str, messages: int, prefetch: int) -> None:
    import aio_pika

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.declare_queue(QUEUE, durable=True)
        done = asyncio.get_running_loop().create_future()
        count = 0

        async def on_message(message) -> None:
            nonlocal count
            await message.ack()
            count += 1
            if count >= messages and not done.done():
                done.set_result(None)

        await queue.consume(on_message)
        await done


async def _declare(url: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(QUEUE, durable=True)
        await channel.queue_delete(QUEUE)
        await channel.declare_queue(QUEUE, durable=True)


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
    try:
        asyncio.run(_declare(server.url))
        cpu_before = server.cpu_s()
        ctx = mp.get_context("spawn")
        start, results = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=consumer, args=(server.url, args.messages, args.prefetch, start, results)),
                 ctx.Process(target=producer, args=(server.url, args.messages, args.size, args.client, args.window,
                                                    start, results))]  # fmt: skip
        for each in procs:
            each.start()
        time.sleep(1.0)  # both processes have imported their client
        start.set()
        got = {}
        for _ in procs:
            role, elapsed, cpu = results.get(timeout=args.max_seconds)
            got[role] = (elapsed, cpu)
        for each in procs:
            each.join(30)
        server_cpu = server.cpu_s() - cpu_before
    finally:
        server.stop()
    n = args.messages
    return {
        "target": target, "client": args.client, "messages": n, "size": args.size, "fsync": args.fsync,
        "msg_per_s": round(n / got["consumer"][0]), "publish_msg_per_s": round(n / got["producer"][0]),
        "cpu_ms_per_1000": {"server": round(server_cpu / n * 1e6, 1),
                            "producer": round(got["producer"][1] / n * 1e6, 1),
                            "consumer": round(got["consumer"][1] / n * 1e6, 1)},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=256)
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
    targets = ["chute", "rabbitmq"] if args.target == "both" else [args.target]
    print(f"# {platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}", file=sys.stderr)
    for _ in range(args.runs):
        for target in targets:
            result = run_once(target, args)
            print(json.dumps(result) if args.json else
                  f"{target:8} {args.client:8} {result['msg_per_s']:>7} msg/s end to end "
                  f"(publish {result['publish_msg_per_s']} msg/s); CPU ms per 1,000 msgs: "
                  f"{result['cpu_ms_per_1000']}")  # fmt: skip


if __name__ == "__main__":
    main()
