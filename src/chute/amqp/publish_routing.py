"""Publishing through a cluster node: what routing a run of basic.publish needs is read before it is routed.

On one broker, basic.py routes a publish from the core at once (`CoreFacts`). On a cluster node (the broker is
the router, state.py) the exchanges and queues may live in shards other nodes serve, so a batch is routed in a
task, in three steps:
1. the exchanges the batch names are read into the book (their topics' attributes, metadata.py) unless this node
   read them less than `state.EXCHANGE_FRESH_S` ago or changed them itself;
2. the batch is routed once with a `Recorder`, which notes every question routing asks (is there such a queue,
   does this topic route this subject and these headers, which exchanges does an exchange-to-exchange binding
   lead to) and answers "yes"; the questions are asked of the owners, concurrently (unknown exchanges first, then
   again, since a binding may lead to an exchange this node has not read);
3. the batch is routed again with the answers (`Prefetched`), exactly as on one broker, and published: one
   router call per destination run, which the router sends to the shard's owner.

Only what changes the outcome is asked: whether a message is routable matters only with `mandatory` (an
unroutable message is not stored either way: the topic routes it nowhere, a missing queue refuses it and the
front confirms it as RabbitMQ does), so a plain publish asks nothing beyond its exchange.

Invariant: a channel's batches are routed one after another, in the order they came (each task waits for the
previous one before it routes), so their broker calls start in publish order, as on one broker.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from chute.amqp import state
from chute.amqp.errors import INTERNAL_ERROR, connection_error, from_chute
from chute.errors import ChuteError

if TYPE_CHECKING:
    from chute.amqp.channel import Channel
    from chute.amqp.session import AmqpSession

log = logging.getLogger("chute.amqp")
MAX_HOPS = 8  # rounds of reading exchanges that exchange-to-exchange bindings lead to


def start(session: AmqpSession, channel: Channel, batch: list, publish, after: list | None = None) -> asyncio.Task:
    """Route and publish `batch` in a task that runs after the channel's previous batch was routed (and after
    the settles in `after`)."""
    previous = channel.routing
    task = session.spawn(_run(session, channel, batch, publish, previous, after or []))
    channel.routing = task
    channel.publishing.add(task)
    task.add_done_callback(channel.publishing.discard)
    return task


async def _run(session: AmqpSession, channel: Channel, batch: list, publish, previous, after: list) -> None:
    if previous is not None and not previous.done():
        await asyncio.wait([previous])
    if after:
        await asyncio.wait(after)
    try:
        facts = await prefetch(session, batch)
    except ChuteError as exc:  # an owner that cannot be reached: the channel ends as for a failed publish
        error = from_chute(exc, batch[0].method)
        if error.connection:
            session.fail(error)
        elif not channel.closed:
            session.channel_error(channel.number, error)
        return
    if channel.closed or session.closed:
        return
    try:
        publish(session, channel, batch, facts)
    except Exception as exc:  # a bug: this connection ends, the others go on
        log.exception("AMQP publish from %s failed", session.peer)
        session.fail(connection_error(INTERNAL_ERROR, f"internal error: {type(exc).__name__}"))


async def prefetch(session: AmqpSession, batch: list) -> Prefetched:
    """Read what routing `batch` needs (see the module docstring) and return it as routing's facts."""
    from chute.amqp.basic import _route

    front = session.front
    names = {content.method.exchange for content in batch if content.method.exchange}
    await asyncio.gather(*(state.refresh_exchange(front, name, max_age_s=state.EXCHANGE_FRESH_S) for name in names))
    recorder = Recorder()
    for _ in range(MAX_HOPS):
        recorder.missing.clear()
        for content in batch:
            try:
                _route(session, content, recorder)
            except Exception:  # noqa: BLE001 - a refused publish is refused again, with the answers, in step 3
                pass
        if not recorder.missing:
            break
        await asyncio.gather(*(state.refresh_exchange(front, name) for name in recorder.missing))
        recorder.read.update(recorder.missing)
    broker = session.broker
    questions = list(recorder.questions)
    answers = await asyncio.gather(*(_ask(broker, question) for question in questions))
    return Prefetched(dict(zip(questions, answers, strict=True)))


async def _ask(broker, question: tuple):
    if question[0] == "queue":
        return await state.queue_exists(broker, question[1])
    if question[0] == "zero":
        _, topic, headers = question
        return await state.zero_word_route(broker, topic, dict(headers))
    _, topic, subject, headers = question
    return await state.route(broker, topic, subject, dict(headers)) or []


def _headers_key(headers: dict | None) -> tuple:
    return tuple(sorted((headers or {}).items()))


class Recorder:
    """Routing's facts in the first pass: every question is noted and answered "yes" (or "no queues")."""

    def __init__(self) -> None:
        self.questions: dict[tuple, None] = {}
        self.missing: set[str] = set()  # exchanges routing looked for that the book does not hold
        self.read: set[str] = set()  # exchanges read in an earlier round (absent: they do not exist)

    def exchange(self, book, name: str) -> dict | None:
        declared = book.exchanges.get(name)
        if declared is None and name not in self.read:
            self.missing.add(name)
        return declared

    def has_queue(self, name: str, mandatory: bool) -> bool:
        if mandatory:
            self.questions[("queue", name)] = None
        return True

    def routes(self, topic: str, subject: str, headers: dict, mandatory: bool) -> bool:
        if mandatory:
            self.questions[("route", topic, subject, _headers_key(headers))] = None
        return True

    def queues(self, topic: str, subject: str, headers: dict) -> list[str]:
        self.questions[("route", topic, subject, _headers_key(headers))] = None
        return []

    def zero_word_queues(self, topic: str, headers: dict) -> list[str]:
        self.questions[("zero", topic, _headers_key(headers))] = None
        return []

    def existing(self, names: set[str]) -> set[str]:
        return names


class Prefetched:
    """Routing's facts in the last pass: the owners' answers to the recorded questions."""

    __slots__ = ("answers",)

    def __init__(self, answers: dict) -> None:
        self.answers = answers

    def exchange(self, book, name: str) -> dict | None:
        return book.exchanges.get(name)

    def has_queue(self, name: str, mandatory: bool) -> bool:
        return not mandatory or bool(self.answers.get(("queue", name), False))

    def routes(self, topic: str, subject: str, headers: dict, mandatory: bool) -> bool:
        return not mandatory or bool(self.answers.get(("route", topic, subject, _headers_key(headers))))

    def queues(self, topic: str, subject: str, headers: dict) -> list[str]:
        return self.answers.get(("route", topic, subject, _headers_key(headers))) or []

    def zero_word_queues(self, topic: str, headers: dict) -> list[str]:
        return self.answers.get(("zero", topic, _headers_key(headers))) or []

    def existing(self, names: set[str]) -> set[str]:
        return names  # a queue gone meanwhile refuses its group (publish_many), which the front confirms
