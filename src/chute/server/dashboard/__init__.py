"""The web dashboard: one static single-page app served by the broker itself (no build step, no Node.js).

    GET /                 index.html
    GET /ui/{file}        the app's scripts (ES modules), style sheet and icon, from static/

The app talks to the broker only through the HTTP API (docs/http-api.md) with the caller's own credentials, so
these routes need no auth: they serve the same public files to everyone and touch no broker state.

Invariants:
- The files are read once, when the routes are added; a request never touches the disk (never blocks the loop).
- Every response carries a Content-Security-Policy allowing only this origin (no inline scripts, no eval, no
  third-party hosts), `X-Content-Type-Options: nosniff` and `Cache-Control: no-cache`: a browser revalidates
  with the ETag on each load, so an upgraded broker never runs a stale app.
- Only files listed in static/ are served; names are looked up in a dict, never joined to a path.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from chute.server.app import Server

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

# 'self' only. Inline styles are not allowed either (the app sets styles through classes and the CSSOM).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


class StaticFile:
    """One file of the app, kept in memory with its content type and ETag."""

    def __init__(self, body: bytes, content_type: str) -> None:
        self.body = body
        self.content_type = content_type
        self.etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'

    def response(self, request: web.Request) -> web.Response:
        headers = {
            "Content-Security-Policy": CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache",
            "ETag": self.etag,
        }
        if request.headers.get("If-None-Match") == self.etag:
            return web.Response(status=304, headers=headers)
        headers["Content-Type"] = self.content_type
        return web.Response(body=self.body, headers=headers)


def load_files() -> dict[str, StaticFile]:
    """Every file of static/ whose extension has a known content type, by name."""
    files = {}
    for entry in resources.files(__package__).joinpath("static").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in CONTENT_TYPES:
            files[entry.name] = StaticFile(entry.read_bytes(), CONTENT_TYPES[suffix])
    return files


def add_routes(app: web.Application, server: Server) -> None:
    files = load_files()

    async def index(request: web.Request) -> web.Response:
        return files["index.html"].response(request)

    async def static(request: web.Request) -> web.Response:
        found = files.get(request.match_info["file"])
        if found is None:
            raise web.HTTPNotFound(text="no such dashboard file", headers={"Content-Security-Policy": CSP})
        return found.response(request)

    app.router.add_get("/", index)
    app.router.add_get("/ui/{file}", static)
