"""Header filters of a subscription: which messages (by their headers) a subscription takes.

A filter maps header names to conditions, all of which must hold:

    {"region": "eu"}                          shorthand for {"eq": "eu"}
    {"region": {"in": ["eu", "uk"]}}          one of
    {"trace": {"exists": true}}               present (false: absent)
    {"sku": {"prefix": "AB-"}}                starts with
    {"amount": {"range": {"gte": 10, "lt": 100}}}   numeric; a value that is not a number does not match

Invariant: `compile_filter` either returns a filter whose `spec` is plain, normalised data (safe to store and
compare) or raises InvalidArgument naming the header and the problem; `matches` never raises.
"""

from __future__ import annotations

import math

from chute.errors import InvalidArgument

_RANGE_KEYS = {"gt", "gte", "lt", "lte"}
_OPERATORS = {"eq", "in", "exists", "prefix", "range"}
MAX_CONDITIONS = 32
MAX_IN_VALUES = 256


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _normalise(header: str, condition: object) -> dict:
    if isinstance(condition, str):
        return {"eq": condition}
    if not isinstance(condition, dict) or len(condition) != 1:
        raise InvalidArgument(f"filter on header {header!r}: give one operator of {sorted(_OPERATORS)} or a string")
    [(op, arg)] = condition.items()
    if op == "eq" or op == "prefix":
        if not isinstance(arg, str):
            raise InvalidArgument(f"filter on header {header!r}: {op!r} takes a string, got {arg!r}")
    elif op == "in":
        if not isinstance(arg, list) or not arg or len(arg) > MAX_IN_VALUES or not all(isinstance(v, str) for v in arg):
            raise InvalidArgument(f"filter on header {header!r}: 'in' takes 1 to {MAX_IN_VALUES} strings")
        arg = sorted(set(arg))
    elif op == "exists":
        if not isinstance(arg, bool):
            raise InvalidArgument(f"filter on header {header!r}: 'exists' takes true or false, got {arg!r}")
    elif op == "range":
        arg = _check_range(header, arg)
    else:
        raise InvalidArgument(f"filter on header {header!r}: unknown operator {op!r}; use one of {sorted(_OPERATORS)}")
    return {op: arg}


def _check_range(header: str, arg: object) -> dict:
    if not isinstance(arg, dict) or not arg or not set(arg) <= _RANGE_KEYS:
        raise InvalidArgument(f"filter on header {header!r}: 'range' takes some of {sorted(_RANGE_KEYS)}")
    if not all(_is_number(v) for v in arg.values()):
        raise InvalidArgument(f"filter on header {header!r}: range bounds must be finite numbers")
    if ("gt" in arg and "gte" in arg) or ("lt" in arg and "lte" in arg):
        raise InvalidArgument(f"filter on header {header!r}: give gt or gte, lt or lte, not both")
    low = arg.get("gt", arg.get("gte"))
    high = arg.get("lt", arg.get("lte"))
    if low is not None and high is not None and (low > high or (low == high and ("gt" in arg or "lt" in arg))):
        raise InvalidArgument(f"filter on header {header!r}: the range is empty")
    return dict(arg)


class HeaderFilter:
    """A compiled filter; `spec` is its normalised plain-data form (empty: matches everything)."""

    __slots__ = ("spec", "_checks")

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self._checks = [(header, *next(iter(cond.items()))) for header, cond in spec.items()]

    def matches(self, headers: dict[str, str]) -> bool:
        for header, op, arg in self._checks:
            value = headers.get(header)
            if op == "exists":
                if (value is not None) != arg:
                    return False
            elif value is None:
                return False
            elif op == "eq":
                if value != arg:
                    return False
            elif op == "in":
                if value not in arg:
                    return False
            elif op == "prefix":
                if not value.startswith(arg):
                    return False
            elif not _in_range(value, arg):
                return False
        return True


def _in_range(value: str, bounds: dict) -> bool:
    try:
        number = float(value)
    except ValueError:
        return False
    if not math.isfinite(number):
        return False
    return (
        ("gt" not in bounds or number > bounds["gt"])
        and ("gte" not in bounds or number >= bounds["gte"])
        and ("lt" not in bounds or number < bounds["lt"])
        and ("lte" not in bounds or number <= bounds["lte"])
    )


def compile_filter(spec: object) -> HeaderFilter:
    """Validate a filter spec and compile it. None or {} matches every message."""
    if spec is None:
        return HeaderFilter({})
    if not isinstance(spec, dict):
        raise InvalidArgument(f"a header filter is a dict of header name to condition, got {type(spec).__name__}")
    if len(spec) > MAX_CONDITIONS:
        raise InvalidArgument(f"a header filter has at most {MAX_CONDITIONS} conditions")
    normalised = {}
    for header, condition in spec.items():
        if not isinstance(header, str) or not header:
            raise InvalidArgument(f"filter header names must be non-empty strings, got {header!r}")
        normalised[header] = _normalise(header, condition)
    return HeaderFilter(normalised)
