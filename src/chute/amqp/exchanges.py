"""AMQP exchanges and bindings as Chute topics and subscriptions: names, routing keys and binding keys.

One model: the exchange `X` is the Chute topic `exchange.X` (a prefix, because AMQP lets an exchange and a queue
share a name — Celery and kombu do exactly that — while Chute's queues and topics share one namespace); a
binding of queue `Q` to `X` with key `K` is one or more subscriptions of `exchange.X` feeding `Q`; a message
published to `X` with routing key `R` is published to `exchange.X` with the subject `subject(R)`. So the core
routes it (the body stored once, whatever the number of queues), and a native or HTTP client can publish to
`exchange.X` with that subject and reach the same queues.

Routing keys become subjects word by word: a word made of letters, digits, `-` and `_` and not starting with `_`
stays as it is; any other word (empty, other characters, or starting with `_`) becomes `_` followed by the hex of
its UTF-8 bytes. The mapping is one-to-one, and the usual keys (`orders.created.eu`, `task_queue`) are unchanged.

Binding keys per exchange type:
- direct: the subject of the key (an exact match).
- fanout: `>` (every subject; fanout publishes use the subject `_`, the empty word, when the key does not fit).
- topic: `*` stays `*` (one word); `#` (zero or more words) becomes `>` when last (`a.#` → `a` and `a.>`), and
  anywhere else expands into `*` runs (`#.err` → `err`, `*.err`, `*.*.err`, ... up to the longest subject);
  an expansion beyond `MAX_EXPANSION` subscriptions is refused (406). The empty routing key has no words (as in
  RabbitMQ), but its subject `_` is one word, which `*` would match: so a publish with the empty key to a topic
  exchange is routed by the front (basic.py) to the bindings that match no words, whose subscriptions are the
  `ZERO_WORD_PATTERNS` (`>` of the bindings made of `#`, `_` of the empty binding key).
- headers: publishes carry the subject `HEADERS_SUBJECT` (the routing key goes in the `amqp-routing-key` header);
  a binding with `x-match: all` is one subscription whose header filter holds its string values, one with
  `x-match: any` one subscription per value; each takes a slot of its own, a pattern that matches
  `HEADERS_SUBJECT` (`slot_pattern`), so one queue can have many bindings. Non-string values are refused (540).

`ExchangeBook` keeps what Chute's topics and queues do not: each exchange's type and flags, the list of AMQP
bindings (a binding may own several subscriptions, and two bindings may share one), and each queue's declared
flags and arguments (for RabbitMQ's equivalence checks, and what Chute's settings do not hold: auto-delete,
exclusive, x-expires, x-single-active-consumer), in memory; metadata.py stores them in the topics' and queues'
attributes, durable with the log.
Invariant: a subscription made for AMQP bindings is removed only when no remaining binding
of that exchange and queue needs it.
"""

from __future__ import annotations

import re

from chute.amqp.errors import NOT_IMPLEMENTED, PRECONDITION_FAILED, AmqpError
from chute.core.routing import MAX_SUBJECT_CHARS
from chute.model import NAME_RE

TOPIC_PREFIX = "exchange."
PREDECLARED_NAMES = ("amq.direct", "amq.fanout", "amq.topic", "amq.headers", "amq.match")  # RabbitMQ's
TYPES = ("direct", "fanout", "topic", "headers")
MAX_EXPANSION = 256  # subscriptions one topic binding key may become
_WORD = re.compile(r"^[A-Za-z0-9\-][A-Za-z0-9_\-]*$")
FANOUT_SUBJECT = "_"  # the empty word
HEADERS_WORDS = 8
HEADERS_SUBJECT = ".".join(["_"] * HEADERS_WORDS)  # every headers-exchange publish (its key is in a header)
MAX_HEADERS_SLOTS = 2**HEADERS_WORDS  # header filters one queue may have on one headers exchange
ALTERNATE = "alternate-exchange"  # the exchange.declare argument naming an exchange's alternate exchange


def alternate_of(declared: dict) -> str | None:
    """The alternate exchange a declared exchange names, or None. An empty name would be the default exchange,
    which cannot be an alternate (RabbitMQ leaves such a message unroutable), and a name that is not a string
    (recorded before alternates were followed, when any value was accepted) names nothing."""
    value = (declared.get("arguments") or {}).get(ALTERNATE)
    return value if isinstance(value, str) and value else None


def topic_name(exchange: str) -> str:
    """The Chute topic of an exchange; 406 if the name cannot be one."""
    name = possible_topic(exchange)
    if name is None:
        raise AmqpError(PRECONDITION_FAILED, f"exchange name {exchange!r} is not supported here: use letters, "
                        "digits, '_', '-' and '.' (at most 191 characters)")  # fmt: skip
    return name


def possible_topic(exchange: str) -> str | None:
    """The Chute topic of an exchange, or None if no exchange can have that name here."""
    name = TOPIC_PREFIX + exchange
    return name if NAME_RE.match(name) else None


_ESCAPED = re.compile(r"_x((?:[0-9a-f]{2})+)_")


def chute_queue(name: str) -> str:
    """The Chute queue of an AMQP queue name. A name Chute accepts is itself; in another, each character after
    the first that Chute does not allow becomes `_x` + the hex of its UTF-8 + `_` (Celery's
    `celery@host.celery.pidbox` is `celery_x40_host.celery.pidbox`). A bad first character stays and is refused."""
    if NAME_RE.match(name) or not name:
        return name
    return name[0] + "".join(ch if ch.isascii() and (ch.isalnum() or ch in "_.-") else f"_x{ch.encode().hex()}_"
                             for ch in name[1:])  # fmt: skip


def amqp_queue(name: str) -> str:
    """The AMQP name of a Chute queue (the inverse of `chute_queue`): only an escape `chute_queue` could have
    written (one character it does not keep, in valid UTF-8) is decoded, and only if the result maps back to
    `name`; otherwise the name is itself (a native queue named `a_x41_` is `a_x41_`, not `aA`)."""
    if "_x" not in name:
        return name
    decoded = _ESCAPED.sub(_unescape, name)
    return decoded if decoded != name and chute_queue(decoded) == name else name


def _unescape(match: re.Match) -> str:
    try:
        text = bytes.fromhex(match[1]).decode()
    except UnicodeDecodeError:
        return match[0]
    kept = len(text) != 1 or (text.isascii() and (text.isalnum() or text in "_.-"))
    return match[0] if kept else text


def encode_word(word: str) -> str:
    if _WORD.match(word):
        return word
    return "_" + word.encode().hex()


def decode_word(word: str) -> str:
    if word.startswith("_"):
        try:
            return bytes.fromhex(word[1:]).decode()
        except ValueError:
            return word
    return word


def subject(routing_key: str) -> str | None:
    """The subject a routing key is published with (None: too long to be a subject, so it matches nothing)."""
    text = ".".join(encode_word(word) for word in routing_key.split("."))
    return text if len(text) <= MAX_SUBJECT_CHARS else None


def routing_key(subject_text: str) -> str:
    """The routing key a subject stands for (the inverse of `subject`)."""
    return ".".join(decode_word(word) for word in subject_text.split("."))


ZERO_WORD_PATTERNS = (">", FANOUT_SUBJECT)  # the topic-exchange subscriptions of bindings matching the empty key


def patterns(kind: str, key: str) -> list[str]:
    """The subscription patterns that carry a binding of a direct, fanout or topic exchange."""
    if kind == "fanout":
        return [">"]
    if kind == "direct":
        text = subject(key)
        return [text] if text is not None else []
    return _topic_patterns(key)


def headers_filters(arguments: dict) -> list[dict | None]:
    """The header filters that carry a headers-exchange binding: one for `x-match: all` (None: match all), one
    per header for `x-match: any` (none at all: it matches nothing, as in RabbitMQ)."""
    match = arguments.get("x-match", "all")
    if match not in ("all", "any"):
        raise AmqpError(NOT_IMPLEMENTED, f"headers exchange: x-match {match!r} is not supported ('all' or 'any')")
    spec = {}
    for name, value in arguments.items():
        if name.startswith("x-"):
            continue
        if not isinstance(value, str):
            raise AmqpError(NOT_IMPLEMENTED, f"headers exchange: only string values can be matched ({name!r})")
        spec[name] = value
    if match == "all":
        return [spec or None]
    return [{name: value} for name, value in spec.items()]


def slot_pattern(slot: int) -> str:
    """The pattern of a headers-exchange subscription slot: each of HEADERS_SUBJECT's words as itself or `*`, so
    every slot matches every headers-exchange publish and the slots of one queue are distinct subscriptions."""
    return ".".join("*" if slot >> i & 1 else "_" for i in range(HEADERS_WORDS))


def _topic_patterns(key: str) -> list[str]:
    words: list[str] = []
    for word in key.split("."):
        if word == "#" and words and words[-1] == "#":
            continue  # '#.#' is '#'
        words.append(word if word in ("*", "#") else encode_word(word))
    results: list[list[str]] = [[]]
    for i, word in enumerate(words):
        if word != "#":
            for each in results:
                each.append(word)
            continue
        if i == len(words) - 1:  # zero words, or one or more ('>')
            results = [each for base in results for each in (list(base), base + [">"])]
            continue
        longest = (MAX_SUBJECT_CHARS + 1) // 2  # a subject of 1-character words
        expanded = []
        for base in results:
            for extra in range(0, longest - len(base)):
                expanded.append(base + ["*"] * extra)
                if len(expanded) > MAX_EXPANSION:
                    raise AmqpError(NOT_IMPLEMENTED, f"binding key {key!r}: '#' before the last word expands to "
                                    f"more than {MAX_EXPANSION} patterns here")  # fmt: skip
        results = expanded
    out = []
    for each in results:
        text = ".".join(each)
        if not text:
            text = FANOUT_SUBJECT  # '#' alone also matches the empty routing key
        elif text == FANOUT_SUBJECT and key:
            continue  # one empty word ('.#' with no words for '#'): no routing key has it (the empty key has none)
        elif text.startswith(">"):
            text = ">"
        if len(text) <= MAX_SUBJECT_CHARS and text not in out:
            out.append(text)
    if ">" in out:
        out = [">"]  # '#' matches everything
    return out


class ExchangeBook:
    """Exchange types and flags, queue flags and the bindings, in memory (metadata.py makes them durable)."""

    def __init__(self) -> None:
        self.exchanges: dict[str, dict] = {}  # name -> {"type", "durable", "auto_delete", "internal", "arguments"}
        self.bindings: list[dict] = []  # {"exchange", "queue", "key", "arguments"} (+ "slots" or "table")
        self.queues: dict[str, dict] = {}  # Chute queue -> {"durable", "auto_delete", "exclusive", "arguments"}
        # exchange-to-exchange bindings: {"source", "destination", "key", "arguments", "table" (typed arguments)}
        self.exchange_bindings: list[dict] = []
        self._front_routed: set[str] | None = None

    def changed(self) -> None:
        self._front_routed = None

    def front_routed(self, exchange: str) -> bool:
        """Whether publishes to `exchange` are routed by the front (routing.py): it has exchange-to-exchange
        bindings, typed headers bindings, or an alternate exchange."""
        routed = self._front_routed
        if routed is None:
            routed = {b["source"] for b in self.exchange_bindings}
            routed.update(b["exchange"] for b in self.bindings if "table" in b)
            routed.update(name for name, declared in self.exchanges.items() if alternate_of(declared))
            self._front_routed = routed
        return exchange in routed

    def bound(self, exchange: str, queue: str) -> list[dict]:
        return [b for b in self.bindings if b["exchange"] == exchange and b["queue"] == queue]

    def find(self, exchange: str, queue: str, key: str, arguments: dict) -> dict | None:
        for each in self.bindings:
            if (each["exchange"], each["queue"], each["key"], each["arguments"]) == (exchange, queue, key, arguments):
                return each
        return None
