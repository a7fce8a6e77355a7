"""What every SQS action shares: the call context, the action registry, the SQS state a server keeps in memory,
queue URLs, and parameter checks that answer with AWS's error codes.

Invariant: a queue named by a request is resolved (`queue_of`) and authorized before an action changes anything.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import secrets
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from chute.server.sqs.errors import SqsError

if TYPE_CHECKING:
    from chute.broker import Broker
    from chute.core.queue import Queue
    from chute.server.app import Server
    from chute.server.auth import Permission, Principal

log = logging.getLogger("chute.server.sqs")

DEFAULT_ACCOUNT_ID = "000000000000"
DEFAULT_REGION = "us-east-1"
HANDLE_KEY_FILE = "sqs-receipt-key"
HANDLE_KEY_BYTES = 32
PURGE_INTERVAL_S = 60.0  # AWS: one PurgeQueue per queue every 60 seconds (PurgeQueueInProgress otherwise)


@dataclass
class SqsContext:
    """Who calls, and how they addressed us (queue URLs are built from `base_url` and `account_id`)."""

    server: Server
    principal: Principal
    base_url: str
    """`http://host:port` as the client addressed us (no trailing slash)."""
    account_id: str = DEFAULT_ACCOUNT_ID
    region: str = DEFAULT_REGION
    extra: dict[str, Any] = field(default_factory=dict)
    """Per-request values from the protocol module. `disconnected`: a callable that tells whether the client
    hung up (a long poll then gives its messages back)."""

    @property
    def broker(self) -> Broker:
        """The broker: on a cluster node, the broker of the shard that holds the request's queue when it is here
        (cluster/http_forward.py), else the node's router."""
        return self.extra.get("broker") or self.server.broker

    @functools.cached_property
    def state(self) -> SqsState:
        return sqs_state(self.server)  # (looked up once per request: actions use it once per message)

    def queue_url(self, name: str) -> str:
        return f"{self.base_url}/{self.account_id}/{name}"

    def arn(self, name: str) -> str:
        return f"arn:aws:sqs:{self.region}:{self.account_id}:{name}"

    def disconnected(self) -> bool:
        check = self.extra.get("disconnected")
        return bool(check is not None and check())


Handler = Callable[[SqsContext, dict], Awaitable[dict]]
ACTIONS: dict[str, Handler] = {}


def action(handler: Handler) -> Handler:
    """Register a handler under its function name in CamelCase (`send_message` -> `SendMessage`)."""
    ACTIONS["".join(part.capitalize() for part in handler.__name__.split("_"))] = handler
    return handler


@dataclass
class PurgeMark:
    """The latest PurgeQueue of a queue: which queue (its durable id: a queue of the same name made later is
    another), when (on `SqsState.clock`), and the first receipt the broker had not yet issued then (every
    receipt below it, from this run, named a message that the purge removed or that was gone already)."""

    queue_id: int
    at: float
    receipts_below: int


class SqsState:
    """What the SQS API keeps about one server: the key of its receipt handles (in `<data_dir>/sqs-receipt-key`,
    so that handles from before a restart are recognized as outdated rather than forged), and in memory only:
    message move tasks and the latest purge of each queue (`purges`, forgotten when its queue is gone). Nothing
    here is kept per message (a message's first receive time lives on its entry in the core, and goes with it).
    `clock` and `purge_interval_s` time PurgeQueueInProgress; tests replace them."""

    def __init__(self) -> None:
        self.handle_key = secrets.token_bytes(HANDLE_KEY_BYTES)
        self.key_loaded = False
        self.key_lock = asyncio.Lock()
        self.move_tasks: list = []  # movetasks.MoveTask, oldest first
        self.purges: dict[str, PurgeMark] = {}
        self.purge_interval_s = PURGE_INTERVAL_S
        self.clock: Callable[[], float] = time.monotonic


_STATES: weakref.WeakKeyDictionary[object, SqsState] = weakref.WeakKeyDictionary()


def sqs_state(server: object) -> SqsState:
    state = _STATES.get(server)
    if state is None:
        state = _STATES[server] = SqsState()
    return state


async def prepared_state(server: Server) -> SqsState:
    """The server's SQS state, with its receipt-handle key loaded (or made) on first use, off the event loop."""
    state = sqs_state(server)
    if not state.key_loaded:
        async with state.key_lock:
            if not state.key_loaded:
                key = await asyncio.to_thread(_handle_key, getattr(server.config, "data_dir", None))
                state.handle_key, state.key_loaded = key or state.handle_key, True
    return state


def _handle_key(data_dir: str | None) -> bytes | None:
    """The key in `<data_dir>/sqs-receipt-key`, made (mode 0600) if missing; None if it cannot be kept."""
    if not data_dir:
        return None
    path = os.path.join(data_dir, HANDLE_KEY_FILE)
    try:
        with open(path, "rb") as file:
            key = file.read(HANDLE_KEY_BYTES + 1)
        if len(key) == HANDLE_KEY_BYTES:
            return key
        log.warning("%s is damaged: receipt handles from before this start will be refused", path)
        return None
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot read %s (%s): receipt handles will not outlive this run", path, exc)
        return None
    key = secrets.token_bytes(HANDLE_KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it meanwhile
        return _handle_key(data_dir) if os.path.getsize(path) == HANDLE_KEY_BYTES else None
    except OSError as exc:
        log.warning("cannot write %s (%s): receipt handles will not outlive this run", path, exc)
        return None
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


# -- queues -----------------------------------------------------------------------------------------------------


def queue_name_of_url(url: object) -> str:
    """The queue name in a queue URL (`http://host:port/<account>/<name>`); a bare name is accepted too."""
    if not isinstance(url, str) or not url:
        raise SqsError("MissingParameter", "The request must contain the parameter QueueUrl.")
    path = urlsplit(url).path if "://" in url else url
    name = unquote(path.rstrip("/").rsplit("/", 1)[-1])
    if not name:
        raise SqsError("InvalidAddress", f"The address {url} is not valid for this endpoint.")
    return name


def queue_of(ctx: SqsContext, params: dict, permission: Permission | None) -> Queue:
    """The queue named by `QueueUrl`, authorized for `permission` (None: any permission, i.e. visible)."""
    name = queue_name_of_url(params.get("QueueUrl"))
    queue = ctx.broker.core.queues.get(name)
    if queue is None or queue.ephemeral:
        raise SqsError("QueueDoesNotExist", "The specified queue does not exist.")
    authorize(ctx, permission, name)
    return queue


def authorize(ctx: SqsContext, permission: Permission | None, name: str) -> None:
    if permission is None:
        if not ctx.principal.can_see("queue", name):
            raise SqsError("AccessDenied", f"{ctx.principal.name} may not access queue {name!r}.")
        return
    if not ctx.principal.allows(permission, "queue", name):
        raise SqsError("AccessDenied", f"{ctx.principal.name} may not {permission} queue {name!r}.")


# -- parameters -------------------------------------------------------------------------------------------------


def integer(params: dict, name: str, low: int, high: int, default: int | None = None) -> int | None:
    """An integer parameter in [low, high] (JSON numbers or query strings), else InvalidParameterValue."""
    value = params.get(name)
    if value is None:
        return default
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            number = None
    if number is None or not low <= number <= high:
        raise SqsError("InvalidParameterValue", f"Value {value} for parameter {name} is invalid. Reason: Must be "
                       f"between {low} and {high}, if provided.")  # fmt: skip
    return number


def string_list(params: dict, name: str) -> list[str]:
    value = params.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise SqsError("InvalidParameterValue", f"{name} must be a list of strings.")
    return value


def string_map(params: dict, name: str) -> dict[str, str]:
    value = params.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise SqsError("InvalidParameterValue", f"{name} must be a map of strings to strings.")
    return value


def required_string(params: dict, name: str) -> str:
    value = params.get(name)
    if value is None or value == "":
        raise SqsError("MissingParameter", f"The request must contain the parameter {name}.")
    if not isinstance(value, str):
        raise SqsError("InvalidParameterValue", f"Value {value} for parameter {name} is invalid.")
    return value
