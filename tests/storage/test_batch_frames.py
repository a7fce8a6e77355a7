"""Format 2's batch frames: appends of one group commit share frames, records are addressed inside them and read
back from disk and cache.

A batch is the unit of a torn tail (replayed whole or not at all); damage inside a batch is reported at the
frame's position; a record read from disk is checked against its whole frame's crc, whichever record of the
frame is asked for and wherever a coalesced read begins.
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chute.errors import StorageCorrupt
from chute.storage import FileStore
from chute.storage.file.record import BATCH_SIZE, RECORD_SIZE, decode_batch, encode_batch

records_strategy = st.lists(
    st.tuples(st.integers(min_value=1, max_value=255), st.binary(max_size=200)), min_size=1, max_size=12
)


@given(records_strategy, st.integers(min_value=24, max_value=10**6), st.binary(max_size=64))
def test_batches_round_trip_and_cut_or_garbage_never_decodes_wrongly(records, pos, garbage):
    out = bytearray(b"x" * 3)  # a frame is encoded after whatever the buffer holds
    positions = encode_batch(out, records, pos)
    frame = bytes(out[3:])
    decoded = decode_batch(frame, 0)
    assert decoded is not None and decoded[1] == len(frame)
    assert [(kind, bytes(payload)) for _, kind, payload in decoded[0]] == records
    assert [at + pos for at, _, _ in decoded[0]] == positions
    for cut in range(len(frame)):
        assert decode_batch(frame[:cut], 0) is None
    assert decode_batch(bytes(len(frame)), 0) is None  # zeros (a preallocated tail) are never a frame
    result = decode_batch(garbage, 0)
    assert result is None or result[1] <= len(garbage)


async def _append_batches(path, batches, **options):
    store = FileStore(path, **options)
    await store.open()
    refs = []
    for batch in batches:
        more, token = store.append([(1, p) for p in batch])
        refs.append(more)
        await token  # each batch in a group commit of its own: a frame of its own
    await store.close()
    return refs


async def _reopen(path, **options):
    store = FileStore(path, **options)
    recovered = await store.open()
    return store, [p for _, _, p in recovered.records], recovered.report


def _segment(path):
    return path / sorted(p for p in os.listdir(path) if p.endswith(".seg"))[-1]


async def test_one_append_is_one_frame_and_a_torn_batch_is_lost_whole(tmp_path):
    first = [b"a%d" % i for i in range(5)]
    second = [b"b%d" % i for i in range(7)]
    refs = await _append_batches(tmp_path, [first, second])
    frame_pos = (refs[1][0] & 0xFFFFFFFF) - BATCH_SIZE
    # every record of the second batch lies in one frame: its records follow one another
    gaps = {(b & 0xFFFFFFFF) - (a & 0xFFFFFFFF) for a, b in zip(refs[1], refs[1][1:])}
    assert gaps == {RECORD_SIZE + 2}
    segment = _segment(tmp_path)
    whole = segment.read_bytes()
    for cut in (frame_pos + 1, frame_pos + BATCH_SIZE + 3, len(whole) - 1):
        segment.write_bytes(whole[:cut])
        store, got, report = await _reopen(tmp_path)
        assert got == first  # none of the torn batch's records, all of the one before
        assert report.truncated_at == (str(segment), frame_pos)
        await store.close()


async def test_a_bit_flip_inside_a_batch_is_reported_at_the_frame(tmp_path):
    batches = [[b"p%03d" % i + b"." * 150 for i in range(b * 10, b * 10 + 10)] for b in range(3)]
    refs = await _append_batches(tmp_path, batches)
    segment = _segment(tmp_path)
    data = bytearray(segment.read_bytes())
    data[(refs[1][4] & 0xFFFFFFFF) + RECORD_SIZE + 2] ^= 0x08  # a byte of the middle batch's fifth record
    segment.write_bytes(bytes(data))
    with pytest.raises(StorageCorrupt) as caught:
        await _reopen(tmp_path)
    assert f"{segment} at {(refs[1][0] & 0xFFFFFFFF) - BATCH_SIZE}" in caught.value.message


async def test_reads_from_disk_check_the_whole_frame(tmp_path):
    batches = [[b"r%03d" % i + b"-" * 90 for i in range(b * 8, b * 8 + 8)] for b in range(4)]
    refs = await _append_batches(tmp_path, batches)
    store, _, _ = await _reopen(tmp_path, cache_max_bytes=0)
    try:
        assert await store.read([refs[2][5]]) == [batches[2][5]]
        segment = _segment(tmp_path)
        data = bytearray(segment.read_bytes())
        data[(refs[2][1] & 0xFFFFFFFF) + RECORD_SIZE] ^= 0x01  # another record of the same frame
        segment.write_bytes(bytes(data))
        with pytest.raises(StorageCorrupt, match=f"at {(refs[2][0] & 0xFFFFFFFF) - BATCH_SIZE}"):
            await store.read([refs[2][5]])
        assert await store.read([refs[3][0], refs[0][7]]) == [batches[3][0], batches[0][7]]  # other frames
    finally:
        await store.close()


@given(
    st.lists(st.lists(st.integers(min_value=0, max_value=9000), min_size=1, max_size=30), min_size=1, max_size=12),
    st.randoms(use_true_random=False),
)
async def test_any_records_read_back_from_disk_and_cache(tmp_path_factory, sizes, rnd: random.Random):
    """Batches of random sizes over small segments (frames end segments early, big records get their own):
    any subset of refs reads back exactly, from the cache while open and from disk after a restart."""
    path = tmp_path_factory.mktemp("batches")
    batches = [[bytes([i % 251]) * size for i, size in enumerate(batch)] for batch in sizes]
    options = {"segment_max_bytes": 16384}
    store = FileStore(path, **options)
    await store.open()
    refs = []
    try:
        for batch in batches:
            more, token = store.append([(1, p) for p in batch])
            refs += more
            await token
        payloads = [p for batch in batches for p in batch]
        assert refs == sorted(refs) and len(set(refs)) == len(refs)
        assert all(store.read_cached(ref) == p for ref, p in zip(refs, payloads))
    finally:
        await store.close()
    store, got, _ = await _reopen(path, cache_max_bytes=0, **options)
    try:
        assert got == payloads
        picked = rnd.sample(range(len(refs)), k=rnd.randint(1, len(refs)))
        assert await store.read([refs[i] for i in picked]) == [payloads[i] for i in picked]
    finally:
        await store.close()


async def test_a_batch_larger_than_what_is_left_of_a_segment_goes_on_in_the_next(tmp_path):
    batch = [b"%03d" % i + b"z" * 200 for i in range(40)]  # ~8.4 KB across 2 KiB segments
    refs = await _append_batches(tmp_path, [batch], segment_max_bytes=2048)
    assert len({ref >> 32 for ref in refs[0]}) >= 4
    store, got, report = await _reopen(tmp_path, segment_max_bytes=2048, cache_max_bytes=0)
    try:
        assert got == batch and report.truncated_at is None
        assert await store.read(refs[0]) == batch
    finally:
        await store.close()


async def test_appends_of_one_group_share_a_frame_up_to_the_merge_limit(tmp_path):
    from chute.storage.file.log import FRAME_MERGE_BYTES

    store = FileStore(tmp_path)
    await store.open()
    try:
        refs, payloads = [], []
        for i in range(200):  # all before the first await: one group commit
            payload = b"%03d" % i + b"m" * 1000
            more, token = store.append([(1, payload)])
            refs += more
            payloads.append(payload)
        await token
        assert [store.read_cached(ref) for ref in refs] == payloads
    finally:
        await store.close()
    data = _segment(tmp_path).read_bytes()
    frames, pos = [], 24
    while pos < len(data):
        records, end = decode_batch(data, pos)
        frames.append(len(records))
        pos = end
    assert sum(frames) == 200 and 1 < len(frames) < 200  # merged, but no frame beyond the limit
    assert max(frames) * 1012 <= FRAME_MERGE_BYTES + 1012
    store, got, _ = await _reopen(tmp_path, cache_max_bytes=0)
    try:
        assert got == payloads and await store.read(refs[::7]) == payloads[::7]
    finally:
        await store.close()


async def test_a_checkpoint_ends_the_open_frame(tmp_path):
    """A checkpoint's position is a frame boundary: an append made after it was taken (while the group is still
    gathering) starts a new frame instead of growing the one the position ends. (Found by the SIGKILL campaign:
    recovery then began inside a frame.)"""
    import asyncio

    store = FileStore(tmp_path)
    await store.open()
    try:
        _, first = store.append([(1, b"x")])
        await asyncio.sleep(0)  # the flusher has taken "x" and is writing it: later appends gather
        store.append([(1, b"a")])
        checkpoint = asyncio.ensure_future(store.checkpoint(b"snapshot"))
        await asyncio.sleep(0)  # the checkpoint has taken its position, after "a"
        _, last = store.append([(1, b"b")])  # after the position: must not extend a's frame
        await checkpoint
        await last
    finally:
        await store.close()
    store, got, report = await _reopen(tmp_path)
    try:
        assert got == [b"b"] and report.truncated_at is None
    finally:
        await store.close()
