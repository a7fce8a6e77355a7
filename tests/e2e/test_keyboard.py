"""One flow with the keyboard alone: skip link, main navigation, a form, a confirmation dialog; focus is always
visible, and the back button works because pages are hash routes."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

pytestmark = pytest.mark.e2e

FOCUS_RING = "() => getComputedStyle(document.activeElement).outlineStyle"


def tab_until(page, locator, max_tabs=40, key="Tab"):
    """Press Tab (or Shift+Tab) until `locator` has the focus, at most `max_tabs` times."""
    for _ in range(max_tabs):
        page.keyboard.press(key)
        if locator.evaluate("el => el === document.activeElement"):
            return
    raise AssertionError(f"{locator} not reached in {max_tabs} presses of Tab")


def test_create_a_queue_and_cancel_a_purge_with_the_keyboard_only(page):
    page.goto("/")
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()

    page.keyboard.press("Tab")
    skip = page.get_by_role("link", name="Skip to content")
    expect(skip).to_be_focused()
    expect(skip).to_be_in_viewport()
    page.keyboard.press("Enter")
    expect(page.locator("main")).to_be_focused()

    page.keyboard.press("Shift+Tab")  # back into the header: the navigation comes before the content
    queues_link = page.get_by_role("navigation", name="Main").get_by_role("link", name="Queues")
    tab_until(page, queues_link)
    assert page.evaluate(FOCUS_RING)== "solid"
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"#/queues$"))
    expect(queues_link).to_have_attribute("aria-current", "page")

    name = page.get_by_role("form", name="Create a queue").get_by_label("Name")
    tab_until(page, name)
    assert page.evaluate(FOCUS_RING)== "solid"
    page.keyboard.type("keyboard-q")
    page.keyboard.press("Enter")  # submits the form
    link = page.get_by_role("table", name="Queues").get_by_role("link", name="keyboard-q")
    expect(link).to_be_visible()

    tab_until(page, link, key="Shift+Tab")  # from the form back up to the table
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", level=1)).to_have_text("Queue keyboard-q")

    purge = page.get_by_role("button", name="Purge…")
    tab_until(page, purge, max_tabs=80)
    assert page.evaluate(FOCUS_RING)== "solid"
    page.keyboard.press("Enter")
    dialog = page.get_by_role("dialog", name="Purge queue keyboard-q?")
    expect(dialog).to_be_visible()
    expect(dialog.get_by_role("button", name="Cancel")).to_be_focused()  # the safe choice first
    page.keyboard.press("Escape")
    expect(dialog).to_have_count(0)
    expect(purge).to_be_focused()

    page.go_back()
    expect(page).to_have_url(re.compile(r"#/queues$"))
    expect(page.get_by_role("heading", level=1)).to_have_text("Queues")
