"""Broker URLs. Without a URL the client reads CHUTE_URL, then uses the local default `chute://127.0.0.1:6160`.

- `chute://host[:port]`: plain TCP; `chutes://host[:port]`: TLS, verified against the system's CAs (or the
  client's `tls_ca` / $CHUTE_TLS_CA);
- `chute://user:password@host`: a user and password (percent-encode `:`, `@` and `/` in them);
- `chute://:TOKEN@host` or `chute://TOKEN@host`: an API token (or the server's superuser token).
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass

from chute.errors import InvalidArgument
from chute.protocol.frames import DEFAULT_PORT

DEFAULT_URL = f"chute://127.0.0.1:{DEFAULT_PORT}"
SCHEMES = ("chute", "chutes")


@dataclass(frozen=True)
class BrokerUrl:
    host: str
    port: int
    tls: bool = False
    token: str | None = None
    user: str | None = None
    password: str | None = None


def resolve_url(url: str | None = None) -> str:
    """`url`, else $CHUTE_URL, else the local default."""
    return url or os.environ.get("CHUTE_URL") or DEFAULT_URL


def parse(url: str) -> BrokerUrl:
    """The parts of a chute:// or chutes:// URL; InvalidArgument if it is not one."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise InvalidArgument(f"broker URL must look like chute://host:port or chutes://host:port, got {url!r}")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise InvalidArgument(f"bad port in broker URL {url!r}") from None
    if not parts.hostname:
        raise InvalidArgument(f"no host in broker URL {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise InvalidArgument(f"broker URL takes no path or query: {url!r}")
    user = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    token = None
    if password is None:  # chute://TOKEN@host, the form from before users existed
        token, user = user, None
    elif user is None:  # chute://:TOKEN@host
        token, password = password or None, None
    return BrokerUrl(parts.hostname, port, parts.scheme == "chutes", token, user, password)


def parse_url(url: str) -> tuple[str, int, str | None]:
    """(host, port, token) of a broker URL; InvalidArgument if it is not one. (Kept for callers from before TLS
    and users; `parse` gives every part.)"""
    parsed = parse(url)
    return parsed.host, parsed.port, parsed.token
