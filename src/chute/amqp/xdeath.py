"""The `x-death` header as RabbitMQ writes it: one entry per (queue, reason), most recent first.

Each entry is a table: `count` (how many times the message was dead-lettered from that queue for that reason),
`reason` (`rejected`, `expired`, `maxlen`, `delivery_limit`), `queue`, `time` (of the first such death),
`exchange` and `routing-keys` (where the message had been published). When a message dies again from the same
queue for the same reason, that entry's count goes up and it moves to the front; otherwise a new entry with
count 1 goes in front. The first death is also kept in the `x-first-death-reason`, `x-first-death-queue` and
`x-first-death-exchange` headers, which never change afterwards.

Pure functions on a decoded header table (a dict), so the deliveries (mapping.py) and the republish of a rejected
message (dead_letter.py) build the same thing.

Every `count` a delivery carries is a `Long` (`as_sent`): RabbitMQ sends it as a signed 64-bit field value (`l`),
and clients in typed languages read it as such (Go's `death["count"].(int64)`, Java's `(Long)`), whereas pamqp,
left to itself, encodes an integer in its smallest field type (`b` for a count under 128). pamqp's table encoder
is taught to encode a `Long` as `l` (`_teach_pamqp`, once, at import); every other integer keeps its encoding.
"""

from __future__ import annotations

import datetime

from pamqp import encode

HEADER = "x-death"
FIRST = ("x-first-death-reason", "x-first-death-queue", "x-first-death-exchange")


def add_death(table: dict, *, queue: str, reason: str, exchange: str, routing_keys: list[str],
              time: datetime.datetime) -> None:  # fmt: skip
    """Record one dead-lettering of the message whose header table is `table` (changed in place)."""
    entries = table.get(HEADER)
    entries = [dict(each) for each in entries if isinstance(each, dict)] if isinstance(entries, list) else []
    same = next((each for each in entries if each.get("queue") == queue and each.get("reason") == reason), None)
    if same is None:
        same = {"count": 0, "reason": reason, "queue": queue, "time": time, "exchange": exchange,
                "routing-keys": list(routing_keys)}  # fmt: skip
    else:
        entries.remove(same)
    count = same.get("count")
    same["count"] = (count if isinstance(count, int) and not isinstance(count, bool) else 0) + 1
    table[HEADER] = [same, *entries]
    if FIRST[0] not in table:
        table[FIRST[0]], table[FIRST[1]], table[FIRST[2]] = reason, queue, exchange


def as_sent(table: dict) -> None:
    """Make each x-death `count` of `table` a `Long` (a table decoded from storage holds plain ints)."""
    entries = table.get(HEADER)
    if not isinstance(entries, list):
        return
    for entry in entries:
        count = entry.get("count") if isinstance(entry, dict) else None
        if isinstance(count, int) and not isinstance(count, bool):
            entry["count"] = Long(count)


class Long(int):
    """An integer sent as AMQP's signed 64-bit field value (`l`) in a header table."""

    __slots__ = ()


def _teach_pamqp() -> None:
    smallest = encode.table_integer
    if getattr(smallest, "encodes_long", False):
        return

    def table_integer(value: int) -> bytes:
        if type(value) is Long:
            return b"l" + encode.long_long_int(value)
        return smallest(value)

    table_integer.encodes_long = True  # type: ignore[attr-defined]
    encode.table_integer = table_integer  # encode_table_value looks it up at each call


_teach_pamqp()
