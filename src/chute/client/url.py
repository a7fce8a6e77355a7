"""Broker URLs: `chute://[token@]host[:port]`. Without a URL the client reads CHUTE_URL, then uses the local
default `chute://127.0.0.1:6160`."""

from __future__ import annotations

import os
import urllib.parse

from chute.errors import InvalidArgument
from chute.protocol.frames import DEFAULT_PORT

DEFAULT_URL = f"chute://127.0.0.1:{DEFAULT_PORT}"


def resolve_url(url: str | None = None) -> str:
    """`url`, else $CHUTE_URL, else the local default."""
    return url or os.environ.get("CHUTE_URL") or DEFAULT_URL


def parse_url(url: str) -> tuple[str, int, str | None]:
    """(host, port, token) of a chute:// URL; InvalidArgument if it is not one."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "chute":
        raise InvalidArgument(f"broker URL must look like chute://host:port, got {url!r}")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise InvalidArgument(f"bad port in broker URL {url!r}") from None
    if not parts.hostname:
        raise InvalidArgument(f"no host in broker URL {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise InvalidArgument(f"broker URL takes no path or query: {url!r}")
    token = urllib.parse.unquote(parts.username) if parts.username else None
    return parts.hostname, port, token
