"""Stalls under a large backlog (issue 12, "No stalls"): end-to-end latency and event-loop lag of `chute serve`.

    python -m benchmarks.stalls [--backlog 1000000] [--rate 2000] [--duration 90] [--size 256] [--fsync always]
                                [--lag-interval 0.002] [--restart] [--broker-log FILE] [--json]

Starts `chute serve` in a subprocess (a fresh data directory, HTTP on for /metrics), publishes a backlog of
`--backlog` messages to a queue nobody consumes (it stays in the broker for the whole run: its index, its
checkpoints), then for `--duration` seconds publishes to a second queue at a steady `--rate` while a consumer
consumes it at the same rate (each body starts with its send time; the consumer notes receive - send). The
default duration is longer than the broker's 60 s checkpoint interval, so at least one checkpoint of the whole
backlog lands inside the measured window (`checkpoints` in the output says how many did). With `--restart` the
broker is stopped and started again once the backlog is built (it recovers it; the time to listen is reported),
the case of a production broker restarted with a backlog.

Reports latency p50 / p99 / p99.9 / max (ms, every message of the steady phase) and, from /metrics
(`chute_event_loop_lag_seconds`, scraped before and after the steady phase), the loop lag's p50 / p99 / p99.9
within the window (upper bounds of their buckets) and the largest lag since the broker began serving
(`chute_event_loop_lag_max_seconds`, backlog building included), and the group-commit fsync's p99 / p99.9 / max
in the window (`chute_fsync_duration_seconds`: a latency spike without a loop stall is the disk), and the largest
parts of a lag on the loop thread's CPU and waiting for a core (`chute_event_loop_lag_on_cpu_max_seconds`,
`..._waiting_max_seconds`; docs/metrics.md: a lag mostly waiting was the machine, not the broker). The broker's
lag timer is due every `--lag-interval` seconds here (CHUTE_LOOP_LAG_INTERVAL_S; 0.1 s in production): a hold is
seen only if the timer falls due during it, so the default of 2 ms catches every hold and under-measures it by at
most 2 ms (at 0.1 s, a 30 ms hold is missed 7 times in 10).
Then it says where the slowest 0.1 % of messages waited (benchmarks/tail.py): until their publish was confirmed
or after; sent while the broker had a child process (a checkpoint's replay) or not; in flight while the harness's
own loop, or a bystander process that only sleeps, woke late; and lists their episodes with UTC times, to set
beside the broker's log (`--broker-log FILE`; with CHUTE_HOLD_REPORT_MS it names holds and slow fsyncs, and
the harness names its own holds on stderr, lines marked "harness").
Targets (issue 12): p99.9 <= 5 ms, max <= 20 ms.
Clients and broker share the machine, as in every benchmark here; figures go to BENCHMARKS.md with the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import platform
import struct
import sys
import time
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from benchmarks.tail import Canary, ChildWatch, HarnessLag, Timeline, broker_log_spans, explain_tail
from chute.bench import (
    BROKER_START_TIMEOUT_S,
    STAMP,
    BenchError,
    BrokerProcess,
    collector_out_of_the_window,
    drain,
    percentile,
    publish_all,
    publish_paced,
)
from chute.client import AsyncClient
from chute.server import holdreport, looplag
from chute.server.holdreport import HoldReporter

BACKLOG_QUEUE, LATENCY_QUEUE = "stalls-backlog", "stalls-latency"
INDEX = struct.Struct("<I")  # a message's number in the steady phase, after its STAMP


@dataclass
class HttpBrokerProcess(BrokerProcess):
    """`chute serve` as BrokerProcess starts it (same flags, log handling and stop), with the HTTP listener on."""

    http: bool = True
    prefix: str = "chute-stalls-"

    def restart(self, timeout_s: float = BROKER_START_TIMEOUT_S) -> float:
        """Stop the broker (SIGTERM: a clean stop) and start it again on its data; return the seconds from the
        new process's start to its native listener (recovery included)."""
        self.halt(timeout_s=timeout_s)
        started = time.perf_counter()
        self.start(timeout_s, keep_data=True)
        return time.perf_counter() - started


def scrape(http_url: str) -> dict[str, dict]:
    """The loop-lag and fsync histograms (cumulative counts by bound), the lag's max, the max of its on-CPU and
    waiting parts (NaN from a broker without them) and the checkpoint counter."""
    with urllib.request.urlopen(f"{http_url}/metrics", timeout=30) as response:
        text = response.read().decode()
    result = {
        "buckets": {},
        "fsync": {},
        "max": math.nan,
        "on_cpu_max": math.nan,
        "waiting_max": math.nan,
        "checkpoints": math.nan,
    }
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "chute_event_loop_lag_seconds_bucket":
                result["buckets"][float(sample.labels["le"])] = sample.value
            elif sample.name == "chute_fsync_duration_seconds_bucket":
                result["fsync"][float(sample.labels["le"])] = sample.value
            elif sample.name == "chute_event_loop_lag_max_seconds":
                result["max"] = sample.value
            elif sample.name == "chute_event_loop_lag_on_cpu_max_seconds":
                result["on_cpu_max"] = sample.value
            elif sample.name == "chute_event_loop_lag_waiting_max_seconds":
                result["waiting_max"] = sample.value
            elif sample.name == "chute_checkpoints_total":
                result["checkpoints"] = sample.value
    return result


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The upper bound of the bucket holding quantile `q` of the observations made between two scrapes."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0  # (no histogram: a broker from before issue 12)
    if total <= 0:
        return math.nan
    for bound, count in zip(bounds, counts, strict=True):
        if count >= q * total:
            return bound
    return math.inf


async def build_backlog(url: str, count: int, body: bytes) -> float:
    async with AsyncClient(url, timeout=120, reconnect=False, name="stalls-backlog") as client:
        await client.create_queue(BACKLOG_QUEUE, lease_s=300)
        started = time.perf_counter()
        await publish_all(client, lambda i: BACKLOG_QUEUE, count, body, window=2000)
        return time.perf_counter() - started


async def steady(url: str, rate: float, duration: float, size: int, pid: int,
                 broker_log: str | None = None) -> tuple[list[float], dict]:  # fmt: skip
    """Publish at `rate` for `duration` seconds while a consumer drains; return the latencies (seconds) and where
    the slowest waited (benchmarks/tail.py: each message's confirm and receipt, the broker's child processes, the
    harness's own late wakes)."""
    total = max(1, int(rate * duration))
    padding = b"x" * max(0, size - STAMP.size - INDEX.size)
    samples: list[float] = []
    timeline = Timeline(total)
    async with AsyncClient(url, timeout=60, reconnect=False, name="stalls-producer") as producer, \
            AsyncClient(url, timeout=60, reconnect=False, name="stalls-consumer") as consumer:  # fmt: skip
        await producer.create_queue(LATENCY_QUEUE, lease_s=300)

        def received(delivery) -> None:
            now = time.perf_counter()
            samples.append(now - STAMP.unpack_from(delivery.body)[0])
            timeline.received[INDEX.unpack_from(delivery.body, STAMP.size)[0]] = now

        def send() -> asyncio.Future:
            at = time.perf_counter()
            index = timeline.send(at)
            future = producer.publish_nowait(LATENCY_QUEUE, STAMP.pack(at) + INDEX.pack(index) + padding)
            future.add_done_callback(lambda _, i=index: timeline.confirmed.__setitem__(i, time.perf_counter()))
            return future

        loop = asyncio.get_running_loop()
        draining = loop.create_task(drain(consumer, LATENCY_QUEUE, total, prefetch=1000, ack_batch=50,
                                          acks_in_flight=4, on_delivery=received))  # fmt: skip
        await asyncio.sleep(0.05)
        children, harness, bystander = ChildWatch(pid).start(), HarnessLag(), Canary().start()
        watching = loop.create_task(harness.run())
        threshold = holdreport.threshold_from_env()  # (set: the harness names its own holds too, on stderr)
        reporter = None if threshold is None else HoldReporter(threshold)
        if reporter is not None:
            reporter.start()
        try:
            with collector_out_of_the_window():  # (the harness's own full collections are not the broker's stalls)
                await publish_paced(send, total, rate)
                await draining
        finally:
            if reporter is not None:
                reporter.stop()
            watching.cancel()
            spans = children.stop()
            canary_late = bystander.stop()
    wall_offset = time.time() - time.perf_counter()
    logged = broker_log_spans(broker_log, wall_offset) if broker_log else None
    tail = explain_tail(timeline, spans, harness.late, wall_offset=wall_offset, canary_late=canary_late,
                        other_spans=logged)  # fmt: skip
    tail["harness_lag_max_ms"] = harness.largest * 1000
    return samples, tail


async def run(options: argparse.Namespace, broker: HttpBrokerProcess, say) -> dict:
    body = b"x" * options.size
    say(f"building a backlog of {options.backlog:,} messages")
    build_s = await build_backlog(broker.url, options.backlog, body)
    say(f"backlog built in {build_s:.1f} s")
    restart_s = None
    if options.restart:
        restart_s = await asyncio.to_thread(broker.restart)
        say(f"restarted on the backlog in {restart_s:.1f} s")
    say(f"steady phase: {options.rate:g} msg/s for {options.duration:g} s")
    before = await asyncio.to_thread(scrape, broker.http_url)
    samples, tail = await steady(broker.url, options.rate, options.duration, options.size, broker.pid,
                                 options.broker_log)  # fmt: skip
    after = await asyncio.to_thread(scrape, broker.http_url)
    ordered = sorted(samples)
    lag = {f"p{q}": bucket_quantile(before["buckets"], after["buckets"], q / 100) for q in (50, 99, 99.9)}
    return {
        "backlog": options.backlog, "rate": options.rate, "duration_s": options.duration, "size": options.size,
        "fsync": options.fsync, "lag_interval_s": options.lag_interval, "backlog_build_s": round(build_s, 1),
        "messages": len(samples),
        "restart_s": None if restart_s is None else round(restart_s, 2),
        "latency_ms": {label: percentile(ordered, p) * 1000
                       for label, p in (("p50", 50), ("p99", 99), ("p99.9", 99.9), ("max", 100))},
        "loop_lag_ms": {**{k: v * 1000 for k, v in lag.items()}, "max_since_start": after["max"] * 1000,
                        "on_cpu_max_since_start": after["on_cpu_max"] * 1000,
                        "waiting_max_since_start": after["waiting_max"] * 1000},
        "checkpoints_in_window": after["checkpoints"] - before["checkpoints"],
        "fsync_ms": {f"p{q}": bucket_quantile(before["fsync"], after["fsync"], q / 100) * 1000
                     for q in (99, 99.9, 100)},
        "slowest": tail,
        "broker_rss_mb": round(broker.rss_mb(), 1),
        "machine": f"{os.cpu_count()} CPUs ({cpu_model()}), Python {platform.python_version()}",
    }  # fmt: skip


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def tail_rows(tail: dict) -> list[tuple[str, str, str]]:
    """Where the slowest messages waited (benchmarks/tail.py), as rows of the report."""
    if not tail.get("messages"):
        return []
    slow, every = tail["slow"], tail["all"]
    return [
        (f"slowest messages (latency >= p{tail['quantile']:g}, {tail['bound_ms']:.2f} ms)", f"{tail['messages']}", ""),
        ("of them sent while the broker had a child (checkpoint) / share of the run with one",
         f"{tail['sent_while_a_child_ran']} / {tail['share_of_run_with_a_child']:.0%} ({tail['children']} children)",
         ""),
        ("their wait until confirmed, median / max (all messages: median / max)",
         f"{slow['confirm_wait_ms_median']:.2f} / {slow['confirm_wait_ms_max']:.2f} ms "
         f"({every['confirm_wait_ms_median']:.2f} / {every['confirm_wait_ms_max']:.2f})", ""),
        ("their confirm to delivery, median / max (all messages: median / max)",
         f"{slow['confirm_to_delivery_ms_median']:.2f} / {slow['confirm_to_delivery_ms_max']:.2f} ms "
         f"({every['confirm_to_delivery_ms_median']:.2f} / {every['confirm_to_delivery_ms_max']:.2f})", ""),
        ("of them in flight at a late wake of the harness (> 3 ms) / such wakes; the harness's largest lateness",
         f"{tail['in_flight_during']['a late wake of the harness']} / {tail['harness_late_wakes']}; "
         f"{tail['harness_lag_max_ms']:.1f} ms", ""),
        ("late wakes of a bystander process (> 3 ms; benchmarks/tail.py's canary) / its largest lateness",
         f"{tail['canary_late_wakes']} / {tail['canary_late_max_ms']:.1f} ms", ""),
        ("the slowest messages in flight during ... (one may count under several)",
         ", ".join(f"{name}: {count}" for name, count in tail["in_flight_during"].items()), ""),
    ]  # fmt: skip


def render(result: dict) -> str:
    lat, lag = result["latency_ms"], result["loop_lag_ms"]
    rows = [
        ("latency p50 / p99 / p99.9 / max", f"{lat['p50']:.2f} / {lat['p99']:.2f} / {lat['p99.9']:.2f} / "
                                            f"{lat['max']:.2f} ms", "p99.9 <= 5, max <= 20"),
        ("loop lag p50 / p99 / p99.9 (bucket bounds)", f"<= {lag['p50']:g} / {lag['p99']:g} / {lag['p99.9']:g} ms",
         ""),
        (f"loop lag max since the broker began serving (timer every {result['lag_interval_s'] * 1000:g} ms)",
         f"{lag['max_since_start']:.1f} ms", "<= 20"),
        ("largest part of a lag on the loop thread's CPU / waiting for a core, since it began serving",
         f"{lag['on_cpu_max_since_start']:.1f} / {lag['waiting_max_since_start']:.1f} ms", ""),
        ("checkpoints in the window", f"{result['checkpoints_in_window']:g}", ">= 1"),
        ("group-commit fsync p99 / p99.9 / max (bucket bounds)",
         " / ".join(f"<= {v:g}" for v in result["fsync_ms"].values()) + " ms", ""),
        *tail_rows(result["slowest"]),
        ("broker RSS at the end", f"{result['broker_rss_mb']:.0f} MB", ""),
        ("restart on the backlog (--restart)", "not asked" if result["restart_s"] is None
         else f"{result['restart_s']:.2f} s", ""),
    ]  # fmt: skip
    head = (
        f"backlog {result['backlog']:,} x {result['size']} B (built in {result['backlog_build_s']} s), "
        f"{result['rate']:g} msg/s for {result['duration_s']:g} s, fsync {result['fsync']}; {result['machine']}"
    )
    lines = [head, "", "| measure | value | target |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {target} |" for name, value, target in rows]
    lines += ["", "the slowest messages' episodes, worst first (UTC; sent less than 50 ms apart):"]
    for e in result["slowest"].get("episodes", []):
        at = time.strftime("%H:%M:%S", time.gmtime(e["at"])) + f".{int(e['at'] % 1 * 1000):03d}"
        lines.append(f"- {at}: {e['messages']} messages, latency max {e['latency_max_ms']:.1f} ms, confirm wait max "
                     f"{e['confirm_wait_max_ms']:.1f} ms, harness late by up to {e['harness_late_max_ms']:.1f} ms, "
                     f"canary late by up to {e['canary_late_max_ms']:.1f} ms (of it waiting for a core "
                     f"{e['canary_waited_ms']:.1f}, steal {e['canary_steal_ms']:.0f})"
                     + (", a child ran" if e["child"] else ""))  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stalls", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backlog", type=int, default=1_000_000, help="messages left in the broker (default 1M)")
    parser.add_argument("--rate", type=float, default=2000.0, help="msg/s of the steady phase (default 2000)")
    parser.add_argument("--duration", type=float, default=90.0, help="seconds of the steady phase (default 90)")
    parser.add_argument("--size", type=int, default=256, help="body bytes (default 256)")
    parser.add_argument("--fsync", default="always", choices=["always", "interval", "never"])
    parser.add_argument(
        "--restart",
        action="store_true",
        help="restart the broker once the backlog is built (it then recovers the backlog)",
    )
    parser.add_argument("--lag-interval", type=float, default=0.002, metavar="SECONDS",
                        help="the broker's loop-lag timer interval (default 0.002; production 0.1)")  # fmt: skip
    parser.add_argument("--broker-log", metavar="FILE", help="append the broker's log to FILE (with "
                        "CHUTE_HOLD_REPORT_MS: its holds and slow syncs, to set beside the episodes)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    options = parser.parse_args(argv)
    os.environ[looplag.INTERVAL_ENV] = repr(options.lag_interval)  # the broker inherits it
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s harness %(levelname)s %(name)s: %(message)s")
    broker = HttpBrokerProcess(fsync=options.fsync, log_path=options.broker_log).start()
    try:
        result = asyncio.run(run(options, broker, lambda text: print(f"# {text}", file=sys.stderr, flush=True)))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        broker.stop()
    print(json.dumps(result, indent=2) if options.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
