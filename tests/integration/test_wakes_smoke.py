"""benchmarks/wakes.py: every mode runs and reports what it measured (issue 16's measure of a wake-up's cost)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_every_mode_reports_cpu_switches_and_commit_latency(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.wakes", "--count", "40", "--rate", "400", "--repeat",
                             "1", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=100,
                            env={**os.environ, "TMPDIR": str(tmp_path)})  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    runs = report["runs"]
    aio = platform.machine() in ("x86_64", "aarch64") and os.path.exists("/proc/sys/fs/aio-max-nr")
    expected = {"sleep", "loop", "thread", "inline"} | ({"aio"} if aio else set())
    assert set(runs) == expected, result.stderr
    for mode, (run,) in runs.items():
        assert run["process CPU µs"] > 0 and run["machine CPU µs"] > 0, (mode, run)
        # paced at 400/s, 40 operations take about 0.1 s, never less
        assert run["seconds"] >= 39 / 400, (mode, run)
        # nearly every operation sleeps first (one that falls due late does not): a wake-up, a switch, each
        assert run["switches"] >= 0.5, (mode, run)
    for mode in expected - {"sleep", "loop"}:  # a commit's latency is its write and fdatasync, at least
        assert 0 < runs[mode][0]["p50 ms"] <= runs[mode][0]["p99 ms"], mode
    assert list(tmp_path.iterdir()) == []  # each commit mode's file is deleted


@pytest.mark.timeout(30)
def test_bad_arguments_are_a_usage_error():
    result = subprocess.run([sys.executable, "-m", "benchmarks.wakes", "--rate", "0"], cwd=ROOT, capture_output=True,
                            text=True, timeout=20)  # fmt: skip
    assert result.returncode == 2 and "must be positive" in result.stderr
