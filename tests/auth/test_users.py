"""The user store (server/users.py) and the Authenticator over it (server/auth.py): hashes, tokens, reloading
the users file while running, and clear errors for malformed files and config entries."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from chute.errors import InvalidArgument, Unauthenticated
from chute.protocol.messages import Hello
from chute.server.auth import Authenticator, Principal
from chute.server.config import ServerConfig, load_config
from chute.server.users import Grant, UsersFile, hash_password, new_access_key, new_token, verify_password
from tests.auth.conftest import FAST, make_user

pytestmark = pytest.mark.timeout(60)


def test_a_password_hash_round_trips_and_is_salted():
    first, second = hash_password("s3cret", log2_n=FAST), hash_password("s3cret", log2_n=FAST)
    assert first != second  # a random salt each time
    assert first.startswith(f"scrypt${FAST}$8$1$") and "s3cret" not in first
    assert verify_password("s3cret", first) and verify_password("s3cret", second)
    assert not verify_password("s3cret ", first) and not verify_password("", first)


def test_the_default_cost_is_stored_with_the_hash():
    stored = hash_password("pw")
    assert stored.startswith("scrypt$14$8$1$") and verify_password("pw", stored)


def test_tokens_are_random_prefixed_and_stored_hashed():
    secret, record = new_token("ci")
    other, _ = new_token()
    assert secret.startswith("cht_") and len(secret) > 40 and secret != other
    assert secret.encode() not in msgspec.json.encode(record) and len(record.sha256) == 64


def authenticator(tmp_path, **config) -> Authenticator:
    auth = Authenticator(ServerConfig(data_dir=str(tmp_path), **config))
    auth.load()
    return auth


async def test_passwords_tokens_and_their_revocation(tmp_path):
    secret, record = new_token()
    with UsersFile(tmp_path).edit() as users:
        users.append(make_user("alice", "pw", grants=[Grant(allow=["consume"], queues="jobs.*")]))
        users[0].tokens.append(record)
    auth = authenticator(tmp_path)
    assert auth.enabled
    alice = await auth.by_password("alice", "pw")
    assert alice == Principal(name="alice", grants=(Grant(allow=["consume"], queues="jobs.*"),))
    assert alice.allows("consume", "queue", "jobs.a.b") and not alice.allows("publish", "queue", "jobs.a")
    assert alice.can_see("queue", "jobs.x") and not alice.can_see("queue", "other")
    assert await auth.by_token(secret) == alice
    with pytest.raises(Unauthenticated):
        await auth.by_password("alice", "wrong")
    with pytest.raises(Unauthenticated):
        await auth.by_password("mallory", "pw")
    with UsersFile(tmp_path).edit() as users:
        users[0].tokens.clear()
    auth.file._checked_at = -1e9  # as if a second had passed
    with pytest.raises(Unauthenticated):
        await auth.by_token(secret)


async def test_a_cached_password_stops_working_once_the_file_changes(tmp_path):
    with UsersFile(tmp_path).edit() as users:
        users.append(make_user("alice", "old"))
    auth = authenticator(tmp_path)
    await auth.by_password("alice", "old")
    await auth.by_password("alice", "old")  # from the cache
    with UsersFile(tmp_path).edit() as users:
        users[0].password_hash = hash_password("new", log2_n=FAST)
    auth.file._checked_at = -1e9
    with pytest.raises(Unauthenticated):
        await auth.by_password("alice", "old")
    assert (await auth.by_password("alice", "new")).name == "alice"


async def test_the_file_is_rechecked_at_most_once_a_second_and_picked_up_while_running(tmp_path):
    auth = authenticator(tmp_path)
    assert not auth.enabled
    with UsersFile(tmp_path).edit() as users:
        users.append(make_user("bob", "pw"))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while not auth.enabled:  # within about a second of the change
        assert loop.time() < deadline
        await auth.refresh()
        await asyncio.sleep(0.05)
    assert (await auth.hello(Hello(versions=[1], user="bob", password="pw"))).name == "bob"


async def test_a_malformed_file_keeps_the_last_good_users_while_running(tmp_path):
    with UsersFile(tmp_path).edit() as users:
        users.append(make_user("bob", "pw"))
    auth = authenticator(tmp_path)
    (tmp_path / "users.json").write_text("{not json")
    auth.file._checked_at = -1e9
    await auth.refresh()
    assert "users.json is not a valid users file" in auth.file.error
    assert (await auth.by_password("bob", "pw")).name == "bob"


@pytest.mark.parametrize(("content", "says"), [
    ("{not json", "is not a valid users file"),
    ('{"users": [{"name": "a", "password": "plain"}]}', "is not a valid users file"),
    ('{"users": [{"name": "a", "password_hash": "md5$x"}]}', "is not an scrypt hash"),
    ('{"users": [{"name": "a b"}]}', "bad user name"),
    ('{"users": [{"name": "a"}, {"name": "a"}]}', "appears twice"),
    ('{"users": [{"name": "a", "grants": [{"allow": ["publish"]}]}]}', "exactly one of queues or topics"),
    ('{"users": [{"name": "a", "grants": [{"allow": ["fly"], "queues": "*"}]}]}', "is not a valid users file"),
])  # fmt: skip
def test_a_malformed_users_file_is_refused_at_startup_with_a_clear_error(tmp_path, content, says):
    (tmp_path / "users.json").write_text(content)
    with pytest.raises(InvalidArgument, match=says) as error:
        authenticator(tmp_path)
    assert "users.json" in error.value.message


@pytest.mark.parametrize(("toml", "says"), [
    ('[[users]]\nname = "a"\npassword = "plain"\n', "Object contains unknown field `password`"),
    ('[[users]]\nname = "a"\ngrants = [{allow = ["publish"], queues = "*", topics = "*"}]\n', "exactly one"),
    ('[[users]]\nname = "a"\npassword_hash = "nope"\n', "not an scrypt hash"),
    ('tls_cert = "c.pem"\n', "tls_cert and tls_key go together"),
])  # fmt: skip
def test_malformed_config_entries_are_refused_with_a_clear_error(tmp_path, toml, says):
    path = tmp_path / "chute.toml"
    path.write_text(toml)
    with pytest.raises(InvalidArgument, match=says):
        load_config(path)


async def test_config_users_and_the_superuser_token(tmp_path):
    path = tmp_path / "chute.toml"
    stored = hash_password("pw", log2_n=FAST)
    path.write_text(f'data_dir = "{tmp_path}"\ntoken = "root"\n[[users]]\nname = "ops"\npassword_hash = "{stored}"\n'
                    'grants = [{allow = ["manage"], topics = "*"}]\n')  # fmt: skip
    auth = Authenticator(load_config(path))
    ops = await auth.by_password("ops", "pw")
    assert ops.allows("manage", "topic", "anything") and not ops.allows("manage", "queue", "anything")
    root = await auth.by_token("root")
    assert root.superuser
    with pytest.raises(Unauthenticated):
        await auth.by_token("roo")


async def test_access_keys_give_their_secret_and_principal(tmp_path):
    key = new_access_key()
    with UsersFile(tmp_path).edit() as users:
        users.append(make_user("sqs-app", grants=[Grant(allow=["publish"], queues="*")]))
        users[0].access_keys.append(key)
    auth = authenticator(tmp_path)
    secret, principal = auth.access_key(key.id)
    assert secret == key.secret and principal.name == "sqs-app"
    assert auth.access_key("AKCHUNKNOWN") is None


async def test_sessions_from_login_expire_with_their_user(tmp_path):
    with UsersFile(tmp_path).edit() as users:
        users.append(make_user("alice", "pw"))
    auth = authenticator(tmp_path)
    token, lasts_s = await auth.login("alice", "pw")
    assert token.startswith("chs_") and lasts_s > 0
    assert (await auth.by_token(token)).name == "alice"
    with UsersFile(tmp_path).edit() as users:
        users.clear()
    auth.file._checked_at = -1e9
    with pytest.raises(Unauthenticated, match="log in again"):
        await auth.by_token(token)


async def test_deleting_the_last_user_does_not_turn_auth_off(tmp_path):
    """Once the users file exists, auth stays on even when it lists nobody: nobody gets in, rather than everyone."""
    with UsersFile(tmp_path).edit() as users:
        users.append(make_user("alice", "pw"))
    auth = authenticator(tmp_path)
    with UsersFile(tmp_path).edit() as users:
        users.clear()
    auth.file._checked_at = -1e9
    await auth.refresh()
    assert auth.enabled and not auth.users
    with pytest.raises(Unauthenticated):
        await auth.hello(Hello(versions=[1]))
