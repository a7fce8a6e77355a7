"""Helpers for tests that start processes (brokers, benchmark runs) and check they are gone afterwards."""

from __future__ import annotations

import os


def alive(pid: int) -> bool:
    """True while a process with this id exists (zombies included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


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
