"""Message ids, request ids and receipt handles (sqs/messages.py): the hand-formatted ids read as UUIDs, and a
receipt handle is accepted only as issued, by the server that issued it."""

from __future__ import annotations

import base64
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chute.server.sqs import messages as msgs
from chute.server.sqs.errors import SqsError

KEY = bytes(range(32))


@given(st.integers(min_value=0, max_value=2**130))
def test_a_message_id_is_the_uuid_of_the_chute_id(chute_id):
    text = msgs.message_id(chute_id)
    assert text == str(uuid.UUID(int=chute_id & (2**128 - 1)))
    assert msgs.chute_id_of(text) == chute_id & (2**128 - 1)


def test_request_ids_are_distinct_uuids():
    ids = [msgs.request_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(str(uuid.UUID(i)) == i for i in ids)


@given(st.text(min_size=1, max_size=80).filter(lambda s: "\n" not in s), st.integers(0, 2**63), st.integers(0, 2**70))
def test_a_receipt_handle_round_trips(queue, receipt, chute_id):
    handle = msgs.make_receipt_handle(KEY, queue, receipt, chute_id)
    assert msgs.parse_receipt_handle(KEY, handle) == (queue, receipt, chute_id)


def test_a_changed_or_foreign_receipt_handle_is_refused():
    handle = msgs.make_receipt_handle(KEY, "jobs", 7, 42)
    raw = bytearray(base64.urlsafe_b64decode(handle[1:]))  # (after its tag)
    raw[-1] ^= 1  # the payload changed: the MAC no longer matches
    other_key = bytes(32)
    for bad in (handle[0] + base64.urlsafe_b64encode(bytes(raw)).decode(), handle[:-4], "", "x" * 2000, 17, None):
        with pytest.raises(SqsError) as excinfo:
            msgs.parse_receipt_handle(KEY, bad)
        assert excinfo.value.code == "ReceiptHandleIsInvalid"
    with pytest.raises(SqsError):
        msgs.parse_receipt_handle(other_key, handle)  # issued by another server (or before its key changed)


def test_a_receipt_handle_never_starts_like_a_command_line_option():
    """The AWS CLI reads `--receipt-handle -xyz` as a missing value and a new option: a handle starting with `-`
    (one in 64 of the plain base64url ones) could not be deleted with it. Handles start with a letter; one issued
    in the old form, before an upgrade, is still read."""
    dashed = 0
    for receipt in range(2000):
        payload = f"jobs\n{receipt}\n42".encode()
        old = base64.urlsafe_b64encode(msgs._mac(KEY, payload) + payload)  # the form handles had before
        dashed += old.startswith(b"-")
        handle = msgs.make_receipt_handle(KEY, "jobs", receipt, 42)
        assert handle[0].isalpha(), handle
        assert msgs.parse_receipt_handle(KEY, handle) == ("jobs", receipt, 42)
        assert msgs.parse_receipt_handle(KEY, old.decode()) == ("jobs", receipt, 42)
    assert dashed  # (the old form did start with '-' here)
