"""`HeldFsync`: make a running server's file store wait in fsync while a test holds it, so publishes stay
unconfirmed (their bytes held against the memory high-water mark) for as long as the test needs."""

from __future__ import annotations

import threading

HOLD_LIMIT_S = 30.0  # a held fsync gives up waiting after this long, so a failing test cannot hang the store


class HeldFsync:
    """Makes every fsync of a server's file store wait while held (in the store's writer thread)."""

    def __init__(self, running) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = threading.Event()  # set once an fsync waits at the held gate (it passed the fault check)
        fs = running.server.broker.store.fs
        real = fs._fsync

        def fsync(path: str) -> None:
            if not self.gate.is_set():
                self.waiting.set()
            self.gate.wait(HOLD_LIMIT_S)
            real(path)

        fs._fsync = fsync

    def hold(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()
