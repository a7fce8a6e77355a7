"""In-process benchmarks of the broker and its file store (issue: "Chute core").

    python -m benchmarks.inprocess throughput [--messages N] [--batch 100] [--inflight 4] [--fsync always]
    python -m benchmarks.inprocess backlog    [--messages 1000000]
    python -m benchmarks.inprocess fanout     [--messages 20000] [--subscriptions 8]
    python -m benchmarks.inprocess all        (each with its defaults; --json for machine-readable output)

Every run uses a fresh temporary data directory on the same disk as the current directory (override with
--dir), 256-byte bodies, one asyncio loop (uvloop when installed) and fsync `always` unless told otherwise.
Nothing here is a test: figures go to BENCHMARKS.md with the machine they were measured on.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from chute import Broker, Publish

BODY = b"x" * 256


def rss_mb() -> float:
    """Current resident set size of this process, in MB (from /proc; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


async def p2p_round(broker: Broker, messages: int, batch: int, inflight: int, body: bytes = BODY) -> int:
    """Publish + receive + ack `messages` bodies (rounded down to whole batches) through the queue "bench" of
    `broker`, with `inflight` producers, each with one batch in flight, and a consumer that acks without waiting for
    its previous acks (at most `inflight` pending); return how many messages went through."""
    await broker.create_queue("bench", lease_s=300)
    batches = messages // batch
    next_batch = iter(range(batches))

    async def producer() -> None:
        chunk = [Publish(body=body) for _ in range(batch)]
        for _ in next_batch:
            await broker.publish_batch("bench", chunk)

    async def consumer() -> None:
        done, acks = 0, set()
        while done < batches * batch:
            deliveries = await broker.receive("bench", batch, wait_s=1.0)
            if deliveries:
                acks.add(asyncio.ensure_future(broker.ack("bench", [d.receipt for d in deliveries])))
                done += len(deliveries)
            if len(acks) >= inflight:
                _, acks = await asyncio.wait(acks, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.gather(*acks)

    await asyncio.gather(consumer(), *(producer() for _ in range(inflight)))
    return batches * batch


async def throughput(data_dir: str, messages: int, batch: int, inflight: int, fsync: str) -> dict:
    """Publish + receive + ack `messages` bodies in batches; producers keep `inflight` batches in flight."""
    async with Broker(data_dir, fsync=fsync) as broker:
        start = time.perf_counter()
        done = await p2p_round(broker, messages, batch, inflight)
        elapsed = time.perf_counter() - start
        stats = broker.store.stats()
        return {
            "workload": "throughput",
            "messages": done,
            "batch": batch,
            "inflight_batches": inflight,
            "fsync": fsync,
            "seconds": round(elapsed, 3),
            "messages_per_s": round(done / elapsed),
            "fsyncs": stats.fsyncs,
            "messages_per_fsync": round(2 * done / max(1, stats.fsyncs), 1),
        }


async def backlog_fill(data_dir: str, messages: int, crash: bool = False) -> dict:
    """Backlog `messages` bodies through one broker; report the fill time and the RSS with the backlog held."""
    base = rss_mb()
    async with Broker(data_dir) as broker:
        await broker.create_queue("backlog")
        chunk = [Publish(body=BODY) for _ in range(1000)]
        start = time.perf_counter()
        pending = set()
        for _ in range(messages // 1000):
            pending.add(asyncio.ensure_future(broker.publish_batch("backlog", chunk)))
            if len(pending) >= 8:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.gather(*pending)
        fill_s = time.perf_counter() - start
        gc.collect()
        result = {
            "fill_seconds": round(fill_s, 2),
            "rss_mb_empty_broker": round(base, 1),
            "rss_mb_backlogged": round(rss_mb(), 1),
            "bytes_on_disk": broker.store.stats().bytes_on_disk,
        }
        if crash:  # die like a killed process: no close, no final checkpoint
            print(json.dumps(result), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return result


async def backlog_restart(data_dir: str, crashed: bool) -> dict:
    """Open a backlogged directory in a fresh process: time to serving, RSS, and a first delivery."""
    start = time.perf_counter()
    broker = await Broker(data_dir).start()
    restart_s = time.perf_counter() - start
    gc.collect()
    result = {
        "restart_kind": "after SIGKILL" if crashed else "after clean close",
        "restart_to_serving_s": round(restart_s, 2),
        "records_replayed": broker.recovery.records,
        "depth_after_restart": broker.queue_stats("backlog").ready,
        "rss_mb_after_restart": round(rss_mb(), 1),
    }
    [first] = await broker.receive("backlog")
    result["first_body_ok"] = first.body == BODY
    await broker.close()
    return result


def backlog(data_dir: str, messages: int) -> dict:
    """Fill in one process, then restart in fresh processes (clean close, and after a SIGKILL mid-fill)."""
    result = {"workload": "backlog", "messages": messages}
    result.update(_in_subprocess("backlog-fill", data_dir, messages))
    result["clean"] = _in_subprocess("backlog-restart", data_dir, 0)
    crashed_dir = os.path.join(data_dir, "crashed")
    _in_subprocess("backlog-fill", crashed_dir, messages, "--crash")
    result["crashed"] = _in_subprocess("backlog-restart", crashed_dir, 0)
    return result


def _in_subprocess(step: str, data_dir: str, messages: int, *flags: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.inprocess", step, "--dir", data_dir, "--messages", str(messages), *flags],
        capture_output=True, text=True, check="--crash" not in flags,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )  # fmt: skip
    return json.loads(out.stdout)


async def fanout(data_dir: str, messages: int, subscriptions: int) -> dict:
    """Bytes written per published message: a topic with N subscriptions vs a single queue."""

    async def bytes_per_message(path: str, subs: int | None) -> float:
        async with Broker(path) as broker:
            if subs is None:
                await broker.create_queue("q")
                dest = "q"
            else:
                await broker.create_topic("t")
                for i in range(subs):
                    await broker.create_queue(f"q{i}")
                    await broker.subscribe("t", ">", f"q{i}")
                dest = "t"
            before = broker.store.stats().bytes_written
            chunk = [Publish(body=BODY) for _ in range(100)]
            for _ in range(messages // 100):
                await broker.publish_batch(dest, chunk)
            return (broker.store.stats().bytes_written - before) / messages

    single = await bytes_per_message(os.path.join(data_dir, "single"), None)
    fanned = await bytes_per_message(os.path.join(data_dir, "fanout"), subscriptions)
    return {
        "workload": "fanout",
        "messages": messages,
        "subscriptions": subscriptions,
        "bytes_per_message_single_queue": round(single, 1),
        "bytes_per_message_topic": round(fanned, 1),
        "ratio": round(fanned / single, 3),
    }


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def _install_uvloop() -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inprocess", description=__doc__.splitlines()[0])
    parser.add_argument(
        "workload", choices=["throughput", "backlog", "fanout", "all", "backlog-fill", "backlog-restart"]
    )
    parser.add_argument("--messages", type=int)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--inflight", type=int, default=4)
    parser.add_argument("--subscriptions", type=int, default=8)
    parser.add_argument("--fsync", default="always", choices=["always", "interval", "never"])
    parser.add_argument("--dir", default=".", help="where to make the temporary data directory")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--crash", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    _install_uvloop()
    if args.workload in ("backlog-fill", "backlog-restart"):  # one step of `backlog`, in its own process
        _install_uvloop()
        if args.workload == "backlog-fill":
            print(json.dumps(asyncio.run(backlog_fill(args.dir, args.messages, crash=args.crash))))
        else:
            print(json.dumps(asyncio.run(backlog_restart(args.dir, crashed=args.dir.endswith("crashed")))))
        return
    workloads = ["throughput", "fanout", "backlog"] if args.workload == "all" else [args.workload]
    results = []
    for workload in workloads:
        data_dir = tempfile.mkdtemp(prefix="chute-bench-", dir=args.dir)
        try:
            if workload == "throughput":
                coro = throughput(data_dir, args.messages or 200_000, args.batch, args.inflight, args.fsync)
            elif workload == "backlog":
                results.append(backlog(data_dir, args.messages or 1_000_000))
                continue
            else:
                coro = fanout(data_dir, args.messages or 20_000, args.subscriptions)
            results.append(asyncio.run(coro))
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)
    if args.json:
        print(json.dumps({"machine": machine(), "results": results}, indent=2))
    else:
        print(f"machine: {machine()}")
        for result in results:
            print("  " + ", ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
