"""`Server`: the broker behind its listeners, with a lifecycle.

    start():  HTTP listener first (so /healthz answers 503 while recovering), then recovery, then the native
              listener; logs each address it listens on.
    stop():   stop accepting, tell clients GOAWAY, stop reading requests, answer waiting long polls, let
              in-flight requests finish (up to `shutdown_grace_s`), then close the broker (checkpoint, flush,
              fsync) and the connections.

Invariants: at most `max_connections` sessions; the bytes of unconfirmed publishes stay near
`memory_high_water_bytes` (above it no session reads; below half of it reading resumes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Literal

from chute.broker import Broker
from chute.errors import TooManyConnections
from chute.protocol import messages as m
from chute.protocol.frames import Op
from chute.server.config import ServerConfig
from chute.server.session import Session

log = logging.getLogger("chute.server")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("chute")
    except PackageNotFoundError:
        return "dev"


class Server:
    """A Chute server: `await Server(config).start()`, later `await stop()`; or `async with Server(config):`."""

    def __init__(self, config: ServerConfig | None = None, *, broker: Broker | None = None) -> None:
        self.config = (config or ServerConfig()).validate()
        if broker is None:
            broker = Broker(self.config.data_dir, fsync=self.config.fsync,
                            max_message_bytes=self.config.max_message_bytes)  # fmt: skip
        self.broker = broker
        self.name = f"chute/{_version()}"
        self.state: Literal["new", "recovering", "serving", "stopping", "stopped"] = "new"
        self.sessions: set[Session] = set()
        self.publish_bytes = 0
        self._memory_paused = False
        self.backpressure_pauses = 0  # times the memory high-water mark paused publishers (for tests, metrics)
        self._tcp: asyncio.base_events.Server | None = None
        self._http_runner = None
        self.port: int | None = None
        self.http_port: int | None = None
        self._stopped = asyncio.Event()

    async def __aenter__(self) -> Server:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        host = self.config.host
        return f"chute://{f'[{host}]' if ':' in host else host}:{self.port}"

    async def start(self) -> Server:
        self.state = "recovering"
        if self.config.http_port is not None:
            from aiohttp import web

            from chute.server.http import make_app

            self._http_runner = web.AppRunner(make_app(self), access_log=None, handle_signals=False)
            await self._http_runner.setup()
            site = web.TCPSite(self._http_runner, self.config.host, self.config.http_port, reuse_address=True)
            await site.start()
            self.http_port = site._server.sockets[0].getsockname()[1]
            log.info("HTTP listening on http://%s:%d (/healthz)", self.config.host, self.http_port)
        try:
            if self.broker._state == "new":
                await self.broker.start()
                report = self.broker.recovery
                if report is not None:
                    log.info("recovered %s", report)
            loop = asyncio.get_running_loop()
            self._tcp = await loop.create_server(lambda: Session(self), self.config.host, self.config.port,
                                                 reuse_address=True, backlog=1024)  # fmt: skip
        except BaseException:
            await self._close_http()
            with contextlib.suppress(Exception):
                await self.broker.close()
            self.state = "stopped"
            raise
        for sock in self._tcp.sockets:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.port = self._tcp.sockets[0].getsockname()[1]
        self.state = "serving"
        log.info("native protocol listening on %s (data in %s, fsync %s)", self.url, self.config.data_dir,
                 self.config.fsync)  # fmt: skip
        return self

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # -- sessions ---------------------------------------------------------------------------------------------

    def admit(self, session: Session) -> bool:
        if self.state != "serving":
            session.fail(TooManyConnections("the server is shutting down"))
            return False
        if len(self.sessions) >= self.config.max_connections:
            session.fail(TooManyConnections(f"the server is at its limit of {self.config.max_connections} "
                                            "connections"))  # fmt: skip
            return False
        self.sessions.add(session)
        if self._memory_paused:
            session.pause_reading("memory")
        return True

    def forget(self, session: Session) -> None:
        self.sessions.discard(session)
        if session.publish_bytes:
            self.publishing(session, -session.publish_bytes)

    def publishing(self, session: Session, size: int) -> None:
        """Account `size` bytes of publishes starting (or, negative, ending) on `session`; pause or resume
        reading on every session around the memory high-water mark."""
        session.publish_bytes += size
        self.publish_bytes += size
        high = self.config.memory_high_water_bytes
        if not self._memory_paused and self.publish_bytes > high:
            self._memory_paused = True
            self.backpressure_pauses += 1
            log.warning("memory high-water mark reached (%d bytes of unconfirmed publishes): publishers wait",
                        self.publish_bytes)  # fmt: skip
            for each in self.sessions:
                each.pause_reading("memory")
        elif self._memory_paused and self.publish_bytes <= high // 2:
            self._memory_paused = False
            for each in self.sessions:
                each.resume_reading("memory")

    # -- shutdown ---------------------------------------------------------------------------------------------

    async def stop(self) -> None:
        """Graceful stop; idempotent."""
        if self.state in ("stopping", "stopped", "new"):
            if self.state != "stopping":
                self.state = "stopped"
                self._stopped.set()
            return
        self.state = "stopping"
        log.info("stopping: no new connections; finishing in-flight requests")
        if self._tcp is not None:
            self._tcp.close()
        for session in list(self.sessions):
            session.write(Op.GOAWAY, m.Goaway(reason="server shutting down"))
            session.pause_reading("shutdown")
            for consumer in list(session.consumers.values()):
                consumer.task.cancel()
        self.broker.end_long_polls()  # a long-polling RECEIVE is answered now, not after its wait
        pending = [task for session in self.sessions for task in session.requests]
        if pending:
            await asyncio.wait(pending, timeout=self.config.shutdown_grace_s)
        await self.broker.close()  # wakes long polls with BrokerClosed; checkpoint, flush, fsync
        pending = [task for session in self.sessions for task in session.requests]
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        for session in list(self.sessions):
            session.close()
        if self._tcp is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await self._tcp.wait_closed()
        await self._close_http()
        self.state = "stopped"
        self._stopped.set()
        log.info("stopped")

    async def _close_http(self) -> None:
        if self._http_runner is not None:
            runner, self._http_runner = self._http_runner, None
            await runner.cleanup()
