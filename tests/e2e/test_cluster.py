"""The dashboard's Cluster page on a node started with --store: every node with its health, heartbeat and the
shards it holds, as the cluster changes (a node killed: shown down, its shards held by the survivor); on a broker
without --store the entry is not in the navigation and the page says it is not a cluster node."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import urllib.request

import pytest
from playwright.sync_api import expect

from tests.cluster.processes import NodeProcess
from tests.e2e.conftest import EXPECT_TIMEOUT_MS, VIEWPORT
from tests.postgres.helpers import fresh_database

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]
TAKEOVER_TIMEOUT_MS = 60_000  # a 2 s lease, then the takeover, on a loaded 2-core machine


def new_database(url: str) -> str:
    """A fresh database, made on a thread of its own (Playwright's sync API runs a loop on this one)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, fresh_database(url)).result(60)


def cluster_status(http_url: str) -> dict:
    with urllib.request.urlopen(f"{http_url}/api/v1/cluster", timeout=10) as response:
        return json.loads(response.read())


def test_the_cluster_page_shows_nodes_their_shards_and_a_dead_node(browser, postgres_url, tmp_path):
    url = new_database(postgres_url)
    a = NodeProcess(url, "node-a", str(tmp_path / "a"), "--shards", "4", lease_s=2.0)
    b = NodeProcess(url, "node-b", str(tmp_path / "b"), lease_s=2.0)
    context = browser.new_context(viewport=VIEWPORT, base_url=a.http_url)
    context.set_default_timeout(EXPECT_TIMEOUT_MS)
    errors: list[str] = []
    try:
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto("/#/cluster")
        expect(page.get_by_role("link", name="Cluster")).to_be_visible()
        expect(page.get_by_role("heading", name="Cluster", level=1)).to_be_visible()
        nodes = page.get_by_role("table", name="Nodes")
        row_a = nodes.get_by_role("row").filter(has_text="node-a")
        row_b = nodes.get_by_role("row").filter(has_text="node-b")
        expect(row_a.get_by_role("cell").nth(3)).to_have_text("alive")
        expect(row_b.get_by_role("cell").nth(3)).to_have_text("alive")
        expect(row_a.get_by_role("cell").nth(5)).to_have_text("2")  # balanced: 2 of 4 shards each
        expect(row_b.get_by_role("cell").nth(5)).to_have_text("2")
        expect(row_a.get_by_role("cell").nth(1)).to_have_text(a.url.removeprefix("chute://"))
        expect(page.locator('[data-stat="node"] dd')).to_have_text("node-a")
        expect(page.locator('[data-stat="alive"] dd')).to_have_text("2 of 2")
        held = cluster_status(a.http_url)["serving"]
        expect(page.get_by_role("table", name="Shards served by this node").get_by_role("row")).to_have_count(
            1 + len(held))  # fmt: skip

        b.kill()  # SIGKILL: down once its lease passes, and node-a takes its shards
        expect(row_b.get_by_role("cell").nth(3)).to_have_text("down", timeout=TAKEOVER_TIMEOUT_MS)
        expect(row_a.get_by_role("cell").nth(6)).to_have_text("0-3", timeout=TAKEOVER_TIMEOUT_MS)
        expect(page.locator('[data-stat="alive"] dd')).to_have_text("1 of 2")
        expect(page.locator('[data-stat="unowned"] dd')).to_have_text("none")
    finally:
        context.close()
        b.kill()
        assert a.stop() == 0
    assert not errors, f"script errors in the page: {errors}"


def test_a_broker_without_store_has_no_cluster_entry(page, base_url):
    with urllib.request.urlopen(f"{base_url}/api/v1/cluster", timeout=10) as response:
        assert json.loads(response.read()) == {"enabled": False}
    page.goto("/#/cluster")
    expect(page.get_by_text("This broker is not a cluster node")).to_be_visible()
    expect(page.get_by_role("table", name="Nodes")).to_have_count(0)
    expect(page.get_by_role("link", name="Connections")).to_be_visible()
    expect(page.get_by_role("link", name="Cluster")).to_have_count(0)
