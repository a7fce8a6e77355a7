"""Run one test in a Python process of its own: for tests whose cost grows with the size of the test process.

A test that forks the test process pays for every page the process has mapped, at each fork: on the CI machine
kind (a 2-vCPU VM) a fork and exit of a 65 MB Python process take ~2 ms, of a 460 MB one ~28 ms. CI's single
pytest process has grown to ~500 MB by the time the forking model tests run, and they fork it hundreds of times:
the memory store's forked machine took 109 s there against 12 s alone. In a process of its own such a test costs
what it costs alone, plus ~2 s to start.

Invariants: the test runs exactly once (here or in the child, never both); a failure in the child fails the test
here with the child's output; a child never starts another (the variable below names the test it runs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

VARIABLE = "CHUTE_TEST_OWN_PROCESS"
ROOT = Path(__file__).resolve().parent.parent
OUTPUT_KEPT = 30_000  # characters of the child's output shown when it fails


def node_id(test_file: str, *names: str) -> str:
    """A pytest node id for `names` (class, method) in `test_file` (a module's __file__)."""
    return "::".join([Path(test_file).resolve().relative_to(ROOT).as_posix(), *names])


def ran_elsewhere(node: str, timeout: float, env: dict[str, str] | None = None) -> bool:
    """Run the test `node` in a new Python process (with `env` added to this one's environment, e.g. the URL of a
    server this process started) and return True once it passed there. Returns False, having run nothing, when
    this process is that new one: the caller then runs the test itself."""
    if os.environ.get(VARIABLE) == node:
        return False
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=0", node]
    done = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, **(env or {}), VARIABLE: node},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    output = done.stdout[-OUTPUT_KEPT:]
    assert done.returncode == 0, f"{node} failed in a process of its own (exit {done.returncode}):\n{output}"
    print(output)  # shown with -s or -rP: the child's durations
    return True
