"""The README's client and command-line examples, run as written against a real server (on a free port)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from chute.testing import running_server

pytestmark = pytest.mark.timeout(120)

README = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")


def blocks(section: str, language: str) -> list[str]:
    body = README.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", body, re.S)


def test_the_client_examples_run_as_written():
    sync_example, async_example, _testing = blocks("Python clients", "python")
    with running_server() as server:
        exec(sync_example.replace("chute://127.0.0.1:6160", server.url), {})
        wrapped = "import asyncio, chute\nasync def main():\n" + "".join(
            f"    {line}\n" for line in async_example.splitlines()
        )
        os.environ["CHUTE_URL"] = server.url
        try:
            exec(wrapped + "asyncio.run(main())\n", {})
        finally:
            del os.environ["CHUTE_URL"]
        import chute

        with chute.Client(server.url) as client:
            stats = client.queue_stats("jobs")
            assert (stats.ready, stats.in_flight) == (0, 0)  # everything published was consumed and acked
            assert stats.acked == 4 + 10_000


def test_the_command_line_examples_run_as_written():
    [script] = blocks("Command line", "sh")
    lines = [line for line in script.splitlines() if not line.startswith("chute bench")]  # bench: its own tests
    bindir = Path(sys.executable).parent
    with running_server() as server:
        env = {**os.environ, "CHUTE_URL": server.url, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
        result = subprocess.run(["bash", "-e", "-c", "\n".join(lines)], env=env, capture_output=True, text=True,
                                timeout=100)  # fmt: skip
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines.count("one") == lines.count("two") == lines.count('{"resize": 42}') == 1  # consumed once
        assert "Traceback" not in result.stderr


def test_the_http_api_example_runs_as_written():
    [script] = blocks("HTTP API", "sh")
    with running_server() as server:
        script = script.replace("localhost:6161", f"127.0.0.1:{server.http_port}")
        result = subprocess.run(["bash", "-e", "-c", script], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert '"body":"photo 42"' in result.stdout  # the receive got the published message
        import chute

        with chute.Client(server.url) as client:
            assert client.queue_stats("thumbnails").in_flight == 1  # leased by the curl receive, not acked


def test_the_sqs_example_runs_as_written():
    [example] = blocks("Amazon SQS API", "python")
    with running_server() as server:
        exec(example.replace("127.0.0.1:6161", f"127.0.0.1:{server.http_port}"), {})
        import chute

        with chute.Client(server.url) as client:  # an SQS queue is a Chute queue
            stats = client.queue_stats("invoices")
            assert (stats.published, stats.acked, stats.ready) == (1, 1, 0)
