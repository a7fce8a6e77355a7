"""Live updates: the overview's rates come from counter deltas between polls; polling stops while the tab is
hidden (an idle background tab costs the broker nothing) and resumes when it is shown."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

import chute

pytestmark = pytest.mark.e2e


def test_overview_counts_and_rates_follow_the_broker(page, server):
    page.goto("/")
    ready = page.locator('[data-stat="ready"] dd')
    expect(ready).to_have_text("0")
    with chute.Client(server.url) as client:
        client.create_queue("rates")
        client.publish_many("rates", [b"x"] * 50)
        expect(ready).to_have_text("50")
        expect(page.locator('[data-stat="queues"] dd')).to_have_text("1")
        expect(page.locator('[data-stat="connections"] dd')).to_have_text("1")
        client.publish_many("rates", [b"y"] * 50)
        # 50 publishes between two polls: the publish rate is positive for an interval, and the chart says so
        expect(page.locator('[data-stat="publish_rate"] dd')).to_have_text(re.compile(r"^(?!0\.0$)[0-9.,]+$"))
        expect(page.get_by_role("img", name=re.compile(r"^Message rates now: publish (?!0\.0 )"))).to_be_attached()
        expect(ready).to_have_text("100")
    # then nothing: the rate drops to zero, and the chart drew both (each poll is its own point)
    expect(page.locator('[data-stat="publish_rate"] dd')).to_have_text("0.0")
    heights = page.locator("polyline.series-published").get_attribute("points")
    assert len({point.split(",")[1] for point in heights.split()}) > 1, heights


def hide(page, hidden: bool) -> None:
    state = "hidden" if hidden else "visible"
    page.evaluate(
        """state => {
            Object.defineProperty(document, 'visibilityState', {configurable: true, get: () => state});
            Object.defineProperty(document, 'hidden', {configurable: true, get: () => state === 'hidden'});
            document.dispatchEvent(new Event('visibilitychange'));
        }""",
        state,
    )


def test_no_polls_while_the_tab_is_hidden(page):
    page.clock.install()
    api_calls: list[str] = []
    page.on("request", lambda request: api_calls.append(request.url) if "/api/v1/" in request.url else None)
    page.goto("/")
    expect(page.locator('[data-stat="state"] dd')).to_have_text("serving")
    with page.expect_request(re.compile(r"/api/v1/overview$")):
        page.clock.run_for(2000)  # the next poll comes within the interval

    hide(page, True)
    before = len(api_calls)
    page.clock.run_for(60_000)  # a minute in the background
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => r()))")
    assert len(api_calls) == before

    with page.expect_request(re.compile(r"/api/v1/overview$")):
        hide(page, False)  # shown again: a poll at once
