"""One HTTP API request from arrival to answer: `Route` (a row of the route table), `Call` (what a handler gets),
`run` (authorize, validate the name, the query and the body, call the handler, encode the answer) and the
error middleware that gives every failure under /api/ and /openapi.json the JSON error shape.

Invariants:
- the route's access rule is applied (server/auth.py) before the name, query or body are looked at and before
  the handler runs, so a refused request changes nothing and learns nothing about the body's validity;
- a publish route (access `publish`) is refused with `server_busy` (503, `Retry-After: 1`) before its body is
  read while the server is over its memory high-water mark, and otherwise holds its body's bytes against the
  mark from before the body is read until the handler ends (the publish is durable or failed);
- a handler gets a well-typed body (msgspec, unknown fields refused) and query, and a valid name;
- every error is JSON `{"error": {name, code, message, retryable}}` with the status of the error table, never
  an HTML page or a traceback; an unexpected exception is logged and answered 500 `chute_error`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from chute.cluster.http_forward import BROKER_KEY
from chute.errors import (
    BrokerClosed,
    ChuteError,
    Forbidden,
    InvalidArgument,
    InvalidReceipt,
    MessageTooLarge,
    MethodNotAllowed,
    ProtocolError,
    RouteNotFound,
    ServerBusy,
)
from chute.model import validate_name
from chute.server import auth
from chute.server.api.models import Error, ErrorDetail

if TYPE_CHECKING:
    from chute.broker import Broker
    from chute.server.app import Server
    from chute.server.auth import Kind, Principal

log = logging.getLogger("chute.server.api")

# Who may call a route. A permission (publish / consume / manage) on the route's queue or topic; `see`: any
# permission on it; `user`: any authenticated caller (lists are then filtered with can_see); `superuser`;
# `public`: no credentials needed (login).
Access = Literal["publish", "consume", "manage", "see", "user", "superuser", "public"]
JSON = "application/json"

Answer = msgspec.Struct | tuple[int, msgspec.Struct] | None


@dataclass(frozen=True)
class Query:
    """A query parameter: its name, type (with its range, as msgspec `Annotated`), default and meaning."""

    name: str
    type: Any
    description: str
    default: Any = msgspec.NODEFAULT

    @property
    def required(self) -> bool:
        return self.default is msgspec.NODEFAULT


@dataclass(frozen=True)
class Route:
    """One row of the route table: everything the dispatcher, the OpenAPI document and the tests need."""

    method: str
    path: str
    handler: Callable[[Call], Awaitable[Answer]]
    summary: str
    access: Access
    kind: Kind | None = None
    body: type | None = None
    body_required: bool = True
    reply: type | None = None  # None: 204 No Content
    status: int = 200
    query: tuple[Query, ...] = ()
    errors: tuple[type[ChuteError], ...] = ()
    tag: str = "queues"
    description: str = ""

    @property
    def operation_id(self) -> str:
        return self.handler.__name__


@dataclass
class Call:
    """What a handler gets: the request, the server, who is calling, the path's name, the decoded body and query."""

    request: web.Request
    server: Server
    principal: Principal
    name: str
    body: Any = None
    query: dict[str, Any] = field(default_factory=dict)

    @property
    def broker(self) -> Broker:
        """The broker: on a cluster node, the broker of the shard that holds the path's name when it is here
        (cluster/http_forward.py), else the node's router."""
        return self.request.get(BROKER_KEY) or self.server.broker


async def run(route: Route, server: Server, request: web.Request) -> web.Response:
    """Serve one request on `route` (errors are raised; the middleware turns them into JSON)."""
    name = request.match_info.get("name", "")
    principal = await _admit(route, request, name)
    if server.state in ("new", "recovering") and route.access != "public":
        raise BrokerClosed(f"the broker is {server.state}: try again in a moment")  # recovery owns the state
    if "{name}" in route.path:
        validate_name(name, route.kind or "queue")
    query = _query(route, request)
    if route.access == "publish":
        answer = await _publish(route, server, request, principal, name, query)
    else:
        body = await _body(route, request) if route.body is not None else None
        answer = await route.handler(Call(request, server, principal, name, body, query))
    if answer is None:
        return web.Response(status=204)
    status, reply = answer if isinstance(answer, tuple) else (route.status, answer)
    return web.Response(status=status, body=msgspec.json.encode(reply), content_type=JSON)


async def _publish(route: Route, server: Server, request: web.Request, principal: Principal | None, name: str,
                   query: dict[str, Any]) -> Answer:  # fmt: skip
    """A publish route: refused while the server is over its memory high-water mark, before the body is read;
    otherwise its body's bytes count toward the mark until the publish is durable or has failed."""
    if server.memory_paused:
        raise ServerBusy(f"the server holds more than its memory high-water mark "
                         f"({server.config.memory_high_water_bytes} bytes) of unconfirmed publishes: retry in a "
                         "moment")  # fmt: skip
    with server.http_publish() as hold:
        hold.set(min(request.content_length or 0, request.client_max_size))  # what is about to be read
        data = await request.read()
        hold.set(len(data))
        body = _decode(route, data)
        return await route.handler(Call(request, server, principal, name, body, query))


async def _admit(route: Route, request: web.Request, name: str) -> Principal | None:
    access = route.access
    if access == "public":
        return None
    if access in ("publish", "consume", "manage"):
        return await auth.authorize(request, access, route.kind, name)
    principal = await auth.authenticate(request)
    if access == "see" and not principal.can_see(route.kind, name):
        raise Forbidden(f"{principal.name} may not see {route.kind} {name!r}")
    if access == "superuser" and not principal.superuser:
        raise Forbidden(f"only a superuser may list connections ({principal.name} is not one)")
    return principal


def _query(route: Route, request: web.Request) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for param in route.query:
        raw = request.query.get(param.name)
        if raw is None:
            if param.required:
                raise InvalidArgument(f"query parameter {param.name!r} is required")
            values[param.name] = param.default
            continue
        try:
            values[param.name] = msgspec.convert(raw, param.type, strict=False)
        except msgspec.ValidationError as exc:
            raise InvalidArgument(f"query parameter {param.name!r}: {exc}") from None
    return values


async def _body(route: Route, request: web.Request) -> Any:
    return _decode(route, await request.read())  # HTTPRequestEntityTooLarge over the app's client_max_size


def _decode(route: Route, data: bytes) -> Any:
    if not data:
        if route.body_required:
            raise InvalidArgument("a JSON body is required")
        data = b"{}"
    try:
        return msgspec.json.decode(data, type=route.body)
    except msgspec.ValidationError as exc:
        raise InvalidArgument(f"invalid request body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidArgument(f"malformed JSON: {exc}") from None


# -- errors ---------------------------------------------------------------------------------------------------


RETRY_AFTER: dict[type[ChuteError], str] = {ServerBusy: "1"}  # seconds, as the `Retry-After` header says it


def error_response(exc: ChuteError, headers: dict[str, str] | None = None) -> web.Response:
    retry_after = RETRY_AFTER.get(type(exc))
    if retry_after is not None:
        headers = {"Retry-After": retry_after} | (headers or {})
    receipts = getattr(exc, "receipts", None) if isinstance(exc, InvalidReceipt) else None
    detail = ErrorDetail(name=exc.name, code=exc.code, message=exc.message, retryable=exc.retryable,
                         receipts=[str(r) for r in receipts] if receipts else None)  # fmt: skip
    return web.Response(status=exc.http_status, body=msgspec.json.encode(Error(error=detail)), content_type=JSON,
                        headers=headers)  # fmt: skip


def is_api_path(path: str) -> bool:
    return path == "/api" or path.startswith("/api/") or path == "/openapi.json"


@web.middleware
async def errors_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Under /api/ and /openapi.json only: every failure becomes the JSON error shape. Other paths are
    untouched (the dashboard, /metrics, /healthz and the SQS API answer in their own ways)."""
    if not is_api_path(request.path):
        return await handler(request)
    try:
        return await handler(request)
    except ChuteError as exc:
        return error_response(exc)
    except web.HTTPRequestEntityTooLarge as exc:
        return error_response(MessageTooLarge(f"the request body is too large ({exc.text})"))
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return error_response(MethodNotAllowed(f"{request.method} is not allowed on {request.path}; "
                                               f"allowed: {allowed}"), {"Allow": allowed})  # fmt: skip
    except web.HTTPNotFound:
        return error_response(RouteNotFound(f"no route {request.path} (see /openapi.json)"))
    except ConnectionResetError:  # the client hung up while its body was being read: nobody reads an answer
        log.debug("%s %s: the client hung up", request.method, request.path)
        return error_response(ChuteError("the client disconnected"))
    except HttpProcessingError as exc:  # the body broke HTTP as it was read (aiohttp's pure-Python parser)
        return error_response(ProtocolError(f"malformed HTTP request: {' '.join(str(exc.message).split())}"))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = InvalidArgument(exc.reason) if exc.status < 500 else ChuteError(exc.reason)
        error.http_status = exc.status
        return error_response(error)
    except Exception as exc:  # a bug: say so in the same shape, keep the details in the log
        log.exception("%s %s failed", request.method, request.path)
        return error_response(ChuteError(f"internal error: {type(exc).__name__}"))
