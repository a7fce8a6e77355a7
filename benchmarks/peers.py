"""Chute side by side with Redis and NATS (issue 12, part 5): the same workloads against all three in one run, so
every figure is also a ratio measured on the same machine at the same time.

    apt-get install -y -q redis-server nats-server     # first step; the script does it when a binary is missing
    pip install -e '.[bench]'                           # redis with hiredis, nats-py
    python -m benchmarks.peers [--workload p2p --workload latency ...] [--peers redis,nats] [--messages N]
                               [--size 256] [--repeat K] [--rate 2000] [--duration 10]
                               [--backlog 100000,1000000] [--no-install] [--json] [--save FILE]

Servers, each a subprocess on 127.0.0.1 and a free port with its data in a fresh temporary directory, deleted
afterwards; every workload gets fresh servers, so one workload's leftovers never show in the next one's figures:
- Chute: `chute serve --fsync always` (chute.bench's BrokerProcess): a publish or ack is confirmed after fsync.
- Redis (`redis-server --appendonly yes --appendfsync always --save '' --dir <tmp>`): a write is in the AOF and
  fsynced before its reply; one fsync per event-loop turn (group commit), as Chute's.
- NATS (`nats-server -js -sd <tmp> -a 127.0.0.1 -p PORT`): JetStream confirms a publish once written to its file;
  nats-server 2.9 fsyncs every 2 minutes and cannot be told to sync each write, so NATS's durability here is
  weaker than the other two (it survives the process dying, not the machine).

The clients are the Python clients (chute.AsyncClient, redis-py asyncio, nats-py), all in this one process on
uvloop, sharing the machine with the server. Every system gets the same 256-byte bodies (`--size`) and the same
batching shape as far as its client allows: at most 2,000 unconfirmed publishes per producer, a producer at most
10,000 messages ahead of its consumers, a consumer with 2,000 messages prefetched, acks in batches of 500 with at
most 4 ack requests in flight (chute.bench's defaults):
- Chute: chute.bench's own workloads (`publish_nowait`, whose client batches publishes into frames; `consume`
  with prefetch; `ack` of a batch, confirmed after fsync).
- Redis: a stream per queue and a consumer group per subscription. Publishing is XADD in pipelines of 500, at most
  4 pipelines in flight (each on its own pooled connection, redis-py cannot overlap pipelines on one); consuming is
  XREADGROUP of up to 2,000 entries (they enter the group's pending list: the lease), then XACK of 500 ids per
  command, at most 4 in flight. XACK leaves the entry in the stream (no XDEL): Redis does less than Chute's ack,
  which deletes the message, so Redis's figure is its best case.
- NATS: a stream per queue (work-queue retention for point-to-point and latency, interest retention for fan-out,
  so a message goes once every consumer acked it, as with Chute) with durable pull consumers, explicit acks.
  Publishing is `js.publish_async` with at most 2,000 PubAcks outstanding; consuming keeps 2,000 messages requested
  in pull requests of 500 (as nats.go's Consume does; nats-py's fetch waits for a whole batch each time); each
  message is acked with `+ACK` (fire-and-forget in the protocol) and each batch of 500 acks is confirmed by a
  PING/PONG round trip, at most 4 in flight.

Workloads (`--workload`, repeatable; default all):
- `p2p`: one producer and one consumer on one queue: end to end msg/s (first publish to last ack confirmed), the
  CPU of the server and of this process meanwhile (% of one core), then publish-only msg/s on a second queue and
  the rate of draining that backlog. `--messages` (default 100,000).
- `fanout`: one topic / stream read by 4 durable subscriptions (Chute: a topic with 4 subscriptions, each to its
  queue; Redis: one stream, 4 consumer groups; NATS: one stream, 4 durable consumers), each consumer on its own
  connection: deliveries/s = messages x 4 / (first publish to last ack). `--messages` (default 25,000).
- `latency`: 2,000 msg/s (`--rate`) for 10 s (`--duration`), paced by a 1 ms loop that sends what is due (one
  pipeline per tick for Redis); each body starts with its send time; the consumer (prefetch 1,000, acks by 50)
  records receive - send. p50 / p99 / p99.9 / max in ms.
- `backlog`: the server's RSS when empty and with a backlog of 100,000 then 1,000,000 messages nobody consumes
  (`--backlog`); then the time to stop on SIGTERM and to serve again with the whole backlog (a restart that is
  timed from the spawn to the first answer showing every message: chute's queue_stats, Redis's XLEN, which says
  LOADING while the AOF replays, NATS's stream info), then the same after SIGKILL, and the RSS after that restart.

`--repeat K` runs everything K times, each time rotating which system goes first (this machine is noisy and
order matters). The table gives each system's median (and range), Chute's ratio to each peer (the median of the
per-repeat ratios: each measured side by side), the issue's target and whether each repeat met it. `--json`
prints everything, with the machine and the versions. Nothing here is a test: figures go to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import ModuleType

from benchmarks import _peer_chute, _peer_nats, _peer_redis
from benchmarks._peer_common import Opts, run_async

SYSTEMS: dict[str, ModuleType] = {"chute": _peer_chute, "redis": _peer_redis, "nats": _peer_nats}
PEERS = ("redis", "nats")
WORKLOADS = ("p2p", "fanout", "latency", "backlog")
UNITS = {"end to end": "msg/s", "publish confirmed": "msg/s", "consume backlog": "msg/s", "deliveries": "deliv/s",
         "server CPU": "% core", "client CPU": "% core", "server CPU per message": "µs",
         "server switches per message": "", "p50": "ms", "p99": "ms",
         "p99.9": "ms",
         "max": "ms"}  # fmt: skip


@dataclass(frozen=True)
class Target:
    text: str
    check: Callable[[dict[str, float]], bool]
    needs: tuple[str, ...] = ()  # the peers it compares with


TARGETS: dict[tuple[str, str], Target] = {
    ("p2p", "end to end"): Target("≥ 2× Redis", lambda v: v["chute"] >= 2 * v["redis"], ("redis",)),
    ("fanout", "deliveries"): Target("≥ 2× Redis", lambda v: v["chute"] >= 2 * v["redis"], ("redis",)),
    ("latency", "p99"): Target("≤ 2 ms, ≤ NATS", lambda v: v["chute"] <= min(2.0, v["nats"]), ("nats",)),
    ("latency", "p99.9"): Target("≤ 5 ms, ≤ NATS", lambda v: v["chute"] <= min(5.0, v["nats"]), ("nats",)),
    ("backlog", "RSS, 100,000 backlog"): Target("≤ 60 MB", lambda v: v["chute"] <= 60),
    ("backlog", "RSS, 1,000,000 backlog"): Target("≤ 200 MB", lambda v: v["chute"] <= 200),
    ("backlog", "restart after SIGTERM, 1,000,000"): Target("≤ 3 s", lambda v: v["chute"] <= 3),
    ("backlog", "restart after SIGKILL, 1,000,000"): Target("≤ 3 s", lambda v: v["chute"] <= 3),
}


def say(text: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- the peers' binaries ----------------------------------------------------------------------------------------


def ensure_installed(peers: list[str], install: bool) -> dict[str, str]:
    """Install the missing peers' binaries from Debian's packages (when `install`); return {peer: why skipped}."""
    missing = [SYSTEMS[p].BINARY for p in peers if shutil.which(SYSTEMS[p].BINARY) is None]
    if missing and install:
        command = ["apt-get", "install", "-y", "-q", *missing]
        say(f"installing {', '.join(missing)}: {' '.join(command)}")
        try:
            if subprocess.run(command, capture_output=True, timeout=900).returncode != 0:
                subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=900)
                subprocess.run(command, capture_output=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            say(f"could not install {', '.join(missing)}: {exc}")
    return {p: f"{SYSTEMS[p].BINARY} is not on PATH (apt-get install -y -q {SYSTEMS[p].BINARY})"
            for p in peers if shutil.which(SYSTEMS[p].BINARY) is None}  # fmt: skip


def commit() -> str:
    """The work tree's commit, with `+changes` when files under src/ differ from it (Chute runs from the tree)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=30).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True,
                               text=True, timeout=30).stdout.strip()  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (head or "unknown") + (" +changes" if dirty else "")


def machine() -> dict[str, object]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "platform": platform.platform()}  # fmt: skip


# -- running ----------------------------------------------------------------------------------------------------


def backlog(system: ModuleType, server, opts: Opts) -> dict[str, float]:
    metrics = {"RSS, empty": server.rss_mb()}
    total = 0
    for size in sorted(set(opts.backlog)):
        run_async(system.fill(server, size - total, opts))
        total = size
        time.sleep(0.5)  # the last acks, checkpoints
        metrics[f"RSS, {size:,} backlog"] = server.rss_mb()

    async def check() -> None:
        await system.verify(server, total)

    stopped, started = server.restart(False, check)
    metrics[f"stop on SIGTERM, {total:,}"] = stopped
    metrics[f"restart after SIGTERM, {total:,}"] = started
    _, started = server.restart(True, check)
    metrics[f"restart after SIGKILL, {total:,}"] = started
    metrics["RSS after restart"] = server.rss_mb()
    return metrics


LIVE: list = []  # the servers started and not yet stopped


def on_sigterm(signum: int, frame: object) -> None:
    """Kill the servers at once and delete their directories, then exit (Ctrl-C unwinds through `run_one`)."""
    for server in list(LIVE):
        server.kill_now()
    os._exit(128 + signum)


def run_one(name: str, workload: str, opts: Opts) -> dict[str, float]:
    system = SYSTEMS[name]
    server = system.Server(announce=say)
    LIVE.append(server)
    try:
        server.start()
        if workload == "backlog":
            return backlog(system, server, opts)
        return run_async(getattr(system, workload)(server, opts))
    finally:
        server.stop()
        LIVE.remove(server)
        say(f"stopped {name} (pid {server.pid})" if server.process is not None else f"stopped {name}")


@dataclass
class Run:
    repeat: int
    workload: str
    system: str
    metric: str
    value: float
    unit: str
    load: float  # the 1-minute load average when the run started (the machine is shared)


def unit_of(metric: str) -> str:
    if metric in UNITS:
        return UNITS[metric]
    return "MB" if metric.startswith("RSS") else "s"


def run_all(opts: Opts, systems: list[str], workloads: list[str], repeat: int) -> tuple[list[Run], list[dict]]:
    runs: list[Run] = []
    errors: list[dict] = []
    for r in range(repeat):
        order = systems[r % len(systems) :] + systems[: r % len(systems)]
        for workload in workloads:
            for name in order:
                load = os.getloadavg()[0]
                say(f"repeat {r + 1}/{repeat}: {workload} on {name} (load average {load:.2f})")
                try:
                    metrics = run_one(name, workload, opts)
                except Exception as exc:
                    say(f"{workload} on {name} failed: {exc!r}")
                    errors.append({"repeat": r, "workload": workload, "system": name, "error": repr(exc)})
                    continue
                runs += [Run(r, workload, name, metric, value, unit_of(metric), load)
                         for metric, value in metrics.items() if value is not None]  # fmt: skip
    return runs, errors


# -- the summary ------------------------------------------------------------------------------------------------


def summarize(runs: list[Run], systems: list[str], repeat: int) -> list[dict]:
    keys: list[tuple[str, str]] = []
    values: dict[tuple[str, str], dict[int, dict[str, float]]] = {}
    for run in runs:
        key = (run.workload, run.metric)
        if key not in values:
            keys.append(key)
            values[key] = {}
        values[key].setdefault(run.repeat, {})[run.system] = run.value
    summary = []
    for key in keys:
        per_repeat = values[key]
        row: dict[str, object] = {"workload": key[0], "metric": key[1], "unit": unit_of(key[1])}
        for name in systems:
            found = [v[name] for v in per_repeat.values() if name in v]
            row[name] = statistics.median(found) if found else None
            row[f"{name} range"] = [min(found), max(found)] if found else None
        for peer in systems[1:]:
            ratios = [v["chute"] / v[peer] for v in per_repeat.values() if "chute" in v and v.get(peer)]
            row[f"chute/{peer}"] = statistics.median(ratios) if ratios else None
        target = TARGETS.get(key)
        if target is not None:
            row["target"] = target.text
            judged = [target.check(v) for v in per_repeat.values()
                      if "chute" in v and all(p in v for p in target.needs)]  # fmt: skip
            row["met"] = [sum(judged), len(judged)]
            if not judged:
                row["status"] = "not judged (peer not run)"
            elif all(judged):
                row["status"] = "met" if len(judged) == 1 else f"met {len(judged)}/{len(judged)}"
            elif not any(judged):
                row["status"] = "missed" if len(judged) == 1 else f"missed {len(judged)}/{len(judged)}"
            else:
                row["status"] = f"met {sum(judged)}/{len(judged)}"
        summary.append(row)
    return summary


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    if unit in ("msg/s", "deliv/s"):
        return f"{value:,.0f}"
    if unit == "% core":
        return f"{value:.0f}"
    if unit == "ms":
        return f"{value:.2f}"
    if unit == "MB":
        return f"{value:.0f}"
    return f"{value:.2f}"


def table(summary: list[dict], systems: list[str]) -> str:
    peers = systems[1:]
    head = ["workload", "metric", "unit", *systems, *(f"chute/{p}" for p in peers), "target", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary:
        cells = [row["workload"], row["metric"], row["unit"]]
        for name in systems:
            cell = fmt(row[name], row["unit"])
            span = row[f"{name} range"]
            if span and span[0] != span[1]:
                cell += f" ({fmt(span[0], row['unit'])}–{fmt(span[1], row['unit'])})"
            cells.append(cell)
        for peer in peers:
            ratio = row[f"chute/{peer}"]
            cells.append("–" if ratio is None else f"{ratio:.2f}×")
        cells += [row.get("target", ""), row.get("status", "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- the command line -------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", action="append", choices=WORKLOADS, help="repeatable; default: all")
    parser.add_argument("--peers", default="redis,nats", help="comma-separated, from redis,nats ('' for none)")
    parser.add_argument("--messages", type=int, help="p2p and fanout messages (default 100,000 and 25,000)")
    parser.add_argument("--size", type=int, default=256, help="body bytes (default 256)")
    parser.add_argument("--repeat", type=int, default=1, help="run everything K times (default 1)")
    parser.add_argument("--rate", type=float, default=2000.0, help="latency: msg/s (default 2,000)")
    parser.add_argument("--duration", type=float, default=10.0, help="latency: seconds (default 10)")
    parser.add_argument("--backlog", default="100000,1000000", help="backlog sizes (default 100000,1000000)")
    parser.add_argument("--timeout", type=float, default=120.0, help="bound on each wait of a workload, s")
    parser.add_argument("--no-install", action="store_true", help="never run apt-get: skip missing peers")
    parser.add_argument("--json", action="store_true", help="print everything as JSON instead of the table")
    parser.add_argument("--save", metavar="FILE", help="also write everything as JSON to FILE")
    args = parser.parse_args(argv)
    args.peer_list = [p for p in (s.strip() for s in args.peers.split(",")) if p]
    unknown = [p for p in args.peer_list if p not in PEERS]
    if unknown:
        parser.error(f"unknown peers: {', '.join(unknown)} (known: {', '.join(PEERS)})")
    if args.repeat < 1 or args.size < 8 or (args.messages is not None and args.messages < 1):
        parser.error("--repeat ≥ 1, --size ≥ 8, --messages ≥ 1")
    try:
        args.backlog_sizes = tuple(int(s) for s in args.backlog.split(",") if s.strip())
    except ValueError:
        parser.error("--backlog: comma-separated integers")
    if not args.backlog_sizes or min(args.backlog_sizes) < 1:
        parser.error("--backlog: at least one size ≥ 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    skipped = ensure_installed(args.peer_list, install=not args.no_install)
    for peer, reason in skipped.items():
        say(f"skipping {peer}: {reason}")
    systems = ["chute", *(p for p in PEERS if p in args.peer_list and p not in skipped)]
    workloads = list(dict.fromkeys(args.workload or WORKLOADS))
    opts = Opts(messages=args.messages, size=args.size, rate=args.rate, duration=args.duration,
                backlog=args.backlog_sizes, timeout_s=args.timeout)  # fmt: skip
    versions = {name: SYSTEMS[name].version() for name in systems}
    versions["chute"] += f", commit {commit()}"
    clients = {name: SYSTEMS[name].client_version() for name in systems}
    if "pure-Python parser" in clients.get("redis", ""):
        say("warning: redis-py without hiredis: its pure-Python parser, not Redis, will bound Redis's figures "
            "(pip install hiredis, or the bench extra)")  # fmt: skip
    started = time.perf_counter()
    runs, errors = run_all(opts, systems, workloads, args.repeat)
    summary = summarize(runs, systems, args.repeat)
    report = {"machine": machine(), "versions": versions, "clients": clients, "skipped": skipped,
              "options": {**asdict(opts), "workloads": workloads, "repeat": args.repeat}, "summary": summary,
              "runs": [asdict(run) for run in runs], "errors": errors,
              "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    if args.save:
        with open(args.save, "w") as f:
            json.dump(report, f, indent=2, default=list)
    if args.json:
        print(json.dumps(report, indent=2, default=list))
    else:
        m = report["machine"]
        loads = [run.load for run in runs] or [os.getloadavg()[0]]
        print(f"machine: {m['nproc']} CPUs, {m['cpu']}, Python {m['python']}; {args.repeat} repeat(s), "
              f"{args.size}-byte bodies, {report['seconds']:.0f} s; 1-min load average {min(loads):.2f}–"
              f"{max(loads):.2f} (median {statistics.median(loads):.2f}) during the runs")  # fmt: skip
        for name in systems:
            print(f"{name}: {versions[name]}; client {clients[name]}")
        for peer, reason in skipped.items():
            print(f"{peer}: skipped, {reason}")
        print()
        print(table(summary, systems))
        for error in errors:
            print(f"error: repeat {error['repeat'] + 1}, {error['workload']} on {error['system']}: {error['error']}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
