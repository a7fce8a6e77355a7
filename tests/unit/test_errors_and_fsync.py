"""The error table, the fsync policies, and `python -m chute` (the in-process runner) as a user runs it."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import pytest

from chute import errors
from chute.storage import FileStore


def test_error_table_is_consistent():
    codes = [cls.code for cls in errors.ERRORS]
    names = [cls.name for cls in errors.ERRORS]
    assert len(set(codes)) == len(codes) and len(set(names)) == len(names)
    for cls in errors.ERRORS:
        assert issubclass(cls, errors.ChuteError)
        assert 400 <= cls.http_status < 600
        assert cls.__doc__, f"{cls.__name__} needs a docstring: it is the error's documentation"
        assert errors.BY_CODE[cls.code] is cls and errors.BY_NAME[cls.name] is cls
    # published codes never change meaning
    assert (errors.QueueNotFound.code, errors.QueueFull.code, errors.StorageFailed.code) == (2001, 3001, 5001)


@pytest.mark.parametrize("policy", ["interval", "never"])
async def test_relaxed_fsync_policies_confirm_and_persist_on_close(tmp_path, policy):
    store = FileStore(tmp_path, fsync_policy=policy, fsync_interval_ms=5)
    await store.open()
    refs, token = store.append([(1, b"a"), (1, b"b")])
    await token
    await store.close()
    again = FileStore(tmp_path)
    recovered = await again.open()
    assert [p for _, _, p in recovered.records] == [b"a", b"b"]
    assert recovered.report.clean_shutdown
    await again.close()


async def test_interval_policy_fsyncs_in_the_background(tmp_path):
    store = FileStore(tmp_path, fsync_policy="interval", fsync_interval_ms=5)
    await store.open()
    _, token = store.append([(1, b"a")])
    await token
    before = store.stats().fsyncs
    _, token = store.append([(1, b"b")])  # confirmed on write; its fsync comes inline or from the timer
    await token
    for _ in range(200):  # bounded wait for the timer-driven fsync
        if store.stats().fsyncs > before:
            break
        await asyncio.sleep(0.005)
    assert store.stats().fsyncs > before
    await store.close()


def _run(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "chute", *args], capture_output=True, text=True, timeout=timeout)


def test_runner_demo_round_trip(tmp_path):
    result = _run(str(tmp_path / "data"), "--demo")
    assert result.returncode == 0, result.stderr
    assert "published 3 messages" in result.stdout and "received b'hello 0'" in result.stdout
    again = _run(str(tmp_path / "data"), "--demo")
    assert again.returncode == 0 and "recovered" in again.stdout


def test_runner_rejects_bad_flags_with_a_one_line_error(tmp_path):
    result = _run(str(tmp_path), "--fsync", "sometimes")
    assert result.returncode == 2 and "invalid choice" in result.stderr and "Traceback" not in result.stderr


def test_runner_reports_a_corrupt_directory_without_a_traceback(tmp_path):
    data = tmp_path / "data"
    assert _run(str(data), "--demo").returncode == 0
    (data / "checkpoint").write_bytes(b"CHUTECKP garbage")
    result = _run(str(data), "--demo")
    assert result.returncode == 1
    assert "storage_corrupt" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_runner_serves_until_interrupted_then_closes_cleanly(tmp_path, sig):
    process = subprocess.Popen(
        [sys.executable, "-m", "chute", str(tmp_path / "data")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in process.stdout:  # bounded by the test timeout
            if "press Ctrl-C" in line:
                break
        process.send_signal(sig)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
        process.wait(timeout=30)
    assert process.returncode == 0, err
    assert "closed cleanly" in out
    assert (tmp_path / "data" / "clean-shutdown").exists()
