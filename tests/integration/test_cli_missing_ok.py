"""`chute queue delete --missing-ok`, `chute topic delete --missing-ok`, and the broker's fsync policy in the first
line of `chute queue list`; each command a subprocess against a real server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import chute
from chute.testing import running_server

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server():
    with running_server(fsync="interval") as running:
        yield running


def run(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chute.cli", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "CHUTE_URL": server.url})  # fmt: skip


@pytest.mark.parametrize("kind", ["queue", "topic"])
def test_delete_missing_ok(server, kind):
    name = f"missing-{kind}"
    refused = run(server, kind, "delete", name)
    assert refused.returncode == 1 and refused.stderr == f"error: {kind} '{name}' does not exist ({kind}_not_found)\n"
    allowed = run(server, kind, "delete", name, "--missing-ok")
    assert (allowed.returncode, allowed.stdout, allowed.stderr) == (0, f"no {kind} {name}: nothing deleted\n", "")
    with chute.Client(server.url) as client:
        getattr(client, f"create_{kind}")(name)
    deleted = run(server, kind, "delete", name, "--missing-ok")
    assert (deleted.returncode, deleted.stdout) == (0, f"deleted {kind} {name}\n")


def test_queue_list_names_the_fsync_policy(server):
    with chute.Client(server.url) as client:
        client.create_queue("listed")
    result = run(server, "queue", "list")
    assert result.returncode == 0, result.stderr
    first, *rest = result.stdout.splitlines()
    assert first == f"chute/{chute.__version__} at 127.0.0.1:{server.port}, fsync interval"
    assert any(line.split()[:1] == ["listed"] for line in rest)
    assert "listed" in [q["name"] for q in json.loads(run(server, "queue", "list", "--json").stdout)]  # JSON only
