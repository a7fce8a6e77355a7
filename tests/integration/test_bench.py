"""`chute bench` as a subprocess with tiny sizes: every workload produces numbers, the brokers it starts are gone
afterwards, and `--url` works against a running server. Speed is never asserted here (see BENCHMARKS.md)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from chute.testing import running_server
from tests.processes import alive

pytestmark = pytest.mark.timeout(120)

TINY = ["--messages", "2000", "--duration", "1", "--rate", "500", "--queues", "20", "--subscriptions", "3",
        "--idle-queues", "50", "--idle-connections", "10", "--idle-seconds", "0.5"]  # fmt: skip


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chute.cli", "bench", "--json", *TINY, *args],
                          capture_output=True, text=True, timeout=100)  # fmt: skip


def by_metric(rows: list[dict]) -> dict[tuple[str, str], float | None]:
    return {(row["workload"], row["metric"]): row["value"] for row in rows}


def test_every_workload_against_brokers_it_starts_and_stops():
    result = bench()
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    rows = json.loads(result.stdout)
    assert all(set(row) == {"workload", "metric", "value", "unit"} for row in rows)
    assert {row["workload"] for row in rows} == {"p2p", "latency", "fanout", "queues", "backlog"}
    values = by_metric(rows)
    for key in [("p2p", "end to end"), ("p2p", "publish confirmed"), ("p2p", "client CPU"), ("latency", "broker CPU"),
                ("latency", "p50"), ("latency", "p99"), ("latency", "p99.9"), ("latency", "max"),
                ("fanout", "deliveries"), ("queues", "20 queues"), ("backlog", "RSS before"),
                ("backlog", "RSS with backlog")]:  # fmt: skip
        assert values[key] is not None and values[key] > 0, key
    assert values[("latency", "p50")] <= values[("latency", "p99")] <= values[("latency", "max")]
    # every message wakes the broker at least once (its publish arrives) and its threads switch at least that often
    assert values[("latency", "broker switches per message")] >= 1
    # the broker's CPU comes from /proc's 10 ms ticks: p2p's 2,000 messages may take less than one (latency's
    # second of publishing, checked above, cannot)
    assert values[("p2p", "broker CPU")] is not None and values[("p2p", "broker CPU")] >= 0
    assert values[("queues", "idle CPU")] is not None and values[("queues", "idle CPU")] >= 0

    # one broker per workload, each stopped (and reaped) and its data directory deleted
    started = re.findall(r"started a broker \(pid (\d+)\) at \S+, data in (\S+),", result.stderr)
    assert len(started) == 5
    for pid, data_dir in started:
        assert not alive(int(pid)), pid
        assert not os.path.exists(data_dir)


def test_against_a_running_broker_by_url():
    with running_server() as server:
        result = bench("--url", server.url, "--workload", "p2p", "--workload", "queues", "--workload", "backlog")
        assert result.returncode == 0, result.stderr
        assert "started a broker" not in result.stderr
        values = by_metric(json.loads(result.stdout))
        assert values[("p2p", "end to end")] > 0 and values[("queues", "20 queues")] > 0
        # the broker's own CPU and memory are only known for a broker bench started
        assert values[("p2p", "broker CPU")] is None
        assert values[("queues", "idle CPU")] is None
        assert values[("backlog", "RSS with backlog")] is None
        # everything the run created was deleted again
        assert server.server.broker.core.queues == {}


def test_table_output_and_one_workload():
    result = subprocess.run([sys.executable, "-m", "chute.cli", "bench", "--workload", "latency", "--duration",
                             "0.5", "--rate", "200"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "p99" in result.stdout and "≤ 5" in result.stdout


def test_an_unreachable_broker_is_one_line_and_exit_1():
    result = subprocess.run([sys.executable, "-m", "chute.cli", "bench", "--url", "chute://127.0.0.1:1",
                             "--workload", "p2p"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 1
    # progress lines, then exactly one error line
    lines = result.stderr.splitlines()
    assert lines[-1].startswith("error: could not connect") and "Traceback" not in result.stderr, result.stderr
    assert [line for line in lines if not line.startswith("chute bench: ")] == lines[-1:]
    assert result.stdout == ""


def test_the_latency_window_keeps_the_harness_collector_out_and_restores_it():
    import gc

    from chute.bench import collector_out_of_the_window

    if gc.get_freeze_count():  # (an in-process broker of another test froze its own objects: not this case)
        pytest.skip("objects are frozen already in this process")
    with collector_out_of_the_window():
        frozen = gc.get_freeze_count()
        assert frozen > 0  # what existed is out of every collection made during the window
        with collector_out_of_the_window():  # (nested: the peers' harness around a chute.bench workload)
            assert gc.get_freeze_count() >= frozen
        assert gc.get_freeze_count() >= frozen  # the inner window did not thaw the outer one
    assert gc.get_freeze_count() == 0


async def test_a_paced_producer_holds_only_the_publishes_in_flight():
    import asyncio
    import collections

    from chute.bench import settle_done

    loop = asyncio.get_running_loop()
    futures = collections.deque(loop.create_future() for _ in range(4))
    futures[0].set_result(1)
    futures[1].set_result(2)
    futures[3].set_result(4)  # done, but behind one in flight: kept, so the order of confirms is not assumed
    settle_done(futures)
    assert len(futures) == 2
    futures[0].set_exception(RuntimeError("refused"))
    with pytest.raises(RuntimeError, match="refused"):
        settle_done(futures)
