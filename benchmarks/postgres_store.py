"""The PostgreSQL store on one node (issue 14's foundation): how many messages per second, at what CPU cost.

    python -m benchmarks.postgres_store [--url postgresql://...] [--messages 100000] [--batch 100]
                                        [--inflight 8] [--body 256] [--json]

Without --url it starts a private PostgreSQL (Debian's binaries, a temporary directory, a free loopback port,
fsync on, synchronous_commit on: durable like a production server) and deletes it afterwards. Two workloads:
- `store`: `PostgresStore.append` of batches of `--batch` records (`--inflight` batches awaited at once, like
  that many publishers), each confirmed when its group commit has committed;
- `p2p`: `chute.Broker` on the store, end to end: producers publish batches of `--batch`, a consumer receives
  batches and acks them (acks are group-committed too);
- `skiplocked`: the baseline users would write themselves on the same server, a table used as a queue:
  `--inflight` producers inserting a batch per statement, `--inflight` consumers taking a batch with
  `SELECT ... FOR UPDATE SKIP LOCKED` and deleting it in the same transaction; `skiplocked-1` the same one message
  per statement and transaction, as most hand-written job queues work (a tenth of `--messages`).
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


SKIP_LOCKED_TABLE = f"bench_skip_locked_{os.getpid()}"  # one per run: runs may share a server


async def skip_locked(url: str, messages: int, batch: int, inflight: int, body: bytes) -> dict:
    """The queue users write themselves on PostgreSQL, given every advantage this benchmark gives Chute: a table,
    `inflight` producers each inserting a batch of `batch` rows per statement (one commit per batch), and `inflight`
    consumers each taking a batch at a time with `FOR UPDATE SKIP LOCKED` and deleting it in the same transaction
    once handled (at-least-once: a consumer that dies before its commit leaves the rows to the others)."""
    import asyncpg

    pool = await asyncpg.create_pool(url, min_size=2 * inflight, max_size=2 * inflight)
    try:
        await pool.execute(f"DROP TABLE IF EXISTS {SKIP_LOCKED_TABLE}")
        await pool.execute(f"CREATE TABLE {SKIP_LOCKED_TABLE} (id bigserial PRIMARY KEY, payload bytea NOT NULL)")
        batches = messages // batch
        next_batch = iter(range(batches))
        payloads = [body] * batch
        taken = 0

        async def producer() -> None:
            async with pool.acquire() as connection:
                insert = await connection.prepare(
                    f"INSERT INTO {SKIP_LOCKED_TABLE} (payload) SELECT unnest($1::bytea[])"
                )
                for _ in next_batch:
                    await insert.fetch(payloads)

        async def consumer() -> None:
            nonlocal taken
            async with pool.acquire() as connection:
                take = await connection.prepare(
                    f"SELECT id, payload FROM {SKIP_LOCKED_TABLE} ORDER BY id FOR UPDATE SKIP LOCKED LIMIT {batch}"
                )
                delete = await connection.prepare(f"DELETE FROM {SKIP_LOCKED_TABLE} WHERE id = ANY($1::bigint[])")
                while taken < batches * batch:
                    async with connection.transaction():
                        rows = await take.fetch()
                        if rows:
                            await delete.fetch([row[0] for row in rows])
                    if rows:
                        taken += len(rows)
                    else:
                        await asyncio.sleep(0.001)  # nothing to take yet: the producers are behind

        with Meter() as meter:
            await asyncio.gather(*(consumer() for _ in range(inflight)), *(producer() for _ in range(inflight)))
        await pool.execute(f"DROP TABLE {SKIP_LOCKED_TABLE}")
    finally:
        await pool.close()
    return {"workload": "skiplocked" if batch > 1 else "skiplocked-1", **meter.report(taken)}


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
    for workload in (store_appends, p2p, skip_locked):
        result = await workload(url, args.messages, args.batch, args.inflight, body)
        result.update(batch=args.batch, inflight_batches=args.inflight, body_bytes=args.body)
        results.append(result)
    # the same table one message at a time (an insert per message, a take per message), as most hand-written job
    # queues on PostgreSQL work; a tenth of the messages, since it is that much slower
    result = await skip_locked(url, max(args.messages // 10, args.inflight), 1, args.inflight, body)
    result.update(batch=1, inflight_batches=args.inflight, body_bytes=args.body)
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
