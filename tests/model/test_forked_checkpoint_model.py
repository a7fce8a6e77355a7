"""The queue model (test_queue_model.py) with checkpoints whose snapshot is built in a forked child while the
broker keeps working: publishes, deliveries, acks, nacks, time passing, restarts and power cuts happen between
the fork and the moment the checkpoint is stored, so the records appended meanwhile (the tail) must carry them.
Over the memory, file and PostgreSQL stores.
Every guarantee the model checks must hold across those checkpoints too."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile

import pytest
from hypothesis import settings
from hypothesis.stateful import invariant, precondition, rule

from chute import _forked_snapshot as forked_snapshot
from chute.storage import FileStore
from tests import own_process
from tests.model.test_queue_model import QueueMachine
from tests.postgres import server as postgres_server
from tests.processes import abandon_broker

FORKED: list[int] = []  # one item per checkpoint seen in flight with its child forked

# Every checkpoint here forks the test process, and a start after a power cut checkpoints at once. A fork costs
# with the process's size, so the forking machines run in a process of their own (tests/own_process.py): CI's
# single pytest process is ~500 MB by the time they run, and there the memory store's machine took 109 s against
# 12 s alone. At most $CHUTE_FORK_MODEL_EXAMPLES (default 60) examples per store; raise it for a campaign. The same
# machine without forks runs the whole profile in test_queue_model.py.
FORK_EXAMPLES = int(os.environ.get("CHUTE_FORK_MODEL_EXAMPLES", "60"))
# On a real directory each checkpoint starts a new Python program (~0.25 s): $CHUTE_DISK_MODEL_EXAMPLES (default
# 15) examples of it.
DISK_EXAMPLES = int(os.environ.get("CHUTE_DISK_MODEL_EXAMPLES", "15"))
REPLAYED: list[int] = []  # one item per checkpoint of the disk machine seen in flight
pytestmark = pytest.mark.timeout(600)


def fork_settings():
    return settings(settings.default, max_examples=min(settings.default.max_examples, FORK_EXAMPLES))


class ForkingQueueMachine(QueueMachine):
    def __init__(self) -> None:
        self.saved_min = forked_snapshot.FORK_MIN_ENTRIES
        forked_snapshot.FORK_MIN_ENTRIES = 0  # every checkpoint forks, however small the state
        self.checkpointing: asyncio.Task | None = None
        # A power cut ends the process: no snapshot may be started for a store abandoned by one (the test's
        # process lives on, and an abandoned broker still at work would fork beside the new one)
        self.dead_stores: list = []
        self.strays: list[str] = []
        self.saved_paths = forked_snapshot.snapshot, forked_snapshot.replayed
        for name, path in zip(("snapshot", "replayed"), self.saved_paths, strict=True):
            setattr(forked_snapshot, name, self._watched(name, path))
        super().__init__()

    def _watched(self, name, path):
        async def watched(*args, **kwargs):
            store = args[1] if name == "snapshot" else args[0]
            if any(store is dead for dead in self.dead_stores):
                self.strays.append(name)
            return await path(*args, **kwargs)

        return watched

    def teardown(self) -> None:
        try:
            self._end_checkpoint(cancel=False)
            super().teardown()
        finally:
            forked_snapshot.FORK_MIN_ENTRIES = self.saved_min
            forked_snapshot.snapshot, forked_snapshot.replayed = self.saved_paths

    @invariant()
    def no_abandoned_broker_is_at_work(self):
        assert not self.strays, f"a broker abandoned by a power cut started a checkpoint: {self.strays}"

    @precondition(lambda self: self.checkpointing is None)
    @rule()
    def begin_checkpoint(self):
        """Start a checkpoint and run the loop until its child is forked (the store's append is wrapped)."""
        scheduled = self.broker._housekeeping  # e.g. the checkpoint a recovery that replayed a tail starts
        if scheduled is not None and not scheduled.done():
            self._run(scheduled)  # ends first: one checkpoint in flight at a time, the one this rule follows
        task = self.loop.create_task(self.broker.checkpoint())
        self.broker._housekeeping = task  # a restart's close waits for it, as for a scheduled checkpoint

        async def forked() -> None:
            while "append" not in vars(self.broker.store) and not task.done():
                await asyncio.sleep(0.0005)

        self._run(forked())
        self.checkpointing = task
        if not task.done():
            FORKED.append(1)

    @precondition(lambda self: self.checkpointing is not None)
    @rule()
    def finish_checkpoint(self):
        self._end_checkpoint(cancel=False)

    def _end_checkpoint(self, cancel: bool) -> None:
        task, self.checkpointing = self.checkpointing, None
        if task is None:
            return
        if cancel:
            task.cancel()  # the process dies mid-checkpoint: the child is killed, nothing is stored
        with contextlib.suppress(asyncio.CancelledError):
            self._run(task)
        assert "append" not in vars(self.broker.store)

    @rule()
    def restart(self):
        self.checkpointing = None  # close() waits for it
        super().restart()

    @precondition(lambda self: self.store_kind != "memory")
    @rule()
    def power_cut(self):
        self._end_checkpoint(cancel=True)
        self.dead_stores.append(self.broker.store)
        super().power_cut()


class ForkingTests:
    """A machine's test case, run in a process of its own (a fork costs with the size of the process forked), which
    checks the machine did what it is here for: at least `least` checkpoints were in flight with a child at work."""

    least = 5
    counted = FORKED

    def runTest(self):  # noqa: N802 (unittest's name)
        node = own_process.node_id(__file__, type(self).__name__, "runTest")
        if own_process.ran_elsewhere(node, timeout=580, env=self.child_env()):
            return
        before = len(self.counted)
        super().runTest()
        assert len(self.counted) - before >= self.least, "the machine's checkpoints all ended before it could act"

    def child_env(self) -> dict[str, str]:
        return {}


class TestForkedCheckpointsMemoryStore(ForkingTests, ForkingQueueMachine.TestCase):
    settings = fork_settings()


class FileForkingQueueMachine(ForkingQueueMachine):
    store_kind = "file"


class TestForkedCheckpointsFileStore(ForkingTests, FileForkingQueueMachine.TestCase):
    settings = fork_settings()


class DiskQueueMachine(ForkingQueueMachine):
    """On a real directory: each checkpoint's snapshot is rebuilt from the files by a new program
    (chute._replay_child), while the broker goes on. A power cut here is the death of the process: what it wrote
    stays (the page cache outlives it), its threads, descriptors and lock go."""

    store_kind = "disk"

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="chute-model-")
        self.saved_spawn = spawn = forked_snapshot._spawn

        def counted(*args):
            REPLAYED.append(1)
            return spawn(*args)

        forked_snapshot._spawn = counted
        super().__init__()

    def _store(self):
        return FileStore(self.directory, segment_max_bytes=4096)

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            forked_snapshot._spawn = self.saved_spawn
            shutil.rmtree(self.directory, ignore_errors=True)

    @rule()
    def power_cut(self):
        self._end_checkpoint(cancel=True)
        store = self.broker.store
        self.dead_stores.append(store)
        self._run(abandon_broker(self.broker))
        store.fs.close()
        store.fs.unlock(f"{self.directory}/lock")
        self.broker = self._run(self._start())
        self.held.clear()


class TestReplayedCheckpointsOnDisk(DiskQueueMachine.TestCase):
    """Its checkpoints' children are mostly new programs, whose cost does not grow with the test process (42 s in
    CI, 44 s alone): it runs in the test process."""

    settings = settings(settings.default, max_examples=min(settings.default.max_examples, DISK_EXAMPLES))

    def runTest(self):  # noqa: N802 (unittest's name)
        before = len(REPLAYED)
        super().runTest()
        assert len(REPLAYED) - before >= 5, "fewer than 5 of the machine's checkpoints were rebuilt by a child"


class PostgresForkingQueueMachine(ForkingQueueMachine):
    store_kind = "postgres"


@postgres_server.required
class TestForkedCheckpointsPostgresStore(ForkingTests, PostgresForkingQueueMachine.TestCase):
    """The child inherits the store's database sockets and closes them unused; the parent's stay intact."""

    settings = postgres_server.model_settings(default=15)

    def child_env(self) -> dict[str, str]:
        return {postgres_server.ENV_URL: postgres_server.shared_url()}  # the server this run started, not another
