"""The Amazon SQS API on the broker's HTTP port: boto3, the AWS CLI, kombu and Celery work unchanged.

    POST /, POST /<account>/<queue>
        X-Amz-Target: AmazonSQS.<Action>   -> the JSON protocol (jsonproto.py), what current botocore sends
        a form body with Action=<Action>   -> the query protocol (query.py), what older SDKs send

`GET /` is the dashboard's. Queue URLs are `http://<host as the client addressed us>/<account id>/<queue>`; an SQS
queue is the Chute queue of that name. Modules: `actions` (the action table and queue actions), `messaging`
(send, receive, delete, visibility), `movetasks`, `queueattrs` (attributes <-> settings), `messages` (MD5s,
attributes as headers, ids, receipt handles), `errors`, `sigv4`.

Credentials: with auth off (no users, no token) every request is accepted, signed or not, as the anonymous
superuser. With auth on, a request must be SigV4-signed with a known access key (InvalidClientTokenId otherwise)
and a correct signature (SignatureDoesNotMatch); the key's user's permissions then apply (AccessDenied).

Memory: SendMessage and SendMessageBatch hold their request body's bytes against the server's memory high-water
mark (`Server.http_publish`) until the messages are durable or the send failed; while the server is over the
mark they are answered `RequestThrottled` (retryable), in the JSON protocol before the body is read (the action
is in the `X-Amz-Target` header), in the query protocol once the form names the action.

Invariant: every request gets exactly one response in its protocol, errors included; the principal is known
before any action runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from chute.cluster.http_forward import BROKER_KEY
from chute.server import auth
from chute.server.sqs import sigv4
from chute.server.sqs.common import DEFAULT_ACCOUNT_ID, DEFAULT_REGION, SqsContext, prepared_state, sqs_state
from chute.server.sqs.errors import SqsError

if TYPE_CHECKING:
    from chute.server.app import Server

FORM_TYPE = "application/x-www-form-urlencoded"
SEND_ACTIONS = frozenset({"SendMessage", "SendMessageBatch"})
SEND_TARGETS = frozenset(f"AmazonSQS.{action}" for action in SEND_ACTIONS)


def throttled(server: Server) -> SqsError:
    """The answer to a send while the server is over its memory high-water mark: `RequestThrottled`, which
    botocore retries in every retry mode (docs/sqs.md)."""
    high = server.config.memory_high_water_bytes
    return SqsError("RequestThrottled", f"The server holds more than its memory high-water mark ({high} bytes) "
                    "of unconfirmed messages; retry in a moment.")  # fmt: skip


def add_routes(app: web.Application, server: Server) -> None:
    async def handle(request: web.Request) -> web.StreamResponse:
        target = request.headers.get("X-Amz-Target")
        is_json = target is not None
        sending = target in SEND_TARGETS
        if sending and server.memory_paused:
            return _error(is_json, throttled(server))  # before the body is read
        with server.http_publish() as hold:
            if sending:
                hold.set(min(request.content_length or 0, request.client_max_size))  # what is about to be read
            body = await request.read()
            if sending:
                hold.set(len(body))
            if not is_json and request.content_type != FORM_TYPE and not body.startswith(b"Action="):
                raise web.HTTPNotFound()  # neither protocol: not an SQS request
            try:
                principal, region = _authenticate(server, request, body)
            except SqsError as error:
                return _error(is_json, error)
            await prepared_state(server)
            transport = request.transport
            ctx = SqsContext(server, principal, base_url=f"{request.scheme}://{request.host}",
                             account_id=DEFAULT_ACCOUNT_ID, region=region or DEFAULT_REGION,
                             extra={"disconnected": lambda: transport is None or transport.is_closing(),
                                    "broker": request.get(BROKER_KEY)})  # fmt: skip
            if is_json:
                from chute.server.sqs.jsonproto import handle_json

                return await handle_json(ctx, target, body)
            from chute.server.sqs.query import handle_query

            form = await request.post()
            if form.get("Action") in SEND_ACTIONS:  # a query-protocol send: known only once its body is read
                if server.memory_paused:
                    return _error(is_json, throttled(server))
                hold.set(len(body))
            return await handle_query(request, ctx, form)

    async def stop_move_tasks(app: web.Application) -> None:
        for task in sqs_state(server).move_tasks:
            if task.runner is not None and not task.runner.done():
                task.runner.cancel()

    app.router.add_post("/", handle)
    app.router.add_post("/{account}/{queue}", handle)
    app.on_shutdown.append(stop_move_tasks)  # a stopping server does not wait for a slow move task


def _authenticate(server: Server, request: web.Request, body: bytes) -> tuple[auth.Principal, str | None]:
    """(principal, the region the request was signed for) or SqsError."""
    region = None
    header = request.headers.get("Authorization")
    if header is not None and header.startswith(sigv4.ALGORITHM):
        try:
            region = sigv4.parse_authorization(header).region
        except SqsError:
            region = None
    authenticator = getattr(server, "auth", None)
    if authenticator is None or not authenticator.enabled:
        return auth.ANONYMOUS, region
    credential = sigv4.parse_authorization(header)
    found = auth.lookup_access_key(server, credential.access_key_id)
    if found is None:
        raise SqsError("InvalidClientTokenId", "The security token included in the request is invalid.")
    secret, principal = found
    sigv4.verify(request.method, request.raw_path, None, request.headers, body, secret)
    return principal, credential.region


def _error(is_json: bool, error: SqsError) -> web.Response:
    if is_json:
        from chute.server.sqs.jsonproto import error_response

        return error_response(error)
    from chute.server.sqs import messages as msgs
    from chute.server.sqs.query import CONTENT_TYPE, render_error

    request_id = msgs.request_id()
    return web.Response(body=render_error(error, request_id), status=error.status, content_type=CONTENT_TYPE,
                        headers={"x-amzn-RequestId": request_id})  # fmt: skip
