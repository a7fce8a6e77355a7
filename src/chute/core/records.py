"""Log records: the durable description of every change the core makes, and their payload codecs.

A store keeps `(kind, payload)` pairs and never looks inside; this module is the one place that gives them
meaning. Payloads are MessagePack arrays (msgspec, `array_like` structs: no field names on disk). Replaying the
records after a snapshot, in order, rebuilds exactly the durable state (see core/recovery.py).

| kind | name      | payload fields                                                                  |
|------|-----------|---------------------------------------------------------------------------------|
| 1    | MESSAGE   | id, publish_ms, topic_id, queue_ids, ready_ms, expires_ms, priority, group,     |
|      |           | dedup_id, subject, headers, body  — the body is written once, whatever the      |
|      |           | number of queues it goes to; then `queue_times`: [[queue_id, ready_ms,          |
|      |           | expires_ms], ...] for the queues whose times differ from ready_ms / expires_ms  |
|      |           | (a topic message taking a subscription queue's default delay or TTL), or nil    |
| 2    | COPY      | same as MESSAGE: a live message moved by compaction; replay updates its ref     |
| 3    | REMOVE    | queue_id, reason, ids — ack (reason 0), drop (a dead-letter reason code), or a  |
|      |           | step of a large purge (reason 5)                                                |
| 4    | MOVE      | from_queue_id, to_queue_id, reason, ids — dead-letter (reason > 0), redrive (0) |
| 5    | META      | op, args — queue / topic / subscription create, update, delete                  |
| 6    | PURGE     | queue_id, kept_ids — drop every message of the queue but the in-flight `kept`   |
| 7    | DELIVERED | queue_id, ids — delivery counts +1 (written without waiting for durability)     |
| 8    | ENQUEUE   | queue_id, [[id, ref, size, priority, group, expires_ms], ...] — retained topic  |
|      |           | messages given to a new subscription                                            |

Invariant: a kind number and the order of its fields never change meaning; new fields go at the end with a
default, new kinds get new numbers.
"""

from __future__ import annotations

import msgspec

MESSAGE = 1
COPY = 2
REMOVE = 3
MOVE = 4
META = 5
PURGE = 6
DELIVERED = 7
ENQUEUE = 8

# reason codes in REMOVE / MOVE records and in dead-letter entries
ACKED = 0
PURGED = 5  # REMOVE only: a step of a purge too large to do in one turn of the event loop
REASON_CODES = {"max_deliveries": 1, "expired": 2, "overflow": 3, "rejected": 4}
REASON_NAMES = {code: name for name, code in REASON_CODES.items()}


class MessageRecord(msgspec.Struct, array_like=True):
    id: int
    publish_ms: int
    topic_id: int
    queue_ids: list[int]
    ready_ms: int
    expires_ms: int
    priority: int
    group: str | None
    dedup_id: str | None
    subject: str | None
    headers: dict[str, str] | None
    body: bytes
    # a topic message's ready / expiry time in a queue whose defaults give it other times than its own
    queue_times: list[tuple[int, int, int]] | None = None

    def times_in(self, queue_id: int) -> tuple[int, int]:
        """(ready_ms, expires_ms) of this message in the queue numbered `queue_id`."""
        if self.queue_times:
            for each_id, ready_ms, expires_ms in self.queue_times:
                if each_id == queue_id:
                    return ready_ms, expires_ms
        return self.ready_ms, self.expires_ms


class RemoveRecord(msgspec.Struct, array_like=True):
    queue_id: int
    reason: int
    ids: list[int]


class MoveRecord(msgspec.Struct, array_like=True):
    from_queue_id: int
    to_queue_id: int
    reason: int
    ids: list[int]


class MetaRecord(msgspec.Struct, array_like=True):
    op: str
    args: dict


class PurgeRecord(msgspec.Struct, array_like=True):
    queue_id: int
    kept_ids: list[int]


class DeliveredRecord(msgspec.Struct, array_like=True):
    queue_id: int
    ids: list[int]


class EnqueueRecord(msgspec.Struct, array_like=True):
    queue_id: int
    entries: list[tuple[int, int, int, int, str | None, int]]


_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode

decode_message = msgspec.msgpack.Decoder(MessageRecord).decode
DECODERS = {
    MESSAGE: decode_message,
    COPY: decode_message,
    REMOVE: msgspec.msgpack.Decoder(RemoveRecord).decode,
    MOVE: msgspec.msgpack.Decoder(MoveRecord).decode,
    META: msgspec.msgpack.Decoder(MetaRecord).decode,
    PURGE: msgspec.msgpack.Decoder(PurgeRecord).decode,
    DELIVERED: msgspec.msgpack.Decoder(DeliveredRecord).decode,
    ENQUEUE: msgspec.msgpack.Decoder(EnqueueRecord).decode,
}
