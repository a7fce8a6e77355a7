"""`chute publish`, `chute consume` and `chute tail`: messages in and out of a broker from the shell.

    seq 100000 | chute publish jobs          # one message per line, batched by the client
    chute consume jobs --count 10            # one body per line; acked once printed
    chute tail orders 'orders.*.eu'          # live messages of a topic until Ctrl-C (an ephemeral subscription)

Invariants:
- `publish` exits 0 only when every message was confirmed durable; on the first failure it stops reading, waits
  for what was already sent and says how many were confirmed. At most PUBLISH_WINDOW messages are unconfirmed at
  a time, so a fast producer on stdin cannot make us buffer without bound. stdout carries only ids (`--ids`).
- `consume` acks a message only after its line was written and flushed, and exits 0 only once every ack is
  confirmed; a message it did not print (still buffered, or its write failed) goes back to the queue.
- `tail` (and `chute subscribe --ephemeral`) subscribes for as long as it runs: the subscription is made before
  the line `listening ...` on stderr and is gone when the command ends, Ctrl-C (exit 0) and errors included.
- `consume` leases only what it may print: with --count it long-polls for at most the messages still wanted
  (`receive`); without, it streams with a push consumer (`consume`) and stops only when that is idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections import deque
from collections.abc import AsyncIterator, Iterable

import click
import msgspec
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from chute.cli.common import (
    CommandFailed,
    connect,
    describe,
    parse_pairs,
    plural,
    run_command,
    stderr_console,
    timeout_option,
    url_option,
)
from chute.client import AsyncClient, AsyncConsumer
from chute.errors import ChuteError
from chute.model import MAX_PRIORITY, Delivery

PUBLISH_WINDOW = 50_000  # unconfirmed publishes at most (memory bound: ~50k bodies)
READ_CHUNK = 1 << 16  # bytes read from stdin at a time
PROGRESS_AFTER = 5_000  # show a progress line (TTY stderr only) once this many messages went
ACK_LINGER_S = 0.005  # before waiting for more messages, how long to wait for ones already on the way
MAX_POLL_S = 60.0  # one long poll; repeated while waiting without an idle limit
DEFAULT_IDLE_S = 5.0


# -- publish ------------------------------------------------------------------------------------------------------


async def _args_bodies(bodies: Iterable[str]) -> AsyncIterator[bytes]:
    for body in bodies:
        yield os.fsencode(body)  # the argument's bytes as given, even when not valid UTF-8


async def _stdin_bodies() -> AsyncIterator[bytes]:
    """Each line of stdin, without its trailing newline; read in a thread so batches go out meanwhile."""
    stream = sys.stdin.buffer
    rest = b""
    while chunk := await asyncio.to_thread(stream.read1, READ_CHUNK):
        *lines, rest = (rest + chunk).split(b"\n")
        for line in lines:
            yield line
    if rest:
        yield rest


class _Progress:
    """A transient progress line on stderr, only when stderr is a terminal and the input is long."""

    def __init__(self, dest: str, enabled: bool) -> None:
        self.dest = dest
        self.enabled = enabled
        self.bar: Progress | None = None
        self.task = None

    def update(self, confirmed: int) -> None:
        if not self.enabled or confirmed < PROGRESS_AFTER:
            return
        if self.bar is None:
            self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                console=stderr_console(), transient=True)  # fmt: skip
            self.bar.start()
            self.task = self.bar.add_task("")
        self.bar.update(self.task, description=f"{confirmed} messages published to {self.dest}")

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


async def _publish_all(client: AsyncClient, dest: str, bodies: AsyncIterator[bytes], options: dict,
                       print_ids: bool, progress: _Progress) -> tuple[int, int, BaseException | None]:  # fmt: skip
    """Publish every body; return (sent, confirmed, first error). Stops taking bodies after an error."""
    pending: deque[asyncio.Future[int]] = deque()
    sent = confirmed = 0
    error: BaseException | None = None

    async def settle_oldest() -> None:
        nonlocal confirmed, error
        try:
            message_id = await pending.popleft()
        except Exception as exc:
            error = error or exc
        else:
            confirmed += 1
            if print_ids:
                sys.stdout.write(f"{message_id}\n")
            progress.update(confirmed)

    async with contextlib.aclosing(bodies):
        async for body in bodies:
            pending.append(client.publish_nowait(dest, body, **options))
            sent += 1
            while pending and (pending[0].done() or len(pending) >= PUBLISH_WINDOW):
                await settle_oldest()
            if error is not None:
                break
    while pending:
        await settle_oldest()
    return sent, confirmed, error


@click.command()
@url_option
@timeout_option
@click.argument("dest")
@click.argument("bodies", nargs=-1, metavar="[BODY]...")
@click.option(
    "--header",
    "-H",
    "headers",
    multiple=True,
    callback=parse_pairs,
    metavar="NAME=VALUE",
    help="A header on every message (repeatable).",
)
@click.option(
    "--priority",
    type=click.IntRange(0, MAX_PRIORITY),
    default=0,
    show_default=True,
    help=f"Priority 0-{MAX_PRIORITY}; higher is delivered first.",
)
@click.option(
    "--delay",
    "delay_s",
    type=click.FloatRange(min=0),
    default=None,
    metavar="S",
    help="Seconds before the messages become ready.  [default: the queue's]",
)
@click.option(
    "--ttl",
    "ttl_s",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="S",
    help="Seconds after which an undelivered message expires.  [default: the queue's retention]",
)
@click.option("--group", default=None, help="FIFO group key (on a --fifo queue: one in flight per group, in order).")
@click.option(
    "--dedup-id",
    default=None,
    help="Deduplication id: a repeat within the dedup window is confirmed but not stored again "
    "(with several messages, only the first is stored).",
)
@click.option("--subject", default=None, help="Subject the message is routed by on a topic.  [default: the topic]")
@click.option("--ids", "print_ids", is_flag=True, help="Print the id of each message on stdout, one per line.")
@run_command
async def publish(url, timeout_s, dest, bodies, print_ids, **options) -> None:
    """Publish messages to a queue or a topic.

    DEST is a queue or a topic. One message per BODY argument, or, with no BODY, one per line of stdin (its
    trailing newline removed).

    Exits 0 only once every message is confirmed durable; otherwise exits 1 saying how many were."""
    source = _args_bodies(bodies) if bodies else _stdin_bodies()
    progress = _Progress(dest, enabled=not bodies and sys.stderr.isatty())
    try:
        async with connect(url, timeout_s) as client:
            sent, confirmed, error = await _publish_all(client, dest, source, options, print_ids, progress)
    finally:
        progress.stop()
        sys.stdout.flush()
    if error is not None:
        raise CommandFailed(f"{describe(error)}; confirmed {confirmed} of {plural(sent, 'message')} sent")
    click.echo(f"published {plural(confirmed, 'message')} to {dest}", err=True)


# -- consume ------------------------------------------------------------------------------------------------------


class _NoAcks:
    pending = False

    def flush(self) -> None:
        pass


_NO_ACKS = _NoAcks()


class _Acker:
    """Acks printed deliveries in batches in the background; `finish` waits until every ack is confirmed."""

    def __init__(self, client: AsyncClient, batch_size: int) -> None:
        self.client = client
        self.batch_size = batch_size
        self.unsent: list[Delivery] = []
        self.tasks: set[asyncio.Task] = set()
        self.error: BaseException | None = None

    @property
    def pending(self) -> bool:
        return bool(self.unsent)

    def add(self, delivery: Delivery) -> None:
        if self.error is not None:
            raise self.error
        self.unsent.append(delivery)
        if len(self.unsent) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if self.unsent:
            task = asyncio.get_running_loop().create_task(self.client.ack(self.unsent))
            self.unsent = []
            self.tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self.error is None:
            self.error = task.exception()

    async def finish(self) -> None:
        self.flush()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.error is not None:
            raise self.error


def _line(delivery: Delivery, as_json: bool) -> bytes:
    text = delivery.body.decode("utf-8", "backslashreplace")
    if not as_json:
        return text.encode("utf-8") + b"\n"
    message = delivery.message
    record = {"id": message.id, "body": text, "headers": message.headers, "delivery_count": delivery.delivery_count,
              "priority": message.priority, "subject": message.subject}  # fmt: skip
    return msgspec.json.encode(record) + b"\n"


class _Push:
    """Without --count: a push consumer with prefetch. It stops only after an idle wait, when nothing is buffered,
    so closing it gives back nothing it had prefetched."""

    def __init__(self, consumer: AsyncConsumer) -> None:
        self.consumer = consumer

    async def next(self, acker: _Acker, idle_s: float | None) -> Delivery | None:
        delivery = await self.consumer.get(ACK_LINGER_S) if acker.pending else None
        if delivery is None:
            acker.flush()  # before waiting: nothing printed stays unacked while we idle
            delivery = await self.consumer.get(idle_s)
        if delivery is None and self.consumer.error is not None:
            raise self.consumer.error
        return delivery

    async def close(self) -> None:
        await self.consumer.close()


class _Pull:
    """With --count: long-polled receives of at most the messages still wanted. A push consumer stopping at N
    would give back what it had prefetched beyond N with its delivery count raised (and at max_deliveries,
    dead-lettered unseen); this leases nothing it will not print."""

    def __init__(self, client: AsyncClient, queue: str, count: int, batch: int, lease_s: float | None) -> None:
        self.client, self.queue, self.lease_s = client, queue, lease_s
        self.count, self.batch_size = count, batch
        self.leased = 0
        self.batch: deque[Delivery] = deque()

    async def next(self, acker: _Acker, idle_s: float | None) -> Delivery | None:
        if not self.batch:
            acker.flush()  # its acks travel while we wait for the next batch
            self.batch.extend(await self._receive(idle_s))
        return self.batch.popleft() if self.batch else None

    async def _receive(self, idle_s: float | None) -> list[Delivery]:
        loop = asyncio.get_running_loop()
        deadline = None if idle_s is None else loop.time() + idle_s
        want = min(self.batch_size, self.count - self.leased)
        while True:
            wait_s = MAX_POLL_S if deadline is None else max(0.0, min(MAX_POLL_S, deadline - loop.time()))
            got = await self.client.receive(self.queue, want, wait_s=wait_s, lease_s=self.lease_s)
            if got or (deadline is not None and loop.time() >= deadline):
                self.leased += len(got)
                return got

    async def close(self) -> None:
        if self.batch:  # leased, not printed (stdout closed): back to the queue now, not at lease end
            with contextlib.suppress(ChuteError):
                await self.client.nack(list(self.batch))


async def _print_all(source: _Push | _Pull, acker: _Acker | None, held: list[Delivery], count: int | None,
                     idle_s: float | None, as_json: bool) -> int:  # fmt: skip
    """Print deliveries until `count` or idle; hand each printed one to `acker` (to `held` with --no-ack)."""
    printed = 0
    while count is None or printed < count:
        delivery = await source.next(acker or _NO_ACKS, idle_s)
        if delivery is None:
            break
        try:
            sys.stdout.buffer.write(_line(delivery, as_json))
            sys.stdout.buffer.flush()
        except BrokenPipeError:
            held.append(delivery)  # not printed: give it back now rather than at lease end
            raise
        printed += 1
        if acker is not None:
            acker.add(delivery)
        else:
            held.append(delivery)
    return printed


async def _consume(client: AsyncClient, queue: str, count: int | None, idle_s: float | None, ack: bool,
                   prefetch: int, lease_s: float | None, as_json: bool) -> int:  # fmt: skip
    """Print (and ack) up to `count` messages, stopping after `idle_s` without one; return how many printed."""
    if count is None:
        source: _Push | _Pull = _Push(await client.consume(queue, prefetch=prefetch, lease_s=lease_s))
    else:
        source = _Pull(client, queue, count, prefetch, lease_s)
    acker = _Acker(client, batch_size=max(1, prefetch // 2)) if ack else None
    held: list[Delivery] = []  # to give back at the end: printed with --no-ack, or not printed (stdout closed)
    try:
        printed = await _print_all(source, acker, held, count, idle_s, as_json)
    except BaseException:
        await source.close()
        with contextlib.suppress(Exception):  # best effort: what was printed should not come again
            await _settle(client, acker, held)
        raise
    await source.close()  # first: acks returning credit must not make the broker send more
    await _settle(client, acker, held)
    return printed


async def _settle(client: AsyncClient, acker: _Acker | None, held: list[Delivery]) -> None:
    if acker is not None:
        await acker.finish()
    if held:
        await client.nack(held)


@click.command()
@url_option
@click.argument("queue")
@click.option("--count", "-n", type=click.IntRange(min=1), default=None, metavar="N", help="Exit after N messages.")
@click.option(
    "--timeout",
    "idle_s",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="S",
    help=f"Exit after S seconds without a message.  [default: {DEFAULT_IDLE_S:g} without --count; "
    "with --count, wait until N came]",
)
@click.option("--follow", "-f", is_flag=True, help="Never exit for lack of messages (like tail -f).")
@click.option(
    "--no-ack",
    is_flag=True,
    help="Do not ack: the messages printed go back to the queue at exit (without --count, at most --prefetch). "
    "Each still counts as a delivery (max_deliveries); `chute queue peek` leases nothing.",
)
@click.option(
    "--prefetch",
    type=click.IntRange(1, 100_000),
    default=100,
    show_default=True,
    metavar="P",
    help="Deliveries on their way at a time; with --count, leased per request (never more than N).",
)
@click.option(
    "--lease",
    "lease_s",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="S",
    help="Lease of each delivery in seconds.  [default: the queue's]",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object per message: id, body, headers, delivery_count, priority, subject.",
)
@run_command
async def consume(url, queue, count, idle_s, follow, no_ack, prefetch, lease_s, as_json) -> None:
    """Print messages of a queue, and ack them.

    One body per line (UTF-8; invalid bytes as \\xNN escapes), each acked once printed. Use --json for bodies
    that contain newlines.

    Exits 0 after --count messages or --timeout idle seconds, once every ack is confirmed."""
    if follow and idle_s is not None:
        raise click.UsageError("--follow and --timeout exclude each other", click.get_current_context())
    if follow:
        idle_s = None
    elif idle_s is None and count is None:
        idle_s = DEFAULT_IDLE_S
    if count is not None:
        prefetch = min(prefetch, count)
    async with connect(url) as client:
        printed = await _consume(client, queue, count, idle_s, not no_ack, prefetch, lease_s, as_json)
    verb = "printed" if no_ack else "consumed"
    click.echo(f"{verb} {plural(printed, 'message')} from {queue}{' (not acked)' if no_ack else ''}", err=True)


# -- tail ---------------------------------------------------------------------------------------------------------


async def tail_topic(url: str, topic: str, pattern: str, filter_: dict | None, count: int | None, prefetch: int,
                     as_json: bool) -> None:  # fmt: skip
    """Print the messages of `topic` matching `pattern` and `filter_` published from now on, until `count` came,
    Ctrl-C or SIGTERM (exit 0); the ephemeral subscription ends with the command."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    printed = 0
    try:
        async with connect(url) as client:
            consumer = await client.subscribe_ephemeral(topic, pattern, filter=filter_, prefetch=prefetch)
            click.echo(f"listening to {topic} {pattern} (Ctrl-C to stop)", err=True)
            async with consumer:
                stopping = loop.create_task(stop.wait())
                try:
                    while count is None or printed < count:
                        getting = loop.create_task(consumer.__anext__())
                        await asyncio.wait({getting, stopping}, return_when=asyncio.FIRST_COMPLETED)
                        if not getting.done():
                            getting.cancel()
                            break
                        try:
                            delivery = getting.result()
                        except StopAsyncIteration:
                            break
                        sys.stdout.buffer.write(_line(delivery, as_json))
                        sys.stdout.buffer.flush()
                        printed += 1
                finally:
                    stopping.cancel()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    click.echo(f"printed {plural(printed, 'message')} from {topic}", err=True)


@click.command()
@url_option
@click.argument("topic")
@click.argument("pattern", default=">")
@click.option(
    "--filter",
    "filter_",
    multiple=True,
    callback=parse_pairs,
    metavar="HEADER=VALUE",
    help="Take only messages with this header value (repeatable: all must match).",
)
@click.option("--count", "-n", type=click.IntRange(min=1), default=None, metavar="N", help="Exit after N messages.")
@click.option(
    "--prefetch", type=click.IntRange(1, 100_000), default=100, show_default=True, metavar="P",
    help="Deliveries on their way at a time.",
)  # fmt: skip
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object per message: id, body, headers, delivery_count, priority, subject.",
)
@run_command
async def tail(url, topic, pattern, filter_, count, prefetch, as_json) -> None:
    """Print live messages of a topic until Ctrl-C.

    Subscribes to PATTERN (default `>`: every subject) on TOPIC for as long as the command runs: messages
    published meanwhile are printed, one body per line (--json: one object), at most once; nothing is stored
    for later and nothing is left behind when it ends. Needs the consume permission on the topic."""
    await tail_topic(url, topic, pattern, filter_, count, prefetch, as_json)
