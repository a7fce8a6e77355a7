"""SQS message move tasks: StartMessageMoveTask, ListMessageMoveTasks, CancelMessageMoveTask.

A task moves the messages of a dead-letter queue either back to the queues they came from (no DestinationArn:
Chute's redrive) or to a given queue (each message received, published there with its attributes, its priority
and its group, then acked), at most `MaxNumberOfMessagesPerSecond` per second if given. Tasks run in the
server's event loop and are kept in memory only (the latest `MAX_TASKS_KEPT`); a restart forgets them (messages
already moved stay moved).

Invariants: at most one running task per source queue; a message is acked in the source only after its copy's
publish is durable (a crash in between may duplicate it, never lose it).
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import time
import uuid
from dataclasses import dataclass, field

from chute.errors import ChuteError
from chute.model import Publish
from chute.server.sqs.common import SqsContext, action, authorize, integer, required_string
from chute.server.sqs.errors import SqsError
from chute.server.sqs.queueattrs import name_of_arn

MAX_TASKS_KEPT = 100
MOVE_BATCH = 10
MOVE_LEASE_S = 60.0


@dataclass
class MoveTask:
    handle: str
    source: str
    source_arn: str
    destination: str | None
    destination_arn: str | None
    rate: int | None
    to_move: int
    started_ms: int
    status: str = "RUNNING"
    moved: int = 0
    failure: str | None = None
    cancelled: bool = False
    runner: asyncio.Task | None = field(default=None, repr=False)

    def as_result(self) -> dict:
        result: dict = {
            "Status": self.status,
            "SourceArn": self.source_arn,
            "ApproximateNumberOfMessagesMoved": self.moved,
            "ApproximateNumberOfMessagesToMove": self.to_move,
            "StartedTimestamp": self.started_ms,
        }
        if self.status == "RUNNING":
            result["TaskHandle"] = self.handle
        if self.destination_arn is not None:
            result["DestinationArn"] = self.destination_arn
        if self.rate is not None:
            result["MaxNumberOfMessagesPerSecond"] = self.rate
        if self.failure is not None:
            result["FailureReason"] = self.failure
        return result


async def _existing(ctx: SqsContext, arn: object, what: str) -> str:
    """The queue an ARN names, wherever it lives (in a cluster, maybe in another shard than the request's)."""
    name = name_of_arn(arn, what)
    try:
        info = ctx.broker.queue_info(name)
        info = await info if inspect.isawaitable(info) else info
    except ChuteError:
        info = None
    if info is None or info.ephemeral:
        raise SqsError("ResourceNotFoundException", f"The resource that you specified for the {what} parameter "
                       "doesn't exist.")  # fmt: skip
    return name


@action
async def start_message_move_task(ctx: SqsContext, params: dict) -> dict:
    source_arn = required_string(params, "SourceArn")
    source = await _existing(ctx, source_arn, "SourceArn")
    destination_arn = params.get("DestinationArn")
    destination = await _existing(ctx, destination_arn, "DestinationArn") if destination_arn is not None else None
    rate = integer(params, "MaxNumberOfMessagesPerSecond", 1, 500)
    authorize(ctx, "consume", source)
    if destination is not None:
        authorize(ctx, "publish", destination)
    if destination == source:
        raise SqsError("InvalidParameterValue", "The destination cannot be the source queue.")
    sources = ctx.broker.dead_letter_sources(source)  # in a cluster: of every shard
    if not (await sources if inspect.isawaitable(sources) else sources):
        raise SqsError("InvalidParameterValue", "Source queue must be configured as a Dead Letter Queue.")
    tasks = ctx.state.move_tasks
    if any(t.source == source and t.status in ("RUNNING", "CANCELLING") for t in tasks):
        raise SqsError("UnsupportedOperation", "There is already a message movement task running for this queue.")
    handle = base64.urlsafe_b64encode(f"{uuid.uuid4()}\n{source_arn}".encode()).decode()
    task = MoveTask(handle, source, source_arn, destination, destination_arn if destination else None, rate,
                    ctx.broker.queue_stats(source).ready, int(time.time() * 1000))  # fmt: skip
    tasks.append(task)
    del tasks[:-MAX_TASKS_KEPT]
    task.runner = asyncio.get_running_loop().create_task(_run(ctx.broker, task))
    return {"TaskHandle": handle}


async def _run(broker, task: MoveTask) -> None:
    try:
        while not task.cancelled:
            started = time.monotonic()
            if task.destination is None:
                moved = await broker.redrive(task.source, task.rate)  # no rate: everything at once
            else:
                moved = await _copy(broker, task, task.rate)
            task.moved += moved
            if not moved or (task.destination is None and task.rate is None):
                break
            if task.rate is not None:
                if moved < task.rate:
                    break
                await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
        task.status = "CANCELLED" if task.cancelled else "COMPLETED"
    except ChuteError as error:
        task.status, task.failure = "FAILED", error.message
    except asyncio.CancelledError:
        task.status = "CANCELLED"
        raise


async def _copy(broker, task: MoveTask, budget: int | None) -> int:
    """Move up to `budget` messages (None: one batch) from the source to the destination queue."""
    moved = 0
    wanted = budget if budget is not None else MOVE_BATCH
    while moved < wanted and not task.cancelled:
        deliveries = await broker.receive(task.source, min(MOVE_BATCH, wanted - moved), lease_s=MOVE_LEASE_S)
        if not deliveries:
            break
        publishes = [Publish(body=d.body, headers=d.headers or None, priority=d.message.priority,
                             group=d.message.group, dedup_id=None) for d in deliveries]  # fmt: skip
        try:
            await broker.publish_batch(task.destination, publishes)
        except BaseException:
            broker.release(task.source, [d.receipt for d in deliveries])
            raise
        await broker.ack(task.source, [d.receipt for d in deliveries])
        moved += len(deliveries)
    return moved


@action
async def list_message_move_tasks(ctx: SqsContext, params: dict) -> dict:
    source_arn = required_string(params, "SourceArn")
    source = await _existing(ctx, source_arn, "SourceArn")
    authorize(ctx, None, source)
    limit = integer(params, "MaxResults", 1, 10, 1)
    tasks = [t for t in reversed(ctx.state.move_tasks) if t.source == source][:limit]
    return {"Results": [t.as_result() for t in tasks]}


@action
async def cancel_message_move_task(ctx: SqsContext, params: dict) -> dict:
    handle = required_string(params, "TaskHandle")
    for task in ctx.state.move_tasks:
        if task.handle == handle and task.status == "RUNNING":
            authorize(ctx, "consume", task.source)
            task.cancelled = True
            task.status = "CANCELLING"
            if task.runner is not None:
                await asyncio.wait({task.runner}, timeout=5.0)
            return {"ApproximateNumberOfMessagesMoved": task.moved}
    raise SqsError("ResourceNotFoundException", "The task handle does not name a running message movement task.")
