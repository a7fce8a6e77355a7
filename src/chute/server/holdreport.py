"""Whose code held the event loop: a diagnostic that names the stalls the lag histogram only counts.

`chute_event_loop_lag_*` (looplag.py) says how often and how long the loop was held, not by what. With
CHUTE_HOLD_REPORT_MS set (a threshold in milliseconds, 2 to 10,000), `chute serve` also runs a `HoldReporter`: a
heartbeat timer on the loop every threshold/4 and a daemon thread that wakes as often. When the thread finds the
heartbeat older than the threshold, the loop is held: it takes the loop thread's Python stack
(`sys._current_frames`) at each wake until the heartbeat runs again, then logs one warning on `chute.holds`: how
long the hold was, the stacks it saw (most frequent first) and any garbage collection that ran during it. For
soaks and operators chasing a stall; off by default.

What a sample shows: the sampling thread needs the GIL, so it sees the loop thread between two bytecodes, or
inside a call that released the GIL (a system call, a `ctypes` call). A hold inside one long C call that keeps
the GIL (a collection, a big copy) is seen once it returns, as the frame that made it: collections are therefore
timed separately, through `gc.callbacks`. A loop thread outside any Python frame of its own (only the runner's)
is in the event loop's C code: a system call, or waiting for the GIL; so each sample also notes where the
server's other threads were, those whose CPU clock advanced since the previous sample (the log's writer and
reader, a checkpoint's threads): the GIL's likely holders. The warning also gives the CPU time the loop thread
used during the hold (from its heartbeats): a hold with little of it was the loop thread off the CPU (a blocking
call, the GIL, no free core, or a machine that paused), not work of the loop's. Which of those, each sample notes
from the kernel (Linux: /proc/self/task/N/stat and wchan): the loop thread runnable (`R`: running, or waiting for
a core), or asleep and where (`futex_...`: the GIL or a lock; `do_epoll_wait`: idle in the loop's poll, so the
heartbeat's timer itself came late; a disk wait, `D`). A sample is taken while the sampling thread holds the GIL,
so a loop thread busy in Python is seen runnable or waiting to take the GIL back: read the states with its CPU
time (off the CPU and `futex_...`: another thread held the GIL, or the loop waited for a lock).

Invariants:
- cost while enabled: one loop timer and one thread wake-up per threshold/4, plus one callback per collection;
  nothing per message; a stack is taken only while a hold is in progress;
- the loop and the thread share a heartbeat (a tuple the loop writes), the loop's last few long gaps between
  heartbeats (a hold's length is the loop's own gap, not the time until the reporting thread next woke) and a
  short list of long collections; each list is replaced whole by the thread that writes it and read by the
  reporter, and a note lost in a race costs nothing but that line of a report (or a hold measured to the
  latest heartbeat);
- one warning per hold, at most `MAX_STACKS` distinct stacks of `STACK_DEPTH` frames each, so a long hold does
  not flood the log;
- `stop()` ends the thread and the timer and removes the collector callback (idempotent).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import os
import sys
import threading
import time

from chute.server.looplag import number_from_env

log = logging.getLogger("chute.holds")

ENV = "CHUTE_HOLD_REPORT_MS"
STACK_DEPTH = 8  # innermost frames kept per sample
MAX_STACKS = 3  # distinct stacks per report
IDLE_MODULES = {"threading.py", "thread.py", "queue.py", "selectors.py"}  # a thread whose innermost frame is here waits
BUSY_CPU_S = 0.0001  # another thread that ran more CPU than this between two samples of a hold was at work


def threshold_from_env() -> float | None:
    """The threshold in seconds from CHUTE_HOLD_REPORT_MS (2 to 10,000 ms), None when unset; ValueError else."""
    value = number_from_env(ENV, 2, 10_000, "milliseconds")
    return None if value is None else value / 1000


class HoldReporter:
    """Logs, for each hold of the loop longer than `threshold_s`, where the loop thread was. `start()` on the
    loop's thread, `stop()` when done."""

    def __init__(self, threshold_s: float) -> None:
        self.threshold_s = threshold_s
        self.tick_s = max(threshold_s / 4, 0.0005)
        self.reports = 0  # holds reported (for tests)
        self._beat = (0.0, 0.0)  # (monotonic time, the loop thread's CPU time) of its latest heartbeat
        self._gaps: list[tuple[tuple[float, float], tuple[float, float]]] = []  # (beat, the next one) of long gaps
        self._handle: asyncio.TimerHandle | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._loop_ident = 0
        self._loop_native_id = 0
        self._gc_started = 0.0
        self._collections: list[tuple[int, float, float, int]] = []  # (generation, s, end, freed) of long ones

    def start(self) -> None:
        if self._thread is not None:
            return
        self._loop_ident = threading.get_ident()
        self._loop_native_id = threading.get_native_id()
        self._heartbeat(asyncio.get_running_loop())
        gc.callbacks.append(self._on_gc)
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="chute-hold-reporter", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=1.0)
            self._thread = None
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _heartbeat(self, loop: asyncio.AbstractEventLoop) -> None:
        beat = (time.monotonic(), time.thread_time())  # (one tuple: the thread reads both or neither)
        previous = self._beat
        if previous[0] and beat[0] - previous[0] > self.threshold_s + self.tick_s:
            # the hold's end as the loop saw it: the reporting thread may wake well after it (it needs a core
            # and the GIL), and the latest beat it then reads would add its own lateness to the hold
            self._gaps = [*self._gaps[-7:], (previous, beat)]
        self._beat = beat
        self._handle = loop.call_later(self.tick_s, self._heartbeat, loop)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            end = time.perf_counter()
            if end - self._gc_started >= self.threshold_s / 4:  # worth naming in a report
                note = (info.get("generation", -1), end - self._gc_started, time.monotonic(), info.get("collected", 0))
                self._collections = [*self._collections[-7:], note]

    def _watch(self) -> None:
        stacks: collections.Counter[tuple[str, ...]] = collections.Counter()
        others: collections.Counter[str] = collections.Counter()
        states: collections.Counter[str] = collections.Counter()  # the loop thread's, in the kernel
        cpu_seen: dict[int, float] = {}  # each other thread's CPU time at the previous sample of this hold
        held_since = (0.0, 0.0)  # the heartbeat a hold in progress started from ((0, 0): none)
        while not self._stop.wait(self.tick_s):
            beat = self._beat
            if held_since[0] and beat != held_since:  # the loop ran its heartbeat again: the hold is over
                end = next((after for before, after in self._gaps if before == held_since), beat)
                held_s, loop_cpu_s = end[0] - held_since[0] - self.tick_s, end[1] - held_since[1]
                self._report(held_since[0], held_s, loop_cpu_s, stacks, others, states)
                stacks, others, states = collections.Counter(), collections.Counter(), collections.Counter()
                cpu_seen = {}
                held_since = (0.0, 0.0)
            if time.monotonic() - beat[0] > self.threshold_s + self.tick_s:  # the next beat is a threshold late
                held_since = beat
                state = _kernel_state(self._loop_native_id)
                if state is not None:
                    states[state] += 1
                frames = sys._current_frames()
                frames.pop(threading.get_ident(), None)
                frame = frames.pop(self._loop_ident, None)
                if frame is not None:
                    stacks[_stack(frame)] += 1
                threads = {thread.ident: thread for thread in threading.enumerate()}
                for ident, other in frames.items():  # the server's other threads that ran since the last sample
                    thread = threads.get(ident)
                    cpu = _thread_cpu(thread.native_id) if thread is not None and thread.native_id else None
                    where, before = _stack(other), cpu_seen.get(ident)
                    cpu_seen[ident] = cpu
                    if cpu is None:  # (no CPU clock: judge by where it is)
                        ran = bool(where) and where[0].split(":", 1)[0] not in IDLE_MODULES
                    else:  # (a hold's first sample is the baseline)
                        ran = before is not None and cpu - before > BUSY_CPU_S
                    if ran:
                        others[f"{thread.name if thread is not None else ident}: {where[0] if where else '?'}"] += 1

    def _report(self, since: float, held_s: float, loop_cpu_s: float, stacks: collections.Counter,
                others: collections.Counter, states: collections.Counter) -> None:  # fmt: skip
        lines = [f"event loop held ~{held_s * 1000:.1f} ms; the loop thread ran {loop_cpu_s * 1000:.1f} ms of CPU "
                 "meanwhile" + (" (off the CPU most of the hold: blocked in a system call, waiting for the GIL or for "
                                "a core, or the machine paused)" if loop_cpu_s < held_s / 2 else "")]  # fmt: skip
        if states:
            lines.append("  the loop thread in the kernel (samples): " + ", ".join(
                f"{state} ({count})" for state, count in states.most_common()))  # fmt: skip
        for generation, took, end, freed in self._collections:
            if end >= since:  # ended during this hold (with the unreachable objects it freed: cycles of garbage)
                lines.append(f"  garbage collection of generation {generation}: {took * 1000:.1f} ms, {freed} freed")
        for stack, count in stacks.most_common(MAX_STACKS):
            lines.append(f"  {count} sample(s):")
            lines.extend(f"    {frame}" for frame in stack)
        if others:
            lines.append("  other threads at work meanwhile (samples): " + ", ".join(
                f"{where} ({count})" for where, count in others.most_common(MAX_STACKS)))  # fmt: skip
        log.warning("\n".join(lines))
        self.reports += 1  # (after the warning is logged: a test that saw the count may read the warning)


def _thread_cpu(native_id: int) -> float | None:
    """The CPU time (s) this process's thread `native_id` has run, from /proc (Linux); None if it cannot be read
    (another system, or a thread that has just ended: a file, unlike a pthread handle, is safe to ask then)."""
    try:
        with open(f"/proc/self/task/{native_id}/schedstat", "rb") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def _kernel_state(native_id: int) -> str | None:
    """The thread's scheduler state and, if it sleeps, where in the kernel ('R', 'S futex_do_wait', 'D ...'), from
    /proc (Linux); None if it cannot be read."""
    try:
        with open(f"/proc/self/task/{native_id}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0].decode()
        if state == "R":
            return state
        with open(f"/proc/self/task/{native_id}/wchan", "rb") as f:
            where = f.read().decode(errors="replace").strip()
    except (OSError, ValueError, IndexError):
        return None
    return f"{state} {where}" if where and where != "0" else state


def _stack(frame) -> tuple[str, ...]:
    """The innermost STACK_DEPTH frames as 'module.py:line function', innermost first."""
    out = []
    while frame is not None and len(out) < STACK_DEPTH:
        code = frame.f_code
        out.append(f"{os.path.basename(code.co_filename)}:{frame.f_lineno} {code.co_name}")
        frame = frame.f_back
    return tuple(out)
