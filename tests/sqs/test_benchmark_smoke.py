"""`python -m benchmarks.sqs` still runs end to end with each kind of client (a few hundred messages: a smoke test
of the benchmark, not a measurement)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("client", ["boto3", "boto3-lean", "raw"])
def test_the_benchmark_moves_every_message(client, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.sqs", "--client", client, "--messages", "200", "--threads", "2",
         "--max-seconds", "60", "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["client"] == client
    assert result["sent"] == result["received"] == result["deleted"] == 200
    assert result["send_errors"] == 0 and result["msgs_per_s"] > 0
    assert list(tmp_path.iterdir()) == []  # the server's data directory is removed
