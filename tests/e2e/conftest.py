"""Fixtures for the dashboard's end-to-end tests: Debian's headless Chromium driven by Playwright (sync API)
against a real server from chute.testing, on 127.0.0.1 with ephemeral ports.

Invariants: Playwright never downloads a browser (we launch /usr/bin/chromium; without it every test here is
skipped with that reason); each test gets a fresh browser context (its own sessionStorage) at 1280x800; a script
error in the page fails the test.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from chute.testing import RunningServer, running_server

CHROMIUM = pathlib.Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
VIEWPORT = {"width": 1280, "height": 800}
EXPECT_TIMEOUT_MS = 10_000  # a poll is every 1.5 s; a loaded CI machine gets ample slack


@pytest.fixture(scope="package")
def browser():
    """One Chromium for tests/e2e, closed after its last test: Playwright's sync API runs an event loop on this
    thread while it is open, so it must be gone before any asyncio test of another folder runs."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (Debian's chromium package); the dashboard's browser tests need it")
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    """One broker for a module's tests; each test uses its own queue and topic names."""
    with running_server() as running:
        yield running


@pytest.fixture
def base_url(server) -> str:
    return f"http://127.0.0.1:{server.http_port}"


@pytest.fixture
def page(browser, base_url):
    context = browser.new_context(viewport=VIEWPORT, base_url=base_url)
    context.set_default_timeout(EXPECT_TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"script errors in the page: {errors}"
