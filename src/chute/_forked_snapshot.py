"""Checkpoints that do not hold the event loop: the snapshot of a large state is built by a child process.

Building the snapshot of a million-message backlog is over a second of Python (`BrokerCore.snapshot`), which on
the event loop would stall every client. So a child builds it, compressed (zlib level 1: the column-packed
entries shrink ~14x, so the parent handles megabytes, not tens of them), and writes it to a pipe. Two kinds:

**Rebuilt from the files** (`replayed`), where the store's files are real ones (a FileStore on the disk): at a
position P of the log (`store.replay_point()`, a frame boundary), once what was appended before P is written, a
new program (`chute._replay_child`, started with posix_spawn) reads the stored checkpoint and the records after it
up to P, replays them as recovery does, and writes the snapshot of that state. It shares no memory page with the
broker, so the broker's loop takes no copy-on-write fault meanwhile (a fork's faults held the loop 10-25 ms at
most checkpoints of a soak: BENCHMARKS.md, issue 12). The checkpoint is stored at P (`store.checkpoint(snapshot,
at=P)`): recovery loads it and replays the log after P, which holds everything appended while the child worked.
Its cost is the child's CPU, about what recovery spends on the records since the last checkpoint (~8 us per
message published and acked on the 2-vCPU AMD machine) plus ~0.35 s to start, at `nice 10`.

**Forked** (`snapshot`), elsewhere (the PostgreSQL store, a test's in-memory files, CHUTE_SNAPSHOT_REPLAY=0, a
failed rebuild): at a moment P `os.fork()` copies the process (copy-on-write page tables: 2-10 ms for 100-250 MB
resident); the child holds the state exactly as it was at P and builds the image from memory. Meanwhile the
broker keeps working, and every record it appends is also noted (the store object's `append` is wrapped for the
duration): the tail. At P', when the image has arrived, the snapshot is the image plus the tail of records
appended in (P, P'], and the caller stores it at once, in the same turn of the loop, so P' is the position the
checkpoint records. Recovery loads the image, replays the tail, then the log's records after P'.

Either way recovery takes the same steps as from a checkpoint taken at P, which the model, contract and crash
tests prove for every checkpoint.

Invariants:
- a rebuilt snapshot stands for P exactly: every record before P is written before the child starts (`flush`),
  none after it is read (storage/file/readonly.py stops at P), and no checkpoint is stored nor segment deleted
  while it reads (one checkpoint at a time);
- a forked one: nothing is appended between the end of the tail and the store's position (`snapshot()` returns,
  and its caller calls `store.checkpoint`, within one synchronous step); every append in (P, P'] is in the tail
  (the store's append counter must have moved by exactly the appends noted, else the image is dropped and the
  caller builds the snapshot on the loop: never a wrong checkpoint);
- a forked child only reads memory and writes its pipe, then leaves with `os._exit` (no atexit handlers, no
  flush of inherited buffers); it closes every inherited descriptor but its pipe and stdio first, so it never
  holds the data directory's lock or a client's socket; a spawned one inherits only its pipe and stdio (every
  descriptor Python opens is close-on-exec); a failed child costs a fork or an on-loop snapshot, never a
  missing checkpoint;
- while a forked child lives, the parent avoids writing to many pages at once (each first write copies a page):
  the garbage collector is paused (for a second or two), and compaction runs before the fork, not after;
- no step on the loop touches the whole tail or image: each record is encoded into the tail's buffers as it is
  appended (spread over the child's life), and the snapshot goes to the store as pieces, never joined (a join
  of the tens of megabytes a burst appends meanwhile would hold the loop: 20-40 ms measured);
- the image is read, the pipe closed and the child reaped by a thread of its own, even if the checkpoint is
  cancelled meanwhile (the child is then killed);
- a stop cuts its store's working children short (`cut_short`: killed, neither counted as a failure nor
  replaced by a fork): the closing checkpoint supersedes theirs, and a replay of a burst can take seconds;
- Linux only (elsewhere, and for states whose estimated cost is under FORK_MIN_ENTRIES plain messages, the
  snapshot is built on the loop: a cheap one takes less than a child).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import threading
import warnings
import zlib
from collections.abc import Callable

from chute.core import snapshot as snap
from chute.core.broker import BrokerCore
from chute.storage.api import Store

# A snapshot is built on the loop when it is cheap, in a forked child otherwise: a fork costs the loop 3.5-5 ms
# itself, then 11-19 ms of copy-on-write faults in about a third of checkpoints (BENCHMARKS.md, issue 12). What
# building it on the loop costs is estimated in units of a plain message, per item, from measures in a fresh
# process on the 2-vCPU Intel Xeon machine (~0.1 us a unit there; rounded up):
PLAIN_COST = 1  # a plain message of a queue's largest packed line (copied as columns); a dedup id; a retained one
OBJECT_COST = 8  # an entry that is an object (delayed, grouped, with an expiry, in flight): 0.56-0.79 us
MERGED_COST = 40  # such an entry in a queue that also has a packed line, merged in by id: 3-4 us
VIEW_COST = 50  # a plain message of another priority's packed line (made an Entry, then merged): 3.2-5.7 us
# At or above this cost the snapshot is forked. Inside a busy broker the same work took about 3x as long (cold
# caches): in a soak, a state estimated at 67,800 held the loop 17-25 ms. So 20,000 (as many plain
# messages as the threshold counted entries of any kind before the fifteenth session, when 19,999 delayed or
# grouped messages took 11-16 ms on the loop, and as many messages of three priorities 40-66 ms). The
# environment variable is for tests that make every checkpoint fork (the SIGKILL campaign:
# CHUTE_SNAPSHOT_FORK_MIN_ENTRIES=0)
FORK_MIN_ENTRIES = int(os.environ.get("CHUTE_SNAPSHOT_FORK_MIN_ENTRIES", "20000"))
COMPRESS_LEVEL = 1  # ~250 ms per million entries in the child; level 6 is 5x slower for 4% less
READ_CHUNK_BYTES = 1 << 20
log = logging.getLogger("chute.broker")

MAX_FD = 1 << 20  # close_range's upper bound in the child (the kernel stops at the highest open descriptor)
# Where the store's files are real ones, the child is a new program that rebuilds the state from them instead
# of a fork (chute._replay_child): it shares no page with the broker. CHUTE_SNAPSHOT_REPLAY=0 forks anyway.
REPLAY = os.environ.get("CHUTE_SNAPSHOT_REPLAY", "1") != "0"
REPLAY_MAX_FAILURES = 3  # children failed in a row (the program cannot import chute?): then every checkpoint forks
_replay_failures = 0
_working: dict[int, list] = {}  # pid -> [the store it works for, cut short by a stop?], while a child works


def cut_short(store: Store) -> None:
    """A stop: kill the children still building a snapshot for `store` (a cluster node's other shards keep
    theirs); the checkpoints they were for end without one, and without counting a failure."""
    for pid, work in list(_working.items()):
        if work[0] is store and not work[1]:
            work[1] = True
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)  # its reading thread then sees the pipe end and reaps it


async def _image_for(store: Store, pid: int, read_fd: int) -> tuple[list[bytes] | None, bool]:
    """(the child's image or None, whether a stop cut it short)."""
    _working[pid] = [store, False]
    try:
        image = await _image_of(pid, read_fd)
    finally:
        cut = _working.pop(pid)[1]
    return (None, True) if cut else (image, False)


def worth_forking(core: BrokerCore) -> bool:
    """True where forking is available and the durable state costs enough to snapshot to be worth it."""
    if sys.platform != "linux":
        return False
    return snapshot_items(core) >= FORK_MIN_ENTRIES


def snapshot_items(core: BrokerCore) -> int:
    """What a snapshot of the durable state costs to build on the loop, in plain messages (see PLAIN_COST): the
    entries of durable queues (queued and pending), remembered dedup ids (a 5-minute window at a few thousand
    publishes a second holds a million) and retained topic messages. O(queues + topics)."""
    items = 0
    for queue in core.queues.values():
        if queue.ephemeral:
            continue
        lines = [len(level.packed) for level in queue.levels.values()]
        packed, largest = sum(lines), max(lines, default=0)
        objects = max(0, queue.length + queue.pending - packed)
        items += (largest + len(queue.dedup.table)) * PLAIN_COST + (packed - largest) * VIEW_COST
        items += objects * (MERGED_COST if largest else OBJECT_COST)
    for topic in core.topics.values():
        items += (len(topic.retained) + len(topic.dedup.table)) * PLAIN_COST
    return items


async def snapshot(core: BrokerCore, store: Store) -> list[bytes | bytearray] | None:
    """The snapshot for a checkpoint the caller stores right after this returns (no await in between), built
    in a child process, in pieces (`snap.tailed_pieces`: never one buffer); None if that could not be done (the
    caller then uses `core.snapshot()`)."""
    tail = snap.TailEncoder()  # encoded as appended: no tens-of-megabytes encoding when the image arrives
    noted = 0
    original = store.append

    def append(records):
        nonlocal noted
        if not isinstance(records, list | tuple):
            records = list(records)  # read twice below
        refs, token = original(records)
        noted += 1
        tail.add((ref, kind, payload) for ref, (kind, payload) in zip(refs, records, strict=True))
        return refs, token

    original_lazy = store.append_lazy

    def append_lazy(records):
        nonlocal noted
        if not isinstance(records, list | tuple):
            records = list(records)
        refs = original_lazy(records)
        noted += 1
        tail.add((ref, kind, payload) for ref, (kind, payload) in zip(refs, records, strict=True))
        return refs

    appends_before = store.stats().appends
    read_fd, write_fd = os.pipe()
    store.append = append  # the tail: every record appended while the child works
    if type(store).append_lazy is not Store.append_lazy:  # (the default goes through `append` already)
        store.append_lazy = append_lazy
    collecting = gc.isenabled()
    gc.disable()  # while pages are shared, a collection here would write to (so copy) every object's page
    try:
        try:
            pid = _fork()
        except OSError:  # no memory or no process left for a child: the snapshot is made on the loop
            os.close(read_fd)
            return None
        if pid == 0:
            _child(core, read_fd, write_fd)  # never returns
        os.close(write_fd)
        write_fd = -1
        image, _ = await _image_for(store, pid, read_fd)
    finally:
        if collecting:
            gc.enable()
        if vars(store).get("append") is append:
            del store.append
        if vars(store).get("append_lazy") is append_lazy:
            del store.append_lazy
        if write_fd >= 0:
            os.close(write_fd)
    if image is None or store.stats().appends - appends_before != noted:
        return None
    return snap.tailed_pieces(image, tail)


async def replayed(store: Store, now: float, wanted: Callable[[], bool] = lambda: True,
                   ) -> tuple[list[bytes | bytearray], object] | None:  # fmt: skip
    """(the snapshot, the store's position it stands for) as a new program rebuilt it from the store's files
    (`chute._replay_child`), for `store.checkpoint(snapshot, at=position)`; None where the store's files are not
    real ones (it has no `replay_point`), with CHUTE_SNAPSHOT_REPLAY=0, if the child failed (the caller then
    forks), or if it is no longer `wanted()` once the files are written (a stop came)."""
    global _replay_failures
    point = store.replay_point() if REPLAY and hasattr(store, "replay_point") else None
    if point is None or _replay_failures >= REPLAY_MAX_FAILURES:
        return None
    await store.flush()  # the records before the point are in the files the child reads
    if not wanted():
        return None
    read_fd, write_fd = os.pipe()
    try:
        pid = _spawn(_replay_argv(point.directory, point.end_ref, now), read_fd, write_fd)
    finally:
        os.close(write_fd)
    if pid is None:
        os.close(read_fd)
        return None
    image, cut = await _image_for(store, pid, read_fd)
    if cut:
        return None  # (a stop: nothing failed)
    if image is None:
        _replay_failures += 1
        log.warning("the checkpoint child failed (its errors are above); this checkpoint forks instead%s",
                    "" if _replay_failures < REPLAY_MAX_FAILURES else ", and so will the next ones")  # fmt: skip
        return None
    _replay_failures = 0
    return snap.tailed_pieces(image, snap.TailEncoder()), point  # (a tailed snapshot with an empty tail)


def _replay_argv(directory: str, end_ref: int, now: float) -> list[str]:
    """The child's command line (its first item an absolute path)."""
    return [sys.executable, "-m", "chute._replay_child", directory, str(end_ref), repr(now)]


def _spawn(argv: list[str], read_fd: int, write_fd: int) -> int | None:
    """Start `argv` writing to the pipe as its standard output (posix_spawn: the broker's page tables are not
    copied and no page is shared; every descriptor the broker opened is close-on-exec, as Python makes them)."""
    actions = [(os.POSIX_SPAWN_CLOSE, read_fd), (os.POSIX_SPAWN_DUP2, write_fd, 1)]
    if write_fd != 1:  # (1 itself when the broker runs with its standard output closed)
        actions.append((os.POSIX_SPAWN_CLOSE, write_fd))
    try:
        return os.posix_spawn(argv[0], argv, os.environ, file_actions=actions)
    except OSError:
        return None


def _fork() -> int:
    with warnings.catch_warnings():
        # Python 3.12+ warns when a process with threads forks: the child must not need a lock another thread
        # held. This child only reads the broker's memory, compresses and writes a pipe (glibc's malloc is
        # fork-safe); it takes no Python lock and uses none of the threads.
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()


def _child(core: BrokerCore, read_fd: int, write_fd: int) -> None:
    code = 1
    try:
        # inherited descriptors go first: above all the data directory's lock (a flock, held while any copy of
        # its descriptor is open: a child outliving a killed broker would keep the restarted one out), and the
        # sockets and files of the broker, which only the parent may use
        os.closerange(3, write_fd)
        os.closerange(write_fd + 1, MAX_FD)
        gc.disable()  # the child lives for one snapshot; a collection would only copy pages
        os.nice(10)  # on a busy machine the broker's loop comes first
        with contextlib.suppress(ValueError, OSError):
            signal.set_wakeup_fd(-1)  # a signal must not wake the parent's loop through the inherited fd
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError, OSError):
                signal.signal(signum, signal.SIG_DFL)
        view = memoryview(zlib.compress(core.snapshot(), COMPRESS_LEVEL))
        while view:
            view = view[os.write(write_fd, view) :]
        code = 0
    finally:
        os._exit(code)


async def _image_of(pid: int, read_fd: int) -> list[bytes] | None:
    """The child's image (None if it failed); a cancelled caller kills the child."""
    try:
        return await _collecting(pid, read_fd)
    except asyncio.CancelledError:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)  # the thread then reads the end of the pipe and reaps it
        raise


def _collecting(pid: int, read_fd: int) -> asyncio.Future:
    """`_collect` in a thread of its own, started now: whatever happens to the awaiting task (cancelled, its loop
    closed), the pipe is read to its end, closed and the child reaped. (A shared executor's queued work, once
    cancelled, would never run: the descriptor would leak and the child stay a zombie.)"""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def settle(image: list[bytes] | None, error: BaseException | None) -> None:
        if done.done():
            return
        if error is None:
            done.set_result(image)
        else:
            done.set_exception(error)

    def run() -> None:
        image, error = None, None
        try:
            image = _collect(pid, read_fd)
        except Exception as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for it any more
            loop.call_soon_threadsafe(settle, image, error)

    threading.Thread(target=run, name="chute-snapshot-reader", daemon=True).start()
    return done


def _collect(pid: int, read_fd: int) -> list[bytes] | None:
    """Read the child's image to its end, in pieces, and reap the child (in a worker thread); None if it
    failed."""
    chunks = []
    try:
        while chunk := os.read(read_fd, READ_CHUNK_BYTES):
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        _, status, usage = os.wait4(pid, 0)
        log.debug("checkpoint child %d: %.3f s of CPU, status %d", pid, usage.ru_utime + usage.ru_stime, status)
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        return None
    return chunks
