"""Shared fixtures: a hand-driven clock and a broker over each store (memory, file on disk)."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from chute import Broker
from chute.storage.file import FileStore
from chute.storage.memory import MemoryStore

settings.register_profile("ci", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


class Clock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A PostgreSQL server for the PostgreSQL store's tests, started once per run (tests/postgres/server.py);
    $CHUTE_TEST_POSTGRES names an existing one. Skipped where PostgreSQL is not installed, except in CI."""
    from tests.postgres import server

    if not server.available():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed: .ci/run installs Debian's postgresql")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql) and CHUTE_TEST_POSTGRES is not set")
    return server.shared_url()


@pytest.fixture
def clock() -> Clock:
    return Clock()


STORE_KINDS = os.environ.get("CHUTE_TEST_STORES", "memory,file").split(",")
"""The stores the `store_kind` tests run over; `CHUTE_TEST_STORES=postgres` runs them over the PostgreSQL store
(a campaign, not in CI: tests/postgres and the contract and model tests cover that store there)."""


def make_store(kind: str, path):
    if kind == "memory":
        return MemoryStore()
    if kind == "postgres":  # one stream per data path: a test's restarts find their data, other tests' are apart
        from chute.storage.postgres import PostgresStore
        from tests.postgres.server import shared_url

        return PostgresStore(shared_url(), stream=f"unit-{abs(hash(str(path))):x}")
    return FileStore(path, fsync_policy="always", segment_max_bytes=1 << 20)


@pytest.fixture(params=STORE_KINDS)
def store_kind(request) -> str:
    return request.param


@pytest.fixture
async def broker(store_kind, clock, tmp_path):
    """A started broker on a hand-driven clock (call `broker.tick()` after `clock.advance()`)."""
    b = Broker(store=make_store(store_kind, tmp_path / "data"), clock=clock, auto_tick=False)
    await b.start()
    yield b
    await b.close()


@pytest.fixture
async def reopen(store_kind, clock, tmp_path):
    """Close a broker and start a new one on the same data (a clean restart)."""
    opened: list[Broker] = []

    async def _reopen(old: Broker) -> Broker:
        await old.close()
        store = old.store if store_kind == "memory" else make_store(store_kind, tmp_path / "data")
        new = Broker(store=store, clock=clock, auto_tick=False)
        opened.append(new)
        return await new.start()

    yield _reopen
    if store_kind == "postgres":  # its connections are closed, not left to the garbage collector
        for new in opened:
            await new.close()
