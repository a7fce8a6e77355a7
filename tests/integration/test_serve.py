"""`chute serve` as a user runs it: `python -m chute serve` as a subprocess on 127.0.0.1, ports 0, a fresh data
directory per test; checked through its log, its exit status, `GET /healthz` and `chute.Client`.

Startup and shutdown are awaited on log lines, never on sleeps.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

import chute
from chute.errors import TooManyConnections, Unauthenticated
from tests.crash.serve import HTTP_LISTENING, LISTENING, ServeProcess

pytestmark = pytest.mark.timeout(60)
RUN_TIMEOUT_S = 30


@pytest.fixture
def data_dir(tmp_path) -> str:
    return str(tmp_path / "data")


@pytest.fixture
def serve(data_dir):
    """Start `chute serve --data-dir data_dir --port 0 --http-port 0 EXTRA...`; killed at the end if still running."""
    started: list[ServeProcess] = []

    def start(*extra: str, wait: bool = True) -> ServeProcess:
        started.append(ServeProcess(data_dir, *extra, http_port=0, wait=wait))
        return started[-1]

    yield start
    for server in started:
        if server.process.poll() is None:
            server.kill()
        elif not server.process.stderr.closed:
            server.process.stderr.close()


def run(*args: str) -> subprocess.CompletedProcess:
    """`python -m chute serve ARGS` expected to fail at once: its exit status and output."""
    return subprocess.run([sys.executable, "-m", "chute", "serve", *args], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)  # fmt: skip


def assert_one_line_error(result: subprocess.CompletedProcess, *, code: int, says: str) -> None:
    """Exit `code`, exactly one `Error:` line (`error:` for a usage error) on stderr containing `says`, no traceback."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.lower().startswith("error:")]
    assert len(errors) == 1 and says in errors[0], result.stderr


def healthz(http_url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"{http_url}/healthz", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def client(url: str, **options) -> chute.Client:
    return chute.Client(url, reconnect=False, timeout=10, **options)


# -- running and stopping -------------------------------------------------------------------------------------


def test_serves_the_native_protocol_and_healthz(serve):
    server = serve()
    assert re.match(r"chute://127\.0\.0\.1:\d+$", server.url)
    assert re.match(r"http://127\.0\.0\.1:\d+$", server.http_url)
    assert healthz(server.http_url) == (200, {"status": "serving"})
    with client(server.url) as c:
        c.create_queue("jobs")
        c.publish("jobs", b"hello")
        [delivery] = c.receive("jobs", 10, wait_s=5)
        assert delivery.body == b"hello"
        c.ack(delivery)
        assert c.receive("jobs", 10) == []
    assert server.terminate() == 0, server.text


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_it_cleanly_and_keeps_confirmed_messages(serve, data_dir, sig):
    server = serve()
    with client(server.url) as c:
        c.create_queue("jobs")
        c.publish("jobs", b"kept")  # returns once the broker has made it durable
    assert server.stop(sig) == 0, server.text
    assert "stopping" in server.text and re.search(r"chute\.server: stopped$", server.text, re.M)
    assert "Traceback" not in server.text
    assert os.path.exists(os.path.join(data_dir, "clean-shutdown"))

    again = serve()
    with client(again.url) as c:
        assert [d.body for d in c.peek("jobs", 10)] == [b"kept"]
    assert "after a clean shutdown" in again.text
    assert again.terminate() == 0, again.text


def test_a_signal_with_a_client_connected_still_exits_0(serve):
    server = serve()
    with client(server.url) as c:
        c.create_queue("jobs")
        c.publish("jobs", b"x")
        assert server.stop() == 0, server.text


def test_healthz_answers_503_while_recovering(serve, data_dir):
    """Recovery is held deterministically: the checkpoint is a FIFO, and its open blocks until we write it."""
    first = serve()
    with client(first.url) as c:
        c.create_queue("jobs")
        c.publish("jobs", b"kept")
    assert first.terminate() == 0, first.text
    checkpoint = os.path.join(data_dir, "checkpoint")
    with open(checkpoint, "rb") as f:
        saved = f.read()
    os.unlink(checkpoint)
    os.mkfifo(checkpoint)

    server = serve(wait=False)
    server.wait_for(HTTP_LISTENING)
    assert healthz(server.http_url) == (503, {"status": "recovering"})
    with open(checkpoint, "wb") as fifo:  # recovery reads the checkpoint now, to the end of what we write
        fifo.write(saved)
    server.url = server.wait_for(LISTENING).group(1).decode()
    assert healthz(server.http_url) == (200, {"status": "serving"})
    with client(server.url) as c:
        assert [d.body for d in c.peek("jobs", 10)] == [b"kept"]
    assert server.terminate() == 0, server.text


# -- refusing to start ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "code", "says"),
    [
        (["--fsync", "sometimes"], 2, "'--fsync'"),
        (["--port", "notanumber"], 2, "'--port'"),
        (["--port", "70000"], 1, "port must be between 0 and 65535"),
        (["--http-port", "70000"], 1, "http_port must be between 0 and 65535"),
        (["--max-connections", "0"], 1, "max_connections must be between"),
    ],
    ids=["fsync-choice", "port-not-int", "port-range", "http-port-range", "max-connections-range"],
)
def test_bad_flags_give_a_one_line_error(tmp_path, flags, code, says):
    result = run("--data-dir", str(tmp_path / "data"), *flags)
    assert_one_line_error(result, code=code, says=says)
    assert not (tmp_path / "data").exists()  # refused before touching storage


def test_a_corrupt_data_directory_is_reported_without_a_traceback(serve, data_dir):
    first = serve()
    assert first.terminate() == 0, first.text
    with open(os.path.join(data_dir, "checkpoint"), "wb") as f:
        f.write(b"CHUTECKP garbage")
    result = run("--data-dir", data_dir, "--port", "0", "--http-port", "0")
    assert_one_line_error(result, code=1, says="(storage_corrupt)")
    assert "checkpoint" in result.stderr


def test_a_data_dir_that_cannot_be_a_directory_is_named(tmp_path):
    (tmp_path / "file").write_text("")
    result = run("--data-dir", str(tmp_path / "file" / "data"), "--port", "0", "--http-port", "-1")
    assert_one_line_error(result, code=1, says=f"cannot use {tmp_path / 'file' / 'data'}")


def test_a_data_dir_in_use_by_another_server_is_refused(serve, data_dir):
    server = serve()
    result = run("--data-dir", data_dir, "--port", "0", "--http-port", "0")
    assert_one_line_error(result, code=1, says="in use by another broker (storage_failed)")
    assert server.terminate() == 0, server.text


@pytest.mark.parametrize("which", ["--port", "--http-port"])
def test_a_port_in_use_gives_a_one_line_error(tmp_path, which):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        ports = {"--port": "0", "--http-port": "0", which: port}
        result = run("--data-dir", str(tmp_path / "data"), *(x for kv in ports.items() for x in kv))
    assert_one_line_error(result, code=1, says="address already in use")
    assert port in result.stderr


# -- the config file ------------------------------------------------------------------------------------------


def test_a_config_file_takes_effect(serve, tmp_path):
    config = tmp_path / "chute.toml"
    config.write_text('token = "from-file"\nmax_connections = 1\n')
    server = serve("--config", str(config))
    with pytest.raises(Unauthenticated):
        client(server.url)  # no token
    with client(server.url, token="from-file") as c:
        c.create_queue("jobs")
        with pytest.raises(TooManyConnections):
            client(server.url, token="from-file")
    assert server.terminate() == 0, server.text


def test_a_flag_wins_over_the_config_file(serve, tmp_path):
    config = tmp_path / "chute.toml"
    config.write_text('token = "from-file"\nfsync = "never"\n')
    server = serve("--config", str(config), "--token", "from-flag")  # ServeProcess passes --fsync always
    assert "fsync always" in server.text
    with pytest.raises(Unauthenticated):
        client(server.url, token="from-file")
    with client(server.url, token="from-flag") as c:
        c.create_queue("jobs")
    assert server.terminate() == 0, server.text


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("port = [\n", "is not valid TOML"),
        ("bogus = 1\n", "unknown field `bogus`"),
        ('port = "six"\n', "port"),
    ],
    ids=["malformed", "unknown-key", "wrong-type"],
)
def test_a_bad_config_file_gives_a_one_line_error(tmp_path, content, says):
    config = tmp_path / "chute.toml"
    config.write_text(content)
    result = run("--config", str(config), "--data-dir", str(tmp_path / "data"))
    assert_one_line_error(result, code=1, says=says)
    assert "(invalid_argument)" in result.stderr


def test_a_missing_config_file_gives_a_one_line_error(tmp_path):
    result = run("--config", str(tmp_path / "missing.toml"), "--data-dir", str(tmp_path / "data"))
    assert_one_line_error(result, code=1, says="cannot read config file")
