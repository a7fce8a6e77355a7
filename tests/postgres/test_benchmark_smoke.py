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


def test_the_cluster_benchmark_runs_fan_out_through_relays(postgres_url):
    """benchmarks/cluster.py's fan-out with every subscription relayed to another shard: every copy is delivered
    (its consumers wait for all of them) and the report says what ran."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.cluster", "--url", postgres_url, "--nodes", "1", "--messages", "1600",
         "--workload", "fanout", "--relayed", "--json"],
        capture_output=True, text=True, timeout=110, cwd=ROOT, check=True,
    )  # fmt: skip
    (result,) = json.loads(out.stdout)["results"]
    assert result["workload"] == "fanout" and result["relayed_subscriptions"] == 16
    assert result["messages"] == 1600 * 4  # deliveries: 4 topics x 400 messages x 4 subscriptions
    assert result["messages_per_s"] > 0 and result["cpu_us_per_message_postgres"] is None
