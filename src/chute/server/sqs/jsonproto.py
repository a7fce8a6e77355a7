"""The SQS JSON protocol (AWS JSON 1.0), as current botocore speaks it.

    POST /   X-Amz-Target: AmazonSQS.SendMessage   Content-Type: application/x-amz-json-1.0
             {"QueueUrl": "...", "MessageBody": "hi"}
    200      {"MessageId": "...", "MD5OfMessageBody": "..."}
    4xx/5xx  {"__type": "com.amazonaws.sqs#QueueDoesNotExist", "message": "..."}
             x-amzn-query-error: AWS.SimpleQueueService.NonExistentQueue;Sender

This module only decodes and encodes: params and results already have the JSON shape (actions.py).

Invariant: every request gets exactly one JSON document; an error other than `SqsError` becomes `InternalError`
(500) and is logged; errors carry both the JSON `__type` and the legacy code in `x-amzn-query-error`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import msgspec
from aiohttp import web

from chute.errors import ChuteError
from chute.server.sqs import actions
from chute.server.sqs import messages as msgs
from chute.server.sqs.errors import JSON_TYPE_PREFIX, SqsError, from_chute

if TYPE_CHECKING:
    from chute.server.sqs.common import SqsContext

log = logging.getLogger("chute.server.sqs")

CONTENT_TYPE = "application/x-amz-json-1.0"
TARGET_PREFIX = "AmazonSQS."

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


async def handle_json(ctx: SqsContext, target: str, body: bytes) -> web.Response:
    """Run the action named by an `X-Amz-Target` header value with the JSON body; answer in JSON."""
    request_id = msgs.request_id()
    try:
        if not target.startswith(TARGET_PREFIX):
            raise SqsError("InvalidAction", f"The target {target!r} is not an Amazon SQS action.")
        try:
            params = _decoder.decode(body) if body.strip() else {}
        except msgspec.DecodeError as exc:
            raise SqsError("SerializationException", f"The request body is not valid JSON: {exc}") from None
        result = await actions.call(ctx, target[len(TARGET_PREFIX) :], params)
        return web.Response(body=_encoder.encode(result), content_type=CONTENT_TYPE,
                            headers={"x-amzn-RequestId": request_id})  # fmt: skip
    except Exception as exc:  # every failure becomes one error document
        return error_response(as_sqs_error(exc), request_id)


def as_sqs_error(exc: Exception) -> SqsError:
    if isinstance(exc, SqsError):
        return exc
    if isinstance(exc, ChuteError):
        return from_chute(exc)
    log.exception("SQS request failed")
    return SqsError("InternalError", "We encountered an internal error. Please try again.")


def error_response(error: SqsError, request_id: str | None = None) -> web.Response:
    body = {"__type": JSON_TYPE_PREFIX + error.code, "message": error.message}
    headers = {"x-amzn-query-error": f"{error.query_code};{error.fault}",
               "x-amzn-RequestId": request_id or msgs.request_id()}  # fmt: skip
    return web.Response(body=_encoder.encode(body), status=error.status, content_type=CONTENT_TYPE, headers=headers)
