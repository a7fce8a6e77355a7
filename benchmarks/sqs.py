"""The SQS API benchmark (issue "Chute speaks the Amazon SQS API", Performance): boto3 end to end.

    python -m benchmarks.sqs [--target chute|moto|both] [--messages 20000] [--max-seconds 60] [--size 256]
                             [--threads 4] [--client boto3|boto3-lean|raw] [--runs 1] [--fsync always]
                             [--json] [--profile FILE]

One producer process sends `--messages` bodies of `--size` bytes with SendMessageBatch (10 per call); one
consumer process receives them with ReceiveMessage (10 per call, WaitTimeSeconds 1) and deletes them with
DeleteMessageBatch. Each process runs `--threads` threads, each with its own boto3 client, so that one call's
network and fsync wait overlaps another's work. `--client boto3-lean` makes those clients unsigned and without
parameter validation (docs/sqs-clients.md, "Speed"); `--client raw` replaces boto3 with as many keep-alive HTTP
connections in one event loop per process, sending the same JSON bodies (unsigned), to show what the server does
when the client costs next to nothing. The figure is messages/s end to end: messages deleted by the
consumer divided by the time from the common start to the last delete. Each run also reports the CPU time per
message of the server, the producer and the consumer (on a shared 2-core machine, where the CPU goes says more
than a noisy rate).

The server runs as a subprocess on 127.0.0.1: `chute serve` on a fresh data directory (file store, fsync
`always` unless --fsync says otherwise), or `python -m moto.server` for comparison. With `--target both` the
runs are interleaved (chute, moto, chute, ...) because this kind of machine is noisy. Each run is bounded by
count and time (`--max-seconds` from the common start, after which a run reports what it did). The size can also
be set with $CHUTE_BENCH_SQS_SIZE. Nothing here is a test: figures go to BENCHMARKS.md with the machine they were
measured on.
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
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator

BATCH = 10
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the server did not answer {url} within {timeout_s} s")


@contextlib.contextmanager
def server(target: str, fsync: str) -> Iterator[tuple[str, int]]:
    """Run the server under test; yield its endpoint URL and pid."""
    port = free_port()
    data_dir = tempfile.mkdtemp(prefix="chute-bench-sqs-", dir=".")
    if target == "chute":
        command = [sys.executable, "-m", "chute", "serve", "--data-dir", data_dir, "--port", "0",
                   "--http-port", str(port), "--fsync", fsync, "--log-level", "warning"]  # fmt: skip
        probe = f"http://127.0.0.1:{port}/healthz"
    else:
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        probe = f"http://127.0.0.1:{port}/moto-api/"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_up(probe, process)
        yield f"http://127.0.0.1:{port}", process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        shutil.rmtree(data_dir, ignore_errors=True)


def client(endpoint: str, kind: str = "boto3"):
    """A boto3 SQS client: as most code makes one ("boto3"), or with request signing and parameter validation
    off ("boto3-lean"; signing off only works with auth off, see docs/sqs-clients.md)."""
    import boto3
    import botocore
    from botocore.config import Config

    lean = {"signature_version": botocore.UNSIGNED, "parameter_validation": False} if kind == "boto3-lean" else {}
    return boto3.client(
        "sqs", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="bench", aws_secret_access_key="bench",
        config=Config(retries={"max_attempts": 2}, max_pool_connections=4, **lean),
    )  # fmt: skip


class RawClient:
    """The same JSON-protocol requests boto3 sends (unsigned), over one keep-alive HTTP/1.1 connection, with none
    of boto3's per-call work: what the server can do when the client costs next to nothing."""

    def __init__(self, endpoint: str) -> None:
        self.host, self.port = endpoint.removeprefix("http://").rsplit(":", 1)
        self.reader = self.writer = None

    async def call(self, action: str, params: dict) -> dict:
        import msgspec

        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, int(self.port))
        body = msgspec.json.encode(params)
        head = (f"POST / HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nX-Amz-Target: AmazonSQS.{action}\r\n"
                f"Content-Type: application/x-amz-json-1.0\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
        self.writer.write(head.encode() + body)
        response = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in response.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        data = msgspec.json.decode(await self.reader.readexactly(length)) if length else {}
        if response[9:12] != b"200":
            raise RuntimeError(f"{action}: {response[:12].decode()} {data}")
        return data


def run_workers(kind: str, workers: int, endpoint: str, work) -> None:
    """Run `work(call)` `workers` times at once, each with its own client: boto3 clients in threads, or raw
    connections as tasks in one event loop. `call(action, params)` makes one SQS call and returns its result."""
    if kind != "raw":

        def thread(index: int) -> None:
            sqs = client(endpoint, kind)
            calls = {"SendMessageBatch": sqs.send_message_batch, "ReceiveMessage": sqs.receive_message,
                     "DeleteMessageBatch": sqs.delete_message_batch}  # fmt: skip
            asyncio.run(work(lambda action, params: _done(calls[action](**params))))

        threads = [threading.Thread(target=thread, args=(i,)) for i in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return

    async def main() -> None:
        await asyncio.gather(*(work(RawClient(endpoint).call) for _ in range(workers)))

    asyncio.run(main())


async def _done(value):
    return value


def producer(endpoint: str, queue_url: str, messages: int, size: int, args, start, out) -> None:
    body = "x" * size
    lock = threading.Lock()
    state = {"next": 0, "sent": 0, "errors": 0}
    entries = [{"Id": str(i), "MessageBody": body} for i in range(BATCH)]
    params = {"QueueUrl": queue_url, "Entries": entries}

    async def work(call) -> None:
        deadline_s = time.time() + args.max_seconds
        while time.time() < deadline_s:
            with lock:
                if state["next"] >= messages:
                    return
                state["next"] += BATCH
            result = await call("SendMessageBatch", params)
            with lock:
                state["sent"] += len(result.get("Successful", []))
                state["errors"] += len(result.get("Failed", []))

    start.wait()
    cpu_s = time.process_time()
    run_workers(args.client, args.threads, endpoint, work)
    out.put(("producer", state["sent"], state["errors"], time.time(), time.process_time() - cpu_s))


def consumer(endpoint: str, queue_url: str, messages: int, args, start, out) -> None:
    lock = threading.Lock()
    state = {"deleted": 0, "received": 0, "last": 0.0}
    receive = {"QueueUrl": queue_url, "MaxNumberOfMessages": BATCH, "WaitTimeSeconds": 1}

    async def work(call) -> None:
        deadline_s = time.time() + args.max_seconds
        while time.time() < deadline_s and state["received"] < messages:
            batch = (await call("ReceiveMessage", receive)).get("Messages", [])
            if not batch:
                continue
            with lock:
                state["received"] += len(batch)
            entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(batch)]
            result = await call("DeleteMessageBatch", {"QueueUrl": queue_url, "Entries": entries})
            with lock:
                state["deleted"] += len(result.get("Successful", []))
                state["last"] = time.time()

    start.wait()
    cpu_s = time.process_time()
    run_workers(args.client, args.threads, endpoint, work)
    out.put(("consumer", state["deleted"], state["received"], state["last"], time.process_time() - cpu_s))


def process_cpu_s(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from /proc (0 where there is no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def profiling(pid: int, path: str | None) -> Iterator[None]:
    """Sample the server with py-spy (folded stacks in `path`) while the block runs, when a path is given."""
    if not path:
        yield
        return
    spy = subprocess.Popen(["py-spy", "record", "-f", "raw", "-r", "200", "-o", path, "-p", str(pid)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)


def one_run(target: str, args: argparse.Namespace) -> dict:
    with server(target, args.fsync) as (endpoint, pid), profiling(pid, args.profile):
        queue_url = client(endpoint).create_queue(QueueName="bench", Attributes={"VisibilityTimeout": "120"})[
            "QueueUrl"
        ]
        ctx = mp.get_context("spawn")
        start, out = ctx.Event(), ctx.Queue()
        processes = [
            ctx.Process(target=producer, args=(endpoint, queue_url, args.messages, args.size, args, start, out)),
            ctx.Process(target=consumer, args=(endpoint, queue_url, args.messages, args, start, out)),
        ]  # fmt: skip
        for p in processes:
            p.start()
        time.sleep(3)  # let both import boto3 and build their clients before the clock starts
        server_cpu_s = process_cpu_s(pid)
        started = time.time()
        start.set()
        results = {}
        for _ in processes:
            role, *values = out.get(timeout=args.max_seconds + 120)
            results[role] = values
        server_cpu_s = process_cpu_s(pid) - server_cpu_s
        for p in processes:
            p.join(30)
        deleted, received, last, consumer_cpu_s = results["consumer"]
        sent, send_errors, producer_done, producer_cpu_s = results["producer"]
        elapsed = max(last - started, 1e-9)

        def per_message_ms(cpu_s: float, count: int) -> float:
            return round(1000 * cpu_s / max(count, 1), 3)

        return {
            "target": target, "client": args.client, "messages": args.messages, "size": args.size,
            "threads": args.threads,
            "fsync": args.fsync if target == "chute" else "n/a", "sent": sent, "send_errors": send_errors,
            "received": received, "deleted": deleted, "seconds": round(elapsed, 2),
            "msgs_per_s": round(deleted / elapsed), "producer_msgs_per_s": round(sent / (producer_done - started)),
            "cpu_ms_per_msg": {"server": per_message_ms(server_cpu_s, deleted),
                               "producer": per_message_ms(producer_cpu_s, sent),
                               "consumer": per_message_ms(consumer_cpu_s, deleted)},
        }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=["chute", "moto", "both"], default="chute")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--size", type=int, default=int(os.environ.get("CHUTE_BENCH_SQS_SIZE", "256")))
    parser.add_argument("--threads", type=int, default=4, help="boto3 threads (or raw connections) per process")
    parser.add_argument("--client", choices=["boto3", "boto3-lean", "raw"], default="boto3",
                        help="boto3 as most code makes it; boto3 unsigned without parameter validation; or raw "
                             "HTTP requests with the same bodies (what the server can do)")  # fmt: skip
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--fsync", choices=["always", "interval", "never"], default="always")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--profile", metavar="FILE", help="sample the server with py-spy into FILE (folded stacks)")
    args = parser.parse_args(argv)
    targets = ["chute", "moto"] if args.target == "both" else [args.target]
    if not args.json:
        print(f"# {platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs, "
              f"{args.messages} messages of {args.size} B, {args.client} client, {args.threads} threads or connections "
              "per process")  # fmt: skip
    for _ in range(args.runs):
        for target in targets:
            result = one_run(target, args)
            if args.json:
                print(json.dumps(result), flush=True)
            else:
                line = f"{target:6} {result['msgs_per_s']:>7} msg/s end to end  ({result['deleted']} deleted in "
                line += f"{result['seconds']} s; producer {result['producer_msgs_per_s']} msg/s; "
                line += "CPU ms per message: " + ", ".join(f"{k} {v}" for k, v in result["cpu_ms_per_msg"].items())
                line += ")"
                print(line, flush=True)


if __name__ == "__main__":
    main()
