"""`python -m benchmarks.peers` with tiny sizes against each peer whose binary is on PATH (.ci/run installs
redis-server and nats-server from Debian's packages): it produces figures for Chute and the peer, and every
server it started is gone afterwards, with its directory. Speed is never asserted here (see BENCHMARKS.md)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import peers
from tests.processes import alive

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--workload", "p2p", "--workload", "latency", "--messages", "2000", "--duration", "1", "--rate", "500",
        "--timeout", "20", "--no-install", "--json"]  # fmt: skip
PEERS = {"redis": ("redis-server", "redis"), "nats": ("nats-server", "nats")}  # binary, Python client module


def run_peers(*args: str, timeout_s: float = 45.0) -> tuple[int, str, str]:
    """Run the benchmark in its own session, so that on a timeout it is killed with every server it started."""
    process = subprocess.Popen([sys.executable, "-W", "error", "-m", "benchmarks.peers", *args], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    try:
        out, err = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        for data_dir in re.findall(r"data in (\S+)", err):
            shutil.rmtree(data_dir, ignore_errors=True)
        pytest.fail(f"the benchmark took more than {timeout_s:g} s:\n{err[-3000:]}")
    return process.returncode, out, err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("peer", sorted(PEERS))
def test_p2p_and_latency_side_by_side_with_a_peer(peer: str):
    binary, module = PEERS[peer]
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} is not on PATH (apt-get install -y -q {binary}; .ci/run installs it)")
    pytest.importorskip(module, reason=f"the {module} client is not installed (pip install -e '.[bench]')")

    code, out, err = run_peers(*TINY, "--peers", peer)

    assert code == 0, err[-3000:]
    assert "Traceback" not in err
    report = json.loads(out)
    assert report["errors"] == [] and report["skipped"] == {}
    assert set(report["versions"]) == {"chute", peer} and report["versions"][peer]
    assert report["machine"]["nproc"] >= 1
    rows = {(row["workload"], row["metric"]): row for row in report["summary"]}
    for metric in ("end to end", "publish confirmed", "consume backlog"):
        row = rows[("p2p", metric)]
        assert row["chute"] > 0 and row[peer] > 0 and row[f"chute/{peer}"] > 0, row
    for system in ("chute", peer):
        assert 0 < rows[("latency", "p50")][system] <= rows[("latency", "p99")][system] <= rows[("latency", "max")][
            system]  # fmt: skip
    # each server's context switches per message, side by side: a message that wakes a server switches its threads
    assert rows[("latency", "server switches per message")]["chute"] >= 1
    assert rows[("latency", "server switches per message")][peer] > 0
    judged = rows[("p2p", "end to end")] if peer == "redis" else rows[("latency", "p99")]
    assert judged["status"] in {"met", "missed"}

    # two servers per workload (Chute's and the peer's), each stopped and its directory deleted
    started = re.findall(r"started \S+(?: serve)? \(pid (\d+)\) .*, data in (\S+)", err)
    assert len(started) == 4, err
    for pid, data_dir in started:
        assert not alive(int(pid)), pid
        assert not os.path.exists(data_dir), data_dir


@pytest.mark.timeout(10)
def test_a_missing_peer_is_skipped_with_its_reason(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    skipped = peers.ensure_installed(["redis", "nats"], install=False)
    assert skipped == {"redis": "redis-server is not on PATH (apt-get install -y -q redis-server)",
                       "nats": "nats-server is not on PATH (apt-get install -y -q nats-server)"}  # fmt: skip


@pytest.mark.timeout(10)
def test_targets_are_judged_per_repeat_on_side_by_side_figures():
    runs = [peers.Run(r, "p2p", system, "end to end", value, "msg/s", 1.0)
            for r, values in enumerate([{"chute": 100.0, "redis": 40.0}, {"chute": 100.0, "redis": 60.0}])
            for system, value in values.items()]  # fmt: skip
    (row,) = peers.summarize(runs, ["chute", "redis"], repeat=2)
    assert row["chute"] == 100.0 and row["redis"] == 50.0
    assert row["chute/redis"] == pytest.approx((2.5 + 100 / 60) / 2)
    assert row["met"] == [1, 2] and row["status"] == "met 1/2"
    assert "| p2p | end to end | msg/s | 100 | 50 (40–60) | 2.08× | ≥ 2× Redis | met 1/2 |" in peers.table(
        [row], ["chute", "redis"])  # fmt: skip
