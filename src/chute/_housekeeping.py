"""The housekeeping half of `chute.Broker`: checkpoints, compaction, and the garbage collector around them.

`Housekeeping` is a mixin of `Broker` (broker.py) and uses its engine room (`_run`, `core`, `store`, `_state`,
the checkpoint counters). A checkpoint is due every `checkpoint_bytes` of log or `checkpoint_interval_s` (then
also when the broker has gone idle), and as soon as a start's recovery replayed a log tail after a crash (crashes
sooner than the interval would otherwise let the tail grow), one at a time, in the background. Compaction runs
first, in steps, then the timer heap sheds its stale timers if they are half of it or more (in steps too); the
snapshot of a large state is built by a child process (`_forked_snapshot.py`): rebuilt from the files by a new
program where they are real ones (the checkpoint then stands for the position the child read up to), else forked.

Invariant: nothing here walks a large backlog in one turn of the event loop; a checkpoint's snapshot stands for
exactly the log position the store records (no await between building it and storing it, or the position the
child rebuilt it at, given to the store).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

from chute import _forked_snapshot as forked_snapshot

log = logging.getLogger("chute.broker")

COMPACT_READ_BATCH = 1000  # records read per round trip to the store while compacting
TIMER_STEP = 4096  # work per turn of the loop while dropping stale timers, in lookups (a stale lease of 1,000
# receipts is 1,000): steps counted in timers, 2,048 of such leases, held the loop 10-21 ms in a soak (issue 12)
GC_FREEZE_MIN_ENTRIES = 100_000  # a recovered backlog from which full collections would hold the loop > ~5 ms


class Housekeeping:
    """checkpoint / compaction / idle checkpoints / the collector's freeze after a large recovery."""

    def _maybe_housekeep(self) -> None:
        if self._housekeeping is not None and not self._housekeeping.done():
            return
        written = self.store.bytes_appended - self._written_at_checkpoint
        due = written >= self.checkpoint_bytes or (
            written and time.monotonic() - self._checkpoint_time >= self.checkpoint_interval_s
        )
        if due and not self.store.read_only:
            self._start_checkpoint()
        elif written and self._idle_check is None:
            # if nothing else happens, checkpoint when the interval is over anyway: a broker that goes idle after
            # a busy spell reclaims the files of what was acked, and its checkpoint stands for its state now
            wait_s = self.checkpoint_interval_s - (time.monotonic() - self._checkpoint_time)
            self._idle_check = asyncio.get_running_loop().call_later(max(0.0, wait_s) + 0.01, self._idle_housekeep)

    _idle_check: asyncio.TimerHandle | None = None

    def _idle_housekeep(self) -> None:
        self._idle_check = None
        if self._state == "serving":
            self._maybe_housekeep()

    def _start_checkpoint(self) -> None:
        """Run a checkpoint in the background; its failure is logged (the store says itself that it failed), never
        left to the collector as an exception nobody retrieved, even if the broker is abandoned meanwhile."""
        task = asyncio.get_running_loop().create_task(self.checkpoint())
        task.add_done_callback(_checkpoint_ended)
        self._housekeeping = task

    async def checkpoint(self) -> None:
        """Store a snapshot (recovery then replays only later records) and compact sparse log files. A large
        state's snapshot is built by a child process while the broker keeps serving (chute._forked_snapshot)."""
        async with self._checkpointing:  # one at a time: the forked path wraps the store's append
            self._written_at_checkpoint = self.store.bytes_appended
            self._checkpoint_time = time.monotonic()
            # compaction first: it moves what the previous checkpoint covers, its copies are covered by this one
            # (their old files go now), and its walk over every entry is done before a fork, not while pages
            # are shared with the child (the first write to each shared page copies it)
            await self._compact()
            if self._state != "serving":
                return
            await self._drop_stale_timers()  # before a fork too: it writes to the heap's pages
            if self._state != "serving":
                return
            snapshot = at = None
            if forked_snapshot.worth_forking(self.core):
                replayed = await forked_snapshot.replayed(self.store, self.clock(), self._serving)
                if self._state != "serving":
                    return  # a stop came (and cut the child short): the closing checkpoint supersedes this one
                if replayed is not None:  # rebuilt from the files: it stands for an earlier position, `at`
                    snapshot, at = replayed
                else:
                    snapshot = await forked_snapshot.snapshot(self.core, self.store)
                    if self._state != "serving":
                        return
            if snapshot is None:
                snapshot = self.core.snapshot()
            held = self.core.pending_refs()  # a store must not reclaim them before their publishes are placed
            for ref in held:
                self.store.track(ref)
            try:
                if at is None:
                    await self.store.checkpoint(snapshot)  # no await since the snapshot was made: it stands for here
                else:
                    await self.store.checkpoint(snapshot, at=at)
            finally:
                for ref in held:
                    self.store.release(ref)
            self.checkpoints += 1
            del snapshot
            return_freed_memory()  # the snapshot was a large transient buffer

    def _serving(self) -> bool:
        return self._state == "serving"

    async def closing_checkpoint(self) -> None:
        """The checkpoint of a clean stop, once the broker no longer serves: a large state's snapshot is forked, as
        a periodic one's may be, so the stop does not hold the loop for it (HTTP, /metrics and the connections
        being closed are still answered meanwhile: 130-200 ms for a million messages on the loop); a small
        state's, or one whose child failed, is made on the loop. Not rebuilt from the files: that replays
        everything since the last checkpoint, which the forked image does not need."""
        async with self._checkpointing:
            snapshot = None
            if forked_snapshot.worth_forking(self.core):
                snapshot = await forked_snapshot.snapshot(self.core, self.store)
            if snapshot is None:
                snapshot = self.core.snapshot()
            await self.store.checkpoint(snapshot)  # no await since the snapshot was made: it stands for here

    async def _compact(self) -> None:
        """Move the live records of sparse files forward, a slice at a time: the search yields to the loop every
        few thousand entries and each move is one batch of reads and one append."""
        scan = self.core.compaction_scan(self.store.sparse_segments())
        while not scan.step():
            await asyncio.sleep(0)
            if self._state != "serving":
                return
        refs = scan.refs()
        for start in range(0, len(refs), COMPACT_READ_BATCH):
            batch = refs[start : start + COMPACT_READ_BATCH]
            payloads = await self.store.read(batch)
            if self._state != "serving":
                return
            self._run(self.core.relocate, list(zip(batch, payloads, strict=True)), scan)

    async def _drop_stale_timers(self) -> None:
        """When half or more of the timer heap is stale (what it timed was acked, deleted or purged, and nothing
        new pushed the heap past its compaction threshold), compact it now, in steps: a burst that was consumed
        gives its timers' memory back at the next checkpoint, not days later at their deadlines."""
        timers = self.core.timers
        if not timers.compacting and timers.mostly_stale():
            timers.compact()
        while timers.step(TIMER_STEP):
            await asyncio.sleep(0)
            if self._state != "serving":
                return

    def _freeze_recovered_state(self) -> None:
        """After recovering a large backlog, move every object the garbage collector tracks out of its reach
        (`gc.freeze`) until close. A full collection visits every item of every tracked container: with a
        million entries in a queue's ready line that is 60-270 ms of a held loop each time. Frozen objects are
        still freed by reference counting; only cycles among them wait for close (start-up's objects live as
        long as the broker anyway). Queues filled after start are not covered (see BENCHMARKS.md, issue 12)."""
        durable = sum(q.length for q in self.core.queues.values() if not q.ephemeral)
        if durable >= GC_FREEZE_MIN_ENTRIES:
            gc.collect()  # before serving: what is garbage now is not frozen
            gc.freeze()
            Housekeeping._gc_freezes += 1
            self._gc_frozen = True

    def _thaw(self) -> None:
        if self._gc_frozen:
            self._gc_frozen = False
            Housekeeping._gc_freezes -= 1
            if not Housekeeping._gc_freezes:  # the last broker that froze: the collector sees everything again
                gc.unfreeze()

    _gc_frozen = False
    _gc_freezes = 0  # brokers of this process whose start froze the collector's objects


def return_freed_memory() -> None:
    """Ask glibc to give freed heap pages back to the OS (no-op elsewhere). After recovery the heap holds tens of
    MB of freed snapshot buffers that glibc keeps for reuse; a broker should not look bigger than its index."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _checkpoint_ended(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("checkpoint failed: %s", task.exception())
