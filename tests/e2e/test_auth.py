"""Signing in to the dashboard: the sign-in form on a 401, the session token kept in sessionStorage (no cookie),
sign-out, back to the form when a session ends, and a 403 shown in words while the page stays usable."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

import chute
from chute.server import users
from chute.testing import running_server

pytestmark = pytest.mark.e2e

TOKEN_KEY = "chute.dashboard.token"
ADMIN_TOKEN = "e2e-superuser-token"


@pytest.fixture(scope="module")
def server():
    def user(name, password, **kw):
        return users.User(name=name, password_hash=users.hash_password(password, log2_n=10), **kw)

    config_users = [
        user("alice", "alice-pw", superuser=True),
        user("viewer", "viewer-pw", grants=[users.Grant(allow=["consume"], queues="*")]),
    ]
    with running_server(token=ADMIN_TOKEN, users=config_users) as running:
        with chute.Client(running.url, token=ADMIN_TOKEN) as client:
            client.create_queue("guarded")
            client.publish("guarded", b"keep me")
        yield running


def sign_in(page, user, password):
    form = page.get_by_role("form", name="Sign in to Chute")
    form.get_by_label("User").fill(user)
    form.get_by_label("Password").fill(password)
    form.get_by_role("button", name="Sign in").click()


def test_sign_in_token_in_session_storage_and_sign_out(page):
    page.goto("/")
    expect(page.get_by_role("heading", name="Sign in to Chute")).to_be_visible()
    expect(page.get_by_label("User")).to_be_focused()

    sign_in(page, "alice", "wrong")
    expect(page.get_by_role("alert")).to_have_text(re.compile(r"^Not signed in: "))
    expect(page.get_by_role("heading", name="Sign in to Chute")).to_be_visible()

    sign_in(page, "alice", "alice-pw")
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    expect(page.get_by_text("Signed in as alice")).to_be_visible()
    assert page.evaluate(f"sessionStorage.getItem('{TOKEN_KEY}')")
    assert page.evaluate("document.cookie") == ""

    page.reload()  # the tab keeps its session
    expect(page.get_by_text("Signed in as alice")).to_be_visible()
    expect(page.locator('[data-stat="queues"] dd')).to_have_text("1")

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in to Chute")).to_be_visible()
    expect(page.get_by_text("You have signed out.")).to_be_visible()
    assert page.evaluate(f"sessionStorage.getItem('{TOKEN_KEY}')") is None


def test_an_ended_session_returns_to_the_sign_in_form(page):
    page.goto("/#/queues")
    sign_in(page, "alice", "alice-pw")
    expect(page.get_by_role("link", name="guarded")).to_be_visible()
    page.evaluate(f"sessionStorage.setItem('{TOKEN_KEY}', 'chs_no-such-session')")  # as if it expired
    expect(page.get_by_role("heading", name="Sign in to Chute")).to_be_visible()
    expect(page.get_by_text(re.compile(r"^Please sign in again"))).to_be_visible()
    sign_in(page, "alice", "alice-pw")
    expect(page.get_by_role("heading", level=1)).to_have_text("Queues")  # back where the user was


def test_a_forbidden_action_is_explained_and_the_page_stays_usable(page, server):
    page.goto("/#/queues/guarded")
    sign_in(page, "viewer", "viewer-pw")
    expect(page.get_by_role("heading", level=1)).to_have_text("Queue guarded")
    expect(page.locator('[data-stat="ready"] dd')).to_have_text("1")

    page.get_by_role("button", name="Purge…").click()
    page.get_by_role("dialog").get_by_role("button", name="Purge").click()
    expect(page.get_by_role("alert").filter(has_text="Not allowed")).to_contain_text("guarded")

    with chute.Client(server.url, token=ADMIN_TOKEN) as client:
        client.publish("guarded", b"one more")
    expect(page.locator('[data-stat="ready"] dd')).to_have_text("2")  # still live after the refusal
    expect(page.get_by_role("heading", name="Sign in to Chute")).to_have_count(0)

    main_nav = page.get_by_role("navigation", name="Main")
    main_nav.get_by_role("link", name="Connections").click()  # superusers only
    # The purge's alert may still be on screen: wait for the connections page itself, then for its refusal.
    expect(page.get_by_role("heading", level=1)).to_have_text("Connections")
    expect(page.get_by_role("alert").filter(has_text="Not allowed").filter(has_text="guarded")).to_have_count(0)
    expect(page.get_by_role("alert").filter(has_text="Not allowed")).to_be_visible()
    main_nav.get_by_role("link", name="Queues").click()
    expect(page.get_by_role("alert").filter(has_text="Not allowed")).to_be_hidden()
    expect(page.get_by_role("link", name="guarded")).to_be_visible()
