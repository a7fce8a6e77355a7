"""`chute user ...` as a user runs it: subprocesses on a data directory, and a running broker that picks the
changes up without a restart."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

import chute
from chute.errors import Forbidden, Unauthenticated
from chute.server.users import verify_password
from chute.testing import serving

pytestmark = pytest.mark.timeout(90)


def user(data_dir, *args: str, stdin: str | None = None, code: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "chute", "user", *args, "--data-dir", str(data_dir)],
                            input=stdin, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    return result


def stored(data_dir) -> dict:
    return {u["name"]: u for u in json.loads((data_dir / "users.json").read_text())["users"]}


def test_add_grant_token_key_passwd_revoke_delete(tmp_path):
    user(tmp_path, "add", "alice", "--password-stdin", stdin="pw-1\n")
    assert verify_password("pw-1", stored(tmp_path)["alice"]["password_hash"])
    assert (tmp_path / "users.json").stat().st_mode & 0o777 == 0o600
    user(tmp_path, "grant", "alice", "--allow", "publish,consume", "--queues", "orders.*")
    user(tmp_path, "grant", "alice", "--allow", "manage", "--queues", "orders.*")  # merged into the same grant
    user(tmp_path, "grant", "alice", "--allow", "publish", "--topics", "events.*")
    assert stored(tmp_path)["alice"]["grants"] == [
        {"allow": ["publish", "consume", "manage"], "queues": "orders.*"},
        {"allow": ["publish"], "topics": "events.*"},
    ]
    user(tmp_path, "revoke", "alice", "--allow", "manage", "--queues", "orders.*")
    user(tmp_path, "revoke", "alice", "--topics", "events.*")
    assert stored(tmp_path)["alice"]["grants"] == [{"allow": ["publish", "consume"], "queues": "orders.*"}]

    token = user(tmp_path, "token", "add", "alice", "--label", "ci").stdout.strip()
    assert token.startswith("cht_") and token not in (tmp_path / "users.json").read_text()
    [token_id] = [t["id"] for t in stored(tmp_path)["alice"]["tokens"]]
    assert user(tmp_path, "token", "list", "alice").stdout == f"{token_id}\tci\n"
    key_id, secret = user(tmp_path, "key", "add", "alice").stdout.split()
    assert key_id.startswith("AKCH") and stored(tmp_path)["alice"]["access_keys"][0]["secret"] == secret

    shown = json.loads(user(tmp_path, "show", "alice").stdout)
    assert shown["password"] is True and shown["tokens"][0]["label"] == "ci"
    assert "sha256" not in json.dumps(shown) and secret not in json.dumps(shown)  # show never prints secrets
    listed = json.loads(user(tmp_path, "list", "--json").stdout)
    assert [u["name"] for u in listed] == ["alice"]
    assert "alice" in user(tmp_path, "list").stdout

    user(tmp_path, "passwd", "alice", "--password-stdin", stdin="pw-2\n")
    assert verify_password("pw-2", stored(tmp_path)["alice"]["password_hash"])
    user(tmp_path, "token", "revoke", "alice", token_id)
    user(tmp_path, "key", "revoke", "alice", key_id)
    assert stored(tmp_path)["alice"]["tokens"] == [] if "tokens" in stored(tmp_path)["alice"] else True
    user(tmp_path, "delete", "alice")
    assert stored(tmp_path) == {}


@pytest.mark.parametrize(("args", "says"), [
    (("show", "ghost"), "no user named 'ghost'"),
    (("delete", "ghost"), "no user named 'ghost'"),
    (("token", "add", "ghost"), "no user named 'ghost'"),
    (("token", "revoke", "alice", "deadbeef"), "has no token 'deadbeef'"),
    (("revoke", "alice", "--queues", "x.*"), "has no grant on queues 'x.*'"),
    (("add", "alice", "--no-password"), "exists already"),
    (("add", "bad name", "--no-password"), "bad user name"),
])  # fmt: skip
def test_mistakes_are_one_line_errors_and_change_nothing(tmp_path, args, says):
    user(tmp_path, "add", "alice", "--no-password")
    before = (tmp_path / "users.json").read_bytes()
    result = user(tmp_path, *args, code=1)
    assert result.stderr.count("\n") == 1 and says in result.stderr
    assert (tmp_path / "users.json").read_bytes() == before


def test_usage_errors(tmp_path):
    assert "exactly one of --queues" in user(tmp_path, "grant", "a", "--allow", "publish", code=2).stderr
    assert "comma-separated list" in user(tmp_path, "grant", "a", "--allow", "fly", "--queues", "*", code=2).stderr


def test_hash_password_for_a_config_file(tmp_path):
    result = subprocess.run([sys.executable, "-m", "chute", "user", "hash-password", "--password-stdin"],
                            input="pw\n", capture_output=True, text=True, timeout=30)  # fmt: skip
    assert result.returncode == 0 and verify_password("pw", result.stdout.strip())


def test_the_data_dir_comes_from_the_config_file(tmp_path):
    config = tmp_path / "chute.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    result = subprocess.run([sys.executable, "-m", "chute", "user", "add", "ops", "--no-password", "--config",
                             str(config)], capture_output=True, text=True, timeout=30)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "ops" in stored(tmp_path / "data")


async def test_a_running_broker_picks_up_changes_without_a_restart(tmp_path):
    async with serving(str(tmp_path), token="root") as server:
        root = server.url.replace("chute://", "chute://root@")
        async with chute.AsyncClient(root, reconnect=False) as admin:
            await admin.create_queue("orders.a")
        await asyncio.to_thread(user, tmp_path, "add", "carol", "--password-stdin", stdin="pw\n")
        carol = server.url.replace("chute://", "chute://carol:pw@")
        await eventually(lambda: connect_and(carol, lambda c: c.publish("orders.a", b"x")), Forbidden)
        await asyncio.to_thread(user, tmp_path, "grant", "carol", "--allow", "publish", "--queues", "orders.*")
        await eventually(lambda: connect_and(carol, lambda c: c.publish("orders.a", b"x")), None)
        await asyncio.to_thread(user, tmp_path, "delete", "carol")
        await eventually(lambda: connect_and(carol, lambda c: c.list_queues()), Unauthenticated)


async def connect_and(url, call):
    async with chute.AsyncClient(url, reconnect=False, timeout=10) as client:
        await call(client)


async def eventually(attempt, expected: type[Exception] | None, within_s: float = 10.0) -> None:
    """Retry `attempt` until it raises `expected` (or succeeds, for None): the broker rechecks the file every
    second."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        try:
            await attempt()
            outcome = None
        except (Forbidden, Unauthenticated) as exc:
            outcome = type(exc)
        if outcome is expected:
            return
        assert loop.time() < deadline, f"still {outcome} after {within_s} s, expected {expected}"
        await asyncio.sleep(0.1)
