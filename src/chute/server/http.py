"""The HTTP listener (aiohttp, in the broker's own event loop): one app, each area adding its own routes.

    /healthz              200 while serving, 503 while recovering, stopping, read-only or (a cluster node) cut off
                          from the database; the body says which (no auth)
    /api/v1/...           the HTTP API (server/api/), /openapi.json and the API page
    /metrics              Prometheus text format (server/metrics.py)
    GET /, /ui/...        the web dashboard (server/dashboard/)
    POST /, /<account>/<queue>   the Amazon SQS API (server/sqs/)

Errors that aiohttp answers itself, before or around any handler, take the JSON error shape of the API too
(`JsonErrorsRequestHandler`, installed by `Runner`): a request its parser refuses (an over-long request line or
header, too many headers, bad chunked encoding or Content-Length, a bad method or version, bytes that are not
HTTP) is 400 `protocol_error`, a handler that fails past its area's own error handling is 500 `chute_error`,
one that times out 504 `timeout`; the connection is closed after, as aiohttp does. What cannot be reached is in
docs/http-api.md ("Malformed requests").

Invariant: handlers never block the loop; each area authorizes its requests (server/auth.py) before it
touches the broker.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web, web_app, web_protocol
from aiohttp.web_protocol import RequestHandler

from chute.errors import ChuteError, ProtocolError, RequestTimeout
from chute.server import api, dashboard, metrics, sqs
from chute.server.api.call import error_response
from chute.server.auth import challenge_middleware

if TYPE_CHECKING:
    from chute.server.app import Server

log = logging.getLogger("chute.server.http")

MAX_DETAIL_CHARS = 200  # of the parser's description of a malformed request (it quotes the offending bytes)
_ERR_INFO = getattr(web_protocol, "_ErrInfo", type(None))  # what aiohttp queues for a request its parser refused

# Large enough for a batch of messages at the default max message size; each area checks its own limits.
MAX_BODY_BYTES = 16 * 1024 * 1024

SERVER_KEY = web.AppKey("server", object)
PRINCIPAL_KEY = web.RequestKey("principal", object)  # who a request authenticated as (server/auth.py)


def _unhealthy(broker) -> str:
    """Why a serving broker is unhealthy: a cluster node says (it cannot reach the database, its name was taken
    over); a single broker's store failed, so it is read-only."""
    reason = getattr(getattr(broker, "node", None), "unhealthy_reason", None)
    return reason or "read-only"


def make_app(server: Server) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[challenge_middleware()])  # 401s challenge
    app[SERVER_KEY] = server

    async def healthz(request: web.Request) -> web.Response:
        state = server.state
        status = 200 if state == "serving" and server.broker.healthy else 503
        body = {"status": state if state != "serving" or status == 200 else _unhealthy(server.broker)}
        return web.json_response(body, status=status)

    if getattr(server.broker, "routed", False):  # a cluster node: requests for other nodes' shards go there
        from chute.cluster import http_forward

        forward, close = http_forward.middleware(server)
        app.middlewares.append(forward)
        app.on_cleanup.append(close)
    app.router.add_get("/healthz", healthz)
    api.add_routes(app, server)
    metrics.add_routes(app, server)
    sqs.add_routes(app, server)
    dashboard.add_routes(app, server)  # last: it serves GET /
    app.on_cleanup.append(_forget_middleware_chains)
    return app


async def _forget_middleware_chains(app: web.Application) -> None:
    """aiohttp (3.10 on) caches each handler's chain of middlewares in one LRU cache of 1,024 entries for the
    whole process, keyed by the app: a stopped server stays reachable from it, with its broker and whatever that
    holds, until newer entries push it out. A process that starts and stops servers (tests, `chute.testing`,
    an embedding application) would keep up to that many. Clearing it costs a rebuild of each chain at its next
    request, for any app of the process. (A private name: where it is missing there is nothing to clear.)"""
    cache = getattr(web_app, "_cached_build_middleware", None)
    if callable(getattr(cache, "cache_clear", None)):
        cache.cache_clear()


def _error_for(status: int, message: str | None) -> ChuteError:
    """The error-table entry for a status that aiohttp answers with itself."""
    if status == 500:
        return ChuteError("internal error")
    if status == 504:
        return RequestTimeout("the request took too long")
    detail = " ".join(word for word in (message or "").split() if word != "^")  # the parser's text is multi-line
    if len(detail) > MAX_DETAIL_CHARS:
        detail = detail[:MAX_DETAIL_CHARS] + "..."
    if status == 400:
        return ProtocolError(f"malformed HTTP request: {detail}" if detail else "malformed HTTP request")
    error = ChuteError(detail or f"HTTP {status}")
    error.http_status = status
    return error


class JsonErrorsRequestHandler(RequestHandler):
    """aiohttp's connection protocol (one per HTTP connection), answering the errors aiohttp handles itself in
    the JSON error shape rather than as text/plain or HTML."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        """As aiohttp's, but when its parser refuses bytes in the middle of a request's body (bad chunked
        encoding), that request's body reader gets the error (its area answers 400 `protocol_error`), where
        aiohttp's C parser would leave the handler waiting for the rest until the client gave up. Best effort:
        it looks at aiohttp's private queue of parsed requests and does nothing if that is not there."""
        messages = getattr(self, "_messages", None)
        queued = len(messages) if messages is not None else 0
        super().data_received(data)
        if messages is None or len(messages) <= queued or not isinstance(messages[-1][0], _ERR_INFO):
            return
        error = _error_for(400, getattr(messages[-1][0], "message", None))
        if len(messages) >= 2:  # the broken body belongs to a request still waiting for its handler
            body = messages[-2][1]
        else:  # to the request being handled: it answers, and the connection closes after it
            current = getattr(self, "_current_request", None)
            body = current.content if current is not None else None
            if body is not None and not body.is_eof():
                messages.pop()
                self.close()
        if body is not None and not body.is_eof():
            body.set_exception(error)
            body.feed_eof()  # so aiohttp does not linger over the rest of a body that cannot come

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:  # fmt: skip
        """aiohttp calls this for a request its parser refused (status 400, `message` from the parser), a
        handler's unexpected exception (500; a ChuteError that escaped its area is answered as itself) or timeout
        (504). Like aiohttp's own: closes the connection after the answer, and raises ConnectionError if a
        response had already begun (nothing more can be sent)."""
        if request.writer.output_size > 0:
            raise ConnectionError("a response had already begun: the connection is closed without another")
        error = exc if isinstance(exc, ChuteError) else _error_for(status, message)  # e.g. a broken body, unread
        status = error.http_status
        if status >= 500:
            log.error("HTTP %s %s failed", request.method, request.path, exc_info=exc)
        else:  # the peer's bytes, not our fault: no traceback in the log
            log.debug("HTTP %s %s from %s: %s", request.method, request.path, request.remote, error.message)
        response = error_response(error)
        response.force_close()
        return response


class _Server(web.Server):
    """aiohttp's low-level server, making `JsonErrorsRequestHandler` connections."""

    def __call__(self) -> RequestHandler:
        return JsonErrorsRequestHandler(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    """`web.AppRunner` whose connections answer aiohttp's own errors in the JSON shape."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server  # the same server (it holds no state of its own) making our connections
        return server
