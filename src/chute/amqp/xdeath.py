"""The `x-death` header as RabbitMQ writes it: one entry per (queue, reason), most recent first.

Each entry is a table: `count` (how many times the message was dead-lettered from that queue for that reason),
`reason` (`rejected`, `expired`, `maxlen`, `delivery_limit`), `queue`, `time` (of the first such death),
`exchange` and `routing-keys` (where the message had been published). When a message dies again from the same
queue for the same reason, that entry's count goes up and it moves to the front; otherwise a new entry with
count 1 goes in front. The first death is also kept in the `x-first-death-reason`, `x-first-death-queue` and
`x-first-death-exchange` headers, which never change afterwards.

Pure functions on a decoded header table (a dict), so the deliveries (mapping.py) and the republish of a rejected
message (dead_letter.py) build the same thing.
"""

from __future__ import annotations

import datetime

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
