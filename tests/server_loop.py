"""Helpers for tests that look inside a running server: run a function on its event loop thread (where nothing
changes under it), and settle the broker state that is bounded by design but fluctuates (stale timers kept until
the heap compacts itself), so what a test measures or walks is what is stored."""

from __future__ import annotations

import threading


def on_server_loop(server, function):
    """Run `function()` on the loop of `server` (a chute.testing.RunningServer) and return its result."""
    broker, done, result = server.server.broker, threading.Event(), {}

    def run() -> None:
        try:
            result["value"] = function()
        finally:
            done.set()

    broker._loop.call_soon_threadsafe(run)
    assert done.wait(60), "the server's loop did not run the function within 60 s"
    return result["value"]


def compact_timers(core) -> None:
    """Compact a broker core's timer heap to its live timers now (on the core's loop)."""
    core.timers.compact()
    while core.timers.step(1 << 30):
        pass
