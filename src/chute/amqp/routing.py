"""Routing that the AMQP front does itself, for what Chute's subscriptions cannot express: exchange-to-exchange
bindings (exchange.bind) and headers-exchange bindings on typed values or with `x-match: all-with-x / any-with-x`.

A publish to an exchange that has such bindings ("front-routed": `ExchangeBook.front_routed`) is routed here: from
the exchange, every exchange reachable through matching exchange-to-exchange bindings is visited once (so a loop
of bindings ends, and a queue reachable along several paths gets the message once); each visited exchange adds the
queues its Chute topic routes to (its subscriptions, whatever front made them) and, for a headers exchange, the
queues of its typed bindings that match. The message is then published to each of those queues (one group commit;
the body is stored once per queue). Publishes to other exchanges keep the direct path: one topic publish.

Headers matching is RabbitMQ's (3.10+): `x-match` is `all` (the default), `any`, `all-with-x` or `any-with-x`
(anything else is 406); binding arguments whose name starts with `x-` are ignored unless the mode is one of the
`-with-x` ones (`x-match` itself always is); a void value matches the header's presence; other values compare as
Erlang's `==` does on the decoded values: integers of any width, timestamps (seconds) and floats by numeric value,
booleans only with booleans, long strings and byte arrays by their bytes, decimals by (scale, digits), nested
tables and arrays item by item. `all` with nothing to match matches every message, `any` none.
"""

from __future__ import annotations

import base64
import datetime
import functools
from decimal import Decimal

from pamqp import decode, encode

from chute.amqp.errors import PRECONDITION_FAILED, AmqpError

MODES = ("all", "any", "all-with-x", "any-with-x")


def match_mode(arguments: dict) -> str:
    """The `x-match` of a headers binding (406 with RabbitMQ's text for an unknown one)."""
    mode = arguments.get("x-match", "all")
    if isinstance(mode, bytes | bytearray):
        mode = bytes(mode).decode("utf-8", "replace")
    if mode not in MODES:
        raise AmqpError(PRECONDITION_FAILED, f'Invalid x-match field value <<"{mode}">>; expected all, any, '
                        "all-with-x, or any-with-x")  # fmt: skip
    return mode


def typed(arguments: dict) -> bool:
    """Whether a headers binding needs the front: a `-with-x` mode, or a value to match that is not a string."""
    mode = match_mode(arguments)
    if mode.endswith("-with-x"):
        return True
    return any(not isinstance(value, str) for name, value in arguments.items() if not name.startswith("x-"))


def headers_match(arguments: dict, headers: dict | None) -> bool:
    """Whether a message with the header table `headers` matches a headers binding with `arguments`."""
    mode = match_mode(arguments)
    with_x = mode.endswith("-with-x")
    headers = headers or {}
    matched = total = 0
    for name, wanted in arguments.items():
        if name == "x-match" or (name.startswith("x-") and not with_x):
            continue
        total += 1
        if name in headers and (wanted is None or _value(wanted) == _value(headers[name])):
            matched += 1
            if mode.startswith("any"):
                return True
        elif mode.startswith("all"):
            return False
    return mode.startswith("all") or (matched > 0 and total > 0)


def _value(value):
    """A decoded field value in the form Erlang's `==` compares it by."""
    if value is None:
        return ("void",)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        return ("number", value)
    if isinstance(value, datetime.datetime):
        return ("number", int(value.replace(tzinfo=datetime.UTC).timestamp()))
    if isinstance(value, Decimal):
        exponent = value.as_tuple().exponent
        scale = -exponent if isinstance(exponent, int) else 0
        return ("decimal", scale, int(value.scaleb(scale)))
    if isinstance(value, str):
        return ("bytes", value.encode())
    if isinstance(value, bytes | bytearray):
        return ("bytes", bytes(value))
    if isinstance(value, dict):
        return ("table", tuple(sorted((str(k), _value(v)) for k, v in value.items())))
    if isinstance(value, list | tuple):
        return ("array", tuple(_value(v) for v in value))
    return ("other", repr(value))


def topic_match(pattern: str, key: str) -> bool:
    """AMQP topic matching of a routing key against a binding key (`*` one word, `#` zero or more). An empty key
    (or binding key) has no words, as in RabbitMQ: `#` and the empty binding key match it, `*` and `.#` do not."""
    words, keys = (pattern.split(".") if pattern else []), (key.split(".") if key else [])
    states = {0}
    for word in keys:
        following = set()
        for i in states:
            _advance(words, i, word, following)
        states = following
        if not states:
            return False
    return any(_rest_is_hashes(words, i) for i in states)


def _advance(words: list[str], i: int, word: str, out: set[int]) -> None:
    while i < len(words):
        if words[i] == "#":
            out.add(i)  # '#' takes this word and maybe more
            i += 1  # or none: try the next pattern word on it
            continue
        if words[i] == "*" or words[i] == word:
            out.add(i + 1)
        return


def _rest_is_hashes(words: list[str], i: int) -> bool:
    return all(word == "#" for word in words[i:])


def binding_matches(kind: str, binding: dict, key: str, headers: dict | None) -> bool:
    """Whether an exchange-to-exchange binding from an exchange of `kind` takes a message with this routing key and
    header table."""
    if kind == "fanout":
        return True
    if kind == "direct":
        return binding["key"] == key
    if kind == "topic":
        return topic_match(binding["key"], key)
    return headers_match(arguments_of(binding), headers)


def pack(arguments: dict) -> str:
    """Binding arguments with their AMQP types, for the exchange book (base64 of the field table)."""
    return base64.b64encode(encode.field_table(_byte_arrays(arguments))[4:]).decode()


def arguments_of(binding: dict) -> dict:
    """A binding's arguments with their AMQP types (`pack`'s inverse; the plain ones if it has none)."""
    packed = binding.get("table")
    if packed is None:
        return binding.get("arguments", {})
    return _decoded(packed)


@functools.lru_cache(maxsize=4096)
def _decoded(packed: str) -> dict:
    raw = base64.b64decode(packed)
    return decode.field_table(len(raw).to_bytes(4, "big") + raw)[1]


def _byte_arrays(value):
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, dict):
        return {k: _byte_arrays(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_byte_arrays(v) for v in value]
    return value
