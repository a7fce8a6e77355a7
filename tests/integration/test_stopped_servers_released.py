"""A stopped server is released: nothing in the process keeps it (and its broker, with what that holds) alive.

aiohttp caches each handler's chain of middlewares in a process-wide LRU cache keyed by the app; until the server
cleared it at stop, every server a process had started and stopped stayed reachable from that cache (up to 1,024
entries): this test suite's own process grew by ~45 MB every 100 tests (518 MB after 900), and an application that
embeds servers, or a user's tests with `chute.testing`, would grow the same way."""

from __future__ import annotations

import gc
import urllib.request
import weakref

import pytest

from chute.testing import running_server

pytestmark = pytest.mark.timeout(60)


def test_stopped_servers_and_their_brokers_are_released():
    released = []
    for _ in range(3):
        with running_server(fsync="never") as server:
            for path in ("/healthz", "/api/v1/queues", "/metrics"):  # requests through the middlewares
                urllib.request.urlopen(f"{server.http_url}{path}", timeout=10).close()
            released += [weakref.ref(server.server), weakref.ref(server.server.broker)]
        del server
    gc.collect()
    assert [ref() for ref in released if ref() is not None] == []
