"""Snapshots: the whole durable state of the core as one MessagePack document, for checkpoints.

A snapshot stands for every record appended before the checkpoint that stores it; recovery loads it, then
replays the records after it. Entries are stored column-wise (packed int arrays), so a million-message backlog
encodes and decodes in well under a second.

What a snapshot keeps: queues (settings, every live entry with its delivery count, delay and dead-letter
reason), topics (settings, subscriptions, retained messages), dedup windows, the id counters. What it drops on
purpose: leases (after a restart nothing is in flight: leased entries are ready again, their delivery count
kept), stats counters, ephemeral queues.

A snapshot with a tail (`TAILED`, made by chute._forked_snapshot): the image of the state at an earlier log
position P, compressed, plus the records appended between P and the checkpoint's position, in order, with their
refs. Loading it means loading the image, then replaying the tail like records read from the log.

Invariant: messages still being made durable (pending publishes) are included, because their records precede
the checkpoint position; the checkpoint is stored only after the log is durable up to that position.
"""

from __future__ import annotations

import zlib
from array import array

import msgspec

from chute.core.queue import DELAYED, GONE, PACKED, Entry, Queue

VERSION = 1  # the image: the state as of the checkpoint's position
TAILED = 2  # a compressed image of the state at an earlier position, plus the records appended since


class EntryColumns(msgspec.Struct, array_like=True):
    ids: bytes
    refs: bytes
    sizes: bytes
    expires_ms: bytes
    ready_ms: bytes
    dead_sources: bytes
    deliveries: bytes
    priorities: bytes
    dead_reasons: bytes
    groups: list[str | None]


class QueueImage(msgspec.Struct, array_like=True):
    id: int
    name: str
    settings: dict
    entries: EntryColumns
    dedup: list[tuple[str, float, int]]


class TopicImage(msgspec.Struct, array_like=True):
    id: int
    name: str
    settings: dict
    subscriptions: list[tuple[str, int, dict | None]]
    retained: list[tuple[int, int, int]]
    dedup: list[tuple[str, float, int]]


class Snapshot(msgspec.Struct, array_like=True):
    version: int
    last_id: int
    next_queue_id: int
    next_topic_id: int
    queues: list[QueueImage]
    topics: list[TopicImage]


class Tailed(msgspec.Struct, array_like=True):
    version: int
    image: bytes  # zlib-compressed `Snapshot` (VERSION)
    tail: list[tuple[int, int, bytes]]  # (ref, kind, payload) of every record appended after the image's position


_decoder = msgspec.msgpack.Decoder(Snapshot)
_tailed_decoder = msgspec.msgpack.Decoder(Tailed)
_encoder = msgspec.msgpack.Encoder()
_TAILED_PREFIX = bytes([0x93, TAILED])  # a msgpack array of 3 whose first item is TAILED (an image begins 0x96 0x01)


def encode_entries(entries: list[Entry]) -> EntryColumns:
    """Pack entries (sorted by id) column-wise."""
    entries.sort(key=lambda e: e.id)
    return EntryColumns(
        array("q", (e.id for e in entries)).tobytes(),
        array("q", (e.ref for e in entries)).tobytes(),
        array("q", (e.size for e in entries)).tobytes(),
        array("q", (int(e.expires * 1000) for e in entries)).tobytes(),
        array("q", (int(e.deadline * 1000) if e.state in (DELAYED, GONE) else 0 for e in entries)).tobytes(),
        array("q", (e.dead[1] if e.dead else 0 for e in entries)).tobytes(),
        array("l", (e.deliveries for e in entries)).tobytes(),
        bytes(e.priority for e in entries),
        bytes(e.dead[0] if e.dead else 0 for e in entries),
        [e.group for e in entries],
    )


def decode_entries(columns: EntryColumns) -> list[Entry]:
    """Unpack entries; each entry's `deadline` holds the time it is ready at (0.0: ready now)."""
    ids, refs, sizes, expires, ready = (
        array("q", getattr(columns, name)) for name in ("ids", "refs", "sizes", "expires_ms", "ready_ms")
    )
    sources = array("q", columns.dead_sources)
    deliveries = array("l", columns.deliveries)
    # 0.0 literals are shared objects; x / 1000.0 would allocate a float per entry even for "never"
    return [
        Entry(
            message_id,
            ref,
            size,
            priority,
            group,
            expires_ms / 1000.0 if expires_ms else 0.0,
            count,
            (reason, source) if reason else None,
            ready_ms / 1000.0 if ready_ms else 0.0,
        )  # fmt: skip
        for message_id, ref, size, priority, group, expires_ms, count, reason, source, ready_ms in zip(
            ids,
            refs,
            sizes,
            columns.priorities,
            columns.groups,
            expires,
            deliveries,
            columns.dead_reasons,
            sources,
            ready,
            strict=True,
        )  # fmt: skip
    ]


def queue_image(queue: Queue, pending: list[Entry]) -> QueueImage:
    """A queue's image. Packed messages are written from their columns, with no object each, when they are all
    of one priority and nothing else is stored (the common backlog); otherwise every entry is listed and sorted."""
    packed = queue.packed_columns()
    objects = list(queue.objects()) + pending
    if not objects and len(packed) <= 1:
        columns = _plain_columns(*packed[0]) if packed else encode_entries([])
    else:
        views = [e for priority, ids, refs, sizes in packed for e in _views(priority, ids, refs, sizes)]
        columns = encode_entries(objects + views)
    return QueueImage(
        queue.id,
        queue.name,
        msgspec.to_builtins(queue.settings),
        columns,
        queue.dedup.items(),
    )


def _views(priority: int, ids: array, refs: array, sizes: array) -> list[Entry]:
    return [Entry(i, r, s, priority, None, 0.0, 0, None, 0.0, PACKED) for i, r, s in zip(ids, refs, sizes)]


def _plain_columns(priority: int, ids: array, refs: array, sizes: array) -> EntryColumns:
    """Columns of plain messages (ids ascending): no expiry, delay, delivery or dead-letter reason."""
    n = len(ids)
    zeros = bytes(8 * n)
    return EntryColumns(
        ids.tobytes(), refs.tobytes(), array("q", sizes).tobytes(), zeros, zeros, zeros,
        bytes(array("l").itemsize * n), bytes([priority]) * n, bytes(n), [None] * n,
    )  # fmt: skip


def plain_columns(columns: EntryColumns) -> tuple[int, array, array, array] | None:
    """(priority, ids, refs, sizes) if every entry of `columns` is a plain ready message of one priority (what
    `Queue.load_packed` takes, no object made); None otherwise. Checked at C speed."""
    n = len(columns.groups)
    if not n:
        return None
    priorities = columns.priorities
    if (
        priorities.count(priorities[0]) != n
        or columns.dead_reasons.count(0) != n
        or columns.expires_ms.count(0) != len(columns.expires_ms)
        or columns.ready_ms.count(0) != len(columns.ready_ms)
        or columns.deliveries.count(0) != len(columns.deliveries)
        or columns.groups.count(None) != n
    ):
        return None
    sizes = array("q", columns.sizes)
    if n and (max(sizes) >= 2**31 or min(sizes) < 0):
        return None
    return priorities[0], array("q", columns.ids), array("q", columns.refs), array("i", sizes)


def encode(snapshot: Snapshot) -> bytes:
    return _encoder.encode(snapshot)


def with_tail(compressed_image: bytes, tail: list[tuple[int, int, bytes]]) -> bytes:
    """A TAILED snapshot: `compressed_image` (zlib of `encode(...)`) plus the records appended after it."""
    return _encoder.encode(Tailed(TAILED, compressed_image, tail))


def decode(data: bytes) -> tuple[Snapshot, list[tuple[int, int, bytes]]]:
    """The image and the tail of records to replay after it (empty for a plain snapshot)."""
    tail = []
    if data[:2] == _TAILED_PREFIX:
        tailed = _tailed_decoder.decode(data)
        data, tail = zlib.decompress(tailed.image), tailed.tail
    snapshot = _decoder.decode(data)
    if snapshot.version != VERSION:
        raise ValueError(f"snapshot version {snapshot.version} is not supported (expected {VERSION})")
    return snapshot, tail
