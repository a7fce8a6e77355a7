"""`chute serve --pidfile PATH`: the pid is there once the server listens, and gone after a clean stop; a pidfile
that cannot be written is a one-line error and the server stops. `python -m chute serve` as a subprocess."""

from __future__ import annotations

import os
import signal

import pytest

import chute
from tests.crash.serve import ServeProcess

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_pidfile_exists_while_serving_and_goes_on_a_clean_stop(tmp_path, sig):
    pidfile = tmp_path / "chute.pid"
    server = ServeProcess(str(tmp_path / "data"), "--pidfile", str(pidfile))
    try:
        with chute.Client(server.url, reconnect=False, timeout=10) as client:  # served: the pidfile was written
            client.list_queues()
        assert pidfile.read_text() == f"{server.process.pid}\n"
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("chute.pid.")] == []  # no temporary left
    finally:
        code = server.stop(sig)
    assert code == 0, server.text
    assert not pidfile.exists()


def test_a_stale_pidfile_is_replaced(tmp_path):
    pidfile = tmp_path / "chute.pid"
    pidfile.write_text("999999\n")
    server = ServeProcess(str(tmp_path / "data"), "--pidfile", str(pidfile))
    try:
        with chute.Client(server.url, reconnect=False, timeout=10) as client:
            client.list_queues()
        assert pidfile.read_text() == f"{server.process.pid}\n"
    finally:
        assert server.stop() == 0, server.text


def test_a_pidfile_that_cannot_be_written_is_one_line_and_stops_the_server(tmp_path):
    pidfile = tmp_path / "missing-dir" / "chute.pid"
    server = ServeProcess(str(tmp_path / "data"), "--pidfile", str(pidfile))
    code = server.process.wait(30)
    server.log += server.process.stderr.readlines()
    server.process.stderr.close()
    assert code == 1, server.text
    errors = [line for line in server.text.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: cannot use {pidfile}: No such file or directory"], server.text
    assert "Traceback" not in server.text and "stopped" in server.text
    assert not pidfile.exists()
    assert os.path.exists(tmp_path / "data" / "clean-shutdown")
