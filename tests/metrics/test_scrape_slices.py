"""GET /metrics reads the queues in slices, a turn of the event loop between them: the same rows as one pass when
nothing changes, and a queue deleted between two slices is simply left out."""

from __future__ import annotations

import asyncio

import pytest

from chute.server import metrics
from chute.testing import serving

pytestmark = pytest.mark.timeout(30)


async def test_slices_give_the_rows_of_one_pass_and_skip_a_queue_deleted_meanwhile(monkeypatch):
    monkeypatch.setattr(metrics, "SCRAPE_SLICE_QUEUES", 2)
    async with serving() as server:
        broker = server.server.broker
        for i in range(7):
            await broker.create_queue(f"q{i}", dead_letter_queue="q0" if i else None)
            await broker.publish(f"q{i}", b"x")
        collector = metrics.BrokerCollector(server.server)
        sliced, whole = await collector.tables_in_slices(), collector.tables()
        for a, b in zip(sliced, whole, strict=True):  # (the oldest message's age moves with the clock: left out)
            assert [row[:5] + row[6:] for row in a.rows] == [row[:5] + row[6:] for row in b.rows]
        assert sliced[0].rows[1][-1] == 1  # q1's dead-letter depth: q0's ready, read in another slice

        scrape = asyncio.create_task(collector.tables_in_slices())
        await asyncio.sleep(0)  # the first slice is read
        await broker.delete_queue("q5")
        queue_table, _ = await scrape
        assert [row[0] for row in queue_table.rows] == ["q0", "q1", "q2", "q3", "q4", "q6"]
