"""chute_event_loop_lag_seconds: a loop held for 50 ms shows in the right bucket of a real /metrics scrape; an idle
loop's ticks stay in the smallest buckets; the monitor stops with the server. chute_event_loop_lag_on_cpu_seconds
and chute_event_loop_lag_waiting_seconds tell a loop held by its own work (on the CPU) from one whose thread was
starved of a core (waiting) or blocked (neither)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chute.server.looplag import DEFAULT_INTERVAL_S, INTERVAL_ENV, LAG_BUCKETS_S, LoopLagMonitor, interval_from_env
from chute.testing import serving
from tests.metrics.knobs import assert_refused

pytestmark = pytest.mark.timeout(30)


async def lag_samples(server, family: str = "chute_event_loop_lag") -> dict[str, float]:
    """The histogram's samples by bucket bound (`count`, `sum`, `max` too), from a real GET /metrics."""
    async with aiohttp.ClientSession() as http, http.get(f"{server.http_url}/metrics") as response:
        text = await response.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {}
    for sample in families[f"{family}_seconds"].samples:
        key = sample.labels.get("le") or sample.name.rsplit("_", 1)[1]
        samples[key] = sample.value
    samples["max"] = families[f"{family}_max_seconds"].samples[0].value
    assert families[f"{family}_seconds"].type == "histogram"
    return samples


def tick_every_millisecond(server) -> None:
    """Restart the server's monitor with a 1 ms tick: a tick falls due within a millisecond of a hold's start, so
    its lag is about the hold."""
    monitor = server.server.loop_lag
    monitor.stop()
    monitor.interval_s = 0.001
    monitor.start()


def over_25_ms(samples: dict[str, float]) -> float:
    return samples["+Inf"] - samples["0.025"]


def spin(seconds: float) -> None:
    """Hold the thread on the CPU for `seconds` of its own CPU time (the server's own work, however loaded the
    machine), unlike time.sleep (a thread that is not running)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


async def test_a_hold_on_the_cpu_is_told_from_a_thread_that_was_not_running() -> None:
    """Two 60 ms holds: a busy loop (its thread computing) and a sleeping one (standing for a thread that waits for
    a core or in the kernel). Both are lags; only the first shows as a lag on the CPU."""
    async with serving() as server:
        tick_every_millisecond(server)
        await asyncio.sleep(0.05)
        before = await lag_samples(server, "chute_event_loop_lag_on_cpu")
        await asyncio.sleep(0)
        time.sleep(0.06)  # off the CPU
        await asyncio.sleep(0.01)
        off = await lag_samples(server, "chute_event_loop_lag_on_cpu")
        lag = await lag_samples(server)
        assert lag["max"] >= 0.055, lag
        # the sleeping hold's tick: lag ~60 ms, but its thread used at most a few ms of CPU since the tick before
        assert over_25_ms(off) == over_25_ms(before), (before, off)
        await asyncio.sleep(0)
        spin(0.06)  # on the CPU
        await asyncio.sleep(0.01)
        on = await lag_samples(server, "chute_event_loop_lag_on_cpu")
        assert over_25_ms(on) >= 1 + over_25_ms(off), (off, on)
        assert on["max"] >= 0.05, on


async def test_a_held_loop_is_counted_in_its_bucket() -> None:
    async with serving() as server:
        tick_every_millisecond(server)
        await asyncio.sleep(0.05)
        before = await lag_samples(server)
        await asyncio.sleep(0)
        time.sleep(0.05)  # the stall: the loop is held for 50 ms
        await asyncio.sleep(0.01)
        after = await lag_samples(server)
        new = {bound: after[bound] - before[bound] for bound in ("0.025", "0.05", "0.1", "+Inf")}
        # the tick due during the hold ran ~50 ms late: in the bucket (0.025, 0.05], or the next one when the
        # machine adds a few milliseconds of its own
        assert new["0.1"] - new["0.025"] >= 1, (before, after)
        assert after["max"] >= 0.045  # (the largest since start: a busy machine may have stalled it earlier)
        assert after["count"] == after["+Inf"] and after["sum"] >= 0.045


async def test_an_idle_loop_shows_no_stall_and_the_monitor_stops_with_the_server() -> None:
    async with serving() as server:
        monitor = server.server.loop_lag
        assert monitor.running and monitor.interval_s == 0.1
        monitor.stop()
        monitor.interval_s = 0.005
        monitor.start()
        await asyncio.sleep(0.2)
        samples = await lag_samples(server)
        assert samples["count"] >= 10
        assert samples["0.025"] >= samples["count"] - 2  # an idle loop: no tick more than 25 ms late, bar noise
    assert not monitor.running


@contextlib.contextmanager
def sharing_one_core():
    """The calling thread pinned to one core with a process that spins on it: each gets about half of it."""
    before = os.sched_getaffinity(0)
    core = min(before)
    spin_there = f"import os; os.sched_setaffinity(0, {{{core}}})\nwhile True: pass"
    spinner = subprocess.Popen([sys.executable, "-c", spin_there])
    os.sched_setaffinity(0, {core})  # (0: this thread only)
    try:
        deadline = time.monotonic() + 10
        while os.sched_getaffinity(spinner.pid) != {core}:  # the spinner has pinned itself
            assert time.monotonic() < deadline and spinner.poll() is None
            time.sleep(0.001)
        yield
    finally:
        os.sched_setaffinity(0, before)
        spinner.kill()
        spinner.wait()


@pytest.mark.skipif(not os.path.exists("/proc/thread-self/schedstat"), reason="the run-queue wait is Linux's")
async def test_a_loop_starved_of_its_core_shows_the_wait_as_the_machines() -> None:
    """The loop's thread wants the CPU for 120 ms but shares its core with a spinning process: the tick's lag is
    ~120 ms, of which about half on the CPU and half waiting for the core, and the waiting part is reported."""
    async with serving() as server:
        tick_every_millisecond(server)
        await asyncio.sleep(0.05)
        before = await lag_samples(server, "chute_event_loop_lag_waiting")
        with sharing_one_core():
            await asyncio.sleep(0)
            end = time.monotonic() + 0.12
            while time.monotonic() < end:
                pass
            await asyncio.sleep(0.01)
        waiting = await lag_samples(server, "chute_event_loop_lag_waiting")
        on_cpu = await lag_samples(server, "chute_event_loop_lag_on_cpu")
        lag = await lag_samples(server)
    assert lag["max"] >= 0.11, lag
    assert over_25_ms(waiting) >= 1 + over_25_ms(before), (before, waiting)  # ~60 ms of that tick's lag waited
    assert waiting["max"] >= 0.03, (waiting, on_cpu, lag)
    assert on_cpu["max"] <= lag["max"] - 0.03, (waiting, on_cpu, lag)


def test_observations_land_in_the_first_bucket_at_or_above_them() -> None:
    monitor = LoopLagMonitor()
    for lag in (-0.001, 0.0005, 0.003, 0.05, 2.0):
        monitor.observe(lag)
    cumulative = dict(monitor.cumulative())
    assert list(cumulative) == [*map(str, LAG_BUCKETS_S), "+Inf"]
    assert cumulative["0.0005"] == 2  # a negative lag (a timer run early) counts as 0
    assert cumulative["0.005"] == 3 and cumulative["0.025"] == 3 and cumulative["0.05"] == 4
    assert cumulative["1.0"] == 4 and cumulative["+Inf"] == 5
    assert monitor.max_s == 2.0 and monitor.count == 5
    assert dict(monitor.on_cpu.cumulative()) == cumulative  # no CPU time given: all of each lag counts on CPU


def test_the_on_cpu_part_is_never_more_than_the_lag_nor_the_threads_cpu() -> None:
    monitor = LoopLagMonitor()
    monitor.observe(0.030, cpu_s=0.002)  # late 30 ms, the thread ran 2 ms: 2 ms on CPU
    monitor.observe(0.003, cpu_s=0.050)  # late 3 ms after 50 ms of work before it fell due: at most 3 ms
    monitor.observe(-0.001, cpu_s=0.001)  # early: nothing
    assert monitor.max_s == 0.030 and monitor.on_cpu.max_s == 0.003
    assert dict(monitor.on_cpu.cumulative())["0.0025"] == 2 and monitor.on_cpu.count == 3
    assert monitor.on_cpu.sum_s == pytest.approx(0.005)
    assert monitor.waiting.count == 3 and monitor.waiting.sum_s == 0  # no run-queue wait given


def test_the_parts_of_a_lag_never_add_up_to_more_than_it() -> None:
    monitor = LoopLagMonitor()
    monitor.observe(0.030, cpu_s=0.002, waited_s=0.025)  # 2 ms on CPU, 25 waiting for a core, 3 blocked
    monitor.observe(0.020, cpu_s=0.015, waited_s=0.040)  # waited longer than the lag left: capped at 5 ms
    monitor.observe(0.004, cpu_s=0.010, waited_s=0.010)  # all on CPU: nothing left to wait
    assert monitor.waiting.max_s == pytest.approx(0.025) and monitor.waiting.sum_s == pytest.approx(0.030)
    assert monitor.on_cpu.sum_s == pytest.approx(0.021)
    assert dict(monitor.waiting.cumulative())["0.0005"] == 1


def test_the_interval_can_be_set_for_a_benchmark(monkeypatch) -> None:
    """CHUTE_LOOP_LAG_INTERVAL_S sets the tick (benchmarks/stalls.py asks for 2 ms to see every hold); a value
    that is not seconds from 0.001 to 10 is refused by `chute serve` with its name, before anything starts."""
    monkeypatch.setenv(INTERVAL_ENV, "0.002")
    assert LoopLagMonitor().interval_s == 0.002
    assert LoopLagMonitor(0.5).interval_s == 0.5  # an explicit interval wins
    assert_refused(monkeypatch, INTERVAL_ENV, ("abc", "0", "-1", "nan", "11", ""), interval_from_env,
                   f"{INTERVAL_ENV} must be a number of seconds from 0.001 to 10")  # fmt: skip
    monkeypatch.delenv(INTERVAL_ENV)
    assert LoopLagMonitor().interval_s == DEFAULT_INTERVAL_S


async def test_a_server_started_with_the_interval_ticks_that_often(monkeypatch) -> None:
    monkeypatch.setenv(INTERVAL_ENV, "0.002")
    async with serving() as server:
        assert server.server.loop_lag.interval_s == 0.002
        await asyncio.sleep(0.2)
        assert (await lag_samples(server))["count"] >= 30  # (at 0.1 s, two ticks at most)
