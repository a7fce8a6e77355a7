"""The HTTP listener (aiohttp, in the broker's own event loop): one app, each area adding its own routes.

    /healthz              200 while serving, 503 while recovering, stopping or read-only (no auth)
    /api/v1/...           the HTTP API (server/api/), /openapi.json and the API page
    /metrics              Prometheus text format (server/metrics.py)
    GET /, /ui/...        the web dashboard (server/dashboard/)
    POST /, /<account>/<queue>   the Amazon SQS API (server/sqs/)

Invariant: handlers never block the loop; each area authorizes its requests (server/auth.py) before it
touches the broker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from chute.server import api, dashboard, metrics, sqs
from chute.server.auth import challenge_middleware

if TYPE_CHECKING:
    from chute.server.app import Server

# Large enough for a batch of messages at the default max message size; each area checks its own limits.
MAX_BODY_BYTES = 16 * 1024 * 1024

SERVER_KEY = web.AppKey("server", object)
PRINCIPAL_KEY = web.RequestKey("principal", object)  # who a request authenticated as (server/auth.py)


def make_app(server: Server) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[challenge_middleware()])  # 401s challenge
    app[SERVER_KEY] = server

    async def healthz(request: web.Request) -> web.Response:
        state = server.state
        status = 200 if state == "serving" and server.broker.healthy else 503
        body = {"status": state if state != "serving" or status == 200 else "read-only"}
        return web.json_response(body, status=status)

    app.router.add_get("/healthz", healthz)
    api.add_routes(app, server)
    metrics.add_routes(app, server)
    sqs.add_routes(app, server)
    dashboard.add_routes(app, server)  # last: it serves GET /
    return app
