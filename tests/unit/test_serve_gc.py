"""`chute serve` moves its start-up objects out of the garbage collector's reach before it starts serving: the
middle and full collections then walk only what serving creates (20-27 ms holds of the loop without it)."""

from __future__ import annotations

import gc
import importlib

import pytest

from chute.server import load_config

serve = importlib.import_module("chute.cli.serve")  # (the module: `chute.cli.serve` is also the click command)

pytestmark = pytest.mark.timeout(30)


class Started(Exception):
    """Raised by the patched start: the test needs only the moment before serving."""


async def test_start_up_objects_are_frozen_before_the_server_starts(tmp_path, monkeypatch):
    seen = {}

    async def start(self):
        seen["frozen"] = gc.get_freeze_count()
        raise Started

    monkeypatch.setattr(serve.Server, "start", start)
    config = load_config(data_dir=str(tmp_path), port=0)  # (nothing listens: start is cut short)
    gc.unfreeze()
    try:
        with pytest.raises(Started):
            await serve._serve(config)
    finally:
        gc.unfreeze()  # (this process is pytest's: it must not keep its objects frozen)
    assert seen["frozen"] > 10_000  # every module's functions, classes and constants loaded so far
