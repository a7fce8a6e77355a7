"""The queue model again, with a timer heap that compacts all the time (after 2 stale timers, one item moved per
call), so every lease, delay, expiry and dedup timer crosses a compaction: stale ones may go, live ones never."""

from __future__ import annotations

from chute.core import timers
from tests.model import test_queue_model as base


class CompactingQueueMachine(base.QueueMachine):
    def __init__(self) -> None:
        self._saved = (timers.SLACK, timers.STEP)
        timers.SLACK, timers.STEP = 2, 1
        super().__init__()

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            timers.SLACK, timers.STEP = self._saved


class TestCompactingTimersModel(CompactingQueueMachine.TestCase):
    pass


class CompactingFileQueueMachine(CompactingQueueMachine):
    store_kind = "file"


class TestCompactingTimersFileModel(CompactingFileQueueMachine.TestCase):
    pass
