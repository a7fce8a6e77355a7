"""Wrong passwords in a row pause further attempts for that user name (`failed_login_limit`, docs/security.md):
no password is checked while paused, the pause doubles up to a minute, other names are untouched, a success or
15 quiet minutes start the count again, and 0 turns the limit off. Over HTTP and the native protocol alike."""

from __future__ import annotations

import asyncio
import base64

import aiohttp
import pytest

import chute
from chute.errors import InvalidArgument, Unauthenticated
from chute.server import auth as auth_module
from chute.server.auth import Authenticator
from chute.server.config import ServerConfig
from chute.testing import serving
from tests.auth.conftest import make_user


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def authenticator(limit: int = 3) -> tuple[Authenticator, Clock]:
    auth = Authenticator(ServerConfig(users=[make_user("alice", "alice-pw"), make_user("bob", "bob-pw")],
                                      failed_login_limit=limit))  # fmt: skip
    clock = Clock()
    auth.clock = clock
    return auth, clock


async def wrong(auth: Authenticator, name: str, times: int = 1) -> None:
    for _ in range(times):
        with pytest.raises(Unauthenticated, match="wrong user name or password"):
            await auth.by_password(name, "guess")


async def paused(auth: Authenticator, name: str, password: str, seconds: int) -> None:
    with pytest.raises(Unauthenticated, match=f"too many wrong passwords for '{name}': try again in {seconds} s"):
        await auth.by_password(name, password)


async def test_the_limit_pauses_that_name_and_the_pause_doubles(monkeypatch):
    auth, clock = authenticator(limit=3)
    await wrong(auth, "alice", 3)
    checks = []
    real_verify = auth_module.verify_password
    monkeypatch.setattr(auth_module, "verify_password", lambda *a: checks.append(a) or real_verify(*a))
    await paused(auth, "alice", "alice-pw", 1)  # even the right password: nothing is checked while paused
    assert checks == []
    assert (await auth.by_password("bob", "bob-pw")).name == "bob"  # other names go on
    clock.now += 1.01
    await wrong(auth, "alice")  # the 4th wrong password in a row: 2 s
    await paused(auth, "alice", "guess", 2)
    clock.now += 2.01
    await wrong(auth, "alice")
    await paused(auth, "alice", "guess", 4)
    for _ in range(10):  # it stops growing at a minute
        clock.now += 61
        await wrong(auth, "alice")
    await paused(auth, "alice", "guess", 60)
    clock.now += 60.01
    assert (await auth.by_password("alice", "alice-pw")).name == "alice"  # a success starts again from zero
    await wrong(auth, "alice", 2)
    assert (await auth.by_password("alice", "alice-pw")).name == "alice"


async def test_unknown_names_are_paused_like_known_ones():
    auth, _ = authenticator(limit=2)
    await wrong(auth, "ghost", 2)
    await paused(auth, "ghost", "anything", 1)


async def test_wrong_passwords_far_apart_do_not_add_up():
    auth, clock = authenticator(limit=3)
    await wrong(auth, "alice", 2)
    clock.now += 16 * 60
    await wrong(auth, "alice", 2)  # 2 in a row again, not 4
    assert (await auth.by_password("alice", "alice-pw")).name == "alice"


async def test_a_password_checked_a_moment_ago_still_works_while_the_name_is_paused():
    auth, _ = authenticator(limit=2)
    assert (await auth.by_password("alice", "alice-pw")).name == "alice"  # cached for a minute
    await wrong(auth, "alice", 2)
    assert (await auth.by_password("alice", "alice-pw")).name == "alice"
    await paused(auth, "alice", "another-guess", 1)


async def test_zero_turns_the_limit_off():
    auth, _ = authenticator(limit=0)
    await wrong(auth, "alice", 20)
    assert (await auth.by_password("alice", "alice-pw")).name == "alice"


def test_a_negative_limit_is_refused():
    with pytest.raises(InvalidArgument, match="failed_login_limit"):
        ServerConfig(failed_login_limit=-1).validate()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def test_over_http_and_the_native_protocol():
    users = [make_user("admin", "admin-pw", superuser=True)]
    async with serving(users=users, failed_login_limit=2) as running, aiohttp.ClientSession() as session:
        whoami = f"{running.http_url}/api/v1/whoami"
        for _ in range(2):
            async with session.get(whoami, headers=basic("admin", "nope")) as response:
                assert response.status == 401
        async with session.get(whoami, headers=basic("admin", "admin-pw")) as response:
            assert response.status == 401
            assert "too many wrong passwords for 'admin'" in (await response.json())["error"]["message"]
        with pytest.raises(Unauthenticated, match="too many wrong passwords"):
            async with chute.AsyncClient(running.url, user="admin", password="admin-pw", reconnect=False):
                pass
        async with asyncio.timeout(10):  # the pause is 1 s: then the right password works on both
            while True:
                async with session.get(whoami, headers=basic("admin", "admin-pw")) as response:
                    if response.status == 200:
                        break
                await asyncio.sleep(0.1)
        async with chute.AsyncClient(running.url, user="admin", password="admin-pw", reconnect=False) as client:
            assert await client.list_queues() == []
