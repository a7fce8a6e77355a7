"""Snapshots: the whole durable state of the core as one MessagePack document, for checkpoints.

A snapshot stands for every record appended before the checkpoint that stores it; recovery loads it, then
replays the records after it. Entries are stored column-wise (packed int arrays), so a million-message backlog
encodes and decodes in well under a second. A queue's packed line (core/queue.py) is written from its columns
with the few other entries merged in by id, and read back into columns (`split_plain`): no object per plain
message either way.

What a snapshot keeps: queues (settings, every live entry with its delivery count, delay and dead-letter
reason), topics (settings, subscriptions, retained messages), dedup windows, the id counters. What it drops on
purpose: leases (after a restart nothing is in flight: leased entries are ready again, their delivery count
kept), stats counters, ephemeral queues.

A snapshot with a tail (`TAILED`, made by chute._forked_snapshot): the image of the state at an earlier log
position P, compressed, plus the records appended between P and the checkpoint's position, in order, with their
refs. Loading it means loading the image, then replaying the tail like records read from the log. Such a
snapshot is handed to the store in pieces (`tailed_pieces`), never joined: its tail, encoded record by record
while the child works (`TailEncoder`), is tens of megabytes after a burst, and making one buffer of it (the
copy and the first touch of every new page) would hold the GIL, so the event loop, for tens of milliseconds.
The pieces, end to end, are the MessagePack encoding of `Tailed(TAILED, image, records)`, which `decode` reads.

Invariant: messages still being made durable (pending publishes) are included, because their records precede
the checkpoint position; the checkpoint is stored only after the log is durable up to that position.
"""

from __future__ import annotations

import re
import zlib
from array import array
from bisect import bisect_left

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
    dedup: list[tuple[str, float, int]]  # (encoded from core/dedup.py's Remembered, decoded as tuples)


class TopicImage(msgspec.Struct, array_like=True):
    id: int
    name: str
    settings: dict
    subscriptions: list[tuple[str, int, dict | None]]
    retained: list[tuple[int, int, int]]
    dedup: list[tuple[str, float, int]]  # (encoded from core/dedup.py's Remembered, decoded as tuples)


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
    """A queue's image. The packed messages of its largest packed line are copied from their columns (no object
    each) and the few other entries merged in by id; other packed lines (more priorities) are listed as views."""
    packed = sorted(queue.packed_columns(), key=lambda line: len(line[1]))
    objects = list(queue.objects()) + pending
    if not packed:
        columns = encode_entries(objects)
    else:
        for priority, ids, refs, sizes in packed[:-1]:
            objects.extend(_views(priority, ids, refs, sizes))
        columns = _merged(*packed[-1], objects)
    return QueueImage(
        queue.id,
        queue.name,
        msgspec.to_builtins(queue.settings),
        columns,
        queue.dedup.items(),
    )


def _views(priority: int, ids: array, refs: array, sizes: array) -> list[Entry]:
    return [Entry(i, r, s, priority, None, 0.0, 0, None, 0.0, PACKED) for i, r, s in zip(ids, refs, sizes)]


def _merged(priority: int, ids: array, refs: array, sizes: array, objects: list[Entry]) -> EntryColumns:
    """Columns of plain messages (ids ascending) with `objects` merged in by id: the plain ones are copied in
    slices between the objects' places, so the cost per plain message is a memory copy."""
    n = len(ids)
    plain = EntryColumns(
        ids.tobytes(), refs.tobytes(), array("q", sizes).tobytes(), bytes(8 * n), bytes(8 * n), bytes(8 * n),
        bytes(_L * n), bytes([priority]) * n, bytes(n), [None] * n,
    )  # fmt: skip
    if not objects:
        return plain
    others = encode_entries(objects)  # sorted by id
    places = [bisect_left(ids, e.id) for e in objects]
    merged = []
    for name, width in _COLUMNS:
        a, b = getattr(plain, name), getattr(others, name)
        w = width or 1  # a list column is sliced by item
        parts, prev = [], 0
        for k, place in enumerate(places):
            parts.append(a[prev * w : place * w])
            parts.append(b[k * w : (k + 1) * w])
            prev = place
        parts.append(a[prev * w :])
        merged.append(b"".join(parts) if width else [x for part in parts for x in part])
    return EntryColumns(*merged)


_L = array("l").itemsize
# each column's bytes per entry (0: a list, one item per entry)
_COLUMNS = [("ids", 8), ("refs", 8), ("sizes", 8), ("expires_ms", 8), ("ready_ms", 8), ("dead_sources", 8),
            ("deliveries", _L), ("priorities", 1), ("dead_reasons", 1), ("groups", 0)]  # fmt: skip


def _nonzero_rows(data: bytes, width: int, rows: set[int], limit: int) -> bool:
    """Add to `rows` the rows of a column of `width`-byte ints that are not 0; False if more than `limit`."""
    if data.count(0) == len(data):
        return True
    if len(data) - data.count(0) > limit * width:
        return False
    for match in re.finditer(rb"[^\x00]", data):
        rows.add(match.start() // width)
        if len(rows) > limit:
            return False
    return True


def split_plain(columns: EntryColumns) -> tuple[tuple[int, array, array, array], list[Entry]] | None:
    """Split a queue's entries into the plain ready messages of its main priority, as columns (what
    `Queue.load_packed` takes: no object each), and the others as entries; None if most are not plain (then
    `decode_entries` is as good). The scan for the others runs at C speed."""
    n = len(columns.groups)
    if not n:
        return None
    limit = n // 8
    others: set[int] = set()
    for name, width in _COLUMNS[3:9]:
        if name != "priorities" and not _nonzero_rows(getattr(columns, name), width, others, limit):
            return None
    priorities = columns.priorities
    priority = max(set(priorities[:1024]), key=priorities[:1024].count)  # the main one, from a sample
    if priorities.count(priority) != n:
        others.update(i for i, p in enumerate(priorities) if p != priority)
    if columns.groups.count(None) != n:
        others.update(i for i, g in enumerate(columns.groups) if g is not None)
    sizes = array("q", columns.sizes)
    if max(sizes) >= 2**31 or min(sizes) < 0:
        others.update(i for i, size in enumerate(sizes) if not 0 <= size < 2**31)
    if len(others) > limit:
        return None
    ids, refs = array("q", columns.ids), array("q", columns.refs)
    entries = []
    if others:
        rows = sorted(others)
        entries = decode_entries(_rows(columns, rows))
        keep = _runs(rows, n)
        ids = array("q", b"".join(ids[a:b].tobytes() for a, b in keep))
        refs = array("q", b"".join(refs[a:b].tobytes() for a, b in keep))
        sizes = array("q", b"".join(sizes[a:b].tobytes() for a, b in keep))
    return (priority, ids, refs, array("i", sizes)), entries


def _runs(rows: list[int], n: int) -> list[tuple[int, int]]:
    """The [start, end) ranges of 0..n not in `rows` (sorted)."""
    runs, prev = [], 0
    for row in rows:
        if row > prev:
            runs.append((prev, row))
        prev = row + 1
    if prev < n:
        runs.append((prev, n))
    return runs


def _rows(columns: EntryColumns, rows: list[int]) -> EntryColumns:
    """The columns of only `rows`."""
    picked = []
    for name, width in _COLUMNS:
        data = getattr(columns, name)
        picked.append(b"".join(data[r * width : (r + 1) * width] for r in rows) if width else [data[r] for r in rows])
    return EntryColumns(*picked)


def encode(snapshot: Snapshot) -> bytes:
    return _encoder.encode(snapshot)


TAIL_CHUNK_BYTES = 256 << 10  # a tail's buffers grow to about this size: one allocation per ~900 records


class TailEncoder:
    """The tail of a TAILED snapshot, encoded as its records are appended (each (ref, kind, payload) as
    `Tailed.tail`'s items encode), in buffers of about TAIL_CHUNK_BYTES: the work is spread over the appends, and no
    buffer ever holds the whole tail."""

    __slots__ = ("chunks", "count")

    def __init__(self) -> None:
        self.chunks: list[bytearray] = [bytearray()]
        self.count = 0

    def add(self, records) -> None:
        """Encode (ref, kind, payload) records, in order."""
        chunk, added = self.chunks[-1], 0
        for record in records:
            if len(chunk) >= TAIL_CHUNK_BYTES:
                chunk = bytearray()
                self.chunks.append(chunk)
            _encoder.encode_into(record, chunk, -1)
            added += 1
        self.count += added


def tailed_pieces(image_pieces: list[bytes], tail: TailEncoder) -> list[bytes | bytearray]:
    """The encoding of `Tailed(TAILED, b"".join(image_pieces), records)`, in pieces: MessagePack headers of our
    own around the image's pieces and the tail's buffers, as they are."""
    return [
        bytes([0x93, TAILED]) + _bin_header(sum(map(len, image_pieces))),
        *image_pieces,
        _array_header(tail.count),
        *tail.chunks,
    ]


def _bin_header(length: int) -> bytes:
    """MessagePack's header of a `length`-byte bin (how msgspec encodes `bytes`)."""
    if length < 1 << 8:
        return bytes([0xC4, length])
    if length < 1 << 16:
        return b"\xc5" + length.to_bytes(2, "big")
    return b"\xc6" + length.to_bytes(4, "big")


def _array_header(count: int) -> bytes:
    """MessagePack's header of an array of `count` items."""
    if count < 16:
        return bytes([0x90 | count])
    if count < 1 << 16:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")


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
