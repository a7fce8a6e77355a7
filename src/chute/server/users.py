"""The user store: users with hashed passwords, API tokens, AWS-style access keys and grants.

Users come from two places, with the same schema (`User`):
- the users file `<data_dir>/users.json`, edited by `chute user ...` (`UsersFile.edit`) and re-read by a running
  server when it changes (`UsersFile.current`);
- `[[users]]` entries of the server's TOML config (read-only; they win over a file entry of the same name).

What is stored, and why:
- passwords: `scrypt$<log2 n>$<r>$<p>$<salt b64>$<hash b64>` — a slow, salted, memory-hard hash with its
  parameters, so they can be raised later without invalidating old hashes. Verifying costs tens of ms: callers
  run `verify_password` off the event loop.
- API tokens: `cht_` + 32 random bytes (urlsafe base64), shown once; stored as their SHA-256. A token is
  high-entropy, so a fast hash is enough (nobody can brute-force 256 bits), and it keeps token checks cheap.
- access keys (for the SQS API's SigV4): an id `AKCH...` and a secret that *is stored as is*, because SigV4 signs
  with the secret itself (the server must recompute the signature). Protect the users file like a key file.

Invariants: the file is replaced atomically (temp file, fsync, rename, fsync of the directory), so a reader sees
the old or the new version, never a torn one; edits hold an exclusive lock on `users.json.lock`, so concurrent
`chute user` commands do not lose each other's changes; a file that does not load is refused with an error naming
the file and the problem, and a running server keeps the last good version.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import Iterator
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Literal

import msgspec

from chute.errors import InvalidArgument

Permission = Literal["publish", "consume", "manage"]
USERS_FILE = "users.json"
TOKEN_PREFIX = "cht_"
ACCESS_KEY_PREFIX = "AKCH"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")

# scrypt with n=2**14, r=8, p=1 (16 MiB of memory per hash) took 50-75 ms on the 2-core CI machine: slow enough to
# make guessing expensive, fast enough for logins (and HTTP Basic is cached, server/auth.py). The parameters are
# stored with each hash, so raising them later keeps old hashes valid.
SCRYPT_LOG2_N = 14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_MAXMEM = 256 * 2**20


class Grant(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Permissions on the queues or the topics whose names match a glob pattern (`*` matches dots too)."""

    allow: list[Permission]
    queues: str | None = None
    topics: str | None = None

    def check(self) -> Grant:
        if (self.queues is None) == (self.topics is None):
            raise InvalidArgument("a grant names exactly one of queues or topics (a name pattern)")
        if not self.allow:
            raise InvalidArgument("a grant allows at least one of publish, consume, manage")
        return self

    def matches(self, permission: str, kind: str, name: str) -> bool:
        pattern = self.queues if kind == "queue" else self.topics
        return pattern is not None and permission in self.allow and fnmatchcase(name, pattern)

    def covers(self, kind: str, name: str) -> bool:
        pattern = self.queues if kind == "queue" else self.topics
        return pattern is not None and fnmatchcase(name, pattern)


class Token(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    id: str
    """Short public id, to list and revoke the token (not a secret)."""
    sha256: str
    """Hex SHA-256 of the whole token string."""
    created_at: float = 0.0
    label: str = ""


class AccessKey(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    id: str
    secret: str
    """Stored as is: SigV4 needs it to recompute signatures."""
    created_at: float = 0.0


class User(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    name: str
    password_hash: str | None = None
    superuser: bool = False
    grants: list[Grant] = []
    tokens: list[Token] = []
    access_keys: list[AccessKey] = []

    def check(self, where: str) -> User:
        if not NAME_RE.match(self.name):
            raise InvalidArgument(f"{where}: bad user name {self.name!r} (letters, digits, _ . @ -; up to 64)")
        if self.password_hash is not None:
            _parse_hash(self.password_hash, f"{where}: user {self.name!r}")
        for grant in self.grants:
            try:
                grant.check()
            except InvalidArgument as exc:
                raise InvalidArgument(f"{where}: user {self.name!r}: {exc.message}") from None
        return self


class UsersDocument(msgspec.Struct, forbid_unknown_fields=True):
    version: int = 1
    users: list[User] = []


# -- secrets -------------------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hash_password(password: str, *, log2_n: int = SCRYPT_LOG2_N) -> str:
    """The stored form of `password` (slow: run it off the event loop)."""
    if not password:
        raise InvalidArgument("the password must not be empty")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**log2_n, r=SCRYPT_R, p=SCRYPT_P, maxmem=SCRYPT_MAXMEM)
    return f"scrypt${log2_n}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def _parse_hash(stored: str, where: str) -> tuple[int, int, int, bytes, bytes]:
    try:
        scheme, log2_n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            raise ValueError(scheme)
        values = int(log2_n), int(r), int(p), base64.b64decode(salt, validate=True), base64.b64decode(digest)
    except ValueError:
        raise InvalidArgument(f"{where}: password_hash is not an scrypt hash made by `chute user`") from None
    if not (1 <= values[0] <= 20 and 1 <= values[1] <= 32 and 1 <= values[2] <= 16 and values[4]):
        raise InvalidArgument(f"{where}: password_hash has out-of-range scrypt parameters")
    return values


def verify_password(password: str, stored: str) -> bool:
    """Does `password` match the stored hash? (Slow: run it off the event loop.) Constant-time comparison."""
    log2_n, r, p, salt, digest = _parse_hash(stored, "password")
    candidate = hashlib.scrypt(password.encode(), salt=salt, n=2**log2_n, r=r, p=p, maxmem=SCRYPT_MAXMEM,
                               dklen=len(digest))  # fmt: skip
    return hmac.compare_digest(candidate, digest)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(label: str = "") -> tuple[str, Token]:
    """A fresh API token (the secret, shown once) and what is stored of it."""
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return secret, Token(id=secrets.token_hex(4), sha256=token_digest(secret), created_at=time.time(), label=label)


def new_access_key() -> AccessKey:
    return AccessKey(id=ACCESS_KEY_PREFIX + secrets.token_hex(8).upper(), secret=secrets.token_urlsafe(30),
                     created_at=time.time())  # fmt: skip


# -- the file -------------------------------------------------------------------------------------------------


def decode_users(data: bytes, where: str) -> list[User]:
    """The users of a users file's bytes; InvalidArgument naming `where` if malformed."""
    try:
        document = msgspec.json.decode(data, type=UsersDocument)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise InvalidArgument(f"{where} is not a valid users file: {exc}") from None
    return check_users(document.users, where)


def check_users(users: list[User], where: str) -> list[User]:
    seen: set[str] = set()
    for user in users:
        user.check(where)
        if user.name in seen:
            raise InvalidArgument(f"{where}: user {user.name!r} appears twice")
        seen.add(user.name)
    return users


class UsersFile:
    """`<data_dir>/users.json`: read by the server (cheaply re-checked), edited by the CLI."""

    RECHECK_S = 1.0  # a running server looks at the file's stat at most this often

    def __init__(self, data_dir: str | os.PathLike) -> None:
        self.path = Path(data_dir) / USERS_FILE
        self.users: list[User] = []
        self.generation = 0  # bumped whenever `users` changes
        self.error: str | None = None  # why the last reload failed (the previous users stay)
        self.exists = False  # the file exists (even listing nobody: then auth stays on and nobody gets in)
        self._stamp: tuple | None = None
        self._checked_at = -1e9

    def _stat(self) -> tuple | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def due(self, now: float, every_s: float | None = None) -> bool:
        return now - self._checked_at >= (self.RECHECK_S if every_s is None else every_s)

    def refresh(self, now: float | None = None) -> bool:
        """Re-read the file if its stat changed (blocking I/O: a stat, and a read only on change). True if the
        users changed. A malformed file keeps the previous users and records `error`."""
        self._checked_at = time.monotonic() if now is None else now
        stamp = self._stat()
        if stamp == self._stamp:
            return False
        self.exists = stamp is not None
        try:
            users = self.load()
        except (InvalidArgument, OSError) as exc:
            self.error = getattr(exc, "message", None) or str(exc)
            self._stamp = stamp
            return False
        self._stamp, self.users, self.error = stamp, users, None
        self.generation += 1
        return True

    def load(self) -> list[User]:
        """The users in the file ([] if there is none); InvalidArgument if it is malformed."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise InvalidArgument(f"cannot read {self.path}: {exc.strerror or exc}") from None
        return decode_users(data, str(self.path))

    @contextlib.contextmanager
    def edit(self) -> Iterator[list[User]]:
        """Lock, load, let the caller change the list, then write it back atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(USERS_FILE + ".lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            users = self.load()
            yield users
            self.save(check_users(users, str(self.path)))

    def save(self, users: list[User]) -> None:
        data = msgspec.json.format(msgspec.json.encode(UsersDocument(users=users)), indent=2) + b"\n"
        temp = self.path.with_name(f".{USERS_FILE}.{os.getpid()}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # secrets inside: owner only
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())  # the new content is on disk before the name points at it
            os.replace(temp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)


def find(users: list[User], name: str) -> User:
    for user in users:
        if user.name == name:
            return user
    raise InvalidArgument(f"no user named {name!r}")
