"""Helpers for tests that start processes (brokers, benchmark runs) and check they are gone afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import os


def alive(pid: int) -> bool:
    """True while a process with this id exists (zombies included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def abandon_broker(broker) -> None:
    """What the death of its process leaves of a Broker on a FileStore: `end_background(broker)`, and its store as
    `abandon` leaves it."""
    await end_background(broker)
    abandon(broker.store)


async def end_background(broker) -> None:
    """A broker's background work ends with its process: the checkpoint in flight is cancelled (which kills any
    child it started) and the idle checkpoint's timer goes. Without this an abandoned broker's checkpoint goes on
    in the test's process: it may fork (once its replay child finds the newer checkpoint of the broker that
    replaced it), and the child's inherited copy of the new broker's lock keeps a restart out."""
    if broker._idle_check is not None:
        broker._idle_check.cancel()
        broker._idle_check = None
    task = broker._housekeeping
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def abandon(store) -> None:
    """What the death of its process leaves of a FileStore: nothing of it runs any more (its writer thread is
    stopped, its reader and checkpoint threads end, its timer for lazily appended records is cancelled); its files
    are as the crash left them."""
    store._executor.shutdown(wait=True)
    for pool in (store._reader, store._checkpointer):
        if pool is not None:
            pool.shutdown(wait=False)
    if store._lazy_timer is not None:
        store._lazy_timer.cancel()


def without_checkpoint(broker):
    """Make `broker` close without storing a checkpoint, so the next start replays its records (as after a
    crash once they were durable)."""

    async def no_checkpoint(snapshot: bytes) -> None:
        return None

    broker.store.checkpoint = no_checkpoint
    return broker
