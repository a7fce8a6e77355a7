"""PostgreSQL URLs in messages: name the server, never the password.

`describe("postgresql://app:secret@db1:5432,db2/chute?sslmode=require")` is `db1:5432,db2/chute` (what an
operator needs to see which database a message is about); `redact(text)` removes the password of every
postgresql:// URL in a text (driver messages sometimes repeat the URL).
"""

from __future__ import annotations

import re
from urllib.parse import unquote

_PASSWORD = re.compile(r"(postgres(?:ql)?://[^:/@\s]*):[^@\s]*@")


def describe(url: str) -> str:
    """`hosts/database` of a libpq URL (user, password and parameters left out)."""
    rest = url.split("://", 1)[-1]
    rest = rest.split("?", 1)[0]
    hosts, _, database = rest.rpartition("@")[2].partition("/")
    return f"{unquote(hosts) or 'localhost'}/{unquote(database) or '(default database)'}"


def redact(text: str) -> str:
    """`text` with the password of any postgresql:// URL in it replaced by `***`."""
    return _PASSWORD.sub(r"\1:***@", text)
