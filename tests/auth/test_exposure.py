"""`chute serve` refuses to listen beyond loopback without auth unless `--allow-anonymous`; TLS flags as a user
gives them. Run as subprocesses, like tests/integration/test_serve.py."""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import pytest

import chute
from chute.server.app import is_loopback
from chute.server.users import UsersFile
from tests.auth.conftest import make_user
from tests.crash.serve import ServeProcess

pytestmark = pytest.mark.timeout(60)
TLS_LISTENING = re.compile(rb"native protocol listening on (chutes://[\d.]+:\d+)")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chute", "serve", "--port", "0", "--http-port", "0", *args],
                          capture_output=True, text=True, timeout=30)  # fmt: skip


def assert_one_line_error(result: subprocess.CompletedProcess, says: str) -> None:
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and says in errors[0], result.stderr


def ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize(
    "host", ["0.0.0.0", pytest.param("::", marks=pytest.mark.skipif(not ipv6(), reason="no IPv6"))]
)
def test_a_non_loopback_host_without_auth_refuses_to_start(tmp_path, host):
    result = run("--data-dir", str(tmp_path), "--host", host)
    assert_one_line_error(result, "--allow-anonymous")
    assert "non-loopback" in result.stderr


@pytest.mark.parametrize("auth", ["--allow-anonymous", "token", "users"])
def test_a_non_loopback_host_starts_with_auth_or_allow_anonymous(tmp_path, auth):
    extra = []
    if auth == "token":
        extra = ["--token", "root"]
    elif auth == "users":
        with UsersFile(tmp_path).edit() as users:
            users.append(make_user("ops", "pw", superuser=True))
    else:
        extra = [auth]
    server = ServeProcess(str(tmp_path), "--host", "0.0.0.0", *extra, wait=False)
    try:
        server.wait_for(re.compile(rb"native protocol listening on chute://0\.0\.0\.0:\d+"))
        if auth == "--allow-anonymous":
            assert "auth off (--allow-anonymous)" in server.text
        assert "without TLS" in server.text
    finally:
        assert server.terminate() == 0


async def test_loopback_detection():
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"):
        assert await is_loopback(host), host
    for host in ("0.0.0.0", "", "::", "10.1.2.3", "192.168.0.1"):
        assert not await is_loopback(host), host


def test_chute_serve_with_tls_flags(tmp_path, tls_files):
    server = ServeProcess(str(tmp_path), "--tls-cert", tls_files["cert"], "--tls-key", tls_files["key"], wait=False)
    try:
        url = server.wait_for(TLS_LISTENING).group(1).decode()
        with chute.Client(url, tls_ca=tls_files["ca"]) as client:
            client.create_queue("q")
    finally:
        assert server.terminate() == 0


@pytest.mark.parametrize(("flags", "says"), [
    (("--tls-cert", "CERT"), "tls_cert and tls_key go together"),
    (("--tls-cert", "CERT", "--tls-key", "/nonexistent/key.pem"), "cannot read the TLS key /nonexistent/key.pem"),
])  # fmt: skip
def test_chute_serve_tls_mistakes_are_one_line_errors(tmp_path, tls_files, flags, says):
    flags = [tls_files["cert"] if flag == "CERT" else flag for flag in flags]
    assert_one_line_error(run("--data-dir", str(tmp_path), *flags), says)


def test_a_malformed_users_file_stops_chute_serve_with_one_line(tmp_path):
    (tmp_path / "users.json").write_text("{broken")
    assert_one_line_error(run("--data-dir", str(tmp_path)), "is not a valid users file")
