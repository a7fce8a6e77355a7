"""The stalls benchmark (`python -m benchmarks.stalls`) run tiny as a subprocess: a 20,000-message backlog, a few
seconds of steady publishing, and a report with latency and loop-lag figures read from a real /metrics. Speed is
never asserted here (benchmarks measure; tests check that they work)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.stalls import bucket_quantile

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(90)
def test_a_tiny_stalls_run_reports_latency_and_loop_lag():
    command = [sys.executable, "-W", "error", "-m", "benchmarks.stalls", "--backlog", "20000", "--rate", "500",
               "--duration", "3", "--fsync", "never", "--restart", "--json"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=80)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["backlog"] == 20000 and report["messages"] == 1500 and report["restart_s"] > 0
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p99"] <= latency["p99.9"] <= latency["max"]
    lag = report["loop_lag_ms"]
    assert all(math.isfinite(lag[q]) and lag[q] > 0 for q in ("p50", "p99", "p99.9"))  # ~1,500 ticks in 3 s
    assert 0 <= lag["on_cpu_max_since_start"] <= lag["max_since_start"]  # each tick's parts <= its lag
    assert 0 <= lag["waiting_max_since_start"] <= lag["max_since_start"]
    assert report["broker_rss_mb"] > 0 and report["lag_interval_s"] == 0.002
    assert "CPUs" in report["machine"]


def test_quantiles_come_from_the_bucket_counts_between_two_scrapes():
    before = {0.001: 10.0, 0.01: 10.0, 0.1: 10.0, math.inf: 10.0}
    after = {0.001: 100.0, 0.01: 108.0, 0.1: 109.0, math.inf: 110.0}  # 90, 8, 1, 1 new observations
    assert bucket_quantile(before, after, 0.5) == 0.001
    assert bucket_quantile(before, after, 0.99) == 0.1
    assert bucket_quantile(before, after, 0.999) == math.inf
    assert math.isnan(bucket_quantile(after, after, 0.5))
    assert math.isnan(bucket_quantile({}, {}, 0.5))  # a broker without the histogram
