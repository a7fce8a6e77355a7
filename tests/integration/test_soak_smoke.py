"""The soak benchmark (`python -m benchmarks.soak`) run tiny as a subprocess: it writes samples with every column,
a JSON report and a PNG, and the broker it started is gone with its data. Speed is never asserted here."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.soak import COLUMNS, bucket_deltas, highest_bucket, quantile
from tests.processes import alive

REPO = Path(__file__).resolve().parents[2]
TINY = ["--messages", "3000", "--seconds", "15", "--rate", "1000", "--sample-s", "0.5", "--slow-phase-s", "1",
        "--ttl-s", "1", "--max-delay-s", "1", "--progress-s", "60"]  # fmt: skip


@pytest.mark.timeout(100)
def test_a_tiny_soak_writes_samples_a_report_and_a_png(tmp_path):
    png = tmp_path / "plots" / "soak.png"
    result = subprocess.run([sys.executable, "-m", "benchmarks.soak", *TINY, "--out-dir", str(tmp_path / "out"),
                             "--png", str(png), "--data-parent", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=90)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    started = re.search(r"broker pid (\d+) at \S+, data in (\S+),", result.stdout)
    assert started, result.stdout
    assert not alive(int(started.group(1)))
    assert not Path(started.group(2)).exists()

    [samples] = (tmp_path / "out").glob("soak-*.csv")
    with open(samples, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == COLUMNS
    assert len(rows) >= 3
    assert float(rows[-1]["rss_mb"]) > 0 and int(rows[-1]["disk_bytes"]) > 0
    assert int(rows[-1]["published"]) == 3000
    assert int(rows[-1]["fsyncs"]) > 0 or any(row["fsync_p99_ms"] for row in rows)

    [report_file] = (tmp_path / "out").glob("soak-*.json")
    report = json.loads(report_file.read_text())
    assert report["counters"]["published"] == 3000 and report["counters"]["errors"] == 0
    assert {"rss_spread_pct", "rss_target_met", "disk_target_met"} <= set(report["summary"])
    assert report["queues"]["soak-sub-2"]["published"] > 0  # the topic's third subscription got its copies
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "target ±10% after warm-up" in result.stdout


def test_interval_quantiles_come_from_bucket_deltas():
    before = [(0.001, 10.0), (0.01, 10.0), (0.1, 10.0), (math.inf, 10.0)]
    now = [(0.001, 10.0), (0.01, 110.0), (0.1, 110.0), (math.inf, 111.0)]
    deltas = bucket_deltas(now, before)
    assert deltas == [(0.001, 0.0), (0.01, 100.0), (0.1, 100.0), (math.inf, 101.0)]
    assert quantile(deltas, 0.5) == pytest.approx(0.001 + 0.009 * 50.5 / 100)
    assert quantile(deltas, 0.999) == 0.1  # in the +Inf bucket: the largest finite bound
    assert highest_bucket(deltas) == 0.1
    assert quantile(bucket_deltas(now, now), 0.99) is None
    assert highest_bucket(bucket_deltas(now, now)) is None


def test_stalls_are_split_by_where_the_loop_thread_was():
    from benchmarks.soak_report import stalls_over

    rows = [{"loop_lag_max_ms": 25.0, "loop_lag_on_cpu_max_ms": 2.5, "loop_lag_waiting_max_ms": 25.0},  # machine
            {"loop_lag_max_ms": 25.0, "loop_lag_on_cpu_max_ms": 25.0, "loop_lag_waiting_max_ms": 0.5},  # broker
            {"loop_lag_max_ms": 25.0, "loop_lag_on_cpu_max_ms": 1.0, "loop_lag_waiting_max_ms": 1.0},  # blocked
            {"loop_lag_max_ms": 5.0, "loop_lag_on_cpu_max_ms": 5.0, "loop_lag_waiting_max_ms": 5.0},  # no stall
            {"loop_lag_max_ms": None, "loop_lag_on_cpu_max_ms": None, "loop_lag_waiting_max_ms": None}]  # fmt: skip
    assert stalls_over(rows, "loop_lag_on_cpu_max_ms") == 1
    assert stalls_over(rows, "loop_lag_waiting_max_ms") == 1
    old = [{"loop_lag_max_ms": 25.0, "loop_lag_on_cpu_max_ms": None}]  # a broker without the split
    assert stalls_over(old, "loop_lag_on_cpu_max_ms") is None
