"""The HTTP API (docs/http-api.md): JSON over HTTP for everything the native protocol can do, plus the
server's overview, connections and consumers, login and whoami.

    routes.py   THE route table (`ROUTES`): method, path, access rule, models, status, handler
    call.py     one request: authorize, validate, call, encode; the JSON error middleware
    models.py   msgspec request / response models
    queues.py, topics.py, system.py   the handlers
    openapi.py  GET /openapi.json, generated from the table and the models
    page.py     GET /api, the readable page rendered from that document

Invariant: every route is authorized (server/auth.py) before it touches the broker, and every failure under
/api/ and /openapi.json is the JSON error shape with the status of the error table.
"""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING

import msgspec
from aiohttp import web

from chute.server.api import call, openapi, page
from chute.server.api.routes import ROUTES
from chute.server.api.system import STARTED

if TYPE_CHECKING:
    from chute.server.app import Server

__all__ = ["ROUTES", "add_routes"]


def add_routes(app: web.Application, server: Server) -> None:
    """Mount the API, /openapi.json and /api on `app`, with the JSON error middleware for those paths."""
    app[STARTED] = time.time()
    app.middlewares.append(call.errors_middleware)
    for route in ROUTES:
        app.router.add_route(route.method, route.path, functools.partial(call.run, route, server))
    version = server.name.partition("/")[2] or server.name
    document = openapi.document(ROUTES, version)
    encoded = msgspec.json.encode(document)
    html = page.render(document)

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(body=encoded, content_type="application/json")

    async def api_page(request: web.Request) -> web.Response:
        return web.Response(text=html, content_type="text/html")

    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/api", api_page)
