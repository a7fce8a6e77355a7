"""The dashboard's queue pages, end to end in a browser: create a queue, publish from the page and from a native
client, watch the depth change live, peek (headers, delivery count), purge after a confirmation, redrive from a
dead-letter queue, change settings, delete; errors from the API are shown in words; user data stays text."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

import chute

pytestmark = pytest.mark.e2e


def stat(page, key):
    return page.locator(f'[data-stat="{key}"] dd')


def test_create_publish_watch_peek_and_purge(page, server):
    page.goto("/#/queues")
    expect(page.get_by_role("heading", name="Queues", exact=True)).to_be_visible()
    form = page.get_by_role("form", name="Create a queue")
    form.get_by_label("Name").fill("orders")
    form.get_by_role("button", name="Create queue").click()
    expect(form.get_by_role("status")).to_have_text("Created queue orders.")
    row = page.get_by_role("row").filter(has=page.get_by_role("link", name="orders", exact=True))
    expect(row).to_be_visible()  # the list updated without a reload

    row.get_by_role("link", name="orders").click()
    expect(page).to_have_url(re.compile(r"#/queues/orders$"))
    expect(page.get_by_role("heading", level=1)).to_have_text("Queue orders")
    expect(stat(page, "ready")).to_have_text("0")

    publish = page.get_by_role("form", name="Publish a message")
    publish.get_by_label("Body").fill('{"order": 1}')
    publish.get_by_label("Headers").fill("content-type: application/json\ntrace: abc-123")
    publish.get_by_role("button", name="Publish").click()
    expect(publish.get_by_role("status")).to_have_text(re.compile(r"^Published message \d+\.$"))
    expect(stat(page, "ready")).to_have_text("1")

    with chute.Client(server.url) as client:
        client.publish("orders", b"from a native client", headers={"source": "native"})
        expect(stat(page, "ready")).to_have_text("2")  # live: the page polls, nobody reloads
        [delivery] = client.receive("orders", lease_s=60)
        client.nack(delivery)  # delivered once, back in the queue

    messages = page.get_by_role("table", name="Messages (in delivery order)")
    first = messages.get_by_role("row").filter(has_text='{"order": 1}')
    expect(first).to_contain_text("content-type: application/json")
    expect(first).to_contain_text("trace: abc-123")
    expect(first.get_by_role("cell").nth(2)).to_have_text("1")  # delivery count after the native nack
    second = messages.get_by_role("row").filter(has_text="from a native client")
    expect(second).to_contain_text("source: native")
    expect(second.get_by_role("cell").nth(2)).to_have_text("0")

    # Purge asks first: Escape cancels, the dialog's Purge button purges.
    page.get_by_role("button", name="Purge…").click()
    dialog = page.get_by_role("dialog", name="Purge queue orders?")
    expect(dialog).to_be_visible()
    page.keyboard.press("Escape")
    expect(dialog).to_have_count(0)
    expect(page.get_by_role("button", name="Purge…")).to_be_focused()
    expect(stat(page, "ready")).to_have_text("2")
    page.get_by_role("button", name="Purge…").click()
    page.get_by_role("dialog").get_by_role("button", name="Purge").click()
    expect(page.get_by_text("Purged 2 messages.")).to_be_visible()
    expect(stat(page, "ready")).to_have_text("0")
    expect(messages).to_contain_text("No messages.")


def test_redrive_from_a_dead_letter_queue(page, server):
    with chute.Client(server.url) as client:
        client.create_queue("jobs-dlq")
        client.create_queue("jobs", dead_letter_queue="jobs-dlq", max_deliveries=5)
        client.publish("jobs", b"poison", headers={"attempt": "1"})
        [delivery] = client.receive("jobs", lease_s=60)
        client.nack(delivery, dead_letter=True)

    page.goto("/#/queues/jobs-dlq")
    expect(page.get_by_role("heading", level=1)).to_have_text("Queue jobs-dlq")
    expect(page.get_by_text("This is the dead-letter queue of jobs.")).to_be_visible()
    row = page.get_by_role("table", name="Messages (in delivery order)").get_by_role("row").filter(has_text="poison")
    expect(row).to_contain_text("dead-lettered (rejected) from jobs")
    expect(stat(page, "ready")).to_have_text("1")

    redrive = page.get_by_role("form", name="Redrive dead letters")
    redrive.get_by_role("button", name="Redrive to source queues").click()
    expect(redrive.get_by_role("status")).to_have_text("Moved 1 message back to their source queues.")
    expect(stat(page, "ready")).to_have_text("0")

    page.get_by_role("link", name="jobs", exact=True).first.click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Queue jobs")
    expect(stat(page, "ready")).to_have_text("1")
    expect(page.get_by_text("Dead letters of this queue go to jobs-dlq.")).to_be_visible()


def test_change_settings_and_delete(page, server):
    with chute.Client(server.url) as client:
        client.create_queue("settings-q")
    page.goto("/#/queues/settings-q")
    form = page.get_by_role("form", name="Queue settings")
    expect(form.get_by_label("Lease (s)")).to_have_value("30")
    form.get_by_label("Lease (s)").fill("45")
    form.get_by_label("Max deliveries").fill("3")
    expect(form.get_by_label("When retention ends")).to_have_value("dead-letter")
    form.get_by_label("When retention ends").select_option("drop")
    form.get_by_role("button", name="Save settings").click()
    expect(form.get_by_role("status")).to_have_text("Saved: lease_s, max_deliveries, on_expiry.")
    with chute.Client(server.url) as client:
        [info] = [q for q in client.list_queues() if q.name == "settings-q"]
        assert (info.settings.lease_s, info.settings.max_deliveries, info.settings.on_expiry) == (45, 3, "drop")

    form.get_by_label("Max deliveries").fill("")  # empty: unlimited
    form.get_by_label("Lease (s)").fill("0")
    form.get_by_role("button", name="Save settings").click()
    expect(form.get_by_role("alert")).to_have_text(re.compile(r"^Error: lease_s must be between"))

    page.get_by_role("button", name="Delete queue…").click()
    page.get_by_role("dialog").get_by_role("button", name="Delete").click()
    expect(page).to_have_url(re.compile(r"#/queues$"))
    expect(page.get_by_role("link", name="settings-q")).to_have_count(0)


def test_an_api_error_is_shown_in_words(page, server):
    with chute.Client(server.url) as client:
        client.create_queue("taken", lease_s=10)
    page.goto("/#/queues")
    form = page.get_by_role("form", name="Create a queue")
    form.get_by_label("Name").fill("taken")
    form.get_by_label("Lease (s)").fill("20")
    form.get_by_role("button", name="Create queue").click()
    expect(form.get_by_role("alert")).to_have_text(re.compile(r"^Error: .*taken"))

    page.goto("/#/queues/no-such-queue")
    expect(page.get_by_role("alert").filter(has_text="no-such-queue")).to_contain_text("It may have been deleted.")


def test_names_headers_and_bodies_stay_text(page, server):
    body = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
    with chute.Client(server.url) as client:
        client.create_queue("xss")
        client.publish("xss", body.encode(), headers={"<b>bold</b>": "<i onmouseover=alert(1)>x</i>"})
    page.goto("/#/queues/xss")
    row = page.get_by_role("table", name="Messages (in delivery order)").get_by_role("row").filter(has_text="onerror")
    expect(row).to_contain_text(body)
    expect(row).to_contain_text("<b>bold</b>: <i onmouseover=alert(1)>x</i>")
    assert page.locator("main img, main script, main b, main i").count() == 0
    assert page.evaluate("window.pwned") is None
