"""The OpenAPI 3.1 document of the HTTP API, generated from the route table and the same msgspec models that
validate requests (`msgspec.json.schema_components`), so the document cannot drift from what is served.

Invariants: every route of the table is an operation with its path and query parameters, request body,
success response and every error status it may answer (each with the `Error` schema and the error names from
`chute.errors`, and the `Retry-After` header where one of them comes with it); the security schemes are HTTP
bearer and basic (login needs none).
"""

from __future__ import annotations

from typing import Any

import msgspec

from chute.errors import (
    BrokerClosed,
    ChuteError,
    Forbidden,
    InvalidArgument,
    InvalidName,
    MessageTooLarge,
    Unauthenticated,
)
from chute.model import NAME_RE
from chute.server.api.call import RETRY_AFTER, Route
from chute.server.api.models import Error

REF = "#/components/schemas/{name}"
JSON = "application/json"


def errors_of(route: Route) -> list[type[ChuteError]]:
    """Every error `route` may answer: the common ones (by access, name, query, body) and its own."""
    errors: list[type[ChuteError]] = []
    if route.access != "public":
        errors += [Unauthenticated]
        if route.access != "user":
            errors += [Forbidden]
    if "{name}" in route.path:
        errors += [InvalidName]
    if route.query or route.body is not None:
        errors += [InvalidArgument]
    if route.body is not None:
        errors += [MessageTooLarge]
    if route.access != "public":
        errors += [BrokerClosed]
    for error in route.errors:
        if error not in errors:
            errors.append(error)
    return errors


def document(routes: tuple[Route, ...], version: str) -> dict[str, Any]:
    """The OpenAPI document of `routes` as a JSON-ready dict."""
    types = [Error]
    for route in routes:
        types += [kind for kind in (route.body, route.reply) if kind is not None and kind not in types]
    schemas, components = msgspec.json.schema_components(types, ref_template=REF)
    ref = dict(zip(map(id, types), schemas, strict=True))
    paths: dict[str, dict] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, ref)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Chute HTTP API",
            "version": version,
            "description": "Queues, topics and subscriptions; publish, receive with a lease and long polling, "
            "ack, nack, extend; peek, purge, redrive; stats; connections and consumers. Ids and receipts are "
            "64-bit integers written as strings. See docs/http-api.md.",
        },
        "servers": [{"url": "/"}],
        "tags": [{"name": tag} for tag in dict.fromkeys(route.tag for route in routes)],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an API token (cht_...) or a session token from POST /api/v1/login",
                },
                "basic": {"type": "http", "scheme": "basic", "description": "a user's name and password"},
            },  # fmt: skip
        },
        "security": [{"bearer": []}, {"basic": []}],
    }


def _operation(route: Route, ref: dict[int, dict]) -> dict[str, Any]:
    operation: dict[str, Any] = {"operationId": route.operation_id, "summary": route.summary, "tags": [route.tag]}
    if route.description:
        operation["description"] = route.description
    parameters = []
    if "{name}" in route.path:
        parameters.append({"name": "name", "in": "path", "required": True,
                           "description": f"the {route.kind}'s name",
                           "schema": {"type": "string", "pattern": NAME_RE.pattern}})  # fmt: skip
    for param in route.query:
        schema = msgspec.json.schema(param.type)
        if not param.required:
            schema["default"] = param.default
        parameters.append({"name": param.name, "in": "query", "required": param.required,
                           "description": param.description, "schema": schema})  # fmt: skip
    if parameters:
        operation["parameters"] = parameters
    if route.body is not None:
        operation["requestBody"] = {"required": route.body_required,
                                    "content": {JSON: {"schema": ref[id(route.body)]}}}  # fmt: skip
    operation["responses"] = _responses(route, ref)
    if route.access == "public":
        operation["security"] = []
    return operation


def _responses(route: Route, ref: dict[int, dict]) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    if route.reply is None:
        responses["204"] = {"description": "done"}
    else:
        success = {"description": "success", "content": {JSON: {"schema": ref[id(route.reply)]}}}
        responses[str(route.status)] = success
        if route.status == 201 and route.method == "PUT":
            responses["200"] = {"description": "it existed already, with the same settings",
                                "content": success["content"]}  # fmt: skip
    by_status: dict[int, list[str]] = {}
    retry_after: dict[int, list[str]] = {}  # status -> the errors that come with a Retry-After header
    for error in errors_of(route):
        by_status.setdefault(error.http_status, []).append(f"`{error.name}` ({error.code})")
        if error in RETRY_AFTER:
            retry_after.setdefault(error.http_status, []).append(f"`{error.name}`")
    for status in sorted(by_status):
        responses[str(status)] = {"description": ", ".join(by_status[status]),
                                  "content": {JSON: {"schema": ref[id(Error)]}}}  # fmt: skip
        if status in retry_after:
            header = {"description": f"with {', '.join(retry_after[status])}: seconds to wait before retrying",
                      "schema": {"type": "integer"}}  # fmt: skip
            responses[str(status)]["headers"] = {"Retry-After": header}
    return responses
