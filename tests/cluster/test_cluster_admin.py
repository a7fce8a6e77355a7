"""`chute db migrate` and `chute cluster forget`, as an operator runs them against a cluster's database: the
schema brought up to date without a node (and a newer or foreign one refused untouched), a dead node removed
from the list (and an alive one refused)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time

import pytest

from chute.cluster import ClusterNode
from chute.cluster.membership import nodes
from chute.storage.postgres.schema import MIGRATIONS, SCHEMA_VERSION
from tests.cluster.processes import NodeProcess
from tests.integration.test_serve import assert_one_line_error
from tests.postgres.helpers import connected, fresh_database

pytestmark = pytest.mark.timeout(180)


def chute(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chute", *args], capture_output=True, text=True, timeout=60)


async def run(*args: str) -> subprocess.CompletedProcess:
    return await asyncio.to_thread(chute, *args)


async def tables(url: str) -> dict[str, list]:
    """The chute_* tables of the database and the schema versions it records (to show nothing changed)."""
    async with connected(url) as connection:
        query = "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() AND tablename LIKE 'chute\\_%'"
        names = sorted(r["tablename"] for r in await connection.fetch(query))
        versions = []
        if "chute_schema_version" in names:
            versions = [r["version"] for r in await connection.fetch("SELECT version FROM chute_schema_version "
                                                                     "ORDER BY version")]  # fmt: skip
        return {"tables": names, "versions": versions}


async def test_db_migrate_creates_upgrades_and_then_changes_nothing(postgres_url):
    url = await fresh_database(postgres_url)
    result = await run("db", "migrate", "--store", url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"no Chute schema found; now schema version {SCHEMA_VERSION}"
    assert (await tables(url))["versions"] == list(range(1, SCHEMA_VERSION + 1))
    result = await run("db", "migrate", "--store", url, "--json")
    assert json.loads(result.stdout) == {"found": SCHEMA_VERSION, "now": SCHEMA_VERSION, "changed": False}

    old = await fresh_database(postgres_url)  # a database an older Chute (schema version 2) left
    async with connected(old) as connection:
        for version in (1, 2):
            await connection.execute(MIGRATIONS[version])
            await connection.execute("INSERT INTO chute_schema_version (version) VALUES ($1)", version)
    assert "chute_users" not in (await tables(old))["tables"]
    result = await run("db", "migrate", "--store", old)
    assert result.stdout.strip() == f"schema version 2 found; now schema version {SCHEMA_VERSION}", result.stderr
    assert "chute_users" in (await tables(old))["tables"]
    node = await ClusterNode(old, "after-migrate", shards=2, heartbeat_s=0.2, lease_s=2).start()  # a node starts on it
    try:
        while len(node.local_brokers()) != 2:
            await node.wait_changed(10)
    finally:
        await node.stop()


async def test_db_migrate_refuses_a_newer_or_foreign_schema_and_bad_urls_in_one_line(postgres_url):
    newer = await fresh_database(postgres_url)
    assert (await run("db", "migrate", "--store", newer)).returncode == 0
    async with connected(newer) as connection:
        await connection.execute("INSERT INTO chute_schema_version (version) VALUES ($1)", SCHEMA_VERSION + 1)
    before = await tables(newer)
    result = await run("db", "migrate", "--store", newer)
    assert_one_line_error(result, code=1, says=f"schema is version {SCHEMA_VERSION + 1}, newer than this Chute")
    assert await tables(newer) == before

    foreign = await fresh_database(postgres_url)
    async with connected(foreign) as connection:
        await connection.execute("CREATE TABLE chute_records (id int)")
    result = await run("db", "migrate", "--store", foreign)
    assert_one_line_error(result, code=1, says="no chute_schema_version: it is not a Chute database")
    assert await tables(foreign) == {"tables": ["chute_records"], "versions": []}

    result = await run("db", "migrate", "--store", "postgresql://me:hunter2@127.0.0.1:1/db")
    assert_one_line_error(result, code=1, says="cannot connect to PostgreSQL at 127.0.0.1:1/db")
    assert "hunter2" not in result.stderr
    assert_one_line_error(await run("db", "migrate", "--store", "mysql://h/db"), code=1,
                          says="--store must be a postgresql:// URL")  # fmt: skip


async def test_cluster_forget_removes_a_dead_node_and_refuses_an_alive_one(postgres_url):
    url = await fresh_database(postgres_url)
    with tempfile.TemporaryDirectory() as data_dir:
        ghost = NodeProcess(url, "ghost", data_dir, "--shards", "2", lease_s=2.0)
        try:
            result = await run("cluster", "forget", "ghost", "--store", url)
            assert_one_line_error(result, code=1, says="node 'ghost' is alive")
        finally:
            ghost.kill()  # SIGKILL: its row stays, alive until its lease passes, and it still names its shards
    async with connected(url) as connection:
        deadline = time.monotonic() + 30
        while any(n.alive for n in await nodes(connection)):
            assert time.monotonic() < deadline, "the killed node stayed alive"
            await asyncio.sleep(0.2)  # its lease ends by the database's clock; nothing announces it
    result = await run("cluster", "forget", "ghost", "--store", url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "forgot node ghost; freed shards 0, 1"
    status = json.loads((await run("cluster", "status", "--store", url, "--json")).stdout)
    assert status["nodes"] == [] and status["unowned"] == [0, 1]

    assert_one_line_error(await run("cluster", "forget", "ghost", "--store", url), code=1,
                          says="no node 'ghost' in the cluster")  # fmt: skip
    other = await fresh_database(postgres_url)
    assert_one_line_error(await run("cluster", "forget", "x", "--store", other), code=1,
                          says="holds no Chute cluster")  # fmt: skip

    back = await ClusterNode(url, "ghost", heartbeat_s=0.2, lease_s=2).start()  # the name can come back
    stopped = await ClusterNode(url, "leaver", heartbeat_s=0.2, lease_s=2).start()
    try:
        while len(back.local_brokers()) + len(stopped.local_brokers()) != 2 or not stopped.local_brokers():
            await stopped.wait_changed(10)
        await stopped.stop()  # a clean stop: not alive, its shards handed back; it can be forgotten at once
        result = await run("cluster", "forget", "leaver", "--store", url)
        assert result.stdout.strip() == "forgot node leaver", result.stderr
        while len(back.local_brokers()) != 2:
            await back.wait_changed(10)
        status = json.loads((await run("cluster", "status", "--store", url, "--json")).stdout)
        assert [n["name"] for n in status["nodes"]] == ["ghost"] and status["unowned"] == []
    finally:
        await back.stop()
