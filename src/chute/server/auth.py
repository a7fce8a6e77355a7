"""Who is calling, and may they do this? (Users, API tokens and permissions on name patterns.)

THE INTERFACE OTHER MODULES USE (stable):

    Permission = "publish" | "consume" | "manage"
    Kind       = "queue" | "topic"

    principal.allows(permission, kind, name) -> bool
    principal.can_see(kind, name) -> bool           # any permission on it: shown in lists

    await authenticate(request) -> Principal          # HTTP: from the Authorization header
                                                      # (Bearer <token> or Basic user:password);
                                                      # raises Unauthenticated (401) if auth is on and the
                                                      # credentials are missing or wrong
    await authorize(request, permission, kind, name) -> Principal
                                                      # authenticate, then Forbidden (403) unless allowed
    check(principal, permission, kind, name) -> None  # Forbidden unless allowed (native sessions)
    dest_kind(broker, dest) -> Kind                   # a publish destination is a topic or a queue
    await login(request, user, password) -> (session token, seconds it lasts)
    whoami(request, principal) -> dict
    lookup_access_key(server, access_key_id) -> (secret, Principal) | None    # for SigV4 (SQS API)

Rules of thumb for callers: authorize *before* touching the broker, so a refused request changes nothing;
filter lists with `can_see`.

How it works: each `Server` has one `Authenticator` (`server.auth`). Auth is *on* when the config has a `token`
(a superuser token, as before users existed), config `[[users]]`, or a users file `<data_dir>/users.json` exists
(server/users.py) — even one listing nobody, so deleting the last user locks everyone out rather than letting
everyone in. With auth off every caller is ANONYMOUS, a superuser. Credentials:
- `Basic user:password` / HELLO `user`+`password`: scrypt, run in a worker thread (never on the event loop), at
  most `MAX_CONCURRENT_HASHES` at a time; a successful check is cached for `PASSWORD_CACHE_S` under a SHA-256 of
  user and password, so HTTP Basic on every request costs one hash lookup. The cache is dropped when users change.
- `Bearer cht_...` / HELLO `token`: an API token, looked up by its SHA-256; `Bearer chs_...`: a dashboard session
  from `login`, kept in memory (a restart signs everyone out); anything else is compared with the config token.
Invariants: a principal is recomputed from the current users at each authentication, so a revoked token, deleted
user or changed grant applies to the next request. A native connection keeps the principal of its HELLO until
the users change: then every connection whose credential was revoked, whose password or permissions changed, or
which came in anonymously before auth was turned on is closed with `unauthenticated` (session heartbeats look at
the file every `IDLE_RECHECK_S`, so this happens within seconds even on a connection that sends nothing).
Unknown users cost the same hash as known ones (no user enumeration by timing). After `failed_login_limit` wrong
passwords in a row for one name (known or not), attempts for that name are refused unchecked for a pause that
starts at `LOGIN_BACKOFF_FIRST_S` and doubles up to `LOGIN_BACKOFF_MAX_S`; a success resets it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import msgspec

from chute.errors import Forbidden, InvalidArgument, Unauthenticated
from chute.server.users import Grant, User, UsersFile, check_users, hash_password, token_digest, verify_password

if TYPE_CHECKING:
    from aiohttp import web

    from chute.broker import Broker
    from chute.protocol.messages import Hello
    from chute.server.config import ServerConfig

Permission = Literal["publish", "consume", "manage"]
Kind = Literal["queue", "topic"]
PERMISSIONS: tuple[Permission, ...] = ("publish", "consume", "manage")

SESSION_PREFIX = "chs_"
SESSION_S = 8 * 3600.0  # a dashboard session lasts a working day
MAX_SESSIONS = 10_000  # the oldest is dropped beyond this (memory stays bounded whatever logins come)
PASSWORD_CACHE_S = 60.0  # how long a verified user+password skips scrypt
PASSWORD_CACHE_SIZE = 1024
MAX_CONCURRENT_HASHES = 2  # scrypt at once: a flood of bad passwords cannot take every core
CHALLENGE = 'Basic realm="chute", Bearer'
IDLE_RECHECK_S = 3.0  # how often open native connections alone make the server look at the users file
LOGIN_BACKOFF_FIRST_S = 1.0  # the pause after `failed_login_limit` wrong passwords in a row; it doubles with each more
LOGIN_BACKOFF_MAX_S = 60.0
FAILURES_FORGOTTEN_S = 15 * 60.0  # a name with no wrong password for this long starts again from zero
FAILED_NAMES_KEPT = 10_000  # the oldest name is forgotten beyond this (memory stays bounded)
TOKEN_PRINCIPAL = "token"  # the name of the config file's superuser token


class Principal(msgspec.Struct, frozen=True):
    """An authenticated caller: a user (by password or API token) or `anonymous` when auth is off."""

    name: str
    superuser: bool = False
    grants: tuple[Grant, ...] = ()

    def allows(self, permission: Permission, kind: Kind, name: str) -> bool:
        return self.superuser or any(grant.matches(permission, kind, name) for grant in self.grants)

    def can_see(self, kind: Kind, name: str) -> bool:
        return self.superuser or any(grant.covers(kind, name) for grant in self.grants)


ANONYMOUS = Principal(name="anonymous", superuser=True)


def principal_of(user: User) -> Principal:
    return Principal(name=user.name, superuser=user.superuser, grants=tuple(user.grants))


class Authenticator:
    """The users a server knows (config + users file) and the checks of credentials against them."""

    def __init__(self, config: ServerConfig) -> None:
        self.token = config.token
        self.static = {user.name: user for user in check_users(list(config.users), "config [[users]]")}
        if config.store is not None:  # a cluster node: the users every node shares, in its database
            from chute.server.users_table import UsersTable

            self.file: UsersFile | UsersTable = UsersTable(config.store)
        else:
            self.file = UsersFile(config.data_dir)
        self.users: dict[str, User] = dict(self.static)
        self._by_token: dict[str, User] = {}
        self._by_key: dict[str, tuple[str, User]] = {}
        self._passwords: OrderedDict[bytes, float] = OrderedDict()  # digest of user+password -> valid until
        self._sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()  # token -> (user, expires at)
        self._hashing = asyncio.Semaphore(MAX_CONCURRENT_HASHES)
        self.failed_login_limit = config.failed_login_limit
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()  # name -> (wrong in a row, retry at)
        self.clock: Callable[[], float] = time.monotonic  # of the failed-login limit (tests move it)
        self._refreshing: asyncio.Task | None = None
        self._dummy_hash: str | None = None
        self._kick: asyncio.Future | None = None
        self.on_change: list[Callable[[], None]] = []  # called after the users changed (server/app.py)
        self._index()

    async def close(self) -> None:
        """Let go of what the users' source holds (a cluster's database connection), after any refresh ends."""
        if self._refreshing is not None:
            with contextlib.suppress(Exception):
                await self._refreshing
        close = getattr(self.file, "close", None)
        if close is not None:
            await asyncio.to_thread(close)

    @property
    def enabled(self) -> bool:
        return self.token is not None or bool(self.users) or self.file.exists

    # -- the users ----------------------------------------------------------------------------------------

    def load(self) -> None:
        """Read the users file now (blocking; at startup). InvalidArgument if it is malformed."""
        self.file.refresh()
        if self.file.error is not None:
            raise InvalidArgument(self.file.error)
        self._index()

    async def refresh(self) -> None:
        """Pick up changes of the users file: a stat at most once a second, in a worker thread."""
        if self._refreshing is None and self.file.due(time.monotonic()):
            self.file._checked_at = time.monotonic()  # one refresh at a time
            self._refreshing = asyncio.ensure_future(asyncio.to_thread(self.file.refresh))
        if self._refreshing is not None:
            task = self._refreshing
            try:
                changed = await asyncio.shield(task)
            finally:
                if task.done() and self._refreshing is task:
                    self._refreshing = None
            if changed:
                self._index()

    def _index(self) -> None:
        users = {user.name: user for user in self.file.users}
        users.update(self.static)  # the config's entries win over the file's
        self.users = users
        self._by_token = {token.sha256: user for user in users.values() for token in user.tokens}
        self._by_key = {key.id: (key.secret, user) for user in users.values() for key in user.access_keys}
        self._passwords.clear()
        for callback in self.on_change:
            callback()

    def poll(self, every_s: float | None = None) -> None:
        """For synchronous callers (a session's heartbeat, SigV4): start a refresh of the users file if the last
        look is older than `every_s` (default: the file's recheck interval, a second), so changes are noticed
        even when no request authenticates."""
        if self._refreshing is None and self.file.due(time.monotonic(), every_s):
            self._kick = asyncio.ensure_future(self.refresh())

    def credential(self, hello: Hello) -> tuple:
        """What a native connection that was just accepted authenticated with, for `still_valid` later."""
        if not self.enabled:
            return ("anonymous",)
        if hello.user is not None:
            user = self.users.get(hello.user)
            return ("password", hello.user, user.password_hash if user is not None else None)
        token = hello.token or ""
        if token.startswith(SESSION_PREFIX):
            return ("session", token)
        digest = token_digest(token)
        return ("token", digest) if digest in self._by_token else ("config",)

    def still_valid(self, principal: Principal, credential: tuple) -> bool:
        """Whether a connection authenticated as `principal` with `credential` may go on with the current users:
        its credential still exists and it would get exactly the same principal now."""
        kind = credential[0]
        if kind == "anonymous":
            return not self.enabled
        if kind == "config":
            return True  # the config's token changes only with a restart
        if kind == "password":
            user = self.users.get(credential[1])
            current = user is not None and user.password_hash == credential[2]
        elif kind == "token":
            user = self._by_token.get(credential[1])
            current = user is not None
        else:  # a dashboard session token
            entry = self._sessions.get(credential[1])
            user = self.users.get(entry[0]) if entry is not None else None
            current = user is not None
        return current and principal_of(user) == principal

    # -- credentials --------------------------------------------------------------------------------------

    async def by_password(self, name: str, password: str) -> Principal:
        await self.refresh()
        key = hashlib.sha256(f"{name}\0{password}".encode()).digest()
        now = time.monotonic()
        user = self.users.get(name)
        valid_until = self._passwords.get(key)
        if user is not None and valid_until is not None and valid_until > now:
            self._passwords.move_to_end(key)
            return principal_of(user)
        self._check_backoff(name)
        stored = user.password_hash if user is not None else None
        if stored is None:  # spend the same time as a real check: no user enumeration by timing
            if self._dummy_hash is None:
                self._dummy_hash = await asyncio.to_thread(hash_password, secrets.token_hex(8))
            stored = self._dummy_hash
        async with self._hashing:
            self._check_backoff(name)  # again: attempts that queued for a hash while others failed
            ok = await asyncio.to_thread(verify_password, password, stored)
        if not ok or user is None or user.password_hash is None or self.users.get(name) is not user:
            self._failed(name)
            raise Unauthenticated(f"wrong user name or password for {name!r}")
        self._failures.pop(name, None)
        self._passwords[key] = time.monotonic() + PASSWORD_CACHE_S
        while len(self._passwords) > PASSWORD_CACHE_SIZE:
            self._passwords.popitem(last=False)
        return principal_of(user)

    def _check_backoff(self, name: str) -> None:
        """Unauthenticated, without checking the password, while `name` is paused after too many wrong ones."""
        entry = self._failures.get(name)
        if entry is not None:
            wait = entry[1] - self.clock()
            if wait > 0:
                raise Unauthenticated(f"too many wrong passwords for {name!r}: try again in {math.ceil(wait)} s")

    def _failed(self, name: str) -> None:
        """Count a wrong password for `name` (known or not): from the limit on, the next attempt must wait."""
        if not self.failed_login_limit:
            return
        now = self.clock()
        count, retry_at = self._failures.pop(name, (0, now))
        if now - retry_at > FAILURES_FORGOTTEN_S:
            count = 0
        count += 1
        over = count - self.failed_login_limit
        pause = 0.0 if over < 0 else min(LOGIN_BACKOFF_MAX_S, LOGIN_BACKOFF_FIRST_S * 2 ** min(over, 16))
        self._failures[name] = (count, now + pause)
        while len(self._failures) > FAILED_NAMES_KEPT:
            self._failures.popitem(last=False)

    async def by_token(self, token: str) -> Principal:
        await self.refresh()
        if token.startswith(SESSION_PREFIX):
            entry = self._sessions.get(token)
            if entry is not None and entry[1] > time.monotonic() and entry[0] in self.users:
                return principal_of(self.users[entry[0]])
            self._sessions.pop(token, None)
            raise Unauthenticated("the session has expired or is unknown: log in again")
        user = self._by_token.get(token_digest(token))
        if user is not None:
            return principal_of(user)
        if self.token is not None and hmac.compare_digest(token.encode(), self.token.encode()):
            return Principal(name=TOKEN_PRINCIPAL, superuser=True)
        raise Unauthenticated("the token is not valid (revoked, or never issued)")

    async def hello(self, hello: Hello) -> Principal:
        """The principal of a native connection's HELLO; Unauthenticated if auth is on and it has no valid
        credentials."""
        await self.refresh()
        if not self.enabled:
            return ANONYMOUS
        if hello.user is not None:
            return await self.by_password(hello.user, hello.password or "")
        if hello.token:
            return await self.by_token(hello.token)
        raise Unauthenticated("this server requires credentials: a user and password, or a token")

    async def http(self, header: str | None) -> Principal:
        """The principal of an HTTP request's `Authorization` header."""
        await self.refresh()
        if not self.enabled:
            return ANONYMOUS
        if not header:
            raise Unauthenticated("this server requires credentials (Authorization: Basic or Bearer)")
        scheme, _, value = header.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and value:
            return await self.by_token(value)
        if scheme.lower() == "basic" and value:
            try:
                name, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                name, sep, password = "", "", ""
            if sep:
                return await self.by_password(name, password)
        raise Unauthenticated("malformed Authorization header: use Basic user:password or Bearer <token>")

    async def login(self, name: str, password: str) -> tuple[str, float]:
        principal = await self.by_password(name, password)
        token = SESSION_PREFIX + secrets.token_urlsafe(32)
        self._sessions[token] = (principal.name, time.monotonic() + SESSION_S)
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return token, SESSION_S

    def access_key(self, key_id: str) -> tuple[str, Principal] | None:
        self.poll()  # a sync caller: the refresh serves the next request
        found = self._by_key.get(key_id)
        return None if found is None else (found[0], principal_of(found[1]))


# -- the functions other modules call ------------------------------------------------------------------------


def _server(request: web.Request):
    from chute.server.http import SERVER_KEY  # here: http imports the areas, which import this module

    return request.app[SERVER_KEY]


async def authenticate(request: web.Request) -> Principal:
    from chute.server.http import PRINCIPAL_KEY  # here, like SERVER_KEY: the CLI need not import aiohttp

    principal = request.get(PRINCIPAL_KEY)
    if principal is None:  # once per request, however many times the handler asks
        principal = await _server(request).auth.http(request.headers.get("Authorization"))
        request[PRINCIPAL_KEY] = principal
    return principal


def check(principal: Principal, permission: Permission, kind: Kind, name: str) -> None:
    if not principal.allows(permission, kind, name):
        raise Forbidden(f"{principal.name} lacks the {permission} permission on {kind} {name!r}")


async def authorize(request: web.Request, permission: Permission, kind: Kind, name: str) -> Principal:
    principal = await authenticate(request)
    check(principal, permission, kind, name)
    return principal


def dest_kind(broker: Broker, dest: str) -> Kind:
    kind_of = getattr(broker, "kind_of", None)  # a cluster's router knows kinds from placement
    if kind_of is not None:
        return kind_of(dest)
    return "topic" if dest in broker.core.topics else "queue"


async def login(request: web.Request, user: str, password: str) -> tuple[str, float]:
    """A dashboard session token for `user` (for `Authorization: Bearer`) and how long it lasts, in seconds;
    Unauthenticated if the password is wrong. With auth off: a placeholder token that nothing checks."""
    auth = _server(request).auth
    await auth.refresh()
    if not auth.enabled:
        return "anonymous", SESSION_S
    return await auth.login(user, password)


def whoami(request: web.Request, principal: Principal) -> dict:
    """What `GET /api/v1/whoami` answers: name, auth_enabled, superuser, permissions."""
    return {
        "name": principal.name,
        "auth_enabled": _server(request).auth.enabled,
        "superuser": principal.superuser,
        "permissions": [msgspec.to_builtins(grant) for grant in principal.grants],
    }


def lookup_access_key(server, access_key_id: str) -> tuple[str, Principal] | None:
    """The secret and principal of an AWS-style access key (SigV4 needs the secret itself, so access keys are
    stored as secrets, unlike passwords and tokens); None if unknown. Reflects the users file as of the last
    refresh (at most a second old while requests come in)."""
    return server.auth.access_key(access_key_id)


def challenge_middleware():
    """An aiohttp middleware: every 401 carries `WWW-Authenticate`, whichever area answered it. (A factory, so
    that importing this module does not import aiohttp: the CLI imports the server package.)"""
    from aiohttp import web

    @web.middleware
    async def challenge(request: web.Request, handler):
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status == 401 and "WWW-Authenticate" not in exc.headers:
                exc.headers["WWW-Authenticate"] = CHALLENGE
            raise
        if response.status == 401 and "WWW-Authenticate" not in response.headers:
            response.headers["WWW-Authenticate"] = CHALLENGE
        return response

    return challenge
