"""The connections page shows native clients as they connect and leave, with their push consumers."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

import chute

pytestmark = pytest.mark.e2e


def test_a_native_client_and_its_consumer_appear_and_leave(page, server):
    page.goto("/#/connections")
    clients = page.get_by_role("table", name="Connections")
    expect(clients).to_contain_text("No clients are connected.")
    with chute.Client(server.url, name="billing-worker") as client:
        client.create_queue("invoices")
        consumer = client.consume("invoices", prefetch=7)
        try:
            row = clients.get_by_role("row").filter(has_text="billing-worker")
            expect(row).to_contain_text("127.0.0.1:")
            consumers = page.get_by_role("table", name="Consumers")
            consumer_row = consumers.get_by_role("row").filter(has_text="invoices")
            expect(consumer_row.get_by_role("cell").nth(3)).to_have_text("7")
        finally:
            consumer.close()
    expect(clients).to_contain_text("No clients are connected.")
