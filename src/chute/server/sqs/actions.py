"""The SQS actions, protocol-neutral: JSON-protocol-shaped params in, a JSON-protocol-shaped result out.

    ctx = SqsContext(server, principal, base_url="http://127.0.0.1:6161")
    result = await call(ctx, "SendMessage", {"QueueUrl": ..., "MessageBody": "hi"})

Params and results have exactly the shape botocore's JSON serializer sends and its parser expects (e.g.
`{"QueueUrl": ..., "Attributes": {"VisibilityTimeout": "30"}, "MessageAttributes": {"a": {"DataType": "String",
"StringValue": "x"}}, "Entries": [...]}`; blobs are base64 strings). The JSON protocol (jsonproto.py) only
decodes and encodes; the query protocol (query.py) converts forms to this shape and renders results as XML.

This module holds the queue actions (create, list, attributes, tags, purge, delete); the message actions are in
messaging.py and the message move tasks in movetasks.py. All register in `ACTIONS`.

Invariant: a handler either returns a result dict or raises `SqsError` (a Chute error from the broker is
translated by `call`); it authorizes before it changes anything.
"""

from __future__ import annotations

import base64
import inspect
import json
import re
import time

from chute.errors import ChuteError, QueueExists
from chute.model import QueueSettings
from chute.server.sqs import queueattrs
from chute.server.sqs.common import (
    ACTIONS,
    DEFAULT_ACCOUNT_ID,
    DEFAULT_REGION,
    PurgeMark,
    SqsContext,
    action,
    authorize,
    integer,
    queue_of,
    required_string,
    string_list,
    string_map,
)
from chute.server.sqs.errors import SqsError, from_chute

__all__ = ["ACTIONS", "DEFAULT_ACCOUNT_ID", "DEFAULT_REGION", "SqsContext", "call"]

_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,80}$")
_FIFO_SUFFIX = ".fifo"
MAX_TAGS = 50


async def call(ctx: SqsContext, name: str, params: dict) -> dict:
    """Run action `name` with `params`; raise SqsError (InvalidAction for an unknown action)."""
    handler = ACTIONS.get(name)
    if handler is None:
        raise SqsError("InvalidAction", f"The action {name} is not valid for this endpoint.")
    if not isinstance(params, dict):
        raise SqsError("InvalidParameterValue", "The request body must be a JSON object.")
    try:
        return await handler(ctx, params)
    except ChuteError as error:
        raise from_chute(error) from None


def _now_s() -> str:
    return str(int(time.time()))


def _check_queue_name(name: str) -> bool:
    """Valid as an SQS queue name; return whether it names a FIFO queue."""
    fifo = name.endswith(_FIFO_SUFFIX)
    stem = name[: -len(_FIFO_SUFFIX)] if fifo else name
    if not _QUEUE_NAME.match(stem) or len(name) > 80:
        raise SqsError("InvalidParameterValue", "Can only include alphanumeric characters, hyphens, or underscores. "
                       "1 to 80 in length (a FIFO queue's name ends in .fifo).")  # fmt: skip
    return fifo


def _check_tags(tags: dict[str, str]) -> None:
    if len(tags) > MAX_TAGS:
        raise SqsError("InvalidParameterValue", f"Too many tags: a queue has at most {MAX_TAGS}.")
    for key, value in tags.items():
        if not 1 <= len(key) <= 128 or len(value) > 256:
            raise SqsError("InvalidParameterValue", f"Tag {key!r}: keys have 1-128 characters, values at most 256.")


# -- queues -----------------------------------------------------------------------------------------------------


@action
async def create_queue(ctx: SqsContext, params: dict) -> dict:
    name = required_string(params, "QueueName")
    fifo = _check_queue_name(name)
    attributes = string_map(params, "Attributes")
    if fifo and attributes.get("FifoQueue", "").lower() != "true":
        raise SqsError("InvalidParameterValue", "The name of a FIFO queue must end with .fifo and the queue must be "
                       "created with the attribute FifoQueue set to true.")  # fmt: skip
    tags = string_map(params, "tags") or string_map(params, "Tags")
    _check_tags(tags)
    authorize(ctx, "manage", name)
    for _ in range(3):  # a concurrent CreateQueue of the same name: compare with what it made
        existing = ctx.broker.core.queues.get(name)
        if existing is not None and not existing.ephemeral:
            real = (await _awaited(ctx.broker.queue_info(name))).settings  # a cluster's: the real dead-letter queue
            await _check_same_attributes(ctx, name, real, attributes)
            return {"QueueUrl": ctx.queue_url(name)}
        changes, kept = queueattrs.parse(ctx.broker, attributes, queue_name=name, fifo=fifo, creating=True,
                                         region=ctx.region, account_id=ctx.account_id,
                                         found=await _dead_letter_target(ctx, attributes))  # fmt: skip
        now = _now_s()
        kept = {k: v for k, v in kept.items() if v} | {"CreatedTimestamp": now, "LastModifiedTimestamp": now}
        # on_expiry: SQS deletes a message whose retention period ends; it never dead-letters it
        values = {"lease_s": 30.0, "retention_s": float(queueattrs.DEFAULT_RETENTION_S), "fifo": fifo,
                  "on_expiry": "drop"} | changes  # fmt: skip
        settings = QueueSettings(**values, attributes=kept, tags=tags or None)
        if name in ctx.broker.core.topics:
            raise SqsError("QueueNameExists", f"{name} is a Chute topic: queues and topics share names.")
        try:
            await ctx.broker.create_queue(name, settings)
        except QueueExists:  # made meanwhile by another request: compare with it
            continue
        return {"QueueUrl": ctx.queue_url(name)}
    raise SqsError("QueueNameExists", "A queue already exists with the same name and different attributes.")


async def _awaited(value):
    return await value if inspect.isawaitable(value) else value


async def _dead_letter_target(ctx: SqsContext, attributes) -> dict:
    """The queue a RedrivePolicy names, looked up wherever it lives (in a cluster, maybe in another shard), for
    `queueattrs.parse` to check; {} if there is none to look up (parse then says what is wrong)."""
    try:
        arn = json.loads(attributes.get("RedrivePolicy") or "").get("deadLetterTargetArn")
    except (AttributeError, TypeError, ValueError):
        return {}
    name = arn.rpartition(":")[2] if isinstance(arn, str) else ""
    if not name:
        return {}
    try:
        return {name: await _awaited(ctx.broker.queue_info(name))}
    except ChuteError:
        return {}


async def _check_same_attributes(ctx: SqsContext, name: str, settings: QueueSettings,
                                 attributes: dict[str, str]) -> None:  # fmt: skip
    """CreateQueue of an existing queue succeeds only if every given attribute has the queue's value."""
    if not attributes:
        return
    fifo = settings.fifo
    if attributes.get("FifoQueue", "false" if not fifo else "true").lower() != ("true" if fifo else "false"):
        raise SqsError("QueueNameExists", "A queue already exists with the same name and a different value for "
                       "attribute FifoQueue.")  # fmt: skip
    given = {k: v for k, v in attributes.items() if k != "FifoQueue"}
    changes, kept = queueattrs.parse(ctx.broker, given, queue_name=name, fifo=fifo, creating=True,
                                     region=ctx.region, account_id=ctx.account_id,
                                     found=await _dead_letter_target(ctx, given))  # fmt: skip
    current = settings.attributes or {}
    shown = queueattrs.render(ctx.broker, name, settings, list(kept), region=ctx.region, account_id=ctx.account_id)
    for key, value in changes.items():
        if getattr(settings, key) != value:
            differing = {"lease_s": "VisibilityTimeout", "delay_s": "DelaySeconds",
                         "retention_s": "MessageRetentionPeriod"}.get(key, "RedrivePolicy")  # fmt: skip
            raise SqsError("QueueNameExists", "A queue already exists with the same name and a different value for "
                           f"attribute {differing}.")  # fmt: skip
    for key, value in kept.items():
        if current.get(key, shown.get(key, "")) != value:
            raise SqsError("QueueNameExists", "A queue already exists with the same name and a different value for "
                           f"attribute {key}.")  # fmt: skip


@action
async def get_queue_url(ctx: SqsContext, params: dict) -> dict:
    name = required_string(params, "QueueName")
    queue = ctx.broker.core.queues.get(name)
    if queue is None or queue.ephemeral:
        raise SqsError("QueueDoesNotExist", "The specified queue does not exist.")
    authorize(ctx, None, name)
    return {"QueueUrl": ctx.queue_url(name)}


def _page_token(last: str) -> str:
    return base64.urlsafe_b64encode(last.encode()).decode()


def _after_token(token: object) -> str:
    if not isinstance(token, str):
        raise SqsError("InvalidParameterValue", "Invalid NextToken.")
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except ValueError:
        raise SqsError("InvalidParameterValue", "Invalid NextToken value.") from None


def _paginate(names: list[str], params: dict) -> tuple[list[str], str | None]:
    """A page of sorted `names` for NextToken / MaxResults (without MaxResults: the first 1000, no token)."""
    limit = integer(params, "MaxResults", 1, 1000)
    token = params.get("NextToken")
    if token is not None:
        if limit is None:
            raise SqsError("InvalidParameterValue", "MaxResults is required with NextToken.")
        after = _after_token(token)
        names = [n for n in names if n > after]
    if limit is None:
        return names[:1000], None
    page = names[:limit]
    return page, _page_token(page[-1]) if len(names) > limit else None


@action
async def list_queues(ctx: SqsContext, params: dict) -> dict:
    prefix = params.get("QueueNamePrefix") or ""
    if not isinstance(prefix, str):
        raise SqsError("InvalidParameterValue", "QueueNamePrefix must be a string.")
    listed = ctx.broker.list_queues()
    listed = await listed if inspect.isawaitable(listed) else listed  # a cluster's router asks other nodes
    names = [q.name for q in listed if q.name.startswith(prefix)]
    names = [n for n in names if ctx.principal.can_see("queue", n)]
    page, token = _paginate(names, params)
    result: dict = {"QueueUrls": [ctx.queue_url(n) for n in page]}
    if token is not None:
        result["NextToken"] = token
    return result


@action
async def delete_queue(ctx: SqsContext, params: dict) -> dict:
    queue = queue_of(ctx, params, "manage")
    sources = await _awaited(ctx.broker.dead_letter_sources(queue.name))  # in a cluster: of every shard
    if sources:
        raise SqsError("InvalidParameterValue", f"Queue {queue.name} is the dead-letter queue of "
                       f"{', '.join(sources)}; change their RedrivePolicy first.")  # fmt: skip
    await ctx.broker.delete_queue(queue.name)
    return {}


@action
async def purge_queue(ctx: SqsContext, params: dict) -> dict:
    """Every message goes: visible, delayed and in flight (none comes back when its lease ends); a second purge
    of the queue within `purge_interval_s` (60 s) is refused with PurgeQueueInProgress."""
    queue = queue_of(ctx, params, "manage")
    state, core = ctx.state, ctx.broker.core
    for name in [n for n, m in state.purges.items() if core.queues_by_id.get(m.queue_id) is None]:
        del state.purges[name]  # its queue is gone
    now = state.clock()
    last = state.purges.get(queue.name)
    if last is not None and last.queue_id == queue.id and now - last.at < state.purge_interval_s:
        raise SqsError("PurgeQueueInProgress", f"Only one PurgeQueue operation on {queue.name} is allowed every "
                       f"{state.purge_interval_s:g} seconds.")  # fmt: skip
    state.purges[queue.name] = PurgeMark(queue.id, now, core.next_receipt)
    try:
        await ctx.broker.purge_queue(queue.name, in_flight=True)
    except BaseException:
        if last is None:  # a purge that failed does not count
            state.purges.pop(queue.name, None)
        else:
            state.purges[queue.name] = last
        raise
    return {}


@action
async def get_queue_attributes(ctx: SqsContext, params: dict) -> dict:
    queue = queue_of(ctx, params, None)
    wanted = string_list(params, "AttributeNames")
    if not wanted:
        return {}
    settings = (await _awaited(ctx.broker.queue_info(queue.name))).settings  # a cluster's: the real dead-letter queue
    values = queueattrs.render(ctx.broker, queue.name, settings, wanted, region=ctx.region,
                               account_id=ctx.account_id)  # fmt: skip
    return {"Attributes": values} if values else {}


@action
async def set_queue_attributes(ctx: SqsContext, params: dict) -> dict:
    queue = queue_of(ctx, params, "manage")
    attributes = string_map(params, "Attributes")
    if "Attributes" not in params:
        raise SqsError("MissingParameter", "The request must contain the parameter Attributes.")
    changes, kept = queueattrs.parse(ctx.broker, attributes, queue_name=queue.name, fifo=queue.settings.fifo,
                                     creating=False, region=ctx.region, account_id=ctx.account_id,
                                     found=await _dead_letter_target(ctx, attributes))  # fmt: skip
    merged = dict(queue.settings.attributes or {}) | kept | {"LastModifiedTimestamp": _now_s()}
    merged = {k: v for k, v in merged.items() if v}  # an empty value (e.g. RedriveAllowPolicy "") removes it
    await ctx.broker.update_queue(queue.name, **changes, attributes=merged)
    return {}


# -- tags -------------------------------------------------------------------------------------------------------


@action
async def tag_queue(ctx: SqsContext, params: dict) -> dict:
    queue = queue_of(ctx, params, "manage")
    if "Tags" not in params:
        raise SqsError("MissingParameter", "The request must contain the parameter Tags.")
    tags = dict(queue.settings.tags or {}) | string_map(params, "Tags")
    _check_tags(tags)
    await ctx.broker.update_queue(queue.name, tags=tags or None)
    return {}


@action
async def untag_queue(ctx: SqsContext, params: dict) -> dict:
    queue = queue_of(ctx, params, "manage")
    if "TagKeys" not in params:
        raise SqsError("MissingParameter", "The request must contain the parameter TagKeys.")
    removed = set(string_list(params, "TagKeys"))
    tags = {k: v for k, v in (queue.settings.tags or {}).items() if k not in removed}
    await ctx.broker.update_queue(queue.name, tags=tags or None)
    return {}


@action
async def list_queue_tags(ctx: SqsContext, params: dict) -> dict:
    queue = queue_of(ctx, params, None)
    tags = queue.settings.tags or {}
    return {"Tags": dict(tags)} if tags else {}


@action
async def list_dead_letter_source_queues(ctx: SqsContext, params: dict) -> dict:
    queue = queue_of(ctx, params, None)
    sources = await _awaited(ctx.broker.dead_letter_sources(queue.name))  # in a cluster: of every shard
    names = sorted(name for name in sources if ctx.principal.can_see("queue", name))
    page, token = _paginate(names, params)
    result: dict = {"queueUrls": [ctx.queue_url(n) for n in page]}
    if token is not None:
        result["NextToken"] = token
    return result


# the message actions and the move tasks register themselves on import
from chute.server.sqs import messaging, movetasks  # noqa: E402,F401
