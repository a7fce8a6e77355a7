"""Topics and subscriptions in the dashboard: create a topic, subscribe a queue with a pattern, publish with a
subject and see it routed, unsubscribe (confirmed), delete the topic."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

import chute

pytestmark = pytest.mark.e2e


def test_create_subscribe_publish_unsubscribe_delete(page, server):
    with chute.Client(server.url) as client:
        client.create_queue("eu-orders")

    page.goto("/#/topics")
    form = page.get_by_role("form", name="Create a topic")
    form.get_by_label("Name").fill("events")
    form.get_by_role("button", name="Create topic").click()
    expect(form.get_by_role("status")).to_have_text("Created topic events.")
    topics = page.get_by_role("table", name="Topics")
    expect(topics.get_by_role("row").filter(has_text="events")).to_contain_text("0")
    topics.get_by_role("link", name="events").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Topic events")

    subs = page.get_by_role("table", name="Subscriptions")
    expect(subs).to_contain_text("No subscriptions")
    subscribe = page.get_by_role("form", name="Subscribe a queue")
    subscribe.get_by_label("Pattern").fill("order.eu.*")
    subscribe.get_by_label("Queue").fill("eu-orders")
    subscribe.get_by_role("button", name="Subscribe").click()
    expect(subscribe.get_by_role("status")).to_have_text("Subscribed queue eu-orders to order.eu.*.")
    row = subs.get_by_role("row").filter(has_text="order.eu.*")
    expect(row).to_contain_text("eu-orders")

    subscribe.get_by_label("Queue").fill("no-such-queue")
    subscribe.get_by_role("button", name="Subscribe").click()
    expect(subscribe.get_by_role("alert")).to_have_text(re.compile(r"^Error: .*no-such-queue"))

    publish = page.get_by_role("form", name="Publish a message")
    publish.get_by_label("Subject").fill("order.eu.created")
    publish.get_by_label("Body").fill("routed")
    publish.get_by_role("button", name="Publish").click()
    expect(publish.get_by_role("status")).to_have_text(re.compile(r"^Published message \d+\.$"))
    publish.get_by_label("Subject").fill("order.us.created")
    publish.get_by_label("Body").fill("not routed")
    publish.get_by_role("button", name="Publish").click()
    expect(publish.get_by_role("status")).to_have_text(re.compile(r"^Published message \d+\.$"))
    with chute.Client(server.url) as client:
        assert [d.body for d in client.peek("eu-orders", 10)] == [b"routed"]

    row.get_by_role("button", name="Unsubscribe eu-orders from order.eu.*").click()
    page.get_by_role("dialog", name="Unsubscribe?").get_by_role("button", name="Unsubscribe").click()
    expect(page.get_by_text("Unsubscribed eu-orders from order.eu.*.")).to_be_visible()
    expect(subs).to_contain_text("No subscriptions")

    page.get_by_role("button", name="Delete topic…").click()
    page.get_by_role("dialog").get_by_role("button", name="Delete").click()
    expect(page).to_have_url(re.compile(r"#/topics$"))
    expect(page.get_by_role("table", name="Topics")).to_contain_text("No topics yet.")
