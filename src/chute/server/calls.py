"""The management calls a client may make with CALL, and the checking of their arguments.

A CALL names a method of `chute.Broker` and gives keyword arguments. Only the methods in `CALLS` may be called.
Before the call, the arguments are bound to the method's signature and converted (strictly) to the types its
annotations give, so a wrong name, a missing argument or a wrong type is `invalid_argument`, never an internal
error. Arguments the method takes through `**kwargs` (queue and topic settings) are checked by the method itself.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any

import msgspec

from chute.broker import Broker
from chute.errors import InvalidArgument

CALLS = frozenset({
    "create_queue", "update_queue", "delete_queue", "purge_queue", "list_queues", "queue_stats",
    "create_topic", "update_topic", "delete_topic", "list_topics", "subscribe", "update_subscription",
    "unsubscribe", "peek", "redrive", "topic_info", "queue_info", "route", "dead_letter_sources",
})  # fmt: skip


def _argument_type(name: str) -> type[msgspec.Struct]:
    method = getattr(Broker, name)
    hints = typing.get_type_hints(method)
    fields = []
    for parameter in list(inspect.signature(method).parameters.values())[1:]:  # not self
        if parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
            continue
        default = msgspec.NODEFAULT if parameter.default is parameter.empty else parameter.default
        fields.append((parameter.name, hints.get(parameter.name, Any), default))
    return msgspec.defstruct(f"{name}_arguments", fields, kw_only=True)


_ARGUMENT_TYPES = {name: _argument_type(name) for name in CALLS}


def check_call(method: str, args: dict[str, Any]) -> None:
    """Raise InvalidArgument unless `method(**args)` is an allowed call with arguments of the right types."""
    if method not in CALLS:
        raise InvalidArgument(f"unknown call {method!r}")
    if "settings" in args:
        raise InvalidArgument("give settings as keywords (lease_s=..., ...), not as a 'settings' object")
    try:
        inspect.signature(getattr(Broker, method)).bind(None, **args)
    except TypeError as exc:
        raise InvalidArgument(f"{method}: {exc}") from None
    kind = _ARGUMENT_TYPES[method]
    known = {key: value for key, value in args.items() if key in kind.__struct_fields__}
    try:
        msgspec.convert(known, kind)
    except msgspec.ValidationError as exc:
        raise InvalidArgument(f"{method}: {exc}") from None
