"""The PostgreSQL store on one node (issue 14's foundation): how many messages per second, at what CPU cost.

    python -m benchmarks.postgres_store [--url postgresql://...] [--messages 100000] [--batch 100]
                                        [--inflight 8] [--body 256] [--json]

Without --url it starts a private PostgreSQL (Debian's binaries, a temporary directory, a free loopback port,
fsync on, synchronous_commit on: durable like a production server) and deletes it afterwards. Two workloads:
- `store`: `PostgresStore.append` of batches of `--batch` records (`--inflight` batches awaited at once, like
  that many publishers), each confirmed when its group commit has committed;
- `p2p`: `chute.Broker` on the store, end to end: producers publish batches of `--batch`, a consumer receives
  batches and acks them (acks are group-committed too).
CPU: seconds of this process and of every PostgreSQL process (from /proc), per message. Nothing here is a test:
figures go to BENCHMARKS.md with the machine they were measured on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from collections import deque
from pathlib import Path

from benchmarks.inprocess import p2p_round
from chute import Broker
from chute.storage.postgres import PostgresStore


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of `pids` so far (processes that are gone count as 0)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def _postgres_pids() -> list[int]:
    """Every process named postgres on this machine (the private server's; the benchmark's own server only)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "postgres":
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


class Meter:
    """CPU of this process and of PostgreSQL over a measured interval."""

    def __enter__(self) -> Meter:
        self.pids = _postgres_pids()
        self.started = time.perf_counter()
        self.own = time.process_time()
        self.postgres = _cpu_seconds(self.pids)
        return self

    def __exit__(self, *exc) -> None:
        self.pids = sorted(set(self.pids) | set(_postgres_pids()))
        self.seconds = time.perf_counter() - self.started
        self.own = time.process_time() - self.own
        self.postgres = _cpu_seconds(self.pids) - self.postgres

    def report(self, messages: int) -> dict:
        return {
            "seconds": round(self.seconds, 3),
            "messages_per_s": round(messages / self.seconds),
            "cpu_us_per_message_chute": round(self.own / messages * 1e6, 1),
            "cpu_us_per_message_postgres": round(self.postgres / messages * 1e6, 1),
        }


async def store_appends(url: str, messages: int, batch: int, inflight: int, body: bytes) -> dict:
    store = PostgresStore(url, stream=f"bench-store-{os.getpid()}")
    await store.open()
    records = [(1, body)] * batch
    batches = messages // batch
    with Meter() as meter:
        pending: deque = deque()  # one token per batch (batches of one group share their group's token)
        for _ in range(batches):
            _, token = store.append(records)
            pending.append(token)
            if len(pending) >= inflight:
                await pending.popleft()  # like `inflight` publishers, each waiting for its own confirm
        for token in pending:
            await token
    stats = store.stats()
    await store.close()
    return {
        "workload": "store",
        **meter.report(batches * batch),
        "group_commits": stats.fsyncs,
        "messages_per_commit": round(batches * batch / max(1, stats.fsyncs), 1),
        "commit_ms_mean": round(stats.fsync_seconds_total / max(1, stats.fsyncs) * 1000, 2),
    }


async def p2p(url: str, messages: int, batch: int, inflight: int, body: bytes) -> dict:
    async with Broker(store=PostgresStore(url, stream=f"bench-p2p-{os.getpid()}")) as broker:
        with Meter() as meter:
            done = await p2p_round(broker, messages, batch, inflight, body)
        stats = broker.store.stats()
    return {
        "workload": "p2p",
        **meter.report(done),
        "group_commits": stats.fsyncs,
        "records_per_commit": round(2 * done / max(1, stats.fsyncs), 1),
    }


async def server_facts(url: str) -> dict:
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        facts = {name: await connection.fetchval(f"SHOW {name}") for name in ("fsync", "synchronous_commit")}
        facts["server_version"] = await connection.fetchval("SHOW server_version")
    finally:
        await connection.close()
    return facts


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0]
    return f"{platform.machine()} {model}, {os.cpu_count()} cores, load {load:.1f}, Python {platform.python_version()}"


async def run(url: str, args) -> list[dict]:
    body = b"x" * args.body
    results = []
    for workload in (store_appends, p2p):
        result = await workload(url, args.messages, args.batch, args.inflight, body)
        result.update(batch=args.batch, inflight_batches=args.inflight, body_bytes=args.body)
        results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.postgres_store", description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an existing PostgreSQL (default: start a private, durable one)")
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--inflight", type=int, default=8)
    parser.add_argument("--body", type=int, default=256)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    server = None
    url = args.url
    if url is None:
        from tests.postgres.server import PostgresServer

        server = PostgresServer(durable=True).start()
        url = server.url
    try:
        facts = asyncio.run(server_facts(url))
        results = asyncio.run(run(url, args))
    finally:
        if server is not None:
            server.destroy()
    report = {"machine": machine(), "postgres": facts, "results": results}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"machine: {report['machine']}")
    print(
        f"PostgreSQL {facts['server_version']}: fsync={facts['fsync']} synchronous_commit={facts['synchronous_commit']}"
    )
    for r in results:
        extra = {k: v for k, v in r.items() if k not in ("workload", "messages_per_s")}
        print(f"{r['workload']:>6}: {r['messages_per_s']:>8,} msg/s  {extra}")


if __name__ == "__main__":
    main()
