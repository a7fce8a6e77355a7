"""AMQP's own metadata, durable with the log: kept in the `attributes` of Chute's topics and queues.

What Chute's topics, subscriptions and queues do not say by themselves (each exchange's type and flags, each
queue's declared flags and arguments, the AMQP bindings, the exchange-to-exchange bindings) is stored as JSON text
in the opaque `attributes` map of the settings the core keeps in its records and checkpoints:

    topic `exchange.X`   amqp-exchange           {"type", "durable", "auto_delete", "internal", "arguments"}
                         amqp-exchange-bindings  [{"destination", "key", "arguments", "table"}, ...]  (X the source)
                         amqp-typed-bindings     [{"queue", "key", "arguments", "table"}, ...]  (a copy, see below)
    queue `Q`            amqp-queue              {"durable", "auto_delete", "exclusive", "arguments"}
                         amqp-bindings           [{"exchange", "key", "arguments", "slots" | "table"}, ...]

So they have the crash consistency of topics and queues themselves: a declared exchange or queue exists after a
restart with its flags, or does not exist at all; a binding is one subscription record and one settings record,
in that order (a crash between the two leaves the subscription without its binding: binding again puts it back).
Headers bindings the front matches itself (typed values, `-with-x`: no subscription carries them) are kept with
their queue and copied to their exchange's topic, so a cluster node that publishes to the exchange finds them
where it looks (state.py reads the topic of an exchange it publishes to, not every queue); one broker reads the
queues' copies. The `ExchangeBook` is the in-memory view, rebuilt from the core at start (`load`); `store`
writes what changed since the last write (one settings update per topic or queue whose metadata changed).

`<data_dir>/amqp-exchanges.json`, where earlier versions kept all this, is read once at start when it exists
(what the log does not hold yet is taken from it), written into the log, then renamed
`amqp-exchanges.json.imported`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import TYPE_CHECKING

from chute.amqp import exchanges as ex

if TYPE_CHECKING:
    from chute.amqp.exchanges import ExchangeBook

log = logging.getLogger("chute.amqp")
EXCHANGE, EXCHANGE_BINDINGS, TYPED_BINDINGS = "amqp-exchange", "amqp-exchange-bindings", "amqp-typed-bindings"
QUEUE, BINDINGS = "amqp-queue", "amqp-bindings"
LEGACY_FILE = "amqp-exchanges.json"


def load(book: ExchangeBook, core) -> dict:
    """Fill the book from the core's topics and queues; return what is stored (for `store` to compare with)."""
    stored: dict = {}
    typed: dict[str, list] = {}  # exchange -> the typed bindings its topic holds (the queues' copies are loaded)
    for topic in core.topics.values():
        attributes = topic.settings.attributes or {}
        if not topic.name.startswith(ex.TOPIC_PREFIX) or not any(
                key in attributes for key in (EXCHANGE, EXCHANGE_BINDINGS, TYPED_BINDINGS)):  # fmt: skip
            continue
        name = topic.name[len(ex.TOPIC_PREFIX):]
        declared = _loads(attributes.get(EXCHANGE))
        if isinstance(declared, dict):
            book.exchanges[name] = declared
        for each in _loads(attributes.get(EXCHANGE_BINDINGS)) or []:
            book.exchange_bindings.append({"source": name, **each})
        typed[name] = _loads(attributes.get(TYPED_BINDINGS)) or []
    for queue in core.queues.values():
        attributes = queue.settings.attributes or {}
        if QUEUE not in attributes and BINDINGS not in attributes:
            continue
        declared = _loads(attributes.get(QUEUE))
        if isinstance(declared, dict):
            book.queues[queue.name] = declared
        for each in _loads(attributes.get(BINDINGS)) or []:
            book.bindings.append({**each, "queue": queue.name})
        stored[("queue", queue.name)] = _queue_wanted(book, queue.name, _bindings_by_queue(book))
    for name, copies in typed.items():
        declared, bindings, _ = _topic_wanted(book, name)
        stored[("topic", ex.TOPIC_PREFIX + name)] = (declared, bindings, copies)
    book.changed()
    return stored


def take_topic(book: ExchangeBook, stored: dict, name: str, settings) -> None:
    """Replace the book's exchange `name` (declaration, exchange-to-exchange bindings from it) by what its topic's
    `settings` hold now (None: the topic is gone); `stored` learns it is what is written."""
    attributes = (settings.attributes if settings is not None else None) or {}
    declared = _loads(attributes.get(EXCHANGE))
    if isinstance(declared, dict):
        book.exchanges[name] = declared
    else:
        book.exchanges.pop(name, None)
    book.exchange_bindings = [b for b in book.exchange_bindings if b["source"] != name]
    for each in _loads(attributes.get(EXCHANGE_BINDINGS)) or []:
        book.exchange_bindings.append({"source": name, **each})
    book.bindings = [b for b in book.bindings if b["exchange"] != name or "table" not in b]
    for each in _loads(attributes.get(TYPED_BINDINGS)) or []:
        book.bindings.append({"exchange": name, "slots": [], **each})
    if settings is None:
        stored.pop(("topic", ex.TOPIC_PREFIX + name), None)
    else:
        stored[("topic", ex.TOPIC_PREFIX + name)] = _topic_wanted(book, name)
    book.changed()


def take_queue(book: ExchangeBook, stored: dict, name: str, settings) -> None:
    """Replace the book's queue `name` (declared flags, its AMQP bindings) by what its `settings` hold now."""
    attributes = (settings.attributes if settings is not None else None) or {}
    declared = _loads(attributes.get(QUEUE))
    if isinstance(declared, dict):
        book.queues[name] = declared
    else:
        book.queues.pop(name, None)
    book.bindings = [b for b in book.bindings if b["queue"] != name]
    for each in _loads(attributes.get(BINDINGS)) or []:
        book.bindings.append({**each, "queue": name})
    if settings is None:
        stored.pop(("queue", name), None)
    else:
        stored[("queue", name)] = _queue_wanted(book, name, _bindings_by_queue(book))
    book.changed()


def import_legacy(book: ExchangeBook, core, data_dir) -> str | None:
    """Take from `<data_dir>/amqp-exchanges.json` what the log does not hold yet; its path if there was one."""
    if data_dir is None:
        return None
    path = os.path.join(data_dir, LEGACY_FILE)
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("AMQP: %s could not be read (%s); it is left as it is", path, exc)
        return None
    for name, declared in dict(data.get("exchanges", {})).items():
        book.exchanges.setdefault(name, declared)
    known = {b["queue"] for b in book.bindings}
    for binding in data.get("bindings", []):
        if binding.get("queue") in core.queues and binding["queue"] not in known:
            book.bindings.append(binding)
    for name, declared in dict(data.get("queues", {})).items():
        if name in core.queues:
            book.queues.setdefault(name, declared)
    if not book.exchange_bindings:
        book.exchange_bindings.extend(data.get("exchange_bindings", []))
    book.changed()
    return path


def retire_legacy(path: str) -> None:
    """The legacy file was written into the log: keep it aside, so it is not read again."""
    with contextlib.suppress(OSError):
        os.replace(path, path + ".imported")


async def store(book: ExchangeBook, broker, stored: dict) -> None:
    """Write into the topics' and queues' attributes the metadata that changed since `stored` (updated)."""
    from chute.amqp import state  # (state reads the book through this module)

    for name in list(book.exchanges) + [b["source"] for b in book.exchange_bindings] + \
            [b["exchange"] for b in book.bindings if "table" in b]:  # fmt: skip
        topic_name = ex.TOPIC_PREFIX + name
        wanted = _topic_wanted(book, name)
        if stored.get(("topic", topic_name)) == wanted:
            continue
        settings = await state.topic_settings(broker, topic_name)
        if settings is None:
            if not (wanted[1] or wanted[2]) or name not in book.exchanges:
                continue  # a predeclared exchange nobody bound to yet, or a topic deleted by another front
            settings = (await broker.create_topic(topic_name)).settings
        if name in ex.PREDECLARED_NAMES and not (wanted[1] or wanted[2]) and settings.attributes is None:
            continue  # a predeclared exchange's topic needs no record of what it is
        values = {EXCHANGE: _dumps(wanted[0]) if wanted[0] is not None else None,
                  EXCHANGE_BINDINGS: _dumps(wanted[1]) if wanted[1] else None,
                  TYPED_BINDINGS: _dumps(wanted[2]) if wanted[2] else None}  # fmt: skip
        await _update(broker.update_topic, topic_name, settings.attributes, values)
        stored[("topic", topic_name)] = wanted
    by_queue = _bindings_by_queue(book)
    for name in set(book.queues) | set(by_queue) | {n for kind, n in stored if kind == "queue"}:
        if name.startswith("~"):  # an ephemeral subscription's queue keeps nothing
            stored.pop(("queue", name), None)
            continue
        wanted = _queue_wanted(book, name, by_queue)
        if stored.get(("queue", name)) == wanted:
            continue
        settings = await state.queue_settings(broker, name)
        if settings is None:
            stored.pop(("queue", name), None)
            continue
        values = {QUEUE: _dumps(wanted[0]) if wanted[0] is not None else None,
                  BINDINGS: _dumps(wanted[1]) if wanted[1] else None}  # fmt: skip
        await _update(broker.update_queue, name, settings.attributes, values)
        stored[("queue", name)] = wanted


def created_with(stored: dict, kind: str, name: str, declared: dict) -> dict:
    """The attributes a topic or queue is created with, so its AMQP declaration is in the same record."""
    wanted = (declared, [], []) if kind == "topic" else (declared, [])
    stored[(kind, ex.TOPIC_PREFIX + name if kind == "topic" else name)] = wanted
    return {EXCHANGE if kind == "topic" else QUEUE: _dumps(wanted[0])}


def declared_queue(settings) -> dict | None:
    """A queue's AMQP declaration as its `settings` store it, or None (a queue not declared through AMQP)."""
    found = _loads(((settings.attributes if settings is not None else None) or {}).get(QUEUE))
    return found if isinstance(found, dict) else None


def may_be_exclusive(settings) -> bool:
    """A cheap look (no parsing) at whether a queue's stored declaration can say `exclusive`."""
    text = ((settings.attributes if settings is not None else None) or {}).get(QUEUE)
    return text is not None and '"exclusive":true' in text


def forget(stored: dict, kind: str, name: str) -> None:
    """A topic or queue was deleted: what it stored went with it."""
    stored.pop((kind, name), None)


async def _update(update, name: str, current: dict | None, values: dict) -> None:
    attributes = dict(current or {})
    for key, value in values.items():
        if value is None:
            attributes.pop(key, None)
        else:
            attributes[key] = value
    if attributes != (current or {}):
        await update(name, attributes=attributes or None)


def _topic_wanted(book: ExchangeBook, name: str) -> tuple:
    declared = book.exchanges.get(name)
    bindings = [{k: v for k, v in b.items() if k != "source"} for b in book.exchange_bindings if b["source"] == name]
    typed = sorted(({k: v for k, v in b.items() if k not in ("exchange", "slots")} for b in book.bindings
                    if b["exchange"] == name and "table" in b), key=_dumps)  # fmt: skip
    return (declared, bindings, typed)  # declarations are replaced, never changed in place: compared as they are


def _bindings_by_queue(book: ExchangeBook) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for binding in book.bindings:
        out.setdefault(binding["queue"], []).append({k: v for k, v in binding.items() if k != "queue"})
    return out


def _queue_wanted(book: ExchangeBook, name: str, by_queue: dict) -> tuple:
    return (book.queues.get(name), by_queue.get(name, []))


def _dumps(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _loads(text: str | None):
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        log.warning("AMQP: unreadable stored metadata %r ignored", text[:80])
        return None
