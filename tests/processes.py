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
