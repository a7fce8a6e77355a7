"""benchmarks/postgres_store.py still runs (tiny sizes, against the tests' server): its figures are not checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_postgres_store_benchmark_runs(postgres_url):
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.postgres_store", "--url", postgres_url, "--messages", "2000", "--json"],
        capture_output=True, text=True, timeout=100, cwd=ROOT, check=True,
    )  # fmt: skip
    report = json.loads(out.stdout)
    assert [r["workload"] for r in report["results"]] == ["store", "p2p", "skiplocked", "skiplocked-1"]
    assert all(r["messages_per_s"] > 0 for r in report["results"])
    assert all(r["group_commits"] > 0 for r in report["results"][:2])
    assert "cores" in report["machine"] and report["postgres"]["server_version"]
