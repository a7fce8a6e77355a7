"""`Server`: the broker behind its listeners, with a lifecycle.

    start():  HTTP listener first (so /healthz answers 503 while recovering), then recovery, then the native
              listener and the AMQP one (chute.amqp); logs each address it listens on.
    stop():   stop accepting, tell clients GOAWAY, stop reading requests, answer waiting long polls, let
              in-flight requests finish (up to `shutdown_grace_s`), then close the broker (checkpoint, flush,
              fsync) and the connections.

Security (docs/security.md): `server.auth` checks credentials (server/auth.py); with `tls_cert`/`tls_key` both
listeners speak TLS 1.2+ only; a non-loopback `host` without auth configured refuses to start unless
`allow_anonymous` (then it logs a warning).

Invariants: at most `max_connections` sessions; the bytes of unconfirmed publishes (native, HTTP API and SQS)
stay near `memory_high_water_bytes` (above it no session reads and HTTP publishes are refused before their body
is read; below half of it reading resumes and HTTP publishes are accepted again).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import ssl
from typing import Literal

from chute.broker import Broker
from chute.errors import InvalidArgument, TooManyConnections, Unauthenticated
from chute.protocol import messages as m
from chute.protocol.frames import Op
from chute.server.auth import Authenticator
from chute.server.config import DEFAULT_AMQP_PORT, ServerConfig
from chute.server.holdreport import HoldReporter, threshold_from_env
from chute.server.looplag import LoopLagMonitor
from chute.server.session import Session

log = logging.getLogger("chute.server")
CLOSE_WAIT_S = 2.0  # at stop, how long closed connections get to finish closing (TLS needs a round trip)


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
        if broker is None and self.config.store is not None:  # a cluster node on PostgreSQL (needs asyncpg)
            broker = cluster_broker(self.config)
        if broker is None:
            broker = Broker(self.config.data_dir, fsync=self.config.fsync,
                            max_message_bytes=self.config.max_message_bytes)  # fmt: skip
        self.broker = broker
        self.auth = Authenticator(self.config)
        self.auth.on_change.append(self._users_changed)
        self.ssl: ssl.SSLContext | None = None
        self.name = f"chute/{_version()}"
        self.state: Literal["new", "recovering", "serving", "stopping", "stopped"] = "new"
        self.sessions: set[Session] = set()
        self.publish_bytes = 0
        self._memory_paused = False
        self.backpressure_pauses = 0  # times the memory high-water mark paused publishers (for tests, metrics)
        self.loop_lag = LoopLagMonitor()  # how late the event loop runs what is due (/metrics)
        hold_threshold_s = threshold_from_env()  # CHUTE_HOLD_REPORT_MS: name what held the loop, in the log
        self.hold_reporter = None if hold_threshold_s is None else HoldReporter(hold_threshold_s)
        self._tcp: asyncio.base_events.Server | None = None
        self._http_runner = None
        self.port: int | None = None
        self.http_port: int | None = None
        self.amqp = None  # the AMQP 0-9-1 front (chute.amqp.AmqpFront) when its listener runs
        self.amqp_port: int | None = None
        self._stopped = asyncio.Event()
        self._no_sessions = asyncio.Event()

    async def __aenter__(self) -> Server:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        host = self.config.host
        return f"{'chutes' if self.ssl else 'chute'}://{f'[{host}]' if ':' in host else host}:{self.port}"

    async def start(self) -> Server:
        await asyncio.to_thread(self.auth.load)  # InvalidArgument if the users file is malformed
        await self._check_exposure()
        if self.config.tls:
            self.ssl = server_tls_context(self.config.tls_cert, self.config.tls_key)
        self.state = "recovering"
        if self.config.http_port is not None:
            from aiohttp import web

            from chute.server.http import Runner, make_app

            self._http_runner = Runner(make_app(self), access_log=None, handle_signals=False)
            await self._http_runner.setup()
            site = web.TCPSite(self._http_runner, self.config.host, self.config.http_port, reuse_address=True,
                               ssl_context=self.ssl)  # fmt: skip
            await site.start()
            self.http_port = site._server.sockets[0].getsockname()[1]
            log.info("HTTP listening on %s://%s:%d (dashboard /, API /api, /metrics, SQS, /healthz)",
                     "https" if self.ssl else "http", self.config.host, self.http_port)  # fmt: skip
        try:
            if self.broker._state == "new":
                await self.broker.start()
                report = self.broker.recovery
                if report is not None:
                    log.info("recovered %s", report)
            loop = asyncio.get_running_loop()
            self._tcp = await loop.create_server(lambda: Session(self), self.config.host, self.config.port,
                                                 reuse_address=True, backlog=1024, ssl=self.ssl)  # fmt: skip
            if self.config.amqp_port is not None:
                await self._start_amqp()
            node = getattr(self.broker, "node", None)
            if node is not None:  # a cluster node: the others learn where to forward calls for its shards
                host = self.config.advertise or self.config.host
                await node.advertise(host, self._tcp.sockets[0].getsockname()[1], self.http_port, self.amqp_port)
        except BaseException:
            if self._tcp is not None:
                self._tcp.close()
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
        self.loop_lag.start()  # from now on (start-up's imports and setup are not stalls a client waits behind)
        if self.hold_reporter is not None:
            self.hold_reporter.start()
            if isinstance(self.broker, Broker):  # a sync is no loop hold, but a wait (a cluster node's shards
                self.broker.store.stats().slow_fsync_s = self.hold_reporter.threshold_s  # do not log them yet)
        where = self.config.data_dir
        if self.config.store is not None:
            where = getattr(getattr(self.broker, "node", None) or getattr(self.broker, "store", None), "where", "?")
        log.info("native protocol listening on %s (data in %s, fsync %s)", self.url, where,
                 self.config.fsync)  # fmt: skip
        return self

    async def _start_amqp(self) -> None:
        """The AMQP 0-9-1 listener (docs/amqp.md); without it if the default port is taken by someone else."""
        from chute.amqp import AmqpFront

        front = AmqpFront(self)
        try:
            await front.start(self.config.host, self.config.amqp_port, self.ssl)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or self.config.amqp_port != DEFAULT_AMQP_PORT:
                raise
            log.warning("AMQP port %d is in use: AMQP is off (choose another with --amqp-port, or -1)",
                        DEFAULT_AMQP_PORT)  # fmt: skip
            return
        self.amqp, self.amqp_port = front, front.port

    async def _check_exposure(self) -> None:
        """Refuse to listen beyond this machine without auth, unless `allow_anonymous`."""
        if await is_loopback(self.config.host):
            return
        if not self.auth.enabled:
            if not self.config.allow_anonymous:
                raise InvalidArgument(
                    f"refusing to listen on non-loopback address {self.config.host!r} without auth: add users "
                    "(chute user add) or a token, or pass --allow-anonymous"
                )
            log.warning("listening on %s with auth off (--allow-anonymous): anyone who can connect may do "
                        "everything", self.config.host)  # fmt: skip
        if not self.config.tls:
            log.warning("listening on %s without TLS: credentials and messages travel in clear text",
                        self.config.host)  # fmt: skip

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

    def _users_changed(self) -> None:
        """Close every native connection whose credential was revoked or whose principal changed (a client
        with reconnect comes back with the new permissions, or learns it is no longer let in)."""
        for session in list(self.sessions):
            if session.credential is not None and not self.auth.still_valid(session.principal, session.credential):
                session.fail(Unauthenticated("this connection's user, credentials or permissions changed"))

    def forget(self, session: Session) -> None:
        self.sessions.discard(session)
        if not self.sessions:
            self._no_sessions.set()
        # A closed session's publishes still waiting for fsync keep their bytes counted: each releases them once,
        # when the store is done with it (a callback or a task's `finally`), so nothing is subtracted here.

    def publishing(self, session: Session | None, size: int) -> None:
        """Account `size` bytes of publishes starting (or, negative, ending) on `session` (None: an HTTP publish,
        see `http_publish`); pause or resume reading on every session around the memory high-water mark."""
        if session is not None:
            session.publish_bytes += size
        self.publish_bytes += size
        high = self.config.memory_high_water_bytes
        if not self._memory_paused and self.publish_bytes > high:
            self._memory_paused = True
            self.backpressure_pauses += 1
            log.warning("memory high-water mark reached (%d bytes of unconfirmed publishes): native publishers "
                        "wait, HTTP publishes are refused", self.publish_bytes)  # fmt: skip
            for each in self.sessions:
                each.pause_reading("memory")
            if self.amqp is not None:
                self.amqp.memory(True)  # connection.blocked, and AMQP publishers wait too
        elif self._memory_paused and self.publish_bytes <= high // 2:
            self._memory_paused = False
            for each in self.sessions:
                each.resume_reading("memory")
            if self.amqp is not None:
                self.amqp.memory(False)

    @property
    def memory_paused(self) -> bool:
        """Over the memory high-water mark (and not yet back below half of it): HTTP publishes are refused."""
        return self._memory_paused

    def http_publish(self) -> PublishHold:
        """Hold one HTTP publish's bytes against the memory high-water mark for a `with` block: the caller sets
        the size as it learns it (`hold.set(n)`); whatever it is, it is given back when the block ends, however
        it ends (an error, a cancelled handler, a client that hung up). (A plain class, not a generator context
        manager: every SQS request enters one.)"""
        return PublishHold(self)

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
                consumer.stop()
        # AMQP: in-flight work finishes, then connection.close 320 CONNECTION_FORCED (before the broker closes)
        amqp = asyncio.ensure_future(self.amqp.stop(self.config.shutdown_grace_s)) if self.amqp else None
        self.broker.end_long_polls()  # a long-polling RECEIVE is answered now, not after its wait
        pending = [task for session in self.sessions for task in session.requests]
        if pending:
            await asyncio.wait(pending, timeout=self.config.shutdown_grace_s)
        if amqp is not None:
            await amqp
        await self.broker.close()  # wakes long polls with BrokerClosed; checkpoint, flush, fsync
        pending = [task for session in self.sessions for task in session.requests]
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        for session in list(self.sessions):
            session.close()
        await self._sessions_gone(CLOSE_WAIT_S)
        if self._tcp is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await self._tcp.wait_closed()
        await self._close_http()
        await self.auth.close()
        self.loop_lag.stop()
        if self.hold_reporter is not None:
            self.hold_reporter.stop()
        self.state = "stopped"
        self._stopped.set()
        log.info("stopped")

    async def _sessions_gone(self, timeout_s: float) -> None:
        """Wait (bounded) until closed sessions are really gone: a TLS close takes a close_notify round trip."""
        if self.sessions:
            self._no_sessions.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._no_sessions.wait()

    async def _close_http(self) -> None:
        if self._http_runner is not None:
            runner, self._http_runner = self._http_runner, None
            await runner.cleanup()


def cluster_broker(config: ServerConfig):
    """The broker of a cluster node (`--store postgresql://...`): a ClusterNode (membership, the shards it
    holds) under a ClusterBroker (routing every call to the shard's broker, here or on its owner)."""
    try:
        import asyncpg  # noqa: F401
    except ImportError as exc:
        raise InvalidArgument(f"--store needs asyncpg ({exc}): pip install 'chute[postgres]'") from None
    from chute.cluster.node import ClusterNode, default_node_name
    from chute.cluster.peers import Peers
    from chute.cluster.router import ClusterBroker

    heartbeat_s = config.cluster_heartbeat_s
    options = {
        "shards": config.shards,
        "lease_s": config.cluster_lease_s,
        "heartbeat_s": None if heartbeat_s == 1.0 else heartbeat_s,  # the default: the node's own choice
    }
    name = config.node_name or default_node_name(config.port)
    node = ClusterNode(config.store, name, host=config.advertise or config.host,
                       fsync=config.fsync, broker_options={"max_message_bytes": config.max_message_bytes},
                       **{key: value for key, value in options.items() if value is not None})  # fmt: skip
    return ClusterBroker(node, peers=Peers(name, token=config.token, tls=config.tls))


class PublishHold:
    """The bytes one HTTP publish holds against the memory high-water mark (see `Server.http_publish`)."""

    __slots__ = ("server", "size")

    def __init__(self, server: Server) -> None:
        self.server = server
        self.size = 0

    def __enter__(self) -> PublishHold:
        return self

    def __exit__(self, *exc_info) -> None:
        self.set(0)

    def set(self, size: int) -> None:
        """Hold `size` bytes from now on (instead of what was held so far)."""
        delta = size - self.size
        if delta:
            self.size = size
            self.server.publishing(None, delta)


async def is_loopback(host: str) -> bool:
    """Does `host` (an address or a name) mean only this machine? A name counts if every address it resolves to
    is a loopback address; "" (every interface) does not."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0]).is_loopback
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False  # binding will fail with a clearer error
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def server_tls_context(cert: str, key: str) -> ssl.SSLContext:
    """A server TLS context (TLS 1.2 minimum) from PEM files; InvalidArgument naming the file on any problem."""
    for what, path in (("certificate", cert), ("key", key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise InvalidArgument(f"cannot read the TLS {what} {path}: {exc.strerror or exc}") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "KEY_VALUES_MISMATCH" in str(reason):
            raise InvalidArgument(f"the TLS key {key} does not belong to the certificate {cert}") from None
        raise InvalidArgument(f"cannot load the TLS certificate {cert} and key {key}: {reason}") from None
    return context
