"""Shared by the auth tests: a few users with known passwords and grants, and a CA made with trustme.

Passwords are hashed with a small scrypt cost (2**10) so tests stay fast; the cost is stored in each hash, so
the server verifies them exactly as it verifies real ones.
"""

from __future__ import annotations

import pytest
import trustme

from chute.server.users import Grant, User, hash_password

FAST = 10  # log2 of scrypt's n for test hashes


def make_user(name: str, password: str | None = None, *, superuser: bool = False, grants=()) -> User:
    return User(name=name, password_hash=hash_password(password, log2_n=FAST) if password else None,
                superuser=superuser, grants=list(grants))  # fmt: skip


def users() -> list[User]:
    """admin: everything; alice: publish+consume on orders.* queues and publish on events.* topics; bob: consume
    on orders.*; mgr: manage on orders.* queues and events.* topics."""
    return [
        make_user("admin", "admin-pw", superuser=True),
        make_user("alice", "alice-pw", grants=[Grant(allow=["publish", "consume"], queues="orders.*"),
                                               Grant(allow=["publish"], topics="events.*")]),
        make_user("bob", "bob-pw", grants=[Grant(allow=["consume"], queues="orders.*")]),
        make_user("mgr", "mgr-pw", grants=[Grant(allow=["manage"], queues="orders.*"),
                                           Grant(allow=["manage"], topics="events.*")]),
    ]  # fmt: skip


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(ca, tmp_path) -> dict[str, str]:
    """A certificate for 127.0.0.1 and localhost signed by `ca`: paths of the cert chain, key and CA cert."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {"cert": tmp_path / "cert.pem", "key": tmp_path / "key.pem", "ca": tmp_path / "ca.pem"}
    cert.private_key_and_cert_chain_pem.write_to_path(str(paths["cert"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    ca.cert_pem.write_to_path(str(paths["ca"]))
    return {key: str(path) for key, path in paths.items()}
