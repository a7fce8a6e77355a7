"""The stalls benchmark (`python -m benchmarks.stalls`) run tiny as a subprocess: a 20,000-message backlog, a few
seconds of steady publishing, and a report with latency and loop-lag figures read from a real /metrics. Speed is
never asserted here (benchmarks measure; tests check that they work)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.stalls import bucket_quantile

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(90)
def test_a_tiny_stalls_run_reports_latency_and_loop_lag(tmp_path):
    log = tmp_path / "broker.log"
    command = [sys.executable, "-W", "error", "-m", "benchmarks.stalls", "--backlog", "20000", "--rate", "500",
               "--duration", "3", "--fsync", "never", "--restart", "--broker-log", str(log), "--json"]  # fmt: skip
    env = {**os.environ, "CHUTE_HOLD_REPORT_MS": "5000"}  # (the broker's and the harness's reports on; none due)
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=80, env=env)
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
    slowest = report["slowest"]  # where the slowest waited: every message confirmed and received, so all split
    assert slowest["messages"] >= 2 and slowest["bound_ms"] <= latency["max"]
    assert 0 <= slowest["sent_while_a_child_ran"] <= slowest["messages"]
    assert 0 <= slowest["share_of_run_with_a_child"] <= 1
    assert 0 < slowest["all"]["confirm_wait_ms_median"] <= slowest["slow"]["confirm_wait_ms_max"] + latency["max"]
    assert slowest["harness_lag_max_ms"] > 0
    causes = slowest["in_flight_during"]  # the broker's log was read for slow fsyncs and holds (none here)
    assert causes["a slow fsync (broker log)"] == causes["a loop hold (broker log)"] == 0
    assert causes["none of these"] <= slowest["messages"]
    assert "native protocol listening" in log.read_text()


def test_quantiles_come_from_the_bucket_counts_between_two_scrapes():
    before = {0.001: 10.0, 0.01: 10.0, 0.1: 10.0, math.inf: 10.0}
    after = {0.001: 100.0, 0.01: 108.0, 0.1: 109.0, math.inf: 110.0}  # 90, 8, 1, 1 new observations
    assert bucket_quantile(before, after, 0.5) == 0.001
    assert bucket_quantile(before, after, 0.99) == 0.1
    assert bucket_quantile(before, after, 0.999) == math.inf
    assert math.isnan(bucket_quantile(after, after, 0.5))
    assert math.isnan(bucket_quantile({}, {}, 0.5))  # a broker without the histogram


def test_the_slowest_messages_are_placed_against_children_and_the_harness():
    from benchmarks.tail import Timeline, explain_tail

    timeline = Timeline(1000)
    for i in range(1000):  # one message a ms; each confirmed after 1 ms and received 0.5 ms later
        timeline.send(i * 0.001)
        timeline.confirmed[i] = i * 0.001 + 0.001
        timeline.received[i] = i * 0.001 + 0.0015
    timeline.confirmed[500] = 0.5 + 0.030  # the slowest: its commit took 30 ms ...
    timeline.received[500] = 0.5 + 0.031
    timeline.confirmed[900] = 0.9 + 0.001  # ... and this one waited 20 ms after its confirm
    timeline.received[900] = 0.9 + 0.021
    tail = explain_tail(timeline, child_spans=[(0.45, 0.55)], harness_late=[(0.92, 0.01)], quantile=99.8)
    assert tail["messages"] == 2 and tail["bound_ms"] == pytest.approx(21)
    assert tail["sent_while_a_child_ran"] == 1 and tail["children"] == 1
    assert tail["share_of_run_with_a_child"] == pytest.approx(0.1, rel=0.01)
    assert tail["in_flight_during"]["a late wake of the harness"] == 1 and tail["harness_late_wakes"] == 1
    assert tail["slow"]["confirm_wait_ms_max"] == pytest.approx(30)
    assert tail["slow"]["confirm_to_delivery_ms_max"] == pytest.approx(20)
    assert tail["all"]["confirm_wait_ms_median"] == pytest.approx(1)
    assert explain_tail(Timeline(), [], []) == {"messages": 0}
    assert explain_tail(Timeline(10), [], []) == {"messages": 0}  # (none sent yet)


def test_a_child_of_the_broker_is_seen_while_it_runs():
    from benchmarks.tail import ChildWatch

    watch = ChildWatch(os.getpid(), interval=0.002).start()
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not watch.has_child() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        child.communicate(b"", timeout=10)
    spans = watch.stop()
    assert len(spans) == 1 and spans[0][0] < spans[0][1]


def test_slow_messages_sent_close_together_are_one_episode():
    from benchmarks.tail import Timeline, explain_tail

    timeline = Timeline(2000)
    for i in range(2000):
        timeline.send(i * 0.001)
        timeline.confirmed[i] = i * 0.001 + 0.001
        timeline.received[i] = i * 0.001 + 0.002
    for i in (100, 101, 102, 1500):  # a burst of three, then one alone much later
        timeline.confirmed[i] += 0.010 if i < 1500 else 0.030
        timeline.received[i] += 0.010 if i < 1500 else 0.030
    tail = explain_tail(timeline, [(1.4, 1.6)], [(0.105, 0.004)], quantile=99.8, wall_offset=1000.0)
    first, second = tail["episodes"]  # worst first
    assert first["messages"] == 1 and first["latency_max_ms"] == pytest.approx(32) and first["child"]
    assert first["at"] == pytest.approx(1001.5) and first["harness_late_max_ms"] == 0
    assert second["messages"] == 3 and second["confirm_wait_max_ms"] == pytest.approx(11)
    assert second["harness_late_max_ms"] == pytest.approx(4) and not second["child"]


def test_the_canary_notes_a_stop_it_did_not_wait_a_core_for():
    from benchmarks.tail import Canary

    canary = Canary().start()
    try:
        time.sleep(0.05)  # (its 1 ms loop runs once start() returns)
        os.kill(canary._process.pid, signal.SIGSTOP)  # not run at all for 80 ms, like a VM not scheduled
        time.sleep(0.08)
        os.kill(canary._process.pid, signal.SIGCONT)
        time.sleep(0.05)
    finally:
        late = canary.stop()
    worst = max(late, key=lambda wake: wake[1])
    woke, lateness, waited, _steal = worst
    assert 0.06 <= lateness <= 5, late
    assert waited < lateness / 2  # stopped, not runnable: no run-queue wait
    assert time.perf_counter() - 5 < woke <= time.perf_counter()  # on this process's clock


def test_the_slowest_are_counted_against_each_source_and_the_broker_log(tmp_path):
    from benchmarks.tail import Timeline, broker_log_spans, explain_tail

    timeline = Timeline(1000)
    for i in range(1000):
        timeline.send(100.0 + i * 0.001)  # (perf_counter scale: 100 s on)
        timeline.confirmed[i] = timeline.received[i] = 100.0 + i * 0.001 + 0.001
    for i in (200, 600, 900):
        timeline.received[i] += 0.02
    wall_offset = time.mktime(time.strptime("2026-12-06 18:00:00", "%Y-%m-%d %H:%M:%S")) - 100.0
    log = tmp_path / "broker.log"
    log.write_text(  # an fsync logged as it ended at 100.215 s, a hold at 100.615 s, and lines to skip
        "2026-12-06 18:00:00,215 WARNING chute.holds: a group commit's fsync took 12.5 ms\n"
        "2026-12-06 18:00:00,615 WARNING chute.holds: event loop held ~14.0 ms; the loop thread ran 13.0 ms\n"
        "  1 sample(s):\n"
        "2026-12-06 18:00:00,700 INFO chute.server: something else\n"
    )
    spans = broker_log_spans(str(log), wall_offset)
    assert spans["a slow fsync (broker log)"][0][0] == pytest.approx(100.2025)
    tail = explain_tail(timeline, [], [], quantile=99.7, wall_offset=wall_offset, other_spans=spans)
    assert tail["in_flight_during"] == {
        "a late wake of the harness": 0, "a late wake of the canary": 0, "a checkpoint child": 0,
        "a slow fsync (broker log)": 1, "a loop hold (broker log)": 1, "none of these": 1,
    }  # fmt: skip
