"""Who is calling, and may they do this? (Users, API tokens and permissions on name patterns.)

THE INTERFACE OTHER MODULES USE (stable; the auth work fills in the implementation):

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

Rules of thumb for callers: authorize *before* touching the broker, so a refused request changes nothing;
filter lists with `can_see`.

Invariant (for now): auth is off, every caller is ANONYMOUS and may do everything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import msgspec

from chute.errors import Forbidden

if TYPE_CHECKING:
    from aiohttp import web

    from chute.broker import Broker

Permission = Literal["publish", "consume", "manage"]
Kind = Literal["queue", "topic"]
PERMISSIONS: tuple[Permission, ...] = ("publish", "consume", "manage")


class Principal(msgspec.Struct, frozen=True):
    """An authenticated caller: a user (by password or API token) or `anonymous` when auth is off."""

    name: str
    superuser: bool = False

    def allows(self, permission: Permission, kind: Kind, name: str) -> bool:
        return self.superuser

    def can_see(self, kind: Kind, name: str) -> bool:
        return self.superuser


ANONYMOUS = Principal(name="anonymous", superuser=True)


async def authenticate(request: web.Request) -> Principal:
    return ANONYMOUS


def check(principal: Principal, permission: Permission, kind: Kind, name: str) -> None:
    if not principal.allows(permission, kind, name):
        raise Forbidden(f"{principal.name} may not {permission} {kind} {name!r}")


async def authorize(request: web.Request, permission: Permission, kind: Kind, name: str) -> Principal:
    principal = await authenticate(request)
    check(principal, permission, kind, name)
    return principal


def dest_kind(broker: Broker, dest: str) -> Kind:
    return "topic" if dest in broker.core.topics else "queue"


async def login(request: web.Request, user: str, password: str) -> tuple[str, float]:
    """A dashboard session token for `user` (for `Authorization: Bearer`) and how long it lasts, in seconds;
    Unauthenticated if the password is wrong."""
    return "anonymous", 3600.0


def whoami(request: web.Request, principal: Principal) -> dict:
    """What `GET /api/v1/whoami` answers: name, auth_enabled, superuser, permissions."""
    return {"name": principal.name, "auth_enabled": False, "superuser": principal.superuser, "permissions": []}
