"""HTTP forwarding: the HTTP API, the SQS API and the dashboard work through any node of a cluster.

A request that names a queue or topic (the API's `/api/v1/queues/{name}...` and `/api/v1/topics/{name}...`; an
SQS action's `QueueUrl` or `QueueName`, a move task's `SourceArn` or `TaskHandle`) is served by the node that owns
the name's shard:

- on this node, if it owns the shard: the handler runs as it does on a single broker, given that shard's
  `chute.Broker` (`request[BROKER_KEY]`, seen through `ShardView`, which adds relays to other shards), so
  every front's code stays as it is;
- else it is forwarded as it came (method, path, query, headers — `Host` and SigV4 signatures included — and
  body) to the owner's HTTP port, marked with `X-Chute-Forwarded`, and the owner's answer is returned as it is.
  A forwarded request is never forwarded again: a node that no longer owns the shard answers 503 `unavailable`.

A create (API `PUT` of a queue or topic, SQS `CreateQueue` in the JSON or the query protocol) writes the name's
placement row first (its home shard; a queue whose dead-letter queue exists goes to that queue's shard, where the
core can check it); a delete that succeeded removes the row. Requests naming nothing (lists, the overview, SQS
`ListQueues`, static files) are served here, by the router, which merges every shard.

Invariant: the body is read once (aiohttp keeps it for the handler); a shard with no live owner is waited for as
the router waits, then answered 503 `unavailable` (retryable), having changed nothing; a name whose row names a
shard served here that does not hold it yet (being created, or a queue moving to its topic's shard) is waited
for as the router waits (`_arriving`), not answered "does not exist".
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from urllib.parse import parse_qs, unquote, urlsplit

from aiohttp import ClientError, ClientSession, ClientTimeout, web

from chute.cluster.placement import ARRIVING_POLL_S, ARRIVING_S
from chute.cluster.shard_view import ShardView
from chute.errors import ChuteError, Unavailable

log = logging.getLogger("chute.cluster")
FORWARDED = "X-Chute-Forwarded"
# The request's shard broker when it is on this node, for the handlers (api/call.py, sqs/__init__.py).
BROKER_KEY = web.RequestKey("chute_shard_broker", object)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
              "proxy-authenticate", "content-length"}  # fmt: skip
FORWARD_TIMEOUT_S = 60 + 20 * 60  # a long poll waits up to 20 s (SQS) or the API's maximum; generous on top


def middleware(server):
    """The aiohttp middleware of a cluster node's HTTP app."""
    router = server.broker
    sessions: list[ClientSession] = []

    @web.middleware
    async def forward(request: web.Request, handler):
        try:
            target = await _target(request)
        except ChuteError as exc:
            return _error(exc)
        if target is None:
            return await handler(request)
        name, kind, action = target
        try:
            placed = await router.placement.lookup(name)
            if placed is None and action == "create":
                placed = await router.placement.place(name, kind, near=await _near(router, request, kind))
            if placed is None:
                return await handler(request)  # not found, said the way this front says it
            loop = asyncio.get_running_loop()
            owner = await router._owner(placed.shard, loop.time() + router.wait_owner_s) \
                if not request.headers.get(FORWARDED) else router.local._owner_now(placed.shard)  # fmt: skip
        except ChuteError as exc:
            return _error(exc)
        if hasattr(owner, "core"):  # this node's broker of the shard (seen with what crosses shards: relays)
            if action != "create":
                await _arriving(router, owner, name, placed.shard)
            request[BROKER_KEY] = ShardView(owner, router, placed.shard)
            response = await handler(request)
            if action == "delete" and response.status < 300:
                await router.placement.forget(name, placed.kind)
            return response
        info = router.node.owner(placed.shard)
        if info is None or not info.http_port:
            return _error(Unavailable(f"the owner of shard {placed.shard} has no HTTP port to forward to"))
        if not sessions:
            sessions.append(ClientSession(timeout=ClientTimeout(total=FORWARD_TIMEOUT_S), auto_decompress=False))
        response = await _proxy(sessions[0], request, info, "https" if server.ssl else "http")
        if action == "delete" and response.status < 300:
            router.placement.uncache(name)  # the owner removed the row; no stale copy of it stays here
        return response

    async def close(app) -> None:
        for session in sessions:
            await session.close()

    return forward, close


async def _target(request: web.Request) -> tuple[str, str, str] | None:
    """(name, kind, action) of a request that names a queue or topic, else None. Action: create, delete, other."""
    path = request.path
    for prefix, kind in (("/api/v1/queues/", "queue"), ("/api/v1/topics/", "topic")):
        if path.startswith(prefix):
            name = request.match_info.get("name")
            if not name:
                return None
            whole = path.rstrip("/") == prefix + name
            action = "create" if whole and request.method == "PUT" else "delete" if whole and \
                request.method == "DELETE" else "other"  # fmt: skip
            return name, kind, action
    if request.method != "POST" or not (path == "/" or request.match_info.get("queue")):
        return None
    target = request.headers.get("X-Amz-Target")
    if target is not None and request.match_info.get("queue"):  # the queue's URL as the endpoint (boto3 does)
        action = target.rpartition(".")[2]  # ... so the body is not read here (a send over the memory mark is
        return request.match_info["queue"], "queue", "delete" if action == "DeleteQueue" else "other"  # refused)
    body = await request.read()
    if target is not None:
        try:
            params = json.loads(body or b"{}")
        except ValueError:
            return None
        action = target.rpartition(".")[2]
    else:
        form = parse_qs(body.decode("utf-8", "replace"))
        params = {key: values[0] for key, values in form.items()}
        action = params.get("Action", "")
    if not isinstance(params, dict):
        return None
    name = request.match_info.get("queue")
    if isinstance(params.get("QueueUrl"), str):
        name = _queue_of_url(params["QueueUrl"])
    elif action in ("CreateQueue", "GetQueueUrl") and isinstance(params.get("QueueName"), str):
        name = params["QueueName"]
    elif action in ("StartMessageMoveTask", "ListMessageMoveTasks") and isinstance(params.get("SourceArn"), str):
        name = params["SourceArn"].rpartition(":")[2]  # a move task runs (and is kept) on its source's owner
    elif action == "CancelMessageMoveTask" and isinstance(params.get("TaskHandle"), str):
        name = _move_task_source(params["TaskHandle"])
    if not name:
        return None
    return name, "queue", {"CreateQueue": "create", "DeleteQueue": "delete"}.get(action, "other")


async def _arriving(router, broker, name: str, shard: int) -> None:
    """Wait for `name`, whose row names `shard` (served here by `broker`), to be there, as the router does
    (placement.ARRIVING_S): the row is written first, so a queue being created or moved to its topic's shard is on
    its way, and must not be answered "does not exist" meanwhile. Returns at once when it is there, and when its
    row names another shard or none (the handler answers)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ARRIVING_S
    while name not in broker.core.queues and name not in broker.core.topics and loop.time() < deadline:
        placed = await router.placement.refresh(name)
        if placed is None or placed.shard != shard:
            return
        await asyncio.sleep(ARRIVING_POLL_S)  # (a poll: nothing announces the queue's arrival)


def _queue_of_url(url: str) -> str:
    """The queue a `QueueUrl` names, read as the SQS front reads it (sqs/common.py, `queue_name_of_url`): the last
    segment of the URL's path, percent-decoded; a bare name is itself. (Read as-is, a name in percent-encoding or
    a URL with a query or fragment named no placed queue, and a node that does not own the queue answered
    QueueDoesNotExist where its owner serves the request.)"""
    path = urlsplit(url).path if "://" in url else url
    return unquote(path.rstrip("/").rsplit("/", 1)[-1])


def _move_task_source(handle: str) -> str | None:
    """The source queue a move task's handle names (sqs/movetasks.py: base64 of a uuid, a newline, the source ARN)."""
    try:
        text = base64.urlsafe_b64decode(handle.encode()).decode()
    except (ValueError, UnicodeError):
        return None
    return text.partition("\n")[2].rpartition(":")[2] or None


async def _near(router, request: web.Request, kind: str) -> int | None:
    """The shard of the dead-letter queue a new queue names (the core checks it exists in the same broker): the
    API's `dead_letter_queue`, or the `RedrivePolicy` of an SQS CreateQueue in either protocol — the JSON one's
    `Attributes`, or the query one's form fields `Attribute.N.Name` and `Attribute.N.Value`."""
    if kind != "queue":
        return None
    body = await request.read()
    dlq = None
    try:
        if request.path.startswith("/api/") or request.headers.get("X-Amz-Target") is not None:
            settings = json.loads(body or b"{}")
        else:
            settings = {"Attributes": _query_attributes(parse_qs(body.decode("utf-8", "replace")))}
        if isinstance(settings, dict):
            dlq = settings.get("dead_letter_queue")
            policy = (settings.get("Attributes") or {}).get("RedrivePolicy")
            if isinstance(policy, str):
                dlq = json.loads(policy).get("deadLetterTargetArn", "").rpartition(":")[2] or None
    except (ValueError, AttributeError):
        pass
    if not isinstance(dlq, str) or not dlq:
        return None
    return await router.placement.shard_of(dlq, "queue")


def _query_attributes(form: dict[str, list[str]]) -> dict[str, str]:
    """The attributes of a query-protocol SQS request, read as the SQS front reads them (sqs/query.py, `MAPS`):
    `Attribute.N.Name` with its `Attribute.N.Value` (or `Attributes.N....`, the JSON member's name)."""
    found = {}
    for key, values in form.items():
        head, _, rest = key.partition(".")
        index, _, field = rest.partition(".")
        if head in ("Attribute", "Attributes") and field == "Name":
            value = form.get(f"{head}.{index}.Value")
            if value:
                found[values[0]] = value[0]
    return found


async def _proxy(session: ClientSession, request: web.Request, owner, scheme: str) -> web.StreamResponse:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    headers[FORWARDED] = "1"
    host = f"[{owner.host}]" if ":" in owner.host else owner.host
    url = f"{scheme}://{host}:{owner.http_port}{request.raw_path}"
    body = await request.read()
    try:
        # (a BytesIO, not bytes: aiohttp warns of a bytes body over 1 MiB, such as a publish of a body near
        # max_message_bytes in base64, with a ResourceWarning, which fails the request where warnings are errors)
        async with session.request(request.method, url, headers=headers, data=io.BytesIO(body),
                                   allow_redirects=False) as answer:  # fmt: skip
            payload = await answer.read()
            kept = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP}
            return web.Response(status=answer.status, headers=kept, body=payload)
    except (ClientError, OSError, TimeoutError) as exc:
        log.warning("forwarding %s %s to node %s failed: %s", request.method, request.path, owner.name, exc)
        return _error(Unavailable(f"node {owner.name} was lost while serving the request (its outcome is "
                                  f"unknown): {exc or type(exc).__name__}"))  # fmt: skip


def _error(exc: ChuteError) -> web.Response:
    body = {"error": {"name": exc.name, "code": exc.code, "message": exc.message, "retryable": exc.retryable}}
    headers = {"Retry-After": "1"} if exc.retryable else None
    return web.json_response(body, status=exc.http_status, headers=headers)
