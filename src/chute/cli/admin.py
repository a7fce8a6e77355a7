"""`chute queue ...`, `chute topic ...`, `chute subscribe` / `unsubscribe`: managing a broker from the shell.

Invariants:
- Each command is one management call (or one per queue for `queue list`), so it either happened or the command
  exits 1 with the broker's error; nothing is created implicitly (`subscribe` fails when the topic or queue is
  missing).
- Settings not given on the command line are not sent: the broker's defaults apply.
- Tables go to stdout; every cell is plain text (a `[` in a header or body is shown, never read as markup).
  `--json` prints one JSON document instead, for machines.
"""

from __future__ import annotations

import asyncio

import click
import msgspec
from rich.table import Table
from rich.text import Text

from chute.cli.common import (
    connect,
    json_option,
    parse_pairs,
    plural,
    print_json,
    run_command,
    stdout_console,
    timeout_option,
    url_option,
)
from chute.cli.messages import tail_topic
from chute.errors import QueueNotFound, TopicNotFound
from chute.model import Delivery, QueueStats

PREVIEW_CHARS = 60  # of a body in `queue peek`


def _table(*columns: str, numeric: tuple[str, ...] = ()) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in columns:
        table.add_column(column, justify="right" if column in numeric else "left", overflow="fold")
    return table


def _show(table: Table) -> None:
    stdout_console().print(table)


dedup_window_option = click.option(
    "--dedup-window",
    "dedup_window_s",
    type=click.FloatRange(min=0),
    metavar="S",
    help="Seconds a dedup id is remembered.  [default: 300]",
)


def _given(**settings) -> dict:
    return {key: value for key, value in settings.items() if value is not None and value is not False}


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:g} s"


def _preview(body: bytes) -> str:
    text = body.decode("utf-8", "backslashreplace").replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"


# -- queue --------------------------------------------------------------------------------------------------------


@click.group()
def queue() -> None:
    """Create, inspect, purge, redrive and delete queues."""


@queue.command("create")
@url_option
@timeout_option
@click.argument("name")
@click.option(
    "--lease", "lease_s", type=float, metavar="S", help="Default lease of a delivery in seconds.  [default: 30]"
)
@click.option(
    "--max-deliveries",
    type=click.IntRange(min=1),
    metavar="N",
    help="Dead-letter a message after N deliveries without an ack.  [default: unlimited]",
)
@click.option("--dead-letter-queue", metavar="Q", help="Queue that receives dead-lettered messages (must exist).")
@click.option(
    "--delay",
    "delay_s",
    type=click.FloatRange(min=0),
    metavar="S",
    help="Default delay before a message is ready, seconds.",
)
@click.option(
    "--retention",
    "retention_s",
    type=float,
    metavar="S",
    help="Default message TTL, seconds; older messages are dead-lettered (see --on-expiry).",
)
@click.option(
    "--on-expiry",
    type=click.Choice(["dead-letter", "drop"]),
    help="When a message's TTL ends: move it to the dead-letter queue, or drop it (as SQS does).  "
    "[default: dead-letter]",
)
@click.option("--max-length", type=click.IntRange(min=1), metavar="N", help="Most messages the queue holds.")
@click.option("--max-bytes", type=click.IntRange(min=1), metavar="N", help="Most body bytes the queue holds.")
@click.option(
    "--overflow",
    type=click.Choice(["reject", "reject-dead-letter", "drop-oldest"]),
    help="At --max-length/--max-bytes: reject publishes, reject and dead-letter them, or dead-letter the oldest."
    "  [default: reject]",
)
@click.option("--rate-limit", type=float, metavar="R", help="Deliver at most R messages per second.")
@click.option("--rate-burst", type=float, metavar="B", help="Token bucket size of --rate-limit.")
@dedup_window_option
@click.option("--fifo", is_flag=True, help="FIFO groups: one message in flight per group key, in order.")
@run_command
async def queue_create(url, timeout_s, name, **settings) -> None:
    """Create a queue.

    Idempotent with the same settings; with other settings it fails with queue_exists."""
    async with connect(url, timeout_s) as client:
        await client.create_queue(name, **_given(**settings))
    click.echo(f"created queue {name}")


async def _queues_with_stats(client) -> list[tuple[object, QueueStats]]:
    async def stats(name: str) -> QueueStats | None:
        try:
            return await client.queue_stats(name)
        except QueueNotFound:  # deleted since we listed it
            return None

    queues = await client.list_queues()
    all_stats = await asyncio.gather(*(stats(info.name) for info in queues))
    return [(info, s) for info, s in zip(queues, all_stats) if s is not None]


@queue.command("list")
@url_option
@timeout_option
@json_option
@run_command
async def queue_list(url, timeout_s, as_json) -> None:
    """List queues with their depth.

    The first line names the broker and its fsync policy (always: a confirm means fsynced). Columns: ready, in
    flight, delayed, and how many messages each queue dead-lettered."""
    async with connect(url, timeout_s) as client:
        rows = await _queues_with_stats(client)
        welcome, where = client.server_info, f"{client.host}:{client.port}"  # not the URL: it may hold a password
    if as_json:
        print_json([{"name": info.name, "settings": info.settings, "stats": s} for info, s in rows])
        return
    fsync = welcome.fsync or "unknown (the broker does not say)"
    stdout_console().print(Text(f"{welcome.server} at {where}, fsync {fsync}"))
    numeric = ("ready", "in flight", "delayed", "dead-lettered")
    table = _table("name", *numeric, numeric=numeric)
    for info, s in sorted(rows, key=lambda row: row[0].name):
        table.add_row(Text(info.name), str(s.ready), str(s.in_flight), str(s.delayed), str(s.dead_lettered))
    _show(table)


@queue.command("stats")
@url_option
@timeout_option
@json_option
@click.argument("name")
@run_command
async def queue_stats(url, timeout_s, as_json, name) -> None:
    """Show every statistic of a queue.

    Depth, bytes, age of the oldest message, and counters since the broker started."""
    async with connect(url, timeout_s) as client:
        stats = await client.queue_stats(name)
    if as_json:
        print_json(stats)
        return
    table = _table("field", "value", numeric=("value",))
    for field, value in msgspec.structs.asdict(stats).items():
        table.add_row(field, Text(_stat(value)))
    _show(table)


def _stat(value) -> str:
    if value is None:  # received_age_s: no consumer has asked since the broker started
        return "never"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _delivery_record(delivery: Delivery) -> dict:
    message = delivery.message
    return {
        "id": message.id,
        "body": message.body.decode("utf-8", "backslashreplace"),
        "headers": message.headers,
        "delivery_count": delivery.delivery_count,
        "priority": message.priority,
        "subject": message.subject,
        "dead_letter_reason": delivery.dead_letter_reason,
        "dead_letter_source": delivery.dead_letter_source,
    }


@queue.command("peek")
@url_option
@timeout_option
@json_option
@click.argument("name")
@click.option(
    "--count",
    "-n",
    type=click.IntRange(1, 10_000),
    default=10,
    show_default=True,
    metavar="N",
    help="How many messages to show.",
)
@run_command
async def queue_peek(url, timeout_s, as_json, name, count) -> None:
    """Show the next messages of a queue.

    In delivery order (delayed ones last), without leasing them: nothing changes."""
    async with connect(url, timeout_s) as client:
        deliveries = await client.peek(name, count)
    if as_json:
        print_json([_delivery_record(d) for d in deliveries])
        return
    with_reason = any(d.dead_letter_reason for d in deliveries)
    columns = ("id", "deliveries", "headers", "body") + (("dead-letter reason",) if with_reason else ())
    table = _table(*columns, numeric=("id", "deliveries"))
    for d in deliveries:
        headers = " ".join(f"{k}={v}" for k, v in sorted(d.headers.items()))
        reason = (Text(f"{d.dead_letter_reason} from {d.dead_letter_source}"),) if with_reason else ()
        table.add_row(str(d.id), str(d.delivery_count), Text(headers), Text(_preview(d.body)), *reason)
    _show(table)


@queue.command("purge")
@url_option
@timeout_option
@click.argument("name")
@run_command
async def queue_purge(url, timeout_s, name) -> None:
    """Remove the messages of a queue.

    Every message not in flight goes; prints how many."""
    async with connect(url, timeout_s) as client:
        removed = await client.purge_queue(name)
    click.echo(f"purged {plural(removed, 'message')} from {name}")


@queue.command("redrive")
@url_option
@timeout_option
@click.argument("name")
@click.option(
    "--max",
    "max_messages",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Move at most N messages.  [default: all]",
)
@run_command
async def queue_redrive(url, timeout_s, name, max_messages) -> None:
    """Move dead-lettered messages back.

    NAME is a dead-letter queue; its messages go back to the queues they were dead-lettered from. Prints how
    many moved."""
    async with connect(url, timeout_s) as client:
        moved = await client.redrive(name, max_messages)
    click.echo(f"moved {plural(moved, 'message')} back from {name}")


@queue.command("delete")
@url_option
@timeout_option
@click.argument("name")
@click.option("--missing-ok", is_flag=True, help="Succeed (exit 0) when there is no such queue.")
@run_command
async def queue_delete(url, timeout_s, name, missing_ok) -> None:
    """Delete a queue.

    Its messages and the subscriptions that feed it go with it."""
    async with connect(url, timeout_s) as client:
        try:
            await client.delete_queue(name)
        except QueueNotFound:
            if not missing_ok:
                raise
            click.echo(f"no queue {name}: nothing deleted")
            return
    click.echo(f"deleted queue {name}")


# -- topic --------------------------------------------------------------------------------------------------------


@click.group()
def topic() -> None:
    """Create, list and delete topics."""


@topic.command("create")
@url_option
@timeout_option
@click.argument("name")
@click.option(
    "--retention",
    "retention_s",
    type=float,
    metavar="S",
    help="Keep published messages S seconds, for subscriptions that start in the past.",
)
@click.option("--retention-bytes", type=click.IntRange(min=1), metavar="N", help="Keep at most N bytes of messages.")
@dedup_window_option
@run_command
async def topic_create(url, timeout_s, name, **settings) -> None:
    """Create a topic.

    Idempotent with the same settings; with other settings it fails with topic_exists."""
    async with connect(url, timeout_s) as client:
        await client.create_topic(name, **_given(**settings))
    click.echo(f"created topic {name}")


def _subscription_line(sub) -> str:
    line = f"{sub.pattern} -> {sub.queue}"
    return line + (f" {msgspec.json.encode(sub.filter).decode()}" if sub.filter else "")


@topic.command("list")
@url_option
@timeout_option
@json_option
@run_command
async def topic_list(url, timeout_s, as_json) -> None:
    """List topics with their subscriptions.

    Each subscription shows as `pattern -> queue` and its header filter, if any."""
    async with connect(url, timeout_s) as client:
        topics = await client.list_topics()
    if as_json:
        print_json(topics)
        return
    table = _table("name", "retention", "subscriptions")
    for info in sorted(topics, key=lambda t: t.name):
        settings = info.settings
        retention = _seconds(settings.retention_s)
        if settings.retention_bytes is not None:
            retention += f", {settings.retention_bytes} bytes"
        table.add_row(Text(info.name), retention, Text("\n".join(map(_subscription_line, info.subscriptions)) or "-"))
    _show(table)


@topic.command("delete")
@url_option
@timeout_option
@click.argument("name")
@click.option("--missing-ok", is_flag=True, help="Succeed (exit 0) when there is no such topic.")
@run_command
async def topic_delete(url, timeout_s, name, missing_ok) -> None:
    """Delete a topic.

    Its subscriptions go with it; their queues stay."""
    async with connect(url, timeout_s) as client:
        try:
            await client.delete_topic(name)
        except TopicNotFound:
            if not missing_ok:
                raise
            click.echo(f"no topic {name}: nothing deleted")
            return
    click.echo(f"deleted topic {name}")


# -- subscriptions ------------------------------------------------------------------------------------------------


@click.command()
@url_option
@timeout_option
@click.argument("topic_name", metavar="TOPIC")
@click.argument("pattern")
@click.argument("queue_name", metavar="QUEUE", required=False)
@click.option(
    "--filter",
    "filter_",
    multiple=True,
    callback=parse_pairs,
    metavar="HEADER=VALUE",
    help="Take only messages with this header value (repeatable: all must match).",
)
@click.option(
    "--start",
    type=click.Choice(["now", "earliest"]),
    default="now",
    show_default=True,
    help="earliest: also route the messages the topic retains.",
)
@click.option(
    "--ephemeral",
    is_flag=True,
    help="No QUEUE: print the matching messages published while the command runs, until Ctrl-C (as `chute tail`).",
)
@run_command
async def subscribe(url, timeout_s, topic_name, pattern, queue_name, filter_, start, ephemeral) -> None:
    """Route messages of a topic to a queue.

    Messages of TOPIC whose subject matches PATTERN go to QUEUE; both must exist. With --ephemeral (and no
    QUEUE) the subscription lasts as long as the command, which prints the messages.

    PATTERN: dot-separated words; `*` matches one word, a final `>` one or more."""
    context = click.get_current_context()
    if ephemeral:
        if queue_name is not None:
            raise click.UsageError("--ephemeral takes no QUEUE (the subscription's queue is private)", context)
        if start != "now":
            raise click.UsageError("--ephemeral only takes --start now (it keeps nothing from before)", context)
        await tail_topic(url, topic_name, pattern, filter_, None, 100, False)
        return
    if queue_name is None:
        raise click.UsageError("missing argument QUEUE (or --ephemeral)", context)
    async with connect(url, timeout_s) as client:
        await client.subscribe(topic_name, pattern, queue_name, filter=filter_, start=start)
    click.echo(f"subscribed {queue_name} to {topic_name} {pattern}")


@click.command()
@url_option
@timeout_option
@click.argument("topic_name", metavar="TOPIC")
@click.argument("pattern")
@click.argument("queue_name", metavar="QUEUE")
@run_command
async def unsubscribe(url, timeout_s, topic_name, pattern, queue_name) -> None:
    """Stop routing messages of a topic to a queue.

    Removes the subscription of QUEUE to PATTERN on TOPIC."""
    async with connect(url, timeout_s) as client:
        await client.unsubscribe(topic_name, pattern, queue_name)
    click.echo(f"unsubscribed {queue_name} from {topic_name} {pattern}")
