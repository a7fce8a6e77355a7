"""Run a real Chute server inside your test suite: on 127.0.0.1, on a free port, with its data in a temporary
directory (durable file store, fsync off unless asked) — no `chute serve` process needed.

    from chute.testing import running_server
    with running_server() as server:            # a server on a background thread
        with chute.Client(server.url) as client: ...

    async with serving() as server:              # a server in the running event loop
        async with chute.AsyncClient(server.url) as client: ...

With Chute installed, pytest gets the fixture `chute_server` (a `running_server()` per test) automatically:

    def test_jobs(chute_server):
        with chute.Client(chute_server.url) as client: ...

Options are `ServerConfig` fields, so a test can start a server with auth and TLS:

    async with serving(users=[User(name="app", password_hash=hash_password("pw"), grants=[...])],
                       tls_cert="cert.pem", tls_key="key.pem") as server:   # server.url is chutes://...
        async with chute.AsyncClient(server.url, user="app", password="pw", tls_ca="ca.pem") as client: ...

(`User`, `Grant` and `hash_password` are in `chute.server.users`.)

Invariant: leaving the context stops the server gracefully and deletes its directory (unless you gave one).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from chute.server import Server, ServerConfig


@dataclass
class RunningServer:
    url: str
    port: int
    http_port: int | None
    data_dir: str
    server: Server
    http_url: str | None = None
    """`http://127.0.0.1:PORT` (`https://` with TLS), or None without an HTTP listener."""
    amqp_url: str | None = None
    """`amqp://127.0.0.1:PORT/` (`amqps://` with TLS) for pika, aio-pika, kombu; None without AMQP."""


def _config(data_dir: str, fsync: str, options: dict) -> ServerConfig:
    values = {"data_dir": data_dir, "host": "127.0.0.1", "port": 0, "http_port": 0, "amqp_port": 0, "fsync": fsync,
              "heartbeat_s": 5.0, "shutdown_grace_s": 2.0} | options  # fmt: skip
    return ServerConfig(**values)


@contextlib.asynccontextmanager
async def serving(data_dir: str | None = None, *, fsync: str = "never", **options) -> AsyncIterator[RunningServer]:
    """A server in the current event loop (options: any `ServerConfig` field)."""
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="chute-test-"))
        server = await Server(_config(data_dir, fsync, options)).start()
        try:
            scheme = "https" if server.ssl else "http"
            http_url = f"{scheme}://127.0.0.1:{server.http_port}" if server.http_port else None
            amqp_scheme = "amqps" if server.ssl else "amqp"
            amqp_url = f"{amqp_scheme}://127.0.0.1:{server.amqp_port}/" if server.amqp_port else None
            yield RunningServer(server.url, server.port, server.http_port, data_dir, server, http_url, amqp_url)
        finally:
            await server.stop()


@contextlib.contextmanager
def running_server(data_dir: str | None = None, *, fsync: str = "never", **options) -> Iterator[RunningServer]:
    """A server on a background thread with its own event loop (options: any `ServerConfig` field)."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    result: dict = {}

    async def main() -> None:
        async with serving(data_dir, fsync=fsync, **options) as running:
            result["server"] = running
            ready.set()
            await stop.wait()

    def run() -> None:
        try:
            loop.run_until_complete(main())
        except BaseException as exc:  # reported to the caller below
            result["error"] = exc
            ready.set()
        finally:
            loop.close()

    ready = threading.Event()
    thread = threading.Thread(target=run, name="chute-test-server", daemon=True)
    thread.start()
    ready.wait(60)
    if "error" in result:
        raise result["error"]
    if "server" not in result:
        raise RuntimeError("the test server did not start within 60 s")
    try:
        yield result["server"]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)


try:
    import pytest
except ImportError:  # pragma: no cover - the fixture is only for pytest users
    pass
else:

    @pytest.fixture
    def chute_server() -> Iterator[RunningServer]:
        """A Chute server for one test (see `running_server`)."""
        with running_server() as server:
            yield server
