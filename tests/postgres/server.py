"""A real PostgreSQL for the tests and benchmarks: Debian's binaries, a temporary directory, a free loopback port.

`shared()` starts one server per test process on first use (lazily, so a run that never touches the PostgreSQL
store never starts one) and stops it at exit; the `postgres_url` fixture (tests/conftest.py) hands out its URL.
`CHUTE_TEST_POSTGRES=postgresql://...` uses an existing server instead (nothing is started or stopped).

Root: PostgreSQL refuses to run as root, so when the tests run as root every binary runs as the `postgres`
system user (or `nobody` when there is none) through `setpriv`, in a directory that user owns. `--pdeathsig`
makes the kernel stop the server if the test process dies without cleaning up.

Settings: `fsync=off` and `full_page_writes=off` by default — the tests kill connections and stop the server,
never the machine, so WAL that reached the kernel survives and fsync would only slow a shared CI machine. The
benchmark starts its server with `durable=True` (fsync on, `synchronous_commit=on`).
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

START_TIMEOUT_S = 60.0
ENV_URL = "CHUTE_TEST_POSTGRES"


def bin_dir() -> str | None:
    """Where Debian's PostgreSQL binaries are (the newest installed version), or None."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if versions:
        return str(versions[-1].parent)
    found = shutil.which("initdb")  # another layout: next to initdb on PATH (symlinks resolved)
    return str(Path(found).resolve().parent) if found else None


def available() -> bool:
    """True when tests can use a PostgreSQL: an existing one named by CHUTE_TEST_POSTGRES, or the binaries."""
    return bool(os.environ.get(ENV_URL)) or bin_dir() is not None


STALE_AFTER_S = 600.0


def _remove_stale_directories() -> None:
    """Delete what earlier runs killed before their exit handlers left behind: directories of ours older than
    STALE_AFTER_S whose server is not running (a run still in initdb has a young directory)."""
    for directory in Path(tempfile.gettempdir()).glob("chute-pg-*"):
        try:
            if time.time() - directory.stat().st_mtime < STALE_AFTER_S:
                continue
            pid_file = directory / "data" / "postmaster.pid"
            if pid_file.exists():
                pid = int(pid_file.read_text().split()[0])
                try:
                    os.kill(pid, 0)
                    continue  # its server runs
                except ProcessLookupError:
                    pass
            shutil.rmtree(directory, ignore_errors=True)
        except (OSError, ValueError, IndexError):
            continue


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One PostgreSQL server in a temporary directory, listening on 127.0.0.1:`port`, for the user `postgres`:
    trusted, or with `password` required over TCP (SCRAM)."""

    def __init__(
        self,
        *,
        durable: bool = False,
        settings: dict[str, str] | None = None,
        password: str | None = None,
        standby_of: PostgresServer | None = None,
    ) -> None:
        binaries = bin_dir()
        if binaries is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql); or set CHUTE_TEST_POSTGRES")
        self.bin = binaries
        self.durable = durable
        self.password = password
        self.settings = dict(settings or {})
        self.standby_of = standby_of  # a streaming replica of that (running) server, made by pg_basebackup
        _remove_stale_directories()
        self.directory = tempfile.mkdtemp(prefix="chute-pg-")
        self.data = f"{self.directory}/data"
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.user = None
        if os.geteuid() == 0:
            try:
                self.user = pwd.getpwnam("postgres")
            except KeyError:
                self.user = pwd.getpwnam("nobody")
            os.chown(self.directory, self.user.pw_uid, self.user.pw_gid)

    @property
    def url(self) -> str:
        user = "postgres" if self.password is None else f"postgres:{self.password}"
        return f"postgresql://{user}@127.0.0.1:{self.port}/postgres"

    def _command(self, *args: str) -> list[str]:
        """`args` run as the server's user (through setpriv when we are root), dying with this process."""
        prefix = ["setpriv", "--pdeathsig", "KILL"]
        if self.user is not None:
            prefix += [f"--reuid={self.user.pw_uid}", f"--regid={self.user.pw_gid}", "--clear-groups"]
        return prefix + list(args)

    def start(self) -> PostgresServer:
        """initdb (once) and start the server; returns when it accepts connections. A standby is copied from its
        primary instead (pg_basebackup, streaming the WAL meanwhile; -R makes it follow the primary)."""
        if not Path(self.data).exists() and self.standby_of is not None:
            primary = self.standby_of
            subprocess.run(
                self._command(f"{self.bin}/pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port),
                              "-U", "postgres", "-D", self.data, "-X", "stream", "-R", "--no-sync"),
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.directory,
            )  # fmt: skip
        elif not Path(self.data).exists():
            auth = ["--auth=trust"]
            if self.password is not None:
                pwfile = Path(self.directory, "pwfile")
                pwfile.write_text(self.password + "\n")
                if self.user is not None:
                    os.chown(pwfile, self.user.pw_uid, self.user.pw_gid)
                auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
            subprocess.run(
                self._command(f"{self.bin}/initdb", "-D", self.data, "-U", "postgres", *auth,
                              "--no-sync", "-E", "UTF8", "--locale=C"),
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.directory,
            )  # fmt: skip
        for _ in range(5):  # a port found free may be taken before the server binds it: try another
            self.port = self.port or _free_port()
            if self._launch():
                return self
            self.port = 0
        raise RuntimeError(f"PostgreSQL did not start; see {self.directory}/server.log")

    def _launch(self) -> bool:
        options = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": self.directory,
            "max_connections": "200",
            "shared_buffers": "64MB",
            "fsync": "on" if self.durable else "off",
            "full_page_writes": "on" if self.durable else "off",
            "synchronous_commit": "on",
            "log_min_messages": "warning",
        }
        options.update(self.settings)
        args = [f"{self.bin}/postgres", "-D", self.data]
        for key, value in options.items():
            args += ["-c", f"{key}={value}"]
        log = open(f"{self.directory}/server.log", "ab")  # noqa: SIM115 - the server writes it until it stops
        self.process = subprocess.Popen(self._command(*args), stdout=log, stderr=log, cwd=self.directory)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            ready = subprocess.run(
                [f"{self.bin}/pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port), "-t", "1"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            if ready.returncode == 0:
                return True
            time.sleep(0.05)  # pg_isready is the condition; the server gives no other signal to wait on
        self.stop()
        return False

    def stop(self, *, mode: str = "fast") -> None:
        """Stop the server (`fast`: roll back and close sessions; `immediate`: like a crash). Data is kept."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGQUIT if mode == "immediate" else signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self, *, mode: str = "fast") -> None:
        """Stop and start again on the same data and port."""
        self.stop(mode=mode)
        self.start()

    def destroy(self) -> None:
        """Stop (as a crash: nothing is worth keeping) and delete the directory."""
        self.stop(mode="immediate")
        shutil.rmtree(self.directory, ignore_errors=True)


_shared: PostgresServer | None = None


def shared_url() -> str:
    """The URL of the PostgreSQL these tests share: CHUTE_TEST_POSTGRES, or one started on first use."""
    global _shared
    existing = os.environ.get(ENV_URL)
    if existing:
        return existing
    if _shared is None:
        server = PostgresServer()
        atexit.register(server.destroy)
        _shared = server.start()
    return _shared.url


def unique_name(prefix: str = "t") -> str:
    """A stream name no other test uses (tests share one database)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def required(cls):
    """Mark a test class that needs PostgreSQL: skipped where it is not installed, except in CI (which fails)."""
    import pytest

    if available() or os.environ.get("CI"):
        return cls
    return pytest.mark.skip(reason="PostgreSQL is not installed and CHUTE_TEST_POSTGRES is not set")(cls)


def model_settings(default: int = 30):
    """Hypothesis settings for a state machine over the PostgreSQL store: the current profile, with at most
    $CHUTE_PG_MODEL_EXAMPLES examples (else `default`: each example starts brokers on the database, and the
    PostgreSQL tests should take well under a minute in CI; raise it for a campaign)."""
    from hypothesis import settings

    limit = int(os.environ.get("CHUTE_PG_MODEL_EXAMPLES", str(default)))
    return settings(settings.default, max_examples=min(settings.default.max_examples, limit))
