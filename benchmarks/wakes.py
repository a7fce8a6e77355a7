"""What a wake-up and a lone group commit cost on this machine, without the broker (issue 16, "CPU at low rates").

    python -m benchmarks.wakes [--rate 200] [--count 3000] [--repeat 3] [--mode M ...] [--json]

At a low rate every message a broker handles is a wake-up of its own, so its CPU per message is mostly what a
wake-up costs, times the wake-ups per message. This measures the parts in isolation, at `--rate` operations per
second, each mode in a fresh subprocess, modes interleaved `--repeat` times:

- `sleep`: a thread that only sleeps between operations (`time.sleep`): the kernel's and the machine's cost of
  one wake-up, with next to no Python;
- `loop`: an asyncio loop (uvloop, as `chute serve`) woken by a timer that does nothing: the event loop's cost
  of one wake-up;
- `thread`: each operation a group commit as the file store makes one (chute/storage/file/log.py): the loop hands
  600 bytes to a writer thread through a queue, the thread `pwrite`s them into space reserved ahead and
  `fdatasync`s, then calls back into the loop with `call_soon_threadsafe`;
- `inline`: the same commit on the loop's own thread (the loop blocks for the sync; Redis's `appendfsync
  always` does this, Chute's design does not);
- `aio`: the loop `pwrite`s, then submits the sync as a Linux AIO `IOCB_CMD_FDSYNC` request that signals an
  eventfd the loop watches (no thread of ours; the kernel runs the sync in a worker of its own). Linux x86-64
  and arm64 only.

For each it reports per operation: the process's CPU (its threads' run time from /proc/<pid>/task/*/schedstat),
the whole machine's (every task's run time, kernel workers included, so work moved out of the process is still
counted; tasks that end during the run are not), the process's context switches, and the latency of a commit
(hand-over to confirmed). Run it on a quiet machine: every other task's run time lands in the machine column
(about 45 µs per operation at 200/s on an idle 2-vCPU VM: compare `sleep`'s two columns).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import platform
import queue
import subprocess
import sys
import threading
import time

from chute.bench import context_switches

MODES = ("sleep", "loop", "thread", "inline", "aio")
DATA = b"x" * 600  # a lone 256-byte message's group, about
RESERVE = 64 << 20
# (io_setup, io_getevents, io_submit) by machine; the generic table is arm64's
AIO_SYSCALLS = {"x86_64": (206, 208, 209), "aarch64": (0, 4, 2)}
IOCB_CMD_FDSYNC, IOCB_FLAG_RESFD = 3, 1


def task_run_ns(pid: int | str = "self") -> int:
    """Run time of every thread of a process, from schedstat (ns)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError):  # the thread ended meanwhile
            pass
    return total


def machine_run_ns() -> dict[tuple[str, str], int]:
    """Run time of every task on the machine, kernel threads included, by (pid, tid), in ns (schedstat: exact,
    where /proc/stat's ticks miss short bursts on a tickless VM)."""
    times = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                        times[pid, tid] = int(f.read().split()[0])
            except (OSError, ValueError):  # gone meanwhile
                pass
    return times


def machine_delta_ns(before: dict[tuple[str, str], int], after: dict[tuple[str, str], int]) -> int:
    """Run time between two readings of the tasks alive at the second (one that ended meanwhile is not counted:
    an under-count, never a negative figure)."""
    return sum(ns - before.get(task, 0) for task, ns in after.items())


class _Iocb(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("key", ctypes.c_uint32), ("rw_flags", ctypes.c_int32),
                ("lio_opcode", ctypes.c_uint16), ("reqprio", ctypes.c_int16), ("fildes", ctypes.c_uint32),
                ("buf", ctypes.c_uint64), ("nbytes", ctypes.c_uint64), ("offset", ctypes.c_int64),
                ("reserved2", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("resfd", ctypes.c_uint32)]  # fmt: skip


class _IoEvent(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64), ("res", ctypes.c_int64),
                ("res2", ctypes.c_int64)]  # fmt: skip


class _Aio:
    """One Linux AIO context whose fdatasync requests of one file signal an eventfd."""

    def __init__(self, fd: int) -> None:
        numbers = AIO_SYSCALLS.get(platform.machine())
        if numbers is None:
            raise RuntimeError(f"aio: no syscall numbers for {platform.machine()}")
        self._setup, self._getevents, self._submit = numbers
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._ctx = ctypes.c_ulong(0)
        if self._libc.syscall(self._setup, 64, ctypes.byref(self._ctx)) != 0:
            raise OSError(ctypes.get_errno(), "io_setup")
        self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._iocb = _Iocb(lio_opcode=IOCB_CMD_FDSYNC, fildes=fd, flags=IOCB_FLAG_RESFD, resfd=self.eventfd)
        self._list = (ctypes.POINTER(_Iocb) * 1)(ctypes.pointer(self._iocb))
        self._events = (_IoEvent * 16)()
        self._no_wait = (ctypes.c_long * 2)(0, 0)

    def submit_fdatasync(self) -> None:
        if self._libc.syscall(self._submit, self._ctx, 1, self._list) != 1:
            raise OSError(ctypes.get_errno(), "io_submit")

    def reap(self) -> int:
        """The syncs finished since the last call (their eventfd read); raises if one failed."""
        try:
            os.eventfd_read(self.eventfd)
        except BlockingIOError:
            return 0
        n = self._libc.syscall(self._getevents, self._ctx, 0, len(self._events), self._events, self._no_wait)
        if n < 0:
            raise OSError(ctypes.get_errno(), "io_getevents")
        for i in range(n):
            if self._events[i].res < 0:
                raise OSError(-self._events[i].res, "aio fdatasync")
        return n


def _run_sleep(rate: float, count: int) -> list[float]:
    interval, due = 1 / rate, time.monotonic()
    for _ in range(count):
        due += interval
        time.sleep(max(0.0, due - time.monotonic()))
    return []


async def _run_loop(mode: str, rate: float, count: int, path: str) -> list[float]:
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    done = loop.create_future()
    fd = -1
    pos = 0

    def finished(started: float) -> None:
        latencies.append(time.perf_counter() - started)
        if len(latencies) == count and not done.done():
            done.set_result(None)

    if mode == "loop":

        def operate(started: float) -> None:
            finished(started)
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.posix_fallocate(fd, 0, RESERVE)
        os.fsync(fd)
        if mode == "thread":
            jobs: queue.SimpleQueue = queue.SimpleQueue()

            def serve() -> None:
                while (job := jobs.get()) is not None:
                    at, started = job
                    os.pwrite(fd, DATA, at)
                    os.fdatasync(fd)
                    loop.call_soon_threadsafe(finished, started)

            threading.Thread(target=serve, daemon=True).start()

            def operate(started: float) -> None:
                nonlocal pos
                jobs.put((pos, started))
                pos += len(DATA)
        elif mode == "inline":

            def operate(started: float) -> None:
                nonlocal pos
                os.pwrite(fd, DATA, pos)
                os.fdatasync(fd)
                pos += len(DATA)
                finished(started)
        else:  # aio
            aio = _Aio(fd)
            waiting: list[float] = []

            def operate(started: float) -> None:
                nonlocal pos
                os.pwrite(fd, DATA, pos)
                pos += len(DATA)
                waiting.append(started)
                aio.submit_fdatasync()

            def reaped() -> None:
                for _ in range(aio.reap()):
                    finished(waiting.pop(0))

            loop.add_reader(aio.eventfd, reaped)

    interval, due = 1 / rate, loop.time()
    try:
        for _ in range(count):
            due += interval
            await asyncio.sleep(max(0.0, due - loop.time()))
            operate(time.perf_counter())
        await asyncio.wait_for(done, 30.0)
    finally:
        if fd >= 0:
            os.close(fd)
            os.unlink(path)
    return latencies


def measure(mode: str, rate: float, count: int) -> dict[str, float]:
    """Run one mode in this process; per operation figures."""
    import uvloop  # (imported before the readings: its cost is not an operation's)

    path = f"{os.environ.get('TMPDIR', '/tmp')}/chute-wakes-{os.getpid()}.dat"
    machine = machine_run_ns()  # scanned before the process's own reading starts and after it ends: not counted
    pid = os.getpid()
    cpu, switched, started = task_run_ns(), context_switches(pid), time.perf_counter()
    latencies = _run_sleep(rate, count) if mode == "sleep" else uvloop.run(_run_loop(mode, rate, count, path))
    seconds, cpu, switched = time.perf_counter() - started, task_run_ns() - cpu, context_switches(pid) - switched
    machine_ns = machine_delta_ns(machine, machine_run_ns())
    result = {
        "process CPU µs": cpu / count / 1e3,
        "machine CPU µs": machine_ns / count / 1e3,
        "switches": switched / count,
        "seconds": seconds,
    }
    if latencies:
        latencies.sort()
        result["p50 ms"] = latencies[len(latencies) // 2] * 1e3
        result["p99 ms"] = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=200.0, help="operations per second (default 200)")
    parser.add_argument("--count", type=int, default=3000, help="operations per run (default 3,000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each mode, interleaved (default 3)")
    parser.add_argument("--mode", action="append", choices=MODES, help="repeatable; default: all")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # a child: run one mode, print JSON
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.count < 1 or args.repeat < 1:
        parser.error("--rate, --count and --repeat must be positive")
    if args.one:
        print(json.dumps(measure(args.one, args.rate, args.count)))
        return 0
    runs: dict[str, list[dict[str, float]]] = {}
    for _ in range(args.repeat):
        for mode in args.mode or MODES:
            child = subprocess.run(
                [sys.executable, "-m", "benchmarks.wakes", "--one", mode, "--rate", str(args.rate),
                 "--count", str(args.count)], capture_output=True, text=True, timeout=args.count / args.rate + 120,
            )  # fmt: skip
            if child.returncode != 0:
                print(f"{mode}: failed: {child.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            runs.setdefault(mode, []).append(json.loads(child.stdout))
    if args.json:
        print(json.dumps({"rate": args.rate, "count": args.count, "runs": runs}, indent=2))
        return 0
    print(f"{args.count} operations at {args.rate:g}/s, per operation (each run; median first)")
    for mode, results in runs.items():
        cells = []
        for key in ("process CPU µs", "machine CPU µs", "switches", "p50 ms", "p99 ms"):
            values = sorted(r[key] for r in results if key in r)
            if values:
                shown = ", ".join(f"{v:.3g}" if v < 10 else f"{v:.0f}" for v in values)
                cells.append(f"{key} {values[len(values) // 2]:.3g} ({shown})")
        print(f"{mode:7} " + " · ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
