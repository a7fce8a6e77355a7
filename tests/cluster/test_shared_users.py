"""A cluster's users live in its database: `chute user ... --store URL` edits them once, every node signs them in
(passwords, API tokens), a change reaches running nodes within seconds, and a user deleted is refused everywhere.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest

import chute
from chute.errors import ChuteError
from tests.cluster.processes import NodeProcess
from tests.postgres.helpers import fresh_database

pytestmark = pytest.mark.timeout(180)

TOKEN = "cluster-superuser-token"  # the nodes forward calls to each other with it (docs/cluster.md)
CHANGE_WITHIN_S = 20.0


def chute_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chute", *args], input=stdin, capture_output=True, text=True,
                          timeout=60)  # fmt: skip


async def signs_in(url: str, **credentials) -> bool:
    try:
        async with chute.AsyncClient(url, reconnect=False, timeout=10, **credentials) as client:
            await client.list_queues()
        return True
    except ChuteError as exc:
        assert exc.name == "unauthenticated", exc
        return False


async def until_signs_in(url: str, expected: bool, **credentials) -> None:
    """Poll (a node rereads the users every second; nothing to wait on from outside) until the answer is `expected`."""
    deadline = time.monotonic() + CHANGE_WITHIN_S
    while await signs_in(url, **credentials) != expected:
        who = credentials.get("user") or "a token"
        assert time.monotonic() < deadline, f"{who} still {'refused' if expected else 'let in'}"
        await asyncio.sleep(0.2)


async def test_users_added_once_sign_in_on_every_node(postgres_url, tmp_path):
    url = await fresh_database(postgres_url)
    added = chute_cli("user", "add", "alice", "--superuser", "--password-stdin", "--store", url, stdin="alice-pw\n")
    assert added.returncode == 0, added.stderr
    nodes = [
        NodeProcess(url, f"node-{i}", str(tmp_path / f"node-{i}"), "--shards", "4", "--token", TOKEN, lease_s=5.0)
        for i in range(2)
    ]
    try:
        for node in nodes:
            assert await signs_in(node.url, user="alice", password="alice-pw")
            assert not await signs_in(node.url, user="alice", password="wrong")
        async with chute.AsyncClient(nodes[0].url, user="alice", password="alice-pw") as alice:
            await alice.create_queue("shared-users")
            await alice.publish("shared-users", b"hello")
        async with chute.AsyncClient(nodes[1].url, user="alice", password="alice-pw") as alice:
            [delivery] = await alice.receive("shared-users", wait_s=5)  # wherever its shard lives
            assert delivery.body == b"hello"
            await alice.ack(delivery)

        # a user added while the nodes run: both let them in within seconds, with a password and with a token
        assert chute_cli("user", "add", "bob", "--password-stdin", "--store", url, stdin="bob-pw\n").returncode == 0
        granted = chute_cli("user", "grant", "bob", "--allow", "publish,consume", "--queues", "*", "--store", url)
        assert granted.returncode == 0, granted.stderr
        made = chute_cli("user", "token", "add", "bob", "--store", url)
        assert made.returncode == 0, made.stderr
        bob_token = made.stdout.split()[-1]
        for node in nodes:  # (a node may reread the users between the CLI's calls: bob first, then his token)
            await until_signs_in(node.url, True, user="bob", password="bob-pw")
            await until_signs_in(node.url, True, token=bob_token)

        listed = chute_cli("user", "list", "--json", "--store", url)
        assert listed.returncode == 0, listed.stderr
        assert {u["name"] for u in json.loads(listed.stdout)} == {"alice", "bob"}

        # deleted once: refused everywhere
        assert chute_cli("user", "delete", "bob", "--store", url).returncode == 0
        for node in nodes:
            await until_signs_in(node.url, False, user="bob", password="bob-pw")
            await until_signs_in(node.url, False, token=bob_token)
    finally:
        for node in nodes:
            node.stop()


def test_bad_store_urls_get_one_clear_line():
    wrong = chute_cli("user", "list", "--store", "mysql://somewhere/db")
    assert wrong.returncode == 1 and "PostgreSQL URL" in wrong.stderr and len(wrong.stderr.strip().splitlines()) == 1
    refused = chute_cli("user", "list", "--store", "postgresql://nobody@127.0.0.1:1/none")
    assert refused.returncode == 1 and "cannot read chute_users" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
