"""The error table (stable codes and names) and the relaxed fsync policies of the file store."""

from __future__ import annotations

import asyncio

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


def test_a_recovery_report_reads_as_one_line():
    from chute.storage.api import RecoveryReport

    assert str(RecoveryReport()) == "0 records from 0 segment(s) after no clean shutdown (first start or a crash)"
    report = RecoveryReport(records=7, segments=2, truncated_at=("2.seg", 40), truncated_bytes=9, problems=["x"])
    assert str(report) == (
        "7 records from 2 segment(s) after no clean shutdown (first start or a crash); "
        "torn tail cut at 2.seg:40 (9 bytes); 1 problem(s): x"
    )
    assert "after a clean shutdown" in str(RecoveryReport(clean_shutdown=True))
