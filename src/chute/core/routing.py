"""Topic subjects and subscription patterns.

A subject is dot-separated words (`orders.new.eu`); a word is ASCII letters, digits, `-` or `_`. A pattern is
a subject in which a word may be `*` (exactly one word) and the last word may be `>` (one or more words):
`orders.*.eu` matches `orders.new.eu`, not `orders.new.x.eu`; `orders.>` matches `orders.a` and `orders.a.b`,
not `orders`; `>` alone matches every subject.

`SubjectIndex` maps patterns to values in a word trie, so routing costs grow with the subject's length, not
with the number of subscriptions. Invariants: `match` returns each value at most once, in the order values were
added; its small result cache is cleared by every add and remove.
"""

from __future__ import annotations

import re

from chute.errors import InvalidName

MAX_SUBJECT_CHARS = 255
_WORD = re.compile(r"^[A-Za-z0-9_\-]+$")
_CACHE_MAX = 4096  # distinct subjects remembered per index; cleared wholesale when full


def validate_subject(subject: object) -> str:
    """Return `subject` if it is a valid subject (no wildcards), else raise InvalidName."""
    if not isinstance(subject, str) or not 1 <= len(subject) <= MAX_SUBJECT_CHARS:
        raise InvalidName(f"invalid subject {subject!r}: 1 to {MAX_SUBJECT_CHARS} characters")
    for word in subject.split("."):
        if not _WORD.match(word):
            raise InvalidName(
                f"invalid subject {subject!r}: dot-separated words of letters, digits, '-' or '_' (got {word!r})"
            )
    return subject


def validate_pattern(pattern: object) -> str:
    """Return `pattern` if it is a valid subscription pattern, else raise InvalidName."""
    if not isinstance(pattern, str) or not 1 <= len(pattern) <= MAX_SUBJECT_CHARS:
        raise InvalidName(f"invalid pattern {pattern!r}: 1 to {MAX_SUBJECT_CHARS} characters")
    words = pattern.split(".")
    for i, word in enumerate(words):
        if word == "*":
            continue
        if word == ">":
            if i != len(words) - 1:
                raise InvalidName(f"invalid pattern {pattern!r}: '>' may only be the last word")
            continue
        if not _WORD.match(word):
            raise InvalidName(
                f"invalid pattern {pattern!r}: words of letters, digits, '-' or '_', or '*', or a final '>' "
                f"(got {word!r})"
            )
    return pattern


class Pattern:
    """A compiled pattern; `matches(subject)` says whether a subject falls under it."""

    __slots__ = ("text", "words", "tail")

    def __init__(self, text: str) -> None:
        validate_pattern(text)
        self.text = text
        words = text.split(".")
        self.tail = words[-1] == ">"
        self.words = words[:-1] if self.tail else words

    def matches(self, subject: str) -> bool:
        parts = subject.split(".")
        words = self.words
        if self.tail:
            if len(parts) <= len(words):
                return False
        elif len(parts) != len(words):
            return False
        for word, part in zip(words, parts):
            if word != "*" and word != part:
                return False
        return True


class _Node:
    __slots__ = ("children", "values", "tail_values")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.values: list[tuple[int, object]] = []  # patterns ending here
        self.tail_values: list[tuple[int, object]] = []  # patterns ending here with '>'


class SubjectIndex:
    """Patterns -> values, matched against subjects through a word trie."""

    def __init__(self) -> None:
        self._root = _Node()
        self._order = 0
        self._cache: dict[str, list] = {}

    def add(self, pattern: str, value: object) -> None:
        """Register `value` under `pattern` (the same pair twice is kept once)."""
        words = validate_pattern(pattern).split(".")
        node = self._root
        tail = words[-1] == ">"
        for word in words[:-1] if tail else words:
            node = node.children.setdefault(word, _Node())
        bucket = node.tail_values if tail else node.values
        if not any(v is value for _, v in bucket):
            self._order += 1
            bucket.append((self._order, value))
        self._cache.clear()

    def remove(self, pattern: str, value: object) -> None:
        """Forget `value` under `pattern`; a pair that is not there is ignored."""
        words = pattern.split(".")
        tail = words[-1] == ">"
        path = [self._root]
        for word in words[:-1] if tail else words:
            child = path[-1].children.get(word)
            if child is None:
                return
            path.append(child)
        node = path[-1]
        if tail:
            node.tail_values = [(o, v) for o, v in node.tail_values if v is not value]
        else:
            node.values = [(o, v) for o, v in node.values if v is not value]
        for parent, word, child in reversed(list(zip(path, words, path[1:]))):
            if child.children or child.values or child.tail_values:
                break
            del parent.children[word]
        self._cache.clear()

    def match(self, subject: str) -> list:
        """Values whose pattern matches `subject`, each once, in the order they were added."""
        cached = self._cache.get(subject)
        if cached is not None:
            return cached
        found: list[tuple[int, object]] = []
        parts = subject.split(".")
        self._walk(self._root, parts, 0, found)
        found.sort(key=lambda item: item[0])
        seen: set[int] = set()
        result = []
        for _, value in found:
            if id(value) not in seen:
                seen.add(id(value))
                result.append(value)
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[subject] = result
        return result

    def _walk(self, node: _Node, parts: list[str], i: int, found: list) -> None:
        if i < len(parts):
            found.extend(node.tail_values)  # '>' needs at least one more word: parts[i:] is non-empty
            for key in (parts[i], "*"):
                child = node.children.get(key)
                if child is not None:
                    self._walk(child, parts, i + 1, found)
        else:
            found.extend(node.values)
