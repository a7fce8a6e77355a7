"""The SQS actions, protocol-neutral: JSON-protocol-shaped params in, a JSON-protocol-shaped result out.

    ctx = SqsContext(server, principal, base_url="http://127.0.0.1:6161")
    result = await call(ctx, "SendMessage", {"QueueUrl": ..., "MessageBody": "hi"})

Params and results have exactly the shape botocore's JSON serializer sends and its parser expects (e.g.
`{"QueueUrl": ..., "Attributes": {"VisibilityTimeout": "30"}, "MessageAttributes": {"a": {"DataType": "String",
"StringValue": "x"}}, "Entries": [...]}`; blobs are base64 strings). The JSON protocol (jsonproto.py) only
decodes and encodes; the query protocol (query.py) converts forms to this shape and renders results as XML.

Invariant: a handler either returns a result dict or raises `SqsError`; it authorizes (auth.check) before it
changes anything.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from chute.server.sqs.errors import SqsError

if TYPE_CHECKING:
    from chute.server.app import Server
    from chute.server.auth import Principal

DEFAULT_ACCOUNT_ID = "000000000000"
DEFAULT_REGION = "us-east-1"

Handler = Callable[["SqsContext", dict], Awaitable[dict]]


@dataclass
class SqsContext:
    """Who calls, and how they addressed us (queue URLs are built from `base_url` and `account_id`)."""

    server: Server
    principal: Principal
    base_url: str
    """`http://host:port` as the client addressed us (no trailing slash)."""
    account_id: str = DEFAULT_ACCOUNT_ID
    region: str = DEFAULT_REGION
    extra: dict[str, Any] = field(default_factory=dict)
    """Per-request values a protocol module wants to pass along (e.g. the aiohttp request, to notice a
    disconnect during a long poll: key `request`)."""


ACTIONS: dict[str, Handler] = {}


def action(handler: Handler) -> Handler:
    """Register a handler under its function name in CamelCase (`send_message` -> `SendMessage`)."""
    ACTIONS["".join(part.capitalize() for part in handler.__name__.split("_"))] = handler
    return handler


async def call(ctx: SqsContext, name: str, params: dict) -> dict:
    """Run action `name` with `params`; raise SqsError (InvalidAction for an unknown action)."""
    handler = ACTIONS.get(name)
    if handler is None:
        raise SqsError("InvalidAction", f"The action {name} is not valid for this endpoint.")
    if not isinstance(params, dict):
        raise SqsError("InvalidParameterValue", "The request body must be a JSON object.")
    return await handler(ctx, params)
