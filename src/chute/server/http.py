"""The HTTP listener (aiohttp, in the broker's own event loop). For now it answers `GET /healthz`: 200 while
serving, 503 while recovering or shutting down (the HTTP API and dashboard come later on the same app).

Invariant: handlers only read broker state; nothing here blocks the loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from chute.server.app import Server


def make_app(server: Server) -> web.Application:
    app = web.Application(client_max_size=1024 * 1024)

    async def healthz(request: web.Request) -> web.Response:
        state = server.state
        status = 200 if state == "serving" and server.broker.healthy else 503
        body = {"status": state if state != "serving" or status == 200 else "read-only"}
        return web.json_response(body, status=status)

    app.router.add_get("/healthz", healthz)
    return app
