"""Data directories of format 1 (written before batch frames) open with today's Chute, lose nothing, and are
upgraded: their segments are read as they are and compacted into format 2, then deleted.

The golden directories in golden/v1 were written by Chute at commit 62c21ba (golden/make_golden.py says how);
golden/v1/state.json is what that version found in them after a restart.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from chute import Broker
from chute import _forked_snapshot as forked_snapshot
from chute.errors import StorageCorrupt
from chute.storage.file.record import segment_version
from tests.storage.golden.make_golden import Clock, describe, messages, store

GOLDEN = Path(__file__).parent / "golden" / "v1"
IMAGES = ["crashed", "clean", "log-only"]
EXPECTED = json.loads((GOLDEN / "state.json").read_text())


def copy(image: str, tmp_path: Path) -> Path:
    path = tmp_path / image
    shutil.copytree(GOLDEN / image, path)
    return path


def versions(path: Path) -> dict[int, int]:
    return {int(p.stem): segment_version(p.read_bytes(), int(p.stem)) for p in sorted(path.glob("*.seg"))}


async def found(broker: Broker) -> dict:
    state = describe(broker)
    state["messages"] = await messages(broker)
    return state


@pytest.mark.parametrize("image", IMAGES)
async def test_a_format_1_directory_opens_with_everything_in_it(tmp_path, image):
    path = copy(image, tmp_path)
    old = versions(path)
    assert set(old.values()) == {1}, "test setup: the golden is of format 1"
    broker = await Broker(store=store(path), clock=Clock(), auto_tick=False).start()
    try:
        assert await found(broker) == EXPECTED[image]
        await broker.publish("orders", b"new")  # appended in format 2, in a segment of its own
    finally:
        await broker.close()
    now = versions(path)
    # the old files were never appended to (the crashed image's may be gone already: a recovery that replayed a
    # tail checkpoints at once, and the checkpoint upgrades what it covers)
    assert all(old[s] == v for s, v in now.items() if s in old)
    assert all(v == 2 for s, v in now.items() if s not in old) and max(now) > max(old)


@pytest.mark.parametrize("image", IMAGES)
async def test_checkpoints_upgrade_every_segment_and_lose_nothing(tmp_path, image):
    path = copy(image, tmp_path)
    clock = Clock()
    broker = await Broker(store=store(path), clock=clock, auto_tick=False).start()
    try:
        for _ in range(4):  # each checkpoint compacts the format-1 files the previous one covered
            await broker.checkpoint()
        assert set(versions(path).values()) == {2}  # no format-1 file is left
        assert await found(broker) == EXPECTED[image]
    finally:
        await broker.close()
    broker = await Broker(store=store(path), clock=clock, auto_tick=False).start()
    try:
        assert await found(broker) == EXPECTED[image]  # and after a restart from the upgraded files
    finally:
        await broker.close()


@pytest.mark.parametrize("image", IMAGES)
async def test_a_checkpoint_rebuilt_from_format_1_files_by_a_child_loses_nothing(tmp_path, image, monkeypatch):
    monkeypatch.setattr(forked_snapshot, "FORK_MIN_ENTRIES", 0)  # the child (chute._replay_child) reads them
    spawned = []
    spawn = forked_snapshot._spawn
    monkeypatch.setattr(forked_snapshot, "_spawn", lambda *args: spawned.append(args) or spawn(*args))
    path = copy(image, tmp_path)
    clock = Clock()
    broker = await Broker(store=store(path), clock=clock, auto_tick=False).start()
    try:
        await broker.checkpoint()
        assert spawned
        await broker.store.flush()
        shutil.copytree(path, tmp_path / "after")  # the process dies here: no closing checkpoint
    finally:
        await broker.close()
    broker = await Broker(store=store(tmp_path / "after"), clock=clock, auto_tick=False).start()
    try:
        assert broker.recovery.records == 0  # all of it from the child's checkpoint
        assert await found(broker) == EXPECTED[image]
    finally:
        await broker.close()


def files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.iterdir() if p.name != "lock"}


def flip(path: Path, pos: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x20
    path.write_bytes(bytes(data))


async def test_damage_in_a_format_1_file_that_recovery_reads_is_storage_corrupt(tmp_path):
    path = copy("log-only", tmp_path)  # no checkpoint: recovery validates every frame of every file
    first = path / "00000000000000000001.seg"
    flip(first, 200)
    before = files(path)
    with pytest.raises(StorageCorrupt) as caught:
        await Broker(store=store(path), clock=Clock(), auto_tick=False).start()
    assert str(first) in caught.value.message
    assert files(path) == before  # nothing repaired, cut or upgraded


async def test_damage_found_while_upgrading_is_reported_and_the_file_kept(tmp_path):
    path = copy("clean", tmp_path)  # the checkpoint covers everything: recovery reads no frame
    first = path / "00000000000000000001.seg"
    flip(first, first.stat().st_size - 40)  # inside a live message's record
    broker = await Broker(store=store(path), clock=Clock(), auto_tick=False).start()
    try:
        with pytest.raises(StorageCorrupt) as caught:
            for _ in range(4):
                await broker.checkpoint()
        assert str(first) in caught.value.message
        assert first.exists()  # never deleted while it holds what could not be moved
    finally:
        await broker.close()
